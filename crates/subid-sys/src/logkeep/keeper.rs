//! The keeper process: its start (`launch`, `keeper_main`) and its one event loop (`run`).

use std::collections::{HashMap, VecDeque};
use std::ffi::OsString;
use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use nix::fcntl::{Flock, FlockArg, OFlag};
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use nix::sys::resource::{Resource, getrlimit, setrlimit};
use nix::sys::signal::{SigHandler, Signal, signal};
use nix::sys::socket::{AddressFamily, Backlog, SockFlag, SockType, UnixAddr, bind, socket};
use nix::sys::stat::{Mode, SFlag, umask};

use super::sink::{Bound, Sink};
use super::sock::{peer, readable, recv_msg, send_msg, set_nonblocking};
use super::wire::{
    self, ErrorCode, Hello, IdStats, LIST_BATCH, MAX_MESSAGE, Reply, Request, StreamStats,
};
use super::{CHUNK, KeeperConfig, KeeperError, Stream, StreamSet, slack};
use crate::error::{Errno, SysError};
use crate::pidfd::PidFd;

/// Exit status: stopped on `SHUTDOWN` or after the idle timeout.
pub const EXIT_OK: u8 = 0;
/// Exit status: a failure (logged on stderr).
pub const EXIT_FAILED: u8 = 1;
/// Exit status: bad arguments.
pub const EXIT_USAGE: u8 = 2;
/// Exit status: another keeper holds the socket's lock.
pub const EXIT_OTHER_KEEPER: u8 = 3;

/// Most clients connected at once (a daemon, a daemon that is restarting, a test).
const MAX_CONNS: usize = 16;
/// Events taken from one `epoll_wait`.
const EVENTS: usize = 256;
/// Messages read from one client per turn, so that a chatty client does not hold up pipes.
const MESSAGES_PER_TURN: usize = 64;
/// Replies queued for a client that does not read them; past this it is disconnected.
const MAX_OUTBOX: usize = 1024;
/// Fds kept free below the limit for everything that is not a pipe or a log file.
const RESERVED_FDS: u64 = 64;
/// How long a new keeper waits for an old one that is stopping to release the lock.
const LOCK_WAIT: Duration = Duration::from_secs(5);
/// The loop wakes at least this often (idle check, reopening files that failed).
const TICK: Duration = Duration::from_secs(1);
/// How long the reply to `SHUTDOWN` may wait for room in the client's socket.
const SHUTDOWN_REPLY_WAIT: Duration = Duration::from_secs(1);

/// The listening socket's epoll token; clients and pipes get tokens from 1 up, never reused.
const LISTENER: u64 = 0;

/// Why [`run`] returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeeperExit {
    /// No client and no id for the idle timeout.
    Idle,
    /// A client asked it to stop.
    Shutdown,
    /// Another keeper holds the lock (and so the socket).
    AnotherKeeper,
}

/// Writes one line to the keeper's stderr (the daemon's stderr, so its journal).
pub(crate) fn note(args: std::fmt::Arguments<'_>) {
    eprintln!("subidd log keeper[{}]: {args}", std::process::id());
}

/// The entry of a binary started as a keeper: `args` are the arguments after the program name
/// (starting with `--log-keeper`). Exit 0 when stopped or idle, 1 on failure, 2 on bad
/// arguments, 3 when another keeper holds the socket.
pub fn keeper_main(args: impl IntoIterator<Item = OsString>) -> ExitCode {
    let config = match KeeperConfig::from_args(args) {
        Ok(config) => config,
        Err(error) => {
            note(format_args!("{error}"));
            return ExitCode::from(EXIT_USAGE);
        }
    };
    match run(&config) {
        Ok(KeeperExit::AnotherKeeper) => {
            note(format_args!(
                "another keeper holds {}; exiting",
                config.lock_path().display()
            ));
            ExitCode::from(EXIT_OTHER_KEEPER)
        }
        Ok(_) => ExitCode::from(EXIT_OK),
        Err(error) => {
            note(format_args!("{error}"));
            ExitCode::from(EXIT_FAILED)
        }
    }
}

