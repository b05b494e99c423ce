//! The workers' side of the primary's I/O: for every process the lifecycle knows, its slot,
//! its channel (in either protocol, behind one [`WorkerChannel`]), the sockets it was given
//! and its output; how a process is started ([`Workers::start`]), asked to stop, killed and
//! released. Its lifecycle state is not here: that is the lifecycle's.

mod channel;
mod cluster_lb;
mod heard;
mod messages;
pub mod nodejs;
pub(super) mod output;
mod queries;
mod reserve;

use std::{
    collections::{BTreeMap, HashSet},
    net::SocketAddr,
    os::fd::{AsFd, OwnedFd},
    sync::Arc,
};

use nix::{
    sys::signal::{kill, killpg, Signal},
    unistd::Pid,
};
use serde_json::Value;
use tokio::sync::{mpsc::UnboundedSender, Semaphore};

pub use channel::{ChannelEvent, Protocol, WorkerChannel};
use cluster_lb::IpcConversation;
use heard::Said;
pub use heard::{Busy, Heard, Query};
use messages::Drops;
use nodejs::{NodeConversation, NodeGroups};
pub use queries::{Claims, QueryPolicy, Sockets};

use super::{
    launch::{
        seccomp::Filter,
        spawn::{Channel, Credentials, SpawnError, WorkerCommand, WorkerSpec},
    },
    saved::{ChannelState, Inherited, SavedWorker},
};
use crate::{
    kernel::{groups::Groups, slots::SlotTable},
    logging::{Source, Stream},
    protocol::{
        budget::{Budget, Held},
        ipc, ipc_channel,
        nodejs::{channel as node_channel, primary::ForkSpec},
        IPC_FD_VARIABLE,
    },
};

/// The variable naming a worker's primary (see `former`).
pub const PRIMARY_VARIABLE: &str = "CLUSTER_LB_PRIMARY";

/// What the primary holds for a running worker process.
pub struct WorkerIo {
    pub id: u32,
    pub channel: WorkerChannel,
    /// Its slot and the sockets the primary gave it.
    pub claims: Claims,
    /// Servers it opened by itself that were reported already (once each).
    pub reported: HashSet<SocketAddr>,
    /// Copies of the read ends of its stdout and stderr pipes (the readers own the others),
    /// so that an upgrade can hand them over: the worker's output must not hit a closed pipe.
    pub output: [Option<OwnedFd>; 2],
    /// What a Node worker said about itself (`online`, `listening`), for a primary process
    /// that takes it later.
    pub said: Vec<Value>,
    /// Its messages from before a primary process took it, for the one that takes it.
    pub early: EarlyMessages,
    /// Relayed messages dropped on the way to or from it (see `messages`).
    drops: Drops,
}

impl WorkerIo {
    pub fn slot(&self) -> u32 {
        self.claims.slot
    }
}

/// A worker's messages (`process.send()`) heard before the program's primary process took it:
/// a worker that sends as it starts may start before the primary's `cluster.fork()` takes it
/// (the primary starts once a worker reads `cluster.isPrimary`, or is restarting). Under Node
/// they would wait in the channel for the primary; here they wait for the primary that takes
/// the worker, up to a bound, since a program without a primary branch never takes one.
#[derive(Debug, Default)]
pub struct EarlyMessages {
    messages: Vec<Value>,
    bytes: usize,
}

impl EarlyMessages {
    /// At most this many are kept per worker...
    const MAX_MESSAGES: usize = 64;
    /// ...and at most this much JSON.
    const MAX_BYTES: usize = 1 << 20;

    /// Keeps `message` if it fits; whether it did.
    pub fn keep(&mut self, message: &Value) -> bool {
        // The count first: once it is full, a message is not serialized only to be refused.
        if self.messages.len() >= Self::MAX_MESSAGES {
            return false;
        }
        let size = message.to_string().len();
        if self.bytes + size > Self::MAX_BYTES {
            return false;
        }
        self.bytes += size;
        self.messages.push(message.clone());
        true
    }

