//! Logical decoding: the slot's `pgoutput` messages, streamed over the replication protocol
//! ([`Streamed`], the default) or read by SQL with `pg_logical_slot_peek_binary_changes`
//! ([`Polled`], [`CdcMode::SqlPoll`](acme_core::CdcMode::SqlPoll)): two [`Transport`]s of one
//! [`ChangeSource`], [`Logical`], which decodes with one [`Decoder`] and confirms through one
//! [`Slot`].

use std::collections::HashMap;
use std::time::{Duration, Instant};

use acme_core::Lsn;
use acme_core::raw::Operation;
use futures::StreamExt;
use futures::future::BoxFuture;
use tokio_postgres::error::SqlState;

use super::PollReport;
use super::open::{SlotState, slot_state, unpublished};
use super::sink::RawSink;
use super::source::{ChangeSource, Link};
use crate::changes::{ChangeMeta, ColumnMap, PG_EPOCH_MICROS};
use crate::error::{IngestError, Result};
use crate::pgoutput::{self, Message};
use crate::replication::{LogicalStream, ReplicationConnection, StreamEvent};
use crate::snapshot::SnapshotPoint;
use crate::source::{SourceColumn, SourceTable};
use crate::types::PgType;

/// Between transactions, how long the stream waits for data before asking the server how far
/// it has decoded.
const STATUS_PROBE: Duration = Duration::from_millis(10);

/// The replication slot and publication both logical sources read through.
pub(crate) struct Slot {
    pub(crate) name: String,
    pub(crate) publication: String,
    /// The position confirmed to the slot so far (0: the slot's own, after a reconnect).
    pub(crate) confirmed: Lsn,
}

impl Slot {
    fn lost(&self) -> IngestError {
        IngestError::SlotLost { slot: self.name.clone() }
    }

    fn slot_error(&self, source: tokio_postgres::Error) -> IngestError {
        if source.code() == Some(&SqlState::UNDEFINED_OBJECT) {
            self.lost()
        } else {
            IngestError::Source { context: format!("reading changes from slot {}", self.name), source }
        }
    }

    /// A slot the server invalidated (it held more WAL than `max_slot_wal_keep_size`) answers
    /// reads with "object not in prerequisite state": tell that apart from the state's other
    /// causes by asking the server for the slot's `wal_status`.
    async fn explain(&self, link: &Link, error: IngestError) -> IngestError {
        if error.sqlstate() != Some(&SqlState::OBJECT_NOT_IN_PREREQUISITE_STATE) {
            return error;
        }
        match link.url.bounded("looking up the replication slot", slot_state(&link.client, &self.name)).await {
            Ok(SlotState::Lost | SlotState::Missing) => self.lost(),
            _ => error,
        }
    }

    /// After a reconnect: the slot must still exist, and replays from its own confirmed position.
    async fn reset(&mut self, link: &Link) -> Result<()> {
        let state = link.url.bounded("reading the slot's state", slot_state(&link.client, &self.name)).await?;
        if matches!(state, SlotState::Missing | SlotState::Lost) {
            return Err(self.lost());
        }
        self.confirmed = Lsn::default();
        Ok(())
    }

    /// The publication must still publish every table: a table removed from it mid-stream
    /// would otherwise silently stop changing in the warehouse.
    async fn check(&self, link: &Link, tables: &[SourceTable]) -> Result<()> {
        let check = unpublished(&link.client, &self.publication, tables.iter());
        match link.url.bounded("checking the publication", check).await? {
            Some(table) => Err(IngestError::PublicationChanged { publication: self.publication.clone(), table }),
            None => Ok(()),
        }
    }

    /// Bytes of WAL the slot retains (`pg_current_wal_lsn() - confirmed_flush_lsn`).
    async fn lag_bytes(&self, link: &Link) -> Result<i64> {
        let row = link
            .client
            .query_one(
                "SELECT coalesce(pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn), 0)::int8 \
                 FROM pg_replication_slots WHERE slot_name = $1",
                &[&self.name],
            )
            .await
            .map_err(super::sql("reading the slot lag"))?;
        Ok(row.get(0))
    }
}

