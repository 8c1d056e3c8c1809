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
