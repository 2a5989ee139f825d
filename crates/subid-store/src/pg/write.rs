//! Lease writes to the fleet's PostgreSQL store: one connection per host, every transaction
//! under the fleet's write lock, each statement one round trip that does all of one change
//! (the lease, its blocks and its event together), each within the deadline.

use sqlx::Connection;
use sqlx::postgres::{PgConnection, PgRow};
use sqlx::{Postgres, Row};

use std::collections::HashMap;
use std::sync::Arc;

use super::{CHANNEL, FLEET_LOCK, Health, PgConfig, connect, timed};
use crate::error::{BackendError, Kind};
use crate::record::{Cols, PG_LEASE_COLUMNS, block_from, lease_from, release_detail};
use crate::{
    BlockRow, Changes, EventKind, EventRecord, FleetClaim, LeaseHost, LeaseRecord, NameState,
    NewLease, PoolMeta, ReleaseRequest, StoreError,
};

/// The writing session. Dropped (and made again at the next use) after any failure, so a
/// session left in an unknown state by a cut connection or a missed deadline is never reused.
#[derive(Debug)]
pub(crate) struct PgWriter {
    conn: Option<PgConnection>,
    config: PgConfig,
    health: Arc<Health>,
    /// The change number past which the session's statements are planned again (see
    /// [`PgWriter::replan`]); set at the first group.
    replan_at: Option<i64>,
    /// The tables' statistics are to be made again before the next group (see
    /// [`PgWriter::replan`]).
    analyze_due: bool,
}

/// The fewest change numbers between two plannings of the writer's statements.
const REPLAN_MIN: i64 = 256;

/// Maps a failed write, naming the store.
fn write_err(config: &PgConfig) -> impl Fn(sqlx::Error) -> StoreError + '_ {
    move |e| match StoreError::write(e) {
        StoreError::Unreachable { source, .. } => StoreError::Unreachable {
            target: config.redacted(),
            source,
        },
        other => other,
    }
}

impl PgWriter {
    pub(crate) fn new(conn: PgConnection, config: PgConfig, health: Arc<Health>) -> PgWriter {
        PgWriter {
            conn: Some(conn),
            config,
            health,
            replan_at: None,
            analyze_due: false,
        }
    }

    /// Fails at once, without trying, for a moment after the server could not be reached: a
    /// storm of writes during an outage then gets its 503s at once rather than each after the
    /// deadline. The first write after the moment tries again.
    fn fail_fast(&self) -> Result<(), StoreError> {
        if self.conn.is_none() && self.health.down_within(Health::RETRY_AFTER) {
            return Err(StoreError::Unreachable {
                target: self.config.redacted(),
                source: BackendError::new(
                    Kind::Connection,
                    "the server did not answer a moment ago; trying again shortly",
                ),
            });
        }
        Ok(())
    }

    /// The session, connecting first when there is none.
    async fn conn(&mut self) -> Result<&mut PgConnection, StoreError> {
        if self.conn.is_none() {
            self.conn = Some(connect(&self.config).await?);
        }
        self.conn.as_mut().ok_or_else(|| StoreError::Refused {
            reason: "no session".into(),
        })
    }

    /// Drops the session; the next use connects again.
    pub(crate) fn reopen(&mut self) {
        self.conn = None;
    }

    /// Runs `f` on the session within the deadline; any failure drops the session.
    async fn with<T>(
        &mut self,
        what: &'static str,
        f: impl AsyncFnOnce(&mut PgConnection, &PgConfig) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        self.fail_fast()?;
        let timeout = self.config.timeout;
        let config = self.config.clone();
        let result = timed(timeout, what, async {
            let conn = self.conn().await?;
            f(conn, &config).await
        })
        .await;
        self.health.note(&result);
        if result.is_err() {
            self.reopen();
        }
        result
    }

    /// Runs `f` on the session with no deadline of its own (the caller sets one); a failure
    /// drops the session.
    pub(crate) async fn session<T>(
        &mut self,
        f: impl AsyncFnOnce(&mut PgConnection, &PgConfig) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let config = self.config.clone();
        let result = match self.conn().await {
            Ok(conn) => f(conn, &config).await,
            Err(error) => Err(error),
        };
        if result.is_err() {
            self.reopen();
        }
        result
    }

    pub(crate) async fn block_rows(&mut self) -> Result<Vec<BlockRow>, StoreError> {
        self.with("the block rows", async |conn, config| {
            let rows = sqlx::query("SELECT start, lease_id, released_at FROM block ORDER BY start")
                .fetch_all(conn)
                .await
                .map_err(write_err(config))?;
            rows.iter().map(block_from).collect()
        })
        .await
    }

    pub(crate) async fn last_change(&mut self) -> Result<i64, StoreError> {
        self.with("the last change", async |conn, config| {
            sqlx::query_scalar("SELECT COALESCE(MAX(seq), 0)::BIGINT FROM block")
                .fetch_one(conn)
                .await
                .map_err(write_err(config))
        })
        .await
    }

    pub(crate) async fn last_event_id(&mut self) -> Result<i64, StoreError> {
        self.with("an event read", async |conn, config| {
            sqlx::query_scalar("SELECT COALESCE(MAX(id), 0)::BIGINT FROM event")
                .fetch_one(conn)
                .await
                .map_err(write_err(config))
        })
        .await
    }

