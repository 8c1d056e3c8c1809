//! Targeted rewrites: replace the rows of some keys of a model table by newly computed rows,
//! rewriting only the files that hold those rows.
//!
//! A model table is keyed by a business key (a `BIGINT`). An incremental step computes the new
//! rows of the keys its changes touch; the files holding the old rows of those keys are found
//! from their statistics and their key column, rewritten without those rows, and removed in the
//! same Delta commit that adds the new rows and records the position. Files that hold none of
//! the keys are left alone, and readers of earlier versions keep reading the old files.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use acme_core::storage::align_batch;
use acme_core::{CommitOutcome, DataFile, LayerTable, LayerWriter, Position, Replace};
use arrow::array::{Array, AsArray, BooleanArray, RecordBatch};
use arrow::compute::{SortOptions, filter_record_batch, not};
use arrow::datatypes::{Int64Type, SchemaRef};
use datafusion::error::DataFusionError;
use datafusion::execution::SendableRecordBatchStream;
use datafusion::execution::memory_pool::MemoryConsumer;
use datafusion::physical_expr::expressions::Column;
use datafusion::physical_expr::{LexOrdering, PhysicalSortExpr};
use datafusion::physical_plan::metrics::{BaselineMetrics, ExecutionPlanMetricsSet};
use datafusion::physical_plan::sorts::streaming_merge::StreamingMergeBuilder;
use datafusion::physical_plan::stream::{RecordBatchReceiverStream, RecordBatchStreamAdapter};
use datafusion::prelude::{DataFrame, SessionContext};
use futures::StreamExt;

use crate::error::{ModelError, Result};

/// The keys whose rows a step replaces.
#[derive(Debug, Clone)]
pub(crate) enum Keys {
    /// Every row: the step recomputes the whole table.
    All,
    /// The rows of these keys.
    Set(HashSet<i64>),
}

/// Which rows of a table a step replaces: the rows whose `key` is in `keys`, and (for a
/// history) only the open versions, flagged by the boolean column `open`.
#[derive(Debug, Clone)]
pub(crate) struct Target<'a> {
    pub key: &'a str,
    /// The column the table is stored in order of (its sort's first column): a rewrite
    /// writes kept and new rows merged in this order.
    pub order: &'a str,
    pub keys: Keys,
    pub open: Option<&'a str>,
}

impl Target<'_> {
    /// Rows of `batch` that the step replaces.
    fn replaced(&self, table: &str, batch: &RecordBatch) -> Result<BooleanArray> {
        replaced_rows(table, self.key, &self.keys, self.open, batch)
    }

    /// Files of the loaded version that may hold replaced rows, by their statistics alone: a
    /// file is a candidate when one of the keys falls inside its key range (and, for a
    /// history, when it holds open versions).
    fn candidates(&self, files: Vec<DataFile>) -> Vec<DataFile> {
        let sorted: Option<Vec<i64>> = match &self.keys {
            Keys::All => None,
            Keys::Set(set) => {
                let mut keys: Vec<i64> = set.iter().copied().collect();
                keys.sort_unstable();
                Some(keys)
            }
        };
        files
            .into_iter()
            .filter(|f| self.open.is_none_or(|open| f.max_bool(open) != Some(false)))
            .filter(|f| match (&sorted, f.min_i64(self.key), f.max_i64(self.key)) {
                (Some(keys), Some(min), Some(max)) => {
                    let first = keys.partition_point(|k| *k < min);
                    first < keys.len() && keys[first] <= max
                }
                _ => true,
            })
            .collect()
    }
}

/// Rows of `batch` whose `key` is in `keys` and (with an `open` column) that are open.
fn replaced_rows(table: &str, key: &str, keys: &Keys, open: Option<&str>, batch: &RecordBatch) -> Result<BooleanArray> {
    let open = match open {
        Some(column) => Some(
            batch
                .column_by_name(column)
                .and_then(|c| c.as_boolean_opt())
                .ok_or_else(|| ModelError::Internal(format!("{table}: no boolean column {column}")))?
                .clone(),
        ),
        None => None,
    };
    let values = batch
        .column_by_name(key)
        .and_then(|c| c.as_primitive_opt::<Int64Type>())
        .ok_or_else(|| ModelError::UnsupportedKey { table: table.to_string(), column: key.to_string() })?;
    let mut out = Vec::with_capacity(batch.num_rows());
    for i in 0..batch.num_rows() {
        let open_row = open.as_ref().is_none_or(|o| o.is_valid(i) && o.value(i));
        let matched = match keys {
            Keys::All => true,
            Keys::Set(set) => values.is_valid(i) && set.contains(&values.value(i)),
        };
        out.push(open_row && matched);
    }
    Ok(BooleanArray::from(out))
}

