//! Delta deletion vectors: rows of a data file marked deleted without rewriting the file.
//!
//! A model step that supersedes a few stored rows (an open history version that a change
//! closes, a star row whose inputs changed) marks them in a deletion vector instead of
//! rewriting every file that holds one: the commit removes the file's `add` and adds it again
//! with a vector naming the rows, a Roaring bitmap of row positions in a small file beside the
//! data. The step's cost then follows the rows it changes, not the size of the files that hold
//! them; background compaction later rewrites files whose vectors have grown.
//!
//! The format is the Delta protocol's: a file `deletion_vector_<uuid>.bin` at the table's root
//! that starts with a version byte (1), then per vector its size (4 bytes, big-endian), the
//! portable Roaring magic number (4 bytes, little-endian), the 64-bit Roaring bitmap in its
//! portable serialization, and a CRC-32 (big-endian) of the magic number and the bitmap. Every
//! Delta reader that supports the `deletionVectors` table feature applies them; acme's own
//! readers ([`LayerTable::provider`], [`crate::KeyIndex`]) apply them too.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use deltalake::kernel::{Action, DeletionVectorDescriptor, StorageType};
use deltalake::protocol::DeltaOperation;
use futures::{StreamExt, TryStreamExt};
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use roaring::{RoaringBitmap, RoaringTreemap};

use crate::error::{Error, Result};
use crate::files::DataFile;
use crate::storage::{CommitOutcome, LayerTable, Position};

/// The magic number that starts a vector in the portable Roaring serialization.
const PORTABLE_MAGIC: u32 = 1_681_511_377;

/// Vector files read at once.
const CONCURRENT_READS: usize = 8;

/// The deleted rows of the data files of one table version that have a deletion vector, by
/// [`DataFile::path`].
pub type DeletedRows = HashMap<String, Arc<RoaringBitmap>>;

impl LayerTable {
    /// Whether the table's protocol lets it carry deletion vectors (the `deletionVectors`
    /// reader and writer feature).
    pub fn supports_deletion_vectors(&self) -> bool {
        let Ok(snapshot) = self.delta().snapshot() else {
            return false;
        };
        snapshot
            .protocol()
            .reader_features()
            .is_some_and(|features| features.iter().any(|f| f.to_string() == "deletionVectors"))
    }

    /// Turn on deletion vectors for this table (`delta.enableDeletionVectors`), which upgrades
    /// its protocol to reader version 3 and writer version 7. Readers that predate the feature
    /// refuse the table from then on. Nothing when they are on already.
    pub async fn enable_deletion_vectors(&mut self) -> Result<()> {
        if self.supports_deletion_vectors() {
            return Ok(());
        }
        let properties = HashMap::from([("delta.enableDeletionVectors".to_string(), "true".to_string())]);
        let upgraded = self
            .delta()
            .clone()
            .set_tbl_properties()
            .with_properties(properties)
            .await
            .map_err(Error::delta(self.name(), "enable deletion vectors"))?;
        self.delta = upgraded;
        Ok(())
    }

    /// The rows that deletion vectors mark deleted in `files` (those without a vector are left
    /// out), read from their vector files.
    pub async fn deleted_rows(&self, files: &[DataFile]) -> Result<DeletedRows> {
        let store = self.delta().log_store().object_store(None);
        let table = Arc::<str>::from(self.name());
        let reads: Vec<_> = files
            .iter()
            .filter_map(|file| {
                let descriptor = file.deletion_vector.clone()?;
                let (store, table, path) = (Arc::clone(&store), Arc::clone(&table), file.path.clone());
                Some(async move {
                    let rows = read_vector(store.as_ref(), &table, &path, &descriptor).await?;
                    Ok::<_, Error>((path, Arc::new(rows)))
                })
            })
            .collect();
        futures::stream::iter(reads).buffer_unordered(CONCURRENT_READS).try_collect().await
    }

