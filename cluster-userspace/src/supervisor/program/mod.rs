//! The program's own primary process: a Node program run once more without `NODE_UNIQUE_ID`,
//! so that its `cluster.isPrimary` branch runs, with cluster-lb's preload making its
//! `cluster.fork()` and every Worker cluster-lb's (see `protocol::nodejs::primary` for the
//! words, and the lifecycle's `primary` module for which worker a fork gets).
//!
//! Here is only its I/O: starting it with its two channels (its Node channel, and a blocking
//! socket for the requests that answer before they return), reading both, and the forks'
//! variants (what each worker a fork started runs, to start it again the same way).

use std::{
    io::{BufRead, BufReader, Read, Write},
    os::{
        fd::{AsFd, OwnedFd},
        unix::net::UnixStream,
    },
    path::{Path, PathBuf},
};

use nix::unistd::Pid;
use serde_json::Value;
use tokio::sync::mpsc::UnboundedSender;

use super::{
    launch::spawn::{Channel, SpawnError, WorkerSpec},
    saved::{Inherited, SavedPrimary},
    workers::{output, Launch, PRIMARY_VARIABLE},
};
use crate::{
    logging::{Source, Stream},
    protocol::{
        budget::{Budget, Held},
        nodejs::{
            channel::{self as node_channel, NodeChannel, NodeEvent, SendError},
            primary::{parse_request, Answer, ForkSpec, Request, RequestError},
            ToWorker,
        },
    },
};

/// The preload, written where the workers' user can read it.
pub const PRELOAD: &str = include_str!("../../protocol/nodejs/preload.cjs");
/// Its file name in the cluster's private directory.
const PRELOAD_FILE: &str = "cluster-lb-node.cjs";
/// The longest request line (a fork's whole environment).
const MAX_REQUEST: u64 = 16 * 1024 * 1024;

/// Where a primary's channel events and requests go (the inbox).
type Feeds = (
    UnboundedSender<(Pid, super::workers::ChannelEvent)>,
    UnboundedSender<RpcLine>,
);

/// A request of the running primary: its pid (a request of one since replaced is dropped),
/// and what it asked, or why it could not be read.
pub type RpcLine = (Pid, Result<Request, RequestError>);

/// Writes the preload into `dir` (the notify socket's private directory: only the workers'
/// user and group enter it), readable by the workers' group; returns its path.
pub fn install_preload(dir: &Path, gid: Option<libc::gid_t>) -> std::io::Result<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join(PRELOAD_FILE);
    let tmp = dir.join(format!(".{PRELOAD_FILE}.new"));
    super::notify::with_group(gid, || std::fs::write(&tmp, PRELOAD))?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o640))?;
    std::fs::rename(&tmp, &path)?;
    Ok(path)
}

/// `NODE_OPTIONS` that loads the preload, and the user's own kept aside for the preload to put
/// back: the variables to set.
pub fn node_options(preload: &Path, user: Option<&str>) -> Vec<(String, String)> {
    let mut options = format!("--require {}", preload.display());
    let mut env = Vec::new();
    if let Some(user) = user {
        options.push(' ');
        options.push_str(user);
        env.push(("CLUSTER_LB_NODE_OPTIONS".to_string(), user.to_string()));
    }
    env.push(("NODE_OPTIONS".to_string(), options));
    env
}

/// A Node worker's `online`, as the primary would have heard it.
pub fn online() -> Value {
    crate::protocol::nodejs::primary::to_primary::online()
}

/// A Node worker's `exitedAfterDisconnect`, as the primary would have heard it.
pub fn exited_after_disconnect() -> Value {
    crate::protocol::nodejs::primary::to_primary::exited_after_disconnect()
}

/// The running primary process's I/O.
pub struct ProgramPrimary {
    pub pid: Pid,
    channel: NodeChannel,
    /// Our end of the blocking request channel (a reader thread has a copy).
    rpc: UnixStream,
    /// Copies of the read ends of its output pipes, for an upgrade to hand over.
    output: [Option<OwnedFd>; 2],
}

/// What the workers forks started run, by variant: variant N runs `specs[N - 1]`, 0 the
/// command line's program. Kept for the whole cluster (a worker is restarted as it was forked,
/// whatever primary process forked it).
#[derive(Default)]
pub struct Variants {
    specs: Vec<ForkSpec>,
}

impl Variants {
    /// The variant a fork asks for: 0 for the command line's program, else the same number
    /// for the same thing.
    pub fn of(&mut self, spec: ForkSpec) -> u32 {
        if spec.default {
            return 0;
        }
        let at = match self.specs.iter().position(|known| known.same_as(&spec)) {
            Some(at) => at,
            None => {
                self.specs.push(spec);
                self.specs.len() - 1
            }
        };
        at as u32 + 1
    }

