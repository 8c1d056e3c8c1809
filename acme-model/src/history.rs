//! SCD type-2 history of one source table, derived from its raw changes with one DataFusion
//! plan (window functions over the key, ordered by commit LSN and position in transaction).

use acme_core::raw;
use arrow::datatypes::Schema;

/// Columns every history table adds after the business attributes.
pub const VALID_FROM: &str = "valid_from";
/// End of validity (null while current).
pub const VALID_TO: &str = "valid_to";
/// LSN that opened the version.
pub const VALID_FROM_LSN: &str = "valid_from_lsn";
/// LSN that closed the version (null while current).
pub const VALID_TO_LSN: &str = "valid_to_lsn";
/// True for the latest version of a key (also when that version is a deletion).
pub const IS_CURRENT: &str = "is_current";
/// Operation that opened the version (`snapshot`, `insert`, `update`, `delete`).
pub const OPENED_BY: &str = "opened_by";
/// Operation that closed the version (`update`, `delete`, `insert`, `truncate`; null while current).
pub const CLOSED_BY: &str = "closed_by";
/// True for a version that records the key's deletion (the key does not exist while it holds).
pub const IS_DELETED: &str = "is_deleted";

/// What to build the history of: a raw table and its business key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistorySpec {
    /// Source (and raw) table name.
    pub table: String,
    /// Business key column.
    pub key: String,
}

impl HistorySpec {
    /// History of `table` keyed by `key`.
    pub fn new(table: impl Into<String>, key: impl Into<String>) -> Self {
        Self { table: table.into(), key: key.into() }
    }

    /// Name of the intermediate table.
    pub fn history_table(&self) -> String {
        format!("{}_history", self.table)
    }
}

/// The business attribute columns of a raw schema (no metadata, no `_old_` columns).
pub fn attribute_columns(raw_schema: &Schema) -> Vec<String> {
    raw_schema.fields().iter().map(|f| f.name().clone()).filter(|n| !n.starts_with('_')).collect()
}

