//! In-place upgrade: the primary re-executes its binary (by now possibly a new file at the same
//! path) and hands itself its state, so that the pid, the workers, their sockets and channels
//! all stay; only the primary's code changes. nginx's USR2 dance starts a second master next to
//! the first; here execve keeps the pid, so the workers stay its children and a process
//! supervisor (systemd) sees nothing happen.
//!
//! The order is what keeps the cluster safe:
//! 1. Only a calm cluster is handed over (the lifecycle snapshot refuses otherwise): no reload,
//!    no worker starting or draining, no Node message half-sent.
//! 2. The state goes into a memfd, and the new binary is first run as a *check*, a child that
//!    reads the state, parses the same command line and loads its eBPF program, then says
//!    `ready VERSION`. A new binary that is broken, or does not understand the state, fails
//!    here, and the running primary stays in charge having changed nothing.
//! 3. Only then: every descriptor named in the state is kept across exec, the signals that
//!    would kill or be lost are blocked, and the primary execs. If execve itself fails, all of
//!    that is undone and the old code keeps running.
//!
//! The new binary (see `resume`) loads its own program and swaps it in atomically: attaching a
//! program to a reuseport group replaces the one attached, so the kernel balances all along.

mod resume;

use std::{
    ffi::CString,
    io::Read,
    os::{
        fd::{AsRawFd, OwnedFd},
        unix::ffi::OsStrExt,
    },
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use super::saved::{
    Inherited, SavedGroup, SavedMaps, SavedProgram, SlotCounters, State, CHECK_VARIABLE, FORMAT,
    STATE_VARIABLE,
};
pub use resume::Resumed;

use super::{config::UpgradeSource, handle::UpgradeError, signals, workers::Protocol, Supervisor};
use crate::kernel::{groups::Group, sockets::Stack};

/// How long the new binary's check may take (it loads and verifies the eBPF programs).
const CHECK_TIMEOUT: Duration = Duration::from_secs(20);

/// Descriptors of the supervisor's embedder (`cluster-lb run`'s control socket and metrics
/// listener) that an upgrade keeps open for the new binary.
#[derive(Debug, Clone, Copy, Default)]
pub struct Kept {
    pub control: Option<Inherited>,
    pub metrics: Option<Inherited>,
}

impl Supervisor {
    /// Hands the primary over to the binary at its path. Returns only if that did not happen
    /// (on success this process image is gone); `requester` is the control connection that
    /// asked, answered by the new binary.
    pub(super) fn upgrade(&mut self, requester: Option<OwnedFd>) -> UpgradeError {
        let Some(source) = self.config.upgrade.clone() else {
            return UpgradeError::NotSupported;
        };
        self.drain_pending_inputs();
        let state = match self.handover_state(requester.as_ref()) {
            Ok(state) => state,
            Err(error) => return error,
        };
        let memfd = match state.to_memfd() {
            Ok(fd) => fd,
            Err(error) => return error.into(),
        };
        let version = crate::version::version().to_string();
        let path = source.exe.display().to_string();
        log::info!("upgrade: checking the binary at {path}");
        match check(&source, &memfd) {
            Ok(new_version) => {
                log::info!(
                    "upgrade: {path} (version {new_version}) is ready to take over; re-executing"
                );
            }
            Err(problem) => {
                return UpgradeError::Check {
                    path,
                    problem,
                    version,
                }
            }
        }
        let source_error = exec(&source, &state, &memfd);
        UpgradeError::Exec {
            path,
            source: source_error,
            version,
        }
    }

    /// Handles what already arrived, so that nothing queued inside this process is lost.
    fn drain_pending_inputs(&mut self) {
        while let Some(happened) = self.inbox.pending() {
            if let Some(input) = self.on(happened) {
                self.step(input);
            }
        }
    }

    /// Everything the new binary needs, if the cluster is calm enough to hand over.
    fn handover_state(&self, requester: Option<&OwnedFd>) -> Result<State, UpgradeError> {
        let lifecycle = self.lifecycle.snapshot(Instant::now())?;
        let workers = self
            .workers
            .handover()
            .map_err(|id| UpgradeError::ChannelBusy { id })?;
        let process = match &self.program.process {
            None => None,
            Some(process) => Some(process.handover().ok_or(UpgradeError::PrimaryBusy)?),
        };
        let program = SavedProgram {
            process,
            variants: self.program.variants.all().to_vec(),
        };
        let groups = self
            .groups
            .iter()
            .enumerate()
            .map(|(index, group)| SavedGroup {
                addr: group.addr,
                dual_stack: group.stack() == Stack::Dual,
                v6_only: group.stack() == Stack::V6Only,
                activated: index < self.groups.activated(),
                counters: self.counters_of(group),
                maps: group
                    .balancer
                    .as_ref()
                    .map(|b| SavedMaps {
                        sockets: b.map_fds().sockets.as_ref().and_then(Inherited::of),
                        stats: b.map_fds().stats.as_ref().and_then(Inherited::of),
                    })
                    .unwrap_or_default(),
            })
            .collect();
        Ok(State {
            format: FORMAT,
            from: crate::version::version().to_string(),
            uptime_ms: u64::try_from(self.origin.started.elapsed().as_millis()).unwrap_or(u64::MAX),
            lifecycle,
            strategy: self.config.strategy.to_string(),
            fell_back: self.groups.fell_back(),
            groups,
            workers,
            active: self.workers.active_slots().to_vec(),
            notify: self.notify.fd,
            notify_name: self.notify.name.clone(),
            node: self.workers.launch.protocol == Protocol::Node,
            node_groups: self.workers.node.handover(),
            released_sockets: self.workers.released.iter().copied().collect(),
            control: self.kept.control,
            metrics: self.kept.metrics,
            requester: requester.and_then(Inherited::of),
            program,
            unix: self.groups.unix().saved(),
        })
    }

    /// Per worker slot in `group`: what earlier instances counted (the running one's maps are
    /// read by the new binary itself, after it took over), and the open connections.
    fn counters_of(&self, group: &Group) -> Vec<SlotCounters> {
        let Some(balancer) = &group.balancer else {
            return Vec::new();
        };
        self.workers
            .iter()
            .map(|(_, io)| {
                let base = balancer.base(io.slot());
                SlotCounters {
                    slot: io.slot(),
                    selected: base.selected,
                    fallback: base.fallback,
                    migrated: base.migrated,
                    open: balancer.open_connections(io.slot()),
                }
            })
            .collect()
    }
}

/// The new binary's half of the check: can it take over the cluster `state` describes with
/// this command line? Everything that would fail after the exec is tried here instead.
pub fn check_takeover(config: &super::Config, state: &State) -> Result<(), String> {
    super::launch::spawn::WorkerCommand::for_config(config).map_err(|e| e.to_string())?;
    let running: Vec<_> = state
        .groups
        .iter()
        .filter(|g| g.activated)
        .map(|g| g.addr)
        .collect();
    if running != config.listen {
        let show = |addrs: &[cluster_lb_worker::ListenAddr]| {
            addrs
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        };
        return Err(format!(
            "the command line now listens on [{}] but the cluster runs on [{}]; an upgrade keeps the addresses (restore them, or restart the cluster)",
            show(&config.listen),
            show(&running)
        ));
    }
    let paths: Vec<_> = state
        .unix
        .iter()
        .filter(|listen| listen.activated)
        .map(|listen| listen.path.clone())
        .collect();
    if paths != config.listen_unix {
        let show = |paths: &[std::path::PathBuf]| {
            paths
                .iter()
                .map(|p| format!("unix:{}", p.display()))
                .collect::<Vec<_>>()
                .join(", ")
        };
        return Err(format!(
            "the command line now listens on [{}] but the cluster runs on [{}]; an upgrade keeps the socket paths (restore them, or restart the cluster)",
            show(&config.listen_unix),
            show(&paths)
        ));
    }
    let strategy: crate::kernel::Strategy = state
        .strategy
        .parse()
        .map_err(|e| format!("the cluster's strategy: {e}"))?;
    if !state.fell_back && strategy.program_id().is_some() {
        let mut wanted = vec![strategy];
        if state.groups.iter().any(|g| g.addr.is_udp()) {
            wanted.push(crate::kernel::Strategy::Hash);
        }
        for strategy in wanted {
            crate::kernel::Balancer::load(strategy)
                .map_err(|e| format!("its eBPF program for {strategy} does not load: {e}"))?;
        }
    }
    Ok(())
}

/// Runs the new binary as a check: same arguments, the state in a descriptor, and
/// `CLUSTER_LB_UPGRADE_CHECK=1`. Returns the version it reported, or what went wrong.
fn check(source: &UpgradeSource, memfd: &OwnedFd) -> Result<String, String> {
    let state = Inherited::of(memfd).ok_or("cannot name the state descriptor")?;
    state
        .set_cloexec(false)
        .map_err(|e| format!("cannot pass the state: {e}"))?;
    let spawned = Command::new(&source.exe)
        .args(source.args.iter().skip(1))
        .env(STATE_VARIABLE, state.fd.to_string())
        .env(CHECK_VARIABLE, "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    let _ = state.set_cloexec(true);
    let mut child = spawned.map_err(|e| format!("cannot be started ({e})"))?;
    // The event loop waits here: the check takes a fraction of a second, and the workers do
    // not need the primary to serve.
    let deadline = Instant::now() + CHECK_TIMEOUT;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "did not confirm it can take over within {}s",
                    CHECK_TIMEOUT.as_secs()
                ));
            }
            Err(e) => return Err(format!("could not be waited for ({e})")),
        }
    };
    let mut stdout = String::new();
    let mut stderr = String::new();
    if let Some(mut out) = child.stdout.take() {
        let _ = out.read_to_string(&mut stdout);
    }
    if let Some(mut err) = child.stderr.take() {
        let _ = err.read_to_string(&mut stderr);
    }
    // The check read the state through the same open file: rewind it for the real run.
    let _ = nix::unistd::lseek(memfd, 0, nix::unistd::Whence::SeekSet);
    let said = stdout
        .lines()
        .find_map(|line| line.strip_prefix("ready "))
        .map(str::to_string);
    match (status.success(), said) {
        (true, Some(version)) => Ok(version),
        (success, _) => {
            let how = match status.code() {
                Some(code) if success => format!("exited {code} without saying it is ready"),
                Some(code) => format!("exited {code}"),
                None => "was killed by a signal".to_string(),
            };
            let last = stderr
                .lines()
                .rev()
                .find(|l| !l.trim().is_empty())
                .map(|l| {
                    l.trim()
                        .trim_start_matches("cluster-lb: error: ")
                        .to_string()
                });
            Err(match last {
                Some(line) => format!("{how} in its check: {line}"),
                None => format!("{how} in its check, before confirming it can take over"),
            })
        }
    }
}

