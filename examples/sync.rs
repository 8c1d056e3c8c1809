//! Run the pipeline against a source: snapshot if needed, stream, build the model.
//!
//! ```text
//! cargo run --release --example sync -- --source postgres://user:pass@host/db --warehouse ./warehouse [--once]
//! ```
//! With `--once` it catches up to the source's current position, commits, builds the model
//! and exits 0. Without it, it keeps streaming (rebuilding the model every
//! `--model-interval` seconds, then compacting the raw layer's micro-batch files) until Ctrl-C.

use std::io::Write;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use acme::core::{AcmeConfig, CdcMode};
use acme::ingest::{ChangeStream, SnapshotProgress};
use acme::model::ModelBuild;
use clap::Parser;

/// jemalloc instead of glibc's malloc: with tokio's worker and blocking threads, glibc keeps the
/// memory the pipeline frees in per-thread arenas, and a SF10 snapshot whose live heap stays
/// under 300 MiB held 1.5 GiB of RSS (README, "Memory").
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Command-line arguments.
#[derive(Debug, Parser)]
#[command(about = "Replicate a PostgreSQL source into an acme warehouse")]
struct Args {
    /// Source PostgreSQL URL.
    #[arg(long)]
    source: String,
    /// Warehouse directory or URL.
    #[arg(long)]
    warehouse: String,
    /// Catch up once, build the model and exit.
    #[arg(long)]
    once: bool,
    /// Seconds between model builds while streaming.
    #[arg(long, default_value_t = 5)]
    model_interval: u64,
    /// Replication slot name (with `--cdc-mode triggers`: the name of the changelog objects).
    #[arg(long, default_value = acme::core::config::DEFAULT_SLOT)]
    slot: String,
    /// How changes are captured: `stream` (logical decoding, the default), `sql-poll` (logical
    /// decoding read by SQL) or `triggers` (the fallback for sources without logical replication).
    #[arg(long, default_value = "stream", value_parser = parse_cdc_mode)]
    cdc_mode: CdcMode,
    /// Memory the model build's query engine may hold, in MiB (sorts and aggregations spill
    /// to the temporary directory beyond it).
    #[arg(long, default_value_t = acme::core::config::DEFAULT_MEMORY_LIMIT_BYTES / (1024 * 1024))]
    memory_limit_mib: u64,
}

fn parse_cdc_mode(value: &str) -> Result<CdcMode, String> {
    match value {
        "stream" => Ok(CdcMode::Stream),
        "sql-poll" => Ok(CdcMode::SqlPoll),
        "triggers" => Ok(CdcMode::Triggers),
        other => Err(format!("unknown capture mode `{other}`: use stream, sql-poll or triggers")),
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .init();
    let args = Args::parse();
    let config = AcmeConfig::builder()
        .source_url(&args.source)
        .storage_url(&args.warehouse)
        .slot(&args.slot)
        .cdc_mode(args.cdc_mode)
        .memory_limit_bytes(args.memory_limit_mib * 1024 * 1024)
        .build()?;
    let started = Instant::now();
    let progress = Arc::new(SnapshotProgress::default());
    let bar = tokio::spawn(progress_bar(Arc::clone(&progress)));
    let stream = ChangeStream::open_with_progress(config.clone(), Some(progress)).await;
    bar.abort();
    let mut stream = stream?;
    println!(
        "ready after {:.1?}: snapshot at LSN {}{}",
        started.elapsed(),
        acme::ingest::Lsn(stream.snapshot_point().lsn),
        peak_memory()
    );
    if args.once {
        let report = stream.catch_up().await?;
        println!(
            "caught up: {} transactions, {} change rows, slot at {}",
            report.transactions, report.changes, report.confirmed
        );
        let model = ModelBuild::new(config).await?;
        println!("model at raw LSN {} built in {:.1?}{}", model.position, model.elapsed, peak_memory());
        return Ok(());
    }
    let mut ctrl_c = Box::pin(tokio::signal::ctrl_c());
    loop {
        let until = tokio::time::sleep(Duration::from_secs(args.model_interval.max(1)));
        tokio::select! {
            _ = &mut ctrl_c => break,
            result = stream.run_until(Duration::from_millis(100), until) => result?,
        }
        let model = ModelBuild::new(config.clone()).await?;
        if !model.up_to_date {
            println!("model at raw LSN {} built in {:.1?}", model.position, model.elapsed);
        }
        // Housekeeping between rounds: merge the raw micro-batch files.
        let compacted = stream.compact().await?;
        if compacted.files_removed > 0 {
            println!("raw layer: {} files merged into {}", compacted.files_removed, compacted.files_added);
        }
    }
    println!("stopped; the next run resumes from the last committed position");
    Ok(())
}

/// A one-line progress bar of the snapshot: rows and MiB per table, and the share of the
/// estimated heap size copied.
async fn progress_bar(progress: Arc<SnapshotProgress>) {
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let tables = progress.tables();
        if tables.is_empty() {
            continue;
        }
        let (done, total) = tables.iter().fold((0u64, 0u64), |(d, t), p| {
            (d + p.bytes.load(Ordering::Relaxed), t + p.estimated_bytes.load(Ordering::Relaxed))
        });
        let share = if total == 0 { 1.0 } else { (done as f64 / total as f64).min(1.0) };
        let filled = (share * 30.0) as usize;
        let detail: Vec<String> =
            tables.iter().map(|p| format!("{} {} rows", p.table, p.rows.load(Ordering::Relaxed))).collect();
        print!("\r[{}{}] {:>3.0}%  {}", "#".repeat(filled), ".".repeat(30 - filled), share * 100.0, detail.join(", "));
        let _ = std::io::stdout().flush();
    }
}

/// `", peak RSS so far N MiB"` from the kernel's high-water mark (Linux), or nothing elsewhere.
fn peak_memory() -> String {
    let peak_kib = std::fs::read_to_string("/proc/self/status").ok().and_then(|status| {
        let line = status.lines().find(|l| l.starts_with("VmHWM:"))?.to_string();
        line.split_whitespace().nth(1)?.parse::<u64>().ok()
    });
    peak_kib.map(|kib| format!(", peak RSS so far {} MiB", kib / 1024)).unwrap_or_default()
}
