//! The keeper's wire format: one request or reply per `SOCK_SEQPACKET` message, fds beside it
//! as `SCM_RIGHTS`.
//!
//! Every message starts with an 8-byte header: `version: u8`, `kind: u8`, two zero bytes,
//! `seq: u32` (little-endian). A reply carries the `seq` of the request it answers. Integers
//! are little-endian; an id is `len: u8` then that many bytes of `[A-Za-z0-9_-]`.
//!
//! | kind | direction | body | fds |
//! |---|---|---|---|
//! | `HELLO` 1 | → | | |
//! | `ATTACH` 2 | → | `streams: u8` (bit 0 stdout, bit 1 stderr), id | one read end per set bit, in bit order |
//! | `SYNC` 3 | → | id | |
//! | `DETACH` 4 | → | id | |
//! | `LIST` 5 | → | | |
//! | `SHUTDOWN` 6 | → | | |
//! | `HELLO_OK` 0x81 | ← | `version: u16`, `pid: u32`, `max_bytes: u64`, `slack: u64`, `capacity: u32`, `attached: u32`, `len: u16`, the log dir's bytes | |
//! | `SYNC_OK` 0x82 | ← | `attached: u8`, per stream: `open: u8`, `written`, `trimmed`, `dropped: u64` | |
//! | `DETACH_OK` 0x83 | ← | `attached: u8` (whether it was) | |
//! | `LIST_BATCH` 0x84 | ← | `count: u16`, per id: `streams: u8`, id | the read ends, in order |
//! | `LIST_END` 0x85 | ← | `total: u32` | |
//! | `SHUTDOWN_OK` 0x86 | ← | | |
//! | `ERROR` 0xff | ← | `code: u16`, id (empty when none), `len: u16`, UTF-8 message | |
//!
//! `ATTACH` has no reply when it succeeds (the spawn path pays one `sendmsg`); a refused one
//! gets an `ERROR` naming its id. Compatibility rule: the header and the `HELLO`, `LIST`,
//! `SHUTDOWN` exchanges of version 1 never change, so a daemon of any later version can still
//! take the ids away from an older keeper and stop it; new requests get new kinds. Requests are
//! decoded strictly (trailing bytes are an error); replies may grow at the end.

use std::ffi::OsString;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::PathBuf;

use super::{Stream, StreamSet};

/// The protocol version this build speaks.
pub const VERSION: u8 = 1;
/// Bytes of the header.
pub const HEADER: usize = 8;
/// Largest message either side sends (a full `LIST_BATCH` is about 4.3 KiB, a `HELLO_OK` at
/// most 4.1 KiB).
pub const MAX_MESSAGE: usize = 8192;
/// Longest id.
pub const MAX_ID: usize = 64;
/// Ids per `LIST_BATCH`: two fds each stays below the kernel's 253 fds per message
/// (`SCM_MAX_FD`, unix(7)).
pub const LIST_BATCH: usize = 64;
/// Longest message text of an `ERROR`.
pub const MAX_TEXT: usize = 512;
/// Longest log dir path in a `HELLO_OK` (`PATH_MAX`).
pub const MAX_PATH: usize = 4096;

/// Kinds of requests.
pub mod kind {
    pub const HELLO: u8 = 1;
    pub const ATTACH: u8 = 2;
    pub const SYNC: u8 = 3;
    pub const DETACH: u8 = 4;
    pub const LIST: u8 = 5;
    pub const SHUTDOWN: u8 = 6;
    pub const HELLO_OK: u8 = 0x81;
    pub const SYNC_OK: u8 = 0x82;
    pub const DETACH_OK: u8 = 0x83;
    pub const LIST_BATCH: u8 = 0x84;
    pub const LIST_END: u8 = 0x85;
    pub const SHUTDOWN_OK: u8 = 0x86;
    pub const ERROR: u8 = 0xff;
}

/// Why the keeper refused a request (the `code` of an `ERROR`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    /// The message could not be decoded (short, trailing bytes, too long, unknown kind).
    BadMessage,
    /// The header's version is not one the keeper speaks.
    Version,
    /// The id is empty, too long, or has a character outside `[A-Za-z0-9_-]`.
    BadId,
    /// The fds do not match the stream bits, or one is not the read end of a pipe.
    BadFds,
    /// The keeper holds as many ids as it may (its capacity, or its fd limit).
    Full,
    /// The id is attached with other pipes.
    Conflict,
    /// The keeper is stopping.
    ShuttingDown,
    /// A code this build does not know (a newer keeper).
    Other(u16),
}

