//! The model catalog: every model table declared once.
//!
//! For each table the catalog gives its layer, name, key, the order its rows are stored in,
//! whether open and closed rows live in separate files, the source tables whose changes
//! change it, how a build finds its changed keys, and its plan. The model build
//! ([`crate::ModelBuild`]), compaction, the live maintenance of the reports and the
//! `Warehouse`'s registration all iterate [`Catalog::tables`]: adding a model table is one
//! entry in [`MODEL`] (and its SQL in [`crate::star`]).
//!
//! ```
//! use acme_model::catalog::{Catalog, Plan};
//! let catalog = Catalog::acme();
//! let orders = catalog.get("fact_orders").expect("declared");
//! assert_eq!(orders.key, "order_id");
//! assert_eq!(orders.sources, ["orders", "customers"]);
//! // A warehouse replicating only some tables gets their histories and the star tables
//! // computed from them alone.
//! let some = Catalog::for_sources(&["customers".to_string(), "orders".to_string()]);
//! let names: Vec<&str> = some.tables().iter().map(|t| t.name).collect();
//! assert_eq!(
//!     names,
//!     ["customers_history", "orders_history", "dim_customer", "fact_order_status", "fact_orders", "agg_orders_by_delivery_date", "agg_orders_by_customer"]
//! );
//! assert!(matches!(orders.plan, Plan::Fact { .. }));
//! // Histories come first: every star table reads them.
//! assert_eq!(catalog.tables()[0].name, "customers_history");
//! ```

use acme_core::{CompactOptions, Layer};

use crate::error::{ModelError, Result};
use crate::history::{self, HistorySpec};
use crate::star;

/// Names of the presentation tables.
pub mod tables {
    /// Customer dimension with history and surrogate keys (`customer_sk`; -1 = unknown member).
    pub const DIM_CUSTOMER: &str = "dim_customer";
    /// Product dimension with history and surrogate keys (`product_sk`; -1 = unknown member).
    pub const DIM_PRODUCT: &str = "dim_product";
    /// One row per order status transition: when the order entered and left each status.
    pub const FACT_ORDER_STATUS: &str = "fact_order_status";
    /// One row per order version, valid from-to: status (degenerate dimension with the
    /// `is_open` and `is_pending` flags), delivery date, customer.
    pub const FACT_ORDERS: &str = "fact_orders";
    /// One row per order item version, valid from-to, with the product version, unit price and
    /// amount in force when the order was placed.
    pub const FACT_ORDER_ITEMS: &str = "fact_order_items";
    /// Aggregate: current orders per (delivery_date, status), for R1 and R2.
    pub const AGG_ORDERS_BY_DELIVERY_DATE: &str = "agg_orders_by_delivery_date";
    /// Aggregate: R3 on the current state, per product id: the sum of the quantities of the
    /// current items of current open orders (`total_items`), how many of those quantities are
    /// not null (`counted`), and how many such items there are (`items`, always positive).
    pub const AGG_PENDING_ITEMS_BY_PRODUCT: &str = "agg_pending_items_by_product";
    /// Aggregate: current orders per (customer_id, status), for R4.
    pub const AGG_ORDERS_BY_CUSTOMER: &str = "agg_orders_by_customer";
}

/// Which aggregate an [`Plan::Aggregate`] table is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Aggregate {
    /// [`tables::AGG_ORDERS_BY_DELIVERY_DATE`].
    OrdersByDeliveryDate,
    /// [`tables::AGG_PENDING_ITEMS_BY_PRODUCT`].
    PendingItemsByProduct,
    /// [`tables::AGG_ORDERS_BY_CUSTOMER`].
    OrdersByCustomer,
}