    /// Mark rows of data files deleted, add `adds`, and record `position` (when given), in one
    /// commit. Each entry names a file of the loaded version and rows of it (positions from 0
    /// in the file's row order) to delete in addition to those its vector marks already. A
    /// file left without rows is removed; the others are added again with a new vector (all of
    /// this commit's vectors in one new vector file). The table must support deletion vectors
    /// ([`LayerTable::enable_deletion_vectors`]).
    pub async fn commit_deletions(
        &mut self,
        deletions: Vec<(DataFile, RoaringBitmap)>,
        adds: Vec<deltalake::kernel::Add>,
        position: Option<&Position>,
    ) -> Result<CommitOutcome> {
        if !deletions.is_empty() && !self.supports_deletion_vectors() {
            return Err(Error::Internal(format!(
                "{}: deletion vectors are not enabled on this table (delta.enableDeletionVectors)",
                self.name()
            )));
        }
        let existing = self.deleted_rows(&deletions.iter().map(|(f, _)| f.clone()).collect::<Vec<_>>()).await?;
        // The marked files' add actions, which the commit repeats with their new vectors (taken
        // from the log here, not kept with every listed file).
        let wanted: std::collections::HashSet<&str> = deletions.iter().map(|(f, _)| f.path.as_str()).collect();
        let snapshot = self.delta().snapshot().map_err(Error::delta(self.name(), "list files"))?;
        #[allow(deprecated)] // the add action is what a deletion-vector commit repeats
        let mut stored: HashMap<String, deltalake::kernel::Add> = snapshot
            .log_data()
            .iter()
            .filter(|f| wanted.contains(f.path().as_ref()))
            .map(|f| (f.path().into_owned(), f.add_action()))
            .collect();
        let now = chrono::Utc::now().timestamp_millis();
        let uuid = uuid::Uuid::new_v4();
        let file_name = format!("deletion_vector_{uuid}.bin");
        let mut vectors: Vec<u8> = vec![1];
        let mut actions = Vec::with_capacity(deletions.len() * 2 + adds.len());
        for (file, mut rows) in deletions {
            if let Some(before) = existing.get(&file.path) {
                rows |= before.as_ref();
            }
            let physical = file.rows.ok_or_else(|| {
                Error::Internal(format!("{}: file {} has no row count in its statistics", self.name(), file.path))
            })?;
            if rows.max().is_some_and(|last| u64::from(last) >= physical) {
                return Err(Error::Internal(format!(
                    "{}: a deletion past the {physical} rows of file {}",
                    self.name(),
                    file.path
                )));
            }
            let mut remove = file.remove.clone();
            remove.data_change = true;
            remove.deletion_timestamp = Some(now);
            actions.push(Action::Remove(remove));
            if rows.len() >= physical {
                continue;
            }
            let offset = vectors.len();
            let size = append_vector(&mut vectors, &rows);
            let mut add = stored.remove(&file.path).ok_or_else(|| {
                Error::Internal(format!("{}: file {} is not in the loaded version", self.name(), file.path))
            })?;
            add.data_change = true;
            add.modification_time = now;
            add.deletion_vector = Some(DeletionVectorDescriptor {
                storage_type: StorageType::UuidRelativePath,
                path_or_inline_dv: z85::encode(uuid.as_bytes()),
                offset: Some(i32::try_from(offset).map_err(|_| Error::Internal("a vector file over 2 GiB".into()))?),
                size_in_bytes: i32::try_from(size).map_err(|_| Error::Internal("a vector over 2 GiB".into()))?,
                cardinality: i64::try_from(rows.len()).unwrap_or(i64::MAX),
            });
            actions.push(Action::Add(add));
        }
        if vectors.len() > 1 {
            let store = self.delta().log_store().object_store(None);
            store.put(&Path::from(file_name.as_str()), PutPayload::from(vectors)).await.map_err(|source| {
                Error::ObjectStore { url: format!("{}/{file_name}", self.delta().table_url()), source }
            })?;
        }
        let files = adds.len();
        actions.extend(adds.into_iter().map(|mut add| {
            add.data_change = true;
            Action::Add(add)
        }));
        self.commit_actions(actions, files, DeltaOperation::Update { predicate: None }, position).await
    }
}

impl DataFile {
    /// The file holding this data file's deletion vector, relative to the table's root
    /// (`None` without a vector, or with one stored inline in the log).
    pub fn vector_file(&self) -> Option<String> {
        let descriptor = self.deletion_vector.as_ref()?;
        vector_location(descriptor).ok().map(|p| p.to_string())
    }
}

/// Append one vector of `rows` to a vector file's bytes; returns its size as the descriptor
/// records it (magic number and bitmap, without the size field and the checksum).
fn append_vector(out: &mut Vec<u8>, rows: &RoaringBitmap) -> usize {
    let mut wide = RoaringTreemap::new();
    wide.extend(rows.iter().map(u64::from));
    let mut body = PORTABLE_MAGIC.to_le_bytes().to_vec();
    wide.serialize_into(&mut body).expect("serializing into memory does not fail");
    out.extend_from_slice(&u32::try_from(body.len()).unwrap_or(u32::MAX).to_be_bytes());
    out.extend_from_slice(&body);
    out.extend_from_slice(&crc32fast::hash(&body).to_be_bytes());
    body.len()
}

