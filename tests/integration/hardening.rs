//! Hardening: what a worker, a local user, or whatever reads (or stops reading) the primary's
//! output could do to the cluster, each played for real. Assertions read state: `status` over
//! the control socket, the primary's JSON events, /proc and the kernel's own answers. Tests
//! with several parts collect what is wrong in each and report it all at once, so one run
//! shows every broken part.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs::{self, File},
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpStream},
    os::{
        fd::AsRawFd,
        unix::{
            fs::{FileTypeExt, PermissionsExt},
            net::UnixListener,
            process::CommandExt,
        },
    },
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    thread,
    time::{Duration, Instant},
};

use cluster_lb::control::{request, Reply, Request};
use cluster_lb_tests::{
    addr, control_path, distribution, example, pid_of, root_test, signal, workspace_binary,
    Cluster, ClusterStatus, WorkerState, ADDR,
};
use nix::sys::signal::Signal;
use serde_json::Value;

fn hardening_worker(name: &str) -> String {
    format!("{}/workers/hardening/{name}", env!("CARGO_MANIFEST_DIR"))
}

/// Debian's interpreter, for every Python worker and helper: it starts at once, and nobody may
/// run it (a pyenv shim is a bash script whose helper processes would hold a worker's fds).
const PYTHON: &str = "/usr/bin/python3";

/// Readiness only by READY=1 (every Python worker here sends it once it serves), never by
/// --ready-delay: a worker counted ready before it serves would fail short client timeouts.
const READY_BY_NOTIFY: [&str; 2] = ["--ready-delay", "30"];

fn python_server() -> String {
    example("python/server.py")
}

/// Fails the test with every problem found, and the primary's output when there is one.
fn assert_no_problems(problems: &[String], output: &[String]) {
    assert!(
        problems.is_empty(),
        "{} problem(s):\n- {}\noutput:\n{}",
        problems.len(),
        problems.join("\n- "),
        output.join("\n")
    );
}

/// A directory under /tmp that everyone may read, removed on drop: copies of scripts there are
/// within reach of `--user nobody` workers (the checkout may be in root's home).
struct Scratch(PathBuf);

impl Scratch {
    fn new(tag: &str) -> Scratch {
        let dir = std::env::temp_dir().join(format!("clb-hardening-{}-{tag}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).expect("scratch dir");
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).expect("chmod scratch");
        Scratch(dir)
    }

    /// A world-readable copy of `source` in this directory; returns its path.
    fn copy(&self, source: &str) -> String {
        let name = Path::new(source).file_name().expect("a file name");
        let target = self.0.join(name);
        fs::copy(source, &target).unwrap_or_else(|e| panic!("copying {source}: {e}"));
        fs::set_permissions(&target, fs::Permissions::from_mode(0o644)).expect("chmod copy");
        target.display().to_string()
    }

    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }

    /// A path in a subdirectory that every user may write (a `--user nobody` worker's marker).
    fn writable_path(&self, name: &str) -> PathBuf {
        let dir = self.0.join("writable");
        fs::create_dir_all(&dir).expect("writable dir");
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o777)).expect("chmod writable dir");
        dir.join(name)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// Processes SIGKILLed on drop (when still there), so a failing test leaves nothing behind.
struct KillOnDrop(Vec<i32>);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        for &pid in &self.0 {
            if alive(pid) {
                let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), Signal::SIGKILL);
            }
        }
    }
}

/// A child process killed and reaped on drop.
struct ChildGuard(Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

// ---- /proc ----

/// The fields of /proc/PID/stat after the command name (state first).
fn stat_fields(pid: i32) -> Option<Vec<String>> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = stat.rsplit_once(')')?.1;
    Some(rest.split_whitespace().map(str::to_string).collect())
}

/// Whether `pid` exists and is not a zombie.
fn alive(pid: i32) -> bool {
    stat_fields(pid).is_some_and(|f| f.first().map(String::as_str) != Some("Z"))
}

/// User plus system CPU time of `pid`, in seconds.
fn cpu_seconds(pid: i32) -> f64 {
    let fields = stat_fields(pid).expect("stat of a running process");
    // utime and stime are fields 14 and 15 of stat; the state (field 3) is at index 0 here.
    let ticks: u64 =
        fields[11].parse::<u64>().expect("utime") + fields[12].parse::<u64>().expect("stime");
    let per_second = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100) as f64;
    ticks as f64 / per_second
}

fn fd_count(pid: i32) -> usize {
    fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// The children of `pid` (of all its threads).
fn children(pid: i32) -> Vec<i32> {
    let mut found = Vec::new();
    if let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) {
        for task in tasks.flatten() {
            if let Ok(list) = fs::read_to_string(task.path().join("children")) {
                found.extend(
                    list.split_whitespace()
                        .filter_map(|c| c.parse::<i32>().ok()),
                );
            }
        }
    }
    found
}

fn cmdline(pid: i32) -> Vec<String> {
    fs::read(format!("/proc/{pid}/cmdline"))
        .map(|raw| {
            raw.split(|&b| b == 0)
                .filter(|a| !a.is_empty())
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// Live processes in this thread's network namespace (each test has its own) whose command
/// line is exactly `command`.
fn processes_here(command: &[&str]) -> Vec<i32> {
    let own = fs::read_link("/proc/thread-self/ns/net").expect("own network namespace");
    let mut found = Vec::new();
    for entry in fs::read_dir("/proc").expect("/proc").flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<i32>().ok())
        else {
            continue;
        };
        if cmdline(pid) == command
            && fs::read_link(format!("/proc/{pid}/ns/net")).is_ok_and(|ns| ns == own)
            && alive(pid)
        {
            found.push(pid);
        }
    }
    found
}

/// One variable of a process's environment.
fn environ_var(pid: i32, name: &str) -> Option<String> {
    let raw = fs::read(format!("/proc/{pid}/environ")).ok()?;
    let prefix = format!("{name}=");
    raw.split(|&b| b == 0)
        .map(String::from_utf8_lossy)
        .find_map(|entry| entry.strip_prefix(&prefix).map(str::to_string))
}

// ---- the primary's state and output ----

/// A worker's output line, as the primary logs it in JSON mode.
#[derive(Debug, Clone)]
struct WorkerLine {
    pid: i64,
    stream: String,
    line: String,
}

fn worker_lines(lines: &[String]) -> Vec<WorkerLine> {
    lines
        .iter()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v.get("event").is_none())
        .filter_map(|v| {
            Some(WorkerLine {
                pid: v.get("pid")?.as_i64()?,
                stream: v.get("stream")?.as_str()?.to_string(),
                line: v.get("line")?.as_str()?.to_string(),
            })
        })
        .collect()
}

/// The first worker output line that starts with `prefix`, waiting up to `timeout`.
fn wait_for_worker_line(cluster: &Cluster, prefix: &str, timeout: Duration) -> Option<WorkerLine> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(found) = worker_lines(&cluster.lines())
            .into_iter()
            .find(|w| w.line.starts_with(prefix))
        {
            return Some(found);
        }
        if Instant::now() >= deadline {
            return None;
        }
        thread::sleep(Duration::from_millis(50));
    }
}

/// The first event named `name` that `matching` accepts, waiting up to `timeout`.
fn find_event(
    cluster: &Cluster,
    name: &str,
    timeout: Duration,
    matching: impl Fn(&Value) -> bool,
) -> Option<Value> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(event) = cluster.events_named(name).into_iter().find(&matching) {
            return Some(event);
        }
        if Instant::now() >= deadline {
            return None;
        }
        thread::sleep(Duration::from_millis(50));
    }
}

/// Waits until `check` holds for the status at `control`; an error when the primary `pid`
/// exits first or the time is up.
fn status_when(
    pid: i32,
    control: &Path,
    timeout: Duration,
    check: impl Fn(&ClusterStatus) -> bool,
) -> Result<ClusterStatus, String> {
    let deadline = Instant::now() + timeout;
    let mut last = None;
    loop {
        if let Ok(status) = cluster_lb_tests::fetch_status(control) {
            if check(&status) {
                return Ok(status);
            }
            last = Some(status);
        }
        if !alive(pid) {
            return Err("the primary exited".into());
        }
        if Instant::now() >= deadline {
            return Err(format!("not within {timeout:?}; last status: {last:?}"));
        }
        thread::sleep(Duration::from_millis(50));
    }
}

fn all_ready(count: usize) -> impl Fn(&ClusterStatus) -> bool {
    move |status| {
        status.workers.len() == count
            && status.workers.iter().all(|w| w.state == WorkerState::Ready)
    }
}

/// `cluster.wait_until_ready`, but an error (at once) when the primary exits.
fn ready_or_exit(
    cluster: &Cluster,
    count: usize,
    timeout: Duration,
) -> Result<ClusterStatus, String> {
    status_when(
        cluster.pid() as i32,
        cluster.control(),
        timeout,
        all_ready(count),
    )
    .map_err(|e| format!("{count} workers ready: {e}"))
}

// ---- clients ----

