//! Key lookups in a table sorted by an integer key: the rows of a few keys, read from the
//! Parquet pages whose key range holds one of them, instead of a scan of the key column.
//!
//! Model tables are compacted in key order, so each page of the key column covers a narrow
//! key range (its minimum and maximum are in the file's page index). A [`KeyIndex`] keeps, for
//! every file of one table version, the first row and the key range of each key page, and reads
//! only the rows of the pages that may hold a looked-up key: the cost follows the number of
//! keys, not the table's size. Files whose rows are not in key order (small files a step wrote,
//! before compaction) just select more pages; the answer is exact either way, since the rows
//! read are filtered by key.

use std::collections::HashMap;
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray, BooleanArray, RecordBatch, new_null_array};
use arrow::buffer::BooleanBuffer;
use arrow::datatypes::{Int64Type, Schema, SchemaRef};
use arrow::error::ArrowError;
use bytes::Bytes;
use futures::future::BoxFuture;
use futures::{FutureExt, StreamExt, TryStreamExt};
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt};
use parquet::arrow::ProjectionMask;
use parquet::arrow::arrow_reader::{
    ArrowPredicateFn, ArrowReaderMetadata, ArrowReaderOptions, RowFilter, RowSelection, RowSelector,
};
use parquet::arrow::async_reader::{AsyncFileReader, ParquetRecordBatchStreamBuilder};
use parquet::errors::ParquetError;
use parquet::file::metadata::{PageIndexPolicy, ParquetMetaData, ParquetMetaDataBuilder, ParquetMetaDataReader};
use parquet::file::page_index::column_index::ColumnIndexMetaData;

use crate::error::{Error, Result};
use crate::storage::LayerTable;
use crate::task::OwnedTask;

/// Files whose metadata is read at once while an index is built, and files read at once by a
/// lookup (each in a task of its own, so that a lookup decodes on every worker thread).
const CONCURRENT_FILES: usize = 8;

/// The key pages of one row group: `(first row, min key, max key)` per page, in row order.
/// Empty when the file has no page statistics for the key: then the whole row group is read.
#[derive(Debug, Clone)]
struct RowGroupKeys {
    rows: usize,
    pages: Vec<(usize, i64, i64)>,
    /// The row group's key range (from its statistics), when known.
    range: Option<(i64, i64)>,
}

#[derive(Debug, Clone)]
struct IndexedFile {
    location: Path,
    /// Relative to the table's root, for error messages.
    path: String,
    size: u64,
    /// The footer (without the page index, which only the key pages below need).
    metadata: ArrowReaderMetadata,
    /// Leaf index of the key column.
    key_leaf: usize,
    row_groups: Vec<RowGroupKeys>,
    /// Rows a deletion vector marks deleted, which lookups leave out.
    deleted: Option<Arc<roaring::RoaringBitmap>>,
}

/// The key pages of every data file of one loaded table version, for reading the rows of a
/// set of keys. Made by [`LayerTable::key_index`]; data files never change once written, so
/// an index stays valid for that version.
#[derive(Debug, Clone)]
pub struct KeyIndex {
    table: Arc<str>,
    key: Arc<str>,
    store: Arc<dyn ObjectStore>,
    schema: SchemaRef,
    files: Vec<Arc<IndexedFile>>,
}

