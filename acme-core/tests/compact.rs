//! Compaction on real files: many small appended files become a few sorted ones, the rows
//! stay the same, readers of the version before compaction still read every row, and
//! targeted replacement commits drop exactly the files they name.

use std::sync::Arc;

use acme_core::storage::Manifest;
use acme_core::{CommitMode, CompactOptions, Layer, Position, Replace, Storage};
use arrow::array::{Array, AsArray, Int64Array, RecordBatch, StringArray};
use arrow::datatypes::{DataType, Field, Int64Type, Schema};
use datafusion::prelude::SessionContext;

fn schema() -> Arc<Schema> {
    Arc::new(Schema::new(vec![Field::new("id", DataType::Int64, true), Field::new("name", DataType::Utf8, true)]))
}

async fn ids(ctx: &SessionContext, table: &acme_core::LayerTable) -> Vec<i64> {
    let batches = ctx.read_table(table.provider(None).expect("provider")).expect("read").collect().await.expect("rows");
    let mut out: Vec<i64> = batches
        .iter()
        .flat_map(|b| b.column(0).as_primitive::<Int64Type>().iter().flatten().collect::<Vec<_>>())
        .collect();
    out.sort_unstable();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compaction_merges_small_files_without_changing_any_version() {
    let dir = tempfile::tempdir().expect("tmp");
    let storage = Storage::new(&dir.path().display().to_string(), Default::default()).expect("storage");
    let mut table = storage.open_or_create(Layer::Raw, "numbers", &schema()).await.expect("table");
    // Ten commits of one small file each, keys interleaved so that sorting matters.
    for round in 0..10i64 {
        append(&mut table, (0..100).map(|i| i * 10 + (9 - round)).collect(), round + 1).await;
    }
    let before = table.version().expect("version");
    assert_eq!(table.data_files().expect("files").len(), 10);
    let ctx = SessionContext::new();
    let all: Vec<i64> = (0..1000).collect();
    assert_eq!(ids(&ctx, &table).await, all);

    let report = table.compact(&ctx, &CompactOptions::sorted_by(&["id"])).await.expect("compact");
    assert_eq!(report.files_removed, 10);
    assert_eq!(report.rows, 1000);
    let files = table.data_files().expect("files");
    assert_eq!(files.len(), 1, "one merged file");
    assert_eq!((files[0].min_i64("id"), files[0].max_i64("id")), (Some(0), Some(999)));
    assert_eq!(ids(&ctx, &table).await, all, "same rows after compaction");
    // The merged file is sorted.
    let batches = ctx.read_table(table.provider(None).expect("p")).expect("read").collect().await.expect("rows");
    let read: Vec<i64> =
        batches.iter().flat_map(|b| b.column(0).as_primitive::<Int64Type>().values().to_vec()).collect();
    assert!(read.windows(2).all(|w| w[0] <= w[1]), "sorted by id");
    // The position is untouched and the version before compaction still reads every row.
    assert_eq!(table.position("test").await.expect("position"), Some(10));
    let old = storage.open_at(Layer::Raw, "numbers", before).await.expect("open").expect("exists");
    assert_eq!(old.data_files().expect("files").len(), 10);
    assert_eq!(ids(&ctx, &old).await, all, "readers of the earlier version");
    // Nothing left to compact.
    let again = table.compact(&ctx, &CompactOptions::sorted_by(&["id"])).await.expect("compact again");
    assert_eq!(again.files_removed, 0);

    // A targeted replacement: drop the merged file, add one with other rows, at a new position.
    let batch = RecordBatch::try_new(
        schema(),
        vec![Arc::new(Int64Array::from(vec![5000])), Arc::new(StringArray::from(vec!["replaced"]))],
    )
    .expect("batch");
    let mut writer = table.writer(1 << 20).expect("writer");
    writer.write(table.name(), batch).await.expect("write");
    let adds = writer.finish(table.name()).await.expect("finish");
    table.commit_replace(&files, adds, Some(&Position::new("test", 11)), Replace::Rewrite).await.expect("replace");
    assert_eq!(ids(&ctx, &table).await, vec![5000]);
    assert_eq!(table.position("test").await.expect("position"), Some(11));
    let names = ctx.read_table(table.provider(None).expect("p")).expect("read").collect().await.expect("rows");
    assert_eq!(names[0].column(1).len(), 1);
}

/// Commit one file of the rows `ids` at position `position`.
async fn append(table: &mut acme_core::LayerTable, ids: Vec<i64>, position: i64) {
    append_with(table, ids, position, false).await
}

/// [`append`], written as the change stream writes its micro-batches when `micro_batch`.
async fn append_with(table: &mut acme_core::LayerTable, ids: Vec<i64>, position: i64, micro_batch: bool) {
    let files = written(table, ids, micro_batch).await;
    table.commit(files, &Position::new("test", position), CommitMode::Append).await.expect("commit");
}

/// Files of `ids` (as the change stream writes its micro-batches when `micro_batch`), written
/// but not committed.
async fn written(
    table: &acme_core::LayerTable,
    ids: Vec<i64>,
    micro_batch: bool,
) -> Vec<acme_core::deltalake::kernel::Add> {
    let names: Vec<String> = ids.iter().map(|i| format!("n{i}")).collect();
    let batch =
        RecordBatch::try_new(schema(), vec![Arc::new(Int64Array::from(ids)), Arc::new(StringArray::from(names))])
            .expect("batch");
    let mut writer = match micro_batch {
        true => table.micro_batch_writer(1 << 20),
        false => table.writer(1 << 20),
    }
    .expect("writer");
    writer.write(table.name(), batch).await.expect("write");
    writer.finish(table.name()).await.expect("finish")
}

/// The stream commits its raw tables without listing their logs first: should another writer
/// have committed meanwhile, the commit lands on top of it, unless that writer committed a
/// position of the same application (a second stream), which is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_only_writers_commit_lands_on_top_of_a_concurrent_one_and_refuses_a_second_stream() {
    let dir = tempfile::tempdir().expect("tmp");
    let storage = Storage::new(&dir.path().display().to_string(), Default::default()).expect("storage");
    let mut stream = storage.open_or_create(Layer::Raw, "numbers", &schema()).await.expect("table");
    append(&mut stream, vec![1, 2], 1).await;
    // Another writer commits a version the stream's loaded table does not know.
    let mut other = storage.open(Layer::Raw, "numbers").await.expect("open").expect("exists");
    let files = written(&other, vec![3], true).await;
    other.commit(files, &Position::new("other", 1), CommitMode::Append).await.expect("other commit");
    let files = written(&stream, vec![4], true).await;
    let outcome =
        stream.commit_as_only_writer(files, &Position::new("test", 2), CommitMode::Append).await.expect("commit");
    assert!(matches!(outcome, acme_core::CommitOutcome::Committed { version: 3, files: 1 }), "{outcome:?}");
    let reopened = storage.open(Layer::Raw, "numbers").await.expect("open").expect("exists");
    let ctx = SessionContext::new();
    assert_eq!(ids(&ctx, &reopened).await, vec![1, 2, 3, 4]);
    assert_eq!(reopened.position("test").await.expect("position"), Some(2));
    // A second stream (same application) commits a position: the first one's next commit fails
    // and leaves the table as it was.
    let mut second = storage.open(Layer::Raw, "numbers").await.expect("open").expect("exists");
    let files = written(&second, vec![5], true).await;
    second.commit(files, &Position::new("test", 3), CommitMode::Append).await.expect("second stream");
    let files = written(&stream, vec![6], true).await;
    let refused = stream.commit_as_only_writer(files, &Position::new("test", 4), CommitMode::Append).await;
    assert!(refused.is_err(), "a commit beside a second stream of the same application: {refused:?}");
    let reopened = storage.open(Layer::Raw, "numbers").await.expect("open").expect("exists");
    assert_eq!(ids(&ctx, &reopened).await, vec![1, 2, 3, 4, 5]);
}

