//! The life of every worker process, and what the cluster as a whole intends, as one state
//! machine.
//!
//! Why it is shaped this way: a worker's life used to be four booleans changed from four files,
//! and some sequences (a crash during a reload, a replacement that never got ready) lost a
//! worker for good. Here every process has exactly one [`Phase`], the cluster one [`Intent`], and
//! every transition is in this file. [`Lifecycle::handle`] takes one [`Input`] and the time, and
//! returns the [`Action`]s for the I/O shell (`supervisor/mod.rs`) to carry out: spawn, signal,
//! update the kernel's active set, tell systemd, emit events. Nothing here does I/O or reads a
//! clock, so the model test drives it through random sequences of inputs and checks the
//! invariant that matters most:
//!
//! > once no input arrives for the longest backoff plus the ready time, exactly the wanted ids
//! > are served, one ready process each (unless the cluster stops), and the program's primary
//! > process runs if it was asked for; a worker that keeps failing is reported by a crash-loop
//! > event while it is retried.
//!
//! The wanted ids are a set: `--workers N` and `scale` make it the N lowest ids, and a Node
//! program's own primary adds and removes ids as it forks and kills workers (`Want`, `Unwant`).
//! With [`Restart::Program`] a failed worker's id leaves the set, as a Node primary's worker
//! does: the program forks another if it wants one.
//!
//! How the invariant is kept: instead of remembering why each process is there, every handled
//! input ends in [`Lifecycle::reconcile`], which compares what runs with what is wanted. A wanted
//! id with no *candidate* (a process starting, online or ready) gets one, at once or after its
//! backoff; a candidate above the wanted count is drained. A rolling reload is one more rule: an
//! id served only by processes of an older generation gets one replacement at a time.
//!
//! A reload's first replacement is its *canary* ([`Canary`]): it starts with whatever the
//! reload brings (the shell may have read a new command, environment or directory for it:
//! `Action::Spawn { canary: true }`), and nothing else changes until it is ready. Then
//! `Action::CanaryReady` makes that configuration the cluster's, and only then does the first
//! old process leave. A canary that fails (exits, leaves, is not ready in time, cannot start)
//! ends the reload with no old process replaced; every other process started meanwhile ran
//! the previous configuration, and counts as older than the reload.

mod health;
#[cfg(test)]
mod model;
mod primary;
#[cfg(test)]
mod scenarios;
mod snapshot;
#[cfg(test)]
mod world;

use std::{
    collections::{BTreeMap, BTreeSet},
    time::{Duration, Instant},
};

use cluster_common::MAX_WORKERS;
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};

pub use super::events::Retire;
use super::events::{Departure, Event, ExitStatus, Failure, KillReason, Readiness, ReloadError};
use health::Recycling;
use primary::PrimaryPhase;
#[cfg(test)]
use primary::SETTLE;
pub use primary::{Claim, Count, ForkAnswer, Policy};
pub use snapshot::{NotCalm, Snapshot};

/// First restart delay after a failure; doubles per consecutive failure up to [`MAX_BACKOFF`].
pub const FIRST_BACKOFF: Duration = Duration::from_millis(100);
pub const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// A worker that was ready this long before it failed starts its backoff afresh.
pub const STABLE_UPTIME: Duration = Duration::from_secs(10);
/// Consecutive failures that make a crash loop worth an error line (then every as many).
pub const CRASH_LOOP: u32 = 5;
/// How long a draining worker whose channel closed (it closed its servers, as Node does after
/// `disconnect`) may linger before SIGTERM: long enough to exit by itself once its event loop is
/// empty (about 50 ms for Node), short enough that timers cannot keep it around.
pub const LINGER: Duration = Duration::from_secs(1);

/// The durations the machine works with (from the command line).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timing {
    /// How long a worker asked to stop has before SIGKILL.
    pub grace: Duration,
    /// How long a worker that got connections stays out of rotation before it is asked to stop
    /// (`--drain-delay`): a server that drops, when asked, connections it accepted but has not
    /// read yet (uvicorn) finishes them first.
    pub drain_delay: Duration,
    /// When a worker that signals nothing counts as ready.
    pub ready_delay: Duration,
    /// How long any new worker may take to become ready before it is killed. When it is not
    /// longer than `ready_delay`, only workers that signal readiness can be ready in time.
    pub ready_timeout: Duration,
}

/// Who restarts a worker that failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Restart {
    /// cluster-lb, with growing delays (the default).
    #[default]
    Cluster,
    /// Nobody: its id is no longer wanted, as in Node's cluster, whose primary forks another
    /// if it wants one (`--restart program`).
    Program,
}

/// A worker's state, as `status` shows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum WorkerState {
    /// Started; waits for READY=1, `online` or `--ready-delay`.
    Starting,
    /// Said `online`; waits for `listening` (or READY=1).
    Online,
    /// In the active set: it gets new connections.
    Ready,
    /// Out of the active set and stopping; killed after `--grace`.
    Draining,
    /// SIGKILL sent; not yet reaped.
    Killed,
}

impl WorkerState {
    pub const ALL: [WorkerState; 5] = [
        WorkerState::Starting,
        WorkerState::Online,
        WorkerState::Ready,
        WorkerState::Draining,
        WorkerState::Killed,
    ];

    pub fn name(self) -> &'static str {
        match self {
            WorkerState::Starting => "starting",
            WorkerState::Online => "online",
            WorkerState::Ready => "ready",
            WorkerState::Draining => "draining",
            WorkerState::Killed => "killed",
        }
    }
}

impl std::fmt::Display for WorkerState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(self.name())
    }
}

