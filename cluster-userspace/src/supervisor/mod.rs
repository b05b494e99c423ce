//! The primary: starts workers with their sockets, admits them to the active set when they are
//! ready, answers their IPC, restarts crashed ones with backoff, and stops them all in order.
//!
//! Everything runs as one task on one thread (the CLI uses a current-thread runtime), so
//! forking is safe and the worker table needs no locks. `cluster-lb run` and programs that
//! embed a primary (see [`Supervisor`]) share this code.

mod events;
mod groups;
mod notify;
mod output;
mod reload;
mod status;
mod systemd;

use std::{
    collections::BTreeMap,
    os::fd::{AsFd, OwnedFd},
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use nix::{
    errno::Errno,
    sys::{
        signal::{kill, killpg, Signal},
        wait::{waitpid, WaitPidFlag, WaitStatus},
    },
    unistd::Pid,
};
use serde_json::Value;
use tokio::{
    io::unix::AsyncFd,
    signal::unix::{signal, Signal as SignalStream, SignalKind},
    sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender},
    time::sleep_until,
};

pub use events::{Event, ExitStatus};
use groups::Groups;
pub use reload::{ReloadReply, READY_TIMEOUT};
pub use status::{ClusterStatus, WorkerStatus};

use crate::{
    ipc::{
        channel::{self, Endpoint},
        protocol::{self, PrimaryMessage, WorkerMessage, VERSION},
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

/// First restart delay after a crash; doubles per consecutive crash up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// A worker that ran this long before exiting starts its backoff afresh.
const STABLE_UPTIME: Duration = Duration::from_secs(10);
/// Consecutive early crashes that make a crash loop worth an error line (then every as many).
const CRASH_LOOP: u32 = 5;

/// Requests to a running primary (from an embedder, later from the control socket).
#[derive(Debug)]
pub enum Control {
    /// A user message to the worker with this pid.
    Send { pid: i32, data: Value },
    /// Take the worker out of rotation, ask it to finish and exit, then start a fresh one.
    Disconnect { pid: i32 },
    /// Send a signal to the worker.
    Kill { pid: i32, signal: Signal },
    /// Stop every worker (gracefully, or at once) and end `run`.
    Stop { fast: bool },
    /// Rolling reload; the reply comes when it completed or was aborted.
    Reload { reply: Option<ReloadReply> },
    /// Run this many workers.
    Scale { workers: u32 },
    /// A snapshot of the cluster.
    Status {
        reply: tokio::sync::oneshot::Sender<ClusterStatus>,
    },
}

/// A cloneable remote control for a running [`Supervisor`].
#[derive(Clone, Debug)]
pub struct Handle {
    control: UnboundedSender<Control>,
}

impl Handle {
    pub fn send(&self, pid: i32, data: Value) {
        let _ = self.control.send(Control::Send { pid, data });
    }
    pub fn disconnect(&self, pid: i32) {
        let _ = self.control.send(Control::Disconnect { pid });
    }
    pub fn kill(&self, pid: i32, signal: Signal) {
        let _ = self.control.send(Control::Kill { pid, signal });
    }
    pub fn stop(&self) {
        let _ = self.control.send(Control::Stop { fast: false });
    }
    /// Rolling reload; resolves when it completed (Ok) or was aborted (Err).
    pub async fn reload(&self) -> Result<String, String> {
        let (reply, answer) = tokio::sync::oneshot::channel();
        let _ = self.control.send(Control::Reload { reply: Some(reply) });
        answer
            .await
            .unwrap_or_else(|_| Err("the primary is gone".into()))
    }
    pub fn scale(&self, workers: u32) {
        let _ = self.control.send(Control::Scale { workers });
    }
    pub async fn status(&self) -> Option<ClusterStatus> {
        let (reply, answer) = tokio::sync::oneshot::channel();
        let _ = self.control.send(Control::Status { reply });
        answer.await.ok()
    }
    /// Sends any request (the control socket uses this).
    pub fn request(&self, control: Control) {
        let _ = self.control.send(control);
    }
}

/// What a worker's IPC reader reports.
enum IpcEvent {
    Message(WorkerMessage),
    Violation(String),
    Closed,
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

    fn on_ipc(&mut self, pid: Pid, event: IpcEvent) {
        let Some(worker) = self.workers.get_mut(&pid) else {
            return;
        };
        let id = worker.id;
        let message = match event {
            IpcEvent::Message(message) => message,
            IpcEvent::Closed => {
                worker.ipc = None;
                return;
            }
            IpcEvent::Violation(problem) => return self.reject(pid, &problem),
        };
        if !worker.online && !matches!(message, WorkerMessage::Online { .. }) {
            return self.reject(pid, "a message before `online`");
        }
        match message {
            WorkerMessage::Online { .. } => {
                if worker.online {
                    return self.reject(pid, "`online` sent twice");
                }
                worker.online = true;
                // Readiness now comes from `listening`, not from the delay.
                worker.ready_deadline = None;
                self.emit(Event::Online {
                    id,
                    pid: pid.as_raw(),
                });
            }
            WorkerMessage::QueryServer {
                index,
                address,
                protocol,
                ..
            } => self.answer_query(pid, index, &address, &protocol),
            WorkerMessage::Listening { address, .. } => {
                let known = address
                    .parse::<ListenAddr>()
                    .is_ok_and(|a| worker.addresses.contains(&a));
                if !known {
                    return self.reject(
                        pid,
                        &format!("`listening` on {address}, which it has no socket for"),
                    );
                }
                self.emit(Event::Listening {
                    id,
                    pid: pid.as_raw(),
                    address,
                });
                self.make_ready(pid, "listening");
            }
            WorkerMessage::Message { data, .. } => self.emit(Event::Message {
                id,
                pid: pid.as_raw(),
                data,
            }),
            WorkerMessage::Disconnect { .. } => self.drain(pid, "the worker disconnected"),
        }
    }

    /// A worker broke the protocol: log it, close its channel, drain it. Others keep serving.
    fn reject(&mut self, pid: Pid, problem: &str) {
        let Some(worker) = self.workers.get_mut(&pid) else {
            return;
        };
        log::error!(
            "worker {} (pid {pid}) broke the IPC protocol: {problem}; disconnecting it",
            worker.id
        );
        worker.ipc = None;
        worker.online = false;
        self.drain(pid, "protocol violation");
    }

    fn answer_query(&mut self, pid: Pid, index: u32, address: &str, protocol: &str) {
        let Some(worker) = self.workers.get(&pid) else {
            return;
        };
        let slot = worker.slot;
        let outcome = match address.parse::<ListenAddr>() {
            Err(e) => Err(format!("bad address {address}: {e}")),
            Ok(_) if protocol != "tcp" => Err(format!("protocol {protocol} is not supported; use tcp")),
            Ok(addr) if worker.addresses.contains(&addr) => Err(format!(
                "this worker already has a socket for {addr} (socket-activated ones are in LISTEN_FDS)"
            )),
            Ok(addr) if !self.groups.allows_query(addr) => Err(format!(
                "{addr} is not one of the --listen addresses this cluster was started with"
            )),
            Ok(addr) => self
                .groups
                .open_for_query(addr, slot)
                .map(|socket| (addr, socket))
                .map_err(|e| format!("{e:#}")),
        };
        let Some(endpoint) = self.workers.get(&pid).and_then(|w| w.ipc.clone()) else {
            return;
        };
        let (reply, socket): (PrimaryMessage, Option<OwnedFd>) = match outcome {
            Ok((addr, socket)) => {
                if let Some(worker) = self.workers.get_mut(&pid) {
                    if !worker.addresses.contains(&addr) {
                        worker.addresses.push(addr);
                    }
                }
                let reply = PrimaryMessage::QueryServerReply {
                    v: VERSION,
                    index,
                    address: addr.to_string(),
                    ok: true,
                    error: None,
                };
                (reply, Some(socket))
            }
            Err(error) => {
                log::warn!("worker (pid {pid}) asked for {address}: {error}");
                let reply = PrimaryMessage::QueryServerReply {
                    v: VERSION,
                    index,
                    address: address.to_string(),
                    ok: false,
                    error: Some(error),
                };
                (reply, None)
            }
        };
        let sent = protocol::encode(&reply)
            .map(|bytes| endpoint.try_send(&bytes, socket.as_ref().map(|s| s.as_fd())));
        if !matches!(sent, Some(Ok(()))) {
            log::warn!("worker (pid {pid}): could not send the queryServer reply");
        }
        // `socket` drops here: the worker holds the only copy.
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

    /// Collects every exited child (workers, and orphans re-parented to us).
    fn reap(&mut self) {
        loop {
            let status = match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) | Err(Errno::ECHILD) => break,
                Ok(status) => status,
                Err(Errno::EINTR) => continue,
                Err(e) => {
                    log::error!("waitpid: {e}");
                    break;
                }
            };
            let (pid, exit) = match status {
                WaitStatus::Exited(pid, code) => (pid, ExitStatus::Code(code)),
                WaitStatus::Signaled(pid, signal, _) => (pid, ExitStatus::Signal(signal)),
                _ => continue,
            };
            if let Some(worker) = self.workers.remove(&pid) {
                self.after_exit(worker, pid, exit);
            }
        }
    }

    fn after_exit(&mut self, worker: Worker, pid: Pid, status: ExitStatus) {
        self.forget_slot(worker.slot);
        let uptime = worker.started.elapsed();
        self.emit(Event::Exit {
            id: worker.id,
            pid: pid.as_raw(),
            status,
            uptime,
        });
        let handled_by_reload = self.reload_on_exit(pid);
        let wanted = worker.id < self.desired && !worker.retiring && !handled_by_reload;
        if self.stopping.is_some() || !wanted {
            return;
        }
        *self.restart_counts.entry(worker.id).or_insert(0) += 1;
        let delay = if worker.draining && status == ExitStatus::Code(0) {
            // Asked to go, and went cleanly: replace at once, no penalty.
            self.crashes.remove(&worker.id);
            Duration::ZERO
        } else {
            let crashes = self.crashes.entry(worker.id).or_insert(0);
            if uptime >= STABLE_UPTIME {
                *crashes = 0;
            }
            *crashes += 1;
            let crashes = *crashes;
            if crashes >= CRASH_LOOP && crashes.is_multiple_of(CRASH_LOOP) {
                self.emit(Event::CrashLoop {
                    id: worker.id,
                    crashes,
                    status,
                });
            }
            backoff(crashes)
        };
        self.emit(Event::Restart {
            id: worker.id,
            delay,
        });
        self.restarts.push((Instant::now() + delay, worker.id));
    }

    /// Graceful: drain every worker and kill what is left after the grace period. Fast (QUIT,
    /// or a second TERM/INT): kill at once.
    fn begin_stop(&mut self, fast: bool) {
        if let Some(stopping) = &mut self.stopping {
            if !stopping.killed {
                stopping.killed = true;
                log::warn!("stopping now: killing {} workers", self.workers.len());
                self.kill_all();
            }
            return;
        }
        self.log_counters();
        self.notifier.stopping();
        self.finish_reload(Err("reload aborted: the cluster is stopping".into()));
        self.restarts.clear();
        self.stopping = Some(Stopping {
            deadline: tokio::time::Instant::now() + self.config.grace,
            killed: fast,
        });
        if self.workers.is_empty() {
            return;
        }
        if fast {
            log::info!("stopping {} workers now (SIGKILL)", self.workers.len());
            self.kill_all();
            return;
        }
        log::info!(
            "stopping {} workers (grace {}s)",
            self.workers.len(),
            self.config.grace.as_secs()
        );
        let pids: Vec<Pid> = self.workers.keys().copied().collect();
        for pid in pids {
            self.drain(pid, "cluster stopping");
        }
    }

    fn status(&self) -> ClusterStatus {
        let workers = self
            .workers
            .iter()
            .map(|(pid, worker)| {
                let mut stats = cluster_common::SlotStats::default();
                for balancer in self.groups.iter().filter_map(|g| g.balancer.as_ref()) {
                    if let Ok(slot) = balancer.slot_stats(worker.slot) {
                        stats.selected += slot.selected;
                        stats.fallback += slot.fallback;
                        stats.migrated += slot.migrated;
                    }
                }
                let state = if worker.draining {
                    "draining"
                } else if worker.ready {
                    "ready"
                } else {
                    "starting"
                };
                WorkerStatus {
                    id: worker.id,
                    pid: pid.as_raw(),
                    state: state.into(),
                    uptime_s: worker.started.elapsed().as_secs_f64(),
                    restarts: self.restart_counts.get(&worker.id).copied().unwrap_or(0),
                    selected: stats.selected,
                    fallback: stats.fallback,
                    migrated: stats.migrated,
                    rss_bytes: status::rss_bytes(pid.as_raw()),
                }
            })
            .collect();
        ClusterStatus {
            primary_pid: std::process::id(),
            strategy: self.groups.strategy_in_effect().to_string(),
            listen: self
                .groups
                .addresses()
                .iter()
                .map(ToString::to_string)
                .collect(),
            desired: self.desired,
            reloads: self.reloads,
            reloading: self.reload.is_some(),
            workers,
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

    /// SIGKILL to each worker's process group, so helpers a worker started die with it.
    fn kill_all(&self) {
        for pid in self.workers.keys() {
            let _ = killpg(*pid, Signal::SIGKILL);
            let _ = kill(*pid, Signal::SIGKILL);
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

/// Reads a worker's datagrams and hands them, decoded, to the supervisor loop.
fn read_ipc(pid: Pid, endpoint: Arc<Endpoint>, sink: UnboundedSender<(Pid, IpcEvent)>) {
    tokio::spawn(async move {
        loop {
            let event = match endpoint.recv().await {
                Ok(None) | Err(_) => IpcEvent::Closed,
                Ok(Some(datagram)) if datagram.truncated => {
                    IpcEvent::Violation(format!("a message over {} bytes", protocol::MAX_MESSAGE))
                }
                Ok(Some(datagram)) if !datagram.fds.is_empty() => {
                    IpcEvent::Violation("a message carrying file descriptors".into())
                }
                Ok(Some(datagram)) => match protocol::decode::<WorkerMessage>(&datagram.bytes) {
                    Ok(message) => IpcEvent::Message(message),
                    Err(e) => IpcEvent::Violation(e.to_string()),
                },
            };
            let last = !matches!(event, IpcEvent::Message(_));
            if sink.send((pid, event)).is_err() || last {
                break;
            }
        }
    });
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

/// 100 ms, 200 ms, 400 ms, ... up to 30 s.
fn backoff(consecutive_crashes: u32) -> Duration {
    let doublings = consecutive_crashes.saturating_sub(1).min(16);
    FIRST_BACKOFF
        .saturating_mul(1 << doublings)
        .min(MAX_BACKOFF)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_and_is_capped() {
        assert_eq!(backoff(1), Duration::from_millis(100));
        assert_eq!(backoff(2), Duration::from_millis(200));
        assert_eq!(backoff(4), Duration::from_millis(800));
        assert_eq!(backoff(50), MAX_BACKOFF);
    }
}
