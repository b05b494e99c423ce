//! The primary: starts workers with their sockets, admits them to the active set when they are
//! ready, answers their IPC, restarts crashed ones with backoff, and stops them all in order.
//!
//! Everything runs as one task on one thread (the CLI uses a current-thread runtime), so
//! forking is safe and the worker table needs no locks. `cluster-lb run` and programs that
//! embed a primary (see [`Supervisor`]) share this code.

mod events;
mod exits;
mod groups;
mod handle;
mod ipc;
mod notify;
mod output;
mod reload;
mod status;
mod stop;
mod systemd;

use std::{
    collections::BTreeMap,
    os::fd::{AsFd, OwnedFd},
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use nix::{
    sys::signal::{kill, Signal},
    unistd::Pid,
};
use tokio::{
    io::unix::AsyncFd,
    signal::unix::{signal, Signal as SignalStream, SignalKind},
    sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender},
    time::sleep_until,
};

pub use events::{Event, ExitStatus};
use exits::backoff;
use groups::Groups;
pub use handle::{Control, Handle};
use ipc::{read_ipc, IpcEvent};
pub use reload::{ReloadReply, READY_TIMEOUT};
pub use status::{ClusterStatus, WorkerStatus};

use crate::{
    ipc::{
        channel::{self, Endpoint},
        protocol::{self, PrimaryMessage, VERSION},
    },
    kernel::{Balancer, Strategy},
    listen_addr::ListenAddr,
    logging::Stream,
    slots::SlotTable,
    spawn::{Credentials, WorkerCommand, WorkerSpec},
};

/// Everything a primary is asked to do.
#[derive(Debug, Clone)]
pub struct Config {
    pub workers: u32,
    pub listen: Vec<ListenAddr>,
    pub strategy: Strategy,
    pub require_ebpf: bool,
    pub grace: Duration,
    /// Readiness for programs that signal nothing: active this long after start. Programs that
    /// say `online` on IPC are ready at `listening`; programs may always say READY=1 sooner.
    pub ready_delay: Duration,
    /// How long a reload waits for a replacement to be ready before it gives up on it.
    pub ready_timeout: Duration,
    pub credentials: Option<Credentials>,
    /// The control socket, and whether its path was asked for (`--control`) or is the default.
    pub control: Option<(std::path::PathBuf, bool)>,
    /// Where to serve Prometheus metrics.
    pub metrics: Option<std::net::SocketAddr>,
    pub command: Vec<String>,
}

impl Config {
    /// For a program that is its own primary (the Node `cluster` idiom): `workers` copies of
    /// this very program, with these arguments, asking for their addresses over IPC, with the
    /// CLI's defaults otherwise. Adjust the fields before use.
    pub fn reexec_current(workers: u32) -> Result<Config> {
        let exe = std::env::current_exe().context("finding this program's path")?;
        let mut command = vec![exe.display().to_string()];
        command.extend(std::env::args().skip(1));
        Ok(Config {
            workers,
            listen: Vec::new(),
            strategy: Strategy::RoundRobin,
            require_ebpf: false,
            grace: Duration::from_secs(30),
            ready_delay: Duration::from_secs(1),
            ready_timeout: READY_TIMEOUT,
            credentials: None,
            control: None,
            metrics: None,
            command,
        })
    }
}

struct Worker {
    id: u32,
    slot: u32,
    started: Instant,
    /// Said `online` on IPC: readiness then comes from `listening`.
    online: bool,
    ready: bool,
    /// Out of the active set and asked to stop; its exit is expected.
    draining: bool,
    /// Not to be restarted when it exits (replaced by a reload, or scaled away).
    retiring: bool,
    ipc: Option<Arc<Endpoint>>,
    /// Addresses it has sockets for (socket-activated or from queryServer).
    addresses: Vec<ListenAddr>,
    /// When `--ready-delay` makes it ready if nothing else did.
    ready_deadline: Option<Instant>,
}

