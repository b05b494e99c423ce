//! What the primary checks every few seconds, beyond what it is told: a ready worker that no
//! longer holds a listening socket it was given, a group whose program a worker replaced,
//! servers a Node worker opened by itself, and processes workers left behind that still hold a
//! group's socket. Each check reads /proc or the kernel; none trusts the worker's word.

use std::{
    collections::HashSet,
    sync::atomic::{AtomicBool, Ordering},
    time::Duration,
};

use nix::{
    sys::signal::{kill, Signal},
    unistd::Pid,
};

use super::{config::ClosedListener, Departure, Event, Input, Supervisor, WorkerState};
use crate::sys::procfs;

/// Set once the closed-listener check said it cannot see workers' descriptors (said once per
/// process: the capabilities do not change while it runs).
static FD_WARNING: AtomicBool = AtomicBool::new(false);

/// How often.
pub const CHECK_EVERY: Duration = Duration::from_secs(5);

impl Supervisor {
    pub(super) fn periodic_checks(&mut self) {
        if let Some(listening) = procfs::listening_tcp() {
            self.report_own_listeners(&listening);
        }
        self.restore_programs();
        for input in self.closed_listeners() {
            self.step(input);
        }
        self.stop_orphans_holding_sockets();
    }

    /// Ready workers (ready for a whole period) that no longer hold a listening socket they
    /// were given, nor does any of their descendants: they closed it. Read from /proc, which
    /// every kernel has (sock_diag needs a module).
    fn closed_listeners(&mut self) -> Vec<Input> {
        let mut inputs = Vec::new();
        let mut reports = Vec::new();
        for (pid, worker) in self.workers.iter_mut() {
            let settled = self.lifecycle.process(*pid).is_some_and(|p| {
                p.state() == WorkerState::Ready && p.started.elapsed() >= CHECK_EVERY
            });
            if !settled || worker.claims.given.is_empty() {
                continue;
            }
            if !procfs::fds_readable(pid.as_raw()) {
                // Unknown is not closed: never restart a worker for what we cannot see.
                if !FD_WARNING.swap(true, Ordering::Relaxed) {
                    log::warn!(
                        "cannot read /proc/{pid}/fd of worker {} (a worker of another user needs CAP_SYS_PTRACE and CAP_DAC_READ_SEARCH in the primary): workers that close their listening socket go unnoticed",
                        worker.id
                    );
                }
                continue;
            }
            let held: HashSet<u64> = procfs::with_descendants(pid.as_raw())
                .into_iter()
                .flat_map(procfs::socket_inodes)
                .collect();
            // UDP sockets do not listen: only TCP ones can be checked this way.
            let closed: Vec<(u64, _)> = worker
                .claims
                .given
                .iter()
                .filter(|(inode, addr)| !addr.is_udp() && !held.contains(inode))
                .map(|(inode, addr)| (*inode, *addr))
                .collect();
            let Some((_, addr)) = closed.first().copied() else {
                continue;
            };
            match self.config.closed_listener {
                ClosedListener::Restart => inputs.push(Input::Leaving {
                    pid: *pid,
                    why: Departure::ListenerClosed(addr.to_string()),
                }),
                ClosedListener::Report => {
                    for (inode, addr) in closed {
                        worker.claims.given.remove(&inode);
                        reports.push(Event::ListenerClosed {
                            id: worker.id,
                            pid: pid.as_raw(),
                            address: addr.to_string(),
                        });
                    }
                }
            }
        }
        for event in reports {
            self.outputs.emit(event);
        }
        inputs
    }

    /// Attaches each group's program again, through a socket of the group borrowed from a
    /// ready worker: the kernel lets any member of a group replace its program (a worker
    /// started with --no-seccomp, or older than the filter), and attaching is idempotent.
    fn restore_programs(&mut self) {
        for addr in self.groups.addresses() {
            let member = self.workers.iter().find_map(|(pid, worker)| {
                let ready = self
                    .lifecycle
                    .process(*pid)
                    .is_some_and(|p| p.state() == WorkerState::Ready);
                let inode = worker
                    .claims
                    .given
                    .iter()
                    .find(|(_, a)| **a == addr)
                    .map(|(inode, _)| *inode)?;
                ready.then_some((pid.as_raw(), inode))
            });
            let Some((pid, inode)) = member else {
                continue;
            };
            let socket = procfs::fd_of_inode(pid, inode)
                .and_then(|fd| crate::sys::pidfd::take_fd(pid, fd).ok());
            if let Some(socket) = socket {
                if let Err(e) = self.groups.reattach(addr, &socket) {
                    log::debug!("{addr}: attaching the program again: {e}");
                }
            }
        }
    }

