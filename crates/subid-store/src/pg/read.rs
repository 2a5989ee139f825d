//! Reads from the fleet's PostgreSQL store, through a pool of connections, each within the
//! deadline.

use sqlx::postgres::PgPool;

use super::{PgConfig, timed};
use crate::record::{EVENT_COLUMNS, LEASE_COLUMNS, event_from, lease_from};
use crate::{EventRecord, LeaseFilter, LeaseRecord, StoreError};

/// Read access to the PostgreSQL store; cheap to clone.
#[derive(Clone, Debug)]
pub(crate) struct PgReader {
    pool: PgPool,
    config: PgConfig,
}

/// Maps a failed read, naming the store.
fn read_err(config: &PgConfig) -> impl Fn(sqlx::Error) -> StoreError + '_ {
    move |e| match StoreError::read(e) {
        StoreError::Unreachable { source, .. } => StoreError::Unreachable {
            target: config.redacted(),
            source,
        },
        other => other,
    }
}

impl PgReader {
    pub(crate) fn new(pool: PgPool, config: PgConfig) -> PgReader {
        PgReader { pool, config }
    }

    async fn leases(
        &self,
        what: &'static str,
        query: sqlx::query::Query<'_, sqlx::Postgres, sqlx::postgres::PgArguments>,
    ) -> Result<Vec<LeaseRecord>, StoreError> {
        let rows = timed(self.config.timeout, what, async {
            query
                .fetch_all(&self.pool)
                .await
                .map_err(read_err(&self.config))
        })
        .await?;
        rows.iter().map(lease_from).collect()
    }

    pub(crate) async fn get_lease(&self, name: &str) -> Result<Option<LeaseRecord>, StoreError> {
        let sql = format!(
            "SELECT {LEASE_COLUMNS} FROM lease WHERE name = $1 \
             ORDER BY state = 'active' DESC, released_at DESC NULLS FIRST, id DESC LIMIT 1"
        );
        let mut rows = self
            .leases("a lease read", sqlx::query(&sql).bind(name))
            .await?;
        Ok(rows.pop())
    }

    pub(crate) async fn get_lease_by_id(&self, id: i64) -> Result<Option<LeaseRecord>, StoreError> {
        let sql = format!("SELECT {LEASE_COLUMNS} FROM lease WHERE id = $1");
        let mut rows = self
            .leases("a lease read", sqlx::query(&sql).bind(id))
            .await?;
        Ok(rows.pop())
    }

    pub(crate) async fn list_leases_page(
        &self,
        filter: &LeaseFilter,
        after: Option<(&str, i64)>,
        limit: u32,
    ) -> Result<Vec<LeaseRecord>, StoreError> {
        let mut sql = format!("SELECT {LEASE_COLUMNS} FROM lease WHERE true");
        let mut n = 0;
        let mut next = || {
            n += 1;
            n
        };
        if filter.state.is_some() {
            sql.push_str(&format!(" AND state = ${}", next()));
        }
        if after.is_some() {
            let (a, b) = (next(), next());
            sql.push_str(&format!(" AND (name, id) > (${a}, ${b})"));
        }
        if !filter.labels.is_empty() {
            sql.push_str(&format!(" AND labels::jsonb @> ${}::jsonb", next()));
        }
        sql.push_str(&format!(" ORDER BY name, id LIMIT ${}", next()));
        let mut query = sqlx::query(&sql);
        if let Some(state) = filter.state {
            query = query.bind(state.as_str());
        }
        if let Some((name, id)) = after {
            query = query.bind(name.to_string()).bind(id);
        }
        if !filter.labels.is_empty() {
            let wanted: serde_json::Map<String, serde_json::Value> = filter
                .labels
                .iter()
                .map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone())))
                .collect();
            query = query.bind(serde_json::Value::Object(wanted).to_string());
        }
        self.leases("a lease list", query.bind(i64::from(limit)))
            .await
    }

    pub(crate) async fn active_names(&self) -> Result<Vec<String>, StoreError> {
        timed(self.config.timeout, "a list of names", async {
            sqlx::query_scalar("SELECT name FROM lease WHERE state = 'active' ORDER BY name")
                .fetch_all(&self.pool)
                .await
                .map_err(read_err(&self.config))
        })
        .await
    }

    pub(crate) async fn stale_capped_names(&self) -> Result<Vec<String>, StoreError> {
        timed(self.config.timeout, "a list of names", async {
            sqlx::query_scalar(crate::sqlite::STALE_CAPPED)
                .fetch_all(&self.pool)
                .await
                .map_err(read_err(&self.config))
        })
        .await
    }

    pub(crate) async fn lease_holding(
        &self,
        block_start: u32,
    ) -> Result<Option<LeaseRecord>, StoreError> {
        let sql = format!(
            "SELECT {LEASE_COLUMNS} FROM lease WHERE id = \
             (SELECT lease_id FROM block WHERE start = $1 AND lease_id IS NOT NULL)"
        );
        let mut rows = self
            .leases(
                "a lease read",
                sqlx::query(&sql).bind(i64::from(block_start)),
            )
            .await?;
        Ok(rows.pop())
    }

    pub(crate) async fn expired_leases(&self, now_ms: i64) -> Result<Vec<LeaseRecord>, StoreError> {
        let sql = format!(
            "SELECT {LEASE_COLUMNS} FROM lease WHERE state = 'active' \
             AND expires_at IS NOT NULL AND expires_at <= $1 ORDER BY expires_at"
        );
        self.leases("a list of expired leases", sqlx::query(&sql).bind(now_ms))
            .await
    }

    async fn event_rows(
        &self,
        query: sqlx::query::Query<'_, sqlx::Postgres, sqlx::postgres::PgArguments>,
    ) -> Result<Vec<EventRecord>, StoreError> {
        let rows = timed(self.config.timeout, "an event read", async {
            query
                .fetch_all(&self.pool)
                .await
                .map_err(read_err(&self.config))
        })
        .await?;
        rows.iter().map(event_from).collect()
    }

    pub(crate) async fn events(&self, name: &str) -> Result<Vec<EventRecord>, StoreError> {
        let sql = format!(
            "SELECT {EVENT_COLUMNS} FROM event WHERE lease_name = $1 \
             AND kind IN ('create', 'renew', 'release', 'expire', 'purge') ORDER BY id"
        );
        self.event_rows(sqlx::query(&sql).bind(name)).await
    }

    pub(crate) async fn events_after(
        &self,
        after: i64,
        limit: u32,
    ) -> Result<Vec<EventRecord>, StoreError> {
        let sql = format!("SELECT {EVENT_COLUMNS} FROM event WHERE id > $1 ORDER BY id LIMIT $2");
        self.event_rows(sqlx::query(&sql).bind(after).bind(i64::from(limit)))
            .await
    }

    pub(crate) async fn last_event_id(&self) -> Result<i64, StoreError> {
        timed(self.config.timeout, "an event read", async {
            sqlx::query_scalar("SELECT COALESCE(MAX(id), 0)::BIGINT FROM event")
                .fetch_one(&self.pool)
                .await
                .map_err(read_err(&self.config))
        })
        .await
    }

    pub(crate) async fn active_lease_count(&self) -> Result<u64, StoreError> {
        let count: i64 = timed(self.config.timeout, "a lease count", async {
            sqlx::query_scalar("SELECT COUNT(*) FROM lease WHERE state = 'active'")
                .fetch_one(&self.pool)
                .await
                .map_err(read_err(&self.config))
        })
        .await?;
        Ok(u64::try_from(count).unwrap_or(0))
    }
}
