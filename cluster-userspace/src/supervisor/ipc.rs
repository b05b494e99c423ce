//! The primary's side of the IPC conversation with each worker: reading its datagrams,
//! checking their order, answering queryServer with a socket.

use std::{
    os::fd::{AsFd, OwnedFd},
    sync::Arc,
};

use nix::unistd::Pid;
use tokio::sync::mpsc::UnboundedSender;

use super::{
    budget::{Budget, Held},
    process::WorkerChannel,
    Departure, Event, Input, Readiness, Supervisor,
};
use cluster_lb_worker::{
    channel::Endpoint,
    protocol::{self, PrimaryMessage, WorkerMessage, VERSION},
    ListenAddr,
};

/// What a worker's IPC reader reports.
pub(super) enum IpcEvent {
    /// A message, and its room in the worker's budget until it is handled.
    Message(WorkerMessage, Held),
    Violation(String),
    Closed,
}

impl Supervisor {
    /// A worker's channel said something: answer it, and tell the lifecycle what it means.
    pub(super) fn on_ipc(&mut self, pid: Pid, event: IpcEvent) -> Option<Input> {
        let worker = self.workers.get_mut(&pid)?;
        let id = worker.id;
        let WorkerChannel::ClusterLb { online, .. } = &mut worker.channel else {
            return None;
        };
        let (message, _room) = match event {
            IpcEvent::Message(message, room) => (message, room),
            IpcEvent::Closed => {
                worker.channel = WorkerChannel::Closed;
                return Some(Input::ChannelClosed { pid });
            }
            IpcEvent::Violation(problem) => return self.reject(pid, &problem),
        };
        if !*online && !matches!(message, WorkerMessage::Online { .. }) {
            return self.reject(pid, "a message before `online`");
        }
        match message {
            WorkerMessage::Online { .. } => {
                if *online {
                    return self.reject(pid, "`online` sent twice");
                }
                *online = true;
                Some(Input::Online { pid })
            }
            WorkerMessage::QueryServer {
                index,
                address,
                protocol,
                ..
            } => {
                self.answer_query(pid, index, &address, &protocol);
                None
            }
            WorkerMessage::Listening { address, .. } => {
                let known = address
                    .parse::<ListenAddr>()
                    .is_ok_and(|a| worker.addresses.contains(&a));
                if !known {
                    return self.reject(
                        pid,
                        &format!("`listening` on {address}, which it has no socket for"),
                    );
                }
                self.emit(Event::Listening {
                    id,
                    pid: pid.as_raw(),
                    address,
                });
                Some(Input::Ready {
                    pid,
                    how: Readiness::Listening,
                })
            }
            WorkerMessage::Message { data, .. } => {
                self.emit(Event::Message {
                    id,
                    pid: pid.as_raw(),
                    data,
                });
                None
            }
            WorkerMessage::Disconnect { .. } => Some(Input::Leaving {
                pid,
                why: Departure::WorkerDisconnected,
            }),
        }
    }

    /// A worker broke its channel's protocol: log it, close the channel; the lifecycle drains
    /// it. Others keep serving.
    pub(super) fn reject(&mut self, pid: Pid, problem: &str) -> Option<Input> {
        let worker = self.workers.get_mut(&pid)?;
        log::error!(
            "worker {} (pid {pid}) broke the IPC protocol: {problem}; disconnecting it",
            worker.id
        );
        if let WorkerChannel::Node(node) = &worker.channel {
            node.close();
        }
        worker.channel = WorkerChannel::Closed;
        Some(Input::Leaving {
            pid,
            why: Departure::ProtocolViolation(problem.to_string()),
        })
    }

    /// A user message to a worker, over its channel.
    pub(super) fn send_message(&mut self, pid: Pid, data: serde_json::Value) {
        if let Some(WorkerChannel::Node(node)) = self.workers.get_mut(&pid).map(|w| &mut w.channel)
        {
            if let Err(e) = node.send_user(data) {
                log::warn!("message to worker pid {pid} not sent: {e}");
            }
            return;
        }
        let endpoint = self.cluster_lb_endpoint(pid);
        let message = PrimaryMessage::Message { v: VERSION, data };
        match (endpoint, protocol::encode(&message)) {
            (Some(endpoint), Some(bytes)) => {
                if let Err(e) = endpoint.try_send(&bytes, None) {
                    log::warn!("message to worker pid {pid} not sent: {e}");
                }
            }
            (None, _) => {
                log::warn!("message to pid {pid} not sent: no such worker with an IPC channel")
            }
            (_, None) => log::warn!(
                "message to pid {pid} not sent: over {} bytes",
                protocol::MAX_MESSAGE
            ),
        }
    }