/// The transaction being decoded.
#[derive(Debug, Clone, Copy)]
struct TxState {
    lsn: u64,
    xid: u32,
    commit_ts_micros: i64,
    seq: i64,
    /// The snapshot already holds it.
    skip: bool,
}

impl TxState {
    fn meta(&self, op: Operation, seq: i64) -> ChangeMeta {
        ChangeMeta { op, lsn: self.lsn, seq, xid: self.xid, commit_ts_micros: self.commit_ts_micros }
    }
}

/// Where decoding stands inside one read.
#[derive(Debug, Default)]
struct Cursor {
    tx: Option<TxState>,
    /// End of the last whole transaction read.
    last_end: Option<u64>,
    report: PollReport,
}

/// Decodes pgoutput messages into the sink.
pub(crate) struct Decoder {
    /// Relation oid: table index in the sink, and where each column goes.
    relations: HashMap<u32, (usize, ColumnMap)>,
    snapshot: SnapshotPoint,
}

impl Decoder {
    pub(crate) fn new(snapshot: SnapshotPoint) -> Self {
        Self { relations: HashMap::new(), snapshot }
    }

    /// Decode one message into `sink`: spill full builders, evolve a table that gained columns.
    async fn feed(&mut self, data: &[u8], cursor: &mut Cursor, sink: &mut RawSink) -> Result<()> {
        match pgoutput::decode(data)? {
            Message::Begin { final_lsn, commit_ts, xid } => {
                let skip = self.snapshot.contains(xid, final_lsn);
                cursor.tx =
                    Some(TxState { lsn: final_lsn, xid, commit_ts_micros: commit_ts + PG_EPOCH_MICROS, seq: 0, skip });
            }
            Message::Commit { end_lsn, .. } => {
                if let Some(t) = cursor.tx.take() {
                    cursor.report.transactions += 1;
                    if t.skip {
                        cursor.report.skipped_transactions += 1;
                    }
                }
                cursor.last_end = Some(end_lsn);
                sink.spill_full().await?;
            }
            Message::Relation(relation) => {
                if let Some(i) = sink.index_of(&relation.schema, &relation.name) {
                    let table = sink.table(i);
                    if relation.columns.iter().any(|c| !table.columns.iter().any(|t| t.name == c.name)) {
                        self.evolve(i, &relation, sink).await?;
                    } else {
                        let map = ColumnMap::new(&relation, table)?;
                        self.relations.insert(relation.oid, (i, map));
                    }
                }
            }
            Message::Insert { relation, new } => {
                self.apply(cursor, sink, relation, Operation::Insert, Some(new), None).await?;
            }
            Message::Update { relation, old, new } => {
                self.apply(cursor, sink, relation, Operation::Update, Some(new), old).await?;
            }
            Message::Delete { relation, old } => {
                self.apply(cursor, sink, relation, Operation::Delete, None, Some(old)).await?;
            }
            Message::Truncate { relations } => {
                for relation in relations {
                    if let (Some(t), Some((i, _))) = (cursor.tx.as_mut(), self.relations.get(&relation)) {
                        let seq = t.seq;
                        t.seq += 1;
                        if t.skip || sink.covers(*i, t.lsn) {
                            continue;
                        }
                        sink.append_truncate(*i, t.meta(Operation::Truncate, seq));
                    }
                }
            }
            Message::Ignored => {}
        }
        Ok(())
    }

    async fn apply(
        &mut self,
        cursor: &mut Cursor,
        sink: &mut RawSink,
        relation: u32,
        op: Operation,
        new: Option<pgoutput::TupleData<'_>>,
        old: Option<pgoutput::TupleData<'_>>,
    ) -> Result<()> {
        let Some(t) = cursor.tx.as_mut() else {
            return Err(IngestError::BadMessage { message: "change outside a transaction".into() });
        };
        let seq = t.seq;
        t.seq += 1;
        let Some((i, map)) = self.relations.get(&relation) else { return Ok(()) };
        if t.skip || sink.covers(*i, t.lsn) {
            return Ok(());
        }
        let (full, rows) = sink.append(*i, t.meta(op, seq), map, new, old)?;
        // An update of the primary key took two rows, and a position for each.
        t.seq += rows as i64 - 1;
        cursor.report.changes_seen += 1;
        if full {
            sink.spill_full().await?;
        }
        Ok(())
    }

