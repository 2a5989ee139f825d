//! The log keeper: one process per daemon that owns every spawned process's output pipes and
//! log files, so that a tenant never holds a log file and cannot grow it past its bound.
//!
//! A process that writes its log file itself can `fallocate(2)` it, hole-punch it, or keep
//! writing from a background child the daemon no longer watches; a limit checked afterwards
//! cannot hold. So a process gets the write end of a pipe as fd 1 and another as fd 2, and the
//! keeper, the only writer of the files, copies each pipe into `<log-dir>/<id>.stdout` or
//! `.stderr` (as podman's conmon does per container; here one keeper serves every process, so
//! a spawn costs two `pipe2` and one `sendmsg`, not a process).
//!
//! **Bound.** A stream's file never holds more than `max_bytes + slack(max_bytes)` bytes
//! ([`slack`]): before an append would pass that, the head is cut so that the last `max_bytes`
//! bytes remain, with `fallocate(FALLOC_FL_COLLAPSE_RANGE)` on whole blocks where the
//! filesystem has it (ext4, xfs), else by copying the tail to the front and truncating. Nothing
//! is preallocated, so the blocks used follow the size (plus the rounding of the last block).
//! A write error (a full disk) drops what was read, counts it, and is logged once per stream;
//! the pipe keeps being drained, so a writer never blocks on a dead disk.
//!
//! **Fairness.** One epoll loop, level-triggered, reads at most [`CHUNK`] bytes from each ready
//! pipe per turn into one fixed buffer: a flooding process gets its turn like every other, and
//! the keeper's memory does not grow with what processes write. A flood is throttled by the
//! pipe itself (its writer blocks while the keeper serves the others).
//!
//! **Surviving.** The keeper runs in its own session with an empty environment, ignores
//! SIGPIPE, SIGHUP and SIGINT, and outlives the daemon; the next daemon connects to the same
//! socket and `LIST`s the ids back. The daemon keeps a dup of every read end (a *mirror*) that
//! it never reads: if the keeper dies, writers see no `EPIPE` (a read end is still open) and
//! what they write waits in the pipe until a new keeper is attached to the same pipes. What a
//! killed keeper loses is at most the one chunk it had read and not yet written.
//!
//! The wire format is in [`wire`]; [`run`] is the keeper's loop, [`Client`] the daemon's side.

mod client;
mod keeper;
mod sink;
mod sock;
pub mod wire;

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use client::{Client, Listed, Refusal, connect_or_launch};
pub use keeper::{KeeperExit, keeper_main, launch, run};
pub use wire::{ErrorCode, Hello, IdStats, StreamStats};

use crate::error::SysError;
use crate::pidfd::ExitStatus;

/// Most bytes read from one pipe per loop turn (and the size of the keeper's buffer).
pub const CHUNK: usize = 64 * 1024;

/// How far past `max_bytes` a file may grow before its head is cut: a quarter of the limit,
/// at least 64 KiB and at most 16 MiB. Each cut costs a `COLLAPSE_RANGE` (which writes back the
/// file's dirty pages first: 1-2 ms measured on ext4 here) or a copy of `max_bytes`, so the
/// slack sets how often a flood pays it: every `slack` bytes, a constant share of the copying.
pub fn slack(max_bytes: u64) -> u64 {
    (max_bytes / 4).clamp(64 * 1024, 16 * 1024 * 1024)
}

/// One of a process's two output streams.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Stream {
    Stdout,
    Stderr,
}

impl Stream {
    /// Both, in wire order.
    pub const ALL: [Stream; 2] = [Stream::Stdout, Stream::Stderr];

    /// 0 for stdout, 1 for stderr.
    pub fn index(self) -> usize {
        match self {
            Stream::Stdout => 0,
            Stream::Stderr => 1,
        }
    }

    /// The log file's suffix: `stdout` or `stderr`.
    pub fn as_str(self) -> &'static str {
        match self {
            Stream::Stdout => "stdout",
            Stream::Stderr => "stderr",
        }
    }

    /// The stream named `s`.
    pub fn parse(s: &str) -> Option<Stream> {
        Stream::ALL.into_iter().find(|st| st.as_str() == s)
    }
}

/// A non-empty set of streams (the bits of `ATTACH` and `LIST_BATCH`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamSet(u8);

impl StreamSet {
    pub const BOTH: StreamSet = StreamSet(0b11);

    /// The set with only `stream`.
    pub fn only(stream: Stream) -> StreamSet {
        StreamSet(stream.bit())
    }

    /// The set of `bits`, if they name one or both streams and nothing else.
    pub fn from_bits(bits: u8) -> Option<StreamSet> {
        (bits != 0 && bits & !0b11 == 0).then_some(StreamSet(bits))
    }

    /// The set of the streams that are `Some` (None when neither is).
    pub fn of<T>(stdout: &Option<T>, stderr: &Option<T>) -> Option<StreamSet> {
        StreamSet::from_bits(u8::from(stdout.is_some()) | u8::from(stderr.is_some()) << 1)
    }