    /// What variant `n` runs (`None` for 0, the command line's program).
    pub fn get(&self, n: u32) -> Option<&ForkSpec> {
        n.checked_sub(1)
            .and_then(|index| self.specs.get(index as usize))
    }

    /// All of them, in order (for an upgrade).
    pub fn all(&self) -> &[ForkSpec] {
        &self.specs
    }

    /// As an older binary had them.
    pub fn restore(specs: Vec<ForkSpec>) -> Variants {
        Variants { specs }
    }
}

/// What the primary's Node channel said.
pub enum Said {
    Message(Value, Held),
    Nothing,
    Closed,
}

impl ProgramPrimary {
    /// Starts the program as its primary: the command line's program, with the preload and
    /// both channels, as the workers' user, under the workers' seccomp filter.
    pub fn start(
        launch: &Launch,
        preload: &Path,
        events: UnboundedSender<(Pid, super::workers::ChannelEvent)>,
        requests: UnboundedSender<RpcLine>,
        (budget, max_message): (Budget, usize),
    ) -> Result<ProgramPrimary, SpawnError> {
        let os = |what| move |source| SpawnError::Os { what, source };
        let (ours, theirs) = node_channel::pair().map_err(os("creating the primary's channel"))?;
        let (rpc, rpc_theirs) = UnixStream::pair().map_err(os("creating the primary's channel"))?;
        let (stdout_read, stdout_write) = pipe().map_err(os("creating an output pipe"))?;
        let (stderr_read, stderr_write) = pipe().map_err(os("creating an output pipe"))?;
        let user_options = launch.command.base_variable("NODE_OPTIONS");
        let mut env = node_options(preload, user_options.as_deref());
        env.push((
            "NODE_CHANNEL_SERIALIZATION_MODE".to_string(),
            "json".to_string(),
        ));
        env.push((PRIMARY_VARIABLE.to_string(), std::process::id().to_string()));
        let rpc_fd = OwnedFd::from(rpc_theirs);
        let pid = launch.command.spawn(&WorkerSpec {
            sockets: &[],
            socket_names: &[],
            env: &env,
            channels: &[
                Channel {
                    fd: theirs.as_fd(),
                    variable: "NODE_CHANNEL_FD",
                },
                Channel {
                    fd: rpc_fd.as_fd(),
                    variable: "CLUSTER_LB_RPC_FD",
                },
            ],
            stdout: Some(stdout_write.as_fd()),
            stderr: Some(stderr_write.as_fd()),
            credentials: launch.credentials.as_ref(),
            filter: launch.filter.as_ref(),
        })?;
        drop((theirs, rpc_fd, stdout_write, stderr_write));
        ProgramPrimary::attach(
            pid,
            (ours, rpc, [Some(stdout_read), Some(stderr_read)]),
            (events, requests),
            (budget, max_message),
        )
        .map_err(os("reading the primary's channels"))
    }

    /// Reads and writes a running primary's channels and output (a new one, or one an older
    /// binary handed over).
    fn attach(
        pid: Pid,
        (channel, rpc, output): (OwnedFd, UnixStream, [Option<OwnedFd>; 2]),
        (events, requests): Feeds,
        (budget, max_message): (Budget, usize),
    ) -> std::io::Result<ProgramPrimary> {
        let mut copies = [None, None];
        for ((copy, fd), stream) in copies
            .iter_mut()
            .zip(output)
            .zip([Stream::Stdout, Stream::Stderr])
        {
            if let Some(fd) = fd {
                *copy = fd.try_clone().ok();
                output::capture(Source::Primary, pid.as_raw(), stream, fd);
            }
        }
        let sink = move |event| {
            events
                .send((pid, super::workers::ChannelEvent::Node(event)))
                .is_ok()
        };
        let channel = NodeChannel::start(channel, pid, sink, budget, max_message)?;
        let reader = rpc.try_clone()?;
        std::thread::Builder::new()
            .name("primary-requests".into())
            .spawn(move || read_requests(pid, reader, requests))?;
        Ok(ProgramPrimary {
            pid,
            channel,
            rpc,
            output: copies,
        })
    }

    /// Its descriptors for the new binary of an upgrade; `None` while a message to it is half
    /// written (it would be lost).
    pub fn handover(&self) -> Option<SavedPrimary> {
        if !self.channel.is_idle() {
            return None;
        }
        let [stdout, stderr] = &self.output;
        Some(SavedPrimary {
            pid: self.pid.as_raw(),
            channel: Inherited::of(&self.channel.raw_fd())?,
            requests: Inherited::of(&self.rpc)?,
            stdout: stdout.as_ref().and_then(Inherited::of),
            stderr: stderr.as_ref().and_then(Inherited::of),
        })
    }

