//! The trigger fallback ([`CdcMode::Triggers`](acme_core::CdcMode::Triggers)): for sources
//! where logical replication is not allowed (no `wal_level = logical`, no REPLICATION
//! privilege), audit triggers write every change into a changelog table that acme polls by
//! change id. It produces the same raw-layer rows as logical decoding, at the cost the seed
//! paid: each source write also writes a changelog row.
//!
//! Objects (all named after the warehouse's `slot` setting, so warehouses never share them):
//! - `acme_cdc.<slot>_changes`: one row per change, with the row before and after it as
//!   `jsonb`, the writing transaction (`pg_current_xact_id()`) and the clock time;
//! - `acme_cdc.<slot>_capture()`: the trigger function;
//! - triggers `<slot>_capture` (`AFTER INSERT OR UPDATE OR DELETE ... FOR EACH ROW`, with the
//!   table's primary-key columns as arguments: an update of the key is logged as a delete of
//!   the old key and an insert of the new one, as logical decoding's changes are stored) and
//!   `<slot>_capture_truncate` (`AFTER TRUNCATE ... FOR EACH STATEMENT`) on every table.
//!
//! Polling, exactly once:
//! 1. *Claim*: one statement stamps the visible, unclaimed changes of the first transactions
//!    (by their last change id) with the next batch number, each transaction's ordinal in the
//!    batch and each change's position in its transaction: as many whole transactions as fit
//!    in `max_batch_changes` (at least one). A transaction's changes become visible together,
//!    so a batch never splits one; changes of transactions the snapshot already saw are
//!    deleted instead.
//! 2. *Read* the claimed changes table by table, typed by the server
//!    (`jsonb_populate_record` into the table's own row type, sent in binary), straight into
//!    the Arrow builders; commit the raw tables with their positions.
//! 3. *Release*: delete the claimed rows. A crash before the release replays the claimed
//!    batches, and each raw table skips what its stored position already covers.
//!
//! Positions: a change of batch `b`, transaction ordinal `t` gets the synthetic commit LSN
//! `snapshot LSN + b * 2^32 + t`. Every two transactions that wrote the same row are ordered
//! as they committed: the second waited for the first's row lock, so its last change id is
//! the higher one, and it was either visible to the same claim (which orders by that id, and
//! takes the first transactions in that order) or committed after the first was claimed (a
//! later batch). The commit time of a
//! change is the clock time of its transaction's last change: a trigger cannot see the commit.

use tokio_postgres::Client;
use tokio_postgres::types::{FromSql, Type};

use crate::error::{IngestError, Result};
use crate::source::{SourceTable, quote_ident};

/// Schema of acme's changelog objects on the source.
pub const SCHEMA: &str = "acme_cdc";

/// Bits of a synthetic LSN below the batch number (transaction ordinals).
const BATCH_SHIFT: u32 = 32;

/// A binary value as the server sent it, for any type (decoded later by the column builders).
#[derive(Debug, Clone, Copy)]
pub struct RawValue<'a>(pub &'a [u8]);

impl<'a> FromSql<'a> for RawValue<'a> {
    fn from_sql(_: &Type, raw: &'a [u8]) -> std::result::Result<Self, Box<dyn std::error::Error + Sync + Send>> {
        Ok(RawValue(raw))
    }

    fn accepts(_: &Type) -> bool {
        true
    }
}

/// The changelog objects of one warehouse.
#[derive(Debug, Clone)]
pub struct Changelog {
    slot: String,
    /// `"acme_cdc"."<slot>_changes"`.
    log: String,
    /// `"acme_cdc"."<slot>_capture"`.
    function: String,
}

fn sql(context: impl Into<String>) -> impl FnOnce(tokio_postgres::Error) -> IngestError {
    let context = context.into();
    move |source| IngestError::Source { context, source }
}

impl Changelog {
    /// The changelog of the warehouse whose `slot` setting is `slot`.
    pub fn new(slot: &str) -> Self {
        Self {
            slot: slot.to_string(),
            log: format!("{}.{}", quote_ident(SCHEMA), quote_ident(&format!("{slot}_changes"))),
            function: format!("{}.{}", quote_ident(SCHEMA), quote_ident(&format!("{slot}_capture"))),
        }
    }

    /// The changelog table, quoted for SQL.
    pub fn table(&self) -> &str {
        &self.log
    }

    /// Names of the row trigger and the TRUNCATE trigger (unquoted).
    fn trigger_names(&self) -> [String; 2] {
        [format!("{}_capture", self.slot), format!("{}_capture_truncate", self.slot)]
    }

