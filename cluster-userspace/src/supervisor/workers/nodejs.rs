//! A worker's conversation in Node's cluster protocol (node-ipc.md): Node's cluster messages
//! become what the primary heard, and every `queryServer` is answered with the worker's own
//! socket in the reuseport group of that address (or with an errno the app sees as its listen
//! error). What all Node workers share (one port for every `listen(0)`, one set of TLS ticket
//! keys) is [`NodeGroups`].

use std::{
    collections::{BTreeMap, HashMap},
    net::{IpAddr, Ipv6Addr, SocketAddr},
    os::fd::{AsFd, OwnedFd},
    path::PathBuf,
};

use cluster_lb_worker::{ListenAddr, Transport};
use nix::unistd::Pid;
use serde_json::Value;

use super::{
    heard::{Busy, Heard, Query as AnyQuery},
    queries::{Claims, Refusal, Sockets},
};
pub use crate::protocol::nodejs::channel::NodeEvent;
use crate::{
    kernel::sockets::Stack,
    protocol::{
        budget::{Budget, Held},
        nodejs::{
            self as protocol,
            channel::{NodeChannel, SendError},
            primary, AddressType, FromWorker, Query, ToWorker,
        },
    },
    supervisor::{
        events::Departure,
        saved::{ChannelState, Inherited, NodeGroupsState},
    },
};

/// The primary's end of a Node worker's channel, and its side of the conversation.
pub struct NodeConversation {
    channel: NodeChannel,
    /// Our message counter (the worker only echoes it).
    seq: u64,
    /// Its open listens, by the key we gave each.
    listens: BTreeMap<String, ListenAddr>,
    /// Its open listens on Unix-socket paths, by key.
    paths: BTreeMap<String, PathBuf>,
    next_key: u64,
    /// It was asked to disconnect, or said it does: no `queryServer` is answered any more (as
    /// Node's primary does), since a socket arriving after its channel closed kills it.
    leaving: bool,
}

impl NodeConversation {
    /// Starts reading and writing `fd` (the primary's end of worker `pid`'s channel); every
    /// event goes to `sink`, which says whether anyone still listens.
    pub fn start(
        fd: OwnedFd,
        pid: Pid,
        sink: impl Fn(NodeEvent) -> bool + Send + Sync + 'static,
        (budget, max_message): (Budget, usize),
    ) -> std::io::Result<NodeConversation> {
        Ok(NodeConversation {
            channel: NodeChannel::start(fd, pid, sink, budget, max_message)?,
            seq: 0,
            listens: BTreeMap::new(),
            paths: BTreeMap::new(),
            next_key: 0,
            leaving: false,
        })
    }

    /// Continues the conversation an older binary had with the worker (an upgrade).
    pub fn resume(
        mut conversation: NodeConversation,
        seq: u64,
        listens: &[(String, ListenAddr)],
        paths: &[(String, PathBuf)],
        next_key: u64,
    ) -> NodeConversation {
        conversation.seq = seq;
        conversation.listens = listens.iter().cloned().collect();
        conversation.paths = paths.iter().cloned().collect();
        conversation.next_key = next_key;
        conversation
    }

    fn next_seq(&mut self) -> u64 {
        let seq = self.seq;
        self.seq += 1;
        seq
    }

    pub fn hear(&mut self, event: NodeEvent) -> Heard {
        let message = match event {
            // The message's room in the budget is given back once the shell handled it (a
            // user message carries it along; the rest is done here).
            NodeEvent::Message(FromWorker::User(data), room) => return Heard::Message(data, room),
            NodeEvent::Message(message, _room) => message,
            NodeEvent::Violation(problem) => return Heard::Violation(problem),
            NodeEvent::Closed => return Heard::Closed,
        };
        match message {
            FromWorker::Online => Heard::Online,
            FromWorker::QueryServer(query) => Heard::Query(AnyQuery::Node(query)),
            FromWorker::Listening(query) => {
                let address = self
                    .listens
                    .values()
                    .find(|a| Some(a.socket_addr().port() as i64) == query.port)
                    .map_or_else(|| describe(&query), ToString::to_string);
                let message = primary::to_primary::listening(
                    address_type_value(query.address_type),
                    query.address.as_deref(),
                    query.port,
                    query.fd,
                );
                Heard::Listening(address, Some(message))
            }
            FromWorker::Close { key } => {
                let closed = match self.listens.remove(&key) {
                    Some(addr) => Some(addr.to_string()),
                    None => self
                        .paths
                        .remove(&key)
                        .map(|p| format!("unix:{}", p.display())),
                };
                match closed {
                    // While draining, closing is what it was asked to do; otherwise it no
                    // longer serves an address it is in the group of.
                    Some(closed) => Heard::Leaving(Departure::ListenerClosed(closed)),
                    None => Heard::Nothing,
                }
            }
            FromWorker::ExitedAfterDisconnect { seq } => {
                self.leaving = true;
                let ack = ToWorker::Ack {
                    ack: seq,
                    seq: self.next_seq(),
                };
                if let Err(e) = self.channel.send(ack) {
                    log::warn!("a Node worker's exitedAfterDisconnect not acknowledged: {e}");
                }
                Heard::Leaving(Departure::WorkerDisconnected)
            }
            FromWorker::OtherCluster(value) => {
                log::debug!(
                    "ignored a cluster message {}",
                    crate::logging::quote(&value.to_string())
                );
                Heard::Nothing
            }
            FromWorker::Clb(value) => {
                if value.get("cmd").and_then(Value::as_str) == Some("NODE_CLB_ROLE") {
                    return Heard::ReadsRole;
                }
                Heard::Nothing
            }
            FromWorker::OtherInternal(cmd) => {
                log::debug!(
                    "ignored an internal message {}",
                    crate::logging::quote(&cmd)
                );
                Heard::Nothing
            }
            // Handled by the channel itself.
            FromWorker::User(_)
            | FromWorker::Handle
            | FromWorker::HandleAck
            | FromWorker::HandleNack => Heard::Nothing,
        }
    }

