//! Start-up and serving: directories, pool check, store, listeners, and clean shutdown.

use std::future::Future;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use axum::Router;
use axum::extract::ConnectInfo;
use axum::middleware;
use tokio::net::{TcpListener, UnixListener, UnixSocket, UnixStream};
use tokio::sync::watch;

use crate::api::{self, AppState};
use crate::auth::{self, TcpPolicy, UnixPeer, UnixPolicy};
use crate::config::Config;
use crate::lease::{LeaseService, StartOptions};
use crate::limits::{self, Caller, ConnectionBudget, ConnectionCaps, Limiter, ServeLimits};
use crate::paths;
use crate::pool;
use crate::process::{ProcessConfig, ProcessService};
use crate::registry::{self, PoolClaim};
use crate::systemd::{self, Handoff, Notifier};

/// Backlog of the unix socket: thousands of clients may connect at once.
const BACKLOG: u32 = 4096;

/// Runs the daemon until SIGTERM or SIGINT, with what systemd handed over (if anything).
pub async fn run(config: Config, handoff: Handoff) -> anyhow::Result<()> {
    for note in &handoff.notes {
        tracing::warn!("{note}");
    }
    let (stop_tx, stop_rx) = watch::channel(false);
    let notifier = handoff.notifier.clone();
    tokio::spawn(async move {
        shutdown_signal().await;
        tracing::info!("shutting down");
        // Before anything stops, so systemd knows the exit that follows is not a crash.
        if let Some(notifier) = &notifier {
            notifier.send("STOPPING=1\nSTATUS=shutting down");
        }
        let _ = stop_tx.send(true);
    });
    let daemon = Daemon::start_with(&config, handoff).await?;
    daemon.serve(stop_rx).await
}

/// A started daemon: store open, pool checked, listeners bound.
pub struct Daemon {
    state: AppState,
    unix: UnixListener,
    socket: PathBuf,
    /// False when systemd passed the socket: its .socket unit owns the file.
    remove_socket: bool,
    unix_policy: UnixPolicy,
    tcp: Option<(TcpListener, TcpPolicy)>,
    expiry_interval: Duration,
    /// How often a fleet member looks for other hosts' changes.
    fleet_poll: Duration,
    pool_watch: pool::WatchConfig,
    limits: ServeLimits,
    connections: ConnectionCaps,
    /// This daemon's entry in the host-wide pool registry, held until it stops.
    claim: PoolClaim,
    notifier: Option<Notifier>,
    watchdog: Option<Duration>,
}

impl Daemon {
    /// Everything up to accepting connections; errors name the file or setting at fault.
    pub async fn start(config: &Config) -> anyhow::Result<Daemon> {
        Daemon::start_with(config, Handoff::default()).await
    }