/// One HTTP/1.0 GET on a new connection, everything within `timeout`; the response.
fn http_get(addr: SocketAddr, path: &str, timeout: Duration) -> std::io::Result<String> {
    let mut stream = TcpStream::connect_timeout(&addr, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    stream.write_all(format!("GET {path} HTTP/1.0\r\nHost: test\r\n\r\n").as_bytes())?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    Ok(response)
}

/// An example server's answer ("worker ID pid PID") within `timeout`: (worker id, pid).
fn answer_within(addr: SocketAddr, timeout: Duration) -> Result<(u32, u32), String> {
    let response = http_get(addr, "/", timeout).map_err(|e| e.to_string())?;
    let body = response
        .split_once("\r\n\r\n")
        .filter(|(head, _)| head.contains(" 200 "))
        .map(|(_, body)| body)
        .ok_or_else(|| format!("unexpected response {response:?}"))?;
    match body.split_whitespace().collect::<Vec<_>>().as_slice() {
        ["worker", id, "pid", pid] => Ok((
            id.parse().map_err(|_| body.to_string())?,
            pid.parse().map_err(|_| body.to_string())?,
        )),
        _ => Err(format!("unexpected body {body:?}")),
    }
}

/// How `count` new connections were spread over worker ids, as sorted counts.
fn shares(count: usize) -> Vec<usize> {
    let mut counts: Vec<usize> = distribution(addr(), count).into_values().collect();
    counts.sort_unstable();
    counts
}

/// A `cluster-lb` run to its end (killed after `timeout`).
struct Finished {
    code: Option<i32>,
    stderr: Vec<String>,
    took: Duration,
    timed_out: bool,
}

fn run_to_end(args: &[&str], timeout: Duration) -> Finished {
    let started = Instant::now();
    let mut child = Command::new(workspace_binary("cluster-lb"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting cluster-lb");
    let stderr = child.stderr.take().expect("stderr");
    let reader = thread::spawn(move || {
        BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
            .collect::<Vec<_>>()
    });
    let mut timed_out = false;
    let status = loop {
        if let Some(status) = child.try_wait().expect("waiting for cluster-lb") {
            break status;
        }
        if started.elapsed() > timeout {
            timed_out = true;
            let _ = child.kill();
            break child.wait().expect("reaping cluster-lb");
        }
        thread::sleep(Duration::from_millis(20));
    };
    let took = started.elapsed();
    Finished {
        code: status.code(),
        stderr: reader.join().expect("stderr reader"),
        took,
        timed_out,
    }
}

/// The problem with a run that should have failed with one line containing every `needle`.
fn one_line_error_problem(args: &[&str], run: &Finished, needles: &[&str]) -> Option<String> {
    let what = format!("`cluster-lb {}`", args.join(" "));
    if run.timed_out {
        return Some(format!(
            "{what} was still running after {:?}; it printed {:?}",
            run.took, run.stderr
        ));
    }
    if run.code.is_none_or(|c| c == 0) {
        return Some(format!(
            "{what} exited {:?}; it printed {:?}",
            run.code, run.stderr
        ));
    }
    if run.stderr.len() != 1 {
        return Some(format!(
            "{what} printed {} lines, not one: {:?}",
            run.stderr.len(),
            run.stderr
        ));
    }
    let line = &run.stderr[0];
    if !line.starts_with("cluster-lb: error: ") || line.contains("panicked") {
        return Some(format!("{what}: {line:?}"));
    }
    let missing: Vec<&&str> = needles.iter().filter(|n| !line.contains(**n)).collect();
    if !missing.is_empty() {
        return Some(format!("{what}: {line:?} does not name {missing:?}"));
    }
    None
}

// ---- 1. descriptors and environment through the privilege drop ----

#[test]
fn a_user_worker_gets_only_its_own_descriptors_and_the_accounts_environment() {
    root_test("fd_leak_user", || {
        let script = "ls -l /proc/self/fd; id -u; echo IPC_FD=$CLUSTER_LB_IPC_FD; echo HOME=$HOME USER=$USER LOGNAME=$LOGNAME";
        let cluster = Cluster::start_with(
            &[
                "run", "-w", "1", "--user", "nobody", "--listen", ADDR, "--", "/bin/sh", "-c",
                script,
            ],
            |command| {
                command.current_dir("/");
                // SAFETY: open, dup2 and close are async-signal-safe; nothing is allocated.
                unsafe {
                    command.pre_exec(|| {
                        // /etc/shadow as fd 7 without close-on-exec: what a careless parent
                        // might leave open in cluster-lb.
                        let fd = libc::open(c"/etc/shadow".as_ptr(), libc::O_RDONLY);
                        if fd < 0 {
                            return Err(std::io::Error::last_os_error());
                        }
                        if fd != 7 {
                            if libc::dup2(fd, 7) < 0 {
                                return Err(std::io::Error::last_os_error());
                            }
                            libc::close(fd);
                        }
                        Ok(())
                    });
                }
            },
        );
        // The shell exits and is restarted; its first run's output is enough.
        let last = wait_for_worker_line(&cluster, "HOME=", Duration::from_secs(15))
            .unwrap_or_else(|| panic!("no worker output; output:\n{}", cluster.lines().join("\n")));
        let output: Vec<String> = worker_lines(&cluster.lines())
            .into_iter()
            .filter(|w| w.pid == last.pid && w.stream == "stdout")
            .map(|w| w.line)
            .collect();
        let stopped = cluster.stop();

        let mut problems = Vec::new();
        let mut fds = BTreeMap::new();
        for line in &output {
            if let Some((left, target)) = line.split_once(" -> ") {
                let fd: i32 = left
                    .split_whitespace()
                    .last()
                    .and_then(|f| f.parse().ok())
                    .unwrap_or_else(|| panic!("an ls -l line: {line}"));
                // The directory ls itself reads.
                if target.starts_with("/proc/") && target.ends_with("/fd") {
                    continue;
                }
                fds.insert(fd, target.to_string());
            }
        }
        if fds.keys().copied().collect::<Vec<_>>() != [0, 1, 2, 3, 4] {
            problems.push(format!(
                "the worker's descriptors are not exactly 0, 1, 2, its socket (3) and its channel (4): {fds:?}"
            ));
        }
        if fds.values().any(|t| t.contains("shadow")) {
            problems.push(format!("/etc/shadow reached the nobody worker: {fds:?}"));
        }
        if !fds.get(&3).is_some_and(|t| t.starts_with("socket:")) {
            problems.push(format!("fd 3 is not the listening socket: {fds:?}"));
        }
        if !output.iter().any(|l| l == "IPC_FD=4")
            || !fds.get(&4).is_some_and(|t| t.starts_with("socket:"))
        {
            problems.push(format!(
                "the channel is not fd 4 right after the socket: {output:?}"
            ));
        }
        if !output.iter().any(|l| l == "65534") {
            problems.push(format!("id -u did not say 65534: {output:?}"));
        }
        let nobody = nix::unistd::User::from_name("nobody")
            .expect("passwd")
            .expect("user nobody");
        let expected = format!("HOME={} USER=nobody LOGNAME=nobody", nobody.dir.display());
        if last.line != expected {
            problems.push(format!("environment {:?}, wanted {expected:?}", last.line));
        }
        assert_no_problems(&problems, &stopped.lines);
    });
}

// ---- 2. a worker replacing its group's program ----

#[test]
fn a_worker_cannot_replace_its_groups_program_and_a_replaced_one_is_restored() {
    root_test("cbpf_attach", || {
        let scratch = Scratch::new("cbpf");
        let worker = scratch.copy(&hardening_worker("attach_cbpf.py"));
        let server = scratch.copy(&python_server());
        let start = |extra: &[&str]| {
            let mut args = vec!["run", "-w", "4", "--user", "nobody", "--listen", ADDR];
            args.extend_from_slice(&READY_BY_NOTIFY);
            args.extend_from_slice(extra);
            args.extend_from_slice(&["--", PYTHON, &worker, &server]);
            Cluster::start_with(&args, |command| {
                command.current_dir("/");
            })
        };
        let mut problems = Vec::new();
        let mut output = Vec::new();

        // Under the seccomp filter (the default): the attach fails, balancing is intact.
        let cluster = start(&[]);
        match ready_or_exit(&cluster, 4, Duration::from_secs(30)) {
            Err(e) => problems.push(format!("default: {e}")),
            Ok(_) => {
                match wait_for_worker_line(&cluster, "attach-cbpf:", Duration::from_secs(5)) {
                    Some(w) if w.line == "attach-cbpf: errno 1 (EPERM)" => {}
                    other => problems.push(format!(
                        "default: the attach was not refused with EPERM: {other:?}"
                    )),
                }
                let seen = shares(400);
                if seen != [100; 4] {
                    problems.push(format!(
                        "default: 400 connections spread as {seen:?}, not 100 each"
                    ));
                }
                let strategy = cluster.status().strategy;
                if strategy != "round-robin" {
                    problems.push(format!("default: strategy {strategy}"));
                }
            }
        }
        output.extend(cluster.stop().lines);

        // With --no-seccomp the attach works, and the primary puts its program back.
        let cluster = start(&["--no-seccomp"]);
        match ready_or_exit(&cluster, 4, Duration::from_secs(30)) {
            Err(e) => problems.push(format!("--no-seccomp: {e}")),
            Ok(_) => {
                match wait_for_worker_line(&cluster, "attach-cbpf:", Duration::from_secs(5)) {
                    Some(w) if w.line == "attach-cbpf: ok" => {}
                    other => problems.push(format!(
                        "--no-seccomp: the attach did not succeed: {other:?}"
                    )),
                }
                // The worker attached before it was ready; within 10 s (the primary attaches
                // again every 5 s) eight connections go two to each worker again.
                let deadline = Instant::now() + Duration::from_secs(10);
                let restored = loop {
                    if shares(8) == [2; 4] {
                        break true;
                    }
                    if Instant::now() >= deadline {
                        break false;
                    }
                    thread::sleep(Duration::from_millis(250));
                };
                if !restored {
                    problems.push("--no-seccomp: round robin not restored within 10 s".into());
                } else {
                    let seen = shares(400);
                    if seen != [100; 4] {
                        problems.push(format!(
                            "--no-seccomp: 400 connections spread as {seen:?}, not 100 each"
                        ));
                    }
                }
            }
        }
        output.extend(cluster.stop().lines);
        assert_no_problems(&problems, &output);
    });
}

// ---- 3. what a worker may ask for over its channel ----

#[test]
fn query_server_refuses_low_ports_to_user_workers_and_bounds_the_groups() {
    root_test("query_server_bounds", || {
        let scratch = Scratch::new("queries");
        let worker = scratch.copy(&hardening_worker("ipc_queries.py"));
        scratch.copy(&example("python/cluster_lb_ipc.py"));
        let cluster = Cluster::start_with(
            &[
                "run",
                "-w",
                "2",
                "--user",
                "nobody",
                "--ready-timeout",
                "120",
                "--",
                PYTHON,
                &worker,
            ],
            |command| {
                command.current_dir("/");
            },
        );
        let mut problems = Vec::new();
        match wait_for_worker_line(&cluster, "query 127.0.0.1:80:", Duration::from_secs(20)) {
            Some(w) if w.line.starts_with("query 127.0.0.1:80: refused") => {}
            other => problems.push(format!(
                "port 80 was not refused to a nobody worker: {other:?}"
            )),
        }
        match wait_for_worker_line(&cluster, "queries:", Duration::from_secs(60)) {
            None => problems.push("the worker asking for 300 ports never finished".into()),
            Some(w) => {
                let numbers: Vec<usize> = w
                    .line
                    .split(|c: char| !c.is_ascii_digit())
                    .filter_map(|n| n.parse().ok())
                    .collect();
                match numbers.as_slice() {
                    [ok, refused, ..] if *ok <= 16 && ok + refused == 300 => {}
                    _ => problems.push(format!("300 queries: {}", w.line)),
                }
            }
        }
        if alive(cluster.pid() as i32) {
            let listen = cluster.status().listen;
            if listen.len() > 16 {
                problems.push(format!(
                    "{} groups exist (status.listen), more than 16",
                    listen.len()
                ));
            }
            // Bounded by the group cap: 16 groups of at most 13 descriptors each (the program's
            // maps and the program) plus the primary's own stay well under 300;
            // unbounded, 300 queries took it to 2429.
            let fds = fd_count(cluster.pid() as i32);
            if fds >= 300 {
                problems.push(format!("the primary has {fds} descriptors open"));
            }
        } else {
            problems.push("the primary exited".into());
        }
        let stopped = cluster.stop();
        assert_no_problems(&problems, &stopped.lines);
    });
}

// ---- 4. the control socket: its mode from the first instant, and who it obeys ----

#[test]
fn the_control_socket_is_private_from_birth_and_obeys_only_root_and_its_owner() {
    root_test("control_socket_private", || {
        let scratch = Scratch::new("control");
        let client = scratch.copy(&hardening_worker("control_client.py"));
        let mut problems = Vec::new();
        let mut output = Vec::new();
        for round in 0..10 {
            let path = scratch.path(&format!("c{round}.sock"));
            let stop = Arc::new(AtomicBool::new(false));
            let watcher = {
                let (path, stop) = (path.clone(), Arc::clone(&stop));
                thread::spawn(move || {
                    let mut modes = BTreeSet::new();
                    while !stop.load(Ordering::Relaxed) {
                        if let Ok(meta) = fs::symlink_metadata(&path) {
                            modes.insert(meta.permissions().mode() & 0o7777);
                        }
                    }
                    modes
                })
            };
            let control = path.display().to_string();
            let cluster = Cluster::start_with(
                &["run", "-w", "1", "--control", &control, "--", "sleep", "60"],
                |command| {
                    // SAFETY: umask is async-signal-safe.
                    unsafe {
                        command.pre_exec(|| {
                            libc::umask(0);
                            Ok(())
                        });
                    }
                },
            );
            let answered = status_when(
                cluster.pid() as i32,
                cluster.control(),
                Duration::from_secs(15),
                |_| true,
            );
            stop.store(true, Ordering::Relaxed);
            let modes = watcher.join().expect("watcher");
            if let Err(e) = answered {
                problems.push(format!("start {round}: no status: {e}"));
            }
            if modes.iter().any(|m| *m != 0o600) || modes.is_empty() {
                let seen: Vec<String> = modes.iter().map(|m| format!("{m:04o}")).collect();
                problems.push(format!(
                    "start {round} under umask 000: the socket was seen with modes {seen:?}"
                ));
            }
            output.extend(cluster.stop().lines);
        }

        // Another user who can reach the socket file is still refused.
        let mut cluster = Cluster::start(&["run", "-w", "1", "--", "sleep", "600"]);
        let before = status_when(
            cluster.pid() as i32,
            cluster.control(),
            Duration::from_secs(15),
            all_ready(1),
        )
        .expect("one worker ready");
        fs::set_permissions(cluster.control(), fs::Permissions::from_mode(0o666))
            .expect("chmod 0666");
        let reply = Command::new("setpriv")
            .args([
                "--reuid",
                "65534",
                "--regid",
                "65534",
                "--clear-groups",
                PYTHON,
                &client,
            ])
            .arg(cluster.control())
            .arg(r#"{"cmd":"stop"}"#)
            .current_dir("/")
            .output()
            .expect("running the client as nobody");
        let text = String::from_utf8_lossy(&reply.stdout).to_string();
        match serde_json::from_str::<Value>(text.trim()) {
            Ok(v) if v["reply"] == "refused" => {}
            _ => problems.push(format!(
                "nobody's stop got {text:?} (stderr {:?}), not a refusal",
                String::from_utf8_lossy(&reply.stderr)
            )),
        }
        thread::sleep(Duration::from_secs(1));
        match cluster_lb_tests::fetch_status(cluster.control()) {
            Ok(after) if alive(cluster.pid() as i32) && after.workers.len() == 1 => {
                if after.workers[0].pid != before.workers[0].pid {
                    problems.push("the worker was replaced after nobody's stop".into());
                }
            }
            other => problems.push(format!(
                "the cluster did not keep running after nobody's stop: {other:?}"
            )),
        }
        if alive(cluster.pid() as i32) {
            output.extend(cluster.stop().lines);
        } else {
            cluster.wait_exit(Duration::from_secs(5));
            output.extend(cluster.lines());
        }
        assert_no_problems(&problems, &output);
    });
}

// ---- 5. --control pointing at something that is not a socket ----

#[test]
fn a_control_path_that_is_a_regular_file_is_refused_and_kept() {
    root_test("control_regular_file", || {
        let scratch = Scratch::new("notasocket");
        let file = scratch.path("precious.txt");
        let content = "precious content\n";
        fs::write(&file, content).expect("writing the file");
        let path = file.display().to_string();
        // --user, so the only thing wrong is the path (root workers earn a warning line).
        let args = [
            "run",
            "-w",
            "1",
            "--user",
            "nobody",
            "--control",
            &path,
            "--",
            "sleep",
            "60",
        ];
        let run = run_to_end(&args, Duration::from_secs(5));
        let mut problems = Vec::new();
        if run.code != Some(1) {
            problems.push(format!(
                "exit {:?} (timed out: {}), not 1",
                run.code, run.timed_out
            ));
        }
        if let Some(p) = one_line_error_problem(&args, &run, &["not a socket"]) {
            problems.push(p);
        }
        match fs::read_to_string(&file) {
            Ok(now) if now == content => {}
            other => problems.push(format!("the file is gone or changed: {other:?}")),
        }
        if fs::symlink_metadata(&file).is_ok_and(|m| m.file_type().is_socket()) {
            problems.push("the file was replaced by a socket".into());
        }
        assert_no_problems(&problems, &run.stderr);
    });
}

// ---- 6. the workers' notify socket ----

#[test]
fn the_notify_socket_cannot_be_taken_first_nor_flooded() {
    root_test("notify_socket", || {
        let server = python_server();
        let start = || {
            Cluster::start(&[
                "run",
                "-w",
                "2",
                READY_BY_NOTIFY[0],
                READY_BY_NOTIFY[1],
                "--listen",
                ADDR,
                "--",
                PYTHON,
                &server,
            ])
        };
        let mut problems = Vec::new();
        let mut output = Vec::new();

        // (a) Someone took @cluster-lb/PID/notify for the next 1000 pids first.
        let mut holder = ChildGuard(
            Command::new(PYTHON)
                .args([&hardening_worker("prebind_notify.py"), "1000"])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .spawn()
                .expect("starting the squatter"),
        );
        let mut line = String::new();
        BufReader::new(holder.0.stdout.as_mut().expect("stdout"))
            .read_line(&mut line)
            .expect("the squatter's report");
        let words: Vec<&str> = line.split_whitespace().collect();
        let (first, last): (u32, u32) = match words.as_slice() {
            ["bound", _, first, last] => {
                (first.parse().expect("first"), last.parse().expect("last"))
            }
            _ => panic!("squatter: {line:?}"),
        };
        let mut cluster = start();
        let pid = cluster.pid();
        assert!(
            (first..=last).contains(&pid),
            "precondition: cluster-lb got pid {pid}, outside the names taken ({first}..={last})"
        );
        if let Err(e) = ready_or_exit(&cluster, 2, Duration::from_secs(30)) {
            problems.push(format!("with the names taken: {e}"));
            output.extend(cluster.lines());
            drop(holder);
            drop(cluster);
            cluster = start();
            ready_or_exit(&cluster, 2, Duration::from_secs(30)).expect("a cluster for part (b)");
        } else {
            drop(holder);
            if let Err(e) = answer_within(addr(), Duration::from_secs(5)) {
                problems.push(format!("with the names taken, no answer: {e}"));
            }
        }

        // (b) A process that is not a worker floods the workers' notify socket.
        let primary = cluster.pid() as i32;
        let worker = cluster.status().workers[0].pid;
        let notify = environ_var(worker, "NOTIFY_SOCKET").expect("NOTIFY_SOCKET of a worker");
        let cpu_before = cpu_seconds(primary);
        let started = Instant::now();
        let mut flood = ChildGuard(
            Command::new(PYTHON)
                .args([&hardening_worker("notify_flood.py"), &notify, "3"])
                .spawn()
                .expect("starting the flood"),
        );
        let mut slowest = Duration::ZERO;
        let mut asked = 0;
        let mut failed = Vec::new();
        let flood_status = loop {
            if let Some(status) = flood.0.try_wait().expect("waiting for the flood") {
                break status;
            }
            let asking = Instant::now();
            if let Err(e) = cluster_lb_tests::fetch_status(cluster.control()) {
                failed.push(e.to_string());
            }
            slowest = slowest.max(asking.elapsed());
            asked += 1;
            thread::sleep(Duration::from_millis(100));
        };
        let wall = started.elapsed();
        let cpu = cpu_seconds(primary) - cpu_before;
        eprintln!(
            "flood: {wall:?} wall, primary {cpu:.2} s CPU, {asked} status requests, slowest {slowest:?}"
        );
        assert!(flood_status.success(), "the flood failed: {flood_status}");
        if !failed.is_empty() || slowest > Duration::from_secs(1) {
            problems.push(format!(
                "during the flood status took up to {slowest:?} ({} of {asked} failed: {failed:?})",
                failed.len()
            ));
        }
        if cpu >= wall.as_secs_f64() / 2.0 {
            problems.push(format!(
                "the primary used {cpu:.2} s of CPU during a {:.2} s flood",
                wall.as_secs_f64()
            ));
        }
        output.extend(cluster.stop().lines);
        assert_no_problems(&problems, &output);
    });
}

// ---- 7. worker output cannot forge the primary's text lines ----

#[test]
fn worker_output_in_text_mode_has_its_control_characters_escaped() {
    root_test("text_output_escaped", || {
        let cluster = Cluster::start(&[
            "run",
            "-w",
            "1",
            "--log-format",
            "text",
            READY_BY_NOTIFY[0],
            READY_BY_NOTIFY[1],
            "--listen",
            ADDR,
            "--",
            PYTHON,
            &hardening_worker("forge_output.py"),
        ]);
        let line = cluster.wait_for_line("FAKE cluster-lb[1]", Duration::from_secs(15));
        let stopped = cluster.stop();
        assert!(
            !line.contains('\u{1b}') && !line.contains('\r'),
            "raw ESC or CR reached the primary's output: {line:?}"
        );
        assert!(
            line.contains("\\x1b[2K\\x0dFAKE cluster-lb[1]: worker 9 ready"),
            "not escaped as \\x1b and \\x0d: {line:?}; output:\n{}",
            stopped.lines.join("\n")
        );
    });
}

// ---- 8. accept errors do not end the metrics and control servers ----

#[test]
fn the_metrics_and_control_servers_survive_running_out_of_descriptors() {
    root_test("accept_emfile", || {
        let metrics: SocketAddr = "127.0.0.1:9100".parse().expect("metrics address");
        let server = python_server();
        let cluster = Cluster::start_with(
            &[
                "run",
                "-w",
                "1",
                "--metrics",
                "127.0.0.1:9100",
                READY_BY_NOTIFY[0],
                READY_BY_NOTIFY[1],
                "--listen",
                ADDR,
                "--",
                PYTHON,
                &server,
            ],
            |command| {
                // SAFETY: setrlimit is async-signal-safe.
                unsafe {
                    command.pre_exec(|| {
                        let limit = libc::rlimit {
                            rlim_cur: 256,
                            rlim_max: 256,
                        };
                        if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                            return Err(std::io::Error::last_os_error());
                        }
                        Ok(())
                    });
                }
            },
        );
        cluster.wait_until_ready(1);
        let first = http_get(metrics, "/metrics", Duration::from_secs(5)).expect("metrics before");
        assert!(
            first.starts_with("HTTP/1.") && first.contains(" 200 "),
            "{first}"
        );

        // 300 idle connections: more than the primary has descriptors for.
        let idle: Vec<TcpStream> = (0..300)
            .filter_map(|_| TcpStream::connect_timeout(&metrics, Duration::from_secs(2)).ok())
            .collect();
        thread::sleep(Duration::from_secs(2));
        let opened = idle.len();
        drop(idle);
        thread::sleep(Duration::from_millis(500));

        let mut problems = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(5);
        let last = loop {
            let answer = http_get(metrics, "/metrics", Duration::from_secs(2));
            match &answer {
                Ok(r) if r.contains(" 200 ") => break answer,
                _ if Instant::now() >= deadline => break answer,
                _ => thread::sleep(Duration::from_millis(200)),
            }
        };
        match last {
            Ok(r) if r.contains(" 200 ") => {}
            other => problems.push(format!(
                "after {opened} idle connections closed, GET /metrics: {:?}",
                other.map(|r| r.lines().next().unwrap_or("").to_string())
            )),
        }
        if let Err(e) = cluster_lb_tests::fetch_status(cluster.control()) {
            problems.push(format!("status after the idle connections: {e}"));
        }
        let stopped = cluster.stop();
        assert_no_problems(&problems, &stopped.lines);
    });
}

/// Keeps `count` connections open against a server, opening a new one every millisecond and
/// dropping the oldest, until `stop` is set: an idle flood that renews itself, as an attacker's
/// would. Returns how many connections it opened.
fn idle_flood<S>(count: usize, stop: Arc<AtomicBool>, connect: impl Fn() -> Option<S>) -> usize {
    let mut held = std::collections::VecDeque::with_capacity(count);
    let mut opened = 0;
    while !stop.load(Ordering::Relaxed) {
        if let Some(stream) = connect() {
            opened += 1;
            held.push_back(stream);
        }
        if held.len() > count {
            held.pop_front();
        }
        thread::sleep(Duration::from_millis(1));
    }
    opened
}

#[test]
fn metrics_and_status_answer_within_a_second_under_an_idle_flood_of_1000_connections() {
    root_test("idle_flood", || {
        // Room for both floods in this process.
        nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE, 8192, 8192)
            .expect("raise RLIMIT_NOFILE");
        let metrics: SocketAddr = "127.0.0.1:9100".parse().expect("metrics address");
        let server = python_server();
        let cluster = Cluster::start(&[
            "run",
            "-w",
            "1",
            "--metrics",
            "127.0.0.1:9100",
            READY_BY_NOTIFY[0],
            READY_BY_NOTIFY[1],
            "--listen",
            ADDR,
            "--",
            PYTHON,
            &server,
        ]);
        cluster.wait_until_ready(1);
        let stop = Arc::new(AtomicBool::new(false));
        let tcp = {
            let stop = Arc::clone(&stop);
            thread::spawn(move || {
                idle_flood(1000, stop, || {
                    TcpStream::connect_timeout(&metrics, Duration::from_secs(1)).ok()
                })
            })
        };
        let unix = {
            let stop = Arc::clone(&stop);
            let path = cluster.control().to_path_buf();
            thread::spawn(move || {
                idle_flood(1000, stop, || {
                    std::os::unix::net::UnixStream::connect(&path).ok()
                })
            })
        };
        // Let both floods reach 1,000 held connections and keep renewing them.
        thread::sleep(Duration::from_secs(3));

        let mut problems = Vec::new();
        let (mut slowest_scrape, mut slowest_status) = (Duration::ZERO, Duration::ZERO);
        for round in 0..10 {
            let started = Instant::now();
            match http_get(metrics, "/metrics", Duration::from_secs(1)) {
                Ok(r) if r.contains(" 200 ") && r.contains("cluster_lb_") => {}
                other => problems.push(format!("scrape {round}: {other:?}")),
            }
            slowest_scrape = slowest_scrape.max(started.elapsed());
            let started = Instant::now();
            match request(cluster.control(), &Request::Status, Duration::from_secs(1)) {
                Ok(Reply::Status { .. }) => {}
                other => problems.push(format!("status {round}: {other:?}")),
            }
            slowest_status = slowest_status.max(started.elapsed());
            thread::sleep(Duration::from_millis(200));
        }
        stop.store(true, Ordering::Relaxed);
        let opened = (
            tcp.join().expect("tcp flood"),
            unix.join().expect("unix flood"),
        );
        println!(
            "idle flood: {} TCP and {} control connections opened; slowest scrape {slowest_scrape:?}, slowest status {slowest_status:?}",
            opened.0, opened.1
        );
        for (what, slowest) in [("scrape", slowest_scrape), ("status", slowest_status)] {
            if slowest >= Duration::from_secs(1) {
                problems.push(format!("the slowest {what} took {slowest:?}"));
            }
        }
        assert!(
            opened.0 >= 1000 && opened.1 >= 1000,
            "the floods held 1,000: {opened:?}"
        );
        let stopped = cluster.stop();
        assert_no_problems(&problems, &stopped.lines);
    });
}

// ---- 9. a reader that stops reading does not stop supervision ----

#[test]
fn stalled_output_never_stops_supervision_and_the_loss_is_counted() {
    root_test("stalled_output", || {
        let (read_end, write_end) = nix::unistd::pipe().expect("pipe");
        let control = control_path();
        let grace = 5;
        let mut command = Command::new(workspace_binary("cluster-lb"));
        command
            .args([
                "run",
                "-w",
                "3",
                "--grace",
                &grace.to_string(),
                "--log-format",
                "json",
                "--control",
            ])
            .arg(&control)
            .args(READY_BY_NOTIFY)
            .args([
                "--listen",
                ADDR,
                "--",
                PYTHON,
                &hardening_worker("noisy.py"),
                &python_server(),
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::from(write_end.try_clone().expect("dup")))
            .stderr(Stdio::from(write_end));
        let mut primary = ChildGuard(command.spawn().expect("starting cluster-lb"));
        drop(command); // our copies of the write end
        let pid = primary.0.id() as i32;
        let mut problems = Vec::new();

        // Nobody reads: the pipe fills at once (worker 0 prints 1 MB lines).
        let ready = status_when(pid, &control, Duration::from_secs(30), all_ready(3));
        match ready {
            Err(e) => problems.push(format!("3 workers ready while output is stalled: {e}")),
            Ok(status) => {
                thread::sleep(Duration::from_secs(3));
                let victim = pid_of(&status, 1);
                signal(victim as u32, Signal::SIGKILL);
                let replaced = status_when(pid, &control, Duration::from_secs(10), |s| {
                    all_ready(3)(s) && s.workers.iter().any(|w| w.id == 1 && w.pid != victim)
                });
                if let Err(e) = replaced {
                    problems.push(format!(
                        "SIGKILLed worker 1 not replaced and ready within 10 s while output is stalled: {e}"
                    ));
                }
            }
        }

        // Read for a while: one line says how many lines were dropped.
        let reader = thread::spawn(move || {
            let mut file = File::from(read_end);
            let mut chunk = vec![0u8; 1 << 16];
            let mut partial = Vec::new();
            let deadline = Instant::now() + Duration::from_secs(15);
            let mut found = None;
            while found.is_none() && Instant::now() < deadline {
                let mut poll = libc::pollfd {
                    fd: file.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                };
                // SAFETY: one valid pollfd.
                if unsafe { libc::poll(&mut poll, 1, 500) } <= 0 {
                    continue;
                }
                let read = match file.read(&mut chunk) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                partial.extend_from_slice(&chunk[..read]);
                let mut start = 0;
                while let Some(offset) = partial[start..].iter().position(|&b| b == b'\n') {
                    let line = &partial[start..start + offset];
                    if line.windows(9).any(|w| w == b"\"dropped\"") {
                        found = serde_json::from_slice::<Value>(line).ok();
                    }
                    start += offset + 1;
                }
                partial.drain(..start);
            }
            (file, found)
        });
        let (unread, dropped) = reader.join().expect("reader");
        match dropped.as_ref().and_then(|v| v["dropped"].as_u64()) {
            Some(n) if n > 0 => {}
            _ => problems.push(format!(
                "no line with a count of dropped lines: {dropped:?}"
            )),
        }

        // Stalled again: TERM still stops the cluster within --grace.
        thread::sleep(Duration::from_secs(1));
        if alive(pid) {
            signal(pid as u32, Signal::SIGTERM);
            let asked = Instant::now();
            let exited = loop {
                if primary.0.try_wait().expect("waiting").is_some() {
                    break true;
                }
                if asked.elapsed() > Duration::from_secs(grace) + Duration::from_millis(500) {
                    break false;
                }
                thread::sleep(Duration::from_millis(20));
            };
            if !exited {
                problems.push(format!("SIGTERM did not end the primary within --grace {grace} s while output is stalled"));
            }
        } else {
            problems.push("the primary died".into());
        }
        drop(unread);
        assert_no_problems(&problems, &[]);
    });
}

// ---- 10. reload and scale-down escalate to SIGKILL after --grace ----

#[test]
fn reloads_and_scale_down_kill_workers_that_ignore_term_after_grace() {
    root_test("reload_escalates", || {
        let cluster = Cluster::start(&[
            "run",
            "-w",
            "2",
            "--grace",
            "1",
            "--ready-delay",
            "30",
            "--ready-timeout",
            "60",
            "--listen",
            ADDR,
            "--",
            PYTHON,
            &hardening_worker("ignores_term.py"),
        ]);
        cluster.wait_until_ready(2);
        let primary = cluster.pid() as i32;
        let settled = |wanted: usize| {
            move |s: &ClusterStatus| {
                s.workers.len() == wanted
                    && s.workers.iter().all(|w| w.state == WorkerState::Ready)
                    && children(primary).len() == wanted
            }
        };
        let mut problems = Vec::new();
        for round in 1..=5 {
            match request(cluster.control(), &Request::Reload, Duration::from_secs(60)) {
                Ok(Reply::Reloaded { .. }) => {}
                other => problems.push(format!("reload {round}: {other:?}")),
            }
            if let Err(e) = status_when(
                primary,
                cluster.control(),
                Duration::from_secs(3),
                settled(2),
            ) {
                let states: Vec<String> = cluster
                    .status()
                    .workers
                    .iter()
                    .map(|w| format!("{} {} {:?}", w.id, w.pid, w.state))
                    .collect();
                problems.push(format!(
                    "3 s after reload {round}: not 2 ready workers and 2 processes ({e}); workers {states:?}, {} processes",
                    children(primary).len()
                ));
            }
        }
        match request(
            cluster.control(),
            &Request::Scale { workers: 1 },
            Duration::from_secs(10),
        ) {
            Ok(Reply::Scaling { .. }) => {}
            other => problems.push(format!("scale 1: {other:?}")),
        }
        if let Err(e) = status_when(
            primary,
            cluster.control(),
            Duration::from_secs(3),
            settled(1),
        ) {
            problems.push(format!(
                "3 s after scale 1: not 1 ready worker and 1 process ({e}); {} processes",
                children(primary).len()
            ));
        }
        let kills: Vec<Value> = cluster
            .events_named("kill")
            .into_iter()
            .filter(|k| {
                k["reason"]
                    .as_str()
                    .is_some_and(|r| r.contains("grace period"))
            })
            .collect();
        if kills.len() < 11 {
            problems.push(format!(
                "{} kills for the grace period, not 11 (5 reloads of 2 workers and one scale-down)",
                kills.len()
            ));
        }
        let stopped = cluster.stop();
        assert_no_problems(&problems, &stopped.lines);
    });
}

// ---- 11. what a worker leaves behind holding its socket ----

/// Kills processes of this test's network namespace with this command line, on drop.
struct KillLeftovers(&'static [&'static str]);

impl Drop for KillLeftovers {
    fn drop(&mut self) {
        for pid in processes_here(self.0) {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), Signal::SIGKILL);
        }
    }
}

