//! The control socket: a Unix stream socket (mode 0600) where `cluster-lb status | reload |
//! scale N | stop | send | logs` reach a running primary. One JSON [`Request`] line in, one JSON
//! [`Reply`] line out (`logs`: a [`Reply::Log`] line per log line, then [`Reply::End`]); both
//! sides use these types, so they cannot drift apart.

use std::{
    io::{BufRead, BufReader, Write},
    os::unix::{
        fs::{FileTypeExt, PermissionsExt},
        net::UnixStream,
    },
    path::{Path, PathBuf},
    time::Duration,
};

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};

use super::{
    accept::{Acceptor, Ticket, REPLY_DEADLINE},
    names::ClusterName,
};
use crate::{
    logging::ring::{self, LogLine},
    supervisor::{ClusterStatus, Handle, Recipients},
};

/// Longest request line accepted: room for a `send` of the longest message that fits a
/// datagram of cluster-lb's IPC, and its envelope.
const MAX_REQUEST: u64 = 2 * crate::protocol::ipc::MAX_MESSAGE as u64;

/// The longest message `send` takes, as compact JSON.
pub const MAX_SEND: usize = crate::protocol::ipc::MAX_MESSAGE;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "lowercase", deny_unknown_fields)]
pub enum Request {
    Status,
    Reload,
    Scale {
        workers: u32,
    },
    Stop,
    Upgrade,
    /// A user message to a worker id's processes or to every worker, on their channels.
    Send {
        to: Recipients,
        data: serde_json::Value,
    },
    /// The last `lines` lines of the primary's log (of one worker id's output with `worker`);
    /// with `follow`, then every new one until the primary stops or the client hangs up.
    Logs {
        lines: u32,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        worker: Option<u32>,
        #[serde(default)]
        follow: bool,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "reply", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Reply {
    Status {
        status: ClusterStatus,
    },
    /// The rolling reload completed.
    Reloaded {
        replaced: u32,
    },
    Scaling {
        from: u32,
        to: u32,
    },
    Stopping,
    /// The new binary took over (it sends this reply, on the connection the old one got).
    Upgraded {
        from: String,
        to: String,
        pid: u32,
        workers: u32,
    },
    /// A message reached this many worker processes (every one it was for).
    Sent {
        workers: u32,
    },
    /// One line of the primary's log (`logs`).
    Log {
        line: LogLine,
    },
    /// This many lines left the primary's log before a `logs -f` client read them.
    Dropped {
        lines: u64,
    },
    /// The last answer to `logs`: nothing more follows.
    End,
    /// The request was not carried out; `error` says why in one line.
    Refused {
        error: String,
    },
}

impl std::fmt::Display for Reply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Reply::Status { status } => write!(f, "{} workers", status.workers.len()),
            Reply::Reloaded { replaced } => {
                write!(f, "reload complete: {replaced} workers replaced")
            }
            Reply::Scaling { from, to } => write!(f, "scaling from {from} to {to} workers"),
            Reply::Stopping => f.write_str("stopping"),
            Reply::Upgraded {
                from,
                to,
                pid,
                workers,
            } => write!(
                f,
                "upgraded from {from} to {to}: primary pid {pid} and its {workers} workers kept"
            ),
            Reply::Sent { workers: 1 } => f.write_str("sent to 1 worker"),
            Reply::Sent { workers } => write!(f, "sent to {workers} workers"),
            Reply::Log { line } => f.write_str(&crate::logging::text_line(line)),
            Reply::Dropped { lines } => {
                write!(f, "... {lines} lines dropped (this reader fell behind)")
            }
            Reply::End => f.write_str("end of the log"),
            Reply::Refused { error } => f.write_str(error),
        }
    }
}

