//! What can stop a pipeline, and how severe it is (the exit codes of the programs).

use super::*;

/// What can stop a pipeline.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PipelineError {
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] acme_core::Error),
    /// Capture failed in a way retries cannot mend (the error says what to do).
    #[error(transparent)]
    Ingest(#[from] IngestError),
    /// A model build failed (maintenance retries these; this is returned only by `run_once`).
    #[error(transparent)]
    Model(#[from] ModelError),
    /// The warehouse could not be opened or refreshed.
    #[error(transparent)]
    Query(#[from] QueryError),
    /// `verify` could not compare: the warehouse has not reached the source's position.
    #[error(
        "the warehouse is at position {position}, behind the source at {lsn} ({pending} changes to the tables in \
         between, 0 when a running writer did not catch up in time): run `sync` (or let the running one catch up) \
         and verify again"
    )]
    Behind {
        /// The warehouse's raw position (commit LSN).
        position: Lsn,
        /// The source position verify read at.
        lsn: String,
        /// Changes between the two that the warehouse's slot still holds.
        pending: u64,
    },
    /// `verify` cannot compare as things are (the message says why and what to do).
    #[error("verify: {0}")]
    Verify(String),
    /// A pipeline task panicked or could not start (a bug in acme).
    #[error("pipeline task `{task}` failed: {message} (a bug in acme, please report it)")]
    Task {
        /// The task.
        task: &'static str,
        /// What happened.
        message: String,
    },
}

/// What an error asks of whoever runs acme, and the exit code the example programs give it
/// (see [`PipelineError::severity`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    /// The source or the storage is unreachable or failed for now: run again later (exit 75,
    /// `EX_TEMPFAIL`).
    Transient,
    /// Something needs an operator first: a missing slot or privilege, a changed publication,
    /// a damaged file, a memory limit too small. The message says what (exit 78, `EX_CONFIG`).
    NeedsOperator,
    /// The command line or the settings are wrong (exit 2, as for a bad command line).
    Usage,
    /// A bug in acme (exit 70, `EX_SOFTWARE`): please report it.
    Bug,
}

impl Severity {
    /// The process exit code for this severity.
    pub fn exit_code(self) -> u8 {
        match self {
            Severity::Transient => 75,
            Severity::NeedsOperator => 78,
            Severity::Usage => 2,
            Severity::Bug => 70,
        }
    }

    /// The severity of a storage or configuration error.
    pub(crate) fn of_storage(error: &acme_core::Error) -> Self {
        use acme_core::Error as E;
        match error {
            E::Config { .. } | E::StorageUrl { .. } => Severity::Usage,
            E::Delta { .. } | E::Query { .. } => Severity::Transient,
            E::Internal(_) | E::Arrow { .. } => Severity::Bug,
            _ => Severity::NeedsOperator,
        }
    }
}

impl Severity {
    /// The severity of a capture error.
    pub(super) fn of_ingest(error: &IngestError) -> Self {
        if error.is_transient() {
            return Severity::Transient;
        }
        match error {
            IngestError::NoSource
            | IngestError::BadUrl { .. }
            | IngestError::SlotNameChanged { .. }
            | IngestError::PublicationNameChanged { .. } => Severity::Usage,
            IngestError::Storage(e) => Severity::of_storage(e),
            IngestError::Task { .. } | IngestError::Internal(_) | IngestError::Arrow { .. } => Severity::Bug,
            _ => Severity::NeedsOperator,
        }
    }

    /// The severity of a model build error.
    pub(super) fn of_model(error: &ModelError) -> Self {
        match error {
            ModelError::Core(e) => Severity::of_storage(e),
            ModelError::Internal(_) | ModelError::DataFusion(_) => Severity::Bug,
            _ => Severity::NeedsOperator,
        }
    }

    /// The severity of a query (or warehouse refresh) error.
    pub(super) fn of_query(error: &QueryError) -> Self {
        match error {
            QueryError::Core(e) => Severity::of_storage(e),
            QueryError::InvalidParameter { .. } | QueryError::BeforeHistory { .. } => Severity::Usage,
            QueryError::MissingTable { .. } => Severity::NeedsOperator,
            _ => Severity::Bug,
        }
    }

    /// The label of the severity in metrics.
    pub(super) fn label(self) -> &'static str {
        match self {
            Severity::Transient => "transient",
            Severity::NeedsOperator => "needs_operator",
            Severity::Usage => "usage",
            Severity::Bug => "bug",
        }
    }
}

impl PipelineError {
    /// Whether retrying later may succeed, an operator must act first, the settings are wrong,
    /// or acme has a bug.
    pub fn severity(&self) -> Severity {
        match self {
            PipelineError::Config(e) => Severity::of_storage(e),
            PipelineError::Ingest(e) => Severity::of_ingest(e),
            PipelineError::Model(e) => Severity::of_model(e),
            PipelineError::Query(e) => Severity::of_query(e),
            PipelineError::Task { .. } => Severity::Bug,
            PipelineError::Behind { .. } => Severity::Transient,
            PipelineError::Verify(_) => Severity::NeedsOperator,
        }
    }
}

/// Result alias with [`PipelineError`] as the default error type.
pub type Result<T, E = PipelineError> = std::result::Result<T, E>;
