//! Step cost against table size (issue 16): what one step of the live path costs when it
//! brings the reports N changes further, at several scale factors, beside what the model
//! build (the fold, which rewrites the files holding the changed keys) costs for the same
//! changes, in the same run.
//!
//! For each scale factor of `ACME_BENCH_STEP_SFS` (default `0.1,1`; the figures add 10):
//! a source is generated and loaded, snapshotted, and fully built once. Then, for steps of
//! about 1,000 and about 10,000 raw changes (the live workload's mix, committed unthrottled and
//! streamed to the raw layer, not timed), `ACME_BENCH_STEP_REPEATS` times (default 5) each:
//! - **first step after a fold** (timed): `Warehouse::refreshed` from a handle on a freshly
//!   folded model, which also sets up what later steps extend (key indexes, R3's and R4's
//!   counts); then **the fold** (timed): the model build folding the same changes in;
//! - **live step** (timed), in the steady state: `Warehouse::refreshed` from a handle that
//!   already holds a tail, which brings every report, history and star table to the new
//!   position. This is what the pipeline does after each commit round between folds.
//!
//! Before any figure is written, the handle after the first and after the last step of each
//! size answers R1-R4 (as `acme_testkit::oracle` renders them) equal to PostgreSQL's answers,
//! written apart from acme, at that moment.
//!
//! Writes `bench-data/steps.md` (a table: scale factor, step size, changes, median and p90 of
//! the live step and of the fold, changes per second) and `bench-data/steps.csv`; plot them with
//! `benches/plot-steps.py` (into `bench-steps.png`).
//!
//! Run: `ACME_BENCH_STEP_SFS=0.1,1,10 cargo bench --bench steps`. `ACME_BENCH_STEP_PERF=<dir>`
//! records a `perf` profile of the steady-state live steps of each size into `<dir>` (see
//! [`Profiler`]), and
//! `RUST_LOG=acme_query=debug` logs where each step's time goes.

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use acme::core::AcmeConfig;
use acme::ingest::ChangeStream;
use acme::model::ModelBuild;
use acme::query::{Report, StatusFilter, Warehouse};
use acme_testkit::{PgCluster, ScaleFactor, WorkloadConfig};

mod common;

/// The generator's seed.
const SEED: u64 = 42;

/// R2's and R4's limit in the equality check.
const LIMIT: usize = 3;

fn env<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// The reports in the order of `acme_testkit::oracle::REPORTS`, rendered as it renders them.
async fn rendered(w: &Warehouse) -> Vec<Vec<String>> {
    let reports = [
        Report::OpenOrders(StatusFilter::Open),
        Report::OpenOrders(StatusFilter::Pending),
        Report::TopDeliveryDates { limit: LIMIT },
        Report::PendingItemsByProduct,
        Report::TopCustomers { limit: LIMIT, filter: StatusFilter::Pending },
    ];
    let mut out = Vec::new();
    for report in &reports {
        let batches = w.report_batches(report, None).await.expect("report");
        out.push(acme_testkit::oracle::render_batches(&batches).expect("render"));
    }
    out
}

/// Stop unless `w` answers as the source does now.
async fn check(w: &Warehouse, client: &tokio_postgres::Client, what: &str) {
    let source = acme_testkit::oracle::source_reports(client, LIMIT).await.expect("the oracle");
    let ours = rendered(w).await;
    for (i, name) in acme_testkit::oracle::REPORTS.iter().enumerate() {
        assert_eq!(ours[i], source[i], "{name} after {what}: acme and PostgreSQL differ; no figure is written");
    }
}

/// One timed step of each kind (their changes are about the same size).
struct Step {
    /// Raw changes of the first step after a fold (and of its fold).
    changes: u64,
    /// The tail a steady-state step's handle holds.
    tail: u64,
    /// The steady-state step, extending a handle that holds a tail.
    live: Duration,
    /// The first step after a fold.
    first: Duration,
    /// The fold of the first step's changes.
    fold: Duration,
}

