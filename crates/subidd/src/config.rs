//! Configuration: embedded defaults < config file < `SUBIDD_*` environment < command-line flags.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// Where the config file is read from when neither `--config` nor `SUBIDD_CONFIG` names one.
pub const DEFAULT_CONFIG: &str = "/etc/subidd/subidd.toml";

/// Where running daemons register their pools unless `pool_registry_dir` says otherwise.
pub const DEFAULT_POOL_REGISTRY: &str = "/run/subidd-pools";

/// The daemon's settings after every layer has been applied. `config/subidd.toml` documents
/// each key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub state_dir: PathBuf,
    pub runtime_dir: PathBuf,
    pub socket: PathBuf,
    pub socket_group: String,
    pub allowed_uids: Vec<u32>,
    pub allowed_gids: Vec<u32>,
    pub listen_tcp: Option<SocketAddr>,
    pub token_file: Option<PathBuf>,
    pub quarantine_seconds: u64,
    pub expiry_interval_ms: u64,
    pub pool_check_interval_ms: u64,
    pub kill_grace_ms: u64,
    pub spawn_timeout_ms: u64,
    pub log_max_bytes: u64,
    pub cgroup_parent: Option<PathBuf>,
    pub subuid_file: PathBuf,
    pub subgid_file: PathBuf,
    pub log_format: LogFormat,
    pub request_timeout_ms: u64,
    pub max_concurrent_requests: usize,
    pub header_read_timeout_ms: u64,
    /// Connections open at once on the unix socket; `None`: a default fitted to RLIMIT_NOFILE
    /// at start (see [`crate::limits::fit_connections`]).
    pub max_unix_connections: Option<usize>,
    /// Connections open at once on the TCP listener; `None` as above.
    pub max_tcp_connections: Option<usize>,
    /// Connections per listener whose caller has not (yet) been let in; `None` as above.
    pub max_unauthenticated_connections: Option<usize>,
    /// The host-wide directory where running daemons register their pools.
    pub pool_registry_dir: PathBuf,
    pub pool: PoolConfig,
    pub store: StoreConfig,
}

/// `[pool]`: unset keys are taken from the `subidd` entry of /etc/subuid, else the defaults.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolConfig {
    pub base: Option<u32>,
    pub size: Option<u32>,
    pub block: Option<u32>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// The file layer: every key optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    state_dir: Option<PathBuf>,
    runtime_dir: Option<PathBuf>,
    socket: Option<PathBuf>,
    socket_group: Option<String>,
    allowed_uids: Option<Vec<u32>>,
    allowed_gids: Option<Vec<u32>>,
    listen_tcp: Option<String>,
    token_file: Option<PathBuf>,
    quarantine_seconds: Option<u64>,
    expiry_interval_ms: Option<u64>,
    pool_check_interval_ms: Option<u64>,
    kill_grace_ms: Option<u64>,
    spawn_timeout_ms: Option<u64>,
    log_max_bytes: Option<u64>,
    cgroup_parent: Option<PathBuf>,
    subuid_file: Option<PathBuf>,
    subgid_file: Option<PathBuf>,
    log_format: Option<LogFormat>,
    request_timeout_ms: Option<u64>,
    max_concurrent_requests: Option<usize>,
    header_read_timeout_ms: Option<u64>,
    max_unix_connections: Option<usize>,
    max_tcp_connections: Option<usize>,
    max_unauthenticated_connections: Option<usize>,
    pool_registry_dir: Option<PathBuf>,
    #[serde(default)]
    pool: PoolConfig,
    #[serde(default)]
    store: FileStoreConfig,
}

