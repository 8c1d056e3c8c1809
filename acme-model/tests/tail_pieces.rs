//! The tail pieces extended in memory (`live::extend_tail_pieces`) equal the pieces the SQL
//! statements compute over all the changes at once, for random change mixes: inserts,
//! updates, deletes, keys deleted and inserted again, several changes of a key in one
//! transaction, and the held position falling anywhere (mid-key, between transactions).

use std::sync::Arc;

use acme_core::raw;
use acme_model::history::HistorySpec;
use acme_model::live::{extend_tail_pieces, first_changes_sql, tail_versions_sql};
use arrow::array::{ArrayRef, Int32Array, Int64Array, RecordBatch, StringArray, TimestampMicrosecondArray};
use arrow::datatypes::{DataType, Field, Schema, TimeUnit};
use datafusion::datasource::MemTable;
use datafusion::prelude::SessionContext;

fn next(state: &mut u64) -> u64 {
    *state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    *state >> 33
}

/// Random raw changes of a table keyed by `id`: per transaction (one commit LSN) one to four
/// changes, in order of their position in it.
fn changes(seed: u64, transactions: usize) -> RecordBatch {
    let mut state = seed;
    let mut exists = std::collections::HashMap::new();
    let (mut ids, mut names, mut qty, mut ts, mut lsn, mut seq, mut op) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for t in 0..transactions {
        let commit = 1000 + t as i64 * 10;
        for s in 0..1 + next(&mut state) % 4 {
            let id = (next(&mut state) % 12) as i64;
            let live = *exists.get(&id).unwrap_or(&false);
            let kind = match (live, next(&mut state) % 4) {
                (false, _) => "insert",
                (true, 0) => "delete",
                (true, _) => "update",
            };
            exists.insert(id, kind != "delete");
            ids.push(Some(id));
            names.push((!next(&mut state).is_multiple_of(5)).then(|| format!("n{}", next(&mut state) % 100)));
            qty.push((!next(&mut state).is_multiple_of(7)).then(|| (next(&mut state) % 50) as i32));
            ts.push(Some(commit * 1000));
            lsn.push(Some(commit));
            seq.push(Some(s as i64));
            op.push(Some(kind.to_string()));
        }
    }
    let utc = DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()));
    let schema = Arc::new(Schema::new(vec![
        Field::new("id", DataType::Int64, true),
        Field::new("name", DataType::Utf8, true),
        Field::new("qty", DataType::Int32, true),
        Field::new(raw::COMMIT_TS, utc, true),
        Field::new(raw::LSN, DataType::Int64, true),
        Field::new(raw::SEQ, DataType::Int64, true),
        Field::new(raw::OP, DataType::Utf8, true),
    ]));
    let columns: Vec<ArrayRef> = vec![
        Arc::new(Int64Array::from(ids)),
        Arc::new(StringArray::from(names)),
        Arc::new(Int32Array::from(qty)),
        Arc::new(TimestampMicrosecondArray::from(ts).with_timezone("UTC")),
        Arc::new(Int64Array::from(lsn)),
        Arc::new(Int64Array::from(seq)),
        Arc::new(StringArray::from(op)),
    ];
    RecordBatch::try_new(schema, columns).expect("changes")
}

/// `batches` cut into batches of at most `rows` rows.
fn small_batches(batches: &[RecordBatch], rows: usize) -> Vec<RecordBatch> {
    batches
        .iter()
        .flat_map(|b| (0..b.num_rows()).step_by(rows).map(move |at| b.slice(at, rows.min(b.num_rows() - at))))
        .collect()
}

async fn query(ctx: &SessionContext, sql: &str) -> (Arc<Schema>, Vec<RecordBatch>) {
    let df = ctx.sql(sql).await.expect("plan");
    let schema = Arc::new(df.schema().as_arrow().clone());
    (schema, df.collect().await.expect("run"))
}

