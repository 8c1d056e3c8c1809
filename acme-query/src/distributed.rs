//! The reports and ad-hoc SQL on an Apache Ballista cluster (feature `ballista`).
//!
//! A [`DistributedWarehouse`] pins every model table (the SCD2 histories, the aggregate and the
//! star schema) to the version the last complete model build recorded (`_acme/model.json`), and
//! registers each as a Parquet listing of exactly that version's data files in a Ballista
//! session. The scheduler plans every query over those files and its executors scan them from
//! object storage, so a query never mixes model versions and never reads a file a later build
//! added. The answers are the embedded [`crate::Warehouse`]'s at the model's position
//! ([`DistributedWarehouse::model_position`]): the stored star tables are complete at that
//! position, and no reader has to apply anything to them. Changes committed to the raw layer
//! after it reach the cluster with the next model build (the embedded warehouse applies them on
//! read, which needs acme's in-process state).
//!
//! Object-store settings travel with each query: S3 options given to
//! [`DistributedWarehouse::connect`] (`aws_endpoint`, `aws_region`, `aws_access_key_id`,
//! `aws_secret_access_key`, `aws_session_token`, `aws_allow_http`) become the session's
//! `s3.*` settings, which Ballista's S3 object-store registry
//! (`ballista_core::object_store`) applies on the scheduler and on every executor. Without
//! them, the scheduler and executors use their own `AWS_*` environment. Any Ballista 55
//! scheduler and executor started with that registry (the stock `ballista-scheduler` and
//! `ballista-executor` programs, or acme's `ballista_scheduler` and `ballista_executor`
//! examples) can serve it. The settings, keys included, are sent to the scheduler with each
//! query: use TLS or a private network between the client and the cluster.
//!
//! ```no_run
//! # async fn demo() -> Result<(), acme_query::QueryError> {
//! use std::collections::HashMap;
//! use acme_query::StatusFilter;
//! use acme_query::distributed::DistributedWarehouse;
//! let options = HashMap::from([("aws_region".to_string(), "eu-west-1".to_string())]);
//! let cluster = DistributedWarehouse::connect("df://scheduler:50050", "s3://acme/warehouse", options).await?;
//! for row in cluster.open_orders(StatusFilter::Open, None).await? {
//!     println!("{:?} {:?} {}", row.delivery_date, row.status, row.quantity);
//! }
//! cluster.sql("SELECT count(*) FROM orders_current").await?.show().await?;
//! # Ok(()) }
//! ```

use acme_core::storage::{Manifest, manifests};
use acme_core::{Layer, Lsn, Storage};
use acme_model::{Catalog, tables};
use arrow::array::RecordBatch;
use ballista::prelude::SessionContextExt;
use ballista_core::object_store::{S3Options, session_config_with_s3_support};
use chrono::{DateTime, Utc};
use datafusion::execution::SessionStateBuilder;
use datafusion::prelude::{DataFrame, SessionConfig, SessionContext};
use std::collections::HashMap;
use tracing::Instrument;

use crate::reports::{
    check_limit, conform, customer_rank_rows, delivery_date_rows, open_orders_rows, product_items_rows, report_fields,
    validity,
};
use crate::sql::*;
use crate::{CustomerRank, DeliveryDateLoad, OpenOrders, ProductItems, QueryError, Report, Result, StatusFilter};

/// acme's S3 storage options and the Ballista session settings (`s3.*`) they become.
const S3_SETTINGS: [(&str, &str); 6] = [
    ("aws_endpoint", "endpoint"),
    ("aws_region", "region"),
    ("aws_access_key_id", "access_key_id"),
    ("aws_secret_access_key", "secret_access_key"),
    ("aws_session_token", "session_token"),
    ("aws_allow_http", "allow_http"),
];

/// A warehouse's model, queried on an Apache Ballista cluster (see the module documentation).
pub struct DistributedWarehouse {
    ctx: SessionContext,
    url: String,
    scheduler: String,
    manifest: Manifest,
    history_start: Option<i64>,
    has_aggregate: bool,
}

impl std::fmt::Debug for DistributedWarehouse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DistributedWarehouse")
            .field("url", &self.url)
            .field("scheduler", &self.scheduler)
            .field("model_position", &self.model_position())
            .finish()
    }
}