impl ErrorCode {
    pub fn as_u16(self) -> u16 {
        match self {
            ErrorCode::BadMessage => 1,
            ErrorCode::Version => 2,
            ErrorCode::BadId => 3,
            ErrorCode::BadFds => 4,
            ErrorCode::Full => 5,
            ErrorCode::Conflict => 6,
            ErrorCode::ShuttingDown => 7,
            ErrorCode::Other(n) => n,
        }
    }

    pub fn from_u16(n: u16) -> Self {
        match n {
            1 => ErrorCode::BadMessage,
            2 => ErrorCode::Version,
            3 => ErrorCode::BadId,
            4 => ErrorCode::BadFds,
            5 => ErrorCode::Full,
            6 => ErrorCode::Conflict,
            7 => ErrorCode::ShuttingDown,
            n => ErrorCode::Other(n),
        }
    }

    /// A stable snake_case name for logs.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadMessage => "bad_message",
            ErrorCode::Version => "version",
            ErrorCode::BadId => "bad_id",
            ErrorCode::BadFds => "bad_fds",
            ErrorCode::Full => "full",
            ErrorCode::Conflict => "conflict",
            ErrorCode::ShuttingDown => "shutting_down",
            ErrorCode::Other(_) => "other",
        }
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ErrorCode::Other(n) => write!(f, "error {n}"),
            c => f.write_str(c.as_str()),
        }
    }
}

/// A request, as the keeper reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    Hello,
    Attach { id: String, streams: StreamSet },
    Sync { id: String },
    Detach { id: String },
    List,
    Shutdown,
}

/// What `HELLO_OK` says about the keeper.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    /// The protocol version the keeper speaks.
    pub version: u16,
    /// The keeper's pid.
    pub pid: u32,
    /// Its `--max-bytes`.
    pub max_bytes: u64,
    /// How far past `max_bytes` a file may grow before it is trimmed.
    pub slack: u64,
    /// Most ids it accepts (from its fd limit and `--max-ids`).
    pub capacity: u32,
    /// Ids attached now.
    pub attached: u32,
    /// Where it writes.
    pub log_dir: PathBuf,
}

/// Counters of one stream of an id.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StreamStats {
    /// The pipe is still open in the keeper (some writer may still write).
    pub open: bool,
    /// Bytes appended to the file.
    pub written: u64,
    /// Bytes cut from the file's head (or never written because a single read was larger
    /// than the limit) to hold it at its limit.
    pub trimmed: u64,
    /// Bytes read from the pipe and lost to a write error (a full disk, say).
    pub dropped: u64,
}

/// What `SYNC_OK` says.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IdStats {
    /// The id was attached (false: unknown, or all its writers closed and it was forgotten).
    pub attached: bool,
    /// Indexed by [`Stream::index`].
    pub streams: [StreamStats; 2],
}

/// A reply, as the client reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    HelloOk(Hello),
    SyncOk(IdStats),
    DetachOk {
        attached: bool,
    },
    /// Ids and the streams whose read ends follow, in order.
    ListBatch(Vec<(String, StreamSet)>),
    ListEnd {
        total: u32,
    },
    ShutdownOk,
    Error {
        code: ErrorCode,
        id: String,
        message: String,
    },
}

impl Reply {
    /// Whether this is the last message answering its request (a `LIST` is answered by
    /// batches, then `LIST_END`).
    pub fn is_final(&self) -> bool {
        !matches!(self, Reply::ListBatch(_))
    }
}

/// A message that cannot be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {reason}")]
pub struct DecodeError {
    pub code: ErrorCode,
    pub reason: String,
    /// The header's seq, when the header could be read.
    pub seq: Option<u32>,
}

/// Whether `id` may name a process's log files: 1 to 64 bytes of `[A-Za-z0-9_-]`, so
/// `<id>.stdout` is one plain file name.
pub fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_ID
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

fn header(out: &mut Vec<u8>, kind: u8, seq: u32) {
    out.extend_from_slice(&[VERSION, kind, 0, 0]);
    out.extend_from_slice(&seq.to_le_bytes());
}

