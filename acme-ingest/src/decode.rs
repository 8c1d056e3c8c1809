//! Decoding PostgreSQL's binary wire format straight into Arrow column builders.
//!
//! The same value decoders serve `COPY ... (FORMAT binary)` (the snapshot) and pgoutput's
//! binary tuples (the change stream). No text parsing, no per-row heap objects: every value
//! goes from the wire buffer into its column builder.

use std::sync::Arc;

use arrow::array::{
    ArrayBuilder, ArrayRef, BinaryBuilder, BooleanBuilder, Date32Builder, Decimal128Builder, Float32Builder,
    Float64Builder, Int16Builder, Int32Builder, Int64Builder, StringBuilder, TimestampMicrosecondBuilder,
};

use crate::error::{IngestError, Result};
use crate::types::PgType;

/// Days between 1970-01-01 (Arrow) and 2000-01-01 (PostgreSQL).
const PG_EPOCH_DAYS: i32 = 10_957;
/// Microseconds between 1970-01-01 and 2000-01-01.
const PG_EPOCH_MICROS: i64 = 946_684_800_000_000;

/// A builder for one column of a PostgreSQL type.
#[derive(Debug)]
pub enum ColumnBuilder {
    /// int2
    Int16(Int16Builder),
    /// int4
    Int32(Int32Builder),
    /// int8 and time
    Int64(Int64Builder),
    /// float4
    Float32(Float32Builder),
    /// float8
    Float64(Float64Builder),
    /// numeric
    Decimal(Decimal128Builder),
    /// bool
    Bool(BooleanBuilder),
    /// text-like types, uuid, json
    Utf8(StringBuilder),
    /// date
    Date(Date32Builder),
    /// timestamps
    Timestamp(TimestampMicrosecondBuilder),
    /// bytea
    Binary(BinaryBuilder),
}

/// Where a value came from, for error messages.
#[derive(Debug, Clone, Copy)]
pub struct ValueContext<'a> {
    /// Qualified table name.
    pub table: &'a str,
    /// Column name.
    pub column: &'a str,
}

impl ColumnBuilder {
    /// A builder for `ty` with room for `capacity` rows.
    pub fn new(ty: PgType, capacity: usize) -> Self {
        match ty {
            PgType::Int2 => ColumnBuilder::Int16(Int16Builder::with_capacity(capacity)),
            PgType::Int4 => ColumnBuilder::Int32(Int32Builder::with_capacity(capacity)),
            PgType::Int8 | PgType::Time => ColumnBuilder::Int64(Int64Builder::with_capacity(capacity)),
            PgType::Float4 => ColumnBuilder::Float32(Float32Builder::with_capacity(capacity)),
            PgType::Float8 => ColumnBuilder::Float64(Float64Builder::with_capacity(capacity)),
            PgType::Numeric { precision, scale } => ColumnBuilder::Decimal(
                Decimal128Builder::with_capacity(capacity)
                    .with_precision_and_scale(precision, scale)
                    .unwrap_or_else(|_| Decimal128Builder::with_capacity(capacity)),
            ),
            PgType::Bool => ColumnBuilder::Bool(BooleanBuilder::with_capacity(capacity)),
            PgType::Text | PgType::Uuid | PgType::Json | PgType::Jsonb => {
                ColumnBuilder::Utf8(StringBuilder::with_capacity(capacity, capacity * 16))
            }
            PgType::Date => ColumnBuilder::Date(Date32Builder::with_capacity(capacity)),
            PgType::Timestamp => ColumnBuilder::Timestamp(TimestampMicrosecondBuilder::with_capacity(capacity)),
            PgType::Timestamptz => {
                ColumnBuilder::Timestamp(TimestampMicrosecondBuilder::with_capacity(capacity).with_timezone("UTC"))
            }
            PgType::Bytea => ColumnBuilder::Binary(BinaryBuilder::with_capacity(capacity, capacity * 16)),
        }
    }

