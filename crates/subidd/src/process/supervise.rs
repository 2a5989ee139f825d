//! Watching one process until it ends: its exit through its pidfd (no thread waits for it), and
//! its end recorded. The exit is known in memory at once (so `wait` and `get` never read back
//! `running` for a process that has ended), and written to the database with retries until the
//! disk takes it. Its logs are the keeper's (bounded where they are written).

use std::sync::Arc;
use std::time::Duration;

use subid_store::{ProcessEnd, ProcessRecord, ProcessState};
use subid_sys::{ExitStatus, PidFd};
use tokio::sync::watch;

use super::{Live, ProcessService, lock_map};
use crate::lease::{ProcessOp, now_ms};

/// The longest pause between two tries to record an exit.
const RECORD_RETRY_MAX: Duration = Duration::from_secs(30);

impl ProcessService {
    /// Watches a process until it ends and records how.
    pub(super) fn supervise(&self, record: ProcessRecord, pidfd: Arc<PidFd>, own_child: bool) {
        let (done_tx, done_rx) = watch::channel(None);
        self.watch_live(&record, &pidfd, done_rx);
        let this = self.clone();
        tokio::spawn(async move {
            let end = end_of(wait_exit(&pidfd, own_child).await);
            let id = record.id.clone();
            // Known now: waiters and readers get it from memory until it is on disk.
            let _ = done_tx.send(Some(ended(record, &end)));
            this.record_end(id, end).await;
        });
    }

    /// A process that ended and was reaped, but whose end the disk did not take at once: known
    /// in memory (ended) until [`ProcessService::record_end`] gets it written.
    pub(super) fn record_end_later(&self, record: ProcessRecord, pidfd: PidFd, end: ProcessEnd) {
        let id = record.id.clone();
        let (_, done_rx) = watch::channel(Some(ended(record.clone(), &end)));
        self.watch_live(&record, &Arc::new(pidfd), done_rx);
        let this = self.clone();
        tokio::spawn(async move { this.record_end(id, end).await });
    }

    fn watch_live(
        &self,
        record: &ProcessRecord,
        pidfd: &Arc<PidFd>,
        done: watch::Receiver<Option<ProcessRecord>>,
    ) {
        lock_map(&self.inner.live).insert(
            record.id.clone(),
            Live {
                lease_id: record.lease_id,
                pidfd: Arc::clone(pidfd),
                done,
            },
        );
    }

    /// Writes a process's end, with retries until the disk takes it; then forgets the process.
    async fn record_end(&self, id: String, end: ProcessEnd) {
        let op = ProcessOp::Finish {
            id: id.clone(),
            end,
        };
        let mut pause = Duration::from_millis(200);
        let mut attempt = 0u32;
        loop {
            match self.inner.leases.record_process(&op).await {
                Ok(()) => break,
                Err(error) => {
                    attempt += 1;
                    tracing::warn!(%id, %error, attempt, "cannot record exit status; retrying");
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(RECORD_RETRY_MAX);
                }
            }
        }
        lock_map(&self.inner.live).remove(&id);
        // The keeper goes on copying while writers remain (a background child of the
        // process); the daemon's copy of the read ends can go.
        if let Some(logs) = lock_map(&self.inner.logs).as_ref() {
            logs.forget(&id);
        }
    }
}

/// How a process ended, from its status (`None`: an adopted process, whose status cannot be
/// known), as of now.
pub(super) fn end_of(status: Option<ExitStatus>) -> ProcessEnd {
    let (exit_code, signal) = match status {
        Some(ExitStatus::Exited(code)) => (Some(code), None),
        Some(ExitStatus::Signaled { signal, .. }) => (None, Some(signal)),
        None => (None, None),
    };
    ProcessEnd {
        state: ProcessState::Exited,
        exit_code,
        signal,
        ended_at: now_ms(),
    }
}

/// The record of a process after `end`.
pub(super) fn ended(record: ProcessRecord, end: &ProcessEnd) -> ProcessRecord {
    ProcessRecord {
        state: end.state,
        exit_code: end.exit_code,
        signal: end.signal,
        ended_at: Some(end.ended_at),
        ..record
    }
}

/// Waits until the process exits. For our own child, reaps it and returns its status; for an
/// adopted process (a previous daemon's child) the status cannot be known.
async fn wait_exit(pidfd: &Arc<PidFd>, own_child: bool) -> Option<ExitStatus> {
    if let Err(error) = subid_sys::pidfd::exited(Arc::clone(pidfd)).await {
        // Fall back to polling from a thread now and then.
        tracing::warn!(%error, "cannot register pidfd with the reactor; polling");
        loop {
            let p = Arc::clone(pidfd);
            let exited = tokio::task::spawn_blocking(move || p.has_exited().unwrap_or(true))
                .await
                .unwrap_or(true);
            if exited {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    if !own_child {
        return None;
    }
    // It has exited, so reaping does not block.
    pidfd.try_wait().ok().flatten()
}
