//! The shape of raw-layer rows, shared by the writers (ingest) and the readers (model).
//!
//! A raw table `raw/<table>` has the change metadata columns below, then the source columns
//! with their values after the change (for a delete: the deleted row), then the source columns
//! again prefixed with [`OLD_PREFIX`] holding the row before an update or delete.

use std::sync::Arc;

use arrow::datatypes::{DataType, Field, Schema, TimeUnit};

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