/// How a model table is computed.
#[derive(Debug, Clone, Copy)]
pub enum Plan {
    /// The SCD type-2 history of a source table, from its raw changes.
    History,
    /// A dimension with history and surrogate keys numbered in commit order: `sql(previous,
    /// base, scope)` ([`star::dim_customer_sql`]).
    Dimension {
        /// The surrogate key column (-1 is the Unknown member).
        surrogate_key: &'static str,
        /// The statement.
        sql: fn(Option<&str>, i64, Option<&str>) -> String,
    },
    /// A fact table keyed by [`ModelTable::key`]: `sql(scope)` computes the rows of the keys in
    /// `scope`, or every row.
    Fact {
        /// The statement.
        sql: fn(Option<&str>) -> String,
        /// The predicate selecting rows that point at an Unknown dimension member (rows a
        /// late-arriving dimension row resolves).
        unknown_member: Option<&'static str>,
    },
    /// `fact_order_status`: a fact whose full build first collects the orders that entered
    /// more than one status ([`star::fact_order_status_sql`]).
    StatusTransitions,
    /// An aggregate maintained by difference.
    Aggregate(Aggregate),
}

/// One way a build finds the keys of a model table to recompute since the table's position.
/// In its statements `{changed}` stands for "a version opened or closed after the position"
/// and `{position}` for the position.
#[derive(Debug, Clone, Copy)]
pub enum Changed {
    /// The keys `key` of the history `history` with a version opened or closed after the
    /// position. When the history's own step in the same build started from that position,
    /// they are the keys it applied raw changes to, taken from it instead of read again.
    History {
        /// The history table.
        history: &'static str,
        /// Its key column.
        key: &'static str,
    },
    /// A statement returning the keys.
    Query(&'static str),
    /// The keys of the stored rows of `table` whose integer column `by` holds one of the
    /// values `query` returns, read through the pages of `table`'s key index on `by` (about
    /// one page per value) instead of a join the engine would probe over every row.
    Lookup {
        /// A statement returning values of `by`.
        query: &'static str,
        /// The stored table looked in, as it stood at the position.
        table: &'static str,
        /// The integer column looked up.
        by: &'static str,
    },
}

impl Changed {
    /// The statement, with `{changed}` and `{position}` standing for the position `from`.
    pub fn query_since(&self, from: i64) -> String {
        let query = match self {
            Changed::History { history, key } => format!("SELECT {key} FROM {history} WHERE {{changed}}"),
            Changed::Query(query) | Changed::Lookup { query, .. } => query.to_string(),
        };
        query
            .replace("{changed}", &format!("valid_from_lsn > {from} OR valid_to_lsn > {from}"))
            .replace("{position}", &from.to_string())
    }
}

/// One model table (see the module documentation).
#[derive(Debug, Clone, Copy)]
pub struct ModelTable {
    /// Layer: intermediate for histories, presentation for the star schema.
    pub layer: Layer,
    /// Table name.
    pub name: &'static str,
    /// The key its rows are recomputed and replaced by.
    pub key: &'static str,
    /// The order its rows are stored in (builds write in it, compaction merges in it, key
    /// lookups read only the pages of their keys).
    pub sort: &'static [&'static str],
    /// A boolean column splitting open rows from closed ones into separate files, so that
    /// closed rows are written once.
    pub split: Option<&'static str>,
    /// The source tables whose changes change it, its own first.
    pub sources: &'static [&'static str],
    /// How a build finds the keys to recompute (their union). Histories find theirs in the raw
    /// changes.
    pub changed: &'static [Changed],
    /// How it is computed.
    pub plan: Plan,
}