/// Read the rows one deletion vector marks, for file `path` of `table` (for messages).
async fn read_vector(
    store: &dyn ObjectStore,
    table: &str,
    path: &str,
    descriptor: &DeletionVectorDescriptor,
) -> Result<RoaringBitmap> {
    let bad = |message: String| Error::DataFile {
        table: table.to_string(),
        file: path.to_string(),
        message: format!("its deletion vector: {message}"),
    };
    let body: Bytes = match descriptor.storage_type {
        StorageType::Inline => {
            Bytes::from(z85::decode(&descriptor.path_or_inline_dv).map_err(|e| bad(format!("not Z85-encoded: {e}")))?)
        }
        StorageType::UuidRelativePath | StorageType::AbsolutePath => {
            let location = vector_location(descriptor).map_err(bad)?;
            let size = usize::try_from(descriptor.size_in_bytes).map_err(|_| bad("a negative size".into()))?;
            let start = u64::try_from(descriptor.offset.unwrap_or(1)).map_err(|_| bad("a negative offset".into()))?;
            let bytes = store
                .get_range(&location, start..start + 4 + size as u64 + 4)
                .await
                .map_err(|e| bad(format!("reading {location}: {e}")))?;
            let stored = u32::from_be_bytes(bytes[0..4].try_into().map_err(|_| bad("truncated".into()))?) as usize;
            if stored != size {
                return Err(bad(format!("{location} says {stored} bytes, the log {size}")));
            }
            let body = bytes.slice(4..4 + size);
            let crc = u32::from_be_bytes(bytes[4 + size..].try_into().map_err(|_| bad("truncated".into()))?);
            if crc != crc32fast::hash(&body) {
                return Err(bad(format!("checksum mismatch in {location}")));
            }
            body
        }
    };
    if body.len() < 4 || u32::from_le_bytes([body[0], body[1], body[2], body[3]]) != PORTABLE_MAGIC {
        return Err(bad("not a portable Roaring bitmap".into()));
    }
    let wide = RoaringTreemap::deserialize_from(&body[4..]).map_err(|e| bad(e.to_string()))?;
    let mut rows = RoaringBitmap::new();
    for row in wide.iter() {
        rows.insert(u32::try_from(row).map_err(|_| bad(format!("row {row} is past any Parquet file acme reads")))?);
    }
    Ok(rows)
}

/// Where a stored vector is, relative to the table's root.
fn vector_location(descriptor: &DeletionVectorDescriptor) -> std::result::Result<Path, String> {
    match descriptor.storage_type {
        StorageType::UuidRelativePath => {
            let encoded = &descriptor.path_or_inline_dv;
            let split = encoded.len().checked_sub(20).ok_or_else(|| format!("a short vector path `{encoded}`"))?;
            let (prefix, id) = encoded.split_at(split);
            let id = z85::decode(id).map_err(|e| format!("vector id `{id}`: {e}"))?;
            let id = uuid::Uuid::from_slice(&id).map_err(|e| format!("vector id: {e}"))?;
            Ok(match prefix {
                "" => Path::from(format!("deletion_vector_{id}.bin")),
                prefix => Path::from(format!("{prefix}/deletion_vector_{id}.bin")),
            })
        }
        StorageType::AbsolutePath => Err(format!(
            "an absolute vector path ({}), which acme does not read: compact the table with its own writer",
            descriptor.path_or_inline_dv
        )),
        StorageType::Inline => Err("an inline vector has no file".into()),
    }
}

/// The rows of a file of `rows` rows that `deleted` leaves, as a Parquet row selection.
pub fn kept_rows(rows: u64, deleted: &RoaringBitmap) -> parquet::arrow::arrow_reader::RowSelection {
    kept_in(deleted, 0, rows).into()
}

