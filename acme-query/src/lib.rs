//! acme-query: the warehouse handle and the four logistics reports, in-process with DataFusion.
//!
//! A [`Warehouse`] registers every layer table (raw, histories, star schema) in a DataFusion
//! `SessionContext`, plus `<table>_current` views of the current state. Reports are typed, and
//! each takes an optional `as_of` instant. They are dimensional queries over the star schema:
//! the versioned facts (`fact_orders`, `fact_order_items`) filtered by validity and by the
//! order's status flags, joined to the customer dimension's version in force; R1 and R2 on the
//! current state read the aggregate of current orders.
//!
//! A handle is a consistent snapshot: every table is loaded at the version recorded in the
//! last complete commit round of its writer (`_acme/raw.json`, `_acme/model.json`), so
//! queries never mix tables from before and after a concurrent ingest or model build.
//! [`Warehouse::refresh`] moves a handle to newer data, reading only the new commits.
//!
//! The reports are fresh to the raw layer, not to the last model build: the histories, the
//! aggregate and the star tables are registered as the stored model (`model.<table>`) with the
//! raw changes committed after the model's position applied on read (`acme_model::live`; the
//! star tables recompute the rows of the keys those changes touch with the build's own
//! statements), so a change shows in every report as soon as the change stream has committed
//! it, exactly as a model build would have folded it in.
//!
//! ```no_run
//! # async fn demo() -> Result<(), acme_query::QueryError> {
//! use acme_query::{StatusFilter, Warehouse};
//! let warehouse = Warehouse::open("/tmp/acme-warehouse").await?;
//! for row in warehouse.open_orders(StatusFilter::Open, None).await? {
//!     println!("{:?} {:?} {}", row.delivery_date, row.status, row.quantity);
//! }
//! let df = warehouse.sql("SELECT count(*) FROM orders_current").await?;
//! df.show().await?;
//! # Ok(()) }
//! ```

/// The DataFusion version acme runs on, for custom use of [`Warehouse::context`].
pub use datafusion;

use std::collections::HashMap;
use std::sync::Arc;

use acme_core::storage::manifests;
use acme_core::{Layer, Storage};
use arrow::array::{Array, AsArray, RecordBatch};
use arrow::compute::cast;
use arrow::datatypes::{DataType, Date32Type, Field, Int64Type, Schema};
use chrono::{DateTime, NaiveDate, Utc};
use datafusion::execution::runtime_env::RuntimeEnv;
use datafusion::prelude::{DataFrame, SessionConfig, SessionContext};
use serde::Serialize;
use tracing::Instrument;

use acme_core::storage::Manifest;
use acme_model::Catalog;
use acme_model::history::{history_attributes, state_predicate};
use acme_model::live;
use acme_model::tables;

mod builder;
mod live_star;
pub mod sql;
mod tail;

pub use builder::{Setup, WarehouseBuilder};
use sql::*;
use tail::*;
pub use tail::{MAX_MATERIALIZED_TAIL, MODEL_SCHEMA, TAIL_SCHEMA, Tail};

/// Result alias with [`QueryError`] as the default error type.
pub type Result<T, E = QueryError> = std::result::Result<T, E>;

/// What can go wrong when opening a warehouse or running a report.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum QueryError {
    /// A report parameter is invalid.
    #[error("invalid parameter `{name}`: {message}")]
    InvalidParameter {
        /// The parameter.
        name: &'static str,
        /// What is wrong and what is accepted.
        message: String,
    },
    /// The requested instant precedes the kept history.
    #[error("as_of {as_of} is before the history starts ({start}); ask for an instant at or after it")]
    BeforeHistory {
        /// The instant asked for.
        as_of: DateTime<Utc>,
        /// The first instant the history covers.
        start: DateTime<Utc>,
    },
    /// The warehouse has no model yet.
    #[error("the warehouse at {url} has no `{table}` table: run the pipeline (`sync`) to build it")]
    MissingTable {
        /// Storage URL.
        url: String,
        /// The missing table.
        table: String,
    },
    /// Storage failed.
    #[error(transparent)]
    Core(#[from] acme_core::Error),
    /// The query engine failed.
    #[error("query failed")]
    DataFusion(#[from] Box<datafusion::error::DataFusionError>),
}

impl From<datafusion::error::DataFusionError> for QueryError {
    fn from(e: datafusion::error::DataFusionError) -> Self {
        QueryError::DataFusion(Box::new(e))
    }
}

impl From<arrow::error::ArrowError> for QueryError {
    fn from(e: arrow::error::ArrowError) -> Self {
        QueryError::DataFusion(Box::new(e.into()))
    }
}

/// Which orders a report counts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum StatusFilter {
    /// Every status except `COMPLETED`.
    Open,
    /// Status `PENDING`.
    Pending,
    /// Exactly this status.
    Status(String),
}

