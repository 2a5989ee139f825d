//! `create` and `delete` of a container on its own lease, and the sweep of what containers
//! that no longer exist left behind.
//!
//! create: lease (`PUT`, sticky, labelled with the container) → the lease's namespace (`PUT
//! .../namespace`) → the container's directory opened to the lease's gid → root filesystem and
//! bind sources idmapped → `config.json` (user namespace, mappings, clamped sysctls, new paths)
//! → the real runtime's `create` → the container's init counted as the lease's (`POST
//! .../attach`). A failure at any step undoes the steps before it, in reverse, and the reason
//! goes to the runtime's `--log`, where Docker shows it.
//!
//! delete: the real runtime's `delete`; once the container no longer exists, every mount of
//! the create is taken off and the lease released (its processes are gone with the container).

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use liboci_cli::{Create, Delete};
use subid_client::blocking::Client;
use subid_client::{ClientError, Lease, LeaseRequest};

use crate::cli::RuntimeCli;
use crate::error::{Result, RuncError};
use crate::log::Reporter;
use crate::options::{Mode, Options};
use crate::rootfs::{self, Covered, Layout};
use crate::runtime::{self, Runtime};
use crate::spec::{Bundle, Original};
use crate::state::{self, Attempt, Record, StateDir};

/// Label keys of the wrapper's leases.
pub const LABEL_OWNER: &str = "owner";
pub const LABEL_CONTAINER: &str = "container";
pub const LABEL_ROOT: &str = "runtime-root";

/// Least time between two sweeps of subidd's leases.
const SWEEP_INTERVAL: Duration = Duration::from_secs(30);
/// How long a call waits for another one working on the same container.
const LOCK_WAIT: Duration = Duration::from_secs(30);
/// How long a release waits for the last processes of a deleted container to be gone before it
/// forces them.
const RELEASE_PATIENCE: Duration = Duration::from_secs(3);

/// Everything a wrapped command needs.
pub struct Context {
    pub options: Options,
    pub cli: RuntimeCli,
    /// The runtime's arguments, as given.
    pub args: Vec<OsString>,
    pub runtime: Runtime,
    pub reporter: Reporter,
}

impl Context {
    /// The runtime's state directory: `--root`, else its default.
    pub fn runtime_root(&self) -> PathBuf {
        self.cli
            .global
            .root
            .clone()
            .unwrap_or_else(|| self.runtime.default_root())
    }

    fn client(&self) -> Result<Client> {
        Client::new(&self.options.socket)
            .map(|c| {
                c.with_timeout(self.options.timeout)
                    .with_user_agent(concat!("subid-runc/", env!("CARGO_PKG_VERSION")))
            })
            .map_err(|e| RuncError::daemon(&self.options.socket, "-", "start a client", e))
    }

    fn lease_name(&self, id: &str) -> Result<String> {
        let name = format!("{}{id}", self.options.lease_prefix);
        let ok = !name.is_empty()
            && name.len() <= 128
            && name.starts_with(|c: char| c.is_ascii_alphanumeric())
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
        if !ok {
            return Err(RuncError::Usage(format!(
                "container id {id:?} cannot name a lease ({name:?}): subidd takes 1-128 of \
                 [A-Za-z0-9_.-], the first a letter or digit; choose a shorter \
                 --subid-lease-prefix or another id"
            )));
        }
        Ok(name)
    }

    fn labels(&self, id: &str) -> BTreeMap<String, String> {
        BTreeMap::from([
            (LABEL_OWNER.to_string(), self.options.owner.clone()),
            (LABEL_CONTAINER.to_string(), id.to_string()),
            (
                LABEL_ROOT.to_string(),
                self.runtime_root().display().to_string(),
            ),
        ])
    }

    /// Whether the runtime still has container `id` under `root`.
    fn exists(root: &Path, id: &str) -> bool {
        root.join(id).exists()
    }
}

/// What a create has done so far, for its undo.
#[derive(Default)]
struct Progress {
    lease: Option<String>,
    bundle: Option<Original>,
    covered: Option<Covered>,
    runtime_created: bool,
}

