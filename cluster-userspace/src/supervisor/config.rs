//! What a primary is asked to do, and what it may do to its process.

use std::time::Duration;

use cluster_lb_worker::ListenAddr;
use nix::sys::signal::Signal;

use super::{launch::spawn::Credentials, signals::SignalPolicy};
use crate::{kernel::Strategy, protocol::nodejs::detect::NodeMode};

pub use super::lifecycle::Restart;
use super::lifecycle::Timing;

/// The default of `--ready-timeout`.
pub const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// What to do with a worker that closed a listening socket it was given.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum ClosedListener {
    /// Treat it as failed: drain it and start a new one (its share would otherwise go to its
    /// neighbours in silence, since the kernel emptied its slot).
    #[default]
    Restart,
    /// Only report it (a program that closes sockets it does not use, say).
    Report,
}

impl std::str::FromStr for ClosedListener {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text {
            "restart" => Ok(ClosedListener::Restart),
            "report" => Ok(ClosedListener::Report),
            _ => Err(format!("unknown value '{text}'; use restart or report")),
        }
    }
}

/// `--node-primary`: whether a Node program's own primary branch runs too.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum PrimaryMode {
    /// Once a worker reads `cluster.isPrimary`, `isMaster` or `isWorker` (a plain server never
    /// does).
    #[default]
    Auto,
    /// From the start: the program's primary forks the workers.
    On,
    /// Never: only workers run.
    Off,
}

impl std::str::FromStr for PrimaryMode {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text {
            "auto" => Ok(PrimaryMode::Auto),
            "on" => Ok(PrimaryMode::On),
            "off" => Ok(PrimaryMode::Off),
            _ => Err(format!(
                "unknown --node-primary value '{text}'; use auto, on or off"
            )),
        }
    }
}

impl std::str::FromStr for Restart {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text {
            "cluster" => Ok(Restart::Cluster),
            "program" => Ok(Restart::Program),
            _ => Err(format!(
                "unknown --restart value '{text}'; use cluster or program"
            )),
        }
    }
}

/// What to re-execute in an upgrade: the binary's path when it started, and its arguments.
#[derive(Debug, Clone)]
pub struct UpgradeSource {
    pub exe: std::path::PathBuf,
    pub args: Vec<std::ffi::OsString>,
}

impl UpgradeSource {
    /// This process's binary (resolved now, before anyone replaces the file) and arguments.
    pub fn current() -> Option<UpgradeSource> {
        Some(UpgradeSource {
            exe: std::env::current_exe().ok()?,
            args: std::env::args_os().collect(),
        })
    }
}

/// Everything a primary is asked to do.
#[derive(Debug, Clone)]
pub struct Config {
    pub workers: u32,
    /// `-w` was given: it decides how many workers run, not the program's primary.
    pub workers_given: bool,
    pub listen: Vec<ListenAddr>,
    /// `--listen unix:PATH`: one socket per path, shared by all workers (their fds follow the
    /// addresses' in socket activation).
    pub listen_unix: Vec<std::path::PathBuf>,
    pub strategy: Strategy,
    pub require_ebpf: bool,
    pub timing: Timing,
    pub credentials: Option<Credentials>,
    pub command: Vec<String>,
    /// Whether workers get Node's cluster channel (so unmodified Node programs are workers).
    pub node: NodeMode,
    /// Whether a Node program's primary branch runs too (`--node-primary`).
    pub node_primary: PrimaryMode,
    /// Who restarts a failed worker (`--restart`).
    pub restart: Restart,
    /// The longest message on a Node channel (`--max-message`); a longer one is dropped.
    pub max_message: usize,
    /// Log the messages workers send with their payload (at info), not only their size (at
    /// debug).
    pub log_messages: bool,
    pub signals: SignalPolicy,
    /// Start workers under a seccomp filter that keeps them from replacing or detaching their
    /// reuseport group's program (see `seccomp`).
    pub seccomp: bool,
    /// Let workers set up io_uring rings, which the filter refuses by default: a ring's
    /// commands make system calls (setsockopt among them) that no seccomp filter sees.
    pub allow_io_uring: bool,
    /// What to do with a ready worker that closed a listening socket it was given.
    pub closed_listener: ClosedListener,
    /// Hang detection and the memory, connection and age limits (see `supervisor::health`).
    pub health: super::HealthLimits,
    /// Let `--user` workers get ports below 1024 through queryServer without `--listen`.
    pub allow_low_ports: bool,
    /// Make this process a child subreaper (PR_SET_CHILD_SUBREAPER), so orphans of workers (a
    /// wrapper's children, a daemon a worker left behind) become its children and are reaped
    /// here, as PID 1 does in a container. Only for a process that has no children of its own
    /// besides the workers: reaping orphans means waiting for any child.
    pub subreaper: bool,
    /// What `cluster-lb upgrade` re-executes (`None`: upgrades are refused, as for a program
    /// that embeds the supervisor).
    pub upgrade: Option<UpgradeSource>,
    /// The signal that asks a worker without a channel's `disconnect` to stop, and that
    /// follows a Node worker's `disconnect` when it lingers (`--stop-signal`; SIGTERM).
    pub stop_signal: Signal,
    /// A worker is ready when it sends the message `"ready"`, not at `listening`
    /// (`--wait-ready`, PM2's `wait_ready`).
    pub wait_ready: bool,
    /// The variable that tells a Node worker its instance number, 0 .. N-1 (`--instance-var`,
    /// PM2's `NODE_APP_INSTANCE`).
    pub instance_var: String,
    /// A variable whose value (from the workers' environment, 0 if unset) each worker gets
    /// plus its instance number (`--increment-var`, PM2's `increment_var`: `PORT` gives
    /// 3000, 3001, ...).
    pub increment_var: Option<String>,
    /// Variables every worker gets on top of the primary's environment (an ecosystem file's
    /// `env`, `env_NAME`).
    pub env: Vec<(String, String)>,
    /// The directory workers start in (the primary's own when `None`).
    pub cwd: Option<std::path::PathBuf>,
    /// How a reload reads the configuration anew (`None`: a reload re-runs the same command).
    pub reconfigure: Option<Reconfigure>,
}

