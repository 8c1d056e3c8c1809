//! The star schema at the raw layer's position: each presentation table the reports read is
//! registered under its plain name as the stored table (`model.<table>`) with the rows of the
//! keys the tail touches replaced by those rows recomputed on read, by the model build's own
//! scoped statements (`acme_model::star`) over the live histories. A model build folding the
//! same tail in writes exactly these rows, so the reports read one dimensional model whose
//! freshness is the raw layer's, and a reader never waits for a build.
//!
//! The work follows the tail: the touched keys (from the tail's changes, plus the late-arriving
//! keys the tail resolves), the stored versions of those keys (read through an
//! `acme_core::KeyIndex`: only the Parquet pages that hold them), and the tail's versions. The
//! recomputed rows are held in memory with the handle, and a handle refreshed from one that
//! holds them recomputes only the keys the new changes touch; R3 and R4 on the current state
//! are kept by difference the same way ([`PENDING_ITEMS`], [`CUSTOMER_ORDERS`]).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use acme_core::LayerTable;
use acme_model::catalog::{MODEL, ModelTable};
use acme_model::history::{HistorySpec, quote};
use acme_model::live::{self, Touched};
use acme_model::tables;
use arrow::array::{Array, AsArray, BooleanArray, RecordBatch};
use arrow::datatypes::{Int64Type, Schema};
use datafusion::catalog::TableProvider;
use datafusion::execution::runtime_env::RuntimeEnv;
use datafusion::prelude::{SessionConfig, SessionContext};

use crate::{MODEL_SCHEMA, Result, TAIL_SCHEMA, hold_in_memory};

/// One history's tail, as [`crate::register_live_views`] registered it.
pub(crate) struct HistoryTail {
    pub spec: HistorySpec,
    pub attributes: Vec<String>,
    pub truncates: Vec<(i64, i64)>,
    /// Relation of the first tail change per key (a table name or a subquery).
    pub first: String,
    /// Relation of the versions the tail opens.
    pub versions: String,
}

/// A fact table's touched keys and their recomputed rows, held in memory.
type KeysAndRows = (Arc<dyn TableProvider>, Arc<dyn TableProvider>);

/// The star rows a handle recomputed for its tail, which a refreshed handle extends.
#[derive(Clone, Default)]
pub(crate) struct HeldStar {
    /// The stored model's position the rows extend.
    pub model_position: i64,
    /// The raw position the rows are at.
    pub raw_position: i64,
    /// Per star table: the touched keys and their rows.
    pub tables: HashMap<&'static str, KeysAndRows>,
    /// Per fact table: its stored rows with an Unknown member (the candidates of late-arriving
    /// keys), found once per stored model.
    pub unknown: HashMap<&'static str, Arc<dyn TableProvider>>,
    /// Per dimension: the highest surrogate key stored.
    pub stored_max_sk: HashMap<&'static str, i64>,
    /// Per history: how its stored versions are looked up by key.
    pub lookups: HashMap<String, StoredLookup>,
    /// R3 on the current state, maintained by difference (see [`pending_items`]).
    pub pending: Option<Arc<PendingItems>>,
    /// Current orders per customer and status, maintained by difference (see
    /// [`customer_orders`]).
    pub customer_orders: Option<Arc<CustomerOrders>>,
}

/// Current orders per (customer id, status) at a handle's raw position, for R4: the counts at
/// the first handle on the stored model (`base`, counted once and shared by every later handle)
/// plus the differences since (`delta`, which follows the changes, not the table).
pub(crate) struct CustomerOrders {
    base: Arc<dyn TableProvider>,
    delta: HashMap<(Option<i64>, Option<String>), i64>,
}

/// R3 on the current state (open pending items per product) at a handle's raw position, kept
/// by difference from one handle to the next: per product id, the sum of the quantities of the
/// current items of current open orders, how many of those quantities are not null, and how
/// many items count. A product is in the report while its item count is positive.
pub(crate) type PendingItems = HashMap<Option<i64>, [i64; 3]>;

/// A stored history's key lookup, made once per stored model: the pages of its key column
/// (`acme_core::KeyIndex`), so the stored versions of a few keys are read from the pages that
/// hold them, not found by a scan of the key column.
pub(crate) type StoredLookup = Arc<acme_core::KeyIndex>;

/// What [`register`] needs besides the context.
pub(crate) struct LiveInputs<'a> {
    pub runtime: &'a Arc<RuntimeEnv>,
    /// The registered tables and their schemas.
    pub found: &'a HashMap<String, Arc<Schema>>,
    /// The stored model tables, by registered name.
    pub stored: &'a HashMap<String, &'a LayerTable>,
    pub tails: &'a [HistoryTail],
    /// The raw files of the tail.
    pub raw_files: &'a [crate::TailFiles<'a>],
    /// The raw position the handle answers at.
    pub raw_position: i64,
    /// The stored model's position.
    pub model_position: i64,
    /// The rows a handle at the same model position recomputed, to extend.
    pub previous: Option<&'a HeldStar>,
}

