//! A simulated world for the lifecycle machine: the processes it spawns, signals and kills
//! exist only here, under the test's control, and the invariants that must hold after every
//! step are checked after every step.

use std::{
    collections::{BTreeMap, BTreeSet, VecDeque},
    time::{Duration, Instant},
};

use nix::unistd::Pid;

use super::{
    Action, Announced, ForkAnswer, Input, Lifecycle, Policy, ReloadError, Timing, WorkerState,
};
use crate::supervisor::events::{Departure, Event, ExitStatus, Readiness};

/// A process of the simulated world.
#[derive(Clone, Copy, Debug, Default)]
pub struct Alive {
    pub asked_to_stop: bool,
    pub terminated: bool,
    pub killed: bool,
    /// When it left the active set on its way out, asked to go: the drain delay runs from then.
    pub drained_from: Option<Instant>,
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
    /// The program's primary process, when one exists.
    pub primary: Option<(Pid, Alive)>,
    /// Workers offered to the primary, not yet taken.
    pub offers: Vec<Pid>,
    /// Every fork answer.
    pub answers: Vec<ForkAnswer>,
    /// Every input given, for the failure message of a property test.
    pub history: Vec<Input>,
    /// Stalled processes `settle` has told that their queue drains again.
    unstalled: BTreeSet<Pid>,
    /// The configurations, as the shell keeps them: what spawns use now, and the one a
    /// reload brought for its canary (numbered afresh for every reload).
    pub configs: Configs,
    /// The timing's drain delay, which every ask to stop after a deactivation must respect.
    drain_delay: Duration,
}

/// What each process was started with, as `supervisor/mod.rs` chooses it: a reload brings a
/// new configuration (a number here), which only its canary runs until `CanaryReady` makes it
/// the cluster's; a reload that ends before discards it.
#[derive(Clone, Debug, Default)]
pub struct Configs {
    pub current: u32,
    /// The reload's, not yet the cluster's.
    pub candidate: Option<u32>,
    next: u32,
    /// Reloads' configurations that were never the cluster's.
    pub discarded: BTreeSet<u32>,
    /// By process.
    pub of: BTreeMap<Pid, u32>,
    /// The reload under way has had its `CanaryReady`.
    pub canary_ready: bool,
}