impl ModelTable {
    /// The table's own source table (a history's, or the one whose key a star table shares).
    pub fn source(&self) -> &'static str {
        self.sources[0]
    }

    /// Whether the table's rows are recomputed per key by its own statement (the dimensions
    /// and facts), which is how the reports keep it live between builds.
    pub fn recomputed_per_key(&self) -> bool {
        matches!(self.plan, Plan::Dimension { .. } | Plan::Fact { .. } | Plan::StatusTransitions)
    }

    /// The surrogate key, for a dimension.
    pub fn surrogate_key(&self) -> Option<&'static str> {
        match self.plan {
            Plan::Dimension { surrogate_key, .. } => Some(surrogate_key),
            _ => None,
        }
    }

    /// The predicate selecting rows with an Unknown dimension member, for a fact.
    pub fn unknown_member(&self) -> Option<&'static str> {
        match self.plan {
            Plan::Fact { unknown_member, .. } => unknown_member,
            _ => None,
        }
    }

    /// The table's statement scoped to the key relation `scope` (a dimension numbers new
    /// versions after `base`, keeping the keys `previous` gave), or whole (`scope` None).
    /// Histories and aggregates have no such statement.
    pub fn statement(&self, previous: Option<&str>, base: i64, scope: Option<&str>) -> Option<String> {
        match self.plan {
            Plan::Dimension { sql, .. } => Some(sql(previous, base, scope)),
            Plan::Fact { sql, .. } => Some(sql(scope)),
            Plan::StatusTransitions => Some(star::fact_order_status_sql(scope, None)),
            Plan::History | Plan::Aggregate(_) => None,
        }
    }

    /// What to build the history from, for a history.
    pub fn history_spec(&self) -> Option<HistorySpec> {
        matches!(self.plan, Plan::History).then(|| HistorySpec::new(self.source(), self.key))
    }

    /// How compaction merges this table's files.
    pub fn compact_options(&self, target_file_bytes: u64, file_rows: u64) -> CompactOptions {
        let mut options = CompactOptions::sorted_by(self.sort);
        if let Some(split) = self.split {
            options = options.split_by(split);
        }
        CompactOptions { target_file_bytes, file_rows: Some(file_rows), ..options }
    }
}

/// A statement for [`Changed::Lookup`]: the keys `$key` of the history `$history` whose
/// first visible version (not a tombstone, not opened and closed by one transaction) opened
/// after the position, among those with a version changed since.
macro_rules! first_visible_version_new {
    ($history:literal, $key:literal) => {
        concat!(
            "SELECT ",
            $key,
            " FROM ",
            $history,
            " WHERE ({changed}) AND NOT is_deleted ",
            "AND (valid_to_lsn IS NULL OR valid_to_lsn > valid_from_lsn) ",
            "GROUP BY ",
            $key,
            " HAVING min(valid_from_lsn) > {position}"
        )
    };
}

