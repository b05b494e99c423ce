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

use super::audit;
use cluster_lb_worker::listen_addr::ListenAddr;

/// The variable naming a worker's primary.
pub const PRIMARY_VARIABLE: &str = "CLUSTER_LB_PRIMARY";

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
pub fn holders(addr: ListenAddr) -> Vec<Holder> {
    if addr.is_udp() {
        return Vec::new();
    }
    let Some(listening) = audit::listening_tcp() else {
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
        let held = audit::socket_inodes(pid);
        if inodes.iter().any(|inode| held.contains(inode)) {
            found.push(Holder {
                pid,
                command: audit::command_name(pid),
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
pub fn stop(holders: &[Holder], addr: ListenAddr, grace: Duration) {
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

/// Alive and not a zombie (a former worker is not our child: nobody here reaps it).
fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            let state = stat[stat.rfind(')')? + 1..]
                .split_whitespace()
                .next()?
                .to_string();
            Some(state != "Z")
        })
        .unwrap_or(false)
}

fn parent(pid: i32) -> Option<i32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat[stat.rfind(')')? + 1..]
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

fn environ_var(pid: i32, name: &str) -> Option<String> {
    let raw = std::fs::read(format!("/proc/{pid}/environ")).ok()?;
    let prefix = format!("{name}=");
    raw.split(|&b| b == 0)
        .find_map(|entry| entry.strip_prefix(prefix.as_bytes()))
        .map(|value| String::from_utf8_lossy(value).into_owned())
}

fn all_pids() -> Vec<i32> {
    std::fs::read_dir("/proc")
        .map(|entries| {
            entries
                .flatten()
                .filter_map(|e| e.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default()
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