/// With `ACME_BENCH_STEP_PERF=<dir>`, a `perf record` of this process (call graphs, unwound with
/// DWARF unless `ACME_BENCH_STEP_PERF_CALLS` says otherwise, e.g. `fp`), written to
/// `<dir>/perf-sf<SF>-<size>.data`, that counts only while steady-state live steps run: after
/// each timed step, the same step is run again from the same handle `ACME_BENCH_STEP_PERF_AGAIN`
/// times (default 4; results dropped) with perf's events enabled through its control FIFO
/// ([`Profiler::during`]). The timed step itself runs unprofiled, so perf does not slow it.
struct Profiler {
    child: std::process::Child,
    control: std::fs::File,
    ack: std::io::BufReader<std::fs::File>,
    again: usize,
}

impl Profiler {
    fn start(sf: f64, target: u64) -> Option<Profiler> {
        let dir = std::path::PathBuf::from(std::env::var_os("ACME_BENCH_STEP_PERF")?);
        let out = dir.join(format!("perf-sf{sf}-{target}.data"));
        let (control, ack) =
            (dir.join(format!("perf-sf{sf}-{target}.ctl")), dir.join(format!("perf-sf{sf}-{target}.ack")));
        for fifo in [&control, &ack] {
            let _ = std::fs::remove_file(fifo);
            let made = std::process::Command::new("mkfifo").arg(fifo).status().expect("mkfifo");
            assert!(made.success(), "mkfifo {}", fifo.display());
        }
        let child = std::process::Command::new("perf")
            .args([
                "record",
                "-F",
                "499",
                "--call-graph",
                &env("ACME_BENCH_STEP_PERF_CALLS", "dwarf,32768".to_string()),
            ])
            .args(["-D", "-1", "-p", &std::process::id().to_string()])
            .arg(format!("--control=fifo:{},{}", control.display(), ack.display()))
            .arg("-o")
            .arg(out)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("perf (ACME_BENCH_STEP_PERF)");
        // Opening a FIFO's writing end waits for perf to open its reading end.
        let control = std::fs::OpenOptions::new().write(true).open(&control).expect("perf's control FIFO");
        let ack = std::io::BufReader::new(std::fs::File::open(&ack).expect("perf's ack FIFO"));
        Some(Profiler { child, control, ack, again: env("ACME_BENCH_STEP_PERF_AGAIN", 4usize) })
    }

    /// Send perf `command` and wait for its acknowledgement.
    fn command(&mut self, command: &str) {
        use std::io::{BufRead, Write};
        writeln!(self.control, "{command}").expect("perf control");
        let mut line = String::new();
        self.ack.read_line(&mut line).expect("perf ack");
    }

    /// Profile `again` more runs of the step from `w` (the handle the timed step started from).
    async fn during(&mut self, w: &Warehouse) {
        self.command("enable");
        for _ in 0..self.again {
            drop(w.refreshed().await.expect("profiled step"));
        }
        self.command("disable");
    }

    fn stop(mut self) {
        let _ = std::process::Command::new("kill").args(["-INT", &self.child.id().to_string()]).status();
        let _ = self.child.wait();
    }
}

/// Commit about `changes` raw changes (the workload's mix) and stream them to the raw layer;
/// returns the raw changes committed.
async fn commit_changes(url: &str, stream: &mut ChangeStream, seed: u64, transactions: u64) -> u64 {
    let workload = WorkloadConfig { seed, rate_tps: 0.0, transactions: Some(transactions), ..Default::default() };
    acme_testkit::run_workload(url, &workload).await.expect("workload");
    stream.catch_up().await.expect("catch up").changes
}

