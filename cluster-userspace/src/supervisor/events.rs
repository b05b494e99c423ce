//! What happens to workers, as events: logged by the primary (text or JSON lines) and, for
//! embedders, delivered as a stream. Most come from the lifecycle state machine; `Listening`
//! and `Message` come from a worker's channel.

use std::{fmt, time::Duration};

use log::Level;
use serde::{ser::SerializeMap, Deserialize, Serialize, Serializer};
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
    /// The configuration read anew for the reload (`Config::reconfigure`) cannot be used:
    /// nothing was started or replaced.
    #[error("reload refused: {0}; the workers keep serving as they are")]
    Refused(String),
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
    /// It sent the message `"ready"` on its channel (Node's `process.send('ready')`); the
    /// readiness signal under `--wait-ready`, PM2's `wait_ready`.
    Message,
}

impl fmt::Display for Readiness {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Readiness::Listening => "listening",
            Readiness::Notify => "READY=1",
            Readiness::Delay => "after --ready-delay",
            Readiness::Message => "sent 'ready'",
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
    /// It is replaced while it serves (`--max-memory`, `--max-connections`, `--max-age`): its
    /// replacement is ready.
    Recycled(String),
    /// The program's primary let it go (`worker.kill()`, `worker.disconnect()`,
    /// `cluster.disconnect()`): the program signals or disconnects it itself.
    LetGo,
    /// The program's primary, started after it, did not fork it (its forks decide the count).
    NotForked,
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
        !matches!(self, Departure::WorkerDisconnected | Departure::LetGo)
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
            Departure::LetGo => f.write_str("the program's primary let it go"),
            Departure::Recycled(why) => write!(f, "recycled: {why}"),
            Departure::NotForked => f.write_str("the program's primary did not fork it"),
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
    /// A Node worker said `online` but never called `listen()` within `--ready-timeout`.
    NeverListened(Duration),
    /// Under `--wait-ready`, a worker did not send `'ready'` within `--ready-timeout`.
    NeverSentReady(Duration),
    /// A fast stop (QUIT, or a second TERM/INT).
    StopNow,
    /// It was hung (its accept queue did not drain for this long) and its replacement is ready.
    Hung(Duration),
    /// It sent no WATCHDOG=1 for this long (`--watchdog`) and its replacement is ready.
    Silent(Duration),
    /// Its memory (PSS) went over `--max-memory-hard`.
    MemoryHard { bytes: u64, limit: u64 },
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
            KillReason::NeverListened(timeout) => write!(
                f,
                "it was online for {}s but never called listen() (a Node worker is ready once it listens; one that serves nothing runs under the program's own primary, see --node-primary)",
                timeout.as_secs_f64()
            ),
            KillReason::NeverSentReady(timeout) => write!(
                f,
                "it did not send 'ready' within --ready-timeout {}s (--wait-ready: a worker is ready once it calls process.send('ready'))",
                timeout.as_secs_f64()
            ),
            KillReason::StopNow => f.write_str("stopping now"),
            KillReason::Hung(stalled) => write!(
                f,
                "it was hung (its accept queue did not drain for {:.1}s) and its replacement is ready",
                stalled.as_secs_f64()
            ),
            KillReason::Silent(silent) => write!(
                f,
                "it sent no WATCHDOG=1 for {:.1}s (--watchdog) and its replacement is ready",
                silent.as_secs_f64()
            ),
            KillReason::MemoryHard { bytes, limit } => write!(
                f,
                "its memory ({} MiB) went over --max-memory-hard ({} MiB)",
                bytes >> 20,
                limit >> 20
            ),
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
    /// Killed by the primary while it served (`--max-memory-hard`).
    Killed(KillReason),
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Failure::Exited(status) => write!(f, "{status}"),
            Failure::StartFailed(error) => write!(f, "could not start ({error})"),
            Failure::NotReady => f.write_str("was not ready in time"),
            Failure::Departed(why) => write!(f, "left ({why})"),
            Failure::Killed(reason) => write!(f, "was killed ({reason})"),
        }
    }
}

