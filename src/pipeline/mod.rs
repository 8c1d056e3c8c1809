//! The pipeline a service embeds: capture, model maintenance and fresh reports, side by side.
//!
//! [`Pipeline::start`] opens the change stream (taking the snapshot when the warehouse has
//! none) and runs, in tasks it owns:
//! - **capture**: the change stream, committing micro-batches to the raw layer (raw-file
//!   compaction runs beside it, see [`ChangeStream::run_until`]). It never waits for the model.
//! - **maintenance**: model builds, on a runtime of their own (one worker thread), so that
//!   their CPU-bound plans do not hold up the stream's task (on Linux, optionally at a lower
//!   scheduling priority: [`PipelineBuilder::maintenance_niceness`]). A build folds the raw
//!   changes after the stored model's position (the tail) into the stored histories and star
//!   schema.
//!   The reports do not wait for it: a [`Warehouse`] applies the tail on read
//!   (`acme_model::live`), at a cost that follows the tail. A build rewrites the files that
//!   hold the changed keys, which costs about as much as the table, so it is background
//!   compaction, not the freshness path: it runs when the tail reaches
//!   [`PipelineBuilder::fold_ratio`] of the model's rows (or the model is older than
//!   [`PipelineBuilder::max_model_lag`]), which keeps its cost per change constant at any
//!   table size and the tail each report applies a small fraction of what it reads anyway,
//!   and in any case once the tail reaches half of what a handle holds in memory
//!   ([`Warehouse::tail_limit`]), so that refreshes keep extending the tail in memory.
//! - **refresh**: a new [`Warehouse`] handle after every commit round of either writer,
//!   published for [`Pipeline::warehouse`].
//! - **lag probe** (logical decoding only): the source's WAL position twice a second, for the
//!   lag figures of [`PipelineStatus`].
//!
//! ```no_run
//! # async fn demo() -> Result<(), acme::PipelineError> {
//! let config = acme::core::AcmeConfig::builder()
//!     .source_url("postgres://postgres@127.0.0.1:5432/finance_db")
//!     .storage_url("/var/lib/acme/warehouse")
//!     .build()?;
//! let pipeline = acme::Pipeline::builder(config).start().await?;
//! let top = pipeline.warehouse().top_delivery_dates(3, None).await?;
//! println!("{top:?}; lag {:?} s", pipeline.status().borrow().lag_seconds);
//! pipeline.shutdown().await?;
//! # Ok(()) }
//! ```

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use acme_core::{AcmeConfig, telemetry};
use acme_ingest::{CaptureEvent, ChangeStream, IngestError, Lsn, SnapshotProgress, SourceUrl};
use acme_model::{ModelBuild, ModelError};
use acme_query::{QueryError, Warehouse};
use tokio::sync::{Notify, oneshot, watch};
use tokio::task::JoinHandle;
use tracing::Instrument;

mod error;
mod tasks;

pub use error::{PipelineError, Result, Severity};
use tasks::*;

/// How often maintenance checks whether a model build is due, by default
/// ([`PipelineBuilder::model_interval`]).
pub const DEFAULT_MODEL_INTERVAL: Duration = Duration::from_secs(2);

/// The tail, as a fraction of the stored model's rows, at which a model build folds it in, by
/// default ([`PipelineBuilder::fold_ratio`]).
pub const DEFAULT_FOLD_RATIO: f64 = 0.05;

/// How long the stored model may trail the raw layer at most, by default
/// ([`PipelineBuilder::max_model_lag`]).
pub const DEFAULT_MAX_MODEL_LAG: Duration = Duration::from_secs(600);

/// What a running pipeline reports, through [`Pipeline::status`].
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PipelineStatus {
    /// The replication slot's confirmed position: every change before it is in the raw layer.
    pub confirmed_lsn: Lsn,
    /// The raw layer's position that [`Pipeline::warehouse`] answers at (every report
    /// includes every change up to it).
    pub raw_position: Option<Lsn>,
    /// The position the stored model covers (model builds fold the raw changes up to it in).
    pub model_position: Option<Lsn>,
    /// Bytes of WAL written at the source but not yet confirmed (logical decoding only).
    pub lag_bytes: Option<i64>,
    /// How old the warehouse's data may be: every source commit made more than this many
    /// seconds ago is in the reports (logical decoding only; measured twice a second).
    pub lag_seconds: Option<f64>,
    /// Polls of the change stream.
    pub polls: u64,
    /// Change rows committed to the raw layer since start.
    pub changes: u64,
    /// Merges of the raw layer's small files committed since start.
    pub raw_compactions: u64,
    /// Model builds since start that folded raw changes into the stored model.
    pub model_builds: u64,
    /// Raw changes after the stored model's position, which every report applies on read
    /// (as the newest warehouse handle counted them when maintenance last checked).
    pub tail_changes: u64,
    /// Wall time of the last model build that changed the model.
    pub last_model_build: Option<Duration>,
    /// Transient failures retried since start (capture reconnects, failed model builds,
    /// failed refreshes).
    pub retries: u64,
    /// The last error seen, retried or not.
    pub last_error: Option<String>,
    /// False once the pipeline stopped (shut down, or capture failed for good).
    pub running: bool,
}

