//! Incremental model builds against a full rebuild of the same raw layer: after rounds of the
//! live workload (updates, deletes, late-arriving keys, a truncation), each built
//! incrementally, every history and star-schema table equals the one a full rebuild writes.

use std::path::Path;

use acme_model::ModelBuild;
use acme_query::Warehouse;

use crate::{pipeline, scalar, warehouse_config, workload};

/// Every model table with the columns to order its rows by.
const MODEL_TABLES: [&str; 12] = [
    "customers_history",
    "products_history",
    "orders_history",
    "order_items_history",
    "dim_customer",
    "dim_product",
    "fact_order_status",
    "fact_orders",
    "fact_order_items",
    "agg_orders_by_delivery_date",
    "agg_pending_items_by_product",
    "agg_orders_by_customer",
];

/// All rows of `table`, rendered and sorted.
pub(crate) async fn rows(w: &Warehouse, table: &str) -> Vec<String> {
    let batches = w.sql(&format!("SELECT * FROM {table}")).await.expect("query").collect().await.expect("collect");
    let text = arrow::util::pretty::pretty_format_batches(&batches).expect("format").to_string();
    let mut lines: Vec<String> = text.lines().filter(|l| l.starts_with('|')).skip(1).map(str::to_string).collect();
    lines.sort();
    lines
}

fn copy_dir(from: &Path, to: &Path) {
    acme_testkit::copy_dir(from, to).expect("copy a directory tree");
}

/// A full model rebuild from a copy of the raw layer of the warehouse in `dir` (source `url`):
/// the copy's directory, its config and the build's report.
pub(crate) async fn full_rebuild_of_a_copy(
    url: &str,
    dir: &Path,
) -> (tempfile::TempDir, acme_core::AcmeConfig, acme_model::ModelReport) {
    let full_dir = tempfile::tempdir().expect("tmp");
    copy_dir(&dir.join("raw"), &full_dir.path().join("raw"));
    copy_dir(&dir.join("_acme"), &full_dir.path().join("_acme"));
    std::fs::remove_file(full_dir.path().join("_acme").join("model.json")).expect("no model manifest");
    let full_config = warehouse_config(url, full_dir.path());
    let report = ModelBuild::new(full_config.clone()).await.expect("full rebuild");
    (full_dir, full_config, report)
}

/// A new order of `customer` with one item of `product`; returns the order's id.
async fn order_with_item(client: &tokio_postgres::Client, customer: i64, product: i64, quantity: i32) -> i64 {
    let order: i64 = client
        .query_one(
            "INSERT INTO operations.orders (order_date, delivery_date, customer_id, status, created_at) \
             VALUES (current_date, current_date + 10, $1, 'PENDING', now()) RETURNING order_id",
            &[&customer],
        )
        .await
        .expect("order")
        .get(0);
    client
        .execute(
            "INSERT INTO operations.order_items (order_id, product_id, quanity, created_at) VALUES ($1, $2, $3, now())",
            &[&order, &product, &quantity],
        )
        .await
        .expect("item");
    order
}

/// Counts the current `fact_orders` rows of `order` that name a version of `customer`.
fn names_customer(order: i64, customer: i64) -> String {
    format!(
        "SELECT count(*) FROM fact_orders f JOIN dim_customer d ON d.customer_sk = f.customer_sk \
         WHERE f.order_id = {order} AND d.customer_id = {customer} AND f.is_current"
    )
}

/// Counts the current `fact_order_items` rows of `order` that name a version of `product`, at
/// `amount`.
fn names_product(order: i64, product: i64, amount: &str) -> String {
    format!(
        "SELECT count(*) FROM fact_order_items f JOIN dim_product d ON d.product_sk = f.product_sk \
         WHERE f.order_id = {order} AND d.product_id = {product} AND f.amount = {amount} AND f.is_current"
    )
}

