//! Change data capture: logical decoding (`pgoutput`) into the raw layer, exactly once.
//!
//! How it fits together:
//! 1. [`ChangeStream::open`] checks the source (wal_level, REPLICATION privilege, REPLICA
//!    IDENTITY FULL, publication), creates the replication slot if needed *before* the
//!    snapshot, and runs the snapshot if the raw layer has none.
//! 2. Each [`ChangeStream::poll`] reads a micro-batch of changes, decodes it straight into
//!    Arrow builders, writes Parquet files, and commits each raw table once with a Delta `txn`
//!    action carrying the commit LSN of the last transaction it holds. By default changes are
//!    streamed with the replication protocol (`START_REPLICATION`, keepalives answered, standby
//!    status updates); [`CdcMode::SqlPoll`] reads the same slot through
//!    `pg_logical_slot_peek_binary_changes` instead (faster on large backlogs).
//! 3. Only after those commits are durable is the slot's position confirmed. After a crash
//!    the slot replays from its last confirmed position and every table skips the
//!    transactions its own stored position already covers: nothing is written twice and
//!    nothing is skipped.
//! 4. A broken connection, a terminated walsender or a restarted server is a transient error:
//!    [`ChangeStream::run_until`] and [`ChangeStream::catch_up`] reconnect with exponential
//!    backoff and resume from the raw layer's position. A dropped or invalidated slot is not:
//!    it stops with [`IngestError::SlotLost`], which says how to re-sync.
//!
//! The snapshot-to-stream handoff is exact: the slot exists before the snapshot is taken, and
//! transactions the snapshot already saw are recognised by the snapshot's `xmin:xmax:xip`
//! visibility list and skipped.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use acme_core::deltalake::kernel::Add;
use acme_core::raw::{self, Operation};
use acme_core::storage::{Manifest, manifests};
use acme_core::telemetry;
use acme_core::{
    AcmeConfig, CdcMode, CommitMode, CompactOptions, CompactReport, Layer, LayerTable, LayerWriter, MergedFiles,
    Position, Storage,
};
use futures::StreamExt;
use tokio_postgres::Client;
use tokio_postgres::error::SqlState;
use tracing::Instrument;

use crate::changes::{ChangeBuilder, ChangeMeta, ColumnMap, PG_EPOCH_MICROS};
use crate::error::{IngestError, Result};
use crate::pgoutput::{self, Message};
use crate::replication::{LogicalStream, ReplicationConnection, StreamEvent, create_slot_exporting_snapshot};
use crate::snapshot::{SNAPSHOT_META, Snapshot, SnapshotPoint, SnapshotProgress};
use crate::source::{SourceColumn, SourceTable, SourceUrl};
use crate::triggers::{Changelog, RawValue, batch_of, synthetic_lsn};
use crate::types::PgType;
use acme_core::Lsn;

/// Metadata document naming the replication slot this warehouse created.
pub const SLOT_META: &str = "slot";

/// Metadata document naming the publication this warehouse streams through.
pub const PUBLICATION_META: &str = "publication";

/// Metadata document naming the capture method that filled the warehouse.
pub const CAPTURE_META: &str = "capture";

/// Commit a heartbeat on `client` (a connection to the source at `url`): a transactional
/// logical-decoding message with synchronous commit, which writes no table and flushes all WAL
/// before it, so every transaction committed before the call (with asynchronous commit too) is
/// decoded before it. Returns the message's LSN: a slot confirmed past it holds them all.
pub async fn write_heartbeat(url: &SourceUrl, client: &tokio_postgres::Client) -> Result<Lsn> {
    let write = async {
        client
            .batch_execute("BEGIN; SET LOCAL synchronous_commit = on")
            .await
            .map_err(sql("starting the heartbeat"))?;
        let lsn: String = client
            .query_one("SELECT pg_logical_emit_message(true, 'acme-heartbeat', '')::text", &[])
            .await
            .map_err(sql("writing the heartbeat"))?
            .get(0);
        client.batch_execute("COMMIT").await.map_err(sql("committing the heartbeat"))?;
        Ok(lsn)
    };
    Ok(Lsn::parse(&url.bounded("writing a heartbeat", write).await?)?)
}

/// An idle stream writes a heartbeat this often so that its slot keeps advancing.
pub const IDLE_HEARTBEAT: Duration = Duration::from_secs(10);

/// [`ChangeStream::run_until`] compacts the raw tables after this many commit rounds (each
/// round leaves one small file per table it touched). The merge runs beside the stream; only
/// its commit, a few log writes, takes a turn between two polls.
pub const COMPACT_EVERY_ROUNDS: u32 = 50;

/// What [`ChangeStream::run_observed`] tells its observer.
#[derive(Debug)]
pub enum CaptureEvent<'a> {
    /// A poll finished: what it committed, and the slot's confirmed position after it.
    Polled(&'a PollReport),
    /// A merge of the raw tables' small files was committed.
    Compacted(&'a CompactReport),
    /// A poll failed with a transient error; the stream reconnects with backoff and retries.
    Retrying {
        /// The failure.
        error: &'a IngestError,
        /// Retries in a row so far, this one included.
        attempt: u32,
    },
}

/// What one poll did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PollReport {
    /// Transactions read from the slot.
    pub transactions: u64,
    /// Change rows committed to the raw layer.
    pub changes: u64,
    /// Transactions skipped because the snapshot or an earlier commit already held them.
    pub skipped_transactions: u64,
    /// The slot's confirmed position after the poll.
    pub confirmed: Lsn,
    /// Raw tables committed.
    pub tables_committed: usize,
    /// Change rows decoded in this poll (committed ones are counted in `changes`).
    pub changes_seen: u64,
}

impl PollReport {
    /// Add a later poll's counts to these (its confirmed position replaces this one's).
    fn add(&mut self, later: &PollReport) {
        self.transactions += later.transactions;
        self.changes += later.changes;
        self.changes_seen += later.changes_seen;
        self.skipped_transactions += later.skipped_transactions;
        self.tables_committed += later.tables_committed;
        self.confirmed = later.confirmed;
    }
}

impl TableState {
    /// Move the builder's rows into the table's open Parquet writer (opened on first use).
    async fn spill(&mut self, target_file_bytes: u64) -> Result<()> {
        if let Some(batch) = self.builder.finish()? {
            let writer = match self.writer.as_mut() {
                Some(w) => w,
                None => self.writer.insert(self.layer.writer(target_file_bytes)?),
            };
            writer.write(self.layer.name(), batch).await?;
        }
        Ok(())
    }
}

/// What the caller must do after a message was decoded.
enum Step {
    Continue,
    /// A builder may be full: move it into its Parquet writer.
    Spill,
    /// Table `usize` gained columns.
    Evolve(usize, pgoutput::Relation),
}

/// Where decoding stands inside one poll.
#[derive(Debug, Default)]
struct Cursor {
    tx: Option<TxState>,
    last_end: Option<u64>,
    report: PollReport,
}

