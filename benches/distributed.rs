//! R1-R4, current and as of, on an Apache Ballista cluster with one and with two executors,
//! against the embedded `Warehouse`, in the same run, every answer checked equal first.
//!
//! The dataset is the reports benchmark's (`common`, cached under `bench-data/`): its model
//! holds every change, so the embedded warehouse and the cluster answer at the same model
//! position. The cluster is acme's `ballista_scheduler` and `ballista_executor` example
//! programs, each a separate process on loopback, with 2 task slots per executor; the
//! executors read the warehouse's Parquet files from the local disk (on one machine they share
//! it; across machines they read object storage). On this machine's 2 cores, two executors
//! share the cores one has: the figures measure what distribution costs (planning on the
//! scheduler, shuffles through Arrow Flight), not what a second machine adds.
//!
//! Build the cluster programs first (the benchmark runs them):
//! `cargo build --release --features ballista-cluster --examples`, then
//! `ACME_BENCH_SF=1 cargo bench --features ballista-cluster --bench distributed`.

mod common;

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use acme::query::Warehouse;
use acme::query::distributed::DistributedWarehouse;
use chrono::{DateTime, SecondsFormat, Utc};
use criterion::{Criterion, criterion_group, criterion_main};

/// Where the reports run.
enum Engine<'a> {
    Embedded(&'a Warehouse),
    Cluster(&'a DistributedWarehouse),
}

impl Engine<'_> {
    async fn rows(&self, n: usize, as_of: Option<DateTime<Utc>>) -> Vec<String> {
        let batches = match self {
            Engine::Embedded(w) => w.report_batches(&common::acme_report(n), as_of).await,
            Engine::Cluster(c) => c.report_batches(&common::acme_report(n), as_of).await,
        };
        acme_testkit::oracle::render_batches(&batches.expect("report")).expect("render")
    }
}

/// An example program of the release build (`cargo build --release --features ballista-cluster --examples`).
fn program(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("this binary");
    let path = exe.parent().and_then(|p| p.parent()).expect("target directory").join("examples").join(name);
    assert!(
        path.exists(),
        "{} is missing: build it first with `cargo build --release --features ballista-cluster --examples`",
        path.display()
    );
    path
}

