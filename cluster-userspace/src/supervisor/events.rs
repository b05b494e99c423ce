//! What happens to workers, as events: logged by the primary (text or JSON lines) and, for
//! embedders, delivered as a stream. Most come from the lifecycle state machine; `Listening`
//! and `Message` come from a worker's channel.

use std::{fmt, time::Duration};

use log::Level;
use serde_json::{json, Value};

pub use crate::sys::pidfd::ExitStatus;

/// Why a rolling reload did not complete. The old workers keep serving in every case.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ReloadError {
    #[error("reload aborted: the cluster is stopping")]
    Stopping,
    #[error("reload aborted: starting the replacement of worker {id} failed: {error}; the old workers keep serving")]
    StartFailed { id: u32, error: String },
    #[error("reload aborted: the replacement of worker {id} (pid {pid}) {status} before it was ready; the old workers keep serving")]
    ReplacementExited {
        id: u32,
        pid: i32,
        status: ExitStatus,
    },
    #[error("reload aborted: the replacement of worker {id} (pid {pid}) was not ready within {secs}s; the old workers keep serving", secs = .timeout.as_secs_f64())]
    NotReadyInTime {
        id: u32,
        pid: i32,
        timeout: Duration,
    },
    #[error("reload aborted: the replacement of worker {id} (pid {pid}) left before it was ready ({why}); the old workers keep serving")]
    ReplacementLeft { id: u32, pid: i32, why: Departure },
    #[error("reload replaced no worker: none of the {wanted} was running (each is restarting after failures, and starts with the new code when it does); `cluster-lb status` shows them")]
    NothingRunning { wanted: u32 },
}

/// What made a worker ready (it joins the active set).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Readiness {
    /// It said `listening` on its channel.
    Listening,
    /// It sent READY=1 to NOTIFY_SOCKET.
    Notify,
    /// It signals nothing, and `--ready-delay` passed.
    Delay,
}

impl fmt::Display for Readiness {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Readiness::Listening => "listening",
            Readiness::Notify => "READY=1",
            Readiness::Delay => "after --ready-delay",
        })
    }
}

/// Why a worker leaves the active set and is asked to stop.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Departure {
    /// Its replacement is ready (rolling reload).
    Replaced,
    /// Its id is above the wanted count.
    ScaledDown,
    /// The cluster stops.
    Stopping,
    /// An operator or embedder asked it to go (it is replaced at once).
    Asked,
    /// It said it leaves (its own `disconnect`).
    WorkerDisconnected,
    /// It broke its channel's protocol.
    ProtocolViolation(String),
    /// It closed its listening socket: the kernel gives it nothing any more.
    ListenerClosed(String),
}

impl Departure {
    /// Whether the worker, not the primary, chose this: such a departure counts as a failure
    /// for the restart backoff.
    pub fn is_failure(&self) -> bool {
        matches!(
            self,
            Departure::WorkerDisconnected
                | Departure::ProtocolViolation(_)
                | Departure::ListenerClosed(_)
        )
    }

    /// Whether the primary asks the worker to stop. A worker that said it leaves is already
    /// closing its servers (Node's own `disconnect` path); a signal would cut that short.
    pub fn asks_to_stop(&self) -> bool {
        !matches!(self, Departure::WorkerDisconnected)
    }
}

impl fmt::Display for Departure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Departure::Replaced => f.write_str("replaced by reload"),
            Departure::ScaledDown => f.write_str("scaled down"),
            Departure::Stopping => f.write_str("cluster stopping"),
            Departure::Asked => f.write_str("asked to disconnect"),
            Departure::WorkerDisconnected => f.write_str("the worker disconnected"),
            Departure::ProtocolViolation(what) => write!(f, "protocol violation: {what}"),
            Departure::ListenerClosed(address) => {
                write!(f, "it closed its listening socket for {address}")
            }
        }
    }
}

/// Why the primary sends SIGKILL.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KillReason {
    /// It was asked to stop and did not exit within `--grace`.
    GraceOver(Duration),
    /// It did not become ready within `--ready-timeout`.
    NotReadyInTime(Duration),
    /// A fast stop (QUIT, or a second TERM/INT).
    StopNow,
}

impl fmt::Display for KillReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KillReason::GraceOver(grace) => write!(
                f,
                "it did not exit within the grace period of {}s",
                grace.as_secs_f64()
            ),
            KillReason::NotReadyInTime(timeout) => write!(
                f,
                "it was not ready within --ready-timeout {}s",
                timeout.as_secs_f64()
            ),
            KillReason::StopNow => f.write_str("stopping now"),
        }
    }
}

