//! A fleet of hosts sharing one lease store (PostgreSQL): the task that keeps this host in
//! step with the others, and the interface it needs from the process service.
//!
//! Every lease-writing commit of any host notifies the others (LISTEN/NOTIFY); the task also
//! looks every `store.poll_interval_ms` in case a notification was lost (a dropped session).
//! Each turn it:
//! 1. reads the block rows and claims other hosts changed into the allocator;
//! 2. wakes the event publisher (the feed is the fleet's);
//! 3. carries out releases: for every lease where this host has state and that is released or
//!    whose forced release waits, it stops the lease's processes here ([`LocalProcesses`]),
//!    cleans up, and says so, which completes the release when it was the last host;
//! 4. says when this host has no live processes of a lease any more;
//! 5. completes releases no host holds up any more (a host that stopped them and died before
//!    saying so is covered by the others);
//! 6. copies this host's process events into the fleet's feed, publishes its pool claims when
//!    they changed, brings its copies of leases up to date, and tells the store about spawns
//!    it missed while out of reach.
//!
//! So a forced release on one host is carried out by another within one notification, or at
//! the latest one poll interval, plus the time to stop the processes (`kill_grace_ms`).

use std::future::Future;
use std::time::Duration;

use subid_store::LeaseRecord;

use crate::lease::LeaseService;
use crate::service_error::ServiceError;

/// What the fleet task needs from the process service of this host.
pub trait LocalProcesses: Clone + Send + Sync + 'static {
    /// Whether this host has live processes of the lease (cheap enough to ask every turn for
    /// each lease this host said it has processes of).
    fn local_live(&self, lease: &LeaseRecord) -> impl Future<Output = bool> + Send;

    /// Stops this host's processes of a lease that is released or being released elsewhere
    /// (SIGTERM, SIGKILL after the grace period), and removes what the host had of it (pins,
    /// cgroup, log files), leaving alone whatever belongs to a newer lease of the same name.
    fn stop_local(
        &self,
        lease: &LeaseRecord,
    ) -> impl Future<Output = Result<(), ServiceError>> + Send;
}

/// Keeps this host in step with the fleet; runs until the task is aborted. Does nothing with
/// the SQLite store.
pub async fn run(leases: LeaseService, local: impl LocalProcesses, poll: Duration) {
    let Some(me) = leases.host_id().map(str::to_string) else {
        return;
    };
    let store = leases.store().clone();
    let mut listener = None;
    loop {
        turn(&leases, &local).await;
        // Under a storm of commits, turns come at most every MIN_GAP: one turn handles
        // everything committed before it.
        tokio::time::sleep(MIN_GAP).await;
        if listener.is_none() {
            match store.listen().await {
                Ok(found) => listener = found,
                Err(error) => {
                    tracing::debug!(%error, "cannot listen for the fleet's commits; polling")
                }
            }
        }
        // Wait for another host's commit, or the poll interval.
        let deadline = tokio::time::Instant::now() + poll;
        while let Some(notifications) = &mut listener {
            tokio::select! {
                result = notifications.next() => match result {
                    // This host's own commits need no turn.
                    Ok(host) if host == me => continue,
                    Ok(_) => break,
                    Err(error) => {
                        tracing::debug!(%error, "the listening session ended; listening again");
                        listener = None;
                    }
                },
                () = tokio::time::sleep_until(deadline) => break,
            }
        }
        match &mut listener {
            // What else arrived meanwhile is handled by the same turn.
            Some(notifications) => {
                while let Ok(Ok(_)) =
                    tokio::time::timeout(Duration::from_millis(1), notifications.next()).await
                {
                }
            }
            None => tokio::time::sleep_until(deadline).await,
        }
    }
}

/// The shortest time between two turns.
const MIN_GAP: Duration = Duration::from_millis(100);

/// One turn (see the module docs). Failures are logged and the step retried next turn.
async fn turn(leases: &LeaseService, local: &impl LocalProcesses) {
    if let Err(error) = leases.catch_up().await {
        tracing::debug!(%error, "cannot read other hosts' changes");
        return;
    }
    leases.tell_untold().await;
    let store = leases.store();
    // Releases to carry out here.
    match store.to_clean_up().await {
        Ok(due) => {
            for lease in due {
                let name = lease.name.clone();
                match local.stop_local(&lease).await {
                    Ok(()) => match leases.cleaned_up(&lease).await {
                        Ok(()) => {
                            tracing::info!(lease = %name, "stopped and cleaned up what this host had of a lease released in the fleet")
                        }
                        Err(error) => {
                            tracing::warn!(lease = %name, %error, "cannot tell the store this host cleaned up")
                        }
                    },
                    Err(error) => {
                        tracing::warn!(lease = %name, %error, "cannot stop this host's processes of a released lease; retrying")
                    }
                }
            }
        }
        Err(error) => tracing::debug!(%error, "cannot read the releases to carry out"),
    }
    // Leases this host has no live processes of any more.
    match store.live_here().await {
        Ok(live) => {
            for lease in live {
                if let Err(error) = leases.unset_live_if(&lease, local.local_live(&lease)).await {
                    tracing::debug!(lease = %lease.name, %error, "cannot tell the store");
                }
            }
        }
        Err(error) => tracing::debug!(%error, "cannot read where this host has processes"),
    }
    // Releases nobody holds up any more.
    match store.releasable().await {
        Ok(ids) => {
            for id in ids {
                if let Err(error) = leases.complete_release(id).await {
                    tracing::debug!(lease_id = id, %error, "cannot complete a release");
                }
            }
        }
        Err(error) => tracing::debug!(%error, "cannot read the releases due"),
    }
    loop {
        match leases.forward_events().await {
            Ok(n) if n > 0 => continue,
            Ok(_) => break,
            Err(error) => {
                tracing::debug!(%error, "cannot copy process events into the fleet's feed");
                break;
            }
        }
    }
    if let Err(error) = leases.publish_claims().await {
        tracing::debug!(%error, "cannot publish this host's pool claims");
    }
    if let Err(error) = leases.refresh_copies().await {
        tracing::debug!(%error, "cannot refresh this host's lease copies");
    }
}
