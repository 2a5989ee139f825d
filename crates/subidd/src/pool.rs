//! Choosing the pool at start and checking it against the host's other id owners, then and
//! whenever /etc/subuid, /etc/subgid or the user and group databases change.

use std::path::{Path, PathBuf};
use std::time::Duration;

use subid_core::{
    DEFAULT_BLOCK, ForeignClaim, IdKind, Pool, PoolError, PoolSpec, SubidEntry, find_entry,
    parse_subid,
};
use subid_sys::watch::FileWatch;

use crate::config::Config;
use crate::lease::{AppliedClaim, ClaimStatus, LeaseService};

/// The /etc/subuid owner name whose entry, when present, is the pool.
pub const OWNER: &str = "subidd";

/// Where the pool came from, for the log and `GET /v1/pool`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Config,
    Subuid,
    Default,
}

impl Source {
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Config => "config",
            Source::Subuid => "subuid",
            Source::Default => "default",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PoolSetupError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{subuid} gives {OWNER} {uid_start}:{uid_count} but {subgid} gives {gid_start}:{gid_count}; \
         subidd maps uids and gids from one range, so make both entries equal"
    )]
    Mismatch {
        subuid: String,
        subgid: String,
        uid_start: u32,
        uid_count: u32,
        gid_start: u32,
        gid_count: u32,
    },
    #[error("{file} has no {OWNER} entry but {other} does; add the same entry to both")]
    OneSided { file: String, other: String },
    #[error(transparent)]
    Invalid(#[from] PoolError),
}

/// Picks the pool (config keys, else the `subidd` entry of /etc/subuid, else the default) and
/// refuses it when it contains an existing uid or gid. Other owners' subordinate ids are checked
/// by [`refuse_undelegated`] once the leases are known, since an entry may be a lease's own.
pub fn choose(
    config: &Config,
    uids: &[u32],
    gids: &[u32],
) -> Result<(Pool, Source), PoolSetupError> {
    let subuid = read_entries(&config.subuid_file)?;
    let subgid = read_entries(&config.subgid_file)?;
    let block = config.pool.block.unwrap_or(DEFAULT_BLOCK);
    let uid_entry = find_entry(&subuid, OWNER);
    let gid_entry = find_entry(&subgid, OWNER);
    let (spec, source) = if config.pool.base.is_some() || config.pool.size.is_some() {
        let default = PoolSpec::default();
        let spec = PoolSpec {
            base: config.pool.base.unwrap_or(default.base),
            size: config.pool.size.unwrap_or(default.size),
            block,
        };
        (spec, Source::Config)
    } else {
        match (uid_entry, gid_entry) {
            (Some(u), Some(g)) => {
                if (u.start, u.count) != (g.start, g.count) {
                    return Err(PoolSetupError::Mismatch {
                        subuid: config.subuid_file.display().to_string(),
                        subgid: config.subgid_file.display().to_string(),
                        uid_start: u.start,
                        uid_count: u.count,
                        gid_start: g.start,
                        gid_count: g.count,
                    });
                }
                let spec = PoolSpec {
                    base: u.start,
                    size: u.count,
                    block,
                };
                (spec, Source::Subuid)
            }
            (Some(_), None) => {
                return Err(PoolSetupError::OneSided {
                    file: config.subgid_file.display().to_string(),
                    other: config.subuid_file.display().to_string(),
                });
            }
            (None, Some(_)) => {
                return Err(PoolSetupError::OneSided {
                    file: config.subuid_file.display().to_string(),
                    other: config.subgid_file.display().to_string(),
                });
            }
            (None, None) => (
                PoolSpec {
                    block,
                    ..PoolSpec::default()
                },
                Source::Default,
            ),
        }
    };
    let pool = Pool::new(spec)?;
    pool.check_id_conflicts(IdKind::Uid, uids)?;
    pool.check_id_conflicts(IdKind::Gid, gids)?;
    Ok((pool, source))
}

/// Parsed entries of a subordinate-id file; a missing file has none. Bad lines are logged and
/// skipped, as shadow's own tools do.
fn read_entries(path: &Path) -> Result<Vec<SubidEntry>, PoolSetupError> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(PoolSetupError::Read {
                path: path.display().to_string(),
                source,
            });
        }
    };
    let (entries, errors) = parse_subid(&text);
    for error in errors {
        tracing::warn!(file = %path.display(), %error, "skipping malformed line");
    }
    Ok(entries)
}