#[test]
fn orphans_holding_a_gone_workers_socket_are_stopped() {
    root_test("orphans_holding_sockets", || {
        const SLEEP: &[&str] = &["sleep", "3600"];
        let _leftovers = KillLeftovers(SLEEP);
        let server = python_server();
        let script = format!("(setsid sleep 3600 &); exec {PYTHON} {server}");
        let args = [
            "run",
            "-w",
            "2",
            "--strategy",
            "kernel",
            READY_BY_NOTIFY[0],
            READY_BY_NOTIFY[1],
            "--listen",
            ADDR,
            "--",
            "sh",
            "-c",
            &script,
        ];
        let cluster = Cluster::start(&args);
        let status = cluster.wait_until_ready(2);
        let deadline = Instant::now() + Duration::from_secs(5);
        while processes_here(SLEEP).len() < 2 {
            assert!(Instant::now() < deadline, "precondition: two setsid sleeps");
            thread::sleep(Duration::from_millis(50));
        }
        let mut problems = Vec::new();
        let victim = status.workers[0].pid;
        signal(victim as u32, Signal::SIGKILL);
        if find_event(&cluster, "orphan", Duration::from_secs(5), |e| {
            e["held_socket"] == true
        })
        .is_none()
        {
            problems
                .push("no orphan event with held_socket true after the worker was killed".into());
        }
        if let Err(e) = ready_or_exit(&cluster, 2, Duration::from_secs(15)) {
            problems.push(format!("after the kill: {e}"));
        }
        let failures: Vec<String> = (0..100)
            .filter_map(|i| {
                answer_within(addr(), Duration::from_secs(2))
                    .err()
                    .map(|e| format!("request {i}: {e}"))
            })
            .collect();
        if !failures.is_empty() {
            problems.push(format!(
                "{} of 100 requests failed: {:?}",
                failures.len(),
                &failures[..failures.len().min(5)]
            ));
        }
        let mut output = cluster.stop().lines;
        thread::sleep(Duration::from_millis(300));
        let left = processes_here(SLEEP);
        if !left.is_empty() {
            problems.push(format!(
                "sleep 3600 left behind after the stop: pids {left:?}"
            ));
        }
        // The same cluster again, on the same port.
        let again = Cluster::start(&args);
        match ready_or_exit(&again, 2, Duration::from_secs(30)) {
            Err(e) => problems.push(format!("a new cluster on the same port: {e}")),
            Ok(_) => {
                let failures: Vec<String> = (0..50)
                    .filter_map(|i| {
                        answer_within(addr(), Duration::from_secs(2))
                            .err()
                            .map(|e| format!("request {i}: {e}"))
                    })
                    .collect();
                if !failures.is_empty() {
                    problems.push(format!(
                        "a new cluster on the same port: {} of 50 requests failed: {failures:?}",
                        failures.len()
                    ));
                }
            }
        }
        output.extend(again.stop().lines);
        assert_no_problems(&problems, &output);
    });
}

