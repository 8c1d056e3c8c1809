//! Shared helpers: a fresh source database per test and readers of the raw layer.

use acme_core::{AcmeConfig, Layer, Storage};
use acme_testkit::PgCluster;
use arrow::array::RecordBatch;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

/// A fresh database with the ACME source schema.
pub async fn acme_source(prefix: &str) -> String {
    let url = PgCluster::shared().create_database(prefix).await.expect("create database");
    let client = acme_testkit::connect(&url).await.expect("connect");
    acme_testkit::create_source_schema(&client).await.expect("create schema");
    url
}

/// A config for `source` writing into `warehouse`.
pub fn config(source: &str, warehouse: &std::path::Path) -> AcmeConfig {
    AcmeConfig::builder()
        .source_url(source)
        .storage_url(warehouse.display().to_string())
        .batch_rows(4096)
        .build()
        .expect("config")
}

/// Every row of a raw table, read from its active Parquet files (local storage).
pub async fn read_raw(warehouse: &std::path::Path, table: &str) -> Vec<RecordBatch> {
    let storage = Storage::new(&warehouse.display().to_string(), Default::default()).expect("storage");
    let layer = storage.open(Layer::Raw, table).await.expect("open").expect("raw table exists");
    let mut batches = Vec::new();
    for uri in layer.delta().get_file_uris().expect("files") {
        let path = uri.strip_prefix("file://").unwrap_or(&uri).to_string();
        let file = std::fs::File::open(&path).expect("open parquet");
        let reader = ParquetRecordBatchReaderBuilder::try_new(file).expect("reader").build().expect("build");
        for batch in reader {
            batches.push(batch.expect("batch"));
        }
    }
    batches
}

/// Total rows of `batches`.
pub fn rows(batches: &[RecordBatch]) -> usize {
    batches.iter().map(|b| b.num_rows()).sum()
}