    /// Create (or keep) the changelog, the trigger function and the triggers on `tables`.
    ///
    /// The source keeps writing meanwhile, so this must never make a writer's transaction
    /// fail: creating a trigger locks its table against writers, and a writer that holds one
    /// table and wants another could otherwise deadlock with it. So the changelog and the
    /// function are created first, on their own (no source table is locked), and then one
    /// statement takes every table's lock, bounded well below the server's
    /// `deadlock_timeout`: it gives up before any waiting writer would even look for a
    /// deadlock, and is retried with backoff. Once every lock is held the triggers are created
    /// without waiting again, and writers resume at the commit (a pause of at most the bound).
    /// Creating a trigger waits for the table's running writers, so every transaction that
    /// commits after this returns is captured.
    pub async fn install(&self, client: &Client, tables: &[SourceTable]) -> Result<()> {
        let exists: bool = client
            .query_one("SELECT to_regclass($1) IS NOT NULL", &[&self.log])
            .await
            .map_err(sql("looking for the changelog"))?
            .get(0);
        let mut objects = String::from("BEGIN;");
        if !exists {
            objects.push_str(&format!(
                "CREATE SCHEMA IF NOT EXISTS {schema};
                 CREATE TABLE {log} (
                     change_id bigserial PRIMARY KEY,
                     txid xid8 NOT NULL DEFAULT pg_current_xact_id(),
                     changed_at timestamptz NOT NULL DEFAULT clock_timestamp(),
                     table_name text NOT NULL,
                     op text NOT NULL,
                     new_row jsonb,
                     old_row jsonb,
                     batch int8,
                     tx_no int8,
                     seq int8,
                     tx_time timestamptz);
                 CREATE INDEX {unclaimed} ON {log} (change_id) WHERE batch IS NULL;
                 CREATE INDEX {claimed} ON {log} (table_name, batch, tx_no, seq) WHERE batch IS NOT NULL;",
                schema = quote_ident(SCHEMA),
                log = self.log,
                unclaimed = quote_ident(&format!("{}_unclaimed", self.slot)),
                claimed = quote_ident(&format!("{}_claimed", self.slot)),
            ));
        }
        objects.push_str(&format!(
            "CREATE OR REPLACE FUNCTION {function}() RETURNS trigger LANGUAGE plpgsql AS $acme$
             DECLARE
                 new_row jsonb;
                 old_row jsonb;
                 key_column text;
                 key_changed boolean := false;
             BEGIN
                 IF TG_OP = 'INSERT' THEN
                     INSERT INTO {log} (table_name, op, new_row) VALUES (TG_TABLE_NAME, 'insert', to_jsonb(NEW));
                 ELSIF TG_OP = 'UPDATE' THEN
                     new_row := to_jsonb(NEW);
                     old_row := to_jsonb(OLD);
                     -- The trigger's arguments name the primary-key columns: an update of the
                     -- key is logged as a delete of the old key and an insert of the new one.
                     IF TG_NARGS > 0 THEN
                         FOREACH key_column IN ARRAY TG_ARGV LOOP
                             key_changed := key_changed OR (new_row -> key_column) IS DISTINCT FROM (old_row -> key_column);
                         END LOOP;
                     END IF;
                     IF key_changed THEN
                         INSERT INTO {log} (table_name, op, old_row) VALUES (TG_TABLE_NAME, 'delete', old_row);
                         INSERT INTO {log} (table_name, op, new_row) VALUES (TG_TABLE_NAME, 'insert', new_row);
                     ELSE
                         INSERT INTO {log} (table_name, op, new_row, old_row)
                         VALUES (TG_TABLE_NAME, 'update', new_row, old_row);
                     END IF;
                 ELSIF TG_OP = 'DELETE' THEN
                     INSERT INTO {log} (table_name, op, old_row) VALUES (TG_TABLE_NAME, 'delete', to_jsonb(OLD));
                 ELSE
                     INSERT INTO {log} (table_name, op) VALUES (TG_TABLE_NAME, 'truncate');
                 END IF;
                 RETURN NULL;
             END $acme$;
             COMMIT;",
            log = self.log,
            function = self.function,
        ));
        run_script(client, &objects, "creating the changelog").await?;

        // Triggers: created where missing, enabled where disabled (an earlier attempt may have
        // left some), created again where their arguments (the row trigger's: the table's
        // primary-key columns) differ, as when an earlier version of acme installed them; the
        // others are kept as they are. (Dropping and creating a trigger again in the locked
        // transaction below loses no change.)
        let mut script = String::new();
        let mut replacing = false;
        // (Each event with whether its trigger takes the key columns as arguments.)
        let events = [
            ("AFTER INSERT OR UPDATE OR DELETE ON {t} FOR EACH ROW EXECUTE FUNCTION {f}({args})", true),
            ("AFTER TRUNCATE ON {t} FOR EACH STATEMENT EXECUTE FUNCTION {f}()", false),
        ];
        for table in tables {
            for (name, (create, keyed)) in self.trigger_names().into_iter().zip(events) {
                let wanted: &[String] = if keyed { &table.primary_key } else { &[] };
                let state: Option<(String, Vec<u8>)> = client
                    .query_opt(
                        "SELECT tgenabled::text, tgargs FROM pg_trigger WHERE tgrelid = $1::int8::oid AND tgname = $2",
                        &[&i64::from(table.oid), &name],
                    )
                    .await
                    .map_err(sql("looking for the capture triggers"))?
                    .map(|row| (row.get(0), row.get(1)));
                let args = wanted.iter().map(|k| crate::teardown::quote_literal(k)).collect::<Vec<_>>().join(", ");
                let create =
                    create.replace("{t}", &table.quoted()).replace("{f}", &self.function).replace("{args}", &args);
                let (trigger, on) = (quote_ident(&name), table.quoted());
                match state {
                    None => script.push_str(&format!("CREATE TRIGGER {trigger} {create};")),
                    // `tgargs`: each argument followed by a NUL byte.
                    Some((_, stored))
                        if stored != wanted.iter().flat_map(|k| k.bytes().chain([0])).collect::<Vec<_>>() =>
                    {
                        script.push_str(&format!("DROP TRIGGER {trigger} ON {on}; CREATE TRIGGER {trigger} {create};"));
                        replacing = true;
                    }
                    Some((enabled, _)) if enabled == "D" => {
                        script.push_str(&format!("ALTER TABLE {on} ENABLE TRIGGER {trigger};"))
                    }
                    Some(_) => {}
                }
            }
        }
        if script.is_empty() {
            return Ok(());
        }
        // Dropping a trigger takes the table's strongest lock: taken up front, by the bounded
        // attempts, rather than by an upgrade that would wait unbounded behind the readers.
        let mode = if replacing { "ACCESS EXCLUSIVE" } else { "SHARE ROW EXCLUSIVE" };
        with_table_locks(client, tables, mode, &script, "installing the capture triggers").await
    }

