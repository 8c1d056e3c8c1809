//! Recomputing a star table's touched keys on read: the keys, their stored rows and the
//! rows the table's own statement computes for them over the live histories.

use super::*;

/// Register one star table; returns the memory its held keys and rows take, and them.
pub(super) async fn register_one(
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
        // An order with no stored version opens its first version with an insert (or a
        // snapshot row, when its table is snapshotted again): the orders whose first tail
        // change is an update or a delete have stored versions, and are not looked up. (A
        // serial key's inserts lie above every stored key: their lookup reads nothing.)
        let since = previous.map(|(since, _)| since);
        // (As SQL for the paths that plan a query: the first changes are not held in memory,
        // or the stored history has no lookup.)
        let placed_sql = || {
            format!(
                "(SELECT k FROM {} f WHERE f.op IN ({}){})",
                orders.first,
                OPENING_OPS.iter().map(|op| format!("'{}'", op.as_str())).collect::<Vec<_>>().join(", "),
                since.map(|since| format!(" AND f.lsn > {since}")).unwrap_or_default()
            )
        };
        let orders_history = orders.spec.history_table();
        // (The lock is released before the awaits below: the other tables take it meanwhile.)
        let index = lock(held).lookups.get(&orders_history).cloned();
        let (provider, new_bytes) = match index {
            // The placed orders with no stored version, by a lookup of their keys.
            Some(index) => {
                let placed = match held_relation(ctx, &orders.first).await {
                    Some(first) => opening_keys(&first, since)?,
                    None => int64_column(ctx, &format!("SELECT k FROM {} p WHERE k IS NOT NULL", placed_sql())).await?,
                };
                let stored = index.rows(&placed, Some(&[orders.spec.key.as_str()])).await?;
                let stored: KeySet = stored
                    .iter()
                    .flat_map(|b| b.column(0).as_primitive::<Int64Type>().iter().flatten().collect::<Vec<_>>())
                    .collect();
                let new: Vec<i64> = placed.into_iter().filter(|k| !stored.contains(k)).collect();
                let table = key_table(&new)?;
                new_orders = Some(new);
                table
            }
            None => {
                let sql = live::new_orders_sql(&placed_sql(), &format!("{MODEL_SCHEMA}.{orders_history}"));
                hold_in_memory(ctx, &sql).await?
            }
        };
        if new_bytes > 0 {
            ctx.register_table(name("new_orders").as_str(), provider)?;
            let bounds = match &new_orders {
                Some(new) => vec![new.iter().min().copied(), new.iter().max().copied()],
                None => int64_row(ctx, &format!("SELECT min(k), max(k) FROM {}", name("new_orders"))).await?,
            };
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
    ctx.register_table(star.name, crate::plans::sql(ctx, &view).await?.into_view())?;
    Ok((memory(&all_keys) + memory(&rows), Some((all_keys, rows))))
}

/// A star table's held keys and rows extended with a refresh's recomputed rows: `previous`'s
/// rows of the keys not in `touched`, then `fresh`; and the union of the keys. The held batches
/// none of whose keys is touched are passed on as they are, not copied; the batches are merged
/// into one past [`crate::HELD_PIECE_BATCHES`].
pub(super) async fn extend_rows(
    previous: (&Arc<dyn TableProvider>, &Arc<dyn TableProvider>),
    key: &str,
    touched: &Arc<dyn TableProvider>,
    fresh: &Arc<dyn TableProvider>,
) -> Result<KeysAndRows> {
    let touched_keys = held_values(touched, "k").await?;
    let touched_set: KeySet = touched_keys.iter().copied().collect();
    // One schema for both (the statement's batches may differ from each other in nullability).
    let schema = Arc::new(Schema::new(
        fresh.schema().fields().iter().map(|f| f.as_ref().clone().with_nullable(true)).collect::<Vec<_>>(),
    ));
    let mut rows = Vec::new();
    for batch in held_rows(previous.1).await? {
        let kept = membership(&batch, key, &touched_set, false)?;
        let batch = match kept.true_count() == batch.num_rows() {
            true => batch,
            false => arrow::compute::filter_record_batch(&batch, &kept)?,
        };
        rows.push(batch);
    }
    rows.extend(held_rows(fresh).await?);
    let rows = rows
        .into_iter()
        .filter(|batch| batch.num_rows() > 0)
        .map(|batch| RecordBatch::try_new(Arc::clone(&schema), batch.columns().to_vec()))
        .collect::<std::result::Result<Vec<_>, _>>()?;
    let rows = crate::merged_past_limit(&schema, rows)?;
    let all_keys = merge_sorted(&held_values(previous.0, "k").await?, &touched_keys);
    let rows: Arc<dyn TableProvider> = Arc::new(datafusion::datasource::MemTable::try_new(schema, vec![rows])?);
    Ok((owned_key_table(all_keys)?.0, rows))
}

/// The union of two sorted lists of distinct keys, sorted.
fn merge_sorted(a: &[i64], b: &[i64]) -> Vec<i64> {
    let mut out = Vec::with_capacity(a.len() + b.len());
    let (mut i, mut j) = (0, 0);
    while i < a.len() && j < b.len() {
        match a[i].cmp(&b[j]) {
            std::cmp::Ordering::Less => {
                out.push(a[i]);
                i += 1;
            }
            std::cmp::Ordering::Greater => {
                out.push(b[j]);
                j += 1;
            }
            std::cmp::Ordering::Equal => {
                out.push(a[i]);
                i += 1;
                j += 1;
            }
        }
    }
    out.extend_from_slice(&a[i..]);
    out.extend_from_slice(&b[j..]);
    out
}

/// The rows of the keys in `keys` (a registered relation of `ctx`), computed by the table's
/// scoped statement in a context of its own, where the star's own history is the live history
/// of those keys only (their stored versions, looked up by key, and the tail's) and every
/// other table is the live one of `ctx`.
pub(super) async fn recompute(
    ctx: &SessionContext,
    inputs: &LiveInputs<'_>,
    star: &ModelTable,
    keys: &str,
    previous_rows: Option<(&str, &str)>,
    held: &std::sync::Mutex<HeldStar>,
) -> Result<Arc<dyn TableProvider>> {
    // One partition: the statement reads the rows of a step's keys, a few thousand, where
    // repartitioning them by key for a second core costs more than it saves (the star
    // tables of a step are recomputed concurrently instead). And one optimizer pass: planning
    // the statement cost more than running it on a step's rows (at SF1, about 9 ms to plan a
    // dimension's statement, 8 ms to run it).
    let mut config = SessionConfig::new().with_target_partitions(1);
    config.options_mut().optimizer.max_passes = 1;
    let scoped = SessionContext::new_with_config_rt(config, Arc::clone(inputs.runtime));
    scoped.register_table("scope_keys", ctx.table_provider(keys).await?)?;
    let own = tail_of(inputs.tails, star.source()).ok_or_else(|| missing_tail(star.source()))?;
    let lookup = |tail: &HistoryTail| lock(held).lookups.get(&tail.spec.history_table()).cloned();
    // A dimension's own stored versions of the keys (`model_previous` below, for the keys its
    // versions already have) are looked up beside its history's.
    let stored_dimension = async {
        if star.surrogate_key().is_none() {
            return Ok(None);
        }
        let index = lock(held).lookups.get(star.name).cloned();
        let stored = match index {
            Some(index) => {
                let touched = relation_keys(ctx, keys).await?;
                let name = format!("{TAIL_SCHEMA}.{}_stored_touched", star.name);
                looked_up(ctx, &index, &touched, &name, star.name).await?
            }
            None => format!("{MODEL_SCHEMA}.{}", star.name),
        };
        Ok::<_, crate::QueryError>(Some(stored))
    };
    let ((mut own_history, _), stored_dimension) = futures::future::try_join(
        scoped_history(ctx, own, lookup(own), keys, &format!("{}_own", star.name), true),
        stored_dimension,
    )
    .await?;
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
    let orders = tail_of(inputs.tails, "orders").filter(|_| star.name == tables::FACT_ORDER_ITEMS);
    let placed = orders.map(|_| "orders");
    let orders_of_items = async {
        let Some(orders) = orders else { return Ok(None) };
        let order_keys = format!("{TAIL_SCHEMA}.{}_order_keys", star.name);
        ctx.register_table(order_keys.as_str(), key_table(&held_values(&own_history, "order_id").await?)?.0)?;
        let name = format!("{}_orders", star.name);
        let (history, _) = scoped_history(ctx, orders, lookup(orders), &order_keys, &name, true).await?;
        Ok::<_, crate::QueryError>(Some((orders.spec.history_table(), history)))
    };
    // The facts read the versions of their own customers or products only: those are looked
    // up in the stored dimension (with this handle's recomputed rows in place of the stored
    // ones of the same keys), not read from the whole dimension.
    // Only the dimension columns the fact statements read (`acme_model::star`): a lookup
    // decodes each page it reads of each column it reads.
    let fact_dimension = fact_dimension(star.name);
    let dimensions = async {
        let mut out = Vec::new();
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
            out.push((dimension, provider));
        }
        Ok::<_, crate::QueryError>(out)
    };
    // (The two lookups depend only on the own history's rows: they run concurrently.)
    let (orders_of_items, dimensions) = futures::future::try_join(orders_of_items, dimensions).await?;
    if let Some((name, history)) = orders_of_items {
        scoped.register_table(name.as_str(), history)?;
    }
    for (dimension, provider) in dimensions {
        scoped.register_table(dimension, provider)?;
    }
    for source in ["customers", "products", "orders", "order_items"] {
        let Some(tail) = tail_of(inputs.tails, source) else { continue };
        if source == star.source() || Some(source) == placed {
            continue;
        }
        let history = tail.spec.history_table();
        scoped.register_table(history.as_str(), ctx.table_provider(history.as_str()).await?)?;
    }
    let mut base = 0;
    if let Some(sk) = star.surrogate_key() {
        // The versions numbered so far (stored, and recomputed for an earlier part of the tail)
        // keep their keys; new ones are numbered after the highest.
        // The stored versions of the touched keys only (`model_previous` is joined with them).
        let stored = stored_dimension.unwrap_or_else(|| format!("{MODEL_SCHEMA}.{}", star.name));
        let numbered = match previous_rows {
            None => stored,
            Some((rows, keys)) => {
                // (The held rows hold every version of their keys, the stored ones included.)
                let columns = column_list(&ctx.table_provider(rows).await?);
                format!("({})", replaced_sql(&stored, star.key, keys, rows, &columns))
            }
        };
        let view = crate::plans::sql(ctx, &format!("SELECT * FROM {numbered} n")).await?.into_view();
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
            Some((rows, _)) => {
                let rows_max = match held_relation(ctx, rows).await {
                    Some(batches) => held_max(&batches, sk)?,
                    None => max(format!("SELECT coalesce(max({sk}), 0) FROM {rows}")).await?,
                };
                stored_max.max(rows_max)
            }
            None => stored_max,
        };
    }
    Ok(hold_in_memory(&scoped, &statement(star, Some("scope_keys"), base)?).await?.0)
}

