//! What the storage stack does with Delta deletion vectors: the facts a merge-on-read fold
//! (issue 16: a fold that marks a stored row superseded instead of rewriting its file) would
//! rest on, checked against the versions acme builds with.
//!
//! - delta-rs commits a file's `remove` plus its `add` with a deletion vector (a Roaring bitmap
//!   of row positions, written with the Delta kernel's writer) to a table whose protocol has the
//!   `deletionVectors` feature, and its DataFusion provider leaves those rows out;
//! - an outside reader with delta-rs's Python binding applies it through `QueryBuilder`, and
//!   DuckDB queries that result. (The binding's `to_pyarrow_dataset` and `to_pyarrow_table`
//!   refuse such a table in deltalake 1.6: an outside reader of a table with deletion vectors
//!   uses `QueryBuilder`.)

use std::sync::Arc;

use arrow::array::{AsArray, Int64Array, RecordBatch};
use arrow::datatypes::{DataType, Field, Int64Type, Schema};
use buoyant_kernel::actions::deletion_vector_writer::{KernelDeletionVector, StreamingDeletionVectorWriter};
use deltalake::TableProperty;
use deltalake::kernel::transaction::CommitBuilder;
use deltalake::kernel::{Action, DeletionVectorDescriptor, StorageType};
use deltalake::protocol::DeltaOperation;

/// A table of one `id` column with deletion vectors enabled, written as two files (ids 0..100
/// and 100..200).
async fn table_of_two_files(path: &std::path::Path) -> deltalake::DeltaTable {
    let url = url::Url::from_directory_path(path).expect("a table URL");
    let column = deltalake::kernel::StructField::new(
        "id",
        deltalake::kernel::DataType::Primitive(deltalake::kernel::PrimitiveType::Long),
        false,
    );
    let mut table = deltalake::DeltaTable::try_from_url(url)
        .await
        .expect("a table handle")
        .create()
        .with_columns(vec![column])
        .with_configuration_property(TableProperty::EnableDeletionVectors, Some("true"))
        .await
        .expect("create");
    let schema = Arc::new(Schema::new(vec![Field::new("id", DataType::Int64, false)]));
    for ids in [0..100, 100..200] {
        let batch = RecordBatch::try_new(Arc::clone(&schema), vec![Arc::new(Int64Array::from_iter_values(ids))])
            .expect("batch");
        table = table.write(vec![batch]).await.expect("write");
    }
    table
}

/// Write a deletion vector of `rows` (positions in a file) beside the table's data, and its
/// descriptor (stored relative to the table, named by a UUID, as the protocol derives it).
fn write_deletion_vector(table_dir: &std::path::Path, rows: &[u64]) -> DeletionVectorDescriptor {
    let uuid = uuid::Uuid::new_v4();
    let mut file = std::fs::File::create(table_dir.join(format!("deletion_vector_{uuid}.bin"))).expect("DV file");
    let mut writer = StreamingDeletionVectorWriter::new(&mut file);
    let mut vector = KernelDeletionVector::new();
    vector.add_deleted_row_indexes(rows.iter().copied());
    let written = writer.write_deletion_vector(vector).expect("write the DV");
    writer.finalize().expect("finish the DV file");
    DeletionVectorDescriptor {
        storage_type: StorageType::UuidRelativePath,
        path_or_inline_dv: z85::encode(uuid.as_bytes()),
        offset: Some(written.offset),
        size_in_bytes: written.size_in_bytes,
        cardinality: written.cardinality,
    }
}

