//! Integration tests of the test harness: a real PostgreSQL cluster, the ACME schema, the bulk
//! generator and the live workload.

use acme_testkit::{PgCluster, ScaleFactor, WorkloadConfig, bulk_load, connect, create_source_schema, table_counts};

async fn fresh_source(prefix: &str) -> String {
    let url = PgCluster::shared().create_database(prefix).await.expect("create database");
    let client = connect(&url).await.expect("connect");
    create_source_schema(&client).await.expect("create schema");
    url
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_runs_with_logical_wal_level_on_loopback() {
    let url = PgCluster::shared().create_database("harness").await.expect("create database");
    let client = connect(&url).await.expect("connect");
    let wal: String = client.query_one("SHOW wal_level", &[]).await.expect("show").get(0);
    assert_eq!(wal, "logical");
    let listen: String = client.query_one("SHOW listen_addresses", &[]).await.expect("show").get(0);
    assert_eq!(listen, "127.0.0.1");
    let user: String = client.query_one("SELECT current_user", &[]).await.expect("user").get(0);
    assert_eq!(user, "postgres");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn source_schema_matches_acme_md() {
    let url = fresh_source("schema").await;
    let client = connect(&url).await.expect("connect");
    let rows = client
        .query(
            "SELECT c.relname::text, c.relreplident::text FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE n.nspname = 'operations' AND c.relkind = 'r' ORDER BY 1",
            &[],
        )
        .await
        .expect("tables");
    let tables: Vec<(String, String)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    assert_eq!(
        tables,
        vec![
            ("customers".to_string(), "f".to_string()),
            ("order_items".to_string(), "f".to_string()),
            ("orders".to_string(), "f".to_string()),
            ("products".to_string(), "f".to_string()),
        ]
    );
    let types: Vec<String> = client
        .query(
            "SELECT format_type(atttypid, atttypmod) FROM pg_attribute \
             WHERE attrelid = 'operations.products'::regclass AND attnum > 0 AND NOT attisdropped ORDER BY attnum",
            &[],
        )
        .await
        .expect("columns")
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(
        types,
        [
            "bigint",
            "character varying(500)",
            "character varying(26)",
            "numeric",
            "boolean",
            "timestamp(3) without time zone",
            "bigint",
            "timestamp(3) without time zone",
            "bigint"
        ]
    );
    let published: i64 = client
        .query_one("SELECT count(*) FROM pg_publication_tables WHERE pubname = 'acme_publication'", &[])
        .await
        .expect("publication")
        .get(0);
    assert_eq!(published, 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_load_at_sf001_writes_the_scaled_counts_deterministically() {
    let scale = ScaleFactor::new(0.01).expect("scale");
    let url_a = fresh_source("load_a").await;
    let url_b = fresh_source("load_b").await;
    let report = bulk_load(&url_a, scale, 7).await.expect("load a");
    bulk_load(&url_b, scale, 7).await.expect("load b");
    assert_eq!((report.customers, report.products, report.orders), (1_000, 100, 10_000));
    assert!((70_000..=100_000).contains(&report.order_items), "items: {}", report.order_items);
    let a = connect(&url_a).await.expect("connect a");
    let b = connect(&url_b).await.expect("connect b");
    let counts = table_counts(&a).await.expect("counts");
    assert_eq!(counts, [1_000, 100, 10_000, report.order_items as i64]);
    // The same seed gives the same data, row for row.
    let digest = "SELECT md5(string_agg(o::text, ',' ORDER BY order_id)) FROM operations.orders o";
    let da: String = a.query_one(digest, &[]).await.expect("digest a").get(0);
    let db: String = b.query_one(digest, &[]).await.expect("digest b").get(0);
    assert_eq!(da, db);
    // About half the orders are open; every delivery is ten days after the order.
    let open: i64 = a
        .query_one("SELECT count(*) FROM operations.orders WHERE status <> 'COMPLETED'", &[])
        .await
        .expect("open")
        .get(0);
    assert!((4_000..=6_000).contains(&open), "open orders: {open}");
    let off: i64 = a
        .query_one("SELECT count(*) FROM operations.orders WHERE delivery_date <> order_date + 10", &[])
        .await
        .expect("dates")
        .get(0);
    assert_eq!(off, 0);
    // New rows get fresh ids from the sequences.
    let next: i64 = a
        .query_one("INSERT INTO operations.orders (status) VALUES ('PENDING') RETURNING order_id", &[])
        .await
        .expect("insert")
        .get(0);
    assert_eq!(next, 10_001);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_workload_reports_exactly_what_it_changed() {
    let url = fresh_source("live").await;
    bulk_load(&url, ScaleFactor::new(0.01).expect("scale"), 11).await.expect("load");
    let client = connect(&url).await.expect("connect");
    let before = table_counts(&client).await.expect("before");
    let config = WorkloadConfig {
        seed: 5,
        rate_tps: 0.0,
        transactions: Some(400),
        duration: None,
        connections: 2,
        deletes: true,
        inserts_only: false,
    };
    let report = acme_testkit::run_workload(&url, &config).await.expect("workload");
    let after = table_counts(&client).await.expect("after");
    assert!(report.transactions >= 400, "transactions: {}", report.transactions);
    for (i, table) in acme_testkit::TABLES.iter().enumerate() {
        let changes = report.tables[i];
        assert_eq!(after[i], before[i] + changes.inserted as i64 - changes.deleted as i64, "{table}: {changes:?}");
    }
    assert!(report.tables[acme_testkit::workload::ORDERS].inserted > 0);
    assert!(report.tables[acme_testkit::workload::ORDERS].updated > 0);
    // Every order the workload inserted has the shape of ACME.md.
    let bad: i64 = client
        .query_one(
            "SELECT count(*) FROM operations.orders WHERE order_id > 10000 AND (delivery_date <> order_date + 10 \
             OR status NOT IN ('PENDING','PROCESSING','REPROCESSING','COMPLETED'))",
            &[],
        )
        .await
        .expect("shape")
        .get(0);
    assert_eq!(bad, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workload_without_a_limit_is_rejected() {
    let config = WorkloadConfig { transactions: None, duration: None, ..WorkloadConfig::default() };
    let err = acme_testkit::run_workload("postgres://127.0.0.1:1/none", &config).await.expect_err("no limit");
    assert!(err.to_string().contains("transaction count or a duration"), "{err}");
}
