//! Kills aimed at every stage. The `sync` and `vacuum` programs run as child processes with a
//! failpoint armed (`ACME_FAILPOINT`, see `acme_core::failpoint`): each stops exactly where its
//! failpoint names and gets a real SIGKILL there. The stages: mid-COPY, between the raw tables'
//! commits of a round, mid-commit-round, between a commit and the slot's confirmation,
//! mid-compaction, mid-model-step, mid-aggregate update and mid-vacuum, each hit on purpose and
//! counted, while the live workload writes.
//!
//! After the kills, one more run completes. Then the reports (now and as of instants), every
//! history and every star table are checked: the reports against PostgreSQL and against a
//! row-by-row replay of the raw changes, the histories against the replay's versions, and the
//! star tables against a full rebuild of a copy of the raw layer.
//!
//! The order of the kills comes from a seeded generator (`ACME_KILLS_SEED`, printed).

mod support;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use acme::model::ModelBuild;
use acme::query::Warehouse;
use acme_testkit::WorkloadConfig;
use acme_testkit::rng::SplitMix64;

/// The failpoints of `sync`, how many kills each gets, and the highest `@n` hit used.
const SYNC_STAGES: [(&str, usize, u64); 6] = [
    ("cdc.table_committed", 6, 6),
    ("cdc.commit_round", 10, 4),
    ("cdc.committed", 10, 4),
    ("model.step", 12, 6),
    ("model.aggregate", 6, 2),
    ("compaction", 6, 2),
];
/// Kills mid-COPY (each restarts the snapshot) and mid-vacuum.
const SNAPSHOT_KILLS: u64 = 4;
const VACUUM_KILLS: usize = 3;
/// The longest a child may take to reach its failpoint.
const REACH_TIMEOUT: Duration = Duration::from_secs(120);

/// How a child run with an armed failpoint ended.
#[derive(Debug, PartialEq)]
enum Outcome {
    /// It reached the failpoint and was killed there.
    Killed,
    /// It exited first (with this code).
    Exited(Option<i32>),
}

