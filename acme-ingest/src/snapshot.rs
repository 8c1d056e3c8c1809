//! The initial snapshot: a consistent copy of the source tables into the raw layer.
//!
//! One REPEATABLE READ transaction exports its snapshot; every copy connection imports it, so
//! all tables are read at the same instant. Tables are split into physical block ranges
//! (`ctid` ranges, so any table can be split, whatever its key) copied in parallel with
//! `COPY ... TO STDOUT (FORMAT binary)`. Each copy worker decodes straight into Arrow builders
//! and hands full batches to its own Parquet writer task, so copying, decoding and encoding
//! overlap, and memory is bounded by the batch size and the channel depth, never by the table
//! size. Each raw table gets one Delta commit carrying the snapshot LSN.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use acme_core::deltalake::kernel::Add;
use acme_core::raw;
use acme_core::storage::{Manifest, manifests};
use acme_core::{AcmeConfig, CommitMode, CommitOutcome, LayerTable, Position, Storage};
use arrow::array::RecordBatch;
use futures::StreamExt;
use tokio::sync::{Mutex, mpsc};
use tracing::Instrument;

use crate::copy::CopyDecoder;
use crate::error::{IngestError, Result};
use crate::source::{SourceTable, SourceUrl};
use acme_core::Lsn;

/// Batches in flight between one copy worker and its writer task.
const CHANNEL_DEPTH: usize = 2;
/// Smallest range of blocks one copy covers (8 MiB of heap).
const MIN_RANGE_PAGES: i64 = 1024;

/// Name of the metadata document recording the snapshot point.
pub const SNAPSHOT_META: &str = "snapshot.json";

/// Where a snapshot stands: its WAL position and which transactions it sees.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotPoint {
    /// `pg_current_wal_lsn()` read with the snapshot.
    pub lsn: u64,
    /// `pg_current_snapshot()`: `xmin:xmax:xip1,xip2,...`.
    pub visibility: String,
}

impl SnapshotPoint {
    /// JSON form stored in `_acme/snapshot.json`.
    pub fn to_json(&self) -> String {
        serde_json::json!({ "lsn": self.lsn, "visibility": self.visibility }).to_string()
    }

    /// Parse the stored JSON form.
    pub fn from_json(bytes: &[u8]) -> Result<Self> {
        let value: serde_json::Value = serde_json::from_slice(bytes).map_err(|e| IngestError::WarehouseDamaged {
            what: format!("_acme/{SNAPSHOT_META} is unreadable ({e})"),
        })?;
        let lsn = value["lsn"].as_u64();
        let visibility = value["visibility"].as_str();
        match (lsn, visibility) {
            (Some(lsn), Some(v)) => Ok(Self { lsn, visibility: v.to_string() }),
            _ => Err(IngestError::WarehouseDamaged { what: format!("_acme/{SNAPSHOT_META} is incomplete") }),
        }
    }

    /// Whether the transaction `xid` committing at `commit_lsn` is already in the snapshot.
    ///
    /// Transactions whose commit record follows the snapshot's LSN committed after it and are
    /// never visible; for the others the snapshot's `xmin:xmax:xip` list decides exactly.
    pub fn contains(&self, xid: u32, commit_lsn: u64) -> bool {
        if commit_lsn >= self.lsn {
            return false;
        }
        let mut parts = self.visibility.split(':');
        let (Some(xmin), Some(xmax), Some(xip)) = (parts.next(), parts.next(), parts.next()) else { return false };
        let low = |v: &str| v.trim().parse::<u64>().map(|v| v as u32).ok();
        let (Some(xmin), Some(xmax)) = (low(xmin), low(xmax)) else { return false };
        // Compare 32-bit xids modulo 2^32, as PostgreSQL does.
        let before = |a: u32, b: u32| (a.wrapping_sub(b) as i32) < 0;
        if !before(xid, xmax) {
            return false;
        }
        if before(xid, xmin) {
            return true;
        }
        !xip.split(',').filter_map(low).any(|x| x == xid)
    }
}

/// Live progress of a snapshot, per table: poll it from another task (a progress bar).
#[derive(Debug, Default)]
pub struct SnapshotProgress {
    tables: std::sync::Mutex<Vec<Arc<TableProgress>>>,
}

