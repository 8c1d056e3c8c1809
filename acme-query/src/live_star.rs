//! The star schema at the raw layer's position: each presentation table the reports read is
//! registered under its plain name as the stored table (`model.<table>`) with the rows of the
//! keys the tail touches replaced by those rows recomputed on read, by the model build's own
//! scoped statements (`acme_model::star`) over the live histories. A model build folding the
//! same tail in writes exactly these rows, so the reports read one dimensional model whose
//! freshness is the raw layer's, and a reader never waits for a build.
//!
//! The work per handle follows the tail: the touched keys (from the tail's first change per
//! key, plus the late-arriving keys the tail resolves), the stored versions of those keys, and
//! the tail's versions. The recomputed rows are held in memory with the handle.

use std::collections::HashMap;
use std::sync::Arc;

use acme_model::history::HistorySpec;
use acme_model::live::{self, LIVE_STAR, LiveStar};
use acme_model::{star, tables};
use arrow::array::{Array, AsArray};
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

/// Register every star table of [`LIVE_STAR`] that is stored (`found`) as its live state in
/// `ctx`, and return the memory the recomputed rows hold.
pub(crate) async fn register(
    ctx: &SessionContext,
    runtime: &Arc<RuntimeEnv>,
    found: &HashMap<String, Arc<Schema>>,
    tails: &[HistoryTail],
) -> Result<u64> {
    let tail_of = |source: &str| tail_of(tails, source);
    let stored = |name: &str| found.contains_key(name);
    // A truncation in the tail touches every key: the star tables are then computed whole on
    // read, from the live histories (a truncation is rare, and the next build folds it in).
    let truncated = tails.iter().any(|t| !t.truncates.is_empty());
    let mut held = 0u64;
    for star in LIVE_STAR.iter().filter(|s| stored(s.name)) {
        let needs: &[&str] = match star.name {
            tables::FACT_ORDERS => &["orders", "customers"],
            tables::FACT_ORDER_ITEMS => &["order_items", "products", "orders"],
            _ => &[star.source],
        };
        if needs.iter().any(|s| tail_of(s).is_none()) {
            // A history without its raw table: the stored rows as they are.
            let provider = ctx.table_provider(format!("{MODEL_SCHEMA}.{}", star.name).as_str()).await?;
            ctx.register_table(star.name, provider)?;
            continue;
        }
        if truncated {
            let sql = statement(star, None, 0);
            ctx.register_table(star.name, ctx.sql(&sql).await?.into_view())?;
            continue;
        }
        held += register_one(ctx, runtime, star, tails).await?;
    }
    Ok(held)
}

fn tail_of<'a>(tails: &'a [HistoryTail], source: &str) -> Option<&'a HistoryTail> {
    tails.iter().find(|t| t.spec.table == source)
}

/// The table's statement, scoped to the key table `scope` (the dimensions number new versions
/// after `base`, keeping the stored ones' keys from `model_previous`), or whole.
fn statement(star: &LiveStar, scope: Option<&str>, base: i64) -> String {
    let previous = scope.map(|_| "model_previous");
    match star.name {
        tables::DIM_CUSTOMER => star::dim_customer_sql(previous, base, scope),
        tables::DIM_PRODUCT => star::dim_product_sql(previous, base, scope),
        tables::FACT_ORDER_STATUS => star::fact_order_status_sql(scope, None),
        tables::FACT_ORDERS => star::fact_orders_sql(scope),
        _ => star::fact_order_items_sql(scope),
    }
}