/// The one dimension a fact table's statement reads (`acme_model::star`), by the business key
/// its rows look it up with, and the dimension columns the statement reads (a lookup decodes
/// each page it reads of each column it reads); `None` for a table that reads no dimension or
/// more than one.
pub(super) fn fact_dimension(star: &str) -> Option<(&'static str, &'static str, &'static [&'static str])> {
    match star {
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
    }
}

/// Register `star` (keyed by its source's key, with no late-arriving keys) as a view that
/// recomputes the rows of the keys the tail touches in each query that reads it.
pub(super) async fn register_lazy(ctx: &SessionContext, inputs: &LiveInputs<'_>, star: &ModelTable) -> Result<()> {
    let tail = tail_of(inputs.tails, star.source()).ok_or_else(|| missing_tail(star.source()))?;
    let keys = format!("{TAIL_SCHEMA}.{}_keys", star.name);
    let keys_view =
        crate::plans::sql(ctx, &format!("SELECT DISTINCT k FROM {} f WHERE k IS NOT NULL", tail.first)).await?;
    ctx.register_table(keys.as_str(), keys_view.into_view())?;
    let scoped = SessionContext::new_with_config_rt(SessionConfig::new(), Arc::clone(inputs.runtime));
    scoped.register_table("scope_keys", ctx.table_provider(keys.as_str()).await?)?;
    // Its keys are every key of the tail: the tail's pieces are read whole, and the stored
    // versions are joined with the keys by the queries that read the table, not looked up
    // here (a lookup would read the stored versions of every key of the tail at every
    // refresh, for a table no report reads).
    let (history, _) = scoped_history(ctx, tail, None, &keys, star.name, false).await?;
    scoped.register_table(tail.spec.history_table().as_str(), history)?;
    let rows = format!("{TAIL_SCHEMA}.{}_rows", star.name);
    ctx.register_table(
        rows.as_str(),
        crate::plans::sql(&scoped, &statement(star, Some("scope_keys"), 0)?).await?.into_view(),
    )?;
    let columns = column_list(&ctx.table_provider(rows.as_str()).await?);
    let view = replaced_sql(&format!("{MODEL_SCHEMA}.{}", star.name), star.key, &keys, &rows, &columns);
    ctx.register_table(star.name, crate::plans::sql(ctx, &view).await?.into_view())?;
    Ok(())
}

