//! The error type of acme-model.

/// Result alias with [`ModelError`] as the default error type.
pub type Result<T, E = ModelError> = std::result::Result<T, E>;

/// What can go wrong while building the model.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ModelError {
    /// The raw layer lacks a table the model needs.
    #[error("raw table `{table}` does not exist: run the snapshot (or `sync`) before building the model")]
    NoRawTable {
        /// The source table.
        table: String,
    },
    /// A table's business key is not a 64-bit integer, which incremental builds need.
    #[error(
        "the key column `{column}` of `{table}` is not a BIGINT; incremental model builds need integer keys (bigint or bigserial)"
    )]
    UnsupportedKey {
        /// `layer/table`.
        table: String,
        /// The key column.
        column: String,
    },
    /// Storage or configuration failed.
    #[error(transparent)]
    Core(#[from] acme_core::Error),
    /// A Delta table could not be read.
    #[error("cannot read Delta table `{table}`")]
    Delta {
        /// `layer/table`.
        table: String,
        /// The cause.
        #[source]
        source: Box<acme_core::deltalake::DeltaTableError>,
    },
    /// A DataFusion plan failed.
    #[error("query engine error while building the model")]
    DataFusion(#[from] Box<datafusion::error::DataFusionError>),
    /// The query engine needed more memory than `memory_limit_bytes` allows and could not
    /// spill the rest (the source names the operators holding the most of it).
    #[error(
        "the model build ran out of its {limit_mib} MiB memory pool: raise `memory_limit_bytes` (sync: \
         `--memory-limit-mib`); a full build of 10M orders needs about 512 MiB"
    )]
    OutOfMemory {
        /// The pool's size, in MiB.
        limit_mib: u64,
        /// DataFusion's error, naming the largest consumers.
        #[source]
        source: Box<datafusion::error::DataFusionError>,
    },
    /// Arrow failed to assemble or convert a batch of a model table.
    #[error("Arrow error while writing `{table}`")]
    Arrow {
        /// The model table (or the key set) being written.
        table: String,
        /// The cause.
        #[source]
        source: arrow::error::ArrowError,
    },
    /// A configured source table has no history declared in the model catalog.
    #[error(
        "source table `{table}` has no history in the model catalog (acme_model::catalog::MODEL): \
         declare one there, or leave the table out of the `tables` setting"
    )]
    NoModelKey {
        /// The source table.
        table: String,
    },
    /// A bug in acme.
    #[error("internal error (a bug in acme, please report it): {0}")]
    Internal(String),
}

impl From<datafusion::error::DataFusionError> for ModelError {
    fn from(e: datafusion::error::DataFusionError) -> Self {
        ModelError::DataFusion(Box::new(e))
    }
}
