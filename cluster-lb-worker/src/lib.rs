//! What a Rust worker of cluster-lb links, the way a Node worker uses `cluster`:
//!
//! ```no_run
//! # async fn serve() -> std::io::Result<()> {
//! let listener = cluster_lb_worker::listen("127.0.0.1:8080").await?;
//! // ... accept on `listener`; watch cluster_lb_worker::recv() for Incoming::Disconnect
//! # Ok(()) }
//! ```
//!
//! Workers talk to each other through the primary, which relays what a worker addresses to
//! other workers ([`send_to`] with a [`To`]); the receivers get it as
//! [`Incoming::FromWorker`], with the sender's id:
//!
//! ```no_run
//! use cluster_lb_worker::{self as worker, Incoming, To};
//! # async fn chat() -> std::io::Result<()> {
//! worker::send_to(To::Others, serde_json::json!({"cache": "flush"})).await?;
//! while let Some(incoming) = worker::recv().await {
//!     match incoming {
//!         Incoming::FromWorker { from, data } => println!("worker {from} says {data}"),
//!         Incoming::Message(data) => println!("the primary says {data}"),
//!         Incoming::Disconnect => break,
//!     }
//! }
//! # Ok(()) }
//! ```
//!
//! The crate also holds what both ends of a worker's channel share: the IPC wire protocol
//! ([`protocol`], docs/PROTOCOL.md), its transport ([`channel`]), listen addresses
//! ([`ListenAddr`]) and the one receive that takes descriptors safely ([`unix`]). It depends on
//! no part of the primary (no eBPF loader, no command line, no terminal UI): `cluster-lb`
//! re-exports it as `cluster_lb::worker`.
//!
//! Under cluster-lb, `listen` takes the socket the primary made: the socket-activated one if
//! the address was given with `--listen`, else one asked for over IPC (`queryServer`). It then
//! tells the primary `listening`, which puts this worker in rotation. Outside cluster-lb it just
//! binds, so one binary runs both ways. All functions need a tokio runtime.

use std::{
    collections::HashMap,
    env, io,
    net::SocketAddr,
    os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
    sync::{
        atomic::{AtomicU32, Ordering},
        Arc, Mutex, OnceLock,
    },
    time::Duration,
};

use serde_json::Value;
use tokio::{
    net::TcpListener,
    sync::{mpsc, oneshot},
};

pub mod channel;
pub mod listen_addr;
pub mod protocol;
pub mod unix;

pub use listen_addr::{ListenAddr, Transport};
pub use protocol::To;

use channel::Endpoint;
use protocol::{PrimaryMessage, WorkerMessage, VERSION};

/// The variable that tells a worker which fd is its end of the channel.
pub const IPC_FD_VARIABLE: &str = "CLUSTER_LB_IPC_FD";

/// How long `listen` waits for the primary's answer to `queryServer`.
const QUERY_TIMEOUT: Duration = Duration::from_secs(10);
/// The first socket-activated fd (SD_LISTEN_FDS_START).
const LISTEN_FDS_START: RawFd = 3;

/// What the primary sends a worker.
#[derive(Debug, Clone, PartialEq)]
pub enum Incoming {
    /// A user message from the primary (`cluster-lb send`, or an embedding program).
    Message(Value),
    /// A message another worker addressed to this one ([`send_to`]), relayed by the primary;
    /// `from` is the sender's worker id.
    FromWorker { from: u32, data: Value },
    /// Stop accepting, finish in-flight work and exit.
    Disconnect,
}

/// True in a process started by cluster-lb (or by an embedded primary).
pub fn is_worker() -> bool {
    id().is_some()
}

/// True when this process is not a worker: the Node idiom `if (cluster.isPrimary)`.
pub fn is_primary() -> bool {
    !is_worker()
}

/// This worker's id: 0 .. N-1, kept by a restarted worker.
pub fn id() -> Option<u32> {
    env::var("CLUSTER_LB_WORKER_ID").ok()?.parse().ok()
}

/// Opens the IPC channel and says `online`; returns whether this is a worker with a channel.
/// Any other call does this on first use. Call it first thing when the program warms up before
/// it listens: the primary then waits for `listening` instead of applying `--ready-delay`.
pub fn connect() -> bool {
    channel().is_some()
}

