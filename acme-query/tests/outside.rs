//! An outside reader gets the reports' answers from the presentation layer: delta-rs's Python
//! binding opens the Delta versions of the star-schema tables and DuckDB runs R1, R3
//! and R4 as dimensional queries over them (`readers/presentation_reports.py`), pinned to the
//! versions of `_acme/model.json`. Once the model build has folded the changes in, its answers
//! equal acme's and PostgreSQL's. (`tests/asof.rs` runs it beside a live pipeline.)

use acme_model::ModelBuild;
use acme_query::{StatusFilter, Warehouse};
use serde_json::{Value, json};

use crate::{oracle, pipeline, workload};

/// R1 (open), R3 and R4 (pending, top 3) of `w` in the script's JSON shape.
async fn acme_json(w: &Warehouse) -> Value {
    let r1: Vec<Value> = w
        .open_orders(StatusFilter::Open, None)
        .await
        .expect("R1")
        .into_iter()
        .map(|r| json!([r.delivery_date.map(|d| d.to_string()), r.status, r.quantity]))
        .collect();
    let r3: Vec<Value> = w
        .pending_items_by_product(None)
        .await
        .expect("R3")
        .into_iter()
        .map(|r| json!([r.product_id, r.total_items]))
        .collect();
    let r4: Vec<Value> = w
        .top_customers(3, StatusFilter::Pending, None)
        .await
        .expect("R4")
        .into_iter()
        .map(|r| json!([r.customer_id, r.customer_name, r.quantity, r.ranking]))
        .collect();
    json!({ "r1": r1, "r3": r3, "r4": r4 })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outside_reader_gets_the_reports_from_the_presentation_tables() {
    let (url, dir, config, mut stream) = pipeline("outside_reports", 0.003, 53).await;
    ModelBuild::new(config.clone()).await.expect("first build");
    let client = acme_testkit::connect(&url).await.expect("connect");
    for round in 0..2u64 {
        acme_testkit::run_workload(&url, &workload(900 + round, 150, 2)).await.expect("workload");
        stream.catch_up().await.expect("catch up");
        ModelBuild::new(config.clone()).await.expect("build");
    }
    let w = Warehouse::open(&config.storage_url).await.expect("open");
    assert_eq!(w.raw_position(), w.model_position(), "the build folded every change in");
    assert_eq!(crate::acme(&w, 3, None).await, oracle(&client, 3).await, "acme vs PostgreSQL");
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/readers/presentation_reports.py");
    let python = acme_testkit::outside::python().expect("the Python environment of .ci/run");
    let output = std::process::Command::new(python).arg(script).arg(dir.path()).output().expect("run the reader");
    assert!(output.status.success(), "outside reader failed: {}", String::from_utf8_lossy(&output.stderr));
    let outside: Value = serde_json::from_slice(&output.stdout).expect("JSON from the reader");
    assert!(outside["r1"].as_array().is_some_and(|rows| !rows.is_empty()), "R1 has rows: {outside}");
    let mut expected = acme_json(&w).await;
    expected["position"] = json!(w.model_position().map(|p| p.as_stored()));
    assert_eq!(outside, expected, "DuckDB over the presentation tables (pinned to _acme/model.json) vs acme");
    // Between builds, the latest version of each table is the manifest's.
    let latest = std::process::Command::new(acme_testkit::outside::python().expect("python"))
        .arg(script)
        .arg(dir.path())
        .arg("--latest")
        .output()
        .expect("run the reader");
    assert!(latest.status.success(), "outside reader failed: {}", String::from_utf8_lossy(&latest.stderr));
    let mut latest: Value = serde_json::from_slice(&latest.stdout).expect("JSON from the reader");
    assert_eq!(latest["position"], Value::Null, "--latest reads no manifest");
    latest["position"] = expected["position"].clone();
    assert_eq!(latest, expected, "DuckDB over the latest versions vs acme, between builds");
}
