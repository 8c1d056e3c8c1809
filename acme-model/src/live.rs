//! Merge-on-read: the model as a full rebuild would write it up to the raw layer's position,
//! computed at query time from the stored model (which covers the raw changes up to its own
//! position) and the raw changes after that position (the tail).
//!
//! The stored model is folded forward by [`crate::ModelBuild`] in the background; until then
//! readers apply the tail themselves with the SQL here, so a change is in every report as soon
//! as the raw layer has committed it. The work these statements add follows the tail's size:
//! stored files are read as they are (joined with small tables of the tail's keys), never
//! rewritten.

use std::sync::Arc;

use acme_core::raw;

use crate::catalog::ModelTable;
use arrow::array::{Array, ArrayRef, AsArray, BooleanArray, RecordBatch, UInt32Array};
use arrow::compute::kernels::boolean::{and, not};
use arrow::compute::kernels::zip::zip;
use arrow::compute::{SortColumn, SortOptions, cast, lexsort_to_indices, partition, take};
use arrow::datatypes::{DataType, SchemaRef};
use arrow::error::ArrowError;
use arrow::row::{RowConverter, SortField};
use datafusion::prelude::SessionContext;

use crate::history::{
    CLOSED_BY, HistorySpec, IS_CURRENT, IS_DELETED, OPENED_BY, VALID_FROM, VALID_FROM_LSN, VALID_TO, VALID_TO_LSN,
    history_sql, quote, raw_changes, utc_micros, utc_micros_null,
};

/// The raw changes of `raw` committed after `position` (the tail the stored model does not
/// cover yet), no truncations, as change rows for [`history_sql`].
pub fn tail_changes(raw: &str, attributes: &[String], position: i64) -> String {
    format!("({} AND {lsn} > {position})", raw_changes(raw, attributes), lsn = raw::LSN)
}

/// The first tail change of each key of `spec` (columns `k`, `lsn`, `ts`, `op`): the change
/// that closes the key's version open at `position`, unless a tail truncation comes first.
pub fn first_changes_sql(spec: &HistorySpec, raw: &str, attributes: &[String], position: i64) -> String {
    format!(
        "SELECT k, lsn, ts, op FROM (SELECT {key} AS k, {lsn_col} AS lsn, {ts_col} AS ts, {op_col} AS op,            row_number() OVER (PARTITION BY {key} ORDER BY {lsn_col}, {seq_col}) AS n FROM {tail} t) firsts          WHERE n = 1",
        key = quote(&spec.key),
        tail = tail_changes(raw, attributes, position),
        lsn_col = raw::LSN,
        ts_col = raw::COMMIT_TS,
        op_col = raw::OP,
        seq_col = raw::SEQ,
    )
}

/// The versions the tail's changes open, closed within the tail as [`history_sql`] closes
/// them (`truncates`: the tail's truncations).
pub fn tail_versions_sql(
    spec: &HistorySpec,
    raw: &str,
    attributes: &[String],
    position: i64,
    truncates: &[(i64, i64)],
) -> String {
    history_sql(spec, &tail_changes(raw, attributes, position), attributes, truncates, None)
}

