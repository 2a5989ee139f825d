//! What each command asks the daemon and how its answer is printed.

use std::io::Write;
use std::path::Path;
use std::process::ExitCode;

use anyhow::Context;
use clap::CommandFactory;
use hyper::Method;
use hyper::header::SERVER;
use serde_json::{Map, Value, json};

use crate::cli::{
    Cli, Command, EventsArgs, GenerateCommand, LeaseCommand, LookupArgs, PoolCommand, PutArgs,
    RunArgs, value_name,
};
use crate::client::{Client, Reply, encode, with_query};
use crate::table;

/// The longest a single wait request lasts before `run --wait` asks again.
const WAIT_CHUNK_SECONDS: u64 = 60;

/// Runs the parsed command line; the exit code is 0 unless `run --wait` says otherwise.
pub async fn execute(cli: Cli) -> anyhow::Result<ExitCode> {
    let out = Output { json: cli.json };
    let client = Client::new(&cli.socket);
    match cli.command {
        Command::Lease(cmd) => lease(&client, out, cmd).await?,
        Command::Run(args) => return run(&client, out, args).await,
        Command::Ps { lease } => {
            let reply = client
                .call(
                    Method::GET,
                    &format!("/v1/leases/{}/processes", encode(&lease)),
                    None,
                )
                .await?;
            out.print(&reply, |v| {
                let rows = array(&v["processes"])
                    .iter()
                    .map(process_row)
                    .collect::<Vec<_>>();
                table::render(&["ID", "PID", "STATE", "EXIT", "STARTED", "COMMAND"], &rows)
            })?;
        }
        Command::Wait { id, timeout } => {
            let pairs: Vec<(&str, String)> = timeout
                .map(|t| vec![("timeout_seconds", t.to_string())])
                .unwrap_or_default();
            let path = with_query(&format!("/v1/processes/{}/wait", encode(&id)), &pairs);
            let reply = client.call(Method::POST, &path, None).await?;
            out.print(&reply, process_fields)?;
        }
        Command::Kill { id, signal } => {
            let signal = match signal.parse::<i64>() {
                Ok(n) => json!(n),
                Err(_) => json!(signal),
            };
            let path = format!("/v1/processes/{}/signal", encode(&id));
            client
                .call(Method::POST, &path, Some(&json!({ "signal": signal })))
                .await?;
        }
        Command::Logs { id, stream } => {
            let path = with_query(
                &format!("/v1/processes/{}/logs", encode(&id)),
                &[("stream", value_name(&stream))],
            );
            let reply = client.call(Method::GET, &path, None).await?;
            write_raw(&mut std::io::stdout(), &reply.body)?;
        }
        Command::Pool { action: None } => {
            let reply = client.call(Method::GET, "/v1/pool", None).await?;
            out.print(&reply, pool_fields)?;
        }
        Command::Pool {
            action: Some(PoolCommand::Register),
        } => {
            // The daemon binary registers: it reads the daemon's own configuration (pool keys,
            // subuid_file, subgid_file) on the daemon's host, which this client may not share.
            crate::report::failure(
                out.json,
                "usage",
                "run `subidd --register` as root on the daemon's host (with the daemon's \
                 --config, if it has one); it writes the configured pool as the subidd entry \
                 of /etc/subuid and /etc/subgid",
            );
            return Ok(ExitCode::from(2));
        }
        Command::Events(args) => events(&client, out, args).await?,
        Command::Version => version(&client, out).await?,
        Command::Generate(GenerateCommand::Man { dir }) => {
            let written = write_man_pages(&dir)?;
            eprintln!("wrote {written} man pages to {}", dir.display());
        }
        Command::Generate(GenerateCommand::Completions { shell }) => {
            // Into memory first: clap_complete panics when its writer fails, and a reader that
            // stops early (`| head`) closes the pipe.
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "subidctl", &mut script);
            write_raw(&mut std::io::stdout(), &script)?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Follows `GET /v1/events`: raw JSON lines with `--json`, one aligned line each otherwise.
async fn events(client: &Client, out: Output, args: EventsArgs) -> anyhow::Result<()> {
    let mut query = Vec::new();
    if let Some(since) = args.since {
        query.push(("since", since.to_string()));
    }
    if args.no_follow {
        query.push(("follow", "false".to_string()));
    }
    if let Some(lease) = args.lease {
        query.push(("lease", lease));
    }
    let path = with_query("/v1/events", &query);
    let mut stdout = std::io::stdout();
    client
        .stream_lines(&path, |line| {
            if out.json {
                let mut raw = line.to_vec();
                raw.push(b'\n');
                return write_raw(&mut stdout, &raw);
            }
            let event: Value = serde_json::from_slice(line)
                .with_context(|| format!("event is not JSON: {}", String::from_utf8_lossy(line)))?;
            let text = format!(
                "{:>6}  {}  {:<16} {:<20} {}\n",
                table::cell(&event["id"]),
                table::cell(&event["at"]),
                table::cell(&event["type"]),
                table::cell(&event["lease"]),
                event
                    .get("details")
                    .map(Value::to_string)
                    .unwrap_or_default(),
            );
            write_raw(&mut stdout, text.as_bytes())
        })
        .await
}

/// Whether to print JSON or tables.
#[derive(Debug, Clone, Copy)]
struct Output {
    json: bool,
}

impl Output {
    /// The answer's JSON, pretty, or the human rendering of it.
    fn print(&self, reply: &Reply, human: impl FnOnce(&Value) -> String) -> anyhow::Result<()> {
        self.print_value(&reply.json()?, human)
    }

    fn print_value(
        &self,
        value: &Value,
        human: impl FnOnce(&Value) -> String,
    ) -> anyhow::Result<()> {
        let text = if self.json {
            format!("{}\n", serde_json::to_string_pretty(&value)?)
        } else {
            human(value)
        };
        write_raw(&mut std::io::stdout(), text.as_bytes())
    }
}

/// Writes and flushes; a closed pipe (`| head`) is not an error worth a message.
fn write_raw(w: &mut impl Write, bytes: &[u8]) -> anyhow::Result<()> {
    match w.write_all(bytes).and_then(|()| w.flush()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        other => other.context("write output"),
    }
}

/// Leases asked for per page by `lease ls`.
const LIST_PAGE: usize = 1000;

async fn lease(client: &Client, out: Output, cmd: LeaseCommand) -> anyhow::Result<()> {
    match cmd {
        LeaseCommand::Put(args) => {
            let path = format!("/v1/leases/{}", encode(&args.name));
            let reply = client
                .call(Method::PUT, &path, Some(&put_body(&args)))
                .await?;
            out.print(&reply, lease_fields)?;
        }
        LeaseCommand::Get { name } => {
            let path = format!("/v1/leases/{}", encode(&name));
            let reply = client.call(Method::GET, &path, None).await?;
            out.print(&reply, lease_fields)?;
        }
        LeaseCommand::Ls { state, labels } => {
            let mut pairs = vec![("state", value_name(&state))];
            pairs.extend(labels.iter().map(|(k, v)| ("label", format!("{k}={v}"))));
            pairs.push(("limit", LIST_PAGE.to_string()));
            // Page by page (each answer bounded), following the daemon's continue tokens.
            let mut leases = Vec::new();
            let mut next: Option<String> = None;
            loop {
                let mut query = pairs.clone();
                if let Some(token) = next.take() {
                    query.push(("continue", token));
                }
                let page = client
                    .call(Method::GET, &with_query("/v1/leases", &query), None)
                    .await?
                    .json()?;
                leases.extend(array(&page["leases"]).iter().cloned());
                match page["continue"].as_str() {
                    Some(token) if !token.is_empty() => next = Some(token.to_string()),
                    _ => break,
                }
            }
            let all = serde_json::json!({ "leases": leases });
            out.print_value(&all, |v| {
                let rows: Vec<Vec<String>> = array(&v["leases"])
                    .iter()
                    .map(|l| {
                        vec![
                            table::cell(&l["name"]),
                            table::cell(&l["state"]),
                            table::cell(&l["uid_base"]),
                            table::cell(&l["size"]),
                            table::cell(&l["expires_at"]),
                            table::pairs(&l["labels"]),
                        ]
                    })
                    .collect();
                table::render(
                    &["NAME", "STATE", "UID_BASE", "SIZE", "EXPIRES", "LABELS"],
                    &rows,
                )
            })?;
        }
        LeaseCommand::Rm { name, purge, force } => {
            let mut pairs = Vec::new();
            if purge {
                pairs.push(("purge", "true".to_string()));
            }
            if force {
                pairs.push(("force", "true".to_string()));
            }
            let path = with_query(&format!("/v1/leases/{}", encode(&name)), &pairs);
            client.call(Method::DELETE, &path, None).await?;
            // 204 has no body: nothing to print in --json form.
            if !out.json {
                let what = if purge {
                    "released (purged: its range is free now)"
                } else {
                    "released"
                };
                write_raw(
                    &mut std::io::stdout(),
                    format!("lease {name} {what}\n").as_bytes(),
                )?;
            }
        }
        LeaseCommand::Renew { name } => {
            let path = format!("/v1/leases/{}/renew", encode(&name));
            let reply = client.call(Method::POST, &path, None).await?;
            out.print(&reply, lease_fields)?;
        }
        LeaseCommand::Idmap { name, format } => {
            let pairs: Vec<(&str, String)> = format
                .map(|f| vec![("format", value_name(&f))])
                .unwrap_or_default();
            let path = with_query(&format!("/v1/leases/{}/idmap", encode(&name)), &pairs);
            let reply = client.call(Method::GET, &path, None).await?;
            let is_json = reply
                .headers
                .get(hyper::header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .is_some_and(|v| v.starts_with("application/json"));
            if !is_json {
                // uid_map, podman, subuid...: the daemon's text is the answer, as is.
                write_raw(&mut std::io::stdout(), &reply.body)?;
            } else if format.is_some() {
                Output { json: true }.print(&reply, |_| String::new())?;
            } else {
                out.print(&reply, |v| {
                    table::fields(&[
                        ("uid_map", table::cell(&v["uid_map"])),
                        ("gid_map", table::cell(&v["gid_map"])),
                        ("podman", table::list(&v["podman"], " ")),
                        ("subuid", table::cell(&v["subuid"])),
                        ("subgid", table::cell(&v["subgid"])),
                    ])
                })?;
            }
        }
        LeaseCommand::Lookup(LookupArgs { uid, gid }) => {
            let pairs = match (uid, gid) {
                (Some(uid), _) => vec![("uid", uid.to_string())],
                (None, Some(gid)) => vec![("gid", gid.to_string())],
                // clap's group makes one of them required.
                (None, None) => anyhow::bail!("give --uid or --gid"),
            };
            let reply = client
                .call(Method::GET, &with_query("/v1/lookup", &pairs), None)
                .await?;
            out.print(&reply, |v| {
                let kind = table::cell(&v["kind"]);
                table::fields(&[
                    ("lease", table::cell(&v["lease"]["name"])),
                    ("kind", kind.clone()),
                    (&format!("host {kind}"), table::cell(&v["host_id"])),
                    (&format!("{kind} inside"), table::cell(&v["inner_id"])),
                    ("uid_map", table::cell(&v["lease"]["uid_map"])),
                    ("gid_map", table::cell(&v["lease"]["gid_map"])),
                ])
            })?;
        }
    }
    Ok(())
}

/// The `PUT /v1/leases/{name}` body: only what was given, so the daemon's defaults apply.
fn put_body(args: &PutArgs) -> Value {
    let mut body = Map::new();
    if let Some(size) = args.size {
        body.insert("size".into(), json!(size));
    }
    if !args.labels.is_empty() {
        let labels: Map<String, Value> = args
            .labels
            .iter()
            .map(|(k, v)| (k.clone(), json!(v)))
            .collect();
        body.insert("labels".into(), Value::Object(labels));
    }
    if let Some(ttl) = args.ttl {
        body.insert("ttl_seconds".into(), json!(ttl));
    }
    if !args.rlimits.is_empty() {
        let rlimits: Map<String, Value> = args
            .rlimits
            .iter()
            .map(|(k, v)| (k.clone(), json!(v)))
            .collect();
        body.insert("rlimits".into(), Value::Object(rlimits));
    }
    if !args.namespaces.is_empty() {
        let names: Vec<String> = args.namespaces.iter().map(value_name).collect();
        body.insert("namespaces".into(), json!(names));
    }
    if let Some(n) = args.pids_max {
        body.insert("pids_max".into(), json!(n));
    }
    if let Some(n) = args.max_processes {
        body.insert("max_processes".into(), json!(n));
    }
    Value::Object(body)
}

/// `run`: spawn; with `--wait`, wait in 60 s steps, copy its logs out and exit with its status.
async fn run(client: &Client, out: Output, args: RunArgs) -> anyhow::Result<ExitCode> {
    let mut body = Map::new();
    body.insert("argv".into(), json!(args.argv));
    if !args.env.is_empty() {
        let env: Vec<String> = args.env.iter().map(|(k, v)| format!("{k}={v}")).collect();
        body.insert("env".into(), json!(env));
    }
    if let Some(cwd) = &args.cwd {
        body.insert("cwd".into(), json!(cwd));
    }
    if let Some(user) = args.user {
        body.insert("user".into(), json!(user));
    }
    if let Some(group) = args.group {
        body.insert("group".into(), json!(group));
    }
    let path = format!("/v1/leases/{}/processes", encode(&args.lease));
    let reply = client
        .call(Method::POST, &path, Some(&Value::Object(body)))
        .await?;
    if !args.wait {
        out.print(&reply, |v| format!("{}\n", table::cell(&v["id"])))?;
        return Ok(ExitCode::SUCCESS);
    }
    let mut process = reply.json()?;
    let id = process["id"]
        .as_str()
        .context("the daemon's answer has no process id")?
        .to_string();
    let wait_path = with_query(
        &format!("/v1/processes/{}/wait", encode(&id)),
        &[("timeout_seconds", WAIT_CHUNK_SECONDS.to_string())],
    );
    while process["state"] == "running" {
        process = client.call(Method::POST, &wait_path, None).await?.json()?;
    }
    let mut output = Vec::new();
    for stream in ["stdout", "stderr"] {
        let path = with_query(
            &format!("/v1/processes/{}/logs", encode(&id)),
            &[("stream", stream.to_string())],
        );
        output.push(client.call(Method::GET, &path, None).await?.body);
    }
    if out.json {
        // The process as the daemon answered, with what it wrote (as text; bytes that are not
        // UTF-8 become U+FFFD: `subidctl logs` gives them raw).
        if let Value::Object(fields) = &mut process {
            for (stream, bytes) in ["stdout", "stderr"].iter().zip(&output) {
                fields.insert((*stream).to_string(), json!(String::from_utf8_lossy(bytes)));
            }
        }
        let text = format!("{}\n", serde_json::to_string_pretty(&process)?);
        write_raw(&mut std::io::stdout(), text.as_bytes())?;
    } else {
        write_raw(&mut std::io::stdout(), &output[0])?;
        write_raw(&mut std::io::stderr(), &output[1])?;
    }
    exit_status(&process)
}

/// A process's exit as a shell would report it: its code, or 128+N for signal N.
fn exit_status(process: &Value) -> anyhow::Result<ExitCode> {
    let clamp = |n: i64| u8::try_from(n & 0xff).unwrap_or(1);
    if let Some(code) = process["exit_code"].as_i64() {
        return Ok(ExitCode::from(clamp(code)));
    }
    if let Some(signal) = process["signal"].as_i64() {
        return Ok(ExitCode::from(clamp(128 + signal)));
    }
    anyhow::bail!(
        "process {} ended as {} without an exit status",
        table::cell(&process["id"]),
        table::cell(&process["state"])
    )
}

async fn version(client: &Client, out: Output) -> anyhow::Result<()> {
    let client_version = concat!("subidctl/", env!("CARGO_PKG_VERSION"));
    let reply = match client.raw(Method::GET, "/_ping", None).await {
        Ok(reply) => reply,
        Err(e) => {
            // Still say which client this is; the daemon's part is the error.
            if !out.json {
                write_raw(
                    &mut std::io::stdout(),
                    format!("client: {client_version}\n").as_bytes(),
                )?;
            }
            return Err(e);
        }
    };
    let header = |name: &str| {
        reply
            .headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let server = header(SERVER.as_str());
    let api = header("api-version");
    let text = if out.json {
        let value = json!({ "client": client_version, "server": server, "api_version": api });
        format!("{}\n", serde_json::to_string_pretty(&value)?)
    } else {
        table::fields(&[
            ("client", client_version.to_string()),
            ("server", server.unwrap_or_else(|| "-".into())),
            ("api", api.unwrap_or_else(|| "-".into())),
        ])
    };
    write_raw(&mut std::io::stdout(), text.as_bytes())
}

fn array(value: &Value) -> &[Value] {
    value.as_array().map(Vec::as_slice).unwrap_or(&[])
}

fn lease_fields(l: &Value) -> String {
    let limits = &l["limits"];
    let rlimits = match l["rlimits"].as_object() {
        Some(map) if !map.is_empty() => map
            .iter()
            .map(|(k, v)| {
                let n = |i: usize| match v[i].as_u64() {
                    Some(u64::MAX) => "unlimited".to_string(),
                    _ => table::cell(&v[i]),
                };
                format!("{k}={}:{}", n(0), n(1))
            })
            .collect::<Vec<_>>()
            .join(","),
        _ => "-".to_string(),
    };
    table::fields(&[
        ("name", table::cell(&l["name"])),
        ("state", table::cell(&l["state"])),
        ("uid_base", table::cell(&l["uid_base"])),
        ("gid_base", table::cell(&l["gid_base"])),
        ("size", table::cell(&l["size"])),
        ("labels", table::pairs(&l["labels"])),
        ("ttl_seconds", table::cell(&l["ttl_seconds"])),
        ("created", table::cell(&l["created_at"])),
        ("expires", table::cell(&l["expires_at"])),
        ("released", table::cell(&l["released_at"])),
        ("rlimits", rlimits),
        ("namespaces", table::list(&l["namespaces"], ",")),
        ("pids_max", table::cell(&limits["pids_max"])),
        ("max_processes", table::cell(&limits["max_processes"])),
        ("pids_current", table::cell(&limits["pids_current"])),
        ("uid_map", table::cell(&l["uid_map"])),
        ("gid_map", table::cell(&l["gid_map"])),
    ])
}

fn process_row(p: &Value) -> Vec<String> {
    vec![
        table::cell(&p["id"]),
        table::cell(&p["pid"]),
        table::cell(&p["state"]),
        exit_cell(p),
        table::cell(&p["started_at"]),
        table::list(&p["argv"], " "),
    ]
}

/// `3`, `signal 9`, or `-` while running.
fn exit_cell(p: &Value) -> String {
    match (p["exit_code"].as_i64(), p["signal"].as_i64()) {
        (Some(code), _) => code.to_string(),
        (None, Some(signal)) => format!("signal {signal}"),
        _ => "-".to_string(),
    }
}

fn process_fields(p: &Value) -> String {
    table::fields(&[
        ("id", table::cell(&p["id"])),
        ("lease", table::cell(&p["lease"])),
        ("pid", table::cell(&p["pid"])),
        ("state", table::cell(&p["state"])),
        ("exit", exit_cell(p)),
        ("host_uid", table::cell(&p["host_uid"])),
        ("host_gid", table::cell(&p["host_gid"])),
        ("command", table::list(&p["argv"], " ")),
        ("started", table::cell(&p["started_at"])),
        ("ended", table::cell(&p["ended_at"])),
    ])
}

fn pool_fields(p: &Value) -> String {
    let b = &p["blocks"];
    let cgroup = &p["cgroup"];
    let pids = match cgroup["pids_max_supported"].as_bool() {
        Some(true) => format!("supported ({})", table::cell(&cgroup["pids_version"])),
        Some(false) => format!("unsupported: {}", table::cell(&cgroup["reason"])),
        None => "-".to_string(),
    };
    table::fields(&[
        ("base", table::cell(&p["base"])),
        ("size", table::cell(&p["size"])),
        ("end", table::cell(&p["end"])),
        ("block", table::cell(&p["block"])),
        ("source", table::cell(&p["source"])),
        ("quarantine_seconds", table::cell(&p["quarantine_seconds"])),
        (
            "blocks",
            format!(
                "{} total, {} active, {} quarantined, {} free",
                table::cell(&b["total"]),
                table::cell(&b["active"]),
                table::cell(&b["quarantined"]),
                table::cell(&b["free"])
            ),
        ),
        ("cgroup", table::cell(&cgroup["mode"])),
        ("pids_max", pids),
    ])
}

/// Writes `subidctl.1` and `subidctl-<sub>[-<sub>].1` for every visible command; returns
/// how many pages the directory then holds.
pub fn write_man_pages(dir: &Path) -> anyhow::Result<usize> {
    std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    clap_mangen::generate_to(Cli::command(), dir)
        .with_context(|| format!("write man pages to {}", dir.display()))?;
    let pages = std::fs::read_dir(dir)
        .with_context(|| format!("read {}", dir.display()))?
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().ends_with(".1"))
        .count();
    Ok(pages)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_status_follows_the_shell() {
        assert_eq!(
            exit_status(&json!({"exit_code": 3, "signal": null})).ok(),
            Some(ExitCode::from(3))
        );
        assert_eq!(
            exit_status(&json!({"exit_code": null, "signal": 9})).ok(),
            Some(ExitCode::from(137))
        );
        assert!(exit_status(&json!({"id": "x", "state": "lost"})).is_err());
    }

    #[test]
    fn put_body_sends_only_what_was_given() {
        let cli = <Cli as clap::Parser>::try_parse_from([
            "subidctl",
            "lease",
            "put",
            "box",
            "--label",
            "a=b",
            "--rlimit",
            "nofile=1:2",
            "--namespace",
            "net",
        ])
        .expect("parses");
        let Command::Lease(LeaseCommand::Put(args)) = cli.command else {
            panic!("not put");
        };
        assert_eq!(
            put_body(&args),
            json!({"labels": {"a": "b"}, "rlimits": {"nofile": [1, 2]}, "namespaces": ["net"]})
        );
    }
}
