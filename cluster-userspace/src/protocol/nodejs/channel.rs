//! The primary's end of a Node worker's channel: an AF_UNIX SOCK_STREAM socket (Node's
//! `'ipc'` stdio), newline-delimited JSON, listening sockets attached with SCM_RIGHTS.
//!
//! Two tasks per worker. The reader splits lines (a line may span reads, a read may hold many
//! lines), answers the worker's own handles with `NODE_HANDLE_ACK` at once (Node holds all its
//! later messages until it gets one), and passes everything else on, within the worker's
//! byte [`Budget`] (a worker that sends faster than the primary handles waits).
//!
//! Descriptors: Node attaches one only to the line of a `NODE_HANDLE` message, on the write
//! that starts that line. The kernel ends a read right after the data that came with
//! descriptors, so the descriptors of a read belong to the last line that begins in it. They
//! are held (at most [`MAX_FDS`]) until that line is complete and closed then; on a line that
//! is not a `NODE_HANDLE`, in the middle of a line, or more than fit at once, they are closed
//! at once and the worker has broken the protocol. The writer sends one line
//! per message, attaches a socket to the first byte of its line only, and, like Node's own
//! sender, holds later messages while a socket is in flight, until the worker acknowledges it
//! (resending it once per `NODE_HANDLE_NACK`). Nothing here blocks the supervisor: its queue is
//! bounded, and a worker that stops reading loses messages, not the primary.

use std::{
    io::{self, IoSlice},
    os::fd::{AsFd, AsRawFd, OwnedFd, RawFd},
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc,
    },
    time::Duration,
};

use nix::{
    sys::socket::{
        sendmsg, shutdown, socketpair, AddressFamily, ControlMessage, MsgFlags, Shutdown, SockFlag,
        SockType,
    },
    unistd::Pid,
};
use tokio::{
    io::{unix::AsyncFd, Interest},
    sync::mpsc,
};

use super::{parse_line, FromWorker, ToWorker};
use crate::protocol::budget::{self, Budget, Held};

/// The longest message by default (`--max-message`); Node itself has no limit. A longer one is
/// dropped, and the worker goes on.
pub const MAX_LINE: usize = 64 * 1024 * 1024;
/// Messages waiting to be written to one worker; beyond that they are dropped.
const QUEUE: usize = 1024;
/// How long a socket in flight may wait for the worker's acknowledgement.
const HANDLE_ACK_TIMEOUT: Duration = Duration::from_secs(10);
/// Resends of a socket the worker did not receive (`NODE_HANDLE_NACK`).
const HANDLE_RETRIES: u32 = 3;

/// Descriptors one read takes: Node sends one at a time; room for more, so that a worker
/// attaching several still has each received, owned and closed here.
pub const MAX_FDS: usize = 8;

/// What the reader reports.
#[derive(Debug)]
pub enum NodeEvent {
    /// A message, and the room it takes in the worker's budget until it is dropped.
    Message(FromWorker, Held),
    /// The worker broke the protocol; nothing more is read from it.
    Violation(String),
    /// EOF: the worker closed its end (it is disconnecting, or gone).
    Closed,
}

/// A message to write, with the socket it carries, and the room in the budget of the worker
/// it came from (a relayed message), given back once it is written: a reader that does not
/// keep up holds the sender back instead of growing the queue.
struct Outgoing {
    message: ToWorker,
    fd: Option<OwnedFd>,
    _room: Held,
}

/// Why a message was not queued.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    #[error("the worker's channel is closed")]
    Closed,
    #[error("the worker reads nothing: {QUEUE} messages are already waiting")]
    Full,
}

/// A new channel: (primary's end, worker's end), both close-on-exec (the spawner moves the
/// worker's end to the fd named by NODE_CHANNEL_FD, which clears the flag there).
pub fn pair() -> io::Result<(OwnedFd, OwnedFd)> {
    socketpair(
        AddressFamily::Unix,
        SockType::Stream,
        None,
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
    )
    .map_err(io::Error::from)
}

/// The primary's end of one worker's channel.
pub struct NodeChannel {
    socket: Arc<AsyncFd<OwnedFd>>,
    out: mpsc::Sender<Outgoing>,
    busy: Arc<Busy>,
}

