//! # acme
//!
//! An embedded analytical engine for ACME Delivery Services: it follows an OLTP PostgreSQL
//! database (snapshot, then change data capture), keeps every change in Delta Lake layers
//! (raw, intermediate SCD2 history, presentation star model) and answers the logistics
//! reports in-process with DataFusion, for the current state and as of any past instant.
//!
//! This crate is the facade: it re-exports the layer crates.
//!
//! ```
//! # fn main() -> acme::core::Result<()> {
//! let config = acme::core::AcmeConfig::builder()
//!     .source_url("postgres://postgres:secret@127.0.0.1:5432/finance_db")
//!     .storage_url("/var/lib/acme/warehouse")
//!     .build()?;
//! // Configurations are safe to log: the password never shows.
//! assert!(!format!("{config:?}").contains("secret"));
//! # Ok(()) }
//! ```
//!
//! [`Pipeline`] runs capture, model maintenance and the refresh of the reports side by side.
//!
//! Opt-in features: `http` (the HTTP service, `acme::http`), `ballista` (the reports and SQL on an
//! Apache Ballista cluster, `acme::query::distributed`) and `ballista-cluster` (also the
//! cluster's programs, `examples/ballista_scheduler.rs` and `examples/ballista_executor.rs`).

#[cfg(feature = "http")]
pub mod http;
pub mod pipeline;
pub mod verify;

pub use acme_core as core;
pub use acme_ingest as ingest;
pub use acme_model as model;
pub use acme_query as query;
/// A `tracing` filter (`EnvFilter` syntax) for programs that embed acme: acme's own events at
/// `info`, and only warnings from the Delta Lake libraries, whose `info` events (a scan-metadata
/// line per table and refresh) would bury them. The examples use it when `RUST_LOG` is unset.
pub const DEFAULT_LOG_FILTER: &str = "info,buoyant_kernel=warn,buoyant_kernel_engine=warn,deltalake_core=warn";

/// Resolves on Ctrl-C (SIGINT) or SIGTERM, the signals a terminal or a service manager stops a
/// program with: await it, then shut the pipeline down ([`Pipeline::shutdown`]) and let the
/// HTTP service drain its requests.
pub async fn shutdown_signal() {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            // Without a SIGTERM handler, Ctrl-C still stops the program.
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate => {}
    }
}

/// The exit code for the error ending a program: [`Severity::exit_code`] of the first
/// [`PipelineError`] in its chain, else 1.
pub fn exit_code(error: &(dyn std::error::Error + 'static)) -> u8 {
    let mut cause = Some(error);
    while let Some(e) = cause {
        if let Some(e) = e.downcast_ref::<PipelineError>() {
            return e.severity().exit_code();
        }
        if let Some(e) = e.downcast_ref::<acme_core::Error>() {
            return Severity::of_storage(e).exit_code();
        }
        cause = e.source();
    }
    1
}

/// The exit status of a program whose `main` ran to `result`: success, or the error printed
/// on stderr and [`exit_code`]'s code.
pub fn exit_status<E>(result: std::result::Result<(), E>) -> std::process::ExitCode
where
    E: std::fmt::Debug + AsRef<dyn std::error::Error + Send + Sync + 'static>,
{
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("Error: {error:?}");
            std::process::ExitCode::from(exit_code(error.as_ref()))
        }
    }
}

pub use pipeline::{
    DEFAULT_FOLD_RATIO, DEFAULT_MAINTENANCE_NICENESS, DEFAULT_MAX_MODEL_LAG, DEFAULT_MODEL_INTERVAL, Pipeline,
    PipelineBuilder, PipelineError, PipelineStatus, Severity,
};
