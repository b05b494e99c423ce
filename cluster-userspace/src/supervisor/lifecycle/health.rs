//! Workers that heal themselves: one whose accept queue stalls leaves the active set (and comes
//! back when it drains again); one that is hung, over its memory, connection or age limit is
//! replaced while it still serves. The shell measures (see `supervisor/health.rs`) and says
//! `Stalled`, `Unstalled`, `Retire` or `KillNow`; what follows is here.
//!
//! A retirement is a reload of one process: its replacement is started first, and only once
//! it is ready does the old one leave (drained, or killed when hung: a hung worker never
//! drains, and what was queued on it moves to live workers when its socket closes). One
//! retirement at a time, and none starts during a reload (one under way finishes first, and
//! the reload skips its id until then), so capacity never drops below the wanted count. A replacement that fails is tried again after the id's backoff; the old process
//! serves meanwhile.

use std::time::Instant;

use nix::unistd::Pid;

use super::{backoff, Departure, Event, KillReason, Lifecycle, Phase, Plan, Retire, Serving};
use crate::supervisor::events::Failure;

/// The retirement under way.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Recycling {
    pub id: u32,
    /// The process that goes.
    pub old: Pid,
    /// A replacement was spawned (and is starting, or failed).
    pub spawned: bool,
    /// After a failed replacement: the next one then.
    pub retry_at: Option<Instant>,
}

impl Lifecycle {
    pub(super) fn stalled(&mut self, pid: Pid) {
        let Some(process) = self.processes.get_mut(&pid) else {
            return;
        };
        if let Phase::Ready {
            serving: serving @ Serving::Active,
            ..
        } = &mut process.phase
        {
            *serving = Serving::Stalled;
            let id = process.id;
            self.out.push(super::Action::Deactivate { pid });
            self.emit(Event::Stalled {
                id,
                pid: pid.as_raw(),
            });
        }
    }

    pub(super) fn unstalled(&mut self, pid: Pid) {
        let Some(process) = self.processes.get_mut(&pid) else {
            return;
        };
        if process.retire.is_some_and(Retire::unresponsive) {
            return; // being replaced: it stays out
        }
        if let Phase::Ready {
            serving: serving @ Serving::Stalled,
            ..
        } = &mut process.phase
        {
            *serving = Serving::Active;
            let id = process.id;
            self.out.push(super::Action::Activate { pid });
            self.emit(Event::Unstalled {
                id,
                pid: pid.as_raw(),
            });
        }
    }

    pub(super) fn retire(&mut self, pid: Pid, why: Retire) {
        if self.is_stopping() {
            return;
        }
        let Some(process) = self.processes.get_mut(&pid) else {
            return;
        };
        if !process.phase.is_candidate() || process.retire.is_some() {
            return;
        }
        process.retire = Some(why);
        let id = process.id;
        let event = match why {
            Retire::Hung { stalled } => Some(Event::Hung {
                id,
                pid: pid.as_raw(),
                stalled,
            }),
            Retire::Watchdog { silent } => Some(Event::WatchdogMissed {
                id,
                pid: pid.as_raw(),
                silent,
            }),
            Retire::Memory { bytes, limit } => Some(Event::MemoryLimit {
                id,
                pid: pid.as_raw(),
                bytes,
                limit,
                hard: false,
            }),
            Retire::Connections { .. } | Retire::Age { .. } => None,
        };
        if let Some(event) = event {
            self.emit(event);
        }
        if why.unresponsive() {
            // It gets nothing new while it waits for its replacement.
            self.stalled(pid);
        }
    }

    pub(super) fn kill_now(&mut self, pid: Pid, reason: KillReason) {
        let Some(process) = self.processes.get(&pid) else {
            return;
        };
        if !process.phase.is_candidate() {
            return;
        }
        let (id, ready_for) = (process.id, self.ready_for(process));
        if let KillReason::MemoryHard { bytes, limit } = reason {
            self.emit(Event::MemoryLimit {
                id,
                pid: pid.as_raw(),
                bytes,
                limit,
                hard: true,
            });
        }
        self.kill(pid, reason);
        self.failed(id, ready_for, Failure::Killed(reason));
    }

    /// Carries the retirement under way one step further, or starts the next.
    pub(super) fn advance_retirement(&mut self) {
        if self.is_stopping() {
            return;
        }
        let Some(mut recycling) = self.recycling.take() else {
            // A reload replaces every process anyway: the next retirement waits for its end.
            if self.is_reloading() {
                return;
            }
            self.recycling = self.next_retirement();
            if self.recycling.is_some() {
                self.advance_retirement();
            }
            return;
        };
        let old_serves = self
            .processes
            .get(&recycling.old)
            .is_some_and(|p| p.phase.is_candidate() && p.retire.is_some());
        if !old_serves || !self.wanted.contains(&recycling.id) {
            // It went by itself (or its id did): the usual rules serve the id.
            return;
        }
        let replacement = self
            .processes
            .values()
            .find(|p| p.id == recycling.id && p.pid != recycling.old && p.phase.is_candidate())
            .map(|p| (p.pid, p.phase.is_ready()));
        match replacement {
            Some((_, true)) => {
                self.finish_retirement(recycling.old);
                return;
            }
            Some((_, false)) => {} // starting
            None => {
                let spawning = self
                    .ids
                    .get(&recycling.id)
                    .is_some_and(|r| r.plan == Plan::Spawning);
                if !spawning {
                    if recycling.spawned && recycling.retry_at.is_none() {
                        // The replacement failed: again after the id's backoff.
                        let failures = self.ids.get(&recycling.id).map_or(1, |r| r.failures);
                        recycling.retry_at = Some(self.now + backoff(failures.max(1)));
                    }
                    if recycling.retry_at.is_none_or(|at| at <= self.now) {
                        recycling.spawned = true;
                        recycling.retry_at = None;
                        self.spawn(recycling.id);
                    }
                }
            }
        }
        self.recycling = Some(recycling);
    }

    /// The oldest process marked to retire, with no other process of its id (a second one
    /// would be a reload's, already a replacement).
    fn next_retirement(&self) -> Option<Recycling> {
        self.processes
            .values()
            .filter(|p| p.retire.is_some() && p.phase.is_candidate())
            .filter(|p| self.wanted.contains(&p.id))
            .min_by_key(|p| p.started)
            .map(|p| Recycling {
                id: p.id,
                old: p.pid,
                spawned: false,
                retry_at: None,
            })
    }

    /// Its replacement is ready: the old process goes (killed if hung).
    fn finish_retirement(&mut self, old: Pid) {
        let Some(process) = self.processes.get(&old) else {
            return;
        };
        let (id, why) = (process.id, process.retire);
        let Some(why) = why else {
            return;
        };
        self.emit(Event::Recycled {
            id,
            pid: old.as_raw(),
            why,
        });
        match why {
            Retire::Hung { stalled } => self.kill(old, KillReason::Hung(stalled)),
            Retire::Watchdog { silent } => self.kill(old, KillReason::Silent(silent)),
            _ => self.depart(old, Departure::Recycled(why.to_string())),
        }
    }

    /// Whether worker `id` has two candidates because one is being replaced while it serves.
    pub fn is_recycling(&self, id: u32) -> bool {
        self.recycling.as_ref().is_some_and(|r| r.id == id)
    }
}