/// What the two tasks hold that exists nowhere else: while any is set, the channel cannot be
/// handed to another primary (an upgrade) without losing part of a message.
#[derive(Default)]
struct Busy {
    /// The reader holds the start of a line.
    partial_line: AtomicBool,
    /// The writer is in the middle of a line, or waits for a socket's acknowledgement.
    writing: AtomicBool,
    /// Answers to the worker's own handles that the reader queued and the writer has not
    /// written yet. The worker holds all its later messages until it has one, so a channel
    /// handed over with one owed would wait for it until the worker's own retry.
    answers_owed: AtomicUsize,
}

impl NodeChannel {
    /// Starts reading and writing `fd` (the primary's end of worker `pid`'s channel); every
    /// event goes to `sink`, which says whether anyone still listens. A message longer than
    /// `max_line` bytes is dropped (with a warning), and reading goes on after it.
    pub fn start(
        fd: OwnedFd,
        pid: Pid,
        sink: impl Fn(NodeEvent) -> bool + Send + Sync + 'static,
        budget: Budget,
        max_line: usize,
    ) -> io::Result<NodeChannel> {
        // SAFETY: the AsyncFd owns the descriptor for as long as it is registered.
        let socket =
            unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE | Interest::WRITABLE) }
                .map_err(|e| e.into_parts().1)?;
        let socket = Arc::new(socket);
        let (out, queue) = mpsc::channel(QUEUE);
        let (urgent_tx, urgent) = mpsc::unbounded_channel();
        let (acks_tx, acks) = mpsc::unbounded_channel();
        let busy = Arc::new(Busy::default());
        let reader = Reader {
            pid,
            max_line,
            sink: Box::new(sink),
            urgent: urgent_tx,
            acks: acks_tx,
            busy: Arc::clone(&busy),
            budget,
        };
        tokio::spawn(read(Arc::clone(&socket), reader));
        tokio::spawn(write(
            Arc::clone(&socket),
            queue,
            urgent,
            acks,
            Arc::clone(&busy),
        ));
        Ok(NodeChannel { socket, out, busy })
    }

    /// The channel's descriptor (to hand it over in an upgrade).
    pub fn raw_fd(&self) -> RawFd {
        self.socket.get_ref().as_raw_fd()
    }

    /// Nothing half-read, half-written, queued or waiting for an acknowledgement: everything
    /// of the channel is in the kernel's socket buffers, so another process can take it over.
    pub fn is_idle(&self) -> bool {
        self.out.capacity() == self.out.max_capacity()
            && !self.busy.partial_line.load(Ordering::Relaxed)
            && !self.busy.writing.load(Ordering::Relaxed)
            && self.busy.answers_owed.load(Ordering::SeqCst) == 0
    }

    /// Queues a message without a socket.
    pub fn send(&self, message: ToWorker) -> Result<(), SendError> {
        self.send_held(message, Held::default())
    }

    /// Queues a message that holds `room` in another worker's budget until it is written.
    pub fn send_held(&self, message: ToWorker, room: Held) -> Result<(), SendError> {
        self.queue(Outgoing {
            message,
            fd: None,
            _room: room,
        })
    }

    /// Queues a `queryServer` answer that carries `socket`; the primary's copy closes once the
    /// worker acknowledges it.
    pub fn send_handle(&self, message: ToWorker, socket: OwnedFd) -> Result<(), SendError> {
        self.queue(Outgoing {
            message,
            fd: Some(socket),
            _room: Held::default(),
        })
    }

    fn queue(&self, outgoing: Outgoing) -> Result<(), SendError> {
        self.out.try_send(outgoing).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => SendError::Full,
            mpsc::error::TrySendError::Closed(_) => SendError::Closed,
        })
    }

    /// Closes the channel: the worker reads EOF (a Node worker then exits, unless it is
    /// already disconnecting), and both tasks end.
    pub fn close(&self) {
        let _ = shutdown(self.socket.get_ref().as_raw_fd(), Shutdown::Both);
    }
}

/// Acknowledgements of our sockets, from the reader to the writer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Ack {
    Taken,
    NotReceived,
}

/// Where the reader sends what it read.
struct Reader {
    pid: Pid,
    max_line: usize,
    sink: Box<dyn Fn(NodeEvent) -> bool + Send + Sync>,
    urgent: mpsc::UnboundedSender<Outgoing>,
    acks: mpsc::UnboundedSender<Ack>,
    busy: Arc<Busy>,
    budget: Budget,
}

async fn read(socket: Arc<AsyncFd<OwnedFd>>, reader: Reader) {
    let last = match read_lines(&socket, &reader).await {
        Ok(()) => NodeEvent::Closed,
        Err(problem) => NodeEvent::Violation(problem),
    };
    (reader.sink)(last);
}

