//! The model build: raw changes -> SCD2 histories (intermediate) -> star schema (presentation).
//!
//! Every table is computed by a DataFusion plan (vectorised: window functions, hash joins,
//! aggregates; no row loops) and streamed into a new version of its Delta table, committed
//! with the raw position it covers. A build whose position is already stored changes nothing.

use std::sync::Arc;
use std::time::{Duration, Instant};

use acme_core::raw;
use acme_core::storage::{Manifest, manifests};
use acme_core::{AcmeConfig, CommitMode, CommitOutcome, Layer, Position, Storage};
use arrow::array::{Array, ArrayRef, BooleanArray, Date32Array, Int32Array, RecordBatch, StringArray};
use arrow::compute::cast;
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use chrono::{Datelike, NaiveDate};
use datafusion::prelude::{DataFrame, SessionConfig, SessionContext};
use futures::StreamExt;

use crate::error::{ModelError, Result};
use crate::history::{HistorySpec, attribute_columns, history_sql};

/// Application id of model commits.
pub const MODEL_APP: &str = "acme-model";

/// Names of the presentation tables.
pub mod tables {
    /// Customer dimension with history and surrogate keys (`customer_sk`; -1 = unknown member).
    pub const DIM_CUSTOMER: &str = "dim_customer";
    /// Product dimension with history and surrogate keys (`product_sk`; -1 = unknown member).
    pub const DIM_PRODUCT: &str = "dim_product";
    /// Calendar dimension over the order and delivery dates.
    pub const DIM_DATE: &str = "dim_date";
    /// Order status dimension.
    pub const DIM_STATUS: &str = "dim_status";
    /// One row per order status transition.
    pub const FACT_ORDER_STATUS: &str = "fact_order_status";
    /// Accumulating snapshot of current orders: when each status was reached.
    pub const FACT_ORDERS: &str = "fact_orders";
    /// Current order items with the unit price in force when the order was placed.
    pub const FACT_ORDER_ITEMS: &str = "fact_order_items";
}

/// What a build did.
#[derive(Debug, Clone, Default)]
pub struct ModelReport {
    /// The raw position (highest commit LSN) the model now covers.
    pub position: i64,
    /// True when the model already covered the raw layer and nothing was rebuilt.
    pub up_to_date: bool,
    /// Rows written per table (`layer/table`).
    pub tables: Vec<(String, u64)>,
    /// Wall time.
    pub elapsed: Duration,
}

/// Builder of a model build; `.await` (or [`ModelBuild::run`]) runs it.
#[derive(Debug, Clone)]
pub struct ModelBuild {
    config: AcmeConfig,
    specs: Vec<HistorySpec>,
}

impl ModelBuild {
    /// A build of the ACME model from the raw layer at `config.storage_url`.
    pub fn new(config: AcmeConfig) -> Self {
        Self { config, specs: HistorySpec::acme() }
    }