/// The live history of `tail`'s source restricted to the keys in `keys` (a relation of `ctx`
/// with a column `k`): their stored versions, looked up by key, with the tail applied (with
/// `scope_tail`, the held tail's pieces of those keys only). Also returns the keys, when they
/// were read.
pub(super) async fn scoped_history(
    ctx: &SessionContext,
    tail: &HistoryTail,
    lookup: Option<StoredLookup>,
    keys: &str,
    lookup_name: &str,
    scope_tail: bool,
) -> Result<(Arc<dyn TableProvider>, Option<Vec<i64>>)> {
    let history = tail.spec.history_table();
    let key = quote(&tail.spec.key);
    let values = match (&lookup, scope_tail) {
        (None, false) => None,
        _ => Some(relation_keys(ctx, keys).await?),
    };
    let stored = match (lookup, &values) {
        (Some(index), Some(values)) => {
            // The stored versions of the keys, read from the pages that hold them (keys above
            // every stored key, a serial key's inserts, are not read at all).
            let name = format!("{TAIL_SCHEMA}.{lookup_name}_lookup");
            let relation = looked_up(ctx, &index, values, &name, &history).await?;
            format!("(SELECT h.* FROM {relation} h)")
        }
        _ => format!("(SELECT h.* FROM {MODEL_SCHEMA}.{history} h JOIN {keys} s ON s.k = h.{key})"),
    };
    // The tail's pieces of the keys only, when held: the whole tail's would make every step
    // carry (and look up the members of) every key changed since the stored model.
    let scoped = match (&values, scope_tail) {
        (Some(values), true) => scoped_tail(ctx, tail, values, lookup_name).await?,
        _ => None,
    };
    let [first, versions] = scoped.unwrap_or_else(|| [tail.first.clone(), tail.versions.clone()]);
    let sql = live::live_history_sql(&tail.spec, &stored, &first, &versions, &tail.attributes, &tail.truncates);
    Ok((crate::plans::sql(ctx, &sql).await?.into_view(), values))
}

