//! Workers of a primary that died: when the primary is SIGKILLed outside systemd, its workers
//! get SIGTERM from the kernel (PR_SET_PDEATHSIG), but one that ignores it keeps serving
//! unsupervised, holding the port, and a restarted primary would be refused "address already
//! in use" with no word of why. A new primary whose address is taken looks at who holds it:
//! former workers of a primary that is gone are stopped (SIGTERM, SIGKILL after the grace
//! period); anyone else is named in the error.
//!
//! A former worker is known by `CLUSTER_LB_PRIMARY` in its environment (every worker gets its
//! primary's pid there) when no ancestor of it has that pid any more: a worker of a live
//! primary is that primary's descendant, whatever became of its pid otherwise.

use std::{net::SocketAddr, time::Duration};

use nix::{sys::signal::Signal, unistd::Pid};

use cluster_lb_worker::ListenAddr;

use super::workers::PRIMARY_VARIABLE;
use crate::{
    kernel::sockets::{self, ListenError},
    sys::procfs::{self, alive, all_pids, environ_var, parent},
};

/// Why an address cannot be had.
#[derive(Debug, thiserror::Error)]
pub enum ClaimError {
    #[error(transparent)]
    Listen(#[from] ListenError),
    #[error("cannot listen on {addr}: address already in use by {}; stop it or pick another --listen port", .holders.iter().map(ToString::to_string).collect::<Vec<_>>().join(", "))]
    InUse {
        addr: ListenAddr,
        holders: Vec<Holder>,
    },
}

/// Makes sure `addr` is free for a new cluster: former workers of a primary that is gone are
/// stopped; any other holder is named in the error.
pub fn claim(addr: ListenAddr, grace: Duration) -> Result<(), ClaimError> {
    let error = match sockets::ensure_address_free(addr, sockets::Stack::System) {
        Err(error) if error.errno() == libc::EADDRINUSE => error,
        other => return Ok(other?),
    };
    let found = holders(addr);
    if found.iter().any(|h| h.former_worker_of.is_some()) {
        stop(&found, addr, grace);
        if sockets::ensure_address_free(addr, sockets::Stack::System).is_ok() {
            return Ok(());
        }
    }
    match holders(addr) {
        holders if holders.is_empty() => Err(error.into()),
        holders => Err(ClaimError::InUse { addr, holders }),
    }
}

/// A process that holds a listening socket on an address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holder {
    pub pid: i32,
    pub command: String,
    /// The pid of the cluster-lb primary it was a worker of, when that primary is gone.
    pub former_worker_of: Option<i32>,
}

impl std::fmt::Display for Holder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "pid {} ({})", self.pid, self.command)
    }
}

/// Who holds a listening TCP socket on `addr` (an exact match, or a wildcard of the same
/// port and family that covers it).
fn holders(addr: ListenAddr) -> Vec<Holder> {
    if addr.is_udp() {
        return Vec::new();
    }
    let Some(listening) = procfs::listening_tcp() else {
        return Vec::new();
    };
    let wanted = addr.socket_addr();
    let inodes: Vec<u64> = listening
        .iter()
        .filter(|(_, bound)| covers(*bound, wanted))
        .map(|(inode, _)| *inode)
        .collect();
    if inodes.is_empty() {
        return Vec::new();
    }
    let mut found = Vec::new();
    for pid in all_pids() {
        let held = procfs::socket_inodes(pid);
        if inodes.iter().any(|inode| held.contains(inode)) {
            found.push(Holder {
                pid,
                command: procfs::command_name(pid),
                former_worker_of: former_primary(pid),
            });
        }
    }
    found
}

/// Whether a socket bound to `bound` conflicts with binding `wanted`.
fn covers(bound: SocketAddr, wanted: SocketAddr) -> bool {
    bound.port() == wanted.port()
        && (bound.ip() == wanted.ip()
            || bound.ip().is_unspecified()
            || wanted.ip().is_unspecified())
}

/// The pid of the gone primary `pid` was a worker of, if it was one.
fn former_primary(pid: i32) -> Option<i32> {
    let primary: i32 = environ_var(pid, PRIMARY_VARIABLE)?.parse().ok()?;
    let mut ancestor = pid;
    for _ in 0..64 {
        ancestor = parent(ancestor)?;
        if ancestor == primary {
            return None; // its primary lives
        }
        if ancestor <= 1 {
            break;
        }
    }
    Some(primary)
}

/// Stops the former workers among `holders`: SIGTERM to each one's process group, SIGKILL
/// after `grace` to those still there. Returns once they are gone (or a second after SIGKILL).
fn stop(holders: &[Holder], addr: ListenAddr, grace: Duration) {
    let former: Vec<&Holder> = holders
        .iter()
        .filter(|h| h.former_worker_of.is_some())
        .collect();
    for holder in &former {
        log::warn!(
            "{addr} is held by {holder}, a worker of cluster-lb pid {} which is gone; stopping it (SIGTERM, SIGKILL after {}s)",
            holder.former_worker_of.unwrap_or_default(),
            grace.as_secs_f64()
        );
        signal_group(holder.pid, Signal::SIGTERM);
    }
    let gone = |h: &&Holder| !alive(h.pid);
    let deadline = std::time::Instant::now() + grace;
    while !former.iter().all(gone) && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    for holder in former.iter().filter(|h| !gone(h)) {
        signal_group(holder.pid, Signal::SIGKILL);
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(1);
    while !former.iter().all(gone) && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn signal_group(pid: i32, signal: Signal) {
    let pid = Pid::from_raw(pid);
    let _ = nix::sys::signal::killpg(pid, signal);
    let _ = nix::sys::signal::kill(pid, signal);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcards_cover_their_port_and_nothing_else() {
        let at = |s: &str| s.parse::<SocketAddr>().unwrap();
        assert!(covers(at("0.0.0.0:80"), at("127.0.0.1:80")));
        assert!(covers(at("127.0.0.1:80"), at("0.0.0.0:80")));
        assert!(covers(at("127.0.0.1:80"), at("127.0.0.1:80")));
        assert!(!covers(at("127.0.0.2:80"), at("127.0.0.1:80")));
        assert!(!covers(at("0.0.0.0:81"), at("0.0.0.0:80")));
    }

    #[test]
    fn a_listener_of_this_process_is_found_and_is_no_former_worker() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = ListenAddr::from(listener.local_addr().unwrap());
        let own = std::process::id() as i32;
        let found = holders(addr);
        assert!(
            found
                .iter()
                .any(|h| h.pid == own && h.former_worker_of.is_none()),
            "{found:?}"
        );
    }
}
