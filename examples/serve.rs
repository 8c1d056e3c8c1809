//! The HTTP service: the seed's endpoints over a warehouse, optionally running the pipeline
//! in-process so the answers stay fresh.
//!
//! ```text
//! cargo run --release --example serve -- --warehouse ./warehouse [--source postgres://...] [--addr 127.0.0.1:8000]
//! ```
//!
//! Besides the reports it answers `GET /health`, `GET /ready` and `GET /metrics` (Prometheus
//! text; see `acme::http`).

use std::time::Duration;

use acme::Pipeline;
use acme::core::AcmeConfig;
use acme::http::{ServiceState, router};
use acme::query::Warehouse;
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
#[command(version, about = "Serve the ACME reports over HTTP")]
struct Args {
    /// Warehouse directory or URL.
    #[arg(long, env = "ACME_WAREHOUSE")]
    warehouse: String,
    /// Also run the pipeline from this source in-process (`acme::Pipeline`): every request
    /// answers from the newest consistent state.
    #[arg(long, env = "ACME_SOURCE")]
    source: Option<String>,
    /// Address to listen on (loopback by default).
    #[arg(long, env = "ACME_ADDR", default_value = "127.0.0.1:8000")]
    addr: String,
    /// With `--source`: the replication slot (the one the warehouse was synced with).
    #[arg(long, env = "ACME_SLOT", default_value = acme::core::config::DEFAULT_SLOT)]
    slot: String,
    /// Publication the logical stream reads (created, and marked as acme's, if missing).
    #[arg(long, env = "ACME_PUBLICATION", default_value = acme::core::config::DEFAULT_PUBLICATION)]
    publication: String,
    /// With `--source`: `GET /ready` answers 503 while the pipeline's lag exceeds this many
    /// seconds.
    #[arg(long, env = "ACME_MAX_READY_LAG_S", default_value_t = acme::http::DEFAULT_MAX_READY_LAG.as_secs_f64())]
    max_ready_lag_s: f64,
    /// Without `--source`: how often to pick up what the warehouse's writer (`sync`) committed,
    /// in milliseconds (the handle is refreshed, not reopened).
    #[arg(long, env = "ACME_REFRESH_MS", default_value_t = 1000)]
    refresh_ms: u64,
    #[command(flatten)]
    storage: cli::StorageOptions,
    #[command(flatten)]
    logging: cli::Logging,
}

/// Exit codes: 0 done; 2 a bad command line or setting; 75 transient (run again later); 78 an
/// operator must act first (the message says what); 70 a bug in acme; 1 anything else
/// (`acme::Severity`).
fn main() -> std::process::ExitCode {
    cli::main(|args: &Args| &args.logging, run)
}

async fn run(args: Args) -> anyhow::Result<()> {
    // Before the pipeline starts, so that the snapshot is counted too.
    let metrics = acme::http::prometheus()?;
    let mut pipeline = None;
    let state = match &args.source {
        Some(source) => {
            let config = AcmeConfig::builder()
                .source_url(source)
                .storage_url(&args.warehouse)
                .storage_options(args.storage.map())
                .slot(&args.slot)
                .publication(&args.publication)
                .build()?;
            let started = Pipeline::builder(config).start().await?;
            let state = ServiceState::pipeline(&started).max_lag(Duration::from_secs_f64(args.max_ready_lag_s));
            pipeline = Some(started);
            state
        }
        None => ServiceState::following(
            Warehouse::open_with_options(&args.warehouse, args.storage.map()).await?,
            Duration::from_millis(args.refresh_ms.max(1)),
        ),
    };
    let state = state.metrics(metrics);
    let listener = tokio::net::TcpListener::bind(&args.addr).await?;
    println!("serving on http://{}", listener.local_addr()?);
    // Ctrl-C or SIGTERM (or the pipeline stopping by itself): stop accepting, let the requests
    // in flight finish, then shut the pipeline down.
    let status = pipeline.as_ref().map(|p| p.status());
    let stop = async move {
        match status {
            Some(mut status) => tokio::select! {
                _ = status.wait_for(|s| !s.running) => {}
                _ = acme::shutdown_signal() => {}
            },
            None => acme::shutdown_signal().await,
        }
    };
    axum::serve(listener, router(state)).with_graceful_shutdown(stop).await?;
    println!("stopped serving: requests in flight finished");
    if let Some(pipeline) = pipeline {
        pipeline.shutdown().await?;
        println!("pipeline shut down");
    }
    Ok(())
}