/// The rows `start..start + rows` of a file that `deleted` leaves, as row selectors relative
/// to `start`.
pub(crate) fn kept_in(
    deleted: &RoaringBitmap,
    start: u64,
    rows: u64,
) -> Vec<parquet::arrow::arrow_reader::RowSelector> {
    use parquet::arrow::arrow_reader::RowSelector;
    let mut selectors = Vec::new();
    let mut next = 0u64;
    let (low, high) = (u32::try_from(start).unwrap_or(u32::MAX), start.saturating_add(rows));
    for row in deleted.range(low..).map(u64::from).take_while(|r| *r < high) {
        let row = row - start;
        if row > next {
            selectors.push(RowSelector::select((row - next) as usize));
        }
        match selectors.last_mut() {
            Some(last) if last.skip => last.row_count += 1,
            _ => selectors.push(RowSelector::skip(1)),
        }
        next = row + 1;
    }
    if rows > next {
        selectors.push(RowSelector::select((rows - next) as usize));
    }
    selectors
}

/// A scan of files of a table version of which some have deletion vectors: the scan a
/// [`datafusion::datasource::listing::ListingTable`] over the files plans, with each such
/// file's kept rows handed to the Parquet reader as a row selection (so the marked rows are
/// never decoded), and its statistics made inexact (its row count includes the marked rows).
/// The vectors are read at the first scan and kept for the provider's life. A key scan
/// ([`LayerTable::key_scan`]) gives every file's rows to read instead.
#[derive(Debug)]
pub(crate) struct WithDeletions {
    inner: Arc<dyn datafusion::catalog::TableProvider>,
    table: LayerTable,
    /// The files with a vector, by their location in the object store the scan reads.
    files: HashMap<Path, DataFile>,
    kept: tokio::sync::OnceCell<Arc<HashMap<Path, parquet::arrow::arrow_reader::RowSelection>>>,
}

impl WithDeletions {
    /// `inner` scans `files` (all of them, as a listing over their URIs); `locations` gives
    /// each file's location as the listing names it.
    pub(crate) fn new(
        inner: Arc<dyn datafusion::catalog::TableProvider>,
        table: LayerTable,
        files: impl IntoIterator<Item = (Path, DataFile)>,
    ) -> Self {
        let files = files.into_iter().filter(|(_, f)| f.deletion_vector.is_some()).collect();
        Self { inner, table, files, kept: tokio::sync::OnceCell::new() }
    }

    /// `inner` scans files of which only the rows `selections` gives (by each file's location
    /// as the listing names it) are read.
    pub(crate) fn selected(
        inner: Arc<dyn datafusion::catalog::TableProvider>,
        table: LayerTable,
        selections: HashMap<Path, parquet::arrow::arrow_reader::RowSelection>,
    ) -> Self {
        let kept = tokio::sync::OnceCell::new_with(Some(Arc::new(selections)));
        Self { inner, table, files: HashMap::new(), kept }
    }

    async fn kept(&self) -> Result<Arc<HashMap<Path, parquet::arrow::arrow_reader::RowSelection>>> {
        self.kept
            .get_or_try_init(|| async {
                let files: Vec<DataFile> = self.files.values().cloned().collect();
                let deleted = self.table.deleted_rows(&files).await?;
                let mut kept = HashMap::with_capacity(self.files.len());
                for (location, file) in &self.files {
                    let rows = file.rows.ok_or_else(|| Error::DataFile {
                        table: self.table.name().to_string(),
                        file: file.path.clone(),
                        message: "a file with a deletion vector has no row count in its statistics".into(),
                    })?;
                    if let Some(marked) = deleted.get(&file.path) {
                        kept.insert(location.clone(), kept_rows(rows, marked));
                    }
                }
                Ok(Arc::new(kept))
            })
            .await
            .cloned()
    }
}

#[async_trait::async_trait]
impl datafusion::catalog::TableProvider for WithDeletions {
    fn schema(&self) -> arrow::datatypes::SchemaRef {
        self.inner.schema()
    }

    fn table_type(&self) -> datafusion::datasource::TableType {
        self.inner.table_type()
    }

    fn supports_filters_pushdown(
        &self,
        filters: &[&datafusion::logical_expr::Expr],
    ) -> datafusion::error::Result<Vec<datafusion::logical_expr::TableProviderFilterPushDown>> {
        self.inner.supports_filters_pushdown(filters)
    }

    async fn scan(
        &self,
        state: &dyn datafusion::catalog::Session,
        projection: Option<&Vec<usize>>,
        filters: &[datafusion::logical_expr::Expr],
        limit: Option<usize>,
    ) -> datafusion::error::Result<Arc<dyn datafusion::physical_plan::ExecutionPlan>> {
        let plan = self.inner.scan(state, projection, filters, limit).await?;
        self.mark(plan).await
    }

