//! One layer table: its Delta log, its writers, and the one commit path that records the
//! source position each commit covers.

use std::sync::Arc;

use arrow::array::RecordBatch;
use arrow::datatypes::Schema;
use deltalake::kernel::engine::arrow_conversion::TryIntoKernel;
use deltalake::kernel::transaction::{CommitBuilder, CommitProperties};
use deltalake::kernel::{Action, Add, StructType, Transaction};
use deltalake::protocol::{DeltaOperation, SaveMode};
use deltalake::writer::{DeltaWriter, RecordBatchWriter};
use deltalake::{DeltaTable, TableProperty};
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::properties::WriterProperties;

use crate::error::{Error, Result};
use crate::storage::*;

/// One Delta table of a layer.
#[derive(Debug, Clone)]
pub struct LayerTable {
    pub(crate) name: String,
    pub(crate) delta: DeltaTable,
}

impl LayerTable {
    /// `layer/table`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The underlying Delta table.
    pub fn delta(&self) -> &DeltaTable {
        &self.delta
    }

    /// The layer the table belongs to (from its name, `layer/table`).
    pub fn layer(&self) -> Option<Layer> {
        self.name.split('/').next().and_then(Layer::from_dir)
    }

    /// The loaded version of the table.
    pub fn version(&self) -> Option<u64> {
        self.delta.version()
    }

    /// Reload the table's latest state.
    pub async fn refresh(&mut self) -> Result<()> {
        self.delta.update_state().await.map_err(Error::delta(&self.name, "refresh"))
    }

    /// The Arrow schema of the table.
    pub fn schema(&self) -> Result<Arc<Schema>> {
        let snapshot = self.delta.snapshot().map_err(Error::delta(&self.name, "read schema"))?;
        Ok(snapshot.snapshot().arrow_schema())
    }

    /// The last position committed by `app_id`, if any.
    pub async fn position(&self, app_id: &str) -> Result<Option<i64>> {
        let snapshot = self.delta.snapshot().map_err(Error::delta(&self.name, "read position"))?;
        snapshot
            .transaction_version(self.delta.log_store().as_ref(), app_id)
            .await
            .map_err(Error::delta(&self.name, "read position"))
    }

    /// Add nullable columns to the table's schema (one metadata-only commit). Files written
    /// before read the new columns as NULL. Columns the table already has are skipped.
    pub async fn add_columns(&mut self, fields: &[arrow::datatypes::Field]) -> Result<()> {
        let existing = self.schema()?;
        let new: Vec<arrow::datatypes::Field> = fields
            .iter()
            .filter(|f| existing.field_with_name(f.name()).is_err())
            .map(|f| f.clone().with_nullable(true))
            .collect();
        if new.is_empty() {
            return Ok(());
        }
        let kernel: StructType = (&Schema::new(new)).try_into_kernel().map_err(|e| Error::SchemaMismatch {
            table: self.name.clone(),
            message: format!("the new columns have no Delta equivalent: {e}"),
        })?;
        let updated = self
            .delta
            .clone()
            .add_columns()
            .with_fields(kernel.fields().cloned().collect::<Vec<_>>())
            .await
            .map_err(Error::delta(&self.name, "add columns"))?;
        self.delta = updated;
        Ok(())
    }

    /// Give a raw table created by an earlier acme the raw layer's log settings, in one
    /// metadata commit when it lacks any: [`RAW_LOG_RETENTION`], and statistics on
    /// `stats_columns` only (when given; files written before keep theirs).
    pub async fn set_raw_properties(&mut self, stats_columns: Option<Vec<String>>) -> Result<()> {
        let config = self.delta.snapshot().map_err(Error::delta(&self.name, "read properties"))?.table_config();
        let mut missing = std::collections::HashMap::new();
        if config.log_retention_duration.is_none() {
            missing.insert(TableProperty::LogRetentionDuration.as_ref().to_string(), RAW_LOG_RETENTION.to_string());
        }
        if let (None, Some(columns)) = (&config.data_skipping_stats_columns, stats_columns) {
            missing.insert(TableProperty::DataSkippingStatsColumns.as_ref().to_string(), columns.join(","));
        }
        if missing.is_empty() {
            return Ok(());
        }
        let updated = self
            .delta
            .clone()
            .set_tbl_properties()
            .with_properties(missing)
            .await
            .map_err(Error::delta(&self.name, "set the raw layer's table properties"))?;
        self.delta = updated;
        Ok(())
    }

