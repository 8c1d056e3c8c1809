//! The data files of a loaded table version: listing with their statistics, a pinned
//! DataFusion scan over all of them or a subset, reading one file, and the commit that
//! replaces files (targeted rewrites and compaction).

use std::sync::Arc;

use arrow::datatypes::{DataType, Field, Schema};
use datafusion::catalog::TableProvider;
use datafusion::datasource::empty::EmptyTable;
use datafusion::datasource::file_format::parquet::ParquetFormat;
use datafusion::datasource::listing::{ListingOptions, ListingTable, ListingTableConfig, ListingTableUrl};
use deltalake::kernel::{Action, Add, Remove};
use deltalake::protocol::DeltaOperation;
use futures::StreamExt;
use futures::stream::BoxStream;

use crate::error::{Error, Result};
use crate::storage::{CommitOutcome, LayerTable, Position};

/// One active data file of a table version, with the statistics its Add action carries.
#[derive(Debug, Clone)]
pub struct DataFile {
    /// Path relative to the table's root, as the Delta log names it.
    pub path: String,
    /// Size in bytes.
    pub size: u64,
    /// Rows, when the statistics record them.
    pub rows: Option<u64>,
    /// Location in the table's object store (relative to the table's root).
    pub(crate) location: object_store::path::Path,
    uri: String,
    stats: Option<serde_json::Value>,
    pub(crate) remove: Remove,
    /// The file's deletion vector, when rows of it are marked deleted.
    pub deletion_vector: Option<deltalake::kernel::DeletionVectorDescriptor>,
}

impl DataFile {
    fn stat(&self, kind: &str, column: &str) -> Option<&serde_json::Value> {
        self.stats.as_ref()?.get(kind)?.get(column)
    }

    /// Minimum of an integer column in this file, if recorded.
    pub fn min_i64(&self, column: &str) -> Option<i64> {
        self.stat("minValues", column)?.as_i64()
    }

    /// Maximum of an integer column in this file, if recorded.
    pub fn max_i64(&self, column: &str) -> Option<i64> {
        self.stat("maxValues", column)?.as_i64()
    }

    /// Maximum of a boolean column in this file, if recorded.
    pub fn max_bool(&self, column: &str) -> Option<bool> {
        self.stat("maxValues", column)?.as_bool()
    }

    /// Minimum of a boolean column in this file, if recorded.
    pub fn min_bool(&self, column: &str) -> Option<bool> {
        self.stat("minValues", column)?.as_bool()
    }

    /// Nulls in `column`, if recorded.
    pub fn null_count(&self, column: &str) -> Option<u64> {
        self.stat("nullCount", column)?.as_u64()
    }

    /// True when the statistics prove every value of `column` is at most `bound` (nulls
    /// allowed); false when they do not (including when there are none).
    pub fn all_at_most(&self, column: &str, bound: i64) -> bool {
        match (self.max_i64(column), self.null_count(column), self.rows) {
            (Some(max), _, _) => max <= bound,
            // A column that is null in every row has no maximum.
            (None, Some(nulls), Some(rows)) => nulls == rows,
            _ => false,
        }
    }
}

/// Why files are replaced, which decides how the commit is recorded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Replace {
    /// Rows change: some rows are dropped and others added (a targeted rewrite).
    Rewrite,
    /// The same rows in fewer, larger files: not a data change, and readers of any version
    /// see the same rows.
    Compaction,
}

impl LayerTable {
    /// The active data files of the loaded version.
    pub fn data_files(&self) -> Result<Vec<DataFile>> {
        let snapshot = self.delta().snapshot().map_err(Error::delta(self.name(), "list files"))?;
        let log_store = self.delta().log_store();
        Ok(snapshot
            .log_data()
            .iter()
            .map(|file| {
                let location = file.object_store_path();
                DataFile {
                    path: file.path().into_owned(),
                    size: u64::try_from(file.size()).unwrap_or(0),
                    rows: file.num_records().map(|n| n as u64),
                    uri: log_store.to_uri(&location),
                    location,
                    stats: file.stats().and_then(|s| serde_json::from_str(&s).ok()),
                    remove: file.remove_action(true),
                    deletion_vector: file.deletion_vector_descriptor(),
                }
            })
            .collect())
    }

    /// How many active data files the loaded version has, and their bytes (without reading
    /// their statistics).
    pub fn file_totals(&self) -> Result<(u64, u64)> {
        let snapshot = self.delta().snapshot().map_err(Error::delta(self.name(), "list files"))?;
        Ok(snapshot
            .log_data()
            .iter()
            .fold((0, 0), |(files, bytes), file| (files + 1, bytes + u64::try_from(file.size()).unwrap_or(0))))
    }

    /// A DataFusion table over the given files of the loaded version (all of them when
    /// `files` is `None`), read with DataFusion's Parquet scan: statistics pruning, string
    /// views, and NULL for columns that files written before a schema change lack.
    pub fn provider(&self, files: Option<&[DataFile]>) -> Result<Arc<dyn TableProvider>> {
        self.scan(files, None, self.read_schema()?)
    }

