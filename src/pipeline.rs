//! The pipeline a service embeds: capture, model maintenance and fresh reports, side by side.
//!
//! [`Pipeline::start`] opens the change stream (taking the snapshot when the warehouse has
//! none) and runs, in tasks it owns:
//! - **capture**: the change stream, committing micro-batches to the raw layer (raw-file
//!   compaction runs beside it, see [`ChangeStream::run_until`]). It never waits for the model.
//! - **maintenance**: model builds, on a runtime of their own (one worker thread), so that
//!   their CPU-bound plans do not hold up the stream's task. A build folds the raw changes
//!   after the stored model's position (the tail) into the stored histories and star schema.
//!   The reports do not wait for it: a [`Warehouse`] applies the tail on read
//!   (`acme_model::live`), at a cost that follows the tail. A build rewrites the files that
//!   hold the changed keys, which costs about as much as the table, so it is background
//!   compaction, not the freshness path: it runs when the tail reaches
//!   [`PipelineBuilder::fold_ratio`] of the model's rows (or the model is older than
//!   [`PipelineBuilder::max_model_lag`]), which keeps its cost per change constant at any
//!   table size and the tail each report applies a small fraction of what it reads anyway.
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

/// How often maintenance checks whether a model build is due, by default
/// ([`PipelineBuilder::model_interval`]).
pub const DEFAULT_MODEL_INTERVAL: Duration = Duration::from_secs(2);

/// The tail, as a fraction of the stored model's rows, at which a model build folds it in, by
/// default ([`PipelineBuilder::fold_ratio`]).
pub const DEFAULT_FOLD_RATIO: f64 = 0.05;

/// How long the stored model may trail the raw layer at most, by default
/// ([`PipelineBuilder::max_model_lag`]).
pub const DEFAULT_MAX_MODEL_LAG: Duration = Duration::from_secs(600);

/// What can stop a pipeline.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PipelineError {
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] acme_core::Error),
    /// Capture failed in a way retries cannot mend (the error says what to do).
    #[error(transparent)]
    Ingest(#[from] IngestError),
    /// A model build failed (maintenance retries these; this is returned only by `run_once`).
    #[error(transparent)]
    Model(#[from] ModelError),
    /// The warehouse could not be opened or refreshed.
    #[error(transparent)]
    Query(#[from] QueryError),
    /// `verify` could not compare: the warehouse has not reached the source's position.
    #[error(
        "the warehouse is at position {position}, behind the source at {lsn} ({pending} changes to the tables in \
         between, 0 when a running writer did not catch up in time): run `sync` (or let the running one catch up) \
         and verify again"
    )]
    Behind {
        /// The warehouse's raw position (commit LSN).
        position: i64,
        /// The source position verify read at.
        lsn: String,
        /// Changes between the two that the warehouse's slot still holds.
        pending: u64,
    },
    /// `verify` cannot compare as things are (the message says why and what to do).
    #[error("verify: {0}")]
    Verify(String),
    /// A pipeline task panicked or could not start (a bug in acme).
    #[error("pipeline task `{task}` failed: {message} (a bug in acme, please report it)")]
    Task {
        /// The task.
        task: &'static str,
        /// What happened.
        message: String,
    },
}

/// What an error asks of whoever runs acme, and the exit code the example programs give it
/// (see [`PipelineError::severity`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    /// The source or the storage is unreachable or failed for now: run again later (exit 75,
    /// `EX_TEMPFAIL`).
    Transient,
    /// Something needs an operator first: a missing slot or privilege, a changed publication,
    /// a damaged file, a memory limit too small. The message says what (exit 78, `EX_CONFIG`).
    NeedsOperator,
    /// The command line or the settings are wrong (exit 2, as for a bad command line).
    Usage,
    /// A bug in acme (exit 70, `EX_SOFTWARE`): please report it.
    Bug,
}

impl Severity {
    /// The process exit code for this severity.
    pub fn exit_code(self) -> u8 {
        match self {
            Severity::Transient => 75,
            Severity::NeedsOperator => 78,
            Severity::Usage => 2,
            Severity::Bug => 70,
        }
    }

