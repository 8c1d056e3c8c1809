//! Finding keys and reading rows by key: the keys changed since a handle, the stored rows
//! of a few keys (through `acme_core::KeyIndex`), and small Arrow helpers.

use super::*;

/// The stored rows of `keys`, looked up in `index` (only `columns`, when given; logged at debug
/// level).
pub(super) async fn looked_up_rows(
    index: &acme_core::KeyIndex,
    keys: &[i64],
    table: &str,
    columns: Option<&[&str]>,
) -> Result<Vec<RecordBatch>> {
    if keys.is_empty() {
        return Ok(Vec::new());
    }
    let rows = index.rows(keys, columns).await?;
    if tracing::enabled!(tracing::Level::DEBUG) {
        // (The selection is worked out again for the log only when it is written.)
        tracing::debug!(
            table,
            keys = keys.len(),
            rows_read = index.selected_rows(keys),
            rows_stored = index.rows_indexed(),
            "stored rows looked up"
        );
    }
    Ok(rows)
}

/// A fact table's rows as one handle sees them, among `stored` (looked-up stored rows): those
/// whose `key` the handle does not hold (`held`: its keys and rows), and its held rows that
/// `wanted` selects.
pub(super) async fn visible_rows(
    stored: &[RecordBatch],
    key: &str,
    held: Option<&KeysAndRows>,
    wanted: &impl Fn(&RecordBatch) -> Result<BooleanArray>,
) -> Result<Vec<RecordBatch>> {
    let Some((keys, rows)) = held else { return Ok(stored.to_vec()) };
    // The held keys sorted: a stored row's key is searched among them, instead of a set of
    // every key the tail touched being built at each call.
    let held_keys = held_values(keys, "k").await?;
    let mut out = Vec::new();
    for batch in stored {
        let kept = mask(&int64s(batch, key)?, |id| held_keys.binary_search(&id).is_err(), true);
        out.push(arrow::compute::filter_record_batch(batch, &kept)?);
    }
    for batch in held_rows(rows).await? {
        out.push(arrow::compute::filter_record_batch(&batch, &wanted(&batch)?)?);
    }
    Ok(out)
}

/// The rows of a relation the handle holds in memory.
pub(super) async fn held_rows(provider: &Arc<dyn TableProvider>) -> Result<Vec<RecordBatch>> {
    match crate::held_batches(provider).await {
        Some((_, batches)) => Ok(batches),
        None => Err(datafusion::error::DataFusionError::Internal("a held relation is not in memory".into()).into()),
    }
}

/// Column `name` of `batch` as booleans.
pub(super) fn bools(batch: &RecordBatch, name: &str) -> Result<BooleanArray> {
    Ok(arrow::compute::cast(column(batch, name)?, &arrow::datatypes::DataType::Boolean)?.as_boolean().clone())
}

/// Column `name` of `batch` as strings.
pub(super) fn strings(batch: &RecordBatch, name: &str) -> Result<arrow::array::StringArray> {
    Ok(arrow::compute::cast(column(batch, name)?, &arrow::datatypes::DataType::Utf8)?.as_string::<i32>().clone())
}

/// Column `name` of `batch`, or an error naming it.
pub(super) fn column<'a>(batch: &'a RecordBatch, name: &str) -> Result<&'a arrow::array::ArrayRef> {
    batch.column_by_name(name).ok_or_else(|| {
        datafusion::error::DataFusionError::Internal(format!("a held relation has no column `{name}`")).into()
    })
}

/// The distinct non-null values of integer column `column` of a held relation, sorted.
///
/// A relation of one batch whose column already holds them (a key relation as [`key_table`]
/// makes it: a handle's held keys, read several times by every refresh) is not copied: its
/// values buffer is shared.
pub(super) async fn held_values(
    provider: &Arc<dyn TableProvider>,
    column: &str,
) -> Result<arrow::buffer::ScalarBuffer<i64>> {
    let batches = held_rows(provider).await?;
    if let [batch] = &batches[..]
        && let Some(values) = self::column(batch, column)?.as_primitive_opt::<Int64Type>()
        && values.null_count() == 0
        && values.values().windows(2).all(|pair| pair[0] < pair[1])
    {
        return Ok(values.values().clone());
    }
    let mut values = Vec::new();
    for batch in &batches {
        values.extend(int64s(batch, column)?.iter().flatten());
    }
    values.sort_unstable();
    values.dedup();
    Ok(values.into())
}