/// One process's phase, with what it waits for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// Ready by the delay at `ready_at` unless it signals first (no delay for a worker that
    /// will signal); killed at `give_up_at`.
    Starting {
        ready_at: Option<Instant>,
        give_up_at: Instant,
    },
    /// Waits for `listening` or READY=1; killed at `give_up_at`.
    Online { give_up_at: Instant },
    /// Ready since `since`; whether it gets connections says `serving`.
    Ready { since: Instant, serving: Serving },
    /// Out of rotation and leaving: asked to stop at `ask_at` (after the drain delay; None once
    /// asked, or when it stops by itself), SIGTERM at `term_at` if its channel closed and it
    /// lingers, SIGKILL at `kill_at`.
    Draining {
        ask_at: Option<Instant>,
        term_at: Option<Instant>,
        kill_at: Instant,
    },
    /// SIGKILL sent; waits to be reaped.
    Killed,
}

impl Phase {
    fn state(self) -> WorkerState {
        match self {
            Phase::Starting { .. } => WorkerState::Starting,
            Phase::Online { .. } => WorkerState::Online,
            Phase::Ready { .. } => WorkerState::Ready,
            Phase::Draining { .. } => WorkerState::Draining,
            Phase::Killed => WorkerState::Killed,
        }
    }

    /// Serves its id, or is about to: an id with a candidate needs no other process.
    fn is_candidate(self) -> bool {
        matches!(
            self,
            Phase::Starting { .. } | Phase::Online { .. } | Phase::Ready { .. }
        )
    }

    fn is_ready(self) -> bool {
        matches!(self, Phase::Ready { .. })
    }

    /// In the kernel's active set.
    fn is_active(self) -> bool {
        matches!(
            self,
            Phase::Ready {
                serving: Serving::Active,
                ..
            }
        )
    }

    /// When a timer fires for this process.
    fn deadline(self) -> Option<Instant> {
        match self {
            Phase::Starting {
                ready_at,
                give_up_at,
            } => Some(ready_at.map_or(give_up_at, |at| at.min(give_up_at))),
            Phase::Online { give_up_at } => Some(give_up_at),
            Phase::Draining {
                ask_at,
                term_at,
                kill_at,
            } => Some(
                [ask_at, term_at]
                    .into_iter()
                    .flatten()
                    .fold(kill_at, Instant::min),
            ),
            Phase::Ready { .. } | Phase::Killed => None,
        }
    }
}

/// Whether a ready process gets new connections.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Serving {
    /// In the kernel's active set.
    #[default]
    Active,
    /// A worker of the program's primary that never listened: it serves nothing, as a Node
    /// worker may, and keeps running.
    Quiet,
    /// Its accept queue stopped draining: out of the active set until it drains again (or it
    /// is found hung and replaced).
    Stalled,
}

/// A worker process.
#[derive(Clone, Debug)]
pub struct Process {
    pub id: u32,
    pub pid: Pid,
    pub started: Instant,
    /// The reload generation it was started in.
    generation: u64,
    phase: Phase,
    /// Whether the program's primary has a `Worker` object for it.
    claim: Claim,
    /// It is to be replaced while it serves (see [`Retire`]).
    retire: Option<Retire>,
}

impl Process {
    pub fn state(&self) -> WorkerState {
        self.phase.state()
    }

    /// In the kernel's active set: it gets new connections.
    #[cfg(test)]
    pub fn is_active(&self) -> bool {
        self.phase.is_active()
    }

    /// Why it is being replaced while it serves, if it is.
    pub fn retiring(&self) -> Option<Retire> {
        self.retire
    }

    /// Out of the active set because its accept queue stalled.
    pub fn is_stalled(&self) -> bool {
        matches!(
            self.phase,
            Phase::Ready {
                serving: Serving::Stalled,
                ..
            }
        )
    }
}

/// What is planned for a worker id besides its processes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
enum Plan {
    #[default]
    Idle,
    /// Start a process for the id then (if it still has none).
    RestartAt(Instant),
    /// A `Spawn` action is out; `Spawned` or `SpawnFailed` comes next.
    Spawning,
}

#[derive(Clone, Debug, Default)]
struct IdRecord {
    plan: Plan,
    /// Consecutive failures (reset by a failure after [`STABLE_UPTIME`] of readiness).
    failures: u32,
    restarts: u32,
    started_before: bool,
    /// Its spawn answers a fork of the program's primary.
    answer_fork: bool,
    /// What it runs (see [`Lifecycle::variant`]).
    variant: u32,
    /// The generation of the process its spawn under way starts: the reload's for its canary
    /// and once the canary was ready, the one before while the canary is pending (that
    /// process runs the previous configuration).
    spawning_generation: u64,
    /// The running primary process forked it (or took it when offered).
    forked: bool,
}

/// A rolling reload under way.
#[derive(Clone, Debug)]
struct Reload {
    /// Processes of older generations get replaced.
    generation: u64,
    /// The id whose replacement is starting.
    replacing: Option<u32>,
    replaced: u32,
    canary: Canary,
}

/// Where a reload's first replacement is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Canary {
    /// Not ready yet (or not started): it alone runs what the reload brings; every other
    /// process, old or restarted meanwhile, runs the previous configuration, and none leaves
    /// for the reload.
    Pending,
    /// It was ready: the reload's configuration is the cluster's, and the reload goes on with
    /// the other ids.
    Ready,
}

/// What the cluster as a whole is doing.
#[derive(Clone, Debug)]
enum Intent {
    Serve,
    Reload(Reload),
    Stop,
}

