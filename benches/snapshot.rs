//! Snapshot throughput against its baseline in the same run: binary `COPY` of the same tables
//! to nowhere (the bytes are read and dropped), then acme's snapshot into a fresh raw layer.
//!
//! `ACME_BENCH_SF` sets the scale factor (default 0.1; the issue figures use 1).
//! Run: `cargo bench --bench snapshot`.

mod common;

use std::time::Duration;

use acme::core::AcmeConfig;
use acme::ingest::Snapshot;
use acme_testkit::{PgCluster, ScaleFactor};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use futures_util::StreamExt;

/// Set in a child run of this binary that takes one snapshot of the source at this URL and
/// prints its peak RSS: a fresh process, so the figure is the snapshot's alone (this process
/// also generated the data and ran the baseline).
const CHILD: &str = "ACME_BENCH_SNAPSHOT_CHILD";

/// One snapshot of the source at `url` into a fresh raw layer; the number of tables copied.
async fn snapshot_once(url: &str) -> usize {
    let dir = tempfile::tempdir().expect("tmp");
    let config =
        AcmeConfig::builder().source_url(url).storage_url(dir.path().display().to_string()).build().expect("config");
    Snapshot::new(config).await.expect("snapshot").tables.len()
}

fn snapshot_vs_copy(c: &mut Criterion) {
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    if let Ok(url) = std::env::var(CHILD) {
        runtime.block_on(snapshot_once(&url));
        println!("peak_rss_mib={:.0}", common::peak_rss_mib());
        std::process::exit(0);
    }
    let cluster = PgCluster::start().expect("PostgreSQL");
    let sf = common::scale();
    let (url, rows) = runtime.block_on(async {
        let url = cluster.create_database("bench_snapshot").await.expect("db");
        let client = acme_testkit::connect(&url).await.expect("connect");
        acme_testkit::create_source_schema(&client).await.expect("schema");
        let load = acme_testkit::bulk_load(&url, ScaleFactor::new(sf).expect("sf"), 42).await.expect("load");
        client.batch_execute("VACUUM ANALYZE").await.expect("vacuum");
        (url, load.customers + load.products + load.orders + load.order_items)
    });
    // The summary: both measured the same way in this run, and the snapshot's peak memory.
    let copy = || async {
        let client = acme_testkit::connect(&url).await.expect("connect");
        let mut bytes = 0usize;
        for table in acme_testkit::TABLES {
            let stream =
                client.copy_out(&format!("COPY operations.{table} TO STDOUT (FORMAT binary)")).await.expect("copy");
            futures_util::pin_mut!(stream);
            while let Some(chunk) = stream.next().await {
                bytes += chunk.expect("chunk").len();
            }
        }
        bytes
    };
    // The answer first: one snapshot stores exactly the rows the source holds, per table.
    runtime.block_on(async {
        let dir = tempfile::tempdir().expect("tmp");
        let config = AcmeConfig::builder()
            .source_url(&url)
            .storage_url(dir.path().display().to_string())
            .build()
            .expect("config");
        let report = Snapshot::new(config).await.expect("snapshot");
        let client = acme_testkit::connect(&url).await.expect("connect");
        for table in acme_testkit::TABLES {
            let source: i64 =
                client.query_one(&format!("SELECT count(*) FROM operations.{table}"), &[]).await.expect("count").get(0);
            let stored = report.tables.iter().find(|t| t.table.rsplit('.').next() == Some(table)).map(|t| t.rows);
            assert_eq!(
                stored,
                Some(source as u64),
                "{table}: the snapshot's rows against the source's; nothing is timed"
            );
        }
    });
    let snapshot = || snapshot_once(&url);
    let runs = 5;
    let copy_time = runtime.block_on(common::median(runs, copy));
    let snapshot_time = runtime.block_on(common::median(runs, snapshot));
    let rss = common::child_peak_rss_mib(CHILD, std::ffi::OsStr::new(&url));
    let summary = format!(
        "## Snapshot, SF{sf} ({rows} rows)\n\n| figure | value |\n|---|---|\n\
         | binary COPY of the same tables to nowhere (one connection) | {:.2} s |\n\
         | acme snapshot to the raw layer | {:.2} s |\n\
         | acme / COPY | {:.2}x |\n\
         | peak RSS of one snapshot, in a process of its own | {rss:.0} MiB |\n",
        copy_time.as_secs_f64(),
        snapshot_time.as_secs_f64(),
        snapshot_time.as_secs_f64() / copy_time.as_secs_f64(),
    );
    println!("{summary}");
    let dir = common::root().join(format!("sf{sf}-seed{}", common::SEED));
    std::fs::create_dir_all(&dir).expect("bench data dir");
    std::fs::write(dir.join("snapshot-summary.md"), &summary).expect("write the summary");

    let mut group = c.benchmark_group(format!("snapshot_sf{sf}"));
    group.sample_size(10).measurement_time(Duration::from_secs(30)).throughput(Throughput::Elements(rows));
    group.bench_function("baseline_copy_binary_to_nowhere", |b| b.to_async(&runtime).iter(copy));
    group.bench_function("acme_snapshot_to_raw_layer", |b| b.to_async(&runtime).iter(snapshot));
    group.finish();
}

criterion_group!(benches, snapshot_vs_copy);
criterion_main!(benches);
