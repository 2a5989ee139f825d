//! The lease service's side of a fleet: which hosts have live processes of a lease, releases
//! that wait for them, this host's claims on the pool, its process events for the fleet's
//! feed, and its copies of leases (what it can still read while the store is out of reach).
//! The task that drives these is `crate::fleet`.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use subid_core::LeaseState;
use subid_store::{FleetClaim, LeaseRecord, ProcessWriter, Store};
use tokio::sync::oneshot;

use super::writer::Command;
use super::{LeaseService, StartError, lock};
use crate::service_error::ServiceError;

/// Key of this host's file's `pool_meta`: the id of the fleet store it belongs to.
const STORE_ID: &str = "store_id";
/// Key of this host's file's `pool_meta`: the last of its events copied into the fleet's feed.
const FORWARDED: &str = "forwarded_event_id";
/// Key of this host's file's `pool_meta`: the newest change of the fleet's leases its copies
/// have seen.
const COPIES_SEQ: &str = "copies_seq";
/// How often this host's copies of leases are brought up to date.
const COPIES_EVERY: Duration = Duration::from_secs(5);
/// Lease changes read per refresh of the copies.
const COPIES_PAGE: u32 = 5000;
/// Events copied into the fleet's feed per transaction.
const FORWARD_PAGE: u32 = 500;

/// How long after a spawn began in a lease this host does not tell the store it has no live
/// processes of it: the spawn's process may not be visible yet.
const SPAWN_GRACE: Duration = Duration::from_secs(5);

/// What the service keeps with a fleet's store.
pub(super) struct FleetSide {
    pub(super) host: String,
    release_wait: Duration,
    /// Leases this host told the store it has live processes of.
    live: Mutex<BTreeSet<i64>>,
    /// When a spawn last began in each lease.
    spawned: Mutex<BTreeMap<i64, Instant>>,
    /// Orders the changes of `live` with the store: a spawn marking a lease live and the fleet
    /// task marking it no longer live never cross.
    transitions: tokio::sync::Mutex<()>,
    /// Leases a spawn could not tell the store about (it was out of reach): told once it answers.
    untold: Mutex<BTreeSet<i64>>,
    /// This host's claims as last published.
    published: Mutex<Option<Vec<FleetClaim>>>,
    /// When the copies of leases were last brought up to date.
    copies_at: Mutex<Option<Instant>>,
}

impl FleetSide {
    pub(super) fn new(host: &str, release_wait: Duration) -> FleetSide {
        FleetSide {
            host: host.to_string(),
            release_wait,
            live: Mutex::new(BTreeSet::new()),
            spawned: Mutex::new(BTreeMap::new()),
            transitions: tokio::sync::Mutex::new(()),
            untold: Mutex::new(BTreeSet::new()),
            published: Mutex::new(None),
            copies_at: Mutex::new(None),
        }
    }
}

/// Refuses to mix a host's file with a store it does not belong to: a file that was a fleet
/// member holds copies of leases, not leases, and a file with leases of its own must be moved
/// in (`subidd --move-in`) before its host joins a fleet. A fresh file joins the fleet.
pub(super) async fn check_membership(
    store: &Store,
    rows: &ProcessWriter,
) -> Result<(), StartError> {
    let local = store.local_meta(STORE_ID).await?;
    let Some(remote) = store.store_id().await? else {
        return match local {
            Some(id) => Err(StartError::Membership(format!(
                "{} belongs to the fleet store {id}: its lease rows are copies of that store's \
                 leases, not leases of this host; set store.url back to that store, or move the \
                 file away to start this host afresh",
                store.path().display()
            ))),
            None => Ok(()),
        };
    };
    match local {
        Some(id) if id == remote => {}
        Some(id) => {
            return Err(StartError::Membership(format!(
                "{} belongs to the fleet store {id}, but store.url names the store {remote}; \
                 point store.url at the store this host belongs to, or move the file away to \
                 join the other one afresh",
                store.path().display()
            )));
        }
        None => {
            if store.local_has_leases().await? {
                return Err(StartError::Membership(format!(
                    "{} holds leases of this host's own, which the fleet store does not have: \
                     copy them into the (empty) fleet store first with `subidd --move-in`, or \
                     move the file away to join the fleet without them",
                    store.path().display()
                )));
            }
            rows.set_meta(STORE_ID, &remote)?;
        }
    }
    if store.local_meta(FORWARDED).await?.is_none() {
        // Events of the file from before it joined are not the fleet's.
        let last = store.local_last_event_id().await?;
        rows.set_meta(FORWARDED, &last.to_string())?;
    }
    Ok(())
}