    /// [`LayerTable::provider`] over all files, with strings and binaries as plain arrays
    /// instead of views: for engines that ship batches between processes (a distributed
    /// query's shuffles and results), where a view array sliced out of a large batch would
    /// carry the whole batch's string buffers with it.
    pub fn plain_provider(&self) -> Result<Arc<dyn TableProvider>> {
        self.scan(None, None, self.schema()?)
    }

    /// [`LayerTable::provider`] over all files, keeping the per-file statistics it collects
    /// in `runtime`'s cache. Data files never change once written, so handles that share one
    /// runtime (a warehouse and its refreshed successors) plan queries without re-reading the
    /// footers of the files they already know: only new files are read.
    pub fn cached_provider(
        &self,
        runtime: &datafusion::execution::runtime_env::RuntimeEnv,
    ) -> Result<Arc<dyn TableProvider>> {
        self.scan(None, runtime.cache_manager.get_file_statistic_cache(), self.read_schema()?)
    }

    /// The table's schema as scans read it: strings and binaries as views (Parquet decodes into
    /// them without copying each value).
    pub fn read_schema(&self) -> Result<Arc<Schema>> {
        let stored = self.schema()?;
        Ok(Arc::new(Schema::new(
            stored
                .fields()
                .iter()
                .map(|f| match f.data_type() {
                    DataType::Utf8 | DataType::LargeUtf8 => f.as_ref().clone().with_data_type(DataType::Utf8View),
                    DataType::Binary | DataType::LargeBinary => f.as_ref().clone().with_data_type(DataType::BinaryView),
                    _ => f.as_ref().clone(),
                })
                .collect::<Vec<Field>>(),
        )))
    }

    /// [`LayerTable::provider`] restricted to the rows of `keys` (integers of the key column
    /// `index` was made on), read from the pages that may hold them: the scan reads about as
    /// many pages as there are keys, whatever the table's size. The scan also returns other
    /// rows of those pages, so a query filters on the key as it would on a whole table (a
    /// join on the keys, say). `index` must be of this table's loaded version
    /// ([`LayerTable::key_index`]).
    pub fn key_scan(&self, index: &crate::KeyIndex, keys: &[i64]) -> Result<Arc<dyn TableProvider>> {
        let indexed: std::collections::HashSet<&str> = index.paths().collect();
        let files = self.data_files()?;
        if let Some(file) = files.iter().find(|f| !indexed.contains(f.path.as_str())) {
            return Err(Error::Internal(format!(
                "{}: the key index does not know data file {} (an index of another version)",
                self.name(),
                file.path
            )));
        }
        let selections = index.file_selections(keys);
        let files: Vec<DataFile> = files.into_iter().filter(|f| selections.contains_key(&f.path)).collect();
        self.scan_selected(Some(&files), None, self.read_schema()?, Some(selections))
    }

    fn scan(
        &self,
        files: Option<&[DataFile]>,
        cache: Option<Arc<datafusion::execution::cache::cache_manager::FileStatisticsCache>>,
        schema: Arc<Schema>,
    ) -> Result<Arc<dyn TableProvider>> {
        self.scan_selected(files, cache, schema, None)
    }

    /// [`LayerTable::scan`], reading of each file only the rows `selections` gives for it (by
    /// path; they already leave out the rows a deletion vector marks) when given.
    fn scan_selected(
        &self,
        files: Option<&[DataFile]>,
        cache: Option<Arc<datafusion::execution::cache::cache_manager::FileStatisticsCache>>,
        schema: Arc<Schema>,
        selections: Option<std::collections::HashMap<String, parquet::arrow::arrow_reader::RowSelection>>,
    ) -> Result<Arc<dyn TableProvider>> {
        let all;
        let files = match files {
            Some(files) => files,
            None => {
                all = self.data_files()?;
                &all
            }
        };
        if files.is_empty() {
            return Ok(Arc::new(EmptyTable::new(schema)));
        }
        let query = |source| Error::Query { table: self.name().to_string(), context: "listing files", source };
        let urls = files
            .iter()
            .map(|f| ListingTableUrl::parse(&f.uri).map_err(|e| query(Box::new(e))))
            .collect::<Result<Vec<_>>>()?;
        // Where the listing finds each file, for the files with deletion vectors.
        let marked: Vec<(object_store::path::Path, DataFile)> = urls
            .iter()
            .zip(files)
            .filter(|(_, f)| f.deletion_vector.is_some())
            .map(|(url, f)| (url.prefix().clone(), f.clone()))
            .collect();
        // The rows to read of each file, by its location, for a key scan.
        let given: Option<std::collections::HashMap<_, _>> = selections.map(|mut selections| {
            urls.iter()
                .zip(files)
                .filter_map(|(url, f)| Some((url.prefix().clone(), selections.remove(&f.path)?)))
                .collect()
        });
        let options = ListingOptions::new(Arc::new(ParquetFormat::default())).with_file_extension(".parquet");
        let config = ListingTableConfig::new_with_multi_paths(urls).with_listing_options(options).with_schema(schema);
        let listing = Arc::new(ListingTable::try_new(config).map_err(|e| query(Box::new(e)))?.with_cache(cache));
        if let Some(given) = given {
            return Ok(Arc::new(crate::deletion::WithDeletions::selected(listing, self.clone(), given)));
        }
        if marked.is_empty() {
            return Ok(listing);
        }
        Ok(Arc::new(crate::deletion::WithDeletions::new(listing, self.clone(), marked)))
    }

