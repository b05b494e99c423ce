//! The new binary's side of an upgrade: a supervisor built from the state the old one handed
//! over, with the same workers, sockets and channels, and the new binary's own eBPF programs
//! swapped in.

use std::{
    os::fd::OwnedFd,
    time::{Duration, Instant},
};

use nix::unistd::Pid;

use super::{
    super::saved::{Inherited, State},
    Kept,
};
use crate::{
    kernel::{
        groups::{GroupError, Groups},
        unix_listens::UnixListens,
        Strategy,
    },
    supervisor::{
        checks::CHECK_EVERY,
        inbox::Inbox,
        launch::{self, spawn::WorkerCommand},
        lifecycle::Lifecycle,
        notify, signals,
        workers::Protocol,
        Config, Event, Supervisor, SupervisorError,
    },
    sys::procfs,
};

/// A supervisor taken over from an older binary, and what its embedder gets back.
pub struct Resumed {
    pub supervisor: Supervisor,
    pub kept: Kept,
    /// The control connection that asked for the upgrade: answer it.
    pub requester: Option<OwnedFd>,
    pub from: String,
}

impl Supervisor {
    /// Takes over from the primary that wrote `state` (this process, before its exec).
    pub(crate) fn resume(config: Config, state: State) -> Result<Resumed, SupervisorError> {
        let now = Instant::now();
        let command = WorkerCommand::for_config(&config)?;
        launch::spawn::raise_descriptor_limit();
        let signals = signals::Signals::new(config.signals, config.subreaper)
            .map_err(SupervisorError::Signals)?;
        // The handlers are in place: what arrived during the exec is delivered now.
        signals::unblock_after_upgrade();
        if config.subreaper {
            // SAFETY: plain prctl (kept across exec anyway; set again to be sure).
            unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
        }
        let strategy: Strategy = state.strategy.parse().unwrap_or(config.strategy);
        // Every worker's sockets, by slot, taken from the workers themselves: the old
        // primary held none of them.
        let sockets = worker_sockets(&state);
        let unix = UnixListens::resume(&state.unix).map_err(GroupError::from)?;
        let groups = Groups::resume(&state.groups, strategy, state.fell_back)?.with_unix(unix);
        let (inbox, feeds) = Inbox::new(
            signals,
            CHECK_EVERY,
            Some(crate::supervisor::health::SAMPLE_EVERY),
        );
        let fd = state
            .notify
            .take()
            .ok_or_else(|| SupervisorError::Notify(lost("the workers' notify socket")))?;
        let senders = notify::Senders::of(config.credentials.as_ref());
        let notify = notify::NotifySocket {
            fd: notify::serve(fd, feeds.notify.clone(), senders)
                .map_err(SupervisorError::Notify)?,
            _dir: notify::NotifyDir::of_socket(&state.notify_name),
            name: state.notify_name.clone(),
        };
        let protocol = if state.node {
            Protocol::Node
        } else {
            Protocol::ClusterLb
        };
        let policy = super::super::policy(&config, protocol);
        let lifecycle = Lifecycle::resume(&state.lifecycle, policy, config.timing, now);
        let mut supervisor = Supervisor::assemble(
            config,
            command,
            protocol,
            groups,
            (inbox, feeds),
            notify,
            lifecycle,
        );
        supervisor.origin.resumed = true;
        supervisor.origin.started = now
            .checked_sub(Duration::from_millis(state.uptime_ms))
            .unwrap_or(now);
        let workers = &mut supervisor.workers;
        workers.released = state.released_sockets.iter().copied().collect();
        workers.node.restore(&state.node_groups);
        for worker in &state.workers {
            workers.adopt(worker);
            supervisor.inbox.watch(Pid::from_raw(worker.pid));
        }
        for slot in &state.active {
            workers.restore_active(*slot);
        }
        workers.publish(&mut supervisor.groups);
        supervisor.resume_program(&state.program);
        // Everything is in the new maps: the new programs take over from the old, group by group.
        supervisor.groups.swap_in(&sockets);
        let to = crate::version::version().to_string();
        supervisor.outputs.emit(Event::Upgraded {
            from: state.from.clone(),
            to,
            workers: state.workers.len() as u32,
        });
        Ok(Resumed {
            supervisor,
            kept: Kept {
                control: state.control,
                metrics: state.metrics,
            },
            requester: state.requester.and_then(Inherited::take),
            from: state.from,
        })
    }
}

/// For each group address, the (slot, socket) of every worker that still holds the socket it
/// was given, copied out of the worker (pidfd_getfd).
fn worker_sockets(state: &State) -> Vec<(cluster_lb_worker::ListenAddr, u32, OwnedFd)> {
    let mut sockets = Vec::new();
    for worker in &state.workers {
        for (inode, addr) in &worker.given {
            let copy = procfs::fd_of_inode(worker.pid, *inode)
                .ok_or_else(|| lost("the socket"))
                .and_then(|fd| crate::sys::pidfd::take_fd(worker.pid, fd));
            match copy {
                Ok(socket) => sockets.push((*addr, worker.slot, socket)),
                Err(e) => log::warn!(
                    "worker {} (pid {}): its socket for {addr} cannot be found ({e}); it keeps its place in the old program only until it is replaced",
                    worker.id,
                    worker.pid
                ),
            }
        }
    }
    sockets
}

fn lost(what: &str) -> std::io::Error {
    std::io::Error::other(format!("{what} was not inherited"))
}
