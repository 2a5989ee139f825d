//! Start-up and serving: directories, pool check, store, listeners, and clean shutdown.

use std::future::Future;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use axum::Router;
use axum::middleware;
use tokio::net::{TcpListener, UnixListener, UnixSocket};
use tokio::sync::watch;

use crate::api::{self, AppState};
use crate::auth::{self, TcpPolicy, UnixPeer, UnixPolicy};
use crate::config::Config;
use crate::lease::LeaseService;
use crate::pool;
use crate::process::{ProcessConfig, ProcessService};

/// Backlog of the unix socket: thousands of clients may connect at once.
const BACKLOG: u32 = 4096;

/// Runs the daemon until SIGTERM or SIGINT.
pub async fn run(config: Config) -> anyhow::Result<()> {
    let (stop_tx, stop_rx) = watch::channel(false);
    tokio::spawn(async move {
        shutdown_signal().await;
        tracing::info!("shutting down");
        let _ = stop_tx.send(true);
    });
    let daemon = Daemon::start(&config).await?;
    daemon.serve(stop_rx).await
}

/// A started daemon: store open, pool checked, listeners bound.
pub struct Daemon {
    state: AppState,
    unix: UnixListener,
    socket: PathBuf,
    unix_policy: UnixPolicy,
    tcp: Option<(TcpListener, TcpPolicy)>,
    expiry_interval: Duration,
}

impl Daemon {
    /// Everything up to accepting connections; errors name the file or setting at fault.
    pub async fn start(config: &Config) -> anyhow::Result<Daemon> {
        make_dir(&config.state_dir, 0o700)?;
        make_dir(&config.runtime_dir, 0o755)?;
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
        let database = config.database();
        let (store, writer) = subid_store::open(&database).await.with_context(|| {
            format!(
                "database {} cannot be used; subidd never recreates it: restore it from a \
                 backup or move it away",
                database.display()
            )
        })?;
        let quarantine = Duration::from_secs(config.quarantine_seconds);
        let leases = LeaseService::start(store, writer, pool, quarantine).await?;
        let processes = ProcessService::start(
            leases.clone(),
            ProcessConfig {
                ns_dir: config.runtime_dir.join("ns"),
                log_dir: config.state_dir.join("logs"),
                log_max_bytes: config.log_max_bytes,
                kill_grace: Duration::from_millis(config.kill_grace_ms),
                cgroup_parent: config.cgroup_parent.clone(),
            },
        )
        .await
        .context("starting the process service")?;
        let unix = bind_unix(&config.socket, &config.socket_group).await?;
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
            socket: config.socket.clone(),
            unix_policy: UnixPolicy {
                allowed_uids: Arc::from(config.allowed_uids.clone()),
                allowed_gids: Arc::from(config.allowed_gids.clone()),
            },
            tcp,
            expiry_interval: Duration::from_millis(config.expiry_interval_ms),
        })
    }

    /// Serves until `stop` turns true, then removes the socket.
    pub async fn serve(self, stop: watch::Receiver<bool>) -> anyhow::Result<()> {
        let expiry = tokio::spawn(
            self.state
                .processes
                .clone()
                .run_expiry(self.expiry_interval),
        );
        let unix_app = api::router(self.state.clone())
            .layer(middleware::from_fn_with_state(
                self.unix_policy.clone(),
                auth::unix_auth,
            ))
            .layer(middleware::from_fn_with_state(
                self.state.clone(),
                api::observe,
            ))
            .layer(middleware::map_response(api::stamp_headers));
        // Event streams never end by themselves; a graceful stop would wait for them forever.
        let feed = self.state.leases.feed().clone();
        let feed_stop = stopped(stop.clone());
        tokio::spawn(async move {
            feed_stop.await;
            feed.close();
        });
        tracing::info!(socket = %self.socket.display(), "listening");
        let unix = tokio::spawn(serve_unix(self.unix, unix_app, stopped(stop.clone())));
        let tcp = self.tcp.map(|(listener, policy)| {
            let app: Router = api::router(self.state.clone())
                .layer(middleware::from_fn_with_state(policy, auth::tcp_auth))
                .layer(middleware::from_fn_with_state(
                    self.state.clone(),
                    api::observe,
                ))
                .layer(middleware::map_response(api::stamp_headers));
            tokio::spawn(serve_tcp(listener, app, stopped(stop.clone())))
        });
        let result = unix.await.context("unix server task")?;
        if let Some(tcp) = tcp {
            tcp.await.context("tcp server task")??;
        }
        expiry.abort();
        if let Err(error) = std::fs::remove_file(&self.socket) {
            tracing::warn!(%error, socket = %self.socket.display(), "cannot remove socket");
        }
        result
    }
}

/// Serves `app` on a bound unix listener until `shutdown` completes.
pub async fn serve_unix(
    listener: UnixListener,
    app: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    axum::serve(
        listener,
        app.into_make_service_with_connect_info::<UnixPeer>(),
    )
    .with_graceful_shutdown(shutdown)
    .await
    .context("serving the unix socket")
}

/// Serves `app` on a bound TCP listener until `shutdown` completes.
pub async fn serve_tcp(
    listener: TcpListener,
    app: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
        .context("serving loopback TCP")
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

/// Creates a directory (and parents) and sets its mode.
fn make_dir(path: &Path, mode: u32) -> anyhow::Result<()> {
    std::fs::create_dir_all(path).with_context(|| format!("creating {}", path.display()))?;
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
                "socket group does not exist; the socket stays root-only"
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

/// Reads the bearer token; refuses an empty one and warns when others can read the file.
fn read_token(path: &Path) -> anyhow::Result<String> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading token_file {}", path.display()))?;
    let token = text.trim().to_string();
    if token.is_empty() {
        bail!(
            "token_file {} is empty; put a long random token in it",
            path.display()
        );
    }
    if let Ok(meta) = std::fs::metadata(path)
        && meta.permissions().mode() & 0o077 != 0
    {
        tracing::warn!(file = %path.display(), "token_file is readable by group or others; chmod 600 it");
    }
    Ok(token)
}