/// Statuses the source uses.
pub const STATUSES: [&str; 4] = ["PENDING", "PROCESSING", "REPROCESSING", "COMPLETED"];

impl StatusFilter {
    /// Parse `open`, `pending` or one status name (case-insensitive).
    pub fn parse(value: &str) -> Result<Self> {
        let upper = value.trim().to_ascii_uppercase();
        match upper.as_str() {
            "OPEN" => Ok(StatusFilter::Open),
            "PENDING" => Ok(StatusFilter::Pending),
            s if STATUSES.contains(&s) => Ok(StatusFilter::Status(s.to_string())),
            _ => Err(QueryError::InvalidParameter {
                name: "status",
                message: format!("unknown status `{value}`; use open, pending, processing, reprocessing or completed"),
            }),
        }
    }

    fn predicate(&self) -> String {
        match self {
            StatusFilter::Open => "status <> 'COMPLETED'".to_string(),
            StatusFilter::Pending => "status = 'PENDING'".to_string(),
            StatusFilter::Status(s) => format!("status = '{}'", s.replace('\'', "''")),
        }
    }
}

/// One of the four reports, for [`Warehouse::report_batches`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Report {
    /// R1: orders matching the filter per delivery date and status
    /// (`delivery_date`, `status`, `quantity`).
    OpenOrders(StatusFilter),
    /// R2: the delivery dates with the most open orders (`delivery_date`, `quantity`).
    TopDeliveryDates {
        /// How many dates (1..=10000).
        limit: usize,
    },
    /// R3: item quantities of open orders per product (`product_id`, `total_items`), largest
    /// first, then by product id.
    PendingItemsByProduct,
    /// R4: customers dense-ranked by orders matching the filter
    /// (`customer_id`, `customer_name`, `quantity`, `ranking`).
    TopCustomers {
        /// Highest rank returned (ties all returned).
        limit: usize,
        /// Which orders count.
        filter: StatusFilter,
    },
}

impl Report {
    /// The report's short name: `open_orders`, `top_delivery_dates`, `pending_items_by_product`
    /// or `top_customers` (as in logs and spans).
    pub fn name(&self) -> &'static str {
        match self {
            Report::OpenOrders(_) => "open_orders",
            Report::TopDeliveryDates { .. } => "top_delivery_dates",
            Report::PendingItemsByProduct => "pending_items_by_product",
            Report::TopCustomers { .. } => "top_customers",
        }
    }
}

/// R1 row: open orders per delivery date and status.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct OpenOrders {
    /// Delivery date.
    pub delivery_date: Option<NaiveDate>,
    /// Status.
    pub status: Option<String>,
    /// Number of orders.
    pub quantity: i64,
}

/// R2 row: a delivery date and its open orders.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DeliveryDateLoad {
    /// Delivery date.
    pub delivery_date: Option<NaiveDate>,
    /// Number of open orders.
    pub quantity: i64,
}

/// R3 row: items of open orders per product.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ProductItems {
    /// Product.
    pub product_id: Option<i64>,
    /// Sum of item quantities.
    pub total_items: i64,
}

/// R4 row: a customer ranked by its orders.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CustomerRank {
    /// Customer.
    pub customer_id: Option<i64>,
    /// Name (null when the customer is not known, e.g. not replicated yet).
    pub customer_name: Option<String>,
    /// Number of orders.
    pub quantity: i64,
    /// Dense rank by quantity (1 = most).
    pub ranking: i64,
}

/// Largest build side, in bytes, of a join that is broadcast rather than repartitioned.
pub const BROADCAST_JOIN_BYTES: usize = 128 * 1024 * 1024;
/// Largest build side, in rows, of a join that is broadcast rather than repartitioned.
pub const BROADCAST_JOIN_ROWS: usize = 8 * 1024 * 1024;

/// A warehouse opened for queries.
pub struct Warehouse {
    ctx: SessionContext,
    url: String,
    history_start: Option<i64>,
    /// The first model table that does not exist yet, if any.
    missing: Option<String>,
    /// The model has the per-(delivery_date, status) aggregate of current orders.
    has_aggregate: bool,
    /// The pinned tables, for diagnosing unreadable files and for [`Warehouse::refresh`].
    tables: Vec<acme_core::LayerTable>,
    storage: Storage,
    /// The manifests the tables are pinned to.
    manifests: (Option<acme_core::storage::Manifest>, Option<acme_core::storage::Manifest>),
    /// What the handles [`Warehouse::refreshed`] makes share with this one.
    shared: Shared,
    /// The tail held in memory, which the handles refreshed from this one extend.
    held: Option<Arc<HeldTail>>,
    /// The star rows recomputed for the tail, which the handles refreshed from this one extend.
    star: Option<Arc<live_star::HeldStar>>,
    /// The tail's size (`None` without a model).
    tail: Option<Tail>,
    /// Set once R3 on the current state is kept in `model.`[`live_star::PENDING_ITEMS`]: a
    /// handle with no tail counts it on its first R3 query and answers later ones from the
    /// counts (a handle with a tail keeps it in its star rows instead).
    kept_pending: Arc<tokio::sync::OnceCell<()>>,
    /// What acme registered in `ctx` (the rest is the caller's, carried over on refresh).
    registered: Arc<builder::Registered>,
}

