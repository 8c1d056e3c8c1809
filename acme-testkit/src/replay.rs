//! A second reference, independent of acme's model: the raw layer's changes replayed row by row
//! into the state of the source tables at any instant, and the four reports computed from that
//! state in plain Rust, following the definitions in the domain description (`ACME.md`).
//!
//! The PostgreSQL oracle ([`crate::oracle`]) answers for the present only; this one answers as
//! of any instant the raw layer covers: exactly a commit's time, between two commits that one
//! micro-batch stored together, before a key's first change. The raw rows come in as Arrow
//! batches (read by the caller, for example `SELECT * FROM raw_orders` through a warehouse).
//! Answers are rendered like [`crate::oracle::source_reports`]' rows.

use std::collections::{BTreeMap, HashMap};

use arrow::array::{Array, AsArray, RecordBatch};
use arrow::compute::cast;
use arrow::datatypes::{DataType, Int64Type};

use crate::oracle::NULL;
use crate::{HarnessError, Result};

/// One change of a raw table: its operation, position, commit time (microseconds since
/// 1970-01-01 UTC) and the row's columns the reports read, as text (`None`: NULL).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    /// `snapshot`, `insert`, `update`, `delete` or `truncate`.
    pub op: String,
    /// Commit LSN of the transaction.
    pub lsn: i64,
    /// Position in the transaction.
    pub seq: i64,
    /// Commit time, microseconds since 1970-01-01 UTC.
    pub commit_ts: i64,
    /// The row's key (None for a truncate).
    pub key: Option<i64>,
    /// The other columns read, in the order of the table's [`Replay`] column list.
    pub values: Vec<Option<String>>,
}

/// The columns each table's reports read, after the key.
const COLUMNS: [(&str, &str, &[&str]); 3] = [
    ("customers", "customer_id", &["customer_name"]),
    ("orders", "order_id", &["delivery_date", "customer_id", "status"]),
    ("order_items", "order_item_id", &["order_id", "product_id", "quanity"]),
];

/// The raw changes of the tables the reports read, replayable to any instant.
#[derive(Debug, Default, Clone)]
pub struct Replay {
    changes: HashMap<&'static str, Vec<Change>>,
}

/// The state of one table at an instant: key to the columns the reports read.
type State = BTreeMap<i64, Vec<Option<String>>>;