async fn scale(sf: f64, repeats: usize, rows: &mut Vec<(f64, u64, Step)>) {
    let started = Instant::now();
    let cluster = PgCluster::start().expect("PostgreSQL");
    let url = cluster.create_database("steps").await.expect("database");
    let client = acme_testkit::connect(&url).await.expect("connect");
    acme_testkit::create_source_schema(&client).await.expect("schema");
    acme_testkit::bulk_load(&url, ScaleFactor::new(sf).expect("sf"), SEED).await.expect("load");
    let loaded = started.elapsed();
    std::fs::create_dir_all(common::root()).expect("bench data directory");
    let dir = tempfile::tempdir_in(common::root()).expect("warehouse directory");
    let storage = dir.path().display().to_string();
    let config = AcmeConfig::builder().source_url(&url).storage_url(&storage).build().expect("config");
    let mut stream = ChangeStream::open(config.clone()).await.expect("snapshot");
    let full = Instant::now();
    ModelBuild::new(config.clone()).run().await.expect("full build");
    let full = full.elapsed();
    eprintln!("SF{sf}: loaded in {loaded:.1?}, full model build {full:.1?}");

    // Calibrate: raw changes per workload transaction (the mix's own ratio).
    let calibration = 200;
    let changes = commit_changes(&url, &mut stream, SEED, calibration).await;
    let per_transaction = (changes as f64 / calibration as f64).max(0.1);
    ModelBuild::new(config.clone()).run().await.expect("fold the calibration");
    let mut w = Warehouse::open(&storage).await.expect("open");
    let mut seed = SEED + 1;
    for target in [1_000u64, 10_000] {
        let transactions = ((target as f64 / per_transaction).round() as u64).max(1);
        let mut steps: Vec<Step> = Vec::new();
        // The first step after a fold (its handle sets up what later steps extend), then the
        // fold of the same changes.
        for repeat in 0..repeats {
            let changes = commit_changes(&url, &mut stream, seed, transactions).await;
            seed += 1;
            assert!(w.tail().is_some_and(|t| t.changes == 0), "the step starts on a folded model");
            let timed = Instant::now();
            let stepped = w.refreshed().await.expect("first step").expect("a newer position");
            let first = timed.elapsed();
            if repeat == 0 {
                check(&stepped, &client, &format!("a first step of {changes} changes at SF{sf}")).await;
            }
            let timed = Instant::now();
            let folded = ModelBuild::new(config.clone()).run().await.expect("fold");
            let fold = timed.elapsed();
            assert_eq!(
                folded.position,
                stepped.raw_position().expect("raw position"),
                "the fold took the same changes"
            );
            w = stepped.refreshed().await.expect("refresh onto the new model").unwrap_or(stepped);
            steps.push(Step { changes, tail: changes, live: Duration::ZERO, first, fold });
        }
        // Then the steady state: each step extends the previous handle.
        commit_changes(&url, &mut stream, seed, transactions).await;
        seed += 1;
        w = w.refreshed().await.expect("refresh").unwrap_or(w);
        let mut profiler = Profiler::start(sf, target);
        for (repeat, step) in steps.iter_mut().enumerate() {
            let changes = commit_changes(&url, &mut stream, seed, transactions).await;
            seed += 1;
            let timed = Instant::now();
            let stepped = w.refreshed().await.expect("live step").expect("a newer position");
            step.live = timed.elapsed();
            if let Some(profiler) = profiler.as_mut() {
                profiler.during(&w).await;
            }
            step.tail = stepped.tail().map_or(0, |t| t.changes);
            if repeat == 0 || repeat + 1 == repeats {
                check(&stepped, &client, &format!("a live step of {changes} changes at SF{sf}")).await;
            }
            w = stepped;
            eprintln!(
                "SF{sf} step of about {target} changes: live {:.1} ms (tail {}), first after a fold {:.1} ms, fold {:.1} ms",
                step.live.as_secs_f64() * 1e3,
                step.tail,
                step.first.as_secs_f64() * 1e3,
                step.fold.as_secs_f64() * 1e3
            );
        }
        if let Some(profiler) = profiler.take() {
            profiler.stop();
        }
        // Fold the steady state's tail (not timed) before the next size.
        ModelBuild::new(config.clone()).run().await.expect("fold");
        w = w.refreshed().await.expect("refresh onto the new model").unwrap_or(w);
        rows.extend(steps.into_iter().map(|s| (sf, target, s)));
    }
    check(&w, &client, &format!("the last fold at SF{sf}")).await;
    drop(w);
    drop(dir);
}