fn distributed(c: &mut Criterion) {
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let sf = common::scale();
    let data = runtime.block_on(common::dataset(sf));
    let as_of = Some(data.instant);
    let runs = 9;
    let warehouse = runtime.block_on(Warehouse::open(&data.warehouse)).expect("open warehouse");
    assert_eq!(warehouse.tail().map(|t| t.changes), Some(0), "the dataset's model holds every change");
    let embedded = Engine::Embedded(&warehouse);
    let expected: Vec<Vec<Vec<String>>> =
        [None, as_of].iter().map(|t| (1..=4).map(|n| runtime.block_on(embedded.rows(n, *t))).collect()).collect();
    let time = |engine: &Engine, n: usize, t: Option<DateTime<Utc>>| {
        runtime.block_on(common::median(runs, || engine.rows(n, t))).as_secs_f64() * 1000.0
    };
    // [now, as of] x R1-R4, per engine; then connect time and the executors' peak RSS.
    let mut figures: Vec<(String, Vec<f64>, f64, String, String)> = Vec::new();
    figures.push((
        "embedded".into(),
        [None, as_of].iter().flat_map(|t| (1..=4).map(move |n| (n, *t))).map(|(n, t)| time(&embedded, n, t)).collect(),
        0.0,
        format!("{:.0} (this process)", common::peak_rss_mib()),
        String::new(),
    ));
    let (scheduler, executor) = (program("ballista_scheduler"), program("ballista_executor"));
    for executors in [1, 2] {
        let cluster =
            acme_testkit::BallistaCluster::start(&scheduler, &executor, executors, 2).unwrap_or_else(|e| panic!("{e}"));
        let started = Instant::now();
        // Ballista's default is 16 tasks per stage; ACME_BENCH_PARTITIONS=slots gives each
        // stage as many tasks as the cluster has slots (2 per executor).
        let mut config = DistributedWarehouse::default_session_config();
        match std::env::var("ACME_BENCH_PARTITIONS").as_deref() {
            Ok("slots") => config = config.with_target_partitions(2 * executors),
            Ok(n) => {
                config = config.with_target_partitions(n.parse().expect("ACME_BENCH_PARTITIONS: a number or `slots`"))
            }
            Err(_) => {}
        }
        let partitions = config.target_partitions();
        let remote = runtime
            .block_on(DistributedWarehouse::connect_with_config(
                &cluster.url(),
                &data.warehouse,
                HashMap::new(),
                config,
            ))
            .unwrap_or_else(|e| panic!("connect: {e:?}\n{}", cluster.all_logs()));
        let connect_ms = started.elapsed().as_secs_f64() * 1000.0;
        let engine = Engine::Cluster(&remote);
        for (i, t) in [None, as_of].iter().enumerate() {
            for n in 1..=4 {
                let rows = runtime.block_on(engine.rows(n, *t));
                assert_eq!(rows, expected[i][n - 1], "R{n} ({}) on {executors} executor(s)", ["now", "as of"][i]);
            }
        }
        eprintln!("answers equal: embedded and {executors} executor(s), now and as of");
        if executors == 2 {
            let mut group = c.benchmark_group(format!("distributed_sf{sf}"));
            group.sample_size(10).measurement_time(Duration::from_secs(5));
            for n in 1..=4 {
                group.bench_function(format!("R{n}_current_2_executors"), |b| {
                    b.to_async(&runtime).iter(|| engine.rows(n, None))
                });
                group.bench_function(format!("R{n}_current_embedded"), |b| {
                    b.to_async(&runtime).iter(|| embedded.rows(n, None))
                });
            }
            group.finish();
        }
        figures.push((
            format!("{executors} executor{}, {partitions} partitions", if executors == 1 { "" } else { "s" }),
            [None, as_of]
                .iter()
                .flat_map(|t| (1..=4).map(move |n| (n, *t)))
                .map(|(n, t)| time(&engine, n, t))
                .collect(),
            connect_ms,
            (0..executors)
                .map(|i| cluster.executor_peak_rss_mib(i).map_or("?".to_string(), |m| format!("{m:.0}")))
                .collect::<Vec<_>>()
                .join(" / "),
            // Tasks each executor ran over the whole run: how evenly the work was shared.
            (0..executors)
                .map(|i| cluster.executor_log(i).matches("Execute task").count().to_string())
                .collect::<Vec<_>>()
                .join(" / "),
        ));
    }
    let base = figures[0].1.clone();
    let mut table = format!(
        "\nR1-R4 at SF{sf} on a Ballista cluster and embedded, median of {runs} runs (ms); answers checked equal first\n\
         | engine | R1 now | R2 now | R3 now | R4 now | R1 as of | R2 as of | R3 as of | R4 as of | connect | peak RSS (MiB) | tasks |\n\
         |---|---|---|---|---|---|---|---|---|---|---|---|\n"
    );
    for (name, ms, connect, rss, tasks) in &figures {
        table.push_str(&format!("| {name} |"));
        for (i, v) in ms.iter().enumerate() {
            if name == "embedded" {
                table.push_str(&format!(" {v:.1} |"));
            } else {
                table.push_str(&format!(" {v:.1} ({:.1}x) |", v / base[i]));
            }
        }
        table.push_str(&if name == "embedded" {
            format!(" | {rss} | |\n")
        } else {
            format!(" {connect:.0} | {rss} | {tasks} |\n")
        });
    }
    table.push_str(&format!(
        "\nIn parentheses: the cluster's time over the embedded warehouse's in this run. Each executor has 2 task \
         slots, on the same 2 cores; the cluster reads the same Delta tables (the model's data files, pinned to the \
         model's version) from the local disk. As of {}. `connect` (ms) pins the model and asks the cluster for the \
         history's first instant. Peak RSS: of each executor process, and of this benchmark's process (which \
         holds the embedded warehouse and the dataset's setup) for the embedded row. Tasks: how many each executor \
         ran over the whole run (checks, timings and the criterion group).\n",
        data.instant.to_rfc3339_opts(SecondsFormat::Millis, true)
    ));
    println!("{table}");
    let summary = data.dir.join("distributed-summary.md");
    std::fs::write(&summary, &table).expect("write the summary");
    println!("written to {}", summary.display());
}

criterion_group!(benches, distributed);
criterion_main!(benches);