/// What the primary's own supervisor (systemd's NOTIFY_SOCKET) was last told. The order is
/// fixed: READY=1 once all first workers are ready, then RELOADING=1 and READY=1 around each
/// reload, and STOPPING=1 last, after which nothing is sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Announced {
    Nothing,
    Ready,
    Reloading,
    Stopping,
}

/// What happened, as the I/O shell reports it.
#[derive(Clone, Debug, PartialEq)]
pub enum Input {
    /// A `Spawn { id }` succeeded: the program runs as `pid`, its sockets in `slot`.
    Spawned {
        id: u32,
        pid: Pid,
        slot: u32,
        /// It speaks a protocol that says when it is ready (Node's channel: `online`, then
        /// `listening`), so `--ready-delay` does not apply. Otherwise a slow start (Node under
        /// load can take more than the delay to say `online`) made it ready by the delay,
        /// before it listened.
        signals_readiness: bool,
    },
    /// A `Spawn { id }` failed before the program ran.
    SpawnFailed {
        id: u32,
        error: String,
    },
    /// The worker said `online` on its channel.
    Online {
        pid: Pid,
    },
    /// The worker signalled readiness.
    Ready {
        pid: Pid,
        how: Readiness,
    },
    /// The worker is to leave the active set: it said so, it misbehaved, or it was asked to.
    Leaving {
        pid: Pid,
        why: Departure,
    },
    /// The worker's channel closed (EOF).
    ChannelClosed {
        pid: Pid,
    },
    /// The process was reaped.
    Exited {
        pid: Pid,
        status: ExitStatus,
    },
    /// Time passed (a timer may be due).
    Tick,
    Reload,
    Scale {
        workers: u32,
    },
    /// The program's primary let worker `id` go (killed or disconnected it): it is no longer
    /// wanted (unless `-w` fixes the count), and its processes leave.
    Unwant {
        id: u32,
        why: Departure,
    },
    Stop {
        fast: bool,
    },
    /// The program has a primary branch: run its primary process (once; it is restarted when
    /// it fails). `detected`: the shell guessed so from a worker (see `primary`).
    StartPrimary {
        detected: bool,
    },
    /// Its accept queue stopped draining: out of the active set.
    Stalled {
        pid: Pid,
    },
    /// Its accept queue drains again: back in the active set.
    Unstalled {
        pid: Pid,
    },
    /// Replace it while it serves (replacement first, one at a time).
    Retire {
        pid: Pid,
        why: Retire,
    },
    /// Kill it now (`--max-memory-hard`); its id is restarted as after any failure.
    KillNow {
        pid: Pid,
        reason: KillReason,
    },
    /// The program's primary called `cluster.fork()` for a worker of `variant` (see
    /// [`Lifecycle::variant`]): answered by a `ForkAnswer`.
    Fork {
        variant: u32,
    },
    /// The program's primary takes the worker it was offered: answered by a `ForkAnswer`.
    Adopt {
        pid: Pid,
    },
    /// A `SpawnPrimary` succeeded.
    PrimarySpawned {
        pid: Pid,
    },
    /// A `SpawnPrimary` failed before the program ran.
    PrimarySpawnFailed {
        error: String,
    },
}

/// What the I/O shell is to do, in order.
#[derive(Clone, Debug, PartialEq)]
pub enum Action {
    /// Start a process for worker `id` and answer with `Spawned` or `SpawnFailed`. `canary`:
    /// it is a reload's first replacement, started with what the reload brings (a new
    /// configuration, if the shell read one); every other spawn uses the cluster's current
    /// one.
    Spawn {
        id: u32,
        canary: bool,
    },
    /// Start the program's primary process and answer with `PrimarySpawned` or
    /// `PrimarySpawnFailed`.
    SpawnPrimary,
    /// Put the process's slot in the active set.
    Activate {
        pid: Pid,
    },
    /// Take the process's slot out of the active set.
    Deactivate {
        pid: Pid,
    },
    /// Ask it to stop: its channel's `disconnect`, else SIGTERM.
    AskToStop {
        pid: Pid,
    },
    /// SIGTERM it (a worker, or the primary process).
    Terminate {
        pid: Pid,
    },
    /// SIGKILL it (and its process group; a worker, or the primary process).
    Kill {
        pid: Pid,
    },
    /// It was reaped: free its slot and channels (a worker's, or the primary process's).
    Release {
        pid: Pid,
    },
    /// Tell the program's primary about a worker it did not fork (it sees a `fork` event if it
    /// takes it with `Adopt`).
    Offer {
        id: u32,
        pid: Pid,
    },
    /// Answer the program's primary's fork.
    ForkAnswer(ForkAnswer),
    /// Tell the program's primary that its worker `id` (process `pid`) exited.
    ExitToPrimary {
        id: u32,
        pid: Pid,
        status: ExitStatus,
    },
    /// Tell the primary's own supervisor.
    Notify(Announced),
    Emit(Event),
    /// Answer everyone waiting on the reload.
    ReloadDone(Result<u32, ReloadError>),
    /// The reload's canary (worker `id`, process `pid`) is ready: what it was started with is
    /// the cluster's configuration from now on (for restarts too). Comes before any old
    /// process leaves for the reload; a reload that ends without it changed nothing.
    CanaryReady {
        id: u32,
        pid: Pid,
    },
}

/// The state machine: see the module documentation.
#[derive(Clone, Debug)]
pub struct Lifecycle {
    timing: Timing,
    /// The worker ids that should be served.
    wanted: BTreeSet<u32>,
    /// Ids, restarts and who decides the count.
    policy: Policy,
    /// The one replacement of a process marked to retire under way.
    recycling: Option<Recycling>,
    /// The program's primary process (Node programs with a primary branch).
    primary: PrimaryPhase,
    processes: BTreeMap<Pid, Process>,
    ids: BTreeMap<u32, IdRecord>,
    intent: Intent,
    generation: u64,
    reloads: u64,
    announced: Announced,
    /// The time of the input being handled.
    now: Instant,
    out: Vec<Action>,
}

