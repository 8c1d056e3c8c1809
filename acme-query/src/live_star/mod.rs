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

use std::collections::HashMap;
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

mod current;
mod keys;
mod ranking;
mod recompute;

use current::*;
pub(crate) use current::{CUSTOMER_ORDERS, PENDING_ITEMS, keep_stored_pending_items};
use keys::*;
pub(crate) use ranking::{rank_like, top_customers};
use recompute::*;

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
    /// Current orders per delivery date and status (R1's and R2's aggregate), maintained by
    /// difference (see [`delivery_counts`]).
    pub delivery_counts: Option<Arc<DeliveryCounts>>,
}

/// Current orders per (customer id, status) at a handle's raw position, for R4: the counts at
/// the first handle on the stored model (`base`, counted once and shared by every later handle)
/// plus the differences since (`delta`, which follows the changes, not the table).
pub(crate) struct CustomerOrders {
    /// The stored aggregate's table (read from its files where it is read), or, for a stored
    /// model without it, the counts over the live facts (held).
    base: Arc<dyn TableProvider>,
    delta: HashMap<(Option<i64>, Option<String>), i64>,
    /// Per status filter, the base's customers ranked (see [`ranking`]), made on first use and
    /// shared with every handle on the same base.
    ranked: Arc<std::sync::Mutex<RankedBases>>,
}

/// A base's rankings by status filter (keyed by the filter's debug text).
type RankedBases = HashMap<String, (crate::StatusFilter, Arc<ranking::Ranked>)>;

