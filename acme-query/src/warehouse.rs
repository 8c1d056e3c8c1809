//! The warehouse handle: opening, pinning every table to its writer's last complete commit
//! round, registering the live model, and refreshing.

use super::*;
use acme_core::Lsn;

/// Largest build side, in bytes, of a join that is broadcast rather than repartitioned.
pub const BROADCAST_JOIN_BYTES: usize = 128 * 1024 * 1024;
/// Largest build side, in rows, of a join that is broadcast rather than repartitioned.
pub const BROADCAST_JOIN_ROWS: usize = 8 * 1024 * 1024;

/// How far past [`Warehouse::tail_limit`] a handle that already holds the tail keeps extending
/// it (a multiple of the limit): a new handle, or one whose tail the limit let go, starts
/// holding it only within the limit.
pub const HELD_TAIL_GRACE: u64 = 2;

/// The [`Warehouse`] handles alive in this process ([`Warehouse::live_handles`]).
static LIVE_HANDLES: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// A warehouse opened for queries.
pub struct Warehouse {
    pub(crate) ctx: SessionContext,
    pub(crate) url: String,
    pub(crate) history_start: Option<i64>,
    /// The first model table that does not exist yet, if any.
    pub(crate) missing: Option<String>,
    /// The model has the per-(delivery_date, status) aggregate of current orders.
    pub(crate) has_aggregate: bool,
    /// The pinned tables, for diagnosing unreadable files and for [`Warehouse::refresh`].
    pub(crate) tables: Vec<acme_core::LayerTable>,
    pub(crate) storage: Storage,
    /// The manifests the tables are pinned to.
    pub(crate) manifests: (Option<acme_core::storage::Manifest>, Option<acme_core::storage::Manifest>),
    /// What the handles [`Warehouse::refreshed`] makes share with this one.
    pub(crate) shared: Shared,
    /// The tail held in memory, which the handles refreshed from this one extend.
    pub(crate) held: Option<Arc<HeldTail>>,
    /// The star rows recomputed for the tail, which the handles refreshed from this one extend.
    pub(crate) star: Option<Arc<live_star::HeldStar>>,
    /// The tail's size (`None` without a model).
    pub(crate) tail: Option<Tail>,
    /// Set once R3 on the current state is kept in `model.`[`live_star::PENDING_ITEMS`]: a
    /// handle with no tail counts it on its first R3 query and answers later ones from the
    /// counts (a handle with a tail keeps it in its star rows instead).
    pub(crate) kept_pending: Arc<tokio::sync::OnceCell<()>>,
    /// What acme registered in `ctx` (the rest is the caller's, carried over on refresh).
    pub(crate) registered: Arc<builder::Registered>,
    /// Each pinned table's scan (by `layer/table`, see [`acme_core::LayerTable::name`]), which a
    /// refreshed handle reuses for the tables whose version did not move.
    pub(crate) providers: Arc<HashMap<String, Arc<dyn datafusion::catalog::TableProvider>>>,
}

/// What a handle being loaded takes over from the handle it refreshes.
#[derive(Default)]
pub(crate) struct Previous<'a> {
    /// Its tables (each reads only the commits after the version it holds).
    pub(crate) tables: &'a [acme_core::LayerTable],
    /// The history's first instant, when the stored model did not move.
    pub(crate) known_start: Option<i64>,
    /// Its tail held in memory.
    pub(crate) tail: Option<Arc<HeldTail>>,
    /// Its star rows recomputed for the tail.
    pub(crate) star: Option<Arc<live_star::HeldStar>>,
    /// Its context and what acme registered in it: the caller's tables and functions carry over.
    pub(crate) context: Option<(&'a SessionContext, &'a builder::Registered)>,
    /// Its tables' scans: a table at the same version keeps its scan (listing a version's
    /// files and parsing their statistics is most of what opening an unchanged table costs).
    pub(crate) providers: Option<&'a HashMap<String, Arc<dyn datafusion::catalog::TableProvider>>>,
    /// The rows its stored histories hold, when the stored model did not move.
    pub(crate) model_rows: Option<u64>,
    /// Whether a stored model with no raw change after it yet gets the live state the next
    /// handles extend (an empty tail) instead of none.
    pub(crate) live_state: bool,
}

/// What a handle passes on to the handles [`Warehouse::refreshed`] makes.
#[derive(Clone)]
pub(crate) struct Shared {
    /// The query runtime: its caches of Parquet footers and per-file statistics stay warm
    /// across refreshes (data files never change).
    pub(crate) runtime: Arc<RuntimeEnv>,
    /// The largest tail held in memory (see [`MAX_MATERIALIZED_TAIL`]).
    pub(crate) max_tail_in_memory: u64,
    /// The session settings of every handle.
    pub(crate) session: SessionConfig,
    /// The caller's setup, run on every handle's context.
    pub(crate) setup: Vec<Setup>,
    /// The tail's changes in the raw files that straddle the model's position, counted once.
    pub(crate) straddle_counts: StraddleCounts,
}