fn put_id(out: &mut Vec<u8>, id: &str) {
    // Ids are checked before they are encoded; a longer one is cut (and then refused).
    let bytes = &id.as_bytes()[..id.len().min(MAX_ID + 1)];
    out.push(u8::try_from(bytes.len()).unwrap_or(u8::MAX));
    out.extend_from_slice(bytes);
}

/// Encodes a request.
pub fn encode_request(seq: u32, request: &Request) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER + 2 + MAX_ID);
    match request {
        Request::Hello => header(&mut out, kind::HELLO, seq),
        Request::Attach { id, streams } => {
            header(&mut out, kind::ATTACH, seq);
            out.push(streams.bits());
            put_id(&mut out, id);
        }
        Request::Sync { id } => {
            header(&mut out, kind::SYNC, seq);
            put_id(&mut out, id);
        }
        Request::Detach { id } => {
            header(&mut out, kind::DETACH, seq);
            put_id(&mut out, id);
        }
        Request::List => header(&mut out, kind::LIST, seq),
        Request::Shutdown => header(&mut out, kind::SHUTDOWN, seq),
    }
    out
}

/// Encodes a reply.
pub fn encode_reply(seq: u32, reply: &Reply) -> Vec<u8> {
    let mut out = Vec::with_capacity(64);
    match reply {
        Reply::HelloOk(h) => {
            header(&mut out, kind::HELLO_OK, seq);
            out.extend_from_slice(&h.version.to_le_bytes());
            out.extend_from_slice(&h.pid.to_le_bytes());
            out.extend_from_slice(&h.max_bytes.to_le_bytes());
            out.extend_from_slice(&h.slack.to_le_bytes());
            out.extend_from_slice(&h.capacity.to_le_bytes());
            out.extend_from_slice(&h.attached.to_le_bytes());
            let dir = h.log_dir.as_os_str().as_bytes();
            let dir = if dir.len() <= MAX_PATH { dir } else { &[] };
            out.extend_from_slice(&u16::try_from(dir.len()).unwrap_or(0).to_le_bytes());
            out.extend_from_slice(dir);
        }
        Reply::SyncOk(stats) => {
            header(&mut out, kind::SYNC_OK, seq);
            out.push(u8::from(stats.attached));
            for s in &stats.streams {
                out.push(u8::from(s.open));
                out.extend_from_slice(&s.written.to_le_bytes());
                out.extend_from_slice(&s.trimmed.to_le_bytes());
                out.extend_from_slice(&s.dropped.to_le_bytes());
            }
        }
        Reply::DetachOk { attached } => {
            header(&mut out, kind::DETACH_OK, seq);
            out.push(u8::from(*attached));
        }
        Reply::ListBatch(entries) => {
            header(&mut out, kind::LIST_BATCH, seq);
            let n = entries.len().min(LIST_BATCH);
            out.extend_from_slice(&u16::try_from(n).unwrap_or(0).to_le_bytes());
            for (id, streams) in &entries[..n] {
                out.push(streams.bits());
                put_id(&mut out, id);
            }
        }
        Reply::ListEnd { total } => {
            header(&mut out, kind::LIST_END, seq);
            out.extend_from_slice(&total.to_le_bytes());
        }
        Reply::ShutdownOk => header(&mut out, kind::SHUTDOWN_OK, seq),
        Reply::Error { code, id, message } => {
            header(&mut out, kind::ERROR, seq);
            out.extend_from_slice(&code.as_u16().to_le_bytes());
            put_id(&mut out, if id.len() <= MAX_ID { id } else { "" });
            let mut end = message.len().min(MAX_TEXT);
            while !message.is_char_boundary(end) {
                end -= 1;
            }
            let text = &message.as_bytes()[..end];
            out.extend_from_slice(&u16::try_from(text.len()).unwrap_or(0).to_le_bytes());
            out.extend_from_slice(text);
        }
    }
    out
}

/// A reader over a message body.
struct Cursor<'a> {
    rest: &'a [u8],
    seq: u32,
}

impl<'a> Cursor<'a> {
    fn err(&self, code: ErrorCode, reason: impl Into<String>) -> DecodeError {
        DecodeError {
            code,
            reason: reason.into(),
            seq: Some(self.seq),
        }
    }

