//! Vacuum: removing the data files of a warehouse that no table version inside a retention
//! period still needs. Compaction and model builds replace files (the old ones stay readable
//! for readers pinned to earlier versions), and a writer that dies between writing a file and
//! committing it leaves the file behind: without a vacuum, storage only ever grows.
//!
//! Delta semantics: a file removed by a commit older than the retention is deleted; a reader
//! pinned to a version inside the retention keeps every file it reads. Files no commit ever
//! named (a crashed writer's) are deleted too once they are older than
//! [`MIN_ORPHAN_RETENTION`] and the retention: a writer commits its files within minutes, so a
//! file in flight is never taken for an orphan.

use std::time::Duration;

use deltalake::operations::vacuum::VacuumMode;
use object_store::{ObjectStore, ObjectStoreExt};

use crate::error::{Error, Result};
use crate::storage::{Layer, Storage};

/// The default retention, as Delta's `delta.deletedFileRetentionDuration`: 7 days.
pub const DEFAULT_RETENTION: Duration = Duration::from_secs(7 * 24 * 3600);

/// The shortest retention under which files no commit named (orphans) are deleted: a shorter
/// vacuum deletes only files that commits removed.
pub const MIN_ORPHAN_RETENTION: Duration = Duration::from_secs(3600);

/// What [`Storage::vacuum`] removed (or, in a dry run, would remove) from one table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VacuumedTable {
    /// `<layer>/<table>`.
    pub table: String,
    /// Data files deleted.
    pub files: usize,
    /// Their size in bytes.
    pub bytes: u64,
}

impl Storage {
    /// The tables of `layer` that exist (their directory names), sorted.
    pub async fn tables(&self, layer: Layer) -> Result<Vec<String>> {
        let (store, prefix) = self.root_store()?;
        let dir = object_store::path::Path::from(format!("{prefix}{}", layer.dir()));
        let listed = store
            .list_with_delimiter(Some(&dir))
            .await
            .map_err(|source| Error::ObjectStore { url: format!("{}{}/", self.root(), layer.dir()), source })?;
        let mut tables: Vec<String> =
            listed.common_prefixes.iter().filter_map(|p| p.filename().map(str::to_string)).collect();
        tables.sort();
        Ok(tables)
    }

    /// Delete, in every table of every layer, the data files that no version committed within
    /// `retention` needs (see the module documentation); with `dry_run`, only report them.
    /// Readers pinned to a version inside the retention keep working.
    pub async fn vacuum(&self, retention: Duration, dry_run: bool) -> Result<Vec<VacuumedTable>> {
        let period = chrono::Duration::from_std(retention)
            .map_err(|_| Error::Config { setting: "retention", message: format!("{retention:?} is too long") })?;
        let orphans = retention >= MIN_ORPHAN_RETENTION;
        let (store, prefix) = self.root_store()?;
        let mut out = Vec::new();
        for layer in [Layer::Raw, Layer::Intermediate, Layer::Presentation] {
            for name in self.tables(layer).await? {
                let Some(table) = self.open(layer, &name).await? else { continue };
                let label = table.name().to_string();
                let vacuum = |dry_run: bool| {
                    table
                        .delta()
                        .clone()
                        .vacuum()
                        .with_retention_period(period)
                        .with_enforce_retention_duration(false)
                        .with_mode(if orphans { VacuumMode::Full } else { VacuumMode::Lite })
                        .with_dry_run(dry_run)
                };
                // The files first (a dry run), to tell their size; then the deletion.
                let (_, listed) = vacuum(true).await.map_err(Error::delta(&label, "list the files to vacuum"))?;
                let mut bytes = 0;
                for file in &listed.files_deleted {
                    let path = object_store::path::Path::from(format!("{prefix}{}/{name}/{file}", layer.dir()));
                    bytes += store.head(&path).await.map_or(0, |meta| meta.size);
                }
                if !dry_run && !listed.files_deleted.is_empty() {
                    vacuum(false).await.map_err(Error::delta(&label, "vacuum"))?;
                }
                out.push(VacuumedTable { table: label, files: listed.files_deleted.len(), bytes });
            }
        }
        Ok(out)
    }
}
