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
//! With the `ballista` feature, `distributed::DistributedWarehouse` runs the same reports and
//! ad-hoc SQL on an Apache Ballista cluster, over the model's files in object storage, pinned
//! to the last complete model build.
//!
//! A warehouse without a model yet still opens; the reports say what is missing:
//!
//! ```
//! # #[tokio::main] async fn main() -> Result<(), acme_query::QueryError> {
//! use acme_query::{QueryError, StatusFilter, Warehouse};
//! let dir = tempfile::tempdir().expect("a temporary directory");
//! let warehouse = Warehouse::open(dir.path().to_str().expect("a UTF-8 path")).await?;
//! assert_eq!(warehouse.model_position(), None);
//! let missing = warehouse.open_orders(StatusFilter::Open, None).await.expect_err("no model yet");
//! assert!(matches!(missing, QueryError::MissingTable { .. }), "{missing}");
//! # Ok(()) }
//! ```
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
#[cfg(feature = "ballista")]
pub mod distributed;
mod live_star;
mod plans;
mod reports;
pub mod sql;
mod tail;
mod warehouse;

pub use builder::{Setup, WarehouseBuilder};
use sql::*;
use tail::*;
pub use tail::{MAX_MATERIALIZED_TAIL, MODEL_SCHEMA, TAIL_SCHEMA, Tail};
use warehouse::Shared;
pub use warehouse::{BROADCAST_JOIN_BYTES, BROADCAST_JOIN_ROWS, HELD_TAIL_GRACE, Warehouse};

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
    /// A distributed query failed on the Ballista cluster: the scheduler is not reachable, or
    /// its executors could not run the query (for example, could not read the warehouse).
    #[error(
        "the query on the Ballista cluster at {scheduler} failed: {message}. Check that the scheduler runs at that \
         address and has executors, and that they can read {warehouse} (the S3 settings go with each query)"
    )]
    Cluster {
        /// The scheduler's URL.
        scheduler: String,
        /// The warehouse queried.
        warehouse: String,
        /// What the cluster or the client library said.
        message: String,
    },
    /// A table read by a Ballista cluster has rows marked deleted by Delta deletion vectors,
    /// which the cluster's Parquet scan would return.
    #[error(
        "table `{table}` has rows marked deleted by deletion vectors, which a Ballista cluster's Parquet scan does \
         not apply: build the model with `AcmeConfig::deletion_vectors` set to false for a warehouse that a cluster \
         queries (steps then rewrite files), or compact the table with `CompactOptions::purge_fraction` 0.0 first"
    )]
    DeletionVectors {
        /// `layer/table`.
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