/// Descriptors that came with the line beginning at `start` (an offset into the pending bytes).
struct Attached {
    start: usize,
    fds: Vec<OwnedFd>,
}

/// Reads until EOF (`Ok`) or a protocol violation (`Err`: what was wrong).
async fn read_lines(socket: &AsyncFd<OwnedFd>, reader: &Reader) -> Result<(), String> {
    let Reader {
        pid,
        max_line,
        sink,
        urgent,
        acks,
        busy,
        budget,
    } = reader;
    let mut pending: Vec<u8> = Vec::new();
    // The room `pending` takes in the budget.
    let mut room = Held::default();
    let mut attached: Vec<Attached> = Vec::new();
    let mut buffer = vec![0u8; budget::READ];
    // Bytes of a line over `max_line` skipped so far (it is being dropped).
    let mut dropping: Option<usize> = None;
    loop {
        // Room for this read first: a worker that sends faster than the primary handles its
        // messages waits here, its bytes in its own socket buffer.
        let Some(more) = budget.take(budget::READ).await else {
            return Ok(());
        };
        room.merge(more);
        let received = loop {
            let Ok(mut guard) = socket.readable().await else {
                return Ok(());
            };
            match guard.try_io(|inner| {
                cluster_lb_worker::unix::receive(
                    inner.get_ref().as_fd(),
                    &mut buffer,
                    MAX_FDS,
                    false,
                )
            }) {
                Ok(Ok(received)) => break received,
                Ok(Err(_)) => return Ok(()),
                Err(_would_block) => continue,
            }
        };
        if received.control_truncated {
            return Err(format!("more than {MAX_FDS} descriptors at once (closed)"));
        }
        if received.is_eof() {
            return Ok(());
        }
        let mut data = &buffer[..received.len];
        if let Some(skipped) = dropping.as_mut() {
            // The rest of a message too long to keep: up to its newline.
            if !received.fds.is_empty() {
                return Err("descriptors sent in the middle of a line (closed)".into());
            }
            match data.iter().position(|&b| b == b'\n') {
                None => {
                    *skipped += data.len();
                    room.keep(0);
                    continue;
                }
                Some(end) => {
                    log::warn!(
                        "worker pid {pid} sent a message of {} bytes, over --max-message ({max_line}); it was dropped",
                        *skipped + end + 1
                    );
                    dropping = None;
                    data = &data[end + 1..];
                }
            }
        }
        let base = pending.len();
        pending.extend_from_slice(data);
        if !received.fds.is_empty() {
            // The last line that begins in this read.
            let start = (base..pending.len())
                .rev()
                .find(|&at| at == 0 || pending[at - 1] == b'\n')
                .ok_or("descriptors sent in the middle of a line (closed)")?;
            attached.push(Attached {
                start,
                fds: received.fds,
            });
        }
        let mut start = 0;
        // Only the bytes just read can hold a newline: what was pending holds none. Scanning
        // the whole buffer again after every read made a message of N reads cost N² / 2
        // (a 900 KiB message took the primary tens of milliseconds in a debug build).
        let mut search = base;
        let mut delivered = false;
        while let Some(found) = pending[search..].iter().position(|&b| b == b'\n') {
            let end = search + found - start;
            search = start + end + 1;
            let line = &pending[start..start + end];
            let fds = match attached.iter().position(|a| a.start == start) {
                Some(index) => attached.swap_remove(index).fds,
                None => Vec::new(),
            };
            let held = room.split(end + 1);
            start += end + 1;
            delivered = true;
            let message = parse_line(line).map_err(|e| e.to_string())?;
            match message {
                FromWorker::Handle => {
                    // Close the fd that came with it, and let the worker go on.
                    let answer = if fds.is_empty() {
                        ToWorker::HandleNack
                    } else {
                        ToWorker::HandleAck
                    };
                    drop(fds);
                    // Counted before it is queued, so that is_idle never sees it in neither.
                    busy.answers_owed.fetch_add(1, Ordering::SeqCst);
                    if urgent
                        .send(Outgoing {
                            message: answer,
                            fd: None,
                            _room: Held::default(),
                        })
                        .is_err()
                    {
                        busy.answers_owed.fetch_sub(1, Ordering::SeqCst);
                    }
                    log::debug!("worker pid {pid} sent a handle; acknowledged and closed it");
                }
                _ if !fds.is_empty() => {
                    return Err(format!(
                        "{} descriptors with a message that carries no handle (closed)",
                        fds.len()
                    ));
                }
                FromWorker::HandleAck => {
                    let _ = acks.send(Ack::Taken);
                }
                FromWorker::HandleNack => {
                    let _ = acks.send(Ack::NotReceived);
                }
                other => {
                    if !sink(NodeEvent::Message(other, held)) {
                        return Ok(());
                    }
                }
            }
        }
        pending.drain(..start);
        for entry in &mut attached {
            entry.start -= start;
        }
        if pending.len() > *max_line {
            // Too long to keep: dropped, with whatever came with it; reading goes on after
            // its newline.
            dropping = Some(pending.len());
            pending.clear();
            attached.clear();
        }
        room.keep(pending.len());
        busy.partial_line
            .store(!pending.is_empty() || dropping.is_some(), Ordering::Relaxed);
        if delivered {
            // The socket and the budget are usually ready again at once, so without a yield a
            // flooding worker's reader would run read after read before the runtime turned to
            // anything else (the control socket's `status` waited seconds behind 900 KiB
            // messages). After any line, handles and acknowledgements included.
            tokio::task::yield_now().await;
        }
    }
}

