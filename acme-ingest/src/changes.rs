//! Building raw-layer change rows from decoded pgoutput tuples, straight into Arrow builders.

use std::sync::Arc;

use acme_core::raw::{MetaColumns, Operation};
use arrow::array::{Int64Builder, RecordBatch, StringBuilder, TimestampMicrosecondBuilder};
use arrow::datatypes::Schema;

use crate::decode::{ColumnBuilder, ValueContext};
use crate::error::{IngestError, Result};
use crate::pgoutput::{Field, Relation, TupleData};
use crate::source::SourceTable;

/// Microseconds between 1970-01-01 and 2000-01-01 (PostgreSQL's epoch).
pub const PG_EPOCH_MICROS: i64 = 946_684_800_000_000;

/// Where each column of a relation message goes in the raw table (`None`: not replicated).
#[derive(Debug, Clone)]
pub struct ColumnMap {
    targets: Vec<Option<usize>>,
}

impl ColumnMap {
    /// Map the columns of `relation` onto `table` by name. A column the raw table does not have
    /// is an error that says how to re-sync.
    pub fn new(relation: &Relation, table: &SourceTable) -> Result<Self> {
        let mut targets = Vec::with_capacity(relation.columns.len());
        for column in &relation.columns {
            match table.columns.iter().position(|c| c.name == column.name) {
                Some(i) => targets.push(Some(i)),
                None => {
                    // The stream widens the table before mapping a relation with new columns.
                    return Err(IngestError::Internal(format!(
                        "relation column {} is not in the definition of {}",
                        column.name,
                        table.qualified()
                    )));
                }
            }
        }
        Ok(Self { targets })
    }
}

/// Transaction metadata stamped on every change row.
#[derive(Debug, Clone, Copy)]
pub struct ChangeMeta {
    /// Operation.
    pub op: Operation,
    /// Commit LSN of the transaction.
    pub lsn: u64,
    /// Position of the change in its transaction.
    pub seq: i64,
    /// Transaction id.
    pub xid: u32,
    /// Commit time, microseconds since 1970-01-01 UTC.
    pub commit_ts_micros: i64,
}

/// Accumulates change rows of one table.
#[derive(Debug)]
pub struct ChangeBuilder {
    table: SourceTable,
    qualified: String,
    schema: Arc<Schema>,
    op: StringBuilder,
    lsn: Int64Builder,
    seq: Int64Builder,
    xid: Int64Builder,
    commit_ts: TimestampMicrosecondBuilder,
    values: Vec<ColumnBuilder>,
    old: Vec<ColumnBuilder>,
    /// The primary-key columns, as indexes into the table's columns.
    key: Vec<usize>,
    rows: usize,
    /// Rows appended per operation (indexed as [`Operation::ALL`]) since they were last taken.
    counts: [u64; Operation::ALL.len()],
}

impl ChangeBuilder {
    /// A builder for `table` with room for `capacity` rows per batch.
    pub fn new(table: SourceTable, capacity: usize) -> Self {
        let schema = table.raw_schema();
        let values = table.columns.iter().map(|c| ColumnBuilder::new(c.ty, capacity)).collect();
        let old = table.columns.iter().map(|c| ColumnBuilder::new(c.ty, capacity)).collect();
        let key = table.primary_key.iter().filter_map(|k| table.columns.iter().position(|c| &c.name == k)).collect();
        Self {
            qualified: table.qualified(),
            table,
            schema,
            op: StringBuilder::with_capacity(capacity, capacity * 6),
            lsn: Int64Builder::with_capacity(capacity),
            seq: Int64Builder::with_capacity(capacity),
            xid: Int64Builder::with_capacity(capacity),
            commit_ts: TimestampMicrosecondBuilder::with_capacity(capacity).with_timezone("UTC"),
            values,
            old,
            key,
            rows: 0,
            counts: [0; Operation::ALL.len()],
        }
    }