impl DistributedWarehouse {
    /// Connect to the Ballista scheduler at `scheduler_url` (`df://host:port`) and pin the
    /// model of the warehouse at `warehouse_url` (`s3://...`, or a path every executor can
    /// read) to its last complete build. `options` are the warehouse's object-store options,
    /// as for [`crate::Warehouse::open_with_options`]. The session has
    /// [`DistributedWarehouse::default_session_config`]'s settings.
    ///
    /// Fails with [`QueryError::MissingTable`] when the warehouse has no model yet, and with
    /// [`QueryError::Cluster`] when the cluster cannot answer.
    pub async fn connect(scheduler_url: &str, warehouse_url: &str, options: HashMap<String, String>) -> Result<Self> {
        Self::connect_with_config(scheduler_url, warehouse_url, options, Self::default_session_config()).await
    }

    /// Ballista's session settings (16 partitions per stage, among others), its S3 settings
    /// (`s3.*`), and acme's join settings (see [`crate::Warehouse::default_session_config`]).
    /// Every setting goes to the scheduler with each query.
    pub fn default_session_config() -> SessionConfig {
        let mut config = session_config_with_s3_support();
        let optimizer = &mut config.options_mut().optimizer;
        optimizer.hash_join_single_partition_threshold = crate::BROADCAST_JOIN_BYTES;
        optimizer.hash_join_single_partition_threshold_rows = crate::BROADCAST_JOIN_ROWS;
        config
    }

    /// [`DistributedWarehouse::connect`] with the caller's session settings, for example
    /// `default_session_config().with_target_partitions(n)` to split each stage into as many
    /// tasks as the cluster has task slots. The S3 settings from `options` are added to it.
    pub async fn connect_with_config(
        scheduler_url: &str,
        warehouse_url: &str,
        options: HashMap<String, String>,
        config: SessionConfig,
    ) -> Result<Self> {
        let storage = Storage::new(warehouse_url, options.clone())?;
        let missing =
            |table: &str| QueryError::MissingTable { url: warehouse_url.to_string(), table: table.to_string() };
        let Some(manifest) = storage.get_manifest(manifests::MODEL).await? else {
            return Err(missing("_acme/model.json"));
        };
        let mut config = config;
        if config.options().extensions.get::<S3Options>().is_none() {
            config = config.with_option_extension(S3Options::default());
        }
        for (option, setting) in S3_SETTINGS {
            if let Some(value) = options.get(option).or_else(|| options.get(&option.to_ascii_uppercase())) {
                config.options_mut().set(&format!("s3.{setting}"), value)?;
            }
        }
        let state = SessionStateBuilder::new().with_config(config).with_default_features().build();
        let ctx = SessionContext::remote_with_state(scheduler_url, state).await?;
        let catalog = Catalog::acme();
        let mut found = Vec::new();
        for table in catalog.tables() {
            let Some(pinned) = storage.open_pinned(table.layer, table.name, Some(&manifest)).await? else {
                continue;
            };
            if pinned.data_files()?.iter().any(|f| f.deletion_vector.is_some()) {
                return Err(QueryError::DeletionVectors { table: pinned.name().to_string() });
            }
            // Plain strings, not views: a view array sliced out of a batch carries the whole batch's
            // string buffers through every shuffle and result (R4 at SF1: 2.2 s with views).
            ctx.register_table(table.name, pinned.plain_provider()?)?;
            found.push(table.name);
        }
        for name in [tables::FACT_ORDERS, tables::FACT_ORDER_ITEMS, tables::DIM_CUSTOMER] {
            if !found.contains(&name) {
                return Err(missing(&format!("{}/{name}", Layer::Presentation.dir())));
            }
        }
        for spec in catalog.history_specs() {
            let history = spec.history_table();
            if found.iter().any(|t| *t == history) {
                let predicate = acme_model::history::state_predicate(None);
                let view = ctx.sql(&format!("SELECT * FROM {history} WHERE {predicate}")).await?;
                ctx.register_table(format!("{}_current", spec.table).as_str(), view.into_view())?;
            }
        }
        // The first query: it reaches the scheduler, and the executors read the warehouse.
        let history_start =
            crate::tail::first_valid_from(&ctx, "orders_history").await.map_err(|e| QueryError::Cluster {
                scheduler: scheduler_url.to_string(),
                warehouse: warehouse_url.to_string(),
                message: e.to_string(),
            })?;
        tracing::debug!(
            scheduler = scheduler_url,
            warehouse = warehouse_url,
            model_position = manifest.position,
            tables = found.len(),
            "connected to a Ballista cluster"
        );
        Ok(Self {
            ctx,
            url: warehouse_url.to_string(),
            scheduler: scheduler_url.to_string(),
            has_aggregate: found.contains(&tables::AGG_ORDERS_BY_DELIVERY_DATE),
            manifest,
            history_start,
        })
    }