/// Between transactions, how long the stream waits for data before asking the server how far
/// it has decoded.
const STATUS_PROBE: Duration = Duration::from_millis(10);
/// First reconnect delay; doubled per failed attempt.
const RECONNECT_BASE: Duration = Duration::from_millis(100);
/// Longest reconnect delay.
const RECONNECT_MAX: Duration = Duration::from_secs(10);

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
    /// Highest commit LSN buffered in this poll.
    pending_lsn: Option<u64>,
}

/// A running change stream from one source into one warehouse.
pub struct ChangeStream {
    config: AcmeConfig,
    url: SourceUrl,
    client: Client,
    storage: Storage,
    tables: Vec<TableState>,
    relations: HashMap<u32, (usize, ColumnMap)>,
    snapshot: SnapshotPoint,
    confirmed: Lsn,
    stream: Option<LogicalStream>,
    /// A poll did not finish: uncommitted decoded state must be dropped before the next one.
    dirty: bool,
    /// Commit rounds since the raw tables were last compacted.
    uncompacted_rounds: u32,
    /// The changelog, when capturing with triggers ([`CdcMode::Triggers`]).
    changelog: Option<Changelog>,
    /// A merge of the raw tables' small files running beside the stream.
    background: Option<BackgroundMerge>,
}

/// The task of a background merge: the merged files of each raw table, in table order. It is
/// aborted when dropped, so a dropped stream leaves no task writing files.
struct BackgroundMerge(tokio::task::JoinHandle<acme_core::Result<Vec<Vec<MergedFiles>>>>);

impl Drop for BackgroundMerge {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl std::fmt::Debug for ChangeStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChangeStream").field("source", &self.url).field("slot", &self.config.slot).finish()
    }
}

fn sql(context: impl Into<String>) -> impl FnOnce(tokio_postgres::Error) -> IngestError {
    let context = context.into();
    move |source| IngestError::Source { context, source }
}

impl ChangeStream {
    /// Check the source, make sure slot, publication and snapshot exist, and get ready to
    /// stream. Runs the initial snapshot when the raw layer has none.
    pub async fn open(config: AcmeConfig) -> Result<Self> {
        Self::open_with_progress(config, None).await
    }

    /// [`ChangeStream::open`], reporting the snapshot's progress (if one runs) into `progress`.
    pub async fn open_with_progress(config: AcmeConfig, progress: Option<Arc<SnapshotProgress>>) -> Result<Self> {
        config.validate()?;
        let url = SourceUrl::parse(config.source_url.as_deref().ok_or(IngestError::NoSource)?)?
            .with_timeout(config.source_timeout);
        let storage = Storage::new(&config.storage_url, config.storage_options.clone())?;
        let client = url.connect().await?;
        let triggers = config.cdc_mode == CdcMode::Triggers;
        if !triggers {
            check_source(&client).await?;
        }
        let mut sources = Vec::with_capacity(config.tables.len());
        for name in &config.tables {
            let table = SourceTable::load(&client, &config.schema, name).await?;
            // Triggers see whole old rows whatever the replica identity.
            if !triggers && table.replica_identity != 'f' {
                return Err(IngestError::ReplicaIdentity { table: table.qualified() });
            }
            sources.push(table);
        }
        // Is there a complete snapshot already?
        let mut layers = Vec::with_capacity(sources.len());
        for table in &sources {
            let schema = table.raw_schema();
            let mut layer = storage.open_or_create(Layer::Raw, &table.name, &schema).await?;
            // Columns added to the source while acme was not running.
            let fields: Vec<_> = schema.fields().iter().map(|f| f.as_ref().clone()).collect();
            layer.add_columns(&fields).await?;
            layers.push(layer);
        }
        let mut snapshot_positions = Vec::new();
        for layer in &layers {
            snapshot_positions.push(layer.position(raw::SNAPSHOT_APP).await?);
        }
        let snapshot_complete = snapshot_positions.iter().all(|p| p.is_some() && *p == snapshot_positions[0]);
        // Capture methods cannot be switched on one warehouse (a warehouse without the marker
        // predates the trigger fallback: logical decoding filled it).
        let method = if triggers { "triggers" } else { "logical decoding" };
        let stored_method = match storage.get_meta(CAPTURE_META).await? {
            Some(bytes) => Some(String::from_utf8_lossy(&bytes).into_owned()),
            None if snapshot_complete => Some("logical decoding".to_string()),
            None => None,
        };
        if let Some(stored) = stored_method
            && stored != method
        {
            return Err(IngestError::CaptureMethodChanged { stored, configured: method.to_string() });
        }
        let changelog = triggers.then(|| Changelog::new(&config.slot));
        if let Some(changelog) = &changelog {
            if snapshot_complete {
                if let Some(table) = changelog.missing_trigger(&client, &sources).await? {
                    return Err(IngestError::CaptureTriggerMissing { table });
                }
            } else {
                // Triggers first: every transaction that commits after the snapshot is captured.
                storage.put_meta(CAPTURE_META, method.as_bytes().to_vec()).await?;
                changelog.install(&client, &sources).await?;
                let mut snapshot = Snapshot::new(config.clone());
                if let Some(progress) = progress.clone() {
                    snapshot = snapshot.with_progress(progress);
                }
                let report = snapshot.await?;
                tracing::info!(lsn = %report.lsn, "initial snapshot complete; capturing changes with triggers");
                for layer in &mut layers {
                    layer.refresh().await?;
                }
            }
        }
        // The slot and publication the warehouse was synced through, if it records them.
        type Changed = fn(String, String) -> IngestError;
        let names: [(&str, &String, Changed); 2] = [
            (SLOT_META, &config.slot, |stored, configured| IngestError::SlotNameChanged { stored, configured }),
            (PUBLICATION_META, &config.publication, |stored, configured| IngestError::PublicationNameChanged {
                stored,
                configured,
            }),
        ];
        for (meta, configured, changed) in names {
            if snapshot_complete
                && !triggers
                && let Some(stored) = storage.get_meta(meta).await?
                && stored != configured.as_bytes()
            {
                return Err(changed(String::from_utf8_lossy(&stored).into_owned(), configured.clone()));
            }
        }
        if !triggers {
            // (After the check above: a mistyped name must not create a publication.)
            ensure_publication(&client, &config, &sources).await?;
        }
        let slot = if triggers { SlotState::Ready } else { slot_state(&client, &config.slot).await? };
        let snapshot_complete = snapshot_complete || triggers;
        match (slot, snapshot_complete) {
            (SlotState::Lost, _) | (SlotState::Missing, true) => {
                return Err(IngestError::SlotLost { slot: config.slot.clone() });
            }
            (SlotState::Ready, true) => {}
            (state, false) => {
                // No complete snapshot yet (first run, or a run that died mid-snapshot): nothing
                // was streamed, so (re)create the slot and copy exactly its exported snapshot.
                if matches!(state, SlotState::Ready) {
                    // Drop it only if this warehouse created it (a run that died mid-snapshot);
                    // a slot of another warehouse must never be touched.
                    let ours = storage.get_meta(SLOT_META).await?.is_some_and(|owner| owner == config.slot.as_bytes());
                    if !ours {
                        return Err(IngestError::SlotInUse { slot: config.slot.clone() });
                    }
                    client
                        .execute("SELECT pg_drop_replication_slot($1)", &[&config.slot])
                        .await
                        .map_err(sql(format!("dropping the unused replication slot {}", config.slot)))?;
                }
                storage.put_meta(SLOT_META, config.slot.as_bytes().to_vec()).await?;
                storage.put_meta(PUBLICATION_META, config.publication.as_bytes().to_vec()).await?;
                storage.put_meta(CAPTURE_META, method.as_bytes().to_vec()).await?;
                let mut replication = ReplicationConnection::connect(&url).await?;
                let created = create_slot_exporting_snapshot(&mut replication, &config.slot).await?;
                let lsn = Lsn::parse(&created.consistent_point)?;
                tracing::info!(slot = %config.slot, %lsn, "replication slot created");
                let mut snapshot = Snapshot::new(config.clone()).with_exported_snapshot(created.snapshot_name, lsn);
                if let Some(progress) = progress {
                    snapshot = snapshot.with_progress(progress);
                }
                let report = snapshot.await;
                replication.close().await;
                let report = report?;
                tracing::info!(lsn = %report.lsn, "initial snapshot complete");
                for layer in &mut layers {
                    layer.refresh().await?;
                }
            }
        }
        let snapshot = match storage.get_meta(SNAPSHOT_META).await? {
            Some(bytes) => SnapshotPoint::from_json(&bytes)?,
            None => {
                return Err(IngestError::WarehouseDamaged {
                    what: format!("raw layer holds a snapshot but _acme/{SNAPSHOT_META} is missing"),
                });
            }
        };
        if let Some(changelog) = &changelog {
            // Changes of transactions the snapshot holds (committed before it) are not replayed.
            changelog.drop_snapshot_changes(&client, &snapshot.visibility).await?;
        }
        let mut tables = Vec::with_capacity(sources.len());
        for (table, layer) in sources.into_iter().zip(layers) {
            let stored = layer.position(raw::CDC_APP).await?.map(|v| v as u64);
            tables.push(TableState {
                builder: ChangeBuilder::new(table, config.batch_rows),
                layer,
                writer: None,
                carried: Vec::new(),
                carried_rows: 0,
                stored,
                pending_lsn: None,
            });
        }
        Ok(Self {
            config,
            url,
            client,
            storage,
            tables,
            relations: HashMap::new(),
            snapshot,
            confirmed: Lsn::default(),
            stream: None,
            dirty: false,
            uncompacted_rounds: 0,
            changelog,
            background: None,
        })
    }

