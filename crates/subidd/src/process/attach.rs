//! Processes of a lease that subidd did not start: a runtime's container (Docker through
//! `subid-runc`) runs in a cgroup of the runtime's choosing, so the runtime *attaches* that
//! cgroup to the lease (`POST /v1/leases/{name}/attach`). From then on the lease's teardown
//! counts it like the lease's own cgroup: a plain release is refused while it holds a process,
//! a forced one kills it. Attachments are kept in `<runtime-dir>/attached/<lease>/<id>.json`, so
//! they outlive a daemon restart (and go with a reboot, as the containers do), and go with the
//! lease's release.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::{Deserialize, Serialize};
use subid_store::LeaseRecord;
use subid_sys::cgroup::{CgroupVersion, Hierarchy, LeaseCgroup};
use subid_sys::{Errno, PidFd, SysError, userns};

use super::{ProcessService, lock_map};
use crate::service_error::ServiceError;

/// A cgroup attached to a lease.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attachment {
    /// The runtime's name for it (a container id).
    pub id: String,
    /// The process it was attached through (the container's init), as the host sees it.
    pub pid: i32,
    /// `v2` or `v1`: the hierarchy of `cgroup`.
    pub hierarchy: String,
    /// The cgroup, as `/proc/PID/cgroup` names it on that hierarchy.
    pub cgroup: PathBuf,
}

/// An attachment as `GET` shows it: with its cgroup's directory and live processes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttachmentState {
    pub attachment: Attachment,
    pub dir: Option<PathBuf>,
    pub processes: usize,
}

impl ProcessService {
    /// Attaches the cgroup of process `pid` (which must run in the lease's user namespace, one
    /// nested in it, or a namespace that maps only the lease's ids) to the active lease `name`
    /// under `id`; attaching the same id again replaces it.
    pub async fn attach(
        &self,
        name: &str,
        id: &str,
        pid: i32,
    ) -> Result<AttachmentState, ServiceError> {
        subid_core::validate_name(id)
            .map_err(|e| ServiceError::invalid(format!("attachment id: {e}")))?;
        if pid <= 0 {
            return Err(ServiceError::invalid(format!(
                "pid {pid} is not a process id"
            )));
        }
        let lock = self.lease_lock(name);
        let _guard = self.exclusive(&lock, name).await?;
        let lease = self.active_lease(name).await?;
        let pin = self.pin_path(name);
        let host = self.inner.cgroup_host.clone();
        let parents = self.cgroup_parents(false).ok();
        let lease_parent = parents.as_ref().map(|p| p.track().dir().to_path_buf());
        let id_owned = id.to_string();
        let lease_for_check = lease.clone();
        let attachment = tokio::task::spawn_blocking(move || {
            let host = host.ok_or_else(|| ServiceError::CgroupsUnavailable {
                reason: "the cgroup layout could not be read".into(),
            })?;
            inspect(
                &host,
                &lease_for_check,
                &pin,
                pid,
                &id_owned,
                lease_parent.as_deref(),
            )
        })
        .await
        .map_err(|e| ServiceError::internal(format!("attach task: {e}")))??;
        let file = self.attachment_file(name, id);
        let text = serde_json::to_vec_pretty(&attachment)
            .map_err(|e| ServiceError::internal(format!("attachment record: {e}")))?;
        let written = file
            .parent()
            .map_or(Ok(()), std::fs::create_dir_all)
            .and_then(|()| write_atomically(&file, &text));
        written.map_err(|e| ServiceError::internal(format!("write {}: {e}", file.display())))?;
        tracing::info!(lease = %name, id, pid, cgroup = %attachment.cgroup.display(), "cgroup attached to the lease");
        lock_map(&self.inner.attached)
            .entry(lease.id)
            .or_default()
            .insert(id.to_string(), attachment.clone());
        Ok(self.state_of(attachment))
    }

    /// Forgets an attachment; `not_found` when the lease has none of that id.
    pub async fn detach(&self, name: &str, id: &str) -> Result<(), ServiceError> {
        let lease = self.active_lease(name).await?;
        let removed = lock_map(&self.inner.attached)
            .get_mut(&lease.id)
            .and_then(|a| a.remove(id));
        if removed.is_none() {
            return Err(ServiceError::not_found(format!(
                "lease {name} has no attachment {id}"
            )));
        }
        let _ = std::fs::remove_file(self.attachment_file(name, id));
        Ok(())
    }