    /// The source table gained columns (`ALTER TABLE ... ADD COLUMN`) in the middle of the
    /// stream: the sink widens the raw table and decoding continues with the new definition.
    /// Nothing stops and nothing is committed early.
    async fn evolve(&mut self, i: usize, relation: &pgoutput::Relation, sink: &mut RawSink) -> Result<()> {
        let mut table = sink.table(i).clone();
        for column in &relation.columns {
            if table.columns.iter().any(|c| c.name == column.name) {
                continue;
            }
            let ty = PgType::from_oid(
                column.type_oid,
                column.typmod,
                &table.qualified(),
                &column.name,
                &format!("type oid {}", column.type_oid),
            )?;
            table.columns.push(SourceColumn { name: column.name.clone(), ty, not_null: false });
        }
        sink.evolve_to(i, table.clone()).await?;
        let map = ColumnMap::new(relation, &table)?;
        self.relations.insert(relation.oid, (i, map));
        Ok(())
    }
}

/// How a logical source reaches its slot: streamed over the replication protocol
/// ([`Streamed`]) or read by SQL ([`Polled`]). [`Logical`] is the [`ChangeSource`] over either.
pub(crate) trait Transport: Send {
    /// Read a micro-batch through `decoder` into `sink` (see [`ChangeSource::read`]).
    fn read<'a>(
        &'a mut self,
        slot: &'a Slot,
        decoder: &'a mut Decoder,
        link: &'a Link,
        sink: &'a mut RawSink,
    ) -> BoxFuture<'a, Result<PollReport>>;

    /// Confirm to the slot what the last read delivered, once committed.
    fn confirm<'a>(&'a mut self, slot: &'a mut Slot, link: &'a Link) -> BoxFuture<'a, Result<()>>;

    /// Drop what was read and not committed (the connection is new).
    fn reset(&mut self);

    /// See [`ChangeSource::waits_for_data`].
    fn waits_for_data(&self) -> bool;
}

/// Logical decoding through a replication slot, by either [`Transport`].
pub(crate) struct Logical<T> {
    pub(crate) slot: Slot,
    pub(crate) decoder: Decoder,
    pub(crate) transport: T,
}

impl<T: Transport> ChangeSource for Logical<T> {
    fn read<'a>(&'a mut self, link: &'a Link, sink: &'a mut RawSink) -> BoxFuture<'a, Result<PollReport>> {
        self.transport.read(&self.slot, &mut self.decoder, link, sink)
    }

    fn confirm<'a>(&'a mut self, link: &'a Link, _stored: Option<u64>) -> BoxFuture<'a, Result<Lsn>> {
        Box::pin(async move {
            self.transport.confirm(&mut self.slot, link).await?;
            Ok(self.slot.confirmed)
        })
    }

    fn reset<'a>(&'a mut self, link: &'a Link, _stored: Option<u64>) -> BoxFuture<'a, Result<()>> {
        self.transport.reset();
        self.decoder.relations.clear();
        Box::pin(self.slot.reset(link))
    }

    fn check<'a>(&'a self, link: &'a Link, tables: &'a [SourceTable]) -> BoxFuture<'a, Result<()>> {
        Box::pin(self.slot.check(link, tables))
    }

    fn lag_bytes<'a>(&'a self, link: &'a Link) -> BoxFuture<'a, Result<i64>> {
        Box::pin(self.slot.lag_bytes(link))
    }

    fn mark<'a>(&'a mut self, link: &'a Link) -> BoxFuture<'a, Result<u64>> {
        Box::pin(async move { Ok(super::write_heartbeat(&link.url, &link.client).await?.0) })
    }

    fn caught_up<'a>(&'a self, _link: &'a Link, mark: u64, report: &'a PollReport) -> BoxFuture<'a, Result<bool>> {
        Box::pin(async move { Ok(report.confirmed.0 > mark) })
    }

    fn waits_for_data(&self) -> bool {
        self.transport.waits_for_data()
    }

    fn needs_heartbeat(&self) -> bool {
        true
    }

    fn explain<'a>(&'a mut self, link: &'a Link, error: IngestError) -> BoxFuture<'a, IngestError> {
        Box::pin(self.slot.explain(link, error))
    }
}

