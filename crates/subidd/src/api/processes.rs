//! Handlers for processes: spawn in a lease, list, get, wait, signal, logs.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use axum::extract::State;
use axum::http::header::CONTENT_TYPE;
use axum::http::{HeaderValue, StatusCode};
use axum::response::IntoResponse;
use serde::{Deserialize, Serialize};
use subid_core::RlimitName;
use subid_store::{ProcessRecord, ProcessState};
use utoipa::{IntoParams, ToSchema};

use super::model::rfc3339;
use super::{ApiResult, JsonBody, LeaseName, QueryParams, St, json};
use crate::error::{ApiError, ErrorBody};
use crate::process::SpawnSpec;

/// Most argv entries, and their total size in bytes.
pub const ARGV_MAX_ITEMS: usize = 4096;
pub const ARGV_MAX_BYTES: usize = 128 * 1024;
/// Most environment entries, and their total size in bytes.
pub const ENV_MAX_ITEMS: usize = 1024;
pub const ENV_MAX_BYTES: usize = 128 * 1024;
/// Most supplementary groups.
pub const GROUPS_MAX: usize = 64;
/// The environment every process gets unless the request overrides a key.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// Longest wait a client may ask for.
pub const WAIT_MAX_SECONDS: u64 = 3600;

/// `POST /v1/leases/{name}/processes` body.
#[derive(Debug, Deserialize, ToSchema)]
#[schema(example = json!({"argv": ["/bin/true"]}))]
#[serde(deny_unknown_fields)]
pub struct SpawnBody {
    /// The program (a path, or a name looked up in `PATH`) and its arguments; no NUL bytes.
    #[schema(min_items = 1, max_items = 4096)]
    pub argv: Vec<String>,
    pub env: Option<EnvSpec>,
    /// An absolute path of an existing directory; default `/`.
    #[schema(pattern = "^/")]
    pub cwd: Option<String>,
    /// The uid inside the namespace; default 0.
    pub user: Option<u32>,
    /// The gid inside the namespace; default 0.
    pub group: Option<u32>,
    /// Supplementary gids inside the namespace.
    #[schema(max_items = 64)]
    pub groups: Option<Vec<u32>>,
    /// Override the lease's default rlimits.
    #[schema(schema_with = super::model::rlimits_or_null)]
    pub rlimits: Option<BTreeMap<String, [u64; 2]>>,
    /// Default 0o022 (18).
    #[schema(maximum = 511)]
    pub umask: Option<u32>,
}

/// The environment, as `{"K": "V"}` or as Docker's `["K=V"]`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum EnvSpec {
    Map(BTreeMap<String, String>),
    List(Vec<String>),
}

/// A process as the API shows it.
#[derive(Debug, Serialize, ToSchema)]
pub struct ProcessView {
    pub id: String,
    pub lease: String,
    pub pid: i32,
    pub host_uid: u32,
    pub host_gid: u32,
    pub argv: Vec<String>,
    #[schema(value_type = ProcessStateName)]
    pub state: &'static str,
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    pub started_at: String,
    pub ended_at: Option<String>,
}

impl From<&ProcessRecord> for ProcessView {
    fn from(p: &ProcessRecord) -> ProcessView {
        ProcessView {
            id: p.id.clone(),
            lease: p.lease_name.clone(),
            pid: p.pid,
            host_uid: p.host_uid,
            host_gid: p.host_gid,
            argv: p.argv.clone(),
            state: p.state.as_str(),
            exit_code: p.exit_code,
            signal: p.signal,
            started_at: rfc3339(p.started_at),
            ended_at: p.ended_at.map(rfc3339),
        }
    }
}

/// The state of a process, as its `state` field names it.
#[derive(Debug, ToSchema)]
#[serde(rename_all = "lowercase")]
#[allow(dead_code)] // documents the strings `ProcessState::as_str` gives
pub enum ProcessStateName {
    Running,
    Exited,
    Lost,
}

/// `GET /v1/leases/{name}/processes` answer.
#[derive(Debug, Serialize, ToSchema)]
pub struct ProcessList {
    pub processes: Vec<ProcessView>,
}