    /// As [`Daemon::start`], serving the socket systemd passed (if any) instead of binding one,
    /// and notifying systemd (if asked).
    pub async fn start_with(config: &Config, handoff: Handoff) -> anyhow::Result<Daemon> {
        let nofile = subid_sys::fdlimit::raise_nofile().context("reading RLIMIT_NOFILE")?;
        let (connections, notes) =
            limits::fit_connections(config.requested_connections(), nofile.soft)?;
        for note in notes {
            tracing::warn!("{note}");
        }
        tracing::info!(
            was = nofile.was,
            soft = nofile.soft,
            hard = nofile.hard,
            unix = connections.unix,
            tcp = connections.tcp,
            unauthenticated = connections.unauthenticated,
            "open-file limit and connection caps"
        );
        make_dir("state_dir", &config.state_dir, 0o700)?;
        make_dir("runtime_dir", &config.runtime_dir, 0o755)?;
        let (uids, gids) = tokio::task::spawn_blocking(|| {
            (subid_sys::userdb::all_uids(), subid_sys::userdb::all_gids())
        })
        .await
        .context("reading the user database")?;
        let (pool, source) = pool::choose(config, &uids, &gids)?;
        tracing::info!(
            base = pool.base(),
            size = pool.range().len(),
            block = pool.block(),
            source = source.as_str(),
            "pool"
        );
        let claim = {
            let (dir, range) = (config.pool_registry_dir.clone(), pool.range());
            let (state_dir, socket) = (config.state_dir.clone(), config.socket.clone());
            tokio::task::spawn_blocking(move || registry::claim(&dir, range, &state_dir, &socket))
                .await
                .context("registering the pool")??
        };
        tracing::info!(file = %claim.file().display(), "pool registered");
        let (store, writer) = open_store(config).await?;
        let poll = Duration::from_millis(config.store.poll_interval_ms);
        let options = StartOptions {
            // Other hosts of a fleet stop a lease's processes within a poll interval (or a
            // notification) plus the kill grace and the teardown's SIGKILL wait.
            release_wait: Duration::from_millis(config.kill_grace_ms)
                + Duration::from_secs(10)
                + 2 * poll,
            ..StartOptions::new(Duration::from_secs(config.quarantine_seconds))
        };
        let leases = LeaseService::start_with(store, writer, pool, options).await?;
        pool::refuse_undelegated(&leases, config).await?;
        if let Ok(prefix) = std::env::var(crate::holds::TEST_FOREIGN_CGROUPS_ENV)
            && let Some(own) = &config.cgroup_parent
        {
            leases
                .hold_scan()
                .ignore_foreign_cgroups(prefix, own.display().to_string());
        }
        let processes = ProcessService::start(
            leases.clone(),
            ProcessConfig {
                ns_dir: config.runtime_dir.join("ns"),
                log_dir: config.state_dir.join("logs"),
                runtime_dir: config.runtime_dir.clone(),
                keeper_program: std::path::PathBuf::from("/proc/self/exe"),
                log_max_bytes: config.log_max_bytes,
                kill_grace: Duration::from_millis(config.kill_grace_ms),
                cgroup_parent: config.cgroup_parent.clone(),
                spawn_timeout: Duration::from_millis(config.spawn_timeout_ms),
                reserve: config.state_dir.join("release-reserve"),
            },
        )
        .await
        .context("starting the process service")?;
        let (unix, socket, remove_socket) = match handoff.listener {
            Some((listener, path)) => {
                if path != config.socket {
                    tracing::warn!(
                        passed = %path.display(),
                        configured = %config.socket.display(),
                        "systemd passed a socket other than the configured one; serving the passed one"
                    );
                }
                tracing::info!(socket = %path.display(), "serving the socket systemd passed");
                (activated(listener, &path)?, path, false)
            }
            None => (
                bind_unix(&config.socket, &config.socket_group).await?,
                config.socket.clone(),
                true,
            ),
        };
        let tcp = match (config.listen_tcp, &config.token_file) {
            (Some(addr), Some(token_file)) => {
                let token = read_token(token_file)?;
                let listener = TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("binding listen_tcp {addr}"))?;
                tracing::info!(%addr, "listening on loopback TCP");
                Some((
                    listener,
                    TcpPolicy {
                        token: Arc::from(token.into_bytes()),
                    },
                ))
            }
            _ => None,
        };
        Ok(Daemon {
            state: AppState {
                leases,
                processes,
                pool_source: source,
                quarantine_seconds: config.quarantine_seconds,
            },
            unix,
            socket,
            remove_socket,
            unix_policy: UnixPolicy {
                allowed_uids: Arc::from(config.allowed_uids.clone()),
                allowed_gids: Arc::from(config.allowed_gids.clone()),
            },
            tcp,
            expiry_interval: Duration::from_millis(config.expiry_interval_ms),
            fleet_poll: poll,
            pool_watch: pool::WatchConfig {
                subuid_file: config.subuid_file.clone(),
                subgid_file: config.subgid_file.clone(),
                interval: Duration::from_millis(config.pool_check_interval_ms),
            },
            limits: config.limits(),
            connections,
            claim,
            notifier: handoff.notifier,
            watchdog: handoff.watchdog,
        })
    }

    /// Serves until `stop` turns true, then removes the socket (unless systemd passed it).
    /// With a notifier: READY=1 once the socket answers `/_ping`, then watchdog pings.
    pub async fn serve(self, stop: watch::Receiver<bool>) -> anyhow::Result<()> {
        let expiry = tokio::spawn(
            self.state
                .processes
                .clone()
                .run_expiry(self.expiry_interval),
        );
        let pool_watch = tokio::spawn(pool::watch(self.state.leases.clone(), self.pool_watch));
        // With a fleet's store: this host keeps in step with the others (nothing otherwise).
        let fleet = tokio::spawn(crate::fleet::run(
            self.state.leases.clone(),
            self.state.processes.clone(),
            self.fleet_poll,
        ));
        // One budget of requests in flight for both listeners; it is checked before
        // authentication, so a flood of refused callers is shed as well.
        let limiter = Limiter::new(&self.limits);
        // Inside authentication: reached only by callers it let in, whose connections then
        // leave the unauthenticated budget.
        let unix_app = api::router(self.state.clone())
            .layer(middleware::from_fn(limits::mark_authenticated))
            .layer(middleware::from_fn_with_state(
                self.unix_policy.clone(),
                auth::unix_auth,
            ))
            .layer(middleware::from_fn_with_state(
                limiter.clone(),
                limits::limit,
            ))
            .layer(middleware::from_fn_with_state(
                self.state.clone(),
                api::observe,
            ))
            .layer(middleware::map_response(api::stamp_headers))
            .layer(middleware::map_response(limits::close_refused));
        // Event streams never end by themselves; a graceful stop would wait for them forever.
        let feed = self.state.leases.feed().clone();
        let feed_stop = stopped(stop.clone());
        tokio::spawn(async move {
            feed_stop.await;
            feed.close();
        });
        tracing::info!(socket = %self.socket.display(), "listening");
        // Each listener has a budget of its own: a flood on TCP never takes the unix socket's.
        let caps = self.connections;
        let unix = tokio::spawn(serve_unix(
            self.unix,
            unix_app,
            self.limits,
            self.unix_policy.clone(),
            ConnectionBudget::new("unix", caps.unix, caps.unauthenticated),
            stopped(stop.clone()),
        ));
        let limits = self.limits;
        let tcp = self.tcp.map(|(listener, policy)| {
            let app: Router = api::router(self.state.clone())
                .layer(middleware::from_fn(limits::mark_authenticated))
                .layer(middleware::from_fn_with_state(policy, auth::tcp_auth))
                .layer(middleware::from_fn_with_state(limiter, limits::limit))
                .layer(middleware::from_fn_with_state(
                    self.state.clone(),
                    api::observe,
                ))
                .layer(middleware::map_response(api::stamp_headers))
                .layer(middleware::map_response(limits::close_refused));
            tokio::spawn(serve_tcp(
                listener,
                app,
                limits,
                ConnectionBudget::new("tcp", caps.tcp, caps.unauthenticated),
                stopped(stop.clone()),
            ))
        });
        let watchdog = match &self.notifier {
            Some(notifier) => {
                let status = systemd::self_ping(&self.socket).await?;
                tracing::info!(%status, "GET /_ping answers; telling systemd we are ready");
                notifier.send(&format!(
                    "READY=1\nSTATUS=serving {}",
                    self.socket.display()
                ));
                self.watchdog.map(|usec| {
                    tracing::info!(every = ?usec / 2, "pinging the systemd watchdog");
                    tokio::spawn(systemd::watchdog(
                        notifier.clone(),
                        usec,
                        self.state.leases.clone(),
                    ))
                })
            }
            None => None,
        };
        let result = unix.await.context("unix server task")?;
        if let Some(tcp) = tcp {
            tcp.await.context("tcp server task")??;
        }
        expiry.abort();
        pool_watch.abort();
        fleet.abort();
        if let Some(watchdog) = watchdog {
            watchdog.abort();
        }
        if self.remove_socket
            && let Err(error) = std::fs::remove_file(&self.socket)
        {
            tracing::warn!(%error, socket = %self.socket.display(), "cannot remove socket");
        }
        // Last: the pool stays registered as long as anything of this daemon serves.
        drop(self.claim);
        result
    }
}

