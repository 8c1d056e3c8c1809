//! Pipeline configuration: a serde struct with defaults, a builder and `validate()`.

use std::collections::HashMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Default schema of the source tables.
pub const DEFAULT_SCHEMA: &str = "operations";
/// Default source tables.
pub const DEFAULT_TABLES: [&str; 4] = ["customers", "products", "orders", "order_items"];
/// Default rows per Arrow record batch.
pub const DEFAULT_BATCH_ROWS: usize = 64 * 1024;
/// Default target size of a Parquet data file, in bytes. A file is assembled in memory before
/// it is stored, so each concurrent writer (one per snapshot connection) holds up to this much:
/// 64 MiB keeps an SF1 snapshot well under 300 MB of resident memory.
pub const DEFAULT_TARGET_FILE_BYTES: u64 = 64 * 1024 * 1024;
/// Default number of parallel copy connections per snapshot.
pub const DEFAULT_SNAPSHOT_PARALLELISM: usize = 2;
/// Default name of the logical replication slot acme owns.
pub const DEFAULT_SLOT: &str = "acme_slot";
/// Default name of the publication acme reads.
pub const DEFAULT_PUBLICATION: &str = "acme_publication";
/// Default longest time a change waits before its micro-batch is committed.
pub const DEFAULT_FLUSH_INTERVAL: Duration = Duration::from_millis(200);
/// Default largest number of changes in one micro-batch.
pub const DEFAULT_MAX_BATCH_CHANGES: usize = 200_000;
/// Default memory the model build's query engine may hold before spilling to disk.
pub const DEFAULT_MEMORY_LIMIT_BYTES: u64 = 1024 * 1024 * 1024;
/// Default rows per file of a model table (one row group).
pub const DEFAULT_MODEL_FILE_ROWS: u64 = 128 * 1024;
/// Default longest wait for an answer from the source (see [`AcmeConfig::source_timeout`]).
pub const DEFAULT_SOURCE_TIMEOUT: Duration = Duration::from_secs(30);

/// How the change stream reads the replication slot.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CdcMode {
    /// The replication protocol (`START_REPLICATION`): changes are pushed as they commit, the
    /// lowest latency. The default.
    #[default]
    Stream,
    /// `pg_logical_slot_peek_binary_changes` over an ordinary connection, polled: about 3x the
    /// streaming row rate on large backlogs, at the cost of one query per poll.
    SqlPoll,
    /// The fallback for sources where logical replication is not allowed: audit triggers write
    /// every change into a changelog table (`acme_cdc.<slot>_changes`) that acme polls. No
    /// slot, publication, `wal_level = logical` or REPLICATION privilege is needed, but each
    /// source write also writes a changelog row. See `acme_ingest::triggers`.
    Triggers,
}

