//! R4 on the current state, ranked in memory from the kept orders per customer and status
//! ([`CustomerOrders`]): the base's customers are ranked once per status filter (and shared by
//! every handle on the same base); a query merges that order with the few customers the
//! differences since changed, and stops at the last rank asked for. The ranking follows the
//! changes and the ranks asked for, not the number of customers (a changed customer's base
//! count is found by a binary search).

use std::cmp::Ordering;

use super::*;
use crate::StatusFilter;

/// The base's customers with a positive count under one status filter: their counts by
/// customer id (so a changed customer's base count is found by a binary search, not by a pass
/// over every customer), and the report's order over them (most orders first, then by customer
/// id, no customer last) as positions into those counts, 4 bytes per customer.
pub(crate) struct Ranked {
    by_customer: Vec<(Option<i64>, i64)>,
    order: Vec<u32>,
}

impl Ranked {
    /// Rank the customers of `totals` (one count per customer) with a positive count.
    fn new(mut totals: Vec<(Option<i64>, i64)>) -> Result<Self> {
        totals.retain(|(_, n)| *n > 0);
        totals.sort_unstable_by_key(|(customer, _)| *customer);
        let customers = u32::try_from(totals.len()).map_err(|_| {
            datafusion::error::DataFusionError::ResourcesExhausted(format!(
                "R4 ranks at most {} customers in memory, and {} have orders",
                u32::MAX,
                totals.len()
            ))
        })?;
        let mut order: Vec<u32> = (0..customers).collect();
        order.sort_unstable_by(|a, b| report_order(&totals[*a as usize], &totals[*b as usize]));
        Ok(Ranked { by_customer: totals, order })
    }

    /// The base count of `customer` (0 when it has none).
    fn count(&self, customer: Option<i64>) -> i64 {
        self.by_customer.binary_search_by_key(&customer, |(c, _)| *c).map_or(0, |i| self.by_customer[i].1)
    }

    /// The customers and their counts in the report's order.
    fn in_order(&self) -> impl Iterator<Item = &(Option<i64>, i64)> {
        self.order.iter().map(|i| &self.by_customer[*i as usize])
    }
}

/// `counts` with one entry per customer, its counts summed, in customer order.
fn summed_by_customer(mut counts: Vec<(Option<i64>, i64)>) -> Vec<(Option<i64>, i64)> {
    counts.sort_unstable_by_key(|(customer, _)| *customer);
    counts.dedup_by(|later, kept| {
        let same = later.0 == kept.0;
        if same {
            kept.1 += later.1;
        }
        same
    });
    counts
}

/// Whether an order of `status` counts under `filter` (as `StatusFilter::star_predicate`
/// filters `fact_orders`: an order with no status counts under none).
fn matches(filter: &StatusFilter, status: Option<&str>) -> bool {
    match (filter, status) {
        (_, None) => false,
        (StatusFilter::Open, Some(status)) => status != "COMPLETED",
        (StatusFilter::Pending, Some(status)) => status == "PENDING",
        (StatusFilter::Status(wanted), Some(status)) => status == wanted,
    }
}

/// R4's order: count descending, then customer id ascending with no customer last.
fn report_order(a: &(Option<i64>, i64), b: &(Option<i64>, i64)) -> Ordering {
    b.1.cmp(&a.1).then_with(|| match (a.0, b.0) {
        (Some(x), Some(y)) => x.cmp(&y),
        (Some(_), None) => Ordering::Less,
        (None, Some(_)) => Ordering::Greater,
        (None, None) => Ordering::Equal,
    })
}

/// Rank the base of `counts` for each status filter the base of `like` was ranked for (and
/// is not yet).
pub(crate) async fn rank_like(ctx: &SessionContext, counts: &CustomerOrders, like: &CustomerOrders) -> Result<()> {
    let filters: Vec<StatusFilter> = lock_ranked(like).values().map(|(filter, _)| filter.clone()).collect();
    for filter in filters {
        ranked_base(ctx, counts, &filter).await?;
    }
    Ok(())
}

