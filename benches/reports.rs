//! R1-R4, current and as of an earlier instant, against DuckDB and PostgreSQL over the same
//! data in the same run, every answer checked equal before anything is timed.
//!
//! The dataset (see `common`) is built once per scale factor and cached under `bench-data/`,
//! with plain Parquet exports of the current state and of every version (row groups of
//! 122,880 rows, DuckDB's own, so DuckDB scans with all its threads). First the answers: acme's
//! R1-R4 now and as of the dataset's instant must equal DuckDB's over the exports (now: the
//! current state; as of: the versions in force at the instant) and PostgreSQL's now over the
//! same rows, row order included; any difference stops the benchmark. Then criterion measures
//! acme's reports, and one comparison runs each report in acme, DuckDB 2.0 (from the test
//! kit's virtual environment) and PostgreSQL with the same method (median of 15 runs after
//! two warm-ups) and prints the ratios:
//! - `DuckDB plain`: the reports' SQL over the current-state Parquet;
//! - `DuckDB pre-aggregated`: the same precomputation acme keeps, done once by DuckDB
//!   beforehand (acme reads R1/R2 from its aggregate of orders per delivery date and status, and
//!   R3/R4 now from counts it keeps per product and per customer and status while a handle
//!   holds a raw tail, over the fact tables otherwise; the summary says which): orders per
//!   (delivery date, status), item totals of open orders per product, and orders per
//!   (customer, status); its one-off cost is printed beside acme's (opening the warehouse and
//!   the first R3 and R4, which count once);
//! - `DuckDB as of`: the reports' SQL over the versions in force at the instant.
//!
//! `ACME_BENCH_SF` sets the scale factor (default 0.1; the issue figures use 1).
//! Run: `cargo bench --bench reports`.

mod common;

use common::LIMIT;

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use acme::query::sql::{
    open_orders_from_aggregate_sql, open_orders_sql, pending_items_sql, top_customers_sql,
    top_delivery_dates_from_aggregate_sql, top_delivery_dates_sql,
};
use acme::query::{StatusFilter, Warehouse};
use chrono::{DateTime, SecondsFormat, Utc};
use criterion::{Criterion, criterion_group, criterion_main};

/// Run report `n` (1-4) in acme through its typed API (what is timed).
async fn report(w: &Warehouse, n: usize, as_of: Option<DateTime<Utc>>) -> usize {
    match n {
        1 => w.open_orders(StatusFilter::Open, as_of).await.expect("R1").len(),
        2 => w.top_delivery_dates(LIMIT, as_of).await.expect("R2").len(),
        3 => w.pending_items_by_product(as_of).await.expect("R3").len(),
        _ => w.top_customers(LIMIT, StatusFilter::Pending, as_of).await.expect("R4").len(),
    }
}

/// Report `n`'s rows in acme, rendered for the equality check.
async fn acme_rows(w: &Warehouse, n: usize, as_of: Option<DateTime<Utc>>) -> Vec<String> {
    let batches = w.report_batches(&common::acme_report(n), as_of).await.expect("report");
    acme_testkit::oracle::render_batches(&batches).expect("render")
}

/// The four questions in SQL over plain relations `orders`, `order_items` and `customers`.
fn plain_sql() -> Vec<(String, String)> {
    vec![
        ("R1".into(), open_orders_sql("orders", &StatusFilter::Open)),
        ("R2".into(), top_delivery_dates_sql("orders", LIMIT)),
        ("R3".into(), pending_items_sql("orders", "order_items")),
        ("R4".into(), top_customers_sql("orders", "customers", &StatusFilter::Pending, LIMIT)),
    ]
}

/// The precomputation acme keeps, as DuckDB statements over `orders` and `order_items`, and
/// the four questions over it.
fn preaggregated_sql() -> (Vec<String>, Vec<(String, String)>) {
    let setup = vec![
        "CREATE TABLE agg_orders AS SELECT delivery_date, status, count(*) AS orders FROM orders \
         GROUP BY delivery_date, status"
            .to_string(),
        "CREATE TABLE agg_items AS SELECT i.product_id, CAST(sum(i.quanity) AS BIGINT) AS total_items \
         FROM order_items i JOIN orders o ON o.order_id = i.order_id WHERE o.status <> 'COMPLETED' \
         GROUP BY i.product_id"
            .to_string(),
        "CREATE TABLE agg_customers AS SELECT customer_id, status, count(*) AS orders FROM orders \
         GROUP BY customer_id, status"
            .to_string(),
    ];
    let queries = vec![
        ("R1".into(), open_orders_from_aggregate_sql("agg_orders", &StatusFilter::Open)),
        ("R2".into(), top_delivery_dates_from_aggregate_sql("agg_orders", LIMIT)),
        (
            "R3".into(),
            "SELECT product_id, total_items FROM agg_items ORDER BY total_items DESC, product_id ASC NULLS LAST".into(),
        ),
        (
            "R4".into(),
            format!(
                "WITH counts AS (SELECT customer_id, CAST(sum(orders) AS BIGINT) AS quantity FROM agg_customers \
                   WHERE status = 'PENDING' GROUP BY customer_id), \
                 ranked AS (SELECT customer_id, quantity, \
                   CAST(dense_rank() OVER (ORDER BY quantity DESC) AS BIGINT) AS ranking FROM counts) \
                 SELECT r.customer_id, c.customer_name, r.quantity, r.ranking FROM ranked r \
                 LEFT JOIN customers c ON c.customer_id = r.customer_id \
                 WHERE r.ranking <= {LIMIT} ORDER BY r.ranking, r.customer_id NULLS LAST"
            ),
        ),
    ];
    (setup, queries)
}