/// The flags that override everything else.
#[derive(Debug, Default, Clone)]
pub struct Flags {
    pub config: Option<PathBuf>,
    pub socket: Option<PathBuf>,
    pub state_dir: Option<PathBuf>,
    pub runtime_dir: Option<PathBuf>,
    pub listen_tcp: Option<String>,
    pub token_file: Option<PathBuf>,
    pub log_format: Option<LogFormat>,
    pub store_url: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("environment variable {name}={value:?}: {reason}")]
    Env {
        name: &'static str,
        value: String,
        reason: String,
    },
    #[error(
        "listen_tcp {addr} is not a loopback address; subidd serves TCP on 127.0.0.0/8 or ::1 only \
         (its API can start processes, so it must never face a network)"
    )]
    NotLoopback { addr: SocketAddr },
    #[error("listen_tcp {value:?} is not an address like 127.0.0.1:7070")]
    BadAddress { value: String },
    #[error("listen_tcp is set but token_file is not; TCP clients must present a bearer token")]
    NoToken,
    #[error("{key} must be {reason}")]
    Invalid { key: &'static str, reason: String },
}

impl Config {
    /// Applies the layers in order. `env` yields the process environment (a parameter so that
    /// tests do not touch the real one).
    pub fn load(
        flags: &Flags,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        let explicit = flags
            .config
            .clone()
            .or_else(|| env("SUBIDD_CONFIG").map(PathBuf::from));
        let file = match explicit {
            Some(path) => read_file(&path)?,
            None if Path::new(DEFAULT_CONFIG).exists() => read_file(Path::new(DEFAULT_CONFIG))?,
            None => FileConfig::default(),
        };
        let env_path = |name| env(name).map(PathBuf::from);
        let state_dir = flags
            .state_dir
            .clone()
            .or_else(|| env_path("SUBIDD_STATE_DIR"))
            .or(file.state_dir)
            .unwrap_or_else(|| PathBuf::from("/var/lib/subidd"));
        let runtime_dir = flags
            .runtime_dir
            .clone()
            .or_else(|| env_path("SUBIDD_RUNTIME_DIR"))
            .or(file.runtime_dir)
            .unwrap_or_else(|| PathBuf::from("/run/subidd"));
        let socket = flags
            .socket
            .clone()
            .or_else(|| env_path("SUBIDD_SOCKET"))
            .or(file.socket)
            .unwrap_or_else(|| runtime_dir.join("subidd.sock"));
        let listen_tcp = flags
            .listen_tcp
            .clone()
            .or_else(|| env("SUBIDD_LISTEN_TCP"))
            .or(file.listen_tcp)
            .filter(|s| !s.is_empty())
            .map(|s| parse_listen(&s))
            .transpose()?;
        let token_file = flags
            .token_file
            .clone()
            .or_else(|| env_path("SUBIDD_TOKEN_FILE"))
            .or(file.token_file)
            .filter(|p| !p.as_os_str().is_empty());
        if listen_tcp.is_some() && token_file.is_none() {
            return Err(ConfigError::NoToken);
        }
        let pool = PoolConfig {
            base: env_num(&env, "SUBIDD_POOL_BASE")?.or(file.pool.base),
            size: env_num(&env, "SUBIDD_POOL_SIZE")?.or(file.pool.size),
            block: env_num(&env, "SUBIDD_POOL_BLOCK")?.or(file.pool.block),
        };
        let log_format = match (flags.log_format, env("SUBIDD_LOG_FORMAT")) {
            (Some(format), _) => format,
            (None, Some(v)) if v == "json" => LogFormat::Json,
            (None, Some(v)) if v == "text" => LogFormat::Text,
            (None, Some(value)) => {
                return Err(ConfigError::Env {
                    name: "SUBIDD_LOG_FORMAT",
                    value,
                    reason: "must be text or json".into(),
                });
            }
            (None, None) => file.log_format.unwrap_or_default(),
        };
        let config = Config {
            state_dir,
            runtime_dir,
            socket,
            socket_group: env("SUBIDD_SOCKET_GROUP")
                .or(file.socket_group)
                .unwrap_or_else(|| "subidd".into()),
            allowed_uids: env_list(&env, "SUBIDD_ALLOWED_UIDS")?
                .or(file.allowed_uids)
                .unwrap_or_default(),
            allowed_gids: env_list(&env, "SUBIDD_ALLOWED_GIDS")?
                .or(file.allowed_gids)
                .unwrap_or_default(),
            listen_tcp,
            token_file,
            quarantine_seconds: env_num(&env, "SUBIDD_QUARANTINE_SECONDS")?
                .or(file.quarantine_seconds)
                .unwrap_or(86_400),
            expiry_interval_ms: env_num(&env, "SUBIDD_EXPIRY_INTERVAL_MS")?
                .or(file.expiry_interval_ms)
                .unwrap_or(1_000),
            pool_check_interval_ms: env_num(&env, "SUBIDD_POOL_CHECK_INTERVAL_MS")?
                .or(file.pool_check_interval_ms)
                .unwrap_or(60_000),
            kill_grace_ms: env_num(&env, "SUBIDD_KILL_GRACE_MS")?
                .or(file.kill_grace_ms)
                .unwrap_or(10_000),
            spawn_timeout_ms: env_num(&env, "SUBIDD_SPAWN_TIMEOUT_MS")?
                .or(file.spawn_timeout_ms)
                .unwrap_or(5_000),
            log_max_bytes: env_num(&env, "SUBIDD_LOG_MAX_BYTES")?
                .or(file.log_max_bytes)
                .unwrap_or(1024 * 1024),
            cgroup_parent: env_path("SUBIDD_CGROUP_PARENT")
                .or(file.cgroup_parent)
                .filter(|p| !p.as_os_str().is_empty()),
            subuid_file: env_path("SUBIDD_SUBUID_FILE")
                .or(file.subuid_file)
                .unwrap_or_else(|| PathBuf::from("/etc/subuid")),
            subgid_file: env_path("SUBIDD_SUBGID_FILE")
                .or(file.subgid_file)
                .unwrap_or_else(|| PathBuf::from("/etc/subgid")),
            log_format,
            request_timeout_ms: env_num(&env, "SUBIDD_REQUEST_TIMEOUT_MS")?
                .or(file.request_timeout_ms)
                .unwrap_or(30_000),
            max_concurrent_requests: env_num(&env, "SUBIDD_MAX_CONCURRENT_REQUESTS")?
                .or(file.max_concurrent_requests)
                .unwrap_or(4096),
            header_read_timeout_ms: env_num(&env, "SUBIDD_HEADER_READ_TIMEOUT_MS")?
                .or(file.header_read_timeout_ms)
                .unwrap_or(5_000),
            max_unix_connections: env_num(&env, "SUBIDD_MAX_UNIX_CONNECTIONS")?
                .or(file.max_unix_connections),
            max_tcp_connections: env_num(&env, "SUBIDD_MAX_TCP_CONNECTIONS")?
                .or(file.max_tcp_connections),
            max_unauthenticated_connections: env_num(
                &env,
                "SUBIDD_MAX_UNAUTHENTICATED_CONNECTIONS",
            )?
            .or(file.max_unauthenticated_connections),
            pool_registry_dir: env_path("SUBIDD_POOL_REGISTRY_DIR")
                .or(file.pool_registry_dir)
                .filter(|p| !p.as_os_str().is_empty())
                .unwrap_or_else(|| PathBuf::from(DEFAULT_POOL_REGISTRY)),
            pool,
            store: StoreConfig::load(&file.store, flags, &env)?,
        };
        for (key, value) in [
            ("expiry_interval_ms", config.expiry_interval_ms),
            ("spawn_timeout_ms", config.spawn_timeout_ms),
            ("request_timeout_ms", config.request_timeout_ms),
            ("header_read_timeout_ms", config.header_read_timeout_ms),
        ] {
            if value == 0 {
                return Err(ConfigError::Invalid {
                    key,
                    reason: "at least 1".into(),
                });
            }
        }
        // tokio's semaphore holds at most usize::MAX >> 3 permits.
        if config.max_concurrent_requests == 0 || config.max_concurrent_requests > 1 << 20 {
            return Err(ConfigError::Invalid {
                key: "max_concurrent_requests",
                reason: format!("between 1 and {}", 1 << 20),
            });
        }
        for (key, value) in [
            ("max_unix_connections", config.max_unix_connections),
            ("max_tcp_connections", config.max_tcp_connections),
            (
                "max_unauthenticated_connections",
                config.max_unauthenticated_connections,
            ),
        ] {
            if value.is_some_and(|n| n == 0 || n > crate::limits::MAX_CONNECTIONS_KEY) {
                return Err(ConfigError::Invalid {
                    key,
                    reason: format!("between 1 and {}", crate::limits::MAX_CONNECTIONS_KEY),
                });
            }
        }
        if !config.pool_registry_dir.is_absolute() {
            return Err(ConfigError::Invalid {
                key: "pool_registry_dir",
                reason: "an absolute path (every daemon on the host must name the same one)".into(),
            });
        }
        if config.pool_check_interval_ms == 0 {
            return Err(ConfigError::Invalid {
                key: "pool_check_interval_ms",
                reason: "at least 1".into(),
            });
        }
        Ok(config)
    }