impl Drop for Warehouse {
    fn drop(&mut self) {
        LIVE_HANDLES.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
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
        self.refreshed_with(false, false).await
    }

    /// Like [`Warehouse::refreshed`], and when the stored model has no raw change after it yet,
    /// the new handle also makes the live state that later handles extend (R1's, R3's and R4's
    /// counts on the current state, the stored rows with an Unknown member). Otherwise the
    /// first handle with a raw change after the model makes it, and the reports wait for it
    /// (seconds at SF10). For a service that makes the first handle on a newly stored model
    /// beside the handles it publishes, as `acme::Pipeline` does.
    pub async fn refreshed_with_live_state(&self) -> Result<Option<Warehouse>> {
        self.refreshed_with(false, true).await
    }

    /// Like [`Warehouse::refreshed`], but the stored model stays the one this handle reads:
    /// only the raw layer moves (its newer changes are applied on read, as the tail). For a
    /// service that keeps its reports fresh on the stored model it has while the first handle
    /// on a newly stored one is made beside it (that handle's first step reads the new model's
    /// aggregates whole). The model's files must still exist, as they do until a vacuum
    /// removes them.
    pub async fn refreshed_on_its_model(&self) -> Result<Option<Warehouse>> {
        self.refreshed_with(true, false).await
    }

    /// Whether a model build stored a newer model than the one this handle reads.
    pub async fn stored_model_moved(&self) -> Result<bool> {
        Ok(self.storage.get_manifest(manifests::MODEL).await? != self.manifests.1)
    }