/// What a handle being loaded takes over from the handle it refreshes.
#[derive(Default)]
struct Previous<'a> {
    /// Its tables (each reads only the commits after the version it holds).
    tables: &'a [acme_core::LayerTable],
    /// The history's first instant, when the stored model did not move.
    known_start: Option<i64>,
    /// Its tail held in memory.
    tail: Option<Arc<HeldTail>>,
    /// Its star rows recomputed for the tail.
    star: Option<Arc<live_star::HeldStar>>,
    /// Its context and what acme registered in it: the caller's tables and functions carry over.
    context: Option<(&'a SessionContext, &'a builder::Registered)>,
}

/// What a handle passes on to the handles [`Warehouse::refreshed`] makes.
#[derive(Clone)]
struct Shared {
    /// The query runtime: its caches of Parquet footers and per-file statistics stay warm
    /// across refreshes (data files never change).
    runtime: Arc<RuntimeEnv>,
    /// The largest tail held in memory (see [`MAX_MATERIALIZED_TAIL`]).
    max_tail_in_memory: u64,
    /// The session settings of every handle.
    session: SessionConfig,
    /// The caller's setup, run on every handle's context.
    setup: Vec<Setup>,
}

impl std::fmt::Debug for Warehouse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Warehouse").field("url", &self.url).finish()
    }
}

impl Warehouse {
    /// Open the warehouse at `url` (a path, `file://` or `s3://`).
    pub async fn open(url: &str) -> Result<Self> {
        Self::builder(url).open().await
    }

    /// Open with object-store options (S3 endpoint, region, ...).
    pub async fn open_with_options(url: &str, options: HashMap<String, String>) -> Result<Self> {
        Self::builder(url).storage_options(options).open().await
    }

    /// Open with object-store options, holding the tail (the raw changes after the stored
    /// model's position) in memory only up to `max_changes` changes instead of
    /// [`MAX_MATERIALIZED_TAIL`] (see [`WarehouseBuilder::tail_limit`]).
    pub async fn open_with_tail_limit(url: &str, options: HashMap<String, String>, max_changes: u64) -> Result<Self> {
        Self::builder(url).storage_options(options).tail_limit(max_changes).open().await
    }

    /// Open the warehouse at `url` with the caller's settings: object-store options or an
    /// object store, the DataFusion session and runtime (a memory limit for queries), the
    /// tail held in memory, and setup run on every handle (UDFs, tables).
    ///
    /// ```no_run
    /// # async fn demo() -> Result<(), acme_query::QueryError> {
    /// use acme_query::Warehouse;
    /// use acme_query::datafusion::prelude::SessionConfig;
    /// let warehouse = Warehouse::builder("/tmp/acme-warehouse")
    ///     .session_config(Warehouse::default_session_config().with_target_partitions(4))
    ///     .memory_limit(512 << 20)
    ///     .open()
    ///     .await?;
    /// # let _ = SessionConfig::new();
    /// # Ok(()) }
    /// ```
    pub fn builder(url: &str) -> WarehouseBuilder {
        WarehouseBuilder::new(url)
    }

    /// acme's session settings: the information schema, and joins whose smaller side (for
    /// example the open orders, joined to their items in R3) fits in
    /// [`BROADCAST_JOIN_BYTES`] and [`BROADCAST_JOIN_ROWS`] build one shared hash table instead
    /// of repartitioning both sides by key (about 1.4x faster for R3 at SF1 on 2 cores).
    pub fn default_session_config() -> SessionConfig {
        let mut config = SessionConfig::new().with_information_schema(true);
        let optimizer = &mut config.options_mut().optimizer;
        optimizer.hash_join_single_partition_threshold = BROADCAST_JOIN_BYTES;
        optimizer.hash_join_single_partition_threshold_rows = BROADCAST_JOIN_ROWS;
        config
    }