/// `create`: see the module docs. Returns the exit code.
pub fn create(ctx: &Context, args: &Create) -> Result<i32> {
    let id = args.container_id.as_str();
    if !state::valid_id(id) {
        return Err(RuncError::Usage(format!(
            "container id {id:?}: expected [A-Za-z0-9_+.-], as runc does"
        )));
    }
    let lease = ctx.lease_name(id)?;
    let root = ctx.runtime_root();
    if Context::exists(&root, id) {
        return Err(RuncError::Usage(format!(
            "container {id} exists already (in {})",
            root.display()
        )));
    }
    let states = StateDir::open(&ctx.options.state_dir)?;
    let layout = states.container(id);
    let leftover = layout.dir.exists();
    layout.make()?;
    let _lock = state::lock(&layout, id, LOCK_WAIT)?;
    if leftover {
        // What a crashed earlier create of this id left (its lease stays: it is put again).
        let earlier = layout.read_record();
        let mut errors = rootfs::cleanup_mounts(&layout, earlier.and_then(|r| r.covered).as_ref());
        if errors.is_empty() {
            errors = rootfs::remove_files(&layout, true);
        }
        if let Some(e) = errors.into_iter().next() {
            return Err(e);
        }
    }
    let client = ctx.client()?;
    sweep_dirs(ctx, &states, Some(&client), Some(id));
    if states.sweep_due(SWEEP_INTERVAL) {
        sweep_leases(ctx, &states, &client, Some(id));
    }

    let mut progress = Progress::default();
    match prepare_and_create(ctx, &client, args, &layout, &lease, &mut progress) {
        Ok(0) => Ok(0),
        Ok(code) => {
            // The runtime refused (and said why in the log): undo ours, keep its status.
            undo(ctx, &client, &layout, id, progress);
            Ok(code)
        }
        Err(error) => {
            undo(ctx, &client, &layout, id, progress);
            Err(error)
        }
    }
}

fn prepare_and_create(
    ctx: &Context,
    client: &Client,
    args: &Create,
    layout: &Layout,
    lease_name: &str,
    progress: &mut Progress,
) -> Result<i32> {
    let id = args.container_id.as_str();
    let socket = &ctx.options.socket;
    let lease = put_lease(ctx, client, id, lease_name)?;
    progress.lease = Some(lease.name.clone());
    let mut record = Record {
        id: id.to_string(),
        lease: lease.name.clone(),
        mode: ctx.options.mode.as_str().into(),
        runtime_root: ctx.runtime_root(),
        covered: None,
    };
    layout.write_record(&record)?;

    let pins = client
        .ensure_namespace(&lease.name)
        .map_err(|e| RuncError::daemon(socket, id, "make the lease's namespace", e))?;
    let userns: OwnedFd = subid_sys::userns::open_pinned(&pins.user)
        .map_err(|e| RuncError::sys("open the lease's namespace", e))?;

    let mut bundle = Bundle::load(&args.bundle)?;
    bundle.check_no_user_namespace()?;
    let root_path = bundle.root_path()?;
    progress.bundle = Some(bundle.original());

    let (rootfs, covered) = rootfs::prepare_root(
        layout,
        &root_path,
        userns.as_fd(),
        lease.uid_base,
        lease.gid_base,
    )?;
    progress.covered = covered.clone();
    record.covered = covered;
    layout.write_record(&record)?;
    for bind in bundle.bind_mounts() {
        let (source, keep) = rootfs::prepare_bind(layout, &bind, userns.as_fd())?;
        bundle.set_mount_source(bind.index, &source);
        bundle.add_mount_options(bind.index, &keep);
    }
    // Opened to the lease's root only now: while the layers' idmapped view (all of the
    // engine's layers, owned by the lease's root as it shows them) was attached in it, the
    // directory was root's alone.
    layout.open_to(lease.gid_base)?;
    bundle.set_root_path(&rootfs);
    match ctx.options.mode {
        Mode::Join => bundle.set_user_namespace(Some(&pins.user)),
        Mode::Map => bundle.set_user_namespace(None),
    }
    bundle.set_mappings(lease.uid_base, lease.gid_base, lease.size);
    for (key, was, now) in bundle.clamp_sysctls(lease.size) {
        ctx.reporter.warn(&format!(
            "container {id}: sysctl {key} clamped from {was:?} to {now:?}, the gids its user \
             namespace maps"
        ));
    }
    bundle.annotate(&BTreeMap::from([
        ("io.subidd.lease", lease.name.clone()),
        ("io.subidd.mode", ctx.options.mode.as_str().to_string()),
    ]));
    bundle.save()?;

    let code = ctx.runtime.status(&ctx.args)?;
    if code != 0 {
        return Ok(code);
    }
    progress.runtime_created = true;
    let pid = match &args.pid_file {
        Some(file) => runtime::read_pid_file(file)?,
        None => ctx.runtime.pid(&ctx.cli.global_args(), id)?,
    };
    if let Err(e) = client.attach(&lease.name, pid, id) {
        return Err(RuncError::daemon(
            socket,
            id,
            "count the container's processes as the lease's",
            e,
        ));
    }
    Ok(0)
}