    /// Remove the triggers from `tables`, then the function and the changelog: run it when a
    /// warehouse that used the trigger fallback is retired. Dropping a trigger locks its table
    /// exclusively; the locks are taken as [`Changelog::install`] takes them.
    pub async fn uninstall(&self, client: &Client, tables: &[SourceTable]) -> Result<()> {
        let mut script = String::new();
        for table in tables {
            for name in self.trigger_names() {
                script.push_str(&format!("DROP TRIGGER IF EXISTS {} ON {};", quote_ident(&name), table.quoted()));
            }
        }
        with_table_locks(client, tables, "ACCESS EXCLUSIVE", &script, "removing the capture triggers").await?;
        let drop =
            format!("BEGIN; DROP FUNCTION IF EXISTS {}(); DROP TABLE IF EXISTS {}; COMMIT;", self.function, self.log);
        run_script(client, &drop, "removing the changelog").await
    }

    /// Remove every object of this changelog that exists: the capture triggers from whichever
    /// tables carry them (found in the catalog, so a table since dropped from the configuration
    /// loses them too), then the function and the changelog, and the `acme_cdc` schema once it
    /// holds nothing else. Returns what it removed, one description per object.
    pub async fn remove(&self, client: &Client) -> Result<Vec<String>> {
        let rows = client
            .query(
                "SELECT format('%I.%I', n.nspname, c.relname), t.tgname FROM pg_trigger t \
                 JOIN pg_class c ON c.oid = t.tgrelid JOIN pg_namespace n ON n.oid = c.relnamespace \
                 WHERE t.tgname = ANY($1) ORDER BY 1, 2",
                &[&self.trigger_names().to_vec()],
            )
            .await
            .map_err(sql("looking for the capture triggers"))?;
        let mut removed = Vec::new();
        let mut tables: Vec<String> = Vec::new();
        let mut script = String::new();
        for row in &rows {
            let (table, trigger): (String, String) = (row.get(0), row.get(1));
            script.push_str(&format!("DROP TRIGGER IF EXISTS {} ON {table};", quote_ident(&trigger)));
            removed.push(format!("trigger {trigger} on {table}"));
            if !tables.contains(&table) {
                tables.push(table);
            }
        }
        if !tables.is_empty() {
            with_locks(client, &tables.join(", "), "ACCESS EXCLUSIVE", &script, "removing the capture triggers")
                .await?;
        }
        let function: bool = client
            .query_one("SELECT to_regprocedure($1) IS NOT NULL", &[&format!("{}()", self.function)])
            .await
            .map_err(sql("looking for the capture function"))?
            .get(0);
        let log: bool = client
            .query_one("SELECT to_regclass($1) IS NOT NULL", &[&self.log])
            .await
            .map_err(sql("looking for the changelog"))?
            .get(0);
        let drop =
            format!("BEGIN; DROP FUNCTION IF EXISTS {}(); DROP TABLE IF EXISTS {}; COMMIT;", self.function, self.log);
        run_script(client, &drop, "removing the changelog").await?;
        if function {
            removed.push(format!("function {SCHEMA}.{}_capture()", self.slot));
        }
        if log {
            removed.push(format!("table {SCHEMA}.{}_changes", self.slot));
        }
        // The schema, once no warehouse's changelog is left in it.
        let empty: Option<bool> = client
            .query_opt(
                "SELECT NOT EXISTS (SELECT 1 FROM pg_class WHERE relnamespace = n.oid) \
                 AND NOT EXISTS (SELECT 1 FROM pg_proc WHERE pronamespace = n.oid) FROM pg_namespace n WHERE nspname = $1",
                &[&SCHEMA],
            )
            .await
            .map_err(sql("looking for the changelog schema"))?
            .map(|row| row.get(0));
        if empty == Some(true) {
            run_script(
                client,
                &format!("DROP SCHEMA IF EXISTS {}", quote_ident(SCHEMA)),
                "removing the changelog schema",
            )
            .await?;
            removed.push(format!("schema {SCHEMA}"));
        }
        Ok(removed)
    }

