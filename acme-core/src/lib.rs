//! Shared foundation of acme: configuration, errors, the storage layout and the commit
//! protocol every layer uses.
//!
//! Every layer table is a Delta Lake table at `<storage>/<layer>/<table>`, written through one
//! commit path that records the source position (LSN) each commit covers.
//!
//! ```
//! # #[tokio::main] async fn main() -> acme_core::Result<()> {
//! use std::sync::Arc;
//! use acme_core::{AcmeConfig, CommitMode, Layer, Position, Storage};
//! use arrow::array::{Int64Array, RecordBatch};
//! use arrow::datatypes::{DataType, Field, Schema};
//!
//! let dir = tempfile::tempdir().expect("a temporary directory");
//! let config = AcmeConfig::builder().storage_url(dir.path().to_str().expect("a UTF-8 path")).build()?;
//! let storage = Storage::new(&config.storage_url, config.storage_options.clone())?;
//! let schema = Arc::new(Schema::new(vec![Field::new("id", DataType::Int64, true)]));
//! let mut table = storage.open_or_create(Layer::Raw, "example", &schema).await?;
//! assert_eq!(table.position("example-app").await?, None);
//!
//! // Write a batch and commit it with the source position it covers.
//! let batch = RecordBatch::try_new(schema, vec![Arc::new(Int64Array::from(vec![1, 2, 3]))]).expect("a batch");
//! let mut writer = table.writer(config.target_file_bytes)?;
//! writer.write(table.name(), batch).await?;
//! let files = writer.finish(table.name()).await?;
//! table.commit(files, &Position::new("example-app", 42), CommitMode::Append).await?;
//! assert_eq!(table.position("example-app").await?, Some(42));
//! # Ok(()) }
//! ```

mod committed;
pub mod compact;
pub mod config;
pub mod deletion;
pub mod error;
pub mod failpoint;
pub mod files;
pub mod lookup;
pub mod lsn;
pub mod raw;
pub mod storage;
mod table;
pub mod task;
pub mod telemetry;
pub mod vacuum;

pub use compact::{CompactOptions, CompactReport, MergedFiles, Tiering};
pub use config::{AcmeConfig, AcmeConfigBuilder, CdcMode};
pub use error::{Error, Result};
pub use files::{DataFile, Replace};
pub use lookup::KeyIndex;
pub use lsn::Lsn;
pub use storage::{CommitMode, CommitOutcome, Layer, LayerTable, LayerWriter, Position, Storage};
pub use vacuum::VacuumedTable;

pub use arrow;
pub use deltalake;
