//! The raw tail: the changes committed after the stored model's position, registered for
//! queries (`tail.raw_<table>`) and, when small enough, held in memory between refreshes.

use super::*;
use acme_model::history::HistorySpec;

/// A tail held in memory: the raw changes after `model_position` up to `raw_position`.
pub(crate) struct HeldTail {
    pub(crate) model_position: i64,
    pub(crate) raw_position: i64,
    /// Per history table.
    pub(crate) tables: HashMap<String, HeldPieces>,
}

/// One history's tail pieces ([`acme_model::live`]).
#[derive(Clone)]
pub(crate) struct HeldPieces {
    /// The attribute columns they were computed with (a schema change recomputes them).
    pub(crate) attributes: Vec<String>,
    /// The tail's truncations.
    pub(crate) truncates: Vec<(i64, i64)>,
    /// The first tail change of each key.
    pub(crate) first: Arc<dyn datafusion::catalog::TableProvider>,
    /// The versions the tail opens.
    pub(crate) versions: Arc<dyn datafusion::catalog::TableProvider>,
    /// Memory the two hold (Arrow buffers, shared ones counted once per array).
    pub(crate) bytes: usize,
}

/// The rows the stored histories in `tables` hold (from the Delta log's statistics).
pub(crate) fn model_rows(tables: &[acme_core::LayerTable]) -> u64 {
    let prefix = format!("{}/", Layer::Intermediate.dir());
    tables
        .iter()
        .filter(|t| t.name().starts_with(&prefix))
        .filter_map(|t| t.data_files().ok())
        .flatten()
        .map(|f| f.rows.unwrap_or(0))
        .sum()
}

/// One raw table's files that may hold changes after the stored model's position.
pub(crate) struct TailFiles<'a> {
    /// The source table (`orders`, ...).
    pub(crate) table: String,
    pub(crate) raw: &'a acme_core::LayerTable,
    /// The files whose LSN statistics do not put every change at or before the position.
    pub(crate) files: Vec<acme_core::DataFile>,
}

/// The raw files that may hold changes after `position`, per raw table in `tables`.
pub(crate) fn raw_tail_files(tables: &[acme_core::LayerTable], position: i64) -> Result<Vec<TailFiles<'_>>> {
    let prefix = format!("{}/", Layer::Raw.dir());
    let mut out = Vec::new();
    for raw in tables {
        let Some(table) = raw.name().strip_prefix(&prefix) else { continue };
        let files = raw.data_files()?.into_iter().filter(|f| !f.all_at_most(acme_core::raw::LSN, position)).collect();
        out.push(TailFiles { table: table.to_string(), raw, files });
    }
    Ok(out)
}

/// The raw changes after `position`: the rows of the files wholly after it, from their
/// statistics, plus those after it in the files that straddle it (raw compaction merges small
/// files across the model's position, the snapshot's among them), counted by a query on their
/// LSN column that the files' row-group statistics prune. A straddling file's count is kept in
/// `counted` (data files never change), so each is queried once per model position, not at
/// every refresh.
pub(crate) async fn count_tail(
    ctx: &SessionContext,
    tails: &[TailFiles<'_>],
    position: i64,
    counted: &StraddleCounts,
) -> Result<u64> {
    let mut changes = 0;
    for tail in tails {
        let (after, straddling): (Vec<_>, Vec<_>) =
            tail.files.iter().cloned().partition(|f| f.min_i64(acme_core::raw::LSN).is_some_and(|min| min > position));
        changes += after.iter().map(|f| f.rows.unwrap_or(0)).sum::<u64>();
        for file in straddling {
            let key = (tail.table.clone(), file.path.clone(), position);
            let known = counted.lock().unwrap_or_else(std::sync::PoisonError::into_inner).get(&key).copied();
            let count = match known {
                Some(count) => count,
                None => {
                    let lsn = datafusion::prelude::col(acme_core::raw::LSN);
                    let df = ctx.read_table(tail.raw.provider(Some(std::slice::from_ref(&file)))?)?;
                    let count = df.filter(lsn.gt(datafusion::prelude::lit(position)))?.count().await? as u64;
                    let mut counted = counted.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                    // Only the current model position's counts are worth keeping.
                    counted.retain(|(_, _, at), _| *at == position);
                    counted.insert(key, count);
                    count
                }
            };
            changes += count;
        }
    }
    Ok(changes)
}

/// The changes after a model position in the raw files that straddle it, by (source table,
/// file, position): see [`count_tail`].
pub(crate) type StraddleCounts = Arc<std::sync::Mutex<HashMap<(String, String, i64), u64>>>;

/// How far the stored model trails a [`Warehouse`] handle ([`Warehouse::tail`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct Tail {
    /// Raw changes committed after the stored model's position (rows of the raw layer,
    /// truncations included).
    pub changes: u64,
    /// Rows (versions) the stored histories hold.
    pub model_rows: u64,
    /// Memory the handle holds for the tail (its pieces, see [`MAX_MATERIALIZED_TAIL`]); 0
    /// when each query applies it instead.
    pub held_bytes: u64,
}

