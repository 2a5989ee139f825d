//! The log files of processes: the daemon's side of the log keeper.
//!
//! A process gets the write end of one pipe as stdout and of
//! another as stderr; one keeper process per daemon (`subidd --log-keeper`, see
//! `subid_sys::logkeep`) copies every pipe into `<log-dir>/<id>.stdout` / `.stderr` and keeps
//! each file within `log_max_bytes` plus a stated slack, whatever the process does: a process
//! that held its file could preallocate it, punch holes in it, or keep writing from a
//! background child after its recorded process was gone. The spawn path pays two `pipe2` and
//! one `sendmsg` ([`Logs::attach`]); a file is created by the keeper with its first bytes, off
//! that path.
//!
//! The keeper outlives the daemon: the next start connects to the same socket
//! (`<runtime-dir>/logkeeper.sock`) and takes the ids back with their read ends (`LIST`). The
//! daemon keeps its own copy of every read end (the *mirror*) and never reads it: if the keeper
//! dies, no writer gets `EPIPE`, and a watcher thread starts a new keeper and attaches every id
//! of the mirror to it again; the files continue where they were. A keeper that runs with
//! another `log_max_bytes` or protocol version is replaced the same way at start: its ids are
//! listed, it is stopped, a new one gets them. Every wait on the keeper has a deadline.

use std::collections::{HashMap, HashSet};
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use subid_sys::logkeep::{self, Client, IdStats, KeeperConfig, KeeperError};
use subid_sys::{PidFd, SysError};

/// The keeper's socket, in the runtime dir.
pub const KEEPER_SOCKET: &str = "logkeeper.sock";
/// How long starting (or replacing) the keeper may take.
const KEEPER_START: Duration = Duration::from_secs(10);
/// How long the watcher waits on the connection per round (also how soon a dropped `Logs`
/// stops its thread).
const WATCH_SLICE: Duration = Duration::from_millis(200);
/// Ids re-attached per hold of the state lock after a restart, so spawns are not held up.
const REATTACH_BATCH: usize = 256;

/// Errors of the log service.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LogsError {
    /// The keeper could not be reached or started.
    #[error("log keeper at {}: {source}", socket.display())]
    Keeper {
        socket: PathBuf,
        #[source]
        source: KeeperError,
    },
    /// A request about one process failed.
    #[error("log keeper {what} of process {id}: {source}")]
    Request {
        what: &'static str,
        id: String,
        #[source]
        source: KeeperError,
    },
    /// The pipes of a process could not be made (the daemon's fd limit, say).
    #[error("pipes for the logs of process {id}: {source}")]
    Pipe {
        id: String,
        #[source]
        source: SysError,
    },
    /// As many processes' logs are held as the keeper takes.
    #[error("the log keeper holds the logs of {capacity} processes, all it can take")]
    Full { capacity: usize },
    /// The id is attached already.
    #[error("process {id} has its logs attached already")]
    Duplicate { id: String },
    /// The id cannot name a log file.
    #[error("{0:?} is not a process id")]
    BadId(String),
    /// A log file could not be removed.
    #[error("remove {}: {source}", path.display())]
    Remove {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Several steps of a removal failed; it went on after each.
    #[error("{} log removal step(s) failed: {}", .0.len(), join(.0))]
    Several(Vec<LogsError>),
}

