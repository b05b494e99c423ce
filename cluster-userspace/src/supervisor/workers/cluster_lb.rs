//! A worker's conversation in cluster-lb's own protocol (docs/PROTOCOL.md): one JSON message
//! per SOCK_SEQPACKET datagram. The reader checks and decodes each datagram within the worker's
//! byte budget; `hear` says what a message means (it must say `online` first, and `listening`
//! only for an address it has a socket for); `answer` sends a `queryServer` its socket.

use std::{
    os::fd::{AsFd, OwnedFd},
    sync::Arc,
};

use cluster_lb_worker::ListenAddr;
use nix::unistd::Pid;
use serde_json::Value;

use super::{
    heard::{Heard, Query},
    queries::{Claims, Refusal, Sockets},
};
use crate::{
    protocol::{
        budget::{Budget, Held},
        ipc::{self, PrimaryMessage, WorkerMessage, VERSION},
        ipc_channel::Endpoint,
    },
    supervisor::{
        events::Departure,
        saved::{ChannelState, Inherited},
    },
};

/// What a worker's IPC reader reports.
#[derive(Debug)]
pub enum IpcEvent {
    /// A message, and its room in the worker's budget until it is handled.
    Message(WorkerMessage, Held),
    Violation(String),
    Closed,
}

/// The primary's end of one worker's IPC channel.
pub struct IpcConversation {
    endpoint: Arc<Endpoint>,
    /// The worker said `online`; it understands `disconnect` from then on.
    online: bool,
}

impl IpcConversation {
    /// Starts reading `fd` (the primary's end; `online` when continuing an older primary's
    /// conversation); every event goes to `sink`, which says whether anyone still listens.
    pub fn start(
        fd: OwnedFd,
        sink: impl Fn(IpcEvent) -> bool + Send + 'static,
        budget: Budget,
        online: bool,
    ) -> std::io::Result<IpcConversation> {
        let endpoint = Arc::new(Endpoint::new(fd)?);
        read(Arc::clone(&endpoint), sink, budget);
        Ok(IpcConversation { endpoint, online })
    }

    pub fn hear(&mut self, event: IpcEvent, addresses: &[ListenAddr]) -> Heard {
        let message = match event {
            IpcEvent::Message(message, room) => (message, room),
            IpcEvent::Closed => return Heard::Closed,
            IpcEvent::Violation(problem) => return Heard::Violation(problem),
        };
        let (message, room) = message;
        if !self.online && !matches!(message, WorkerMessage::Online { .. }) {
            return Heard::Violation("a message before `online`".into());
        }
        match message {
            WorkerMessage::Online { .. } if self.online => {
                Heard::Violation("`online` sent twice".into())
            }
            WorkerMessage::Online { .. } => {
                self.online = true;
                Heard::Online
            }
            WorkerMessage::QueryServer {
                index,
                address,
                protocol,
                ..
            } => Heard::Query(Query::ClusterLb {
                index,
                address,
                protocol,
            }),
            WorkerMessage::Listening { address, .. } => {
                let known = address
                    .parse::<ListenAddr>()
                    .is_ok_and(|a| addresses.contains(&a));
                if known {
                    Heard::Listening(address, None)
                } else {
                    Heard::Violation(format!(
                        "`listening` on {address}, which it has no socket for"
                    ))
                }
            }
            WorkerMessage::Message { data, .. } => Heard::Message(data, room),
            WorkerMessage::Disconnect { .. } => Heard::Leaving(Departure::WorkerDisconnected),
        }
    }

    /// `disconnect`, once the worker said `online`.
    pub fn ask_to_stop(&self) -> bool {
        self.online && self.try_send(&PrimaryMessage::Disconnect { v: VERSION }, None)
    }

    pub fn send(&self, data: Value) -> Result<(), String> {
        let message = PrimaryMessage::Message { v: VERSION, data };
        let bytes =
            ipc::encode(&message).ok_or_else(|| format!("over {} bytes", ipc::MAX_MESSAGE))?;
        self.endpoint
            .try_send(&bytes, None)
            .map_err(|e| e.to_string())
    }