/// The rows of `tail`'s held pieces (its first changes and the versions it opens) whose key is
/// among `keys`, registered in `ctx` as `tail.<name>_tail_first` and `tail.<name>_tail_versions`:
/// their names, or `None` when the pieces are not held in memory.
async fn scoped_tail(
    ctx: &SessionContext,
    tail: &HistoryTail,
    keys: &[i64],
    name: &str,
) -> Result<Option<[String; 2]>> {
    let wanted: KeySet = keys.iter().copied().collect();
    let mut names = [String::new(), String::new()];
    for ((relation, column, part), out) in
        [(&tail.first, "k", "first"), (&tail.versions, tail.spec.key.as_str(), "versions")].into_iter().zip(&mut names)
    {
        let Some(batches) = held_relation(ctx, relation).await else { return Ok(None) };
        let schema = ctx.table_provider(relation.as_str()).await?.schema();
        let mut rows = Vec::new();
        for batch in &batches {
            let kept = arrow::compute::filter_record_batch(batch, &membership(batch, column, &wanted, true)?)?;
            if kept.num_rows() > 0 {
                rows.push(kept);
            }
        }
        *out = format!("{TAIL_SCHEMA}.{name}_tail_{part}");
        ctx.register_table(out.as_str(), Arc::new(datafusion::datasource::MemTable::try_new(schema, vec![rows])?))?;
    }
    Ok(Some(names))
}

