//! Errors of the test harness and the workload generator.

/// Result alias of this crate.
pub type Result<T, E = HarnessError> = std::result::Result<T, E>;

/// What can go wrong while starting PostgreSQL or generating ACME data.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HarnessError {
    /// No PostgreSQL server binaries were found.
    #[error(
        "PostgreSQL server binaries (postgres, initdb, pg_ctl) not found: install them \
         (`apt-get install postgresql-15`) or set ACME_PG_BINDIR to their directory"
    )]
    BinariesNotFound,
    /// A command of the harness failed.
    #[error("command failed: {command}\n{output}")]
    Command {
        /// The command line.
        command: String,
        /// What it printed.
        output: String,
    },
    /// The server did not accept connections in time.
    #[error(
        "PostgreSQL did not accept connections on 127.0.0.1:{port} in time; see server.log in the cluster directory"
    )]
    NotReady {
        /// The port it should listen on.
        port: u16,
    },
    /// A file-system or process operation failed.
    #[error("I/O error while {what}")]
    Io {
        /// What the harness was doing.
        what: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Could not connect to the database.
    #[error("cannot connect to {url}")]
    Connect {
        /// The URL (without password).
        url: String,
        /// The cause.
        #[source]
        source: tokio_postgres::Error,
    },
    /// A statement failed.
    #[error("SQL failed: {what}")]
    Sql {
        /// What the statement was for.
        what: String,
        /// The cause.
        #[source]
        source: tokio_postgres::Error,
    },
    /// Bad generator or workload parameters.
    #[error("invalid parameter: {0}")]
    InvalidParameter(String),
}
