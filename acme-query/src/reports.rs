//! The four reports as typed queries over the star schema, current and as of an instant.

use super::*;
use acme_core::Lsn;

impl Warehouse {
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
        validity(alias, as_of, self.history_start)
    }

    /// One report as Arrow record batches, with the seed's column names (see [`Report`]).
    pub async fn report_batches(&self, report: &Report, as_of: Option<DateTime<Utc>>) -> Result<Vec<RecordBatch>> {
        let span = tracing::debug_span!(
            "query",
            report = report.name(),
            as_of = as_of.map(|t| tracing::field::display(t.to_rfc3339())),
            position = self.raw_position().map(Lsn::as_stored),
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
        if let (Report::TopCustomers { limit, filter }, None, Some(counts)) =
            (report, as_of, self.star.as_ref().and_then(|s| s.customer_orders.as_ref()))
        {
            check_limit(*limit)?;
            self.valid("c", None)?;
            let ranked = live_star::top_customers(&self.ctx, counts, filter, *limit).instrument(span.clone()).await?;
            if ranked.len() <= MAX_NAMED_BY_LIST {
                return self.named_customers(&ranked).instrument(span).await;
            }
            // (Thousands of ranked customers: their names by the report's join, below.)
        }
        let (sql, fields) = self.report_plan(report, as_of)?;
        self.batches(&sql, fields).instrument(span).await
    }

    /// R4's rows from customers ranked in memory ((customer id, orders, rank), in the report's
    /// order), each with its current name: the customer's current `dim_customer` version, found
    /// by a query over those ids only (the stored dimension's files and pages that cannot hold
    /// them are skipped), as the report's join finds it.
    async fn named_customers(&self, ranked: &[(Option<i64>, i64, i64)]) -> Result<Vec<RecordBatch>> {
        use arrow::array::{Int64Array, StringArray};
        let mut ids: Vec<i64> = ranked.iter().filter_map(|(c, _, _)| *c).collect();
        ids.sort_unstable();
        ids.dedup();
        let mut names: HashMap<i64, Vec<String>> = HashMap::new();
        if !ids.is_empty() {
            let list = ids.iter().map(i64::to_string).collect::<Vec<_>>().join(", ");
            let sql = format!(
                "SELECT c.customer_id, c.customer_name FROM dim_customer c \
                 WHERE c.customer_sk >= 0 AND {} AND c.customer_id IN ({list})",
                self.valid("c", None)?
            );
            let fields = [("customer_id", DataType::Int64), ("customer_name", DataType::Utf8)];
            for batch in self.batches(&sql, &fields).await? {
                let (customers, found) =
                    (batch.column(0).as_primitive::<Int64Type>(), batch.column(1).as_string::<i32>());
                for i in 0..batch.num_rows() {
                    if customers.is_valid(i) && found.is_valid(i) {
                        names.entry(customers.value(i)).or_default().push(found.value(i).to_string());
                    }
                }
            }
        }
        // One row per name the join matches, or one with no name.
        let (mut customers, mut customer_names, mut orders, mut ranks) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for (customer, n, rank) in ranked {
            let matched = customer.and_then(|c| names.get(&c)).map(Vec::as_slice).unwrap_or_default();
            let row_names: Vec<Option<&str>> =
                if matched.is_empty() { vec![None] } else { matched.iter().map(|name| Some(name.as_str())).collect() };
            for name in row_names {
                customers.push(*customer);
                customer_names.push(name);
                orders.push(*n);
                ranks.push(*rank);
            }
        }
        let fields = report_fields(&Report::TopCustomers { limit: 1, filter: StatusFilter::Open });
        let schema =
            Arc::new(Schema::new(fields.iter().map(|(n, t)| Field::new(*n, t.clone(), true)).collect::<Vec<_>>()));
        let columns: Vec<arrow::array::ArrayRef> = vec![
            Arc::new(Int64Array::from(customers)),
            Arc::new(StringArray::from(customer_names)),
            Arc::new(Int64Array::from(orders)),
            Arc::new(Int64Array::from(ranks)),
        ];
        Ok(vec![RecordBatch::try_new(schema, columns)?])
    }

    /// The SQL this handle runs for `report` (now, or as of an instant), for example to see
    /// its plan with `EXPLAIN ANALYZE` through [`Warehouse::sql`]. (R4 on the current state of a
    /// handle that keeps the orders per customer by difference is ranked in memory instead, and
    /// only the names of the ranked customers are queried; this SQL gives the same rows.)
    pub fn report_sql(&self, report: &Report, as_of: Option<DateTime<Utc>>) -> Result<String> {
        Ok(self.report_plan(report, as_of)?.0)
    }

    /// A report's SQL and the columns it returns.
    fn report_plan(
        &self,
        report: &Report,
        as_of: Option<DateTime<Utc>>,
    ) -> Result<(String, &'static [(&'static str, DataType)])> {
        let fields = report_fields(report);
        Ok(match report {
            Report::OpenOrders(filter) => (
                match self.aggregate(as_of)? {
                    Some(agg) => open_orders_from_aggregate_sql(agg, filter),
                    None => star_open_orders_sql(&self.valid("o", as_of)?, filter),
                },
                fields,
            ),
            Report::TopDeliveryDates { limit } => {
                check_limit(*limit)?;
                (
                    match self.aggregate(as_of)? {
                        Some(agg) => top_delivery_dates_from_aggregate_sql(agg, *limit),
                        None => star_top_delivery_dates_sql(&self.valid("o", as_of)?, *limit),
                    },
                    fields,
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
                fields,
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
                    fields,
                )
            }
        })
    }

    /// Run `sql` and cast its columns to `fields` (the engine may return view types).
    async fn batches(&self, sql: &str, fields: &[(&str, DataType)]) -> Result<Vec<RecordBatch>> {
        match self.ctx.sql(sql).await?.collect().await {
            Ok(batches) => conform(batches, fields),
            Err(error) => {
                // Name the broken file, if that is what failed.
                self.check_files().await?;
                Err(error.into())
            }
        }
    }

    /// R1: orders matching `filter` per delivery date and status.
    pub async fn open_orders(&self, filter: StatusFilter, as_of: Option<DateTime<Utc>>) -> Result<Vec<OpenOrders>> {
        Ok(open_orders_rows(&self.report_batches(&Report::OpenOrders(filter), as_of).await?))
    }

    /// R2: the `limit` delivery dates with the most open orders (ties broken by date).
    pub async fn top_delivery_dates(
        &self,
        limit: usize,
        as_of: Option<DateTime<Utc>>,
    ) -> Result<Vec<DeliveryDateLoad>> {
        Ok(delivery_date_rows(&self.report_batches(&Report::TopDeliveryDates { limit }, as_of).await?))
    }

    /// R3: sum of item quantities of open orders, per product, largest first (then by product id).
    pub async fn pending_items_by_product(&self, as_of: Option<DateTime<Utc>>) -> Result<Vec<ProductItems>> {
        Ok(product_items_rows(&self.report_batches(&Report::PendingItemsByProduct, as_of).await?))
    }

    /// R4: customers by number of orders matching `filter` (default use: pending), dense-ranked,
    /// every customer whose rank is at most `limit` (ties all returned), then by customer id.
    pub async fn top_customers(
        &self,
        limit: usize,
        filter: StatusFilter,
        as_of: Option<DateTime<Utc>>,
    ) -> Result<Vec<CustomerRank>> {
        Ok(customer_rank_rows(&self.report_batches(&Report::TopCustomers { limit, filter }, as_of).await?))
    }
}

