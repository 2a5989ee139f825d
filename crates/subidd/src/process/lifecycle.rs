//! A lease's life on the process side: creation (with the namespaces it asks for made at
//! once), release (its processes stopped by cgroup first, when forced; refused while any lives
//! otherwise), and expiry (each due lease released on its own, so one slow teardown delays no
//! other lease).

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use subid_store::LeaseRecord;
use subid_sys::{members, userns};

use super::namespaces::ns_spec;
use super::{ProcessService, SIGKILL, SIGTERM, cache_lease, lock_map};
use crate::lease::{Caller, CreateMode, Created, LeaseSpec, ReleaseKind, is_expired, now_ms};
use crate::logs::{STREAMS, log_path};
use crate::service_error::ServiceError;

/// How long removing a released lease's logs may wait for the keeper.
const LOGS_REMOVAL: Duration = Duration::from_secs(10);

/// Most leases torn down at once by the expiry loop.
const EXPIRY_PARALLEL: usize = 8;

impl ProcessService {
    /// Creates (or finds) a lease; a new lease that asks for extra namespaces gets them made and
    /// pinned now, and is released again if that fails, so no half-made lease stays behind.
    pub async fn create_lease(
        &self,
        name: String,
        spec: LeaseSpec,
        mode: CreateMode,
        caller: Caller,
    ) -> Result<Created, ServiceError> {
        let lock = self.lease_lock(&name);
        let _guard = self.exclusive(&lock, &name).await?;
        // Refuse before anything is made: a lease never runs without the cap it asked for.
        self.check_cap(spec.pids_max)?;
        self.forget_lease(&name);
        let done = self
            .inner
            .leases
            .create(name.clone(), spec, mode, caller)
            .await?;
        if done.created && !done.lease.namespaces.is_empty() {
            let pin = self.pin_path(&name);
            let made = match ns_spec(&done.lease) {
                Ok(spec) if spec.extra.mnt => self.private_ns_dir(&name).map(|()| spec),
                other => other,
            };
            let made = match made {
                Err(e) => Err(e),
                Ok(spec) => tokio::task::spawn_blocking(move || userns::create_pinned(&spec, &pin))
                    .await
                    .map_err(|e| ServiceError::internal(format!("namespace thread: {e}")))
                    .and_then(|r| {
                        r.map_err(|e| ServiceError::internal(format!("creating namespaces: {e}")))
                    }),
            };
            if let Err(error) = made {
                self.undo_lease(&name, caller).await;
                return Err(error);
            }
        }
        if done.lease.state == subid_core::LeaseState::Active {
            // Its first spawn, which often follows at once, need not read it back.
            cache_lease(&self.inner.lease_cache, name, done.lease.clone());
        }
        Ok(done)
    }

    /// Releases (and purges) a lease whose set-up failed half-way.
    async fn undo_lease(&self, name: &str, caller: Caller) {
        self.forget_lease(name);
        if let Err(undo) = self
            .inner
            .leases
            .release(name.to_string(), true, caller, ReleaseKind::Delete)
            .await
        {
            tracing::error!(lease = %name, error = %undo, "cannot undo a half-made lease");
        }
    }

    /// Releases a lease. With live processes: `lease_busy`, unless `force`, which sends SIGTERM
    /// to every process of the lease, SIGKILL after the grace period through its cgroup, then
    /// unpins and releases. The range is released only once no process of the lease is left.
    /// An expiry re-reads the lease under its lock first, so a lease renewed meanwhile keeps its
    /// processes.
    pub async fn release(
        &self,
        name: String,
        purge: bool,
        force: bool,
        caller: Caller,
        kind: ReleaseKind,
    ) -> Result<(), ServiceError> {
        let lock = self.lease_lock(&name);
        let guard = self.exclusive(&lock, &name).await?;
        self.forget_lease(&name);
        let lease = self.inner.leases.store().get_lease(&name).await?;
        if kind == ReleaseKind::Expire
            && lease.as_ref().is_none_or(|l| {
                l.state != subid_core::LeaseState::Active || !is_expired(l, now_ms())
            })
        {
            // Renewed (or released) since the expiry pass read it.
            drop(guard);
            self.forget_lock(&name, lock);
            return Ok(());
        }
        let mut logs_of = Vec::new();
        if let Some(lease) = lease.filter(|l| l.state == subid_core::LeaseState::Active) {
            self.teardown(&lease, force).await?;
            logs_of = self.inner.leases.store().lease_processes(lease.id).await?;
        }
        let mut result = self
            .inner
            .leases
            .release(name.clone(), purge, caller, kind)
            .await;
        if matches!(result, Err(ServiceError::StoreFull { .. })) && self.use_reserve().await {
            // The disk was full: the reserve's space lets the release through.
            result = self
                .inner
                .leases
                .release(name.clone(), purge, caller, kind)
                .await;
        }
        self.forget_lease(&name);
        if result.is_ok() {
            // The process rows went with the lease; so do their logs.
            self.remove_logs(&name, logs_of).await;
            self.keep_reserve().await;
        }
        drop(guard);
        self.forget_lock(&name, lock);
        result
    }

