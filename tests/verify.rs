//! `verify` on real PostgreSQL: equal while the raw tail is unfolded, while a pipeline writes,
//! and after it stopped; "behind" when changes are missing; and a deliberately damaged
//! layer named table by table, with the keys that differ (library and program).

use std::time::Duration;

use acme::core::Layer;
use acme::core::storage::manifests;
use acme::ingest::ChangeStream;
use acme::model::ModelBuild;
use acme::verify::{VerifyOptions, verify};
use acme::{Pipeline, PipelineError, Severity};
use acme_testkit::WorkloadConfig;

mod support;

fn options() -> VerifyOptions {
    VerifyOptions { wait: Duration::from_secs(60), sample: 5 }
}

fn workload(seed: u64, transactions: u64, rate_tps: f64) -> WorkloadConfig {
    WorkloadConfig { seed, transactions: Some(transactions), rate_tps, ..Default::default() }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_finds_equal_behind_and_damaged_warehouses() {
    let url = acme_testkit::acme_database("verify", Some((0.002, 61))).await.expect("source");
    let client = acme_testkit::connect(&url).await.expect("connect");
    let dir = tempfile::tempdir().expect("tmp");
    let config = support::config(&url, dir.path());
    let mut stream = ChangeStream::open(config.clone()).await.expect("snapshot");
    ModelBuild::new(config.clone()).await.expect("model");

    // 1. Changes in the raw tail only (not folded into the model yet), no writer running (a
    // stream left open holds the slot without reading it: verify would wait for it).
    acme_testkit::run_workload(&url, &workload(611, 200, 0.0)).await.expect("workload");
    stream.catch_up().await.expect("catch up");
    drop(stream);
    let report = verify(&config, &options()).await.expect("verify");
    assert!(report.is_equal(), "{:#?}", report.tables);
    assert_eq!(report.tables.len(), 4);
    assert!(report.tables.iter().all(|t| t.source_rows > 0), "{:#?}", report.tables);
    assert!(report.warehouse_position.is_some_and(|p| p < report.lsn), "read at a later LSN");

    // 2. Changes the warehouse does not have: behind (transient), with the count.
    acme_testkit::run_workload(&url, &workload(612, 50, 0.0)).await.expect("workload");
    match verify(&config, &options()).await {
        Err(error @ PipelineError::Behind { pending, .. }) => {
            assert!(pending > 0, "{error}");
            assert_eq!(error.severity(), Severity::Transient);
            assert!(error.to_string().contains("run `sync`"), "{error}");
        }
        other => panic!("expected the warehouse to be behind: {other:?}"),
    }
    let mut stream = ChangeStream::open(config.clone()).await.expect("resume");
    stream.catch_up().await.expect("catch up");
    drop(stream);
    assert!(verify(&config, &options()).await.expect("verify").is_equal(), "caught up again");

    // 3. While a pipeline writes under a running workload: verify waits for it to reach the
    // source's position.
    let pipeline = Pipeline::builder(config.clone()).start().await.expect("pipeline");
    let writer = {
        let url = url.clone();
        tokio::spawn(async move { acme_testkit::run_workload(&url, &workload(613, 600, 150.0)).await })
    };
    tokio::time::sleep(Duration::from_secs(1)).await;
    let during = verify(&config, &options()).await.expect("verify while the pipeline writes");
    assert!(during.is_equal(), "{:#?}", during.tables);
    writer.await.expect("join").expect("workload");
    pipeline.caught_up().await.expect("caught up");
    pipeline.shutdown().await.expect("shut down");
    ModelBuild::new(config.clone()).await.expect("fold the tail");
    assert!(verify(&config, &options()).await.expect("verify").is_equal(), "after the pipeline stopped");

    // 4. A damaged layer: a customer's versions deleted from its history and an order's
    // status rewritten, recorded in the model's manifest as if a writer had committed them.
    let customer: i64 =
        client.query_one("SELECT min(customer_id) FROM operations.customers", &[]).await.expect("customer").get(0);
    let order: i64 = client.query_one("SELECT max(order_id) FROM operations.orders", &[]).await.expect("order").get(0);
    let storage = acme::core::Storage::new(&config.storage_url, Default::default()).expect("storage");
    let mut manifest = storage.get_manifest(manifests::MODEL).await.expect("read").expect("a model manifest");
    let customers = storage.open(Layer::Intermediate, "customers_history").await.expect("open").expect("exists");
    let (damaged, _) = customers
        .delta()
        .clone()
        .delete()
        .with_predicate(format!("customer_id = {customer}"))
        .await
        .expect("delete a customer's versions");
    manifest.tables.insert(customers.name().to_string(), damaged.version().expect("version"));
    let orders = storage.open(Layer::Intermediate, "orders_history").await.expect("open").expect("exists");
    let (damaged, _) = orders
        .delta()
        .clone()
        .update()
        .with_predicate(format!("order_id = {order}"))
        .with_update("status", "'damaged'")
        .await
        .expect("rewrite an order's status");
    manifest.tables.insert(orders.name().to_string(), damaged.version().expect("version"));
    storage.put_manifest(manifests::MODEL, &manifest).await.expect("record the damage");

    let report = verify(&config, &options()).await.expect("verify");
    let differing: Vec<&str> = report.tables.iter().filter(|t| !t.is_equal()).map(|t| t.table.as_str()).collect();
    assert_eq!(differing, ["operations.customers", "operations.orders"], "{:#?}", report.tables);
    let keys = |table: &str| report.tables.iter().find(|t| t.table == table).expect("table").differing_keys.clone();
    assert_eq!(keys("operations.customers"), [format!("customer_id={customer}")]);
    assert_eq!(keys("operations.orders"), [format!("order_id={order}")]);
    let customers = report.tables.iter().find(|t| t.table == "operations.customers").expect("customers");
    assert_eq!(customers.warehouse_rows + 1, customers.source_rows, "one customer missing");

    // The program: exit 1, naming the tables and keys; 0 on an equal warehouse is step 1's.
    let output = std::process::Command::new(support::example_binary("verify"))
        .args(["--source", &url, "--warehouse", &config.storage_url, "--slot", &config.slot, "--wait-s", "10"])
        .output()
        .expect("run verify");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stdout}\n{stderr}");
    assert!(stdout.contains("operations.customers: DIFFERENT"), "{stdout}");
    assert!(stdout.contains(&format!("order_id={order}")), "{stdout}");
    assert!(stdout.contains("operations.products: equal"), "{stdout}");
    assert!(stderr.contains("differs from the source in 2 of 4 tables"), "{stderr}");
}
