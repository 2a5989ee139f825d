//! The PostgreSQL back end: one lease store for a fleet of hosts.
//!
//! The tables are the lease side of the SQLite schema plus what hosts sharing them need
//! (`migrations/postgres/`). Every write transaction first takes the fleet's write lock (an
//! advisory transaction lock, [`FLEET_LOCK`]), so hosts write one at a time and event ids and
//! change numbers are handed out in commit order. Every operation has a deadline: a server that
//! is down, restarting or cut off makes it fail with [`StoreError::Unreachable`] or
//! [`StoreError::TimedOut`] within [`PgConfig::timeout`], never hang; the connections reconnect
//! by themselves on the next use.

mod read;
mod write;

use std::future::Future;
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use sqlx::Connection;
use sqlx::postgres::{PgConnectOptions, PgConnection, PgPoolOptions};

pub(crate) use read::PgReader;
pub(crate) use write::{PgTx, PgWriter};

use crate::StoreError;

/// The migrations under `migrations/postgres/`, embedded in the binary.
pub(crate) static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../../migrations/postgres");

/// The key of the fleet's write lock (pg_advisory_xact_lock): "subidd\0\x01" as a number.
pub(crate) const FLEET_LOCK: i64 = 0x7375_6269_6464_0001;

/// The channel every lease-writing commit notifies (LISTEN/NOTIFY: delivered at commit).
pub const CHANNEL: &str = "subidd_changes";

/// How to reach the store and how long to wait for it.
#[derive(Debug, Clone)]
pub struct PgConfig {
    /// `postgresql://user@host:port/database?...` (a password in it, or [`PgConfig::password`]).
    pub url: String,
    /// A password from elsewhere than the URL (a file only root can read).
    pub password: Option<String>,
    /// This host's name in the fleet.
    pub host_id: String,
    /// The deadline of every operation, connecting included.
    pub timeout: Duration,
    /// Most connections for reads.
    pub max_connections: u32,
}

impl PgConfig {
    /// The URL without its password, for messages and logs.
    pub fn redacted(&self) -> String {
        redact(&self.url)
    }

    /// Connection options: the URL, the password, and per-session limits so that nothing this
    /// daemon starts can hold the fleet's lock or a connection for longer than the deadline.
    pub(crate) fn options(&self) -> Result<PgConnectOptions, StoreError> {
        let mut options =
            PgConnectOptions::from_str(&self.url).map_err(|source| StoreError::Open {
                target: self.redacted(),
                source: source.into(),
            })?;
        if let Some(password) = &self.password {
            options = options.password(password);
        }
        let ms = |d: Duration| format!("{}ms", d.as_millis().max(1));
        Ok(options
            .application_name("subidd")
            .statement_cache_capacity(256)
            .options([
                ("statement_timeout", ms(self.timeout)),
                ("lock_timeout", ms(self.timeout)),
                ("idle_in_transaction_session_timeout", ms(self.timeout * 2)),
            ]))
    }
}

/// `scheme://user:password@host` becomes `scheme://user:***@host`.
pub(crate) fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let (authority, tail) = match rest.find(['/', '?']) {
        Some(i) => rest.split_at(i),
        None => (rest, ""),
    };
    match authority.rsplit_once('@') {
        Some((userinfo, host)) => match userinfo.split_once(':') {
            Some((user, _)) => format!("{scheme}://{user}:***@{host}{tail}"),
            None => url.to_string(),
        },
        None => url.to_string(),
    }
}

/// Whether the server answered lately, shared by the reads and the writer: while it does not,
/// reads of leases this host knows go to its own copies first, and writes fail at once for a
/// moment after a failure instead of each waiting out the deadline again.
#[derive(Debug, Default)]
pub(crate) struct Health {
    /// Unix milliseconds of the last failure to reach the server; 0 while it answers.
    down_at: AtomicI64,
}

impl Health {
    /// How long after a failure writes fail without trying (a reconnect is tried after it).
    pub(crate) const RETRY_AFTER: Duration = Duration::from_millis(500);

    fn now_ms() -> i64 {
        let since = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        i64::try_from(since.as_millis()).unwrap_or(i64::MAX)
    }