/// Current orders per (delivery date, status) at a handle's raw position, the live state of
/// `agg_orders_by_delivery_date` that R1 and R2 read: the stored aggregate (`base`, held once
/// per stored model and shared by every later handle) plus the differences the tail makes
/// (`delta`, which follows the changes, not the table). A date is kept as its days since the
/// epoch.
pub(crate) struct DeliveryCounts {
    base: Arc<dyn TableProvider>,
    delta: HashMap<(Option<i32>, Option<String>), i64>,
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
    // The first handle on a stored model that keeps R3's and R4's counts
    // (`agg_pending_items_by_product`, `agg_orders_by_customer`) starts from them, as a handle
    // extending one at the model's own position (no tail, no rows held) would: its counts then
    // follow the tail, not the tables.
    let start;
    let first;
    let inputs = match (inputs.previous, truncated) {
        (None, false) => {
            let (pending, customer_orders) = stored_counts(ctx, inputs).await?;
            if pending.is_some() || customer_orders.is_some() {
                start = HeldStar {
                    model_position: inputs.model_position,
                    raw_position: inputs.model_position,
                    pending: pending.map(Arc::new),
                    customer_orders: customer_orders.map(Arc::new),
                    ..HeldStar::default()
                };
                first = LiveInputs { previous: Some(&start), ..*inputs };
                &first
            } else {
                inputs
            }
        }
        _ => inputs,
    };
    let mut held = HeldStar {
        model_position: inputs.model_position,
        raw_position: inputs.raw_position,
        tables: HashMap::new(),
        unknown: HashMap::new(),
        stored_max_sk: inputs.previous.map(|p| p.stored_max_sk.clone()).unwrap_or_default(),
        lookups: inputs.previous.map(|p| p.lookups.clone()).unwrap_or_default(),
        pending: None,
        customer_orders: None,
        delivery_counts: None,
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
    // And the stored facts' lookups that R3's and R4's counts read (items by item and by order,
    // orders by order), here with the others: otherwise the first refresh that touches an order
    // makes them, and the reports wait for it (1.6 s for `fact_order_items` by item at SF10,
    // 649 files). A pipeline's first handle at start (an empty tail, made before the first
    // caught-up handle) and its first handle on each newly stored model (made beside the
    // published handles) then make them off the reports' path.
    if maintains_counts(inputs, truncated) {
        for (table, key) in FACT_LOOKUPS {
            fact_lookup(inputs, &mut held, table, key).await?;
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
    // Each dimension, then the facts that look it up (a chain per dimension, the chains
    // concurrently); then the tables that read no dimension or several.
    let held = std::sync::Mutex::new(held);
    let step = |star: &'static ModelTable| {
        let held = &held;
        async move {
            if !inputs.found.contains_key(star.name) {
                return Ok(0);
            }
            if star.sources.iter().any(|s| tail_of(inputs.tails, s).is_none()) {
                // A history without its raw table: the stored rows as they are.
                let provider = ctx.table_provider(format!("{MODEL_SCHEMA}.{}", star.name).as_str()).await?;
                ctx.register_table(star.name, provider)?;
                return Ok(0);
            }
            if truncated {
                ctx.register_table(star.name, crate::plans::sql(ctx, &statement(star, None, 0)?).await?.into_view())?;
                return Ok(0);
            }
            if star.name == tables::FACT_ORDER_STATUS {
                // No report reads it: its touched rows are computed by the queries that read
                // it, not by every refresh.
                register_lazy(ctx, inputs, star).await?;
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
    };
    let per_key: Vec<&'static ModelTable> = MODEL.iter().filter(|s| s.recomputed_per_key()).collect();
    let dimensions: Vec<&'static ModelTable> =
        per_key.iter().copied().filter(|s| s.surrogate_key().is_some()).collect();
    // The dimension a fact table is recomputed after, when it reads one.
    let after = |fact: &ModelTable| {
        let (dimension, ..) = fact_dimension(fact.name)?;
        dimensions.iter().find(|d| d.name == dimension).map(|d| d.name)
    };
    let chains = dimensions.iter().map(|dimension| async {
        let mut bytes = step(dimension).await?;
        let facts = per_key.iter().filter(|f| f.surrogate_key().is_none() && after(f) == Some(dimension.name));
        bytes += futures::future::try_join_all(facts.map(|f| step(f))).await?.into_iter().sum::<u64>();
        Ok::<_, crate::QueryError>(bytes)
    });
    let mut bytes = futures::future::try_join_all(chains).await?.into_iter().sum::<u64>();
    let others = per_key.iter().filter(|f| f.surrogate_key().is_none() && after(f).is_none());
    bytes += futures::future::try_join_all(others.map(|f| step(f))).await?.into_iter().sum::<u64>();
    let mut held = held.into_inner().unwrap_or_else(std::sync::PoisonError::into_inner);
    if maintains_counts(inputs, truncated) {
        let started = std::time::Instant::now();
        let touched = touched_orders(ctx, inputs, &mut held).await?;
        let (pending, incremental) = pending_items(ctx, inputs, &mut held, touched.as_ref()).await?;
        tracing::debug!(
            incremental,
            products = pending.len(),
            ms = started.elapsed().as_millis() as u64,
            "R3 on the current state maintained"
        );
        if inputs.found.contains_key(tables::AGG_PENDING_ITEMS_BY_PRODUCT) {
            register_pending_aggregate(ctx, &pending)?;
        }
        held.pending = Some(Arc::new(pending));
        let started = std::time::Instant::now();
        let counts = customer_orders(ctx, inputs, &held, touched.as_ref()).await?;
        tracing::debug!(
            changed = counts.delta.len(),
            ms = started.elapsed().as_millis() as u64,
            "orders per customer on the current state maintained"
        );
        if inputs.found.contains_key(tables::AGG_ORDERS_BY_CUSTOMER) {
            let sql = format!(
                "SELECT customer_id, status, CAST(sum(orders) AS BIGINT) AS orders FROM {CUSTOMER_ORDERS} \
                 GROUP BY customer_id, status HAVING sum(orders) <> 0"
            );
            ctx.register_table(tables::AGG_ORDERS_BY_CUSTOMER, crate::plans::sql(ctx, &sql).await?.into_view())?;
        }
        held.customer_orders = Some(Arc::new(counts));
        // R1's and R2's aggregate, where the tail registered its live view.
        if inputs.found.contains_key(tables::AGG_ORDERS_BY_DELIVERY_DATE)
            && ctx.table_exist(tables::AGG_ORDERS_BY_DELIVERY_DATE)?
        {
            let started = std::time::Instant::now();
            let counts = delivery_counts(ctx, inputs, &mut held, touched.as_ref()).await?;
            tracing::debug!(
                changed = counts.delta.len(),
                ms = started.elapsed().as_millis() as u64,
                "orders per delivery date on the current state maintained"
            );
            held.delivery_counts = Some(Arc::new(counts));
        }
    }
    // The stored R3 counts, live: from the counts above, or (when they were not kept) counted
    // over the live facts on read.
    let aggregate = tables::AGG_PENDING_ITEMS_BY_PRODUCT;
    if inputs.found.contains_key(aggregate) && !ctx.table_exist(aggregate)? {
        ctx.register_table(aggregate, crate::plans::sql(ctx, &pending_counts_sql()).await?.into_view())?;
    }
    let aggregate = tables::AGG_ORDERS_BY_CUSTOMER;
    if inputs.found.contains_key(aggregate) && !ctx.table_exist(aggregate)? {
        let sql = format!(
            "SELECT customer_id, status, CAST(count(*) AS BIGINT) AS orders FROM {} WHERE is_current \
             GROUP BY customer_id, status",
            tables::FACT_ORDERS
        );
        ctx.register_table(aggregate, crate::plans::sql(ctx, &sql).await?.into_view())?;
    }
    Ok((bytes, (!truncated).then_some(held)))
}

/// The stored facts' lookups (table, key) that R3's and R4's counts on the current state read.
const FACT_LOOKUPS: [(&str, &str); 3] = [
    (tables::FACT_ORDER_ITEMS, "order_item_id"),
    (tables::FACT_ORDER_ITEMS, "order_id"),
    (tables::FACT_ORDERS, "order_id"),
];

/// Whether a handle keeps R3's and R4's counts on the current state by difference: both fact
/// tables stored, the orders and items followed by the tail, and no truncation in it.
fn maintains_counts(inputs: &LiveInputs<'_>, truncated: bool) -> bool {
    !truncated
        && [tables::FACT_ORDERS, tables::FACT_ORDER_ITEMS].iter().all(|t| inputs.stored.contains_key(*t))
        && ["orders", "order_items"].iter().all(|t| tail_of(inputs.tails, t).is_some())
}

/// R3's counts and R4's orders per customer as the stored model keeps them, where it does
/// (and the facts they follow are stored too).
async fn stored_counts(
    ctx: &SessionContext,
    inputs: &LiveInputs<'_>,
) -> Result<(Option<PendingItems>, Option<CustomerOrders>)> {
    let stored = |t: &str| inputs.stored.contains_key(t);
    if !stored(tables::FACT_ORDERS) || !stored(tables::FACT_ORDER_ITEMS) {
        return Ok((None, None));
    }
    let mut pending = None;
    let aggregate = tables::AGG_PENDING_ITEMS_BY_PRODUCT;
    if stored(aggregate) {
        let sql = format!("SELECT product_id, total_items, counted, items FROM {MODEL_SCHEMA}.{aggregate}");
        pending = Some(collect_counts(ctx, &sql).await?);
    }
    let mut customer_orders = None;
    let aggregate = tables::AGG_ORDERS_BY_CUSTOMER;
    if stored(aggregate) {
        // The stored table (its columns are `customer_id, status, orders`), read from its
        // files where it is read (R4 ranks it once per status filter), not held: it has a row
        // per customer and status (about 110 MB in memory at SF10).
        customer_orders = Some(CustomerOrders {
            base: ctx.table_provider(format!("{MODEL_SCHEMA}.{aggregate}").as_str()).await?,
            delta: HashMap::new(),
            ranked: Arc::default(),
        });
    }
    Ok((pending, customer_orders))
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

fn missing_tail(source: &str) -> crate::QueryError {
    datafusion::error::DataFusionError::Internal(format!("the live star has no raw tail for `{source}`")).into()
}