/// A history (intermediate layer) of `source`, keyed by `key`, stored by key and version.
const fn history(name: &'static str, source: &'static [&'static str], sort: &'static [&'static str]) -> ModelTable {
    ModelTable {
        layer: Layer::Intermediate,
        name,
        key: sort[0],
        sort,
        split: Some(history::IS_CURRENT),
        sources: source,
        changed: &[],
        plan: Plan::History,
    }
}

/// Every model table, in build order: the histories, then the star schema with dimensions
/// before the facts that look them up, the aggregates last.
pub const MODEL: [ModelTable; 12] = [
    history("customers_history", &["customers"], &["customer_id", history::VALID_FROM_LSN]),
    history("products_history", &["products"], &["product_id", history::VALID_FROM_LSN]),
    history("orders_history", &["orders"], &["order_id", history::VALID_FROM_LSN]),
    history("order_items_history", &["order_items"], &["order_item_id", history::VALID_FROM_LSN]),
    ModelTable {
        layer: Layer::Presentation,
        name: tables::DIM_CUSTOMER,
        key: "customer_id",
        sort: &["customer_sk"],
        split: None,
        sources: &["customers"],
        changed: &[Changed::History { history: "customers_history", key: "customer_id" }],
        plan: Plan::Dimension { surrogate_key: "customer_sk", sql: star::dim_customer_sql },
    },
    ModelTable {
        layer: Layer::Presentation,
        name: tables::DIM_PRODUCT,
        key: "product_id",
        sort: &["product_sk"],
        split: None,
        sources: &["products"],
        changed: &[Changed::History { history: "products_history", key: "product_id" }],
        plan: Plan::Dimension { surrogate_key: "product_sk", sql: star::dim_product_sql },
    },
    ModelTable {
        layer: Layer::Presentation,
        name: tables::FACT_ORDER_STATUS,
        key: "order_id",
        sort: &["order_id", "entered_lsn"],
        split: None,
        sources: &["orders"],
        changed: &[Changed::History { history: "orders_history", key: "order_id" }],
        plan: Plan::StatusTransitions,
    },
    ModelTable {
        layer: Layer::Presentation,
        name: tables::FACT_ORDERS,
        key: "order_id",
        sort: &["order_id", "valid_from_lsn"],
        split: None,
        sources: &["orders", "customers"],
        changed: &[
            Changed::History { history: "orders_history", key: "order_id" },
            // Orders waiting for a late customer that just arrived. An order names its
            // customer's first visible version when none was in force at its placing, so it
            // waits (the Unknown member) only while its customer has no visible version: only
            // customers whose first visible version is new resolve one. Found through the
            // pages of the stored orders' customer ids, as late products are below. That reads
            // little only where the waiting orders are few: in the generated data 1% of orders
            // name a missing customer, in every page, so it reads the whole column (0.15-0.35 s
            // a fold at SF10 under load, as the scan of `customer_sk` it replaced did).
            Changed::Lookup {
                query: first_visible_version_new!("customers_history", "customer_id"),
                table: tables::FACT_ORDERS,
                by: "customer_id",
            },
        ],
        plan: Plan::Fact { sql: star::fact_orders_sql, unknown_member: Some("customer_sk = -1") },
    },
    ModelTable {
        layer: Layer::Presentation,
        name: tables::FACT_ORDER_ITEMS,
        key: "order_item_id",
        sort: &["order_item_id", "valid_from_lsn"],
        split: None,
        sources: &["order_items", "products", "orders"],
        changed: &[
            Changed::History { history: "order_items_history", key: "order_item_id" },
            // Items that arrived before their order, whose order just arrived. An order with a
            // version opened at or before the position and changed since has that version closed
            // since, so the changed versions alone tell (a superset: an order truncated before
            // the position and inserted again after it counts as arrived, and its items are
            // recomputed to what they were), and the whole history is not read. The stored
            // items are found through the pages of their order ids: new orders' ids lie beyond
            // every stored page, so this reads about nothing (a join probed every stored item's
            // order id: 0.8-0.95 s at SF10 for no key).
            Changed::Lookup {
                query: "SELECT order_id FROM orders_history WHERE {changed} \
                        GROUP BY order_id HAVING min(valid_from_lsn) > {position}",
                table: tables::FACT_ORDER_ITEMS,
                by: "order_id",
            },
            // Items waiting for a late product that just arrived. Only a product's first visible
            // version covers items placed before it (from the beginning of time), so only
            // products whose first visible version is new resolve an Unknown member (a product
            // inserted and deleted in one transaction before the position left only invisible
            // versions and a tombstone, closed since); found as orders are above. New
            // products' ids lie beyond every stored page's product ids except the pages of the
            // items waiting for them (a scan of every stored item's `product_sk` cost 1.1-1.7 s a
            // fold at SF10 under load, for no key).
            Changed::Lookup {
                query: first_visible_version_new!("products_history", "product_id"),
                table: tables::FACT_ORDER_ITEMS,
                by: "product_id",
            },
        ],
        plan: Plan::Fact { sql: star::fact_order_items_sql, unknown_member: Some("product_sk = -1") },
    },
    ModelTable {
        layer: Layer::Presentation,
        name: tables::AGG_ORDERS_BY_DELIVERY_DATE,
        key: "orders",
        sort: &["delivery_date"],
        split: None,
        sources: &["orders"],
        changed: &[Changed::History { history: "orders_history", key: "order_id" }],
        plan: Plan::Aggregate(Aggregate::OrdersByDeliveryDate),
    },
    ModelTable {
        layer: Layer::Presentation,
        name: tables::AGG_ORDERS_BY_CUSTOMER,
        key: "customer_id",
        sort: &["customer_id", "status"],
        split: None,
        sources: &["orders", "customers"],
        changed: &[Changed::Query("SELECT order_id FROM fact_orders WHERE {changed}")],
        plan: Plan::Aggregate(Aggregate::OrdersByCustomer),
    },
    ModelTable {
        layer: Layer::Presentation,
        name: tables::AGG_PENDING_ITEMS_BY_PRODUCT,
        key: "product_id",
        sort: &["product_id"],
        split: None,
        sources: &["order_items", "products", "orders", "customers"],
        changed: &[
            Changed::Query("SELECT order_item_id FROM fact_order_items WHERE {changed}"),
            Changed::Query("SELECT order_id FROM fact_orders WHERE {changed}"),
        ],
        plan: Plan::Aggregate(Aggregate::PendingItemsByProduct),
    },
];

/// The model tables of one warehouse, in build order.
#[derive(Debug, Clone)]
pub struct Catalog {
    tables: Vec<ModelTable>,
    /// Configured source tables the model has no history for.
    unknown: Vec<String>,
}

impl Catalog {
    /// The model of the source tables `sources` (the `tables` setting): the history of each,
    /// and the star tables all of whose sources are among them.
    pub fn for_sources(sources: &[String]) -> Self {
        let known = |s: &str| sources.iter().any(|c| c == s);
        let tables = MODEL.into_iter().filter(|t| t.sources.iter().all(|s| known(s))).collect();
        let histories: Vec<&str> =
            MODEL.iter().filter(|t| matches!(t.plan, Plan::History)).map(|t| t.source()).collect();
        let unknown = sources.iter().filter(|s| !histories.contains(&s.as_str())).cloned().collect();
        Self { tables, unknown }
    }

    /// The whole ACME model.
    pub fn acme() -> Self {
        Self { tables: MODEL.to_vec(), unknown: Vec::new() }
    }

    /// Fails when a configured source table has no history in the catalog.
    pub fn check(&self) -> Result<()> {
        match self.unknown.first() {
            Some(table) => Err(ModelError::NoModelKey { table: table.clone() }),
            None => Ok(()),
        }
    }

    /// Every model table, histories first, then the star schema in dependency order.
    pub fn tables(&self) -> &[ModelTable] {
        &self.tables
    }

    /// The table called `name`.
    pub fn get(&self, name: &str) -> Option<&ModelTable> {
        self.tables.iter().find(|t| t.name == name)
    }

    /// The histories, as what to build them from.
    pub fn history_specs(&self) -> Vec<HistorySpec> {
        self.tables.iter().filter_map(ModelTable::history_spec).collect()
    }

    /// The star tables.
    pub fn star(&self) -> impl Iterator<Item = &ModelTable> {
        self.tables.iter().filter(|t| !matches!(t.plan, Plan::History))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_history_is_named_after_its_source_and_every_source_has_a_history() {
        let catalog = Catalog::acme();
        for table in catalog.tables() {
            if let Some(spec) = table.history_spec() {
                assert_eq!(table.name, spec.history_table());
                assert_eq!(table.sort[0], table.key);
            }
            for source in table.sources {
                assert!(catalog.history_specs().iter().any(|s| s.table == *source), "{source} has no history");
            }
        }
        // Dependency order: a star table comes after every dimension it looks up.
        let position = |name: &str| catalog.tables().iter().position(|t| t.name == name).expect("declared");
        assert!(position(tables::DIM_PRODUCT) < position(tables::FACT_ORDER_ITEMS));
        assert!(position(tables::DIM_CUSTOMER) < position(tables::FACT_ORDERS));
    }

    #[test]
    fn a_configured_table_without_a_history_is_named_in_the_error() {
        let catalog = Catalog::for_sources(&["customers".to_string(), "invoices".to_string()]);
        let error = catalog.check().expect_err("invoices has no history");
        assert!(error.to_string().contains("`invoices`"), "{error}");
        let names: Vec<&str> = catalog.tables().iter().map(|t| t.name).collect();
        assert_eq!(names, ["customers_history", "dim_customer"]);
    }
}
