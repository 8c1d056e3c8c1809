//! Credentials never reach logs or error messages: the `sync` example runs with a password in
//! its source URL, with every log level on, against bad and good sources.

mod support;

use std::path::Path;
use std::process::Command;

const SECRET: &str = "S3cretPassw0rd-acme";

/// Run `sync --once` on `source`; returns (succeeded, everything it printed).
fn sync_once(source: &str, warehouse: &Path, slot: &str) -> (bool, String) {
    let output = Command::new(support::sync_binary())
        .args(["--source", source, "--warehouse"])
        .arg(warehouse)
        .args(["--slot", slot, "--once"])
        .env("RUST_LOG", "trace")
        .output()
        .expect("run sync");
    let text = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    (output.status.success(), text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passwords_never_appear_in_logs_or_errors() {
    let url = acme_testkit::acme_database("credentials", Some((0.001, 3))).await.expect("source");
    let slot = acme_testkit::slot_for(&url);
    let (host_port, database) = url.trim_start_matches("postgres://postgres@").split_once('/').expect("url");
    let dir = tempfile::tempdir().expect("tmp");
    let bad = [
        // Nothing listens there.
        format!("postgres://acme:{SECRET}@127.0.0.1:1/{database}"),
        // No such database.
        format!("postgres://postgres:{SECRET}@{host_port}/no_such_database"),
        // Not a port.
        format!("postgres://acme:{SECRET}@127.0.0.1:notaport/{database}"),
        // Not a URL at all.
        format!("postgres//acme:{SECRET}@@/{database}?sslmode=sideways"),
    ];
    for (i, source) in bad.iter().enumerate() {
        let (ok, text) = sync_once(source, &dir.path().join(format!("w{i}")), &slot);
        assert!(!ok, "a bad source fails: {source}");
        assert!(!text.contains(SECRET), "the password leaked for a bad source:\n{text}");
        assert!(!text.trim().is_empty(), "the failure says something");
    }
    // A good run, every log level on (the test cluster trusts loopback, so the password is
    // given but never needed).
    let good = format!("postgres://postgres:{SECRET}@{host_port}/{database}");
    let (ok, text) = sync_once(&good, &dir.path().join("good"), &slot);
    assert!(ok, "sync --once succeeds:\n{text}");
    assert!(text.contains("model at raw LSN"), "{text}");
    assert!(!text.contains(SECRET), "the password leaked in a successful run:\n{text}");
}

/// Run `sync --once` on `source` with `env` set (and no password from the environment but
/// what `env` gives); returns (succeeded, everything it printed).
fn sync_once_with(
    source: &str,
    warehouse: &Path,
    slot: &str,
    env: &[(&str, &Path)],
    password: Option<&str>,
) -> (bool, String) {
    let mut command = Command::new(support::sync_binary());
    command
        .args(["--source", source, "--warehouse"])
        .arg(warehouse)
        .args(["--slot", slot, "--once"])
        .env("RUST_LOG", "trace")
        .env_remove("PGPASSWORD")
        .env_remove("PGPASSFILE")
        .env("HOME", warehouse.parent().expect("a parent directory"));
    for (name, value) in env {
        command.env(name, value);
    }
    if let Some(password) = password {
        command.env("PGPASSWORD", password);
    }
    let output = command.output().expect("run sync");
    let text = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    (output.status.success(), text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_that_asks_for_a_password_gets_it_from_pgpassword_or_the_password_file() {
    let url = acme_testkit::acme_database("password_auth", Some((0.001, 5))).await.expect("source");
    let user = format!("pw_{}", std::process::id());
    acme_testkit::PgCluster::shared().add_password_user(&user, SECRET).await.expect("a user with a password");
    let (host_port, database) = url.trim_start_matches("postgres://postgres@").split_once('/').expect("url");
    let source = format!("postgres://{user}@{host_port}/{database}");
    let slot = acme_testkit::slot_for(&url);
    let dir = tempfile::tempdir().expect("tmp");

    // No password anywhere: the server refuses, and the error says so.
    let (ok, text) = sync_once_with(&source, &dir.path().join("none"), &slot, &[], None);
    assert!(!ok, "without a password the source refuses:\n{text}");
    assert!(text.contains("password"), "the error names the missing password:\n{text}");

    // A password file readable by others is ignored, with a warning that says how to fix it.
    let file = dir.path().join("pgpass");
    let (host, port) = host_port.split_once(':').expect("host:port");
    std::fs::write(&file, format!("{host}:{port}:{database}:{user}:{SECRET}\n")).expect("write");
    let mode = |bits| {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(bits)).expect("chmod");
    };
    mode(0o644);
    let (ok, text) = sync_once_with(&source, &dir.path().join("open"), &slot, &[("PGPASSFILE", &file)], None);
    assert!(!ok && text.contains("chmod 0600"), "an open password file is ignored, with a warning:\n{text}");

    // From the password file, once private.
    mode(0o600);
    let (ok, text) = sync_once_with(&source, &dir.path().join("file"), &slot, &[("PGPASSFILE", &file)], None);
    assert!(ok, "the password file's password is used:\n{text}");
    assert!(!text.contains(SECRET), "the password leaked:\n{text}");

    // From PGPASSWORD (the warehouse of the run before: sync resumes it).
    let (ok, text) = sync_once_with(&source, &dir.path().join("file"), &slot, &[], Some(SECRET));
    assert!(ok, "PGPASSWORD's password is used:\n{text}");
    assert!(!text.contains(SECRET), "the password leaked:\n{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_default_log_level_shows_acme_events_and_not_the_delta_libraries_info() {
    let url = acme_testkit::acme_database("default_log", Some((0.001, 7))).await.expect("source");
    let dir = tempfile::tempdir().expect("tmp");
    let output = Command::new(support::sync_binary())
        .args(["--source", &url, "--warehouse"])
        .arg(dir.path().join("w"))
        .args(["--slot", &acme_testkit::slot_for(&url), "--once"])
        .env_remove("RUST_LOG")
        .output()
        .expect("run sync");
    let text = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    assert!(output.status.success(), "{text}");
    assert!(text.contains("initial snapshot complete"), "acme's own events are shown:\n{text}");
    for noise in ["ScanMetadataCompleted", "buoyant_kernel", "deltalake_core"] {
        assert!(!text.contains(noise), "{noise} at the default level:\n{text}");
    }
}