    /// The source table.
    pub fn table(&self) -> &SourceTable {
        &self.table
    }

    /// Rows buffered.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Append one change. `new` is the row after the change (inserts and updates), `old` the
    /// row before it (updates and deletes). For a delete the value columns hold the deleted row.
    ///
    /// An update that changes the primary key is stored as two changes, as other change-data
    /// capture tools store it: a delete of the old key (at `meta.seq`) and an insert of the
    /// new one (at `meta.seq + 1`), so that every reader keyed by the primary key closes the
    /// old key's row. Returns the number of rows appended (1, or 2 for such an update); the
    /// caller numbers the transaction's next change after them.
    pub fn append(
        &mut self,
        meta: ChangeMeta,
        map: &ColumnMap,
        new: Option<TupleData<'_>>,
        old: Option<TupleData<'_>>,
    ) -> Result<usize> {
        if meta.op == Operation::Update
            && let (Some(new), Some(old)) = (new, old)
            && self.key_changed(map, new, old)?
        {
            self.append_row(ChangeMeta { op: Operation::Delete, ..meta }, map, None, Some(old), true)?;
            let insert = ChangeMeta { op: Operation::Insert, seq: meta.seq + 1, ..meta };
            // (The old row still supplies the new one's unchanged TOASTed values.)
            self.append_row(insert, map, Some(new), Some(old), false)?;
            return Ok(2);
        }
        self.append_row(meta, map, new, old, true)?;
        Ok(1)
    }

    /// Whether a primary-key column differs between `new` and `old` (a table without a
    /// primary key has none to change).
    fn key_changed(&self, map: &ColumnMap, new: TupleData<'_>, old: TupleData<'_>) -> Result<bool> {
        // (Every update passes here: the fields are read only up to the last key column.)
        let mut left = self.key.len();
        for (i, (new, old)) in new.fields().zip(old.fields()).enumerate() {
            if left == 0 {
                break;
            }
            let Some(Some(target)) = map.targets.get(i) else { continue };
            if self.key.contains(target) {
                if new? != old? {
                    return Ok(true);
                }
                left -= 1;
            }
        }
        Ok(false)
    }

    /// One change row; `old` fills the old-value columns when `old_columns`, and supplies the
    /// new row's unchanged TOASTed values either way.
    fn append_row(
        &mut self,
        meta: ChangeMeta,
        map: &ColumnMap,
        new: Option<TupleData<'_>>,
        old: Option<TupleData<'_>>,
        old_columns: bool,
    ) -> Result<()> {
        self.append_meta(meta);
        let row = self.rows;
        if let Some(new) = new {
            for (i, field) in new.fields().enumerate() {
                let Some(Some(target)) = map.targets.get(i) else { continue };
                let field = match field? {
                    // An unchanged TOASTed value: the full old row carries it.
                    Field::Unchanged => match old.and_then(|o| o.fields().nth(i)) {
                        Some(f) => f?,
                        None => Field::Null,
                    },
                    other => other,
                };
                append_field(&mut self.values[*target], &self.table, *target, &self.qualified, field)?;
            }
        }
        if let Some(old) = old.filter(|_| old_columns) {
            for (i, field) in old.fields().enumerate() {
                let field = field?;
                let Some(Some(target)) = map.targets.get(i) else { continue };
                append_field(&mut self.old[*target], &self.table, *target, &self.qualified, field)?;
                if new.is_none() {
                    append_field(&mut self.values[*target], &self.table, *target, &self.qualified, field)?;
                }
            }
        }
        // Columns the message did not carry are null.
        for builder in self.values.iter_mut().chain(self.old.iter_mut()) {
            if builder.len() == row {
                builder.append_null();
            }
        }
        self.rows += 1;
        Ok(())
    }

