//! The primary's side of a Node worker's channel: Node's cluster messages become lifecycle
//! inputs, and every `queryServer` is answered with the worker's own socket in the reuseport
//! group of that address (or with an errno the app sees as its listen error).

use std::{
    collections::{BTreeMap, HashMap},
    net::{IpAddr, Ipv6Addr, SocketAddr},
    os::fd::{AsRawFd, OwnedFd},
};

use nix::unistd::Pid;
use serde_json::Value;

use super::upgrade::state::{ChannelState, Inherited, NodeGroupsState};
use super::{
    process::WorkerChannel, queries::Refusal, Departure, Event, Input, Readiness, Supervisor,
};
use crate::{
    listen_addr::{ListenAddr, Transport},
    node::{
        channel::{NodeChannel, NodeEvent, SendError},
        protocol::{self, AddressType, FromWorker, Query, ToWorker},
    },
};

/// What the primary keeps for a Node worker's channel.
pub struct NodeWorker {
    channel: NodeChannel,
    /// Our message counter (the worker only echoes it).
    seq: u64,
    /// Its open listens, by the key we gave each.
    listens: BTreeMap<String, ListenAddr>,
    next_key: u64,
}

impl NodeWorker {
    pub fn new(channel: NodeChannel) -> NodeWorker {
        NodeWorker {
            channel,
            seq: 0,
            listens: BTreeMap::new(),
            next_key: 0,
        }
    }

    fn next_seq(&mut self) -> u64 {
        let seq = self.seq;
        self.seq += 1;
        seq
    }

    /// Asks the worker to close its servers and exit once idle; false if that cannot be sent.
    pub fn disconnect(&mut self) -> bool {
        let seq = self.next_seq();
        self.channel.send(ToWorker::Disconnect { seq }).is_ok()
    }

    /// A user message (`process.on('message')` in the worker).
    pub fn send_user(&mut self, data: Value) -> Result<(), SendError> {
        if !protocol::is_plain_user_message(&data) {
            // Node would take it for one of its own internal messages, and could die of it.
            log::warn!("not sending a message whose \"cmd\" starts with NODE_ to a Node worker");
            return Ok(());
        }
        self.channel.send(ToWorker::User(data))
    }

    pub fn close(&self) {
        self.channel.close();
    }

    /// See [`NodeChannel::is_idle`].
    pub fn is_idle(&self) -> bool {
        self.channel.is_idle()
    }

    /// What the new binary of an upgrade needs to continue the conversation.
    pub fn handover(&self) -> Option<ChannelState> {
        Some(ChannelState::Node {
            socket: Inherited::of(&self.channel.raw_fd())?,
            seq: self.seq,
            listens: self.listens.iter().map(|(k, a)| (k.clone(), *a)).collect(),
            next_key: self.next_key,
        })
    }

    /// Continues the conversation an older binary had with the worker.
    pub fn resume(
        channel: NodeChannel,
        seq: u64,
        listens: &[(String, ListenAddr)],
        next_key: u64,
    ) -> NodeWorker {
        NodeWorker {
            channel,
            seq,
            listens: listens.iter().cloned().collect(),
            next_key,
        }
    }
}

/// Node state shared by all workers: so that every worker's `listen(0)` gets the same port,
/// and every TLS server the same session-ticket keys, as under Node's own primary.
#[derive(Default)]
pub struct NodeGroups {
    /// (address, kind, index) of a `listen(0)` -> the port chosen for it.
    ephemeral: HashMap<(Option<String>, AddressType, u64), u16>,
    /// The first non-null `data` of each group's queries (TLS ticket keys).
    data: HashMap<ListenAddr, Value>,
}

/// `listen(0)` ports: ((address, kind, index), port).
type EphemeralPorts = Vec<((Option<String>, AddressType, u64), u16)>;