impl LeaseService {
    /// This host's name in a fleet (`None` with the SQLite store).
    pub fn host_id(&self) -> Option<&str> {
        self.inner.fleet.as_ref().map(|f| f.host.as_str())
    }

    /// Whether the lease store failed to answer when last used.
    pub fn store_down(&self) -> bool {
        self.inner.health.is_down()
    }

    /// Called before a process is started in `lease`. With a fleet's store: keeps this host's
    /// copy of the lease (process rows name it) and, on the lease's first spawn here, tells the
    /// store this host has live processes of it, which is refused for a lease on its way out.
    /// With the store out of reach the spawn goes on (the lease is known active) and the store
    /// is told once it answers. Nothing with SQLite.
    pub async fn spawning(&self, lease: &LeaseRecord) -> Result<(), ServiceError> {
        let Some(side) = &self.inner.fleet else {
            return Ok(());
        };
        let _transition = side.transitions.lock().await;
        lock(&side.spawned).insert(lease.id, Instant::now());
        if lock(&side.live).contains(&lease.id) {
            return Ok(());
        }
        self.keep_copy(lease).await?;
        match self.set_live(lease.id, true).await {
            Ok(true) => Ok(()),
            Ok(false) => Err(ServiceError::Conflict {
                reason: format!(
                    "lease {} is being released or is no longer active; no process is started \
                     in it",
                    lease.name
                ),
            }),
            Err(ServiceError::StoreUnavailable { source }) => {
                tracing::warn!(lease = %lease.name, error = %source, "the lease store cannot be reached; starting the process in the known lease and telling the store once it answers");
                lock(&side.untold).insert(lease.id);
                Ok(())
            }
            Err(error) => Err(error),
        }
    }

    /// Tells the store this host has no live processes of `lease` any more, when `is_live`
    /// (asked under the same order as spawns) says so and no spawn began in it lately. Returns
    /// whether it did.
    pub async fn unset_live_if(
        &self,
        lease: &LeaseRecord,
        is_live: impl std::future::Future<Output = bool>,
    ) -> Result<bool, ServiceError> {
        let Some(side) = &self.inner.fleet else {
            return Ok(false);
        };
        let _transition = side.transitions.lock().await;
        let recent = lock(&side.spawned)
            .get(&lease.id)
            .is_some_and(|at| at.elapsed() < SPAWN_GRACE);
        if recent || is_live.await {
            return Ok(false);
        }
        self.set_live(lease.id, false).await?;
        lock(&side.spawned).remove(&lease.id);
        Ok(true)
    }

    /// Keeps this host's copy of a lease (a fleet only), on the blocking pool.
    async fn keep_copy(&self, lease: &LeaseRecord) -> Result<(), ServiceError> {
        let (rows, copy, now) = (Arc::clone(&self.inner.rows), lease.clone(), self.now_ms());
        tokio::task::spawn_blocking(move || rows.mirror(&copy, now))
            .await
            .map_err(|e| ServiceError::Internal {
                what: "the lease copy thread failed".into(),
                source: Some(Box::new(e)),
            })?
            .map_err(ServiceError::from)
    }

