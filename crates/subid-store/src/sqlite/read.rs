//! Reads from the SQLite file: a pool of read-only connections anyone may clone.

use std::path::{Path, PathBuf};

use sqlx::sqlite::SqlitePool;

use crate::record::{
    EVENT_COLUMNS, LEASE_COLUMNS, PROCESS_COLUMNS, event_from, lease_from, process_from,
};
use crate::{EventRecord, LeaseFilter, LeaseRecord, ProcessRecord, StoreError};

/// Names of released leases with a cgroup cap whose name has no active lease now: their cgroups
/// must be gone.
pub(crate) const STALE_CAPPED: &str = "SELECT DISTINCT name FROM lease l \
     WHERE state = 'released' AND pids_max IS NOT NULL AND NOT EXISTS \
     (SELECT 1 FROM lease a WHERE a.name = l.name AND a.state = 'active') ORDER BY name";

/// Read access to the SQLite file; cheap to clone.
#[derive(Clone, Debug)]
pub(crate) struct SqliteReader {
    pool: SqlitePool,
    path: PathBuf,
}

impl SqliteReader {
    pub(crate) fn new(pool: SqlitePool, path: &Path) -> SqliteReader {
        SqliteReader {
            pool,
            path: path.to_path_buf(),
        }
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    pub(crate) async fn get_lease(&self, name: &str) -> Result<Option<LeaseRecord>, StoreError> {
        let sql = format!(
            "SELECT {LEASE_COLUMNS} FROM lease WHERE name = ? \
             ORDER BY state = 'active' DESC, released_at DESC, id DESC LIMIT 1"
        );
        let row = sqlx::query(&sql)
            .bind(name)
            .fetch_optional(&self.pool)
            .await
            .map_err(StoreError::read)?;
        row.map(|r| lease_from(&r)).transpose()
    }

    pub(crate) async fn get_lease_by_id(&self, id: i64) -> Result<Option<LeaseRecord>, StoreError> {
        let sql = format!("SELECT {LEASE_COLUMNS} FROM lease WHERE id = ?");
        let row = sqlx::query(&sql)
            .bind(id)
            .fetch_optional(&self.pool)
            .await
            .map_err(StoreError::read)?;
        row.map(|r| lease_from(&r)).transpose()
    }

    pub(crate) async fn list_leases_page(
        &self,
        filter: &LeaseFilter,
        after: Option<(&str, i64)>,
        limit: u32,
    ) -> Result<Vec<LeaseRecord>, StoreError> {
        let mut sql = format!("SELECT {LEASE_COLUMNS} FROM lease WHERE 1");
        if filter.state.is_some() {
            sql.push_str(" AND state = ?");
        }
        if after.is_some() {
            sql.push_str(" AND (name, id) > (?, ?)");
        }
        for _ in &filter.labels {
            sql.push_str(
                " AND EXISTS (SELECT 1 FROM json_each(lease.labels) j WHERE j.key = ? AND j.value = ?)",
            );
        }
        sql.push_str(" ORDER BY name, id LIMIT ?");
        let mut query = sqlx::query(&sql);
        if let Some(state) = filter.state {
            query = query.bind(state.as_str());
        }
        if let Some((name, id)) = after {
            query = query.bind(name).bind(id);
        }
        for (key, value) in &filter.labels {
            query = query.bind(key).bind(value);
        }
        let rows = query
            .bind(i64::from(limit))
            .fetch_all(&self.pool)
            .await
            .map_err(StoreError::read)?;
        rows.iter().map(lease_from).collect()
    }

    pub(crate) async fn meta(&self, key: &str) -> Result<Option<String>, StoreError> {
        sqlx::query_scalar("SELECT value FROM pool_meta WHERE key = ?")
            .bind(key)
            .fetch_optional(&self.pool)
            .await
            .map_err(StoreError::read)
    }

    pub(crate) async fn has_leases(&self) -> Result<bool, StoreError> {
        let any: Option<i64> = sqlx::query_scalar("SELECT 1 FROM lease LIMIT 1")
            .fetch_optional(&self.pool)
            .await
            .map_err(StoreError::read)?;
        Ok(any.is_some())
    }

    pub(crate) async fn active_names(&self) -> Result<Vec<String>, StoreError> {
        sqlx::query_scalar("SELECT name FROM lease WHERE state = 'active' ORDER BY name")
            .fetch_all(&self.pool)
            .await
            .map_err(StoreError::read)
    }

    pub(crate) async fn stale_capped_names(&self) -> Result<Vec<String>, StoreError> {
        sqlx::query_scalar(STALE_CAPPED)
            .fetch_all(&self.pool)
            .await
            .map_err(StoreError::read)
    }

    pub(crate) async fn lease_holding(
        &self,
        block_start: u32,
    ) -> Result<Option<LeaseRecord>, StoreError> {
        let sql = format!(
            "SELECT {LEASE_COLUMNS} FROM lease WHERE id = \
             (SELECT lease_id FROM block WHERE start = ? AND lease_id IS NOT NULL)"
        );
        let row = sqlx::query(&sql)
            .bind(i64::from(block_start))
            .fetch_optional(&self.pool)
            .await
            .map_err(StoreError::read)?;
        row.map(|r| lease_from(&r)).transpose()
    }

    pub(crate) async fn expired_leases(&self, now_ms: i64) -> Result<Vec<LeaseRecord>, StoreError> {
        let sql = format!(
            "SELECT {LEASE_COLUMNS} FROM lease WHERE state = 'active' \
             AND expires_at IS NOT NULL AND expires_at <= ? ORDER BY expires_at"
        );
        let rows = sqlx::query(&sql)
            .bind(now_ms)
            .fetch_all(&self.pool)
            .await
            .map_err(StoreError::read)?;
        rows.iter().map(lease_from).collect()
    }

    pub(crate) async fn events(&self, name: &str) -> Result<Vec<EventRecord>, StoreError> {
        let sql = format!(
            "SELECT {EVENT_COLUMNS} FROM event WHERE lease_name = ? \
             AND kind IN ('create', 'renew', 'release', 'expire', 'purge') ORDER BY id"
        );
        let rows = sqlx::query(&sql)
            .bind(name)
            .fetch_all(&self.pool)
            .await
            .map_err(StoreError::read)?;
        rows.iter().map(event_from).collect()
    }

    pub(crate) async fn events_after(
        &self,
        after: i64,
        limit: u32,
    ) -> Result<Vec<EventRecord>, StoreError> {
        let sql = format!("SELECT {EVENT_COLUMNS} FROM event WHERE id > ? ORDER BY id LIMIT ?");
        let rows = sqlx::query(&sql)
            .bind(after)
            .bind(i64::from(limit))
            .fetch_all(&self.pool)
            .await
            .map_err(StoreError::read)?;
        rows.iter().map(event_from).collect()
    }

    pub(crate) async fn last_event_id(&self) -> Result<i64, StoreError> {
        let id: Option<i64> = sqlx::query_scalar("SELECT MAX(id) FROM event")
            .fetch_one(&self.pool)
            .await
            .map_err(StoreError::read)?;
        Ok(id.unwrap_or(0))
    }

    pub(crate) async fn active_lease_count(&self) -> Result<u64, StoreError> {
        let count: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM lease WHERE state = 'active'")
            .fetch_one(&self.pool)
            .await
            .map_err(StoreError::read)?;
        Ok(u64::try_from(count).unwrap_or(0))
    }

    pub(crate) async fn get_process(&self, id: &str) -> Result<Option<ProcessRecord>, StoreError> {
        let sql = format!("SELECT {PROCESS_COLUMNS} FROM process WHERE id = ?");
        let row = sqlx::query(&sql)
            .bind(id)
            .fetch_optional(&self.pool)
            .await
            .map_err(StoreError::read)?;
        row.map(|r| process_from(&r)).transpose()
    }

    pub(crate) async fn lease_processes(
        &self,
        lease_id: i64,
    ) -> Result<Vec<ProcessRecord>, StoreError> {
        let sql = format!(
            "SELECT {PROCESS_COLUMNS} FROM process WHERE lease_id = ? ORDER BY started_at, id"
        );
        let rows = sqlx::query(&sql)
            .bind(lease_id)
            .fetch_all(&self.pool)
            .await
            .map_err(StoreError::read)?;
        rows.iter().map(process_from).collect()
    }

    pub(crate) async fn process_ids(&self) -> Result<Vec<String>, StoreError> {
        sqlx::query_scalar("SELECT id FROM process")
            .fetch_all(&self.pool)
            .await
            .map_err(StoreError::read)
    }

    pub(crate) async fn running_processes(&self) -> Result<Vec<ProcessRecord>, StoreError> {
        let sql =
            format!("SELECT {PROCESS_COLUMNS} FROM process WHERE state = 'running' ORDER BY id");
        let rows = sqlx::query(&sql)
            .fetch_all(&self.pool)
            .await
            .map_err(StoreError::read)?;
        rows.iter().map(process_from).collect()
    }
}
