//! Outside parts for tests: an S3 API server (moto) on loopback and a Python interpreter
//! with DuckDB and pyarrow, both installed by `.ci/run` into a virtual environment.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::error::{HarnessError, Result};

/// Where `.ci/run` puts the Python virtual environment (override with `ACME_VENV`).
pub const DEFAULT_VENV: &str = "/var/tmp/acme-venv";

fn venv() -> PathBuf {
    std::env::var_os("ACME_VENV").map(PathBuf::from).unwrap_or_else(|| PathBuf::from(DEFAULT_VENV))
}

/// The Python interpreter of the virtual environment (with duckdb and pyarrow).
pub fn python() -> Result<PathBuf> {
    let path = venv().join("bin/python");
    if path.is_file() {
        Ok(path)
    } else {
        Err(HarnessError::InvalidParameter(format!(
            "no Python virtual environment at {}: run `bash .ci/run` once, or create it with \
             `python3 -m venv {0} && {0}/bin/pip install 'moto[server]' duckdb pyarrow`, or set ACME_VENV",
            venv().display()
        )))
    }
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
        let exe = venv().join("bin/moto_server");
        if !exe.is_file() {
            python()?;
            return Err(HarnessError::InvalidParameter(format!(
                "{} is missing: pip install 'moto[server]'",
                exe.display()
            )));
        }
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
