//! The live workload: the change mix of `shared/ACME.md` applied at a target rate.
//!
//! New orders with their items, status transitions, customer and product changes and the
//! occasional delete, each in its own small transaction, from one or more connections.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio_postgres::Client;

use crate::error::{HarnessError, Result};
use crate::generator::connect;
use crate::rng::SplitMix64;

/// Index of each source table in [`WorkloadReport::tables`].
pub const CUSTOMERS: usize = 0;
/// See [`CUSTOMERS`].
pub const PRODUCTS: usize = 1;
/// See [`CUSTOMERS`].
pub const ORDERS: usize = 2;
/// See [`CUSTOMERS`].
pub const ORDER_ITEMS: usize = 3;

/// How to drive the live workload.
#[derive(Debug, Clone)]
pub struct WorkloadConfig {
    /// Seed of the operation mix.
    pub seed: u64,
    /// Target transactions per second over all connections; `0.0` means as fast as possible.
    pub rate_tps: f64,
    /// Stop after this many transactions (if set).
    pub transactions: Option<u64>,
    /// Stop after this long (if set). At least one of the limits must be set.
    pub duration: Option<Duration>,
    /// Number of connections writing concurrently.
    pub connections: usize,
    /// Allow deletes in the mix (rare, on every table).
    pub deletes: bool,
    /// Only insert new orders with their items (no updates or deletes): every row then has one
    /// version, which makes snapshot-visibility checks exact.
    pub inserts_only: bool,
}

impl Default for WorkloadConfig {
    fn default() -> Self {
        Self {
            seed: 1,
            rate_tps: 200.0,
            transactions: Some(1_000),
            duration: None,
            connections: 2,
            deletes: true,
            inserts_only: false,
        }
    }
}

/// Row changes applied to one table.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TableChanges {
    /// Rows inserted.
    pub inserted: u64,
    /// Rows updated.
    pub updated: u64,
    /// Rows deleted.
    pub deleted: u64,
}

/// What the workload did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WorkloadReport {
    /// Transactions committed.
    pub transactions: u64,
    /// Changes per table, indexed by [`CUSTOMERS`], [`PRODUCTS`], [`ORDERS`], [`ORDER_ITEMS`].
    pub tables: [TableChanges; 4],
    /// Wall time.
    pub elapsed: Duration,
}

impl WorkloadReport {
    /// All row changes (inserts, updates and deletes over every table).
    pub fn total_changes(&self) -> u64 {
        self.tables.iter().map(|t| t.inserted + t.updated + t.deleted).sum()
    }

    fn merge(&mut self, other: &WorkloadReport) {
        self.transactions += other.transactions;
        for (mine, theirs) in self.tables.iter_mut().zip(other.tables.iter()) {
            mine.inserted += theirs.inserted;
            mine.updated += theirs.updated;
            mine.deleted += theirs.deleted;
        }
    }
}

/// Highest ids seen, shared by the workers so they pick existing rows.
#[derive(Debug)]
struct Ids {
    customer: AtomicI64,
    product: AtomicI64,
    order: AtomicI64,
    item: AtomicI64,
}

