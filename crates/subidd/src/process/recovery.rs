//! What a start finds: processes a previous daemon started (re-adopted when they are still the
//! same processes, else marked `lost`), the cgroups and pins of leases that are no longer active
//! (their processes killed, then removed), and log files of no recorded process.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex};

use subid_store::{ProcessEnd, ProcessRecord, ProcessState};
use subid_sys::cgroup::{CgroupHost, LeaseCgroup};
use subid_sys::{PidFd, SysError, members, userns};

use super::{Inner, ProcessConfig, ProcessService, TEST_BOOT_ID_ENV, lock_map};
use crate::lease::{LeaseService, ProcessOp, now_ms};
use crate::logs::{KEEPER_SOCKET, remove_orphan_files};

impl ProcessService {
    /// Prepares directories and cgroup parents, then looks at what a previous daemon left (see
    /// the module docs).
    pub async fn start(
        leases: LeaseService,
        config: ProcessConfig,
    ) -> Result<ProcessService, anyhow::Error> {
        std::fs::create_dir_all(&config.ns_dir)?;
        std::fs::create_dir_all(&config.log_dir)?;
        let boot_id = boot_id()?;
        let cgroup_host = match CgroupHost::detect() {
            Ok(host) => {
                let summary = host.describe();
                tracing::info!(mode = summary.mode, tracking = ?summary.tracking_mount, pids = ?summary.pids_version, pids_mount = ?summary.pids_mount, reason = ?summary.reason, "cgroups");
                Some(host)
            }
            Err(error) => {
                tracing::warn!(%error, "cannot read the cgroup layout; spawns are refused");
                None
            }
        };
        // Made by a previous daemon: prepared now, so that its leftovers are found; else with
        // the first spawn (a daemon that never spawns makes no cgroup).
        let parents = cgroup_host
            .as_ref()
            .filter(|host| {
                subid_sys::cgroup::CgroupParents::exist(host, config.cgroup_parent.as_deref())
            })
            .map(|host| Self::prepare_cgroup_parents(Some(host), config.cgroup_parent.as_deref()));
        let reserve =
            subid_sys::reserve::Reserve::new(config.reserve.clone(), super::RELEASE_RESERVE_BYTES);
        let service = ProcessService {
            inner: Arc::new(Inner {
                leases,
                config,
                boot_id,
                spaces: Mutex::new(HashMap::new()),
                locks: Mutex::new(HashMap::new()),
                live: Mutex::new(HashMap::new()),
                cgroup_host,
                cgroup_parents: Mutex::new(parents),
                cgroups: Mutex::new(HashMap::new()),
                lease_cache: Mutex::new(HashMap::new()),
                logs: Mutex::new(None),
                reserve,
                attached: Mutex::new(HashMap::new()),
            }),
        };
        service.keep_reserve().await;
        for row in service.inner.leases.store().running_processes().await? {
            match service.adoptable(&row) {
                Some(pidfd) => {
                    tracing::info!(id = %row.id, pid = row.pid, lease = %row.lease_name, "re-adopted process");
                    service.supervise(row.clone(), Arc::new(pidfd), false);
                }
                None => {
                    tracing::warn!(id = %row.id, pid = row.pid, lease = %row.lease_name, "process vanished while the daemon was away");
                    service
                        .inner
                        .leases
                        .record_process(&ProcessOp::Finish {
                            id: row.id.clone(),
                            end: ProcessEnd {
                                state: ProcessState::Lost,
                                exit_code: None,
                                signal: None,
                                ended_at: now_ms(),
                            },
                        })
                        .await?;
                }
            }
        }
        // A keeper a previous daemon started still holds its processes' pipes: take them back.
        if service
            .inner
            .config
            .runtime_dir
            .join(KEEPER_SOCKET)
            .exists()
        {
            let this = service.clone();
            if let Err(error) = tokio::task::spawn_blocking(move || this.logs()).await? {
                tracing::warn!(%error, "cannot reach or start the log keeper; spawns will try again");
            }
        }
        // Only the leases with attachments are looked up: with many leases, a start must not
        // read every lease record.
        let mut active = std::collections::BTreeMap::new();
        let names = service.active_names().await?;
        for name in service.attached_names() {
            if names.contains(&name)
                && let Some(lease) = service.inner.leases.store().get_lease(&name).await?
            {
                active.insert(name, lease.id);
            }
        }
        service.load_attachments(&active);
        service.sweep_stale_cgroups().await?;
        service.sweep_stale_pins().await?;
        service.sweep_orphan_logs().await?;
        Ok(service)
    }

    /// The names of the active leases.
    async fn active_names(&self) -> Result<HashSet<String>, anyhow::Error> {
        Ok(self
            .inner
            .leases
            .store()
            .active_names()
            .await?
            .into_iter()
            .collect())
    }