    /// Takes over the primary an older binary ran.
    pub fn resume(
        saved: &SavedPrimary,
        feeds: Feeds,
        budget: (Budget, usize),
    ) -> std::io::Result<ProgramPrimary> {
        let lost = |what| std::io::Error::other(format!("its {what} was not inherited"));
        let channel = saved.channel.take().ok_or_else(|| lost("channel"))?;
        let rpc = saved
            .requests
            .take()
            .ok_or_else(|| lost("request channel"))?;
        ProgramPrimary::attach(
            Pid::from_raw(saved.pid),
            (
                channel,
                UnixStream::from(rpc),
                [
                    saved.stdout.and_then(Inherited::take),
                    saved.stderr.and_then(Inherited::take),
                ],
            ),
            feeds,
            budget,
        )
    }

    /// What its Node channel said.
    pub fn hear(&self, event: NodeEvent) -> Said {
        use crate::protocol::nodejs::FromWorker;
        match event {
            NodeEvent::Message(FromWorker::Clb(value), room) => Said::Message(value, room),
            NodeEvent::Message(FromWorker::User(value), _) => {
                log::debug!(
                    "the program's primary sent cluster-lb a message, which it ignores: {}",
                    crate::logging::quote(&value.to_string())
                );
                Said::Nothing
            }
            NodeEvent::Message(_, _) => Said::Nothing,
            NodeEvent::Violation(problem) => {
                log::warn!(
                    "the program's primary broke its channel's protocol: {}",
                    crate::logging::quote(&problem)
                );
                Said::Closed
            }
            NodeEvent::Closed => Said::Closed,
        }
    }

    /// Tells the primary about its workers; `room` is the sending worker's budget, held until
    /// the message is written.
    pub fn tell(&self, message: Value, room: Held) {
        match self.channel.send_held(ToWorker::Clb(message), room) {
            Ok(()) => {}
            Err(SendError::Full) => {
                log::warn!("the program's primary reads nothing: a worker event to it was dropped")
            }
            Err(SendError::Closed) => {}
        }
    }

    /// Answers its pending request.
    pub fn answer(&mut self, answer: &Answer) {
        if let Err(e) = self.rpc.write_all(&answer.encode()) {
            log::debug!("the program's primary is gone before its answer: {e}");
        }
    }

    /// Closes its Node channel (it is gone).
    pub fn close(&self) {
        self.channel.close();
    }
}

/// Reads request lines until the primary closes its end, each to `requests`.
fn read_requests(pid: Pid, stream: UnixStream, requests: UnboundedSender<RpcLine>) {
    let mut reader = BufReader::new(stream);
    loop {
        let mut line = Vec::new();
        match (&mut reader).take(MAX_REQUEST).read_until(b'\n', &mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) if line.last() != Some(&b'\n') => {
                let _ = requests.send((
                    pid,
                    Err(RequestError::Refused(format!(
                        "a request over {MAX_REQUEST} bytes"
                    ))),
                ));
                return;
            }
            Ok(_) => {
                if requests.send((pid, parse_request(&line))).is_err() {
                    return;
                }
            }
        }
    }
}

fn pipe() -> std::io::Result<(OwnedFd, OwnedFd)> {
    nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(std::io::Error::from)
}

/// The program's primary as the supervisor keeps it, between and across its processes.
pub struct Program {
    pub mode: super::PrimaryMode,
    /// The preload's path (None: the workers are no Node programs, or it could not be written).
    pub preload: Option<PathBuf>,
    /// The running primary process.
    pub process: Option<ProgramPrimary>,
    pub variants: Variants,
    /// The lifecycle's answers to the request being handled.
    pub answers: Vec<crate::supervisor::lifecycle::ForkAnswer>,
    /// The workers the running primary was last told to wait for.
    pub awaited: Option<u32>,
}

impl Program {
    pub fn new(mode: super::PrimaryMode, preload: Option<PathBuf>) -> Program {
        Program {
            mode,
            preload,
            process: None,
            variants: Variants::default(),
            answers: Vec::new(),
            awaited: None,
        }
    }

    /// Whether `pid` is the running primary process.
    pub fn is(&self, pid: Pid) -> bool {
        self.process.as_ref().is_some_and(|p| p.pid == pid)
    }

    /// Tells the running primary, if any.
    pub fn tell(&self, message: Value, room: Held) {
        if let Some(process) = &self.process {
            process.tell(message, room);
        }
    }
}

mod shell;
