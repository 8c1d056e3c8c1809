//! `acme::Pipeline` on a real source: capture, model maintenance and warehouse refresh side by
//! side, reports fresh to the raw layer while model builds fold the changes in behind them.

use std::time::Duration;

use acme::query::datafusion::arrow::array::Array;

use acme::Pipeline;
use acme::query::{StatusFilter, Warehouse, open_orders_sql, pending_items_sql, top_customers_sql};
use acme_testkit::WorkloadConfig;

mod support;

/// R1 (open), R3 and R4 (pending, top 3) as rendered rows, from the source and from acme.
async fn source_reports(client: &tokio_postgres::Client) -> Vec<Vec<String>> {
    let o = "operations.orders";
    let mut out = Vec::new();
    for sql in [
        open_orders_sql(o, &StatusFilter::Open),
        pending_items_sql(o, "operations.order_items"),
        top_customers_sql(o, "operations.customers", &StatusFilter::Pending, 3),
    ] {
        let rows = client.query(&format!("SELECT CAST(q.* AS text) FROM ({sql}) q"), &[]).await.expect("oracle");
        out.push(rows.iter().map(|r| r.get::<_, String>(0)).collect());
    }
    out
}

async fn acme_reports(w: &Warehouse) -> Vec<Vec<String>> {
    let text = |v: Option<String>| match v {
        Some(s) if s.contains(' ') => format!("\"{s}\""),
        Some(s) => s,
        None => String::new(),
    };
    let r1 = w.open_orders(StatusFilter::Open, None).await.expect("R1");
    let r3 = w.pending_items_by_product(None).await.expect("R3");
    let r4 = w.top_customers(3, StatusFilter::Pending, None).await.expect("R4");
    vec![
        r1.iter()
            .map(|r| {
                let date = r.delivery_date.map(|d| d.to_string()).unwrap_or_default();
                format!("({date},{},{})", text(r.status.clone()), r.quantity)
            })
            .collect(),
        r3.iter()
            .map(|r| format!("({},{})", r.product_id.map(|p| p.to_string()).unwrap_or_default(), r.total_items))
            .collect(),
        r4.iter()
            .map(|r| {
                let id = r.customer_id.map(|c| c.to_string()).unwrap_or_default();
                format!("({id},{},{},{})", text(r.customer_name.clone()), r.quantity, r.ranking)
            })
            .collect(),
    ]
}

