//! A simulated world for the lifecycle machine: the processes it spawns, signals and kills
//! exist only here, under the test's control, and the invariants that must hold after every
//! step are checked after every step.

use std::{
    collections::{BTreeMap, BTreeSet, VecDeque},
    time::{Duration, Instant},
};

use nix::unistd::Pid;

use super::{Action, Announced, Input, Lifecycle, ReloadError, Timing, WorkerState};
use crate::supervisor::events::{Event, ExitStatus, Readiness};

/// A process of the simulated world.
#[derive(Clone, Copy, Debug, Default)]
pub struct Alive {
    pub asked_to_stop: bool,
    pub terminated: bool,
    pub killed: bool,
}

#[derive(Clone)]
pub struct World {
    pub lifecycle: Lifecycle,
    pub now: Instant,
    next_pid: i32,
    /// The next this many spawns fail.
    pub fail_spawns: u32,
    /// Spawned workers speak a protocol that signals readiness (Node's channel).
    pub signals: bool,
    pub alive: BTreeMap<Pid, Alive>,
    /// The kernel's active set, as the actions left it.
    pub active: BTreeSet<Pid>,
    pub notified: Vec<Announced>,
    pub events: Vec<Event>,
    pub reload_replies: Vec<Result<u32, ReloadError>>,
    /// Every input given, for the failure message of a property test.
    pub history: Vec<Input>,
}

pub fn timing(grace_ms: u64, ready_delay_ms: u64, ready_timeout_ms: u64) -> Timing {
    Timing {
        grace: Duration::from_millis(grace_ms),
        ready_delay: Duration::from_millis(ready_delay_ms),
        ready_timeout: Duration::from_millis(ready_timeout_ms),
    }
}

impl World {
    /// A cluster of `wanted` workers, started (the first spawns are done, none is ready yet).
    pub fn new(wanted: u32, timing: Timing) -> World {
        World::with_signals(wanted, timing, false)
    }

    /// As `new`, the workers signalling readiness (or not) as `signals` says.
    pub fn with_signals(wanted: u32, timing: Timing, signals: bool) -> World {
        let now = Instant::now();
        let mut world = World {
            lifecycle: Lifecycle::new(wanted, timing, now),
            now,
            next_pid: 100,
            fail_spawns: 0,
            signals,
            alive: BTreeMap::new(),
            active: BTreeSet::new(),
            notified: Vec::new(),
            events: Vec::new(),
            reload_replies: Vec::new(),
            history: Vec::new(),
        };
        world.apply(Input::Tick);
        world
    }

    /// Gives the machine one input and carries out what it asks, as the I/O shell does.
    pub fn apply(&mut self, input: Input) {
        self.history.push(input.clone());
        let mut queue: VecDeque<Action> = self.lifecycle.handle(input, self.now).into();
        while let Some(action) = queue.pop_front() {
            match action {
                Action::Spawn { id } => {
                    assert!(
                        !self.lifecycle.is_stopping(),
                        "spawned while stopping: {:?}",
                        self.history
                    );
                    let reply = if self.fail_spawns > 0 {
                        self.fail_spawns -= 1;
                        Input::SpawnFailed {
                            id,
                            error: "injected failure".into(),
                        }
                    } else {
                        let pid = Pid::from_raw(self.next_pid);
                        self.next_pid += 1;
                        self.alive.insert(pid, Alive::default());
                        Input::Spawned {
                            id,
                            pid,
                            slot: 0,
                            signals_readiness: self.signals,
                        }
                    };
                    self.history.push(reply.clone());
                    queue.extend(self.lifecycle.handle(reply, self.now));
                }
                Action::Activate { pid } => {
                    assert!(self.alive.contains_key(&pid), "activated a dead {pid}");
                    assert!(self.active.insert(pid), "activated {pid} twice");
                }
                Action::Deactivate { pid } => {
                    assert!(self.active.remove(&pid), "deactivated inactive {pid}");
                }
                Action::AskToStop { pid } => self.process(pid).asked_to_stop = true,
                Action::Terminate { pid } => self.process(pid).terminated = true,
                Action::Kill { pid } => self.process(pid).killed = true,
                Action::Release { pid } => {
                    assert!(!self.alive.contains_key(&pid), "released live {pid}");
                    self.active.remove(&pid);
                }
                Action::Notify(announced) => self.notified.push(announced),
                Action::Emit(event) => self.events.push(event),
                Action::ReloadDone(outcome) => {
                    assert_ne!(
                        outcome,
                        Ok(0),
                        "a reload that replaced nothing said it succeeded"
                    );
                    self.reload_replies.push(outcome)
                }
            }
        }
        self.check();
    }

    fn process(&mut self, pid: Pid) -> &mut Alive {
        self.alive
            .get_mut(&pid)
            .unwrap_or_else(|| panic!("an action for {pid}, which does not exist"))
    }

    /// The process ends; the machine hears of it.
    pub fn exit(&mut self, pid: Pid, status: ExitStatus) {
        assert!(self.alive.remove(&pid).is_some(), "{pid} is not alive");
        self.apply(Input::Exited { pid, status });
    }

    pub fn advance(&mut self, by: Duration) {
        self.now += by;
        self.apply(Input::Tick);
    }

    /// The processes in `state`, by id.
    pub fn in_state(&self, state: WorkerState) -> Vec<(u32, Pid)> {
        self.lifecycle
            .processes()
            .filter(|p| p.state() == state)
            .map(|p| (p.id, p.pid))
            .collect()
    }

