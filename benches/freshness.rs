//! Report freshness under the live workload, through `acme::Pipeline`.
//!
//! A source at `ACME_BENCH_SF` (default 0.1) is generated, then one `Pipeline` (snapshot, first
//! model, then capture, model maintenance and warehouse refresh side by side) follows it while
//! the live workload writes at `ACME_BENCH_TPS` (default 1,000) transactions per second for
//! `ACME_BENCH_SECONDS` (default 30), checking every `ACME_BENCH_MODEL_INTERVAL_MS` whether a model
//! build is due, folding the tail in at `ACME_BENCH_FOLD_RATIO` of the model and holding at most
//! `ACME_BENCH_TAIL_LIMIT` tail changes in memory (defaults acme's). Meanwhile a probe commits stamped transactions that touch
//! all four tables (a new customer, a new product, pending orders of that customer with a
//! delivery date no other order has, more of them than any customer has, see `stamp_orders`,
//! and an item of that product in each) and measures, from each commit, until R1, R3 and R4
//! (its top 3, where the stamp's customer ranks first) all show it:
//! - through `Pipeline::warehouse()` (odd stamps), and
//! - through the HTTP service (`acme::http`, `ServiceState::live`) on loopback (even stamps);
//! - in the same run, the raw layer's freshness (the stamp's order visible in `raw_orders`
//!   of the newest handle) as the baseline, and the workload's own rate alone beforehand.
//!
//! Before any figure is written, the reports of the caught-up warehouse are checked equal to
//! the source's answers (R1, R2, R3, R4).
//!
//! The bench process's peak RSS is given twice: up to the first caught-up handle (the source's
//! load, the snapshot, the first model build), and under the live workload after it.
//! `ACME_BENCH_MEMORY_LIMIT_MB` sets the model build's memory pool (`memory_limit_bytes`), and
//! `ACME_BENCH_FLUSH_MS` the capture's micro-batch interval (`flush_interval`).
//!
//! Run: `cargo bench --bench freshness`. Writes `bench-data/freshness-sf<SF>.md`.

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use acme::Pipeline;
use acme::core::AcmeConfig;
use acme::http::{ServiceState, router};
use acme::query::sql::{open_orders_sql, pending_items_sql, top_customers_sql, top_delivery_dates_sql};
use acme::query::{StatusFilter, Warehouse};
use acme_testkit::{PgCluster, ScaleFactor, WorkloadConfig};

mod common;

fn env<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn workload(seed: u64, tps: f64, seconds: u64) -> WorkloadConfig {
    WorkloadConfig {
        seed,
        rate_tps: tps,
        transactions: None,
        duration: Some(Duration::from_secs(seconds)),
        connections: 4,
        deletes: true,
        inserts_only: false,
    }
}

/// How many pending orders each stamp's customer places: more than any customer has when the
/// run starts, with a margin, so that the stamp's customer ranks first in R4 and shows in its top
/// 3, as a user asks for it, rather than in a list of every customer with a pending order. Each
/// stamp completes the previous stamp's orders, so the stamps stay this size and typical of the
/// source's transactions: before, each stamp placed 10 more orders than the one before it, and
/// by the end of a run the stamps were most of the changes the pipeline followed.
async fn stamp_orders(client: &tokio_postgres::Client) -> i64 {
    let row = client
        .query_one(
            "SELECT coalesce(max(n), 0) FROM (SELECT count(*) AS n FROM operations.orders WHERE status = 'PENDING' \
             GROUP BY customer_id) t",
            &[],
        )
        .await
        .expect("pending orders per customer");
    row.get::<_, i64>(0) + 20
}

/// A stamp: (customer id, product id, delivery date).
type Stamp = (i64, i64, String);

