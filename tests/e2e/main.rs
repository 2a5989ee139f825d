//! End-to-end tests: the real `subidd` binary on temp paths, driven over its unix socket.

mod access;
mod bad_input;
mod caps;
mod concurrency;
mod config;
mod idmap;
mod leases;
mod observability;
mod pool;
mod quarantine;
mod restart;
mod spawn_api;
mod ttl;
mod util;