    /// The first of `tables` missing an enabled capture trigger (qualified name), if any: a
    /// table whose trigger was dropped or disabled silently stops changing in the warehouse.
    pub async fn missing_trigger(&self, client: &Client, tables: &[SourceTable]) -> Result<Option<String>> {
        for table in tables {
            let count: i64 = client
                .query_one(
                    "SELECT count(*) FROM pg_trigger WHERE tgrelid = $1::int8::oid AND tgname = ANY($2) \
                     AND tgenabled <> 'D'",
                    &[&i64::from(table.oid), &self.trigger_names().to_vec()],
                )
                .await
                .map_err(sql("checking the capture triggers"))?
                .get(0);
            if count < 2 {
                return Ok(Some(table.qualified()));
            }
        }
        Ok(None)
    }

    /// The highest batch number claimed and not yet released.
    pub async fn last_claimed(&self, client: &Client) -> Result<Option<i64>> {
        let row = client
            .query_one(&format!("SELECT max(batch) FROM {}", self.log), &[])
            .await
            .map_err(sql("reading the changelog"))?;
        Ok(row.get(0))
    }

    /// Delete the changes of transactions the snapshot `visibility` (`xmin:xmax:xip`) already
    /// saw: they committed before it, so the snapshot holds them (claimed or not: claims left
    /// by a warehouse that was removed to re-sync are among them).
    pub async fn drop_snapshot_changes(&self, client: &Client, visibility: &str) -> Result<()> {
        if visibility.is_empty() {
            return Err(IngestError::WarehouseDamaged {
                what: "snapshot of a trigger-captured warehouse has no visibility list".into(),
            });
        }
        client
            .execute(
                &format!("DELETE FROM {} WHERE pg_visible_in_snapshot(txid, $1::text::pg_snapshot)", self.log),
                &[&visibility],
            )
            .await
            .map_err(sql("dropping changes the snapshot holds"))?;
        Ok(())
    }