    /// The lease's attachments, each with its live processes.
    pub fn attachments(&self, lease: &LeaseRecord) -> Vec<AttachmentState> {
        let held: Vec<Attachment> = lock_map(&self.inner.attached)
            .get(&lease.id)
            .map(|a| a.values().cloned().collect())
            .unwrap_or_default();
        held.into_iter().map(|a| self.state_of(a)).collect()
    }

    /// The processes in the lease's attached cgroups (for a teardown).
    pub(super) fn attached_members(&self, lease: &LeaseRecord) -> Vec<i32> {
        self.attached_cgroups(lease)
            .iter()
            .flat_map(|cg| cg.all_procs().unwrap_or_default())
            .collect()
    }

    /// Sends `signal` to every process of the lease's attached cgroups.
    pub(super) fn signal_attached(&self, lease: &LeaseRecord, signal: i32) {
        for cg in self.attached_cgroups(lease) {
            if let Err(error) = cg.signal_all(signal) {
                tracing::warn!(lease = %lease.name, cgroup = %cg.path().display(), %error, "signalling an attached cgroup");
            }
        }
    }

    /// Kills every process of the lease's attached cgroups, waiting until `deadline`.
    pub(super) fn kill_attached(&self, lease: &LeaseRecord, deadline: Instant) {
        for cg in self.attached_cgroups(lease) {
            if let Err(error) = cg.kill_all(deadline) {
                tracing::error!(lease = %lease.name, cgroup = %cg.path().display(), %error, "the processes of an attached cgroup survived the kill");
            }
        }
    }

    /// Forgets every attachment of a released lease.
    pub(super) fn forget_attachments(&self, lease: &LeaseRecord) {
        lock_map(&self.inner.attached).remove(&lease.id);
        let _ = std::fs::remove_dir_all(
            self.inner
                .config
                .runtime_dir
                .join("attached")
                .join(&lease.name),
        );
    }

