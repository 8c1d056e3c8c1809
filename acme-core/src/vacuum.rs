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
//!
//! Whatever the retention, the files of the table versions the warehouse's manifests name (the
//! raw round and the model build that readers and the next build start from) are kept: a
//! build killed between its table commits and its manifest leaves the manifest naming
//! versions whose files its own commits removed, and the next run reads them.

use std::collections::HashSet;
use std::time::Duration;

use deltalake::operations::vacuum::VacuumMode;
use object_store::{ObjectStore, ObjectStoreExt};

use crate::error::{Error, Result};
use crate::storage::{Layer, Storage, manifests};

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
        let pinned = [self.get_manifest(manifests::RAW).await?, self.get_manifest(manifests::MODEL).await?];
        let mut out = Vec::new();
        for layer in [Layer::Raw, Layer::Intermediate, Layer::Presentation] {
            for name in self.tables(layer).await? {
                let Some(table) = self.open(layer, &name).await? else { continue };
                let label = table.name().to_string();
                // The files of the versions the manifests name, when later commits exist.
                let mut keep = HashSet::new();
                for version in pinned.iter().flatten().filter_map(|m| m.version_of(layer, &name)) {
                    if table.version().is_some_and(|latest| version < latest)
                        && let Some(old) = self.open_at(layer, &name, version).await?
                    {
                        for file in old.data_files()? {
                            // And the deletion vectors those versions read.
                            keep.extend(file.vector_file());
                            keep.insert(file.path);
                        }
                    }
                }
                // The candidates, as Delta's vacuum lists them (without deleting anything).
                let listing = table
                    .delta()
                    .clone()
                    .vacuum()
                    .with_retention_period(period)
                    .with_enforce_retention_duration(false)
                    .with_mode(if orphans { VacuumMode::Full } else { VacuumMode::Lite })
                    .with_dry_run(true);
                let (_, listed) = listing.await.map_err(Error::delta(&label, "list the files to vacuum"))?;
                let doomed: Vec<&String> = listed.files_deleted.iter().filter(|f| !keep.contains(*f)).collect();
                let path =
                    |file: &str| object_store::path::Path::from(format!("{prefix}{}/{name}/{file}", layer.dir()));
                let mut bytes = 0;
                for file in &doomed {
                    bytes += store.head(&path(file)).await.map_or(0, |meta| meta.size);
                }
                if !dry_run {
                    for file in &doomed {
                        match store.delete(&path(file)).await {
                            Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                            Err(source) => return Err(Error::ObjectStore { url: format!("{label}/{file}"), source }),
                        }
                    }
                    if !doomed.is_empty() {
                        crate::failpoint::hit("vacuum");
                    }
                }
                out.push(VacuumedTable { table: label, files: doomed.len(), bytes });
            }
        }
        Ok(out)
    }
}
