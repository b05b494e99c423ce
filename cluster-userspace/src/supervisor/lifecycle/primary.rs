//! The program's primary process (a Node program's `cluster.isPrimary` branch, which cluster-lb
//! runs once, under its own `cluster.fork()`), and which worker each of its forks gets.
//!
//! The rules, all here:
//! - It is started when the shell learns the program has a primary branch, restarted with the
//!   workers' backoff when it fails (the workers keep serving meanwhile), and its exit with
//!   status 0 ends the cluster, as a Node program ends when its primary does. One started on a
//!   guess (`StartPrimary { detected: true }`) that exits without forking a worker was a wrong
//!   guess: it is not started again.
//! - A fork takes, in this order: a running worker the primary has no `Worker` object for (the
//!   workers started before it, or replacements cluster-lb started: a program that forks again
//!   from its `exit` handler gets the replacement, so it never grows past its count); a wanted
//!   id waiting for its restart (started now); else a new id ([`Count::Program`]) or a refusal
//!   ([`Count::Fixed`]: `-w` decides how many).
//! - Once the primary has run for [`SETTLE`], a worker it has not forked is offered to it (it
//!   sees a `fork` event), except with [`Count::Program`] right after the primary started: the
//!   workers it did not fork by then are not its, and leave.

use std::time::{Duration, Instant};

use nix::unistd::Pid;

use super::{Action, Departure, Event, ExitStatus, Lifecycle, Plan, Restart, STABLE_UPTIME};
use crate::supervisor::lifecycle::backoff;

/// How long a new primary process has to fork its workers before the workers it did not fork
/// are settled: offered to it, or (its forks decide the count) retired. A program forks in its
/// first turns of the event loop; a large one takes a second or two to load first.
pub const SETTLE: Duration = Duration::from_secs(5);

/// Who decides how many workers there are once the program's primary runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Count {
    /// `-w` (or the default): cluster-lb keeps that many; the primary's forks take them, and a
    /// worker it kills is replaced.
    #[default]
    Fixed,
    /// The program's forks, as in Node: a worker it kills or disconnects stays gone.
    Program,
}

/// What the command line decides about ids, restarts and the count.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Policy {
    /// The lowest id: 0, or 1 for Node programs, whose `cluster.worker.id` counts from 1.
    pub first_id: u32,
    pub restart: Restart,
    pub count: Count,
    /// `--wait-ready` (PM2's `wait_ready`): a worker is ready when it sends the message
    /// `"ready"`, not when it says `listening` (an app that listens before it can serve: it
    /// warms a cache, opens its database).
    pub wait_ready: bool,
}

/// Whether the program's primary has a `Worker` object for a process.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Claim {
    /// No (no primary runs, or it has not forked this one).
    #[default]
    No,
    /// It was offered to the primary, which has not taken it yet.
    Offered,
    /// Yes: the primary's `cluster.workers` has it.
    Claimed,
}

/// The answer to a fork of the program's primary.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ForkAnswer {
    /// Its `Worker` is process `pid`, worker `id`.
    Bound { id: u32, pid: Pid },
    /// Nothing for it, and why (one line).
    Refused(String),
}

/// The primary process's phase.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum PrimaryPhase {
    /// None is wanted (the program has no primary branch, or it is done).
    Off,
    /// A `SpawnPrimary` is out.
    Spawning { failures: u32, detected: bool },
    Running {
        pid: Pid,
        since: Instant,
        /// Failures in a row before this run.
        failures: u32,
        /// Started on a guess (a worker read `cluster.isPrimary`).
        detected: bool,
        /// It forked at least once.
        forked: bool,
        /// The workers it did not fork were settled (see [`SETTLE`]).
        settled: bool,
    },
    /// It failed; started again then.
    RestartAt {
        at: Instant,
        failures: u32,
        detected: bool,
    },
    /// Asked to stop (SIGTERM); SIGKILL then.
    Stopping { pid: Pid, kill_at: Instant },
    /// SIGKILL sent; waits to be reaped.
    Killed { pid: Pid },
}

impl PrimaryPhase {
    pub(super) fn deadline(self) -> Option<Instant> {
        match self {
            PrimaryPhase::RestartAt { at, .. } => Some(at),
            PrimaryPhase::Stopping { kill_at, .. } => Some(kill_at),
            PrimaryPhase::Running {
                since,
                settled: false,
                ..
            } => Some(since + SETTLE),
            _ => None,
        }
    }