/// Writes rows into one or two sets of files: with a `split` column, rows where it is true
/// go to other files than the rest (open and closed history versions live apart, so the
/// next rewrite of open versions leaves the closed ones alone).
pub(crate) struct SplitWriter {
    table: String,
    split: Option<String>,
    yes: LayerWriter,
    no: Option<LayerWriter>,
}

impl SplitWriter {
    pub fn new(table: &LayerTable, split: Option<&str>, target_file_bytes: u64, file_rows: u64) -> Result<Self> {
        Ok(Self {
            table: table.name().to_string(),
            split: split.map(str::to_string),
            yes: table.writer_with_file_rows(target_file_bytes, file_rows)?,
            no: match split {
                Some(_) => Some(table.writer_with_file_rows(target_file_bytes, file_rows)?),
                None => None,
            },
        })
    }

    pub async fn write(&mut self, batch: RecordBatch) -> Result<()> {
        if batch.num_rows() == 0 {
            return Ok(());
        }
        let (Some(column), Some(no)) = (&self.split, self.no.as_mut()) else {
            return Ok(self.yes.write(&self.table, batch).await?);
        };
        let flag = batch
            .column_by_name(column)
            .and_then(|c| c.as_boolean_opt())
            .ok_or_else(|| ModelError::Internal(format!("{}: no boolean column {column}", self.table)))?;
        // Nulls count as false.
        let yes_mask = match flag.nulls() {
            Some(_) => arrow::compute::prep_null_mask_filter(flag),
            None => flag.clone(),
        };
        let no_mask = not(&yes_mask).map_err(arrow_error(&self.table))?;
        let yes = filter_record_batch(&batch, &yes_mask).map_err(arrow_error(&self.table))?;
        let rest = filter_record_batch(&batch, &no_mask).map_err(arrow_error(&self.table))?;
        if rest.num_rows() > 0 {
            no.write(&self.table, rest).await?;
        }
        if yes.num_rows() > 0 {
            self.yes.write(&self.table, yes).await?;
        }
        Ok(())
    }

    /// The table's columns, which the written batches are given.
    pub fn schema(&self) -> SchemaRef {
        Arc::clone(self.yes.schema())
    }

    pub fn rows(&self) -> u64 {
        self.yes.rows() + self.no.as_ref().map_or(0, |w| w.rows())
    }

    pub async fn finish(self) -> Result<Vec<deltalake::kernel::Add>> {
        let mut adds = self.yes.finish(&self.table).await?;
        if let Some(no) = self.no {
            adds.extend(no.finish(&self.table).await?);
        }
        Ok(adds)
    }
}

fn arrow_error(table: &str) -> impl Fn(arrow::error::ArrowError) -> ModelError + '_ {
    move |source| ModelError::Arrow { table: table.to_string(), source }
}

/// What one replacement did.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Replaced {
    /// New rows written.
    pub rows: u64,
    /// Files rewritten (removed, their other rows written again).
    pub files_rewritten: usize,
    /// Rows written again from rewritten files.
    pub rows_kept: u64,
    /// Files whose replaced rows were marked in a deletion vector.
    pub files_marked: usize,
    /// Rows so marked.
    pub rows_marked: u64,
}

