//! Shared foundation of acme: configuration, errors, the storage layout and the commit
//! protocol every layer uses.
//!
//! Every layer table is a Delta Lake table at `<storage>/<layer>/<table>`, written through one
//! commit path that records the source position (LSN) each commit covers.
//!
//! ```no_run
//! # async fn demo() -> acme_core::Result<()> {
//! use std::sync::Arc;
//! use acme_core::{AcmeConfig, CommitMode, Layer, Position, Storage};
//! use arrow::datatypes::{DataType, Field, Schema};
//!
//! let config = AcmeConfig::builder().storage_url("/tmp/acme-warehouse").build()?;
//! let storage = Storage::new(&config.storage_url, config.storage_options.clone())?;
//! let schema = Schema::new(vec![Field::new("id", DataType::Int64, true)]);
//! let mut table = storage.open_or_create(Layer::Raw, "example", &schema).await?;
//! let writer = table.writer(config.target_file_bytes)?;
//! let files = writer.finish(table.name()).await?;
//! table.commit(files, &Position::new("example-app", 1), CommitMode::Append).await?;
//! assert_eq!(table.position("example-app").await?, Some(1));
//! # Ok(()) }
//! ```

pub mod compact;
pub mod config;
pub mod error;
pub mod failpoint;
pub mod files;
pub mod lookup;
pub mod lsn;
pub mod raw;
pub mod storage;
mod table;
pub mod telemetry;
pub mod vacuum;

pub use compact::{CompactOptions, CompactReport, MergedFiles};
pub use config::{AcmeConfig, AcmeConfigBuilder, CdcMode};
pub use error::{Error, Result};
pub use files::{DataFile, Replace};
pub use lookup::KeyIndex;
pub use lsn::Lsn;
pub use storage::{CommitMode, CommitOutcome, Layer, LayerTable, LayerWriter, Position, Storage};
pub use vacuum::VacuumedTable;

pub use arrow;
pub use deltalake;
