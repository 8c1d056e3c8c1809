//! SQL planned once per statement text, for the statements every refresh plans again.
//!
//! A refresh registers its relations (the tail's pieces, the looked-up stored rows, the live
//! views) under the same names each time, and plans the same statements over them: most of
//! their text does not change from one refresh to the next, only the relations behind the
//! names. Turning that text into a logical plan (parsing, resolving names and types) was about
//! a quarter of the planning a refresh does (a CPU profile under the SF1 live workload). The
//! logical plan of each statement text is kept here with its tables unbound (their schemas
//! only), and bound to the relations the names stand for in the context that plans it again.
//! A name whose relation has another schema than when the plan was made (or none) makes the
//! text planned afresh. A statement that reads a view is not kept: planning inlines the view's
//! plan, made in another context or from another text, under names this one may bind to other
//! relations. The optimizers and the physical planner still run on every use.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use datafusion::common::TableReference;
use datafusion::common::tree_node::{Transformed, TreeNodeRecursion};
use datafusion::datasource::provider_as_source;
use datafusion::logical_expr::{LogicalPlan, LogicalTableSource};
use datafusion::prelude::{DataFrame, SessionContext};

use datafusion::error::Result;

/// Statement texts kept. Past this the kept plans are dropped and planned again as used: a
/// refresh plans a few dozen texts, and a text that embeds a changing value (a position, a
/// key bound) is never used twice.
const KEPT: usize = 512;

static PLANS: Mutex<Option<HashMap<String, LogicalPlan>>> = Mutex::new(None);

/// Statements planned from a kept plan, and afresh, since the process started.
static USES: [AtomicU64; 2] = [AtomicU64::new(0), AtomicU64::new(0)];

/// How many statements were planned from a kept plan, and how many afresh (for the refresh's
/// debug log).
pub(crate) fn uses() -> (u64, u64) {
    (USES[0].load(Ordering::Relaxed), USES[1].load(Ordering::Relaxed))
}

/// `ctx.sql(sql)`, for a query: with the logical plan of the same text planned before, when
/// every table it reads is registered in `ctx` with the same schema as then.
pub(crate) async fn sql(ctx: &SessionContext, sql: &str) -> Result<DataFrame> {
    let kept = PLANS.lock().unwrap_or_else(PoisonError::into_inner).as_ref().and_then(|p| p.get(sql).cloned());
    if let Some(plan) = kept
        && let Some(bound) = bind(ctx, plan).await?
    {
        USES[0].fetch_add(1, Ordering::Relaxed);
        return ctx.execute_logical_plan(bound).await;
    }
    USES[1].fetch_add(1, Ordering::Relaxed);
    let state = ctx.state();
    let statement = state.sql_to_statement(sql, &state.config().options().sql_parser.dialect)?;
    // A statement over a view is not kept: planning inlines the view's own plan, whose tables
    // were resolved where the view was made and which may differ by then under the same text.
    let mut over_views = false;
    for name in state.resolve_table_references(&statement)? {
        over_views |= ctx.table_provider(name).await.is_ok_and(|p| p.get_logical_plan().is_some());
    }
    let plan = state.statement_to_plan(statement).await?;
    let query =
        !matches!(plan, LogicalPlan::Ddl(_) | LogicalPlan::Dml(_) | LogicalPlan::Statement(_) | LogicalPlan::Copy(_));
    if query && !over_views {
        keep(sql, unbind(plan.clone())?);
    }
    ctx.execute_logical_plan(plan).await
}

/// Keep `unbound` as the plan of `sql`.
fn keep(sql: &str, unbound: LogicalPlan) {
    let mut guard = PLANS.lock().unwrap_or_else(PoisonError::into_inner);
    let plans = guard.get_or_insert_with(HashMap::new);
    if plans.len() >= KEPT {
        plans.clear();
    }
    plans.insert(sql.to_string(), unbound);
}

/// `plan` with every table it reads replaced by its schema alone: a kept plan holds no
/// relation (and none of its rows) of the context that planned it.
fn unbind(plan: LogicalPlan) -> Result<LogicalPlan> {
    Ok(plan
        .transform_up_with_subqueries(|node| match node {
            LogicalPlan::TableScan(mut scan) => {
                let schema = scan.source.schema();
                let constraints = scan.source.constraints().cloned().unwrap_or_default();
                scan.source = Arc::new(LogicalTableSource::new(schema).with_constraints(constraints));
                Ok(Transformed::yes(LogicalPlan::TableScan(scan)))
            }
            other => Ok(Transformed::no(other)),
        })?
        .data)
}

