//! The tasks a pipeline owns: capture, maintenance (model builds), refresh of the shared
//! warehouse handle, and the lag probe.

use super::*;

/// Record an error of `task` (`capture`, `model`, `refresh`) in the status and the metrics.
pub(super) fn record_error<E: std::fmt::Display + std::fmt::Debug>(
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
pub(super) async fn cancelled(mut cancel: watch::Receiver<bool>) {
    let _ = cancel.wait_for(|c| *c).await;
}

pub(super) async fn capture(
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
pub(super) struct Maintenance {
    pub(super) interval: Duration,
    pub(super) fold: FoldPolicy,
    /// The niceness of the maintenance threads ([`PipelineBuilder::maintenance_niceness`]).
    pub(super) niceness: i32,
    /// The published handles: their file statistics tell how large the tail is.
    pub(super) warehouses: watch::Receiver<Arc<Warehouse>>,
}

/// Model builds on a runtime of their own (one worker thread, and the blocking threads the
/// Delta log reader and the Parquet files use), when [`Maintenance::due`]; every thread of it
/// at the maintenance niceness.
pub(super) fn spawn_maintenance(
    config: AcmeConfig,
    maintenance: Maintenance,
    status: Arc<watch::Sender<PipelineStatus>>,
    cancel: watch::Receiver<bool>,
    committed: Arc<Notify>,
) -> Result<oneshot::Receiver<Result<()>>> {
    let (done_tx, done) = oneshot::channel();
    let niceness = maintenance.niceness;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("acme-model")
        .on_thread_start(move || lower_priority(niceness))
        .enable_all()
        .build()
        .map_err(|e| PipelineError::Task { task: "maintenance", message: e.to_string() })?;
    std::thread::Builder::new()
        .name("acme-model-driver".into())
        .spawn(move || {
            lower_priority(niceness);
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

/// Lower the calling thread's scheduling priority to `niceness` (Linux; a thread's niceness is
/// its own there). Not below its current priority: that needs privileges.
fn lower_priority(niceness: i32) {
    #[cfg(target_os = "linux")]
    {
        let thread = Some(rustix::thread::gettid());
        let current = rustix::process::getpriority_process(thread).unwrap_or(0);
        if niceness > current
            && let Err(error) = rustix::process::setpriority_process(thread, niceness)
        {
            tracing::warn!(%error, niceness, "maintenance runs at the process's priority: setpriority failed");
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = niceness;
}

/// How long a stopping maintenance runtime waits for in-flight work handed to it.
pub(super) const SETTLE_LIMIT: Duration = Duration::from_secs(2);

/// Wait until the runtime of `metrics` has had no task alive for a few checks in a row (work
/// that blocking threads handed to it is done), or until `limit` passes.
pub(super) async fn settle(metrics: &tokio::runtime::RuntimeMetrics, limit: Duration) {
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
        // A newer model is stored than the published handle reads (the first handle on it is
        // being made): that handle's tail is not the stored model's.
        if warehouse.model_position() < status.borrow().model_position {
            return false;
        }
        let Some(tail) = warehouse.tail() else { return true };
        status.send_modify(|s| s.tail_changes = tail.changes);
        if tail.changes == 0 {
            return false;
        }
        let Some(last) = last_build else { return true };
        tail.changes as f64 >= self.fold.ratio * tail.model_rows as f64
            || tail.changes >= fold_before_limit(warehouse.tail_limit())
            || last.elapsed() >= self.fold.max_lag
    }
}

/// The tail at which maintenance folds it in whatever the fold ratio: half the tail a handle
/// holds in memory ([`Warehouse::tail_limit`]). Past that limit each refresh computes the tail
/// from the raw files again (2-3 s at SF1 instead of 0.2-0.4 s), and the tail goes on growing
/// while the build runs (about 120k changes during a 30 s build at SF1 and 1,000 tx/s): at
/// the default fold ratio of 5%, an SF1 model's tail crossed the limit a minute into the live
/// workload, and reports trailed the source by 2 to 10 s until the fold.
pub(super) fn fold_before_limit(tail_limit: u64) -> u64 {
    tail_limit / 2
}

pub(super) async fn maintain(
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
                        tracing::debug!(position = %report.position, elapsed = ?report.elapsed, "model build");
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
///
/// When a model build stores a newer model, the first handle on it is made beside the loop (its
/// first step reads the new model's aggregates whole, seconds at SF10), while the loop goes on
/// publishing handles on the model it has, with the raw layer's newer changes applied on read.
/// That handle is published once it is made and caught up with the newest published raw
/// position, so the reports never wait for it and never move back.
pub(super) async fn refresh(
    warehouses: watch::Sender<Arc<Warehouse>>,
    status: Arc<watch::Sender<PipelineStatus>>,
    cancel: watch::Receiver<bool>,
    committed: Arc<Notify>,
) {
    let mut last_files = None;
    let mut on_new_model: Option<acme_core::task::OwnedTask<acme_query::Result<Option<Warehouse>>>> = None;
    loop {
        tokio::select! {
            _ = cancelled(cancel.clone()) => return,
            _ = committed.notified() => {}
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
        let current = Arc::clone(&*warehouses.borrow());
        let started = Instant::now();
        let span =
            tracing::debug_span!("model_step", step = "refresh", from = %current.raw_position().unwrap_or_default());
        let step = async {
            // The first handle on a newer stored model, once made: caught up with the raw
            // changes published since it started, then published in place of the current one.
            if on_new_model.as_ref().is_some_and(|task| task.is_finished())
                && let Some(task) = on_new_model.take()
            {
                match task.join().await {
                    Some(Ok(Some(made))) => {
                        let caught_up = match made.raw_position() < current.raw_position() {
                            true => made.refreshed().await?.unwrap_or(made),
                            false => made,
                        };
                        if caught_up.raw_position() >= current.raw_position() {
                            tracing::debug!(
                                model_position = %caught_up.model_position().unwrap_or_default(),
                                "first handle on the newly stored model published"
                            );
                            return Ok(Some(caught_up));
                        }
                    }
                    Some(Ok(None)) | None => {}
                    Some(Err(error)) => return Err(error),
                }
            }
            // (A handle with no model yet, at the start, moves to the first one directly, and
            // with its live state: the workload may not have started yet.)
            if current.model_position().is_none() {
                return current.refreshed_with_live_state().await;
            }
            if on_new_model.is_none() && current.stored_model_moved().await? {
                let base = Arc::clone(&current);
                on_new_model =
                    Some(acme_core::task::OwnedTask::spawn(async move { base.refreshed_with_live_state().await }));
            }
            match on_new_model.is_some() {
                true => current.refreshed_on_its_model().await,
                false => current.refreshed().await,
            }
        };
        match step.instrument(span).await {
            Ok(Some(newer)) => {
                metrics::counter!(telemetry::MODEL_STEPS, "step" => "refresh").increment(1);
                metrics::histogram!(telemetry::MODEL_STEP_SECONDS, "step" => "refresh")
                    .record(started.elapsed().as_secs_f64());
                if last_files.is_none_or(|at: Instant| at.elapsed() >= FILE_GAUGES_EVERY) {
                    record_layer_files(&newer);
                    last_files = Some(Instant::now());
                }
                tracing::debug!(
                    raw_position = %newer.raw_position().unwrap_or_default(),
                    model_position = %newer.model_position().unwrap_or_default(),
                    elapsed_ms = started.elapsed().as_millis() as u64,
                    held_bytes = newer.tail().map_or(0, |t| t.held_bytes),
                    live_handles = Warehouse::live_handles(),
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
pub(super) const FILE_GAUGES_EVERY: Duration = Duration::from_secs(5);

/// Set the [`telemetry::LAYER_FILES`] and [`telemetry::LAYER_BYTES`] gauges from the data files
/// `warehouse` reads.
pub(super) fn record_layer_files(warehouse: &Warehouse) {
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
pub(super) const MAX_LAG_SAMPLES: usize = 4096;

/// Sample the source's WAL position twice a second; the lag is measured against the samples:
/// `lag_seconds` is the age of the newest sample the confirmed position has passed.
pub(super) async fn lag_probe(
    config: AcmeConfig,
    status: Arc<watch::Sender<PipelineStatus>>,
    cancel: watch::Receiver<bool>,
) {
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
            let model = s.model_position.map(|p| if s.tail_changes == 0 { confirmed } else { p.0 });
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
