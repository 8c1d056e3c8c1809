//! The capture methods behind one trait.
//!
//! A [`ChangeSource`] reads committed source transactions into a [`RawSink`]; the driver
//! ([`super::ChangeStream`]) commits the sink and then lets the source confirm. Two
//! implementations exist: logical decoding ([`super::logical::Logical`]), whose slot is either
//! streamed over the replication protocol or read by SQL, and the trigger changelog
//! ([`super::changelog::TriggerCapture`]).
//!
//! # Contract
//!
//! - **Order.** A source hands the sink each table's changes in commit order, and the changes
//!   of one transaction in their order inside it, stamped with the transaction's commit
//!   position (a WAL LSN, or the changelog's synthetic LSN). Positions only grow.
//! - **Whole transactions.** [`ChangeSource::read`] returns between transactions: a
//!   transaction is in the sink entirely or not at all.
//! - **Duplicates.** After a reconnect or a crash a source may deliver transactions again. It
//!   drops the ones the table already stores ([`RawSink::covers`]) and the ones the initial
//!   snapshot holds, so every change reaches the raw layer exactly once.
//! - **Confirming.** [`ChangeSource::confirm`] is called only after the sink committed
//!   everything `read` put into it; only then may the source tell the server it may forget
//!   those transactions (advance the slot, delete claimed changelog rows). A `read` that
//!   failed is followed by [`ChangeSource::reset`], never by `confirm`.

use acme_core::Lsn;
use futures::future::BoxFuture;
use tokio_postgres::Client;

use super::PollReport;
use super::sink::RawSink;
use crate::error::{IngestError, Result};
use crate::source::{SourceTable, SourceUrl};

/// The connection to the source that the driver owns and a source borrows.
pub(crate) struct Link {
    pub(crate) url: SourceUrl,
    pub(crate) client: Client,
}

impl Link {
    /// The WAL position flushed on the source now.
    pub(crate) async fn flush_lsn(&self) -> Result<Lsn> {
        let query = async {
            self.client
                .query_one("SELECT pg_current_wal_flush_lsn()::text", &[])
                .await
                .map_err(super::sql("reading the current WAL position"))
        };
        let upto: String = self.url.bounded("reading the current WAL position", query).await?.get(0);
        Ok(Lsn::parse(&upto)?)
    }
}

/// A capture method (see the module documentation for the contract).
pub(crate) trait ChangeSource: Send {
    /// Read the transactions committed since the last confirmed one into `sink`, bounded by
    /// the configured batch size (and, when streaming, the flush interval). Counts what it read
    /// in the returned report; the driver commits and fills in the committed counts.
    fn read<'a>(&'a mut self, link: &'a Link, sink: &'a mut RawSink) -> BoxFuture<'a, Result<PollReport>>;

    /// Everything the last `read` delivered is committed, up to the sink's `stored` position:
    /// let the source forget it. Returns the position the source now confirms.
    fn confirm<'a>(&'a mut self, link: &'a Link, stored: Option<u64>) -> BoxFuture<'a, Result<Lsn>>;

    /// After a failure: drop what was read and not committed, and check on the new connection
    /// `link` that capture can go on (a lost slot cannot).
    fn reset<'a>(&'a mut self, link: &'a Link, stored: Option<u64>) -> BoxFuture<'a, Result<()>>;

    /// Check that changes of every table in `tables` are still captured (the publication, or
    /// the triggers).
    fn check<'a>(&'a self, link: &'a Link, tables: &'a [SourceTable]) -> BoxFuture<'a, Result<()>>;

    /// What the source retains for acme, in bytes (WAL held by the slot, or the changelog).
    fn lag_bytes<'a>(&'a self, link: &'a Link) -> BoxFuture<'a, Result<i64>>;

    /// A mark of "now" for [`ChangeSource::caught_up`]: committing it may write to the source
    /// (a heartbeat).
    fn mark<'a>(&'a mut self, link: &'a Link) -> BoxFuture<'a, Result<u64>>;

    /// Whether everything committed before `mark` is committed to the raw layer, given the
    /// last poll's `report`.
    fn caught_up<'a>(&'a self, link: &'a Link, mark: u64, report: &'a PollReport) -> BoxFuture<'a, Result<bool>>;

    /// Whether `read` itself waits for data (a stream) rather than returning at once when
    /// there is none (the driver then waits between empty polls).
    fn waits_for_data(&self) -> bool;

    /// Whether an idle source needs heartbeats for its position to advance (a slot does).
    fn needs_heartbeat(&self) -> bool;

    /// A read's error, explained with what the source knows (for example that the slot was
    /// invalidated).
    fn explain<'a>(&'a mut self, _link: &'a Link, error: IngestError) -> BoxFuture<'a, IngestError> {
        Box::pin(async move { error })
    }
}
