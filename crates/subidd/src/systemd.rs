//! systemd integration: what the service manager hands over at exec (sd_notify(3) socket,
//! watchdog, sd_listen_fds(3) socket) and the READY/STOPPING/WATCHDOG notifications.
//!
//! The notify protocol is a datagram of `KEY=value` lines to `$NOTIFY_SOCKET` (a path, or
//! `@name` for an abstract socket); std's `UnixDatagram` speaks it without `unsafe`. The
//! `sd-notify` crate reads `$NOTIFY_SOCKET` on every call, so it cannot work once the variable
//! is unset, and unsetting it later, from a multi-threaded runtime, is unsound; so the
//! variables are taken once, first thing in `main`, and kept here.

use std::ffi::OsString;
use std::io;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram, UnixListener};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use nix::sys::socket::{AddressFamily, SockType};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::lease::LeaseService;

/// The variables systemd passes; all are removed from the environment at start.
pub const VARS: [&str; 6] = [
    "NOTIFY_SOCKET",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
    "LISTEN_PID",
    "LISTEN_FDS",
    "LISTEN_FDNAMES",
];

/// What the service manager handed over, taken out of the environment and fd table.
#[derive(Debug, Default)]
pub struct Handoff {
    /// Where to send notifications (`NOTIFY_SOCKET`).
    pub notifier: Option<Notifier>,
    /// `WATCHDOG_USEC`, when it is meant for this process: ping at half of it.
    pub watchdog: Option<Duration>,
    /// The passed listening socket (`LISTEN_FDS=1`), with the path it is bound to.
    pub listener: Option<(UnixListener, PathBuf)>,
    /// What was ignored and why, to log once logging is set up.
    pub notes: Vec<String>,
}

impl Handoff {
    /// Takes the variables out of the environment and adopts a passed socket. Call it first
    /// in `main`, while the process has one thread and has opened no file.
    pub fn take() -> anyhow::Result<Handoff> {
        let values = subid_sys::activation::take_env(&VARS)
            .context("taking the systemd variables out of the environment")?;
        let env: Vec<Option<String>> = values
            .into_iter()
            .map(|v| v.map(|s: OsString| s.to_string_lossy().into_owned()))
            .collect();
        let plan = Plan::from_env(|name| env_value(&env, name), std::process::id())?;
        let notifier = match plan.notify {
            Some(addr) => Some(Notifier::new(addr).context("NOTIFY_SOCKET")?),
            None => None,
        };
        let listener = match plan.listen {
            Some(names) => Some(adopt(&names)?),
            None => None,
        };
        Ok(Handoff {
            notifier,
            watchdog: plan.watchdog,
            listener,
            notes: plan.notes,
        })
    }
}

fn env_value(values: &[Option<String>], name: &str) -> Option<String> {
    VARS.iter()
        .position(|v| *v == name)
        .and_then(|i| values.get(i).cloned().flatten())
        .filter(|v| !v.is_empty())
}

/// Where `NOTIFY_SOCKET` points.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NotifyAddr {
    Path(PathBuf),
    Abstract(Vec<u8>),
}

/// What the variables say, decided without touching the kernel.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Plan {
    pub notify: Option<NotifyAddr>,
    pub watchdog: Option<Duration>,
    /// `Some(names)` when one socket was passed to this process (names from LISTEN_FDNAMES).
    pub listen: Option<String>,
    pub notes: Vec<String>,
}