impl LayerTable {
    /// Index the data files of the loaded version by `key` (an integer column): reads each
    /// file's footer and the page index of the key column.
    pub async fn key_index(&self, key: &str) -> Result<KeyIndex> {
        let table = self.name().to_string();
        let store = self.delta().log_store().object_store(None);
        // Every column nullable: files written before a column was added read it as null.
        let read = self.read_schema()?;
        let schema = Arc::new(Schema::new(
            read.fields().iter().map(|f| f.as_ref().clone().with_nullable(true)).collect::<Vec<_>>(),
        ));
        let files = self.data_files()?;
        let started = std::time::Instant::now();
        let mut deleted = self.deleted_rows(&files).await?;
        let url = self.delta().table_url().to_string();
        let cache_key = (url.clone(), key.to_string());
        let known = indexed_files().lock().map(|c| c.get(&cache_key).cloned().unwrap_or_default()).unwrap_or_default();
        let mut reused = 0usize;
        // (Futures collected first: a stream over a closure that borrows is not provably `Send`.)
        let reads: Vec<_> = files
            .into_iter()
            .map(|file| {
                let marked = deleted.remove(&file.path);
                let hit = known.get(&file.path).filter(|f| f.size == file.size).map(Arc::clone);
                reused += usize::from(hit.is_some());
                let read = (hit.is_none()).then(|| {
                    let file_url = format!("{}/{}", url.trim_end_matches('/'), file.path);
                    index_file(
                        Arc::clone(&store),
                        table.clone(),
                        key.to_string(),
                        file.location,
                        file.path,
                        file.size,
                        file_url,
                    )
                });
                async move {
                    let plain = match (hit, read) {
                        (Some(hit), _) => hit,
                        (None, Some(read)) => Arc::new(spawned(read).await?),
                        (None, None) => unreachable!("a file is either indexed already or read"),
                    };
                    let file = match marked {
                        Some(marked) => Arc::new(IndexedFile { deleted: Some(marked), ..plain.as_ref().clone() }),
                        None => Arc::clone(&plain),
                    };
                    Ok::<_, Error>((plain, file))
                }
            })
            .collect();
        let indexed = futures::stream::iter(reads).buffered(CONCURRENT_FILES).try_collect::<Vec<_>>().await?;
        tracing::debug!(
            table,
            key,
            files = indexed.len(),
            reused,
            ms = started.elapsed().as_millis() as u64,
            "key index made"
        );
        let plain: HashMap<String, Arc<IndexedFile>> =
            indexed.iter().map(|(plain, _)| (plain.path.clone(), Arc::clone(plain))).collect();
        if let Ok(mut cache) = indexed_files().lock() {
            if cache.len() >= CACHED_TABLES && !cache.contains_key(&cache_key) {
                cache.clear();
            }
            cache.insert(cache_key, plain);
        }
        // Footers no index holds any more (their files left every cached index).
        if let Ok(mut footers) = shared_footers().lock() {
            footers.retain(|_, footer| Arc::strong_count(footer.metadata()) > 1);
        }
        let files = indexed.into_iter().map(|(_, file)| file).collect();
        Ok(KeyIndex { table: table.into(), key: key.into(), store, schema, files })
    }
}

/// The key pages of the files indexed so far, by table (its URL) and key column, then by
/// file path, without deletion vectors (which change between versions; a file's pages do not).
/// Each table keeps the files of the version it was last indexed at, so files that compaction
/// removed leave the cache when the table is next indexed, and versions that share files
/// (every step keeps most of them) index only their new ones.
type IndexedFiles = HashMap<(String, String), HashMap<String, Arc<IndexedFile>>>;

/// Tables (with a key) whose files [`indexed_files`] keeps; beyond, it starts over.
const CACHED_TABLES: usize = 64;

fn indexed_files() -> &'static std::sync::Mutex<IndexedFiles> {
    static INDEXED: std::sync::OnceLock<std::sync::Mutex<IndexedFiles>> = std::sync::OnceLock::new();
    INDEXED.get_or_init(Default::default)
}

/// The footers of indexed files (without their column index), by file URL and size, shared by
/// the indexes of each column a file is indexed by: a model build and the live state index
/// `fact_order_items`' files by item id, order id and product id, and a footer is most of what
/// an indexed file holds (its offset index alone is 24 bytes per page and column: 23 KB for a
/// 128k-row file of 15 columns). Footers no index holds any more are dropped as indexes are made.
type SharedFooters = HashMap<(String, u64), ArrowReaderMetadata>;

fn shared_footers() -> &'static std::sync::Mutex<SharedFooters> {
    static FOOTERS: std::sync::OnceLock<std::sync::Mutex<SharedFooters>> = std::sync::OnceLock::new();
    FOOTERS.get_or_init(Default::default)
}

