//! The main job: bring up a source (an ephemeral local PostgreSQL with generated ACME data
//! unless `--source` is given), snapshot it into the raw layer, and print what was copied.
//!
//! ```text
//! cargo run --release --example demo
//! cargo run --release --example demo -- --source postgres://user:pass@host/db --warehouse ./warehouse
//! ```

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use acme::core::AcmeConfig;
use acme::ingest::{Snapshot, SnapshotProgress};
use acme_testkit::{PgCluster, ScaleFactor};
use clap::Parser;

/// Command-line arguments.
#[derive(Debug, Parser)]
#[command(about = "Run acme end to end against a source database")]
struct Args {
    /// Source PostgreSQL URL; without it an ephemeral local cluster with generated data is used.
    #[arg(long)]
    source: Option<String>,
    /// Warehouse directory or URL (default: a new temporary directory).
    #[arg(long)]
    warehouse: Option<String>,
    /// Scale factor of the generated data (ephemeral source only).
    #[arg(long, default_value_t = 0.05)]
    scale: f64,
    /// Seed of the generated data.
    #[arg(long, default_value_t = 42)]
    seed: u64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()))
        .init();
    let args = Args::parse();
    let mut _cluster = None;
    let source = match args.source {
        Some(url) => url,
        None => {
            println!("starting an ephemeral PostgreSQL cluster...");
            let cluster = PgCluster::start()?;
            let url = cluster.create_database("finance_db").await?;
            let client = acme_testkit::connect(&url).await?;
            acme_testkit::create_source_schema(&client).await?;
            let load = acme_testkit::bulk_load(&url, ScaleFactor::new(args.scale)?, args.seed).await?;
            println!(
                "generated SF{}: {} customers, {} products, {} orders, {} order items in {:.1?}",
                args.scale, load.customers, load.products, load.orders, load.order_items, load.elapsed
            );
            println!("peak RSS after generation: {}", peak_rss());
            _cluster = Some(cluster);
            url
        }
    };
    let _tmp;
    let warehouse = match args.warehouse {
        Some(w) => w,
        None => {
            let dir = tempfile::tempdir()?;
            let path = dir.path().display().to_string();
            _tmp = dir;
            path
        }
    };
    let config = AcmeConfig::builder().source_url(source).storage_url(&warehouse).build()?;
    let progress = Arc::new(SnapshotProgress::default());
    let reporter = {
        let progress = Arc::clone(&progress);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                let line: Vec<String> = progress
                    .tables()
                    .iter()
                    .map(|t| format!("{} {} rows", t.table, t.rows.load(Ordering::Relaxed)))
                    .collect();
                if !line.is_empty() {
                    println!("  snapshot: {}", line.join(", "));
                }
            }
        })
    };
    let report = Snapshot::new(config).with_progress(progress).await?;
    reporter.abort();
    println!(
        "snapshot at LSN {} into {warehouse} in {:.1?} (peak RSS so far: {}):",
        report.lsn,
        report.elapsed,
        peak_rss()
    );
    println!("{:<28} {:>12} {:>14} {:>6}", "table", "rows", "COPY bytes", "files");
    for t in &report.tables {
        println!("{:<28} {:>12} {:>14} {:>6}", t.table, t.rows, t.bytes, t.files);
    }
    Ok(())
}

/// Peak resident memory of this process (Linux `VmHWM`), for the printed summary.
fn peak_rss() -> String {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("VmHWM:")).map(|l| l["VmHWM:".len()..].trim().to_string()))
        .unwrap_or_else(|| "unknown".to_string())
}
