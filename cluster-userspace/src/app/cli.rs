//! Command-line interface. Parsing only; `main.rs` dispatches and `supervisor` does the work.

use std::{
    collections::HashSet,
    path::{Path, PathBuf},
    time::Duration,
};

use clap::{Args, Parser, Subcommand};
use cluster_common::MAX_WORKERS;

use cluster_lb_worker::ListenAddr;

use super::{
    control::ControlPath,
    names::{self, ClusterName},
    run::RunOptions,
};
use crate::{
    kernel::Strategy,
    logging::Format,
    protocol::nodejs::detect::NodeMode,
    supervisor::{
        launch::privileges::{self, UserError},
        lifecycle::Timing,
        Config, HealthLimits, SignalPolicy, INSTANCE_VAR,
    },
};
use nix::sys::signal::Signal;

/// Most --listen addresses (each worker gets one socket per address).
pub const MAX_LISTEN: usize = 32;

/// What the command line asks for that cannot work, found after parsing.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("--listen {0} is given twice; each address needs one --listen")]
    DuplicateListen(Listen),
    #[error("{0} --listen addresses, the most is {MAX_LISTEN}")]
    TooManyListen(usize),
    #[error(
        "--ready-timeout must be more than 0 seconds: a new worker needs some time to get ready"
    )]
    ReadyTimeoutZero,
    #[error(
        "--metrics {0} is also a --listen address; the metrics server needs an address of its own"
    )]
    MetricsOnListen(ListenAddr),
    #[error("--strategy round-robin would split UDP flows between workers (it picks a worker per datagram); use --strategy hash or sticky with {0}")]
    RoundRobinUdp(ListenAddr),
    #[error("--max-memory-hard {hard} is below --max-memory {soft}: a worker would be killed before it could be replaced; make the hard ceiling the higher one")]
    MemoryCeilingBelowLimit { soft: String, hard: String },
    #[error("no command to run: give it after -- (cluster-lb run [OPTIONS] -- CMD [ARGS]...) or as `command` in the --config file")]
    NoCommand,
    #[error("--chdir {}: {problem}", .dir.display())]
    Chdir {
        dir: std::path::PathBuf,
        problem: String,
    },
    #[error("--watch {}: {problem}; give a file or directory that exists", .path.display())]
    Watch {
        path: std::path::PathBuf,
        problem: String,
    },
    #[error(transparent)]
    Launcher(#[from] super::launcher::LauncherError),
    #[error(transparent)]
    User(#[from] UserError),
    /// --env-file cannot be read, or a line of it is no variable (one line: the file, the
    /// line, the problem).
    #[error("{0}")]
    EnvFile(String),
}

impl ConfigError {
    /// The run option (as a config file key) whose value is wrong.
    pub fn key(&self) -> &'static str {
        match self {
            ConfigError::DuplicateListen(_) | ConfigError::TooManyListen(_) => "listen",
            ConfigError::ReadyTimeoutZero => "ready_timeout",
            ConfigError::MetricsOnListen(_) => "metrics",
            ConfigError::RoundRobinUdp(_) => "strategy",
            ConfigError::NoCommand | ConfigError::Launcher(_) => "command",
            ConfigError::Chdir { .. } => "cwd",
            ConfigError::Watch { .. } => "watch",
            ConfigError::EnvFile(_) => "env_file",
            ConfigError::MemoryCeilingBelowLimit { .. } => "max_memory_hard",
            ConfigError::User(UserError::GroupWithoutUser | UserError::NoSuchGroup(_)) => "group",
            ConfigError::User(_) => "user",
        }
    }
}

#[derive(Debug, Parser)]
#[command(
    name = "cluster-lb",
    version = crate::version::version(),
    about = "Run N workers of any server on one port, balanced in the kernel by eBPF",
    after_help = "Example: sudo cluster-lb run -w 4 --listen 0.0.0.0:80 -- ./server"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Start the workers and supervise them in the foreground until TERM or INT.
    Run(Box<RunArgs>),
    /// List the running clusters (exit 1 when none answers); with --name or --control, show
    /// one cluster's workers: id, pid, state, uptime, restarts, connections the kernel gave
    /// each, memory.
    Status {
        #[command(flatten)]
        control: ControlArg,
        /// Print the status as JSON
        #[arg(long)]
        json: bool,
        /// Exit 1 unless every wanted worker of the cluster (of each, without --name) is
        /// ready: a readiness probe. Plain `status` succeeds as soon as a primary answers.
        #[arg(long)]
        ready: bool,
    },
    /// A live view of every worker, refreshed every second: state, new connections per
    /// second, restarts, memory, CPU. q, Esc or Ctrl-C quits.
    Top {
        #[command(flatten)]
        control: ControlArg,
    },
    /// Rolling reload: replace every worker, one at a time, with no dropped connection.
    Reload {
        #[command(flatten)]
        control: ControlArg,
    },
    /// Run N workers.
    Scale {
        #[arg(value_name = "N", value_parser = clap::value_parser!(u32).range(1..=MAX_WORKERS as i64))]
        workers: u32,
        #[command(flatten)]
        control: ControlArg,
    },
    /// Stop the cluster gracefully.
    Stop {
        #[command(flatten)]
        control: ControlArg,
    },
    /// Send a message (one JSON value) to a worker, or to every worker, on its channel: a
    /// Node worker gets it in process.on('message'), a cluster-lb-worker (Rust) or Python
    /// client as a message from the primary. Exit 1 when a worker did not get it.
    Send {
        #[command(flatten)]
        to: SendTo,
        /// The message, as JSON (quote it for the shell: '{"cmd":"reload-config"}')
        #[arg(value_name = "JSON")]
        message: String,
        #[command(flatten)]
        control: ControlArg,
    },
    /// Show the primary's recent log: its own events and every worker's stdout and stderr
    /// lines, as its text log shows them (control characters escaped), wherever its own output
    /// goes. The primary keeps the last 1000 lines, at most 4 MiB, in memory; -f then shows new
    /// lines as they come, until the cluster stops or Ctrl-C. A reader that falls behind by
    /// more than that is told how many lines it missed ("... N lines dropped").
    Logs {
        /// Only the output of this worker id (ids as `status` shows them)
        #[arg(long, value_name = "ID")]
        worker: Option<u32>,
        /// Keep showing new lines as they come (as tail -f)
        #[arg(short = 'f', long)]
        follow: bool,
        /// How many of the last lines to show first (0: none, only new ones with -f)
        #[arg(short = 'n', long, value_name = "LINES", default_value_t = 100,
              value_parser = clap::value_parser!(u32).range(0..=1_000_000))]
        lines: u32,
        /// One JSON object per line: time, source (event, worker or primary: the program's
        /// own primary process), worker, pid, level (events), stream (stdout or stderr), text
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        control: ControlArg,
    },
    /// Replace the running primary with the binary now at its path, in place: same pid, same
    /// workers, no connection dropped (also: SIGUSR2 to the primary). Refused while a reload
    /// is under way; a new binary that cannot take over leaves the old one in charge.
    Upgrade {
        #[command(flatten)]
        control: ControlArg,
    },
    /// Write the man pages and the bash, zsh and fish completions into DIR (for packagers:
    /// `cargo xtask dist` runs it)
    #[command(hide = true)]
    GenerateDist {
        #[arg(value_name = "DIR")]
        dir: std::path::PathBuf,
    },
}