/// Replace the rows `target` names by the rows of `new_rows`, committing at `position`.
///
/// With [`Keys::All`] every file is replaced. With a set of keys and `marks` on a table that
/// supports deletion vectors, the replaced rows are marked in vectors and the new rows
/// appended ([`mark_and_append`]); otherwise the files holding replaced rows are rewritten.
/// Memory stays bounded: files and new rows are streamed batch by batch into the writer.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn replace(
    ctx: &SessionContext,
    table: &mut LayerTable,
    target: &Target<'_>,
    new_rows: DataFrame,
    split: Option<&str>,
    files: (u64, u64),
    position: &Position,
    marks: bool,
) -> Result<Replaced> {
    if let Keys::Set(keys) = &target.keys
        && marks
        && table.supports_deletion_vectors()
    {
        return mark_and_append(table, target, keys, new_rows, split, files, position).await;
    }
    let (target_file_bytes, file_rows) = files;
    let name = table.name().to_string();
    let started = std::time::Instant::now();
    let files = table.data_files()?;
    let file_count = files.len();
    // The files to rewrite, and whether each keeps any rows.
    let mut touched: Vec<(DataFile, bool)> = Vec::new();
    match (&target.keys, target.open) {
        (Keys::All, None) => touched.extend(files.into_iter().map(|f| (f, false))),
        _ => {
            for file in target.candidates(files) {
                let mut columns = vec![target.key];
                columns.extend(target.open);
                let mut stream = table.read_file(ctx, &file, Some(&columns)).await?;
                let (mut hit, mut all) = (false, true);
                while let Some(batch) = stream.next().await {
                    let mask = target.replaced(&name, &batch?)?;
                    hit |= mask.true_count() > 0;
                    all &= mask.false_count() == 0;
                }
                if hit {
                    touched.push((file, !all));
                }
            }
        }
    }
    let scanned = started.elapsed();
    let mut writer = SplitWriter::new(table, split, target_file_bytes, file_rows)?;
    let mut replaced = Replaced { files_rewritten: touched.len(), ..Replaced::default() };
    let kept = Arc::new(AtomicU64::new(0));
    // Written sorted by the table's order column, so that each file and each page covers a
    // narrow key range, which is what key lookups read (a statement's own order, after joins
    // and repartitions, interleaves the whole key range in every page). The engine drops the
    // sort where the statement already sorts so (the star tables'), and spills to disk beyond
    // its memory pool.
    let new_rows = new_rows.sort(vec![datafusion::prelude::ident(target.order).sort(true, true)])?;
    if matches!((&target.keys, target.open), (Keys::All, None)) {
        // The whole table recomputed.
        let mut stream = new_rows.execute_stream().await?;
        while let Some(batch) = stream.next().await {
            writer.write(batch?).await?;
        }
    } else {
        // The kept rows of the rewritten files and the new rows, merged in key order, so that
        // the files written hold narrow key ranges and so do their pages (which key lookups
        // read).
        let schema = writer.schema();
        let source = Arc::new(KeptRows {
            table: table.clone(),
            ctx: ctx.clone(),
            key: target.key.to_string(),
            keys: target.keys.clone(),
            open: target.open.map(str::to_string),
            schema: Arc::clone(&schema),
            kept: Arc::clone(&kept),
        });
        let files: Vec<DataFile> = touched.iter().filter(|(_, keeps)| *keeps).map(|(f, _)| f.clone()).collect();
        let mut inputs: Vec<SendableRecordBatchStream> =
            chains(files, |f| (f.min_i64(target.order), f.max_i64(target.order)))
                .into_iter()
                .map(|chain| source.stream(chain))
                .collect();
        let stream = new_rows.execute_stream().await?;
        let (aligned, table_name) = (Arc::clone(&schema), name.clone());
        let stream =
            stream.map(move |batch| batch.and_then(|b| align_batch(&aligned, &table_name, b).map_err(external)));
        inputs.push(Box::pin(RecordBatchStreamAdapter::new(Arc::clone(&schema), stream)));
        let mut merged = merge(ctx, inputs, &schema, &name, target.order)?;
        while let Some(batch) = merged.next().await {
            writer.write(batch?).await?;
        }
    }
    replaced.rows_kept = kept.load(Ordering::Relaxed);
    replaced.rows = writer.rows() - replaced.rows_kept;
    let adds = writer.finish().await?;
    tracing::debug!(
        table = %name,
        files = file_count,
        touched = touched.len(),
        rows_kept = replaced.rows_kept,
        rows_new = replaced.rows,
        find_ms = scanned.as_millis() as u64,
        write_ms = (started.elapsed() - scanned).as_millis() as u64,
        peak_rss_mib = peak_rss_mib(),
        "replaced rows"
    );
    let removed: Vec<DataFile> = touched.into_iter().map(|(f, _)| f).collect();
    acme_core::failpoint::hit(if table.name().ends_with(crate::tables::AGG_ORDERS_BY_DELIVERY_DATE) {
        "model.aggregate"
    } else {
        "model.step"
    });
    match table.commit_replace(&removed, adds, Some(position), Replace::Rewrite).await? {
        CommitOutcome::Committed { .. } => Ok(replaced),
        CommitOutcome::AlreadyCommitted => Ok(Replaced::default()),
    }
}

