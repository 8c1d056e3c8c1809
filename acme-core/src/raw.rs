//! The shape of raw-layer rows, shared by the writers (ingest) and the readers (model).
//!
//! A raw table `raw/<table>` has the change metadata columns below, then the source columns
//! with their values after the change (for a delete: the deleted row), then the source columns
//! again prefixed with [`OLD_PREFIX`] holding the row before an update or delete. An update that
//! changes the primary key is stored as a delete of the old key, then an insert of the new one
//! at the next [`SEQ`].

use std::sync::Arc;

use arrow::array::{ArrayRef, Int64Array, RecordBatch, StringArray, TimestampMicrosecondArray, new_null_array};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use arrow::error::ArrowError;

/// Column: the operation ([`Operation::as_str`]).
pub const OP: &str = "_op";
/// Column: commit LSN of the change's transaction (the snapshot LSN for snapshot rows).
pub const LSN: &str = "_lsn";
/// Column: position of the change inside its transaction (0-based).
pub const SEQ: &str = "_seq";
/// Column: source transaction id (null for snapshot rows).
pub const XID: &str = "_xid";
/// Column: commit time of the change's transaction (UTC).
pub const COMMIT_TS: &str = "_commit_ts";
/// Prefix of the columns holding the row before an update or delete.
pub const OLD_PREFIX: &str = "_old_";
/// Application id of raw-layer commits made by the snapshot.
pub const SNAPSHOT_APP: &str = "acme-snapshot";
/// Application id of raw-layer commits made by the change stream.
pub const CDC_APP: &str = "acme-cdc";

/// The columns a raw table keeps Delta file statistics for (`delta.dataSkippingStatsColumns`):
/// the change's position ([`LSN`], [`SEQ`]) and time ([`COMMIT_TS`]), which readers prune the
/// tail and the changes after a position by, and the source's primary key (`key`), whose null
/// count tells the files holding a `TRUNCATE` (stored with a null key) apart. The raw files
/// are in change order, so the other columns' ranges span nearly every file and prune nothing,
/// while every reader and writer of the table parses the statistics of every file at each new
/// version (ten a second under load). `None` (statistics on every column, Delta's default)
/// without a primary key.
pub fn stats_columns(key: &[String]) -> Option<Vec<String>> {
    if key.is_empty() {
        return None;
    }
    // A name other than letters, digits and underscores is quoted, as Delta reads the list.
    let quoted = |name: &str| match name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
        true => name.to_string(),
        false => format!("`{}`", name.replace('`', "``")),
    };
    Some([LSN, SEQ, COMMIT_TS].into_iter().chain(key.iter().map(String::as_str)).map(quoted).collect())
}

/// What happened to a row.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Operation {
    /// Copied by the initial snapshot.
    Snapshot,
    /// Inserted.
    Insert,
    /// Updated.
    Update,
    /// Deleted.
    Delete,
    /// The whole table was truncated (a row with null values).
    Truncate,
}

impl Operation {
    /// Every operation, in declaration order (`op as usize` indexes it).
    pub const ALL: [Operation; 5] =
        [Operation::Snapshot, Operation::Insert, Operation::Update, Operation::Delete, Operation::Truncate];

    /// The value stored in [`OP`].
    pub fn as_str(&self) -> &'static str {
        match self {
            Operation::Snapshot => "snapshot",
            Operation::Insert => "insert",
            Operation::Update => "update",
            Operation::Delete => "delete",
            Operation::Truncate => "truncate",
        }
    }

    /// Parse a stored [`OP`] value.
    pub fn parse(value: &str) -> Option<Self> {
        Some(match value {
            "snapshot" => Operation::Snapshot,
            "insert" => Operation::Insert,
            "update" => Operation::Update,
            "delete" => Operation::Delete,
            "truncate" => Operation::Truncate,
            _ => return None,
        })
    }
}

/// The metadata fields that open every raw row.
pub fn meta_fields() -> Vec<Field> {
    vec![
        Field::new(OP, DataType::Utf8, false),
        Field::new(LSN, DataType::Int64, false),
        Field::new(SEQ, DataType::Int64, true),
        Field::new(XID, DataType::Int64, true),
        Field::new(COMMIT_TS, DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())), false),
    ]
}