impl Replay {
    /// The tables whose raw rows [`Replay::add`] takes: `customers`, `orders`, `order_items`.
    pub fn tables() -> impl Iterator<Item = &'static str> {
        COLUMNS.iter().map(|(table, ..)| *table)
    }

    /// Add raw rows of `table` (every column of the raw table, or at least the change columns
    /// `_op`, `_lsn`, `_seq`, `_commit_ts` and the source columns the reports read).
    pub fn add(&mut self, table: &str, batches: &[RecordBatch]) -> Result<()> {
        let (name, key, columns) = COLUMNS
            .iter()
            .find(|(name, ..)| *name == table)
            .ok_or_else(|| bad(format!("the replay does not read table {table}")))?;
        let changes = self.changes.entry(name).or_default();
        for batch in batches {
            let text = |column: &str| strings(batch, column);
            let int = |column: &str| integers(batch, column);
            let (ops, lsns, seqs, times, keys) =
                (text("_op")?, int("_lsn")?, int("_seq")?, int("_commit_ts")?, int(key)?);
            let values = columns.iter().map(|c| text(c)).collect::<Result<Vec<_>>>()?;
            for row in 0..batch.num_rows() {
                let missing = |what: &str| bad(format!("raw {table} row {row} has no {what}"));
                let op = ops[row].clone().ok_or_else(|| missing("_op"))?;
                // Snapshot rows have no position in a transaction.
                let seq = match seqs[row] {
                    Some(seq) => seq,
                    None if op == "snapshot" => 0,
                    None => return Err(missing("_seq")),
                };
                changes.push(Change {
                    op,
                    lsn: lsns[row].ok_or_else(|| missing("_lsn"))?,
                    seq,
                    commit_ts: times[row].ok_or_else(|| missing("_commit_ts"))?,
                    key: keys[row],
                    values: values.iter().map(|column| column[row].clone()).collect(),
                });
            }
        }
        changes.sort_by_key(|c| (c.lsn, c.seq));
        Ok(())
    }

    /// The distinct commit times of the changes after the snapshot, in order.
    pub fn commit_times(&self) -> Vec<i64> {
        let mut times: Vec<i64> =
            self.changes.values().flatten().filter(|c| c.op != "snapshot").map(|c| c.commit_ts).collect();
        times.sort_unstable();
        times.dedup();
        times
    }

    /// The commit time of the snapshot rows (the earliest instant the history answers for).
    pub fn snapshot_time(&self) -> Option<i64> {
        self.changes.values().flatten().filter(|c| c.op == "snapshot").map(|c| c.commit_ts).max()
    }

    /// The commit time of the first change to `key` of `table` after the snapshot.
    pub fn first_change(&self, table: &str, key: i64) -> Option<i64> {
        self.changes.get(table)?.iter().filter(|c| c.op != "snapshot" && c.key == Some(key)).map(|c| c.commit_ts).min()
    }

    /// Keys of `table` that the snapshot did not hold and a later change inserted.
    pub fn inserted_keys(&self, table: &str) -> Vec<i64> {
        let Some(changes) = self.changes.get(table) else { return Vec::new() };
        let held: std::collections::HashSet<i64> =
            changes.iter().filter(|c| c.op == "snapshot").filter_map(|c| c.key).collect();
        let mut keys: Vec<i64> =
            changes.iter().filter(|c| c.op == "insert").filter_map(|c| c.key).filter(|k| !held.contains(k)).collect();
        keys.sort_unstable();
        keys.dedup();
        keys
    }

    /// The SCD type-2 history of `table` as the replay sees it: every change opens a version
    /// of its key (a delete opens a deleted one; snapshot rows open the first), closed by the
    /// key's next change or by a later `TRUNCATE` of the table, whichever comes first. Rendered
    /// one per line as `key|valid_from_lsn|valid_from|valid_to|is_deleted|columns...`, times in
    /// microseconds since 1970-01-01 UTC, NULL as [`NULL`], sorted.
    pub fn versions(&self, table: &str) -> Vec<String> {
        let changes = self.changes.get(table).map(Vec::as_slice).unwrap_or_default();
        let truncations: Vec<(i64, i64)> =
            changes.iter().filter(|c| c.op == "truncate").map(|c| (c.lsn, c.commit_ts)).collect();
        let mut by_key: BTreeMap<i64, Vec<&Change>> = BTreeMap::new();
        for change in changes.iter().filter(|c| c.op != "truncate") {
            if let Some(key) = change.key {
                by_key.entry(key).or_default().push(change);
            }
        }
        let mut out = Vec::new();
        for (key, versions) in by_key {
            for (i, change) in versions.iter().enumerate() {
                let next = versions.get(i + 1).map(|n| (n.lsn, n.commit_ts));
                let truncated = truncations.iter().find(|(lsn, _)| *lsn > change.lsn).copied();
                let closed = match (next, truncated) {
                    (Some(n), Some(t)) => Some(if t.0 < n.0 { t } else { n }),
                    (n, t) => n.or(t),
                };
                let values: Vec<String> = change.values.iter().map(|v| Nullable(v.clone()).text()).collect();
                out.push(format!(
                    "{key}|{}|{}|{}|{}|{}",
                    change.lsn,
                    change.commit_ts,
                    closed.map_or(NULL.to_string(), |(_, ts)| ts.to_string()),
                    change.op == "delete",
                    values.join("|")
                ));
            }
        }
        out.sort();
        out
    }

    /// The key and the columns [`Replay::versions`] renders after the version columns, for a
    /// query of acme's history of `table`.
    pub fn columns(table: &str) -> Option<(&'static str, &'static [&'static str])> {
        COLUMNS.iter().find(|(name, ..)| *name == table).map(|(_, key, columns)| (*key, *columns))
    }

    /// Each table's rows at `at` (microseconds since 1970-01-01 UTC; `None`: after every
    /// change): the changes committed at or before it, applied in commit order.
    fn state(&self, table: &str, at: Cutoff) -> State {
        let mut state = State::new();
        for change in self.changes.get(table).into_iter().flatten() {
            let after = match at {
                Cutoff::Latest => false,
                Cutoff::Time(t) => change.commit_ts > t,
                Cutoff::Position(lsn) => change.lsn > lsn,
            };
            if after {
                continue;
            }
            match (change.op.as_str(), change.key) {
                ("truncate", _) => state.clear(),
                ("delete", Some(key)) => {
                    state.remove(&key);
                }
                (_, Some(key)) => {
                    state.insert(key, change.values.clone());
                }
                (_, None) => {}
            }
        }
        state
    }

    /// The reports of [`crate::oracle::REPORTS`] at `at` (`None`: the latest state), rendered
    /// like the oracle's rows.
    pub fn reports(&self, at: Option<i64>, limit: usize) -> Vec<Vec<String>> {
        self.reports_with(at.map_or(Cutoff::Latest, Cutoff::Time), limit)
    }

    /// The reports of [`crate::oracle::REPORTS`] at a raw-layer position: every change whose
    /// commit LSN is at most `lsn`, as a warehouse handle at that position answers.
    pub fn reports_at_position(&self, lsn: i64, limit: usize) -> Vec<Vec<String>> {
        self.reports_with(Cutoff::Position(lsn), limit)
    }

    fn reports_with(&self, at: Cutoff, limit: usize) -> Vec<Vec<String>> {
        let customers = self.state("customers", at);
        let orders = self.state("orders", at);
        let items = self.state("order_items", at);
        // orders: [delivery_date, customer_id, status]
        let status = |row: &Vec<Option<String>>| row[2].clone();
        let open = |row: &Vec<Option<String>>| status(row).is_some_and(|s| s != "COMPLETED");
        let pending = |row: &Vec<Option<String>>| status(row).is_some_and(|s| s == "PENDING");
        let r1 = |keep: &dyn Fn(&Vec<Option<String>>) -> bool| {
            let mut counts: BTreeMap<(Nullable, Nullable), i64> = BTreeMap::new();
            for row in orders.values().filter(|r| keep(r)) {
                *counts.entry((Nullable(row[0].clone()), Nullable(row[2].clone()))).or_default() += 1;
            }
            counts.into_iter().map(|((date, status), n)| format!("{}|{}|{n}", date.text(), status.text())).collect()
        };
        let r2 = {
            let mut counts: BTreeMap<Nullable, i64> = BTreeMap::new();
            for row in orders.values().filter(|r| open(r)) {
                *counts.entry(Nullable(row[0].clone())).or_default() += 1;
            }
            let mut ranked: Vec<(Nullable, i64)> = counts.into_iter().collect();
            ranked.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
            ranked.into_iter().take(limit).map(|(date, n)| format!("{}|{n}", date.text())).collect()
        };
        let r3 = {
            // items: [order_id, product_id, quanity]; SUM ignores NULL quantities and is NULL
            // when every quantity of a product is.
            let mut totals: BTreeMap<Nullable, Option<i64>> = BTreeMap::new();
            for row in items.values() {
                let order_open = row[0].as_ref().and_then(|id| id.parse::<i64>().ok()).and_then(|id| orders.get(&id));
                if !order_open.is_some_and(&open) {
                    continue;
                }
                let quantity = row[2].as_ref().and_then(|q| q.parse::<i64>().ok());
                let total = totals.entry(Nullable(row[1].clone())).or_default();
                if let Some(q) = quantity {
                    *total = Some(total.unwrap_or(0) + q);
                }
            }
            let mut ranked: Vec<(Nullable, Option<i64>)> = totals.into_iter().collect();
            // Largest first with NULL totals first (PostgreSQL's DESC), then by product id.
            ranked.sort_by(|a, b| match (a.1, b.1) {
                (None, None) => a.0.cmp(&b.0),
                (None, Some(_)) => std::cmp::Ordering::Less,
                (Some(_), None) => std::cmp::Ordering::Greater,
                (Some(x), Some(y)) => y.cmp(&x).then_with(|| a.0.cmp(&b.0)),
            });
            ranked
                .into_iter()
                .map(|(product, total)| {
                    format!("{}|{}", product.text(), total.map_or(NULL.to_string(), |t| t.to_string()))
                })
                .collect()
        };
        let r4 = {
            let mut counts: BTreeMap<Nullable, i64> = BTreeMap::new();
            for row in orders.values().filter(|r| pending(r)) {
                *counts.entry(Nullable(row[1].clone())).or_default() += 1;
            }
            let mut distinct: Vec<i64> = counts.values().copied().collect();
            distinct.sort_unstable_by(|a, b| b.cmp(a));
            distinct.dedup();
            let mut ranked: Vec<(usize, Nullable, i64)> = counts
                .into_iter()
                .map(|(customer, n)| (distinct.iter().position(|d| *d == n).unwrap_or(0) + 1, customer, n))
                .filter(|(rank, ..)| *rank <= limit)
                .collect();
            ranked.sort_by(|a, b| a.0.cmp(&b.0).then_with(|| a.1.cmp(&b.1)));
            ranked
                .into_iter()
                .map(|(rank, customer, n)| {
                    let name = customer
                        .0
                        .as_ref()
                        .and_then(|id| id.parse::<i64>().ok())
                        .and_then(|id| customers.get(&id))
                        .and_then(|row| row[0].clone());
                    format!("{}|{}|{n}|{rank}", customer.text(), Nullable(name).text())
                })
                .collect()
        };
        vec![r1(&open), r1(&pending), r2, r3, r4]
    }
}

