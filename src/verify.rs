//! `verify`: reconcile a source with its warehouse at one LSN.
//!
//! 1. The source is read at one position: a temporary replication slot exports a snapshot
//!    holding exactly the transactions committed before its consistent point `L`.
//! 2. The warehouse must hold every change before `L`: its raw layer has reached `L`, or the
//!    warehouse's slot confirmed `L` (acme confirms only what it committed), or, when no
//!    writer holds the slot, the slot shows no change to the tables between the raw layer's
//!    position and `L`. While a writer runs, verify waits for it (up to
//!    [`VerifyOptions::wait`]); otherwise the warehouse is behind and verify says so.
//! 3. Per table, both sides give their row count and an order-independent content checksum
//!    (the sum of a hash of each row's values, in Arrow's row format, so equal values hash
//!    equally on both sides): the source from a binary `COPY` in the snapshot, the warehouse
//!    from its history's versions in force at `L`. Where they differ, a second pass over one
//!    of 256 key buckets whose checksums differ names a sample of the differing keys.
//!
//! Memory stays bounded: rows are hashed batch by batch; only the second pass keeps the keys
//! of one bucket.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::time::{Duration, Instant};

use acme_core::AcmeConfig;
use acme_core::config::CdcMode;
use acme_ingest::copy::{columns_schema, copy_columns};
use acme_ingest::replication::{ReplicationConnection, create_temporary_slot_exporting_snapshot};
use acme_ingest::{IngestError, Lsn, SourceTable, SourceUrl};
use acme_query::datafusion::arrow::array::{ArrayRef, RecordBatch};
use acme_query::datafusion::arrow::compute::cast;
use acme_query::datafusion::arrow::row::{RowConverter, Rows, SortField};
use acme_query::{QueryError, Warehouse};
use futures::StreamExt;

use crate::PipelineError;

/// Key buckets of the checksums: a difference is looked for in one bucket's keys.
const BUCKETS: usize = 256;

/// How [`verify`] runs.
#[derive(Debug, Clone)]
pub struct VerifyOptions {
    /// How long to wait for a running writer to bring the warehouse to the source's position.
    pub wait: Duration,
    /// How many differing keys to name per table.
    pub sample: usize,
}

impl Default for VerifyOptions {
    fn default() -> Self {
        Self { wait: Duration::from_secs(60), sample: 10 }
    }
}

/// What [`verify`] found.
#[derive(Debug, Clone)]
pub struct VerifyReport {
    /// The source position both sides were read at.
    pub lsn: Lsn,
    /// The warehouse's raw position when it was read.
    pub warehouse_position: Option<Lsn>,
    /// Per table, in the configuration's order.
    pub tables: Vec<TableCheck>,
}

impl VerifyReport {
    /// Whether every table is equal.
    pub fn is_equal(&self) -> bool {
        self.tables.iter().all(TableCheck::is_equal)
    }
}

/// One table's comparison.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableCheck {
    /// `schema.table`.
    pub table: String,
    /// Rows at the source.
    pub source_rows: u64,
    /// Rows in the warehouse (versions in force at the LSN).
    pub warehouse_rows: u64,
    /// The source's content checksum.
    pub source_checksum: u64,
    /// The warehouse's content checksum.
    pub warehouse_checksum: u64,
    /// A sample of the keys whose rows differ (missing on one side, or with other values),
    /// rendered as `column=value, ...`.
    pub differing_keys: Vec<String>,
}

impl TableCheck {
    /// Whether both sides hold the same rows.
    pub fn is_equal(&self) -> bool {
        self.source_rows == self.warehouse_rows && self.source_checksum == self.warehouse_checksum
    }
}

impl std::fmt::Display for TableCheck {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let verdict = if self.is_equal() { "equal" } else { "DIFFERENT" };
        write!(
            f,
            "{}: {verdict}: source {} rows, checksum {:016x}; warehouse {} rows, checksum {:016x}",
            self.table, self.source_rows, self.source_checksum, self.warehouse_rows, self.warehouse_checksum
        )?;
        if !self.differing_keys.is_empty() {
            write!(f, "; keys that differ: {}", self.differing_keys.join("; "))?;
        }
        Ok(())
    }
}

/// Row count, checksum and per-bucket checksums of one side of one table.
struct Sums {
    rows: u64,
    checksum: u64,
    buckets: Vec<(u64, u64)>,
}

impl Sums {
    fn new() -> Self {
        Self { rows: 0, checksum: 0, buckets: vec![(0, 0); BUCKETS] }
    }
}

