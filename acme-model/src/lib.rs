//! acme-model: the SCD type-2 history (intermediate layer) and the star schema (presentation
//! layer), computed from the raw layer with DataFusion plans.
//!
//! What the model holds is declared once, in the [`catalog`]:
//!
//! ```
//! let catalog = acme_model::Catalog::acme();
//! let dimensions: Vec<&str> = catalog.tables().iter().filter(|t| t.surrogate_key().is_some()).map(|t| t.name).collect();
//! assert_eq!(dimensions, ["dim_customer", "dim_product"]);
//! ```
//!
//! ```no_run
//! # async fn demo() -> Result<(), acme_model::ModelError> {
//! let config = acme_core::AcmeConfig::builder().storage_url("/tmp/acme-warehouse").build()?;
//! let report = acme_model::ModelBuild::new(config).await?;
//! println!("model covers raw changes up to LSN {}", report.position);
//! # Ok(()) }
//! ```

pub mod build;
pub mod catalog;
pub mod error;
pub mod history;
pub mod live;
mod rewrite;
pub mod star;

pub use build::{MAX_INCREMENTAL_KEYS, MODEL_APP, ModelBuild, ModelReport, TableBuild};
pub use catalog::{Catalog, Changed, ModelTable, Plan, tables};
pub use error::{ModelError, Result};
pub use history::{HistorySpec, state_predicate};