    /// Append a NULL.
    pub fn append_null(&mut self) {
        match self {
            ColumnBuilder::Int16(b) => b.append_null(),
            ColumnBuilder::Int32(b) => b.append_null(),
            ColumnBuilder::Int64(b) => b.append_null(),
            ColumnBuilder::Float32(b) => b.append_null(),
            ColumnBuilder::Float64(b) => b.append_null(),
            ColumnBuilder::Decimal(b) => b.append_null(),
            ColumnBuilder::Bool(b) => b.append_null(),
            ColumnBuilder::Utf8(b) => b.append_null(),
            ColumnBuilder::Date(b) => b.append_null(),
            ColumnBuilder::Timestamp(b) => b.append_null(),
            ColumnBuilder::Binary(b) => b.append_null(),
        }
    }

    /// Append one value in PostgreSQL's binary format (the type's `send` output).
    pub fn append_binary(&mut self, ty: PgType, raw: &[u8], ctx: ValueContext<'_>) -> Result<()> {
        let bad = |what: &str| IngestError::BadValue {
            table: ctx.table.to_string(),
            column: ctx.column.to_string(),
            message: what.to_string(),
        };
        match (self, ty) {
            (ColumnBuilder::Int16(b), _) => {
                b.append_value(i16::from_be_bytes(fixed(raw).ok_or_else(|| bad("int2 needs 2 bytes"))?))
            }
            (ColumnBuilder::Int32(b), _) => {
                b.append_value(i32::from_be_bytes(fixed(raw).ok_or_else(|| bad("int4 needs 4 bytes"))?))
            }
            (ColumnBuilder::Int64(b), _) => {
                b.append_value(i64::from_be_bytes(fixed(raw).ok_or_else(|| bad("8-byte value expected"))?))
            }
            (ColumnBuilder::Float32(b), _) => b.append_value(f32::from_bits(u32::from_be_bytes(
                fixed(raw).ok_or_else(|| bad("float4 needs 4 bytes"))?,
            ))),
            (ColumnBuilder::Float64(b), _) => b.append_value(f64::from_bits(u64::from_be_bytes(
                fixed(raw).ok_or_else(|| bad("float8 needs 8 bytes"))?,
            ))),
            (ColumnBuilder::Decimal(b), PgType::Numeric { precision, scale }) => {
                b.append_value(decode_numeric(raw, precision, scale, ctx)?)
            }
            (ColumnBuilder::Bool(b), _) => match raw {
                [v] => b.append_value(*v != 0),
                _ => return Err(bad("bool needs 1 byte")),
            },
            (ColumnBuilder::Utf8(b), PgType::Uuid) => {
                let bytes: [u8; 16] = fixed(raw).ok_or_else(|| bad("uuid needs 16 bytes"))?;
                b.append_value(format_uuid(&bytes));
            }
            (ColumnBuilder::Utf8(b), PgType::Jsonb) => match raw.split_first() {
                Some((1, text)) => b.append_value(std::str::from_utf8(text).map_err(|_| bad("jsonb is not UTF-8"))?),
                _ => return Err(bad("unknown jsonb binary version")),
            },
            (ColumnBuilder::Utf8(b), _) => {
                b.append_value(std::str::from_utf8(raw).map_err(|_| bad("text is not valid UTF-8"))?)
            }
            (ColumnBuilder::Date(b), _) => {
                let days = i32::from_be_bytes(fixed(raw).ok_or_else(|| bad("date needs 4 bytes"))?);
                b.append_value(match days {
                    i32::MAX | i32::MIN => days,
                    d => d.checked_add(PG_EPOCH_DAYS).ok_or_else(|| bad("date out of range"))?,
                });
            }
            (ColumnBuilder::Timestamp(b), _) => {
                let micros = i64::from_be_bytes(fixed(raw).ok_or_else(|| bad("timestamp needs 8 bytes"))?);
                b.append_value(match micros {
                    i64::MAX | i64::MIN => micros,
                    m => m.checked_add(PG_EPOCH_MICROS).ok_or_else(|| bad("timestamp out of range"))?,
                });
            }
            (ColumnBuilder::Binary(b), _) => b.append_value(raw),
            (ColumnBuilder::Decimal(_), _) => {
                return Err(IngestError::Internal("decimal builder for a non-numeric type".into()));
            }
        }
        Ok(())
    }

