//! Run the pipeline against a source: snapshot if needed, stream, build the model.
//!
//! ```text
//! cargo run --release --example sync -- --source postgres://user:pass@host/db --warehouse ./warehouse [--once]
//! ```
//! With `--once` it catches up to the source's current position, commits, builds the model
//! and exits 0. Without it, it runs `acme::Pipeline` (the stream, with the raw layer's
//! compaction beside it, and model builds back to back on a runtime of their own) until
//! Ctrl-C, starting a model build every `--model-interval-ms` and printing its status every
//! `--status-interval` seconds.

use std::io::Write;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use acme::Pipeline;
use acme::core::{AcmeConfig, CdcMode};
use acme::ingest::SnapshotProgress;
use clap::Parser;

#[path = "support/cli.rs"]
mod cli;

/// jemalloc instead of glibc's malloc: with tokio's worker and blocking threads, glibc keeps the
/// memory the pipeline frees in per-thread arenas, and a SF10 snapshot whose live heap stays
/// under 300 MiB held 1.5 GiB of RSS (README, "Memory").
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Command-line arguments.
#[derive(Debug, Parser)]
#[command(version, about = "Replicate a PostgreSQL source into an acme warehouse")]
struct Args {
    /// Source PostgreSQL URL.
    #[arg(long, env = "ACME_SOURCE")]
    source: String,
    /// Warehouse directory or URL.
    #[arg(long, env = "ACME_WAREHOUSE")]
    warehouse: String,
    /// Catch up once, build the model and exit.
    #[arg(long)]
    once: bool,
    /// Milliseconds between two checks of whether a model build is due while streaming.
    #[arg(long, env = "ACME_MODEL_INTERVAL_MS", default_value_t = acme::DEFAULT_MODEL_INTERVAL.as_millis() as u64)]
    model_interval_ms: u64,
    /// Fold the raw changes after the stored model's position into it once they reach this
    /// fraction of the model's rows (the reports do not wait for builds: they apply those
    /// changes on read). 0 builds whenever there are any.
    #[arg(long, env = "ACME_FOLD_RATIO", default_value_t = acme::DEFAULT_FOLD_RATIO)]
    fold_ratio: f64,
    /// Fold them in, however few, once the stored model is this many seconds old.
    #[arg(long, env = "ACME_MAX_MODEL_LAG_S", default_value_t = acme::DEFAULT_MAX_MODEL_LAG.as_secs())]
    max_model_lag_s: u64,
    /// Fold by rewriting the files that hold superseded rows instead of marking them with
    /// Delta deletion vectors: for a warehouse that a Ballista cluster queries (its Parquet
    /// scan does not apply vectors). Each fold then costs about as much as the table.
    #[arg(long, env = "ACME_REWRITE_FOLDS")]
    rewrite_folds: bool,
    /// Seconds between two status lines while streaming.
    #[arg(long, env = "ACME_STATUS_INTERVAL", default_value_t = 5)]
    status_interval: u64,
    /// Replication slot name (with `--cdc-mode triggers`: the name of the changelog objects).
    #[arg(long, env = "ACME_SLOT", default_value = acme::core::config::DEFAULT_SLOT)]
    slot: String,
    /// Publication the logical stream reads (created, and marked as acme's, if missing).
    #[arg(long, env = "ACME_PUBLICATION", default_value = acme::core::config::DEFAULT_PUBLICATION)]
    publication: String,
    /// How changes are captured: `stream` (logical decoding, the default), `sql-poll` (logical
    /// decoding read by SQL) or `triggers` (the fallback for sources without logical replication).
    #[arg(long, env = "ACME_CDC_MODE", default_value = "stream", value_parser = parse_cdc_mode)]
    cdc_mode: CdcMode,
    /// Memory the model build's query engine may hold, in MiB (sorts and aggregations spill
    /// to the temporary directory beyond it).
    #[arg(long, env = "ACME_MEMORY_LIMIT_MIB", default_value_t = acme::core::config::DEFAULT_MEMORY_LIMIT_BYTES / (1024 * 1024))]
    memory_limit_mib: u64,
    #[command(flatten)]
    storage: cli::StorageOptions,
    #[command(flatten)]
    logging: cli::Logging,
}

fn parse_cdc_mode(value: &str) -> Result<CdcMode, String> {
    match value {
        "stream" => Ok(CdcMode::Stream),
        "sql-poll" => Ok(CdcMode::SqlPoll),
        "triggers" => Ok(CdcMode::Triggers),
        other => Err(format!("unknown capture mode `{other}`: use stream, sql-poll or triggers")),
    }
}

/// Exit codes: 0 done; 2 a bad command line or setting; 75 transient (run again later); 78 an
/// operator must act first (the message says what); 70 a bug in acme; 1 anything else
/// (`acme::Severity`).
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
        .cdc_mode(args.cdc_mode)
        .memory_limit_bytes(args.memory_limit_mib * 1024 * 1024)
        .deletion_vectors(!args.rewrite_folds)
        .build()?;
    let started = Instant::now();
    let progress = Arc::new(SnapshotProgress::default());
    let bar = tokio::spawn(progress_bar(Arc::clone(&progress)));
    let builder = Pipeline::builder(config)
        .snapshot_progress(progress)
        .model_interval(Duration::from_millis(args.model_interval_ms))
        .fold_ratio(args.fold_ratio)
        .max_model_lag(Duration::from_secs(args.max_model_lag_s));
    if args.once {
        let result = builder.run_once().await;
        bar.abort();
        let (caught_up, model, _) = result?;
        println!(
            "caught up after {:.1?}: {} transactions, {} change rows, slot at {}",
            started.elapsed(),
            caught_up.transactions,
            caught_up.changes,
            caught_up.confirmed
        );
        println!("model at raw LSN {} built in {:.1?}{}", model.position, model.elapsed, peak_memory());
        return Ok(());
    }
    let pipeline = builder.start().await;
    bar.abort();
    let pipeline = pipeline?;
    println!("ready after {:.1?}{}", started.elapsed(), peak_memory());
    let mut stop = Box::pin(acme::shutdown_signal());
    let mut tick = tokio::time::interval(Duration::from_secs(args.status_interval.max(1)));
    let mut status = pipeline.status();
    let mut seen = status.borrow().clone();
    loop {
        tokio::select! {
            _ = &mut stop => break,
            _ = pipeline.stopped() => break,
            changed = status.changed() => {
                if changed.is_err() {
                    break;
                }
                let now = status.borrow_and_update().clone();
                if now.model_builds > seen.model_builds {
                    println!(
                        "model at raw LSN {} built in {:.1?}",
                        now.model_position.unwrap_or_default(),
                        now.last_model_build.unwrap_or_default()
                    );
                }
                if now.raw_compactions > seen.raw_compactions {
                    println!("raw layer: files merged ({} merges so far)", now.raw_compactions);
                }
                seen = now;
            }
            _ = tick.tick() => {
                let s = &seen;
                println!(
                    "slot at {}, {} changes, model at {:?} ({} builds), lag {:?} bytes / {:.1} s{}",
                    s.confirmed_lsn,
                    s.changes,
                    s.model_position,
                    s.model_builds,
                    s.lag_bytes,
                    s.lag_seconds.unwrap_or_default(),
                    s.last_error.as_ref().map(|e| format!("; last error: {e}")).unwrap_or_default()
                );
            }
        }
    }
    pipeline.shutdown().await?;
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
