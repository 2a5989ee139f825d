//! `subidd --move-in`: copies this host's SQLite leases, blocks and history into the empty
//! PostgreSQL store `store.url` names, so that the host joins a fleet with every lease keeping
//! its range, id and history. Refuses a running daemon, a store that is not empty, and a pool
//! other than the store's.

use anyhow::{Context, bail};
use subid_store::{MoveReport, PoolMeta};

use crate::config::Config;

/// Runs the copy; what it moved.
pub async fn run(config: &Config) -> anyhow::Result<MoveReport> {
    let Some(pg) = crate::server::pg_config(config)? else {
        bail!(
            "--move-in copies into PostgreSQL: set store.url (or SUBIDD_STORE_URL, --store-url) to \
             the fleet's postgresql:// URL"
        );
    };
    if tokio::net::UnixStream::connect(&config.socket)
        .await
        .is_ok()
    {
        bail!(
            "{} is served: stop the daemon first (leases it creates during the copy would be \
             left behind)",
            config.socket.display()
        );
    }
    let database = config.database();
    if !database.exists() {
        bail!("there is no database to move in at {}", database.display());
    }
    let (uids, gids) = tokio::task::spawn_blocking(|| {
        (subid_sys::userdb::all_uids(), subid_sys::userdb::all_gids())
    })
    .await
    .context("reading the user database")?;
    let (pool, _) = crate::pool::choose(config, &uids, &gids)?;
    let meta = PoolMeta {
        base: pool.base(),
        size: pool.range().len(),
        block: pool.block(),
    };
    subid_store::move_in(&database, &pg, meta)
        .await
        .with_context(|| format!("moving {} into {}", database.display(), pg.redacted()))
}
