//! One build's steps, table by table: a history from its raw changes, a star table from the
//! keys whose history changed, the aggregates by difference, then compaction and the manifest.

use std::collections::HashSet;

use super::*;

/// How a table step went, for its [`TableBuild`] entry.
pub(super) struct Step {
    incremental: bool,
    keys: usize,
    started: Instant,
}

/// The rows [`Build::pending_items_aggregate`] counts again (see [`Build::pending_items_scope`]).
struct PendingScope {
    /// The items whose rows changed.
    items: HashSet<i64>,
    /// The orders whose rows changed.
    orders: HashSet<i64>,
    /// Those orders and every order of the changed items.
    all_orders: HashSet<i64>,
}

/// One run's state.
pub(super) struct Build<'a> {
    pub(super) storage: &'a Storage,
    pub(super) ctx: &'a SessionContext,
    pub(super) config: &'a AcmeConfig,
    pub(super) previous: Option<&'a Manifest>,
    pub(super) full: bool,
    pub(super) target: i64,
    pub(super) commit: Position,
    pub(super) report: ModelReport,
    /// The table versions registered in `ctx`, by name.
    pub(super) registered: std::sync::Mutex<std::collections::HashMap<String, LayerTable>>,
    /// Per history built incrementally by key in this build: the position it started from and
    /// the keys it applied raw changes to ([`Changed::History`]).
    pub(super) history_keys: std::collections::HashMap<String, (i64, HashSet<i64>)>,
}

