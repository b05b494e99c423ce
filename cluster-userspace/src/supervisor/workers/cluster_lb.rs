//! A worker's conversation in cluster-lb's own protocol (docs/PROTOCOL.md): one JSON message
//! per SOCK_SEQPACKET datagram. The reader checks and decodes each datagram within the worker's
//! byte budget; `hear` says what a message means (it must say `online` first, and `listening`
//! only for an address it has a socket for; a `message` with `to` is for other workers);
//! `answer` sends a `queryServer` its socket.

use std::{
    os::fd::{AsFd, OwnedFd},
    sync::Arc,
};

use cluster_lb_worker::ListenAddr;
use nix::unistd::Pid;
use serde_json::Value;

use super::{
    heard::{Heard, Query, Relay, Said},
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
    /// It was asked to stop, or said it leaves: messages for workers pass it by.
    leaving: bool,
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
        Ok(IpcConversation {
            endpoint,
            online,
            leaving: false,
        })
    }

    pub fn hear(&mut self, event: IpcEvent, addresses: &[ListenAddr]) -> Said {
        let message = match event {
            IpcEvent::Message(message, room) => (message, room),
            IpcEvent::Closed => return Heard::Closed.into(),
            IpcEvent::Violation(problem) => return Heard::Violation(problem).into(),
        };
        let (message, room) = message;
        if !self.online && !matches!(message, WorkerMessage::Online { .. }) {
            return Heard::Violation("a message before `online`".into()).into();
        }
        let heard = match message {
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
            WorkerMessage::Message {
                data, to: Some(to), ..
            } => return Said::Relay(Relay { to, data, room }),
            WorkerMessage::Message { data, to: None, .. } => Heard::Message(data, room),
            WorkerMessage::Disconnect { .. } => {
                self.leaving = true;
                Heard::Leaving(Departure::WorkerDisconnected)
            }
        };
        heard.into()
    }

    /// `disconnect`, once the worker said `online`.
    pub fn ask_to_stop(&mut self) -> bool {
        self.leaving = true;
        self.online && self.try_send(&PrimaryMessage::Disconnect { v: VERSION }, None)
    }

    /// Whether it said `online`: it reads its channel.
    pub fn is_online(&self) -> bool {
        self.online
    }

    /// Whether it is leaving (asked to stop, or said `disconnect`).
    pub fn is_leaving(&self) -> bool {
        self.leaving
    }

    /// A user message from the primary.
    pub fn send(&self, data: Value) -> Result<(), String> {
        let message = PrimaryMessage::Message {
            v: VERSION,
            data,
            from: None,
        };
        let datagram = ipc::encode(&message).ok_or_else(|| {
            format!(
                "the message is over the {} bytes of a datagram of cluster-lb's IPC",
                ipc::MAX_MESSAGE
            )
        })?;
        self.send_datagram(&datagram)
    }

    /// One encoded datagram, straight into the worker's socket buffer, never waiting: a worker
    /// that does not read its channel loses messages, it does not hold the primary up.
    pub fn send_datagram(&self, datagram: &[u8]) -> Result<(), String> {
        self.endpoint
            .try_send(datagram, None)
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::WouldBlock => {
                    "its channel is full (it does not read it)".into()
                }
                _ => format!("its channel failed: {e}"),
            })
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
            Ok(addr) => sockets.open(claims, addr, crate::kernel::sockets::Stack::System),
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