async fn index_file(
    store: Arc<dyn ObjectStore>,
    table: String,
    key: String,
    location: Path,
    path: String,
    size: u64,
    file_url: String,
) -> Result<IndexedFile> {
    let key = key.as_str();
    let bad = |message: String| Error::DataFile { table: table.clone(), file: path.clone(), message };
    let mut reader = FileReader { store, location: location.clone(), size };
    let options = ArrowReaderOptions::new()
        .with_column_index_policy(PageIndexPolicy::Optional)
        .with_offset_index_policy(PageIndexPolicy::Optional);
    let full = ArrowReaderMetadata::load_async(&mut reader, options).await.map_err(|e| bad(e.to_string()))?;
    let parquet = full.metadata();
    let key_leaf = parquet
        .file_metadata()
        .schema_descr()
        .columns()
        .iter()
        .position(|c| c.path().parts() == [key])
        .ok_or_else(|| bad(format!("no key column `{key}`")))?;
    let mut row_groups = Vec::with_capacity(parquet.num_row_groups());
    for (i, group) in parquet.row_groups().iter().enumerate() {
        let rows = usize::try_from(group.num_rows()).unwrap_or(0);
        let range = group.column(key_leaf).statistics().and_then(|s| match s {
            parquet::file::statistics::Statistics::Int64(v) => Some((*v.min_opt()?, *v.max_opt()?)),
            _ => None,
        });
        let column_index = parquet.column_index().and_then(|c| c.get(i)).and_then(|c| c.get(key_leaf));
        let offsets = parquet.offset_index().and_then(|o| o.get(i)).and_then(|o| o.get(key_leaf));
        let mut pages = Vec::new();
        if let (Some(ColumnIndexMetaData::INT64(index)), Some(offsets)) = (column_index, offsets) {
            let locations = offsets.page_locations();
            for (page, location) in locations.iter().enumerate() {
                // A page of nulls only (no bounds) holds no key.
                if let (Some(min), Some(max)) = (index.min_value(page), index.max_value(page)) {
                    pages.push((usize::try_from(location.first_row_index).unwrap_or(0), *min, *max));
                } else {
                    pages.push((usize::try_from(location.first_row_index).unwrap_or(0), 1, 0));
                }
            }
        }
        row_groups.push(RowGroupKeys { rows, pages, range });
    }
    // The reader keeps the offset index (where each page of each column is), so that a lookup
    // fetches only the pages it selects, not whole column chunks; the column index (the
    // pages' statistics) is only needed above.
    let shared_key = (file_url, size);
    let shared = shared_footers().lock().ok().and_then(|footers| footers.get(&shared_key).cloned());
    let metadata = match shared {
        Some(shared) => shared,
        None => {
            let parquet = Arc::clone(parquet);
            drop(full);
            let footer = Arc::try_unwrap(parquet).unwrap_or_else(|shared| shared.as_ref().clone());
            let footer = ParquetMetaDataBuilder::new_from_metadata(footer).set_column_index(None).build();
            let metadata = ArrowReaderMetadata::try_new(Arc::new(footer), ArrowReaderOptions::new())
                .map_err(|e| bad(e.to_string()))?;
            if let Ok(mut footers) = shared_footers().lock() {
                footers.insert(shared_key, metadata.clone());
            }
            metadata
        }
    };
    Ok(IndexedFile { location, path, size, metadata, key_leaf, row_groups, deleted: None })
}

/// Whether a sorted, deduplicated `keys` has a key in `[min, max]`.
fn any_in(keys: &[i64], min: i64, max: i64) -> bool {
    let at = keys.partition_point(|k| *k < min);
    at < keys.len() && keys[at] <= max
}

/// The row groups of a file and their rows that may hold one of `keys`.
fn selection(row_groups: &[RowGroupKeys], keys: &[i64]) -> Option<(Vec<usize>, RowSelection)> {
    let mut groups = Vec::new();
    let mut selectors: Vec<RowSelector> = Vec::new();
    let mut push = |selector: RowSelector| match selectors.last_mut() {
        Some(last) if last.skip == selector.skip => last.row_count += selector.row_count,
        _ => selectors.push(selector),
    };
    for (i, group) in row_groups.iter().enumerate() {
        if group.range.is_some_and(|(min, max)| !any_in(keys, min, max)) || group.rows == 0 {
            continue;
        }
        if group.pages.is_empty() {
            groups.push(i);
            push(RowSelector::select(group.rows));
            continue;
        }
        let mut selected_any = false;
        let mut group_selectors = Vec::new();
        for (p, (first, min, max)) in group.pages.iter().enumerate() {
            let end = group.pages.get(p + 1).map_or(group.rows, |next| next.0);
            let rows = end.saturating_sub(*first);
            let hit = min <= max && any_in(keys, *min, *max);
            selected_any |= hit;
            group_selectors.push(if hit { RowSelector::select(rows) } else { RowSelector::skip(rows) });
        }
        if selected_any {
            groups.push(i);
            for selector in group_selectors {
                push(selector);
            }
        }
    }
    (!groups.is_empty()).then(|| (groups, RowSelection::from(selectors)))
}