/// Which changes a state includes.
#[derive(Debug, Clone, Copy)]
enum Cutoff {
    /// All of them.
    Latest,
    /// Those committed at or before this instant (microseconds since 1970-01-01 UTC).
    Time(i64),
    /// Those whose commit LSN is at most this.
    Position(i64),
}

/// A text value that sorts as SQL's `ASC NULLS LAST` does (numbers by value, text by bytes,
/// as the test cluster's C collation does).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Nullable(Option<String>);

impl Nullable {
    fn text(&self) -> String {
        self.0.clone().unwrap_or_else(|| NULL.to_string())
    }
}

impl Ord for Nullable {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        match (&self.0, &other.0) {
            (None, None) => std::cmp::Ordering::Equal,
            (None, Some(_)) => std::cmp::Ordering::Greater,
            (Some(_), None) => std::cmp::Ordering::Less,
            (Some(a), Some(b)) => match (a.parse::<i64>(), b.parse::<i64>()) {
                (Ok(x), Ok(y)) => x.cmp(&y),
                _ => a.as_bytes().cmp(b.as_bytes()),
            },
        }
    }
}

impl PartialOrd for Nullable {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

fn bad(message: String) -> HarnessError {
    HarnessError::InvalidParameter(message)
}

fn column<'a>(batch: &'a RecordBatch, name: &str) -> Result<&'a dyn Array> {
    batch.column_by_name(name).map(|c| c.as_ref()).ok_or_else(|| bad(format!("the raw rows have no column {name}")))
}

/// A column as text (dates as `YYYY-MM-DD`, numbers in decimal).
fn strings(batch: &RecordBatch, name: &str) -> Result<Vec<Option<String>>> {
    let text = cast(column(batch, name)?, &DataType::Utf8).map_err(|e| bad(format!("{name} as text: {e}")))?;
    let text = text.as_string::<i32>();
    Ok((0..text.len()).map(|i| text.is_valid(i).then(|| text.value(i).to_string())).collect())
}

/// An integer or timestamp column as 64-bit integers (timestamps: their stored microseconds).
fn integers(batch: &RecordBatch, name: &str) -> Result<Vec<Option<i64>>> {
    let array = column(batch, name)?;
    let array = cast(array, &DataType::Int64).map_err(|e| bad(format!("{name} as an integer: {e}")))?;
    let ints = array.as_primitive::<Int64Type>();
    Ok((0..ints.len()).map(|i| ints.is_valid(i).then(|| ints.value(i))).collect())
}
