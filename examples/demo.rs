//! The main job, end to end: a source (an ephemeral local PostgreSQL with generated ACME data
//! and a live workload, unless `--source` is given), then `acme::Pipeline`: the snapshot, the
//! change stream and model maintenance side by side, and the four reports (now, and one as of
//! an earlier instant). Under the workload, stamped transactions measure report freshness:
//! from a commit until R1, R3 and R4 all show it.
//!
//! ```text
//! cargo run --release --example demo
//! cargo run --release --example demo -- --source postgres://user:pass@host/db --warehouse ./warehouse
//! ```
//! With `--source`, the demo streams through a replication slot and publication of its own
//! (`acme_demo_<pid>_<n>` unless `--slot` is given) and removes them, and anything else it
//! created in the source, when it ends, whether it succeeded or not: a slot left behind would
//! hold the server's WAL. `--keep` keeps them (with `--warehouse`, `sync --slot <name>
//! --publication <name>` continues from there; `teardown` removes them later).

use std::time::{Duration, Instant};

use acme::Pipeline;
use acme::core::AcmeConfig;
use acme::query::{StatusFilter, Warehouse};
use acme_testkit::{PgCluster, ScaleFactor, WorkloadConfig};
use clap::Parser;

/// jemalloc instead of glibc's malloc: with tokio's worker and blocking threads, glibc keeps the
/// memory the pipeline frees in per-thread arenas, and a SF10 snapshot whose live heap stays
/// under 300 MiB held 1.5 GiB of RSS (README, "Memory").
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Command-line arguments.
#[derive(Debug, Parser)]
#[command(version, about = "Run acme end to end and print the four logistics reports")]
struct Args {
    /// Source PostgreSQL URL; without it an ephemeral local cluster with generated data is used
    /// (and a live workload writes to it while acme streams).
    #[arg(long, env = "ACME_SOURCE")]
    source: Option<String>,
    /// Warehouse directory or URL (default: a new temporary directory).
    #[arg(long, env = "ACME_WAREHOUSE")]
    warehouse: Option<String>,
    /// Scale factor of the generated data (ephemeral source only).
    #[arg(long, env = "ACME_SCALE", default_value_t = 0.05)]
    scale: f64,
    /// Seed of the generated data and workload.
    #[arg(long, env = "ACME_SEED", default_value_t = 42)]
    seed: u64,
    /// Seconds of live workload while streaming (ephemeral source only).
    #[arg(long, env = "ACME_SECONDS", default_value_t = 5)]
    seconds: u64,
    /// Rows shown per report.
    #[arg(long, env = "ACME_LIMIT", default_value_t = 3)]
    limit: usize,
    /// With `--source`: the replication slot (and publication) name; default a new
    /// `acme_demo_<pid>_<n>`.
    #[arg(long, env = "ACME_SLOT")]
    slot: Option<String>,
    /// With `--source`: keep the slot and publication in the source when the demo ends.
    #[arg(long)]
    keep: bool,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()))
        .init();
    let args = Args::parse();
    let mut cluster = None;
    let source = match &args.source {
        Some(url) => url.clone(),
        None => {
            println!("starting an ephemeral PostgreSQL cluster...");
            let pg = PgCluster::start()?;
            let url = pg.create_database("finance_db").await?;
            let client = acme_testkit::connect(&url).await?;
            acme_testkit::create_source_schema(&client).await?;
            let load = acme_testkit::bulk_load(&url, ScaleFactor::new(args.scale)?, args.seed).await?;
            println!(
                "generated SF{}: {} customers, {} products, {} orders, {} order items in {:.1?}",
                args.scale, load.customers, load.products, load.orders, load.order_items, load.elapsed
            );
            cluster = Some(pg);
            url
        }
    };
    let _tmp;
    let warehouse = match &args.warehouse {
        Some(w) => w.clone(),
        None => {
            let dir = tempfile::tempdir()?;
            let path = dir.path().display().to_string();
            _tmp = dir;
            path
        }
    };
    let mut config = AcmeConfig::builder().source_url(&source).storage_url(&warehouse);
    if cluster.is_none() {
        // Objects of its own in the user's database, never those of a warehouse already there.
        let slot = args.slot.clone().unwrap_or_else(|| {
            let n =
                std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().subsec_nanos();
            format!("acme_demo_{}_{n}", std::process::id())
        });
        config = config.slot(&slot).publication(&slot);
    }
    let config = config.build()?;
    let result = run(&args, &source, config.clone(), cluster.is_some()).await;
    let slot = &config.slot;
    if cluster.is_none() && args.keep {
        println!(
            "\nkept in the source: replication slot {slot} and publication {slot} (remove them with \
             `cargo run --example teardown -- --source <url> --slot {slot} --publication {slot}`)"
        );
    } else if cluster.is_none() {
        match acme::ingest::teardown(&config).await {
            Ok(done) => {
                for object in &done.removed {
                    println!("removed from the source: {object}");
                }
            }
            Err(error) => {
                eprintln!(
                    "could not remove the demo's objects from the source: run \
                     `cargo run --example teardown -- --source <url> --slot {slot} --publication {slot}`"
                );
                // The run's own error, if any, is the one to report.
                result?;
                return Err(acme::PipelineError::from(error).into());
            }
        }
    }
    drop(cluster);
    result
}