    pub(crate) async fn open_storage(storage: Storage, url: &str, shared: Shared) -> Result<Self> {
        let raw_manifest = storage.get_manifest(manifests::RAW).await?;
        let model_manifest = storage.get_manifest(manifests::MODEL).await?;
        Self::load(storage, url, (raw_manifest, model_manifest), Previous::default(), shared).await
    }

    /// Move this handle to the warehouse's latest complete commit rounds, if the writers
    /// recorded newer ones since it was opened (or last refreshed): returns whether it moved.
    /// Each table reads only the commits after the version it holds (a new handle replays
    /// every table's log from its last checkpoint). Like a new handle, the refreshed one is a consistent snapshot; queries
    /// already running keep the tables they started with.
    pub async fn refresh(&mut self) -> Result<bool> {
        match self.refreshed().await? {
            Some(newer) => {
                *self = newer;
                Ok(true)
            }
            None => Ok(false),
        }
    }

    /// A new handle at the warehouse's latest complete commit rounds, when the writers recorded
    /// newer ones than this handle's (`None` otherwise), reading only the commits since this
    /// handle's versions. This handle is left as it is, so readers holding it (for example
    /// behind an `Arc`) are not disturbed.
    pub async fn refreshed(&self) -> Result<Option<Warehouse>> {
        let raw_manifest = self.storage.get_manifest(manifests::RAW).await?;
        let model_manifest = self.storage.get_manifest(manifests::MODEL).await?;
        // Without manifests, tables are read at their latest versions: always reload.
        let pinned = raw_manifest.is_some() || model_manifest.is_some();
        if pinned && (&raw_manifest, &model_manifest) == (&self.manifests.0, &self.manifests.1) {
            return Ok(None);
        }
        // The first instant of the history only moves with the stored model.
        let known_start = self.history_start.filter(|_| model_manifest.is_some() && model_manifest == self.manifests.1);
        let previous = Previous {
            tables: &self.tables,
            known_start,
            tail: self.held.clone(),
            star: self.star.clone(),
            context: Some((&self.ctx, &self.registered)),
        };
        let loaded =
            Self::load(self.storage.clone(), &self.url, (raw_manifest, model_manifest), previous, self.shared.clone());
        Ok(Some(loaded.await?))
    }

