//! The reports, now and as of instants picked at random, against two references written apart
//! from acme: PostgreSQL's answer now (`acme_testkit::oracle`), and a row-by-row replay of the
//! raw changes (`acme_testkit::replay`) at every instant. Each seed runs its own random history:
//! the live workload's mix (inserts, updates, deletes) with, between its rounds, several changes
//! of one key in one transaction, a status moved back and forth, late-arriving customers, a
//! deleted and re-inserted key, a long transaction across others, and a `TRUNCATE`.
//!
//! The instants: exactly a commit's time, between two neighbouring commits (which one
//! micro-batch often stored together), at random between the first and the last commit, just
//! before a key's first change, and the same instants written with a non-UTC offset through the
//! HTTP service (all four reports). The answers are checked while the pipeline holds a raw
//! tail, and again after a model build folded every change in.
//!
//! `ACME_ASOF_SEEDS` (comma-separated) replaces the default seeds; every failure names its seed.

use chrono::{DateTime, FixedOffset, SecondsFormat, Utc};

use acme::Pipeline;
use acme::http::{ServiceState, router};
use acme::model::ModelBuild;
use acme::query::Warehouse;
use acme_testkit::WorkloadConfig;
use acme_testkit::rng::SplitMix64;

mod support;

const DEFAULT_SEEDS: [u64; 3] = [5101, 5102, 5103];

fn seeds() -> Vec<u64> {
    match std::env::var("ACME_ASOF_SEEDS") {
        Ok(list) => {
            list.split(',').map(|s| s.trim().parse().expect("ACME_ASOF_SEEDS: comma-separated integers")).collect()
        }
        Err(_) => DEFAULT_SEEDS.to_vec(),
    }
}