    /// Run the build.
    pub async fn run(self) -> Result<ModelReport> {
        let started = Instant::now();
        let storage = Storage::new(&self.config.storage_url, self.config.storage_options.clone())?;
        let ctx = SessionContext::new_with_config(SessionConfig::new().with_information_schema(false));
        let mut position = 0i64;
        let mut raw_schemas = Vec::new();
        for spec in &self.specs {
            let table = storage
                .open(Layer::Raw, &spec.table)
                .await?
                .ok_or_else(|| ModelError::NoRawTable { table: spec.table.clone() })?;
            for app in [raw::SNAPSHOT_APP, raw::CDC_APP] {
                position = position.max(table.position(app).await?.unwrap_or(0));
            }
            raw_schemas.push(table.schema()?);
            let provider = table.delta().table_provider().await?;
            ctx.register_table(format!("raw_{}", spec.table), provider)?;
        }
        if let Some(model) = storage.open(Layer::Presentation, tables::FACT_ORDERS).await?
            && let Some(built) = model.position(MODEL_APP).await?
            && built >= position
        {
            // A build that died after its last commit but before its manifest: write it now.
            if storage.get_manifest(manifests::MODEL).await?.is_none_or(|m| m.position < built) {
                let mut manifest = Manifest::new(built);
                for (layer, name) in self.model_tables() {
                    if let Some(table) = storage.open(layer, &name).await? {
                        manifest.record(&table);
                    }
                }
                storage.put_manifest(manifests::MODEL, &manifest).await?;
            }
            return Ok(ModelReport { position, up_to_date: true, tables: Vec::new(), elapsed: started.elapsed() });
        }
        let commit = Position::new(MODEL_APP, position);
        let mut report = ModelReport { position, ..ModelReport::default() };
        let mut manifest = Manifest::new(position);

        // Intermediate: one history per source table.
        for (spec, raw_schema) in self.specs.iter().zip(&raw_schemas) {
            let raw_name = format!("raw_{}", spec.table);
            let truncates = truncations(&ctx, &raw_name).await?;
            let sql = history_sql(spec, &raw_name, &attribute_columns(raw_schema), &truncates);
            let df = ctx.sql(&sql).await?;
            let rows =
                write(&storage, Layer::Intermediate, &spec.history_table(), df, &commit, &self.config, &mut manifest)
                    .await?;
            report.tables.push((format!("intermediate/{}", spec.history_table()), rows));
            let history = storage
                .open(Layer::Intermediate, &spec.history_table())
                .await?
                .ok_or_else(|| ModelError::Internal(format!("{} vanished", spec.history_table())))?;
            let provider = history.delta().table_provider().await?;
            ctx.register_table(spec.history_table(), provider)?;
        }

        // Presentation: the star schema.
        for (name, sql) in star_sql() {
            let df = ctx.sql(&sql).await?;
            let rows = write(&storage, Layer::Presentation, name, df, &commit, &self.config, &mut manifest).await?;
            report.tables.push((format!("presentation/{name}"), rows));
        }
        let dates = date_dimension(&ctx).await?;
        let rows = dates.num_rows() as u64;
        let df = ctx.read_batch(dates)?;
        write(&storage, Layer::Presentation, tables::DIM_DATE, df, &commit, &self.config, &mut manifest).await?;
        report.tables.push((format!("presentation/{}", tables::DIM_DATE), rows));
        // Written last: its position marks the whole model as built.
        let df = ctx.sql(&fact_orders_sql()).await?;
        let rows =
            write(&storage, Layer::Presentation, tables::FACT_ORDERS, df, &commit, &self.config, &mut manifest).await?;
        report.tables.push((format!("presentation/{}", tables::FACT_ORDERS), rows));
        // Readers pin the versions named here: they never see a half-built model.
        storage.put_manifest(manifests::MODEL, &manifest).await?;
        report.elapsed = started.elapsed();
        Ok(report)
    }
}

impl ModelBuild {
    /// Every table the build writes, as (layer, name).
    pub fn model_tables(&self) -> Vec<(Layer, String)> {
        let mut out: Vec<(Layer, String)> =
            self.specs.iter().map(|spec| (Layer::Intermediate, spec.history_table())).collect();
        out.extend(
            [
                tables::DIM_STATUS,
                tables::DIM_CUSTOMER,
                tables::DIM_PRODUCT,
                tables::DIM_DATE,
                tables::FACT_ORDER_STATUS,
                tables::FACT_ORDER_ITEMS,
                tables::FACT_ORDERS,
            ]
            .map(|name| (Layer::Presentation, name.to_string())),
        );
        out
    }
}

impl std::future::IntoFuture for ModelBuild {
    type Output = Result<ModelReport>;
    type IntoFuture = futures::future::BoxFuture<'static, Self::Output>;

    fn into_future(self) -> Self::IntoFuture {
        Box::pin(self.run())
    }
}

