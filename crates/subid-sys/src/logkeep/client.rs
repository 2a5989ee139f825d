//! The daemon's side of the keeper's socket: requests with deadlines, replies matched to their
//! request by seq, so that many threads can share one connection.
//!
//! Whoever waits for a reply reads the socket for everyone (one reader at a time); replies for
//! other requests are left for their waiters. `ATTACH` waits for nothing: a refusal arrives
//! later as an `ERROR` that no one waits for and is kept for [`Client::take_refusals`].

use std::collections::{HashMap, HashSet};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, IntoRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use nix::sys::socket::{
    AddressFamily, SockFlag, SockType, UnixAddr, connect, getsockopt, setsockopt, socket, sockopt,
};
use nix::sys::time::TimeVal;

use super::keeper::{EXIT_OTHER_KEEPER, launch};
use super::sock::{peer, poll_one, recv_msg, send_msg, set_nonblocking};
use super::wire::{self, ErrorCode, Hello, IdStats, MAX_MESSAGE, Reply, Request, valid_id};
use super::{KeeperConfig, KeeperError, Stream, StreamSet};
use crate::error::{Errno, SysError};
use crate::pidfd::{ExitStatus, PidFd};

/// How long a `sendmsg` to the keeper may block (`SO_SNDTIMEO`). The keeper reads its socket
/// every loop turn, so only a wedged keeper makes a send wait this long.
const SEND_TIMEOUT: Duration = Duration::from_secs(2);
/// A reader gives others a chance to take over at least this often.
const READ_SLICE: Duration = Duration::from_millis(100);
/// Refusals kept for [`Client::take_refusals`]; older ones are dropped past this.
const MAX_REFUSALS: usize = 4096;

/// An `ATTACH` the keeper refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub id: String,
    pub code: ErrorCode,
    pub message: String,
}

/// An id a keeper holds, with dups of its read ends (`None`: that stream's writers all closed).
#[derive(Debug)]
pub struct Listed {
    pub id: String,
    pub stdout: Option<OwnedFd>,
    pub stderr: Option<OwnedFd>,
}

/// A message received for a request: the reply, its fds, and whether some fds were lost.
type Incoming = (Reply, Vec<OwnedFd>, bool);

#[derive(Default)]
struct Rx {
    /// Someone is reading the socket.
    reading: bool,
    /// The connection is gone (EOF, reset, or garbage from the keeper).
    closed: bool,
    /// Seqs someone waits for.
    waiting: HashSet<u32>,
    /// Replies received for waited seqs.
    got: HashMap<u32, Vec<Incoming>>,
    /// Seqs whose waiter gave up: their replies are dropped when they come.
    abandoned: HashSet<u32>,
    refusals: Vec<Refusal>,
}

impl Rx {
    fn route(&mut self, seq: u32, incoming: Incoming) {
        if self.waiting.contains(&seq) {
            self.got.entry(seq).or_default().push(incoming);
        } else if self.abandoned.contains(&seq) {
            if incoming.0.is_final() {
                self.abandoned.remove(&seq);
            }
        } else if let Reply::Error { code, id, message } = incoming.0 {
            if self.refusals.len() >= MAX_REFUSALS {
                self.refusals.remove(0);
            }
            self.refusals.push(Refusal { id, code, message });
        }
    }
}

/// A connection to a keeper.
#[derive(Debug)]
pub struct Client {
    fd: OwnedFd,
    path: PathBuf,
    hello: Hello,
    seq: AtomicU32,
    rx: Mutex<Rx>,
    cv: Condvar,
}

impl std::fmt::Debug for Rx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rx")
            .field("closed", &self.closed)
            .field("waiting", &self.waiting.len())
            .finish()
    }
}