/// At start, with the leases loaded: refuses the pool when another owner's /etc/subuid or
/// /etc/subgid entry reaches into it, unless the entry lies inside one active lease (a lease
/// handed on, e.g. `idmap?format=subuid` for a rootless podman user). Names the first such entry.
pub async fn refuse_undelegated(leases: &LeaseService, config: &Config) -> anyhow::Result<()> {
    let (pool, _) = leases.pool_status();
    let (subuid, subgid) = (config.subuid_file.clone(), config.subgid_file.clone());
    let claims = tokio::task::spawn_blocking(move || subid_claims(&pool, &subuid, &subgid))
        .await
        .map_err(|e| anyhow::anyhow!("reading the subid files: {e}"))??;
    for claim in claims {
        match leases.delegated_to(&claim).await? {
            Some(lease) => {
                tracing::info!(claim = %claim.source, %lease, "subid entry hands on ids of a lease")
            }
            None => return Err(PoolSetupError::Invalid(claim.into_error()).into()),
        }
    }
    Ok(())
}

/// Other owners' lines of the subid files that reach into `pool`.
fn subid_claims(
    pool: &Pool,
    subuid_file: &Path,
    subgid_file: &Path,
) -> Result<Vec<ForeignClaim>, PoolSetupError> {
    let mut claims = pool.subid_claims(
        &subuid_file.display().to_string(),
        &read_entries(subuid_file)?,
        OWNER,
    );
    claims.extend(pool.subid_claims(
        &subgid_file.display().to_string(),
        &read_entries(subgid_file)?,
        OWNER,
    ));
    Ok(claims)
}

/// Every claim other id owners hold on ids of `pool` now: other owners' lines of the subid files
/// and the ids of the user and group databases. Blocking (file reads and NSS enumeration).
pub fn claims(
    pool: &Pool,
    subuid_file: &Path,
    subgid_file: &Path,
) -> Result<Vec<ForeignClaim>, PoolSetupError> {
    let mut claims = subid_claims(pool, subuid_file, subgid_file)?;
    claims.extend(pool.id_claims(IdKind::Uid, &subid_sys::userdb::all_uids()));
    claims.extend(pool.id_claims(IdKind::Gid, &subid_sys::userdb::all_gids()));
    Ok(claims)
}

/// Where the re-check reads from and how often it runs without a change event.
#[derive(Debug, Clone)]
pub struct WatchConfig {
    pub subuid_file: PathBuf,
    pub subgid_file: PathBuf,
    pub interval: Duration,
}

/// The files of the local user and group databases; NSS sources beyond files (LDAP, sssd) are only
/// seen by the periodic check.
const USER_FILES: [&str; 2] = ["/etc/passwd", "/etc/group"];
/// Shadow's tools replace a file in several steps (lock, write, rename): wait for the burst to end.
const SETTLE: Duration = Duration::from_millis(100);

/// Re-checks the pool now, whenever a watched file changes, and every `interval`; runs until the
/// task is aborted. Failures to read are logged and retried at the next turn, never fatal.
pub async fn watch(leases: LeaseService, config: WatchConfig) {
    let files = [
        config.subuid_file.clone(),
        config.subgid_file.clone(),
        PathBuf::from(USER_FILES[0]),
        PathBuf::from(USER_FILES[1]),
    ];
    let watcher = match FileWatch::new(&files) {
        Ok(watcher) => Some(watcher),
        Err(error) => {
            tracing::warn!(
                %error,
                interval_ms = config.interval.as_millis(),
                "cannot watch /etc/subuid and the user database for changes; re-checking on the interval only"
            );
            None
        }
    };
    let mut last_claims = Vec::new();
    loop {
        recheck(&leases, &config, &mut last_claims).await;
        match &watcher {
            Some(watcher) => {
                tokio::select! {
                    () = watcher.changed() => {
                        tokio::time::sleep(SETTLE).await;
                        watcher.drain();
                    }
                    () = tokio::time::sleep(config.interval) => {}
                }
            }
            None => tokio::time::sleep(config.interval).await,
        }
    }
}