    pub(super) fn pid(self) -> Option<Pid> {
        match self {
            PrimaryPhase::Running { pid, .. }
            | PrimaryPhase::Stopping { pid, .. }
            | PrimaryPhase::Killed { pid } => Some(pid),
            _ => None,
        }
    }
}

impl Lifecycle {
    pub(super) fn start_primary(&mut self, detected: bool) {
        if self.primary == PrimaryPhase::Off && !self.is_stopping() {
            self.primary = PrimaryPhase::Spawning {
                failures: 0,
                detected,
            };
            self.out.push(Action::SpawnPrimary);
        }
    }

    pub(super) fn primary_spawned(&mut self, pid: Pid) {
        let PrimaryPhase::Spawning { failures, detected } = self.primary else {
            return;
        };
        self.primary = PrimaryPhase::Running {
            pid,
            since: self.now,
            failures,
            detected,
            forked: false,
            settled: false,
        };
        self.emit(Event::PrimaryStarted { pid: pid.as_raw() });
        if self.is_stopping() {
            self.stop_primary(false);
        }
    }

    /// The primary could not be started: again after the backoff.
    pub(super) fn primary_spawn_failed(&mut self, error: String) {
        let PrimaryPhase::Spawning { failures, detected } = self.primary else {
            return;
        };
        if self.is_stopping() {
            self.primary = PrimaryPhase::Off;
            return;
        }
        let failures = failures + 1;
        let delay = backoff(failures);
        self.primary = PrimaryPhase::RestartAt {
            at: self.now + delay,
            failures,
            detected,
        };
        self.emit(Event::PrimaryFailed { error, delay });
    }

    pub(super) fn primary_exited(&mut self, pid: Pid, status: ExitStatus) {
        let phase = self.primary;
        self.primary = PrimaryPhase::Off;
        self.out.push(Action::Release { pid });
        // Its `cluster.workers` went with it: the next primary forks (or is offered) them anew.
        for process in self.processes.values_mut() {
            process.claim = Claim::No;
        }
        for record in self.ids.values_mut() {
            record.forked = false;
        }
        let pid = pid.as_raw();
        let PrimaryPhase::Running {
            since,
            failures,
            detected,
            forked,
            ..
        } = phase
        else {
            // Asked to stop, and stopped.
            self.emit(Event::PrimaryExit {
                pid,
                status,
                restart: None,
            });
            return;
        };
        if detected && !forked {
            self.emit(Event::PrimaryUnused { pid, status });
            return;
        }
        if status == ExitStatus::Code(0) {
            // The program is done, as a Node program ends when its primary does.
            self.emit(Event::PrimaryExit {
                pid,
                status,
                restart: None,
            });
            self.stop(false);
            return;
        }
        let ran = self.now.saturating_duration_since(since);
        let failures = if ran >= STABLE_UPTIME {
            1
        } else {
            failures + 1
        };
        let delay = backoff(failures);
        self.primary = PrimaryPhase::RestartAt {
            at: self.now + delay,
            failures,
            detected,
        };
        self.emit(Event::PrimaryExit {
            pid,
            status,
            restart: Some(delay),
        });
    }

    /// SIGTERM (SIGKILL after `--grace`), or at once SIGKILL when `fast`.
    pub(super) fn stop_primary(&mut self, fast: bool) {
        match self.primary {
            PrimaryPhase::Running { pid, .. } | PrimaryPhase::Stopping { pid, .. } if fast => {
                self.primary = PrimaryPhase::Killed { pid };
                self.out.push(Action::Kill { pid });
            }
            PrimaryPhase::Running { pid, .. } => {
                self.primary = PrimaryPhase::Stopping {
                    pid,
                    kill_at: self.now + self.timing.grace,
                };
                self.out.push(Action::Terminate { pid });
            }
            PrimaryPhase::Spawning { .. } | PrimaryPhase::RestartAt { .. } => {
                self.primary = PrimaryPhase::Off;
            }
            PrimaryPhase::Off | PrimaryPhase::Stopping { .. } | PrimaryPhase::Killed { .. } => {}
        }
    }

