//! Shared helpers: a fresh source database per test and readers of the raw layer.

use acme_core::{AcmeConfig, Layer, Storage};
use arrow::array::RecordBatch;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

/// A fresh database with the ACME source schema.
pub async fn acme_source(prefix: &str) -> String {
    acme_testkit::acme_database(prefix, None).await.expect("ACME source database")
}

/// A config for `source` writing into `warehouse`.
pub fn config(source: &str, warehouse: &std::path::Path) -> AcmeConfig {
    AcmeConfig::builder()
        .source_url(source)
        .slot(acme_testkit::slot_for(source))
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

/// The current state of a source table rebuilt from its raw changes (applied in LSN and
/// sequence order): key -> rendered values of `columns`. Also checks that no change is stored
/// twice.
pub async fn replay_raw(
    warehouse: &std::path::Path,
    table: &str,
    key: &str,
    columns: &[&str],
) -> std::collections::BTreeMap<i64, Vec<String>> {
    use arrow::array::{Array, AsArray};
    use arrow::datatypes::Int64Type;
    use arrow::util::display::{ArrayFormatter, FormatOptions};
    let batches = read_raw(warehouse, table).await;
    let mut changes: Vec<(i64, i64, String, i64, Vec<String>)> = Vec::new();
    for b in &batches {
        let op = b.column_by_name(acme_core::raw::OP).expect("op").as_string::<i32>().clone();
        let lsn = b.column_by_name(acme_core::raw::LSN).expect("lsn").as_primitive::<Int64Type>().clone();
        let seq = b.column_by_name(acme_core::raw::SEQ).expect("seq").as_primitive::<Int64Type>().clone();
        let keys = b.column_by_name(key).expect("key").as_primitive::<Int64Type>().clone();
        let options = FormatOptions::default().with_null("NULL");
        // Files written before a column was added do not have it: it reads as NULL.
        let formatters: Vec<Option<ArrayFormatter<'_>>> = columns
            .iter()
            .map(|c| b.column_by_name(c).map(|a| ArrayFormatter::try_new(a.as_ref(), &options).expect("fmt")))
            .collect();
        for i in 0..b.num_rows() {
            let values =
                formatters.iter().map(|f| f.as_ref().map_or("NULL".to_string(), |f| f.value(i).to_string())).collect();
            let k = if keys.is_null(i) { i64::MIN } else { keys.value(i) };
            let s = if seq.is_null(i) { -1 } else { seq.value(i) };
            changes.push((lsn.value(i), s, op.value(i).to_string(), k, values));
        }
    }
    changes.sort_by_key(|c| (c.0, c.1, c.3));
    let mut seen = std::collections::HashSet::new();
    for c in &changes {
        if c.2 != "snapshot" {
            assert!(seen.insert((c.0, c.1)), "{table}: change at lsn {} seq {} stored twice", c.0, c.1);
        }
    }
    let mut state = std::collections::BTreeMap::new();
    for (_, _, op, k, values) in changes {
        match op.as_str() {
            "snapshot" | "insert" | "update" => {
                state.insert(k, values);
            }
            "delete" => {
                state.remove(&k);
            }
            "truncate" => state.clear(),
            other => panic!("unknown op {other}"),
        }
    }
    state
}

/// The same columns read from the source, rendered as PostgreSQL text.
pub async fn source_state(
    url: &str,
    table: &str,
    key: &str,
    columns: &[&str],
) -> std::collections::BTreeMap<i64, Vec<String>> {
    let client = acme_testkit::connect(url).await.expect("connect");
    let list: Vec<String> = columns.iter().map(|c| format!("coalesce({c}::text, 'NULL')")).collect();
    let rows = client
        .query(&format!("SELECT {key}, {} FROM operations.{table}", list.join(", ")), &[])
        .await
        .expect("source rows");
    rows.iter().map(|r| (r.get::<_, i64>(0), (1..=columns.len()).map(|i| r.get::<_, String>(i)).collect())).collect()
}
