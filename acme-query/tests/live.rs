//! Merge-on-read: between model builds a warehouse applies the raw changes the stored model
//! does not cover yet (the tail). Its reports, now and as of any instant, equal the source's
//! answers, and its histories and aggregate equal what a full rebuild of the same raw layer
//! writes, under updates, deletes, late-arriving keys, status moving back and forth, primary
//! keys changed and a truncation, all in the tail.

use acme_model::ModelBuild;
use acme_query::{Report, StatusFilter, Warehouse};
use chrono::{DateTime, Utc};

use crate::incremental::{full_rebuild_of_a_copy, rows};
use crate::{acme, oracle, pipeline, scalar, workload};

/// The tables applied on read.
const LIVE_TABLES: [&str; 12] = [
    "customers_history",
    "products_history",
    "orders_history",
    "order_items_history",
    "agg_orders_by_delivery_date",
    "dim_customer",
    "dim_product",
    "fact_order_status",
    "fact_orders",
    "fact_order_items",
    "agg_pending_items_by_product",
    "agg_orders_by_customer",
];

/// R4 as the source answers it, with the orders `predicate` selects (the oracle's R4 counts the
/// pending ones), rendered as the oracle renders its rows.
async fn top_customers_at_source(client: &tokio_postgres::Client, predicate: &str, limit: usize) -> Vec<String> {
    let sql = acme_testkit::oracle::report_sql(limit)[4].replace("status = 'PENDING'", predicate);
    assert!(sql.contains(predicate), "the oracle's R4 filters on the status: {sql}");
    let mut rows = Vec::new();
    for message in client.simple_query(&sql).await.expect("R4 at the source") {
        if let tokio_postgres::SimpleQueryMessage::Row(row) = message {
            let cells: Vec<&str> = (0..row.len()).map(|i| row.get(i).unwrap_or(acme_testkit::oracle::NULL)).collect();
            rows.push(cells.join("|"));
        }
    }
    rows
}

