//! Prometheus metrics: a small registry of counters and histograms, rendered in the text
//! exposition format 0.0.4 for `GET /metrics`.
//!
//! Hand-written rather than a crate: the set is small and fixed, and the output must be the
//! classic text format (`prometheus-client` writes OpenMetrics, whose counter names differ).
//! Every label set is bounded: routes are axum's route templates (never raw paths), methods
//! and error codes come from fixed lists, statuses are three digits. Gauges that the daemon
//! already knows (pool blocks, active leases, running processes) are read at scrape time.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use subid_core::PoolCounts;

/// The content type of the text exposition format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Spawn latency buckets, seconds: a spawn takes about a millisecond.
pub const SPAWN_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
];
/// Request latency buckets, seconds.
pub const HTTP_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];
/// The route label of requests that matched no route (404s of unknown paths).
pub const UNMATCHED: &str = "unmatched";

/// Counters named after the feed's event kinds: `(store kind, metric, help)`.
const EVENT_COUNTERS: &[(&str, &str, &str)] = &[
    ("create", "subidd_leases_created_total", "Leases created."),
    ("renew", "subidd_leases_renewed_total", "Lease renewals."),
    (
        "release",
        "subidd_leases_released_total",
        "Leases released by a client.",
    ),
    (
        "expire",
        "subidd_leases_expired_total",
        "Leases released because their ttl ran out.",
    ),
    (
        "purge",
        "subidd_leases_purged_total",
        "Released ranges taken out of quarantine early.",
    ),
    (
        "process_start",
        "subidd_processes_started_total",
        "Processes started and recorded.",
    ),
    (
        "process_exit",
        "subidd_processes_exited_total",
        "Processes whose exit was recorded.",
    ),
    (
        "process_lost",
        "subidd_processes_lost_total",
        "Processes that vanished while the daemon was not watching.",
    ),
];

/// A histogram with fixed buckets; `counts[i]` holds observations in bucket `i` only.
#[derive(Debug, Clone)]
struct Histogram {
    bounds: &'static [f64],
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Histogram {
        Histogram {
            bounds,
            counts: vec![0; bounds.len()],
            sum: 0.0,
            count: 0,
        }
    }

    fn observe(&mut self, seconds: f64) {
        if let Some(i) = self.bounds.iter().position(|&b| seconds <= b)
            && let Some(slot) = self.counts.get_mut(i)
        {
            *slot += 1;
        }
        self.sum += seconds;
        self.count += 1;
    }

    fn render(&self, out: &mut String, name: &str, labels: &[(&str, &str)]) {
        let mut cumulative = 0u64;
        for (bound, count) in self.bounds.iter().zip(&self.counts) {
            cumulative += count;
            let le = bound.to_string();
            sample(
                out,
                &format!("{name}_bucket"),
                &with(labels, ("le", &le)),
                cumulative,
            );
        }
        sample(
            out,
            &format!("{name}_bucket"),
            &with(labels, ("le", "+Inf")),
            self.count,
        );
        sample(out, &format!("{name}_sum"), labels, self.sum);
        sample(out, &format!("{name}_count"), labels, self.count);
    }
}

