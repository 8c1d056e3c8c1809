//! Shared by the command-line programs (each includes it with `#[path]`).

/// How the programs write their logs to stderr.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line, with the current span and its parents (for log collectors).
    Json,
}

/// The logging flags every program takes (`#[command(flatten)]`).
#[derive(Debug, Clone, clap::Args)]
pub struct Logging {
    /// Log format on stderr: `text`, or `json` (one object per line, with the spans).
    /// The level comes from RUST_LOG (default: acme's own events at info).
    #[arg(long, env = "ACME_LOG_FORMAT", value_enum, default_value_t)]
    pub log_format: LogFormat,
}

/// The object-store options every program that opens a warehouse takes (`#[command(flatten)]`).
#[derive(Debug, Clone, clap::Args)]
pub struct StorageOptions {
    /// An object-store option as key=value (for S3: aws_endpoint, aws_region, aws_access_key_id,
    /// aws_secret_access_key, aws_allow_http, ...); repeat it for several, or give them
    /// comma-separated in ACME_STORAGE_OPTIONS.
    #[arg(long = "storage-option", env = "ACME_STORAGE_OPTIONS", value_delimiter = ',',
          value_parser = acme::core::config::parse_storage_option)]
    pub storage_option: Vec<(String, String)>,
}

// `teardown` includes this file and opens no warehouse.
#[allow(dead_code)]
impl StorageOptions {
    /// The options as a map, as `Storage` and `Warehouse` take them.
    pub fn map(&self) -> std::collections::HashMap<String, String> {
        self.storage_option.iter().cloned().collect()
    }
}

/// Run a program: parse its arguments (a bad command line exits with 2), log to stderr at
/// `RUST_LOG` (by default acme's own events, [`acme::DEFAULT_LOG_FILTER`]) in the format
/// `logging` picks from them, run `run` on a multi-threaded Tokio runtime, and exit with the code
/// [`acme::exit_status`] gives the outcome.
pub fn main<A, F>(logging: impl FnOnce(&A) -> &Logging, run: impl FnOnce(A) -> F) -> std::process::ExitCode
where
    A: clap::Parser,
    F: std::future::Future<Output = anyhow::Result<()>>,
{
    let args = A::parse();
    let filter =
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| acme::DEFAULT_LOG_FILTER.into());
    let subscriber = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match logging(&args).log_format {
        LogFormat::Text => subscriber.init(),
        LogFormat::Json => subscriber.json().with_current_span(true).with_span_list(true).init(),
    }
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build();
    match runtime {
        Ok(runtime) => acme::exit_status(runtime.block_on(run(args))),
        Err(error) => acme::exit_status(Err(anyhow::Error::from(error).context("starting the async runtime"))),
    }
}