    /// The kept messages, in the order heard, once: they go to the first primary that takes
    /// the worker.
    pub fn take(&mut self) -> Vec<Value> {
        self.bytes = 0;
        std::mem::take(&mut self.messages)
    }
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

/// What every worker is started with.
pub struct Launch {
    /// The command line's program (what a fork's variant 0 runs, and the program's primary).
    pub command: WorkerCommand,
    pub protocol: Protocol,
    /// The seccomp filter (None: `--no-seccomp`).
    pub filter: Option<Filter>,
    pub credentials: Option<Credentials>,
    /// The workers' NOTIFY_SOCKET.
    pub notify_socket: String,
    /// The longest message on a Node channel.
    pub max_message: usize,
    /// What asks a worker that has no `disconnect` to stop (`--stop-signal`).
    pub stop_signal: Signal,
    /// The variable that gives a Node worker its instance number (`--instance-var`).
    pub instance_var: String,
    /// `--increment-var`: the variable, and its value in the workers' environment (each
    /// worker gets that plus its instance number).
    pub increment: Option<(String, f64)>,
    /// `--watchdog`: workers get WATCHDOG_USEC.
    pub watchdog: Option<std::time::Duration>,
}

impl Launch {
    /// The variables that number a worker of instance `instance` (0 .. N-1): PM2's
    /// `NODE_APP_INSTANCE` for a Node worker, and the `--increment-var` for any.
    fn numbering(&self, instance: u32) -> Vec<(String, String)> {
        let mut env = Vec::new();
        if self.protocol == Protocol::Node {
            env.push((self.instance_var.clone(), instance.to_string()));
        }
        if let Some((name, base)) = &self.increment {
            env.push((name.clone(), js_number(base + f64::from(instance))));
        }
        env
    }
}

/// A number as JavaScript's `String(n)` writes it for the values a variable holds (3001,
/// not 3001.0), since PM2 computes `increment_var` in JavaScript.
pub fn js_number(n: f64) -> String {
    if n.fract() == 0.0 && n.abs() < 1e15 {
        format!("{}", n as i64)
    } else {
        n.to_string()
    }
}

/// PM2's `Number(value) || 0`: the value of an `increment_var` as a number to count from.
pub fn increment_base(value: Option<&str>) -> f64 {
    let text = value.unwrap_or("").trim();
    if text.is_empty() {
        return 0.0;
    }
    text.parse::<f64>()
        .ok()
        .filter(|n| n.is_finite())
        .unwrap_or(0.0)
}

/// How one worker process is to be started.
pub struct Start<'a> {
    pub id: u32,
    /// How many are wanted (CLUSTER_LB_WORKERS).
    pub wanted: u32,
    /// Its `cluster.worker.id` (NODE_UNIQUE_ID), for a Node worker.
    pub node_id: u32,
    /// Its instance number, 0 .. N-1 whatever the first id (PM2's `NODE_APP_INSTANCE`).
    pub instance: u32,
    /// What the program's primary forked it with, when not the command line's program.
    pub fork: Option<&'a ForkSpec>,
    /// Variables that load cluster-lb's Node preload (to learn whether the program has a
    /// primary branch), if wanted.
    pub preload: &'a [(String, String)],
}

/// Every worker process's I/O, and what starting one takes.
pub struct Workers {
    table: BTreeMap<Pid, WorkerIo>,
    slots: SlotTable,
    pub launch: Launch,
    /// Socket inodes of workers that are gone, while an orphan may still hold them.
    pub released: HashSet<u64>,
    /// Where every channel reader reports (the inbox reads it).
    events: UnboundedSender<(Pid, ChannelEvent)>,
    /// Where the output of `silent` workers goes (the inbox reads it).
    forwarded: UnboundedSender<output::Forwarded>,
    /// Bytes of worker messages all channels together may hold (see `protocol::budget`).
    budget: Arc<Semaphore>,
    /// What Node workers share.
    pub node: NodeGroups,
    /// Takes connections while no worker can.
    reserve: reserve::Reserve,
}

