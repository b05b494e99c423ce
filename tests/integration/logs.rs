//! `cluster-lb logs`: the primary's recent log (its events and its workers' output) over the
//! control socket. The last lines, one worker's, as JSON; following new lines as they come;
//! and the bound on what a follower that never reads makes the primary hold. The workers
//! (tests/workers/chatty.py) print a line per request on stdout and one with control
//! characters on stderr.

use std::{
    io::{BufRead, BufReader, Write},
    os::unix::net::UnixStream,
    path::Path,
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use cluster_lb_tests::{
    addr, control_path, fetch_status, get, root_test, workspace_binary, Cluster, ADDR,
};
use serde_json::Value;

fn chatty() -> String {
    format!("{}/workers/chatty.py", env!("CARGO_MANIFEST_DIR"))
}

/// The cluster `logs` asks: by name in a run directory (as the README's commands), or by its
/// control socket.
#[derive(Clone, Copy)]
enum Target<'a> {
    Named(&'a Path, &'a str),
    Control(&'a Path),
}

/// `cluster-lb logs ARGS...` for `target`, not yet started.
fn logs_command(target: Target<'_>, args: &[&str]) -> Command {
    let mut command = Command::new(workspace_binary("cluster-lb"));
    command.arg("logs").args(args);
    match target {
        Target::Named(run_dir, name) => {
            command
                .args(["--name", name])
                .env(cluster_lb_tests::control::RUN_DIR_ENV, run_dir);
        }
        Target::Control(path) => {
            command.arg("--control").arg(path);
        }
    }
    command
}

/// `cluster-lb logs ARGS...`: its exit code, stdout, and stderr lines.
fn logs(target: Target<'_>, args: &[&str]) -> (Option<i32>, String, Vec<String>) {
    cluster_lb_tests::run_to_end(logs_command(target, args))
}

/// `logs` that must succeed: its stdout lines.
fn log_lines(target: Target<'_>, args: &[&str]) -> Vec<String> {
    let (code, out, err) = logs(target, args);
    assert_eq!(code, Some(0), "logs {args:?}: {out} {err:?}");
    out.lines().map(str::to_string).collect()
}

/// Waits until `logs --json -n 1000` has a line that `check` accepts.
fn wait_for_log(target: Target<'_>, what: &str, check: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let lines = log_lines(target, &["--json", "-n", "1000"]);
        if let Some(found) = lines
            .iter()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .find(|v| check(v))
        {
            return found;
        }
        assert!(
            Instant::now() < deadline,
            "no {what} in the log: {lines:#?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `logs -n 5` is the log's last five lines, the workers' output and the primary's events
/// together, as the primary's text log shows them (a worker's control characters escaped);
/// `--worker` shows one worker id's output only; `--json` is one object per line. An unknown
/// worker id is one line and exit 1; no cluster is the same error as `status` gives. The
/// primary runs with --log-format json: `logs` prints text whatever the primary's own format.
#[test]
fn logs_shows_the_last_lines_one_workers_and_json() {
    root_test("logs_last_lines", || {
        let chatty = chatty();
        let run_dir = cluster_lb_tests::run_dir();
        let cluster = Cluster::start_named(
            &run_dir,
            "api",
            &[
                "run", "--name", "api", "-w", "2", "--listen", ADDR, "--", "python3", &chatty,
            ],
        );
        cluster.wait_until_ready(2);
        let control = cluster.control().to_path_buf();
        let api = Target::Named(&run_dir, "api");
        let primary = cluster.pid();
        let served = get(addr()).expect("a request").worker;
        wait_for_log(api, "the request's line", |v| {
            v["text"] == format!("request 1 to worker {served}")
        });
        // Then an event after the workers' lines: a third worker starts.
        let mut scale = Command::new(workspace_binary("cluster-lb"));
        scale.args(["scale", "3", "--control"]).arg(&control);
        let (code, out, err) = cluster_lb_tests::run_to_end(scale);
        assert_eq!(code, Some(0), "scale: {out} {err:?}");
        let status = cluster.wait_until_ready(3);
        let third = cluster_lb_tests::pid_of(&status, 2);
        wait_for_log(api, "the third worker's line", |v| {
            v["worker"] == 2 && v["text"] == format!("python worker 2 pid {third} serving")
        });

        let all = log_lines(api, &["-n", "1000"]);
        let last = log_lines(api, &["-n", "5"]);
        assert_eq!(last.len(), 5, "{last:#?}");
        assert_eq!(
            last[..],
            all[all.len() - 5..],
            "-n 5 is the last five of the log"
        );
        // Without --name: the only cluster running.
        let mut unnamed = Command::new(workspace_binary("cluster-lb"));
        unnamed
            .args(["logs", "-n", "5"])
            .env(cluster_lb_tests::control::RUN_DIR_ENV, &*run_dir);
        let (code, out, err) = cluster_lb_tests::run_to_end(unnamed);
        assert_eq!(code, Some(0), "{err:?}");
        assert_eq!(
            out.lines().collect::<Vec<_>>(),
            last,
            "the only cluster's log"
        );
        assert!(
            last.iter().any(
                |l| l == &format!("[worker 2 pid {third}] python worker 2 pid {third} serving")
            ),
            "the new worker's output among the last lines: {last:#?}"
        );
        assert!(
            last.iter()
                .any(|l| l.contains(&format!(" cluster-lb[{primary}]: "))
                    && l.contains(&format!("worker 2 (pid {third}) ready"))),
            "the primary's event among the last lines: {last:#?}"
        );
        // The default (100 lines) has the request's lines; the stderr one arrives escaped.
        let recent = log_lines(api, &[]);
        let worker_pid = cluster_lb_tests::pid_of(&status, served);
        let prefix = format!("[worker {served} pid {worker_pid}] ");
        assert!(
            recent.contains(&format!("{prefix}request 1 to worker {served}")),
            "{recent:#?}"
        );
        assert!(
            recent.contains(&format!("{prefix}\\x1b[31mred\\x0d1 fake line")),
            "{recent:#?}"
        );
        assert!(
            recent
                .iter()
                .all(|l| !l.chars().any(|c| c.is_control() && c != '\t')),
            "no control character reaches the terminal: {recent:#?}"
        );

        // One worker's output only.
        let one = log_lines(api, &["--worker", &served.to_string(), "-n", "1000"]);
        assert!(one.len() >= 3, "{one:#?}");
        assert!(
            one.iter()
                .all(|l| l.starts_with(&format!("[worker {served} pid "))),
            "{one:#?}"
        );
        assert!(
            one.contains(&format!("{prefix}request 1 to worker {served}")),
            "{one:#?}"
        );

        // JSON: one object per line, with its source, pid, stream and the text as written.
        let json = log_lines(api, &["--json", "-n", "1000"]);
        let parsed: Vec<Value> = json
            .iter()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
            .collect();
        assert_eq!(parsed.len(), all.len());
        for line in &parsed {
            assert!(
                line["time"].is_string() && line["text"].is_string(),
                "{line}"
            );
            assert!(line["pid"].is_i64(), "{line}");
            assert!(["stdout", "stderr"].contains(&line["stream"].as_str().unwrap_or("")));
        }
        let ready = format!("worker 2 (pid {third}) ready");
        assert!(
            parsed.iter().any(|v| v["source"] == "event"
                && v["pid"] == primary
                && v["level"] == "info"
                && v["text"].as_str().is_some_and(|t| t.starts_with(&ready))),
            "{json:#?}"
        );
        assert!(parsed.iter().any(|v| v["source"] == "worker"
            && v["worker"] == served
            && v["pid"] == worker_pid
            && v["stream"] == "stderr"
            && v["text"] == "\u{1b}[31mred\r1 fake line"));

        // Errors: an unknown worker, a cluster that is not there (as `status` says it).
        let (code, out, err) = logs(api, &["--worker", "7"]);
        assert_eq!(code, Some(1), "{out} {err:?}");
        assert_eq!(err.len(), 1, "{err:?}");
        assert!(err[0].contains("no worker 7"), "{err:?}");
        let gone = Path::new("/nonexistent/clb.sock");
        let (code, _, err) = logs(Target::Control(gone), &[]);
        let mut status = Command::new(workspace_binary("cluster-lb"));
        status.args(["status", "--control", "/nonexistent/clb.sock"]);
        let (status_code, _, status_err) = cluster_lb_tests::run_to_end(status);
        assert_eq!((code, &err), (status_code, &status_err));
        assert_eq!(code, Some(1));
        assert!(cluster.stop().status.success());
    });
}

/// `logs -f` shows a line a worker prints after it started within a second (each request
/// makes the worker print one), and ends by itself with the primary's last lines when the
/// cluster stops.
#[test]
fn logs_follow_shows_new_lines_as_they_come() {
    root_test("logs_follow", || {
        let chatty = chatty();
        let run_dir = cluster_lb_tests::run_dir();
        let cluster = Cluster::start_named(
            &run_dir,
            "api",
            &[
                "run", "--name", "api", "-w", "2", "--listen", ADDR, "--", "python3", &chatty,
            ],
        );
        cluster.wait_until_ready(2);
        let mut follower = logs_command(Target::Named(&run_dir, "api"), &["-f", "-n", "1"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting logs -f");
        let (lines, seen) = mpsc::channel::<(Instant, String)>();
        let stdout = follower.stdout.take().expect("piped");
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = lines.send((Instant::now(), line));
            }
        });
        // The one line of -n 1: the follower is connected and following.
        seen.recv_timeout(Duration::from_secs(10))
            .expect("logs -f printed the last line");
        let mut slowest = Duration::ZERO;
        for n in 1..=5 {
            let asked = Instant::now();
            let worker = get(addr()).expect("a request").worker;
            let at = loop {
                let (at, line) = seen
                    .recv_timeout(Duration::from_secs(5))
                    .unwrap_or_else(|_| panic!("no line for request {n} within 5 s"));
                if line.contains(&format!(" to worker {worker}")) && line.contains("] request ") {
                    break at;
                }
            };
            let latency = at.duration_since(asked);
            slowest = slowest.max(latency);
            assert!(latency < Duration::from_secs(1), "request {n}: {latency:?}");
        }
        eprintln!("logs -f: slowest of 5 lines took {slowest:?} from the request");

        // The cluster stops: the follower gets the last lines and ends, successfully.
        let stopped = cluster.stop();
        assert!(stopped.status.success());
        let deadline = Instant::now() + Duration::from_secs(10);
        let status = loop {
            if let Some(status) = follower.try_wait().expect("waiting for logs -f") {
                break status;
            }
            assert!(
                Instant::now() < deadline,
                "logs -f did not end with the cluster"
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        let _ = reader.join();
        let rest: Vec<String> = seen.try_iter().map(|(_, line)| line).collect();
        assert!(status.success(), "{status:?}; {rest:#?}");
        assert!(
            rest.iter().any(|l| l.ends_with("all workers stopped")),
            "the primary's last line reached the follower: {rest:#?}"
        );
    });
}

/// A primary started here with its stdout and stderr thrown away (the flood would fill the
/// test's output), killed when dropped.
struct Primary(Child);

impl Drop for Primary {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The resident memory of process `pid` (`field`: VmRSS or VmHWM), in KiB.
fn memory_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|e| panic!("/proc/{pid}/status: {e}"));
    status
        .lines()
        .find_map(|line| line.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
}

/// Worker 0 writes as fast as it can (2 KB lines, and binary output with no newline) while
/// eight `logs -f` connections never read: the primary's memory stays bounded (the ring is
/// 4 MiB; a follower holds at most one batch), `status` still answers, and a follower that
/// reads at last is told how many lines went by. The ring holds no more than its bounds, and
/// the binary output comes out escaped.
#[test]
fn a_follower_that_never_reads_costs_the_primary_no_memory() {
    root_test("logs_never_read", || {
        let control = control_path();
        let chatty = chatty();
        let primary = Primary(
            Command::new(workspace_binary("cluster-lb"))
                .args([
                    "run",
                    "-w",
                    "2",
                    "--grace",
                    "2",
                    "--listen",
                    ADDR,
                    "--control",
                ])
                .arg(&control)
                .args(["--", "python3", &chatty])
                .env("FLOOD", "1")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("starting the primary"),
        );
        let pid = primary.0.id();
        let deadline = Instant::now() + Duration::from_secs(30);
        while !fetch_status(&control).is_ok_and(|s| s.workers.len() == 2) {
            assert!(Instant::now() < deadline, "the cluster did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        // The flood has filled the ring by now; what the primary holds without followers.
        std::thread::sleep(Duration::from_secs(2));
        let before = memory_kib(pid, "VmRSS");
        let request = b"{\"cmd\":\"logs\",\"lines\":1000,\"follow\":true}\n";
        let followers: Vec<UnixStream> = (0..8)
            .map(|_| {
                let mut stream = UnixStream::connect(&control).expect("connecting");
                stream.write_all(request).expect("asking to follow");
                stream
            })
            .collect();
        let mut highest = before;
        let mut slowest_status = Duration::ZERO;
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(6) {
            let asked = Instant::now();
            let status = fetch_status(&control).expect("status answers during the flood");
            slowest_status = slowest_status.max(asked.elapsed());
            assert_eq!(status.workers.len(), 2);
            highest = highest.max(memory_kib(pid, "VmRSS"));
            std::thread::sleep(Duration::from_millis(200));
        }
        let peak = memory_kib(pid, "VmHWM");
        eprintln!(
            "primary VmRSS: {before} KiB before 8 followers that never read, at most {highest} \
             KiB in 6 s of flood after (VmHWM {peak} KiB); slowest status {slowest_status:?}"
        );
        assert!(
            highest < before + 24 * 1024,
            "8 followers that never read grew the primary from {before} to {highest} KiB"
        );
        assert!(
            peak < 128 * 1024,
            "the primary's peak resident memory: {peak} KiB"
        );

        // One follower reads at last: it missed lines, and says how many.
        let mut reader = BufReader::new(&followers[0]);
        followers[0]
            .set_read_timeout(Some(Duration::from_secs(10)))
            .expect("a timeout");
        let mut dropped = None;
        let mut line = String::new();
        for _ in 0..100_000 {
            line.clear();
            if reader.read_line(&mut line).expect("reading the follow") == 0 {
                break;
            }
            let reply: Value = serde_json::from_str(&line).expect("a JSON reply");
            if reply["reply"] == "dropped" {
                dropped = reply["lines"].as_u64();
                break;
            }
        }
        let dropped = dropped.expect("a follower that fell behind is told so");
        assert!(dropped > 0);
        eprintln!("the follower that read last was told {dropped} lines were dropped");

        // Followers have a limit (32, fewer with few descriptors): past it, one line says so,
        // and the control socket still has room for status.
        let mut more = Vec::new();
        let refusal = loop {
            assert!(more.len() < 64, "no limit on followers");
            let mut stream = UnixStream::connect(&control).expect("connecting");
            stream
                .write_all(b"{\"cmd\":\"logs\",\"lines\":0,\"follow\":true}\n")
                .expect("asking to follow");
            stream
                .set_read_timeout(Some(Duration::from_secs(10)))
                .expect("a timeout");
            let mut first = String::new();
            BufReader::new(&stream)
                .read_line(&mut first)
                .expect("a first reply (the flood goes on)");
            let reply: Value = serde_json::from_str(&first).expect("a JSON reply");
            if reply["reply"] == "refused" {
                break reply["error"].as_str().unwrap_or_default().to_string();
            }
            more.push(stream);
        };
        eprintln!(
            "follower {} refused: {refusal}",
            followers.len() + more.len() + 1
        );
        assert!(refusal.contains("already follow"), "{refusal}");
        assert!(followers.len() + more.len() <= 32);
        assert_eq!(fetch_status(&control).expect("status").workers.len(), 2);
        drop(more);

        // The ring is bounded in lines and bytes; binary output is escaped in text.
        let json = log_lines(Target::Control(&control), &["--json", "-n", "1000000"]);
        assert!(json.len() <= 1000, "{} lines", json.len());
        let text_bytes: usize = json
            .iter()
            .map(|l| {
                let v: Value = serde_json::from_str(l).expect("JSON");
                v["text"].as_str().map_or(0, str::len)
            })
            .sum();
        assert!(text_bytes <= 4 * 1024 * 1024, "{text_bytes} bytes of text");
        let text = log_lines(Target::Control(&control), &["-n", "200", "--worker", "0"]);
        assert!(
            text.iter().any(|l| l.contains("\\x1b")),
            "binary output escaped"
        );
        assert!(
            text.iter()
                .all(|l| !l.chars().any(|c| c.is_control() && c != '\t')),
            "no control character reaches the terminal"
        );
        drop(followers);
        drop(primary);
    });
}

/// `run --log-file FILE --log-file-size 16K`: the log goes to FILE, not to stdout or stderr;
/// at 16 KiB it becomes FILE.1 and a new FILE begins (neither much larger than 16 KiB);
/// after FILE is moved away (as logrotate does), SIGUSR1 makes the primary write a new FILE.
/// `logs` reads the same lines from the primary either way.
#[test]
fn the_log_file_rotates_at_its_size_and_reopens_on_sigusr1() {
    root_test("logs_log_file", || {
        let dir = cluster_lb_tests::run_dir();
        let file = dir.join("cluster.log");
        let rotated = dir.join("cluster.log.1");
        let chatty = chatty();
        let file_arg = file.display().to_string();
        let cluster = Cluster::start(&[
            "run",
            "--log-file",
            &file_arg,
            "--log-file-size",
            "16K",
            "-w",
            "2",
            "--listen",
            ADDR,
            "--",
            "python3",
            &chatty,
        ]);
        cluster.wait_until_ready(2);
        let control = cluster.control().to_path_buf();
        let read = |path: &Path| std::fs::read_to_string(path).unwrap_or_default();
        let mut requests = 0;
        while !rotated.exists() {
            assert!(requests < 2000, "no rotation after {requests} requests");
            get(addr()).expect("a request");
            requests += 1;
        }
        // A few more, so the new file has lines too.
        for _ in 0..5 {
            get(addr()).expect("a request");
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while !read(&file).contains("\"line\":\"request ") {
            assert!(Instant::now() < deadline, "no request line in the new file");
            std::thread::sleep(Duration::from_millis(20));
        }
        let (now, before) = (read(&file), read(&rotated));
        eprintln!(
            "rotated after {requests} requests: {} bytes in FILE.1, {} in FILE",
            before.len(),
            now.len()
        );
        let most = 16 * 1024 + 1024;
        assert!(
            before.len() <= most && now.len() <= most,
            "{} {}",
            before.len(),
            now.len()
        );
        assert!(
            before.contains("\"event\":\"ready\""),
            "the first events: {before}"
        );
        assert!(
            before.lines().chain(now.lines()).all(|l| l.ends_with('}')),
            "whole lines"
        );
        assert!(
            !cluster.lines().iter().any(|l| l.contains("request ")),
            "nothing on stdout or stderr: {:#?}",
            cluster.lines()
        );

        // logrotate moves it; SIGUSR1; the next lines are in a new FILE.
        let moved = dir.join("moved.log");
        std::fs::rename(&file, &moved).expect("moving the log file");
        cluster_lb_tests::signal(cluster.pid(), nix::sys::signal::Signal::SIGUSR1);
        let deadline = Instant::now() + Duration::from_secs(10);
        while !read(&file).contains("SIGUSR1: reopened the log file") {
            assert!(Instant::now() < deadline, "no new log file after SIGUSR1");
            std::thread::sleep(Duration::from_millis(20));
        }
        let served = get(addr()).expect("a request after SIGUSR1").worker;
        let deadline = Instant::now() + Duration::from_secs(10);
        while !read(&file).contains(&format!("to worker {served}\"")) {
            assert!(Instant::now() < deadline, "no request line after SIGUSR1");
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(
            !read(&moved).contains("SIGUSR1"),
            "the moved file got nothing more"
        );
        assert_eq!(fetch_status(&control).expect("status").workers.len(), 2);
        let last = log_lines(Target::Control(&control), &["-n", "3"]);
        assert!(last.iter().any(|l| l.contains("request ")), "{last:#?}");
        assert!(cluster.stop().status.success());
    });
}