#[tokio::main]
async fn main() {
    // `RUST_LOG=acme_query=debug` shows where each step's time goes.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        .try_init();
    let sfs: Vec<f64> = env("ACME_BENCH_STEP_SFS", "0.1,1".to_string())
        .split(',')
        .map(|s| s.trim().parse().expect("ACME_BENCH_STEP_SFS: comma-separated scale factors"))
        .collect();
    let repeats = env("ACME_BENCH_STEP_REPEATS", 5usize).max(1);
    let mut rows = Vec::new();
    for sf in &sfs {
        scale(*sf, repeats, &mut rows).await;
    }
    let mut table = format!(
        "Step cost against table size: {repeats} steps of each kind per row, answers checked equal to PostgreSQL's \
         first. A live step is `Warehouse::refreshed` (every report, history and star table at the new position): \
         in the steady state it extends a handle that holds a tail; the first step after a fold also sets up what \
         later steps extend. The fold is the model build folding the first step's changes into the stored model.\n\n\
         | scale | step | changes (median) | live step p50 / p90 (ms) | live changes/s | first step after a fold p50 \
         (ms) | fold p50 / p90 (ms) | fold / live |\n|---|---|---|---|---|---|---|---|\n"
    );
    let mut csv = String::from("sf,target,changes,tail,live_ms,first_ms,fold_ms\n");
    for sf in &sfs {
        for target in [1_000u64, 10_000] {
            let steps: Vec<&Step> =
                rows.iter().filter(|(s, t, _)| s == sf && *t == target).map(|(_, _, s)| s).collect();
            if steps.is_empty() {
                continue;
            }
            for s in &steps {
                let _ = writeln!(
                    csv,
                    "{sf},{target},{},{},{:.3},{:.3},{:.3}",
                    s.changes,
                    s.tail,
                    s.live.as_secs_f64() * 1e3,
                    s.first.as_secs_f64() * 1e3,
                    s.fold.as_secs_f64() * 1e3
                );
            }
            let sorted = |f: fn(&Step) -> Duration| {
                let mut v: Vec<Duration> = steps.iter().map(|s| f(s)).collect();
                v.sort();
                v
            };
            let (live, first, fold) = (sorted(|s| s.live), sorted(|s| s.first), sorted(|s| s.fold));
            let mut changes: Vec<u64> = steps.iter().map(|s| s.changes).collect();
            changes.sort();
            let median_changes = changes[changes.len() / 2];
            let (live50, fold50) = (common::percentile(&live, 0.5), common::percentile(&fold, 0.5));
            let _ = writeln!(
                table,
                "| SF{sf} | {}k | {median_changes} | {:.0} / {:.0} | {:.0} | {:.0} | {:.0} / {:.0} | {:.1}x |",
                target / 1000,
                live50.as_secs_f64() * 1e3,
                common::percentile(&live, 0.9).as_secs_f64() * 1e3,
                median_changes as f64 / live50.as_secs_f64(),
                common::percentile(&first, 0.5).as_secs_f64() * 1e3,
                fold50.as_secs_f64() * 1e3,
                common::percentile(&fold, 0.9).as_secs_f64() * 1e3,
                fold50.as_secs_f64() / live50.as_secs_f64(),
            );
        }
    }
    println!("{table}");
    let root = common::root();
    std::fs::write(root.join("steps.md"), &table).expect("write steps.md");
    std::fs::write(root.join("steps.csv"), &csv).expect("write steps.csv");
    println!("written to {} and steps.csv", root.join("steps.md").display());
}