    /// Stream the rows of one data file, only `columns` when given. `ctx` must be able to
    /// read the table's files (see [`crate::Storage::register_object_store`]). Errors name
    /// the file.
    pub async fn read_file(
        &self,
        ctx: &datafusion::prelude::SessionContext,
        file: &DataFile,
        columns: Option<&[&str]>,
    ) -> Result<BoxStream<'static, Result<arrow::array::RecordBatch>>> {
        let table = self.name().to_string();
        let path = file.path.clone();
        let bad = move |message: String| Error::DataFile { table: table.clone(), file: path.clone(), message };
        let mut df =
            ctx.read_table(self.provider(Some(std::slice::from_ref(file)))?).map_err(|e| bad(e.to_string()))?;
        if let Some(columns) = columns {
            df = df.select_columns(columns).map_err(|e| bad(e.to_string()))?;
        }
        let stream = df.execute_stream().await.map_err(|e| bad(e.to_string()))?;
        Ok(stream.map(move |batch| batch.map_err(|e| bad(e.to_string()))).boxed())
    }

    /// [`LayerTable::read_file`] in the file's own row order: the file is scanned as one
    /// partition (a query engine otherwise splits a large file's scan by byte ranges and
    /// interleaves the parts), for rewrites that keep rows sorted.
    pub async fn read_file_in_order(
        &self,
        ctx: &datafusion::prelude::SessionContext,
        file: &DataFile,
        columns: Option<&[&str]>,
    ) -> Result<BoxStream<'static, Result<arrow::array::RecordBatch>>> {
        let mut state = ctx.state();
        state.config_mut().options_mut().execution.target_partitions = 1;
        let ordered = datafusion::prelude::SessionContext::new_with_state(state);
        self.read_file(&ordered, file, columns).await
    }

    /// Read every data file of the loaded version in full and return the first that cannot
    /// be read, with why (a diagnosis for when a query over the table fails: query engines
    /// report a corrupt file without naming it). Reads the whole table: use it on error paths.
    pub async fn find_unreadable_file(
        &self,
        ctx: &datafusion::prelude::SessionContext,
    ) -> Result<Option<(DataFile, String)>> {
        for file in self.data_files()? {
            let failed = match self.read_file(ctx, &file, None).await {
                Err(e) => Some(e),
                Ok(mut stream) => {
                    let mut failed = None;
                    while let Some(batch) = stream.next().await {
                        if let Err(e) = batch {
                            failed = Some(e);
                            break;
                        }
                    }
                    failed
                }
            };
            if let Some(error) = failed {
                let message = match error {
                    Error::DataFile { message, .. } => message,
                    other => other.to_string(),
                };
                return Ok(Some((file, message)));
            }
        }
        Ok(None)
    }

    /// [`LayerTable::find_unreadable_file`] as an error: [`Error::DataFile`] naming the file.
    pub async fn check_files(&self, ctx: &datafusion::prelude::SessionContext) -> Result<()> {
        match self.find_unreadable_file(ctx).await? {
            None => Ok(()),
            Some((file, message)) => Err(Error::DataFile { table: self.name().to_string(), file: file.path, message }),
        }
    }

    /// Replace `removed` files of the loaded version by `adds` in one atomic commit, with
    /// `position` (when given) recorded as the application transaction.
    ///
    /// Readers of earlier versions keep reading the removed files: nothing is deleted.
    pub async fn commit_replace(
        &mut self,
        removed: &[DataFile],
        mut adds: Vec<Add>,
        position: Option<&Position>,
        kind: Replace,
    ) -> Result<CommitOutcome> {
        let data_change = kind == Replace::Rewrite;
        let now = chrono::Utc::now().timestamp_millis();
        let files = adds.len();
        let mut actions: Vec<Action> = Vec::with_capacity(removed.len() + adds.len());
        actions.extend(removed.iter().map(|file| {
            let mut remove = file.remove.clone();
            remove.data_change = data_change;
            remove.deletion_timestamp = Some(now);
            Action::Remove(remove)
        }));
        for add in &mut adds {
            add.data_change = data_change;
        }
        actions.extend(adds.into_iter().map(Action::Add));
        let operation = match kind {
            Replace::Rewrite => DeltaOperation::Update { predicate: None },
            Replace::Compaction => DeltaOperation::Optimize { predicate: None, target_size: 0 },
        };
        self.commit_actions(actions, files, operation, position).await
    }
}
