//! Integration tests of the subidd library against the real `subidd` binary. Tests that need
//! root are ignored (not passed) when the crate was built by anyone else (`cfg(subidd_root)`,
//! build.rs).

mod lifecycle;
mod logs;