    /// The serving limits.
    pub fn limits(&self) -> crate::limits::ServeLimits {
        crate::limits::ServeLimits {
            request_timeout: std::time::Duration::from_millis(self.request_timeout_ms),
            max_concurrent_requests: self.max_concurrent_requests,
            header_read_timeout: std::time::Duration::from_millis(self.header_read_timeout_ms),
        }
    }

    /// The connection caps the config asks for (unset ones are fitted at start).
    pub fn requested_connections(&self) -> crate::limits::RequestedConnections {
        crate::limits::RequestedConnections {
            unix: self.max_unix_connections,
            tcp: self.max_tcp_connections,
            unauthenticated: self.max_unauthenticated_connections,
            tcp_enabled: self.listen_tcp.is_some(),
        }
    }

    /// The database file inside the state directory.
    pub fn database(&self) -> PathBuf {
        self.state_dir.join("subidd.db")
    }
}

fn read_file(path: &Path) -> Result<FileConfig, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    toml::from_str(&text).map_err(|e| ConfigError::Parse {
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}

/// Parses `listen_tcp` and refuses anything but loopback.
fn parse_listen(value: &str) -> Result<SocketAddr, ConfigError> {
    let addr: SocketAddr = value.parse().map_err(|_| ConfigError::BadAddress {
        value: value.to_string(),
    })?;
    if !addr.ip().is_loopback() {
        return Err(ConfigError::NotLoopback { addr });
    }
    Ok(addr)
}

fn env_num<T: std::str::FromStr>(
    env: &impl Fn(&str) -> Option<String>,
    name: &'static str,
) -> Result<Option<T>, ConfigError> {
    env(name)
        .map(|value| {
            value.trim().parse().map_err(|_| ConfigError::Env {
                name,
                value: value.clone(),
                reason: "not a number in range".into(),
            })
        })
        .transpose()
}

fn env_list(
    env: &impl Fn(&str) -> Option<String>,
    name: &'static str,
) -> Result<Option<Vec<u32>>, ConfigError> {
    env(name)
        .map(|value| {
            value
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(|s| {
                    s.parse().map_err(|_| ConfigError::Env {
                        name,
                        value: value.clone(),
                        reason: format!("{s:?} is not a numeric id"),
                    })
                })
                .collect()
        })
        .transpose()
}

// ---- [store]: where leases are kept ----

/// `[store]`: an empty `url` keeps leases in the SQLite file of `state_dir`; a
/// `postgresql://` URL keeps them in PostgreSQL, shared by every host pointed at it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreConfig {
    /// `postgresql://user@host:port/database`; `None` for the SQLite file.
    pub url: Option<String>,
    /// A file holding the PostgreSQL password (instead of one in the URL).
    pub password_file: Option<PathBuf>,
    /// This host's name in the fleet; `None` means the contents of /etc/machine-id.
    pub host_id: Option<String>,
    /// Deadline of every PostgreSQL operation (a lease write answers 503 `store_unavailable`
    /// within about this, never hangs).
    pub timeout_ms: u64,
    /// How often a host looks for other hosts' changes besides being notified of them.
    pub poll_interval_ms: u64,
    /// Most PostgreSQL connections for reads (one more writes).
    pub max_connections: u32,
}

