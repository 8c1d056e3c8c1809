//! Shared by the command-line programs (each includes it with `#[path]`).

/// Run a program's body: logging to stderr at `RUST_LOG` (by default acme's own events,
/// [`acme::DEFAULT_LOG_FILTER`]), a multi-threaded Tokio runtime, and the exit code
/// [`acme::exit_status`] gives the outcome.
pub fn main<F: std::future::Future<Output = anyhow::Result<()>>>(run: impl FnOnce() -> F) -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| acme::DEFAULT_LOG_FILTER.into()),
        )
        .init();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build();
    match runtime {
        Ok(runtime) => acme::exit_status(runtime.block_on(run())),
        Err(error) => acme::exit_status(Err(anyhow::Error::from(error).context("starting the async runtime"))),
    }
}