/// Starts `program` (a binary whose first argument `--log-keeper` runs [`keeper_main`]) as a
/// keeper for `config`: empty environment, cwd `/`, stdin and stdout `/dev/null`, stderr
/// inherited (its log lines), its own session, and no other fd of the caller (every fd from 3
/// up is made close-on-exec in the child before `execve`). It is the caller's child until the
/// caller exits; then init (or a subreaper such as systemd) adopts it. Returns its pidfd, to
/// reap it or to see it exit before it listens.
pub fn launch(program: &Path, config: &KeeperConfig) -> Result<PidFd, KeeperError> {
    // The child changes to `/` before exec: a relative program must not be looked up there.
    // (Only relative paths are made absolute: `/proc/self/exe` must stay as it is, since the
    // binary it names may have been replaced on disk since the daemon started.)
    let program = if program.is_relative() {
        std::env::current_dir()
            .map_err(|e| SysError::io_path("getcwd", program, &e))?
            .join(program)
    } else {
        program.to_owned()
    };
    let mut command = std::process::Command::new(&program);
    command
        .args(config.to_args())
        .env_clear()
        .current_dir("/")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::inherit());
    // SAFETY: the closure runs in the child between fork and exec and makes only two raw
    // system calls (setsid, close_range); it allocates nothing and takes no lock.
    unsafe {
        command.pre_exec(|| {
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            let r = libc::syscall(
                libc::SYS_close_range,
                3u32,
                u32::MAX,
                libc::CLOSE_RANGE_CLOEXEC,
            );
            if r < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = command
        .spawn()
        .map_err(|e| SysError::io_path("spawn the log keeper", &program, &e))?;
    let pid = i32::try_from(child.id()).map_err(|_| SysError::syscall("fork", Errno::EOVERFLOW))?;
    // The child is not reaped (std::process::Child does not wait on drop), so the pid is it.
    Ok(PidFd::open(pid)?)
}

/// Runs the keeper for `config` until a `SHUTDOWN`, or until it has been idle (no client, no
/// id) for `config.idle_timeout`.
pub fn run(config: &KeeperConfig) -> Result<KeeperExit, KeeperError> {
    // SAFETY: SIG_IGN installs no handler code, so no async-signal-safety question arises.
    // A daemon's restart sends SIGHUP to nothing here (own session), but an operator's
    // terminal or a `kill -INT` must not end every process's logging; SIGPIPE: a client that
    // went away is an EPIPE to handle, not death.
    unsafe {
        for sig in [Signal::SIGPIPE, Signal::SIGHUP, Signal::SIGINT] {
            signal(sig, SigHandler::SigIgn).map_err(|e| SysError::syscall("sigaction", e))?;
        }
    }
    let fd_limit = raise_nofile();
    std::fs::create_dir_all(&config.log_dir)
        .map_err(|e| SysError::io_path("mkdir", &config.log_dir, &e))?;
    let dir = nix::fcntl::open(
        &config.log_dir,
        OFlag::O_DIRECTORY | OFlag::O_RDONLY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| SysError::path("open", &config.log_dir, e))?;
    let Some(lock) = take_lock(config)? else {
        return Ok(KeeperExit::AnotherKeeper);
    };
    let (listener, socket_id) = listen(&config.socket)?;
    // Files 0640 (and nothing else is created from here on).
    umask(Mode::from_bits_truncate(0o027));
    let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)
        .map_err(|e| SysError::syscall("epoll_create1", e))?;
    epoll
        .add(&listener, EpollEvent::new(EpollFlags::EPOLLIN, LISTENER))
        .map_err(|e| SysError::syscall("epoll_ctl", e))?;
    let fd_budget = fd_limit.saturating_sub(RESERVED_FDS);
    // Per id: two pipes and two files.
    let by_fds = fd_budget.saturating_sub(MAX_CONNS as u64) / 4;
    let capacity = config
        .max_ids
        .map_or(by_fds, |m| by_fds.min(u64::from(m)))
        .min(u64::from(u32::MAX)) as usize;
    let bound = Bound {
        max: config.max_bytes,
        slack: slack(config.max_bytes),
    };
    note(format_args!(
        "listening on {} for {}: {} bytes per stream (+{} slack), up to {capacity} ids",
        config.socket.display(),
        config.log_dir.display(),
        bound.max,
        bound.slack,
    ));
    let mut keeper = Keeper {
        config,
        bound,
        epoll,
        listener: Some(listener),
        socket_id,
        dir,
        lock: Some(lock),
        conns: HashMap::new(),
        streams: HashMap::new(),
        ids: HashMap::new(),
        next_token: LISTENER + 1,
        buf: vec![0u8; CHUNK].into_boxed_slice(),
        scratch: vec![0u8; CHUNK].into_boxed_slice(),
        capacity,
        fd_budget,
        shutdown: None,
        refused_peers: 0,
    };
    keeper.serve()
}

/// Raises the soft RLIMIT_NOFILE to the hard one; returns the limit in force.
fn raise_nofile() -> u64 {
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) => {
            if soft < hard && setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_ok() {
                hard
            } else {
                soft
            }
        }
        Err(_) => 1024,
    }
}