    async fn scan_with_args<'a>(
        &self,
        state: &dyn datafusion::catalog::Session,
        args: datafusion::catalog::ScanArgs<'a>,
    ) -> datafusion::error::Result<datafusion::catalog::ScanResult> {
        let planned = self.inner.scan_with_args(state, args).await?;
        Ok(self.mark(Arc::clone(planned.plan())).await?.into())
    }
}

impl WithDeletions {
    /// `plan` (the listing's scan) with the kept rows of each file that has a vector.
    async fn mark(
        &self,
        plan: Arc<dyn datafusion::physical_plan::ExecutionPlan>,
    ) -> datafusion::error::Result<Arc<dyn datafusion::physical_plan::ExecutionPlan>> {
        use datafusion::common::tree_node::{Transformed, TreeNode};
        use datafusion::datasource::physical_plan::parquet::ParquetRowSelection;
        use datafusion::datasource::physical_plan::{FileScanConfig, FileScanConfigBuilder};
        use datafusion::datasource::source::DataSourceExec;

        let kept = self.kept().await.map_err(|e| datafusion::error::DataFusionError::External(Box::new(e)))?;
        let rewritten = plan.transform_down(|node| {
            let Some(config) = node
                .downcast_ref::<DataSourceExec>()
                .and_then(|exec| exec.data_source().downcast_ref::<FileScanConfig>())
            else {
                return Ok(Transformed::no(node));
            };
            let mut config = config.clone();
            let mut any_marked = false;
            let groups = std::mem::take(&mut config.file_groups)
                .into_iter()
                .map(|mut group| {
                    let statistics = group.statistics_mut().map(|s| s.clone());
                    let mut marked = false;
                    let files = group
                        .into_inner()
                        .into_iter()
                        .map(|mut file| match kept.get(&file.object_meta.location) {
                            Some(selection) => {
                                marked = true;
                                file.statistics = file.statistics.map(|s| Arc::new(s.as_ref().clone().to_inexact()));
                                file.with_extension(ParquetRowSelection::new(selection.clone()))
                            }
                            None => file,
                        })
                        .collect();
                    any_marked |= marked;
                    let group = datafusion::datasource::physical_plan::FileGroup::new(files);
                    match statistics {
                        Some(s) if marked => group.with_statistics(Arc::new(s.to_inexact())),
                        Some(s) => group.with_statistics(Arc::new(s)),
                        None => group,
                    }
                })
                .collect();
            config.file_groups = groups;
            if any_marked {
                // The scan's own statistics (row counts, from the files' footers) count the
                // marked rows: only an upper bound now, which no aggregate answers from.
                let statistics = config.statistics().to_inexact();
                config = FileScanConfigBuilder::from(config).with_statistics(statistics).build();
            }
            Ok(Transformed::yes(DataSourceExec::from_data_source(config) as _))
        })?;
        Ok(rewritten.data)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use parquet::arrow::arrow_reader::RowSelector;

    #[test]
    fn kept_rows_skip_the_deleted_ones() {
        let deleted: RoaringBitmap = [0u32, 1, 5, 9].into_iter().collect();
        let selectors: Vec<RowSelector> = kept_rows(10, &deleted).into();
        assert_eq!(
            selectors,
            vec![
                RowSelector::skip(2),
                RowSelector::select(3),
                RowSelector::skip(1),
                RowSelector::select(3),
                RowSelector::skip(1)
            ]
        );
        let none: Vec<RowSelector> = kept_rows(4, &RoaringBitmap::new()).into();
        assert_eq!(none, vec![RowSelector::select(4)]);
        // Rows 4..8 of the same file: row 5 is deleted.
        assert_eq!(kept_in(&deleted, 4, 4), vec![RowSelector::select(1), RowSelector::skip(1), RowSelector::select(2)]);
    }

    #[test]
    fn a_vector_reads_back_as_written() {
        let rows: RoaringBitmap = [3u32, 70_000, 1 << 20].into_iter().collect();
        let mut file = vec![1u8];
        let size = append_vector(&mut file, &rows);
        assert_eq!(u32::from_be_bytes(file[1..5].try_into().expect("4 bytes")) as usize, size);
        let body = &file[5..5 + size];
        let wide = RoaringTreemap::deserialize_from(&body[4..]).expect("a bitmap");
        assert_eq!(wide.iter().collect::<Vec<_>>(), vec![3, 70_000, 1 << 20]);
        assert_eq!(u32::from_be_bytes(file[5 + size..].try_into().expect("4 bytes")), crc32fast::hash(body));
    }
}
