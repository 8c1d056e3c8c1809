//! The raw sink: where every capture method's change rows go.
//!
//! [`RawSink`] owns the raw tables' state while the stream runs: the Arrow builders and open
//! Parquet writers of each table, the position each table has stored, schema evolution, the
//! commit round (one Delta commit per table, then the raw manifest) and the scheduling of the
//! background merge of small files. A [`super::source::ChangeSource`] only appends rows to it;
//! the driver ([`super::ChangeStream`]) decides when a round is committed.

use acme_core::deltalake::kernel::Add;
use acme_core::raw::{self, Operation};
use acme_core::storage::{Manifest, manifests};
use acme_core::telemetry;
use acme_core::{
    CommitMode, CompactOptions, CompactReport, LayerTable, LayerWriter, Lsn, MergedFiles, Position, Storage, Tiering,
};
use tracing::Instrument;

use super::PollReport;
use crate::changes::{ChangeBuilder, ChangeMeta, ColumnMap};
use crate::error::{IngestError, Result};
use crate::pgoutput::TupleData;
use crate::source::SourceTable;

/// One raw table while the stream runs.
struct TableState {
    builder: ChangeBuilder,
    layer: LayerTable,
    writer: Option<LayerWriter>,
    /// Files finished before a schema change, committed with the table's next commit.
    carried: Vec<Add>,
    /// Rows in `carried`.
    carried_rows: u64,
    /// Highest commit LSN stored in this raw table by the change stream.
    stored: Option<u64>,
    /// Highest commit LSN buffered since the last commit.
    pending_lsn: Option<u64>,
}

impl TableState {
    /// Move the builder's rows into the table's open Parquet writer (opened on first use).
    async fn spill(&mut self, target_file_bytes: u64) -> Result<()> {
        if let Some(batch) = self.builder.finish()? {
            let writer = match self.writer.as_mut() {
                Some(w) => w,
                None => self.writer.insert(self.layer.micro_batch_writer(target_file_bytes)?),
            };
            writer.write(self.layer.name(), batch).await?;
        }
        Ok(())
    }
}

/// The task of a background merge: the merged files of each raw table, in table order. It is
/// aborted when dropped, so a dropped stream leaves no task writing files.
struct BackgroundMerge(tokio::task::JoinHandle<acme_core::Result<Vec<Vec<MergedFiles>>>>);

impl Drop for BackgroundMerge {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The raw tables of one change stream (see the module documentation).
pub(crate) struct RawSink {
    storage: Storage,
    tables: Vec<TableState>,
    batch_rows: usize,
    target_file_bytes: u64,
    /// The position through which every table stores every change (the raw layer's position
    /// in its manifest): the manifest's position when the sink opened, then the highest change
    /// of each commit round. A table's own position may be higher (a run killed between the
    /// tables' commits of a round leaves some tables ahead of the others); readers and model
    /// builds take changes up to this position only, and the source is confirmed and resumed
    /// from it, so the tables behind it get the rest of those transactions again.
    complete: Option<u64>,
    /// Commit rounds since the raw tables were last compacted.
    uncompacted_rounds: u32,
    /// A merge of the raw tables' small files running beside the stream.
    background: Option<BackgroundMerge>,
}

impl RawSink {
    /// A sink over the raw `layers` of `sources` (same order), each at its stored position.
    pub(crate) async fn new(
        storage: Storage,
        sources: Vec<SourceTable>,
        layers: Vec<LayerTable>,
        batch_rows: usize,
        target_file_bytes: u64,
    ) -> Result<Self> {
        let mut tables = Vec::with_capacity(sources.len());
        for (table, layer) in sources.into_iter().zip(layers) {
            let stored = layer.position(raw::CDC_APP).await?.map(|v| v as u64);
            tables.push(TableState {
                builder: ChangeBuilder::new(table, batch_rows),
                layer,
                writer: None,
                carried: Vec::new(),
                carried_rows: 0,
                stored,
                pending_lsn: None,
            });
        }
        // (Without a manifest yet, the lowest table position is the one every table reached.)
        let complete = match storage.get_manifest(manifests::RAW).await? {
            Some(manifest) => u64::try_from(manifest.position).ok(),
            None => tables.iter().map(|t| t.stored).min().flatten(),
        };
        Ok(Self { storage, tables, batch_rows, target_file_bytes, complete, uncompacted_rounds: 0, background: None })
    }

