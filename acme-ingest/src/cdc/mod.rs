//! Change data capture into the raw layer, exactly once.
//!
//! Where each part lives:
//! - `open`: checks the source (wal_level, REPLICATION privilege, REPLICA IDENTITY
//!   FULL, publication, or the capture triggers), creates the replication slot if needed
//!   *before* the snapshot, and runs the snapshot if the raw layer has none;
//! - `source`: the `ChangeSource` trait and its contract (order, duplicates, when a
//!   position may be confirmed), implemented by `logical` (pgoutput streamed over the
//!   replication protocol, the default, or read by SQL with [`CdcMode::SqlPoll`]) and
//!   `changelog` (the trigger fallback, [`CdcMode::Triggers`]);
//! - `sink`: the raw tables' state, schema evolution, the commit round and the scheduling of
//!   small-file merges;
//! - this module: [`ChangeStream`], the driver. Each [`ChangeStream::poll`] lets the source read
//!   a micro-batch into the sink, commits each raw table once with a Delta `txn` action
//!   carrying the commit LSN of the last transaction it holds, and only after those commits
//!   are durable lets the source confirm its position.
//!
//! After a crash the source replays from its last confirmed position and every table skips the
//! transactions its own stored position already covers: nothing is written twice and nothing
//! is skipped. A broken connection, a terminated walsender or a restarted server is a transient
//! error: [`ChangeStream::run_until`] and [`ChangeStream::catch_up`] reconnect with exponential
//! backoff and resume from the raw layer's position. A dropped or invalidated slot is not: it
//! stops with [`IngestError::SlotLost`], which says how to re-sync.
//!
//! The snapshot-to-stream handoff is exact: the slot exists before the snapshot is taken, and
//! transactions the snapshot already saw are recognised by the snapshot's `xmin:xmax:xip`
//! visibility list and skipped.

mod changelog;
mod logical;
mod open;
mod sink;
mod source;

use std::sync::Arc;
use std::time::{Duration, Instant};

use acme_core::telemetry;
use acme_core::{AcmeConfig, CdcMode, CompactReport, Lsn};
use tracing::Instrument;

use crate::error::{IngestError, Result};
use crate::snapshot::{SnapshotPoint, SnapshotProgress};
use crate::source::SourceUrl;
use sink::RawSink;
use source::{ChangeSource, Link};

pub use open::MIN_SERVER_VERSION;
pub(crate) use sink::record_captured;

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
///
/// Few, because every raw table's small files cost on each commit and each refresh: delta-rs
/// re-materialises a table's whole file list after every commit (so a commit's CPU follows the
/// active files, not its one new file), and a refresh lists the raw files and reads their
/// statistics. Under the SF1 live workload (freshness bench, two runs each) merging every 10
/// rounds instead of 50 took a micro-batch's commit from 53-64 ms to 41-46 ms at the median,
/// the refresh's star work from 194-211 ms to 130-149 ms, and the reports' p50 freshness from
/// 611-664 ms to 426-476 ms; the process held about 30 MiB more at the median.
pub const COMPACT_EVERY_ROUNDS: u32 = 10;

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

/// First reconnect delay; doubled per failed attempt.
const RECONNECT_BASE: Duration = Duration::from_millis(100);
/// Longest reconnect delay.
const RECONNECT_MAX: Duration = Duration::from_secs(10);

/// A running change stream from one source into one warehouse: a small driver over a
/// capture method (a `ChangeSource`: logical streaming, SQL polling or the trigger
/// changelog) and the raw tables it fills (a `RawSink`).
pub struct ChangeStream {
    config: AcmeConfig,
    link: Link,
    sink: RawSink,
    source: Box<dyn ChangeSource>,
    snapshot: SnapshotPoint,
    /// The position the source confirmed last (its polls start after it).
    confirmed: Lsn,
    /// A poll did not finish: uncommitted decoded state must be dropped before the next one.
    dirty: bool,
}