/// Opens the lease store `[store]` names: the SQLite file of the state directory, or a fleet's
/// PostgreSQL database (with this host's file beside it for what is local to the host).
async fn open_store(config: &Config) -> anyhow::Result<(subid_store::Store, subid_store::Writer)> {
    let database = config.database();
    let damaged = || {
        format!(
            "database {} cannot be used; subidd never recreates it: restore it from a \
             backup or move it away",
            database.display()
        )
    };
    let Some(pg) = pg_config(config)? else {
        tracing::info!(database = %database.display(), "lease store: SQLite");
        return subid_store::open(&database).await.with_context(damaged);
    };
    tracing::info!(store = %pg.redacted(), host = %pg.host_id, "lease store: PostgreSQL");
    subid_store::open_fleet(&database, &pg)
        .await
        .with_context(|| format!("opening the lease store {}", pg.redacted()))
}

/// How to reach the PostgreSQL store `[store]` names, if it names one.
pub(crate) fn pg_config(config: &Config) -> anyhow::Result<Option<subid_store::PgConfig>> {
    let Some(url) = &config.store.url else {
        return Ok(None);
    };
    let password = match &config.store.password_file {
        Some(path) => Some({
            paths::check_password_file(path)?;
            std::fs::read_to_string(path)
                .with_context(|| format!("reading store.password_file {}", path.display()))?
                .trim_end_matches(['\r', '\n'])
                .to_string()
        }),
        None => None,
    };
    Ok(Some(subid_store::PgConfig {
        url: url.clone(),
        password,
        host_id: config.store.resolve_host_id()?,
        timeout: Duration::from_millis(config.store.timeout_ms),
        max_connections: config.store.max_connections,
    }))
}