impl Client {
    /// Connects to the keeper at `path`, checks it runs as root (`SO_PEERCRED`), and says
    /// hello. `NotRunning` when nothing listens there.
    pub fn connect(path: &Path, deadline: Instant) -> Result<Client, KeeperError> {
        let fd = socket(
            AddressFamily::Unix,
            SockType::SeqPacket,
            SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
            None,
        )
        .map_err(|e| SysError::syscall("socket", e))?;
        let addr = UnixAddr::new(path).map_err(|e| SysError::path("connect", path, e))?;
        loop {
            match connect(fd.as_raw_fd(), &addr) {
                Ok(()) => break,
                Err(Errno::ENOENT | Errno::ECONNREFUSED) => {
                    return Err(KeeperError::NotRunning {
                        path: path.to_owned(),
                    });
                }
                // The keeper's backlog is full: it is busy, not gone.
                Err(Errno::EAGAIN | Errno::EINTR) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(2));
                }
                Err(Errno::EAGAIN) => return Err(KeeperError::Timeout { what: "connect" }),
                Err(e) => return Err(SysError::path("connect", path, e).into()),
            }
        }
        set_nonblocking(&fd, false).map_err(|e| SysError::path("fcntl", path, e))?;
        let timeout = TimeVal::new(
            i64::try_from(SEND_TIMEOUT.as_secs()).unwrap_or(2),
            i64::from(SEND_TIMEOUT.subsec_micros()),
        );
        setsockopt(&fd, sockopt::SendTimeout, &timeout)
            .map_err(|e| SysError::path("setsockopt(SO_SNDTIMEO)", path, e))?;
        let (_, uid) = peer(fd.as_fd()).map_err(|e| SysError::path("SO_PEERCRED", path, e))?;
        if uid != 0 {
            return Err(KeeperError::NotRoot {
                path: path.to_owned(),
                uid,
            });
        }
        let mut client = Client {
            fd,
            path: path.to_owned(),
            hello: Hello {
                version: 0,
                pid: 0,
                max_bytes: 0,
                slack: 0,
                capacity: 0,
                attached: 0,
                log_dir: PathBuf::new(),
            },
            seq: AtomicU32::new(1),
            rx: Mutex::new(Rx::default()),
            cv: Condvar::new(),
        };
        let replies = client.request(Request::Hello, deadline, "HELLO")?;
        client.hello = match last(replies, "HELLO")? {
            Reply::HelloOk(hello) => hello,
            other => return Err(unexpected("HELLO", &other)),
        };
        Ok(client)
    }

    /// Says hello again and waits for the answer: whether the keeper still serves (a
    /// stopped or wedged one does not answer by `deadline`).
    pub fn ping(&self, deadline: Instant) -> Result<Hello, KeeperError> {
        let replies = self.request(Request::Hello, deadline, "HELLO")?;
        match last(replies, "HELLO")? {
            Reply::HelloOk(hello) => Ok(hello),
            other => Err(unexpected("HELLO", &other)),
        }
    }

    /// What the keeper said about itself when this connection was made.
    pub fn hello(&self) -> &Hello {
        &self.hello
    }

    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The keeper's pid (as it said in its hello).
    pub fn keeper_pid(&self) -> i32 {
        i32::try_from(self.hello.pid).unwrap_or(0)
    }

    /// A pidfd of the keeper at the other end, to kill a wedged one: `SO_PEERPIDFD` where the
    /// kernel has it (6.5), else `pidfd_open` of the peer's pid, kept only if the connection is
    /// still up afterwards (so the keeper was alive when it was opened, and the pid was its).
    pub fn keeper_pidfd(&self) -> Result<PidFd, KeeperError> {
        let (pid, _) =
            peer(self.fd.as_fd()).map_err(|e| SysError::path("SO_PEERCRED", &self.path, e))?;
        if let Ok(fd) = getsockopt(&self.fd, sockopt::PeerPidfd) {
            // SAFETY: SO_PEERPIDFD gave us a new pidfd of the peer; into_raw_fd hands its
            // ownership over, so the PidFd is its only owner.
            return Ok(unsafe { PidFd::from_raw(fd.into_raw_fd(), pid) });
        }
        let pidfd = PidFd::open(pid)?;
        let events = poll_one(self.fd.as_fd(), libc::POLLIN, Duration::ZERO)
            .map_err(|e| SysError::path("poll", &self.path, e))?;
        if events & (libc::POLLHUP | libc::POLLERR) != 0 {
            return Err(KeeperError::Closed);
        }
        Ok(pidfd)
    }

    /// Asks the keeper to copy `id`'s pipes: one `sendmsg` with the read ends, no reply
    /// (a refusal shows up in [`Client::take_refusals`]; a later request on this connection is
    /// served after it). Attaching the same pipes again is harmless.
    pub fn attach(
        &self,
        id: &str,
        stdout: Option<BorrowedFd<'_>>,
        stderr: Option<BorrowedFd<'_>>,
    ) -> Result<(), KeeperError> {
        if !valid_id(id) {
            return Err(KeeperError::BadId(id.to_owned()));
        }
        let streams = StreamSet::of(&stdout, &stderr).ok_or_else(|| SysError::InvalidInput {
            what: "log keeper attach",
            reason: format!("no stream to attach for {id}"),
        })?;
        let fds: Vec<BorrowedFd<'_>> = [stdout, stderr].into_iter().flatten().collect();
        let bytes = wire::encode_request(
            self.next_seq(),
            &Request::Attach {
                id: id.to_owned(),
                streams,
            },
        );
        self.send(&bytes, &fds, "ATTACH")
    }

    /// Has the keeper copy what `id`'s pipes hold now into its files, and returns its
    /// counters (`attached: false` when the keeper does not know the id: never attached, or
    /// every writer closed and everything was written).
    pub fn sync(&self, id: &str, deadline: Instant) -> Result<IdStats, KeeperError> {
        if !valid_id(id) {
            return Err(KeeperError::BadId(id.to_owned()));
        }
        let replies = self.request(Request::Sync { id: id.to_owned() }, deadline, "SYNC")?;
        match last(replies, "SYNC")? {
            Reply::SyncOk(stats) => Ok(stats),
            other => Err(refused_or_unexpected("SYNC", id, other)),
        }
    }

    /// Has the keeper drop `id` now (closing its pipes and files); whether it held it.
    pub fn detach(&self, id: &str, deadline: Instant) -> Result<bool, KeeperError> {
        if !valid_id(id) {
            return Err(KeeperError::BadId(id.to_owned()));
        }
        let replies = self.request(Request::Detach { id: id.to_owned() }, deadline, "DETACH")?;
        match last(replies, "DETACH")? {
            Reply::DetachOk { attached } => Ok(attached),
            other => Err(refused_or_unexpected("DETACH", id, other)),
        }
    }

    /// Every id the keeper holds, with dups of its open read ends.
    pub fn list(&self, deadline: Instant) -> Result<Vec<Listed>, KeeperError> {
        let replies = self.request(Request::List, deadline, "LIST")?;
        let mut listed = Vec::new();
        for (reply, fds, lost) in replies {
            if lost {
                // The daemon's own fd limit: it cannot take the ids over.
                return Err(SysError::path("recvmsg (LIST)", &self.path, Errno::EMFILE).into());
            }
            match reply {
                Reply::ListBatch(entries) => {
                    let wanted: usize = entries.iter().map(|(_, s)| s.len()).sum();
                    if wanted != fds.len() {
                        return Err(KeeperError::Unexpected {
                            what: "LIST",
                            reply: format!("a batch naming {wanted} fds with {}", fds.len()),
                        });
                    }
                    let mut fds = fds.into_iter();
                    for (id, set) in entries {
                        let mut take = |s: Stream| if set.contains(s) { fds.next() } else { None };
                        let stdout = take(Stream::Stdout);
                        let stderr = take(Stream::Stderr);
                        listed.push(Listed { id, stdout, stderr });
                    }
                }
                Reply::ListEnd { .. } => return Ok(listed),
                other => return Err(refused_or_unexpected("LIST", "", other)),
            }
        }
        Err(KeeperError::Unexpected {
            what: "LIST",
            reply: "no LIST_END".into(),
        })
    }

    /// Asks the keeper to stop: it copies what the pipes hold, closes everything, releases its
    /// lock and socket, answers, and exits. What is written afterwards waits in the pipes for
    /// the next keeper (as long as someone holds their read ends).
    pub fn shutdown(&self, deadline: Instant) -> Result<(), KeeperError> {
        let replies = self.request(Request::Shutdown, deadline, "SHUTDOWN")?;
        match last(replies, "SHUTDOWN")? {
            Reply::ShutdownOk => Ok(()),
            other => Err(refused_or_unexpected("SHUTDOWN", "", other)),
        }
    }

    /// Reads what arrives within `timeout` that nobody waits for (refusals), and notices a
    /// closed connection: `Err` once the keeper is gone.
    pub fn pump(&self, timeout: Duration) -> Result<(), KeeperError> {
        self.wait(None, Instant::now() + timeout, "reading")
            .map(drop)
    }

    /// Waits until the keeper closes the connection (after a `SHUTDOWN`, say); false at the
    /// deadline.
    pub fn wait_closed(&self, deadline: Instant) -> bool {
        while Instant::now() < deadline {
            if self.pump(READ_SLICE).is_err() {
                return true;
            }
        }
        self.is_closed()
    }

    /// `ATTACH`es the keeper refused since the last call.
    pub fn take_refusals(&self) -> Vec<Refusal> {
        std::mem::take(&mut self.lock().refusals)
    }

    /// Whether the connection is known to be gone.
    pub fn is_closed(&self) -> bool {
        self.lock().closed
    }

    fn lock(&self) -> MutexGuard<'_, Rx> {
        self.rx.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn next_seq(&self) -> u32 {
        self.seq.fetch_add(1, Ordering::Relaxed)
    }

    fn send(
        &self,
        bytes: &[u8],
        fds: &[BorrowedFd<'_>],
        what: &'static str,
    ) -> Result<(), KeeperError> {
        if self.is_closed() {
            return Err(KeeperError::Closed);
        }
        match send_msg(self.fd.as_fd(), bytes, fds, false) {
            Ok(()) => Ok(()),
            Err(Errno::EAGAIN) => Err(KeeperError::Timeout { what }),
            Err(Errno::EPIPE | Errno::ECONNRESET | Errno::ENOTCONN) => {
                self.lock().closed = true;
                self.cv.notify_all();
                Err(KeeperError::Closed)
            }
            Err(e) => Err(SysError::path("sendmsg", &self.path, e).into()),
        }
    }

    /// Sends a request and waits for its final reply (and any batches before it).
    fn request(
        &self,
        request: Request,
        deadline: Instant,
        what: &'static str,
    ) -> Result<Vec<Incoming>, KeeperError> {
        let seq = self.next_seq();
        {
            let mut rx = self.lock();
            if rx.closed {
                return Err(KeeperError::Closed);
            }
            // Registered before sending, so a reply that beats us here is kept.
            rx.waiting.insert(seq);
        }
        let bytes = wire::encode_request(seq, &request);
        if let Err(e) = self.send(&bytes, &[], what) {
            self.lock().waiting.remove(&seq);
            return Err(e);
        }
        self.wait(Some(seq), deadline, what)
    }

    /// Waits for the final reply to `seq` (or, with None, just reads until the deadline),
    /// reading the socket itself when no one else does.
    fn wait(
        &self,
        seq: Option<u32>,
        deadline: Instant,
        what: &'static str,
    ) -> Result<Vec<Incoming>, KeeperError> {
        let mut rx = self.lock();
        loop {
            if let Some(seq) = seq {
                let done = rx
                    .got
                    .get(&seq)
                    .and_then(|v| v.last())
                    .is_some_and(|(r, _, _)| r.is_final());
                if done {
                    rx.waiting.remove(&seq);
                    return Ok(rx.got.remove(&seq).unwrap_or_default());
                }
            }
            if rx.closed {
                if let Some(seq) = seq {
                    rx.waiting.remove(&seq);
                    rx.got.remove(&seq);
                }
                return Err(KeeperError::Closed);
            }
            let now = Instant::now();
            if now >= deadline {
                return match seq {
                    Some(seq) => {
                        rx.waiting.remove(&seq);
                        rx.got.remove(&seq);
                        rx.abandoned.insert(seq);
                        Err(KeeperError::Timeout { what })
                    }
                    None => Ok(Vec::new()),
                };
            }
            if rx.reading {
                rx = self
                    .cv
                    .wait_timeout(rx, deadline - now)
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
                continue;
            }
            rx.reading = true;
            drop(rx);
            let got = self.read_one((deadline - now).min(READ_SLICE));
            rx = self.lock();
            rx.reading = false;
            match got {
                Ok(Some((seq, incoming))) => rx.route(seq, incoming),
                Ok(None) => {}
                Err(_) => rx.closed = true,
            }
            self.cv.notify_all();
        }
    }

    /// One message, if one arrives within `timeout`. `Err` means the connection is unusable.
    fn read_one(&self, timeout: Duration) -> Result<Option<(u32, Incoming)>, KeeperError> {
        let events = poll_one(self.fd.as_fd(), libc::POLLIN, timeout)
            .map_err(|e| SysError::path("poll", &self.path, e))?;
        if events == 0 {
            return Ok(None);
        }
        let mut buf = [0u8; MAX_MESSAGE];
        let mut fds = Vec::new();
        match recv_msg(self.fd.as_fd(), &mut buf, &mut fds) {
            Ok(got) if got.len == 0 && fds.is_empty() => Err(KeeperError::Closed),
            Ok(got) if got.truncated => Err(KeeperError::Protocol(wire::DecodeError {
                code: ErrorCode::BadMessage,
                reason: "a reply longer than any this build knows".into(),
                seq: None,
            })),
            Ok(got) => {
                let (seq, reply) =
                    wire::decode_reply(&buf[..got.len]).map_err(KeeperError::Protocol)?;
                Ok(Some((seq, (reply, fds, got.fds_lost))))
            }
            Err(Errno::EAGAIN | Errno::EINTR) => Ok(None),
            Err(Errno::ECONNRESET) => Err(KeeperError::Closed),
            Err(e) => Err(SysError::path("recvmsg", &self.path, e).into()),
        }
    }
}

