//! Model build figures on the cached bench dataset (see `common`), all from the same raw layer:
//! - full rebuild: histories and star schema computed from the whole raw layer;
//! - incremental: the model built up to the snapshot, then advanced through the streamed
//!   changes in steps of about 10,000 raw changes (`ModelBuild::up_to`), each step timed;
//! - criterion: one such incremental step, and one full rebuild.
//!
//! The summary (printed and written to `bench-data/sf<SF>-seed42/model-summary.md`) gives the
//! full rebuild time, its change application rate (raw changes applied per second, overall and
//! for the histories alone), and the incremental cost per 10,000 changes.
//!
//! `ACME_BENCH_SF` sets the scale factor (default 0.1; the issue figures use 1).
//! Run: `cargo bench --bench model`.

mod common;

use std::fmt::Write as _;
use std::path::Path;
use std::time::{Duration, Instant};

use acme::core::AcmeConfig;
use acme::model::{ModelBuild, ModelReport};
use acme::query::Warehouse;
use criterion::{BatchSize, Criterion, criterion_group, criterion_main};

/// Raw changes per incremental step.
const STEP: i64 = 10_000;

/// Raw changes per step of the second, finer series (about a second of the live workload).
const SMALL_STEP: i64 = 1_000;

/// A fresh warehouse holding only the raw layer of `data`.
fn raw_copy(data: &common::Dataset) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tmp");
    let from = Path::new(&data.warehouse);
    copy_dir(&from.join("raw"), &dir.path().join("raw"));
    std::fs::create_dir_all(dir.path().join("_acme")).expect("meta dir");
    std::fs::copy(from.join("_acme").join("raw.json"), dir.path().join("_acme").join("raw.json")).expect("manifest");
    dir
}

fn copy_dir(from: &Path, to: &Path) {
    acme_testkit::copy_dir(from, to).expect("copy a directory tree");
}