/// Replaces this process image with the new binary. Returns only on failure, having undone
/// everything it changed.
fn exec(source: &UpgradeSource, state: &State, memfd: &OwnedFd) -> std::io::Error {
    let mut kept = state.descriptors();
    kept.extend(Inherited::of(memfd));
    let to_c =
        |text: &std::ffi::OsStr| CString::new(text.as_bytes()).map_err(std::io::Error::other);
    let prepared = (|| -> std::io::Result<(CString, Vec<CString>, Vec<CString>)> {
        let path = to_c(source.exe.as_os_str())?;
        let args = source
            .args
            .iter()
            .map(|a| to_c(a))
            .collect::<Result<Vec<_>, _>>()?;
        let mut env = Vec::new();
        for (key, value) in std::env::vars_os() {
            if key == STATE_VARIABLE || key == CHECK_VARIABLE {
                continue;
            }
            let mut pair = key.as_bytes().to_vec();
            pair.push(b'=');
            pair.extend_from_slice(value.as_bytes());
            env.push(CString::new(pair).map_err(std::io::Error::other)?);
        }
        env.push(
            CString::new(format!("{STATE_VARIABLE}={}", memfd.as_raw_fd()))
                .map_err(std::io::Error::other)?,
        );
        Ok((path, args, env))
    })();
    let (path, args, env) = match prepared {
        Ok(prepared) => prepared,
        Err(e) => return e,
    };
    crate::logging::flush(Duration::from_secs(1));
    for fd in &kept {
        if let Err(e) = fd.set_cloexec(false) {
            restore(&kept);
            return e;
        }
    }
    signals::block_for_upgrade();
    let error = match nix::unistd::execve(&path, &args, &env) {
        Err(errno) => std::io::Error::from(errno),
        Ok(never) => match never {},
    };
    signals::unblock_after_upgrade();
    restore(&kept);
    error
}

/// Makes the descriptors close-on-exec again, so no worker started later inherits them.
fn restore(kept: &[Inherited]) {
    for fd in kept {
        let _ = fd.set_cloexec(true);
    }
}
