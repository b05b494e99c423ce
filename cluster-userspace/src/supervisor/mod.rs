//! The primary: starts workers with their sockets, admits them to the active set when they are
//! ready, answers their channels, restarts failed ones with backoff, and stops them all in
//! order.
//!
//! Every decision is the lifecycle state machine's (`lifecycle`); the rest is its I/O shell,
//! split by what each part owns: the `inbox` turns what happens (a reaped child, a message, a
//! signal, a control request, a timer) into one stream, the `workers` hold every process's I/O
//! and start new ones (with `launch`), the listen groups are the kernel's (`kernel::groups`),
//! and the `outputs` say what happened. [`Supervisor`] only carries out the lifecycle's
//! actions with them. Everything runs as one task of a current-thread runtime, so the tables
//! need no locks.
//!
//! What a [`Supervisor`] does to its process, so that an embedder knows:
//! - with [`SignalPolicy::Handle`] it installs handlers for TERM, INT, QUIT, HUP, TTIN and TTOU
//!   (see [`SignalPolicy`]); with [`SignalPolicy::Leave`] it touches no signal;
//! - it reaps only its own workers, each through a pidfd; with [`Config::subreaper`] it also
//!   makes the process a child subreaper and reaps any child (orphans of workers);
//! - it binds one Unix datagram socket (the workers' NOTIFY_SOCKET, in a private directory),
//!   and reads the process's own NOTIFY_SOCKET to tell systemd READY/RELOADING/STOPPING;
//! - it loads one eBPF program per listen address (when privileged).

mod checks;
mod config;
mod events;
mod former;
mod handle;
mod health;
mod inbox;
pub(crate) mod launch;
pub(crate) mod lifecycle;
mod notify;
mod outputs;
mod program;
mod reaper;
mod reconfigure;
pub(crate) mod saved;
mod signals;
mod status;
mod systemd;
pub(crate) mod upgrade;
mod workers;

use std::time::Instant;

use nix::unistd::Pid;
use tokio::sync::mpsc::UnboundedReceiver;

pub use config::{
    ClosedListener, Config, PrimaryMode, Reconfigure, Restart, UpgradeSource, INSTANCE_VAR,
    READY_TIMEOUT,
};
pub use events::{Departure, Event, ExitStatus, Failure, KillReason, Readiness, ReloadError};
pub use handle::{Control, Handle, Recipients, ReloadReply, ScaleError, SendError, UpgradeError};
pub use health::{HealthLimits, DEFAULT_HANG_TIMEOUT};
use inbox::{Feeds, Happened, Inbox};
pub use launch::spawn::{Credentials, SpawnError};
use launch::{seccomp::Filter, spawn::WorkerCommand};
use lifecycle::{Action, Count, Input, Lifecycle, Policy};
pub use lifecycle::{Timing, WorkerState};
use outputs::Outputs;
pub use signals::SignalPolicy;
use signals::{Signalled, Signals};
#[cfg(test)]
pub(crate) use status::fixture;
pub use status::{ClusterStatus, WorkerStatus};
pub use workers::js_number;
pub use workers::StartError;
use workers::{ChannelEvent, Heard, Launch, Protocol, QueryPolicy, Start, Workers};

pub use crate::{kernel::Strategy, protocol::nodejs::detect::NodeMode};
use crate::{
    kernel::{
        groups::{GroupError, Groups},
        unix_listens::{Owner, UnixListens},
    },
    protocol::nodejs::detect::{self, Verdict},
};