    /// The number of tables.
    pub(crate) fn len(&self) -> usize {
        self.tables.len()
    }

    /// The source definition table `i` is written with.
    pub(crate) fn table(&self, i: usize) -> &SourceTable {
        self.tables[i].builder.table()
    }

    /// Owned copies of every table's source definition (for checks that await).
    pub(crate) fn source_tables(&self) -> Vec<SourceTable> {
        self.tables.iter().map(|t| t.builder.table().clone()).collect()
    }

    /// The index of source table `schema.name`, if it is captured.
    pub(crate) fn index_of(&self, schema: &str, name: &str) -> Option<usize> {
        self.tables.iter().position(|t| t.builder.table().schema == schema && t.builder.table().name == name)
    }

    /// Whether table `i` already stores the transaction that committed at `lsn` (a replay
    /// after a crash skips it).
    pub(crate) fn covers(&self, i: usize, lsn: u64) -> bool {
        self.tables[i].stored.is_some_and(|s| lsn <= s)
    }

    /// The highest commit LSN any table stores (some tables may hold less: see
    /// [`RawSink::complete_position`]).
    pub(crate) fn stored_position(&self) -> Option<u64> {
        self.tables.iter().filter_map(|t| t.stored).max()
    }

    /// The position through which every table stores every change: the raw layer's position,
    /// which the source is confirmed and resumed from.
    pub(crate) fn complete_position(&self) -> Option<u64> {
        self.complete
    }

    /// Append a decoded pgoutput change to table `i`. Returns whether its builder is full
    /// (the caller then calls [`RawSink::spill_full`]), and how many change rows it took (see
    /// [`crate::changes::ChangeBuilder::append`]: two for an update of the primary key).
    pub(crate) fn append(
        &mut self,
        i: usize,
        meta: ChangeMeta,
        map: &ColumnMap,
        new: Option<TupleData<'_>>,
        old: Option<TupleData<'_>>,
    ) -> Result<(bool, usize)> {
        let state = &mut self.tables[i];
        let rows = state.builder.append(meta, map, new, old)?;
        state.pending_lsn = Some(meta.lsn);
        Ok((state.builder.rows() >= self.batch_rows, rows))
    }

    /// Append a change given as binary values in table `i`'s column order (`None`: NULL).
    pub(crate) async fn append_values<'v>(
        &mut self,
        i: usize,
        meta: ChangeMeta,
        new: Vec<Option<&'v [u8]>>,
        old: Option<Vec<Option<&'v [u8]>>>,
    ) -> Result<()> {
        let state = &mut self.tables[i];
        match meta.op {
            Operation::Truncate => state.builder.append_truncate(meta),
            _ => state.builder.append_values(meta, new, old)?,
        }
        state.pending_lsn = Some(meta.lsn);
        if state.builder.rows() >= self.batch_rows {
            state.spill(self.target_file_bytes).await?;
        }
        Ok(())
    }

    /// Append a truncation of table `i`.
    pub(crate) fn append_truncate(&mut self, i: usize, meta: ChangeMeta) {
        let state = &mut self.tables[i];
        state.builder.append_truncate(meta);
        state.pending_lsn = Some(meta.lsn);
    }

    /// Move full builders into their Parquet writers so memory stays bounded by the batch size.
    pub(crate) async fn spill_full(&mut self) -> Result<()> {
        for state in &mut self.tables {
            if state.builder.rows() >= self.batch_rows {
                state.spill(self.target_file_bytes).await?;
            }
        }
        Ok(())
    }

