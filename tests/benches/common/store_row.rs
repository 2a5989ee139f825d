//! The store's own part of a lease `PUT`, measured in the benchmark's process: the group's
//! transaction as the daemon's writer runs it (lock and reads, the insert, the commit), with
//! no HTTP, no request handling and no daemon. What a `PUT` takes beyond it and one HTTP round
//! trip is the daemon's own part.

// Each benchmark uses one of the two back ends' constructors.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use subid_store::{NewLease, PgConfig, Writer};

/// A store of the benchmark's own, and where the next lease goes.
pub struct StoreRow {
    writer: Writer,
    /// Other hosts' changes seen so far (a fleet's store), as the daemon's writer keeps them.
    seen: Option<(i64, i64)>,
    base: u32,
    block: u32,
    _store: subid_store::Store,
}

impl StoreRow {
    /// The SQLite store in a file at `path`.
    pub async fn sqlite(path: &Path, base: u32, block: u32) -> anyhow::Result<StoreRow> {
        let (store, writer) = subid_store::open(path).await?;
        Ok(StoreRow {
            writer,
            seen: None,
            base,
            block,
            _store: store,
        })
    }

    /// A fleet's PostgreSQL store at `url`, this host's own file at `local`.
    pub async fn postgres(
        url: &str,
        local: &Path,
        base: u32,
        block: u32,
    ) -> anyhow::Result<StoreRow> {
        let config = PgConfig {
            url: url.to_string(),
            password: None,
            host_id: "bench".into(),
            timeout: Duration::from_secs(10),
            max_connections: 2,
        };
        let (store, writer) = subid_store::open_fleet(local, &config).await?;
        Ok(StoreRow {
            writer,
            seen: Some((0, 0)),
            base,
            block,
            _store: store,
        })
    }

    /// One timed create of lease `name` on the `i`th block: the name's state and (on a fleet)
    /// other hosts' changes read under the lock, the lease inserted, committed.
    pub async fn create(&mut self, i: usize, name: &str) -> anyhow::Result<Duration> {
        let offset = u32::try_from(i)? * self.block;
        let new = NewLease {
            name: name.to_string(),
            uid_base: self.base + offset,
            gid_base: self.base + offset,
            size: self.block,
            labels: BTreeMap::new(),
            ttl_seconds: None,
            created_at: 1,
            expires_at: None,
            created_by: Some(0),
            rlimits: BTreeMap::new(),
            namespaces: Vec::new(),
            pids_max: None,
            max_processes: None,
        };
        let names = [new.name.clone()];
        let t = Instant::now();
        let (mut tx, changes, states) = self.writer.begin_group(&names, self.seen).await?;
        anyhow::ensure!(
            states.get(name).is_none_or(|s| s.active.is_none()),
            "{name} exists"
        );
        tx.insert_lease(&new, self.block).await?;
        let committed_at = tx.commit_seq().await?;
        let took = t.elapsed();
        if let Some(changes) = changes {
            let seq = changes.seq.max(committed_at.unwrap_or(0));
            self.seen = Some((seq, changes.claims_seq));
        }
        Ok(took)
    }
}