    /// Register every table pinned to the manifests, reusing the handles in `loaded`.
    async fn load(
        storage: Storage,
        url: &str,
        (raw_manifest, model_manifest): (Option<Manifest>, Option<Manifest>),
        previous: Previous<'_>,
        shared: Shared,
    ) -> Result<Self> {
        let started = std::time::Instant::now();
        let ctx = SessionContext::new_with_config_rt(shared.session.clone(), Arc::clone(&shared.runtime));
        storage.register_object_store(&ctx);
        // Pin every table to the versions of the last complete commit round of its writer, so
        // a query never mixes tables from before and after a concurrent commit.
        // Every table is loaded concurrently: opening is a log replay per table.
        let mut wanted: Vec<(Layer, String, String, Option<&acme_core::storage::Manifest>)> = Vec::new();
        for spec in Catalog::acme().history_specs() {
            wanted.push((Layer::Raw, spec.table.clone(), format!("raw_{}", spec.table), raw_manifest.as_ref()));
        }
        for table in Catalog::acme().tables() {
            wanted.push((table.layer, table.name.to_string(), table.name.to_string(), model_manifest.as_ref()));
        }
        let loaded = futures::future::try_join_all(wanted.iter().map(|(layer, name, registered, manifest)| {
            let (storage, runtime) = (&storage, &shared.runtime);
            async move {
                let previous = previous.tables.iter().find(|t| t.name() == format!("{}/{name}", layer.dir()));
                match storage.reopen_pinned(*layer, name, *manifest, previous).await? {
                    Some(table) => {
                        let provider = table.cached_provider(runtime)?;
                        Ok::<_, QueryError>(Some((*layer, registered.clone(), provider, table)))
                    }
                    None => Ok(None),
                }
            }
        }))
        .await?;
        // The stored model tables are also registered as `model.<table>`: the state at the
        // model's position. Under their plain names, the histories and the aggregate are that
        // state with the raw changes after it (the tail) applied on read (`acme_model::live`).
        let catalog = ctx.catalog(&ctx.state().config().options().catalog.default_catalog.clone());
        if let Some(catalog) = catalog {
            catalog.register_schema(MODEL_SCHEMA, Arc::new(datafusion::catalog::MemorySchemaProvider::new()))?;
        }
        let tail_after = live_tail_position(raw_manifest.as_ref(), model_manifest.as_ref());
        let mut found = HashMap::new();
        let mut tables = Vec::new();
        for (layer, registered, provider, table) in loaded.into_iter().flatten() {
            if layer == Layer::Raw {
                ctx.register_table(registered.as_str(), provider)?;
            } else {
                ctx.register_table(format!("{MODEL_SCHEMA}.{registered}").as_str(), Arc::clone(&provider))?;
                // Every model table is kept live by the tail: histories and the aggregate in
                // `tail`, the tables recomputed per key in `live_star`.
                if tail_after.is_none() {
                    ctx.register_table(registered.as_str(), provider)?;
                }
            }
            found.insert(registered, table.schema()?);
            tables.push(table);
        }
        let opened = started.elapsed();
        let mut held = None;
        let mut held_star = None;
        let mut tail =
            model_manifest.as_ref().map(|_| Tail { changes: 0, model_rows: model_rows(&tables), held_bytes: 0 });
        if let (Some(position), Some(tail)) = (tail_after, tail.as_mut()) {
            let files = raw_tail_files(&tables, position)?;
            tail.changes = count_tail(&ctx, &files, position).await?;
            let materialize = tail.changes <= shared.max_tail_in_memory;
            register_tail_files(&ctx, &files)?;
            let raw_position = raw_manifest.as_ref().map(|m| m.position);
            // The previous handle's tail, when it starts at the same model position: only the
            // raw changes committed since that handle are computed (per table, and not at all
            // for a table with none).
            let reusable = previous
                .tail
                .as_deref()
                .filter(|t| materialize && t.model_position == position && Some(t.raw_position) <= raw_position);
            let tails;
            (held, tails) =
                register_live_views(&ctx, &found, &files, position, raw_position, materialize, reusable).await?;
            let stored: HashMap<String, &acme_core::LayerTable> = tables
                .iter()
                .filter(|t| !t.name().starts_with(Layer::Raw.dir()))
                .filter_map(|t| Some((t.name().rsplit('/').next()?.to_string(), t)))
                .collect();
            let inputs = live_star::LiveInputs {
                runtime: &shared.runtime,
                found: &found,
                stored: &stored,
                tails: &tails,
                raw_files: &files,
                raw_position: raw_position.unwrap_or(i64::MAX),
                model_position: position,
                previous: previous.star.as_deref().filter(|s| {
                    raw_position.is_some() && s.model_position == position && Some(s.raw_position) <= raw_position
                }),
            };
            let (star_bytes, star) = live_star::register(&ctx, &inputs).await?;
            held_star = star.map(Arc::new);
            tail.held_bytes =
                star_bytes + held.as_ref().map_or(0, |h| h.tables.values().map(|p| p.bytes as u64).sum::<u64>());
            tracing::debug!(
                tail = tail.changes,
                held_in_memory = materialize,
                held_bytes = tail.held_bytes,
                incremental = reusable.is_some(),
                open_ms = opened.as_millis() as u64,
                tail_ms = (started.elapsed() - opened).as_millis() as u64,
                "warehouse handle loaded with a raw tail"
            );
        }
        // Without a model (only the raw layer so far) the handle still answers SQL over the raw
        // tables; the reports say which table is missing.
        let mut missing = None;
        for spec in Catalog::acme().history_specs() {
            let history = spec.history_table();
            if !found.contains_key(&history) {
                missing.get_or_insert_with(|| format!("intermediate/{history}"));
                continue;
            }
            let view = ctx.sql(&format!("SELECT * FROM {history} WHERE {}", state_predicate(None))).await?;
            ctx.register_table(format!("{}_current", spec.table).as_str(), view.into_view())?;
        }
        // The reports read the star schema.
        for name in [tables::FACT_ORDERS, tables::FACT_ORDER_ITEMS, tables::DIM_CUSTOMER] {
            if !found.contains_key(name) {
                missing.get_or_insert_with(|| format!("{}/{name}", Layer::Presentation.dir()));
            }
        }
        let start = if missing.is_some() {
            None
        } else if previous.known_start.is_some() {
            previous.known_start
        } else {
            // The tail only adds versions after the stored ones: the stored history's first
            // instant is the live one's, unless it is empty.
            match first_instant(&ctx).await {
                Ok(batches) => batches,
                Err(error) => {
                    // Name the broken file, if that is what failed.
                    for table in &tables {
                        table.check_files(&ctx).await?;
                    }
                    return Err(error.into());
                }
            }
        };
        // Then the caller's: its setup, and what it registered on the previous handle.
        let registered = Arc::new(builder::Registered::of(&ctx));
        for setup in &shared.setup {
            setup(&ctx)?;
        }
        if let Some((previous_ctx, previous_registered)) = previous.context {
            previous_registered.carry_over(previous_ctx, &ctx).await?;
        }
        Ok(Self {
            ctx,
            registered,
            url: url.to_string(),
            history_start: start,
            has_aggregate: found.contains_key(tables::AGG_ORDERS_BY_DELIVERY_DATE),
            tables,
            missing,
            storage,
            manifests: (raw_manifest, model_manifest),
            shared,
            held: held.map(Arc::new),
            star: held_star,
            tail,
            kept_pending: Default::default(),
        })
    }