    /// Removes the log files of a released lease's processes (on the blocking pool: a lease may
    /// have thousands, and each unlink touches the disk).
    async fn remove_logs(&self, name: &str, processes: Vec<subid_store::ProcessRecord>) {
        let logs = lock_map(&self.inner.logs).clone();
        let log_dir = self.inner.config.log_dir.clone();
        let ids: Vec<String> = processes.into_iter().map(|p| p.id).collect();
        let removed = tokio::task::spawn_blocking(move || {
            let deadline = Instant::now() + LOGS_REMOVAL;
            match logs {
                Some(logs) => logs
                    .remove_files(&ids, deadline)
                    .map(|_| ())
                    .map_err(|e| e.to_string()),
                None => {
                    for id in &ids {
                        for stream in STREAMS {
                            let _ = std::fs::remove_file(log_path(&log_dir, id, stream));
                        }
                    }
                    Ok(())
                }
            }
        })
        .await;
        if let Ok(Err(error)) = removed {
            tracing::warn!(lease = %name, %error, "cannot remove every log of the released lease");
        }
    }

    /// Whether any process of the lease lives on this host (for a fleet's task). A lease another
    /// request holds at this moment counts as live: the answer is asked again on the next turn.
    async fn any_live(&self, lease: &LeaseRecord) -> bool {
        let lock = self.lease_lock(&lease.name);
        // Never waited for: the fleet's turn goes on to the other leases.
        let Ok(guard) = Arc::clone(&lock).try_write_owned() else {
            return true;
        };
        let cgroups = Arc::new(Mutex::new(self.take_lease_cgroups(lease)));
        let live = !self.live_processes(lease, &cgroups).await.is_empty();
        self.restore_cgroups(lease, &cgroups);
        drop(guard);
        self.forget_lock(&lease.name, lock);
        live
    }

    /// Stops this host's processes of a lease that is released, or being released, on another
    /// host of a fleet, and removes its pins, cgroups and logs. A newer active lease of the same
    /// name owns the name's pin and cgroup: then only this lease's logs go.
    async fn stop_here(&self, lease: &LeaseRecord) -> Result<(), ServiceError> {
        let lock = self.lease_lock(&lease.name);
        let guard = self.exclusive(&lock, &lease.name).await?;
        self.forget_lease(&lease.name);
        let newer = match self.inner.leases.store().get_lease(&lease.name).await {
            Ok(Some(now)) => now.id != lease.id && now.state == subid_core::LeaseState::Active,
            Ok(None) => false,
            Err(error) => return Err(ServiceError::from(error)),
        };
        let stopped = if newer {
            Ok(())
        } else {
            self.teardown(lease, true).await
        };
        let logs = self
            .inner
            .leases
            .store()
            .lease_processes(lease.id)
            .await
            .unwrap_or_default();
        drop(guard);
        self.forget_lock(&lease.name, lock);
        stopped?;
        self.remove_logs(&lease.name, logs).await;
        Ok(())
    }

    /// Makes the release reserve again where there is room (see `subid_sys::reserve`).
    pub(super) async fn keep_reserve(&self) {
        let this = self.clone();
        let made = tokio::task::spawn_blocking(move || this.inner.reserve.ensure()).await;
        if let Ok(Err(error)) = made {
            tracing::warn!(%error, "no room for the release reserve; a release on a full disk may fail until there is");
        }
    }

    /// Deletes the release reserve so a release can be written on a full disk; false when there
    /// was none.
    async fn use_reserve(&self) -> bool {
        let this = self.clone();
        match tokio::task::spawn_blocking(move || this.inner.reserve.free()).await {
            Ok(Ok(true)) => {
                tracing::warn!("the disk is full: the release reserve is used for a release");
                true
            }
            Ok(Ok(false)) => false,
            Ok(Err(error)) => {
                tracing::error!(%error, "cannot use the release reserve");
                false
            }
            Err(_) => false,
        }
    }

