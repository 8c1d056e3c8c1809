//! The storage layout and the one commit path every layer uses.
//!
//! Every layer table is a Delta Lake table at `<storage>/<layer>/<table>`. Data is streamed
//! into Parquet files by a [`LayerWriter`]; a commit adds those files to the Delta log
//! together with a Delta *application transaction* (`txn`) action that records the source
//! position (the LSN) the commit covers. Readers never see half a commit, and after a restart
//! [`LayerTable::position`] tells exactly what is already stored.

use std::collections::HashMap;
use std::str::FromStr;
use std::sync::Arc;

use arrow::datatypes::Schema;
use deltalake::DeltaTableBuilder;
use deltalake::kernel::StructType;
use deltalake::kernel::engine::arrow_conversion::TryIntoKernel;
use deltalake::logstore::{LogStoreFactory, LogStoreRef, logstore_factories};
use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey};
use object_store::{ObjectStore, ObjectStoreExt};
use url::Url;

use crate::error::{Error, Result};
pub use crate::table::{
    CHECKPOINT_INTERVAL, CommitMode, CommitOutcome, LayerTable, LayerWriter, MODEL_DICTIONARY_BYTES, PAGE_ROWS,
    RAW_LOG_RETENTION, ROW_GROUP_ROWS, align_batch, writer_properties,
};
/// The three layers of the warehouse.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Layer {
    /// Every change as it happened (append-only).
    Raw,
    /// SCD type-2 history per entity.
    Intermediate,
    /// The dimensional star model.
    Presentation,
}

impl Layer {
    /// The directory name of the layer.
    pub fn dir(&self) -> &'static str {
        match self {
            Layer::Raw => "raw",
            Layer::Intermediate => "intermediate",
            Layer::Presentation => "presentation",
        }
    }

    /// The layer whose directory is `dir` (the inverse of [`Layer::dir`]).
    pub fn from_dir(dir: &str) -> Option<Layer> {
        [Layer::Raw, Layer::Intermediate, Layer::Presentation].into_iter().find(|l| l.dir() == dir)
    }
}

/// A position committed with a layer commit: a Delta application transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Position {
    /// Who wrote it (for example `acme-cdc`).
    pub app_id: String,
    /// Monotonic version: the source LSN the commit covers (inclusive).
    pub version: i64,
}

impl Position {
    /// A position for `app_id` at `version`.
    pub fn new(app_id: impl Into<String>, version: i64) -> Self {
        Self { app_id: app_id.into(), version }
    }
}

/// Where the layers live and how to reach them.
#[derive(Debug, Clone)]
pub struct Storage {
    root: Url,
    options: HashMap<String, String>,
    backend: Option<Arc<dyn ObjectStore>>,
}

