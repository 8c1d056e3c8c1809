//! Print the four reports of a warehouse, now or as of an instant, as tables or JSON; or the
//! answer to an ad-hoc SQL query over its tables, as a table, JSON or CSV.
//!
//! ```text
//! cargo run --release --example reports -- --warehouse ./warehouse [--as-of 2026-01-01T00:00:00Z] \
//!     [--limit 3] [--status open] [--format table|json]
//! cargo run --release --example reports -- --warehouse ./warehouse \
//!     --sql "SELECT status, count(*) FROM orders_current GROUP BY status" [--format table|json|csv]
//! cargo run --release --features ballista --example reports -- --warehouse s3://bucket/warehouse \
//!     --scheduler df://scheduler:50050 [--storage-option aws_region=...]
//! ```
//!
//! With `--scheduler`, the reports and the SQL run on that Apache Ballista cluster, over the
//! model of the last complete build (`acme::query::distributed`); without it, in this process,
//! fresh to the raw layer.

use acme::query::datafusion::arrow::record_batch::RecordBatch;
use acme::query::{CustomerRank, DeliveryDateLoad, OpenOrders, ProductItems, StatusFilter, Warehouse};
use chrono::{DateTime, Utc};
use clap::{Parser, ValueEnum};

/// jemalloc instead of glibc's malloc: with tokio's worker and blocking threads, glibc keeps the
/// memory the pipeline frees in per-thread arenas, and a SF10 snapshot whose live heap stays
/// under 300 MiB held 1.5 GiB of RSS (README, "Memory").
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Output format.
#[derive(Debug, Clone, Copy, ValueEnum)]
enum Format {
    /// Aligned text tables.
    Table,
    /// One JSON object with the four reports (with `--sql`: an array of row objects).
    Json,
    /// With `--sql` only: comma-separated values with a header line.
    Csv,
}

/// Command-line arguments.
#[derive(Debug, Parser)]
#[command(version, about = "Print the four ACME logistics reports")]
struct Args {
    /// Warehouse directory or URL.
    #[arg(long, env = "ACME_WAREHOUSE")]
    warehouse: String,
    /// Answer as of this instant (RFC 3339).
    #[arg(long, env = "ACME_AS_OF")]
    as_of: Option<chrono::DateTime<chrono::Utc>>,
    /// Rows of R2, and ranks of R4.
    #[arg(long, env = "ACME_LIMIT", default_value_t = 3)]
    limit: usize,
    /// Orders counted by R1 and R4: open, pending, or one status.
    #[arg(long, env = "ACME_STATUS")]
    status: Option<String>,
    /// Output format.
    #[arg(long, env = "ACME_FORMAT", value_enum, default_value_t = Format::Table)]
    format: Format,
    /// An object-store option as key=value (for S3: aws_endpoint, aws_region, aws_access_key_id,
    /// aws_secret_access_key, aws_allow_http, ...); repeat it for several, or give them
    /// comma-separated in ACME_STORAGE_OPTIONS.
    #[arg(long = "storage-option", env = "ACME_STORAGE_OPTIONS", value_delimiter = ',',
          value_parser = acme::core::config::parse_storage_option)]
    storage_option: Vec<(String, String)>,
    /// Run this SQL over the warehouse's tables instead of the four reports (the histories
    /// `<table>_history`, the current rows `<table>_current`, the star schema, `raw_<table>`).
    #[arg(long, env = "ACME_SQL")]
    sql: Option<String>,
    /// Run on the Apache Ballista cluster whose scheduler is at this URL (`df://host:port`),
    /// over the model of the last complete build (needs the `ballista` feature).
    #[arg(long, env = "ACME_SCHEDULER")]
    scheduler: Option<String>,
}

/// Where the queries run.
enum Engine {
    /// In this process, fresh to the raw layer.
    Embedded(Box<Warehouse>),
    /// On a Ballista cluster, at the model's position.
    #[cfg(feature = "ballista")]
    Cluster(acme::query::distributed::DistributedWarehouse),
}

impl Engine {
    async fn open(args: &Args) -> anyhow::Result<Engine> {
        let options = args.storage_option.iter().cloned().collect();
        match &args.scheduler {
            None => Ok(Engine::Embedded(Box::new(Warehouse::open_with_options(&args.warehouse, options).await?))),
            #[cfg(feature = "ballista")]
            Some(scheduler) => Ok(Engine::Cluster(
                acme::query::distributed::DistributedWarehouse::connect(scheduler, &args.warehouse, options).await?,
            )),
            #[cfg(not(feature = "ballista"))]
            Some(_) => anyhow::bail!(
                "--scheduler needs the `ballista` feature: cargo run --release --features ballista --example reports"
            ),
        }
    }

    async fn sql(&self, sql: &str) -> anyhow::Result<Vec<RecordBatch>> {
        Ok(match self {
            Engine::Embedded(w) => w.sql(sql).await?.collect().await?,
            #[cfg(feature = "ballista")]
            Engine::Cluster(c) => c.sql(sql).await?.collect().await?,
        })
    }

    async fn open_orders(&self, filter: StatusFilter, as_of: Option<DateTime<Utc>>) -> anyhow::Result<Vec<OpenOrders>> {
        Ok(match self {
            Engine::Embedded(w) => w.open_orders(filter, as_of).await?,
            #[cfg(feature = "ballista")]
            Engine::Cluster(c) => c.open_orders(filter, as_of).await?,
        })
    }