/// Snapshot, stream and model through a pipeline, then print the reports (and, with a
/// generated source, the freshness of stamped transactions under a live workload).
async fn run(args: &Args, source: &str, config: AcmeConfig, generated: bool) -> anyhow::Result<()> {
    let started = Instant::now();
    let pipeline = Pipeline::builder(config.clone()).start().await?;
    println!(
        "snapshot and first model done in {:.1?} (model at LSN {}), streaming changes...",
        started.elapsed(),
        pipeline.warehouse().model_position().unwrap_or_default()
    );

    let mut as_of = None;
    if generated {
        let workload = WorkloadConfig {
            seed: args.seed,
            rate_tps: 200.0,
            transactions: None,
            duration: Some(Duration::from_secs(args.seconds)),
            connections: 2,
            deletes: true,
            inserts_only: false,
        };
        let url = source.to_string();
        let writer = tokio::spawn(async move { acme_testkit::run_workload(&url, &workload).await });
        let halfway = Instant::now() + Duration::from_secs(args.seconds / 2);
        let client = acme_testkit::connect(source).await?;
        let mut delays = Vec::new();
        while !writer.is_finished() {
            if as_of.is_none() && Instant::now() >= halfway {
                as_of = Some(chrono::Utc::now());
            }
            delays.push(stamp_freshness(&client, &pipeline, delays.len()).await?);
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let report = writer.await??;
        println!(
            "live workload: {} transactions ({} row changes) in {:.1?}; acme captured {} change rows",
            report.transactions,
            report.total_changes(),
            report.elapsed,
            pipeline.status().borrow().changes
        );
        delays.sort();
        if let (Some(first), Some(last)) = (delays.first(), delays.last()) {
            println!(
                "report freshness: {} stamped transactions (customer, product, order and item in one commit) \
                 showed in R1, R3 and R4 after {} ms (p50), {} ms (min), {} ms (max)",
                delays.len(),
                delays[delays.len() / 2].as_millis(),
                first.as_millis(),
                last.as_millis()
            );
        }
    }
    // Every change committed so far, in the reports.
    let warehouse = pipeline.caught_up().await?;
    let s = pipeline.status().borrow().clone();
    println!(
        "model maintenance: {} builds beside the stream, last {:.1?}; the stored model is at LSN {}, \
         the reports at LSN {}",
        s.model_builds,
        s.last_model_build.unwrap_or_default(),
        warehouse.model_position().unwrap_or_default(),
        warehouse.raw_position().unwrap_or_default()
    );
    print_reports(&warehouse, args.limit, None).await?;
    if let Some(instant) = as_of {
        println!("\n== as of {instant} (mid-workload) ==");
        let rows = warehouse.top_delivery_dates(args.limit, Some(instant)).await?;
        println!("R2 top delivery dates with the most open orders:");
        for r in rows {
            println!("  {:<12} {:>6}", opt(r.delivery_date), r.quantity);
        }
    }
    drop(warehouse);
    pipeline.shutdown().await?;
    println!("\npeak RSS: {}", peak_rss());
    Ok(())
}

async fn print_reports(
    w: &Warehouse,
    limit: usize,
    as_of: Option<chrono::DateTime<chrono::Utc>>,
) -> anyhow::Result<()> {
    let r1 = w.open_orders(StatusFilter::Open, as_of).await?;
    println!("\nR1 open orders by delivery date and status ({} groups; first {}):", r1.len(), limit * 3);
    println!("  {:<12} {:<14} {:>8}", "delivery", "status", "orders");
    for r in r1.iter().take(limit * 3) {
        println!("  {:<12} {:<14} {:>8}", opt(r.delivery_date), r.status.clone().unwrap_or_default(), r.quantity);
    }
    println!("\nR2 top {limit} delivery dates with the most open orders:");
    for r in w.top_delivery_dates(limit, as_of).await? {
        println!("  {:<12} {:>8}", opt(r.delivery_date), r.quantity);
    }
    let r3 = w.pending_items_by_product(as_of).await?;
    println!("\nR3 open pending items by product ({} products; largest {}):", r3.len(), limit);
    for r in r3.iter().take(limit) {
        println!("  product {:<8} {:>8} items", opt(r.product_id), r.total_items);
    }
    println!("\nR4 top {limit} customers by pending orders (dense rank, ties shown):");
    for r in w.top_customers(limit, StatusFilter::Pending, as_of).await? {
        println!(
            "  #{:<3} customer {:<8} {:<20} {:>4} orders",
            r.ranking,
            opt(r.customer_id),
            r.customer_name.unwrap_or_else(|| "(unknown)".into()),
            r.quantity
        );
    }
    Ok(())
}

/// Commit one transaction that touches all four tables (a new customer, a new product, an
/// order of that customer with a delivery date no other order has, and an item of that
/// product), then wait until R1, R3 and R4 of the pipeline's newest warehouse all show it.
async fn stamp_freshness(client: &tokio_postgres::Client, pipeline: &Pipeline, n: usize) -> anyhow::Result<Duration> {
    let delivery = chrono::NaiveDate::from_ymd_opt(2200, 1, 1).unwrap_or_default() + chrono::Days::new(n as u64);
    let row = client
        .query_one(
            "WITH c AS (INSERT INTO operations.customers (customer_name, customer_address, created_at) \
               VALUES ('stamp', 'here', now()) RETURNING customer_id), \
             p AS (INSERT INTO operations.products (product_name, barcode, unity_price, is_active, created_at) \
               VALUES ('stamp', 'stamp', 1.00, true, now()) RETURNING product_id), \
             o AS (INSERT INTO operations.orders (order_date, delivery_date, customer_id, status, created_at) \
               SELECT current_date, CAST($1::text AS date), customer_id, 'PENDING', now() FROM c \
               RETURNING order_id, customer_id), \
             i AS (INSERT INTO operations.order_items (order_id, product_id, quanity, created_at) \
               SELECT order_id, product_id, 5, now() FROM o, p RETURNING product_id) \
             SELECT (SELECT customer_id FROM o), (SELECT product_id FROM i)",
            &[&delivery.to_string()],
        )
        .await?;
    let committed = Instant::now();
    let (customer, product): (i64, i64) = (row.get(0), row.get(1));
    loop {
        let w = pipeline.warehouse();
        let r1 = w.open_orders(StatusFilter::Open, None).await?.iter().any(|r| r.delivery_date == Some(delivery));
        if r1 {
            let r3 = w.pending_items_by_product(None).await?.iter().any(|r| r.product_id == Some(product));
            let r4 = w
                .top_customers(10_000, StatusFilter::Pending, None)
                .await?
                .iter()
                .any(|r| r.customer_id == Some(customer));
            if r3 && r4 {
                return Ok(committed.elapsed());
            }
        }
        if !pipeline.status().borrow().running {
            anyhow::bail!("the pipeline stopped: {:?}", pipeline.status().borrow().last_error);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn opt<T: ToString>(v: Option<T>) -> String {
    v.map(|v| v.to_string()).unwrap_or_else(|| "-".into())
}

/// Peak resident memory of this process (Linux `VmHWM`).
fn peak_rss() -> String {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("VmHWM:")).map(|l| l["VmHWM:".len()..].trim().to_string()))
        .unwrap_or_else(|| "unknown".to_string())
}
