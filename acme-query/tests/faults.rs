//! Storage faults: a truncated data file and a corrupt commit record get errors that name
//! what is broken, and never a panic or a half-visible state.

use acme_model::ModelBuild;
use acme_query::Warehouse;

use crate::{pipeline, workload};

/// The data files of `layer/table` under a local warehouse.
fn parquet_files(dir: &std::path::Path, table: &str) -> Vec<std::path::PathBuf> {
    let mut files: Vec<_> = std::fs::read_dir(dir.join(table))
        .expect("table dir")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "parquet"))
        .collect();
    files.sort();
    files
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_truncated_data_file_and_a_corrupt_commit_get_errors_naming_them() {
    let (url, dir, config, mut stream) = pipeline("faults", 0.002, 3).await;
    acme_testkit::run_workload(&url, &workload(41, 100, 1)).await.expect("workload");
    stream.catch_up().await.expect("catch up");
    ModelBuild::new(config.clone()).await.expect("model");

    // A data file cut in half (a torn write, a bad disk).
    let victim = parquet_files(&dir.path().join("raw"), "orders").into_iter().next().expect("a raw orders file");
    let name = victim.file_name().expect("name").to_string_lossy().to_string();
    let bytes = std::fs::read(&victim).expect("read");
    std::fs::write(&victim, &bytes[..bytes.len() / 2]).expect("truncate");
    let w = Warehouse::open(&config.storage_url).await.expect("open: the log is intact");
    w.sql("SELECT count(*) FROM raw_orders").await.expect("plan").collect().await.expect_err("read");
    let error = w.check_files().await.expect_err("the check finds the file");
    assert!(error.to_string().contains(&name), "the error names the file: {error}");
    let error = ModelBuild::new(config.clone()).full_rebuild().await.expect_err("a build over a truncated file");
    assert!(error.to_string().contains(&name), "the build error names the file: {error}");
    std::fs::write(&victim, &bytes).expect("restore");

    // The same for a history file under a report.
    let victim = parquet_files(&dir.path().join("intermediate"), "orders_history").pop().expect("a history file");
    let name = victim.file_name().expect("name").to_string_lossy().to_string();
    let bytes = std::fs::read(&victim).expect("read");
    std::fs::write(&victim, &bytes[..bytes.len() / 3]).expect("truncate");
    // Opening reads the history's start: the error names the file.
    let error = Warehouse::open(&config.storage_url).await.expect_err("open over a truncated history file");
    assert!(error.to_string().contains(&name), "the open error names the file: {error}");
    std::fs::write(&victim, &bytes).expect("restore");
    // A fact table's file under a report, damaged after the handle was opened: the report's
    // error names it.
    let items = acme_core::Storage::new(&config.storage_url, Default::default())
        .expect("storage")
        .open(acme_core::Layer::Presentation, "fact_order_items")
        .await
        .expect("open")
        .expect("the items fact table");
    let file = items.data_files().expect("files").into_iter().next().expect("a fact table file");
    let victim = dir.path().join("presentation").join("fact_order_items").join(&file.path);
    let name = victim.file_name().expect("name").to_string_lossy().to_string();
    let bytes = std::fs::read(&victim).expect("read");
    let w = Warehouse::open(&config.storage_url).await.expect("open");
    std::fs::write(&victim, &bytes[..bytes.len() / 3]).expect("truncate");
    let error = w.pending_items_by_product(None).await.expect_err("R3 over a truncated fact table file");
    assert!(error.to_string().contains(&name), "the report error names the file: {error}");
    std::fs::write(&victim, &bytes).expect("restore");
    assert!(!w.pending_items_by_product(None).await.expect("R3 after the repair").is_empty());

    // A commit record of a model table that is not JSON any more.
    let log = dir.path().join("presentation").join("fact_orders").join("_delta_log");
    let mut commits: Vec<_> = std::fs::read_dir(&log)
        .expect("log")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    commits.sort();
    let last = commits.last().expect("a commit").clone();
    std::fs::write(&last, b"{ this is not a commit").expect("corrupt");
    let error = Warehouse::open(&config.storage_url).await.expect_err("a corrupt commit record");
    assert!(error.to_string().contains("fact_orders"), "the error names the table: {error}");
}