/// The first column of a query's rows, as Int64 values (nulls left out).
pub(super) async fn int64_column(ctx: &SessionContext, sql: &str) -> Result<Vec<i64>> {
    let mut out = Vec::new();
    for batch in crate::plans::sql(ctx, sql).await?.collect().await? {
        let column = arrow::compute::cast(batch.column(0), &arrow::datatypes::DataType::Int64)?;
        out.extend(column.as_primitive::<Int64Type>().iter().flatten());
    }
    Ok(out)
}

/// Per history source (`orders`, ...): the keys its raw changes after `since` touch, sorted
/// (registered by [`register`] as `tail.raw_<source>_since`).
pub(super) async fn changed_keys(
    ctx: &SessionContext,
    tails: &[HistoryTail],
    since: i64,
) -> Result<HashMap<String, Vec<i64>>> {
    use datafusion::prelude::{ident, lit};
    // (The tables' keys are read concurrently: each is a small scan of the newest files.)
    let reads = tails.iter().map(|tail| async move {
        let relation = format!("{TAIL_SCHEMA}.raw_{}_since", tail.spec.table);
        if !ctx.table_exist(relation.as_str())? {
            return Ok(None);
        }
        let key = ident(&tail.spec.key);
        let changes = ctx
            .table(relation.as_str())
            .await?
            .filter(ident(acme_core::raw::LSN).gt(lit(since)).and(key.clone().is_not_null()))?
            .select(vec![key])?;
        let mut keys = Vec::new();
        for batch in changes.collect().await? {
            keys.extend(int64s(&batch, &tail.spec.key)?.iter().flatten());
        }
        keys.sort_unstable();
        keys.dedup();
        Ok::<_, crate::QueryError>(Some((tail.spec.table.clone(), keys)))
    });
    Ok(futures::future::try_join_all(reads).await?.into_iter().flatten().collect())
}

/// What `live::touched_keys_sql` selects for `star`, from the keys the changes since the
/// previous handle touch (`since`, per source) and held rows, without a query: the source's
/// changed keys; for a fact table, the rows with an Unknown member (in `unknown`: the stored
/// ones and the previous handle's) whose member a change touches; for the items, those of the
/// orders placed since with no stored version (`items_of`: their ids and the stored items'
/// lookup by order; `previous_rows`: the previous handle's items). `None` when a relation is
/// not held in memory or a column is not an integer: the statement finds them then.
pub(super) async fn touched_in_memory(
    star: &ModelTable,
    since: &HashMap<String, Vec<i64>>,
    unknown: impl Iterator<Item = &Arc<dyn TableProvider>>,
    previous_rows: &Arc<dyn TableProvider>,
    items_of: Option<(&[i64], StoredLookup)>,
) -> Result<Option<Vec<i64>>> {
    let Some(own) = since.get(star.source()) else { return Ok(None) };
    let mut keys = own.clone();
    let member = match star.name {
        tables::FACT_ORDERS => Some(("customer_sk", "customer_id", "customers")),
        tables::FACT_ORDER_ITEMS => Some(("product_sk", "product_id", "products")),
        _ => None,
    };
    if let Some((sk, id, source)) = member {
        let touched: KeySet = since.get(source).into_iter().flatten().copied().collect();
        if !touched.is_empty() {
            for provider in unknown {
                let Some((_, batches)) = crate::held_batches(provider).await else { return Ok(None) };
                for batch in batches {
                    let (sks, ids, own) = (int64s(&batch, sk)?, int64s(&batch, id)?, int64s(&batch, star.key)?);
                    let unknown_member = |i: usize| sks.is_valid(i) && sks.value(i) == -1;
                    keys.extend(
                        (0..batch.num_rows())
                            .filter(|&i| {
                                unknown_member(i)
                                    && ids.is_valid(i)
                                    && touched.contains(&ids.value(i))
                                    && own.is_valid(i)
                            })
                            .map(|i| own.value(i)),
                    );
                }
            }
        }
    }
    if let Some((orders, index)) = items_of.filter(|(orders, _)| !orders.is_empty()) {
        let placed: KeySet = orders.iter().copied().collect();
        for batch in index.rows(orders, Some(&[star.key])).await? {
            keys.extend(int64s(&batch, star.key)?.iter().flatten());
        }
        let Some((_, batches)) = crate::held_batches(previous_rows).await else { return Ok(None) };
        for batch in batches {
            let (order_ids, own) = (int64s(&batch, "order_id")?, int64s(&batch, star.key)?);
            keys.extend(
                (0..batch.num_rows())
                    .filter(|&i| order_ids.is_valid(i) && placed.contains(&order_ids.value(i)) && own.is_valid(i))
                    .map(|i| own.value(i)),
            );
        }
    }
    keys.sort_unstable();
    keys.dedup();
    Ok(Some(keys))
}

