//! The reports as SQL text: over plain relations (the same text runs on PostgreSQL and DuckDB
//! as baselines and oracles), over the maintained aggregate, and over the star schema (what a
//! [`crate::Warehouse`] runs).

use super::*;

/// R1 in SQL over a relation `orders` (the same text runs on PostgreSQL as the oracle).
pub fn open_orders_sql(orders: &str, filter: &StatusFilter) -> String {
    format!(
        "SELECT delivery_date, status, count(*) AS quantity FROM {orders} o WHERE {} \
         GROUP BY delivery_date, status ORDER BY delivery_date NULLS LAST, status NULLS LAST",
        filter.predicate()
    )
}

/// R1 over the aggregate of current orders per (delivery_date, status).
pub fn open_orders_from_aggregate_sql(aggregate: &str, filter: &StatusFilter) -> String {
    format!(
        "SELECT delivery_date, status, CAST(sum(orders) AS BIGINT) AS quantity FROM {aggregate} o WHERE {} \
         GROUP BY delivery_date, status ORDER BY delivery_date NULLS LAST, status NULLS LAST",
        filter.predicate()
    )
}

/// R2 over the aggregate of current orders per (delivery_date, status).
pub fn top_delivery_dates_from_aggregate_sql(aggregate: &str, limit: usize) -> String {
    format!(
        "SELECT delivery_date, CAST(sum(orders) AS BIGINT) AS quantity FROM {aggregate} o \
         WHERE status <> 'COMPLETED' GROUP BY delivery_date \
         ORDER BY quantity DESC, delivery_date ASC NULLS LAST LIMIT {limit}"
    )
}

/// R2 in SQL.
pub fn top_delivery_dates_sql(orders: &str, limit: usize) -> String {
    format!(
        "SELECT delivery_date, count(*) AS quantity FROM {orders} o WHERE status <> 'COMPLETED' \
         GROUP BY delivery_date ORDER BY quantity DESC, delivery_date ASC NULLS LAST LIMIT {limit}"
    )
}

/// R3 in SQL.
pub fn pending_items_sql(orders: &str, items: &str) -> String {
    format!(
        "SELECT i.product_id, CAST(sum(i.quanity) AS BIGINT) AS total_items FROM {items} i \
         JOIN {orders} o ON o.order_id = i.order_id WHERE o.status <> 'COMPLETED' \
         GROUP BY i.product_id ORDER BY total_items DESC, i.product_id ASC NULLS LAST"
    )
}

/// R4 in SQL.
pub fn top_customers_sql(orders: &str, customers: &str, filter: &StatusFilter, limit: usize) -> String {
    format!(
        "WITH counts AS (SELECT customer_id, count(*) AS quantity FROM {orders} o WHERE {} GROUP BY customer_id), \
         ranked AS (SELECT customer_id, quantity, CAST(dense_rank() OVER (ORDER BY quantity DESC) AS BIGINT) AS ranking \
           FROM counts) \
         SELECT r.customer_id, c.customer_name, r.quantity, r.ranking FROM ranked r \
         LEFT JOIN {customers} c ON c.customer_id = r.customer_id \
         WHERE r.ranking <= {limit} ORDER BY r.ranking, r.customer_id NULLS LAST",
        filter.predicate()
    )
}

impl StatusFilter {
    /// The filter over `fact_orders` (alias `o`): its status flags, or the status itself.
    pub(crate) fn star_predicate(&self) -> String {
        match self {
            StatusFilter::Open => "o.is_open".to_string(),
            StatusFilter::Pending => "o.is_pending".to_string(),
            StatusFilter::Status(s) => format!("o.status = '{}'", s.replace('\'', "''")),
        }
    }
}

/// R1 over the star schema: `fact_orders` rows in force (`valid`, alias `o`).
pub(crate) fn star_open_orders_sql(valid: &str, filter: &StatusFilter) -> String {
    format!(
        "SELECT o.delivery_date, o.status, count(*) AS quantity FROM fact_orders o WHERE {valid} AND {} \
         GROUP BY o.delivery_date, o.status ORDER BY o.delivery_date NULLS LAST, o.status NULLS LAST",
        filter.star_predicate()
    )
}

/// R2 over the star schema.
pub(crate) fn star_top_delivery_dates_sql(valid: &str, limit: usize) -> String {
    format!(
        "SELECT o.delivery_date, count(*) AS quantity FROM fact_orders o WHERE {valid} AND o.is_open \
         GROUP BY o.delivery_date ORDER BY quantity DESC, o.delivery_date ASC NULLS LAST LIMIT {limit}"
    )
}

/// R3 over the star schema: item rows (`i`) and order rows (`o`) in force, of open orders.
pub(crate) fn star_pending_items_sql(valid_items: &str, valid_orders: &str) -> String {
    format!(
        "SELECT i.product_id, CAST(sum(i.quantity) AS BIGINT) AS total_items FROM fact_order_items i \
         JOIN fact_orders o ON o.order_id = i.order_id WHERE {valid_items} AND {valid_orders} AND o.is_open \
         GROUP BY i.product_id ORDER BY total_items DESC, i.product_id ASC NULLS LAST"
    )
}

/// R4 over the star schema: orders in force (`o`) per customer, named by the customer
/// dimension's version in force (`c`, joined on the customer's durable key).
pub(crate) fn star_top_customers_sql(
    valid_orders: &str,
    valid_customers: &str,
    filter: &StatusFilter,
    limit: usize,
) -> String {
    let counts = format!(
        "SELECT o.customer_id, count(*) AS quantity FROM fact_orders o WHERE {valid_orders} AND {} GROUP BY o.customer_id",
        filter.star_predicate()
    );
    ranked_customers_sql(&counts, valid_customers, limit)
}

/// R4 from `counts` (SQL of orders per customer: `customer_id`, `quantity`), dense-ranked and
/// named by the customer dimension's version in force (`c`, joined on the durable key).
pub(crate) fn ranked_customers_sql(counts: &str, valid_customers: &str, limit: usize) -> String {
    format!(
        "WITH counts AS ({counts}), \
         ranked AS (SELECT customer_id, quantity, CAST(dense_rank() OVER (ORDER BY quantity DESC) AS BIGINT) AS ranking \
           FROM counts) \
         SELECT r.customer_id, c.customer_name, r.quantity, r.ranking FROM ranked r \
         LEFT JOIN dim_customer c ON c.customer_id = r.customer_id AND c.customer_sk >= 0 AND {valid_customers} \
         WHERE r.ranking <= {limit} ORDER BY r.ranking, r.customer_id NULLS LAST"
    )
}