async fn scalar(w: &Warehouse, sql: &str) -> i64 {
    let batches =
        w.sql(&format!("SELECT CAST(({sql}) AS BIGINT)")).await.expect("sql").collect().await.expect("collect");
    let column = batches[0].column(0);
    let values = column.as_any().downcast_ref::<acme::query::datafusion::arrow::array::Int64Array>().expect("bigint");
    if values.is_null(0) { 0 } else { values.value(0) }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pipeline_keeps_the_reports_fresh_while_the_model_is_maintained_beside_the_stream() {
    let url = acme_testkit::acme_database("pipeline", Some((0.003, 41))).await.expect("source");
    let dir = tempfile::tempdir().expect("tmp");
    let config = support::config(&url, dir.path());
    // `fold_ratio(0.0)`: fold whenever there is a tail, so that builds run beside the stream.
    let pipeline = Pipeline::builder(config.clone()).fold_ratio(0.0).start().await.expect("start");
    assert!(pipeline.warehouse().model_position().is_some(), "start returns once a model exists");
    let builds_at_start = pipeline.status().borrow().model_builds;
    let client = acme_testkit::connect(&url).await.expect("connect");

    // Readers during capture, maintenance and compaction: every handle answers, and its live
    // history and live aggregate agree (one consistent state).
    let workload = WorkloadConfig {
        seed: 4141,
        rate_tps: 300.0,
        transactions: Some(900),
        duration: None,
        connections: 2,
        deletes: true,
        inserts_only: false,
    };
    let writer = {
        let url = url.clone();
        tokio::spawn(async move { acme_testkit::run_workload(&url, &workload).await })
    };
    let mut reads = 0;
    let mut positions = std::collections::BTreeSet::new();
    while !writer.is_finished() {
        let w = pipeline.warehouse();
        let open = "SELECT count(*) FROM orders_current WHERE status <> 'COMPLETED'";
        let aggregated = "SELECT sum(orders) FROM agg_orders_by_delivery_date WHERE status <> 'COMPLETED'";
        assert_eq!(scalar(&w, open).await, scalar(&w, aggregated).await, "read {reads}: one consistent state");
        positions.insert((w.raw_position(), w.model_position()));
        reads += 1;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    writer.await.expect("writer task").expect("workload");
    assert!(positions.len() > 2, "readers saw the warehouse move ({reads} reads, {} states)", positions.len());

    // One transaction on all four tables reaches R1, R3 and R4 with no build asked for.
    let row = client
        .query_one(
            "WITH c AS (INSERT INTO operations.customers (customer_name, created_at) VALUES ('Stamp', now()) \
               RETURNING customer_id), \
             p AS (INSERT INTO operations.products (product_name, barcode, unity_price, is_active) \
               VALUES ('stamp', 's', 1.00, true) RETURNING product_id), \
             o AS (INSERT INTO operations.orders (order_date, delivery_date, customer_id, status, created_at) \
               SELECT current_date, DATE '2300-01-01', customer_id, 'PENDING', now() FROM c RETURNING order_id), \
             i AS (INSERT INTO operations.order_items (order_id, product_id, quanity, created_at) \
               SELECT order_id, product_id, 9, now() FROM o, p RETURNING product_id) \
             SELECT (SELECT customer_id FROM c), (SELECT product_id FROM i)",
            &[],
        )
        .await
        .expect("stamp");
    let (customer, product): (i64, i64) = (row.get(0), row.get(1));
    let w = pipeline.caught_up().await.expect("caught up");
    let r1 = w.open_orders(StatusFilter::Open, None).await.expect("R1");
    assert!(r1.iter().any(|r| r.delivery_date.is_some_and(|d| d.to_string() == "2300-01-01")), "R1 shows it");
    let r3 = w.pending_items_by_product(None).await.expect("R3");
    assert!(r3.iter().any(|r| r.product_id == Some(product) && r.total_items == 9), "R3 shows it");
    let r4 = w.top_customers(10_000, StatusFilter::Pending, None).await.expect("R4");
    assert!(r4.iter().any(|r| r.customer_id == Some(customer) && r.quantity == 1), "R4 shows it");
    assert_eq!(acme_reports(&w).await, source_reports(&client).await, "reports vs the source");

    let status = pipeline.status().borrow().clone();
    assert!(status.running, "{status:?}");
    assert!(status.polls > 0 && status.changes > 0, "capture ran: {status:?}");
    assert!(status.model_builds > builds_at_start, "maintenance folded changes in beside the stream: {status:?}");
    assert!(status.lag_bytes.is_some(), "the lag is measured: {status:?}");
    assert!(w.raw_position() >= w.model_position(), "the reports are never behind the stored model");
    pipeline.shutdown().await.expect("shutdown");

    // A new pipeline resumes where this one stopped.
    client
        .batch_execute("UPDATE operations.orders SET status = 'COMPLETED' WHERE delivery_date = DATE '2300-01-01'")
        .await
        .expect("complete the stamp order");
    let pipeline = Pipeline::builder(config).start().await.expect("restart");
    let w = pipeline.caught_up().await.expect("caught up again");
    assert_eq!(acme_reports(&w).await, source_reports(&client).await, "reports vs the source after a restart");
    pipeline.shutdown().await.expect("shutdown again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn maintenance_folds_the_tail_in_only_once_it_reaches_the_fold_ratio() {
    let url = acme_testkit::acme_database("pipeline_fold", Some((0.003, 43))).await.expect("source");
    let dir = tempfile::tempdir().expect("tmp");
    let config = support::config(&url, dir.path());
    let interval = Duration::from_millis(200);
    let pipeline = Pipeline::builder(config)
        .model_interval(interval)
        .fold_ratio(acme::DEFAULT_FOLD_RATIO)
        .max_model_lag(Duration::from_secs(3600))
        .start()
        .await
        .expect("start");
    let client = acme_testkit::connect(&url).await.expect("connect");
    let builds_at_start = pipeline.status().borrow().model_builds;
    let model_rows = pipeline.warehouse().tail().expect("a model").model_rows;
    assert!(model_rows > 10_000, "the model holds the snapshot: {model_rows} rows");

    // A few changes: far below 5% of the model. The reports show them; no build runs.
    client
        .batch_execute(
            "UPDATE operations.orders SET status = CASE status WHEN 'PENDING' THEN 'PROCESSING' ELSE 'PENDING' END \
             WHERE order_id IN (SELECT order_id FROM operations.orders ORDER BY order_id LIMIT 5)",
        )
        .await
        .expect("small update");
    let w = pipeline.caught_up().await.expect("caught up");
    assert_eq!(acme_reports(&w).await, source_reports(&client).await, "the tail is in the reports");
    let tail = w.tail().expect("a model");
    assert!(tail.changes >= 5 && (tail.changes as f64) < acme::DEFAULT_FOLD_RATIO * tail.model_rows as f64, "{tail:?}");
    let mut status = pipeline.status();
    tokio::time::timeout(Duration::from_secs(60), status.wait_for(|s| s.tail_changes >= 5))
        .await
        .expect("maintenance looked at the tail within 60 s")
        .expect("status");
    tokio::time::sleep(interval * 5).await;
    let now = pipeline.status().borrow().clone();
    assert_eq!(now.model_builds, builds_at_start, "a small tail is applied on read, not folded in: {now:?}");
    let w = pipeline.warehouse();
    assert!(w.model_position() < w.raw_position(), "the stored model trails the reports");

    // Changes to a fifth of the items: past 5% of the model. A build folds them in.
    client
        .batch_execute("UPDATE operations.order_items SET quanity = quanity + 1 WHERE order_item_id % 5 = 0")
        .await
        .expect("large update");
    tokio::time::timeout(Duration::from_secs(120), status.wait_for(|s| s.model_builds > builds_at_start))
        .await
        .expect("a build folded the tail in within 120 s")
        .expect("status");
    let w = pipeline.caught_up().await.expect("caught up");
    assert_eq!(acme_reports(&w).await, source_reports(&client).await, "reports after the fold");
    // The stored model (not only the live view) now holds the updated items' new versions.
    let updated: i64 = client
        .query_one("SELECT count(*) FROM operations.order_items WHERE order_item_id % 5 = 0", &[])
        .await
        .expect("count")
        .get(0);
    let stored = scalar(&w, "SELECT count(*) FROM model.order_items_history WHERE opened_by = 'update'").await;
    assert!(stored >= updated, "{stored} stored update versions for {updated} updated items");
    pipeline.shutdown().await.expect("shutdown");
}