    /// Notes the outcome of an operation.
    pub(crate) fn note<T>(&self, result: &Result<T, StoreError>) {
        match result {
            Ok(_) => self.down_at.store(0, Ordering::Release),
            Err(error) if error.is_unreachable() => {
                self.down_at.store(Health::now_ms(), Ordering::Release);
            }
            Err(_) => {}
        }
    }

    /// Whether the server failed to answer lately (within `window`).
    pub(crate) fn down_within(&self, window: Duration) -> bool {
        let at = self.down_at.load(Ordering::Acquire);
        let window = i64::try_from(window.as_millis()).unwrap_or(i64::MAX);
        at != 0 && Health::now_ms().saturating_sub(at) < window
    }

    /// Whether the server failed to answer and has not answered since.
    pub(crate) fn is_down(&self) -> bool {
        self.down_at.load(Ordering::Acquire) != 0
    }
}

/// Runs `fut` with a deadline; a miss is [`StoreError::TimedOut`].
pub(crate) async fn timed<T>(
    after: Duration,
    what: &'static str,
    fut: impl Future<Output = Result<T, StoreError>>,
) -> Result<T, StoreError> {
    match tokio::time::timeout(after, fut).await {
        Ok(result) => result,
        Err(_) => Err(StoreError::TimedOut { what, after }),
    }
}

/// Connects the writer's session, within the deadline.
///
/// Its statements are planned once, when prepared (`plan_cache_mode=force_generic_plan`): the
/// server would otherwise plan the lease insert again at every write, its custom plan looking
/// cheaper only because it knows the number of blocks. Every statement of the writer looks rows
/// up by key or walks an index in order, which a generic plan does as well.
///
/// A plan made once is kept as long as the statistics it was made from: one made while a
/// table looked empty may walk the wrong index for ever. The writer makes its plans again as
/// the fleet grows (see `PgWriter::begin_group`).
pub(crate) async fn connect(config: &PgConfig) -> Result<PgConnection, StoreError> {
    let options = config
        .options()?
        .options([("plan_cache_mode", "force_generic_plan")]);
    timed(config.timeout, "a connection", async {
        PgConnection::connect_with(&options)
            .await
            .map_err(|source| StoreError::Unreachable {
                target: config.redacted(),
                source: source.into(),
            })
    })
    .await
}