/// Rows as sorted text lines, to compare regardless of order and batch boundaries.
fn lines(batches: &[RecordBatch]) -> Vec<String> {
    let text = arrow::util::pretty::pretty_format_batches(batches).expect("format").to_string();
    let mut rows: Vec<String> = text.lines().filter(|l| l.starts_with("| ")).skip(1).map(str::to_string).collect();
    rows.sort();
    rows
}

/// `batch` with its key column `id` cast to `key_type`.
fn keyed_by(batch: RecordBatch, key_type: &DataType) -> RecordBatch {
    let mut fields: Vec<Field> = batch.schema().fields().iter().map(|f| f.as_ref().clone()).collect();
    fields[0] = Field::new("id", key_type.clone(), true);
    let mut columns = batch.columns().to_vec();
    columns[0] = arrow::compute::cast(&columns[0], key_type).expect("cast the key");
    RecordBatch::try_new(Arc::new(Schema::new(fields)), columns).expect("batch")
}

/// Integer keys (looked up as integers) and text keys (looked up by their row format) alike.
#[tokio::test]
async fn extending_held_pieces_equals_computing_them_over_all_changes() {
    for key_type in [DataType::Int64, DataType::Int32, DataType::Utf8] {
        extending_held_pieces_equals_computing_them_with(&key_type).await;
    }
}

async fn extending_held_pieces_equals_computing_them_with(key_type: &DataType) {
    let spec = HistorySpec::new("items", "id");
    let attributes = vec!["id".to_string(), "name".to_string(), "qty".to_string()];
    for seed in 0..40u64 {
        let all = keyed_by(changes(seed, 10 + (seed as usize % 5) * 15), key_type);
        let ctx = SessionContext::new();
        let table = MemTable::try_new(all.schema(), vec![vec![all.clone()]]).expect("table");
        ctx.register_table("all_changes", Arc::new(table)).expect("register");
        // Held up to a position that may fall anywhere, then the changes after it.
        let lsns = all.column(4).as_any().downcast_ref::<Int64Array>().expect("lsn column");
        let split = lsns.value((next(&mut seed.clone()) as usize) % lsns.len()) - if seed % 3 == 0 { 1 } else { 0 };
        let (first_schema, held_first) = query(
            &ctx,
            &first_changes_sql(&spec, "all_changes", &attributes, 0)
                .replace("AND _lsn > 0", &format!("AND _lsn > 0 AND _lsn <= {split}")),
        )
        .await;
        let held_versions_sql = tail_versions_sql(&spec, "all_changes", &attributes, 0, &[])
            .replace("AND _lsn > 0", &format!("AND _lsn > 0 AND _lsn <= {split}"));
        let (versions_schema, held_versions) = query(&ctx, &held_versions_sql).await;
        // Held as a refresh leaves them: in several batches, of which the changes close
        // versions in some only (a batch with none closed is passed on as it is).
        let held_versions = small_batches(&held_versions, 3);
        let held_first = small_batches(&held_first, 4);
        let after = arrow::compute::filter_record_batch(
            &all,
            &arrow::compute::kernels::cmp::gt(lsns, &Int64Array::new_scalar(split)).expect("compare"),
        )
        .expect("filter");

        let (first, versions) =
            extend_tail_pieces(&spec, &after, (&first_schema, &held_first), (&versions_schema, &held_versions))
                .unwrap_or_else(|e| panic!("seed {seed}, {key_type} keys: {e}"));

        let (_, want_first) = query(&ctx, &first_changes_sql(&spec, "all_changes", &attributes, 0)).await;
        let (_, want_versions) = query(&ctx, &tail_versions_sql(&spec, "all_changes", &attributes, 0, &[])).await;
        assert_eq!(
            lines(&first),
            lines(&want_first),
            "first changes, seed {seed}, {key_type} keys, held up to {split}"
        );
        assert_eq!(
            lines(&versions),
            lines(&want_versions),
            "versions, seed {seed}, {key_type} keys, held up to {split}"
        );
    }
}