/// Statements inserting the ghost customer and product (see the test below).
fn ghost_rows(customer: i64, product: i64) -> String {
    format!(
        "INSERT INTO operations.customers (customer_id, customer_name, is_active, created_at) \
           VALUES ({customer}, 'Ghost customer', true, now()); \
         INSERT INTO operations.products (product_id, product_name, barcode, unity_price, is_active) \
           VALUES ({product}, 'Ghost product', '321', 4.00, true);"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn incremental_builds_equal_a_full_rebuild_and_correct_late_keys() {
    let (url, dir, mut config, mut stream) = pipeline("incremental", 0.003, 23).await;
    // Small files, so that builds rewrite some files of a table and leave the others.
    config.model_file_rows = 500;
    let client = acme_testkit::connect(&url).await.expect("connect");
    let first = ModelBuild::new(config.clone()).await.expect("first build");
    assert!(first.tables.iter().all(|t| !t.incremental), "the first build computes every table");
    let late_customer: i64 =
        client.query_one("SELECT max(customer_id) + 100 FROM operations.customers", &[]).await.expect("max").get(0);
    let late_product: i64 =
        client.query_one("SELECT max(product_id) + 100 FROM operations.products", &[]).await.expect("max").get(0);
    let mut late_order = 0i64;
    // A customer and a product inserted and deleted in one transaction (no visible version,
    // only a tombstone), named by an order and an item, and inserted again later.
    let (ghost_customer, ghost_product) = (late_customer + 1, late_product + 1);
    let mut ghost_order = 0i64;
    let early_order: i64 =
        client.query_one("SELECT max(order_id) + 1000 FROM operations.orders", &[]).await.expect("max").get(0);
    // An order inserted and deleted in one transaction, with an item that waits for it.
    let ghost_early_order = early_order + 1;
    let mut deleted_customer = 0i64;
    let mut partial_rewrites = 0;
    for round in 0..5u64 {
        acme_testkit::run_workload(&url, &workload(500 + round, 150, 2)).await.expect("workload");
        match round {
            // An order naming a customer and a product that do not exist yet.
            1 => {
                late_order = order_with_item(&client, late_customer, late_product, 3).await;
                client
                    .batch_execute(&format!(
                        "BEGIN; {} \
                         INSERT INTO operations.orders (order_id, order_date, delivery_date, customer_id, status, \
                           created_at) VALUES ({ghost_early_order}, current_date, current_date + 5, 1, 'PENDING', now()); \
                         DELETE FROM operations.customers WHERE customer_id = {ghost_customer}; \
                         DELETE FROM operations.products WHERE product_id = {ghost_product}; \
                         DELETE FROM operations.orders WHERE order_id = {ghost_early_order}; \
                         INSERT INTO operations.order_items (order_id, product_id, quanity, created_at) \
                           VALUES ({ghost_early_order}, 1, 5, now()); \
                         COMMIT",
                        ghost_rows(ghost_customer, ghost_product)
                    ))
                    .await
                    .expect("a customer and a product that never were visible");
                ghost_order = order_with_item(&client, ghost_customer, ghost_product, 2).await;
                // An item stored before its order.
                client
                    .execute(
                        "INSERT INTO operations.order_items (order_id, product_id, quanity, created_at) \
                         VALUES ($1, 1, 4, now())",
                        &[&early_order],
                    )
                    .await
                    .expect("early item");
                // An item of an open order moves to a completed one, neither order changing: R3
                // counts it off.
                client
                    .batch_execute(
                        "UPDATE operations.order_items SET order_id = \
                           (SELECT min(order_id) FROM operations.orders WHERE status = 'COMPLETED') \
                         WHERE order_item_id = (SELECT min(i.order_item_id) FROM operations.order_items i \
                           JOIN operations.orders o ON o.order_id = i.order_id WHERE o.status <> 'COMPLETED')",
                    )
                    .await
                    .expect("an item moves to another order");
            }
            // The customer and the product arrive.
            2 => {
                client
                    .execute(
                        "INSERT INTO operations.customers (customer_id, customer_name, is_active, created_at) \
                         VALUES ($1, 'Late customer', true, now())",
                        &[&late_customer],
                    )
                    .await
                    .expect("late customer");
                client
                    .execute(
                        "INSERT INTO operations.products (product_id, product_name, barcode, unity_price, is_active) \
                         VALUES ($1, 'Late product', '123', 12.50, true)",
                        &[&late_product],
                    )
                    .await
                    .expect("late product");
                client
                    .batch_execute(&ghost_rows(ghost_customer, ghost_product))
                    .await
                    .expect("the ghosts arrive for good");
                client
                    .batch_execute(&format!(
                        "INSERT INTO operations.orders (order_id, order_date, delivery_date, customer_id, status, \
                           created_at) VALUES ({ghost_early_order}, current_date, current_date + 5, 1, 'PENDING', now())"
                    ))
                    .await
                    .expect("the ghost order arrives for good");
                // The early item's order arrives after its product's price changed: the item
                // takes the price in force when its order was placed.
                client
                    .batch_execute(&format!(
                        "UPDATE operations.products SET unity_price = unity_price + 2 WHERE product_id = 1; \
                         INSERT INTO operations.orders (order_id, order_date, delivery_date, customer_id, status, \
                           created_at) VALUES ({early_order}, current_date, current_date + 5, 1, 'PENDING', now())"
                    ))
                    .await
                    .expect("early item's order");
            }
            // Test environments truncate.
            3 => client.batch_execute("TRUNCATE operations.order_items").await.expect("truncate"),
            // A customer is deleted, then orders name it: they take its first version.
            4 => {
                deleted_customer = client
                    .query_one(
                        "DELETE FROM operations.customers WHERE customer_id = \
                         (SELECT min(customer_id) FROM operations.customers) RETURNING customer_id",
                        &[],
                    )
                    .await
                    .expect("delete a customer")
                    .get(0);
                client
                    .execute(
                        "INSERT INTO operations.orders (order_date, delivery_date, customer_id, status, created_at) \
                         SELECT current_date, current_date + 10, $1, 'PENDING', now() FROM generate_series(1, 3)",
                        &[&deleted_customer],
                    )
                    .await
                    .expect("orders of a deleted customer");
            }
            _ => {}
        }
        stream.catch_up().await.expect("catch up");
        let report = ModelBuild::new(config.clone()).await.expect("incremental build");
        assert!(!report.up_to_date, "round {round} has changes");
        let history = report.tables.iter().find(|t| t.table == "intermediate/orders_history").expect("orders built");
        assert!(history.incremental && history.keys > 0, "round {round}: {history:?}");
        let items = report.tables.iter().find(|t| t.table == "presentation/fact_order_items").expect("items built");
        let files = acme_core::Storage::new(&config.storage_url, Default::default())
            .expect("storage")
            .open(acme_core::Layer::Presentation, "fact_order_items")
            .await
            .expect("open")
            .expect("exists")
            .data_files()
            .expect("files")
            .len();
        if round != 3 {
            // Replaced rows are marked in deletion vectors: no stored file is rewritten.
            assert_eq!(items.files_rewritten, 0, "round {round}: {items:?}");
            assert!(items.files_marked < files, "round {round}: not every file marked ({items:?})");
            partial_rewrites += usize::from(items.files_marked > 0);
        }
        let w = Warehouse::open(&config.storage_url).await.expect("open");
        // R3 and R4 start from the stored aggregates, kept by difference.
        assert_eq!(crate::acme(&w, 3, None).await, crate::oracle(&client, 3).await, "round {round}: reports");
        match round {
            1 => {
                let sql = format!("SELECT customer_sk FROM fact_orders WHERE order_id = {late_order}");
                assert_eq!(scalar(&w, &sql).await, -1, "a late customer maps to the unknown member");
                let sql = format!(
                    "SELECT product_sk FROM fact_order_items WHERE order_id = {late_order} \
                     AND product_id = {late_product}"
                );
                assert_eq!(scalar(&w, &sql).await, -1, "a late product maps to the unknown member");
                let sql = format!("SELECT customer_sk FROM fact_orders WHERE order_id = {ghost_order}");
                assert_eq!(scalar(&w, &sql).await, -1, "a customer never visible maps to the unknown member");
            }
            2 => {
                let sql = names_customer(late_order, late_customer);
                assert_eq!(scalar(&w, &sql).await, 1, "the order now names its customer");
                let sql = names_product(late_order, late_product, "37.5");
                assert_eq!(scalar(&w, &sql).await, 1, "the item now names its product and price");
                let sql = names_customer(ghost_order, ghost_customer);
                assert_eq!(scalar(&w, &sql).await, 1, "the order names the customer that arrived after a tombstone");
                let sql = names_product(ghost_order, ghost_product, "8");
                assert_eq!(scalar(&w, &sql).await, 1, "the item names the product that arrived after a tombstone");
                let cents: i64 = client
                    .query_one("SELECT (unity_price * 100)::bigint FROM operations.products WHERE product_id = 1", &[])
                    .await
                    .expect("price")
                    .get(0);
                let sql = format!(
                    "SELECT count(*) FROM fact_order_items WHERE order_id = {early_order} AND is_current \
                     AND CAST(unit_price * 100 AS BIGINT) = {cents}"
                );
                assert_eq!(scalar(&w, &sql).await, 1, "the early item takes the price at its order's placing");
            }
            3 => {
                let items: i64 =
                    client.query_one("SELECT count(*) FROM operations.order_items", &[]).await.expect("n").get(0);
                assert_eq!(scalar(&w, "SELECT count(*) FROM fact_order_items WHERE is_current").await, items);
            }
            _ => {}
        }
    }
    assert!(partial_rewrites > 0, "some build marked rows inside existing files");
    assert_written_in_key_order(&config).await;
    // Nothing new: the build changes nothing.
    assert!(ModelBuild::new(config.clone()).await.expect("again").up_to_date);

    // A full rebuild of a copy of the raw layer.
    let (_full_dir, full_config, full) = full_rebuild_of_a_copy(&url, dir.path()).await;
    assert!(full.tables.iter().all(|t| !t.incremental));
    assert_written_in_key_order(&full_config).await;
    let incremental = Warehouse::open(&config.storage_url).await.expect("incremental warehouse");
    let rebuilt = Warehouse::open(&full_config.storage_url).await.expect("rebuilt warehouse");
    assert_eq!(incremental.model_position(), rebuilt.model_position());
    for table in MODEL_TABLES {
        assert!(!rows(&incremental, table).await.is_empty() || table == "fact_order_items", "{table} has rows");
    }
    // Orders placed after their customer was deleted name its first version in both builds.
    // (At this size the join-order fault of `acme_model::star::fact_orders_sql` does not show:
    // the test passes with the joins the old way round too; `tests/kills.rs` caught it.)
    let sql = format!(
        "SELECT count(*) FROM fact_orders f JOIN dim_customer d ON d.customer_sk = f.customer_sk \
         WHERE f.customer_id = {deleted_customer} AND d.customer_id = {deleted_customer} AND f.is_current"
    );
    let orders = format!("SELECT count(*) FROM fact_orders WHERE customer_id = {deleted_customer} AND is_current");
    for w in [&incremental, &rebuilt] {
        let n = scalar(w, &orders).await;
        assert!(n >= 3, "the orders of the deleted customer are there ({n})");
        assert_eq!(scalar(w, &sql).await, n, "every order of the deleted customer names one of its versions");
    }
    assert_same_model(&incremental, &rebuilt).await;
}

/// Every build, rewrite and compaction writes each model file in its table's order: each
/// file and page then covers a narrow key range, which key lookups rely on.
async fn assert_written_in_key_order(config: &acme_core::AcmeConfig) {
    let mut unsorted = Vec::new();
    let files = model_files(config).await;
    assert!(!files.is_empty(), "the builds wrote files");
    for (table, key, file) in files {
        if !keys_in_order(config, &table, key, &file).await {
            unsorted.push(format!("{}/{}", table.name, file.path));
        }
    }
    assert!(unsorted.is_empty(), "files written out of key order: {unsorted:?}");
}

/// Every data file of every model table, with the table and the first column of its order.
async fn model_files(
    config: &acme_core::AcmeConfig,
) -> Vec<(acme_model::ModelTable, &'static str, acme_core::DataFile)> {
    let storage = acme_core::Storage::new(&config.storage_url, Default::default()).expect("storage");
    let mut out = Vec::new();
    for table in acme_model::Catalog::acme().tables() {
        let opened = storage.open(table.layer, table.name).await.expect("open").expect("built");
        for file in opened.data_files().expect("files") {
            out.push((*table, table.sort[0], file));
        }
    }
    out
}

/// Whether the integer or date column `key` of `file` never decreases, read in the file's row order.
async fn keys_in_order(
    config: &acme_core::AcmeConfig,
    table: &acme_model::ModelTable,
    key: &str,
    file: &acme_core::DataFile,
) -> bool {
    use arrow::array::AsArray;
    use futures::StreamExt;
    let storage = acme_core::Storage::new(&config.storage_url, Default::default()).expect("storage");
    let opened = storage.open(table.layer, table.name).await.expect("open").expect("built");
    let ctx = storage.session_context();
    let mut stream = opened.read_file_in_order(&ctx, file, Some(&[key])).await.expect("read a file");
    let mut last = i64::MIN;
    while let Some(batch) = stream.next().await {
        let batch = batch.expect("a batch");
        let keys = arrow::compute::cast(batch.column(0), &arrow::datatypes::DataType::Int64).expect("integer keys");
        for k in keys.as_primitive::<arrow::datatypes::Int64Type>().iter().flatten() {
            if k < last {
                return false;
            }
            last = k;
        }
    }
    true
}

/// Compare every model table of two warehouses.
async fn assert_same_model(a: &Warehouse, b: &Warehouse) {
    for table in MODEL_TABLES {
        let (x, y) = (rows(a, table).await, rows(b, table).await);
        assert_eq!(x.len(), y.len(), "{table}: row counts");
        for (r, s) in x.iter().zip(&y) {
            assert_eq!(r, s, "{table}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_build_interrupted_anywhere_leaves_the_last_model_readable_and_the_next_completes_it() {
    let (url, dir, mut config, mut stream) = pipeline("interrupted", 0.002, 29).await;
    config.model_file_rows = 400;
    ModelBuild::new(config.clone()).await.expect("first build");
    let client = acme_testkit::connect(&url).await.expect("connect");
    let mut interrupted = 0;
    for round in 0..3u64 {
        acme_testkit::run_workload(&url, &workload(700 + round, 120, 2)).await.expect("workload");
        stream.catch_up().await.expect("catch up");
        // Builds dropped after a growing delay: at some await point of reading, writing files,
        // committing a table, compacting or writing the manifest.
        for delay_ms in [2u64, 8, 20, 40, 80, 160] {
            let build = ModelBuild::new(config.clone()).run();
            if tokio::time::timeout(std::time::Duration::from_millis(delay_ms), build).await.is_err() {
                interrupted += 1;
            }
            // Readers see the last complete build (`model.*`): each stored history matches its
            // fact table; and the live views (the build's tables with the raw tail applied) match
            // the source, whatever the build got done.
            let w = Warehouse::open(&config.storage_url).await.expect("open after an interrupted build");
            let stored_orders = "SELECT count(*) FROM model.orders_history WHERE is_current AND NOT is_deleted";
            assert_eq!(
                scalar(&w, stored_orders).await,
                scalar(&w, "SELECT count(*) FROM model.fact_orders WHERE is_current").await,
                "round {round}, {delay_ms} ms"
            );
            assert_eq!(
                scalar(&w, &format!("{stored_orders} AND status <> 'COMPLETED'")).await,
                scalar(
                    &w,
                    "SELECT coalesce(sum(orders), 0) FROM model.agg_orders_by_delivery_date \
                     WHERE status <> 'COMPLETED'"
                )
                .await,
                "round {round}, {delay_ms} ms: the stored aggregate matches its history"
            );
            let source: i64 = client.query_one("SELECT count(*) FROM operations.orders", &[]).await.expect("n").get(0);
            assert_eq!(scalar(&w, "SELECT count(*) FROM orders_current").await, source, "live orders");
            assert_eq!(
                scalar(&w, "SELECT count(*) FROM orders_current WHERE status <> 'COMPLETED'").await,
                scalar(
                    &w,
                    "SELECT coalesce(sum(orders), 0) FROM agg_orders_by_delivery_date WHERE status <> 'COMPLETED'"
                )
                .await,
                "round {round}, {delay_ms} ms: the live aggregate matches the live history"
            );
        }
    }
    assert!(interrupted >= 6, "builds were interrupted ({interrupted})");
    // The next build completes the model: it equals a full rebuild and the source.
    ModelBuild::new(config.clone()).await.expect("completing build");
    let (_full_dir, full_config, _) = full_rebuild_of_a_copy(&url, dir.path()).await;
    let completed = Warehouse::open(&config.storage_url).await.expect("completed");
    let rebuilt = Warehouse::open(&full_config.storage_url).await.expect("rebuilt");
    assert_same_model(&completed, &rebuilt).await;
    let orders: i64 = client.query_one("SELECT count(*) FROM operations.orders", &[]).await.expect("n").get(0);
    assert_eq!(scalar(&completed, "SELECT count(*) FROM fact_orders WHERE is_current").await, orders);
}