    /// The source position (commit LSN) the handle answers at: the raw layer's last complete
    /// commit round. The histories, the `_current` views and the reports include every change up
    /// to it (the raw changes the stored model does not cover yet are applied on read).
    pub fn raw_position(&self) -> Option<i64> {
        self.manifests.0.as_ref().map(|m| m.position)
    }

    /// The source position (commit LSN) the stored model covers, when the model build recorded
    /// one: every table of the `model` schema (`model.<table>`) is at exactly this position;
    /// the histories, the aggregate and the star tables under their plain names are at
    /// [`Warehouse::raw_position`].
    pub fn model_position(&self) -> Option<i64> {
        self.manifests.1.as_ref().map(|m| m.position)
    }

    /// How far the stored model trails this handle (counted when the handle was loaded): the
    /// raw changes after the model's position, which every report applies on read, against the
    /// rows the stored histories hold. A maintenance policy folds the tail into the stored
    /// model when it grows past a fraction of the model (see
    /// `acme::PipelineBuilder::fold_ratio`). `None` without a model.
    pub fn tail(&self) -> Option<Tail> {
        self.tail
    }

    /// Read every data file of the pinned tables and fail with
    /// [`acme_core::Error::DataFile`] naming the first that cannot be read (missing, truncated
    /// or corrupt). Query engines report such files without naming them: the reports call this
    /// when a query fails, and users of [`Warehouse::sql`] can too. Reads the whole warehouse.
    pub async fn check_files(&self) -> Result<()> {
        for table in &self.tables {
            table.check_files(&self.ctx).await?;
        }
        Ok(())
    }

    /// Per pinned table: its layer, and the data files this handle reads and their bytes
    /// (the stored files; rows the handle holds in memory are not counted).
    pub fn data_file_totals(&self) -> Vec<(Layer, u64, u64)> {
        self.tables
            .iter()
            .filter_map(|t| Some((t.layer()?, t.file_totals().ok()?)))
            .map(|(layer, (files, bytes))| (layer, files, bytes))
            .collect()
    }

    /// The DataFusion context, for custom use.
    pub fn context(&self) -> &SessionContext {
        &self.ctx
    }

    /// Run ad-hoc SQL over the registered tables.
    pub async fn sql(&self, sql: &str) -> Result<DataFrame> {
        let span = tracing::debug_span!("query", report = "sql", position = self.raw_position());
        Ok(self.ctx.sql(sql).instrument(span).await?)
    }

    /// The first instant the history covers.
    pub fn history_start(&self) -> Option<DateTime<Utc>> {
        self.history_start.and_then(DateTime::from_timestamp_micros)
    }

