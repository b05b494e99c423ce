//! Test harness: each root test runs on a thread of its own inside a new network namespace, so
//! tests run in parallel on fixed ports without touching the host's; processes started from that
//! thread (cluster-lb and its workers) live in the same namespace.
//!
//! Without root a test prints that it was skipped; with CI=true skipping is a failure, so a
//! green CI never hides an untested path.

use std::{
    collections::BTreeMap,
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpStream},
    panic,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::{Arc, Mutex},
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

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
        eprintln!("SKIPPED {name}: needs root (network namespaces and eBPF)");
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
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    let path = target.join("debug").join(name);
    assert!(
        path.is_file(),
        "{} is missing: build it first with `cargo build --workspace --bins` (cargo xtask test does)",
        path.display()
    );
    path
}

pub fn example(relative: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../examples")
        .join(relative)
        .display()
        .to_string()
}

/// A running `cluster-lb run ...`, with its stderr collected line by line.
pub struct Cluster {
    child: Child,
    log: Arc<Mutex<Vec<String>>>,
}

impl Cluster {
    pub fn start(args: &[&str]) -> Cluster {
        Cluster::start_with(args, |_| {})
    }

    /// `cluster-lb run -w WORKERS --listen LISTEN -- SERVER...`, returned once every worker
    /// serves and is ready.
    pub fn serving(workers: usize, listen: &str, server: &[&str]) -> Cluster {
        let n = workers.to_string();
        let mut args = vec!["run", "-w", &n, "--listen", listen, "--"];
        args.extend_from_slice(server);
        let cluster = Cluster::start(&args);
        cluster.wait_serving(workers);
        cluster
    }

    /// Like `start`, with a chance to change the command (environment, capabilities).
    pub fn start_with(args: &[&str], adjust: impl FnOnce(&mut Command)) -> Cluster {
        let mut command = Command::new(workspace_binary("cluster-lb"));
        command.args(args);
        adjust(&mut command);
        Cluster::start_command(command)
    }

    /// Starts any primary (cluster-lb, or a program that embeds one) and collects its output.
    pub fn start_command(mut command: Command) -> Cluster {
        command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = command.spawn().expect("starting the primary");
        let log = Arc::new(Mutex::new(Vec::new()));
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
            let log = Arc::clone(&log);
            thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    eprintln!("  | {line}");
                    log.lock().expect("log lock").push(line);
                }
            });
        }
        Cluster { child, log }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log(&self) -> Vec<String> {
        self.log.lock().expect("log lock").clone()
    }

    /// Waits until a log line contains `needle`; returns that line.
    pub fn wait_for_log(&self, needle: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(line) = self.log().into_iter().find(|l| l.contains(needle)) {
                return line;
            }
            assert!(
                Instant::now() < deadline,
                "no log line with {needle:?} within {timeout:?}; log:\n{}",
                self.log().join("\n")
            );
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits until `count` workers announced they serve (each example prints "serving") and
    /// the primary counted as many ready (in the active set).
    pub fn wait_serving(&self, count: usize) {
        self.wait_count(" serving", count);
        self.wait_count(") ready (", count);
    }

    /// Waits until `needle` occurs `count` times in the log.
    pub fn wait_count(&self, needle: &str, count: usize) {
        let deadline = Instant::now() + Duration::from_secs(20);
        let seen = |log: Vec<String>| log.iter().map(|l| l.matches(needle).count()).sum::<usize>();
        while seen(self.log()) < count {
            assert!(
                Instant::now() < deadline,
                "fewer than {count} log lines with {needle:?} after 20s; log:\n{}",
                self.log().join("\n")
            );
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM, then waits for the exit (bounded).
    pub fn stop(mut self) -> (ExitStatus, Vec<String>) {
        signal(self.child.id(), nix::sys::signal::Signal::SIGTERM);
        let status = self.wait(Duration::from_secs(40));
        // Let the reader threads take the last lines.
        thread::sleep(Duration::from_millis(100));
        (status, self.log())
    }

    /// Waits for cluster-lb to exit by itself (bounded).
    pub fn wait(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("waiting for cluster-lb") {
                thread::sleep(Duration::from_millis(100));
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "cluster-lb did not exit within {timeout:?}; log:\n{}",
                self.log().join("\n")
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

/// One HTTP/1.0 request on a new connection (so every request is a new connection for the
/// balancer to place).
pub fn get(addr: SocketAddr) -> Result<Answer> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .with_context(|| format!("connecting to {addr}"))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    stream.write_all(b"GET / HTTP/1.0\r\nHost: test\r\n\r\n")?;
    let mut response = String::new();
    stream
        .read_to_string(&mut response)
        .context("reading the response")?;
    parse_answer(&response).with_context(|| format!("unexpected response: {response:?}"))
}

fn parse_answer(response: &str) -> Option<Answer> {
    let (head, body) = response.split_once("\r\n\r\n")?;
    if !head.starts_with("HTTP/1.") || !head.contains(" 200 ") {
        return None;
    }
    let fields: Vec<&str> = body.split_whitespace().collect();
    match fields.as_slice() {
        ["worker", worker, "pid", pid] => Some(Answer {
            worker: worker.parse().ok()?,
            pid: pid.parse().ok()?,
        }),
        _ => None,
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

/// The kernel counters cluster-lb logs for each worker when it stops:
/// worker id -> (selected, fallback, migrated).
pub fn logged_counters(log: &[String]) -> BTreeMap<u32, (u64, u64, u64)> {
    let mut counters = BTreeMap::new();
    for line in log {
        let Some(rest) = line.split(" worker ").nth(1) else {
            continue;
        };
        if !line.contains("selected=") {
            continue;
        }
        let id: u32 = match rest.split_whitespace().next().and_then(|s| s.parse().ok()) {
            Some(id) => id,
            None => continue,
        };
        let value = |key: &str| -> u64 {
            line.split(key)
                .nth(1)
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse().ok())
                .unwrap_or(u64::MAX)
        };
        counters.insert(
            id,
            (value("selected="), value("fallback="), value("migrated=")),
        );
    }
    counters
}

#[cfg(test)]
mod tests {
    use super::*;

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
    }

    #[test]
    fn counters_are_parsed_from_the_stop_log() {
        let log = vec![
            "cluster-lb[9]: 127.0.0.1:8080 worker 2 (pid 77): selected=100 fallback=1 migrated=0"
                .to_string(),
            "cluster-lb[9]: worker 2 started (pid 77, slot 2)".to_string(),
        ];
        let counters = logged_counters(&log);
        assert_eq!(counters.len(), 1);
        assert_eq!(counters[&2], (100, 1, 0));
    }
}