impl IndexedFile {
    /// The row groups of the file and their rows that may hold one of `keys` (sorted,
    /// deduplicated), without the rows a deletion vector marks deleted.
    fn select(&self, keys: &[i64]) -> Option<(Vec<usize>, RowSelection)> {
        let (groups, selected) = selection(&self.row_groups, keys)?;
        let Some(deleted) = &self.deleted else {
            return Some((groups, selected));
        };
        let starts = self.group_starts();
        let mut kept = Vec::new();
        for &g in &groups {
            kept.extend(crate::deletion::kept_in(deleted, starts[g], self.row_groups[g].rows as u64));
        }
        let selected = selected.intersection(&RowSelection::from(kept));
        selected.selects_any().then_some((groups, selected))
    }

    /// The first row of each row group, in the file.
    fn group_starts(&self) -> Vec<u64> {
        let mut at = 0u64;
        self.row_groups
            .iter()
            .map(|g| {
                let start = at;
                at += g.rows as u64;
                start
            })
            .collect()
    }

    /// The file positions of the rows `selection` selects over the row groups `groups`, as
    /// runs `(first position, rows)` in order.
    fn selected_runs(&self, groups: &[usize], selection: &RowSelection) -> Vec<(u64, u64)> {
        let starts = self.group_starts();
        // The chosen groups one after the other: (start in that sequence, start in the file, rows).
        let mut spans = Vec::with_capacity(groups.len());
        let mut at = 0u64;
        for &g in groups {
            let rows = self.row_groups[g].rows as u64;
            spans.push((at, starts[g], rows));
            at += rows;
        }
        let mut runs = Vec::new();
        let (mut cursor, mut span) = (0u64, 0usize);
        for selector in selection.iter() {
            let mut left = selector.row_count as u64;
            while left > 0 && span < spans.len() {
                let (seq_start, file_start, rows) = spans[span];
                let in_span = (seq_start + rows - cursor).min(left);
                if !selector.skip {
                    let first = file_start + (cursor - seq_start);
                    match runs.last_mut() {
                        Some((start, len)) if *start + *len == first => *len += in_span,
                        _ => runs.push((first, in_span)),
                    }
                }
                cursor += in_span;
                left -= in_span;
                if cursor == seq_start + rows {
                    span += 1;
                }
            }
        }
        runs
    }
}

impl KeyIndex {
    /// The schema of the rows a lookup returns (the table's, strings as views).
    pub fn schema(&self) -> SchemaRef {
        Arc::clone(&self.schema)
    }

    /// The highest key stored, from the row groups' statistics (`None` when a row group has
    /// none, or when the table is empty).
    pub fn max_key(&self) -> Option<i64> {
        let mut max = None;
        for group in self.files.iter().flat_map(|f| &f.row_groups) {
            if group.rows == 0 {
                continue;
            }
            let (_, hi) = group.range?;
            max = Some(max.map_or(hi, |m: i64| m.max(hi)));
        }
        max
    }

    /// How many rows of the key column a lookup of `keys` reads: the rows of the pages whose key
    /// range holds one of them (the other columns are then read only for the pages, and decoded
    /// only for the rows, that hold a looked-up key).
    pub fn selected_rows(&self, keys: &[i64]) -> usize {
        let mut keys = keys.to_vec();
        keys.sort_unstable();
        keys.dedup();
        self.files.iter().filter_map(|f| f.select(&keys)).map(|(_, s)| s.row_count()).sum()
    }

    /// How many of this index's files hold the same footer in memory as `other`'s file of
    /// the same path (indexes of one table by different columns share them).
    pub fn footers_shared_with(&self, other: &KeyIndex) -> usize {
        self.files
            .iter()
            .filter(|f| {
                other
                    .files
                    .iter()
                    .any(|o| o.path == f.path && Arc::ptr_eq(o.metadata.metadata(), f.metadata.metadata()))
            })
            .count()
    }