/// What happens to workers. Its JSON form (`fields`) is derived: `"event"` names the kind
/// (kebab-case), `"worker"` is the id, durations are seconds (`_s`), and reasons are their
/// one-line text.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "event", rename_all = "kebab-case")]
pub enum Event {
    /// The process started (with its sockets, if socket-activated).
    Fork {
        #[serde(rename = "worker")]
        id: u32,
        pid: i32,
        slot: u32,
    },
    /// The worker said `online` on its channel: readiness now comes from `listening`.
    Online {
        #[serde(rename = "worker")]
        id: u32,
        pid: i32,
    },
    /// The worker said it accepts on `address`.
    Listening {
        #[serde(rename = "worker")]
        id: u32,
        pid: i32,
        address: String,
    },
    /// The worker joined the active set: it gets new connections from now on.
    Ready {
        #[serde(rename = "worker")]
        id: u32,
        pid: i32,
        #[serde(serialize_with = "as_text")]
        reason: Readiness,
    },
    /// The worker left the active set (and, unless it is leaving by itself, was asked to stop).
    Disconnect {
        #[serde(rename = "worker")]
        id: u32,
        pid: i32,
        #[serde(flatten, serialize_with = "departure_fields")]
        reason: Departure,
    },
    /// The primary sent SIGKILL.
    Kill {
        #[serde(rename = "worker")]
        id: u32,
        pid: i32,
        #[serde(serialize_with = "as_text")]
        reason: KillReason,
    },
    /// The process ended.
    Exit {
        #[serde(rename = "worker")]
        id: u32,
        pid: i32,
        #[serde(flatten, serialize_with = "exit_fields")]
        status: ExitStatus,
        #[serde(rename = "uptime_s", serialize_with = "seconds")]
        uptime: Duration,
        /// It had been asked to stop (a Node worker that a timer kept a little after its
        /// disconnect, then SIGTERM, is no news).
        asked: bool,
    },
    /// Starting worker `id` failed before the program ran.
    StartFailed {
        #[serde(rename = "worker")]
        id: u32,
        error: String,
    },
    /// Worker `id` will be started again after `delay`.
    Restart {
        #[serde(rename = "worker")]
        id: u32,
        #[serde(rename = "delay_s", serialize_with = "seconds")]
        delay: Duration,
    },
    /// Worker `id` keeps failing soon after start.
    CrashLoop {
        #[serde(rename = "worker")]
        id: u32,
        failures: u32,
        #[serde(serialize_with = "as_text")]
        last: Failure,
    },
    /// A user message from a worker.
    Message {
        #[serde(rename = "worker")]
        id: u32,
        pid: i32,
        data: Value,
    },
    /// The worker listens on `address` by itself, not through cluster-lb (Node's reusePort or
    /// exclusive): nothing balances that server.
    OwnListener {
        #[serde(rename = "worker")]
        id: u32,
        pid: i32,
        address: String,
    },
    /// A ready worker closed a listening socket it was given (reported, not acted on).
    ListenerClosed {
        #[serde(rename = "worker")]
        id: u32,
        pid: i32,
        address: String,
    },
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
    ReloadFinished {
        #[serde(flatten, serialize_with = "outcome_fields")]
        outcome: Result<u32, ReloadError>,
    },
    /// The wanted number of workers changed.
    Scaling { from: u32, to: u32 },
    /// The cluster stops: gracefully within `grace`, or at once (`None`).
    Stopping {
        workers: u32,
        #[serde(rename = "grace_s", serialize_with = "optional_seconds")]
        grace: Option<Duration>,
    },
    /// A worker of the program's primary has been online for `after` without calling
    /// `listen()`: it serves nothing (Node allows that), keeps running, and gets no
    /// connections.
    Quiet {
        #[serde(rename = "worker")]
        id: u32,
        pid: i32,
        #[serde(rename = "after_s", serialize_with = "seconds")]
        after: Duration,
    },
    /// Its accept queue stopped draining: it is out of the active set until it drains again.
    Stalled {
        #[serde(rename = "worker")]
        id: u32,
        pid: i32,
    },
    /// Its accept queue drains again: it is back in the active set.
    Unstalled {
        #[serde(rename = "worker")]
        id: u32,
        pid: i32,
    },
    /// Its accept queue did not drain for `stalled` (`--hang-timeout`): it is replaced, and
    /// killed once its replacement is ready.
    Hung {
        #[serde(rename = "worker")]
        id: u32,
        pid: i32,
        #[serde(rename = "stalled_s", serialize_with = "seconds")]
        stalled: Duration,
    },
    /// It sent no WATCHDOG=1 for `silent` (`--watchdog`): it is replaced, and killed once its
    /// replacement is ready.
    WatchdogMissed {
        #[serde(rename = "worker")]
        id: u32,
        pid: i32,
        #[serde(rename = "silent_s", serialize_with = "seconds")]
        silent: Duration,
    },
    /// Its memory (PSS) is over the limit: replaced (`--max-memory`) or killed
    /// (`--max-memory-hard`, `hard`).
    MemoryLimit {
        #[serde(rename = "worker")]
        id: u32,
        pid: i32,
        bytes: u64,
        limit: u64,
        hard: bool,
    },
    /// It was replaced while it served, its replacement ready first.
    Recycled {
        #[serde(rename = "worker")]
        id: u32,
        pid: i32,
        #[serde(serialize_with = "as_text")]
        why: Retire,
    },
    /// The program's primary process (its `cluster.isPrimary` branch) runs.
    PrimaryStarted { pid: i32 },
    /// The program's primary process could not be started; again after `delay`.
    PrimaryFailed {
        error: String,
        #[serde(rename = "delay_s", serialize_with = "seconds")]
        delay: Duration,
    },
    /// The program's primary process ended: it is started again after `restart`, or (`None`)
    /// it was done (status 0: the cluster stops) or asked to stop.
    PrimaryExit {
        pid: i32,
        #[serde(flatten, serialize_with = "exit_fields")]
        status: ExitStatus,
        #[serde(rename = "restart_s", serialize_with = "optional_seconds")]
        restart: Option<Duration>,
    },
    /// The program's primary process, started because a worker read `cluster.isPrimary`,
    /// ended without forking a worker: the program has no primary branch after all, and it is
    /// not started again.
    PrimaryUnused {
        pid: i32,
        #[serde(flatten, serialize_with = "exit_fields")]
        status: ExitStatus,
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
            Event::Quiet { .. } => "quiet",
            Event::Stalled { .. } => "stalled",
            Event::Unstalled { .. } => "unstalled",
            Event::Hung { .. } => "hung",
            Event::WatchdogMissed { .. } => "watchdog-missed",
            Event::MemoryLimit { .. } => "memory-limit",
            Event::Recycled { .. } => "recycled",
            Event::PrimaryStarted { .. } => "primary-started",
            Event::PrimaryFailed { .. } => "primary-failed",
            Event::PrimaryExit { .. } => "primary-exit",
            Event::PrimaryUnused { .. } => "primary-unused",
        }
    }

    fn level(&self) -> Level {
        match self {
            Event::Message { .. } => Level::Debug,
            Event::Exit {
                status: ExitStatus::Code(0),
                ..
            }
            | Event::Exit { asked: true, .. } => Level::Info,
            Event::Exit { .. }
            | Event::Kill { .. }
            | Event::OwnListener { .. }
            | Event::ListenerClosed { .. }
            | Event::Orphan { .. } => Level::Warn,
            Event::Disconnect { reason, .. } if reason.is_failure() => Level::Warn,
            Event::StartFailed { .. } | Event::CrashLoop { .. } | Event::PrimaryFailed { .. } => {
                Level::Error
            }
            Event::PrimaryExit {
                restart: Some(_), ..
            }
            | Event::PrimaryUnused { .. }
            | Event::Stalled { .. }
            | Event::Hung { .. }
            | Event::WatchdogMissed { .. }
            | Event::MemoryLimit { .. } => Level::Warn,
            Event::ReloadFinished { outcome: Err(_) } => Level::Error,
            _ => Level::Info,
        }
    }

    /// The event as a JSON object, with "event" naming it (the `--log-format json` line and
    /// what tests read).
    pub fn fields(&self) -> Value {
        serde_json::to_value(self)
            .unwrap_or_else(|e| json!({"event": self.name(), "error": e.to_string()}))
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
            Event::Exit { id, pid, status, uptime, .. } => write!(
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
            Event::Message { id, pid, data } => {
                // Its size and first bytes only: payloads are the program's data (--log-messages
                // logs them whole).
                let text = data.to_string();
                let prefix: String = text.chars().take(60).collect();
                write!(
                    f,
                    "message from worker {id} (pid {pid}): {} bytes, {prefix}{}",
                    text.len(),
                    if prefix.len() < text.len() { "..." } else { "" }
                )
            }
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
            Event::Unstalled { id, pid } => write!(
                f,
                "worker {id} (pid {pid}) accepts again: back in the active set"
            ),
            Event::Stalled { id, pid } => write!(
                f,
                "worker {id} (pid {pid}) stopped accepting (its accept queue does not drain): out of the active set until it does"
            ),
            Event::WatchdogMissed { id, pid, silent } => write!(
                f,
                "worker {id} (pid {pid}) sent no WATCHDOG=1 for {:.1}s (--watchdog); it is replaced, and killed once its replacement is ready",
                silent.as_secs_f64()
            ),
            Event::Hung { id, pid, stalled } => write!(
                f,
                "worker {id} (pid {pid}) is hung: its accept queue did not drain for {:.1}s (--hang-timeout); it is replaced, and killed once its replacement is ready",
                stalled.as_secs_f64()
            ),
            Event::MemoryLimit { id, pid, bytes, limit, hard } => write!(
                f,
                "worker {id} (pid {pid}) uses {} MiB (PSS), over {} {} MiB: {}",
                bytes >> 20,
                if *hard { "--max-memory-hard" } else { "--max-memory" },
                limit >> 20,
                if *hard { "killed" } else { "replaced, its replacement ready first" }
            ),
            Event::Recycled { id, pid, why } => {
                write!(f, "worker {id} (pid {pid}) recycled, its replacement ready: {why}")
            }
            Event::Quiet { id, pid, after } => write!(
                f,
                "worker {id} (pid {pid}) has been online for {:.0}s and never called listen(): it serves nothing and gets no connections; it keeps running, as its primary forked it",
                after.as_secs_f64()
            ),
            Event::PrimaryStarted { pid } => {
                write!(f, "the program's primary (its cluster.isPrimary branch) runs as pid {pid}")
            }
            Event::PrimaryFailed { error, delay } => write!(
                f,
                "starting the program's primary failed: {error}; again in {:.1}s",
                delay.as_secs_f64()
            ),
            Event::PrimaryExit { pid, status, restart: Some(delay) } => write!(
                f,
                "the program's primary (pid {pid}) {status}; it is started again in {:.1}s, and the workers keep serving meanwhile",
                delay.as_secs_f64()
            ),
            Event::PrimaryExit { pid, status: ExitStatus::Code(0), restart: None } => write!(
                f,
                "the program's primary (pid {pid}) is done (exited with status 0)"
            ),
            Event::PrimaryExit { pid, status, restart: None } => {
                write!(f, "the program's primary (pid {pid}) {status}")
            }
            Event::PrimaryUnused { pid, status } => write!(
                f,
                "the program's primary (pid {pid}) {status} without forking a worker: the program reads cluster.isPrimary but has no primary branch, so it is not started again (--node-primary off skips it, on insists)"
            ),
        }
    }
}

