//! The HTTP service: the seed's endpoints over a warehouse, optionally running the pipeline
//! in-process so the answers stay fresh.
//!
//! ```text
//! cargo run --release --example serve -- --warehouse ./warehouse [--source postgres://...] [--addr 127.0.0.1:8000]
//! ```

use std::time::Duration;

use acme::core::AcmeConfig;
use acme::http::{ServiceState, router};
use acme::ingest::ChangeStream;
use acme::model::ModelBuild;
use acme::query::Warehouse;
use clap::Parser;

/// jemalloc instead of glibc's malloc: with tokio's worker and blocking threads, glibc keeps the
/// memory the pipeline frees in per-thread arenas, and a SF10 snapshot whose live heap stays
/// under 300 MiB held 1.5 GiB of RSS (README, "Memory").
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Command-line arguments.
#[derive(Debug, Parser)]
#[command(about = "Serve the ACME reports over HTTP")]
struct Args {
    /// Warehouse directory or URL.
    #[arg(long)]
    warehouse: String,
    /// Also run the pipeline from this source, refreshing the model every `--model-interval` s.
    #[arg(long)]
    source: Option<String>,
    /// Address to listen on (loopback by default).
    #[arg(long, default_value = "127.0.0.1:8000")]
    addr: String,
    /// Seconds between model builds when `--source` is given.
    #[arg(long, default_value_t = 2)]
    model_interval: u64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .init();
    let args = Args::parse();
    let config = match &args.source {
        Some(source) => Some(AcmeConfig::builder().source_url(source).storage_url(&args.warehouse).build()?),
        None => None,
    };
    let mut stream = None;
    if let Some(config) = &config {
        let mut s = ChangeStream::open(config.clone()).await?;
        s.catch_up().await?;
        ModelBuild::new(config.clone()).await?;
        stream = Some(s);
    }
    let state = ServiceState::new(Warehouse::open(&args.warehouse).await?);
    let listener = tokio::net::TcpListener::bind(&args.addr).await?;
    println!("serving on http://{}", listener.local_addr()?);
    let server = axum::serve(listener, router(state.clone()));
    match (stream, config) {
        (Some(mut stream), Some(config)) => {
            let pipeline = async move {
                loop {
                    let pause = tokio::time::sleep(Duration::from_secs(args.model_interval.max(1)));
                    stream.run_until(Duration::from_millis(100), pause).await?;
                    if !ModelBuild::new(config.clone()).await?.up_to_date {
                        state.replace(Warehouse::open(&config.storage_url).await?).await;
                    }
                }
                #[allow(unreachable_code)]
                Ok::<(), anyhow::Error>(())
            };
            tokio::select! {
                r = server => r?,
                r = pipeline => r?,
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        _ => {
            tokio::select! {
                r = server => r?,
                _ = tokio::signal::ctrl_c() => {}
            }
        }
    }
    Ok(())
}
