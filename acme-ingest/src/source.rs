//! The PostgreSQL source: connecting, and reading table definitions from the catalog.

use std::str::FromStr;
use std::sync::Arc;

use arrow::datatypes::{DataType, Schema};
use std::time::Duration;

use tokio_postgres::{Client, Config, NoTls};

use crate::error::{IngestError, Result};
use crate::tls::{SslMode, Tls};
use crate::types::PgType;

/// A parsed source URL; its `Display` never shows the password.
#[derive(Clone)]
pub struct SourceUrl {
    config: Config,
    timeout: Duration,
    tls: Tls,
}

impl std::fmt::Debug for SourceUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SourceUrl({self})")
    }
}

impl std::fmt::Display for SourceUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let host = match self.config.get_hosts().first() {
            Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
            Some(tokio_postgres::config::Host::Unix(p)) => p.display().to_string(),
            None => "localhost".to_string(),
        };
        let port = self.config.get_ports().first().copied().unwrap_or(5432);
        let user = self.config.get_user().unwrap_or("?");
        let db = self.config.get_dbname().unwrap_or(user);
        write!(f, "{user}@{host}:{port}/{db}")
    }
}

impl SourceUrl {
    /// Parse a `postgres://` URL or a `key=value` connection string. TLS follows libpq's
    /// `sslmode` and `sslrootcert` (see [`crate::tls`]); the password comes from the URL, else
    /// `PGPASSWORD`, else the password file (`PGPASSFILE` or `~/.pgpass`).
    pub fn parse(url: &str) -> Result<Self> {
        let split = crate::tls::split_options(url).map_err(|e| match e {
            IngestError::BadUrl { message } => IngestError::BadUrl { message: redact(&message, url) },
            other => other,
        })?;
        let mut config =
            Config::from_str(&split.rest).map_err(|e| IngestError::BadUrl { message: redact(&e.to_string(), url) })?;
        let tls = Tls::new(split.sslmode, split.sslrootcert)?;
        config.ssl_mode(match tls.mode {
            SslMode::Disable => tokio_postgres::config::SslMode::Disable,
            SslMode::Prefer => tokio_postgres::config::SslMode::Prefer,
            _ => tokio_postgres::config::SslMode::Require,
        });
        if config.get_user().is_none() {
            return Err(IngestError::BadUrl { message: "no user name given".into() });
        }
        let timeout = config.get_connect_timeout().copied().unwrap_or(acme_core::config::DEFAULT_SOURCE_TIMEOUT);
        let pgpassword = std::env::var("PGPASSWORD").ok();
        let config = with_password(config, pgpassword, pgpass_file().as_deref());
        Ok(Self { config, timeout, tls })
    }

    /// How connections to this source use TLS (`sslmode`, after `PGSSLMODE` and an explicit
    /// `sslrootcert` are taken into account).
    pub fn ssl_mode(&self) -> SslMode {
        self.tls.mode
    }

    /// The rustls settings of this source's connections (`None` for `sslmode=disable`).
    pub(crate) fn tls_client(&self) -> Option<Arc<rustls::ClientConfig>> {
        self.tls.client.clone()
    }

    /// The error of a connection attempt: a refused server certificate becomes
    /// [`IngestError::Certificate`], anything else [`IngestError::Connect`].
    pub(crate) fn connect_error(&self, source: tokio_postgres::Error) -> IngestError {
        match crate::tls::certificate_problem(&source) {
            Some(problem) => IngestError::Certificate { target: self.to_string(), mode: self.tls.mode, problem },
            None => IngestError::Connect { target: self.to_string(), source },
        }
    }