/// Register every star table recomputed per key ([`ModelTable::recomputed_per_key`]) that is stored as its live state in `ctx`.
/// Returns the memory the recomputed rows hold, and the rows to pass on (none when the tail
/// has a truncation).
pub(crate) async fn register(ctx: &SessionContext, inputs: &LiveInputs<'_>) -> Result<(u64, Option<HeldStar>)> {
    // A truncation in the tail touches every key: the star tables are then computed whole on
    // read, from the live histories (a truncation is rare, and the next build folds it in).
    let truncated = inputs.tails.iter().any(|t| !t.truncates.is_empty());
    let mut held = HeldStar {
        model_position: inputs.model_position,
        raw_position: inputs.raw_position,
        tables: HashMap::new(),
        unknown: HashMap::new(),
        stored_max_sk: inputs.previous.map(|p| p.stored_max_sk.clone()).unwrap_or_default(),
        lookups: inputs.previous.map(|p| p.lookups.clone()).unwrap_or_default(),
        pending: None,
        customer_orders: None,
    };
    // The stored histories' lookups, made once per stored model.
    for tail in inputs.tails {
        let history = tail.spec.history_table();
        if let (false, Some(table)) = (held.lookups.contains_key(&history), inputs.stored.get(&history)) {
            held.lookups.insert(history, Arc::new(table.key_index(&tail.spec.key).await?));
        }
    }
    // And the stored dimensions', by business key (the facts look up the versions of their
    // customers and products).
    for dimension in MODEL.iter().filter(|s| s.surrogate_key().is_some()) {
        let name = dimension.name.to_string();
        if let (false, Some(table)) = (held.lookups.contains_key(&name), inputs.stored.get(&name)) {
            held.lookups.insert(name, Arc::new(table.key_index(dimension.key).await?));
        }
    }
    // The keys changed since the rows passed on: from the raw files after that position only
    // (the newest micro-batches), not from the whole tail.
    if let Some(previous) = inputs.previous {
        for tail in inputs.raw_files {
            let files: Vec<_> = tail
                .files
                .iter()
                .filter(|f| !f.all_at_most(acme_core::raw::LSN, previous.raw_position))
                .cloned()
                .collect();
            let since = format!("{TAIL_SCHEMA}.raw_{}_since", tail.table);
            ctx.register_table(since.as_str(), tail.raw.provider(Some(&files))?)?;
        }
    }
    // And those keys, read once here for every star table that follows them.
    let since_keys = match inputs.previous {
        Some(previous) => Some(changed_keys(ctx, inputs.tails, previous.raw_position).await?),
        None => None,
    };
    let since_keys = since_keys.as_ref();
    // The dimensions, then the facts that look them up; the tables of each group concurrently.
    let held = std::sync::Mutex::new(held);
    let mut bytes = 0u64;
    for dimensions in [true, false] {
        let group = MODEL.iter().filter(|s| s.recomputed_per_key() && s.surrogate_key().is_some() == dimensions);
        let steps = group.filter(|s| inputs.found.contains_key(s.name)).map(|star| {
            let held = &held;
            async move {
                if star.sources.iter().any(|s| tail_of(inputs.tails, s).is_none()) {
                    // A history without its raw table: the stored rows as they are.
                    let provider = ctx.table_provider(format!("{MODEL_SCHEMA}.{}", star.name).as_str()).await?;
                    ctx.register_table(star.name, provider)?;
                    return Ok(0);
                }
                if truncated {
                    ctx.register_table(star.name, ctx.sql(&statement(star, None, 0)?).await?.into_view())?;
                    return Ok(0);
                }
                if star.name == tables::FACT_ORDER_STATUS {
                    // No report reads it: its touched rows are computed by the queries that read
                    // it, not by every refresh.
                    register_lazy(ctx, inputs, star, held).await?;
                    return Ok(0);
                }
                let started = std::time::Instant::now();
                let (table_bytes, kept) = register_one(ctx, inputs, star, held, since_keys).await?;
                tracing::debug!(
                    table = star.name,
                    extended = inputs.previous.is_some(),
                    held_bytes = table_bytes,
                    ms = started.elapsed().as_millis() as u64,
                    "live star table"
                );
                if let Some(kept) = kept {
                    lock(held).tables.insert(star.name, kept);
                }
                Ok::<_, crate::QueryError>(table_bytes)
            }
        });
        bytes += futures::future::try_join_all(steps).await?.into_iter().sum::<u64>();
    }
    let mut held = held.into_inner().unwrap_or_else(std::sync::PoisonError::into_inner);
    if !truncated
        && [tables::FACT_ORDERS, tables::FACT_ORDER_ITEMS].iter().all(|t| inputs.stored.contains_key(*t))
        && ["orders", "order_items"].iter().all(|t| tail_of(inputs.tails, t).is_some())
    {
        let started = std::time::Instant::now();
        let (pending, incremental) = pending_items(ctx, inputs, &mut held).await?;
        tracing::debug!(
            incremental,
            products = pending.len(),
            ms = started.elapsed().as_millis() as u64,
            "R3 on the current state maintained"
        );
        held.pending = Some(Arc::new(pending));
        let started = std::time::Instant::now();
        let counts = customer_orders(ctx, inputs, &mut held).await?;
        tracing::debug!(
            changed = counts.delta.len(),
            ms = started.elapsed().as_millis() as u64,
            "orders per customer on the current state maintained"
        );
        held.customer_orders = Some(Arc::new(counts));
    }
    Ok((bytes, (!truncated).then_some(held)))
}

/// Name of the relation holding R3 on the current state, when a handle maintains it.
pub(crate) const PENDING_ITEMS: &str = "pending_items_current";

/// R3 on the current state at this handle's position, registered as [`PENDING_ITEMS`]
/// (`product_id`, `total_items`, `items`). From a handle at the same model position that
/// maintained it, by difference: the items whose rows the changes since that handle touch, and
/// the items of the orders they touch, are taken off as that handle saw them and added back as
/// this one sees them; the stored rows involved are looked up by key, never scanned, and the
/// difference is counted in memory (a few hundred rows: planning a query cost more). Otherwise
/// (the first handle on a stored model) counted over the live facts once. Returns the counts,
/// and whether they were kept by difference.
async fn pending_items(
    ctx: &SessionContext,
    inputs: &LiveInputs<'_>,
    held: &mut HeldStar,
) -> Result<(PendingItems, bool)> {
    let items_table = tables::FACT_ORDER_ITEMS;
    let orders_table = tables::FACT_ORDERS;
    let previous = inputs.previous.and_then(|p| Some((p, p.pending.as_ref()?)));
    let Some((previous, before)) = previous else {
        let totals = collect_counts(ctx, &pending_counts_sql()).await?;
        register_pending(ctx, &totals)?;
        return Ok((totals, false));
    };
    let (items, orders) = (touched_since(ctx, items_table).await?, touched_since(ctx, orders_table).await?);
    let mut totals = (**before).clone();
    if items.is_empty() && orders.is_empty() {
        register_pending(ctx, &totals)?;
        return Ok((totals, true));
    }
    let (item_set, order_set): (HashSet<i64>, HashSet<i64>) =
        (items.iter().copied().collect(), orders.iter().copied().collect());
    // The stored rows of the touched items and of the touched orders' items.
    let items_index = fact_lookup(inputs, held, items_table, "order_item_id").await?;
    let items_by_order = fact_lookup(inputs, held, items_table, "order_id").await?;
    let orders_index = fact_lookup(inputs, held, orders_table, "order_id").await?;
    // (Only the columns counted: a lookup decodes every page it reads of each column it reads.)
    let item_columns = Some(&["order_item_id", "order_id", "product_id", "quantity", "is_current"][..]);
    let mut stored_items = looked_up_rows(&items_index, &items, items_table, item_columns).await?;
    for batch in looked_up_rows(&items_by_order, &orders, items_table, item_columns).await? {
        let mask = membership(&batch, "order_item_id", &item_set, false)?;
        stored_items.push(arrow::compute::filter_record_batch(&batch, &mask)?);
    }
    let affected = |batch: &RecordBatch| -> Result<BooleanArray> {
        let (ids, order_ids) = (int64s(batch, "order_item_id")?, int64s(batch, "order_id")?);
        Ok(ids
            .iter()
            .zip(order_ids.iter())
            .map(|(id, order)| {
                Some(id.is_some_and(|id| item_set.contains(&id)) || order.is_some_and(|o| order_set.contains(&o)))
            })
            .collect())
    };
    // Each side: the affected items as the previous handle saw them, and as this one sees them.
    let sides = [(previous, -1), (&*held, 1)];
    let mut side_items = Vec::new();
    for (side, _) in sides {
        side_items.push(visible_rows(&stored_items, "order_item_id", side.tables.get(items_table), &affected).await?);
    }
    // Their orders, on both sides.
    let mut order_ids = orders;
    for batch in side_items.iter().flatten() {
        order_ids.extend(int64s(batch, "order_id")?.iter().flatten());
    }
    order_ids.sort_unstable();
    order_ids.dedup();
    let wanted: HashSet<i64> = order_ids.iter().copied().collect();
    let order_columns = Some(&["order_id", "is_current", "is_open"][..]);
    let stored_orders = looked_up_rows(&orders_index, &order_ids, orders_table, order_columns).await?;
    let of_wanted = |batch: &RecordBatch| -> Result<BooleanArray> { membership(batch, "order_id", &wanted, true) };
    for ((side, sign), items) in sides.into_iter().zip(side_items) {
        let orders = visible_rows(&stored_orders, "order_id", side.tables.get(orders_table), &of_wanted).await?;
        // Per order, its current open rows (the join's matches).
        let mut open: HashMap<i64, i64> = HashMap::new();
        for batch in &orders {
            let (ids, current, is_open) =
                (int64s(batch, "order_id")?, bools(batch, "is_current")?, bools(batch, "is_open")?);
            for i in 0..batch.num_rows() {
                if ids.is_valid(i) && current.value(i) && current.is_valid(i) && is_open.is_valid(i) && is_open.value(i)
                {
                    *open.entry(ids.value(i)).or_insert(0) += 1;
                }
            }
        }
        for batch in &items {
            let (order_ids, current) = (int64s(batch, "order_id")?, bools(batch, "is_current")?);
            let (products, quantities) = (int64s(batch, "product_id")?, int64s(batch, "quantity")?);
            for i in 0..batch.num_rows() {
                if !(current.is_valid(i) && current.value(i) && order_ids.is_valid(i)) {
                    continue;
                }
                let Some(matches) = open.get(&order_ids.value(i)) else { continue };
                let product = products.is_valid(i).then(|| products.value(i));
                let entry = totals.entry(product).or_insert([0; 3]);
                if quantities.is_valid(i) {
                    entry[0] += sign * matches * quantities.value(i);
                    entry[1] += sign * matches;
                }
                entry[2] += sign * matches;
            }
        }
    }
    totals.retain(|_, [_, _, rows]| *rows != 0);
    register_pending(ctx, &totals)?;
    Ok((totals, true))
}

