//! Deterministic bulk generation of ACME data at a scale factor, loaded with `COPY`.
//!
//! Every row is a pure function of `(seed, table, id)`, so the same seed always produces the
//! same database, and the four tables are generated and copied in parallel.

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use bytes::Bytes;
use chrono::{Duration as ChronoDuration, NaiveDate, NaiveDateTime};
use futures::SinkExt;
use tokio_postgres::{Client, NoTls};

use crate::error::{HarnessError, Result};
use crate::rng::SplitMix64;

/// Rows at scale factor 1.
pub const SF1_CUSTOMERS: u64 = 100_000;
/// Products at scale factor 1.
pub const SF1_PRODUCTS: u64 = 10_000;
/// Orders at scale factor 1.
pub const SF1_ORDERS: u64 = 1_000_000;
/// The generated order dates end on this day (fixed, so data does not depend on the clock).
pub const LAST_ORDER_DAY: (i32, u32, u32) = (2026, 1, 1);
/// Order dates spread over this many days before [`LAST_ORDER_DAY`].
pub const ORDER_DAY_SPAN: u64 = 730;
/// Share of orders that name a customer id that does not exist (yet).
pub const MISSING_CUSTOMER_SHARE: f64 = 0.005;

const STREAM_CUSTOMER: u64 = 1;
const STREAM_PRODUCT: u64 = 2;
const STREAM_ORDER: u64 = 3;
const COPY_CHUNK: usize = 1 << 20;

/// The order statuses of the source, with their share in generated data (half open).
pub const STATUSES: [(&str, f64); 4] =
    [("PENDING", 0.20), ("PROCESSING", 0.20), ("REPROCESSING", 0.10), ("COMPLETED", 0.50)];

/// Row counts for a scale factor.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ScaleFactor {
    /// The factor (1.0 = SF1).
    pub factor: f64,
}

impl ScaleFactor {
    /// A scale factor; it must be positive and finite.
    pub fn new(factor: f64) -> Result<Self> {
        if !(factor.is_finite() && factor > 0.0) {
            return Err(HarnessError::InvalidParameter(format!(
                "scale factor must be a positive number, got {factor}"
            )));
        }
        Ok(Self { factor })
    }

    fn scaled(&self, base: u64) -> u64 {
        ((base as f64 * self.factor).round() as u64).max(1)
    }

    /// Number of customers.
    pub fn customers(&self) -> u64 {
        self.scaled(SF1_CUSTOMERS)
    }

    /// Number of products.
    pub fn products(&self) -> u64 {
        self.scaled(SF1_PRODUCTS)
    }

    /// Number of orders.
    pub fn orders(&self) -> u64 {
        self.scaled(SF1_ORDERS)
    }
}

/// What a bulk load wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoadReport {
    /// Customers inserted.
    pub customers: u64,
    /// Products inserted.
    pub products: u64,
    /// Orders inserted.
    pub orders: u64,
    /// Order items inserted.
    pub order_items: u64,
    /// Wall time of the load (generation, COPY, sequence updates, the index, ANALYZE).
    pub elapsed: Duration,
}

