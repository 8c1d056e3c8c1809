//! `acme::Pipeline` on a real source: capture, model maintenance and warehouse refresh side by
//! side, reports fresh to the raw layer while model builds fold the changes in behind them.

use std::time::Duration;

use acme::query::datafusion::arrow::array::Array;

use acme::Pipeline;
use acme::query::{StatusFilter, Warehouse};
use acme_testkit::WorkloadConfig;

mod support;

/// The reports as the source answers them now (the hand-written oracle, top 3).
async fn source_reports(client: &tokio_postgres::Client) -> Vec<Vec<String>> {
    acme_testkit::oracle::source_reports(client, 3).await.expect("oracle")
}

/// The same reports from acme.
async fn acme_reports(w: &Warehouse) -> Vec<Vec<String>> {
    support::reports(w, 3).await
}

async fn scalar(w: &Warehouse, sql: &str) -> i64 {
    let batches =
        w.sql(&format!("SELECT CAST(({sql}) AS BIGINT)")).await.expect("sql").collect().await.expect("collect");
    let column = batches[0].column(0);
    let values = column.as_any().downcast_ref::<acme::query::datafusion::arrow::array::Int64Array>().expect("bigint");
    if values.is_null(0) { 0 } else { values.value(0) }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pipeline_keeps_the_reports_fresh_while_the_model_is_maintained_beside_the_stream() {
    let url = acme_testkit::acme_database("pipeline", Some((0.003, 41))).await.expect("source");
    let dir = tempfile::tempdir().expect("tmp");
    let config = support::config(&url, dir.path());
    // `fold_ratio(0.0)`: fold whenever there is a tail, so that builds run beside the stream.
    let pipeline =
        Pipeline::builder(config.clone()).fold_ratio(0.0).maintenance_niceness(10).start().await.expect("start");
    assert!(pipeline.warehouse().model_position().is_some(), "start returns once a model exists");
    // Maintenance runs at the lower priority asked for, and only maintenance does. (The other
    // tests of this binary run pipelines at the default priority beside this one.)
    let own = niceness("self").expect("this thread's niceness");
    let threads = thread_niceness();
    let lowered = threads.iter().filter(|(name, nice)| name.starts_with("acme-model") && *nice == own.max(10));
    assert!(lowered.count() >= 2, "this pipeline's maintenance worker and driver threads, lowered: {threads:?}");
    assert!(
        threads.iter().all(|(name, nice)| *nice == own || (name.starts_with("acme-model") && *nice == own.max(10))),
        "every other thread keeps the process's priority: {threads:?}"
    );
    let builds_at_start = pipeline.status().borrow().model_builds;
    let client = acme_testkit::connect(&url).await.expect("connect");

    // Readers during capture, maintenance and compaction: every handle answers, and its live
    // history and live aggregate agree (one consistent state).
    let workload = WorkloadConfig {
        seed: 4141,
        rate_tps: 300.0,
        transactions: Some(900),
        duration: None,
        connections: 2,
        deletes: true,
        inserts_only: false,
    };
    let writer = {
        let url = url.clone();
        tokio::spawn(async move { acme_testkit::run_workload(&url, &workload).await })
    };
    let mut reads = 0;
    let mut positions = std::collections::BTreeSet::new();
    // Until the workload is done and a build folded changes in beside it (maintenance runs at
    // a lower priority: on a busy machine it may finish after the workload).
    let started = std::time::Instant::now();
    while !writer.is_finished() || pipeline.status().borrow().model_builds <= builds_at_start {
        assert!(started.elapsed() < Duration::from_secs(120), "no build folded the workload in within 120 s");
        let w = pipeline.warehouse();
        let open = "SELECT count(*) FROM orders_current WHERE status <> 'COMPLETED'";
        let aggregated = "SELECT sum(orders) FROM agg_orders_by_delivery_date WHERE status <> 'COMPLETED'";
        assert_eq!(scalar(&w, open).await, scalar(&w, aggregated).await, "read {reads}: one consistent state");
        positions.insert((w.raw_position(), w.model_position()));
        reads += 1;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    writer.await.expect("writer task").expect("workload");
    assert!(positions.len() > 2, "readers saw the warehouse move ({reads} reads, {} states)", positions.len());

    // One transaction on all four tables reaches R1, R3 and R4 with no build asked for.
    let row = client
        .query_one(
            "WITH c AS (INSERT INTO operations.customers (customer_name, created_at) VALUES ('Stamp', now()) \
               RETURNING customer_id), \
             p AS (INSERT INTO operations.products (product_name, barcode, unity_price, is_active) \
               VALUES ('stamp', 's', 1.00, true) RETURNING product_id), \
             o AS (INSERT INTO operations.orders (order_date, delivery_date, customer_id, status, created_at) \
               SELECT current_date, DATE '2300-01-01', customer_id, 'PENDING', now() FROM c RETURNING order_id), \
             i AS (INSERT INTO operations.order_items (order_id, product_id, quanity, created_at) \
               SELECT order_id, product_id, 9, now() FROM o, p RETURNING product_id) \
             SELECT (SELECT customer_id FROM c), (SELECT product_id FROM i)",
            &[],
        )
        .await
        .expect("stamp");
    let (customer, product): (i64, i64) = (row.get(0), row.get(1));
    let w = pipeline.caught_up().await.expect("caught up");
    let r1 = w.open_orders(StatusFilter::Open, None).await.expect("R1");
    assert!(r1.iter().any(|r| r.delivery_date.is_some_and(|d| d.to_string() == "2300-01-01")), "R1 shows it");
    let r3 = w.pending_items_by_product(None).await.expect("R3");
    assert!(r3.iter().any(|r| r.product_id == Some(product) && r.total_items == 9), "R3 shows it");
    let r4 = w.top_customers(10_000, StatusFilter::Pending, None).await.expect("R4");
    // The stamp order, and any the workload placed earlier for a customer id not yet taken (its
    // late-arriving customers), which the stamp customer then inherits.
    let pending: i64 = client
        .query_one("SELECT count(*) FROM operations.orders WHERE customer_id = $1 AND status = 'PENDING'", &[&customer])
        .await
        .expect("the source's pending orders of the stamp customer")
        .get(0);
    if !r4.iter().any(|r| r.customer_id == Some(customer) && r.quantity == pending) {
        // Say which part missed it: the counts kept by difference, or the live fact rows.
        let live = scalar(
            &w,
            &format!("SELECT count(*) FROM fact_orders WHERE is_current AND is_pending AND customer_id = {customer}"),
        )
        .await;
        let row = r4.iter().find(|r| r.customer_id == Some(customer));
        panic!(
            "R4 does not show the stamp order: its row {row:?}; the source has {pending} pending orders of customer \
             {customer}, live fact_orders {live}; handle at raw {:?}, model {:?}, tail {:?}",
            w.raw_position(),
            w.model_position(),
            w.tail()
        );
    }
    assert_eq!(acme_reports(&w).await, source_reports(&client).await, "reports vs the source");

    let status = pipeline.status().borrow().clone();
    assert!(status.running, "{status:?}");
    assert!(status.polls > 0 && status.changes > 0, "capture ran: {status:?}");
    assert!(status.model_builds > builds_at_start, "maintenance folded changes in beside the stream: {status:?}");
    assert!(status.lag_bytes.is_some(), "the lag is measured: {status:?}");
    assert!(w.raw_position() >= w.model_position(), "the reports are never behind the stored model");
    pipeline.shutdown().await.expect("shutdown");

    // A new pipeline resumes where this one stopped.
    client
        .batch_execute("UPDATE operations.orders SET status = 'COMPLETED' WHERE delivery_date = DATE '2300-01-01'")
        .await
        .expect("complete the stamp order");
    let pipeline = Pipeline::builder(config).start().await.expect("restart");
    let w = pipeline.caught_up().await.expect("caught up again");
    assert_eq!(acme_reports(&w).await, source_reports(&client).await, "reports vs the source after a restart");
    pipeline.shutdown().await.expect("shutdown again");
}

/// The niceness of the thread `/proc/self/task/<thread>` (or of the calling thread, for `self`),
/// from its `stat` (the 19th field, counted after the parenthesised name).
fn niceness(thread: &str) -> Option<i32> {
    let path =
        if thread == "self" { "/proc/thread-self/stat".to_string() } else { format!("/proc/self/task/{thread}/stat") };
    let stat = std::fs::read_to_string(path).ok()?;
    stat.rsplit_once(')')?.1.split_whitespace().nth(16)?.parse().ok()
}

/// The name and niceness of every thread of this process.
fn thread_niceness() -> Vec<(String, i32)> {
    let mut threads = Vec::new();
    for entry in std::fs::read_dir("/proc/self/task").expect("/proc/self/task").flatten() {
        let id = entry.file_name().to_string_lossy().to_string();
        let name = std::fs::read_to_string(entry.path().join("comm")).unwrap_or_default().trim().to_string();
        // (A thread that ended since the listing has no stat any more.)
        if let Some(nice) = niceness(&id) {
            threads.push((name, nice));
        }
    }
    threads
}

/// Wait (up to 120 s) until maintenance has run more than `builds` model builds.
async fn wait_for_a_build(status: &mut tokio::sync::watch::Receiver<acme::PipelineStatus>, builds: u64) {
    tokio::time::timeout(Duration::from_secs(120), status.wait_for(|s| s.model_builds > builds))
        .await
        .expect("a build folded the tail in within 120 s")
        .expect("status");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn maintenance_folds_the_tail_in_only_once_it_reaches_the_fold_ratio_or_the_held_limit() {
    let url = acme_testkit::acme_database("pipeline_fold", Some((0.003, 43))).await.expect("source");
    let dir = tempfile::tempdir().expect("tmp");
    let config = support::config(&url, dir.path());
    let interval = Duration::from_millis(200);
    // A handle holds at most 200 tail changes in memory: the tail is folded at 100 whatever
    // the ratio.
    let pipeline = Pipeline::builder(config)
        .model_interval(interval)
        .fold_ratio(acme::DEFAULT_FOLD_RATIO)
        .max_model_lag(Duration::from_secs(3600))
        .tail_limit(200)
        .start()
        .await
        .expect("start");
    let client = acme_testkit::connect(&url).await.expect("connect");
    let builds_at_start = pipeline.status().borrow().model_builds;
    let model_rows = pipeline.warehouse().tail().expect("a model").model_rows;
    assert!(model_rows > 10_000, "the model holds the snapshot: {model_rows} rows");

    // A few changes: far below 5% of the model. The reports show them; no build runs.
    client
        .batch_execute(
            "UPDATE operations.orders SET status = CASE status WHEN 'PENDING' THEN 'PROCESSING' ELSE 'PENDING' END \
             WHERE order_id IN (SELECT order_id FROM operations.orders ORDER BY order_id LIMIT 5)",
        )
        .await
        .expect("small update");
    let w = pipeline.caught_up().await.expect("caught up");
    assert_eq!(acme_reports(&w).await, source_reports(&client).await, "the tail is in the reports");
    let tail = w.tail().expect("a model");
    assert!(tail.changes >= 5 && (tail.changes as f64) < acme::DEFAULT_FOLD_RATIO * tail.model_rows as f64, "{tail:?}");
    let mut status = pipeline.status();
    tokio::time::timeout(Duration::from_secs(60), status.wait_for(|s| s.tail_changes >= 5))
        .await
        .expect("maintenance looked at the tail within 60 s")
        .expect("status");
    tokio::time::sleep(interval * 5).await;
    let now = pipeline.status().borrow().clone();
    assert_eq!(now.model_builds, builds_at_start, "a small tail is applied on read, not folded in: {now:?}");
    let w = pipeline.warehouse();
    assert!(w.model_position() < w.raw_position(), "the stored model trails the reports");
    assert_eq!(w.tail_limit(), 200);

    // Changes to 150 items: below 5% of the model, but past half of what a handle holds in
    // memory. A build folds them in.
    client
        .batch_execute(
            "UPDATE operations.order_items SET quanity = quanity + 1 \
             WHERE order_item_id IN (SELECT order_item_id FROM operations.order_items ORDER BY order_item_id LIMIT 150)",
        )
        .await
        .expect("medium update");
    assert!(155.0 < acme::DEFAULT_FOLD_RATIO * model_rows as f64, "{model_rows} model rows");
    wait_for_a_build(&mut status, builds_at_start).await;
    let w = pipeline.caught_up().await.expect("caught up");
    assert_eq!(acme_reports(&w).await, source_reports(&client).await, "reports after the fold at the limit");
    let builds_at_start = pipeline.status().borrow().model_builds;

    // Changes to a fifth of the items: past 5% of the model. A build folds them in.
    client
        .batch_execute("UPDATE operations.order_items SET quanity = quanity + 1 WHERE order_item_id % 5 = 0")
        .await
        .expect("large update");
    wait_for_a_build(&mut status, builds_at_start).await;
    let w = pipeline.caught_up().await.expect("caught up");
    assert_eq!(acme_reports(&w).await, source_reports(&client).await, "reports after the fold");
    // The stored model (not only the live view) now holds the updated items' new versions.
    let updated: i64 = client
        .query_one("SELECT count(*) FROM operations.order_items WHERE order_item_id % 5 = 0", &[])
        .await
        .expect("count")
        .get(0);
    let stored = scalar(&w, "SELECT count(*) FROM model.order_items_history WHERE opened_by = 'update'").await;
    assert!(stored >= updated, "{stored} stored update versions for {updated} updated items");
    pipeline.shutdown().await.expect("shutdown");
}

/// One transaction of a random change mix, seeded: every transaction touches an order (so the
/// raw orders table names its transaction id), then one to three of: a new order with items
/// (for an existing customer, or for one that arrives later), a status move (forward or back,
/// sometimes twice in the transaction), an item's quantity, an item deleted, an order deleted
/// with its items, a customer renamed, a late customer arriving, a primary key changed (an order
/// with its items, a customer with or without its orders, a product, an item). Returns the
/// transaction id.
async fn random_transaction(
    client: &mut tokio_postgres::Client,
    rng: &mut acme_testkit::rng::SplitMix64,
    late_customers: &mut Vec<i64>,
) -> i64 {
    const PICK_ORDER: &str = "coalesce((SELECT min(order_id) FROM operations.orders WHERE order_id >= {id}), \
                              (SELECT min(order_id) FROM operations.orders))";
    const PICK_ITEM: &str = "(SELECT min(order_item_id) FROM operations.order_items WHERE order_item_id >= {id})";
    let pick = |template: &str, id: u64| template.replace("{id}", &id.to_string());
    let tx = client.transaction().await.expect("begin");
    let mut statements = vec![format!(
        "UPDATE operations.orders SET updated_at = clock_timestamp() WHERE order_id = {}",
        pick(PICK_ORDER, rng.range(1, 3_000))
    )];
    for _ in 0..rng.range(1, 3) {
        let statement = match rng.range(0, 8) {
            0 => {
                let customer = if rng.chance(0.2) {
                    let id = 1_000_000 + rng.range(0, 1_000) as i64;
                    late_customers.push(id);
                    id
                } else {
                    rng.range(1, 200) as i64
                };
                let items: Vec<String> = (0..rng.range(1, 3))
                    .map(|_| format!("((SELECT order_id FROM o), {}, {}, now())", rng.range(1, 25), rng.range(1, 9)))
                    .collect();
                format!(
                    "WITH o AS (INSERT INTO operations.orders (order_date, delivery_date, customer_id, status, created_at) \
                       VALUES (current_date, current_date + {}, {customer}, 'PENDING', now()) RETURNING order_id) \
                     INSERT INTO operations.order_items (order_id, product_id, quanity, created_at) VALUES {}",
                    rng.range(5, 15),
                    items.join(", ")
                )
            }
            1 | 2 => {
                let status = acme::query::STATUSES[rng.range(0, 3) as usize];
                let order = pick(PICK_ORDER, rng.range(1, 3_000));
                let again = if rng.chance(0.3) {
                    format!("; UPDATE operations.orders SET status = 'PROCESSING' WHERE order_id = {order}")
                } else {
                    String::new()
                };
                format!("UPDATE operations.orders SET status = '{status}' WHERE order_id = {order}{again}")
            }
            3 => format!(
                "UPDATE operations.order_items SET quanity = quanity + 1 WHERE order_item_id = {}",
                pick(PICK_ITEM, rng.range(1, 20_000))
            ),
            4 => format!(
                "DELETE FROM operations.order_items WHERE order_item_id = {}",
                pick(PICK_ITEM, rng.range(1, 20_000))
            ),
            5 => {
                let order = pick(PICK_ORDER, rng.range(1, 3_000));
                format!(
                    "DELETE FROM operations.order_items WHERE order_id = {order}; \
                     DELETE FROM operations.orders WHERE order_id = {order}"
                )
            }
            6 => format!(
                "UPDATE operations.customers SET customer_name = 'Renamed customer {}' WHERE customer_id = {}",
                rng.next_u64() % 1000,
                rng.range(1, 200)
            ),
            // A new key is the old one plus 10,000,000: above every generated and late key,
            // and never one that exists (the key it came from is gone).
            8 => match rng.range(0, 3) {
                0 => {
                    let order = pick(PICK_ORDER, rng.range(1, 3_000));
                    format!(
                        "UPDATE operations.order_items SET order_id = order_id + 10000000 WHERE order_id = {order}; \
                         UPDATE operations.orders SET order_id = order_id + 10000000 WHERE order_id = {order}"
                    )
                }
                1 => {
                    let customer = rng.range(1, 200);
                    let orders = if rng.chance(0.5) {
                        format!(
                            "UPDATE operations.orders SET customer_id = customer_id + 10000000 \
                             WHERE customer_id = {customer}; "
                        )
                    } else {
                        String::new()
                    };
                    format!(
                        "{orders}UPDATE operations.customers SET customer_id = customer_id + 10000000 \
                         WHERE customer_id = {customer}"
                    )
                }
                2 => format!(
                    "UPDATE operations.products SET product_id = product_id + 10000000 WHERE product_id = {}",
                    rng.range(1, 25)
                ),
                _ => format!(
                    "UPDATE operations.order_items SET order_item_id = order_item_id + 10000000 \
                     WHERE order_item_id = {}",
                    pick(PICK_ITEM, rng.range(1, 20_000))
                ),
            },
            _ => match late_customers.pop() {
                Some(id) => format!(
                    "INSERT INTO operations.customers (customer_id, customer_name, created_at) \
                     VALUES ({id}, 'Late customer {id}', now()) ON CONFLICT (customer_id) DO NOTHING"
                ),
                None => continue,
            },
        };
        statements.push(statement);
    }
    for statement in &statements {
        tx.batch_execute(statement).await.unwrap_or_else(|e| panic!("{statement}: {e}"));
    }
    let xid: i64 = tx.query_one("SELECT txid_current()", &[]).await.expect("xid").get(0);
    tx.commit().await.expect("commit");
    xid % (1 << 32)
}

/// A report limit past every rank: R2 and R4 compared whole, so a customer or date with a small
/// count that a kept difference got wrong shows too (the top 3 would hide it).
const WHOLE: usize = 10_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_handle_read_during_maintenance_and_compaction_equals_the_source_at_its_position() {
    let seed = std::env::var("ACME_READERS_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(2027u64);
    println!("ACME_READERS_SEED={seed}");
    let url = acme_testkit::acme_database("pipeline_readers", Some((0.002, seed))).await.expect("source");
    let dir = tempfile::tempdir().expect("tmp");
    let mut config = support::config(&url, dir.path());
    // Short commit rounds: raw compactions (every 10 rounds) happen while the readers read.
    config.flush_interval = Duration::from_millis(40);
    // `fold_ratio(0.0)` and a short interval: model steps run back to back beside the stream.
    let pipeline = Pipeline::builder(config.clone())
        .fold_ratio(0.0)
        .model_interval(Duration::from_millis(100))
        .start()
        .await
        .expect("start");
    let at_start = pipeline.status().borrow().clone();

    // Writer: one connection, one transaction at a time, the source's answers recorded after
    // each commit (by transaction id; `None`: before the first one).
    let writer = {
        let url = url.clone();
        tokio::spawn(async move {
            let mut client = acme_testkit::connect(&url).await.expect("connect");
            let mut rng = acme_testkit::rng::SplitMix64::new(seed);
            let mut late = Vec::new();
            let mut answers = std::collections::HashMap::new();
            answers.insert(None, acme_testkit::oracle::source_reports(&client, WHOLE).await.expect("oracle"));
            for _ in 0..250 {
                let xid = random_transaction(&mut client, &mut rng, &mut late).await;
                answers.insert(Some(xid), acme_testkit::oracle::source_reports(&client, WHOLE).await.expect("oracle"));
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            answers
        })
    };
    // Readers: the pipeline's published handle and a handle opened from storage, in turn, every
    // few milliseconds. Each one's reports are kept with the last transaction it holds.
    let mut seen = Vec::new();
    let mut turn = 0u64;
    while !writer.is_finished() {
        let (kind, w) = if turn.is_multiple_of(2) {
            ("published", pipeline.warehouse())
        } else {
            ("opened", std::sync::Arc::new(Warehouse::open(&config.storage_url).await.expect("open warehouse")))
        };
        let xid = scalar(&w, "SELECT max(_xid) FROM raw_orders WHERE _op <> 'snapshot'").await;
        let reports = support::reports(&w, WHOLE).await;
        seen.push((kind, turn, (xid != 0).then_some(xid), w.raw_position(), w.model_position(), reports));
        turn += 1;
        tokio::time::sleep(Duration::from_millis(3)).await;
    }
    let answers = writer.await.expect("writer");
    let status = pipeline.status().borrow().clone();
    pipeline.shutdown().await.expect("shutdown");

    let mut positions = std::collections::BTreeSet::new();
    for (kind, turn, xid, raw, model, reports) in &seen {
        let expected = answers
            .get(xid)
            .unwrap_or_else(|| panic!("read {turn} ({kind}) holds transaction {xid:?}, not one the writer committed"));
        assert_eq!(
            reports, expected,
            "read {turn} ({kind}, raw {raw:?}, model {model:?}) vs the source after transaction {xid:?} (seed {seed})"
        );
        assert!(raw >= model, "read {turn}: the reports are never behind the stored model");
        positions.insert((*raw, *model));
    }
    // The published handle never moves back, also when the first handle on a newly stored
    // model replaces the ones kept fresh on the model before it.
    let published: Vec<_> = seen.iter().filter(|s| s.0 == "published").map(|s| (s.3, s.4)).collect();
    for pair in published.windows(2) {
        assert!(pair[1].0 >= pair[0].0, "the published raw position moved back: {:?} then {:?}", pair[0], pair[1]);
        assert!(pair[1].1 >= pair[0].1, "the published model position moved back: {:?} then {:?}", pair[0], pair[1]);
    }
    let published_models = published.iter().map(|(_, m)| m).collect::<std::collections::BTreeSet<_>>().len();
    assert!(published_models > 2, "the published handle moved to the newly stored models: {published_models} seen");
    let models = positions.iter().map(|(_, m)| m).collect::<std::collections::BTreeSet<_>>().len();
    let transactions = seen.iter().map(|s| s.2).collect::<std::collections::BTreeSet<_>>().len();
    println!(
        "{} reads, {} states, {models} model positions, {transactions} transactions seen; {status:?}",
        seen.len(),
        positions.len()
    );
    assert!(
        seen.len() > 20 && positions.len() > 5 && models > 2,
        "reads {}, states {}, model positions {models}",
        seen.len(),
        positions.len()
    );
    assert!(status.model_builds >= at_start.model_builds + 2, "model steps ran during the reads: {status:?}");
    assert!(status.raw_compactions > at_start.raw_compactions, "raw compactions ran during the reads: {status:?}");
}
