//! Kernel tests of subid-sys: real namespaces, real /proc, real mounts. Tests that need root are
//! ignored (not passed) when the crate was built by anyone else (`cfg(subidd_root)`, build.rs).

mod support;

mod cgroup;
mod extra;
mod idmount;
mod inotify;
mod logkeep;
mod pins;
mod spawn;