/// Why a control request got no useful answer.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("cannot reach a cluster-lb primary at {path} ({source}); is it running? is --control right?")]
    Unreachable {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the primary at {path} did not answer within {secs}s", secs = .timeout.as_secs())]
    Timeout { path: PathBuf, timeout: Duration },
    #[error("talking to the primary at {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the primary at {path} gave an answer this cluster-lb does not understand: {detail}")]
    BadAnswer { path: PathBuf, detail: String },
    #[error("{0}")]
    Refused(String),
    #[error("cannot create the control socket {path}: {source}")]
    Create {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("control socket {0} is in use by another cluster-lb; pass another --control PATH")]
    InUse(PathBuf),
    #[error("a cluster named {name} is already running (control socket {path}); give this one another --name")]
    NameInUse { name: ClusterName, path: PathBuf },
    #[error("no cluster named {name} is running (nothing answers at {path}); `cluster-lb status` lists the running ones")]
    NoSuchName {
        name: ClusterName,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("no cluster-lb is running: no control socket in {0} answers (pass --control PATH for a cluster started with one)")]
    NoneRunning(PathBuf),
    #[error("cluster {cluster} is not ready: {ready} of its {wanted} wanted workers are ready; `cluster-lb status` shows the state of each")]
    NotReady {
        cluster: String,
        ready: u32,
        wanted: u32,
    },
    #[error("{} clusters are running ({}); pick one with --name NAME", .0.len(), .0.join(", "))]
    Several(Vec<String>),
    #[error(transparent)]
    RunDir(#[from] crate::app::names::RunDirError),
    #[error("{0} exists and is not a socket; refusing to remove it (pass another --control PATH)")]
    NotASocket(PathBuf),
}

/// Removes the socket file when the primary ends.
pub struct ControlSocket {
    path: PathBuf,
    /// The listening socket, for an upgrade to keep.
    pub fd: Option<crate::supervisor::saved::Inherited>,
}

impl Drop for ControlSocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Where a primary's control socket goes: a path given with `--control`, or its name's socket
/// in the run directory.
#[derive(Debug, Clone, PartialEq)]
pub enum ControlPath {
    Explicit(PathBuf),
    Named(PathBuf),
}

impl ControlPath {
    pub fn path(&self) -> &Path {
        match self {
            ControlPath::Explicit(path) | ControlPath::Named(path) => path,
        }
    }
}

/// Fails when `path` cannot become this primary's control socket because something else is
/// there: another primary that answers (for a name: a cluster of that name runs), or a file
/// that is no socket. A socket file nobody answers on is stale and will be replaced.
pub fn check_free(at: &ControlPath, name: &ClusterName) -> Result<(), ControlError> {
    let path = at.path();
    match std::fs::symlink_metadata(path) {
        Ok(meta) if !meta.file_type().is_socket() => {
            Err(ControlError::NotASocket(path.to_path_buf()))
        }
        Ok(_) if UnixStream::connect(path).is_ok() => Err(match at {
            ControlPath::Explicit(_) => ControlError::InUse(path.to_path_buf()),
            ControlPath::Named(_) => ControlError::NameInUse {
                name: name.clone(),
                path: path.to_path_buf(),
            },
        }),
        _ => Ok(()),
    }
}

/// Listens at `at` for the cluster called `name` (which `status` reports). A socket file
/// nobody answers on is stale and replaced; anything else there is an error (see
/// [`check_free`]). A default path that cannot be created is only a warning, so the cluster
/// still runs without a control socket; an explicit one is an error.
///
/// The socket is created with mode 0600 (umask 0177 around the bind, so it is never reachable
/// by others, not even for an instant), and a peer's credentials are checked before anything it
/// asks is done: only root and the primary's own user may control it.
pub fn serve(
    at: &ControlPath,
    name: ClusterName,
    handle: Handle,
) -> Result<Option<ControlSocket>, ControlError> {
    let path = at.path();
    let explicit = matches!(at, ControlPath::Explicit(_));
    let create = |source| ControlError::Create {
        path: path.to_path_buf(),
        source,
    };
    let refuse = |error: ControlError| {
        if explicit {
            return Err(error);
        }
        log::warn!("no control socket: {error}");
        Ok(None)
    };
    check_free(at, &name)?;
    if std::fs::symlink_metadata(path).is_ok() {
        std::fs::remove_file(path).map_err(create)?;
    }
    if let Some(parent) = path.parent() {
        if let Err(e) = std::fs::create_dir_all(parent) {
            return refuse(create(e));
        }
    }
    let private = nix::sys::stat::Mode::from_bits_truncate(0o177);
    let previous = nix::sys::stat::umask(private);
    let bound = tokio::net::UnixListener::bind(path);
    nix::sys::stat::umask(previous);
    let listener = match bound {
        Ok(listener) => listener,
        Err(e) => return refuse(create(e)),
    };
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(create)?;
    Ok(Some(accept_loop(listener, path, name, handle)))
}

/// Serves the control socket an older binary bound at `at`, handed over in an upgrade.
pub fn adopt(
    fd: std::os::fd::OwnedFd,
    at: &ControlPath,
    name: ClusterName,
    handle: Handle,
) -> Result<ControlSocket, ControlError> {
    let create = |source| ControlError::Create {
        path: at.path().to_path_buf(),
        source,
    };
    let listener = std::os::unix::net::UnixListener::from(fd);
    listener.set_nonblocking(true).map_err(create)?;
    let listener = tokio::net::UnixListener::from_std(listener).map_err(create)?;
    Ok(accept_loop(listener, at.path(), name, handle))
}

fn accept_loop(
    listener: tokio::net::UnixListener,
    path: &Path,
    name: ClusterName,
    handle: Handle,
) -> ControlSocket {
    use std::os::fd::AsRawFd;
    let fd = crate::supervisor::saved::Inherited::of(&listener.as_raw_fd());
    let owner = nix::unistd::geteuid().as_raw();
    tokio::spawn(async move {
        let mut acceptor = Acceptor::new("control socket");
        // Followers hold their slots as long as they follow: half stay for everyone else.
        FOLLOWER_LIMIT.store(
            (acceptor.slots() / 2).clamp(1, MOST_FOLLOWERS),
            std::sync::atomic::Ordering::Release,
        );
        loop {
            let stream = match listener.accept().await {
                Ok((stream, _)) => stream,
                Err(e) => {
                    acceptor.failed(e).await;
                    continue;
                }
            };
            let ticket = acceptor.admit().await;
            let handle = handle.clone();
            let name = name.clone();
            tokio::spawn(async move {
                if let Err(e) = answer(stream, ticket, handle, owner, &name).await {
                    log::debug!("control connection: {e}");
                }
            });
        }
    });
    ControlSocket {
        path: path.to_path_buf(),
        fd,
    }
}

/// Reads one request on `stream` within its ticket's deadline, carries it out and writes the
/// reply; the slot is held until this returns.
async fn answer(
    stream: tokio::net::UnixStream,
    mut ticket: Ticket,
    handle: Handle,
    owner: u32,
    name: &ClusterName,
) -> std::io::Result<()> {
    let peer = stream.peer_cred()?.uid();
    // A copy of the connection, for an upgrade: the new binary answers on it.
    let connection = {
        use std::os::fd::AsFd;
        stream.as_fd().try_clone_to_owned()?
    };
    let (reader, mut writer) = stream.into_split();
    // Read the request first, whoever sends it: a client whose request is refused then reads
    // the refusal, instead of failing to write into a connection already closed.
    let mut line = String::new();
    let mut reader = tokio::io::BufReader::new(reader.take(MAX_REQUEST));
    match ticket.request(reader.read_line(&mut line)).await {
        None => return Ok(()), // idle past the deadline, or evicted by newer ones: hang up
        Some(result) => {
            result?;
        }
    }
    let reply = if peer != 0 && peer != owner {
        log::warn!("control socket: refused a request from uid {peer}");
        Reply::Refused {
            error: format!("permission denied: only root and uid {owner} may control this cluster"),
        }
    } else {
        match serde_json::from_str::<Request>(line.trim()) {
            Err(e) => Reply::Refused {
                error: format!("bad request: {e}"),
            },
            Ok(Request::Logs {
                lines,
                worker,
                follow,
            }) => {
                drop(connection);
                let reader = reader.into_inner().into_inner();
                return logs(reader, writer, &handle, lines, worker, follow).await;
            }
            Ok(Request::Upgrade) => match handle.upgrade(Some(connection)).await {
                Some(error) => Reply::Refused {
                    error: error.to_string(),
                },
                None => Reply::Refused {
                    error: "the primary is stopping".into(),
                },
            },
            Ok(request) => execute(request, &handle, name).await,
        }
    };
    let mut text = serde_json::to_string(&reply).map_err(std::io::Error::other)?;
    text.push('\n');
    // A client that does not read its reply (a long status) gives its slot back after this.
    tokio::time::timeout(REPLY_DEADLINE, writer.write_all(text.as_bytes()))
        .await
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))?
}

