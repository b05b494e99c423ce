//! The primary: starts workers with their sockets, admits them to the active set when they are
//! ready, answers their IPC, restarts failed ones with backoff, and stops them all in order.
//!
//! Every decision is the lifecycle state machine's ([`lifecycle`]); this module is its I/O
//! shell: it turns what happens (a reaped child, a datagram, a signal, a control request, a
//! timer) into the machine's inputs, and carries out the actions it returns. Everything runs as
//! one task on one thread (the CLI uses a current-thread runtime), so forking is safe and the
//! tables need no locks.
//!
//! What a [`Supervisor`] does to its process, so that an embedder knows:
//! - with [`SignalPolicy::Handle`] it installs handlers for TERM, INT, QUIT, HUP, TTIN and TTOU
//!   (see [`SignalPolicy`]); with [`SignalPolicy::Leave`] it touches no signal;
//! - it reaps only its own workers, each through a pidfd; with [`Config::subreaper`] it also
//!   makes the process a child subreaper and reaps any child (orphans of workers);
//! - it binds one abstract Unix datagram socket (the workers' NOTIFY_SOCKET), and reads the
//!   process's own NOTIFY_SOCKET to tell systemd READY/RELOADING/STOPPING;
//! - it loads one eBPF program per listen address (when privileged).

mod audit;
pub(crate) mod budget;
mod checks;
mod config;
mod diag;
mod events;
mod former;
mod groups;
mod handle;
mod ipc;
pub mod lifecycle;
mod node;
mod notify;
mod output;
mod process;
mod queries;
mod reaper;
mod signals;
mod status;
mod systemd;
pub mod upgrade;

use std::{collections::BTreeMap, time::Instant};

use nix::unistd::Pid;
use tokio::{
    io::unix::AsyncFd,
    sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender},
    time::sleep_until,
};

pub use checks::ClosedListener;
pub use config::{Config, SignalPolicy, READY_TIMEOUT};
pub use events::{Departure, Event, ExitStatus, Failure, KillReason, Readiness};
use groups::Groups;
pub use handle::{Control, Handle, ReloadReply, ScaleError};
use ipc::IpcEvent;
use lifecycle::{Action, Announced, Input, Lifecycle};
pub use lifecycle::{ReloadError, WorkerState};
pub use process::StartError;
use process::WorkerIo;
use reaper::Reaper;
use signals::Signals;
#[cfg(test)]
pub(crate) use status::fixture;
pub use status::{ClusterStatus, WorkerStatus};

use crate::{
    kernel::Balancer,
    node::{
        channel::NodeEvent,
        detect::{self, NodeMode, Verdict},
    },
    slots::SlotTable,
    spawn::{SpawnError, WorkerCommand},
};

