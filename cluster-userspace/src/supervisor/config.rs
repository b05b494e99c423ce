//! What a primary is asked to do, and what it may do to its process.

use std::time::Duration;

use crate::{
    kernel::Strategy, listen_addr::ListenAddr, node::detect::NodeMode, spawn::Credentials,
};

use super::lifecycle::Timing;

/// The default of `--ready-timeout`.
pub const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// Who handles the process's signals.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SignalPolicy {
    /// The supervisor installs handlers: TERM and INT stop gracefully (a second one at once),
    /// QUIT stops at once, HUP reloads, TTIN and TTOU add or remove a worker.
    Handle,
    /// The supervisor touches no signal; the embedder drives it through its `Handle`.
    Leave,
}

/// Everything a primary is asked to do.
#[derive(Debug, Clone)]
pub struct Config {
    pub workers: u32,
    pub listen: Vec<ListenAddr>,
    pub strategy: Strategy,
    pub require_ebpf: bool,
    pub timing: Timing,
    pub credentials: Option<Credentials>,
    pub command: Vec<String>,
    /// Whether workers get Node's cluster channel (so unmodified Node programs are workers).
    pub node: NodeMode,
    pub signals: SignalPolicy,
    /// Start workers under a seccomp filter that keeps them from replacing or detaching their
    /// reuseport group's program (see `seccomp`).
    pub seccomp: bool,
    /// Let workers set up io_uring rings, which the filter refuses by default: a ring's
    /// commands make system calls (setsockopt among them) that no seccomp filter sees.
    pub allow_io_uring: bool,
    /// What to do with a ready worker that closed a listening socket it was given.
    pub closed_listener: super::checks::ClosedListener,
    /// Let `--user` workers get ports below 1024 through queryServer without `--listen`.
    pub allow_low_ports: bool,
    /// Make this process a child subreaper (PR_SET_CHILD_SUBREAPER), so orphans of workers (a
    /// wrapper's children, a daemon a worker left behind) become its children and are reaped
    /// here, as PID 1 does in a container. Only for a process that has no children of its own
    /// besides the workers: reaping orphans means waiting for any child.
    pub subreaper: bool,
    /// What `cluster-lb upgrade` re-executes (`None`: upgrades are refused, as for a program
    /// that embeds the supervisor).
    pub upgrade: Option<super::upgrade::UpgradeSource>,
}

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
            listen: Vec::new(),
            strategy: Strategy::RoundRobin,
            require_ebpf: false,
            timing: Timing {
                grace: Duration::from_secs(30),
                ready_delay: Duration::from_secs(1),
                ready_timeout: READY_TIMEOUT,
            },
            credentials: None,
            command,
            node: NodeMode::Auto,
            signals: SignalPolicy::Handle,
            seccomp: true,
            allow_io_uring: false,
            allow_low_ports: false,
            closed_listener: super::checks::ClosedListener::Restart,
            subreaper: false,
            upgrade: None,
        })
    }
}
