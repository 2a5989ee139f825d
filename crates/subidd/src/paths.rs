//! Start-up checks on the directories and files the daemon trusts. Whoever can write to the
//! runtime directory, or rename it or one of its parents, can swap the namespace pins under
//! `ns/` (or the socket) for their own; whoever can read the token file can use the TCP API.
//! So the daemon refuses, naming the path and the command that fixes it, a directory (or any
//! parent of it) that is not owned by root or that group or others may write to, unless it is
//! sticky (like /tmp: only an entry's owner may then rename or remove it), and a token file
//! that is not root's alone. See path_resolution(7) and the sticky bit in inode(7).

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Why a path may not be trusted.
#[derive(Debug, thiserror::Error)]
pub enum PathError {
    #[error("cannot inspect {what} {}: {source}", path.display())]
    Inspect {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The directory, or a parent of it (`at`), is not root's or is open to writers.
    #[error("{message}")]
    Untrusted {
        path: PathBuf,
        at: PathBuf,
        message: String,
    },
    #[error(
        "{what} {} is {problem}: {why}. Fix: chown root:root {}; chmod 0600 {}",
        path.display(),
        path.display(),
        path.display()
    )]
    SecretExposed {
        what: &'static str,
        path: PathBuf,
        problem: String,
        why: &'static str,
    },
}

/// Refuses `dir` unless it and every parent of it are owned by root and not writable by group
/// or others (a sticky parent may be: it keeps others from renaming what root owns in it).
/// `what` names the setting (`runtime_dir`, `state_dir`, ...). Symbolic links are followed:
/// what counts is the directory the daemon will really use.
pub fn check_trusted_dir(what: &'static str, dir: &Path) -> Result<(), PathError> {
    check_dir_owned_by(what, dir, &|uid| uid == 0)
}

/// [`check_trusted_dir`] with `trusted` saying which owners count as root (tests run as
/// whoever they run as).
pub(crate) fn check_dir_owned_by(
    what: &'static str,
    dir: &Path,
    trusted: &dyn Fn(u32) -> bool,
) -> Result<(), PathError> {
    let inspect = |path: &Path, source| PathError::Inspect {
        what,
        path: path.to_path_buf(),
        source,
    };
    let real = dir.canonicalize().map_err(|e| inspect(dir, e))?;
    let untrusted = |at: &Path, message: String| PathError::Untrusted {
        path: dir.to_path_buf(),
        at: at.to_path_buf(),
        message,
    };
    let shown = dir.display();
    let mut at = Some(real.as_path());
    while let Some(current) = at {
        let meta = std::fs::metadata(current).map_err(|e| inspect(current, e))?;
        let itself = current == real;
        let here = current.display();
        if !trusted(meta.uid()) {
            let uid = meta.uid();
            return Err(untrusted(
                current,
                if itself {
                    format!(
                        "{what} {shown} is owned by uid {uid}, not root: its owner could replace \
                         what subidd keeps there. Fix: chown root:root {here}; chmod 0755 {here}"
                    )
                } else {
                    format!(
                        "{what} {shown} sits in {here}, which is owned by uid {uid}, not root: \
                         its owner could move {shown} away and put its own in its place. Fix: \
                         chown root:root {here}; chmod 0755 {here}, or choose a {what} whose \
                         parents are all root's"
                    )
                },
            ));
        }
        let mode = meta.permissions().mode() & 0o7777;
        let sticky = mode & 0o1000 != 0;
        // The directory itself must not be writable by others, sticky or not: they could make
        // entries the daemon expects to make itself. A parent may be sticky (like /tmp): then
        // only an entry's owner may rename or remove it.
        if mode & 0o022 != 0 && (itself || !sticky) {
            let who = match (mode & 0o020 != 0, mode & 0o002 != 0) {
                (true, true) => "group and others",
                (true, false) => "its group",
                _ => "others",
            };
            return Err(untrusted(
                current,
                if itself {
                    format!(
                        "{what} {shown} is writable by {who} (mode {mode:04o}): they could \
                         replace what subidd keeps there. Fix: chmod go-w {here} (e.g. chmod \
                         0755 {here})"
                    )
                } else {
                    format!(
                        "{what} {shown} sits in {here}, which is writable by {who} (mode \
                         {mode:04o}) and not sticky: they could move {shown} away and put their \
                         own in its place. Fix: chmod go-w {here} (or chmod +t {here})"
                    )
                },
            ));
        }
        at = current.parent();
    }
    Ok(())
}

/// Refuses a token file that is not root's alone: owned by another uid, or with any permission
/// for group or others.
pub fn check_token_file(path: &Path) -> Result<(), PathError> {
    check_secret_owned_by(path, 0, TOKEN)
}

/// Refuses a fleet store's password file that is not root's alone, as [`check_token_file`].
pub fn check_password_file(path: &Path) -> Result<(), PathError> {
    check_secret_owned_by(path, 0, PASSWORD)
}

/// A file whose contents let its reader act as the daemon: its setting, and why it matters.
type Secret = (&'static str, &'static str);

const TOKEN: Secret = (
    "token_file",
    "anyone who can read it can use the TCP API, which starts processes as root inside leases",
);

