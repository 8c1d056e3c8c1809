//! R3 and R4 on the current state, kept by difference from one handle to the next: the
//! pending items per product and the current orders per customer and status.

use super::*;
use arrow::datatypes::DataType;

/// Name of the relation holding R3 on the current state, when a handle maintains it.
pub(crate) const PENDING_ITEMS: &str = "pending_items_current";

/// R3 on the current state at this handle's position, registered as [`PENDING_ITEMS`]
/// (`product_id`, `total_items`, `items`). From a handle at the same model position that
/// maintained it, by difference: the items whose rows the changes since that handle touch, and
/// the items of the touched orders whose current open rows changed, are taken off as that
/// handle saw them and added back as this one sees them; the stored rows involved are looked up by key, never scanned, and the
/// difference is counted in memory (a few hundred rows: planning a query cost more). Otherwise
/// (the first handle on a stored model) counted over the live facts once. Returns the counts,
/// and whether they were kept by difference.
pub(super) async fn pending_items(
    ctx: &SessionContext,
    inputs: &LiveInputs<'_>,
    held: &mut HeldStar,
    touched: Option<&TouchedOrders>,
) -> Result<(PendingItems, bool)> {
    let items_table = tables::FACT_ORDER_ITEMS;
    let orders_table = tables::FACT_ORDERS;
    let previous = inputs.previous.and_then(|p| Some((p, p.pending.as_ref()?)));
    let Some(((previous, before), touched)) = previous.zip(touched) else {
        let totals = collect_counts(ctx, &pending_counts_sql()).await?;
        register_pending(ctx, &totals)?;
        return Ok((totals, false));
    };
    let (items, orders) = (touched_since(ctx, items_table).await?, &touched.keys);
    let mut totals = (**before).clone();
    if items.is_empty() && orders.is_empty() {
        register_pending(ctx, &totals)?;
        return Ok((totals, true));
    }
    let items_index = fact_lookup(inputs, held, items_table, "order_item_id").await?;
    let orders_index = fact_lookup(inputs, held, orders_table, "order_id").await?;
    // (Only the columns counted: a lookup decodes every page it reads of each column it reads.)
    let order_columns = Some(&["order_id", "is_current", "is_open"][..]);
    let item_columns = Some(&["order_item_id", "order_id", "product_id", "quantity", "is_current"][..]);
    // The touched orders' current open rows, as the previous handle saw them and as this one
    // sees them. An order whose count did not move (a status change between open statuses, a
    // new delivery date) counts its untouched items alike on both sides: only the orders whose
    // count moved (placed, deleted, completed or reopened) need their items looked up, which is
    // the dearest lookup of the step (the items are stored in item order, not order order).
    let touched_orders: KeySet = orders.iter().copied().collect();
    let of_touched =
        |batch: &RecordBatch| -> Result<BooleanArray> { membership(batch, "order_id", &touched_orders, true) };
    let mut stored_orders = touched.stored.clone();
    let open_before =
        open_rows(&visible_rows(&stored_orders, "order_id", previous.tables.get(orders_table), &of_touched).await?)?;
    let open_after =
        open_rows(&visible_rows(&stored_orders, "order_id", held.tables.get(orders_table), &of_touched).await?)?;
    let moved: Vec<i64> = orders.iter().copied().filter(|o| open_before.get(o) != open_after.get(o)).collect();
    let items_by_order = match moved.is_empty() {
        true => None,
        false => Some(fact_lookup(inputs, held, items_table, "order_id").await?),
    };
    // The stored rows of the touched items and of the moved orders' items.
    let item_set: KeySet = items.iter().copied().collect();
    let mut stored_items = looked_up_rows(&items_index, &items, items_table, item_columns).await?;
    if let Some(items_by_order) = &items_by_order {
        for batch in looked_up_rows(items_by_order, &moved, items_table, item_columns).await? {
            let mask = membership(&batch, "order_item_id", &item_set, false)?;
            stored_items.push(arrow::compute::filter_record_batch(&batch, &mask)?);
        }
    }
    let moved: KeySet = moved.into_iter().collect();
    // (One pass over each held batch: every refresh tests every held item.)
    let affected = |batch: &RecordBatch| -> Result<BooleanArray> {
        let (items, orders) = (int64s(batch, "order_item_id")?, int64s(batch, "order_id")?);
        let touched = |i: usize| items.is_valid(i) && item_set.contains(&items.value(i));
        let of_moved = |i: usize| !moved.is_empty() && orders.is_valid(i) && moved.contains(&orders.value(i));
        let bits = arrow::buffer::BooleanBuffer::collect_bool(batch.num_rows(), |i| touched(i) || of_moved(i));
        Ok(BooleanArray::new(bits, None))
    };
    // Each side: the affected items as the previous handle saw them, and as this one sees them.
    let sides = [(previous, -1), (&*held, 1)];
    let mut side_items = Vec::new();
    for (side, _) in sides {
        side_items.push(visible_rows(&stored_items, "order_item_id", side.tables.get(items_table), &affected).await?);
    }
    // Their orders, on both sides: the touched ones were read above.
    let mut others = Vec::new();
    for batch in side_items.iter().flatten() {
        others.extend(int64s(batch, "order_id")?.iter().flatten().filter(|o| !touched_orders.contains(o)));
    }
    others.sort_unstable();
    others.dedup();
    stored_orders.extend(looked_up_rows(&orders_index, &others, orders_table, order_columns).await?);
    let wanted: KeySet = touched_orders.iter().chain(&others).copied().collect();
    let of_wanted = |batch: &RecordBatch| -> Result<BooleanArray> { membership(batch, "order_id", &wanted, true) };
    for ((side, sign), items) in sides.into_iter().zip(side_items) {
        let open =
            open_rows(&visible_rows(&stored_orders, "order_id", side.tables.get(orders_table), &of_wanted).await?)?;
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

/// Per order id: how many of `orders`' rows are current and open (the rows R3's join matches).
fn open_rows(orders: &[RecordBatch]) -> Result<HashMap<i64, i64>> {
    let mut open = HashMap::new();
    for batch in orders {
        let (ids, current, is_open) =
            (int64s(batch, "order_id")?, bools(batch, "is_current")?, bools(batch, "is_open")?);
        for i in 0..batch.num_rows() {
            if ids.is_valid(i) && current.is_valid(i) && current.value(i) && is_open.is_valid(i) && is_open.value(i) {
                *open.entry(ids.value(i)).or_insert(0) += 1;
            }
        }
    }
    Ok(open)
}

/// R3's counts over the fact tables registered in a context (`fact_order_items`, `fact_orders`):
/// per product id, the sum of the quantities of the current items of current open orders, how
/// many of those quantities are not null, and how many items count ([`PendingItems`]).
pub(super) fn pending_counts_sql() -> String {
    format!(
        "SELECT i.product_id, CAST(sum(i.quantity) AS BIGINT) AS total_items, \
           CAST(count(i.quantity) AS BIGINT) AS counted, CAST(count(*) AS BIGINT) AS items FROM {} i \
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

/// Name of the relation of current orders per customer and status (`customer_id`, `status`,
/// `is_open`, `is_pending`, `orders`), when a handle maintains it.
pub(crate) const CUSTOMER_ORDERS: &str = "customer_orders_current";

/// Current orders per customer and status at this handle's position, registered as
/// [`CUSTOMER_ORDERS`]. From a handle at the same model position that kept them: the orders the
/// changes since that handle touch are taken off as it saw them and added back as this one sees
/// them (stored rows looked up by key, counted in memory). Otherwise counted once over the live
/// `fact_orders`.
pub(super) async fn customer_orders(
    ctx: &SessionContext,
    inputs: &LiveInputs<'_>,
    held: &HeldStar,
    touched: Option<&TouchedOrders>,
) -> Result<CustomerOrders> {
    let table = tables::FACT_ORDERS;
    let count = |relation: &str| {
        format!(
            "SELECT customer_id, status, CAST(count(*) AS BIGINT) AS orders FROM {relation} o WHERE is_current \
             GROUP BY customer_id, status"
        )
    };
    let previous = inputs.previous.and_then(|p| Some((p, p.customer_orders.as_ref()?)));
    let counts = match previous.zip(touched) {
        None => CustomerOrders {
            base: hold_in_memory(ctx, &count(table)).await?.0,
            delta: HashMap::new(),
            ranked: Arc::default(),
        },
        Some(((previous, kept), touched)) => CustomerOrders {
            base: Arc::clone(&kept.base),
            delta: touched.moved(&kept.delta, (previous, held), customer_ids).await?,
            ranked: Arc::clone(&kept.ranked),
        },
    };
    register_customer_orders(ctx, &counts).await?;
    Ok(counts)
}

/// Register [`CUSTOMER_ORDERS`]: the base counts and the differences since, with the status
/// flags `fact_orders` derives from the status.
pub(super) async fn register_customer_orders(ctx: &SessionContext, counts: &CustomerOrders) -> Result<()> {
    use arrow::array::{ArrayRef, Int64Array, StringArray};
    let base = format!("{TAIL_SCHEMA}.customer_orders_base");
    let delta = format!("{TAIL_SCHEMA}.customer_orders_delta");
    ctx.register_table(base.as_str(), Arc::clone(&counts.base))?;
    let customers: Int64Array = counts.delta.keys().map(|(c, _)| *c).collect();
    let statuses: StringArray = counts.delta.keys().map(|(_, s)| s.clone()).collect();
    let orders: Int64Array = counts.delta.values().map(|n| Some(*n)).collect();
    let columns: Vec<ArrayRef> = vec![Arc::new(customers), Arc::new(statuses), Arc::new(orders)];
    register_differences(ctx, &delta, &counts.base, columns)?;
    let view = crate::plans::sql(
        ctx,
        &format!(
            "SELECT customer_id, status, status <> 'COMPLETED' AS is_open, status = 'PENDING' AS is_pending, orders \
             FROM (SELECT * FROM {base} UNION ALL SELECT * FROM {delta}) c"
        ),
    )
    .await?;
    ctx.register_table(CUSTOMER_ORDERS, view.into_view())?;
    Ok(())
}

/// The `fact_orders` keys the changes since the previous handle touch, and their stored rows
/// (the columns R3's and R4's differences count), looked up once for both: the lookup reads a
/// page of each column per key, and random keys touch most of the table's pages.
pub(super) struct TouchedOrders {
    keys: Vec<i64>,
    stored: Vec<RecordBatch>,
    /// Their rows as the previous handle saw them and as this one sees them, read once for
    /// R4's and R1's counts.
    sides: tokio::sync::OnceCell<[Vec<RecordBatch>; 2]>,
}

impl TouchedOrders {
    /// The touched orders' `fact_orders` rows as `previous` saw them and as `held` sees them.
    async fn sides(&self, previous: &HeldStar, held: &HeldStar) -> Result<&[Vec<RecordBatch>; 2]> {
        self.sides
            .get_or_try_init(|| async {
                let wanted: KeySet = self.keys.iter().copied().collect();
                let of_wanted = |batch: &RecordBatch| membership(batch, "order_id", &wanted, true);
                let table = tables::FACT_ORDERS;
                Ok::<_, crate::QueryError>([
                    visible_rows(&self.stored, "order_id", previous.tables.get(table), &of_wanted).await?,
                    visible_rows(&self.stored, "order_id", held.tables.get(table), &of_wanted).await?,
                ])
            })
            .await
    }

    /// `kept` (current orders per key and status) moved by the touched orders: their rows as
    /// `previous` saw them taken off, as `held` sees them added, per the key `keys` reads.
    async fn moved<K: Eq + std::hash::Hash + Clone>(
        &self,
        kept: &HashMap<(Option<K>, Option<String>), i64>,
        (previous, held): (&HeldStar, &HeldStar),
        keys: impl Fn(&RecordBatch) -> Result<Vec<Option<K>>>,
    ) -> Result<HashMap<(Option<K>, Option<String>), i64>> {
        let mut delta = kept.clone();
        if !self.keys.is_empty() {
            let [before, after] = self.sides(previous, held).await?;
            count_current_orders(&mut delta, before, -1, &keys)?;
            count_current_orders(&mut delta, after, 1, &keys)?;
            delta.retain(|_, n| *n != 0);
        }
        Ok(delta)
    }
}

/// The columns of the stored `fact_orders` rows in [`TouchedOrders`].
const TOUCHED_ORDER_COLUMNS: [&str; 6] =
    ["order_id", "customer_id", "delivery_date", "status", "is_current", "is_open"];

/// [`TouchedOrders`], when a handle extends the R3 or R4 counts of a previous one (otherwise
/// they are counted whole and need none).
pub(super) async fn touched_orders(
    ctx: &SessionContext,
    inputs: &LiveInputs<'_>,
    held: &mut HeldStar,
) -> Result<Option<TouchedOrders>> {
    if inputs.previous.is_none_or(|p| p.pending.is_none() && p.customer_orders.is_none()) {
        return Ok(None);
    }
    let table = tables::FACT_ORDERS;
    let keys = touched_since(ctx, table).await?;
    let stored = match keys.is_empty() {
        true => Vec::new(),
        false => {
            let index = fact_lookup(inputs, held, table, "order_id").await?;
            looked_up_rows(&index, &keys, table, Some(&TOUCHED_ORDER_COLUMNS)).await?
        }
    };
    Ok(Some(TouchedOrders { keys, stored, sides: tokio::sync::OnceCell::new() }))
}

/// The keys of a star table that the changes since the previous handle touch (registered by
/// `register_one` as `<table>_touched`; none when it registered none).
/// Current orders per delivery date and status at this handle's position, registered as the
/// live `agg_orders_by_delivery_date` in place of the view the tail registered (which joins the
/// tail's orders with the whole stored history in every query that reads it). An order's
/// current `fact_orders` row is its current, undeleted version, which is what the aggregate
/// counts, so the counts move by `fact_orders` rows:
/// - from a handle at the same model position that kept them, the orders the changes since that
///   handle touch are taken off as it saw them and added back as this one sees them (the rows
///   R4's counts looked up);
/// - otherwise (the first handle on a stored model), the stored aggregate, with the orders this
///   handle recomputed taken off as stored (their stored rows looked up by key) and added back
///   as recomputed.
pub(super) async fn delivery_counts(
    ctx: &SessionContext,
    inputs: &LiveInputs<'_>,
    held: &mut HeldStar,
    touched: Option<&TouchedOrders>,
) -> Result<DeliveryCounts> {
    let (aggregate, table) = (tables::AGG_ORDERS_BY_DELIVERY_DATE, tables::FACT_ORDERS);
    let previous = inputs.previous.and_then(|p| Some((p, p.delivery_counts.as_ref()?)));
    let counts = match previous.zip(touched) {
        None => {
            let stored = format!("SELECT delivery_date, status, orders FROM {MODEL_SCHEMA}.{aggregate}");
            let base = hold_in_memory(ctx, &stored).await?.0;
            let mut delta = HashMap::new();
            if let Some((keys, rows)) = held.tables.get(table).cloned() {
                let keys = held_values(&keys, "k").await?;
                let index = fact_lookup(inputs, held, table, "order_id").await?;
                let columns = ["order_id", "delivery_date", "status", "is_current"];
                count_current_orders(
                    &mut delta,
                    &looked_up_rows(&index, &keys, table, Some(&columns)).await?,
                    -1,
                    delivery_dates,
                )?;
                count_current_orders(&mut delta, &held_rows(&rows).await?, 1, delivery_dates)?;
            }
            delta.retain(|_, n| *n != 0);
            DeliveryCounts { base, delta }
        }
        Some(((previous, kept), touched)) => DeliveryCounts {
            base: Arc::clone(&kept.base),
            delta: touched.moved(&kept.delta, (previous, held), delivery_dates).await?,
        },
    };
    register_delivery_counts(ctx, &counts).await?;
    Ok(counts)
}

/// Add `sign` to `counts` for each current row of `fact_orders` rows `batches`, per (key,
/// status), the key being what `keys` reads off each batch.
fn count_current_orders<K: Eq + std::hash::Hash>(
    counts: &mut HashMap<(Option<K>, Option<String>), i64>,
    batches: &[RecordBatch],
    sign: i64,
    keys: impl Fn(&RecordBatch) -> Result<Vec<Option<K>>>,
) -> Result<()> {
    for batch in batches {
        let (current, statuses, keys) = (bools(batch, "is_current")?, strings(batch, "status")?, keys(batch)?);
        for (i, key) in keys.into_iter().enumerate() {
            if current.is_valid(i) && current.value(i) {
                let status = statuses.is_valid(i).then(|| statuses.value(i).to_string());
                *counts.entry((key, status)).or_insert(0) += sign;
            }
        }
    }
    Ok(())
}

/// R4's key of `fact_orders` rows: the customer id.
fn customer_ids(batch: &RecordBatch) -> Result<Vec<Option<i64>>> {
    Ok(int64s(batch, "customer_id")?.iter().collect())
}

/// R1's key of `fact_orders` rows: the delivery date, as days since the epoch.
fn delivery_dates(batch: &RecordBatch) -> Result<Vec<Option<i32>>> {
    let dates = arrow::compute::cast(column(batch, "delivery_date")?, &DataType::Date32)?;
    Ok(dates.as_primitive::<arrow::datatypes::Date32Type>().iter().collect())
}

/// Register the live `agg_orders_by_delivery_date` as `counts`' base with its differences
/// added (the base alone when there are none), in the base's schema.
async fn register_delivery_counts(ctx: &SessionContext, counts: &DeliveryCounts) -> Result<()> {
    use arrow::array::{ArrayRef, Date32Array, Int64Array, StringArray};
    let aggregate = tables::AGG_ORDERS_BY_DELIVERY_DATE;
    ctx.deregister_table(aggregate)?;
    if counts.delta.is_empty() {
        ctx.register_table(aggregate, Arc::clone(&counts.base))?;
        return Ok(());
    }
    let base = format!("{TAIL_SCHEMA}.delivery_counts_base");
    let delta = format!("{TAIL_SCHEMA}.delivery_counts_delta");
    ctx.register_table(base.as_str(), Arc::clone(&counts.base))?;
    let dates: Date32Array = counts.delta.keys().map(|(d, _)| *d).collect();
    let statuses: StringArray = counts.delta.keys().map(|(_, s)| s.clone()).collect();
    let orders: Int64Array = counts.delta.values().map(|n| Some(*n)).collect();
    let columns: Vec<ArrayRef> = vec![Arc::new(dates), Arc::new(statuses), Arc::new(orders)];
    register_differences(ctx, &delta, &counts.base, columns)?;
    let view = crate::plans::sql(
        ctx,
        &format!(
            "SELECT delivery_date, status, CAST(sum(orders) AS BIGINT) AS orders \
             FROM (SELECT * FROM {base} UNION ALL SELECT * FROM {delta}) c \
             GROUP BY delivery_date, status HAVING sum(orders) <> 0"
        ),
    )
    .await?;
    ctx.register_table(aggregate, view.into_view())?;
    Ok(())
}

/// Register `columns` (differences of counts held in `base`, column for column) as the
/// relation `name`, in `base`'s schema made nullable (a difference may be of rows with no key
/// value), so that a query can add them to `base`.
fn register_differences(
    ctx: &SessionContext,
    name: &str,
    base: &Arc<dyn TableProvider>,
    columns: Vec<arrow::array::ArrayRef>,
) -> Result<()> {
    let schema = Arc::new(Schema::new(
        base.schema().fields().iter().map(|f| f.as_ref().clone().with_nullable(true)).collect::<Vec<_>>(),
    ));
    let columns = columns
        .iter()
        .zip(schema.fields())
        .map(|(c, f)| arrow::compute::cast(c, f.data_type()))
        .collect::<std::result::Result<Vec<_>, _>>()?;
    let batch = RecordBatch::try_new(Arc::clone(&schema), columns)?;
    ctx.register_table(name, Arc::new(datafusion::datasource::MemTable::try_new(schema, vec![vec![batch]])?))?;
    Ok(())
}

pub(super) async fn touched_since(ctx: &SessionContext, table: &str) -> Result<Vec<i64>> {
    let relation = format!("{TAIL_SCHEMA}.{table}_touched");
    match ctx.table_exist(relation.as_str())? {
        true => Ok(held_values(&ctx.table_provider(relation.as_str()).await?, "k").await?.to_vec()),
        false => Ok(Vec::new()),
    }
}

/// The stored fact table's lookup by `key`, made once per stored model.
pub(super) async fn fact_lookup(
    inputs: &LiveInputs<'_>,
    held: &mut HeldStar,
    table: &str,
    key: &str,
) -> Result<StoredLookup> {
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
pub(super) async fn new_lookup(inputs: &LiveInputs<'_>, table: &str, key: &str) -> Result<Option<StoredLookup>> {
    match inputs.stored.get(table) {
        Some(stored) => Ok(Some(Arc::new(stored.key_index(key).await?))),
        None => Ok(None),
    }
}

/// Per product id: the three counts of [`PendingItems`] a query returns.
pub(super) async fn collect_counts(ctx: &SessionContext, sql: &str) -> Result<PendingItems> {
    let mut out = PendingItems::new();
    for batch in crate::plans::sql(ctx, sql).await?.collect().await? {
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
pub(super) fn register_pending(ctx: &SessionContext, totals: &PendingItems) -> Result<()> {
    register_pending_as(ctx, PENDING_ITEMS, totals)
}

/// Register the live `agg_pending_items_by_product` (R3's counts as the model keeps them:
/// `product_id`, `total_items`, `counted`, `items`) from `totals`.
pub(super) fn register_pending_aggregate(ctx: &SessionContext, totals: &PendingItems) -> Result<()> {
    register_totals(ctx, tables::AGG_PENDING_ITEMS_BY_PRODUCT, totals, true)
}

/// [`register_pending`] under `name`.
pub(super) fn register_pending_as(ctx: &SessionContext, name: &str, totals: &PendingItems) -> Result<()> {
    register_totals(ctx, name, totals, false)
}

/// Register `totals` as `name` (`product_id`, `total_items`, then `counted` when asked for,
/// then `items`); `total_items` is null where no quantity counts, as SQL's sum of none.
fn register_totals(ctx: &SessionContext, name: &str, totals: &PendingItems, with_counted: bool) -> Result<()> {
    use arrow::array::{ArrayRef, Int64Array};
    use arrow::datatypes::{DataType, Field};
    let mut fields =
        vec![Field::new("product_id", DataType::Int64, true), Field::new("total_items", DataType::Int64, true)];
    let products: Int64Array = totals.keys().copied().collect();
    let sums: Int64Array = totals.values().map(|[sum, counted, _]| (*counted > 0).then_some(*sum)).collect();
    let mut columns: Vec<ArrayRef> = vec![Arc::new(products), Arc::new(sums)];
    if with_counted {
        fields.push(Field::new("counted", DataType::Int64, false));
        columns.push(Arc::new(totals.values().map(|[_, counted, _]| Some(*counted)).collect::<Int64Array>()));
    }
    fields.push(Field::new("items", DataType::Int64, false));
    columns.push(Arc::new(totals.values().map(|[_, _, rows]| Some(*rows)).collect::<Int64Array>()));
    let schema = Arc::new(Schema::new(fields));
    let batch = arrow::array::RecordBatch::try_new(Arc::clone(&schema), columns)?;
    ctx.register_table(name, Arc::new(datafusion::datasource::MemTable::try_new(schema, vec![vec![batch]])?))?;
    Ok(())
}