async fn write(
    socket: Arc<AsyncFd<OwnedFd>>,
    mut queue: mpsc::Receiver<Outgoing>,
    mut urgent: mpsc::UnboundedReceiver<Outgoing>,
    mut acks: mpsc::UnboundedReceiver<Ack>,
    busy: Arc<Busy>,
) {
    // The socket in flight, its line, and how many times it was sent.
    let mut in_flight: Option<(Outgoing, u32, tokio::time::Instant)> = None;
    loop {
        busy.writing.store(in_flight.is_some(), Ordering::Relaxed);
        let deadline = in_flight
            .as_ref()
            .map(|(_, _, deadline)| *deadline)
            .unwrap_or_else(|| tokio::time::Instant::now() + Duration::from_secs(3600));
        tokio::select! {
            biased;
            Some(outgoing) = urgent.recv() => {
                busy.writing.store(true, Ordering::Relaxed);
                let sent = send_line(&socket, &outgoing).await;
                busy.answers_owed.fetch_sub(1, Ordering::SeqCst);
                if sent.is_err() {
                    return;
                }
            }
            Some(ack) = acks.recv() => {
                let Some((outgoing, sends, _)) = in_flight.take() else {
                    continue; // an acknowledgement of nothing: ignore it
                };
                if ack == Ack::NotReceived && sends <= HANDLE_RETRIES {
                    busy.writing.store(true, Ordering::Relaxed);
                    if send_line(&socket, &outgoing).await.is_err() {
                        return;
                    }
                    in_flight = Some((outgoing, sends + 1, tokio::time::Instant::now() + HANDLE_ACK_TIMEOUT));
                }
                // Taken: dropping `outgoing` closes the primary's copy of the socket.
            }
            _ = tokio::time::sleep_until(deadline), if in_flight.is_some() => {
                log::warn!("a Node worker did not acknowledge its listening socket in {}s", HANDLE_ACK_TIMEOUT.as_secs());
                in_flight = None;
            }
            next = queue.recv(), if in_flight.is_none() => {
                let Some(outgoing) = next else { return };
                busy.writing.store(true, Ordering::Relaxed);
                if send_line(&socket, &outgoing).await.is_err() {
                    return;
                }
                if outgoing.message.carries_handle() {
                    in_flight = Some((outgoing, 1, tokio::time::Instant::now() + HANDLE_ACK_TIMEOUT));
                }
            }
        }
    }
}

/// Writes one whole line; its socket (if any) rides on the first chunk only.
async fn send_line(socket: &AsyncFd<OwnedFd>, outgoing: &Outgoing) -> io::Result<()> {
    let line = outgoing.message.encode();
    let mut sent = 0;
    while sent < line.len() {
        let fd = if sent == 0 {
            outgoing.fd.as_ref().map(|fd| fd.as_raw_fd())
        } else {
            None
        };
        let mut guard = socket.writable().await?;
        match guard.try_io(|inner| send_chunk(inner.get_ref().as_raw_fd(), &line[sent..], fd)) {
            Ok(Ok(n)) => sent += n,
            Ok(Err(e)) => return Err(e),
            Err(_would_block) => continue,
        }
    }
    Ok(())
}

