//! The trigger changelog as a [`ChangeSource`] ([`CdcMode::Triggers`](acme_core::CdcMode::Triggers)):
//! claim a batch of whole transactions, read it table by table into the sink, and release it
//! once committed (see [`crate::triggers`] for the changelog itself).

use acme_core::Lsn;
use acme_core::raw::Operation;
use futures::StreamExt;
use futures::future::BoxFuture;

use super::PollReport;
use super::sink::RawSink;
use super::source::{ChangeSource, Link};
use crate::changes::ChangeMeta;
use crate::error::{IngestError, Result};
use crate::source::SourceTable;
use crate::triggers::{Changelog, RawValue, batch_of, synthetic_lsn};

/// Capture through the trigger changelog.
pub(crate) struct TriggerCapture {
    pub(crate) changelog: Changelog,
    /// The snapshot's LSN: synthetic positions count from it.
    pub(crate) base: u64,
    pub(crate) max_batch_changes: usize,
    /// The batch the last read claimed, released once committed.
    pub(crate) claimed: Option<i64>,
}

impl TriggerCapture {
    async fn read_changelog(&mut self, link: &Link, sink: &mut RawSink) -> Result<PollReport> {
        let claimed = link.url.bounded("reading the changelog", self.changelog.last_claimed(&link.client)).await?;
        // Batches left claimed by an earlier run are read again first; each table skips what
        // it already stored.
        let batch = sink.stored_position().map_or(0, |l| batch_of(self.base, l)).max(claimed.unwrap_or(0)) + 1;
        let claim = self.changelog.claim(&link.client, batch, self.max_batch_changes);
        link.url.bounded("claiming changes", claim).await?;
        let (transactions, changes) =
            link.url.bounded("counting claimed changes", self.changelog.claimed_counts(&link.client)).await?;
        let mut report = PollReport { transactions, ..PollReport::default() };
        if changes > 0 {
            self.follow_added_columns(link, sink).await?;
            for i in 0..sink.len() {
                self.read_claimed(link, sink, i, &mut report).await?;
            }
            self.claimed = Some(batch);
        }
        Ok(report)
    }

    /// A column added to a source table (`ALTER TABLE ... ADD COLUMN`) shows in the
    /// changelog's rows at once: widen the raw table before reading them.
    async fn follow_added_columns(&self, link: &Link, sink: &mut RawSink) -> Result<()> {
        let oids: Vec<i64> = (0..sink.len()).map(|i| i64::from(sink.table(i).oid)).collect();
        let query = async {
            link.client
                .query(
                    "SELECT attrelid::int8, count(*) FROM pg_attribute WHERE attrelid = ANY($1::int8[]::oid[]) \
                     AND attnum > 0 AND NOT attisdropped GROUP BY attrelid",
                    &[&oids],
                )
                .await
                .map_err(super::sql("reading the source tables' columns"))
        };
        let counts = link.url.bounded("reading the source tables' columns", query).await?;
        for row in counts {
            let (oid, count): (i64, i64) = (row.get(0), row.get(1));
            let Some(i) = oids.iter().position(|o| *o == oid) else { continue };
            let current = sink.table(i);
            if count as usize > current.columns.len() {
                let (schema, name) = (current.schema.clone(), current.name.clone());
                let table = SourceTable::load(&link.client, &schema, &name).await?;
                sink.evolve_to(i, table).await?;
            }
        }
        Ok(())
    }