/// The schema the stored model tables are registered in, as `model.<table>`.
pub const MODEL_SCHEMA: &str = "model";

/// The model position after which raw changes are applied on read, or `None` when the stored
/// model covers the raw layer (or there is no model yet). Without a raw manifest (a raw layer
/// written by an older acme) the raw tables' latest versions may hold more: apply them. With
/// `empty`, a model at the raw position gets an empty tail (whose live state later handles
/// extend) instead of none.
pub(crate) fn live_tail_position(raw: Option<&Manifest>, model: Option<&Manifest>, empty: bool) -> Option<i64> {
    let model = model?;
    match raw {
        Some(raw) if raw.position < model.position || (raw.position == model.position && !empty) => None,
        _ => Some(model.position),
    }
}

/// The largest tail (raw changes after the stored model's position, as [`Warehouse::tail`]
/// counts it) a handle computes once and holds in memory: its first change per key and the
/// versions it opens (tens of MiB at most). A larger tail is applied by each query instead.
pub const MAX_MATERIALIZED_TAIL: u64 = 262_144;

/// The schema a handle's tail is registered in: the raw tables' files after the stored model's
/// position (`tail.raw_<table>`) and, when it is held in memory, its pieces
/// (`tail.<history>_first`, `tail.<history>_versions`).
pub const TAIL_SCHEMA: &str = "tail";