/// Takes `<socket>.lock` (flock, exclusive), waiting up to [`LOCK_WAIT`] for a keeper that is
/// stopping. None when another keeper keeps it.
fn take_lock(config: &KeeperConfig) -> Result<Option<Flock<File>>, KeeperError> {
    let path = config.lock_path();
    let deadline = Instant::now() + LOCK_WAIT;
    loop {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .mode(0o600)
            .open(&path)
            .map_err(|e| SysError::io_path("open", &path, &e))?;
        match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(lock) => return Ok(Some(lock)),
            Err((_, Errno::EWOULDBLOCK)) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err((_, Errno::EWOULDBLOCK)) => return Ok(None),
            Err((_, e)) => return Err(SysError::path("flock", &path, e).into()),
        }
    }
}

/// Binds and listens on `path` (replacing a stale socket file: the lock says no keeper uses
/// it), mode 0600. Returns the socket and the (dev, ino) of its file, so that only this
/// keeper's file is removed at exit.
fn listen(path: &Path) -> Result<(OwnedFd, (u64, u64)), KeeperError> {
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.mode() & SFlag::S_IFMT.bits() == SFlag::S_IFSOCK.bits() => {
            std::fs::remove_file(path).map_err(|e| SysError::io_path("unlink", path, &e))?;
        }
        Ok(_) => {
            // Never remove something that is not a socket: the path is misconfigured.
            return Err(SysError::path("bind", path, Errno::EEXIST).into());
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(SysError::io_path("stat", path, &e).into()),
    }
    let fd = socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        None,
    )
    .map_err(|e| SysError::syscall("socket", e))?;
    let addr = UnixAddr::new(path).map_err(|e| SysError::path("bind", path, e))?;
    // The socket file is created 0600 (bind(2) applies the umask); the keeper has one thread.
    let old = umask(Mode::from_bits_truncate(0o177));
    let bound = bind(fd.as_raw_fd(), &addr);
    umask(old);
    bound.map_err(|e| SysError::path("bind", path, e))?;
    nix::sys::socket::listen(&fd, Backlog::new(64).unwrap_or(Backlog::MAXCONN))
        .map_err(|e| SysError::path("listen", path, e))?;
    let meta = std::fs::symlink_metadata(path).map_err(|e| SysError::io_path("stat", path, &e))?;
    Ok((fd, (meta.dev(), meta.ino())))
}

/// A connected client.
struct Conn {
    fd: OwnedFd,
    /// Replies that found the socket full, oldest first.
    out: VecDeque<Vec<u8>>,
    /// A `LIST` being sent.
    listing: Option<Listing>,
    /// EPOLLOUT is on.
    want_out: bool,
}

/// Where a `LIST` answer stands: the ids as they were when it was asked, and how far.
struct Listing {
    seq: u32,
    ids: Vec<String>,
    next: usize,
    sent: u32,
}

/// One stream of one id: its pipe and its file.
struct Pump {
    id: String,
    stream: Stream,
    pipe: OwnedFd,
    /// (dev, ino) of the pipe, to recognise the same pipe attached again.
    pipe_id: (u64, u64),
    sink: Sink,
}

/// One attached id.
#[derive(Default)]
struct Entry {
    tokens: [Option<u64>; 2],
    stats: [StreamStats; 2],
}

/// What one read from a pipe did.
enum Flow {
    Data(usize),
    Empty,
    /// All writers closed (or the read failed): the stream is done.
    Eof,
}