    /// The snapshot point the stream started from.
    pub fn snapshot_point(&self) -> &SnapshotPoint {
        &self.snapshot
    }

    /// Bytes of WAL the slot still retains for acme (`pg_current_wal_lsn() - confirmed_flush_lsn`).
    /// With [`CdcMode::Triggers`]: the bytes the changelog table holds instead.
    pub async fn slot_lag_bytes(&self) -> Result<i64> {
        if let Some(changelog) = &self.changelog {
            return changelog.size_bytes(&self.client).await;
        }
        let row = self
            .client
            .query_one(
                "SELECT coalesce(pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn), 0)::int8 \
                 FROM pg_replication_slots WHERE slot_name = $1",
                &[&self.config.slot],
            )
            .await
            .map_err(sql("reading the slot lag"))?;
        Ok(row.get(0))
    }

    /// Read every change committed up to now (bounded by `max_batch_changes` per poll and, when
    /// streaming, by `flush_interval`), commit it to the raw layer, then confirm it to the slot.
    ///
    /// A poll that failed or was cancelled half-way leaves decoded changes that were never
    /// committed; the next poll notices, drops them and resumes from the raw layer's position.
    pub async fn poll(&mut self) -> Result<PollReport> {
        let span = tracing::debug_span!(
            "poll",
            mode = ?self.config.cdc_mode,
            from = %self.confirmed,
            confirmed = tracing::field::Empty,
            changes = tracing::field::Empty,
        );
        let report = self.poll_once().instrument(span.clone()).await?;
        span.record("confirmed", tracing::field::display(report.confirmed));
        span.record("changes", report.changes);
        Ok(report)
    }

    /// [`ChangeStream::poll`]'s work.
    async fn poll_once(&mut self) -> Result<PollReport> {
        if self.dirty {
            self.reconnect().await?;
        }
        self.dirty = true;
        let report = match self.config.cdc_mode {
            CdcMode::Stream => self.poll_stream().await,
            CdcMode::SqlPoll => self.poll_sql().await,
            CdcMode::Triggers => self.poll_triggers().await,
        };
        let report = match report {
            Ok(report) => report,
            Err(error) => return Err(self.invalidated_slot(error).await),
        };
        self.dirty = false;
        Ok(report)
    }

    /// The WAL position flushed on the source now. (Takes `&mut self` so that the future stays
    /// `Send`: the stream's writers are not `Sync`.)
    async fn flush_lsn(&mut self) -> Result<Lsn> {
        let query = async {
            self.client
                .query_one("SELECT pg_current_wal_flush_lsn()::text", &[])
                .await
                .map_err(sql("reading the current WAL position"))
        };
        let upto: String = self.url.bounded("reading the current WAL position", query).await?.get(0);
        Ok(Lsn::parse(&upto)?)
    }

    async fn poll_sql(&mut self) -> Result<PollReport> {
        // Decoding reads WAL only up to the flushed position: reading up to the flush LSN (not
        // the insert LSN) guarantees that every transaction committed before it is returned, so
        // the slot can be advanced there without losing one.
        let upto = self.flush_lsn().await?.to_string();
        let max = i32::try_from(self.config.max_batch_changes).unwrap_or(i32::MAX);
        let rows = self
            .client
            .query_raw(
                "SELECT data FROM pg_logical_slot_peek_binary_changes($1, $2::text::pg_lsn, $3::int4, \
                 'proto_version', '1', 'publication_names', $4, 'binary', 'true', 'messages', 'true')",
                [
                    &self.config.slot as &(dyn tokio_postgres::types::ToSql + Sync),
                    &upto,
                    &max,
                    &self.config.publication,
                ],
            )
            .await
            .map_err(|source| self.slot_error(source))?;
        futures::pin_mut!(rows);
        let mut cursor = Cursor::default();
        while let Some(row) = rows.next().await {
            let row = row.map_err(|source| self.slot_error(source))?;
            let data: &[u8] = row.get(0);
            let step = self.handle(data, &mut cursor)?;
            self.after(step).await?;
        }
        let mut report = cursor.report;
        self.commit_round(&mut report).await?;
        if report.tables_committed > 0 {
            acme_core::failpoint::hit("cdc.committed");
        }
        // Advance the slot to the end of the last transaction read, never further: a commit
        // record that straddles the flushed WAL position has not been decoded yet.
        if let Some(confirm) = cursor.last_end {
            self.client
                .query_one(
                    "SELECT pg_replication_slot_advance($1, $2::text::pg_lsn)",
                    &[&self.config.slot, &Lsn(confirm).to_string()],
                )
                .await
                .map_err(|source| self.slot_error(source))?;
            self.confirmed = Lsn(confirm);
        }
        report.confirmed = self.confirmed;
        Ok(report)
    }