/// Why a supervisor could not start.
#[derive(Debug, thiserror::Error)]
pub enum SupervisorError {
    #[error(transparent)]
    Command(#[from] SpawnError),
    #[error("installing signal handlers: {0}")]
    Signals(std::io::Error),
    #[error(transparent)]
    Listen(#[from] groups::GroupError),
    #[error("opening the workers' notify socket: {0}")]
    Notify(std::io::Error),
    #[error("starting the event loop: {0}")]
    Runtime(std::io::Error),
}

/// A primary. Build it inside a tokio runtime, take a [`Handle`] and the event stream if you
/// want them, then `run` it. See the module documentation for what it does to the process.
pub struct Supervisor {
    config: Config,
    lifecycle: Lifecycle,
    command: WorkerCommand,
    groups: Groups,
    slots: SlotTable,
    /// The I/O side of every process the lifecycle knows.
    workers: BTreeMap<Pid, WorkerIo>,
    notifier: systemd::Notifier,
    notify_socket: String,
    notify_rx: UnboundedReceiver<(i32, String)>,
    ipc_tx: UnboundedSender<(Pid, IpcEvent)>,
    ipc_rx: UnboundedReceiver<(Pid, IpcEvent)>,
    /// Workers get Node's cluster channel instead of cluster-lb's.
    node: bool,
    node_tx: UnboundedSender<(Pid, NodeEvent)>,
    node_rx: UnboundedReceiver<(Pid, NodeEvent)>,
    node_groups: node::NodeGroups,
    control_tx: UnboundedSender<Control>,
    control_rx: UnboundedReceiver<Control>,
    subscribers: Vec<UnboundedSender<Event>>,
    signals: Signals,
    reaper: Reaper,
    /// Everyone waiting for the reload under way.
    reload_replies: Vec<ReloadReply>,
    /// When to run the periodic checks (see `checks`).
    checks: tokio::time::Interval,
    /// Socket inodes of workers that are gone, while an orphan may still hold them.
    released_sockets: std::collections::HashSet<u64>,
    /// The seccomp filter workers start under (when `config.seccomp`).
    filter: crate::seccomp::Filter,
    /// When the supervisor was created, for the cluster's uptime.
    started: Instant,
    /// The workers' notify socket, to hand over in an upgrade.
    notify_fd: upgrade::state::Inherited,
    /// The embedder's descriptors an upgrade keeps (see [`Supervisor::keep_on_upgrade`]).
    kept: upgrade::Kept,
    /// Taken over from an older binary (not started afresh).
    resumed: bool,
    /// The notify socket's private directory, removed when the supervisor is dropped.
    notify_dir: Option<notify::NotifyDir>,
    /// Bytes of worker messages all channels together may hold (see `budget`).
    message_budget: std::sync::Arc<tokio::sync::Semaphore>,
}

impl Supervisor {
    /// Checks the command and the addresses and loads the programs; starts no worker yet.
    pub fn new(config: Config) -> Result<Supervisor, SupervisorError> {
        let command = WorkerCommand::new(&config.command)?;
        crate::spawn::raise_descriptor_limit();
        // Before any child exists, so no exit goes unnoticed.
        let signals =
            Signals::new(config.signals, config.subreaper).map_err(SupervisorError::Signals)?;
        let groups = Groups::new(
            &config.listen,
            config.strategy,
            config.require_ebpf,
            config.timing.grace,
        )?;
        let (notify_tx, notify_rx) = unbounded_channel();
        let senders = notify::Senders::of(config.credentials.as_ref());
        let (notify_name, notify_fd, notify_dir) =
            notify::open(notify_tx, senders).map_err(SupervisorError::Notify)?;
        if config.subreaper {
            // SAFETY: plain prctl.
            unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
        }
        if config.credentials.is_none() && nix::unistd::geteuid().is_root() {
            log::warn!("workers will run as root; use --user to drop privileges");
        }
        let lifecycle = Lifecycle::new(config.workers, config.timing, Instant::now());
        let mut supervisor = Supervisor::assemble(
            config,
            command,
            groups,
            signals,
            (notify_name, notify_fd, notify_rx),
            lifecycle,
        );
        supervisor.node = node_channel_wanted(&supervisor.config, &supervisor.command);
        supervisor.notify_dir = Some(notify_dir);
        Ok(supervisor)
    }

    /// The parts every supervisor has, new or resumed.
    fn assemble(
        config: Config,
        command: WorkerCommand,
        groups: Groups,
        signals: Signals,
        notify: (
            String,
            upgrade::state::Inherited,
            UnboundedReceiver<(i32, String)>,
        ),
        lifecycle: Lifecycle,
    ) -> Supervisor {
        let (notify_socket, notify_fd, notify_rx) = notify;
        let (ipc_tx, ipc_rx) = unbounded_channel();
        let (node_tx, node_rx) = unbounded_channel();
        let (control_tx, control_rx) = unbounded_channel();
        let filter = crate::seccomp::Filter::reuseport_guard(config.allow_io_uring);
        Supervisor {
            lifecycle,
            notifier: systemd::Notifier::from_environment(),
            config,
            command,
            groups,
            slots: SlotTable::new(),
            workers: BTreeMap::new(),
            notify_socket,
            notify_rx,
            ipc_tx,
            ipc_rx,
            node: false,
            node_tx,
            node_rx,
            node_groups: node::NodeGroups::default(),
            control_tx,
            control_rx,
            subscribers: Vec::new(),
            signals,
            reaper: Reaper::new(),
            reload_replies: Vec::new(),
            checks: tokio::time::interval(checks::CHECK_EVERY),
            released_sockets: std::collections::HashSet::new(),
            filter,
            started: Instant::now(),
            notify_fd,
            kept: upgrade::Kept::default(),
            resumed: false,
            message_budget: budget::Budget::shared(),
            notify_dir: None,
        }
    }

    /// Descriptors of the embedder (a control socket, a metrics listener) that an upgrade is to
    /// keep open for the new binary, which finds them in [`upgrade::Resumed::kept`].
    pub fn keep_on_upgrade(&mut self, kept: upgrade::Kept) {
        self.kept = kept;
    }

    pub fn handle(&self) -> Handle {
        Handle {
            control: self.control_tx.clone(),
        }
    }

    /// Worker processes it runs now.
    pub fn worker_count(&self) -> u32 {
        self.workers.len() as u32
    }

    /// Every event from now on.
    pub fn subscribe(&mut self) -> UnboundedReceiver<Event> {
        let (tx, rx) = unbounded_channel();
        self.subscribers.push(tx);
        rx
    }

    /// Starts the workers and supervises them until stopped. Returns once all have exited.
    pub async fn run(mut self) {
        if self.resumed {
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
        while !self.lifecycle.is_finished() {
            let input = self.next_input().await;
            if let Some(input) = input {
                self.step(input);
            }
        }
        self.stop_all_orphans().await;
        log::info!("all workers stopped");
    }

    fn log_start(&self) {
        let addresses: Vec<String> = self
            .groups
            .addresses()
            .iter()
            .map(|a| a.to_string())
            .collect();
        log::info!(
            "starting {} workers of {} on {} (strategy {})",
            self.lifecycle.wanted(),
            self.command.program(),
            if addresses.is_empty() {
                "addresses the workers ask for".into()
            } else {
                addresses.join(", ")
            },
            self.groups.strategy_in_effect()
        );
    }

    /// Waits for the next thing that happens and turns it into an input (if it is one).
    async fn next_input(&mut self) -> Option<Input> {
        let deadline = self.lifecycle.next_deadline();
        tokio::select! {
            Some(exited) = self.reaper.next() => {
                let status = exited.reap()?;
                self.workers.contains_key(&exited.pid).then_some(Input::Exited { pid: exited.pid, status })
            }
            request = self.signals.next() => self.on_signal(request),
            Some((pid, event)) = self.ipc_rx.recv() => self.on_ipc(pid, event),
            Some((pid, event)) = self.node_rx.recv() => self.on_node(pid, event),
            Some((sender, text)) = self.notify_rx.recv() => self.on_notify(sender, &text),
            Some(control) = self.control_rx.recv() => self.on_control(control),
            _ = sleep_until_or_forever(deadline) => Some(Input::Tick),
            _ = self.checks.tick() => {
                self.periodic_checks();
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
    }

    /// Carries out one action; a spawn answers with its outcome.
    fn execute(&mut self, action: Action) -> Option<Input> {
        match action {
            Action::Spawn { id } => Some(match self.start_process(id) {
                Ok((pid, slot)) => Input::Spawned {
                    id,
                    pid,
                    slot,
                    signals: self.node,
                },
                Err(error) => Input::SpawnFailed {
                    id,
                    error: error.to_string(),
                },
            }),
            Action::Activate { pid } => {
                self.set_active(pid, true);
                None
            }
            Action::Deactivate { pid } => {
                self.set_active(pid, false);
                None
            }
            Action::AskToStop { pid } => {
                self.ask_to_stop(pid);
                None
            }
            Action::Terminate { pid } => {
                let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
                None
            }
            Action::Kill { pid } => {
                self.kill(pid);
                None
            }
            Action::Release { pid } => {
                self.release(pid);
                None
            }
            Action::Notify(announced) => {
                match announced {
                    Announced::Ready => self.notifier.ready(),
                    Announced::Reloading => self.notifier.reloading(),
                    Announced::Stopping => self.notifier.stopping(),
                    Announced::Nothing => {}
                }
                None
            }
            Action::Emit(event) => {
                match event {
                    Event::Stopping { .. } => self.log_counters(),
                    Event::ReloadStarted { .. } => self.node_groups.rotate_server_data(),
                    _ => {}
                }
                self.emit(event);
                None
            }
            Action::ReloadDone(outcome) => {
                for reply in self.reload_replies.drain(..) {
                    let _ = reply.send(outcome.clone());
                }
                None
            }
        }
    }

    fn emit(&mut self, event: Event) {
        event.log();
        self.subscribers.retain(|s| s.send(event.clone()).is_ok());
    }

    fn on_signal(&mut self, request: signals::Request) -> Option<Input> {
        let wanted = self.lifecycle.wanted();
        match request {
            signals::Request::Stop => Some(Input::Stop { fast: false }),
            signals::Request::StopNow => Some(Input::Stop { fast: true }),
            signals::Request::Reload => Some(Input::Reload),
            signals::Request::More => Some(Input::Scale {
                workers: wanted + 1,
            }),
            signals::Request::Fewer => Some(Input::Scale {
                workers: wanted.saturating_sub(1),
            }),
            signals::Request::Upgrade => {
                // Returns only if the upgrade did not happen.
                let error = self.upgrade(None);
                log::error!("{error}");
                None
            }
            signals::Request::Child => {
                // Orphans are reaped and forgotten; a worker collected on the way is an exit.
                for (pid, status) in reaper::collect_children() {
                    if self.workers.contains_key(&pid) {
                        self.step(Input::Exited { pid, status });
                    } else {
                        log::debug!("reaped pid {pid}, an orphan of a worker: {status}");
                    }
                }
                None
            }
        }
    }

    fn on_notify(&mut self, sender: i32, text: &str) -> Option<Input> {
        if !notify::says_ready(text) {
            return None;
        }
        // The worker itself, or a process of its session (each worker leads its own).
        let worker = match self.workers.contains_key(&Pid::from_raw(sender)) {
            true => Some(Pid::from_raw(sender)),
            false => notify::session(sender)
                .map(Pid::from_raw)
                .filter(|session| self.workers.contains_key(session)),
        };
        match worker {
            Some(pid) => Some(Input::Ready {
                pid,
                how: Readiness::Notify,
            }),
            None => {
                log::debug!("READY=1 from pid {sender}, which is not a worker");
                None
            }
        }
    }

    fn on_control(&mut self, control: Control) -> Option<Input> {
        match control {
            Control::Send { pid, data } => {
                self.send_message(Pid::from_raw(pid), data);
                None
            }
            Control::Disconnect { pid } => Some(Input::Leaving {
                pid: Pid::from_raw(pid),
                why: Departure::Asked,
            }),
            Control::Kill { pid, signal } => {
                if self.workers.contains_key(&Pid::from_raw(pid)) {
                    let _ = nix::sys::signal::kill(Pid::from_raw(pid), signal);
                }
                None
            }
            Control::Stop { fast } => Some(Input::Stop { fast }),
            Control::Reload { reply } => {
                self.reload_replies.extend(reply);
                Some(Input::Reload)
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
            for (pid, worker) in &self.workers {
                match balancer.slot_stats(worker.slot) {
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

/// Whether workers get Node's cluster channel; says why in one line when it decides alone.
fn node_channel_wanted(config: &Config, command: &WorkerCommand) -> bool {
    match config.node {
        NodeMode::On => true,
        NodeMode::Off => false,
        NodeMode::Auto => match detect::detect(std::path::Path::new(&command.program())) {
            Verdict::Node => {
                if !detect::runs_a_script(&config.command) {
                    log::warn!(
                        "node without a script file (-e, -p, the REPL) cannot be a cluster worker; workers get no Node channel (give a script: -- node app.js)"
                    );
                    return false;
                }
                log::info!(
                    "the workers are Node programs: they get Node's cluster channel, so their listen() calls get sockets from cluster-lb (--node off to disable)"
                );
                true
            }
            Verdict::Launcher(name) => {
                log::warn!(
                    "{name} starts the app as a child of its own, which takes Node's cluster channel away from it; run node directly (-- node app.js), or pass --node on if {name} execs node"
                );
                false
            }
            Verdict::NotNode => false,
        },
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

/// Forwards the program's aya-log records to our log, from a task of their own.
pub(crate) fn drain_program_log(balancer: &mut Balancer) {
    let logger = match balancer.take_logger() {
        Ok(logger) => logger,
        Err(e) => {
            log::debug!("no eBPF log channel: {e:#}");
            return;
        }
    };
    // SAFETY: the logger owns its ring-buffer map fd, which stays open and the same for as long
    // as the logger lives, and the AsyncFd owns the logger.
    let registered =
        unsafe { AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE) };
    let Ok(mut logger) = registered else {
        return;
    };
    tokio::spawn(async move {
        while let Ok(mut guard) = logger.readable_mut().await {
            guard.get_inner_mut().flush();
            guard.clear_ready();
        }
    });
}

async fn sleep_until_or_forever(deadline: Option<Instant>) {
    match deadline {
        Some(at) => sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}
