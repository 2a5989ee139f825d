//! subidd: leases of host id ranges over a unix-socket REST API. `main.rs` is a thin shell
//! around [`server::run`]; the modules are public so the handler tests and benches can reach them.

#![forbid(unsafe_code)]

pub mod api;
pub mod auth;
pub mod blocking;
pub mod clock;
pub mod config;
pub mod error;
pub mod events;
pub mod fleet;
pub mod holds;
pub mod lease;
pub mod limits;
pub mod logs;
pub mod metrics;
pub mod move_in;
pub mod paths;
pub mod pool;
pub mod process;
pub mod registry;
pub mod server;
pub mod service_error;
pub mod systemd;
pub mod wire;