    pub(crate) async fn first_active_outside(
        &mut self,
        base: u32,
        end: u64,
        block: u32,
    ) -> Result<Option<LeaseRecord>, StoreError> {
        self.with("a lease read", async |conn, config| {
            let sql = format!(
                "SELECT {PG_LEASE_COLUMNS} FROM lease WHERE state = 'active' AND NOT \
                 (uid_base >= $1 AND uid_base + size <= $2 AND (uid_base - $1) % $3 = 0 \
                 AND size % $3 = 0 AND size > 0) LIMIT 1"
            );
            let row = sqlx::query(&sql)
                .bind(i64::from(base))
                .bind(i64::try_from(end).unwrap_or(i64::MAX))
                .bind(i64::from(block))
                .fetch_optional(conn)
                .await
                .map_err(write_err(config))?;
            row.map(|r| lease_from(&r)).transpose()
        })
        .await
    }

    /// [`changes_on`] outside a transaction: no lock is needed to read them consistently.
    pub(crate) async fn changes_since(
        &mut self,
        seq: i64,
        claims_seq: i64,
    ) -> Result<Changes, StoreError> {
        self.with("the fleet's changes", async |conn, config| {
            changes_on(conn, config, seq, claims_seq).await
        })
        .await
    }

    /// Records the pool when the store has none; returns the stored one. Under the fleet's
    /// write lock, so two hosts starting together cannot record two pools.
    pub(crate) async fn settle_pool(&mut self, pool: PoolMeta) -> Result<PoolMeta, StoreError> {
        self.with("the pool settings", async |conn, config| {
            let mut tx = conn
                .begin_with(format!("BEGIN; SELECT pg_advisory_xact_lock({FLEET_LOCK})"))
                .await
                .map_err(write_err(config))?;
            let rows: Vec<(String, String)> = sqlx::query_as(
                "SELECT key, value FROM pool_meta WHERE key IN ('block', 'base', 'size')",
            )
            .fetch_all(&mut *tx)
            .await
            .map_err(write_err(config))?;
            let get = |key: &str| -> Result<Option<u32>, StoreError> {
                rows.iter()
                    .find(|(k, _)| k == key)
                    .map(|(_, v)| {
                        v.parse().map_err(|_| StoreError::Invalid {
                            what: format!("pool_meta.{key}"),
                            value: v.clone(),
                        })
                    })
                    .transpose()
            };
            let settled = match (get("block")?, get("base")?, get("size")?) {
                (Some(block), Some(base), Some(size)) => PoolMeta { base, size, block },
                _ => {
                    for (key, value) in [
                        ("block", pool.block),
                        ("base", pool.base),
                        ("size", pool.size),
                    ] {
                        sqlx::query(
                            "INSERT INTO pool_meta (key, value) VALUES ($1, $2) \
                             ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                        )
                        .bind(key)
                        .bind(value.to_string())
                        .execute(&mut *tx)
                        .await
                        .map_err(write_err(config))?;
                    }
                    pool
                }
            };
            tx.commit().await.map_err(write_err(config))?;
            Ok(settled)
        })
        .await
    }

    /// Starts a transaction holding the fleet's write lock. Its commit notifies [`CHANNEL`], so
    /// other hosts hear of the change at once.
    pub(crate) async fn begin(&mut self) -> Result<PgTx<'_>, StoreError> {
        Ok(self.begin_group(&[], None).await?.0)
    }

    /// [`PgWriter::begin`], then the block rows changed after change number `changes.0` (and
    /// the fleet's claims when their version moved past `changes.1`), and the state of each of
    /// `names`, read under the lock.
    ///
    /// `BEGIN`, the lock, the `NOTIFY` and the last change number handed out are one simple
    /// query (its only value, the host id, is checked plain). The reads follow as prepared
    /// statements: planning them again at every write, as a simple query does, cost more than
    /// the round trips they share. The changes are not read when the last change number is
    /// `changes.0` itself, a watermark from [`PgTx::commit_seq`]: nobody has committed since.
    pub(crate) async fn begin_group(
        &mut self,
        names: &[String],
        changes: Option<(i64, i64)>,
    ) -> Result<(PgTx<'_>, Option<Changes>, HashMap<String, NameState>), StoreError> {
        self.fail_fast()?;
        let config = self.config.clone();
        if std::mem::take(&mut self.analyze_due) {
            self.analyze().await;
        }
        if self.conn.is_none() {
            let connected = connect(&config).await;
            self.health.note(&connected);
            self.conn = Some(connected?);
        }
        // The payload names this host, so that it can skip its own notifications. Host ids
        // are checked plain ([A-Za-z0-9_.-]); quotes are doubled all the same.
        let host = config.host_id.replace('\'', "''");
        let mut text = format!(
            "BEGIN; SELECT pg_advisory_xact_lock({FLEET_LOCK}); NOTIFY {CHANNEL}, '{host}'"
        );
        if changes.is_some() {
            // The last change number handed out: when it is the one this host saw at its last
            // commit, nobody has changed anything since, and there is nothing to read.
            text.push_str("; SELECT last_value AS last_change FROM change_seq");
        }
        let health = Arc::clone(&self.health);
        let last_change = {
            let Some(conn) = self.conn.as_mut() else {
                return Err(StoreError::Refused {
                    reason: "no session".into(),
                });
            };
            let begun = timed(config.timeout, "the fleet's write lock", async {
                sqlx::raw_sql(&text)
                    .fetch_all(&mut *conn)
                    .await
                    .map_err(write_err(&config))
            })
            .await;
            health.note(&begun);
            match begun {
                Ok(rows) => rows
                    .iter()
                    .find(|r| r.try_column("last_change").is_ok())
                    .map(|r| r.i64("last_change"))
                    .transpose(),
                Err(error) => Err(error),
            }
        };
        let last_change = match last_change {
            Ok(last) => last,
            Err(error) => {
                // The session may be inside the transaction, or in no known state.
                self.conn = None;
                return Err(error);
            }
        };
        if let Some(last) = last_change {
            let next = last.saturating_mul(2).max(last.saturating_add(REPLAN_MIN));
            match self.replan_at {
                // The session's plans are being made now, from the tables as they are.
                None => self.replan_at = Some(next),
                Some(at) if last >= at => {
                    if let Err(error) = self.replan().await {
                        self.conn = None;
                        return Err(error);
                    }
                    self.replan_at = Some(next);
                    self.analyze_due = true;
                }
                Some(_) => {}
            }
        }
        let mut tx = PgTx {
            slot: &mut self.conn,
            open: true,
            config,
            health,
        };
        let found = match changes {
            Some((seq, claims_seq)) if last_change == Some(seq) => Some(Changes {
                seq,
                claims_seq,
                ..Changes::default()
            }),
            Some((seq, claims_seq)) => Some(tx.changes_since(seq, claims_seq).await?),
            None => None,
        };
        let states = if names.is_empty() {
            HashMap::new()
        } else {
            tx.name_states(names).await?
        };
        Ok((tx, found, states))
    }

