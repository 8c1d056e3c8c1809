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
