//! Key lookups on real files: the rows of a few keys, read from the pages that hold them,
//! equal a filter over the whole table, in sorted and unsorted files alike, and a lookup in
//! a table sorted by key reads a number of rows that follows the keys, not the table.

use std::sync::Arc;

use acme_core::{CommitMode, CompactOptions, Layer, Position, Storage, storage::PAGE_ROWS};
use arrow::array::{Array, AsArray, Int64Array, RecordBatch, StringArray};
use arrow::datatypes::{DataType, Field, Int64Type, Schema};
use datafusion::prelude::SessionContext;

fn schema() -> Arc<Schema> {
    Arc::new(Schema::new(vec![Field::new("id", DataType::Int64, true), Field::new("name", DataType::Utf8, true)]))
}

async fn append(table: &mut acme_core::LayerTable, ids: Vec<Option<i64>>, position: i64) {
    let names: Vec<String> = ids.iter().map(|i| format!("n{i:?}")).collect();
    let batch =
        RecordBatch::try_new(schema(), vec![Arc::new(Int64Array::from(ids)), Arc::new(StringArray::from(names))])
            .expect("batch");
    let mut writer = table.writer(1 << 30).expect("writer");
    writer.write(table.name(), batch).await.expect("write");
    let files = writer.finish(table.name()).await.expect("finish");
    table.commit(files, &Position::new("test", position), CommitMode::Append).await.expect("commit");
}

/// (id, name) pairs of some batches, sorted.
fn pairs(batches: &[RecordBatch]) -> Vec<(i64, String)> {
    let mut out: Vec<(i64, String)> = batches
        .iter()
        .flat_map(|b| {
            let ids = b.column_by_name("id").expect("id").as_primitive::<Int64Type>().clone();
            let names = arrow::compute::cast(b.column_by_name("name").expect("name"), &DataType::Utf8).expect("cast");
            let names = names.as_string::<i32>().clone();
            (0..b.num_rows())
                .filter(|&i| ids.is_valid(i))
                .map(|i| (ids.value(i), names.value(i).to_string()))
                .collect::<Vec<_>>()
        })
        .collect();
    out.sort();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lookup_reads_the_rows_of_its_keys_from_their_pages_only() {
    let dir = tempfile::tempdir().expect("tmp");
    let storage = Storage::new(&dir.path().display().to_string(), Default::default()).expect("storage");
    let mut table = storage.open_or_create(Layer::Intermediate, "versions", &schema()).await.expect("table");
    // 40 keys per 1,000 rows, each key with several versions, in three unsorted files, and
    // one file with a null key.
    let rows = 60_000i64;
    for part in 0..3i64 {
        let ids = (0..rows / 3).map(|i| Some((i * 7919 + part * 13) % (rows / 25))).collect();
        append(&mut table, ids, part + 1).await;
    }
    append(&mut table, vec![None, Some(5)], 4).await;
    let ctx = SessionContext::new();
    let keys = [5i64, 17, 1_000, 2_399, 2_400, -3, 5];
    let expected =
        |batches: &[RecordBatch]| pairs(batches).into_iter().filter(|(id, _)| keys.contains(id)).collect::<Vec<_>>();
    let all = ctx.read_table(table.provider(None).expect("provider")).expect("read").collect().await.expect("rows");
    let index = table.key_index("id").await.expect("index");
    assert_eq!(index.max_key(), Some(rows / 25 - 1));
    let found = index.rows(&keys, None).await.expect("lookup");
    assert!(!found.is_empty());
    assert_eq!(pairs(&found), expected(&all), "unsorted files: the rows of the keys");
    assert!(index.rows(&[], None).await.expect("none").is_empty());
    assert!(index.rows(&[rows], None).await.expect("above every key").is_empty());
    // Only some columns.
    let ids = index.rows(&keys, Some(&["id"])).await.expect("ids");
    assert_eq!(ids.iter().map(|b| b.num_columns()).max(), Some(1));
    assert_eq!(ids.iter().map(|b| b.num_rows()).sum::<usize>(), expected(&all).len());

    // Sorted by key, as model tables are compacted: the lookup reads a page per key.
    let options = CompactOptions { min_files: 2, ..CompactOptions::sorted_by(&["id"]) };
    assert_eq!(table.compact(&ctx, &options).await.expect("compact").files_removed, 4);
    let index = table.key_index("id").await.expect("index");
    assert_eq!(index.rows_indexed(), rows as usize + 2);
    let found = index.rows(&keys, None).await.expect("lookup");
    assert_eq!(pairs(&found), expected(&all), "sorted file: the rows of the keys");
    let read = index.selected_rows(&keys);
    assert!(read <= 2 * 5 * PAGE_ROWS, "{read} rows read for 5 keys (pages of {PAGE_ROWS} rows)");
    assert!(read < index.rows_indexed() / 4, "{read} of {} rows read", index.rows_indexed());
}

/// Indexes of one table by two columns find the rows of each, and hold one footer per file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn indexes_by_two_columns_share_each_files_footer() {
    let dir = tempfile::tempdir().expect("tmp");
    let storage = Storage::new(&dir.path().display().to_string(), Default::default()).expect("storage");
    let schema = Arc::new(Schema::new(vec![
        Field::new("id", DataType::Int64, true),
        Field::new("other", DataType::Int64, true),
    ]));
    let mut table = storage.open_or_create(Layer::Presentation, "pairs", &schema).await.expect("table");
    for part in 0..3i64 {
        let ids: Vec<i64> = (part * 10_000..(part + 1) * 10_000).collect();
        let others: Vec<i64> = ids.iter().map(|i| (i * 7_919) % 30_000).collect();
        let batch = RecordBatch::try_new(
            Arc::clone(&schema),
            vec![Arc::new(Int64Array::from(ids)), Arc::new(Int64Array::from(others))],
        )
        .expect("batch");
        let mut writer = table.writer(1 << 30).expect("writer");
        writer.write(table.name(), batch).await.expect("write");
        let files = writer.finish(table.name()).await.expect("finish");
        table.commit(files, &Position::new("test", part + 1), CommitMode::Append).await.expect("commit");
    }
    let by_id = table.key_index("id").await.expect("by id");
    let by_other = table.key_index("other").await.expect("by other");
    assert_eq!(by_other.footers_shared_with(&by_id), 3, "one footer per file, shared");
    let ids = |batches: &[RecordBatch]| {
        let mut out: Vec<(i64, i64)> = batches
            .iter()
            .flat_map(|b| {
                let id = b.column_by_name("id").expect("id").as_primitive::<Int64Type>().clone();
                let other = b.column_by_name("other").expect("other").as_primitive::<Int64Type>().clone();
                (0..b.num_rows()).map(move |i| (id.value(i), other.value(i)))
            })
            .collect();
        out.sort();
        out
    };
    assert_eq!(
        ids(&by_id.rows(&[5, 29_999], None).await.expect("ids")),
        vec![(5, 5 * 7_919 % 30_000), (29_999, 29_999 * 7_919 % 30_000)]
    );
    // 7,919 is prime to 30,000: each `other` value names one id.
    let wanted = [0i64, 7_919, 12_345];
    let found = ids(&by_other.rows(&wanted, None).await.expect("others"));
    let mut expected: Vec<(i64, i64)> =
        (0..30_000i64).map(|i| (i, i * 7_919 % 30_000)).filter(|(_, o)| wanted.contains(o)).collect();
    expected.sort();
    assert_eq!(found, expected);
}