impl Workers {
    pub fn new(
        launch: Launch,
        events: UnboundedSender<(Pid, ChannelEvent)>,
        forwarded: UnboundedSender<output::Forwarded>,
    ) -> Workers {
        Workers {
            forwarded,
            budget: Budget::shared(launch.max_message),
            table: BTreeMap::new(),
            slots: SlotTable::new(),
            launch,
            released: HashSet::new(),
            events,
            node: NodeGroups::default(),
            reserve: reserve::Reserve::default(),
        }
    }

    pub fn get(&self, pid: Pid) -> Option<&WorkerIo> {
        self.table.get(&pid)
    }

    pub fn get_mut(&mut self, pid: Pid) -> Option<&mut WorkerIo> {
        self.table.get_mut(&pid)
    }

    /// The message budget all channels share.
    pub fn shared_budget(&self) -> Arc<Semaphore> {
        Arc::clone(&self.budget)
    }

    pub fn contains(&self, pid: Pid) -> bool {
        self.table.contains_key(&pid)
    }

    pub fn len(&self) -> usize {
        self.table.len()
    }

    pub fn iter(&self) -> impl Iterator<Item = (&Pid, &WorkerIo)> {
        self.table.iter()
    }

    pub fn iter_mut(&mut self) -> impl Iterator<Item = (&Pid, &mut WorkerIo)> {
        self.table.iter_mut()
    }

    /// The active slots, in the order round robin walks them.
    pub fn active_slots(&self) -> &[u32] {
        self.slots.active()
    }

    /// Starts a process for a worker: a free slot, sockets for the --listen addresses in it, a
    /// channel and output pipes, then the program.
    pub fn start(
        &mut self,
        start: &Start<'_>,
        groups: &mut Groups,
    ) -> Result<(Pid, u32), StartError> {
        let slot = self.slots.allocate().ok_or(StartError::NoSlot)?;
        match self.spawn_in_slot(start, slot, groups) {
            Ok(pid) => Ok((pid, slot)),
            Err(error) => {
                self.forget_slot(slot, groups);
                Err(error)
            }
        }
    }

