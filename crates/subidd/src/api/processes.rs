//! Handlers for processes: spawn in a lease, list, get, wait, signal, logs.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use axum::extract::State;
use axum::http::header::CONTENT_TYPE;
use axum::http::{HeaderValue, StatusCode};
use axum::response::IntoResponse;
use nix::sys::resource::Resource;
use serde::{Deserialize, Serialize};
use subid_store::ProcessRecord;

use super::model::rfc3339;
use super::{ApiResult, JsonBody, LeaseName, QueryParams, St, json};
use crate::error::ApiError;
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
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SpawnBody {
    pub argv: Vec<String>,
    pub env: Option<EnvSpec>,
    pub cwd: Option<String>,
    pub user: Option<u32>,
    pub group: Option<u32>,
    pub groups: Option<Vec<u32>>,
    pub rlimits: Option<BTreeMap<String, [u64; 2]>>,
    pub umask: Option<u32>,
}

/// The environment, as `{"K": "V"}` or as Docker's `["K=V"]`.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum EnvSpec {
    Map(BTreeMap<String, String>),
    List(Vec<String>),
}

/// A process as the API shows it.
#[derive(Debug, Serialize)]
pub struct ProcessView {
    pub id: String,
    pub lease: String,
    pub pid: i32,
    pub host_uid: u32,
    pub host_gid: u32,
    pub argv: Vec<String>,
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

/// `POST /v1/leases/{name}/processes[?wait=true&timeout_seconds=N]`: 201 with the process;
/// with `wait`, answered once it has exited (or the timeout, default 30 s, passed), as
/// `docker run` without `-d` does.
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
    let mut record = state.processes.spawn(name, spec).await?;
    if wait {
        record = state.processes.wait(&record.id, timeout).await?;
    }
    Ok(json(StatusCode::CREATED, &ProcessView::from(&record)))
}

/// `GET /v1/leases/{name}/processes`
pub async fn list(State(state): St, LeaseName(name): LeaseName, query: QueryParams) -> ApiResult {
    query.check(&[], &[])?;
    let processes = state.processes.list(&name).await?;
    let views: Vec<ProcessView> = processes.iter().map(ProcessView::from).collect();
    Ok(json(
        StatusCode::OK,
        &serde_json::json!({ "processes": views }),
    ))
}

/// `GET /v1/processes/{id}`
pub async fn get_one(State(state): St, ProcessId(id): ProcessId, query: QueryParams) -> ApiResult {
    query.check(&[], &[])?;
    let record = state.processes.get(&id).await?;
    Ok(json(StatusCode::OK, &ProcessView::from(&record)))
}

/// `POST /v1/processes/{id}/wait?timeout_seconds=N` (default 30, at most 3600).
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

/// `POST /v1/processes/{id}/signal` body `{"signal": "TERM"}` (a name, with or without `SIG`,
/// or a number 1..=64): 202.
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
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignalBody {
    pub signal: SignalSpec,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum SignalSpec {
    Number(i64),
    Name(String),
}

/// `GET /v1/processes/{id}/logs?stream=stdout|stderr`: what it wrote (first `log_max_bytes`).
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
    let path = state.processes.log_path(&id, stream);
    let body = match tokio::fs::read(&path).await {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(ApiError::Internal(format!("read {}: {e}", path.display()))),
    };
    let mut response = (StatusCode::OK, body).into_response();
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    Ok(response)
}

/// The `{id}` of a process path: 16 lowercase hex digits.
pub struct ProcessId(pub String);

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
fn spawn_spec(body: SpawnBody) -> Result<SpawnSpec, ApiError> {
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
    let rlimits = body.rlimits.unwrap_or_default();
    for (name, limits) in &rlimits {
        check_rlimit(name, *limits)?;
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

/// Checks one rlimit of a request: a known name, soft <= hard.
pub fn check_rlimit(name: &str, [soft, hard]: [u64; 2]) -> Result<Resource, ApiError> {
    let resource = resource(name).ok_or_else(|| {
        ApiError::InvalidRequest(format!(
            "unknown rlimit {name:?}; known: as, core, cpu, data, fsize, locks, memlock, \
             msgqueue, nice, nofile, nproc, rss, rtprio, rttime, sigpending, stack"
        ))
    })?;
    if soft > hard {
        return Err(ApiError::InvalidRequest(format!(
            "rlimit {name}: soft {soft} above hard {hard}"
        )));
    }
    Ok(resource)
}

/// The kernel resource of an rlimit name (as `ulimit` and Docker name them).
pub fn resource(name: &str) -> Option<Resource> {
    Some(match name {
        "as" => Resource::RLIMIT_AS,
        "core" => Resource::RLIMIT_CORE,
        "cpu" => Resource::RLIMIT_CPU,
        "data" => Resource::RLIMIT_DATA,
        "fsize" => Resource::RLIMIT_FSIZE,
        "locks" => Resource::RLIMIT_LOCKS,
        "memlock" => Resource::RLIMIT_MEMLOCK,
        "msgqueue" => Resource::RLIMIT_MSGQUEUE,
        "nice" => Resource::RLIMIT_NICE,
        "nofile" => Resource::RLIMIT_NOFILE,
        "nproc" => Resource::RLIMIT_NPROC,
        "rss" => Resource::RLIMIT_RSS,
        "rtprio" => Resource::RLIMIT_RTPRIO,
        "rttime" => Resource::RLIMIT_RTTIME,
        "sigpending" => Resource::RLIMIT_SIGPENDING,
        "stack" => Resource::RLIMIT_STACK,
        _ => return None,
    })
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