/// Hashes the rows of one table: the key columns and all columns, in Arrow's row format.
struct RowHasher {
    schema: Arc<acme_query::datafusion::arrow::datatypes::Schema>,
    key_columns: Vec<usize>,
    keys: RowConverter,
    values: RowConverter,
}

impl RowHasher {
    fn new(table: &SourceTable) -> Result<Self, PipelineError> {
        let schema = columns_schema(table);
        let key_columns: Vec<usize> =
            table.primary_key.iter().filter_map(|k| table.columns.iter().position(|c| &c.name == k)).collect();
        if key_columns.is_empty() {
            return Err(shape(table, "has no primary key: verify compares rows by key".into()));
        }
        let field = |i: usize| SortField::new(schema.field(i).data_type().clone());
        let keys = RowConverter::new(key_columns.iter().map(|&i| field(i)).collect()).map_err(arrow_error)?;
        let values = RowConverter::new((0..schema.fields().len()).map(field).collect()).map_err(arrow_error)?;
        Ok(Self { schema, key_columns, keys, values })
    }

    /// `batch`'s columns cast to the source's types, in the source's order.
    fn conform(&self, batch: &RecordBatch) -> Result<Vec<ArrayRef>, PipelineError> {
        self.schema
            .fields()
            .iter()
            .map(|field| {
                let column = batch
                    .column_by_name(field.name())
                    .ok_or_else(|| PipelineError::Verify(format!("the warehouse has no column `{}`", field.name())))?;
                cast(column, field.data_type()).map_err(arrow_error)
            })
            .collect()
    }

    fn rows(&self, columns: &[ArrayRef]) -> Result<(Rows, Rows), PipelineError> {
        let keys: Vec<ArrayRef> = self.key_columns.iter().map(|&i| Arc::clone(&columns[i])).collect();
        Ok((
            self.keys.convert_columns(&keys).map_err(arrow_error)?,
            self.values.convert_columns(columns).map_err(arrow_error)?,
        ))
    }

    fn add(&self, sums: &mut Sums, batch: &RecordBatch) -> Result<(), PipelineError> {
        let columns = self.conform(batch)?;
        let (keys, values) = self.rows(&columns)?;
        for (key, value) in keys.iter().zip(values.iter()) {
            let (bucket, row) = (bucket(key.as_ref()), hash(value.as_ref()));
            sums.rows += 1;
            sums.checksum = sums.checksum.wrapping_add(row);
            let slot = &mut sums.buckets[bucket];
            slot.0 += 1;
            slot.1 = slot.1.wrapping_add(row);
        }
        Ok(())
    }

    /// Row hashes by key, of the rows in `wanted`'s bucket; the rendered key alongside.
    fn collect(
        &self,
        into: &mut HashMap<Vec<u8>, (u64, String)>,
        batch: &RecordBatch,
        wanted: usize,
    ) -> Result<(), PipelineError> {
        let columns = self.conform(batch)?;
        let (keys, values) = self.rows(&columns)?;
        for (i, (key, value)) in keys.iter().zip(values.iter()).enumerate() {
            if bucket(key.as_ref()) != wanted {
                continue;
            }
            let rendered = self
                .key_columns
                .iter()
                .map(|&c| {
                    let value = acme_query::datafusion::arrow::util::display::array_value_to_string(&columns[c], i)
                        .unwrap_or_else(|_| "?".into());
                    format!("{}={value}", self.schema.field(c).name())
                })
                .collect::<Vec<_>>()
                .join(", ");
            // Two rows of one key on one side (a duplicate) count as a difference too.
            let row = hash(value.as_ref());
            into.entry(key.as_ref().to_vec())
                .and_modify(|e| e.0 = e.0.wrapping_add(row).wrapping_add(1))
                .or_insert((row, rendered));
        }
        Ok(())
    }
}

/// Keep `error` in `failure` and stop the copy it happened in.
fn stopped(failure: &mut Option<PipelineError>, error: PipelineError) -> IngestError {
    let message = error.to_string();
    *failure = Some(error);
    IngestError::Internal(format!("verify stopped reading the source: {message}"))
}

fn hash(bytes: &[u8]) -> u64 {
    let mut hasher = std::hash::DefaultHasher::new();
    bytes.hash(&mut hasher);
    hasher.finish()
}

fn bucket(key: &[u8]) -> usize {
    (hash(key) >> 56) as usize % BUCKETS
}

fn arrow_error(e: acme_query::datafusion::arrow::error::ArrowError) -> PipelineError {
    PipelineError::Query(QueryError::from(e))
}

fn shape(table: &SourceTable, message: String) -> PipelineError {
    PipelineError::Verify(format!("table {}: {message}", table.qualified()))
}