impl Storage {
    /// Storage at `url`: a local path, `file:///path` or `s3://bucket/prefix`.
    ///
    /// For S3, the standard `AWS_*` environment variables apply, and `options` may set
    /// object_store's S3 keys (`aws_endpoint`, `aws_region`, `aws_allow_http`, ...).
    pub fn new(url: &str, options: HashMap<String, String>) -> Result<Self> {
        let bad = |message: &str| Error::StorageUrl { url: url.to_string(), message: message.to_string() };
        let trimmed = url.trim();
        if trimmed.is_empty() {
            return Err(bad("empty"));
        }
        let root = if trimmed.contains("://") {
            let mut parsed = Url::parse(trimmed).map_err(|e| bad(&e.to_string()))?;
            if !parsed.path().ends_with('/') {
                let path = format!("{}/", parsed.path());
                parsed.set_path(&path);
            }
            parsed
        } else {
            let path = std::path::Path::new(trimmed);
            std::fs::create_dir_all(path).map_err(|e| bad(&format!("cannot create the directory: {e}")))?;
            let absolute = std::fs::canonicalize(path).map_err(|e| bad(&e.to_string()))?;
            Url::from_directory_path(&absolute).map_err(|_| bad("not an absolute path"))?
        };
        let backend: Option<Arc<dyn ObjectStore>> = match root.scheme() {
            "file" => {
                let dir = root.to_file_path().map_err(|_| bad("not a local path"))?;
                std::fs::create_dir_all(&dir).map_err(|e| bad(&format!("cannot create the directory: {e}")))?;
                None
            }
            "s3" | "s3a" => {
                let bucket = root.host_str().ok_or_else(|| bad("missing bucket name"))?;
                let mut builder = AmazonS3Builder::from_env().with_bucket_name(bucket);
                for (key, value) in &options {
                    let key = AmazonS3ConfigKey::from_str(&key.to_ascii_lowercase())
                        .map_err(|_| bad(&format!("unknown S3 storage option `{key}`")))?;
                    builder = builder.with_config(key, value.trim_end_matches('/'));
                }
                let store = builder.build().map_err(|source| Error::ObjectStore { url: url.to_string(), source })?;
                register_s3_log_store(root.scheme());
                Some(Arc::new(store))
            }
            other => return Err(bad(&format!("unsupported scheme `{other}`"))),
        };
        Ok(Self { root, options, backend })
    }

    /// Storage at `url` reached through the caller's `store` instead of one acme builds: for a
    /// store acme has no options for (another cloud, a proxy, an instrumented or cached
    /// store), or to share one client between acme and the rest of a service.
    ///
    /// `store` must address the bucket (or volume) `url` names: the URL's path is the
    /// warehouse's prefix inside it, as for `s3://bucket/prefix`. Any scheme is accepted; it
    /// only keys the store (for example `mem://warehouse/` over an in-memory store).
    pub fn with_object_store(url: &str, store: Arc<dyn ObjectStore>) -> Result<Self> {
        let bad = |message: String| Error::StorageUrl { url: url.to_string(), message };
        let mut root = Url::parse(url.trim())
            .map_err(|e| bad(format!("{e} (a store given by the caller needs a URL such as s3://bucket/prefix)")))?;
        if root.host_str().is_none_or(str::is_empty) {
            return Err(bad("the URL names no bucket (scheme://bucket/prefix)".into()));
        }
        if !root.path().ends_with('/') {
            let path = format!("{}/", root.path());
            root.set_path(&path);
        }
        register_s3_log_store(root.scheme());
        Ok(Self { root, options: HashMap::new(), backend: Some(store) })
    }

    /// The object store of the bucket, for remote storage (`None` for local files, which any
    /// engine reads through its local file system store).
    pub fn object_store(&self) -> Option<Arc<dyn ObjectStore>> {
        self.backend.clone()
    }

    /// Register this storage's object store (for S3) in a DataFusion context, so that scans
    /// from [`LayerTable::provider`] can read the files.
    pub fn register_object_store(&self, ctx: &datafusion::prelude::SessionContext) {
        if let Some(store) = self.object_store() {
            let mut bucket = self.root.clone();
            bucket.set_path("/");
            ctx.register_object_store(&bucket, store);
        }
    }

    /// A DataFusion context that can read this storage's files.
    pub fn session_context(&self) -> datafusion::prelude::SessionContext {
        let ctx = datafusion::prelude::SessionContext::new();
        self.register_object_store(&ctx);
        ctx
    }

