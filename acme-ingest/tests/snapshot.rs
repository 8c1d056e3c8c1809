//! The snapshot: exact types, consistency under concurrent writes, the ACME tables.

use acme_core::raw;
use acme_ingest::{IngestError, Snapshot};
use acme_testkit::{ScaleFactor, WorkloadConfig};
use arrow::array::{Array, AsArray};
use arrow::compute::concat_batches;
use arrow::datatypes::{
    Date32Type, Decimal128Type, Float32Type, Float64Type, Int16Type, Int32Type, Int64Type, TimestampMicrosecondType,
};

use crate::support::{acme_source, config, read_raw, rows};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_copies_every_acme_row_once() {
    let url = acme_source("snap_acme").await;
    let load = acme_testkit::bulk_load(&url, ScaleFactor::new(0.01).expect("sf"), 3).await.expect("load");
    let dir = tempfile::tempdir().expect("tmp");
    let report = Snapshot::new(config(&url, dir.path())).await.expect("snapshot");
    assert!(!report.already_done);
    let expected = [
        ("customers", load.customers),
        ("products", load.products),
        ("orders", load.orders),
        ("order_items", load.order_items),
    ];
    for (table, count) in expected {
        let batches = read_raw(dir.path(), table).await;
        assert_eq!(rows(&batches) as u64, count, "{table}");
        let reported = report.tables.iter().find(|t| t.table == format!("operations.{table}")).expect("reported");
        assert_eq!(reported.rows, count);
        for b in &batches {
            let op = b.column_by_name(raw::OP).expect("op").as_string::<i32>();
            assert!(op.iter().all(|v| v == Some("snapshot")));
            let lsn = b.column_by_name(raw::LSN).expect("lsn").as_primitive::<Int64Type>();
            assert!(lsn.iter().all(|v| v == Some(report.lsn.0 as i64)));
        }
    }
    // Keys are copied once each.
    let orders = read_raw(dir.path(), "orders").await;
    let mut ids: Vec<i64> = orders
        .iter()
        .flat_map(|b| b.column_by_name("order_id").expect("id").as_primitive::<Int64Type>().values().to_vec())
        .collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len() as u64, load.orders);
    // A second run finds the snapshot complete and copies nothing.
    let again = Snapshot::new(config(&url, dir.path())).await.expect("second snapshot");
    assert!(again.already_done);
    assert_eq!(rows(&read_raw(dir.path(), "orders").await) as u64, load.orders);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writes_during_the_snapshot_do_not_leak_into_it() {
    let url = acme_source("snap_concurrent").await;
    acme_testkit::bulk_load(&url, ScaleFactor::new(0.01).expect("sf"), 4).await.expect("load");
    let dir = tempfile::tempdir().expect("tmp");
    // Bursts of inserts from before the snapshot until one burst has started after it ended
    // (however long the snapshot takes on a loaded machine).
    let snapshot_ended = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let workload = {
        let (url, snapshot_ended) = (url.clone(), std::sync::Arc::clone(&snapshot_ended));
        tokio::spawn(async move {
            let mut transactions = 0;
            for seed in 9.. {
                let last = snapshot_ended.load(std::sync::atomic::Ordering::SeqCst);
                let config = WorkloadConfig {
                    seed,
                    rate_tps: 0.0,
                    transactions: None,
                    duration: Some(std::time::Duration::from_secs(1)),
                    connections: 2,
                    deletes: false,
                    inserts_only: true,
                };
                transactions += acme_testkit::run_workload(&url, &config).await?.transactions;
                if last {
                    break;
                }
            }
            Ok::<_, acme_testkit::HarnessError>(transactions)
        })
    };
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let mut cfg = config(&url, dir.path());
    cfg.snapshot_parallelism = 3;
    let report = Snapshot::new(cfg).await.expect("snapshot");
    snapshot_ended.store(true, std::sync::atomic::Ordering::SeqCst);
    let transactions = workload.await.expect("join").expect("workload");
    assert!(transactions > 0);
    let client = acme_testkit::connect(&url).await.expect("connect");
    for table in ["orders", "order_items"] {
        // Only inserts ran: a row is in the snapshot exactly when its inserting transaction is
        // visible to the snapshot.
        let visible: i64 = client
            .query_one(
                &format!(
                    "SELECT count(*) FROM operations.{table} WHERE pg_visible_in_snapshot(xmin::text::xid8, $1::text::pg_snapshot)"
                ),
                &[&report.visibility],
            )
            .await
            .expect("visible")
            .get(0);
        let total: i64 =
            client.query_one(&format!("SELECT count(*) FROM operations.{table}"), &[]).await.expect("total").get(0);
        let copied = rows(&read_raw(dir.path(), table).await) as i64;
        assert_eq!(copied, visible, "{table}: snapshot must hold exactly the rows visible to it");
        assert!(total > visible, "{table}: the workload should have inserted rows after the snapshot");
    }
}