impl std::fmt::Debug for ChangeStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChangeStream").field("source", &self.link.url).field("slot", &self.config.slot).finish()
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
        let opened = open::bootstrap(&config, progress).await?;
        let sink =
            RawSink::new(opened.storage, opened.sources, opened.layers, config.batch_rows, config.target_file_bytes)
                .await?;
        let snapshot = opened.snapshot;
        let slot = || logical::Slot {
            name: config.slot.clone(),
            publication: config.publication.clone(),
            confirmed: Lsn::default(),
        };
        let source: Box<dyn ChangeSource> = match (config.cdc_mode, opened.changelog) {
            (CdcMode::Triggers, Some(changelog)) => Box::new(changelog::TriggerCapture {
                changelog,
                base: snapshot.lsn,
                max_batch_changes: config.max_batch_changes,
                claimed: None,
            }),
            (CdcMode::Triggers, None) => {
                return Err(IngestError::Internal("trigger capture opened without a changelog".into()));
            }
            (CdcMode::SqlPoll, _) => Box::new(logical::Logical {
                slot: slot(),
                decoder: logical::Decoder::new(snapshot.clone()),
                transport: logical::Polled { max_batch_changes: config.max_batch_changes, to_confirm: None },
            }),
            (CdcMode::Stream, _) => Box::new(logical::Logical {
                slot: slot(),
                decoder: logical::Decoder::new(snapshot.clone()),
                transport: logical::Streamed {
                    stream: None,
                    max_batch_changes: config.max_batch_changes,
                    flush_interval: config.flush_interval,
                    to_confirm: 0,
                },
            }),
        };
        let link = Link { url: opened.url, client: opened.client };
        Ok(Self { config, link, sink, source, snapshot, confirmed: Lsn::default(), dirty: false })
    }

    /// The snapshot point the stream started from.
    pub fn snapshot_point(&self) -> &SnapshotPoint {
        &self.snapshot
    }

    /// Bytes of WAL the slot still retains for acme (`pg_current_wal_lsn() - confirmed_flush_lsn`).
    /// With [`CdcMode::Triggers`]: the bytes the changelog table holds instead.
    pub async fn slot_lag_bytes(&self) -> Result<i64> {
        self.source.lag_bytes(&self.link).await
    }

    /// Read every change committed up to now (bounded by `max_batch_changes` per poll and, when
    /// streaming, by `flush_interval`), commit it to the raw layer, then confirm it to the
    /// source.
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

    /// [`ChangeStream::poll`]'s work: read, commit, and only then confirm.
    async fn poll_once(&mut self) -> Result<PollReport> {
        if self.dirty {
            self.reconnect().await?;
        }
        self.dirty = true;
        let started = Instant::now();
        let mut report = match self.source.read(&self.link, &mut self.sink).await {
            Ok(report) => report,
            Err(error) => return Err(self.source.explain(&self.link, error).await),
        };
        let decoded = started.elapsed();
        self.sink.commit_round(&mut report).await?;
        if report.tables_committed > 0 {
            acme_core::failpoint::hit("cdc.committed");
        }
        tracing::debug!(
            decode_ms = decoded.as_millis() as u64,
            commit_ms = (started.elapsed() - decoded).as_millis() as u64,
            transactions = report.transactions,
            changes = report.changes,
            "micro-batch committed"
        );
        report.confirmed = match self.source.confirm(&self.link, self.sink.complete_position()).await {
            Ok(confirmed) => confirmed,
            Err(error) => return Err(self.source.explain(&self.link, error).await),
        };
        self.confirmed = report.confirmed;
        self.dirty = false;
        Ok(report)
    }

    /// Merge the small files that micro-batches leave in the raw tables into larger files
    /// sorted by commit LSN and position (see [`acme_core::compact`]). The rows, and every
    /// version readers may hold, stay the same; the raw manifest then names the compacted
    /// versions. [`ChangeStream::run_until`] merges every [`COMPACT_EVERY_ROUNDS`] rounds,
    /// beside the stream.
    pub async fn compact(&mut self) -> Result<CompactReport> {
        self.sink.compact().await
    }

    /// After a transient failure: drop everything decoded but not committed, reconnect, and
    /// resume from what the raw layer holds (the source replays the rest).
    pub async fn reconnect(&mut self) -> Result<()> {
        self.link.client = self.link.url.connect().await?;
        self.sink.reset().await?;
        self.source.reset(&self.link, self.sink.complete_position()).await?;
        self.dirty = false;
        tracing::info!(source = %self.link.url, "reconnected to the source");
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
    /// The call first marks "now" at the source (logical decoding commits a heartbeat, see
    /// [`ChangeStream::heartbeat`]; the trigger fallback notes the last change id), then polls
    /// until everything before the mark is committed.
    pub async fn catch_up(&mut self) -> Result<PollReport> {
        let mut attempt = 0;
        let mark = loop {
            match self.source.mark(&self.link).await {
                Ok(mark) => break mark,
                Err(e) => {
                    // A heartbeat cut off half-way leaves its transaction open: start afresh.
                    self.dirty = true;
                    self.recover(e, &mut attempt).await?;
                }
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
            total.add(&report);
            match self.source.caught_up(&self.link, mark, &report).await {
                Ok(true) => return Ok(total),
                Ok(false) => {}
                Err(e) => {
                    self.recover(e, &mut attempt).await?;
                    continue;
                }
            }
            attempt = 0;
            if report.transactions == 0 && !self.source.waits_for_data() {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }

    /// Check that changes are still captured for every table: the publication when decoding
    /// logically (a table removed from it is [`IngestError::PublicationChanged`]), the capture
    /// triggers with [`CdcMode::Triggers`] (a dropped or disabled trigger is
    /// [`IngestError::CaptureTriggerMissing`]). [`ChangeStream::catch_up`] checks at its start
    /// and [`ChangeStream::run_until`] every [`IDLE_HEARTBEAT`].
    pub async fn check_capture(&mut self) -> Result<()> {
        // Owned copies: the check awaits, and the sink (with its writers) is not Sync.
        let tables = self.sink.source_tables();
        self.source.check(&self.link, &tables).await
    }

    /// Commit a heartbeat: a transactional logical-decoding message (no table is written) with
    /// synchronous commit, which flushes all WAL before it. Returns the message's LSN. Reading
    /// past it proves every transaction committed before the call was read, and lets an idle
    /// stream advance its slot so the source does not retain WAL.
    pub async fn heartbeat(&mut self) -> Result<Lsn> {
        match write_heartbeat(&self.link.url, &self.link.client).await {
            Ok(lsn) => Ok(lsn),
            Err(e) => {
                // A heartbeat cut off half-way leaves its transaction open: start afresh.
                self.dirty = true;
                Err(e)
            }
        }
    }

    /// Poll until `stop` resolves, committing micro-batches as they come. When polling by SQL
    /// or the changelog, waits `idle_wait` after an empty poll; when streaming, each poll
    /// itself waits for data (up to `flush_interval`). An idle logical stream writes a
    /// heartbeat every [`IDLE_HEARTBEAT`] so the slot keeps advancing. Transient failures (a
    /// restarted server, a terminated backend, a broken connection) are retried with backoff;
    /// `stop` is honoured between polls, so a micro-batch is never abandoned half-way.
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
                if last_activity.elapsed() >= IDLE_HEARTBEAT && self.source.needs_heartbeat() {
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
            match self.sink.finish_background_merge(false).await {
                Ok(report) if report.files_removed > 0 => {
                    tracing::debug!(?report, "raw tables compacted");
                    observe(CaptureEvent::Compacted(&report));
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "compacting the raw tables failed; retrying later"),
            }
            if self.sink.merge_due(COMPACT_EVERY_ROUNDS) {
                self.sink.start_background_merge();
            }
            if report.transactions > 0 || last_activity.elapsed() >= IDLE_HEARTBEAT {
                last_activity = Instant::now();
            }
            if report.transactions == 0 && !self.source.waits_for_data() {
                let wait = idle_wait.saturating_sub(started.elapsed());
                tokio::select! {
                    _ = &mut stop => return Ok(()),
                    _ = tokio::time::sleep(wait) => {}
                }
            }
        }
    }
}
