//! The log keeper on its own (`subid-logkeeper --log-keeper --socket PATH --log-dir DIR
//! --max-bytes N`): the same loop `subidd --log-keeper` runs, as a binary of this crate so its
//! kernel tests can start a real keeper process. The daemon never runs this one.

#![forbid(unsafe_code)]

fn main() -> std::process::ExitCode {
    subid_sys::logkeep::keeper_main(std::env::args_os().skip(1))
}