/// A set of keys probed once per held row at every refresh: hashed with foldhash, which costs a
/// fraction of the standard library's SipHash per lookup of an integer key (the keys come from
/// the source's rows, not from an adversary).
pub(crate) type KeySet = foldhash::HashSet<i64>;

/// Per row of `batch`: whether its `column` is (`members`) or is not (`!members`) one of `set`
/// (a null is in no set).
pub(super) fn membership(batch: &RecordBatch, column: &str, set: &KeySet, members: bool) -> Result<BooleanArray> {
    let ids = int64s(batch, column)?;
    Ok(mask(&ids, |id| set.contains(&id) == members, !members))
}

/// Per value of `ids`: `test` of it, or `null_is` for a null (as one buffer, with no nulls).
pub(super) fn mask(ids: &arrow::array::Int64Array, test: impl Fn(i64) -> bool, null_is: bool) -> BooleanArray {
    let values = ids.values();
    let bits = match ids.nulls() {
        None => arrow::buffer::BooleanBuffer::collect_bool(ids.len(), |i| test(values[i])),
        Some(nulls) => arrow::buffer::BooleanBuffer::collect_bool(ids.len(), |i| match nulls.is_valid(i) {
            true => test(values[i]),
            false => null_is,
        }),
    };
    BooleanArray::new(bits, None)
}

/// Column `name` of `batch` as 64-bit integers.
pub(super) fn int64s(batch: &arrow::array::RecordBatch, name: &str) -> Result<arrow::array::Int64Array> {
    Ok(arrow::compute::cast(column(batch, name)?, &arrow::datatypes::DataType::Int64)?
        .as_primitive::<Int64Type>()
        .clone())
}

/// The stored table's lookup by `key` (`<table>.<key>` in the held lookups), made once per
/// stored model; `None` when the table is not stored.
pub(super) async fn stored_lookup(
    inputs: &LiveInputs<'_>,
    held: &std::sync::Mutex<HeldStar>,
    table: &str,
    key: &str,
) -> Result<Option<StoredLookup>> {
    let name = format!("{table}.{key}");
    // (The lock is not held across the await.)
    let found = lock(held).lookups.get(&name).cloned();
    if let Some(index) = found {
        return Ok(Some(index));
    }
    let index = new_lookup(inputs, table, key).await?;
    if let Some(index) = &index {
        lock(held).lookups.insert(name, Arc::clone(index));
    }
    Ok(index)
}

/// A one-column relation `k` of `keys`, held in memory, and the memory it takes.
pub(super) fn key_table(keys: &[i64]) -> Result<(Arc<dyn TableProvider>, usize)> {
    owned_key_table(keys.to_vec())
}

/// [`key_table`] of keys the caller no longer needs (not copied).
pub(super) fn owned_key_table(keys: Vec<i64>) -> Result<(Arc<dyn TableProvider>, usize)> {
    let schema =
        Arc::new(Schema::new(vec![arrow::datatypes::Field::new("k", arrow::datatypes::DataType::Int64, true)]));
    let batches = if keys.is_empty() {
        Vec::new()
    } else {
        let column = Arc::new(arrow::array::Int64Array::from(keys)) as arrow::array::ArrayRef;
        vec![arrow::array::RecordBatch::try_new(Arc::clone(&schema), vec![column])?]
    };
    let bytes = batches.iter().map(arrow::array::RecordBatch::get_array_memory_size).sum();
    Ok((Arc::new(datafusion::datasource::MemTable::try_new(schema, vec![batches])?), bytes))
}

/// The first row of a query, as Int64 values.
pub(super) async fn int64_row(ctx: &SessionContext, sql: &str) -> Result<Vec<Option<i64>>> {
    let batches = crate::plans::sql(ctx, sql).await?.collect().await?;
    let Some(batch) = batches.iter().find(|b| b.num_rows() > 0) else { return Ok(Vec::new()) };
    Ok(batch
        .columns()
        .iter()
        .map(|c| {
            let c = arrow::compute::cast(c, &arrow::datatypes::DataType::Int64).ok()?;
            let c = c.as_primitive::<Int64Type>();
            (!c.is_null(0)).then(|| c.value(0))
        })
        .collect())
}

/// The raw operations that open a key's first version: a key whose first tail change is one
/// of these may have no stored version; one whose first tail change is an update or a delete
/// has one.
pub(super) const OPENING_OPS: [acme_core::raw::Operation; 2] =
    [acme_core::raw::Operation::Insert, acme_core::raw::Operation::Snapshot];