    /// Claim the visible unclaimed changes of the first whole transactions that fit in
    /// `max_changes` (at least one transaction) as batch `batch` (see the module
    /// documentation). Returns the number of changes claimed.
    pub async fn claim(&self, client: &Client, batch: i64, max_changes: usize) -> Result<u64> {
        let max_changes = i64::try_from(max_changes).unwrap_or(i64::MAX);
        client
            .execute(
                &format!(
                    "WITH pending AS (
                         SELECT change_id, txid, max(change_id) OVER w AS tx_end, max(changed_at) OVER w AS tx_time,
                                count(*) OVER w AS tx_changes
                         FROM {log} WHERE batch IS NULL WINDOW w AS (PARTITION BY txid)),
                     numbered AS (
                         SELECT change_id, tx_time, dense_rank() OVER (ORDER BY tx_end) AS tx_no,
                                row_number() OVER (PARTITION BY txid ORDER BY change_id) - 1 AS seq,
                                count(*) OVER (ORDER BY tx_end) - tx_changes AS before
                         FROM pending)
                     UPDATE {log} l SET batch = $1, tx_no = n.tx_no, seq = n.seq, tx_time = n.tx_time
                     FROM numbered n WHERE l.change_id = n.change_id AND (n.tx_no = 1 OR n.before < $2)",
                    log = self.log
                ),
                &[&batch, &max_changes],
            )
            .await
            .map_err(sql("claiming changes from the changelog"))
    }

    /// The highest change id committed now (0 for an empty changelog): a catch-up is done
    /// once no unclaimed change at or below it is left.
    pub async fn last_change(&self, client: &Client) -> Result<i64> {
        let row = client
            .query_one(&format!("SELECT coalesce(max(change_id), 0) FROM {}", self.log), &[])
            .await
            .map_err(sql("reading the changelog"))?;
        Ok(row.get(0))
    }

    /// Whether an unclaimed change at or below `change_id` is visible.
    pub async fn pending_upto(&self, client: &Client, change_id: i64) -> Result<bool> {
        let row = client
            .query_one(
                &format!("SELECT EXISTS (SELECT 1 FROM {} WHERE batch IS NULL AND change_id <= $1)", self.log),
                &[&change_id],
            )
            .await
            .map_err(sql("reading the changelog"))?;
        Ok(row.get(0))
    }

    /// Transactions and changes claimed and not released.
    pub async fn claimed_counts(&self, client: &Client) -> Result<(u64, u64)> {
        let row = client
            .query_one(
                &format!("SELECT count(DISTINCT (batch, tx_no)), count(*) FROM {} WHERE batch IS NOT NULL", self.log),
                &[],
            )
            .await
            .map_err(sql("counting claimed changes"))?;
        Ok((row.get::<_, i64>(0) as u64, row.get::<_, i64>(1) as u64))
    }

    /// The query reading the claimed changes of `table` in commit order: `op, batch, tx_no,
    /// seq, xid, commit time (µs since 1970)`, then the row after the change (the deleted row
    /// for a delete), then the row before it, each column in the table's order.
    pub fn read_sql(&self, table: &SourceTable) -> String {
        let columns = |alias: &str| -> String {
            table.columns.iter().map(|c| format!("{alias}.{}", quote_ident(&c.name))).collect::<Vec<_>>().join(", ")
        };
        format!(
            "SELECT c.op, c.batch, c.tx_no, c.seq, (c.txid::text::numeric % 4294967296)::int8, \
                    (extract(epoch FROM c.tx_time) * 1000000)::int8, {new}, {old} \
             FROM {log} c \
             CROSS JOIN LATERAL jsonb_populate_record(NULL::{t}, coalesce(c.new_row, c.old_row)) n \
             CROSS JOIN LATERAL jsonb_populate_record(NULL::{t}, c.old_row) o \
             WHERE c.batch IS NOT NULL AND c.table_name = $1 \
             ORDER BY c.batch, c.tx_no, c.seq",
            new = columns("n"),
            old = columns("o"),
            log = self.log,
            t = table.quoted(),
        )
    }

    /// Delete the claimed changes of batches up to `batch` (they are durable in the warehouse).
    pub async fn release(&self, client: &Client, batch: i64) -> Result<()> {
        client
            .execute(&format!("DELETE FROM {} WHERE batch <= $1", self.log), &[&batch])
            .await
            .map_err(sql("releasing committed changes"))?;
        Ok(())
    }

    /// Bytes the changelog holds on the source (the trigger fallback's counterpart of slot lag).
    pub async fn size_bytes(&self, client: &Client) -> Result<i64> {
        let row = client
            .query_one("SELECT pg_total_relation_size($1::text::regclass)", &[&self.log])
            .await
            .map_err(sql("measuring the changelog"))?;
        Ok(row.get(0))
    }
}