    /// The same URL with another answer timeout (see [`SourceUrl::timeout`]).
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Longest wait for the server to accept a connection (the URL's `connect_timeout`, or
    /// [`acme_core::config::DEFAULT_SOURCE_TIMEOUT`]). It covers the whole handshake, not only
    /// the TCP connect: a paused server accepts TCP connections but never answers.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// The error of a server that did not answer within [`SourceUrl::timeout`] while `doing`.
    pub fn stalled(&self, doing: &str) -> IngestError {
        IngestError::Disconnected {
            target: self.to_string(),
            message: format!(
                "no answer for {:.1}s while {doing} (a network stall or a paused server; raise `source_timeout` if the \
                 source is only slow)",
                self.timeout.as_secs_f64()
            ),
        }
    }

    /// Run `work` against the source, failing with [`SourceUrl::stalled`] when it takes longer
    /// than [`SourceUrl::timeout`].
    pub async fn bounded<T>(&self, doing: &str, work: impl std::future::Future<Output = Result<T>>) -> Result<T> {
        match tokio::time::timeout(self.timeout, work).await {
            Ok(result) => result,
            Err(_) => Err(self.stalled(doing)),
        }
    }

    /// [`SourceUrl::bounded`] for one statement of the client: its error becomes
    /// [`IngestError::Source`] with `doing` as the context.
    pub async fn bounded_sql<T>(
        &self,
        doing: &str,
        work: impl std::future::Future<Output = std::result::Result<T, tokio_postgres::Error>>,
    ) -> Result<T> {
        let work = async { work.await.map_err(|source| IngestError::Source { context: doing.to_string(), source }) };
        self.bounded(doing, work).await
    }

    /// The parsed connection settings.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Open a connection; the connection is driven on a background task. It is encrypted as
    /// the URL's `sslmode` says (see [`crate::tls`]).
    pub async fn connect(&self) -> Result<Client> {
        self.bounded("connecting", self.connect_unbounded()).await
    }

    async fn connect_unbounded(&self) -> Result<Client> {
        let failed = |source| self.connect_error(source);
        let client = match self.tls_client() {
            None => {
                let (client, connection) = self.config.connect(NoTls).await.map_err(failed)?;
                tokio::spawn(drive(connection));
                client
            }
            Some(tls) => {
                let tls = tokio_postgres_rustls::MakeRustlsConnect::new((*tls).clone());
                let (client, connection) = self.config.connect(tls).await.map_err(failed)?;
                tokio::spawn(drive(connection));
                client
            }
        };
        Ok(client)
    }
}

async fn drive<F: std::future::Future<Output = std::result::Result<(), tokio_postgres::Error>>>(connection: F) {
    if let Err(error) = connection.await {
        tracing::debug!(%error, "source connection closed");
    }
}

/// The password file libpq reads: `PGPASSFILE`, or `~/.pgpass`.
fn pgpass_file() -> Option<std::path::PathBuf> {
    std::env::var_os("PGPASSFILE")
        .map(std::path::PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| std::path::Path::new(&home).join(".pgpass")))
}

/// `config` with a password, as libpq finds one when the URL gives none: `PGPASSWORD`
/// (`pgpassword`), else the first matching line of the password file `pgpass` (ignored, with a
/// warning, when others than its owner may read it).
fn with_password(mut config: Config, pgpassword: Option<String>, pgpass: Option<&std::path::Path>) -> Config {
    if config.get_password().is_some() {
        return config;
    }
    if let Some(password) = pgpassword.filter(|p| !p.is_empty()) {
        config.password(password);
        return config;
    }
    let Some(path) = pgpass else { return config };
    let Ok(metadata) = std::fs::metadata(path) else { return config };
    {
        use std::os::unix::fs::PermissionsExt;
        if metadata.permissions().mode() & 0o077 != 0 {
            tracing::warn!(
                file = %path.display(),
                "the password file is readable by others than its owner and is ignored (as libpq does): chmod 0600 it"
            );
            return config;
        }
    }
    let Ok(contents) = std::fs::read_to_string(path) else { return config };
    let host = match config.get_hosts().first() {
        Some(tokio_postgres::config::Host::Tcp(host)) => host.clone(),
        // libpq matches a socket in the default directory as `localhost`.
        _ => "localhost".to_string(),
    };
    let port = config.get_ports().first().copied().unwrap_or(5432).to_string();
    let user = config.get_user().unwrap_or_default().to_string();
    let database = config.get_dbname().unwrap_or(&user).to_string();
    if let Some(password) = pgpass_lookup(&contents, [&host, &port, &database, &user]) {
        config.password(password);
    }
    config
}

