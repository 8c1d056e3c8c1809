//! Bench data shared by the benchmarks: a warehouse built once per scale factor and seed and
//! cached on disk (`bench-data/sf<SF>-seed<SEED>/`, or under `ACME_BENCH_DATA`), so later runs
//! skip generation.
//!
//! A dataset is: the ACME source generated at the scale factor, snapshotted into a warehouse,
//! then a live workload streamed in (so the history holds real versions), the model built, and
//! the current state of orders, order items and customers, and every version of them, exported as
//! plain Parquet for outside engines (`current/`, `history/`). `instant.txt` records an instant
//! half-way through the workload for as-of queries.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use acme::core::AcmeConfig;
use acme::ingest::ChangeStream;
use acme::model::ModelBuild;
use acme::query::Warehouse;
use acme::query::datafusion::config::TableParquetOptions;
use acme::query::datafusion::dataframe::DataFrameWriteOptions;
use acme_testkit::{PgCluster, ScaleFactor, WorkloadConfig};
use chrono::{DateTime, Utc};

/// jemalloc instead of glibc's malloc: with tokio's worker and blocking threads, glibc keeps the
/// memory the pipeline frees in per-thread arenas, and a SF10 snapshot whose live heap stays
/// under 300 MiB held 1.5 GiB of RSS (README, "Memory").
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// The scale factor of this run (`ACME_BENCH_SF`, default 0.1).
pub fn scale() -> f64 {
    std::env::var("ACME_BENCH_SF").ok().and_then(|v| v.parse().ok()).unwrap_or(0.1)
}

/// R2's and R4's limit in the report benchmarks.
pub const LIMIT: usize = 10;

/// Report `n` (1-4) as acme's API names it: R1 over open orders, R2, R3, R4 over pending orders.
pub fn acme_report(n: usize) -> acme::query::Report {
    use acme::query::{Report, StatusFilter};
    match n {
        1 => Report::OpenOrders(StatusFilter::Open),
        2 => Report::TopDeliveryDates { limit: LIMIT },
        3 => Report::PendingItemsByProduct,
        _ => Report::TopCustomers { limit: LIMIT, filter: StatusFilter::Pending },
    }
}

/// The seed of the generated data.
pub const SEED: u64 = 42;

/// A cached bench dataset.
#[derive(Debug, Clone)]
pub struct Dataset {
    /// Its directory.
    pub dir: PathBuf,
    /// The warehouse URL (a local path).
    pub warehouse: String,
    /// An instant half-way through the streamed workload.
    pub instant: DateTime<Utc>,
}

impl Dataset {
    /// Plain Parquet file of the current state of `table` (`orders`, `order_items`, `customers`).
    pub fn current(&self, table: &str) -> PathBuf {
        self.dir.join("current").join(format!("{table}.parquet"))
    }

    /// Plain Parquet file of every version of `table`, with `valid_from`, `valid_to` and
    /// `is_deleted` (the histories, for the as-of baseline).
    pub fn history(&self, table: &str) -> PathBuf {
        self.dir.join("history").join(format!("{table}.parquet"))
    }
}

/// Where bench data lives (`ACME_BENCH_DATA`, default `bench-data/`).
pub fn root() -> PathBuf {
    std::env::var_os("ACME_BENCH_DATA")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("bench-data"))
}