    /// Rows in the indexed files.
    pub fn rows_indexed(&self) -> usize {
        self.files.iter().flat_map(|f| &f.row_groups).map(|g| g.rows).sum()
    }

    /// The rows whose key is one of `keys` (in any order, duplicates allowed), in
    /// [`KeyIndex::schema`], reading only the pages that may hold them. With `columns`, only
    /// those columns (the key among them or not).
    pub async fn rows(&self, keys: &[i64], columns: Option<&[&str]>) -> Result<Vec<RecordBatch>> {
        let mut keys = keys.to_vec();
        keys.sort_unstable();
        keys.dedup();
        let schema = match columns {
            None => Arc::clone(&self.schema),
            Some(columns) => {
                let fields = columns
                    .iter()
                    .map(|c| {
                        self.schema
                            .field_with_name(c)
                            .cloned()
                            .map_err(|_| Error::Internal(format!("`{}` has no column `{c}` to look up", self.table)))
                    })
                    .collect::<Result<Vec<_>>>()?;
                Arc::new(Schema::new(fields))
            }
        };
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let keys = Arc::new(KeySet::new(keys));
        let reads: Vec<_> = self
            .selected(&keys)
            .map(|(file, groups, selected)| {
                let read = self.file_read().read(file, groups, selected, Arc::clone(&keys), Arc::clone(&schema));
                // Spawned when the stream below first polls it; aborted if the lookup is dropped.
                spawned(read)
            })
            .collect();
        let batches: Vec<Vec<RecordBatch>> =
            futures::stream::iter(reads).buffer_unordered(CONCURRENT_FILES).try_collect().await?;
        Ok(batches.into_iter().flatten().collect())
    }

    /// Where the rows whose key is one of `keys` are: per data file (by [`crate::DataFile::path`])
    /// their positions in the file's row order, from 0. With `flag`, only rows whose boolean
    /// column `flag` is true. Rows a deletion vector marks deleted are left out. Reads the key
    /// column (and `flag`) of the pages that may hold a key, as [`KeyIndex::rows`] does.
    pub async fn positions(&self, keys: &[i64], flag: Option<&str>) -> Result<Vec<(String, roaring::RoaringBitmap)>> {
        let mut keys = keys.to_vec();
        keys.sort_unstable();
        keys.dedup();
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let keys = Arc::new(KeySet::new(keys));
        let flag: Option<Arc<str>> = flag.map(Arc::from);
        let reads: Vec<_> = self
            .selected(&keys)
            .map(|(file, groups, selected)| {
                spawned(self.file_read().positions(file, groups, selected, Arc::clone(&keys), flag.clone()))
            })
            .collect();
        let found: Vec<Option<(String, roaring::RoaringBitmap)>> =
            futures::stream::iter(reads).buffer_unordered(CONCURRENT_FILES).try_collect().await?;
        Ok(found.into_iter().flatten().collect())
    }

    /// The rows of each file that may hold one of `keys` (without the rows a deletion vector
    /// marks), by [`crate::DataFile::path`], each as a selection over the whole file's rows:
    /// what a scan restricted to the pages of some keys reads ([`LayerTable::key_scan`]).
    pub(crate) fn file_selections(&self, keys: &[i64]) -> HashMap<String, RowSelection> {
        let mut keys = keys.to_vec();
        keys.sort_unstable();
        keys.dedup();
        let mut selections = HashMap::new();
        for file in &self.files {
            let Some((groups, selected)) = file.select(&keys) else { continue };
            let total: u64 = file.row_groups.iter().map(|g| g.rows as u64).sum();
            let mut selectors = Vec::new();
            let mut at = 0u64;
            for (first, rows) in file.selected_runs(&groups, &selected) {
                if first > at {
                    selectors.push(RowSelector::skip((first - at) as usize));
                }
                selectors.push(RowSelector::select(rows as usize));
                at = first + rows;
            }
            if total > at {
                selectors.push(RowSelector::skip((total - at) as usize));
            }
            selections.insert(file.path.clone(), RowSelection::from(selectors));
        }
        selections
    }