fn join(errors: &[LogsError]) -> String {
    errors
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

/// How to run the log service.
#[derive(Debug, Clone)]
pub struct LogsConfig {
    /// The binary to start as the keeper (`--log-keeper ...`); the daemon's own
    /// (`/proc/self/exe`) in production.
    pub program: PathBuf,
    /// The keeper's socket, log dir, limit, idle timeout.
    pub keeper: KeeperConfig,
    /// How often the watcher asks the keeper whether it still answers.
    pub health_interval: Duration,
    /// How long the keeper may take to answer before it counts as wedged and is replaced
    /// (killed: it is blocked somewhere, a stalled disk say, and would only lose more time).
    pub health_timeout: Duration,
}

impl LogsConfig {
    /// The daemon's configuration: this binary as the keeper, `<runtime-dir>/logkeeper.sock`,
    /// a health check every 5 s answered within 10 s.
    pub fn new(runtime_dir: &Path, log_dir: PathBuf, max_bytes: u64) -> LogsConfig {
        LogsConfig {
            program: PathBuf::from("/proc/self/exe"),
            keeper: KeeperConfig::new(runtime_dir.join(KEEPER_SOCKET), log_dir, max_bytes),
            health_interval: Duration::from_secs(5),
            health_timeout: Duration::from_secs(10),
        }
    }
}

/// The daemon's copy of one process's read ends.
#[derive(Debug)]
struct Held {
    stdout: Option<OwnedFd>,
    stderr: Option<OwnedFd>,
    /// The keeper generation this id was last attached to (0: none yet).
    sent: u64,
}

#[derive(Debug, Default)]
struct State {
    client: Option<Arc<Client>>,
    /// Bumped for every keeper connection.
    generation: u64,
    /// The keeper this daemon started, to reap it when it exits.
    child: Option<PidFd>,
    mirror: HashMap<String, Held>,
    /// Most ids the keeper takes.
    capacity: usize,
    /// A send to the keeper timed out: it is wedged; replace it.
    wedged: bool,
}

#[derive(Debug)]
struct Inner {
    config: LogsConfig,
    state: Mutex<State>,
    /// Held while a keeper is being replaced.
    restarting: Mutex<()>,
    stop: AtomicBool,
    restarts: AtomicU64,
}

/// The daemon's side of the log keeper (see the module docs). Cheap to share behind an `Arc`;
/// every method may be called from any thread. Dropping it stops its watcher thread and leaves
/// the keeper running for the next daemon.
#[derive(Debug)]
pub struct Logs {
    inner: Arc<Inner>,
    watcher: Mutex<Option<JoinHandle<()>>>,
}

impl Logs {
    /// Connects to the keeper of `<runtime_dir>/logkeeper.sock` or starts one (this binary
    /// with `--log-keeper`), takes back the ids it holds, and starts the watcher.
    pub fn start(runtime_dir: &Path, log_dir: PathBuf, max_bytes: u64) -> Result<Logs, LogsError> {
        Logs::start_with(LogsConfig::new(runtime_dir, log_dir, max_bytes))
    }

    /// As [`Logs::start`], with the keeper binary and its settings given.
    pub fn start_with(config: LogsConfig) -> Result<Logs, LogsError> {
        let deadline = Instant::now() + KEEPER_START;
        let keeper_error = |source| LogsError::Keeper {
            socket: config.keeper.socket.clone(),
            source,
        };
        let (client, child) = logkeep::connect_or_launch(&config.program, &config.keeper, deadline)
            .map_err(keeper_error)?;
        let listed = client.list(deadline).map_err(keeper_error)?;
        let hello = client.hello().clone();
        let (client, child, reattach) = if hello.version != u16::from(logkeep::wire::VERSION)
            || hello.max_bytes != config.keeper.max_bytes
            || hello.log_dir != config.keeper.log_dir
        {
            // A keeper of another build, limit or log dir: take its ids, stop it, start ours.
            // (Files it wrote elsewhere stay there.)
            tracing::info!(
                pid = hello.pid,
                version = hello.version,
                max_bytes = hello.max_bytes,
                log_dir = %hello.log_dir.display(),
                ids = listed.len(),
                "replacing the running log keeper"
            );
            client.shutdown(deadline).map_err(keeper_error)?;
            client.wait_closed(deadline);
            if let Some(old) = child {
                reap(&old, Duration::from_secs(1));
            }
            let (client, child) =
                logkeep::connect_or_launch(&config.program, &config.keeper, deadline)
                    .map_err(keeper_error)?;
            (client, child, true)
        } else {
            (client, child, false)
        };
        let capacity = client.hello().capacity as usize;
        let mut mirror = HashMap::with_capacity(listed.len());
        for l in listed {
            if reattach {
                let stdout = l.stdout.as_ref().map(AsFd::as_fd);
                let stderr = l.stderr.as_ref().map(AsFd::as_fd);
                client.attach(&l.id, stdout, stderr).map_err(keeper_error)?;
            }
            mirror.insert(
                l.id,
                Held {
                    stdout: l.stdout,
                    stderr: l.stderr,
                    sent: 1,
                },
            );
        }
        tracing::info!(
            pid = client.hello().pid,
            ids = mirror.len(),
            socket = %config.keeper.socket.display(),
            "log keeper connected"
        );
        let inner = Arc::new(Inner {
            config,
            state: Mutex::new(State {
                client: Some(Arc::new(client)),
                generation: 1,
                child,
                mirror,
                capacity,
                wedged: false,
            }),
            restarting: Mutex::new(()),
            stop: AtomicBool::new(false),
            restarts: AtomicU64::new(0),
        });
        let watched = Arc::clone(&inner);
        let watcher = std::thread::Builder::new()
            .name("log-keeper-watch".into())
            .spawn(move || watched.watch())
            .map_err(|e| LogsError::Keeper {
                socket: inner.config.keeper.socket.clone(),
                source: KeeperError::Sys(SysError::Unsupported {
                    what: "log keeper watcher thread",
                    reason: e.to_string(),
                }),
            })?;
        Ok(Logs {
            inner,
            watcher: Mutex::new(Some(watcher)),
        })
    }

    /// The spawn path: two pipes for process `id`, the read ends handed to the keeper (one
    /// `sendmsg`, no reply awaited) and kept in the mirror; returns the write ends (stdout,
    /// stderr) for the child's fds 1 and 2. Without a keeper at this moment (it is being
    /// replaced) the id waits in the mirror and is attached when the new one is up.
    pub fn attach(&self, id: &str) -> Result<(OwnedFd, OwnedFd), LogsError> {
        let ends = self.attach_unsent(id)?;
        self.send(id);
        Ok(ends)
    }

    /// [`Logs::attach`] but for the hand-over to the keeper, which [`Logs::send`] does: the
    /// spawn path sends while its child sets itself up. Until then the read ends are only in
    /// the mirror (a keeper that starts meanwhile gets them from there), and a child that
    /// writes more than a pipe holds waits.
    pub fn attach_unsent(&self, id: &str) -> Result<(OwnedFd, OwnedFd), LogsError> {
        if !logkeep::wire::valid_id(id) {
            return Err(LogsError::BadId(id.to_owned()));
        }
        let pipe_error = |source| LogsError::Pipe {
            id: id.to_owned(),
            source,
        };
        let (out_r, out_w) = logkeep::pipe().map_err(pipe_error)?;
        let (err_r, err_w) = logkeep::pipe().map_err(pipe_error)?;
        let mut state = self.inner.lock();
        if state.mirror.contains_key(id) {
            return Err(LogsError::Duplicate { id: id.to_owned() });
        }
        if state.mirror.len() >= state.capacity {
            return Err(LogsError::Full {
                capacity: state.capacity,
            });
        }
        state.mirror.insert(
            id.to_owned(),
            Held {
                stdout: Some(out_r),
                stderr: Some(err_r),
                sent: 0,
            },
        );
        Ok((out_w, err_w))
    }

    /// Hands `id`'s read ends to the keeper in use unless it has them already. Sent under the
    /// lock: a replacement keeper either finds the id marked sent to it or gets it here. The
    /// send blocks only if the keeper is wedged (then for at most its send timeout, once: the
    /// keeper is marked and replaced, and the replacement gets the id from the mirror).
    pub fn send(&self, id: &str) {
        let mut state = self.inner.lock();
        let generation = state.generation;
        let Some(client) = state.client.clone().filter(|_| !state.wedged) else {
            return;
        };
        let Some(held) = state.mirror.get_mut(id).filter(|h| h.sent != generation) else {
            return;
        };
        match client.attach(
            id,
            held.stdout.as_ref().map(AsFd::as_fd),
            held.stderr.as_ref().map(AsFd::as_fd),
        ) {
            Ok(()) => held.sent = generation,
            Err(error) => {
                tracing::warn!(%id, %error, "cannot hand a process's logs to the keeper; it will be replaced");
                state.wedged = true;
            }
        }
    }

    /// Has the keeper write out what `id`'s pipes hold now, so that what the process wrote
    /// before this call is in its files. Blocks the calling thread (call it from the blocking
    /// pool) until the keeper answers or `deadline`; replaces a keeper found dead on the way.
    /// `attached: false` in the answer means the keeper had already written everything and
    /// let the id go (its writers all closed).
    pub fn sync(&self, id: &str, deadline: Instant) -> Result<IdStats, LogsError> {
        if !logkeep::wire::valid_id(id) {
            return Err(LogsError::BadId(id.to_owned()));
        }
        let request_error = |source| LogsError::Request {
            what: "SYNC",
            id: id.to_owned(),
            source,
        };
        let mut last = None;
        for _ in 0..2 {
            let client = {
                let mut state = self.inner.lock();
                let generation = state.generation;
                match state.client.clone().filter(|_| !state.wedged) {
                    Some(client) => {
                        // Mid-restart, this id may not have been re-attached yet: do it now
                        // (attaching the same pipes twice is harmless).
                        if let Some(held) = state.mirror.get_mut(id)
                            && held.sent != generation
                            && client
                                .attach(
                                    id,
                                    held.stdout.as_ref().map(AsFd::as_fd),
                                    held.stderr.as_ref().map(AsFd::as_fd),
                                )
                                .is_ok()
                        {
                            held.sent = generation;
                        }
                        Some(client)
                    }
                    None => None,
                }
            };
            let Some(client) = client else {
                self.inner.restart("no keeper connected", deadline);
                continue;
            };
            match client.sync(id, deadline) {
                Ok(stats) => return Ok(stats),
                Err(error) if error.is_connection_lost() => {
                    self.inner.restart("the keeper connection closed", deadline);
                    last = Some(error);
                }
                Err(error) => return Err(request_error(error)),
            }
        }
        Err(request_error(last.unwrap_or(KeeperError::Closed)))
    }

    /// Drops the daemon's copy of `id`'s read ends (its process was reaped, or its lease
    /// released). The keeper goes on copying while writers remain; if it dies after this, they
    /// are not re-attached (a writer that outlived its process then gets `EPIPE`).
    pub fn forget(&self, id: &str) {
        self.inner.lock().mirror.remove(id);
    }

    /// Forgets `id` and has the keeper stop copying it at once (closing its pipes and files);
    /// whether the keeper held it.
    pub fn detach(&self, id: &str, deadline: Instant) -> Result<bool, LogsError> {
        self.forget(id);
        let Some(client) = self.inner.lock().client.clone() else {
            return Ok(false);
        };
        client
            .detach(id, deadline)
            .map_err(|source| LogsError::Request {
                what: "DETACH",
                id: id.to_owned(),
                source,
            })
    }

    /// Detaches each id and removes its two files (a released lease's processes). Goes on after
    /// every failure and reports them all; returns how many files went.
    pub fn remove_files(&self, ids: &[String], deadline: Instant) -> Result<usize, LogsError> {
        let mut errors = Vec::new();
        let mut removed = 0;
        for id in ids {
            if !logkeep::wire::valid_id(id) {
                errors.push(LogsError::BadId(id.clone()));
                continue;
            }
            // Detached first, so the keeper cannot write (or create) a file removed below.
            if let Err(e) = self.detach(id, deadline) {
                errors.push(e);
            }
            for stream in STREAMS {
                let path = self.path(id, stream);
                match std::fs::remove_file(&path) {
                    Ok(()) => removed += 1,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(source) => errors.push(LogsError::Remove { path, source }),
                }
            }
        }
        match errors.len() {
            0 => Ok(removed),
            1 => Err(errors.remove(0)),
            _ => Err(LogsError::Several(errors)),
        }
    }

    /// Removes log files whose process id is neither in `known` (recorded processes) nor held
    /// by the keeper: files left by a crash between making a process's logs and recording it,
    /// and pairs an older daemon made ahead. Returns how many files went.
    pub fn remove_orphans(&self, known: &HashSet<String>) -> std::io::Result<usize> {
        let held: HashSet<String> = self.inner.lock().mirror.keys().cloned().collect();
        remove_orphans_in(&self.inner.config.keeper.log_dir, |id| {
            known.contains(id) || held.contains(id)
        })
    }

    /// Where the log of process `id` is written (`stream`: "stdout" or "stderr").
    pub fn path(&self, id: &str, stream: &str) -> PathBuf {
        log_path(&self.inner.config.keeper.log_dir, id, stream)
    }

    /// A fresh process id (16 random hex digits).
    pub fn new_id() -> String {
        new_id()
    }

    /// Ids in the mirror.
    pub fn attached(&self) -> usize {
        self.inner.lock().mirror.len()
    }

    /// Whether `id` is in the mirror.
    pub fn holds(&self, id: &str) -> bool {
        self.inner.lock().mirror.contains_key(id)
    }

    /// The pid of the keeper in use, if one is connected.
    pub fn keeper_pid(&self) -> Option<i32> {
        self.inner.lock().client.as_ref().map(|c| c.keeper_pid())
    }

    /// How many times a keeper was replaced since the start.
    pub fn restarts(&self) -> u64 {
        self.inner.restarts.load(Ordering::Relaxed)
    }

    /// Stops the keeper (it writes out what its pipes hold first). For tests and for tools
    /// that must not leave it running; the daemon leaves it for the next start.
    pub fn shutdown_keeper(&self, deadline: Instant) -> Result<(), LogsError> {
        // The watcher first, so that it does not start a keeper again behind this.
        self.stop_watcher();
        let (client, child) = {
            let mut state = self.inner.lock();
            (state.client.take(), state.child.take())
        };
        if let Some(client) = client {
            client
                .shutdown(deadline)
                .map_err(|source| LogsError::Keeper {
                    socket: self.inner.config.keeper.socket.clone(),
                    source,
                })?;
            client.wait_closed(deadline);
        }
        if let Some(child) = child {
            reap(&child, deadline.saturating_duration_since(Instant::now()));
        }
        Ok(())
    }
}

impl Logs {
    fn stop_watcher(&self) {
        self.inner.stop.store(true, Ordering::Release);
        let watcher = self
            .watcher
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(watcher) = watcher {
            let _ = watcher.join();
        }
    }
}

impl Drop for Logs {
    fn drop(&mut self) {
        self.stop_watcher();
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The watcher thread: reads what the keeper sends unasked (refused attaches), notices a
    /// keeper that died or is wedged, and replaces it; reaps the keeper this daemon started.
    fn watch(self: Arc<Self>) {
        let mut pause = Duration::from_millis(100);
        let mut last_check = Instant::now();
        while !self.stop.load(Ordering::Acquire) {
            let (client, wedged) = {
                let state = self.lock();
                (state.client.clone(), state.wedged)
            };
            let healthy = match &client {
                Some(client) if !wedged => {
                    let answered = if last_check.elapsed() >= self.config.health_interval {
                        last_check = Instant::now();
                        match client.ping(Instant::now() + self.config.health_timeout) {
                            Ok(_) => Ok(()),
                            Err(KeeperError::Timeout { .. }) => {
                                tracing::error!(
                                    timeout_ms = self.config.health_timeout.as_millis() as u64,
                                    "the log keeper does not answer"
                                );
                                self.lock().wedged = true;
                                Err(())
                            }
                            Err(_) => Err(()),
                        }
                    } else {
                        client.pump(WATCH_SLICE).map_err(drop)
                    };
                    if answered.is_ok() {
                        self.refused(client);
                    }
                    answered.is_ok()
                }
                _ => false,
            };
            if healthy {
                pause = Duration::from_millis(100);
                continue;
            }
            if self.stop.load(Ordering::Acquire) {
                break;
            }
            if !self.restart(
                "the keeper is gone or wedged",
                Instant::now() + KEEPER_START,
            ) {
                // Try again soon, but not in a tight loop.
                std::thread::sleep(pause);
                pause = (pause * 2).min(Duration::from_secs(5));
            }
        }
    }

    /// Drops the mirror entries of refused attaches: their writers then get `EPIPE` rather
    /// than block forever on a pipe nobody reads.
    fn refused(&self, client: &Client) {
        for refusal in client.take_refusals() {
            tracing::error!(
                id = %refusal.id,
                code = %refusal.code,
                message = %refusal.message,
                "the log keeper refused a process's logs"
            );
            self.lock().mirror.remove(&refusal.id);
        }
    }

    /// Replaces the keeper unless someone else just did: kills a wedged one, reaps the one this
    /// daemon started, connects to (or starts) a keeper and attaches the whole mirror to it.
    /// False when no keeper could be had by `deadline`.
    fn restart(&self, why: &str, deadline: Instant) -> bool {
        let guard = loop {
            match self.restarting.try_lock() {
                Ok(guard) => break guard,
                Err(std::sync::TryLockError::Poisoned(e)) => break e.into_inner(),
                Err(std::sync::TryLockError::WouldBlock) => {
                    if Instant::now() >= deadline {
                        return false;
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
            }
        };
        let (old, child) = {
            let mut state = self.lock();
            let fine = state
                .client
                .as_ref()
                .is_some_and(|c| !c.is_closed() && !state.wedged);
            if fine {
                // Replaced meanwhile by another caller.
                return true;
            }
            state.wedged = false;
            (state.client.take(), state.child.take())
        };
        if let Some(old) = old
            && !old.is_closed()
        {
            // Connected but not answering: kill it so it writes nothing more.
            match old.keeper_pidfd() {
                Ok(pidfd) => {
                    let _ = pidfd.send_signal(libc_sigkill());
                    tracing::warn!(pid = pidfd.pid(), "killed a wedged log keeper");
                }
                Err(error) => tracing::warn!(%error, "cannot reach the wedged log keeper"),
            }
        }
        if let Some(child) = child {
            reap(&child, Duration::from_millis(500));
        }
        let config = &self.config;
        let (client, child) =
            match logkeep::connect_or_launch(&config.program, &config.keeper, deadline) {
                Ok(got) => got,
                Err(error) => {
                    tracing::error!(%error, "cannot start a new log keeper");
                    return false;
                }
            };
        let client = Arc::new(client);
        let (generation, ids) = {
            let mut state = self.lock();
            state.generation += 1;
            state.client = Some(Arc::clone(&client));
            state.child = child;
            state.capacity = client.hello().capacity as usize;
            let ids: Vec<String> = state.mirror.keys().cloned().collect();
            (state.generation, ids)
        };
        let mut reattached = 0usize;
        for batch in ids.chunks(REATTACH_BATCH) {
            let mut state = self.lock();
            for id in batch {
                let Some(held) = state.mirror.get_mut(id) else {
                    continue;
                };
                if held.sent == generation {
                    continue;
                }
                let stdout = held.stdout.as_ref().map(AsFd::as_fd);
                let stderr = held.stderr.as_ref().map(AsFd::as_fd);
                match client.attach(id, stdout, stderr) {
                    Ok(()) => {
                        held.sent = generation;
                        reattached += 1;
                    }
                    Err(error) => {
                        // The watcher sees the new connection fail and starts over.
                        tracing::warn!(%id, %error, "cannot re-attach to the new log keeper");
                        state.wedged = true;
                        break;
                    }
                }
            }
        }
        self.restarts.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(
            why,
            pid = client.hello().pid,
            reattached,
            "log keeper replaced"
        );
        drop(guard);
        true
    }
}

/// Waits up to `timeout` for a keeper this daemon started to exit, and reaps it.
fn reap(child: &PidFd, timeout: Duration) {
    match child.wait_timeout(timeout) {
        Ok(Some(status)) => tracing::info!(pid = child.pid(), ?status, "log keeper exited"),
        Ok(None) => {}
        Err(error) => tracing::debug!(pid = child.pid(), %error, "cannot reap the log keeper"),
    }
}

fn libc_sigkill() -> i32 {
    nix::sys::signal::Signal::SIGKILL as i32
}

/// Removes the log files in `dir` whose id `keep` does not want; returns how many went.
fn remove_orphans_in(dir: &Path, keep: impl Fn(&str) -> bool) -> std::io::Result<usize> {
    let mut removed = 0;
    for entry in std::fs::read_dir(dir)?.flatten() {
        let name = entry.file_name();
        let Some(id) = name.to_str().and_then(|n| {
            STREAMS
                .iter()
                .find_map(|s| n.strip_suffix(&format!(".{s}")))
        }) else {
            continue;
        };
        if is_id(id) && !keep(id) {
            match std::fs::remove_file(entry.path()) {
                Ok(()) => removed += 1,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
    }
    Ok(removed)
}

/// The two streams of one process.
pub const STREAMS: [&str; 2] = ["stdout", "stderr"];

/// Removes log files in `dir` whose process id is not in `known`, when no keeper holds any (a
/// start that found none running): files left by a crash between making a process's logs and
/// recording it. Returns how many files went.
pub fn remove_orphan_files(dir: &Path, known: &HashSet<String>) -> std::io::Result<usize> {
    remove_orphans_in(dir, |id| known.contains(id))
}

/// Where the log of process `id` is written in `dir` (`stream`: "stdout" or "stderr").
pub fn log_path(dir: &Path, id: &str, stream: &str) -> PathBuf {
    dir.join(format!("{id}.{stream}"))
}

/// Whether `s` has the shape of a process id (see [`new_id`]).
fn is_id(s: &str) -> bool {
    s.len() == 16 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// A process id: 16 random hex digits.
fn new_id() -> String {
    let mut bytes = [0u8; 8];
    // One getrandom(2) (urandom's pool, never blocking after boot) rather than open, read and
    // close of /dev/urandom on every spawn.
    let filled = getrandom::fill(&mut bytes).is_ok();
    if !filled {
        // Time and a counter still make ids unique within this daemon.
        static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        bytes = (u64::try_from(crate::lease::now_ms()).unwrap_or(0) ^ (n << 48)).to_be_bytes();
    }
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn orphans_are_files_of_ids_nobody_wants() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = ("0123456789abcdef", "fedcba9876543210");
        for name in [
            format!("{a}.stdout"),
            format!("{a}.stderr"),
            format!("{b}.stdout"),
            "logkeeper.sock.lock".into(),
            "short.stdout".into(),
        ] {
            std::fs::write(dir.path().join(name), "").unwrap();
        }
        assert_eq!(remove_orphans_in(dir.path(), |id| id == a).unwrap(), 1);
        assert_eq!(
            names(dir.path()),
            [
                format!("{a}.stderr"),
                format!("{a}.stdout"),
                "logkeeper.sock.lock".into(),
                "short.stdout".to_string()
            ]
        );
    }

    #[test]
    fn the_daemon_runs_the_keeper_from_its_own_binary_on_its_runtime_socket() {
        let config = LogsConfig::new(Path::new("/run/subidd"), "/var/lib/subidd/logs".into(), 7);
        assert_eq!(config.program, Path::new("/proc/self/exe"));
        assert_eq!(
            config.keeper.socket,
            Path::new("/run/subidd/logkeeper.sock")
        );
        assert_eq!(config.keeper.max_bytes, 7);
        let args: Vec<String> = config
            .keeper
            .to_args()
            .into_iter()
            .map(|a| a.into_string().unwrap())
            .collect();
        assert_eq!(args[0], "--log-keeper");
        assert!(is_id(&Logs::new_id()));
    }
}
