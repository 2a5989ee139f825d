//! The event feed behind `GET /v1/events`: committed history rows, published live after each
//! commit and replayed from the database on request.
//!
//! The writer task owns a [`Publisher`]: after every commit it reads the event rows with an id
//! above the last one it published (the store writes them in the same transaction as the
//! change, process events by trigger) and sends each, rendered once, on a bounded broadcast
//! channel. A stream ([`Cursor`]) subscribes *before* it reads the backlog from the database,
//! so every event is in one or the other; ids it has already sent are skipped, so none comes
//! twice. A stream that falls more than [`LIVE_BUFFER`] events behind is not waited for: it
//! re-reads what it missed from the database and carries on. Nothing here can block the writer.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::time::Duration;

use axum::body::Bytes;
use subid_store::{EventRecord, Store};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, broadcast, watch};

use crate::metrics::Metrics;

/// Events a live stream may fall behind before it catches up from the database.
pub const LIVE_BUFFER: usize = 1024;
/// Event rows read per database query.
pub const PAGE: u32 = 500;
/// Most concurrent `GET /v1/events` streams.
pub const MAX_STREAMS: usize = 64;
/// How late the events of process rows may be published (counted in `/metrics`) while no
/// stream follows the feed: see [`EventFeed::publish_soon`].
pub const PUBLISH_LATER: Duration = Duration::from_millis(500);

/// One published event: its id, lease and rendered NDJSON line.
#[derive(Debug)]
pub struct FeedEvent {
    pub id: i64,
    pub lease: String,
    pub line: Bytes,
}

/// Handle to the live feed; cheap to clone.
#[derive(Clone, Debug)]
pub struct EventFeed {
    inner: Arc<FeedInner>,
}

#[derive(Debug)]
struct FeedInner {
    tx: broadcast::Sender<Arc<FeedEvent>>,
    /// The newest id published.
    last: AtomicI64,
    /// Events were committed that no poke has announced (see [`EventFeed::publish_soon`]).
    later: AtomicBool,
    streams: Arc<Semaphore>,
    closed: watch::Sender<bool>,
}

impl EventFeed {
    /// A feed whose history ends at `last` (the newest stored event id).
    pub fn new(last: i64) -> EventFeed {
        let (tx, _) = broadcast::channel(LIVE_BUFFER);
        let (closed, _) = watch::channel(false);
        EventFeed {
            inner: Arc::new(FeedInner {
                tx,
                later: AtomicBool::new(false),
                last: AtomicI64::new(last),
                streams: Arc::new(Semaphore::new(MAX_STREAMS)),
                closed,
            }),
        }
    }

    /// The newest id published so far.
    pub fn last_id(&self) -> i64 {
        self.inner.last.load(Ordering::Acquire)
    }

    /// After a commit that only the live streams and the metrics need to hear of soon (a
    /// process row, written on the spawn path): the publisher is poked at once while a stream
    /// is open, and otherwise finds it within [`PUBLISH_LATER`], so that no other thread is
    /// woken (and no read of the events runs) while a spawn is answered. A stream opened
    /// meanwhile reads the rows from the database.
    pub fn publish_soon(&self, poke: &Notify) {
        if self.streams() > 0 {
            poke.notify_one();
        } else {
            self.inner.later.store(true, Ordering::Release);
        }
    }

    /// Clients following the feed now.
    pub fn streams(&self) -> usize {
        MAX_STREAMS.saturating_sub(self.inner.streams.available_permits())
    }

    /// Ends every stream (at shutdown: a graceful stop waits for open responses).
    pub fn close(&self) {
        self.inner.closed.send_replace(true);
    }