/// The quoted column names of a relation, comma-separated.
pub(super) fn column_list(provider: &Arc<dyn TableProvider>) -> String {
    provider.schema().fields().iter().map(|f| format!("\"{}\"", f.name())).collect::<Vec<_>>().join(", ")
}

/// SQL of the rows of `base` whose `key` is not among the keys of `keys` (column `k`),
/// followed by the rows of `rows`: `base` with those keys' rows replaced. `columns` (from
/// [`column_list`]) are the columns both give.
pub(super) fn replaced_sql(base: &str, key: &str, keys: &str, rows: &str, columns: &str) -> String {
    let kept = columns.split(", ").map(|c| format!("b.{c}")).collect::<Vec<_>>().join(", ");
    format!(
        "SELECT {kept} FROM {base} b LEFT JOIN {keys} t ON t.k = b.{key} WHERE t.k IS NULL \
         UNION ALL SELECT {columns} FROM {rows}"
    )
}

/// The memory a held relation takes.
pub(super) fn memory(provider: &Arc<dyn TableProvider>) -> u64 {
    provider
        .as_ref()
        .downcast_ref::<datafusion::datasource::MemTable>()
        .map_or(0, |m| m.batches.iter().map(|p| p.try_read().map_or(0, |b| held_bytes(b.as_slice()))).sum())
}

pub(super) fn held_bytes(batches: &[arrow::array::RecordBatch]) -> u64 {
    batches.iter().map(|b| b.get_array_memory_size() as u64).sum()
}

/// The stored rows of `table` (a model table) whose key is among `keys`, read through its
/// key index and held in `ctx` as `name`. Returns the relation to read them from (an empty
/// one when there are none).
pub(super) async fn looked_up(
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
pub(super) async fn scoped_dimension(
    held: &std::sync::Mutex<HeldStar>,
    dimension: &'static str,
    ids: &[i64],
    columns: &[&str],
) -> Result<Option<Arc<dyn TableProvider>>> {
    let Some(star) = MODEL.iter().find(|s| s.name == dimension) else { return Ok(None) };
    let Some(index) = lock(held).lookups.get(dimension).cloned() else { return Ok(None) };
    let stored = looked_up_rows(&index, ids, dimension, Some(columns)).await?;
    let recomputed = lock(held).tables.get(dimension).cloned();
    let wanted: KeySet = ids.iter().copied().collect();
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

#[cfg(test)]
mod tests {
    use super::merge_sorted;

    #[test]
    fn merging_sorted_keys_gives_their_sorted_union() {
        assert_eq!(merge_sorted(&[1, 4, 9], &[2, 4, 10, 11]), vec![1, 2, 4, 9, 10, 11]);
        assert_eq!(merge_sorted(&[], &[3]), vec![3]);
        assert_eq!(merge_sorted(&[-5, 7], &[]), vec![-5, 7]);
    }
}