async fn truncations(ctx: &SessionContext, raw_name: &str) -> Result<Vec<(i64, i64)>> {
    let batches = ctx
        .sql(&format!(
            "SELECT {lsn}, CAST({ts} AS BIGINT) FROM {raw_name} WHERE {op} = 'truncate' ORDER BY {lsn}",
            lsn = raw::LSN,
            ts = raw::COMMIT_TS,
            op = raw::OP
        ))
        .await?
        .collect()
        .await?;
    let mut out = Vec::new();
    for b in batches {
        let lsn = b.column(0).as_any().downcast_ref::<arrow::array::Int64Array>();
        let ts = b.column(1).as_any().downcast_ref::<arrow::array::Int64Array>();
        if let (Some(lsn), Some(ts)) = (lsn, ts) {
            out.extend(lsn.values().iter().copied().zip(ts.values().iter().copied()));
        }
    }
    Ok(out)
}

/// Stream `df` into a new version of `layer/name` that replaces the previous one.
async fn write(
    storage: &Storage,
    layer: Layer,
    name: &str,
    df: DataFrame,
    position: &Position,
    config: &AcmeConfig,
    manifest: &mut Manifest,
) -> Result<u64> {
    let schema: SchemaRef = Arc::new(Schema::new(
        df.schema()
            .as_arrow()
            .fields()
            .iter()
            .map(|f| {
                let ty = match f.data_type() {
                    DataType::Utf8View | DataType::LargeUtf8 => DataType::Utf8,
                    DataType::BinaryView | DataType::LargeBinary => DataType::Binary,
                    other => other.clone(),
                };
                Field::new(f.name(), ty, true)
            })
            .collect::<Vec<Field>>(),
    ));
    let mut table = storage.open_or_create(layer, name, &schema).await?;
    // Columns added at the source (and so to the raw layer) are added here too; the writer
    // matches columns by name.
    let fields: Vec<Field> = schema.fields().iter().map(|f| f.as_ref().clone()).collect();
    table.add_columns(&fields).await?;
    let stored = table.schema()?;
    if stored.fields().len() != schema.fields().len()
        || schema.fields().iter().any(|f| stored.field_with_name(f.name()).is_err())
    {
        return Err(ModelError::Core(acme_core::Error::SchemaMismatch {
            table: table.name().to_string(),
            message: "the model's columns changed".into(),
        }));
    }
    let mut writer = table.writer(config.target_file_bytes)?;
    let mut stream = df.execute_stream().await?;
    while let Some(batch) = stream.next().await {
        let batch = batch?;
        // The engine may hand out view types (Utf8View) where the plan says Utf8: cast to the
        // table's declared types.
        let columns = batch
            .columns()
            .iter()
            .zip(schema.fields())
            .map(|(c, f)| if c.data_type() == f.data_type() { Ok(Arc::clone(c)) } else { cast(c, f.data_type()) })
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(|e| ModelError::Internal(format!("{name}: {e}")))?;
        let batch = RecordBatch::try_new(Arc::clone(&schema), columns)
            .map_err(|e| ModelError::Internal(format!("{name}: {e}")))?;
        writer.write(table.name(), batch).await?;
    }
    let rows = writer.rows();
    let files = writer.finish(table.name()).await?;
    let outcome = table.commit(files, position, CommitMode::ReplaceAll).await?;
    manifest.record(&table);
    match outcome {
        CommitOutcome::Committed { .. } => Ok(rows),
        CommitOutcome::AlreadyCommitted => Ok(0),
    }
}

