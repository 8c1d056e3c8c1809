//! Outside parts for tests: an S3 API server (moto) on loopback and a Python interpreter
//! with DuckDB, pyarrow and deltalake, from a virtual environment the harness creates when it
//! is missing.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::error::{HarnessError, Result};

/// Where the Python virtual environment lives (override with `ACME_VENV`).
pub const DEFAULT_VENV: &str = "/var/tmp/acme-venv";

/// The packages of the virtual environment (pip requirements).
pub const REQUIREMENTS: &str = include_str!("../python-requirements.txt");

fn venv() -> PathBuf {
    std::env::var_os("ACME_VENV").map(PathBuf::from).unwrap_or_else(|| PathBuf::from(DEFAULT_VENV))
}

/// The Python interpreter of the virtual environment (with moto, DuckDB, pyarrow and
/// deltalake), which is created first when it is missing or incomplete, as the harness starts
/// PostgreSQL: `python3 -m venv`, then `pip install` of [`REQUIREMENTS`] (this needs `python3`
/// with its `venv` module and network access to PyPI, once per machine). Creation is serialised
/// across threads and processes with a lock file beside the environment.
pub fn python() -> Result<PathBuf> {
    static READY: std::sync::Mutex<bool> = std::sync::Mutex::new(false);
    let mut ready = READY.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    let dir = venv();
    let path = dir.join("bin/python");
    if *ready || complete(&dir) {
        *ready = true;
        return Ok(path);
    }
    let lock_path = dir.with_extension("lock");
    let lock = std::fs::File::create(&lock_path)
        .map_err(|source| HarnessError::Io { what: format!("creating {}", lock_path.display()), source })?;
    lock.lock().map_err(|source| HarnessError::Io { what: format!("locking {}", lock_path.display()), source })?;
    if !complete(&dir) {
        create_venv(&dir)?;
    }
    *ready = true;
    Ok(path)
}

/// Whether the environment at `dir` has every tool the tests use.
fn complete(dir: &std::path::Path) -> bool {
    dir.join("bin/moto_server").is_file()
        && Command::new(dir.join("bin/python"))
            .args(["-c", "import duckdb, pyarrow, moto, deltalake"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
}

fn create_venv(dir: &std::path::Path) -> Result<()> {
    eprintln!("acme-testkit: creating the Python environment {} (once per machine)", dir.display());
    let requirements = dir.with_extension("requirements.txt");
    std::fs::write(&requirements, REQUIREMENTS)
        .map_err(|source| HarnessError::Io { what: format!("writing {}", requirements.display()), source })?;
    let advice = |step: &str, e: HarnessError| {
        HarnessError::InvalidParameter(format!(
            "cannot create the Python environment at {} ({step}: {e}); the tests need python3 with its venv \
             module (apt-get install python3-venv) and access to PyPI, or set ACME_VENV to an environment \
             with the packages of acme-testkit/python-requirements.txt",
            dir.display()
        ))
    };
    crate::cluster::run(Command::new("python3").arg("-m").arg("venv").arg(dir))
        .map_err(|e| advice("python3 -m venv", e))?;
    crate::cluster::run(
        Command::new(dir.join("bin/pip"))
            .args(["install", "-q", "--disable-pip-version-check", "-r"])
            .arg(&requirements),
    )
    .map_err(|e| advice("pip install", e))?;
    if !complete(dir) {
        return Err(advice("checking", HarnessError::InvalidParameter("a package does not import".into())));
    }
    Ok(())
}

/// A moto S3 API server on a free loopback port, stopped when dropped or when this process ends.
#[derive(Debug)]
pub struct MotoServer {
    child: Child,
    port: u16,
}

impl MotoServer {
    /// Start `moto_server` from the virtual environment.
    pub fn start() -> Result<Self> {
        python()?;
        let exe = venv().join("bin/moto_server");
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(|source| HarnessError::Io { what: "finding a free port".into(), source })?
            .port();
        let child = Command::new(&exe)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|source| HarnessError::Io { what: format!("starting {}", exe.display()), source })?;
        // Stop the server if this process dies without dropping it.
        let _ = Command::new("sh")
            .args([
                "-c",
                &format!(
                    "while kill -0 {} 2>/dev/null; do sleep 1; done; kill {} 2>/dev/null",
                    std::process::id(),
                    child.id()
                ),
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
        let server = Self { child, port };
        let start = Instant::now();
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            if start.elapsed() > Duration::from_secs(30) {
                return Err(HarnessError::NotReady { port });
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(server)
    }

    /// The endpoint URL.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Create a bucket (an unsigned `PUT /bucket`, which moto accepts).
    pub fn create_bucket(&self, bucket: &str) -> Result<()> {
        let io = |source| HarnessError::Io { what: format!("creating bucket {bucket}"), source };
        let mut stream = TcpStream::connect(("127.0.0.1", self.port)).map_err(io)?;
        let request = format!(
            "PUT /{bucket} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            self.port
        );
        stream.write_all(request.as_bytes()).map_err(io)?;
        let mut response = String::new();
        stream.read_to_string(&mut response).map_err(io)?;
        if response.starts_with("HTTP/1.1 200") || response.starts_with("HTTP/1.0 200") {
            Ok(())
        } else {
            Err(HarnessError::InvalidParameter(format!("moto refused to create bucket {bucket}: {response}")))
        }
    }

    /// object_store S3 options that reach this server.
    pub fn storage_options(&self) -> HashMap<String, String> {
        HashMap::from([
            ("aws_endpoint".to_string(), self.endpoint()),
            ("aws_allow_http".to_string(), "true".to_string()),
            ("aws_region".to_string(), "us-east-1".to_string()),
            ("aws_access_key_id".to_string(), "testing".to_string()),
            ("aws_secret_access_key".to_string(), "testing".to_string()),
        ])
    }
}

impl Drop for MotoServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