/// Connects, applies migrations (under sqlx's own advisory lock, so hosts starting together
/// migrate once), and returns the reads and the writer.
pub(crate) async fn open(config: &PgConfig) -> Result<(PgReader, PgWriter), StoreError> {
    let mut conn = connect(config).await?;
    timed(config.timeout * 6, "the migrations", async {
        MIGRATOR
            .run(&mut conn)
            .await
            .map_err(|source| StoreError::Migrate {
                target: config.redacted(),
                source: source.into(),
            })
    })
    .await?;
    let pool = PgPoolOptions::new()
        .max_connections(config.max_connections.max(1))
        .min_connections(0)
        .acquire_timeout(config.timeout)
        .test_before_acquire(true)
        .connect_lazy_with(config.options()?);
    let health = Arc::new(Health::default());
    Ok((
        PgReader::new(pool, config.clone(), Arc::clone(&health)),
        PgWriter::new(conn, config.clone(), health),
    ))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use sqlx::Row;

    /// The writer's session looks names up by their index once the fleet has grown, though it
    /// first planned the lookup while the statistics said the lease table was empty; and the
    /// statistics are made again before the group after.
    #[tokio::test]
    #[cfg_attr(not(subidd_postgres), ignore = "PostgreSQL is not installed")]
    async fn the_writers_plans_made_on_an_empty_table_are_made_again_as_it_grows() {
        let cluster = subidd_tests::pg::PgCluster::shared().expect("start a PostgreSQL cluster");
        let config = super::PgConfig {
            url: cluster.create_db("plans").expect("create database"),
            password: None,
            host_id: "h1".into(),
            timeout: Duration::from_secs(30),
            max_connections: 2,
        };
        let (_reader, mut writer) = super::open(&config).await.expect("open");
        // Statistics of an empty table, as an early autovacuum leaves them; and no autovacuum
        // while the test runs, which would make them again at a moment of its own.
        run(
            &mut writer,
            "ALTER TABLE lease SET (autovacuum_enabled = false); ANALYZE lease",
        )
        .await;
        let names = vec!["a".to_string()];
        let (tx, found, _) = writer
            .begin_group(&names, Some((0, 0)))
            .await
            .expect("begin");
        let claims = found.expect("changes").claims_seq;
        tx.commit().await.expect("commit");
        // The lookup as planned on the empty table: one index looked as cheap as another.
        let first = names_plan(&mut writer).await;
        // The fleet grows by 20,000 leases (each takes a change number).
        run(
            &mut writer,
            "INSERT INTO lease (name, uid_base, gid_base, size, state, created_at) \
             SELECT 'n' || i, 65536 * (i + 1)::bigint, 65536 * (i + 1)::bigint, 4096, \
             'active', 1 FROM generate_series(1, 20000) AS i",
        )
        .await;
        let (tx, _, states) = writer
            .begin_group(&names, Some((0, claims)))
            .await
            .expect("begin");
        tx.commit().await.expect("commit");
        assert!(states["a"].active.is_none());
        let grown = names_plan(&mut writer).await;
        assert!(
            grown.contains("Index Scan using lease_active_name on lease"),
            "the plan on the empty table:\n{first}\nafter the growth:\n{grown}"
        );
        assert!(!grown.contains("Seq Scan on lease"), "{grown}");
        assert!(!grown.contains("lease_active_disjoint"), "{grown}");
        // Before the next group, outside the lock, the server made the statistics again.
        assert_eq!(lease_rows_in_statistics(&mut writer).await, 0.0);
        let (tx, _, _) = writer
            .begin_group(&names, Some((0, claims)))
            .await
            .expect("begin");
        tx.commit().await.expect("commit");
        assert_eq!(lease_rows_in_statistics(&mut writer).await, 20_000.0);
    }

    /// The lease table's number of rows in the server's statistics.
    async fn lease_rows_in_statistics(writer: &mut super::PgWriter) -> f32 {
        writer
            .session(async |conn, _| {
                sqlx::query_scalar("SELECT reltuples FROM pg_class WHERE relname = 'lease'")
                    .fetch_one(conn)
                    .await
                    .map_err(crate::StoreError::write)
            })
            .await
            .expect("statistics")
    }

    async fn run(writer: &mut super::PgWriter, sql: &'static str) {
        writer
            .session(async |conn, _| {
                sqlx::raw_sql(sql)
                    .execute(conn)
                    .await
                    .map(drop)
                    .map_err(crate::StoreError::write)
            })
            .await
            .expect(sql);
    }

    /// The plan of the names lookup as the writer's session has it prepared.
    async fn names_plan(writer: &mut super::PgWriter) -> String {
        writer
            .session(async |conn, _| {
                let name: String = sqlx::query_scalar(
                    "SELECT name FROM pg_prepared_statements WHERE statement LIKE '%AS n(name)%'",
                )
                .fetch_one(&mut *conn)
                .await
                .map_err(crate::StoreError::write)?;
                let rows = sqlx::raw_sql(&format!("EXPLAIN EXECUTE {name}('{{a,b}}')"))
                    .fetch_all(&mut *conn)
                    .await
                    .map_err(crate::StoreError::write)?;
                Ok(rows
                    .iter()
                    .map(|r| r.get::<String, _>(0))
                    .collect::<Vec<_>>()
                    .join("\n"))
            })
            .await
            .expect("explain")
    }

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(
            super::redact("postgresql://subidd:s3cret@db.example:5432/leases?sslmode=require"),
            "postgresql://subidd:***@db.example:5432/leases?sslmode=require"
        );
        assert_eq!(
            super::redact("postgresql://subidd@db/leases"),
            "postgresql://subidd@db/leases"
        );
        assert_eq!(
            super::redact("postgresql:///leases"),
            "postgresql:///leases"
        );
    }
}