    /// The primary's timers: its restart, its settling, or SIGKILL after the grace period.
    pub(super) fn fire_primary_timer(&mut self) {
        let now = self.now;
        match self.primary {
            PrimaryPhase::RestartAt {
                at,
                failures,
                detected,
            } if at <= now && !self.is_stopping() => {
                self.primary = PrimaryPhase::Spawning { failures, detected };
                self.out.push(Action::SpawnPrimary);
            }
            PrimaryPhase::Running {
                since,
                settled: false,
                ..
            } if since + SETTLE <= now => {
                if let PrimaryPhase::Running { settled, .. } = &mut self.primary {
                    *settled = true;
                }
                self.settle_unforked();
            }
            PrimaryPhase::Stopping { pid, kill_at } if kill_at <= now => {
                self.primary = PrimaryPhase::Killed { pid };
                self.out.push(Action::Kill { pid });
            }
            _ => {}
        }
    }

    /// The primary has had its time to fork: with [`Count::Program`], the worker ids it did
    /// not fork leave (the program decides how many: workers that ran before it, of its
    /// command line's program, are not its); replacements of ids it forked are offered by
    /// [`Lifecycle::offer`].
    fn settle_unforked(&mut self) {
        if self.policy.count != Count::Program {
            return;
        }
        let unforked: Vec<u32> = self
            .wanted
            .iter()
            .copied()
            .filter(|id| !self.ids.get(id).is_some_and(|r| r.forked))
            .collect();
        for id in unforked {
            self.unwant(id, Departure::NotForked);
        }
    }

    /// Offers the primary each worker it has no `Worker` for, once it has settled: workers
    /// cluster-lb started by itself (restarts, reload replacements, scaling up). A replacement
    /// waits until the process it replaces is gone from the primary's `cluster.workers`, so that
    /// a fork from the program's `exit` handler takes it.
    pub(super) fn offer(&mut self) {
        if !matches!(self.primary, PrimaryPhase::Running { settled: true, .. })
            || self.is_stopping()
        {
            return;
        }
        // One per id (the oldest first: during a reload, the one that serves), and none for
        // an id whose process the primary has or was offered.
        let mut taken: std::collections::BTreeSet<u32> = self
            .processes
            .values()
            .filter(|p| p.claim != Claim::No)
            .map(|p| p.id)
            .collect();
        let mut candidates: Vec<&super::Process> = self
            .processes
            .values()
            .filter(|p| p.claim == Claim::No && p.phase.is_candidate())
            .collect();
        candidates.sort_by_key(|p| p.started);
        let offers: Vec<(u32, Pid)> = candidates
            .into_iter()
            .filter(|p| taken.insert(p.id))
            .map(|p| (p.id, p.pid))
            .collect();
        for (id, pid) in offers {
            if let Some(process) = self.processes.get_mut(&pid) {
                process.claim = Claim::Offered;
            }
            self.out.push(Action::Offer { id, pid });
        }
    }

    /// The program's primary called `cluster.fork()`, for a worker of `variant` (what it runs
    /// with: 0 is the command line's program and environment, others are the shell's).
    pub(super) fn fork(&mut self, variant: u32) {
        let PrimaryPhase::Running { forked, .. } = &mut self.primary else {
            return self.answer(ForkAnswer::Refused("no primary process runs".into()));
        };
        *forked = true;
        if self.is_stopping() {
            return self.answer(ForkAnswer::Refused("the cluster is stopping".into()));
        }
        // A running worker of that variant it has no Worker object for.
        let unclaimed = self
            .unclaimed()
            .filter(|p| self.variant(p.id) == variant)
            .min_by_key(|p| (p.id, p.started))
            .map(|p| (p.id, p.pid));
        if let Some((id, pid)) = unclaimed {
            return self.claim(id, pid);
        }
        // A wanted id of that variant waiting for its restart: started now.
        let waiting = self.wanted.iter().copied().find(|id| {
            self.variant(*id) == variant
                && !self.has_candidate(*id)
                && !self.id_claimed(*id)
                && self.ids.get(id).is_none_or(|r| r.plan != Plan::Spawning)
        });
        if let Some(id) = waiting {
            return self.spawn_for_fork(id, variant);
        }
        match self.policy.count {
            Count::Fixed => {
                // `-w` decides how many: a worker the program has not forked yet becomes this
                // variant (its process is replaced).
                let other = self
                    .unclaimed()
                    .min_by_key(|p| (p.id, p.started))
                    .map(|p| p.id);
                let Some(id) = other else {
                    let workers = self.wanted();
                    return self.answer(ForkAnswer::Refused(format!(
                        "cluster-lb keeps -w {workers} workers and the program has forked all {workers}; start cluster-lb without -w to let the program decide how many"
                    )));
                };
                self.depart_id(id, &Departure::Replaced);
                self.spawn_for_fork(id, variant);
            }
            Count::Program => {
                if self.wanted() >= cluster_common::MAX_WORKERS {
                    return self.answer(ForkAnswer::Refused(format!(
                        "cluster-lb runs at most {} workers",
                        cluster_common::MAX_WORKERS
                    )));
                }
                let first = self.policy.first_id;
                let Some(id) = (first..).find(|id| {
                    !self.wanted.contains(id) && !self.has_candidate(*id) && !self.id_claimed(*id)
                }) else {
                    return self.answer(ForkAnswer::Refused("no free worker id".into()));
                };
                self.want(id);
                self.spawn_for_fork(id, variant);
            }
        }
    }

