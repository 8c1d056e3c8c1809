//! Shared by the root package's tests (each test crate uses part of it).
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use acme::core::AcmeConfig;
use acme::query::{Report, StatusFilter, Warehouse};

/// The config of a pipeline from the source at `url` into the warehouse in `dir`, with the
/// source's own slot.
pub fn config(url: &str, dir: &Path) -> AcmeConfig {
    AcmeConfig::builder()
        .source_url(url)
        .storage_url(dir.display().to_string())
        .slot(acme_testkit::slot_for(url))
        .build()
        .expect("config")
}

/// The `sync` example, built by `cargo test` next to the test binaries.
pub fn sync_binary() -> PathBuf {
    example_binary("sync")
}

/// The example program `name`, built by `cargo test` next to the test binaries.
pub fn example_binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    let dir = exe.parent().and_then(Path::parent).expect("target directory");
    let binary = dir.join("examples").join(name);
    assert!(
        binary.exists(),
        "{} is missing: run the suite with `cargo test` (it builds the examples)",
        binary.display()
    );
    binary
}

/// acme's answers to the reports of `acme_testkit::oracle::REPORTS` (current state), rendered
/// like the oracle's rows.
pub async fn reports(w: &Warehouse, limit: usize) -> Vec<Vec<String>> {
    reports_as_of(w, limit, None).await
}

/// [`reports`] as of an instant (`None`: now).
pub async fn reports_as_of(
    w: &Warehouse,
    limit: usize,
    as_of: Option<chrono::DateTime<chrono::Utc>>,
) -> Vec<Vec<String>> {
    let reports = [
        Report::OpenOrders(StatusFilter::Open),
        Report::OpenOrders(StatusFilter::Pending),
        Report::TopDeliveryDates { limit },
        Report::PendingItemsByProduct,
        Report::TopCustomers { limit, filter: StatusFilter::Pending },
    ];
    let mut out = Vec::new();
    for report in &reports {
        let batches =
            w.report_batches(report, as_of).await.unwrap_or_else(|e| panic!("{report:?} as of {as_of:?}: {e}"));
        out.push(acme_testkit::oracle::render_batches(&batches).expect("render"));
    }
    out
}

/// The row-by-row replay (`acme_testkit::replay`) of every raw change `w` reads.
pub async fn replay(w: &Warehouse) -> acme_testkit::replay::Replay {
    let mut replay = acme_testkit::replay::Replay::default();
    for table in acme_testkit::replay::Replay::tables() {
        let sql = format!("SELECT * FROM raw_{table}");
        let batches = w.sql(&sql).await.expect("raw rows").collect().await.expect("collect");
        replay.add(table, &batches).expect("replay");
    }
    replay
}

/// acme's SCD2 histories of the replayed tables equal the replay's versions; `context` (the
/// seed, the state) names a failure.
pub async fn assert_histories(w: &Warehouse, replay: &acme_testkit::replay::Replay, context: &str) {
    for table in acme_testkit::replay::Replay::tables() {
        let (key, columns) = acme_testkit::replay::Replay::columns(table).expect("replayed table");
        let sql = format!(
            "SELECT {key}, valid_from_lsn, CAST(valid_from AS BIGINT), CAST(valid_to AS BIGINT), is_deleted, {} \
             FROM {table}_history",
            columns.join(", ")
        );
        let batches = w.sql(&sql).await.expect("history").collect().await.expect("collect");
        let mut rows = acme_testkit::oracle::render_batches(&batches).expect("render");
        rows.sort();
        let expected = replay.versions(table);
        if rows != expected {
            let missing: Vec<&String> = expected.iter().filter(|r| !rows.contains(r)).take(5).collect();
            let extra: Vec<&String> = rows.iter().filter(|r| !expected.contains(r)).take(5).collect();
            panic!(
                "{context}: {table}_history has {} versions, the replay {}; missing {missing:?}, extra {extra:?}",
                rows.len(),
                expected.len()
            );
        }
    }
}

/// A JSON value as a cell of the references' rows (`acme_testkit::oracle`): NULL as `∅`,
/// strings bare, anything else as JSON writes it.
pub fn json_cell(value: &serde_json::Value) -> String {
    match value {
        serde_json::Value::Null => acme_testkit::oracle::NULL.to_string(),
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// Report rows given as JSON objects (the HTTP service's bodies) rendered as the references
/// render rows: the `fields` of each row joined by `|`, in the order the rows come.
pub fn json_rows(rows: &[serde_json::Value], fields: &[&str]) -> Vec<String> {
    rows.iter().map(|row| fields.iter().map(|f| json_cell(&row[*f])).collect::<Vec<_>>().join("|")).collect()
}

/// A Ballista scheduler and `executors` executors (2 task slots each) on loopback, started
/// from the `ballista_scheduler` and `ballista_executor` examples.
#[cfg(feature = "ballista-cluster")]
pub fn ballista_cluster(executors: usize) -> acme_testkit::BallistaCluster {
    let (scheduler, executor) = (example_binary("ballista_scheduler"), example_binary("ballista_executor"));
    acme_testkit::BallistaCluster::start(&scheduler, &executor, executors, 2)
        .unwrap_or_else(|e| panic!("a Ballista cluster: {e}"))
}
