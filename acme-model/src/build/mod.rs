//! The model build: raw changes -> SCD2 histories (intermediate) -> star schema (presentation).
//!
//! Builds are incremental. Every model table records, with each commit, the raw position
//! (commit LSN) it covers; a build reads only the raw changes after that position, up to the
//! position of the raw layer's last complete commit round (`_acme/raw.json`), and:
//! - appends the new versions to each history and closes the open versions they supersede,
//!   rewriting only the files that hold those open versions (open and closed versions live in
//!   separate files, so closed history is written once);
//! - recomputes the star-schema rows of the keys whose history changed since the table's own
//!   position (plus late-arriving keys that just arrived), and replaces them the same way;
//! - compacts the small files this leaves, and records the versions of every table in the
//!   model manifest (`_acme/model.json`) that readers pin.
//!
//! Every step is a DataFusion plan (window functions, hash joins, aggregates; no row loops)
//! streamed into Delta commits. A table with no position yet, or with more changed keys than
//! [`MAX_INCREMENTAL_KEYS`], is recomputed whole. Surrogate keys are numbered in commit order,
//! so an incremental build writes exactly what a full rebuild would. A build that dies half-way
//! leaves the last manifest's versions readable; the next build resumes each table from its own
//! position. Re-running over the same range changes nothing.

use std::sync::Arc;
use std::time::{Duration, Instant};

use acme_core::raw;
use acme_core::storage::{Manifest, manifests};
use acme_core::{AcmeConfig, Layer, LayerTable, Lsn, Position, Storage};
use arrow::array::Array;
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use datafusion::prelude::{DataFrame, SessionConfig, SessionContext};
use tracing::Instrument;

use crate::catalog::{Aggregate, Catalog, Changed, ModelTable, Plan};
use crate::error::{ModelError, Result};
use crate::history::{self, HistorySpec, attribute_columns, history_sql, open_versions_as_changes, raw_changes};
use crate::rewrite::{Keys, Target, collect_keys, key_column, register_keys, replace};
use crate::star;

mod steps;

use steps::*;

/// Application id of model commits.
pub const MODEL_APP: &str = "acme-model";

/// Above this many changed keys, a table is recomputed whole instead of incrementally (it is
/// then the cheaper way, and it bounds the memory the key set takes).
pub const MAX_INCREMENTAL_KEYS: usize = 1_000_000;

/// What a build did.
#[derive(Debug, Clone, Default)]
pub struct ModelReport {
    /// The raw position (highest commit LSN) the model now covers.
    pub position: Lsn,
    /// True when the model already covered the raw layer and nothing was rebuilt.
    pub up_to_date: bool,
    /// Per table (`layer/table`) that changed: how it was built and what it wrote.
    pub tables: Vec<TableBuild>,
    /// Raw changes (rows of the raw layer) this build applied.
    pub changes: u64,
    /// Files merged away by compaction.
    pub files_compacted: usize,
    /// Wall time.
    pub elapsed: Duration,
}

/// How one table was built.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableBuild {
    /// `layer/table`.
    pub table: String,
    /// True when only changed keys were recomputed; false for a whole recomputation.
    pub incremental: bool,
    /// Keys recomputed (incremental builds only).
    pub keys: usize,
    /// Rows written for those keys.
    pub rows: u64,
    /// Existing files rewritten because they held replaced rows.
    pub files_rewritten: usize,
    /// Existing files whose replaced rows were marked in a deletion vector instead.
    pub files_marked: usize,
    /// Rows so marked.
    pub rows_marked: u64,
    /// Wall time of the table's step.
    pub elapsed: Duration,
}

/// Builder of a model build; `.await` (or [`ModelBuild::run`]) runs it.
#[derive(Debug, Clone)]
pub struct ModelBuild {
    config: AcmeConfig,
    catalog: Catalog,
    up_to: Option<i64>,
    full: bool,
}

impl ModelBuild {
    /// A build of the model of `config.tables` (see [`Catalog::for_sources`]) from the raw
    /// layer at `config.storage_url`.
    pub fn new(config: AcmeConfig) -> Self {
        let catalog = Catalog::for_sources(&config.tables);
        Self { config, catalog, up_to: None, full: false }
    }

    /// Apply raw changes only up to commit LSN `lsn` (a reproducible build of a past state;
    /// the model never moves backwards).
    pub fn up_to(mut self, lsn: Lsn) -> Self {
        self.up_to = Some(lsn.as_stored());
        self
    }

    /// Recompute every table from the whole raw layer instead of incrementally.
    pub fn full_rebuild(mut self) -> Self {
        self.full = true;
        self
    }

    /// Every table the build writes, as (layer, name).
    pub fn model_tables(&self) -> Vec<(Layer, String)> {
        self.catalog.tables().iter().map(|t| (t.layer, t.name.to_string())).collect()
    }