/// A reader moved forward to a version a writer of the same process committed takes that
/// writer's state instead of replaying the log: with the commit's log entry gone it still
/// reads the version's rows, the same rows and position a reader loading them from the log
/// gets; a version committed too many commits ago (no longer held) is read from the log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_takes_the_state_its_process_committed_instead_of_replaying_the_log() {
    let dir = tempfile::tempdir().expect("tmp");
    let storage = Storage::new(&dir.path().display().to_string(), Default::default()).expect("storage");
    let mut writer = storage.open_or_create(Layer::Raw, "numbers", &schema()).await.expect("table");
    append(&mut writer, vec![1, 2], 1).await;
    let reader = storage.open(Layer::Raw, "numbers").await.expect("open").expect("exists");
    append(&mut writer, vec![3], 2).await;
    append(&mut writer, vec![4, 5], 3).await;
    let pinned = |table: &acme_core::LayerTable| {
        let mut manifest = Manifest::new(0);
        manifest.record(table);
        manifest
    };
    let at_3 = pinned(&writer);
    let ctx = SessionContext::new();
    let from_log = storage.open_pinned(Layer::Raw, "numbers", Some(&at_3)).await.expect("open").expect("exists");
    assert_eq!(ids(&ctx, &from_log).await, vec![1, 2, 3, 4, 5]);
    // Without the last commit's log entry, only the writer's state has that version.
    let log = dir.path().join(Layer::Raw.dir()).join("numbers").join("_delta_log");
    let last = log.join(format!("{:020}.json", 3));
    let entry = std::fs::read(&last).expect("the last commit's entry");
    std::fs::remove_file(&last).expect("remove it");
    let moved = storage.reopen_pinned(Layer::Raw, "numbers", Some(&at_3), Some(&reader)).await.expect("reopen");
    let moved = moved.expect("exists");
    assert_eq!(moved.version(), Some(3));
    assert_eq!(ids(&ctx, &moved).await, ids(&ctx, &from_log).await);
    // (Positions are read from the log's entries when asked for.)
    std::fs::write(&last, entry).expect("put the entry back");
    assert_eq!(moved.position("test").await.expect("position"), Some(3));
    // A version committed too many commits ago is no longer held: read from the log.
    for round in 4..12i64 {
        append(&mut writer, vec![round + 2], round).await;
    }
    let mut at_4 = Manifest::new(0);
    at_4.tables.insert(writer.name().to_string(), 4);
    let from_log = storage.open_pinned(Layer::Raw, "numbers", Some(&at_4)).await.expect("open").expect("exists");
    let moved = storage.reopen_pinned(Layer::Raw, "numbers", Some(&at_4), Some(&moved)).await.expect("reopen");
    assert_eq!(ids(&ctx, &moved.expect("exists")).await, ids(&ctx, &from_log).await);
    assert_eq!(ids(&ctx, &from_log).await, vec![1, 2, 3, 4, 5, 6]);
}