/// Run `program` with `args` and failpoint `point` armed; SIGKILL it once it says it reached
/// the failpoint. Its output goes to `log`.
fn kill_at(program: &Path, args: &[&str], point: &str, log: &Path) -> Outcome {
    use std::io::Write;
    let mut log = std::fs::OpenOptions::new().create(true).append(true).open(log).expect("log file");
    writeln!(log, "== {} {} with {point}", program.display(), args.join(" ")).expect("log");
    let mut child = Command::new(program)
        .args(args)
        .env(acme::core::failpoint::ENV, point)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the program");
    let stderr = child.stderr.take().expect("stderr");
    let (lines, received) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if lines.send(line).is_err() {
                break;
            }
        }
    });
    let started = Instant::now();
    loop {
        match received.recv_timeout(Duration::from_millis(200)) {
            Ok(line) => {
                writeln!(log, "{line}").expect("log");
                if line.starts_with("acme failpoint ") {
                    child.kill().expect("SIGKILL");
                    child.wait().expect("reap");
                    return Outcome::Killed;
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                if let Some(status) = child.try_wait().expect("child status") {
                    return Outcome::Exited(status.code());
                }
                if started.elapsed() > REACH_TIMEOUT {
                    child.kill().expect("SIGKILL");
                    child.wait().expect("reap");
                    panic!("{} did not reach failpoint {point} within {REACH_TIMEOUT:?}", program.display());
                }
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                let status = child.wait().expect("child status");
                return Outcome::Exited(status.code());
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kills_aimed_at_every_stage_lose_nothing_and_double_nothing() {
    let seed: u64 = std::env::var("ACME_KILLS_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(7301);
    println!("kills seed {seed} (ACME_KILLS_SEED)");
    let url = acme_testkit::acme_database("kills", Some((0.005, seed))).await.expect("source");
    let client = acme_testkit::connect(&url).await.expect("connect");
    let dir = tempfile::tempdir().expect("tmp");
    let warehouse = dir.path().join("w");
    let warehouse_arg = warehouse.display().to_string();
    let log = dir.path().join("children.log");
    let slot = acme_testkit::slot_for(&url);
    // `--fold-ratio 0`: a model build whenever there is a tail, so model steps come often.
    let sync_args: Vec<&str> =
        vec!["--source", &url, "--warehouse", &warehouse_arg, "--slot", &slot, "--fold-ratio", "0"];
    let sync = support::sync_binary();
    let vacuum = support::example_binary("vacuum");
    let vacuum_args = ["--warehouse", &warehouse_arg, "--retention-hours", "0"];

    // The workload writes during every kill after the snapshot's.
    let writer = {
        let url = url.clone();
        tokio::spawn(async move {
            let workload = WorkloadConfig {
                seed: seed + 1,
                rate_tps: 150.0,
                transactions: None,
                duration: Some(Duration::from_secs(3600)),
                ..WorkloadConfig::default()
            };
            acme_testkit::run_workload(&url, &workload).await
        })
    };

    let mut rng = SplitMix64::new(seed);
    let mut kills: Vec<(String, usize)> = Vec::new();
    let record = |stage: &str, outcome: Outcome, kills: &mut Vec<(String, usize)>| {
        if outcome != Outcome::Killed {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(20).collect();
            panic!("seed {seed}: {stage} was not reached ({outcome:?}); the child's last lines:\n{}", tail.join("\n"));
        }
        match kills.iter_mut().find(|(s, _)| s == stage) {
            Some((_, n)) => *n += 1,
            None => kills.push((stage.to_string(), 1)),
        }
    };
    // Mid-COPY: every run restarts the unfinished snapshot.
    for _ in 0..SNAPSHOT_KILLS {
        let point = format!("snapshot.copy@{}", rng.range(1, 4));
        let args: Vec<String> = sync_args.iter().map(|s| s.to_string()).collect();
        let (sync, log) = (sync.clone(), log.clone());
        let outcome = tokio::task::spawn_blocking(move || {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            kill_at(&sync, &args, &point, &log)
        })
        .await
        .expect("child");
        record("snapshot.copy", outcome, &mut kills);
    }
    // The other stages in a seeded order, the vacuum kills once builds and compactions have
    // left files to delete.
    let mut schedule: Vec<(&str, u64)> = Vec::new();
    for (stage, count, highest) in SYNC_STAGES {
        for _ in 0..count {
            schedule.push((stage, rng.range(1, highest + 1)));
        }
    }
    for i in (1..schedule.len()).rev() {
        schedule.swap(i, rng.range(0, i as u64 + 1) as usize);
    }
    for i in 0..VACUUM_KILLS {
        schedule.insert(20 + i * 10, ("vacuum", 1));
    }
    for (stage, nth) in schedule {
        let point = format!("{stage}@{nth}");
        let (program, args): (std::path::PathBuf, Vec<String>) = if stage == "vacuum" {
            (vacuum.clone(), vacuum_args.iter().map(|s| s.to_string()).collect())
        } else {
            (sync.clone(), sync_args.iter().map(|s| s.to_string()).collect())
        };
        let log = log.clone();
        let outcome = tokio::task::spawn_blocking(move || {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            kill_at(&program, &args, &point, &log)
        })
        .await
        .expect("child");
        record(stage, outcome, &mut kills);
    }
    writer.abort();
    let _ = writer.await;
    // The workload's connections close (a transaction in flight rolls back, or commits) before
    // the last run starts, so that it captures everything PostgreSQL answers with afterwards.
    let others = "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() \
                  AND backend_type = 'client backend' AND pid <> pg_backend_pid()";
    let deadline = Instant::now() + Duration::from_secs(30);
    while client.query_one(others, &[]).await.expect("sessions").get::<_, i64>(0) > 0 {
        assert!(Instant::now() < deadline, "seed {seed}: the workload's sessions did not close");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let total: usize = kills.iter().map(|(_, n)| n).sum();
    println!("seed {seed}: {total} kills: {kills:?}");
    assert!(total >= 50, "at least 50 kills, every stage on purpose: {kills:?}");

    // The next run completes.
    let output = Command::new(&sync).args(&sync_args).arg("--once").output().expect("sync --once");
    assert!(
        output.status.success(),
        "seed {seed}: the run after the kills: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let w = Warehouse::open(&warehouse_arg).await.expect("open");

    // Reports now: PostgreSQL, the replay of the raw layer, acme.
    let now = acme_testkit::oracle::source_reports(&client, 3).await.expect("oracle");
    let replay = support::replay(&w).await;
    let replayed = replay.reports(None, 3);
    for (i, name) in acme_testkit::oracle::REPORTS.iter().enumerate() {
        let missing: Vec<&String> = now[i].iter().filter(|r| !replayed[i].contains(r)).take(5).collect();
        let extra: Vec<&String> = replayed[i].iter().filter(|r| !now[i].contains(r)).take(5).collect();
        assert!(
            replayed[i] == now[i],
            "seed {seed}: {name} from the replay of the raw layer vs PostgreSQL: missing {missing:?}, extra {extra:?}"
        );
    }
    assert_eq!(support::reports(&w, 3).await, now, "seed {seed}: acme vs PostgreSQL");
    // Reports as of instants spread over the history.
    let times = replay.commit_times();
    assert!(times.len() > 100, "seed {seed}: {} commits", times.len());
    for _ in 0..8 {
        let t = times[rng.range(0, times.len() as u64) as usize];
        let at = chrono::DateTime::from_timestamp_micros(t).expect("instant");
        assert_eq!(
            support::reports_as_of(&w, 3, Some(at)).await,
            replay.reports(Some(t), 3),
            "seed {seed}: as of {at}"
        );
    }
    // Every history against the replay's versions.
    support::assert_histories(&w, &replay, &format!("seed {seed}, after the kills")).await;
    // Every model table against a full rebuild of a copy of the raw layer.
    let full = tempfile::tempdir().expect("tmp");
    acme_testkit::copy_dir(&warehouse.join("raw"), &full.path().join("raw")).expect("copy raw");
    acme_testkit::copy_dir(&warehouse.join("_acme"), &full.path().join("_acme")).expect("copy _acme");
    std::fs::remove_file(full.path().join("_acme").join("model.json")).expect("model manifest");
    let full_config = support::config(&url, full.path());
    ModelBuild::new(full_config.clone()).await.expect("full rebuild");
    let rebuilt = Warehouse::open(&full_config.storage_url).await.expect("open rebuilt");
    // The histories and the presentation tables, as the build lists them.
    let model_tables = ModelBuild::new(full_config.clone()).model_tables();
    for (_, table) in &model_tables {
        let sql = format!("SELECT * FROM model.{table}");
        let (mut ours, mut theirs) = (render(&w, &sql).await, render(&rebuilt, &sql).await);
        ours.sort();
        theirs.sort();
        assert_eq!(ours.len(), theirs.len(), "seed {seed}: {table} rows after the kills vs a full rebuild");
        let only_ours: Vec<&String> = ours.iter().filter(|r| !theirs.contains(r)).take(4).collect();
        let only_theirs: Vec<&String> = theirs.iter().filter(|r| !ours.contains(r)).take(4).collect();
        assert!(
            ours == theirs,
            "seed {seed}: {table} after the kills differs from a full rebuild: {only_ours:?} against {only_theirs:?}"
        );
    }
}

/// The rows of `sql`, rendered like the oracle's.
async fn render(w: &Warehouse, sql: &str) -> Vec<String> {
    let batches = w.sql(sql).await.expect("query").collect().await.expect("collect");
    acme_testkit::oracle::render_batches(&batches).expect("render")
}