    /// Finish the column into an array (the builder is reset and reusable).
    pub fn finish(&mut self) -> ArrayRef {
        match self {
            ColumnBuilder::Int16(b) => Arc::new(b.finish()),
            ColumnBuilder::Int32(b) => Arc::new(b.finish()),
            ColumnBuilder::Int64(b) => Arc::new(b.finish()),
            ColumnBuilder::Float32(b) => Arc::new(b.finish()),
            ColumnBuilder::Float64(b) => Arc::new(b.finish()),
            ColumnBuilder::Decimal(b) => Arc::new(b.finish()),
            ColumnBuilder::Bool(b) => Arc::new(b.finish()),
            ColumnBuilder::Utf8(b) => Arc::new(b.finish()),
            ColumnBuilder::Date(b) => Arc::new(b.finish()),
            ColumnBuilder::Timestamp(b) => Arc::new(b.finish()),
            ColumnBuilder::Binary(b) => Arc::new(b.finish()),
        }
    }

    /// Rows appended since the last finish.
    pub fn len(&self) -> usize {
        match self {
            ColumnBuilder::Int16(b) => b.len(),
            ColumnBuilder::Int32(b) => b.len(),
            ColumnBuilder::Int64(b) => b.len(),
            ColumnBuilder::Float32(b) => b.len(),
            ColumnBuilder::Float64(b) => b.len(),
            ColumnBuilder::Decimal(b) => b.len(),
            ColumnBuilder::Bool(b) => b.len(),
            ColumnBuilder::Utf8(b) => b.len(),
            ColumnBuilder::Date(b) => b.len(),
            ColumnBuilder::Timestamp(b) => b.len(),
            ColumnBuilder::Binary(b) => b.len(),
        }
    }
}

fn fixed<const N: usize>(raw: &[u8]) -> Option<[u8; N]> {
    raw.try_into().ok()
}

fn format_uuid(b: &[u8; 16]) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(36);
    for (i, byte) in b.iter().enumerate() {
        if matches!(i, 4 | 6 | 8 | 10) {
            out.push('-');
        }
        out.push(HEX[(byte >> 4) as usize] as char);
        out.push(HEX[(byte & 0xf) as usize] as char);
    }
    out
}

/// Decode a binary `numeric` into an unscaled i128 at `scale`, exactly, or fail with an error
/// that names the table, column and value.
pub fn decode_numeric(raw: &[u8], precision: u8, scale: i8, ctx: ValueContext<'_>) -> Result<i128> {
    let err = |value: String, why: &str| IngestError::NumericOutOfRange {
        table: ctx.table.to_string(),
        column: ctx.column.to_string(),
        value,
        message: format!("{why} (stored as decimal({precision},{scale}))"),
    };
    if raw.len() < 8 {
        return Err(IngestError::BadValue {
            table: ctx.table.to_string(),
            column: ctx.column.to_string(),
            message: "numeric header is truncated".into(),
        });
    }
    let word = |i: usize| i16::from_be_bytes([raw[2 * i], raw[2 * i + 1]]);
    let ndigits = word(0);
    let weight = i32::from(word(1));
    let sign = word(2) as u16;
    let dscale = word(3);
    if ndigits < 0 || raw.len() != 8 + 2 * ndigits as usize {
        return Err(IngestError::BadValue {
            table: ctx.table.to_string(),
            column: ctx.column.to_string(),
            message: "numeric digit count does not match its length".into(),
        });
    }
    match sign {
        0x0000 | 0x4000 => {}
        0xC000 => return Err(err("NaN".into(), "NaN has no decimal representation")),
        0xD000 => return Err(err("Infinity".into(), "infinity has no decimal representation")),
        0xF000 => return Err(err("-Infinity".into(), "infinity has no decimal representation")),
        _ => return Err(err(format!("sign 0x{sign:04x}"), "unknown numeric sign")),
    }
    let digits: Vec<i16> = (0..ndigits as usize).map(|i| word(4 + i)).collect();
    let text = || numeric_text(&digits, weight, sign == 0x4000, dscale);
    let mut value: i128 = 0;
    let scale = i32::from(scale);
    for (i, &d) in digits.iter().enumerate() {
        let d = i128::from(d);
        // This digit is worth d * 10000^(weight - i); scaled by 10^scale.
        let exp10 = 4 * (weight - i as i32) + scale;
        let term = if exp10 >= 0 {
            pow10(exp10).and_then(|p| d.checked_mul(p)).ok_or_else(|| err(text(), "value too large"))?
        } else {
            let div = pow10(-exp10).unwrap_or(i128::MAX);
            if d % div != 0 {
                return Err(err(text(), "more fractional digits than the column's scale"));
            }
            d / div
        };
        value = value.checked_add(term).ok_or_else(|| err(text(), "value too large"))?;
    }
    if value.unsigned_abs() >= 10u128.pow(u32::from(precision)) {
        return Err(err(text(), "more digits than the column's precision"));
    }
    Ok(if sign == 0x4000 { -value } else { value })
}