/// `PUT` of the container's lease; an active lease of that name with other labels (say, the
/// runtime's root moved) is taken as it is when it names this container.
fn put_lease(ctx: &Context, client: &Client, id: &str, name: &str) -> Result<Lease> {
    let socket = &ctx.options.socket;
    let request = LeaseRequest {
        labels: Some(ctx.labels(id)),
        ..LeaseRequest::default()
    };
    match client.put_lease(name, &request) {
        Ok((lease, _)) => Ok(lease),
        Err(e) if e.code() == Some("lease_conflict") => {
            let lease = client
                .get_lease(name)
                .map_err(|e| RuncError::daemon(socket, id, "read the container's lease", e))?;
            let ours = lease.labels.get(LABEL_OWNER) == Some(&ctx.options.owner)
                && lease.labels.get(LABEL_CONTAINER).map(String::as_str) == Some(id);
            if ours && lease.state == subid_client::LeaseState::Active {
                Ok(lease)
            } else {
                Err(RuncError::daemon(socket, id, "lease a range", e))
            }
        }
        Err(e) => Err(RuncError::daemon(socket, id, "lease a range", e)),
    }
}

/// Undoes a create that failed half-way, in reverse; every failure is reported, none stops it.
fn undo(ctx: &Context, client: &Client, layout: &Layout, id: &str, progress: Progress) {
    if progress.runtime_created {
        let mut args = ctx.cli.global_args();
        args.extend(["delete".into(), "--force".into(), id.into()]);
        match ctx.runtime.output(&args) {
            Ok((0, _)) => {}
            Ok((code, _)) => ctx.reporter.warn(&format!(
                "undo of container {id}: the runtime's delete --force exited with {code}"
            )),
            Err(e) => ctx.reporter.warn(&format!("undo of container {id}: {e}")),
        }
    }
    if let Some(original) = &progress.bundle
        && let Err(e) = original.restore()
    {
        ctx.reporter.warn(&format!("undo of container {id}: {e}"));
    }
    for e in rootfs::cleanup(layout, progress.covered.as_ref()) {
        ctx.reporter.warn(&format!("undo of container {id}: {e}"));
    }
    if let Some(lease) = &progress.lease
        && let Err(e) = release(client, lease)
    {
        ctx.reporter
            .warn(&format!("undo of container {id}: releasing {lease}: {e}"));
    }
}

/// `delete`: see the module docs. Returns the runtime's exit code.
pub fn delete(ctx: &Context, args: &Delete) -> Result<i32> {
    let id = args.container_id.as_str();
    if !state::valid_id(id) {
        // Nothing of ours can exist for it: the runtime answers.
        return Err(ctx.runtime.exec(&ctx.args));
    }
    let states = StateDir::open(&ctx.options.state_dir)?;
    let layout = states.container(id);
    let _lock = state::lock(&layout, id, LOCK_WAIT)?;
    let code = ctx.runtime.status(&ctx.args)?;
    let root = ctx.runtime_root();
    if code != 0 && Context::exists(&root, id) {
        // Still there (a running container without --force): nothing to undo yet.
        return Ok(code);
    }
    // Without a directory nothing of ours is left (Docker deletes twice; a container the
    // wrapper did not create): no request to subidd. A lease without one is the sweep's.
    let mut client = None;
    if layout.dir.exists() {
        let c = ctx.client()?;
        let lease = layout
            .read_record()
            .map(|r| r.lease)
            .or_else(|| ctx.lease_name(id).ok());
        finish(ctx, &c, &layout, lease.as_deref(), id);
        client = Some(c);
    }
    // The leases' sweep is left to the next create: a delete stays lighter.
    sweep_dirs(ctx, &states, client.as_ref(), Some(id));
    Ok(code)
}