    fn spawn_in_slot(
        &mut self,
        start: &Start<'_>,
        slot: u32,
        groups: &mut Groups,
    ) -> Result<Pid, StartError> {
        let (id, wanted) = (start.id, start.wanted);
        let sockets = groups
            .open_activated(slot)
            .map_err(|e| StartError::Sockets(format!("{e:#}")))?;
        let names: Vec<String> = (0..sockets.len()).map(|i| format!("listen{i}")).collect();
        let plumbing = |what| move |source| StartError::Plumbing { what, source };
        let protocol = self.launch.protocol;
        let (primary_end, worker_end) = match protocol {
            Protocol::Node => node_channel::pair().map_err(plumbing("Node channel"))?,
            Protocol::ClusterLb => ipc_channel::pair().map_err(plumbing("IPC channel"))?,
        };
        let (stdout_read, stdout_write) = output_pipe().map_err(plumbing("output pipe"))?;
        let (stderr_read, stderr_write) = output_pipe().map_err(plumbing("output pipe"))?;
        let mut env = vec![
            ("CLUSTER_LB_WORKER_ID".to_string(), id.to_string()),
            ("CLUSTER_LB_WORKERS".to_string(), wanted.to_string()),
            (
                "NOTIFY_SOCKET".to_string(),
                self.launch.notify_socket.clone(),
            ),
            (PRIMARY_VARIABLE.to_string(), std::process::id().to_string()),
        ];
        env.extend(self.launch.numbering(start.instance));
        if let Some(watchdog) = self.launch.watchdog {
            // Without WATCHDOG_PID: it would have to be the worker's own pid, which is not
            // known before the fork; libsystemd then lets whoever sees the variable ping.
            env.push((
                "WATCHDOG_USEC".to_string(),
                watchdog.as_micros().to_string(),
            ));
        }
        let variable = match protocol {
            Protocol::Node => {
                // What Node's cluster.fork() sets: the worker's cluster.worker.id.
                env.push(("NODE_UNIQUE_ID".to_string(), start.node_id.to_string()));
                env.push((
                    "NODE_CHANNEL_SERIALIZATION_MODE".to_string(),
                    "json".to_string(),
                ));
                env.extend(start.preload.iter().cloned());
                "NODE_CHANNEL_FD"
            }
            Protocol::ClusterLb => IPC_FD_VARIABLE,
        };
        let forked = match start.fork {
            Some(spec) => {
                let env: Vec<(String, String)> = spec.env.clone().into_iter().collect();
                Some(WorkerCommand::with_env(
                    &spec.command(),
                    &env,
                    spec.cwd.as_deref(),
                )?)
            }
            None => None,
        };
        let command = forked.as_ref().unwrap_or(&self.launch.command);
        let pid = command.spawn(&WorkerSpec {
            sockets: &sockets,
            socket_names: &names,
            env: &env,
            channels: &[Channel {
                fd: worker_end.as_fd(),
                variable,
            }],
            stdout: Some(stdout_write.as_fd()),
            stderr: Some(stderr_write.as_fd()),
            credentials: self.launch.credentials.as_ref(),
            filter: self.launch.filter.as_ref(),
        })?;
        let mut claims = Claims {
            slot,
            ..Claims::default()
        };
        // The addresses' sockets come first; the Unix paths' copies after them are shared and
        // not the worker's own, so they are not claimed.
        let addresses = groups.addresses().into_iter().take(groups.activated());
        for (socket, addr) in sockets.iter().zip(addresses) {
            claims.record(addr, socket);
        }
        // The worker has its copies now; ours close here, so a dead worker's socket closes
        // with it and its pipes reach EOF.
        drop((sockets, worker_end, stdout_write, stderr_write));
        let output = [stdout_read.try_clone().ok(), stderr_read.try_clone().ok()];
        if start.fork.is_some_and(|spec| spec.silent) {
            output::forward(pid, 1, stdout_read, self.forwarded.clone());
            output::forward(pid, 2, stderr_read, self.forwarded.clone());
        } else {
            output::capture(
                Source::Worker(id),
                pid.as_raw(),
                Stream::Stdout,
                stdout_read,
            );
            output::capture(
                Source::Worker(id),
                pid.as_raw(),
                Stream::Stderr,
                stderr_read,
            );
        }
        let channel = self
            .open_channel(protocol, primary_end, pid, false)
            .unwrap_or_else(|e| {
                log::warn!("worker {id}: no channel: {e}");
                WorkerChannel::Closed
            });
        self.table.insert(
            pid,
            WorkerIo {
                id,
                channel,
                claims,
                reported: HashSet::new(),
                output,
                said: Vec::new(),
                early: EarlyMessages::default(),
                drops: Drops::default(),
            },
        );
        Ok(pid)
    }

    /// Starts the primary's end of a channel: its reader reports to the inbox.
    fn open_channel(
        &self,
        protocol: Protocol,
        fd: OwnedFd,
        pid: Pid,
        online: bool,
    ) -> std::io::Result<WorkerChannel> {
        let events = self.events.clone();
        Ok(match protocol {
            Protocol::Node => {
                let max = self.launch.max_message;
                let budget = Budget::for_worker(max, &self.budget);
                let sink = move |event| events.send((pid, ChannelEvent::Node(event))).is_ok();
                WorkerChannel::Node(NodeConversation::start(fd, pid, sink, (budget, max))?)
            }
            Protocol::ClusterLb => {
                let budget = Budget::for_worker(ipc::MAX_MESSAGE, &self.budget);
                let sink = move |event| events.send((pid, ChannelEvent::ClusterLb(event))).is_ok();
                WorkerChannel::ClusterLb(IpcConversation::start(fd, sink, budget, online)?)
            }
        })
    }