/// Commit stamp `n` of `orders` orders, which also completes the orders of the stamp before it
/// (`previous`, by order id); returns the stamp, its order ids, the rows it changed and the commit
/// instant.
async fn stamp(
    client: &tokio_postgres::Client,
    n: u64,
    orders: i64,
    previous: &[i64],
) -> (Stamp, Vec<i64>, u64, Instant) {
    let delivery = format!("DATE '2300-01-01' + {n}");
    let row = client
        .query_one(
            &format!(
                "WITH c AS (INSERT INTO operations.customers (customer_name, created_at) VALUES ('Stamp', now()) \
                   RETURNING customer_id), \
                 p AS (INSERT INTO operations.products (product_name, barcode, unity_price, is_active) \
                   VALUES ('stamp', 's', 1.00, true) RETURNING product_id), \
                 o AS (INSERT INTO operations.orders (order_date, delivery_date, customer_id, status, created_at) \
                   SELECT current_date, {delivery}, customer_id, 'PENDING', now() FROM c, generate_series(1, {orders}) \
                   RETURNING order_id), \
                 i AS (INSERT INTO operations.order_items (order_id, product_id, quanity, created_at) \
                   SELECT order_id, product_id, 9, now() FROM o, p RETURNING product_id), \
                 done AS (UPDATE operations.orders SET status = 'COMPLETED', updated_at = now() \
                   WHERE order_id = ANY($1) AND status IS DISTINCT FROM 'COMPLETED' RETURNING order_id) \
                 SELECT (SELECT customer_id FROM c), (SELECT DISTINCT product_id FROM i), CAST({delivery} AS text), \
                   (SELECT array_agg(order_id) FROM o), (SELECT count(*) FROM done)"
            ),
            &[&previous],
        )
        .await
        .expect("stamp");
    let completed: i64 = row.get(4);
    ((row.get(0), row.get(1), row.get(2)), row.get(3), 2 + 2 * orders as u64 + completed as u64, Instant::now())
}

/// Whether R1, R3 and R4 of `w` show the stamp.
async fn shown(w: &Warehouse, (customer, product, date): &Stamp) -> bool {
    let r1 = w.open_orders(StatusFilter::Open, None).await.expect("R1");
    if !r1.iter().any(|r| r.delivery_date.is_some_and(|d| &d.to_string() == date)) {
        return false;
    }
    let r3 = w.pending_items_by_product(None).await.expect("R3");
    let r4 = w.top_customers(3, StatusFilter::Pending, None).await.expect("R4");
    r3.iter().any(|r| r.product_id == Some(*product)) && r4.iter().any(|r| r.customer_id == Some(*customer))
}

/// What each report and table holds of a stamp that was not shown.
async fn diagnose(w: &Warehouse, (customer, product, date): &Stamp) -> String {
    let r1 = w.open_orders(StatusFilter::Open, None).await.expect("R1");
    let r3 = w.pending_items_by_product(None).await.expect("R3");
    let r4 = w.top_customers(3, StatusFilter::Pending, None).await.expect("R4");
    let mut out = format!(
        "raw position {:?}, model position {:?}; in R1 {}, R3 {}, R4 {}",
        w.raw_position(),
        w.model_position(),
        r1.iter().any(|r| r.delivery_date.is_some_and(|d| &d.to_string() == date)),
        r3.iter().any(|r| r.product_id == Some(*product)),
        r4.iter().any(|r| r.customer_id == Some(*customer)),
    );
    // R4 as the handle ranks it, by its SQL, and the top of the counts it ranks.
    let ranked: Vec<String> = r4.iter().map(|r| format!("{:?} {} {}", r.customer_id, r.quantity, r.ranking)).collect();
    out.push_str(&format!("\nR4 (top 3, pending): {ranked:?}"));
    let report = acme::query::Report::TopCustomers { limit: 3, filter: StatusFilter::Pending };
    if let Ok(sql) = w.report_sql(&report, None) {
        let batches = w.sql(&sql).await.expect("R4 by SQL").collect().await.expect("R4 rows");
        let text = acme::core::arrow::util::pretty::pretty_format_batches(&batches).expect("format");
        out.push_str(&format!("\nR4 by its SQL:\n{text}"));
    }
    for sql in [
        "SELECT customer_id, sum(orders) AS n FROM customer_orders_current WHERE status = 'PENDING' \
         GROUP BY customer_id ORDER BY n DESC, customer_id LIMIT 8"
            .to_string(),
        format!("SELECT * FROM customer_orders_current WHERE customer_id = {customer}"),
        format!("SELECT * FROM raw_orders WHERE customer_id = {customer}"),
        format!("SELECT * FROM orders_history WHERE customer_id = {customer}"),
        format!("SELECT * FROM fact_orders WHERE customer_id = {customer}"),
        format!("SELECT * FROM fact_order_items WHERE product_id = {product}"),
        format!("SELECT * FROM agg_orders_by_delivery_date WHERE delivery_date = CAST('{date}' AS DATE)"),
    ] {
        let batches = w.sql(&sql).await.expect("diagnosis").collect().await.expect("diagnosis rows");
        let text = acme::core::arrow::util::pretty::pretty_format_batches(&batches).expect("format");
        out.push_str(&format!("\n{sql}:\n{text}"));
    }
    out
}