/// Error descriptions shared by the operations of this file.
const INVALID: &str = "invalid_request: a bad name, query key or value, or body";
const NO_PROCESS: &str = "not_found: no process with that id";

/// Starts a process in the lease's user namespace: 201 with the process; with `wait`,
/// answered once it has exited (or the timeout, default 30 s, passed), as `docker run`
/// without `-d` does.
#[utoipa::path(post, path = "/v1/leases/{name}/processes", tag = "processes", operation_id = "spawn",
    params(super::LeaseName,
        ("wait" = Option<bool>, Query, description = "answer once the process has exited"),
        ("timeout_seconds" = Option<u64>, Query, maximum = 3600,
            description = "with `wait`: the longest wait (default 30)"),
    ),
    request_body = SpawnBody,
    responses((status = 201, body = ProcessView),
        (status = 400, description = "invalid_request, executable_not_found (argv[0] is not an \
            executable file), exec_failed (the kernel refused to start it)", body = ErrorBody),
        (status = 404, description = "not_found: no active lease of that name", body = ErrorBody),
        (status = 409, description = "lease_busy: the lease is being released; process_limit: the \
            kernel refused a new process at the lease's cap (pids_max, max_processes, nproc)", body = ErrorBody),
        (status = 413, description = "payload_too_large: the body is over 64 KiB", body = ErrorBody),
        (status = 422, description = "pids_unsupported: the lease's `pids_max` cannot be \
            enforced on this host", body = ErrorBody),
        (status = 507, description = "storage_full: the state directory's disk is full", body = ErrorBody)))]
pub async fn spawn(
    State(state): St,
    LeaseName(name): LeaseName,
    query: QueryParams,
    JsonBody(body): JsonBody<SpawnBody>,
) -> ApiResult {
    let single = query.check(&["wait", "timeout_seconds"], &[])?;
    let wait = match single.get("wait") {
        Some(v) => super::parse_bool("wait", v)?,
        None => false,
    };
    let timeout = wait_timeout(single.get("timeout_seconds").copied())?;
    if !wait && single.contains_key("timeout_seconds") {
        return Err(ApiError::InvalidRequest(
            "timeout_seconds goes with wait=true".into(),
        ));
    }
    let Some(body) = body else {
        return Err(ApiError::InvalidRequest(
            "a JSON body with at least \"argv\" is required".into(),
        ));
    };
    let spec = spawn_spec(body)?;
    let started = std::time::Instant::now();
    // A waiting caller lets the spawn watch a short process to its end in place.
    let linger = if wait { timeout } else { Duration::ZERO };
    let spawned = state
        .processes
        .spawn(name, spec, linger)
        .await
        .map_err(ApiError::from);
    // The spawn's own time: without what it spent waiting for the process's exit.
    let lingered = spawned.as_ref().map_or(Duration::ZERO, |s| s.lingered);
    state.leases.metrics().observe_spawn(
        started.elapsed().saturating_sub(lingered),
        spawned.as_ref().err().map(ApiError::code),
    );
    let mut record = spawned?.record;
    if wait && record.state == ProcessState::Running {
        record = state.processes.wait(&record.id, timeout).await?;
    }
    Ok(json(StatusCode::CREATED, &ProcessView::from(&record)))
}

/// The processes of the active lease, running and ended.
#[utoipa::path(get, path = "/v1/leases/{name}/processes", tag = "processes", operation_id = "list_processes",
    params(super::LeaseName),
    responses((status = 200, body = ProcessList), (status = 400, description = INVALID, body = ErrorBody),
        (status = 404, description = "not_found: no active lease of that name", body = ErrorBody)))]
pub async fn list(State(state): St, LeaseName(name): LeaseName, query: QueryParams) -> ApiResult {
    query.check(&[], &[])?;
    let processes = state.processes.list(&name).await?;
    let view = ProcessList {
        processes: processes.iter().map(ProcessView::from).collect(),
    };
    Ok(json(StatusCode::OK, &view))
}