pub fn timing(grace_ms: u64, ready_delay_ms: u64, ready_timeout_ms: u64) -> Timing {
    Timing {
        drain_delay: Duration::ZERO,
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
        World::with_policy(wanted, Policy::default(), timing, signals)
    }

    /// As `with_signals`, under `policy`.
    pub fn with_policy(wanted: u32, policy: Policy, timing: Timing, signals: bool) -> World {
        let now = Instant::now();
        let mut world = World {
            lifecycle: Lifecycle::with(wanted, policy, timing, now),
            drain_delay: timing.drain_delay,
            now,
            next_pid: 100,
            fail_spawns: 0,
            signals,
            alive: BTreeMap::new(),
            active: BTreeSet::new(),
            notified: Vec::new(),
            events: Vec::new(),
            reload_replies: Vec::new(),
            primary: None,
            offers: Vec::new(),
            answers: Vec::new(),
            history: Vec::new(),
            unstalled: BTreeSet::new(),
            configs: Configs::default(),
        };
        world.apply(Input::Tick);
        world
    }

    /// Gives the machine one input and carries out what it asks, as the I/O shell does.
    pub fn apply(&mut self, input: Input) {
        if input == Input::Reload && !self.lifecycle.is_reloading() && !self.lifecycle.is_stopping()
        {
            // The shell reads the config file anew: a reload brings a new configuration.
            self.configs.next += 1;
            self.configs.candidate = Some(self.configs.next);
            self.configs.canary_ready = false;
        }
        let forked = matches!(input, Input::Fork { .. });
        self.history.push(input.clone());
        let mut queue: VecDeque<Action> = self.lifecycle.handle(input, self.now).into();
        // Processes taken out of the active set in this step.
        let mut deactivated = BTreeSet::new();
        while let Some(action) = queue.pop_front() {
            match action {
                Action::Spawn { id, canary } => {
                    assert!(
                        !self.lifecycle.is_stopping(),
                        "spawned while stopping: {:?}",
                        self.history
                    );
                    assert!(
                        !canary || (self.lifecycle.is_reloading() && !self.configs.canary_ready),
                        "a canary outside a reload's start: {:?}",
                        self.history
                    );
                    let config = match (canary, self.configs.candidate) {
                        (true, Some(candidate)) => candidate,
                        _ => self.configs.current,
                    };
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
                        self.configs.of.insert(pid, config);
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
                    deactivated.insert(pid);
                }
                Action::SpawnPrimary => {
                    assert!(
                        self.primary.is_none(),
                        "a second primary: {:?}",
                        self.history
                    );
                    let reply = if self.fail_spawns > 0 {
                        self.fail_spawns -= 1;
                        Input::PrimarySpawnFailed {
                            error: "injected failure".into(),
                        }
                    } else {
                        let pid = Pid::from_raw(self.next_pid);
                        self.next_pid += 1;
                        self.primary = Some((pid, Alive::default()));
                        Input::PrimarySpawned { pid }
                    };
                    self.history.push(reply.clone());
                    queue.extend(self.lifecycle.handle(reply, self.now));
                }
                Action::Offer { pid, .. } => {
                    assert!(self.primary.is_some(), "an offer with no primary");
                    assert!(self.alive.contains_key(&pid), "offered a dead {pid}");
                    self.offers.push(pid);
                }
                Action::ForkAnswer(answer) => {
                    if let ForkAnswer::Bound { pid, .. } = &answer {
                        assert!(self.alive.contains_key(pid), "a fork bound to a dead {pid}");
                    }
                    self.answers.push(answer);
                }
                Action::ExitToPrimary { pid, .. } => {
                    assert!(
                        !self.alive.contains_key(&pid),
                        "told the exit of a live {pid}"
                    );
                }
                Action::AskToStop { pid } => {
                    let (now, delay) = (self.now, self.drain_delay);
                    let alive = self.process(pid);
                    assert!(
                        alive.drained_from.is_none_or(|from| now >= from + delay),
                        "{pid} asked to stop before its drain delay ran out: {:?}",
                        self.history
                    );
                    alive.asked_to_stop = true;
                }
                Action::Terminate { pid } => self.process(pid).terminated = true,
                Action::Kill { pid } => self.process(pid).killed = true,
                Action::Release { pid } => {
                    assert!(!self.alive.contains_key(&pid), "released live {pid}");
                    assert!(
                        self.primary.is_none_or(|(p, _)| p != pid),
                        "released the live primary"
                    );
                    self.active.remove(&pid);
                }
                Action::Notify(announced) => self.notified.push(announced),
                Action::Emit(event) => {
                    if let Event::Disconnect { pid, reason, .. } = &event {
                        let pid = Pid::from_raw(*pid);
                        if deactivated.contains(&pid) && reason.asks_to_stop() {
                            let now = self.now;
                            self.process(pid).drained_from = Some(now);
                        }
                    }
                    if let Event::Disconnect {
                        reason: Departure::Replaced,
                        ..
                    } = &event
                    {
                        // A reload retires an old process only once its canary is ready (a
                        // fork of the program's primary replaces a worker by itself).
                        assert!(
                            forked || !self.lifecycle.is_reloading() || self.configs.canary_ready,
                            "an old process replaced before the canary was ready: {:?}",
                            self.history
                        );
                    }
                    self.events.push(event)
                }
                Action::CanaryReady { pid, .. } => {
                    assert!(!self.configs.canary_ready, "two canaries in one reload");
                    assert_eq!(
                        self.lifecycle.process(pid).map(|p| p.state()),
                        Some(WorkerState::Ready),
                        "a canary that is not ready: {:?}",
                        self.history
                    );
                    self.configs.canary_ready = true;
                    if let Some(candidate) = self.configs.candidate.take() {
                        assert_eq!(
                            self.configs.of.get(&pid),
                            Some(&candidate),
                            "the canary runs another configuration: {:?}",
                            self.history
                        );
                        self.configs.current = candidate;
                    }
                }
                Action::ReloadDone(outcome) => {
                    if let Some(discarded) = self.configs.candidate.take() {
                        self.configs.discarded.insert(discarded);
                    }
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
        match &mut self.primary {
            Some((primary, alive)) if *primary == pid => alive,
            _ => self
                .alive
                .get_mut(&pid)
                .unwrap_or_else(|| panic!("an action for {pid}, which does not exist")),
        }
    }

    /// The process ends; the machine hears of it.
    pub fn exit(&mut self, pid: Pid, status: ExitStatus) {
        assert!(self.alive.remove(&pid).is_some(), "{pid} is not alive");
        self.configs.of.remove(&pid);
        self.apply(Input::Exited { pid, status });
    }

    /// The primary process ends; the machine hears of it.
    pub fn primary_exit(&mut self, status: ExitStatus) {
        if let Some((pid, _)) = self.primary.take() {
            self.offers.clear();
            self.apply(Input::Exited { pid, status });
        }
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
            let primary_goes = self
                .primary
                .as_ref()
                .is_some_and(|(_, p)| p.terminated || p.killed);
            if primary_goes {
                self.primary_exit(ExitStatus::Signal(nix::sys::signal::Signal::SIGTERM));
                continue;
            }
            // The primary takes every worker it is offered.
            let offers = std::mem::take(&mut self.offers);
            for pid in &offers {
                self.apply(Input::Adopt { pid: *pid });
            }
            if !offers.is_empty() {
                continue;
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
                // Under --wait-ready, a behaving worker sends 'ready' after it listens.
                if self.lifecycle.policy.wait_ready {
                    self.apply(Input::Ready {
                        pid: *pid,
                        how: Readiness::Message,
                    });
                }
            }
            // A stalled queue drains again (a hung one stays out: it is being replaced).
            let stalled: Vec<Pid> = self
                .lifecycle
                .processes()
                .filter(|p| p.is_stalled() && !self.unstalled.contains(&p.pid))
                .map(|p| p.pid)
                .collect();
            for pid in &stalled {
                self.unstalled.insert(*pid);
                self.apply(Input::Unstalled { pid: *pid });
            }
            if !going.is_empty() || !starting.is_empty() || !stalled.is_empty() {
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
        let wanted: Vec<u32> = lifecycle.wanted_ids().collect();
        assert_eq!(ids, wanted, "processes by id; history: {:?}", self.history);
        if lifecycle.has_primary() {
            assert!(
                lifecycle.primary_pid().is_some() && self.primary.is_some(),
                "the primary does not run; history: {:?}",
                self.history
            );
            assert!(
                lifecycle.processes().all(|p| lifecycle.is_claimed(p.pid)),
                "the primary does not have every worker; history: {:?}",
                self.history
            );
        }
        assert!(
            lifecycle
                .processes()
                .all(|p| p.state() == WorkerState::Ready),
            "not all ready: {:?}",
            lifecycle.processes().collect::<Vec<_>>()
        );
        assert!(!lifecycle.is_reloading(), "a reload never ended");
        // A reload that completed left every worker running its configuration (restarts
        // since then run it too).
        if matches!(self.reload_replies.last(), Some(Ok(_))) {
            for process in lifecycle.processes() {
                assert_eq!(
                    self.configs.of.get(&process.pid),
                    Some(&self.configs.current),
                    "worker {} runs an older configuration; history: {:?}",
                    process.id,
                    self.history
                );
            }
        }
        if lifecycle.wanted() > 0 {
            assert_eq!(self.notified.last(), Some(&Announced::Ready));
        } else {
            // No worker is wanted (the program let them all go): ready only if it was once.
            assert!(matches!(
                self.notified.last(),
                None | Some(Announced::Ready)
            ));
        }
    }

    /// What holds after every step.
    fn check(&self) {
        let lifecycle = &self.lifecycle;
        // The kernel's active set is exactly the ready processes.
        let ready: BTreeSet<Pid> = lifecycle
            .processes()
            .filter(|p| p.is_active())
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
        assert_eq!(
            lifecycle.primary_pid(),
            self.primary.map(|(pid, _)| pid),
            "the primary process; history: {:?}",
            self.history
        );
        // The primary has one Worker per id at most, and only while it runs.
        let mut claimed = BTreeSet::new();
        for process in lifecycle
            .processes()
            .filter(|p| lifecycle.is_claimed(p.pid))
        {
            assert!(self.primary.is_some(), "claimed with no primary");
            assert!(
                claimed.insert(process.id),
                "two claimed processes of worker {}; history: {:?}",
                process.id,
                self.history
            );
        }
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
                lifecycle.wanted_ids().any(|w| w == *id),
                "worker {id} is not wanted"
            );
            assert!(
                *count == 1
                    || (*count == 2 && (lifecycle.is_reloading() || lifecycle.is_recycling(*id))),
                "{count} processes serve worker {id}; history: {:?}",
                self.history
            );
        }
        // A configuration a reload discarded (its canary failed) serves nothing; while a
        // canary is pending, it alone runs the reload's.
        let mut on_candidate = 0;
        for process in lifecycle.processes() {
            if !matches!(
                process.state(),
                WorkerState::Starting | WorkerState::Online | WorkerState::Ready
            ) {
                continue;
            }
            let config = self.configs.of.get(&process.pid);
            assert!(
                config.is_none_or(|c| !self.configs.discarded.contains(c)),
                "worker {} runs a discarded configuration; history: {:?}",
                process.id,
                self.history
            );
            if config.is_some() && config == self.configs.candidate.as_ref() {
                on_candidate += 1;
            }
        }
        assert!(
            on_candidate <= 1,
            "{on_candidate} processes run a reload's configuration before its canary was ready; history: {:?}",
            self.history
        );
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