/// Longest attempt to take the tables' locks in one go (see [`Changelog::install`]), and how
/// long attempts are retried.
const LOCK_ATTEMPT_MAX: std::time::Duration = std::time::Duration::from_millis(500);
const LOCK_RETRY_FOR: std::time::Duration = std::time::Duration::from_secs(120);

/// Run a DDL script, mapping a refusal to [`IngestError::CapturePrivilege`].
async fn run_script(client: &Client, script: &str, doing: &str) -> Result<()> {
    match client.batch_execute(script).await {
        Ok(()) => Ok(()),
        Err(source) => {
            let _ = client.batch_execute("ROLLBACK").await;
            Err(ddl_error(source, doing))
        }
    }
}

fn ddl_error(source: tokio_postgres::Error, doing: &str) -> IngestError {
    let denied = source.as_db_error().is_some_and(|e| {
        // Also "must be owner of table": the same SQLSTATE.
        e.code() == &tokio_postgres::error::SqlState::INSUFFICIENT_PRIVILEGE
    });
    if denied {
        return IngestError::CapturePrivilege {
            message: source.as_db_error().map(|e| e.message().to_string()).unwrap_or_default(),
        };
    }
    IngestError::Source { context: doing.to_string(), source }
}

/// Run `script` in a transaction that first locks every table of `tables` in `mode` with one
/// statement bounded below the server's `deadlock_timeout`, retried with backoff while the
/// tables are busy (see [`Changelog::install`]).
async fn with_table_locks(
    client: &Client,
    tables: &[SourceTable],
    mode: &str,
    script: &str,
    doing: &str,
) -> Result<()> {
    let names = tables.iter().map(SourceTable::quoted).collect::<Vec<_>>().join(", ");
    with_locks(client, &names, mode, script, doing).await
}

/// [`with_table_locks`] over `names`: quoted table names, comma-separated.
async fn with_locks(client: &Client, names: &str, mode: &str, script: &str, doing: &str) -> Result<()> {
    let deadlock_ms: i64 = client
        .query_one(
            "SELECT setting::int8 * CASE unit WHEN 's' THEN 1000 ELSE 1 END FROM pg_settings WHERE name = 'deadlock_timeout'",
            &[],
        )
        .await
        .map_err(sql("reading deadlock_timeout"))?
        .get(0);
    let bound =
        std::time::Duration::from_millis(u64::try_from(deadlock_ms / 2).unwrap_or(1).max(1)).min(LOCK_ATTEMPT_MAX);
    let started = std::time::Instant::now();
    let mut backoff = std::time::Duration::from_millis(10);
    loop {
        let attempt = format!(
            "BEGIN; SET LOCAL statement_timeout = {ms}; LOCK TABLE {names} IN {mode} MODE; \
             SET LOCAL statement_timeout = 0; {script} COMMIT;",
            ms = bound.as_millis().max(1),
        );
        let source = match client.batch_execute(&attempt).await {
            Ok(()) => return Ok(()),
            Err(source) => source,
        };
        let _ = client.batch_execute("ROLLBACK").await;
        let busy = source.code().is_some_and(|code| {
            use tokio_postgres::error::SqlState;
            [SqlState::QUERY_CANCELED, SqlState::LOCK_NOT_AVAILABLE, SqlState::T_R_DEADLOCK_DETECTED].contains(code)
        });
        if !busy {
            return Err(ddl_error(source, doing));
        }
        if started.elapsed() >= LOCK_RETRY_FOR {
            return Err(IngestError::CaptureBusy {
                tables: names.to_string(),
                lock_ms: bound.as_millis() as u64,
                tried_secs: LOCK_RETRY_FOR.as_secs(),
            });
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(std::time::Duration::from_millis(500));
    }
}

/// The synthetic commit LSN of transaction `tx_no` of batch `batch` after a snapshot at `base`.
pub fn synthetic_lsn(base: u64, batch: i64, tx_no: i64) -> u64 {
    base + ((batch as u64) << BATCH_SHIFT) + tx_no as u64
}

/// The batch a synthetic LSN belongs to.
pub fn batch_of(base: u64, lsn: u64) -> i64 {
    (lsn.saturating_sub(base) >> BATCH_SHIFT) as i64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn synthetic_lsns_order_batches_then_transactions() {
        let base = 0x1_6000_0000;
        assert!(synthetic_lsn(base, 1, 1) > base);
        assert!(synthetic_lsn(base, 1, 900_000) < synthetic_lsn(base, 2, 1));
        assert_eq!(batch_of(base, synthetic_lsn(base, 7, 12)), 7);
        assert_eq!(batch_of(base, base), 0);
    }
}