    /// The severity of a storage or configuration error.
    pub(crate) fn of_storage(error: &acme_core::Error) -> Self {
        use acme_core::Error as E;
        match error {
            E::Config { .. } | E::StorageUrl { .. } => Severity::Usage,
            E::Delta { .. } | E::Query { .. } => Severity::Transient,
            E::Internal(_) | E::Arrow { .. } => Severity::Bug,
            _ => Severity::NeedsOperator,
        }
    }
}

impl Severity {
    /// The severity of a capture error.
    fn of_ingest(error: &IngestError) -> Self {
        if error.is_transient() {
            return Severity::Transient;
        }
        match error {
            IngestError::NoSource
            | IngestError::BadUrl { .. }
            | IngestError::SlotNameChanged { .. }
            | IngestError::PublicationNameChanged { .. } => Severity::Usage,
            IngestError::Storage(e) => Severity::of_storage(e),
            IngestError::Task { .. } | IngestError::Internal(_) | IngestError::Arrow { .. } => Severity::Bug,
            _ => Severity::NeedsOperator,
        }
    }

    /// The severity of a model build error.
    fn of_model(error: &ModelError) -> Self {
        match error {
            ModelError::Core(e) => Severity::of_storage(e),
            ModelError::Internal(_) | ModelError::DataFusion(_) => Severity::Bug,
            _ => Severity::NeedsOperator,
        }
    }

    /// The severity of a query (or warehouse refresh) error.
    fn of_query(error: &QueryError) -> Self {
        match error {
            QueryError::Core(e) => Severity::of_storage(e),
            QueryError::InvalidParameter { .. } | QueryError::BeforeHistory { .. } => Severity::Usage,
            QueryError::MissingTable { .. } => Severity::NeedsOperator,
            _ => Severity::Bug,
        }
    }

    /// The label of the severity in metrics.
    fn label(self) -> &'static str {
        match self {
            Severity::Transient => "transient",
            Severity::NeedsOperator => "needs_operator",
            Severity::Usage => "usage",
            Severity::Bug => "bug",
        }
    }
}

impl PipelineError {
    /// Whether retrying later may succeed, an operator must act first, the settings are wrong,
    /// or acme has a bug.
    pub fn severity(&self) -> Severity {
        match self {
            PipelineError::Config(e) => Severity::of_storage(e),
            PipelineError::Ingest(e) => Severity::of_ingest(e),
            PipelineError::Model(e) => Severity::of_model(e),
            PipelineError::Query(e) => Severity::of_query(e),
            PipelineError::Task { .. } => Severity::Bug,
            PipelineError::Behind { .. } => Severity::Transient,
            PipelineError::Verify(_) => Severity::NeedsOperator,
        }
    }
}

/// Result alias with [`PipelineError`] as the default error type.
pub type Result<T, E = PipelineError> = std::result::Result<T, E>;

