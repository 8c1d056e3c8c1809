//! Shared by the command-line programs (each includes it with `#[path]`).

/// Log to stderr at `RUST_LOG`, by default acme's own events ([`acme::DEFAULT_LOG_FILTER`]).
pub fn init_logging() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| acme::DEFAULT_LOG_FILTER.into()),
        )
        .init();
}
