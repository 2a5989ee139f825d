//! Sets cfg `subidd_postgres` when PostgreSQL's programs are installed (`initdb` on PATH or in
//! `/usr/lib/postgresql/<version>/bin`), so the store tests against a real PostgreSQL are
//! reported as ignored, not passed, where it is missing.

fn main() {
    println!("cargo::rustc-check-cfg=cfg(subidd_postgres)");
    println!("cargo::rerun-if-changed=build.rs");
    println!("cargo::rerun-if-env-changed=PATH");
    if has_initdb() {
        println!("cargo::rustc-cfg=subidd_postgres");
    }
}

fn has_initdb() -> bool {
    let path = std::env::var_os("PATH").unwrap_or_default();
    if std::env::split_paths(&path).any(|dir| dir.join("initdb").is_file()) {
        return true;
    }
    std::fs::read_dir("/usr/lib/postgresql")
        .map(|entries| {
            entries
                .flatten()
                .any(|e| e.path().join("bin/initdb").is_file())
        })
        .unwrap_or(false)
}
