//! The new binary's side of an upgrade: a supervisor built from the state the old one handed
//! over, with the same workers, sockets and channels, and the new binary's own eBPF programs
//! swapped in.

use std::{
    collections::{HashMap, HashSet},
    os::fd::OwnedFd,
    sync::Arc,
    time::{Duration, Instant},
};

use nix::unistd::Pid;

use super::{
    state::{ChannelState, Inherited, State},
    Kept,
};
use cluster_lb_worker::channel::Endpoint;

use crate::{
    kernel::Strategy,
    logging::Stream,
    node::channel::NodeChannel,
    spawn::WorkerCommand,
    supervisor::{
        audit, groups::Groups, ipc::read_ipc, lifecycle::Lifecycle, node::NodeWorker, notify,
        output, process::WorkerChannel, process::WorkerIo, signals, Config, Event, Supervisor,
        SupervisorError,
    },
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
    pub fn resume(config: Config, state: State) -> Result<Resumed, SupervisorError> {
        let now = Instant::now();
        let command = WorkerCommand::new(&config.command)?;
        crate::spawn::raise_descriptor_limit();
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
        let groups = Groups::resume(&state.groups, strategy, state.fell_back)?;
        let (notify_tx, notify_rx) = tokio::sync::mpsc::unbounded_channel();
        let notify_fd = state
            .notify
            .take()
            .ok_or_else(|| SupervisorError::Notify(lost("the workers' notify socket")))?;
        let senders = notify::Senders::of(config.credentials.as_ref());
        let notify_fd =
            notify::serve(notify_fd, notify_tx, senders).map_err(SupervisorError::Notify)?;
        let lifecycle = Lifecycle::resume(&state.lifecycle, config.timing, now);
        let mut supervisor = Supervisor::assemble(
            config,
            command,
            groups,
            signals,
            (state.notify_name.clone(), notify_fd, notify_rx),
            lifecycle,
        );
        supervisor.node = state.node;
        supervisor.resumed = true;
        supervisor.notify_dir = notify::NotifyDir::of_socket(&state.notify_name);
        supervisor.started = now
            .checked_sub(Duration::from_millis(state.uptime_ms))
            .unwrap_or(now);
        supervisor.released_sockets = state.released_sockets.iter().copied().collect();
        supervisor.node_groups.restore(&state.node_groups);
        for worker in &state.workers {
            supervisor.adopt_worker(worker);
        }
        for worker in &state.workers {
            supervisor.slots.claim(worker.slot);
        }
        for slot in &state.active {
            supervisor.slots.activate(*slot);
        }
        supervisor.publish_members();
        // Everything is in the new maps: the new programs take over from the old, group by group.
        supervisor.groups.swap_in(&sockets);
        let to = crate::version::version().to_string();
        supervisor.emit(Event::Upgraded {
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

    /// Takes up one worker's I/O as the old primary left it.
    fn adopt_worker(&mut self, worker: &super::state::WorkerState) {
        let pid = Pid::from_raw(worker.pid);
        self.reaper.watch(pid);
        let mut output = [None, None];
        for (slot, (stream, fd)) in output.iter_mut().zip([
            (Stream::Stdout, worker.stdout),
            (Stream::Stderr, worker.stderr),
        ]) {
            if let Some(fd) = fd.and_then(Inherited::take) {
                *slot = fd.try_clone().ok();
                output::capture(worker.id, worker.pid, stream, fd);
            }
        }
        let channel = match &worker.channel {
            ChannelState::Closed => WorkerChannel::Closed,
            ChannelState::ClusterLb { socket, online } => socket
                .take()
                .and_then(|fd| Endpoint::new(fd).ok())
                .map_or(WorkerChannel::Closed, |endpoint| {
                    let endpoint = Arc::new(endpoint);
                    read_ipc(
                        pid,
                        Arc::clone(&endpoint),
                        self.ipc_tx.clone(),
                        self.ipc_budget(),
                    );
                    WorkerChannel::ClusterLb {
                        endpoint,
                        online: *online,
                    }
                }),
            ChannelState::Node {
                socket,
                seq,
                listens,
                next_key,
            } => socket
                .take()
                .and_then(|fd| {
                    NodeChannel::start(fd, pid, self.node_tx.clone(), self.node_budget()).ok()
                })
                .map_or(WorkerChannel::Closed, |channel| {
                    WorkerChannel::Node(NodeWorker::resume(channel, *seq, listens, *next_key))
                }),
        };
        if matches!(channel, WorkerChannel::Closed)
            && !matches!(worker.channel, ChannelState::Closed)
        {
            log::warn!(
                "worker {} (pid {}): its channel did not survive the upgrade",
                worker.id,
                worker.pid
            );
        }
        self.workers.insert(
            pid,
            WorkerIo {
                id: worker.id,
                slot: worker.slot,
                channel,
                addresses: worker.addresses.clone(),
                given: worker.given.iter().copied().collect::<HashMap<_, _>>(),
                queries: worker.queries,
                reported: worker.reported.iter().copied().collect::<HashSet<_>>(),
                output,
            },
        );
    }
}

/// For each group address, the (slot, socket) of every worker that still holds the socket it
/// was given, copied out of the worker (pidfd_getfd).
fn worker_sockets(
    state: &State,
) -> Vec<(cluster_lb_worker::listen_addr::ListenAddr, u32, OwnedFd)> {
    let mut sockets = Vec::new();
    for worker in &state.workers {
        for (inode, addr) in &worker.given {
            let copy = audit::fd_with_inode(worker.pid, *inode)
                .ok_or_else(|| lost("the socket"))
                .and_then(|fd| audit::take_fd(worker.pid, fd));
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