/// The batches of relation `name` of `ctx` when it is held in memory (not a view, a stored
/// table or a subquery): read directly, instead of planning a query over them.
pub(super) async fn held_relation(ctx: &SessionContext, name: &str) -> Option<Vec<RecordBatch>> {
    if name.starts_with('(') {
        return None;
    }
    let provider = ctx.table_provider(name).await.ok()?;
    crate::held_batches(&provider).await.map(|(_, batches)| batches)
}

/// The keys (column `k`, nulls left out) of relation `keys` of `ctx`: from memory when it is
/// held, else by a query.
pub(super) async fn relation_keys(ctx: &SessionContext, keys: &str) -> Result<Vec<i64>> {
    match held_relation(ctx, keys).await {
        Some(batches) => {
            let mut out = Vec::new();
            for batch in &batches {
                out.extend(int64s(batch, "k")?.iter().flatten());
            }
            Ok(out)
        }
        None => int64_column(ctx, &format!("SELECT k FROM {keys} s WHERE k IS NOT NULL")).await,
    }
}

/// The keys of a held first-change relation (columns `k`, `lsn`, `op`) whose first change
/// opens a version ([`OPENING_OPS`]), after `since` when given.
pub(super) fn opening_keys(first: &[RecordBatch], since: Option<i64>) -> Result<Vec<i64>> {
    let mut out = Vec::new();
    for batch in first {
        let (keys, lsns) = (int64s(batch, "k")?, int64s(batch, "lsn")?);
        let ops = strings(batch, "op")?;
        for i in 0..batch.num_rows() {
            let opens = ops.is_valid(i) && OPENING_OPS.iter().any(|op| op.as_str() == ops.value(i));
            let after = since.is_none_or(|since| lsns.is_valid(i) && lsns.value(i) > since);
            if opens && after && keys.is_valid(i) {
                out.push(keys.value(i));
            }
        }
    }
    Ok(out)
}

/// The largest value of integer column `column` over held batches, 0 when there is none (what
/// `coalesce(max(column), 0)` gives).
pub(super) fn held_max(batches: &[RecordBatch], column: &str) -> Result<i64> {
    let mut max = None;
    for batch in batches {
        max = max.max(arrow::compute::max(&int64s(batch, column)?));
    }
    Ok(max.unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{Int64Array, StringArray};
    use arrow::datatypes::{DataType, Field};

    fn first(rows: &[(Option<i64>, i64, &str)]) -> RecordBatch {
        let schema = Arc::new(Schema::new(vec![
            Field::new("k", DataType::Int64, true),
            Field::new("lsn", DataType::Int64, false),
            Field::new("op", DataType::Utf8, false),
        ]));
        let keys = Int64Array::from(rows.iter().map(|r| r.0).collect::<Vec<_>>());
        let lsns = Int64Array::from(rows.iter().map(|r| r.1).collect::<Vec<_>>());
        let ops = StringArray::from(rows.iter().map(|r| r.2).collect::<Vec<_>>());
        RecordBatch::try_new(schema, vec![Arc::new(keys), Arc::new(lsns), Arc::new(ops)]).expect("batch")
    }

    #[test]
    fn only_inserts_and_snapshot_rows_after_the_position_open_a_first_version() {
        let batch = first(&[
            (Some(1), 10, "insert"),
            (Some(2), 20, "update"),
            (Some(3), 30, "delete"),
            (Some(4), 40, "snapshot"),
            (Some(5), 5, "insert"),
            (None, 50, "insert"),
        ]);
        assert_eq!(opening_keys(std::slice::from_ref(&batch), None).expect("keys"), vec![1, 4, 5]);
        assert_eq!(opening_keys(&[batch], Some(9)).expect("keys"), vec![1, 4]);
    }

    #[test]
    fn the_held_maximum_is_that_of_every_batch_and_zero_without_rows() {
        let batch = |values: Vec<Option<i64>>| {
            let schema = Arc::new(Schema::new(vec![Field::new("sk", DataType::Int64, true)]));
            RecordBatch::try_new(schema, vec![Arc::new(Int64Array::from(values))]).expect("batch")
        };
        let batches = [batch(vec![Some(3), None]), batch(vec![Some(9), Some(-1)]), batch(vec![None])];
        assert_eq!(held_max(&batches, "sk").expect("max"), 9);
        assert_eq!(held_max(&[], "sk").expect("max"), 0);
        assert_eq!(held_max(&[batch(vec![None])], "sk").expect("max"), 0);
    }
}
