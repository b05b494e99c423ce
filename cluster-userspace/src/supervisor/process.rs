//! The I/O side of one worker process: its slot, its channel, the addresses it has sockets for,
//! and how it is started and asked to stop. Its lifecycle state is not here (see lifecycle).

use std::{
    collections::{HashMap, HashSet},
    os::fd::{AsFd, OwnedFd},
    sync::Arc,
};

use nix::{
    sys::signal::{kill, killpg, Signal},
    unistd::Pid,
};

use super::{budget::Budget, ipc::read_ipc, node::NodeWorker, output, Supervisor};
use cluster_lb_worker::{
    channel::{self, Endpoint},
    protocol::{self, PrimaryMessage, VERSION},
    ListenAddr, IPC_FD_VARIABLE,
};

use crate::{
    logging::Stream,
    node::channel::{self as node_channel, NodeChannel},
    spawn::{Channel, SpawnError, WorkerSpec},
};

/// A worker's channel to the primary.
pub enum WorkerChannel {
    /// None was given, or it closed.
    Closed,
    /// cluster-lb's own protocol (docs/PROTOCOL.md); `online` once the worker said so, after
    /// which it understands `disconnect`.
    ClusterLb {
        endpoint: Arc<Endpoint>,
        online: bool,
    },
    /// Node's cluster protocol (docs/NODE.md).
    Node(NodeWorker),
}

/// What the primary holds for a running worker process.
pub struct WorkerIo {
    pub id: u32,
    pub slot: u32,
    pub channel: WorkerChannel,
    /// Addresses it has sockets for (socket-activated, or from queryServer).
    pub addresses: Vec<ListenAddr>,
    /// The listening sockets the primary gave it: inode -> the group's address.
    pub given: HashMap<u64, ListenAddr>,
    /// Listen requests it made.
    pub queries: u32,
    /// Servers it opened by itself that were reported already (once each).
    pub reported: HashSet<std::net::SocketAddr>,
    /// Copies of the read ends of its stdout and stderr pipes (the readers own the others),
    /// so that an upgrade can hand them over: the worker's output must not hit a closed pipe.
    pub output: [Option<OwnedFd>; 2],
}

/// Why a worker could not be started.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(
        "no free slot for another worker (all {} are taken)",
        cluster_common::MAX_SLOTS
    )]
    NoSlot,
    #[error("{0}")]
    Sockets(String),
    #[error("creating its {what}: {source}")]
    Plumbing {
        what: &'static str,
        source: std::io::Error,
    },
    #[error(transparent)]
    Spawn(#[from] SpawnError),
}

impl Supervisor {
    /// Starts a process for worker `id`: a free slot, sockets for the --listen addresses in it,
    /// an IPC channel and output pipes, then the program.
    pub(super) fn start_process(&mut self, id: u32) -> Result<(Pid, u32), StartError> {
        let slot = self.slots.allocate().ok_or(StartError::NoSlot)?;
        match self.spawn_in_slot(id, slot) {
            Ok(pid) => Ok((pid, slot)),
            Err(error) => {
                self.forget_slot(slot);
                Err(error)
            }
        }
    }