    /// A writer that streams batches into new Parquet files of this table.
    pub fn writer(&self, target_file_bytes: u64) -> Result<LayerWriter> {
        self.writer_compressed(target_file_bytes, layer_compression(self.layer().unwrap_or(Layer::Raw)))
    }

    /// A writer for the change stream's micro-batch files: like [`LayerTable::writer`], but
    /// compressed with LZ4 (`LZ4_RAW`) whatever the layer. Those files are small, read back by
    /// every warehouse refresh while they are the newest of the tail, and merged by compaction
    /// (into the layer's codec) within seconds: zstd's compression and decompression contexts,
    /// made per column chunk, cost more there than its smaller files save (about 6% of the
    /// pipeline's CPU under the SF1 live workload).
    pub fn micro_batch_writer(&self, target_file_bytes: u64) -> Result<LayerWriter> {
        self.writer_compressed(target_file_bytes, Compression::LZ4_RAW)
    }

    fn writer_compressed(&self, target_file_bytes: u64, compression: Compression) -> Result<LayerWriter> {
        let schema = self.schema()?;
        let layer = self.layer().unwrap_or(Layer::Raw);
        let inner = RecordBatchWriter::for_table(&self.delta)
            .map_err(Error::delta(&self.name, "create writer"))?
            .with_target_file_size(target_file_bytes)
            .with_writer_properties(compressed_properties(layer, compression, &schema));
        Ok(LayerWriter { inner, rows: 0, schema, file_rows: None, in_file: 0, done: Vec::new() })
    }

    /// A writer whose files hold at most `file_rows` rows each (and at most about
    /// `target_file_bytes`). Tables whose rows are replaced in place (the model's) keep their
    /// files this small so a targeted rewrite touches few rows.
    pub fn writer_with_file_rows(&self, target_file_bytes: u64, file_rows: u64) -> Result<LayerWriter> {
        let mut writer = self.writer(target_file_bytes)?;
        writer.file_rows = Some(file_rows.max(1));
        Ok(writer)
    }
}

/// Commits between two Delta checkpoints of a layer table. Each commit's update of the
/// table's state replays the log since the last checkpoint, so a longer interval makes every
/// commit dearer: under the SF1 live workload a raw table's commit took 22-27 ms at this
/// interval and 26-48 ms (growing with the commits since the checkpoint) at Delta's default
/// of 100, against 95 ms here and 276 ms there for a commit that writes a checkpoint.
pub const CHECKPOINT_INTERVAL: u64 = 10;

/// How long the log entries of a raw table (`delta.logRetentionDuration`) are kept once a
/// newer checkpoint covers them. The raw layer's history is in its rows (every change with its
/// commit LSN and time), not in its Delta versions, so nothing of acme travels back through
/// them; a reader opening the table reads the newest checkpoint and the commits after it, which
/// stay for at least this long after the next checkpoint. Short, because a raw table commits up
/// to ten versions a second and every commit and every refresh lists its log: at the Delta
/// default (30 days), listing grows with the pipeline's uptime. On this machine's local disk a
/// listing of 600 entries (this retention's worth at that rate) takes 0.6 ms from an offset and
/// 2 ms whole; 12,000 entries (20 minutes' worth) take 10 and 48 ms.
pub const RAW_LOG_RETENTION: &str = "interval 1 minute";