    /// The paths of the indexed files.
    pub(crate) fn paths(&self) -> impl Iterator<Item = &str> {
        self.files.iter().map(|f| f.path.as_str())
    }

    /// The files that may hold one of `keys`, each with its row groups and rows to read.
    fn selected<'a>(
        &'a self,
        keys: &'a KeySet,
    ) -> impl Iterator<Item = (Arc<IndexedFile>, Vec<usize>, RowSelection)> + 'a {
        self.files.iter().filter_map(|file| {
            let (groups, selected) = file.select(&keys.sorted)?;
            Some((Arc::clone(file), groups, selected))
        })
    }

    /// What reading a file needs of the index (not its files).
    fn file_read(&self) -> FileRead {
        FileRead { table: Arc::clone(&self.table), key: Arc::clone(&self.key), store: Arc::clone(&self.store) }
    }
}

/// What a lookup's read of one file needs, owned (the read runs in a task of its own).
struct FileRead {
    table: Arc<str>,
    key: Arc<str>,
    store: Arc<dyn ObjectStore>,
}

/// `read` in a task of its own ([`OwnedTask`]): a lookup's files decode on every worker thread.
async fn spawned<T: Send + 'static>(read: impl std::future::Future<Output = Result<T>> + Send + 'static) -> Result<T> {
    OwnedTask::spawn(read).join().await.unwrap_or_else(|| {
        Err(Error::Internal("a key index's read was cancelled: the runtime is shutting down".into()))
    })
}

impl FileRead {
    async fn read(
        self,
        file: Arc<IndexedFile>,
        groups: Vec<usize>,
        selection: RowSelection,
        keys: Arc<KeySet>,
        schema: SchemaRef,
    ) -> Result<Vec<RecordBatch>> {
        let bad = |message: String| Error::DataFile { table: self.table.to_string(), file: file.path.clone(), message };
        let reader = FileReader { store: Arc::clone(&self.store), location: file.location.clone(), size: file.size };
        let parquet_schema = file.metadata.parquet_schema();
        // The wanted columns the file has, and always the key (to filter on).
        let wanted: Vec<usize> = (0..parquet_schema.num_columns())
            .filter(|&i| {
                let name = parquet_schema.column(i).name().to_string();
                i == file.key_leaf || schema.field_with_name(&name).is_ok()
            })
            .collect();
        // The key column of the selected pages is read first; the other columns are then read
        // only for the pages that hold a looked-up key's rows, and decoded only for those rows.
        let key_name = Arc::clone(&self.key);
        let wanted_keys = Arc::clone(&keys);
        let predicate = ArrowPredicateFn::new(ProjectionMask::leaves(parquet_schema, [file.key_leaf]), move |batch| {
            let Some(values) = batch.column(0).as_primitive_opt::<Int64Type>() else {
                return Err(ArrowError::SchemaError(format!("key column `{key_name}` is not a BIGINT")));
            };
            Ok(wanted_keys.mask(values))
        });
        let mut stream = ParquetRecordBatchStreamBuilder::new_with_metadata(reader, file.metadata.clone())
            .with_projection(ProjectionMask::leaves(parquet_schema, wanted))
            .with_row_filter(RowFilter::new(vec![Box::new(predicate)]))
            .with_row_groups(groups)
            .with_row_selection(selection)
            .with_batch_size(8192)
            .build()
            .map_err(|e| bad(e.to_string()))?;
        let mut out = Vec::new();
        while let Some(batch) = stream.next().await {
            let batch = batch.map_err(|e| bad(e.to_string()))?;
            if batch.num_rows() > 0 {
                out.push(conform(&batch, &schema).map_err(|e| bad(e.to_string()))?);
            }
        }
        Ok(out)
    }
}