    /// Takes up one worker's I/O as an older primary left it (an upgrade).
    pub fn adopt(&mut self, worker: &SavedWorker) {
        let pid = Pid::from_raw(worker.pid);
        let mut output = [None, None];
        for (slot, (stream, fd)) in output.iter_mut().zip([
            (Stream::Stdout, worker.stdout),
            (Stream::Stderr, worker.stderr),
        ]) {
            if let Some(fd) = fd.and_then(Inherited::take) {
                *slot = fd.try_clone().ok();
                output::capture(Source::Worker(worker.id), worker.pid, stream, fd);
            }
        }
        let channel = match &worker.channel {
            ChannelState::Closed => None,
            ChannelState::ClusterLb { socket, online } => socket.take().and_then(|fd| {
                self.open_channel(Protocol::ClusterLb, fd, pid, *online)
                    .ok()
            }),
            ChannelState::Node {
                socket,
                seq,
                listens,
                next_key,
                paths,
            } => socket.take().and_then(|fd| {
                match self.open_channel(Protocol::Node, fd, pid, false) {
                    Ok(WorkerChannel::Node(node)) => Some(WorkerChannel::Node(
                        NodeConversation::resume(node, *seq, listens, paths, *next_key),
                    )),
                    _ => None,
                }
            }),
        };
        if channel.is_none() && !matches!(worker.channel, ChannelState::Closed) {
            log::warn!(
                "worker {} (pid {}): its channel did not survive the upgrade",
                worker.id,
                worker.pid
            );
        }
        self.slots.claim(worker.slot);
        self.table.insert(
            pid,
            WorkerIo {
                id: worker.id,
                channel: channel.unwrap_or(WorkerChannel::Closed),
                claims: Claims {
                    slot: worker.slot,
                    addresses: worker.addresses.clone(),
                    given: worker.given.iter().copied().collect(),
                    queries: worker.queries,
                },
                reported: worker.reported.iter().copied().collect(),
                output,
                said: worker.said.clone(),
                early: EarlyMessages::default(),
                drops: Drops::default(),
            },
        );
    }

    /// Puts `slot` in the active set as an older primary had it (an upgrade).
    pub fn restore_active(&mut self, slot: u32) {
        self.slots.activate(slot);
    }

    /// What the worker's channel said, interpreted: (its id, what it heard). A message it
    /// addressed to other workers is relayed here, and is nothing for the shell.
    pub fn hear(&mut self, pid: Pid, event: ChannelEvent) -> Option<(u32, Heard)> {
        let worker = self.table.get_mut(&pid)?;
        let id = worker.id;
        match worker.channel.hear(event, &worker.claims.addresses) {
            Said::Heard(heard) => Some((id, heard)),
            Said::Relay(relay) => {
                self.relay_addressed(pid, relay);
                Some((id, Heard::Nothing))
            }
        }
    }

    /// Answers the worker's request for a socket, from `groups`, under `policy`.
    pub fn answer(&mut self, pid: Pid, query: Query, groups: &mut Groups, policy: QueryPolicy) {
        let Some(worker) = self.table.get_mut(&pid) else {
            return;
        };
        let mut sockets = Sockets { groups, policy };
        match (&mut worker.channel, query) {
            (
                WorkerChannel::ClusterLb(ipc),
                Query::ClusterLb {
                    index,
                    address,
                    protocol,
                },
            ) => ipc.answer(
                pid,
                index,
                &address,
                &protocol,
                &mut worker.claims,
                &mut sockets,
            ),
            (WorkerChannel::Node(node), Query::Node(query)) => node.answer(
                (worker.id, pid),
                query,
                &mut worker.claims,
                &mut sockets,
                &mut self.node,
            ),
            _ => {}
        }
        // The answer may have made a group (a Node worker's first listen on a port). While no
        // worker is ready, the reserve stands in for it too: otherwise the program finds no
        // active slot and the kernel's fallback hands connections to a socket that is not ready
        // (a worker that listened but has yet to send 'ready' under --wait-ready).
        if self.slots.active().is_empty() {
            self.rebalance(groups);
        }
    }