/// Serves `app` on a bound unix listener until `shutdown` completes; each connection's
/// requests carry the peer's credentials (`ConnectInfo<UnixPeer>`) for the auth layer. A peer
/// `policy` allows (root always) is admitted as such, so it never waits on the budget of
/// unauthenticated connections; the auth layer still decides each request.
pub async fn serve_unix(
    listener: UnixListener,
    app: Router,
    limits: ServeLimits,
    policy: UnixPolicy,
    budget: ConnectionBudget,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    limits::serve(
        listener,
        limits.header_read_timeout,
        budget,
        shutdown,
        |stream: &UnixStream| {
            let peer = UnixPeer::of(stream);
            let caller = match &peer.0 {
                Some(cred) if policy.allows(cred) => Caller::Allowed,
                _ => Caller::Unknown,
            };
            let service = tower::ServiceBuilder::new()
                .map_request(move |mut request: axum::http::Request<_>| {
                    request.extensions_mut().insert(ConnectInfo(peer.clone()));
                    request
                })
                .service(app.clone());
            (service, caller)
        },
    )
    .await;
    Ok(())
}

/// Serves `app` on a bound TCP listener until `shutdown` completes.
pub async fn serve_tcp(
    listener: TcpListener,
    app: Router,
    limits: ServeLimits,
    budget: ConnectionBudget,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    limits::serve(
        listener,
        limits.header_read_timeout,
        budget,
        shutdown,
        |_| (app.clone(), Caller::Unknown),
    )
    .await;
    Ok(())
}