struct Stopping {
    deadline: tokio::time::Instant,
    killed: bool,
}

/// A primary. Build it inside a tokio runtime, take a [`Handle`] and the event stream if you
/// want them, then `run` it.
pub struct Supervisor {
    config: Config,
    command: WorkerCommand,
    groups: Groups,
    slots: SlotTable,
    workers: BTreeMap<Pid, Worker>,
    /// Consecutive early crashes per worker id.
    crashes: BTreeMap<u32, u32>,
    /// Restarts so far per worker id (for status and metrics).
    restart_counts: BTreeMap<u32, u32>,
    /// Workers wanted: ids 0 .. desired-1.
    desired: u32,
    reloads: u64,
    reload: Option<reload::Reload>,
    ready_timeout: Duration,
    notifier: systemd::Notifier,
    /// READY=1 was sent to our own NOTIFY_SOCKET after the first workers became ready.
    announced_ready: bool,
    /// Worker ids waiting to be started, by when.
    restarts: Vec<(Instant, u32)>,
    stopping: Option<Stopping>,
    notify_socket: String,
    notify_rx: UnboundedReceiver<(i32, String)>,
    ipc_tx: UnboundedSender<(Pid, IpcEvent)>,
    ipc_rx: UnboundedReceiver<(Pid, IpcEvent)>,
    control_tx: UnboundedSender<Control>,
    control_rx: UnboundedReceiver<Control>,
    subscribers: Vec<UnboundedSender<Event>>,
    signals: Signals,
}

/// `cluster-lb run`: a primary on a current-thread runtime until TERM, INT or QUIT.
pub fn run(config: Config) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the event loop")?;
    runtime.block_on(async { Supervisor::new(config)?.run().await })
}

impl Supervisor {
    /// Checks the command and the addresses and loads the programs; starts no worker yet.
    pub fn new(config: Config) -> Result<Supervisor> {
        let command = WorkerCommand::new(&config.command)?;
        // Before any child exists, so no exit goes unnoticed.
        let signals = Signals::new()?;
        let groups = Groups::new(&config.listen, config.strategy, config.require_ebpf)?;
        let (notify_tx, notify_rx) = unbounded_channel();
        let notify_socket = notify::open(notify_tx)?;
        // Orphans of our workers (a wrapper's children) are re-parented to us and reaped here,
        // as PID 1 in a container does for everything.
        // SAFETY: plain prctl.
        unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
        if config.credentials.is_none() && nix::unistd::geteuid().is_root() {
            log::warn!("workers will run as root; use --user to drop privileges");
        }
        let (ipc_tx, ipc_rx) = unbounded_channel();
        let (control_tx, control_rx) = unbounded_channel();
        Ok(Supervisor {
            desired: config.workers,
            ready_timeout: config.ready_timeout,
            restart_counts: BTreeMap::new(),
            reloads: 0,
            reload: None,
            notifier: systemd::Notifier::from_environment(),
            announced_ready: false,
            config,
            command,
            groups,
            slots: SlotTable::new(),
            workers: BTreeMap::new(),
            crashes: BTreeMap::new(),
            restarts: Vec::new(),
            stopping: None,
            notify_socket,
            notify_rx,
            ipc_tx,
            ipc_rx,
            control_tx,
            control_rx,
            subscribers: Vec::new(),
            signals,
        })
    }

    pub fn handle(&self) -> Handle {
        Handle {
            control: self.control_tx.clone(),
        }
    }

    /// Every event from now on.
    pub fn subscribe(&mut self) -> UnboundedReceiver<Event> {
        let (tx, rx) = unbounded_channel();
        self.subscribers.push(tx);
        rx
    }