struct Keeper<'a> {
    config: &'a KeeperConfig,
    bound: Bound,
    epoll: Epoll,
    listener: Option<OwnedFd>,
    socket_id: (u64, u64),
    dir: OwnedFd,
    lock: Option<Flock<File>>,
    conns: HashMap<u64, Conn>,
    streams: HashMap<u64, Pump>,
    ids: HashMap<String, Entry>,
    next_token: u64,
    /// The one buffer every pipe is read into.
    buf: Box<[u8]>,
    /// The buffer the copy fallback of a cut moves bytes through.
    scratch: Box<[u8]>,
    capacity: usize,
    fd_budget: u64,
    /// (client, seq) of a `SHUTDOWN` being served.
    shutdown: Option<(u64, u32)>,
    refused_peers: u64,
}

impl Keeper<'_> {
    fn serve(&mut self) -> Result<KeeperExit, KeeperError> {
        let mut events = vec![EpollEvent::empty(); EVENTS];
        let mut idle_since = Some(Instant::now());
        loop {
            let wait = match idle_since {
                Some(since) => self
                    .config
                    .idle_timeout
                    .saturating_sub(since.elapsed())
                    .min(TICK),
                None => TICK,
            };
            let timeout = EpollTimeout::try_from(wait).unwrap_or(EpollTimeout::NONE);
            let n = match self.epoll.wait(&mut events, timeout) {
                Ok(n) => n,
                Err(Errno::EINTR) => 0,
                Err(e) => return Err(SysError::syscall("epoll_wait", e).into()),
            };
            for event in &events[..n] {
                let token = event.data();
                if token == LISTENER {
                    self.accept();
                } else if self.conns.contains_key(&token) {
                    self.on_conn(token, event.events());
                } else if self.streams.contains_key(&token) {
                    // At most one chunk per ready pipe per turn: the others get theirs.
                    if let Flow::Eof = self.pump_once(token, CHUNK) {
                        self.close_stream(token);
                    }
                }
                if self.shutdown.is_some() {
                    break;
                }
            }
            if let Some((conn, seq)) = self.shutdown {
                self.finish(conn, seq);
                return Ok(KeeperExit::Shutdown);
            }
            if self.conns.is_empty() && self.ids.is_empty() {
                let since = *idle_since.get_or_insert_with(Instant::now);
                if since.elapsed() >= self.config.idle_timeout {
                    self.stop_listening();
                    note(format_args!(
                        "no client and nothing attached for {} ms: exiting",
                        self.config.idle_timeout.as_millis()
                    ));
                    return Ok(KeeperExit::Idle);
                }
            } else {
                idle_since = None;
            }
        }
    }

    fn token(&mut self) -> u64 {
        let t = self.next_token;
        self.next_token += 1;
        t
    }

    /// Fds the keeper may be using now, counted pessimistically (every stream with its file).
    fn fds_in_use(&self) -> u64 {
        8 + self.conns.len() as u64 + 2 * self.streams.len() as u64
    }

    fn accept(&mut self) {
        for _ in 0..MAX_CONNS {
            let Some(listener) = &self.listener else {
                return;
            };
            let fd = match accept(listener.as_fd()) {
                Ok(fd) => fd,
                Err(Errno::EAGAIN | Errno::EINTR) => return,
                Err(e @ (Errno::EMFILE | Errno::ENFILE)) => {
                    // Leaving it queued would make epoll report it again at once.
                    note(format_args!("accept: {e}"));
                    return;
                }
                Err(_) => continue,
            };
            match peer(fd.as_fd()) {
                Ok((_, 0)) => {}
                Ok((pid, uid)) => {
                    self.refused_peers += 1;
                    if self.refused_peers == 1 || self.refused_peers.is_multiple_of(1000) {
                        note(format_args!(
                            "refused a client that is not root (pid {pid}, uid {uid}; {} so far)",
                            self.refused_peers
                        ));
                    }
                    continue;
                }
                Err(_) => continue,
            }
            if self.conns.len() >= MAX_CONNS {
                note(format_args!("refused a client: {MAX_CONNS} are connected"));
                continue;
            }
            let token = self.token();
            let flags = EpollFlags::EPOLLIN | EpollFlags::EPOLLRDHUP;
            if self.epoll.add(&fd, EpollEvent::new(flags, token)).is_err() {
                continue;
            }
            self.conns.insert(
                token,
                Conn {
                    fd,
                    out: VecDeque::new(),
                    listing: None,
                    want_out: false,
                },
            );
        }
    }

    fn on_conn(&mut self, token: u64, events: EpollFlags) {
        if events.contains(EpollFlags::EPOLLOUT) {
            self.flush(token);
        }
        let mut msg = [0u8; MAX_MESSAGE];
        for _ in 0..MESSAGES_PER_TURN {
            let Some(conn) = self.conns.get(&token) else {
                return;
            };
            let mut fds = Vec::new();
            match recv_msg(conn.fd.as_fd(), &mut msg, &mut fds) {
                Ok(got) if got.len == 0 && fds.is_empty() => {
                    self.close_conn(token);
                    return;
                }
                Ok(got) if got.truncated => {
                    let seq = if got.len >= wire::HEADER {
                        u32::from_le_bytes([msg[4], msg[5], msg[6], msg[7]])
                    } else {
                        0
                    };
                    self.error(token, seq, ErrorCode::BadMessage, "", "message too long");
                }
                Ok(got) => self.handle(token, &msg[..got.len], fds, got.fds_lost),
                Err(Errno::EAGAIN | Errno::EINTR) => return,
                Err(_) => {
                    self.close_conn(token);
                    return;
                }
            }
            if self.shutdown.is_some() {
                return;
            }
        }
    }

    fn handle(&mut self, token: u64, msg: &[u8], fds: Vec<OwnedFd>, fds_lost: bool) {
        let (seq, request) = match wire::decode_request(msg) {
            Ok(r) => r,
            Err(e) => {
                let seq = e.seq.unwrap_or(0);
                return self.error(token, seq, e.code, "", &e.reason);
            }
        };
        if !matches!(request, Request::Attach { .. }) && (!fds.is_empty() || fds_lost) {
            return self.error(
                token,
                seq,
                ErrorCode::BadFds,
                "",
                "fds with a request that takes none",
            );
        }
        match request {
            Request::Hello => {
                let hello = Hello {
                    version: u16::from(wire::VERSION),
                    pid: std::process::id(),
                    max_bytes: self.bound.max,
                    slack: self.bound.slack,
                    capacity: u32::try_from(self.capacity).unwrap_or(u32::MAX),
                    attached: u32::try_from(self.ids.len()).unwrap_or(u32::MAX),
                    log_dir: self.config.log_dir.clone(),
                };
                self.reply(token, seq, &Reply::HelloOk(hello));
            }
            Request::Attach { id, streams } => {
                if let Err((code, why)) = self.attach(&id, streams, fds, fds_lost) {
                    self.error(token, seq, code, &id, &why);
                }
            }
            Request::Sync { id } => {
                let stats = self.sync(&id);
                self.reply(token, seq, &Reply::SyncOk(stats));
            }
            Request::Detach { id } => {
                let attached = self.detach(&id);
                self.reply(token, seq, &Reply::DetachOk { attached });
            }
            Request::List => {
                if let Some(conn) = self.conns.get_mut(&token) {
                    if conn.listing.is_some() {
                        return self.error(
                            token,
                            seq,
                            ErrorCode::BadMessage,
                            "",
                            "a LIST is already being answered",
                        );
                    }
                    conn.listing = Some(Listing {
                        seq,
                        ids: self.ids.keys().cloned().collect(),
                        next: 0,
                        sent: 0,
                    });
                }
                self.flush(token);
            }
            Request::Shutdown => self.shutdown = Some((token, seq)),
        }
    }

    fn error(&mut self, token: u64, seq: u32, code: ErrorCode, id: &str, why: &str) {
        let reply = Reply::Error {
            code,
            id: id.to_owned(),
            message: why.to_owned(),
        };
        self.reply(token, seq, &reply);
    }

    /// Sends a reply now, or queues it behind earlier ones the client has not taken yet.
    fn reply(&mut self, token: u64, seq: u32, reply: &Reply) {
        let bytes = wire::encode_reply(seq, reply);
        let Some(conn) = self.conns.get_mut(&token) else {
            return;
        };
        if conn.out.is_empty() {
            match send_msg(conn.fd.as_fd(), &bytes, &[], true) {
                Ok(()) => return,
                Err(Errno::EAGAIN) => {}
                Err(_) => return self.close_conn(token),
            }
        }
        if conn.out.len() >= MAX_OUTBOX {
            note(format_args!("dropped a client that reads no replies"));
            return self.close_conn(token);
        }
        conn.out.push_back(bytes);
        self.want_out(token, true);
    }

    fn want_out(&mut self, token: u64, on: bool) {
        let Some(conn) = self.conns.get_mut(&token) else {
            return;
        };
        if conn.want_out == on {
            return;
        }
        conn.want_out = on;
        let mut flags = EpollFlags::EPOLLIN | EpollFlags::EPOLLRDHUP;
        if on {
            flags |= EpollFlags::EPOLLOUT;
        }
        let mut event = EpollEvent::new(flags, token);
        if self.epoll.modify(&conn.fd, &mut event).is_err() {
            self.close_conn(token);
        }
    }

    /// Sends what is queued for a client, then the next batches of its `LIST`, until its
    /// socket is full (then EPOLLOUT says when to go on).
    fn flush(&mut self, token: u64) {
        let Some(conn) = self.conns.get_mut(&token) else {
            return;
        };
        while let Some(bytes) = conn.out.front() {
            match send_msg(conn.fd.as_fd(), bytes, &[], true) {
                Ok(()) => drop(conn.out.pop_front()),
                Err(Errno::EAGAIN) => return self.want_out(token, true),
                Err(_) => return self.close_conn(token),
            }
        }
        let Some(mut listing) = conn.listing.take() else {
            return self.want_out(token, false);
        };
        loop {
            // The next batch: ids still attached, with the read ends still open.
            let mut entries = Vec::with_capacity(LIST_BATCH);
            let mut fds: Vec<BorrowedFd<'_>> = Vec::with_capacity(2 * LIST_BATCH);
            let mut next = listing.next;
            while entries.len() < LIST_BATCH && next < listing.ids.len() {
                let id = &listing.ids[next];
                next += 1;
                let Some(entry) = self.ids.get(id) else {
                    continue;
                };
                let open: Vec<(Stream, &Pump)> = Stream::ALL
                    .into_iter()
                    .filter_map(|s| {
                        let t = entry.tokens[s.index()]?;
                        Some((s, self.streams.get(&t)?))
                    })
                    .collect();
                let Some(set) = StreamSet::from_bits(open.iter().fold(0, |b, (s, _)| b | s.bit()))
                else {
                    continue;
                };
                fds.extend(open.iter().map(|(_, p)| p.pipe.as_fd()));
                entries.push((id.clone(), set));
            }
            let done = entries.is_empty();
            let count = entries.len() as u32;
            let reply = if done {
                Reply::ListEnd {
                    total: listing.sent,
                }
            } else {
                Reply::ListBatch(entries)
            };
            let bytes = wire::encode_reply(listing.seq, &reply);
            match send_msg(conn.fd.as_fd(), &bytes, &fds, true) {
                Ok(()) if done => return self.want_out(token, false),
                Ok(()) => {
                    listing.next = next;
                    listing.sent += count;
                }
                Err(Errno::EAGAIN) => {
                    conn.listing = Some(listing);
                    return self.want_out(token, true);
                }
                Err(_) => return self.close_conn(token),
            }
        }
    }

    fn close_conn(&mut self, token: u64) {
        if let Some(conn) = self.conns.remove(&token) {
            let _ = self.epoll.delete(&conn.fd);
        }
    }

    /// Starts copying the pipes of `id` (or, for an id attached already, takes the same pipes
    /// again as a no-op and adds a stream it did not have).
    fn attach(
        &mut self,
        id: &str,
        streams: StreamSet,
        fds: Vec<OwnedFd>,
        fds_lost: bool,
    ) -> Result<(), (ErrorCode, String)> {
        if fds_lost {
            return Err((
                ErrorCode::Full,
                "not every fd could be received (the keeper's fd limit)".into(),
            ));
        }
        if fds.len() != streams.len() {
            return Err((
                ErrorCode::BadFds,
                format!("{} fds for {} streams", fds.len(), streams.len()),
            ));
        }
        let mut new = Vec::with_capacity(2);
        for (stream, fd) in streams.iter().zip(fds) {
            let pipe_id = read_end_id(fd.as_fd())
                .map_err(|why| (ErrorCode::BadFds, format!("{}: {why}", stream.as_str())))?;
            new.push((stream, fd, pipe_id));
        }
        match self.ids.get(id) {
            Some(entry) => {
                let mut add = Vec::new();
                for (stream, fd, pipe_id) in new {
                    match entry.tokens[stream.index()].and_then(|t| self.streams.get(&t)) {
                        Some(p) if p.pipe_id == pipe_id => drop(fd),
                        Some(_) => {
                            return Err((
                                ErrorCode::Conflict,
                                format!("{} is attached with another pipe", stream.as_str()),
                            ));
                        }
                        None => add.push((stream, fd, pipe_id)),
                    }
                }
                new = add;
            }
            None if self.ids.len() >= self.capacity => {
                return Err((
                    ErrorCode::Full,
                    format!("{} ids attached, the keeper's capacity", self.ids.len()),
                ));
            }
            None => {}
        }
        if self.fds_in_use() + 2 * new.len() as u64 > self.fd_budget {
            return Err((
                ErrorCode::Full,
                format!("the keeper's fd limit ({})", self.fd_budget + RESERVED_FDS),
            ));
        }
        for (stream, pipe, pipe_id) in new {
            set_nonblocking(&pipe, true)
                .map_err(|e| (ErrorCode::BadFds, format!("fcntl(O_NONBLOCK): {e}")))?;
            let token = self.token();
            self.epoll
                .add(&pipe, EpollEvent::new(EpollFlags::EPOLLIN, token))
                .map_err(|e| (ErrorCode::Full, format!("epoll_ctl: {e}")))?;
            let entry = self.ids.entry(id.to_owned()).or_default();
            let stats = &mut entry.stats[stream.index()];
            stats.open = true;
            let sink = Sink::open(format!("{id}.{}", stream.as_str()));
            entry.tokens[stream.index()] = Some(token);
            self.streams.insert(
                token,
                Pump {
                    id: id.to_owned(),
                    stream,
                    pipe,
                    pipe_id,
                    sink,
                },
            );
        }
        Ok(())
    }

    /// Reads at most `max` bytes from one pipe and appends them to its file.
    fn pump_once(&mut self, token: u64, max: usize) -> Flow {
        let Some(pump) = self.streams.get_mut(&token) else {
            return Flow::Empty;
        };
        let want = max.min(self.buf.len());
        match nix::unistd::read(&pump.pipe, &mut self.buf[..want]) {
            Ok(0) => Flow::Eof,
            Ok(n) => {
                let mut spare = StreamStats::default();
                let stats = match self.ids.get_mut(&pump.id) {
                    Some(entry) => &mut entry.stats[pump.stream.index()],
                    None => &mut spare,
                };
                pump.sink.append(
                    self.dir.as_fd(),
                    &self.buf[..n],
                    self.bound,
                    &mut self.scratch,
                    stats,
                );
                Flow::Data(n)
            }
            Err(Errno::EAGAIN | Errno::EINTR) => Flow::Empty,
            Err(e) => {
                note(format_args!(
                    "read {}.{}: {e}; closing it",
                    pump.id,
                    pump.stream.as_str()
                ));
                Flow::Eof
            }
        }
    }

    /// Closes one stream; the id goes when both are closed. Returns the id's final counters
    /// when it went.
    fn close_stream(&mut self, token: u64) -> Option<[StreamStats; 2]> {
        let pump = self.streams.remove(&token)?;
        let _ = self.epoll.delete(&pump.pipe);
        let entry = self.ids.get_mut(&pump.id)?;
        let i = pump.stream.index();
        entry.tokens[i] = None;
        entry.stats[i].open = false;
        if entry.tokens.iter().all(Option::is_none) {
            return self.ids.remove(&pump.id).map(|e| e.stats);
        }
        None
    }

    /// Copies what is in the pipes of `id` right now (`FIONREAD`: at most a pipe's capacity,
    /// so a writer that keeps writing cannot make this endless), then reports its counters.
    fn sync(&mut self, id: &str) -> IdStats {
        let Some(tokens) = self.ids.get(id).map(|e| e.tokens) else {
            return IdStats::default();
        };
        let mut last = None;
        for token in tokens.into_iter().flatten() {
            let Some(pump) = self.streams.get(&token) else {
                continue;
            };
            let mut left = readable(pump.pipe.as_fd()).unwrap_or(CHUNK);
            let mut eof = false;
            while left > 0 && !eof {
                match self.pump_once(token, left) {
                    Flow::Data(n) => left = left.saturating_sub(n),
                    Flow::Empty => break,
                    Flow::Eof => eof = true,
                }
            }
            // Drained, and no writer left: done now rather than at the next turn, so that the
            // counters say so.
            if !eof && let Some(pump) = self.streams.get(&token) {
                eof = readable(pump.pipe.as_fd()) == Ok(0) && pipe_hung_up(pump.pipe.as_fd());
            }
            if eof {
                last = self.close_stream(token).or(last);
            }
        }
        let streams = match self.ids.get(id) {
            Some(entry) => entry.stats,
            None => last.unwrap_or_default(),
        };
        IdStats {
            attached: true,
            streams,
        }
    }

    /// Stops copying `id` at once and closes its pipes and files; whether it was attached.
    fn detach(&mut self, id: &str) -> bool {
        let Some(entry) = self.ids.remove(id) else {
            return false;
        };
        for token in entry.tokens.into_iter().flatten() {
            if let Some(pump) = self.streams.remove(&token) {
                let _ = self.epoll.delete(&pump.pipe);
            }
        }
        true
    }

    /// Removes the socket file (if it is still this keeper's) and stops accepting.
    fn stop_listening(&mut self) {
        if let Some(listener) = self.listener.take() {
            let _ = self.epoll.delete(&listener);
            let same = std::fs::symlink_metadata(&self.config.socket)
                .is_ok_and(|m| (m.dev(), m.ino()) == self.socket_id);
            if same {
                let _ = std::fs::remove_file(&self.config.socket);
            }
        }
    }

    /// Serves a `SHUTDOWN`: stop accepting, copy what every pipe holds now, close every pipe
    /// and file, release the lock (a new keeper may start at once), then answer.
    fn finish(&mut self, conn: u64, seq: u32) {
        self.stop_listening();
        let tokens: Vec<u64> = self.streams.keys().copied().collect();
        for token in tokens {
            if let Some(pump) = self.streams.get(&token) {
                let mut left = readable(pump.pipe.as_fd()).unwrap_or(0);
                while left > 0 {
                    match self.pump_once(token, left) {
                        Flow::Data(n) => left = left.saturating_sub(n),
                        _ => break,
                    }
                }
            }
        }
        let attached = self.ids.len();
        self.streams.clear();
        self.ids.clear();
        self.lock = None;
        note(format_args!(
            "stopping on request; {attached} ids were attached"
        ));
        let bytes = wire::encode_reply(seq, &Reply::ShutdownOk);
        if let Some(c) = self.conns.get(&conn) {
            let deadline = Instant::now() + SHUTDOWN_REPLY_WAIT;
            loop {
                match send_msg(c.fd.as_fd(), &bytes, &[], true) {
                    Err(Errno::EAGAIN) if Instant::now() < deadline => {
                        let _ = super::sock::poll_one(
                            c.fd.as_fd(),
                            libc::POLLOUT,
                            Duration::from_millis(10),
                        );
                    }
                    _ => break,
                }
            }
        }
    }
}