async fn register_one(
    ctx: &SessionContext,
    runtime: &Arc<RuntimeEnv>,
    star: &LiveStar,
    tails: &[HistoryTail],
) -> Result<u64> {
    let tail_of = |source: &str| tail_of(tails, source);
    let stored_name = format!("{MODEL_SCHEMA}.{}", star.name);
    let first =
        |source: &str| tail_of(source).map_or_else(|| "(SELECT 0 AS k WHERE false)".into(), |t| t.first.clone());
    // Items stored before their order: only orders the stored history lacks can have them,
    // and the bounds of those orders' ids let the files' statistics skip the rest.
    let mut new_orders = None;
    if star.name == tables::FACT_ORDER_ITEMS {
        let sql = live::new_orders_sql(&first("orders"), &format!("{MODEL_SCHEMA}.orders_history"));
        let keys = int64_column(ctx, &format!("SELECT min(k), max(k) FROM ({sql}) n")).await?;
        if let [Some(lo), Some(hi)] = keys[..] {
            let table = format!("{TAIL_SCHEMA}.{}_new_orders", star.name);
            let (provider, _) = hold_in_memory(ctx, &sql).await?;
            ctx.register_table(table.as_str(), provider)?;
            new_orders = Some(format!("order_id BETWEEN {lo} AND {hi} AND order_id IN (SELECT k FROM {table})"));
        }
    }
    let keys_sql = live::touched_keys_sql(star, &first, MODEL_SCHEMA, new_orders.as_deref());
    let (keys, key_bytes) =
        hold_in_memory(ctx, &format!("SELECT DISTINCT k FROM ({keys_sql}) t WHERE k IS NOT NULL")).await?;
    // (A held relation takes no memory only when it has no rows.)
    if key_bytes == 0 {
        ctx.register_table(star.name, ctx.table_provider(stored_name.as_str()).await?)?;
        return Ok(0);
    }
    let keys_name = format!("{TAIL_SCHEMA}.{}_keys", star.name);
    ctx.register_table(keys_name.as_str(), Arc::clone(&keys))?;

    // The statement runs in a context of its own, where the star's own history is the live
    // history of the touched keys only (their stored versions, probed by key, and the tail's),
    // and every other table is the live one of `ctx`.
    let scoped = SessionContext::new_with_config_rt(SessionConfig::new(), Arc::clone(runtime));
    scoped.register_table("scope_keys", Arc::clone(&keys))?;
    for source in ["customers", "products", "orders", "order_items"] {
        let Some(tail) = tail_of(source) else { continue };
        let history = tail.spec.history_table();
        let provider: Arc<dyn TableProvider> = if source == star.source {
            let stored = format!(
                "(SELECT h.* FROM {MODEL_SCHEMA}.{history} h JOIN {keys_name} s ON s.k = h.{key})",
                key = tail.spec.key
            );
            let sql = live::live_history_sql(
                &tail.spec,
                &stored,
                &tail.first,
                &tail.versions,
                &tail.attributes,
                &tail.truncates,
            );
            ctx.sql(&sql).await?.into_view()
        } else {
            ctx.table_provider(history.as_str()).await?
        };
        scoped.register_table(history.as_str(), provider)?;
    }
    for dimension in [tables::DIM_CUSTOMER, tables::DIM_PRODUCT] {
        if let Ok(provider) = ctx.table_provider(dimension).await {
            scoped.register_table(dimension, provider)?;
        }
    }
    let mut base = 0;
    if let Some(sk) = match star.name {
        tables::DIM_CUSTOMER => Some("customer_sk"),
        tables::DIM_PRODUCT => Some("product_sk"),
        _ => None,
    } {
        scoped.register_table("model_previous", ctx.table_provider(stored_name.as_str()).await?)?;
        base = int64_column(ctx, &format!("SELECT coalesce(max({sk}), 0) FROM {stored_name}"))
            .await?
            .first()
            .copied()
            .flatten()
            .unwrap_or(0);
    }
    let (rows, bytes) = hold_in_memory(&scoped, &statement(star, Some("scope_keys"), base)).await?;
    let rows_name = format!("{TAIL_SCHEMA}.{}_rows", star.name);
    let columns = rows.schema().fields().iter().map(|f| format!("\"{}\"", f.name())).collect::<Vec<_>>().join(", ");
    ctx.register_table(rows_name.as_str(), rows)?;
    let view = format!(
        "SELECT {stored_columns} FROM {stored_name} s LEFT JOIN {keys_name} t ON t.k = s.{key} WHERE t.k IS NULL \
         UNION ALL SELECT {columns} FROM {rows_name}",
        stored_columns = columns.split(", ").map(|c| format!("s.{c}")).collect::<Vec<_>>().join(", "),
        key = star.key,
    );
    ctx.register_table(star.name, ctx.sql(&view).await?.into_view())?;
    Ok((bytes + key_bytes) as u64)
}

/// The first row of a query's Int64 columns.
async fn int64_column(ctx: &SessionContext, sql: &str) -> Result<Vec<Option<i64>>> {
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
