//! The sockets a worker may get over its channel (`queryServer`, in either protocol) and the
//! record of what it got. Bounded, so that a worker cannot make the primary create groups (each
//! a loaded eBPF program and its maps) without end, and cannot get through the primary a port
//! it could not bind itself.

use std::{
    collections::HashMap,
    net::SocketAddr,
    os::fd::{AsRawFd, OwnedFd},
    path::Path,
};

use cluster_lb_worker::ListenAddr;
use nix::unistd::Pid;

use crate::{
    kernel::{groups::Groups, sockets::Stack, unix_listens::UnixListen},
    sys,
};

/// Addresses the workers of one cluster may ask for (groups besides the --listen ones).
pub const MAX_QUERY_GROUPS: usize = 16;
/// Listen requests one worker process may make.
pub const MAX_QUERIES_PER_WORKER: u32 = 32;

/// A listen the primary will not serve: the errno the worker sees, and why (for the log).
pub struct Refusal {
    pub errno: i32,
    pub why: String,
}

impl Refusal {
    pub fn new(errno: i32, why: impl Into<String>) -> Refusal {
        Refusal {
            errno,
            why: why.into(),
        }
    }
}

/// A worker's listening sockets, as the primary handed them out.
#[derive(Debug, Default)]
pub struct Claims {
    pub slot: u32,
    /// Addresses it has sockets for (socket-activated, or from queryServer).
    pub addresses: Vec<ListenAddr>,
    /// The listening sockets the primary gave it: inode -> the group's address.
    pub given: HashMap<u64, ListenAddr>,
    /// Listen requests it made.
    pub queries: u32,
}

impl Claims {
    /// Notes that `socket`, of `addr`'s group, went to the worker.
    pub fn record(&mut self, addr: ListenAddr, socket: &OwnedFd) {
        if let Some(inode) = sys::fds::inode(socket.as_raw_fd()) {
            self.given.insert(inode, addr);
        }
        if !self.addresses.contains(&addr) {
            self.addresses.push(addr);
        }
    }
}

/// What the workers may ask the primary for beyond the `--listen` addresses.
#[derive(Clone, Copy, Debug)]
pub struct QueryPolicy {
    /// Ports below 1024: the workers run as the primary's user, or --allow-low-ports.
    pub low_ports: bool,
    /// Unix-socket paths: the workers run as the primary's user, so the primary binds no path
    /// they could not bind themselves (a --user worker must have its path named by --listen).
    pub own_paths: bool,
}

/// Where a worker's socket comes from: the groups, under the cluster's policy.
pub struct Sockets<'a> {
    pub groups: &'a mut Groups,
    pub policy: QueryPolicy,
}