/// Configuration of an acme pipeline.
///
/// Its `Debug` form and its serialised form never show a secret: the source URL's password
/// (in the URL or as a `password=` parameter) and the values of storage options that hold
/// credentials (see [`is_secret_option`]) read `***`. Deserialising reads them as given.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct AcmeConfig {
    /// PostgreSQL URL of the source (`postgres://user:password@host:port/db?sslmode=...`).
    #[serde(serialize_with = "redacted::url")]
    pub source_url: Option<String>,
    /// Where the layers live: a local path, `file:///path` or `s3://bucket/prefix`.
    pub storage_url: String,
    /// Options for the object store (for S3: `aws_endpoint`, `aws_region`, `aws_allow_http`, ...).
    #[serde(serialize_with = "redacted::options")]
    pub storage_options: HashMap<String, String>,
    /// Source schema.
    pub schema: String,
    /// Source tables to replicate.
    pub tables: Vec<String>,
    /// Rows per Arrow record batch.
    pub batch_rows: usize,
    /// Target Parquet file size in bytes.
    pub target_file_bytes: u64,
    /// Parallel copy connections used by the snapshot.
    pub snapshot_parallelism: usize,
    /// Replication slot name.
    pub slot: String,
    /// Publication name.
    pub publication: String,
    /// Longest time a change waits before its micro-batch is committed.
    #[serde(with = "duration_millis")]
    pub flush_interval: Duration,
    /// Largest number of changes in one micro-batch.
    pub max_batch_changes: usize,
    /// How changes are read from the slot.
    pub cdc_mode: CdcMode,
    /// Rows per file of the model's tables. An incremental build rewrites the files holding
    /// the rows it replaces, so smaller files rewrite fewer rows when changes are scattered
    /// over the keys, at the cost of more files to scan.
    pub model_file_rows: u64,
    /// Whether incremental model steps mark the rows they supersede with Delta deletion
    /// vectors (default) instead of rewriting the files that hold them. With vectors a step
    /// costs what its changes cost; compaction rewrites files whose vectors have grown. The
    /// model's tables then need readers that support the `deletionVectors` table feature
    /// (delta-rs, Spark, DuckDB's `delta` extension; delta-rs Python through `QueryBuilder`).
    pub deletion_vectors: bool,
    /// Memory the model build's query engine may hold (sorts and aggregations spill to the
    /// temporary directory beyond it).
    pub memory_limit_bytes: u64,
    /// Longest wait for an answer from the source: connecting, a query, or the replication
    /// stream answering a status request. Beyond it the connection counts as stalled (a network
    /// partition, a paused server) and is replaced, with backoff, like a broken one. The server
    /// answers status requests even while it decodes a large transaction, so this bounds
    /// failure detection, not transaction size.
    #[serde(with = "duration_millis")]
    pub source_timeout: Duration,
}

impl Default for AcmeConfig {
    fn default() -> Self {
        Self {
            source_url: None,
            storage_url: "./acme-warehouse".to_string(),
            storage_options: HashMap::new(),
            schema: DEFAULT_SCHEMA.to_string(),
            tables: DEFAULT_TABLES.iter().map(|t| t.to_string()).collect(),
            batch_rows: DEFAULT_BATCH_ROWS,
            target_file_bytes: DEFAULT_TARGET_FILE_BYTES,
            snapshot_parallelism: DEFAULT_SNAPSHOT_PARALLELISM,
            slot: DEFAULT_SLOT.to_string(),
            publication: DEFAULT_PUBLICATION.to_string(),
            flush_interval: DEFAULT_FLUSH_INTERVAL,
            max_batch_changes: DEFAULT_MAX_BATCH_CHANGES,
            cdc_mode: CdcMode::default(),
            model_file_rows: DEFAULT_MODEL_FILE_ROWS,
            deletion_vectors: true,
            memory_limit_bytes: DEFAULT_MEMORY_LIMIT_BYTES,
            source_timeout: DEFAULT_SOURCE_TIMEOUT,
        }
    }
}

impl AcmeConfig {
    /// Start a builder from the defaults.
    pub fn builder() -> AcmeConfigBuilder {
        AcmeConfigBuilder { config: AcmeConfig::default() }
    }

    /// Check every setting; the error names the setting and what is expected.
    pub fn validate(&self) -> Result<()> {
        let invalid = |setting, message: &str| Err(Error::Config { setting, message: message.to_string() });
        if self.storage_url.trim().is_empty() {
            return invalid("storage_url", "must not be empty");
        }
        if self.tables.is_empty() {
            return invalid("tables", "select at least one source table");
        }
        for name in self.tables.iter().chain([&self.schema, &self.slot, &self.publication]) {
            if !is_identifier(name) {
                return Err(Error::Config {
                    setting: "tables/schema/slot/publication",
                    message: format!("`{name}` is not a plain identifier (letters, digits, underscores)"),
                });
            }
        }
        if self.batch_rows == 0 || self.batch_rows > 16 * 1024 * 1024 {
            return invalid("batch_rows", "must be between 1 and 16777216");
        }
        if self.target_file_bytes < 1024 * 1024 {
            return invalid("target_file_bytes", "must be at least 1 MiB");
        }
        if self.snapshot_parallelism == 0 || self.snapshot_parallelism > 64 {
            return invalid("snapshot_parallelism", "must be between 1 and 64");
        }
        if self.flush_interval.is_zero() {
            return invalid("flush_interval", "must be positive");
        }
        if self.max_batch_changes == 0 {
            return invalid("max_batch_changes", "must be positive");
        }
        if self.model_file_rows < 100 {
            return invalid("model_file_rows", "must be at least 100");
        }
        if self.memory_limit_bytes < 64 * 1024 * 1024 {
            return invalid("memory_limit_bytes", "must be at least 64 MiB");
        }
        if self.source_timeout < Duration::from_millis(100) {
            return invalid("source_timeout", "must be at least 100 ms");
        }
        Ok(())
    }
}

