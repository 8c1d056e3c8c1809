//! Generate ACME data into a database: the source schema, then a deterministic bulk load.
//!
//! ```text
//! cargo run --release --example load -- --target postgres://user:pass@host/db --scale 1 --seed 42
//! ```

use acme_testkit::ScaleFactor;
use clap::Parser;

/// Command-line arguments.
#[derive(Debug, Parser)]
#[command(version, about = "Create the ACME source schema in a database and load generated data")]
struct Args {
    /// Target PostgreSQL URL (its `operations` schema must not exist yet).
    #[arg(long, env = "ACME_TARGET")]
    target: String,
    /// Scale factor (1 = 100k customers, 10k products, 1M orders, 7-10 items each).
    #[arg(long, env = "ACME_SCALE", default_value_t = 0.01)]
    scale: f64,
    /// Seed.
    #[arg(long, env = "ACME_SEED", default_value_t = 42)]
    seed: u64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let client = acme_testkit::connect(&args.target).await?;
    acme_testkit::create_source_schema(&client).await?;
    let report = acme_testkit::bulk_load(&args.target, ScaleFactor::new(args.scale)?, args.seed).await?;
    println!(
        "loaded SF{}: {} customers, {} products, {} orders, {} order items in {:.1?}",
        args.scale, report.customers, report.products, report.orders, report.order_items, report.elapsed
    );
    Ok(())
}
