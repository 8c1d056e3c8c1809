//! Binary `COPY` into Arrow: the snapshot's and `verify`'s way to read a table.
//!
//! [`frames`] splits the byte stream into rows (the part that reads untrusted bytes, fuzzed on
//! its own); [`CopyDecoder`] decodes each row's fields into the table's Arrow builders.

pub mod frames;

use std::sync::Arc;

use acme_core::raw::MetaColumns;
use arrow::array::{ArrayRef, RecordBatch};
use futures::StreamExt;

use crate::decode::{ColumnBuilder, ValueContext};
use crate::error::{IngestError, Result};
use crate::source::{SourceTable, SourceUrl};
use frames::{CopyFrames, FeedError};

/// Incremental decoder of one binary COPY stream of `table`'s columns into Arrow builders.
pub(crate) struct CopyDecoder<'a> {
    table: &'a SourceTable,
    qualified: String,
    builders: Vec<ColumnBuilder>,
    frames: CopyFrames,
    rows: usize,
}

impl<'a> CopyDecoder<'a> {
    /// A decoder with room for `capacity` rows per batch.
    pub(crate) fn new(table: &'a SourceTable, capacity: usize) -> Self {
        Self {
            table,
            qualified: table.qualified(),
            builders: table.columns.iter().map(|c| ColumnBuilder::new(c.ty, capacity)).collect(),
            frames: CopyFrames::new(table.columns.len()),
            rows: 0,
        }
    }

    fn bad(&self, message: String) -> IngestError {
        IngestError::BadCopy { table: self.qualified.clone(), message }
    }

    /// Rows decoded and not yet taken.
    pub(crate) fn rows_buffered(&self) -> usize {
        self.rows
    }

    /// Decode every complete row of `chunk` (and what earlier chunks left over).
    pub(crate) fn feed(&mut self, chunk: &[u8]) -> Result<()> {
        let (table, qualified, builders, rows) = (self.table, &self.qualified, &mut self.builders, &mut self.rows);
        let mut row = |fields: &[Option<&[u8]>]| -> Result<()> {
            for ((builder, column), field) in builders.iter_mut().zip(&table.columns).zip(fields) {
                match field {
                    None => builder.append_null(),
                    Some(value) => builder.append_binary(
                        column.ty,
                        value,
                        ValueContext { table: qualified, column: &column.name },
                    )?,
                }
            }
            *rows += 1;
            Ok(())
        };
        match self.frames.feed(chunk, &mut row) {
            Ok(()) => Ok(()),
            Err(FeedError::Row(error)) => Err(error),
            Err(FeedError::Frame(error)) => Err(self.bad(error.0)),
        }
    }

    /// After the last chunk: the stream must have ended with the COPY trailer.
    pub(crate) fn check_finished(&self) -> Result<()> {
        self.frames.finish().map_err(|e| self.bad(e.0))
    }

    /// The buffered rows as the table's own columns (no meta columns), in [`columns_schema`].
    pub(crate) fn finish_columns(&mut self) -> Result<RecordBatch> {
        self.rows = 0;
        let columns: Vec<ArrayRef> = self.builders.iter_mut().map(ColumnBuilder::finish).collect();
        RecordBatch::try_new(columns_schema(self.table), columns)
            .map_err(|source| IngestError::Arrow { table: self.qualified.clone(), source })
    }

    /// The buffered rows as raw snapshot rows copied at `lsn`, taken at `taken_at_micros`.
    pub(crate) fn finish_snapshot_rows(&mut self, lsn: i64, taken_at_micros: i64) -> Result<RecordBatch> {
        let n = std::mem::take(&mut self.rows);
        let values = self.builders.iter_mut().map(ColumnBuilder::finish);
        MetaColumns::snapshot(lsn, taken_at_micros, n)
            .batch(self.table.raw_schema(), values, None)
            .map_err(|source| IngestError::Arrow { table: self.qualified.clone(), source })
    }
}

/// The Arrow schema of a table's own columns, as [`copy_columns`] returns them (every field
/// nullable, typed as in the raw layer).
pub fn columns_schema(table: &SourceTable) -> Arc<arrow::datatypes::Schema> {
    let fields: Vec<arrow::datatypes::Field> =
        table.arrow_columns().into_iter().map(|(name, ty)| arrow::datatypes::Field::new(name, ty, true)).collect();
    Arc::new(arrow::datatypes::Schema::new(fields))
}

/// Read `table`'s rows as its client sees them (for example inside a transaction that imported
/// a snapshot) with one binary `COPY`, decoded as the snapshot decodes them: `each` gets
/// batches of up to `batch_rows` rows in [`columns_schema`]. Memory stays at one batch.
pub async fn copy_columns(
    url: &SourceUrl,
    client: &tokio_postgres::Client,
    table: &SourceTable,
    batch_rows: usize,
    mut each: impl FnMut(RecordBatch) -> Result<()>,
) -> Result<()> {
    let sql = format!("COPY (SELECT {} FROM {}) TO STDOUT (FORMAT binary)", table.column_list(), table.quoted());
    let starting = format!("starting COPY of {}", table.qualified());
    let stream = url.bounded_sql(&starting, client.copy_out(&sql)).await?;
    futures::pin_mut!(stream);
    let batch_rows = batch_rows.max(1);
    let mut decoder = CopyDecoder::new(table, batch_rows);
    let reading = format!("reading COPY data of {}", table.qualified());
    while let Some(chunk) = url.bounded(&reading, async { Ok(stream.next().await) }).await? {
        decoder.feed(&chunk.map_err(|source| IngestError::Source { context: reading.clone(), source })?)?;
        while decoder.rows_buffered() >= batch_rows {
            each(decoder.finish_columns()?)?;
        }
    }
    decoder.check_finished()?;
    if decoder.rows_buffered() > 0 {
        each(decoder.finish_columns()?)?;
    }
    Ok(())
}