/// R3's counts over the fact tables registered in a context (`fact_order_items`, `fact_orders`):
/// per product id, the sum of the quantities of the current items of current open orders, how
/// many of those quantities are not null, and how many items count ([`PendingItems`]).
fn pending_counts_sql() -> String {
    format!(
        "SELECT i.product_id, CAST(sum(i.quantity) AS BIGINT), count(i.quantity), count(*) FROM {} i \
         JOIN {} o ON o.order_id = i.order_id WHERE i.is_current AND o.is_current AND o.is_open \
         GROUP BY i.product_id",
        tables::FACT_ORDER_ITEMS,
        tables::FACT_ORDERS
    )
}

/// R3 on the current state of a handle with no tail (its fact tables are the stored ones),
/// counted once and registered as `model.`[`PENDING_ITEMS`]. (Not in the default schema: what
/// a caller registers there is carried over to refreshed handles, and these counts must not be.)
pub(crate) async fn keep_stored_pending_items(ctx: &SessionContext) -> Result<()> {
    let totals = collect_counts(ctx, &pending_counts_sql()).await?;
    register_pending_as(ctx, &format!("{MODEL_SCHEMA}.{PENDING_ITEMS}"), &totals)
}

/// The stored rows of `keys`, looked up in `index` (only `columns`, when given; logged at debug
/// level).
async fn looked_up_rows(
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
async fn visible_rows(
    stored: &[RecordBatch],
    key: &str,
    held: Option<&KeysAndRows>,
    wanted: &impl Fn(&RecordBatch) -> Result<BooleanArray>,
) -> Result<Vec<RecordBatch>> {
    let Some((keys, rows)) = held else { return Ok(stored.to_vec()) };
    let mut held_keys = HashSet::new();
    for batch in held_rows(keys).await? {
        held_keys.extend(int64s(&batch, "k")?.iter().flatten());
    }
    let mut out = Vec::new();
    for batch in stored {
        out.push(arrow::compute::filter_record_batch(batch, &membership(batch, key, &held_keys, false)?)?);
    }
    for batch in held_rows(rows).await? {
        out.push(arrow::compute::filter_record_batch(&batch, &wanted(&batch)?)?);
    }
    Ok(out)
}

/// The rows of a relation the handle holds in memory.
async fn held_rows(provider: &Arc<dyn TableProvider>) -> Result<Vec<RecordBatch>> {
    match crate::held_batches(provider).await {
        Some((_, batches)) => Ok(batches),
        None => Err(datafusion::error::DataFusionError::Internal("a held relation is not in memory".into()).into()),
    }
}

/// Column `name` of `batch` as booleans.
fn bools(batch: &RecordBatch, name: &str) -> Result<BooleanArray> {
    let column = batch.column_by_name(name).ok_or_else(|| {
        datafusion::error::DataFusionError::Internal(format!("a held relation has no column `{name}`"))
    })?;
    Ok(arrow::compute::cast(column, &arrow::datatypes::DataType::Boolean)?.as_boolean().clone())
}

/// Name of the relation of current orders per customer and status (`customer_id`, `status`,
/// `is_open`, `is_pending`, `orders`), when a handle maintains it.
pub(crate) const CUSTOMER_ORDERS: &str = "customer_orders_current";

/// Current orders per customer and status at this handle's position, registered as
/// [`CUSTOMER_ORDERS`]. From a handle at the same model position that kept them: the orders the
/// changes since that handle touch are taken off as it saw them and added back as this one sees
/// them (stored rows looked up by key, counted in memory). Otherwise counted once over the live
/// `fact_orders`.
async fn customer_orders(ctx: &SessionContext, inputs: &LiveInputs<'_>, held: &mut HeldStar) -> Result<CustomerOrders> {
    let table = tables::FACT_ORDERS;
    let count = |relation: &str| {
        format!(
            "SELECT customer_id, status, CAST(count(*) AS BIGINT) AS orders FROM {relation} o WHERE is_current \
             GROUP BY customer_id, status"
        )
    };
    let previous = inputs.previous.and_then(|p| Some((p, p.customer_orders.as_ref()?)));
    let counts = match previous {
        None => CustomerOrders { base: hold_in_memory(ctx, &count(table)).await?.0, delta: HashMap::new() },
        Some((previous, kept)) => {
            let mut delta = kept.delta.clone();
            let orders = touched_since(ctx, table).await?;
            if !orders.is_empty() {
                let index = fact_lookup(inputs, held, table, "order_id").await?;
                let columns = Some(&["order_id", "customer_id", "status", "is_current"][..]);
                let stored = looked_up_rows(&index, &orders, table, columns).await?;
                let wanted: HashSet<i64> = orders.iter().copied().collect();
                let of_wanted = |batch: &RecordBatch| membership(batch, "order_id", &wanted, true);
                for (side, sign) in [(previous.tables.get(table), -1), (held.tables.get(table), 1)] {
                    for batch in visible_rows(&stored, "order_id", side, &of_wanted).await? {
                        let (customers, current) = (int64s(&batch, "customer_id")?, bools(&batch, "is_current")?);
                        let statuses = arrow::compute::cast(
                            batch.column_by_name("status").ok_or_else(|| {
                                datafusion::error::DataFusionError::Internal("fact_orders has no `status`".into())
                            })?,
                            &arrow::datatypes::DataType::Utf8,
                        )?;
                        let statuses = statuses.as_string::<i32>();
                        for i in 0..batch.num_rows() {
                            if !(current.is_valid(i) && current.value(i)) {
                                continue;
                            }
                            let key = (
                                customers.is_valid(i).then(|| customers.value(i)),
                                statuses.is_valid(i).then(|| statuses.value(i).to_string()),
                            );
                            *delta.entry(key).or_insert(0) += sign;
                        }
                    }
                }
                delta.retain(|_, n| *n != 0);
            }
            CustomerOrders { base: Arc::clone(&kept.base), delta }
        }
    };
    register_customer_orders(ctx, &counts).await?;
    Ok(counts)
}

/// Register [`CUSTOMER_ORDERS`]: the base counts and the differences since, with the status
/// flags `fact_orders` derives from the status.
async fn register_customer_orders(ctx: &SessionContext, counts: &CustomerOrders) -> Result<()> {
    use arrow::array::{ArrayRef, Int64Array, StringArray};
    let base = format!("{TAIL_SCHEMA}.customer_orders_base");
    let delta = format!("{TAIL_SCHEMA}.customer_orders_delta");
    ctx.register_table(base.as_str(), Arc::clone(&counts.base))?;
    let schema = counts.base.schema();
    let customers: Int64Array = counts.delta.keys().map(|(c, _)| *c).collect();
    let statuses: StringArray = counts.delta.keys().map(|(_, s)| s.clone()).collect();
    let orders: Int64Array = counts.delta.values().map(|n| Some(*n)).collect();
    let columns: Vec<ArrayRef> = vec![Arc::new(customers), Arc::new(statuses), Arc::new(orders)];
    let columns = columns
        .iter()
        .zip(schema.fields())
        .map(|(c, f)| arrow::compute::cast(c, f.data_type()))
        .collect::<std::result::Result<Vec<_>, _>>()?;
    let batch = arrow::array::RecordBatch::try_new(Arc::clone(&schema), columns)?;
    ctx.register_table(
        delta.as_str(),
        Arc::new(datafusion::datasource::MemTable::try_new(schema, vec![vec![batch]])?),
    )?;
    let view = ctx
        .sql(&format!(
            "SELECT customer_id, status, status <> 'COMPLETED' AS is_open, status = 'PENDING' AS is_pending, orders \
             FROM (SELECT * FROM {base} UNION ALL SELECT * FROM {delta}) c"
        ))
        .await?;
    ctx.register_table(CUSTOMER_ORDERS, view.into_view())?;
    Ok(())
}

/// The keys of a star table that the changes since the previous handle touch (registered by
/// `register_one` as `<table>_touched`; none when it registered none).
async fn touched_since(ctx: &SessionContext, table: &str) -> Result<Vec<i64>> {
    let relation = format!("{TAIL_SCHEMA}.{table}_touched");
    match ctx.table_exist(relation.as_str())? {
        true => held_values(&ctx.table_provider(relation.as_str()).await?, "k").await,
        false => Ok(Vec::new()),
    }
}

/// The stored fact table's lookup by `key`, made once per stored model.
async fn fact_lookup(inputs: &LiveInputs<'_>, held: &mut HeldStar, table: &str, key: &str) -> Result<StoredLookup> {
    let name = format!("{table}.{key}");
    if !held.lookups.contains_key(&name)
        && let Some(index) = new_lookup(inputs, table, key).await?
    {
        held.lookups.insert(name.clone(), index);
    }
    held.lookups.get(&name).cloned().ok_or_else(|| {
        datafusion::error::DataFusionError::Internal(format!("`{table}` is not stored: no lookup by `{key}`")).into()
    })
}

/// A new lookup of the stored `table` by `key`; `None` when the table is not stored.
async fn new_lookup(inputs: &LiveInputs<'_>, table: &str, key: &str) -> Result<Option<StoredLookup>> {
    match inputs.stored.get(table) {
        Some(stored) => Ok(Some(Arc::new(stored.key_index(key).await?))),
        None => Ok(None),
    }
}

/// Per product id: the three counts of [`PendingItems`] a query returns.
async fn collect_counts(ctx: &SessionContext, sql: &str) -> Result<PendingItems> {
    let mut out = PendingItems::new();
    for batch in ctx.sql(sql).await?.collect().await? {
        let columns = batch
            .columns()
            .iter()
            .map(|c| arrow::compute::cast(c, &arrow::datatypes::DataType::Int64))
            .collect::<std::result::Result<Vec<_>, _>>()?;
        let [product, sum, nonnull, rows] = &columns[..] else { continue };
        let (product, sum, nonnull, rows) = (
            product.as_primitive::<Int64Type>(),
            sum.as_primitive::<Int64Type>(),
            nonnull.as_primitive::<Int64Type>(),
            rows.as_primitive::<Int64Type>(),
        );
        for i in 0..batch.num_rows() {
            let key = (!product.is_null(i)).then(|| product.value(i));
            let entry = out.entry(key).or_insert([0; 3]);
            entry[0] += if sum.is_null(i) { 0 } else { sum.value(i) };
            entry[1] += nonnull.value(i);
            entry[2] += rows.value(i);
        }
    }
    Ok(out)
}

/// Register [`PENDING_ITEMS`]: the report's rows (a product's total is null when none of its
/// quantities is known, as SQL's `sum` gives it).
fn register_pending(ctx: &SessionContext, totals: &PendingItems) -> Result<()> {
    register_pending_as(ctx, PENDING_ITEMS, totals)
}

/// [`register_pending`] under `name`.
fn register_pending_as(ctx: &SessionContext, name: &str, totals: &PendingItems) -> Result<()> {
    use arrow::array::{ArrayRef, Int64Array};
    use arrow::datatypes::{DataType, Field};
    let schema = Arc::new(Schema::new(vec![
        Field::new("product_id", DataType::Int64, true),
        Field::new("total_items", DataType::Int64, true),
        Field::new("items", DataType::Int64, false),
    ]));
    let products: Int64Array = totals.keys().copied().collect();
    let sums: Int64Array = totals.values().map(|[sum, nonnull, _]| (*nonnull > 0).then_some(*sum)).collect();
    let rows: Int64Array = totals.values().map(|[_, _, rows]| Some(*rows)).collect();
    let columns: Vec<ArrayRef> = vec![Arc::new(products), Arc::new(sums), Arc::new(rows)];
    let batch = arrow::array::RecordBatch::try_new(Arc::clone(&schema), columns)?;
    ctx.register_table(name, Arc::new(datafusion::datasource::MemTable::try_new(schema, vec![vec![batch]])?))?;
    Ok(())
}

/// The held rows being assembled (a panic elsewhere cannot leave them half-written: each
/// insert is one map entry).
fn lock(held: &std::sync::Mutex<HeldStar>) -> std::sync::MutexGuard<'_, HeldStar> {
    held.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn tail_of<'a>(tails: &'a [HistoryTail], source: &str) -> Option<&'a HistoryTail> {
    tails.iter().find(|t| t.spec.table == source)
}