    async fn poll_stream(&mut self) -> Result<PollReport> {
        let upto = self.flush_lsn().await?.0;
        if self.stream.is_none() {
            let replication = ReplicationConnection::connect(&self.url).await?;
            let start = replication.start_logical(&self.config.slot, self.confirmed.0, &self.config.publication);
            let stream = self.url.bounded("starting replication", start).await.map_err(|e| self.stream_error(e))?;
            self.stream = Some(stream);
        }
        let started = Instant::now();
        let mut cursor = Cursor::default();
        // Everything before this position was sent and the stream is between transactions.
        let mut idle_end: Option<u64> = None;
        let mut asked = false;
        loop {
            let between = cursor.tx.is_none();
            let left = self.config.flush_interval.saturating_sub(started.elapsed());
            if between && (left.is_zero() || cursor.report.changes_seen >= self.config.max_batch_changes as u64) {
                break;
            }
            // Mid-transaction the rest of it must be read before anything can be committed.
            let wait = if between { left.min(STATUS_PROBE) } else { self.url.timeout() };
            let Some(stream) = self.stream.as_mut() else { break };
            let event = match tokio::time::timeout(wait, stream.next()).await {
                Ok(event) => event?,
                Err(_) if between => {
                    if !asked {
                        // Ask the server how far it has decoded (it answers with a keepalive,
                        // even while it decodes a large transaction).
                        stream.send_status(self.confirmed.0, true).await?;
                        asked = true;
                    } else if stream.silent_for() >= self.url.timeout() {
                        return Err(self.url.stalled("waiting for the replication stream"));
                    }
                    continue;
                }
                Err(_) => return Err(self.url.stalled("reading a transaction from the replication stream")),
            };
            match event {
                None => {
                    return Err(IngestError::Disconnected {
                        target: self.url.to_string(),
                        message: "the server ended the replication stream".into(),
                    });
                }
                Some(StreamEvent::XLogData { data, .. }) => {
                    let step = self.handle(&data, &mut cursor)?;
                    self.after(step).await?;
                    if cursor.tx.is_none() && cursor.last_end.is_some_and(|end| end >= upto) {
                        break;
                    }
                }
                Some(StreamEvent::Keepalive { wal_end, reply_requested }) => {
                    if cursor.tx.is_none() {
                        idle_end = Some(idle_end.unwrap_or(0).max(wal_end));
                        // Caught up. With nothing read yet, keep waiting for new data until
                        // `flush_interval` ends: an idle poll blocks instead of spinning.
                        if wal_end >= upto && cursor.report.transactions > 0 {
                            break;
                        }
                    }
                    if reply_requested && let Some(stream) = self.stream.as_mut() {
                        stream.send_status(self.confirmed.0, false).await?;
                    }
                }
            }
        }
        let mut report = cursor.report;
        let decoded = started.elapsed();
        self.commit_round(&mut report).await?;
        tracing::debug!(
            decode_ms = decoded.as_millis() as u64,
            commit_ms = (started.elapsed() - decoded).as_millis() as u64,
            transactions = report.transactions,
            changes = report.changes,
            "micro-batch committed"
        );
        // Everything decoded is durable now: confirm the end of the last transaction, or the
        // server's sent position when it was reached between transactions.
        let confirm = cursor.last_end.unwrap_or(0).max(if cursor.tx.is_none() { idle_end.unwrap_or(0) } else { 0 });
        if report.tables_committed > 0 {
            acme_core::failpoint::hit("cdc.committed");
        }
        if confirm > self.confirmed.0 {
            if let Some(stream) = self.stream.as_mut() {
                stream.send_status(confirm, false).await?;
            }
            self.confirmed = Lsn(confirm);
        }
        report.confirmed = self.confirmed;
        Ok(report)
    }

    /// One poll of the trigger fallback: claim, read, commit, release (see
    /// [`crate::triggers`]).
    async fn poll_triggers(&mut self) -> Result<PollReport> {
        let Some(changelog) = self.changelog.clone() else {
            return Err(IngestError::Internal("trigger capture without a changelog".into()));
        };
        let base = self.snapshot.lsn;
        let stored = self.tables.iter().filter_map(|t| t.stored).max();
        let claimed = self.url.bounded("reading the changelog", changelog.last_claimed(&self.client)).await?;
        // Batches left claimed by an earlier run are read again first; each table skips what
        // it already stored.
        let batch = stored.map_or(0, |l| batch_of(base, l)).max(claimed.unwrap_or(0)) + 1;
        let claim = changelog.claim(&self.client, batch, self.config.max_batch_changes);
        self.url.bounded("claiming changes", claim).await?;
        let (transactions, changes) =
            self.url.bounded("counting claimed changes", changelog.claimed_counts(&self.client)).await?;
        let mut report = PollReport { transactions, ..PollReport::default() };
        if changes > 0 {
            self.follow_added_columns().await?;
            for i in 0..self.tables.len() {
                self.read_claimed(&changelog, i, &mut report).await?;
            }
            self.commit_round(&mut report).await?;
            if report.tables_committed > 0 {
                acme_core::failpoint::hit("cdc.committed");
            }
            self.url.bounded("releasing committed changes", changelog.release(&self.client, batch)).await?;
        }
        self.confirmed = Lsn(self.tables.iter().filter_map(|t| t.stored).max().unwrap_or(base));
        report.confirmed = self.confirmed;
        Ok(report)
    }

    /// With triggers, a column added to a source table (`ALTER TABLE ... ADD COLUMN`) shows in
    /// the changelog's rows at once: widen the raw table before reading them.
    async fn follow_added_columns(&mut self) -> Result<()> {
        let oids: Vec<i64> = self.tables.iter().map(|t| i64::from(t.builder.table().oid)).collect();
        let query = async {
            self.client
                .query(
                    "SELECT attrelid::int8, count(*) FROM pg_attribute WHERE attrelid = ANY($1::int8[]::oid[]) \
                     AND attnum > 0 AND NOT attisdropped GROUP BY attrelid",
                    &[&oids],
                )
                .await
                .map_err(sql("reading the source tables' columns"))
        };
        let counts = self.url.bounded("reading the source tables' columns", query).await?;
        for row in counts {
            let (oid, count): (i64, i64) = (row.get(0), row.get(1));
            let Some(i) = self.tables.iter().position(|t| i64::from(t.builder.table().oid) == oid) else { continue };
            let current = self.tables[i].builder.table();
            if count as usize > current.columns.len() {
                let (schema, name) = (current.schema.clone(), current.name.clone());
                let table = SourceTable::load(&self.client, &schema, &name).await?;
                self.evolve_to(i, table).await?;
            }
        }
        Ok(())
    }