    pub fn bits(self) -> u8 {
        self.0
    }

    pub fn contains(self, stream: Stream) -> bool {
        self.0 & stream.bit() != 0
    }

    /// How many streams.
    pub fn len(self) -> usize {
        self.0.count_ones() as usize
    }

    /// Never true (a set names at least one stream); for clippy's `len_without_is_empty`.
    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// The streams in the set, in wire order.
    pub fn iter(self) -> impl Iterator<Item = Stream> {
        Stream::ALL.into_iter().filter(move |s| self.contains(*s))
    }
}

/// How the keeper is started: the socket it listens on, where it writes, the bound.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeeperConfig {
    /// The socket (mode 0600; a lock file `<socket>.lock` beside it keeps a second keeper out).
    pub socket: PathBuf,
    /// Where `<id>.stdout` and `<id>.stderr` are written (created 0640).
    pub log_dir: PathBuf,
    /// Bytes of each stream a file keeps (the last ones).
    pub max_bytes: u64,
    /// The keeper exits after this long with no client connected and nothing attached.
    pub idle_timeout: Duration,
    /// Most ids it accepts, below what its fd limit allows (None: the fd limit alone).
    pub max_ids: Option<u32>,
}

/// The flag that selects the keeper in a binary's command line (its first argument).
pub const KEEPER_FLAG: &str = "--log-keeper";

impl KeeperConfig {
    /// A keeper for `socket` writing into `log_dir`, with a 10 s idle timeout.
    pub fn new(socket: impl Into<PathBuf>, log_dir: impl Into<PathBuf>, max_bytes: u64) -> Self {
        KeeperConfig {
            socket: socket.into(),
            log_dir: log_dir.into(),
            max_bytes,
            idle_timeout: Duration::from_secs(10),
            max_ids: None,
        }
    }

    /// The command line after the program name:
    /// `--log-keeper --socket PATH --log-dir DIR --max-bytes N --idle-timeout-ms T [--max-ids M]`.
    pub fn to_args(&self) -> Vec<OsString> {
        let mut args: Vec<OsString> = vec![
            KEEPER_FLAG.into(),
            "--socket".into(),
            self.socket.clone().into(),
            "--log-dir".into(),
            self.log_dir.clone().into(),
            "--max-bytes".into(),
            self.max_bytes.to_string().into(),
            "--idle-timeout-ms".into(),
            self.idle_timeout.as_millis().to_string().into(),
        ];
        if let Some(n) = self.max_ids {
            args.push("--max-ids".into());
            args.push(n.to_string().into());
        }
        args
    }

    /// Parses what [`KeeperConfig::to_args`] writes (the first argument must be
    /// `--log-keeper`); the error says what is wrong.
    pub fn from_args(args: impl IntoIterator<Item = OsString>) -> Result<Self, String> {
        let mut args = args.into_iter();
        if args.next().as_deref() != Some(KEEPER_FLAG.as_ref()) {
            return Err(format!("the first argument must be {KEEPER_FLAG}"));
        }
        let (mut socket, mut log_dir, mut max_bytes) = (None, None, None);
        let mut idle_timeout = Duration::from_secs(10);
        let mut max_ids = None;
        while let Some(flag) = args.next() {
            let flag = flag.to_string_lossy().into_owned();
            let value = args.next().ok_or_else(|| format!("{flag} needs a value"))?;
            let number = |v: &OsString| {
                v.to_str()
                    .and_then(|s| s.parse::<u64>().ok())
                    .ok_or_else(|| format!("{flag} takes a number, not {v:?}"))
            };
            match flag.as_str() {
                "--socket" => socket = Some(PathBuf::from(value)),
                "--log-dir" => log_dir = Some(PathBuf::from(value)),
                "--max-bytes" => max_bytes = Some(number(&value)?),
                "--idle-timeout-ms" => idle_timeout = Duration::from_millis(number(&value)?),
                "--max-ids" => {
                    max_ids = Some(
                        u32::try_from(number(&value)?)
                            .map_err(|_| format!("--max-ids {value:?} is too large"))?,
                    );
                }
                other => return Err(format!("unknown argument {other}")),
            }
        }
        let socket = socket.ok_or("--socket is required")?;
        let log_dir = log_dir.ok_or("--log-dir is required")?;
        if !socket.is_absolute() || !log_dir.is_absolute() {
            return Err("--socket and --log-dir must be absolute paths".into());
        }
        Ok(KeeperConfig {
            socket,
            log_dir,
            max_bytes: max_bytes.ok_or("--max-bytes is required")?,
            idle_timeout,
            max_ids,
        })
    }

    /// The lock file beside the socket.
    pub fn lock_path(&self) -> PathBuf {
        lock_path(&self.socket)
    }
}