/// The predicate selecting the rows of a versioned star table (alias `alias`) in force now
/// (`is_current`) or at an instant, which must not precede the history's first instant
/// (`history_start`, microseconds).
pub(crate) fn validity(alias: &str, as_of: Option<DateTime<Utc>>, history_start: Option<i64>) -> Result<String> {
    Ok(match as_of {
        None => format!("{alias}.is_current"),
        Some(t) => {
            let micros = t.timestamp_micros();
            if let Some(start) = history_start
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

/// The columns a report returns, with their types.
pub(crate) fn report_fields(report: &Report) -> &'static [(&'static str, DataType)] {
    use DataType::{Date32, Int64, Utf8};
    match report {
        Report::OpenOrders(_) => &[("delivery_date", Date32), ("status", Utf8), ("quantity", Int64)],
        Report::TopDeliveryDates { .. } => &[("delivery_date", Date32), ("quantity", Int64)],
        Report::PendingItemsByProduct => &[("product_id", Int64), ("total_items", Int64)],
        Report::TopCustomers { .. } => {
            &[("customer_id", Int64), ("customer_name", Utf8), ("quantity", Int64), ("ranking", Int64)]
        }
    }
}

/// `batches` with their columns named and cast to `fields` (engines may return view types).
pub(crate) fn conform(batches: Vec<RecordBatch>, fields: &[(&str, DataType)]) -> Result<Vec<RecordBatch>> {
    let schema = Arc::new(Schema::new(
        fields.iter().map(|(name, t)| Field::new(*name, t.clone(), true)).collect::<Vec<Field>>(),
    ));
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

/// R1's rows from its batches (as [`report_fields`] types them).
pub(crate) fn open_orders_rows(batches: &[RecordBatch]) -> Vec<OpenOrders> {
    let mut out = Vec::new();
    for b in batches {
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
    out
}

/// R2's rows from its batches.
pub(crate) fn delivery_date_rows(batches: &[RecordBatch]) -> Vec<DeliveryDateLoad> {
    let mut out = Vec::new();
    for b in batches {
        let dates = b.column(0).as_primitive::<Date32Type>();
        let counts = b.column(1).as_primitive::<Int64Type>();
        for i in 0..b.num_rows() {
            out.push(DeliveryDateLoad { delivery_date: date(dates, i), quantity: counts.value(i) });
        }
    }
    out
}

/// R3's rows from its batches.
pub(crate) fn product_items_rows(batches: &[RecordBatch]) -> Vec<ProductItems> {
    let mut out = Vec::new();
    for b in batches {
        let products = b.column(0).as_primitive::<Int64Type>();
        let totals = b.column(1).as_primitive::<Int64Type>();
        for i in 0..b.num_rows() {
            out.push(ProductItems {
                product_id: (!products.is_null(i)).then(|| products.value(i)),
                total_items: totals.value(i),
            });
        }
    }
    out
}

/// R4's rows from its batches.
pub(crate) fn customer_rank_rows(batches: &[RecordBatch]) -> Vec<CustomerRank> {
    let mut out = Vec::new();
    for b in batches {
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
    out
}

/// Up to how many customers ranked in memory have their names found by a list of their ids
/// (beyond, the report's SQL joins the dimension).
const MAX_NAMED_BY_LIST: usize = 2_000;

pub(crate) fn check_limit(limit: usize) -> Result<()> {
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
