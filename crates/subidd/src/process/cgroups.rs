//! The cgroups of leases as the process service keeps them: the parents (prepared at start, and
//! again with the pids hierarchy when the first lease asks for a cap), a lease's cgroups made at
//! its first spawn, the handle a spawn goes through, and the cap's usage.

use std::sync::Arc;

use subid_store::LeaseRecord;
use subid_sys::SysError;
use subid_sys::cgroup::{CgroupHost, CgroupParents, CgroupSummary, LeaseCgroups, SpawnCgroup};

use super::{ProcessService, lock_map};
use crate::service_error::ServiceError;

impl ProcessService {
    /// Prepares the parents of lease cgroups; a host where none can be made is reported here and
    /// every spawn is refused (`cgroups_unavailable`) until it is fixed.
    pub(super) fn prepare_cgroup_parents(
        host: Option<&CgroupHost>,
        configured: Option<&std::path::Path>,
    ) -> Result<Arc<CgroupParents>, String> {
        let host = host.ok_or_else(|| "the cgroup layout could not be read".to_string())?;
        match CgroupParents::prepare(host, configured, false) {
            Ok(parents) => {
                tracing::info!(parent = %parents.track().dir().display(), "lease cgroups go here");
                Ok(Arc::new(parents))
            }
            Err(error) => {
                tracing::error!(%error, "no cgroup can hold the leases' processes; spawns are refused");
                Err(error.to_string())
            }
        }
    }

    /// The parents, with the pids one prepared when `pids` (a lease asks for `pids_max`).
    pub(super) fn cgroup_parents(&self, pids: bool) -> Result<Arc<CgroupParents>, ServiceError> {
        let mut parents = lock_map(&self.inner.cgroup_parents);
        let current = parents
            .get_or_insert_with(|| {
                Self::prepare_cgroup_parents(
                    self.inner.cgroup_host.as_ref(),
                    self.inner.config.cgroup_parent.as_deref(),
                )
            })
            .clone();
        let current = current.map_err(|reason| ServiceError::CgroupsUnavailable {
            reason: format!(
                "processes cannot be held in a cgroup of their lease on this host ({reason}); \
                 the daemon needs a writable cgroup2 hierarchy or a v1 hierarchy with pids"
            ),
        })?;
        if !pids || current.can_cap().is_ok() {
            return Ok(current);
        }
        let host = self
            .inner
            .cgroup_host
            .as_ref()
            .ok_or_else(|| unsupported("the cgroup layout could not be read".into()))?;
        host.require_pids()
            .map_err(|e| unsupported(format!("{e}")))?;
        let prepared =
            CgroupParents::prepare(host, self.inner.config.cgroup_parent.as_deref(), true)
                .map_err(|e| {
                    unsupported(format!(
                        "preparing the cgroup parent failed: {e}; fix cgroup_parent"
                    ))
                })?;
        if let Some(cap) = prepared.cap() {
            tracing::info!(parent = %cap.dir().display(), "capped lease cgroups go here");
        }
        let prepared = Arc::new(prepared);
        *parents = Some(Ok(Arc::clone(&prepared)));
        Ok(prepared)
    }

    /// Refuses, before anything is made, a cap this host cannot honour.
    pub(super) fn check_cap(&self, pids_max: Option<u64>) -> Result<(), ServiceError> {
        if pids_max.is_some() {
            self.cgroup_parents(true)?
                .can_cap()
                .map_err(|e| unsupported(e.to_string()))?;
        }
        Ok(())
    }

    /// The handle the lease's next spawn goes through; its cgroups are made (or opened, after a
    /// restart or a reboot) when the daemon does not hold them yet, with the lease's cap.
    pub(super) fn spawn_cgroup(&self, lease: &LeaseRecord) -> Result<SpawnCgroup, ServiceError> {
        let parents = self.cgroup_parents(lease.pids_max.is_some())?;
        let mut cgroups = lock_map(&self.inner.cgroups);
        if let Some(cgs) = cgroups.get(&lease.id)
            && !cgs.track().path().is_dir()
        {
            // Removed behind the daemon's back: make it again rather than fail spawns.
            tracing::warn!(lease = %lease.name, "the lease's cgroup vanished; making it again");
            cgroups.remove(&lease.id);
        }
        let cgs = held_or_made(&mut cgroups, &parents, lease)?;
        cgs.spawn_handle()
            .map_err(|e| ServiceError::internal(format!("cgroup handle of {}: {e}", lease.name)))
    }

    /// The lease's cgroups for a teardown: those the daemon holds, or those a previous daemon
    /// made; `None` when the lease never had any.
    pub(super) fn take_lease_cgroups(&self, lease: &LeaseRecord) -> Option<LeaseCgroups> {
        if let Some(cgs) = lock_map(&self.inner.cgroups).remove(&lease.id) {
            return Some(cgs);
        }
        let parents = lock_map(&self.inner.cgroup_parents).clone()?.ok()?;
        LeaseCgroups::open_existing(&parents, &lease.name)
    }

    /// Puts back the cgroups of a lease whose teardown stopped short (it stays active).
    pub(super) fn keep_lease_cgroups(&self, lease: &LeaseRecord, cgs: LeaseCgroups) {
        lock_map(&self.inner.cgroups).insert(lease.id, cgs);
    }

    /// `pids.current` (the lease's processes only) and the refused forks of a capped lease.
    pub fn pids_usage(&self, lease: &LeaseRecord) -> Option<(u64, u64)> {
        lock_map(&self.inner.cgroups).get(&lease.id)?.pids_usage()
    }

    /// What the host offers, for `GET /v1/pool`.
    pub fn cgroup_summary(&self) -> Option<CgroupSummary> {
        let host = self.inner.cgroup_host.as_ref()?;
        let mut summary = host.describe();
        let (track, pids) =
            CgroupParents::planned(host, self.inner.config.cgroup_parent.as_deref());
        summary.lease_parent = track;
        summary.pids_parent = pids;
        Some(summary)
    }
}

/// The lease's cgroups as the daemon holds them, made (or opened) with its cap when it does not.
fn held_or_made<'a>(
    cgroups: &'a mut std::collections::HashMap<i64, LeaseCgroups>,
    parents: &CgroupParents,
    lease: &LeaseRecord,
) -> Result<&'a mut LeaseCgroups, ServiceError> {
    match cgroups.entry(lease.id) {
        std::collections::hash_map::Entry::Occupied(held) => Ok(held.into_mut()),
        std::collections::hash_map::Entry::Vacant(slot) => {
            let made = LeaseCgroups::open_or_create(parents, &lease.name, lease.pids_max)
                .map_err(|e| cgroup_error(&lease.name, e))?;
            Ok(slot.insert(made))
        }
    }
}

fn unsupported(reason: String) -> ServiceError {
    ServiceError::PidsUnsupported {
        reason: format!(
            "pids_max cannot be honoured on this host: {reason}; use max_processes (the owner cap) \
         instead"
        ),
    }
}

fn cgroup_error(lease: &str, error: SysError) -> ServiceError {
    match error {
        SysError::Unsupported { reason, .. } => unsupported(reason),
        other => ServiceError::internal(format!("cgroups of {lease}: {other}")),
    }
}