/// [`replace`] by deletion vectors: find the stored rows of `keys` (the open ones, for a
/// history) through the table's key index, write the new rows as new files, and commit both
/// at once: each file holding replaced rows gains a vector naming them, and no stored row is
/// written again. The cost follows the keys, not the files that hold them.
async fn mark_and_append(
    table: &mut LayerTable,
    target: &Target<'_>,
    keys: &HashSet<i64>,
    new_rows: DataFrame,
    split: Option<&str>,
    files: (u64, u64),
    position: &Position,
) -> Result<Replaced> {
    let (target_file_bytes, file_rows) = files;
    let name = table.name().to_string();
    let started = std::time::Instant::now();
    let keys: Vec<i64> = keys.iter().copied().collect();
    let index = table.key_index(target.key).await?;
    let found = index.positions(&keys, target.open).await?;
    let stored: std::collections::HashMap<String, DataFile> =
        table.data_files()?.into_iter().map(|f| (f.path.clone(), f)).collect();
    let mut marked_rows = 0u64;
    let mut deletions = Vec::with_capacity(found.len());
    for (path, rows) in found {
        let file = stored
            .get(&path)
            .cloned()
            .ok_or_else(|| ModelError::Internal(format!("{name}: indexed file {path} is not in the table")))?;
        marked_rows += rows.len();
        deletions.push((file, rows));
    }
    let scanned = started.elapsed();
    // Written sorted by the table's order column, as every model file is (see `replace`).
    let new_rows = new_rows.sort(vec![datafusion::prelude::ident(target.order).sort(true, true)])?;
    let mut writer = SplitWriter::new(table, split, target_file_bytes, file_rows)?;
    let mut stream = new_rows.execute_stream().await?;
    while let Some(batch) = stream.next().await {
        writer.write(batch?).await?;
    }
    let replaced = Replaced {
        rows: writer.rows(),
        files_marked: deletions.len(),
        rows_marked: marked_rows,
        ..Replaced::default()
    };
    let adds = writer.finish().await?;
    tracing::debug!(
        table = %name,
        files_marked = deletions.len(),
        rows_marked = marked_rows,
        rows_new = replaced.rows,
        find_ms = scanned.as_millis() as u64,
        write_ms = (started.elapsed() - scanned).as_millis() as u64,
        "marked and appended rows"
    );
    acme_core::failpoint::hit("model.step");
    match table.commit_deletions(deletions, adds, Some(position)).await? {
        CommitOutcome::Committed { .. } => Ok(replaced),
        CommitOutcome::AlreadyCommitted => Ok(Replaced::default()),
    }
}

/// Most sorted inputs a rewrite merges at once (each holds a file open and a few batches).
const MERGE_INPUTS: usize = 16;