/// The table's statement, scoped to the key table `scope` (the dimensions number new versions
/// after `base`, keeping the stored ones' keys from `model_previous`), or whole.
fn statement(star: &ModelTable, scope: Option<&str>, base: i64) -> Result<String> {
    star.statement(scope.map(|_| "model_previous"), base, scope).ok_or_else(|| {
        datafusion::error::DataFusionError::Internal(format!("model table `{}` is not recomputed by key", star.name))
            .into()
    })
}

/// Register one star table; returns the memory its held keys and rows take, and them.
async fn register_one(
    ctx: &SessionContext,
    inputs: &LiveInputs<'_>,
    star: &ModelTable,
    held: &std::sync::Mutex<HeldStar>,
    since_keys: Option<&HashMap<String, Vec<i64>>>,
) -> Result<(u64, Option<KeysAndRows>)> {
    let stored_name = format!("{MODEL_SCHEMA}.{}", star.name);
    let name = |part: &str| format!("{TAIL_SCHEMA}.{}_{part}", star.name);
    // A table extends the rows a handle at an earlier raw position recomputed, with the keys
    // the changes after that position touch.
    let previous = inputs.previous.and_then(|p| Some((p.raw_position, p.tables.get(star.name)?)));
    let changed = |source: &str| -> String {
        let Some(tail) = tail_of(inputs.tails, source) else { return "(SELECT 0 AS k WHERE false)".into() };
        match previous {
            None => tail.first.clone(),
            Some((since, _)) => format!(
                "(SELECT DISTINCT {key} AS k FROM {TAIL_SCHEMA}.raw_{source}_since WHERE {lsn} > {since} \
                 AND {key} IS NOT NULL)",
                key = quote(&tail.spec.key),
                lsn = acme_core::raw::LSN,
            ),
        }
    };
    let mut new_orders = None;
    let mut touched = Touched {
        own: changed(star.source()),
        customers: changed("customers"),
        products: changed("products"),
        unknown_rows: Vec::new(),
        rows: vec![stored_name.clone()],
        new_orders: None,
    };
    if let Some(predicate) = star.unknown_member() {
        // The stored rows with an Unknown member do not change with the tail: found once per
        // stored model, instead of a scan of the stored table per handle.
        let unknown = match inputs.previous.and_then(|p| p.unknown.get(star.name)) {
            Some(unknown) => Arc::clone(unknown),
            None => hold_in_memory(ctx, &format!("SELECT * FROM {stored_name} WHERE {predicate}")).await?.0,
        };
        ctx.register_table(name("stored_unknown").as_str(), Arc::clone(&unknown))?;
        touched.unknown_rows.push(name("stored_unknown"));
        lock(held).unknown.insert(star.name, unknown);
    }
    if let Some((_, (_, rows))) = previous {
        ctx.register_table(name("previous_rows").as_str(), Arc::clone(rows))?;
        touched.rows.push(name("previous_rows"));
        touched.unknown_rows.push(name("previous_rows"));
    }
    // Items stored before their order: only orders placed in the tail with no stored version
    // can have them, and the bounds of those orders' ids let the files' statistics skip the
    // rest.
    if star.name == tables::FACT_ORDER_ITEMS
        && let Some(orders) = tail_of(inputs.tails, "orders")
    {
        let placed = match previous {
            None => orders.first.clone(),
            Some((since, _)) => format!("(SELECT k FROM {} WHERE lsn > {since})", orders.first),
        };
        let orders_history = orders.spec.history_table();
        // (The lock is released before the awaits below: the other tables take it meanwhile.)
        let index = lock(held).lookups.get(&orders_history).cloned();
        let (provider, new_bytes) = match index {
            // The placed orders with no stored version, by a lookup of their keys.
            Some(index) => {
                let placed = int64_column(ctx, &format!("SELECT k FROM {placed} p WHERE k IS NOT NULL")).await?;
                let stored = index.rows(&placed, Some(&[orders.spec.key.as_str()])).await?;
                let stored: std::collections::HashSet<i64> = stored
                    .iter()
                    .flat_map(|b| b.column(0).as_primitive::<Int64Type>().iter().flatten().collect::<Vec<_>>())
                    .collect();
                let new: Vec<i64> = placed.into_iter().filter(|k| !stored.contains(k)).collect();
                let table = key_table(&new)?;
                new_orders = Some(new);
                table
            }
            None => {
                let sql = live::new_orders_sql(&placed, &format!("{MODEL_SCHEMA}.{orders_history}"));
                hold_in_memory(ctx, &sql).await?
            }
        };
        if new_bytes > 0 {
            ctx.register_table(name("new_orders").as_str(), provider)?;
            let bounds = int64_row(ctx, &format!("SELECT min(k), max(k) FROM {}", name("new_orders"))).await?;
            if let [Some(lo), Some(hi)] = bounds[..] {
                touched.new_orders = Some(format!(
                    "order_id BETWEEN {lo} AND {hi} AND order_id IN (SELECT k FROM {})",
                    name("new_orders")
                ));
            }
        }
    }
    let started = std::time::Instant::now();
    // From the keys read above and the held rows, when the rows extend a previous handle's;
    // else by the statement.
    let in_memory = match (previous, since_keys) {
        (Some((_, (_, previous_rows))), Some(since)) => {
            let unknown = lock(held).unknown.get(star.name).cloned();
            // The items of new orders: only when those orders were told from stored ones above
            // and the stored items can be looked up by order.
            let items_of = match (star.name, &new_orders) {
                (tables::FACT_ORDER_ITEMS, Some(new)) => {
                    stored_lookup(inputs, held, star.name, "order_id").await?.map(|index| Some((new.as_slice(), index)))
                }
                (tables::FACT_ORDER_ITEMS, None) if tail_of(inputs.tails, "orders").is_some() => None,
                _ => Some(None),
            };
            match items_of {
                Some(items_of) => {
                    let unknown = unknown.iter().chain([previous_rows]);
                    touched_in_memory(star, since, unknown, previous_rows, items_of).await?
                }
                None => None,
            }
        }
        _ => None,
    };
    let (keys, key_bytes) = match in_memory {
        Some(keys) => key_table(&keys)?,
        None => {
            let keys_sql = live::touched_keys_sql(star, &touched);
            hold_in_memory(ctx, &format!("SELECT DISTINCT k FROM ({keys_sql}) t WHERE k IS NOT NULL")).await?
        }
    };
    // (A held relation takes no memory only when it has no rows.)
    let (all_keys, rows) = if key_bytes == 0 {
        match previous {
            None => {
                ctx.register_table(star.name, ctx.table_provider(stored_name.as_str()).await?)?;
                return Ok((0, None));
            }
            Some((_, (keys, rows))) => (Arc::clone(keys), Arc::clone(rows)),
        }
    } else {
        ctx.register_table(name("touched").as_str(), Arc::clone(&keys))?;
        let found = started.elapsed();
        if let Some((_, (previous_keys, _))) = previous {
            ctx.register_table(name("previous_keys").as_str(), Arc::clone(previous_keys))?;
        }
        let previous_names = previous.map(|_| (name("previous_rows"), name("previous_keys")));
        let previous_rows = previous_names.as_ref().map(|(rows, keys)| (rows.as_str(), keys.as_str()));
        let fresh = recompute(ctx, inputs, star, &name("touched"), previous_rows, held).await?;
        tracing::debug!(
            table = star.name,
            keys_ms = found.as_millis() as u64,
            recompute_ms = (started.elapsed() - found).as_millis() as u64,
            "live star keys recomputed"
        );
        match previous {
            None => (keys, fresh),
            Some((_, (previous_keys, previous_rows))) => {
                // The earlier rows of the keys not touched again, and the recomputed ones.
                extend_rows((previous_keys, previous_rows), star.key, &keys, &fresh).await?
            }
        }
    };
    ctx.register_table(name("keys").as_str(), Arc::clone(&all_keys))?;
    ctx.register_table(name("rows").as_str(), Arc::clone(&rows))?;
    let view = replaced_sql(&stored_name, star.key, &name("keys"), &name("rows"), &column_list(&rows));
    ctx.register_table(star.name, ctx.sql(&view).await?.into_view())?;
    Ok((memory(&all_keys) + memory(&rows), Some((all_keys, rows))))
}