/// DuckDB views `orders`, `order_items` and `customers`: the current state, or the versions in
/// force at `as_of`.
fn duckdb_views(data: &common::Dataset, as_of: Option<DateTime<Utc>>) -> Vec<(String, String)> {
    ["orders", "order_items", "customers"]
        .into_iter()
        .map(|table| {
            let columns = common::export_columns(table);
            let sql = match as_of {
                None => format!("SELECT {columns} FROM read_parquet('{}')", data.current(table).display()),
                Some(t) => {
                    let t = t.to_rfc3339_opts(SecondsFormat::Micros, true);
                    format!(
                        "SELECT {columns} FROM read_parquet('{}') WHERE valid_from <= TIMESTAMPTZ '{t}' \
                         AND (valid_to IS NULL OR valid_to > TIMESTAMPTZ '{t}') AND NOT is_deleted",
                        data.history(table).display()
                    )
                }
            };
            (table.to_string(), sql)
        })
        .collect()
}

/// What one run of `duckdb_reports.py` gave.
struct DuckRun {
    version: String,
    threads: String,
    setup_ms: f64,
    medians: Vec<f64>,
    rows: Vec<Vec<String>>,
}

fn duckdb(
    views: Vec<(String, String)>,
    setup: Vec<String>,
    queries: &[(String, String)],
    runs: usize,
) -> Result<DuckRun, String> {
    let python = acme_testkit::outside::python().map_err(|e| e.to_string())?;
    let spec = serde_json::json!({
        "runs": runs,
        "views": views.into_iter().map(|(n, q)| (n, serde_json::Value::String(q))).collect::<serde_json::Map<_, _>>(),
        "setup": setup,
        "queries": queries.iter().map(|(n, q)| (n.clone(), serde_json::Value::String(q.clone()))).collect::<serde_json::Map<_, _>>(),
    });
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/benches/duckdb_reports.py");
    let mut child = Command::new(python)
        .arg(script)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| e.to_string())?;
    child.stdin.take().expect("stdin").write_all(spec.to_string().as_bytes()).map_err(|e| e.to_string())?;
    let out = child.wait_with_output().map_err(|e| e.to_string())?;
    if !out.status.success() {
        return Err(format!("the DuckDB script failed: {}", out.status));
    }
    let value: serde_json::Value = serde_json::from_slice(&out.stdout).map_err(|e| e.to_string())?;
    let medians = queries.iter().map(|(n, _)| value["median_ms"][n].as_f64().unwrap_or(f64::NAN)).collect();
    let rows = queries
        .iter()
        .map(|(n, _)| {
            value["rows"][n]
                .as_array()
                .map_or_else(Vec::new, |rows| rows.iter().map(|r| r.as_str().unwrap_or_default().to_string()).collect())
        })
        .collect();
    Ok(DuckRun {
        version: value["version"].as_str().unwrap_or("?").to_string(),
        threads: value["threads"].to_string(),
        setup_ms: value["setup_ms"].as_f64().unwrap_or(f64::NAN),
        medians,
        rows,
    })
}

/// Stop the benchmark unless `theirs` equals `ours` for every report.
fn check_equal(what: &str, ours: &[Vec<String>], theirs: &[Vec<String>]) {
    for (n, (a, b)) in ours.iter().zip(theirs).enumerate() {
        assert!(!a.is_empty(), "R{} of acme has rows ({what})", n + 1);
        assert_eq!(a, b, "R{}: acme and {what} differ; nothing is timed", n + 1);
    }
}

