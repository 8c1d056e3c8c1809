//! The error type of acme-ingest.

use tokio_postgres::error::SqlState;

/// Result alias with [`IngestError`] as the default error type.
pub type Result<T, E = IngestError> = std::result::Result<T, E>;

/// What can go wrong while reading the source and writing the raw layer.
///
/// Messages name the table, column, setting or slot concerned and say what to do.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IngestError {
    /// No source URL was configured.
    #[error("no source database: set `source_url` (postgres://user:password@host:port/database)")]
    NoSource,
    /// The source URL does not parse.
    #[error("invalid source URL ({message}); expected postgres://user:password@host:port/database")]
    BadUrl {
        /// What is wrong (never the password).
        message: String,
    },
    /// Cannot connect to the source.
    #[error("cannot connect to PostgreSQL at {target}: check host, port, user, password and database")]
    Connect {
        /// host:port/database (never the password).
        target: String,
        /// The cause.
        #[source]
        source: tokio_postgres::Error,
    },
    /// The server's TLS certificate was refused (`sslmode=verify-ca` or `verify-full`). Not
    /// cured by retrying: the URL's host, `sslrootcert` or the server's certificate must change.
    #[error("refused the TLS certificate of PostgreSQL at {target} (sslmode={mode}): {problem}")]
    Certificate {
        /// host:port/database (never the password).
        target: String,
        /// The mode that checked the certificate.
        mode: crate::tls::SslMode,
        /// What is wrong with it, and what to check.
        problem: String,
    },
    /// A source statement failed.
    #[error("PostgreSQL error while {context}")]
    Source {
        /// What acme was doing.
        context: String,
        /// The cause.
        #[source]
        source: tokio_postgres::Error,
    },
    /// A configured table does not exist.
    #[error("source table {table} does not exist (or is not visible to this user); check `tables` and `schema`")]
    MissingTable {
        /// Qualified table name.
        table: String,
    },
    /// A table has no columns acme can read.
    #[error("source table {table} has no columns")]
    NoColumns {
        /// Qualified table name.
        table: String,
    },
    /// A column type has no exact Arrow counterpart.
    #[error(
        "unsupported column type: {table}.{column} is {type_name}; acme copies int2/4/8, float4/8, numeric, bool, \
         text/varchar/char, date, timestamp(tz), time, uuid, json(b) and bytea: exclude the table or change the column"
    )]
    UnsupportedType {
        /// Qualified table name.
        table: String,
        /// Column name.
        column: String,
        /// The PostgreSQL type.
        type_name: String,
    },
    /// A numeric value does not fit its Decimal128 column.
    #[error("value {value} of {table}.{column} cannot be stored exactly: {message}")]
    NumericOutOfRange {
        /// Qualified table name.
        table: String,
        /// Column name.
        column: String,
        /// The value as text.
        value: String,
        /// Why.
        message: String,
    },
    /// The wire data of a value is malformed.
    #[error("malformed value in {table}.{column}: {message}")]
    BadValue {
        /// Qualified table name.
        table: String,
        /// Column name.
        column: String,
        /// What is wrong.
        message: String,
    },
    /// The binary COPY stream is malformed.
    #[error("malformed COPY data for {table}: {message}")]
    BadCopy {
        /// Qualified table name.
        table: String,
        /// What is wrong.
        message: String,
    },
    /// The replication-protocol connection failed.
    #[error("replication connection to {target} failed: {message}")]
    Replication {
        /// host:port/database (never the password).
        target: String,
        /// What went wrong (the server's message and detail, when it sent an error).
        message: String,
        /// The server's SQLSTATE, when it sent an error.
        code: Option<SqlState>,
    },
    /// The connection to the source broke or the server is shutting down or restarting.
    #[error("lost the connection to {target} ({message}); acme reconnects by itself when streaming")]
    Disconnected {
        /// Host and database (no password).
        target: String,
        /// What happened.
        message: String,
    },
    /// A pgoutput or replication-protocol message could not be decoded.
    #[error("malformed logical replication message: {message}")]
    BadMessage {
        /// What is wrong.
        message: String,
    },
    /// A table does not send whole old rows.
    #[error(
        "source table {table} does not have REPLICA IDENTITY FULL, so updates and deletes would lose the old row: \
         run `ALTER TABLE {table} REPLICA IDENTITY FULL`"
    )]
    ReplicaIdentity {
        /// Qualified table name.
        table: String,
    },
    /// The user may not use logical replication.
    #[error(
        "user {user} lacks the REPLICATION privilege needed for change data capture: \
         run `ALTER ROLE {user} REPLICATION` as a superuser"
    )]
    NoReplicationPrivilege {
        /// The user name.
        user: String,
    },
    /// The source server is older than acme's logical stream supports.
    #[error(
        "the source runs PostgreSQL {version}; acme's logical stream needs 14 or later (pgoutput's binary and \
         messages options): upgrade the server, or capture with the trigger fallback (`--cdc-mode triggers`)"
    )]
    ServerTooOld {
        /// The server's version.
        version: String,
    },
    /// The server is not configured for logical decoding.
    #[error("the source runs with wal_level={actual}; set wal_level=logical in postgresql.conf and restart it")]
    WalLevel {
        /// The configured level.
        actual: String,
    },
    /// The replication slot the raw layer depends on is gone.
    #[error(
        "replication slot {slot} is missing or invalidated, so changes since the last commit cannot be read: \
         re-sync by removing the warehouse's raw, intermediate and presentation layers and running again"
    )]
    SlotLost {
        /// The slot name.
        slot: String,
    },
    /// The replication slot exists but cannot serve this warehouse.
    #[error("replication slot {slot} {reason}")]
    SlotUnusable {
        /// The slot name.
        slot: String,
        /// Why, and what to do.
        reason: String,
    },
    /// The warehouse's own records are missing or unreadable.
    #[error("the warehouse's {what}: re-sync into an empty warehouse")]
    WarehouseDamaged {
        /// What is missing or unreadable.
        what: String,
    },
    /// The warehouse was synced through another slot than the configured one.
    #[error(
        "this warehouse was synced through replication slot {stored}, not {configured}: its data is intact; to \
         continue, set the slot back to {stored} (config `slot`, `--slot {stored}`)"
    )]
    SlotNameChanged {
        /// The slot the warehouse records.
        stored: String,
        /// The slot configured now.
        configured: String,
    },
    /// The warehouse streams through another publication than the configured one.
    #[error(
        "this warehouse streams through publication {stored}, not {configured}: its data is intact; to continue, \
         set the publication back to {stored} (config `publication`, `--publication {stored}`)"
    )]
    PublicationNameChanged {
        /// The publication the warehouse records.
        stored: String,
        /// The publication configured now.
        configured: String,
    },
    /// The slot is in use by a running process, so it cannot be removed.
    #[error(
        "replication slot {slot} is in use by server process {pid} (a running acme streams from it): stop that \
         process first, then run teardown again"
    )]
    SlotActive {
        /// The slot name.
        slot: String,
        /// The server process that holds it.
        pid: i32,
    },
    /// The slot exists but this warehouse did not create it.
    #[error(
        "replication slot {slot} already exists and this warehouse did not create it (another warehouse may \
         depend on it): set another slot name (config `slot`), or drop it with \
         `SELECT pg_drop_replication_slot('{slot}')` if nothing uses it"
    )]
    SlotInUse {
        /// The slot name.
        slot: String,
    },
    /// The publication does not cover a table.
    #[error(
        "publication {publication} does not publish {table}: run `ALTER PUBLICATION {publication} ADD TABLE {table}`"
    )]
    NotPublished {
        /// The publication.
        publication: String,
        /// Qualified table name.
        table: String,
    },
    /// A table was removed from the publication while acme streamed it.
    #[error(
        "publication {publication} stopped publishing {table} while acme was streaming it, so its changes since \
         then were not captured: run `ALTER PUBLICATION {publication} ADD TABLE {table}`, then re-sync by \
         removing the warehouse's raw, intermediate and presentation layers and running again"
    )]
    PublicationChanged {
        /// The publication.
        publication: String,
        /// Qualified table name.
        table: String,
    },
    /// The trigger fallback cannot install its changelog or triggers.
    #[error(
        "cannot install the capture triggers ({message}): the trigger fallback needs a user that owns the source \
         tables (or holds TRIGGER on them) and may CREATE in the database (for schema acme_cdc)"
    )]
    CapturePrivilege {
        /// The server's message.
        message: String,
    },
    /// The trigger fallback could not lock the source tables to create its triggers: writers
    /// held them all the time.
    #[error(
        "cannot install the capture triggers: the tables {tables} were never free of writers long enough to lock \
         them ({lock_ms} ms at a time, tried for {tried_secs} s); run acme again when the source is less busy"
    )]
    CaptureBusy {
        /// The tables, quoted.
        tables: String,
        /// Longest wait of one attempt, in milliseconds.
        lock_ms: u64,
        /// How long attempts were made, in seconds.
        tried_secs: u64,
    },
    /// A capture trigger of the trigger fallback was dropped or disabled while acme ran.
    #[error(
        "the capture trigger of {table} was dropped or disabled, so changes to it may have been missed: re-sync by \
         removing the warehouse's raw, intermediate and presentation layers and running again (acme reinstalls \
         the triggers)"
    )]
    CaptureTriggerMissing {
        /// Qualified table name.
        table: String,
    },
    /// The warehouse was filled by another capture method than the one configured.
    #[error(
        "the warehouse was filled by {stored}, but `cdc_mode` now asks for {configured}: capture methods cannot be \
         switched on one warehouse; set `cdc_mode` back, or re-sync into an empty warehouse"
    )]
    CaptureMethodChanged {
        /// The method that filled the warehouse.
        stored: String,
        /// The configured method.
        configured: String,
    },
    /// A storage operation failed.
    #[error(transparent)]
    Storage(#[from] acme_core::Error),
    /// Arrow failed to assemble a batch.
    #[error("Arrow error while building a batch of {table}")]
    Arrow {
        /// Qualified table name.
        table: String,
        /// The cause.
        #[source]
        source: arrow::error::ArrowError,
    },
    /// A task acme runs (a snapshot worker, a background merge) panicked or was cancelled.
    #[error("a pipeline task stopped unexpectedly while {doing}")]
    Task {
        /// What the task was doing.
        doing: &'static str,
        /// The task's failure.
        #[source]
        source: tokio::task::JoinError,
    },
    /// A bug in acme.
    #[error("internal error (a bug in acme, please report it): {0}")]
    Internal(String),
}

