//! Kernel names a client may use, as types: the optional namespaces a lease's processes share
//! and the resource limits a lease or a process may set. Parsed once at the edge; an unknown name
//! is refused by name, never dropped.

use std::fmt;

/// A namespace a lease's processes may share besides its user namespace (which every lease has).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum NamespaceKind {
    /// A mount namespace (`CLONE_NEWNS`).
    Mnt,
    /// A UTS namespace: hostname and domain name (`CLONE_NEWUTS`).
    Uts,
    /// An IPC namespace: System V IPC and POSIX message queues (`CLONE_NEWIPC`).
    Ipc,
    /// A network namespace, with loopback up (`CLONE_NEWNET`).
    Net,
}

impl NamespaceKind {
    /// Every kind, in the order the API lists them.
    pub const ALL: [NamespaceKind; 4] = [
        NamespaceKind::Mnt,
        NamespaceKind::Uts,
        NamespaceKind::Ipc,
        NamespaceKind::Net,
    ];

    /// The API's (and /proc/PID/ns's) name.
    pub fn as_str(self) -> &'static str {
        match self {
            NamespaceKind::Mnt => "mnt",
            NamespaceKind::Uts => "uts",
            NamespaceKind::Ipc => "ipc",
            NamespaceKind::Net => "net",
        }
    }

    /// The kind named `name`, exactly.
    pub fn parse(name: &str) -> Result<NamespaceKind, KernelNameError> {
        Self::ALL
            .into_iter()
            .find(|k| k.as_str() == name)
            .ok_or_else(|| KernelNameError::Namespace(quote(name)))
    }
}

impl fmt::Display for NamespaceKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A resource limit (getrlimit(2)), by the name `prlimit(1)` gives it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum RlimitName {
    As,
    Core,
    Cpu,
    Data,
    Fsize,
    Locks,
    Memlock,
    Msgqueue,
    Nice,
    Nofile,
    Nproc,
    Rss,
    Rtprio,
    Rttime,
    Sigpending,
    Stack,
}

impl RlimitName {
    /// Every limit, by name.
    pub const ALL: [RlimitName; 16] = [
        RlimitName::As,
        RlimitName::Core,
        RlimitName::Cpu,
        RlimitName::Data,
        RlimitName::Fsize,
        RlimitName::Locks,
        RlimitName::Memlock,
        RlimitName::Msgqueue,
        RlimitName::Nice,
        RlimitName::Nofile,
        RlimitName::Nproc,
        RlimitName::Rss,
        RlimitName::Rtprio,
        RlimitName::Rttime,
        RlimitName::Sigpending,
        RlimitName::Stack,
    ];

    /// The API's name, as `prlimit(1)` spells it in lower case.
    pub fn as_str(self) -> &'static str {
        match self {
            RlimitName::As => "as",
            RlimitName::Core => "core",
            RlimitName::Cpu => "cpu",
            RlimitName::Data => "data",
            RlimitName::Fsize => "fsize",
            RlimitName::Locks => "locks",
            RlimitName::Memlock => "memlock",
            RlimitName::Msgqueue => "msgqueue",
            RlimitName::Nice => "nice",
            RlimitName::Nofile => "nofile",
            RlimitName::Nproc => "nproc",
            RlimitName::Rss => "rss",
            RlimitName::Rtprio => "rtprio",
            RlimitName::Rttime => "rttime",
            RlimitName::Sigpending => "sigpending",
            RlimitName::Stack => "stack",
        }
    }

    /// The limit named `name`, exactly.
    pub fn parse(name: &str) -> Result<RlimitName, KernelNameError> {
        Self::ALL
            .into_iter()
            .find(|r| r.as_str() == name)
            .ok_or_else(|| KernelNameError::Rlimit(quote(name)))
    }
}

impl fmt::Display for RlimitName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An unknown kernel name (quoted, at most 64 characters of it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KernelNameError {
    Namespace(String),
    Rlimit(String),
}

impl fmt::Display for KernelNameError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KernelNameError::Namespace(name) => write!(
                f,
                "unknown namespace {name:?}: want one of mnt, uts, ipc, net"
            ),
            KernelNameError::Rlimit(name) => write!(
                f,
                "unknown rlimit {name:?}: want one of {}",
                RlimitName::ALL.map(RlimitName::as_str).join(", ")
            ),
        }
    }
}

impl std::error::Error for KernelNameError {}

fn quote(name: &str) -> String {
    name.chars().take(64).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_unknown_ones_are_named() {
        for k in NamespaceKind::ALL {
            assert_eq!(NamespaceKind::parse(k.as_str()), Ok(k));
        }
        for r in RlimitName::ALL {
            assert_eq!(RlimitName::parse(r.as_str()), Ok(r));
        }
        let err = NamespaceKind::parse("pid").unwrap_err();
        assert!(err.to_string().contains("\"pid\""), "{err}");
        let err = RlimitName::parse("NOFILE").unwrap_err();
        assert!(err.to_string().contains("nofile"), "{err}");
        assert!(
            NamespaceKind::parse("user").is_err(),
            "user is not optional"
        );
    }
}