/// The current-state Parquet of `data` loaded into PostgreSQL (plain tables with primary
/// keys, analysed): the baseline of asking the same SQL of the database directly. Returns the
/// server version, a client, and the cluster (stopped when dropped).
async fn postgres_load(data: &common::Dataset) -> (String, tokio_postgres::Client, acme_testkit::PgCluster) {
    use acme::query::datafusion::prelude::{ParquetReadOptions, SessionContext};
    use futures_util::{SinkExt, StreamExt};
    let cluster = acme_testkit::PgCluster::start().expect("PostgreSQL");
    let url = cluster.create_database("bench_reports").await.expect("database");
    let client = acme_testkit::connect(&url).await.expect("connect");
    client
        .batch_execute(
            "CREATE TABLE orders (order_id bigint PRIMARY KEY, order_date date, delivery_date date, \
               customer_id bigint, status varchar); \
             CREATE TABLE order_items (order_item_id bigint PRIMARY KEY, order_id bigint, product_id bigint, \
               quanity integer); \
             CREATE TABLE customers (customer_id bigint PRIMARY KEY, customer_name varchar, is_active boolean);",
        )
        .await
        .expect("tables");
    let ctx = SessionContext::new();
    for table in ["orders", "order_items", "customers"] {
        let path = data.current(table).display().to_string();
        let df = ctx.read_parquet(path, ParquetReadOptions::default()).await.expect("parquet");
        let mut batches = df.execute_stream().await.expect("stream");
        let sink = client.copy_in(&format!("COPY {table} FROM STDIN (FORMAT csv)")).await.expect("copy");
        futures_util::pin_mut!(sink);
        let options = acme::core::arrow::util::display::FormatOptions::default();
        while let Some(batch) = batches.next().await {
            let batch = batch.expect("batch");
            let formatters: Vec<_> = batch
                .columns()
                .iter()
                .map(|c| acme::core::arrow::util::display::ArrayFormatter::try_new(c.as_ref(), &options).expect("fmt"))
                .collect();
            let mut text = String::new();
            for row in 0..batch.num_rows() {
                for (i, (column, f)) in batch.columns().iter().zip(&formatters).enumerate() {
                    if i > 0 {
                        text.push(',');
                    }
                    if column.is_valid(row) {
                        let value = f.value(row).to_string();
                        text.push('"');
                        text.push_str(&value.replace('"', "\"\""));
                        text.push('"');
                    }
                }
                text.push('\n');
            }
            sink.send(bytes::Bytes::from(text)).await.expect("send rows");
        }
        sink.finish().await.expect("finish copy");
    }
    client.batch_execute("VACUUM ANALYZE").await.expect("analyze");
    let version: String = client.query_one("SHOW server_version", &[]).await.expect("version").get(0);
    (version, client, cluster)
}

/// The four questions' rows in PostgreSQL, rendered (in PostgreSQL's text form, as acme's).
async fn postgres_rows(client: &tokio_postgres::Client) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    for (_, sql) in plain_sql() {
        let mut rows = Vec::new();
        for message in client.simple_query(&sql).await.expect("query") {
            if let tokio_postgres::SimpleQueryMessage::Row(row) = message {
                let cells: Vec<&str> =
                    (0..row.len()).map(|i| row.get(i).unwrap_or(acme_testkit::oracle::NULL)).collect();
                rows.push(cells.join("|"));
            }
        }
        out.push(rows);
    }
    out
}

/// Median times (ms) of the four questions in PostgreSQL.
async fn postgres_medians(client: &tokio_postgres::Client, runs: usize) -> Vec<f64> {
    let mut medians = Vec::new();
    for (_, sql) in plain_sql() {
        let sql = &sql;
        let time =
            common::median(runs, || async move { client.query(sql.as_str(), &[]).await.expect("query").len() }).await;
        medians.push(time.as_secs_f64() * 1000.0);
    }
    medians
}

