//! Model build figures on the cached bench dataset (see `common`), all from the same raw layer:
//! - full rebuild: histories and star schema computed from the whole raw layer;
//! - incremental: the model built up to the snapshot, then advanced through the streamed
//!   changes in steps of about 10,000 raw changes (`ModelBuild::up_to`), each step timed;
//! - criterion: one such incremental step, and one full rebuild.
//!
//! - merge-on-read: the model built up to about 1,000, 10,000 and 100,000 raw changes (or all
//!   the streamed ones, when fewer) before the raw layer's end, so that a warehouse applies that tail on read; the four reports (now and as
//!   of the dataset's instant), checked equal to those of the caught-up model, timed against
//!   the same reports with no tail.
//!
//! The summary (printed and written to `bench-data/sf<SF>-seed42/model-summary.md`) gives the
//! full rebuild time, its change application rate (raw changes applied per second, overall and
//! for the histories alone), the incremental cost per 10,000 changes, and the cost the tail
//! adds to the reports.
//!
//! `ACME_BENCH_SF` sets the scale factor (default 0.1; the issue figures use 1);
//! `ACME_BENCH_TAIL_ONLY=1` runs only the merge-on-read section (`tail-summary.md`), and
//! `ACME_BENCH_EXPLAIN=1` prints the reports' plans with and without the tail.
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

/// The commit LSN after which about `changes` streamed raw changes follow (whole
/// transactions), and how many follow it: all the streamed changes, after the snapshot, when
/// the dataset has fewer.
async fn tail_cut(data: &common::Dataset, changes: i64) -> (i64, i64) {
    let (snapshot, _) = cut_points(data, i64::MAX).await;
    let w = Warehouse::open(&data.warehouse).await.expect("warehouse");
    let all = "SELECT _lsn, _op FROM raw_customers UNION ALL SELECT _lsn, _op FROM raw_products \
               UNION ALL SELECT _lsn, _op FROM raw_orders UNION ALL SELECT _lsn, _op FROM raw_order_items";
    let batches = w
        .sql(&format!(
            "SELECT _lsn, count(*) AS n FROM ({all}) WHERE _op <> 'snapshot' GROUP BY _lsn ORDER BY _lsn DESC"
        ))
        .await
        .expect("lsns")
        .collect()
        .await
        .expect("collect");
    let mut tail = 0;
    for b in &batches {
        for i in 0..b.num_rows() {
            if tail >= changes {
                return (value(b, 0, i), tail);
            }
            tail += value(b, 1, i);
        }
    }
    (snapshot, tail)
}

/// The four reports, now and as of `instant`, rendered (for the equality check).
async fn all_reports(w: &Warehouse, instant: chrono::DateTime<chrono::Utc>) -> String {
    use acme::query::StatusFilter;
    let mut out = String::new();
    for as_of in [None, Some(instant)] {
        let _ = write!(out, "{:?}", w.open_orders(StatusFilter::Open, as_of).await.expect("R1"));
        let _ = write!(out, "{:?}", w.top_delivery_dates(3, as_of).await.expect("R2"));
        let _ = write!(out, "{:?}", w.pending_items_by_product(as_of).await.expect("R3"));
        let _ = write!(out, "{:?}", w.top_customers(3, StatusFilter::Pending, as_of).await.expect("R4"));
    }
    out
}

/// Median times of R1-R4 now and as of `instant` on `w` (ms each).
async fn report_times(w: &Warehouse, instant: chrono::DateTime<chrono::Utc>) -> Vec<f64> {
    use acme::query::StatusFilter;
    let mut out = Vec::new();
    for as_of in [None, Some(instant)] {
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        out.push(ms(common::median(7, || w.open_orders(StatusFilter::Open, as_of)).await));
        out.push(ms(common::median(7, || w.top_delivery_dates(3, as_of)).await));
        out.push(ms(common::median(7, || w.pending_items_by_product(as_of)).await));
        out.push(ms(common::median(7, || w.top_customers(3, StatusFilter::Pending, as_of)).await));
    }
    out
}