/// A model table's column of distinct strings keeps a small dictionary (a lookup decodes the
/// whole dictionary of each column chunk it reads a page of), while a column of few values
/// stays dictionary-encoded; a lookup reads the same rows either way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_tables_dictionaries_stay_small() {
    use parquet::basic::Encoding;
    use parquet::file::reader::{FileReader, SerializedFileReader};
    let dir = tempfile::tempdir().expect("tmp");
    let storage = Storage::new(&dir.path().display().to_string(), Default::default()).expect("storage");
    let schema = Arc::new(Schema::new(vec![
        Field::new("id", DataType::Int64, true),
        Field::new("name", DataType::Utf8, true),
        Field::new("status", DataType::Utf8, true),
    ]));
    let mut table = storage.open_or_create(Layer::Intermediate, "people", &schema).await.expect("table");
    let rows = 50_000i64;
    let names: Vec<String> = (0..rows).map(|i| format!("customer number {i} of a long list of names")).collect();
    let statuses: Vec<&str> = (0..rows).map(|i| ["PENDING", "SHIPPED", "COMPLETED"][(i % 3) as usize]).collect();
    let batch = RecordBatch::try_new(
        Arc::clone(&schema),
        vec![
            Arc::new(Int64Array::from_iter_values(0..rows)),
            Arc::new(StringArray::from(names.clone())),
            Arc::new(StringArray::from(statuses)),
        ],
    )
    .expect("batch");
    let mut writer = table.writer(1 << 30).expect("writer");
    writer.write(table.name(), batch).await.expect("write");
    let files = writer.finish(table.name()).await.expect("finish");
    table.commit(files, &Position::new("test", 1), CommitMode::Append).await.expect("commit");
    let root = dir.path().join(Layer::Intermediate.dir()).join("people");
    let files = table.data_files().expect("files");
    assert_eq!(files.len(), 1);
    let reader =
        SerializedFileReader::new(std::fs::File::open(root.join(&files[0].path)).expect("file")).expect("parquet");
    let chunk = reader.metadata().row_group(0).clone();
    // The dictionary page's compressed bytes: from its offset to the first data page's.
    let dictionary_bytes = |column: usize| {
        let c = chunk.column(column);
        c.dictionary_page_offset().map(|at| c.data_page_offset() - at).unwrap_or(0) as usize
    };
    let (name, status) = (chunk.column(1), chunk.column(2));
    assert!(
        name.uncompressed_size() > 4 * acme_core::storage::MODEL_DICTIONARY_BYTES as i64,
        "a column worth bounding"
    );
    assert!(
        dictionary_bytes(1) <= acme_core::storage::MODEL_DICTIONARY_BYTES + 1024,
        "the names' dictionary page takes {} bytes",
        dictionary_bytes(1)
    );
    assert!(name.encodings().any(|e| e == Encoding::PLAIN), "past the bound the names are written plain");
    assert!(status.encodings().any(|e| e == Encoding::RLE_DICTIONARY), "the statuses keep their dictionary");
    let index = table.key_index("id").await.expect("index");
    let keys = [3i64, 49_999, 20_000];
    let found = index.rows(&keys, Some(&["id", "name"])).await.expect("lookup");
    let mut expected: Vec<(i64, String)> = keys.iter().map(|k| (*k, names[*k as usize].clone())).collect();
    expected.sort();
    assert_eq!(pairs(&found), expected);
}