fn sql_error(doing: &str) -> impl Fn(tokio_postgres::Error) -> PipelineError + '_ {
    move |source| PipelineError::Ingest(IngestError::Source { context: doing.to_string(), source })
}

/// Reconcile the source of `config` with its warehouse at one LSN (see the module's doc).
///
/// Needs the logical capture modes (a replication slot), the `REPLICATION` privilege, and one
/// free replication slot on the source for the moment of the snapshot.
pub async fn verify(config: &AcmeConfig, options: &VerifyOptions) -> Result<VerifyReport, PipelineError> {
    if config.cdc_mode == CdcMode::Triggers {
        return Err(PipelineError::Config(acme_core::Error::Config {
            setting: "cdc_mode",
            message: "verify reads the source at one position through a replication slot; with the trigger \
                      fallback, stop the writers of the source, run `sync --once`, then compare"
                .into(),
        }));
    }
    let url = SourceUrl::parse(config.source_url.as_deref().ok_or(IngestError::NoSource)?)?
        .with_timeout(config.source_timeout);
    let client = url.connect().await?;
    let mut tables = Vec::with_capacity(config.tables.len());
    for name in &config.tables {
        tables.push(SourceTable::load(&client, &config.schema, name).await?);
    }
    // The source at one position: a temporary slot's exported snapshot, imported by `client`
    // before the replication connection does anything else.
    let mut replication = ReplicationConnection::connect(&url).await?;
    let slot = format!("acme_verify_{}", std::process::id());
    let created = create_temporary_slot_exporting_snapshot(&mut replication, &slot).await?;
    let lsn = Lsn::parse(&created.consistent_point)?;
    let import = format!(
        "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY; SET TRANSACTION SNAPSHOT '{}'",
        created.snapshot_name.replace('\'', "''")
    );
    url.bounded_sql("importing the verify snapshot", client.batch_execute(&import)).await?;
    replication.close().await;

    let warehouse = covering_warehouse(config, &url, lsn, options.wait).await?;
    if warehouse.model_position().is_none() {
        return Err(PipelineError::Verify(format!(
            "the warehouse at {} has no model yet: run `sync` until its first model build, then verify",
            config.storage_url
        )));
    }
    let mut report = VerifyReport { lsn, warehouse_position: warehouse.raw_position(), tables: Vec::new() };
    for table in &tables {
        report
            .tables
            .push(check_table(&url, &client, &warehouse, table, lsn, config.batch_rows, options.sample).await?);
    }
    let _ = client.batch_execute("COMMIT").await;
    Ok(report)
}

