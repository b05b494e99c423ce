//! Listening sockets: one per worker per listen address, all in one SO_REUSEPORT group.

use std::{fmt, io};

use socket2::{Domain, Protocol, SockAddr, Socket, Type};

use cluster_lb_worker::listen_addr::{ListenAddr, Transport};

/// Accept queue length asked for; the kernel caps it at net.core.somaxconn.
const BACKLOG: i32 = 4096;

/// A socket could not be made to listen on an address; `Display` says what to do.
#[derive(Debug)]
pub struct ListenError {
    pub addr: ListenAddr,
    pub source: io::Error,
}

impl ListenError {
    /// The errno, for answers that carry one (a Node worker's `listen` error).
    pub fn errno(&self) -> i32 {
        self.source.raw_os_error().unwrap_or(libc::EINVAL)
    }
}

impl fmt::Display for ListenError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let addr = self.addr;
        let advice = match self.source.raw_os_error() {
            Some(libc::EADDRINUSE) => {
                "address already in use: another process listens there; stop it or pick another --listen port"
            }
            Some(libc::EADDRNOTAVAIL) => {
                "address not available: no local interface has that IP; use one of this host's addresses or 0.0.0.0"
            }
            Some(libc::EACCES) => {
                "permission denied: ports below 1024 need root or CAP_NET_BIND_SERVICE"
            }
            _ => return write!(f, "cannot listen on {addr}: {}", self.source),
        };
        write!(f, "cannot listen on {addr}: {advice}")
    }
}

impl std::error::Error for ListenError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.source)
    }
}

/// Fails with a clear message when something else already listens on `addr`.
///
/// Our own sockets set SO_REUSEPORT, and the kernel lets any socket of the same user that also
/// sets it join an existing group. Without this check cluster-lb (as root) would silently share
/// a port with another root server instead of reporting that the port is taken. A socket without
/// SO_REUSEPORT cannot bind while anything listens there, so one bind tells.
pub fn ensure_address_free(addr: ListenAddr, stack: Stack) -> Result<(), ListenError> {
    let error = |source| ListenError { addr, source };
    let probe = new_socket(addr, stack).map_err(error)?;
    probe
        .bind(&SockAddr::from(addr.socket_addr()))
        .map_err(error)
}

/// A new listening socket (for UDP, a bound socket) for one worker, bound with SO_REUSEPORT
/// into the group of `addr`.
pub fn reuseport_listener(addr: ListenAddr, stack: Stack) -> Result<Socket, ListenError> {
    let error = |source| ListenError { addr, source };
    let socket = new_socket(addr, stack).map_err(error)?;
    socket.set_reuse_port(true).map_err(error)?;
    socket
        .bind(&SockAddr::from(addr.socket_addr()))
        .map_err(error)?;
    if !addr.is_udp() {
        socket.listen(BACKLOG).map_err(error)?;
    }
    Ok(socket)
}

/// Whether an IPv6 socket takes IPv4 too.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Stack {
    /// The system's default (net.ipv6.bindv6only), for `--listen` addresses.
    #[default]
    System,
    /// IPv4 too: Node's default for a listen without a host.
    Dual,
    /// IPv6 only: Node's `ipv6Only: true`.
    V6Only,
}

fn new_socket(addr: ListenAddr, stack: Stack) -> io::Result<Socket> {
    let (kind, protocol) = match addr.transport() {
        Transport::Tcp => (Type::STREAM, Protocol::TCP),
        Transport::Udp => (Type::DGRAM, Protocol::UDP),
    };
    let socket = Socket::new(
        Domain::for_address(addr.socket_addr()),
        kind,
        Some(protocol),
    )?;
    // So a restart binds at once although old connections linger in TIME_WAIT.
    if !addr.is_udp() {
        socket.set_reuse_address(true)?;
    }
    if addr.socket_addr().is_ipv6() {
        match stack {
            Stack::System => {}
            Stack::Dual => socket.set_only_v6(false)?,
            Stack::V6Only => socket.set_only_v6(true)?,
        }
    }
    Ok(socket)
}
