//! The reports against the PostgreSQL oracle (`acme_testkit::oracle`, written apart from acme's
//! SQL): the same questions asked of the source tables,
//! now and as of instants recorded while the live workload ran.

use acme_core::AcmeConfig;
use acme_ingest::ChangeStream;
use acme_model::ModelBuild;
use acme_query::{QueryError, Report, StatusFilter, Warehouse};
use acme_testkit::WorkloadConfig;
use chrono::{DateTime, Utc};

mod builder;
mod faults;
mod incremental;
mod live;
mod outside;

/// The reports of `acme_testkit::oracle::REPORTS` as PostgreSQL answers them (the oracle's
/// own SQL), rendered as text rows.
async fn oracle(client: &tokio_postgres::Client, limit: usize) -> Vec<Vec<String>> {
    acme_testkit::oracle::source_reports(client, limit).await.expect("oracle query")
}

/// A pipeline from `url` into the warehouse directory `dir`, with a slot of its own.
fn warehouse_config(url: &str, dir: &std::path::Path) -> AcmeConfig {
    AcmeConfig::builder()
        .source_url(url)
        .storage_url(dir.display().to_string())
        .slot(acme_testkit::slot_for(url))
        .build()
        .expect("config")
}

/// A source database with generated data, a warehouse directory, its config, and the change
/// stream (snapshot taken).
async fn pipeline(prefix: &str, scale: f64, seed: u64) -> (String, tempfile::TempDir, AcmeConfig, ChangeStream) {
    let url = acme_testkit::acme_database(prefix, Some((scale, seed))).await.expect("source");
    let dir = tempfile::tempdir().expect("tmp");
    let config = warehouse_config(&url, dir.path());
    let stream = ChangeStream::open(config.clone()).await.expect("open stream");
    (url, dir, config, stream)
}

/// `transactions` of the live workload mix, as fast as possible.
fn workload(seed: u64, transactions: u64, connections: usize) -> WorkloadConfig {
    WorkloadConfig {
        seed,
        rate_tps: 0.0,
        transactions: Some(transactions),
        duration: None,
        connections,
        deletes: true,
        inserts_only: false,
    }
}