    /// A stream of the events after `since` (`None`: after the newest one now), live when
    /// `follow`, only those of `lease` when given. `None` when [`MAX_STREAMS`] are open.
    pub fn cursor(
        &self,
        store: Store,
        since: Option<i64>,
        follow: bool,
        lease: Option<String>,
        metrics: Arc<Metrics>,
    ) -> Option<Cursor> {
        let permit = Arc::clone(&self.inner.streams).try_acquire_owned().ok()?;
        // Subscribe first, then read where to start: nothing committed later can be missed.
        let rx = self.inner.tx.subscribe();
        let last = since.unwrap_or_else(|| self.last_id());
        Some(Cursor {
            store,
            rx,
            closed: self.inner.closed.subscribe(),
            last,
            follow,
            lease,
            pending: VecDeque::new(),
            mode: Mode::Backlog,
            metrics,
            _permit: permit,
        })
    }
}

/// Publishes what each commit added, from a task of its own: the writer only pokes it after
/// answering a group, so no client waits for the events to be read back. One writer commits in
/// id order, so reading `id > last` from a read connection after a commit never skips a row.
pub struct Publisher {
    feed: EventFeed,
    metrics: Arc<Metrics>,
    store: Store,
    last: i64,
    poke: Arc<Notify>,
}

impl Publisher {
    pub fn new(feed: EventFeed, metrics: Arc<Metrics>, store: Store) -> Publisher {
        let last = feed.last_id();
        Publisher {
            feed,
            metrics,
            store,
            last,
            poke: Arc::new(Notify::new()),
        }
    }

    /// What the writer calls after each commit.
    pub fn poke(&self) -> Arc<Notify> {
        Arc::clone(&self.poke)
    }

    /// Publishes after every poke (a poke while it works is kept for the next turn); runs until
    /// the task is dropped.
    pub async fn run(mut self) {
        loop {
            tokio::select! {
                () = self.poke.notified() => {}
                () = tokio::time::sleep(PUBLISH_LATER) => {
                    if !self.feed.inner.later.load(Ordering::Acquire) {
                        continue;
                    }
                }
            }
            // Whatever was left for later is read now too.
            self.feed.inner.later.store(false, Ordering::Release);
            self.publish_new().await;
        }
    }

    /// Reads the events committed since the last turn and publishes them in id order. A read
    /// failure is logged and retried after the next commit; the rows stay in the database.
    async fn publish_new(&mut self) {
        loop {
            let page = match self.store.events_after(self.last, PAGE).await {
                Ok(page) => page,
                Err(error) => {
                    tracing::warn!(%error, "cannot read new events for the feed; retrying after the next commit");
                    return;
                }
            };
            let full = page.len() == PAGE as usize;
            for event in page {
                self.metrics.count_event(&event.kind);
                self.last = event.id;
                if self.feed.inner.tx.receiver_count() > 0 {
                    // No subscriber: the send would fail; nobody misses the rendering.
                    let _ = self.feed.inner.tx.send(Arc::new(FeedEvent {
                        id: event.id,
                        lease: event.lease_name.clone(),
                        line: render(&event),
                    }));
                }
            }
            self.feed.inner.last.store(self.last, Ordering::Release);
            if !full {
                return;
            }
        }
    }
}

/// The `type` of an event as the API names it.
pub fn event_type(kind: &str) -> &'static str {
    match kind {
        "create" => "lease.created",
        "renew" => "lease.renewed",
        "release" => "lease.released",
        "expire" => "lease.expired",
        "purge" => "lease.purged",
        "process_start" => "process.started",
        "process_exit" => "process.exited",
        "process_lost" => "process.lost",
        _ => "other",
    }
}

/// One line of the feed, fields in this order.
#[derive(serde::Serialize)]
struct Line<'a> {
    id: i64,
    #[serde(rename = "type")]
    kind: &'static str,
    at: String,
    lease: &'a str,
    caller_uid: Option<u32>,
    details: serde_json::Value,
}