/// The niceness of the maintenance threads, by default
/// ([`PipelineBuilder::maintenance_niceness`]): the process's own priority.
pub const DEFAULT_MAINTENANCE_NICENESS: i32 = 0;

/// Builder of a [`Pipeline`].
#[derive(Debug, Clone)]
pub struct PipelineBuilder {
    config: AcmeConfig,
    model_interval: Duration,
    fold: FoldPolicy,
    niceness: i32,
    idle_wait: Duration,
    progress: Option<Arc<SnapshotProgress>>,
    tail_limit: u64,
}

/// When maintenance folds the tail into the stored model.
#[derive(Debug, Clone, Copy)]
struct FoldPolicy {
    ratio: f64,
    max_lag: Duration,
}

impl PipelineBuilder {
    /// How often maintenance checks whether a model build is due (default 2 s).
    pub fn model_interval(mut self, interval: Duration) -> Self {
        self.model_interval = interval;
        self
    }

    /// Fold the tail (the raw changes after the stored model's position, which every report
    /// applies on read) into the stored model once it holds this fraction of the model's rows
    /// (default [`DEFAULT_FOLD_RATIO`]). A build costs about as much as the model, so a ratio
    /// keeps its cost per change the same at any table size; a larger ratio spends less CPU on
    /// builds and more on each report. `0.0` builds whenever there is a tail, every
    /// [`PipelineBuilder::model_interval`]. Negative or non-finite values count as `0.0`.
    /// Whatever the ratio, the tail is folded once it reaches half the tail a handle holds in
    /// memory ([`Warehouse::tail_limit`]): past that, each refresh recomputes it from the raw
    /// files.
    pub fn fold_ratio(mut self, ratio: f64) -> Self {
        self.fold.ratio = if ratio.is_finite() { ratio.max(0.0) } else { 0.0 };
        self
    }

    /// Fold the tail, however small, once the stored model is this old (default 10 min): the
    /// bound on how far readers of the stored layers (outside readers of the presentation
    /// tables, `model.<table>`) trail the reports.
    pub fn max_model_lag(mut self, lag: Duration) -> Self {
        self.fold.max_lag = lag;
        self
    }

    /// Hold at most this many tail changes in memory per warehouse handle (default
    /// [`acme_query::MAX_MATERIALIZED_TAIL`], see [`Warehouse::tail_limit`]); maintenance folds
    /// the tail in once it reaches half of it. A lower limit holds less memory and folds more
    /// often.
    pub fn tail_limit(mut self, changes: u64) -> Self {
        self.tail_limit = changes;
        self
    }

    /// Run model maintenance (the builds that fold the tail into the stored model) at this
    /// niceness, from 0 (the process's own priority) to 19 (the lowest); default
    /// [`DEFAULT_MAINTENANCE_NICENESS`]. Linux only; elsewhere the setting is ignored.
    ///
    /// A fold takes a core for seconds at SF1 and minutes at SF10. Where the source, the
    /// capture and the refreshes share the machine's cores with it, the reports wait behind
    /// it; at a lower priority it takes the CPU they leave. That suits bursts of load: a fold
    /// that takes longer lets the tail grow meanwhile, and under sustained load on cores that
    /// are busy anyway the folds fall behind the tail, which then outgrows what a handle holds
    /// in memory and every refresh slows down (bench-report.md, twentieth figures: at SF1 on 2
    /// cores, niceness 10 cut the reports' median over one minute and multiplied their p99 by
    /// five over five). Hence the default of 0. A niceness below the process's own is not
    /// applied (raising a priority needs privileges).
    pub fn maintenance_niceness(mut self, niceness: i32) -> Self {
        self.niceness = niceness.clamp(0, 19);
        self
    }

    /// Wait after an empty poll when polling by SQL or triggers (default 100 ms; streaming
    /// waits for data itself).
    pub fn idle_wait(mut self, wait: Duration) -> Self {
        self.idle_wait = wait;
        self
    }

