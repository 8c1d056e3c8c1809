//! Crash suite: the `sync` example runs as a child process while the live workload writes,
//! and is killed with SIGKILL at random points (during the snapshot, mid-stream, mid-commit,
//! mid-model-build, mid-compaction), then restarted, again and again. At the end the layers
//! equal the source, no change is stored twice, and every key's history has no gap.
//!
//! The kill delays come from a seeded generator (`ACME_CRASH_SEED`, printed), so a failing
//! sequence can be replayed.

mod support;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use acme::query::Warehouse;
use acme_testkit::WorkloadConfig;

fn spawn_sync(url: &str, warehouse: &Path, slot: &str, mode: &str, log: &Path, once: bool) -> Child {
    let log = std::fs::OpenOptions::new().create(true).append(true).open(log).expect("log file");
    let mut command = Command::new(support::sync_binary());
    command
        .args(["--source", url, "--warehouse"])
        .arg(warehouse)
        // `--fold-ratio 0`: a model build whenever there is a tail, so kills land in builds too.
        .args(["--slot", slot, "--status-interval", "1", "--cdc-mode", mode, "--fold-ratio", "0"])
        // `ACME_CRASH_CHILD_LOG` (default `warn`): the children's log filter, to replay a failing
        // sequence with more detail.
        .env("RUST_LOG", std::env::var("ACME_CRASH_CHILD_LOG").unwrap_or_else(|_| "warn".into()))
        .stdout(Stdio::from(log.try_clone().expect("log")))
        .stderr(Stdio::from(log));
    if once {
        command.arg("--once");
    }
    command.spawn().expect("start the sync example")
}