    /// The worker broke its channel's protocol: close the channel. Its id, if it is a worker.
    pub fn reject(&mut self, pid: Pid, problem: &str) -> Option<u32> {
        let worker = self.table.get_mut(&pid)?;
        log::error!(
            "worker {} (pid {pid}) broke the IPC protocol: {}; disconnecting it",
            worker.id,
            crate::logging::quote(problem)
        );
        worker.channel.close();
        Some(worker.id)
    }

    /// A user message to the worker, over its channel.
    pub fn send(&mut self, pid: Pid, data: Value) {
        let sent = match self.table.get_mut(&pid) {
            Some(worker) => worker.channel.send(data),
            None => Err("no such worker".into()),
        };
        if let Err(why) = sent {
            log::warn!("message to worker pid {pid} not sent: {why}");
        }
    }

    /// A message of the program's primary to a Node worker, as it sent it; `room` is held
    /// until it is written.
    pub fn relay(&mut self, pid: Pid, message: Value, room: Held) {
        let sent = match self.table.get_mut(&pid) {
            Some(worker) => worker.channel.relay(message, room),
            None => Err("it is gone".into()),
        };
        if let Err(why) = sent {
            log::debug!(
                "a message of the program's primary to worker pid {pid} was not sent: {why}"
            );
        }
    }

    /// Closes the worker's channel (the program's primary disconnected it): it reads EOF.
    pub fn disconnect(&mut self, pid: Pid) {
        if let Some(worker) = self.table.get_mut(&pid) {
            worker.channel.close();
        }
    }

    /// `disconnect` over the channel if the worker speaks it, else the stop signal (SIGTERM,
    /// or `--stop-signal`).
    pub fn ask_to_stop(&mut self, pid: Pid) {
        let asked = self
            .table
            .get_mut(&pid)
            .is_some_and(|w| w.channel.ask_to_stop());
        if !asked {
            let _ = kill(pid, self.launch.stop_signal);
        }
    }

    /// SIGKILL to the worker's process group, so helpers it started die with it.
    pub fn kill(pid: Pid) {
        let _ = killpg(pid, Signal::SIGKILL);
        let _ = kill(pid, Signal::SIGKILL);
    }

    /// The worker is gone: its slot is free (and out of every map), its channel closed.
    /// Returns whether it was a worker.
    pub fn release(&mut self, pid: Pid, groups: &mut Groups) -> bool {
        let Some(worker) = self.table.remove(&pid) else {
            return false;
        };
        self.forget_slot(worker.slot(), groups);
        self.released.extend(worker.claims.given.keys());
        true
    }

    fn forget_slot(&mut self, slot: u32, groups: &mut Groups) {
        self.slots.release(slot);
        groups.clear_slot(slot);
        self.rebalance(groups);
    }

    /// Puts the worker's slot in the active set, or takes it out.
    pub fn set_active(&mut self, pid: Pid, active: bool, groups: &mut Groups) {
        let Some(slot) = self.table.get(&pid).map(WorkerIo::slot) else {
            return;
        };
        let changed = if active {
            self.slots.activate(slot)
        } else {
            self.slots.deactivate(slot)
        };
        if changed {
            self.rebalance(groups);
        }
    }

    /// Publishes the active set after it changed, with the reserve standing in while no
    /// worker is in it, and handing what waited in it to the workers once one is.
    fn rebalance(&mut self, groups: &mut Groups) {
        let reserve = self.reserve.open(&mut self.slots, groups);
        if self.slots.active().is_empty() {
            if let Some(slot) = reserve {
                if !self.reserve.in_use {
                    log::info!(
                        "no worker can take connections: they wait in the reserve until one is ready"
                    );
                }
                self.reserve.in_use = true;
                groups.publish(&[slot], &[]);
                return;
            }
        }
        self.publish(groups);
        if self.reserve.in_use {
            self.reserve.renew(&mut self.slots, groups);
        }
    }

