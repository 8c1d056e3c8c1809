//! Change data capture: handoff from the snapshot, exactly-once restarts, faults, bad sources.

use std::time::Duration;

use acme_core::CdcMode;
use acme_ingest::{ChangeStream, IngestError};
use acme_testkit::{PgCluster, ScaleFactor, WorkloadConfig};

use crate::support::{acme_source, config, read_raw, replay_raw, source_state};

/// Tables, keys and the columns compared with the source (text forms that Arrow and
/// PostgreSQL render alike).
const CHECKED: [(&str, &str, &[&str]); 4] = [
    ("customers", "customer_id", &["customer_name", "customer_address", "is_active", "updated_by"]),
    ("products", "product_id", &["product_name", "barcode", "is_active", "updated_by"]),
    ("orders", "order_id", &["order_date", "delivery_date", "customer_id", "status", "updated_by"]),
    ("order_items", "order_item_id", &["order_id", "product_id", "quanity", "updated_by"]),
];

async fn assert_raw_equals_source(url: &str, warehouse: &std::path::Path) {
    for (table, key, columns) in CHECKED {
        let replayed = replay_raw(warehouse, table, key, columns).await;
        let source = source_state(url, table, key, columns).await;
        assert_eq!(replayed.len(), source.len(), "{table}: row count");
        for (k, values) in &source {
            assert_eq!(replayed.get(k), Some(values), "{table} key {k}");
        }
    }
}

fn stream_slot(url: &str) -> String {
    config(url, std::path::Path::new("/unused")).slot
}