    /// Processes that workers left behind (re-parented to us, a subreaper) and that hold a
    /// socket of a worker that is gone: such a socket stays in its group, and the kernel (or
    /// the program's fallback) would send it connections nobody accepts. They are killed.
    pub(super) fn stop_orphans_holding_sockets(&mut self) {
        if !self.config.subreaper || self.workers.released.is_empty() {
            return;
        }
        let mut still_held = HashSet::new();
        let mut stopped = Vec::new();
        for orphan in self.orphans() {
            for pid in procfs::with_descendants(orphan) {
                let held = procfs::socket_inodes(pid);
                let holds_a_socket = held.iter().any(|i| self.workers.released.contains(i));
                if holds_a_socket {
                    let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
                    stopped.push(Event::Orphan {
                        pid,
                        command: procfs::command_name(pid),
                        held_socket: true,
                    });
                }
                still_held.extend(held);
            }
        }
        // A socket no orphan holds any more is closed for good.
        self.workers
            .released
            .retain(|inode| still_held.contains(inode));
        for event in stopped {
            self.outputs.emit(event);
        }
    }

    /// Children of ours that are not workers: orphans of workers (a subreaper adopts them).
    fn orphans(&self) -> Vec<i32> {
        procfs::own_children()
            .into_iter()
            .filter(|pid| !self.workers.contains(Pid::from_raw(*pid)))
            .collect()
    }

    /// At the end of a stop: what workers left behind goes too (SIGTERM, then SIGKILL after a
    /// second), so no process of the cluster outlives it holding its port.
    pub(super) async fn stop_all_orphans(&mut self) {
        if !self.config.subreaper {
            return;
        }
        let orphans: Vec<i32> = self
            .orphans()
            .into_iter()
            .flat_map(procfs::with_descendants)
            .collect();
        if orphans.is_empty() {
            return;
        }
        for pid in &orphans {
            self.outputs.emit(Event::Orphan {
                pid: *pid,
                command: procfs::command_name(*pid),
                held_socket: false,
            });
            let _ = kill(Pid::from_raw(*pid), Signal::SIGTERM);
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(1);
        while tokio::time::Instant::now() < deadline {
            super::reaper::collect_children();
            if self.orphans().is_empty() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        for pid in self
            .orphans()
            .into_iter()
            .flat_map(procfs::with_descendants)
        {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        super::reaper::collect_children();
    }
}

impl Supervisor {
    /// Servers a Node worker opened by itself (`listen({ reusePort: true })` on Node 22+,
    /// `exclusive: true`) bypass cluster-lb: nothing balances them, and `disconnect` does not
    /// close them. Reported once per address.
    fn report_own_listeners(&mut self, listening: &[(u64, std::net::SocketAddr)]) {
        let mut found = Vec::new();
        // Usually every listening socket is one the primary gave out: then nobody is scanned.
        let given_out: HashSet<u64> = self
            .workers
            .iter()
            .flat_map(|(_, w)| w.claims.given.keys().copied())
            .chain(self.workers.reserve_inodes())
            .collect();
        if listening.iter().all(|(inode, _)| given_out.contains(inode)) {
            return;
        }
        for (pid, worker) in self.workers.iter_mut() {
            if !worker.channel.is_node() {
                continue;
            }
            let given = worker.claims.given.keys().copied().collect();
            for addr in procfs::own_listeners(pid.as_raw(), listening, &given) {
                if worker.reported.insert(addr) {
                    found.push(Event::OwnListener {
                        id: worker.id,
                        pid: pid.as_raw(),
                        address: addr.to_string(),
                    });
                }
            }
        }
        for event in found {
            self.outputs.emit(event);
        }
    }
}