    /// The one process of worker `id` in `state`.
    pub fn pid(&self, id: u32, state: WorkerState) -> Pid {
        let found: Vec<Pid> = self
            .in_state(state)
            .into_iter()
            .filter(|(i, _)| *i == id)
            .map(|(_, pid)| pid)
            .collect();
        assert_eq!(found.len(), 1, "worker {id} in state {state}: {found:?}");
        found[0]
    }

    /// Events with this name.
    pub fn events_named(&self, name: &str) -> Vec<&Event> {
        self.events.iter().filter(|e| e.name() == name).collect()
    }

    /// From now on every process behaves: it gets ready at once, and exits when asked to stop
    /// or killed. Time runs to each next timer until none is left.
    pub fn settle(&mut self) {
        for _ in 0..10_000 {
            let going: Vec<(Pid, ExitStatus)> = self
                .alive
                .iter()
                .filter(|(_, p)| p.asked_to_stop || p.terminated || p.killed)
                .map(|(pid, p)| {
                    let status = if p.killed {
                        ExitStatus::Signal(nix::sys::signal::Signal::SIGKILL)
                    } else {
                        ExitStatus::Code(0)
                    };
                    (*pid, status)
                })
                .collect();
            for (pid, status) in &going {
                self.exit(*pid, *status);
            }
            let starting: Vec<Pid> = self
                .lifecycle
                .processes()
                .filter(|p| matches!(p.state(), WorkerState::Starting | WorkerState::Online))
                .map(|p| p.pid)
                .collect();
            for pid in &starting {
                self.apply(Input::Ready {
                    pid: *pid,
                    how: Readiness::Listening,
                });
            }
            if !going.is_empty() || !starting.is_empty() {
                continue;
            }
            match self.lifecycle.next_deadline() {
                Some(at) => {
                    self.now = self.now.max(at);
                    self.apply(Input::Tick);
                }
                None => return,
            }
        }
        panic!("the cluster did not settle: {:?}", self.history);
    }

    /// After `settle`: the wanted ids, one ready process each, and nothing else; or, when
    /// stopping, nothing at all.
    pub fn assert_converged(&self) {
        let lifecycle = &self.lifecycle;
        if lifecycle.is_stopping() {
            assert!(self.alive.is_empty(), "left running: {:?}", self.alive);
            assert!(lifecycle.is_finished());
            assert_eq!(self.notified.last(), Some(&Announced::Stopping));
            return;
        }
        let mut ids: Vec<u32> = lifecycle.processes().map(|p| p.id).collect();
        ids.sort_unstable();
        let wanted: Vec<u32> = (0..lifecycle.wanted()).collect();
        assert_eq!(ids, wanted, "processes by id; history: {:?}", self.history);
        assert!(
            lifecycle
                .processes()
                .all(|p| p.state() == WorkerState::Ready),
            "not all ready: {:?}",
            lifecycle.processes().collect::<Vec<_>>()
        );
        assert!(!lifecycle.is_reloading(), "a reload never ended");
        assert_eq!(self.notified.last(), Some(&Announced::Ready));
    }

    /// What holds after every step.
    fn check(&self) {
        let lifecycle = &self.lifecycle;
        // The kernel's active set is exactly the ready processes.
        let ready: BTreeSet<Pid> = lifecycle
            .processes()
            .filter(|p| p.state() == WorkerState::Ready)
            .map(|p| p.pid)
            .collect();
        assert_eq!(
            self.active, ready,
            "active set; history: {:?}",
            self.history
        );
        // The machine knows exactly the processes that exist.
        let known: BTreeSet<Pid> = lifecycle.processes().map(|p| p.pid).collect();
        let alive: BTreeSet<Pid> = self.alive.keys().copied().collect();
        assert_eq!(known, alive, "processes; history: {:?}", self.history);
        // At most one process serves an id, two while a reload replaces it; none above the
        // wanted count, none at all once stopping.
        let mut candidates: BTreeMap<u32, u32> = BTreeMap::new();
        for process in lifecycle.processes() {
            if matches!(
                process.state(),
                WorkerState::Starting | WorkerState::Online | WorkerState::Ready
            ) {
                *candidates.entry(process.id).or_default() += 1;
            }
        }
        for (id, count) in &candidates {
            assert!(
                !lifecycle.is_stopping(),
                "worker {id} serves while stopping"
            );
            assert!(
                *id < lifecycle.wanted(),
                "worker {id} above the wanted count"
            );
            assert!(
                *count == 1 || (*count == 2 && lifecycle.is_reloading()),
                "{count} processes serve worker {id}; history: {:?}",
                self.history
            );
        }
        check_announcement_order(&self.notified);
    }
}

/// READY=1 first, RELOADING=1 only after READY=1 and each followed by READY=1, STOPPING=1 last.
pub fn check_announcement_order(notified: &[Announced]) {
    let mut previous = Announced::Nothing;
    for &next in notified {
        let allowed = matches!(
            (previous, next),
            (Announced::Nothing, Announced::Ready)
                | (Announced::Ready, Announced::Reloading)
                | (Announced::Reloading, Announced::Ready)
                | (
                    Announced::Nothing | Announced::Ready | Announced::Reloading,
                    Announced::Stopping
                )
        );
        assert!(allowed, "{previous:?} then {next:?} in {notified:?}");
        previous = next;
    }
}
