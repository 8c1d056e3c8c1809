//! acme-ingest: PostgreSQL snapshot and change data capture into Arrow, and the raw layer.
//!
//! The snapshot copies the source tables at one consistent instant with binary `COPY`,
//! decoding straight into Arrow builders, and commits them to the raw layer's Delta tables
//! with the source LSN they stand at.
//!
//! ```no_run
//! # async fn demo() -> Result<(), acme_ingest::IngestError> {
//! use acme_core::AcmeConfig;
//! let config = AcmeConfig::builder()
//!     .source_url("postgres://postgres@127.0.0.1:5432/finance_db")
//!     .storage_url("/tmp/acme-warehouse")
//!     .build()?;
//! let report = acme_ingest::Snapshot::new(config).await?;
//! println!("snapshot at {}: {} tables", report.lsn, report.tables.len());
//! # Ok(()) }
//! ```
//!
//! Connection strings are parsed as libpq parses them, and never printed with their password:
//!
//! ```
//! let url = acme_ingest::SourceUrl::parse("postgres://app:secret@db.internal:5433/finance_db")?;
//! assert_eq!(url.to_string(), "app@db.internal:5433/finance_db");
//! assert!(!format!("{url:?}").contains("secret"));
//! # Ok::<(), acme_ingest::IngestError>(())
//! ```
//!
//! After the snapshot, [`ChangeStream`] follows the source: by logical decoding (`pgoutput`
//! over the replication protocol, the default, or polled by SQL) or, where logical
//! replication is not allowed, by audit triggers writing a changelog table
//! ([`acme_core::CdcMode::Triggers`], see [`triggers`]). Either way the raw layer receives
//! every change exactly once.
//!
//! ```no_run
//! # async fn demo() -> Result<(), acme_ingest::IngestError> {
//! use acme_core::{AcmeConfig, CdcMode};
//! let config = AcmeConfig::builder()
//!     .source_url("postgres://app_owner@db.internal/finance_db")
//!     .storage_url("/tmp/acme-warehouse")
//!     .cdc_mode(CdcMode::Triggers)
//!     .build()?;
//! let mut stream = acme_ingest::ChangeStream::open(config).await?;
//! let report = stream.catch_up().await?;
//! println!("{} changes committed to the raw layer", report.changes);
//! # Ok(()) }
//! ```

pub mod cdc;
mod changes;
pub mod copy;
mod decode;
pub mod error;
mod pgoutput;
pub mod replication;
pub mod snapshot;
pub mod source;
pub mod teardown;
mod tls;
pub mod triggers;
mod types;

pub use acme_core::Lsn;
pub use cdc::{CaptureEvent, ChangeStream, PollReport};
pub use error::{IngestError, Result};
pub use snapshot::{Snapshot, SnapshotPoint, SnapshotProgress, SnapshotReport, TableSnapshot};
pub use source::{SourceTable, SourceUrl};
pub use teardown::{Teardown, teardown};
