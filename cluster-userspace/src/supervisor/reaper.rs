//! Knowing when workers exit without taking anyone else's children.
//!
//! Each worker is watched through a pidfd (Linux 5.3+), which becomes readable when the process
//! exits, and is reaped through that same pidfd (`waitid(P_PIDFD)`), so a program that embeds a
//! supervisor keeps its own children: nothing here waits for "any child". Only a subreaper (see
//! `Config::subreaper`, as `cluster-lb run` is) also collects orphans, the processes workers
//! leave behind, which the kernel re-parents to it; that does wait for any child, and hands
//! back the exits of workers it collects on the way.

use std::os::fd::OwnedFd;

use nix::{
    errno::Errno,
    sys::wait::{waitpid, WaitPidFlag, WaitStatus},
    unistd::Pid,
};
use tokio::{
    io::unix::AsyncFd,
    sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender},
};

use super::events::ExitStatus;
use crate::sys::pidfd::{has_exited, pidfd_open, reap_pidfd};

/// A worker that may have exited: its pidfd became readable (or, without pidfds, polling saw
/// it exit).
pub struct Exited {
    pub pid: Pid,
    pidfd: Option<OwnedFd>,
}

pub struct Reaper {
    tx: UnboundedSender<Exited>,
    rx: UnboundedReceiver<Exited>,
}

impl Reaper {
    pub fn new() -> Reaper {
        let (tx, rx) = unbounded_channel();
        Reaper { tx, rx }
    }

    /// Watches a worker just started.
    pub fn watch(&self, pid: Pid) {
        let tx = self.tx.clone();
        match pidfd_open(pid) {
            Ok(pidfd) => {
                // SAFETY: the AsyncFd owns the pidfd while registered; it travels back whole
                // with the notification, to be reaped through.
                let registered = unsafe {
                    AsyncFd::register_with_interest(pidfd, tokio::io::Interest::READABLE)
                };
                match registered.map_err(|e| e.into_parts().1) {
                    Ok(watched) => {
                        tokio::spawn(async move {
                            let _ = watched.readable().await;
                            let pidfd = Some(watched.into_inner());
                            let _ = tx.send(Exited { pid, pidfd });
                        });
                        return;
                    }
                    Err(e) => log::debug!("pid {pid}: cannot watch its pidfd: {e}"),
                }
            }
            Err(e) => log::debug!("pid {pid}: no pidfd ({e}); polling for its exit instead"),
        }
        tokio::spawn(async move {
            let mut every = tokio::time::interval(std::time::Duration::from_millis(100));
            loop {
                every.tick().await;
                if has_exited(pid) {
                    let _ = tx.send(Exited { pid, pidfd: None });
                    return;
                }
            }
        });
    }

    /// The next worker that may have exited.
    pub async fn next(&mut self) -> Option<Exited> {
        self.rx.recv().await
    }
}

impl Default for Reaper {
    fn default() -> Self {
        Reaper::new()
    }
}

impl Exited {
    /// Reaps it: its exit status, or `None` if it was reaped already (by the orphan collector)
    /// or has not really exited.
    pub fn reap(&self) -> Option<ExitStatus> {
        match &self.pidfd {
            Some(pidfd) => reap_pidfd(pidfd),
            None => match waitpid(self.pid, Some(WaitPidFlag::WNOHANG)) {
                Ok(status) => exit_status(status).map(|(_, status)| status),
                Err(_) => None,
            },
        }
    }
}

/// Collects every exited child of a subreaper: orphans (reaped and forgotten) and workers
/// (returned, for the lifecycle).
pub fn collect_children() -> Vec<(Pid, ExitStatus)> {
    let mut exited = Vec::new();
    loop {
        match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) | Err(Errno::ECHILD) => break,
            Err(Errno::EINTR) => continue,
            Err(e) => {
                log::error!("waitpid: {e}");
                break;
            }
            Ok(status) => exited.extend(exit_status(status)),
        }
    }
    exited
}

fn exit_status(status: WaitStatus) -> Option<(Pid, ExitStatus)> {
    match status {
        WaitStatus::Exited(pid, code) => Some((pid, ExitStatus::Code(code))),
        WaitStatus::Signaled(pid, signal, _) => Some((pid, ExitStatus::Signal(signal))),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // The children are reaped by pid here, not through std's Child, on purpose.
    #[allow(clippy::zombie_processes)]
    #[tokio::test]
    async fn a_watched_child_is_reaped_with_its_status_and_other_children_are_left_alone() {
        let mut reaper = Reaper::new();
        let worker = std::process::Command::new("sh")
            .args(["-c", "exit 7"])
            .spawn()
            .unwrap();
        let bystander = std::process::Command::new("sh")
            .args(["-c", "exit 3"])
            .spawn()
            .unwrap();
        let worker_pid = Pid::from_raw(worker.id() as i32);
        reaper.watch(worker_pid);
        let exited = reaper.next().await.unwrap();
        assert_eq!(exited.pid, worker_pid);
        assert_eq!(exited.reap(), Some(ExitStatus::Code(7)));
        // The bystander is still ours to wait for: nobody reaped it.
        let status = waitpid(Pid::from_raw(bystander.id() as i32), None).unwrap();
        assert!(matches!(status, WaitStatus::Exited(_, 3)), "{status:?}");
    }
}