/// Why a supervisor could not start.
#[derive(Debug, thiserror::Error)]
pub enum SupervisorError {
    #[error(transparent)]
    Command(#[from] SpawnError),
    #[error("installing signal handlers: {0}")]
    Signals(std::io::Error),
    #[error(transparent)]
    Listen(#[from] GroupError),
    #[error(transparent)]
    Claim(#[from] former::ClaimError),
    #[error("opening the workers' notify socket: {0}")]
    Notify(std::io::Error),
    #[error("starting the event loop: {0}")]
    Runtime(std::io::Error),
}

/// How a supervisor came to run.
struct Origin {
    /// When the cluster started (before any in-place upgrade), for its uptime.
    started: Instant,
    /// Taken over from an older binary (not started afresh).
    resumed: bool,
}

/// A primary. Build it inside a tokio runtime, take a [`Handle`] and the event stream if you
/// want them, then `run` it. See the module documentation for what it does to the process.
pub struct Supervisor {
    config: Config,
    lifecycle: Lifecycle,
    inbox: Inbox,
    /// Senders into the inbox (kept to make handles and to start channels' readers).
    feeds: Feeds,
    workers: Workers,
    groups: Groups,
    outputs: Outputs,
    /// The workers' NOTIFY_SOCKET (its descriptor and directory outlive an upgrade).
    notify: notify::NotifySocket,
    /// The embedder's descriptors an upgrade keeps (see [`Supervisor::keep_on_upgrade`]).
    kept: upgrade::Kept,
    /// Since when the cluster runs, and whether this binary took it over.
    origin: Origin,
    /// The program's own primary process (a Node program's primary branch), when it has one.
    program: program::Program,
    /// What the health sampler watches and last read.
    health: health::Health,
    /// The configuration a reload read anew, for its canary (see `reconfigure`).
    candidate: Option<reconfigure::Candidate>,
}

impl Supervisor {
    /// Checks the command and the addresses and loads the programs; starts no worker yet.
    pub fn new(config: Config) -> Result<Supervisor, SupervisorError> {
        let command = WorkerCommand::for_config(&config)?;
        launch::spawn::raise_descriptor_limit();
        // Before any child exists, so no exit goes unnoticed.
        let signals =
            Signals::new(config.signals, config.subreaper).map_err(SupervisorError::Signals)?;
        // A --listen address still held by workers of a primary that died is freed first.
        for addr in &config.listen {
            former::claim(*addr, config.timing.grace)?;
        }
        let owner = config.credentials.as_ref().map(|c| Owner {
            uid: c.uid,
            gid: c.gid,
        });
        let groups = Groups::new(&config.listen, config.strategy, config.require_ebpf)?
            .with_unix(UnixListens::new(&config.listen_unix, owner).map_err(GroupError::from)?);
        let (inbox, feeds) = Inbox::new(signals, checks::CHECK_EVERY, Some(health::SAMPLE_EVERY));
        let senders = notify::Senders::of(config.credentials.as_ref());
        let notify =
            notify::open(feeds.notify.clone(), senders).map_err(SupervisorError::Notify)?;
        if config.subreaper {
            // SAFETY: plain prctl.
            unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
        }
        if config.credentials.is_none() && nix::unistd::geteuid().is_root() {
            log::warn!("workers will run as root; use --user to drop privileges");
        }
        let protocol = protocol_wanted(&config, &command);
        let policy = policy(&config, protocol);
        // With --node-primary on and no -w, the program's forks start the workers.
        let first = match (config.node_primary, policy.count) {
            (PrimaryMode::On, Count::Program) => 0,
            _ => config.workers,
        };
        let lifecycle = Lifecycle::with(first, policy, config.timing, Instant::now());
        Ok(Supervisor::assemble(
            config,
            command,
            protocol,
            groups,
            (inbox, feeds),
            notify,
            lifecycle,
        ))
    }

    /// The parts every supervisor has, new or resumed.
    fn assemble(
        config: Config,
        command: WorkerCommand,
        protocol: Protocol,
        groups: Groups,
        (inbox, feeds): (Inbox, Feeds),
        notify: notify::NotifySocket,
        lifecycle: Lifecycle,
    ) -> Supervisor {
        let launch = Launch {
            protocol,
            filter: config
                .seccomp
                .then(|| Filter::reuseport_guard(config.allow_io_uring)),
            credentials: config.credentials.clone(),
            notify_socket: notify.name.clone(),
            max_message: config.max_message,
            watchdog: config.health.watchdog,
            stop_signal: config.stop_signal,
            instance_var: config.instance_var.clone(),
            increment: reconfigure::increment(&config, &command),
            command,
        };
        let program = program::Program::new(
            config.node_primary,
            install_preload(&config, protocol, &notify.name),
        );
        Supervisor {
            program,
            health: health::Health::new(config.health),
            workers: Workers::new(launch, feeds.channels.clone(), feeds.forwarded.clone()),
            lifecycle,
            config,
            groups,
            inbox,
            feeds,
            outputs: Outputs::new(),
            notify,
            kept: upgrade::Kept::default(),
            origin: Origin {
                started: Instant::now(),
                resumed: false,
            },
            candidate: None,
        }
    }

    /// Descriptors of the embedder (a control socket, a metrics listener) that an upgrade is to
    /// keep open for the new binary, which finds them in `upgrade::Resumed::kept`.
    pub(crate) fn keep_on_upgrade(&mut self, kept: upgrade::Kept) {
        self.kept = kept;
    }

    pub fn handle(&self) -> Handle {
        Handle {
            control: self.feeds.control.clone(),
        }
    }

    /// Worker processes it runs now.
    pub fn worker_count(&self) -> u32 {
        self.workers.len() as u32
    }

    /// Every event from now on.
    pub fn subscribe(&mut self) -> UnboundedReceiver<Event> {
        self.outputs.subscribe()
    }

    /// Starts the workers and supervises them until stopped. Returns once all have exited.
    pub async fn run(mut self) {
        if self.origin.resumed {
            log::info!(
                "cluster-lb {} took over {} workers (pid {})",
                crate::version::version(),
                self.workers.len(),
                std::process::id()
            );
        } else {
            self.log_start();
        }
        self.step(Input::Tick);
        if self.program.mode == PrimaryMode::On && self.program.preload.is_some() {
            self.step(Input::StartPrimary { detected: false });
        }
        while !self.lifecycle.is_finished() {
            let happened = self.inbox.next(self.lifecycle.next_deadline()).await;
            if let Some(input) = self.on(happened) {
                self.step(input);
            }
        }
        self.stop_all_orphans().await;
        self.groups.unix().remove_files();
        log::info!("all workers stopped");
    }

    fn log_start(&self) {
        let addresses = self.groups.listen_names();
        log::info!(
            "starting {} workers of {}{} on {} (strategy {})",
            self.lifecycle.wanted(),
            self.workers.launch.command.program(),
            match &self.config.cwd {
                Some(dir) => format!(" in {}", dir.display()),
                None => String::new(),
            },
            if addresses.is_empty() {
                "addresses the workers ask for".into()
            } else {
                addresses.join(", ")
            },
            self.groups.strategy_in_effect()
        );
    }

    /// What something that happened means for the lifecycle, if anything.
    fn on(&mut self, happened: Happened) -> Option<Input> {
        match happened {
            Happened::Exited(exited) => {
                let status = exited.reap()?;
                let ours = self.workers.contains(exited.pid) || self.program.is(exited.pid);
                ours.then_some(Input::Exited {
                    pid: exited.pid,
                    status,
                })
            }
            Happened::Request(request) => {
                self.on_request(request);
                None
            }
            Happened::Output(output) => {
                self.output_to_program(output);
                None
            }
            Happened::Signal(signal) => self.on_signal(signal),
            Happened::Channel(pid, event) => self.on_channel(pid, event),
            Happened::Notify(sender, text) => self.on_notify(sender, &text),
            Happened::Control(control) => self.on_control(control),
            Happened::Due => Some(Input::Tick),
            Happened::Checks => {
                self.periodic_checks();
                None
            }
            Happened::Health => {
                self.sample_health();
                None
            }
        }
    }

    /// Gives the lifecycle one input and carries out every action, including those that follow
    /// from the spawns it asks for.
    fn step(&mut self, input: Input) {
        let mut queue: std::collections::VecDeque<Action> =
            self.lifecycle.handle(input, Instant::now()).into();
        while let Some(action) = queue.pop_front() {
            if let Some(reply) = self.execute(action) {
                queue.extend(self.lifecycle.handle(reply, Instant::now()));
            }
        }
        self.awaited_to_program();
    }

    /// Carries out one action; a spawn answers with its outcome.
    fn execute(&mut self, action: Action) -> Option<Input> {
        match action {
            Action::Spawn { id, canary: false } => Some(self.spawn(id)),
            Action::Spawn { id, canary: true } => Some(self.spawn_canary(id)),
            Action::CanaryReady { id, pid } => {
                self.canary_ready(id, pid);
                None
            }
            Action::SpawnPrimary => Some(self.spawn_program_primary()),
            Action::Offer { id, pid } => {
                self.offer_to_program(id, pid);
                None
            }
            Action::ForkAnswer(answer) => {
                self.program.answers.push(answer);
                None
            }
            Action::ExitToPrimary { id, pid, status } => {
                self.exit_to_program(id, pid, status);
                None
            }
            Action::Activate { pid } => {
                self.workers.set_active(pid, true, &mut self.groups);
                None
            }
            Action::Deactivate { pid } => {
                self.workers.set_active(pid, false, &mut self.groups);
                None
            }
            Action::AskToStop { pid } => {
                self.workers.ask_to_stop(pid);
                None
            }
            Action::Terminate { pid } => {
                // A worker lingering after `disconnect` gets the stop signal (an app written
                // for PM2 cleans up on SIGINT); the program's primary process, SIGTERM.
                let signal = if self.workers.contains(pid) {
                    self.workers.launch.stop_signal
                } else {
                    nix::sys::signal::Signal::SIGTERM
                };
                let _ = nix::sys::signal::kill(pid, signal);
                None
            }
            Action::Kill { pid } => {
                Workers::kill(pid);
                None
            }
            Action::Release { pid } => {
                if self.release_program_primary(pid) {
                    return None;
                }
                if self.workers.release(pid, &mut self.groups) {
                    self.stop_orphans_holding_sockets();
                }
                None
            }
            Action::Notify(announced) => {
                self.outputs.announce(announced);
                None
            }
            Action::Emit(event) => {
                match event {
                    Event::Stopping { .. } => {
                        self.log_counters();
                        self.workers.close_reserve(&mut self.groups);
                    }
                    Event::ReloadStarted { .. } => self.workers.node.rotate_server_data(),
                    _ => {}
                }
                self.outputs.emit(event);
                None
            }
            Action::ReloadDone(outcome) => self.reload_done(outcome),
        }
    }

    /// Starts a process for worker `id`: as the program's primary forked it, or the command
    /// line's program.
    fn spawn(&mut self, id: u32) -> Input {
        let fork = self.program.variants.get(self.lifecycle.variant(id));
        // Workers of the command line's program load the preload: it tells whether the
        // program has a primary branch, and a worker that calls a primary-only function (a
        // program that is only ever a primary under Node) leaves quietly.
        let preload = match (&self.program.preload, fork) {
            (Some(preload), None) => {
                let user = self.workers.launch.command.base_variable("NODE_OPTIONS");
                program::node_options(preload, user.as_deref())
            }
            _ => Vec::new(),
        };
        let start = Start {
            id,
            wanted: self.lifecycle.wanted(),
            node_id: id + 1 - self.lifecycle.first_id().min(1),
            instance: id.saturating_sub(self.lifecycle.first_id()),
            fork,
            preload: &preload,
        };
        match self.workers.start(&start, &mut self.groups) {
            Ok((pid, slot)) => {
                self.inbox.watch(pid);
                Input::Spawned {
                    id,
                    pid,
                    slot,
                    signals_readiness: self.workers.launch.protocol.signals_readiness(),
                }
            }
            Err(error) => Input::SpawnFailed {
                id,
                error: error.to_string(),
            },
        }
    }

    fn on_signal(&mut self, signal: Signalled) -> Option<Input> {
        let wanted = self.lifecycle.wanted();
        match signal {
            Signalled::Stop => Some(Input::Stop { fast: false }),
            Signalled::StopNow => Some(Input::Stop { fast: true }),
            Signalled::Reload => self.reload(),
            Signalled::More => Some(Input::Scale {
                workers: wanted + 1,
            }),
            Signalled::Fewer => Some(Input::Scale {
                workers: wanted.saturating_sub(1),
            }),
            Signalled::Upgrade => {
                // Returns only if the upgrade did not happen.
                let error = self.upgrade(None);
                log::error!("{error}");
                None
            }
            Signalled::Child => {
                // Orphans are reaped and forgotten; a worker collected on the way is an exit.
                for (pid, status) in reaper::collect_children() {
                    if self.workers.contains(pid) || self.program.is(pid) {
                        self.step(Input::Exited { pid, status });
                    } else {
                        log::debug!("reaped pid {pid}, an orphan of a worker: {status}");
                    }
                }
                None
            }
        }
    }

    /// What a worker's channel said (or the program's primary's).
    fn on_channel(&mut self, pid: Pid, event: ChannelEvent) -> Option<Input> {
        if self.program.is(pid) {
            if let ChannelEvent::Node(event) = event {
                self.on_program_channel(event);
            }
            return None;
        }
        let (id, heard) = self.workers.hear(pid, event)?;
        match heard {
            Heard::Nothing => None,
            Heard::Online => {
                if self.workers.get(pid).is_some_and(|w| w.channel.is_node()) {
                    self.worker_said(id, pid, program::online());
                }
                Some(Input::Online { pid })
            }
            Heard::Listening(address, node) => {
                if let Some(message) = node {
                    self.worker_said(id, pid, message);
                }
                self.outputs.emit(Event::Listening {
                    id,
                    pid: pid.as_raw(),
                    address,
                });
                Some(Input::Ready {
                    pid,
                    how: Readiness::Listening,
                })
            }
            Heard::Message(data, room) => {
                if self.config.log_messages {
                    log::info!("message from worker {id} (pid {pid}): {data}");
                }
                // PM2's readiness signal, `process.send('ready')`: the lifecycle decides
                // whether it counts (--wait-ready); it is also a message like any other.
                let ready =
                    (data == serde_json::Value::String("ready".into())).then_some(Input::Ready {
                        pid,
                        how: Readiness::Message,
                    });
                // Its room in the budget goes back once it is handed on (written to the
                // program's primary, or emitted).
                if let Err(_room) = self.message_to_program(id, pid, &data, room) {
                    self.outputs.emit(Event::Message {
                        id,
                        pid: pid.as_raw(),
                        data,
                    });
                }
                ready
            }
            Heard::Leaving(Departure::ListenerClosed(address))
                if self.keeps_closed_listeners(pid) =>
            {
                // A Node program's worker closing one of its servers is ordinary Node: its
                // primary (or --on-closed-listener report) decides, not cluster-lb.
                self.outputs.emit(Event::ListenerClosed {
                    id,
                    pid: pid.as_raw(),
                    address,
                });
                None
            }
            Heard::Leaving(why) => {
                if why == Departure::WorkerDisconnected
                    && self.workers.get(pid).is_some_and(|w| w.channel.is_node())
                {
                    self.worker_said(id, pid, program::exited_after_disconnect());
                }
                Some(Input::Leaving { pid, why })
            }
            Heard::Query(query) => {
                let policy = QueryPolicy {
                    low_ports: self.config.credentials.is_none() || self.config.allow_low_ports,
                    own_paths: self.config.credentials.is_none(),
                };
                self.workers.answer(pid, query, &mut self.groups, policy);
                None
            }
            Heard::ReadsRole => {
                if self.program.mode == PrimaryMode::Auto
                    && self.program.preload.is_some()
                    && !self.lifecycle.has_primary()
                {
                    log::info!(
                        "worker {id} (pid {pid}) reads cluster.isPrimary: the program has a primary branch, which runs now (--node-primary off to keep it from running)"
                    );
                    return Some(Input::StartPrimary { detected: true });
                }
                None
            }
            Heard::Violation(problem) => self.reject(pid, &problem),
            Heard::Closed => {
                self.disconnect_to_program(id, pid);
                Some(Input::ChannelClosed { pid })
            }
        }
    }

    /// Whether a worker that closed a listening socket stays (reported only): with
    /// `--on-closed-listener report`, and for a Node program that runs its own primary or its
    /// own restarts, where a server closed and opened again is the program's business.
    fn keeps_closed_listeners(&self, pid: Pid) -> bool {
        self.config.closed_listener == ClosedListener::Report
            || self.config.restart == Restart::Program
            || self.lifecycle.is_claimed(pid)
    }

    /// A worker broke its channel's protocol: log it, close the channel; the lifecycle drains
    /// it. Others keep serving.
    fn reject(&mut self, pid: Pid, problem: &str) -> Option<Input> {
        self.workers.reject(pid, problem)?;
        Some(Input::Leaving {
            pid,
            why: Departure::ProtocolViolation(problem.to_string()),
        })
    }

    fn on_notify(&mut self, sender: i32, text: &str) -> Option<Input> {
        // The worker itself, or a process of its session: every worker leads a session of its
        // own, so READY=1 from a worker's helper processes (a shell wrapper's child) counts for
        // it, and no process of another worker can join that session to speak for it (a
        // process group could be joined from anywhere in the session).
        let worker = match self.workers.contains(Pid::from_raw(sender)) {
            true => Some(Pid::from_raw(sender)),
            false => crate::sys::procfs::session(sender)
                .map(Pid::from_raw)
                .filter(|session| self.workers.contains(*session)),
        };
        let Some(pid) = worker else {
            log::debug!("{text:?} from pid {sender}, which is not a worker");
            return None;
        };
        if notify::says_watchdog(text) {
            self.health.watchdog_ping(pid);
        }
        notify::says_ready(text).then_some(Input::Ready {
            pid,
            how: Readiness::Notify,
        })
    }

    fn on_control(&mut self, control: Control) -> Option<Input> {
        match control {
            Control::Send { pid, data } => {
                self.workers.send(Pid::from_raw(pid), data);
                None
            }
            Control::Deliver { to, data, reply } => {
                // The lifecycle knows which processes are being stopped: a message is for
                // those that serve their id, or are about to.
                let serving: Vec<(u32, Pid)> = self
                    .lifecycle
                    .processes()
                    .filter(|p| !matches!(p.state(), WorkerState::Draining | WorkerState::Killed))
                    .map(|p| (p.id, p.pid))
                    .collect();
                let wanted: Vec<u32> = self.lifecycle.wanted_ids().collect();
                let outcome = match self.lifecycle.is_stopping() {
                    true => Err(SendError::Stopping),
                    false => self.workers.deliver(to, data, &serving, &wanted),
                };
                let _ = reply.send(outcome);
                None
            }
            Control::Disconnect { pid } => Some(Input::Leaving {
                pid: Pid::from_raw(pid),
                why: Departure::Asked,
            }),
            Control::Kill { pid, signal } => {
                if self.workers.contains(Pid::from_raw(pid)) {
                    let _ = nix::sys::signal::kill(Pid::from_raw(pid), signal);
                }
                None
            }
            Control::Stop { fast } => Some(Input::Stop { fast }),
            Control::Reload { reply } => {
                if let Some(reply) = reply {
                    self.outputs.await_reload(reply);
                }
                self.reload()
            }
            Control::Scale { workers, reply } => {
                let outcome = if self.lifecycle.is_stopping() {
                    Err(ScaleError::Stopping)
                } else {
                    Ok(self.lifecycle.wanted())
                };
                let input = outcome.is_ok().then_some(Input::Scale { workers });
                if let Some(reply) = reply {
                    let _ = reply.send(outcome);
                }
                input
            }
            Control::Status { reply } => {
                let _ = reply.send(self.status());
                None
            }
            Control::Upgrade { requester, reply } => {
                // Returns only if the upgrade did not happen; else the new binary answers.
                let error = self.upgrade(requester);
                log::error!("{error}");
                let _ = reply.send(error);
                None
            }
        }
    }

    /// Logs what the kernel program counted for each running worker.
    fn log_counters(&self) {
        for group in self.groups.iter() {
            let Some(balancer) = &group.balancer else {
                continue;
            };
            for (pid, worker) in self.workers.iter() {
                match balancer.slot_stats(worker.slot()) {
                    Ok(stats) => log::info!(
                        "{} worker {} (pid {pid}): selected={} fallback={} migrated={}",
                        group.addr,
                        worker.id,
                        stats.selected,
                        stats.fallback,
                        stats.migrated
                    ),
                    Err(e) => log::warn!("{}: {e:#}", group.addr),
                }
            }
            if let Ok(unassigned) = balancer.unassigned_fallbacks() {
                if unassigned > 0 {
                    log::info!(
                        "{}: {unassigned} connections found no live worker slot",
                        group.addr
                    );
                }
            }
        }
    }
}

/// Ids, restarts and the count, from the command line: Node workers count from 1, as
/// `cluster.worker.id` does; the program's forks decide how many unless `-w` was given.
fn policy(config: &Config, protocol: Protocol) -> Policy {
    let node = protocol == Protocol::Node;
    Policy {
        first_id: u32::from(node),
        wait_ready: config.wait_ready,
        restart: config.restart,
        count: if node && config.node_primary != PrimaryMode::Off && !config.workers_given {
            Count::Program
        } else {
            Count::Fixed
        },
    }
}

/// Writes the Node preload next to the workers' notify socket, when the program's primary may
/// run; `None` (with a line saying why) when it cannot.
fn install_preload(
    config: &Config,
    protocol: Protocol,
    notify_socket: &str,
) -> Option<std::path::PathBuf> {
    if protocol != Protocol::Node || config.node_primary == PrimaryMode::Off {
        if config.node_primary == PrimaryMode::On {
            log::warn!("--node-primary on: the workers are not Node programs (see --node), so no primary process runs");
        }
        return None;
    }
    let dir = std::path::Path::new(notify_socket).parent()?;
    let gid = config.credentials.as_ref().map(|c| c.gid);
    match program::install_preload(dir, gid) {
        Ok(path) => Some(path),
        Err(e) => {
            log::warn!("cannot write cluster-lb's Node preload to {}: {e}; the program's primary branch does not run", dir.display());
            None
        }
    }
}

/// Which channel workers get; says why in one line when it decides alone.
fn protocol_wanted(config: &Config, command: &WorkerCommand) -> Protocol {
    let node = match config.node {
        NodeMode::On => true,
        NodeMode::Off => false,
        NodeMode::Auto => match detect::detect(&command.located()) {
            Verdict::Node if !detect::runs_a_script(&config.command) => {
                log::warn!(
                    "node without a script file (-e, -p, the REPL) cannot be a cluster worker; workers get no Node channel (give a script: -- node app.js)"
                );
                false
            }
            Verdict::Node => {
                log::info!(
                    "the workers are Node programs: they get Node's cluster channel, so their listen() calls get sockets from cluster-lb (--node off to disable)"
                );
                true
            }
            Verdict::Launcher(name) => {
                log::warn!(
                    "{name} starts the app as a child of its own, which takes Node's cluster channel away from it: its listen() binds alone; run node directly (-- node app.js; `npm start` and `npm run SCRIPT` are run that way when the script is a plain node command)"
                );
                false
            }
            Verdict::NotNode => false,
        },
    };
    if node {
        Protocol::Node
    } else {
        Protocol::ClusterLb
    }
}

/// `cluster-lb run`'s event loop: a current-thread runtime until `body` completes.
pub fn block_on<T>(body: impl std::future::Future<Output = T>) -> Result<T, SupervisorError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(SupervisorError::Runtime)?;
    Ok(runtime.block_on(body))
}