async fn execute(request: Request, handle: &Handle, name: &ClusterName) -> Reply {
    let refused = |error: &dyn std::fmt::Display| Reply::Refused {
        error: error.to_string(),
    };
    match request {
        Request::Status => match handle.status().await {
            Some(mut status) => {
                // The supervisor knows no names; the cluster is named by how it is reached.
                status.name = Some(name.to_string());
                Reply::Status { status }
            }
            None => refused(&"the primary is stopping"),
        },
        Request::Reload => match handle.reload().await {
            Ok(replaced) => Reply::Reloaded { replaced },
            Err(error) => refused(&error),
        },
        Request::Scale { workers } => {
            let most = cluster_common::MAX_WORKERS;
            if workers == 0 || workers > most {
                return refused(&format!("workers must be 1..={most}"));
            }
            match handle.scale(workers).await {
                Ok(from) => Reply::Scaling { from, to: workers },
                Err(error) => refused(&error),
            }
        }
        Request::Stop => {
            handle.stop();
            Reply::Stopping
        }
        Request::Send { to, data } => match handle.deliver(to, data).await {
            Ok(workers) => Reply::Sent { workers },
            Err(error) => refused(&error),
        },
        Request::Upgrade => refused(&"an upgrade is answered by the connection that asked"),
        Request::Logs { .. } => refused(&"logs are answered on the connection that asked"),
    }
}