    /// Read the claimed changes of table `i` into its builder (spilling full batches).
    async fn read_claimed(&mut self, changelog: &Changelog, i: usize, report: &mut PollReport) -> Result<()> {
        let base = self.snapshot.lsn;
        let table = self.tables[i].builder.table().clone();
        let width = table.columns.len();
        let read_sql = changelog.read_sql(&table);
        let query = self.client.query_raw(&read_sql, [&table.name]);
        let rows = self.url.bounded_sql("reading claimed changes", query).await?;
        futures::pin_mut!(rows);
        let bad = |source| IngestError::Source {
            context: format!("decoding a claimed change of {}", table.qualified()),
            source,
        };
        loop {
            let next = self.url.bounded("reading claimed changes", async { Ok(rows.next().await) }).await?;
            let Some(row) = next else { break };
            let row = row.map_err(bad)?;
            let op: &str = row.try_get(0).map_err(bad)?;
            let op = Operation::parse(op)
                .ok_or_else(|| IngestError::BadMessage { message: format!("unknown changelog operation `{op}`") })?;
            let (batch, tx_no): (i64, i64) = (row.try_get(1).map_err(bad)?, row.try_get(2).map_err(bad)?);
            let lsn = synthetic_lsn(base, batch, tx_no);
            let state = &mut self.tables[i];
            if state.stored.is_some_and(|s| lsn <= s) {
                continue;
            }
            let meta = ChangeMeta {
                op,
                lsn,
                seq: row.try_get(3).map_err(bad)?,
                xid: row.try_get::<_, i64>(4).map_err(bad)? as u32,
                commit_ts_micros: row.try_get(5).map_err(bad)?,
            };
            let value = |c: usize| row.try_get::<_, Option<RawValue<'_>>>(c).map(|v| v.map(|v| v.0)).map_err(bad);
            match op {
                Operation::Truncate => state.builder.append_truncate(meta),
                Operation::Insert => {
                    let new = (6..6 + width).map(value).collect::<Result<Vec<_>>>()?;
                    state.builder.append_values(meta, new, None::<Vec<Option<&[u8]>>>)?;
                }
                _ => {
                    let new = (6..6 + width).map(value).collect::<Result<Vec<_>>>()?;
                    let old = (6 + width..6 + 2 * width).map(value).collect::<Result<Vec<_>>>()?;
                    state.builder.append_values(meta, new, Some(old))?;
                }
            }
            state.pending_lsn = Some(lsn);
            report.changes_seen += 1;
            if state.builder.rows() >= self.config.batch_rows {
                state.spill(self.config.target_file_bytes).await?;
            }
        }
        Ok(())
    }

    /// Do what decoding a message asked for: spill full builders, or evolve a table's schema.
    async fn after(&mut self, step: Step) -> Result<()> {
        match step {
            Step::Continue => Ok(()),
            Step::Spill => self.spill_full_builders().await,
            Step::Evolve(i, relation) => self.evolve(i, &relation).await,
        }
    }

    /// Decode one pgoutput message into the builders.
    fn handle(&mut self, data: &[u8], cursor: &mut Cursor) -> Result<Step> {
        match pgoutput::decode(data)? {
            Message::Begin { final_lsn, commit_ts, xid } => {
                let skip = self.snapshot.contains(xid, final_lsn);
                cursor.tx =
                    Some(TxState { lsn: final_lsn, xid, commit_ts_micros: commit_ts + PG_EPOCH_MICROS, seq: 0, skip });
            }
            Message::Commit { end_lsn, .. } => {
                if let Some(t) = cursor.tx.take() {
                    cursor.report.transactions += 1;
                    if t.skip {
                        cursor.report.skipped_transactions += 1;
                    }
                }
                cursor.last_end = Some(end_lsn);
                return Ok(Step::Spill);
            }
            Message::Relation(relation) => {
                if let Some(i) = self.tables.iter().position(|t| {
                    t.builder.table().schema == relation.schema && t.builder.table().name == relation.name
                }) {
                    let table = self.tables[i].builder.table();
                    if relation.columns.iter().any(|c| !table.columns.iter().any(|t| t.name == c.name)) {
                        return Ok(Step::Evolve(i, relation));
                    }
                    let map = ColumnMap::new(&relation, table)?;
                    self.relations.insert(relation.oid, (i, map));
                }
            }
            Message::Insert { relation, new } => {
                let full = self.apply(cursor, relation, Operation::Insert, Some(new), None)?;
                return Ok(if full { Step::Spill } else { Step::Continue });
            }
            Message::Update { relation, old, new } => {
                let full = self.apply(cursor, relation, Operation::Update, Some(new), old)?;
                return Ok(if full { Step::Spill } else { Step::Continue });
            }
            Message::Delete { relation, old } => {
                let full = self.apply(cursor, relation, Operation::Delete, None, Some(old))?;
                return Ok(if full { Step::Spill } else { Step::Continue });
            }
            Message::Truncate { relations } => {
                for relation in relations {
                    if let (Some(t), Some((i, _))) = (cursor.tx.as_mut(), self.relations.get(&relation)) {
                        let state = &mut self.tables[*i];
                        let seq = t.seq;
                        t.seq += 1;
                        if t.skip || state.stored.is_some_and(|s| t.lsn <= s) {
                            continue;
                        }
                        state.builder.append_truncate(t.meta(Operation::Truncate, seq));
                        state.pending_lsn = Some(t.lsn);
                    }
                }
            }
            Message::Ignored => {}
        }
        Ok(Step::Continue)
    }

    /// The source table gained columns (`ALTER TABLE ... ADD COLUMN`) in the middle of the
    /// stream: the rows decoded so far go to files with the old columns, the raw table gains
    /// the new columns (nullable; older files read them as NULL), and decoding continues with
    /// the new definition. Nothing stops and nothing is committed early.
    async fn evolve(&mut self, i: usize, relation: &pgoutput::Relation) -> Result<()> {
        let mut table = self.tables[i].builder.table().clone();
        for column in &relation.columns {
            if table.columns.iter().any(|c| c.name == column.name) {
                continue;
            }
            let ty = PgType::from_oid(
                column.type_oid,
                column.typmod,
                &table.qualified(),
                &column.name,
                &format!("type oid {}", column.type_oid),
            )?;
            table.columns.push(SourceColumn { name: column.name.clone(), ty, not_null: false });
        }
        self.evolve_to(i, table.clone()).await?;
        let map = ColumnMap::new(relation, &table)?;
        self.relations.insert(relation.oid, (i, map));
        Ok(())
    }