    /// Asks the worker to close its servers and exit once idle; false if that cannot be sent.
    /// Once asked (by the program's primary too), it is not asked again: Node's worker would
    /// take a second `disconnect` for a broken channel.
    pub fn ask_to_stop(&mut self) -> bool {
        if self.leaving {
            return true;
        }
        self.leaving = true;
        let seq = self.next_seq();
        self.channel.send(ToWorker::Disconnect { seq }).is_ok()
    }

    /// Whether it was asked to disconnect, or said it does.
    pub fn is_leaving(&self) -> bool {
        self.leaving
    }

    /// A message of the program's primary, as it sent it (Node's own internal ones too); its
    /// `disconnect` counts as asking the worker to stop. `room` is held until it is written.
    pub fn relay(&mut self, message: Value, room: Held) -> Result<(), String> {
        if primary::is_disconnect(&message) {
            if self.leaving {
                return Ok(());
            }
            self.leaving = true;
        }
        self.channel
            .send_held(ToWorker::User(message), room)
            .map_err(|e: SendError| e.to_string())
    }

    /// A user message (`process.on('message')` in the worker).
    pub fn send(&mut self, data: Value) -> Result<(), String> {
        if !protocol::is_plain_user_message(&data) {
            // Node would take it for one of its own internal messages, and could die of it.
            return Err(
                "a message whose \"cmd\" starts with NODE_ would be taken for Node's own".into(),
            );
        }
        self.channel
            .send(ToWorker::User(data))
            .map_err(|e: SendError| e.to_string())
    }

    pub fn close(&self) {
        self.channel.close();
    }

    /// See [`NodeChannel::is_idle`]: a busy channel cannot be handed over.
    pub fn handover(&self) -> Result<ChannelState, Busy> {
        if !self.channel.is_idle() {
            return Err(Busy);
        }
        Ok(match Inherited::of(&self.channel.raw_fd()) {
            Some(socket) => ChannelState::Node {
                socket,
                seq: self.seq,
                listens: self.listens.iter().map(|(k, a)| (k.clone(), *a)).collect(),
                next_key: self.next_key,
                paths: self
                    .paths
                    .iter()
                    .map(|(k, p)| (k.clone(), p.clone()))
                    .collect(),
            },
            None => ChannelState::Closed,
        })
    }

    /// Answers a `queryServer`: always, with a socket or an errno, since a listen that gets no
    /// answer hangs in the worker without a word.
    pub fn answer(
        &mut self,
        (id, pid): (u32, Pid),
        query: Query,
        claims: &mut Claims,
        sockets: &mut Sockets<'_>,
        shared: &mut NodeGroups,
    ) {
        if self.leaving {
            log::debug!(
                "worker {id} (pid {pid}) asked to listen while disconnecting: not answered"
            );
            return;
        }
        let outcome = socket_for(pid, &query, claims, sockets, shared);
        let key = format!("cluster-lb:{id}:{}", self.next_key);
        self.next_key += 1;
        let seq = self.next_seq();
        let sent = match outcome {
            Ok((Listened::Address(addr), socket)) => {
                claims.record(addr, &socket);
                self.listens.insert(key.clone(), addr);
                let reply = ToWorker::Handle {
                    ack: query.seq,
                    seq,
                    key,
                    data: shared.server_data(addr, &query.data),
                    udp: addr.is_udp(),
                };
                self.channel.send_handle(reply, socket)
            }
            // A path's socket is shared, not the worker's own: not claimed.
            Ok((Listened::Path(path), socket)) => {
                self.paths.insert(key.clone(), path);
                let reply = ToWorker::Handle {
                    ack: query.seq,
                    seq,
                    key,
                    data: query.data.clone(),
                    udp: false,
                };
                self.channel.send_handle(reply, socket)
            }
            Err(refusal) => {
                log::warn!(
                    "worker {id} (pid {pid}) asked to listen on {}: refused ({}): {}",
                    crate::logging::quote(&describe(&query)),
                    std::io::Error::from_raw_os_error(refusal.errno),
                    refusal.why
                );
                self.channel.send(ToWorker::Refuse {
                    ack: query.seq,
                    seq,
                    key,
                    errno: -refusal.errno,
                })
            }
        };
        if let Err(e) = sent {
            log::warn!("worker {id} (pid {pid}): queryServer answer not sent: {e}");
        }
    }
}