/// One process.
#[utoipa::path(get, path = "/v1/processes/{id}", tag = "processes", operation_id = "get_process",
    params(ProcessId),
    responses((status = 200, body = ProcessView), (status = 400, description = INVALID, body = ErrorBody),
        (status = 404, description = NO_PROCESS, body = ErrorBody)))]
pub async fn get_one(State(state): St, ProcessId(id): ProcessId, query: QueryParams) -> ApiResult {
    query.check(&[], &[])?;
    let record = state.processes.get(&id).await?;
    Ok(json(StatusCode::OK, &ProcessView::from(&record)))
}

/// Waits until the process has exited or the timeout passed, then answers its record.
#[utoipa::path(post, path = "/v1/processes/{id}/wait", tag = "processes", operation_id = "wait_process",
    params(ProcessId,
        ("timeout_seconds" = Option<u64>, Query, maximum = 3600, description = "default 30"),
    ),
    responses((status = 200, body = ProcessView), (status = 400, description = INVALID, body = ErrorBody),
        (status = 404, description = NO_PROCESS, body = ErrorBody)))]
pub async fn wait(State(state): St, ProcessId(id): ProcessId, query: QueryParams) -> ApiResult {
    let single = query.check(&["timeout_seconds"], &[])?;
    let timeout = wait_timeout(single.get("timeout_seconds").copied())?;
    let record = state.processes.wait(&id, timeout).await?;
    Ok(json(StatusCode::OK, &ProcessView::from(&record)))
}

/// `timeout_seconds` of a wait: default 30, at most [`WAIT_MAX_SECONDS`].
fn wait_timeout(value: Option<&str>) -> Result<Duration, ApiError> {
    let seconds = match value {
        None => 30,
        Some(v) => v
            .parse::<u64>()
            .ok()
            .filter(|t| *t <= WAIT_MAX_SECONDS)
            .ok_or_else(|| {
                ApiError::InvalidRequest(format!(
                    "timeout_seconds={v:?}: expected 0..={WAIT_MAX_SECONDS}"
                ))
            })?,
    };
    Ok(Duration::from_secs(seconds))
}

/// Sends a signal (default `TERM`) to a running process: 202.
#[utoipa::path(post, path = "/v1/processes/{id}/signal", tag = "processes", operation_id = "signal_process",
    params(ProcessId), request_body(content = Option<SignalBody>, description = "optional"),
    responses((status = 202, description = "sent"), (status = 400, description = INVALID, body = ErrorBody),
        (status = 404, description = NO_PROCESS, body = ErrorBody),
        (status = 409, description = "process_exited: it is not running", body = ErrorBody),
        (status = 413, description = "payload_too_large: the body is over 64 KiB", body = ErrorBody)))]
pub async fn signal(
    State(state): St,
    ProcessId(id): ProcessId,
    query: QueryParams,
    JsonBody(body): JsonBody<SignalBody>,
) -> ApiResult {
    query.check(&[], &[])?;
    let signal = match body.map(|b| b.signal) {
        None => nix::sys::signal::Signal::SIGTERM as i32,
        Some(spec) => parse_signal(&spec)?,
    };
    state.processes.signal(&id, signal).await?;
    Ok(StatusCode::ACCEPTED.into_response())
}

/// `POST /v1/processes/{id}/signal` body.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SignalBody {
    #[schema(schema_with = signal_schema)]
    pub signal: SignalSpec,
}

/// A signal name (`TERM`, `SIGTERM`, case-insensitive) or number (1..=64).
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum SignalSpec {
    Number(i64),
    Name(String),
}

/// `signal` of [`SignalBody`]: a number 1..=64 or a name.
fn signal_schema() -> utoipa::openapi::Schema {
    use utoipa::openapi::schema::{ObjectBuilder, OneOfBuilder, Type};
    OneOfBuilder::new()
        .item(
            ObjectBuilder::new()
                .schema_type(Type::Integer)
                .minimum(Some(1))
                .maximum(Some(64)),
        )
        .item(
            ObjectBuilder::new()
                .schema_type(Type::String)
                .pattern(Some("^[A-Za-z0-9+]{1,16}$")),
        )
        .description(Some(
            "a name (`TERM`, `SIGTERM`, case-insensitive) or a number 1..=64",
        ))
        .build()
        .into()
}