    /// The source position (commit LSN) the answers are at: the pinned model build's.
    pub fn model_position(&self) -> Lsn {
        Lsn::from_stored(self.manifest.position)
    }

    /// The first instant the history covers.
    pub fn history_start(&self) -> Option<DateTime<Utc>> {
        self.history_start.and_then(DateTime::from_timestamp_micros)
    }

    /// The Ballista session, with the model tables registered, for custom use.
    pub fn context(&self) -> &SessionContext {
        &self.ctx
    }

    /// Run ad-hoc SQL on the cluster over the model tables (`<table>_history`,
    /// `<table>_current`, the aggregate and the star schema).
    pub async fn sql(&self, sql: &str) -> Result<DataFrame> {
        let span =
            tracing::debug_span!("query", report = "sql", engine = "ballista", position = self.manifest.position);
        Ok(self.ctx.sql(sql).instrument(span).await?)
    }

    /// The SQL the cluster runs for `report` (now, or as of an instant).
    pub fn report_sql(&self, report: &Report, as_of: Option<DateTime<Utc>>) -> Result<String> {
        let valid = |alias: &str| validity(alias, as_of, self.history_start);
        let aggregate = (as_of.is_none() && self.has_aggregate).then_some(tables::AGG_ORDERS_BY_DELIVERY_DATE);
        Ok(match report {
            Report::OpenOrders(filter) => match aggregate {
                Some(agg) => open_orders_from_aggregate_sql(agg, filter),
                None => star_open_orders_sql(&valid("o")?, filter),
            },
            Report::TopDeliveryDates { limit } => {
                check_limit(*limit)?;
                match aggregate {
                    Some(agg) => top_delivery_dates_from_aggregate_sql(agg, *limit),
                    None => star_top_delivery_dates_sql(&valid("o")?, *limit),
                }
            }
            Report::PendingItemsByProduct => star_pending_items_sql(&valid("i")?, &valid("o")?),
            Report::TopCustomers { limit, filter } => {
                check_limit(*limit)?;
                star_top_customers_sql(&valid("o")?, &valid("c")?, filter, *limit)
            }
        })
    }

    /// One report as Arrow record batches, with the same columns as
    /// [`crate::Warehouse::report_batches`].
    pub async fn report_batches(&self, report: &Report, as_of: Option<DateTime<Utc>>) -> Result<Vec<RecordBatch>> {
        let span = tracing::debug_span!(
            "query",
            report = report.name(),
            engine = "ballista",
            as_of = as_of.map(|t| tracing::field::display(t.to_rfc3339())),
            position = self.manifest.position,
        );
        let sql = self.report_sql(report, as_of)?;
        let batches = async { self.ctx.sql(&sql).await?.collect().await }.instrument(span).await.map_err(|e| {
            QueryError::Cluster {
                scheduler: self.scheduler.clone(),
                warehouse: self.url.clone(),
                message: e.to_string(),
            }
        })?;
        conform(batches, report_fields(report))
    }

    /// R1 (see [`crate::Warehouse::open_orders`]).
    pub async fn open_orders(&self, filter: StatusFilter, as_of: Option<DateTime<Utc>>) -> Result<Vec<OpenOrders>> {
        Ok(open_orders_rows(&self.report_batches(&Report::OpenOrders(filter), as_of).await?))
    }

    /// R2 (see [`crate::Warehouse::top_delivery_dates`]).
    pub async fn top_delivery_dates(
        &self,
        limit: usize,
        as_of: Option<DateTime<Utc>>,
    ) -> Result<Vec<DeliveryDateLoad>> {
        Ok(delivery_date_rows(&self.report_batches(&Report::TopDeliveryDates { limit }, as_of).await?))
    }

    /// R3 (see [`crate::Warehouse::pending_items_by_product`]).
    pub async fn pending_items_by_product(&self, as_of: Option<DateTime<Utc>>) -> Result<Vec<ProductItems>> {
        Ok(product_items_rows(&self.report_batches(&Report::PendingItemsByProduct, as_of).await?))
    }

    /// R4 (see [`crate::Warehouse::top_customers`]).
    pub async fn top_customers(
        &self,
        limit: usize,
        filter: StatusFilter,
        as_of: Option<DateTime<Utc>>,
    ) -> Result<Vec<CustomerRank>> {
        Ok(customer_rank_rows(&self.report_batches(&Report::TopCustomers { limit, filter }, as_of).await?))
    }
}
