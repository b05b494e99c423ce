//! Node's own cluster tests, run under cluster-lb: every `test-cluster-*.js` of Node's
//! test/parallel and test/sequential that uses cluster, as the program's primary
//! (`--node-primary on`), so Node's primary API (cluster.fork, Worker, every event) is Node's
//! own code on top of cluster-lb's workers. The files come from Debian's nodejs source
//! package (`cargo xtask test` extracts them into `<target>/node-tests/vMAJOR`, see
//! xtask/src/node_tests.rs); each runs with the Node major it belongs to. Each major is one
//! test, whose files run one after the other in one network namespace.
//!
//! A file passes when the program's primary exits 0 (Node's tests assert by throwing, and
//! their mustCall checks run at exit) and cluster-lb then stops by itself with status 0. The
//! test prints a table (file, result, seconds) and the count, and fails when a file outside
//! BY_DESIGN fails, or a file in BY_DESIGN passes (as Node's own known_issues do, so the list
//! stays honest). A file in EITHER passes or fails by timing, by design: shown, not judged.

use std::{
    collections::BTreeSet,
    fs,
    io::{BufRead, BufReader, Read, Write},
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::{Arc, Mutex},
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use cluster_lb_tests::{
    control_path, events_in, in_ci, node_binaries, root_test, target_dir, workspace_binary,
};
use nix::{
    sys::signal::{kill, killpg, Signal},
    unistd::Pid,
};
use serde_json::Value;

/// How long one file may take.
const TIMEOUT: Duration = Duration::from_secs(60);
/// How long cluster-lb has to stop by itself once the program's primary exited 0 (it gives its
/// remaining workers --grace 5 s).
const STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// How long what a file started has to go away by itself once cluster-lb is gone.
const SETTLE: Duration = Duration::from_secs(2);

/// The files, relative to `test/`: Node 20's test-cluster-*.js (the same names in 18 and 22),
/// all but test-cluster-eaddrinuse.js and test-cluster-net-send.js, which do not use cluster.
const FILES: &[&str] = &[
    "parallel/test-cluster-accept-fail.js",
    "parallel/test-cluster-advanced-serialization.js",
    "parallel/test-cluster-basic.js",
    "parallel/test-cluster-bind-privileged-port.js",
    "parallel/test-cluster-bind-twice.js",
    "parallel/test-cluster-call-and-destroy.js",
    "parallel/test-cluster-child-index-dgram.js",
    "parallel/test-cluster-child-index-net.js",
    "parallel/test-cluster-concurrent-disconnect.js",
    "parallel/test-cluster-cwd.js",
    "parallel/test-cluster-dgram-1.js",
    "parallel/test-cluster-dgram-2.js",
    "parallel/test-cluster-dgram-bind-fd.js",
    "parallel/test-cluster-dgram-ipv6only.js",
    "parallel/test-cluster-dgram-reuse.js",
    "parallel/test-cluster-disconnect-before-exit.js",
    "parallel/test-cluster-disconnect-exitedAfterDisconnect-race.js",
    "parallel/test-cluster-disconnect-idle-worker.js",
    "parallel/test-cluster-disconnect-leak.js",
    "parallel/test-cluster-disconnect-race.js",
    "parallel/test-cluster-disconnect-unshared-tcp.js",
    "parallel/test-cluster-disconnect-unshared-udp.js",
    "parallel/test-cluster-disconnect-with-no-workers.js",
    "parallel/test-cluster-disconnect.js",
    "parallel/test-cluster-eaccess.js",
    "parallel/test-cluster-fork-env.js",
    "parallel/test-cluster-fork-stdio.js",
    "parallel/test-cluster-fork-windowsHide.js",
    "parallel/test-cluster-http-pipe.js",
    "parallel/test-cluster-invalid-message.js",
    "parallel/test-cluster-ipc-throw.js",
    "parallel/test-cluster-kill-disconnect.js",
    "parallel/test-cluster-kill-infinite-loop.js",
    "parallel/test-cluster-listen-pipe-readable-writable.js",
    "parallel/test-cluster-listening-port.js",
    "parallel/test-cluster-message.js",
    "parallel/test-cluster-net-listen-backlog.js",
    "parallel/test-cluster-net-listen-ipv6only-false.js",
    "parallel/test-cluster-net-listen-relative-path.js",
    "parallel/test-cluster-net-listen.js",
    "parallel/test-cluster-net-server-drop-connection.js",
    "parallel/test-cluster-primary-error.js",
    "parallel/test-cluster-primary-kill.js",
    "parallel/test-cluster-process-disconnect.js",
    "parallel/test-cluster-rr-domain-listen.js",
    "parallel/test-cluster-rr-handle-close.js",
    "parallel/test-cluster-rr-handle-keep-loop-alive.js",
    "parallel/test-cluster-rr-handle-ref-unref.js",
    "parallel/test-cluster-rr-ref.js",
    "parallel/test-cluster-send-deadlock.js",
    "parallel/test-cluster-send-handle-twice.js",
    "parallel/test-cluster-send-socket-to-worker-http-server.js",
    "parallel/test-cluster-server-restart-none.js",
    "parallel/test-cluster-server-restart-rr.js",
    "parallel/test-cluster-setup-primary-argv.js",
    "parallel/test-cluster-setup-primary-cumulative.js",
    "parallel/test-cluster-setup-primary-emit.js",
    "parallel/test-cluster-setup-primary-multiple.js",
    "parallel/test-cluster-setup-primary.js",
    "parallel/test-cluster-shared-handle-bind-error.js",
    "parallel/test-cluster-shared-handle-bind-privileged-port.js",
    "parallel/test-cluster-shared-leak.js",
    "parallel/test-cluster-uncaught-exception.js",
    "parallel/test-cluster-worker-constructor.js",
    "parallel/test-cluster-worker-death.js",
    "parallel/test-cluster-worker-destroy.js",
    "parallel/test-cluster-worker-disconnect-on-error.js",
    "parallel/test-cluster-worker-disconnect.js",
    "parallel/test-cluster-worker-events.js",
    "parallel/test-cluster-worker-exit.js",
    "parallel/test-cluster-worker-forced-exit.js",
    "parallel/test-cluster-worker-handle-close.js",
    "parallel/test-cluster-worker-init.js",
    "parallel/test-cluster-worker-isconnected.js",
    "parallel/test-cluster-worker-isdead.js",
    "parallel/test-cluster-worker-kill-signal.js",
    "parallel/test-cluster-worker-kill.js",
    "parallel/test-cluster-worker-no-exit.js",
    "parallel/test-cluster-worker-wait-server-close.js",
    "sequential/test-cluster-inspect-brk.js",
    "sequential/test-cluster-net-listen-ipv6only-none.js",
    "sequential/test-cluster-net-listen-ipv6only-rr.js",
    "sequential/test-cluster-send-handle-large-payload.js",
];

/// Why a file passes a handle with worker.send() or process.send().
const HANDLE: &str = "sends a socket with worker.send(message, handle): each cluster-lb worker \
                      has its own listening socket, and the channel carries no handles";
/// Why a file asks for more stdio than stdin, stdout and stderr.
const EXTRA_STDIO: &str = "asks for an extra stdio pipe in settings.stdio: a cluster-lb worker \
                           has its channel and its output only";

/// Files that fail under cluster-lb by design: what they need is something cluster-lb does
/// differently on purpose. They are still run (with BY_DESIGN_TIMEOUT). A file that fails
/// because of a bug does not belong here: the test fails until the bug is fixed.
const BY_DESIGN: &[(&str, &str)] = &[
    (
        "parallel/test-cluster-advanced-serialization.js",
        "serialization: 'advanced': cluster-lb's channel carries JSON (refused at fork)",
    ),
    (
        "parallel/test-cluster-dgram-bind-fd.js",
        "bind({ fd }) names a descriptor of the primary's process, which cluster-lb (another \
         process) does not have",
    ),
    ("parallel/test-cluster-fork-stdio.js", EXTRA_STDIO),
    (
        "parallel/test-cluster-net-listen-backlog.js",
        "checks the backlog Node's primary listens with for round robin: under cluster-lb the \
         primary never listens, each worker has its own socket",
    ),
    (
        "parallel/test-cluster-net-listen-relative-path.js",
        "expects a Unix socket's file gone once its only worker exits: cluster-lb's primary keeps \
         the socket and its file until the cluster stops, so connections wait through restarts",
    ),
    ("parallel/test-cluster-send-deadlock.js", HANDLE),
    (
        "parallel/test-cluster-send-socket-to-worker-http-server.js",
        HANDLE,
    ),
    ("sequential/test-cluster-inspect-brk.js", EXTRA_STDIO),
    (
        "sequential/test-cluster-send-handle-large-payload.js",
        HANDLE,
    ),
];

/// Files that pass or fail by timing, by design: run and shown, never judged (neither a pass
/// nor a failure fails the test).
const EITHER: &[(&str, &str)] = &[
    (
        "parallel/test-cluster-dgram-1.js",
        "one sender's datagrams are one UDP flow, which goes to one worker's own socket until \
         that worker closes it after its 10; the group then hashes the flow to another worker, \
         so it passes only when each close lands before the next datagram (Node spreads them \
         over one shared socket)",
    ),
    (
        "parallel/test-cluster-net-server-drop-connection.js",
        "counts on Node's primary handing each connection of a Unix socket to a worker below \
         its maxConnections (1 and 9 of 10): under cluster-lb the workers share the socket's \
         accept queue (the kernel has no reuseport group for Unix sockets), so it passes only \
         when the accepts happen to split 1 and 9 (seen both ways in CI)",
    ),
];

/// A file in BY_DESIGN fails fast or hangs; one that passes does so in a few seconds.
const BY_DESIGN_TIMEOUT: Duration = Duration::from_secs(20);

/// Files whose cluster runs in a process the file starts itself (a harness that forks the
/// primary): that primary runs as plain Node, since cluster-lb's preload is not inherited, so
/// their pass says little about cluster-lb. Counted apart.
const NESTED: &[&str] = &[
    "parallel/test-cluster-bind-twice.js",
    "parallel/test-cluster-fork-windowsHide.js",
    "parallel/test-cluster-primary-error.js",
    "parallel/test-cluster-primary-kill.js",
    "parallel/test-cluster-uncaught-exception.js",
];

#[test]
fn node_18s_own_cluster_tests_pass_under_cluster_lb() {
    conformance(18);
}

#[test]
fn node_20s_own_cluster_tests_pass_under_cluster_lb() {
    conformance(20);
}

#[test]
fn node_22s_own_cluster_tests_pass_under_cluster_lb() {
    conformance(22);
}

// No Node 24: its source package is not in the Debian archive this project's set-up can reach
// (the mirror answers 404 for nodejs 24's tarball), and Node's tests come from nowhere else.

/// Runs every file of `major`'s tests with `major`'s Node, prints the table, and checks it.
fn conformance(major: u32) {
    root_test(&format!("node_conformance_{major}"), move || {
        let Some(node) = node_binary(major) else {
            return;
        };
        let Some(tree) = test_tree(major) else {
            return;
        };
        let runs: Vec<FileRun> = FILES
            .iter()
            .map(|file| run_file(&node, &tree, file))
            .collect();
        keep_logs(major, &runs);
        report(major, &runs);
        let problems = problems(&runs);
        assert!(
            problems.is_empty(),
            "Node {major}'s cluster tests under cluster-lb:\n{}",
            problems.join("\n")
        );
    });
}

fn node_binary(major: u32) -> Option<PathBuf> {
    // node_binaries says itself when one is missing (and fails in CI).
    node_binaries()
        .into_iter()
        .find(|(m, _)| *m == major)
        .map(|(_, path)| path)
}

/// `<target>/node-tests/vMAJOR`, with `test/common` and the files under it. When `cargo xtask
/// test` could not fetch them it left `vMAJOR.missing` saying why: that major is skipped, but
/// Node 20's tests are required in CI, and so is any tree xtask did not even try.
fn test_tree(major: u32) -> Option<PathBuf> {
    let base = target_dir().join("node-tests");
    let tree = base.join(format!("v{major}"));
    if tree.join("test/common/index.js").is_file() {
        return Some(tree);
    }
    let missing = base.join(format!("v{major}.missing"));
    let why = fs::read_to_string(&missing).ok();
    assert!(
        !in_ci() || (major != 20 && why.is_some()),
        "{} is missing; `cargo xtask test` fetches it",
        tree.display()
    );
    let why = why.map_or_else(
        || "not fetched (cargo xtask test fetches them)".to_string(),
        |why| format!("not available: {}", why.lines().next().unwrap_or_default()),
    );
    // Straight to fd 2, past libtest's capture, as root_test does; xtask counts SKIPPED lines.
    let line = format!("SKIPPED Node {major}'s own cluster tests: {why}\n");
    let _ = std::io::stderr().write_all(line.as_bytes());
    None
}

/// What one file did.
struct FileRun {
    file: &'static str,
    outcome: Outcome,
    seconds: f64,
    /// Processes still in the namespace after cluster-lb was gone (killed then).
    leftovers: Vec<String>,
    /// Everything cluster-lb printed (its JSON log, the program's lines among it).
    lines: Vec<String>,
}

#[derive(Debug, Clone, PartialEq)]
enum Outcome {
    Passed,
    /// Node's common.skip(): the file does not apply here (e.g. privileged ports as root).
    Skipped(String),
    Failed(String),
    TimedOut(Duration),
}

impl Outcome {
    fn word(&self) -> &'static str {
        match self {
            Outcome::Passed => "pass",
            Outcome::Skipped(_) => "skip",
            Outcome::Failed(_) => "FAIL",
            Outcome::TimedOut(_) => "TIMEOUT",
        }
    }

    fn failed(&self) -> bool {
        matches!(self, Outcome::Failed(_) | Outcome::TimedOut(_))
    }
}