/// A PostgreSQL identifier acme accepts without quoting: `[a-z_][a-z0-9_]*`.
pub fn is_identifier(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_lowercase() || c == '_')
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        && name.len() <= 63
}

/// Builder of [`AcmeConfig`]; `build()` validates.
#[derive(Debug, Clone)]
pub struct AcmeConfigBuilder {
    config: AcmeConfig,
}

impl AcmeConfigBuilder {
    /// The source PostgreSQL URL.
    pub fn source_url(mut self, url: impl Into<String>) -> Self {
        self.config.source_url = Some(url.into());
        self
    }

    /// Where the layers live.
    pub fn storage_url(mut self, url: impl Into<String>) -> Self {
        self.config.storage_url = url.into();
        self
    }

    /// One object-store option (e.g. `aws_endpoint`).
    pub fn storage_option(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.config.storage_options.insert(key.into(), value.into());
        self
    }

    /// Several object-store options at once (see [`AcmeConfigBuilder::storage_option`]).
    pub fn storage_options(mut self, options: impl IntoIterator<Item = (String, String)>) -> Self {
        self.config.storage_options.extend(options);
        self
    }

    /// The source schema.
    pub fn schema(mut self, schema: impl Into<String>) -> Self {
        self.config.schema = schema.into();
        self
    }

    /// The source tables to replicate.
    pub fn tables<I, S>(mut self, tables: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.config.tables = tables.into_iter().map(Into::into).collect();
        self
    }

    /// Rows per record batch.
    pub fn batch_rows(mut self, rows: usize) -> Self {
        self.config.batch_rows = rows;
        self
    }

    /// Target Parquet file size.
    pub fn target_file_bytes(mut self, bytes: u64) -> Self {
        self.config.target_file_bytes = bytes;
        self
    }

    /// Parallel copy connections of the snapshot.
    pub fn snapshot_parallelism(mut self, n: usize) -> Self {
        self.config.snapshot_parallelism = n;
        self
    }

    /// Replication slot name.
    pub fn slot(mut self, slot: impl Into<String>) -> Self {
        self.config.slot = slot.into();
        self
    }

    /// Publication name.
    pub fn publication(mut self, publication: impl Into<String>) -> Self {
        self.config.publication = publication.into();
        self
    }

    /// Longest wait before a micro-batch commits.
    pub fn flush_interval(mut self, interval: Duration) -> Self {
        self.config.flush_interval = interval;
        self
    }

    /// How changes are read from the slot (default: the streaming protocol).
    pub fn cdc_mode(mut self, mode: CdcMode) -> Self {
        self.config.cdc_mode = mode;
        self
    }

    /// Largest micro-batch.
    pub fn max_batch_changes(mut self, n: usize) -> Self {
        self.config.max_batch_changes = n;
        self
    }

    /// Memory the model build's query engine may hold before spilling.
    pub fn memory_limit_bytes(mut self, bytes: u64) -> Self {
        self.config.memory_limit_bytes = bytes;
        self
    }

    /// Rows per file of the model's tables.
    pub fn model_file_rows(mut self, rows: u64) -> Self {
        self.config.model_file_rows = rows;
        self
    }

    /// Whether incremental model steps mark superseded rows with deletion vectors (see
    /// [`AcmeConfig::deletion_vectors`]).
    pub fn deletion_vectors(mut self, on: bool) -> Self {
        self.config.deletion_vectors = on;
        self
    }