impl FileRead {
    /// [`KeyIndex::positions`] in one file.
    async fn positions(
        self,
        file: Arc<IndexedFile>,
        groups: Vec<usize>,
        selection: RowSelection,
        keys: Arc<KeySet>,
        flag: Option<Arc<str>>,
    ) -> Result<Option<(String, roaring::RoaringBitmap)>> {
        let bad = |message: String| Error::DataFile { table: self.table.to_string(), file: file.path.clone(), message };
        let reader = FileReader { store: Arc::clone(&self.store), location: file.location.clone(), size: file.size };
        let parquet_schema = file.metadata.parquet_schema();
        let flag_leaf = match &flag {
            None => None,
            Some(name) => Some(
                (0..parquet_schema.num_columns())
                    .find(|&i| parquet_schema.column(i).path().parts() == [name.as_ref()])
                    .ok_or_else(|| bad(format!("no column `{name}`")))?,
            ),
        };
        let mut leaves = vec![file.key_leaf];
        leaves.extend(flag_leaf);
        let runs = file.selected_runs(&groups, &selection);
        let mut stream = ParquetRecordBatchStreamBuilder::new_with_metadata(reader, file.metadata.clone())
            .with_projection(ProjectionMask::leaves(parquet_schema, leaves))
            .with_row_groups(groups)
            .with_row_selection(selection)
            .with_batch_size(8192)
            .build()
            .map_err(|e| bad(e.to_string()))?;
        let mut found = roaring::RoaringBitmap::new();
        let mut runs = runs.into_iter();
        let (mut run_at, mut run_left) = (0u64, 0u64);
        while let Some(batch) = stream.next().await {
            let batch = batch.map_err(|e| bad(e.to_string()))?;
            let key_name = parquet_schema.column(file.key_leaf).name().to_string();
            let values = batch
                .column_by_name(&key_name)
                .and_then(|c| c.as_primitive_opt::<Int64Type>())
                .ok_or_else(|| bad(format!("key column `{}` is not a BIGINT", self.key)))?;
            let hits = keys.mask(values);
            let open = match &flag {
                None => None,
                Some(name) => Some(
                    batch
                        .column_by_name(name)
                        .and_then(|c| c.as_boolean_opt())
                        .ok_or_else(|| bad(format!("column `{name}` is not a BOOLEAN")))?
                        .clone(),
                ),
            };
            for i in 0..batch.num_rows() {
                while run_left == 0 {
                    let (start, len) = runs.next().ok_or_else(|| bad("more rows read than selected".into()))?;
                    (run_at, run_left) = (start, len);
                }
                let position = run_at;
                run_at += 1;
                run_left -= 1;
                let flagged = open.as_ref().is_none_or(|o| o.is_valid(i) && o.value(i));
                if hits.value(i) && flagged {
                    found.insert(u32::try_from(position).map_err(|_| bad(format!("row {position} past 2^32")))?);
                }
            }
        }
        Ok((!found.is_empty()).then(|| (file.path.clone(), found)))
    }
}

/// Looked-up keys, for telling the rows that hold one: sorted (to select pages), and as a
/// bitmap over their range when that range is small enough, so each row read costs one bit
/// test rather than a binary search.
struct KeySet {
    sorted: Vec<i64>,
    /// `(lowest key, one bit per key from it)`.
    bits: Option<(i64, Vec<u64>)>,
}

/// The widest key range a [`KeySet`] holds as a bitmap (8 MiB).
const MAX_BITMAP_KEYS: i64 = 64 << 20;

impl KeySet {
    /// From sorted, deduplicated keys.
    fn new(sorted: Vec<i64>) -> KeySet {
        let bits = match (sorted.first(), sorted.last()) {
            (Some(&lo), Some(&hi)) if hi.checked_sub(lo).is_some_and(|span| span < MAX_BITMAP_KEYS) => {
                let mut bits = vec![0u64; ((hi - lo) as usize >> 6) + 1];
                for k in &sorted {
                    let at = (k - lo) as usize;
                    bits[at >> 6] |= 1 << (at & 63);
                }
                Some((lo, bits))
            }
            _ => None,
        };
        KeySet { sorted, bits }
    }

    /// Whether each value is a looked-up key (a null is not).
    fn mask(&self, values: &arrow::array::Int64Array) -> BooleanArray {
        let raw = values.values();
        let found = match &self.bits {
            Some((lo, bits)) => BooleanBuffer::collect_bool(raw.len(), |i| {
                let at = raw[i].wrapping_sub(*lo) as u64;
                bits.get((at >> 6) as usize).is_some_and(|word| word & (1 << (at & 63)) != 0)
            }),
            None => BooleanBuffer::collect_bool(raw.len(), |i| self.sorted.binary_search(&raw[i]).is_ok()),
        };
        let found = match values.nulls() {
            Some(nulls) => &found & nulls.inner(),
            None => found,
        };
        BooleanArray::new(found, None)
    }
}

