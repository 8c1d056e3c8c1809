//! Remove everything acme created in a source database for one warehouse: the replication
//! slot (which holds WAL on the server until it is removed), the publication if acme created
//! it, and the trigger fallback's triggers, function and changelog. The warehouse's files are
//! left as they are. It says what it removed, and what it found but left.
//!
//! ```text
//! cargo run --release --example teardown -- --source postgres://user:pass@host/db [--slot acme_slot]
//! ```
//! Exit codes as `sync`'s: 0 done (also when there was nothing to remove), 2 a bad setting,
//! 75 the source is unreachable (retry later), 78 a slot still in use (stop its acme first).

use acme::core::AcmeConfig;
use clap::Parser;

#[path = "support/cli.rs"]
mod cli;

/// Command-line arguments.
#[derive(Debug, Parser)]
#[command(version, about = "Remove the replication slot, publication and triggers acme created in a source")]
struct Args {
    /// Source PostgreSQL URL.
    #[arg(long, env = "ACME_SOURCE")]
    source: String,
    /// Replication slot name the warehouse was synced with (and the name of the trigger
    /// fallback's objects).
    #[arg(long, env = "ACME_SLOT", default_value = acme::core::config::DEFAULT_SLOT)]
    slot: String,
    /// Publication name (removed only if acme created it for this slot).
    #[arg(long, env = "ACME_PUBLICATION", default_value = acme::core::config::DEFAULT_PUBLICATION)]
    publication: String,
    #[command(flatten)]
    logging: cli::Logging,
}

fn main() -> std::process::ExitCode {
    cli::main(|args: &Args| &args.logging, run)
}

async fn run(args: Args) -> anyhow::Result<()> {
    let config =
        AcmeConfig::builder().source_url(&args.source).slot(&args.slot).publication(&args.publication).build()?;
    let done = acme::ingest::teardown(&config).await.map_err(acme::PipelineError::from)?;
    if done.removed.is_empty() {
        println!("nothing of acme's (slot {}) was left in the source", args.slot);
    }
    for object in &done.removed {
        println!("removed {object}");
    }
    for object in &done.kept {
        println!("kept {object}");
    }
    Ok(())
}