    fn bytes(&mut self, n: usize, what: &str) -> Result<&'a [u8], DecodeError> {
        if self.rest.len() < n {
            return Err(self.err(ErrorCode::BadMessage, format!("message ends inside {what}")));
        }
        let (head, tail) = self.rest.split_at(n);
        self.rest = tail;
        Ok(head)
    }

    fn u8(&mut self, what: &str) -> Result<u8, DecodeError> {
        Ok(self.bytes(1, what)?[0])
    }

    fn u16(&mut self, what: &str) -> Result<u16, DecodeError> {
        let b = self.bytes(2, what)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }

    fn u32(&mut self, what: &str) -> Result<u32, DecodeError> {
        let b = self.bytes(4, what)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn u64(&mut self, what: &str) -> Result<u64, DecodeError> {
        let b = self.bytes(8, what)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }

    /// An id; `allow_empty` for the id of an `ERROR`.
    fn id(&mut self, allow_empty: bool) -> Result<String, DecodeError> {
        let len = usize::from(self.u8("the id length")?);
        let bytes = self.bytes(len, "the id")?;
        let id = std::str::from_utf8(bytes)
            .ok()
            .filter(|s| (allow_empty && s.is_empty()) || valid_id(s))
            .ok_or_else(|| {
                self.err(
                    ErrorCode::BadId,
                    format!(
                        "id {:?} is not 1 to {MAX_ID} characters of [A-Za-z0-9_-]",
                        String::from_utf8_lossy(bytes)
                    ),
                )
            })?;
        Ok(id.to_owned())
    }

    fn streams(&mut self) -> Result<StreamSet, DecodeError> {
        let bits = self.u8("the stream bits")?;
        StreamSet::from_bits(bits)
            .ok_or_else(|| self.err(ErrorCode::BadMessage, format!("stream bits {bits:#04x}")))
    }

    fn end(&self) -> Result<(), DecodeError> {
        if self.rest.is_empty() {
            Ok(())
        } else {
            Err(self.err(
                ErrorCode::BadMessage,
                format!("{} bytes after the end of the message", self.rest.len()),
            ))
        }
    }
}

/// Reads the header: (kind, seq, body).
fn split_header(msg: &[u8]) -> Result<(u8, u32, &[u8]), DecodeError> {
    if msg.len() < HEADER {
        return Err(DecodeError {
            code: ErrorCode::BadMessage,
            reason: format!("{} bytes is shorter than a header", msg.len()),
            seq: None,
        });
    }
    let seq = u32::from_le_bytes([msg[4], msg[5], msg[6], msg[7]]);
    if msg[0] != VERSION {
        return Err(DecodeError {
            code: ErrorCode::Version,
            reason: format!("protocol version {} (this keeper speaks {VERSION})", msg[0]),
            seq: Some(seq),
        });
    }
    if msg[2] != 0 || msg[3] != 0 {
        return Err(DecodeError {
            code: ErrorCode::BadMessage,
            reason: "reserved header bytes are not zero".into(),
            seq: Some(seq),
        });
    }
    Ok((msg[1], seq, &msg[HEADER..]))
}

/// Decodes a request: its seq and what it asks.
pub fn decode_request(msg: &[u8]) -> Result<(u32, Request), DecodeError> {
    let (kind, seq, body) = split_header(msg)?;
    let mut c = Cursor { rest: body, seq };
    let request = match kind {
        kind::HELLO => Request::Hello,
        kind::ATTACH => {
            let streams = c.streams()?;
            let id = c.id(false)?;
            Request::Attach { id, streams }
        }
        kind::SYNC => Request::Sync { id: c.id(false)? },
        kind::DETACH => Request::Detach { id: c.id(false)? },
        kind::LIST => Request::List,
        kind::SHUTDOWN => Request::Shutdown,
        other => {
            return Err(c.err(
                ErrorCode::BadMessage,
                format!("unknown request kind {other}"),
            ));
        }
    };
    c.end()?;
    Ok((seq, request))
}