/// What the process wrote to stdout or stderr (the first `log_max_bytes`), as is.
#[utoipa::path(get, path = "/v1/processes/{id}/logs", tag = "processes", operation_id = "process_logs",
    params(ProcessId,
        ("stream" = Option<String>, Query, pattern = "^(stdout|stderr)$", description = "default `stdout`"),
    ),
    responses((status = 200, body = String, content_type = "text/plain"),
        (status = 400, description = INVALID, body = ErrorBody),
        (status = 404, description = NO_PROCESS, body = ErrorBody)))]
pub async fn logs(State(state): St, ProcessId(id): ProcessId, query: QueryParams) -> ApiResult {
    let single = query.check(&["stream"], &[])?;
    let stream = match single.get("stream").copied() {
        None | Some("stdout") => "stdout",
        Some("stderr") => "stderr",
        Some(other) => {
            return Err(ApiError::InvalidRequest(format!(
                "stream={other:?}: expected stdout or stderr"
            )));
        }
    };
    state.processes.get(&id).await?;
    let body = state.processes.read_log(&id, stream).await?;
    let mut response = (StatusCode::OK, body).into_response();
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    Ok(response)
}

/// The `{id}` of a process path: 16 lowercase hex digits.
#[derive(IntoParams)]
#[into_params(names("id"), parameter_in = Path)]
pub struct ProcessId(
    /// 16 lowercase hex digits; any other id is not found.
    #[param(pattern = "^[0-9a-f]{16}$")]
    pub String,
);

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for ProcessId {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &S,
    ) -> Result<Self, Self::Rejection> {
        let axum::extract::Path(id) =
            axum::extract::Path::<String>::from_request_parts(parts, state)
                .await
                .map_err(|e| ApiError::InvalidRequest(format!("bad path: {e}")))?;
        let valid = id.len() == 16 && id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
        if !valid {
            return Err(ApiError::NotFound(format!("no process {id:?}")));
        }
        Ok(ProcessId(id))
    }
}