    /// Tells the fleet's store whether this host has live processes of a lease. `live` is
    /// refused (`false`) for a lease that is not active or on its way out.
    pub async fn set_live(&self, lease_id: i64, live: bool) -> Result<bool, ServiceError> {
        let Some(side) = &self.inner.fleet else {
            return Ok(true);
        };
        let (reply, rx) = oneshot::channel();
        self.send(Command::Presence {
            lease_id,
            live,
            reply,
        })
        .await?;
        let accepted = rx.await.map_err(|_| ServiceError::ShuttingDown)??;
        let mut set = lock(&side.live);
        if live && accepted {
            set.insert(lease_id);
        } else if !live {
            set.remove(&lease_id);
        }
        lock(&side.untold).remove(&lease_id);
        Ok(accepted)
    }

    /// Tells the store about the spawns it missed while out of reach.
    pub async fn tell_untold(&self) {
        let Some(side) = &self.inner.fleet else {
            return;
        };
        let untold: Vec<i64> = lock(&side.untold).iter().copied().collect();
        for lease_id in untold {
            match self.set_live(lease_id, true).await {
                Ok(true) => {}
                Ok(false) => {
                    tracing::warn!(
                        lease_id,
                        "processes were started in a lease released while the store was out of reach; they are stopped as the release is carried out"
                    );
                }
                Err(error) => {
                    tracing::debug!(lease_id, %error, "cannot tell the store yet");
                    return;
                }
            }
        }
    }

    /// Reads what other hosts changed (blocks, claims) into the allocator.
    pub async fn catch_up(&self) -> Result<(), ServiceError> {
        if self.inner.fleet.is_none() {
            return Ok(());
        }
        let (reply, rx) = oneshot::channel();
        self.send(Command::CatchUp { reply }).await?;
        rx.await.map_err(|_| ServiceError::ShuttingDown)??;
        // Other hosts' commits added events to the fleet's feed: the publisher reads them now,
        // not at this host's next own commit.
        self.inner.published.notify_one();
        Ok(())
    }

    /// After this host stopped and cleaned up what it had of `lease` (released, or on its way
    /// out): removes its process rows, and tells the store, which completes a waiting release
    /// when this host was the last with live processes.
    pub async fn cleaned_up(&self, lease: &LeaseRecord) -> Result<(), ServiceError> {
        let Some(side) = &self.inner.fleet else {
            return Ok(());
        };
        self.forget_local_processes(lease.id).await?;
        let (reply, rx) = oneshot::channel();
        self.send(Command::ClearPresence {
            lease_id: lease.id,
            reply,
        })
        .await?;
        let released = rx.await.map_err(|_| ServiceError::ShuttingDown)??;
        lock(&side.live).remove(&lease.id);
        if released.is_some() {
            self.inner.published.notify_one();
        }
        Ok(())
    }

    /// Completes the waiting release of a lease if no host has live processes of it any more.
    pub async fn complete_release(&self, lease_id: i64) -> Result<bool, ServiceError> {
        if self.inner.fleet.is_none() {
            return Ok(false);
        }
        let (reply, rx) = oneshot::channel();
        self.send(Command::CompleteRelease { lease_id, reply })
            .await?;
        let released = rx.await.map_err(|_| ServiceError::ShuttingDown)??;
        Ok(released.is_some())
    }

    /// Removes this host's process rows of a lease (a fleet only: with SQLite they go with the
    /// lease in its release's transaction).
    pub async fn forget_local_processes(&self, lease_id: i64) -> Result<(), ServiceError> {
        if self.inner.fleet.is_none() {
            return Ok(());
        }
        let rows = Arc::clone(&self.inner.rows);
        tokio::task::spawn_blocking(move || rows.delete_processes(lease_id))
            .await
            .map_err(|e| ServiceError::Internal {
                what: "the process row thread failed".into(),
                source: Some(Box::new(e)),
            })?
            .map_err(ServiceError::from)
    }

    /// Publishes this host's claims and holds on the pool when they changed since last time.
    pub async fn publish_claims(&self) -> Result<(), ServiceError> {
        let Some(side) = &self.inner.fleet else {
            return Ok(());
        };
        let own = self.own_claims();
        if lock(&side.published).as_ref() == Some(&own) {
            return Ok(());
        }
        let (reply, rx) = oneshot::channel();
        self.send(Command::PublishClaims {
            claims: own.clone(),
            reply,
        })
        .await?;
        rx.await.map_err(|_| ServiceError::ShuttingDown)??;
        *lock(&side.published) = Some(own);
        Ok(())
    }