fn lock_ranked(counts: &CustomerOrders) -> std::sync::MutexGuard<'_, RankedBases> {
    counts.ranked.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The base of `counts` ranked under `filter`, made on first use, from its rows streamed
/// through `ctx` (the stored aggregate is read from its files, a batch at a time).
async fn ranked_base(ctx: &SessionContext, counts: &CustomerOrders, filter: &StatusFilter) -> Result<Arc<Ranked>> {
    let key = format!("{filter:?}");
    let cached = lock_ranked(counts).get(&key).map(|(_, ranked)| Arc::clone(ranked));
    if let Some(ranked) = cached {
        return Ok(ranked);
    }
    let started = std::time::Instant::now();
    // Per customer, summed over its statuses: the stored aggregate is in customer order
    // within each file, so a customer's rows mostly follow each other and are summed as they
    // come; the runs of the files are then sorted together (pattern-defeating quicksort takes
    // sorted runs at about linear cost) and the customers split over files summed.
    let mut totals: Vec<(Option<i64>, i64)> = Vec::new();
    let mut rows = ctx.read_table(Arc::clone(&counts.base))?.execute_stream().await?;
    while let Some(batch) = futures::StreamExt::next(&mut rows).await {
        let batch = batch?;
        let (customers, orders) = (int64s(&batch, "customer_id")?, int64s(&batch, "orders")?);
        let statuses = strings(&batch, "status")?;
        for i in 0..batch.num_rows() {
            if matches(filter, statuses.is_valid(i).then(|| statuses.value(i))) && orders.is_valid(i) {
                let customer = customers.is_valid(i).then(|| customers.value(i));
                match totals.last_mut() {
                    Some((last, n)) if *last == customer => *n += orders.value(i),
                    _ => totals.push((customer, orders.value(i))),
                }
            }
        }
    }
    let ranked = Arc::new(Ranked::new(summed_by_customer(totals))?);
    tracing::debug!(
        filter = key,
        customers = ranked.order.len(),
        ms = started.elapsed().as_millis() as u64,
        "R4's base ranked"
    );
    lock_ranked(counts).insert(key, (filter.clone(), Arc::clone(&ranked)));
    Ok(ranked)
}

/// R4 on the current state of the handle that kept `counts`: the customers dense-ranked `limit`
/// or better by their current orders under `filter`, as (customer id, orders, rank), in the
/// report's order.
pub(crate) async fn top_customers(
    ctx: &SessionContext,
    counts: &CustomerOrders,
    filter: &StatusFilter,
    limit: usize,
) -> Result<Vec<(Option<i64>, i64, i64)>> {
    let base = ranked_base(ctx, counts, filter).await?;
    let mut changed: HashMap<Option<i64>, i64> = HashMap::new();
    for ((customer, status), n) in &counts.delta {
        if matches(filter, status.as_deref()) {
            *changed.entry(*customer).or_insert(0) += n;
        }
    }
    changed.retain(|_, n| *n != 0);
    Ok(dense_ranked(&base, &changed, limit))
}

