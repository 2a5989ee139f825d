//! A lease's namespaces as the process service finds them: pinned at
//! `<runtime-dir>/ns/<lease>/user` (and the optional ones beside it), opened once, checked to be
//! owned by the lease's base uid; and made without a process for runtimes that join them
//! (`PUT /v1/leases/{name}/namespace`, used by `subid-runc`).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use subid_core::NamespaceKind;
use subid_store::LeaseRecord;
use subid_sys::userns::{self, ExtraNs, LeaseNs, NsKind, UserNsSpec};

use super::{ProcessService, lock_map};
use crate::service_error::ServiceError;

/// Where a lease's namespaces are pinned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NamespacePins {
    /// The user namespace's pin.
    pub user: PathBuf,
    /// The optional namespaces the lease has (`namespaces`), pinned beside it.
    pub extra: Vec<(NsKind, PathBuf)>,
    /// Whether this call made them (the lease had none yet).
    pub created: bool,
}

impl ProcessService {
    /// Makes the lease's namespaces if they do not exist, exactly as its first spawn would (a
    /// helper running as the lease's base ids creates them; the daemon writes the maps and pins
    /// them), and answers their pins. `not_found` without an active lease.
    pub async fn ensure_namespace(&self, name: &str) -> Result<NamespacePins, ServiceError> {
        // Exclusive, as a first spawn and a teardown are: a release cannot unpin half-way.
        let lock = self.lease_lock(name);
        let _guard = self.exclusive(&lock, name).await?;
        let lease = self.active_lease(name).await?;
        let pin = self.pin_path(name);
        let mut created = false;
        if self.namespace_of(&lease, &pin)?.is_none() {
            let spec = ns_spec(&lease)?;
            if spec.extra.mnt {
                self.private_ns_dir(name)?;
            }
            let target = pin.clone();
            tokio::task::spawn_blocking(move || userns::create_pinned(&spec, &target))
                .await
                .map_err(|e| ServiceError::internal(format!("namespace thread: {e}")))?
                .map_err(|e| {
                    ServiceError::internal(format!("creating the namespaces of {name}: {e}"))
                })?;
            created = true;
            tracing::info!(lease = %name, pin = %pin.display(), "namespaces made without a process");
            // Opened and remembered now, as after a first spawn.
            if self.namespace_of(&lease, &pin)?.is_none() {
                return Err(ServiceError::internal(format!(
                    "the namespace of {name} is not pinned at {} after its creation",
                    pin.display()
                )));
            }
        }
        let extra = NsKind::EXTRA
            .into_iter()
            .map(|kind| (kind, kind.pin_beside(&pin)))
            .filter(|(_, path)| userns::is_pinned(path))
            .collect();
        Ok(NamespacePins {
            user: pin,
            extra,
            created,
        })
    }

    pub(super) fn pin_path(&self, name: &str) -> PathBuf {
        self.inner.config.ns_dir.join(name).join("user")
    }

    /// Makes the lease's pin directory a private mount, as a pinned mount namespace needs. Only
    /// the lease's own directory: a bind mount over the whole `ns` directory would cover the
    /// pins other leases made before it, which could then no longer be unmounted (unlink EBUSY).
    /// Idempotent.
    pub(super) fn private_ns_dir(&self, name: &str) -> Result<(), ServiceError> {
        userns::make_private_mount(&self.inner.config.ns_dir.join(name))
            .map_err(|e| ServiceError::internal(format!("private mount for pins: {e}")))
    }

    /// The lease's namespace if it exists: open already, or pinned by an earlier daemon. A pin
    /// owned by anyone but the lease's base uid is stale (another tenant's): it is removed.
    pub(super) fn namespace_of(
        &self,
        lease: &LeaseRecord,
        pin: &Path,
    ) -> Result<Option<Arc<LeaseNs>>, ServiceError> {
        if let Some(ns) = lock_map(&self.inner.spaces).get(&lease.id) {
            return Ok(Some(Arc::clone(ns)));
        }
        if !userns::is_pinned(pin) {
            return Ok(None);
        }
        let ns =
            LeaseNs::open(pin).map_err(|e| ServiceError::internal(format!("open pin: {e}")))?;
        match userns::owner_uid(ns.user()) {
            Ok(owner) if owner == lease.uid_base => {
                let ns = Arc::new(ns);
                lock_map(&self.inner.spaces).insert(lease.id, Arc::clone(&ns));
                Ok(Some(ns))
            }
            other => {
                tracing::warn!(lease = %lease.name, owner = ?other, "stale namespace pin; replacing it");
                drop(ns);
                userns::unpin(pin)
                    .map_err(|e| ServiceError::internal(format!("unpin stale pin: {e}")))?;
                Ok(None)
            }
        }
    }

    /// Closes and unpins the lease's namespaces and removes its pin directory.
    pub(super) fn unpin(&self, lease: &LeaseRecord) -> Result<(), ServiceError> {
        let pin = self.pin_path(&lease.name);
        lock_map(&self.inner.spaces).remove(&lease.id);
        if let Err(error) = userns::unpin(&pin) {
            tracing::error!(lease = %lease.name, %error, "cannot unpin namespace");
            return Err(ServiceError::internal(format!(
                "unpin {}: {error}",
                pin.display()
            )));
        }
        if let Some(dir) = pin.parent()
            && let Err(error) = userns::remove_private_dir(dir)
        {
            tracing::warn!(lease = %lease.name, %error, "cannot remove the lease's pin directory");
        }
        Ok(())
    }
}

/// The namespace settings of a lease. A stored namespace name this daemon does not know (a
/// database written by a newer version) is refused by name, never dropped.
pub(super) fn ns_spec(lease: &LeaseRecord) -> Result<UserNsSpec, ServiceError> {
    let mut spec = UserNsSpec::new(lease.uid_base, lease.size);
    spec.gid_base = lease.gid_base;
    spec.nproc_limit = lease.max_processes;
    let kinds = lease
        .namespaces
        .iter()
        .map(|n| NamespaceKind::parse(n))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| {
            ServiceError::internal(format!("lease {}: stored namespaces: {e}", lease.name))
        })?;
    spec.extra = ExtraNs::from_kinds(kinds);
    Ok(spec)
}