/// The two halves of a compaction apart, as the change stream runs them: the merge on a copy
/// of the table while the writer appends, then the commit on the writer's newer version.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_merge_beside_appends_commits_on_the_newer_version_and_a_stale_merge_is_skipped() {
    let dir = tempfile::tempdir().expect("tmp");
    let storage = Storage::new(&dir.path().display().to_string(), Default::default()).expect("storage");
    let mut table = storage.open_or_create(Layer::Raw, "numbers", &schema()).await.expect("table");
    for round in 0..8i64 {
        append(&mut table, (round * 100..(round + 1) * 100).collect(), round + 1).await;
    }
    let ctx = SessionContext::new();
    let options = CompactOptions::sorted_by(&["id"]);
    let copy = table.clone();
    let merging = tokio::spawn({
        let ctx = ctx.clone();
        let options = options.clone();
        async move { copy.merge_small_files(&ctx, &options).await }
    });
    // The writer goes on: two more commits while the merge runs.
    append(&mut table, (800..900).collect(), 9).await;
    append(&mut table, (900..1000).collect(), 10).await;
    let merged = merging.await.expect("task").expect("merge");
    assert_eq!(merged.len(), 1, "one group");
    // The merge's new files are not part of any version yet.
    assert_eq!(table.data_files().expect("files").len(), 10);
    let stale = merged.clone();
    let report = table.commit_merged(merged).await.expect("commit");
    assert_eq!((report.files_removed, report.files_added, report.rows), (8, 1, 800));
    let files = table.data_files().expect("files");
    assert_eq!(files.len(), 3, "the merged file and the two appended meanwhile");
    assert_eq!(ids(&ctx, &table).await, (0..1000).collect::<Vec<_>>(), "every row once");
    assert_eq!(table.position("test").await.expect("position"), Some(10), "the writer's position stays");
    // The same merge again names files the table no longer holds: skipped, rows unchanged.
    let again = table.commit_merged(stale).await.expect("stale commit");
    assert_eq!(again, acme_core::CompactReport::default());
    assert_eq!(table.data_files().expect("files").len(), 3);
    assert_eq!(ids(&ctx, &table).await, (0..1000).collect::<Vec<_>>());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writers_cut_files_at_a_row_count() {
    let dir = tempfile::tempdir().expect("tmp");
    let storage = Storage::new(&dir.path().display().to_string(), Default::default()).expect("storage");
    let table = storage.open_or_create(Layer::Presentation, "cut", &schema()).await.expect("table");
    let mut writer = table.writer_with_file_rows(1 << 20, 300).expect("writer");
    for chunk in 0..4i64 {
        let ids: Vec<i64> = (chunk * 250..(chunk + 1) * 250).collect();
        let names: Vec<Option<&str>> = vec![None; ids.len()];
        let batch =
            RecordBatch::try_new(schema(), vec![Arc::new(Int64Array::from(ids)), Arc::new(StringArray::from(names))])
                .expect("batch");
        writer.write(table.name(), batch).await.expect("write");
    }
    assert_eq!(writer.rows(), 1000);
    let adds = writer.finish(table.name()).await.expect("finish");
    assert_eq!(adds.len(), 4, "300 + 300 + 300 + 100 rows");
}