/// The customers of `base` with the counts of the customers in `changed` moved by their
/// differences, dense-ranked in [`report_order`], up to rank `limit`.
fn dense_ranked(base: &Ranked, changed: &HashMap<Option<i64>, i64>, limit: usize) -> Vec<(Option<i64>, i64, i64)> {
    // The changed customers' new counts.
    let mut moved: Vec<(Option<i64>, i64)> =
        changed.iter().map(|(customer, difference)| (*customer, base.count(*customer) + difference)).collect();
    moved.retain(|(_, n)| *n > 0);
    moved.sort_unstable_by(report_order);
    let mut kept = base.in_order().filter(|(customer, _)| !changed.contains_key(customer)).peekable();
    let mut moved = moved.iter().peekable();
    let (mut out, mut rank, mut last) = (Vec::new(), 0i64, None);
    loop {
        let next = match (kept.peek(), moved.peek()) {
            (Some(a), Some(b)) if report_order(a, b) != Ordering::Greater => kept.next(),
            (Some(_), Some(_)) => moved.next(),
            (Some(_), None) => kept.next(),
            (None, Some(_)) => moved.next(),
            (None, None) => None,
        };
        let Some((customer, n)) = next else { break };
        if last != Some(*n) {
            rank += 1;
            last = Some(*n);
        }
        if rank > limit as i64 {
            break;
        }
        out.push((*customer, *n, rank));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// R4 by definition: every customer's count, dense-ranked, in the report's order.
    fn by_definition(counts: &HashMap<Option<i64>, i64>, limit: usize) -> Vec<(Option<i64>, i64, i64)> {
        let mut rows: Vec<(Option<i64>, i64)> = counts.iter().filter(|(_, n)| **n > 0).map(|(c, n)| (*c, *n)).collect();
        rows.sort_by(report_order);
        let mut distinct: Vec<i64> = rows.iter().map(|(_, n)| *n).collect();
        distinct.dedup();
        rows.into_iter()
            .map(|(c, n)| (c, n, distinct.iter().position(|d| *d == n).map_or(0, |p| p as i64 + 1)))
            .filter(|(_, _, rank)| *rank <= limit as i64)
            .collect()
    }

    #[test]
    fn merging_the_changes_into_the_ranked_base_equals_ranking_from_scratch() {
        // A small deterministic generator (no dependency): many ties, customers that appear,
        // vanish, and a customer that is none.
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let mut next = |bound: u64| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state % bound
        };
        for round in 0..300 {
            let customers = 1 + next(40);
            let customer = |i: u64| if i == 0 { None } else { Some(i as i64) };
            let mut base: HashMap<Option<i64>, i64> = HashMap::new();
            for i in 0..customers {
                if next(3) > 0 {
                    base.insert(customer(i), 1 + next(6) as i64);
                }
            }
            let mut changed: HashMap<Option<i64>, i64> = HashMap::new();
            for _ in 0..next(10) {
                let c = customer(next(customers + 5));
                let before = base.get(&c).copied().unwrap_or(0) + changed.get(&c).copied().unwrap_or(0);
                // A difference never takes a count below zero.
                let difference = next(5) as i64 - 2;
                if before + difference >= 0 {
                    *changed.entry(c).or_insert(0) += difference;
                }
            }
            changed.retain(|_, n| *n != 0);
            let mut after = base.clone();
            for (c, d) in &changed {
                *after.entry(*c).or_insert(0) += d;
            }
            let ranked = Ranked::new(base.iter().map(|(c, n)| (*c, *n)).collect()).expect("a few customers");
            for limit in [1, 2, 3, 10, 100] {
                assert_eq!(
                    dense_ranked(&ranked, &changed, limit),
                    by_definition(&after, limit),
                    "round {round}, limit {limit}, base {base:?}, changed {changed:?}"
                );
            }
        }
    }

    #[test]
    fn counts_split_over_runs_are_summed_per_customer() {
        let runs = vec![(Some(3), 1), (Some(1), 2), (Some(3), 4), (None, 1), (Some(1), 1), (None, 2), (Some(2), 0)];
        assert_eq!(summed_by_customer(runs), vec![(None, 3), (Some(1), 3), (Some(2), 0), (Some(3), 5)]);
        assert!(summed_by_customer(Vec::new()).is_empty());
    }

    #[test]
    fn a_status_filter_counts_the_orders_the_star_predicate_selects() {
        assert!(matches(&StatusFilter::Open, Some("PENDING")));
        assert!(!matches(&StatusFilter::Open, Some("COMPLETED")));
        assert!(matches(&StatusFilter::Pending, Some("PENDING")));
        assert!(!matches(&StatusFilter::Pending, Some("PROCESSING")));
        assert!(matches(&StatusFilter::Status("PROCESSING".into()), Some("PROCESSING")));
        for filter in [StatusFilter::Open, StatusFilter::Pending, StatusFilter::Status("PENDING".into())] {
            assert!(!matches(&filter, None), "{filter:?} and no status");
        }
    }
}