/// A small deterministic generator for the kill delays.
fn next(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

async fn scalar(w: &Warehouse, sql: &str) -> i64 {
    let batches = w.sql(sql).await.expect("query").collect().await.expect("collect");
    let column = acme::core::arrow::compute::cast(batches[0].column(0), &acme::core::arrow::datatypes::DataType::Int64)
        .expect("cast");
    column.as_any().downcast_ref::<acme::core::arrow::array::Int64Array>().expect("int64").value(0)
}

/// `columns` of every row of `table` are the same in PostgreSQL and in acme's current view.
async fn same_rows(client: &tokio_postgres::Client, w: &Warehouse, table: &str, columns: &str) {
    let text: Vec<String> = columns.split(',').map(|c| format!("coalesce(CAST({} AS text), '∅')", c.trim())).collect();
    let pg: Vec<String> = client
        .query(&format!("SELECT concat_ws('|', {}) FROM operations.{table}", text.join(", ")), &[])
        .await
        .expect("source rows")
        .iter()
        .map(|r| r.get::<_, String>(0))
        .collect();
    let batches = w
        .sql(&format!("SELECT {columns} FROM {table}_current"))
        .await
        .expect("acme rows")
        .collect()
        .await
        .expect("collect");
    let mut ours = Vec::new();
    for b in &batches {
        for row in 0..b.num_rows() {
            let values: Vec<String> = b
                .columns()
                .iter()
                .map(|c| {
                    if c.is_null(row) {
                        "∅".to_string()
                    } else {
                        acme::core::arrow::util::display::array_value_to_string(c, row).expect("value")
                    }
                })
                .collect();
            ours.push(values.join("|"));
        }
    }
    let (our_rows, pg_rows) = (ours.len(), pg.len());
    let ours: std::collections::BTreeSet<String> = ours.into_iter().collect();
    let pg: std::collections::BTreeSet<String> = pg.into_iter().collect();
    let only_acme: Vec<&String> = ours.difference(&pg).take(10).collect();
    let only_pg: Vec<&String> = pg.difference(&ours).take(10).collect();
    if !only_acme.is_empty() || !only_pg.is_empty() {
        // The stored history of the keys that differ, to see which step went wrong.
        let mut keys: Vec<String> =
            only_acme.iter().chain(&only_pg).filter_map(|r| r.split('|').next().map(str::to_string)).collect();
        keys.dedup();
        let key = columns.split(',').next().unwrap_or_default().trim();
        let listed = keys.iter().map(|k| format!("'{k}'")).collect::<Vec<_>>().join(", ");
        let rows = |sql: String| async move {
            let batches = w.sql(&sql).await.expect("diagnosis").collect().await.expect("collect");
            acme::core::arrow::util::pretty::pretty_format_batches(&batches).expect("format").to_string()
        };
        let history = rows(format!(
            "SELECT * FROM {table}_history WHERE CAST({key} AS VARCHAR) IN ({listed}) ORDER BY {key}, valid_from_lsn"
        ))
        .await;
        let raw = rows(format!(
            "SELECT * FROM raw_{table} WHERE CAST({key} AS VARCHAR) IN ({listed}) ORDER BY {key}, _lsn, _seq"
        ))
        .await;
        // Which side is behind: the stored model (its position and its own history) or the
        // tail applied on read.
        let stored = rows(format!(
            "SELECT {key}, valid_from_lsn, valid_to_lsn, is_current FROM model.{table}_history \
             WHERE CAST({key} AS VARCHAR) IN ({listed}) ORDER BY {key}, valid_from_lsn"
        ))
        .await;
        panic!(
            "{table}: acme's current rows differ from the source's ({} vs {} rows)\nonly in acme: {only_acme:?}\n\
             only in the source: {only_pg:?}\nraw position {:?}, model position {:?}, tail {:?}\n\
             history:\n{history}\nstored history:\n{stored}\nraw:\n{raw}",
            ours.len(),
            pg.len(),
            w.raw_position(),
            w.model_position(),
            w.tail(),
        );
    }
    assert_eq!(our_rows, pg_rows, "{table}: rows (a key twice in acme)");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_killed_at_random_points_loses_nothing_and_doubles_nothing() {
    crash_suite("crash", "stream", 24, Duration::from_secs(40)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_with_the_trigger_fallback_killed_at_random_points_loses_nothing_and_doubles_nothing() {
    crash_suite("crash_triggers", "triggers", 8, Duration::from_secs(16)).await;
}

/// Kill `sync --cdc-mode mode` `kills` times while the workload writes for `duration`.
async fn crash_suite(prefix: &str, mode: &str, kills: usize, duration: Duration) {
    let seed: u64 = std::env::var("ACME_CRASH_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(2026);
    println!("ACME_CRASH_SEED={seed}");
    let url = acme_testkit::acme_database(prefix, Some((0.01, 17))).await.expect("source");
    let slot = acme_testkit::slot_for(&url);
    let dir = tempfile::tempdir().expect("tmp");
    let warehouse = dir.path().join("warehouse");
    // `ACME_CRASH_LOG_DIR`: where the children's log is kept after the test (else it goes with
    // the warehouse's temporary directory).
    let log = match std::env::var_os("ACME_CRASH_LOG_DIR") {
        Some(kept) => std::path::PathBuf::from(kept).join(format!("{prefix}-sync.log")),
        None => dir.path().join("sync.log"),
    };
    let workload = {
        let url = url.clone();
        tokio::spawn(async move {
            let config = WorkloadConfig {
                seed,
                rate_tps: 150.0,
                transactions: None,
                duration: Some(duration),
                connections: 2,
                deletes: true,
                inserts_only: false,
            };
            acme_testkit::run_workload(&url, &config).await.expect("workload")
        })
    };
    let mut state = seed;
    let mut killed = 0;
    for round in 0..kills {
        let mut child = spawn_sync(&url, &warehouse, &slot, mode, &log, false);
        // The first kills come early, during the snapshot; later ones anywhere in the cycle of
        // streaming, model builds (every second) and compaction.
        let delay = if round < 3 { 150 + 150 * round as u64 } else { 200 + next(&mut state) % 2_300 };
        tokio::time::sleep(Duration::from_millis(delay)).await;
        if let Some(status) = child.try_wait().expect("child status") {
            let output = std::fs::read_to_string(&log).unwrap_or_default();
            panic!("sync exited by itself ({status}) in round {round}:\n{output}");
        }
        child.kill().expect("SIGKILL");
        child.wait().expect("reap");
        killed += 1;
    }
    let report = workload.await.expect("workload");
    assert!(report.transactions > 100 * duration.as_secs(), "the workload ran during the kills: {report:?}");
    // A last run catches up and exits.
    let status = spawn_sync(&url, &warehouse, &slot, mode, &log, true).wait().expect("final run");
    assert!(status.success(), "final sync failed:\n{}", std::fs::read_to_string(&log).unwrap_or_default());
    assert_eq!(killed, kills);

    let w = Warehouse::open(&warehouse.display().to_string()).await.expect("warehouse");
    let client = acme_testkit::connect(&url).await.expect("connect");
    // The layers equal the source.
    same_rows(&client, &w, "customers", "customer_id, customer_name, is_active, customer_address").await;
    same_rows(&client, &w, "products", "product_id, product_name, barcode, is_active").await;
    same_rows(&client, &w, "orders", "order_id, order_date, delivery_date, customer_id, status").await;
    same_rows(&client, &w, "order_items", "order_item_id, order_id, product_id, quanity").await;
    assert_eq!(
        scalar(&w, "SELECT count(*) FROM fact_orders WHERE is_current").await,
        scalar(&w, "SELECT count(*) FROM orders_current").await
    );
    for (table, key) in [
        ("customers", "customer_id"),
        ("products", "product_id"),
        ("orders", "order_id"),
        ("order_items", "order_item_id"),
    ] {
        // No change stored twice.
        let doubled = format!(
            "SELECT count(*) FROM (SELECT _lsn, _seq, {key} FROM raw_{table} GROUP BY _lsn, _seq, {key} \
             HAVING count(*) > 1) d"
        );
        assert_eq!(scalar(&w, &doubled).await, 0, "raw_{table}: a change stored twice");
        // No gap in any key's history, and one current version per key.
        let gaps = format!(
            "SELECT count(*) FROM (SELECT valid_to_lsn, LEAD(valid_from_lsn) OVER (PARTITION BY {key} \
               ORDER BY valid_from_lsn, valid_to_lsn NULLS LAST) AS next FROM {table}_history) v \
             WHERE next IS NOT NULL AND (valid_to_lsn IS NULL OR valid_to_lsn <> next)"
        );
        assert_eq!(scalar(&w, &gaps).await, 0, "{table}_history: a gap between versions");
        let current = format!(
            "SELECT count(*) FROM (SELECT {key} FROM {table}_history WHERE is_current GROUP BY {key} \
             HAVING count(*) <> 1) c"
        );
        assert_eq!(scalar(&w, &current).await, 0, "{table}_history: one current version per key");
    }
    // What the children got done between kills: some kills landed before the stream was ready
    // (in the snapshot or while opening), others after model builds and compactions.
    let output = std::fs::read_to_string(&log).unwrap_or_default();
    let ready = output.matches("ready after").count();
    let builds = output.matches("model at raw LSN").count();
    let compactions = output.matches("files merged").count();
    assert!(ready <= kills, "some kills landed before the stream was ready ({ready} of {} runs ready)", kills + 1);
    assert!(builds > 0, "model builds completed between kills");
    println!(
        "{mode}: {killed} kills survived; {} transactions written during them; {ready} runs got past the snapshot, \
         {builds} model builds and {compactions} raw compactions completed",
        report.transactions
    );
}
