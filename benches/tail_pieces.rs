//! What a refresh pays to extend the tail it holds in memory (`live::extend_tail_pieces`), against
//! the size of that tail: every refresh of a live handle applies its new raw changes (a few
//! hundred) to the held pieces of each history (the first change of each key, and the versions
//! the tail opens), and the held pieces grow with every change since the last fold.
//!
//! The held pieces are those of `held` inserted keys (computed by the SQL statements the pieces
//! stand for, and held as one batch, as a refresh leaves them once it merges its batches); the
//! new changes are 500 updates of random held keys and 100 inserts of new keys, all after the
//! held position. The baseline, in the same run, is the same changes applied to an empty tail:
//! the cost of the changes themselves. The summary gives each size's time as a ratio of it.
//!
//! Run: `cargo bench --bench tail_pieces` (`ACME_BENCH_TAIL_SIZES=0,10000,100000,400000` by
//! default).

use std::sync::Arc;
use std::time::{Duration, Instant};

use acme::core::raw;
use acme::model::HistorySpec;
use acme::model::live::{extend_tail_pieces, first_changes_sql, tail_versions_sql};
use acme::query::datafusion::datasource::MemTable;
use acme::query::datafusion::prelude::SessionContext;
use arrow::array::{ArrayRef, Int64Array, RecordBatch, StringArray, TimestampMicrosecondArray};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use criterion::{Criterion, criterion_group, criterion_main};

/// Updates of held keys, and inserts of new ones, in one refresh's changes.
const UPDATES: usize = 500;
const INSERTS: usize = 100;

fn next(state: &mut u64) -> u64 {
    *state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    *state >> 33
}

/// Raw changes of a table keyed by `id` (one change per transaction): `(id, op)` from commit
/// LSN `from` on.
fn changes(rows: &[(i64, &str)], from: i64) -> RecordBatch {
    let utc = DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()));
    let schema = Arc::new(Schema::new(vec![
        Field::new("id", DataType::Int64, true),
        Field::new("name", DataType::Utf8, true),
        Field::new(raw::COMMIT_TS, utc, true),
        Field::new(raw::LSN, DataType::Int64, true),
        Field::new(raw::SEQ, DataType::Int64, true),
        Field::new(raw::OP, DataType::Utf8, true),
    ]));
    let lsn: Vec<i64> = (0..rows.len() as i64).map(|i| from + i).collect();
    let columns: Vec<ArrayRef> = vec![
        Arc::new(Int64Array::from_iter_values(rows.iter().map(|r| r.0))),
        Arc::new(StringArray::from_iter_values(rows.iter().map(|r| format!("name {}", r.0)))),
        Arc::new(TimestampMicrosecondArray::from_iter_values(lsn.iter().map(|l| l * 1000)).with_timezone("UTC")),
        Arc::new(Int64Array::from(lsn.clone())),
        Arc::new(Int64Array::from(vec![0; rows.len()])),
        Arc::new(StringArray::from_iter_values(rows.iter().map(|r| r.1))),
    ];
    RecordBatch::try_new(schema, columns).expect("changes")
}

/// A held piece: its schema and its rows as one batch.
type Piece = (SchemaRef, Vec<RecordBatch>);

/// The held pieces of `held` inserted keys, and one refresh's changes after them.
fn held_tail(runtime: &tokio::runtime::Runtime, held: usize) -> (Piece, Piece, RecordBatch) {
    let spec = HistorySpec::new("items", "id");
    let attributes = vec!["id".to_string(), "name".to_string()];
    let inserts: Vec<(i64, &str)> = (0..held as i64).map(|id| (id, "insert")).collect();
    // (With no held key, the pieces of one key: the SQL gives a schema with its rows.)
    let all = changes(if held == 0 { &[(0, "insert")] } else { &inserts }, 1);
    let ctx = SessionContext::new();
    ctx.register_table("all_changes", Arc::new(MemTable::try_new(all.schema(), vec![vec![all]]).expect("table")))
        .expect("register");
    let piece = |sql: String| {
        runtime.block_on(async {
            let frame = ctx.sql(&sql).await.expect("plan");
            let schema: SchemaRef = Arc::new(frame.schema().as_arrow().clone());
            let batches = frame.collect().await.expect("run");
            let one = arrow::compute::concat_batches(&schema, &batches).expect("concat");
            let rows = if held == 0 { one.slice(0, 0) } else { one };
            (schema, vec![rows])
        })
    };
    let first = piece(first_changes_sql(&spec, "all_changes", &attributes, 0));
    let versions = piece(tail_versions_sql(&spec, "all_changes", &attributes, 0, &[]));
    let mut state = 42u64;
    let mut new: Vec<(i64, &str)> = Vec::new();
    if held > 0 {
        new.extend((0..UPDATES).map(|_| ((next(&mut state) % held as u64) as i64, "update")));
    }
    new.extend((0..INSERTS as i64).map(|i| (held as i64 + i, "insert")));
    (first, versions, changes(&new, held as i64 + 10))
}

fn bench(c: &mut Criterion) {
    let sizes: Vec<usize> = std::env::var("ACME_BENCH_TAIL_SIZES")
        .unwrap_or_else(|_| "0,10000,100000,400000".into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime");
    let spec = HistorySpec::new("items", "id");
    let mut summary = Vec::new();
    let mut group = c.benchmark_group("extend_tail_pieces");
    group.measurement_time(Duration::from_secs(5));
    for &held in &sizes {
        let (first, versions, new) = held_tail(&runtime, held);
        let extend =
            || extend_tail_pieces(&spec, &new, (&first.0, &first.1), (&versions.0, &versions.1)).expect("extend");
        // Checked before timing: every held key stays, the new keys are added, and each update
        // closes one open version and opens one.
        let (out_first, out_versions) = extend();
        let rows = |batches: &[RecordBatch]| batches.iter().map(RecordBatch::num_rows).sum::<usize>();
        let updates = if held > 0 { UPDATES } else { 0 };
        assert_eq!(rows(&out_first), held + INSERTS, "first changes of {held} held keys");
        assert_eq!(rows(&out_versions), held + INSERTS + updates, "versions of {held} held keys");
        group.bench_function(format!("held {held} keys"), |b| b.iter(extend));
        // The summary's own median, over the same calls.
        let mut times: Vec<Duration> = (0..51)
            .map(|_| {
                let started = Instant::now();
                std::hint::black_box(extend());
                started.elapsed()
            })
            .collect();
        times.sort();
        summary.push((held, times[times.len() / 2]));
    }
    group.finish();
    let baseline = summary.first().map(|(_, t)| t.as_secs_f64()).unwrap_or(1.0);
    println!("\n| held keys | median | ratio to the first size |\n|---|---|---|");
    for (held, time) in &summary {
        println!("| {held} | {:.2} ms | {:.1}x |", time.as_secs_f64() * 1000.0, time.as_secs_f64() / baseline);
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
