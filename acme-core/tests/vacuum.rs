//! Vacuum on real files: it deletes exactly the data files no version inside the retention
//! needs (files compaction removed, files a crashed writer left), reports their count and
//! size, keeps what pinned readers inside the retention read, and leaves the table writable.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use acme_core::vacuum::DEFAULT_RETENTION;
use acme_core::{CommitMode, CompactOptions, Layer, Position, Storage};
use arrow::array::{Int64Array, RecordBatch};
use arrow::datatypes::{DataType, Field, Schema};
use datafusion::prelude::SessionContext;

fn schema() -> Arc<Schema> {
    Arc::new(Schema::new(vec![Field::new("id", DataType::Int64, true)]))
}

fn batch(ids: std::ops::Range<i64>) -> RecordBatch {
    RecordBatch::try_new(schema(), vec![Arc::new(Int64Array::from_iter_values(ids))]).expect("batch")
}

async fn append(table: &mut acme_core::LayerTable, ids: std::ops::Range<i64>, position: i64) {
    let mut writer = table.writer(1 << 20).expect("writer");
    writer.write(table.name(), batch(ids)).await.expect("write");
    let files = writer.finish(table.name()).await.expect("finish");
    table.commit(files, &Position::new("test", position), CommitMode::Append).await.expect("commit");
}

async fn count(ctx: &SessionContext, table: &acme_core::LayerTable) -> usize {
    let rows = ctx.read_table(table.provider(None).expect("provider")).expect("read").count().await;
    rows.expect("the table's files are all there")
}

