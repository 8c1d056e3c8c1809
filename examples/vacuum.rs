//! Delete the data files of a warehouse that no table version inside the retention needs:
//! files that compaction and model builds replaced, and files a crashed writer left. Readers
//! pinned to a version inside the retention keep working. It says, per table, how many files
//! and bytes it freed.
//!
//! ```text
//! cargo run --release --example vacuum -- --warehouse ./warehouse [--retention-hours 168] [--dry-run]
//! ```
//! Files no commit named are deleted only with a retention of an hour or more (a writer commits
//! its files within minutes). Exit codes as `sync`'s.

use std::time::Duration;

use acme::core::Storage;
use clap::Parser;

#[path = "support/cli.rs"]
mod cli;

/// Command-line arguments.
#[derive(Debug, Parser)]
#[command(version, about = "Delete the warehouse files no version inside the retention needs")]
struct Args {
    /// Warehouse directory or URL.
    #[arg(long, env = "ACME_WAREHOUSE")]
    warehouse: String,
    /// Keep every file a version committed within this many hours needs (Delta's default: 7 days).
    #[arg(long, env = "ACME_RETENTION_HOURS", default_value_t = 168.0)]
    retention_hours: f64,
    /// Only report what would be deleted.
    #[arg(long)]
    dry_run: bool,
    #[command(flatten)]
    storage: cli::StorageOptions,
    #[command(flatten)]
    logging: cli::Logging,
}

fn main() -> std::process::ExitCode {
    cli::main(|args: &Args| &args.logging, run)
}

async fn run(args: Args) -> anyhow::Result<()> {
    let retention = Duration::try_from_secs_f64(args.retention_hours * 3600.0).map_err(|_| {
        acme::core::Error::Config { setting: "retention-hours", message: "must be a number of hours, 0 or more".into() }
    })?;
    let storage = Storage::new(&args.warehouse, args.storage.map())?;
    let tables = storage.vacuum(retention, args.dry_run).await?;
    let verb = if args.dry_run { "would delete" } else { "deleted" };
    for table in &tables {
        println!("{}: {verb} {} files, {} bytes", table.table, table.files, table.bytes);
    }
    let (files, bytes) = tables.iter().fold((0, 0), |(f, b), t| (f + t.files, b + t.bytes));
    println!("vacuum {verb} {files} files, {bytes} bytes in {} tables", tables.len());
    Ok(())
}
