//! PostgreSQL types and their exact Arrow (and Delta) counterparts.
//!
//! | PostgreSQL | Arrow | note |
//! |---|---|---|
//! | int2 / int4 / int8 | Int16 / Int32 / Int64 | |
//! | float4 / float8 | Float32 / Float64 | bit-exact, NaN and infinities kept |
//! | numeric(p, s) | Decimal128(p, s) | p <= 38 |
//! | numeric (no typmod) | Decimal128(38, [`DEFAULT_NUMERIC_SCALE`]) | a value with more fractional digits, or NaN/infinity, is an error naming table, column and value |
//! | bool | Boolean | |
//! | text, varchar, char, name | Utf8 | |
//! | date | Date32 | `infinity`/`-infinity` stored as i32::MAX / i32::MIN |
//! | timestamp | Timestamp(µs) | `infinity`/`-infinity` stored as i64::MAX / i64::MIN |
//! | timestamptz | Timestamp(µs, UTC) | as above |
//! | time | Int64 | microseconds since midnight (Delta has no time type) |
//! | uuid | Utf8 | canonical lower-case form |
//! | json, jsonb | Utf8 | the JSON text |
//! | bytea | Binary | |
//!
//! Any other type is rejected, before any data is written, with an error naming table, column
//! and type.

use arrow::datatypes::{DataType, TimeUnit};

use crate::error::{IngestError, Result};

/// Scale used for `numeric` columns declared without precision and scale. With precision 38
/// this keeps 28 integer digits and 10 fractional digits, far beyond money amounts.
pub const DEFAULT_NUMERIC_SCALE: i8 = 10;
/// Largest decimal precision Arrow's Decimal128 and Delta support.
pub const MAX_DECIMAL_PRECISION: u8 = 38;

/// A source column type acme can copy exactly.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PgType {
    /// int2
    Int2,
    /// int4
    Int4,
    /// int8
    Int8,
    /// float4
    Float4,
    /// float8
    Float8,
    /// numeric with the Decimal128 precision and scale it maps to
    Numeric {
        /// Decimal precision.
        precision: u8,
        /// Decimal scale.
        scale: i8,
    },
    /// bool
    Bool,
    /// text, varchar, bpchar, name
    Text,
    /// date
    Date,
    /// timestamp without time zone
    Timestamp,
    /// timestamp with time zone
    Timestamptz,
    /// time without time zone
    Time,
    /// uuid
    Uuid,
    /// json
    Json,
    /// jsonb
    Jsonb,
    /// bytea
    Bytea,
}

impl PgType {
    /// The type for a column of type `oid` with modifier `typmod`; `type_name` and the
    /// table/column names only serve the error message.
    pub fn from_oid(oid: u32, typmod: i32, table: &str, column: &str, type_name: &str) -> Result<Self> {
        Ok(match oid {
            21 => PgType::Int2,
            23 => PgType::Int4,
            20 => PgType::Int8,
            700 => PgType::Float4,
            701 => PgType::Float8,
            1700 => numeric_from_typmod(typmod, table, column)?,
            16 => PgType::Bool,
            25 | 1043 | 1042 | 19 => PgType::Text,
            1082 => PgType::Date,
            1114 => PgType::Timestamp,
            1184 => PgType::Timestamptz,
            1083 => PgType::Time,
            2950 => PgType::Uuid,
            114 => PgType::Json,
            3802 => PgType::Jsonb,
            17 => PgType::Bytea,
            _ => {
                return Err(IngestError::UnsupportedType {
                    table: table.to_string(),
                    column: column.to_string(),
                    type_name: type_name.to_string(),
                });
            }
        })
    }

    /// The Arrow type values of this type are stored as.
    pub fn arrow_type(&self) -> DataType {
        match self {
            PgType::Int2 => DataType::Int16,
            PgType::Int4 => DataType::Int32,
            PgType::Int8 | PgType::Time => DataType::Int64,
            PgType::Float4 => DataType::Float32,
            PgType::Float8 => DataType::Float64,
            PgType::Numeric { precision, scale } => DataType::Decimal128(*precision, *scale),
            PgType::Bool => DataType::Boolean,
            PgType::Text | PgType::Uuid | PgType::Json | PgType::Jsonb => DataType::Utf8,
            PgType::Date => DataType::Date32,
            PgType::Timestamp => DataType::Timestamp(TimeUnit::Microsecond, None),
            PgType::Timestamptz => DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
            PgType::Bytea => DataType::Binary,
        }
    }
}

fn numeric_from_typmod(typmod: i32, table: &str, column: &str) -> Result<PgType> {
    if typmod < 4 {
        return Ok(PgType::Numeric { precision: MAX_DECIMAL_PRECISION, scale: DEFAULT_NUMERIC_SCALE });
    }
    let packed = typmod - 4;
    let precision = (packed >> 16) & 0xffff;
    // The scale is an 11-bit signed value since PostgreSQL 15.
    let raw_scale = packed & 0x7ff;
    let scale = if raw_scale & 0x400 != 0 { raw_scale - 0x800 } else { raw_scale };
    if precision > i32::from(MAX_DECIMAL_PRECISION) || scale < 0 || scale > precision {
        return Err(IngestError::UnsupportedType {
            table: table.to_string(),
            column: column.to_string(),
            type_name: format!(
                "numeric({precision},{scale}) (acme stores numeric as Decimal128: precision up to 38, scale 0..=precision)"
            ),
        });
    }
    Ok(PgType::Numeric { precision: precision as u8, scale: scale as i8 })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numeric_typmod_maps_to_precision_and_scale() {
        // numeric(12,2): typmod = ((12 << 16) | 2) + 4
        let t = PgType::from_oid(1700, ((12 << 16) | 2) + 4, "t", "c", "numeric").expect("maps");
        assert_eq!(t, PgType::Numeric { precision: 12, scale: 2 });
        let t = PgType::from_oid(1700, -1, "t", "c", "numeric").expect("maps");
        assert_eq!(t.arrow_type(), DataType::Decimal128(38, DEFAULT_NUMERIC_SCALE));
    }

    #[test]
    fn unsupported_type_names_table_column_and_type() {
        let err = PgType::from_oid(600, -1, "operations.shapes", "location", "point").expect_err("point");
        let msg = err.to_string();
        assert!(msg.contains("operations.shapes") && msg.contains("location") && msg.contains("point"), "{msg}");
        let err = PgType::from_oid(1700, ((60 << 16) | 2) + 4, "t", "wide", "numeric(60,2)").expect_err("too wide");
        assert!(err.to_string().contains("wide"));
    }
}