/// A warehouse handle holding every change committed before `lsn` (see the module's doc).
async fn covering_warehouse(
    config: &AcmeConfig,
    url: &SourceUrl,
    lsn: Lsn,
    wait: Duration,
) -> Result<Warehouse, PipelineError> {
    let client = url.connect().await?;
    let started = Instant::now();
    let mut held: Option<Warehouse> = None;
    loop {
        let slot = client
            .query_opt(
                "SELECT confirmed_flush_lsn::text, active FROM pg_replication_slots WHERE slot_name = $1",
                &[&config.slot],
            )
            .await
            .map_err(sql_error("reading the warehouse's replication slot"))?;
        let Some(slot) = slot else {
            return Err(IngestError::SlotLost { slot: config.slot.clone() }.into());
        };
        let (confirmed, active): (Option<String>, bool) = (slot.get(0), slot.get(1));
        let confirmed = confirmed.as_deref().map(Lsn::parse).transpose()?;
        // Opened (or refreshed) after the slot was read: a confirmed position is already in
        // this handle.
        let warehouse = match held.take() {
            None => Warehouse::open_with_options(&config.storage_url, config.storage_options.clone()).await?,
            Some(previous) => previous.refreshed().await?.unwrap_or(previous),
        };
        let position = warehouse.raw_position().unwrap_or_default();
        if position >= lsn || confirmed.is_some_and(|c| c >= lsn) {
            return Ok(warehouse);
        }
        if !active {
            // No writer: the slot tells whether anything changed between the two positions.
            let pending = pending_changes(&client, config, position, lsn).await?;
            if pending == 0 {
                return Ok(warehouse);
            }
            return Err(PipelineError::Behind { position, lsn: lsn.to_string(), pending });
        }
        if started.elapsed() >= wait {
            return Err(PipelineError::Behind { position, lsn: lsn.to_string(), pending: 0 });
        }
        held = Some(warehouse);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Changes to the published tables in transactions committed after `position` and before
/// `lsn`, as the (inactive) slot of the warehouse still holds them; nothing is consumed.
async fn pending_changes(
    client: &tokio_postgres::Client,
    config: &AcmeConfig,
    position: Lsn,
    lsn: Lsn,
) -> Result<u64, PipelineError> {
    // pgoutput messages in decoding order: a Begin ('B') carries its transaction's commit LSN
    // (bytes 1-8), then come its changes (Insert 'I', Update 'U', Delete 'D', Truncate 'T').
    // Transactions are decoded in commit order, so the running maximum of the commit LSNs is
    // the current transaction's.
    let sql = "WITH m AS ( \
                 SELECT n, get_byte(data, 0) AS kind, \
                        CASE WHEN get_byte(data, 0) = 66 \
                             THEN ('x' || encode(substr(data, 2, 8), 'hex'))::bit(64)::bigint END AS commit_lsn \
                 FROM pg_logical_slot_peek_binary_changes($1, $2::text::pg_lsn, NULL, \
                        'proto_version', '1', 'publication_names', $3) WITH ORDINALITY AS c(lsn, xid, data, n)), \
               t AS (SELECT kind, max(commit_lsn) OVER (ORDER BY n) AS tx_lsn FROM m) \
               SELECT count(*) FROM t WHERE kind IN (73, 85, 68, 84) AND tx_lsn > $4 AND tx_lsn < $5";
    let row = client
        .query_one(sql, &[&config.slot, &lsn.to_string(), &config.publication, &position.as_stored(), &lsn.as_stored()])
        .await
        .map_err(sql_error("reading the changes the warehouse's slot holds"))?;
    Ok(row.get::<_, i64>(0) as u64)
}

async fn check_table(
    url: &SourceUrl,
    client: &tokio_postgres::Client,
    warehouse: &Warehouse,
    table: &SourceTable,
    lsn: Lsn,
    batch_rows: usize,
    sample: usize,
) -> Result<TableCheck, PipelineError> {
    let hasher = RowHasher::new(table)?;
    let mut source = Sums::new();
    let mut failure = None;
    let copied = copy_columns(url, client, table, batch_rows, |batch| {
        hasher.add(&mut source, &batch).map_err(|e| stopped(&mut failure, e))
    })
    .await;
    failure.map_or(Ok(()), Err)?;
    copied?;
    let mut stored = Sums::new();
    let sql = warehouse_sql(table, lsn);
    let mut stream = warehouse.sql(&sql).await?.execute_stream().await.map_err(QueryError::from)?;
    while let Some(batch) = stream.next().await {
        hasher.add(&mut stored, &batch.map_err(QueryError::from)?)?;
    }
    let mut check = TableCheck {
        table: table.qualified(),
        source_rows: source.rows,
        warehouse_rows: stored.rows,
        source_checksum: source.checksum,
        warehouse_checksum: stored.checksum,
        differing_keys: Vec::new(),
    };
    if check.is_equal() || sample == 0 {
        return Ok(check);
    }
    // A second pass over the first bucket that differs names its differing keys.
    let Some(wanted) = (0..BUCKETS).find(|&b| source.buckets[b] != stored.buckets[b]) else { return Ok(check) };
    let mut at_source = HashMap::new();
    let mut failure = None;
    let copied = copy_columns(url, client, table, batch_rows, |batch| {
        hasher.collect(&mut at_source, &batch, wanted).map_err(|e| stopped(&mut failure, e))
    })
    .await;
    failure.map_or(Ok(()), Err)?;
    copied?;
    let mut in_warehouse = HashMap::new();
    let mut stream = warehouse.sql(&sql).await?.execute_stream().await.map_err(QueryError::from)?;
    while let Some(batch) = stream.next().await {
        hasher.collect(&mut in_warehouse, &batch.map_err(QueryError::from)?, wanted)?;
    }
    let mut differing: Vec<String> = at_source
        .iter()
        .filter(|(key, (row, _))| in_warehouse.get(*key).map(|(r, _)| r) != Some(row))
        .map(|(_, (_, rendered))| rendered.clone())
        .chain(in_warehouse.iter().filter(|(key, _)| !at_source.contains_key(*key)).map(|(_, (_, r))| r.clone()))
        .collect();
    differing.sort();
    differing.truncate(sample);
    check.differing_keys = differing;
    Ok(check)
}

/// The warehouse's rows of `table` in force just before `lsn`: its history's versions.
fn warehouse_sql(table: &SourceTable, lsn: Lsn) -> String {
    format!(
        "SELECT {} FROM {} WHERE {}",
        table.column_list(),
        acme_ingest::source::quote_ident(&format!("{}_history", table.name)),
        acme_model::history::state_at_lsn_predicate(lsn.0 as i64)
    )
}