/// Decodes a reply: its seq and what it says. Bytes past the fields this build knows are
/// ignored (a newer keeper may add some).
pub fn decode_reply(msg: &[u8]) -> Result<(u32, Reply), DecodeError> {
    let (kind, seq, body) = split_header(msg)?;
    let mut c = Cursor { rest: body, seq };
    let reply = match kind {
        kind::HELLO_OK => Reply::HelloOk(Hello {
            version: c.u16("the version")?,
            pid: c.u32("the pid")?,
            max_bytes: c.u64("max_bytes")?,
            slack: c.u64("slack")?,
            capacity: c.u32("capacity")?,
            attached: c.u32("attached")?,
            log_dir: {
                let len = usize::from(c.u16("the log dir length")?);
                PathBuf::from(OsString::from_vec(c.bytes(len, "the log dir")?.to_vec()))
            },
        }),
        kind::SYNC_OK => {
            let attached = c.u8("attached")? != 0;
            let mut streams = [StreamStats::default(); 2];
            for s in &mut streams {
                *s = StreamStats {
                    open: c.u8("open")? != 0,
                    written: c.u64("written")?,
                    trimmed: c.u64("trimmed")?,
                    dropped: c.u64("dropped")?,
                };
            }
            Reply::SyncOk(IdStats { attached, streams })
        }
        kind::DETACH_OK => Reply::DetachOk {
            attached: c.u8("attached")? != 0,
        },
        kind::LIST_BATCH => {
            let n = usize::from(c.u16("the count")?);
            if n > LIST_BATCH {
                return Err(c.err(ErrorCode::BadMessage, format!("{n} ids in one batch")));
            }
            let mut entries = Vec::with_capacity(n);
            for _ in 0..n {
                let streams = c.streams()?;
                entries.push((c.id(false)?, streams));
            }
            Reply::ListBatch(entries)
        }
        kind::LIST_END => Reply::ListEnd {
            total: c.u32("the total")?,
        },
        kind::SHUTDOWN_OK => Reply::ShutdownOk,
        kind::ERROR => {
            let code = ErrorCode::from_u16(c.u16("the code")?);
            let id = c.id(true)?;
            let len = usize::from(c.u16("the text length")?);
            let message = String::from_utf8_lossy(c.bytes(len, "the text")?).into_owned();
            Reply::Error { code, id, message }
        }
        other => {
            return Err(c.err(ErrorCode::BadMessage, format!("unknown reply kind {other}")));
        }
    };
    Ok((seq, reply))
}