/// A reason as its one-line text.
fn as_text<S: Serializer>(value: &impl fmt::Display, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.collect_str(value)
}

fn seconds<S: Serializer>(duration: &Duration, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_f64(duration.as_secs_f64())
}

fn optional_seconds<S: Serializer>(
    duration: &Option<Duration>,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    match duration {
        Some(duration) => seconds(duration, serializer),
        None => serializer.serialize_none(),
    }
}

/// `"reason"` (text) and `"failure"` (whether the worker, not the primary, chose to leave).
fn departure_fields<S: Serializer>(why: &Departure, serializer: S) -> Result<S::Ok, S::Error> {
    let mut map = serializer.serialize_map(Some(2))?;
    map.serialize_entry("reason", &why.to_string())?;
    map.serialize_entry("failure", &why.is_failure())?;
    map.end()
}

/// `"code"` and `"signal"`, one of them null.
fn exit_fields<S: Serializer>(status: &ExitStatus, serializer: S) -> Result<S::Ok, S::Error> {
    let (code, signal) = match status {
        ExitStatus::Code(code) => (Some(*code), None),
        ExitStatus::Signal(signal) => (None, Some(signal.as_str())),
    };
    let mut map = serializer.serialize_map(Some(2))?;
    map.serialize_entry("code", &code)?;
    map.serialize_entry("signal", &signal)?;
    map.end()
}

