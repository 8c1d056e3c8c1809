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
    // A handle opened before the damage: the report's error names it.
    std::fs::write(&victim, &bytes).expect("restore");
    let w = Warehouse::open(&config.storage_url).await.expect("open");
    std::fs::write(&victim, &bytes[..bytes.len() / 3]).expect("truncate again");
    let error = w.pending_items_by_product(None).await.expect_err("R3 over a truncated history file");
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
