//! End-to-end tests: the real `subidd` binary on temp paths, driven over its unix socket.

mod access;
mod bad_input;
mod caps;
mod concurrency;
mod config;
mod containment;
mod crash;
mod fleet;
mod fleet_move_in;
mod fleet_outage;
mod idmap;
mod integrations;
mod leases;
mod limits;
mod load;
mod observability;
mod pool;
mod quarantine;
mod reconcile;
mod restart;
mod spawn_api;
mod spawn_faults;
mod storage;
mod systemd;
mod ttl;
mod util;