    /// The aggregate of current orders per (delivery_date, status), for the current state when
    /// the model has one. As-of reports scan the history instead: correcting the aggregate by
    /// the orders changed since the instant measured 3-5x slower than the scan at SF1.
    fn aggregate(&self, as_of: Option<DateTime<Utc>>) -> Result<Option<&'static str>> {
        if let Some(missing) = &self.missing {
            return Err(QueryError::MissingTable { url: self.url.clone(), table: missing.clone() });
        }
        Ok((as_of.is_none() && self.has_aggregate).then_some(tables::AGG_ORDERS_BY_DELIVERY_DATE))
    }

    /// The predicate selecting the rows of a versioned star table (alias `alias`) in force now
    /// or at an instant.
    fn valid(&self, alias: &str, as_of: Option<DateTime<Utc>>) -> Result<String> {
        if let Some(missing) = &self.missing {
            return Err(QueryError::MissingTable { url: self.url.clone(), table: missing.clone() });
        }
        Ok(match as_of {
            None => format!("{alias}.is_current"),
            Some(t) => {
                let micros = t.timestamp_micros();
                if let Some(start) = self.history_start
                    && micros < start
                {
                    return Err(QueryError::BeforeHistory {
                        as_of: t,
                        start: DateTime::from_timestamp_micros(start).unwrap_or_default(),
                    });
                }
                let t = acme_model::history::utc_micros(micros);
                format!("{alias}.valid_from <= {t} AND ({alias}.valid_to IS NULL OR {alias}.valid_to > {t})")
            }
        })
    }

    /// One report as Arrow record batches, with the seed's column names (see [`Report`]).
    pub async fn report_batches(&self, report: &Report, as_of: Option<DateTime<Utc>>) -> Result<Vec<RecordBatch>> {
        let span = tracing::debug_span!(
            "query",
            report = report.name(),
            as_of = as_of.map(|t| tracing::field::display(t.to_rfc3339())),
            position = self.raw_position(),
        );
        if matches!(report, Report::PendingItemsByProduct)
            && as_of.is_none()
            && self.missing.is_none()
            && self.star.as_ref().is_none_or(|s| s.pending.is_none())
            && self.tail.is_some_and(|t| t.changes == 0)
        {
            // No tail: the stored facts are the current state; count R3 once for this handle.
            let kept = self
                .kept_pending
                .get_or_try_init(|| live_star::keep_stored_pending_items(&self.ctx))
                .instrument(span.clone())
                .await;
            if let Err(error) = kept {
                // Name the broken file, if that is what failed (a later query counts again).
                self.check_files().await?;
                return Err(error);
            }
        }
        let (sql, fields) = self.report_plan(report, as_of)?;
        self.batches(&sql, fields).instrument(span).await
    }

    /// The SQL this handle runs for `report` (now, or as of an instant), for example to see
    /// its plan with `EXPLAIN ANALYZE` through [`Warehouse::sql`].
    pub fn report_sql(&self, report: &Report, as_of: Option<DateTime<Utc>>) -> Result<String> {
        Ok(self.report_plan(report, as_of)?.0)
    }

    /// A report's SQL and the columns it returns.
    fn report_plan(
        &self,
        report: &Report,
        as_of: Option<DateTime<Utc>>,
    ) -> Result<(String, &'static [(&'static str, DataType)])> {
        use DataType::{Date32, Int64, Utf8};
        Ok(match report {
            Report::OpenOrders(filter) => (
                match self.aggregate(as_of)? {
                    Some(agg) => open_orders_from_aggregate_sql(agg, filter),
                    None => star_open_orders_sql(&self.valid("o", as_of)?, filter),
                },
                &[("delivery_date", Date32), ("status", Utf8), ("quantity", Int64)],
            ),
            Report::TopDeliveryDates { limit } => {
                check_limit(*limit)?;
                (
                    match self.aggregate(as_of)? {
                        Some(agg) => top_delivery_dates_from_aggregate_sql(agg, *limit),
                        None => star_top_delivery_dates_sql(&self.valid("o", as_of)?, *limit),
                    },
                    &[("delivery_date", Date32), ("quantity", Int64)],
                )
            }
            Report::PendingItemsByProduct => (
                match (as_of, self.star.as_ref().is_some_and(|s| s.pending.is_some())) {
                    // Kept by difference as the handles refresh (live_star::pending_items).
                    (None, true) => {
                        self.valid("i", None)?;
                        format!(
                            "SELECT product_id, total_items FROM {} ORDER BY total_items DESC, product_id ASC NULLS LAST",
                            live_star::PENDING_ITEMS
                        )
                    }
                    // Counted once for a handle with no tail (see `report_batches`).
                    (None, false) if self.kept_pending.initialized() => {
                        self.valid("i", None)?;
                        format!(
                            "SELECT product_id, total_items FROM {MODEL_SCHEMA}.{} \
                             ORDER BY total_items DESC, product_id ASC NULLS LAST",
                            live_star::PENDING_ITEMS
                        )
                    }
                    _ => star_pending_items_sql(&self.valid("i", as_of)?, &self.valid("o", as_of)?),
                },
                &[("product_id", Int64), ("total_items", Int64)],
            ),
            Report::TopCustomers { limit, filter } => {
                check_limit(*limit)?;
                (
                    match (as_of, self.star.as_ref().is_some_and(|s| s.customer_orders.is_some())) {
                        // Kept by difference as the handles refresh (live_star::customer_orders).
                        (None, true) => {
                            let counts = format!(
                                "SELECT o.customer_id, CAST(sum(o.orders) AS BIGINT) AS quantity FROM {} o \
                                 WHERE {} GROUP BY o.customer_id HAVING sum(o.orders) > 0",
                                live_star::CUSTOMER_ORDERS,
                                filter.star_predicate()
                            );
                            ranked_customers_sql(&counts, &self.valid("c", None)?, *limit)
                        }
                        _ => star_top_customers_sql(&self.valid("o", as_of)?, &self.valid("c", as_of)?, filter, *limit),
                    },
                    &[("customer_id", Int64), ("customer_name", Utf8), ("quantity", Int64), ("ranking", Int64)],
                )
            }
        })
    }

    /// Run `sql` and cast its columns to `fields` (the engine may return view types).
    async fn batches(&self, sql: &str, fields: &[(&str, DataType)]) -> Result<Vec<RecordBatch>> {
        let schema = Arc::new(Schema::new(
            fields.iter().map(|(name, t)| Field::new(*name, t.clone(), true)).collect::<Vec<Field>>(),
        ));
        let batches = match self.ctx.sql(sql).await?.collect().await {
            Ok(batches) => batches,
            Err(error) => {
                // Name the broken file, if that is what failed.
                self.check_files().await?;
                return Err(error.into());
            }
        };
        let mut out = Vec::with_capacity(batches.len());
        for b in batches {
            let columns = b
                .columns()
                .iter()
                .zip(fields)
                .map(|(c, (_, t))| if c.data_type() == t { Ok(c.clone()) } else { cast(c, t) })
                .collect::<std::result::Result<Vec<_>, _>>()?;
            out.push(RecordBatch::try_new(Arc::clone(&schema), columns)?);
        }
        Ok(out)
    }

    /// R1: orders matching `filter` per delivery date and status.
    pub async fn open_orders(&self, filter: StatusFilter, as_of: Option<DateTime<Utc>>) -> Result<Vec<OpenOrders>> {
        let mut out = Vec::new();
        for b in self.report_batches(&Report::OpenOrders(filter), as_of).await? {
            let dates = b.column(0).as_primitive::<Date32Type>();
            let statuses = b.column(1).as_string::<i32>();
            let counts = b.column(2).as_primitive::<Int64Type>();
            for i in 0..b.num_rows() {
                out.push(OpenOrders {
                    delivery_date: date(dates, i),
                    status: (!statuses.is_null(i)).then(|| statuses.value(i).to_string()),
                    quantity: counts.value(i),
                });
            }
        }
        Ok(out)
    }

    /// R2: the `limit` delivery dates with the most open orders (ties broken by date).
    pub async fn top_delivery_dates(
        &self,
        limit: usize,
        as_of: Option<DateTime<Utc>>,
    ) -> Result<Vec<DeliveryDateLoad>> {
        let mut out = Vec::new();
        for b in self.report_batches(&Report::TopDeliveryDates { limit }, as_of).await? {
            let dates = b.column(0).as_primitive::<Date32Type>();
            let counts = b.column(1).as_primitive::<Int64Type>();
            for i in 0..b.num_rows() {
                out.push(DeliveryDateLoad { delivery_date: date(dates, i), quantity: counts.value(i) });
            }
        }
        Ok(out)
    }

    /// R3: sum of item quantities of open orders, per product, largest first (then by product id).
    pub async fn pending_items_by_product(&self, as_of: Option<DateTime<Utc>>) -> Result<Vec<ProductItems>> {
        let mut out = Vec::new();
        for b in self.report_batches(&Report::PendingItemsByProduct, as_of).await? {
            let products = b.column(0).as_primitive::<Int64Type>();
            let totals = b.column(1).as_primitive::<Int64Type>();
            for i in 0..b.num_rows() {
                out.push(ProductItems {
                    product_id: (!products.is_null(i)).then(|| products.value(i)),
                    total_items: totals.value(i),
                });
            }
        }
        Ok(out)
    }

    /// R4: customers by number of orders matching `filter` (default use: pending), dense-ranked,
    /// every customer whose rank is at most `limit` (ties all returned), then by customer id.
    pub async fn top_customers(
        &self,
        limit: usize,
        filter: StatusFilter,
        as_of: Option<DateTime<Utc>>,
    ) -> Result<Vec<CustomerRank>> {
        let mut out = Vec::new();
        for b in self.report_batches(&Report::TopCustomers { limit, filter }, as_of).await? {
            let ids = b.column(0).as_primitive::<Int64Type>();
            let names = b.column(1).as_string::<i32>();
            let counts = b.column(2).as_primitive::<Int64Type>();
            let ranks = b.column(3).as_primitive::<Int64Type>();
            for i in 0..b.num_rows() {
                out.push(CustomerRank {
                    customer_id: (!ids.is_null(i)).then(|| ids.value(i)),
                    customer_name: (!names.is_null(i)).then(|| names.value(i).to_string()),
                    quantity: counts.value(i),
                    ranking: ranks.value(i),
                });
            }
        }
        Ok(out)
    }
}

fn check_limit(limit: usize) -> Result<()> {
    if limit == 0 || limit > 10_000 {
        return Err(QueryError::InvalidParameter { name: "limit", message: format!("must be 1..=10000, got {limit}") });
    }
    Ok(())
}

fn date(dates: &arrow::array::PrimitiveArray<Date32Type>, i: usize) -> Option<NaiveDate> {
    if dates.is_null(i) {
        return None;
    }
    NaiveDate::from_ymd_opt(1970, 1, 1).map(|epoch| epoch + chrono::Duration::days(i64::from(dates.value(i))))
}