    /// DataFusion's cache of this storage's Parquet footers (with their page indexes), one per
    /// storage root in the process while any runtime uses it, bounded as DataFusion bounds one
    /// runtime's (50 MiB). Each runtime acme makes for a storage ([`Storage::runtime_builder`]:
    /// the warehouse's, each model build's, each background merge's) uses it instead of a cache
    /// of its own: a model build folds the tail in beside the published warehouse, and each
    /// kept a copy of the same files' footers (about 30 MB in the build's cache, in a heap
    /// profile of the SF10 live workload). Once no runtime holds it, the cache is dropped.
    pub fn footer_cache(&self) -> Arc<datafusion::execution::cache::cache_manager::FileMetadataCache> {
        type Cache = datafusion::execution::cache::cache_manager::FileMetadataCache;
        static CACHES: std::sync::OnceLock<std::sync::Mutex<HashMap<String, std::sync::Weak<Cache>>>> =
            std::sync::OnceLock::new();
        let mut caches = match CACHES.get_or_init(Default::default).lock() {
            Ok(caches) => caches,
            Err(poisoned) => poisoned.into_inner(),
        };
        if let Some(cache) = caches.get(self.root.as_str()).and_then(std::sync::Weak::upgrade) {
            return cache;
        }
        // The cache a default runtime makes (DataFusion's type and bound).
        let limit = datafusion::execution::cache::cache_manager::DEFAULT_METADATA_CACHE_LIMIT;
        let cache: Arc<Cache> =
            Arc::new(datafusion::execution::cache::default_cache::DefaultCache::new(limit).with_name("acme footers"));
        caches.retain(|_, cache| cache.strong_count() > 0);
        caches.insert(self.root.to_string(), Arc::downgrade(&cache));
        cache
    }

    /// A DataFusion runtime builder whose footer cache is this storage's shared one
    /// ([`Storage::footer_cache`]); the rest (memory pool, disk manager) as DataFusion's default.
    pub fn runtime_builder(&self) -> datafusion::execution::runtime_env::RuntimeEnvBuilder {
        let caches = datafusion::execution::cache::cache_manager::CacheManagerConfig::default()
            .with_file_metadata_cache(Some(self.footer_cache()));
        datafusion::execution::runtime_env::RuntimeEnvBuilder::new().with_cache_manager(caches)
    }

    /// A context for background work that should hold little memory (compaction): like
    /// [`Storage::session_context`], with the query engine's memory bounded to `limit_bytes`
    /// (sorts beyond it spill to the temporary directory) and one partition, so that one sort
    /// has the whole bound. Its footer cache is the storage's ([`Storage::footer_cache`]).
    pub fn background_session_context(&self, limit_bytes: usize) -> Result<datafusion::prelude::SessionContext> {
        let pool = datafusion::execution::memory_pool::FairSpillPool::new(limit_bytes);
        let runtime = self.runtime_builder().with_memory_pool(Arc::new(pool)).build_arc().map_err(|e| {
            Error::Query { table: self.root.to_string(), context: "starting a query engine", source: Box::new(e) }
        })?;
        // The share of the bound a sort keeps back for merging what it spilled.
        let config = datafusion::prelude::SessionConfig::new()
            .with_target_partitions(1)
            .with_sort_spill_reservation_bytes(limit_bytes / 4);
        let ctx = datafusion::prelude::SessionContext::new_with_config_rt(config, runtime);
        self.register_object_store(&ctx);
        Ok(ctx)
    }

    /// The root URL (always ends with `/`).
    pub fn root(&self) -> &Url {
        &self.root
    }

    /// Store a small pipeline metadata document (`<storage>/_acme/<name>`), atomically.
    pub async fn put_meta(&self, name: &str, bytes: Vec<u8>) -> Result<()> {
        let (store, path) = self.meta_location(name)?;
        store
            .put(&path, bytes.into())
            .await
            .map(|_| ())
            .map_err(|source| Error::ObjectStore { url: format!("{}_acme/{name}", self.root), source })
    }

    /// Read a pipeline metadata document, if it exists.
    pub async fn get_meta(&self, name: &str) -> Result<Option<Vec<u8>>> {
        let (store, path) = self.meta_location(name)?;
        match store.get(&path).await {
            Ok(result) => result
                .bytes()
                .await
                .map(|b| Some(b.to_vec()))
                .map_err(|source| Error::ObjectStore { url: format!("{}_acme/{name}", self.root), source }),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(source) => Err(Error::ObjectStore { url: format!("{}_acme/{name}", self.root), source }),
        }
    }