/// Which workers `send` is for.
#[derive(Debug, Args)]
#[group(required = true, multiple = false)]
pub struct SendTo {
    /// Every process of this worker id that is not being stopped (ids as `status` shows them)
    #[arg(long, value_name = "ID", allow_negative_numbers = true)]
    pub worker: Option<u32>,
    /// Every worker that is not being stopped
    #[arg(long)]
    pub all: bool,
}

impl SendTo {
    pub fn recipients(&self) -> crate::supervisor::Recipients {
        match self.worker {
            Some(id) => crate::supervisor::Recipients::Worker(id),
            None => crate::supervisor::Recipients::All,
        }
    }
}

#[derive(Debug, Args)]
pub struct ControlArg {
    /// The cluster to talk to, by the name it was started with [default: status lists every
    /// running cluster; reload, scale and stop act on the only one]
    #[arg(long, value_name = "NAME")]
    pub name: Option<ClusterName>,
    /// The running primary's control socket, for a cluster started with --control PATH
    #[arg(long = "control", value_name = "PATH", conflicts_with = "name")]
    pub path: Option<std::path::PathBuf>,
}

impl ControlArg {
    pub fn target(self) -> crate::app::client::Target {
        use crate::app::client::Target;
        match (self.path, self.name) {
            (Some(path), _) => Target::Path(path),
            (None, Some(name)) => Target::Name(name),
            (None, None) => Target::Unnamed,
        }
    }
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// Number of workers [default: number of CPUs]
    #[arg(short = 'w', long, value_name = "N", allow_negative_numbers = true,
          value_parser = clap::value_parser!(u32).range(1..=MAX_WORKERS as i64))]
    pub workers: Option<u32>,

    /// Address every worker listens on: PORT, HOST:PORT or [IPV6]:PORT (udp:// for UDP), or
    /// unix:PATH for one Unix socket all workers share (not balanced by eBPF: the workers take
    /// turns in accept). Repeatable; the sockets are fds 3, 4, ... in this order, the unix:
    /// paths after the addresses. Without any, workers ask for addresses over IPC
    #[arg(short = 'l', long = "listen", value_name = "ADDR")]
    pub listen: Vec<Listen>,

    /// How new connections are spread: round-robin (exact, eBPF; the default for TCP), hash
    /// (the flow's hash, consistent, eBPF; the default for udp:// addresses), sticky (the
    /// client's address, consistent, eBPF), least-loaded (the worker with the fewest open
    /// connections, counted in the kernel; of two above 8 workers; eBPF) or kernel (plain
    /// SO_REUSEPORT, no program)
    #[arg(short = 's', long, value_name = "STRATEGY")]
    pub strategy: Option<Strategy>,

    /// Fail (exit 1) instead of falling back to --strategy kernel when eBPF is unavailable
    #[arg(long)]
    pub require_ebpf: bool,

    /// Seconds a worker asked to stop has to exit before it is killed
    #[arg(long, value_name = "SECONDS", default_value_t = 30.0, value_parser = parse_seconds,
          allow_negative_numbers = true)]
    pub grace: f64,

    /// Seconds a worker that got connections stays out of rotation before it is asked to stop
    /// (reload, scale down, stop), so that requests already on their way reach it first: for
    /// servers that drop connections they have not read yet when asked to stop (uvicorn,
    /// lighttpd). The --grace starts after it
    #[arg(long, value_name = "SECONDS", default_value_t = 0.0, value_parser = parse_seconds,
          allow_negative_numbers = true)]
    pub drain_delay: f64,

    /// Seconds after start when a worker that signals nothing counts as ready (one that says
    /// READY=1 on NOTIFY_SOCKET, or `listening` over IPC, is ready as soon as it does)
    #[arg(long, value_name = "SECONDS", default_value_t = 1.0,
          value_parser = parse_seconds, allow_negative_numbers = true)]
    pub ready_delay: f64,

    /// Seconds a new worker has to become ready before it is killed and restarted (a reload
    /// then keeps the old worker it was to replace)
    #[arg(long, value_name = "SECONDS", default_value_t = 30.0, value_parser = parse_seconds,
          allow_negative_numbers = true)]
    pub ready_timeout: f64,

    /// Run the workers as this user (name or uid); the primary keeps root to bind and balance
    #[arg(short = 'u', long, value_name = "USER")]
    pub user: Option<String>,

    /// Run the workers with this group (name or gid) [default: the user's primary group]
    #[arg(short = 'g', long, value_name = "GROUP")]
    pub group: Option<String>,

    /// The cluster's name, for status, reload, scale and stop --name [default: from the first
    /// --listen address (8080, 127.0.0.1-8080), else the program (server, app for node app.js)]
    #[arg(long, value_name = "NAME")]
    pub name: Option<ClusterName>,

    /// Control socket for status, reload, scale and stop (mode 0600) [default: NAME.sock in
    /// /run/cluster-lb as root, else $XDG_RUNTIME_DIR/cluster-lb; $CLUSTER_LB_RUN_DIR overrides]
    #[arg(long, value_name = "PATH")]
    pub control: Option<std::path::PathBuf>,

    /// Serve Prometheus metrics at http://ADDR/metrics (e.g. 127.0.0.1:9100)
    #[arg(long, value_name = "ADDR")]
    pub metrics: Option<ListenAddr>,

    /// Give workers Node's cluster channel, so that unmodified Node programs are workers (their
    /// listen() gets a socket from cluster-lb): auto (when the program is node, or a script run
    /// by node), on (e.g. for a shell wrapper that execs node), or off
    #[arg(long, value_name = "WHEN", default_value = "auto")]
    pub node: NodeMode,

    /// Run a Node program's primary branch (cluster.isPrimary) too, with cluster.fork(),
    /// worker.send() and every cluster event backed by cluster-lb: auto (once a worker reads
    /// cluster.isPrimary, isMaster or isWorker; a plain server never does), on (from the start:
    /// the program's forks start the workers), or off
    #[arg(long, value_name = "WHEN", default_value = "auto")]
    pub node_primary: crate::supervisor::PrimaryMode,

    /// Who restarts a worker that failed: cluster (cluster-lb, with growing delays) or program
    /// (nobody but the program's own primary, as in Node's cluster)
    #[arg(long, value_name = "WHO", default_value = "cluster")]
    pub restart: crate::supervisor::Restart,

    /// The longest message a Node worker or primary may send, in bytes (suffixes K, M, G); a
    /// longer one is dropped with one line, and the worker goes on
    #[arg(long, value_name = "BYTES", default_value = "64M", value_parser = parse_bytes)]
    pub max_message: usize,

    /// Log every message a worker sends with its payload (at info); by default only its size
    /// and first bytes, at debug
    #[arg(long)]
    pub log_messages: bool,

    /// Start workers without the seccomp filter that keeps them from replacing or detaching
    /// the eBPF program of their listen group (SO_ATTACH_REUSEPORT_*BPF, SO_DETACH_REUSEPORT_BPF)
    #[arg(long)]
    pub no_seccomp: bool,

    /// Let workers use io_uring, which the seccomp filter refuses by default: a ring's
    /// commands can change the group's program past the filter (the primary then restores it
    /// within 5 s)
    #[arg(long)]
    pub allow_io_uring: bool,

    /// The directory every worker starts in, kept as given: each new worker enters it anew, so
    /// with a symlink (/srv/app/current -> releases/...) a reload runs the release it points
    /// to then; a relative program (./server) is found there. Config file key: cwd [default:
    /// $PWD when it is this directory reached through a symlink, else this directory]
    #[arg(long, value_name = "DIR")]
    pub chdir: Option<std::path::PathBuf>,

    /// Variables for the workers from a dotenv file (KEY=value lines, # comments, optional
    /// `export `, single or double quotes), read at start and again at every reload of a
    /// cluster started with --config; an `env` of the config file overrides it
    #[arg(long, value_name = "FILE")]
    pub env_file: Option<std::path::PathBuf>,

    /// Let --user workers get ports below 1024 by asking for them (queryServer) when no
    /// --listen names them
    #[arg(long)]
    pub allow_low_ports: bool,

    /// What to do with a ready worker that closed a listening socket it was given: restart it
    /// (the kernel sends it nothing there any more), or only report it
    #[arg(long, value_name = "WHAT", default_value = "restart")]
    pub on_closed_listener: crate::supervisor::ClosedListener,

    /// A worker that leaves connections waiting in its accept queue and accepts none of them
    /// for this long is hung: it is replaced (its replacement started first), then killed, and
    /// what was queued on it moves to live workers. 0 turns hang detection off. After a second
    /// without an accept it already gets no new connections, until it accepts again
    #[arg(long, value_name = "SECONDS", default_value = "30")]
    pub hang_timeout: f64,

    /// Give workers WATCHDOG_USEC (systemd's watchdog): a ready worker that sends no
    /// WATCHDOG=1 to NOTIFY_SOCKET for this long is hung, replaced and killed as above
    #[arg(long, value_name = "SECONDS", value_parser = parse_duration)]
    pub watchdog: Option<Duration>,

    /// Replace a worker whose memory (PSS: pages shared with its siblings count once) goes
    /// above this (suffixes K, M, G): its replacement is ready first, then it drains within
    /// --grace; one worker at a time
    #[arg(long, value_name = "SIZE", value_parser = parse_bytes)]
    pub max_memory: Option<usize>,

    /// Kill a worker whose memory (PSS) goes above this at once (suffixes K, M, G)
    #[arg(long, value_name = "SIZE", value_parser = parse_bytes)]
    pub max_memory_hard: Option<usize>,

    /// Replace a worker once the kernel gave it this many connections (plus up to
    /// --recycle-jitter more), its replacement ready first; one worker at a time
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub max_connections: Option<u64>,

    /// Replace a worker once it ran this long (plus up to --recycle-jitter more): 3600, 90s,
    /// 30m, 12h, 7d; its replacement ready first, one worker at a time
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub max_age: Option<Duration>,

    /// Each worker's --max-connections and --max-age are up to this fraction higher, at random,
    /// so that workers started together are not replaced together
    #[arg(long, value_name = "FRACTION", default_value = "0.1", value_parser = parse_fraction)]
    pub recycle_jitter: f64,

    /// Log lines as text or as JSON objects, one per line
    #[arg(long, value_name = "FORMAT", default_value = "text")]
    pub log_format: Format,

    /// Append the log (the primary's lines and its workers') to FILE instead of writing it to
    /// stdout and stderr. At --log-file-size, FILE becomes FILE.1 (replacing the one before)
    /// and a new FILE begins; SIGUSR1 reopens FILE (after logrotate moved it). Only a regular
    /// file of cluster-lb's own user is taken (no symbolic link, FIFO, hard link or file of
    /// another user). `cluster-lb logs` works either way
    #[arg(long, value_name = "FILE")]
    pub log_file: Option<std::path::PathBuf>,

    /// The size at which --log-file is rotated [default: 10M]
    #[arg(long, value_name = "SIZE", value_parser = parse_bytes, requires = "log_file")]
    pub log_file_size: Option<usize>,

    /// The signal that asks a worker to stop when it has no `disconnect` to hear (not a Node
    /// or cluster-lb channel), and that a Node worker lingering after `disconnect` gets: TERM,
    /// or e.g. INT for apps written for PM2, which clean up on SIGINT [default: TERM; INT for
    /// a PM2 ecosystem file]
    #[arg(long, value_name = "SIGNAL", value_parser = parse_signal)]
    pub stop_signal: Option<Signal>,

    /// A worker is ready (gets connections) when it sends the message "ready" (Node:
    /// process.send('ready'), PM2's wait_ready), not when it listens
    #[arg(long)]
    pub wait_ready: bool,

    /// The variable that gives each Node worker its instance number, 0 .. N-1, kept by a
    /// restarted worker (PM2's instance_var)
    #[arg(long, value_name = "NAME", default_value = INSTANCE_VAR, value_parser = parse_variable)]
    pub instance_var: String,

    /// A variable each worker gets as its value in the workers' environment (0 if unset) plus
    /// its instance number: PORT=3000 gives 3000, 3001, ... (PM2's increment_var)
    #[arg(long, value_name = "NAME", value_parser = parse_variable)]
    pub increment_var: Option<String>,

    /// Development mode: when a file under PATH (a file, or a directory and every directory
    /// under it) changes, reload the workers as `cluster-lb reload` does, once for changes
    /// within 300 ms of each other, never two reloads at once. node_modules, .git, __pycache__
    /// and editors' temporary files (*.swp, *~, .#*, 4913) are left out (repeatable)
    #[arg(long = "watch", value_name = "PATH")]
    pub watch: Vec<std::path::PathBuf>,

    /// Read these options from a file: TOML (keys as the long options, with _ for -, and
    /// `command = [...]`), or a PM2 ecosystem file (*.config.js, *.config.cjs, *.json: see
    /// docs/PM2.md); options given here override the file's
    #[arg(long, value_name = "FILE")]
    pub config: Option<std::path::PathBuf>,

    /// With a PM2 ecosystem file: merge the app's env_NAME over its env (pm2 start --env NAME)
    #[arg(long = "env", value_name = "NAME", requires = "config")]
    pub env_name: Option<String>,

    /// With a PM2 ecosystem file of several apps: the one to run (one cluster per app)
    #[arg(long, visible_alias = "only", value_name = "NAME", requires = "config")]
    pub app: Option<String>,

    /// Variables the workers get over the primary's environment (from an ecosystem file)
    #[arg(skip)]
    pub worker_env: Vec<(String, String)>,

    /// The worker program and its arguments
    #[arg(last = true, required_unless_present = "config", value_name = "CMD")]
    pub command: Vec<String>,
}

