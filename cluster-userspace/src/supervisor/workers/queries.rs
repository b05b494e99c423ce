//! The sockets a worker may get over its channel (`queryServer`, in either protocol) and the
//! record of what it got. Bounded, so that a worker cannot make the primary create groups (each
//! a loaded eBPF program and its maps) without end, and cannot get through the primary a port
//! it could not bind itself.

use std::{
    collections::HashMap,
    net::SocketAddr,
    os::fd::{AsRawFd, OwnedFd},
};

use cluster_lb_worker::ListenAddr;
use nix::unistd::Pid;

use crate::{
    kernel::{groups::Groups, sockets::Stack},
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

/// Where a worker's socket comes from: the groups, under the cluster's policy.
pub struct Sockets<'a> {
    pub groups: &'a mut Groups,
    /// Ports below 1024 may be asked for: the workers run as root, or --allow-low-ports.
    pub low_ports: bool,
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
        if port != 0 && port < 1024 && !self.low_ports {
            return Err(Refusal::new(
                libc::EACCES,
                format!("port {port} is below 1024, which the --user workers could not bind themselves; name the address with --listen (or pass --allow-low-ports)"),
            ));
        }
        if !self.groups.contains(addr) && self.groups.queried() >= MAX_QUERY_GROUPS {
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