/// `"ok"`, and `"replaced"` or `"error"`.
fn outcome_fields<S: Serializer>(
    outcome: &Result<u32, ReloadError>,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    let mut map = serializer.serialize_map(Some(2))?;
    match outcome {
        Ok(replaced) => {
            map.serialize_entry("ok", &true)?;
            map.serialize_entry("replaced", replaced)?;
        }
        Err(error) => {
            map.serialize_entry("ok", &false)?;
            map.serialize_entry("error", &error.to_string())?;
        }
    }
    map.end()
}

/// Why a process is to be replaced while it still serves (its replacement is started first,
/// one at a time, so capacity never drops).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "reason", rename_all = "kebab-case")]
pub enum Retire {
    /// Its accept queue did not drain for `stalled` (`--hang-timeout`): killed once its
    /// replacement is ready.
    Hung {
        #[serde(with = "millis_duration")]
        stalled: Duration,
    },
    /// It sent no WATCHDOG=1 for `silent` (`--watchdog`): killed once its replacement is
    /// ready.
    Watchdog {
        #[serde(with = "millis_duration")]
        silent: Duration,
    },
    /// Its memory (PSS) is over `--max-memory`.
    Memory { bytes: u64, limit: u64 },
    /// It was given `count` connections (`--max-connections`, with jitter).
    Connections { count: u64, limit: u64 },
    /// It ran `age` (`--max-age`, with jitter).
    Age {
        #[serde(with = "millis_duration")]
        age: Duration,
    },
}