fn parse_duration(text: &str) -> Result<Duration, String> {
    let (digits, unit) = match text
        .char_indices()
        .find(|(_, c)| !c.is_ascii_digit() && *c != '.')
    {
        Some((at, _)) => text.split_at(at),
        None => (text, ""),
    };
    let seconds = match unit {
        "" | "s" => 1.0,
        "m" => 60.0,
        "h" => 3600.0,
        "d" => 86400.0,
        _ => f64::NAN,
    };
    match digits.parse::<f64>() {
        Ok(n) if n > 0.0 && n.is_finite() && seconds.is_finite() => {
            Ok(Duration::from_secs_f64(n * seconds))
        }
        _ => Err(format!(
            "'{text}' is not a duration; write e.g. 3600, 90s, 30m, 12h or 7d"
        )),
    }
}

fn parse_fraction(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(f) if (0.0..=1.0).contains(&f) => Ok(f),
        _ => Err(format!(
            "'{text}' is not a fraction from 0 to 1; write e.g. 0.1 for up to 10% more"
        )),
    }
}

fn parse_bytes(text: &str) -> Result<usize, String> {
    let (digits, unit) = match text.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        Some((at, _)) => text.split_at(at),
        None => (text, ""),
    };
    let shift = match unit.to_ascii_uppercase().as_str() {
        "" | "B" => 0,
        "K" | "KB" | "KIB" => 10,
        "M" | "MB" | "MIB" => 20,
        "G" | "GB" | "GIB" => 30,
        _ => {
            return Err(format!(
                "'{text}' is not a size; write e.g. 65536, 512K or 64M"
            ))
        }
    };
    let bytes = digits
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_shl(shift))
        .filter(|n| (1024..=(4u64 << 30)).contains(n))
        .ok_or_else(|| format!("'{text}' is not a size between 1K and 4G"))?;
    usize::try_from(bytes).map_err(|_| format!("'{text}' is too large here"))
}

