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
    /// When set, a round merges the newest candidates (by the first `sort_by` column) and
    /// reaches back to an older one only while it is small next to those (see [`Tiering`]),
    /// instead of every candidate from the oldest: for append-only tables that are compacted
    /// often, such as the raw layer's.
    pub tiering: Option<Tiering>,
}

/// How a tiered compaction ([`CompactOptions::tiering`]) picks its files.
///
/// Without it, a table appended to between frequent compactions rewrites its merged files on
/// every round until they outgrow [`CompactOptions::small_file_bytes`]: each round reads, sorts
/// and writes again every row merged so far, so a round's cost grows with the rows appended
/// since the files were last large, not with the rows appended since the last round (under
/// the SF10 live workload, merging the raw tables every 10 commit rounds rewrote 100-150k rows
/// a round, the small snapshot file of `products` among them, for a few thousand new ones).
///
/// With it, the candidates are walked from the newest back, and an older file is taken only
/// while it holds at most [`Tiering::ratio`] times the rows taken so far (or at most
/// [`Tiering::floor_rows`]). A file is therefore rewritten only together with at least half as
/// many other rows, and the file holding a row grows by half or more each time the row is
/// rewritten: a row is rewritten a logarithmic number of times on its way to a large file, and
/// a round's cost follows the new rows. Rows, not bytes, are compared: a micro-batch file holds
/// a few rows behind a footer, and a merged file compresses several times better. A file whose
/// statistics give no row count is taken only as the newest. The merged files keep covering
/// contiguous ranges of the sort column (a round merges a run of neighbours).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Tiering {
    /// Files of at most this many rows are always taken (rewriting them costs little): new
    /// micro-batches of uneven sizes then never stop a round short.
    pub floor_rows: u64,
    /// An older file is taken while its rows are at most this many times the rows taken so far.
    pub ratio: f64,
}

impl Default for Tiering {
    /// Files of at most 4,096 rows always; larger ones while at most twice the rows taken.
    fn default() -> Self {
        Self { floor_rows: 4096, ratio: 2.0 }
    }
}