// ---- 12. --user workers when the primary is SIGKILLed ----

#[test]
fn user_workers_die_with_a_sigkilled_primary() {
    root_test("user_workers_pdeathsig", || {
        let scratch = Scratch::new("pdeathsig");
        let server = scratch.copy(&python_server());
        let args = [
            "run",
            "-w",
            "2",
            "--user",
            "nobody",
            READY_BY_NOTIFY[0],
            READY_BY_NOTIFY[1],
            "--listen",
            ADDR,
            "--",
            PYTHON,
            &server,
        ];
        let start = || {
            Cluster::start_with(&args, |command| {
                command.current_dir("/");
            })
        };
        let mut cluster = start();
        let status = cluster.wait_until_ready(2);
        let workers: Vec<i32> = status.workers.iter().map(|w| w.pid).collect();
        let _cleanup = KillOnDrop(workers.clone());
        signal(cluster.pid(), Signal::SIGKILL);
        cluster.wait_exit(Duration::from_secs(5));
        let killed = Instant::now();
        let mut problems = Vec::new();
        while workers.iter().any(|&pid| alive(pid)) && killed.elapsed() < Duration::from_secs(3) {
            thread::sleep(Duration::from_millis(50));
        }
        let left: Vec<i32> = workers.iter().copied().filter(|&pid| alive(pid)).collect();
        if !left.is_empty() {
            problems.push(format!(
                "workers {left:?} still run 3 s after the primary was SIGKILLed"
            ));
        }
        let mut output = cluster.lines();
        let again = start();
        match ready_or_exit(&again, 2, Duration::from_secs(30)) {
            Err(e) => problems.push(format!("a new cluster on the same port: {e}")),
            Ok(status) => {
                let new: Vec<u32> = status.workers.iter().map(|w| w.pid as u32).collect();
                for i in 0..20 {
                    match answer_within(addr(), Duration::from_secs(2)) {
                        Ok((_, pid)) if new.contains(&pid) => {}
                        other => {
                            problems.push(format!(
                                "a new cluster on the same port, request {i}: {other:?}"
                            ));
                            break;
                        }
                    }
                }
            }
        }
        output.extend(again.stop().lines);
        assert_no_problems(&problems, &output);
    });
}

