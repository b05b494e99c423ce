//! Worker exits: reaping every child, and restarting workers with backoff.

use std::time::{Duration, Instant};

use nix::{
    errno::Errno,
    sys::wait::{waitpid, WaitPidFlag, WaitStatus},
    unistd::Pid,
};

use super::{Event, ExitStatus, Supervisor, Worker};

/// First restart delay after a crash; doubles per consecutive crash up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// A worker that ran this long before exiting starts its backoff afresh.
const STABLE_UPTIME: Duration = Duration::from_secs(10);
/// Consecutive early crashes that make a crash loop worth an error line (then every as many).
const CRASH_LOOP: u32 = 5;

impl Supervisor {
    /// Collects every exited child (workers, and orphans re-parented to us).
    pub(super) fn reap(&mut self) {
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
}

/// 100 ms, 200 ms, 400 ms, ... up to 30 s.
pub(super) fn backoff(consecutive_crashes: u32) -> Duration {
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