/// The Parquet files in a table's directory, with their sizes.
fn parquet_files(dir: &Path) -> Vec<(String, u64)> {
    let mut files: Vec<(String, u64)> = std::fs::read_dir(dir)
        .expect("table directory")
        .map(|e| e.expect("entry"))
        .filter(|e| e.file_name().to_string_lossy().ends_with(".parquet"))
        .map(|e| (e.file_name().to_string_lossy().into_owned(), e.metadata().expect("metadata").len()))
        .collect();
    files.sort();
    files
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vacuum_deletes_only_what_no_version_inside_the_retention_needs() {
    let dir = tempfile::tempdir().expect("tmp");
    let storage = Storage::new(&dir.path().display().to_string(), Default::default()).expect("storage");
    let table_dir = dir.path().join("raw").join("numbers");
    let mut table = storage.open_or_create(Layer::Raw, "numbers", &schema()).await.expect("table");
    for round in 0..10i64 {
        append(&mut table, round * 100..(round + 1) * 100, round + 1).await;
    }
    let small = parquet_files(&table_dir);
    assert_eq!(small.len(), 10);
    let before = table.version().expect("version");
    let ctx = SessionContext::new();
    let compacted = table.compact(&ctx, &CompactOptions::sorted_by(&["id"])).await.expect("compact");
    assert_eq!(compacted.files_removed, 10);
    // A table of another layer, and a file a writer wrote but never committed, made two hours old.
    let mut other = storage.open_or_create(Layer::Presentation, "things", &schema()).await.expect("table");
    append(&mut other, 0..10, 1).await;
    let mut crashed = table.writer(1 << 20).expect("writer");
    crashed.write(table.name(), batch(5000..5010)).await.expect("write");
    let orphan = crashed.finish(table.name()).await.expect("finish");
    assert_eq!(orphan.len(), 1);
    let orphan = parquet_files(&table_dir)
        .into_iter()
        .find(|(name, _)| !small.iter().any(|(s, _)| s == name) && orphan[0].path.ends_with(name.as_str()))
        .expect("the orphan file");
    let aged = std::process::Command::new("touch")
        .args(["-d", "2 hours ago"])
        .arg(table_dir.join(&orphan.0))
        .status()
        .expect("touch");
    assert!(aged.success());
    assert_eq!(storage.tables(Layer::Raw).await.expect("tables"), vec!["numbers".to_string()]);
    assert_eq!(storage.tables(Layer::Presentation).await.expect("tables"), vec!["things".to_string()]);

    // Within the default retention (7 days) nothing is old enough: nothing goes, and a reader
    // pinned to the version before the compaction reads every row.
    let report = storage.vacuum(DEFAULT_RETENTION, false).await.expect("vacuum");
    assert_eq!(report.len(), 2, "{report:?}");
    assert!(report.iter().all(|t| t.files == 0 && t.bytes == 0), "{report:?}");
    let pinned = storage.open_at(Layer::Raw, "numbers", before).await.expect("open").expect("exists");
    assert_eq!(count(&ctx, &pinned).await, 1000);

    // One hour: the orphan (two hours old) goes; the files compaction removed seconds ago stay.
    let report = storage.vacuum(Duration::from_secs(3600), false).await.expect("vacuum");
    let numbers = report.iter().find(|t| t.table == "raw/numbers").expect("raw/numbers");
    assert_eq!((numbers.files, numbers.bytes), (1, orphan.1), "{report:?}");
    assert!(!table_dir.join(&orphan.0).exists());
    assert_eq!(count(&ctx, &pinned).await, 1000, "the pinned reader still reads");

    // No retention, dry run: the ten compacted-away files are reported with their size, and kept.
    let removed_bytes: u64 = small.iter().map(|(_, size)| size).sum();
    let report = storage.vacuum(Duration::ZERO, true).await.expect("dry run");
    let numbers = report.iter().find(|t| t.table == "raw/numbers").expect("raw/numbers");
    assert_eq!((numbers.files, numbers.bytes), (10, removed_bytes), "{report:?}");
    assert!(small.iter().all(|(name, _)| table_dir.join(name).exists()), "a dry run deletes nothing");

    // No retention: they go; the current version reads every row, and the table takes appends.
    let report = storage.vacuum(Duration::ZERO, false).await.expect("vacuum");
    let numbers = report.iter().find(|t| t.table == "raw/numbers").expect("raw/numbers");
    assert_eq!((numbers.files, numbers.bytes), (10, removed_bytes), "{report:?}");
    assert!(small.iter().all(|(name, _)| !table_dir.join(name).exists()));
    assert_eq!(parquet_files(&table_dir).len(), 1, "the merged file is left");
    let mut table = storage.open(Layer::Raw, "numbers").await.expect("open").expect("exists");
    assert_eq!(count(&ctx, &table).await, 1000);
    append(&mut table, 1000..1100, 11).await;
    let table = storage.open(Layer::Raw, "numbers").await.expect("open").expect("exists");
    assert_eq!(count(&ctx, &table).await, 1100);
    let other = storage.open(Layer::Presentation, "things").await.expect("open").expect("exists");
    assert_eq!(count(&ctx, &other).await, 10, "a table with nothing to vacuum is untouched");
}

/// Whatever the retention, the files of the versions the manifests name stay: a model build
/// killed between its table commits and its manifest leaves the manifest naming a version
/// whose files its own commit removed, and the next run reads that version.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vacuum_keeps_the_versions_the_manifests_name_whatever_the_retention() {
    use acme_core::storage::{Manifest, manifests};
    let dir = tempfile::tempdir().expect("tmp");
    let storage = Storage::new(&dir.path().display().to_string(), Default::default()).expect("storage");
    let table_dir = dir.path().join("intermediate").join("versions");
    let mut table = storage.open_or_create(Layer::Intermediate, "versions", &schema()).await.expect("table");
    for round in 0..4i64 {
        append(&mut table, round * 10..(round + 1) * 10, round + 1).await;
    }
    let mut manifest = Manifest::new(4);
    manifest.record(&table);
    storage.put_manifest(manifests::MODEL, &manifest).await.expect("manifest");
    let pinned = table.version().expect("version");
    // A later commit (a build that died before its manifest) replaces every file.
    let ctx = SessionContext::new();
    let options = CompactOptions { min_files: 2, ..CompactOptions::sorted_by(&["id"]) };
    let compacted = table.compact(&ctx, &options).await.expect("compact");
    assert_eq!(compacted.files_removed, 4);
    let vacuumed = storage.vacuum(Duration::ZERO, false).await.expect("vacuum");
    assert_eq!(vacuumed.iter().map(|t| t.files).sum::<usize>(), 0, "the pinned version's files stay: {vacuumed:?}");
    let old = storage.open_at(Layer::Intermediate, "versions", pinned).await.expect("open").expect("table");
    assert_eq!(count(&ctx, &old).await, 40, "the version the manifest names reads whole");
    // Once the manifest names the new version, the replaced files go.
    let latest = storage.open(Layer::Intermediate, "versions").await.expect("open").expect("table");
    assert!(latest.version() > Some(pinned));
    let mut manifest = Manifest::new(5);
    manifest.record(&latest);
    storage.put_manifest(manifests::MODEL, &manifest).await.expect("manifest");
    let vacuumed = storage.vacuum(Duration::ZERO, false).await.expect("vacuum");
    assert_eq!(vacuumed.iter().map(|t| t.files).sum::<usize>(), 4, "{vacuumed:?}");
    assert_eq!(parquet_files(&table_dir).len(), 1);
    table.refresh().await.expect("refresh");
    assert_eq!(count(&ctx, &table).await, 40);
}