    /// Copies this host's process events (written by its file's triggers) into the fleet's
    /// feed. Returns how many were copied.
    pub async fn forward_events(&self) -> Result<usize, ServiceError> {
        if self.inner.fleet.is_none() {
            return Ok(0);
        }
        let store = &self.inner.store;
        let after: i64 = store
            .local_meta(FORWARDED)
            .await?
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let events = store.local_events_after(after, FORWARD_PAGE).await?;
        let Some(last) = events.last().map(|e| e.id) else {
            return Ok(0);
        };
        let count = events.len();
        let (reply, rx) = oneshot::channel();
        self.send(Command::ForwardEvents { events, reply }).await?;
        rx.await.map_err(|_| ServiceError::ShuttingDown)??;
        // A crash before this line sends them again; the store keeps each once.
        let rows = Arc::clone(&self.inner.rows);
        tokio::task::spawn_blocking(move || rows.set_meta(FORWARDED, &last.to_string()))
            .await
            .map_err(|e| ServiceError::Internal {
                what: "the process row thread failed".into(),
                source: Some(Box::new(e)),
            })??;
        self.inner.published.notify_one();
        Ok(count)
    }

    /// Brings this host's copies of leases other hosts changed up to date (up to 5000 changes
    /// a call, at most every [`COPIES_EVERY`] unless a backlog is left); returns how many
    /// changes were read. The copies serve reads while the store is out of reach, so they
    /// may lag that much.
    pub async fn refresh_copies(&self) -> Result<usize, ServiceError> {
        let Some(side) = &self.inner.fleet else {
            return Ok(0);
        };
        {
            let mut last = lock(&side.copies_at);
            if last.is_some_and(|at| at.elapsed() < COPIES_EVERY) {
                return Ok(0);
            }
            *last = Some(Instant::now());
        }
        let store = &self.inner.store;
        let after: i64 = store
            .local_meta(COPIES_SEQ)
            .await?
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let changed = store.lease_changes_since(after, COPIES_PAGE).await?;
        let Some(newest) = changed.iter().map(|(_, seq)| *seq).max() else {
            return Ok(0);
        };
        let count = changed.len();
        if count == COPIES_PAGE as usize {
            // A backlog: the next turn goes on at once.
            *lock(&side.copies_at) = None;
        }
        let leases: Vec<LeaseRecord> = changed.into_iter().map(|(l, _)| l).collect();
        let (rows, now) = (Arc::clone(&self.inner.rows), self.now_ms());
        tokio::task::spawn_blocking(move || {
            rows.refresh_mirror(&leases, now)?;
            rows.set_meta(COPIES_SEQ, &newest.to_string())
        })
        .await
        .map_err(|e| ServiceError::Internal {
            what: "the lease copy thread failed".into(),
            source: Some(Box::new(e)),
        })??;
        Ok(count)
    }

    /// Waits for a recorded release to be carried out by the hosts with live processes.
    pub(super) async fn wait_released(
        &self,
        lease: LeaseRecord,
        hosts: Vec<String>,
    ) -> Result<(), ServiceError> {
        let wait = self
            .inner
            .fleet
            .as_ref()
            .map_or(Duration::ZERO, |f| f.release_wait);
        let deadline = Instant::now() + wait;
        loop {
            if let Ok(Some(now)) = self.inner.store.get_lease_by_id(lease.id).await
                && now.state == LeaseState::Released
            {
                self.forget_local_processes(lease.id).await?;
                return Ok(());
            }
            if Instant::now() >= deadline {
                let hosts = match self.inner.store.lease_hosts(lease.id).await {
                    Ok(now) => now.into_iter().filter(|h| h.live).map(|h| h.host).collect(),
                    Err(_) => hosts,
                };
                return Err(ServiceError::ReleasePending {
                    lease: lease.name,
                    hosts,
                });
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}