    /// Longest wait for an answer from the source before its connection is replaced.
    pub fn source_timeout(mut self, timeout: Duration) -> Self {
        self.config.source_timeout = timeout;
        self
    }

    /// Validate and return the configuration.
    pub fn build(self) -> Result<AcmeConfig> {
        self.config.validate()?;
        Ok(self.config)
    }
}

/// Parse a storage option given as `key=value` (for example on a command line).
pub fn parse_storage_option(text: &str) -> std::result::Result<(String, String), String> {
    match text.split_once('=') {
        Some((key, value)) if !key.trim().is_empty() => Ok((key.trim().to_string(), value.to_string())),
        _ => Err(format!("`{}` is not key=value (for example aws_region=eu-west-1)", redact_option_text(text))),
    }
}

/// A `key=value` text with the value hidden when the key names a secret.
fn redact_option_text(text: &str) -> String {
    match text.split_once('=') {
        Some((key, _)) if is_secret_option(key) => format!("{key}={REDACTED}"),
        _ => text.to_string(),
    }
}

/// What a secret reads as in `Debug` and serialised configs.
pub const REDACTED: &str = "***";

/// Whether the storage option `key` holds a credential (its name mentions a secret, password,
/// token, credential or key: `aws_secret_access_key`, `aws_session_token`,
/// `azure_storage_account_key`, ...).
pub fn is_secret_option(key: &str) -> bool {
    let key = key.to_ascii_lowercase();
    ["secret", "password", "token", "credential", "key"].iter().any(|word| key.contains(word))
}

/// `url` (a `postgres://` URL or a `key=value` connection string) with its password replaced
/// by [`REDACTED`], wherever it is given: `user:password@`, `?password=` or `password=`.
pub fn redact_source_url(url: &str) -> String {
    if let Ok(mut parsed) = url::Url::parse(url)
        && parsed.has_host()
    {
        if parsed.password().is_some() {
            let _ = parsed.set_password(Some(REDACTED));
        }
        let pairs: Vec<(String, String)> = parsed
            .query_pairs()
            .map(|(k, v)| {
                let secret = k.eq_ignore_ascii_case("password") || k.eq_ignore_ascii_case("sslpassword");
                (k.into_owned(), if secret { REDACTED.to_string() } else { v.into_owned() })
            })
            .collect();
        if !pairs.is_empty() {
            parsed.query_pairs_mut().clear().extend_pairs(pairs);
        }
        return parsed.to_string();
    }
    // A `key=value` connection string: values may be quoted and hold spaces.
    let mut out = String::with_capacity(url.len());
    let mut rest = url;
    while let Some(at) = rest.find("password") {
        let (before, from) = rest.split_at(at);
        out.push_str(before);
        let after_key = from["password".len()..].trim_start();
        let starts_key = before.is_empty() || before.ends_with(char::is_whitespace);
        let Some(value) = after_key.strip_prefix('=').filter(|_| starts_key) else {
            out.push_str("password");
            rest = &from["password".len()..];
            continue;
        };
        let value = value.trim_start();
        let end = if let Some(quoted) = value.strip_prefix('\'') {
            let mut escaped = false;
            let close = quoted.char_indices().find(|&(_, c)| {
                let close = c == '\'' && !escaped;
                escaped = c == '\\' && !escaped;
                close
            });
            close.map_or(value.len(), |(i, _)| i + 2)
        } else {
            value.find(char::is_whitespace).unwrap_or(value.len())
        };
        out.push_str("password=");
        out.push_str(REDACTED);
        rest = &value[end..];
    }
    out.push_str(rest);
    out
}

