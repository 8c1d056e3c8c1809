//! The HTTP service over real HTTP on loopback, against a warehouse built from a real source.

use std::io::{Read, Write};

use acme::http::{ServiceState, router};
use acme::ingest::ChangeStream;
use acme::model::ModelBuild;
use acme::query::Warehouse;

mod support;

/// A plain HTTP/1.1 GET: (status code, body).
fn get(addr: std::net::SocketAddr, path: &str) -> (u16, serde_json::Value) {
    let mut stream = std::net::TcpStream::connect(addr).expect("connect");
    write!(stream, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").expect("send");
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("read");
    let status = response.split_whitespace().nth(1).and_then(|s| s.parse().ok()).expect("status line");
    let body = response.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or_default();
    (status, serde_json::from_str(body).unwrap_or(serde_json::Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_answers_the_seed_endpoints_and_rejects_bad_parameters() {
    let url = acme_testkit::acme_database("http", Some((0.002, 5))).await.expect("source");
    let dir = tempfile::tempdir().expect("tmp");
    let config = support::config(&url, dir.path());
    ChangeStream::open(config.clone()).await.expect("stream");
    ModelBuild::new(config.clone()).await.expect("model");
    let warehouse = Warehouse::open(&config.storage_url).await.expect("warehouse");
    let expected_top = warehouse.top_delivery_dates(2, None).await.expect("R2");
    let (addr, server) = serve(ServiceState::new(warehouse)).await;

    let checks = tokio::task::spawn_blocking(move || {
        let (status, body) = get(addr, "/health");
        assert_eq!((status, body["status"].as_str()), (200, Some("ok")));
        let (status, body) = get(addr, "/analytics/orders?status=open");
        assert_eq!(status, 200);
        let rows = body.as_array().expect("array");
        assert!(!rows.is_empty() && rows[0].get("delivery_date").is_some() && rows[0].get("quantity").is_some());
        let (status, body) = get(addr, "/analytics/orders/top?limit=2");
        assert_eq!(status, 200);
        assert_eq!(body, serde_json::to_value(&expected_top).expect("json"));
        let (status, body) = get(addr, "/analytics/orders/product");
        assert!(status == 200 && body[0].get("total_items").is_some());
        let (status, body) = get(addr, "/analytics/orders/customers?status=open&limit=3");
        assert!(status == 200 && body[0].get("ranking").is_some() && body[0].get("customer_name").is_some());
        for bad in [
            "/analytics/orders?status=shipped",
            "/analytics/orders/top?limit=0",
            "/analytics/orders/top?limit=abc",
            "/analytics/orders/product?as_of=yesterday",
            "/analytics/orders/customers?as_of=1970-01-01T00:00:00Z",
        ] {
            let (status, body) = get(addr, bad);
            assert_eq!(status, 400, "{bad}");
            assert!(body["error"].as_str().is_some_and(|e| !e.is_empty()), "{bad}: {body}");
        }
    })
    .await;
    server.abort();
    checks.expect("HTTP checks");
}

/// Serve `state` on a free loopback port: the address, and the server's task (abort it to stop).
async fn serve(state: ServiceState) -> (std::net::SocketAddr, tokio::task::JoinHandle<std::io::Result<()>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    (addr, tokio::spawn(async move { axum::serve(listener, router(state)).await }))
}

/// A JSON array of report rows rendered as the references render rows (`fields` of each row).
fn render(body: &serde_json::Value, fields: &[&str]) -> Vec<String> {
    support::json_rows(body.as_array().unwrap_or_else(|| panic!("an array of rows: {body}")), fields)
}

/// Every endpoint's body, now and as of past instants, equals the references written apart
/// from acme, row order included: PostgreSQL's answer now (`acme_testkit::oracle`) and the
/// row-by-row replay of the raw changes (`acme_testkit::replay`) as of each instant.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_endpoint_answers_as_the_references_now_and_as_of_row_order_included() {
    let url = acme_testkit::acme_database("http_oracle", Some((0.002, 21))).await.expect("source");
    let dir = tempfile::tempdir().expect("tmp");
    let config = support::config(&url, dir.path());
    let mut stream = ChangeStream::open(config.clone()).await.expect("snapshot");
    for seed in [2101, 2102] {
        let workload = acme_testkit::WorkloadConfig { seed, transactions: Some(400), ..Default::default() };
        acme_testkit::run_workload(&url, &workload).await.expect("workload");
        stream.catch_up().await.expect("catch up");
    }
    ModelBuild::new(config.clone()).await.expect("model");
    let warehouse = Warehouse::open(&config.storage_url).await.expect("warehouse");
    let replay = support::replay(&warehouse).await;
    let client = acme_testkit::connect(&url).await.expect("connect");
    let limit = 3;
    let now = acme_testkit::oracle::source_reports(&client, limit).await.expect("the oracle");
    let times = replay.commit_times();
    assert!(times.len() > 10, "the workload committed changes after the snapshot");
    let instants: Vec<i64> =
        [replay.snapshot_time().expect("a snapshot"), times[times.len() / 3], times[2 * times.len() / 3]].into();
    let (addr, server) = serve(ServiceState::new(warehouse)).await;

    // The endpoints in the order of `acme_testkit::oracle::REPORTS`, with the fields of a row.
    let endpoints: [(String, &[&str]); 5] = [
        ("/analytics/orders?status=open".into(), &["delivery_date", "status", "quantity"]),
        ("/analytics/orders?status=pending".into(), &["delivery_date", "status", "quantity"]),
        (format!("/analytics/orders/top?limit={limit}"), &["delivery_date", "quantity"]),
        ("/analytics/orders/product?".into(), &["product_id", "total_items"]),
        (
            format!("/analytics/orders/customers?status=pending&limit={limit}"),
            &["customer_id", "customer_name", "quantity", "ranking"],
        ),
    ];
    let checks = tokio::task::spawn_blocking(move || {
        let mut compared = 0;
        for (i, (path, fields)) in endpoints.iter().enumerate() {
            let name = acme_testkit::oracle::REPORTS[i];
            let (status, body) = get(addr, path);
            assert_eq!(status, 200, "{path}: {body}");
            assert_eq!(render(&body, fields), now[i], "{name} ({path}) now vs PostgreSQL");
            compared += now[i].len();
            for at in &instants {
                let instant = chrono::DateTime::from_timestamp_micros(*at).expect("instant");
                let stamp = instant.to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
                let sep = if path.ends_with('?') { "" } else { "&" };
                let (status, body) = get(addr, &format!("{path}{sep}as_of={stamp}"));
                assert_eq!(status, 200, "{path} as of {stamp}: {body}");
                let expected = &replay.reports(Some(*at), limit)[i];
                assert_eq!(&render(&body, fields), expected, "{name} ({path}) as of {stamp} vs the replay");
                compared += expected.len();
            }
        }
        compared
    })
    .await;
    server.abort();
    assert!(checks.expect("HTTP checks") > 100, "the bodies compared held rows");
}

/// `serve` without `--source` (`ServiceState::following`): another writer commits, and the
/// served handle is refreshed (not reopened) to its newest state, keeping a table the caller
/// registered on the handle.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_served_warehouse_follows_its_writer_by_refreshing() {
    let url = acme_testkit::acme_database("http_follow", Some((0.002, 13))).await.expect("source");
    let dir = tempfile::tempdir().expect("tmp");
    let config = support::config(&url, dir.path());
    let mut stream = ChangeStream::open(config.clone()).await.expect("stream");
    ModelBuild::new(config.clone()).await.expect("model");
    let warehouse = Warehouse::open(&config.storage_url).await.expect("warehouse");
    warehouse.sql("CREATE TABLE callers_notes AS VALUES (1, 'kept')").await.expect("a table of the caller's");
    let state = ServiceState::following(warehouse, std::time::Duration::from_millis(100));
    let probe = state.clone();
    let (addr, server) = serve(state).await;
    let health = |addr| async move { tokio::task::spawn_blocking(move || get(addr, "/health")).await.expect("GET") };
    let before = health(addr).await.1["raw_position"].as_i64().expect("raw position");

    // Another writer (here the stream of this test) commits; the service moves to it.
    acme_testkit::run_workload(&url, &acme_testkit::WorkloadConfig { transactions: Some(200), ..Default::default() })
        .await
        .expect("workload");
    stream.catch_up().await.expect("catch up");
    let fresh = Warehouse::open(&config.storage_url).await.expect("open afresh");
    let target = fresh.raw_position().expect("raw position").as_stored();
    assert!(target > before, "the writer committed");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while health(addr).await.1["raw_position"].as_i64() != Some(target) {
        assert!(std::time::Instant::now() < deadline, "the served handle did not reach {target}");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let (status, body) =
        tokio::task::spawn_blocking(move || get(addr, "/analytics/orders/product")).await.expect("GET");
    let expected = fresh.pending_items_by_product(None).await.expect("R3");
    assert_eq!((status, body), (200, serde_json::to_value(&expected).expect("json")), "R3 of the refreshed handle");
    let served = probe.warehouse().await;
    let notes = served.sql("SELECT column2 FROM callers_notes").await.expect("still registered");
    assert_eq!(notes.collect().await.expect("rows")[0].num_rows(), 1);
    server.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_answers_503_without_a_model_and_once_the_pipeline_stopped() {
    let ready = |addr| tokio::task::spawn_blocking(move || get(addr, "/ready"));
    let url = acme_testkit::acme_database("http_ready", Some((0.001, 9))).await.expect("source");
    let dir = tempfile::tempdir().expect("tmp");
    let config = support::config(&url, dir.path());

    // Only the raw layer: not ready, and it says why; still alive.
    ChangeStream::open(config.clone()).await.expect("snapshot");
    let (addr, server) = serve(ServiceState::new(Warehouse::open(&config.storage_url).await.expect("open"))).await;
    let (status, body) = ready(addr).await.expect("GET /ready");
    assert_eq!((status, body["ready"].as_bool()), (503, Some(false)), "{body}");
    assert!(body["reason"].as_str().is_some_and(|r| r.contains("no model yet")), "{body}");
    assert_eq!(tokio::task::spawn_blocking(move || get(addr, "/health")).await.expect("health").0, 200);
    server.abort();

    // A running pipeline: ready, with its positions and lag; then stopped: not ready.
    let pipeline = acme::Pipeline::builder(config).start().await.expect("start");
    let (addr, server) = serve(ServiceState::pipeline(&pipeline)).await;
    let mut status = pipeline.status();
    tokio::time::timeout(std::time::Duration::from_secs(30), status.wait_for(|s| s.lag_seconds.is_some()))
        .await
        .expect("the lag is measured within 30 s")
        .expect("status");
    let (code, body) = ready(addr).await.expect("GET /ready");
    assert_eq!((code, body["ready"].as_bool()), (200, Some(true)), "{body}");
    assert!(body["model_position"].is_i64() && body["lag_seconds"].is_f64(), "{body}");
    pipeline.shutdown().await.expect("shutdown");
    let (code, body) = ready(addr).await.expect("GET /ready");
    assert_eq!(code, 503, "{body}");
    assert!(body["reason"].as_str().is_some_and(|r| r.contains("stopped")), "{body}");
    server.abort();
}