/// The last failure of a worker id, as a crash loop reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Failure {
    Exited(ExitStatus),
    StartFailed(String),
    NotReady,
    Departed(Departure),
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Failure::Exited(status) => write!(f, "{status}"),
            Failure::StartFailed(error) => write!(f, "could not start ({error})"),
            Failure::NotReady => f.write_str("was not ready in time"),
            Failure::Departed(why) => write!(f, "left ({why})"),
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub enum Event {
    /// The process started (with its sockets, if socket-activated).
    Fork { id: u32, pid: i32, slot: u32 },
    /// The worker said `online` on its channel: readiness now comes from `listening`.
    Online { id: u32, pid: i32 },
    /// The worker said it accepts on `address`.
    Listening { id: u32, pid: i32, address: String },
    /// The worker joined the active set: it gets new connections from now on.
    Ready {
        id: u32,
        pid: i32,
        reason: Readiness,
    },
    /// The worker left the active set (and, unless it is leaving by itself, was asked to stop).
    Disconnect {
        id: u32,
        pid: i32,
        reason: Departure,
    },
    /// The primary sent SIGKILL.
    Kill {
        id: u32,
        pid: i32,
        reason: KillReason,
    },
    /// The process ended.
    Exit {
        id: u32,
        pid: i32,
        status: ExitStatus,
        uptime: Duration,
    },
    /// Starting worker `id` failed before the program ran.
    StartFailed { id: u32, error: String },
    /// Worker `id` will be started again after `delay`.
    Restart { id: u32, delay: Duration },
    /// Worker `id` keeps failing soon after start.
    CrashLoop {
        id: u32,
        failures: u32,
        last: Failure,
    },
    /// A user message from a worker.
    Message { id: u32, pid: i32, data: Value },
    /// The worker listens on `address` by itself, not through cluster-lb (Node's reusePort or
    /// exclusive): nothing balances that server.
    OwnListener { id: u32, pid: i32, address: String },
    /// A ready worker closed a listening socket it was given (reported, not acted on).
    ListenerClosed { id: u32, pid: i32, address: String },
    /// A process a worker left behind was stopped: it held a socket of a worker that is gone,
    /// or the cluster stopped.
    Orphan {
        pid: i32,
        command: String,
        held_socket: bool,
    },
    /// A rolling reload began.
    ReloadStarted { workers: u32 },
    /// A rolling reload completed (workers replaced) or was aborted.
    ReloadFinished { outcome: Result<u32, ReloadError> },
    /// The wanted number of workers changed.
    Scaling { from: u32, to: u32 },
    /// The cluster stops: gracefully within `grace`, or at once (`None`).
    Stopping {
        workers: u32,
        grace: Option<Duration>,
    },
    /// This primary took over from `from` by an in-place upgrade (same pid, same workers).
    Upgraded {
        from: String,
        to: String,
        workers: u32,
    },
}

impl Event {
    pub fn name(&self) -> &'static str {
        match self {
            Event::Fork { .. } => "fork",
            Event::Online { .. } => "online",
            Event::Listening { .. } => "listening",
            Event::Ready { .. } => "ready",
            Event::Disconnect { .. } => "disconnect",
            Event::Kill { .. } => "kill",
            Event::Exit { .. } => "exit",
            Event::StartFailed { .. } => "start-failed",
            Event::Restart { .. } => "restart",
            Event::CrashLoop { .. } => "crash-loop",
            Event::Message { .. } => "message",
            Event::OwnListener { .. } => "own-listener",
            Event::ListenerClosed { .. } => "listener-closed",
            Event::Orphan { .. } => "orphan",
            Event::ReloadStarted { .. } => "reload-started",
            Event::ReloadFinished { .. } => "reload-finished",
            Event::Scaling { .. } => "scaling",
            Event::Stopping { .. } => "stopping",
            Event::Upgraded { .. } => "upgraded",
        }
    }

    fn level(&self) -> Level {
        match self {
            Event::Exit {
                status: ExitStatus::Code(0),
                ..
            } => Level::Info,
            Event::Exit { .. }
            | Event::Kill { .. }
            | Event::OwnListener { .. }
            | Event::ListenerClosed { .. }
            | Event::Orphan { .. } => Level::Warn,
            Event::Disconnect { reason, .. } if reason.is_failure() => Level::Warn,
            Event::StartFailed { .. } | Event::CrashLoop { .. } => Level::Error,
            Event::ReloadFinished { outcome: Err(_) } => Level::Error,
            _ => Level::Info,
        }
    }

    /// The event as a JSON object, with "event" naming it (the `--log-format json` line and
    /// what tests read).
    pub fn fields(&self) -> Value {
        let mut value = match self {
            Event::Fork { id, pid, slot } => json!({"worker": id, "pid": pid, "slot": slot}),
            Event::Online { id, pid } => json!({"worker": id, "pid": pid}),
            Event::Listening { id, pid, address } => {
                json!({"worker": id, "pid": pid, "address": address})
            }
            Event::Ready { id, pid, reason } => {
                json!({"worker": id, "pid": pid, "reason": reason.to_string()})
            }
            Event::Disconnect { id, pid, reason } => {
                json!({"worker": id, "pid": pid, "reason": reason.to_string(),
                       "failure": reason.is_failure()})
            }
            Event::Kill { id, pid, reason } => {
                json!({"worker": id, "pid": pid, "reason": reason.to_string()})
            }
            Event::Exit {
                id,
                pid,
                status,
                uptime,
            } => {
                let (code, signal) = match status {
                    ExitStatus::Code(code) => (json!(code), Value::Null),
                    ExitStatus::Signal(signal) => (Value::Null, json!(signal.as_str())),
                };
                json!({"worker": id, "pid": pid, "code": code, "signal": signal,
                       "uptime_s": uptime.as_secs_f64()})
            }
            Event::StartFailed { id, error } => json!({"worker": id, "error": error}),
            Event::Restart { id, delay } => json!({"worker": id, "delay_s": delay.as_secs_f64()}),
            Event::CrashLoop { id, failures, last } => {
                json!({"worker": id, "failures": failures, "last": last.to_string()})
            }
            Event::Message { id, pid, data } => json!({"worker": id, "pid": pid, "data": data}),
            Event::OwnListener { id, pid, address } => {
                json!({"worker": id, "pid": pid, "address": address})
            }
            Event::ListenerClosed { id, pid, address } => {
                json!({"worker": id, "pid": pid, "address": address})
            }
            Event::Orphan {
                pid,
                command,
                held_socket,
            } => json!({"pid": pid, "command": command, "held_socket": held_socket}),
            Event::ReloadStarted { workers } => json!({"workers": workers}),
            Event::ReloadFinished { outcome } => match outcome {
                Ok(replaced) => json!({"ok": true, "replaced": replaced}),
                Err(error) => json!({"ok": false, "error": error.to_string()}),
            },
            Event::Scaling { from, to } => json!({"from": from, "to": to}),
            Event::Stopping { workers, grace } => {
                json!({"workers": workers, "grace_s": grace.map(|g| g.as_secs_f64())})
            }
            Event::Upgraded { from, to, workers } => {
                json!({"from": from, "to": to, "workers": workers})
            }
        };
        if let Some(object) = value.as_object_mut() {
            object.insert("event".into(), json!(self.name()));
        }
        value
    }

    /// Writes the event to the primary's log.
    pub fn log(&self) {
        crate::logging::event(self.level(), || self.to_string(), || self.fields());
    }
}