/// Register, as `tail.raw_<table>`, each raw table over only the files that may hold changes
/// after the stored model's position ([`raw_tail_files`]): the snapshot and the changes the
/// stored model covers are not even opened, so applying the tail costs what the tail holds, not
/// what the raw layer holds. The queries still filter by LSN (a file may straddle the position).
pub(crate) fn register_tail_files(ctx: &SessionContext, tails: &[TailFiles<'_>]) -> Result<()> {
    if let Some(catalog) = ctx.catalog(&ctx.state().config().options().catalog.default_catalog) {
        catalog.register_schema(TAIL_SCHEMA, Arc::new(datafusion::catalog::MemorySchemaProvider::new()))?;
    }
    for tail in tails {
        ctx.register_table(
            format!("{TAIL_SCHEMA}.raw_{}", tail.table).as_str(),
            tail.raw.provider(Some(&tail.files))?,
        )?;
    }
    Ok(())
}

/// Register the live histories and aggregate: the stored `model.*` tables with the raw
/// changes after `position` applied (`found`: the registered tables and their schemas). With
/// `materialize`, the tail's pieces are computed here and held in memory (so each query only
/// probes the stored tables against them, and the engine knows their sizes when it plans
/// joins), and returned for the next handle; with `previous` (a held tail from `position` to an
/// earlier raw position), only the raw changes after it are computed and merged into its
/// pieces. Otherwise every query computes the pieces from the raw tables.
pub(crate) async fn register_live_views(
    ctx: &SessionContext,
    found: &HashMap<String, Arc<Schema>>,
    tails: &[TailFiles<'_>],
    position: i64,
    raw_position: Option<i64>,
    materialize: bool,
    previous: Option<&HeldTail>,
) -> Result<(Option<HeldTail>, Vec<live_star::HistoryTail>)> {
    let specs: Vec<HistorySpec> = Catalog::acme()
        .history_specs()
        .into_iter()
        .filter(|spec| found.contains_key(&spec.history_table()) && found.contains_key(&format!("raw_{}", spec.table)))
        .collect();
    let pieces = futures::future::try_join_all(specs.iter().map(|spec| async move {
        let history = spec.history_table();
        let raw = format!("{TAIL_SCHEMA}.raw_{}", spec.table);
        let attributes = found.get(&history).map(|schema| history_attributes(schema)).unwrap_or_default();
        let names = (format!("{TAIL_SCHEMA}.{history}_first"), format!("{TAIL_SCHEMA}.{history}_versions"));
        let earlier = previous.and_then(|p| Some((p.raw_position, p.tables.get(&history)?)));
        let held = match earlier {
            Some((from, held)) if held.attributes == attributes => {
                if !has_rows_after(tails, &spec.table, from) {
                    // Nothing new for this table: the previous pieces as they are.
                    held.clone()
                } else if let Some(extended) = extend_in_memory(ctx, tails, spec, held, from).await? {
                    extended
                } else {
                    // The changes after `from` closing the held versions and adding theirs,
                    // exactly as `live_history_sql` applies a tail to a stored history.
                    let previous_names = (format!("{}_held", names.0), format!("{}_held", names.1));
                    ctx.register_table(previous_names.0.as_str(), Arc::clone(&held.first))?;
                    ctx.register_table(previous_names.1.as_str(), Arc::clone(&held.versions))?;
                    let (truncates, new_first, new_versions) = tail_sql(ctx, tails, spec, &raw, &attributes, from).await?;
                    let first = format!(
                        "SELECT k, lsn, ts, op FROM {held} UNION ALL SELECT n.k, n.lsn, n.ts, n.op FROM ({new_first}) n \
                         LEFT JOIN {held} p ON p.k = n.k WHERE p.k IS NULL",
                        held = previous_names.0
                    );
                    let versions = live::live_history_sql(
                        spec,
                        &previous_names.1,
                        &format!("({new_first})"),
                        &format!("({new_versions})"),
                        &attributes,
                        &truncates,
                    );
                    let ((first, first_bytes), (versions, versions_bytes)) = futures::future::try_join(
                        hold_in_memory(ctx, &first),
                        hold_in_memory(ctx, &versions),
                    )
                    .await?;
                    // The new pieces hold everything: the previous ones may go with their handle.
                    ctx.deregister_table(previous_names.0.as_str())?;
                    ctx.deregister_table(previous_names.1.as_str())?;
                    let mut all = held.truncates.clone();
                    all.extend(truncates);
                    let bytes = first_bytes + versions_bytes;
                    HeldPieces { attributes: attributes.clone(), truncates: all, first, versions, bytes }
                }
            }
            _ if materialize => {
                let (truncates, first, versions) = tail_sql(ctx, tails, spec, &raw, &attributes, position).await?;
                let ((first, first_bytes), (versions, versions_bytes)) =
                    futures::future::try_join(hold_in_memory(ctx, &first), hold_in_memory(ctx, &versions)).await?;
                HeldPieces { attributes: attributes.clone(), truncates, first, versions, bytes: first_bytes + versions_bytes }
            }
            _ => {
                let (truncates, first, versions) = tail_sql(ctx, tails, spec, &raw, &attributes, position).await?;
                return Ok::<_, QueryError>((spec, attributes, truncates, format!("({first})"), format!("({versions})"), None));
            }
        };
        ctx.register_table(names.0.as_str(), Arc::clone(&held.first))?;
        ctx.register_table(names.1.as_str(), Arc::clone(&held.versions))?;
        Ok((spec, attributes, held.truncates.clone(), names.0, names.1, Some(held)))
    }))
    .await?;
    for (spec, attributes, truncates, first, versions, _) in &pieces {
        let history = spec.history_table();
        let stored = format!("{MODEL_SCHEMA}.{history}");
        let sql = live::live_history_sql(spec, &stored, first, versions, attributes, truncates);
        ctx.register_table(history.as_str(), crate::plans::sql(ctx, &sql).await?.into_view())?;
    }
    let aggregate = tables::AGG_ORDERS_BY_DELIVERY_DATE;
    let orders = pieces.iter().find(|(spec, ..)| spec.table == "orders");
    if let (Some((spec, _, truncates, first, versions, _)), true) = (orders, found.contains_key(aggregate)) {
        let sql = if truncates.is_empty() {
            let stored = format!("{MODEL_SCHEMA}.{}", spec.history_table());
            live::live_orders_aggregate_sql(&format!("{MODEL_SCHEMA}.{aggregate}"), spec, &stored, first, versions)
        } else {
            format!(
                "SELECT delivery_date, status, CAST(count(*) AS BIGINT) AS orders FROM {} \
                 WHERE {} GROUP BY delivery_date, status",
                spec.history_table(),
                state_predicate(None)
            )
        };
        ctx.register_table(aggregate, crate::plans::sql(ctx, &sql).await?.into_view())?;
    }
    let mut tails = Vec::new();
    let mut held = HashMap::new();
    for (spec, attributes, truncates, first, versions, pieces) in pieces {
        if let Some(pieces) = pieces {
            held.insert(spec.history_table(), pieces);
        }
        tails.push(live_star::HistoryTail { spec: spec.clone(), attributes, truncates, first, versions });
    }
    let held = match (materialize, raw_position) {
        (true, Some(raw_position)) => Some(HeldTail { model_position: position, raw_position, tables: held }),
        _ => None,
    };
    Ok((held, tails))
}

/// `held` (a history's tail pieces up to raw position `from`) extended with the raw changes
/// after `from` in memory ([`live::extend_tail_pieces`]): the changes are read with one scan,
/// and no statement is planned. `None` when those changes may hold a truncation (it closes
/// every open version: the SQL applies it), or the raw table lacks an attribute.
pub(crate) async fn extend_in_memory(
    ctx: &SessionContext,
    tails: &[TailFiles<'_>],
    spec: &HistorySpec,
    held: &HeldPieces,
    from: i64,
) -> Result<Option<HeldPieces>> {
    use acme_core::raw::{COMMIT_TS, LSN, OP, SEQ};
    use datafusion::prelude::{ident, lit};
    let Some(tail) = tails.iter().find(|t| t.table == spec.table) else { return Ok(None) };
    let files: Vec<_> = tail.files.iter().filter(|f| !f.all_at_most(LSN, from)).cloned().collect();
    // A truncation is stored with a null key.
    if files.iter().any(|f| f.null_count(&spec.key) != Some(0)) {
        return Ok(None);
    }
    let provider = tail.raw.provider(Some(&files))?;
    let raw_schema = provider.schema();
    if held.attributes.iter().any(|a| raw_schema.field_with_name(a).is_err()) {
        return Ok(None);
    }
    let (Some(first), Some(versions)) = (held_batches(&held.first).await, held_batches(&held.versions).await) else {
        return Ok(None);
    };
    let columns = held.attributes.iter().map(String::as_str).chain([COMMIT_TS, LSN, SEQ, OP]).map(ident);
    let changes = ctx
        .read_table(provider)?
        .filter(ident(LSN).gt(lit(from)).and(ident(OP).not_eq(lit("truncate"))))?
        .select(columns.collect::<Vec<_>>())?;
    let schema = Arc::new(changes.schema().as_arrow().clone());
    let changes = arrow::compute::concat_batches(&schema, &changes.collect().await?)?;
    let held_counts = (first.1.len(), versions.1.len());
    let (first_schema, versions_schema) = (Arc::clone(&first.0), Arc::clone(&versions.0));
    let (extended_first, extended_versions) =
        live::extend_tail_pieces(spec, &changes, (&first.0, &first.1), (&versions.0, &versions.1))?;
    let first = held_piece(&first_schema, extended_first, held_counts.0)?;
    let versions = held_piece(&versions_schema, extended_versions, held_counts.1)?;
    let bytes = held_bytes(&first) + held_bytes(&versions);
    let table = |schema: &arrow::datatypes::SchemaRef, batches: Vec<RecordBatch>| -> Result<_> {
        let table: Arc<dyn datafusion::catalog::TableProvider> =
            Arc::new(datafusion::datasource::MemTable::try_new(Arc::clone(schema), vec![batches])?);
        Ok(table)
    };
    Ok(Some(HeldPieces {
        attributes: held.attributes.clone(),
        truncates: held.truncates.clone(),
        first: table(&first_schema, first)?,
        versions: table(&versions_schema, versions)?,
        bytes,
    }))
}

/// The most batches a held tail piece keeps before they are merged into one: each refresh adds
/// one (its changes' rows), and merging copies the whole piece, so merging every this many
/// refreshes copies each held row a few times over a fold's tail, instead of at every refresh.
pub(crate) const HELD_PIECE_BATCHES: usize = 32;

/// A held piece extended by [`live::extend_tail_pieces`]: the batches from `held` on are new,
/// and get string buffers of their own ([`compact_views`]: they point into the Parquet pages
/// they were read from); the held ones are already compact. Merged into one batch past
/// [`HELD_PIECE_BATCHES`].
fn held_piece(
    schema: &arrow::datatypes::SchemaRef,
    batches: Vec<RecordBatch>,
    held: usize,
) -> Result<Vec<RecordBatch>> {
    let batches = batches
        .into_iter()
        .enumerate()
        .map(|(i, batch)| if i >= held { compact_views(batch) } else { Ok(batch) })
        .collect::<Result<Vec<_>>>()?;
    merged_past_limit(schema, batches)
}

/// `batches` as they are, or merged into one batch (with string buffers of its own) once they
/// are more than [`HELD_PIECE_BATCHES`].
pub(crate) fn merged_past_limit(
    schema: &arrow::datatypes::SchemaRef,
    batches: Vec<RecordBatch>,
) -> Result<Vec<RecordBatch>> {
    if batches.len() <= HELD_PIECE_BATCHES {
        return Ok(batches);
    }
    Ok(vec![compact_views(arrow::compute::concat_batches(schema, &batches)?)?])
}

/// The memory `batches` hold.
fn held_bytes(batches: &[RecordBatch]) -> usize {
    batches.iter().map(RecordBatch::get_array_memory_size).sum()
}

/// The schema and rows of a relation [`hold_in_memory`] holds; `None` for another kind.
pub(crate) async fn held_batches(
    provider: &Arc<dyn datafusion::catalog::TableProvider>,
) -> Option<(arrow::datatypes::SchemaRef, Vec<RecordBatch>)> {
    let any: &dyn std::any::Any = provider.as_ref();
    let table = any.downcast_ref::<datafusion::datasource::MemTable>()?;
    let mut batches = Vec::new();
    for partition in &table.batches {
        batches.extend(partition.read().await.iter().cloned());
    }
    Some((provider.schema(), batches))
}

/// The truncations of `raw` after `from`, and the SQL of the tail's pieces after it: the first
/// change of each key and the versions the changes open (`acme_model::live`).
pub(crate) async fn tail_sql(
    ctx: &SessionContext,
    tails: &[TailFiles<'_>],
    spec: &HistorySpec,
    raw: &str,
    attributes: &[String],
    from: i64,
) -> Result<(Vec<(i64, i64)>, String, String)> {
    // A truncation is stored as a row whose values, key included, are all null: a tail whose
    // files count no null key has none, and needs no query to find them.
    let may_truncate = tails
        .iter()
        .filter(|t| t.table == spec.table)
        .flat_map(|t| &t.files)
        .filter(|f| !f.all_at_most(acme_core::raw::LSN, from))
        .any(|f| f.null_count(&spec.key) != Some(0));
    let truncates = if may_truncate { live::truncations(ctx, &live::tail_rows(raw, from)).await? } else { Vec::new() };
    let first = live::first_changes_sql(spec, raw, attributes, from);
    let versions = live::tail_versions_sql(spec, raw, attributes, from, &truncates);
    Ok((truncates, first, versions))
}

/// Whether the raw table `table` has files that may hold changes after `position` (at or
/// after the stored model's position).
pub(crate) fn has_rows_after(tails: &[TailFiles<'_>], table: &str, position: i64) -> bool {
    tails
        .iter()
        .filter(|t| t.table == table)
        .any(|t| t.files.iter().any(|f| !f.all_at_most(acme_core::raw::LSN, position)))
}

/// Run `sql` and hold its result in memory, as a table.
/// Returns the table and the memory its batches hold.
pub(crate) async fn hold_in_memory(
    ctx: &SessionContext,
    sql: &str,
) -> Result<(Arc<dyn datafusion::catalog::TableProvider>, usize)> {
    let started = std::time::Instant::now();
    let df = crate::plans::sql(ctx, sql).await?;
    let planned = Arc::clone(df.schema().inner());
    let batches = if tracing::enabled!(target: "acme_query::plans", tracing::Level::TRACE) {
        // Each held relation's plan with its operators' metrics: where a refresh spends its time.
        let task = Arc::new(df.task_ctx());
        let plan = df.create_physical_plan().await?;
        let plan_ms = started.elapsed().as_millis() as u64;
        let started = std::time::Instant::now();
        let batches = datafusion::physical_plan::collect(Arc::clone(&plan), task).await?;
        let shown = datafusion::physical_plan::display::DisplayableExecutionPlan::with_metrics(plan.as_ref())
            .indent(true)
            .to_string();
        tracing::trace!(
            target: "acme_query::plans",
            plan_ms,
            ms = started.elapsed().as_millis() as u64,
            %sql,
            "held relation\n{shown}"
        );
        batches
    } else {
        // Executed in a task of its own: a held relation's plan often has one partition, which
        // DataFusion runs in the task that polls it, and a refresh computes several of them
        // concurrently (the star tables of a group), which then share one worker thread.
        let stream = df.execute_stream().await?;
        acme_core::task::OwnedTask::spawn(futures::TryStreamExt::try_collect::<Vec<_>>(stream))
            .join()
            .await
            .ok_or_else(|| {
                datafusion::error::DataFusionError::Execution(
                    "a held relation's query was cancelled: the runtime is shutting down".into(),
                )
            })??
    };
    // The batches' own schema: the plan's may differ from it in nullability.
    let schema = batches.first().map_or(planned, |b| b.schema());
    // One batch with buffers of its own: the query's output is many small batches whose
    // string views point into the buffers of every Parquet page and batch they came from, and
    // holding them would hold all of those (about 7 KB per change instead of the rows' size).
    let batches = match arrow::compute::concat_batches(&schema, &batches) {
        Ok(one) if one.num_rows() > 0 => vec![compact_views(one)?],
        Ok(_) => Vec::new(),
        Err(e) => return Err(e.into()),
    };
    let bytes = batches.iter().map(RecordBatch::get_array_memory_size).sum();
    Ok((Arc::new(datafusion::datasource::MemTable::try_new(schema, vec![batches])?), bytes))
}

/// `batch` with its string and binary view columns copied into buffers of their own.
pub(crate) fn compact_views(batch: RecordBatch) -> Result<RecordBatch> {
    let columns = batch
        .columns()
        .iter()
        .map(|c| match c.data_type() {
            DataType::Utf8View => Arc::new(c.as_string_view().gc()) as arrow::array::ArrayRef,
            DataType::BinaryView => Arc::new(c.as_binary_view().gc()) as arrow::array::ArrayRef,
            _ => Arc::clone(c),
        })
        .collect();
    Ok(RecordBatch::try_new(batch.schema(), columns)?)
}

/// The first instant the orders' history covers (the stored history's first version; the
/// tail's only when nothing is stored).
pub(crate) async fn first_instant(ctx: &SessionContext) -> datafusion::error::Result<Option<i64>> {
    for table in [format!("{MODEL_SCHEMA}.orders_history"), "orders_history".to_string()] {
        if let Some(first) = first_valid_from(ctx, &table).await? {
            return Ok(Some(first));
        }
    }
    Ok(None)
}

/// The earliest `valid_from` of the history `table` (microseconds), `None` when it is empty.
pub(crate) async fn first_valid_from(ctx: &SessionContext, table: &str) -> datafusion::error::Result<Option<i64>> {
    let batches = crate::plans::sql(ctx, &format!("SELECT CAST(min(valid_from) AS BIGINT) FROM {table}"))
        .await?
        .collect()
        .await?;
    Ok(batches
        .first()
        .map(|b| b.column(0).as_primitive::<Int64Type>().clone())
        .filter(|a| a.len() == 1 && !a.is_null(0))
        .map(|a| a.value(0)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(from: i64, rows: i64) -> RecordBatch {
        let schema = Arc::new(Schema::new(vec![arrow::datatypes::Field::new("k", DataType::Int64, false)]));
        let keys = arrow::array::Int64Array::from_iter_values(from..from + rows);
        RecordBatch::try_new(schema, vec![Arc::new(keys)]).expect("batch")
    }

    #[test]
    fn a_held_piece_keeps_its_batches_until_there_are_too_many_then_merges_them() {
        let schema = batch(0, 1).schema();
        let few: Vec<_> = (0..HELD_PIECE_BATCHES as i64).map(|i| batch(i * 10, 10)).collect();
        let kept = held_piece(&schema, few.clone(), few.len() - 1).expect("piece");
        assert_eq!(kept, few);
        let many: Vec<_> = (0..=HELD_PIECE_BATCHES as i64).map(|i| batch(i * 10, 10)).collect();
        let merged = held_piece(&schema, many.clone(), many.len() - 1).expect("piece");
        assert_eq!(merged.len(), 1);
        assert_eq!(merged[0], arrow::compute::concat_batches(&schema, &many).expect("concat"));
    }
}