fn reports(c: &mut Criterion) {
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let sf = common::scale();
    let data = runtime.block_on(common::dataset(sf));
    let as_of = Some(data.instant);
    let runs = 15;

    // acme's one-off work on a stored model: opening the warehouse, then the first R3 and R4
    // (which count once what later handles keep by difference, when the handle holds a tail).
    let started = Instant::now();
    let warehouse = runtime.block_on(Warehouse::open(&data.warehouse)).expect("open warehouse");
    runtime.block_on(report(&warehouse, 3, None));
    runtime.block_on(report(&warehouse, 4, None));
    let acme_setup_ms = started.elapsed().as_secs_f64() * 1000.0;

    // The answers first: acme's, now and as of, against DuckDB's and PostgreSQL's.
    let acme_now: Vec<Vec<String>> = (1..=4).map(|n| runtime.block_on(acme_rows(&warehouse, n, None))).collect();
    let acme_then: Vec<Vec<String>> = (1..=4).map(|n| runtime.block_on(acme_rows(&warehouse, n, as_of))).collect();
    let (pg_version, pg_client, _cluster) = runtime.block_on(postgres_load(&data));
    check_equal("PostgreSQL now", &acme_now, &runtime.block_on(postgres_rows(&pg_client)));
    let unavailable = |e: String| -> DuckRun {
        panic!("DuckDB baseline unavailable ({e}); the test kit creates its Python environment (see README)")
    };
    let plain = plain_sql();
    let duck_plain = duckdb(duckdb_views(&data, None), Vec::new(), &plain, runs).unwrap_or_else(unavailable);
    check_equal("DuckDB now", &acme_now, &duck_plain.rows);
    let (setup, pre) = preaggregated_sql();
    let duck_pre = duckdb(duckdb_views(&data, None), setup, &pre, runs).unwrap_or_else(unavailable);
    check_equal("DuckDB pre-aggregated now", &acme_now, &duck_pre.rows);
    let duck_then = duckdb(duckdb_views(&data, as_of), Vec::new(), &plain, runs).unwrap_or_else(unavailable);
    check_equal("DuckDB as of the instant", &acme_then, &duck_then.rows);
    eprintln!("answers equal: acme, DuckDB (plain and pre-aggregated) and PostgreSQL now; acme and DuckDB as of");

    let mut group = c.benchmark_group(format!("reports_sf{sf}"));
    group.sample_size(20).measurement_time(Duration::from_secs(5));
    for n in 1..=4 {
        group.bench_function(format!("R{n}_current"), |b| b.to_async(&runtime).iter(|| report(&warehouse, n, None)));
        group.bench_function(format!("R{n}_as_of"), |b| b.to_async(&runtime).iter(|| report(&warehouse, n, as_of)));
    }
    group.finish();

    // The comparison, every figure measured in this run with the same method.
    let mut acme_now_ms = Vec::new();
    let mut acme_then_ms = Vec::new();
    for n in 1..=4 {
        let w = &warehouse;
        acme_now_ms.push(runtime.block_on(common::median(runs, || report(w, n, None))).as_secs_f64() * 1000.0);
        acme_then_ms.push(runtime.block_on(common::median(runs, || report(w, n, as_of))).as_secs_f64() * 1000.0);
    }
    let pg = runtime.block_on(postgres_medians(&pg_client, runs));
    // A handle keeps R3's and R4's counts while it holds a raw tail (the live path); on a model
    // that holds every change it counts R3 once, on its first query, and answers R4 over the
    // fact tables.
    let r34 = if warehouse.tail().is_some_and(|t| t.changes > 0) {
        "R3 and R4 now from the counts it keeps (this handle holds a raw tail)"
    } else {
        "R3 now from counts the handle made once, on its first query, and R4 now over the fact tables (the model \
         holds every change)"
    };
    let mut table = format!(
        "\nReports at SF{sf}, median of {runs} runs (ms); answers checked equal first\n\
         | report | acme now | DuckDB plain | acme / DuckDB plain | DuckDB pre-aggregated | acme / DuckDB pre-aggregated | \
         PostgreSQL | acme / PostgreSQL | acme as of | DuckDB as of | acme / DuckDB as of |\n\
         |---|---|---|---|---|---|---|---|---|---|---|\n"
    );
    for n in 0..4 {
        table.push_str(&format!(
            "| R{} | {:.1} | {:.1} | {:.2}x | {:.1} | {:.2}x | {:.1} | {:.2}x | {:.1} | {:.1} | {:.2}x |\n",
            n + 1,
            acme_now_ms[n],
            duck_plain.medians[n],
            acme_now_ms[n] / duck_plain.medians[n],
            duck_pre.medians[n],
            acme_now_ms[n] / duck_pre.medians[n],
            pg[n],
            acme_now_ms[n] / pg[n],
            acme_then_ms[n],
            duck_then.medians[n],
            acme_then_ms[n] / duck_then.medians[n],
        ));
    }
    table.push_str(&format!(
        "\nOne-off precomputation: acme {acme_setup_ms:.0} ms (opening the warehouse, then the first R3 and R4); \
         DuckDB {:.0} ms (the three pre-aggregated tables). DuckDB {} ({} threads) over \
         Parquet exports in row groups of {} rows: plain, the current state; pre-aggregated, orders per (delivery \
         date, status), item totals of open orders per product and orders per (customer, status), as acme keeps; \
         as of, the versions in force at {}. PostgreSQL {pg_version} over the current state loaded into plain \
         tables with primary keys (analysed). acme answers R1 and R2 now from its `agg_orders_by_delivery_date` \
         aggregate, {r34}, and every as-of report from the star schema.\n",
        duck_pre.setup_ms,
        duck_plain.version,
        duck_plain.threads,
        common::EXPORT_ROW_GROUP_ROWS,
        data.instant.to_rfc3339_opts(SecondsFormat::Millis, true),
    ));
    println!("{table}");
    let summary = data.dir.join("reports-summary.md");
    std::fs::write(&summary, &table).expect("write the summary");
    println!("written to {}", summary.display());
}

criterion_group!(benches, reports);
criterion_main!(benches);
