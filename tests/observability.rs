//! What a running pipeline tells its operator, on a real source: the metrics `serve` exposes at
//! `GET /metrics` (Prometheus text), the tracing spans of each stage, and JSON logs.
//!
//! The metrics recorder and the tracing subscriber are process-wide, so the pipeline test is
//! alone in this test binary: its counters are exact.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use acme::Pipeline;
use acme::http::{ServiceState, router};
use acme::query::StatusFilter;
use tracing::field::{Field, Visit};
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::registry::LookupSpan;

mod support;

/// A closed span: its name and fields.
type SpanRecord = (String, BTreeMap<String, String>);

/// A tracing layer that keeps every closed span of acme's crates with its fields.
#[derive(Clone, Default)]
struct SpanLog(Arc<Mutex<Vec<SpanRecord>>>);

struct Fields(BTreeMap<String, String>);

impl Visit for Fields {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.0.insert(field.name().to_string(), format!("{value:?}"));
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().to_string(), value.to_string());
    }
}

impl<S: tracing::Subscriber + for<'a> LookupSpan<'a>> tracing_subscriber::Layer<S> for SpanLog {
    fn on_new_span(&self, attrs: &tracing::span::Attributes<'_>, id: &tracing::span::Id, ctx: Context<'_, S>) {
        let mut fields = Fields(BTreeMap::new());
        attrs.record(&mut fields);
        if let Some(span) = ctx.span(id) {
            span.extensions_mut().insert(fields);
        }
    }

    fn on_record(&self, id: &tracing::span::Id, values: &tracing::span::Record<'_>, ctx: Context<'_, S>) {
        if let Some(span) = ctx.span(id)
            && let Some(fields) = span.extensions_mut().get_mut::<Fields>()
        {
            values.record(fields);
        }
    }

    fn on_close(&self, id: tracing::span::Id, ctx: Context<'_, S>) {
        if let Some(span) = ctx.span(&id) {
            let fields = span.extensions_mut().remove::<Fields>().map(|f| f.0).unwrap_or_default();
            self.0.lock().expect("span log").push((span.name().to_string(), fields));
        }
    }
}

impl SpanLog {
    /// The fields of the closed spans named `name`.
    fn named(&self, name: &str) -> Vec<BTreeMap<String, String>> {
        self.0.lock().expect("span log").iter().filter(|(n, _)| n == name).map(|(_, f)| f.clone()).collect()
    }
}

/// A plain HTTP/1.1 GET: (status code, body).
fn get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    let mut stream = std::net::TcpStream::connect(addr).expect("connect");
    write!(stream, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").expect("send");
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("read");
    let status = response.split_whitespace().nth(1).and_then(|s| s.parse().ok()).expect("status line");
    (status, response.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default())
}

/// The value of the sample of metric `name` whose labels include every one of `labels`.
fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|line| {
        let (series, value) = line.rsplit_once(' ')?;
        let (metric, rest) = series.split_once('{').map_or((series, ""), |(m, r)| (m, r));
        (metric == name && labels.iter().all(|(k, v)| rest.contains(&format!("{k}=\"{v}\""))))
            .then(|| value.parse().ok())
            .flatten()
    })
}