/// A signal by name (INT, SIGINT, int) that can ask a process to stop.
pub fn parse_signal(text: &str) -> Result<Signal, String> {
    let upper = text.trim().to_ascii_uppercase();
    let name = if upper.starts_with("SIG") {
        upper
    } else {
        format!("SIG{upper}")
    };
    match name.parse::<Signal>() {
        Ok(Signal::SIGKILL | Signal::SIGSTOP) => Err(format!(
            "{text} cannot be caught, so it is no graceful stop (--grace already ends in SIGKILL); use TERM or INT"
        )),
        Ok(signal) => Ok(signal),
        Err(_) => Err(format!(
            "'{text}' is not a signal; write e.g. TERM, INT or SIGQUIT"
        )),
    }
}

/// An environment variable's name.
pub fn parse_variable(text: &str) -> Result<String, String> {
    if text.is_empty() || text.contains(['=', '\0']) {
        Err(format!(
            "'{text}' is not a variable name (it must be non-empty, without '=')"
        ))
    } else {
        Ok(text.to_string())
    }
}

fn parse_seconds(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(seconds) if (0.0..=3600.0).contains(&seconds) => Ok(seconds),
        _ => Err(format!(
            "'{text}' is not a number of seconds between 0 and 3600"
        )),
    }
}