/// The password of the first line of a password file (`host:port:database:user:password`,
/// `*` matching anything, `\:` and `\\` escaping) that matches `wanted`.
fn pgpass_lookup(contents: &str, wanted: [&str; 4]) -> Option<String> {
    contents.lines().filter(|line| !line.trim_start().starts_with('#')).find_map(|line| {
        let mut fields = Vec::with_capacity(5);
        let mut field = String::new();
        let mut chars = line.chars();
        while let Some(c) = chars.next() {
            match c {
                '\\' => field.extend(chars.next()),
                ':' if fields.len() < 4 => fields.push(std::mem::take(&mut field)),
                c => field.push(c),
            }
        }
        fields.push(field);
        let [host, port, database, user, password] = <[String; 5]>::try_from(fields).ok()?;
        let matches = [host, port, database, user].iter().zip(wanted).all(|(f, w)| f == "*" || f == w);
        matches.then_some(password)
    })
}

/// Remove anything that looks like the URL's password from a message.
fn redact(message: &str, url: &str) -> String {
    let password = url
        .split_once("://")
        .and_then(|(_, rest)| rest.split_once('@'))
        .and_then(|(userinfo, _)| userinfo.split_once(':'))
        .map(|(_, p)| p.to_string());
    match password {
        Some(p) if !p.is_empty() => message.replace(&p, "***"),
        _ => message.to_string(),
    }
}

/// One source column.
#[derive(Debug, Clone, PartialEq)]
pub struct SourceColumn {
    /// Column name.
    pub name: String,
    /// Its type.
    pub ty: PgType,
    /// Declared `NOT NULL`.
    pub not_null: bool,
}

/// One source table as the catalog describes it.
#[derive(Debug, Clone, PartialEq)]
pub struct SourceTable {
    /// Schema name.
    pub schema: String,
    /// Table name.
    pub name: String,
    /// Table oid.
    pub oid: u32,
    /// Columns in attribute order.
    pub columns: Vec<SourceColumn>,
    /// Primary-key columns.
    pub primary_key: Vec<String>,
    /// Replica identity (`f` = full, `d` = default, `n` = nothing, `i` = index).
    pub replica_identity: char,
}

impl SourceTable {
    /// `schema.table`.
    pub fn qualified(&self) -> String {
        format!("{}.{}", self.schema, self.name)
    }

    /// `"schema"."table"`, quoted for SQL.
    pub fn quoted(&self) -> String {
        format!("{}.{}", quote_ident(&self.schema), quote_ident(&self.name))
    }

    /// The column list, quoted for SQL.
    pub fn column_list(&self) -> String {
        self.columns.iter().map(|c| quote_ident(&c.name)).collect::<Vec<_>>().join(", ")
    }

    /// The columns as (name, Arrow type).
    pub fn arrow_columns(&self) -> Vec<(String, DataType)> {
        self.columns.iter().map(|c| (c.name.clone(), c.ty.arrow_type())).collect()
    }

    /// The raw-layer schema of this table.
    pub fn raw_schema(&self) -> Arc<Schema> {
        acme_core::raw::raw_schema(&self.arrow_columns())
    }