impl std::fmt::Debug for AcmeConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let options: std::collections::BTreeMap<&str, &str> = self
            .storage_options
            .iter()
            .map(|(k, v)| (k.as_str(), if is_secret_option(k) { REDACTED } else { v.as_str() }))
            .collect();
        f.debug_struct("AcmeConfig")
            .field("source_url", &self.source_url.as_deref().map(redact_source_url))
            .field("storage_url", &self.storage_url)
            .field("storage_options", &options)
            .field("schema", &self.schema)
            .field("tables", &self.tables)
            .field("batch_rows", &self.batch_rows)
            .field("target_file_bytes", &self.target_file_bytes)
            .field("snapshot_parallelism", &self.snapshot_parallelism)
            .field("slot", &self.slot)
            .field("publication", &self.publication)
            .field("flush_interval", &self.flush_interval)
            .field("max_batch_changes", &self.max_batch_changes)
            .field("cdc_mode", &self.cdc_mode)
            .field("model_file_rows", &self.model_file_rows)
            .field("deletion_vectors", &self.deletion_vectors)
            .field("memory_limit_bytes", &self.memory_limit_bytes)
            .field("source_timeout", &self.source_timeout)
            .finish()
    }
}

/// Serialisers that write secrets as [`REDACTED`].
mod redacted {
    use std::collections::{BTreeMap, HashMap};

    use serde::Serializer;

    pub fn url<S: Serializer>(url: &Option<String>, s: S) -> Result<S::Ok, S::Error> {
        match url {
            Some(url) => s.serialize_some(&super::redact_source_url(url)),
            None => s.serialize_none(),
        }
    }

    pub fn options<S: Serializer>(options: &HashMap<String, String>, s: S) -> Result<S::Ok, S::Error> {
        let shown: BTreeMap<&str, &str> = options
            .iter()
            .map(|(k, v)| (k.as_str(), if super::is_secret_option(k) { super::REDACTED } else { v.as_str() }))
            .collect();
        s.collect_map(shown)
    }
}

mod duration_millis {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(d.as_millis() as u64)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        Ok(Duration::from_millis(u64::deserialize(d)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_and_serialised_configs_never_show_a_secret() {
        let mut options = HashMap::new();
        options.insert("aws_secret_access_key".to_string(), "s3-secret-value".to_string());
        options.insert("aws_session_token".to_string(), "s3-token-value".to_string());
        options.insert("aws_region".to_string(), "eu-west-1".to_string());
        for url in [
            "postgres://acme:url-secret@db.example:5432/finance_db?sslmode=require",
            "postgres://acme@db.example/finance_db?password=url-secret&sslmode=require",
            "host=db.example user=acme password=url-secret dbname=finance_db",
            "host=db.example user=acme password = 'url secret\\' quoted' dbname=finance_db",
        ] {
            let config = AcmeConfig {
                source_url: Some(url.to_string()),
                storage_options: options.clone(),
                ..AcmeConfig::default()
            };
            let debug = format!("{config:?}");
            let json = serde_json::to_string(&config).expect("serialise");
            for shown in [&debug, &json] {
                for secret in ["url-secret", "url secret", "quoted", "s3-secret-value", "s3-token-value"] {
                    assert!(!shown.contains(secret), "{secret} shown: {shown}");
                }
                assert!(shown.contains("eu-west-1") && shown.contains("db.example"), "the rest is kept: {shown}");
                assert!(shown.contains(REDACTED), "{shown}");
            }
            // Deserialising reads what it is given.
            let back: AcmeConfig = serde_json::from_str(&json).expect("deserialise");
            assert_eq!(back.storage_options["aws_region"], "eu-west-1");
        }
        let plain = AcmeConfig { source_url: Some("postgres://acme@db/finance".into()), ..AcmeConfig::default() };
        assert!(format!("{plain:?}").contains("postgres://acme@db/finance"), "nothing to hide: {plain:?}");
    }

    #[test]
    fn defaults_validate() {
        assert!(AcmeConfig::default().validate().is_ok());
    }

    #[test]
    fn builder_rejects_bad_settings_with_the_setting_name() {
        let err = AcmeConfig::builder().batch_rows(0).build().expect_err("zero batch");
        assert!(err.to_string().contains("batch_rows"), "{err}");
        let err = AcmeConfig::builder().tables(["orders; drop"]).build().expect_err("bad name");
        assert!(err.to_string().contains("orders; drop"), "{err}");
        let err = AcmeConfig::builder().tables(Vec::<String>::new()).build().expect_err("no tables");
        assert!(err.to_string().contains("tables"), "{err}");
    }
}