/// Run the live workload against the database at `url` until a limit of `config` is reached.
pub async fn run_workload(url: &str, config: &WorkloadConfig) -> Result<WorkloadReport> {
    if config.transactions.is_none() && config.duration.is_none() {
        return Err(HarnessError::InvalidParameter("set a transaction count or a duration for the workload".into()));
    }
    if config.connections == 0 || config.rate_tps < 0.0 || !config.rate_tps.is_finite() {
        return Err(HarnessError::InvalidParameter(
            "workload needs at least one connection and a non-negative rate".into(),
        ));
    }
    let start = Instant::now();
    let client = connect(url).await?;
    let max = |sql: &'static str| {
        let client = &client;
        async move {
            client
                .query_one(sql, &[])
                .await
                .map(|row| row.get::<_, i64>(0))
                .map_err(|source| HarnessError::Sql { what: "reading the highest ids".into(), source })
        }
    };
    let ids = Arc::new(Ids {
        customer: AtomicI64::new(max("SELECT coalesce(max(customer_id), 0) FROM operations.customers").await?),
        product: AtomicI64::new(max("SELECT coalesce(max(product_id), 0) FROM operations.products").await?),
        order: AtomicI64::new(max("SELECT coalesce(max(order_id), 0) FROM operations.orders").await?),
        item: AtomicI64::new(max("SELECT coalesce(max(order_item_id), 0) FROM operations.order_items").await?),
    });
    drop(client);
    let budget = Arc::new(AtomicU64::new(config.transactions.unwrap_or(u64::MAX)));
    let deadline = config.duration.map(|d| start + d);
    // Owned: dropping (or aborting) this future stops every worker and closes its connection.
    let mut workers = tokio::task::JoinSet::new();
    for worker in 0..config.connections {
        let client = connect(url).await?;
        let ids = Arc::clone(&ids);
        let budget = Arc::clone(&budget);
        let config = config.clone();
        workers.spawn(async move {
            let rng = SplitMix64::for_entity(config.seed, 99, worker as u64);
            let per_worker_rate = config.rate_tps / config.connections as f64;
            Worker { client, rng, ids, deletes: config.deletes, inserts_only: config.inserts_only }
                .run(per_worker_rate, budget, deadline)
                .await
        });
    }
    let mut report = WorkloadReport::default();
    let mut first_error = None;
    while let Some(worker) = workers.join_next().await {
        match worker {
            Ok(Ok(part)) => report.merge(&part),
            Ok(Err(error)) => first_error = first_error.or(Some(error)),
            Err(join) => {
                first_error =
                    first_error.or(Some(HarnessError::InvalidParameter(format!("workload worker failed: {join}"))))
            }
        }
    }
    if let Some(error) = first_error {
        return Err(error);
    }
    report.elapsed = start.elapsed();
    Ok(report)
}

struct Worker {
    client: Client,
    rng: SplitMix64,
    ids: Arc<Ids>,
    deletes: bool,
    inserts_only: bool,
}

fn sql_err(what: &str) -> impl FnOnce(tokio_postgres::Error) -> HarnessError + '_ {
    move |source| HarnessError::Sql { what: what.to_string(), source }
}

impl Worker {
    async fn run(mut self, rate: f64, budget: Arc<AtomicU64>, deadline: Option<Instant>) -> Result<WorkloadReport> {
        let mut report = WorkloadReport::default();
        let interval = (rate > 0.0).then(|| Duration::from_secs_f64(1.0 / rate));
        let started = Instant::now();
        let mut done = 0u64;
        loop {
            if deadline.is_some_and(|d| Instant::now() >= d) {
                break;
            }
            if budget.fetch_update(Ordering::AcqRel, Ordering::Acquire, |left| left.checked_sub(1)).is_err() {
                break;
            }
            if let Some(interval) = interval {
                let due = started + interval.mul_f64(done as f64);
                tokio::time::sleep_until(due.into()).await;
            }
            self.one_transaction(&mut report).await?;
            done += 1;
        }
        Ok(report)
    }

    /// A random id in `1..=max` of the table `which` picks (it may since have been deleted).
    fn existing(&mut self, which: fn(&Ids) -> &AtomicI64) -> i64 {
        let hi = which(&self.ids).load(Ordering::Relaxed).max(1) as u64;
        self.rng.range(1, hi) as i64
    }

    /// An order id biased toward recent (mostly open) orders.
    fn recent_order(&mut self) -> i64 {
        let hi = self.ids.order.load(Ordering::Relaxed).max(1) as u64;
        if self.rng.chance(0.7) {
            let window = (hi / 10).max(1);
            self.rng.range(hi.saturating_sub(window - 1).max(1), hi) as i64
        } else {
            self.rng.range(1, hi) as i64
        }
    }

    async fn one_transaction(&mut self, report: &mut WorkloadReport) -> Result<()> {
        let roll = self.rng.unit();
        let delete_share = if self.deletes { 0.03 } else { 0.0 };
        let by = self.rng.range(1, 50) as i64;
        if self.inserts_only || roll < 0.35 {
            self.new_order(by, report).await
        } else if roll < 0.70 {
            self.status_change(by, report).await
        } else if roll < 0.80 {
            self.customer_change(by, report).await
        } else if roll < 0.84 {
            self.new_customer(by, report).await
        } else if roll < 0.92 {
            self.product_change(by, report).await
        } else if roll < 0.93 {
            self.new_product(by, report).await
        } else if roll < 0.93 + delete_share {
            self.delete_something(report).await
        } else {
            self.status_change(by, report).await
        }
    }