/// The dataset for `sf`, built now unless a complete one is cached.
pub async fn dataset(sf: f64) -> Dataset {
    let dir = root().join(format!("sf{sf}-seed{SEED}"));
    let done = dir.join("complete");
    if !done.exists() {
        // Remove what an incomplete build left, but not the benchmarks' summaries beside it
        // (the snapshot benchmark, which runs first, writes its own there).
        for part in ["warehouse", "current", "history", "instant.txt"] {
            let path = dir.join(part);
            if path.is_dir() {
                std::fs::remove_dir_all(&path).expect("remove an incomplete dataset");
            } else if path.exists() {
                std::fs::remove_file(&path).expect("remove an incomplete dataset");
            }
        }
        std::fs::create_dir_all(&dir).expect("bench data directory");
        build(sf, &dir).await;
        std::fs::write(&done, b"").expect("mark complete");
    }
    // A dataset cached by an older acme gets the current model (a no-op when up to date).
    let warehouse = dir.join("warehouse").display().to_string();
    let config = AcmeConfig::builder().storage_url(&warehouse).build().expect("config");
    ModelBuild::new(config).await.expect("model build of the cached dataset");
    let exported = dir.join(format!("exported-{EXPORT_ROW_GROUP_ROWS}"));
    if !exported.exists() {
        export(&dir).await;
        std::fs::write(&exported, b"").expect("mark exported");
    }
    let text = std::fs::read_to_string(dir.join("instant.txt")).expect("instant.txt");
    let instant = DateTime::parse_from_rfc3339(text.trim()).expect("instant").with_timezone(&Utc);
    Dataset { warehouse: dir.join("warehouse").display().to_string(), dir, instant }
}

async fn build(sf: f64, dir: &Path) {
    eprintln!("building the bench dataset at SF{sf} in {} (cached for later runs)", dir.display());
    let cluster = PgCluster::start().expect("PostgreSQL");
    let url = cluster.create_database("bench").await.expect("database");
    let client = acme_testkit::connect(&url).await.expect("connect");
    acme_testkit::create_source_schema(&client).await.expect("schema");
    acme_testkit::bulk_load(&url, ScaleFactor::new(sf).expect("sf"), SEED).await.expect("load");
    let warehouse = dir.join("warehouse").display().to_string();
    let config = AcmeConfig::builder().source_url(&url).storage_url(&warehouse).build().expect("config");
    let mut stream = ChangeStream::open(config.clone()).await.expect("snapshot");
    // Two halves of live changes (scaled with the data), the instant recorded between them.
    let transactions = ((20_000.0 * sf) as u64).max(500);
    for half in 0..2u64 {
        let workload = WorkloadConfig {
            seed: SEED + half,
            rate_tps: 0.0,
            transactions: Some(transactions / 2),
            duration: None,
            connections: 2,
            deletes: true,
            inserts_only: false,
        };
        acme_testkit::run_workload(&url, &workload).await.expect("workload");
        stream.catch_up().await.expect("catch up");
        if half == 0 {
            tokio::time::sleep(Duration::from_millis(50)).await;
            let instant: String = client
                .query_one("SELECT to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')", &[])
                .await
                .expect("now")
                .get(0);
            std::fs::write(dir.join("instant.txt"), instant).expect("instant.txt");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    ModelBuild::new(config).await.expect("model build");
}

/// Rows per row group of the exported Parquet: DuckDB's own default, so that DuckDB reads one
/// file with as many threads as it has.
pub const EXPORT_ROW_GROUP_ROWS: usize = 122_880;

/// The business columns each exported table keeps.
pub fn export_columns(table: &str) -> &'static str {
    match table {
        "orders" => "order_id, order_date, delivery_date, customer_id, status",
        "order_items" => "order_item_id, order_id, product_id, quanity",
        _ => "customer_id, customer_name, is_active",
    }
}

/// Export plain Parquet for the baselines: `current/<table>.parquet` (the current state) and
/// `history/<table>.parquet` (every version with `valid_from`, `valid_to` and `is_deleted`,
/// for the as-of baseline), in row groups of [`EXPORT_ROW_GROUP_ROWS`].
async fn export(dir: &Path) {
    let warehouse = dir.join("warehouse").display().to_string();
    let w = Warehouse::open(&warehouse).await.expect("warehouse");
    let mut options = TableParquetOptions::default();
    options.global.max_row_group_size = EXPORT_ROW_GROUP_ROWS;
    for (part, suffix, extra) in
        [("current", "current", ""), ("history", "history", ", valid_from, valid_to, is_deleted")]
    {
        std::fs::create_dir_all(dir.join(part)).expect("export dir");
        for table in ["orders", "order_items", "customers"] {
            let path = dir.join(part).join(format!("{table}.parquet"));
            w.sql(&format!("SELECT {}{extra} FROM {table}_{suffix}", export_columns(table)))
                .await
                .expect("rows to export")
                .write_parquet(
                    path.to_str().expect("utf-8 path"),
                    DataFrameWriteOptions::new().with_single_file_output(true),
                    Some(options.clone()),
                )
                .await
                .expect("export");
        }
    }
}

/// Median wall time of `runs` runs of `f` after two warm-up runs.
pub async fn median<F, Fut, T>(runs: usize, mut f: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = T>,
{
    for _ in 0..2 {
        std::hint::black_box(f().await);
    }
    let mut times = Vec::with_capacity(runs);
    for _ in 0..runs {
        let started = std::time::Instant::now();
        std::hint::black_box(f().await);
        times.push(started.elapsed());
    }
    times.sort();
    times[times.len() / 2]
}

/// Peak resident set size of this process, in MiB.
pub fn peak_rss_mib() -> f64 {
    status_mib("VmHWM:")
}

/// Resident set size of this process now, in MiB.
pub fn rss_mib() -> f64 {
    status_mib("VmRSS:")
}

/// A size in `/proc/self/status` (the line starting with `field`, in kB), in MiB.
fn status_mib(field: &str) -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with(field)).map(str::to_string))
        .and_then(|l| l.split_whitespace().nth(1).and_then(|kb| kb.parse::<f64>().ok()))
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