/// Generate ACME data at `scale` for `seed` and load it into the (empty) source tables of the
/// database at `url` with `COPY`, four tables in parallel. Then, as an OLTP database serving
/// the live workload would have it, an index of the items by order: the workload deletes an
/// order with its items, which without it scans every item (at SF10, 85M rows for each such
/// delete, which held the workload to 66 transactions per second).
pub async fn bulk_load(url: &str, scale: ScaleFactor, seed: u64) -> Result<LoadReport> {
    let start = Instant::now();
    let generator = Generator { seed, scale };
    let (customers, products, orders, items) = tokio::try_join!(
        copy_table(url, "customers", move |out, from, to| generator.customers(out, from, to), scale.customers()),
        copy_table(url, "products", move |out, from, to| generator.products(out, from, to), scale.products()),
        copy_table(url, "orders", move |out, from, to| generator.orders(out, from, to), scale.orders()),
        copy_items(url, generator),
    )?;
    let client = connect(url).await?;
    client
        .batch_execute(
            "SELECT setval(pg_get_serial_sequence('operations.customers','customer_id'), \
                 coalesce((SELECT max(customer_id) FROM operations.customers), 0) + 1, false);
             SELECT setval(pg_get_serial_sequence('operations.products','product_id'), \
                 coalesce((SELECT max(product_id) FROM operations.products), 0) + 1, false);
             SELECT setval(pg_get_serial_sequence('operations.orders','order_id'), \
                 coalesce((SELECT max(order_id) FROM operations.orders), 0) + 1, false);
             SELECT setval(pg_get_serial_sequence('operations.order_items','order_item_id'), \
                 coalesce((SELECT max(order_item_id) FROM operations.order_items), 0) + 1, false);
             CREATE INDEX IF NOT EXISTS order_items_order_id ON operations.order_items (order_id);
             ANALYZE operations.customers, operations.products, operations.orders, operations.order_items;",
        )
        .await
        .map_err(|source| HarnessError::Sql { what: "setting sequences after the bulk load".into(), source })?;
    Ok(LoadReport { customers, products, orders, order_items: items, elapsed: start.elapsed() })
}

pub(crate) async fn connect(url: &str) -> Result<Client> {
    let (client, connection) = tokio_postgres::connect(url, NoTls)
        .await
        .map_err(|source| HarnessError::Connect { url: url.to_string(), source })?;
    tokio::spawn(async move {
        if let Err(error) = connection.await {
            tracing::debug!(%error, "generator connection closed");
        }
    });
    Ok(client)
}

/// Copy rows `1..=count` of one table, generated in chunks by `render(out, from, to)`.
async fn copy_table<F>(url: &str, table: &str, render: F, count: u64) -> Result<u64>
where
    F: Fn(&mut String, u64, u64) + Send + Sync + 'static,
{
    let client = connect(url).await?;
    let sql = format!("COPY operations.{table} FROM STDIN");
    let what = || format!("COPY into operations.{table}");
    let sink = client.copy_in::<_, Bytes>(&sql).await.map_err(|source| HarnessError::Sql { what: what(), source })?;
    futures::pin_mut!(sink);
    let rows_per_chunk = 10_000u64;
    let mut from = 1;
    while from <= count {
        let to = (from + rows_per_chunk - 1).min(count);
        let mut out = String::with_capacity(COPY_CHUNK);
        render(&mut out, from, to);
        sink.send(Bytes::from(out)).await.map_err(|source| HarnessError::Sql { what: what(), source })?;
        from = to + 1;
    }
    let rows = sink.finish().await.map_err(|source| HarnessError::Sql { what: what(), source })?;
    Ok(rows)
}

async fn copy_items(url: &str, generator: Generator) -> Result<u64> {
    let client = connect(url).await?;
    let what = || "COPY into operations.order_items".to_string();
    let sink = client
        .copy_in::<_, Bytes>("COPY operations.order_items FROM STDIN")
        .await
        .map_err(|source| HarnessError::Sql { what: what(), source })?;
    futures::pin_mut!(sink);
    let mut next_item_id = 1u64;
    let mut out = String::with_capacity(COPY_CHUNK + 4096);
    for order_id in 1..=generator.scale.orders() {
        generator.items_of_order(&mut out, order_id, &mut next_item_id);
        if out.len() >= COPY_CHUNK {
            let chunk = std::mem::replace(&mut out, String::with_capacity(COPY_CHUNK + 4096));
            sink.send(Bytes::from(chunk)).await.map_err(|source| HarnessError::Sql { what: what(), source })?;
        }
    }
    if !out.is_empty() {
        sink.send(Bytes::from(out)).await.map_err(|source| HarnessError::Sql { what: what(), source })?;
    }
    sink.finish().await.map_err(|source| HarnessError::Sql { what: what(), source })
}