/// Checks a spawn request and resolves the program, before anything is started.
pub(super) fn spawn_spec(body: SpawnBody) -> Result<SpawnSpec, ApiError> {
    let bad = |m: String| ApiError::InvalidRequest(m);
    if body.argv.is_empty() {
        return Err(bad("argv must name at least the program".into()));
    }
    if body.argv.len() > ARGV_MAX_ITEMS {
        return Err(bad(format!("argv has more than {ARGV_MAX_ITEMS} entries")));
    }
    if body.argv.iter().map(String::len).sum::<usize>() > ARGV_MAX_BYTES {
        return Err(bad(format!("argv is larger than {ARGV_MAX_BYTES} bytes")));
    }
    if let Some(i) = body.argv.iter().position(|a| a.contains('\0')) {
        return Err(bad(format!("argv[{i}] contains a NUL byte")));
    }
    if body.argv[0].is_empty() {
        return Err(bad("argv[0] is empty".into()));
    }
    let user = body.user.unwrap_or(0);
    let group = body.group.unwrap_or(0);
    let mut env: BTreeMap<String, String> = BTreeMap::from([
        ("PATH".to_string(), DEFAULT_PATH.to_string()),
        (
            "HOME".to_string(),
            if user == 0 { "/root" } else { "/" }.to_string(),
        ),
        ("TERM".to_string(), "dumb".to_string()),
    ]);
    let given: Vec<(String, String)> = match body.env {
        None => Vec::new(),
        Some(EnvSpec::Map(m)) => m.into_iter().collect(),
        Some(EnvSpec::List(l)) => l
            .into_iter()
            .map(|kv| match kv.split_once('=') {
                Some((k, v)) => Ok((k.to_string(), v.to_string())),
                None => Err(bad(format!("env entry {kv:?} is not KEY=VALUE"))),
            })
            .collect::<Result<_, _>>()?,
    };
    if given.len() > ENV_MAX_ITEMS {
        return Err(bad(format!("env has more than {ENV_MAX_ITEMS} entries")));
    }
    let mut bytes = 0usize;
    for (k, v) in given {
        if k.is_empty() || k.contains('=') || k.contains('\0') {
            return Err(bad(format!("env name {k:?} is empty or holds '=' or NUL")));
        }
        if v.contains('\0') {
            return Err(bad(format!("env {k} holds a NUL byte")));
        }
        bytes += k.len() + v.len() + 2;
        env.insert(k, v);
    }
    if bytes > ENV_MAX_BYTES {
        return Err(bad(format!("env is larger than {ENV_MAX_BYTES} bytes")));
    }
    let cwd = PathBuf::from(body.cwd.unwrap_or_else(|| "/".into()));
    if !cwd.is_absolute() || cwd.as_os_str().as_encoded_bytes().contains(&0) {
        return Err(bad(format!(
            "cwd {} must be an absolute path",
            cwd.display()
        )));
    }
    if !cwd.is_dir() {
        return Err(bad(format!(
            "cwd {} is not an existing directory",
            cwd.display()
        )));
    }
    let groups = body.groups.unwrap_or_default();
    if groups.len() > GROUPS_MAX {
        return Err(bad(format!("more than {GROUPS_MAX} supplementary groups")));
    }
    let umask = body.umask.unwrap_or(0o022);
    if umask > 0o777 {
        return Err(bad(format!("umask {umask:o} is larger than 0777")));
    }
    let mut rlimits = BTreeMap::new();
    for (name, limits) in body.rlimits.unwrap_or_default() {
        rlimits.insert(check_rlimit(&name, limits)?, limits);
    }
    let path_var = env.get("PATH").cloned().unwrap_or_default();
    let program = resolve_program(&body.argv[0], &path_var, &cwd)?;
    Ok(SpawnSpec {
        program,
        argv: body.argv,
        env: env.into_iter().collect(),
        cwd,
        user,
        group,
        groups,
        rlimits,
        umask,
    })
}

