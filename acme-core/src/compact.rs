//! Compaction: many small files (one per micro-batch and table) rewritten into fewer, larger
//! files sorted by the columns queries filter and join on.
//!
//! A compaction commit removes the small files and adds the merged ones with `dataChange =
//! false`: every version before and after holds the same rows. Readers of earlier versions
//! keep their files (nothing is deleted), so compaction never blocks or breaks a reader, and
//! the history the files hold is untouched. It records no position and needs no lock: it
//! commits through Delta's optimistic protocol like any other writer.

use datafusion::prelude::SessionContext;
use futures::StreamExt;
use tracing::Instrument;

use crate::error::{Error, Result};
use crate::files::{DataFile, Replace};
use crate::storage::{CommitOutcome, LayerTable};

/// The query-engine memory a compaction's sort may hold before it spills to disk (its input is
/// at most [`CompactOptions::max_input_bytes`] of compressed Parquet, several times that once
/// decoded).
pub const COMPACTION_MEMORY_BYTES: usize = 64 << 20;

/// What to compact and how.
#[derive(Debug, Clone)]
pub struct CompactOptions {
    /// Files smaller than this are candidates.
    pub small_file_bytes: u64,
    /// Compact only when at least this many candidates can be merged together.
    pub min_files: usize,
    /// At most this many bytes of candidates are merged in one round (it bounds memory: the
    /// round sorts them in memory).
    pub max_input_bytes: u64,
    /// Target size of the merged files.
    pub target_file_bytes: u64,
    /// When set, merged files hold at most this many rows, and files with fewer than half as
    /// many are candidates too (tables rewritten in place keep files this small).
    pub file_rows: Option<u64>,
    /// Sort order of the merged files (column names, ascending, nulls first).
    pub sort_by: Vec<String>,
    /// A boolean column whose files are kept apart: files whose rows are all false, all
    /// true, or mixed are merged only among themselves (e.g. closed and open history versions,
    /// so that rewrites of open versions never touch closed ones).
    pub split_by: Option<String>,
    /// Files whose deletion vector marks at least this fraction of their rows are candidates
    /// whatever their size, and a round rewrites them even when fewer than `min_files`
    /// candidates are found: their marked rows are then dropped for good.
    pub purge_fraction: f64,
}

/// The default [`CompactOptions::purge_fraction`]: a file is rewritten once a quarter of its
/// rows are marked deleted, so each stored row is written again at most about four times per
/// its own replacement on average, and scans skip at most a quarter of what they read.
pub const DEFAULT_PURGE_FRACTION: f64 = 0.25;

impl CompactOptions {
    /// Defaults: candidates under 8 MiB, at least 8 of them, at most 64 MiB per round, merged
    /// files of up to 64 MiB, sorted by `sort_by`.
    pub fn sorted_by(sort_by: &[&str]) -> Self {
        Self {
            small_file_bytes: 8 << 20,
            min_files: 8,
            max_input_bytes: 64 << 20,
            target_file_bytes: 64 << 20,
            file_rows: None,
            sort_by: sort_by.iter().map(|c| c.to_string()).collect(),
            split_by: None,
            purge_fraction: DEFAULT_PURGE_FRACTION,
        }
    }

    /// Keep files apart by the boolean column `column` (see [`CompactOptions::split_by`]).
    pub fn split_by(mut self, column: &str) -> Self {
        self.split_by = Some(column.to_string());
        self
    }
}

/// What a compaction did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CompactReport {
    /// Files removed (merged away).
    pub files_removed: usize,
    /// Files added.
    pub files_added: usize,
    /// Rows rewritten.
    pub rows: u64,
    /// Bytes of the removed files.
    pub bytes_before: u64,
}

/// Files one compaction group merged into new, not yet committed files (the first phase of
/// [`LayerTable::compact`], see [`LayerTable::merge_small_files`]).
#[derive(Debug, Clone)]
pub struct MergedFiles {
    /// The small files merged; the commit removes them.
    removed: Vec<DataFile>,
    /// The merged files; the commit adds them.
    adds: Vec<deltalake::kernel::Add>,
    /// Rows rewritten.
    rows: u64,
    /// Bytes of the removed files.
    bytes: u64,
    /// Columns of the table when the files were merged.
    columns: Vec<String>,
}

impl std::ops::AddAssign for CompactReport {
    fn add_assign(&mut self, other: Self) {
        self.files_removed += other.files_removed;
        self.files_added += other.files_added;
        self.rows += other.rows;
        self.bytes_before += other.bytes_before;
    }
}

impl LayerTable {
    /// Merge small files of the loaded version (one round per group of
    /// [`CompactOptions::split_by`]). `ctx` must be able to read the table's files (see
    /// [`crate::Storage::register_object_store`]).
    pub async fn compact(&mut self, ctx: &SessionContext, options: &CompactOptions) -> Result<CompactReport> {
        let merged = self.merge_small_files(ctx, options).await?;
        self.commit_merged(merged).await
    }