/// A star table's held keys and rows extended with a refresh's recomputed rows: `previous`'s
/// rows of the keys not in `touched`, then `fresh`; and the union of the keys.
async fn extend_rows(
    previous: (&Arc<dyn TableProvider>, &Arc<dyn TableProvider>),
    key: &str,
    touched: &Arc<dyn TableProvider>,
    fresh: &Arc<dyn TableProvider>,
) -> Result<KeysAndRows> {
    let touched_keys: HashSet<i64> = held_values(touched, "k").await?.into_iter().collect();
    // One schema for both (the statement's batches may differ from each other in nullability).
    let schema = Arc::new(Schema::new(
        fresh.schema().fields().iter().map(|f| f.as_ref().clone().with_nullable(true)).collect::<Vec<_>>(),
    ));
    let mut rows = Vec::new();
    for batch in held_rows(previous.1).await? {
        let kept = membership(&batch, key, &touched_keys, false)?;
        rows.push(arrow::compute::filter_record_batch(&batch, &kept)?);
    }
    rows.extend(held_rows(fresh).await?);
    let rows = rows
        .into_iter()
        .map(|batch| RecordBatch::try_new(Arc::clone(&schema), batch.columns().to_vec()))
        .collect::<std::result::Result<Vec<_>, _>>()?;
    let rows = arrow::compute::concat_batches(&schema, &rows)?;
    let mut all_keys = held_values(previous.0, "k").await?;
    all_keys.extend(touched_keys);
    all_keys.sort_unstable();
    all_keys.dedup();
    let rows: Arc<dyn TableProvider> = Arc::new(datafusion::datasource::MemTable::try_new(schema, vec![vec![rows]])?);
    Ok((key_table(&all_keys)?.0, rows))
}