fn workload(seed: u64, transactions: u64) -> WorkloadConfig {
    WorkloadConfig {
        seed,
        rate_tps: 0.0,
        transactions: Some(transactions),
        duration: None,
        connections: 2,
        deletes: true,
        inserts_only: false,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_after_a_snapshot_taken_under_load_equals_the_source() {
    handoff_under_load("cdc_handoff", CdcMode::Stream).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sql_polling_after_a_snapshot_taken_under_load_equals_the_source() {
    handoff_under_load("cdc_handoff_sql", CdcMode::SqlPoll).await;
}

async fn handoff_under_load(prefix: &str, mode: CdcMode) {
    let url = acme_source(prefix).await;
    acme_testkit::bulk_load(&url, ScaleFactor::new(0.005).expect("sf"), 31).await.expect("load");
    let dir = tempfile::tempdir().expect("tmp");
    let writer = {
        let url = url.clone();
        tokio::spawn(async move {
            let mut config = workload(32, 0);
            config.transactions = None;
            config.duration = Some(std::time::Duration::from_secs(3));
            acme_testkit::run_workload(&url, &config).await
        })
    };
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    let mut cfg = config(&url, dir.path());
    cfg.cdc_mode = mode;
    let mut stream = ChangeStream::open(cfg).await.expect("open (snapshot under load)");
    let during = writer.await.expect("join").expect("workload");
    assert!(during.transactions > 50, "the workload should write during the snapshot");
    stream.catch_up().await.expect("catch up");
    assert_raw_equals_source(&url, dir.path()).await;
    // More changes, including several changes of one key in one transaction.
    acme_testkit::run_workload(&url, &workload(33, 300)).await.expect("more");
    let report = stream.catch_up().await.expect("catch up again");
    assert!(report.changes > 0 && report.transactions > 0);
    assert_raw_equals_source(&url, dir.path()).await;
    // Idle: a heartbeat still advances the slot, so the source retains no WAL for acme.
    assert_eq!(stream.poll().await.expect("idle poll").changes, 0);
    let idle = stream.catch_up().await.expect("idle catch up");
    assert_eq!(idle.changes, 0);
    assert!(idle.confirmed > report.confirmed, "an idle stream must still move its slot");
    let client = acme_testkit::connect(&url).await.expect("connect");
    // The server applies the stream's standby status update on its own schedule: the slot
    // reaches the confirmed position shortly after the stream sent it, not at once.
    let mut slot = acme_ingest::Lsn::default();
    for _ in 0..100 {
        let confirmed: String = client
            .query_one(
                "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1",
                &[&stream_slot(&url)],
            )
            .await
            .expect("slot")
            .get(0);
        slot = acme_ingest::Lsn::parse(&confirmed).expect("lsn");
        if slot >= idle.confirmed {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(slot, idle.confirmed);
    assert!(stream.slot_lag_bytes().await.expect("lag") >= 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarting_the_stream_neither_duplicates_nor_skips_changes() {
    restart_rounds("cdc_restart", CdcMode::Stream).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarting_sql_polling_neither_duplicates_nor_skips_changes() {
    restart_rounds("cdc_restart_sql", CdcMode::SqlPoll).await;
}

async fn restart_rounds(prefix: &str, mode: CdcMode) {
    let url = acme_source(prefix).await;
    acme_testkit::bulk_load(&url, ScaleFactor::new(0.002).expect("sf"), 41).await.expect("load");
    let dir = tempfile::tempdir().expect("tmp");
    let mut cfg = config(&url, dir.path());
    cfg.max_batch_changes = 100;
    cfg.cdc_mode = mode;
    for round in 0..4u64 {
        let mut stream = ChangeStream::open(cfg.clone()).await.expect("open");
        acme_testkit::run_workload(&url, &workload(50 + round, 150)).await.expect("workload");
        // Read only part of the backlog before "crashing" (dropping the stream).
        stream.poll().await.expect("partial poll");
        drop(stream);
    }
    let mut stream = ChangeStream::open(cfg).await.expect("reopen");
    stream.catch_up().await.expect("catch up");
    // replay_raw also asserts that no (lsn, seq) is stored twice.
    assert_raw_equals_source(&url, dir.path()).await;
    // The micro-batches left many small files: compaction merges them, the rows stay, and the
    // stream goes on appending after it.
    let report = stream.compact().await.expect("compact");
    assert!(report.files_removed >= 8 && report.files_added < report.files_removed, "{report:?}");
    assert_raw_equals_source(&url, dir.path()).await;
    acme_testkit::run_workload(&url, &workload(60, 100)).await.expect("workload");
    stream.catch_up().await.expect("catch up after compaction");
    assert_raw_equals_source(&url, dir.path()).await;
}

/// `run_until` merges the raw tables' small files beside the stream and commits the merge
/// between two polls, while the workload goes on: afterwards the raw layer still equals the
/// source, with no change stored twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_running_stream_compacts_the_raw_tables_beside_the_stream() {
    let url = acme_source("cdc_background_compaction").await;
    acme_testkit::bulk_load(&url, ScaleFactor::new(0.002).expect("sf"), 43).await.expect("load");
    let dir = tempfile::tempdir().expect("tmp");
    let mut cfg = config(&url, dir.path());
    // Short rounds, so that the workload below spans several compactions.
    cfg.flush_interval = Duration::from_millis(20);
    let mut stream = ChangeStream::open(cfg).await.expect("open");
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let runner = tokio::spawn(async move {
        stream.run_until(Duration::from_millis(20), async { stop_rx.await.unwrap_or(()) }).await.map(|_| stream)
    });
    // Bursts of a steady workload until a compaction is committed (how many rounds that takes
    // depends on the machine's load; the deadline only keeps a regression from hanging).
    let log = dir.path().join("raw/orders/_delta_log");
    let compactions = || {
        let mut found = 0;
        for entry in std::fs::read_dir(&log).expect("raw orders log") {
            let path = entry.expect("entry").path();
            if path.extension().is_some_and(|e| e == "json") {
                found += usize::from(std::fs::read_to_string(&path).expect("commit").contains("\"OPTIMIZE\""));
            }
        }
        found
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(300);
    let mut burst = 0;
    while compactions() == 0 && std::time::Instant::now() < deadline {
        let steady = WorkloadConfig {
            rate_tps: 150.0,
            transactions: None,
            duration: Some(Duration::from_secs(2)),
            ..workload(44 + burst, 0)
        };
        acme_testkit::run_workload(&url, &steady).await.expect("workload");
        burst += 1;
    }
    stop_tx.send(()).expect("stop");
    let mut stream = runner.await.expect("join").expect("stream");
    stream.catch_up().await.expect("catch up");
    assert!(compactions() >= 1, "no compaction was committed to raw/orders while the stream ran ({burst} bursts)");
    // replay_raw also asserts that no (lsn, seq) is stored twice.
    assert_raw_equals_source(&url, dir.path()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn truncate_is_recorded_as_a_change() {
    let url = acme_source("cdc_truncate").await;
    acme_testkit::bulk_load(&url, ScaleFactor::new(0.001).expect("sf"), 61).await.expect("load");
    let dir = tempfile::tempdir().expect("tmp");
    let mut stream = ChangeStream::open(config(&url, dir.path())).await.expect("open");
    let client = acme_testkit::connect(&url).await.expect("connect");
    client
        .batch_execute(
            "TRUNCATE operations.order_items; INSERT INTO operations.order_items (order_id, product_id, quanity) VALUES (1, 1, 5)",
        )
        .await
        .expect("truncate");
    stream.catch_up().await.expect("catch up");
    let items = replay_raw(dir.path(), "order_items", "order_item_id", &["order_id", "quanity"]).await;
    assert_eq!(items.len(), 1);
    assert_eq!(items.values().next(), Some(&vec!["1".to_string(), "5".to_string()]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_slot_stops_with_a_resync_instruction() {
    let url = acme_source("cdc_slot").await;
    acme_testkit::bulk_load(&url, ScaleFactor::new(0.001).expect("sf"), 71).await.expect("load");
    let dir = tempfile::tempdir().expect("tmp");
    let cfg = config(&url, dir.path());
    let stream = ChangeStream::open(cfg.clone()).await.expect("open");
    drop(stream);
    let client = acme_testkit::connect(&url).await.expect("connect");
    client.execute("SELECT pg_drop_replication_slot($1)", &[&cfg.slot]).await.expect("drop slot");
    let err = ChangeStream::open(cfg.clone()).await.expect_err("slot is gone");
    assert!(matches!(err, IngestError::SlotLost { .. }), "{err:?}");
    assert!(err.to_string().contains(&cfg.slot) && err.to_string().contains("re-sync"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sources_that_cannot_replicate_get_errors_naming_the_fix() {
    let url = acme_source("cdc_bad").await;
    let client = acme_testkit::connect(&url).await.expect("connect");
    let dir = tempfile::tempdir().expect("tmp");
    client.batch_execute("ALTER TABLE operations.orders REPLICA IDENTITY DEFAULT").await.expect("alter");
    let err = ChangeStream::open(config(&url, dir.path())).await.expect_err("identity");
    assert!(err.to_string().contains("ALTER TABLE operations.orders REPLICA IDENTITY FULL"), "{err}");
    client.batch_execute("ALTER TABLE operations.orders REPLICA IDENTITY FULL").await.expect("alter back");

    let role = format!("noreplication_{}", std::process::id());
    client.batch_execute(&format!("CREATE ROLE {role} LOGIN; GRANT USAGE ON SCHEMA operations TO {role}; GRANT SELECT ON ALL TABLES IN SCHEMA operations TO {role}")).await.expect("role");
    let limited = url.replacen("postgres://postgres@", &format!("postgres://{role}@"), 1);
    let err = ChangeStream::open(config(&limited, dir.path())).await.expect_err("privilege");
    assert!(matches!(err, IngestError::NoReplicationPrivilege { .. }), "{err:?}");
    assert!(err.to_string().contains(&format!("ALTER ROLE {role} REPLICATION")), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slot_of_another_warehouse_is_never_taken_over() {
    let url = acme_source("cdc_shared_slot").await;
    acme_testkit::bulk_load(&url, ScaleFactor::new(0.001).expect("sf"), 72).await.expect("load");
    let first = tempfile::tempdir().expect("tmp");
    let second = tempfile::tempdir().expect("tmp");
    let mut stream = ChangeStream::open(config(&url, first.path())).await.expect("first warehouse");
    let err = ChangeStream::open(config(&url, second.path())).await.expect_err("same slot, other warehouse");
    assert!(matches!(err, IngestError::SlotInUse { .. }), "{err:?}");
    // The first warehouse still streams.
    acme_testkit::run_workload(&url, &workload(73, 50)).await.expect("workload");
    stream.catch_up().await.expect("first still streams");
    assert_raw_equals_source(&url, first.path()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stream_reconnects_after_a_terminated_backend_and_a_server_restart() {
    // A cluster of its own: restarting the shared one would disturb the other tests.
    let cluster = PgCluster::start().expect("PostgreSQL");
    let url = cluster.create_database("cdc_faults").await.expect("database");
    let client = acme_testkit::connect(&url).await.expect("connect");
    acme_testkit::create_source_schema(&client).await.expect("schema");
    acme_testkit::bulk_load(&url, ScaleFactor::new(0.002).expect("sf"), 81).await.expect("load");
    let dir = tempfile::tempdir().expect("tmp");
    let cfg = config(&url, dir.path());
    let mut stream = ChangeStream::open(cfg.clone()).await.expect("open");
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let runner = tokio::spawn(async move {
        stream.run_until(Duration::from_millis(50), async { stop_rx.await.unwrap_or(()) }).await.map(|_| stream)
    });
    acme_testkit::run_workload(&url, &workload(82, 150)).await.expect("workload before the faults");
    tokio::time::sleep(Duration::from_millis(300)).await;
    // 1. The walsender serving acme is terminated.
    let terminated: i64 = client
        .query_one(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_replication WHERE application_name = 'acme'",
            &[],
        )
        .await
        .expect("terminate")
        .get(0);
    assert_eq!(terminated, 1, "the stream's walsender was running");
    acme_testkit::run_workload(&url, &workload(83, 150)).await.expect("workload after the termination");
    tokio::time::sleep(Duration::from_millis(300)).await;
    // 2. The whole server restarts (fast shutdown) while the stream runs.
    drop(client);
    let restart = std::thread::spawn(move || {
        cluster.restart().expect("restart");
        cluster
    });
    let cluster = tokio::task::spawn_blocking(move || restart.join().expect("restart thread")).await.expect("join");
    acme_testkit::run_workload(&url, &workload(84, 150)).await.expect("workload after the restart");
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop_tx.send(()).expect("stop");
    let mut stream = runner.await.expect("join").expect("the stream recovered by itself");
    stream.catch_up().await.expect("catch up");
    // replay_raw also asserts that no (lsn, seq) is stored twice.
    assert_raw_equals_source(&url, dir.path()).await;
    drop(stream);
    drop(cluster);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_column_added_mid_stream_evolves_the_raw_schema_without_stopping() {
    let url = acme_source("cdc_add_column").await;
    acme_testkit::bulk_load(&url, ScaleFactor::new(0.001).expect("sf"), 91).await.expect("load");
    let dir = tempfile::tempdir().expect("tmp");
    let mut stream = ChangeStream::open(config(&url, dir.path())).await.expect("open");
    let client = acme_testkit::connect(&url).await.expect("connect");
    // One transaction writes rows before and after the new column appears.
    client
        .batch_execute(
            "BEGIN; \
             UPDATE operations.products SET product_name = 'before' WHERE product_id = 1; \
             ALTER TABLE operations.products ADD COLUMN weight_grams integer; \
             UPDATE operations.products SET product_name = 'after', weight_grams = 250 WHERE product_id = 2; \
             COMMIT",
        )
        .await
        .expect("add column mid-transaction");
    acme_testkit::run_workload(&url, &workload(92, 100)).await.expect("workload");
    stream.catch_up().await.expect("catch up across the schema change");
    let replayed = replay_raw(dir.path(), "products", "product_id", &["product_name", "weight_grams"]).await;
    let source = source_state(&url, "products", "product_id", &["product_name", "weight_grams"]).await;
    assert_eq!(replayed, source);
    assert_eq!(replayed.get(&2).map(|v| v[1].as_str()), Some("250"));
    // A restarted stream opens the evolved table and keeps going.
    drop(stream);
    client
        .batch_execute("UPDATE operations.products SET weight_grams = 300 WHERE product_id = 3")
        .await
        .expect("update");
    let mut stream = ChangeStream::open(config(&url, dir.path())).await.expect("reopen");
    stream.catch_up().await.expect("catch up after restart");
    assert_raw_equals_source(&url, dir.path()).await;
    let replayed = replay_raw(dir.path(), "products", "product_id", &["weight_grams"]).await;
    assert_eq!(replayed.get(&3).map(|v| v[0].as_str()), Some("300"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_that_requires_tls_is_snapshotted_and_streamed_over_a_verified_connection() {
    // A cluster of its own, whose user `acme_tls` may connect over TLS only, with a certificate
    // for `localhost` issued by a test CA.
    let cluster = PgCluster::start().expect("PostgreSQL");
    let ca = cluster.enable_tls("acme_tls").await.expect("TLS on the server");
    let admin = cluster.create_database("tls").await.expect("database");
    let client = acme_testkit::connect(&admin).await.expect("connect");
    acme_testkit::create_source_schema(&client).await.expect("schema");
    acme_testkit::bulk_load(&admin, ScaleFactor::new(0.001).expect("sf"), 8).await.expect("load");
    let database = admin.rsplit('/').next().expect("database name");
    let port = cluster.port();
    let url = |host: &str, options: &str| format!("postgres://acme_tls@{host}:{port}/{database}?{options}");
    let root = format!("sslrootcert={}", ca.cert.display());
    let dir = tempfile::tempdir().expect("tmp");
    let mut cfg = config(&admin, dir.path());

    // Without TLS the server turns acme away, and the error says where it tried.
    cfg.source_url = Some(url("127.0.0.1", "sslmode=disable"));
    let error = ChangeStream::open(cfg.clone()).await.expect_err("a plain connection is refused");
    assert!(matches!(error, IngestError::Connect { .. }), "{error}");

    // Each mode against each connection kind (ordinary and replication): the right CA and
    // host are accepted; a host the certificate does not name only by verify-ca; another CA
    // by no verifying mode. The root file is also accepted in key=value form.
    let other_dir = tempfile::tempdir().expect("tmp");
    let other_ca = acme_testkit::tls::TestCa::new(other_dir.path(), "another-ca").expect("another CA");
    let other_root = format!("sslrootcert={}", other_ca.cert.display());
    let cases = [
        (url("127.0.0.1", "sslmode=require"), true),
        (url("localhost", &format!("sslmode=verify-full&{root}")), true),
        (url("127.0.0.1", &format!("sslmode=verify-full&{root}")), false),
        (url("127.0.0.1", &format!("sslmode=verify-ca&{root}")), true),
        (url("localhost", &format!("sslmode=verify-ca&{other_root}")), false),
        (url("localhost", &format!("sslmode=verify-full&{other_root}")), false),
        // `require` with a root file checks the issuer, as libpq does.
        (url("localhost", &format!("sslmode=require&{other_root}")), false),
        (
            format!(
                "host=localhost port={port} user=acme_tls dbname={database} sslmode=verify-full sslrootcert='{}'",
                ca.cert.display()
            ),
            true,
        ),
    ];
    for (url, accepted) in &cases {
        let source = acme_ingest::SourceUrl::parse(url).expect("the URL parses");
        let ordinary = source.connect().await.map(drop);
        let replication = acme_ingest::replication::ReplicationConnection::connect(&source).await.map(drop);
        for (kind, result) in [("ordinary", ordinary), ("replication", replication)] {
            match (accepted, result) {
                (true, Ok(())) => {}
                (true, Err(error)) => panic!("{url}: the {kind} connection is refused: {error}"),
                (false, Ok(())) => panic!("{url}: the {kind} connection is accepted"),
                (false, Err(error)) => {
                    assert!(matches!(error, IngestError::Certificate { .. }), "{url} ({kind}): {error}");
                    assert!(!error.is_transient(), "a refused certificate is not retried: {error}");
                    let text = error.to_string();
                    let advice = if url.contains("127.0.0.1") { "host name" } else { "sslrootcert" };
                    assert!(text.contains(advice), "{url} ({kind}): the error says what to check: {text}");
                }
            }
        }
    }
    // A verifying mode without any root certificate (and no libpq default file) says how to
    // give one.
    let default_root = std::path::Path::new(&std::env::var("HOME").unwrap_or_default()).join(".postgresql/root.crt");
    if !default_root.exists() {
        let error = acme_ingest::SourceUrl::parse(&url("localhost", "sslmode=verify-full")).expect_err("no roots");
        assert!(error.to_string().contains("sslrootcert=system"), "{error}");
    }

    // verify-full: the snapshot, the replication connection and the stream.
    cfg.source_url = Some(url("localhost", &format!("sslmode=verify-full&{root}")));
    let mut stream = ChangeStream::open(cfg.clone()).await.expect("snapshot over TLS");
    acme_testkit::run_workload(&admin, &workload(90, 100)).await.expect("workload");
    stream.catch_up().await.expect("stream over TLS");
    assert_raw_equals_source(&admin, dir.path()).await;
    let encrypted: i64 = client
        .query_one(
            "SELECT count(*) FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) \
             WHERE a.usename = 'acme_tls' AND s.ssl",
            &[],
        )
        .await
        .expect("pg_stat_ssl")
        .get(0);
    assert!(encrypted >= 1, "acme's connections are encrypted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_dropped_from_the_publication_mid_stream_stops_with_what_to_do() {
    let url = acme_source("cdc_publication").await;
    acme_testkit::bulk_load(&url, ScaleFactor::new(0.001).expect("sf"), 12).await.expect("load");
    let dir = tempfile::tempdir().expect("tmp");
    let cfg = config(&url, dir.path());
    let mut stream = ChangeStream::open(cfg.clone()).await.expect("open");
    stream.catch_up().await.expect("catch up");
    let client = acme_testkit::connect(&url).await.expect("connect");
    client
        .batch_execute(&format!("ALTER PUBLICATION {} DROP TABLE operations.products", cfg.publication))
        .await
        .expect("alter publication");
    let error = stream.catch_up().await.expect_err("the stream notices");
    assert!(matches!(&error, IngestError::PublicationChanged { table, .. } if table.contains("products")), "{error}");
    assert!(error.to_string().contains("ALTER PUBLICATION"), "the error says what to do: {error}");
    assert!(!error.is_transient(), "not retried");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_server_is_detected_as_a_stall_and_the_stream_recovers_after_it() {
    // A cluster of its own: freezing the shared one would stall the other tests.
    let cluster = PgCluster::start().expect("PostgreSQL");
    let url = cluster.create_database("cdc_stall").await.expect("database");
    let client = acme_testkit::connect(&url).await.expect("connect");
    acme_testkit::create_source_schema(&client).await.expect("schema");
    drop(client);
    acme_testkit::bulk_load(&url, ScaleFactor::new(0.002).expect("sf"), 91).await.expect("load");
    let dir = tempfile::tempdir().expect("tmp");
    let mut cfg = config(&url, dir.path());
    cfg.source_timeout = Duration::from_secs(1);
    let mut stream = ChangeStream::open(cfg.clone()).await.expect("open");
    acme_testkit::run_workload(&url, &workload(92, 100)).await.expect("workload");
    stream.catch_up().await.expect("catch up");

    // 1. Frozen server: polls fail with a stall instead of waiting forever (the outer timeout
    // only keeps a regression from hanging the suite).
    cluster.pause().expect("pause");
    let stalled = tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            if let Err(e) = stream.poll().await {
                break e;
            }
        }
    })
    .await;
    let error = match stalled {
        Ok(error) => error,
        Err(_) => {
            cluster.resume().expect("resume");
            panic!("polling a frozen server did not fail within 60 s");
        }
    };
    assert!(matches!(error, IngestError::Disconnected { .. }), "{error}");
    assert!(error.is_transient(), "a stall is retried: {error}");
    assert!(error.to_string().contains("no answer") && error.to_string().contains("source_timeout"), "{error}");
    // Reconnecting to the frozen server stalls too, rather than hanging.
    let error =
        tokio::time::timeout(Duration::from_secs(60), stream.poll()).await.expect("bounded").expect_err("frozen");
    assert!(error.to_string().contains("no answer"), "{error}");
    cluster.resume().expect("resume");
    acme_testkit::run_workload(&url, &workload(93, 100)).await.expect("workload after the stall");
    stream.catch_up().await.expect("the stream recovers once the server answers");
    assert_raw_equals_source(&url, dir.path()).await;

    // 2. The same while running: the runner replaces the stalled connection by itself.
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let runner = tokio::spawn(async move {
        stream.run_until(Duration::from_millis(50), async { stop_rx.await.unwrap_or(()) }).await.map(|_| stream)
    });
    acme_testkit::run_workload(&url, &workload(94, 100)).await.expect("workload before the pause");
    cluster.pause().expect("pause");
    tokio::time::sleep(Duration::from_secs(3)).await;
    cluster.resume().expect("resume");
    acme_testkit::run_workload(&url, &workload(95, 100)).await.expect("workload after the pause");
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop_tx.send(()).expect("stop");
    let mut stream = runner.await.expect("join").expect("the runner recovered by itself");
    stream.catch_up().await.expect("catch up");
    // replay_raw also asserts that no (lsn, seq) is stored twice.
    assert_raw_equals_source(&url, dir.path()).await;
    drop(stream);
    drop(cluster);
}

/// The change rows of a raw table (no snapshot rows), per key in commit order, each rendered
/// without its LSN and commit time (which differ between capture methods by design).
async fn change_history(
    warehouse: &std::path::Path,
    table: &str,
    key: &str,
) -> std::collections::BTreeMap<String, Vec<String>> {
    use arrow::array::AsArray;
    use arrow::datatypes::Int64Type;
    use arrow::util::display::{ArrayFormatter, FormatOptions};
    let mut rows: Vec<(i64, i64, String, String)> = Vec::new();
    for b in crate::support::read_raw(warehouse, table).await {
        let options = FormatOptions::default().with_null("NULL");
        let lsn = b.column_by_name(acme_core::raw::LSN).expect("lsn").as_primitive::<Int64Type>().clone();
        let seq = b.column_by_name(acme_core::raw::SEQ).expect("seq").as_primitive::<Int64Type>().clone();
        let shown: Vec<(String, ArrayFormatter<'_>)> = b
            .schema()
            .fields()
            .iter()
            .zip(b.columns())
            .filter(|(f, _)| f.name() != acme_core::raw::LSN && f.name() != acme_core::raw::COMMIT_TS)
            .map(|(f, a)| (f.name().clone(), ArrayFormatter::try_new(a.as_ref(), &options).expect("fmt")))
            .collect();
        let op = b.column_by_name(acme_core::raw::OP).expect("op").as_string::<i32>().clone();
        let keys = b.column_by_name(key).expect("key");
        let keys = ArrayFormatter::try_new(keys.as_ref(), &options).expect("fmt");
        for i in 0..b.num_rows() {
            if op.value(i) == "snapshot" {
                continue;
            }
            let text = shown.iter().map(|(n, f)| format!("{n}={}", f.value(i))).collect::<Vec<_>>().join(" ");
            rows.push((lsn.value(i), seq.value(i), keys.value(i).to_string(), text));
        }
    }
    rows.sort();
    let mut history: std::collections::BTreeMap<String, Vec<String>> = Default::default();
    for (_, _, k, text) in rows {
        history.entry(k).or_default().push(text);
    }
    history
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_trigger_fallback_captures_the_same_changes_as_logical_decoding_without_replication_rights() {
    let url = acme_source("cdc_triggers").await;
    acme_testkit::bulk_load(&url, ScaleFactor::new(0.003).expect("sf"), 101).await.expect("load");
    let client = acme_testkit::connect(&url).await.expect("connect");
    // A user that owns the tables but has no REPLICATION privilege (logical decoding refuses it).
    let role = format!("acme_plain_{}", std::process::id());
    let database = url.rsplit('/').next().expect("database").to_string();
    client
        .batch_execute(&format!(
            "CREATE ROLE {role} LOGIN NOREPLICATION; GRANT CREATE ON DATABASE {database} TO {role}; \
             GRANT USAGE ON SCHEMA operations TO {role}; \
             ALTER TABLE operations.customers OWNER TO {role}; ALTER TABLE operations.products OWNER TO {role}; \
             ALTER TABLE operations.orders OWNER TO {role}; ALTER TABLE operations.order_items OWNER TO {role}"
        ))
        .await
        .expect("role");
    let plain = url.replacen("postgres://postgres@", &format!("postgres://{role}@"), 1);
    let logical_dir = tempfile::tempdir().expect("tmp");
    let trigger_dir = tempfile::tempdir().expect("tmp");
    let mut logical = ChangeStream::open(config(&url, logical_dir.path())).await.expect("logical decoding");
    let mut trigger_cfg = config(&plain, trigger_dir.path());
    trigger_cfg.cdc_mode = CdcMode::Triggers;
    let mut triggers = ChangeStream::open(trigger_cfg.clone()).await.expect("the trigger fallback");

    // Claims interleave with the live workload: batch boundaries fall anywhere.
    let writer = {
        let url = url.clone();
        tokio::spawn(async move { acme_testkit::run_workload(&url, &workload(102, 400)).await })
    };
    while !writer.is_finished() {
        triggers.poll().await.expect("poll under load");
    }
    writer.await.expect("join").expect("workload");
    client
        .batch_execute(
            "TRUNCATE operations.order_items; INSERT INTO operations.order_items (order_id, product_id, quanity) \
             SELECT order_id, 1, 3 FROM operations.orders ORDER BY order_id LIMIT 5",
        )
        .await
        .expect("truncate");
    // Primary keys changed: a customer's (alone), an order's with its items (then the moved
    // order updated again in the same transaction), and a chain: a product's key changed twice.
    let (customer, order, product): (i64, i64, i64) = {
        let row = client
            .query_one(
                "SELECT (SELECT min(customer_id) FROM operations.customers), \
                        (SELECT min(order_id) FROM operations.orders), \
                        (SELECT min(product_id) FROM operations.products)",
                &[],
            )
            .await
            .expect("keys");
        (row.get(0), row.get(1), row.get(2))
    };
    client
        .batch_execute(&format!(
            "UPDATE operations.customers SET customer_id = {moved_customer} WHERE customer_id = {customer}; \
             BEGIN; \
             UPDATE operations.order_items SET order_id = {moved_order} WHERE order_id = {order}; \
             UPDATE operations.orders SET order_id = {moved_order} WHERE order_id = {order}; \
             UPDATE operations.orders SET status = 'PROCESSING' WHERE order_id = {moved_order}; COMMIT; \
             BEGIN; \
             UPDATE operations.products SET product_id = {moved_product} WHERE product_id = {product}; \
             UPDATE operations.products SET product_id = {moved_product} + 1 WHERE product_id = {moved_product}; \
             COMMIT",
            moved_customer = customer + 10_000_000,
            moved_order = order + 10_000_000,
            moved_product = product + 10_000_000,
        ))
        .await
        .expect("keys changed");
    acme_testkit::run_workload(&url, &workload(103, 100)).await.expect("workload");
    let report = triggers.catch_up().await.expect("catch up");
    assert!(report.confirmed.0 > triggers.snapshot_point().lsn);
    logical.catch_up().await.expect("catch up");
    assert_raw_equals_source(&url, trigger_dir.path()).await;
    assert_raw_equals_source(&url, logical_dir.path()).await;
    // The same change rows, key by key in the same order: operation, position in the
    // transaction, transaction id, values and old values.
    for (table, key, _) in CHECKED {
        let from_triggers = change_history(trigger_dir.path(), table, key).await;
        let from_decoding = change_history(logical_dir.path(), table, key).await;
        assert!(!from_triggers.is_empty(), "{table}: changes captured");
        assert_eq!(from_triggers, from_decoding, "{table}: triggers and logical decoding agree");
    }
    // A changed key is a delete of the old key, then an insert of the new one, one position
    // after it in the same transaction.
    for (table, key, old, new) in [
        ("customers", "customer_id", customer, customer + 10_000_000),
        ("orders", "order_id", order, order + 10_000_000),
        ("products", "product_id", product, product + 10_000_000),
        ("products", "product_id", product + 10_000_000, product + 10_000_001),
    ] {
        for dir in [logical_dir.path(), trigger_dir.path()] {
            let history = change_history(dir, table, key).await;
            let (closed, opened) = (&history[&old.to_string()], &history[&new.to_string()]);
            let closing = closed.last().expect("the old key's changes");
            assert!(closing.starts_with("_op=delete"), "{table} {old}: {closing}");
            assert!(opened[0].starts_with("_op=insert"), "{table} {new}: {}", opened[0]);
            let seq = |change: &str| -> i64 {
                let field = change.split(' ').find_map(|f| f.strip_prefix("_seq=")).expect("a _seq field");
                field.parse().expect("a number")
            };
            assert_eq!(seq(&opened[0]), seq(closing) + 1, "{table}: {closing} then {}", opened[0]);
        }
    }
    assert_eq!(triggers.poll().await.expect("idle poll").changes, 0);

    // A restart resumes exactly where the warehouse stands. The orders' row trigger is put
    // back as an earlier version of acme created it (no key columns as arguments): reopening
    // creates it again with them, so the key change after it is split too.
    drop(triggers);
    client
        .batch_execute(&format!(
            "DROP TRIGGER {slot}_capture ON operations.orders; \
             CREATE TRIGGER {slot}_capture AFTER INSERT OR UPDATE OR DELETE ON operations.orders \
               FOR EACH ROW EXECUTE FUNCTION acme_cdc.{slot}_capture()",
            slot = trigger_cfg.slot
        ))
        .await
        .expect("an earlier version's trigger");
    acme_testkit::run_workload(&url, &workload(104, 100)).await.expect("workload");
    let mut triggers = ChangeStream::open(trigger_cfg.clone()).await.expect("reopen");
    let arguments: i16 = client
        .query_one(
            "SELECT tgnargs FROM pg_trigger WHERE tgname = $1 AND tgrelid = 'operations.orders'::regclass",
            &[&format!("{}_capture", trigger_cfg.slot)],
        )
        .await
        .expect("the orders' trigger")
        .get(0);
    assert_eq!(arguments, 1, "the orders' trigger names its key column again");
    let moved: i64 = client
        .query_one(
            "UPDATE operations.orders SET order_id = order_id + 20000000 \
             WHERE order_id = (SELECT max(order_id) FROM operations.orders WHERE order_id < 10000000) RETURNING order_id",
            &[],
        )
        .await
        .expect("a key changed after the restart")
        .get(0);
    triggers.catch_up().await.expect("catch up after the restart");
    assert_raw_equals_source(&url, trigger_dir.path()).await;
    let history = change_history(trigger_dir.path(), "orders", "order_id").await;
    assert!(history[&moved.to_string()][0].starts_with("_op=insert"), "{:?}", history[&moved.to_string()]);
    assert!(triggers.slot_lag_bytes().await.expect("changelog size") > 0);

    // The warehouse cannot switch capture methods; a dropped trigger stops the capture.
    let mut switched = trigger_cfg.clone();
    switched.cdc_mode = CdcMode::Stream;
    switched.source_url = Some(url.clone());
    let error = ChangeStream::open(switched).await.expect_err("switching methods");
    assert!(matches!(error, IngestError::CaptureMethodChanged { .. }), "{error}");
    client
        .batch_execute(&format!("DROP TRIGGER {}_capture ON operations.orders", trigger_cfg.slot))
        .await
        .expect("drop trigger");
    let error = triggers.catch_up().await.expect_err("a dropped trigger");
    assert!(matches!(&error, IngestError::CaptureTriggerMissing { table } if table == "operations.orders"), "{error}");
    assert!(error.to_string().contains("re-sync"), "{error}");
    let error = ChangeStream::open(trigger_cfg.clone()).await.expect_err("reopen without a trigger");
    assert!(matches!(error, IngestError::CaptureTriggerMissing { .. }), "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarting_the_trigger_fallback_neither_duplicates_nor_skips_changes() {
    restart_rounds("cdc_restart_trig", CdcMode::Triggers).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_trigger_fallback_captures_a_source_without_logical_wal_and_follows_added_columns() {
    // A cluster of its own with `wal_level = replica`: logical decoding is impossible there.
    let cluster = PgCluster::start().expect("PostgreSQL");
    let url = cluster.create_database("cdc_no_logical").await.expect("database");
    let client = acme_testkit::connect(&url).await.expect("connect");
    client.batch_execute("ALTER SYSTEM SET wal_level = replica").await.expect("wal_level");
    drop(client);
    cluster.restart().expect("restart with wal_level = replica");
    let client = acme_testkit::connect(&url).await.expect("connect");
    acme_testkit::create_source_schema(&client).await.expect("schema");
    acme_testkit::bulk_load(&url, ScaleFactor::new(0.002).expect("sf"), 111).await.expect("load");
    let refused = tempfile::tempdir().expect("tmp");
    let error = ChangeStream::open(config(&url, refused.path())).await.expect_err("no logical decoding");
    assert!(error.to_string().contains("wal_level"), "logical decoding names the setting: {error}");

    // A user that may read the tables but neither owns them nor may create in the database.
    client
        .batch_execute(
            "CREATE ROLE acme_reader LOGIN; GRANT USAGE ON SCHEMA operations TO acme_reader; \
             GRANT SELECT ON ALL TABLES IN SCHEMA operations TO acme_reader; \
             REVOKE CREATE ON SCHEMA public FROM PUBLIC",
        )
        .await
        .expect("reader role");
    let reader = url.replacen("postgres://postgres@", "postgres://acme_reader@", 1);
    let mut cfg = config(&reader, refused.path());
    cfg.cdc_mode = CdcMode::Triggers;
    let error = ChangeStream::open(cfg).await.expect_err("no right to install triggers");
    assert!(matches!(error, IngestError::CapturePrivilege { .. }), "{error}");
    assert!(error.to_string().contains("owns the source tables"), "the error says what is needed: {error}");

    let dir = tempfile::tempdir().expect("tmp");
    let mut cfg = config(&url, dir.path());
    cfg.cdc_mode = CdcMode::Triggers;
    let mut stream = ChangeStream::open(cfg).await.expect("the trigger fallback opens");
    acme_testkit::run_workload(&url, &workload(112, 200)).await.expect("workload");
    // One transaction writes rows before and after a column appears.
    let (first, last): (i64, i64) = {
        let row = client
            .query_one("SELECT min(customer_id)::int8, max(customer_id)::int8 FROM operations.customers", &[])
            .await
            .expect("customers");
        (row.get(0), row.get(1))
    };
    client
        .batch_execute(&format!(
            "BEGIN; \
             UPDATE operations.customers SET customer_name = 'before' WHERE customer_id = {first}; \
             ALTER TABLE operations.customers ADD COLUMN loyalty_tier text; \
             UPDATE operations.customers SET customer_name = 'after', loyalty_tier = 'gold' WHERE customer_id = {last}; \
             COMMIT"
        ))
        .await
        .expect("add column mid-transaction");
    stream.catch_up().await.expect("catch up across the schema change");
    let columns = ["customer_name", "loyalty_tier"];
    let replayed = replay_raw(dir.path(), "customers", "customer_id", &columns).await;
    assert_eq!(replayed, source_state(&url, "customers", "customer_id", &columns).await);
    assert_eq!(replayed.get(&first).map(|v| v[0].as_str()), Some("before"));
    assert_eq!(replayed.get(&last), Some(&vec!["after".to_string(), "gold".to_string()]));
    acme_testkit::run_workload(&url, &workload(113, 200)).await.expect("workload after the change");
    stream.catch_up().await.expect("catch up");
    assert_raw_equals_source(&url, dir.path()).await;
    let replayed = replay_raw(dir.path(), "customers", "customer_id", &columns).await;
    assert_eq!(replayed, source_state(&url, "customers", "customer_id", &columns).await);
    drop(stream);
    drop(cluster);
}

/// A slot the server invalidated for holding more WAL than `max_slot_wal_keep_size` stops
/// capture with [`IngestError::SlotLost`] (which says how to re-sync), whether the stream was
/// reading it by logical streaming or by SQL polling. The server answers such reads with a
/// generic SQLSTATE (55000), so acme asks for the slot's `wal_status`. A cluster of its own:
/// the setting is server-wide.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slot_the_server_invalidated_stops_capture_with_slot_lost() {
    let cluster = PgCluster::start().expect("PostgreSQL");
    let url = cluster.create_database("cdc_invalidated").await.expect("database");
    let client = acme_testkit::connect(&url).await.expect("connect");
    acme_testkit::create_source_schema(&client).await.expect("schema");
    acme_testkit::bulk_load(&url, ScaleFactor::new(0.001).expect("sf"), 131).await.expect("load");
    client.batch_execute("ALTER SYSTEM SET max_slot_wal_keep_size = '1MB'").await.expect("max_slot_wal_keep_size");
    client.batch_execute("SELECT pg_reload_conf()").await.expect("reload");
    let streamed = tempfile::tempdir().expect("tmp");
    let polled = tempfile::tempdir().expect("tmp");
    let mut stream_cfg = config(&url, streamed.path());
    stream_cfg.slot = "acme_invalidated_stream".into();
    let mut poll_cfg = config(&url, polled.path());
    poll_cfg.slot = "acme_invalidated_poll".into();
    poll_cfg.cdc_mode = CdcMode::SqlPoll;
    let mut streaming = ChangeStream::open(stream_cfg.clone()).await.expect("open streaming");
    let mut polling = ChangeStream::open(poll_cfg.clone()).await.expect("open polling");
    client.batch_execute("UPDATE operations.orders SET status = 'SHIPPED' WHERE order_id = 1").await.expect("update");
    streaming.catch_up().await.expect("streaming reads");
    polling.catch_up().await.expect("polling reads");

    // Several WAL segments the slots do not read, then checkpoints until both are lost.
    client.batch_execute("CREATE TABLE filler (x text)").await.expect("filler");
    let mut lost = 0;
    for _ in 0..20 {
        for statement in [
            "INSERT INTO filler SELECT repeat('x', 1000) FROM generate_series(1, 3000)",
            "SELECT pg_switch_wal()",
            "CHECKPOINT",
        ] {
            client.batch_execute(statement).await.expect("write WAL");
        }
        let row = client
            .query_one("SELECT count(*) FROM pg_replication_slots WHERE wal_status = 'lost'", &[])
            .await
            .expect("slot states");
        lost = row.get::<_, i64>(0);
        if lost == 2 {
            break;
        }
    }
    assert_eq!(lost, 2, "the server invalidated both slots");

    let error = polling.poll().await.expect_err("the polled slot is lost");
    assert!(matches!(error, IngestError::SlotLost { ref slot } if *slot == poll_cfg.slot), "{error:?}");
    assert!(error.to_string().contains("re-sync"), "{error}");
    // The server terminated the streaming connection to invalidate its slot: the stream may
    // still read what the walsender sent before that, then sees a broken connection (a retry
    // reconnects), then the lost slot.
    let mut outcomes = Vec::new();
    let error = loop {
        assert!(outcomes.len() < 6, "the streamed slot is never reported lost: {outcomes:?}");
        match streaming.poll().await {
            Err(error) if !error.is_transient() => break error,
            outcome => outcomes.push(format!("{outcome:?}")),
        }
    };
    assert!(matches!(error, IngestError::SlotLost { ref slot } if *slot == stream_cfg.slot), "{error:?}");
}

/// The source records every change it makes in an audit table of its own (transaction id,
/// table, key, operation), by triggers the test installs: an account of the changes written
/// apart from logical decoding.
const AUDIT: &str = "
    CREATE TABLE public.test_audit (xid bigint, tbl text, key bigint, op text);
    CREATE FUNCTION public.test_audit() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
      INSERT INTO public.test_audit VALUES (txid_current() % 4294967296, TG_TABLE_NAME,
        (to_jsonb(CASE WHEN TG_OP = 'DELETE' THEN OLD ELSE NEW END) ->> TG_ARGV[0])::bigint, lower(TG_OP));
      RETURN NULL;
    END $$;
    CREATE TRIGGER test_audit AFTER INSERT OR UPDATE OR DELETE ON operations.customers
      FOR EACH ROW EXECUTE FUNCTION public.test_audit('customer_id');
    CREATE TRIGGER test_audit AFTER INSERT OR UPDATE OR DELETE ON operations.products
      FOR EACH ROW EXECUTE FUNCTION public.test_audit('product_id');
    CREATE TRIGGER test_audit AFTER INSERT OR UPDATE OR DELETE ON operations.orders
      FOR EACH ROW EXECUTE FUNCTION public.test_audit('order_id');
    CREATE TRIGGER test_audit AFTER INSERT OR UPDATE OR DELETE ON operations.order_items
      FOR EACH ROW EXECUTE FUNCTION public.test_audit('order_item_id');";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_change_is_stored_by_the_snapshot_or_by_the_stream_never_both_never_neither() {
    for (prefix, mode) in [
        ("cdc_exact_stream", CdcMode::Stream),
        ("cdc_exact_sql", CdcMode::SqlPoll),
        ("cdc_exact_triggers", CdcMode::Triggers),
    ] {
        handoff_exactly(prefix, mode).await;
    }
}

/// Writes run while the slot is created and the snapshot copies; then, per source
/// transaction, either the stream stored every change it made exactly once, or the snapshot
/// holds its effects: an inserted key is in the snapshot exactly when its transaction is not
/// in the stream (unless a transaction before the snapshot deleted it again).
async fn handoff_exactly(prefix: &str, mode: CdcMode) {
    use arrow::array::{Array, AsArray};
    use arrow::datatypes::Int64Type;
    use std::collections::{BTreeMap, HashMap, HashSet};

    let url = acme_source(prefix).await;
    acme_testkit::bulk_load(&url, ScaleFactor::new(0.003).expect("sf"), 57).await.expect("load");
    let client = acme_testkit::connect(&url).await.expect("connect");
    client.batch_execute(AUDIT).await.expect("audit triggers");
    let dir = tempfile::tempdir().expect("tmp");
    let writer = {
        let url = url.clone();
        tokio::spawn(async move {
            let mut config = workload(58, 0);
            config.transactions = None;
            config.duration = Some(Duration::from_secs(3));
            acme_testkit::run_workload(&url, &config).await
        })
    };
    // The slot and the snapshot start once the writes have begun.
    let audited = "SELECT count(*) FROM public.test_audit";
    while client.query_one(audited, &[]).await.expect("audit rows").get::<_, i64>(0) == 0 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut cfg = config(&url, dir.path());
    cfg.cdc_mode = mode;
    let mut stream = ChangeStream::open(cfg).await.expect("open (slot and snapshot under writes)");
    writer.await.expect("join").expect("workload");
    // Some transactions surely after the snapshot, however long it took.
    acme_testkit::run_workload(&url, &workload(59, 30)).await.expect("workload after the snapshot");
    stream.catch_up().await.expect("catch up");

    // The source's account: changes per transaction, inserts and deletes per key.
    let mut audited: HashMap<i64, usize> = HashMap::new();
    let mut inserts: Vec<(i64, String, i64)> = Vec::new();
    let mut deletes: HashMap<(String, i64), Vec<i64>> = HashMap::new();
    for row in client.query("SELECT xid, tbl, key, op FROM public.test_audit", &[]).await.expect("audit") {
        let (xid, table, key, op): (i64, String, i64, String) = (row.get(0), row.get(1), row.get(2), row.get(3));
        *audited.entry(xid).or_default() += 1;
        match op.as_str() {
            "insert" => inserts.push((xid, table, key)),
            "delete" => deletes.entry((table, key)).or_default().push(xid),
            _ => {}
        }
    }
    // acme's raw layer: stream rows per transaction, snapshot keys per table.
    let mut streamed: BTreeMap<i64, usize> = BTreeMap::new();
    let mut snapshot: HashMap<String, HashSet<i64>> = HashMap::new();
    for (table, key) in [
        ("customers", "customer_id"),
        ("products", "product_id"),
        ("orders", "order_id"),
        ("order_items", "order_item_id"),
    ] {
        for batch in read_raw(dir.path(), table).await {
            let ops = batch.column_by_name("_op").expect("_op").as_string::<i32>().clone();
            let xids = batch.column_by_name("_xid").expect("_xid").as_primitive::<Int64Type>().clone();
            let keys = batch.column_by_name(key).expect("key").as_primitive::<Int64Type>().clone();
            for i in 0..batch.num_rows() {
                if ops.value(i) == "snapshot" {
                    snapshot.entry(table.to_string()).or_default().insert(keys.value(i));
                } else {
                    assert!(!xids.is_null(i), "{mode:?}: a streamed {table} row without a transaction id");
                    *streamed.entry(xids.value(i)).or_default() += 1;
                }
            }
        }
    }
    let before: HashSet<i64> = audited.keys().filter(|x| !streamed.contains_key(x)).copied().collect();
    assert!(!before.is_empty(), "{mode:?}: some audited transactions committed before the snapshot");
    assert!(!streamed.is_empty(), "{mode:?}: some transactions were streamed");
    for (xid, n) in &streamed {
        assert_eq!(audited.get(xid), Some(n), "{mode:?}: transaction {xid}: rows streamed vs changes it made");
    }
    let mut checked = 0;
    for (xid, table, key) in &inserts {
        let in_snapshot = snapshot.get(table).is_some_and(|keys| keys.contains(key));
        if streamed.contains_key(xid) {
            assert!(
                !in_snapshot,
                "{mode:?}: {table} {key}, inserted by streamed transaction {xid}, is in the snapshot too"
            );
        } else {
            let deleted_before =
                deletes.get(&(table.clone(), *key)).is_some_and(|by| by.iter().any(|x| before.contains(x)));
            assert!(
                in_snapshot || deleted_before,
                "{mode:?}: {table} {key}, inserted by transaction {xid} before the snapshot, is in neither"
            );
        }
        checked += 1;
    }
    assert!(checked > 100, "{mode:?}: {checked} inserts checked");
}