impl IngestError {
    /// The SQLSTATE the source server answered with, when this error is the server's.
    pub fn sqlstate(&self) -> Option<&SqlState> {
        match self {
            IngestError::Connect { source, .. } | IngestError::Source { source, .. } => source.code(),
            IngestError::Replication { code, .. } => code.as_ref(),
            _ => None,
        }
    }

    /// True for failures that a reconnect can cure: a broken connection, a server that shut
    /// down, restarts or terminated the backend. Everything else (privileges, missing slot,
    /// bad data) needs the user and is reported as it is.
    pub fn is_transient(&self) -> bool {
        match self {
            IngestError::Disconnected { .. } => true,
            IngestError::Connect { source, .. } | IngestError::Source { source, .. } => match source.code() {
                None => {
                    source.is_closed()
                        || std::error::Error::source(source).is_some_and(|cause| cause.is::<std::io::Error>())
                }
                Some(code) => reconnect_cures(code),
            },
            _ => false,
        }
    }
}

/// Whether a server error of this SQLSTATE is cured by reconnecting: class 08 (the connection
/// failed) and class 57P (the server shut down, restarts, or terminated the backend).
pub(crate) fn reconnect_cures(code: &SqlState) -> bool {
    let code = code.code();
    code.starts_with("08") || code.starts_with("57P")
}