/// Progress of one table.
#[derive(Debug)]
pub struct TableProgress {
    /// `schema.table`.
    pub table: String,
    /// Rows decoded so far.
    pub rows: AtomicU64,
    /// COPY bytes received so far.
    pub bytes: AtomicU64,
    /// Estimated heap size of the table in bytes (for a progress bar's length).
    pub estimated_bytes: AtomicU64,
    /// Set when the table is committed.
    pub done: AtomicBool,
}

impl SnapshotProgress {
    /// A snapshot of the per-table progress.
    pub fn tables(&self) -> Vec<Arc<TableProgress>> {
        self.tables.lock().map(|t| t.clone()).unwrap_or_default()
    }

    fn register(&self, table: String, estimated: u64) -> Arc<TableProgress> {
        let entry = Arc::new(TableProgress {
            table,
            rows: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            estimated_bytes: AtomicU64::new(estimated),
            done: AtomicBool::new(false),
        });
        if let Ok(mut tables) = self.tables.lock() {
            tables.push(Arc::clone(&entry));
        }
        entry
    }
}

/// What one table's snapshot wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableSnapshot {
    /// `schema.table`.
    pub table: String,
    /// Rows copied.
    pub rows: u64,
    /// COPY bytes received.
    pub bytes: u64,
    /// Parquet files committed.
    pub files: usize,
}

/// What a snapshot did.
#[derive(Debug, Clone)]
pub struct SnapshotReport {
    /// The source WAL position the snapshot stands at.
    pub lsn: Lsn,
    /// The exported snapshot's visibility (`pg_current_snapshot()` text: `xmin:xmax:xip,...`).
    pub visibility: String,
    /// Per table.
    pub tables: Vec<TableSnapshot>,
    /// True when the raw layer already held a complete snapshot and nothing was copied.
    pub already_done: bool,
    /// Wall time.
    pub elapsed: Duration,
}

/// Builder of a snapshot run; `.await` (or [`Snapshot::run`]) runs it.
#[derive(Debug, Clone)]
pub struct Snapshot {
    config: AcmeConfig,
    progress: Option<Arc<SnapshotProgress>>,
    exported: Option<(String, Lsn)>,
}

impl Snapshot {
    /// A snapshot of the tables of `config` into its storage.
    pub fn new(config: AcmeConfig) -> Self {
        Self { config, progress: None, exported: None }
    }

    /// Report progress into `progress`.
    pub fn with_progress(mut self, progress: Arc<SnapshotProgress>) -> Self {
        self.progress = Some(progress);
        self
    }

    /// Read the state of an already exported snapshot (for example the one
    /// `CREATE_REPLICATION_SLOT ... EXPORT_SNAPSHOT` returns) standing at `lsn`, instead of
    /// exporting a new one. Its creator must keep its connection idle until the run ends.
    pub fn with_exported_snapshot(mut self, name: impl Into<String>, lsn: Lsn) -> Self {
        self.exported = Some((name.into(), lsn));
        self
    }

    /// Run the snapshot.
    pub async fn run(self) -> Result<SnapshotReport> {
        let span = tracing::info_span!("snapshot", lsn = tracing::field::Empty, tables = self.config.tables.len());
        self.copy_all().instrument(span).await
    }

