//! The lifecycle as data, for an in-place upgrade: the running primary writes a [`Snapshot`],
//! the new binary resumes from it. Only a calm cluster is written out (no reload or stop under
//! way, every process ready, no spawn out), so the snapshot holds nothing in mid-flight: a
//! process's timers and an answer owed to a reload cannot be lost between two binaries. Times
//! are kept as ages and delays, since an `Instant` means nothing to another process.

use std::time::{Duration, Instant};

use nix::unistd::Pid;
use serde::{Deserialize, Serialize};

use super::{Announced, IdRecord, Intent, Lifecycle, Phase, Plan, Process, Timing, WorkerState};
use cluster_common::MAX_WORKERS;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snapshot {
    pub wanted: u32,
    pub generation: u64,
    pub reloads: u64,
    pub announced: Announced,
    pub processes: Vec<ProcessSnapshot>,
    pub ids: Vec<IdSnapshot>,
}

/// A ready worker process.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessSnapshot {
    pub id: u32,
    pub pid: i32,
    pub generation: u64,
    /// How long ago it was started, and became ready.
    pub age_ms: u64,
    pub ready_ms: u64,
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
}

/// Why the lifecycle cannot be handed over now. Each is over within seconds.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum NotCalm {
    #[error("a reload is under way; upgrade when it has completed")]
    Reloading,
    #[error("the cluster is stopping")]
    Stopping,
    #[error("worker {id} (pid {pid}) is {state}; upgrade once every worker is ready")]
    Busy {
        id: u32,
        pid: i32,
        state: WorkerState,
    },
    #[error("worker {id} is being started; upgrade once every worker is ready")]
    Spawning { id: u32 },
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
        match self.intent {
            Intent::Serve => {}
            Intent::Reload(_) => return Err(NotCalm::Reloading),
            Intent::Stop => return Err(NotCalm::Stopping),
        }
        let processes = self
            .processes
            .values()
            .map(|p| match p.phase {
                Phase::Ready { since } => Ok(ProcessSnapshot {
                    id: p.id,
                    pid: p.pid.as_raw(),
                    generation: p.generation,
                    age_ms: millis(now.saturating_duration_since(p.started)),
                    ready_ms: millis(now.saturating_duration_since(since)),
                }),
                phase => Err(NotCalm::Busy {
                    id: p.id,
                    pid: p.pid.as_raw(),
                    state: phase.state(),
                }),
            })
            .collect::<Result<Vec<_>, _>>()?;
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
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Snapshot {
            wanted: self.wanted,
            generation: self.generation,
            reloads: self.reloads,
            announced: self.announced,
            processes,
            ids,
        })
    }

    /// The machine a snapshot describes, at `now`. Its first input (a `Tick`) asks for nothing
    /// the snapshot's primary would not have asked for.
    pub fn resume(snapshot: &Snapshot, timing: Timing, now: Instant) -> Lifecycle {
        let mut lifecycle = Lifecycle::new(snapshot.wanted.clamp(1, MAX_WORKERS), timing, now);
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
                    phase: Phase::Ready {
                        since: before(now, p.ready_ms),
                    },
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
                },
            );
        }
        lifecycle
    }
}