// ---- 13. a worker that closes its listening socket ----

#[test]
fn a_worker_that_closes_its_listening_socket_is_replaced_or_reported() {
    root_test("closed_listener", || {
        let scratch = Scratch::new("closed");
        let server = python_server();
        let closer = hardening_worker("closes_listener.py");
        let start = |marker: &Path, extra: &[&str]| {
            let _ = fs::remove_file(marker);
            let marker = marker.display().to_string();
            let mut args = vec!["run", "-w", "4", "--listen", ADDR];
            args.extend_from_slice(&READY_BY_NOTIFY);
            args.extend_from_slice(extra);
            args.extend_from_slice(&["--", PYTHON, &closer, &server, &marker]);
            Cluster::start(&args)
        };
        let mut problems = Vec::new();
        let mut output = Vec::new();

        // Default: drained and replaced.
        let cluster = start(&scratch.path("restart"), &[]);
        match ready_or_exit(&cluster, 4, Duration::from_secs(30)) {
            Err(e) => problems.push(format!("restart: {e}")),
            Ok(first) => {
                let closer_pid = pid_of(&first, 0);
                let disconnect = find_event(&cluster, "disconnect", Duration::from_secs(15), |e| {
                    e["pid"] == closer_pid
                });
                match &disconnect {
                    Some(e)
                        if e["failure"] == true
                            && e["reason"].as_str().is_some_and(|r| r.contains("listening socket")) => {}
                    other => problems.push(format!(
                        "restart: no failure disconnect naming the listening socket for pid {closer_pid} within 15 s: {other:?}"
                    )),
                }
                let original: Vec<i32> = first.workers.iter().map(|w| w.pid).collect();
                let replaced = status_when(
                    cluster.pid() as i32,
                    cluster.control(),
                    Duration::from_secs(15),
                    |s| all_ready(4)(s) && s.workers.iter().all(|w| w.pid != closer_pid),
                );
                match replaced {
                    Err(e) => problems.push(format!("restart: worker 0 not replaced: {e}")),
                    Ok(_) => {
                        let seen = shares(400);
                        if seen != [100; 4] {
                            problems.push(format!("restart: 400 connections spread as {seen:?}"));
                        }
                        let status = cluster.status();
                        for w in status.workers.iter().filter(|w| !original.contains(&w.pid)) {
                            if w.fallback != 0 || w.selected == 0 {
                                problems.push(format!(
                                    "restart: new worker {} (pid {}) has {} selected, {} fallbacks",
                                    w.id, w.pid, w.selected, w.fallback
                                ));
                            }
                        }
                    }
                }
            }
        }
        output.extend(cluster.stop().lines);

        // --on-closed-listener report: reported, left running.
        let cluster = start(&scratch.path("report"), &["--on-closed-listener", "report"]);
        match ready_or_exit(&cluster, 4, Duration::from_secs(30)) {
            Err(e) => problems.push(format!("report: {e}")),
            Ok(first) => {
                let closer_pid = pid_of(&first, 0);
                if find_event(&cluster, "listener-closed", Duration::from_secs(15), |e| {
                    e["pid"] == closer_pid
                })
                .is_none()
                {
                    problems.push(format!(
                        "report: no listener-closed event for pid {closer_pid} within 15 s"
                    ));
                }
                thread::sleep(Duration::from_millis(500));
                if cluster
                    .events_named("disconnect")
                    .iter()
                    .any(|e| e["pid"] == closer_pid)
                {
                    problems.push("report: the worker was disconnected anyway".into());
                }
                let status = cluster.status();
                if !alive(closer_pid) || !status.workers.iter().any(|w| w.pid == closer_pid) {
                    problems.push(format!(
                        "report: the worker (pid {closer_pid}) does not run any more"
                    ));
                }
            }
        }
        output.extend(cluster.stop().lines);
        assert_no_problems(&problems, &output);
    });
}