/// The lines a running cluster-lb printed so far (stdout and stderr).
type Lines = Arc<Mutex<Vec<String>>>;

fn run_file(node: &Path, tree: &Path, file: &'static str) -> FileRun {
    let started = Instant::now();
    let script = tree.join("test").join(file);
    let (mut child, lines, readers) = start(node, tree, &script);
    let timeout = match by_design(file).or(by_timing(file)) {
        Some(_) => BY_DESIGN_TIMEOUT,
        None => TIMEOUT,
    };
    let outcome = watch(&mut child, &lines, timeout);
    // Whatever happened, nothing of this file may run into the next one.
    if let Ok(None) = child.try_wait() {
        let _ = killpg(Pid::from_raw(child.id() as i32), Signal::SIGKILL);
        let _ = child.wait();
    }
    let leftovers = sweep_namespace();
    // Every writer is gone now: the readers end once they took the last lines.
    for reader in readers {
        let _ = reader.join();
    }
    let lines = lines.lock().expect("lines lock").clone();
    let seconds = started.elapsed().as_secs_f64();
    FileRun {
        file,
        outcome,
        seconds,
        leftovers,
        lines,
    }
}

/// `cluster-lb run --node-primary on --restart program --grace 5 -- NODE [FLAGS] FILE`, in
/// the tree's root as Node's own test runner does (common.PIPE and tmpdir are relative to it),
/// in a process group of its own, so a timeout can take it down whole.
fn start(node: &Path, tree: &Path, script: &Path) -> (Child, Lines, Vec<JoinHandle<()>>) {
    let control = control_path();
    let mut command = Command::new(workspace_binary("cluster-lb"));
    command
        .args(["run", "--node-primary", "on", "--restart", "program"])
        .args(["--grace", "5", "--log-format", "json", "--control"])
        .arg(&control)
        .arg("--")
        .arg(node)
        .args(flags_of(script))
        .arg(script)
        .current_dir(tree)
        // v20's test/common lists the globals of its Node; later majors have more.
        .env("NODE_TEST_KNOWN_GLOBALS", "0")
        .process_group(0)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = command.spawn().expect("starting cluster-lb");
    let lines: Lines = Arc::new(Mutex::new(Vec::new()));
    let streams: [Option<Box<dyn Read + Send>>; 2] = [
        child
            .stdout
            .take()
            .map(|s| Box::new(s) as Box<dyn Read + Send>),
        child
            .stderr
            .take()
            .map(|s| Box::new(s) as Box<dyn Read + Send>),
    ];
    let readers = streams
        .into_iter()
        .flatten()
        .map(|stream| {
            let lines = Arc::clone(&lines);
            thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    lines.lock().expect("lines lock").push(line);
                }
            })
        })
        .collect();
    (child, lines, readers)
}

