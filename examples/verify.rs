//! Reconcile a source with its warehouse at one LSN: per table, row counts and a content
//! checksum on both sides, and a sample of the keys that differ (`acme::verify`).
//!
//! ```text
//! cargo run --release --example verify -- --source postgres://... --warehouse ./warehouse [--slot NAME] [--publication NAME]
//! ```
//! Run it beside a running `sync` (it waits up to `--wait-s` for the warehouse to reach the
//! source's position), or after `sync` stopped. Exit codes: 0 every table equal; 1 a table
//! differs (the lines above say which, and which keys); 75 the warehouse is behind the source
//! (run `sync` and verify again) or the source is unreachable; 2 and 78 as for `sync`.

use std::time::Duration;

use acme::core::AcmeConfig;
use acme::verify::{VerifyOptions, verify};
use clap::Parser;

#[path = "support/cli.rs"]
mod cli;

/// Command-line arguments.
#[derive(Debug, Parser)]
#[command(version, about = "Reconcile a source with its warehouse at one LSN")]
struct Args {
    /// Source PostgreSQL URL.
    #[arg(long, env = "ACME_SOURCE")]
    source: String,
    /// Warehouse directory or URL.
    #[arg(long, env = "ACME_WAREHOUSE")]
    warehouse: String,
    /// The replication slot the warehouse is synced with.
    #[arg(long, env = "ACME_SLOT", default_value = acme::core::config::DEFAULT_SLOT)]
    slot: String,
    /// The publication the warehouse's stream reads.
    #[arg(long, env = "ACME_PUBLICATION", default_value = acme::core::config::DEFAULT_PUBLICATION)]
    publication: String,
    /// How long to wait for a running `sync` to bring the warehouse to the source's position.
    #[arg(long, env = "ACME_WAIT_S", default_value_t = 60.0)]
    wait_s: f64,
    /// How many differing keys to name per table.
    #[arg(long, env = "ACME_SAMPLE", default_value_t = 10)]
    sample: usize,
    #[command(flatten)]
    storage: cli::StorageOptions,
    #[command(flatten)]
    logging: cli::Logging,
}

fn main() -> std::process::ExitCode {
    cli::main(|args: &Args| &args.logging, run)
}

async fn run(args: Args) -> anyhow::Result<()> {
    let config = AcmeConfig::builder()
        .source_url(&args.source)
        .storage_url(&args.warehouse)
        .storage_options(args.storage.map())
        .slot(&args.slot)
        .publication(&args.publication)
        .build()?;
    let wait = Duration::try_from_secs_f64(args.wait_s)
        .map_err(|_| acme::core::Error::Config { setting: "wait-s", message: "must be a number of seconds".into() })?;
    let report = verify(&config, &VerifyOptions { wait, sample: args.sample }).await?;
    let position = report.warehouse_position.map_or("none".to_string(), |p| p.to_string());
    println!("source read at {}; warehouse raw layer at {position}", report.lsn);
    for table in &report.tables {
        println!("{table}");
    }
    let differing = report.tables.iter().filter(|t| !t.is_equal()).count();
    if differing > 0 {
        anyhow::bail!("the warehouse differs from the source in {differing} of {} tables", report.tables.len());
    }
    println!("verify: every table is equal at {}", report.lsn);
    Ok(())
}
