//! Reads from the fleet's PostgreSQL store, through a pool of connections, each within the
//! deadline.

use sqlx::postgres::PgPool;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use super::{Health, PgConfig, timed};
use crate::record::{Cols, EVENT_COLUMNS, PG_LEASE_COLUMNS, event_from, lease_from};
use crate::{EventRecord, FleetClaim, LeaseFilter, LeaseHost, LeaseRecord, StoreError};

/// Read access to the PostgreSQL store; cheap to clone.
#[derive(Clone, Debug)]
pub(crate) struct PgReader {
    pool: PgPool,
    config: PgConfig,
    health: Arc<Health>,
    /// The active lease count as last read, for `/metrics` while the server is out of reach.
    last_count: Arc<AtomicU64>,
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
    pub(crate) fn new(pool: PgPool, config: PgConfig, health: Arc<Health>) -> PgReader {
        PgReader {
            pool,
            config,
            health,
            last_count: Arc::new(AtomicU64::new(0)),
        }
    }

    /// Whether the server failed to answer lately: reads of leases this host knows then go to
    /// its own copies first (one read a second still tries the server, to notice it is back).
    pub(crate) fn down(&self) -> bool {
        self.health.is_down()
            && self
                .health
                .down_within(self.config.timeout.max(Duration::from_secs(1)))
    }

    /// The deadline of each operation.
    pub(crate) fn timeout(&self) -> Duration {
        self.config.timeout
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
        .await;
        self.health.note(&rows);
        rows?.iter().map(lease_from).collect()
    }

    pub(crate) async fn get_lease(&self, name: &str) -> Result<Option<LeaseRecord>, StoreError> {
        let sql = format!(
            "SELECT {PG_LEASE_COLUMNS} FROM lease WHERE name = $1 \
             ORDER BY state = 'active' DESC, released_at DESC NULLS FIRST, id DESC LIMIT 1"
        );
        let mut rows = self
            .leases("a lease read", sqlx::query(&sql).bind(name))
            .await?;
        Ok(rows.pop())
    }

    pub(crate) async fn get_lease_by_id(&self, id: i64) -> Result<Option<LeaseRecord>, StoreError> {
        let sql = format!("SELECT {PG_LEASE_COLUMNS} FROM lease WHERE id = $1");
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
        let mut sql = format!("SELECT {PG_LEASE_COLUMNS} FROM lease WHERE true");
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
            "SELECT {PG_LEASE_COLUMNS} FROM lease WHERE id = \
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
            "SELECT {PG_LEASE_COLUMNS} FROM lease WHERE state = 'active' \
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

    /// The number of active leases; while the server is out of reach, the number last read
    /// (for `/metrics`, which keeps answering in an outage).
    pub(crate) async fn active_lease_count(&self) -> Result<u64, StoreError> {
        if self.down() {
            return Ok(self.last_count.load(Ordering::Relaxed));
        }
        let count: Result<i64, StoreError> = timed(self.config.timeout, "a lease count", async {
            sqlx::query_scalar("SELECT COUNT(*) FROM lease WHERE state = 'active'")
                .fetch_one(&self.pool)
                .await
                .map_err(read_err(&self.config))
        })
        .await;
        self.health.note(&count);
        match count {
            Ok(count) => {
                let count = u64::try_from(count).unwrap_or(0);
                self.last_count.store(count, Ordering::Relaxed);
                Ok(count)
            }
            Err(error) if error.is_unreachable() => Ok(self.last_count.load(Ordering::Relaxed)),
            Err(error) => Err(error),
        }
    }
}

/// What only a fleet has: other hosts' claims, where leases have state, releases waiting.
impl PgReader {
    pub(crate) fn host_id(&self) -> &str {
        &self.config.host_id
    }

    pub(crate) async fn fleet_claims(&self) -> Result<Vec<FleetClaim>, StoreError> {
        let rows: Vec<(String, i64, i64, String, String)> =
            timed(self.config.timeout, "the fleet's claims", async {
                sqlx::query_as(
                    "SELECT host_id, first_block, block_count, kind, source FROM claim \
                     ORDER BY host_id, first_block",
                )
                .fetch_all(&self.pool)
                .await
                .map_err(read_err(&self.config))
            })
            .await?;
        Ok(rows.into_iter().filter_map(fleet_claim).collect())
    }