/// The node options a file asks for on its `// Flags:` line. Node's test runner passes them
/// on the command line; without them test/common would re-run the file in a child of its own,
/// outside cluster-lb.
fn flags_of(script: &Path) -> Vec<String> {
    let text = fs::read_to_string(script).unwrap_or_default();
    text.lines()
        .take(40)
        .find_map(|line| line.strip_prefix("// Flags:"))
        .map(|flags| flags.split_whitespace().map(str::to_string).collect())
        .unwrap_or_default()
}

/// Waits for the program's primary to exit (the first one: cluster-lb restarts a primary that
/// failed, which would only repeat the failure) and judges the file.
fn watch(child: &mut Child, lines: &Lines, timeout: Duration) -> Outcome {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(exit) = primary_exit(lines) {
            return judge(child, lines, &exit);
        }
        if let Ok(Some(status)) = child.try_wait() {
            thread::sleep(Duration::from_millis(100));
            if let Some(exit) = primary_exit(lines) {
                return judge(child, lines, &exit);
            }
            return Outcome::Failed(format!(
                "cluster-lb exited ({status}) before the program's primary did"
            ));
        }
        if Instant::now() >= deadline {
            return Outcome::TimedOut(timeout);
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// The first `primary-exit` event.
fn primary_exit(lines: &Lines) -> Option<Value> {
    let lines = lines.lock().expect("lines lock");
    events_in(&lines)
        .into_iter()
        .find(|event| event["event"] == "primary-exit")
}

/// A primary that exited 0, and a cluster-lb that then stopped by itself with 0, is a pass (or
/// a skip, when Node's common.skip said so); anything else is a failure.
fn judge(child: &mut Child, lines: &Lines, exit: &Value) -> Outcome {
    if exit["code"] != 0 || !exit["signal"].is_null() {
        return Outcome::Failed(format!(
            "the primary exited with code {} signal {}",
            exit["code"], exit["signal"]
        ));
    }
    match wait_exit(child, STOP_TIMEOUT) {
        Some(status) if status.success() => {}
        Some(status) => {
            return Outcome::Failed(format!(
                "the primary exited 0, and then cluster-lb with {status}"
            ))
        }
        None => {
            return Outcome::Failed(format!(
                "the primary exited 0, but cluster-lb did not stop within {STOP_TIMEOUT:?}"
            ))
        }
    }
    match skip_reason(&lines.lock().expect("lines lock")) {
        Some(reason) => Outcome::Skipped(reason),
        None => Outcome::Passed,
    }
}

fn wait_exit(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        thread::sleep(Duration::from_millis(20));
    }
    None
}

/// The program's own output lines: (stream, text).
fn program_lines(lines: &[String]) -> Vec<(String, String)> {
    lines
        .iter()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .filter(|value| value.get("line").is_some() && value.get("event").is_none())
        .map(|value| {
            let stream = value["stream"].as_str().unwrap_or_default().to_string();
            let text = value["line"].as_str().unwrap_or_default().to_string();
            (stream, text)
        })
        .collect()
}

/// Node's common.skip() prints `1..0 # Skipped: REASON` (TAP) and exits 0.
fn skip_reason(lines: &[String]) -> Option<String> {
    program_lines(lines).into_iter().find_map(|(_, text)| {
        text.strip_prefix("1..0 # Skipped:")
            .map(|reason| reason.trim().to_string())
    })
}

/// Every process in this thread's network namespace except this test process: each file runs
/// in the namespace of its test, so they are what the file left. Given SETTLE to go by
/// themselves (a worker's parent-death signal), then killed, so the next file starts clean.
fn sweep_namespace() -> Vec<String> {
    let deadline = Instant::now() + SETTLE;
    let mut left = processes_in_namespace();
    while !left.is_empty() && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(50));
        left = processes_in_namespace();
    }
    for (pid, _) in &left {
        let _ = kill(Pid::from_raw(*pid), Signal::SIGKILL);
    }
    left.into_iter()
        .map(|(pid, command)| format!("{pid} {command}"))
        .collect()
}