/// Rows per Parquet row group: small enough that a query engine spreads one file over every
/// core (row groups are the unit of parallel scanning), large enough to compress well.
pub const ROW_GROUP_ROWS: usize = 128 * 1024;

/// Rows per Parquet data page (at most). Model tables are stored in key order, and a key
/// lookup ([`crate::KeyIndex`]) reads only the pages whose key range holds a looked-up key:
/// the page is the unit a lookup decodes, so a lookup of `n` keys decodes about `n` times this
/// many rows per column, whatever the table's size (the Parquet default, 20,000, made each
/// lookup of a few hundred keys decode most of a large table).
pub const PAGE_ROWS: usize = 2048;

/// Parquet settings of the files of a table of `layer` with `schema`: page statistics,
/// [`PAGE_ROWS`] rows per page, [`ROW_GROUP_ROWS`] rows per row group, and integer and
/// timestamp columns delta-encoded instead of dictionary-encoded (and, in model tables,
/// dictionaries of at most [`MODEL_DICTIONARY_BYTES`]). Keys, LSNs and timestamps
/// are mostly increasing with many distinct values: delta encoding makes those files about a
/// third smaller and decodes about 20% faster (R3's item scan at SF1: 114 -> 93 ms). Dates,
/// with few distinct values, keep their dictionary.
///
/// The codec follows how a layer is read:
/// - raw files, written once and scanned whole, use zstd level 1 (compact);
/// - model files (intermediate and presentation) use LZ4 (`LZ4_RAW`). The live path reads
///   them by key, a few pages per key from many files, on every step: zstd costs a
///   compression and a decompression context per column chunk read and decompresses about
///   three times slower. At SF1, looking up 287 random fact keys took 134 ms with zstd and
///   40 ms with LZ4, for files 15-25% larger. Every Parquet reader (delta-rs, Spark, DuckDB,
///   Trino) reads `LZ4_RAW`.
pub fn writer_properties(layer: Layer, schema: &Schema) -> WriterProperties {
    compressed_properties(layer, layer_compression(layer), schema)
}

/// The largest dictionary page of a column chunk in a model table (intermediate and
/// presentation layers); past it, the rest of the chunk is written plain. A key lookup
/// ([`crate::KeyIndex`]) that reads one page of a column decodes the chunk's whole dictionary
/// first. At the Parquet default (1 MiB) a column of distinct strings (a customer's name or
/// address) filled it: each lookup decoded about a megabyte of strings per column and row
/// group it touched, most of the lookups' CPU under the SF10 live workload. Columns of few
/// distinct values (a status, a date) keep a dictionary well under this bound.
pub const MODEL_DICTIONARY_BYTES: usize = 32 * 1024;

/// The codec of `layer`'s files (see [`writer_properties`]).
fn layer_compression(layer: Layer) -> Compression {
    match layer {
        Layer::Raw => Compression::ZSTD(ZstdLevel::try_new(1).unwrap_or_default()),
        Layer::Intermediate | Layer::Presentation => Compression::LZ4_RAW,
    }
}

/// [`writer_properties`] with `compression`.
fn compressed_properties(layer: Layer, compression: Compression, schema: &Schema) -> WriterProperties {
    let mut builder = WriterProperties::builder()
        .set_compression(compression)
        .set_max_row_group_row_count(Some(ROW_GROUP_ROWS))
        .set_data_page_row_count_limit(PAGE_ROWS);
    if matches!(layer, Layer::Intermediate | Layer::Presentation) {
        builder = builder.set_dictionary_page_size_limit(MODEL_DICTIONARY_BYTES);
    }
    for field in schema.fields() {
        use arrow::datatypes::DataType as T;
        if matches!(field.data_type(), T::Int32 | T::Int64 | T::UInt32 | T::UInt64 | T::Timestamp(_, _)) {
            let column = parquet::schema::types::ColumnPath::from(field.name().as_str());
            builder = builder
                .set_column_dictionary_enabled(column.clone(), false)
                .set_column_encoding(column, parquet::basic::Encoding::DELTA_BINARY_PACKED);
        }
    }
    builder.build()
}