/// Resolves once `stop` says true (or its sender is gone).
async fn stopped(mut stop: watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let term = signal(SignalKind::terminate());
    let int = signal(SignalKind::interrupt());
    match (term, int) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        _ => {
            tracing::error!("cannot install signal handlers; stop with SIGKILL");
            std::future::pending::<()>().await;
        }
    }
}

/// Creates a directory (and parents) and sets its mode, after refusing one that root does
/// not own alone, or whose parents are not root's (see [`paths::check_trusted_dir`]): such a
/// directory is never "fixed" by a chmod, since whoever could write to it may have put
/// something there already. A directory that has the mode already is left alone, so that a
/// read-only mount gets as far as the database, whose refusal says why.
fn make_dir(what: &'static str, path: &Path, mode: u32) -> anyhow::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(mode)
        .create(path)
        .with_context(|| format!("creating {what} {}", path.display()))?;
    paths::check_trusted_dir(what, path)?;
    let current = std::fs::metadata(path)
        .with_context(|| format!("inspecting {}", path.display()))?
        .permissions()
        .mode();
    if current & 0o7777 == mode {
        return Ok(());
    }
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("setting mode {mode:o} on {}", path.display()))
}

/// Binds the socket with mode 0660 and the configured group (root when the group is missing).
/// A stale socket is replaced; a live one (another daemon answering) is refused.
async fn bind_unix(path: &Path, group: &str) -> anyhow::Result<UnixListener> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("creating {}", parent.display()))?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            if tokio::net::UnixStream::connect(path).await.is_ok() {
                bail!(
                    "{} is served by another process (another subidd?); stop it or pick another --socket",
                    path.display()
                );
            }
            std::fs::remove_file(path)
                .with_context(|| format!("removing stale socket {}", path.display()))?;
        }
        Ok(_) => bail!(
            "{} exists and is not a socket; move it away or pick another --socket",
            path.display()
        ),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("inspecting {}", path.display())),
    }
    let socket = UnixSocket::new_stream().context("creating unix socket")?;
    // The socket file is created with the process umask (0022: no write for others, so nobody
    // but root can connect until the chmod/chown below).
    socket
        .bind(path)
        .with_context(|| format!("binding {}", path.display()))?;
    let gid = match subid_sys::userdb::group_id(group) {
        Some(gid) => gid,
        None => {
            tracing::warn!(
                group,
                "socket group {group:?} does not exist, so the socket stays root-only. To let \
                 other users in: `groupadd --system {group}`, `usermod -aG {group} USER` for each \
                 (they log in again), list them in allowed_uids or the group's gid in \
                 allowed_gids, then restart subidd"
            );
            0
        }
    };
    std::os::unix::fs::chown(path, Some(0), Some(gid))
        .with_context(|| format!("chown {} to root:{gid}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))
        .with_context(|| format!("chmod 0660 {}", path.display()))?;
    socket
        .listen(BACKLOG)
        .with_context(|| format!("listening on {}", path.display()))
}

/// The listening socket systemd passed, for tokio. Its mode and group are the .socket unit's
/// (SocketMode=, SocketGroup=); who may call is still decided per connection by SO_PEERCRED.
fn activated(
    listener: std::os::unix::net::UnixListener,
    path: &Path,
) -> anyhow::Result<UnixListener> {
    listener
        .set_nonblocking(true)
        .with_context(|| format!("making the passed socket {} non-blocking", path.display()))?;
    UnixListener::from_std(listener)
        .with_context(|| format!("registering the passed socket {}", path.display()))
}

/// Reads the bearer token; refuses an empty one, and a file that is not root's alone.
fn read_token(path: &Path) -> anyhow::Result<String> {
    paths::check_token_file(path)?;
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading token_file {}", path.display()))?;
    let token = text.trim().to_string();
    if token.is_empty() {
        bail!(
            "token_file {} is empty; put a long random token in it",
            path.display()
        );
    }
    Ok(token)
}