/// SQL of the history of `spec` as a full rebuild would write it up to the raw layer's
/// position, merged on read: `history` is the stored history, covering the raw changes up to
/// the model's position; `first` ([`first_changes_sql`]) and `versions`
/// ([`tail_versions_sql`]) are relations (tables, or subqueries in parentheses) over the raw
/// changes after it (the tail), applied here instead of being written.
///
/// - The stored versions keep their validity, except that a version still open at the
///   model's position is closed by the first tail change of its key, or by the first tail
///   truncation (`truncates`, as for [`history_sql`]) if that comes first.
/// - The tail's versions follow.
///
/// The cost follows the tail, not the table: the stored versions are only probed against the
/// first tail change of each key (a hash table of the tail's keys, the join's build side), and
/// no stored file is rewritten; folding the tail into the stored history is the model build's
/// job.
pub fn live_history_sql(
    spec: &HistorySpec,
    history: &str,
    first: &str,
    versions: &str,
    attributes: &[String],
    truncates: &[(i64, i64)],
) -> String {
    let key = quote(&spec.key);
    let attrs = attributes.iter().map(|c| format!("h.{}", quote(c))).collect::<Vec<_>>().join(", ");
    let columns = attributes
        .iter()
        .map(|c| quote(c))
        .chain(crate::history::HISTORY_COLUMNS.iter().map(|c| c.to_string()))
        .collect::<Vec<_>>()
        .join(", ");
    let (t_lsn, t_ts) = match truncates.first() {
        Some((lsn, ts)) => (lsn.to_string(), utc_micros(*ts)),
        None => ("CAST(NULL AS BIGINT)".to_string(), utc_micros_null()),
    };
    // As in `history_sql`: the truncation closes the version when it comes strictly first.
    let truncated_first = format!("({t_lsn} IS NOT NULL AND (f.lsn IS NULL OR {t_lsn} < f.lsn))");
    let open = format!("h.{IS_CURRENT}");
    format!(
        "SELECT {attrs}, h.{VALID_FROM}, \
           CASE WHEN NOT {open} THEN h.{VALID_TO} WHEN {truncated_first} THEN {t_ts} ELSE f.ts END AS {VALID_TO}, \
           h.{VALID_FROM_LSN}, \
           CASE WHEN NOT {open} THEN h.{VALID_TO_LSN} WHEN {truncated_first} THEN {t_lsn} ELSE f.lsn END \
             AS {VALID_TO_LSN}, \
           ({open} AND f.lsn IS NULL AND {t_lsn} IS NULL) AS {IS_CURRENT}, \
           h.{OPENED_BY}, \
           CASE WHEN NOT {open} THEN h.{CLOSED_BY} WHEN {truncated_first} THEN 'truncate' ELSE f.op END AS {CLOSED_BY}, \
           h.{IS_DELETED} \
         FROM {first} f RIGHT JOIN {history} h ON f.k = h.{key} \
         UNION ALL SELECT {columns} FROM {versions} v",
    )
}

/// Every raw row of `raw` after `position`, truncations included (a relation `tail`).
pub fn tail_rows(raw: &str, position: i64) -> String {
    format!("(SELECT * FROM {raw} WHERE {lsn} > {position}) tail", lsn = raw::LSN)
}

/// The aggregate of current orders per (delivery_date, status) at the raw layer's position,
/// from `aggregate` (stored, at the model's position) corrected by difference: each order the
/// tail changes (a key of `first`, see [`first_changes_sql`]) is taken off as it stood at the
/// model's position (its open version in the stored `history`) and added back as the tail
/// leaves it (its current version in `versions`, see [`tail_versions_sql`]). Only for a tail
/// without truncations (a truncation changes every order: the caller counts from the
/// histories instead).
pub fn live_orders_aggregate_sql(
    aggregate: &str,
    spec: &HistorySpec,
    history: &str,
    first: &str,
    versions: &str,
) -> String {
    let current = format!("{IS_CURRENT} AND NOT {IS_DELETED}");
    format!(
        "SELECT delivery_date, status, CAST(sum(orders) AS BIGINT) AS orders FROM ( \
           SELECT delivery_date, status, orders FROM {aggregate} \
           UNION ALL SELECT h.delivery_date, h.status, CAST(-1 AS BIGINT) AS orders FROM {first} s \
             JOIN {history} h ON h.{key} = s.k WHERE h.{IS_CURRENT} AND NOT h.{IS_DELETED} \
           UNION ALL SELECT delivery_date, status, CAST(1 AS BIGINT) AS orders FROM {versions} t WHERE {current}) d \
         GROUP BY delivery_date, status HAVING sum(orders) <> 0",
        key = quote(&spec.key),
    )
}

/// The truncations in `relation` (a raw table or a subquery over one, with an alias): their
/// commit LSNs and commit times (microseconds), in LSN order, as [`history_sql`] takes them.
pub async fn truncations(ctx: &SessionContext, relation: &str) -> datafusion::error::Result<Vec<(i64, i64)>> {
    let batches = ctx
        .sql(&format!(
            "SELECT {lsn}, CAST({ts} AS BIGINT) FROM {relation} WHERE {op} = 'truncate' ORDER BY {lsn}",
            lsn = raw::LSN,
            ts = raw::COMMIT_TS,
            op = raw::OP
        ))
        .await?
        .collect()
        .await?;
    let mut out = Vec::new();
    for b in batches {
        let lsn = b.column(0).as_any().downcast_ref::<arrow::array::Int64Array>();
        let ts = b.column(1).as_any().downcast_ref::<arrow::array::Int64Array>();
        if let (Some(lsn), Some(ts)) = (lsn, ts) {
            out.extend(lsn.values().iter().copied().zip(ts.values().iter().copied()));
        }
    }
    Ok(out)
}

