//! An ephemeral PostgreSQL cluster started from the machine's own binaries.
//!
//! The cluster listens on loopback only, on a free port, with `wal_level=logical`. When the
//! calling process runs as root, the server runs as the `postgres` system user (PostgreSQL
//! refuses to run as root). A watchdog process stops the server and removes its data
//! directory as soon as the owning process ends, even when it panics or is killed.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::error::{HarnessError, Result};

/// Settings every cluster starts with: logical decoding, room for many slots, and durability
/// traded for speed (a test cluster holds nothing worth an fsync).
const SERVER_SETTINGS: &[(&str, &str)] = &[
    ("listen_addresses", "127.0.0.1"),
    ("wal_level", "logical"),
    ("max_replication_slots", "64"),
    ("max_wal_senders", "64"),
    ("max_connections", "300"),
    ("fsync", "off"),
    ("full_page_writes", "off"),
    ("synchronous_commit", "off"),
    // Asynchronous commits reach logical decoding only once the WAL writer flushes them; flush
    // every 10 ms (not the default 200 ms) so freshness figures match a synchronous-commit source.
    ("wal_writer_delay", "10ms"),
    ("shared_buffers", "256MB"),
    ("max_wal_size", "4GB"),
    ("checkpoint_timeout", "30min"),
    ("logical_decoding_work_mem", "256MB"),
    ("wal_sender_timeout", "60s"),
];

static SHARED: OnceLock<std::result::Result<PgCluster, String>> = OnceLock::new();
static DATABASE_COUNTER: AtomicU64 = AtomicU64::new(0);

/// A running PostgreSQL cluster owned by this process.
#[derive(Debug)]
pub struct PgCluster {
    bindir: PathBuf,
    root: PathBuf,
    port: u16,
    as_postgres_user: bool,
}

impl PgCluster {
    /// Start a new cluster: `initdb`, then `pg_ctl start`, and a watchdog that tears it down
    /// when this process ends.
    pub fn start() -> Result<Self> {
        let bindir = find_bindir()?;
        let as_postgres_user = running_as_root();
        let root = make_root_dir()?;
        let cluster = PgCluster { bindir, root, port: 0, as_postgres_user };
        cluster.spawn_watchdog()?;
        if as_postgres_user {
            run(Command::new("chown").args(["-R", "postgres:postgres"]).arg(&cluster.root))?;
        }
        let mut initdb = cluster.pg_command("initdb");
        initdb.arg("-D").arg(cluster.data_dir()).args([
            "-U",
            "postgres",
            "-A",
            "trust",
            "-E",
            "UTF8",
            "--locale=C",
            "--no-sync",
        ]);
        run(&mut initdb)?;
        let mut cluster = cluster;
        cluster.port = free_port()?;
        cluster.write_settings()?;
        cluster.pg_start()?;
        Ok(cluster)
    }