/// The rows of the keys in `keys` (a registered relation of `ctx`), computed by the table's
/// scoped statement in a context of its own, where the star's own history is the live history
/// of those keys only (their stored versions, looked up by key, and the tail's) and every
/// other table is the live one of `ctx`.
async fn recompute(
    ctx: &SessionContext,
    inputs: &LiveInputs<'_>,
    star: &ModelTable,
    keys: &str,
    previous_rows: Option<(&str, &str)>,
    held: &std::sync::Mutex<HeldStar>,
) -> Result<Arc<dyn TableProvider>> {
    let scoped = SessionContext::new_with_config_rt(SessionConfig::new(), Arc::clone(inputs.runtime));
    scoped.register_table("scope_keys", ctx.table_provider(keys).await?)?;
    let own = tail_of(inputs.tails, star.source()).ok_or_else(|| missing_tail(star.source()))?;
    let lookup = |tail: &HistoryTail| lock(held).lookups.get(&tail.spec.history_table()).cloned();
    let (mut own_history, touched_keys) =
        scoped_history(ctx, own, lookup(own), keys, &format!("{}_own", star.name)).await?;
    let own_rows = format!("{TAIL_SCHEMA}.{}_own_rows", star.name);
    if star.surrogate_key().is_none() {
        // Held: the statement reads it, and the dimension lookup below reads its members.
        let view = format!("{own_rows}_view");
        ctx.register_table(view.as_str(), own_history)?;
        own_history = hold_in_memory(ctx, &format!("SELECT * FROM {view}")).await?.0;
    }
    ctx.register_table(own_rows.as_str(), Arc::clone(&own_history))?;
    scoped.register_table(own.spec.history_table().as_str(), Arc::clone(&own_history))?;
    // The items' statement reads their orders' first versions: the orders of the touched
    // items only, looked up the same way, not the whole orders history.
    let mut placed = None;
    if star.name == tables::FACT_ORDER_ITEMS
        && let Some(orders) = tail_of(inputs.tails, "orders")
    {
        let order_keys = format!("{TAIL_SCHEMA}.{}_order_keys", star.name);
        ctx.register_table(order_keys.as_str(), key_table(&held_values(&own_history, "order_id").await?)?.0)?;
        let name = format!("{}_orders", star.name);
        let (history, _) = scoped_history(ctx, orders, lookup(orders), &order_keys, &name).await?;
        scoped.register_table(orders.spec.history_table().as_str(), history)?;
        placed = Some("orders");
    }
    for source in ["customers", "products", "orders", "order_items"] {
        let Some(tail) = tail_of(inputs.tails, source) else { continue };
        if source == star.source() || Some(source) == placed {
            continue;
        }
        let history = tail.spec.history_table();
        scoped.register_table(history.as_str(), ctx.table_provider(history.as_str()).await?)?;
    }
    // The facts read the versions of their own customers or products only: those are looked
    // up in the stored dimension (with this handle's recomputed rows in place of the stored
    // ones of the same keys), not read from the whole dimension.
    // Only the dimension columns the fact statements read (`acme_model::star`): a lookup
    // decodes each page it reads of each column it reads.
    let fact_dimension: Option<(&str, &str, &[&str])> = match star.name {
        tables::FACT_ORDERS => Some((
            tables::DIM_CUSTOMER,
            "customer_id",
            &["customer_sk", "customer_id", "valid_from_lsn", "valid_to_lsn"],
        )),
        tables::FACT_ORDER_ITEMS => Some((
            tables::DIM_PRODUCT,
            "product_id",
            &["product_sk", "product_id", "unity_price", "valid_from_lsn", "valid_to_lsn"],
        )),
        _ => None,
    };
    for dimension in [tables::DIM_CUSTOMER, tables::DIM_PRODUCT] {
        let provider = match fact_dimension {
            Some((wanted, ..)) if wanted != dimension => continue,
            Some((_, column, columns)) => {
                let ids = held_values(&own_history, column).await?;
                scoped_dimension(held, dimension, &ids, columns).await?
            }
            None => None,
        };
        let provider = match provider {
            Some(provider) => provider,
            None => match ctx.table_provider(dimension).await {
                Ok(provider) => provider,
                Err(_) => continue,
            },
        };
        scoped.register_table(dimension, provider)?;
    }
    let mut base = 0;
    if let Some(sk) = star.surrogate_key() {
        // The versions numbered so far (stored, and recomputed for an earlier part of the tail)
        // keep their keys; new ones are numbered after the highest.
        // The stored versions of the touched keys only (`model_previous` is joined with them).
        let index = lock(held).lookups.get(star.name).cloned();
        let stored = match index {
            Some(index) => {
                // (Read once: the history's lookup above read the same keys.)
                let touched = match &touched_keys {
                    Some(touched) => touched.clone(),
                    None => int64_column(ctx, &format!("SELECT k FROM {keys} s WHERE k IS NOT NULL")).await?,
                };
                let name = format!("{TAIL_SCHEMA}.{}_stored_touched", star.name);
                looked_up(ctx, &index, &touched, &name, star.name).await?
            }
            None => format!("{MODEL_SCHEMA}.{}", star.name),
        };
        let numbered = match previous_rows {
            None => stored,
            Some((rows, keys)) => {
                // (The held rows hold every version of their keys, the stored ones included.)
                let columns = column_list(&ctx.table_provider(rows).await?);
                format!("({})", replaced_sql(&stored, star.key, keys, rows, &columns))
            }
        };
        let view = ctx.sql(&format!("SELECT * FROM {numbered} n")).await?.into_view();
        scoped.register_table("model_previous", view)?;
        let max = |sql: String| async move {
            Ok::<_, crate::QueryError>(int64_row(ctx, &sql).await?.first().copied().flatten().unwrap_or(0))
        };
        let stored_max = match inputs.previous.and_then(|p| p.stored_max_sk.get(star.name)) {
            Some(max) => *max,
            None => max(format!("SELECT coalesce(max({sk}), 0) FROM {MODEL_SCHEMA}.{}", star.name)).await?,
        };
        lock(held).stored_max_sk.insert(star.name, stored_max);
        base = match previous_rows {
            Some((rows, _)) => stored_max.max(max(format!("SELECT coalesce(max({sk}), 0) FROM {rows}")).await?),
            None => stored_max,
        };
    }
    Ok(hold_in_memory(&scoped, &statement(star, Some("scope_keys"), base)?).await?.0)
}