/// One re-check: read the claims, apply them, log what changed.
async fn recheck(leases: &LeaseService, config: &WatchConfig, last: &mut Vec<AppliedClaim>) {
    // Processes that hold ids of blocks not leased: every process read again, since a known one
    // may have changed its ids.
    if let Err(error) = leases.check_holds(true).await {
        tracing::warn!(%error, "cannot scan /proc for processes holding pool ids; keeping the previous holds");
    }
    let (pool, _) = leases.pool_status();
    let (subuid, subgid) = (config.subuid_file.clone(), config.subgid_file.clone());
    let found = tokio::task::spawn_blocking(move || claims(&pool, &subuid, &subgid)).await;
    let claims = match found {
        Ok(Ok(claims)) => claims,
        Ok(Err(error)) => {
            tracing::warn!(%error, "pool re-check failed; keeping the previous claims");
            return;
        }
        Err(error) => {
            tracing::warn!(%error, "pool re-check task failed");
            return;
        }
    };
    let applied = match leases.apply_claims(&claims).await {
        Ok(applied) => applied,
        Err(error) => {
            tracing::warn!(%error, "cannot name the leases behind pool conflicts");
            return;
        }
    };
    // Conflicts with active leases are logged by the lease service; here, what else changed.
    for a in applied.iter().filter(|a| !last.contains(a)) {
        match &a.status {
            ClaimStatus::HandsOn(lease) => {
                tracing::info!(claim = %a.claim, %lease, "subid entry hands on ids of a lease")
            }
            ClaimStatus::Withheld => tracing::warn!(
                claim = %a.claim,
                blocks = ?a.blocks,
                "another id owner claims ids of the pool; its blocks are withheld"
            ),
            ClaimStatus::Conflicts(_) => {}
        }
    }
    *last = applied;
}

/// Why `subidd --register` did not register the pool.
#[derive(Debug, thiserror::Error)]
pub enum RegisterError {
    #[error(transparent)]
    Pool(#[from] PoolSetupError),
    #[error(
        "the pool {OWNER}:{base}:{size} overlaps another owner's entry in {file}, {overlap}; \
         move that entry or configure [pool] base/size elsewhere"
    )]
    Overlap {
        file: String,
        base: u32,
        size: u32,
        overlap: subid_core::SubidOverlap,
    },
    #[error("cannot write {path}: {source}")]
    Write {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// What `subidd --register` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registration {
    pub pool: Pool,
    /// The files rewritten; empty when both already held the entry.
    pub written: Vec<std::path::PathBuf>,
}

/// Computes the pool exactly as start-up does and writes it as the `subidd` entry of the
/// subuid and subgid files (each atomically, keeping every other line), so that useradd and
/// other tools steer clear of it. Nothing is written unless both files can take it.
pub fn register(config: &Config) -> Result<Registration, RegisterError> {
    let (uids, gids) = (subid_sys::userdb::all_uids(), subid_sys::userdb::all_gids());
    let (pool, _) = choose(config, &uids, &gids)?;
    let range = pool.range();
    let mut plans = Vec::new();
    for path in [&config.subuid_file, &config.subgid_file] {
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(source) => {
                return Err(RegisterError::Pool(PoolSetupError::Read {
                    path: path.display().to_string(),
                    source,
                }));
            }
        };
        match subid_core::register_subid(&text, OWNER, range) {
            Ok(Some(new)) => plans.push((path.clone(), new)),
            Ok(None) => {}
            Err(overlap) => {
                return Err(RegisterError::Overlap {
                    file: path.display().to_string(),
                    base: range.start(),
                    size: range.len(),
                    overlap,
                });
            }
        }
    }
    let mut written = Vec::new();
    for (path, text) in plans {
        write_atomically(&path, &text).map_err(|source| RegisterError::Write {
            path: path.display().to_string(),
            source,
        })?;
        written.push(path);
    }
    Ok(Registration { pool, written })
}

/// Replaces `path` with `text`: a temp file in the same directory with the old file's mode and
/// owner (0644 root for a new file), fsync'd, renamed over it, and the directory fsync'd. A
/// symlink is followed, so the file it names is replaced, not the link.
fn write_atomically(path: &Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
    let target = match std::fs::canonicalize(path) {
        Ok(real) => real,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => path.to_path_buf(),
        Err(e) => return Err(e),
    };
    let old = match std::fs::metadata(&target) {
        Ok(meta) => Some(meta),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(e),
    };
    let dir = match target.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.to_path_buf(),
        _ => std::path::PathBuf::from("."),
    };
    let name = target
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let temp = dir.join(format!(".{name}.subidd-{}.tmp", std::process::id()));
    let result = (|| {
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&temp)?;
        file.write_all(text.as_bytes())?;
        let mode = old.as_ref().map_or(0o644, |m| m.mode() & 0o7777);
        if let Some(meta) = &old {
            std::os::unix::fs::fchown(&file, Some(meta.uid()), Some(meta.gid()))?;
        }
        file.set_permissions(std::fs::Permissions::from_mode(mode))?;
        file.sync_all()?;
        std::fs::rename(&temp, &target)?;
        std::fs::File::open(&dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&temp);
    }
    result
}