    /// Append one change given as binary values in the table's column order (`None`: NULL),
    /// as the trigger fallback reads them. `old` is the row before the change (updates and
    /// deletes); for a delete `new` holds the deleted row, as [`ChangeBuilder::append`] stores it.
    pub fn append_values<'v>(
        &mut self,
        meta: ChangeMeta,
        new: impl IntoIterator<Item = Option<&'v [u8]>>,
        old: Option<impl IntoIterator<Item = Option<&'v [u8]>>>,
    ) -> Result<()> {
        self.append_meta(meta);
        let row = self.rows;
        fill(&mut self.values, &self.table, &self.qualified, new)?;
        if let Some(old) = old {
            fill(&mut self.old, &self.table, &self.qualified, old)?;
        }
        for builder in self.values.iter_mut().chain(self.old.iter_mut()) {
            if builder.len() == row {
                builder.append_null();
            }
        }
        self.rows += 1;
        Ok(())
    }

    /// Append a truncate marker row (all values null).
    pub fn append_truncate(&mut self, meta: ChangeMeta) {
        self.append_meta(meta);
        for b in self.values.iter_mut().chain(self.old.iter_mut()) {
            b.append_null();
        }
        self.rows += 1;
    }

    /// Rows appended per operation since the last call, indexed as [`Operation::ALL`], and
    /// reset. [`ChangeBuilder::finish`] leaves them, so they cover everything a commit holds.
    pub fn take_counts(&mut self) -> [u64; Operation::ALL.len()] {
        std::mem::take(&mut self.counts)
    }

    fn append_meta(&mut self, meta: ChangeMeta) {
        self.counts[meta.op as usize] += 1;
        self.op.append_value(meta.op.as_str());
        self.lsn.append_value(meta.lsn as i64);
        self.seq.append_value(meta.seq);
        self.xid.append_value(i64::from(meta.xid));
        self.commit_ts.append_value(meta.commit_ts_micros);
    }

    /// Take the buffered rows as a record batch (None when empty).
    pub fn finish(&mut self) -> Result<Option<RecordBatch>> {
        if self.rows == 0 {
            return Ok(None);
        }
        self.rows = 0;
        let meta = MetaColumns {
            op: Arc::new(self.op.finish()),
            lsn: Arc::new(self.lsn.finish()),
            seq: Arc::new(self.seq.finish()),
            xid: Arc::new(self.xid.finish()),
            commit_ts: Arc::new(self.commit_ts.finish()),
        };
        let values = self.values.iter_mut().map(|b| b.finish());
        let old = self.old.iter_mut().map(|b| b.finish()).collect();
        meta.batch(Arc::clone(&self.schema), values, Some(old))
            .map(Some)
            .map_err(|source| IngestError::Arrow { table: self.qualified.clone(), source })
    }
}

/// Append binary values (`None`: NULL) to the column builders, in column order.
fn fill<'v>(
    builders: &mut [ColumnBuilder],
    table: &SourceTable,
    qualified: &str,
    values: impl IntoIterator<Item = Option<&'v [u8]>>,
) -> Result<()> {
    for ((builder, column), value) in builders.iter_mut().zip(&table.columns).zip(values) {
        match value {
            None => builder.append_null(),
            Some(raw) => {
                builder.append_binary(column.ty, raw, ValueContext { table: qualified, column: &column.name })?
            }
        }
    }
    Ok(())
}

fn append_field(
    builder: &mut ColumnBuilder,
    table: &SourceTable,
    index: usize,
    qualified: &str,
    field: Field<'_>,
) -> Result<()> {
    let column = &table.columns[index];
    match field {
        Field::Null | Field::Unchanged => {
            builder.append_null();
            Ok(())
        }
        Field::Binary(raw) => {
            builder.append_binary(column.ty, raw, ValueContext { table: qualified, column: &column.name })
        }
        Field::Text(_) => Err(IngestError::BadValue {
            table: qualified.to_string(),
            column: column.name.clone(),
            message: "the server sent a text value although binary mode was requested".into(),
        }),
    }
}