/// A compaction whose input, decoded, is several times the engine's memory bound still
/// completes (its sort spills to disk) and writes every row, sorted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_compaction_larger_than_its_memory_bound_spills_and_completes() {
    let dir = tempfile::tempdir().expect("tmp");
    let storage = Storage::new(&dir.path().display().to_string(), Default::default()).expect("storage");
    let mut table = storage.open_or_create(Layer::Raw, "wide", &schema()).await.expect("table");
    let rows_per_file = 100_000i64;
    for round in 0..10i64 {
        // Keys interleaved across files, and 100-byte names: about 110 MB decoded in all.
        let ids: Vec<i64> = (0..rows_per_file).map(|i| i * 10 + (9 - round)).collect();
        let names: Vec<String> = ids.iter().map(|i| format!("{i:0>100}")).collect();
        let batch =
            RecordBatch::try_new(schema(), vec![Arc::new(Int64Array::from(ids)), Arc::new(StringArray::from(names))])
                .expect("batch");
        let mut writer = table.writer(64 << 20).expect("writer");
        writer.write(table.name(), batch).await.expect("write");
        let files = writer.finish(table.name()).await.expect("finish");
        table.commit(files, &Position::new("test", round + 1), CommitMode::Append).await.expect("commit");
    }
    let bound = 24 << 20;
    let ctx = storage.background_session_context(bound).expect("context");
    let options = CompactOptions { max_input_bytes: 1 << 30, ..CompactOptions::sorted_by(&["id"]) };
    let report = table.compact(&ctx, &options).await.expect("a compaction beyond the bound spills");
    assert_eq!((report.files_removed, report.rows), (10, 10 * rows_per_file as u64), "{report:?}");
    let batches = ctx.read_table(table.provider(None).expect("p")).expect("read").collect().await.expect("rows");
    let read: Vec<i64> =
        batches.iter().flat_map(|b| b.column(0).as_primitive::<Int64Type>().values().to_vec()).collect();
    assert_eq!(read, (0..10 * rows_per_file).collect::<Vec<_>>(), "every row once, sorted by id");
}

/// The Delta log entries of `table` under `root` (commits and checkpoints), by file name.
fn log_entries(root: &std::path::Path, table: &str) -> Vec<String> {
    let log = root.join(Layer::Raw.dir()).join(table).join("_delta_log");
    let mut names: Vec<String> = std::fs::read_dir(log)
        .expect("log")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".json") || n.ends_with(".parquet"))
        .collect();
    names.sort();
    names
}