async fn count(client: &tokio_postgres::Client, table: &str) -> f64 {
    let row = client.query_one(&format!("SELECT count(*) FROM operations.{table}"), &[]).await.expect("count");
    row.get::<_, i64>(0) as f64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_pipeline_reports_its_metrics_and_spans() {
    let spans = SpanLog::default();
    let subscriber = tracing_subscriber::registry().with(tracing_subscriber::Layer::with_filter(
        spans.clone(),
        tracing_subscriber::filter::filter_fn(|meta| meta.target().starts_with("acme")),
    ));
    tracing::subscriber::set_global_default(subscriber).expect("the only subscriber of this test binary");
    let metrics = acme::http::prometheus().expect("recorder");
    assert!(acme::http::prometheus().is_ok(), "installing twice hands back the same recorder");

    let url = acme_testkit::acme_database("observability", Some((0.002, 23))).await.expect("source");
    let client = acme_testkit::connect(&url).await.expect("connect");
    let tables = ["customers", "products", "orders", "order_items"];
    let mut snapshot_rows = Vec::new();
    for table in tables {
        snapshot_rows.push(count(&client, table).await);
    }
    let dir = tempfile::tempdir().expect("tmp");
    let config = support::config(&url, dir.path());
    let pipeline = Pipeline::builder(config.clone()).fold_ratio(0.0).start().await.expect("start");

    // Known changes, each its own transaction and commit round: 3 order inserts, 2 order
    // updates, 1 item delete.
    for _ in 0..3 {
        client
            .execute(
                "INSERT INTO operations.orders (order_date, delivery_date, customer_id, status, created_at) \
                 SELECT current_date, current_date + 3, min(customer_id), 'PENDING', now() FROM operations.customers",
                &[],
            )
            .await
            .expect("insert");
        pipeline.caught_up().await.expect("caught up");
    }
    for _ in 0..2 {
        client
            .execute(
                "UPDATE operations.orders SET status = 'SHIPPED' \
                 WHERE order_id = (SELECT min(order_id) FROM operations.orders WHERE status <> 'SHIPPED')",
                &[],
            )
            .await
            .expect("update");
        pipeline.caught_up().await.expect("caught up");
    }
    client
        .execute(
            "DELETE FROM operations.order_items WHERE order_item_id = (SELECT min(order_item_id) FROM operations.order_items)",
            &[],
        )
        .await
        .expect("delete");
    pipeline.caught_up().await.expect("caught up");

    // A dropped replication connection: capture retries and reconnects, then goes on.
    let mut status = pipeline.status();
    let streaming = "SELECT count(*) FROM pg_replication_slots WHERE slot_name = $1 AND active_pid IS NOT NULL";
    while client.query_one(streaming, &[&config.slot]).await.expect("slot").get::<_, i64>(0) == 0 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let terminated = client
        .query_one(
            "SELECT count(pg_terminate_backend(active_pid)) FROM pg_replication_slots WHERE slot_name = $1",
            &[&config.slot],
        )
        .await
        .expect("terminate the walsender");
    assert_eq!(terminated.get::<_, i64>(0), 1, "the pipeline's walsender was running");
    tokio::time::timeout(Duration::from_secs(60), status.wait_for(|s| s.retries > 0))
        .await
        .expect("a retry within a minute")
        .expect("status");
    client
        .execute("INSERT INTO operations.customers (customer_name, created_at) VALUES ('After', now())", &[])
        .await
        .expect("insert after the reconnect");
    let warehouse = pipeline.caught_up().await.expect("caught up after the reconnect");
    warehouse.top_customers(3, StatusFilter::Open, None).await.expect("R4");
    // The layer gauges are set by the refresh loop; let it publish once more, and the lag
    // probe sample (twice a second).
    tokio::time::sleep(Duration::from_millis(1500)).await;

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let state = ServiceState::pipeline(&pipeline).metrics(metrics.clone());
    let server = tokio::spawn(async move { axum::serve(listener, router(state)).await });
    let (code, text) = tokio::task::spawn_blocking(move || get(addr, "/metrics")).await.expect("scrape");
    server.abort();
    assert_eq!(code, 200, "{text}");

    // Exact change counts per table and operation.
    for (table, rows) in tables.iter().zip(&snapshot_rows) {
        let table = format!("operations.{table}");
        let labels = [("table", table.as_str()), ("op", "snapshot")];
        assert_eq!(sample(&text, "acme_changes_captured_total", &labels), Some(*rows), "{table} snapshot rows");
    }
    for (table, op, n) in [("orders", "insert", 3.0), ("orders", "update", 2.0), ("order_items", "delete", 1.0)] {
        let table = format!("operations.{table}");
        let labels = [("table", table.as_str()), ("op", op)];
        assert_eq!(sample(&text, "acme_changes_captured_total", &labels), Some(n), "{table} {op}");
    }
    let labels = [("table", "operations.customers"), ("op", "insert")];
    assert_eq!(sample(&text, "acme_changes_captured_total", &labels), Some(1.0), "the insert after the reconnect");
    assert!(sample(&text, "acme_changes_captured_total", &[("op", "truncate")]).is_none(), "no truncate happened");

    let at_least = |name: &str, labels: &[(&str, &str)], low: f64| {
        let value = sample(&text, name, labels);
        assert!(value.is_some_and(|v| v >= low), "{name}{labels:?} = {value:?}, expected at least {low}");
    };
    at_least("acme_commit_rounds_total", &[], 7.0);
    at_least("acme_commit_round_seconds_count", &[], 7.0);
    at_least("acme_model_steps_total", &[("step", "build")], 1.0);
    at_least("acme_model_steps_total", &[("step", "refresh")], 1.0);
    at_least("acme_model_step_seconds_count", &[("step", "refresh")], 1.0);
    at_least("acme_model_step_seconds_bucket", &[("step", "build"), ("le", "+Inf")], 1.0);
    at_least("acme_retries_total", &[("task", "capture")], 1.0);
    at_least("acme_reconnects_total", &[], 1.0);
    at_least("acme_errors_total", &[("task", "capture"), ("severity", "transient")], 1.0);
    for layer in ["raw", "model"] {
        at_least("acme_lag_bytes", &[("layer", layer)], 0.0);
        at_least("acme_lag_seconds", &[("layer", layer)], 0.0);
    }
    for layer in ["raw", "intermediate", "presentation"] {
        at_least("acme_layer_files", &[("layer", layer)], 1.0);
        at_least("acme_layer_bytes", &[("layer", layer)], 1.0);
    }
    assert!(text.contains("# HELP acme_changes_captured_total"), "metrics are described");
    pipeline.shutdown().await.expect("shutdown");

    // A compaction of the small files the commit rounds left in the raw orders table (the
    // stream merges them every 10 rounds; any two do here). When the stream's own merges left
    // one file, they are what is counted: read before this compaction adds to the count.
    let stream_merges = sample(&metrics.render(), "acme_compactions_total", &[("layer", "raw")]).unwrap_or(0.0);
    let storage = acme::core::Storage::new(&config.storage_url, config.storage_options.clone()).expect("storage");
    let mut orders = storage.open(acme::core::Layer::Raw, "orders").await.expect("open").expect("raw orders");
    let options = acme::core::CompactOptions {
        min_files: 2,
        ..acme::core::CompactOptions::sorted_by(&[acme::core::raw::LSN, acme::core::raw::SEQ])
    };
    let compacted = orders.compact(&storage.session_context(), &options).await.expect("compact");
    assert!(
        compacted.files_removed > 0 || stream_merges >= 1.0,
        "the commit rounds left small files, or the stream merged them: {compacted:?}"
    );
    at_least_in(&metrics.render(), "acme_compactions_total", &[("layer", "raw")], 1.0);

    // The spans, with the table and position fields.
    let snapshot = spans.named("snapshot");
    assert!(snapshot.iter().any(|f| f.get("lsn").is_some_and(|l| l.contains('/'))), "snapshot spans: {snapshot:?}");
    let copies = spans.named("snapshot_copy");
    for table in tables {
        let table = format!("operations.{table}");
        assert!(copies.iter().any(|f| f.get("table") == Some(&table)), "a copy span of {table}");
    }
    let polls = spans.named("poll");
    assert!(polls.iter().any(|f| f.contains_key("confirmed") && f.contains_key("from")), "poll spans");
    let rounds = spans.named("commit_round");
    assert!(rounds.len() >= 7 && rounds.iter().all(|f| f.get("lsn").is_some_and(|l| l.contains('/'))), "{rounds:?}");
    let steps = spans.named("model_step");
    assert!(steps.iter().any(|f| f.get("position").is_some_and(|p| p.parse::<i64>().is_ok())), "build steps");
    assert!(steps.iter().any(|f| f.get("step").map(String::as_str) == Some("refresh")), "refresh steps");
    let compactions = spans.named("compaction");
    assert!(compactions.iter().any(|f| f.get("table").is_some_and(|t| t.starts_with("raw/"))), "{compactions:?}");
    let queries = spans.named("query");
    assert!(queries.iter().any(|f| f.get("report").map(String::as_str) == Some("top_customers")), "{queries:?}");
}

fn at_least_in(text: &str, name: &str, labels: &[(&str, &str)], low: f64) {
    let value = sample(text, name, labels);
    assert!(value.is_some_and(|v| v >= low), "{name}{labels:?} = {value:?}, expected at least {low}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_writes_json_logs_with_their_spans_when_asked() {
    let url = acme_testkit::acme_database("json_logs", Some((0.001, 29))).await.expect("source");
    let dir = tempfile::tempdir().expect("tmp");
    let warehouse = dir.path().join("w").display().to_string();
    let slot = acme_testkit::slot_for(&url);
    let output = std::process::Command::new(support::sync_binary())
        .args(["--source", &url, "--warehouse", &warehouse, "--slot", &slot, "--once", "--log-format", "json"])
        .env_remove("RUST_LOG")
        .output()
        .expect("sync --once");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    let lines: Vec<serde_json::Value> = stderr
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("not a JSON line ({e}): {line}")))
        .collect();
    assert!(!lines.is_empty(), "sync logged nothing at the default level");
    for line in &lines {
        assert!(line["timestamp"].is_string() && line["level"].is_string(), "{line}");
    }
    // Events inside the snapshot carry its span, with the LSN once it is known.
    let committed = lines
        .iter()
        .find(|l| l["fields"]["message"] == "snapshot table committed")
        .unwrap_or_else(|| panic!("no snapshot event: {stderr}"));
    assert_eq!(committed["span"]["name"], "snapshot", "{committed}");
    assert!(committed["span"]["lsn"].as_str().is_some_and(|l| l.contains('/')), "{committed}");
    // A bad value of the flag is a usage error.
    let bad = std::process::Command::new(support::sync_binary())
        .args(["--source", &url, "--warehouse", &warehouse, "--log-format", "xml"])
        .output()
        .expect("sync");
    assert_eq!(bad.status.code(), Some(2), "{}", String::from_utf8_lossy(&bad.stderr));
}
