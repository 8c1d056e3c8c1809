//! The error type shared by acme's storage layer and configuration.

use deltalake::DeltaTableError;

/// Result alias with [`Error`] as the default error type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What can go wrong in configuration and storage.
///
/// Messages name the table, column, file or setting concerned and say what to do.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A configuration value is invalid.
    #[error("invalid configuration `{setting}`: {message}")]
    Config {
        /// The setting (builder method or option name).
        setting: &'static str,
        /// What is wrong and what is expected.
        message: String,
    },
    /// The storage URL cannot be used.
    #[error("invalid storage URL `{url}`: {message} (use a local path, file:///path or s3://bucket/prefix)")]
    StorageUrl {
        /// The URL as given.
        url: String,
        /// What is wrong.
        message: String,
    },
    /// The object store could not be set up (credentials, endpoint, region).
    #[error("cannot set up object storage for `{url}`; check the AWS_* settings or storage options")]
    ObjectStore {
        /// The storage URL.
        url: String,
        /// The cause.
        #[source]
        source: object_store::Error,
    },
    /// A Delta table operation failed.
    #[error("Delta table `{table}` ({operation}) failed")]
    Delta {
        /// The layer table, as `layer/table`.
        table: String,
        /// What acme was doing.
        operation: &'static str,
        /// The cause.
        #[source]
        source: Box<DeltaTableError>,
    },
    /// The stored table has a schema acme cannot write into.
    #[error("Delta table `{table}` has an incompatible schema: {message}; re-sync into an empty warehouse")]
    SchemaMismatch {
        /// The layer table.
        table: String,
        /// What differs.
        message: String,
    },
    /// Arrow compute or conversion failed.
    #[error("Arrow error while {context}")]
    Arrow {
        /// What acme was doing.
        context: String,
        /// The cause.
        #[source]
        source: arrow::error::ArrowError,
    },
    /// A pipeline metadata document under `_acme/` cannot be read.
    #[error("metadata document `{url}` is corrupt ({message}); delete it and run `sync` again to rewrite it")]
    CorruptMetadata {
        /// The document.
        url: String,
        /// The parse error.
        message: String,
    },
    /// A data file of a table cannot be read (missing, truncated or corrupt).
    #[error(
        "cannot read data file `{file}` of `{table}`: {message}; restore the file, or re-sync the table into an empty warehouse"
    )]
    DataFile {
        /// The layer table.
        table: String,
        /// The file, relative to the table's root.
        file: String,
        /// What failed.
        message: String,
    },
    /// A DataFusion plan over a layer table failed.
    #[error("query over `{table}` failed while {context}")]
    Query {
        /// The layer table.
        table: String,
        /// What acme was doing.
        context: &'static str,
        /// The cause.
        #[source]
        source: Box<datafusion::error::DataFusionError>,
    },
    /// A WAL position (LSN) in text that is not in PostgreSQL's `X/Y` hexadecimal form.
    #[error("`{text}` is not a PostgreSQL WAL position (LSN): expected two hexadecimal numbers as in `16/B374D848`")]
    BadLsn {
        /// The text as given.
        text: String,
    },
    /// A bug in acme: an invariant did not hold. Please report it.
    #[error("internal error (a bug in acme, please report it): {0}")]
    Internal(String),
}

impl Error {
    /// A [`Error::Delta`] for `table`.
    pub fn delta(table: impl Into<String>, operation: &'static str) -> impl FnOnce(DeltaTableError) -> Error {
        let table = table.into();
        move |source| Error::Delta { table, operation, source: Box::new(source) }
    }
}