    async fn new_order(&mut self, by: i64, report: &mut WorkloadReport) -> Result<()> {
        let customer = if self.rng.chance(0.02) {
            self.ids.customer.load(Ordering::Relaxed) + self.rng.range(1, 5) as i64
        } else {
            self.existing(|ids| &ids.customer)
        };
        let items = self.rng.range(1, 10);
        let split = self.rng.chance(0.2);
        let products: Vec<(i64, i32)> =
            (0..items).map(|_| (self.existing(|ids| &ids.product), self.rng.range(1, 20) as i32)).collect();
        let tx = self.client.transaction().await.map_err(sql_err("BEGIN"))?;
        let row = tx
            .query_one(
                "INSERT INTO operations.orders (order_date, delivery_date, customer_id, status, \
                 updated_at, updated_by, created_at, created_by) \
                 VALUES (current_date, current_date + 10, $1, 'PENDING', now(), $2, now(), $2) RETURNING order_id",
                &[&customer, &by],
            )
            .await
            .map_err(sql_err("inserting an order"))?;
        let order_id: i64 = row.get(0);
        self.ids.order.fetch_max(order_id, Ordering::Relaxed);
        report.tables[ORDERS].inserted += 1;
        let tx = if split {
            tx.commit().await.map_err(sql_err("COMMIT"))?;
            report.transactions += 1;
            self.client.transaction().await.map_err(sql_err("BEGIN"))?
        } else {
            tx
        };
        let insert = tx
            .prepare(
                "INSERT INTO operations.order_items (order_id, product_id, quanity, updated_at, updated_by, \
                 created_at, created_by) VALUES ($1, $2, $3, now(), $4, now(), $4) RETURNING order_item_id",
            )
            .await
            .map_err(sql_err("preparing an item insert"))?;
        for (product, quantity) in products {
            let row = tx
                .query_one(&insert, &[&order_id, &product, &quantity, &by])
                .await
                .map_err(sql_err("inserting an order item"))?;
            self.ids.item.fetch_max(row.get(0), Ordering::Relaxed);
            report.tables[ORDER_ITEMS].inserted += 1;
        }
        tx.commit().await.map_err(sql_err("COMMIT"))?;
        report.transactions += 1;
        Ok(())
    }

    async fn status_change(&mut self, by: i64, report: &mut WorkloadReport) -> Result<()> {
        let order = self.recent_order();
        let steps = if self.rng.chance(0.05) { 2 } else { 1 };
        let tx = self.client.transaction().await.map_err(sql_err("BEGIN"))?;
        for _ in 0..steps {
            let reprocess = self.rng.chance(0.2);
            let n = tx
                .execute(
                    "UPDATE operations.orders SET status = CASE status \
                       WHEN 'PENDING' THEN 'PROCESSING' \
                       WHEN 'PROCESSING' THEN CASE WHEN $2 THEN 'REPROCESSING' ELSE 'COMPLETED' END \
                       ELSE 'COMPLETED' END, updated_at = now(), updated_by = $3 \
                     WHERE order_id = $1 AND status IS DISTINCT FROM 'COMPLETED'",
                    &[&order, &reprocess, &by],
                )
                .await
                .map_err(sql_err("moving an order's status"))?;
            report.tables[ORDERS].updated += n;
        }
        tx.commit().await.map_err(sql_err("COMMIT"))?;
        report.transactions += 1;
        Ok(())
    }

    async fn customer_change(&mut self, by: i64, report: &mut WorkloadReport) -> Result<()> {
        let customer = self.existing(|ids| &ids.customer);
        let n = if self.rng.chance(0.5) {
            let address = format!("{} Delivery Rd, Depot {}", self.rng.range(1, 999), self.rng.range(1, 99));
            self.client
                .execute(
                    "UPDATE operations.customers SET customer_address = $2, updated_at = now(), updated_by = $3 \
                     WHERE customer_id = $1",
                    &[&customer, &address, &by],
                )
                .await
        } else {
            self.client
                .execute(
                    "UPDATE operations.customers SET is_active = NOT is_active, updated_at = now(), updated_by = $2 \
                     WHERE customer_id = $1",
                    &[&customer, &by],
                )
                .await
        }
        .map_err(sql_err("updating a customer"))?;
        report.tables[CUSTOMERS].updated += n;
        report.transactions += 1;
        Ok(())
    }

