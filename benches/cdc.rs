//! Change data capture: throughput against PostgreSQL's own decoders on the same changes, and
//! commit-to-queryable latency under a steady 1,000 transactions per second.
//!
//! Throughput: slots are created first, then the same changes are written once (bulk updates
//! of the orders, `ACME_BENCH_CHANGES` rows, default 200,000, in transactions of 10,000), then
//! each reader consumes all of them:
//! - `pg_recvlogical` (the streaming protocol, output to /dev/null): the baseline;
//! - `pg_logical_slot_peek_binary_changes` counted on the server (the SQL-function rate);
//! - acme streaming (`CdcMode::Stream`) and acme SQL polling (`CdcMode::SqlPoll`), each
//!   decoding into Arrow and committing to a fresh raw layer.
//!
//! The trigger fallback (`CdcMode::Triggers`): the same updates written a second time with the
//! capture triggers installed, timed against the first pass (the source's extra cost), then
//! captured from the changelog into a fresh raw layer.
//!
//! Latency: the live workload runs at 1,000 tx/s while acme streams; every 20 ms a stamped
//! order is inserted (`created_by = -1`, `updated_by` = its number), and a reader opening the warehouse every 10 ms records when each stamp
//! becomes visible to a query. p50/p95/p99 of commit-to-queryable.
//!
//! Run: `cargo bench --bench cdc`. Writes `bench-data/cdc-summary.md`.

use std::process::Command;
use std::time::{Duration, Instant};

use acme::core::{AcmeConfig, CdcMode};
use acme::ingest::ChangeStream;
use acme::query::Warehouse;
use acme_testkit::{PgCluster, ScaleFactor, WorkloadConfig};

/// jemalloc instead of glibc's malloc: with tokio's worker and blocking threads, glibc keeps the
/// memory the pipeline frees in per-thread arenas, and a SF10 snapshot whose live heap stays
/// under 300 MiB held 1.5 GiB of RSS (README, "Memory").
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Pause of the latency probe between two looks at the warehouse.
const PROBE_PAUSE: Duration = Duration::from_millis(50);

/// The latency run's workload: 1,000 tx/s of the live mix over 4 connections for `seconds`.
fn latency_workload(seed: u64, seconds: u64) -> WorkloadConfig {
    WorkloadConfig {
        seed,
        rate_tps: 1000.0,
        transactions: None,
        duration: Some(Duration::from_secs(seconds)),
        connections: 4,
        deletes: true,
        inserts_only: false,
    }
}

fn changes_wanted() -> u64 {
    std::env::var("ACME_BENCH_CHANGES").ok().and_then(|v| v.parse().ok()).unwrap_or(200_000)
}

fn config(url: &str, dir: &std::path::Path, slot: &str, mode: CdcMode) -> AcmeConfig {
    AcmeConfig::builder()
        .source_url(url)
        .storage_url(dir.display().to_string())
        .slot(slot)
        .cdc_mode(mode)
        .build()
        .expect("config")
}