/// What a running pipeline reports, through [`Pipeline::status`].
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PipelineStatus {
    /// The replication slot's confirmed position: every change before it is in the raw layer.
    pub confirmed_lsn: Lsn,
    /// The raw layer's position that [`Pipeline::warehouse`] answers at (every report
    /// includes every change up to it).
    pub raw_position: Option<i64>,
    /// The position the stored model covers (model builds fold the raw changes up to it in).
    pub model_position: Option<i64>,
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

/// Builder of a [`Pipeline`].
#[derive(Debug, Clone)]
pub struct PipelineBuilder {
    config: AcmeConfig,
    model_interval: Duration,
    fold: FoldPolicy,
    idle_wait: Duration,
    progress: Option<Arc<SnapshotProgress>>,
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
        let warehouse = Warehouse::open_with_options(&config.storage_url, config.storage_options.clone()).await?;
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
            Maintenance { interval: self.model_interval, fold: self.fold, warehouses: warehouses.clone() },
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
            idle_wait: Duration::from_millis(100),
            progress: None,
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

/// Record an error of `task` (`capture`, `model`, `refresh`) in the status and the metrics.
fn record_error<E: std::fmt::Display + std::fmt::Debug>(
    status: &watch::Sender<PipelineStatus>,
    task: &'static str,
    error: &E,
    severity: Severity,
    retried: bool,
) {
    let kind = telemetry::error_kind(error);
    metrics::counter!(telemetry::ERRORS, "task" => task, "kind" => kind, "severity" => severity.label()).increment(1);
    if retried {
        metrics::counter!(telemetry::RETRIES, "task" => task).increment(1);
    }
    status.send_modify(|s| {
        s.last_error = Some(error.to_string());
        if retried {
            s.retries += 1;
        }
    });
}

/// Resolves once `cancel` holds true (or its sender is gone).
async fn cancelled(mut cancel: watch::Receiver<bool>) {
    let _ = cancel.wait_for(|c| *c).await;
}

async fn capture(
    mut stream: ChangeStream,
    idle_wait: Duration,
    status: Arc<watch::Sender<PipelineStatus>>,
    cancel: watch::Receiver<bool>,
    stop_all: watch::Sender<bool>,
    committed: Arc<Notify>,
) -> Result<()> {
    let result = stream
        .run_observed(idle_wait, cancelled(cancel), |event| match event {
            CaptureEvent::Polled(report) => {
                status.send_modify(|s| {
                    s.polls += 1;
                    s.changes += report.changes;
                    s.confirmed_lsn = report.confirmed;
                });
                if report.tables_committed > 0 {
                    committed.notify_one();
                }
            }
            CaptureEvent::Compacted(report) => {
                tracing::info!(
                    files_removed = report.files_removed,
                    files_added = report.files_added,
                    "raw layer compacted"
                );
                status.send_modify(|s| s.raw_compactions += 1);
            }
            CaptureEvent::Retrying { error, attempt } => {
                tracing::warn!(%error, attempt, "capture retrying");
                record_error(&status, "capture", error, Severity::of_ingest(error), true);
            }
        })
        .await;
    if let Err(error) = &result {
        tracing::error!(%error, "capture stopped");
        record_error(&status, "capture", error, Severity::of_ingest(error), false);
        let _ = stop_all.send(true);
    }
    // Stopped for good, or shut down: either way nothing is captured any more.
    status.send_modify(|s| s.running = false);
    Ok(result?)
}

/// What maintenance needs besides the config.
struct Maintenance {
    interval: Duration,
    fold: FoldPolicy,
    /// The published handles: their file statistics tell how large the tail is.
    warehouses: watch::Receiver<Arc<Warehouse>>,
}

/// Model builds on a runtime of their own (one worker thread), when [`Maintenance::due`].
fn spawn_maintenance(
    config: AcmeConfig,
    maintenance: Maintenance,
    status: Arc<watch::Sender<PipelineStatus>>,
    cancel: watch::Receiver<bool>,
    committed: Arc<Notify>,
) -> Result<oneshot::Receiver<Result<()>>> {
    let (done_tx, done) = oneshot::channel();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("acme-model")
        .enable_all()
        .build()
        .map_err(|e| PipelineError::Task { task: "maintenance", message: e.to_string() })?;
    std::thread::Builder::new()
        .name("acme-model-driver".into())
        .spawn(move || {
            let result = runtime.block_on(maintain(config, maintenance, status, cancel, committed));
            // Abandon a build in flight: its tasks are dropped with the runtime. The Delta log
            // reader runs parts of a build on blocking threads that hand futures back to this
            // runtime and panic if it is gone, so let those finish first (bounded).
            runtime.block_on(settle(&runtime.handle().metrics(), SETTLE_LIMIT));
            runtime.shutdown_background();
            let _ = done_tx.send(result);
        })
        .map_err(|e| PipelineError::Task { task: "maintenance", message: e.to_string() })?;
    Ok(done)
}

/// How long a stopping maintenance runtime waits for in-flight work handed to it.
const SETTLE_LIMIT: Duration = Duration::from_secs(2);

/// Wait until the runtime of `metrics` has had no task alive for a few checks in a row (work
/// that blocking threads handed to it is done), or until `limit` passes.
async fn settle(metrics: &tokio::runtime::RuntimeMetrics, limit: Duration) {
    let started = Instant::now();
    let mut quiet = 0;
    while quiet < 3 && started.elapsed() < limit {
        quiet = if metrics.num_alive_tasks() == 0 { quiet + 1 } else { 0 };
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

impl Maintenance {
    /// Whether a build is due now, given when the last one finished (`None`: none yet in this
    /// run, so a model that is missing or trails the raw layer is built at start). Records the
    /// tail's size in the status.
    fn due(&self, last_build: Option<Instant>, status: &watch::Sender<PipelineStatus>) -> bool {
        let warehouse = Arc::clone(&*self.warehouses.borrow());
        let Some(tail) = warehouse.tail() else { return true };
        status.send_modify(|s| s.tail_changes = tail.changes);
        if tail.changes == 0 {
            return false;
        }
        let Some(last) = last_build else { return true };
        tail.changes as f64 >= self.fold.ratio * tail.model_rows as f64 || last.elapsed() >= self.fold.max_lag
    }
}

async fn maintain(
    config: AcmeConfig,
    maintenance: Maintenance,
    status: Arc<watch::Sender<PipelineStatus>>,
    cancel: watch::Receiver<bool>,
    committed: Arc<Notify>,
) -> Result<()> {
    let mut failures = 0u32;
    let mut last_build: Option<Instant> = None;
    loop {
        let started = Instant::now();
        let wait = if !maintenance.due(last_build, &status) {
            maintenance.interval
        } else {
            let build = tokio::select! {
                _ = cancelled(cancel.clone()) => return Ok(()),
                build = ModelBuild::new(config.clone()).run() => build,
            };
            match build {
                Ok(report) => {
                    failures = 0;
                    last_build = Some(Instant::now());
                    status.send_modify(|s| {
                        s.model_position = Some(report.position);
                        if !report.up_to_date {
                            s.model_builds += 1;
                            s.last_model_build = Some(report.elapsed);
                        }
                    });
                    if !report.up_to_date {
                        metrics::counter!(telemetry::MODEL_STEPS, "step" => "build").increment(1);
                        metrics::histogram!(telemetry::MODEL_STEP_SECONDS, "step" => "build")
                            .record(report.elapsed.as_secs_f64());
                        tracing::debug!(position = report.position, elapsed = ?report.elapsed, "model build");
                        committed.notify_one();
                    }
                    maintenance.interval.saturating_sub(started.elapsed())
                }
                Err(error) => {
                    // Retried with backoff: a full disk, a broken file or a pool too small is
                    // reported in the status until it is mended.
                    tracing::warn!(%error, "model build failed; retrying");
                    record_error(&status, "model", &error, Severity::of_model(&error), true);
                    failures += 1;
                    Duration::from_millis(500).saturating_mul(1 << failures.min(6)).min(Duration::from_secs(30))
                }
            }
        };
        tokio::select! {
            _ = cancelled(cancel.clone()) => return Ok(()),
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

/// Publish a new warehouse handle after each commit round (and at least once a second).
async fn refresh(
    warehouses: watch::Sender<Arc<Warehouse>>,
    status: Arc<watch::Sender<PipelineStatus>>,
    cancel: watch::Receiver<bool>,
    committed: Arc<Notify>,
) {
    let mut last_files = None;
    loop {
        tokio::select! {
            _ = cancelled(cancel.clone()) => return,
            _ = committed.notified() => {}
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
        let current = Arc::clone(&*warehouses.borrow());
        let started = Instant::now();
        let span = tracing::debug_span!("model_step", step = "refresh", from = current.raw_position());
        match current.refreshed().instrument(span).await {
            Ok(Some(newer)) => {
                metrics::counter!(telemetry::MODEL_STEPS, "step" => "refresh").increment(1);
                metrics::histogram!(telemetry::MODEL_STEP_SECONDS, "step" => "refresh")
                    .record(started.elapsed().as_secs_f64());
                if last_files.is_none_or(|at: Instant| at.elapsed() >= FILE_GAUGES_EVERY) {
                    record_layer_files(&newer);
                    last_files = Some(Instant::now());
                }
                tracing::debug!(
                    raw_position = newer.raw_position(),
                    model_position = newer.model_position(),
                    elapsed_ms = started.elapsed().as_millis() as u64,
                    "warehouse refreshed"
                );
                status.send_modify(|s| {
                    s.raw_position = newer.raw_position();
                    s.model_position = s.model_position.max(newer.model_position());
                });
                warehouses.send_replace(Arc::new(newer));
            }
            Ok(None) => {}
            Err(error) => {
                tracing::warn!(%error, "refreshing the warehouse failed; retrying");
                record_error(&status, "refresh", &error, Severity::of_query(&error), true);
            }
        }
    }
}

/// How often the refresh loop counts the published warehouse's files per layer.
const FILE_GAUGES_EVERY: Duration = Duration::from_secs(5);

/// Set the [`telemetry::LAYER_FILES`] and [`telemetry::LAYER_BYTES`] gauges from the data files
/// `warehouse` reads.
fn record_layer_files(warehouse: &Warehouse) {
    let mut per_layer: Vec<(&'static str, u64, u64)> = Vec::new();
    for (layer, files, bytes) in warehouse.data_file_totals() {
        match per_layer.iter_mut().find(|(l, ..)| *l == layer.dir()) {
            Some(entry) => {
                entry.1 += files;
                entry.2 += bytes;
            }
            None => per_layer.push((layer.dir(), files, bytes)),
        }
    }
    for (layer, files, bytes) in per_layer {
        metrics::gauge!(telemetry::LAYER_FILES, "layer" => layer).set(files as f64);
        metrics::gauge!(telemetry::LAYER_BYTES, "layer" => layer).set(bytes as f64);
    }
}

/// The most WAL samples the lag probe keeps (about half an hour's). Older ones are dropped
/// even when the model has not passed them: its lag then reads as of the last sample it passed.
const MAX_LAG_SAMPLES: usize = 4096;

/// Sample the source's WAL position twice a second; the lag is measured against the samples:
/// `lag_seconds` is the age of the newest sample the confirmed position has passed.
async fn lag_probe(config: AcmeConfig, status: Arc<watch::Sender<PipelineStatus>>, cancel: watch::Receiver<bool>) {
    let Some(url) = config.source_url.as_deref() else { return };
    let Ok(url) = SourceUrl::parse(url) else { return };
    let url = url.with_timeout(config.source_timeout);
    let mut client = None;
    let mut samples: VecDeque<(Instant, u64)> = VecDeque::new();
    // The newest sample the confirmed position and the model's position have passed.
    let mut passed: [Option<Instant>; 2] = [None; 2];
    loop {
        tokio::select! {
            _ = cancelled(cancel.clone()) => return,
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
        }
        if client.is_none() {
            client = url.connect().await.ok();
        }
        let Some(c) = &client else { continue };
        let read =
            url.bounded_sql("reading the source's WAL position", c.query_one("SELECT pg_current_wal_lsn()::text", &[]));
        let wal = match read.await.and_then(|row| Ok(Lsn::parse(row.get::<_, &str>(0))?)) {
            Ok(lsn) => lsn.0,
            Err(_) => {
                client = None;
                continue;
            }
        };
        let now = Instant::now();
        samples.push_back((now, wal));
        let (confirmed, model) = {
            let s = status.borrow();
            let confirmed = s.confirmed_lsn.0;
            // With no raw change after it, the stored model holds all the raw layer does.
            let model = s.model_position.map(|p| if s.tail_changes == 0 { confirmed } else { p.max(0) as u64 });
            (confirmed, model)
        };
        // Every commit made before a sample a position has passed is held at that position.
        for (passed, position) in passed.iter_mut().zip([Some(confirmed), model]) {
            let Some(position) = position else { continue };
            if let Some((at, _)) = samples.iter().take_while(|(_, lsn)| *lsn <= position).last() {
                *passed = Some(*at);
            }
        }
        let lowest = model.map_or(confirmed, |m| m.min(confirmed));
        while samples.front().is_some_and(|(_, lsn)| *lsn <= lowest) || samples.len() > MAX_LAG_SAMPLES {
            samples.pop_front();
        }
        let lag_bytes = |position: u64| i64::try_from(wal.saturating_sub(position)).unwrap_or(i64::MAX);
        let lag_seconds = |passed: Option<Instant>| passed.map(|at| now.duration_since(at).as_secs_f64());
        for (layer, position, passed) in [("raw", Some(confirmed), passed[0]), ("model", model, passed[1])] {
            if let Some(position) = position {
                metrics::gauge!(telemetry::LAG_BYTES, "layer" => layer).set(lag_bytes(position) as f64);
            }
            if let Some(seconds) = lag_seconds(passed) {
                metrics::gauge!(telemetry::LAG_SECONDS, "layer" => layer).set(seconds);
            }
        }
        status.send_modify(|s| {
            s.lag_bytes = Some(lag_bytes(confirmed));
            s.lag_seconds = lag_seconds(passed[0]);
        });
    }
}