/// One `--listen` value: an address (TCP or UDP), or a Unix-socket path (`unix:/run/app.sock`,
/// as nginx and gunicorn write it).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Listen {
    Address(ListenAddr),
    Unix(PathBuf),
}

impl Listen {
    /// The addresses and the paths, each in the order given.
    fn split(all: &[Listen]) -> (Vec<ListenAddr>, Vec<PathBuf>) {
        let mut addresses = Vec::new();
        let mut paths = Vec::new();
        for listen in all {
            match listen {
                Listen::Address(addr) => addresses.push(*addr),
                Listen::Unix(path) => paths.push(path.clone()),
            }
        }
        (addresses, paths)
    }
}

impl std::str::FromStr for Listen {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let Some(path) = text.trim().strip_prefix("unix:") else {
            return text.parse().map(Listen::Address);
        };
        let path = PathBuf::from(path);
        if !path.is_absolute() {
            return Err(format!(
                "unix:{}: a socket path must be absolute, e.g. unix:/run/app/app.sock",
                path.display()
            ));
        }
        Ok(Listen::Unix(path))
    }
}

impl std::fmt::Display for Listen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Listen::Address(addr) => addr.fmt(f),
            Listen::Unix(path) => write!(f, "unix:{}", path.display()),
        }
    }
}

impl RunArgs {
    /// Checks what clap cannot see one argument at a time, and fills in defaults.
    pub fn into_options(mut self) -> Result<RunOptions, ConfigError> {
        if self.command.is_empty() {
            return Err(ConfigError::NoCommand);
        }
        let mut seen = HashSet::new();
        for listen in &self.listen {
            if !seen.insert(listen) {
                return Err(ConfigError::DuplicateListen(listen.clone()));
            }
        }
        if self.listen.len() > MAX_LISTEN {
            return Err(ConfigError::TooManyListen(self.listen.len()));
        }
        let (addresses, paths) = Listen::split(&self.listen);
        if let (Some(Strategy::RoundRobin), Some(udp)) =
            (self.strategy, addresses.iter().find(|a| a.is_udp()))
        {
            return Err(ConfigError::RoundRobinUdp(*udp));
        }
        if let Some(metrics) = self.metrics.filter(|m| addresses.contains(m)) {
            return Err(ConfigError::MetricsOnListen(metrics));
        }
        if self.ready_timeout <= 0.0 {
            return Err(ConfigError::ReadyTimeoutZero);
        }
        if self.ready_timeout <= self.ready_delay {
            log::warn!(
                "--ready-timeout {}s is not longer than --ready-delay {}s: only workers that signal readiness (READY=1, listening) can be ready in time",
                self.ready_timeout,
                self.ready_delay
            );
        }
        if let (Some(soft), Some(hard)) = (self.max_memory, self.max_memory_hard) {
            if hard < soft {
                return Err(ConfigError::MemoryCeilingBelowLimit {
                    soft: format!("{}M", soft >> 20),
                    hard: format!("{}M", hard >> 20),
                });
            }
        }
        for path in &self.watch {
            checked_watch_path(path)?;
        }
        let workers = match self.workers {
            Some(n) => n,
            None => std::thread::available_parallelism()
                .map(|n| n.get() as u32)
                .unwrap_or(1)
                .min(MAX_WORKERS),
        };
        let cwd = match self.chdir {
            Some(dir) => Some(checked_directory(dir)?),
            None => {
                let here = std::env::current_dir().ok();
                let logical = here.as_deref().and_then(|here| {
                    through_symlink(std::env::var_os("PWD").as_deref().map(Path::new), here)
                });
                if let (Some(dir), Some(here)) = (&logical, &here) {
                    log::info!(
                        "the workers start in {} ($PWD), this directory ({}) by the path it was reached through: each new worker follows its symlinks anew (--chdir to choose another)",
                        dir.display(),
                        here.display()
                    );
                }
                logical
            }
        };
        if let Some(path) = &self.env_file {
            // Under the config file's own `env`, which names variables one by one.
            let read = super::dotenv::read(path).map_err(ConfigError::EnvFile)?;
            self.worker_env.splice(0..0, read);
        }
        if self.node != NodeMode::Off {
            // `npm start` and the like: the package script's node command, run directly. Its
            // package.json is the one in the workers' directory.
            let dir = match &cwd {
                Some(dir) => dir.clone(),
                None => std::env::current_dir().unwrap_or_else(|_| ".".into()),
            };
            let resolved = super::launcher::resolve(std::mem::take(&mut self.command), &dir)?;
            self.command = resolved.command;
            // The script's own assignments last: under npm they are the shell's, which win over
            // whatever environment npm was started with (an ecosystem file's env included).
            self.worker_env.extend(resolved.env);
        }
        let credentials = privileges::resolve(self.user.as_deref(), self.group.as_deref())?;
        privileges::require_capabilities(credentials.as_ref())?;
        let name = self
            .name
            .unwrap_or_else(|| ClusterName::default_for(&addresses, &self.command));
        let control = match self.control {
            Some(path) => ControlPath::Explicit(path),
            None => ControlPath::Named(names::socket_path(&name)),
        };
        let supervisor = Config {
            workers,
            workers_given: self.workers.is_some(),
            listen: addresses,
            listen_unix: paths,
            strategy: self.strategy.unwrap_or_default(),
            require_ebpf: self.require_ebpf,
            timing: Timing {
                drain_delay: Duration::from_secs_f64(self.drain_delay),
                grace: Duration::from_secs_f64(self.grace),
                ready_delay: Duration::from_secs_f64(self.ready_delay),
                ready_timeout: Duration::from_secs_f64(self.ready_timeout),
            },
            credentials,
            command: self.command,
            node: self.node,
            node_primary: self.node_primary,
            restart: self.restart,
            max_message: self.max_message,
            log_messages: self.log_messages,
            seccomp: !self.no_seccomp,
            allow_io_uring: self.allow_io_uring,
            allow_low_ports: self.allow_low_ports,
            closed_listener: self.on_closed_listener,
            health: HealthLimits {
                hang_timeout: (self.hang_timeout > 0.0)
                    .then(|| Duration::from_secs_f64(self.hang_timeout)),
                max_memory: self.max_memory.map(|b| b as u64),
                max_memory_hard: self.max_memory_hard.map(|b| b as u64),
                max_connections: self.max_connections,
                max_age: self.max_age,
                jitter: self.recycle_jitter,
                watchdog: self.watchdog,
            },
            // The command-line primary owns its process: signals are its interface, and it
            // may be PID 1 in a container, where orphans must be reaped.
            signals: SignalPolicy::Handle,
            subreaper: true,
            upgrade: crate::supervisor::UpgradeSource::current(),
            stop_signal: self.stop_signal.unwrap_or(Signal::SIGTERM),
            wait_ready: self.wait_ready,
            instance_var: self.instance_var,
            increment_var: self.increment_var,
            env: self.worker_env,
            cwd,
            // `app::main` sets it for a cluster run from a config file.
            reconfigure: None,
        };
        let log_file_size = self
            .log_file_size
            .map_or(crate::logging::file::DEFAULT_SIZE, |size| size as u64);
        Ok(RunOptions {
            supervisor,
            name,
            control: Some(control),
            metrics: self.metrics.map(|addr| addr.socket_addr()),
            log_file: self.log_file.map(|path| (path, log_file_size)),
            watch: self.watch,
        })
    }
}