/// Takes off a gone container's mounts and releases its lease; what cannot be done now (say,
/// subidd is down) stays recorded for a later sweep.
fn finish(ctx: &Context, client: &Client, layout: &Layout, lease: Option<&str>, id: &str) {
    let covered = layout.read_record().and_then(|r| r.covered);
    let errors = rootfs::cleanup_mounts(layout, covered.as_ref());
    let mounts_gone = errors.is_empty();
    for e in errors {
        ctx.reporter
            .warn(&format!("cleanup of container {id}: {e}"));
    }
    if let Some(lease) = lease {
        match release(client, lease) {
            Ok(()) => {}
            Err(e) => {
                ctx.reporter.warn(&format!(
                    "cleanup of container {id}: lease {lease} is not released ({e}); a later \
                     create or delete retries"
                ));
                return;
            }
        }
    }
    if mounts_gone {
        for e in rootfs::remove_files(layout, false) {
            ctx.reporter
                .warn(&format!("cleanup of container {id}: {e}"));
        }
    }
}

/// Releases a lease whose container is gone: a plain release, repeated while its last
/// processes exit, then forced; a lease that no longer exists is fine.
fn release(client: &Client, lease: &str) -> Result<(), ClientError> {
    let deadline = Instant::now() + RELEASE_PATIENCE;
    loop {
        match client.release_lease(lease, false, false) {
            Ok(()) => return Ok(()),
            Err(e) if e.code() == Some("not_found") => return Ok(()),
            Err(e) if e.code() == Some("lease_busy") && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) if e.code() == Some("lease_busy") => {
                return match client.release_lease(lease, true, false) {
                    Err(e) if e.code() == Some("not_found") => Ok(()),
                    other => other,
                };
            }
            Err(e) => return Err(e),
        }
    }
}

/// The sweep, which cleans up after containers that no longer exist (a wrapper that crashed,
/// a reboot that emptied the runtime's state, a release that failed), part one: directories of
/// the state directory whose container the runtime no longer has (looked at on every create
/// and delete; a client is made only when one is needed). Part two is [`sweep_leases`].
/// Containers another call is working on (locked) are left alone; failures are warnings.
fn sweep_dirs(ctx: &Context, states: &StateDir, client: Option<&Client>, skip: Option<&str>) {
    let mut own = None;
    for id in states.containers() {
        if Some(id.as_str()) == skip {
            continue;
        }
        let layout = states.container(&id);
        let Ok(Attempt::Held(_lock)) = state::try_lock(&layout) else {
            continue;
        };
        let record = layout.read_record();
        let root = record
            .as_ref()
            .map_or_else(|| ctx.runtime_root(), |r| r.runtime_root.clone());
        if Context::exists(&root, &id) {
            continue;
        }
        let lease = record.map(|r| r.lease);
        let c = match (client, &own) {
            (Some(c), _) => c,
            (None, Some(c)) => c,
            (None, None) => match ctx.client() {
                Ok(c) => own.insert(c),
                Err(e) => {
                    ctx.reporter.warn(&format!("sweep: {e}"));
                    return;
                }
            },
        };
        finish(ctx, c, &layout, lease.as_deref(), &id);
    }
}

/// The sweep, part two (on a create, at most every [`SWEEP_INTERVAL`]): active leases of this
/// owner whose container is gone from the runtime's state directory named in their
/// `runtime-root` label (a reboot empties it).
fn sweep_leases(ctx: &Context, states: &StateDir, client: &Client, skip: Option<&str>) {
    let leases = match client.list_leases(None, &[(LABEL_OWNER, &ctx.options.owner)]) {
        Ok(leases) => leases,
        Err(e) => {
            ctx.reporter
                .warn(&format!("sweep: cannot list leases: {e}"));
            return;
        }
    };
    for lease in leases {
        let (Some(id), Some(root)) = (
            lease.labels.get(LABEL_CONTAINER),
            lease.labels.get(LABEL_ROOT),
        ) else {
            continue;
        };
        if Some(id.as_str()) == skip || !state::valid_id(id) {
            continue;
        }
        if states.container(id).dir.exists() || Context::exists(Path::new(root), id) {
            continue;
        }
        match release(client, &lease.name) {
            Ok(()) => ctx.reporter.warn(&format!(
                "sweep: released lease {} of container {id}, which no longer exists",
                lease.name
            )),
            Err(e) => ctx
                .reporter
                .warn(&format!("sweep: cannot release lease {}: {e}", lease.name)),
        }
    }
}