    /// Forgets the session's prepared statements, so that each is planned again at its next
    /// use, from the tables' statistics and sizes of now.
    ///
    /// The session plans each statement once (see [`super::connect`]) and keeps the plan until
    /// the server's statistics of a table change (an `ANALYZE`). A plan made while they said a
    /// table was empty, as in a fresh fleet, found every index as cheap as any other: the
    /// fleet benchmark caught two of three hosts looking names up by a walk of the whole
    /// exclusion index (0.46 ms a name at 3,000 leases, against 0.01 on the third host). So
    /// [`PgWriter::begin_group`] plans again each time the fleet's change number has doubled
    /// since the session's first group (and moved by [`REPLAN_MIN`]): some twenty times on
    /// the way to 100,000 leases, a few statements each. Before the next group, outside the
    /// fleet's lock, it also has the server make the statistics of the lease tables again
    /// ([`PgWriter::analyze`]), for every session's plans, readers' included.
    async fn replan(&mut self) -> Result<(), StoreError> {
        let config = self.config.clone();
        let Some(conn) = self.conn.as_mut() else {
            return Ok(());
        };
        timed(config.timeout, "planning again", async {
            conn.clear_cached_statements()
                .await
                .map_err(write_err(&config))
        })
        .await
    }

    /// `ANALYZE` of the tables a fleet grows, outside any transaction, within the deadline.
    /// Autovacuum does it too, but only after a while (a minute or more); meanwhile, after a
    /// fast growth, plans are made from statistics of a far smaller table (the readers' page
    /// of a lease list sorted every lease after the cursor). The server invalidates every
    /// session's plans of a table it analyzes. A failure is only logged (a role that does not
    /// own the tables gets a warning from the server, and nothing is done); a session that
    /// failed is dropped, and the group connects again.
    async fn analyze(&mut self) {
        let config = self.config.clone();
        let Some(conn) = self.conn.as_mut() else {
            return;
        };
        let done = timed(config.timeout, "the tables' statistics", async {
            sqlx::raw_sql("ANALYZE lease, block")
                .execute(&mut *conn)
                .await
                .map_err(write_err(&config))
        })
        .await;
        if let Err(error) = done {
            tracing::warn!(%error, "cannot make the lease tables' statistics again");
            self.conn = None;
        }
    }
}

/// The active lease and the last released one of each name of `$1` (see [`PgTx::name_states`]).
pub(crate) fn name_states_sql() -> String {
    format!(
        "SELECT l.* FROM unnest($1::text[]) AS n(name) CROSS JOIN LATERAL ( \
            (SELECT {PG_LEASE_COLUMNS} FROM lease WHERE lease.name = n.name \
                AND state = 'active') \
            UNION ALL (SELECT {PG_LEASE_COLUMNS} FROM lease WHERE lease.name = n.name \
                AND state = 'released' ORDER BY released_at DESC, id DESC LIMIT 1)) AS l"
    )
}

/// Block rows read per statement by [`changes_on`]; it reads on while a page comes back full.
const CHANGES_PAGE: i64 = 4096;

/// Block rows changed after `seq` and, when their version moved past `claims_seq`, every host's
/// claims. Change numbers are handed out under the fleet's lock and the lock is held to commit,
/// so a reader (with or without the lock) that saw number N has seen every smaller one.
///
/// Read in pages in `(seq, start)` order, the order of the `block_seq_start` index, so that
/// the statement's generic plan walks the index however many rows there are. The blocks of
/// one lease share its change number: a page may end inside them, and the next goes on from
/// the last block read.
async fn changes_on(
    conn: &mut PgConnection,
    config: &PgConfig,
    seq: i64,
    claims_seq: i64,
) -> Result<Changes, StoreError> {
    let mut changes = Changes {
        seq,
        claims_seq,
        ..Changes::default()
    };
    let mut after = (seq, i64::MAX);
    loop {
        let rows = sqlx::query(
            "SELECT h.claims_seq, b.start, b.lease_id, b.released_at, b.seq \
             FROM (SELECT COALESCE(MAX(claims_seq), 0)::BIGINT AS claims_seq FROM host) AS h \
             LEFT JOIN LATERAL (SELECT start, lease_id, released_at, seq FROM block \
                WHERE (seq, start) > ($1, $2) ORDER BY seq, start LIMIT $3) AS b ON true",
        )
        .bind(after.0)
        .bind(after.1)
        .bind(CHANGES_PAGE)
        .fetch_all(&mut *conn)
        .await
        .map_err(write_err(config))?;
        let mut read = 0;
        for row in &rows {
            changes.claims_seq = row.i64("claims_seq")?;
            let Some(start) = row.opt_i64("start")? else {
                continue;
            };
            read += 1;
            changes.blocks.push(block_from(row)?);
            after = (row.i64("seq")?, start);
            changes.seq = changes.seq.max(after.0);
        }
        if read < CHANGES_PAGE {
            break;
        }
    }
    if changes.claims_seq != claims_seq {
        let rows: Vec<(String, i64, i64, String, String)> = sqlx::query_as(
            "SELECT host_id, first_block, block_count, kind, source FROM claim \
             ORDER BY host_id, first_block",
        )
        .fetch_all(&mut *conn)
        .await
        .map_err(write_err(config))?;
        changes.claims = Some(
            rows.into_iter()
                .filter_map(super::read::fleet_claim)
                .collect(),
        );
    }
    Ok(changes)
}