/// `plan` (unbound) with every table it reads bound to the relation of that name in `ctx`;
/// `None` when a name has no relation there, or one with another schema.
async fn bind(ctx: &SessionContext, plan: LogicalPlan) -> Result<Option<LogicalPlan>> {
    let mut names: Vec<TableReference> = Vec::new();
    plan.apply_with_subqueries(|node| {
        if let LogicalPlan::TableScan(scan) = node
            && !names.contains(&scan.table_name)
        {
            names.push(scan.table_name.clone());
        }
        Ok(TreeNodeRecursion::Continue)
    })?;
    let mut providers = HashMap::with_capacity(names.len());
    for name in names {
        match ctx.table_provider(name.clone()).await {
            Ok(provider) => providers.insert(name, provider),
            Err(_) => return Ok(None),
        };
    }
    let mut matched = true;
    let bound = plan
        .transform_up_with_subqueries(|node| match node {
            LogicalPlan::TableScan(mut scan) => match providers.get(&scan.table_name) {
                Some(provider)
                    if provider.schema() == scan.source.schema() && provider.get_logical_plan().is_none() =>
                {
                    scan.source = provider_as_source(Arc::clone(provider));
                    Ok(Transformed::yes(LogicalPlan::TableScan(scan)))
                }
                _ => {
                    matched = false;
                    Ok(Transformed::new(LogicalPlan::TableScan(scan), false, TreeNodeRecursion::Stop))
                }
            },
            other => Ok(Transformed::no(other)),
        })?
        .data;
    Ok(matched.then_some(bound))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arrow::array::{AsArray, Int64Array, RecordBatch};
    use arrow::datatypes::{DataType, Field, Int64Type, Schema};
    use datafusion::catalog::TableProvider;
    use datafusion::datasource::MemTable;
    use datafusion::prelude::SessionContext;

    fn table(column: &str, values: Vec<i64>) -> Arc<MemTable> {
        let schema = Arc::new(Schema::new(vec![Field::new(column, DataType::Int64, true)]));
        let batch = RecordBatch::try_new(Arc::clone(&schema), vec![Arc::new(Int64Array::from(values))]).expect("batch");
        Arc::new(MemTable::try_new(schema, vec![vec![batch]]).expect("table"))
    }

    async fn values(ctx: &SessionContext, sql: &str) -> Vec<i64> {
        let batches = super::sql(ctx, sql).await.expect("planned").collect().await.expect("ran");
        let mut out: Vec<i64> =
            batches.iter().flat_map(|b| b.column(0).as_primitive::<Int64Type>().iter().flatten()).collect();
        out.sort_unstable();
        out
    }

    /// The same text planned in contexts whose names stand for other relations reads each
    /// context's own, subqueries included; a relation of another schema is planned afresh; and
    /// a kept plan holds none of the relations it was planned over.
    #[tokio::test]
    async fn a_kept_plan_reads_the_relations_of_the_context_that_uses_it() {
        let sql = "SELECT id FROM plans_test_t WHERE id IN (SELECT id FROM plans_test_u) ORDER BY id";
        let first = SessionContext::new();
        let (t, u) = (table("id", vec![1, 2, 3, 4]), table("id", vec![2, 3, 9]));
        first.register_table("plans_test_t", Arc::clone(&t) as Arc<dyn TableProvider>).expect("t");
        first.register_table("plans_test_u", u).expect("u");
        assert_eq!(values(&first, sql).await, vec![2, 3]);
        drop(first);
        assert_eq!(Arc::strong_count(&t), 1, "the kept plan holds no relation of the context that planned it");
        let second = SessionContext::new();
        second.register_table("plans_test_t", table("id", vec![3, 4, 5, 6])).expect("t");
        second.register_table("plans_test_u", table("id", vec![4, 6])).expect("u");
        assert_eq!(values(&second, sql).await, vec![4, 6]);
        // Another schema under the same name (a second column): planned again, over it.
        let third = SessionContext::new();
        let schema = Arc::new(Schema::new(vec![
            Field::new("id", DataType::Int64, true),
            Field::new("other", DataType::Int64, true),
        ]));
        let batch = RecordBatch::try_new(
            Arc::clone(&schema),
            vec![Arc::new(Int64Array::from(vec![7, 8])), Arc::new(Int64Array::from(vec![0, 0]))],
        )
        .expect("batch");
        third
            .register_table("plans_test_t", Arc::new(MemTable::try_new(schema, vec![vec![batch]]).expect("t")))
            .expect("t");
        third.register_table("plans_test_u", table("id", vec![8])).expect("u");
        assert_eq!(values(&third, sql).await, vec![8]);
        // A view under the same name and schema, made from another text in each context: each
        // reads its own definition (planning inlines a view, so a statement over one is not kept).
        let over_view = "SELECT id FROM plans_test_v ORDER BY id";
        for (bound, expected) in [(1, vec![2, 3, 4]), (3, vec![4])] {
            let ctx = SessionContext::new();
            ctx.register_table("plans_test_t", table("id", vec![1, 2, 3, 4])).expect("t");
            let view = ctx.sql(&format!("SELECT id FROM plans_test_t WHERE id > {bound}")).await.expect("view");
            ctx.register_table("plans_test_v", view.into_view()).expect("v");
            assert_eq!(values(&ctx, over_view).await, expected, "the view's own definition, id > {bound}");
        }
        // A name with no relation: the error names it, as planning the text would.
        let fourth = SessionContext::new();
        fourth.register_table("plans_test_t", table("id", vec![1])).expect("t");
        let missing = super::sql(&fourth, sql).await.expect_err("no plans_test_u");
        assert!(missing.to_string().contains("plans_test_u"), "{missing}");
    }
}