fn pow10(exp: i32) -> Option<i128> {
    if (0..=38).contains(&exp) { Some(10i128.pow(exp as u32)) } else { None }
}

/// Render a numeric's digits as text for error messages.
fn numeric_text(digits: &[i16], weight: i32, negative: bool, dscale: i16) -> String {
    let mut int_part = String::new();
    for i in 0..=weight.max(0) {
        let d = if (i as usize) < digits.len() && weight >= 0 { digits[i as usize] } else { 0 };
        if int_part.is_empty() {
            int_part = d.to_string();
        } else {
            int_part.push_str(&format!("{d:04}"));
        }
    }
    let mut frac = String::new();
    let start = weight + 1;
    for i in start.max(0)..digits.len() as i32 {
        frac.push_str(&format!("{:04}", digits[i as usize]));
    }
    if weight < -1 {
        frac = "0000".repeat((-weight - 1) as usize) + &frac;
    }
    frac.truncate(dscale.max(0) as usize);
    let sign = if negative { "-" } else { "" };
    if frac.is_empty() { format!("{sign}{int_part}") } else { format!("{sign}{int_part}.{frac}") }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn numeric(ndigits: i16, weight: i16, sign: u16, dscale: i16, digits: &[i16]) -> Vec<u8> {
        let mut out = Vec::new();
        for w in [ndigits, weight, sign as i16, dscale].iter().chain(digits) {
            out.extend_from_slice(&w.to_be_bytes());
        }
        out
    }

    const CTX: ValueContext<'static> = ValueContext { table: "operations.products", column: "unity_price" };

    #[test]
    fn numeric_decodes_exactly_at_the_target_scale() {
        // 12345.67 = digits [1, 2345, 6700], weight 1
        let raw = numeric(3, 1, 0, 2, &[1, 2345, 6700]);
        assert_eq!(decode_numeric(&raw, 38, 2, CTX).expect("fits"), 1_234_567);
        assert_eq!(decode_numeric(&raw, 38, 10, CTX).expect("fits"), 123_456_700_000_000);
        // -0.0001 = digits [1], weight -1
        let raw = numeric(1, -1, 0x4000, 4, &[1]);
        assert_eq!(decode_numeric(&raw, 38, 4, CTX).expect("fits"), -1);
        // zero has no digits
        assert_eq!(decode_numeric(&numeric(0, 0, 0, 0, &[]), 10, 2, CTX).expect("zero"), 0);
    }

    #[test]
    fn numeric_that_does_not_fit_names_table_column_and_value() {
        let raw = numeric(3, 1, 0, 2, &[1, 2345, 6700]);
        let err = decode_numeric(&raw, 38, 1, CTX).expect_err("too many fractional digits");
        let msg = err.to_string();
        assert!(
            msg.contains("operations.products") && msg.contains("unity_price") && msg.contains("12345.67"),
            "{msg}"
        );
        let err = decode_numeric(&numeric(0, 0, 0xC000, 0, &[]), 38, 2, CTX).expect_err("NaN");
        assert!(err.to_string().contains("NaN"));
        let err = decode_numeric(&raw, 5, 2, CTX).expect_err("precision");
        assert!(err.to_string().contains("precision"));
    }

    #[test]
    fn uuid_is_formatted_canonically() {
        let bytes = [0x12, 0x3e, 0x45, 0x67, 0xe8, 0x9b, 0x12, 0xd3, 0xa4, 0x56, 0x42, 0x66, 0x14, 0x17, 0x40, 0x00];
        assert_eq!(format_uuid(&bytes), "123e4567-e89b-12d3-a456-426614174000");
    }
}