/// A raw table commits a version per micro-batch: its log entries older than
/// `RAW_LOG_RETENTION` are removed with the next checkpoint, so the log (which every commit
/// and every refresh lists) does not grow with the pipeline's uptime, and readers, a stale
/// handle among them, still read every row.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_raw_tables_log_keeps_only_its_retention_and_every_reader_still_reads_every_row() {
    let dir = tempfile::tempdir().expect("tmp");
    let storage = Storage::new(&dir.path().display().to_string(), Default::default()).expect("storage");
    let mut table = storage.open_or_create(Layer::Raw, "numbers", &schema()).await.expect("table");
    for round in 0..25i64 {
        append(&mut table, (round * 10..(round + 1) * 10).collect(), round + 1).await;
    }
    let stale = storage.open_at(Layer::Raw, "numbers", 5).await.expect("open").expect("exists");
    let before = log_entries(dir.path(), "numbers");
    assert!(before.contains(&format!("{:020}.json", 0)), "nothing expired yet: {before:?}");
    // Age every entry past the retention (it is minutes; the test does not wait them out).
    let aged = std::time::SystemTime::now() - std::time::Duration::from_secs(3600);
    let log = dir.path().join(Layer::Raw.dir()).join("numbers").join("_delta_log");
    for name in &before {
        std::fs::File::options().write(true).open(log.join(name)).expect("entry").set_modified(aged).expect("age");
    }
    // Versions 26 to 30; the checkpoint after version 29 cleans up.
    for round in 25..30i64 {
        append(&mut table, (round * 10..(round + 1) * 10).collect(), round + 1).await;
    }
    let after = log_entries(dir.path(), "numbers");
    let commits = |names: &[String]| names.iter().filter(|n| n.ends_with(".json")).count();
    assert!(!after.contains(&format!("{:020}.json", 0)), "expired entries removed: {after:?}");
    assert!(commits(&after) <= 12, "about one checkpoint interval of commits left: {after:?}");
    assert!(commits(&before) >= 25);
    let ctx = SessionContext::new();
    let all: Vec<i64> = (0..300).collect();
    let reopened = storage.open(Layer::Raw, "numbers").await.expect("open").expect("exists");
    assert_eq!(ids(&ctx, &reopened).await, all, "a new reader");
    assert_eq!(reopened.position("test").await.expect("position"), Some(30));
    let refreshed = storage.reopen_pinned(Layer::Raw, "numbers", None, Some(&stale)).await.expect("reopen");
    assert_eq!(ids(&ctx, &refreshed.expect("exists")).await, all, "a handle from before the clean-up, refreshed");
}

/// The change stream's micro-batch files are LZ4, and compaction merges them into the raw
/// layer's codec (zstd).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn micro_batch_files_are_lz4_and_compaction_writes_the_layers_codec() {
    use parquet::basic::Compression;
    let dir = tempfile::tempdir().expect("tmp");
    let storage = Storage::new(&dir.path().display().to_string(), Default::default()).expect("storage");
    let mut table = storage.open_or_create(Layer::Raw, "numbers", &schema()).await.expect("table");
    for round in 0..8i64 {
        append_with(&mut table, (round * 10..(round + 1) * 10).collect(), round + 1, true).await;
    }
    let codecs = |table: &acme_core::LayerTable| -> Vec<Compression> {
        let root = dir.path().join(Layer::Raw.dir()).join("numbers");
        table
            .data_files()
            .expect("files")
            .iter()
            .map(|f| {
                let file = std::fs::File::open(root.join(&f.path)).expect("file");
                let reader = parquet::file::reader::SerializedFileReader::new(file).expect("parquet");
                use parquet::file::reader::FileReader;
                reader.metadata().row_group(0).column(0).compression()
            })
            .collect()
    };
    assert!(codecs(&table).iter().all(|c| *c == Compression::LZ4_RAW), "{:?}", codecs(&table));
    let ctx = SessionContext::new();
    table.compact(&ctx, &CompactOptions::sorted_by(&["id"])).await.expect("compact");
    assert!(matches!(codecs(&table)[..], [Compression::ZSTD(_)]), "{:?}", codecs(&table));
    assert_eq!(ids(&ctx, &table).await, (0..80).collect::<Vec<_>>());
}