/// The `p` quantile (0 to 1) of `sorted`, which must not be empty: the value at the nearest
/// index of `p` times the last index.
pub fn percentile<T: Copy>(sorted: &[T], p: f64) -> T {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// Samples this process's RSS every `every` on a thread of its own until stopped.
pub struct RssSampler {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<Vec<f64>>,
}

/// What an [`RssSampler`] saw, in MiB. The largest sample is a transient whose size depends
/// on what happened to run at that instant (a fold, a refresh, a compaction); the median and
/// the 90th percentile say what the process holds most of the time.
#[derive(Debug, Clone, Copy)]
pub struct RssSamples {
    /// The sample taken when sampling started.
    pub first: f64,
    /// The median sample.
    pub p50: f64,
    /// The 90th percentile sample.
    pub p90: f64,
    /// The largest sample.
    pub max: f64,
    /// The last sample.
    pub last: f64,
}

impl RssSampler {
    /// Start sampling.
    pub fn start(every: std::time::Duration) -> Self {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = std::sync::Arc::clone(&stop);
        let thread = std::thread::spawn(move || {
            let mut samples = vec![rss_mib()];
            while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                std::thread::sleep(every);
                samples.push(rss_mib());
            }
            samples
        });
        Self { stop, thread }
    }

    /// Stop, and summarise the samples.
    pub fn stop(self) -> RssSamples {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let samples = self.thread.join().unwrap_or_else(|_| vec![f64::NAN]);
        let (first, last) = (samples[0], samples[samples.len() - 1]);
        let mut sorted = samples;
        sorted.sort_by(f64::total_cmp);
        let at = |q| percentile(&sorted, q);
        RssSamples { first, p50: at(0.5), p90: at(0.9), max: at(1.0), last }
    }
}

/// Reset this process's peak RSS to its current RSS (Linux: `5` written to
/// `/proc/self/clear_refs`), so a later [`peak_rss_mib`] gives the peak of what ran since.
/// Returns whether the kernel took it.
pub fn reset_peak_rss() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// Run this benchmark binary again as a child process with `var` set to `value` (the child
/// does one step and prints `peak_rss_mib=<n>`), and return the child's peak RSS in MiB: a
/// process of its own, so the figure is the step's alone.
pub fn child_peak_rss_mib(var: &str, value: &std::ffi::OsStr) -> f64 {
    let child = std::process::Command::new(std::env::current_exe().expect("this binary"))
        .arg("--bench")
        .env(var, value)
        .output()
        .expect("a child run");
    String::from_utf8_lossy(&child.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("peak_rss_mib=").and_then(|v| v.parse::<f64>().ok()))
        .expect("the child's peak RSS")
}