/// `accept4` with close-on-exec and non-blocking.
fn accept(listener: BorrowedFd<'_>) -> Result<OwnedFd, Errno> {
    // SAFETY: null address arguments are allowed (the peer's address is not wanted).
    let fd = unsafe {
        libc::accept4(
            listener.as_raw_fd(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
        )
    };
    if fd < 0 {
        return Err(Errno::last());
    }
    // SAFETY: accept4 returned a new fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// The (dev, ino) of `fd` if it is the read end of a pipe; else why not.
fn read_end_id(fd: BorrowedFd<'_>) -> Result<(u64, u64), String> {
    let st = nix::sys::stat::fstat(fd).map_err(|e| format!("fstat: {e}"))?;
    if st.st_mode & SFlag::S_IFMT.bits() != SFlag::S_IFIFO.bits() {
        return Err("not a pipe".into());
    }
    let flags =
        nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_GETFL).map_err(|e| format!("fcntl: {e}"))?;
    if flags & libc::O_ACCMODE != libc::O_RDONLY {
        return Err("not the read end of a pipe".into());
    }
    Ok((st.st_dev, st.st_ino))
}

/// Whether every writer of a pipe has closed it (poll reports POLLHUP).
fn pipe_hung_up(fd: BorrowedFd<'_>) -> bool {
    super::sock::poll_one(fd, libc::POLLIN, Duration::ZERO).is_ok_and(|ev| ev & libc::POLLHUP != 0)
}