/// Where [`touched_keys_sql`] finds the keys a tail touches. Each relation has a column `k`.
#[derive(Debug, Clone, Default)]
pub struct Touched {
    /// The keys of the star table's own source table with changes in the tail.
    pub own: String,
    /// The customers with changes in the tail.
    pub customers: String,
    /// The products with changes in the tail.
    pub products: String,
    /// The relations holding the star table's rows so far with an Unknown member (the stored
    /// ones, and rows already recomputed for an earlier part of the tail; relations holding
    /// other rows too are filtered).
    pub unknown_rows: Vec<String>,
    /// The relations holding the star table's rows so far, searched for the items of
    /// `new_orders`.
    pub rows: Vec<String>,
    /// For `fact_order_items`: a predicate on `order_id` selecting the orders placed in the
    /// tail that had no version before it (the items stored before them are priced again).
    pub new_orders: Option<String>,
}

/// The keys of `star` whose rows the tail changes (column `k`), as the model build's
/// `changed` queries find them: its own source's changed keys, and the late-arriving keys the
/// tail resolves (rows stored with the Unknown customer or product whose customer or product
/// is in the tail, and items whose order was placed in the tail).
pub fn touched_keys_sql(star: &ModelTable, touched: &Touched) -> String {
    let own = format!("SELECT k FROM {}", touched.own);
    let over = |relations: &[String], select: &str, predicate: &str| {
        relations
            .iter()
            .map(|rows| format!(" UNION SELECT {select} AS k FROM {rows} WHERE {predicate}"))
            .collect::<String>()
    };
    let over_unknown = |select: &str, predicate: &str| over(&touched.unknown_rows, select, predicate);
    let over_rows = |select: &str, predicate: &str| over(&touched.rows, select, predicate);
    match star.name {
        crate::tables::FACT_ORDERS => format!(
            "{own}{}",
            over_unknown(
                "order_id",
                &format!("customer_sk = -1 AND customer_id IN (SELECT k FROM {})", touched.customers)
            )
        ),
        crate::tables::FACT_ORDER_ITEMS => {
            let mut sql = format!(
                "{own}{}",
                over_unknown(
                    "order_item_id",
                    &format!("product_sk = -1 AND product_id IN (SELECT k FROM {})", touched.products)
                )
            );
            if let Some(orders) = &touched.new_orders {
                sql.push_str(&over_rows("order_item_id", orders));
            }
            sql
        }
        _ => own,
    }
}

/// Whether keys of `key_type` are looked up as 64-bit integers by [`NewKeys`].
fn integer_key(key_type: &DataType) -> bool {
    matches!(
        key_type,
        DataType::Int8
            | DataType::Int16
            | DataType::Int32
            | DataType::Int64
            | DataType::UInt8
            | DataType::UInt16
            | DataType::UInt32
    )
}

/// The distinct keys of a refresh's new changes, by position, looked up by the held pieces'
/// keys: as integers when the key is one (every ACME table's; a lookup is a hash of the value),
/// else by their row format. Each refresh looks up every held key among them.
enum NewKeys<'a> {
    Integers { at: foldhash::HashMap<i64, u32>, null_at: Option<u32> },
    Rows { key_type: &'a DataType, converter: &'a RowConverter, at: foldhash::HashMap<&'a [u8], u32> },
}

impl<'a> NewKeys<'a> {
    /// The positions of `keys` (distinct); `rows`, their row format, when they are not integers.
    fn new(
        keys: &ArrayRef,
        key_type: &'a DataType,
        rows: Option<&'a (RowConverter, arrow::row::Rows)>,
    ) -> Result<Self, ArrowError> {
        Ok(match rows {
            Some((converter, rows)) => NewKeys::Rows {
                key_type,
                converter,
                at: (0..rows.num_rows()).map(|i| (rows.row(i).data(), i as u32)).collect(),
            },
            None => {
                let keys = cast(keys, &DataType::Int64)?;
                let keys = keys.as_primitive::<arrow::datatypes::Int64Type>();
                let mut at = foldhash::HashMap::default();
                let mut null_at = None;
                for (i, key) in keys.iter().enumerate() {
                    match key {
                        Some(key) => {
                            at.insert(key, i as u32);
                        }
                        None => null_at = Some(i as u32),
                    }
                }
                NewKeys::Integers { at, null_at }
            }
        })
    }