    async fn top_delivery_dates(
        &self,
        limit: usize,
        as_of: Option<DateTime<Utc>>,
    ) -> anyhow::Result<Vec<DeliveryDateLoad>> {
        Ok(match self {
            Engine::Embedded(w) => w.top_delivery_dates(limit, as_of).await?,
            #[cfg(feature = "ballista")]
            Engine::Cluster(c) => c.top_delivery_dates(limit, as_of).await?,
        })
    }

    async fn pending_items_by_product(&self, as_of: Option<DateTime<Utc>>) -> anyhow::Result<Vec<ProductItems>> {
        Ok(match self {
            Engine::Embedded(w) => w.pending_items_by_product(as_of).await?,
            #[cfg(feature = "ballista")]
            Engine::Cluster(c) => c.pending_items_by_product(as_of).await?,
        })
    }

    async fn top_customers(
        &self,
        limit: usize,
        filter: StatusFilter,
        as_of: Option<DateTime<Utc>>,
    ) -> anyhow::Result<Vec<CustomerRank>> {
        Ok(match self {
            Engine::Embedded(w) => w.top_customers(limit, filter, as_of).await?,
            #[cfg(feature = "ballista")]
            Engine::Cluster(c) => c.top_customers(limit, filter, as_of).await?,
        })
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let w = Engine::open(&args).await?;
    if let Some(sql) = &args.sql {
        let batches = w.sql(sql).await?;
        return print_rows(&batches, args.format);
    }
    if matches!(args.format, Format::Csv) {
        anyhow::bail!("--format csv is for --sql; the four reports print as table or json");
    }
    let r1_filter = args.status.as_deref().map(StatusFilter::parse).transpose()?.unwrap_or(StatusFilter::Open);
    let r4_filter = args.status.as_deref().map(StatusFilter::parse).transpose()?.unwrap_or(StatusFilter::Pending);
    let open_orders = w.open_orders(r1_filter, args.as_of).await?;
    let top_dates = w.top_delivery_dates(args.limit, args.as_of).await?;
    let items = w.pending_items_by_product(args.as_of).await?;
    let customers = w.top_customers(args.limit, r4_filter, args.as_of).await?;
    match args.format {
        Format::Json => {
            let out = serde_json::json!({
                "open_orders": open_orders,
                "top_delivery_dates": top_dates,
                "pending_items_by_product": items,
                "top_customers": customers,
            });
            println!("{out}");
        }
        Format::Table | Format::Csv => {
            println!("R1 open orders by delivery date and status");
            for r in &open_orders {
                println!(
                    "  {:<12} {:<14} {:>8}",
                    opt(r.delivery_date),
                    r.status.clone().unwrap_or_default(),
                    r.quantity
                );
            }
            println!("R2 top {} delivery dates", args.limit);
            for r in &top_dates {
                println!("  {:<12} {:>8}", opt(r.delivery_date), r.quantity);
            }
            println!("R3 open pending items by product");
            for r in &items {
                println!("  {:<10} {:>8}", opt(r.product_id), r.total_items);
            }
            println!("R4 top customers (dense rank <= {})", args.limit);
            for r in &customers {
                println!(
                    "  #{:<3} {:<10} {:<24} {:>6}",
                    r.ranking,
                    opt(r.customer_id),
                    r.customer_name.clone().unwrap_or_default(),
                    r.quantity
                );
            }
        }
    }
    Ok(())
}

fn opt<T: ToString>(v: Option<T>) -> String {
    v.map(|v| v.to_string()).unwrap_or_else(|| "-".into())
}

/// Ad-hoc query rows in `format` on stdout (string views written as plain strings).
fn print_rows(
    batches: &[acme::query::datafusion::arrow::record_batch::RecordBatch],
    format: Format,
) -> anyhow::Result<()> {
    use acme::query::datafusion::arrow::datatypes::{DataType, Field, Schema};
    let plain: Vec<_> = batches
        .iter()
        .map(|b| {
            let fields: Vec<Field> = b
                .schema()
                .fields()
                .iter()
                .map(|f| match f.data_type() {
                    DataType::Utf8View => f.as_ref().clone().with_data_type(DataType::Utf8),
                    DataType::BinaryView => f.as_ref().clone().with_data_type(DataType::Binary),
                    _ => f.as_ref().clone(),
                })
                .collect();
            let columns = b
                .columns()
                .iter()
                .zip(&fields)
                .map(|(c, f)| arrow::compute::cast(c, f.data_type()))
                .collect::<Result<Vec<_>, _>>()?;
            Ok(arrow::record_batch::RecordBatch::try_new(std::sync::Arc::new(Schema::new(fields)), columns)?)
        })
        .collect::<anyhow::Result<_>>()?;
    let stdout = std::io::stdout().lock();
    match format {
        Format::Table => println!("{}", arrow::util::pretty::pretty_format_batches(&plain)?),
        Format::Json => {
            let mut writer = arrow::json::ArrayWriter::new(stdout);
            writer.write_batches(&plain.iter().collect::<Vec<_>>())?;
            writer.finish()?;
            println!();
        }
        Format::Csv => {
            let mut writer = arrow::csv::Writer::new(stdout);
            for batch in &plain {
                writer.write(batch)?;
            }
        }
    }
    Ok(())
}
