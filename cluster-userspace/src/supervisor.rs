//! The primary: starts the workers with their sockets, keeps the kernel's active set true as
//! they come and go, restarts crashed workers, and stops them all on TERM or INT.
//!
//! It runs on a current-thread tokio runtime: one thread, so forking is safe and the worker
//! table needs no locks.

use std::{
    collections::BTreeMap,
    os::fd::OwnedFd,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use nix::{
    errno::Errno,
    sys::{
        signal::{kill, killpg, Signal},
        wait::{waitpid, WaitPidFlag, WaitStatus},
    },
    unistd::Pid,
};
use tokio::{
    io::unix::AsyncFd,
    signal::unix::{signal, Signal as SignalStream, SignalKind},
    time::sleep_until,
};

use crate::{
    kernel::{Balancer, Strategy},
    listen_addr::ListenAddr,
    slots::SlotTable,
    sockets,
    spawn::{WorkerCommand, WorkerSpec},
};

/// Everything `cluster-lb run` was asked to do.
#[derive(Debug, Clone)]
pub struct Config {
    pub workers: u32,
    pub listen: Vec<ListenAddr>,
    pub strategy: Strategy,
    pub require_ebpf: bool,
    pub grace: Duration,
    pub command: Vec<String>,
}

/// First restart delay after a crash; doubles per consecutive crash up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// A worker that ran this long before exiting starts its backoff afresh.
const STABLE_UPTIME: Duration = Duration::from_secs(10);

/// One listen address: its program instance, or `None` under strategy `kernel`.
struct Group {
    addr: ListenAddr,
    balancer: Option<Balancer>,
}

struct Worker {
    id: u32,
    slot: u32,
    started: Instant,
}

struct Supervisor {
    config: Config,
    command: WorkerCommand,
    groups: Vec<Group>,
    slots: SlotTable,
    /// Running workers by pid.
    workers: BTreeMap<Pid, Worker>,
    /// Consecutive crashes per worker id, for the backoff.
    crashes: BTreeMap<u32, u32>,
    /// Worker ids waiting to be restarted, by when.
    restarts: Vec<(Instant, u32)>,
    /// Set once stopping began: exits are then expected and nothing restarts.
    stopping: bool,
}

/// Runs the cluster until TERM or INT. Returns after every worker has exited.
pub fn run(config: Config) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the event loop")?;
    runtime.block_on(run_async(config))
}

async fn run_async(config: Config) -> Result<()> {
    let command = WorkerCommand::new(&config.command)?;
    for addr in &config.listen {
        sockets::ensure_address_free(*addr)?;
    }
    // Before any child exists, so no exit goes unnoticed.
    let mut signals = Signals::new()?;
    let groups = load_groups(&config)?;

    let mut supervisor = Supervisor {
        config,
        command,
        groups,
        slots: SlotTable::new(),
        workers: BTreeMap::new(),
        crashes: BTreeMap::new(),
        restarts: Vec::new(),
        stopping: false,
    };
    log::info!(
        "starting {} workers of {} on {} (strategy {})",
        supervisor.config.workers,
        supervisor.command.program(),
        supervisor.listen_list(),
        supervisor.strategy_in_effect()
    );
    for id in 0..supervisor.config.workers {
        if let Err(error) = supervisor.start_worker(id) {
            supervisor.stop(&mut signals, Signal::SIGKILL).await;
            return Err(error);
        }
    }

    loop {
        let next_restart = supervisor.restarts.iter().map(|(at, _)| *at).min();
        tokio::select! {
            _ = signals.child.recv() => supervisor.reap(),
            _ = signals.terminate.recv() => break,
            _ = signals.interrupt.recv() => break,
            _ = sleep_until_or_forever(next_restart) => supervisor.start_due_restarts(),
        }
    }
    supervisor.log_counters();
    supervisor.stop(&mut signals, Signal::SIGTERM).await;
    log::info!("all workers stopped");
    Ok(())
}

struct Signals {
    child: SignalStream,
    terminate: SignalStream,
    interrupt: SignalStream,
}

impl Signals {
    fn new() -> Result<Signals> {
        let listen = |kind: SignalKind| signal(kind).context("installing signal handlers");
        Ok(Signals {
            child: listen(SignalKind::child())?,
            terminate: listen(SignalKind::terminate())?,
            interrupt: listen(SignalKind::interrupt())?,
        })
    }
}

/// Loads one program instance per listen address, or explains in one line why it falls back.
fn load_groups(config: &Config) -> Result<Vec<Group>> {
    let mut groups = Vec::with_capacity(config.listen.len());
    let mut use_program = config.strategy != Strategy::Kernel;
    for addr in &config.listen {
        let balancer = if use_program {
            match Balancer::load(config.strategy) {
                Ok(mut balancer) => {
                    drain_program_log(&mut balancer);
                    Some(balancer)
                }
                Err(why) if config.require_ebpf => {
                    bail!("eBPF balancing is unavailable and --require-ebpf was given: {why}")
                }
                Err(why) => {
                    log::warn!(
                        "eBPF balancing unavailable: {why}; falling back to --strategy kernel (plain SO_REUSEPORT hashing)"
                    );
                    // One strategy for all groups: drop instances loaded for earlier addresses.
                    use_program = false;
                    groups
                        .iter_mut()
                        .for_each(|group: &mut Group| group.balancer = None);
                    None
                }
            }
        } else {
            None
        };
        groups.push(Group {
            addr: *addr,
            balancer,
        });
    }
    Ok(groups)
}