impl Plan {
    /// Reads the variables (through `get`) for the process `pid`. Variables meant for another
    /// process (LISTEN_PID, WATCHDOG_PID) are ignored with a note; malformed socket activation
    /// is an error, since serving some other socket than the one systemd listens on would
    /// leave its clients waiting forever.
    pub fn from_env(get: impl Fn(&str) -> Option<String>, pid: u32) -> anyhow::Result<Plan> {
        let mut plan = Plan::default();
        if let Some(socket) = get("NOTIFY_SOCKET") {
            if let Some(name) = socket.strip_prefix('@') {
                plan.notify = Some(NotifyAddr::Abstract(name.as_bytes().to_vec()));
            } else if socket.starts_with('/') {
                plan.notify = Some(NotifyAddr::Path(PathBuf::from(socket)));
            } else {
                plan.notes.push(format!(
                    "NOTIFY_SOCKET={socket:?} is neither an absolute path nor @abstract; not notifying"
                ));
            }
        }
        if let Some(usec) = get("WATCHDOG_USEC") {
            let for_us = match get("WATCHDOG_PID") {
                None => true,
                Some(p) => p.parse::<u32>().ok() == Some(pid),
            };
            match usec.parse::<u64>() {
                Ok(usec) if usec > 0 && for_us => {
                    plan.watchdog = Some(Duration::from_micros(usec));
                }
                Ok(_) if !for_us => plan
                    .notes
                    .push("WATCHDOG_PID names another process; no watchdog pings".into()),
                _ => plan.notes.push(format!(
                    "WATCHDOG_USEC={usec:?} is not a positive number of microseconds; no watchdog pings"
                )),
            }
        }
        if let Some(fds) = get("LISTEN_FDS") {
            match get("LISTEN_PID").map(|p| p.parse::<u32>()) {
                Some(Ok(p)) if p == pid => {
                    let count: u32 = fds
                        .parse()
                        .with_context(|| format!("LISTEN_FDS={fds:?} is not a number"))?;
                    let names = get("LISTEN_FDNAMES").unwrap_or_else(|| "unknown".into());
                    match count {
                        0 => {}
                        1 => plan.listen = Some(names),
                        n => bail!(
                            "systemd passed {n} sockets ({names}); subidd serves exactly one \
                             unix socket: give its .socket unit a single ListenStream= path"
                        ),
                    }
                }
                _ => plan.notes.push(
                    "LISTEN_FDS is set but LISTEN_PID does not name this process; \
                     binding the socket instead"
                        .into(),
                ),
            }
        }
        Ok(plan)
    }
}

/// Adopts fd 3 and checks that it is a listening unix stream socket bound to a path. A passed
/// TCP (or any other) socket is refused, not ignored: subidd would leave it unserved while
/// systemd kept queueing connections on it. TCP is configured with `listen_tcp` instead.
fn adopt(names: &str) -> anyhow::Result<(UnixListener, PathBuf)> {
    let mut fds = subid_sys::activation::take_listen_fds(1).context("LISTEN_FDS")?;
    let fd = fds.pop().context("LISTEN_FDS=1 but no fd was taken")?;
    let info =
        subid_sys::activation::socket_info(std::os::fd::AsFd::as_fd(&fd)).with_context(|| {
            format!("fd 3 ({names}) passed by systemd is not a socket subidd can serve")
        })?;
    if info.family != Some(AddressFamily::Unix)
        || info.sock_type != SockType::Stream
        || !info.listening
    {
        let family = info
            .family
            .map_or_else(|| "unknown".to_string(), |f| format!("{f:?}"));
        bail!(
            "fd 3 ({names}) passed by systemd is a {family} {:?} socket{}; subidd takes only a \
             listening unix stream socket (ListenStream=/path); for TCP set listen_tcp",
            info.sock_type,
            if info.listening {
                ""
            } else {
                " (not listening)"
            }
        );
    }
    let path = info.path.with_context(|| {
        format!("fd 3 ({names}) passed by systemd is an unnamed or abstract unix socket; use ListenStream=/path")
    })?;
    Ok((UnixListener::from(fd), path))
}

/// Sends notifications to the service manager. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Notifier {
    socket: Arc<UnixDatagram>,
    addr: SocketAddr,
}