/// A plain HTTP/1.1 GET; the body of a 200 response, `None` for another status.
fn get(addr: std::net::SocketAddr, path: &str) -> Option<String> {
    let mut stream = std::net::TcpStream::connect(addr).expect("connect");
    write!(stream, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").expect("send");
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("read");
    let body = response.find("\r\n\r\n")? + 4;
    if !response.starts_with("HTTP/1.1 200") {
        return None;
    }
    // The head dropped in place: the body is not copied.
    response.drain(..body);
    Some(response)
}

/// Whether a report's JSON body (an array of objects, as the service writes it: compact,
/// without spaces) has a row whose `field` is `value` (a JSON literal). The body is searched as
/// text rather than parsed into a document: a parsed report (tens of thousands of rows at SF10)
/// would grow this process's memory, which the bench reports as the pipeline's.
fn has(body: Option<String>, field: &str, value: &str) -> bool {
    let Some(body) = body else { return false };
    let member = format!("\"{field}\":{value}");
    body.starts_with('[')
        && body
            .match_indices(&member)
            .any(|(at, _)| matches!(body.as_bytes().get(at + member.len()), Some(b',' | b'}')))
}

/// Whether the service's R1, R3 and R4 show the stamp.
fn shown_http(addr: std::net::SocketAddr, (customer, product, date): &Stamp) -> bool {
    has(get(addr, "/analytics/orders?status=open"), "delivery_date", &format!("\"{date}\""))
        && has(get(addr, "/analytics/orders/product"), "product_id", &product.to_string())
        && has(get(addr, "/analytics/orders/customers?status=pending&limit=3"), "customer_id", &customer.to_string())
}

/// The reports as text rows, from the source (`warehouse` None) or from acme.
async fn reports(client: &tokio_postgres::Client, warehouse: Option<&Warehouse>) -> Vec<Vec<String>> {
    let o = "operations.orders";
    let sqls = [
        open_orders_sql(o, &StatusFilter::Open),
        top_delivery_dates_sql(o, 3),
        pending_items_sql(o, "operations.order_items"),
        top_customers_sql(o, "operations.customers", &StatusFilter::Pending, 3),
    ];
    let mut out = Vec::new();
    match warehouse {
        None => {
            for sql in sqls {
                let rows = client.query(&format!("SELECT CAST(q.* AS text) FROM ({sql}) q"), &[]).await.expect("q");
                out.push(rows.iter().map(|r| r.get::<_, String>(0)).collect());
            }
        }
        Some(w) => {
            let quote = |s: &Option<String>| match s {
                Some(s) if s.contains(' ') => format!("\"{s}\""),
                Some(s) => s.clone(),
                None => String::new(),
            };
            let date = |d: Option<chrono::NaiveDate>| d.map(|d| d.to_string()).unwrap_or_default();
            let r1 = w.open_orders(StatusFilter::Open, None).await.expect("R1");
            out.push(
                r1.iter().map(|r| format!("({},{},{})", date(r.delivery_date), quote(&r.status), r.quantity)).collect(),
            );
            let r2 = w.top_delivery_dates(3, None).await.expect("R2");
            out.push(r2.iter().map(|r| format!("({},{})", date(r.delivery_date), r.quantity)).collect());
            let r3 = w.pending_items_by_product(None).await.expect("R3");
            out.push(
                r3.iter()
                    .map(|r| format!("({},{})", r.product_id.map(|p| p.to_string()).unwrap_or_default(), r.total_items))
                    .collect(),
            );
            let r4 = w.top_customers(3, StatusFilter::Pending, None).await.expect("R4");
            out.push(
                r4.iter()
                    .map(|r| {
                        let id = r.customer_id.map(|c| c.to_string()).unwrap_or_default();
                        format!("({id},{},{},{})", quote(&r.customer_name), r.quantity, r.ranking)
                    })
                    .collect(),
            );
        }
    }
    out
}

fn percentiles(mut v: Vec<Duration>) -> String {
    if v.is_empty() {
        return "| - | - | - | - | 0 |".into();
    }
    v.sort();
    let at = |q: f64| v[((v.len() as f64 * q).ceil() as usize).clamp(1, v.len()) - 1].as_millis();
    format!("| {} ms | {} ms | {} ms | {} ms | {} |", at(0.5), at(0.95), at(0.99), at(1.0), v.len())
}

/// The median and 90th percentile of a probe's query times, and how many.
fn spread(mut v: Vec<Duration>) -> String {
    if v.is_empty() {
        return "not run".into();
    }
    v.sort();
    let at = |q| common::percentile(&v, q).as_millis();
    format!("median {} ms, 90th percentile {} ms ({} looks)", at(0.5), at(0.9), v.len())
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    // `RUST_LOG=acme=debug,acme_ingest=debug,acme_query=debug` shows each commit round and refresh.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        .try_init();
    let sf = common::scale();
    let tps: f64 = env("ACME_BENCH_TPS", 1000.0);
    let seconds: u64 = env("ACME_BENCH_SECONDS", 30);
    let cluster = PgCluster::start().expect("PostgreSQL");
    let url = cluster.create_database("bench_freshness").await.expect("database");
    let client = acme_testkit::connect(&url).await.expect("connect");
    acme_testkit::create_source_schema(&client).await.expect("schema");
    let load = acme_testkit::bulk_load(&url, ScaleFactor::new(sf).expect("sf"), common::SEED).await.expect("load");
    eprintln!("SF{sf} loaded in {:.1?}", load.elapsed);

    // Baseline: the workload alone (no capture).
    let alone = acme_testkit::run_workload(&url, &workload(7, tps, 5)).await.expect("workload alone");
    let alone_tps = alone.transactions as f64 / alone.elapsed.as_secs_f64();

    let dir = tempfile::tempdir_in(common::root()).or_else(|_| tempfile::tempdir()).expect("tmp");
    let mut config =
        AcmeConfig::builder().source_url(&url).storage_url(dir.path().display().to_string()).build().expect("config");
    // The model build's memory pool (`memory_limit_bytes`, acme's default unless set).
    if let Some(mib) = std::env::var("ACME_BENCH_MEMORY_LIMIT_MB").ok().and_then(|v| v.parse::<u64>().ok()) {
        config.memory_limit_bytes = mib << 20;
    }
    let memory_limit_mib = config.memory_limit_bytes >> 20;
    // The capture's micro-batch interval (`flush_interval`, acme's default unless set).
    if let Some(ms) = std::env::var("ACME_BENCH_FLUSH_MS").ok().and_then(|v| v.parse::<u64>().ok()) {
        config.flush_interval = Duration::from_millis(ms);
    }
    let flush_ms = config.flush_interval.as_millis();
    let started = Instant::now();
    let interval =
        Duration::from_millis(env("ACME_BENCH_MODEL_INTERVAL_MS", acme::DEFAULT_MODEL_INTERVAL.as_millis() as u64));
    let fold_ratio = env("ACME_BENCH_FOLD_RATIO", acme::DEFAULT_FOLD_RATIO);
    let tail_limit = env("ACME_BENCH_TAIL_LIMIT", acme::query::MAX_MATERIALIZED_TAIL);
    let pipeline = Pipeline::builder(config)
        .model_interval(interval)
        .fold_ratio(fold_ratio)
        .tail_limit(tail_limit)
        .start()
        .await
        .expect("pipeline");
    let startup = started.elapsed();
    // The answers, checked before anything is timed (and again at the end).
    let w = pipeline.caught_up().await.expect("caught up");
    assert_eq!(reports(&client, Some(&w)).await, reports(&client, None).await, "acme's reports equal the source's");
    drop(w);
    // The peak so far (the source's load, the snapshot and the first model build), then the
    // peak of the live part alone: the workload, capture, maintenance and the readers.
    let startup_peak = common::peak_rss_mib();
    let live_peak_measured = common::reset_peak_rss();
    let sampler = common::RssSampler::start(Duration::from_millis(250));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let state = ServiceState::live(pipeline.warehouses());
    let server = tokio::spawn(async move { axum::serve(listener, router(state)).await });

    let orders_per_stamp = stamp_orders(&client).await;
    let mut previous_orders: Vec<i64> = Vec::new();
    let mut stamp_changes = 0u64;
    let writer = {
        let url = url.clone();
        tokio::spawn(async move { acme_testkit::run_workload(&url, &workload(11, tps, seconds)).await })
    };
    let (mut library, mut http, mut raw) = (Vec::new(), Vec::new(), Vec::new());
    // The same stamps as measured before the probe timed each query on its own: until the end of
    // the look, the raw-layer baseline's query included.
    let (mut library_whole, mut http_whole) = (Vec::new(), Vec::new());
    // What each look cost the probe: the raw-layer query, and the reports (R1, then R3 and R4).
    let (mut raw_query, mut report_looks) = (Vec::new(), Vec::new());
    let mut n = 0u64;
    let deadline = Duration::from_secs(120);
    while !writer.is_finished() {
        n += 1;
        let (stamp, placed, changed, committed) = stamp(&client, n, orders_per_stamp, &previous_orders).await;
        previous_orders = placed;
        stamp_changes += changed;
        let mut raw_seen = None;
        let mut looked_at = None;
        loop {
            let w = pipeline.warehouse();
            // Look only at a handle the pipeline has not published before: the looks run the
            // reports, and looking again at the same state would take CPU from the pipeline
            // and the workload for nothing.
            if looked_at == Some(w.raw_position()) {
                if committed.elapsed() >= deadline {
                    panic!("stamp {n} not shown after {deadline:?}: {}", diagnose(&w, &stamp).await);
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
            looked_at = Some(w.raw_position());
            // Each path's figure is the time this handle was taken plus that path's own
            // queries: the reports a user asks of this handle do not wait for the baseline's
            // query, which the probe runs first.
            let taken = committed.elapsed();
            if raw_seen.is_none() {
                // Only the files after the stored model's position (pruned by their LSN range).
                let sql = format!(
                    "SELECT count(*) FROM raw_orders WHERE _lsn > {} AND delivery_date = CAST('{}' AS DATE)",
                    w.model_position().map(|p| p.as_stored()).unwrap_or_default(),
                    stamp.2
                );
                let started = Instant::now();
                let batches = w.sql(&sql).await.expect("raw").collect().await.expect("raw rows");
                let count = batches[0]
                    .column(0)
                    .as_any()
                    .downcast_ref::<acme::query::datafusion::arrow::array::Int64Array>()
                    .map(|a| a.value(0));
                raw_query.push(started.elapsed());
                if count.unwrap_or(0) > 0 {
                    raw_seen = Some(taken + started.elapsed());
                }
            }
            let started = Instant::now();
            let seen = if n % 2 == 1 {
                shown(&w, &stamp).await
            } else {
                let stamp = stamp.clone();
                tokio::task::spawn_blocking(move || shown_http(addr, &stamp)).await.expect("HTTP look")
            };
            report_looks.push(started.elapsed());
            if seen {
                let elapsed = taken + started.elapsed();
                raw.push(raw_seen.unwrap_or(elapsed));
                if n % 2 == 1 {
                    library.push(elapsed);
                    library_whole.push(committed.elapsed());
                } else {
                    http.push(elapsed);
                    http_whole.push(committed.elapsed());
                }
                break;
            }
            if committed.elapsed() >= deadline {
                panic!("stamp {n} not shown after {deadline:?}: {}", diagnose(&w, &stamp).await);
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let written = writer.await.expect("writer").expect("workload");
    let reached_tps = written.transactions as f64 / written.elapsed.as_secs_f64();
    let status = pipeline.status().borrow().clone();

    // The answers, checked before any figure is written.
    let w = pipeline.caught_up().await.expect("caught up");
    assert_eq!(reports(&client, Some(&w)).await, reports(&client, None).await, "acme's reports equal the source's");
    drop(w);
    let rss = sampler.stop();
    pipeline.shutdown().await.expect("shutdown");
    server.abort();

    let summary = format!(
        "## Report freshness, SF{sf} ({} source rows), `Pipeline` under the live workload\n\n\
         Pipeline start (snapshot and first model): {:.1?}. Workload target {tps} tx/s over 4 connections: \
         {reached_tps:.0} tx/s reached beside acme ({} transactions in {:.1?}); the same workload alone \
         (5 s, no capture): {alone_tps:.0} tx/s. The workload changed {} rows; the probe's {n} stamps \
         ({orders_per_stamp} orders each) {stamp_changes}.\n\n\
         From the commit of a transaction touching all four tables until R1, R3 and R4 all show it (probe \
         pause 100 ms between stamps; a look runs the reports on each new handle the pipeline publishes, R3 and R4 \
         only once R1 shows the stamp):\n\n\
         | path | p50 | p95 | p99 | max | stamps |\n|---|---|---|---|---|---|\n\
         | `Pipeline::warehouse()` {}\n| HTTP service {}\n| baseline: the raw layer (`raw_orders`) {}\n\
         | `Pipeline::warehouse()`, until the end of the look (the baseline's query included) {}\n\
         | HTTP service, until the end of the look {}\n\n\
         A path's figure is the instant the look took the handle plus that path's own queries (the probe runs \
         the raw layer's query first, then the reports). What a look cost the probe: the raw layer's query \
         {}; the reports {}.\n\n\
         Model maintenance beside the stream (checked every {interval:?}; a build folds the tail in once it \
         reaches {fold_ratio} of the model's rows or half the {tail_limit} changes a handle holds in memory): {} builds, the last {:.1?}; tail at the end {} changes; \
         {} raw compactions; \
         lag at the end {:?} bytes / {:.2?} s; {} retries.\n\
         Peak RSS of the bench process (pipeline, HTTP service, workload driver and probe): {:.0} MiB up to the \
         first caught-up handle (the source's load, the snapshot and the first model build); {} under the live \
         workload after it (RSS sampled every 250 ms: {:.0} MiB as the workload started, median {:.0} MiB, 90th \
         percentile {:.0} MiB, {:.0} MiB at most, {:.0} MiB at the end). Model build memory pool: {memory_limit_mib} MiB; capture micro-batches every {flush_ms} ms.\n\
         Answers checked: R1, R2, R3 and R4 of the caught-up warehouse equal PostgreSQL's, before the \
         workload and after it.\n",
        load.customers + load.products + load.orders + load.order_items,
        startup,
        written.transactions,
        written.elapsed,
        written.total_changes(),
        percentiles(library),
        percentiles(http),
        percentiles(raw),
        percentiles(library_whole),
        percentiles(http_whole),
        spread(raw_query),
        spread(report_looks),
        status.model_builds,
        status.last_model_build.unwrap_or_default(),
        status.tail_changes,
        status.raw_compactions,
        status.lag_bytes,
        status.lag_seconds.unwrap_or_default(),
        status.retries,
        startup_peak,
        match live_peak_measured {
            true => format!("{:.0} MiB", common::peak_rss_mib()),
            false => "not measured (the kernel did not reset the peak)".to_string(),
        },
        rss.first,
        rss.p50,
        rss.p90,
        rss.max,
        rss.last,
    );
    println!("{summary}");
    std::fs::create_dir_all(common::root()).expect("bench-data");
    std::fs::write(common::root().join(format!("freshness-sf{sf}.md")), summary).expect("summary");
}