    /// [`Warehouse::refreshed`], keeping this handle's model with `keep_model`, and making the
    /// live state of an empty tail with `live_state`.
    async fn refreshed_with(&self, keep_model: bool, live_state: bool) -> Result<Option<Warehouse>> {
        let raw_manifest = self.storage.get_manifest(manifests::RAW).await?;
        let model_manifest = match (keep_model, &self.manifests.1) {
            (true, Some(kept)) => Some(kept.clone()),
            _ => self.storage.get_manifest(manifests::MODEL).await?,
        };
        // Without manifests, tables are read at their latest versions: always reload.
        let pinned = raw_manifest.is_some() || model_manifest.is_some();
        if pinned && (&raw_manifest, &model_manifest) == (&self.manifests.0, &self.manifests.1) {
            return Ok(None);
        }
        // The first instant of the history, and the rows it holds, only move with the stored
        // model.
        let same_model = model_manifest.is_some() && model_manifest == self.manifests.1;
        let known_start = self.history_start.filter(|_| same_model);
        let previous = Previous {
            tables: &self.tables,
            known_start,
            tail: self.held.clone(),
            star: self.star.clone(),
            context: Some((&self.ctx, &self.registered)),
            providers: Some(&self.providers),
            model_rows: self.tail.map(|t| t.model_rows).filter(|_| same_model),
            live_state,
        };
        let loaded =
            Self::load(self.storage.clone(), &self.url, (raw_manifest, model_manifest), previous, self.shared.clone());
        let loaded = loaded.await?;
        // The first handle on a newly stored model ranks its R4 base for the status filters
        // this handle's base was ranked for, here (beside the published handles, for a
        // pipeline) instead of in the first R4 query on it.
        if live_state
            && !same_model
            && let (Some(new), Some(old)) = (
                loaded.star.as_ref().and_then(|s| s.customer_orders.as_ref()),
                self.star.as_ref().and_then(|s| s.customer_orders.as_ref()),
            )
        {
            live_star::rank_like(&loaded.ctx, new, old).await?;
        }
        Ok(Some(loaded))
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
        let model_catalog = Catalog::acme();
        for spec in model_catalog.history_specs() {
            wanted.push((Layer::Raw, spec.table.clone(), format!("raw_{}", spec.table), raw_manifest.as_ref()));
        }
        for table in model_catalog.tables() {
            wanted.push((table.layer, table.name.to_string(), table.name.to_string(), model_manifest.as_ref()));
        }
        let loaded = futures::future::try_join_all(wanted.iter().map(|(layer, name, registered, manifest)| {
            let (storage, runtime) = (&storage, &shared.runtime);
            async move {
                let previous_table = previous.tables.iter().find(|t| t.name() == format!("{}/{name}", layer.dir()));
                match storage.reopen_pinned(*layer, name, *manifest, previous_table).await? {
                    Some(table) => {
                        let unchanged =
                            previous_table.is_some_and(|p| p.version().is_some() && p.version() == table.version());
                        let kept = previous.providers.filter(|_| unchanged).and_then(|p| p.get(table.name()));
                        let provider = match kept {
                            Some(provider) => Arc::clone(provider),
                            None => table.cached_provider(runtime)?,
                        };
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
        let tail_after = live_tail_position(raw_manifest.as_ref(), model_manifest.as_ref(), previous.live_state);
        let mut found = HashMap::new();
        let mut tables = Vec::new();
        let mut providers = HashMap::new();
        for (layer, registered, provider, table) in loaded.into_iter().flatten() {
            providers.insert(table.name().to_string(), Arc::clone(&provider));
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
        let stored_rows = previous.model_rows.unwrap_or_else(|| model_rows(&tables));
        let mut tail = model_manifest.as_ref().map(|_| Tail { changes: 0, model_rows: stored_rows, held_bytes: 0 });
        if let (Some(position), Some(tail)) = (tail_after, tail.as_mut()) {
            let files = raw_tail_files(&tables, position)?;
            tail.changes = count_tail(&ctx, &files, position, &shared.straddle_counts).await?;
            let counted = started.elapsed();
            // A handle that extends a held tail keeps holding it up to twice the limit: a fold
            // started at half the limit (see `acme::Pipeline`) lands before that, while the
            // tail goes on growing, instead of every refresh recomputing it from the raw files.
            let extending = previous.tail.as_deref().is_some_and(|t| t.model_position == position);
            let limit = match extending {
                true => shared.max_tail_in_memory.saturating_mul(HELD_TAIL_GRACE),
                false => shared.max_tail_in_memory,
            };
            let materialize = tail.changes <= limit;
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
            let viewed = started.elapsed();
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
            let plans_used = crate::plans::uses();
            tracing::debug!(
                tail = tail.changes,
                held_in_memory = materialize,
                held_bytes = tail.held_bytes,
                incremental = reusable.is_some(),
                open_ms = opened.as_millis() as u64,
                tail_ms = (started.elapsed() - opened).as_millis() as u64,
                count_ms = (counted - opened).as_millis() as u64,
                views_ms = (viewed - counted).as_millis() as u64,
                star_ms = (started.elapsed() - viewed).as_millis() as u64,
                plans_kept = plans_used.0,
                plans_afresh = plans_used.1,
                "warehouse handle loaded with a raw tail"
            );
        }
        // Without a model (only the raw layer so far) the handle still answers SQL over the raw
        // tables; the reports say which table is missing.
        let mut missing = None;
        for spec in model_catalog.history_specs() {
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
        LIVE_HANDLES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
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
            providers: Arc::new(providers),
        })
    }

    /// The largest tail (raw changes after the stored model's position) a handle holds in
    /// memory and starts extending from one refresh to the next ([`WarehouseBuilder::tail_limit`],
    /// [`MAX_MATERIALIZED_TAIL`] by default); a handle refreshed from one that holds it goes on
    /// extending it up to [`HELD_TAIL_GRACE`] times this. Past that, every refresh and query
    /// computes the tail from the raw files: seconds instead of a few hundred milliseconds at
    /// SF1.
    pub fn tail_limit(&self) -> u64 {
        self.shared.max_tail_in_memory
    }

    /// How many handles are alive in this process: each holds its own context and the rows it
    /// recomputed for its tail (the rows it shares with the handle it was refreshed from are
    /// held once). For diagnosing memory: readers that keep old handles keep their rows.
    pub fn live_handles() -> usize {
        LIVE_HANDLES.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The source position (commit LSN) the handle answers at: the raw layer's last complete
    /// commit round. The histories, the `_current` views and the reports include every change up
    /// to it (the raw changes the stored model does not cover yet are applied on read).
    pub fn raw_position(&self) -> Option<Lsn> {
        self.manifests.0.as_ref().map(|m| Lsn::from_stored(m.position))
    }

    /// The source position (commit LSN) the stored model covers, when the model build recorded
    /// one: every table of the `model` schema (`model.<table>`) is at exactly this position;
    /// the histories, the aggregate and the star tables under their plain names are at
    /// [`Warehouse::raw_position`].
    pub fn model_position(&self) -> Option<Lsn> {
        self.manifests.1.as_ref().map(|m| Lsn::from_stored(m.position))
    }

    /// How far the stored model trails this handle (counted when the handle was loaded): the
    /// raw changes after the model's position, which every report applies on read, against the
    /// rows the stored histories hold. A maintenance policy folds the tail into the stored
    /// model when it grows past a fraction of the model (see
    /// `acme::PipelineBuilder::fold_ratio`). `None` without a model.
    pub fn tail(&self) -> Option<Tail> {
        self.tail
    }

    /// The key lookups of stored model tables this handle holds, sorted: a table by its key
    /// (`dim_customer`) or by a column (`fact_orders.order_id`). Each is made once per stored
    /// model (it reads the page index of every file) and passed on to the handles refreshed
    /// from this one; a pipeline's first handle on a newly stored model makes them beside the
    /// published handles.
    pub fn stored_lookups(&self) -> Vec<String> {
        let mut names: Vec<String> = self.star.iter().flat_map(|s| s.lookups.keys().cloned()).collect();
        names.sort();
        names
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
        let span = tracing::debug_span!("query", report = "sql", position = self.raw_position().map(Lsn::as_stored));
        Ok(self.ctx.sql(sql).instrument(span).await?)
    }

    /// The first instant the history covers.
    pub fn history_start(&self) -> Option<DateTime<Utc>> {
        self.history_start.and_then(DateTime::from_timestamp_micros)
    }
}