/// The logical stream over the replication protocol ([`acme_core::CdcMode::Stream`]).
pub(crate) struct Streamed {
    pub(crate) stream: Option<LogicalStream>,
    pub(crate) max_batch_changes: usize,
    pub(crate) flush_interval: Duration,
    /// What the last read may confirm once committed.
    pub(crate) to_confirm: u64,
}

impl Streamed {
    fn stream_error(slot: &Slot, link: &Link, error: IngestError) -> IngestError {
        let code = error.sqlstate().cloned();
        match (code, error) {
            (Some(SqlState::UNDEFINED_OBJECT), _) => slot.lost(),
            // The slot is still held by a connection the server has not noticed is gone.
            (Some(SqlState::OBJECT_IN_USE), IngestError::Replication { message, .. }) => {
                IngestError::Disconnected { target: link.url.to_string(), message }
            }
            (_, other) => other,
        }
    }

    async fn read_stream(
        &mut self,
        slot: &Slot,
        decoder: &mut Decoder,
        link: &Link,
        sink: &mut RawSink,
    ) -> Result<PollReport> {
        let asked_at = Instant::now();
        let upto = link.flush_lsn().await?.0;
        let flush_lsn_ms = asked_at.elapsed().as_millis() as u64;
        if self.stream.is_none() {
            let replication = ReplicationConnection::connect(&link.url).await?;
            let start = replication.start_logical(&slot.name, slot.confirmed.0, &slot.publication);
            let stream =
                link.url.bounded("starting replication", start).await.map_err(|e| Self::stream_error(slot, link, e))?;
            self.stream = Some(stream);
        }
        let started = Instant::now();
        let mut cursor = Cursor::default();
        // Everything before this position was sent and the stream is between transactions.
        let mut idle_end: Option<u64> = None;
        let mut asked = false;
        loop {
            let between = cursor.tx.is_none();
            let left = self.flush_interval.saturating_sub(started.elapsed());
            if between && (left.is_zero() || cursor.report.changes_seen >= self.max_batch_changes as u64) {
                break;
            }
            // Mid-transaction the rest of it must be read before anything can be committed.
            let wait = if between { left.min(STATUS_PROBE) } else { link.url.timeout() };
            let Some(stream) = self.stream.as_mut() else { break };
            let event = match tokio::time::timeout(wait, stream.next()).await {
                Ok(event) => event?,
                Err(_) if between => {
                    if !asked {
                        // Ask the server how far it has decoded (it answers with a keepalive,
                        // even while it decodes a large transaction).
                        stream.send_status(slot.confirmed.0, true).await?;
                        asked = true;
                    } else if stream.silent_for() >= link.url.timeout() {
                        return Err(link.url.stalled("waiting for the replication stream"));
                    }
                    continue;
                }
                Err(_) => return Err(link.url.stalled("reading a transaction from the replication stream")),
            };
            match event {
                None => {
                    return Err(IngestError::Disconnected {
                        target: link.url.to_string(),
                        message: "the server ended the replication stream".into(),
                    });
                }
                Some(StreamEvent::XLogData { data, .. }) => {
                    decoder.feed(&data, &mut cursor, sink).await?;
                    if cursor.tx.is_none() && cursor.last_end.is_some_and(|end| end >= upto) {
                        break;
                    }
                }
                Some(StreamEvent::Keepalive { wal_end, reply_requested }) => {
                    if cursor.tx.is_none() {
                        idle_end = Some(idle_end.unwrap_or(0).max(wal_end));
                        // Caught up. With nothing read yet, keep waiting for new data until
                        // `flush_interval` ends: an idle poll blocks instead of spinning.
                        if wal_end >= upto && cursor.report.transactions > 0 {
                            break;
                        }
                    }
                    if reply_requested && let Some(stream) = self.stream.as_mut() {
                        stream.send_status(slot.confirmed.0, false).await?;
                    }
                }
            }
        }
        // Once committed: the end of the last transaction, or the server's sent position when
        // it was reached between transactions.
        self.to_confirm = cursor.last_end.unwrap_or(0).max(if cursor.tx.is_none() { idle_end.unwrap_or(0) } else { 0 });
        tracing::trace!(flush_lsn_ms, read_ms = started.elapsed().as_millis() as u64, "replication stream read");
        Ok(cursor.report)
    }
}