impl Notifier {
    /// An unbound datagram socket aimed at `addr`.
    pub fn new(addr: NotifyAddr) -> io::Result<Notifier> {
        let addr = match addr {
            NotifyAddr::Path(path) => SocketAddr::from_pathname(path)?,
            NotifyAddr::Abstract(name) => SocketAddr::from_abstract_name(name)?,
        };
        let socket = UnixDatagram::unbound()?;
        // The manager's queue is only ever full when it is wedged; do not wedge with it.
        socket.set_write_timeout(Some(Duration::from_secs(1)))?;
        Ok(Notifier {
            socket: Arc::new(socket),
            addr,
        })
    }

    /// Sends one datagram of `KEY=value` lines; failures are logged, not returned (systemd
    /// notices a missing READY or WATCHDOG by itself).
    pub fn send(&self, message: &str) {
        if let Err(error) = self.socket.send_to_addr(message.as_bytes(), &self.addr) {
            tracing::warn!(%error, message, "cannot notify systemd");
        }
    }
}

/// Checks that the daemon answers `GET /_ping` on its own socket (as root it passes the peer
/// check): readiness means a client would be served now, not merely that a socket exists.
pub async fn self_ping(socket: &Path) -> anyhow::Result<String> {
    let exchange = async {
        let mut stream = tokio::net::UnixStream::connect(socket)
            .await
            .with_context(|| format!("connecting to {}", socket.display()))?;
        stream
            .write_all(b"GET /_ping HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            .await
            .context("sending GET /_ping")?;
        let mut answer = Vec::new();
        stream
            .read_to_end(&mut answer)
            .await
            .context("reading the answer to GET /_ping")?;
        let text = String::from_utf8_lossy(&answer);
        let status = text.lines().next().unwrap_or_default().to_string();
        if !status.starts_with("HTTP/1.1 ") {
            bail!("GET /_ping on {} got {status:?}", socket.display());
        }
        Ok(status)
    };
    tokio::time::timeout(Duration::from_secs(10), exchange)
        .await
        .with_context(|| format!("GET /_ping on {} took over 10s", socket.display()))?
}

/// Pings the watchdog every half `WATCHDOG_USEC` for as long as the lease writer takes a ping
/// and the read pool answers a query, each within that half period. When the check fails the
/// ping is skipped (and STATUS says why), so a wedged writer gets the service restarted.
pub async fn watchdog(notifier: Notifier, usec: Duration, leases: LeaseService) {
    let period = (usec / 2).max(Duration::from_millis(1));
    let mut ticker = tokio::time::interval(period);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut healthy = true;
    loop {
        ticker.tick().await;
        match health(&leases, period).await {
            Ok(()) => {
                if healthy {
                    notifier.send("WATCHDOG=1");
                } else {
                    tracing::info!("healthy again; watchdog pings resume");
                    notifier.send("WATCHDOG=1\nSTATUS=serving");
                    healthy = true;
                }
            }
            Err(reason) => {
                tracing::error!(%reason, "health check failed; not pinging the watchdog");
                notifier.send(&format!("STATUS=unhealthy: {reason}"));
                healthy = false;
            }
        }
    }
}

/// The watchdog's check: the writer task answers a ping and a read query returns.
async fn health(leases: &LeaseService, within: Duration) -> Result<(), String> {
    match tokio::time::timeout(within, leases.ping()).await {
        Err(_) => return Err(format!("the lease writer did not answer within {within:?}")),
        Ok(Err(e)) => return Err(format!("the lease writer is gone: {e}")),
        Ok(Ok(())) => {}
    }
    // The host's own database file (with a fleet's store, an outage of the store is no reason
    // for systemd to restart the daemon: it rides it out).
    match tokio::time::timeout(within, leases.store().check_local()).await {
        Err(_) => Err(format!("a database read did not return within {within:?}")),
        Ok(Err(e)) => Err(format!("a database read failed: {e}")),
        Ok(Ok(_)) => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(vars: &[(&str, &str)], pid: u32) -> anyhow::Result<Plan> {
        let vars: Vec<(String, String)> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Plan::from_env(
            |name| vars.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone()),
            pid,
        )
    }

    #[test]
    fn nothing_set_means_nothing_to_do() {
        assert_eq!(plan(&[], 7).expect("plan"), Plan::default());
    }

    #[test]
    fn notify_socket_path_and_abstract() {
        let p = plan(&[("NOTIFY_SOCKET", "/run/systemd/notify")], 7).expect("plan");
        assert_eq!(
            p.notify,
            Some(NotifyAddr::Path("/run/systemd/notify".into()))
        );
        let p = plan(&[("NOTIFY_SOCKET", "@sd-notify/1")], 7).expect("plan");
        assert_eq!(
            p.notify,
            Some(NotifyAddr::Abstract(b"sd-notify/1".to_vec()))
        );
        let p = plan(&[("NOTIFY_SOCKET", "vsock:2:1234")], 7).expect("plan");
        assert_eq!(p.notify, None);
        assert_eq!(p.notes.len(), 1);
    }

    #[test]
    fn watchdog_only_for_this_pid() {
        type Vars<'a> = &'a [(&'a str, &'a str)];
        let cases: &[(Vars, Option<u64>)] = &[
            (&[("WATCHDOG_USEC", "30000000")], Some(30_000_000)),
            (
                &[("WATCHDOG_USEC", "30000000"), ("WATCHDOG_PID", "7")],
                Some(30_000_000),
            ),
            (
                &[("WATCHDOG_USEC", "30000000"), ("WATCHDOG_PID", "8")],
                None,
            ),
            (&[("WATCHDOG_USEC", "0")], None),
            (&[("WATCHDOG_USEC", "soon")], None),
        ];
        for (vars, want) in cases {
            let p = plan(vars, 7).expect("plan");
            assert_eq!(p.watchdog, want.map(Duration::from_micros), "{vars:?}");
            assert_eq!(p.notes.is_empty(), want.is_some(), "{vars:?}");
        }
    }

    #[test]
    fn listen_fds_rules() {
        let ours = plan(
            &[
                ("LISTEN_PID", "7"),
                ("LISTEN_FDS", "1"),
                ("LISTEN_FDNAMES", "subidd.socket"),
            ],
            7,
        )
        .expect("plan");
        assert_eq!(ours.listen.as_deref(), Some("subidd.socket"));
        let other = plan(&[("LISTEN_PID", "8"), ("LISTEN_FDS", "1")], 7).expect("plan");
        assert_eq!(other.listen, None);
        assert_eq!(other.notes.len(), 1);
        let no_pid = plan(&[("LISTEN_FDS", "1")], 7).expect("plan");
        assert_eq!(no_pid.listen, None);
        let none = plan(&[("LISTEN_PID", "7"), ("LISTEN_FDS", "0")], 7).expect("plan");
        assert_eq!(none, Plan::default());
        let two = plan(&[("LISTEN_PID", "7"), ("LISTEN_FDS", "2")], 7).expect_err("two");
        assert!(two.to_string().contains("exactly one"), "{two}");
        let bad = plan(&[("LISTEN_PID", "7"), ("LISTEN_FDS", "x")], 7).expect_err("bad");
        assert!(bad.to_string().contains("not a number"), "{bad}");
    }

    #[test]
    fn notifier_reaches_path_and_abstract_sockets() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("notify");
        let receiver = UnixDatagram::bind(&path).expect("bind");
        Notifier::new(NotifyAddr::Path(path))
            .expect("notifier")
            .send("READY=1");
        let mut buf = [0u8; 64];
        let n = receiver.recv(&mut buf).expect("recv");
        assert_eq!(&buf[..n], b"READY=1");

        let name = format!("subidd-test-{}", std::process::id());
        let addr = SocketAddr::from_abstract_name(name.as_bytes()).expect("addr");
        let receiver = UnixDatagram::bind_addr(&addr).expect("bind abstract");
        Notifier::new(NotifyAddr::Abstract(name.into_bytes()))
            .expect("notifier")
            .send("WATCHDOG=1");
        let n = receiver.recv(&mut buf).expect("recv");
        assert_eq!(&buf[..n], b"WATCHDOG=1");
    }
}