/// Finds the executable as execvp would: a name with a `/` is taken as is (relative to `cwd`),
/// a bare name is searched in `PATH`.
fn resolve_program(argv0: &str, path_var: &str, cwd: &Path) -> Result<PathBuf, ApiError> {
    let executable = |p: &Path| {
        std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    if argv0.contains('/') {
        let path = cwd.join(argv0);
        if executable(&path) {
            return Ok(path);
        }
        return Err(ApiError::ExecutableNotFound(format!(
            "{argv0} is not an executable file"
        )));
    }
    for dir in path_var.split(':').filter(|d| !d.is_empty()) {
        let candidate = cwd.join(dir).join(argv0);
        if executable(&candidate) {
            return Ok(candidate);
        }
    }
    Err(ApiError::ExecutableNotFound(format!(
        "{argv0} was not found in PATH={path_var}"
    )))
}

/// The rlimit names (`RlimitName`), as `ulimit` and Docker name them, for the OpenAPI document.
pub const RLIMIT_NAMES: [&str; 16] = [
    "as",
    "core",
    "cpu",
    "data",
    "fsize",
    "locks",
    "memlock",
    "msgqueue",
    "nice",
    "nofile",
    "nproc",
    "rss",
    "rtprio",
    "rttime",
    "sigpending",
    "stack",
];

/// Checks one rlimit of a request: a known name, soft <= hard.
pub fn check_rlimit(name: &str, [soft, hard]: [u64; 2]) -> Result<RlimitName, ApiError> {
    let known = RlimitName::parse(name).map_err(|e| ApiError::InvalidRequest(e.to_string()))?;
    if soft > hard {
        return Err(ApiError::InvalidRequest(format!(
            "rlimit {name}: soft {soft} above hard {hard}"
        )));
    }
    Ok(known)
}

/// A signal by name (`TERM`, `SIGTERM`, case-insensitive) or number (1..=64).
fn parse_signal(spec: &SignalSpec) -> Result<i32, ApiError> {
    match spec {
        SignalSpec::Number(n) if (1..=64).contains(n) => {
            i32::try_from(*n).map_err(|_| ApiError::InvalidRequest(format!("signal {n}")))
        }
        SignalSpec::Number(n) => Err(ApiError::InvalidRequest(format!(
            "signal {n} is not between 1 and 64"
        ))),
        SignalSpec::Name(name) => {
            let upper = name.to_ascii_uppercase();
            let full = if upper.starts_with("SIG") {
                upper
            } else {
                format!("SIG{upper}")
            };
            full.parse::<nix::sys::signal::Signal>()
                .map(|s| s as i32)
                .map_err(|_| ApiError::InvalidRequest(format!("unknown signal {name:?}")))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_rlimit_name_is_known() {
        assert_eq!(RLIMIT_NAMES, RlimitName::ALL.map(RlimitName::as_str));
        assert!(check_rlimit("bogus", [1, 1]).is_err());
    }

    #[test]
    fn signals_by_name_and_number() {
        assert_eq!(
            parse_signal(&SignalSpec::Name("TERM".into())).ok(),
            Some(15)
        );
        assert_eq!(
            parse_signal(&SignalSpec::Name("sigkill".into())).ok(),
            Some(9)
        );
        assert_eq!(parse_signal(&SignalSpec::Number(10)).ok(), Some(10));
        assert!(parse_signal(&SignalSpec::Number(0)).is_err());
        assert!(parse_signal(&SignalSpec::Number(65)).is_err());
        assert!(parse_signal(&SignalSpec::Name("BOGUS".into())).is_err());
    }

    #[test]
    fn programs_resolve_like_execvp() {
        let root = Path::new("/");
        assert_eq!(
            resolve_program("sh", DEFAULT_PATH, root).ok(),
            Some(PathBuf::from("/usr/local/sbin/sh"))
                .filter(|p| p.exists())
                .or(Some(PathBuf::from("/usr/bin/sh")).filter(|p| p.exists()))
                .or(Some(PathBuf::from("/bin/sh")))
        );
        assert!(resolve_program("/bin/sh", "", root).is_ok());
        assert!(matches!(
            resolve_program("no-such-program-xyz", DEFAULT_PATH, root),
            Err(ApiError::ExecutableNotFound(_))
        ));
        assert!(matches!(
            resolve_program("/etc/passwd", "", root),
            Err(ApiError::ExecutableNotFound(_))
        ));
    }

    fn body(json: &str) -> SpawnBody {
        serde_json::from_str(json).expect("parses")
    }

    #[test]
    fn spawn_requests_are_checked_before_anything_runs() {
        let ok =
            spawn_spec(body(r#"{"argv":["/bin/true"],"env":["A=1"],"user":999}"#)).expect("valid");
        assert!(ok.env.contains(&("A".into(), "1".into())));
        assert!(ok.env.contains(&("HOME".into(), "/".into())));
        assert!(ok.env.iter().any(|(k, _)| k == "PATH"));
        for bad in [
            r#"{"argv":[]}"#,
            r#"{"argv":[""]}"#,
            r#"{"argv":["/bin/true","a\u0000b"]}"#,
            r#"{"argv":["/bin/true"],"env":{"A=B":"x"}}"#,
            r#"{"argv":["/bin/true"],"env":["NOEQUALS"]}"#,
            r#"{"argv":["/bin/true"],"cwd":"relative"}"#,
            r#"{"argv":["/bin/true"],"cwd":"/no/such/dir"}"#,
            r#"{"argv":["/bin/true"],"umask":1024}"#,
            r#"{"argv":["/bin/true"],"rlimits":{"nofile":[10,5]}}"#,
            r#"{"argv":["/bin/true"],"rlimits":{"bogus":[1,1]}}"#,
        ] {
            assert!(
                matches!(spawn_spec(body(bad)), Err(ApiError::InvalidRequest(_))),
                "{bad}"
            );
        }
        assert!(matches!(
            spawn_spec(body(r#"{"argv":["/no/such/binary"]}"#)),
            Err(ApiError::ExecutableNotFound(_))
        ));
    }
}