    fn meta_location(&self, name: &str) -> Result<(Arc<dyn ObjectStore>, object_store::path::Path)> {
        let (store, prefix) = self.root_store()?;
        Ok((store, object_store::path::Path::from(format!("{prefix}_acme/{name}"))))
    }

    /// The object store holding the warehouse, and the path of the warehouse's root in it
    /// (empty, or ending with `/`).
    pub(crate) fn root_store(&self) -> Result<(Arc<dyn ObjectStore>, String)> {
        match &self.backend {
            Some(store) => {
                let prefix = self.root.path().trim_matches('/');
                let prefix = if prefix.is_empty() { String::new() } else { format!("{prefix}/") };
                Ok((Arc::clone(store), prefix))
            }
            None => {
                let dir = self.root.to_file_path().map_err(|_| Error::StorageUrl {
                    url: self.root.to_string(),
                    message: "not a local path".into(),
                })?;
                let store = object_store::local::LocalFileSystem::new_with_prefix(&dir)
                    .map_err(|source| Error::ObjectStore { url: self.root.to_string(), source })?;
                Ok((Arc::new(store), String::new()))
            }
        }
    }

    /// The URL of a layer table.
    pub fn table_url(&self, layer: Layer, table: &str) -> Result<Url> {
        self.root.join(&format!("{}/{table}/", layer.dir())).map_err(|e| Error::StorageUrl {
            url: self.root.to_string(),
            message: format!("cannot address table {table}: {e}"),
        })
    }

    fn builder(&self, url: &Url) -> Result<DeltaTableBuilder> {
        let name = url.to_string();
        let builder = DeltaTableBuilder::from_url(url.clone()).map_err(Error::delta(name, "open"))?;
        Ok(match &self.backend {
            Some(store) => builder.with_storage_backend(Arc::clone(store), url.clone()),
            None => builder.with_storage_options(self.options.clone()),
        })
    }

    fn log_store(&self, url: &Url, name: &str) -> Result<LogStoreRef> {
        self.builder(url)?.build_storage().map_err(Error::delta(name, "open storage"))
    }

    /// Open a layer table if it exists.
    pub async fn open(&self, layer: Layer, table: &str) -> Result<Option<LayerTable>> {
        let url = self.table_url(layer, table)?;
        let name = format!("{}/{table}", layer.dir());
        let mut delta = self.builder(&url)?.build().map_err(Error::delta(&name, "open"))?;
        if !delta.verify_deltatable_existence().await.map_err(Error::delta(&name, "check existence"))? {
            return Ok(None);
        }
        delta.load().await.map_err(Error::delta(&name, "load"))?;
        Ok(Some(LayerTable { name, delta }))
    }

    /// Open a layer table at an exact `version` (time travel), if the table exists.
    pub async fn open_at(&self, layer: Layer, table: &str, version: u64) -> Result<Option<LayerTable>> {
        let url = self.table_url(layer, table)?;
        let name = format!("{}/{table}", layer.dir());
        let mut delta = self.builder(&url)?.build().map_err(Error::delta(&name, "open"))?;
        if !delta.verify_deltatable_existence().await.map_err(Error::delta(&name, "check existence"))? {
            return Ok(None);
        }
        delta.load_version(version).await.map_err(Error::delta(&name, "load a pinned version"))?;
        Ok(Some(LayerTable { name, delta }))
    }

    /// Record a consistent set of table versions under `_acme/<name>.json` (see [`Manifest`]).
    /// Written after every table of a multi-table commit round is committed, so a reader that
    /// loads the versions it names sees one consistent state across tables.
    pub async fn put_manifest(&self, name: &str, manifest: &Manifest) -> Result<()> {
        let bytes = serde_json::to_vec_pretty(manifest)
            .map_err(|e| Error::Internal(format!("cannot encode the {name} manifest: {e}")))?;
        self.put_meta(&format!("{name}.json"), bytes).await
    }

