//! Moving in: copies a host's SQLite leases, blocks and history into an empty PostgreSQL store,
//! so that the host (and its leases, with their ranges and ids) can join a fleet.

use std::path::Path;

use rusqlite::Connection;
use sqlx::Connection as _;

use crate::pg::{self, FLEET_LOCK, PgConfig};
use crate::record::{Cols, EVENT_COLUMNS, LEASE_COLUMNS, event_from, lease_from};
use crate::{EventRecord, LeaseRecord, PoolMeta, StoreError};

/// Rows copied per statement.
const BATCH: usize = 1000;

/// What was moved in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MoveReport {
    pub active: u64,
    pub released: u64,
    pub blocks: u64,
    pub events: u64,
    /// The fleet store the host's file now belongs to.
    pub store_id: String,
}

/// One `block` row with what the copy needs.
struct Block {
    start: i64,
    lease_id: Option<i64>,
    released_at: Option<i64>,
}

/// Copies the SQLite file at `path` into the empty PostgreSQL store `config` names, for the
/// pool `pool`. Refuses a store that has any lease or event, or was set up for another pool,
/// and a file whose active leases do not lie in `pool`. The copy is one transaction on each
/// side: it happens whole or not at all. Afterwards the file belongs to the store (its lease
/// rows are the host's copies of the fleet's leases; its process rows stay the host's).
///
/// The daemon must be stopped: leases it created after the copy would be left behind.
pub async fn move_in(
    path: &Path,
    config: &PgConfig,
    pool: PoolMeta,
) -> Result<MoveReport, StoreError> {
    // Checks and migrates the file as the daemon does at start.
    let (local, _) = crate::sqlite::open(path).await?;
    if local.meta("store_id").await?.is_some() {
        return Err(StoreError::Refused {
            reason: format!(
                "{} belongs to a fleet store already; there is nothing of its own to move in",
                path.display()
            ),
        });
    }
    let mut file = Connection::open_with_flags(
        path,
        rusqlite::OpenFlags::SQLITE_OPEN_READ_WRITE | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(|source| StoreError::Open {
        target: path.display().to_string(),
        source: source.into(),
    })?;
    // A read transaction: one consistent snapshot of the file for the whole copy.
    let snapshot = file.transaction().map_err(StoreError::read)?;
    let block: Option<String> = snapshot
        .query_row("SELECT value FROM pool_meta WHERE key = 'block'", [], |r| {
            r.get(0)
        })
        .ok();
    if let Some(block) = block
        && block != pool.block.to_string()
    {
        return Err(StoreError::Refused {
            reason: format!(
                "{} was cut into blocks of {block} ids but the pool given has blocks of {}",
                path.display(),
                pool.block
            ),
        });
    }
    let leases = read_all(
        &snapshot,
        &format!("SELECT {LEASE_COLUMNS} FROM lease ORDER BY id"),
        |r| lease_from(r),
    )?;
    let end = u64::from(pool.base) + u64::from(pool.size);
    if let Some(outside) = leases.iter().find(|l| {
        l.state == subid_core::LeaseState::Active
            && !(l.uid_base >= pool.base
                && u64::from(l.uid_base) + u64::from(l.size) <= end
                && (l.uid_base - pool.base).is_multiple_of(pool.block)
                && l.size.is_multiple_of(pool.block))
    }) {
        return Err(StoreError::Refused {
            reason: format!(
                "active lease {} (host ids {}..{}) lies outside the pool base {} size {} block {}",
                outside.name,
                outside.uid_base,
                u64::from(outside.uid_base) + u64::from(outside.size),
                pool.base,
                pool.size,
                pool.block
            ),
        });
    }
    let blocks = read_all(
        &snapshot,
        "SELECT start, lease_id, released_at FROM block ORDER BY start",
        |r| {
            Ok(Block {
                start: r.i64("start")?,
                lease_id: r.opt_i64("lease_id")?,
                released_at: r.opt_i64("released_at")?,
            })
        },
    )?;
    let events = read_all(
        &snapshot,
        &format!("SELECT {EVENT_COLUMNS} FROM event ORDER BY id"),
        |r| event_from(r),
    )?;
    drop(snapshot);

    let (reader, mut writer) = pg::open(config).await?;
    let store_id = reader
        .store_id()
        .await?
        .ok_or_else(|| StoreError::Refused {
            reason: "the PostgreSQL store has no store_id (not migrated?)".into(),
        })?;
    let copied = pg::timed(
        config.timeout * 20 + std::time::Duration::from_secs(60),
        "the copy",
        async {
            writer
                .session(async |conn, config| {
                    copy_into(conn, config, pool, &leases, &blocks, &events).await
                })
                .await
        },
    )
    .await?;
    // The file belongs to the store now; its events are the store's already.
    let last_event = events.last().map_or(0, |e| e.id);
    for (key, value) in [
        ("store_id", store_id.clone()),
        ("forwarded_event_id", last_event.to_string()),
    ] {
        file.execute(
            "INSERT INTO pool_meta (key, value) VALUES (?1, ?2) \
             ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            [key, value.as_str()],
        )
        .map_err(StoreError::write)?;
    }
    Ok(MoveReport { store_id, ..copied })
}

fn read_all<T>(
    conn: &rusqlite::Transaction<'_>,
    sql: &str,
    row: impl Fn(&rusqlite::Row<'_>) -> Result<T, StoreError>,
) -> Result<Vec<T>, StoreError> {
    let mut stmt = conn.prepare(sql).map_err(StoreError::read)?;
    let mut rows = stmt.query([]).map_err(StoreError::read)?;
    let mut out = Vec::new();
    while let Some(r) = rows.next().map_err(StoreError::read)? {
        out.push(row(r)?);
    }
    Ok(out)
}

/// The copy, in one transaction under the fleet's lock.
async fn copy_into(
    conn: &mut sqlx::postgres::PgConnection,
    config: &PgConfig,
    pool: PoolMeta,
    leases: &[LeaseRecord],
    blocks: &[Block],
    events: &[EventRecord],
) -> Result<MoveReport, StoreError> {
    let err = |e: sqlx::Error| StoreError::write(e);
    let mut tx = conn
        .begin_with(format!("BEGIN; SELECT pg_advisory_xact_lock({FLEET_LOCK})"))
        .await
        .map_err(err)?;
    let (has_leases, has_events): (bool, bool) =
        sqlx::query_as("SELECT EXISTS (SELECT 1 FROM lease), EXISTS (SELECT 1 FROM event)")
            .fetch_one(&mut *tx)
            .await
            .map_err(err)?;
    if has_leases || has_events {
        return Err(StoreError::Refused {
            reason: format!(
                "the store {} is not empty: a host moves in only into an empty store (the first \
                 host of a fleet); join an existing fleet with an empty state directory instead",
                config.redacted()
            ),
        });
    }
    let stored: Vec<(String, String)> =
        sqlx::query_as("SELECT key, value FROM pool_meta WHERE key IN ('block', 'base', 'size')")
            .fetch_all(&mut *tx)
            .await
            .map_err(err)?;
    for (key, value) in &stored {
        let want = match key.as_str() {
            "block" => pool.block,
            "base" => pool.base,
            _ => pool.size,
        };
        if value != &want.to_string() {
            return Err(StoreError::Refused {
                reason: format!(
                    "pool mismatch: the store was set up for the pool {} but this host's pool \
                     has {key} {want}; every host of a fleet must use the same pool",
                    stored
                        .iter()
                        .map(|(k, v)| format!("{k} {v}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            });
        }
    }
    for (key, value) in [
        ("block", pool.block),
        ("base", pool.base),
        ("size", pool.size),
    ] {
        sqlx::query(
            "INSERT INTO pool_meta (key, value) VALUES ($1, $2) ON CONFLICT (key) DO NOTHING",
        )
        .bind(key)
        .bind(value.to_string())
        .execute(&mut *tx)
        .await
        .map_err(err)?;
    }
    for chunk in leases.chunks(BATCH) {
        insert_leases(&mut tx, chunk, &config.host_id).await?;
    }
    for chunk in blocks.chunks(BATCH) {
        let starts: Vec<i64> = chunk.iter().map(|b| b.start).collect();
        let holders: Vec<Option<i64>> = chunk.iter().map(|b| b.lease_id).collect();
        let released: Vec<Option<i64>> = chunk.iter().map(|b| b.released_at).collect();
        sqlx::query(
            "INSERT INTO block (start, lease_id, released_at) \
             SELECT * FROM unnest($1::int8[], $2::int8[], $3::int8[])",
        )
        .bind(starts)
        .bind(holders)
        .bind(released)
        .execute(&mut *tx)
        .await
        .map_err(err)?;
    }
    for chunk in events.chunks(BATCH) {
        let col = |f: fn(&EventRecord) -> i64| chunk.iter().map(f).collect::<Vec<i64>>();
        sqlx::query(
            "INSERT INTO event (id, at, kind, lease_id, lease_name, caller_uid, detail, host_id, \
                origin_id) \
             SELECT i, a, k, l, n, c, d, $8, i FROM unnest($1::int8[], $2::int8[], $3::text[], \
                $4::int8[], $5::text[], $6::int8[], $7::text[]) AS t(i, a, k, l, n, c, d)",
        )
        .bind(col(|e| e.id))
        .bind(col(|e| e.at))
        .bind(chunk.iter().map(|e| e.kind.clone()).collect::<Vec<_>>())
        .bind(col(|e| e.lease_id))
        .bind(
            chunk
                .iter()
                .map(|e| e.lease_name.clone())
                .collect::<Vec<_>>(),
        )
        .bind(
            chunk
                .iter()
                .map(|e| e.caller_uid.map(i64::from))
                .collect::<Vec<_>>(),
        )
        .bind(chunk.iter().map(|e| e.detail.clone()).collect::<Vec<_>>())
        .bind(&config.host_id)
        .execute(&mut *tx)
        .await
        .map_err(err)?;
    }
    // New ids continue after the copied ones.
    sqlx::query(
        "SELECT setval(pg_get_serial_sequence('lease', 'id'), GREATEST((SELECT MAX(id) FROM lease), 1)), \
                setval('event_id', GREATEST((SELECT MAX(id) FROM event), 1))",
    )
    .execute(&mut *tx)
    .await
    .map_err(err)?;
    tx.commit().await.map_err(err)?;
    let active = leases
        .iter()
        .filter(|l| l.state == subid_core::LeaseState::Active)
        .count() as u64;
    Ok(MoveReport {
        active,
        released: leases.len() as u64 - active,
        blocks: blocks.len() as u64,
        events: events.len() as u64,
        store_id: String::new(),
    })
}

async fn insert_leases(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    chunk: &[LeaseRecord],
    host: &str,
) -> Result<(), StoreError> {
    let json = |v: Result<String, serde_json::Error>| v.map_err(StoreError::encode);
    let mut labels = Vec::with_capacity(chunk.len());
    let mut rlimits = Vec::with_capacity(chunk.len());
    let mut namespaces = Vec::with_capacity(chunk.len());
    for l in chunk {
        labels.push(json(serde_json::to_string(&l.labels))?);
        rlimits.push(json(serde_json::to_string(&l.rlimits))?);
        namespaces.push(json(serde_json::to_string(&l.namespaces))?);
    }
    let to_i64 = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
    let col = |f: fn(&LeaseRecord) -> i64| chunk.iter().map(f).collect::<Vec<i64>>();
    let opt = |f: fn(&LeaseRecord) -> Option<i64>| chunk.iter().map(f).collect::<Vec<_>>();
    sqlx::query(
        "INSERT INTO lease (id, name, uid_base, gid_base, size, state, labels, ttl_seconds, \
            created_at, expires_at, released_at, created_by, rlimits, namespaces, pids_max, \
            max_processes, created_host) \
         SELECT *, $17 FROM unnest($1::int8[], $2::text[], $3::int8[], $4::int8[], $5::int8[], \
            $6::text[], $7::text[], $8::int8[], $9::int8[], $10::int8[], $11::int8[], \
            $12::int8[], $13::text[], $14::text[], $15::int8[], $16::int8[])",
    )
    .bind(col(|l| l.id))
    .bind(chunk.iter().map(|l| l.name.clone()).collect::<Vec<_>>())
    .bind(col(|l| i64::from(l.uid_base)))
    .bind(col(|l| i64::from(l.gid_base)))
    .bind(col(|l| i64::from(l.size)))
    .bind(
        chunk
            .iter()
            .map(|l| l.state.as_str().to_string())
            .collect::<Vec<_>>(),
    )
    .bind(labels)
    .bind(opt(|l| l.ttl_seconds.map(i64::from)))
    .bind(col(|l| l.created_at))
    .bind(opt(|l| l.expires_at))
    .bind(opt(|l| l.released_at))
    .bind(opt(|l| l.created_by.map(i64::from)))
    .bind(rlimits)
    .bind(namespaces)
    .bind(
        chunk
            .iter()
            .map(|l| l.pids_max.map(to_i64))
            .collect::<Vec<_>>(),
    )
    .bind(
        chunk
            .iter()
            .map(|l| l.max_processes.map(to_i64))
            .collect::<Vec<_>>(),
    )
    .bind(host)
    .execute(&mut **tx)
    .await
    .map_err(StoreError::write)?;
    Ok(())
}
