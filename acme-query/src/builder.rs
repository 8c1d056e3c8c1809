//! [`WarehouseBuilder`]: how a [`Warehouse`] is opened (storage, DataFusion session and
//! runtime, the caller's object store, and setup that every handle gets).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use datafusion::execution::runtime_env::RuntimeEnv;
use datafusion::prelude::{SessionConfig, SessionContext};
use object_store::ObjectStore;

use crate::{MAX_MATERIALIZED_TAIL, Result, Warehouse};

/// Code run on the context of every handle: the one opened and each one
/// [`Warehouse::refresh`] or [`Warehouse::refreshed`] makes from it.
pub type Setup = Arc<dyn Fn(&SessionContext) -> datafusion::error::Result<()> + Send + Sync>;

/// Opens a [`Warehouse`] with settings of the caller's: see [`Warehouse::builder`].
#[must_use]
pub struct WarehouseBuilder {
    url: String,
    options: HashMap<String, String>,
    store: Option<Arc<dyn ObjectStore>>,
    session: Option<SessionConfig>,
    runtime: Option<Arc<RuntimeEnv>>,
    memory_limit: Option<usize>,
    max_tail_in_memory: u64,
    setup: Vec<Setup>,
}

impl std::fmt::Debug for WarehouseBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The options may hold keys: only their names are shown.
        f.debug_struct("WarehouseBuilder")
            .field("url", &self.url)
            .field("options", &self.options.keys().collect::<Vec<_>>())
            .field("caller_store", &self.store.is_some())
            .field("memory_limit", &self.memory_limit)
            .field("max_tail_in_memory", &self.max_tail_in_memory)
            .finish_non_exhaustive()
    }
}

impl WarehouseBuilder {
    pub(crate) fn new(url: &str) -> Self {
        Self {
            url: url.to_string(),
            options: HashMap::new(),
            store: None,
            session: None,
            runtime: None,
            memory_limit: None,
            max_tail_in_memory: MAX_MATERIALIZED_TAIL,
            setup: Vec::new(),
        }
    }

    /// Object-store options (S3 endpoint, region, keys, ...), as [`acme_core::Storage::new`]
    /// takes them.
    pub fn storage_options(mut self, options: HashMap<String, String>) -> Self {
        self.options = options;
        self
    }

    /// Reach the warehouse through the caller's `store`, which addresses the bucket the URL
    /// names (see [`acme_core::Storage::with_object_store`]); storage options are then unused.
    pub fn object_store(mut self, store: Arc<dyn ObjectStore>) -> Self {
        self.store = Some(store);
        self
    }

    /// The DataFusion session settings of every handle, instead of acme's
    /// ([`Warehouse::default_session_config`]: the information schema, and joins broadcast up
    /// to [`crate::BROADCAST_JOIN_BYTES`]).
    pub fn session_config(mut self, config: SessionConfig) -> Self {
        self.session = Some(config);
        self
    }

    /// The DataFusion runtime of every handle (memory pool, disk manager, caches), instead of a
    /// default one. It is shared by the handles refreshed from this one.
    pub fn runtime_env(mut self, runtime: Arc<RuntimeEnv>) -> Self {
        self.runtime = Some(runtime);
        self
    }

    /// Bound the memory of queries (and of the work of loading a handle) to `bytes`: a query
    /// that needs more spills where it can and fails otherwise, with an error naming the limit.
    /// Ignored when [`WarehouseBuilder::runtime_env`] gives a runtime.
    pub fn memory_limit(mut self, bytes: usize) -> Self {
        self.memory_limit = Some(bytes);
        self
    }

    /// Hold at most `changes` raw changes after the stored model in memory (default
    /// [`MAX_MATERIALIZED_TAIL`]); a larger tail is applied by each query from the raw
    /// tables (with `0`, every non-empty tail is). A handle refreshed from one that holds the
    /// tail goes on extending it up to [`crate::HELD_TAIL_GRACE`] times this.
    pub fn tail_limit(mut self, changes: u64) -> Self {
        self.max_tail_in_memory = changes;
        self
    }