/// The most `logs -f` clients a primary serves at once; each also holds a connection slot of
/// the control socket, and they may hold half of its slots at most (fewer than 32 when the
/// primary has few descriptors), so `status` always finds one.
pub const MOST_FOLLOWERS: usize = 32;
static FOLLOWER_LIMIT: std::sync::atomic::AtomicUsize =
    std::sync::atomic::AtomicUsize::new(MOST_FOLLOWERS);
/// Followers now.
static FOLLOWERS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
/// How much one `logs` connection takes from the ring at once (lines, bytes of text), and so
/// holds while its client reads.
const FOLLOW_BATCH: (usize, usize) = (256, 64 * 1024);

/// A follower's place among [`FOLLOWERS`], given back when it ends.
struct Following;

impl Following {
    fn start() -> Option<Following> {
        use std::sync::atomic::Ordering;
        let limit = FOLLOWER_LIMIT.load(Ordering::Acquire);
        FOLLOWERS
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < limit).then_some(n + 1)
            })
            .ok()
            .map(|_| Following)
    }
}

impl Drop for Following {
    fn drop(&mut self) {
        FOLLOWERS.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}

/// Appends `reply` as one JSON line.
fn push_reply(out: &mut Vec<u8>, reply: &Reply) -> std::io::Result<()> {
    serde_json::to_writer(&mut *out, reply).map_err(std::io::Error::other)?;
    out.push(b'\n');
    Ok(())
}

/// Answers `logs`: the last `count` lines (of worker `worker`), then, when following, every
/// new line as it comes until the primary stops (then [`Reply::End`]) or the client hangs up.
/// A follower holds no queue: it reads the ring from where it is, so one whose client does not
/// read waits in its write with at most one batch, and later learns how many lines it missed.
async fn logs(
    mut reader: tokio::net::unix::OwnedReadHalf,
    mut writer: tokio::net::unix::OwnedWriteHalf,
    handle: &Handle,
    count: u32,
    worker: Option<u32>,
    follow: bool,
) -> std::io::Result<()> {
    let refuse = |error: String| Reply::Refused { error };
    let mut out = Vec::new();
    let mut refusal = None;
    if let Some(id) = worker {
        if !ring::ring().has_worker(id) {
            match handle.status().await {
                Some(status) if status.wants(id) || status.workers.iter().any(|w| w.id == id) => {}
                Some(status) => {
                    refusal = Some(refuse(format!(
                        "no worker {id} in this cluster (its workers: {})",
                        worker_ids(&status)
                    )))
                }
                None => refusal = Some(refuse("the primary is stopping".into())),
            }
        }
    }
    let following = match follow {
        true if refusal.is_none() => match Following::start() {
            Some(following) => Some(following),
            None => {
                let limit = FOLLOWER_LIMIT.load(std::sync::atomic::Ordering::Acquire);
                refusal = Some(refuse(format!(
                    "{limit} clients already follow this cluster's log (the most it serves); \
                     try again later"
                )));
                None
            }
        },
        _ => None,
    };
    if let Some(refusal) = refusal {
        push_reply(&mut out, &refusal)?;
        return write_within_deadline(&mut writer, &out).await;
    }
    let wanted = usize::try_from(count).unwrap_or(usize::MAX);
    let (from, end) = ring::ring().last(wanted, worker);
    // A plain request gets the lines up to where the log ended when it came, within the
    // reply deadline; a follower goes on.
    let until = if following.is_some() { u64::MAX } else { end };
    let send = async {
        let mut next = from;
        let mut changes = ring::ring().watch();
        let mut scratch = [0u8; 64];
        loop {
            if !out.is_empty() {
                // A follower waits here however long its client takes to read: what it
                // holds meanwhile is one batch; the ring is what is bounded.
                writer.write_all(&out).await?;
                out.clear();
            }
            changes.borrow_and_update();
            let batch = ring::ring().since(next, until, worker, FOLLOW_BATCH);
            next = batch.next;
            if batch.dropped > 0 {
                push_reply(
                    &mut out,
                    &Reply::Dropped {
                        lines: batch.dropped,
                    },
                )?;
            }
            for line in &batch.lines {
                push_reply(
                    &mut out,
                    &Reply::Log {
                        line: (**line).clone(),
                    },
                )?;
            }
            if !out.is_empty() {
                continue;
            }
            if following.is_none() || ring::ring().is_closed() {
                push_reply(&mut out, &Reply::End)?;
                return writer.write_all(&out).await;
            }
            tokio::select! {
                changed = changes.changed() => {
                    if changed.is_err() {
                        return Ok(());
                    }
                }
                // The client says nothing after its request: anything readable is its hang-up.
                _ = reader.read(&mut scratch) => return Ok(()),
            }
        }
    };
    if following.is_some() {
        return send.await;
    }
    tokio::time::timeout(REPLY_DEADLINE, send)
        .await
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))?
}

