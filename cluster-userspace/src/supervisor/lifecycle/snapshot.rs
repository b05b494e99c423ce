//! The lifecycle as data, for an in-place upgrade: the running primary writes a [`Snapshot`],
//! the new binary resumes from it. Every process is written with its phase and timers, so a
//! worker starting or draining during the upgrade goes on as it would have. What is refused is
//! a reload or a stop under way: they owe answers to clients of the old process (the reload's
//! requester) and would have to be taken over mid-step. Times are kept as ages and delays,
//! since an `Instant` means nothing to another process.

use std::time::{Duration, Instant};

use nix::unistd::Pid;
use serde::{Deserialize, Serialize};

use super::{
    Announced, Claim, IdRecord, Intent, Lifecycle, Phase, Plan, Policy, PrimaryPhase, Process,
    Retire, Serving, Timing,
};

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snapshot {
    pub wanted: Wanted,
    /// The program's primary process.
    #[serde(default)]
    pub primary: PrimarySnapshot,
    pub generation: u64,
    pub reloads: u64,
    pub announced: Announced,
    pub processes: Vec<ProcessSnapshot>,
    pub ids: Vec<IdSnapshot>,
}

/// The wanted worker ids; a count (ids from the first) as an older binary wrote it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Wanted {
    Ids(Vec<u32>),
    Count(u32),
}

/// The program's primary process, with its timers as delays.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "phase", rename_all = "kebab-case")]
pub enum PrimarySnapshot {
    #[default]
    Off,
    Running {
        pid: i32,
        age_ms: u64,
        failures: u32,
        detected: bool,
        forked: bool,
        settled: bool,
    },
    RestartAt {
        in_ms: u64,
        failures: u32,
        detected: bool,
    },
}

/// A worker process.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessSnapshot {
    pub id: u32,
    pub pid: i32,
    pub generation: u64,
    /// How long ago it was started.
    pub age_ms: u64,
    pub phase: PhaseSnapshot,
    /// Whether the program's primary has a `Worker` for it.
    #[serde(default)]
    pub claim: Claim,
    /// It is to be replaced while it serves.
    #[serde(default)]
    pub retire: Option<Retire>,
}

/// A [`Phase`] with its timers as delays from the snapshot's time (ages for the past).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "phase", rename_all = "kebab-case")]
pub enum PhaseSnapshot {
    Starting {
        ready_in_ms: Option<u64>,
        give_up_in_ms: u64,
    },
    Online {
        give_up_in_ms: u64,
    },
    Ready {
        ready_ms: u64,
        /// Whether it gets connections (absent from an older binary: it does).
        #[serde(default)]
        serving: Serving,
    },
    Draining {
        /// When it is asked to stop (absent from an older binary: it was asked).
        #[serde(default)]
        ask_in_ms: Option<u64>,
        term_in_ms: Option<u64>,
        kill_in_ms: u64,
    },
    Killed,
}

impl PhaseSnapshot {
    fn of(phase: Phase, now: Instant) -> PhaseSnapshot {
        let until = |at: Instant| millis(at.saturating_duration_since(now));
        match phase {
            Phase::Starting {
                ready_at,
                give_up_at,
            } => PhaseSnapshot::Starting {
                ready_in_ms: ready_at.map(until),
                give_up_in_ms: until(give_up_at),
            },
            Phase::Online { give_up_at } => PhaseSnapshot::Online {
                give_up_in_ms: until(give_up_at),
            },
            Phase::Ready { since, serving } => PhaseSnapshot::Ready {
                ready_ms: millis(now.saturating_duration_since(since)),
                serving,
            },
            Phase::Draining {
                ask_at,
                term_at,
                kill_at,
            } => PhaseSnapshot::Draining {
                ask_in_ms: ask_at.map(until),
                term_in_ms: term_at.map(until),
                kill_in_ms: until(kill_at),
            },
            Phase::Killed => PhaseSnapshot::Killed,
        }
    }

    fn phase(self, now: Instant) -> Phase {
        let at = |ms: u64| now + Duration::from_millis(ms);
        match self {
            PhaseSnapshot::Starting {
                ready_in_ms,
                give_up_in_ms,
            } => Phase::Starting {
                ready_at: ready_in_ms.map(at),
                give_up_at: at(give_up_in_ms),
            },
            PhaseSnapshot::Online { give_up_in_ms } => Phase::Online {
                give_up_at: at(give_up_in_ms),
            },
            PhaseSnapshot::Ready { ready_ms, serving } => Phase::Ready {
                since: before(now, ready_ms),
                serving,
            },
            PhaseSnapshot::Draining {
                ask_in_ms,
                term_in_ms,
                kill_in_ms,
            } => Phase::Draining {
                ask_at: ask_in_ms.map(at),
                term_at: term_in_ms.map(at),
                kill_at: at(kill_in_ms),
            },
            PhaseSnapshot::Killed => Phase::Killed,
        }
    }
}

/// What the machine remembers of a worker id.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdSnapshot {
    pub id: u32,
    pub failures: u32,
    pub restarts: u32,
    pub started_before: bool,
    /// A restart planned after a backoff, this far ahead.
    pub restart_in_ms: Option<u64>,
    /// What it runs (0: the command line's program).
    #[serde(default)]
    pub variant: u32,
    /// The running primary process forked it.
    #[serde(default)]
    pub forked: bool,
}

