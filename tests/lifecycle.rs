//! Lifecycle of the programs: SIGTERM (what a service manager sends) stops `sync` and `serve`
//! cleanly, with exit code 0, and the next run resumes where they stopped.

mod support;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// A started example, killed when dropped, so a failing test leaves no process behind.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// Start example `name` with `args`; its stdout lines arrive on the returned channel.
fn start(name: &str, args: &[&str]) -> (Running, mpsc::Receiver<String>) {
    let mut child = Command::new(support::example_binary(name))
        .args(args)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start the example");
    let stdout = child.stdout.take().expect("stdout");
    let (lines, received) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if lines.send(line).is_err() {
                break;
            }
        }
    });
    (Running(child), received)
}

/// Wait for a line containing `marker`; returns every line seen up to it.
fn wait_for(lines: &mpsc::Receiver<String>, marker: &str, within: Duration) -> Vec<String> {
    let mut seen = Vec::new();
    loop {
        match lines.recv_timeout(within) {
            Ok(line) => {
                let found = line.contains(marker);
                seen.push(line);
                if found {
                    return seen;
                }
            }
            Err(e) => panic!("no line with {marker:?} within {within:?} ({e}); seen:\n{}", seen.join("\n")),
        }
    }
}

/// Send SIGTERM to `child` and wait (at most 60 s) for it to exit; returns its exit code.
fn terminate(child: &mut Running) -> Option<i32> {
    let child = &mut child.0;
    let status = Command::new("kill").args(["-TERM", &child.id().to_string()]).status().expect("kill");
    assert!(status.success(), "kill -TERM");
    for _ in 0..600 {
        if let Some(status) = child.try_wait().expect("wait") {
            return status.code();
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = child.kill();
    panic!("the program did not exit within 60 s of SIGTERM");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_sync_and_serve_cleanly_and_the_next_run_resumes() {
    let url = acme_testkit::acme_database("lifecycle", Some((0.001, 13))).await.expect("source");
    let dir = tempfile::tempdir().expect("tmp");
    let warehouse = dir.path().join("w").display().to_string();
    let slot = acme_testkit::slot_for(&url);
    let client = acme_testkit::connect(&url).await.expect("connect");

    // `sync` runs the pipeline until SIGTERM.
    let (mut sync, lines) = start("sync", &["--source", &url, "--warehouse", &warehouse, "--slot", &slot]);
    wait_for(&lines, "ready after", Duration::from_secs(120));
    client.batch_execute("UPDATE operations.orders SET status = 'COMPLETED' WHERE order_id = 1").await.expect("write");
    assert_eq!(terminate(&mut sync), Some(0), "sync exits with 0 on SIGTERM");
    wait_for(&lines, "stopped; the next run resumes", Duration::from_secs(5));

    // `serve` with the pipeline in-process: ready, then SIGTERM drains and shuts down.
    let port = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port").local_addr().expect("addr").port();
    let addr = format!("127.0.0.1:{port}");
    let (mut serve, lines) =
        start("serve", &["--source", &url, "--warehouse", &warehouse, "--addr", &addr, "--slot", &slot]);
    wait_for(&lines, "serving on", Duration::from_secs(120));
    let ready = http_get(&addr, "/ready");
    assert!(ready.starts_with("HTTP/1.1 200"), "ready after resuming:\n{ready}");
    assert_eq!(terminate(&mut serve), Some(0), "serve exits with 0 on SIGTERM");
    let tail = wait_for(&lines, "pipeline shut down", Duration::from_secs(5));
    assert!(tail.iter().any(|l| l.contains("requests in flight finished")), "{tail:?}");

    // The next run resumes: the update made while sync ran is in the reports.
    let (ok, out) = {
        let output = Command::new(support::sync_binary())
            .args(["--source", &url, "--warehouse", &warehouse, "--slot", &slot, "--once"])
            .output()
            .expect("sync --once");
        (output.status.success(), String::from_utf8_lossy(&output.stdout).into_owned())
    };
    assert!(ok && out.contains("model at raw LSN"), "{out}");
    let w = acme::query::Warehouse::open(&warehouse).await.expect("open");
    assert_eq!(support::reports(&w, 3).await, acme_testkit::oracle::source_reports(&client, 3).await.expect("oracle"));
}

/// A plain HTTP/1.1 GET; returns the whole response.
fn http_get(addr: &str, path: &str) -> String {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).expect("connect");
    write!(stream, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").expect("send");
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("read");
    response
}

/// Run `sync --once` with `args`; returns its exit code and what it printed on stderr.
fn sync_once(args: &[&str]) -> (Option<i32>, String) {
    let output = Command::new(support::sync_binary()).args(args).arg("--once").output().expect("sync --once");
    (output.status.code(), String::from_utf8_lossy(&output.stderr).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exit_codes_tell_a_bad_setting_a_transient_failure_and_an_operator_action_apart() {
    let url = acme_testkit::acme_database("exit_codes", Some((0.001, 17))).await.expect("source");
    let dir = tempfile::tempdir().expect("tmp");
    let warehouse = dir.path().join("w").display().to_string();
    let slot = acme_testkit::slot_for(&url);
    let database = url.rsplit('/').next().expect("database");

    // A bad setting: 2, like a bad command line.
    let (code, err) = sync_once(&["--source", "postgres//nobody@@", "--warehouse", &warehouse]);
    assert_eq!(code, Some(2), "a source URL that does not parse: {err}");
    let (code, err) = sync_once(&["--source", &url, "--warehouse", &warehouse, "--memory-limit-mib", "1"]);
    assert_eq!(code, Some(2), "a memory limit below the minimum: {err}");

    // Nothing listens at the source's address: transient, 75.
    let nowhere = format!("postgres://postgres@127.0.0.1:1/{database}");
    let (code, err) = sync_once(&["--source", &nowhere, "--warehouse", &warehouse, "--slot", &slot]);
    assert_eq!(code, Some(75), "an unreachable source: {err}");

    // A warehouse whose slot was dropped: an operator must re-sync, 78, and the message says so.
    let (code, err) = sync_once(&["--source", &url, "--warehouse", &warehouse, "--slot", &slot]);
    assert_eq!(code, Some(0), "{err}");
    // Another slot name than the warehouse was synced through: a setting to put back, 2; both
    // names given, and no advice to delete anything.
    let (code, err) = sync_once(&["--source", &url, "--warehouse", &warehouse, "--slot", "another_slot"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains(&slot) && err.contains("another_slot") && err.contains("intact"), "{err}");
    assert!(!err.contains("remov") && !err.contains("delet"), "{err}");
    let client = acme_testkit::connect(&url).await.expect("connect");
    let slots: i64 = client
        .query_one("SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'another_slot'", &[])
        .await
        .expect("slots")
        .get(0);
    assert_eq!(slots, 0, "no slot was created under the other name");
    client.execute("SELECT pg_drop_replication_slot($1)", &[&slot]).await.expect("drop the slot");
    let (code, err) = sync_once(&["--source", &url, "--warehouse", &warehouse, "--slot", &slot]);
    assert_eq!(code, Some(78), "a lost slot: {err}");
    assert!(err.contains("re-sync"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_flag_comes_from_the_environment_too_and_storage_options_reach_s3() {
    let url = acme_testkit::acme_database("cli_env", Some((0.001, 19))).await.expect("source");
    let slot = acme_testkit::slot_for(&url);

    let version = Command::new(support::sync_binary()).arg("--version").output().expect("--version");
    let text = String::from_utf8_lossy(&version.stdout);
    assert!(version.status.success() && text.contains(env!("CARGO_PKG_VERSION")), "{text}");

    // A storage option that is not key=value: a usage error that names it.
    let output = Command::new(support::sync_binary())
        .args(["--source", &url, "--warehouse", "/nonexistent", "--storage-option", "aws_region", "--once"])
        .output()
        .expect("sync");
    let err = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{err}");
    assert!(err.contains("aws_region") && err.contains("key=value"), "{err}");

    // The source, the warehouse (on the S3 API server), the slot and the storage options from
    // the environment only: the snapshot and the model land in the bucket.
    let moto = acme_testkit::MotoServer::start().expect("moto S3 server (installed by .ci/run)");
    moto.create_bucket("acme-cli").expect("bucket");
    let options: Vec<String> = moto.storage_options().iter().map(|(k, v)| format!("{k}={v}")).collect();
    let output = Command::new(support::sync_binary())
        .arg("--once")
        .env("ACME_SOURCE", &url)
        .env("ACME_WAREHOUSE", "s3://acme-cli/warehouse")
        .env("ACME_SLOT", &slot)
        .env("ACME_STORAGE_OPTIONS", options.join(","))
        .output()
        .expect("sync");
    let out = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success() && out.contains("model at raw LSN"),
        "{out}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let w = acme::query::Warehouse::open_with_options("s3://acme-cli/warehouse", moto.storage_options())
        .await
        .expect("open on S3");
    let client = acme_testkit::connect(&url).await.expect("connect");
    assert_eq!(support::reports(&w, 3).await, acme_testkit::oracle::source_reports(&client, 3).await.expect("oracle"));

    // `reports` reads the same warehouse with its options from the command line.
    let mut reports = Command::new(support::example_binary("reports"));
    reports.args(["--warehouse", "s3://acme-cli/warehouse", "--format", "json"]);
    for option in &options {
        reports.args(["--storage-option", option]);
    }
    let output = reports.output().expect("reports");
    let json: serde_json::Value = serde_json::from_slice(&output.stdout).expect("JSON");
    assert!(json["open_orders"].as_array().is_some_and(|r| !r.is_empty()), "{json}");

    // Ad-hoc SQL, in the three formats, equal to the source's answer.
    let expected: Vec<(String, i64)> = client
        .query("SELECT status, count(*) FROM operations.orders GROUP BY status ORDER BY status", &[])
        .await
        .expect("source counts")
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let sql = "SELECT status, count(*) AS orders FROM orders_current GROUP BY status ORDER BY status";
    let run = |format: &str| {
        let mut command = Command::new(support::example_binary("reports"));
        command.args(["--warehouse", "s3://acme-cli/warehouse", "--sql", sql, "--format", format]);
        command.env("ACME_STORAGE_OPTIONS", options.join(","));
        let output = command.output().expect("reports --sql");
        assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
        String::from_utf8_lossy(&output.stdout).into_owned()
    };
    let csv = run("csv");
    let mut lines = csv.lines();
    assert_eq!(lines.next(), Some("status,orders"), "{csv}");
    let rows: Vec<(String, i64)> = lines
        .map(|l| l.split_once(',').map(|(s, n)| (s.to_string(), n.parse().expect("count"))).expect("two fields"))
        .collect();
    assert_eq!(rows, expected, "CSV");
    let json: serde_json::Value = serde_json::from_str(&run("json")).expect("JSON rows");
    let rows: Vec<(String, i64)> = json
        .as_array()
        .expect("array")
        .iter()
        .map(|r| (r["status"].as_str().expect("status").to_string(), r["orders"].as_i64().expect("orders")))
        .collect();
    assert_eq!(rows, expected, "JSON");
    let table = run("table");
    assert!(
        expected.iter().all(|(status, n)| table.contains(status.as_str()) && table.contains(&n.to_string())),
        "{table}"
    );
}

/// Run example `name` to its end; returns its exit code, stdout and stderr.
fn run(name: &str, args: &[&str]) -> (Option<i32>, String, String) {
    let output = Command::new(support::example_binary(name))
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .expect("run the example");
    let text = |bytes: &[u8]| String::from_utf8_lossy(bytes).into_owned();
    (output.status.code(), text(&output.stdout), text(&output.stderr))
}

/// What acme can leave in a source: replication slots of the database, publications, capture
/// triggers, and the changelog schema.
async fn source_objects(client: &tokio_postgres::Client) -> Vec<String> {
    let rows = client
        .query(
            "SELECT 'slot ' || slot_name FROM pg_replication_slots WHERE database = current_database() \
             UNION ALL SELECT 'publication ' || pubname FROM pg_publication \
             UNION ALL SELECT 'trigger ' || tgname FROM pg_trigger WHERE tgname LIKE '%\\_capture%' \
             UNION ALL SELECT 'schema ' || nspname FROM pg_namespace WHERE nspname = 'acme_cdc' ORDER BY 1",
            &[],
        )
        .await
        .expect("source objects");
    rows.iter().map(|r| r.get(0)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_leaves_nothing_in_a_source_and_teardown_removes_what_acme_created_only() {
    let url = acme_testkit::acme_database("teardown", Some((0.001, 23))).await.expect("source");
    let client = acme_testkit::connect(&url).await.expect("connect");
    let slot = acme_testkit::slot_for(&url);
    let dir = tempfile::tempdir().expect("tmp");
    let warehouse = |name: &str| dir.path().join(name).display().to_string();
    // The test source comes with the seed's own publication (acme_publication).
    let before = source_objects(&client).await;
    let and = |extra: &[String]| {
        let mut all: Vec<String> = before.iter().cloned().chain(extra.iter().cloned()).collect();
        all.sort();
        all
    };

    // The demo against a user's database: its own slot and publication, removed at the end.
    let (code, out, err) = run("demo", &["--source", &url]);
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(
        out.contains("R1 open orders") && out.contains("removed from the source: replication slot acme_demo_"),
        "{out}"
    );
    assert!(out.contains("removed from the source: publication acme_demo_"), "{out}");
    assert_eq!(source_objects(&client).await, and(&[]), "{out}");
    // And again: nothing from the first run is in the way.
    let (code, out, err) = run("demo", &["--source", &url]);
    assert_eq!(code, Some(0), "{out}{err}");

    // With --keep they stay, and teardown removes them, saying so; a second teardown finds nothing.
    let kept = format!("{slot}_kept");
    let (code, out, err) = run("demo", &["--source", &url, "--slot", &kept, "--keep", "--warehouse", &warehouse("k")]);
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(out.contains(&format!("kept in the source: replication slot {kept}")), "{out}");
    assert_eq!(source_objects(&client).await, and(&[format!("publication {kept}"), format!("slot {kept}")]));
    // The kept warehouse continues with sync under the same names.
    let (code, _, err) = run(
        "sync",
        &["--source", &url, "--warehouse", &warehouse("k"), "--slot", &kept, "--publication", &kept, "--once"],
    );
    assert_eq!(code, Some(0), "{err}");
    let (code, out, err) = run("teardown", &["--source", &url, "--slot", &kept, "--publication", &kept]);
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(out.contains(&format!("removed replication slot {kept}")), "{out}");
    assert!(out.contains(&format!("removed publication {kept}")), "{out}");
    assert_eq!(source_objects(&client).await, and(&[]));
    let (code, out, _) = run("teardown", &["--source", &url, "--slot", &kept, "--publication", &kept]);
    assert_eq!(code, Some(0));
    assert!(out.contains("nothing of acme's"), "{out}");

    // A publication the user made is read, and left in place by teardown, which says why.
    client
        .batch_execute(
            "CREATE PUBLICATION mine FOR TABLE operations.customers, operations.products, operations.orders, \
             operations.order_items",
        )
        .await
        .expect("the user's publication");
    let (code, _, err) = run(
        "sync",
        &["--source", &url, "--warehouse", &warehouse("m"), "--slot", &slot, "--publication", "mine", "--once"],
    );
    assert_eq!(code, Some(0), "{err}");
    // Another publication name than the warehouse streams through: a setting to put back (2),
    // both names given, nothing to delete.
    let (code, _, err) = run(
        "sync",
        &["--source", &url, "--warehouse", &warehouse("m"), "--slot", &slot, "--publication", "other", "--once"],
    );
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("mine") && err.contains("other") && err.contains("intact"), "{err}");
    assert!(!err.contains("remov") && !err.contains("delet"), "{err}");
    // A slot a running acme streams from is not removed: 78, naming the process.
    let (mut sync, lines) =
        start("sync", &["--source", &url, "--warehouse", &warehouse("m"), "--slot", &slot, "--publication", "mine"]);
    wait_for(&lines, "ready after", Duration::from_secs(120));
    // "ready" comes once the model is built; the stream connects just after. Wait for it.
    let mut streaming = false;
    for _ in 0..600 {
        let row = client
            .query_one("SELECT active_pid IS NOT NULL FROM pg_replication_slots WHERE slot_name = $1", &[&slot])
            .await
            .expect("the slot");
        streaming = row.get(0);
        if streaming {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(streaming, "sync did not start streaming from slot {slot} within 60 s");
    let (code, out, err) = run("teardown", &["--source", &url, "--slot", &slot, "--publication", "mine"]);
    assert_eq!(code, Some(78), "{out}{err}");
    assert!(err.contains("in use by server process") && err.contains("stop that process"), "{err}");
    assert_eq!(source_objects(&client).await, and(&["publication mine".to_string(), format!("slot {slot}")]));
    assert_eq!(terminate(&mut sync), Some(0));
    let (code, out, err) = run("teardown", &["--source", &url, "--slot", &slot, "--publication", "mine"]);
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(out.contains(&format!("removed replication slot {slot}")), "{out}");
    assert!(out.contains("kept publication mine (acme did not create it"), "{out}");
    assert_eq!(source_objects(&client).await, and(&["publication mine".to_string()]));

    // The trigger fallback: its triggers on every table, the function, the changelog and its
    // schema are removed.
    let triggers = format!("{slot}_t");
    let (code, _, err) = run(
        "sync",
        &["--source", &url, "--warehouse", &warehouse("t"), "--slot", &triggers, "--cdc-mode", "triggers", "--once"],
    );
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(source_objects(&client).await.iter().filter(|o| o.starts_with("trigger ")).count(), 8);
    let (code, out, err) = run("teardown", &["--source", &url, "--slot", &triggers]);
    assert_eq!(code, Some(0), "{out}{err}");
    for table in ["customers", "products", "orders", "order_items"] {
        assert!(out.contains(&format!("removed trigger {triggers}_capture on operations.{table}")), "{out}");
        assert!(out.contains(&format!("removed trigger {triggers}_capture_truncate on operations.{table}")), "{out}");
    }
    assert!(out.contains(&format!("removed table acme_cdc.{triggers}_changes")), "{out}");
    assert!(out.contains("removed schema acme_cdc"), "{out}");
    assert_eq!(source_objects(&client).await, and(&["publication mine".to_string()]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vacuum_frees_replaced_files_and_pinned_readers_inside_the_retention_keep_reading() {
    let url = acme_testkit::acme_database("vacuum", Some((0.001, 29))).await.expect("source");
    let client = acme_testkit::connect(&url).await.expect("connect");
    let slot = acme_testkit::slot_for(&url);
    let dir = tempfile::tempdir().expect("tmp");
    let warehouse = dir.path().join("w").display().to_string();
    let sync = || run("sync", &["--source", &url, "--warehouse", &warehouse, "--slot", &slot, "--once"]);
    let (code, _, err) = sync();
    assert_eq!(code, Some(0), "{err}");
    // Changes, and a second build that replaces model files.
    client
        .batch_execute(
            "UPDATE operations.orders SET status = 'COMPLETED' WHERE order_id % 7 = 0; \
             UPDATE operations.customers SET customer_name = customer_name || ' (renamed)' WHERE customer_id % 5 = 0",
        )
        .await
        .expect("changes");
    let (code, _, err) = sync();
    assert_eq!(code, Some(0), "{err}");
    let pinned = acme::query::Warehouse::open(&warehouse).await.expect("open");
    let oracle = acme_testkit::oracle::source_reports(&client, 3).await.expect("oracle");
    assert_eq!(support::reports(&pinned, 3).await, oracle);

    // Within an hour nothing the warehouse replaced is old enough: nothing goes.
    let (code, out, err) = run("vacuum", &["--warehouse", &warehouse, "--retention-hours", "1"]);
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(out.contains("vacuum deleted 0 files, 0 bytes"), "{out}");
    // Without retention: a dry run reports the replaced files and deletes none; then they go.
    let (code, dry, err) = run("vacuum", &["--warehouse", &warehouse, "--retention-hours", "0", "--dry-run"]);
    assert_eq!(code, Some(0), "{dry}{err}");
    let total = |out: &str| -> u64 {
        let line = out.lines().find(|l| l.starts_with("vacuum ")).expect("total line");
        let words: Vec<&str> = line.split_whitespace().collect();
        let at = words.iter().position(|w| w.trim_end_matches(',') == "files").expect("a file count");
        words[at - 1].parse().expect("a number of files")
    };
    assert!(total(&dry) > 0, "the second build replaced files:\n{dry}");
    assert_eq!(support::reports(&pinned, 3).await, oracle, "a dry run deletes nothing");
    let (code, out, err) = run("vacuum", &["--warehouse", &warehouse, "--retention-hours", "0"]);
    assert_eq!(code, Some(0), "{out}{err}");
    assert_eq!(total(&out), total(&dry), "{out}");
    // The current state reads the same, and the warehouse goes on.
    let w = acme::query::Warehouse::open(&warehouse).await.expect("open");
    assert_eq!(support::reports(&w, 3).await, oracle);
    client.batch_execute("UPDATE operations.orders SET status = 'PENDING' WHERE order_id = 1").await.expect("write");
    let (code, _, err) = sync();
    assert_eq!(code, Some(0), "{err}");
    let w = acme::query::Warehouse::open(&warehouse).await.expect("open");
    assert_eq!(support::reports(&w, 3).await, acme_testkit::oracle::source_reports(&client, 3).await.expect("oracle"));
    // A warehouse path that does not parse: a usage error.
    let (code, _, err) = run("vacuum", &["--warehouse", "ftp://nowhere/w"]);
    assert_eq!(code, Some(2), "{err}");
}