#[tokio::main]
async fn main() {
    let cluster = PgCluster::start().expect("PostgreSQL");
    let url = cluster.create_database("bench_cdc").await.expect("database");
    let client = acme_testkit::connect(&url).await.expect("connect");
    acme_testkit::create_source_schema(&client).await.expect("schema");
    let wanted = changes_wanted();
    // Enough orders that the updates touch distinct rows.
    let sf = (wanted as f64 / 1_000_000.0).max(0.05);
    acme_testkit::bulk_load(&url, ScaleFactor::new(sf).expect("sf"), 42).await.expect("load");
    let mut summary = String::new();

    // Readers positioned before the changes.
    let stream_dir = tempfile::tempdir().expect("tmp");
    let sql_dir = tempfile::tempdir().expect("tmp");
    let mut acme_stream =
        ChangeStream::open(config(&url, stream_dir.path(), "bench_stream", CdcMode::Stream)).await.expect("open");
    let mut acme_sql =
        ChangeStream::open(config(&url, sql_dir.path(), "bench_sql", CdcMode::SqlPoll)).await.expect("open");
    for slot in ["bench_recvlogical", "bench_peek"] {
        client
            .execute("SELECT pg_create_logical_replication_slot($1, 'pgoutput')", &[&slot])
            .await
            .expect("baseline slot");
    }
    // The changes: bulk updates of distinct orders.
    let per_tx = 10_000u64;
    let (written, plain_write) = write_changes(&client, wanted, per_tx).await;
    let end: String = client.query_one("SELECT pg_current_wal_lsn()::text", &[]).await.expect("lsn").get(0);
    println!("{written} changes written; reading them back with each decoder");

    // pg_recvlogical, streaming to /dev/null until the end position.
    let bindir = acme_testkit::cluster::find_bindir().expect("PostgreSQL binaries");
    let started = Instant::now();
    let recv = bindir.join("pg_recvlogical");
    let recv = if recv.is_file() { recv } else { "pg_recvlogical".into() };
    let status = Command::new(recv)
        .args(["-d", &url, "--slot", "bench_recvlogical", "--start", "--endpos", &end, "-f", "/dev/null", "--no-loop"])
        .args(["-o", "proto_version=1", "-o", "publication_names=acme_publication", "-o", "binary=true"])
        .status()
        .expect("pg_recvlogical");
    assert!(status.success(), "pg_recvlogical failed");
    let recvlogical = started.elapsed();

    let started = Instant::now();
    let peeked: i64 = client
        .query_one(
            "SELECT count(*) FROM pg_logical_slot_peek_binary_changes('bench_peek', $1::text::pg_lsn, NULL, \
             'proto_version', '1', 'publication_names', 'acme_publication', 'binary', 'true')",
            &[&end],
        )
        .await
        .expect("peek")
        .get(0);
    let peek = started.elapsed();

    let started = Instant::now();
    let streamed = acme_stream.catch_up().await.expect("acme stream");
    let stream_time = started.elapsed();
    let started = Instant::now();
    let polled = acme_sql.catch_up().await.expect("acme sql poll");
    let sql_time = started.elapsed();
    assert_eq!(streamed.changes, polled.changes, "both acme modes store the same changes");
    assert!(streamed.changes >= written, "acme stored every change");

    let rate = |d: Duration| written as f64 / d.as_secs_f64();
    // The SQL function stops at the flushed WAL: its rate counts the messages it returned.
    let peek_rate = peeked as f64 / peek.as_secs_f64();
    summary.push_str(&format!(
        "## CDC throughput: {written} changed rows ({} per transaction)\n\n\
         | reader | time (s) | rows/s | vs pg_recvlogical |\n|---|---|---|---|\n\
         | pg_recvlogical to /dev/null (baseline) | {:.2} | {:.0} | 1.00x |\n\
         | pg_logical_slot_peek_binary_changes, counted on the server (rate of its {peeked} messages) | {:.2} | {:.0} | {:.2}x |\n\
         | acme streaming, decoded and committed to the raw layer | {:.2} | {:.0} | {:.2}x |\n\
         | acme SQL polling, decoded and committed to the raw layer | {:.2} | {:.0} | {:.2}x |\n\n",
        per_tx,
        recvlogical.as_secs_f64(),
        rate(recvlogical),
        peek.as_secs_f64(),
        peek_rate,
        peek_rate / rate(recvlogical),
        stream_time.as_secs_f64(),
        rate(stream_time),
        rate(stream_time) / rate(recvlogical),
        sql_time.as_secs_f64(),
        rate(sql_time),
        rate(sql_time) / rate(recvlogical),
    ));
    drop(acme_sql);

    // Latency at 1,000 tx/s.
    let seconds = std::env::var("ACME_BENCH_SECONDS").ok().and_then(|v| v.parse().ok()).unwrap_or(20u64);
    let warehouse = stream_dir.path().display().to_string();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let runner = tokio::spawn(async move {
        acme_stream.run_until(Duration::from_millis(50), async { stop_rx.await.unwrap_or(()) }).await.expect("stream");
    });
    let load = {
        let url = url.clone();
        tokio::spawn(
            async move { acme_testkit::run_workload(&url, &latency_workload(7, seconds)).await.expect("workload") },
        )
    };
    let stamps = {
        let url = url.clone();
        tokio::spawn(async move {
            let client = acme_testkit::connect(&url).await.expect("connect");
            let mut committed = Vec::new();
            let until = Instant::now() + Duration::from_secs(seconds.saturating_sub(1));
            let mut n = 0u64;
            while Instant::now() < until {
                client
                    .execute(
                        "INSERT INTO operations.orders (order_date, delivery_date, customer_id, status, created_by, \
                         updated_by) VALUES (current_date, current_date + 3, 1, 'PENDING', -1, $1)",
                        &[&(n as i64)],
                    )
                    .await
                    .expect("stamp");
                committed.push(Instant::now());
                n += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            committed
        })
    };
    let mut seen: Vec<Option<Instant>> = Vec::new();
    // How long one look takes: a stamp is seen at most one pause and two looks after it became
    // queryable. Each look opens the whole warehouse: the pause keeps the probe from taking a
    // core of its own away from the source's workload (with 10 ms pauses it did).
    let mut looks: Vec<f64> = Vec::new();
    while !stamps.is_finished() {
        let started = Instant::now();
        observe(&warehouse, &mut seen).await;
        looks.push(started.elapsed().as_secs_f64() * 1000.0);
        tokio::time::sleep(PROBE_PAUSE).await;
    }
    looks.sort_by(f64::total_cmp);
    let committed = stamps.await.expect("stamps");
    let deadline = Instant::now() + Duration::from_secs(30);
    while (seen.len() < committed.len() || seen.iter().take(committed.len()).any(Option::is_none))
        && Instant::now() < deadline
    {
        observe(&warehouse, &mut seen).await;
        tokio::time::sleep(PROBE_PAUSE).await;
    }
    let series: Vec<(f64, f64)> = committed
        .iter()
        .zip(&seen)
        .filter_map(|(c, s)| {
            let at = c.saturating_duration_since(committed[0]).as_secs_f64() * 1000.0;
            s.map(|s| (at, s.saturating_duration_since(*c).as_secs_f64() * 1000.0))
        })
        .collect();
    // In commit order, to see when the slow stamps were written.
    let lines: Vec<String> = series.iter().map(|(at, l)| format!("{at:.0},{l:.1}")).collect();
    std::fs::create_dir_all(concat!(env!("CARGO_MANIFEST_DIR"), "/bench-data")).expect("dir");
    std::fs::write(
        concat!(env!("CARGO_MANIFEST_DIR"), "/bench-data/cdc-latency-series.csv"),
        format!("committed_ms,latency_ms\n{}\n", lines.join("\n")),
    )
    .expect("latency series");
    let mut latencies: Vec<f64> = series.iter().map(|(_, l)| *l).collect();
    assert_eq!(latencies.len(), committed.len(), "every stamp became queryable");
    latencies.sort_by(f64::total_cmp);
    let pct = |p: f64| latencies[((latencies.len() as f64 - 1.0) * p).round() as usize];
    let report = load.await.expect("load");
    summary.push_str(&format!(
        "## Commit-to-queryable latency at {:.0} tx/s ({} stamps over {seconds} s, visible to a freshly opened \
         `Warehouse`)\n\n| p50 | p95 | p99 | max | one look of the probe (open + scan), p50 / max |\n|---|---|---|---|---|\n\
         | {:.0} ms | {:.0} ms | {:.0} ms | {:.0} ms | {:.0} / {:.0} ms |\n",
        report.transactions as f64 / seconds as f64,
        latencies.len(),
        pct(0.5),
        pct(0.95),
        pct(0.99),
        latencies.last().copied().unwrap_or(0.0),
        looks.get(looks.len() / 2).copied().unwrap_or(0.0),
        looks.last().copied().unwrap_or(0.0),
    ));
    let raw: Vec<String> = latencies.iter().map(|l| format!("{l:.1}")).collect();
    std::fs::write(concat!(env!("CARGO_MANIFEST_DIR"), "/bench-data/cdc-latencies.txt"), raw.join("\n"))
        .expect("latencies");
    stop_tx.send(()).ok();
    runner.await.expect("runner");
    // What the source manages alone on this machine: the same workload with no capture reading
    // and no probe. The latency run shares the 2 cores with acme and the probe, and falls short
    // of 1,000 tx/s when they take too much of them.
    let alone = acme_testkit::run_workload(&url, &latency_workload(8, 5)).await.expect("workload alone");
    summary.push_str(&format!(
        "\nThe same workload alone (no capture reading, no probe; 5 s): {:.0} tx/s.\n",
        alone.transactions as f64 / alone.elapsed.as_secs_f64()
    ));
    // The trigger fallback, last (its second pass of changes must not weigh on the latency
    // run): the same changes written again with the capture triggers installed (the source's
    // cost), then captured from the changelog.
    let trigger_dir = tempfile::tempdir().expect("tmp");
    let mut acme_triggers =
        ChangeStream::open(config(&url, trigger_dir.path(), "bench_triggers", CdcMode::Triggers)).await.expect("open");
    let (rewritten, trigger_write) = write_changes(&client, wanted, per_tx).await;
    let started = Instant::now();
    let captured = acme_triggers.catch_up().await.expect("acme triggers");
    let trigger_time = started.elapsed();
    assert!(captured.changes >= rewritten, "the trigger fallback stored every change");
    drop(acme_triggers);
    let mut tables = Vec::new();
    for name in acme_testkit::TABLES {
        tables.push(acme::ingest::SourceTable::load(&client, "operations", name).await.expect("table"));
    }
    acme::ingest::triggers::Changelog::new("bench_triggers").uninstall(&client, &tables).await.expect("uninstall");
    let rewrite_rate = rewritten as f64 / trigger_time.as_secs_f64();
    summary.push_str(&format!(
        "Trigger fallback (`CdcMode::Triggers`) on the same kind of changes ({rewritten} rows, written again):\n\n\
         | figure | time (s) | ratio |\n|---|---|---|\n\
         | source writes without triggers (the first pass) | {:.2} | 1.00x |\n\
         | source writes with the capture triggers | {:.2} | {:.2}x |\n\
         | acme capture from the changelog, committed to the raw layer | {:.2} ({rewrite_rate:.0} rows/s) | {:.2}x of pg_recvlogical's rate |\n\n",
        plain_write.as_secs_f64(),
        trigger_write.as_secs_f64(),
        trigger_write.as_secs_f64() / plain_write.as_secs_f64(),
        trigger_time.as_secs_f64(),
        rewrite_rate / rate(recvlogical),
    ));

    println!("\n{summary}");
    std::fs::write(concat!(env!("CARGO_MANIFEST_DIR"), "/bench-data/cdc-summary.md"), &summary).expect("summary");
}

/// Update `wanted` distinct orders (flipping their status) in transactions of `per_tx` rows;
/// returns the rows changed and the time taken.
async fn write_changes(client: &tokio_postgres::Client, wanted: u64, per_tx: u64) -> (u64, Duration) {
    let started = Instant::now();
    let mut written = 0u64;
    while written < wanted {
        let n = client
            .execute(
                "UPDATE operations.orders SET status = CASE WHEN status = 'PENDING' THEN 'PROCESSING' ELSE 'PENDING' END, \
                 updated_by = 0 WHERE order_id > $1 AND order_id <= $2",
                &[&(written as i64), &((written + per_tx) as i64)],
            )
            .await
            .expect("update");
        written += n.max(1);
    }
    (written, started.elapsed())
}

/// Open the warehouse as a reader would and note when each stamp is first visible.
async fn observe(warehouse: &str, seen: &mut Vec<Option<Instant>>) {
    let Ok(w) = Warehouse::open(warehouse).await else { return };
    let batches = w
        .sql("SELECT updated_by FROM raw_orders WHERE created_by = -1")
        .await
        .expect("query")
        .collect()
        .await
        .expect("collect");
    let now = Instant::now();
    for b in batches {
        let ids = acme::core::arrow::compute::cast(b.column(0), &acme::core::arrow::datatypes::DataType::Int64)
            .expect("cast");
        let ids = ids.as_any().downcast_ref::<acme::core::arrow::array::Int64Array>().expect("ids");
        for id in ids.values() {
            let id = *id as usize;
            if seen.len() <= id {
                seen.resize(id + 1, None);
            }
            seen[id].get_or_insert(now);
        }
    }
}