/// Why the lifecycle cannot be handed over now.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum NotCalm {
    #[error("a reload is under way; upgrade when it has completed")]
    Reloading,
    #[error("the cluster is stopping")]
    Stopping,
    /// Never seen between two inputs (a spawn is answered within the same step).
    #[error("worker {id} is being started; try again in a moment")]
    Spawning { id: u32 },
    #[error("the program's primary is being started or stopped; try again in a moment")]
    PrimaryBusy,
    #[error(
        "worker {id} is being replaced while it serves (a health limit); try again in a moment"
    )]
    Recycling { id: u32 },
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

fn before(now: Instant, ms: u64) -> Instant {
    now.checked_sub(Duration::from_millis(ms)).unwrap_or(now)
}

impl Lifecycle {
    /// The machine as data, if it is calm at `now`.
    pub fn snapshot(&self, now: Instant) -> Result<Snapshot, NotCalm> {
        if let Some(recycling) = &self.recycling {
            return Err(NotCalm::Recycling { id: recycling.id });
        }
        match self.intent {
            Intent::Serve => {}
            Intent::Reload(_) => return Err(NotCalm::Reloading),
            Intent::Stop => return Err(NotCalm::Stopping),
        }
        let processes = self
            .processes
            .values()
            .map(|p| ProcessSnapshot {
                id: p.id,
                pid: p.pid.as_raw(),
                generation: p.generation,
                age_ms: millis(now.saturating_duration_since(p.started)),
                phase: PhaseSnapshot::of(p.phase, now),
                claim: p.claim,
                retire: p.retire,
            })
            .collect();
        let ids = self
            .ids
            .iter()
            .map(|(&id, record)| {
                let restart_in_ms = match record.plan {
                    Plan::Idle => None,
                    Plan::RestartAt(at) => Some(millis(at.saturating_duration_since(now))),
                    Plan::Spawning => return Err(NotCalm::Spawning { id }),
                };
                Ok(IdSnapshot {
                    id,
                    failures: record.failures,
                    restarts: record.restarts,
                    started_before: record.started_before,
                    restart_in_ms,
                    variant: record.variant,
                    forked: record.forked,
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let primary = match self.primary {
            PrimaryPhase::Off => PrimarySnapshot::Off,
            PrimaryPhase::Running {
                pid,
                since,
                failures,
                detected,
                forked,
                settled,
            } => PrimarySnapshot::Running {
                pid: pid.as_raw(),
                age_ms: millis(now.saturating_duration_since(since)),
                failures,
                detected,
                forked,
                settled,
            },
            PrimaryPhase::RestartAt {
                at,
                failures,
                detected,
            } => PrimarySnapshot::RestartAt {
                in_ms: millis(at.saturating_duration_since(now)),
                failures,
                detected,
            },
            PrimaryPhase::Spawning { .. }
            | PrimaryPhase::Stopping { .. }
            | PrimaryPhase::Killed { .. } => return Err(NotCalm::PrimaryBusy),
        };
        Ok(Snapshot {
            wanted: Wanted::Ids(self.wanted_ids().collect()),
            primary,
            generation: self.generation,
            reloads: self.reloads,
            announced: self.announced,
            processes,
            ids,
        })
    }

    /// The machine a snapshot describes, at `now`, under `policy` (from the command line). Its
    /// first input (a `Tick`) asks for nothing the snapshot's primary would not have asked for.
    pub fn resume(snapshot: &Snapshot, policy: Policy, timing: Timing, now: Instant) -> Lifecycle {
        let mut lifecycle = Lifecycle::with(0, policy, timing, now);
        lifecycle.wanted = match &snapshot.wanted {
            Wanted::Ids(ids) => ids.iter().copied().collect(),
            // An older binary counted every cluster's ids from 0.
            Wanted::Count(count) => (0..*count).collect(),
        };
        if let Some(first) = lifecycle.wanted.first() {
            // Ids already running keep their numbering.
            lifecycle.policy.first_id = lifecycle.policy.first_id.min(*first);
        }
        lifecycle.primary = match snapshot.primary {
            PrimarySnapshot::Off => PrimaryPhase::Off,
            PrimarySnapshot::Running {
                pid,
                age_ms,
                failures,
                detected,
                forked,
                settled,
            } => PrimaryPhase::Running {
                pid: Pid::from_raw(pid),
                since: before(now, age_ms),
                failures,
                detected,
                forked,
                settled,
            },
            PrimarySnapshot::RestartAt {
                in_ms,
                failures,
                detected,
            } => PrimaryPhase::RestartAt {
                at: now + Duration::from_millis(in_ms),
                failures,
                detected,
            },
        };
        lifecycle.generation = snapshot.generation;
        lifecycle.reloads = snapshot.reloads;
        lifecycle.announced = snapshot.announced;
        for p in &snapshot.processes {
            let pid = Pid::from_raw(p.pid);
            lifecycle.processes.insert(
                pid,
                Process {
                    id: p.id,
                    pid,
                    started: before(now, p.age_ms),
                    generation: p.generation,
                    phase: p.phase.phase(now),
                    claim: p.claim,
                    retire: p.retire,
                },
            );
        }
        for id in &snapshot.ids {
            lifecycle.ids.insert(
                id.id,
                IdRecord {
                    plan: id.restart_in_ms.map_or(Plan::Idle, |ms| {
                        Plan::RestartAt(now + Duration::from_millis(ms))
                    }),
                    failures: id.failures,
                    restarts: id.restarts,
                    started_before: id.started_before,
                    answer_fork: false,
                    variant: id.variant,
                    forked: id.forked,
                    spawning_generation: snapshot.generation,
                },
            );
        }
        lifecycle
    }
}
