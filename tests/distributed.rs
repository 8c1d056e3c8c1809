//! The reports, current and as of, and ad-hoc SQL on an Apache Ballista cluster (one scheduler
//! and two executors, each a separate process on loopback) over a warehouse in S3 (moto):
//! pinned to one model version, equal to the embedded `Warehouse` at that version and to
//! PostgreSQL, after incremental model builds over streams of updates and deletes.

use std::collections::HashMap;

use acme::ingest::ChangeStream;
use acme::model::ModelBuild;
use acme::query::distributed::DistributedWarehouse;
use acme::query::{QueryError, Report, StatusFilter, Warehouse};
use acme_testkit::WorkloadConfig;
use chrono::{DateTime, Utc};

mod support;

/// `transactions` of the live workload mix (updates, deletes, inserts), as fast as possible.
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

fn reports(limit: usize) -> [Report; 5] {
    [
        Report::OpenOrders(StatusFilter::Open),
        Report::OpenOrders(StatusFilter::Pending),
        Report::TopDeliveryDates { limit },
        Report::PendingItemsByProduct,
        Report::TopCustomers { limit, filter: StatusFilter::Pending },
    ]
}

/// The cluster's answers to the reports of `acme_testkit::oracle::REPORTS`, rendered like the
/// oracle's rows.
async fn distributed(w: &DistributedWarehouse, limit: usize, as_of: Option<DateTime<Utc>>) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    for report in &reports(limit) {
        let batches =
            w.report_batches(report, as_of).await.unwrap_or_else(|e| panic!("{report:?} as of {as_of:?}: {e:?}"));
        out.push(acme_testkit::oracle::render_batches(&batches).expect("render"));
    }
    out
}