/// The file layer of `[store]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileStoreConfig {
    url: Option<String>,
    password_file: Option<PathBuf>,
    host_id: Option<String>,
    timeout_ms: Option<u64>,
    poll_interval_ms: Option<u64>,
    max_connections: Option<u32>,
}

/// Where the host's id comes from when `store.host_id` is not set.
pub const MACHINE_ID: &str = "/etc/machine-id";

impl StoreConfig {
    fn load(
        file: &FileStoreConfig,
        flags: &Flags,
        env: &impl Fn(&str) -> Option<String>,
    ) -> Result<StoreConfig, ConfigError> {
        let url = flags
            .store_url
            .clone()
            .or_else(|| env("SUBIDD_STORE_URL"))
            .or_else(|| file.url.clone())
            .filter(|u| !u.trim().is_empty());
        if let Some(url) = &url
            && !(url.starts_with("postgresql://") || url.starts_with("postgres://"))
        {
            return Err(ConfigError::Invalid {
                key: "store.url",
                reason: "empty (the SQLite file in state_dir) or a postgresql:// URL".into(),
            });
        }
        let host_id = env("SUBIDD_STORE_HOST_ID")
            .or_else(|| file.host_id.clone())
            .filter(|h| !h.trim().is_empty());
        if let Some(host) = &host_id
            && !valid_host_id(host)
        {
            return Err(ConfigError::Invalid {
                key: "store.host_id",
                reason: "1-64 characters of [A-Za-z0-9_.-]".into(),
            });
        }
        let config = StoreConfig {
            url,
            password_file: env("SUBIDD_STORE_PASSWORD_FILE")
                .map(PathBuf::from)
                .or_else(|| file.password_file.clone())
                .filter(|p| !p.as_os_str().is_empty()),
            host_id,
            timeout_ms: env_num(env, "SUBIDD_STORE_TIMEOUT_MS")?
                .or(file.timeout_ms)
                .unwrap_or(5_000),
            poll_interval_ms: env_num(env, "SUBIDD_STORE_POLL_INTERVAL_MS")?
                .or(file.poll_interval_ms)
                .unwrap_or(1_000),
            max_connections: env_num(env, "SUBIDD_STORE_MAX_CONNECTIONS")?
                .or(file.max_connections)
                .unwrap_or(8),
        };
        for (key, value, low, high) in [
            ("store.timeout_ms", config.timeout_ms, 100, 600_000),
            (
                "store.poll_interval_ms",
                config.poll_interval_ms,
                10,
                600_000,
            ),
            (
                "store.max_connections",
                u64::from(config.max_connections),
                1,
                1_000,
            ),
        ] {
            if !(low..=high).contains(&value) {
                return Err(ConfigError::Invalid {
                    key,
                    reason: format!("between {low} and {high}"),
                });
            }
        }
        Ok(config)
    }