impl Retire {
    /// The process does not respond: it gets nothing new while it waits for its replacement,
    /// and is killed, not drained, once that is ready.
    pub fn unresponsive(self) -> bool {
        matches!(self, Retire::Hung { .. } | Retire::Watchdog { .. })
    }
}

impl std::fmt::Display for Retire {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Retire::Watchdog { silent } => {
                write!(f, "hung: no WATCHDOG=1 for {:.1}s", silent.as_secs_f64())
            }
            Retire::Hung { stalled } => write!(
                f,
                "hung: its accept queue did not drain for {:.1}s",
                stalled.as_secs_f64()
            ),
            Retire::Memory { bytes, limit } => write!(
                f,
                "memory {} MiB over --max-memory {} MiB",
                bytes >> 20,
                limit >> 20
            ),
            Retire::Connections { count, limit } => {
                write!(f, "{count} connections (--max-connections {limit})")
            }
            Retire::Age { age } => write!(f, "up {:.0}s (--max-age)", age.as_secs_f64()),
        }
    }
}

mod millis_duration {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(duration: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(u64::try_from(duration.as_millis()).unwrap_or(u64::MAX))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        u64::deserialize(d).map(Duration::from_millis)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::signal::Signal;

    /// One event of every kind and the JSON object it is logged as (`--log-format json`, and
    /// what the tests and users' scripts read): these keys and values are the contract.
    fn golden() -> Vec<(Event, Value)> {
        let secs = Duration::from_millis;
        vec![
            (
                Event::Fork {
                    id: 1,
                    pid: 10,
                    slot: 2,
                },
                json!({"event": "fork", "worker": 1, "pid": 10, "slot": 2}),
            ),
            (
                Event::Online { id: 1, pid: 10 },
                json!({"event": "online", "worker": 1, "pid": 10}),
            ),
            (
                Event::Listening {
                    id: 1,
                    pid: 10,
                    address: "127.0.0.1:80".into(),
                },
                json!({"event": "listening", "worker": 1, "pid": 10, "address": "127.0.0.1:80"}),
            ),
            (
                Event::Ready {
                    id: 1,
                    pid: 10,
                    reason: Readiness::Notify,
                },
                json!({"event": "ready", "worker": 1, "pid": 10, "reason": "READY=1"}),
            ),
            (
                Event::Disconnect {
                    id: 1,
                    pid: 10,
                    reason: Departure::ListenerClosed("[::]:80".into()),
                },
                json!({"event": "disconnect", "worker": 1, "pid": 10, "failure": true,
                       "reason": "it closed its listening socket for [::]:80"}),
            ),
            (
                Event::Disconnect {
                    id: 1,
                    pid: 10,
                    reason: Departure::Replaced,
                },
                json!({"event": "disconnect", "worker": 1, "pid": 10, "failure": false,
                       "reason": "replaced by reload"}),
            ),
            (
                Event::Kill {
                    id: 1,
                    pid: 10,
                    reason: KillReason::GraceOver(secs(1500)),
                },
                json!({"event": "kill", "worker": 1, "pid": 10,
                       "reason": "it did not exit within the grace period of 1.5s"}),
            ),
            (
                Event::Exit {
                    id: 1,
                    pid: 10,
                    status: ExitStatus::Code(3),
                    uptime: secs(2500),
                    asked: false,
                },
                json!({"event": "exit", "worker": 1, "pid": 10, "code": 3, "signal": null,
                       "uptime_s": 2.5, "asked": false}),
            ),
            (
                Event::Exit {
                    id: 1,
                    pid: 10,
                    status: ExitStatus::Signal(Signal::SIGKILL),
                    uptime: secs(0),
                    asked: true,
                },
                json!({"event": "exit", "worker": 1, "pid": 10, "code": null, "signal": "SIGKILL",
                       "uptime_s": 0.0, "asked": true}),
            ),
            (
                Event::StartFailed {
                    id: 1,
                    error: "no".into(),
                },
                json!({"event": "start-failed", "worker": 1, "error": "no"}),
            ),
            (
                Event::Restart {
                    id: 1,
                    delay: secs(200),
                },
                json!({"event": "restart", "worker": 1, "delay_s": 0.2}),
            ),
            (
                Event::CrashLoop {
                    id: 1,
                    failures: 5,
                    last: Failure::NotReady,
                },
                json!({"event": "crash-loop", "worker": 1, "failures": 5,
                       "last": "was not ready in time"}),
            ),
            (
                Event::Message {
                    id: 1,
                    pid: 10,
                    data: json!({"a": [1]}),
                },
                json!({"event": "message", "worker": 1, "pid": 10, "data": {"a": [1]}}),
            ),
            (
                Event::OwnListener {
                    id: 1,
                    pid: 10,
                    address: "0.0.0.0:81".into(),
                },
                json!({"event": "own-listener", "worker": 1, "pid": 10, "address": "0.0.0.0:81"}),
            ),
            (
                Event::ListenerClosed {
                    id: 1,
                    pid: 10,
                    address: "0.0.0.0:81".into(),
                },
                json!({"event": "listener-closed", "worker": 1, "pid": 10, "address": "0.0.0.0:81"}),
            ),
            (
                Event::Orphan {
                    pid: 11,
                    command: "sleep".into(),
                    held_socket: true,
                },
                json!({"event": "orphan", "pid": 11, "command": "sleep", "held_socket": true}),
            ),
            (
                Event::ReloadStarted { workers: 4 },
                json!({"event": "reload-started", "workers": 4}),
            ),
            (
                Event::ReloadFinished { outcome: Ok(4) },
                json!({"event": "reload-finished", "ok": true, "replaced": 4}),
            ),
            (
                Event::ReloadFinished {
                    outcome: Err(ReloadError::Stopping),
                },
                json!({"event": "reload-finished", "ok": false,
                       "error": "reload aborted: the cluster is stopping"}),
            ),
            (
                Event::Scaling { from: 2, to: 3 },
                json!({"event": "scaling", "from": 2, "to": 3}),
            ),
            (
                Event::Stopping {
                    workers: 2,
                    grace: Some(secs(30_000)),
                },
                json!({"event": "stopping", "workers": 2, "grace_s": 30.0}),
            ),
            (
                Event::Stopping {
                    workers: 2,
                    grace: None,
                },
                json!({"event": "stopping", "workers": 2, "grace_s": null}),
            ),
            (
                Event::Upgraded {
                    from: "0.1.0".into(),
                    to: "0.1.1".into(),
                    workers: 2,
                },
                json!({"event": "upgraded", "from": "0.1.0", "to": "0.1.1", "workers": 2}),
            ),
            (
                Event::Quiet {
                    id: 2,
                    pid: 9,
                    after: secs(30_000),
                },
                json!({"event": "quiet", "worker": 2, "pid": 9, "after_s": 30.0}),
            ),
            (
                Event::PrimaryStarted { pid: 9 },
                json!({"event": "primary-started", "pid": 9}),
            ),
            (
                Event::PrimaryFailed {
                    error: "no".into(),
                    delay: secs(100),
                },
                json!({"event": "primary-failed", "error": "no", "delay_s": 0.1}),
            ),
            (
                Event::PrimaryExit {
                    pid: 9,
                    status: ExitStatus::Code(1),
                    restart: Some(secs(200)),
                },
                json!({"event": "primary-exit", "pid": 9, "code": 1, "signal": null,
                       "restart_s": 0.2}),
            ),
            (
                Event::PrimaryUnused {
                    pid: 9,
                    status: ExitStatus::Code(1),
                },
                json!({"event": "primary-unused", "pid": 9, "code": 1, "signal": null}),
            ),
            (
                Event::PrimaryExit {
                    pid: 9,
                    status: ExitStatus::Code(0),
                    restart: None,
                },
                json!({"event": "primary-exit", "pid": 9, "code": 0, "signal": null,
                       "restart_s": null}),
            ),
        ]
    }

    #[test]
    fn every_event_is_logged_as_its_golden_json_and_named_by_its_tag() {
        for (event, expected) in golden() {
            assert_eq!(event.fields(), expected, "{event:?}");
            assert_eq!(expected["event"], event.name(), "{event:?}");
        }
    }
}