async fn rows(df: acme::query::datafusion::prelude::DataFrame) -> Vec<String> {
    acme_testkit::oracle::render_batches(&df.collect().await.expect("collect")).expect("render")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reports_on_a_ballista_cluster_equal_the_embedded_warehouse_and_postgres() {
    let moto = acme_testkit::MotoServer::start().expect("moto S3 server (installed by .ci/run)");
    moto.create_bucket("acme-ballista").expect("bucket");
    let url = acme_testkit::acme_database("ballista", Some((0.005, 31))).await.expect("source");
    let dir = tempfile::tempdir().expect("tmp");
    let mut config = support::config(&url, dir.path());
    config.storage_url = "s3://acme-ballista/warehouse".into();
    config.storage_options = moto.storage_options();
    // A cluster's Parquet scan does not apply deletion vectors: steps rewrite files instead.
    config.deletion_vectors = false;
    let options: HashMap<String, String> = config.storage_options.clone();
    let client = acme_testkit::connect(&url).await.expect("connect");

    // A snapshot, then rounds of updates and deletes, each folded in by an incremental build.
    let mut stream = ChangeStream::open(config.clone()).await.expect("snapshot to S3");
    let mut recorded = Vec::new();
    for round in 0..2u64 {
        acme_testkit::run_workload(&url, &workload(40 + round, 200)).await.expect("workload");
        stream.catch_up().await.expect("catch up");
        ModelBuild::new(config.clone()).await.expect("model build");
        let now = "SELECT to_char(clock_timestamp() AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')";
        let text: String = client.query_one(now, &[]).await.expect("now").get(0);
        recorded.push(DateTime::parse_from_rfc3339(&text).expect("an RFC 3339 instant").with_timezone(&Utc));
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }

    let cluster = support::ballista_cluster(2);
    let embedded = Warehouse::open_with_options(&config.storage_url, options.clone()).await.expect("open");
    assert_eq!(embedded.tail().map(|t| t.changes), Some(0), "the model holds every change");
    let remote = DistributedWarehouse::connect(&cluster.url(), &config.storage_url, options.clone())
        .await
        .unwrap_or_else(|e| panic!("connect to the cluster: {e:?}\n{}", cluster.all_logs()));
    assert_eq!(Some(remote.model_position()), embedded.model_position(), "pinned to the model's version");
    assert_eq!(remote.history_start(), embedded.history_start());

    // Current state: the cluster, the embedded warehouse and PostgreSQL agree.
    for limit in [1, 3] {
        let answers = distributed(&remote, limit, None).await;
        assert_eq!(answers, support::reports(&embedded, limit).await, "current state, limit {limit}");
        assert_eq!(answers, acme_testkit::oracle::source_reports(&client, limit).await.expect("oracle"));
    }
    // As of the instants recorded between the rounds (read from the histories' validity).
    for instant in &recorded {
        assert_eq!(
            distributed(&remote, 3, Some(*instant)).await,
            support::reports_as_of(&embedded, 3, Some(*instant)).await,
            "as of {instant}"
        );
    }
    // The typed API gives the embedded one's rows.
    assert_eq!(
        remote.top_customers(3, StatusFilter::Pending, None).await.expect("R4"),
        embedded.top_customers(3, StatusFilter::Pending, None).await.expect("R4")
    );
    assert_eq!(
        remote.pending_items_by_product(Some(recorded[0])).await.expect("R3"),
        embedded.pending_items_by_product(Some(recorded[0])).await.expect("R3")
    );
    // Ad-hoc SQL over the histories, the current views and the star schema.
    for sql in [
        "SELECT status, count(*) AS n FROM orders_current GROUP BY status ORDER BY status",
        "SELECT count(*) AS n, sum(quantity) AS q FROM fact_order_items WHERE is_current",
        "SELECT c.customer_name, count(*) AS n FROM fact_orders o JOIN dim_customer c ON c.customer_sk = o.customer_sk \
         WHERE o.is_current GROUP BY c.customer_name ORDER BY n DESC, c.customer_name LIMIT 5",
    ] {
        let on_cluster = rows(remote.sql(sql).await.expect("plan on the cluster")).await;
        assert_eq!(on_cluster, rows(embedded.sql(sql).await.expect("plan")).await, "{sql}");
    }

    // A later build does not move a connected handle: it stays on its model version.
    let before = distributed(&remote, 3, None).await;
    acme_testkit::run_workload(&url, &workload(50, 200)).await.expect("workload");
    stream.catch_up().await.expect("catch up");
    ModelBuild::new(config.clone()).await.expect("model build");
    assert_eq!(distributed(&remote, 3, None).await, before, "a handle keeps its model version");
    let moved =
        DistributedWarehouse::connect(&cluster.url(), &config.storage_url, options.clone()).await.expect("connect");
    assert!(moved.model_position() > remote.model_position());
    let embedded = Warehouse::open_with_options(&config.storage_url, options.clone()).await.expect("open");
    assert_eq!(distributed(&moved, 3, None).await, support::reports(&embedded, 3).await, "after another build");
    assert_eq!(
        distributed(&moved, 3, None).await,
        acme_testkit::oracle::source_reports(&client, 3).await.expect("oracle")
    );

    // Both executors ran tasks.
    for i in 0..2 {
        assert!(cluster.executor_log(i).contains("Execute task"), "executor {i} ran no task\n{}", cluster.all_logs());
    }

    // Bad input is a typed error.
    assert!(matches!(
        remote.top_delivery_dates(0, None).await,
        Err(QueryError::InvalidParameter { name: "limit", .. })
    ));
    let long_ago = DateTime::from_timestamp(0, 0).expect("epoch");
    assert!(matches!(
        remote.open_orders(StatusFilter::Open, Some(long_ago)).await,
        Err(QueryError::BeforeHistory { .. })
    ));
    let empty = tempfile::tempdir().expect("tmp");
    let no_model =
        DistributedWarehouse::connect(&cluster.url(), &empty.path().display().to_string(), HashMap::new()).await;
    assert!(matches!(no_model, Err(QueryError::MissingTable { .. })), "{no_model:?}");
    let port = std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("a free port").port();
    let closed = format!("df://127.0.0.1:{port}");
    let unreachable = DistributedWarehouse::connect(&closed, &config.storage_url, options.clone()).await;
    match unreachable {
        Err(e @ QueryError::Cluster { .. }) => assert!(e.to_string().contains(&closed), "{e}"),
        other => panic!("no scheduler at {closed}: {other:?}"),
    }
    // A model whose steps marked rows with deletion vectors is refused, naming the setting.
    acme_testkit::run_workload(&url, &workload(60, 200)).await.expect("workload");
    stream.catch_up().await.expect("catch up");
    ModelBuild::new(acme::core::AcmeConfig { deletion_vectors: true, ..config.clone() }).await.expect("model build");
    match DistributedWarehouse::connect(&cluster.url(), &config.storage_url, options).await {
        Err(e @ QueryError::DeletionVectors { .. }) => assert!(e.to_string().contains("deletion_vectors"), "{e}"),
        other => panic!("a model with deletion vectors: {other:?}"),
    }
}
