//! Work spread over the runtime's worker threads: a future that would otherwise run in the
//! task that polls it (a Parquet read, a single-partition DataFusion plan) in a task of its own.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let task = acme_core::task::OwnedTask::spawn(async { 6 * 7 });
//! assert_eq!(task.join().await, Some(42));
//! # }
//! ```

use std::future::Future;

/// A task spawned on the current tokio runtime and aborted when dropped before it finished,
/// so that work a caller gave up on (a dropped refresh step) does not run on.
pub struct OwnedTask<T>(tokio::task::JoinHandle<T>);

impl<T: Send + 'static> OwnedTask<T> {
    /// Spawn `work` on the current runtime. Panics outside a tokio runtime, as
    /// `tokio::spawn` does.
    pub fn spawn(work: impl Future<Output = T> + Send + 'static) -> Self {
        OwnedTask(tokio::spawn(work))
    }

    /// Whether the task has finished (its output, or its panic, is ready for [`OwnedTask::join`]).
    pub fn is_finished(&self) -> bool {
        self.0.is_finished()
    }

    /// The task's output. A panic in the task resumes in the caller; `None` when the runtime
    /// cancelled the task (it is shutting down).
    pub async fn join(mut self) -> Option<T> {
        match (&mut self.0).await {
            Ok(output) => Some(output),
            Err(error) if error.is_panic() => std::panic::resume_unwind(error.into_panic()),
            Err(_) => None,
        }
    }
}

impl<T> Drop for OwnedTask<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}
