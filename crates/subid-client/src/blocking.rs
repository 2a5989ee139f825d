//! A blocking face of [`crate::Client`] for programs without an async runtime (the OCI runtime
//! wrapper): each call runs the async request on a private current-thread runtime.

use std::future::Future;
use std::path::Path;
use std::time::Duration;

use crate::model::{Attachment, Lease, LeaseRequest, Lookup, NamespacePins, Pool};
use crate::{ClientError, Result};

/// A blocking client; not for use inside an async runtime (it would block that runtime).
#[derive(Debug)]
pub struct Client {
    inner: crate::Client,
    runtime: tokio::runtime::Runtime,
}

impl Client {
    /// A client of the daemon listening on `socket`, with its own current-thread runtime.
    pub fn new(socket: impl AsRef<Path>) -> Result<Client> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .enable_time()
            .build()
            .map_err(|e| ClientError::Request(format!("cannot start an I/O runtime: {e}")))?;
        Ok(Client {
            inner: crate::Client::new(socket),
            runtime,
        })
    }

    /// The deadline of each request.
    pub fn with_timeout(mut self, timeout: Duration) -> Client {
        self.inner = self.inner.with_timeout(timeout);
        self
    }

    /// The `User-Agent` sent.
    pub fn with_user_agent(mut self, agent: impl Into<String>) -> Client {
        self.inner = self.inner.with_user_agent(agent);
        self
    }

    /// The async client, for requests this type has no method for (with [`Client::block_on`]).
    pub fn inner(&self) -> &crate::Client {
        &self.inner
    }

    /// Runs a future of [`Client::inner`] to completion.
    pub fn block_on<T>(&self, future: impl Future<Output = T>) -> T {
        self.runtime.block_on(future)
    }

    /// See [`crate::Client::put_lease`].
    pub fn put_lease(&self, name: &str, settings: &LeaseRequest) -> Result<(Lease, bool)> {
        self.block_on(self.inner.put_lease(name, settings))
    }

    /// See [`crate::Client::get_lease`].
    pub fn get_lease(&self, name: &str) -> Result<Lease> {
        self.block_on(self.inner.get_lease(name))
    }

    /// See [`crate::Client::list_leases`].
    pub fn list_leases(&self, state: Option<&str>, labels: &[(&str, &str)]) -> Result<Vec<Lease>> {
        self.block_on(self.inner.list_leases(state, labels))
    }

    /// See [`crate::Client::release_lease`].
    pub fn release_lease(&self, name: &str, force: bool, purge: bool) -> Result<()> {
        self.block_on(self.inner.release_lease(name, force, purge))
    }

    /// See [`crate::Client::ensure_namespace`].
    pub fn ensure_namespace(&self, name: &str) -> Result<NamespacePins> {
        self.block_on(self.inner.ensure_namespace(name))
    }

    /// See [`crate::Client::attach`].
    pub fn attach(&self, name: &str, pid: i32, id: &str) -> Result<Attachment> {
        self.block_on(self.inner.attach(name, pid, id))
    }

    /// See [`crate::Client::detach`].
    pub fn detach(&self, name: &str, id: &str) -> Result<()> {
        self.block_on(self.inner.detach(name, id))
    }

    /// See [`crate::Client::pool`].
    pub fn pool(&self) -> Result<Pool> {
        self.block_on(self.inner.pool())
    }

    /// See [`crate::Client::lookup_uid`].
    pub fn lookup_uid(&self, uid: u32) -> Result<Lookup> {
        self.block_on(self.inner.lookup_uid(uid))
    }
}