// ---- 14. bad input: one line each ----

#[test]
fn bad_input_gets_one_line_that_names_the_problem() {
    root_test("input_errors", || {
        let scratch = Scratch::new("silent");
        let silent_path = scratch.path("silent.sock");
        // Listens, never accepts, never answers.
        let _silent = UnixListener::bind(&silent_path).expect("a silent socket");
        let silent = silent_path.display().to_string();
        let status_run = {
            let silent = silent.clone();
            thread::spawn(move || {
                run_to_end(&["status", "--control", &silent], Duration::from_secs(20))
            })
        };
        let mut problems = Vec::new();
        let cases: [(&[&str], &[&str]); 4] = [
            (
                &["run", "--ready-timeout", "0", "--", "true"],
                &["--ready-timeout"],
            ),
            (&["run", "--grace", "-1", "--", "true"], &["--grace", "-1"]),
            (
                &["run", "--ready-delay", "-1", "--", "true"],
                &["--ready-delay", "-1"],
            ),
            (
                &["run", "--listen", ADDR, "--metrics", ADDR, "--", "true"],
                &["--metrics", "--listen"],
            ),
        ];
        for (args, needles) in cases {
            let run = run_to_end(args, Duration::from_secs(10));
            problems.extend(one_line_error_problem(args, &run, needles));
        }
        // No arguments at all: an error line, not the program's description.
        let help = Command::new(workspace_binary("cluster-lb"))
            .arg("--help")
            .output()
            .expect("cluster-lb --help");
        let about = String::from_utf8_lossy(&help.stdout)
            .lines()
            .next()
            .unwrap_or("")
            .to_string();
        let bare = run_to_end(&[], Duration::from_secs(10));
        problems.extend(one_line_error_problem(&[], &bare, &[]));
        if !about.is_empty() && bare.stderr.iter().any(|l| l.contains(&about)) {
            problems.push(format!(
                "`cluster-lb` printed the program's description: {:?}",
                bare.stderr
            ));
        }
        // A socket that never answers: the client says so after its 10 s.
        let run = status_run.join().expect("status thread");
        let args = ["status", "--control", &silent];
        problems.extend(one_line_error_problem(&args, &run, &["did not answer"]));
        if run.took < Duration::from_secs(9) || run.took > Duration::from_secs(12) {
            problems.push(format!(
                "`status` on a silent socket took {:?}, not about 10 s",
                run.took
            ));
        }
        if run
            .stderr
            .iter()
            .any(|l| l.contains("Resource temporarily unavailable"))
        {
            problems.push(format!("`status` on a silent socket: {:?}", run.stderr));
        }
        assert_no_problems(&problems, &[]);
    });
}

// ==== The second round (issue 23): one unprivileged worker against the primary ====

/// The primary's resident memory in bytes (VmRSS).
fn rss_bytes(pid: i32) -> u64 {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|status| {
            let line = status
                .lines()
                .find(|l| l.starts_with("VmRSS:"))?
                .to_string();
            line.split_whitespace().nth(1)?.parse::<u64>().ok()
        })
        .map_or(0, |kib| kib * 1024)
}

/// channel_abuse.py and the example server, copied where `--user nobody` workers can read them:
/// the command line after `--` for abuse `mode` (`extra` goes between the mode and the server).
fn abuse_command(scratch: &Scratch, mode: &str, extra: &[&str]) -> Vec<String> {
    let abuse = scratch.copy(&hardening_worker("channel_abuse.py"));
    let server = scratch.copy(&python_server());
    let mut command = vec![PYTHON.to_string(), abuse, mode.to_string()];
    command.extend(extra.iter().map(|e| e.to_string()));
    command.extend(["--".to_string(), PYTHON.to_string(), server]);
    command
}

/// `cluster-lb run ARGS -- COMMAND` as root with `--user nobody` workers, cwd `/`.
fn start_as_nobody(args: &[&str], command: &[String]) -> Cluster {
    let mut all: Vec<&str> = vec!["run", "--user", "nobody"];
    if !args.contains(&"--grace") {
        // The abusing workers ignore being asked to stop; a test need not wait 30 s for them.
        all.extend_from_slice(&["--grace", "2"]);
    }
    all.extend_from_slice(args);
    all.push("--");
    all.extend(command.iter().map(String::as_str));
    Cluster::start_with(&all, |c| {
        c.current_dir("/");
    })
}

/// How long `status` takes to answer (an error when it does not within 5 s).
fn status_latency(control: &Path) -> Result<Duration, String> {
    let asked = Instant::now();
    cluster_lb_tests::fetch_status(control)
        .map(|_| asked.elapsed())
        .map_err(|e| e.to_string())
}

// ---- 14. descriptors a worker attaches to its messages ----