impl Lifecycle {
    /// A cluster of `wanted` workers (0 while a program's primary has yet to fork any), as
    /// `policy` says.
    pub fn with(wanted: u32, policy: Policy, timing: Timing, now: Instant) -> Lifecycle {
        let first = policy.first_id;
        Lifecycle {
            timing,
            wanted: (first..first + wanted.min(MAX_WORKERS)).collect(),
            policy,
            recycling: None,
            primary: PrimaryPhase::Off,
            processes: BTreeMap::new(),
            ids: BTreeMap::new(),
            intent: Intent::Serve,
            generation: 0,
            reloads: 0,
            announced: Announced::Nothing,
            now,
            out: Vec::new(),
        }
    }

    /// Handles one input at time `now`; returns what to do.
    pub fn handle(&mut self, input: Input, now: Instant) -> Vec<Action> {
        self.now = self.now.max(now);
        match input {
            Input::Spawned {
                id,
                pid,
                slot,
                signals_readiness,
            } => self.spawned(id, pid, slot, signals_readiness),
            Input::SpawnFailed { id, error } => self.spawn_failed(id, error),
            Input::Online { pid } => self.online(pid),
            Input::Ready { pid, how } => self.ready(pid, how),
            Input::Leaving { pid, why } => self.leaving(pid, why),
            Input::ChannelClosed { pid } => self.channel_closed(pid),
            Input::Exited { pid, status } => self.exited(pid, status),
            Input::Tick => {}
            Input::Reload => self.begin_reload(),
            Input::Scale { workers } => self.scale(workers),
            Input::Unwant { id, why } => self.unwant(id, why),
            Input::Stop { fast } => self.stop(fast),
            Input::StartPrimary { detected } => self.start_primary(detected),
            Input::Fork { variant } => self.fork(variant),
            Input::Stalled { pid } => self.stalled(pid),
            Input::Unstalled { pid } => self.unstalled(pid),
            Input::Retire { pid, why } => self.retire(pid, why),
            Input::KillNow { pid, reason } => self.kill_now(pid, reason),
            Input::Adopt { pid } => self.adopt(pid),
            Input::PrimarySpawned { pid } => self.primary_spawned(pid),
            Input::PrimarySpawnFailed { error } => self.primary_spawn_failed(error),
        }
        self.reconcile();
        std::mem::take(&mut self.out)
    }

    /// When the next timer is due: handle a `Tick` then.
    pub fn next_deadline(&self) -> Option<Instant> {
        let processes = self.processes.values().filter_map(|p| p.phase.deadline());
        let restarts = self.ids.values().filter_map(|r| match r.plan {
            Plan::RestartAt(at) => Some(at),
            _ => None,
        });
        processes
            .chain(restarts)
            .chain(self.primary.deadline())
            .chain(self.recycling.as_ref().and_then(|r| r.retry_at))
            .min()
    }

    pub fn processes(&self) -> impl Iterator<Item = &Process> {
        self.processes.values()
    }

    pub fn process(&self, pid: Pid) -> Option<&Process> {
        self.processes.get(&pid)
    }

    /// How many workers are wanted.
    pub fn wanted(&self) -> u32 {
        self.wanted.len() as u32
    }