/// `dir` if it is a directory now (the workers enter it at each start, so it may change, or
/// vanish, later).
fn checked_directory(dir: PathBuf) -> Result<PathBuf, ConfigError> {
    let problem = match std::fs::metadata(&dir) {
        Ok(meta) if meta.is_dir() => return Ok(dir),
        Ok(_) => "not a directory".to_string(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => "no such directory".to_string(),
        Err(e) => e.to_string(),
    };
    Err(ConfigError::Chdir { dir, problem })
}

/// A --watch path must be there at start (a typo would watch nothing, silently).
fn checked_watch_path(path: &Path) -> Result<(), ConfigError> {
    let problem = match std::fs::metadata(path) {
        Ok(meta) if meta.is_dir() || meta.is_file() => return Ok(()),
        Ok(_) => "not a file or directory".to_string(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => "no such file or directory".into(),
        Err(e) => e.to_string(),
    };
    Err(ConfigError::Watch {
        path: path.to_path_buf(),
        problem,
    })
}

/// What Unicorn does: `pwd`, the directory as the shell reached it, when it is `here` (the
/// same device and inode) by another path, one through a symlink such as /srv/app/current.
/// Workers started there follow the link anew each time; `here`, which the kernel resolved
/// once, would keep them in the release it pointed to when cluster-lb started.
fn through_symlink(pwd: Option<&Path>, here: &Path) -> Option<PathBuf> {
    use std::os::unix::fs::MetadataExt;
    let pwd = pwd.filter(|pwd| pwd.is_absolute() && *pwd != here)?;
    let (seen, real) = (std::fs::metadata(pwd).ok()?, std::fs::metadata(here).ok()?);
    (seen.is_dir() && (seen.dev(), seen.ino()) == (real.dev(), real.ino()))
        .then(|| pwd.to_path_buf())
}

/// Turns a clap error into the one line we print: clap's own message without the usage block.
pub fn one_line_error(error: &clap::Error) -> String {
    let rendered = error.render().to_string();
    let message: Vec<&str> = rendered
        .lines()
        .map(str::trim)
        .take_while(|line| !line.starts_with("Usage:") && !line.starts_with("For more information"))
        .filter(|line| !line.is_empty() && !line.starts_with("tip:"))
        .collect();
    let text = message.join(" ");
    text.strip_prefix("error: ").unwrap_or(&text).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Config, String> {
        let cli = Cli::try_parse_from(args).map_err(|e| one_line_error(&e))?;
        let Command::Run(run) = cli.command else {
            return Err("not a run command".into());
        };
        run.into_options()
            .map(|options| options.supervisor)
            .map_err(|e| e.to_string())
    }

    #[test]
    fn unix_paths_are_listens_of_their_own() {
        let config = parse(&[
            "cluster-lb",
            "run",
            "-l",
            "unix:/run/app/app.sock",
            "-l",
            "8080",
            "--",
            "./server",
        ])
        .unwrap();
        assert_eq!(config.listen, ["8080".parse().unwrap()]);
        assert_eq!(config.listen_unix, [PathBuf::from("/run/app/app.sock")]);
        let relative = parse(&["cluster-lb", "run", "-l", "unix:app.sock", "--", "x"]);
        assert!(relative.unwrap_err().contains("must be absolute"));
        let twice = parse(&[
            "cluster-lb",
            "run",
            "-l",
            "unix:/a.sock",
            "-l",
            "unix:/a.sock",
            "--",
            "x",
        ]);
        assert!(twice.unwrap_err().contains("unix:/a.sock is given twice"));
    }

    #[test]
    fn full_command_line() {
        let config = parse(&[
            "cluster-lb",
            "run",
            "-w",
            "4",
            "-l",
            "127.0.0.1:8080",
            "--listen",
            "[::1]:8443",
            "-s",
            "hash",
            "--require-ebpf",
            "--",
            "node",
            "server.js",
            "--port",
            "1",
        ])
        .unwrap();
        assert_eq!(config.workers, 4);
        assert_eq!(config.listen.len(), 2);
        assert_eq!(config.strategy, Strategy::Hash);
        assert!(config.require_ebpf);
        assert_eq!(config.command, ["node", "server.js", "--port", "1"]);
    }

    #[test]
    fn workers_default_to_the_cpu_count() {
        let config = parse(&["cluster-lb", "run", "-l", "80", "--", "x"]).unwrap();
        let cpus = std::thread::available_parallelism().unwrap().get() as u32;
        assert_eq!(config.workers, cpus.min(MAX_WORKERS));
        assert_eq!(config.strategy, Strategy::RoundRobin);
    }

    fn options(args: &[&str]) -> RunOptions {
        let cli = Cli::try_parse_from(args).unwrap();
        let Command::Run(run) = cli.command else {
            panic!("not a run command");
        };
        run.into_options().unwrap()
    }

    #[test]
    fn the_name_gives_the_control_socket_unless_control_is_given() {
        let defaulted = options(&["cluster-lb", "run", "-l", "127.0.0.1:8080", "--", "x"]);
        assert_eq!(defaulted.name.as_str(), "127.0.0.1-8080");
        assert_eq!(
            defaulted.control,
            Some(ControlPath::Named(names::socket_path(&defaulted.name)))
        );
        let named = options(&["cluster-lb", "run", "--name", "api", "-l", "80", "--", "x"]);
        assert_eq!(named.name.as_str(), "api");
        assert!(named
            .control
            .is_some_and(|c| c.path().ends_with("api.sock")));
        let explicit = options(&[
            "cluster-lb",
            "run",
            "--name",
            "api",
            "--control",
            "/tmp/x.sock",
            "--",
            "x",
        ]);
        assert_eq!(explicit.name.as_str(), "api");
        assert_eq!(
            explicit.control,
            Some(ControlPath::Explicit("/tmp/x.sock".into()))
        );
    }

    #[test]
    fn client_commands_pick_a_cluster_by_name_or_path() {
        use crate::app::client::Target;
        let target = |args: &[&str]| match Cli::try_parse_from(args).map(|cli| cli.command) {
            Ok(Command::Stop { control }) => Ok(control.target()),
            Ok(other) => panic!("{other:?}"),
            Err(e) => Err(one_line_error(&e)),
        };
        assert_eq!(target(&["cluster-lb", "stop"]), Ok(Target::Unnamed));
        assert_eq!(
            target(&["cluster-lb", "stop", "--name", "a"]),
            Ok(Target::Name("a".parse().unwrap()))
        );
        assert_eq!(
            target(&["cluster-lb", "stop", "--control", "/tmp/a.sock"]),
            Ok(Target::Path("/tmp/a.sock".into()))
        );
        let both = target(&["cluster-lb", "stop", "--name", "a", "--control", "/x"]);
        assert!(both.unwrap_err().contains("cannot be used with"));
        let bad = target(&["cluster-lb", "stop", "--name", "../etc"]);
        assert!(bad.unwrap_err().contains("is not a cluster name"));
    }

    #[test]
    fn logs_takes_a_worker_follow_lines_and_json() {
        let logs = |args: &[&str]| match Cli::try_parse_from(args).map(|cli| cli.command) {
            Ok(Command::Logs {
                worker,
                follow,
                lines,
                json,
                control,
            }) => Ok((worker, follow, lines, json, control.target())),
            Ok(other) => panic!("{other:?}"),
            Err(e) => Err(one_line_error(&e)),
        };
        use crate::app::client::Target;
        assert_eq!(
            logs(&["cluster-lb", "logs"]).unwrap(),
            (None, false, 100, false, Target::Unnamed)
        );
        assert_eq!(
            logs(&[
                "cluster-lb",
                "logs",
                "-f",
                "-n",
                "5",
                "--worker",
                "2",
                "--json"
            ])
            .unwrap(),
            (Some(2), true, 5, true, Target::Unnamed)
        );
        let (_, follow, lines, _, target) = logs(&[
            "cluster-lb",
            "logs",
            "--follow",
            "--lines",
            "0",
            "--name",
            "api",
        ])
        .unwrap();
        assert_eq!((follow, lines), (true, 0));
        assert_eq!(target, Target::Name("api".parse().unwrap()));
        for bad in [
            &["cluster-lb", "logs", "-n", "-1"][..],
            &["cluster-lb", "logs", "-n", "many"],
            &["cluster-lb", "logs", "--worker", "x"],
        ] {
            let error = logs(bad).unwrap_err();
            assert!(!error.contains('\n'), "one line: {error}");
        }
        // The help states the ring's bounds as they are.
        let help = <Cli as clap::CommandFactory>::command()
            .find_subcommand_mut("logs")
            .map(|c| c.render_long_help().to_string())
            .unwrap_or_default();
        let help = help.split_whitespace().collect::<Vec<_>>().join(" ");
        let bounds = format!(
            "the last {} lines, at most {} MiB",
            crate::logging::ring::MOST_LINES,
            crate::logging::ring::MOST_BYTES / (1024 * 1024)
        );
        assert!(help.contains(&bounds), "{help}");
    }

    #[test]
    fn send_names_a_worker_or_all_and_takes_one_message() {
        use crate::supervisor::Recipients;
        let send = |args: &[&str]| match Cli::try_parse_from(args).map(|cli| cli.command) {
            Ok(Command::Send {
                to,
                message,
                control,
            }) => Ok((to.recipients(), message, control.target())),
            Ok(other) => panic!("{other:?}"),
            Err(e) => Err(one_line_error(&e)),
        };
        let (to, message, _) = send(&["cluster-lb", "send", "--worker", "2", "{}"]).unwrap();
        assert_eq!((to, message.as_str()), (Recipients::Worker(2), "{}"));
        let (to, _, target) = send(&["cluster-lb", "send", "--all", "--name", "api", "1"]).unwrap();
        assert_eq!(to, Recipients::All);
        assert_eq!(
            target,
            crate::app::client::Target::Name("api".parse().unwrap())
        );
        let neither = send(&["cluster-lb", "send", "{}"]).unwrap_err();
        assert!(
            neither.contains("--worker") && neither.contains("--all"),
            "{neither}"
        );
        let both = send(&["cluster-lb", "send", "--worker", "1", "--all", "{}"]).unwrap_err();
        assert!(both.contains("cannot be used with"), "{both}");
        let no_message = send(&["cluster-lb", "send", "--all"]).unwrap_err();
        assert!(no_message.contains("JSON"), "{no_message}");
        let bad_id = send(&["cluster-lb", "send", "--worker", "-1", "{}"]).unwrap_err();
        assert!(
            bad_id.contains("invalid value '-1' for '--worker"),
            "{bad_id}"
        );
    }

    /// A fresh directory holding `real/` and `link` -> `real`.
    fn linked_directory(tag: &str) -> (PathBuf, PathBuf, PathBuf) {
        let base = std::env::temp_dir().join(format!("clb-cli-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        std::fs::create_dir_all(base.join("real")).unwrap();
        std::os::unix::fs::symlink("real", base.join("link")).unwrap();
        let real = std::fs::canonicalize(base.join("real")).unwrap();
        (base.clone(), real, base.join("link"))
    }

    #[test]
    fn chdir_is_kept_as_given_and_must_be_a_directory_at_start() {
        let (base, _, link) = linked_directory("chdir");
        let link_text = link.display().to_string();
        let config = parse(&["cluster-lb", "run", "--chdir", &link_text, "--", "x"]).unwrap();
        // Not canonicalized: the link is followed again at every spawn.
        assert_eq!(config.cwd, Some(link.clone()));
        let file = base.join("file");
        std::fs::write(&file, b"").unwrap();
        let file_text = file.display().to_string();
        let missing = base.join("missing").display().to_string();
        for (dir, problem) in [
            (missing.as_str(), "no such directory"),
            (file_text.as_str(), "not a directory"),
        ] {
            let error = parse(&["cluster-lb", "run", "--chdir", dir, "--", "x"]).unwrap_err();
            assert_eq!(error, format!("--chdir {dir}: {problem}"));
        }
        let _ = std::fs::remove_dir_all(&base);
    }

    #[test]
    fn watch_takes_paths_that_exist_at_start() {
        let (base, real, link) = linked_directory("watch");
        let file = real.join("app.js");
        std::fs::write(&file, b"").unwrap();
        let (real_text, file_text, link_text) = (
            real.display().to_string(),
            file.display().to_string(),
            link.display().to_string(),
        );
        let watched = options(&[
            "cluster-lb",
            "run",
            "--watch",
            &real_text,
            "--watch",
            &file_text,
            "--watch",
            &link_text,
            "--",
            "x",
        ])
        .watch;
        assert_eq!(watched, [real, file, link]);
        assert!(options(&["cluster-lb", "run", "--", "x"]).watch.is_empty());
        let missing = base.join("missing").display().to_string();
        let error = parse(&["cluster-lb", "run", "--watch", &missing, "--", "x"]).unwrap_err();
        assert_eq!(
            error,
            format!("--watch {missing}: no such file or directory; give a file or directory that exists")
        );
        let _ = std::fs::remove_dir_all(&base);
    }

    #[test]
    fn pwd_is_the_workers_directory_only_when_it_reaches_this_one_through_a_symlink() {
        let (base, real, link) = linked_directory("pwd");
        assert_eq!(through_symlink(Some(&link), &real), Some(link.clone()));
        // The same path (no symlink), none, a relative one, another directory: no.
        assert_eq!(through_symlink(Some(&real), &real), None);
        assert_eq!(through_symlink(None, &real), None);
        assert_eq!(through_symlink(Some(Path::new("link")), &real), None);
        assert_eq!(through_symlink(Some(&base), &real), None);
        assert_eq!(through_symlink(Some(&base.join("gone")), &real), None);
        let _ = std::fs::remove_dir_all(&base);
    }

    #[test]
    fn errors_are_single_lines_that_name_the_problem() {
        let cases: [(&[&str], &str); 6] = [
            (
                &["cluster-lb", "run", "-l", "1.2.3:80", "--", "x"],
                "not an IP address",
            ),
            (
                &["cluster-lb", "run", "-l", "80", "-w", "0", "--", "x"],
                "0 is not in 1..=1024",
            ),
            (
                &["cluster-lb", "run", "-l", "80", "-s", "fast", "--", "x"],
                "unknown strategy",
            ),
            (
                &[
                    "cluster-lb",
                    "run",
                    "-l",
                    "80",
                    "--ready-delay",
                    "soon",
                    "--",
                    "x",
                ],
                "number of seconds",
            ),
            (&["cluster-lb", "run", "-l", "80"], "<CMD>"),
            (
                &[
                    "cluster-lb",
                    "run",
                    "-l",
                    "80",
                    "-l",
                    "0.0.0.0:80",
                    "--",
                    "x",
                ],
                "given twice",
            ),
        ];
        for (args, expected) in cases {
            let error = parse(args).unwrap_err();
            assert!(error.contains(expected), "{args:?}: {error}");
            assert!(!error.contains('\n'), "{args:?}: {error}");
        }
    }
}