    /// Read `schema.name` from the catalog; unsupported column types fail here, before any
    /// data is copied.
    pub async fn load(client: &Client, schema: &str, name: &str) -> Result<Self> {
        let qualified = format!("{schema}.{name}");
        let ctx = |what: &str| format!("{what} of {qualified}");
        let class = client
            .query_opt(
                "SELECT c.oid::int8, c.relreplident::text FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
                 WHERE n.nspname = $1 AND c.relname = $2 AND c.relkind IN ('r', 'p')",
                &[&schema, &name],
            )
            .await
            .map_err(|source| IngestError::Source { context: ctx("looking up the table"), source })?
            .ok_or_else(|| IngestError::MissingTable { table: qualified.clone() })?;
        let oid = class.get::<_, i64>(0) as u32;
        let replica_identity = class.get::<_, String>(1).chars().next().unwrap_or('d');
        let rows = client
            .query(
                "SELECT a.attname::text, a.atttypid::int8, a.atttypmod, format_type(a.atttypid, a.atttypmod), a.attnotnull \
                 FROM pg_attribute a WHERE a.attrelid = $1::int8::oid AND a.attnum > 0 AND NOT a.attisdropped \
                 ORDER BY a.attnum",
                &[&i64::from(oid)],
            )
            .await
            .map_err(|source| IngestError::Source { context: ctx("reading the columns"), source })?;
        let mut columns = Vec::with_capacity(rows.len());
        for row in rows {
            let column: String = row.get(0);
            let type_oid = row.get::<_, i64>(1) as u32;
            let typmod: i32 = row.get(2);
            let type_name: String = row.get(3);
            let ty = PgType::from_oid(type_oid, typmod, &qualified, &column, &type_name)?;
            columns.push(SourceColumn { name: column, ty, not_null: row.get(4) });
        }
        if columns.is_empty() {
            return Err(IngestError::NoColumns { table: qualified });
        }
        let primary_key = client
            .query(
                "SELECT a.attname::text FROM pg_index i \
                 JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord) ON true \
                 JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum \
                 WHERE i.indrelid = $1::int8::oid AND i.indisprimary ORDER BY k.ord",
                &[&i64::from(oid)],
            )
            .await
            .map_err(|source| IngestError::Source { context: ctx("reading the primary key"), source })?
            .iter()
            .map(|r| r.get(0))
            .collect();
        Ok(Self { schema: schema.to_string(), name: name.to_string(), oid, columns, primary_key, replica_identity })
    }
}

/// Quote an SQL identifier.
pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_display_and_errors_never_show_the_password() {
        let url = SourceUrl::parse("postgres://alice:s3cret@db.example:6543/finance_db").expect("parses");
        assert_eq!(url.to_string(), "alice@db.example:6543/finance_db");
        assert!(!format!("{url:?}").contains("s3cret"));
        let err = SourceUrl::parse("postgres://alice:s3cret@db.example:notaport/x").expect_err("bad port");
        assert!(!err.to_string().contains("s3cret"), "{err}");
    }

    #[test]
    fn a_password_comes_from_the_url_then_pgpassword_then_the_password_file() {
        let config = |url: &str| Config::from_str(url).expect("parses");
        let dir = tempfile::tempdir().expect("tmp");
        let file = dir.path().join("pgpass");
        std::fs::write(
            &file,
            "# comment\nother.host:5432:*:alice:wrong\ndb.example:*:finance_db:alice:from\\:file\n*:*:*:*:fallback\n",
        )
        .expect("write");
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        }
        let password = |c: Config| c.get_password().map(|p| String::from_utf8_lossy(p).into_owned());
        let url = "postgres://alice@db.example/finance_db";
        assert_eq!(
            password(with_password(
                config("postgres://alice:inurl@db.example/finance_db"),
                Some("env".into()),
                Some(&file)
            ))
            .as_deref(),
            Some("inurl")
        );
        assert_eq!(password(with_password(config(url), Some("env".into()), Some(&file))).as_deref(), Some("env"));
        assert_eq!(password(with_password(config(url), None, Some(&file))).as_deref(), Some("from:file"));
        let elsewhere = "postgres://bob@elsewhere:6000/x";
        assert_eq!(password(with_password(config(elsewhere), None, Some(&file))).as_deref(), Some("fallback"));
        assert_eq!(password(with_password(config(url), None, Some(&dir.path().join("missing")))), None);
        // A file others may read is ignored, as libpq ignores it.
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        }
        assert_eq!(password(with_password(config(url), None, Some(&file))), None);
    }
}
