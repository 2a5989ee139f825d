//! Every lease's processes in cgroups of the lease: the kernel object that holds them, caps them
//! (`pids.max`) and lets teardown kill them all, on cgroup v1, v2 and hybrids.
//!
//! # Rooms
//! `layout.rs` reads the host's hierarchies ([`CgroupHost::detect`]); `lease.rs` makes the
//! parents and one lease's cgroups ([`LeaseCgroups`], each a [`LeaseCgroup`]) and tears them
//! down; `fs.rs` holds the cgroupfs file protocol (one value per `write(2)`, trees, waiting).
//!
//! # Where a lease's processes live
//! Every lease with processes has a *tracking* cgroup, whether or not it asked for a cap: on the
//! cgroup2 hierarchy when one is mounted (pure cgroup2, and the hybrids where cgroup2 has no
//! controllers), else on the v1 hierarchy that has the `pids` controller. Its processes are born
//! there and cannot leave it (moving a process needs write access to the host's cgroupfs, which
//! no process of a lease has, whatever user namespaces it nests), so the cgroup holds the whole
//! lease, processes in nested user namespaces and processes that fork as fast as they can
//! included. A lease with `pids_max` has its cap on the hierarchy with the pids controller: the
//! tracking cgroup itself when that hierarchy has it, else a second cgroup on the v1 pids
//! hierarchy (this project's hybrid machines).
//!
//! Lease cgroups are named `lease-<name>` under the parent (default `<own cgroup>/subidd` in
//! each hierarchy), so no lease name can collide with the kernel's interface files (`tasks`,
//! `cgroup.procs`, `notify_on_release`, ...) that share a v1 directory.
//!
//! # cgroup2 and the no-internal-process rule
//! On cgroup2 a non-root cgroup may enable controllers for its children only while it has no
//! processes of its own (cgroup-v2.rst, "No Internal Process Constraint"). A daemon started by
//! systemd with `Delegate=yes` sits in its own cgroup, so before `+pids` can be written into
//! that cgroup's `cgroup.subtree_control`, [`CgroupParent::prepare`] moves every process of it
//! into a leaf `<own>/daemon` (what systemd.resource-control(5) recommends for delegated
//! services), then enables `+pids` down to the parent. Tracking alone needs no controller, so a
//! host without pids never moves the daemon. The root cgroup is exempt from the rule.
//!
//! # Starting processes inside
//! See [`crate::spawn`]: on cgroup2 every child is made with `clone3(CLONE_INTO_CGROUP)` on the
//! lease's directory; on a v1 hierarchy a per-lease spawner sitting in the cgroup clones the
//! joining children ([`crate::spawn::CgroupSpawner`]), and the first process of a new namespace
//! is moved in by the daemon before it runs anything (one `cgroup.procs` write per lease: such
//! a write waits for an RCU grace period, 5-19 ms measured here when spawns are spread out, see
//! docs/BENCHMARKS.md). The spawner counts against `pids.max`, so while it runs the v1
//! cgroup's limit is the lease's `pids_max` plus one, and `pids.current` is reported without it:
//! `pids_max` is the lease's whole budget on every layout.
//!
//! # Teardown
//! [`LeaseCgroups::kill`]: cgroup2 writes `1` to `cgroup.kill` (Linux >= 5.14), which kills
//! every process of the cgroup and its descendants, forks racing with it included, then waits
//! for `populated 0` in `cgroup.events`. A v1 tracking cgroup first gets `pids.max` 0, so no
//! process of it can fork any more (and freezes when `freezer` is co-mounted), then SIGKILLs
//! every member through a pidfd verified to still be in the cgroup (so a reused pid is never
//! hit) until `cgroup.procs` is empty. Then the cgroups are removed, children first. Every wait
//! has a deadline; every failure is collected into [`SysError::Teardown`].

mod fs;
mod layout;
mod lease;

use std::time::Duration;

/// How long a teardown waits for a cgroup to empty before it reports what is left.
pub const TEARDOWN_TIMEOUT: Duration = Duration::from_secs(10);

pub(crate) use fs::move_into;
pub use layout::{CgroupHost, CgroupMode, CgroupSummary, CgroupVersion, Hierarchy};
pub use lease::{
    CgroupParent, CgroupParents, LEASE_PREFIX, LeaseCgroup, LeaseCgroups, SpawnCgroup,
};

pub use crate::spawn::CgroupSpawner;