    /// Run `setup` on the context of every handle: the opened one and each refreshed one (for
    /// example to register UDFs or tables of the caller's). Tables and functions registered
    /// directly on a handle's [`Warehouse::context`] also carry over to the handles refreshed
    /// from it.
    pub fn on_context(
        mut self,
        setup: impl Fn(&SessionContext) -> datafusion::error::Result<()> + Send + Sync + 'static,
    ) -> Self {
        self.setup.push(Arc::new(setup));
        self
    }

    /// Open the warehouse.
    pub async fn open(self) -> Result<Warehouse> {
        let storage = match self.store {
            Some(store) => acme_core::Storage::with_object_store(&self.url, store)?,
            None => acme_core::Storage::new(&self.url, self.options)?,
        };
        let runtime = match (self.runtime, self.memory_limit) {
            (Some(runtime), _) => runtime,
            // The storage's footer cache, shared with the model builds and merges of this process.
            (None, Some(bytes)) => storage.runtime_builder().with_memory_limit(bytes, 1.0).build_arc()?,
            (None, None) => storage.runtime_builder().build_arc()?,
        };
        let shared = crate::Shared {
            runtime,
            max_tail_in_memory: self.max_tail_in_memory,
            session: self.session.unwrap_or_else(Warehouse::default_session_config),
            setup: self.setup,
            straddle_counts: Default::default(),
        };
        Warehouse::open_storage(storage, &self.url, shared).await
    }
}

/// What a handle's context holds beyond what acme registered in it: the caller's tables (in
/// the default schema) and functions, carried over to the next handle.
pub(crate) struct Registered {
    /// The tables acme registered in the default schema.
    pub(crate) acme_tables: HashSet<String>,
    /// The functions of a context right after acme set it up (built-ins and acme's).
    pub(crate) acme_functions: HashSet<String>,
}

impl Registered {
    /// What acme registered in `ctx`, taken before any of the caller's setup ran.
    pub(crate) fn of(ctx: &SessionContext) -> Self {
        Self { acme_tables: default_schema_tables(ctx), acme_functions: function_names(ctx) }
    }

    /// Register in `to` the tables and functions the caller added to `from` (whose acme part
    /// is `self`), unless `to` already has one of that name.
    pub(crate) async fn carry_over(&self, from: &SessionContext, to: &SessionContext) -> Result<()> {
        let state = from.state();
        let present = function_names(to);
        let new = |name: &String| !self.acme_functions.contains(name) && !present.contains(name);
        for (name, udf) in state.scalar_functions() {
            if new(name) {
                to.register_udf(udf.as_ref().clone());
            }
        }
        for (name, udaf) in state.aggregate_functions() {
            if new(name) {
                to.register_udaf(udaf.as_ref().clone());
            }
        }
        for (name, udwf) in state.window_functions() {
            if new(name) {
                to.register_udwf(udwf.as_ref().clone());
            }
        }
        let Some(schema) = default_schema(from) else { return Ok(()) };
        let present = default_schema_tables(to);
        for name in schema.table_names() {
            if self.acme_tables.contains(&name) || present.contains(&name) {
                continue;
            }
            if let Some(table) = schema.table(&name).await? {
                to.register_table(datafusion::common::TableReference::bare(name), table)?;
            }
        }
        Ok(())
    }
}

fn default_schema(ctx: &SessionContext) -> Option<Arc<dyn datafusion::catalog::SchemaProvider>> {
    let options = ctx.state().config().options().catalog.clone();
    ctx.catalog(&options.default_catalog)?.schema(&options.default_schema)
}

fn default_schema_tables(ctx: &SessionContext) -> HashSet<String> {
    default_schema(ctx).map(|s| s.table_names().into_iter().collect()).unwrap_or_default()
}

fn function_names(ctx: &SessionContext) -> HashSet<String> {
    let state = ctx.state();
    state
        .scalar_functions()
        .keys()
        .chain(state.aggregate_functions().keys())
        .chain(state.window_functions().keys())
        .cloned()
        .collect()
}