    /// Calls `found(row, position)` for each row of `keys` (a held key column) whose key is
    /// among the new ones (a null key matches a null one, as the row format compares them).
    fn find(&self, keys: &ArrayRef, mut found: impl FnMut(usize, u32)) -> Result<(), ArrowError> {
        match self {
            NewKeys::Integers { at, null_at } => {
                let keys = cast(keys, &DataType::Int64)?;
                let keys = keys.as_primitive::<arrow::datatypes::Int64Type>();
                for (i, key) in keys.iter().enumerate() {
                    let position = match key {
                        Some(key) => at.get(&key).copied(),
                        None => *null_at,
                    };
                    if let Some(position) = position {
                        found(i, position);
                    }
                }
            }
            NewKeys::Rows { key_type, converter, at } => {
                let rows = converter.convert_columns(&[cast(keys, key_type)?])?;
                for i in 0..rows.num_rows() {
                    if let Some(position) = at.get(rows.row(i).data()) {
                        found(i, *position);
                    }
                }
            }
        }
        Ok(())
    }
}

/// The orders among `orders` (a relation with column `k`) that have no version in the stored
/// `history`: orders placed after the model's position.
pub fn new_orders_sql(orders: &str, history: &str) -> String {
    format!("SELECT f.k FROM {orders} f WHERE NOT EXISTS (SELECT 1 FROM {history} h WHERE h.order_id = f.k)")
}