const TYPES_DDL: &str = r#"
CREATE SCHEMA typed;
CREATE TABLE typed.all_types (
    id int8 PRIMARY KEY,
    i2 int2, i4 int4, i8 int8, f4 float4, f8 float8,
    n_free numeric, n_fixed numeric(12,3), flag bool,
    t text, vc varchar(20), ch char(4),
    d date, ts timestamp, tstz timestamptz, tm time,
    u uuid, j json, jb jsonb, b bytea
);
INSERT INTO typed.all_types VALUES
 (1, 32767, 2147483647, 9223372036854775807, 1.5, 1e300,
  123456789012345678.0123456789, 123456789.123, true,
  'héllo wörld ✓ 日本', 'varchar', 'ab',
  '2024-02-29', '2024-02-29 13:14:15.123456', '2024-02-29 13:14:15.5+02', '23:59:59.999999',
  '123e4567-e89b-12d3-a456-426614174000', '{"a": [1, 2]}', '{"b": null}', '\x00ff10'),
 (2, -32768, -2147483648, -9223372036854775808, '-Infinity', 'NaN',
  -0.0000000001, -999999999.999, false,
  '', '', '', '1970-01-01', '1999-12-31 23:59:59', '2000-01-01 00:00:00+00', '00:00:00',
  '00000000-0000-0000-0000-000000000000', '[]', '[]', '\x'),
 (3, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL);
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_supported_type_round_trips_exactly() {
    let url = acme_testkit::PgCluster::shared().create_database("snap_types").await.expect("db");
    let client = acme_testkit::connect(&url).await.expect("connect");
    client.batch_execute(TYPES_DDL).await.expect("ddl");
    let dir = tempfile::tempdir().expect("tmp");
    let mut cfg = config(&url, dir.path());
    cfg.schema = "typed".into();
    cfg.tables = vec!["all_types".into()];
    Snapshot::new(cfg).await.expect("snapshot");
    let batches = read_raw(dir.path(), "all_types").await;
    let batch = concat_batches(&batches[0].schema(), &batches).expect("concat");
    let ids = batch.column_by_name("id").expect("id").as_primitive::<Int64Type>();
    let row = |id: i64| (0..batch.num_rows()).find(|&i| ids.value(i) == id).expect("row present");
    let (r1, r2, r3) = (row(1), row(2), row(3));
    let col = |name: &str| batch.column_by_name(name).unwrap_or_else(|| panic!("column {name}")).clone();

    assert_eq!(col("i2").as_primitive::<Int16Type>().value(r1), i16::MAX);
    assert_eq!(col("i2").as_primitive::<Int16Type>().value(r2), i16::MIN);
    assert_eq!(col("i4").as_primitive::<Int32Type>().value(r1), i32::MAX);
    assert_eq!(col("i4").as_primitive::<Int32Type>().value(r2), i32::MIN);
    assert_eq!(col("i8").as_primitive::<Int64Type>().value(r1), i64::MAX);
    assert_eq!(col("i8").as_primitive::<Int64Type>().value(r2), i64::MIN);
    assert_eq!(col("f4").as_primitive::<Float32Type>().value(r1), 1.5);
    assert_eq!(col("f4").as_primitive::<Float32Type>().value(r2), f32::NEG_INFINITY);
    assert_eq!(col("f8").as_primitive::<Float64Type>().value(r1), 1e300);
    assert!(col("f8").as_primitive::<Float64Type>().value(r2).is_nan());
    let n_free = col("n_free");
    let n_free = n_free.as_primitive::<Decimal128Type>();
    assert_eq!((n_free.precision(), n_free.scale()), (38, 10));
    assert_eq!(n_free.value_as_string(r1), "123456789012345678.0123456789");
    assert_eq!(n_free.value_as_string(r2), "-0.0000000001");
    let n_fixed = col("n_fixed");
    let n_fixed = n_fixed.as_primitive::<Decimal128Type>();
    assert_eq!((n_fixed.precision(), n_fixed.scale()), (12, 3));
    assert_eq!(n_fixed.value_as_string(r1), "123456789.123");
    assert_eq!(n_fixed.value_as_string(r2), "-999999999.999");
    assert!(col("flag").as_boolean().value(r1));
    assert!(!col("flag").as_boolean().value(r2));
    assert_eq!(col("t").as_string::<i32>().value(r1), "héllo wörld ✓ 日本");
    assert_eq!(col("t").as_string::<i32>().value(r2), "");
    assert_eq!(col("vc").as_string::<i32>().value(r1), "varchar");
    assert_eq!(col("ch").as_string::<i32>().value(r1), "ab  ");
    assert_eq!(col("d").as_primitive::<Date32Type>().value(r1), 19_782);
    assert_eq!(col("d").as_primitive::<Date32Type>().value(r2), 0);
    assert_eq!(col("ts").as_primitive::<TimestampMicrosecondType>().value(r1), 1_709_212_455_123_456);
    assert_eq!(col("ts").as_primitive::<TimestampMicrosecondType>().value(r2), 946_684_799_000_000);
    assert_eq!(col("tstz").as_primitive::<TimestampMicrosecondType>().value(r1), 1_709_205_255_500_000);
    assert_eq!(col("tstz").as_primitive::<TimestampMicrosecondType>().value(r2), 946_684_800_000_000);
    assert_eq!(col("tm").as_primitive::<Int64Type>().value(r1), 86_399_999_999);
    assert_eq!(col("tm").as_primitive::<Int64Type>().value(r2), 0);
    assert_eq!(col("u").as_string::<i32>().value(r1), "123e4567-e89b-12d3-a456-426614174000");
    assert_eq!(col("j").as_string::<i32>().value(r1), r#"{"a": [1, 2]}"#);
    assert_eq!(col("jb").as_string::<i32>().value(r1), r#"{"b": null}"#);
    assert_eq!(col("b").as_binary::<i32>().value(r1), &[0x00, 0xff, 0x10]);
    assert_eq!(col("b").as_binary::<i32>().value(r2), &[] as &[u8]);
    for name in [
        "i2", "i4", "i8", "f4", "f8", "n_free", "n_fixed", "flag", "t", "vc", "ch", "d", "ts", "tstz", "tm", "u", "j",
        "jb", "b",
    ] {
        assert!(col(name).is_null(r3), "{name} should be NULL in row 3");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsupported_types_and_missing_tables_fail_before_any_data_is_written() {
    let url = acme_testkit::PgCluster::shared().create_database("snap_bad").await.expect("db");
    let client = acme_testkit::connect(&url).await.expect("connect");
    client
        .batch_execute("CREATE SCHEMA s; CREATE TABLE s.shapes (id int8, location point); INSERT INTO s.shapes VALUES (1, '(1,2)')")
        .await
        .expect("ddl");
    let dir = tempfile::tempdir().expect("tmp");
    let mut cfg = config(&url, dir.path());
    cfg.schema = "s".into();
    cfg.tables = vec!["shapes".into()];
    let err = Snapshot::new(cfg.clone()).await.expect_err("point is unsupported");
    assert!(matches!(err, IngestError::UnsupportedType { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(msg.contains("s.shapes") && msg.contains("location") && msg.contains("point"), "{msg}");
    assert!(!dir.path().join("raw").exists(), "nothing may be written");
    cfg.tables = vec!["nope".into()];
    let err = Snapshot::new(cfg).await.expect_err("missing table");
    assert!(err.to_string().contains("s.nope"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn numeric_values_that_do_not_fit_name_table_column_and_value() {
    let url = acme_testkit::PgCluster::shared().create_database("snap_numeric").await.expect("db");
    let client = acme_testkit::connect(&url).await.expect("connect");
    client
        .batch_execute("CREATE SCHEMA s; CREATE TABLE s.prices (id int8, price numeric); INSERT INTO s.prices VALUES (1, 0.123456789012345)")
        .await
        .expect("ddl");
    let dir = tempfile::tempdir().expect("tmp");
    let mut cfg = config(&url, dir.path());
    cfg.schema = "s".into();
    cfg.tables = vec!["prices".into()];
    let err = Snapshot::new(cfg).await.expect_err("too many fractional digits");
    let msg = err.to_string();
    assert!(msg.contains("s.prices") && msg.contains("price") && msg.contains("0.123456789012345"), "{msg}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_source_is_a_clear_error() {
    let dir = tempfile::tempdir().expect("tmp");
    let err = Snapshot::new(config("postgres://acme:secret@127.0.0.1:1/nowhere", dir.path()))
        .await
        .expect_err("nothing listens on port 1");
    let msg = err.to_string();
    assert!(msg.contains("127.0.0.1:1/nowhere") && !msg.contains("secret"), "{msg}");
}

/// A server that stops answering mid-COPY fails the snapshot within `source_timeout` (a
/// stall, retried by running it again) instead of hanging it; run again once the server
/// answers, the snapshot holds every row once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_paused_mid_copy_fails_the_snapshot_within_the_timeout_and_a_rerun_completes() {
    // A cluster of its own: freezing the shared one would stall the other tests.
    let cluster = acme_testkit::PgCluster::start().expect("PostgreSQL");
    let url = cluster.create_database("snap_stall").await.expect("database");
    let client = acme_testkit::connect(&url).await.expect("connect");
    acme_testkit::create_source_schema(&client).await.expect("schema");
    drop(client);
    let load = acme_testkit::bulk_load(&url, ScaleFactor::new(0.05).expect("sf"), 17).await.expect("load");
    let dir = tempfile::tempdir().expect("tmp");
    let mut cfg = config(&url, dir.path());
    cfg.source_timeout = std::time::Duration::from_secs(1);
    cfg.batch_rows = 1024;
    // Freeze the server as soon as the first rows have arrived.
    let (snapshot, progress) = snapshot_under_way(&cfg).await;
    let copied = || copied_rows(&progress);
    cluster.pause().expect("pause");
    let outcome = tokio::time::timeout(std::time::Duration::from_secs(60), snapshot).await;
    cluster.resume().expect("resume");
    let error = outcome.expect("the snapshot did not hang").expect("join").expect_err("a stalled snapshot fails");
    assert!(matches!(error, IngestError::Disconnected { .. }), "{error:?}");
    assert!(error.is_transient(), "a stall is retried: {error}");
    assert!(error.to_string().contains("no answer") && error.to_string().contains("source_timeout"), "{error}");
    let total = load.customers + load.products + load.orders + load.order_items;
    assert!(copied() < total, "the pause came before the end of the copy ({} of {total} rows)", copied());

    let report = Snapshot::new(cfg).await.expect("the snapshot run again");
    for (table, count) in [
        ("customers", load.customers),
        ("products", load.products),
        ("orders", load.orders),
        ("order_items", load.order_items),
    ] {
        assert_eq!(rows(&read_raw(dir.path(), table).await) as u64, count, "{table}");
        let reported = report.tables.iter().find(|t| t.table == format!("operations.{table}")).expect("reported");
        assert_eq!(reported.rows, count, "{table}");
    }
    drop(cluster);
}

/// A snapshot dropped mid-copy (a cancelled run) takes its copies with it: no worker goes on
/// copying and every connection it opened closes. A rerun then completes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_cancelled_mid_copy_stops_every_copy_and_a_rerun_completes() {
    let url = acme_testkit::acme_database("snap_cancel", Some((0.05, 23))).await.expect("source");
    let client = acme_testkit::connect(&url).await.expect("connect");
    let dir = tempfile::tempdir().expect("tmp");
    let mut cfg = config(&url, dir.path());
    cfg.batch_rows = 1024;
    let (snapshot, progress) = snapshot_under_way(&cfg).await;
    let copied = || copied_rows(&progress);
    snapshot.abort();
    assert!(snapshot.await.expect_err("cancelled").is_cancelled(), "the snapshot was still copying");
    // (A batch being decoded when the abort came may still be counted.)
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let at_cancel = copied();
    let sessions = "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() \
                    AND backend_type = 'client backend' AND pid <> pg_backend_pid()";
    let mut open: i64 = -1;
    for _ in 0..50 {
        open = client.query_one(sessions, &[]).await.expect("sessions").get(0);
        if open == 0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(open, 0, "every connection of the cancelled snapshot closed");
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    assert_eq!(copied(), at_cancel, "no copy went on after the cancel");

    let report = Snapshot::new(cfg).await.expect("the snapshot run again");
    let counts = acme_testkit::table_counts(&client).await.expect("counts");
    for (table, count) in acme_testkit::TABLES.iter().zip(counts) {
        let count = count as u64;
        assert_eq!(rows(&read_raw(dir.path(), table).await) as u64, count, "{table}");
        let reported = report.tables.iter().find(|t| t.table == format!("operations.{table}")).expect("reported");
        assert_eq!(reported.rows, count, "{table}");
    }
}

type RunningSnapshot = tokio::task::JoinHandle<acme_ingest::Result<acme_ingest::SnapshotReport>>;

/// A snapshot of `cfg` started on a task of its own, once its first rows have arrived (or it
/// ended), and its progress.
async fn snapshot_under_way(
    cfg: &acme_core::AcmeConfig,
) -> (RunningSnapshot, std::sync::Arc<acme_ingest::SnapshotProgress>) {
    let progress = std::sync::Arc::new(acme_ingest::SnapshotProgress::default());
    let snapshot = tokio::spawn(Snapshot::new(cfg.clone()).with_progress(std::sync::Arc::clone(&progress)).run());
    while copied_rows(&progress) == 0 && !snapshot.is_finished() {
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    (snapshot, progress)
}

/// Rows a snapshot has copied so far.
fn copied_rows(progress: &acme_ingest::SnapshotProgress) -> u64 {
    progress.tables().iter().map(|t| t.rows.load(std::sync::atomic::Ordering::Relaxed)).sum()
}
