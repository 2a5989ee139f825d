//! Running blocking work from async code without a hop to another thread when the runtime
//! allows it.
//!
//! On these VMs each wake of another thread costs 0.05-0.3 ms after an idle spell, so a short
//! blocking step (a `/proc` scan, a spawn's clone-to-exec handshake) is cheaper run in place:
//! on tokio's multi-threaded runtime `block_in_place` hands this worker's other tasks to another
//! thread and runs the step here, and the task goes on on this thread afterwards. Elsewhere (a
//! current-thread runtime, as in some tests) the step goes to the blocking pool.

use tokio::runtime::{Handle, RuntimeFlavor};
use tokio::task::JoinError;

/// Whether this runs on tokio's multi-threaded runtime (the daemon's), where a task may block
/// in place.
pub fn in_place() -> bool {
    Handle::current().runtime_flavor() == RuntimeFlavor::MultiThread
}

/// Runs `f`, which may block, in place when the runtime allows it (see the module docs), else
/// on the blocking pool. No await comes between the caller and `f` in place, so a caller that
/// is dropped (its client went away) cannot stop `f` half-way there; on the blocking pool `f`
/// runs to its end whatever happens to the caller.
pub async fn run<T, F>(f: F) -> Result<T, JoinError>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    if in_place() {
        Ok(tokio::task::block_in_place(f))
    } else {
        tokio::task::spawn_blocking(f).await
    }
}