fn processes_in_namespace() -> Vec<(i32, String)> {
    let Ok(ours) = fs::read_link("/proc/thread-self/ns/net") else {
        return Vec::new();
    };
    let me = std::process::id() as i32;
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| *pid != me)
        .filter(|pid| fs::read_link(format!("/proc/{pid}/ns/net")).ok().as_ref() == Some(&ours))
        .map(|pid| (pid, command_line(pid)))
        .collect()
}

fn command_line(pid: i32) -> String {
    let raw = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let words: Vec<String> = raw
        .split(|b| *b == 0)
        .filter(|w| !w.is_empty())
        .map(|w| String::from_utf8_lossy(w).into_owned())
        .collect();
    words.join(" ")
}

/// Each file's whole output, in `<target>/node-tests/logs/vMAJOR/FILE.log` (the report shows
/// only the end of a failure's).
fn keep_logs(major: u32, runs: &[FileRun]) {
    let dir = target_dir()
        .join("node-tests/logs")
        .join(format!("v{major}"));
    let _ = fs::remove_dir_all(&dir);
    for run in runs {
        let path = dir.join(format!("{}.log", run.file));
        if let Some(parent) = path.parent() {
            let _ = fs::create_dir_all(parent);
        }
        let mut text: String = run.lines.iter().map(|l| format!("{l}\n")).collect();
        text.push_str(&format!(
            "result: {} ({})\n",
            run.outcome.word(),
            why(&run.outcome)
        ));
        if let Err(e) = fs::write(&path, text) {
            eprintln!("cannot keep the log of {}: {e}", run.file);
        }
    }
    eprintln!("each file's whole output: {}", dir.display());
}