/// One write transaction under the fleet's lock. Dropping it without [`PgTx::commit`] rolls
/// everything back (and the writer drops the session after a failure anyway).
///
/// The transaction is the writer's session itself, begun with a plain `BEGIN`: dropping it
/// without [`PgTx::commit`] drops the session, and the server rolls the transaction back (and
/// lets go of the lock) as the session closes.
pub(crate) struct PgTx<'c> {
    slot: &'c mut Option<PgConnection>,
    /// Not yet committed.
    open: bool,
    config: PgConfig,
    health: Arc<Health>,
}

impl Drop for PgTx<'_> {
    fn drop(&mut self) {
        if self.open {
            *self.slot = None;
        }
    }
}

impl PgTx<'_> {
    fn conn(&mut self) -> Result<&mut PgConnection, StoreError> {
        self.slot.as_mut().ok_or_else(|| StoreError::Refused {
            reason: "the session was dropped".into(),
        })
    }

    async fn fetch_all(
        &mut self,
        what: &'static str,
        query: sqlx::query::Query<'_, Postgres, sqlx::postgres::PgArguments>,
    ) -> Result<Vec<PgRow>, StoreError> {
        let config = self.config.clone();
        let conn = self.conn()?;
        let rows = timed(config.timeout, what, async {
            query
                .fetch_all(&mut *conn)
                .await
                .map_err(write_err(&config))
        })
        .await;
        self.health.note(&rows);
        rows
    }

    pub(crate) async fn lease_by_id(&mut self, id: i64) -> Result<Option<LeaseRecord>, StoreError> {
        let sql = format!("SELECT {PG_LEASE_COLUMNS} FROM lease WHERE id = $1");
        let rows = self
            .fetch_all("a lease read", sqlx::query(&sql).bind(id))
            .await?;
        rows.first().map(lease_from).transpose()
    }

    pub(crate) async fn name_state(&mut self, name: &str) -> Result<NameState, StoreError> {
        let mut states = self.name_states(&[name.to_string()]).await?;
        Ok(states.remove(name).unwrap_or_default())
    }

    /// The active lease and the last released one of each of `names`. Each name is looked up
    /// by its own index scan (a nested loop over the names), which the writer's generic plan
    /// keeps however few rows the table had when the statement was prepared.
    pub(crate) async fn name_states(
        &mut self,
        names: &[String],
    ) -> Result<HashMap<String, NameState>, StoreError> {
        let sql = name_states_sql();
        let rows = self
            .fetch_all("a lease read", sqlx::query(&sql).bind(names.to_vec()))
            .await?;
        let mut all: HashMap<String, NameState> = names
            .iter()
            .map(|n| (n.clone(), NameState::default()))
            .collect();
        for row in &rows {
            let lease = lease_from(row)?;
            let entry = all.entry(lease.name.clone()).or_default();
            match lease.state {
                subid_core::LeaseState::Active => entry.active = Some(lease),
                subid_core::LeaseState::Released => entry.last_released = Some(lease),
            }
        }
        Ok(all)
    }

    pub(crate) async fn active_lease(
        &mut self,
        name: &str,
    ) -> Result<Option<LeaseRecord>, StoreError> {
        Ok(self.name_state(name).await?.active)
    }

    pub(crate) async fn last_released(
        &mut self,
        name: &str,
    ) -> Result<Option<LeaseRecord>, StoreError> {
        Ok(self.name_state(name).await?.last_released)
    }

    pub(crate) async fn range_held_since(
        &mut self,
        old: &LeaseRecord,
        since_ms: i64,
    ) -> Result<bool, StoreError> {
        let rows = self
            .fetch_all(
                "a lease read",
                sqlx::query(
                    "SELECT COUNT(*) AS n FROM lease WHERE created_at >= $1 AND uid_base < $2 \
                     AND uid_base + size > $3 AND id <> $4",
                )
                .bind(since_ms)
                .bind(i64::from(old.uid_base) + i64::from(old.size))
                .bind(i64::from(old.uid_base))
                .bind(old.id),
            )
            .await?;
        let count = rows.first().map(|r| r.i64("n")).transpose()?.unwrap_or(0);
        Ok(count > 0)
    }

    pub(crate) async fn expired(&mut self, now_ms: i64) -> Result<Vec<LeaseRecord>, StoreError> {
        let sql = format!(
            "SELECT {PG_LEASE_COLUMNS} FROM lease WHERE state = 'active' \
             AND expires_at IS NOT NULL AND expires_at <= $1 ORDER BY expires_at"
        );
        let rows = self
            .fetch_all("a lease read", sqlx::query(&sql).bind(now_ms))
            .await?;
        rows.iter().map(lease_from).collect()
    }

    pub(crate) async fn insert_lease(
        &mut self,
        new: &NewLease,
        block: u32,
    ) -> Result<LeaseRecord, StoreError> {
        let (labels, rlimits, namespaces) = new.json_columns()?;
        let to_i64 = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        let blocks = i64::from(new.size / block.max(1));
        let host = self.config.host_id.clone();
        let query = sqlx::query(
            "WITH l AS ( \
                INSERT INTO lease (name, uid_base, gid_base, size, state, labels, ttl_seconds, \
                    created_at, expires_at, created_by, rlimits, namespaces, pids_max, \
                    max_processes, created_host) \
                VALUES ($1, $2, $3, $4, 'active', $5, $6, $7, $8, $9, $10, $11, $12, $13, $14) \
                RETURNING id, seq), \
             b AS ( \
                INSERT INTO block (start, lease_id, released_at, seq) \
                SELECT $2 + i * $15, l.id, NULL, l.seq FROM l, generate_series(0, $16 - 1) AS i \
                ON CONFLICT (start) DO UPDATE SET lease_id = excluded.lease_id, \
                    released_at = NULL, seq = excluded.seq WHERE block.lease_id IS NULL \
                RETURNING start), \
             e AS ( \
                INSERT INTO event (id, at, kind, lease_id, lease_name, caller_uid, detail, host_id) \
                SELECT nextval('event_id'), $7, 'create', l.id, $1, $9, $17, $14 FROM l) \
             SELECT l.id AS id, (SELECT COUNT(*) FROM b) AS taken FROM l",
        )
        .bind(&new.name)
        .bind(i64::from(new.uid_base))
        .bind(i64::from(new.gid_base))
        .bind(i64::from(new.size))
        .bind(labels)
        .bind(new.ttl_seconds.map(i64::from))
        .bind(new.created_at)
        .bind(new.expires_at)
        .bind(new.created_by.map(i64::from))
        .bind(rlimits)
        .bind(namespaces)
        .bind(new.pids_max.map(to_i64))
        .bind(new.max_processes.map(to_i64))
        .bind(host)
        .bind(i64::from(block))
        .bind(blocks)
        .bind(new.create_detail());
        let rows = match self.fetch_all("a lease insert", query).await {
            Ok(rows) => rows,
            // The exclusion constraint saw an active lease on these ids first.
            Err(e) if e.is_constraint() && e.to_string().contains("lease_active_disjoint") => {
                return Err(StoreError::BlockHeld {
                    start: u64::from(new.uid_base),
                });
            }
            Err(e) => return Err(e),
        };
        let row = rows.first().ok_or_else(|| StoreError::Invalid {
            what: "lease insert".into(),
            value: "no row".into(),
        })?;
        let id = row.i64("id")?;
        if row.i64("taken")? != blocks {
            return Err(StoreError::BlockHeld {
                start: u64::from(new.uid_base),
            });
        }
        Ok(new.clone().into_record(id))
    }

    pub(crate) async fn insert_leases(
        &mut self,
        news: &[NewLease],
        block: u32,
    ) -> Result<Vec<LeaseRecord>, StoreError> {
        match news {
            [] => return Ok(Vec::new()),
            [one] => return Ok(vec![self.insert_lease(one, block).await?]),
            _ => {}
        }
        let to_i64 = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        let mut labels = Vec::with_capacity(news.len());
        let mut rlimits = Vec::with_capacity(news.len());
        let mut namespaces = Vec::with_capacity(news.len());
        for new in news {
            let (l, r, n) = new.json_columns()?;
            labels.push(l);
            rlimits.push(r);
            namespaces.push(n);
        }
        let col = |f: fn(&NewLease) -> i64| news.iter().map(f).collect::<Vec<i64>>();
        let opt = |f: fn(&NewLease) -> Option<i64>| news.iter().map(f).collect::<Vec<_>>();
        let blocks: i64 = news.iter().map(|n| i64::from(n.size / block.max(1))).sum();
        let host = self.config.host_id.clone();
        // Event ids follow the order of `news` (volatile functions of a select list are
        // computed after its ORDER BY).
        let query = sqlx::query(
            "WITH n AS (SELECT * FROM unnest($1::text[], $2::int8[], $3::int8[], $4::int8[], \
                $5::text[], $6::int8[], $7::int8[], $8::int8[], $9::int8[], $10::text[], \
                $11::text[], $12::int8[], $13::int8[], $14::text[]) WITH ORDINALITY AS t(name, \
                uid_base, gid_base, size, labels, ttl_seconds, created_at, expires_at, \
                created_by, rlimits, namespaces, pids_max, max_processes, detail, ord)), \
             l AS (INSERT INTO lease (name, uid_base, gid_base, size, state, labels, ttl_seconds, \
                created_at, expires_at, created_by, rlimits, namespaces, pids_max, \
                max_processes, created_host) \
                SELECT name, uid_base, gid_base, size, 'active', labels, ttl_seconds, created_at, \
                expires_at, created_by, rlimits, namespaces, pids_max, max_processes, $15 \
                FROM n ORDER BY ord RETURNING id, name, uid_base, size, seq), \
             b AS (INSERT INTO block (start, lease_id, released_at, seq) \
                SELECT l.uid_base + i * $16, l.id, NULL, l.seq FROM l, \
                generate_series(0, l.size / $16 - 1) AS i \
                ON CONFLICT (start) DO UPDATE SET lease_id = excluded.lease_id, \
                    released_at = NULL, seq = excluded.seq WHERE block.lease_id IS NULL \
                RETURNING start), \
             e AS (INSERT INTO event (id, at, kind, lease_id, lease_name, caller_uid, detail, \
                host_id) SELECT nextval('event_id'), n.created_at, 'create', l.id, n.name, \
                n.created_by, n.detail, $15 FROM l JOIN n ON n.name = l.name ORDER BY n.ord) \
             SELECT l.id AS id, l.name AS name, (SELECT COUNT(*) FROM b) AS taken FROM l",
        )
        .bind(news.iter().map(|n| n.name.clone()).collect::<Vec<_>>())
        .bind(col(|n| i64::from(n.uid_base)))
        .bind(col(|n| i64::from(n.gid_base)))
        .bind(col(|n| i64::from(n.size)))
        .bind(labels)
        .bind(opt(|n| n.ttl_seconds.map(i64::from)))
        .bind(col(|n| n.created_at))
        .bind(opt(|n| n.expires_at))
        .bind(opt(|n| n.created_by.map(i64::from)))
        .bind(rlimits)
        .bind(namespaces)
        .bind(
            news.iter()
                .map(|n| n.pids_max.map(to_i64))
                .collect::<Vec<_>>(),
        )
        .bind(
            news.iter()
                .map(|n| n.max_processes.map(to_i64))
                .collect::<Vec<_>>(),
        )
        .bind(news.iter().map(NewLease::create_detail).collect::<Vec<_>>())
        .bind(host)
        .bind(i64::from(block));
        let rows = match self.fetch_all("a lease insert", query).await {
            Ok(rows) => rows,
            Err(e) if e.is_constraint() && e.to_string().contains("lease_active_disjoint") => {
                return Err(StoreError::BlockHeld {
                    start: u64::from(news[0].uid_base),
                });
            }
            Err(e) => return Err(e),
        };
        let mut ids = HashMap::new();
        let mut taken = 0;
        for row in &rows {
            ids.insert(row.text("name")?, row.i64("id")?);
            taken = row.i64("taken")?;
        }
        if taken != blocks {
            return Err(StoreError::BlockHeld {
                start: u64::from(news[0].uid_base),
            });
        }
        news.iter()
            .map(|n| {
                let id = ids
                    .get(&n.name)
                    .copied()
                    .ok_or_else(|| StoreError::Invalid {
                        what: "lease insert".into(),
                        value: format!("no id for {}", n.name),
                    })?;
                Ok(n.clone().into_record(id))
            })
            .collect()
    }

    pub(crate) async fn renew(
        &mut self,
        lease: &LeaseRecord,
        expires_at: i64,
        now_ms: i64,
        caller: Option<u32>,
    ) -> Result<(), StoreError> {
        let detail = serde_json::json!({ "expires_at": expires_at }).to_string();
        let host = self.config.host_id.clone();
        let rows = self
            .fetch_all(
                "a lease renewal",
                sqlx::query(
                    "WITH u AS (UPDATE lease SET expires_at = $1, seq = nextval('change_seq') \
                        WHERE id = $2 AND state = 'active' RETURNING id, name), \
                     e AS (INSERT INTO event (id, at, kind, lease_id, lease_name, caller_uid, \
                        detail, host_id) \
                        SELECT nextval('event_id'), $3, 'renew', u.id, u.name, $4, $5, $6 FROM u) \
                     SELECT COUNT(*) AS n FROM u",
                )
                .bind(expires_at)
                .bind(lease.id)
                .bind(now_ms)
                .bind(caller.map(i64::from))
                .bind(detail)
                .bind(host),
            )
            .await?;
        if rows.first().map(|r| r.i64("n")).transpose()? != Some(1) {
            return Err(StoreError::NotActive { id: lease.id });
        }
        Ok(())
    }

    pub(crate) async fn release(
        &mut self,
        lease: &LeaseRecord,
        kind: EventKind,
        purge: bool,
        now_ms: i64,
        caller: Option<u32>,
    ) -> Result<(), StoreError> {
        let host = self.config.host_id.clone();
        let rows = self
            .fetch_all(
                "a lease release",
                sqlx::query(
                    "WITH u AS (UPDATE lease SET state = 'released', released_at = $1, \
                        release_requested_at = NULL, release_kind = NULL, release_purge = NULL, \
                        release_caller = NULL, seq = nextval('change_seq') \
                        WHERE id = $2 AND state = 'active' RETURNING id, name, seq), \
                     b AS (UPDATE block SET lease_id = NULL, released_at = $3, \
                        seq = (SELECT seq FROM u) WHERE lease_id = $2 AND EXISTS (SELECT 1 FROM u)), \
                     e AS (INSERT INTO event (id, at, kind, lease_id, lease_name, caller_uid, \
                        detail, host_id) \
                        SELECT nextval('event_id'), $1, $4, u.id, u.name, $5, $6, $7 FROM u) \
                     SELECT COUNT(*) AS n FROM u",
                )
                .bind(now_ms)
                .bind(lease.id)
                .bind(if purge { 0 } else { now_ms })
                .bind(kind.as_str())
                .bind(caller.map(i64::from))
                .bind(release_detail(lease, purge))
                .bind(host),
            )
            .await?;
        if rows.first().map(|r| r.i64("n")).transpose()? != Some(1) {
            return Err(StoreError::NotActive { id: lease.id });
        }
        if purge {
            // A statement of its own: ids within one statement come in no set order, and the
            // purge must follow the release in the feed.
            self.event(now_ms, EventKind::Purge, lease, caller, None)
                .await?;
        }
        Ok(())
    }

    pub(crate) async fn purge_released(
        &mut self,
        lease: &LeaseRecord,
        now_ms: i64,
        caller: Option<u32>,
    ) -> Result<(), StoreError> {
        self.fetch_all(
            "a purge",
            sqlx::query(
                "UPDATE block SET released_at = 0, seq = nextval('change_seq') \
                 WHERE lease_id IS NULL AND start >= $1 AND start < $2 RETURNING start",
            )
            .bind(i64::from(lease.uid_base))
            .bind(i64::from(lease.uid_base) + i64::from(lease.size)),
        )
        .await?;
        self.event(now_ms, EventKind::Purge, lease, caller, None)
            .await
    }

    async fn event(
        &mut self,
        at: i64,
        kind: EventKind,
        lease: &LeaseRecord,
        caller: Option<u32>,
        detail: Option<&str>,
    ) -> Result<(), StoreError> {
        let host = self.config.host_id.clone();
        self.fetch_all(
            "an event",
            sqlx::query(
                "INSERT INTO event (id, at, kind, lease_id, lease_name, caller_uid, detail, host_id) \
                 VALUES (nextval('event_id'), $1, $2, $3, $4, $5, $6, $7) RETURNING id",
            )
            .bind(at)
            .bind(kind.as_str())
            .bind(lease.id)
            .bind(&lease.name)
            .bind(caller.map(i64::from))
            .bind(detail)
            .bind(host),
        )
        .await
        .map(drop)
    }

    /// Block rows changed after change number `seq`, and the fleet's claims when their version
    /// moved past `claims_seq`. Under the fleet's lock every earlier change is committed, so
    /// nothing is skipped.
    pub(crate) async fn changes_since(
        &mut self,
        seq: i64,
        claims_seq: i64,
    ) -> Result<Changes, StoreError> {
        let config = self.config.clone();
        let conn = self.conn()?;
        timed(config.timeout, "the fleet's changes", async {
            changes_on(conn, &config, seq, claims_seq).await
        })
        .await
    }

    pub(crate) async fn lease_hosts(
        &mut self,
        lease_id: i64,
    ) -> Result<Vec<LeaseHost>, StoreError> {
        let rows = self
            .fetch_all(
                "a lease's hosts",
                sqlx::query(
                    "SELECT host_id, live::int::int8 AS live FROM lease_host WHERE lease_id = $1 \
                     ORDER BY host_id",
                )
                .bind(lease_id),
            )
            .await?;
        rows.iter()
            .map(|r| {
                Ok(LeaseHost {
                    host: r.text("host_id")?,
                    live: r.i64("live")? != 0,
                })
            })
            .collect()
    }

    /// Records whether this host has live processes of the lease. Saying `live` is refused
    /// (false) unless the lease is active and no release of it waits: a host never starts a
    /// process in a lease on its way out.
    pub(crate) async fn set_presence(
        &mut self,
        lease_id: i64,
        live: bool,
        now_ms: i64,
    ) -> Result<bool, StoreError> {
        let host = self.config.host_id.clone();
        let rows = self
            .fetch_all(
                "a lease's hosts",
                sqlx::query(
                    "INSERT INTO lease_host (lease_id, host_id, live, updated_at) \
                     SELECT id, $2, $3, $4 FROM lease WHERE id = $1 AND (NOT $3 OR \
                        (state = 'active' AND release_requested_at IS NULL)) \
                     ON CONFLICT (lease_id, host_id) DO UPDATE SET live = excluded.live, \
                        updated_at = excluded.updated_at RETURNING 1 AS n",
                )
                .bind(lease_id)
                .bind(host)
                .bind(live)
                .bind(now_ms),
            )
            .await?;
        Ok(!rows.is_empty())
    }

    /// Forgets that this host has state of the lease (it has cleaned up).
    pub(crate) async fn clear_presence(&mut self, lease_id: i64) -> Result<(), StoreError> {
        let host = self.config.host_id.clone();
        self.fetch_all(
            "a lease's hosts",
            sqlx::query("DELETE FROM lease_host WHERE lease_id = $1 AND host_id = $2 RETURNING 1")
                .bind(lease_id)
                .bind(host),
        )
        .await
        .map(drop)
    }

    /// Records that the lease is to be released once no host has live processes of it.
    /// False when it is not active or a release of it waits already.
    pub(crate) async fn request_release(
        &mut self,
        lease: &LeaseRecord,
        request: &ReleaseRequest,
    ) -> Result<bool, StoreError> {
        let rows = self
            .fetch_all(
                "a release request",
                sqlx::query(
                    "UPDATE lease SET release_requested_at = $1, release_kind = $2, \
                        release_purge = $3, release_caller = $4, seq = nextval('change_seq') \
                     WHERE id = $5 AND state = 'active' AND release_requested_at IS NULL \
                     RETURNING 1",
                )
                .bind(request.at)
                .bind(request.kind.as_str())
                .bind(request.purge)
                .bind(request.caller.map(i64::from))
                .bind(lease.id),
            )
            .await?;
        Ok(!rows.is_empty())
    }

    /// The release waiting for the lease, if any.
    pub(crate) async fn release_request(
        &mut self,
        lease_id: i64,
    ) -> Result<Option<ReleaseRequest>, StoreError> {
        let rows = self
            .fetch_all(
                "a release request",
                sqlx::query(
                    "SELECT release_requested_at, release_kind, release_purge::int::int8 AS purge, \
                        release_caller FROM lease \
                     WHERE id = $1 AND state = 'active' AND release_requested_at IS NOT NULL",
                )
                .bind(lease_id),
            )
            .await?;
        let Some(row) = rows.first() else {
            return Ok(None);
        };
        let kind = row.text("release_kind")?;
        Ok(Some(ReleaseRequest {
            at: row.i64("release_requested_at")?,
            kind: EventKind::parse(&kind).ok_or(StoreError::Invalid {
                what: "lease.release_kind".into(),
                value: kind,
            })?,
            purge: row.opt_i64("purge")?.unwrap_or(0) != 0,
            caller: row.opt_u32("release_caller")?,
        }))
    }

    /// Replaces this host's claims with `claims` and bumps the fleet's claim version.
    pub(crate) async fn publish_claims(
        &mut self,
        claims: &[FleetClaim],
        now_ms: i64,
    ) -> Result<(), StoreError> {
        let host = self.config.host_id.clone();
        let firsts: Vec<i64> = claims.iter().map(|c| i64::from(c.first)).collect();
        let counts: Vec<i64> = claims.iter().map(|c| i64::from(c.count)).collect();
        let kinds: Vec<String> = claims
            .iter()
            .map(|c| if c.process { "process" } else { "claim" }.to_string())
            .collect();
        let sources: Vec<String> = claims.iter().map(|c| c.source.clone()).collect();
        self.fetch_all(
            "the host's claims",
            sqlx::query(
                "WITH d AS (DELETE FROM claim WHERE host_id = $1), \
                 i AS (INSERT INTO claim (host_id, first_block, block_count, kind, source) \
                    SELECT $1, f, c, k, s FROM unnest($2::int8[], $3::int8[], $4::text[], $5::text[]) \
                    AS t(f, c, k, s)) \
                 INSERT INTO host (host_id, seen_at, claims_seq) VALUES ($1, $6, nextval('change_seq')) \
                 ON CONFLICT (host_id) DO UPDATE SET seen_at = excluded.seen_at, \
                    claims_seq = excluded.claims_seq RETURNING 1",
            )
            .bind(host)
            .bind(firsts)
            .bind(counts)
            .bind(kinds)
            .bind(sources)
            .bind(now_ms),
        )
        .await
        .map(drop)
    }

    /// Copies events of this host's own file (process starts and ends) into the fleet's feed,
    /// once each (`origin_id` is their id in the file), in their order.
    pub(crate) async fn forward_events(
        &mut self,
        events: &[EventRecord],
    ) -> Result<(), StoreError> {
        if events.is_empty() {
            return Ok(());
        }
        let host = self.config.host_id.clone();
        let col = |f: fn(&EventRecord) -> i64| events.iter().map(f).collect::<Vec<i64>>();
        let (origin, at, lease) = (col(|e| e.id), col(|e| e.at), col(|e| e.lease_id));
        let kinds: Vec<String> = events.iter().map(|e| e.kind.clone()).collect();
        let names: Vec<String> = events.iter().map(|e| e.lease_name.clone()).collect();
        let callers: Vec<Option<i64>> =
            events.iter().map(|e| e.caller_uid.map(i64::from)).collect();
        let details: Vec<Option<String>> = events.iter().map(|e| e.detail.clone()).collect();
        self.fetch_all(
            "forwarded events",
            sqlx::query(
                "INSERT INTO event (id, at, kind, lease_id, lease_name, caller_uid, detail, \
                    host_id, origin_id) \
                 SELECT nextval('event_id'), a, k, l, n, c, d, $1, o FROM unnest($2::int8[], \
                    $3::int8[], $4::text[], $5::int8[], $6::text[], $7::int8[], $8::text[]) \
                    WITH ORDINALITY AS t(o, a, k, l, n, c, d, i) \
                    WHERE EXISTS (SELECT 1 FROM lease WHERE id = l) ORDER BY i \
                 ON CONFLICT (host_id, origin_id) DO NOTHING RETURNING 1",
            )
            .bind(host)
            .bind(origin)
            .bind(at)
            .bind(kinds)
            .bind(lease)
            .bind(names)
            .bind(callers)
            .bind(details),
        )
        .await
        .map(drop)
    }

    /// Commits (with `synchronous_commit` as the server has it: `on`, its default, makes the
    /// commit durable before this returns) and lets go of the fleet's write lock.
    pub(crate) async fn commit(self) -> Result<(), StoreError> {
        self.end("COMMIT").await.map(drop)
    }

    /// [`PgTx::commit`], returning the last change number handed out as it commits. Under the
    /// fleet's lock nobody else hands any out, so every block row up to it is this
    /// transaction's or was read by it: the number is where the next read of other hosts'
    /// changes can start, and while nobody else commits there is nothing to read (see
    /// [`PgWriter::begin_group`]).
    pub(crate) async fn commit_seq(self) -> Result<i64, StoreError> {
        let rows = self
            .end("SELECT last_value AS last_change FROM change_seq; COMMIT")
            .await?;
        rows.first()
            .ok_or_else(|| StoreError::Invalid {
                what: "the last change number".into(),
                value: "no row".into(),
            })
            .and_then(|r| r.i64("last_change"))
    }

    /// Runs `sql`, a simple query ending in `COMMIT`, within the deadline. A failed or
    /// unanswered commit leaves the session to be dropped (see `Drop`).
    async fn end(mut self, sql: &'static str) -> Result<Vec<PgRow>, StoreError> {
        let config = self.config.clone();
        let conn = self.conn()?;
        let done = timed(config.timeout, "a commit", async {
            sqlx::raw_sql(sql)
                .fetch_all(&mut *conn)
                .await
                .map_err(write_err(&config))
        })
        .await;
        self.health.note(&done);
        self.open = done.is_err();
        done
    }
}