    /// Report the snapshot's progress (when one runs at start) into `progress`.
    pub fn snapshot_progress(mut self, progress: Arc<SnapshotProgress>) -> Self {
        self.progress = Some(progress);
        self
    }

    /// Catch up once instead of running: open the stream (snapshot if needed), commit every
    /// change committed at the source before the call, build the model, and return a handle
    /// on the result.
    pub async fn run_once(self) -> Result<(acme_ingest::PollReport, acme_model::ModelReport, Warehouse)> {
        let mut stream = ChangeStream::open_with_progress(self.config.clone(), self.progress).await?;
        let caught_up = stream.catch_up().await?;
        let model = ModelBuild::new(self.config.clone()).await?;
        let warehouse =
            Warehouse::open_with_options(&self.config.storage_url, self.config.storage_options.clone()).await?;
        Ok((caught_up, model, warehouse))
    }

    /// Open the change stream (taking the snapshot when the warehouse has none), start every
    /// task, and return once the warehouse has a model to answer from.
    pub async fn start(self) -> Result<Pipeline> {
        let config = self.config;
        let stream = ChangeStream::open_with_progress(config.clone(), self.progress).await?;
        let warehouse =
            Warehouse::open_with_tail_limit(&config.storage_url, config.storage_options.clone(), self.tail_limit)
                .await?;
        let initial = PipelineStatus {
            confirmed_lsn: Lsn(stream.snapshot_point().lsn),
            raw_position: warehouse.raw_position(),
            model_position: warehouse.model_position(),
            running: true,
            ..PipelineStatus::default()
        };
        let (status_tx, status) = watch::channel(initial);
        let (warehouse_tx, warehouses) = watch::channel(Arc::new(warehouse));
        let (cancel_tx, cancel) = watch::channel(false);
        let committed = Arc::new(Notify::new());
        let status_tx = Arc::new(status_tx);

        let capture = tokio::spawn(capture(
            stream,
            self.idle_wait,
            Arc::clone(&status_tx),
            cancel.clone(),
            cancel_tx.clone(),
            Arc::clone(&committed),
        ));
        let maintenance = spawn_maintenance(
            config.clone(),
            Maintenance {
                interval: self.model_interval,
                fold: self.fold,
                niceness: self.niceness,
                warehouses: warehouses.clone(),
            },
            Arc::clone(&status_tx),
            cancel.clone(),
            Arc::clone(&committed),
        )?;
        let refresh = tokio::spawn(refresh(warehouse_tx, Arc::clone(&status_tx), cancel.clone(), committed));
        let probe = match &config.cdc_mode {
            acme_core::CdcMode::Triggers => None,
            _ => Some(tokio::spawn(lag_probe(config.clone(), Arc::clone(&status_tx), cancel.clone()))),
        };
        let pipeline = Pipeline {
            config,
            status,
            warehouses,
            cancel: cancel_tx,
            capture: Owned(Some(capture)),
            maintenance,
            refresh: Owned(Some(refresh)),
            probe: Owned(probe),
        };
        // Ready once the published warehouse has a model (or the pipeline stopped). No lock of
        // a watch is held past the `select!`, since shutting down sends on them.
        let mut ready = pipeline.warehouses.clone();
        let mut stopped = pipeline.status.clone();
        let has_model = tokio::select! {
            r = ready.wait_for(|w| w.model_position().is_some()) => r.is_ok(),
            r = stopped.wait_for(|s| !s.running) => {
                drop(r);
                false
            }
        };
        if !has_model {
            return Err(pipeline.shutdown().await.err().unwrap_or(PipelineError::Task {
                task: "start",
                message: "the pipeline stopped before its first model was built".into(),
            }));
        }
        Ok(pipeline)
    }
}

/// A running pipeline: capture, model maintenance and warehouse refresh in tasks it owns.
/// Dropping it without [`Pipeline::shutdown`] aborts the tasks (each step is crash-safe, so
/// nothing committed is lost; the next start resumes).
#[derive(Debug)]
pub struct Pipeline {
    config: AcmeConfig,
    status: watch::Receiver<PipelineStatus>,
    warehouses: watch::Receiver<Arc<Warehouse>>,
    cancel: watch::Sender<bool>,
    capture: Owned<Result<()>>,
    maintenance: oneshot::Receiver<Result<()>>,
    refresh: Owned<()>,
    probe: Owned<()>,
}

/// A task the pipeline owns: aborted when dropped, unless joined first.
#[derive(Debug)]
struct Owned<T>(Option<JoinHandle<T>>);