const PASSWORD: Secret = (
    "store.password_file",
    "anyone who can read it can change and release every lease of every host of the fleet",
);

/// Refuses `path` unless `owner` owns it and it grants nothing to group or others.
fn check_secret_owned_by(path: &Path, owner: u32, (what, why): Secret) -> Result<(), PathError> {
    let meta = std::fs::metadata(path).map_err(|source| PathError::Inspect {
        what,
        path: path.to_path_buf(),
        source,
    })?;
    let mode = meta.permissions().mode() & 0o7777;
    let problem = if meta.uid() != owner {
        format!("owned by uid {}, not root", meta.uid())
    } else if mode & 0o077 != 0 {
        format!("open to group or others (mode {mode:04o})")
    } else {
        return Ok(());
    };
    Err(PathError::SecretExposed {
        what,
        path: path.to_path_buf(),
        problem,
        why,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chmod(path: &Path, mode: u32) {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
    }

    /// The uid that owns what this test makes, and the owner of every parent of the temp dir
    /// (root, on the machines the tests run on, for `/` and `/tmp`); the tests trust `me`.
    fn me(path: &Path) -> u32 {
        std::fs::metadata(path).expect("stat").uid()
    }

    fn base() -> tempfile::TempDir {
        tempfile::tempdir().expect("tempdir")
    }

    /// The checks with the test's own uid trusted besides root (the temp dir's parents are
    /// root's, what the test makes is its own).
    fn check(dir: &Path, me: u32) -> Result<(), PathError> {
        check_dir_owned_by("runtime_dir", dir, &|uid| uid == 0 || uid == me)
    }

    #[test]
    fn trusted_dirs_are_their_owners_and_closed_to_writers() {
        let base = base();
        let me = me(base.path());
        let run = base.path().join("run");
        std::fs::create_dir(&run).expect("mkdir");
        chmod(&run, 0o755);
        check(&run, me).expect("owned, 0755");

        chmod(&run, 0o775);
        let err = check(&run, me).expect_err("group-writable");
        let text = err.to_string();
        assert!(
            text.contains("runtime_dir") && text.contains("its group") && text.contains("0775"),
            "{text}"
        );
        assert!(
            text.contains(&format!("chmod go-w {}", run.display())),
            "{text}"
        );
        chmod(&run, 0o1777);
        assert!(
            check(&run, me).is_err(),
            "the directory itself may not be writable, sticky or not"
        );
        chmod(&run, 0o755);

        // Owned by someone else than the trusted owner.
        // (The directory itself is checked first, so trusting nobody but others names it.)
        let err = check_dir_owned_by("runtime_dir", &run, &|uid| uid != me)
            .expect_err("not the trusted owner's");
        let text = err.to_string();
        assert!(text.contains(&format!("uid {me}")), "{text}");
        assert!(
            text.contains(&format!("chown root:root {}", run.display())),
            "{text}"
        );

        // A parent others may write to could have the directory renamed away and replaced.
        let parent = base.path().join("shared");
        let inner = parent.join("run");
        std::fs::create_dir_all(&inner).expect("mkdir");
        chmod(&inner, 0o755);
        chmod(&parent, 0o777);
        let err = check(&inner, me).expect_err("writable parent");
        let text = err.to_string();
        assert!(
            matches!(err, PathError::Untrusted { .. })
                && text.contains(&format!("sits in {}, which is writable", parent.display())),
            "{text}"
        );
        // A sticky, world-writable parent (like /tmp) is fine.
        chmod(&parent, 0o1777);
        check(&inner, me).expect("sticky parent");
        chmod(&parent, 0o755);
        // A symbolic link counts as the directory it leads to.
        let link = base.path().join("link");
        std::os::unix::fs::symlink(&run, &link).expect("symlink");
        chmod(&run, 0o777);
        assert!(check(&link, me).is_err(), "the link's target is checked");
        chmod(&run, 0o755);
    }

    #[test]
    fn token_files_are_their_owners_alone() {
        let dir = base();
        let token = dir.path().join("token");
        std::fs::write(&token, "t\n").expect("write");
        let me = me(&token);
        for mode in [0o644, 0o640, 0o604, 0o660] {
            chmod(&token, mode);
            let err = check_secret_owned_by(&token, me, TOKEN).expect_err("open to others");
            let text = err.to_string();
            assert!(
                text.contains(&format!("chmod 0600 {}", token.display()))
                    && text.contains(&format!("{mode:04o}")),
                "{mode:o}: {text}"
            );
        }
        chmod(&token, 0o600);
        check_secret_owned_by(&token, me, TOKEN).expect("the owner's alone");
        let err =
            check_secret_owned_by(&token, me.wrapping_add(1), TOKEN).expect_err("not the owner's");
        assert!(err.to_string().contains(&format!("uid {me}")), "{err}");
        // A fleet store's password file is held to the same rule, and says what it guards.
        chmod(&token, 0o640);
        let err = check_secret_owned_by(&token, me, PASSWORD).expect_err("open to the group");
        let text = err.to_string();
        assert!(
            text.starts_with("store.password_file") && text.contains("every lease of every host"),
            "{text}"
        );
    }
}