/// A pipe for one stream of a process: (read end, write end), both close-on-exec, both
/// blocking (the keeper makes its copy of the read end non-blocking; the writer keeps a
/// blocking stdout, as a process expects).
pub fn pipe() -> Result<(std::os::fd::OwnedFd, std::os::fd::OwnedFd), SysError> {
    nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| SysError::syscall("pipe2", e))
}

fn lock_path(socket: &Path) -> PathBuf {
    let mut name = socket.as_os_str().to_owned();
    name.push(".lock");
    PathBuf::from(name)
}

/// Errors of the keeper and of talking to it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KeeperError {
    /// A system call failed.
    #[error(transparent)]
    Sys(#[from] SysError),
    /// Nothing listens on the socket (no file, or a stale one).
    #[error("no log keeper listens on {}", path.display())]
    NotRunning { path: PathBuf },
    /// Something other than root listens on the socket.
    #[error("the log keeper socket {} belongs to uid {uid}, not root", path.display())]
    NotRoot { path: PathBuf, uid: u32 },
    /// The connection to the keeper is gone (it exited, or was killed).
    #[error("the connection to the log keeper is closed")]
    Closed,
    /// The keeper did not answer in time.
    #[error("the log keeper did not answer {what} in time")]
    Timeout { what: &'static str },
    /// The keeper refused a request.
    #[error("the log keeper refused {what} of {id:?}: {code}: {message}")]
    Refused {
        what: &'static str,
        id: String,
        code: ErrorCode,
        message: String,
    },
    /// The keeper sent something this build cannot read.
    #[error("bad message from the log keeper: {0}")]
    Protocol(#[source] wire::DecodeError),
    /// The keeper answered with a reply that does not fit the request.
    #[error("the log keeper answered {what} with {reply}")]
    Unexpected { what: &'static str, reply: String },
    /// An id that cannot name a log file.
    #[error("{0:?} is not a log id (1 to 64 characters of [A-Za-z0-9_-])")]
    BadId(String),
    /// A keeper that was started exited before it listened.
    #[error("the log keeper {pid} exited before it listened: {status:?}")]
    Exited {
        pid: i32,
        status: Option<ExitStatus>,
    },
}

impl KeeperError {
    /// Whether the connection cannot be used any more (a new keeper or connection is needed).
    pub fn is_connection_lost(&self) -> bool {
        matches!(self, KeeperError::Closed | KeeperError::Protocol(_))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slack_is_a_quarter_within_its_bounds() {
        assert_eq!(slack(0), 64 * 1024);
        assert_eq!(slack(100 * 1024), 64 * 1024);
        assert_eq!(slack(1 << 20), 256 * 1024);
        assert_eq!(slack(1 << 36), 16 << 20);
    }

    #[test]
    fn arguments_round_trip_and_bad_ones_say_why() {
        let mut config = KeeperConfig::new("/run/x/logkeeper.sock", "/var/lib/x/logs", 1 << 20);
        assert_eq!(KeeperConfig::from_args(config.to_args()).unwrap(), config);
        config.max_ids = Some(7);
        config.idle_timeout = Duration::from_millis(250);
        assert_eq!(KeeperConfig::from_args(config.to_args()).unwrap(), config);
        let args = |v: &[&str]| v.iter().map(OsString::from).collect::<Vec<_>>();
        for (bad, says) in [
            (args(&[]), "first argument"),
            (args(&["--socket", "/s"]), "first argument"),
            (args(&["--log-keeper", "--socket"]), "needs a value"),
            (
                args(&["--log-keeper", "--log-dir", "/d", "--max-bytes", "1"]),
                "--socket",
            ),
            (
                args(&[
                    "--log-keeper",
                    "--socket",
                    "/s",
                    "--log-dir",
                    "/d",
                    "--max-bytes",
                    "x",
                ]),
                "number",
            ),
            (
                args(&[
                    "--log-keeper",
                    "--socket",
                    "s",
                    "--log-dir",
                    "/d",
                    "--max-bytes",
                    "1",
                ]),
                "absolute",
            ),
            (args(&["--log-keeper", "--what", "1"]), "unknown"),
        ] {
            let err = KeeperConfig::from_args(bad.clone()).unwrap_err();
            assert!(err.contains(says), "{bad:?}: {err}");
        }
    }

    #[test]
    fn stream_sets_name_one_or_both() {
        assert_eq!(StreamSet::from_bits(0), None);
        assert_eq!(StreamSet::from_bits(4), None);
        assert_eq!(StreamSet::BOTH.len(), 2);
        let err = StreamSet::only(Stream::Stderr);
        assert_eq!(err.iter().collect::<Vec<_>>(), [Stream::Stderr]);
        assert_eq!(
            StreamSet::of(&Some(1), &None::<i32>),
            Some(StreamSet::only(Stream::Stdout))
        );
        assert_eq!(StreamSet::of::<i32>(&None, &None), None);
        assert_eq!(Stream::parse("stderr"), Some(Stream::Stderr));
        assert_eq!(Stream::parse("stdin"), None);
    }
}