/// The error and its causes, one line each.
fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut cause = error.source();
    while let Some(c) = cause {
        text.push_str(&format!("\n  caused by: {c}"));
        cause = c.source();
    }
    text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_failures_stop_with_clear_errors_hide_nothing_half_done_and_lose_nothing() {
    // A real, small file system that can be filled up and remounted read-only.
    let fs = acme_testkit::SmallFs::mount(256 * 1024 * 1024).expect("tmpfs for the warehouse");
    let url = acme_testkit::acme_database("write_faults", Some((0.002, 5))).await.expect("source");
    let config = crate::warehouse_config(&url, fs.path());
    let mut stream = acme_ingest::ChangeStream::open(config.clone()).await.expect("open");
    ModelBuild::new(config.clone()).await.expect("model");
    let client = acme_testkit::connect(&url).await.expect("connect");
    let mut seed = 50;
    for fault in ["a full file system", "a read-only file system"] {
        let inject = || match fault {
            "a full file system" => fs.fill(),
            _ => fs.set_read_only(true),
        };
        let repair = || match fault {
            "a full file system" => fs.free(),
            _ => fs.set_read_only(false),
        };
        let cause = if fault.contains("full") { "No space left on device" } else { "Read-only file system" };
        let w = Warehouse::open(&config.storage_url).await.expect("open");
        let before = crate::acme(&w, 10, None).await;
        assert_eq!(before, crate::oracle(&client, 10).await, "{fault}: in step before the fault is injected");

        // Changes reach the raw layer, then the fault hits the model build.
        seed += 1;
        acme_testkit::run_workload(&url, &workload(seed, 100, 1)).await.expect("workload");
        stream.catch_up().await.expect("catch up");
        // The source as the raw layer's last complete commit round holds it: what readers see
        // (the raw changes the stored model lacks are applied on read).
        let committed = crate::oracle(&client, 10).await;
        inject().expect("inject the fault");
        let error = ModelBuild::new(config.clone()).await.expect_err("a model build cannot write");
        let text = chain(&error);
        assert!(text.contains(cause), "{fault}: the build error gives the cause: {text}");
        // ... and the stream cannot commit the next changes.
        seed += 1;
        acme_testkit::run_workload(&url, &workload(seed, 100, 1)).await.expect("workload");
        let error = stream.catch_up().await.expect_err("the stream cannot write");
        let text = chain(&error);
        assert!(text.contains(cause), "{fault}: the stream error gives the cause: {text}");
        assert!(!error.is_transient(), "{fault}: a storage failure is not mistaken for a source failure");

        // Readers see the last complete state: nothing of the failed build or commit.
        let w = Warehouse::open(&config.storage_url).await.expect("readers open during the fault");
        assert_ne!(committed, before, "{fault}: the first workload changed the reports");
        assert_eq!(crate::acme(&w, 10, None).await, committed, "{fault}: readers see the last committed state");

        // Repaired: the same stream and a new build catch up, nothing lost or doubled.
        repair().expect("repair");
        stream.catch_up().await.expect("the stream resumes after the repair");
        ModelBuild::new(config.clone()).await.expect("the build succeeds after the repair");
        let w = Warehouse::open(&config.storage_url).await.expect("open");
        assert_eq!(crate::acme(&w, 10, None).await, crate::oracle(&client, 10).await, "{fault}: after the repair");
        for (table, key) in [("orders", "order_id"), ("order_items", "order_item_id")] {
            // Snapshot rows share one position, so a change is (position, key).
            let doubled = format!(
                "SELECT count(*) AS n FROM (SELECT _lsn, _seq, {key} FROM raw_{table} GROUP BY _lsn, _seq, {key} \
                 HAVING count(*) > 1)"
            );
            let batches = w.sql(&doubled).await.expect("plan").collect().await.expect("count");
            let n = batches[0].column(0).as_any().downcast_ref::<arrow::array::Int64Array>().expect("count").value(0);
            assert_eq!(n, 0, "{fault}: no change of {table} stored twice");
        }
    }
}

/// A pool too small for the build: the error says which setting to raise (not a bare engine
/// error), nothing of the failed build is visible, and the same build with the default pool
/// then succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_build_out_of_memory_says_which_setting_to_raise() {
    let (_url, _dir, config, stream) = pipeline("model_oom", 0.05, 5).await;
    drop(stream);
    let mut small = config.clone();
    small.memory_limit_bytes = 64 * 1024 * 1024;
    let error = ModelBuild::new(small).await.expect_err("64 MiB is too small for 50,000 orders");
    assert!(matches!(error, acme_model::ModelError::OutOfMemory { limit_mib: 64, .. }), "{error:?}");
    assert!(error.to_string().contains("memory_limit_bytes"), "names the setting: {error}");
    let w = Warehouse::open(&config.storage_url).await.expect("open");
    assert!(w.model_position().is_none(), "no model manifest from the failed build");
    let report = ModelBuild::new(config.clone()).await.expect("the default pool");
    assert!(report.position > acme_core::Lsn(0));
    let w = Warehouse::open(&config.storage_url).await.expect("open");
    assert_eq!(w.model_position(), Some(report.position));
}