/// The files a rewrite keeps rows of, in chains whose files follow each other in key order
/// (each file's range after the previous one's), fewest chains first found greedily by each
/// file's smallest key; `range` gives a file's smallest and largest key, when recorded. Files
/// written by earlier rewrites are sorted and cover disjoint ranges, so a rewrite merges few
/// chains. Beyond [`MERGE_INPUTS`] chains, a file joins the chain that ends lowest: the rows are
/// all written either way, only less sorted.
fn chains<F>(mut files: Vec<F>, range: impl Fn(&F) -> (Option<i64>, Option<i64>)) -> Vec<Vec<F>> {
    files.sort_by_key(|f| range(f).0.unwrap_or(i64::MIN));
    // Each chain's files and its largest key so far (`None`: unknown, nothing may follow).
    let mut chains: Vec<(Option<i64>, Vec<F>)> = Vec::new();
    for file in files {
        let (min, max) = range(&file);
        let free = min.and_then(|min| chains.iter().position(|(end, _)| end.is_some_and(|end| end < min)));
        let slot = match free {
            Some(i) => {
                chains[i].0 = max;
                i
            }
            None if chains.len() < MERGE_INPUTS => {
                chains.push((max, Vec::new()));
                chains.len() - 1
            }
            None => {
                let lowest = (0..chains.len()).min_by_key(|i| chains[*i].0.unwrap_or(i64::MAX)).unwrap_or(0);
                chains[lowest].0 = chains[lowest].0.zip(max).map(|(a, b)| a.max(b));
                lowest
            }
        };
        chains[slot].1.push(file);
    }
    chains.into_iter().map(|(_, files)| files).collect()
}

/// What a task streaming the kept rows of a chain of files needs.
struct KeptRows {
    table: LayerTable,
    ctx: SessionContext,
    key: String,
    keys: Keys,
    open: Option<String>,
    /// The table's columns, which every merged input has.
    schema: SchemaRef,
    /// Rows kept so far, over every chain.
    kept: Arc<AtomicU64>,
}

impl KeptRows {
    /// The rows `files` keep, file after file in their order, read and filtered in a task of
    /// their own (so that chains decode on every core while the merge runs).
    fn stream(self: &Arc<Self>, files: Vec<DataFile>) -> SendableRecordBatchStream {
        let mut builder = RecordBatchReceiverStream::builder(Arc::clone(&self.schema), 2);
        let tx = builder.tx();
        let source = Arc::clone(self);
        builder.spawn(async move {
            for file in files {
                let mut stream = source.table.read_file_in_order(&source.ctx, &file, None).await.map_err(external)?;
                while let Some(batch) = stream.next().await {
                    let kept = source.keep(batch.map_err(external)?).map_err(external)?;
                    if kept.num_rows() == 0 {
                        continue;
                    }
                    if tx.send(Ok(kept)).await.is_err() {
                        // The merge stopped (an error elsewhere, or the step was dropped).
                        return Ok(());
                    }
                }
            }
            Ok(())
        });
        builder.build()
    }

    /// The rows of `batch` the step does not replace, with the table's columns.
    fn keep(&self, batch: RecordBatch) -> Result<RecordBatch> {
        let name = self.table.name();
        let mask = replaced_rows(name, &self.key, &self.keys, self.open.as_deref(), &batch)?;
        let kept = filter_record_batch(&batch, &not(&mask).map_err(arrow_error(name))?).map_err(arrow_error(name))?;
        self.kept.fetch_add(kept.num_rows() as u64, Ordering::Relaxed);
        Ok(align_batch(&self.schema, name, kept)?)
    }
}

/// Merge streams of rows of `table`, each sorted by the integer column `key`, into one stream
/// sorted by it.
fn merge(
    ctx: &SessionContext,
    mut inputs: Vec<SendableRecordBatchStream>,
    schema: &SchemaRef,
    table: &str,
    key: &str,
) -> Result<SendableRecordBatchStream> {
    if inputs.len() == 1 {
        return Ok(inputs.remove(0));
    }
    let column =
        Column::new(key, schema.index_of(key).map_err(|source| ModelError::Arrow { table: table.into(), source })?);
    let order = PhysicalSortExpr::new(Arc::new(column), SortOptions { descending: false, nulls_first: true });
    let ordering = LexOrdering::new([order]).ok_or_else(|| ModelError::Internal("an empty merge order".into()))?;
    let reservation = MemoryConsumer::new("model rewrite merge").register(&ctx.runtime_env().memory_pool);
    Ok(StreamingMergeBuilder::new()
        .with_streams(inputs)
        .with_schema(Arc::clone(schema))
        .with_expressions(&ordering)
        .with_metrics(BaselineMetrics::new(&ExecutionPlanMetricsSet::new(), 0))
        .with_batch_size(ctx.state().config().batch_size())
        .with_reservation(reservation)
        .build()?)
}