    /// [`Snapshot::run`]'s work, in its span.
    async fn copy_all(self) -> Result<SnapshotReport> {
        let started = Instant::now();
        self.config.validate()?;
        let url = SourceUrl::parse(self.config.source_url.as_deref().ok_or(IngestError::NoSource)?)?
            .with_timeout(self.config.source_timeout);
        let storage = Storage::new(&self.config.storage_url, self.config.storage_options.clone())?;
        let control = url.connect().await?;
        let mut tables = Vec::with_capacity(self.config.tables.len());
        for name in &self.config.tables {
            let load = SourceTable::load(&control, &self.config.schema, name);
            tables.push(url.bounded("reading the source tables' columns", load).await?);
        }
        let mut layer_tables = Vec::with_capacity(tables.len());
        for table in &tables {
            layer_tables.push(storage.open_or_create_raw(&table.name, &table.raw_schema(), &table.primary_key).await?);
        }
        let mut stored = Vec::with_capacity(tables.len());
        for layer in &layer_tables {
            stored.push(layer.position(raw::SNAPSHOT_APP).await?);
        }
        if let Some(Some(lsn)) = stored.first()
            && stored.iter().all(|p| *p == Some(*lsn))
        {
            tracing::info!(lsn = %Lsn(*lsn as u64), "raw layer already holds a complete snapshot");
            return Ok(SnapshotReport {
                lsn: Lsn(*lsn as u64),
                visibility: String::new(),
                tables: Vec::new(),
                already_done: true,
                elapsed: started.elapsed(),
            });
        }

        // Every wait on the source below is bounded by `source_timeout`: a stalled server
        // fails the snapshot (to be run again) instead of hanging it.
        let begin = control.batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY");
        url.bounded_sql("starting the snapshot transaction", begin).await?;
        let (snapshot_id, lsn, visibility) = match &self.exported {
            Some((name, lsn)) => {
                let import = format!("SET TRANSACTION SNAPSHOT '{}'", name.replace('\'', "''"));
                url.bounded_sql("importing the replication slot's snapshot", control.batch_execute(&import)).await?;
                // The slot's snapshot is exactly its consistent point: no visibility filter.
                (name.clone(), *lsn, String::new())
            }
            None => {
                let export = control.query_one(
                    "SELECT pg_export_snapshot(), pg_current_wal_lsn()::text, pg_current_snapshot()::text",
                    &[],
                );
                let row = url.bounded_sql("exporting the snapshot", export).await?;
                (row.get::<_, String>(0), Lsn::parse(&row.get::<_, String>(1))?, row.get::<_, String>(2))
            }
        };
        let time = control.query_one(
            "SELECT (extract(epoch from clock_timestamp()) * 1000000)::int8, current_setting('block_size')::int8",
            &[],
        );
        let row = url.bounded_sql("reading the snapshot time", time).await?;
        let taken_at_micros: i64 = row.get(0);
        let block_size: i64 = row.get(1);
        tracing::Span::current().record("lsn", tracing::field::display(lsn));
        tracing::info!(%lsn, snapshot = %snapshot_id, "snapshot taken");

        // Plan block ranges, biggest tables first.
        let progress = self.progress.clone().unwrap_or_default();
        let mut plan: Vec<(usize, i64, Option<i64>)> = Vec::new();
        let mut sizes = Vec::with_capacity(tables.len());
        for table in &tables {
            let oid = i64::from(table.oid);
            let params: [&(dyn tokio_postgres::types::ToSql + Sync); 2] = [&oid, &block_size];
            let size = control.query_one("SELECT pg_relation_size($1::int8::oid) / $2::int8", &params);
            let pages: i64 = url.bounded_sql("measuring the tables", size).await?.get(0);
            sizes.push(pages);
        }
        let total_pages: i64 = sizes.iter().sum();
        let range_pages = (total_pages / (self.config.snapshot_parallelism as i64 * 8)).max(MIN_RANGE_PAGES);
        let mut order: Vec<usize> = (0..tables.len()).collect();
        order.sort_by_key(|&i| std::cmp::Reverse(sizes[i]));
        let mut table_progress = vec![None; tables.len()];
        for &i in &order {
            table_progress[i] = Some(progress.register(tables[i].qualified(), (sizes[i] * block_size) as u64));
            let mut start = 0;
            loop {
                let end = start + range_pages;
                if end >= sizes[i] {
                    plan.push((i, start, None));
                    break;
                }
                plan.push((i, start, Some(end)));
                start = end;
            }
        }
        let table_progress: Vec<Arc<TableProgress>> = table_progress.into_iter().flatten().collect();

        let shared = Arc::new(Shared {
            tables: tables.clone(),
            layer_tables: layer_tables.clone(),
            queue: Mutex::new(plan.into_iter().collect()),
            progress: table_progress.clone(),
            lsn,
            taken_at_micros,
            batch_rows: self.config.batch_rows,
            target_file_bytes: self.config.target_file_bytes,
            url: url.clone(),
        });
        // The workers are owned: an error (here, or in a worker) or a cancelled snapshot drops
        // the set, which aborts every copy still running and closes its connection.
        let mut workers = tokio::task::JoinSet::new();
        for worker in 0..self.config.snapshot_parallelism {
            let client = url.connect().await?;
            let import =
                format!("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY; SET TRANSACTION SNAPSHOT '{snapshot_id}'");
            url.bounded_sql("importing the exported snapshot", client.batch_execute(&import)).await?;
            let shared = Arc::clone(&shared);
            workers.spawn(async move { copy_worker(worker, client, shared).await }.in_current_span());
        }
        let mut adds: HashMap<usize, Vec<Add>> = HashMap::new();
        let mut first_error = None;
        while let Some(worker) = workers.join_next().await {
            match worker {
                Ok(Ok(files)) => {
                    for (table, files) in files {
                        adds.entry(table).or_default().extend(files);
                    }
                }
                Ok(Err(e)) => first_error = first_error.or(Some(e)),
                Err(source) => {
                    first_error = first_error.or(Some(IngestError::Task { doing: "copying a snapshot", source }))
                }
            }
            if first_error.is_some() {
                // The others' copies are wasted: stop them now.
                workers.abort_all();
            }
        }
        // Ending the read-only transaction is only courtesy: the error that matters is the
        // workers'.
        let _ =
            url.bounded("ending the snapshot transaction", async { Ok(control.batch_execute("COMMIT").await) }).await;
        if let Some(e) = first_error {
            return Err(e);
        }

        // Record where the snapshot stands before any table commits: the change stream needs
        // it to hand over without a gap or a duplicate.
        let handoff = SnapshotPoint { lsn: lsn.0, visibility: visibility.clone() };
        storage.put_meta(SNAPSHOT_META, handoff.to_json().into_bytes()).await?;

        // Commit each raw table with the snapshot position. A table that holds files of an
        // earlier, unfinished snapshot is replaced whole.
        let position = Position::new(raw::SNAPSHOT_APP, lsn.0 as i64);
        let mut report_tables = Vec::with_capacity(tables.len());
        for (i, layer) in layer_tables.iter_mut().enumerate() {
            let files = adds.remove(&i).unwrap_or_default();
            let outcome = layer.commit(files, &position, CommitMode::ReplaceAll).await?;
            let (files, outcome_committed) = match outcome {
                CommitOutcome::Committed { files, .. } => (files, true),
                CommitOutcome::AlreadyCommitted => (0, false),
            };
            let p = &table_progress.iter().find(|p| p.table == tables[i].qualified());
            let (rows, bytes) =
                p.map(|p| (p.rows.load(Ordering::Relaxed), p.bytes.load(Ordering::Relaxed))).unwrap_or_default();
            if let Some(p) = p {
                p.done.store(true, Ordering::Relaxed);
            }
            tracing::info!(table = %tables[i].qualified(), rows, bytes, files, "snapshot table committed");
            if outcome_committed {
                let mut counts = [0; raw::Operation::ALL.len()];
                counts[raw::Operation::Snapshot as usize] = rows;
                crate::cdc::record_captured(&tables[i].qualified(), &counts);
            }
            report_tables.push(TableSnapshot { table: tables[i].qualified(), rows, bytes, files });
        }
        let mut manifest = Manifest::new(lsn.0 as i64);
        for layer in &layer_tables {
            manifest.record(layer);
        }
        storage.put_manifest(manifests::RAW, &manifest).await?;
        Ok(SnapshotReport { lsn, visibility, tables: report_tables, already_done: false, elapsed: started.elapsed() })
    }
}