    /// Run the build.
    ///
    /// When a step fails on a file it cannot read, the error names the file
    /// ([`acme_core::Error::DataFile`]).
    pub async fn run(self) -> Result<ModelReport> {
        self.catalog.check()?;
        let config = self.config.clone();
        let model = self.model_tables();
        let specs = self.catalog.history_specs();
        let span = tracing::info_span!("model_step", position = tracing::field::Empty);
        let built = self.build().instrument(span.clone()).await;
        if let Ok(report) = &built {
            span.record("position", report.position.as_stored());
        }
        match built {
            Err(ModelError::DataFusion(error))
                if matches!(error.find_root(), datafusion::error::DataFusionError::ResourcesExhausted(_)) =>
            {
                Err(ModelError::OutOfMemory { limit_mib: config.memory_limit_bytes / (1024 * 1024), source: error })
            }
            Err(ModelError::DataFusion(error)) => {
                let storage = Storage::new(&config.storage_url, config.storage_options.clone())?;
                let ctx = storage.session_context();
                let raw = specs.iter().map(|s| (Layer::Raw, s.table.clone()));
                for (layer, name) in raw.chain(model) {
                    if let Some(table) = storage.open(layer, &name).await? {
                        table.check_files(&ctx).await?;
                    }
                }
                Err(ModelError::DataFusion(error))
            }
            other => other,
        }
    }

    async fn build(self) -> Result<ModelReport> {
        let started = Instant::now();
        let storage = Storage::new(&self.config.storage_url, self.config.storage_options.clone())?;
        // Sorts and aggregations beyond the memory limit spill to the temporary directory. When
        // the pool runs out, the error names the operators holding the most of it.
        let pool = datafusion::execution::memory_pool::TrackConsumersPool::new(
            datafusion::execution::memory_pool::FairSpillPool::new(
                usize::try_from(self.config.memory_limit_bytes).unwrap_or(usize::MAX),
            ),
            std::num::NonZeroUsize::MIN.saturating_add(4),
        );
        // The storage's footer cache, shared with the warehouse that reads the same files.
        let runtime = storage.runtime_builder().with_memory_pool(Arc::new(pool)).build_arc()?;
        let ctx = SessionContext::new_with_config_rt(SessionConfig::new().with_information_schema(false), runtime);
        storage.register_object_store(&ctx);

        // The raw layer as of its last complete commit round.
        let raw_manifest = storage.get_manifest(manifests::RAW).await?;
        let mut raws = Vec::new();
        let mut position = 0i64;
        let specs = self.catalog.history_specs();
        for spec in &specs {
            let table = storage
                .open_pinned(Layer::Raw, &spec.table, raw_manifest.as_ref())
                .await?
                .ok_or_else(|| ModelError::NoRawTable { table: spec.table.clone() })?;
            for app in [raw::SNAPSHOT_APP, raw::CDC_APP] {
                position = position.max(table.position(app).await?.unwrap_or(0));
            }
            raws.push(table);
        }
        if let Some(manifest) = &raw_manifest {
            position = manifest.position;
        }
        if let Some(limit) = self.up_to {
            position = position.min(limit);
        }
        let previous = storage.get_manifest(manifests::MODEL).await?;
        let mut build = Build {
            storage: &storage,
            ctx: &ctx,
            config: &self.config,
            previous: previous.as_ref(),
            full: self.full,
            target: position,
            commit: Position::new(MODEL_APP, position),
            report: ModelReport { position: Lsn::from_stored(position), ..ModelReport::default() },
            registered: Default::default(),
            history_keys: Default::default(),
        };
        // Up to date: every table covers the position (a build that died after its last
        // commit but before its manifest only needs the manifest).
        if !self.full {
            let mut covered = true;
            for (layer, name) in self.model_tables() {
                covered &= build.built(layer, &name).await?.1 >= position;
            }
            if covered {
                if previous.as_ref().is_none_or(|m| m.position < position) {
                    build.write_manifest(&self.model_tables()).await?;
                }
                let position = previous.as_ref().map_or(position, |m| m.position.max(position));
                return Ok(ModelReport {
                    position: Lsn::from_stored(position),
                    up_to_date: true,
                    elapsed: started.elapsed(),
                    ..build.report
                });
            }
        }

        for (spec, raw) in specs.iter().zip(&raws) {
            build.history(spec, raw).await?;
        }
        for table in self.catalog.star() {
            match table.plan {
                Plan::Dimension { surrogate_key, sql } => build.dimension(table, surrogate_key, sql).await?,
                Plan::StatusTransitions => build.order_status(table).await?,
                Plan::Fact { sql, .. } => build.star(table, sql).await?,
                Plan::Aggregate(Aggregate::OrdersByDeliveryDate) => build.orders_aggregate(table).await?,
                Plan::Aggregate(Aggregate::PendingItemsByProduct) => build.pending_items_aggregate(table).await?,
                Plan::Aggregate(Aggregate::OrdersByCustomer) => build.customer_orders_aggregate(table).await?,
                Plan::History => {}
            }
        }
        build.compact(&self.catalog).await?;
        // Readers pin the versions named here: they never see a half-built model.
        build.write_manifest(&self.model_tables()).await?;
        let mut report = build.report;
        report.elapsed = started.elapsed();
        Ok(report)
    }
}

impl std::future::IntoFuture for ModelBuild {
    type Output = Result<ModelReport>;
    type IntoFuture = futures::future::BoxFuture<'static, Self::Output>;

    fn into_future(self) -> Self::IntoFuture {
        Box::pin(self.run())
    }
}
