//! Shared by the root package's tests.

use std::path::{Path, PathBuf};

/// The `sync` example, built by `cargo test` next to the test binaries.
pub fn sync_binary() -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    let dir = exe.parent().and_then(Path::parent).expect("target directory");
    let binary = dir.join("examples").join("sync");
    assert!(
        binary.exists(),
        "{} is missing: run the suite with `cargo test` (it builds the examples)",
        binary.display()
    );
    binary
}