    /// Read the claimed changes of table `i` into the sink.
    async fn read_claimed(&self, link: &Link, sink: &mut RawSink, i: usize, report: &mut PollReport) -> Result<()> {
        let table = sink.table(i).clone();
        let width = table.columns.len();
        let read_sql = self.changelog.read_sql(&table);
        let query = link.client.query_raw(&read_sql, [&table.name]);
        let rows = link.url.bounded_sql("reading claimed changes", query).await?;
        futures::pin_mut!(rows);
        let bad = |source| IngestError::Source {
            context: format!("decoding a claimed change of {}", table.qualified()),
            source,
        };
        loop {
            let next = link.url.bounded("reading claimed changes", async { Ok(rows.next().await) }).await?;
            let Some(row) = next else { break };
            let row = row.map_err(bad)?;
            let op: &str = row.try_get(0).map_err(bad)?;
            let op = Operation::parse(op)
                .ok_or_else(|| IngestError::BadMessage { message: format!("unknown changelog operation `{op}`") })?;
            let (batch, tx_no): (i64, i64) = (row.try_get(1).map_err(bad)?, row.try_get(2).map_err(bad)?);
            let lsn = synthetic_lsn(self.base, batch, tx_no);
            if sink.covers(i, lsn) {
                continue;
            }
            let meta = ChangeMeta {
                op,
                lsn,
                seq: row.try_get(3).map_err(bad)?,
                xid: row.try_get::<_, i64>(4).map_err(bad)? as u32,
                commit_ts_micros: row.try_get(5).map_err(bad)?,
            };
            let value = |c: usize| row.try_get::<_, Option<RawValue<'_>>>(c).map(|v| v.map(|v| v.0)).map_err(bad);
            let (new, old) = match op {
                Operation::Truncate => (Vec::new(), None),
                Operation::Insert => ((6..6 + width).map(value).collect::<Result<Vec<_>>>()?, None),
                _ => (
                    (6..6 + width).map(value).collect::<Result<Vec<_>>>()?,
                    Some((6 + width..6 + 2 * width).map(value).collect::<Result<Vec<_>>>()?),
                ),
            };
            sink.append_values(i, meta, new, old).await?;
            report.changes_seen += 1;
        }
        Ok(())
    }
}

impl ChangeSource for TriggerCapture {
    fn read<'a>(&'a mut self, link: &'a Link, sink: &'a mut RawSink) -> BoxFuture<'a, Result<PollReport>> {
        Box::pin(self.read_changelog(link, sink))
    }

    fn confirm<'a>(&'a mut self, link: &'a Link, stored: Option<u64>) -> BoxFuture<'a, Result<Lsn>> {
        Box::pin(async move {
            if let Some(batch) = self.claimed.take() {
                link.url.bounded("releasing committed changes", self.changelog.release(&link.client, batch)).await?;
            }
            Ok(Lsn(stored.unwrap_or(self.base)))
        })
    }

    fn reset<'a>(&'a mut self, _link: &'a Link, _stored: Option<u64>) -> BoxFuture<'a, Result<()>> {
        // Claimed batches stay claimed: the next read reads them again.
        self.claimed = None;
        Box::pin(async { Ok(()) })
    }

    fn check<'a>(&'a self, link: &'a Link, tables: &'a [SourceTable]) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            let check = self.changelog.missing_trigger(&link.client, tables);
            match link.url.bounded("checking the capture triggers", check).await? {
                Some(table) => Err(IngestError::CaptureTriggerMissing { table }),
                None => Ok(()),
            }
        })
    }

    fn lag_bytes<'a>(&'a self, link: &'a Link) -> BoxFuture<'a, Result<i64>> {
        Box::pin(self.changelog.size_bytes(&link.client))
    }

    fn mark<'a>(&'a mut self, link: &'a Link) -> BoxFuture<'a, Result<u64>> {
        Box::pin(async move {
            let last = link.url.bounded("reading the changelog", self.changelog.last_change(&link.client)).await?;
            Ok(last as u64)
        })
    }

    fn caught_up<'a>(&'a self, link: &'a Link, mark: u64, _report: &'a PollReport) -> BoxFuture<'a, Result<bool>> {
        Box::pin(async move {
            let pending = self.changelog.pending_upto(&link.client, mark as i64);
            Ok(!link.url.bounded("reading the changelog", pending).await?)
        })
    }

    fn waits_for_data(&self) -> bool {
        false
    }

    fn needs_heartbeat(&self) -> bool {
        false
    }
}