/// One data file read through the table's object store, its size known from the Delta log
/// (so the footer is read without a listing or a HEAD request).
struct FileReader {
    store: Arc<dyn ObjectStore>,
    location: Path,
    size: u64,
}

fn store_error(e: object_store::Error) -> ParquetError {
    ParquetError::External(Box::new(e))
}

impl AsyncFileReader for FileReader {
    fn get_bytes(&mut self, range: std::ops::Range<u64>) -> BoxFuture<'_, parquet::errors::Result<Bytes>> {
        async move { self.store.get_range(&self.location, range).await.map_err(store_error) }.boxed()
    }

    fn get_byte_ranges(
        &mut self,
        ranges: Vec<std::ops::Range<u64>>,
    ) -> BoxFuture<'_, parquet::errors::Result<Vec<Bytes>>> {
        async move { self.store.get_ranges(&self.location, &ranges).await.map_err(store_error) }.boxed()
    }

    fn get_metadata<'a>(
        &'a mut self,
        options: Option<&'a ArrowReaderOptions>,
    ) -> BoxFuture<'a, parquet::errors::Result<Arc<ParquetMetaData>>> {
        async move {
            let size = self.size;
            let metadata =
                ParquetMetaDataReader::new().with_arrow_reader_options(options).load_and_finish(self, size).await?;
            Ok(Arc::new(metadata))
        }
        .boxed()
    }
}

/// `batch` in `schema`: columns by name, cast where the file's type differs, null where the
/// file predates the column.
fn conform(batch: &RecordBatch, schema: &SchemaRef) -> std::result::Result<RecordBatch, arrow::error::ArrowError> {
    let columns = schema
        .fields()
        .iter()
        .map(|field| match batch.column_by_name(field.name()) {
            Some(column) if column.data_type() == field.data_type() => Ok(Arc::clone(column)),
            Some(column) => arrow::compute::cast(column, field.data_type()),
            None => Ok(new_null_array(field.data_type(), batch.num_rows())),
        })
        .collect::<std::result::Result<Vec<ArrayRef>, _>>()?;
    RecordBatch::try_new(Arc::clone(schema), columns)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_set_tells_its_keys_with_and_without_a_bitmap() {
        let values =
            arrow::array::Int64Array::from(vec![Some(-5), None, Some(0), Some(7), Some(64), Some(65), Some(i64::MAX)]);
        let expected = vec![true, false, false, true, true, false, false];
        for keys in [vec![-5, 7, 64, 100], vec![-5, 7, 64, i64::MAX - 1]] {
            let set = KeySet::new(keys.clone());
            assert_eq!(set.bits.is_some(), keys[3] == 100);
            let mask: Vec<bool> = set.mask(&values).iter().map(|v| v.expect("no nulls in a mask")).collect();
            assert_eq!(mask, expected, "keys {keys:?}");
        }
    }

    #[test]
    fn keys_in_a_range() {
        let keys = [3, 10, 20];
        assert!(any_in(&keys, 0, 3));
        assert!(any_in(&keys, 11, 20));
        assert!(!any_in(&keys, 11, 19));
        assert!(!any_in(&keys, 21, 30));
        assert!(!any_in(&[], 0, 30));
    }

    #[test]
    fn pages_without_keys_are_skipped() {
        let row_groups = vec![
            RowGroupKeys { rows: 30, pages: vec![(0, 1, 10), (10, 11, 20), (20, 21, 30)], range: Some((1, 30)) },
            RowGroupKeys { rows: 10, pages: vec![(0, 31, 40)], range: Some((31, 40)) },
            RowGroupKeys { rows: 10, pages: Vec::new(), range: None },
        ];
        let (groups, selected) = selection(&row_groups, &[15, 16]).expect("a selection");
        assert_eq!(groups, vec![0, 2]);
        let selectors: Vec<RowSelector> = selected.into();
        assert_eq!(
            selectors,
            vec![RowSelector::skip(10), RowSelector::select(10), RowSelector::skip(10), RowSelector::select(10)]
        );
        assert!(selection(&row_groups[..2], &[50]).is_none());
    }
}