/// The files a tiered round merges, of candidates given as `(rows, bytes)` (rows `None` when
/// unknown) and ordered by the sort column, oldest first: the newest, then back while each
/// older file is within the floor or at most the ratio times the rows taken, and the round's
/// bytes stay within `max_bytes`. Returns the index of the first file taken (the round takes
/// every file from there on); `files.len()` when there is none.
pub(crate) fn tiered_start(files: &[(Option<u64>, u64)], tiering: &Tiering, max_bytes: u64) -> usize {
    let mut start = files.len();
    let (mut rows_taken, mut bytes_taken) = (0u64, 0u64);
    for (i, &(rows, bytes)) in files.iter().enumerate().rev() {
        if start < files.len() {
            let small = rows.is_some_and(|r| r <= tiering.floor_rows || r as f64 <= tiering.ratio * rows_taken as f64);
            if !small || bytes_taken.saturating_add(bytes) > max_bytes {
                break;
            }
        }
        rows_taken = rows_taken.saturating_add(rows.unwrap_or(u64::MAX));
        bytes_taken = bytes_taken.saturating_add(bytes);
        start = i;
    }
    start
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
            tiering: None,
        }
    }

    /// Pick each round's files newest first (see [`Tiering`]).
    pub fn tiered(mut self, tiering: Tiering) -> Self {
        self.tiering = Some(tiering);
        self
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
            let picked = match &options.tiering {
                Some(tiering) => {
                    let sizes: Vec<(Option<u64>, u64)> = group.iter().map(|f| (f.rows, f.size)).collect();
                    // (For append-only tables: a file marked for purging older than the run is
                    // left to a round without tiering.)
                    group.split_off(tiered_start(&sizes, tiering, options.max_input_bytes))
                }
                None => {
                    let mut picked = Vec::new();
                    let mut bytes = 0u64;
                    for file in group {
                        if bytes + file.size > options.max_input_bytes && !picked.is_empty() {
                            break;
                        }
                        bytes += file.size;
                        picked.push(file);
                    }
                    picked
                }
            };
            let bytes = picked.iter().map(|f| f.size).sum();
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

#[cfg(test)]
mod tests {
    use super::{Tiering, tiered_start};

    /// Candidates of these row counts, each of a byte per row.
    fn files(rows: &[u64]) -> Vec<(Option<u64>, u64)> {
        rows.iter().map(|r| (Some(*r), *r)).collect()
    }

    #[test]
    fn a_tiered_round_takes_the_newest_files_and_older_ones_only_while_they_are_small_next_to_them() {
        let tiering = Tiering::default();
        let max = u64::MAX;
        assert_eq!(tiered_start(&[], &tiering, max), 0, "nothing to take");
        // New micro-batches within the floor, of uneven sizes: all of them.
        assert_eq!(tiered_start(&files(&[30, 4000, 2, 600]), &tiering, max), 0);
        // A large merged file behind ten small ones is left alone.
        let mut rows = vec![100_000];
        rows.extend([1000; 10]);
        assert_eq!(tiered_start(&files(&rows), &tiering, max), 1);
        // Merged files small next to what is taken are taken, back to the first that is not.
        let mut rows = vec![200_000, 40_000, 19_000];
        rows.extend([1000; 10]);
        assert_eq!(tiered_start(&files(&rows), &tiering, max), 1, "10k new, then 19k, then 40k of 29k taken");
        // A newest file above the floor is taken, and the small ones before it.
        assert_eq!(tiered_start(&files(&[50, 80, 50_000]), &tiering, max), 0);
        // The round's bytes stay within the bound (the newest file is always taken).
        assert_eq!(tiered_start(&files(&[30, 30, 30]), &tiering, 70), 1);
        assert_eq!(tiered_start(&files(&[30, 100]), &tiering, 70), 1);
        // A file without a row count is taken only as the newest (and small ones behind it).
        assert_eq!(tiered_start(&[(Some(10), 10), (None, 10), (Some(10), 10)], &tiering, max), 2);
        assert_eq!(tiered_start(&[(Some(10), 10), (None, 10)], &tiering, max), 0);
    }

    /// Rounds of appends and tiered merges, on row counts alone: each row is rewritten a
    /// logarithmic number of times, and the files left between rounds stay few.
    #[test]
    fn tiered_rounds_rewrite_each_row_a_logarithmic_number_of_times_and_leave_few_files() {
        let tiering = Tiering::default();
        // Files grow out of compaction at a million rows (the small-file bound, in rows here).
        let (min_files, large) = (8usize, 1_000_000u64);
        let mut files: Vec<u64> = Vec::new();
        let (mut appended, mut rewritten, mut most_files) = (0u64, 0u64, 0usize);
        for round in 0..5000u64 {
            // Ten micro-batches of 1-500 rows (uneven, as the changes per round are), and now
            // and then one of 30,000 (a large transaction).
            for i in 0..10u64 {
                let rows = if (round * 10 + i) % 97 == 0 { 30_000 } else { 1 + (round * 7919 + i * 104_729) % 500 };
                files.push(rows);
                appended += rows;
            }
            // Large files are no candidates; the candidates keep their order among the files.
            let candidates: Vec<usize> = (0..files.len()).filter(|&i| files[i] < large).collect();
            let sizes: Vec<(Option<u64>, u64)> = candidates.iter().map(|&i| (Some(files[i]), files[i])).collect();
            let start = tiered_start(&sizes, &tiering, u64::MAX);
            if sizes.len() - start >= min_files {
                let picked = &candidates[start..];
                let merged: u64 = picked.iter().map(|&i| files[i]).sum();
                rewritten += merged;
                let at = picked[0];
                files = files.iter().enumerate().filter(|(i, _)| !picked.contains(i)).map(|(_, r)| *r).collect();
                files.insert(at.min(files.len()), merged);
            }
            most_files = most_files.max(files.iter().filter(|r| **r < large).count());
        }
        // (Every round merging every small file from the oldest rewrites each row about 90
        // times here: once a round until its file holds a million rows.)
        let amplification = rewritten as f64 / appended as f64;
        let log = ((large / 2500) as f64).log2();
        assert!(
            amplification <= log + 2.0,
            "each row rewritten {amplification:.1} times (log2 of the growth: {log:.1})"
        );
        assert!(most_files <= 40, "at most {most_files} small files between rounds");
        assert!(files.iter().any(|r| *r >= large), "files grow out of compaction");
    }
}