/// Merge-on-read: the reports with a tail of about 1k, 10k and 100k raw changes applied on read,
/// against the caught-up model (no tail). Answers are checked equal before timing.
async fn live_tail(data: &common::Dataset, sf: f64) -> String {
    let caught_up = Warehouse::open(&data.warehouse).await.expect("caught-up warehouse");
    let expected = all_reports(&caught_up, data.instant).await;
    let base = report_times(&caught_up, data.instant).await;
    let mut summary = format!(
        "\n## Reports with the raw tail applied on read, SF{sf}\n\n\
         The model built up to a position that leaves about N raw changes after it; a `Warehouse` applies \
         them on read, computing the tail's pieces once and holding them in memory (the default up to \
         `MAX_MATERIALIZED_TAIL` changes) or in each query. Median of 7 runs, ms; answers checked equal to the caught-up model's first.\n\n\
         | tail | open + first refresh | R1 | R2 | R3 | R4 | R1 as of | R2 as of | R3 as of | R4 as of |\n\
         |---|---|---|---|---|---|---|---|---|---|\n"
    );
    let row = |label: String, open: f64, times: &[f64]| {
        let cells: Vec<String> = times.iter().map(|t| format!("{t:.1}")).collect();
        format!("| {label} | {open:.0} | {} |\n", cells.join(" | "))
    };
    let open_ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let started = Instant::now();
    let reopened = Warehouse::open(&data.warehouse).await.expect("open");
    summary.push_str(&row("none (model caught up)".into(), open_ms(started.elapsed()), &base));
    drop(reopened);
    if std::env::var_os(EXPLAIN).is_some() {
        explain(&caught_up, data.instant, "no tail").await;
    }
    for wanted in [1_000i64, 10_000, 100_000] {
        let (cut, changes) = tail_cut(data, wanted).await;
        let dir = raw_copy(data);
        ModelBuild::new(config(dir.path()))
            .up_to(acme::core::Lsn::from_stored(cut))
            .await
            .expect("model up to the cut");
        let url = dir.path().display().to_string();
        for (how, limit) in [("held in memory", acme::query::MAX_MATERIALIZED_TAIL), ("applied per query", 0)] {
            let started = Instant::now();
            let w = Warehouse::open_with_tail_limit(&url, Default::default(), limit).await.expect("open");
            let open = open_ms(started.elapsed());
            let tail = w.raw_position().unwrap_or_default() > w.model_position().unwrap_or_default();
            assert!(tail, "a tail of {changes} changes is applied on read");
            assert_eq!(all_reports(&w, data.instant).await, expected, "tail of {changes} ({how}): reports equal");
            if std::env::var_os(EXPLAIN).is_some() {
                explain(&w, data.instant, &format!("tail of {changes} changes, {how}")).await;
            }
            let times = report_times(&w, data.instant).await;
            let ratios: Vec<String> = times.iter().zip(&base).map(|(t, b)| format!("{:.2}x", t / b)).collect();
            summary.push_str(&row(format!("{changes} changes, {how}"), open, &times));
            summary.push_str(&format!("| ratio to no tail | | {} |\n", ratios.join(" | ")));
        }
    }
    summary
}

/// Set to print the plans (`EXPLAIN ANALYZE`) of the reports with and without a tail.
const EXPLAIN: &str = "ACME_BENCH_EXPLAIN";

/// Print `EXPLAIN ANALYZE` of R1, R3 and R4, now and as of `instant`, on `w`.
async fn explain(w: &Warehouse, instant: chrono::DateTime<chrono::Utc>, label: &str) {
    use acme::query::{Report, StatusFilter};
    let reports = [
        Report::OpenOrders(StatusFilter::Open),
        Report::PendingItemsByProduct,
        Report::TopCustomers { limit: 3, filter: StatusFilter::Pending },
    ];
    for as_of in [None, Some(instant)] {
        for report in &reports {
            let sql = w.report_sql(report, as_of).expect("report sql");
            let plan = w.sql(&format!("EXPLAIN ANALYZE {sql}")).await.expect("explain").collect().await.expect("plan");
            let text = acme::core::arrow::util::pretty::pretty_format_batches(&plan).expect("format");
            println!("### {label}: {report:?}, as of {as_of:?}\n{text}\n");
        }
    }
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

/// Set to run only the merge-on-read section (written to `tail-summary.md`).
const TAIL_ONLY: &str = "ACME_BENCH_TAIL_ONLY";

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
    if std::env::var_os(TAIL_ONLY).is_some() {
        // Only the merge-on-read figures (for the larger scale factors).
        let summary = runtime.block_on(live_tail(&data, sf));
        println!("{summary}");
        std::fs::write(data.dir.join("tail-summary.md"), &summary).expect("write summary");
        return;
    }
    let (snapshot, cuts) = runtime.block_on(cut_points(&data, STEP));
    let (_, small_cuts) = runtime.block_on(cut_points(&data, SMALL_STEP));
    assert!(!cuts.is_empty(), "the dataset has fewer than {STEP} streamed changes");

    // Incremental: up to the snapshot, then step by step.
    let stepped = raw_copy(&data);
    let (base, steps) = runtime.block_on(async {
        let base = ModelBuild::new(config(stepped.path()))
            .up_to(acme::core::Lsn::from_stored(snapshot))
            .await
            .expect("snapshot build");
        let mut steps = Vec::new();
        for cut in &cuts {
            let report = ModelBuild::new(config(stepped.path()))
                .up_to(acme::core::Lsn::from_stored(*cut))
                .await
                .expect("incremental build");
            assert!(report.tables.iter().any(|t| t.incremental), "step at {cut} ran incrementally");
            steps.push(report);
        }
        (base, steps)
    });
    // The finer series: ten steps of about 1,000 changes from the snapshot state.
    let fine = raw_copy(&data);
    let small_steps = runtime.block_on(async {
        ModelBuild::new(config(fine.path()))
            .up_to(acme::core::Lsn::from_stored(snapshot))
            .await
            .expect("snapshot build");
        let mut steps = Vec::new();
        for cut in small_cuts.iter().take(10) {
            steps.push(
                ModelBuild::new(config(fine.path()))
                    .up_to(acme::core::Lsn::from_stored(*cut))
                    .await
                    .expect("incremental build"),
            );
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
    summary.push_str(&runtime.block_on(live_tail(&data, sf)));
    println!("{summary}");
    std::fs::write(data.dir.join("model-summary.md"), &summary).expect("write summary");

    // Criterion: one incremental step from the snapshot state, and one full rebuild.
    let mut group = c.benchmark_group(format!("model_sf{sf}"));
    group.sample_size(10).measurement_time(Duration::from_secs(30));
    let first_cut = cuts[0];
    let snapshot_state = raw_copy(&data);
    runtime.block_on(async {
        ModelBuild::new(config(snapshot_state.path()))
            .up_to(acme::core::Lsn::from_stored(snapshot))
            .await
            .expect("snapshot build");
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
                let report = ModelBuild::new(config(dir.path()))
                    .up_to(acme::core::Lsn::from_stored(first_cut))
                    .await
                    .expect("step");
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