    /// The expensive, read-only half of [`LayerTable::compact`]: read, sort and rewrite the
    /// small files of the loaded version into new files that no version names yet. It can
    /// run on a clone of the table while its writer goes on appending (an append never
    /// removes a file): [`LayerTable::commit_merged`] then commits the result on the writer's
    /// newer version. Files of a merge that is never committed are invisible to readers, and
    /// vacuum removes them.
    pub async fn merge_small_files(&self, ctx: &SessionContext, options: &CompactOptions) -> Result<Vec<MergedFiles>> {
        let span = tracing::info_span!("compaction", table = self.name(), version = self.version());
        self.merge_groups(ctx, options).instrument(span).await
    }

    /// [`LayerTable::merge_small_files`]'s work.
    async fn merge_groups(&self, ctx: &SessionContext, options: &CompactOptions) -> Result<Vec<MergedFiles>> {
        let files = self.data_files()?;
        let columns: Vec<String> = self.schema()?.fields().iter().map(|f| f.name().clone()).collect();
        let mut groups: [Vec<DataFile>; 3] = Default::default();
        let purge = |f: &DataFile| match (&f.deletion_vector, f.rows) {
            (Some(vector), Some(rows)) => vector.cardinality as f64 >= rows as f64 * options.purge_fraction,
            _ => false,
        };
        let small = |f: &DataFile| {
            purge(f)
                || match (options.file_rows, f.rows) {
                    (Some(limit), Some(rows)) => rows < limit / 2,
                    _ => f.size < options.small_file_bytes,
                }
        };
        for file in files.into_iter().filter(small) {
            let group = match &options.split_by {
                Some(column) => match (file.max_bool(column), file.min_bool(column)) {
                    (Some(false), _) => 0,
                    (_, Some(true)) => 1,
                    _ => 2,
                },
                None => 2,
            };
            groups[group].push(file);
        }
        let mut merged = Vec::new();
        for mut group in groups {
            // Neighbouring files first, so merged files cover narrow key ranges.
            if let Some(first) = options.sort_by.first() {
                group.sort_by_key(|f| f.min_i64(first).unwrap_or(i64::MIN));
            }
            let mut picked = Vec::new();
            let mut bytes = 0u64;
            for file in group {
                if bytes + file.size > options.max_input_bytes && !picked.is_empty() {
                    break;
                }
                bytes += file.size;
                picked.push(file);
            }
            if picked.len() < options.min_files.max(2) && !picked.iter().any(purge) {
                continue;
            }
            let (rows, adds) = self.merge(ctx, &picked, options).await?;
            merged.push(MergedFiles { removed: picked, adds, rows, bytes, columns: columns.clone() });
        }
        Ok(merged)
    }

    /// The second half of [`LayerTable::compact`]: commit merged files on the loaded version,
    /// one commit per group. A group is skipped (its new files left for vacuum) when the
    /// loaded version no longer holds every file it merged, or when the table's columns
    /// changed since the merge: the rows stay as they are, and a later compaction merges them.
    pub async fn commit_merged(&mut self, merged: Vec<MergedFiles>) -> Result<CompactReport> {
        let mut report = CompactReport::default();
        if merged.is_empty() {
            return Ok(report);
        }
        let active: std::collections::HashSet<String> = self.data_files()?.into_iter().map(|f| f.path).collect();
        let columns: Vec<String> = self.schema()?.fields().iter().map(|f| f.name().clone()).collect();
        for group in merged {
            if group.columns != columns || !group.removed.iter().all(|f| active.contains(&f.path)) {
                tracing::debug!(table = self.name(), files = group.removed.len(), "merged files are stale; skipped");
                continue;
            }
            let added = group.adds.len();
            crate::failpoint::hit("compaction");
            if let CommitOutcome::Committed { .. } =
                self.commit_replace(&group.removed, group.adds, None, Replace::Compaction).await?
            {
                report.files_removed += group.removed.len();
                report.files_added += added;
                report.rows += group.rows;
                report.bytes_before += group.bytes;
            }
        }
        if report.files_removed > 0 {
            tracing::debug!(table = self.name(), ?report, "compacted");
            let layer = self.layer().map_or("unknown", |l| l.dir());
            metrics::counter!(crate::telemetry::COMPACTIONS, "layer" => layer).increment(1);
        }
        Ok(report)
    }

    async fn merge(
        &self,
        ctx: &SessionContext,
        files: &[DataFile],
        options: &CompactOptions,
    ) -> Result<(u64, Vec<deltalake::kernel::Add>)> {
        let error = |source| Error::Query { table: self.name().to_string(), context: "compacting", source };
        let mut df = ctx.read_table(self.provider(Some(files))?).map_err(|e| error(Box::new(e)))?;
        if !options.sort_by.is_empty() {
            let order = options.sort_by.iter().map(|c| datafusion::prelude::col(c).sort(true, true)).collect();
            df = df.sort(order).map_err(|e| error(Box::new(e)))?;
        }
        let mut writer = match options.file_rows {
            Some(rows) => self.writer_with_file_rows(options.target_file_bytes, rows)?,
            None => self.writer(options.target_file_bytes)?,
        };
        let mut stream = df.execute_stream().await.map_err(|e| error(Box::new(e)))?;
        while let Some(batch) = stream.next().await {
            writer.write(self.name(), batch.map_err(|e| error(Box::new(e)))?).await?;
        }
        let rows = writer.rows();
        Ok((rows, writer.finish(self.name()).await?))
    }
}