impl Build<'_> {
    /// The table (if it exists) and the raw position it covers: its own commits record it,
    /// and a table the last manifest pins at its latest version covers the manifest's position.
    pub(super) async fn built(&self, layer: Layer, name: &str) -> Result<(Option<LayerTable>, i64)> {
        let Some(table) = self.storage.open(layer, name).await? else {
            return Ok((None, 0));
        };
        if self.full {
            return Ok((Some(table), 0));
        }
        let own = table.position(MODEL_APP).await?.unwrap_or(0);
        let pinned = self
            .previous
            .filter(|m| m.version_of(layer, name).is_some_and(|v| Some(v) == table.version()))
            .map_or(0, |m| m.position);
        Ok((Some(table), own.max(pinned)))
    }

    /// Replace the rows `target` names in `table` by `df`, record the step in the report, and
    /// register the new version as `name` for the steps after it.
    pub(super) async fn apply(
        &mut self,
        mut table: LayerTable,
        name: &str,
        target: &Target<'_>,
        df: DataFrame,
        split: Option<&str>,
        step: Step,
    ) -> Result<()> {
        if self.config.deletion_vectors && matches!(target.keys, Keys::Set(_)) {
            // The first incremental step on a table: its protocol gains deletion vectors.
            table.enable_deletion_vectors().await?;
        }
        let marks = self.config.deletion_vectors;
        let replaced = replace(self.ctx, &mut table, target, df, split, self.files(), &self.commit, marks).await?;
        self.report.tables.push(TableBuild {
            table: table.name().to_string(),
            incremental: step.incremental,
            keys: step.keys,
            rows: replaced.rows,
            files_rewritten: replaced.files_rewritten,
            files_marked: replaced.files_marked,
            rows_marked: replaced.rows_marked,
            elapsed: step.started.elapsed(),
        });
        self.register(name, &table)
    }

    /// Target bytes and rows of the files the build writes.
    pub(super) fn files(&self) -> (u64, u64) {
        (self.config.target_file_bytes, self.config.model_file_rows)
    }

    pub(super) fn register(&self, name: &str, table: &LayerTable) -> Result<()> {
        let _ = self.ctx.deregister_table(name)?;
        self.ctx.register_table(name, table.provider(None)?)?;
        if let Ok(mut registered) = self.registered.lock() {
            registered.insert(name.to_string(), table.clone());
        }
        Ok(())
    }

    /// The table version registered as `name`.
    fn registered(&self, name: &str) -> Option<LayerTable> {
        self.registered.lock().ok().and_then(|r| r.get(name).cloned())
    }

    /// Register as `relation` the rows of `table` that its key column `key` may hold `keys`
    /// in: the pages of its key index that hold one of them, so that a step reading a few keys'
    /// rows reads about as many pages as keys instead of the whole table. Statements read the
    /// relation joined to the keys, as they would the whole table.
    async fn register_key_scan(
        &self,
        relation: &str,
        table: &LayerTable,
        key: &str,
        keys: &HashSet<i64>,
    ) -> Result<()> {
        let started = Instant::now();
        let index = table.key_index(key).await?;
        let keys: Vec<i64> = keys.iter().copied().collect();
        let provider = table.key_scan(&index, &keys)?;
        tracing::debug!(
            relation,
            table = table.name(),
            keys = keys.len(),
            rows_selected = index.selected_rows(&keys),
            rows_stored = index.rows_indexed(),
            ms = started.elapsed().as_millis() as u64,
            "key scan registered"
        );
        let _ = self.ctx.deregister_table(relation)?;
        self.ctx.register_table(relation, provider)?;
        Ok(())
    }

    /// The values of the integer column `column` in the rows of `table` whose integer column
    /// `key` holds one of `keys`, read through a key scan registered as `relation` (`None`:
    /// more than a build recomputes by key).
    async fn values_of_keys(
        &self,
        relation: &str,
        table: &LayerTable,
        key: &str,
        keys: &HashSet<i64>,
        column: &str,
    ) -> Result<Option<HashSet<i64>>> {
        self.register_key_scan(relation, table, key, keys).await?;
        let looked_up = format!("{relation}_keys");
        register_keys(self.ctx, &looked_up, keys)?;
        let sql = format!("SELECT t.{column} FROM {relation} t JOIN {looked_up} k ON k.k = t.{key}");
        collect_keys(plan_scoped(self.ctx, &sql).await?, MAX_INCREMENTAL_KEYS).await
    }

    /// The keys of `model` one of its [`Changed`] ways finds since `from` (`None`: more than a
    /// build recomputes by key).
    async fn changed_keys(&self, model: &ModelTable, changed: &Changed, from: i64) -> Result<Option<HashSet<i64>>> {
        if let Changed::History { history, .. } = changed
            && let Some((started, keys)) = self.history_keys.get(*history)
            && *started == from
        {
            return Ok(Some(keys.clone()));
        }
        let values = collect_keys(plan_scoped(self.ctx, &changed.query_since(from)).await?, MAX_INCREMENTAL_KEYS);
        let Some(values) = values.await? else { return Ok(None) };
        match changed {
            Changed::History { .. } | Changed::Query(_) => Ok(Some(values)),
            Changed::Lookup { table, by, .. } => match self.registered(table) {
                _ if values.is_empty() => Ok(Some(values)),
                Some(stored) => self.values_of_keys("changed_lookup", &stored, by, &values, model.key).await,
                None => Err(ModelError::Internal(format!("{}: {table} is not registered", model.name))),
            },
        }
    }

    /// Run `plan` (which plans a statement) with `history` (a history keyed by `key`)
    /// restricted to the pages of `keys` when given, then register the whole history again.
    /// Only for statements that read `history` joined to `keys` alone.
    async fn planned_with_key_scan<T, F>(
        &self,
        history: &str,
        key: &str,
        keys: Option<&HashSet<i64>>,
        plan: F,
    ) -> Result<T>
    where
        F: std::future::Future<Output = Result<T>>,
    {
        match keys {
            Some(keys) => self.planned_with_key_scans(&[(history, key, keys)], plan).await,
            None => plan.await,
        }
    }

    /// Run `plan` with each registered table of `scans` restricted to the pages of its keys (by
    /// its integer column), then register the whole tables again. Only for statements that
    /// read each such table joined to its keys alone.
    async fn planned_with_key_scans<T, F>(&self, scans: &[(&str, &str, &HashSet<i64>)], plan: F) -> Result<T>
    where
        F: std::future::Future<Output = Result<T>>,
    {
        let mut restricted = Vec::new();
        for (name, key, keys) in scans {
            if let Some(table) = self.registered(name) {
                self.register_key_scan(name, &table, key, keys).await?;
                restricted.push((*name, table));
            }
        }
        let planned = plan.await;
        for (name, table) in restricted {
            self.register(name, &table)?;
        }
        planned
    }

    /// Apply the raw changes of one source table to its history.
    pub(super) async fn history(&mut self, spec: &HistorySpec, raw: &LayerTable) -> Result<()> {
        let started = Instant::now();
        let name = spec.history_table();
        let (mut existing, mut from) = self.built(Layer::Intermediate, &name).await?;
        let raw_schema = raw.schema()?;
        let attributes = attribute_columns(raw_schema.as_ref());
        if let Some(table) = existing.as_mut() {
            // Columns added at the source since the last build: older versions read NULL.
            let stored = table.schema()?;
            let added: Vec<Field> = attributes
                .iter()
                .filter(|c| stored.field_with_name(c).is_err())
                .filter_map(|c| raw_schema.field_with_name(c).ok())
                .map(|f| f.clone().with_nullable(true))
                .collect();
            if !added.is_empty() {
                table.add_columns(&added).await?;
            }
            self.register(&name, table)?;
        }
        if from >= self.target {
            return Ok(());
        }
        let mut incremental = existing.is_some() && from > 0;
        let mut keys = None;
        let mut truncates = self.register_raw_changes(raw, from).await?;
        if incremental {
            let df = self
                .ctx
                .sql(&format!(
                    "SELECT DISTINCT {} FROM raw_changes WHERE {} <> 'truncate'",
                    history::quote(&spec.key),
                    raw::OP
                ))
                .await?;
            keys = collect_keys(df, MAX_INCREMENTAL_KEYS).await?;
            if keys.is_none() {
                incremental = false;
                from = 0;
                truncates = self.register_raw_changes(raw, from).await?;
            }
        }
        let changes = self.ctx.sql("SELECT count(*) FROM raw_changes").await?.collect().await?;
        let count = changes
            .first()
            .and_then(|b| b.column(0).as_any().downcast_ref::<arrow::array::Int64Array>().map(|a| a.value(0)))
            .unwrap_or(0);
        self.report.changes += u64::try_from(count).unwrap_or(0);
        if count == 0 && existing.is_some() {
            return Ok(());
        }
        let changes = match (&keys, incremental) {
            (Some(keys), true) => {
                register_keys(self.ctx, "changed_keys", keys)?;
                let scope = if truncates.is_empty() { Some((spec.key.as_str(), "changed_keys")) } else { None };
                // The changed keys' open versions, read from the pages that may hold them.
                let mut open = name.as_str();
                if let (Some(_), Some(table)) = (scope, existing.as_ref()) {
                    self.register_key_scan("open_history", table, &spec.key, keys).await?;
                    open = "open_history";
                }
                format!(
                    "({} UNION ALL {})",
                    raw_changes("raw_changes", &attributes),
                    open_versions_as_changes(open, &attributes, scope)
                )
            }
            _ => format!("({})", raw_changes("raw_changes", &attributes)),
        };
        // A full build sorts only the keys that changed after the snapshot.
        let mut windowed = None;
        if !incremental {
            let multi = self
                .ctx
                .sql(&format!(
                    "SELECT DISTINCT {} FROM raw_changes WHERE {op} <> 'snapshot' AND {op} <> 'truncate'",
                    history::quote(&spec.key),
                    op = raw::OP
                ))
                .await?;
            if let Some(keys) = collect_keys(multi, MAX_INCREMENTAL_KEYS).await? {
                register_keys(self.ctx, "windowed_keys", &keys)?;
                windowed = Some("windowed_keys");
            }
        }
        let sql = history_sql(spec, &changes, &attributes, &truncates, windowed);
        let df = if incremental { plan_scoped(self.ctx, &sql).await? } else { self.ctx.sql(&sql).await? };
        let target = Target {
            key: &spec.key,
            order: &spec.key,
            keys: match keys {
                Some(keys) if incremental && truncates.is_empty() => Keys::Set(keys),
                _ => Keys::All,
            },
            open: incremental.then_some(history::IS_CURRENT),
        };
        let key_count = match &target.keys {
            Keys::Set(keys) => {
                // (Every version opened or closed since `from` is one of these keys': a key
                // without a real change is recomputed to what it was.)
                self.history_keys.insert(name.clone(), (from, keys.clone()));
                keys.len()
            }
            Keys::All => 0,
        };
        let table = self.table(existing, Layer::Intermediate, &name, &df).await?;
        let step = Step { incremental, keys: key_count, started };
        self.apply(table, &name, &target, df, Some(history::IS_CURRENT), step).await
    }

    /// Register `raw_changes`: the raw rows of `raw` after `from` up to the target, read only
    /// from the files whose statistics allow such rows. Returns the truncations among them.
    pub(super) async fn register_raw_changes(&self, raw: &LayerTable, from: i64) -> Result<Vec<(i64, i64)>> {
        let files: Vec<_> = raw.data_files()?.into_iter().filter(|f| !f.all_at_most(raw::LSN, from)).collect();
        let _ = self.ctx.deregister_table("raw_input")?;
        self.ctx.register_table("raw_input", raw.provider(Some(&files))?)?;
        let view = self
            .ctx
            .sql(&format!(
                "SELECT * FROM raw_input WHERE {lsn} > {from} AND {lsn} <= {to}",
                lsn = raw::LSN,
                to = self.target
            ))
            .await?;
        let _ = self.ctx.deregister_table("raw_changes")?;
        self.ctx.register_table("raw_changes", view.into_view())?;
        Ok(crate::live::truncations(self.ctx, "raw_changes").await?)
    }

    /// Open `layer/name`, or create it with the columns of `df`; add columns `df` has that
    /// the table lacks (a column added at the source).
    pub(super) async fn table(
        &self,
        existing: Option<LayerTable>,
        layer: Layer,
        name: &str,
        df: &DataFrame,
    ) -> Result<LayerTable> {
        let schema = storage_schema(df);
        let mut table = match existing {
            Some(table) => table,
            None => self.storage.open_or_create(layer, name, &schema).await?,
        };
        let fields: Vec<Field> = schema.fields().iter().map(|f| f.as_ref().clone()).collect();
        table.add_columns(&fields).await?;
        Ok(table)
    }

    /// A dimension with history: recompute the versions of the keys whose history changed.
    pub(super) async fn dimension(
        &mut self,
        table: &ModelTable,
        sk: &str,
        sql: fn(Option<&str>, i64, Option<&str>) -> String,
    ) -> Result<()> {
        let name = table.name;
        let (existing, from) = self.built(Layer::Presentation, name).await?;
        let base = match &existing {
            Some(table) if from > 0 => {
                self.register(name, table)?;
                let batches = self
                    .ctx
                    .sql(&format!("SELECT CAST(coalesce(max({sk}), 0) AS BIGINT) FROM {name}"))
                    .await?
                    .collect()
                    .await?;
                batches
                    .first()
                    .and_then(|b| b.column(0).as_any().downcast_ref::<arrow::array::Int64Array>().map(|a| a.value(0)))
                    .unwrap_or(0)
            }
            _ => 0,
        };
        let previous = (existing.is_some() && from > 0).then(|| name.to_string());
        self.star_with(table, existing, from, move |scope| {
            sql(if scope.is_some() { previous.as_deref() } else { None }, if scope.is_some() { base } else { 0 }, scope)
        })
        .await
    }

    /// `fact_order_status`. A full build first collects the orders that may have entered more
    /// than one status into a key table, so that only those go through the window functions
    /// and the engine joins on the small, counted key table (a join on an uncounted subquery
    /// built its hash table from the whole history and ran out of memory at SF10).
    pub(super) async fn order_status(&mut self, table: &ModelTable) -> Result<()> {
        let (existing, from) = self.built(Layer::Presentation, table.name).await?;
        let mut split = false;
        if (existing.is_none() || from == 0) && from < self.target {
            let multi = self.ctx.sql(&star::order_status_multi_sql()).await?;
            if let Some(keys) = collect_keys(multi, MAX_INCREMENTAL_KEYS).await? {
                register_keys(self.ctx, "status_multi_keys", &keys)?;
                split = true;
            }
        }
        self.star_with(table, existing, from, move |scope| {
            star::fact_order_status_sql(scope, (split && scope.is_none()).then_some("status_multi_keys"))
        })
        .await
    }

    /// A fact table: recompute the rows of the keys its `changed` queries return.
    pub(super) async fn star(&mut self, table: &ModelTable, sql: fn(Option<&str>) -> String) -> Result<()> {
        let (existing, from) = self.built(Layer::Presentation, table.name).await?;
        self.star_with(table, existing, from, sql).await
    }

    /// A star table keyed by its key: recompute the rows of the keys the table's `changed`
    /// queries return (`{changed}` stands for "the version opened or closed after this
    /// table's position", `{position}` for that position).
    pub(super) async fn star_with(
        &mut self,
        model: &ModelTable,
        existing: Option<LayerTable>,
        from: i64,
        sql: impl Fn(Option<&str>) -> String,
    ) -> Result<()> {
        let (name, key, changed) = (model.name, model.key, model.changed);
        let started = Instant::now();
        if let Some(table) = &existing {
            self.register(name, table)?;
        }
        if from >= self.target {
            return Ok(());
        }
        let mut keys = None;
        if existing.is_some() && from > 0 {
            // Each query on its own (their union is the set of keys), timed apart.
            let mut found = Some(HashSet::new());
            for (query, way) in changed.iter().enumerate() {
                let asked = Instant::now();
                let part = self.changed_keys(model, way, from).await?;
                tracing::debug!(
                    table = name,
                    query,
                    keys = part.as_ref().map(|k| k.len()),
                    ms = asked.elapsed().as_millis() as u64,
                    "changed keys found"
                );
                match (found.as_mut(), part) {
                    (Some(all), Some(part)) => all.extend(part),
                    _ => found = None,
                }
                if found.as_ref().is_none_or(|all| all.len() > MAX_INCREMENTAL_KEYS) {
                    found = None;
                    break;
                }
            }
            keys = found;
            if keys.as_ref().is_some_and(|k| k.is_empty()) {
                return Ok(());
            }
        }
        if let Some(keys) = &keys {
            register_keys(self.ctx, "scope_keys", keys)?;
        }
        // Written in the table's sort order (a whole table's joins leave it in their own order).
        let order = model.sort.join(", ");
        let sql = |scope: Option<&str>| format!("SELECT * FROM ({}) s ORDER BY {order}", sql(scope));
        // The statement reads its own history joined to the keys: only their pages are read.
        let history = format!("{}_history", model.source());
        let scoped = sql(keys.as_ref().map(|_| "scope_keys"));
        let mut df = self
            .planned_with_key_scan(&history, key, keys.as_ref(), plan_star(self.ctx, &scoped, keys.is_some()))
            .await?;
        // A table written by an older acme without some column is recomputed whole.
        if keys.is_some()
            && let Some(table) = &existing
        {
            let stored = table.schema()?;
            if df.schema().fields().iter().any(|f| stored.field_with_name(f.name()).is_err()) {
                keys = None;
                df = plan_star(self.ctx, &sql(None), false).await?;
            }
        }
        let table = self.table(existing, Layer::Presentation, name, &df).await?;
        let key_count = keys.as_ref().map_or(0, |k| k.len());
        let incremental = keys.is_some();
        let target = Target { key, order: model.sort[0], keys: keys.map_or(Keys::All, Keys::Set), open: None };
        let step = Step { incremental, keys: key_count, started };
        self.apply(table, name, &target, df, None, step).await
    }

    /// Current orders per (delivery_date, status), maintained by difference: the counts of
    /// the orders whose history changed since the aggregate's position are taken off as they
    /// stood at that position (read from the history) and added back as they stand now.
    pub(super) async fn orders_aggregate(&mut self, table: &ModelTable) -> Result<()> {
        let started = Instant::now();
        let name = table.name;
        let (existing, from) = self.built(Layer::Presentation, name).await?;
        if from >= self.target {
            return Ok(());
        }
        let current = "is_current AND NOT is_deleted";
        let full = format!(
            "SELECT delivery_date, status, CAST(count(*) AS BIGINT) AS orders FROM orders_history WHERE {current} \
             GROUP BY delivery_date, status"
        );
        let mut keys = None;
        if let Some(stored) = &existing
            && from > 0
        {
            self.register(name, stored)?;
            let changed = table.changed.first();
            let changed = changed.ok_or_else(|| ModelError::Internal(format!("{name}: no changed-key query")))?;
            keys = self.changed_keys(table, changed, from).await?;
            if keys.as_ref().is_some_and(|k| k.is_empty()) {
                return Ok(());
            }
        }
        let sql = match &keys {
            None => full,
            Some(keys) => {
                register_keys(self.ctx, "scope_keys", keys)?;
                let then = format!(
                    "valid_from_lsn <= {from} AND (valid_to_lsn IS NULL OR valid_to_lsn > {from}) AND NOT is_deleted"
                );
                let scoped = "orders_history JOIN scope_keys scope ON scope.k = order_id";
                format!(
                    "SELECT delivery_date, status, CAST(sum(orders) AS BIGINT) AS orders FROM ( \
                       SELECT delivery_date, status, orders FROM {name} \
                       UNION ALL SELECT delivery_date, status, -count(*) FROM {scoped} \
                         WHERE {then} GROUP BY delivery_date, status \
                       UNION ALL SELECT delivery_date, status, count(*) FROM {scoped} \
                         WHERE {current} GROUP BY delivery_date, status) d \
                     GROUP BY delivery_date, status HAVING sum(orders) <> 0"
                )
            }
        };
        // Written in the table's declared order (the rewrite sorts by it), like every model table.
        let order = table.sort[0];
        let planned = async {
            match keys {
                Some(_) => plan_scoped(self.ctx, &sql).await,
                None => Ok(self.ctx.sql(&sql).await?),
            }
        };
        let df = self.planned_with_key_scan("orders_history", "order_id", keys.as_ref(), planned).await?;
        let table = self.table(existing, Layer::Presentation, name, &df).await?;
        let target = Target { key: "orders", order, keys: Keys::All, open: None };
        let step = Step { incremental: keys.is_some(), keys: keys.as_ref().map_or(0, |k| k.len()), started };
        self.apply(table, name, &target, df, None, step).await
    }

    /// R3 on the current state per product ([`tables::AGG_PENDING_ITEMS_BY_PRODUCT`]),
    /// maintained by difference as the orders per delivery date are: the items whose row
    /// changed since the aggregate's position, and every item of an order whose row changed,
    /// are counted off as they stood at that position and counted again as they stand now. An
    /// item's count depends on its own row and its order's alone, so no other item's moves.
    ///
    /// Those rows are read through two key scans of `fact_order_items`, each once: the changed
    /// orders' items through the pages of its order ids (which follow its item ids closely), and
    /// the changed items through the pages of its item ids, less the rows the first holds. An
    /// item found through an order only needs that order's rows: unless the item changed, the
    /// version in force at the position is its current one, so it is counted the same on both
    /// sides whenever its order did not change.
    ///
    /// Only the rows of the products those counts move are replaced (marked and appended).
    pub(super) async fn pending_items_aggregate(&mut self, table: &ModelTable) -> Result<()> {
        let started = Instant::now();
        let name = table.name;
        let (items, orders) = (crate::tables::FACT_ORDER_ITEMS, crate::tables::FACT_ORDERS);
        let (existing, from) = self.built(Layer::Presentation, name).await?;
        if from >= self.target {
            return Ok(());
        }
        let counts = |state: &dyn Fn(&str) -> String, items: &str| {
            format!(
                "SELECT i.product_id, CAST(coalesce(sum(i.quantity), 0) AS BIGINT) AS total_items, \
                   CAST(count(i.quantity) AS BIGINT) AS counted, CAST(count(*) AS BIGINT) AS items \
                 FROM {items} i JOIN {orders} o ON o.order_id = i.order_id \
                 WHERE {} AND {} AND o.is_open GROUP BY i.product_id",
                state("i"),
                state("o")
            )
        };
        let now = |t: &str| format!("{t}.is_current");
        let then = |t: &str| {
            format!("{t}.valid_from_lsn <= {from} AND ({t}.valid_to_lsn IS NULL OR {t}.valid_to_lsn > {from})")
        };
        let mut scope = None;
        if let Some(stored) = &existing
            && from > 0
        {
            self.register(name, stored)?;
            scope = self.pending_items_scope(table, from).await?;
            if scope.as_ref().is_some_and(|s| s.items.is_empty() && s.orders.is_empty()) {
                return Ok(());
            }
        }
        // What the changed rows move, per product (at most one row per product, held in
        // memory): only those products' stored rows are replaced. A null product id: the
        // aggregate is counted whole.
        let mut products = None;
        if let Some(scope) = &scope {
            register_keys(self.ctx, "scope_orders", &scope.orders)?;
            register_keys(self.ctx, "scope_items", &scope.items)?;
            let scoped = "(SELECT i.* FROM items_of_orders i JOIN scope_orders k ON k.k = i.order_id \
                 UNION ALL SELECT i.* FROM changed_items i JOIN scope_items k ON k.k = i.order_item_id \
                   LEFT JOIN scope_orders o ON o.k = i.order_id WHERE o.k IS NULL)";
            let moved = format!(
                "SELECT product_id, CAST(sum(total_items) AS BIGINT) AS total_items, \
                   CAST(sum(counted) AS BIGINT) AS counted, CAST(sum(items) AS BIGINT) AS items \
                 FROM (SELECT product_id, -total_items AS total_items, -counted AS counted, -items AS items \
                   FROM ({}) b UNION ALL {}) d \
                 GROUP BY product_id HAVING sum(items) <> 0 OR sum(counted) <> 0 OR sum(total_items) <> 0",
                counts(&then, scoped),
                counts(&now, scoped)
            );
            let scans = [(orders, "order_id", &scope.all_orders)];
            let moved = self.planned_with_key_scans(&scans, plan_scoped(self.ctx, &moved)).await?;
            let schema = Arc::new(moved.schema().as_arrow().clone());
            let batches = moved.collect().await?;
            let mut found = HashSet::new();
            for batch in &batches {
                found.extend(key_column(batch, name)?.iter().map(|id| id.unwrap_or(NULL_KEY)));
            }
            if found.is_empty() {
                return Ok(());
            }
            if !found.contains(&NULL_KEY) {
                let moved = datafusion::datasource::MemTable::try_new(schema, vec![batches])?;
                let _ = self.ctx.deregister_table("pending_moved")?;
                self.ctx.register_table("pending_moved", Arc::new(moved))?;
                products = Some(found);
            }
        }
        let df = match &products {
            // (The sum of no quantity is null, as R3 shows it.)
            None => {
                plan_star(
                    self.ctx,
                    &counts(&now, items).replacen("coalesce(sum(i.quantity), 0)", "sum(i.quantity)", 1),
                    false,
                )
                .await?
            }
            Some(products) => {
                register_keys(self.ctx, "product_keys", products)?;
                let sql = format!(
                    "SELECT product_id, CASE WHEN sum(counted) > 0 THEN CAST(sum(total_items) AS BIGINT) END \
                       AS total_items, CAST(sum(counted) AS BIGINT) AS counted, CAST(sum(items) AS BIGINT) AS items \
                     FROM ( \
                       SELECT a.product_id, coalesce(a.total_items, 0) AS total_items, a.counted, a.items \
                         FROM {name} a JOIN product_keys k ON k.k = a.product_id \
                       UNION ALL SELECT product_id, total_items, counted, items FROM pending_moved) d \
                     GROUP BY product_id HAVING sum(items) <> 0"
                );
                let scans = [(name, "product_id", products)];
                self.planned_with_key_scans(&scans, plan_scoped(self.ctx, &sql)).await?
            }
        };
        let table = self.table(existing, Layer::Presentation, name, &df).await?;
        let step = Step { incremental: products.is_some(), keys: products.as_ref().map_or(0, |p| p.len()), started };
        let keys = products.map_or(Keys::All, Keys::Set);
        let target = Target { key: "product_id", order: "product_id", keys, open: None };
        self.apply(table, name, &target, df, None, step).await
    }

    /// What [`Build::pending_items_aggregate`] counts again: the items and orders whose rows
    /// changed since `from` (the table's `changed` queries), with `fact_order_items` read
    /// through key scans registered as `items_of_orders` (by the changed orders) and
    /// `changed_items` (by the changed items), and the orders of both. `None` when there are
    /// too many (the aggregate is then counted whole).
    async fn pending_items_scope(&self, table: &ModelTable, from: i64) -> Result<Option<PendingScope>> {
        let [changed_items, changed_orders] = table.changed else {
            return Err(ModelError::Internal(format!("{}: two changed-key queries expected", table.name)));
        };
        let Some(items) = self.changed_keys(table, changed_items, from).await? else {
            return Ok(None);
        };
        let Some(orders) = self.changed_keys(table, changed_orders, from).await? else {
            return Ok(None);
        };
        let Some(stored_items) = self.registered(crate::tables::FACT_ORDER_ITEMS) else { return Ok(None) };
        self.register_key_scan("items_of_orders", &stored_items, "order_id", &orders).await?;
        let of_items = self.values_of_keys("changed_items", &stored_items, "order_item_id", &items, "order_id");
        let Some(mut all_orders) = of_items.await? else { return Ok(None) };
        all_orders.extend(&orders);
        Ok(Some(PendingScope { items, orders, all_orders }))
    }

    /// Current orders per customer and status ([`tables::AGG_ORDERS_BY_CUSTOMER`]), kept by
    /// difference per customer: the orders whose `fact_orders` rows changed since the
    /// aggregate's position are counted off as they stood then and counted again as they stand
    /// now, and only the rows of their customers (on either side) are replaced. Rows are read
    /// through key scans.
    pub(super) async fn customer_orders_aggregate(&mut self, table: &ModelTable) -> Result<()> {
        let started = Instant::now();
        let (name, orders) = (table.name, crate::tables::FACT_ORDERS);
        let (existing, from) = self.built(Layer::Presentation, name).await?;
        if from >= self.target {
            return Ok(());
        }
        let counts = |state: &str, scope: &str| {
            format!(
                "SELECT o.customer_id, o.status, CAST(count(*) AS BIGINT) AS orders FROM {orders} o{scope} \
                 WHERE {state} GROUP BY o.customer_id, o.status"
            )
        };
        let now = "o.is_current";
        let then = format!("o.valid_from_lsn <= {from} AND (o.valid_to_lsn IS NULL OR o.valid_to_lsn > {from})");
        let mut scope = None;
        if let Some(stored) = &existing
            && from > 0
        {
            self.register(name, stored)?;
            let changed = table.changed.first();
            let changed = changed.ok_or_else(|| ModelError::Internal(format!("{name}: no changed-key query")))?;
            if let Some(order_keys) = self.changed_keys(table, changed, from).await? {
                if order_keys.is_empty() {
                    return Ok(());
                }
                register_keys(self.ctx, "order_keys", &order_keys)?;
                // Their customers on either side (a null customer: the aggregate is counted whole).
                let customers = format!(
                    "SELECT DISTINCT coalesce(o.customer_id, {NULL_KEY}) FROM {orders} o \
                     JOIN order_keys k ON k.k = o.order_id WHERE ({now}) OR ({then})"
                );
                let found =
                    async { collect_keys(plan_scoped(self.ctx, &customers).await?, MAX_INCREMENTAL_KEYS).await };
                let customers = self.planned_with_key_scan(orders, "order_id", Some(&order_keys), found).await?;
                scope = customers.filter(|c| !c.contains(&NULL_KEY)).map(|c| (order_keys, c));
            }
        }
        let df = match &scope {
            None => plan_star(self.ctx, &counts(now, ""), false).await?,
            Some((order_keys, customer_keys)) => {
                register_keys(self.ctx, "customer_keys", customer_keys)?;
                let scoped = " JOIN order_keys k ON k.k = o.order_id";
                let sql = format!(
                    "SELECT customer_id, status, CAST(sum(orders) AS BIGINT) AS orders FROM ( \
                       SELECT a.customer_id, a.status, a.orders FROM {name} a JOIN customer_keys c ON c.k = a.customer_id \
                       UNION ALL SELECT customer_id, status, -orders FROM ({}) b \
                       UNION ALL {}) d \
                     GROUP BY customer_id, status HAVING sum(orders) <> 0",
                    counts(&then, scoped),
                    counts(now, scoped)
                );
                let scans = [(name, "customer_id", customer_keys), (orders, "order_id", order_keys)];
                self.planned_with_key_scans(&scans, plan_scoped(self.ctx, &sql)).await?
            }
        };
        let key_count = scope.as_ref().map_or(0, |(_, customers)| customers.len());
        let incremental = scope.is_some();
        let table = self.table(existing, Layer::Presentation, name, &df).await?;
        let keys = scope.map_or(Keys::All, |(_, customers)| Keys::Set(customers));
        let target = Target { key: "customer_id", order: "customer_id", keys, open: None };
        let step = Step { incremental, keys: key_count, started };
        self.apply(table, name, &target, df, None, step).await
    }

    /// Merge the small files incremental builds leave, in each table's declared order.
    pub(super) async fn compact(&mut self, catalog: &Catalog) -> Result<()> {
        for model in catalog.tables() {
            let Some(mut table) = self.storage.open(model.layer, model.name).await? else { continue };
            let options = model.compact_options(self.config.target_file_bytes, self.config.model_file_rows);
            self.report.files_compacted += table.compact(self.ctx, &options).await?.files_removed;
        }
        Ok(())
    }

    pub(super) async fn write_manifest(&self, model: &[(Layer, String)]) -> Result<()> {
        let mut manifest = Manifest::new(self.target);
        for (layer, name) in model {
            if let Some(table) = self.storage.open(*layer, name).await? {
                manifest.record(&table);
            }
        }
        self.storage.put_manifest(manifests::MODEL, &manifest).await?;
        Ok(())
    }
}