#[test]
fn descriptors_a_worker_attaches_to_messages_are_closed_and_the_worker_replaced() {
    root_test("descriptors_on_messages", || {
        let scratch = Scratch::new("fds");
        let mut problems = Vec::new();
        let mut output = Vec::new();
        // (mode, run options, what the disconnect reason must say)
        let cases: [(&str, &[&str], &str); 3] = [
            ("node-fds", &["--node", "on"], "carries no handle"),
            (
                "node-too-many-fds",
                &["--node", "on"],
                "more than 8 descriptors",
            ),
            ("ipc-too-many-fds", &[], "file descriptors"),
        ];
        for (mode, options, reason) in cases {
            let mut args = vec!["-w", "2", READY_BY_NOTIFY[0], READY_BY_NOTIFY[1]];
            args.extend_from_slice(options);
            args.extend_from_slice(&["--listen", ADDR]);
            let cluster = start_as_nobody(&args, &abuse_command(&scratch, mode, &[]));
            let primary = cluster.pid() as i32;
            // Worker 0 is disconnected for it, replaced, and does it again (with growing
            // delays): six times at least within 15 s. The primary's descriptors meanwhile:
            let mut most = 0;
            let watched = Instant::now();
            let mut disconnects = Vec::new();
            while watched.elapsed() < Duration::from_secs(15) && alive(primary) {
                most = most.max(fd_count(primary));
                disconnects = cluster.events_named("disconnect");
                if disconnects.len() >= 6 {
                    break;
                }
                thread::sleep(Duration::from_millis(20));
            }
            let settled = fd_count(primary);
            eprintln!(
                "{mode}: primary fds: at most {most}, {settled} after {} replacements",
                disconnects.len()
            );
            if disconnects.len() < 6 {
                problems.push(format!(
                    "{mode}: {} disconnects in 15 s, not 6",
                    disconnects.len()
                ));
            }
            if !disconnects
                .iter()
                .all(|e| e["reason"].as_str().is_some_and(|r| r.contains(reason)))
            {
                problems.push(format!(
                    "{mode}: a disconnect not for {reason:?}: {disconnects:?}"
                ));
            }
            // Its own: a few per worker (channel, pipes, pidfd), the programs' maps; one worker's
            // 8 descriptors a line used to take it to its limit of 20,000 in 0.1 s, and 16 per
            // message leaked 26 (IPC) or 50 (Node) over 6 restarts.
            if most > 60 {
                problems.push(format!("{mode}: the primary held up to {most} descriptors"));
            }
            match status_latency(cluster.control()) {
                Ok(took) if took < Duration::from_secs(1) => {}
                other => problems.push(format!("{mode}: status: {other:?}")),
            }
            output.extend(cluster.stop().lines);
        }
        assert_no_problems(&problems, &output);
    });
}

// ---- 15. io_uring ----

#[test]
fn io_uring_cannot_change_the_groups_program() {
    root_test("io_uring_attach", || {
        let scratch = Scratch::new("uring");
        let helper = scratch.path("uring-attach");
        fs::copy(
            cluster_lb_tests::target_dir().join("hardening/uring-attach"),
            &helper,
        )
        .expect("target/hardening/uring-attach (cargo xtask test builds it)");
        fs::set_permissions(&helper, fs::Permissions::from_mode(0o755)).expect("chmod helper");
        let server = scratch.copy(&python_server());
        let helper = helper.display().to_string();
        let mut problems = Vec::new();
        let mut output = Vec::new();
        for (options, expected) in [
            (&[][..], "attach-uring: errno 1 at io_uring_setup"),
            (&["--allow-io-uring"][..], "attach-uring: ok"),
        ] {
            let mut args = vec!["-w", "4", READY_BY_NOTIFY[0], READY_BY_NOTIFY[1]];
            args.extend_from_slice(options);
            args.extend_from_slice(&["--listen", ADDR]);
            let cluster =
                start_as_nobody(&args, &[helper.clone(), PYTHON.to_string(), server.clone()]);
            let what = if options.is_empty() {
                "default"
            } else {
                "--allow-io-uring"
            };
            if let Err(e) = ready_or_exit(&cluster, 4, Duration::from_secs(30)) {
                problems.push(format!("{what}: {e}"));
                output.extend(cluster.stop().lines);
                continue;
            }
            match wait_for_worker_line(&cluster, "attach-uring:", Duration::from_secs(5)) {
                Some(w) if w.line == expected => {}
                other => problems.push(format!("{what}: not {expected:?}: {other:?}")),
            }
            // Refused: exact shares at once. Allowed: the attach took, and the primary puts its
            // program back within 10 s (it attaches again every 5 s).
            let deadline = Instant::now() + Duration::from_secs(10);
            while shares(8) != [2; 4] && Instant::now() < deadline {
                thread::sleep(Duration::from_millis(250));
            }
            let seen = shares(400);
            eprintln!("{what}: 400 connections spread as {seen:?}");
            if seen != [100; 4] {
                problems.push(format!("{what}: 400 connections spread as {seen:?}"));
            }
            output.extend(cluster.stop().lines);
        }
        assert_no_problems(&problems, &output);
    });
}

// ---- 16. message floods and output nobody reads: the primary's memory stays bounded ----

/// Starts `cluster-lb run --node on` as root with `--user nobody` workers, its stdout (where
/// worker lines go) read into lines and its stderr (events, with every message) given to
/// `stderr`.
fn start_quiet(
    scratch: &Scratch,
    mode: &[&str],
    stderr: Stdio,
) -> (ChildGuard, PathBuf, Arc<std::sync::Mutex<Vec<String>>>) {
    let control = control_path();
    let mut command = Command::new(workspace_binary("cluster-lb"));
    command
        .args([
            "run", "--user", "nobody", "--node", "on", "-w", "2", "--grace", "2",
        ])
        .args(["--log-format", "json", "--control"])
        .arg(&control)
        .args(READY_BY_NOTIFY)
        .args(["--listen", ADDR, "--"])
        .args(abuse_command(scratch, mode[0], &mode[1..]))
        .current_dir("/")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(stderr);
    let mut child = command.spawn().expect("starting cluster-lb");
    let stdout = child.stdout.take().expect("stdout");
    let lines = Arc::new(std::sync::Mutex::new(Vec::new()));
    let sink = Arc::clone(&lines);
    thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            sink.lock().expect("lines").push(line);
        }
    });
    (ChildGuard(child), control, lines)
}

/// Samples the primary's RSS and `status` latency until the flooding worker wrote its marker
/// file `done` (or `limit` passes): (peak RSS, slowest status, whether it finished).
fn watch_flood(pid: i32, control: &Path, done: &Path, limit: Duration) -> (u64, Duration, bool) {
    let started = Instant::now();
    let (mut peak, mut slowest) = (0, Duration::ZERO);
    let mut finished = false;
    while started.elapsed() < limit && alive(pid) {
        peak = peak.max(rss_bytes(pid));
        slowest = slowest.max(status_latency(control).unwrap_or(Duration::from_secs(99)));
        if done.exists() {
            finished = true;
            break;
        }
        thread::sleep(Duration::from_millis(100));
    }
    (peak, slowest, finished)
}

const RSS_BOUND: u64 = 256 * 1024 * 1024;

#[test]
fn a_message_flood_keeps_the_primary_under_its_memory_bound() {
    root_test("message_flood_memory", || {
        // 15,000 messages of 30 KB, stderr read (by /dev/null).
        flood_stays_bounded(
            "flood",
            "15,000 messages of 30 KB",
            15000,
            30000,
            Stdio::null(),
        );
    });
}

#[test]
fn output_nobody_reads_cannot_grow_the_primary() {
    root_test("unread_output_memory", || {
        // 300 messages of 900 KiB with the primary's stderr a pipe nobody reads (when each
        // message was also logged whole there, an unbounded queue reached 290 MB).
        let (read_end, write_end) = nix::unistd::pipe().expect("pipe");
        flood_stays_bounded(
            "unread",
            "300 lines of 900 KiB to an unread pipe",
            300,
            921600,
            Stdio::from(write_end),
        );
        drop(read_end);
    });
}

/// A Node worker sends `count` messages of `size` bytes; the primary's RSS stays under
/// RSS_BOUND and `status` answers within a second all along.
fn flood_stays_bounded(tag: &str, what: &str, count: u32, size: u32, stderr: Stdio) {
    let scratch = Scratch::new(tag);
    let mut problems = Vec::new();
    let done = scratch.writable_path("done");
    let (primary, control, lines) = start_quiet(
        &scratch,
        &[
            "node-flood",
            &count.to_string(),
            &size.to_string(),
            &done.display().to_string(),
        ],
        stderr,
    );
    let pid = primary.0.id() as i32;
    if let Err(e) = status_when(pid, &control, Duration::from_secs(30), all_ready(2)) {
        problems.push(format!("{what}: {e}"));
    }
    let (peak, slowest, finished) = watch_flood(pid, &control, &done, Duration::from_secs(120));
    eprintln!(
        "{what}: primary RSS at most {} MB, status at most {slowest:?}",
        peak >> 20
    );
    if !finished {
        problems.push("the flood did not finish within 120 s".into());
    }
    if peak > RSS_BOUND {
        problems.push(format!("the primary's RSS reached {} MB", peak >> 20));
    }
    if slowest > Duration::from_secs(1) {
        problems.push(format!("status took up to {slowest:?} during the flood"));
    }
    drop(primary);
    assert_no_problems(&problems, &lines.lock().expect("lines"));
}

// ---- 17. worker strings in the primary's text lines ----

#[test]
fn worker_supplied_strings_cannot_forge_the_primarys_text_lines() {
    root_test("forged_log_lines", || {
        let scratch = Scratch::new("forge");
        let mut problems = Vec::new();
        let mut output = Vec::new();
        for (mode, options) in [
            ("forge-ipc", &[][..]),
            ("forge-node", &["--node", "on"][..]),
        ] {
            let mut args = vec!["-w", "2", "--log-format", "text"];
            args.extend_from_slice(&READY_BY_NOTIFY);
            args.extend_from_slice(options);
            args.extend_from_slice(&["--listen", ADDR]);
            let cluster = start_as_nobody(&args, &abuse_command(&scratch, mode, &[]));
            cluster.wait_for_line(&format!("abuse: {mode}: sent"), Duration::from_secs(20));
            thread::sleep(Duration::from_secs(1));
            let lines = cluster.stop().lines;
            let forged: Vec<&String> = lines
                .iter()
                .filter(|l| l.starts_with("2099-") || l.contains('\u{1b}'))
                .collect();
            if !forged.is_empty() {
                problems.push(format!("{mode}: forged or raw lines: {forged:?}"));
            }
            if !lines.iter().any(|l| l.contains("\\x0a2099-01-01")) {
                problems.push(format!("{mode}: the forged text is not logged escaped"));
            }
            output.extend(lines);
        }
        assert_no_problems(&problems, &output);
    });
}

