//! The raw layer on a real S3 API server, and read by outside engines.

use std::collections::HashMap;

use acme_core::{Layer, Storage};
use acme_ingest::Snapshot;
use acme_testkit::{MotoServer, ScaleFactor};
use arrow::array::RecordBatch;
use arrow::compute::{SortColumn, concat_batches, lexsort_to_indices, take_record_batch};
use object_store::ObjectStoreExt;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

use crate::support::{acme_source, config};

/// Every row of a raw table, read through its object store, sorted by the table's key and
/// without the snapshot's own position columns.
async fn read_through_store(url: &str, options: HashMap<String, String>, table: &str, key: &str) -> RecordBatch {
    let storage = Storage::new(url, options).expect("storage");
    let layer = storage.open(Layer::Raw, table).await.expect("open").expect("table exists");
    let store = layer.delta().object_store();
    let snapshot = layer.delta().snapshot().expect("snapshot");
    let mut batches = Vec::new();
    for file in snapshot.log_data().iter() {
        let path = object_store::path::Path::from(file.path().as_ref());
        let bytes = store.get(&path).await.expect("get").bytes().await.expect("bytes");
        let reader = ParquetRecordBatchReaderBuilder::try_new(bytes).expect("reader").build().expect("build");
        batches.extend(reader.map(|b| b.expect("batch")));
    }
    let schema = layer.schema().expect("schema");
    let all = concat_batches(&schema, &batches).expect("concat");
    let keep: Vec<usize> = (0..schema.fields().len())
        .filter(|&i| !matches!(schema.field(i).name().as_str(), "_lsn" | "_commit_ts"))
        .collect();
    let all = all.project(&keep).expect("project");
    let sort = [SortColumn { values: all.column_by_name(key).expect("key").clone(), options: None }];
    let indices = lexsort_to_indices(&sort, None).expect("sort");
    take_record_batch(&all, &indices).expect("take")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_layer_on_s3_equals_raw_layer_on_local_files() {
    let moto = MotoServer::start().expect("moto S3 server (installed by .ci/run)");
    moto.create_bucket("acme-raw").expect("bucket");
    let url = acme_source("snap_s3").await;
    acme_testkit::bulk_load(&url, ScaleFactor::new(0.005).expect("sf"), 21).await.expect("load");
    let dir = tempfile::tempdir().expect("tmp");
    Snapshot::new(config(&url, dir.path())).await.expect("local snapshot");
    let mut s3 = config(&url, dir.path());
    s3.storage_url = "s3://acme-raw/warehouse".into();
    s3.storage_options = moto.storage_options();
    let report = Snapshot::new(s3.clone()).await.expect("S3 snapshot");
    assert!(report.tables.iter().all(|t| t.rows > 0));
    let local_url = dir.path().display().to_string();
    for (table, key) in [
        ("customers", "customer_id"),
        ("products", "product_id"),
        ("orders", "order_id"),
        ("order_items", "order_item_id"),
    ] {
        let local = read_through_store(&local_url, HashMap::new(), table, key).await;
        let remote = read_through_store(&s3.storage_url, s3.storage_options.clone(), table, key).await;
        assert!(local.num_rows() > 0);
        assert_eq!(local, remote, "{table} differs between local files and S3");
    }
    // A second writer sees the committed snapshot on S3 and copies nothing.
    assert!(Snapshot::new(s3).await.expect("again").already_done);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duckdb_reads_the_raw_layer_parquet() {
    let python = acme_testkit::outside::python().expect("Python venv with duckdb (installed by .ci/run)");
    let url = acme_source("snap_duckdb").await;
    acme_testkit::bulk_load(&url, ScaleFactor::new(0.005).expect("sf"), 22).await.expect("load");
    let dir = tempfile::tempdir().expect("tmp");
    Snapshot::new(config(&url, dir.path())).await.expect("snapshot");
    let storage = Storage::new(&dir.path().display().to_string(), HashMap::new()).expect("storage");
    let layer = storage.open(Layer::Raw, "orders").await.expect("open").expect("exists");
    let files: Vec<String> = layer
        .delta()
        .get_file_uris()
        .expect("files")
        .map(|u| u.strip_prefix("file://").unwrap_or(&u).to_string())
        .collect();
    let script = format!(
        "import duckdb, json\n\
         files = json.loads({files:?})\n\
         r = duckdb.sql(\"SELECT count(*), sum(order_id), count(DISTINCT status), min(order_date)::VARCHAR, \
         sum(CASE WHEN _op = 'snapshot' THEN 1 ELSE 0 END) FROM read_parquet(\" + repr(files) + \")\").fetchall()[0]\n\
         print(json.dumps(list(r)))",
        files = serde_json_like(&files)
    );
    let out = std::process::Command::new(python).args(["-c", &script]).output().expect("run python");
    assert!(out.status.success(), "duckdb failed: {}", String::from_utf8_lossy(&out.stderr));
    let printed = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let client = acme_testkit::connect(&url).await.expect("connect");
    let row = client
        .query_one(
            "SELECT count(*), sum(order_id)::int8, count(DISTINCT status), min(order_date)::text FROM operations.orders",
            &[],
        )
        .await
        .expect("oracle");
    let (count, sum, statuses, min_date): (i64, i64, i64, String) = (row.get(0), row.get(1), row.get(2), row.get(3));
    assert_eq!(printed, format!("[{count}, {sum}, {statuses}, \"{min_date}\", {count}]"));
}

fn serde_json_like(files: &[String]) -> String {
    let quoted: Vec<String> =
        files.iter().map(|f| format!("\"{}\"", f.replace('\\', "\\\\").replace('"', "\\\""))).collect();
    format!("[{}]", quoted.join(", "))
}
