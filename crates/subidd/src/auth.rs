//! Who may call: SO_PEERCRED and SO_PEERGROUPS on the unix socket, a bearer token and a loopback
//! `Host` on TCP.

use std::os::fd::AsFd;
use std::sync::Arc;

use axum::extract::connect_info::Connected;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::header::{AUTHORIZATION, HOST};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::serve::IncomingStream;
use subtle::ConstantTimeEq;
use tokio::net::{UnixListener, UnixStream};

use crate::error::ApiError;

/// Who sent the request, as established by this layer: the handlers read it from the request's
/// extensions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Caller {
    /// The peer's uid on the unix socket; `None` over TCP (the token says who).
    pub uid: Option<u32>,
}

/// The kernel's word on who is at the other end of a unix connection (SO_PEERCRED, taken when
/// the peer connected, so it cannot be changed by what the peer does afterwards).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerCred {
    pub uid: u32,
    pub gid: u32,
    pub pid: Option<i32>,
    /// Supplementary groups at connect time (SO_PEERGROUPS); empty when the kernel would not say.
    pub groups: Arc<[u32]>,
}

/// Connection info for the unix listener; `None` when the kernel would not say (refused).
#[derive(Debug, Clone)]
pub struct UnixPeer(pub Option<PeerCred>);

impl UnixPeer {
    /// The credentials the kernel recorded for the peer of `stream`, with its supplementary
    /// groups.
    pub fn of(stream: &UnixStream) -> UnixPeer {
        UnixPeer(stream.peer_cred().ok().map(|c| {
            let groups = match subid_sys::peer::peer_groups(stream.as_fd()) {
                Ok(groups) => groups,
                Err(error) => {
                    // Only supplementary groups are lost: uid and primary gid still decide.
                    tracing::warn!(%error, uid = c.uid(), "cannot read the peer's groups");
                    Vec::new()
                }
            };
            PeerCred {
                uid: c.uid(),
                gid: c.gid(),
                pid: c.pid(),
                groups: Arc::from(groups),
            }
        }))
    }
}

impl Connected<IncomingStream<'_, UnixListener>> for UnixPeer {
    fn connect_info(stream: IncomingStream<'_, UnixListener>) -> Self {
        UnixPeer::of(stream.io())
    }
}

/// Which peers the unix socket serves besides root.
#[derive(Debug, Clone, Default)]
pub struct UnixPolicy {
    pub allowed_uids: Arc<[u32]>,
    pub allowed_gids: Arc<[u32]>,
}

impl UnixPolicy {
    /// Root always; otherwise a listed uid, or a listed primary or supplementary gid of the peer.
    pub fn allows(&self, peer: &PeerCred) -> bool {
        peer.uid == 0
            || self.allowed_uids.contains(&peer.uid)
            || self.allowed_gids.contains(&peer.gid)
            || peer.groups.iter().any(|g| self.allowed_gids.contains(g))
    }
}

/// Middleware for the unix listener: refuses peers the policy does not allow.
pub async fn unix_auth(
    State(policy): State<UnixPolicy>,
    ConnectInfo(UnixPeer(peer)): ConnectInfo<UnixPeer>,
    mut request: Request,
    next: Next,
) -> Response {
    match peer {
        Some(cred) if policy.allows(&cred) => {
            request.extensions_mut().insert(Caller {
                uid: Some(cred.uid),
            });
            next.run(request).await
        }
        Some(cred) => {
            tracing::warn!(uid = cred.uid, gid = cred.gid, pid = ?cred.pid, "refused unix peer");
            ApiError::Forbidden(format!(
                "uid {} (gid {}) may not use this socket; an administrator can add it to \
                 allowed_uids or allowed_gids",
                cred.uid, cred.gid
            ))
            .into_response()
        }
        None => ApiError::Forbidden("the kernel did not name the peer of this connection".into())
            .into_response(),
    }
}

/// What a TCP request must present.
#[derive(Clone)]
pub struct TcpPolicy {
    pub token: Arc<[u8]>,
}

/// Middleware for the loopback TCP listener: a `Host` that names loopback (DNS rebinding
/// defence: a browser page on evil.example resolving to 127.0.0.1 still sends its own name),
/// then the bearer token, compared in constant time.
pub async fn tcp_auth(
    State(policy): State<TcpPolicy>,
    mut request: Request,
    next: Next,
) -> Response {
    let host = request
        .headers()
        .get(HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("");
    if !is_loopback_host(host) {
        return ApiError::Forbidden(format!(
            "Host {host:?} is not a loopback name; use localhost, 127.0.0.1 or [::1]"
        ))
        .into_response();
    }
    let presented = request
        .headers()
        .get(AUTHORIZATION)
        .and_then(|h| h.to_str().ok())
        .and_then(|h| h.strip_prefix("Bearer "))
        .map(str::trim)
        .unwrap_or("");
    let ok: bool = presented.as_bytes().ct_eq(&policy.token).into();
    if !ok || presented.is_empty() {
        return ApiError::Unauthorized.into_response();
    }
    request.extensions_mut().insert(Caller { uid: None });
    next.run(request).await
}

/// True for `localhost`, `127.x.y.z`, `[::1]`, each with or without a port.
pub fn is_loopback_host(host: &str) -> bool {
    let name = if let Some(rest) = host.strip_prefix('[') {
        match rest.split_once(']') {
            Some((inner, tail)) if tail.is_empty() || tail.starts_with(':') => inner,
            _ => return false,
        }
    } else {
        host.rsplit_once(':').map_or(host, |(h, _)| h)
    };
    if name.eq_ignore_ascii_case("localhost") {
        return true;
    }
    name.parse::<std::net::IpAddr>()
        .is_ok_and(|ip| ip.is_loopback())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_hosts() {
        for ok in [
            "localhost",
            "localhost:7070",
            "127.0.0.1",
            "127.0.0.1:1",
            "127.8.9.1:80",
            "[::1]",
            "[::1]:7070",
            "LOCALHOST",
        ] {
            assert!(is_loopback_host(ok), "{ok}");
        }
        for bad in [
            "",
            "evil.example",
            "evil.example:7070",
            "10.0.0.1:80",
            "[::2]:1",
            "localhost.evil.example",
            "[::1]x",
            "0.0.0.0",
        ] {
            assert!(!is_loopback_host(bad), "{bad}");
        }
    }

    #[test]
    fn policy_allows_root_listed_uids_and_gids() {
        let policy = UnixPolicy {
            allowed_uids: Arc::from(vec![1000]),
            allowed_gids: Arc::from(vec![2000]),
        };
        let peer = |uid, gid, groups: &[u32]| PeerCred {
            uid,
            gid,
            pid: None,
            groups: Arc::from(groups),
        };
        assert!(policy.allows(&peer(0, 0, &[])));
        assert!(policy.allows(&peer(1000, 5, &[])));
        assert!(policy.allows(&peer(5, 2000, &[])));
        assert!(policy.allows(&peer(5, 5, &[7, 2000])));
        assert!(!policy.allows(&peer(5, 5, &[7, 8])));
    }
}