/// What a commit did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CommitOutcome {
    /// A new table version holding the data and the position.
    Committed {
        /// The new Delta version.
        version: u64,
        /// Files added.
        files: usize,
    },
    /// The position was already stored: nothing was written (exactly-once on replay).
    AlreadyCommitted,
}

/// Whether a commit appends files or replaces every file of the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CommitMode {
    /// Add the new files to the table.
    Append,
    /// Remove every active file and add the new ones (a full rewrite, e.g. a re-run snapshot).
    ReplaceAll,
}

impl LayerTable {
    /// Commit `adds` and `position` atomically as one new table version: the one commit path
    /// of every layer. When `position` is already stored, nothing is committed.
    pub async fn commit(&mut self, adds: Vec<Add>, position: &Position, mode: CommitMode) -> Result<CommitOutcome> {
        self.refresh().await?;
        self.commit_as_only_writer(adds, position, mode).await
    }

    /// [`LayerTable::commit`] for the table's only writer, whose loaded version is the latest
    /// (the change stream's raw tables): the log is not listed first. Should another writer
    /// have committed meanwhile, the commit finds its version taken and is retried on top of
    /// the newer ones after Delta's conflict check (which refuses a second writer of the same
    /// position's application), as with any concurrent commit.
    pub async fn commit_as_only_writer(
        &mut self,
        adds: Vec<Add>,
        position: &Position,
        mode: CommitMode,
    ) -> Result<CommitOutcome> {
        let files = adds.len();
        let mut actions: Vec<Action> = Vec::with_capacity(files);
        if mode == CommitMode::ReplaceAll {
            let snapshot = self.delta.snapshot().map_err(Error::delta(&self.name, "commit"))?;
            actions.extend(snapshot.log_data().iter().map(|file| Action::Remove(file.remove_action(true))));
        }
        actions.extend(adds.into_iter().map(Action::Add));
        let operation = DeltaOperation::Write {
            mode: match mode {
                CommitMode::Append => SaveMode::Append,
                CommitMode::ReplaceAll => SaveMode::Overwrite,
            },
            partition_by: None,
            predicate: None,
        };
        self.commit_actions(actions, files, operation, Some(position)).await
    }

    /// Commit `actions` on the loaded version as one new table version, with `position` (when
    /// given) as the application transaction; nothing when that position is already stored.
    /// `files` is the number of files the actions add.
    pub(crate) async fn commit_actions(
        &mut self,
        actions: Vec<Action>,
        files: usize,
        operation: DeltaOperation,
        position: Option<&Position>,
    ) -> Result<CommitOutcome> {
        // Expired log entries are cleaned up with each checkpoint, not at every commit: the
        // clean-up lists the whole log, and it removes entries only up to a checkpoint. (Delta
        // checkpoints after version `v` when `v + 1` is a multiple of the interval.)
        let next = self.version().map_or(0, |v| v + 1);
        let mut properties =
            CommitProperties::default().with_cleanup_expired_logs(Some((next + 1).is_multiple_of(CHECKPOINT_INTERVAL)));
        if let Some(position) = position {
            if let Some(stored) = self.position(&position.app_id).await?
                && stored >= position.version
            {
                return Ok(CommitOutcome::AlreadyCommitted);
            }
            properties = properties.with_application_transaction(Transaction::new(&position.app_id, position.version));
        }
        let snapshot = self.delta.snapshot().map_err(Error::delta(&self.name, "commit"))?;
        let started = std::time::Instant::now();
        let finalized = CommitBuilder::from(properties)
            .with_actions(actions)
            .build(Some(snapshot), self.delta.log_store(), operation)
            .await
            .map_err(Error::delta(&self.name, "commit"))?;
        let version = finalized.version();
        tracing::trace!(
            table = %self.name,
            version,
            ms = started.elapsed().as_millis() as u64,
            checkpoint = finalized.metrics.new_checkpoint_created,
            logs_removed = finalized.metrics.num_log_files_cleaned_up,
            "delta commit built"
        );
        self.delta.state = Some(finalized.snapshot());
        crate::committed::remember(&self.delta);
        Ok(CommitOutcome::Committed { version, files })
    }
}

