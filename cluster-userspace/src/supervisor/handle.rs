//! Requests into a running primary: the embedding API, and what the control socket and the
//! metrics server (started by the caller from a [`Handle`]) use.

use nix::sys::signal::Signal;
use serde_json::Value;
use tokio::sync::{mpsc::UnboundedSender, oneshot};

use super::{events::ReloadError, ClusterStatus};

/// Where the outcome of a rolling reload goes: the number of workers replaced, or why it was
/// aborted.
pub type ReloadReply = oneshot::Sender<Result<u32, ReloadError>>;

/// Why a scale request was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ScaleError {
    #[error("the cluster is stopping")]
    Stopping,
    #[error("the primary is gone")]
    Gone,
}

/// Which workers a message from outside the workers (`cluster-lb send`, an embedder) is for.
/// In JSON as in cluster-lb's IPC `to`: a worker id (a number), or `"all"`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "Value", into = "Value")]
pub enum Recipients {
    /// Every process of this worker id that is not being stopped.
    Worker(u32),
    /// Every worker process that is not being stopped.
    All,
}

impl TryFrom<Value> for Recipients {
    type Error = &'static str;

    fn try_from(value: Value) -> Result<Recipients, Self::Error> {
        let to = match &value {
            Value::Number(n) => n.as_u64().and_then(|n| u32::try_from(n).ok()),
            Value::String(s) if s == "all" => return Ok(Recipients::All),
            _ => None,
        };
        to.map(Recipients::Worker)
            .ok_or("\"to\" must be a worker id (a number) or \"all\"")
    }
}

impl From<Recipients> for Value {
    fn from(to: Recipients) -> Value {
        match to {
            Recipients::Worker(id) => Value::from(id),
            Recipients::All => Value::from("all"),
        }
    }
}

/// Why a message was not delivered to every worker it was for. Each is one line.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SendError {
    #[error("no worker {0}; status shows the workers")]
    NoSuchWorker(u32),
    #[error("worker {0} has no process running now (it is being restarted); nothing sent")]
    NotRunning(u32),
    #[error("no worker is running; nothing sent")]
    NoWorkers,
    #[error("a message whose \"cmd\" starts with NODE_ would be taken by Node for one of its own internal messages; nothing sent (use another \"cmd\")")]
    NodeInternal,
    #[error("the message is {0} bytes in cluster-lb's IPC protocol, over the {max} bytes of its datagram; nothing sent", max = crate::protocol::ipc::MAX_MESSAGE)]
    TooLarge(usize),
    #[error("sent to {sent} of {of} workers; not to {missed}")]
    Partly {
        sent: u32,
        of: u32,
        /// Who did not get it, and why: "worker 1 (pid 42): its channel is full ...".
        missed: String,
    },
    #[error("the cluster is stopping; nothing sent")]
    Stopping,
    #[error("the primary is gone")]
    Gone,
}

/// Requests to a running primary, from an embedder or the control socket.
#[derive(Debug)]
pub enum Control {
    /// A user message to the worker with this pid.
    Send { pid: i32, data: Value },
    /// A user message to the workers `to` names; the reply is how many got it.
    Deliver {
        to: Recipients,
        data: Value,
        reply: oneshot::Sender<Result<u32, SendError>>,
    },
    /// Take the worker out of rotation, ask it to finish and exit, and start a fresh one.
    Disconnect { pid: i32 },
    /// Send a signal to the worker.
    Kill { pid: i32, signal: Signal },
    /// Stop every worker (gracefully, or at once) and end `run`.
    Stop { fast: bool },
    /// Rolling reload; the reply comes when it completed or was aborted.
    Reload { reply: Option<ReloadReply> },
    /// Run this many workers; the reply is the count before.
    Scale {
        workers: u32,
        reply: Option<oneshot::Sender<Result<u32, ScaleError>>>,
    },
    /// A snapshot of the cluster.
    Status {
        reply: oneshot::Sender<ClusterStatus>,
    },
    /// Re-execute the binary in place. `reply` hears only why it did not happen: on success
    /// this process image is gone, and the new binary answers on `requester` (a control
    /// connection).
    Upgrade {
        requester: Option<std::os::fd::OwnedFd>,
        reply: oneshot::Sender<UpgradeError>,
    },
}

/// A cloneable remote control for a running [`Supervisor`](super::Supervisor).
#[derive(Clone, Debug)]
pub struct Handle {
    pub(super) control: UnboundedSender<Control>,
}

impl Handle {
    pub fn send(&self, pid: i32, data: Value) {
        let _ = self.control.send(Control::Send { pid, data });
    }
    /// A user message to every process of a worker id, or to every worker (those not being
    /// stopped), on each one's channel; resolves to how many got it.
    pub async fn deliver(&self, to: Recipients, data: Value) -> Result<u32, SendError> {
        let (reply, answer) = oneshot::channel();
        let _ = self.control.send(Control::Deliver { to, data, reply });
        answer.await.unwrap_or(Err(SendError::Gone))
    }
    pub fn disconnect(&self, pid: i32) {
        let _ = self.control.send(Control::Disconnect { pid });
    }
    pub fn kill(&self, pid: i32, signal: Signal) {
        let _ = self.control.send(Control::Kill { pid, signal });
    }
    pub fn stop(&self) {
        let _ = self.control.send(Control::Stop { fast: false });
    }
    /// Rolling reload; resolves when it completed (workers replaced) or was aborted.
    pub async fn reload(&self) -> Result<u32, ReloadError> {
        let (reply, answer) = oneshot::channel();
        let _ = self.control.send(Control::Reload { reply: Some(reply) });
        answer.await.unwrap_or(Err(ReloadError::Stopping))
    }
    /// Runs `workers` workers; resolves to the count before.
    pub async fn scale(&self, workers: u32) -> Result<u32, ScaleError> {
        let (reply, answer) = oneshot::channel();
        let _ = self.control.send(Control::Scale {
            workers,
            reply: Some(reply),
        });
        answer.await.unwrap_or(Err(ScaleError::Gone))
    }
    /// In-place upgrade; resolves only if it did not happen (see [`Control::Upgrade`]).
    pub async fn upgrade(&self, requester: Option<std::os::fd::OwnedFd>) -> Option<UpgradeError> {
        let (reply, answer) = oneshot::channel();
        let _ = self.control.send(Control::Upgrade { requester, reply });
        answer.await.ok()
    }
    pub async fn status(&self) -> Option<ClusterStatus> {
        let (reply, answer) = oneshot::channel();
        let _ = self.control.send(Control::Status { reply });
        answer.await.ok()
    }
}

/// Why an upgrade did not happen. In every case the running primary stays in charge.
#[derive(Debug, thiserror::Error)]
pub enum UpgradeError {
    #[error("this primary cannot upgrade itself: it was not started by the cluster-lb command")]
    NotSupported,
    #[error("upgrade refused: {0}")]
    NotCalm(#[from] super::lifecycle::NotCalm),
    #[error("upgrade refused: worker {id}'s Node channel is in the middle of a message; try again in a moment")]
    ChannelBusy { id: u32 },
    #[error("upgrade refused: a message to the program's primary is half written; try again in a moment")]
    PrimaryBusy,
    #[error("upgrade refused: {0}")]
    State(#[from] super::saved::StateError),
    #[error("upgrade refused: the new binary {path} {problem}; the running primary (version {version}) stays in charge")]
    Check {
        path: String,
        problem: String,
        version: String,
    },
    #[error("upgrade failed: cannot execute {path}: {source}; the running primary (version {version}) stays in charge")]
    Exec {
        path: String,
        source: std::io::Error,
        version: String,
    },
}
