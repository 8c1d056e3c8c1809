//! Failpoints: named places where the crash tests stop a process on purpose, so that a kill
//! lands exactly there (mid-COPY, between a commit and the slot's confirmation, mid-compaction,
//! mid-model-step, ...).
//!
//! Compiled in only with the `failpoints` feature, which the workspace's tests and example
//! programs enable (a dev-dependency feature: libraries built for users do not have it, and
//! [`hit`] is then an empty inline function). With the feature, setting
//! `ACME_FAILPOINT=<name>` (or `<name>@<n>`, the n-th time it is reached) makes the process
//! print `acme failpoint <name> reached` on stderr when it gets there, and then wait to be
//! killed: the test sends the real SIGKILL.
//!
//! | name | where |
//! |---|---|
//! | `snapshot.copy` | a snapshot worker sent a batch of a block range to its writer |
//! | `cdc.table_committed` | one raw table of a commit round committed, the others' commits possibly not |
//! | `cdc.commit_round` | a commit round committed its raw tables, before the raw manifest names them |
//! | `cdc.committed` | a poll's commits are durable, before the slot (or changelog) is told |
//! | `compaction` | merged files are written, before the commit that swaps them in |
//! | `model.step` | a model table's new files are written, before its commit |
//! | `model.aggregate` | the aggregate's new files are written, before its commit |
//! | `vacuum` | one table was vacuumed, before the next |

/// The environment variable that arms a failpoint.
pub const ENV: &str = "ACME_FAILPOINT";

/// Reach the failpoint `name`: with the `failpoints` feature and `ACME_FAILPOINT` naming it,
/// stop here until killed.
#[cfg(feature = "failpoints")]
pub fn hit(name: &str) {
    use std::sync::OnceLock;
    use std::sync::atomic::{AtomicU64, Ordering};
    static ARMED: OnceLock<Option<(String, u64)>> = OnceLock::new();
    static HITS: AtomicU64 = AtomicU64::new(0);
    let armed = ARMED.get_or_init(|| {
        let value = std::env::var(ENV).ok()?;
        Some(match value.split_once('@') {
            Some((name, nth)) => (name.to_string(), nth.parse().unwrap_or(1).max(1)),
            None => (value, 1),
        })
    });
    let Some((armed, nth)) = armed else { return };
    if armed != name || HITS.fetch_add(1, Ordering::SeqCst) + 1 != *nth {
        return;
    }
    eprintln!("acme failpoint {name} reached (hit {nth}); waiting to be killed");
    loop {
        std::thread::sleep(std::time::Duration::from_secs(3600));
    }
}

/// Reach the failpoint `name` (without the `failpoints` feature: nothing).
#[cfg(not(feature = "failpoints"))]
#[inline(always)]
pub fn hit(_name: &str) {}