    /// The cluster shared by every test in this process, started on first use.
    ///
    /// Panics with the harness error when the cluster cannot start: a test that cannot reach
    /// its database must fail loudly.
    pub fn shared() -> &'static PgCluster {
        let started = SHARED.get_or_init(|| PgCluster::start().map_err(|e| e.to_string()));
        match started {
            Ok(cluster) => cluster,
            Err(message) => panic!("could not start the test PostgreSQL cluster: {message}"),
        }
    }

    /// TCP port the server listens on (loopback only).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The directory holding the data directory, the log and the socket.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The data directory.
    pub fn data_dir(&self) -> PathBuf {
        self.root.join("data")
    }

    /// A `postgres://` URL for `database` as the superuser `postgres`.
    pub fn url(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }

    /// Create a fresh, uniquely named database and return its URL.
    pub async fn create_database(&self, prefix: &str) -> Result<String> {
        let n = DATABASE_COUNTER.fetch_add(1, Ordering::Relaxed);
        let name = format!("{prefix}_{}_{n}", std::process::id());
        let (client, connection) = tokio_postgres::connect(&self.url("postgres"), tokio_postgres::NoTls)
            .await
            .map_err(|source| HarnessError::Connect { url: self.url("postgres"), source })?;
        let task = tokio::spawn(connection);
        client
            .batch_execute(&format!("CREATE DATABASE \"{name}\""))
            .await
            .map_err(|source| HarnessError::Sql { what: "CREATE DATABASE".into(), source })?;
        drop(client);
        let _ = task.await;
        Ok(self.url(&name))
    }

    /// Create the superuser `user` (with REPLICATION) whose connections from loopback,
    /// ordinary and replication, must give `password` (SCRAM). Other users are unaffected.
    pub async fn add_password_user(&self, user: &str, password: &str) -> Result<()> {
        let rules =
            format!("host all {user} 127.0.0.1/32 scram-sha-256\nhost replication {user} 127.0.0.1/32 scram-sha-256\n");
        let role =
            format!("CREATE ROLE \"{user}\" LOGIN SUPERUSER REPLICATION PASSWORD '{}'", password.replace('\'', "''"));
        self.add_user_rules("adding a user with a password", &rules, &[role]).await
    }

    /// Turn TLS on with a certificate for the host name `localhost` issued by a fresh test CA,
    /// and create the superuser `user` (with REPLICATION) that may connect over TLS only: its
    /// plain connections, ordinary and replication, are rejected. Other users are unaffected.
    /// Returns the CA, whose certificate is what a client's `sslrootcert` names.
    pub async fn enable_tls(&self, user: &str) -> Result<crate::tls::TestCa> {
        let data = self.data_dir();
        let ca = crate::tls::TestCa::new(&self.root, "acme-test-ca")?;
        let issued = ca.issue(&self.root, "server", "localhost")?;
        for (from, to) in [(&issued.cert, "server.crt"), (&issued.key, "server.key")] {
            std::fs::copy(from, data.join(to))
                .map_err(|source| HarnessError::Io { what: format!("copying {}", from.display()), source })?;
        }
        run(Command::new("chmod").arg("600").arg(data.join("server.key")))?;
        if self.as_postgres_user {
            run(Command::new("chown")
                .arg("postgres:postgres")
                .arg(data.join("server.key"))
                .arg(data.join("server.crt")))?;
        }
        let rules = format!(
            "hostnossl all {user} 127.0.0.1/32 reject\nhostnossl replication {user} 127.0.0.1/32 reject\n\
             hostssl all {user} 127.0.0.1/32 trust\nhostssl replication {user} 127.0.0.1/32 trust\n"
        );
        let statements =
            [format!("CREATE ROLE \"{user}\" LOGIN SUPERUSER REPLICATION"), "ALTER SYSTEM SET ssl = on".into()];
        self.add_user_rules("enabling TLS", &rules, &statements).await?;
        Ok(ca)
    }

    /// Put `rules` first in `pg_hba.conf`, run `statements` as the superuser, and reload the
    /// configuration (`what` names the step in errors).
    async fn add_user_rules(&self, what: &str, rules: &str, statements: &[String]) -> Result<()> {
        let hba = self.data_dir().join("pg_hba.conf");
        let existing = std::fs::read_to_string(&hba)
            .map_err(|source| HarnessError::Io { what: format!("reading {}", hba.display()), source })?;
        std::fs::write(&hba, format!("{rules}{existing}"))
            .map_err(|source| HarnessError::Io { what: format!("writing {}", hba.display()), source })?;
        let (client, connection) = tokio_postgres::connect(&self.url("postgres"), tokio_postgres::NoTls)
            .await
            .map_err(|source| HarnessError::Connect { url: self.url("postgres"), source })?;
        let task = tokio::spawn(connection);
        for sql in statements.iter().map(String::as_str).chain(["SELECT pg_reload_conf()"]) {
            client.batch_execute(sql).await.map_err(|source| HarnessError::Sql { what: what.into(), source })?;
        }
        drop(client);
        let _ = task.await;
        // The reload is asynchronous: give the postmaster a moment to read the rules (and a
        // certificate).
        tokio::time::sleep(Duration::from_millis(300)).await;
        Ok(())
    }

    /// Stop the server (fast shutdown) and start it again on the same port.
    pub fn restart(&self) -> Result<()> {
        self.pg_stop("fast")?;
        self.pg_start()
    }

    /// Stop the server with the given `pg_ctl` mode (`smart`, `fast` or `immediate`).
    pub fn stop(&self, mode: &str) -> Result<()> {
        self.pg_stop(mode)
    }

    /// Start the server again after [`PgCluster::stop`].
    pub fn start_again(&self) -> Result<()> {
        self.pg_start()
    }

    /// Freeze every server process (SIGSTOP to the postmaster and its children): the server
    /// keeps its sockets, so connections neither fail nor answer, like a network stall. The
    /// kernel still completes new TCP handshakes; nothing behind them answers.
    pub fn pause(&self) -> Result<()> {
        self.signal_all("STOP")
    }

    /// Thaw the processes frozen by [`PgCluster::pause`].
    pub fn resume(&self) -> Result<()> {
        self.signal_all("CONT")
    }

    /// The postmaster's process id and those of its children.
    fn server_pids(&self) -> Result<(u32, Vec<u32>)> {
        let pidfile = self.data_dir().join("postmaster.pid");
        let text = std::fs::read_to_string(&pidfile)
            .map_err(|source| HarnessError::Io { what: format!("reading {}", pidfile.display()), source })?;
        let postmaster: u32 = text
            .lines()
            .next()
            .and_then(|l| l.trim().parse().ok())
            .ok_or_else(|| HarnessError::InvalidParameter(format!("{} names no process", pidfile.display())))?;
        let mut children = Vec::new();
        let proc_dir =
            std::fs::read_dir("/proc").map_err(|source| HarnessError::Io { what: "listing /proc".into(), source })?;
        for entry in proc_dir.flatten() {
            let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else { continue };
            let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else { continue };
            // `pid (comm) state ppid ...`: the command may hold spaces, so split after `)`.
            let parent = stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().nth(1));
            if parent.and_then(|p| p.parse::<u32>().ok()) == Some(postmaster) {
                children.push(pid);
            }
        }
        Ok((postmaster, children))
    }

    /// Send `signal` to the postmaster (which must exist), then to its children. Children come
    /// and go (a backend exits when its client leaves), so one that is gone is skipped, and
    /// the children are listed again until no new one appears: with the postmaster stopped
    /// first, none is forked after that.
    fn signal_all(&self, signal: &str) -> Result<()> {
        let (postmaster, _) = self.server_pids()?;
        let mut cmd = Command::new("kill");
        cmd.arg(format!("-{signal}")).arg(postmaster.to_string());
        run(&mut cmd)?;
        let mut signalled = std::collections::HashSet::new();
        for _ in 0..5 {
            let (_, children) = self.server_pids()?;
            let new: Vec<u32> = children.into_iter().filter(|pid| signalled.insert(*pid)).collect();
            if new.is_empty() {
                break;
            }
            for pid in new {
                // A child that exited in between is fine: it needs no signal.
                let _ = Command::new("kill")
                    .arg(format!("-{signal}"))
                    .arg(pid.to_string())
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status();
            }
        }
        Ok(())
    }

    fn pg_start(&self) -> Result<()> {
        let mut cmd = self.pg_command("pg_ctl");
        cmd.arg("-D")
            .arg(self.data_dir())
            .arg("-l")
            .arg(self.root.join("server.log"))
            .args(["-w", "-t", "60", "start"]);
        run(&mut cmd).map_err(|e| match e {
            HarnessError::Command { command, output } => {
                HarnessError::Command { command, output: format!("{output}\nserver log:\n{}", self.log_tail()) }
            }
            other => other,
        })?;
        wait_for_port(self.port, Duration::from_secs(30))
    }

    fn pg_stop(&self, mode: &str) -> Result<()> {
        let mut cmd = self.pg_command("pg_ctl");
        cmd.arg("-D").arg(self.data_dir()).args(["-w", "-m", mode, "stop"]);
        run(&mut cmd)
    }

    fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.root.join("server.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    fn write_settings(&self) -> Result<()> {
        let mut conf = String::from("\n# acme test cluster\n");
        for (key, value) in SERVER_SETTINGS {
            conf.push_str(&format!("{key} = '{value}'\n"));
        }
        conf.push_str(&format!("port = {}\n", self.port));
        conf.push_str(&format!("unix_socket_directories = '{}'\n", self.root.display()));
        let path = self.data_dir().join("postgresql.auto.conf");
        let mut existing = std::fs::read_to_string(&path).unwrap_or_default();
        existing.push_str(&conf);
        std::fs::write(&path, existing)
            .map_err(|source| HarnessError::Io { what: format!("writing {}", path.display()), source })
    }

    fn pg_command(&self, program: &str) -> Command {
        let exe = self.bindir.join(program);
        if self.as_postgres_user {
            let mut cmd = Command::new("runuser");
            cmd.args(["-u", "postgres", "--"]).arg(exe);
            cmd
        } else {
            Command::new(exe)
        }
    }

    /// A detached shell that waits for this process to end, then stops the server and
    /// removes the directory. It survives a SIGKILL of this process.
    fn spawn_watchdog(&self) -> Result<()> {
        use std::os::unix::process::CommandExt;
        let pg_ctl = self.bindir.join("pg_ctl");
        let data = self.data_dir();
        let stop = if self.as_postgres_user {
            format!("runuser -u postgres -- '{}' -D '{}' -m immediate -w stop", pg_ctl.display(), data.display())
        } else {
            format!("'{}' -D '{}' -m immediate -w stop", pg_ctl.display(), data.display())
        };
        let script = format!(
            "while kill -0 {pid} 2>/dev/null; do sleep 0.5; done; \
             if [ -f '{data}/postmaster.pid' ]; then {stop} >/dev/null 2>&1; fi; rm -rf '{root}'",
            pid = std::process::id(),
            data = data.display(),
            root = self.root.display(),
        );
        Command::new("sh")
            .args(["-c", &script])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .map_err(|source| HarnessError::Io { what: "spawning the cluster watchdog".into(), source })?;
        Ok(())
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        // A frozen server could not stop: thaw it first (harmless when it runs).
        let _ = self.resume();
        let _ = self.pg_stop("immediate");
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

/// Locate the PostgreSQL server binaries: `$ACME_PG_BINDIR`, then `postgres` on `PATH`,
/// then `pg_config --bindir`, then the newest `/usr/lib/postgresql/*/bin`.
pub fn find_bindir() -> Result<PathBuf> {
    let has_server = |dir: &Path| dir.join("postgres").is_file() && dir.join("initdb").is_file();
    if let Ok(dir) = std::env::var("ACME_PG_BINDIR") {
        let dir = PathBuf::from(dir);
        if has_server(&dir) {
            return Ok(dir);
        }
    }
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            if has_server(&dir) {
                return Ok(dir);
            }
        }
    }
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output() {
        let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if out.status.success() && has_server(&dir) {
            return Ok(dir);
        }
    }
    let mut candidates: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let version = entry.file_name().to_string_lossy().parse::<u32>().ok()?;
            let bin = entry.path().join("bin");
            has_server(&bin).then_some((version, bin))
        })
        .collect();
    candidates.sort();
    candidates.pop().map(|(_, dir)| dir).ok_or(HarnessError::BinariesNotFound)
}