/// Forwards the program's aya-log records to our log, from a task of their own.
fn drain_program_log(balancer: &mut Balancer) {
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

impl Supervisor {
    fn listen_list(&self) -> String {
        let addrs: Vec<String> = self.groups.iter().map(|g| g.addr.to_string()).collect();
        addrs.join(", ")
    }

    fn strategy_in_effect(&self) -> Strategy {
        if self.groups.iter().all(|g| g.balancer.is_some()) {
            self.config.strategy
        } else {
            Strategy::Kernel
        }
    }

    /// Starts worker `id`: a fresh socket per listen address in a free slot, then the process,
    /// then the slot joins the active set. The primary keeps no copy of the sockets.
    fn start_worker(&mut self, id: u32) -> Result<()> {
        let slot = self
            .slots
            .allocate()
            .context("no free slot for another worker")?;
        let started = self.open_sockets(slot).and_then(|socks| {
            let names: Vec<String> = (0..socks.len()).map(|i| format!("listen{i}")).collect();
            let env = [
                ("CLUSTER_LB_WORKER_ID".to_string(), id.to_string()),
                (
                    "CLUSTER_LB_WORKERS".to_string(),
                    self.config.workers.to_string(),
                ),
            ];
            self.command.spawn(&WorkerSpec {
                sockets: &socks,
                socket_names: &names,
                env: &env,
            })
            // `socks` drops here: from now on only the worker holds them.
        });
        let pid = match started {
            Ok(pid) => pid,
            Err(error) => {
                self.forget_slot(slot);
                return Err(error.context(format!("starting worker {id}")));
            }
        };
        self.workers.insert(
            pid,
            Worker {
                id,
                slot,
                started: Instant::now(),
            },
        );
        self.slots.activate(slot);
        self.publish_active_set();
        log::info!("worker {id} started (pid {pid}, slot {slot})");
        Ok(())
    }

    fn open_sockets(&mut self, slot: u32) -> Result<Vec<OwnedFd>> {
        let mut opened = Vec::with_capacity(self.groups.len());
        for group in &mut self.groups {
            let socket = sockets::reuseport_listener(group.addr)?;
            if let Some(balancer) = &mut group.balancer {
                balancer.attach(&socket)?;
                balancer.set_slot(slot, &socket)?;
            }
            opened.push(OwnedFd::from(socket));
        }
        Ok(opened)
    }

    fn forget_slot(&mut self, slot: u32) {
        self.slots.release(slot);
        for group in &mut self.groups {
            if let Some(balancer) = &mut group.balancer {
                if let Err(e) = balancer.clear_slot(slot) {
                    log::warn!("{}: {e:#}", group.addr);
                }
            }
        }
        self.publish_active_set();
    }

    /// Writes the active set to every program instance.
    fn publish_active_set(&mut self) {
        let active = self.slots.active().to_vec();
        for group in &mut self.groups {
            if let Some(balancer) = &mut group.balancer {
                if let Err(e) = balancer.set_active(&active) {
                    log::error!("{}: {e:#}", group.addr);
                }
            }
        }
    }

    /// Collects every exited child. Workers leave the active set at once; unless we are
    /// stopping, each is restarted after its backoff.
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
            let (pid, how) = match status {
                WaitStatus::Exited(pid, code) => (pid, format!("exited with status {code}")),
                WaitStatus::Signaled(pid, signal, _) => (pid, format!("was killed by {signal}")),
                _ => continue,
            };
            let Some(worker) = self.workers.remove(&pid) else {
                continue;
            };
            self.forget_slot(worker.slot);
            self.after_exit(worker, pid, &how);
        }
    }

    fn after_exit(&mut self, worker: Worker, pid: Pid, how: &str) {
        let uptime = worker.started.elapsed();
        if self.stopping {
            log::info!("worker {} (pid {pid}) {how}", worker.id);
            return;
        }
        let crashes = self.crashes.entry(worker.id).or_insert(0);
        if uptime >= STABLE_UPTIME {
            *crashes = 0;
        }
        *crashes += 1;
        let delay = backoff(*crashes);
        log::warn!(
            "worker {} (pid {pid}) {how} after {:.1}s; restarting in {:.1}s",
            worker.id,
            uptime.as_secs_f64(),
            delay.as_secs_f64()
        );
        self.restarts.push((Instant::now() + delay, worker.id));
    }

    fn start_due_restarts(&mut self) {
        let now = Instant::now();
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
    }

    /// Logs what the kernel program counted for each running worker.
    fn log_counters(&self) {
        for group in &self.groups {
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

    /// Sends `first` to every worker, then SIGKILL to what is left after the grace period (or
    /// at once on a second TERM or INT), and waits until all have exited.
    async fn stop(&mut self, signals: &mut Signals, first: Signal) {
        self.stopping = true;
        self.restarts.clear();
        if self.workers.is_empty() {
            return;
        }
        log::info!("stopping {} workers ({first})", self.workers.len());
        for pid in self.workers.keys() {
            let _ = kill(*pid, first);
        }
        let deadline = tokio::time::Instant::now() + self.config.grace;
        let mut killed = first == Signal::SIGKILL;
        while !self.workers.is_empty() {
            tokio::select! {
                _ = signals.child.recv() => self.reap(),
                _ = tokio::time::sleep_until(deadline), if !killed => {
                    log::warn!("grace period of {}s is over; killing {} workers",
                        self.config.grace.as_secs(), self.workers.len());
                    self.kill_all();
                    killed = true;
                }
                _ = signals.terminate.recv() => { self.kill_all(); killed = true; }
                _ = signals.interrupt.recv() => { self.kill_all(); killed = true; }
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