/// An order of `customer` with an item of `product`, neither of which exists yet, and an item
/// of order `early_order`, which does not exist yet either.
fn late_keys(customer: i64, product: i64, early_order: i64) -> String {
    format!(
        "WITH o AS (INSERT INTO operations.orders (order_date, delivery_date, customer_id, status, created_at) \
           VALUES (current_date, current_date + 10, {customer}, 'PENDING', now()) RETURNING order_id) \
         INSERT INTO operations.order_items (order_id, product_id, quanity, created_at) \
           SELECT order_id, {product}, 5, now() FROM o; \
         INSERT INTO operations.order_items (order_id, product_id, quanity, created_at) \
           VALUES ({early_order}, 1, 7, now())"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reports_apply_the_raw_tail_exactly_between_model_builds() {
    let (url, dir, config, mut stream) = pipeline("live", 0.003, 37).await;
    ModelBuild::new(config.clone()).await.expect("first build");
    let client = acme_testkit::connect(&url).await.expect("connect");
    let mut refreshed = Warehouse::open(&config.storage_url).await.expect("open");
    let built = refreshed.model_position();
    assert!(built.is_some(), "the first build recorded its position");
    let now = || async {
        let instant: DateTime<Utc> = client.query_one("SELECT clock_timestamp()", &[]).await.expect("now").get(0);
        instant
    };
    // An instant the stored model covers, before any change of the tail.
    let mut recorded = vec![(now().await, oracle(&client, 3).await)];
    let late_customer: i64 =
        client.query_one("SELECT max(customer_id) + 100 FROM operations.customers", &[]).await.expect("max").get(0);
    let late_product: i64 =
        client.query_one("SELECT max(product_id) + 100 FROM operations.products", &[]).await.expect("max").get(0);
    let mut bounded: Option<(u64, Warehouse)> = None;
    for round in 0..5u64 {
        acme_testkit::run_workload(&url, &workload(800 + round, 150, 2)).await.expect("workload");
        match round {
            // Primary keys changed: an order with its items, a customer (its orders keep naming
            // the old key), a product, an item; each is a delete of the old key and an insert
            // of the new one in the raw layer.
            0 => client
                .batch_execute(
                    "BEGIN; \
                     UPDATE operations.order_items SET order_id = order_id + 10000000 WHERE order_id = 5; \
                     UPDATE operations.orders SET order_id = order_id + 10000000 WHERE order_id = 5; COMMIT; \
                     UPDATE operations.customers SET customer_id = customer_id + 10000000 WHERE customer_id = 3; \
                     UPDATE operations.products SET product_id = product_id + 10000000 WHERE product_id = 4; \
                     UPDATE operations.order_items SET order_item_id = order_item_id + 10000000 \
                       WHERE order_item_id = (SELECT max(order_item_id) FROM operations.order_items)",
                )
                .await
                .expect("keys changed"),
            // An order of a customer, with an item of a product, that do not exist yet.
            1 => client
                .batch_execute(&format!(
                    "WITH o AS (INSERT INTO operations.orders (order_date, delivery_date, customer_id, status, \
                       created_at) VALUES (current_date, current_date + 10, {late_customer}, 'PENDING', now()) \
                       RETURNING order_id) \
                     INSERT INTO operations.order_items (order_id, product_id, quanity, created_at) \
                       SELECT order_id, {late_product}, 4, now() FROM o"
                ))
                .await
                .expect("late order"),
            // They arrive; a price changes between an order and its items.
            2 => client
                .batch_execute(&format!(
                    "INSERT INTO operations.customers (customer_id, customer_name, is_active, created_at) \
                       VALUES ({late_customer}, 'Late customer', true, now()); \
                     INSERT INTO operations.products (product_id, product_name, barcode, unity_price, is_active) \
                       VALUES ({late_product}, 'Late product', '123', 12.50, true); \
                     INSERT INTO operations.orders (order_date, delivery_date, customer_id, status, created_at) \
                       VALUES (current_date, DATE '2199-01-01', 1, 'PENDING', now()); \
                     UPDATE operations.products SET unity_price = unity_price + 1 WHERE product_id = 1; \
                     INSERT INTO operations.order_items (order_id, product_id, quanity, created_at) \
                       SELECT order_id, 1, 2, now() FROM operations.orders WHERE delivery_date = DATE '2199-01-01'"
                ))
                .await
                .expect("late keys arrive"),
            // A truncation, then new items.
            3 => client
                .batch_execute(
                    "TRUNCATE operations.order_items; \
                     INSERT INTO operations.order_items (order_id, product_id, quanity, created_at) \
                       SELECT order_id, 2, 3, now() FROM operations.orders WHERE status <> 'COMPLETED' LIMIT 20",
                )
                .await
                .expect("truncate"),
            // Status back and forth, in separate transactions and twice in one.
            4 => client
                .batch_execute(
                    "UPDATE operations.orders SET status = 'PROCESSING' WHERE order_id IN (1, 2, 3); \
                     UPDATE operations.orders SET status = 'PENDING' WHERE order_id IN (1, 2); \
                     BEGIN; UPDATE operations.orders SET status = 'COMPLETED' WHERE order_id = 3; \
                     UPDATE operations.orders SET status = 'REPROCESSING' WHERE order_id = 3; COMMIT",
                )
                .await
                .expect("status back and forth"),
            _ => {}
        }
        stream.catch_up().await.expect("catch up");
        recorded.push((now().await, oracle(&client, 3).await));
        let w = Warehouse::open(&config.storage_url).await.expect("open");
        assert_eq!(w.model_position(), built, "round {round}: no model build ran");
        assert!(w.raw_position() > built, "round {round}: the raw layer is ahead of the model");
        for limit in [1, 3] {
            assert_eq!(acme(&w, limit, None).await, oracle(&client, limit).await, "round {round}, limit {limit}");
        }
        for (instant, expected) in &recorded {
            assert_eq!(&acme(&w, 3, Some(*instant)).await, expected, "round {round}, as of {instant}");
        }
        // A handle refreshed round after round extends the tail it holds with the new changes
        // only: the same answers.
        refreshed = match refreshed.refreshed().await.expect("refresh") {
            Some(newer) => newer,
            None => refreshed,
        };
        // A handle whose limit the tail has just reached keeps extending it past that limit
        // (up to `HELD_TAIL_GRACE` times), with the same answers; a new handle with that limit
        // does not start holding it.
        match (round, bounded.take()) {
            (3, _) => {
                let limit = refreshed.tail().expect("a model").changes;
                let handle = Warehouse::open_with_tail_limit(&config.storage_url, Default::default(), limit);
                bounded = Some((limit, handle.await.expect("open")));
            }
            (4, Some((limit, handle))) => {
                let extended = handle.refreshed().await.expect("refresh").expect("newer");
                let tail = extended.tail().expect("a model");
                assert!(tail.changes > limit && tail.changes <= limit * acme_query::HELD_TAIL_GRACE, "{tail:?}");
                assert!(tail.held_bytes > 0, "still held past the limit: {tail:?}");
                assert_eq!(acme(&extended, 3, None).await, oracle(&client, 3).await, "round {round}, past the limit");
                let new = Warehouse::open_with_tail_limit(&config.storage_url, Default::default(), limit);
                assert_eq!(new.await.expect("open").tail().map(|t| t.held_bytes), Some(0));
            }
            _ => {}
        }
        // The same with the tail applied by each query instead of held in memory.
        let lazy = Warehouse::open_with_tail_limit(&config.storage_url, Default::default(), 0).await.expect("open");
        for (how, handle) in [("refreshed", &refreshed), ("tail not held", &lazy)] {
            assert_eq!(acme(handle, 3, None).await, oracle(&client, 3).await, "round {round}, {how}");
            for (instant, expected) in &recorded {
                assert_eq!(&acme(handle, 3, Some(*instant)).await, expected, "round {round}, as of {instant}, {how}");
            }
        }
        // R4 under every status filter, ranked in memory from the counts the refreshed handle
        // keeps by difference, against the source and against the report's SQL on the handle.
        for (filter, predicate) in [
            (StatusFilter::Open, "status <> 'COMPLETED'"),
            (StatusFilter::Status("PROCESSING".into()), "status = 'PROCESSING'"),
            (StatusFilter::Status("COMPLETED".into()), "status = 'COMPLETED'"),
        ] {
            for limit in [1, 3, 10_000] {
                let report = Report::TopCustomers { limit, filter: filter.clone() };
                let ranked = refreshed.report_batches(&report, None).await.expect("R4");
                let ranked = acme_testkit::oracle::render_batches(&ranked).expect("render");
                let sql = refreshed.report_sql(&report, None).expect("R4's SQL");
                let joined = refreshed.sql(&sql).await.expect("R4 by SQL").collect().await.expect("R4 rows");
                let joined = acme_testkit::oracle::render_batches(&joined).expect("render");
                assert_eq!(ranked, joined, "round {round}, {filter:?}, limit {limit}: in memory against SQL");
                assert_eq!(
                    ranked,
                    top_customers_at_source(&client, predicate, limit).await,
                    "round {round}, {filter:?}"
                );
            }
        }
        for table in ["customers", "products", "orders", "order_items"] {
            let source: i64 =
                client.query_one(&format!("SELECT count(*) FROM operations.{table}"), &[]).await.expect("count").get(0);
            let sql = format!("SELECT count(*) FROM {table}_current");
            assert_eq!(scalar(&w, &sql).await, source, "round {round}: {table}_current");
        }
    }

    // What the refreshed handle holds for its tail follows the tail's rows (a few hundred bytes
    // a change), not the buffers its queries read them from; a handle that applies the tail in
    // each query holds nothing.
    let held = refreshed.tail().expect("a model");
    println!("held tail: {held:?}");
    assert!(held.changes > 500 && held.held_bytes > 0, "{held:?}");
    assert!(held.held_bytes < held.changes * 2048, "{} bytes held for {} changes", held.held_bytes, held.changes);
    let lazy = Warehouse::open_with_tail_limit(&config.storage_url, Default::default(), 0).await.expect("open");
    assert_eq!(lazy.tail().map(|t| t.held_bytes), Some(0));

    // The live tables equal a full rebuild of the same raw layer.
    let live = Warehouse::open(&config.storage_url).await.expect("live");
    let (_full_dir, full_config, _) = full_rebuild_of_a_copy(&url, dir.path()).await;
    let rebuilt = Warehouse::open(&full_config.storage_url).await.expect("rebuilt");
    assert_eq!(live.raw_position(), rebuilt.model_position());
    let lazy = Warehouse::open_with_tail_limit(&config.storage_url, Default::default(), 0).await.expect("lazy");
    for table in LIVE_TABLES {
        let (x, y) = (rows(&live, table).await, rows(&rebuilt, table).await);
        assert!(!x.is_empty(), "{table} has rows");
        assert_eq!(x, y, "{table}: live vs full rebuild");
        assert_eq!(rows(&lazy, table).await, y, "{table}: live (tail not held) vs full rebuild");
        assert_eq!(rows(&refreshed, table).await, y, "{table}: live (tail extended by refreshes) vs full rebuild");
    }
    // A build folds the tail in: then nothing is left to apply, and the tables are the same.
    ModelBuild::new(config.clone()).await.expect("incremental build");
    let folded = Warehouse::open(&config.storage_url).await.expect("folded");
    assert_eq!(folded.model_position(), folded.raw_position());
    for table in LIVE_TABLES {
        assert_eq!(rows(&folded, table).await, rows(&rebuilt, table).await, "{table}: folded vs full rebuild");
    }

    // A tail without truncations, whose keys the star tables recompute on read: an order and
    // an item stored with the Unknown customer and product (they arrive in the tail), an item
    // stored before its order (which arrives in the tail), and the live workload.
    let (late_customer, late_product) = (late_customer + 1, late_product + 1);
    let early_order: i64 =
        client.query_one("SELECT max(order_id) + 1000 FROM operations.orders", &[]).await.expect("max").get(0);
    client.batch_execute(&late_keys(late_customer, late_product, early_order)).await.expect("late keys");
    stream.catch_up().await.expect("catch up");
    ModelBuild::new(config.clone()).await.expect("build with late keys");
    let stored = Warehouse::open(&config.storage_url).await.expect("open");
    let unknown = "SELECT count(*) FROM model.fact_order_items WHERE product_sk = -1";
    assert!(scalar(&stored, unknown).await > 0, "an item is stored with the Unknown product");
    acme_testkit::run_workload(&url, &workload(900, 150, 2)).await.expect("workload");
    // The same late keys again, in the part of the tail the handle below holds.
    let (held_customer, held_product, held_order) = (late_customer + 1, late_product + 1, early_order + 1);
    let sql = late_keys(held_customer, held_product, held_order);
    client.batch_execute(&sql).await.expect("late keys in the tail");
    stream.catch_up().await.expect("catch up");
    // A handle holding the first part of the tail, refreshed below: it recomputes the star rows
    // of the keys the later changes touch only, and keeps its other rows.
    let earlier = Warehouse::open(&config.storage_url).await.expect("open");
    assert!(earlier.raw_position() > earlier.model_position(), "a tail to hold");
    acme_testkit::run_workload(&url, &workload(901, 100, 2)).await.expect("workload");
    client
        .batch_execute(&format!(
            // (The price of the early items' product changes with their orders' arrival: their
            // price is the one at the order's placing, so their rows change with it.)
            "UPDATE operations.products SET unity_price = unity_price + 2 WHERE product_id = 1; \
             INSERT INTO operations.customers (customer_id, customer_name, is_active, created_at) \
               VALUES ({late_customer}, 'Later customer', true, now()); \
             INSERT INTO operations.products (product_id, product_name, barcode, unity_price, is_active) \
               VALUES ({late_product}, 'Later product', '124', 3.25, true); \
             INSERT INTO operations.orders (order_id, order_date, delivery_date, customer_id, status, created_at) \
               VALUES ({early_order}, current_date, current_date + 3, {late_customer}, 'PENDING', now()); \
             INSERT INTO operations.customers (customer_id, customer_name, is_active, created_at) \
               VALUES ({held_customer}, 'Held customer', true, now()); \
             INSERT INTO operations.products (product_id, product_name, barcode, unity_price, is_active) \
               VALUES ({held_product}, 'Held product', '125', 4.75, true); \
             INSERT INTO operations.orders (order_id, order_date, delivery_date, customer_id, status, created_at) \
               VALUES ({held_order}, current_date, current_date + 4, {held_customer}, 'PENDING', now()); \
             UPDATE operations.customers SET customer_name = 'Renamed' WHERE customer_id = 2; \
             DELETE FROM operations.order_items WHERE order_item_id IN (SELECT min(order_item_id) FROM operations.order_items)"
        ))
        .await
        .expect("late keys arrive");
    stream.catch_up().await.expect("catch up");
    let live = Warehouse::open(&config.storage_url).await.expect("live");
    assert!(live.raw_position() > live.model_position(), "a tail to apply");
    assert_eq!(acme(&live, 3, None).await, oracle(&client, 3).await, "reports over the live star");
    let (_full_dir, full_config, _) = full_rebuild_of_a_copy(&url, dir.path()).await;
    let rebuilt = Warehouse::open(&full_config.storage_url).await.expect("rebuilt");
    let lazy = Warehouse::open_with_tail_limit(&config.storage_url, Default::default(), 0).await.expect("lazy");
    let refreshed = earlier.refreshed().await.expect("refresh").expect("newer changes");
    assert_eq!(refreshed.raw_position(), live.raw_position());
    assert_eq!(acme(&refreshed, 3, None).await, oracle(&client, 3).await, "reports over the refreshed star");
    for table in LIVE_TABLES {
        let expected = rows(&rebuilt, table).await;
        assert_eq!(rows(&live, table).await, expected, "{table}: live star vs full rebuild");
        assert_eq!(rows(&lazy, table).await, expected, "{table}: live star (tail not held) vs full rebuild");
        assert_eq!(rows(&refreshed, table).await, expected, "{table}: live star (extended by a refresh) vs rebuild");
    }
}

/// A pipeline's first handle on a newly stored model (`refreshed_with_live_state`, made beside
/// the published handles) makes the stored facts' lookups that R3's and R4's counts read, so
/// that the first refresh touching an order does not make them while the reports wait.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_live_handle_on_a_stored_model_makes_the_facts_lookups() {
    let (_url, _dir, config, _stream) = pipeline("lookups", 0.003, 41).await;
    let before = Warehouse::open(&config.storage_url).await.expect("open before the build");
    assert_eq!(before.model_position(), None, "no model yet");
    ModelBuild::new(config.clone()).await.expect("build");
    let first = before.refreshed_with_live_state().await.expect("refresh").expect("a stored model");
    assert_eq!(first.tail().map(|t| t.changes), Some(0), "no raw change after the model");
    let lookups = first.stored_lookups();
    for wanted in ["fact_order_items.order_item_id", "fact_order_items.order_id", "fact_orders.order_id"] {
        assert!(lookups.iter().any(|l| l == wanted), "{wanted} not among the lookups held: {lookups:?}");
    }
}