#[derive(Debug)]
struct Inner {
    events: BTreeMap<&'static str, u64>,
    spawns: u64,
    spawn_failures: BTreeMap<&'static str, u64>,
    spawn_seconds: Histogram,
    /// (route, method, status) -> requests.
    requests: BTreeMap<(String, &'static str, u16), u64>,
    /// (route, method) -> latency.
    request_seconds: BTreeMap<(String, &'static str), Histogram>,
    errors: BTreeMap<&'static str, u64>,
    feed_catch_ups: u64,
}

/// The daemon's counters and histograms; one per daemon, shared by handle.
#[derive(Debug)]
pub struct Metrics {
    started: SystemTime,
    inner: Mutex<Inner>,
    /// The lease store's back end, and whether it answered when last used.
    store: Mutex<(&'static str, bool)>,
}

/// What is read at scrape time.
#[derive(Debug, Clone, Copy)]
pub struct Snapshot {
    pub pool: PoolCounts,
    pub leases_active: u64,
    pub processes_running: usize,
    pub event_streams: usize,
    /// Claims of other id owners on active leases (`GET /v1/pool` warnings).
    pub pool_conflicts: usize,
    /// Pool blocks withheld because a live process holds their ids (`GET /v1/pool` warnings).
    pub pool_process_holds: usize,
}

impl Default for Metrics {
    fn default() -> Metrics {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        Metrics {
            started: SystemTime::now(),
            inner: Mutex::new(Inner {
                events: BTreeMap::new(),
                spawns: 0,
                spawn_failures: BTreeMap::new(),
                spawn_seconds: Histogram::new(SPAWN_BUCKETS),
                requests: BTreeMap::new(),
                request_seconds: BTreeMap::new(),
                errors: BTreeMap::new(),
                feed_catch_ups: 0,
            }),
            store: Mutex::new(("sqlite", true)),
        }
    }

    /// Names the lease store's back end and whether it answers.
    pub fn set_store(&self, backend: &'static str, up: bool) {
        *self.store.lock().unwrap_or_else(|e| e.into_inner()) = (backend, up);
    }

    /// Whether the lease store answered when last used.
    pub fn set_store_up(&self, up: bool) {
        self.store.lock().unwrap_or_else(|e| e.into_inner()).1 = up;
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // Counters stay meaningful after a panic elsewhere; take the lock over.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Counts a committed event of the store's `kind` (unknown kinds are not counted).
    pub fn count_event(&self, kind: &str) {
        if let Some((known, _, _)) = EVENT_COUNTERS.iter().find(|(k, _, _)| *k == kind) {
            *self.lock().events.entry(known).or_default() += 1;
        }
    }

    /// Counts a spawn attempt; a success also goes into the latency histogram.
    pub fn observe_spawn(&self, elapsed: Duration, failure: Option<&'static str>) {
        let mut inner = self.lock();
        inner.spawns += 1;
        match failure {
            None => inner.spawn_seconds.observe(elapsed.as_secs_f64()),
            Some(code) => *inner.spawn_failures.entry(code).or_default() += 1,
        }
    }

    /// Counts an answered request. `route` must be a route template or [`UNMATCHED`].
    pub fn observe_request(
        &self,
        route: &str,
        method: &'static str,
        status: u16,
        elapsed: Duration,
        error: Option<&'static str>,
    ) {
        let mut inner = self.lock();
        *inner
            .requests
            .entry((route.to_string(), method, status))
            .or_default() += 1;
        inner
            .request_seconds
            .entry((route.to_string(), method))
            .or_insert_with(|| Histogram::new(HTTP_BUCKETS))
            .observe(elapsed.as_secs_f64());
        if let Some(code) = error {
            *inner.errors.entry(code).or_default() += 1;
        }
    }

    /// Counts an event stream that fell behind the live feed and re-read the database.
    pub fn count_feed_catch_up(&self) {
        self.lock().feed_catch_ups += 1;
    }

    /// The whole registry in the text exposition format.
    pub fn render(&self, now: &Snapshot) -> String {
        let mut out = String::with_capacity(8192);
        header(
            &mut out,
            "subidd_build_info",
            "gauge",
            "Version of the running daemon; always 1.",
        );
        sample(
            &mut out,
            "subidd_build_info",
            &[
                ("version", env!("CARGO_PKG_VERSION")),
                ("api_version", crate::wire::API_VERSION),
            ],
            1,
        );
        gauge(
            &mut out,
            "subidd_start_time_seconds",
            "Unix time the daemon started.",
            self.started
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default()
                .as_secs(),
        );
        let (backend, up) = *self.store.lock().unwrap_or_else(|e| e.into_inner());
        header(
            &mut out,
            "subidd_store_up",
            "gauge",
            "1 while the lease store answers, 0 while it cannot be reached (lease writes then answer 503 store_unavailable).",
        );
        sample(
            &mut out,
            "subidd_store_up",
            &[("backend", backend)],
            u8::from(up),
        );
        header(
            &mut out,
            "subidd_pool_blocks",
            "gauge",
            "Blocks of the pool by state: free, active (held by a lease), quarantined (released, withheld from other names), withheld (another id owner claims their ids).",
        );
        for (state, value) in [
            ("free", now.pool.free),
            ("active", now.pool.active),
            ("quarantined", now.pool.quarantined),
            ("withheld", now.pool.withheld),
        ] {
            sample(&mut out, "subidd_pool_blocks", &[("state", state)], value);
        }
        gauge(
            &mut out,
            "subidd_pool_capacity_blocks",
            "All blocks of the pool.",
            now.pool.total,
        );
        gauge(
            &mut out,
            "subidd_leases_active",
            "Active leases.",
            now.leases_active,
        );
        gauge(
            &mut out,
            "subidd_processes_running",
            "Processes the daemon watches now.",
            now.processes_running,
        );
        gauge(
            &mut out,
            "subidd_pool_conflicts",
            "Claims of other id owners (/etc/subuid lines, host users) on ids of active leases; see GET /v1/pool warnings. Should be 0.",
            now.pool_conflicts,
        );
        gauge(
            &mut out,
            "subidd_pool_blocks_held_by_processes",
            "Pool blocks not leased whose ids a live process holds; withheld until it is gone (see GET /v1/pool warnings). Should be 0.",
            now.pool_process_holds,
        );
        gauge(
            &mut out,
            "subidd_event_streams",
            "Clients following GET /v1/events now.",
            now.event_streams,
        );
        let inner = self.lock();
        for (kind, name, help) in EVENT_COUNTERS {
            counter(
                &mut out,
                name,
                help,
                inner.events.get(kind).copied().unwrap_or(0),
            );
        }
        counter(
            &mut out,
            "subidd_spawns_total",
            "Spawn requests that reached the process service, successful or not.",
            inner.spawns,
        );
        by_code(
            &mut out,
            "subidd_spawn_failures_total",
            "Failed spawns by error code.",
            &inner.spawn_failures,
        );
        header(
            &mut out,
            "subidd_spawn_duration_seconds",
            "histogram",
            "Time from a spawn request to the recorded running process (successful spawns).",
        );
        inner
            .spawn_seconds
            .render(&mut out, "subidd_spawn_duration_seconds", &[]);
        header(
            &mut out,
            "subidd_http_requests_total",
            "counter",
            "Answered requests by route template, method and status.",
        );
        for ((route, method, status), value) in &inner.requests {
            let status = status.to_string();
            sample(
                &mut out,
                "subidd_http_requests_total",
                &[("method", method), ("route", route), ("status", &status)],
                value,
            );
        }
        header(
            &mut out,
            "subidd_http_request_duration_seconds",
            "histogram",
            "Time to answer a request (to the response head; streams run on), by route template and method.",
        );
        for ((route, method), histogram) in &inner.request_seconds {
            histogram.render(
                &mut out,
                "subidd_http_request_duration_seconds",
                &[("method", method), ("route", route)],
            );
        }
        by_code(
            &mut out,
            "subidd_http_errors_total",
            "Error answers by stable error code.",
            &inner.errors,
        );
        counter(
            &mut out,
            "subidd_event_stream_catch_ups_total",
            "Times an event stream fell behind the live feed and re-read the database.",
            inner.feed_catch_ups,
        );
        out
    }
}

/// The method label: the standard methods, else `other` (no unbounded label values).
pub fn method_label(method: &axum::http::Method) -> &'static str {
    use axum::http::Method;
    match *method {
        Method::GET => "GET",
        Method::HEAD => "HEAD",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::PATCH => "PATCH",
        Method::OPTIONS => "OPTIONS",
        _ => "other",
    }
}

fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    // HELP text escapes only backslash and newline; ours has neither.
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

fn gauge(out: &mut String, name: &str, help: &str, value: impl std::fmt::Display) {
    header(out, name, "gauge", help);
    sample(out, name, &[], value);
}

fn counter(out: &mut String, name: &str, help: &str, value: u64) {
    header(out, name, "counter", help);
    sample(out, name, &[], value);
}

/// A counter with one series per error code.
fn by_code(out: &mut String, name: &str, help: &str, counts: &BTreeMap<&'static str, u64>) {
    header(out, name, "counter", help);
    for (code, value) in counts {
        sample(out, name, &[("code", code)], value);
    }
}

fn sample(out: &mut String, name: &str, labels: &[(&str, &str)], value: impl std::fmt::Display) {
    out.push_str(name);
    if !labels.is_empty() {
        out.push('{');
        for (i, (key, value)) in labels.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            out.push_str(key);
            out.push_str("=\"");
            escape_label(out, value);
            out.push('"');
        }
        out.push('}');
    }
    let _ = writeln!(out, " {value}");
}

fn with<'a>(labels: &[(&'a str, &'a str)], extra: (&'a str, &'a str)) -> Vec<(&'a str, &'a str)> {
    let mut all = labels.to_vec();
    all.push(extra);
    all
}

/// Label values escape backslash, double quote and newline.
fn escape_label(out: &mut String, value: &str) {
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snapshot() -> Snapshot {
        Snapshot {
            pool: PoolCounts {
                total: 10,
                active: 2,
                quarantined: 1,
                withheld: 0,
                free: 7,
            },
            leases_active: 2,
            processes_running: 3,
            event_streams: 0,
            pool_conflicts: 0,
            pool_process_holds: 0,
        }
    }

    /// Every line is a comment or `name{labels} value`; returns the samples.
    fn parse(text: &str) -> Vec<(String, f64)> {
        let mut samples = Vec::new();
        for line in text.lines() {
            if line.starts_with("# HELP ") || line.starts_with("# TYPE ") {
                continue;
            }
            let (series, value) = line.rsplit_once(' ').expect("name and value");
            let name_end = series.find('{').unwrap_or(series.len());
            let name = &series[..name_end];
            assert!(
                !name.is_empty()
                    && name
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
                "metric name in {line:?}"
            );
            if name_end < series.len() {
                assert!(series.ends_with('}'), "labels closed in {line:?}");
            }
            let value = match value {
                "+Inf" => f64::INFINITY,
                v => v.parse().expect("numeric value"),
            };
            samples.push((series.to_string(), value));
        }
        samples
    }

    fn value(samples: &[(String, f64)], series: &str) -> f64 {
        samples
            .iter()
            .find(|(s, _)| s == series)
            .map(|(_, v)| *v)
            .unwrap_or_else(|| panic!("no sample {series}"))
    }

    #[test]
    fn renders_gauges_counters_and_histograms() {
        let m = Metrics::new();
        m.count_event("create");
        m.count_event("create");
        m.count_event("expire");
        m.count_event("no-such-kind");
        m.observe_spawn(Duration::from_micros(1500), None);
        m.observe_spawn(Duration::from_millis(3), Some("exec_failed"));
        m.observe_request(
            "/v1/leases/{name}",
            "PUT",
            201,
            Duration::from_millis(2),
            None,
        );
        m.observe_request(
            "/v1/leases/{name}",
            "PUT",
            409,
            Duration::from_millis(20),
            Some("lease_conflict"),
        );
        let text = m.render(&snapshot());
        let s = parse(&text);
        assert_eq!(value(&s, "subidd_pool_blocks{state=\"free\"}"), 7.0);
        assert_eq!(value(&s, "subidd_pool_capacity_blocks"), 10.0);
        assert_eq!(value(&s, "subidd_leases_active"), 2.0);
        assert_eq!(value(&s, "subidd_processes_running"), 3.0);
        assert_eq!(value(&s, "subidd_leases_created_total"), 2.0);
        assert_eq!(value(&s, "subidd_leases_expired_total"), 1.0);
        assert_eq!(value(&s, "subidd_leases_released_total"), 0.0);
        assert_eq!(value(&s, "subidd_spawns_total"), 2.0);
        assert_eq!(
            value(&s, "subidd_spawn_failures_total{code=\"exec_failed\"}"),
            1.0
        );
        assert_eq!(
            value(&s, "subidd_spawn_duration_seconds_bucket{le=\"0.001\"}"),
            0.0
        );
        assert_eq!(
            value(&s, "subidd_spawn_duration_seconds_bucket{le=\"0.002\"}"),
            1.0
        );
        assert_eq!(
            value(&s, "subidd_spawn_duration_seconds_bucket{le=\"+Inf\"}"),
            1.0
        );
        assert_eq!(value(&s, "subidd_spawn_duration_seconds_count"), 1.0);
        assert_eq!(
            value(
                &s,
                "subidd_http_requests_total{method=\"PUT\",route=\"/v1/leases/{name}\",status=\"409\"}"
            ),
            1.0
        );
        assert_eq!(
            value(
                &s,
                "subidd_http_request_duration_seconds_bucket{method=\"PUT\",route=\"/v1/leases/{name}\",le=\"0.0025\"}"
            ),
            1.0
        );
        assert_eq!(
            value(
                &s,
                "subidd_http_request_duration_seconds_count{method=\"PUT\",route=\"/v1/leases/{name}\"}"
            ),
            2.0
        );
        assert_eq!(
            value(&s, "subidd_http_errors_total{code=\"lease_conflict\"}"),
            1.0
        );
        assert!(text.contains("# TYPE subidd_spawn_duration_seconds histogram\n"));
        assert!(text.contains("subidd_build_info{version=\""));
    }

    #[test]
    fn buckets_are_cumulative_and_end_with_inf() {
        let mut h = Histogram::new(&[0.25, 1.0]);
        for v in [0.25, 0.5, 0.5, 7.0] {
            h.observe(v);
        }
        let mut out = String::new();
        h.render(&mut out, "x", &[("a", "b")]);
        assert_eq!(
            out,
            "x_bucket{a=\"b\",le=\"0.25\"} 1\nx_bucket{a=\"b\",le=\"1\"} 3\n\
             x_bucket{a=\"b\",le=\"+Inf\"} 4\nx_sum{a=\"b\"} 8.25\nx_count{a=\"b\"} 4\n"
        );
    }

    #[test]
    fn label_values_are_escaped() {
        let mut out = String::new();
        sample(&mut out, "x", &[("v", "a\"b\\c\nd")], 1);
        assert_eq!(out, "x{v=\"a\\\"b\\\\c\\nd\"} 1\n");
    }

    #[test]
    fn unknown_methods_share_one_label() {
        let m = axum::http::Method::from_bytes(b"FROB").expect("method");
        assert_eq!(method_label(&m), "other");
        assert_eq!(method_label(&axum::http::Method::DELETE), "DELETE");
    }
}
