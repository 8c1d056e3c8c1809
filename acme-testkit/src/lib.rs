//! Test support for acme: an ephemeral PostgreSQL cluster, the ACME source schema, a
//! deterministic bulk generator and a live workload driver.
//!
//! Shared by the tests, examples and benchmarks of every acme crate.
//!
//! ```no_run
//! # async fn demo() -> Result<(), acme_testkit::HarnessError> {
//! use acme_testkit::{PgCluster, ScaleFactor, WorkloadConfig};
//! let cluster = PgCluster::shared();
//! let url = cluster.create_database("example").await?;
//! let client = acme_testkit::connect(&url).await?;
//! acme_testkit::create_source_schema(&client).await?;
//! acme_testkit::bulk_load(&url, ScaleFactor::new(0.01)?, 42).await?;
//! let report = acme_testkit::run_workload(&url, &WorkloadConfig::default()).await?;
//! println!("{} transactions", report.transactions);
//! # Ok(()) }
//! ```

pub mod ballista;
pub mod cluster;
pub mod error;
pub mod fs;
pub mod generator;
pub mod oracle;
pub mod outside;
pub mod replay;
pub mod rng;
pub mod source;
pub mod tls;
pub mod workload;

pub use ballista::BallistaCluster;
pub use cluster::PgCluster;
pub use error::{HarnessError, Result};
pub use fs::SmallFs;
pub use generator::{Generator, LoadReport, ScaleFactor, bulk_load};
pub use outside::MotoServer;
pub use source::{PUBLICATION, TABLES, create_source_schema, table_counts};
pub use workload::{TableChanges, WorkloadConfig, WorkloadReport, run_workload};

/// Connect to `url` without TLS and drive the connection on a background task.
pub async fn connect(url: &str) -> Result<tokio_postgres::Client> {
    generator::connect(url).await
}

/// A fresh database on the shared test cluster with the ACME source schema, loaded with
/// generated data at `scale` for `seed` when given. Returns its URL.
pub async fn acme_database(prefix: &str, data: Option<(f64, u64)>) -> Result<String> {
    let url = PgCluster::shared().create_database(prefix).await?;
    let client = connect(&url).await?;
    create_source_schema(&client).await?;
    if let Some((scale, seed)) = data {
        bulk_load(&url, ScaleFactor::new(scale)?, seed).await?;
    }
    Ok(url)
}

/// A replication slot name unique to the database of `url` (slots are cluster-wide, so tests
/// sharing a cluster need one each).
pub fn slot_for(url: &str) -> String {
    let database = url.rsplit('/').next().unwrap_or("acme").to_ascii_lowercase();
    format!("slot_{database}")
}

/// Copy the directory tree `from` into `to` (created if missing): e.g. a warehouse's raw layer,
/// to rebuild its model elsewhere and compare.
pub fn copy_dir(from: &std::path::Path, to: &std::path::Path) -> std::io::Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let target = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_dir(&entry.path(), &target)?;
        } else {
            std::fs::copy(entry.path(), target)?;
        }
    }
    Ok(())
}