    /// Kills what is left in the cgroups of leases that are not active (a crash between a
    /// release and its cgroups' removal, or a removal that failed) and removes them. Every
    /// `lease-<name>` cgroup under this daemon's parents is this daemon's; nothing of a released
    /// lease may run.
    async fn sweep_stale_cgroups(&self) -> Result<(), anyhow::Error> {
        let Ok(Some(Ok(parents))) = self.inner.cgroup_parents.lock().map(|p| p.clone()) else {
            return Ok(());
        };
        let active = self.active_names().await?;
        tokio::task::spawn_blocking(move || {
            for parent in [Some(parents.track()), parents.cap()].into_iter().flatten() {
                for name in parent.lease_names() {
                    if active.contains(&name) {
                        continue;
                    }
                    let Ok(cgroup) = LeaseCgroup::open(parent, &name) else {
                        continue;
                    };
                    let live = cgroup.all_procs().map_or(0, |p| p.len());
                    if live > 0 {
                        tracing::warn!(lease = %name, live, cgroup = %cgroup.path().display(), "processes of a lease that is not active are left; killing them");
                    }
                    match cgroup.kill_all_and_remove() {
                        Ok(()) => tracing::info!(lease = %name, "removed the stale lease cgroup"),
                        Err(error) => {
                            tracing::error!(lease = %name, %error, "cannot empty and remove a stale lease cgroup")
                        }
                    }
                }
            }
        })
        .await?;
        Ok(())
    }

    /// Removes log files that belong to no recorded process and no process the keeper holds:
    /// those of a spawn a crash cut short before its process was recorded.
    async fn sweep_orphan_logs(&self) -> Result<(), anyhow::Error> {
        let known: HashSet<String> = self
            .inner
            .leases
            .store()
            .process_ids()
            .await?
            .into_iter()
            .collect();
        let logs = lock_map(&self.inner.logs).clone();
        let dir = self.inner.config.log_dir.clone();
        let removed = tokio::task::spawn_blocking(move || match logs {
            Some(logs) => logs.remove_orphans(&known),
            None => remove_orphan_files(&dir, &known),
        })
        .await??;
        if removed > 0 {
            tracing::info!(removed, "removed log files of no recorded process");
        }
        Ok(())
    }

    /// Removes the namespace pins of leases that are no longer active (left by a crash between
    /// a teardown and its release). A pin whose namespace still has members outside every lease
    /// cgroup (a version without them started them) is kept and reported: those processes run
    /// with ids of a released lease, which an operator must stop (their block stays withheld
    /// while they live).
    async fn sweep_stale_pins(&self) -> Result<(), anyhow::Error> {
        let active = self.active_names().await?;
        let ns_dir = self.inner.config.ns_dir.clone();
        tokio::task::spawn_blocking(move || {
            let Ok(entries) = std::fs::read_dir(&ns_dir) else {
                return;
            };
            let stale: BTreeSet<_> = entries
                .flatten()
                .filter(|e| e.path().is_dir())
                .filter(|e| !active.contains(e.file_name().to_string_lossy().as_ref()))
                .collect::<Vec<_>>()
                .into_iter()
                .map(|e| e.path())
                .collect();
            for dir in stale {
                let name = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
                let pin = dir.join("user");
                if userns::is_pinned(&pin) {
                    let live = userns::open_pinned(&pin)
                        .and_then(|fd| userns::ns_inode(&fd))
                        .and_then(members::userns_members)
                        .map_or(0, |m| m.len());
                    if live > 0 {
                        tracing::error!(lease = %name, live, pin = %pin.display(), "processes still run in the namespace of a lease that is not active; stop them (nsenter --user=PIN) so that its range is safe to reuse");
                        continue;
                    }
                    match userns::unpin(&pin) {
                        Ok(()) => tracing::info!(lease = %name, "removed the stale namespace pin"),
                        Err(error) => {
                            tracing::warn!(lease = %name, %error, "cannot remove a stale pin");
                            continue;
                        }
                    }
                }
                let _ = userns::remove_private_dir(&dir);
                let _ = std::fs::remove_dir(&dir);
            }
        })
        .await?;
        Ok(())
    }

    /// The pidfd of a recorded process if it is still that process.
    fn adoptable(&self, row: &ProcessRecord) -> Option<PidFd> {
        if row.boot_id != self.inner.boot_id {
            return None;
        }
        let pidfd = PidFd::open(row.pid).ok()?;
        let dir = pidfd.proc_dir().ok()?;
        let ticks = members::start_ticks(&dir).ok()?;
        // A zombie (dead, not yet reaped by its new parent) has vanished too.
        let zombie = dir
            .read_to_string("stat")
            .ok()
            .and_then(|stat| members::stat_state(&stat))
            .is_none_or(|state| matches!(state, 'Z' | 'X'));
        (ticks == row.start_ticks && !zombie).then_some(pidfd)
    }
}

/// This boot's id, or the test override of [`TEST_BOOT_ID_ENV`].
fn boot_id() -> Result<String, SysError> {
    match std::env::var(TEST_BOOT_ID_ENV) {
        Ok(fake) if !fake.is_empty() => {
            tracing::warn!(boot_id = %fake, "boot id overridden by {TEST_BOOT_ID_ENV} (tests only)");
            Ok(fake)
        }
        _ => members::boot_id(),
    }
}