/// Stands for a null key among collected keys (a key that is the lowest BIGINT only costs a
/// whole recount).
const NULL_KEY: i64 = i64::MIN;

/// The stored schema of a model table computed by `df`: plain strings and binaries (the
/// engine may hand out views), every column nullable.
pub(super) fn storage_schema(df: &DataFrame) -> SchemaRef {
    Arc::new(Schema::new(
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
    ))
}

/// Plan a star table's query. A whole table recomputed (`scoped` false) joins inputs that grow
/// with the source (an order's versions with its per-order aggregate, items with their
/// orders): those joins sort and merge, since a hash join holds its build side whole and
/// cannot spill, while sorts spill beyond the memory pool. A scoped recompute joins a small
/// key set, where hashing is cheaper, and reads its inputs as [`plan_scoped`] does.
pub(super) async fn plan_star(ctx: &SessionContext, sql: &str, scoped: bool) -> Result<DataFrame> {
    if scoped {
        return plan_scoped(ctx, sql).await;
    }
    let hash_joins = |on: bool| ctx.state_ref().write().config_mut().options_mut().optimizer.prefer_hash_join = on;
    hash_joins(false);
    let planned = ctx.sql(sql).await;
    hash_joins(true);
    Ok(planned?)
}

/// Plan a statement that reads the rows of a few keys (joined to a small key table): the
/// Parquet reader applies the filters, and the key set the join pushes down to the scan of
/// the big side, to each row as it decodes the filters' columns, and decodes the other
/// columns only for the rows that pass. (A DataFrame keeps the settings it was planned with.)
pub(super) async fn plan_scoped(ctx: &SessionContext, sql: &str) -> Result<DataFrame> {
    let pushdown =
        |on: bool| ctx.state_ref().write().config_mut().options_mut().execution.parquet.pushdown_filters = on;
    pushdown(true);
    let planned = ctx.sql(sql).await;
    pushdown(false);
    Ok(planned?)
}