    /// Give table `i` the (wider) definition `table`: the rows buffered so far go to files with
    /// the old columns, carried to the table's next commit, and the raw table gains the new
    /// columns (nullable; older files read them as NULL). Nothing is committed early.
    pub(crate) async fn evolve_to(&mut self, i: usize, table: SourceTable) -> Result<()> {
        let state = &mut self.tables[i];
        state.spill(self.target_file_bytes).await?;
        if let Some(writer) = state.writer.take() {
            state.carried_rows += writer.rows();
            state.carried.extend(writer.finish(state.layer.name()).await?);
        }
        let schema = table.raw_schema();
        let fields: Vec<_> = schema.fields().iter().map(|f| f.as_ref().clone()).collect();
        state.layer.add_columns(&fields).await?;
        tracing::info!(table = %table.qualified(), columns = table.columns.len(), "source table gained columns; raw schema evolved");
        state.builder = ChangeBuilder::new(table, self.batch_rows);
        Ok(())
    }

    /// Commit every table that received changes (one Delta commit each, with its position),
    /// then record the round in the raw manifest. Adds what it committed to `report`.
    pub(crate) async fn commit_round(&mut self, report: &mut PollReport) -> Result<()> {
        let lsn = self.tables.iter().filter_map(|t| t.pending_lsn).max();
        let Some(lsn) = lsn else { return Ok(()) };
        let span = tracing::debug_span!("commit_round", lsn = %Lsn(lsn), tables = tracing::field::Empty);
        let started = std::time::Instant::now();
        let committed = report.tables_committed;
        self.commit_tables(report).instrument(span.clone()).await?;
        span.record("tables", report.tables_committed - committed);
        if report.tables_committed > committed {
            metrics::counter!(telemetry::COMMIT_ROUNDS).increment(1);
            metrics::histogram!(telemetry::COMMIT_ROUND_SECONDS).record(started.elapsed().as_secs_f64());
        }
        Ok(())
    }

    /// [`RawSink::commit_round`]'s work.
    async fn commit_tables(&mut self, report: &mut PollReport) -> Result<()> {
        // The tables commit concurrently; each commit is atomic on its own and carries its own
        // position, so a failure part-way is replayed exactly like a crash.
        let target_file_bytes = self.target_file_bytes;
        let commits = self.tables.iter_mut().map(|state| async move {
            let Some(lsn) = state.pending_lsn.take() else { return Ok::<_, IngestError>(None) };
            let started = std::time::Instant::now();
            state.spill(target_file_bytes).await?;
            let counts = state.builder.take_counts();
            let mut files = std::mem::take(&mut state.carried);
            let mut rows = state.carried_rows;
            state.carried_rows = 0;
            if let Some(writer) = state.writer.take() {
                rows += writer.rows();
                files.extend(writer.finish(state.layer.name()).await?);
            }
            if files.is_empty() {
                return Ok(None);
            }
            let written = started.elapsed();
            // (The stream is the raw tables' only writer: its loaded versions are the latest.)
            let position = Position::new(raw::CDC_APP, lsn as i64);
            state.layer.commit_as_only_writer(files, &position, CommitMode::Append).await?;
            tracing::trace!(
                table = %state.layer.name(),
                rows,
                write_ms = written.as_millis() as u64,
                commit_ms = (started.elapsed() - written).as_millis() as u64,
                "raw table committed"
            );
            state.stored = Some(lsn);
            record_captured(&state.builder.table().qualified(), &counts);
            // (Stops the round's task: the tables whose commits have not finished stay behind.)
            acme_core::failpoint::hit("cdc.table_committed");
            Ok(Some((rows, lsn)))
        });
        let mut round = None;
        for committed in futures::future::join_all(commits).await {
            if let Some((rows, lsn)) = committed? {
                report.changes += rows;
                report.tables_committed += 1;
                round = round.max(Some(lsn));
            }
        }
        if report.tables_committed > 0 {
            acme_core::failpoint::hit("cdc.commit_round");
            // Every table now holds every change the stream read up to the round's last one
            // (a table ahead of that, from a killed run, stays ahead until the stream passes
            // it). Not the highest table position: a table behind it would get the rest of
            // those transactions after readers and model builds took the position as complete.
            self.complete = self.complete.max(round);
            let started = std::time::Instant::now();
            self.record_manifest(self.complete.unwrap_or_default() as i64).await?;
            tracing::trace!(ms = started.elapsed().as_millis() as u64, "raw manifest recorded");
            self.uncompacted_rounds += 1;
        }
        Ok(())
    }