/// The star-schema tables other than the date dimension and `fact_orders`.
fn star_sql() -> Vec<(&'static str, String)> {
    vec![
        (
            tables::DIM_STATUS,
            "SELECT * FROM (VALUES (1, 'PENDING', true, true), (2, 'PROCESSING', true, false), \
             (3, 'REPROCESSING', true, false), (4, 'COMPLETED', false, false)) \
             AS s(status_sk, status, is_open, is_pending)"
                .to_string(),
        ),
        (
            tables::DIM_CUSTOMER,
            "SELECT CAST(row_number() OVER (ORDER BY customer_id, valid_from_lsn) AS BIGINT) AS customer_sk, \
               customer_id, customer_name, is_active, customer_address, valid_from, valid_to, is_current \
             FROM customers_history WHERE NOT is_deleted \
             UNION ALL \
             SELECT CAST(-1 AS BIGINT), CAST(NULL AS BIGINT), 'Unknown customer', CAST(NULL AS BOOLEAN), \
               CAST(NULL AS VARCHAR), arrow_cast(CAST(NULL AS BIGINT), 'Timestamp(Microsecond, Some(\"UTC\"))'), arrow_cast(CAST(NULL AS BIGINT), 'Timestamp(Microsecond, Some(\"UTC\"))'), true"
                .to_string(),
        ),
        (
            tables::DIM_PRODUCT,
            "SELECT CAST(row_number() OVER (ORDER BY product_id, valid_from_lsn) AS BIGINT) AS product_sk, \
               product_id, product_name, barcode, unity_price, is_active, valid_from, valid_to, is_current \
             FROM products_history WHERE NOT is_deleted \
             UNION ALL \
             SELECT CAST(-1 AS BIGINT), CAST(NULL AS BIGINT), 'Unknown product', CAST(NULL AS VARCHAR), \
               CAST(NULL AS DECIMAL(38, 10)), CAST(NULL AS BOOLEAN), arrow_cast(CAST(NULL AS BIGINT), 'Timestamp(Microsecond, Some(\"UTC\"))'), arrow_cast(CAST(NULL AS BIGINT), 'Timestamp(Microsecond, Some(\"UTC\"))'), true"
                .to_string(),
        ),
        (
            tables::FACT_ORDER_STATUS,
            "SELECT order_id, status, entered_at, left_at, valid_from_lsn AS entered_lsn FROM ( \
               SELECT order_id, status, valid_from AS entered_at, valid_to AS left_at, valid_from_lsn, \
                 LAG(status) OVER (PARTITION BY order_id ORDER BY valid_from_lsn) AS previous_status \
               FROM orders_history WHERE NOT is_deleted) h \
             WHERE previous_status IS NULL OR previous_status <> status OR status IS NULL"
                .to_string(),
        ),
        (
            tables::FACT_ORDER_ITEMS,
            "WITH placed AS (SELECT order_id, min(valid_from) AS placed_at FROM orders_history GROUP BY order_id), \
             items AS (SELECT i.order_item_id, i.order_id, i.product_id, i.quanity AS quantity, \
                 coalesce(p.placed_at, i.valid_from) AS placed_at \
               FROM order_items_history i LEFT JOIN placed p ON p.order_id = i.order_id \
               WHERE i.is_current AND NOT i.is_deleted) \
             SELECT it.order_item_id, it.order_id, it.product_id, coalesce(d.product_sk, -1) AS product_sk, \
               it.quantity, d.unity_price AS unit_price, CAST(it.quantity AS DECIMAL(38, 10)) * d.unity_price AS amount \
             FROM items it LEFT JOIN (SELECT product_sk, product_id, unity_price, \
                 CASE WHEN row_number() OVER (PARTITION BY product_id ORDER BY valid_from) = 1 \
                   THEN arrow_cast(0, 'Timestamp(Microsecond, Some(\"UTC\"))') ELSE valid_from END AS valid_from, \
                 valid_to FROM dim_product_source) d \
               ON d.product_id = it.product_id AND d.valid_from <= it.placed_at \
                 AND (d.valid_to IS NULL OR d.valid_to > it.placed_at)"
                .replace(
                    "dim_product_source",
                    "(SELECT CAST(row_number() OVER (ORDER BY product_id, valid_from_lsn) AS BIGINT) AS product_sk, \
                       product_id, unity_price, valid_from, valid_to FROM products_history WHERE NOT is_deleted)",
                ),
        ),
    ]
}