    /// Connections wait in the idle reserve (the program's last resort put them there while
    /// every active worker had just died): they go to the workers now.
    pub fn drain_reserve_if(&mut self, waiting: impl Fn(u64) -> bool, groups: &mut Groups) {
        if self.reserve.in_use || self.slots.active().is_empty() {
            return;
        }
        if self.reserve.inodes().into_iter().any(waiting) {
            self.reserve.renew(&mut self.slots, groups);
        }
    }

    /// The inodes of the reserve's sockets (the primary's own listeners).
    pub fn reserve_inodes(&self) -> Vec<u64> {
        self.reserve.inodes()
    }

    /// The cluster stops: no reserve any more (see `reserve::Reserve::close`).
    pub fn close_reserve(&mut self, groups: &mut Groups) {
        let was_in_use = self.reserve.in_use;
        self.reserve.close(&mut self.slots, groups);
        if was_in_use {
            self.publish(groups);
        }
    }

    /// Tells the kernel programs which slots are active, and which worker id each serves.
    pub fn publish(&self, groups: &mut Groups) {
        let ids: std::collections::HashMap<u32, u32> =
            self.table.values().map(|w| (w.slot(), w.id)).collect();
        let members: Vec<(u32, u32)> = self
            .slots
            .active()
            .iter()
            .filter_map(|slot| Some((*slot, *ids.get(slot)?)))
            .collect();
        groups.publish(self.slots.active(), &members);
    }

    /// Every worker's I/O as the new binary of an upgrade needs it; `Err` with the id of a
    /// worker whose channel is in the middle of a message.
    pub fn handover(&self) -> Result<Vec<SavedWorker>, u32> {
        self.table
            .iter()
            .map(|(pid, io)| {
                let [stdout, stderr] = &io.output;
                Ok(SavedWorker {
                    pid: pid.as_raw(),
                    id: io.id,
                    slot: io.slot(),
                    channel: io.channel.handover().map_err(|Busy| io.id)?,
                    stdout: stdout.as_ref().and_then(Inherited::of),
                    stderr: stderr.as_ref().and_then(Inherited::of),
                    addresses: io.claims.addresses.clone(),
                    given: io.claims.given.iter().map(|(i, a)| (*i, *a)).collect(),
                    queries: io.claims.queries,
                    reported: io.reported.iter().copied().collect(),
                    said: io.said.clone(),
                })
            })
            .collect()
    }
}

/// A pipe for a worker's output: (our read end, the worker's write end), both close-on-exec.
fn output_pipe() -> std::io::Result<(OwnedFd, OwnedFd)> {
    nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(std::io::Error::from)
}

#[cfg(test)]
mod early_message_tests {
    use super::EarlyMessages;
    use serde_json::json;

    #[test]
    fn early_messages_are_kept_in_order_up_to_their_bounds_and_given_once() {
        let mut early = EarlyMessages::default();
        assert!(early.keep(&json!("hello")));
        assert!(early.keep(&json!({"n": 2})));
        assert_eq!(early.take(), [json!("hello"), json!({"n": 2})]);
        assert!(early.take().is_empty(), "given once");

        for n in 0..EarlyMessages::MAX_MESSAGES {
            assert!(early.keep(&json!(n)));
        }
        assert!(!early.keep(&json!("one more")), "at most MAX_MESSAGES");
        early.take();
        let big = json!("x".repeat(EarlyMessages::MAX_BYTES));
        assert!(!early.keep(&big), "at most MAX_BYTES of JSON");
        assert!(early.keep(&json!("small")), "a small one still fits");
    }
}