    /// Give table `i` the (wider) definition `table`: the rows buffered so far go to files with
    /// the old columns, carried to the table's next commit, and the raw table gains the new
    /// columns.
    async fn evolve_to(&mut self, i: usize, table: SourceTable) -> Result<()> {
        let state = &mut self.tables[i];
        // Rows decoded with the old definition: into the open writer, whose files are carried
        // to the next commit of this table.
        state.spill(self.config.target_file_bytes).await?;
        if let Some(writer) = state.writer.take() {
            state.carried_rows += writer.rows();
            state.carried.extend(writer.finish(state.layer.name()).await?);
        }
        let schema = table.raw_schema();
        let fields: Vec<_> = schema.fields().iter().map(|f| f.as_ref().clone()).collect();
        state.layer.add_columns(&fields).await?;
        tracing::info!(table = %table.qualified(), columns = table.columns.len(), "source table gained columns; raw schema evolved");
        state.builder = ChangeBuilder::new(table, self.config.batch_rows);
        Ok(())
    }

    /// Commit every table that received changes (one Delta commit each, with its position),
    /// then record the round in the raw manifest.
    async fn commit_round(&mut self, report: &mut PollReport) -> Result<()> {
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

    /// [`ChangeStream::commit_round`]'s work.
    async fn commit_tables(&mut self, report: &mut PollReport) -> Result<()> {
        // The tables commit concurrently; each commit is atomic on its own and carries its own
        // position, so a failure part-way is replayed exactly like a crash.
        let target_file_bytes = self.config.target_file_bytes;
        let commits = self.tables.iter_mut().map(|state| async move {
            let Some(lsn) = state.pending_lsn.take() else { return Ok::<_, IngestError>(None) };
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
            state.layer.commit(files, &Position::new(raw::CDC_APP, lsn as i64), CommitMode::Append).await?;
            state.stored = Some(lsn);
            record_captured(&state.builder.table().qualified(), &counts);
            Ok(Some(rows))
        });
        for rows in futures::future::join_all(commits).await {
            if let Some(rows) = rows? {
                report.changes += rows;
                report.tables_committed += 1;
            }
        }
        if report.tables_committed > 0 {
            acme_core::failpoint::hit("cdc.commit_round");
            let position = self.tables.iter().filter_map(|t| t.stored).max().unwrap_or_default();
            let mut manifest = Manifest::new(position as i64);
            for state in &self.tables {
                manifest.record(&state.layer);
            }
            self.storage.put_manifest(manifests::RAW, &manifest).await?;
            self.uncompacted_rounds += 1;
        }
        Ok(())
    }

    /// Merge the small files that micro-batches leave in the raw tables into larger files
    /// sorted by commit LSN and position (see [`acme_core::compact`]). The rows, and every
    /// version readers may hold, stay the same; the raw manifest then names the compacted
    /// versions. [`ChangeStream::run_until`] calls this every [`COMPACT_EVERY_ROUNDS`] rounds.
    pub async fn compact(&mut self) -> Result<CompactReport> {
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

    fn compact_options(&self) -> CompactOptions {
        CompactOptions {
            target_file_bytes: self.config.target_file_bytes,
            ..CompactOptions::sorted_by(&[raw::LSN, raw::SEQ])
        }
    }

    /// Start merging the raw tables' small files in a task of its own, on copies of the
    /// tables at their current versions, unless a merge is running already.
    fn start_background_merge(&mut self) {
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
    async fn finish_background_merge(&mut self, wait: bool) -> Result<CompactReport> {
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
    /// (`&mut self`: a shared borrow held across the awaits would need the stream to be `Sync`.)
    async fn record_compaction(&mut self, total: &CompactReport) -> Result<()> {
        if total.files_removed > 0
            && let Some(previous) = self.storage.get_manifest(manifests::RAW).await?
        {
            let mut manifest = Manifest::new(previous.position);
            for state in &self.tables {
                manifest.record(&state.layer);
            }
            self.storage.put_manifest(manifests::RAW, &manifest).await?;
        }
        Ok(())
    }

    /// After a transient failure: drop everything decoded but not committed, reconnect, and
    /// resume from what the raw layer holds (the slot replays the rest).
    pub async fn reconnect(&mut self) -> Result<()> {
        self.stream = None;
        self.relations.clear();
        for state in &mut self.tables {
            let _ = state.builder.finish();
            let _ = state.builder.take_counts();
            // Files written but never committed are invisible to readers; vacuum removes them.
            state.writer = None;
            state.carried.clear();
            state.carried_rows = 0;
            state.pending_lsn = None;
        }
        self.client = self.url.connect().await?;
        let logical = self.changelog.is_none();
        if logical {
            let state =
                self.url.bounded("reading the slot's state", slot_state(&self.client, &self.config.slot)).await?;
            if matches!(state, SlotState::Missing | SlotState::Lost) {
                return Err(IngestError::SlotLost { slot: self.config.slot.clone() });
            }
        }
        for state in &mut self.tables {
            state.layer.refresh().await?;
            state.stored = state.layer.position(raw::CDC_APP).await?.map(|v| v as u64);
        }
        if logical {
            // The slot replays from its own confirmed position.
            self.confirmed = Lsn::default();
        }
        self.dirty = false;
        tracing::info!(source = %self.url, "reconnected to the source");
        Ok(())
    }

    /// Wait out a transient failure and reconnect, with exponential backoff (100 ms doubling
    /// to 10 s). Returns the error when it is not transient.
    async fn recover(&mut self, error: IngestError, attempt: &mut u32) -> Result<()> {
        if !error.is_transient() {
            return Err(error);
        }
        loop {
            let backoff = RECONNECT_BASE.saturating_mul(1 << (*attempt).min(7)).min(RECONNECT_MAX);
            *attempt += 1;
            tracing::warn!(%error, attempt = *attempt, backoff_ms = backoff.as_millis() as u64, "source unreachable; reconnecting");
            tokio::time::sleep(backoff).await;
            match self.reconnect().await {
                Ok(()) => {
                    metrics::counter!(telemetry::RECONNECTS).increment(1);
                    return Ok(());
                }
                Err(e) if e.is_transient() => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// Poll until the stream has stored every transaction committed before the call.
    ///
    /// The call first commits a heartbeat (see [`ChangeStream::heartbeat`]); the stream has
    /// caught up once the slot has moved past it.
    pub async fn catch_up(&mut self) -> Result<PollReport> {
        let mut attempt = 0;
        if let Some(changelog) = self.changelog.clone() {
            // Done once every change committed before the call is claimed and committed.
            let target = loop {
                match self.url.bounded("reading the changelog", changelog.last_change(&self.client)).await {
                    Ok(id) => break id,
                    Err(e) => self.recover(e, &mut attempt).await?,
                }
            };
            self.check_capture().await?;
            let mut total = PollReport::default();
            loop {
                match self.poll().await {
                    Ok(report) => total.add(&report),
                    Err(e) => {
                        self.recover(e, &mut attempt).await?;
                        continue;
                    }
                }
                let pending = changelog.pending_upto(&self.client, target);
                match self.url.bounded("reading the changelog", pending).await {
                    Ok(false) => return Ok(total),
                    Ok(true) => {}
                    Err(e) => self.recover(e, &mut attempt).await?,
                }
            }
        }
        let target = loop {
            match self.heartbeat().await {
                Ok(lsn) => break lsn,
                Err(e) => self.recover(e, &mut attempt).await?,
            }
        };
        self.check_capture().await?;
        let mut total = PollReport::default();
        loop {
            let report = match self.poll().await {
                Ok(report) => report,
                Err(e) => {
                    self.recover(e, &mut attempt).await?;
                    continue;
                }
            };
            attempt = 0;
            total.add(&report);
            if report.confirmed > target {
                return Ok(total);
            }
            if report.transactions == 0 && self.config.cdc_mode != CdcMode::Stream {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }

    /// Check that the publication still publishes every replicated table: a table removed from
    /// it mid-stream would otherwise silently stop changing in the warehouse.
    /// [`ChangeStream::catch_up`] checks at its start and [`ChangeStream::run_until`] every
    /// [`IDLE_HEARTBEAT`].
    pub async fn check_publication(&mut self) -> Result<()> {
        // Owned copies: the check awaits, and the table states (with their writers) are not Sync.
        let tables: Vec<SourceTable> = self.tables.iter().map(|t| t.builder.table().clone()).collect();
        let check = unpublished(&self.client, &self.config.publication, tables.iter());
        match self.url.bounded("checking the publication", check).await? {
            Some(table) => Err(IngestError::PublicationChanged { publication: self.config.publication.clone(), table }),
            None => Ok(()),
        }
    }

    /// Check that changes are still captured for every table: the publication when decoding
    /// logically ([`ChangeStream::check_publication`]), the capture triggers with
    /// [`CdcMode::Triggers`] (a dropped or disabled trigger is
    /// [`IngestError::CaptureTriggerMissing`]).
    pub async fn check_capture(&mut self) -> Result<()> {
        let Some(changelog) = &self.changelog else { return self.check_publication().await };
        let tables: Vec<SourceTable> = self.tables.iter().map(|t| t.builder.table().clone()).collect();
        let check = changelog.missing_trigger(&self.client, &tables);
        match self.url.bounded("checking the capture triggers", check).await? {
            Some(table) => Err(IngestError::CaptureTriggerMissing { table }),
            None => Ok(()),
        }
    }

    /// Commit a heartbeat: a transactional logical-decoding message (no table is written) with
    /// synchronous commit, which flushes all WAL before it. Returns the message's LSN. Reading
    /// past it proves every transaction committed before the call was read, and lets an idle
    /// stream advance its slot so the source does not retain WAL.
    pub async fn heartbeat(&mut self) -> Result<Lsn> {
        match write_heartbeat(&self.url, &self.client).await {
            Ok(lsn) => Ok(lsn),
            Err(e) => {
                // A heartbeat cut off half-way leaves its transaction open: start afresh.
                self.dirty = true;
                Err(e)
            }
        }
    }

    /// Poll until `stop` resolves, committing micro-batches as they come. When polling by SQL,
    /// waits `idle_wait` after an empty poll; when streaming, each poll itself waits for data
    /// (up to `flush_interval`). An idle stream writes a heartbeat every [`IDLE_HEARTBEAT`] so
    /// the slot keeps advancing. Transient failures (a restarted server, a terminated backend, a
    /// broken connection) are retried with backoff; `stop` is honoured between polls, so a
    /// micro-batch is never abandoned half-way.
    pub async fn run_until<F: std::future::Future<Output = ()>>(&mut self, idle_wait: Duration, stop: F) -> Result<()> {
        self.run_observed(idle_wait, stop, |_| {}).await
    }

    /// [`ChangeStream::run_until`], telling `observe` about every poll and every transient
    /// failure it retries (for a caller that reports progress, such as `acme::Pipeline`).
    pub async fn run_observed<F, O>(&mut self, idle_wait: Duration, stop: F, mut observe: O) -> Result<()>
    where
        F: std::future::Future<Output = ()>,
        O: FnMut(CaptureEvent<'_>),
    {
        futures::pin_mut!(stop);
        let mut last_activity = Instant::now();
        let mut last_check = Instant::now();
        let mut attempt = 0;
        loop {
            tokio::select! {
                biased;
                _ = &mut stop => return Ok(()),
                _ = std::future::ready(()) => {}
            }
            let started = Instant::now();
            let step = async {
                if last_activity.elapsed() >= IDLE_HEARTBEAT && self.changelog.is_none() {
                    self.heartbeat().await?;
                }
                if last_check.elapsed() >= IDLE_HEARTBEAT {
                    self.check_capture().await?;
                    last_check = Instant::now();
                }
                self.poll().await
            };
            let report = match step.await {
                Ok(report) => report,
                Err(e) => {
                    if e.is_transient() {
                        observe(CaptureEvent::Retrying { error: &e, attempt: attempt + 1 });
                    }
                    tokio::select! {
                        _ = &mut stop => return Ok(()),
                        r = self.recover(e, &mut attempt) => r?,
                    }
                    continue;
                }
            };
            attempt = 0;
            observe(CaptureEvent::Polled(&report));
            // Compaction is housekeeping: a failure is retried after the next rounds.
            match self.finish_background_merge(false).await {
                Ok(report) if report.files_removed > 0 => {
                    tracing::debug!(?report, "raw tables compacted");
                    observe(CaptureEvent::Compacted(&report));
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "compacting the raw tables failed; retrying later"),
            }
            if self.uncompacted_rounds >= COMPACT_EVERY_ROUNDS {
                self.start_background_merge();
            }
            if report.transactions > 0 || last_activity.elapsed() >= IDLE_HEARTBEAT {
                last_activity = Instant::now();
            }
            if report.transactions == 0 && self.config.cdc_mode != CdcMode::Stream {
                let wait = idle_wait.saturating_sub(started.elapsed());
                tokio::select! {
                    _ = &mut stop => return Ok(()),
                    _ = tokio::time::sleep(wait) => {}
                }
            }
        }
    }

    fn apply(
        &mut self,
        cursor: &mut Cursor,
        relation: u32,
        op: Operation,
        new: Option<pgoutput::TupleData<'_>>,
        old: Option<pgoutput::TupleData<'_>>,
    ) -> Result<bool> {
        let Some(t) = cursor.tx.as_mut() else {
            return Err(IngestError::BadMessage { message: "change outside a transaction".into() });
        };
        let seq = t.seq;
        t.seq += 1;
        let Some((i, map)) = self.relations.get(&relation) else { return Ok(false) };
        let state = &mut self.tables[*i];
        if t.skip || state.stored.is_some_and(|s| t.lsn <= s) {
            return Ok(false);
        }
        state.builder.append(t.meta(op, seq), map, new, old)?;
        state.pending_lsn = Some(t.lsn);
        cursor.report.changes_seen += 1;
        Ok(state.builder.rows() >= self.config.batch_rows)
    }

    /// Move full builders into their Parquet writers so memory stays bounded by the batch size.
    async fn spill_full_builders(&mut self) -> Result<()> {
        for state in &mut self.tables {
            if state.builder.rows() >= self.config.batch_rows {
                state.spill(self.config.target_file_bytes).await?;
            }
        }
        Ok(())
    }

    fn stream_error(&self, error: IngestError) -> IngestError {
        let code = error.sqlstate().cloned();
        match (code, error) {
            (Some(SqlState::UNDEFINED_OBJECT), _) => IngestError::SlotLost { slot: self.config.slot.clone() },
            // The slot is still held by a connection the server has not noticed is gone.
            (Some(SqlState::OBJECT_IN_USE), IngestError::Replication { message, .. }) => {
                IngestError::Disconnected { target: self.url.to_string(), message }
            }
            (_, other) => other,
        }
    }

    fn slot_error(&self, source: tokio_postgres::Error) -> IngestError {
        if source.code() == Some(&SqlState::UNDEFINED_OBJECT) {
            IngestError::SlotLost { slot: self.config.slot.clone() }
        } else {
            IngestError::Source { context: format!("reading changes from slot {}", self.config.slot), source }
        }
    }

    /// A slot the server invalidated (it held more WAL than `max_slot_wal_keep_size`) answers
    /// reads with "object not in prerequisite state": tell that apart from the state's other
    /// causes by asking the server for the slot's `wal_status`.
    async fn invalidated_slot(&mut self, error: IngestError) -> IngestError {
        if error.sqlstate() != Some(&SqlState::OBJECT_NOT_IN_PREREQUISITE_STATE) {
            return error;
        }
        match self.url.bounded("looking up the replication slot", slot_state(&self.client, &self.config.slot)).await {
            Ok(SlotState::Lost | SlotState::Missing) => IngestError::SlotLost { slot: self.config.slot.clone() },
            _ => error,
        }
    }
}

/// Count committed change rows per operation in [`telemetry::CHANGES_CAPTURED`].
pub(crate) fn record_captured(table: &str, counts: &[u64; Operation::ALL.len()]) {
    for (op, n) in Operation::ALL.iter().zip(counts).filter(|(_, n)| **n > 0) {
        metrics::counter!(telemetry::CHANGES_CAPTURED, "table" => table.to_string(), "op" => op.as_str()).increment(*n);
    }
}

#[derive(Debug, Clone, Copy)]
struct TxState {
    lsn: u64,
    xid: u32,
    commit_ts_micros: i64,
    seq: i64,
    skip: bool,
}

impl TxState {
    fn meta(&self, op: Operation, seq: i64) -> ChangeMeta {
        ChangeMeta { op, lsn: self.lsn, seq, xid: self.xid, commit_ts_micros: self.commit_ts_micros }
    }
}

enum SlotState {
    Missing,
    Ready,
    Lost,
}

async fn slot_state(client: &Client, slot: &str) -> Result<SlotState> {
    let row = client
        .query_opt(
            "SELECT coalesce(wal_status, ''), plugin::text, coalesce(database::text, ''), current_database()::text \
             FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .map_err(sql(format!("looking up replication slot {slot}")))?;
    Ok(match row {
        None => SlotState::Missing,
        Some(r) if r.get::<_, String>(2) != r.get::<_, String>(3) => {
            return Err(IngestError::SlotUnusable {
                slot: slot.to_string(),
                reason: format!(
                    "belongs to database `{}`, not `{}`: set another slot name (config `slot`, `--slot`)",
                    r.get::<_, String>(2),
                    r.get::<_, String>(3)
                ),
            });
        }
        Some(r) if r.get::<_, String>(0) == "lost" => SlotState::Lost,
        Some(r) if r.get::<_, String>(1) != "pgoutput" => {
            return Err(IngestError::SlotUnusable {
                slot: slot.to_string(),
                reason: format!(
                    "uses plugin {} instead of pgoutput: drop it or choose another slot name (config `slot`, `--slot`)",
                    r.get::<_, String>(1)
                ),
            });
        }
        Some(_) => SlotState::Ready,
    })
}

/// The oldest source server the logical stream works with: pgoutput's `binary` and `messages`
/// options need PostgreSQL 14 (`server_version_num` 140000).
pub const MIN_SERVER_VERSION: i32 = 140000;

async fn check_source(client: &Client) -> Result<()> {
    let row = client
        .query_one(
            "SELECT current_setting('wal_level'), current_user::text, \
             (SELECT rolreplication OR rolsuper FROM pg_roles WHERE rolname = current_user), \
             current_setting('server_version_num')::int, current_setting('server_version')",
            &[],
        )
        .await
        .map_err(sql("checking the source settings"))?;
    let (version, version_text): (i32, String) = (row.get(3), row.get(4));
    if version < MIN_SERVER_VERSION {
        return Err(IngestError::ServerTooOld { version: version_text });
    }
    let wal_level: String = row.get(0);
    if wal_level != "logical" {
        return Err(IngestError::WalLevel { actual: wal_level });
    }
    let user: String = row.get(1);
    if !row.get::<_, bool>(2) {
        return Err(IngestError::NoReplicationPrivilege { user });
    }
    Ok(())
}

async fn ensure_publication(client: &Client, config: &AcmeConfig, tables: &[SourceTable]) -> Result<()> {
    let exists = client
        .query_opt("SELECT 1 FROM pg_publication WHERE pubname = $1", &[&config.publication])
        .await
        .map_err(sql("looking up the publication"))?
        .is_some();
    if !exists {
        let list: Vec<String> = tables.iter().map(|t| t.quoted()).collect();
        // The comment marks it as acme's: `teardown` removes only publications acme created.
        let name = crate::source::quote_ident(&config.publication);
        client
            .batch_execute(&format!(
                "CREATE PUBLICATION {name} FOR TABLE {}; COMMENT ON PUBLICATION {name} IS {}",
                list.join(", "),
                crate::teardown::quote_literal(&crate::teardown::publication_mark(&config.slot)),
            ))
            .await
            .map_err(sql(format!("creating publication {}", config.publication)))?;
    }
    match unpublished(client, &config.publication, tables.iter()).await? {
        Some(table) => Err(IngestError::NotPublished { publication: config.publication.clone(), table }),
        None => Ok(()),
    }
}

/// The first of `tables` that `publication` does not publish (qualified name), if any.
async fn unpublished(
    client: &Client,
    publication: &str,
    tables: impl Iterator<Item = &SourceTable>,
) -> Result<Option<String>> {
    for table in tables {
        let published = client
            .query_opt(
                "SELECT 1 FROM pg_publication_tables WHERE pubname = $1 AND schemaname = $2 AND tablename = $3",
                &[&publication, &table.schema, &table.name],
            )
            .await
            .map_err(sql("reading the publication's tables"))?
            .is_some();
        if !published {
            return Ok(Some(table.qualified()));
        }
    }
    Ok(None)
}