/// The row generator: pure functions of the seed and the row id.
#[derive(Debug, Clone, Copy)]
pub struct Generator {
    /// The seed.
    pub seed: u64,
    /// The scale factor.
    pub scale: ScaleFactor,
}

const STREETS: [&str; 8] = ["Main", "Oak", "Pine", "Maple", "Cedar", "Elm", "Lake", "Hill"];
const CITIES: [&str; 6] = ["Springfield", "Rivertown", "Lisbon", "Porto", "Faro", "Braga"];
const PRODUCT_WORDS: [&str; 8] = ["Box", "Crate", "Parcel", "Envelope", "Tube", "Pallet", "Bag", "Case"];

fn last_day() -> NaiveDate {
    let (y, m, d) = LAST_ORDER_DAY;
    NaiveDate::from_ymd_opt(y, m, d).unwrap_or(NaiveDate::MIN)
}

fn write_ts(out: &mut String, ts: NaiveDateTime) {
    let _ = write!(out, "{}", ts.format("%Y-%m-%d %H:%M:%S%.3f"));
}

fn created_at(rng: &mut SplitMix64, day: NaiveDate) -> NaiveDateTime {
    let millis = rng.range(0, 86_400_000 - 1) as i64;
    day.and_hms_opt(0, 0, 0).unwrap_or_default() + ChronoDuration::milliseconds(millis)
}

impl Generator {
    /// Customers `from..=to` as COPY text rows.
    pub fn customers(&self, out: &mut String, from: u64, to: u64) {
        for id in from..=to {
            let mut rng = SplitMix64::for_entity(self.seed, STREAM_CUSTOMER, id);
            let active = if rng.chance(0.9) { 't' } else { 'f' };
            let street = STREETS[rng.range(0, STREETS.len() as u64 - 1) as usize];
            let city = CITIES[rng.range(0, CITIES.len() as u64 - 1) as usize];
            let number = rng.range(1, 999);
            let day = last_day() - ChronoDuration::days(rng.range(ORDER_DAY_SPAN, ORDER_DAY_SPAN + 365) as i64);
            let created = created_at(&mut rng, day);
            let updated = created + ChronoDuration::days(rng.range(0, 300) as i64);
            let _ = write!(out, "{id}\tCustomer {id}\t{active}\t{number} {street} St, {city}\t");
            write_ts(out, updated);
            let _ = write!(out, "\t{}\t", rng.range(1, 50));
            write_ts(out, created);
            let _ = writeln!(out, "\t{}", rng.range(1, 50));
        }
    }

    /// Products `from..=to` as COPY text rows.
    pub fn products(&self, out: &mut String, from: u64, to: u64) {
        for id in from..=to {
            let mut rng = SplitMix64::for_entity(self.seed, STREAM_PRODUCT, id);
            let word = PRODUCT_WORDS[rng.range(0, PRODUCT_WORDS.len() as u64 - 1) as usize];
            let cents = rng.range(100, 99_999);
            let barcode = 2_000_000_000_000 + rng.range(0, 999_999_999_999);
            let active = if rng.chance(0.95) { 't' } else { 'f' };
            let day = last_day() - ChronoDuration::days(rng.range(ORDER_DAY_SPAN, ORDER_DAY_SPAN + 365) as i64);
            let created = created_at(&mut rng, day);
            let updated = created + ChronoDuration::days(rng.range(0, 300) as i64);
            let _ = write!(out, "{id}\t{word} model {id}\t{barcode}\t{}.{:02}\t{active}\t", cents / 100, cents % 100);
            write_ts(out, updated);
            let _ = write!(out, "\t{}\t", rng.range(1, 50));
            write_ts(out, created);
            let _ = writeln!(out, "\t{}", rng.range(1, 50));
        }
    }