impl NodeGroups {
    /// The shared state, for an upgrade.
    pub fn handover(&self) -> (EphemeralPorts, Vec<(ListenAddr, Value)>) {
        (
            self.ephemeral
                .iter()
                .map(|(k, v)| (k.clone(), *v))
                .collect(),
            self.data.iter().map(|(k, v)| (*k, v.clone())).collect(),
        )
    }

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

impl Supervisor {
    /// What a Node worker's channel reported.
    pub(super) fn on_node(&mut self, pid: Pid, event: NodeEvent) -> Option<Input> {
        let worker = self.workers.get_mut(&pid)?;
        let id = worker.id;
        let WorkerChannel::Node(node) = &mut worker.channel else {
            return None;
        };
        // The message's room in the worker's budget is given back once it is handled.
        let (message, _room) = match event {
            NodeEvent::Message(message, room) => (message, room),
            NodeEvent::Violation(problem) => return self.reject(pid, &problem),
            NodeEvent::Closed => {
                worker.channel = WorkerChannel::Closed;
                return Some(Input::ChannelClosed { pid });
            }
        };
        match message {
            FromWorker::Online => Some(Input::Online { pid }),
            FromWorker::QueryServer(query) => {
                self.answer_node_query(pid, query);
                None
            }
            FromWorker::Listening(query) => {
                let address = node
                    .listens
                    .values()
                    .find(|a| Some(a.socket_addr().port() as i64) == query.port)
                    .map_or_else(|| describe(&query), ToString::to_string);
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
            FromWorker::Close { key } => {
                let closed = node.listens.remove(&key)?;
                // While draining, closing is what it was asked to do; otherwise it no longer
                // serves an address it is in the group of.
                Some(Input::Leaving {
                    pid,
                    why: Departure::ListenerClosed(closed.to_string()),
                })
            }
            FromWorker::ExitedAfterDisconnect { seq } => {
                let ack = ToWorker::Ack {
                    ack: seq,
                    seq: node.next_seq(),
                };
                if let Err(e) = node.channel.send(ack) {
                    log::warn!(
                        "worker {id} (pid {pid}): exitedAfterDisconnect not acknowledged: {e}"
                    );
                }
                Some(Input::Leaving {
                    pid,
                    why: Departure::WorkerDisconnected,
                })
            }
            FromWorker::User(data) => {
                self.emit(Event::Message {
                    id,
                    pid: pid.as_raw(),
                    data,
                });
                None
            }
            FromWorker::OtherCluster(value) => {
                log::debug!("worker {id} (pid {pid}): ignored cluster message {value}");
                None
            }
            FromWorker::OtherInternal(cmd) => {
                log::debug!("worker {id} (pid {pid}): ignored internal message {cmd}");
                None
            }
            // Handled by the channel itself.
            FromWorker::Handle | FromWorker::HandleAck | FromWorker::HandleNack => None,
        }
    }

    /// Answers a `queryServer`: always, with a socket or an errno, since a listen that gets no
    /// answer hangs in the worker without a word.
    fn answer_node_query(&mut self, pid: Pid, query: Query) {
        let outcome = self.node_socket(pid, &query);
        let Some(worker) = self.workers.get_mut(&pid) else {
            return;
        };
        let id = worker.id;
        let WorkerChannel::Node(node) = &mut worker.channel else {
            return;
        };
        let key = format!("cluster-lb:{id}:{}", node.next_key);
        node.next_key += 1;
        let seq = node.next_seq();
        let sent = match outcome {
            Ok((addr, socket)) => {
                if let Some(inode) = super::audit::inode(&socket) {
                    worker.given.insert(inode, addr);
                }
                node.listens.insert(key.clone(), addr);
                if !worker.addresses.contains(&addr) {
                    worker.addresses.push(addr);
                }
                let data = self.node_groups.server_data(addr, &query.data);
                let reply = ToWorker::Handle {
                    ack: query.seq,
                    seq,
                    key,
                    data,
                    udp: addr.is_udp(),
                };
                node.channel.send_handle(reply, socket)
            }
            Err(refusal) => {
                log::warn!(
                    "worker {id} (pid {pid}) asked to listen on {}: refused ({}): {}",
                    describe(&query),
                    std::io::Error::from_raw_os_error(refusal.errno),
                    refusal.why
                );
                node.channel.send(ToWorker::Refuse {
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

    /// The socket for a Node listen, or why not.
    fn node_socket(&mut self, pid: Pid, query: &Query) -> Result<(ListenAddr, OwnedFd), Refusal> {
        match query.address_type {
            AddressType::Udp4 | AddressType::Udp6 => {}
            AddressType::Pipe => {
                return Err(Refusal::new(
                    libc::EINVAL,
                    "cluster-lb balances TCP ports, not Unix-socket paths",
                ))
            }
            AddressType::Fd => {
                // listen({ fd: N }): the worker's own fd N, which must be one of the sockets it
                // was given by socket activation (3, 4, ...).
                let fd = query.fd.unwrap_or(-1);
                let index = usize::try_from(fd - 3)
                    .ok()
                    .filter(|i| *i < self.groups.activated());
                return match index {
                    Some(index) => self.activated_socket(pid, index),
                    None => Err(Refusal::new(
                        libc::EINVAL,
                        format!("fd {fd} is not one of the sockets cluster-lb passed (LISTEN_FDS)"),
                    )),
                };
            }
            AddressType::Tcp4 | AddressType::Tcp6 => {}
        }
        let transport = if query.is_udp() {
            Transport::Udp
        } else {
            Transport::Tcp
        };
        let port = query
            .port
            .and_then(|p| u16::try_from(p).ok())
            .ok_or_else(|| Refusal::new(libc::EINVAL, "no valid port"))?;
        let ip =
            match &query.address {
                None => None,
                Some(text) => Some(text.parse::<IpAddr>().map_err(|_| {
                    Refusal::new(libc::EINVAL, format!("{text} is not an IP address"))
                })?),
            };
        if let Some(index) = self.groups.activated_index(transport, ip, port) {
            return self.activated_socket(pid, index);
        }
        if self.groups.activated() > 0 {
            return Err(Refusal::new(
                libc::EACCES,
                "not one of the --listen addresses this cluster was started with",
            ));
        }
        // No host (TCP only; dgram always names one): all addresses, IPv6 and IPv4 on one
        // socket, as Node's own primary binds.
        let dual_stack = ip.is_none();
        let socket_addr = SocketAddr::new(ip.unwrap_or(Ipv6Addr::UNSPECIFIED.into()), port);
        let wanted = match transport {
            Transport::Tcp => ListenAddr::from(socket_addr),
            Transport::Udp => ListenAddr::udp(socket_addr),
        };
        let ephemeral_key = (query.address.clone(), query.address_type, query.index);
        let wanted = match self.node_groups.ephemeral.get(&ephemeral_key) {
            Some(chosen) if port == 0 => wanted.with_port(*chosen),
            _ => wanted,
        };
        let (addr, socket) = self.query_socket(pid, wanted, dual_stack)?;
        if port == 0 {
            self.node_groups
                .ephemeral
                .insert(ephemeral_key, addr.socket_addr().port());
        }
        set_nonblocking(&socket).map_err(|e| Refusal::new(libc::EINVAL, e.to_string()))?;
        Ok((addr, socket))
    }

    /// The socket a worker got as fd `3 + index` by socket activation, fetched from the worker
    /// (pidfd_getfd), so that its Node `listen()` serves on the very socket that is in the
    /// group's slot: a second socket would sit in the group unaccepted.
    fn activated_socket(
        &mut self,
        pid: Pid,
        index: usize,
    ) -> Result<(ListenAddr, OwnedFd), Refusal> {
        let addr = self
            .groups
            .activated_addr(index)
            .ok_or_else(|| Refusal::new(libc::EINVAL, "no such --listen address"))?;
        let fd = 3 + index as i32;
        let socket = super::audit::take_fd(pid.as_raw(), fd).map_err(|e| {
            Refusal::new(
                libc::EINVAL,
                format!("cannot take the worker's fd {fd} (its socket for {addr}): {e}"),
            )
        })?;
        let bound =
            nix::sys::socket::getsockname::<nix::sys::socket::SockaddrStorage>(socket.as_raw_fd())
                .ok()
                .and_then(|a| {
                    a.as_sockaddr_in()
                        .map(|v4| SocketAddr::from(std::net::SocketAddrV4::from(*v4)))
                        .or_else(|| {
                            a.as_sockaddr_in6()
                                .map(|v6| SocketAddr::from(std::net::SocketAddrV6::from(*v6)))
                        })
                });
        if bound != Some(addr.socket_addr()) {
            return Err(Refusal::new(
                libc::EINVAL,
                format!("the worker's fd {fd} is no longer its socket for {addr}"),
            ));
        }
        set_nonblocking(&socket).map_err(|e| Refusal::new(libc::EINVAL, e.to_string()))?;
        Ok((addr, socket))
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

/// Node needs a non-blocking listener: libuv never sets O_NONBLOCK on a descriptor it is
/// given, and Node 16/18 then block their whole event loop in accept().
fn set_nonblocking(socket: &OwnedFd) -> std::io::Result<()> {
    let flags = nix::fcntl::fcntl(socket, nix::fcntl::FcntlArg::F_GETFL)?;
    let flags = nix::fcntl::OFlag::from_bits_truncate(flags) | nix::fcntl::OFlag::O_NONBLOCK;
    nix::fcntl::fcntl(socket, nix::fcntl::FcntlArg::F_SETFL(flags))?;
    Ok(())
}

impl Supervisor {
    /// Servers a Node worker opened by itself (`listen({ reusePort: true })` on Node 22+,
    /// `exclusive: true`) bypass cluster-lb: nothing balances them, and `disconnect` does not
    /// close them. Reported once per address.
    pub(super) fn report_own_listeners(&mut self, listening: &[(u64, std::net::SocketAddr)]) {
        let mut found = Vec::new();
        // Usually every listening socket is one the primary gave out: then nobody is scanned.
        let given_out: std::collections::HashSet<u64> = self
            .workers
            .values()
            .flat_map(|w| w.given.keys().copied())
            .collect();
        if listening.iter().all(|(inode, _)| given_out.contains(inode)) {
            return;
        }
        for (pid, worker) in &mut self.workers {
            if !matches!(worker.channel, WorkerChannel::Node(_)) {
                continue;
            }
            let given = worker.given.keys().copied().collect();
            for addr in super::audit::own_listeners(pid.as_raw(), listening, &given) {
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
            self.emit(event);
        }
    }
}