impl Stream {
    /// The bit of this stream in a [`StreamSet`].
    pub(crate) fn bit(self) -> u8 {
        1 << self.index()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn both() -> StreamSet {
        StreamSet::BOTH
    }

    #[test]
    fn requests_round_trip() {
        let cases = [
            Request::Hello,
            Request::Attach {
                id: "0123456789abcdef".into(),
                streams: both(),
            },
            Request::Attach {
                id: "x".into(),
                streams: StreamSet::only(Stream::Stderr),
            },
            Request::Sync {
                id: "a-b_C".repeat(12),
            },
            Request::Detach { id: "z".into() },
            Request::List,
            Request::Shutdown,
        ];
        for (seq, request) in cases.into_iter().enumerate() {
            let seq = u32::try_from(seq).unwrap() * 1_000_003;
            let bytes = encode_request(seq, &request);
            assert!(bytes.len() <= MAX_MESSAGE);
            assert_eq!(decode_request(&bytes).unwrap(), (seq, request));
        }
    }

    #[test]
    fn replies_round_trip() {
        let stats = IdStats {
            attached: true,
            streams: [
                StreamStats {
                    open: true,
                    written: 1,
                    trimmed: u64::MAX,
                    dropped: 7,
                },
                StreamStats::default(),
            ],
        };
        let batch: Vec<(String, StreamSet)> = (0..LIST_BATCH)
            .map(|i| (format!("{i:0>64}"), both()))
            .collect();
        let cases = [
            Reply::HelloOk(Hello {
                version: 1,
                pid: 42,
                max_bytes: 1 << 20,
                slack: 1 << 18,
                capacity: 9,
                attached: 3,
                log_dir: PathBuf::from("/var/lib/subidd/logs"),
            }),
            Reply::SyncOk(stats),
            Reply::DetachOk { attached: false },
            Reply::ListBatch(batch),
            Reply::ListEnd { total: 5 },
            Reply::ShutdownOk,
            Reply::Error {
                code: ErrorCode::Full,
                id: "abc".into(),
                message: "keeper full".into(),
            },
            Reply::Error {
                code: ErrorCode::Other(999),
                id: String::new(),
                message: String::new(),
            },
        ];
        for reply in cases {
            let bytes = encode_reply(77, &reply);
            assert!(bytes.len() <= MAX_MESSAGE, "{} bytes", bytes.len());
            assert_eq!(decode_reply(&bytes).unwrap(), (77, reply));
        }
    }

    #[test]
    fn an_error_text_is_cut_on_a_char_boundary() {
        let long = "é".repeat(MAX_TEXT);
        let bytes = encode_reply(
            1,
            &Reply::Error {
                code: ErrorCode::BadFds,
                id: String::new(),
                message: long,
            },
        );
        let (_, Reply::Error { message, .. }) = decode_reply(&bytes).unwrap() else {
            panic!("not an error");
        };
        assert!(message.len() <= MAX_TEXT && message.chars().all(|c| c == 'é'));
    }

    #[test]
    fn bad_requests_are_refused_with_a_code_and_their_seq() {
        let ok = encode_request(9, &Request::Sync { id: "abc".into() });
        let mut version = ok.clone();
        version[0] = 2;
        let mut reserved = ok.clone();
        reserved[3] = 1;
        let mut trailing = ok.clone();
        trailing.push(0);
        let mut unknown = ok.clone();
        unknown[1] = 0x40;
        let mut long_len = ok.clone();
        long_len[HEADER] = 200;
        let mut slash = ok.clone();
        slash[HEADER + 1] = b'/';
        let dots = {
            let mut m = ok[..HEADER].to_vec();
            m.extend_from_slice(&[2, b'.', b'.']);
            m
        };
        let empty = {
            let mut m = ok[..HEADER].to_vec();
            m.push(0);
            m
        };
        let mut attach_bits = encode_request(
            9,
            &Request::Attach {
                id: "a".into(),
                streams: both(),
            },
        );
        attach_bits[HEADER] = 0;
        let cases: [(&[u8], ErrorCode, Option<u32>); 11] = [
            (&[], ErrorCode::BadMessage, None),
            (&ok[..5], ErrorCode::BadMessage, None),
            (&version, ErrorCode::Version, Some(9)),
            (&reserved, ErrorCode::BadMessage, Some(9)),
            (&trailing, ErrorCode::BadMessage, Some(9)),
            (&unknown, ErrorCode::BadMessage, Some(9)),
            (&long_len, ErrorCode::BadMessage, Some(9)),
            (&slash, ErrorCode::BadId, Some(9)),
            (&dots, ErrorCode::BadId, Some(9)),
            (&empty, ErrorCode::BadId, Some(9)),
            (&attach_bits, ErrorCode::BadMessage, Some(9)),
        ];
        for (bytes, code, seq) in cases {
            let err = decode_request(bytes).unwrap_err();
            assert_eq!((err.code, err.seq), (code, seq), "{bytes:?}: {err}");
        }
    }

    #[test]
    fn every_prefix_of_a_message_fails_cleanly() {
        let request = encode_request(
            1,
            &Request::Attach {
                id: "abcdef".into(),
                streams: both(),
            },
        );
        for end in 0..request.len() {
            assert!(decode_request(&request[..end]).is_err(), "{end}");
        }
        let replies = [
            encode_reply(2, &Reply::SyncOk(IdStats::default())),
            encode_reply(
                3,
                &Reply::ListBatch(vec![("a".into(), both()), ("b".into(), both())]),
            ),
            encode_reply(
                4,
                &Reply::Error {
                    code: ErrorCode::Conflict,
                    id: "a".into(),
                    message: "m".into(),
                },
            ),
            encode_reply(5, &Reply::ListEnd { total: 1 }),
        ];
        for m in &replies {
            for end in 0..m.len() {
                assert!(decode_reply(&m[..end]).is_err(), "{m:?} cut at {end}");
            }
        }
    }

    #[test]
    fn ids_are_plain_file_name_parts() {
        for good in ["a", "0123456789abcdef", "A_b-9", &"x".repeat(MAX_ID)] {
            assert!(valid_id(good), "{good}");
        }
        for bad in [
            "",
            ".",
            "..",
            "a/b",
            "a.b",
            "a b",
            "é",
            &"x".repeat(MAX_ID + 1),
        ] {
            assert!(!valid_id(bad), "{bad}");
        }
    }
}