    /// Read the manifest `_acme/<name>.json`, if one was written.
    pub async fn get_manifest(&self, name: &str) -> Result<Option<Manifest>> {
        match self.get_meta(&format!("{name}.json")).await? {
            None => Ok(None),
            Some(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(|e| Error::CorruptMetadata {
                url: format!("{}_acme/{name}.json", self.root),
                message: e.to_string(),
            }),
        }
    }

    /// Open a layer table at the version `manifest` names for it, or at its latest version
    /// when there is no manifest or the manifest does not name the table.
    pub async fn open_pinned(
        &self,
        layer: Layer,
        table: &str,
        manifest: Option<&Manifest>,
    ) -> Result<Option<LayerTable>> {
        match manifest.and_then(|m| m.version_of(layer, table)) {
            Some(version) => self.open_at(layer, table, version).await,
            None => self.open(layer, table).await,
        }
    }

    /// [`Storage::open_pinned`], reusing `loaded`, an earlier handle of the same table: it is
    /// moved forward to the version the manifest names (or to the latest, when the manifest
    /// names none), reading only the commits after its own, or nothing when a writer of this
    /// process committed that version (it takes that writer's state). A table the manifest
    /// pins at an older version than `loaded` is opened afresh.
    pub async fn reopen_pinned(
        &self,
        layer: Layer,
        table: &str,
        manifest: Option<&Manifest>,
        loaded: Option<&LayerTable>,
    ) -> Result<Option<LayerTable>> {
        let pinned = manifest.and_then(|m| m.version_of(layer, table));
        let Some(mut reused) = loaded.filter(|t| pinned.is_none_or(|v| t.version().is_some_and(|l| l <= v))).cloned()
        else {
            return self.open_pinned(layer, table, manifest).await;
        };
        let name = reused.name.clone();
        match pinned {
            // Already at the pinned version (a model table between builds): nothing to read.
            Some(version) if reused.version() == Some(version) => {}
            // The state a writer of this process left at that version, when it committed it;
            // else the log entries since the loaded version, replayed.
            Some(version) => match crate::committed::recall(&reused.delta, version) {
                Some(state) => reused.delta.state = Some(state),
                None => {
                    reused.delta.load_version(version).await.map_err(Error::delta(&name, "load a pinned version"))?
                }
            },
            None => reused.refresh().await?,
        }
        Ok(Some(reused))
    }

    /// Open a layer table, creating it with `schema` when it does not exist yet.
    pub async fn open_or_create(&self, layer: Layer, table: &str, schema: &Schema) -> Result<LayerTable> {
        self.open_or_create_with_stats(layer, table, schema, None).await
    }

    /// Open the raw table of a source table whose primary key is `key`, creating it with
    /// `schema` when it does not exist yet, with file statistics on the columns of
    /// [`crate::raw::stats_columns`] only.
    pub async fn open_or_create_raw(&self, table: &str, schema: &Schema, key: &[String]) -> Result<LayerTable> {
        self.open_or_create_with_stats(Layer::Raw, table, schema, crate::raw::stats_columns(key)).await
    }

    /// [`Storage::open_or_create`], keeping file statistics on `stats_columns` only when given.
    async fn open_or_create_with_stats(
        &self,
        layer: Layer,
        table: &str,
        schema: &Schema,
        stats_columns: Option<Vec<String>>,
    ) -> Result<LayerTable> {
        if let Some(mut existing) = self.open(layer, table).await? {
            if layer == Layer::Raw {
                // A raw table an earlier acme created: its log settings, in a metadata commit.
                existing.set_raw_properties(stats_columns).await?;
            }
            return Ok(existing);
        }
        let url = self.table_url(layer, table)?;
        let name = format!("{}/{table}", layer.dir());
        let kernel: StructType = schema.try_into_kernel().map_err(|e| Error::SchemaMismatch {
            table: name.clone(),
            message: format!("the Arrow schema has no Delta equivalent: {e}"),
        })?;
        let created = deltalake::operations::create::CreateBuilder::new()
            .with_location(url.to_string())
            .with_log_store(self.log_store(&url, &name)?)
            .with_table_name(table)
            .with_columns(kernel.fields().cloned())
            // Micro-batches commit several times a second: a checkpoint every few commits keeps
            // opening a table (a log replay) fast.
            .with_configuration_property(
                deltalake::TableProperty::CheckpointInterval,
                Some(CHECKPOINT_INTERVAL.to_string()),
            )
            // The raw tables commit a version per micro-batch, ten a second under load: with
            // Delta's default of 30 days, their logs would grow by hundreds of thousands of
            // files a day, and every commit and every reader lists them.
            .with_configuration_property(
                deltalake::TableProperty::LogRetentionDuration,
                (layer == Layer::Raw).then(|| RAW_LOG_RETENTION.to_string()),
            )
            .with_configuration_property(
                deltalake::TableProperty::DataSkippingStatsColumns,
                stats_columns.map(|columns| columns.join(",")),
            )
            .with_save_mode(deltalake::protocol::SaveMode::Ignore)
            .await;
        match created {
            Ok(delta) => Ok(LayerTable { name, delta }),
            // Another writer created it first: open theirs.
            Err(_) => self
                .open(layer, table)
                .await?
                .ok_or_else(|| Error::Internal(format!("table {name} neither created nor found"))),
        }
    }
}

/// Manifest names.
pub mod manifests {
    /// Written by the change stream after each round of raw-layer commits.
    pub const RAW: &str = "raw";
    /// Written by the model build after the intermediate and presentation tables are committed.
    pub const MODEL: &str = "model";
}

/// A consistent set of table versions: what one round of commits across several tables
/// produced. Readers that pin these versions see every table at the same source position,
/// even while a writer is half-way through its next round.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Manifest {
    /// The source position (commit LSN) the round covers.
    pub position: i64,
    /// Delta version per `layer/table`.
    pub tables: std::collections::BTreeMap<String, u64>,
}

