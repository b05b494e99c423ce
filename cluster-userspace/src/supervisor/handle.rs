//! Requests into a running primary: the embedding API and the control socket use these.

use nix::sys::signal::Signal;
use serde_json::Value;
use tokio::sync::mpsc::UnboundedSender;

use super::{ClusterStatus, ReloadReply};

/// Requests to a running primary, from an embedder or the control socket.
#[derive(Debug)]
pub enum Control {
    /// A user message to the worker with this pid.
    Send { pid: i32, data: Value },
    /// Take the worker out of rotation, ask it to finish and exit, then start a fresh one.
    Disconnect { pid: i32 },
    /// Send a signal to the worker.
    Kill { pid: i32, signal: Signal },
    /// Stop every worker (gracefully, or at once) and end `run`.
    Stop { fast: bool },
    /// Rolling reload; the reply comes when it completed or was aborted.
    Reload { reply: Option<ReloadReply> },
    /// Run this many workers.
    Scale { workers: u32 },
    /// A snapshot of the cluster.
    Status {
        reply: tokio::sync::oneshot::Sender<ClusterStatus>,
    },
}

/// A cloneable remote control for a running [`Supervisor`].
#[derive(Clone, Debug)]
pub struct Handle {
    pub(super) control: UnboundedSender<Control>,
}

impl Handle {
    pub fn send(&self, pid: i32, data: Value) {
        let _ = self.control.send(Control::Send { pid, data });
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
    /// Rolling reload; resolves when it completed (Ok) or was aborted (Err).
    pub async fn reload(&self) -> Result<String, String> {
        let (reply, answer) = tokio::sync::oneshot::channel();
        let _ = self.control.send(Control::Reload { reply: Some(reply) });
        answer
            .await
            .unwrap_or_else(|_| Err("the primary is gone".into()))
    }
    pub fn scale(&self, workers: u32) {
        let _ = self.control.send(Control::Scale { workers });
    }
    pub async fn status(&self) -> Option<ClusterStatus> {
        let (reply, answer) = tokio::sync::oneshot::channel();
        let _ = self.control.send(Control::Status { reply });
        answer.await.ok()
    }
    /// Sends any request (the control socket uses this).
    pub fn request(&self, control: Control) {
        let _ = self.control.send(control);
    }
}
