//! The user database: every uid and gid that exists, through NSS (`getpwent`/`getgrent`).
//!
//! The pool check needs the ids that exist, not a probe of every id in the pool (a
//! `getpwuid` per id over 268 million ids would take hours), so we enumerate the entries.
//! NSS enumeration is not thread-safe; callers run it once at start or from one task.

use std::sync::Mutex;

/// Serialises enumeration inside this process: `getpwent` keeps a global cursor.
static ENUM_LOCK: Mutex<()> = Mutex::new(());

/// All uids of the user database (files, and whatever other NSS sources enumerate).
pub fn all_uids() -> Vec<u32> {
    let _guard = ENUM_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let mut ids = Vec::new();
    // SAFETY: setpwent/getpwent/endpwent take no arguments; the returned pointer is valid until
    // the next call and we copy the one field we need before that. The lock above keeps other
    // threads of this process from moving the shared cursor meanwhile.
    unsafe {
        libc::setpwent();
        loop {
            let entry = libc::getpwent();
            if entry.is_null() {
                break;
            }
            ids.push((*entry).pw_uid);
        }
        libc::endpwent();
    }
    ids.sort_unstable();
    ids.dedup();
    ids
}

/// All gids of the group database.
pub fn all_gids() -> Vec<u32> {
    let _guard = ENUM_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let mut ids = Vec::new();
    // SAFETY: as in `all_uids`, for the group database.
    unsafe {
        libc::setgrent();
        loop {
            let entry = libc::getgrent();
            if entry.is_null() {
                break;
            }
            ids.push((*entry).gr_gid);
        }
        libc::endgrent();
    }
    ids.sort_unstable();
    ids.dedup();
    ids
}

/// The gid of a group given by name or as a number; `None` when no such group exists.
pub fn group_id(name_or_number: &str) -> Option<u32> {
    if let Ok(gid) = name_or_number.parse::<u32>() {
        return Some(gid);
    }
    nix::unistd::Group::from_name(name_or_number)
        .ok()
        .flatten()
        .map(|g| g.gid.as_raw())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_exists_in_both_databases() {
        assert!(all_uids().contains(&0));
        assert!(all_gids().contains(&0));
    }

    #[test]
    fn group_lookup_by_name_and_number() {
        assert_eq!(group_id("root"), Some(0));
        assert_eq!(group_id("4242"), Some(4242));
        assert_eq!(group_id("no-such-group-subidd-test"), None);
    }
}