impl Sockets<'_> {
    /// A socket for `addr` in the worker's slot, its group created on first use, if the policy
    /// above allows it; recorded in `claims`.
    pub fn open(
        &mut self,
        claims: &mut Claims,
        addr: ListenAddr,
        stack: Stack,
    ) -> Result<(ListenAddr, OwnedFd), Refusal> {
        claims.queries += 1;
        if claims.queries > MAX_QUERIES_PER_WORKER {
            return Err(Refusal::new(
                libc::EACCES,
                format!("more than {MAX_QUERIES_PER_WORKER} listen requests from one worker"),
            ));
        }
        let port = addr.socket_addr().port();
        if port != 0 && port < 1024 && !self.policy.low_ports {
            return Err(Refusal::new(
                libc::EACCES,
                format!("port {port} is below 1024, which the --user workers could not bind themselves; name the address with --listen (or pass --allow-low-ports)"),
            ));
        }
        if !self.groups.contains(addr)
            && self.groups.queried() + self.groups.unix().queried() >= MAX_QUERY_GROUPS
        {
            return Err(Refusal::new(
                libc::EACCES,
                format!("the workers asked for {MAX_QUERY_GROUPS} addresses already, the most one cluster serves without --listen"),
            ));
        }
        let (addr, socket) = self
            .groups
            .open_at(addr, stack, claims.slot)
            .map_err(|e| Refusal::new(e.errno(), e.to_string()))?;
        claims.record(addr, &socket);
        Ok((addr, socket))
    }

    /// A copy of the socket listening on the Unix path `path`: a `--listen unix:` path, or,
    /// when none was given and the policy allows it, one bound for the first worker that asks.
    pub fn unix(
        &mut self,
        claims: &mut Claims,
        path: &Path,
        (readable_all, writable_all): (bool, bool),
    ) -> Result<OwnedFd, Refusal> {
        claims.queries += 1;
        if claims.queries > MAX_QUERIES_PER_WORKER {
            return Err(Refusal::new(
                libc::EACCES,
                format!("more than {MAX_QUERIES_PER_WORKER} listen requests from one worker"),
            ));
        }
        let copy = |listen: &UnixListen| {
            let refusal = |e: std::io::Error| {
                Refusal::new(e.raw_os_error().unwrap_or(libc::EINVAL), e.to_string())
            };
            listen
                .allow_all(readable_all, writable_all)
                .map_err(refusal)?;
            listen.socket().map_err(refusal)
        };
        let unix = self.groups.unix();
        if let Some(listen) = unix.find(path) {
            return copy(listen);
        }
        if self.groups.any_listen() {
            return Err(Refusal::new(
                libc::EACCES,
                "not one of the --listen addresses this cluster was started with",
            ));
        }
        if !self.policy.own_paths {
            return Err(Refusal::new(
                libc::EACCES,
                format!("the --user workers ask for a Unix socket the primary would bind with its own privileges; name it with --listen unix:{}", path.display()),
            ));
        }
        if self.groups.queried() + unix.queried() >= MAX_QUERY_GROUPS {
            return Err(Refusal::new(
                libc::EACCES,
                format!("the workers asked for {MAX_QUERY_GROUPS} addresses already, the most one cluster serves without --listen"),
            ));
        }
        let listen = self
            .groups
            .unix_mut()
            .add(path)
            .map_err(|e| Refusal::new(e.errno(), e.to_string()))?;
        copy(listen)
    }

    /// A copy of the socket of the `index`th `--listen unix:` path, which the worker got at
    /// fd `3 + index + the number of --listen addresses`.
    pub fn activated_unix(&self, index: usize) -> Option<Result<OwnedFd, Refusal>> {
        let listen = self.groups.unix().activated().get(index)?;
        Some(
            listen
                .socket()
                .map_err(|e| Refusal::new(libc::EINVAL, e.to_string())),
        )
    }

    /// The socket worker `pid` got as fd `3 + index` by socket activation, fetched from the
    /// worker (pidfd_getfd), so that a listen on it serves on the very socket in the group's
    /// slot: a second socket would sit in the group unaccepted.
    pub fn activated(&self, pid: Pid, index: usize) -> Result<(ListenAddr, OwnedFd), Refusal> {
        let addr = self
            .groups
            .activated_addr(index)
            .ok_or_else(|| Refusal::new(libc::EINVAL, "no such --listen address"))?;
        let fd = 3 + index as i32;
        let socket = sys::pidfd::take_fd(pid.as_raw(), fd).map_err(|e| {
            Refusal::new(
                libc::EINVAL,
                format!("cannot take the worker's fd {fd} (its socket for {addr}): {e}"),
            )
        })?;
        if bound_address(&socket) != Some(addr.socket_addr()) {
            return Err(Refusal::new(
                libc::EINVAL,
                format!("the worker's fd {fd} is no longer its socket for {addr}"),
            ));
        }
        Ok((addr, socket))
    }
}

/// The address a socket is bound to.
fn bound_address(socket: &OwnedFd) -> Option<SocketAddr> {
    let bound =
        nix::sys::socket::getsockname::<nix::sys::socket::SockaddrStorage>(socket.as_raw_fd())
            .ok()?;
    bound
        .as_sockaddr_in()
        .map(|v4| SocketAddr::from(std::net::SocketAddrV4::from(*v4)))
        .or_else(|| {
            bound
                .as_sockaddr_in6()
                .map(|v6| SocketAddr::from(std::net::SocketAddrV6::from(*v6)))
        })
}
