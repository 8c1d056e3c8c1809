//! A Ballista executor for acme's distributed queries (feature `ballista-cluster`): the
//! executor of Apache Ballista 55 with Ballista's S3 object-store registry, so that it reads
//! the warehouse's files with the S3 settings each query's session carries (or, without them,
//! with its own `AWS_*` environment).
//!
//! ```text
//! cargo run --release --features ballista-cluster --example ballista_executor -- \
//!     --scheduler-host localhost --scheduler-port 50050 --port 50051 --grpc-port 50052
//! ```

use std::sync::Arc;

use anyhow::Context;
use ballista_core::object_store::{runtime_env_with_s3_support, session_config_with_s3_support};
use ballista_executor::executor_process::{ExecutorProcessConfig, start_executor_process};
use clap::Parser;

/// Command-line arguments.
#[derive(Debug, Parser)]
#[command(version, about = "A Ballista executor with S3 access, for acme's distributed queries")]
struct Args {
    /// Address to listen on.
    #[arg(long, env = "ACME_BALLISTA_BIND", default_value = "127.0.0.1")]
    bind: String,
    /// Port of the Arrow Flight service that serves this executor's shuffle data.
    #[arg(long, env = "ACME_BALLISTA_PORT", default_value_t = 50051)]
    port: u16,
    /// Port of the gRPC service the scheduler sends tasks to.
    #[arg(long, env = "ACME_BALLISTA_GRPC_PORT", default_value_t = 50052)]
    grpc_port: u16,
    /// Host name the scheduler and other executors reach this executor by (default: --bind).
    #[arg(long, env = "ACME_BALLISTA_EXTERNAL_HOST")]
    external_host: Option<String>,
    /// The scheduler's host.
    #[arg(long, env = "ACME_BALLISTA_SCHEDULER_HOST", default_value = "localhost")]
    scheduler_host: String,
    /// The scheduler's port.
    #[arg(long, env = "ACME_BALLISTA_SCHEDULER_PORT", default_value_t = 50050)]
    scheduler_port: u16,
    /// Tasks run at once (default: the machine's cores).
    #[arg(long, env = "ACME_BALLISTA_CONCURRENT_TASKS")]
    concurrent_tasks: Option<usize>,
    /// Directory for shuffle files (default: a temporary directory).
    #[arg(long, env = "ACME_BALLISTA_WORK_DIR")]
    work_dir: Option<String>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .init();
    let defaults = ExecutorProcessConfig::default();
    let config = ExecutorProcessConfig {
        bind_host: args.bind,
        external_host: args.external_host,
        port: args.port,
        grpc_port: args.grpc_port,
        scheduler_host: args.scheduler_host,
        scheduler_port: args.scheduler_port,
        vcores: args.concurrent_tasks.unwrap_or(defaults.vcores),
        work_dir: args.work_dir,
        override_config_producer: Some(Arc::new(session_config_with_s3_support)),
        override_runtime_producer: Some(Arc::new(runtime_env_with_s3_support)),
        ..defaults
    };
    start_executor_process(Arc::new(config)).await.context("running the executor")
}