    /// This host's id: `host_id`, else /etc/machine-id.
    pub fn resolve_host_id(&self) -> Result<String, ConfigError> {
        if let Some(host) = &self.host_id {
            return Ok(host.clone());
        }
        let text = std::fs::read_to_string(MACHINE_ID).map_err(|source| ConfigError::Read {
            path: PathBuf::from(MACHINE_ID),
            source,
        })?;
        let id = text.trim().to_string();
        if !valid_host_id(&id) {
            return Err(ConfigError::Invalid {
                key: "store.host_id",
                reason: format!("set; {MACHINE_ID} does not hold a usable id"),
            });
        }
        Ok(id)
    }
}

/// Host ids name hosts in errors, `GET /v1/pool` and the database: short and plain.
fn valid_host_id(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn load(flags: Flags, env: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let env: HashMap<String, String> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Config::load(&flags, |k| env.get(k).cloned())
    }

    #[test]
    fn embedded_defaults() {
        let flags = Flags {
            config: Some(PathBuf::from("/dev/null")),
            ..Flags::default()
        };
        let c = load(flags, &[]).expect("defaults load");
        assert_eq!(c.socket, PathBuf::from("/run/subidd/subidd.sock"));
        assert_eq!(c.database(), PathBuf::from("/var/lib/subidd/subidd.db"));
        assert_eq!(c.quarantine_seconds, 86_400);
        assert_eq!(c.listen_tcp, None);
        assert_eq!(c.pool, PoolConfig::default());
        assert_eq!(c.pool_registry_dir, PathBuf::from("/run/subidd-pools"));
        assert_eq!(
            (c.max_unix_connections, c.max_tcp_connections),
            (None, None),
            "fitted to RLIMIT_NOFILE at start"
        );
    }

    #[test]
    fn shipped_config_file_states_the_defaults() {
        let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../config/subidd.toml");
        let from_file = load(
            Flags {
                config: Some(shipped),
                ..Flags::default()
            },
            &[],
        )
        .expect("config/subidd.toml loads");
        let defaults = load(
            Flags {
                config: Some(PathBuf::from("/dev/null")),
                ..Flags::default()
            },
            &[],
        )
        .expect("defaults load");
        assert_eq!(from_file, defaults);
    }

    #[test]
    fn layers_apply_in_order() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("c.toml");
        std::fs::write(
            &file,
            "state_dir = \"/file\"\nruntime_dir = \"/file-run\"\nquarantine_seconds = 5\n[pool]\nblock = 1024\n",
        )
        .expect("write");
        let flags = Flags {
            config: Some(file.clone()),
            ..Flags::default()
        };
        let c = load(flags.clone(), &[("SUBIDD_STATE_DIR", "/env")]).expect("load");
        assert_eq!(c.state_dir, PathBuf::from("/env"), "env beats file");
        assert_eq!(c.socket, PathBuf::from("/file-run/subidd.sock"));
        assert_eq!(c.quarantine_seconds, 5);
        assert_eq!(c.pool.block, Some(1024));
        let flags = Flags {
            state_dir: Some(PathBuf::from("/flag")),
            ..flags
        };
        let c = load(flags.clone(), &[("SUBIDD_STATE_DIR", "/env")]).expect("load");
        assert_eq!(c.state_dir, PathBuf::from("/flag"), "flag beats env");
        let flags = Flags {
            log_format: Some(LogFormat::Json),
            ..flags
        };
        let c = load(flags, &[("SUBIDD_LOG_FORMAT", "text")]).expect("load");
        assert_eq!(c.log_format, LogFormat::Json, "--log-format beats env");
    }

    #[test]
    fn tcp_must_be_loopback_and_have_a_token() {
        let base = Flags {
            config: Some(PathBuf::from("/dev/null")),
            token_file: Some(PathBuf::from("/tmp/t")),
            ..Flags::default()
        };
        let with = |addr: &str| Flags {
            listen_tcp: Some(addr.into()),
            ..base.clone()
        };
        assert!(load(with("127.0.0.1:7070"), &[]).is_ok());
        assert!(load(with("[::1]:7070"), &[]).is_ok());
        assert!(matches!(
            load(with("0.0.0.0:7070"), &[]),
            Err(ConfigError::NotLoopback { .. })
        ));
        assert!(matches!(
            load(with("10.0.0.1:7070"), &[]),
            Err(ConfigError::NotLoopback { .. })
        ));
        assert!(matches!(
            load(with("localhost"), &[]),
            Err(ConfigError::BadAddress { .. })
        ));
        let no_token = Flags {
            token_file: None,
            ..with("127.0.0.1:7070")
        };
        assert!(matches!(load(no_token, &[]), Err(ConfigError::NoToken)));
    }

    #[test]
    fn unknown_keys_and_bad_env_are_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("c.toml");
        std::fs::write(&file, "sokcet = \"/x\"\n").expect("write");
        let flags = Flags {
            config: Some(file),
            ..Flags::default()
        };
        let err = load(flags, &[]).expect_err("typo refused");
        assert!(err.to_string().contains("sokcet"), "{err}");
        let flags = Flags {
            config: Some(PathBuf::from("/dev/null")),
            ..Flags::default()
        };
        assert!(load(flags.clone(), &[("SUBIDD_POOL_BASE", "lots")]).is_err());
        for (name, value, key) in [
            ("SUBIDD_REQUEST_TIMEOUT_MS", "0", "request_timeout_ms"),
            (
                "SUBIDD_HEADER_READ_TIMEOUT_MS",
                "0",
                "header_read_timeout_ms",
            ),
            (
                "SUBIDD_MAX_CONCURRENT_REQUESTS",
                "0",
                "max_concurrent_requests",
            ),
            (
                "SUBIDD_MAX_CONCURRENT_REQUESTS",
                "99999999",
                "max_concurrent_requests",
            ),
            ("SUBIDD_MAX_TCP_CONNECTIONS", "0", "max_tcp_connections"),
            (
                "SUBIDD_MAX_UNIX_CONNECTIONS",
                "99999999",
                "max_unix_connections",
            ),
            (
                "SUBIDD_MAX_UNAUTHENTICATED_CONNECTIONS",
                "0",
                "max_unauthenticated_connections",
            ),
            (
                "SUBIDD_POOL_REGISTRY_DIR",
                "relative/dir",
                "pool_registry_dir",
            ),
        ] {
            let err = load(flags.clone(), &[(name, value)]).expect_err("limit refused");
            assert!(err.to_string().contains(key), "{name}={value}: {err}");
        }
        assert!(load(flags, &[("SUBIDD_ALLOWED_UIDS", "1000,x")]).is_err());
    }

    #[test]
    fn store_keys_layer_and_are_checked() {
        let flags = Flags {
            config: Some(PathBuf::from("/dev/null")),
            ..Flags::default()
        };
        let c = load(flags.clone(), &[]).expect("defaults");
        assert_eq!(c.store.url, None, "SQLite by default");
        assert_eq!(
            (c.store.timeout_ms, c.store.poll_interval_ms),
            (5_000, 1_000)
        );
        let c = load(
            flags.clone(),
            &[
                ("SUBIDD_STORE_URL", "postgresql://subidd@db/leases"),
                ("SUBIDD_STORE_HOST_ID", "host-a"),
            ],
        )
        .expect("env");
        assert_eq!(
            c.store.url.as_deref(),
            Some("postgresql://subidd@db/leases")
        );
        assert_eq!(c.store.resolve_host_id().expect("host"), "host-a");
        let c = load(
            Flags {
                store_url: Some("postgres://flag/db".into()),
                ..flags.clone()
            },
            &[("SUBIDD_STORE_URL", "postgresql://env/db")],
        )
        .expect("flag");
        assert_eq!(
            c.store.url.as_deref(),
            Some("postgres://flag/db"),
            "flag beats env"
        );
        for (name, value, key) in [
            ("SUBIDD_STORE_URL", "mysql://x/y", "store.url"),
            ("SUBIDD_STORE_HOST_ID", "a b", "store.host_id"),
            ("SUBIDD_STORE_TIMEOUT_MS", "5", "store.timeout_ms"),
        ] {
            let err = load(flags.clone(), &[(name, value)]).expect_err("refused");
            assert!(err.to_string().contains(key), "{name}={value}: {err}");
        }
    }
}