fn fact_orders_sql() -> String {
    // The customer key is the customer version in force when the order was placed (the same
    // numbering as dim_customer). An order placed before its customer was seen (a late-arriving
    // key) takes the customer's first version once it arrives, and the unknown member (-1)
    // until then: no order is dropped.
    "WITH reached AS (SELECT order_id, min(valid_from) AS placed_at, \
         min(CASE WHEN status = 'PENDING' THEN valid_from END) AS pending_at, \
         min(CASE WHEN status = 'PROCESSING' THEN valid_from END) AS processing_at, \
         min(CASE WHEN status = 'REPROCESSING' THEN valid_from END) AS reprocessing_at, \
         min(CASE WHEN status = 'COMPLETED' THEN valid_from END) AS completed_at \
       FROM orders_history WHERE NOT is_deleted GROUP BY order_id), \
     customers AS (SELECT customer_id, valid_from, valid_to, \
         CAST(row_number() OVER (ORDER BY customer_id, valid_from_lsn) AS BIGINT) AS customer_sk \
       FROM customers_history WHERE NOT is_deleted), \
     first_version AS (SELECT customer_id, min(customer_sk) AS customer_sk FROM customers GROUP BY customer_id) \
     SELECT o.order_id, o.customer_id, coalesce(c.customer_sk, f.customer_sk, -1) AS customer_sk, o.order_date, \
       o.delivery_date, o.status, o.status <> 'COMPLETED' AS is_open, r.pending_at, r.processing_at, \
       r.reprocessing_at, r.completed_at, o.created_at, o.updated_at \
     FROM orders_history o \
     LEFT JOIN reached r ON r.order_id = o.order_id \
     LEFT JOIN customers c ON c.customer_id = o.customer_id AND c.valid_from <= r.placed_at \
       AND (c.valid_to IS NULL OR c.valid_to > r.placed_at) \
     LEFT JOIN first_version f ON f.customer_id = o.customer_id \
     WHERE o.is_current AND NOT o.is_deleted"
        .to_string()
}

/// One row per day from the first order date to the last delivery date.
async fn date_dimension(ctx: &SessionContext) -> Result<RecordBatch> {
    let batches = ctx
        .sql("SELECT CAST(min(order_date) AS INT), CAST(max(delivery_date) AS INT) FROM orders_history")
        .await?
        .collect()
        .await?;
    let range = batches.first().and_then(|b| {
        let lo = b.column(0).as_any().downcast_ref::<Int32Array>()?;
        let hi = b.column(1).as_any().downcast_ref::<Int32Array>()?;
        (lo.len() == 1 && !lo.is_null(0) && !hi.is_null(0)).then(|| (lo.value(0), hi.value(0)))
    });
    let days: Vec<i32> = match range {
        Some((lo, hi)) if hi >= lo => (lo..=hi).collect(),
        _ => Vec::new(),
    };
    let epoch = NaiveDate::from_ymd_opt(1970, 1, 1).unwrap_or_default();
    let dates: Vec<NaiveDate> = days.iter().map(|d| epoch + chrono::Duration::days(i64::from(*d))).collect();
    let columns: Vec<ArrayRef> = vec![
        Arc::new(Date32Array::from(days.clone())),
        Arc::new(Int32Array::from(dates.iter().map(|d| d.year()).collect::<Vec<_>>())),
        Arc::new(Int32Array::from(dates.iter().map(|d| d.month() as i32).collect::<Vec<_>>())),
        Arc::new(Int32Array::from(dates.iter().map(|d| d.day() as i32).collect::<Vec<_>>())),
        Arc::new(Int32Array::from(dates.iter().map(|d| d.weekday().number_from_monday() as i32).collect::<Vec<_>>())),
        Arc::new(StringArray::from_iter_values(dates.iter().map(|d| d.weekday().to_string()))),
        Arc::new(BooleanArray::from(dates.iter().map(|d| d.weekday().number_from_monday() >= 6).collect::<Vec<_>>())),
    ];
    let schema = Arc::new(Schema::new(vec![
        Field::new("date", DataType::Date32, true),
        Field::new("year", DataType::Int32, true),
        Field::new("month", DataType::Int32, true),
        Field::new("day", DataType::Int32, true),
        Field::new("iso_weekday", DataType::Int32, true),
        Field::new("weekday_name", DataType::Utf8, true),
        Field::new("is_weekend", DataType::Boolean, true),
    ]));
    RecordBatch::try_new(schema, columns).map_err(|e| ModelError::Internal(format!("dim_date: {e}")))
}