impl std::future::IntoFuture for Snapshot {
    type Output = Result<SnapshotReport>;
    type IntoFuture = futures::future::BoxFuture<'static, Self::Output>;

    fn into_future(self) -> Self::IntoFuture {
        Box::pin(self.run())
    }
}

struct Shared {
    tables: Vec<SourceTable>,
    layer_tables: Vec<LayerTable>,
    queue: Mutex<VecDeque<(usize, i64, Option<i64>)>>,
    progress: Vec<Arc<TableProgress>>,
    lsn: Lsn,
    taken_at_micros: i64,
    batch_rows: usize,
    target_file_bytes: u64,
    /// The source, whose timeout bounds every wait for COPY data.
    url: SourceUrl,
}

impl Shared {
    fn progress_of(&self, table: usize) -> Option<&Arc<TableProgress>> {
        let name = self.tables[table].qualified();
        self.progress.iter().find(|p| p.table == name)
    }
}

/// Copy ranges from the queue until it is empty; a writer task encodes the batches.
async fn copy_worker(
    worker: usize,
    client: tokio_postgres::Client,
    shared: Arc<Shared>,
) -> Result<Vec<(usize, Vec<Add>)>> {
    let (tx, mut rx) = mpsc::channel::<(usize, RecordBatch)>(CHANNEL_DEPTH);
    let writer_shared = Arc::clone(&shared);
    // (Owned too: aborted with the worker.)
    let mut writer = tokio::task::JoinSet::new();
    writer.spawn(async move {
        let mut writers: HashMap<usize, acme_core::LayerWriter> = HashMap::new();
        while let Some((table, batch)) = rx.recv().await {
            let layer = &writer_shared.layer_tables[table];
            let w = match writers.entry(table) {
                std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
                std::collections::hash_map::Entry::Vacant(e) => {
                    e.insert(layer.writer(writer_shared.target_file_bytes)?)
                }
            };
            w.write(layer.name(), batch).await?;
        }
        let mut out = Vec::with_capacity(writers.len());
        for (table, w) in writers {
            out.push((table, w.finish(writer_shared.layer_tables[table].name()).await?));
        }
        Ok::<_, IngestError>(out)
    });
    let copied = copy_ranges(worker, &client, &shared, &tx).await;
    drop(tx);
    let written = match writer.join_next().await {
        Some(written) => written.map_err(|source| IngestError::Task { doing: "writing snapshot files", source })?,
        None => Err(IngestError::Internal("the snapshot writer task is missing".into())),
    };
    match (copied, written) {
        // A writer that failed stops the copy too: its error is the cause.
        (_, Err(error)) | (Err(error), Ok(_)) => Err(error),
        (Ok(()), Ok(files)) => Ok(files),
    }
}