/// What a reload calls first to read the cluster's configuration anew (`cluster-lb run
/// --config FILE` reads its file again): the whole configuration, or one line saying why the
/// reload must not happen (the file no longer parses, or changes what only a restart can).
/// Of what it returns, a reload takes `command`, `env` and `cwd` (for its replacements, once
/// the first of them is ready) and `workers` (scaled to once the reload completed); the hook
/// is to refuse a change of anything else. Called on the supervisor's thread, once per
/// reload, before anything is started: it should be quick.
#[derive(Clone)]
pub struct Reconfigure(std::sync::Arc<dyn Fn() -> Result<Config, String> + Send + Sync>);

impl Reconfigure {
    pub fn new(read: impl Fn() -> Result<Config, String> + Send + Sync + 'static) -> Reconfigure {
        Reconfigure(std::sync::Arc::new(read))
    }

    /// The configuration now, or why a reload is refused.
    pub fn read(&self) -> Result<Config, String> {
        (self.0)()
    }
}

impl std::fmt::Debug for Reconfigure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Reconfigure(..)")
    }
}

/// The default of `--instance-var`: PM2's name, which PM2-era code tests
/// (`process.env.NODE_APP_INSTANCE === '0'`) and node-config reads.
pub const INSTANCE_VAR: &str = "NODE_APP_INSTANCE";

impl Config {
    /// For a program that is its own primary (the Node `cluster` idiom): `workers` copies of
    /// this very program, with these arguments, asking for their addresses over IPC. Signals
    /// are handled (TERM stops gracefully), the process is not made a subreaper, and the rest
    /// are the command line's defaults. Adjust the fields before use.
    pub fn reexec_current(workers: u32) -> std::io::Result<Config> {
        let exe = std::env::current_exe()?;
        let mut command = vec![exe.display().to_string()];
        command.extend(std::env::args().skip(1));
        Ok(Config {
            workers,
            workers_given: true,
            listen: Vec::new(),
            listen_unix: Vec::new(),
            strategy: Strategy::RoundRobin,
            require_ebpf: false,
            timing: Timing {
                drain_delay: Duration::ZERO,
                grace: Duration::from_secs(30),
                ready_delay: Duration::from_secs(1),
                ready_timeout: READY_TIMEOUT,
            },
            credentials: None,
            command,
            node: NodeMode::Auto,
            node_primary: PrimaryMode::Off,
            restart: Restart::Cluster,
            max_message: crate::protocol::nodejs::channel::MAX_LINE,
            log_messages: false,
            signals: SignalPolicy::Handle,
            seccomp: true,
            allow_io_uring: false,
            allow_low_ports: false,
            closed_listener: ClosedListener::Restart,
            health: super::HealthLimits::default(),
            subreaper: false,
            upgrade: None,
            stop_signal: Signal::SIGTERM,
            wait_ready: false,
            instance_var: INSTANCE_VAR.to_string(),
            increment_var: None,
            env: Vec::new(),
            cwd: None,
            reconfigure: None,
        })
    }
}