impl fmt::Display for Event {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Event::Fork { id, pid, slot } => write!(f, "worker {id} started (pid {pid}, slot {slot})"),
            Event::Online { id, pid } => write!(f, "worker {id} (pid {pid}) is online"),
            Event::Listening { id, pid, address } => {
                write!(f, "worker {id} (pid {pid}) is listening on {address}")
            }
            Event::Ready { id, pid, reason } => write!(f, "worker {id} (pid {pid}) ready ({reason})"),
            Event::Disconnect { id, pid, reason } => {
                write!(f, "worker {id} (pid {pid}) disconnected: {reason}")
            }
            Event::Kill { id, pid, reason } => {
                write!(f, "killing worker {id} (pid {pid}): {reason}")
            }
            Event::Exit { id, pid, status, uptime } => write!(
                f,
                "worker {id} (pid {pid}) {status} after {:.1}s",
                uptime.as_secs_f64()
            ),
            Event::StartFailed { id, error } => write!(f, "starting worker {id} failed: {error}"),
            Event::Restart { id, delay } => {
                write!(f, "restarting worker {id} in {:.1}s", delay.as_secs_f64())
            }
            Event::CrashLoop { id, failures, last } => write!(
                f,
                "worker {id} is crash-looping: it {last}, {failures} times in a row, each soon after starting; restarts continue with growing delays"
            ),
            Event::Message { id, pid, data } => write!(f, "message from worker {id} (pid {pid}): {data}"),
            Event::OwnListener { id, pid, address } => write!(
                f,
                "worker {id} (pid {pid}) listens on {address} by itself (reusePort or exclusive), not through cluster-lb: nothing balances that server, and disconnect does not close it"
            ),
            Event::ListenerClosed { id, pid, address } => write!(
                f,
                "worker {id} (pid {pid}) closed its listening socket for {address}: the kernel gives it no new connection there"
            ),
            Event::Orphan { pid, command, held_socket: true } => write!(
                f,
                "stopped pid {pid} ({command}), left behind by a worker that is gone: it held that worker's listening socket"
            ),
            Event::Orphan { pid, command, held_socket: false } => {
                write!(f, "stopped pid {pid} ({command}), left behind by a worker")
            }
            Event::ReloadStarted { workers } => write!(f, "rolling reload of {workers} workers"),
            Event::ReloadFinished { outcome: Ok(replaced) } => {
                write!(f, "reload complete: {replaced} workers replaced")
            }
            Event::ReloadFinished { outcome: Err(error) } => write!(f, "{error}"),
            Event::Scaling { from, to } => write!(f, "scaling from {from} to {to} workers"),
            Event::Stopping { workers, grace: Some(grace) } => write!(
                f,
                "stopping {workers} workers (grace {}s)",
                grace.as_secs_f64()
            ),
            Event::Stopping { workers, grace: None } => {
                write!(f, "stopping {workers} workers now (SIGKILL)")
            }
            Event::Upgraded { from, to, workers } => write!(
                f,
                "upgraded in place from {from} to {to}: same pid, {workers} workers kept"
            ),
        }
    }
}
