//! What a worker may ask for over its channel (`queryServer`, in either protocol) when no
//! `--listen` fixed the addresses: bounded, so that a worker cannot make the primary create
//! groups (each a loaded eBPF program and its maps) without end, and cannot get through the
//! primary a port it could not bind itself.

use std::os::fd::OwnedFd;

use nix::unistd::Pid;

use super::Supervisor;
use cluster_lb_worker::listen_addr::ListenAddr;

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

impl Supervisor {
    /// A socket for `addr` in `pid`'s slot, its group created on first use, if the policy above
    /// allows it.
    pub(super) fn query_socket(
        &mut self,
        pid: Pid,
        addr: ListenAddr,
        dual_stack: bool,
    ) -> Result<(ListenAddr, OwnedFd), Refusal> {
        let worker = self
            .workers
            .get_mut(&pid)
            .ok_or_else(|| Refusal::new(libc::ESRCH, "no such worker"))?;
        worker.queries += 1;
        if worker.queries > MAX_QUERIES_PER_WORKER {
            return Err(Refusal::new(
                libc::EACCES,
                format!("more than {MAX_QUERIES_PER_WORKER} listen requests from one worker"),
            ));
        }
        let slot = worker.slot;
        let port = addr.socket_addr().port();
        if port != 0
            && port < 1024
            && self.config.credentials.is_some()
            && !self.config.allow_low_ports
        {
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
        self.groups
            .open_at(addr, dual_stack, slot)
            .map_err(|e| Refusal::new(e.errno(), e.to_string()))
    }
}
