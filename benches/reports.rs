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

use acme::query::{
    StatusFilter, Warehouse, open_orders_sql, pending_items_sql, top_customers_sql, top_delivery_dates_sql,
};
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
    for n in 1..=4 {
        let w = &warehouse;
        acme_now.push(runtime.block_on(common::median(runs, || report(w, n, None))).as_secs_f64() * 1000.0);
        acme_as_of.push(runtime.block_on(common::median(runs, || report(w, n, as_of))).as_secs_f64() * 1000.0);
    }
    let mut table = format!(
        "\nReports at SF{sf}, median of {runs} runs (ms)\n\
         | report | acme current | DuckDB current | acme / DuckDB | acme as of | as of / current |\n\
         |---|---|---|---|---|---|\n"
    );
    match duckdb_medians(&data, runs) {
        Ok((version, duck)) => {
            for n in 0..4 {
                table.push_str(&format!(
                    "| R{} | {:.1} | {:.1} | {:.2}x | {:.1} | {:.2}x |\n",
                    n + 1,
                    acme_now[n],
                    duck[n],
                    acme_now[n] / duck[n],
                    acme_as_of[n],
                    acme_as_of[n] / acme_now[n]
                ));
            }
            table.push_str(&format!("DuckDB {version} over plain Parquet of the current state.\n"));
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
