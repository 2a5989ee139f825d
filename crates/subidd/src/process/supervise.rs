//! Watching one process until it ends: its exit through its pidfd (no thread waits for it), its
//! logs kept to their bound meanwhile, and its end recorded. The exit is known in memory at once
//! (so `wait` and `get` never read back `running` for a process that has ended), and written to
//! the database with retries until the disk takes it.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use subid_store::{ProcessRecord, ProcessState};
use subid_sys::logfile::Trimmed;
use subid_sys::{ExitStatus, PidFd};
use tokio::sync::watch;

use super::{Live, ProcessService, lock_map};
use crate::lease::{ProcessOp, now_ms};

/// How often the logs of a running process are trimmed to `log_max_bytes`.
const LOG_TRIM_INTERVAL: Duration = Duration::from_secs(1);
/// The longest pause between two tries to record an exit.
const RECORD_RETRY_MAX: Duration = Duration::from_secs(30);

impl ProcessService {
    /// Watches a process until it ends and records how.
    pub(super) fn supervise(&self, record: ProcessRecord, pidfd: Arc<PidFd>, own_child: bool) {
        let id = record.id.clone();
        let lease_id = record.lease_id;
        let (done_tx, done_rx) = watch::channel(None);
        lock_map(&self.inner.live).insert(
            id.clone(),
            Live {
                lease_id,
                pidfd: Arc::clone(&pidfd),
                done: done_rx,
            },
        );
        let this = self.clone();
        tokio::spawn(async move {
            let status = {
                let exit = wait_exit(&pidfd, own_child);
                tokio::pin!(exit);
                let mut tick = tokio::time::interval(LOG_TRIM_INTERVAL);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tokio::select! {
                        status = &mut exit => break status,
                        _ = tick.tick() => this.trim_logs(&id).await,
                    }
                }
            };
            this.trim_logs_if_over(&id).await;
            let (exit_code, signal) = match status {
                Some(ExitStatus::Exited(code)) => (Some(code), None),
                Some(ExitStatus::Signaled { signal, .. }) => (None, Some(signal)),
                None => (None, None),
            };
            let ended_at = now_ms();
            // Known now: waiters and readers get it from memory until it is on disk.
            let _ = done_tx.send(Some(ProcessRecord {
                state: ProcessState::Exited,
                exit_code,
                signal,
                ended_at: Some(ended_at),
                ..record
            }));
            let op = ProcessOp::Finish {
                id: id.clone(),
                state: ProcessState::Exited,
                exit_code,
                signal,
                ended_at,
            };
            let mut pause = Duration::from_millis(200);
            let mut attempt = 0u32;
            loop {
                match this.inner.leases.record_process(&op).await {
                    Ok(()) => break,
                    Err(error) => {
                        attempt += 1;
                        tracing::warn!(%id, %error, attempt, "cannot record exit status; retrying");
                        tokio::time::sleep(pause).await;
                        pause = (pause * 2).min(RECORD_RETRY_MAX);
                    }
                }
            }
            lock_map(&this.inner.live).remove(&id);
        });
    }

    /// Trims the logs only when one is over the limit (a stat each, no thread hop otherwise).
    async fn trim_logs_if_over(&self, id: &str) {
        let max = self.inner.config.log_max_bytes;
        let over = ["stdout", "stderr"]
            .iter()
            .any(|s| std::fs::metadata(self.log_path(id, s)).is_ok_and(|m| m.len() > max));
        if over {
            self.trim_logs(id).await;
        }
    }

    /// Trims both log files of a process to their last `log_max_bytes`.
    async fn trim_logs(&self, id: &str) {
        let max = self.inner.config.log_max_bytes;
        for stream in ["stdout", "stderr"] {
            let path = self.log_path(id, stream);
            let done = tokio::task::spawn_blocking(move || trim_log(&path, max)).await;
            if let Ok(Err(error)) = done {
                tracing::warn!(%id, stream, %error, "cannot trim log file");
            }
        }
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

/// Keeps at least the last `max` bytes of a log file: whole blocks are cut from its head in one
/// step where the filesystem can (nothing the process appends meanwhile is lost; see
/// `subid_sys::logfile`); elsewhere copy-truncate, as logrotate does (bytes appended during the
/// copy can be lost).
fn trim_log(path: &Path, max: u64) -> std::io::Result<()> {
    use std::io::{Read, Seek, SeekFrom, Write};
    match subid_sys::logfile::trim_head(path, max) {
        Ok(Trimmed::Nothing | Trimmed::Collapsed(_)) => return Ok(()),
        Ok(Trimmed::Unsupported) => {}
        Err(error) => return Err(std::io::Error::other(error)),
    }
    let mut file = match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
    {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    let len = file.metadata()?.len();
    if len <= max {
        return Ok(());
    }
    file.seek(SeekFrom::Start(len - max))?;
    let mut tail = Vec::with_capacity(usize::try_from(max).unwrap_or(0));
    (&mut file).take(max).read_to_end(&mut tail)?;
    file.set_len(0)?;
    file.seek(SeekFrom::Start(0))?;
    file.write_all(&tail)?;
    Ok(())
}