/// An error of a rewrite's input, as the query engine carries it through the merge.
fn external(error: impl Into<ModelError>) -> DataFusionError {
    DataFusionError::External(Box::new(error.into()))
}

/// Collect the distinct `BIGINT` keys a query returns, or `None` when there are more than
/// `limit` (the caller then recomputes the whole table instead).
pub(crate) async fn collect_keys(df: DataFrame, limit: usize) -> Result<Option<HashSet<i64>>> {
    let mut keys = HashSet::new();
    let mut stream = df.execute_stream().await?;
    while let Some(batch) = stream.next().await {
        let batch = batch?;
        keys.extend(key_column(&batch, "the changed keys")?.iter().flatten());
        if keys.len() > limit {
            return Ok(None);
        }
    }
    Ok(Some(keys))
}

/// The first column of `batch`, an integer key, as `BIGINT` values (`table` names it in an
/// error).
pub(crate) fn key_column(batch: &RecordBatch, table: &str) -> Result<arrow::array::Int64Array> {
    let values = arrow::compute::cast(batch.column(0), &arrow::datatypes::DataType::Int64)
        .map_err(|source| ModelError::Arrow { table: table.to_string(), source })?;
    Ok(values.as_primitive::<Int64Type>().clone())
}

/// Register `keys` as a one-column table `name(k BIGINT)`.
pub(crate) fn register_keys(ctx: &SessionContext, name: &str, keys: &HashSet<i64>) -> Result<()> {
    let schema = Arc::new(arrow::datatypes::Schema::new(vec![arrow::datatypes::Field::new(
        "k",
        arrow::datatypes::DataType::Int64,
        false,
    )]));
    let values: Vec<i64> = keys.iter().copied().collect();
    let batch = RecordBatch::try_new(Arc::clone(&schema), vec![Arc::new(arrow::array::Int64Array::from(values))])
        .map_err(|source| ModelError::Arrow { table: name.to_string(), source })?;
    let _ = ctx.deregister_table(name)?;
    ctx.register_batch(name, batch)?;
    Ok(())
}

/// Peak resident memory of this process so far, in MiB (Linux; 0 elsewhere), for the debug log.
fn peak_rss_mib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("VmHWM:")).map(str::to_string))
        .and_then(|l| l.split_whitespace().nth(1).and_then(|kb| kb.parse::<u64>().ok()))
        .map_or(0, |kb| kb / 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chained(ranges: &[(Option<i64>, Option<i64>)]) -> Vec<Vec<usize>> {
        chains((0..ranges.len()).collect(), |i| ranges[*i])
    }

    #[test]
    fn files_in_disjoint_ranges_make_one_chain_in_key_order() {
        let ranges = [(Some(20), Some(29)), (Some(0), Some(9)), (Some(10), Some(19))];
        assert_eq!(chained(&ranges), vec![vec![1, 2, 0]]);
    }

    #[test]
    fn overlapping_files_go_to_separate_chains_each_in_key_order() {
        // Two generations of files over the same keys, and one file without statistics.
        let ranges =
            [(Some(0), Some(9)), (Some(10), Some(19)), (Some(5), Some(14)), (Some(15), Some(30)), (None, None)];
        let chains = chained(&ranges);
        assert_eq!(chains.len(), 3, "{chains:?}");
        for chain in &chains {
            for pair in chain.windows(2) {
                let (before, after) = (ranges[pair[0]], ranges[pair[1]]);
                assert!(before.1 < after.0, "{chains:?}");
            }
        }
        let mut all: Vec<usize> = chains.concat();
        all.sort_unstable();
        assert_eq!(all, [0, 1, 2, 3, 4]);
    }

    #[test]
    fn beyond_the_merge_limit_every_file_is_still_in_a_chain() {
        let ranges = vec![(Some(0), Some(1_000)); MERGE_INPUTS + 5];
        let chains = chained(&ranges);
        assert_eq!(chains.len(), MERGE_INPUTS);
        assert_eq!(chains.iter().map(Vec::len).sum::<usize>(), MERGE_INPUTS + 5);
    }
}