/// The tail's pieces ([`first_changes_sql`], [`tail_versions_sql`]) held for the raw changes
/// up to some position, extended in memory with the raw changes after it: what the SQL of
/// [`first_changes_sql`] and [`live_history_sql`] computes for a refresh, without planning a
/// query. Each refresh of a live handle applies a few hundred changes; planning the window and
/// join statements cost more than applying them.
///
/// - `changes`: the new raw changes (attributes and meta columns), none a truncation, all
///   after the held position, in any order.
/// - `first`, `versions`: the held pieces (their schema, and their rows).
///
/// Returns the extended pieces, in the held schemas: the first change of each key not held
/// yet is added; a held version still open is closed by its key's first new change (as
/// [`live_history_sql`] closes stored versions); the versions the new changes open follow,
/// each closed by the next change of its key (as [`history_sql`]).
///
/// Each piece comes back as the held batches followed by one new batch (when it has rows): a
/// held batch none of whose versions the changes close is passed on as it is, not copied, so
/// what a refresh copies follows its changes more than the tail it extends.
pub fn extend_tail_pieces(
    spec: &HistorySpec,
    changes: &RecordBatch,
    first: (&SchemaRef, &[RecordBatch]),
    versions: (&SchemaRef, &[RecordBatch]),
) -> Result<(Vec<RecordBatch>, Vec<RecordBatch>), ArrowError> {
    let column = |batch: &RecordBatch, name: &str| {
        batch.column_by_name(name).cloned().ok_or_else(|| {
            ArrowError::SchemaError(format!("the tail of {} has no column `{name}`", spec.history_table()))
        })
    };
    // The changes by key, then commit LSN, then position in the transaction.
    let ascending = Some(SortOptions { descending: false, nulls_first: true });
    let order = lexsort_to_indices(
        &[&spec.key, raw::LSN, raw::SEQ]
            .iter()
            .map(|name| Ok(SortColumn { values: column(changes, name)?, options: ascending }))
            .collect::<Result<Vec<_>, ArrowError>>()?,
        None,
    )?;
    let sorted = |name: &str| take(column(changes, name)?.as_ref(), &order, None);
    let (key, lsn, ts, op) = (sorted(&spec.key)?, sorted(raw::LSN)?, sorted(raw::COMMIT_TS)?, sorted(raw::OP)?);
    let ranges = partition(std::slice::from_ref(&key))?.ranges();
    // Each change's next change of the same key, if any.
    let mut next = vec![None; key.len()];
    for range in &ranges {
        for (i, slot) in next.iter_mut().enumerate().take(range.end.saturating_sub(1)).skip(range.start) {
            *slot = Some(i as u32 + 1);
        }
    }
    let next = UInt32Array::from(next);
    let starts = UInt32Array::from_iter_values(ranges.iter().map(|r| r.start as u32));
    let deleted: BooleanArray = {
        let ops = cast(&op, &DataType::Utf8)?;
        ops.as_string::<i32>().iter().map(|o| o.map(|o| o == "delete")).collect()
    };
    let current: BooleanArray = next.iter().map(|n| Some(n.is_none())).collect();

    // The versions the new changes open.
    let (versions_schema, held_versions) = versions;
    let opened = versions_schema
        .fields()
        .iter()
        .map(|field| {
            let array = match field.name().as_str() {
                VALID_FROM => Arc::clone(&ts),
                VALID_TO => take(ts.as_ref(), &next, None)?,
                VALID_FROM_LSN => Arc::clone(&lsn),
                VALID_TO_LSN => take(lsn.as_ref(), &next, None)?,
                IS_CURRENT => Arc::new(current.clone()) as ArrayRef,
                OPENED_BY => Arc::clone(&op),
                CLOSED_BY => take(op.as_ref(), &next, None)?,
                IS_DELETED => Arc::new(deleted.clone()) as ArrayRef,
                attribute => sorted(attribute)?,
            };
            cast(&array, field.data_type())
        })
        .collect::<Result<Vec<_>, ArrowError>>()?;
    let opened = RecordBatch::try_new(Arc::clone(versions_schema), opened)?;

    // The first new change of each key, and the held keys' positions among them.
    let new_first = [&key, &lsn, &ts, &op].map(|a| take(a.as_ref(), &starts, None));
    let [new_keys, new_lsn, new_ts, new_op] = new_first;
    let new_keys = new_keys?;
    let key_type = versions_schema.field_with_name(&spec.key)?.data_type().clone();
    let new_rows = match integer_key(&key_type) {
        true => None,
        false => {
            let converter = RowConverter::new(vec![SortField::new(key_type.clone())])?;
            let rows = converter.convert_columns(&[cast(&new_keys, &key_type)?])?;
            Some((converter, rows))
        }
    };
    let probe = NewKeys::new(&new_keys, &key_type, new_rows.as_ref())?;

    // Held first changes, then the new keys' first changes.
    // (The held keys are many, the new ones few: each held key is looked up among the new
    // ones, and no set of the held keys is built.)
    let (first_schema, held_first) = first;
    let mut seen = vec![false; new_keys.len()];
    for batch in held_first {
        probe.find(batch.column(0), |_, at| seen[at as usize] = true)?;
    }
    let unseen = UInt32Array::from_iter_values((0..new_keys.len()).filter(|i| !seen[*i]).map(|i| i as u32));
    let added = [Ok(new_keys), new_lsn, new_ts, new_op]
        .into_iter()
        .zip(first_schema.fields())
        .map(|(array, field)| cast(&take(array?.as_ref(), &unseen, None)?, field.data_type()))
        .collect::<Result<Vec<_>, ArrowError>>()?;
    let mut first = held_first.to_vec();
    let added = RecordBatch::try_new(Arc::clone(first_schema), added)?;
    if added.num_rows() > 0 {
        first.push(added);
    }

    // Held versions: an open one is closed by its key's first new change.
    let closing = |field: &str| -> Result<ArrayRef, ArrowError> {
        let source = match field {
            VALID_TO => &ts,
            VALID_TO_LSN => &lsn,
            _ => &op,
        };
        cast(&take(source.as_ref(), &starts, None)?, versions_schema.field_with_name(field)?.data_type())
    };
    let (close_ts, close_lsn, close_op) = (closing(VALID_TO)?, closing(VALID_TO_LSN)?, closing(CLOSED_BY)?);
    let mut version_batches = Vec::with_capacity(held_versions.len() + 1);
    for batch in held_versions {
        let open = column(batch, IS_CURRENT)?;
        let open = open.as_boolean();
        if open.true_count() == 0 {
            // Only closed versions: none to close (not looked up).
            version_batches.push(batch.clone());
            continue;
        }
        // (Made on the first version closed: most held batches have none.)
        let mut closing: Vec<Option<u32>> = Vec::new();
        probe.find(&column(batch, &spec.key)?, |i, at| {
            if open.is_valid(i) && open.value(i) {
                if closing.is_empty() {
                    closing = vec![None; batch.num_rows()];
                }
                closing[i] = Some(at);
            }
        })?;
        if closing.is_empty() {
            // None of this batch's versions is closed: passed on as it is.
            version_batches.push(batch.clone());
            continue;
        }
        let by = UInt32Array::from(closing);
        let closed = BooleanArray::from_iter(by.iter().map(|b| Some(b.is_some())));
        let mut columns = batch.columns().to_vec();
        for (name, by_first) in [(VALID_TO, &close_ts), (VALID_TO_LSN, &close_lsn), (CLOSED_BY, &close_op)] {
            let index = batch.schema().index_of(name)?;
            columns[index] = zip(&closed, &take(by_first.as_ref(), &by, None)?, &columns[index])?;
        }
        let index = batch.schema().index_of(IS_CURRENT)?;
        columns[index] = Arc::new(and(open, &not(&closed)?)?);
        version_batches.push(RecordBatch::try_new(batch.schema(), columns)?);
    }
    if opened.num_rows() > 0 {
        version_batches.push(opened);
    }
    Ok((first, version_batches))
}