    /// Starts the workers and supervises them until stopped. Returns once all have exited.
    pub async fn run(mut self) -> Result<()> {
        // Both before any worker starts, so a bad path or address is an error, not a surprise.
        let _control = match self.config.control.clone() {
            Some((path, explicit)) => crate::control::serve(&path, explicit, self.handle())?,
            None => None,
        };
        if let Some(addr) = self.config.metrics {
            crate::metrics::serve(addr, self.handle()).await?;
        }
        let addresses: Vec<String> = self
            .groups
            .addresses()
            .iter()
            .map(|a| a.to_string())
            .collect();
        log::info!(
            "starting {} workers of {} on {} (strategy {})",
            self.config.workers,
            self.command.program(),
            if addresses.is_empty() {
                "addresses the workers ask for".into()
            } else {
                addresses.join(", ")
            },
            self.groups.strategy_in_effect()
        );
        for id in 0..self.desired {
            if let Err(error) = self.start_worker(id) {
                self.begin_stop(true);
                self.finish().await;
                return Err(error);
            }
        }
        self.finish().await;
        log::info!("all workers stopped");
        Ok(())
    }

    /// The event loop, until stopping has begun and every worker has exited.
    async fn finish(&mut self) {
        while self.stopping.is_none() || !self.workers.is_empty() {
            let timer = self.next_timer();
            tokio::select! {
                _ = self.signals.child.recv() => self.reap(),
                _ = self.signals.terminate.recv() => self.begin_stop(false),
                _ = self.signals.interrupt.recv() => self.begin_stop(false),
                _ = self.signals.quit.recv() => self.begin_stop(true),
                _ = self.signals.hangup.recv() => self.begin_reload(None),
                _ = self.signals.more.recv() => self.scale(self.desired + 1),
                _ = self.signals.fewer.recv() => self.scale(self.desired.saturating_sub(1)),
                Some((pid, event)) = self.ipc_rx.recv() => self.on_ipc(pid, event),
                Some((sender, text)) = self.notify_rx.recv() => self.on_notify(sender, &text),
                Some(control) = self.control_rx.recv() => self.on_control(control),
                _ = sleep_until_or_forever(timer) => self.on_timers(),
            }
        }
    }

    fn emit(&mut self, event: Event) {
        event.log();
        self.subscribers.retain(|s| s.send(event.clone()).is_ok());
    }

    /// Starts worker `id`: sockets for the --listen addresses in a free slot, an IPC channel,
    /// output pipes, then the process. It joins the active set once ready.
    fn start_worker(&mut self, id: u32) -> Result<Pid> {
        let slot = self
            .slots
            .allocate()
            .context("no free slot for another worker")?;
        let started = self.spawn_in_slot(id, slot);
        let (pid, ipc) = match started {
            Ok(started) => started,
            Err(error) => {
                self.forget_slot(slot);
                return Err(error.context(format!("starting worker {id}")));
            }
        };
        let ipc = ipc.map(Arc::new);
        if let Some(endpoint) = &ipc {
            read_ipc(pid, Arc::clone(endpoint), self.ipc_tx.clone());
        }
        self.workers.insert(
            pid,
            Worker {
                id,
                slot,
                started: Instant::now(),
                online: false,
                ready: false,
                draining: false,
                retiring: false,
                ipc,
                addresses: self.config.listen.clone(),
                ready_deadline: Some(Instant::now() + self.config.ready_delay),
            },
        );
        self.emit(Event::Fork {
            id,
            pid: pid.as_raw(),
            slot,
        });
        Ok(pid)
    }

