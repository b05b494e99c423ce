//! Listening sockets: one per worker per listen address, all in one SO_REUSEPORT group.

use std::io;

use anyhow::{Context, Result};
use socket2::{Domain, Protocol, SockAddr, Socket, Type};

use crate::listen_addr::ListenAddr;

/// Accept queue length asked for; the kernel caps it at net.core.somaxconn.
const BACKLOG: i32 = 4096;

/// Fails with a clear message when something else already listens on `addr`.
///
/// Our own sockets set SO_REUSEPORT, and the kernel lets any socket of the same user that also
/// sets it join an existing group. Without this check cluster-lb (as root) would silently share
/// a port with another root server instead of reporting that the port is taken. A socket without
/// SO_REUSEPORT cannot bind while anything listens there, so one bind tells.
pub fn ensure_address_free(addr: ListenAddr) -> Result<()> {
    let probe = new_socket(addr).with_context(|| format!("cannot listen on {addr}"))?;
    probe
        .bind(&SockAddr::from(addr.socket_addr()))
        .map_err(|e| bind_error(addr, e))
}

/// A new listening socket for one worker, bound with SO_REUSEPORT into the group of `addr`.
pub fn reuseport_listener(addr: ListenAddr) -> Result<Socket> {
    let socket = new_socket(addr).with_context(|| format!("cannot listen on {addr}"))?;
    socket
        .set_reuse_port(true)
        .with_context(|| format!("setting SO_REUSEPORT for {addr}"))?;
    socket
        .bind(&SockAddr::from(addr.socket_addr()))
        .map_err(|e| bind_error(addr, e))?;
    socket
        .listen(BACKLOG)
        .with_context(|| format!("cannot listen on {addr}"))?;
    Ok(socket)
}

fn new_socket(addr: ListenAddr) -> io::Result<Socket> {
    let socket = Socket::new(
        Domain::for_address(addr.socket_addr()),
        Type::STREAM,
        Some(Protocol::TCP),
    )?;
    // So a restart binds at once although old connections linger in TIME_WAIT.
    socket.set_reuse_address(true)?;
    Ok(socket)
}

fn bind_error(addr: ListenAddr, error: io::Error) -> anyhow::Error {
    let advice = match error.raw_os_error() {
        Some(libc::EADDRINUSE) => {
            "address already in use: another process listens there; stop it or pick another --listen port"
        }
        Some(libc::EADDRNOTAVAIL) => {
            "address not available: no local interface has that IP; use one of this host's addresses or 0.0.0.0"
        }
        Some(libc::EACCES) => {
            "permission denied: ports below 1024 need root or CAP_NET_BIND_SERVICE"
        }
        _ => return anyhow::Error::new(error).context(format!("cannot listen on {addr}")),
    };
    anyhow::anyhow!("cannot listen on {addr}: {advice}")
}
