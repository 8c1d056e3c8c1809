//! A Ballista scheduler for acme's distributed queries (feature `ballista-cluster`): the
//! scheduler of Apache Ballista 55 with Ballista's S3 object-store registry, so that the S3
//! settings a client sends with its session (`s3.endpoint`, `s3.region`, keys) reach the
//! warehouse's bucket; without them it uses its own `AWS_*` environment.
//!
//! ```text
//! cargo run --release --features ballista-cluster --example ballista_scheduler -- --port 50050
//! ```
//!
//! Executors (`examples/ballista_executor.rs`) register with it; clients connect with
//! `acme::query::distributed::DistributedWarehouse::connect("df://host:50050", ...)`, or
//! `cargo run --release --features ballista --example reports -- --scheduler df://host:50050 ...`.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use ballista_core::object_store::{session_config_with_s3_support, session_state_with_s3_support};
use ballista_scheduler::cluster::BallistaCluster;
use ballista_scheduler::config::{SchedulerConfig, TaskDistributionPolicy};
use ballista_scheduler::scheduler_process::{create_scheduler, start_grpc_service_with_listener};
use clap::Parser;
use datafusion_proto::protobuf::{LogicalPlanNode, PhysicalPlanNode};

/// Command-line arguments.
#[derive(Debug, Parser)]
#[command(version, about = "A Ballista scheduler with S3 access, for acme's distributed queries")]
struct Args {
    /// Address to listen on.
    #[arg(long, env = "ACME_BALLISTA_BIND", default_value = "127.0.0.1")]
    bind: String,
    /// Port for clients and executors.
    #[arg(long, env = "ACME_BALLISTA_PORT", default_value_t = 50050)]
    port: u16,
    /// Host name executors and clients reach this scheduler by.
    #[arg(long, env = "ACME_BALLISTA_EXTERNAL_HOST", default_value = "localhost")]
    external_host: String,
    /// How tasks go to executors: `round-robin` spreads each stage's tasks evenly over the
    /// executors; `bias` fills one executor's slots before the next (Ballista's default).
    #[arg(long, env = "ACME_BALLISTA_TASK_DISTRIBUTION", value_enum, default_value_t = Distribution::RoundRobin)]
    task_distribution: Distribution,
}

/// Task distribution policy.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum Distribution {
    /// One task per executor in turn.
    RoundRobin,
    /// As many tasks per executor as it has free slots.
    Bias,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .init();
    // Deep plans recurse: Ballista's own scheduler runs with 32 MiB stacks.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_stack_size(32 << 20)
        .build()
        .context("starting the scheduler's runtime")?;
    runtime.block_on(async {
        let address: SocketAddr =
            format!("{}:{}", args.bind, args.port).parse().context("--bind and --port must form a socket address")?;
        let mut config = SchedulerConfig::default()
            .with_hostname(args.external_host)
            .with_port(args.port)
            .with_task_distribution(match args.task_distribution {
                Distribution::RoundRobin => TaskDistributionPolicy::RoundRobin,
                Distribution::Bias => TaskDistributionPolicy::Bias,
            })
            .with_override_config_producer(Arc::new(session_config_with_s3_support))
            .with_override_session_builder(Arc::new(session_state_with_s3_support));
        config.bind_host = args.bind;
        config.validate().context("the scheduler's configuration")?;
        let cluster = BallistaCluster::new_from_config(&config).await.context("creating the cluster state")?;
        // Ballista's own start-up serves on a listener without TCP_NODELAY. The status a client
        // waits on then follows another small write on the same connection, and the client's
        // delayed acknowledgement holds it for about 40 ms: every query paid that. Accepted
        // connections inherit the option from the listening socket.
        let socket = if address.is_ipv4() { tokio::net::TcpSocket::new_v4() } else { tokio::net::TcpSocket::new_v6() }
            .context("creating the scheduler's socket")?;
        socket.set_reuseaddr(true).context("SO_REUSEADDR on the scheduler's socket")?;
        socket.set_nodelay(true).context("TCP_NODELAY on the scheduler's socket")?;
        socket.bind(address).with_context(|| format!("binding the scheduler to {address}"))?;
        let listener = socket.listen(1024).with_context(|| format!("listening on {address}"))?;
        tracing::info!("acme's Ballista scheduler listening on {address}");
        let scheduler = create_scheduler::<LogicalPlanNode, PhysicalPlanNode>(cluster, Arc::new(config))
            .await
            .context("creating the scheduler")?;
        start_grpc_service_with_listener(listener, scheduler).await.context("running the scheduler")
    })
}