    fn try_send(&self, message: &PrimaryMessage, socket: Option<&OwnedFd>) -> bool {
        ipc::encode(message).is_some_and(|bytes| {
            self.endpoint
                .try_send(&bytes, socket.map(AsFd::as_fd))
                .is_ok()
        })
    }

    /// Answers a `queryServer` for `address` with a socket of its group, or why not.
    pub fn answer(
        &self,
        pid: Pid,
        index: u32,
        address: &str,
        protocol: &str,
        claims: &mut Claims,
        sockets: &mut Sockets<'_>,
    ) {
        let outcome = match address.parse::<ListenAddr>() {
            Err(e) => Err(Refusal::new(libc::EINVAL, format!("bad address {address}: {e}"))),
            Ok(_) if protocol != "tcp" => Err(Refusal::new(
                libc::EINVAL,
                format!("protocol {protocol} is not supported; use tcp"),
            )),
            Ok(addr) if claims.addresses.contains(&addr) => Err(Refusal::new(
                libc::EINVAL,
                format!("this worker already has a socket for {addr} (socket-activated ones are in LISTEN_FDS)"),
            )),
            Ok(addr) if !sockets.groups.allows_query(addr) => Err(Refusal::new(
                libc::EACCES,
                format!("{addr} is not one of the --listen addresses this cluster was started with"),
            )),
            Ok(addr) => sockets.open(claims, addr, false),
        };
        let (reply, socket) = match outcome {
            Ok((addr, socket)) => (
                PrimaryMessage::QueryServerReply {
                    v: VERSION,
                    index,
                    address: addr.to_string(),
                    ok: true,
                    error: None,
                },
                Some(socket),
            ),
            Err(refusal) => {
                log::warn!(
                    "worker (pid {pid}) asked for {}: {}",
                    crate::logging::quote(address),
                    refusal.why
                );
                let reply = PrimaryMessage::QueryServerReply {
                    v: VERSION,
                    index,
                    address: address.to_string(),
                    ok: false,
                    error: Some(refusal.why),
                };
                (reply, None)
            }
        };
        if !self.try_send(&reply, socket.as_ref()) {
            log::warn!("worker (pid {pid}): could not send the queryServer reply");
        }
        // `socket` drops here: the worker holds the only copy.
    }

    pub fn handover(&self) -> ChannelState {
        match Inherited::of(&self.endpoint.as_raw_fd()) {
            Some(socket) => ChannelState::ClusterLb {
                socket,
                online: self.online,
            },
            None => ChannelState::Closed,
        }
    }
}

/// Reads a worker's datagrams and hands them, decoded, to the supervisor loop, each within
/// the worker's byte budget (a worker that sends faster than they are handled waits).
fn read(endpoint: Arc<Endpoint>, sink: impl Fn(IpcEvent) -> bool + Send + 'static, budget: Budget) {
    tokio::spawn(async move {
        loop {
            let Some(mut room) = budget.take(ipc::MAX_MESSAGE + 1).await else {
                break;
            };
            let event = match endpoint.recv().await {
                Ok(None) | Err(_) => IpcEvent::Closed,
                Ok(Some(datagram)) if datagram.truncated => {
                    IpcEvent::Violation(format!("a message over {} bytes", ipc::MAX_MESSAGE))
                }
                // A worker has no descriptor to give the primary; those that came are closed
                // with the datagram, here and now.
                Ok(Some(datagram)) if !datagram.fds.is_empty() || datagram.fds_truncated => {
                    IpcEvent::Violation("a message carrying file descriptors".into())
                }
                Ok(Some(datagram)) => match ipc::decode::<WorkerMessage>(&datagram.bytes) {
                    Ok(message) => {
                        room.keep(datagram.bytes.len());
                        IpcEvent::Message(message, room)
                    }
                    Err(e) => IpcEvent::Violation(e.to_string()),
                },
            };
            let last = !matches!(event, IpcEvent::Message(..));
            if !sink(event) || last {
                break;
            }
        }
    });
}