    fn spawn_in_slot(&mut self, id: u32, slot: u32) -> Result<Pid, StartError> {
        let sockets = self
            .groups
            .open_activated(slot)
            .map_err(|e| StartError::Sockets(format!("{e:#}")))?;
        let names: Vec<String> = (0..sockets.len()).map(|i| format!("listen{i}")).collect();
        let plumbing = |what| move |source| StartError::Plumbing { what, source };
        let (primary_end, worker_end) = if self.node {
            node_channel::pair().map_err(plumbing("Node channel"))?
        } else {
            channel::pair().map_err(plumbing("IPC channel"))?
        };
        let (stdout_read, stdout_write) = output_pipe().map_err(plumbing("output pipe"))?;
        let (stderr_read, stderr_write) = output_pipe().map_err(plumbing("output pipe"))?;
        let mut env = vec![
            ("CLUSTER_LB_WORKER_ID".to_string(), id.to_string()),
            (
                "CLUSTER_LB_WORKERS".to_string(),
                self.lifecycle.wanted().to_string(),
            ),
            ("NOTIFY_SOCKET".to_string(), self.notify_socket.clone()),
            (
                super::former::PRIMARY_VARIABLE.to_string(),
                std::process::id().to_string(),
            ),
        ];
        if self.node {
            // What Node's cluster.fork() sets: the worker's cluster.worker.id is 1-based.
            env.push(("NODE_UNIQUE_ID".to_string(), (id + 1).to_string()));
            env.push((
                "NODE_CHANNEL_SERIALIZATION_MODE".to_string(),
                "json".to_string(),
            ));
        }
        let variable = if self.node {
            "NODE_CHANNEL_FD"
        } else {
            IPC_FD_VARIABLE
        };
        let filter = self.config.seccomp.then_some(&self.filter);
        let pid = self.command.spawn(&WorkerSpec {
            sockets: &sockets,
            socket_names: &names,
            env: &env,
            channel: Some(Channel {
                fd: worker_end.as_fd(),
                variable,
            }),
            stdout: Some(stdout_write.as_fd()),
            stderr: Some(stderr_write.as_fd()),
            credentials: self.config.credentials.as_ref(),
            filter,
        })?;
        let given = sockets
            .iter()
            .zip(self.groups.addresses())
            .filter_map(|(socket, addr)| Some((super::audit::inode(socket)?, addr)))
            .collect();
        // The worker has its copies now; ours close here, so a dead worker's socket closes
        // with it and its pipes reach EOF.
        drop((sockets, worker_end, stdout_write, stderr_write));
        self.reaper.watch(pid);
        let output = [stdout_read.try_clone().ok(), stderr_read.try_clone().ok()];
        output::capture(id, pid.as_raw(), Stream::Stdout, stdout_read);
        output::capture(id, pid.as_raw(), Stream::Stderr, stderr_read);
        let channel = if self.node {
            NodeChannel::start(primary_end, pid, self.node_tx.clone(), self.node_budget())
                .map(|channel| WorkerChannel::Node(NodeWorker::new(channel)))
        } else {
            Endpoint::new(primary_end).map(|endpoint| {
                let endpoint = Arc::new(endpoint);
                read_ipc(
                    pid,
                    Arc::clone(&endpoint),
                    self.ipc_tx.clone(),
                    self.ipc_budget(),
                );
                WorkerChannel::ClusterLb {
                    endpoint,
                    online: false,
                }
            })
        };
        let channel = channel.unwrap_or_else(|e| {
            log::warn!("worker {id}: no channel: {e}");
            WorkerChannel::Closed
        });
        self.workers.insert(
            pid,
            WorkerIo {
                id,
                slot,
                channel,
                addresses: self.config.listen.clone(),
                given,
                queries: 0,
                reported: HashSet::new(),
                output,
            },
        );
        Ok(pid)
    }

    /// A Node worker's share of the message budget (see `budget`).
    pub(super) fn node_budget(&self) -> Budget {
        Budget::for_worker(node_channel::MAX_LINE, &self.message_budget)
    }

    /// A cluster-lb IPC worker's share of the message budget.
    pub(super) fn ipc_budget(&self) -> Budget {
        Budget::for_worker(protocol::MAX_MESSAGE, &self.message_budget)
    }

    /// The worker is gone: its slot is free (and out of every map), its channel closed, and
    /// processes it left behind holding its sockets are stopped.
    pub(super) fn release(&mut self, pid: Pid) {
        if let Some(worker) = self.workers.remove(&pid) {
            self.forget_slot(worker.slot);
            self.released_sockets.extend(worker.given.keys());
            self.stop_orphans_holding_sockets();
        }
    }

    fn forget_slot(&mut self, slot: u32) {
        self.slots.release(slot);
        self.groups.clear_slot(slot);
        self.publish_members();
    }

    /// Tells the kernel programs which slots are active, and which worker id each serves.
    pub(super) fn publish_members(&mut self) {
        let ids: std::collections::HashMap<u32, u32> =
            self.workers.values().map(|w| (w.slot, w.id)).collect();
        let members: Vec<(u32, u32)> = self
            .slots
            .active()
            .iter()
            .filter_map(|slot| Some((*slot, *ids.get(slot)?)))
            .collect();
        self.groups.publish(self.slots.active(), &members);
    }

    pub(super) fn set_active(&mut self, pid: Pid, active: bool) {
        let Some(slot) = self.workers.get(&pid).map(|w| w.slot) else {
            return;
        };
        let changed = if active {
            self.slots.activate(slot)
        } else {
            self.slots.deactivate(slot)
        };
        if changed {
            self.publish_members();
        }
    }

    /// `disconnect` over the channel if the worker speaks it, else SIGTERM.
    pub(super) fn ask_to_stop(&mut self, pid: Pid) {
        let asked = match self.workers.get_mut(&pid).map(|w| &mut w.channel) {
            Some(WorkerChannel::ClusterLb {
                endpoint,
                online: true,
            }) => {
                let message = PrimaryMessage::Disconnect { v: VERSION };
                protocol::encode(&message)
                    .is_some_and(|bytes| endpoint.try_send(&bytes, None).is_ok())
            }
            Some(WorkerChannel::Node(node)) => node.disconnect(),
            _ => false,
        };
        if !asked {
            let _ = kill(pid, Signal::SIGTERM);
        }
    }

    /// SIGKILL to the worker's process group, so helpers it started die with it.
    pub(super) fn kill(&self, pid: Pid) {
        let _ = killpg(pid, Signal::SIGKILL);
        let _ = kill(pid, Signal::SIGKILL);
    }
}

/// A pipe for a worker's output: (our read end, the worker's write end), both close-on-exec.
fn output_pipe() -> std::io::Result<(OwnedFd, OwnedFd)> {
    nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(std::io::Error::from)
}
