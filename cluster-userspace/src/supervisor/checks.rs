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

use super::{audit, Departure, Event, Input, Supervisor, WorkerState};

/// Set once the closed-listener check said it cannot see workers' descriptors (said once per
/// process: the capabilities do not change while it runs).
static FD_WARNING: AtomicBool = AtomicBool::new(false);

/// How often.
pub const CHECK_EVERY: Duration = Duration::from_secs(5);

/// What to do with a worker that closed a listening socket it was given.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum ClosedListener {
    /// Treat it as failed: drain it and start a new one (its share would otherwise go to its
    /// neighbours in silence, since the kernel emptied its slot).
    #[default]
    Restart,
    /// Only report it (a program that closes sockets it does not use, say).
    Report,
}

impl std::str::FromStr for ClosedListener {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text {
            "restart" => Ok(ClosedListener::Restart),
            "report" => Ok(ClosedListener::Report),
            _ => Err(format!("unknown value '{text}'; use restart or report")),
        }
    }
}

impl Supervisor {
    pub(super) fn periodic_checks(&mut self) {
        if let Some(listening) = audit::listening_tcp() {
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
        for (pid, worker) in &mut self.workers {
            let settled = self.lifecycle.process(*pid).is_some_and(|p| {
                p.state() == WorkerState::Ready && p.started.elapsed() >= CHECK_EVERY
            });
            if !settled || worker.given.is_empty() {
                continue;
            }
            if !audit::fds_readable(pid.as_raw()) {
                // Unknown is not closed: never restart a worker for what we cannot see.
                if !FD_WARNING.swap(true, Ordering::Relaxed) {
                    log::warn!(
                        "cannot read /proc/{pid}/fd of worker {} (a worker of another user needs CAP_SYS_PTRACE and CAP_DAC_READ_SEARCH in the primary): workers that close their listening socket go unnoticed",
                        worker.id
                    );
                }
                continue;
            }
            let held: HashSet<u64> = audit::with_descendants(pid.as_raw())
                .into_iter()
                .flat_map(audit::socket_inodes)
                .collect();
            // UDP sockets do not listen: only TCP ones can be checked this way.
            let closed: Vec<(u64, _)> = worker
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
                        worker.given.remove(&inode);
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
            self.emit(event);
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
                    .given
                    .iter()
                    .find(|(_, a)| **a == addr)
                    .map(|(inode, _)| *inode)?;
                ready.then_some((pid.as_raw(), inode))
            });
            let Some((pid, inode)) = member else {
                continue;
            };
            let socket = audit::fd_of_inode(pid, inode).and_then(|fd| audit::take_fd(pid, fd).ok());
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
        if !self.config.subreaper || self.released_sockets.is_empty() {
            return;
        }
        let mut still_held = HashSet::new();
        let mut stopped = Vec::new();
        for orphan in self.orphans() {
            for pid in audit::with_descendants(orphan) {
                let held = audit::socket_inodes(pid);
                let holds_a_socket = held.iter().any(|i| self.released_sockets.contains(i));
                if holds_a_socket {
                    let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
                    stopped.push(Event::Orphan {
                        pid,
                        command: audit::command_name(pid),
                        held_socket: true,
                    });
                }
                still_held.extend(held);
            }
        }
        // A socket no orphan holds any more is closed for good.
        self.released_sockets
            .retain(|inode| still_held.contains(inode));
        for event in stopped {
            self.emit(event);
        }
    }

    /// Children of ours that are not workers: orphans of workers (a subreaper adopts them).
    fn orphans(&self) -> Vec<i32> {
        audit::own_children()
            .into_iter()
            .filter(|pid| !self.workers.contains_key(&Pid::from_raw(*pid)))
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
            .flat_map(audit::with_descendants)
            .collect();
        if orphans.is_empty() {
            return;
        }
        for pid in &orphans {
            self.emit(Event::Orphan {
                pid: *pid,
                command: audit::command_name(*pid),
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
        for pid in self.orphans().into_iter().flat_map(audit::with_descendants) {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        super::reaper::collect_children();
    }
}