    /// Whether the primary has a Worker object for a process of worker `id` (one still
    /// draining, too: its Worker goes only when it exits).
    fn id_claimed(&self, id: u32) -> bool {
        self.processes
            .values()
            .any(|p| p.id == id && p.claim == Claim::Claimed)
    }

    /// Candidates the primary has no Worker object for, whose id it has none for either (a
    /// replacement whose predecessor it still knows waits until that one is gone).
    fn unclaimed(&self) -> impl Iterator<Item = &super::Process> {
        self.processes
            .values()
            .filter(|p| p.claim != Claim::Claimed && p.phase.is_candidate())
            .filter(|p| !self.id_claimed(p.id))
    }

    /// What worker `id` runs: 0 for the command line's program, else a fork's (the shell
    /// keeps them).
    pub fn variant(&self, id: u32) -> u32 {
        self.ids.get(&id).map_or(0, |r| r.variant)
    }

    /// The primary took the worker it was offered (or says why not: it is gone, or a fork
    /// took it first).
    pub(super) fn adopt(&mut self, pid: Pid) {
        let offered = self
            .processes
            .get(&pid)
            .filter(|p| p.claim == Claim::Offered && p.phase.is_candidate())
            .map(|p| p.id)
            .filter(|id| {
                !self
                    .processes
                    .values()
                    .any(|other| other.id == *id && other.claim == Claim::Claimed)
            });
        match offered {
            Some(id) if self.primary_runs() => self.claim(id, pid),
            _ => self.answer(ForkAnswer::Refused("taken or gone".into())),
        }
    }

    fn primary_runs(&self) -> bool {
        matches!(self.primary, PrimaryPhase::Running { .. })
    }

    fn claim(&mut self, id: u32, pid: Pid) {
        if let Some(process) = self.processes.get_mut(&pid) {
            process.claim = Claim::Claimed;
        }
        self.ids.entry(id).or_default().forked = true;
        self.answer(ForkAnswer::Bound { id, pid });
    }

    fn spawn_for_fork(&mut self, id: u32, variant: u32) {
        let record = self.ids.entry(id).or_default();
        record.answer_fork = true;
        record.variant = variant;
        self.spawn(id);
    }

    /// A fork's worker was spawned (or not): the primary gets it.
    pub(super) fn fork_spawned(&mut self, id: u32, spawned: Result<Pid, &str>) {
        let Some(record) = self.ids.get_mut(&id).filter(|r| r.answer_fork) else {
            return;
        };
        record.answer_fork = false;
        match spawned {
            Ok(pid) => self.claim(id, pid),
            Err(error) => self.answer(ForkAnswer::Refused(error.to_string())),
        }
    }

    fn answer(&mut self, answer: ForkAnswer) {
        self.out.push(Action::ForkAnswer(answer));
    }

    /// Whether the program's primary has a `Worker` object for `pid`, so it hears its events.
    pub fn is_claimed(&self, pid: Pid) -> bool {
        self.processes
            .get(&pid)
            .is_some_and(|p| p.claim == Claim::Claimed)
    }

    /// Wanted workers the primary has no Worker for yet (being started, restarted, or to be
    /// offered): while there are any, it is to stay up even with no Worker left, as a Node
    /// primary does while a child process of its runs.
    pub fn awaited_by_primary(&self) -> u32 {
        self.wanted
            .iter()
            .filter(|id| !self.id_claimed(**id))
            .count() as u32
    }

    /// Whether the program's primary may still get a fork answered or events relayed.
    pub fn primary_pid(&self) -> Option<Pid> {
        self.primary.pid()
    }

    /// Whether a primary process was asked for (it may be between two runs).
    pub fn has_primary(&self) -> bool {
        self.primary != PrimaryPhase::Off
    }
}