/// A raw table keeps file statistics on the change's position and time and on the source's
/// key only (`raw::stats_columns`): what readers prune by, and what tells a `TRUNCATE` apart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_raw_table_keeps_statistics_on_its_position_and_key_only() {
    use acme_core::raw::{COMMIT_TS, LSN, SEQ};
    use arrow::array::TimestampMicrosecondArray;
    use arrow::datatypes::TimeUnit;
    let schema = Arc::new(Schema::new(vec![
        Field::new(LSN, DataType::Int64, false),
        Field::new(SEQ, DataType::Int64, false),
        Field::new(COMMIT_TS, DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())), true),
        Field::new("id", DataType::Int64, true),
        Field::new("count", DataType::Int64, true),
    ]));
    let dir = tempfile::tempdir().expect("tmp");
    let storage = Storage::new(&dir.path().display().to_string(), Default::default()).expect("storage");
    let mut table = storage.open_or_create_raw("numbers", &schema, &["id".to_string()]).await.expect("table");
    let batch = RecordBatch::try_new(
        Arc::clone(&schema),
        vec![
            Arc::new(Int64Array::from(vec![10, 11, 12])),
            Arc::new(Int64Array::from(vec![0, 0, 1])),
            Arc::new(TimestampMicrosecondArray::from(vec![1_000, 2_000, 3_000]).with_timezone("UTC")),
            Arc::new(Int64Array::from(vec![Some(7), None, Some(9)])),
            Arc::new(Int64Array::from(vec![100, 200, 300])),
        ],
    )
    .expect("batch");
    let mut writer = table.micro_batch_writer(1 << 20).expect("writer");
    writer.write(table.name(), batch).await.expect("write");
    let files = writer.finish(table.name()).await.expect("finish");
    table.commit(files, &Position::new("test", 1), CommitMode::Append).await.expect("commit");
    let reopened = storage.open(Layer::Raw, "numbers").await.expect("open").expect("exists");
    let files = reopened.data_files().expect("files");
    assert_eq!(files.len(), 1);
    let file = &files[0];
    assert_eq!((file.min_i64(LSN), file.max_i64(LSN)), (Some(10), Some(12)));
    assert_eq!(file.max_i64(SEQ), Some(1));
    assert_eq!(file.null_count("id"), Some(1), "the key's null count: a TRUNCATE's row");
    assert_eq!((file.min_i64("count"), file.null_count("count")), (None, None), "no statistics on other columns");
    assert_eq!(file.rows, Some(3));
}

/// A raw table an earlier acme created (Delta's default log retention and statistics on every
/// column) gets the raw layer's settings when the pipeline opens it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_raw_table_from_an_earlier_acme_gets_the_raw_layers_log_settings() {
    let dir = tempfile::tempdir().expect("tmp");
    let storage = Storage::new(&dir.path().display().to_string(), Default::default()).expect("storage");
    let config = |table: &acme_core::LayerTable| table.delta().snapshot().expect("snapshot").table_config().clone();
    // (As an earlier acme created it: no raw-layer settings.)
    let mut old = storage.open_or_create(Layer::Intermediate, "numbers", &schema()).await.expect("table");
    append(&mut old, vec![1, 2, 3], 1).await;
    std::fs::rename(dir.path().join(Layer::Intermediate.dir()), dir.path().join(Layer::Raw.dir())).expect("move");
    let before = storage.open(Layer::Raw, "numbers").await.expect("open").expect("exists");
    assert_eq!(config(&before).log_retention_duration, None);
    let opened = storage.open_or_create_raw("numbers", &schema(), &["id".to_string()]).await.expect("open");
    let settings = config(&opened);
    assert_eq!(settings.log_retention_duration, Some(std::time::Duration::from_secs(60)));
    let columns: Vec<String> =
        settings.data_skipping_stats_columns.expect("stats columns").iter().map(|c| c.to_string()).collect();
    assert_eq!(columns, ["_lsn", "_seq", "_commit_ts", "id"]);
    // Opened again: nothing more to set (no new version).
    let version = opened.version();
    let again = storage.open_or_create_raw("numbers", &schema(), &["id".to_string()]).await.expect("open");
    assert_eq!(again.version(), version);
    let ctx = SessionContext::new();
    assert_eq!(ids(&ctx, &again).await, vec![1, 2, 3]);
}