impl Manifest {
    /// An empty manifest at `position`.
    pub fn new(position: i64) -> Self {
        Self { position, tables: Default::default() }
    }

    /// Record the version of `table` (its currently loaded version).
    pub fn record(&mut self, table: &LayerTable) {
        if let Some(version) = table.version() {
            self.tables.insert(table.name().to_string(), version);
        }
    }

    /// The version recorded for `layer/table`.
    pub fn version_of(&self, layer: Layer, table: &str) -> Option<u64> {
        self.tables.get(&format!("{}/{table}", layer.dir())).copied()
    }
}

/// Delta log store for S3 that commits with a create-only (conditional) put, which S3 and
/// object_store 0.13 support: two writers can never both create the same log entry.
#[derive(Debug, Default)]
struct ConditionalPutLogStoreFactory;

impl LogStoreFactory for ConditionalPutLogStoreFactory {
    fn with_options(
        &self,
        prefixed_store: deltalake::logstore::ObjectStoreRef,
        root_store: deltalake::logstore::ObjectStoreRef,
        location: &Url,
        options: &deltalake::logstore::StorageConfig,
    ) -> deltalake::DeltaResult<LogStoreRef> {
        Ok(deltalake::logstore::default_logstore(prefixed_store, root_store, location, options))
    }
}

/// Register the conditional-put log store for `scheme` unless the host application already
/// registered one (for example deltalake-aws).
fn register_s3_log_store(scheme: &str) {
    if let Ok(key) = Url::parse(&format!("{scheme}://")) {
        let registry = logstore_factories();
        if registry.get(&key).is_none() {
            registry.insert(key, Arc::new(ConditionalPutLogStoreFactory));
        }
    }
}