async fn copy_ranges(
    worker: usize,
    client: &tokio_postgres::Client,
    shared: &Shared,
    tx: &mpsc::Sender<(usize, RecordBatch)>,
) -> Result<()> {
    loop {
        let Some((table_idx, start, end)) = shared.queue.lock().await.pop_front() else {
            return Ok(());
        };
        let table = &shared.tables[table_idx];
        let span = tracing::debug_span!("snapshot_copy", worker, table = %table.qualified(), start, end);
        copy_range(client, shared, tx, table_idx, start, end).instrument(span).await?;
    }
}

/// Copy the rows of one block range of a table into the writer channel.
async fn copy_range(
    client: &tokio_postgres::Client,
    shared: &Shared,
    tx: &mpsc::Sender<(usize, RecordBatch)>,
    table_idx: usize,
    start: i64,
    end: Option<i64>,
) -> Result<()> {
    let table = &shared.tables[table_idx];
    let filter = match end {
        Some(end) => format!("ctid >= '({start},0)'::tid AND ctid < '({end},0)'::tid"),
        None => format!("ctid >= '({start},0)'::tid"),
    };
    let sql = format!(
        "COPY (SELECT {} FROM {} WHERE {filter}) TO STDOUT (FORMAT binary)",
        table.column_list(),
        table.quoted()
    );
    // Every wait on the server is bounded: a stalled server fails the snapshot (to be run
    // again) instead of hanging it.
    let starting = format!("starting COPY of {}", table.qualified());
    let stream = shared.url.bounded_sql(&starting, client.copy_out(&sql)).await?;
    futures::pin_mut!(stream);
    let mut decoder = CopyDecoder::new(table, shared.batch_rows);
    let progress = shared.progress_of(table_idx);
    let reading = format!("reading COPY data of {}", table.qualified());
    while let Some(chunk) = shared.url.bounded(&reading, async { Ok(stream.next().await) }).await? {
        let chunk = chunk.map_err(|source| IngestError::Source { context: reading.clone(), source })?;
        if let Some(p) = progress {
            p.bytes.fetch_add(chunk.len() as u64, Ordering::Relaxed);
        }
        decoder.feed(&chunk)?;
        while decoder.rows_buffered() >= shared.batch_rows {
            let batch = decoder.finish_snapshot_rows(shared.lsn.0 as i64, shared.taken_at_micros)?;
            send(tx, table_idx, batch, progress).await?;
        }
    }
    decoder.check_finished()?;
    if decoder.rows_buffered() > 0 {
        let batch = decoder.finish_snapshot_rows(shared.lsn.0 as i64, shared.taken_at_micros)?;
        send(tx, table_idx, batch, progress).await?;
    }
    Ok(())
}

async fn send(
    tx: &mpsc::Sender<(usize, RecordBatch)>,
    table: usize,
    batch: RecordBatch,
    progress: Option<&Arc<TableProgress>>,
) -> Result<()> {
    let rows = batch.num_rows() as u64;
    // The writer stopped: its own error (or failure) is what the worker reports.
    tx.send((table, batch)).await.map_err(|_| IngestError::Internal("the Parquet writer task stopped".into()))?;
    acme_core::failpoint::hit("snapshot.copy");
    if let Some(p) = progress {
        let total = p.rows.fetch_add(rows, Ordering::Relaxed) + rows;
        tracing::debug!(table = %p.table, rows = total, bytes = p.bytes.load(Ordering::Relaxed), "snapshot progress");
    }
    Ok(())
}