/// Register `star` (keyed by its source's key, with no late-arriving keys) as a view that
/// recomputes the rows of the keys the tail touches in each query that reads it.
async fn register_lazy(
    ctx: &SessionContext,
    inputs: &LiveInputs<'_>,
    star: &ModelTable,
    held: &std::sync::Mutex<HeldStar>,
) -> Result<()> {
    let tail = tail_of(inputs.tails, star.source()).ok_or_else(|| missing_tail(star.source()))?;
    let keys = format!("{TAIL_SCHEMA}.{}_keys", star.name);
    let keys_view = ctx.sql(&format!("SELECT DISTINCT k FROM {} f WHERE k IS NOT NULL", tail.first)).await?;
    ctx.register_table(keys.as_str(), keys_view.into_view())?;
    let scoped = SessionContext::new_with_config_rt(SessionConfig::new(), Arc::clone(inputs.runtime));
    scoped.register_table("scope_keys", ctx.table_provider(keys.as_str()).await?)?;
    let lookup = lock(held).lookups.get(&tail.spec.history_table()).cloned();
    let (history, _) = scoped_history(ctx, tail, lookup, &keys, star.name).await?;
    scoped.register_table(tail.spec.history_table().as_str(), history)?;
    let rows = format!("{TAIL_SCHEMA}.{}_rows", star.name);
    ctx.register_table(rows.as_str(), scoped.sql(&statement(star, Some("scope_keys"), 0)?).await?.into_view())?;
    let columns = column_list(&ctx.table_provider(rows.as_str()).await?);
    let view = replaced_sql(&format!("{MODEL_SCHEMA}.{}", star.name), star.key, &keys, &rows, &columns);
    ctx.register_table(star.name, ctx.sql(&view).await?.into_view())?;
    Ok(())
}

/// The live history of `tail`'s source restricted to the keys in `keys` (a relation of `ctx`
/// with a column `k`): their stored versions, looked up by key, with the tail applied. Also
/// returns the keys, when they were read to look them up.
async fn scoped_history(
    ctx: &SessionContext,
    tail: &HistoryTail,
    lookup: Option<StoredLookup>,
    keys: &str,
    lookup_name: &str,
) -> Result<(Arc<dyn TableProvider>, Option<Vec<i64>>)> {
    let history = tail.spec.history_table();
    let key = quote(&tail.spec.key);
    let mut read = None;
    let stored = match lookup {
        Some(index) => {
            // The stored versions of the keys, read from the pages that hold them (keys above
            // every stored key, a serial key's inserts, are not read at all).
            let keys = int64_column(ctx, &format!("SELECT k FROM {keys} s WHERE k IS NOT NULL")).await?;
            let name = format!("{TAIL_SCHEMA}.{lookup_name}_lookup");
            let relation = looked_up(ctx, &index, &keys, &name, &history).await?;
            read = Some(keys);
            format!("(SELECT h.* FROM {relation} h)")
        }
        None => format!("(SELECT h.* FROM {MODEL_SCHEMA}.{history} h JOIN {keys} s ON s.k = h.{key})"),
    };
    let sql =
        live::live_history_sql(&tail.spec, &stored, &tail.first, &tail.versions, &tail.attributes, &tail.truncates);
    Ok((ctx.sql(&sql).await?.into_view(), read))
}

fn missing_tail(source: &str) -> crate::QueryError {
    datafusion::error::DataFusionError::Internal(format!("the live star has no raw tail for `{source}`")).into()
}

/// The quoted column names of a relation, comma-separated.
fn column_list(provider: &Arc<dyn TableProvider>) -> String {
    provider.schema().fields().iter().map(|f| format!("\"{}\"", f.name())).collect::<Vec<_>>().join(", ")
}

/// SQL of the rows of `base` whose `key` is not among the keys of `keys` (column `k`),
/// followed by the rows of `rows`: `base` with those keys' rows replaced. `columns` (from
/// [`column_list`]) are the columns both give.
fn replaced_sql(base: &str, key: &str, keys: &str, rows: &str, columns: &str) -> String {
    let kept = columns.split(", ").map(|c| format!("b.{c}")).collect::<Vec<_>>().join(", ");
    format!(
        "SELECT {kept} FROM {base} b LEFT JOIN {keys} t ON t.k = b.{key} WHERE t.k IS NULL \
         UNION ALL SELECT {columns} FROM {rows}"
    )
}

/// The memory a held relation takes.
fn memory(provider: &Arc<dyn TableProvider>) -> u64 {
    provider
        .as_ref()
        .downcast_ref::<datafusion::datasource::MemTable>()
        .map_or(0, |m| m.batches.iter().map(|p| p.try_read().map_or(0, |b| held_bytes(b.as_slice()))).sum())
}

fn held_bytes(batches: &[arrow::array::RecordBatch]) -> u64 {
    batches.iter().map(|b| b.get_array_memory_size() as u64).sum()
}

