//! Stopping the cluster: graceful (drain, then TERM or IPC disconnect, then KILL after the grace
//! period) or at once.

use nix::{
    sys::signal::{kill, killpg, Signal},
    unistd::Pid,
};

use super::{Stopping, Supervisor};

impl Supervisor {
    /// Graceful: drain every worker and kill what is left after the grace period. Fast (QUIT,
    /// or a second TERM/INT): kill at once.
    pub(super) fn begin_stop(&mut self, fast: bool) {
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
    pub(super) fn kill_all(&self) {
        for pid in self.workers.keys() {
            let _ = killpg(*pid, Signal::SIGKILL);
            let _ = kill(*pid, Signal::SIGKILL);
        }
    }
}