    /// Write the raw manifest: `position`, and every table's current version.
    async fn record_manifest(&mut self, position: i64) -> Result<()> {
        let mut manifest = Manifest::new(position);
        for state in &self.tables {
            manifest.record(&state.layer);
        }
        self.storage.put_manifest(manifests::RAW, &manifest).await?;
        Ok(())
    }

    /// Drop everything appended but not committed (after a failed or cancelled poll), then
    /// reload each table's version and stored position.
    pub(crate) async fn reset(&mut self) -> Result<()> {
        for state in &mut self.tables {
            let _ = state.builder.finish();
            let _ = state.builder.take_counts();
            // Files written but never committed are invisible to readers; vacuum removes them.
            state.writer = None;
            state.carried.clear();
            state.carried_rows = 0;
            state.pending_lsn = None;
        }
        for state in &mut self.tables {
            state.layer.refresh().await?;
            state.stored = state.layer.position(raw::CDC_APP).await?.map(|v| v as u64);
        }
        Ok(())
    }

    /// Whether enough commit rounds left small files for a background merge to be due.
    pub(crate) fn merge_due(&self, every_rounds: u32) -> bool {
        self.uncompacted_rounds >= every_rounds
    }

    fn compact_options(&self) -> CompactOptions {
        // Newest first: the stream merges every few rounds, and merged files stay small for
        // a long time (see `acme_core::compact::Tiering`).
        CompactOptions { target_file_bytes: self.target_file_bytes, ..CompactOptions::sorted_by(&[raw::LSN, raw::SEQ]) }
            .tiered(Tiering::default())
    }

    /// Merge the raw tables' small files now (see [`super::ChangeStream::compact`]).
    pub(crate) async fn compact(&mut self) -> Result<CompactReport> {
        // A merge already running beside the stream goes first, so no file is merged twice.
        let mut total = self.finish_background_merge(true).await?;
        self.uncompacted_rounds = 0;
        let ctx = self.storage.background_session_context(acme_core::compact::COMPACTION_MEMORY_BYTES)?;
        let options = self.compact_options();
        for state in &mut self.tables {
            total += state.layer.compact(&ctx, &options).await?;
        }
        self.record_compaction(&total).await?;
        Ok(total)
    }

    /// Start merging the raw tables' small files in a task of its own, on copies of the
    /// tables at their current versions, unless a merge is running already.
    pub(crate) fn start_background_merge(&mut self) {
        if self.background.is_some() {
            return;
        }
        self.uncompacted_rounds = 0;
        let storage = self.storage.clone();
        let options = self.compact_options();
        let tables: Vec<LayerTable> = self.tables.iter().map(|t| t.layer.clone()).collect();
        self.background = Some(BackgroundMerge(tokio::spawn(async move {
            let ctx = storage.background_session_context(acme_core::compact::COMPACTION_MEMORY_BYTES)?;
            let mut merged = Vec::with_capacity(tables.len());
            for table in &tables {
                merged.push(table.merge_small_files(&ctx, &options).await?);
            }
            Ok(merged)
        })));
    }

    /// Commit the background merge once it is done (or, with `wait`, when it is done): the
    /// merged files replace the small ones on the stream's current versions, which still
    /// hold them, since the stream only appends.
    pub(crate) async fn finish_background_merge(&mut self, wait: bool) -> Result<CompactReport> {
        let mut total = CompactReport::default();
        let Some(mut task) = self.background.take_if(|task| wait || task.0.is_finished()) else {
            return Ok(total);
        };
        let merged = (&mut task.0).await;
        drop(task);
        let merged = merged.map_err(|source| IngestError::Task { doing: "compacting the raw tables", source })??;
        for (state, merged) in self.tables.iter_mut().zip(merged) {
            total += state.layer.commit_merged(merged).await?;
        }
        self.record_compaction(&total).await?;
        Ok(total)
    }