/// A listening socket for `address` (`PORT`, `HOST:PORT` or `[V6]:PORT`); see the module docs.
pub async fn listen(address: &str) -> io::Result<TcpListener> {
    let addr: ListenAddr = address
        .parse()
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, format!("{address}: {e}")))?;
    let listener = match take_activated(addr.socket_addr()) {
        Some(listener) => listener,
        None => match channel() {
            Some(channel) => channel.query_server(addr).await?,
            None => return TcpListener::bind(addr.socket_addr()).await,
        },
    };
    let listener = to_tokio(listener)?;
    if let Some(channel) = channel() {
        channel
            .send(&WorkerMessage::Listening {
                v: VERSION,
                address: addr.to_string(),
            })
            .await?;
    }
    Ok(listener)
}

/// Sends a user message to the primary. Fails when this is not a worker with a channel.
pub async fn send(data: Value) -> io::Result<()> {
    channel()
        .ok_or_else(not_a_worker)?
        .send(&WorkerMessage::Message {
            v: VERSION,
            data,
            to: None,
        })
        .await
}

/// Sends a user message to other workers, through the primary: a worker id (every process
/// of that id), all of them or the others. They receive it as [`Incoming::FromWorker`]. The
/// primary delivers it to those running now and drops it for one whose channel is full;
/// nothing comes back to say so. Fails when this is not a worker with a channel, or the
/// message is over the protocol's 64 KiB.
pub async fn send_to(to: To, data: Value) -> io::Result<()> {
    channel()
        .ok_or_else(not_a_worker)?
        .send(&WorkerMessage::Message {
            v: VERSION,
            data,
            to: Some(to),
        })
        .await
}

/// The next message from the primary; `None` once the channel is closed (or this is not a
/// worker).
pub async fn recv() -> Option<Incoming> {
    channel()?.incoming.lock().await.recv().await
}

/// Tells the primary this worker leaves: it stops sending new connections here at once.
pub async fn disconnect() -> io::Result<()> {
    channel()
        .ok_or_else(not_a_worker)?
        .send(&WorkerMessage::Disconnect { v: VERSION })
        .await
}

fn not_a_worker() -> io::Error {
    io::Error::new(
        io::ErrorKind::NotConnected,
        "not running under cluster-lb (no IPC channel)",
    )
}

/// The inherited socket for `want`, if socket activation passed one (each is taken once).
fn take_activated(want: SocketAddr) -> Option<std::net::TcpListener> {
    static TAKEN: Mutex<Vec<RawFd>> = Mutex::new(Vec::new());
    let own_pid = std::process::id().to_string();
    if env::var("LISTEN_PID").ok()? != own_pid {
        return None;
    }
    let count: RawFd = env::var("LISTEN_FDS").ok()?.parse().ok()?;
    let mut taken = TAKEN.lock().ok()?;
    for fd in LISTEN_FDS_START..LISTEN_FDS_START + count {
        if taken.contains(&fd) {
            continue;
        }
        // An fd that is not a socket (or not ours to read) is simply not the one we want.
        let Ok(bound) = nix::sys::socket::getsockname::<nix::sys::socket::SockaddrStorage>(fd)
        else {
            continue;
        };
        let bound = bound
            .as_sockaddr_in()
            .map(|a| SocketAddr::from(std::net::SocketAddrV4::from(*a)))
            .or_else(|| {
                bound
                    .as_sockaddr_in6()
                    .map(|a| SocketAddr::from(std::net::SocketAddrV6::from(*a)))
            });
        if bound == Some(want) {
            taken.push(fd);
            // SAFETY: LISTEN_PID names this process, so `fd` was passed to us as a listening
            // socket, and TAKEN makes sure it is wrapped only once.
            return Some(unsafe { std::net::TcpListener::from_raw_fd(fd) });
        }
    }
    None
}

fn to_tokio(listener: std::net::TcpListener) -> io::Result<TcpListener> {
    listener.set_nonblocking(true)?;
    TcpListener::from_std(listener)
}

type Reply = (PrimaryMessage, Vec<OwnedFd>);