/// Rows per model file (`ACME_BENCH_MODEL_FILE_ROWS`, default acme's).
fn model_file_rows() -> u64 {
    std::env::var("ACME_BENCH_MODEL_FILE_ROWS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(acme::core::config::DEFAULT_MODEL_FILE_ROWS)
}

fn config(dir: &Path) -> AcmeConfig {
    AcmeConfig::builder()
        .storage_url(dir.display().to_string())
        .model_file_rows(model_file_rows())
        .build()
        .expect("config")
}

/// The snapshot LSN, and commit LSNs after it that cut the streamed changes into steps of
/// about `step` raw changes (whole transactions).
async fn cut_points(data: &common::Dataset, step: i64) -> (i64, Vec<i64>) {
    let w = Warehouse::open(&data.warehouse).await.expect("warehouse");
    let all = "SELECT _lsn, _op FROM raw_customers UNION ALL SELECT _lsn, _op FROM raw_products \
               UNION ALL SELECT _lsn, _op FROM raw_orders UNION ALL SELECT _lsn, _op FROM raw_order_items";
    let batches = w
        .sql(&format!("SELECT _lsn, count(*) AS n FROM ({all}) WHERE _op <> 'snapshot' GROUP BY _lsn ORDER BY _lsn"))
        .await
        .expect("lsns")
        .collect()
        .await
        .expect("collect");
    let snapshot = w
        .sql(&format!("SELECT max(_lsn) FROM ({all}) WHERE _op = 'snapshot'"))
        .await
        .expect("snapshot lsn")
        .collect()
        .await
        .expect("collect");
    let snapshot = value(&snapshot[0], 0, 0);
    let (mut cuts, mut pending) = (Vec::new(), 0i64);
    for b in &batches {
        for i in 0..b.num_rows() {
            pending += value(b, 1, i);
            if pending >= step {
                cuts.push(value(b, 0, i));
                pending = 0;
            }
        }
    }
    (snapshot, cuts)
}

fn value(b: &acme::core::arrow::array::RecordBatch, column: usize, row: usize) -> i64 {
    let c = acme::core::arrow::compute::cast(b.column(column), &acme::core::arrow::datatypes::DataType::Int64)
        .expect("cast");
    c.as_any().downcast_ref::<acme::core::arrow::array::Int64Array>().expect("int64").value(row)
}

fn history_time(report: &ModelReport) -> Duration {
    report.tables.iter().filter(|t| t.table.starts_with("intermediate/")).map(|t| t.elapsed).sum()
}

/// Set in a child run of this binary that builds the model of the warehouse in this directory
/// and prints its peak RSS: a fresh process, so the figure is the build's alone.
const CHILD: &str = "ACME_BENCH_MODEL_CHILD";

fn model(c: &mut Criterion) {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        .try_init();
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    if let Ok(dir) = std::env::var(CHILD) {
        runtime.block_on(ModelBuild::new(config(Path::new(&dir))).run()).expect("model build");
        println!("peak_rss_mib={:.0}", common::peak_rss_mib());
        std::process::exit(0);
    }
    let sf = common::scale();
    let data = runtime.block_on(common::dataset(sf));
    let (snapshot, cuts) = runtime.block_on(cut_points(&data, STEP));
    let (_, small_cuts) = runtime.block_on(cut_points(&data, SMALL_STEP));
    assert!(!cuts.is_empty(), "the dataset has fewer than {STEP} streamed changes");

    // Incremental: up to the snapshot, then step by step.
    let stepped = raw_copy(&data);
    let (base, steps) = runtime.block_on(async {
        let base = ModelBuild::new(config(stepped.path())).up_to(snapshot).await.expect("snapshot build");
        let mut steps = Vec::new();
        for cut in &cuts {
            let report = ModelBuild::new(config(stepped.path())).up_to(*cut).await.expect("incremental build");
            assert!(report.tables.iter().any(|t| t.incremental), "step at {cut} ran incrementally");
            steps.push(report);
        }
        (base, steps)
    });
    // The finer series: ten steps of about 1,000 changes from the snapshot state.
    let fine = raw_copy(&data);
    let small_steps = runtime.block_on(async {
        ModelBuild::new(config(fine.path())).up_to(snapshot).await.expect("snapshot build");
        let mut steps = Vec::new();
        for cut in small_cuts.iter().take(10) {
            steps.push(ModelBuild::new(config(fine.path())).up_to(*cut).await.expect("incremental build"));
        }
        steps
    });
    drop(fine);
    // Full rebuild of the whole raw layer; then its peak memory, in a process of its own.
    let dir = raw_copy(&data);
    let full = runtime.block_on(async { ModelBuild::new(config(dir.path())).await.expect("full rebuild") });
    drop(dir);
    let dir = raw_copy(&data);
    let full_rss = common::child_peak_rss_mib(CHILD, dir.path().as_os_str());
    drop(dir);

    let mut per_10k: Vec<f64> =
        steps.iter().map(|s| s.elapsed.as_secs_f64() * 10_000.0 / s.changes.max(1) as f64).collect();
    per_10k.sort_by(f64::total_cmp);
    let median_10k = per_10k[per_10k.len() / 2];
    let rate = |changes: u64, time: Duration| changes as f64 / time.as_secs_f64();
    let mut summary = String::new();
    let _ = writeln!(summary, "## Model build, SF{sf} ({} rows per model file)\n", model_file_rows());
    let _ = writeln!(summary, "| figure | value |\n|---|---|");
    let _ = writeln!(
        summary,
        "| full rebuild from raw ({} raw changes) | {:.1} s |",
        full.changes,
        full.elapsed.as_secs_f64()
    );
    let _ = writeln!(
        summary,
        "| change application, whole model | {:.0}k changes/s |",
        rate(full.changes, full.elapsed) / 1000.0
    );
    let _ = writeln!(
        summary,
        "| change application, SCD2 histories alone ({:.1} s) | {:.0}k changes/s |",
        history_time(&full).as_secs_f64(),
        rate(full.changes, history_time(&full)) / 1000.0
    );
    let _ = writeln!(summary, "| peak RSS of a full rebuild, in a process of its own | {full_rss:.0} MiB |");
    let _ = writeln!(summary, "| build of the snapshot state | {:.1} s |", base.elapsed.as_secs_f64());
    let _ = writeln!(
        summary,
        "| incremental build per 10k changes (median of {} steps) | {:.2} s |",
        steps.len(),
        median_10k
    );
    let mut small: Vec<f64> = small_steps.iter().map(|s| s.elapsed.as_secs_f64()).collect();
    small.sort_by(f64::total_cmp);
    let _ = writeln!(
        summary,
        "| incremental build of about 1k changes (median of {} steps) | {:.2} s |",
        small.len(),
        small.get(small.len() / 2).copied().unwrap_or(f64::NAN)
    );
    let _ = writeln!(summary, "\nIncremental steps (changes, seconds, files compacted):\n");
    for s in &steps {
        let _ = writeln!(
            summary,
            "- {} changes: {:.2} s, {} files compacted",
            s.changes,
            s.elapsed.as_secs_f64(),
            s.files_compacted
        );
    }
    let _ = writeln!(summary, "\nPer table, full rebuild / last incremental step (seconds):\n");
    let last = steps.last().expect("a step");
    for t in &full.tables {
        let step = last.tables.iter().find(|s| s.table == t.table).map_or(0.0, |s| s.elapsed.as_secs_f64());
        let _ = writeln!(summary, "- {}: {:.2} / {:.2}", t.table, t.elapsed.as_secs_f64(), step);
    }
    println!("{summary}");
    std::fs::write(data.dir.join("model-summary.md"), &summary).expect("write summary");

    // Criterion: one incremental step from the snapshot state, and one full rebuild.
    let mut group = c.benchmark_group(format!("model_sf{sf}"));
    group.sample_size(10).measurement_time(Duration::from_secs(30));
    let first_cut = cuts[0];
    let snapshot_state = raw_copy(&data);
    runtime.block_on(async {
        ModelBuild::new(config(snapshot_state.path())).up_to(snapshot).await.expect("snapshot build");
    });
    group.bench_function("incremental_step_10k_changes", |b| {
        b.to_async(&runtime).iter_batched(
            || {
                let dir = tempfile::tempdir().expect("tmp");
                copy_dir(snapshot_state.path(), dir.path());
                dir
            },
            |dir| async move {
                let started = Instant::now();
                let report = ModelBuild::new(config(dir.path())).up_to(first_cut).await.expect("step");
                let elapsed = started.elapsed();
                drop(dir);
                (report.changes, elapsed)
            },
            BatchSize::PerIteration,
        )
    });
    group.measurement_time(Duration::from_secs(60));
    group.bench_function("full_rebuild_from_raw", |b| {
        b.to_async(&runtime).iter_batched(
            || raw_copy(&data),
            |dir| async move {
                let report = ModelBuild::new(config(dir.path())).await.expect("build");
                drop(dir);
                report.changes
            },
            BatchSize::PerIteration,
        )
    });
    group.finish();
}

criterion_group!(benches, model);
criterion_main!(benches);