    /// Stops every process of the lease (when `force`), then removes its pins and cgroups.
    /// Refused (`lease_busy`) while any process of the lease lives and not `force`; fails
    /// (`lease_busy`, naming what is left) when processes survive the kill's deadline, and then
    /// everything stays as it is.
    async fn teardown(&self, lease: &LeaseRecord, force: bool) -> Result<(), ServiceError> {
        let cgroups = self.take_lease_cgroups(lease);
        let cgroups = Arc::new(Mutex::new(cgroups));
        let busy = self.live_processes(lease, &cgroups).await;
        if !busy.is_empty() {
            if !force {
                self.restore_cgroups(lease, &cgroups);
                return Err(ServiceError::busy(format!(
                    "lease {} has {} live process(es) (pids {}); stop them or delete with \
                     ?force=true",
                    lease.name,
                    busy.len(),
                    pid_list(&busy)
                )));
            }
            self.signal_all(lease, &cgroups, SIGTERM).await;
            let grace = Instant::now() + self.inner.config.kill_grace;
            while Instant::now() < grace && !self.live_processes(lease, &cgroups).await.is_empty() {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let left = self.kill_all(lease, &cgroups).await;
            if !left.is_empty() {
                self.restore_cgroups(lease, &cgroups);
                return Err(ServiceError::busy(format!(
                    "{} process(es) of lease {} survived SIGKILL for {} s (pids {}); the lease \
                     and its range stay as they are: retry",
                    left.len(),
                    lease.name,
                    subid_sys::cgroup::TEARDOWN_TIMEOUT.as_secs(),
                    pid_list(&left)
                )));
            }
            tracing::info!(lease = %lease.name, "stopped every process of the lease");
        }
        self.unpin(lease)?;
        self.forget_attachments(lease);
        let taken = lock_map(&cgroups).take();
        if let Some(cgs) = taken {
            let removed = tokio::task::spawn_blocking(move || {
                cgs.remove(Instant::now() + subid_sys::cgroup::TEARDOWN_TIMEOUT)
            })
            .await;
            match removed {
                Ok(Ok(())) => {}
                Ok(Err(error)) => {
                    tracing::error!(lease = %lease.name, %error, "cannot remove the lease's cgroups");
                    return Err(ServiceError::internal(format!(
                        "cgroups of {} cannot be removed: {error}",
                        lease.name
                    )));
                }
                Err(error) => {
                    return Err(ServiceError::internal(format!("cgroup removal: {error}")));
                }
            }
        }
        Ok(())
    }

    /// The lease's live processes: its cgroups' members, processes this daemon watches that are
    /// not in them (adopted from a version without a cgroup per lease), and members of its user
    /// namespace started by others (a runtime joining the pinned namespace, an operator's
    /// `nsenter`), which live in cgroups of their own.
    async fn live_processes(
        &self,
        lease: &LeaseRecord,
        cgroups: &Arc<Mutex<Option<subid_sys::cgroup::LeaseCgroups>>>,
    ) -> Vec<i32> {
        let watched: Vec<i32> = lock_map(&self.inner.live)
            .values()
            .filter(|l| l.lease_id == lease.id && l.done.borrow().is_none())
            .map(|l| l.pidfd.pid())
            .collect();
        let cgroups = Arc::clone(cgroups);
        let pin = self.pin_path(&lease.name);
        let found = tokio::task::spawn_blocking(move || {
            let mut pids = lock_map(&cgroups)
                .as_ref()
                .map(|c| c.members().unwrap_or_default())
                .unwrap_or_default();
            if let Some(ino) = pinned_inode(&pin) {
                pids.extend(
                    members::userns_members(ino)
                        .unwrap_or_default()
                        .iter()
                        .map(|m| m.pid()),
                );
            }
            pids
        })
        .await
        .unwrap_or_default();
        let mut all = found;
        all.extend(watched);
        all.extend(self.attached_members(lease));
        all.sort_unstable();
        all.dedup();
        all
    }

    async fn signal_all(
        &self,
        lease: &LeaseRecord,
        cgroups: &Arc<Mutex<Option<subid_sys::cgroup::LeaseCgroups>>>,
        signal: i32,
    ) {
        let cgs = Arc::clone(cgroups);
        let sent =
            tokio::task::spawn_blocking(move || lock_map(&cgs).as_ref().map(|c| c.signal(signal)))
                .await;
        if let Ok(Some(Err(error))) = sent {
            tracing::warn!(lease = %lease.name, %error, "signalling the lease's processes");
        }
        self.signal_namespace(lease, signal).await;
        self.signal_attached(lease, signal);
        for live in lock_map(&self.inner.live).values() {
            if live.lease_id == lease.id {
                let _ = live.pidfd.send_signal(signal);
            }
        }
    }

    /// Kills every process of the lease through its cgroups (and watched processes outside
    /// them through their pidfds), waiting until none is left or the deadline passes; returns
    /// what is left.
    async fn kill_all(
        &self,
        lease: &LeaseRecord,
        cgroups: &Arc<Mutex<Option<subid_sys::cgroup::LeaseCgroups>>>,
    ) -> Vec<i32> {
        let deadline = Instant::now() + subid_sys::cgroup::TEARDOWN_TIMEOUT;
        for live in lock_map(&self.inner.live).values() {
            if live.lease_id == lease.id {
                let _ = live.pidfd.send_signal(SIGKILL);
            }
        }
        let cgs = Arc::clone(cgroups);
        let killed =
            tokio::task::spawn_blocking(move || lock_map(&cgs).as_mut().map(|c| c.kill(deadline)))
                .await;
        let this = self.clone();
        let attached_lease = lease.clone();
        let _ = tokio::task::spawn_blocking(move || this.kill_attached(&attached_lease, deadline))
            .await;
        match killed {
            Ok(Some(Err(error))) => {
                tracing::error!(lease = %lease.name, %error, "the lease's processes survived the kill");
            }
            Err(error) => tracing::error!(lease = %lease.name, %error, "kill task failed"),
            _ => {}
        }
        // Watched processes leave the map once reaped, and members of the namespace outside its
        // cgroups are signalled one by one; give them until the same deadline.
        loop {
            let left = self.live_processes(lease, cgroups).await;
            if left.is_empty() || Instant::now() > deadline {
                return left;
            }
            self.signal_namespace(lease, SIGKILL).await;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Signals the members of the lease's user namespace (each through a pidfd verified to be
    /// a member): processes that joined its pin from outside subidd.
    async fn signal_namespace(&self, lease: &LeaseRecord, signal: i32) {
        let pin = self.pin_path(&lease.name);
        let sent = tokio::task::spawn_blocking(move || {
            pinned_inode(&pin).map(|ino| members::signal_members(ino, signal))
        })
        .await;
        if let Ok(Some(Err(error))) = sent {
            tracing::warn!(lease = %lease.name, %error, "signalling the members of the lease's namespace");
        }
    }

    /// Puts the cgroups of a lease whose teardown stopped short back where spawns find them.
    fn restore_cgroups(
        &self,
        lease: &LeaseRecord,
        cgroups: &Arc<Mutex<Option<subid_sys::cgroup::LeaseCgroups>>>,
    ) {
        if let Some(cgs) = lock_map(cgroups).take() {
            self.keep_lease_cgroups(lease, cgs);
        }
    }

    /// Releases, with force, every lease whose ttl ran out; runs until the daemon stops. Each
    /// due lease is released by a task of its own (at most [`EXPIRY_PARALLEL`] at once), so a
    /// lease whose teardown is slow never delays the others.
    pub async fn run_expiry(self, interval: Duration) {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let in_progress: Arc<Mutex<HashSet<String>>> = Arc::default();
        let permits = Arc::new(tokio::sync::Semaphore::new(EXPIRY_PARALLEL));
        loop {
            tick.tick().await;
            let due = match self.inner.leases.store().expired_leases(now_ms()).await {
                Ok(due) => due,
                Err(error) => {
                    tracing::warn!(%error, "expiry pass cannot read leases; retrying");
                    continue;
                }
            };
            for lease in due {
                let name = lease.name;
                if !lock_map(&in_progress).insert(name.clone()) {
                    continue; // still being released by an earlier pass
                }
                let this = self.clone();
                let in_progress = Arc::clone(&in_progress);
                let permits = Arc::clone(&permits);
                tokio::spawn(async move {
                    let _permit = permits.acquire_owned().await;
                    match this
                        .release(name.clone(), false, true, None, ReleaseKind::Expire)
                        .await
                    {
                        Ok(()) => tracing::info!(lease = %name, "lease expired and released"),
                        Err(error) => {
                            tracing::warn!(lease = %name, %error, "cannot release expired lease")
                        }
                    }
                    lock_map(&in_progress).remove(&name);
                });
            }
        }
    }
}

/// The inode of the user namespace pinned at `pin`, if one is.
fn pinned_inode(pin: &std::path::Path) -> Option<u64> {
    userns::is_pinned(pin)
        .then(|| {
            userns::open_pinned(pin)
                .and_then(|fd| userns::ns_inode(&fd))
                .ok()
        })
        .flatten()
}

/// At most 16 pids, for messages.
fn pid_list(pids: &[i32]) -> String {
    let mut shown: Vec<String> = pids.iter().take(16).map(i32::to_string).collect();
    if pids.len() > 16 {
        shown.push("...".into());
    }
    shown.join(", ")
}

/// What a fleet's task needs from this host's processes (see `crate::fleet`), built on the
/// teardown a forced release uses.
impl crate::fleet::LocalProcesses for ProcessService {
    async fn local_live(&self, lease: &LeaseRecord) -> bool {
        self.any_live(lease).await
    }

    async fn stop_local(&self, lease: &LeaseRecord) -> Result<(), ServiceError> {
        self.stop_here(lease).await
    }
}