fn utc(micros: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_micros(micros).expect("instant in range")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reports_as_of_random_instants_equal_a_row_by_row_replay_of_the_changes() {
    for seed in seeds() {
        random_history(seed).await;
    }
}

/// One workload round of `transactions`, as fast as possible.
fn round(seed: u64, transactions: u64) -> WorkloadConfig {
    // The default mix: two connections, deletes included.
    WorkloadConfig { seed, rate_tps: 0.0, transactions: Some(transactions), ..WorkloadConfig::default() }
}

async fn random_history(seed: u64) {
    println!("as-of history, seed {seed}");
    let url = acme_testkit::acme_database(&format!("asof_{seed}"), Some((0.002, seed))).await.expect("source");
    let client = acme_testkit::connect(&url).await.expect("connect");
    let long = acme_testkit::connect(&url).await.expect("second connection");
    let dir = tempfile::tempdir().expect("tmp");
    let config = support::config(&url, dir.path());
    // Model builds fold the tail in from time to time: instants land in the stored model and in
    // the tail.
    let pipeline = Pipeline::builder(config.clone()).fold_ratio(0.01).start().await.expect("start");
    let mut rng = SplitMix64::new(seed);
    let order_at =
        |offset: u64| format!("(SELECT order_id FROM operations.orders ORDER BY order_id OFFSET {offset} LIMIT 1)");
    let late_customer = 900_000 + seed as i64;
    for step in 0..5u64 {
        acme_testkit::run_workload(&url, &round(seed * 100 + step, 40 + rng.range(0, 40))).await.expect("workload");
        let sql = match step {
            // Several changes of one key in one transaction, then its status back again.
            0 => {
                let order = order_at(rng.range(0, 100));
                format!(
                    "BEGIN; \
                     UPDATE operations.orders SET status = 'PROCESSING' WHERE order_id = {order}; \
                     UPDATE operations.orders SET status = 'PENDING' WHERE order_id = {order}; \
                     UPDATE operations.orders SET status = 'REPROCESSING', delivery_date = delivery_date + 1 \
                       WHERE order_id = {order}; \
                     COMMIT; \
                     UPDATE operations.orders SET status = 'PENDING' WHERE order_id = {order}"
                )
            }
            // Orders of a customer that does not exist yet (enough to lead R4), then a long
            // transaction opened on the second connection.
            1 => {
                long.batch_execute(
                    "BEGIN; INSERT INTO operations.orders (order_date, delivery_date, customer_id, status, created_at) \
                     VALUES (current_date, current_date + 10, 1, 'PENDING', now())",
                )
                .await
                .expect("long transaction");
                format!(
                    "INSERT INTO operations.orders (order_date, delivery_date, customer_id, status, created_at) \
                     SELECT current_date, current_date + 10, {late_customer}, 'PENDING', now() FROM generate_series(1, 40)"
                )
            }
            // The customer arrives; the long transaction commits after everything since; a key
            // is deleted.
            2 => {
                long.batch_execute("COMMIT").await.expect("commit the long transaction");
                let order = order_at(rng.range(100, 200));
                format!(
                    "INSERT INTO operations.customers (customer_id, customer_name, is_active, created_at) \
                     VALUES ({late_customer}, 'Late {seed}', true, now()); \
                     CREATE TEMP TABLE gone AS SELECT * FROM operations.orders WHERE order_id = {order}; \
                     DELETE FROM operations.orders WHERE order_id IN (SELECT order_id FROM gone)"
                )
            }
            // The deleted key comes back, open.
            3 => {
                "INSERT INTO operations.orders (order_id, order_date, delivery_date, customer_id, status, created_at) \
                  SELECT order_id, order_date, delivery_date, customer_id, 'PROCESSING', now() FROM gone"
                    .to_string()
            }
            // Every item goes, and new ones come for open orders.
            _ => "TRUNCATE operations.order_items; \
                  INSERT INTO operations.order_items (order_id, product_id, quanity, created_at) \
                  SELECT order_id, 1 + order_id % 7, 1 + order_id % 5, now() FROM operations.orders \
                  WHERE status <> 'COMPLETED' ORDER BY order_id LIMIT 50"
                .to_string(),
        };
        client.batch_execute(&sql).await.unwrap_or_else(|e| panic!("seed {seed}, step {step}: {e}"));
    }
    let warehouse = pipeline.caught_up().await.expect("caught up");

    // The replay of every raw change.
    let replay = support::replay(&warehouse).await;
    let now = acme_testkit::oracle::source_reports(&client, 3).await.expect("oracle");
    assert_eq!(replay.reports(None, 3), now, "seed {seed}: the replay of the raw layer vs PostgreSQL now");
    assert_eq!(support::reports(&warehouse, 3).await, now, "seed {seed}: acme vs PostgreSQL now");

    // The instants.
    let times = replay.commit_times();
    assert!(times.len() > 100, "seed {seed}: a history of {} commits", times.len());
    let pick = |rng: &mut SplitMix64, n: usize| -> usize { rng.range(0, n as u64) as usize };
    let mut instants: Vec<(i64, &str)> = Vec::new();
    for _ in 0..6 {
        instants.push((times[pick(&mut rng, times.len())], "a commit's time"));
        let i = pick(&mut rng, times.len() - 1);
        if times[i + 1] - times[i] >= 2 {
            instants.push(((times[i] + times[i + 1]) / 2, "between two commits"));
        }
    }
    let (first, last) = (times[0], times[times.len() - 1]);
    for _ in 0..4 {
        instants.push((first + rng.range(0, (last - first) as u64) as i64, "at random"));
    }
    instants.push((last, "the last commit's time"));
    let inserted = replay.inserted_keys("orders");
    for _ in 0..3 {
        let key = inserted[pick(&mut rng, inserted.len())];
        let t = replay.first_change("orders", key).expect("inserted");
        instants.push((t - 1, "just before a key's first change"));
    }
    if let Some(t) = replay.snapshot_time() {
        instants.push((t, "the snapshot's time"));
    }
    let late = replay.first_change("customers", late_customer).expect("the late customer arrived");
    instants.push((late - 1, "just before the late customer arrived"));
    instants.push((late, "when the late customer arrived"));

    assert_as_of(&warehouse, &replay, &instants, &format!("seed {seed}, with the raw tail")).await;
    let before = replay.reports(Some(late - 1), 3)[4].clone();
    let after = replay.reports(Some(late), 3)[4].clone();
    assert_ne!(before, after, "seed {seed}: the late customer's name arrives in R4");

    // The same instants with non-UTC offsets, through the HTTP service (all four reports).
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let state = ServiceState::pipeline(&pipeline);
    let server = tokio::spawn(async move { axum::serve(listener, router(state)).await });
    for (i, (t, what)) in instants.iter().enumerate() {
        let offset = if i % 2 == 0 { FixedOffset::east_opt(5 * 3600 + 1800) } else { FixedOffset::west_opt(8 * 3600) };
        let written = utc(*t).with_timezone(&offset.expect("offset")).to_rfc3339_opts(SecondsFormat::Micros, false);
        let query = written.replace('+', "%2B");
        let expected = replay.reports(Some(*t), 3);
        let r1 = http_rows(
            addr,
            &format!("/analytics/orders?status=open&as_of={query}"),
            &["delivery_date", "status", "quantity"],
        )
        .await;
        assert_eq!(r1, expected[0], "seed {seed}: R1 as of {written} ({what})");
        let r2 =
            http_rows(addr, &format!("/analytics/orders/top?limit=3&as_of={query}"), &["delivery_date", "quantity"])
                .await;
        assert_eq!(r2, expected[2], "seed {seed}: R2 as of {written} ({what})");
        let r3 =
            http_rows(addr, &format!("/analytics/orders/product?as_of={query}"), &["product_id", "total_items"]).await;
        assert_eq!(r3, expected[3], "seed {seed}: R3 as of {written} ({what})");
        let r4 = http_rows(
            addr,
            &format!("/analytics/orders/customers?status=pending&limit=3&as_of={query}"),
            &["customer_id", "customer_name", "quantity", "ranking"],
        )
        .await;
        assert_eq!(r4, expected[4], "seed {seed}: R4 as of {written} ({what})");
    }
    server.abort();
    pipeline.shutdown().await.expect("shutdown");

    // A build folds every change into the stored model: the same answers from it.
    ModelBuild::new(config.clone()).await.expect("model build");
    let stored = Warehouse::open(&config.storage_url).await.expect("open");
    assert_eq!(stored.tail().map(|t| t.changes), Some(0), "seed {seed}: no raw tail after the build");
    assert_as_of(&stored, &replay, &instants, &format!("seed {seed}, from the stored model")).await;
}

/// The reports of `w` as of each instant, and its histories, equal the replay's.
async fn assert_as_of(w: &Warehouse, replay: &acme_testkit::replay::Replay, instants: &[(i64, &str)], context: &str) {
    for (t, what) in instants {
        assert_eq!(
            support::reports_as_of(w, 3, Some(utc(*t))).await,
            replay.reports(Some(*t), 3),
            "{context}: as of {} ({what})",
            utc(*t)
        );
    }
    support::assert_histories(w, replay, context).await;
}

/// A report from the HTTP service, rendered like the oracle's rows.
async fn http_rows(addr: std::net::SocketAddr, path: &str, fields: &[&str]) -> Vec<String> {
    let path = path.to_string();
    let body = tokio::task::spawn_blocking(move || {
        use std::io::{Read, Write};
        let mut stream = std::net::TcpStream::connect(addr).expect("connect");
        write!(stream, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").expect("send");
        let mut response = String::new();
        stream.read_to_string(&mut response).expect("read");
        assert!(response.starts_with("HTTP/1.1 200"), "{path}: {response}");
        response.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default()
    })
    .await
    .expect("request");
    let rows: Vec<serde_json::Value> = serde_json::from_str(&body).expect("a JSON array");
    support::json_rows(&rows, fields)
}

/// Readers during writers: while the workload writes and the pipeline captures, builds the
/// model and compacts, readers take the pipeline's newest handle or open the warehouse afresh,
/// again and again, and the outside reader (delta-rs and DuckDB over the presentation tables,
/// pinned to `_acme/model.json`) runs beside them. None errors, and each read equals the
/// row-by-row replay at the position it answers at (the raw position for acme's handles, the
/// model position for the outside reader): never a mixed state.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readers_during_writers_each_see_the_state_at_a_committed_position() {
    let seed = 5201;
    let url = acme_testkit::acme_database("readers", Some((0.002, seed))).await.expect("source");
    let dir = tempfile::tempdir().expect("tmp");
    let config = support::config(&url, dir.path());
    // Builds often (a small fold ratio, checked every 300 ms), so that readers meet them.
    let pipeline = Pipeline::builder(config.clone())
        .fold_ratio(0.01)
        .model_interval(std::time::Duration::from_millis(300))
        .start()
        .await
        .expect("start");
    // The outside reader (delta-rs and DuckDB, pinned to `_acme/model.json`), again and again
    // in a thread of its own while the writers run.
    let writing = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let outside_reads: std::sync::Arc<std::sync::Mutex<Vec<OutsideRead>>> = Default::default();
    let outside = {
        let (writing, outside_reads) = (std::sync::Arc::clone(&writing), std::sync::Arc::clone(&outside_reads));
        let dir = dir.path().to_path_buf();
        std::thread::spawn(move || {
            while writing.load(std::sync::atomic::Ordering::SeqCst) {
                let read = outside_reports(&dir);
                outside_reads.lock().expect("outside reads").push(read);
            }
        })
    };
    let mut reads: Vec<(i64, Vec<Vec<String>>, &str)> = Vec::new();
    let mut i = 0;
    // Bursts of writes, 8 s and then 4 s more (three times at most), until the outside reader
    // has read at two model positions: each of its reads starts a Python process, so on a busy
    // machine one burst may hold too few of them to meet a build.
    for burst in 0..4u64 {
        let writer = {
            let url = url.clone();
            tokio::spawn(async move {
                let mut workload = round(seed + burst, 0);
                workload.transactions = None;
                workload.rate_tps = 200.0;
                workload.duration = Some(std::time::Duration::from_secs(if burst == 0 { 8 } else { 4 }));
                acme_testkit::run_workload(&url, &workload).await
            })
        };
        while !writer.is_finished() {
            let (w, kind) = if i % 3 == 2 {
                (
                    std::sync::Arc::new(Warehouse::open(&config.storage_url).await.expect("open afresh")),
                    "a fresh handle",
                )
            } else {
                (pipeline.warehouse(), "the pipeline's handle")
            };
            let position = w.raw_position().expect("a raw position").as_stored();
            reads.push((position, support::reports(&w, 3).await, kind));
            i += 1;
        }
        writer.await.expect("join").expect("workload");
        let seen: std::collections::BTreeSet<i64> =
            outside_reads.lock().expect("outside reads").iter().map(|(p, _)| *p).collect();
        if seen.len() >= 2 {
            break;
        }
    }
    writing.store(false, std::sync::atomic::Ordering::SeqCst);
    outside.join().expect("the outside reader's thread");
    let outside = std::mem::take(&mut *outside_reads.lock().expect("outside reads"));
    let warehouse = pipeline.caught_up().await.expect("caught up");
    let replay = support::replay(&warehouse).await;
    assert!(outside.len() >= 2, "the outside reader read during the writes ({} reads)", outside.len());
    let model_positions: std::collections::BTreeSet<i64> = outside.iter().map(|(p, _)| *p).collect();
    assert!(model_positions.len() >= 2, "the outside reader saw model builds commit: positions {model_positions:?}");
    eprintln!("outside reader: {} reads at {} model positions", outside.len(), model_positions.len());
    for (position, answers) in &outside {
        let expected = replay.reports_at_position(*position, 3);
        let expected = vec![expected[0].clone(), expected[3].clone(), expected[4].clone()];
        assert_eq!(answers, &expected, "the outside reader at model position {position} (R1, R3, R4)");
    }
    let positions: std::collections::BTreeSet<i64> = reads.iter().map(|(p, ..)| *p).collect();
    assert!(
        positions.len() > 5,
        "the readers saw the warehouse move: {} positions in {} reads",
        positions.len(),
        reads.len()
    );
    for (position, answers, kind) in &reads {
        assert_eq!(answers, &replay.reports_at_position(*position, 3), "a read of {kind} at raw position {position}");
    }
    pipeline.shutdown().await.expect("shutdown");
}

/// Run the outside reader (`acme-query/tests/readers/presentation_reports.py`) on the
/// warehouse at `dir`: the model position it read at, and R1 (open), R3 and R4 (pending, top 3)
/// rendered as the replay renders them.
/// What one outside read answered: the model position, and R1, R3 and R4.
type OutsideRead = (i64, Vec<Vec<String>>);

fn outside_reports(dir: &std::path::Path) -> OutsideRead {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/acme-query/tests/readers/presentation_reports.py");
    let python = acme_testkit::outside::python().expect("the Python environment");
    let output = std::process::Command::new(python).arg(script).arg(dir).output().expect("run the outside reader");
    assert!(
        output.status.success(),
        "the outside reader failed ({}): {}{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    let json: serde_json::Value = serde_json::from_slice(&output.stdout).expect("JSON from the outside reader");
    let position = json["position"].as_i64().expect("the reader read a model manifest");
    let rows = |name: &str| -> Vec<String> {
        json[name]
            .as_array()
            .expect("rows")
            .iter()
            .map(|row| row.as_array().expect("a row").iter().map(support::json_cell).collect::<Vec<_>>().join("|"))
            .collect()
    };
    (position, vec![rows("r1"), rows("r3"), rows("r4")])
}