/// Streams record batches into Parquet files of one layer table; nothing is visible to
/// readers until the files are committed with [`LayerTable::commit`].
pub struct LayerWriter {
    inner: RecordBatchWriter,
    rows: u64,
    schema: Arc<Schema>,
    /// Cut files at this many rows.
    file_rows: Option<u64>,
    /// Rows in the open file.
    in_file: u64,
    /// Files already finished.
    done: Vec<Add>,
}

impl std::fmt::Debug for LayerWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LayerWriter").field("rows", &self.rows).finish()
    }
}

impl LayerWriter {
    /// Stream one batch into the open file (a new file starts at the target size).
    ///
    /// Columns are matched to the table by name, so a batch may list them in another order;
    /// columns the batch lacks are written as NULL, and columns of another type (a string
    /// view for a string, say) are cast to the table's type.
    pub async fn write(&mut self, table_name: &str, batch: RecordBatch) -> Result<()> {
        let batch = align_batch(&self.schema, table_name, batch)?;
        self.rows += batch.num_rows() as u64;
        let Some(limit) = self.file_rows else {
            return self.inner.write(batch).await.map_err(Error::delta(table_name, "write"));
        };
        let mut offset = 0usize;
        while offset < batch.num_rows() {
            let room = usize::try_from(limit - self.in_file).unwrap_or(usize::MAX);
            let take = room.min(batch.num_rows() - offset);
            self.inner.write(batch.slice(offset, take)).await.map_err(Error::delta(table_name, "write"))?;
            offset += take;
            self.in_file += take as u64;
            if self.in_file >= limit {
                let files = self.inner.flush().await.map_err(Error::delta(table_name, "finish a file"))?;
                self.done.extend(files);
                self.in_file = 0;
            }
        }
        Ok(())
    }

    /// The columns of the files this writer writes (the table's, in its order).
    pub fn schema(&self) -> &Arc<Schema> {
        &self.schema
    }

    /// Rows written so far.
    pub fn rows(&self) -> u64 {
        self.rows
    }

    /// Finish the open files and return their Add actions, ready for [`LayerTable::commit`].
    pub async fn finish(mut self, table_name: &str) -> Result<Vec<Add>> {
        let mut files = std::mem::take(&mut self.done);
        files.extend(self.inner.flush().await.map_err(Error::delta(table_name, "finish files"))?);
        Ok(files)
    }
}

/// `batch` with the columns of `schema` (a table's): matched by name, cast to the table's
/// types, NULL where the batch lacks a column. [`LayerWriter::write`] does this to every batch.
pub fn align_batch(schema: &Arc<Schema>, table_name: &str, batch: RecordBatch) -> Result<RecordBatch> {
    if batch.schema().fields() == schema.fields() {
        return Ok(batch);
    }
    let columns = schema
        .fields()
        .iter()
        .map(|field| match batch.schema().index_of(field.name()) {
            Ok(i) if batch.column(i).data_type() == field.data_type() => Ok(Arc::clone(batch.column(i))),
            Ok(i) => arrow::compute::cast(batch.column(i), field.data_type()),
            Err(_) => Ok(arrow::array::new_null_array(field.data_type(), batch.num_rows())),
        })
        .collect::<std::result::Result<Vec<_>, _>>();
    let error = |source| Error::Arrow { context: format!("matching a batch to the columns of {table_name}"), source };
    RecordBatch::try_new(Arc::clone(schema), columns.map_err(error)?).map_err(error)
}