    /// After a compaction: the raw manifest names the compacted versions (same position).
    async fn record_compaction(&mut self, total: &CompactReport) -> Result<()> {
        if total.files_removed > 0
            && let Some(previous) = self.storage.get_manifest(manifests::RAW).await?
        {
            self.record_manifest(previous.position).await?;
        }
        Ok(())
    }
}

/// Count committed change rows per operation in [`telemetry::CHANGES_CAPTURED`].
pub(crate) fn record_captured(table: &str, counts: &[u64; Operation::ALL.len()]) {
    for (op, n) in Operation::ALL.iter().zip(counts).filter(|(_, n)| **n > 0) {
        metrics::counter!(telemetry::CHANGES_CAPTURED, "table" => table.to_string(), "op" => op.as_str()).increment(*n);
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;
    use crate::source::SourceColumn;
    use crate::types::PgType;
    use acme_core::Layer;

    fn table(name: &str, oid: u32) -> SourceTable {
        SourceTable {
            schema: "operations".into(),
            name: name.into(),
            oid,
            columns: vec![SourceColumn { name: "id".into(), ty: PgType::Int8, not_null: true }],
            primary_key: vec!["id".into()],
            replica_identity: 'f',
        }
    }

    async fn open_sink(storage: &Storage, sources: &[SourceTable]) -> RawSink {
        let mut layers = Vec::new();
        for source in sources {
            layers
                .push(storage.open_or_create(Layer::Raw, &source.name, &source.raw_schema()).await.expect("raw table"));
        }
        RawSink::new(storage.clone(), sources.to_vec(), layers, 1024, 1 << 20).await.expect("sink")
    }

    /// Append an insert of `id` committed at `lsn` to table `i`.
    async fn insert(sink: &mut RawSink, i: usize, lsn: u64, id: i64) {
        let meta = ChangeMeta { op: Operation::Insert, lsn, seq: i as i64, xid: 1, commit_ts_micros: 0 };
        let value = id.to_be_bytes();
        sink.append_values(i, meta, vec![Some(&value[..])], None).await.expect("append");
    }

    async fn round(sink: &mut RawSink, storage: &Storage) -> i64 {
        sink.commit_round(&mut PollReport::default()).await.expect("commit round");
        storage.get_manifest(manifests::RAW).await.expect("manifest").expect("a manifest").position
    }

    /// A run killed between the tables' commits of a round leaves one table ahead of the raw
    /// manifest. The next run's rounds replay the rest: the raw layer's position must not jump
    /// to the table that is ahead while another table still lacks changes up to it (a model
    /// build would take that position as complete and never fold those changes).
    #[tokio::test]
    async fn the_raw_position_is_where_every_table_is_complete_not_the_highest_table_position() {
        let dir = tempfile::tempdir().expect("tmp");
        let storage = Storage::new(&dir.path().display().to_string(), HashMap::new()).expect("storage");
        let sources = [table("customers", 1), table("orders", 2)];
        let mut killed = open_sink(&storage, &sources).await;
        insert(&mut killed, 0, 100, 1).await;
        insert(&mut killed, 1, 100, 1).await;
        assert_eq!(round(&mut killed, &storage).await, 100);
        // Transactions at 200 (orders) and 300 (customers and orders): only the customers'
        // commit of that round finished before the kill, the manifest still says 100.
        insert(&mut killed, 0, 300, 2).await;
        round(&mut killed, &storage).await;
        storage.put_manifest(manifests::RAW, &Manifest::new(100)).await.expect("the manifest before the kill");
        drop(killed);

        let mut next = open_sink(&storage, &sources).await;
        assert_eq!(next.complete_position(), Some(100));
        assert_eq!(next.stored_position(), Some(300), "customers is ahead");
        // The replay's first round reads through 200: orders gets its change of 200 only.
        insert(&mut next, 1, 200, 2).await;
        assert_eq!(round(&mut next, &storage).await, 200, "orders lacks its change of 300: not complete at 300");
        // The next round reads 300: the customers' change is stored already, the orders' is not.
        assert!(next.covers(0, 300) && !next.covers(1, 300));
        insert(&mut next, 1, 300, 3).await;
        assert_eq!(round(&mut next, &storage).await, 300);
        assert_eq!(next.complete_position(), Some(300));
    }
}