    fn order_rng(&self, id: u64) -> SplitMix64 {
        SplitMix64::for_entity(self.seed, STREAM_ORDER, id)
    }

    /// Orders `from..=to` as COPY text rows.
    pub fn orders(&self, out: &mut String, from: u64, to: u64) {
        let customers = self.scale.customers();
        for id in from..=to {
            let mut rng = self.order_rng(id);
            let day = last_day() - ChronoDuration::days(rng.range(0, ORDER_DAY_SPAN - 1) as i64);
            let delivery = day + ChronoDuration::days(10);
            let customer = if rng.chance(MISSING_CUSTOMER_SHARE) {
                customers + rng.range(1, (customers / 100).max(1))
            } else {
                rng.range(1, customers)
            };
            let status = pick_status(rng.unit());
            let created = created_at(&mut rng, day);
            let updated = created + ChronoDuration::hours(rng.range(0, 240) as i64);
            let _ = write!(out, "{id}\t{day}\t{delivery}\t{customer}\t{status}\t");
            write_ts(out, updated);
            let _ = write!(out, "\t{}\t", rng.range(1, 50));
            write_ts(out, created);
            let _ = writeln!(out, "\t{}", rng.range(1, 50));
        }
    }

    /// The items of one order (7 to 10 of them) as COPY text rows, numbered from `next_id`.
    pub fn items_of_order(&self, out: &mut String, order_id: u64, next_id: &mut u64) {
        let products = self.scale.products();
        let mut rng = self.order_rng(order_id);
        let day = last_day() - ChronoDuration::days(rng.range(0, ORDER_DAY_SPAN - 1) as i64);
        let mut items = SplitMix64::for_entity(self.seed ^ 0x5EED, STREAM_ORDER, order_id);
        let count = items.range(7, 10);
        let created = created_at(&mut items, day);
        for _ in 0..count {
            let id = *next_id;
            *next_id += 1;
            let product = items.range(1, products);
            let quantity = items.range(1, 20);
            let _ = write!(out, "{id}\t{order_id}\t{product}\t{quantity}\t");
            write_ts(out, created);
            let _ = write!(out, "\t{}\t", items.range(1, 50));
            write_ts(out, created);
            let _ = writeln!(out, "\t{}", items.range(1, 50));
        }
    }
}

fn pick_status(u: f64) -> &'static str {
    let mut acc = 0.0;
    for (status, share) in STATUSES {
        acc += share;
        if u < acc {
            return status;
        }
    }
    "COMPLETED"
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generation_is_deterministic_for_a_seed() {
        let generator = Generator { seed: 42, scale: ScaleFactor { factor: 0.001 } };
        let (mut a, mut b) = (String::new(), String::new());
        generator.orders(&mut a, 1, 50);
        generator.orders(&mut b, 1, 50);
        assert_eq!(a, b);
        let other = Generator { seed: 43, ..generator };
        let mut c = String::new();
        other.orders(&mut c, 1, 50);
        assert_ne!(a, c);
    }

    #[test]
    fn orders_deliver_ten_days_after_order_date() {
        let generator = Generator { seed: 1, scale: ScaleFactor { factor: 0.001 } };
        let mut out = String::new();
        generator.orders(&mut out, 1, 100);
        for line in out.lines() {
            let cols: Vec<&str> = line.split('\t').collect();
            let order: NaiveDate = cols[1].parse().expect("order_date");
            let delivery: NaiveDate = cols[2].parse().expect("delivery_date");
            assert_eq!(delivery - order, ChronoDuration::days(10));
        }
    }

    #[test]
    fn scale_factor_rejects_non_positive_values() {
        assert!(ScaleFactor::new(0.0).is_err());
        assert!(ScaleFactor::new(-1.0).is_err());
        assert!(ScaleFactor::new(f64::NAN).is_err());
        assert_eq!(ScaleFactor::new(0.01).map(|s| s.orders()).ok(), Some(10_000));
    }
}