    async fn new_customer(&mut self, by: i64, report: &mut WorkloadReport) -> Result<()> {
        let address = format!("{} Harbour Av, Porto", self.rng.range(1, 999));
        let row = self
            .client
            .query_one(
                "INSERT INTO operations.customers (customer_name, is_active, customer_address, updated_at, \
                 updated_by, created_at, created_by) VALUES ('New customer', true, $1, now(), $2, now(), $2) \
                 RETURNING customer_id",
                &[&address, &by],
            )
            .await
            .map_err(sql_err("inserting a customer"))?;
        let id: i64 = row.get(0);
        self.client
            .execute(
                "UPDATE operations.customers SET customer_name = 'Customer ' || $1::bigint WHERE customer_id = $1",
                &[&id],
            )
            .await
            .map_err(sql_err("naming a customer"))?;
        self.ids.customer.fetch_max(id, Ordering::Relaxed);
        report.tables[CUSTOMERS].inserted += 1;
        report.tables[CUSTOMERS].updated += 1;
        report.transactions += 2;
        Ok(())
    }

    async fn product_change(&mut self, by: i64, report: &mut WorkloadReport) -> Result<()> {
        let product = self.existing(|ids| &ids.product);
        let n = if self.rng.chance(0.7) {
            let cents = self.rng.range(100, 99_999) as i64;
            self.client
                .execute(
                    "UPDATE operations.products SET unity_price = ($2::bigint)::numeric / 100, updated_at = now(), \
                     updated_by = $3 WHERE product_id = $1",
                    &[&product, &cents, &by],
                )
                .await
        } else {
            self.client
                .execute(
                    "UPDATE operations.products SET is_active = NOT coalesce(is_active, true), updated_at = now(), \
                     updated_by = $2 WHERE product_id = $1",
                    &[&product, &by],
                )
                .await
        }
        .map_err(sql_err("updating a product"))?;
        report.tables[PRODUCTS].updated += n;
        report.transactions += 1;
        Ok(())
    }

    async fn new_product(&mut self, by: i64, report: &mut WorkloadReport) -> Result<()> {
        let cents = self.rng.range(100, 99_999) as i64;
        let barcode = format!("{}", 3_000_000_000_000u64 + self.rng.range(0, 999_999_999_999));
        let row = self
            .client
            .query_one(
                "INSERT INTO operations.products (product_name, barcode, unity_price, is_active, updated_at, \
                 updated_by, created_at, created_by) VALUES ('New product', $1, ($2::bigint)::numeric / 100, true, \
                 now(), $3, now(), $3) RETURNING product_id",
                &[&barcode, &cents, &by],
            )
            .await
            .map_err(sql_err("inserting a product"))?;
        self.ids.product.fetch_max(row.get(0), Ordering::Relaxed);
        report.tables[PRODUCTS].inserted += 1;
        report.transactions += 1;
        Ok(())
    }

    async fn delete_something(&mut self, report: &mut WorkloadReport) -> Result<()> {
        let roll = self.rng.unit();
        if roll < 0.5 {
            let item = self.existing(|ids| &ids.item);
            let n = self
                .client
                .execute("DELETE FROM operations.order_items WHERE order_item_id = $1", &[&item])
                .await
                .map_err(sql_err("deleting an order item"))?;
            report.tables[ORDER_ITEMS].deleted += n;
        } else if roll < 0.8 {
            let order = self.existing(|ids| &ids.order);
            let tx = self.client.transaction().await.map_err(sql_err("BEGIN"))?;
            let items = tx
                .execute("DELETE FROM operations.order_items WHERE order_id = $1", &[&order])
                .await
                .map_err(sql_err("deleting an order's items"))?;
            let orders = tx
                .execute("DELETE FROM operations.orders WHERE order_id = $1", &[&order])
                .await
                .map_err(sql_err("deleting an order"))?;
            tx.commit().await.map_err(sql_err("COMMIT"))?;
            report.tables[ORDER_ITEMS].deleted += items;
            report.tables[ORDERS].deleted += orders;
        } else if roll < 0.9 {
            let customer = self.existing(|ids| &ids.customer);
            let n = self
                .client
                .execute("DELETE FROM operations.customers WHERE customer_id = $1", &[&customer])
                .await
                .map_err(sql_err("deleting a customer"))?;
            report.tables[CUSTOMERS].deleted += n;
        } else {
            let product = self.existing(|ids| &ids.product);
            let n = self
                .client
                .execute("DELETE FROM operations.products WHERE product_id = $1", &[&product])
                .await
                .map_err(sql_err("deleting a product"))?;
            report.tables[PRODUCTS].deleted += n;
        }
        report.transactions += 1;
        Ok(())
    }
}
