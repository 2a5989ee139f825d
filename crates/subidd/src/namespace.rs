//! Making sure a lease's namespaces exist without starting a process in them, for runtimes that
//! join them (`PUT /v1/leases/{name}/namespace`, used by `subid-runc`).

use std::path::PathBuf;

use subid_sys::userns::{self, NsKind};

use crate::error::ApiError;
use crate::process::{ProcessService, ns_spec};

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
    /// helper running as the lease's base ids creates them; the daemon writes the maps and
    /// pins them), and answers their pins. `not_found` without an active lease.
    pub async fn ensure_namespace(&self, name: &str) -> Result<NamespacePins, ApiError> {
        // Exclusive, as a first spawn and a teardown are: a release cannot unpin half-way.
        let lock = self.lease_lock(name);
        let _guard = lock.write().await;
        let lease = self.active_lease(name).await?;
        let pin = self.pin_path(name);
        let mut created = false;
        if self.namespace_of(&lease, &pin)?.is_none() {
            let spec = ns_spec(&lease);
            if spec.extra.mnt {
                self.private_ns_dir(name)?;
            }
            let target = pin.clone();
            tokio::task::spawn_blocking(move || userns::create_pinned(&spec, &target))
                .await
                .map_err(|e| ApiError::Internal(format!("namespace thread: {e}")))?
                .map_err(|e| {
                    ApiError::Internal(format!("creating the namespaces of {name}: {e}"))
                })?;
            created = true;
            tracing::info!(lease = %name, pin = %pin.display(), "namespaces made without a process");
            // Opened and remembered now, as after a first spawn.
            if self.namespace_of(&lease, &pin)?.is_none() {
                return Err(ApiError::Internal(format!(
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
}