    fn spawn_in_slot(&mut self, id: u32, slot: u32) -> Result<(Pid, Option<Endpoint>)> {
        let sockets = self.groups.open_activated(slot)?;
        let names: Vec<String> = (0..sockets.len()).map(|i| format!("listen{i}")).collect();
        let (primary_end, worker_end) = channel::pair().context("creating the IPC channel")?;
        let (stdout_read, stdout_write) = output_pipe()?;
        let (stderr_read, stderr_write) = output_pipe()?;
        let env = [
            ("CLUSTER_LB_WORKER_ID".to_string(), id.to_string()),
            ("CLUSTER_LB_WORKERS".to_string(), self.desired.to_string()),
            ("NOTIFY_SOCKET".to_string(), self.notify_socket.clone()),
        ];
        let pid = self.command.spawn(&WorkerSpec {
            sockets: &sockets,
            socket_names: &names,
            env: &env,
            ipc: Some(worker_end.as_fd()),
            stdout: Some(stdout_write.as_fd()),
            stderr: Some(stderr_write.as_fd()),
            credentials: self.config.credentials.as_ref(),
        })?;
        // The worker has its copies now; ours close here, so a dead worker's socket closes
        // with it and its pipes reach EOF.
        drop((sockets, worker_end, stdout_write, stderr_write));
        output::capture(id, pid.as_raw(), Stream::Stdout, stdout_read);
        output::capture(id, pid.as_raw(), Stream::Stderr, stderr_read);
        let ipc = match Endpoint::new(primary_end) {
            Ok(endpoint) => Some(endpoint),
            Err(e) => {
                log::warn!("worker {id}: no IPC channel: {e}");
                None
            }
        };
        Ok((pid, ipc))
    }

    fn forget_slot(&mut self, slot: u32) {
        self.slots.release(slot);
        self.groups.clear_slot(slot);
        self.groups.publish(self.slots.active());
    }

    fn make_ready(&mut self, pid: Pid, reason: &str) {
        let Some(worker) = self.workers.get_mut(&pid) else {
            return;
        };
        if worker.ready || worker.draining {
            return;
        }
        worker.ready = true;
        worker.ready_deadline = None;
        let (id, slot) = (worker.id, worker.slot);
        if self.slots.activate(slot) {
            self.groups.publish(self.slots.active());
        }
        self.emit(Event::Ready {
            id,
            pid: pid.as_raw(),
            reason: reason.to_string(),
        });
        self.reload_on_ready(pid);
        let ready = self.workers.values().filter(|w| w.ready).count();
        if !self.announced_ready && ready >= self.desired as usize {
            self.announced_ready = true;
            self.notifier.ready();
        }
    }

    /// Takes a worker out of the active set first, then asks it to stop: `disconnect` over IPC
    /// if it speaks it, else SIGTERM. The primary's exit handling does the rest.
    fn drain(&mut self, pid: Pid, reason: &str) {
        let Some(worker) = self.workers.get_mut(&pid) else {
            return;
        };
        if worker.draining {
            return;
        }
        worker.draining = true;
        let (id, slot) = (worker.id, worker.slot);
        let ipc = worker.ipc.clone().filter(|_| worker.online);
        if self.slots.deactivate(slot) {
            self.groups.publish(self.slots.active());
        }
        let asked = ipc.is_some_and(|endpoint| {
            let message = PrimaryMessage::Disconnect { v: VERSION };
            protocol::encode(&message).is_some_and(|bytes| endpoint.try_send(&bytes, None).is_ok())
        });
        if !asked {
            let _ = kill(pid, Signal::SIGTERM);
        }
        self.emit(Event::Disconnect {
            id,
            pid: pid.as_raw(),
            reason: reason.to_string(),
        });
    }

    fn on_notify(&mut self, sender: i32, text: &str) {
        if !notify::says_ready(text) {
            return;
        }
        let group = notify::process_group(sender);
        let worker = self
            .workers
            .keys()
            .find(|pid| pid.as_raw() == sender || Some(pid.as_raw()) == group)
            .copied();
        match worker {
            Some(pid) => self.make_ready(pid, "READY=1"),
            None => log::debug!("READY=1 from pid {sender}, which is not a worker"),
        }
    }