/// The ids a DataFusion scan of the table's latest version returns, sorted.
async fn ids(table: &deltalake::DeltaTable) -> Vec<i64> {
    let ctx = datafusion::prelude::SessionContext::new();
    ctx.register_table("t", table.table_provider().await.expect("provider")).expect("register");
    let batches = ctx.sql("SELECT id FROM t ORDER BY id").await.expect("plan").collect().await.expect("rows");
    batches.iter().flat_map(|b| b.column(0).as_primitive::<Int64Type>().values().to_vec()).collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_deletion_vector_committed_through_delta_rs_hides_its_rows_from_delta_readers() {
    let dir = tempfile::tempdir().expect("dir");
    let mut table = table_of_two_files(dir.path()).await;
    let snapshot = table.snapshot().expect("snapshot").clone();
    let protocol = snapshot.protocol();
    assert!(protocol.min_reader_version() >= 3, "deletion vectors need reader version 3: {protocol:?}");

    // Rows 2, 3 and 97 of the file holding ids 0..100: the file stays, its add gains a vector.
    let gone = [2u64, 3, 97];
    let descriptor = write_deletion_vector(dir.path(), &gone);
    let mut actions = Vec::new();
    for file in snapshot.log_data().iter() {
        if !file.stats().is_some_and(|stats| stats.contains("\"minValues\":{\"id\":0}")) {
            continue;
        }
        // The file view's add action: the same file, which gains the vector's descriptor.
        #[allow(deprecated)]
        let mut add = file.add_action();
        actions.push(Action::Remove(file.remove_action(true)));
        add.deletion_vector = Some(descriptor.clone());
        actions.push(Action::Add(add));
    }
    assert_eq!(actions.len(), 2, "one file's remove and add");
    CommitBuilder::default()
        .with_actions(actions)
        .build(Some(&snapshot), table.log_store(), DeltaOperation::Delete { predicate: None })
        .await
        .expect("delta-rs commits a deletion vector");
    table.update_state().await.expect("latest version");

    let expected: Vec<i64> = (0..200).filter(|id| !gone.contains(&(*id as u64))).collect();
    assert_eq!(ids(&table).await, expected, "delta-rs's provider applies the vector");

    // An outside reader: delta-rs's Python binding, then DuckDB over what it returns.
    let python = acme_testkit::outside::python().expect("the Python environment of .ci/run");
    let script = r#"
import sys, json, duckdb, pyarrow as pa
from deltalake import DeltaTable, QueryBuilder
t = DeltaTable(sys.argv[1])
rows = pa.table(QueryBuilder().register("t", t).execute("SELECT id FROM t").read_all())
print(json.dumps(duckdb.connect().execute("SELECT list(id ORDER BY id) FROM rows").fetchone()[0]))
"#;
    let output = std::process::Command::new(python)
        .arg("-c")
        .arg(script)
        .arg(dir.path())
        .output()
        .expect("run the outside reader");
    assert!(output.status.success(), "outside reader failed: {}", String::from_utf8_lossy(&output.stderr));
    let outside: Vec<i64> = serde_json::from_slice(&output.stdout).expect("JSON ids");
    assert_eq!(outside, expected, "delta-rs Python's QueryBuilder applies the vector; DuckDB reads the result");
}

/// (id, open) rows of a table: `id` keys, several versions each, one open.
fn versions_schema() -> Arc<Schema> {
    Arc::new(Schema::new(vec![
        Field::new("id", DataType::Int64, true),
        Field::new("version", DataType::Int64, true),
        Field::new("open", DataType::Boolean, true),
    ]))
}

async fn append_versions(table: &mut acme_core::LayerTable, rows: &[(i64, i64, bool)], position: i64) {
    let batch = RecordBatch::try_new(
        versions_schema(),
        vec![
            Arc::new(Int64Array::from_iter_values(rows.iter().map(|r| r.0))),
            Arc::new(Int64Array::from_iter_values(rows.iter().map(|r| r.1))),
            Arc::new(arrow::array::BooleanArray::from_iter(rows.iter().map(|r| Some(r.2)))),
        ],
    )
    .expect("batch");
    let mut writer = table.writer(1 << 30).expect("writer");
    writer.write(table.name(), batch).await.expect("write");
    let adds = writer.finish(table.name()).await.expect("finish");
    table
        .commit(adds, &acme_core::Position::new("test", position), acme_core::CommitMode::Append)
        .await
        .expect("commit");
}

/// The (id, version, open) rows a query over acme's scan of the table returns, sorted.
async fn scanned(table: &acme_core::LayerTable) -> Vec<(i64, i64, bool)> {
    let ctx = datafusion::prelude::SessionContext::new();
    ctx.register_table("t", table.provider(None).expect("provider")).expect("register");
    let batches = ctx.sql("SELECT id, version, open FROM t ORDER BY id, version").await.expect("plan");
    triples(&batches.collect().await.expect("rows"))
}

/// The (id, version, open) rows of batches of those three columns, in their order.
fn triples(batches: &[RecordBatch]) -> Vec<(i64, i64, bool)> {
    batches
        .iter()
        .flat_map(|b| {
            let (id, v, o) = (
                b.column(0).as_primitive::<Int64Type>(),
                b.column(1).as_primitive::<Int64Type>(),
                b.column(2).as_boolean(),
            );
            (0..b.num_rows()).map(|i| (id.value(i), v.value(i), o.value(i))).collect::<Vec<_>>()
        })
        .collect()
}

async fn count(table: &acme_core::LayerTable) -> i64 {
    let ctx = datafusion::prelude::SessionContext::new();
    ctx.register_table("t", table.provider(None).expect("provider")).expect("register");
    let batches = ctx.sql("SELECT count(*) FROM t").await.expect("plan").collect().await.expect("count");
    batches[0].column(0).as_primitive::<Int64Type>().value(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acme_marks_superseded_rows_with_deletion_vectors_and_every_reader_leaves_them_out() {
    let dir = tempfile::tempdir().expect("dir");
    let storage = acme_core::Storage::new(&dir.path().display().to_string(), Default::default()).expect("storage");
    let mut table =
        storage.open_or_create(acme_core::Layer::Intermediate, "versions", &versions_schema()).await.expect("table");
    // Three files of 2,000 rows: ids 0..1000, two versions each (version 1 closed, 2 open),
    // then a third file repeating some ids' open versions in another order.
    let mut expected: Vec<(i64, i64, bool)> = Vec::new();
    for part in 0..2i64 {
        let rows: Vec<(i64, i64, bool)> = (part * 500..(part + 1) * 500)
            .flat_map(|id| [(id, 1, false), (id, 2, true)])
            .flat_map(|r| [r, r])
            .collect();
        let rows: Vec<_> = rows.chunks(2).map(|c| c[0]).collect();
        expected.extend(&rows);
        append_versions(&mut table, &rows, part + 1).await;
    }
    assert!(!table.supports_deletion_vectors());
    table.enable_deletion_vectors().await.expect("enable");
    assert!(table.supports_deletion_vectors());

    // Close the open versions of some ids: their open rows are marked, new rows appended.
    let closed = [3i64, 4, 499, 500, 998, 999, 12_345];
    let index = table.key_index("id").await.expect("index");
    let positions = index.positions(&closed, Some("open")).await.expect("positions");
    assert_eq!(positions.iter().map(|(_, rows)| rows.len()).sum::<u64>(), 6, "one open row per stored id");
    let files = table.data_files().expect("files");
    let deletions = positions
        .into_iter()
        .map(|(path, rows)| (files.iter().find(|f| f.path == path).expect("a file").clone(), rows))
        .collect();
    let replacement: Vec<(i64, i64, bool)> =
        closed.iter().filter(|id| **id < 1000).flat_map(|id| [(*id, 2, false), (*id, 3, true)]).collect();
    let mut writer = table.writer(1 << 30).expect("writer");
    writer
        .write(
            table.name(),
            RecordBatch::try_new(
                versions_schema(),
                vec![
                    Arc::new(Int64Array::from_iter_values(replacement.iter().map(|r| r.0))),
                    Arc::new(Int64Array::from_iter_values(replacement.iter().map(|r| r.1))),
                    Arc::new(arrow::array::BooleanArray::from_iter(replacement.iter().map(|r| Some(r.2)))),
                ],
            )
            .expect("batch"),
        )
        .await
        .expect("write");
    let adds = writer.finish(table.name()).await.expect("finish");
    table.commit_deletions(deletions, adds, Some(&acme_core::Position::new("test", 3))).await.expect("commit");
    expected.retain(|r| !(closed.contains(&r.0) && r.2));
    expected.extend(&replacement);
    expected.sort();
    assert_eq!(table.position("test").await.expect("position"), Some(3));
    let marked = table.data_files().expect("files").iter().filter(|f| f.deletion_vector.is_some()).count();
    assert_eq!(marked, 2, "both stored files marked, the new one not");

    // acme's scan, a count (statistics no longer exact), key lookups, and delta-rs agree.
    assert_eq!(scanned(&table).await, expected);
    assert_eq!(count(&table).await, expected.len() as i64);
    let index = table.key_index("id").await.expect("index");
    let found = index.rows(&[3, 4, 500, 7], Some(&["id", "version", "open"])).await.expect("lookup");
    let mut found = triples(&found);
    found.sort();
    let wanted: Vec<_> = expected.iter().filter(|r| [3, 4, 500, 7].contains(&r.0)).copied().collect();
    assert_eq!(found, wanted, "a key lookup leaves marked rows out");
    assert!(index.positions(&[3], Some("open")).await.expect("positions").iter().all(|(_, rows)| rows.len() == 1));
    // A key scan reads the pages of some keys only, without the marked rows.
    for keys in [vec![3i64, 4, 500, 7], vec![7], vec![12_345]] {
        let ctx = datafusion::prelude::SessionContext::new();
        ctx.register_table("t", table.key_scan(&index, &keys).expect("key scan")).expect("register");
        let list = keys.iter().map(i64::to_string).collect::<Vec<_>>().join(", ");
        let sql = format!("SELECT id, version, open FROM t WHERE id IN ({list}) ORDER BY id, version");
        let found = triples(&ctx.sql(&sql).await.expect("plan").collect().await.expect("rows"));
        let wanted: Vec<_> = expected.iter().filter(|r| keys.contains(&r.0)).copied().collect();
        assert_eq!(found, wanted, "a key scan of {keys:?}");
        let read = ctx.sql("SELECT count(*) FROM t").await.expect("plan").collect().await.expect("count");
        let read = read[0].column(0).as_primitive::<Int64Type>().value(0);
        // Every file holds one of the first keys; 7 is in the first and the appended file;
        // no file's range holds 12,345.
        let most = match keys.len() {
            4 => expected.len(),
            _ if keys == [7] => expected.iter().filter(|r| r.0 < 500 || r.1 == 3 || !r.2 && r.1 == 2).count(),
            _ => 0,
        };
        assert!(read >= wanted.len() as i64 && read <= most as i64, "{read} rows read for {keys:?}");
        assert!(keys.len() == 4 || read < expected.len() as i64, "{read} rows read for {keys:?}");
    }
    let delta_rs = ids(table.delta()).await;
    assert_eq!(delta_rs, expected.iter().map(|r| r.0).collect::<Vec<_>>(), "delta-rs applies acme's vectors");

    // A second marking of a file adds to its vector.
    let index = table.key_index("id").await.expect("index");
    let positions = index.positions(&[10], None).await.expect("positions");
    let files = table.data_files().expect("files");
    let deletions = positions
        .into_iter()
        .map(|(path, rows)| (files.iter().find(|f| f.path == path).expect("a file").clone(), rows))
        .collect();
    table.commit_deletions(deletions, Vec::new(), None).await.expect("commit");
    expected.retain(|r| r.0 != 10);
    assert_eq!(scanned(&table).await, expected);

    // Outside: delta-rs's Python binding, then DuckDB.
    let python = acme_testkit::outside::python().expect("the Python environment of .ci/run");
    let script = r#"
import sys, json, duckdb, pyarrow as pa
from deltalake import DeltaTable, QueryBuilder
t = DeltaTable(sys.argv[1])
rows = pa.table(QueryBuilder().register("t", t).execute("SELECT id, version FROM t").read_all())
print(json.dumps(duckdb.connect().execute("SELECT count(*), sum(id * 10 + version) FROM rows").fetchone()))
"#;
    let output = std::process::Command::new(python)
        .arg("-c")
        .arg(script)
        .arg(dir.path().join("intermediate/versions"))
        .output()
        .expect("run the outside reader");
    assert!(output.status.success(), "outside reader failed: {}", String::from_utf8_lossy(&output.stderr));
    let outside: (i64, i64) = serde_json::from_slice(&output.stdout).expect("JSON");
    assert_eq!(outside, (expected.len() as i64, expected.iter().map(|r| r.0 * 10 + r.1).sum::<i64>()));

    // A vacuum keeps the vectors the latest version reads.
    storage.vacuum(std::time::Duration::ZERO, false).await.expect("vacuum");
    table.refresh().await.expect("refresh");
    assert_eq!(scanned(&table).await, expected, "after a vacuum");

    // Compaction rewrites the rows readers see, without the marked ones.
    let ctx = datafusion::prelude::SessionContext::new();
    let options = acme_core::CompactOptions { min_files: 2, ..acme_core::CompactOptions::sorted_by(&["id"]) };
    table.compact(&ctx, &options).await.expect("compact");
    assert!(table.data_files().expect("files").iter().all(|f| f.deletion_vector.is_none()));
    assert_eq!(scanned(&table).await, expected);
}