/// What a listen was given a socket for.
enum Listened {
    /// A port: the worker's own socket in the address's reuseport group.
    Address(ListenAddr),
    /// A Unix-socket path: a copy of the one socket every worker shares.
    Path(PathBuf),
}

/// The socket for a Node listen, or why not.
fn socket_for(
    pid: Pid,
    query: &Query,
    claims: &mut Claims,
    sockets: &mut Sockets<'_>,
    shared: &mut NodeGroups,
) -> Result<(Listened, OwnedFd), Refusal> {
    let (listened, socket) = match query.address_type {
        AddressType::Pipe => {
            // Node makes the path absolute in the worker.
            let path = query
                .address
                .as_deref()
                .map(PathBuf::from)
                .filter(|p| p.is_absolute())
                .ok_or_else(|| Refusal::new(libc::EINVAL, "no absolute socket path"))?;
            let socket = sockets.unix(claims, &path, (query.readable_all, query.writable_all))?;
            (Listened::Path(path), socket)
        }
        AddressType::Fd => {
            // listen({ fd: N }): the worker's own fd N, which must be one of the sockets it was
            // given by socket activation (3, 4, ...: the addresses', then the paths').
            let fd = query.fd.unwrap_or(-1);
            let index = usize::try_from(fd - 3).ok();
            let addresses = sockets.groups.activated();
            let paths = sockets.groups.unix().activated();
            match index {
                Some(index) if index < addresses => {
                    let (addr, socket) = sockets.activated(pid, index)?;
                    (Listened::Address(addr), socket)
                }
                Some(index) if index - addresses < paths.len() => {
                    let path = paths[index - addresses].path.clone();
                    let socket = sockets
                        .activated_unix(index - addresses)
                        .unwrap_or_else(|| Err(Refusal::new(libc::EINVAL, "no such path")))?;
                    (Listened::Path(path), socket)
                }
                _ => {
                    return Err(Refusal::new(
                        libc::EINVAL,
                        format!("fd {fd} is not one of the sockets cluster-lb passed (LISTEN_FDS)"),
                    ))
                }
            }
        }
        AddressType::Tcp4 | AddressType::Tcp6 | AddressType::Udp4 | AddressType::Udp6 => {
            let (addr, socket) = port_socket(pid, query, claims, sockets, shared)?;
            (Listened::Address(addr), socket)
        }
    };
    // Node needs a non-blocking listener: libuv never sets O_NONBLOCK on a descriptor it is
    // given, and Node 16/18 then block their whole event loop in accept().
    crate::sys::fds::set_nonblocking(socket.as_fd())
        .map_err(|e| Refusal::new(libc::EINVAL, e.to_string()))?;
    Ok((listened, socket))
}

