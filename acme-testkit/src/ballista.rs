//! An Apache Ballista cluster on loopback for tests and benchmarks: one scheduler and
//! executors, each a separate process (acme's `ballista_scheduler` and `ballista_executor`
//! example programs, whose paths the caller gives), stopped when dropped. Each process logs to
//! a file of its own, which failures quote.

use std::fs::File;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::error::{HarnessError, Result};

/// The running processes, and the directory holding their logs.
pub struct BallistaCluster {
    scheduler: Child,
    executors: Vec<Child>,
    port: u16,
    logs: tempfile::TempDir,
}

/// A loopback port that was free when asked (the process given it binds it moments later).
fn free_port() -> Result<u16> {
    let io = |source| HarnessError::Io { what: "finding a free loopback port".into(), source };
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).map_err(io)
}

impl BallistaCluster {
    /// Start the scheduler program `scheduler` and `executors` executors (program `executor`,
    /// `slots` concurrent tasks each), and wait until every executor has registered.
    pub fn start(scheduler: &Path, executor: &Path, executors: usize, slots: usize) -> Result<BallistaCluster> {
        let logs = tempfile::tempdir().map_err(|source| HarnessError::Io { what: "a log directory".into(), source })?;
        let port = free_port()?;
        let dir = logs.path().to_path_buf();
        let log = |name: &str| {
            File::create(dir.join(name)).map_err(|source| HarnessError::Io { what: format!("creating {name}"), source })
        };
        let spawn = |command: &mut Command, what: &str| {
            command.spawn().map_err(|source| HarnessError::Io { what: format!("starting {what}"), source })
        };
        let child = spawn(
            Command::new(scheduler)
                .args(["--port", &port.to_string(), "--external-host", "127.0.0.1"])
                .stdout(Stdio::null())
                .stderr(log("scheduler.log")?),
            &scheduler.display().to_string(),
        )?;
        let mut cluster = BallistaCluster { scheduler: child, executors: Vec::new(), port, logs };
        cluster.wait("the scheduler to listen", |_| TcpStream::connect(("127.0.0.1", port)).is_ok())?;
        for i in 0..executors {
            let work = cluster.logs.path().join(format!("executor-{i}"));
            std::fs::create_dir_all(&work)
                .map_err(|source| HarnessError::Io { what: "an executor work directory".into(), source })?;
            let child = spawn(
                Command::new(executor)
                    .args(["--scheduler-host", "127.0.0.1", "--scheduler-port", &port.to_string()])
                    .args(["--port", &free_port()?.to_string(), "--grpc-port", &free_port()?.to_string()])
                    .args(["--concurrent-tasks", &slots.to_string(), "--work-dir", &work.display().to_string()])
                    .stdout(Stdio::null())
                    .stderr(log(&format!("executor-{i}.log"))?),
                &executor.display().to_string(),
            )?;
            cluster.executors.push(child);
        }
        for i in 0..executors {
            cluster.wait(&format!("executor {i} to register"), |c| {
                c.executor_log(i).contains("Executor registration succeed")
            })?;
        }
        Ok(cluster)
    }

    /// Wait up to a minute for `ready`; fails, quoting the logs, when a process exits first
    /// or time runs out.
    fn wait(&mut self, what: &str, ready: impl Fn(&BallistaCluster) -> bool) -> Result<()> {
        let started = Instant::now();
        while !ready(self) {
            let exited = std::iter::once(&mut self.scheduler)
                .chain(self.executors.iter_mut())
                .any(|c| c.try_wait().ok().flatten().is_some());
            if exited || started.elapsed() > Duration::from_secs(60) {
                return Err(HarnessError::Command {
                    command: format!("waiting for {what}"),
                    output: format!(
                        "{}\n{}",
                        if exited { "a cluster process exited" } else { "timed out after 60 s" },
                        self.all_logs()
                    ),
                });
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(())
    }

    /// The scheduler's URL for clients (`df://127.0.0.1:<port>`).
    pub fn url(&self) -> String {
        format!("df://127.0.0.1:{}", self.port)
    }

    fn log_path(&self, name: &str) -> PathBuf {
        self.logs.path().join(name)
    }

    /// What executor `i` logged so far.
    pub fn executor_log(&self, i: usize) -> String {
        std::fs::read_to_string(self.log_path(&format!("executor-{i}.log"))).unwrap_or_default()
    }

    /// Peak resident memory of executor `i` so far, in MiB (`VmHWM` of `/proc/<pid>/status`;
    /// `None` where that is not readable).
    pub fn executor_peak_rss_mib(&self, i: usize) -> Option<f64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.executors.get(i)?.id())).ok()?;
        let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
        let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kib / 1024.0)
    }

    /// The last lines of every process's log, for failure messages.
    pub fn all_logs(&self) -> String {
        let mut out = String::new();
        let names = std::iter::once("scheduler.log".to_string())
            .chain((0..self.executors.len()).map(|i| format!("executor-{i}.log")));
        for name in names {
            let text = std::fs::read_to_string(self.log_path(&name)).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            out.push_str(&format!("--- {name} (last lines)\n"));
            for line in &lines[lines.len().saturating_sub(40)..] {
                out.push_str(line);
                out.push('\n');
            }
        }
        out
    }
}

impl Drop for BallistaCluster {
    fn drop(&mut self) {
        for child in self.executors.iter_mut().chain(std::iter::once(&mut self.scheduler)) {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