/// The stored rows of `table` (a model table) whose key is among `keys`, read through its
/// key index and held in `ctx` as `name`. Returns the relation to read them from (an empty
/// one when there are none).
async fn looked_up(
    ctx: &SessionContext,
    index: &acme_core::KeyIndex,
    keys: &[i64],
    name: &str,
    table: &str,
) -> Result<String> {
    let rows = looked_up_rows(index, keys, table, None).await?;
    if rows.is_empty() {
        return Ok(format!("(SELECT * FROM {MODEL_SCHEMA}.{table} WHERE false)"));
    }
    ctx.register_table(name, Arc::new(datafusion::datasource::MemTable::try_new(index.schema(), vec![rows])?))?;
    Ok(name.to_string())
}

/// The live rows of `dimension` for the business keys `ids`, with only `columns`: the stored
/// versions of those keys, looked up, with the rows this handle recomputed for its touched keys
/// in place of the stored ones. `None` when the dimension is not stored (the live view is then
/// read whole).
async fn scoped_dimension(
    held: &std::sync::Mutex<HeldStar>,
    dimension: &'static str,
    ids: &[i64],
    columns: &[&str],
) -> Result<Option<Arc<dyn TableProvider>>> {
    let Some(star) = MODEL.iter().find(|s| s.name == dimension) else { return Ok(None) };
    let Some(index) = lock(held).lookups.get(dimension).cloned() else { return Ok(None) };
    let stored = looked_up_rows(&index, ids, dimension, Some(columns)).await?;
    let recomputed = lock(held).tables.get(dimension).cloned();
    let wanted: HashSet<i64> = ids.iter().copied().collect();
    let of_wanted = |batch: &RecordBatch| membership(batch, star.key, &wanted, true);
    let rows = visible_rows(&stored, star.key, recomputed.as_ref(), &of_wanted).await?;
    // One schema (the stored table's columns, nullable) for the looked-up and the held rows.
    let index_schema = index.schema();
    let fields = columns
        .iter()
        .map(|c| Ok(index_schema.field_with_name(c)?.clone().with_nullable(true)))
        .collect::<std::result::Result<Vec<_>, arrow::error::ArrowError>>()?;
    let schema = Arc::new(Schema::new(fields));
    let rows = rows
        .iter()
        .map(|batch| {
            let projected = schema
                .fields()
                .iter()
                .map(|f| {
                    let column = batch.column_by_name(f.name()).ok_or_else(|| {
                        datafusion::error::DataFusionError::Internal(format!("`{dimension}` has no `{}`", f.name()))
                    })?;
                    Ok(arrow::compute::cast(column, f.data_type())?)
                })
                .collect::<Result<Vec<_>>>()?;
            Ok(RecordBatch::try_new(Arc::clone(&schema), projected)?)
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(Some(Arc::new(datafusion::datasource::MemTable::try_new(schema, vec![rows])?)))
}

/// The distinct non-null values of integer column `column` of a held relation, sorted.
async fn held_values(provider: &Arc<dyn TableProvider>, column: &str) -> Result<Vec<i64>> {
    let mut values = Vec::new();
    for batch in held_rows(provider).await? {
        values.extend(int64s(&batch, column)?.iter().flatten());
    }
    values.sort_unstable();
    values.dedup();
    Ok(values)
}

/// The first column of a query's rows, as Int64 values (nulls left out).
async fn int64_column(ctx: &SessionContext, sql: &str) -> Result<Vec<i64>> {
    let mut out = Vec::new();
    for batch in ctx.sql(sql).await?.collect().await? {
        let column = arrow::compute::cast(batch.column(0), &arrow::datatypes::DataType::Int64)?;
        out.extend(column.as_primitive::<Int64Type>().iter().flatten());
    }
    Ok(out)
}

/// A one-column relation `k` of `keys`, held in memory, and the memory it takes.
/// Per history source (`orders`, ...): the keys its raw changes after `since` touch, sorted
/// (registered by [`register`] as `tail.raw_<source>_since`).
async fn changed_keys(ctx: &SessionContext, tails: &[HistoryTail], since: i64) -> Result<HashMap<String, Vec<i64>>> {
    use datafusion::prelude::{ident, lit};
    let mut out = HashMap::new();
    for tail in tails {
        let relation = format!("{TAIL_SCHEMA}.raw_{}_since", tail.spec.table);
        if !ctx.table_exist(relation.as_str())? {
            continue;
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
        out.insert(tail.spec.table.clone(), keys);
    }
    Ok(out)
}

/// What `live::touched_keys_sql` selects for `star`, from the keys the changes since the
/// previous handle touch (`since`, per source) and held rows, without a query: the source's
/// changed keys; for a fact table, the rows with an Unknown member (in `unknown`: the stored
/// ones and the previous handle's) whose member a change touches; for the items, those of the
/// orders placed since with no stored version (`items_of`: their ids and the stored items'
/// lookup by order; `previous_rows`: the previous handle's items). `None` when a relation is
/// not held in memory or a column is not an integer: the statement finds them then.
async fn touched_in_memory(
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
        let touched: std::collections::HashSet<i64> = since.get(source).into_iter().flatten().copied().collect();
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
        let placed: std::collections::HashSet<i64> = orders.iter().copied().collect();
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

/// Per row of `batch`: whether its `column` is (`members`) or is not (`!members`) one of `set`
/// (a null is in no set).
fn membership(batch: &RecordBatch, column: &str, set: &HashSet<i64>, members: bool) -> Result<BooleanArray> {
    Ok(int64s(batch, column)?.iter().map(|v| Some(v.is_some_and(|v| set.contains(&v)) == members)).collect())
}

/// Column `name` of `batch` as 64-bit integers.
fn int64s(batch: &arrow::array::RecordBatch, name: &str) -> Result<arrow::array::Int64Array> {
    let column = batch.column_by_name(name).ok_or_else(|| {
        datafusion::error::DataFusionError::Internal(format!("a held relation has no column `{name}`"))
    })?;
    Ok(arrow::compute::cast(column, &arrow::datatypes::DataType::Int64)?.as_primitive::<Int64Type>().clone())
}

/// The stored table's lookup by `key` (`<table>.<key>` in the held lookups), made once per
/// stored model; `None` when the table is not stored.
async fn stored_lookup(
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

fn key_table(keys: &[i64]) -> Result<(Arc<dyn TableProvider>, usize)> {
    let schema =
        Arc::new(Schema::new(vec![arrow::datatypes::Field::new("k", arrow::datatypes::DataType::Int64, true)]));
    let batches = if keys.is_empty() {
        Vec::new()
    } else {
        let column = Arc::new(arrow::array::Int64Array::from(keys.to_vec())) as arrow::array::ArrayRef;
        vec![arrow::array::RecordBatch::try_new(Arc::clone(&schema), vec![column])?]
    };
    let bytes = batches.iter().map(arrow::array::RecordBatch::get_array_memory_size).sum();
    Ok((Arc::new(datafusion::datasource::MemTable::try_new(schema, vec![batches])?), bytes))
}

/// The first row of a query, as Int64 values.
async fn int64_row(ctx: &SessionContext, sql: &str) -> Result<Vec<Option<i64>>> {
    let batches = ctx.sql(sql).await?.collect().await?;
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