impl<T> Owned<T> {
    /// Wait for the task to end (`None` when there is none).
    async fn join(mut self) -> Option<std::result::Result<T, tokio::task::JoinError>> {
        match self.0.take() {
            Some(handle) => Some(handle.await),
            None => None,
        }
    }
}

impl<T> Drop for Owned<T> {
    fn drop(&mut self) {
        if let Some(handle) = &self.0 {
            handle.abort();
        }
    }
}

impl Pipeline {
    /// A builder over `config`.
    pub fn builder(config: AcmeConfig) -> PipelineBuilder {
        PipelineBuilder {
            config,
            model_interval: DEFAULT_MODEL_INTERVAL,
            fold: FoldPolicy { ratio: DEFAULT_FOLD_RATIO, max_lag: DEFAULT_MAX_MODEL_LAG },
            niceness: DEFAULT_MAINTENANCE_NICENESS,
            idle_wait: Duration::from_millis(100),
            progress: None,
            tail_limit: acme_query::MAX_MATERIALIZED_TAIL,
        }
    }

    /// The pipeline's status, updated as it runs.
    pub fn status(&self) -> watch::Receiver<PipelineStatus> {
        self.status.clone()
    }

    /// The newest consistent warehouse handle (cheap: an `Arc` clone). Queries on it see one
    /// commit round of each writer, however long they run.
    pub fn warehouse(&self) -> Arc<Warehouse> {
        Arc::clone(&*self.warehouses.borrow())
    }

    /// Every newer warehouse handle, as the pipeline publishes them.
    pub fn warehouses(&self) -> watch::Receiver<Arc<Warehouse>> {
        self.warehouses.clone()
    }

    /// A warehouse handle that holds every change committed at the source before the call:
    /// commits a heartbeat at the source ([`acme_ingest::cdc::write_heartbeat`]), waits until
    /// the slot's confirmed position passes it, then returns the newest handle. Logical decoding only (with
    /// [`acme_core::CdcMode::Triggers`] there is no WAL position to wait for).
    pub async fn caught_up(&self) -> Result<Arc<Warehouse>> {
        if self.config.cdc_mode == acme_core::CdcMode::Triggers {
            return Err(PipelineError::Task {
                task: "caught_up",
                message: "waiting for a WAL position needs logical decoding, not the trigger fallback".into(),
            });
        }
        let url = SourceUrl::parse(self.config.source_url.as_deref().ok_or(IngestError::NoSource)?)?
            .with_timeout(self.config.source_timeout);
        let client = url.connect().await?;
        // Not `pg_current_wal_lsn()`: with asynchronous commit a transaction that has committed
        // may end past the WAL written so far, and the slot could pass that position first.
        let target = acme_ingest::cdc::write_heartbeat(&url, &client).await?;
        let mut status = self.status.clone();
        let reached = status.wait_for(|s| s.confirmed_lsn > target || !s.running).await.map(|s| s.running);
        if !reached.unwrap_or(false) {
            let error = self.status.borrow().last_error.clone().unwrap_or_else(|| "shut down".into());
            return Err(PipelineError::Task { task: "caught_up", message: format!("the pipeline stopped: {error}") });
        }
        // The raw layer commits before the slot confirms: a handle opened now holds the target.
        let current = self.warehouse();
        Ok(match current.refreshed().await? {
            Some(newer) => Arc::new(newer),
            None => current,
        })
    }

    /// Resolves when the pipeline stops by itself (capture failed for good; the status's
    /// `last_error` says why). Call [`Pipeline::shutdown`] then for the error.
    pub async fn stopped(&self) {
        let mut status = self.status.clone();
        let _ = status.wait_for(|s| !s.running).await;
    }

    /// Stop: capture finishes the poll in flight (committing it, or leaving it for the next
    /// start), a model build in flight is abandoned (the stored model and its manifest stay as
    /// the last complete build left them; the next build resumes), and every task ends.
    /// Returns the error that stopped the pipeline, if one did.
    pub async fn shutdown(self) -> Result<()> {
        let _ = self.cancel.send(true);
        let captured = match self.capture.join().await {
            Some(Ok(result)) => result,
            Some(Err(e)) => Err(PipelineError::Task { task: "capture", message: e.to_string() }),
            None => Ok(()),
        };
        let maintained = self.maintenance.await.unwrap_or_else(|_| {
            Err(PipelineError::Task { task: "maintenance", message: "its thread ended without a result".into() })
        });
        self.refresh.join().await;
        self.probe.join().await;
        captured.and(maintained)
    }
}