/// The socket for a listen on a port (TCP or UDP).
fn port_socket(
    pid: Pid,
    query: &Query,
    claims: &mut Claims,
    sockets: &mut Sockets<'_>,
    shared: &mut NodeGroups,
) -> Result<(ListenAddr, OwnedFd), Refusal> {
    let transport = if query.is_udp() {
        Transport::Udp
    } else {
        Transport::Tcp
    };
    let port = query
        .port
        .and_then(|p| u16::try_from(p).ok())
        .ok_or_else(|| Refusal::new(libc::EINVAL, "no valid port"))?;
    let ip = match &query.address {
        None => None,
        Some(text) => Some(text.parse::<IpAddr>().map_err(|_| {
            Refusal::new(
                libc::EINVAL,
                format!("{} is not an IP address", crate::logging::quote(text)),
            )
        })?),
    };
    if let Some(index) = sockets.groups.activated_index(transport, ip, port) {
        return sockets.activated(pid, index);
    }
    if sockets.groups.any_listen() {
        return Err(Refusal::new(
            libc::EACCES,
            "not one of the --listen addresses this cluster was started with",
        ));
    }
    // No host (TCP only; dgram always names one): all addresses, IPv6 and IPv4 on one socket,
    // as Node's own primary binds; `ipv6Only: true` (flag 1 for TCP and UDP alike) keeps an
    // IPv6 address to IPv6.
    let stack = if query.flags & IPV6_ONLY != 0 {
        Stack::V6Only
    } else if ip.is_none() {
        Stack::Dual
    } else {
        Stack::System
    };
    let socket_addr = SocketAddr::new(ip.unwrap_or(Ipv6Addr::UNSPECIFIED.into()), port);
    let wanted = match transport {
        Transport::Tcp => ListenAddr::from(socket_addr),
        Transport::Udp => ListenAddr::udp(socket_addr),
    };
    let ephemeral_key = (query.address.clone(), query.address_type, query.index);
    let wanted = match shared.ephemeral.get(&ephemeral_key) {
        Some(chosen) if port == 0 => wanted.with_port(*chosen),
        _ => wanted,
    };
    let (addr, socket) = sockets.open(claims, wanted, stack)?;
    if port == 0 {
        shared
            .ephemeral
            .insert(ephemeral_key, addr.socket_addr().port());
    }
    Ok((addr, socket))
}

/// libuv's UV_TCP_IPV6ONLY and UV_UDP_IPV6ONLY, in a query's `flags`.
const IPV6_ONLY: u64 = 1;

/// `addressType` as Node writes it.
fn address_type_value(kind: AddressType) -> Value {
    match kind {
        AddressType::Tcp4 => Value::from(4),
        AddressType::Tcp6 => Value::from(6),
        AddressType::Udp4 => Value::from("udp4"),
        AddressType::Udp6 => Value::from("udp6"),
        AddressType::Pipe => Value::from(-1),
        AddressType::Fd => Value::Null,
    }
}

/// How a query names its address, for log lines.
fn describe(query: &Query) -> String {
    match (&query.address, query.port, query.address_type) {
        (_, _, AddressType::Fd) => format!("fd {}", query.fd.unwrap_or(-1)),
        (Some(address), _, AddressType::Pipe) => address.clone(),
        (Some(address), Some(port), _) if address.contains(':') => format!("[{address}]:{port}"),
        (Some(address), Some(port), _) => format!("{address}:{port}"),
        (None, Some(port), _) => format!("port {port} on all addresses"),
        _ => "an unknown address".into(),
    }
}

/// Node state shared by all workers: so that every worker's `listen(0)` gets the same port,
/// and every TLS server the same session-ticket keys, as under Node's own primary.
#[derive(Default)]
pub struct NodeGroups {
    /// (address, kind, index) of a `listen(0)` -> the port chosen for it.
    ephemeral: HashMap<(Option<String>, AddressType, u64), u16>,
    /// The first valid `data` of each group's queries (TLS ticket keys).
    data: HashMap<ListenAddr, Value>,
}

impl NodeGroups {
    /// The `data` to answer a query with. A TLS server must get data back (null crashes it);
    /// every worker gets the first worker's valid one, so session tickets made on one resume
    /// on another. Data that is not valid ticket keys goes back to its own worker only, never
    /// to others: one worker's bad keys would make every later TLS worker crash at listen.
    pub fn server_data(&mut self, addr: ListenAddr, data: &Value) -> Value {
        if data.is_null() {
            return Value::Null;
        }
        if let Some(shared) = self.data.get(&addr) {
            return shared.clone();
        }
        if protocol::is_valid_server_data(data) {
            self.data.insert(addr, data.clone());
        }
        data.clone()
    }

    /// Forgets the shared ticket keys: the workers of a reload start from fresh ones (the
    /// first replacement's), so keys are rotated at every reload.
    pub fn rotate_server_data(&mut self) {
        self.data.clear();
    }

    /// The shared state, for an upgrade.
    pub fn handover(&self) -> NodeGroupsState {
        NodeGroupsState {
            ephemeral: self
                .ephemeral
                .iter()
                .map(|((address, address_type, index), port)| {
                    crate::supervisor::saved::EphemeralPort {
                        address: address.clone(),
                        address_type: *address_type,
                        index: *index,
                        port: *port,
                    }
                })
                .collect(),
            data: self.data.iter().map(|(k, v)| (*k, v.clone())).collect(),
        }
    }

    /// Takes up the state an older binary handed over.
    pub fn restore(&mut self, state: &NodeGroupsState) {
        for port in &state.ephemeral {
            self.ephemeral.insert(
                (port.address.clone(), port.address_type, port.index),
                port.port,
            );
        }
        self.data.extend(state.data.iter().cloned());
    }
}
