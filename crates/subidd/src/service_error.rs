//! `ServiceError`: what the daemon's services (leases, and processes after them) can fail with,
//! in their own terms. The HTTP layer maps each variant to a status and a stable code
//! (`crate::error`); no service picks an HTTP status.

use std::sync::Arc;

use subid_store::StoreError;

/// A boxed cause, kept as the `source()` of the error that carries it.
pub type Cause = Box<dyn std::error::Error + Send + Sync + 'static>;

#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    /// The lease, process or other thing asked for does not exist (or is no longer active).
    #[error("{what}")]
    NotFound { what: String },
    /// The request cannot be carried out as asked (a bad id, an unknown setting).
    #[error("{reason}")]
    Invalid { reason: String },
    /// `POST` of a lease whose name is taken.
    #[error("lease {lease} already exists")]
    Exists { lease: String },
    /// The request contradicts the current state (other settings, no ttl to renew, a lease
    /// being released).
    #[error("{reason}")]
    Conflict { reason: String },
    /// Live processes stand in the way; `hosts` names where they run when other hosts of a
    /// fleet have some.
    #[error("{reason}")]
    Busy { reason: String, hosts: Vec<String> },
    /// No free range of the size asked for.
    #[error("{reason}")]
    Exhausted { reason: String },
    /// The lease is at its process cap.
    #[error("{reason}")]
    ProcessLimit { reason: String },
    /// A forced release is recorded and carried out as the hosts named stop the lease's
    /// processes; the range stays taken until they report none left.
    #[error(
        "the release of lease {lease} is recorded; it completes once {} report its processes stopped",
        hosts.join(", ")
    )]
    ReleasePending { lease: String, hosts: Vec<String> },
    /// The disk under the store is full; nothing was written.
    #[error("the lease store's disk is full")]
    StoreFull {
        #[source]
        source: Arc<StoreError>,
    },
    /// The store cannot be reached (a PostgreSQL server down or cut off); nothing was written.
    #[error("the lease store cannot be reached")]
    StoreUnavailable {
        #[source]
        source: Arc<StoreError>,
    },
    /// The store failed otherwise; the write was rolled back.
    #[error("the lease store failed")]
    Store {
        #[source]
        source: Arc<StoreError>,
    },
    /// The kernel refused something the service needs (a namespace, a cgroup, a signal).
    #[error("{what}")]
    Kernel {
        what: String,
        #[source]
        source: Cause,
    },
    /// A broken invariant: a bug, or state changed behind the daemon's back.
    #[error("{what}")]
    Internal {
        what: String,
        #[source]
        source: Option<Cause>,
    },
    /// The daemon is stopping; the request was not carried out.
    #[error("the daemon is shutting down")]
    ShuttingDown,
    /// A process named by the request is not one of the lease's.
    #[error("{reason}")]
    NotInLease { reason: String },
    /// The process has exited; it can no longer be signalled.
    #[error("{reason}")]
    ProcessExited { reason: String },
    /// A process was created but could not be set up, or its program not executed, for a
    /// reason in the request (the program, its permissions, the working directory).
    #[error("{reason}")]
    ExecFailed { reason: String },
    /// A new process did not reach its program within the spawn deadline and was killed.
    #[error("{reason}")]
    SpawnTimeout { reason: String },
    /// No cgroup can hold the lease's processes on this host.
    #[error("{reason}")]
    CgroupsUnavailable { reason: String },
    /// The lease asks for a process cap this host's cgroups cannot enforce.
    #[error("{reason}")]
    PidsUnsupported { reason: String },
    /// A bound of the host or the daemon was reached (the kernel's process limit, the log
    /// keeper's capacity); nothing was done, and a retry later may work.
    #[error("{reason}")]
    Unavailable { reason: &'static str },
}

impl ServiceError {
    /// The error for a failed store operation, sorted by what a client should do about it.
    pub fn store(error: impl Into<Arc<StoreError>>) -> ServiceError {
        let source = error.into();
        if source.is_full() {
            ServiceError::StoreFull { source }
        } else if source.is_unreachable() {
            ServiceError::StoreUnavailable { source }
        } else {
            ServiceError::Store { source }
        }
    }

    /// A lease busy with live processes (this host's), or held by another request.
    pub fn busy(reason: impl Into<String>) -> ServiceError {
        ServiceError::Busy {
            reason: reason.into(),
            hosts: Vec::new(),
        }
    }

    /// A request the service cannot carry out as asked.
    pub fn invalid(reason: impl Into<String>) -> ServiceError {
        ServiceError::Invalid {
            reason: reason.into(),
        }
    }

    /// Something asked for that does not exist.
    pub fn not_found(what: impl Into<String>) -> ServiceError {
        ServiceError::NotFound { what: what.into() }
    }

    /// A broken invariant with no underlying error.
    pub fn internal(what: impl Into<String>) -> ServiceError {
        ServiceError::Internal {
            what: what.into(),
            source: None,
        }
    }
}

impl From<StoreError> for ServiceError {
    fn from(error: StoreError) -> ServiceError {
        ServiceError::store(error)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_errors_are_sorted_and_keep_their_source() {
        use std::error::Error as _;
        let timed_out = ServiceError::from(StoreError::TimedOut {
            what: "a write",
            after: std::time::Duration::from_secs(5),
        });
        assert!(
            matches!(timed_out, ServiceError::StoreUnavailable { .. }),
            "{timed_out:?}"
        );
        let source = timed_out.source().map(ToString::to_string);
        assert_eq!(
            source.as_deref(),
            Some("the lease store did not answer a write within 5s")
        );
        let other = ServiceError::from(StoreError::NotActive { id: 7 });
        assert!(matches!(other, ServiceError::Store { .. }), "{other:?}");
    }
}
