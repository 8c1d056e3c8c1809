//! The reference answers: the four reports asked of the source tables directly, in SQL written
//! here from the definitions in the domain description (`ACME.md`), not from acme's own query
//! builders, so that a wrong definition in acme (what "open" means, the row order, the tie
//! rules of the dense rank) shows up as a difference.
//!
//! Answers are rendered as text rows, one string per row: the columns joined by `|`, NULL as
//! `∅`, dates as `YYYY-MM-DD`. [`render_batches`] renders acme's Arrow answers the same way.

use arrow::array::RecordBatch;
use arrow::util::display::{ArrayFormatter, FormatOptions};

use crate::{HarnessError, Result};

/// How a NULL is rendered.
pub const NULL: &str = "∅";

/// The reports in the order [`source_reports`] returns them, by name: R1 over open orders, R1
/// over pending orders, R2 (top `limit` delivery dates), R3, R4 over pending orders (ranks up
/// to `limit`).
pub const REPORTS: [&str; 5] = ["R1 open", "R1 pending", "R2", "R3", "R4 pending"];

/// The SQL of the reports named in [`REPORTS`], over the `operations` schema.
///
/// - An order is open while its status is not `COMPLETED`, pending while it is `PENDING`.
/// - R1: open (or pending) orders counted per delivery date and status, by delivery date, then
///   status.
/// - R2: the `limit` delivery dates with the most open orders, most first, then by date.
/// - R3: the item quantities of open orders summed per product, largest first, then by product.
/// - R4: customers by their number of pending orders, dense-ranked (equal counts share a rank),
///   every customer ranked `limit` or better, by rank then customer id; an order's customer
///   that does not exist keeps its id with no name.
pub fn report_sql(limit: usize) -> [String; 5] {
    let r1 = |predicate: &str| {
        format!(
            "SELECT delivery_date, status, count(*) FROM operations.orders WHERE {predicate} \
             GROUP BY delivery_date, status ORDER BY delivery_date ASC NULLS LAST, status ASC NULLS LAST"
        )
    };
    [
        r1("status <> 'COMPLETED'"),
        r1("status = 'PENDING'"),
        format!(
            "SELECT delivery_date, count(*) AS n FROM operations.orders WHERE status <> 'COMPLETED' \
             GROUP BY delivery_date ORDER BY n DESC, delivery_date ASC NULLS LAST LIMIT {limit}"
        ),
        "SELECT items.product_id, sum(items.quanity) AS total \
         FROM operations.order_items items \
         WHERE EXISTS (SELECT 1 FROM operations.orders o WHERE o.order_id = items.order_id \
           AND o.status <> 'COMPLETED') \
         GROUP BY items.product_id ORDER BY total DESC, items.product_id ASC NULLS LAST"
            .to_string(),
        format!(
            "SELECT per_customer.customer_id, \
               (SELECT c.customer_name FROM operations.customers c WHERE c.customer_id = per_customer.customer_id), \
               per_customer.n, per_customer.rank \
             FROM (SELECT customer_id, count(*) AS n, dense_rank() OVER (ORDER BY count(*) DESC) AS rank \
                   FROM operations.orders WHERE status = 'PENDING' GROUP BY customer_id) per_customer \
             WHERE per_customer.rank <= {limit} \
             ORDER BY per_customer.rank, per_customer.customer_id ASC NULLS LAST"
        ),
    ]
}

/// The reports of [`REPORTS`] as the source answers them now, rendered as text rows.
pub async fn source_reports(client: &tokio_postgres::Client, limit: usize) -> Result<Vec<Vec<String>>> {
    let mut out = Vec::with_capacity(REPORTS.len());
    for sql in report_sql(limit) {
        // The simple query protocol returns every value in PostgreSQL's text form.
        let mut rows = Vec::new();
        let messages = client
            .simple_query(&sql)
            .await
            .map_err(|source| HarnessError::Sql { what: format!("the oracle's query {sql}"), source })?;
        for message in messages {
            if let tokio_postgres::SimpleQueryMessage::Row(row) = message {
                let cells: Vec<&str> = (0..row.len()).map(|i| row.get(i).unwrap_or(NULL)).collect();
                rows.push(cells.join("|"));
            }
        }
        out.push(rows);
    }
    Ok(out)
}

/// Arrow record batches rendered like [`source_reports`]' rows.
pub fn render_batches(batches: &[RecordBatch]) -> std::result::Result<Vec<String>, arrow::error::ArrowError> {
    let options = FormatOptions::default().with_null(NULL);
    let mut out = Vec::new();
    for batch in batches {
        let formatters = batch
            .columns()
            .iter()
            .map(|c| ArrayFormatter::try_new(c.as_ref(), &options))
            .collect::<std::result::Result<Vec<_>, _>>()?;
        for row in 0..batch.num_rows() {
            let cells: Vec<String> = formatters.iter().map(|f| f.value(row).to_string()).collect();
            out.push(cells.join("|"));
        }
    }
    Ok(out)
}
