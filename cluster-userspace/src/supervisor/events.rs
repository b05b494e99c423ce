//! What happens to workers, as events: logged by the primary and, for embedders, delivered as a
//! stream (fork, online, listening, ready, disconnect, exit, restart, message).

use std::{fmt, time::Duration};

use log::Level;
use serde_json::{json, Value};

/// How a worker process ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExitStatus {
    Code(i32),
    Signal(nix::sys::signal::Signal),
}

impl fmt::Display for ExitStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ExitStatus::Code(code) => write!(f, "exited with status {code}"),
            ExitStatus::Signal(signal) => write!(f, "was killed by {signal}"),
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub enum Event {
    /// The process started (with its sockets, if socket-activated).
    Fork { id: u32, pid: i32, slot: u32 },
    /// The worker said `online` on its IPC channel.
    Online { id: u32, pid: i32 },
    /// The worker said it accepts on `address`.
    Listening { id: u32, pid: i32, address: String },
    /// The worker joined the active set: it gets new connections from now on.
    Ready { id: u32, pid: i32, reason: String },
    /// The worker left the active set and was asked to stop (or closed its channel).
    Disconnect { id: u32, pid: i32, reason: String },
    /// The process ended.
    Exit {
        id: u32,
        pid: i32,
        status: ExitStatus,
        uptime: Duration,
    },
    /// Worker `id` will be started again after `delay`.
    Restart { id: u32, delay: Duration },
    /// Worker `id` keeps dying soon after start.
    CrashLoop {
        id: u32,
        crashes: u32,
        status: ExitStatus,
    },
    /// A user message from a worker.
    Message { id: u32, pid: i32, data: Value },
}

impl Event {
    pub fn name(&self) -> &'static str {
        match self {
            Event::Fork { .. } => "fork",
            Event::Online { .. } => "online",
            Event::Listening { .. } => "listening",
            Event::Ready { .. } => "ready",
            Event::Disconnect { .. } => "disconnect",
            Event::Exit { .. } => "exit",
            Event::Restart { .. } => "restart",
            Event::CrashLoop { .. } => "crash-loop",
            Event::Message { .. } => "message",
        }
    }

    fn level(&self) -> Level {
        match self {
            Event::Exit {
                status: ExitStatus::Code(0),
                ..
            } => Level::Info,
            Event::Exit { .. } => Level::Warn,
            Event::CrashLoop { .. } => Level::Error,
            Event::Message { .. } => Level::Debug,
            _ => Level::Info,
        }
    }

    fn fields(&self) -> Value {
        let mut value = match self {
            Event::Fork { id, pid, slot } => json!({"worker": id, "pid": pid, "slot": slot}),
            Event::Online { id, pid } => json!({"worker": id, "pid": pid}),
            Event::Listening { id, pid, address } => {
                json!({"worker": id, "pid": pid, "address": address})
            }
            Event::Ready { id, pid, reason } | Event::Disconnect { id, pid, reason } => {
                json!({"worker": id, "pid": pid, "reason": reason})
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
            Event::Restart { id, delay } => json!({"worker": id, "delay_s": delay.as_secs_f64()}),
            Event::CrashLoop {
                id,
                crashes,
                status,
            } => {
                json!({"worker": id, "crashes": crashes, "last": status.to_string()})
            }
            Event::Message { id, pid, data } => json!({"worker": id, "pid": pid, "data": data}),
        };
        if let Some(object) = value.as_object_mut() {
            object.insert("event".into(), json!(self.name()));
        }
        value
    }

    /// Writes the event to the primary's log.
    pub fn log(&self) {
        crate::logging::event(self.level(), &self.to_string(), self.fields());
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
            Event::Exit { id, pid, status, uptime } => write!(
                f,
                "worker {id} (pid {pid}) {status} after {:.1}s",
                uptime.as_secs_f64()
            ),
            Event::Restart { id, delay } => {
                write!(f, "restarting worker {id} in {:.1}s", delay.as_secs_f64())
            }
            Event::CrashLoop { id, crashes, status } => write!(
                f,
                "worker {id} is crash-looping: it {status}, {crashes} times in a row, each soon after starting; restarts continue with growing delays"
            ),
            Event::Message { id, pid, data } => write!(f, "message from worker {id} (pid {pid}): {data}"),
        }
    }
}