// ---- 18. READY=1 counts only for the worker that sends it ----

#[test]
fn ready_from_another_workers_process_does_not_count() {
    root_test("ready_for_another", || {
        let scratch = Scratch::new("ready");
        let abuse = scratch.copy(&hardening_worker("channel_abuse.py"));
        // Worker 1 is `sleep`: it never says READY=1, and --ready-delay 30 never passes.
        let command = [
            PYTHON.to_string(),
            abuse,
            "join-sibling".into(),
            "--".into(),
            "sleep".into(),
            "3600".into(),
        ];
        let cluster = start_as_nobody(&["-w", "2", "--ready-delay", "30"], &command);
        let mut problems = Vec::new();
        match wait_for_worker_line(&cluster, "abuse: join-sibling:", Duration::from_secs(15)) {
            Some(w) if w.line == "abuse: join-sibling: errno 1" => {}
            other => problems.push(format!("joining worker 1's group: {other:?}")),
        }
        cluster.wait_for_line("abuse: join-sibling: sent READY=1", Duration::from_secs(10));
        thread::sleep(Duration::from_secs(1));
        let status = cluster.status();
        if status
            .workers
            .iter()
            .any(|w| w.id == 1 && w.state == WorkerState::Ready)
        {
            problems.push(format!("worker 1 was made ready by another: {status:?}"));
        }
        let stopped = cluster.stop();
        assert_no_problems(&problems, &stopped.lines);
    });
}

// ---- 19. one worker's bad TLS ticket keys reach no other ----

#[test]
fn bad_ticket_keys_from_one_worker_reach_no_other() {
    root_test("bad_ticket_keys", || {
        let Some((_, node)) = cluster_lb_tests::node_binaries().into_iter().last() else {
            return;
        };
        let scratch = Scratch::new("tickets");
        let abuse = scratch.copy(&hardening_worker("channel_abuse.py"));
        let app = format!("{}/node/https-app.js", env!("CARGO_MANIFEST_DIR"));
        // Worker 2 starts its https server a second after worker 1 (the first: Node workers are
        // numbered from 1) sent bad keys for the port.
        let later = format!("sleep 1; exec {} {app}", node.display());
        let command = [
            PYTHON.to_string(),
            abuse,
            "bad-tickets".into(),
            "8443".into(),
            "--".into(),
            "sh".into(),
            "-c".into(),
            later,
        ];
        let mut args: Vec<&str> = vec!["run", "-w", "2", "--grace", "2", "--node", "on", "--"];
        args.extend(command.iter().map(String::as_str));
        let cluster = Cluster::start(&args);
        let mut problems = Vec::new();
        cluster.wait_for_line("abuse: bad-tickets: answered", Duration::from_secs(20));
        match find_event(&cluster, "listening", Duration::from_secs(20), |e| {
            e["worker"] == 2
        }) {
            None => problems.push("worker 2's https server never listened".into()),
            Some(_) => {
                thread::sleep(Duration::from_secs(2));
                let restarts = cluster.events_named("restart");
                if restarts.iter().any(|e| e["worker"] == 2) {
                    problems.push(format!("worker 2 was restarted: {restarts:?}"));
                }
            }
        }
        let stopped = cluster.stop();
        assert_no_problems(&problems, &stopped.lines);
    });
}

// ---- 20. the notify socket is out of reach of other users ----

#[test]
fn notify_floods_from_another_user_cannot_slow_a_reload() {
    root_test("notify_other_user", || {
        let scratch = Scratch::new("notify-user");
        let flood = scratch.copy(&hardening_worker("notify_flood.py"));
        let cluster = Cluster::start(&[
            "run",
            "-w",
            "2",
            READY_BY_NOTIFY[0],
            READY_BY_NOTIFY[1],
            "--listen",
            ADDR,
            "--",
            PYTHON,
            &python_server(),
        ]);
        let status = cluster.wait_until_ready(2);
        let notify = environ_var(status.workers[0].pid, "NOTIFY_SOCKET").expect("NOTIFY_SOCKET");
        let mut problems = Vec::new();
        let flooder = Command::new(PYTHON)
            .args([&flood, &notify, "4"])
            .uid(65534)
            .gid(65534)
            .current_dir("/")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting the flood as nobody");
        thread::sleep(Duration::from_millis(500));
        let asked = Instant::now();
        let reload = cluster_lb::control::request(
            cluster.control(),
            &Request::Reload,
            Duration::from_secs(30),
        );
        let took = asked.elapsed();
        eprintln!("reload during a flood by another user: {took:?}: {reload:?}");
        if !matches!(reload, Ok(Reply::Reloaded { replaced: 2 })) {
            problems.push(format!("reload: {reload:?}"));
        }
        if took > Duration::from_secs(1) {
            problems.push(format!("the reload took {took:?} during the flood"));
        }
        // It ends by itself after 4 s.
        let done = flooder.wait_with_output().expect("the flood's output");
        let said = String::from_utf8_lossy(&done.stdout).into_owned();
        if !said.starts_with("refused") {
            problems.push(format!(
                "the other user reached the notify socket: {said:?}"
            ));
        }
        let stopped = cluster.stop();
        assert_no_problems(&problems, &stopped.lines);
    });
}

// ---- 21. a restarted primary and the workers of the one that died ----

#[test]
fn a_restarted_primary_stops_former_workers_holding_its_port_and_names_other_holders() {
    root_test("former_workers", || {
        let scratch = Scratch::new("former");
        let stubborn = scratch.copy(&hardening_worker("ignores_term.py"));
        let server = scratch.copy(&python_server());
        let mut problems = Vec::new();
        let mut output = Vec::new();
        // Workers that ignore TERM outlive a SIGKILLed primary (PDEATHSIG is SIGTERM).
        let mut first = start_as_nobody(
            &["-w", "2", "--listen", ADDR],
            &[PYTHON.to_string(), stubborn],
        );
        let old: Vec<i32> = first
            .wait_until_ready(2)
            .workers
            .iter()
            .map(|w| w.pid)
            .collect();
        let _cleanup = KillOnDrop(old.clone());
        signal(first.pid(), Signal::SIGKILL);
        first.wait_exit(Duration::from_secs(5));
        output.extend(first.lines());
        thread::sleep(Duration::from_millis(500));
        if !old.iter().all(|&pid| alive(pid)) {
            problems.push("precondition: the old workers ignore TERM and live on".into());
        }
        let second = start_as_nobody(
            &[
                "-w",
                "2",
                "--grace",
                "1",
                READY_BY_NOTIFY[0],
                READY_BY_NOTIFY[1],
                "--listen",
                ADDR,
            ],
            &[PYTHON.to_string(), server],
        );
        match ready_or_exit(&second, 2, Duration::from_secs(30)) {
            Err(e) => problems.push(format!("the restarted primary: {e}")),
            Ok(_) => {
                let left: Vec<&i32> = old.iter().filter(|&&pid| alive(pid)).collect();
                if !left.is_empty() {
                    problems.push(format!("former workers {left:?} still run"));
                }
                if let Err(e) = answer_within(addr(), Duration::from_secs(5)) {
                    problems.push(format!("the restarted primary does not serve: {e}"));
                }
            }
        }
        output.extend(second.stop().lines);

        // Anything else that holds the port is named.
        let holder = ChildGuard(
            Command::new(PYTHON)
                .args([
                    "-c",
                    "import socket,time; s=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind(('127.0.0.1',8080)); s.listen(); print('up', flush=True); time.sleep(60)",
                ])
                .stdout(Stdio::piped())
                .spawn()
                .expect("a plain listener"),
        );
        let mut up = String::new();
        let mut holder = holder;
        let _ = BufReader::new(holder.0.stdout.as_mut().expect("stdout")).read_line(&mut up);
        assert_eq!(up, "up\n", "precondition: a plain listener on {ADDR}");
        let args = ["run", "-w", "1", "--listen", ADDR, "--", "sleep", "60"];
        let run = run_to_end(&args, Duration::from_secs(20));
        let pid = holder.0.id().to_string();
        if let Some(problem) =
            one_line_error_problem(&args, &run, &["in use by pid", &pid, "python3"])
        {
            problems.push(problem);
        }
        drop(holder);
        assert_no_problems(&problems, &output);
    });
}

// ---- 22. a reload that replaced nothing says so ----

#[test]
fn a_reload_that_replaced_nothing_fails() {
    root_test("reload_nothing", || {
        let cluster = Cluster::start(&[
            "run", "-w", "2", "--listen", ADDR, "--", "sh", "-c", "exit 3",
        ]);
        cluster.wait_for_events("crash-loop", 1, Duration::from_secs(15));
        let reload = Command::new(workspace_binary("cluster-lb"))
            .arg("reload")
            .arg("--control")
            .arg(cluster.control())
            .output()
            .expect("cluster-lb reload");
        let stopped = cluster.stop();
        let said = String::from_utf8_lossy(&reload.stderr).into_owned();
        assert!(
            !reload.status.success() && said.lines().count() == 1 && said.contains("reload"),
            "reload with every worker crash-looping: {:?} {said:?}; output:\n{}",
            reload.status,
            stopped.lines.join("\n")
        );
    });
}