/// The raw schema for a source table with `columns` (name, Arrow type).
pub fn raw_schema(columns: &[(String, DataType)]) -> Arc<Schema> {
    let mut fields = meta_fields();
    fields.extend(columns.iter().map(|(name, ty)| Field::new(name, ty.clone(), true)));
    fields.extend(columns.iter().map(|(name, ty)| Field::new(format!("{OLD_PREFIX}{name}"), ty.clone(), true)));
    Arc::new(Schema::new(fields))
}

/// The metadata columns of a batch of raw rows, one array per [`meta_fields`] field.
///
/// Every writer of raw rows (the snapshot and the change stream) assembles its batches through
/// [`MetaColumns::batch`], so the column order of [`raw_schema`] is written down once, here.
#[derive(Debug, Clone)]
pub struct MetaColumns {
    /// [`OP`] values.
    pub op: ArrayRef,
    /// [`LSN`] values.
    pub lsn: ArrayRef,
    /// [`SEQ`] values.
    pub seq: ArrayRef,
    /// [`XID`] values.
    pub xid: ArrayRef,
    /// [`COMMIT_TS`] values (microseconds, UTC).
    pub commit_ts: ArrayRef,
}

impl MetaColumns {
    /// The metadata of `rows` snapshot rows copied at `lsn`, taken at `taken_at_micros`
    /// (no transaction: null [`SEQ`] and [`XID`]).
    pub fn snapshot(lsn: i64, taken_at_micros: i64, rows: usize) -> Self {
        Self {
            op: Arc::new(StringArray::from_iter_values(std::iter::repeat_n(Operation::Snapshot.as_str(), rows))),
            lsn: Arc::new(Int64Array::from_value(lsn, rows)),
            seq: Arc::new(Int64Array::new_null(rows)),
            xid: Arc::new(Int64Array::new_null(rows)),
            commit_ts: Arc::new(TimestampMicrosecondArray::from_value(taken_at_micros, rows).with_timezone("UTC")),
        }
    }

    /// A batch of `schema` (a [`raw_schema`]): these columns, then the source columns' values
    /// after the change, then their values before it. `old: None` stores null old values
    /// (snapshot rows).
    pub fn batch(
        self,
        schema: SchemaRef,
        values: impl IntoIterator<Item = ArrayRef>,
        old: Option<Vec<ArrayRef>>,
    ) -> Result<RecordBatch, ArrowError> {
        let rows = self.op.len();
        let mut columns = Vec::with_capacity(schema.fields().len());
        columns.extend([self.op, self.lsn, self.seq, self.xid, self.commit_ts]);
        columns.extend(values);
        let width = columns.len() - meta_fields().len();
        match old {
            Some(old) => columns.extend(old),
            None => {
                let types: Vec<DataType> =
                    schema.fields().iter().skip(columns.len()).take(width).map(|f| f.data_type().clone()).collect();
                columns.extend(types.iter().map(|ty| new_null_array(ty, rows)));
            }
        }
        RecordBatch::try_new(schema, columns)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_rows_carry_their_metadata_and_null_old_values() {
        let schema = raw_schema(&[("id".to_string(), DataType::Int64)]);
        let values: ArrayRef = Arc::new(Int64Array::from(vec![7, 8]));
        let batch = MetaColumns::snapshot(42, 1_000, 2).batch(schema.clone(), [values], None).expect("batch");
        assert_eq!(batch.schema(), schema);
        assert_eq!(batch.num_rows(), 2);
        let lsn = batch.column_by_name(LSN).expect("lsn");
        assert_eq!(lsn.as_any().downcast_ref::<Int64Array>().expect("int64").values(), &[42, 42]);
        assert_eq!(batch.column_by_name("_old_id").expect("old").null_count(), 2);
        assert_eq!(batch.column_by_name(XID).expect("xid").null_count(), 2);
    }
}