/// Every runtime made for one storage (background merges, model builds, the warehouse) caches
/// footers in the storage's one cache, so a footer one of them read is not read and held again
/// by the next; another storage has a cache of its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runtimes_made_for_one_storage_share_its_footer_cache() {
    let dir = tempfile::tempdir().expect("tmp");
    let storage = Storage::new(&dir.path().display().to_string(), Default::default()).expect("storage");
    let mut table = storage.open_or_create(Layer::Raw, "numbers", &schema()).await.expect("table");
    append(&mut table, (0..100).collect(), 1).await;
    let cache = storage.footer_cache();
    assert!(cache.is_empty(), "nothing read yet");

    let background = storage.background_session_context(64 << 20).expect("context");
    assert_eq!(ids(&background, &table).await, (0..100).collect::<Vec<_>>());
    assert_eq!(cache.len(), 1, "the background query's footer is in the storage's cache");

    let runtime = storage.runtime_builder().build_arc().expect("runtime");
    let seen = runtime.cache_manager.get_file_metadata_cache();
    assert!(Arc::ptr_eq(&seen, &cache), "a new runtime of the storage uses the same cache");
    assert_eq!(seen.len(), 1);
    // Opened again (another handle on the same root): still the same cache.
    let again = Storage::new(&dir.path().display().to_string(), Default::default()).expect("storage");
    assert!(Arc::ptr_eq(&again.footer_cache(), &cache));

    let other_dir = tempfile::tempdir().expect("tmp");
    let other = Storage::new(&other_dir.path().display().to_string(), Default::default()).expect("storage");
    let other_cache = other.footer_cache();
    assert!(!Arc::ptr_eq(&other_cache, &cache), "another storage has a cache of its own");
    assert!(other_cache.is_empty());

    // Once nothing holds a storage's cache, it is dropped; the next runtime starts a new one.
    drop((cache, seen, runtime, background));
    assert!(storage.footer_cache().is_empty(), "a dropped cache is not kept for the storage");
}

/// Tiered rounds on real files, as the change stream merges its raw tables: each round merges
/// the newest micro-batches and reaches back only to merged files small next to them, so the
/// older merged files are left alone, every row is still read once, and the merged files cover
/// neighbouring, disjoint key ranges.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tiered_rounds_leave_large_merged_files_alone_and_keep_every_row_once() {
    let dir = tempfile::tempdir().expect("tmp");
    let storage = Storage::new(&dir.path().display().to_string(), Default::default()).expect("storage");
    let mut table = storage.open_or_create(Layer::Raw, "numbers", &schema()).await.expect("table");
    let ctx = SessionContext::new();
    // A larger first file (a snapshot) than the rounds below append in all: left alone.
    append_with(&mut table, (0..100_000).collect(), 1, true).await;
    let snapshot = table.data_files().expect("files")[0].path.clone();
    // No floor: micro-batches of even sizes are taken by the ratio alone.
    let tiering = acme_core::Tiering { floor_rows: 0, ratio: 2.0 };
    let options = CompactOptions { min_files: 4, ..CompactOptions::sorted_by(&["id"]) }.tiered(tiering);
    let (mut next, mut position, mut rewritten, mut appended) = (100_000i64, 1i64, 0u64, 0u64);
    let (mut left_alone, mut untiered) = (0, 0u64);
    for _round in 0..24 {
        for _ in 0..4 {
            position += 1;
            append_with(&mut table, (next..next + 500).collect(), position, true).await;
            next += 500;
            appended += 500;
        }
        let before = table.data_files().expect("files").len();
        let report = table.compact(&ctx, &options).await.expect("compact");
        assert!(report.files_removed >= 4, "each round merges at least its new micro-batches: {report:?}");
        // (Besides the first file: an earlier merged file the round did not take.)
        left_alone += usize::from(before - report.files_removed > 1);
        rewritten += report.rows;
        // What a round merging every small file would have rewritten: every row appended so far.
        untiered += appended;
    }
    assert!(
        table.data_files().expect("files").iter().any(|f| f.path == snapshot),
        "the large first file was never rewritten"
    );
    assert!(left_alone > 0, "some rounds left an earlier merged file alone");
    assert!(
        rewritten * 2 < untiered,
        "{rewritten} rows rewritten for {appended} appended (merging every small file: {untiered})"
    );
    assert_eq!(ids(&ctx, &table).await, (0..next).collect::<Vec<_>>(), "every row once");
    let mut ranges: Vec<(i64, i64)> = table
        .data_files()
        .expect("files")
        .iter()
        .map(|f| (f.min_i64("id").expect("min"), f.max_i64("id").expect("max")))
        .collect();
    ranges.sort_unstable();
    assert!(ranges.windows(2).all(|w| w[0].1 < w[1].0), "merged files hold disjoint, neighbouring ranges: {ranges:?}");
}