/// `name` as a quoted SQL identifier.
pub fn quote(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// SQL computing history versions of `spec` from `changes`: a relation with the attribute
/// columns and the raw metadata columns (commit time, LSN, sequence, operation) holding the
/// row changes (no truncations) in any order.
///
/// `truncates` lists the (LSN, commit time in microseconds) of the table's truncations in
/// LSN order: a truncation closes every version open at that point.
///
/// For an incremental build, `changes` holds the new raw changes plus the open versions of the
/// keys they touch (as changes at their opening LSN): the result is then the new versions and
/// those open versions, closed where a later change or truncation closes them.
///
/// `windowed`, when given, names a relation `k` holding every key that may have more than one
/// change in `changes`: the others (in a full build, the keys the snapshot copied and nothing
/// changed since, nearly all of them) skip the sort the window functions need.
pub fn history_sql(
    spec: &HistorySpec,
    changes: &str,
    attributes: &[String],
    truncates: &[(i64, i64)],
    windowed: Option<&str>,
) -> String {
    let key = quote(&spec.key);
    let window = format!("PARTITION BY {key} ORDER BY {lsn}, {seq} NULLS FIRST", lsn = raw::LSN, seq = raw::SEQ);
    let attrs = attributes.iter().map(|c| quote(c)).collect::<Vec<_>>().join(", ");
    let mut inner = format!(
        "SELECT {attrs}, {ts} AS vf, {lsn} AS vf_lsn, {op} AS o_op, \
           LEAD({ts}) OVER ({window}) AS next_ts, LEAD({lsn}) OVER ({window}) AS next_lsn, \
           LEAD({op}) OVER ({window}) AS next_op \
         FROM {changes} changes",
        ts = raw::COMMIT_TS,
        lsn = raw::LSN,
        op = raw::OP,
    );
    if let Some(windowed) = windowed {
        // Joins with the small key table (not `IN`/`NOT IN` subqueries: a null-aware anti join
        // would hold the whole change table in memory to build its hash table).
        let qualified = attributes.iter().map(|c| format!("changes.{}", quote(c))).collect::<Vec<_>>().join(", ");
        inner = format!(
            "SELECT {attrs}, {ts} AS vf, {lsn} AS vf_lsn, {op} AS o_op, \
               LEAD({ts}) OVER ({window}) AS next_ts, LEAD({lsn}) OVER ({window}) AS next_lsn, \
               LEAD({op}) OVER ({window}) AS next_op \
             FROM (SELECT changes.* FROM {changes} changes JOIN {windowed} w ON w.k = changes.{key}) changes \
             UNION ALL SELECT {qualified}, changes.{ts} AS vf, changes.{lsn} AS vf_lsn, changes.{op} AS o_op, \
               arrow_cast(CAST(NULL AS BIGINT), 'Timestamp(Microsecond, Some(\"UTC\"))') AS next_ts, \
               CAST(NULL AS BIGINT) AS next_lsn, CAST(NULL AS VARCHAR) AS next_op \
             FROM {changes} changes LEFT JOIN {windowed} w ON w.k = changes.{key} WHERE w.k IS NULL",
            ts = raw::COMMIT_TS,
            lsn = raw::LSN,
            op = raw::OP,
        );
    }
    // First truncation after each version, if any.
    let (t_lsn, t_ts) = if truncates.is_empty() {
        ("CAST(NULL AS BIGINT)".to_string(), utc_micros_null())
    } else {
        let lsn_case: Vec<String> = truncates.iter().map(|(l, _)| format!("WHEN vf_lsn < {l} THEN {l}")).collect();
        let ts_case: Vec<String> =
            truncates.iter().map(|(l, ts)| format!("WHEN vf_lsn < {l} THEN {}", utc_micros(*ts))).collect();
        (format!("CASE {} END", lsn_case.join(" ")), format!("CASE {} END", ts_case.join(" ")))
    };
    let truncated_first = "(t_lsn IS NOT NULL AND (next_lsn IS NULL OR t_lsn < next_lsn))";
    format!(
        "SELECT {attrs}, \
           vf AS {VALID_FROM}, \
           CASE WHEN {truncated_first} THEN t_ts ELSE next_ts END AS {VALID_TO}, \
           vf_lsn AS {VALID_FROM_LSN}, \
           CASE WHEN {truncated_first} THEN t_lsn ELSE next_lsn END AS {VALID_TO_LSN}, \
           (next_lsn IS NULL AND t_lsn IS NULL) AS {IS_CURRENT}, \
           o_op AS {OPENED_BY}, \
           CASE WHEN {truncated_first} THEN 'truncate' ELSE next_op END AS {CLOSED_BY}, \
           (o_op = 'delete') AS {IS_DELETED} \
         FROM (SELECT *, {t_lsn} AS t_lsn, {t_ts} AS t_ts FROM ({inner}) versions) closed"
    )
}

/// The open versions of a history table `history` as change rows for [`history_sql`]: each
/// at the LSN and time that opened it, before any change of that LSN.
pub fn open_versions_as_changes(history: &str, attributes: &[String], keys: Option<(&str, &str)>) -> String {
    let attrs = attributes.iter().map(|c| format!("h.{}", quote(c))).collect::<Vec<_>>().join(", ");
    // A join on the small key table, not an `IN` subquery over the whole history.
    let scope = match keys {
        Some((key, relation)) => format!(" JOIN {relation} scope ON scope.k = h.{}", quote(key)),
        None => String::new(),
    };
    format!(
        "SELECT {attrs}, h.{VALID_FROM} AS {ts}, h.{VALID_FROM_LSN} AS {lsn}, CAST(NULL AS BIGINT) AS {seq}, \
           h.{OPENED_BY} AS {op} FROM {history} h{scope} WHERE h.{IS_CURRENT}",
        ts = raw::COMMIT_TS,
        lsn = raw::LSN,
        seq = raw::SEQ,
        op = raw::OP,
    )
}

/// The raw changes (no truncations) of a raw relation, as change rows for [`history_sql`].
pub fn raw_changes(raw: &str, attributes: &[String]) -> String {
    let attrs = attributes.iter().map(|c| quote(c)).collect::<Vec<_>>().join(", ");
    format!(
        "SELECT {attrs}, {ts}, {lsn}, {seq}, {op} FROM {raw} WHERE {op} <> 'truncate'",
        ts = raw::COMMIT_TS,
        lsn = raw::LSN,
        seq = raw::SEQ,
        op = raw::OP,
    )
}

/// Predicate selecting the versions that describe the state at `as_of_micros` (UTC), or the
/// current state when `None`; deleted keys are excluded.
pub fn state_predicate(as_of_micros: Option<i64>) -> String {
    match as_of_micros {
        None => format!("{IS_CURRENT} AND NOT {IS_DELETED}"),
        Some(t) => {
            let t = utc_micros(t);
            format!("{VALID_FROM} <= {t} AND ({VALID_TO} IS NULL OR {VALID_TO} > {t}) AND NOT {IS_DELETED}")
        }
    }
}

/// Predicate selecting the versions in force just before the source position `lsn`: the
/// state after every transaction committed before it; deleted keys are excluded.
pub fn state_at_lsn_predicate(lsn: i64) -> String {
    format!("{VALID_FROM_LSN} < {lsn} AND ({VALID_TO_LSN} IS NULL OR {VALID_TO_LSN} >= {lsn}) AND NOT {IS_DELETED}")
}

/// SQL literal of a UTC timestamp given in microseconds since the epoch.
pub fn utc_micros(micros: i64) -> String {
    format!("arrow_cast({micros}, 'Timestamp(Microsecond, Some(\"UTC\"))')")
}

/// The meta columns [`history_sql`] adds after the business attributes, in order.
pub const HISTORY_COLUMNS: [&str; 8] =
    [VALID_FROM, VALID_TO, VALID_FROM_LSN, VALID_TO_LSN, IS_CURRENT, OPENED_BY, CLOSED_BY, IS_DELETED];

/// The business attribute columns of a stored history table's schema.
pub fn history_attributes(history_schema: &Schema) -> Vec<String> {
    history_schema
        .fields()
        .iter()
        .map(|f| f.name().clone())
        .filter(|n| !HISTORY_COLUMNS.contains(&n.as_str()))
        .collect()
}

/// SQL literal of a null UTC timestamp.
pub(crate) fn utc_micros_null() -> String {
    "arrow_cast(CAST(NULL AS BIGINT), 'Timestamp(Microsecond, Some(\"UTC\"))')".to_string()
}