impl Transport for Streamed {
    fn read<'a>(
        &'a mut self,
        slot: &'a Slot,
        decoder: &'a mut Decoder,
        link: &'a Link,
        sink: &'a mut RawSink,
    ) -> BoxFuture<'a, Result<PollReport>> {
        Box::pin(self.read_stream(slot, decoder, link, sink))
    }

    fn confirm<'a>(&'a mut self, slot: &'a mut Slot, _link: &'a Link) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            let confirm = std::mem::take(&mut self.to_confirm);
            if confirm > slot.confirmed.0 {
                if let Some(stream) = self.stream.as_mut() {
                    stream.send_status(confirm, false).await?;
                }
                slot.confirmed = Lsn(confirm);
            }
            Ok(())
        })
    }

    fn reset(&mut self) {
        self.stream = None;
        self.to_confirm = 0;
    }

    fn waits_for_data(&self) -> bool {
        true
    }
}

/// The slot read by SQL ([`acme_core::CdcMode::SqlPoll`]).
pub(crate) struct Polled {
    pub(crate) max_batch_changes: usize,
    /// What the last read may confirm once committed.
    pub(crate) to_confirm: Option<u64>,
}

impl Polled {
    async fn read_sql(
        &mut self,
        slot: &Slot,
        decoder: &mut Decoder,
        link: &Link,
        sink: &mut RawSink,
    ) -> Result<PollReport> {
        // Decoding reads WAL only up to the flushed position: reading up to the flush LSN (not
        // the insert LSN) guarantees that every transaction committed before it is returned, so
        // the slot can be advanced there without losing one.
        let upto = link.flush_lsn().await?.to_string();
        let max = i32::try_from(self.max_batch_changes).unwrap_or(i32::MAX);
        let rows = link
            .client
            .query_raw(
                "SELECT data FROM pg_logical_slot_peek_binary_changes($1, $2::text::pg_lsn, $3::int4, \
                 'proto_version', '1', 'publication_names', $4, 'binary', 'true', 'messages', 'true')",
                [&slot.name as &(dyn tokio_postgres::types::ToSql + Sync), &upto, &max, &slot.publication],
            )
            .await
            .map_err(|source| slot.slot_error(source))?;
        futures::pin_mut!(rows);
        let mut cursor = Cursor::default();
        while let Some(row) = rows.next().await {
            let row = row.map_err(|source| slot.slot_error(source))?;
            let data: &[u8] = row.get(0);
            decoder.feed(data, &mut cursor, sink).await?;
        }
        // Advance the slot to the end of the last transaction read, never further: a commit
        // record that straddles the flushed WAL position has not been decoded yet.
        self.to_confirm = cursor.last_end;
        Ok(cursor.report)
    }
}

impl Transport for Polled {
    fn read<'a>(
        &'a mut self,
        slot: &'a Slot,
        decoder: &'a mut Decoder,
        link: &'a Link,
        sink: &'a mut RawSink,
    ) -> BoxFuture<'a, Result<PollReport>> {
        Box::pin(self.read_sql(slot, decoder, link, sink))
    }

    fn confirm<'a>(&'a mut self, slot: &'a mut Slot, link: &'a Link) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            if let Some(confirm) = self.to_confirm.take() {
                link.client
                    .query_one(
                        "SELECT pg_replication_slot_advance($1, $2::text::pg_lsn)",
                        &[&slot.name, &Lsn(confirm).to_string()],
                    )
                    .await
                    .map_err(|source| slot.slot_error(source))?;
                slot.confirmed = Lsn(confirm);
            }
            Ok(())
        })
    }

    fn reset(&mut self) {
        self.to_confirm = None;
    }

    fn waits_for_data(&self) -> bool {
        false
    }
}