/// The wanted worker ids, for a message: "0 to 3", or "1, 2, 5".
fn worker_ids(status: &ClusterStatus) -> String {
    match (status.wanted_ids.as_slice(), status.desired) {
        ([], 0) => "none".into(),
        ([], 1) => "0".into(),
        ([], desired) => format!("0 to {}", desired - 1),
        (ids, _) => ids
            .iter()
            .map(u32::to_string)
            .collect::<Vec<_>>()
            .join(", "),
    }
}

async fn write_within_deadline(
    writer: &mut tokio::net::unix::OwnedWriteHalf,
    bytes: &[u8],
) -> std::io::Result<()> {
    tokio::time::timeout(REPLY_DEADLINE, writer.write_all(bytes))
        .await
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))?
}

/// When the primary stops: followers send what is left and end, within `limit`.
pub async fn end_followers(limit: Duration) {
    ring::ring().close();
    let deadline = tokio::time::Instant::now() + limit;
    while FOLLOWERS.load(std::sync::atomic::Ordering::Acquire) > 0
        && tokio::time::Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Writes the answer to an upgrade on the connection that asked for it (the new binary does
/// this, on the connection the old one handed over).
pub fn answer_upgrade(connection: std::os::fd::OwnedFd, reply: &Reply) {
    let mut stream = UnixStream::from(connection);
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_write_timeout(Some(Duration::from_secs(5)));
    if let Ok(mut text) = serde_json::to_string(reply) {
        text.push('\n');
        let _ = stream.write_all(text.as_bytes());
    }
}

/// Client side: sends `request` to the primary at `path` and returns its answer; a refusal is
/// an error.
pub fn request(path: &Path, request: &Request, timeout: Duration) -> Result<Reply, ControlError> {
    let io = |source: std::io::Error| match source.kind() {
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => ControlError::Timeout {
            path: path.to_path_buf(),
            timeout,
        },
        _ => ControlError::Io {
            path: path.to_path_buf(),
            source,
        },
    };
    let mut stream = UnixStream::connect(path).map_err(|source| ControlError::Unreachable {
        path: path.to_path_buf(),
        source,
    })?;
    stream.set_read_timeout(Some(timeout)).map_err(io)?;
    let mut line = serde_json::to_string(request).map_err(|e| io(std::io::Error::other(e)))?;
    line.push('\n');
    stream.write_all(line.as_bytes()).map_err(io)?;
    let mut answer = String::new();
    BufReader::new(stream).read_line(&mut answer).map_err(io)?;
    let reply: Reply =
        serde_json::from_str(answer.trim()).map_err(|e| ControlError::BadAnswer {
            path: path.to_path_buf(),
            detail: e.to_string(),
        })?;
    match reply {
        Reply::Refused { error } => Err(ControlError::Refused(error)),
        reply => Ok(reply),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_and_replies_have_the_documented_shape() {
        assert_eq!(
            serde_json::to_string(&Request::Status).unwrap(),
            r#"{"cmd":"status"}"#
        );
        assert_eq!(
            serde_json::from_str::<Request>(r#"{"cmd":"scale","workers":3}"#).unwrap(),
            Request::Scale { workers: 3 }
        );
        assert!(serde_json::from_str::<Request>(r#"{"cmd":"format-disk"}"#).is_err());
        assert_eq!(
            serde_json::to_string(&Reply::Scaling { from: 2, to: 3 }).unwrap(),
            r#"{"reply":"scaling","from":2,"to":3}"#
        );
        let refused: Reply = serde_json::from_str(r#"{"reply":"refused","error":"no"}"#).unwrap();
        assert_eq!(refused.to_string(), "no");
    }

    #[test]
    fn logs_requests_and_replies_have_the_documented_shape() {
        assert_eq!(
            serde_json::to_string(&Request::Logs {
                lines: 5,
                worker: None,
                follow: false
            })
            .unwrap(),
            r#"{"cmd":"logs","lines":5,"follow":false}"#
        );
        assert_eq!(
            serde_json::from_str::<Request>(r#"{"cmd":"logs","lines":0,"worker":2,"follow":true}"#)
                .unwrap(),
            Request::Logs {
                lines: 0,
                worker: Some(2),
                follow: true
            }
        );
        assert_eq!(
            serde_json::from_str::<Request>(r#"{"cmd":"logs","lines":9}"#).unwrap(),
            Request::Logs {
                lines: 9,
                worker: None,
                follow: false
            }
        );
        let line = LogLine {
            time: "2026-12-04T07:00:00.000Z".into(),
            source: ring::Origin::Worker,
            worker: Some(1),
            pid: 42,
            level: None,
            stream: ring::LineStream::Stderr,
            text: "\u{1b}]0;owned\u{7}\nfake".into(),
        };
        let reply = Reply::Log { line };
        let text = serde_json::to_string(&reply).unwrap();
        assert!(
            text.starts_with(r#"{"reply":"log","line":{"time":"#),
            "{text}"
        );
        assert_eq!(serde_json::from_str::<Reply>(&text).unwrap(), reply);
        // Printed as the primary's text log prints it: prefixed, escaped, one line.
        assert_eq!(
            reply.to_string(),
            "[worker 1 pid 42] \\x1b]0;owned\\x07\\x0afake"
        );
        assert_eq!(
            Reply::Dropped { lines: 7 }.to_string(),
            "... 7 lines dropped (this reader fell behind)"
        );
        assert_eq!(
            serde_json::to_string(&Reply::End).unwrap(),
            r#"{"reply":"end"}"#
        );
    }

    #[test]
    fn a_send_names_a_worker_or_all() {
        let send = |to| Request::Send {
            to,
            data: serde_json::json!({"cmd": "reload-config"}),
        };
        assert_eq!(
            serde_json::to_string(&send(Recipients::Worker(2))).unwrap(),
            r#"{"cmd":"send","to":2,"data":{"cmd":"reload-config"}}"#
        );
        assert_eq!(
            serde_json::to_string(&send(Recipients::All)).unwrap(),
            r#"{"cmd":"send","to":"all","data":{"cmd":"reload-config"}}"#
        );
        for text in [
            r#"{"cmd":"send","to":2,"data":{"cmd":"reload-config"}}"#,
            r#"{"cmd":"send","to":"all","data":{"cmd":"reload-config"}}"#,
        ] {
            let request: Request = serde_json::from_str(text).unwrap();
            assert_eq!(serde_json::to_string(&request).unwrap(), text);
        }
        assert!(
            serde_json::from_str::<Request>(r#"{"cmd":"send","to":"others","data":1}"#).is_err()
        );
        assert!(serde_json::from_str::<Request>(r#"{"cmd":"send","to":"all"}"#).is_err());
        assert_eq!(Reply::Sent { workers: 1 }.to_string(), "sent to 1 worker");
        assert_eq!(Reply::Sent { workers: 3 }.to_string(), "sent to 3 workers");
        // The longest message fits a request line.
        let longest = send(Recipients::Worker(u32::MAX));
        let envelope = serde_json::to_string(&longest).unwrap().len();
        assert!(envelope + MAX_SEND < MAX_REQUEST as usize);
    }
}