    /// Reads the attachments a previous daemon recorded, for the active leases (by name ->
    /// id); the records of other names go.
    /// The names of the leases with attachment records (their directories under
    /// `<runtime_dir>/attached`).
    pub(super) fn attached_names(&self) -> Vec<String> {
        let dir = self.inner.config.runtime_dir.join("attached");
        std::fs::read_dir(dir)
            .map(|entries| {
                entries
                    .flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default()
    }

    pub(super) fn load_attachments(&self, active: &BTreeMap<String, i64>) {
        let dir = self.inner.config.runtime_dir.join("attached");
        let Ok(entries) = std::fs::read_dir(&dir) else {
            return;
        };
        let mut attached = lock_map(&self.inner.attached);
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(&lease_id) = active.get(&name) else {
                let _ = std::fs::remove_dir_all(entry.path());
                continue;
            };
            let Ok(files) = std::fs::read_dir(entry.path()) else {
                continue;
            };
            for file in files.flatten() {
                let read = std::fs::read(file.path())
                    .ok()
                    .and_then(|b| serde_json::from_slice::<Attachment>(&b).ok());
                match read {
                    Some(a) => {
                        attached
                            .entry(lease_id)
                            .or_default()
                            .insert(a.id.clone(), a);
                    }
                    None => {
                        tracing::warn!(file = %file.path().display(), "unreadable attachment record; ignored");
                    }
                }
            }
        }
    }

    fn attachment_file(&self, name: &str, id: &str) -> PathBuf {
        self.inner
            .config
            .runtime_dir
            .join("attached")
            .join(name)
            .join(format!("{id}.json"))
    }

    fn hierarchy_of(&self, a: &Attachment) -> Option<Hierarchy> {
        let host = self.inner.cgroup_host.as_ref()?;
        let version = match a.hierarchy.as_str() {
            "v2" => CgroupVersion::V2,
            _ => CgroupVersion::V1,
        };
        [host.unified(), host.pids()]
            .into_iter()
            .flatten()
            .find(|h| h.version == version)
            .cloned()
    }

    fn attached_cgroups(&self, lease: &LeaseRecord) -> Vec<LeaseCgroup> {
        let held: Vec<Attachment> = lock_map(&self.inner.attached)
            .get(&lease.id)
            .map(|a| a.values().cloned().collect())
            .unwrap_or_default();
        held.iter()
            .filter_map(|a| LeaseCgroup::at(&self.hierarchy_of(a)?, &a.cgroup).ok())
            .collect()
    }

    fn state_of(&self, attachment: Attachment) -> AttachmentState {
        let cg = self
            .hierarchy_of(&attachment)
            .and_then(|h| LeaseCgroup::at(&h, &attachment.cgroup).ok());
        AttachmentState {
            dir: cg.as_ref().map(|c| c.path().to_path_buf()),
            processes: cg.map_or(0, |c| c.all_procs().map_or(0, |p| p.len())),
            attachment,
        }
    }
}

/// Checks that process `pid` belongs to the lease and finds the cgroup to attach.
fn inspect(
    host: &subid_sys::cgroup::CgroupHost,
    lease: &LeaseRecord,
    pin: &Path,
    pid: i32,
    id: &str,
    lease_parent: Option<&Path>,
) -> Result<Attachment, ServiceError> {
    let gone = || ServiceError::invalid(format!("no process {pid}"));
    let pidfd = PidFd::open(pid).map_err(|_| gone())?;
    let proc = pidfd.proc_dir().map_err(|e| match e {
        SysError::ProcessGone { .. } => gone(),
        other => ServiceError::internal(format!("/proc/{pid}: {other}")),
    })?;
    let not_in_lease = || ServiceError::NotInLease {
        reason: format!(
            "process {pid} runs neither in the user namespace of lease {} (or one nested in it) \
             nor in one that maps only its ids {}..{}",
            lease.name,
            lease.uid_base,
            u64::from(lease.uid_base) + u64::from(lease.size)
        ),
    };
    let ns = proc
        .open(
            "ns/user",
            nix::fcntl::OFlag::O_RDONLY | nix::fcntl::OFlag::O_CLOEXEC,
        )
        .map_err(|e| match e.errno() {
            Some(Errno::ENOENT | Errno::ESRCH) => gone(),
            // Another process's namespace that even root may not inspect (a protected init, a
            // process of another pid namespace's owner): it cannot be shown to be the lease's.
            Some(Errno::EACCES | Errno::EPERM) => ServiceError::NotInLease {
                reason: format!(
                    "the user namespace of process {pid} cannot be read ({e}), so it cannot be \
                 shown to run in lease {}",
                    lease.name
                ),
            },
            _ => ServiceError::internal(format!("/proc/{pid}/ns/user: {e}")),
        })?;
    let joined = userns::is_pinned(pin)
        && userns::open_pinned(pin)
            .and_then(|fd| userns::ns_inode(&fd))
            .and_then(|ino| userns::is_within(std::os::fd::AsFd::as_fd(&ns), ino))
            .unwrap_or(false);
    let mapped = || {
        let inside = |base: u32, file: &str| {
            userns::read_map(&proc, file).is_ok_and(|extents| {
                !extents.is_empty()
                    && extents.iter().all(|e| {
                        u64::from(e.outer) >= u64::from(base)
                            && u64::from(e.outer) + u64::from(e.count)
                                <= u64::from(base) + u64::from(lease.size)
                    })
            })
        };
        inside(lease.uid_base, "uid_map") && inside(lease.gid_base, "gid_map")
    };
    if !joined && !mapped() {
        return Err(not_in_lease());
    }
    let text = proc
        .read_to_string("cgroup")
        .map_err(|e| ServiceError::internal(format!("/proc/{pid}/cgroup: {e}")))?;
    // The tracking hierarchy first (where the kernel can kill a whole cgroup at once), else the
    // v1 pids hierarchy; a process in a hierarchy's root cgroup has no cgroup of its own there.
    let own = [host.tracking(), host.pids()]
        .into_iter()
        .flatten()
        .find_map(|h| {
            let path = h.path_in(&text)?;
            (path != h.root).then(|| (h.clone(), path))
        });
    let Some((hierarchy, cgroup)) = own else {
        return Err(ServiceError::invalid(format!(
            "process {pid} sits in no cgroup of its own: nothing to attach"
        )));
    };
    let cg = LeaseCgroup::at(&hierarchy, &cgroup)
        .map_err(|e| ServiceError::invalid(format!("the cgroup of process {pid}: {e}")))?;
    // Never a cgroup that holds the daemon, or the leases' parent: a forced release kills it.
    let daemon_inside = cg
        .contains_pid(i32::try_from(std::process::id()).unwrap_or(0))
        .unwrap_or(true);
    let holds_leases = lease_parent.is_some_and(|p| p.starts_with(cg.path()));
    if daemon_inside || holds_leases {
        return Err(ServiceError::invalid(format!(
            "the cgroup of process {pid} ({}) holds the daemon or other leases; attach the \
             container's own cgroup",
            cgroup.display()
        )));
    }
    Ok(Attachment {
        id: id.to_string(),
        pid,
        hierarchy: hierarchy.version.as_str().to_string(),
        cgroup,
    })
}

/// Writes `data` to `path` through a temporary file and a rename.
fn write_atomically(path: &Path, data: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("json.new");
    std::fs::write(&tmp, data)?;
    std::fs::rename(&tmp, path)
}