fn by_design(file: &str) -> Option<&'static str> {
    reason_in(BY_DESIGN, file)
}

fn by_timing(file: &str) -> Option<&'static str> {
    reason_in(EITHER, file)
}

fn reason_in(list: &[(&str, &'static str)], file: &str) -> Option<&'static str> {
    list.iter()
        .find(|(name, _)| *name == file)
        .map(|(_, reason)| *reason)
}

/// The table, the details of every unexpected result, and the count.
fn report(major: u32, runs: &[FileRun]) {
    eprintln!("\nNode {major}'s own cluster tests under cluster-lb:");
    eprintln!("{:<64} {:<8} {:>7}", "file", "result", "seconds");
    for run in runs {
        eprintln!(
            "{:<64} {:<8} {:>7.1}{}",
            run.file,
            run.outcome.word(),
            run.seconds,
            note(run)
        );
    }
    for run in runs.iter().filter(|r| unexpected(r)) {
        details(run);
    }
    let count = |keep: &dyn Fn(&FileRun) -> bool| runs.iter().filter(|r| keep(r)).count();
    let passed = count(&|r| r.outcome == Outcome::Passed);
    let nested = count(&|r| r.outcome == Outcome::Passed && NESTED.contains(&r.file));
    let skipped = count(&|r| matches!(r.outcome, Outcome::Skipped(_)));
    let failed = count(&|r| r.outcome.failed());
    let by_design_failed = count(&|r| r.outcome.failed() && by_design(r.file).is_some());
    let by_timing_failed = count(&|r| r.outcome.failed() && by_timing(r.file).is_some());
    let worker_failed =
        count(&|r| r.outcome == Outcome::Passed && failed_worker_check(&r.lines).is_some());
    // Straight to fd 2, so the count shows also when libtest captures the table.
    let line = format!(
        "Node {major}: {passed} of {} of Node's cluster tests pass under cluster-lb ({nested} \
         of them with a nested primary that runs as plain Node, {worker_failed} with a worker \
         whose own check failed), {skipped} skipped by Node itself, {failed} fail \
         ({by_design_failed} by design, {by_timing_failed} by timing)\n",
        runs.len()
    );
    let _ = std::io::stderr().write_all(line.as_bytes());
}

/// The table's last column: why a file is special, and what looks odd about its run.
fn note(run: &FileRun) -> String {
    let mut notes = Vec::new();
    if let Some(reason) = by_design(run.file) {
        notes.push(format!("by design: {reason}"));
    }
    if let Some(reason) = by_timing(run.file) {
        notes.push(format!("either, by timing: {reason}"));
    }
    if NESTED.contains(&run.file) {
        notes.push("nested primary, runs as plain Node".to_string());
    }
    if let Outcome::Skipped(reason) = &run.outcome {
        notes.push(reason.clone());
    }
    if run.outcome == Outcome::Passed {
        if let Some(check) = failed_worker_check(&run.lines) {
            notes.push(format!("but a worker's own check failed: {check}"));
        }
        // Some tests make workers exit non-zero on purpose: shown, not judged.
        let exits = failed_worker_exits(&run.lines);
        if !exits.is_empty() {
            notes.push(format!("worker exits: {}", exits.join(", ")));
        }
    }
    if !run.leftovers.is_empty() {
        notes.push(format!("left {} process(es)", run.leftovers.len()));
    }
    if notes.is_empty() {
        return String::new();
    }
    format!("  ({})", notes.join("; "))
}

/// The first failed assertion or mustCall count a worker printed. Node's tests do not always
/// check their workers' exits, so the primary may exit 0 although a worker's own checks failed:
/// by the pass rule (the primary's exit) that file passes, and the table says what failed.
fn failed_worker_check(lines: &[String]) -> Option<String> {
    lines
        .iter()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .filter(|value| value["primary"] != true)
        .filter_map(|value| value["line"].as_str().map(str::to_string))
        .find(|text| text.contains("AssertionError") || text.starts_with("Mismatched "))
}

/// Worker exits other than code 0, as `code 1` or `SIGKILL`, from cluster-lb's exit events.
fn failed_worker_exits(lines: &[String]) -> Vec<String> {
    events_in(lines)
        .into_iter()
        .filter(|event| event["event"] == "exit")
        .filter_map(
            |event| match (event["code"].as_i64(), event["signal"].as_str()) {
                (Some(0), _) => None,
                (Some(code), _) => Some(format!("code {code}")),
                (None, Some(signal)) => Some(signal.to_string()),
                (None, None) => None,
            },
        )
        .collect()
}

/// A failure outside BY_DESIGN, or a pass inside it (a file of EITHER is never unexpected).
fn unexpected(run: &FileRun) -> bool {
    run.outcome.failed() != by_design(run.file).is_some()
        && !matches!(run.outcome, Outcome::Skipped(_))
        && by_timing(run.file).is_none()
}

/// What went wrong with one file: why, the processes it left, and the end of its output.
fn details(run: &FileRun) {
    eprintln!("\n---- {} ({})", run.file, run.outcome.word());
    if let Outcome::Failed(why) = &run.outcome {
        eprintln!("  {why}");
    }
    for process in &run.leftovers {
        eprintln!("  left running: {process}");
    }
    let interesting: Vec<String> = run
        .lines
        .iter()
        .filter_map(|line| describe_line(line))
        .collect();
    let tail = interesting.len().saturating_sub(40);
    for line in &interesting[tail..] {
        eprintln!("  | {line}");
    }
}

/// A log line in a few words: the program's output as it printed it, events and warnings
/// with their fields.
fn describe_line(line: &str) -> Option<String> {
    let Ok(value) = serde_json::from_str::<Value>(line) else {
        return Some(line.to_string());
    };
    if let Some(text) = value["line"].as_str() {
        let who = if value["primary"] == true {
            "primary"
        } else {
            "worker"
        };
        return Some(format!("[{who} {}] {text}", value["pid"]));
    }
    let level = value["level"].as_str().unwrap_or_default();
    if value.get("event").is_none() && level == "info" {
        return None;
    }
    let mut fields = value.clone();
    if let Some(object) = fields.as_object_mut() {
        object.remove("ts");
        object.remove("level");
    }
    Some(format!("{level}: {fields}"))
}

/// Every way the results differ from what the lists say.
fn problems(runs: &[FileRun]) -> Vec<String> {
    let mut problems = Vec::new();
    for run in runs.iter().filter(|r| unexpected(r)) {
        match by_design(run.file) {
            Some(_) => problems.push(format!("{} passes now: take it off BY_DESIGN", run.file)),
            None => problems.push(format!("{}: {}", run.file, why(&run.outcome))),
        }
    }
    let listed: BTreeSet<&str> = FILES.iter().copied().collect();
    for (file, _) in BY_DESIGN.iter().chain(EITHER) {
        if !listed.contains(file) {
            problems.push(format!("{file} is in BY_DESIGN or EITHER but not in FILES"));
        }
    }
    problems
}

fn why(outcome: &Outcome) -> String {
    match outcome {
        Outcome::Failed(why) => why.clone(),
        Outcome::TimedOut(timeout) => format!("did not finish within {timeout:?}"),
        Outcome::Skipped(reason) => reason.clone(),
        Outcome::Passed => "the primary and cluster-lb exited 0".to_string(),
    }
}