struct Channel {
    endpoint: Arc<Endpoint>,
    pending: Arc<Mutex<HashMap<u32, oneshot::Sender<Reply>>>>,
    incoming: tokio::sync::Mutex<mpsc::UnboundedReceiver<Incoming>>,
    next_index: AtomicU32,
}

/// The IPC channel, opened on first use: says `online` and starts the reader task.
fn channel() -> Option<&'static Channel> {
    static CHANNEL: OnceLock<Option<Channel>> = OnceLock::new();
    CHANNEL.get_or_init(open_channel).as_ref()
}

fn open_channel() -> Option<Channel> {
    let fd: RawFd = env::var(IPC_FD_VARIABLE).ok()?.parse().ok()?;
    // SAFETY: the primary put our end of the channel at this fd and named it in the variable;
    // nothing else in this process claims it.
    let endpoint = Arc::new(unsafe { Endpoint::from_inherited(fd) }.ok()?);
    let online = protocol::encode(&WorkerMessage::Online { v: VERSION })?;
    endpoint.try_send(&online, None).ok()?;
    let pending: Arc<Mutex<HashMap<u32, oneshot::Sender<Reply>>>> = Arc::default();
    let (incoming_tx, incoming_rx) = mpsc::unbounded_channel();
    let reader_endpoint = Arc::clone(&endpoint);
    let reader_pending = Arc::clone(&pending);
    tokio::spawn(async move {
        while let Ok(Some(datagram)) = reader_endpoint.recv().await {
            match protocol::decode::<PrimaryMessage>(&datagram.bytes) {
                Ok(reply @ PrimaryMessage::QueryServerReply { index, .. }) => {
                    let waiter = reader_pending
                        .lock()
                        .ok()
                        .and_then(|mut p| p.remove(&index));
                    if let Some(waiter) = waiter {
                        let _ = waiter.send((reply, datagram.fds));
                    }
                }
                Ok(PrimaryMessage::Message { data, from, .. }) => {
                    let incoming = match from {
                        Some(from) => Incoming::FromWorker { from, data },
                        None => Incoming::Message(data),
                    };
                    let _ = incoming_tx.send(incoming);
                }
                Ok(PrimaryMessage::Disconnect { .. }) => {
                    let _ = incoming_tx.send(Incoming::Disconnect);
                }
                Err(e) => {
                    eprintln!("cluster-lb worker: ignoring a bad message from the primary: {e}")
                }
            }
        }
    });
    Some(Channel {
        endpoint,
        pending,
        incoming: tokio::sync::Mutex::new(incoming_rx),
        next_index: AtomicU32::new(0),
    })
}

impl Channel {
    async fn send(&self, message: &WorkerMessage) -> io::Result<()> {
        let bytes = protocol::encode(message).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("message over {} bytes", protocol::MAX_MESSAGE),
            )
        })?;
        self.endpoint.send(&bytes, None).await
    }

    async fn query_server(&self, addr: ListenAddr) -> io::Result<std::net::TcpListener> {
        let index = self.next_index.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.pending
            .lock()
            .map_err(|_| io::Error::other("IPC state poisoned"))?
            .insert(index, tx);
        self.send(&WorkerMessage::QueryServer {
            v: VERSION,
            index,
            address: addr.to_string(),
            protocol: "tcp".into(),
        })
        .await?;
        let (reply, fds) = tokio::time::timeout(QUERY_TIMEOUT, rx)
            .await
            .map_err(|_| {
                io::Error::new(
                    io::ErrorKind::TimedOut,
                    "the primary did not answer queryServer",
                )
            })?
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "the IPC channel closed"))?;
        match reply {
            PrimaryMessage::QueryServerReply { ok: true, .. } => {
                let fd = fds.into_iter().next().ok_or_else(|| {
                    io::Error::new(
                        io::ErrorKind::InvalidData,
                        "queryServer reply without a socket",
                    )
                })?;
                debug_assert!(fd.as_raw_fd() >= 0);
                Ok(std::net::TcpListener::from(fd))
            }
            PrimaryMessage::QueryServerReply { error, .. } => Err(io::Error::other(format!(
                "cluster-lb refused {addr}: {}",
                error.unwrap_or_else(|| "no reason given".into())
            ))),
            _ => Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "unexpected reply to queryServer",
            )),
        }
    }
}