    /// Which worker ids are wanted.
    pub fn wanted_ids(&self) -> impl Iterator<Item = u32> + '_ {
        self.wanted.iter().copied()
    }

    /// The lowest worker id.
    pub fn first_id(&self) -> u32 {
        self.policy.first_id
    }

    pub fn reloads(&self) -> u64 {
        self.reloads
    }

    /// What the primary's own supervisor was last told.
    pub fn announced(&self) -> Announced {
        self.announced
    }

    pub fn is_reloading(&self) -> bool {
        matches!(self.intent, Intent::Reload(_))
    }

    pub fn is_stopping(&self) -> bool {
        matches!(self.intent, Intent::Stop)
    }

    /// Stopping, and every process (the primary's too) has been reaped.
    pub fn is_finished(&self) -> bool {
        self.is_stopping() && self.processes.is_empty() && self.primary == PrimaryPhase::Off
    }

    /// Restarts of worker `id` so far (not counting reload replacements).
    pub fn restarts(&self, id: u32) -> u32 {
        self.ids.get(&id).map_or(0, |r| r.restarts)
    }

    // ---- inputs -------------------------------------------------------------------------

    fn spawned(&mut self, id: u32, pid: Pid, slot: u32, signals_readiness: bool) {
        let record = self.ids.entry(id).or_default();
        record.plan = Plan::Idle;
        let generation = record.spawning_generation;
        let phase = Phase::Starting {
            ready_at: (!signals_readiness).then(|| self.now + self.timing.ready_delay),
            give_up_at: self.now + self.timing.ready_timeout,
        };
        self.processes.insert(
            pid,
            Process {
                id,
                pid,
                started: self.now,
                generation,
                phase,
                claim: Claim::No,
                retire: None,
            },
        );
        self.fork_spawned(id, Ok(pid));
        self.emit(Event::Fork {
            id,
            pid: pid.as_raw(),
            slot,
        });
        if self.is_stopping() {
            self.depart(pid, Departure::Stopping);
        }
    }

    fn spawn_failed(&mut self, id: u32, error: String) {
        self.ids.entry(id).or_default().plan = Plan::Idle;
        self.fork_spawned(id, Err(&error));
        self.emit(Event::StartFailed {
            id,
            error: error.clone(),
        });
        if matches!(&self.intent, Intent::Reload(r) if r.replacing == Some(id)) {
            self.end_reload(Err(ReloadError::StartFailed {
                id,
                error: error.clone(),
            }));
        }
        self.failed(id, Duration::ZERO, Failure::StartFailed(error));
    }

    fn online(&mut self, pid: Pid) {
        let Some(process) = self.processes.get_mut(&pid) else {
            return;
        };
        if let Phase::Starting { give_up_at, .. } = process.phase {
            process.phase = Phase::Online { give_up_at };
            let id = process.id;
            self.emit(Event::Online {
                id,
                pid: pid.as_raw(),
            });
        }
    }

    /// Whether `how` makes a worker ready under this policy: with `--wait-ready` only its
    /// `'ready'` message does, not `listening`; without it, that message is a message like any
    /// other (an app written for PM2 may send it right after it listens).
    fn counts(&self, how: Readiness) -> bool {
        match how {
            Readiness::Listening => !self.policy.wait_ready,
            Readiness::Message => self.policy.wait_ready,
            Readiness::Notify | Readiness::Delay => true,
        }
    }

    fn ready(&mut self, pid: Pid, how: Readiness) {
        if !self.counts(how) {
            return;
        }
        let Some(process) = self.processes.get_mut(&pid) else {
            return;
        };
        if let Phase::Ready {
            serving: serving @ Serving::Quiet,
            ..
        } = &mut process.phase
        {
            // A quiet worker listens after all: it gets connections from now on.
            *serving = Serving::Active;
            self.out.push(Action::Activate { pid });
            return;
        }
        if !matches!(process.phase, Phase::Starting { .. } | Phase::Online { .. }) {
            return;
        }
        process.phase = Phase::Ready {
            since: self.now,
            serving: Serving::Active,
        };
        let id = process.id;
        self.out.push(Action::Activate { pid });
        self.emit(Event::Ready {
            id,
            pid: pid.as_raw(),
            reason: how,
        });
    }

    fn leaving(&mut self, pid: Pid, why: Departure) {
        let Some(process) = self.processes.get(&pid) else {
            return;
        };
        if !process.phase.is_candidate() {
            return;
        }
        let (id, ready_for) = (process.id, self.ready_for(process));
        let pending_replacement = self.is_pending_replacement(process);
        self.depart(pid, why.clone());
        if pending_replacement {
            self.end_reload(Err(ReloadError::ReplacementLeft {
                id,
                pid: pid.as_raw(),
                why: why.clone(),
            }));
        }
        if why.is_failure() {
            self.failed(id, ready_for, Failure::Departed(why));
        }
    }

    /// A draining worker that closed its channel has closed its servers: it gets [`LINGER`] to
    /// exit by itself, then SIGTERM (what Node's own `worker.destroy()` does on `disconnect`).
    /// Only a worker cluster-lb asked to stop: one that leaves by itself or that the program
    /// let go has its term_at set already (see depart).
    fn channel_closed(&mut self, pid: Pid) {
        let now = self.now;
        if let Some(process) = self.processes.get_mut(&pid) {
            if let Phase::Draining {
                term_at: term_at @ None,
                ..
            } = &mut process.phase
            {
                *term_at = Some(now + LINGER);
            }
        }
    }

    fn exited(&mut self, pid: Pid, status: ExitStatus) {
        if self.primary_pid() == Some(pid) {
            self.primary_exited(pid, status);
            return;
        }
        let Some(process) = self.processes.get(&pid) else {
            return;
        };
        let pending_replacement = self.is_pending_replacement(process);
        let ready_for = self.ready_for(process);
        let Some(process) = self.processes.remove(&pid) else {
            return;
        };
        if process.claim == Claim::Claimed {
            self.out.push(Action::ExitToPrimary {
                id: process.id,
                pid,
                status,
            });
        }
        self.out.push(Action::Release { pid });
        self.emit(Event::Exit {
            id: process.id,
            pid: pid.as_raw(),
            status,
            uptime: self.now.saturating_duration_since(process.started),
            asked: !process.phase.is_candidate(),
        });
        if !process.phase.is_candidate() {
            return; // asked to go, and went
        }
        if pending_replacement {
            self.end_reload(Err(ReloadError::ReplacementExited {
                id: process.id,
                pid: pid.as_raw(),
                status,
            }));
        }
        self.failed(process.id, ready_for, Failure::Exited(status));
    }

    fn begin_reload(&mut self) {
        match self.intent {
            Intent::Stop => {
                self.out
                    .push(Action::ReloadDone(Err(ReloadError::Stopping)));
                return;
            }
            Intent::Reload(_) => return, // the caller joins the reload under way
            Intent::Serve => {}
        }
        self.generation += 1;
        self.reloads += 1;
        self.intent = Intent::Reload(Reload {
            generation: self.generation,
            replacing: None,
            replaced: 0,
            canary: Canary::Pending,
        });
        let workers = self
            .processes
            .values()
            .filter(|p| p.phase.is_candidate())
            .count() as u32;
        self.emit(Event::ReloadStarted { workers });
        if self.announced == Announced::Ready {
            self.announce(Announced::Reloading);
        }
    }

    /// N workers: the lowest free ids are added, the highest wanted ones leave.
    fn scale(&mut self, workers: u32) {
        let workers = workers.clamp(1, MAX_WORKERS);
        let from = self.wanted();
        if self.is_stopping() || workers == from {
            return;
        }
        self.emit(Event::Scaling { from, to: workers });
        let mut next = self.policy.first_id;
        while self.wanted() < workers {
            if self.wanted.insert(next) {
                self.ids.remove(&next);
            }
            next += 1;
        }
        while self.wanted() > workers {
            if let Some(highest) = self.wanted.pop_last() {
                // Its record goes: wanting it again starts it afresh.
                self.ids.remove(&highest);
            }
        }
    }

    fn want(&mut self, id: u32) {
        if self.is_stopping() || self.wanted.contains(&id) || self.wanted() >= MAX_WORKERS {
            return;
        }
        // No `scaling` event: a program's fork is how its cluster starts, not a change.
        self.wanted.insert(id);
        self.ids.remove(&id);
    }

    fn unwant(&mut self, id: u32, why: Departure) {
        if self.policy.count == Count::Fixed && why == Departure::LetGo {
            // `-w` decides: the process goes (the program signals or disconnects it), and its
            // id is served again, as after a failure.
            return;
        }
        if self.is_stopping() || !self.wanted.remove(&id) {
            return;
        }
        self.ids.remove(&id);
        self.depart_id(id, &why);
    }

    /// Every process that serves worker `id` (starting or ready) leaves.
    fn depart_id(&mut self, id: u32, why: &Departure) {
        let serving: Vec<Pid> = self
            .processes
            .values()
            .filter(|p| p.id == id && p.phase.is_candidate())
            .map(|p| p.pid)
            .collect();
        for pid in serving {
            self.depart(pid, why.clone());
        }
    }

    fn stop(&mut self, fast: bool) {
        if self.is_stopping() {
            // A second request does not wait any longer.
            self.kill_all(KillReason::StopNow);
            self.stop_primary(true);
            return;
        }
        let previous = std::mem::replace(&mut self.intent, Intent::Stop);
        // Every process goes: nothing is replaced any more.
        self.recycling = None;
        if let Intent::Reload(_) = previous {
            let outcome = Err(ReloadError::Stopping);
            self.emit(Event::ReloadFinished {
                outcome: outcome.clone(),
            });
            self.out.push(Action::ReloadDone(outcome));
        }
        self.ids.values_mut().for_each(|r| r.plan = Plan::Idle);
        self.announce(Announced::Stopping);
        self.emit(Event::Stopping {
            workers: self.processes.len() as u32,
            grace: (!fast).then_some(self.timing.grace),
        });
        self.stop_primary(fast);
        if fast {
            self.kill_all(KillReason::StopNow);
            return;
        }
        let serving: Vec<Pid> = self
            .processes
            .values()
            .filter(|p| p.phase.is_candidate())
            .map(|p| p.pid)
            .collect();
        for pid in serving {
            self.depart(pid, Departure::Stopping);
        }
    }

    // ---- rules --------------------------------------------------------------------------

    /// Runs after every input: fires due timers, then makes what runs match what is wanted.
    fn reconcile(&mut self) {
        self.fire_timers();
        if self.is_stopping() {
            return;
        }
        let surplus: Vec<Pid> = self
            .processes
            .values()
            .filter(|p| !self.wanted.contains(&p.id) && p.phase.is_candidate())
            .map(|p| p.pid)
            .collect();
        for pid in surplus {
            self.depart(pid, Departure::ScaledDown);
        }
        let wanted: Vec<u32> = self.wanted_ids().collect();
        for id in wanted {
            self.keep_served(id);
        }
        // A retirement under way first: when it ends (done, or its process gone), a reload
        // waiting for its id goes on in this same pass rather than at some later input.
        self.advance_retirement();
        self.advance_reload();
        self.offer();
        if self.announced == Announced::Nothing
            && !self.wanted.is_empty()
            && self.ready_ids() >= self.wanted()
        {
            self.announce(Announced::Ready);
        }
    }

    /// A wanted id with no candidate gets one: at once, or when its backoff is over.
    fn keep_served(&mut self, id: u32) {
        let served = self.has_candidate(id);
        let now = self.now;
        let record = self.ids.entry(id).or_default();
        match record.plan {
            Plan::Spawning => return,
            Plan::RestartAt(at) if at > now => return,
            Plan::RestartAt(_) | Plan::Idle if served => {
                record.plan = Plan::Idle;
                return;
            }
            Plan::RestartAt(_) => {}
            Plan::Idle if record.started_before => {
                // Left without failing (asked to go): replace at once.
                record.restarts += 1;
                self.emit(Event::Restart {
                    id,
                    delay: Duration::ZERO,
                });
            }
            Plan::Idle => {}
        }
        self.spawn(id);
    }

    fn spawn(&mut self, id: u32) {
        let pending = matches!(&self.intent, Intent::Reload(r) if r.canary == Canary::Pending);
        let canary =
            pending && matches!(&self.intent, Intent::Reload(r) if r.replacing == Some(id));
        // While a reload's canary is not ready, every other new process runs the previous
        // configuration: it is older than the reload, which replaces it in its turn.
        let generation = match pending && !canary {
            true => self.generation.saturating_sub(1),
            false => self.generation,
        };
        let record = self.ids.entry(id).or_default();
        record.plan = Plan::Spawning;
        record.started_before = true;
        record.spawning_generation = generation;
        self.out.push(Action::Spawn { id, canary });
    }

    /// Replaces the processes of older generations, one id at a time: the old one leaves only
    /// once its replacement is ready.
    fn advance_reload(&mut self) {
        let Intent::Reload(reload) = &self.intent else {
            return;
        };
        let (generation, replacing) = (reload.generation, reload.replacing);
        if let Some(id) = replacing.filter(|id| self.wanted.contains(id)) {
            if self.ids.get(&id).is_some_and(|r| r.plan == Plan::Spawning) {
                return;
            }
            let replacement = self
                .processes
                .values()
                .find(|p| p.id == id && p.generation == generation && p.phase.is_candidate());
            match replacement.map(|p| p.phase.is_ready()) {
                Some(false) => return, // still starting
                Some(true) => {
                    if let Some(canary) = replacement.filter(|_| {
                        matches!(&self.intent, Intent::Reload(r) if r.canary == Canary::Pending)
                    }) {
                        let (id, pid) = (canary.id, canary.pid);
                        if let Intent::Reload(reload) = &mut self.intent {
                            reload.canary = Canary::Ready;
                        }
                        self.out.push(Action::CanaryReady { id, pid });
                    }
                    let old: Vec<Pid> = self
                        .processes
                        .values()
                        .filter(|p| p.id == id && p.generation < generation)
                        .filter(|p| p.phase.is_candidate())
                        .map(|p| p.pid)
                        .collect();
                    for pid in old {
                        self.depart(pid, Departure::Replaced);
                    }
                    if let Intent::Reload(reload) = &mut self.intent {
                        reload.replaced += 1;
                    }
                }
                None => {} // gone (asked to leave); its id is served afresh by the rules above
            }
        }
        let next = self.wanted.iter().copied().find(|&id| {
            let idle = self.ids.get(&id).is_none_or(|r| r.plan == Plan::Idle);
            let candidates = || {
                self.processes
                    .values()
                    .filter(move |p| p.id == id && p.phase.is_candidate())
            };
            idle && !self.is_recycling(id)
                && candidates().any(|p| p.generation < generation)
                && !candidates().any(|p| p.generation == generation)
        });
        let retiring = self.recycling.is_some();
        // A process of the previous configuration on its way (spawned while the canary was
        // pending): the reload replaces it once it runs.
        let older_coming = self
            .ids
            .values()
            .any(|r| r.plan == Plan::Spawning && r.spawning_generation < generation);
        let Intent::Reload(reload) = &mut self.intent else {
            return;
        };
        reload.replacing = next;
        match next {
            Some(id) => self.spawn(id),
            // The id being replaced for a health limit is the reload's once that is done.
            None if retiring || older_coming => {}
            // A reload that replaced nothing did not do what it was asked: say so.
            None => {
                let outcome = match reload.replaced {
                    0 => Err(ReloadError::NothingRunning {
                        wanted: self.wanted(),
                    }),
                    replaced => Ok(replaced),
                };
                self.end_reload(outcome);
            }
        }
    }

    fn end_reload(&mut self, outcome: Result<u32, ReloadError>) {
        if !self.is_reloading() {
            return;
        }
        self.intent = Intent::Serve;
        self.emit(Event::ReloadFinished {
            outcome: outcome.clone(),
        });
        self.out.push(Action::ReloadDone(outcome));
        if self.announced == Announced::Reloading {
            self.announce(Announced::Ready);
        }
    }

    /// Ready by delay, not ready in time, or grace over.
    fn fire_timers(&mut self) {
        self.fire_primary_timer();
        let now = self.now;
        let due: Vec<(Pid, Phase)> = self
            .processes
            .values()
            .filter(|p| p.phase.deadline().is_some_and(|at| at <= now))
            .map(|p| (p.pid, p.phase))
            .collect();
        for (pid, phase) in due {
            match phase {
                Phase::Starting {
                    ready_at: Some(ready_at),
                    ..
                } if ready_at <= now => self.ready(pid, Readiness::Delay),
                Phase::Online { .. } if self.is_claimed(pid) => self.quiet(pid),
                Phase::Starting { .. } | Phase::Online { .. } => self.not_ready_in_time(pid),
                Phase::Draining { kill_at, .. } if kill_at <= now => {
                    self.kill(pid, KillReason::GraceOver(self.timing.grace))
                }
                Phase::Draining {
                    ask_at,
                    term_at,
                    kill_at,
                } => {
                    let asks = ask_at.is_some_and(|at| at <= now);
                    let terminates = term_at.is_some_and(|at| at <= now);
                    if let Some(process) = self.processes.get_mut(&pid) {
                        process.phase = Phase::Draining {
                            ask_at: ask_at.filter(|_| !asks),
                            term_at: term_at.filter(|_| !terminates),
                            kill_at,
                        };
                    }
                    if asks {
                        self.out.push(Action::AskToStop { pid });
                    }
                    if terminates {
                        self.out.push(Action::Terminate { pid });
                    }
                }
                Phase::Ready { .. } | Phase::Killed => {}
            }
        }
    }

    /// A worker the program's primary forked that is online but never listened: it serves
    /// nothing (a scheduler, a queue consumer), as Node allows. It stays, out of the active
    /// set, and counts as ready.
    fn quiet(&mut self, pid: Pid) {
        let Some(process) = self.processes.get_mut(&pid) else {
            return;
        };
        process.phase = Phase::Ready {
            since: self.now,
            serving: Serving::Quiet,
        };
        let (id, after) = (process.id, self.timing.ready_timeout);
        self.emit(Event::Quiet {
            id,
            pid: pid.as_raw(),
            after,
        });
    }

    fn not_ready_in_time(&mut self, pid: Pid) {
        let Some(process) = self.processes.get(&pid) else {
            return;
        };
        let id = process.id;
        let pending_replacement = self.is_pending_replacement(process);
        let timeout = self.timing.ready_timeout;
        let reason = match process.phase {
            Phase::Online { .. } if self.policy.wait_ready => KillReason::NeverSentReady(timeout),
            Phase::Online { .. } => KillReason::NeverListened(timeout),
            _ => KillReason::NotReadyInTime(timeout),
        };
        self.kill(pid, reason);
        if pending_replacement {
            self.end_reload(Err(ReloadError::NotReadyInTime {
                id,
                pid: pid.as_raw(),
                timeout,
            }));
        }
        self.failed(id, Duration::ZERO, Failure::NotReady);
    }

    /// A failure of worker `id` (a process exited or left unasked, or never got going):
    /// count it, report a crash loop, and restart after the backoff if nothing serves the id.
    fn failed(&mut self, id: u32, ready_for: Duration, last: Failure) {
        if self.is_stopping() || !self.wanted.contains(&id) {
            return;
        }
        if self.policy.restart == Restart::Program {
            // The program's primary decides: Node's cluster restarts nothing by itself.
            self.wanted.remove(&id);
            self.ids.remove(&id);
            return;
        }
        let served = self.has_candidate(id);
        let now = self.now;
        let record = self.ids.entry(id).or_default();
        record.failures = if ready_for >= STABLE_UPTIME {
            1
        } else {
            record.failures + 1
        };
        let failures = record.failures;
        let restart = !served && record.plan != Plan::Spawning;
        let delay = backoff(failures);
        if restart {
            record.plan = Plan::RestartAt(now + delay);
            record.restarts += 1;
        }
        if failures >= CRASH_LOOP && failures.is_multiple_of(CRASH_LOOP) {
            self.emit(Event::CrashLoop { id, failures, last });
        }
        if restart {
            self.emit(Event::Restart { id, delay });
        }
    }

    /// Out of the active set, asked to stop (unless it leaves by itself) at once or, if it got
    /// connections, after the drain delay; SIGKILL a grace after the ask.
    fn depart(&mut self, pid: Pid, why: Departure) {
        let (grace, drain_delay) = (self.timing.grace, self.timing.drain_delay);
        let now = self.now;
        let Some(process) = self.processes.get_mut(&pid) else {
            return;
        };
        if !process.phase.is_candidate() {
            return;
        }
        let was_active = process.phase.is_active();
        let asks = why.asks_to_stop();
        let delay = if was_active && asks {
            drain_delay
        } else {
            Duration::ZERO
        };
        let kill_at = now + delay + grace;
        process.phase = Phase::Draining {
            ask_at: (asks && !delay.is_zero()).then_some(now + delay),
            // A worker that leaves by itself, or that the program's primary let go
            // (`worker.disconnect()`), lives on under Node until its event loop is empty,
            // however long its connections last: its channel closing starts no LINGER. Only
            // --grace bounds it (SIGKILL at kill_at, which comes first).
            term_at: (!asks).then_some(kill_at),
            kill_at,
        };
        let id = process.id;
        if was_active {
            self.out.push(Action::Deactivate { pid });
        }
        if asks && delay.is_zero() {
            self.out.push(Action::AskToStop { pid });
        }
        self.emit(Event::Disconnect {
            id,
            pid: pid.as_raw(),
            reason: why,
        });
    }

    fn kill(&mut self, pid: Pid, reason: KillReason) {
        let Some(process) = self.processes.get_mut(&pid) else {
            return;
        };
        if process.phase == Phase::Killed {
            return;
        }
        let was_active = process.phase.is_active();
        process.phase = Phase::Killed;
        let id = process.id;
        if was_active {
            self.out.push(Action::Deactivate { pid });
        }
        self.out.push(Action::Kill { pid });
        self.emit(Event::Kill {
            id,
            pid: pid.as_raw(),
            reason,
        });
    }

    fn kill_all(&mut self, reason: KillReason) {
        let pids: Vec<Pid> = self.processes.keys().copied().collect();
        for pid in pids {
            self.kill(pid, reason);
        }
    }

    fn announce(&mut self, next: Announced) {
        if self.announced == Announced::Stopping || self.announced == next {
            return;
        }
        self.announced = next;
        self.out.push(Action::Notify(next));
    }

    fn emit(&mut self, event: Event) {
        self.out.push(Action::Emit(event));
    }

    // ---- queries ------------------------------------------------------------------------

    fn has_candidate(&self, id: u32) -> bool {
        self.processes
            .values()
            .any(|p| p.id == id && p.phase.is_candidate())
    }

    /// Distinct wanted ids with a ready process.
    fn ready_ids(&self) -> u32 {
        let mut ids: Vec<u32> = self
            .processes
            .values()
            .filter(|p| p.phase.is_ready() && self.wanted.contains(&p.id))
            .map(|p| p.id)
            .collect();
        ids.sort_unstable();
        ids.dedup();
        ids.len() as u32
    }

    /// The reload's replacement that is not ready yet.
    fn is_pending_replacement(&self, process: &Process) -> bool {
        matches!(&self.intent, Intent::Reload(r)
            if r.replacing == Some(process.id)
                && process.generation == r.generation
                && !process.phase.is_ready())
    }

    /// How long it has been ready (zero if it never was): a long-ready worker's failure starts
    /// the backoff afresh, one that never got ready does not.
    fn ready_for(&self, process: &Process) -> Duration {
        match process.phase {
            Phase::Ready { since, .. } => self.now.saturating_duration_since(since),
            _ => Duration::ZERO,
        }
    }
}

/// 100 ms, 200 ms, 400 ms, ... up to 30 s.
pub fn backoff(consecutive_failures: u32) -> Duration {
    let doublings = consecutive_failures.saturating_sub(1).min(16);
    FIRST_BACKOFF
        .saturating_mul(1 << doublings)
        .min(MAX_BACKOFF)
}