    pub(crate) async fn lease_hosts(&self, lease_id: i64) -> Result<Vec<LeaseHost>, StoreError> {
        let rows: Vec<(String, bool)> = timed(self.config.timeout, "a lease's hosts", async {
            sqlx::query_as(
                "SELECT host_id, live FROM lease_host WHERE lease_id = $1 ORDER BY host_id",
            )
            .bind(lease_id)
            .fetch_all(&self.pool)
            .await
            .map_err(read_err(&self.config))
        })
        .await?;
        Ok(rows
            .into_iter()
            .map(|(host, live)| LeaseHost { host, live })
            .collect())
    }

    /// Leases where this host has state and that are released, or whose release waits for
    /// the hosts to stop their processes.
    pub(crate) async fn to_clean_up(&self) -> Result<Vec<LeaseRecord>, StoreError> {
        let sql = format!(
            "SELECT {PG_LEASE_COLUMNS} FROM lease l JOIN lease_host h ON h.lease_id = l.id \
             WHERE h.host_id = $1 AND (l.state = 'released' OR l.release_requested_at IS NOT NULL) \
             ORDER BY l.id"
        );
        self.leases(
            "the leases to clean up",
            sqlx::query(&sql).bind(&self.config.host_id),
        )
        .await
    }

    /// Leases where this host said it has live processes.
    pub(crate) async fn live_here(&self) -> Result<Vec<LeaseRecord>, StoreError> {
        let sql = format!(
            "SELECT {PG_LEASE_COLUMNS} FROM lease l JOIN lease_host h ON h.lease_id = l.id \
             WHERE h.host_id = $1 AND h.live ORDER BY l.id"
        );
        self.leases(
            "the leases live here",
            sqlx::query(&sql).bind(&self.config.host_id),
        )
        .await
    }

    /// Active leases whose release waits and that no host has live processes of any more.
    pub(crate) async fn releasable(&self) -> Result<Vec<i64>, StoreError> {
        timed(self.config.timeout, "the releases due", async {
            sqlx::query_scalar(
                "SELECT id FROM lease l WHERE state = 'active' \
                 AND release_requested_at IS NOT NULL AND NOT EXISTS \
                 (SELECT 1 FROM lease_host h WHERE h.lease_id = l.id AND h.live) ORDER BY id",
            )
            .fetch_all(&self.pool)
            .await
            .map_err(read_err(&self.config))
        })
        .await
    }

    /// Up to `limit` leases changed after change number `seq`, oldest change first, each with
    /// its change number.
    pub(crate) async fn lease_changes_since(
        &self,
        seq: i64,
        limit: u32,
    ) -> Result<Vec<(LeaseRecord, i64)>, StoreError> {
        let sql = format!(
            "SELECT {PG_LEASE_COLUMNS}, seq FROM lease WHERE seq > $1 ORDER BY seq LIMIT $2"
        );
        let rows = timed(self.config.timeout, "the lease changes", async {
            sqlx::query(&sql)
                .bind(seq)
                .bind(i64::from(limit))
                .fetch_all(&self.pool)
                .await
                .map_err(read_err(&self.config))
        })
        .await?;
        rows.iter()
            .map(|r| Ok((lease_from(r)?, r.i64("seq")?)))
            .collect()
    }

    pub(crate) async fn store_id(&self) -> Result<Option<String>, StoreError> {
        timed(self.config.timeout, "the store's id", async {
            sqlx::query_scalar("SELECT value FROM pool_meta WHERE key = 'store_id'")
                .fetch_optional(&self.pool)
                .await
                .map_err(read_err(&self.config))
        })
        .await
    }

    /// A listener on [`super::CHANNEL`]: every lease-writing commit notifies it.
    pub(crate) async fn listen(&self) -> Result<sqlx::postgres::PgListener, StoreError> {
        timed(self.config.timeout, "a listening session", async {
            let mut listener = sqlx::postgres::PgListener::connect_with(&self.pool)
                .await
                .map_err(read_err(&self.config))?;
            listener
                .listen(super::CHANNEL)
                .await
                .map_err(read_err(&self.config))?;
            Ok(listener)
        })
        .await
    }
}

/// A claim row; rows of an unknown kind or out of range are skipped.
pub(crate) fn fleet_claim(
    (host, first, count, kind, source): (String, i64, i64, String, String),
) -> Option<FleetClaim> {
    Some(FleetClaim {
        host,
        first: u32::try_from(first).ok()?,
        count: u32::try_from(count).ok()?,
        process: match kind.as_str() {
            "process" => true,
            "claim" => false,
            _ => return None,
        },
        source,
    })
}