fn running_as_root() -> bool {
    Command::new("id").arg("-u").output().map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0").unwrap_or(false)
}

fn make_root_dir() -> Result<PathBuf> {
    let base = std::env::var_os("ACME_PG_TMPDIR").map(PathBuf::from).unwrap_or_else(std::env::temp_dir);
    let dir = tempfile::Builder::new()
        .prefix("acme-pg-")
        .tempdir_in(&base)
        .map_err(|source| HarnessError::Io { what: format!("creating a directory in {}", base.display()), source })?;
    Ok(dir.keep())
}

fn free_port() -> Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0")
        .map_err(|source| HarnessError::Io { what: "finding a free loopback port".into(), source })?;
    let port = listener
        .local_addr()
        .map_err(|source| HarnessError::Io { what: "reading the free port".into(), source })?
        .port();
    Ok(port)
}

fn wait_for_port(port: u16, timeout: Duration) -> Result<()> {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Err(HarnessError::NotReady { port })
}

pub(crate) fn run(cmd: &mut Command) -> Result<()> {
    let description = format!("{cmd:?}");
    let output = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|source| HarnessError::Io { what: format!("running {description}"), source })?;
    if output.status.success() {
        Ok(())
    } else {
        Err(HarnessError::Command {
            command: description,
            output: format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr)),
        })
    }
}