/// acme's answers to the reports of `acme_testkit::oracle::REPORTS`, rendered like the oracle's.
async fn acme(w: &Warehouse, limit: usize, as_of: Option<DateTime<Utc>>) -> Vec<Vec<String>> {
    let reports = [
        Report::OpenOrders(StatusFilter::Open),
        Report::OpenOrders(StatusFilter::Pending),
        Report::TopDeliveryDates { limit },
        Report::PendingItemsByProduct,
        Report::TopCustomers { limit, filter: StatusFilter::Pending },
    ];
    let mut out = Vec::new();
    for report in &reports {
        let batches = w.report_batches(report, as_of).await.unwrap_or_else(|e| panic!("{report:?}: {e}"));
        out.push(acme_testkit::oracle::render_batches(&batches).expect("render"));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reports_equal_postgres_now_and_as_of_recorded_instants() {
    let (url, _dir, config, mut stream) = pipeline("reports", 0.005, 81).await;
    let client = acme_testkit::connect(&url).await.expect("connect");
    let mut recorded = Vec::new();
    for round in 0..3u64 {
        let mix = workload(90 + round, 250, 2);
        acme_testkit::run_workload(&url, &mix).await.expect("workload");
        stream.catch_up().await.expect("catch up");
        // Each round builds the model incrementally on the previous one.
        ModelBuild::new(config.clone()).await.expect("model build");
        // Record the source's answers at an instant between writes.
        let instant: DateTime<Utc> = client.query_one("SELECT clock_timestamp()", &[]).await.expect("now").get(0);
        recorded.push((instant, oracle(&client, 3).await));
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    ModelBuild::new(config.clone()).await.expect("model build");
    let warehouse = Warehouse::open(&config.storage_url).await.expect("open warehouse");
    for limit in [1, 3, 10] {
        assert_eq!(acme(&warehouse, limit, None).await, oracle(&client, limit).await, "current state, limit {limit}");
    }
    // With no tail, R3 on the current state was counted once, by its first query, and is
    // answered from those counts (the answers above came from them).
    assert_eq!(warehouse.tail().map(|t| t.changes), Some(0), "the model holds every change");
    let r3 = warehouse.report_sql(&acme_query::Report::PendingItemsByProduct, None).expect("R3's SQL");
    assert!(r3.contains("model.pending_items_current"), "R3 from the kept counts: {r3}");
    for (instant, expected) in &recorded {
        assert_eq!(&acme(&warehouse, 3, Some(*instant)).await, expected, "as of {instant}");
    }
    // Every order's customer key names the version of its own customer in force when the order
    // was placed (or the customer's first version, or the unknown member).
    let wrong_keys = "WITH p AS (SELECT order_id, min(valid_from) AS placed_at FROM orders_history GROUP BY order_id), \
          firsts AS (SELECT customer_id, min(customer_sk) AS first_sk FROM dim_customer GROUP BY customer_id) \
        SELECT count(*) FROM fact_orders f \
        LEFT JOIN dim_customer d ON d.customer_sk = f.customer_sk \
        LEFT JOIN p ON p.order_id = f.order_id \
        LEFT JOIN firsts x ON x.customer_id = d.customer_id \
        WHERE d.customer_sk IS NULL OR (f.customer_sk <> -1 AND ( \
          d.customer_id <> f.customer_id \
          OR (d.valid_to IS NOT NULL AND d.valid_to <= p.placed_at) \
          OR (d.valid_from > p.placed_at AND d.customer_sk <> x.first_sk)))";
    assert_eq!(scalar(&warehouse, wrong_keys).await, 0, "fact_orders customer keys");
    assert!(scalar(&warehouse, "SELECT count(*) FROM fact_orders WHERE customer_sk <> -1").await > 0);
    // The same reports as Arrow batches, with the seed's column names.
    let batches = warehouse
        .report_batches(&Report::TopCustomers { limit: 3, filter: StatusFilter::Pending }, None)
        .await
        .expect("R4 batches");
    let names: Vec<String> = batches[0].schema().fields().iter().map(|f| f.name().clone()).collect();
    assert_eq!(names, ["customer_id", "customer_name", "quantity", "ranking"]);
    let typed = warehouse.top_customers(3, StatusFilter::Pending, None).await.expect("R4");
    assert_eq!(batches.iter().map(|b| b.num_rows()).sum::<usize>(), typed.len());
    // A second build over the same raw position changes nothing.
    assert!(ModelBuild::new(config.clone()).await.expect("rebuild").up_to_date);
    // Bad parameters are typed errors.
    assert!(matches!(
        warehouse.top_delivery_dates(0, None).await,
        Err(QueryError::InvalidParameter { name: "limit", .. })
    ));
    assert!(matches!(StatusFilter::parse("shipped"), Err(QueryError::InvalidParameter { name: "status", .. })));
    let long_ago = DateTime::from_timestamp(0, 0).expect("epoch");
    assert!(matches!(
        warehouse.open_orders(StatusFilter::Open, Some(long_ago)).await,
        Err(QueryError::BeforeHistory { .. })
    ));
}

/// One number from a single-value query.
async fn scalar(w: &Warehouse, sql: &str) -> i64 {
    let batches = w.sql(sql).await.expect("query").collect().await.expect("collect");
    let b = batches.first().expect("one batch");
    arrow::compute::cast(b.column(0), &arrow::datatypes::DataType::Int64)
        .expect("cast")
        .as_any()
        .downcast_ref::<arrow::array::Int64Array>()
        .expect("int64")
        .value(0)
}

/// One long-lived handle, refreshed after each round of changes, answers like the source and
/// like a handle opened afresh; with nothing new, a refresh does nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refreshed_handle_follows_the_source_and_answers_like_it() {
    let (url, _dir, config, mut stream) = pipeline("refresh", 0.003, 23).await;
    let client = acme_testkit::connect(&url).await.expect("connect");
    ModelBuild::new(config.clone()).await.expect("first build");
    let mut w = Warehouse::open(&config.storage_url).await.expect("open warehouse");
    assert!(!w.refresh().await.expect("refresh"), "nothing new: the handle stays");
    for round in 0..3u64 {
        acme_testkit::run_workload(&url, &workload(700 + round, 150, 2)).await.expect("workload");
        stream.catch_up().await.expect("catch up");
        // The raw layer moved, the model not yet: the refreshed handle sees the new raw rows
        // and keeps the model of the last build.
        let model_before = w.model_position();
        assert!(w.refresh().await.expect("refresh"), "the raw layer moved");
        assert_eq!(w.model_position(), model_before);
        let raw = "SELECT count(*) FROM raw_orders";
        let fresh = Warehouse::open(&config.storage_url).await.expect("open");
        assert_eq!(scalar(&w, raw).await, scalar(&fresh, raw).await, "raw rows, round {round}");
        ModelBuild::new(config.clone()).await.expect("model build");
        assert!(w.refresh().await.expect("refresh"), "the model moved");
        let fresh = Warehouse::open(&config.storage_url).await.expect("open");
        assert_eq!(w.model_position(), fresh.model_position());
        assert_eq!(acme(&w, 3, None).await, oracle(&client, 3).await, "refreshed handle vs PostgreSQL, round {round}");
        assert_eq!(acme(&w, 3, None).await, acme(&fresh, 3, None).await, "refreshed vs fresh handle");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readers_see_one_consistent_model_while_builds_commit() {
    let (url, _dir, config, mut stream) = pipeline("consistent", 0.002, 7).await;
    ModelBuild::new(config.clone()).await.expect("first build");
    // Writer: workload, catch-up and a model build, round after round.
    let writer_config = config.clone();
    let writer = tokio::spawn(async move {
        for round in 0..6u64 {
            let mix = workload(300 + round, 120, 1);
            acme_testkit::run_workload(&url, &mix).await.expect("workload");
            stream.catch_up().await.expect("catch up");
            ModelBuild::new(writer_config.clone()).await.expect("model build");
        }
    });
    // Readers: every handle sees the stored histories and the star schema of one build (the
    // live views add the raw tail to them, see `live.rs`).
    let mut checks = 0;
    let mut positions = std::collections::BTreeSet::new();
    while !writer.is_finished() || checks == 0 {
        let w = Warehouse::open(&config.storage_url).await.expect("open warehouse");
        let current =
            |table: &str| format!("SELECT count(*) FROM model.{table}_history WHERE is_current AND NOT is_deleted");
        let orders = scalar(&w, &current("orders")).await;
        let items = scalar(&w, &current("order_items")).await;
        assert_eq!(orders, scalar(&w, "SELECT count(*) FROM model.fact_orders WHERE is_current").await, "orders");
        let stored_items = "SELECT count(*) FROM model.fact_order_items WHERE is_current";
        assert_eq!(items, scalar(&w, stored_items).await, "items vs fact_order_items");
        let built = scalar(&w, "SELECT max(valid_from_lsn) FROM model.orders_history").await;
        assert!(w.model_position().is_some_and(|p| p.as_stored() >= built), "the model position covers its histories");
        positions.insert(w.model_position());
        checks += 1;
    }
    writer.await.expect("writer");
    assert!(positions.len() > 1, "readers saw several builds ({checks} checks)");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_column_added_at_the_source_reaches_the_history_and_current_views() {
    let (url, _dir, config, mut stream) = pipeline("model_add_column", 0.001, 5).await;
    // Before any model build the raw layer is queryable and the reports say what is missing.
    let raw_only = Warehouse::open(&config.storage_url).await.expect("open a raw-only warehouse");
    assert!(scalar(&raw_only, "SELECT count(*) FROM raw_products").await > 0);
    assert!(matches!(
        raw_only.open_orders(StatusFilter::Open, None).await,
        Err(QueryError::MissingTable { ref table, .. }) if table.contains("history")
    ));
    ModelBuild::new(config.clone()).await.expect("first build");
    let client = acme_testkit::connect(&url).await.expect("connect");
    client
        .batch_execute(
            "ALTER TABLE operations.products ADD COLUMN weight_grams integer; \
             UPDATE operations.products SET weight_grams = 250 WHERE product_id = 2",
        )
        .await
        .expect("add column");
    stream.catch_up().await.expect("catch up");
    ModelBuild::new(config.clone()).await.expect("build with the new column");
    let w = Warehouse::open(&config.storage_url).await.expect("open warehouse");
    assert_eq!(scalar(&w, "SELECT weight_grams FROM products_current WHERE product_id = 2").await, 250);
    assert_eq!(scalar(&w, "SELECT count(weight_grams) FROM products_current").await, 1, "older rows read NULL");
    assert_eq!(
        scalar(&w, "SELECT count(*) FROM products_history WHERE product_id = 2").await,
        2,
        "the snapshot version and the update"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_warehouse_on_s3_answers_like_the_source() {
    let moto = acme_testkit::MotoServer::start().expect("moto S3 server (installed by .ci/run)");
    moto.create_bucket("acme-query").expect("bucket");
    let url = acme_testkit::acme_database("query_s3", Some((0.002, 11))).await.expect("source");
    let dir = tempfile::tempdir().expect("tmp");
    let mut config = warehouse_config(&url, dir.path());
    config.storage_url = "s3://acme-query/warehouse".into();
    config.storage_options = moto.storage_options();
    let mut stream = ChangeStream::open(config.clone()).await.expect("snapshot to S3");
    acme_testkit::run_workload(&url, &workload(12, 100, 1)).await.expect("workload");
    stream.catch_up().await.expect("catch up");
    ModelBuild::new(config.clone()).await.expect("model on S3");
    let w = Warehouse::open_with_options(&config.storage_url, config.storage_options.clone()).await.expect("open");
    let client = acme_testkit::connect(&url).await.expect("connect");
    let orders: i64 = client.query_one("SELECT count(*) FROM operations.orders", &[]).await.expect("count").get(0);
    assert_eq!(scalar(&w, "SELECT count(*) FROM orders_current").await, orders);
    let limit = 3;
    assert_eq!(acme(&w, limit, None).await, oracle(&client, limit).await, "reports from S3");
}