    fn answer_query(&mut self, pid: Pid, index: u32, address: &str, protocol: &str) {
        let Some(worker) = self.workers.get(&pid) else {
            return;
        };
        let outcome = match address.parse::<ListenAddr>() {
            Err(e) => Err(format!("bad address {address}: {e}")),
            Ok(_) if protocol != "tcp" => Err(format!("protocol {protocol} is not supported; use tcp")),
            Ok(addr) if worker.addresses.contains(&addr) => Err(format!(
                "this worker already has a socket for {addr} (socket-activated ones are in LISTEN_FDS)"
            )),
            Ok(addr) if !self.groups.allows_query(addr) => Err(format!(
                "{addr} is not one of the --listen addresses this cluster was started with"
            )),
            Ok(addr) => self
                .query_socket(pid, addr, false)
                .map_err(|refusal| refusal.why),
        };
        let Some(endpoint) = self.cluster_lb_endpoint(pid) else {
            return;
        };
        let (reply, socket): (PrimaryMessage, Option<OwnedFd>) = match outcome {
            Ok((addr, socket)) => {
                if let Some(worker) = self.workers.get_mut(&pid) {
                    if !worker.addresses.contains(&addr) {
                        worker.addresses.push(addr);
                    }
                }
                let reply = PrimaryMessage::QueryServerReply {
                    v: VERSION,
                    index,
                    address: addr.to_string(),
                    ok: true,
                    error: None,
                };
                (reply, Some(socket))
            }
            Err(error) => {
                log::warn!("worker (pid {pid}) asked for {address}: {error}");
                let reply = PrimaryMessage::QueryServerReply {
                    v: VERSION,
                    index,
                    address: address.to_string(),
                    ok: false,
                    error: Some(error),
                };
                (reply, None)
            }
        };
        let sent = protocol::encode(&reply)
            .map(|bytes| endpoint.try_send(&bytes, socket.as_ref().map(|s| s.as_fd())));
        if !matches!(sent, Some(Ok(()))) {
            log::warn!("worker (pid {pid}): could not send the queryServer reply");
        }
        // `socket` drops here: the worker holds the only copy.
    }
}

impl Supervisor {
    fn cluster_lb_endpoint(&self, pid: Pid) -> Option<Arc<Endpoint>> {
        match self.workers.get(&pid).map(|w| &w.channel) {
            Some(WorkerChannel::ClusterLb { endpoint, .. }) => Some(Arc::clone(endpoint)),
            _ => None,
        }
    }
}

/// Reads a worker's datagrams and hands them, decoded, to the supervisor loop, each within
/// the worker's byte budget (a worker that sends faster than they are handled waits).
pub(super) fn read_ipc(
    pid: Pid,
    endpoint: Arc<Endpoint>,
    sink: UnboundedSender<(Pid, IpcEvent)>,
    budget: Budget,
) {
    tokio::spawn(async move {
        loop {
            let Some(mut room) = budget.take(protocol::MAX_MESSAGE + 1).await else {
                break;
            };
            let event = match endpoint.recv().await {
                Ok(None) | Err(_) => IpcEvent::Closed,
                Ok(Some(datagram)) if datagram.truncated => {
                    IpcEvent::Violation(format!("a message over {} bytes", protocol::MAX_MESSAGE))
                }
                // A worker has no descriptor to give the primary; those that came are closed
                // with the datagram, here and now.
                Ok(Some(datagram)) if !datagram.fds.is_empty() || datagram.fds_truncated => {
                    IpcEvent::Violation("a message carrying file descriptors".into())
                }
                Ok(Some(datagram)) => match protocol::decode::<WorkerMessage>(&datagram.bytes) {
                    Ok(message) => {
                        room.keep(datagram.bytes.len());
                        IpcEvent::Message(message, room)
                    }
                    Err(e) => IpcEvent::Violation(e.to_string()),
                },
            };
            let last = !matches!(event, IpcEvent::Message(..));
            if sink.send((pid, event)).is_err() || last {
                break;
            }
        }
    });
}