fn send_chunk(socket: RawFd, bytes: &[u8], fd: Option<RawFd>) -> io::Result<usize> {
    let iov = [IoSlice::new(bytes)];
    let fds = fd.map(|fd| [fd]);
    let cmsgs: Vec<ControlMessage<'_>> = fds.iter().map(|f| ControlMessage::ScmRights(f)).collect();
    Ok(sendmsg::<()>(
        socket,
        &iov,
        &cmsgs,
        MsgFlags::MSG_NOSIGNAL,
        None,
    )?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::io::{BufRead, BufReader, Write};
    use std::os::unix::net::UnixStream;

    fn start(primary: OwnedFd, sink: mpsc::UnboundedSender<(Pid, NodeEvent)>) -> NodeChannel {
        let budget = Budget::for_worker(MAX_LINE, &Budget::shared(MAX_LINE));
        let pid = Pid::from_raw(1);
        let sink = move |event| sink.send((pid, event)).is_ok();
        NodeChannel::start(primary, pid, sink, budget, 1024 * 1024).unwrap()
    }

    fn describe(event: &NodeEvent) -> String {
        match event {
            NodeEvent::Message(message, _) => format!("Message({message:?})"),
            other => format!("{other:?}"),
        }
    }

    /// The worker's side, played by a plain blocking stream.
    fn worker_end(fd: OwnedFd) -> UnixStream {
        let stream = UnixStream::from(fd);
        stream.set_nonblocking(false).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        stream
    }

    #[tokio::test]
    async fn lines_split_across_writes_and_several_per_write_all_arrive_in_order() {
        let (primary, worker) = pair().unwrap();
        let (sink, mut events) = mpsc::unbounded_channel();
        let _channel = start(primary, sink);
        let mut worker = worker_end(worker);
        worker
            .write_all(b"{\"cmd\":\"NODE_CLUSTER\",\"act\":\"online\",\"seq\":0}\n{\"a\"")
            .unwrap();
        worker.write_all(b":1}\n\"two\"\n").unwrap();
        drop(worker);
        let mut seen = Vec::new();
        while let Some((_, event)) = events.recv().await {
            seen.push(describe(&event));
        }
        assert_eq!(
            seen,
            [
                "Message(Online)",
                "Message(User(Object {\"a\": Number(1)}))",
                "Message(User(String(\"two\")))",
                "Closed"
            ]
        );
    }

    // The worker's side blocks on its reads, so the channel's tasks need a thread of their own.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_handle_from_the_worker_is_acknowledged_and_a_handle_to_it_waits_for_its_ack() {
        let (primary, worker) = pair().unwrap();
        let (sink, mut events) = mpsc::unbounded_channel();
        let channel = start(primary, sink);
        let worker = worker_end(worker);
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let reply = ToWorker::Handle {
            ack: 1,
            seq: 0,
            key: "k".into(),
            data: json!(null),
            udp: false,
        };
        channel
            .send_handle(reply, OwnedFd::from(listener.try_clone().unwrap()))
            .unwrap();
        channel.send(ToWorker::User(json!("after"))).unwrap();
        let mut reader = BufReader::new(worker.try_clone().unwrap());
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        assert!(line.contains("NODE_HANDLE"), "{line}");
        // Held back until the worker acknowledges the socket.
        worker
            .set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        let mut next = String::new();
        assert!(reader.read_line(&mut next).is_err(), "sent early: {next}");
        worker
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        (&worker)
            .write_all(b"{\"cmd\":\"NODE_HANDLE_ACK\"}\n")
            .unwrap();
        next.clear();
        reader.read_line(&mut next).unwrap();
        assert_eq!(next, "\"after\"\n");
        // The worker's own handle (no fd came with it): NACK.
        (&worker)
            .write_all(b"{\"cmd\":\"NODE_HANDLE\",\"type\":\"net.Socket\",\"msg\":{}}\n")
            .unwrap();
        next.clear();
        reader.read_line(&mut next).unwrap();
        assert_eq!(next, "{\"cmd\":\"NODE_HANDLE_NACK\"}\n");
        channel.close();
        let mut last = None;
        while let Some((_, event)) = events.recv().await {
            last = Some(describe(&event));
        }
        assert_eq!(last.as_deref(), Some("Closed"));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn garbage_is_a_violation() {
        let (primary, worker) = pair().unwrap();
        let (sink, mut events) = mpsc::unbounded_channel();
        let channel = start(primary, sink);
        let mut worker = worker_end(worker);
        worker.write_all(b"not json\n").unwrap();
        let (_, event) = events.recv().await.unwrap();
        match event {
            NodeEvent::Violation(why) => assert!(why.contains("not JSON"), "{why}"),
            other => panic!("{other:?}"),
        }
        channel.close();
    }

    /// Node delivers messages of any size; over the limit, that message is dropped (in pieces
    /// as it arrives, never held whole) and the next one arrives as usual.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_message_over_the_limit_is_dropped_and_the_next_arrives() {
        let (primary, worker) = pair().unwrap();
        let (sink, mut events) = mpsc::unbounded_channel();
        let _channel = start(primary, sink);
        let mut worker = worker_end(worker);
        let writer = std::thread::spawn(move || {
            let mut long = b"\"".to_vec();
            long.extend(vec![b'x'; 3 * 1024 * 1024]);
            long.extend(b"\"\n\"after\"\n");
            worker.write_all(&long).unwrap();
            worker
        });
        let (_, event) = events.recv().await.unwrap();
        assert_eq!(describe(&event), "Message(User(String(\"after\")))");
        drop(writer.join());
    }

    /// A pipe whose write end is sent as the descriptors: once every copy of it is closed,
    /// the read end sees EOF. (Counting the process's descriptors would see other tests'.)
    struct Probe {
        read: std::fs::File,
        write: Option<OwnedFd>,
    }

    impl Probe {
        fn new() -> Probe {
            let (read, write) =
                nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC | nix::fcntl::OFlag::O_NONBLOCK)
                    .unwrap();
            Probe {
                read: read.into(),
                write: Some(write),
            }
        }

        /// Writes `line` from the worker's side with `count` copies of the write end attached,
        /// then closes the test's own copy.
        fn send(&mut self, worker: &UnixStream, line: &[u8], count: usize) {
            let write = self.write.take().unwrap();
            let fds = vec![write.as_raw_fd(); count];
            let cmsgs = [ControlMessage::ScmRights(&fds)];
            sendmsg::<()>(
                worker.as_raw_fd(),
                &[IoSlice::new(line)],
                &cmsgs,
                MsgFlags::empty(),
                None,
            )
            .unwrap();
        }

        /// Waits up to a second for every copy to be closed.
        async fn all_closed(&mut self) -> bool {
            use std::io::Read;
            for _ in 0..100 {
                match self.read.read(&mut [0u8; 1]) {
                    Ok(0) => return true,
                    _ => tokio::time::sleep(Duration::from_millis(10)).await,
                }
            }
            false
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn descriptors_on_anything_but_a_handle_line_are_closed_and_a_violation() {
        for (line, count, expected) in [
            (&b"{\"x\":1}\n"[..], 8, "carries no handle"),
            (&b"{\"x\":1}\n"[..], 9, "more than 8 descriptors"),
            (&b"1}\n"[..], 1, "middle of a line"),
        ] {
            let (primary, worker) = pair().unwrap();
            let (sink, mut events) = mpsc::unbounded_channel();
            let channel = start(primary, sink);
            let worker = worker_end(worker);
            if expected == "middle of a line" {
                (&worker).write_all(b"{\"start\":").unwrap();
                // Let the first part be read alone.
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            let mut probe = Probe::new();
            probe.send(&worker, line, count);
            let mut last = String::new();
            while let Some((_, event)) = events.recv().await {
                last = describe(&event);
                if matches!(event, NodeEvent::Violation(_) | NodeEvent::Closed) {
                    break;
                }
            }
            assert!(last.contains(expected), "{count} fds with {line:?}: {last}");
            assert!(
                probe.all_closed().await,
                "{count} fds with {line:?} were kept"
            );
            channel.close();
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_handle_with_its_descriptor_is_acknowledged_and_the_descriptor_closed() {
        let (primary, worker) = pair().unwrap();
        let (sink, mut events) = mpsc::unbounded_channel();
        let channel = start(primary, sink);
        let worker = worker_end(worker);
        // A user message, then the handle, maybe in the same read: the fd is the handle's.
        (&worker).write_all(b"{\"first\":1}\n").unwrap();
        let mut probe = Probe::new();
        probe.send(
            &worker,
            b"{\"cmd\":\"NODE_HANDLE\",\"type\":\"net.Socket\",\"msg\":{}}\n",
            1,
        );
        let mut reader = BufReader::new(worker.try_clone().unwrap());
        let mut answer = String::new();
        reader.read_line(&mut answer).unwrap();
        assert_eq!(answer, "{\"cmd\":\"NODE_HANDLE_ACK\"}\n");
        let (_, first) = events.recv().await.unwrap();
        assert_eq!(
            describe(&first),
            "Message(User(Object {\"first\": Number(1)}))"
        );
        assert!(probe.all_closed().await, "the handle's fd was kept");
        channel.close();
    }
}
