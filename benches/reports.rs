//! R1-R4, current and as of an earlier instant, against DuckDB over the same data in the
//! same run.
//!
//! The dataset (see `common`) is built once per scale factor and cached under `bench-data/`.
//! Criterion measures acme's reports; then one comparison runs each report in acme and in
//! DuckDB 2.0 (from the `.ci/run` virtual environment) with the same method (median of 15 runs
//! after two warm-ups) and prints the ratios:
//! - `current`: DuckDB over plain Parquet of the current state (the baseline);
//! - `as_of`: acme as of the recorded instant, against acme's own current-state figure.
//!
//! `ACME_BENCH_SF` sets the scale factor (default 0.1; the issue figures use 1).
//! Run: `cargo bench --bench reports`.

mod common;

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

use acme::query::sql::{open_orders_sql, pending_items_sql, top_customers_sql, top_delivery_dates_sql};
use acme::query::{StatusFilter, Warehouse};
use chrono::{DateTime, Utc};
use criterion::{Criterion, criterion_group, criterion_main};

/// Run report `n` (1-4) in acme.
async fn report(w: &Warehouse, n: usize, as_of: Option<DateTime<Utc>>) -> usize {
    match n {
        1 => w.open_orders(StatusFilter::Open, as_of).await.expect("R1").len(),
        2 => w.top_delivery_dates(10, as_of).await.expect("R2").len(),
        3 => w.pending_items_by_product(as_of).await.expect("R3").len(),
        _ => w.top_customers(10, StatusFilter::Pending, as_of).await.expect("R4").len(),
    }
}

/// The same four questions for DuckDB over the current-state Parquet files.
fn duckdb_sql(data: &common::Dataset) -> Vec<(String, String)> {
    let file = |t: &str| format!("read_parquet('{}')", data.current(t).display());
    vec![
        ("R1".into(), open_orders_sql(&file("orders"), &StatusFilter::Open)),
        ("R2".into(), top_delivery_dates_sql(&file("orders"), 10)),
        ("R3".into(), pending_items_sql(&file("orders"), &file("order_items"))),
        ("R4".into(), top_customers_sql(&file("orders"), &file("customers"), &StatusFilter::Pending, 10)),
    ]
}

fn duckdb_medians(data: &common::Dataset, runs: usize) -> Result<(String, Vec<f64>), String> {
    let python = acme_testkit::outside::python().map_err(|e| e.to_string())?;
    let queries = duckdb_sql(data);
    let spec = serde_json::json!({
        "runs": runs,
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
    Ok((value["version"].as_str().unwrap_or("?").to_string(), medians))
}

/// The current-state Parquet of `data` loaded into PostgreSQL (plain tables with primary
/// keys, analysed): the baseline of asking the same SQL of the database directly.
async fn postgres_baseline(data: &common::Dataset, runs: usize) -> (String, Vec<f64>, acme_testkit::PgCluster) {
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
    let queries = [
        open_orders_sql("orders", &StatusFilter::Open),
        top_delivery_dates_sql("orders", 10),
        pending_items_sql("orders", "order_items"),
        top_customers_sql("orders", "customers", &StatusFilter::Pending, 10),
    ];
    let mut medians = Vec::new();
    for sql in &queries {
        let client = &client;
        let time =
            common::median(runs, || async move { client.query(sql.as_str(), &[]).await.expect("query").len() }).await;
        medians.push(time.as_secs_f64() * 1000.0);
    }
    (version, medians, cluster)
}

fn reports(c: &mut Criterion) {
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let sf = common::scale();
    let data = runtime.block_on(common::dataset(sf));
    let warehouse = runtime.block_on(Warehouse::open(&data.warehouse)).expect("open warehouse");
    let as_of = Some(data.instant);

    let mut group = c.benchmark_group(format!("reports_sf{sf}"));
    group.sample_size(20).measurement_time(Duration::from_secs(5));
    for n in 1..=4 {
        group.bench_function(format!("R{n}_current"), |b| b.to_async(&runtime).iter(|| report(&warehouse, n, None)));
        group.bench_function(format!("R{n}_as_of"), |b| b.to_async(&runtime).iter(|| report(&warehouse, n, as_of)));
    }
    group.finish();

    // The comparison, every figure measured in this run with the same method.
    let runs = 15;
    let mut acme_now = Vec::new();
    let mut acme_as_of = Vec::new();
    let mut acme_scan = Vec::new();
    let scans = [
        open_orders_sql("orders_current", &StatusFilter::Open),
        top_delivery_dates_sql("orders_current", 10),
        pending_items_sql("orders_current", "order_items_current"),
        top_customers_sql("orders_current", "customers_current", &StatusFilter::Pending, 10),
    ];
    for n in 1..=4 {
        let w = &warehouse;
        acme_now.push(runtime.block_on(common::median(runs, || report(w, n, None))).as_secs_f64() * 1000.0);
        acme_as_of.push(runtime.block_on(common::median(runs, || report(w, n, as_of))).as_secs_f64() * 1000.0);
        // The current state computed from the history, the plan an as-of report uses.
        let sql = scans[n - 1].as_str();
        let scan = || async move { w.sql(sql).await.expect("scan").collect().await.expect("rows").len() };
        acme_scan.push(runtime.block_on(common::median(runs, scan)).as_secs_f64() * 1000.0);
    }
    let mut table = format!(
        "\nReports at SF{sf}, median of {runs} runs (ms)\n\
         | report | acme current | DuckDB current | acme / DuckDB | PostgreSQL | acme / PostgreSQL | acme current, history scan | acme as of | as of / current | as of / history scan |\n\
         |---|---|---|---|---|---|---|---|---|---|\n"
    );
    let (pg_version, pg, _cluster) = runtime.block_on(postgres_baseline(&data, runs));
    match duckdb_medians(&data, runs) {
        Ok((version, duck)) => {
            for n in 0..4 {
                table.push_str(&format!(
                    "| R{} | {:.1} | {:.1} | {:.2}x | {:.1} | {:.2}x | {:.1} | {:.1} | {:.2}x | {:.2}x |\n",
                    n + 1,
                    acme_now[n],
                    duck[n],
                    acme_now[n] / duck[n],
                    pg[n],
                    acme_now[n] / pg[n],
                    acme_scan[n],
                    acme_as_of[n],
                    acme_as_of[n] / acme_now[n],
                    acme_as_of[n] / acme_scan[n]
                ));
            }
            table.push_str(&format!(
                "\nDuckDB {version} over plain Parquet of the current state; PostgreSQL {pg_version} over the same \
                 rows loaded into plain tables with primary keys (analysed). acme answers R1 and R2 on the current \
                 state from its `agg_orders_by_delivery_date` aggregate, R3 and R4 (and every as-of report) from \
                 the histories; \"history scan\" is the current state computed from the histories like an as-of \
                 report (the `<table>_current` views).\n"
            ));
        }
        Err(e) => {
            panic!("DuckDB baseline unavailable ({e}); run `bash .ci/run` once to create the virtual environment")
        }
    }
    println!("{table}");
    let summary = data.dir.join("reports-summary.md");
    std::fs::write(&summary, &table).expect("write the summary");
    println!("written to {}", summary.display());
}

criterion_group!(benches, reports);
criterion_main!(benches);
