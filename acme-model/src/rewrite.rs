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

use acme_core::{CommitOutcome, DataFile, LayerTable, LayerWriter, Position, Replace};
use arrow::array::{Array, AsArray, BooleanArray, RecordBatch};
use arrow::compute::{filter_record_batch, not};
use arrow::datatypes::Int64Type;
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
    pub keys: Keys,
    pub open: Option<&'a str>,
}

impl Target<'_> {
    /// Rows of `batch` that the step replaces.
    fn replaced(&self, table: &str, batch: &RecordBatch) -> Result<BooleanArray> {
        let open = match self.open {
            Some(column) => Some(
                batch
                    .column_by_name(column)
                    .and_then(|c| c.as_boolean_opt())
                    .ok_or_else(|| ModelError::Internal(format!("{table}: no boolean column {column}")))?
                    .clone(),
            ),
            None => None,
        };
        let keys = batch
            .column_by_name(self.key)
            .and_then(|c| c.as_primitive_opt::<Int64Type>())
            .ok_or_else(|| ModelError::UnsupportedKey { table: table.to_string(), column: self.key.to_string() })?;
        let mut out = Vec::with_capacity(batch.num_rows());
        for i in 0..batch.num_rows() {
            let open_row = open.as_ref().is_none_or(|o| o.is_valid(i) && o.value(i));
            let matched = match &self.keys {
                Keys::All => true,
                Keys::Set(set) => keys.is_valid(i) && set.contains(&keys.value(i)),
            };
            out.push(open_row && matched);
        }
        Ok(BooleanArray::from(out))
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
}

/// Replace the rows `target` names by the rows of `new_rows`, committing at `position`.
///
/// With [`Keys::All`] every file is replaced. Memory stays bounded: files and new rows are
/// streamed batch by batch into the writer.
pub(crate) async fn replace(
    ctx: &SessionContext,
    table: &mut LayerTable,
    target: &Target<'_>,
    new_rows: DataFrame,
    split: Option<&str>,
    files: (u64, u64),
    position: &Position,
) -> Result<Replaced> {
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
    let mut replaced = Replaced::default();
    for (file, keeps_rows) in &touched {
        if !keeps_rows {
            continue;
        }
        let mut stream = table.read_file(ctx, file, None).await?;
        while let Some(batch) = stream.next().await {
            let batch = batch?;
            let mask = target.replaced(&name, &batch)?;
            let kept =
                filter_record_batch(&batch, &not(&mask).map_err(arrow_error(&name))?).map_err(arrow_error(&name))?;
            replaced.rows_kept += kept.num_rows() as u64;
            writer.write(kept).await?;
        }
    }
    replaced.files_rewritten = touched.len();
    let rewritten = started.elapsed();
    let mut stream = new_rows.execute_stream().await?;
    while let Some(batch) = stream.next().await {
        writer.write(batch?).await?;
    }
    replaced.rows = writer.rows() - replaced.rows_kept;
    let adds = writer.finish().await?;
    tracing::debug!(
        table = %name,
        files = file_count,
        touched = touched.len(),
        rows_kept = replaced.rows_kept,
        rows_new = replaced.rows,
        find_ms = scanned.as_millis() as u64,
        rewrite_ms = (rewritten - scanned).as_millis() as u64,
        new_rows_ms = (started.elapsed() - rewritten).as_millis() as u64,
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

/// Collect the distinct `BIGINT` keys a query returns, or `None` when there are more than
/// `limit` (the caller then recomputes the whole table instead).
pub(crate) async fn collect_keys(df: DataFrame, limit: usize) -> Result<Option<HashSet<i64>>> {
    let mut keys = HashSet::new();
    let mut stream = df.execute_stream().await?;
    while let Some(batch) = stream.next().await {
        let batch = batch?;
        let column = batch.column(0);
        let values = arrow::compute::cast(column, &arrow::datatypes::DataType::Int64)
            .map_err(|source| ModelError::Arrow { table: "the changed keys".into(), source })?;
        let values = values.as_primitive::<Int64Type>();
        keys.extend(values.iter().flatten());
        if keys.len() > limit {
            return Ok(None);
        }
    }
    Ok(Some(keys))
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
