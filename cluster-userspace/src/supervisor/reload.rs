//! Rolling reload and scaling: the operations that change which processes serve, without a
//! moment where a connection has nowhere to go.
//!
//! Reload replaces workers one at a time: start the replacement, wait until it is ready (or
//! give up after the ready timeout, keeping the old worker: never the other way round), then
//! drain the old one (out of the active set first, then asked to stop).

use std::{
    collections::VecDeque,
    time::{Duration, Instant},
};

use nix::{sys::signal::Signal, unistd::Pid};
use tokio::sync::oneshot;

use super::Supervisor;

/// How long a replacement may take to become ready before the reload is aborted.
pub const READY_TIMEOUT: Duration = Duration::from_secs(30);

pub type ReloadReply = oneshot::Sender<Result<String, String>>;

pub(super) struct Reload {
    /// Old workers still to replace, in id order.
    queue: VecDeque<Pid>,
    /// The replacement under way: (old, new, give up at).
    current: Option<(Pid, Pid, Instant)>,
    replaced: u32,
    replies: Vec<ReloadReply>,
}

impl Supervisor {
    /// Starts a rolling reload, or joins the one under way.
    pub(super) fn begin_reload(&mut self, reply: Option<ReloadReply>) {
        if self.stopping.is_some() {
            if let Some(reply) = reply {
                let _ = reply.send(Err("the cluster is stopping".into()));
            }
            return;
        }
        if let Some(reload) = &mut self.reload {
            reload.replies.extend(reply);
            return;
        }
        let mut old: Vec<(u32, Pid)> = self
            .workers
            .iter()
            .filter(|(_, w)| !w.draining && !w.retiring)
            .map(|(pid, w)| (w.id, *pid))
            .collect();
        old.sort_unstable();
        self.reloads += 1;
        self.notifier.reloading();
        log::info!("rolling reload of {} workers", old.len());
        self.reload = Some(Reload {
            queue: old.into_iter().map(|(_, pid)| pid).collect(),
            current: None,
            replaced: 0,
            replies: reply.into_iter().collect(),
        });
        self.advance_reload();
    }

    /// Starts the next replacement, or finishes the reload when none is left.
    fn advance_reload(&mut self) {
        loop {
            let Some(reload) = &mut self.reload else {
                return;
            };
            if reload.current.is_some() {
                return;
            }
            let Some(old) = reload.queue.pop_front() else {
                let replaced = reload.replaced;
                self.finish_reload(Ok(format!("reload complete: {replaced} workers replaced")));
                return;
            };
            let Some(id) = self.workers.get(&old).filter(|w| !w.draining).map(|w| w.id) else {
                continue; // gone meanwhile; its restart (if any) runs the new code already
            };
            match self.start_worker(id) {
                Ok(new) => {
                    if let Some(reload) = &mut self.reload {
                        reload.current = Some((old, new, Instant::now() + self.ready_timeout));
                    }
                    return;
                }
                Err(error) => {
                    self.finish_reload(Err(format!(
                        "reload aborted: {error:#}; the old workers keep serving"
                    )));
                    return;
                }
            }
        }
    }

    pub(super) fn finish_reload(&mut self, outcome: Result<String, String>) {
        let Some(reload) = self.reload.take() else {
            return;
        };
        match &outcome {
            Ok(message) => log::info!("{message}"),
            Err(message) => log::error!("{message}"),
        }
        self.notifier.ready();
        for reply in reload.replies {
            let _ = reply.send(outcome.clone());
        }
    }

    /// A worker became ready: if it is the replacement under way, retire its predecessor.
    pub(super) fn reload_on_ready(&mut self, pid: Pid) {
        let Some(reload) = &mut self.reload else {
            return;
        };
        let Some((old, new, _)) = reload.current else {
            return;
        };
        if new != pid {
            return;
        }
        reload.current = None;
        reload.replaced += 1;
        self.retire(old, "replaced by reload");
        self.advance_reload();
    }

    /// A worker exited. Returns true when the reload takes care of it (no restart wanted).
    pub(super) fn reload_on_exit(&mut self, pid: Pid) -> bool {
        let Some(reload) = &mut self.reload else {
            return false;
        };
        let Some((old, new, _)) = reload.current else {
            return false;
        };
        if pid == new {
            // The replacement died before it was ready: keep the old worker.
            reload.current = None;
            self.finish_reload(Err(format!(
                "reload aborted: the replacement (pid {new}) exited before it was ready; the old workers keep serving"
            )));
            return true;
        }
        if pid == old {
            // The old one went first; its replacement stands in, nothing to restart.
            return true;
        }
        false
    }

    /// Gives up on a replacement that is not ready in time: stop it, keep the old worker.
    pub(super) fn check_reload_timeout(&mut self, now: Instant) {
        let Some(reload) = &mut self.reload else {
            return;
        };
        let Some((_, new, deadline)) = reload.current else {
            return;
        };
        if now < deadline {
            return;
        }
        reload.current = None;
        self.retire(new, "not ready in time");
        let _ = nix::sys::signal::kill(new, Signal::SIGKILL);
        self.finish_reload(Err(format!(
            "reload aborted: the replacement (pid {new}) was not ready within {}s; the old workers keep serving",
            self.ready_timeout.as_secs()
        )));
    }

    pub(super) fn reload_deadline(&self) -> Option<Instant> {
        self.reload
            .as_ref()?
            .current
            .map(|(_, _, deadline)| deadline)
    }

    /// Drains a worker that is not to be restarted.
    pub(super) fn retire(&mut self, pid: Pid, reason: &str) {
        if let Some(worker) = self.workers.get_mut(&pid) {
            worker.retiring = true;
        }
        self.drain(pid, reason);
    }

    /// Runs `workers` workers: starts the missing ids, retires the highest ones above it.
    pub(super) fn scale(&mut self, workers: u32) {
        let workers = workers.clamp(1, crate::cli::MAX_WORKERS);
        if self.stopping.is_some() || workers == self.desired {
            return;
        }
        log::info!("scaling from {} to {workers} workers", self.desired);
        let before = self.desired;
        self.desired = workers;
        self.restarts.retain(|(_, id)| *id < workers);
        if workers > before {
            for id in before..workers {
                if let Err(error) = self.start_worker(id) {
                    log::error!("{error:#}");
                }
            }
            return;
        }
        let surplus: Vec<Pid> = self
            .workers
            .iter()
            .filter(|(_, w)| w.id >= workers && !w.retiring)
            .map(|(pid, _)| *pid)
            .collect();
        for pid in surplus {
            self.retire(pid, "scaled down");
        }
    }
}