/// One NDJSON line: `{"id","type","at","lease","caller_uid","details"}` and a newline.
pub fn render(event: &EventRecord) -> Bytes {
    let mut details = event
        .detail
        .as_deref()
        .and_then(|d| serde_json::from_str::<serde_json::Value>(d).ok())
        .unwrap_or_else(|| serde_json::json!({}));
    // Times are stored as unix milliseconds and shown as RFC 3339, as everywhere in the API.
    if let Some(at) = details.get_mut("expires_at")
        && let Some(ms) = at.as_i64()
    {
        *at = serde_json::Value::String(crate::wire::rfc3339(ms));
    }
    let line = Line {
        id: event.id,
        kind: event_type(&event.kind),
        at: crate::wire::rfc3339(event.at),
        lease: &event.lease_name,
        caller_uid: event.caller_uid,
        details,
    };
    // Serialising plain data to a Vec cannot fail; an empty line would be skipped by readers.
    let mut bytes = serde_json::to_vec(&line).unwrap_or_default();
    bytes.push(b'\n');
    Bytes::from(bytes)
}

/// An error line, the last line of a stream that cannot go on.
fn error_line(code: &str, message: &str) -> Bytes {
    let mut line =
        serde_json::json!({ "type": "error", "code": code, "message": message }).to_string();
    line.push('\n');
    Bytes::from(line)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Backlog,
    Live,
    Done,
}

/// One client's position in the feed.
pub struct Cursor {
    store: Store,
    rx: broadcast::Receiver<Arc<FeedEvent>>,
    closed: watch::Receiver<bool>,
    /// The newest id handled (sent or filtered out).
    last: i64,
    follow: bool,
    lease: Option<String>,
    pending: VecDeque<Bytes>,
    mode: Mode,
    metrics: Arc<Metrics>,
    _permit: OwnedSemaphorePermit,
}

impl Cursor {
    /// The next line of the stream; `None` at its end.
    pub async fn next_line(&mut self) -> Option<Bytes> {
        loop {
            if let Some(line) = self.pending.pop_front() {
                return Some(line);
            }
            match self.mode {
                Mode::Done => return None,
                Mode::Backlog => self.read_backlog().await,
                Mode::Live => self.wait_live().await,
            }
        }
    }

    fn wanted(&self, lease: &str) -> bool {
        self.lease.as_deref().is_none_or(|l| l == lease)
    }

    async fn read_backlog(&mut self) {
        match self.store.events_after(self.last, PAGE).await {
            Ok(page) => {
                if page.len() < PAGE as usize {
                    self.mode = if self.follow { Mode::Live } else { Mode::Done };
                }
                for event in page {
                    self.last = event.id;
                    if self.wanted(&event.lease_name) {
                        self.pending.push_back(render(&event));
                    }
                }
            }
            Err(error) => {
                tracing::warn!(%error, "event stream cannot read the backlog");
                self.pending.push_back(error_line(
                    "unavailable",
                    &format!(
                        "cannot read events from the database; resume with ?since={}",
                        self.last
                    ),
                ));
                self.mode = Mode::Done;
            }
        }
    }

    async fn wait_live(&mut self) {
        if *self.closed.borrow() {
            self.mode = Mode::Done;
            return;
        }
        tokio::select! {
            _ = self.closed.changed() => self.mode = Mode::Done,
            received = self.rx.recv() => match received {
                Ok(event) => {
                    if event.id > self.last {
                        self.last = event.id;
                        if self.wanted(&event.lease) {
                            self.pending.push_back(event.line.clone());
                        }
                    }
                }
                Err(broadcast::error::RecvError::Lagged(_)) => {
                    // Too slow for the live buffer: what was missed is in the database.
                    self.metrics.count_feed_catch_up();
                    self.mode = Mode::Backlog;
                }
                Err(broadcast::error::RecvError::Closed) => self.mode = Mode::Done,
            },
        }
    }

    /// The cursor as a response body stream.
    pub fn into_stream(
        self,
    ) -> impl futures_util::Stream<Item = Result<Bytes, Infallible>> + Send + 'static {
        futures_util::stream::unfold(self, |mut cursor| async move {
            let line = cursor.next_line().await?;
            Some((Ok(line), cursor))
        })
    }
}