fn last(replies: Vec<Incoming>, what: &'static str) -> Result<Reply, KeeperError> {
    replies
        .into_iter()
        .last()
        .map(|(r, _, _)| r)
        .ok_or(KeeperError::Timeout { what })
}

fn unexpected(what: &'static str, reply: &Reply) -> KeeperError {
    KeeperError::Unexpected {
        what,
        reply: format!("{reply:?}"),
    }
}

fn refused_or_unexpected(what: &'static str, id: &str, reply: Reply) -> KeeperError {
    match reply {
        Reply::Error {
            code,
            id: their,
            message,
        } => KeeperError::Refused {
            what,
            id: if their.is_empty() {
                id.to_owned()
            } else {
                their
            },
            code,
            message,
        },
        other => unexpected(what, &other),
    }
}

/// Connects to the keeper of `config.socket`, or starts one (`program` with
/// [`KeeperConfig::to_args`], see [`launch`]) and connects once it listens. Returns the
/// client and, when this call started the keeper, its pidfd (the caller reaps it). Waits for
/// nothing past `deadline`.
pub fn connect_or_launch(
    program: &Path,
    config: &KeeperConfig,
    deadline: Instant,
) -> Result<(Client, Option<PidFd>), KeeperError> {
    match Client::connect(&config.socket, deadline) {
        Ok(client) => return Ok((client, None)),
        // Nothing there, or a keeper that was exiting idle as we came.
        Err(KeeperError::NotRunning { .. } | KeeperError::Closed) => {}
        Err(e) => return Err(e),
    }
    let mut child = Some(launch(program, config)?);
    let mut pause = Duration::from_millis(1);
    loop {
        match Client::connect(&config.socket, deadline) {
            Ok(client) => return Ok((client, child)),
            Err(KeeperError::NotRunning { .. } | KeeperError::Closed) => {}
            Err(e) => return Err(e),
        }
        if let Some(pidfd) = &child
            && pidfd.has_exited()?
        {
            let status = pidfd.try_wait()?;
            if status != Some(ExitStatus::Exited(i32::from(EXIT_OTHER_KEEPER))) {
                return Err(KeeperError::Exited {
                    pid: pidfd.pid(),
                    status,
                });
            }
            // Another keeper holds the lock: connect to it once it listens.
            child = None;
        }
        if Instant::now() >= deadline {
            return Err(KeeperError::Timeout {
                what: "the start of the keeper",
            });
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(20));
    }
}