    fn on_control(&mut self, control: Control) {
        match control {
            Control::Send { pid, data } => {
                let endpoint = self
                    .workers
                    .get(&Pid::from_raw(pid))
                    .and_then(|w| w.ipc.clone());
                let message = PrimaryMessage::Message { v: VERSION, data };
                match (endpoint, protocol::encode(&message)) {
                    (Some(endpoint), Some(bytes)) => {
                        if let Err(e) = endpoint.try_send(&bytes, None) {
                            log::warn!("message to worker pid {pid} not sent: {e}");
                        }
                    }
                    (None, _) => log::warn!(
                        "message to pid {pid} not sent: no such worker with an IPC channel"
                    ),
                    (_, None) => log::warn!(
                        "message to pid {pid} not sent: over {} bytes",
                        protocol::MAX_MESSAGE
                    ),
                }
            }
            Control::Disconnect { pid } => self.drain(Pid::from_raw(pid), "asked to disconnect"),
            Control::Kill { pid, signal } => {
                if self.workers.contains_key(&Pid::from_raw(pid)) {
                    let _ = kill(Pid::from_raw(pid), signal);
                }
            }
            Control::Stop { fast } => self.begin_stop(fast),
            Control::Reload { reply } => self.begin_reload(reply),
            Control::Scale { workers } => self.scale(workers),
            Control::Status { reply } => {
                let _ = reply.send(self.status());
            }
        }
    }

    fn next_timer(&self) -> Option<Instant> {
        let restarts = self.restarts.iter().map(|(at, _)| *at);
        let readiness = self.workers.values().filter_map(|w| w.ready_deadline);
        let stop = self
            .stopping
            .as_ref()
            .filter(|s| !s.killed)
            .map(|s| s.deadline.into_std());
        restarts
            .chain(readiness)
            .chain(stop)
            .chain(self.reload_deadline())
            .min()
    }

    fn on_timers(&mut self) {
        let now = Instant::now();
        let due: Vec<Pid> = self
            .workers
            .iter()
            .filter(|(_, w)| w.ready_deadline.is_some_and(|at| at <= now))
            .map(|(pid, _)| *pid)
            .collect();
        for pid in due {
            self.make_ready(pid, "after --ready-delay");
        }
        self.check_reload_timeout(now);

        let (due, waiting): (Vec<_>, Vec<_>) =
            self.restarts.drain(..).partition(|(at, _)| *at <= now);
        self.restarts = waiting;
        for (_, id) in due {
            if let Err(error) = self.start_worker(id) {
                let crashes = self.crashes.entry(id).or_insert(0);
                *crashes += 1;
                let delay = backoff(*crashes);
                log::error!("{error:#}; trying again in {:.1}s", delay.as_secs_f64());
                self.restarts.push((Instant::now() + delay, id));
            }
        }

        if let Some(stopping) = &mut self.stopping {
            if !stopping.killed && tokio::time::Instant::now() >= stopping.deadline {
                stopping.killed = true;
                log::warn!(
                    "grace period of {}s is over; killing {} workers",
                    self.config.grace.as_secs(),
                    self.workers.len()
                );
                self.kill_all();
            }
        }
    }
}

struct Signals {
    child: SignalStream,
    terminate: SignalStream,
    interrupt: SignalStream,
    quit: SignalStream,
    /// HUP: rolling reload.
    hangup: SignalStream,
    /// TTIN / TTOU: one worker more / fewer.
    more: SignalStream,
    fewer: SignalStream,
}

impl Signals {
    fn new() -> Result<Signals> {
        let listen = |kind: SignalKind| signal(kind).context("installing signal handlers");
        Ok(Signals {
            child: listen(SignalKind::child())?,
            terminate: listen(SignalKind::terminate())?,
            interrupt: listen(SignalKind::interrupt())?,
            quit: listen(SignalKind::quit())?,
            hangup: listen(SignalKind::hangup())?,
            more: listen(SignalKind::from_raw(libc::SIGTTIN))?,
            fewer: listen(SignalKind::from_raw(libc::SIGTTOU))?,
        })
    }
}

/// A pipe for a worker's output: (our read end, the worker's write end), both close-on-exec.
fn output_pipe() -> Result<(OwnedFd, OwnedFd)> {
    nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).context("creating an output pipe")
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
