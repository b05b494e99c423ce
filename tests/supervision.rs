//! Worker lifecycle: readiness, event order, restarts with backoff, graceful and forced stop,
//! privilege drop, and hostile IPC.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    thread,
    time::{Duration, Instant},
};

use cluster_lb_tests::{distribution, example, get, root_test, signal, workspace_binary, Cluster};
use nix::sys::signal::Signal;
use serde_json::Value;

const ADDR: &str = "127.0.0.1:8080";

fn addr() -> SocketAddr {
    ADDR.parse().expect("test address")
}

fn handshake_server() -> String {
    workspace_binary("handshake-server").display().to_string()
}

/// JSON log lines that are primary events.
fn events(log: &[String]) -> Vec<Value> {
    log.iter()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .filter(|value| value.get("event").is_some())
        .collect()
}

#[test]
fn a_handshake_worker_is_ready_only_after_listening_and_events_come_in_order() {
    root_test("handshake_ready_and_order", || {
        let server = handshake_server();
        let cluster = Cluster::start_with(
            &[
                "run",
                "-w",
                "2",
                "--ready-delay",
                "1",
                "--log-format",
                "json",
                "--",
                &server,
                ADDR,
            ],
            |command| {
                command.env("WARMUP_MS", "2500");
            },
        );
        // A worker that said `online` waits for `listening`, even once --ready-delay is past
        // (1.2 s after `online`, which came after the fork).
        cluster.wait_count("\"event\":\"online\"", 2);
        thread::sleep(Duration::from_millis(1200));
        assert_eq!(
            cluster
                .log()
                .iter()
                .filter(|l| l.contains("\"event\":\"ready\""))
                .count(),
            0,
            "ready before listening"
        );
        cluster.wait_count("\"event\":\"ready\"", 2);
        let seen = distribution(addr(), 20);
        assert_eq!(seen.values().copied().collect::<Vec<_>>(), vec![10, 10]);

        let (status, log) = cluster.stop();
        assert!(status.success());
        let mut order: BTreeMap<i64, Vec<String>> = BTreeMap::new();
        for event in events(&log) {
            let pid = event["pid"].as_i64().expect("pid");
            order
                .entry(pid)
                .or_default()
                .push(event["event"].as_str().unwrap_or("").into());
        }
        assert_eq!(order.len(), 2, "{order:?}");
        for (pid, names) in order {
            assert_eq!(
                names,
                ["fork", "online", "listening", "ready", "disconnect", "exit"],
                "events of pid {pid}"
            );
        }
        let all = events(&log);
        let mut ready = all.iter().filter(|e| e["event"] == "ready");
        assert!(ready.all(|e| e["reason"] == "listening"), "{all:?}");
    });
}

#[test]
fn programs_that_say_ready_1_are_ready_by_notify_socket() {
    root_test("notify_ready", || {
        let cluster = Cluster::start(&[
            "run",
            "-w",
            "2",
            "--ready-delay",
            "30",
            "--listen",
            ADDR,
            "--",
            "python3",
            &example("python/server.py"),
        ]);
        cluster.wait_count("ready (READY=1)", 2);
        assert_eq!(distribution(addr(), 10).len(), 2);
        let (status, _) = cluster.stop();
        assert!(status.success());
    });
}

#[test]
fn sigkill_of_a_worker_loses_no_connection_in_2000() {
    root_test("sigkill_under_load", || {
        let cluster = Cluster::serving(4, ADDR, &["python3", &example("python/server.py")]);
        let done = Arc::new(AtomicUsize::new(0));
        let client = {
            let done = Arc::clone(&done);
            thread::spawn(move || {
                let mut failures = Vec::new();
                for i in 0..2000 {
                    if let Err(e) = get(addr()) {
                        failures.push(format!("request {i}: {e:#}"));
                    }
                    done.fetch_add(1, Ordering::Relaxed);
                }
                failures
            })
        };
        while done.load(Ordering::Relaxed) < 500 {
            thread::sleep(Duration::from_millis(5));
        }
        let victim = get(addr()).expect("a request");
        signal(victim.pid, Signal::SIGKILL);
        let failures = client.join().expect("client thread");
        assert!(
            failures.is_empty(),
            "{} failed: {failures:#?}",
            failures.len()
        );
        cluster.wait_for_log(
            &format!("(pid {}) was killed by SIGKILL", victim.pid),
            Duration::from_secs(5),
        );
        cluster.wait_count(") ready (", 5);
        let (status, _) = cluster.stop();
        assert!(status.success());
    });
}

#[test]
fn a_program_that_exits_at_once_is_restarted_with_growing_delays() {
    root_test("crash_backoff", || {
        let cluster = Cluster::start(&[
            "run", "-w", "1", "--listen", ADDR, "--", "sh", "-c", "exit 3",
        ]);
        let line = cluster.wait_for_log("crash-looping", Duration::from_secs(15));
        assert!(
            line.contains("exited with status 3, 5 times in a row"),
            "{line}"
        );
        let delays: Vec<f64> = cluster
            .log()
            .iter()
            .filter_map(|l| l.split("restarting worker 0 in ").nth(1))
            .filter_map(|rest| rest.trim_end_matches('s').parse().ok())
            .collect();
        assert!(delays.len() >= 5, "{delays:?}");
        assert!(
            delays.windows(2).all(|pair| pair[1] > pair[0]),
            "growing: {delays:?}"
        );
        assert_eq!(&delays[..3], &[0.1, 0.2, 0.4]);
        let exits = cluster
            .log()
            .iter()
            .filter(|l| l.contains("exited with status 3"))
            .count();
        assert!(exits >= 5, "{exits} exits");
        let (status, _) = cluster.stop();
        assert!(status.success());
    });
}

#[test]
fn a_worker_that_ignores_term_is_killed_after_grace() {
    root_test("grace_then_kill", || {
        let stubborn = "import signal, sys, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\nsys.stdout.write('stubborn serving\\n'); sys.stdout.flush()\ntime.sleep(300)";
        let mut cluster = Cluster::start(&[
            "run",
            "-w",
            "1",
            "--grace",
            "1",
            "--ready-delay",
            "0",
            "--listen",
            ADDR,
            "--",
            "python3",
            "-c",
            stubborn,
        ]);
        cluster.wait_serving(1);
        let stop_sent = Instant::now();
        signal(cluster.pid(), Signal::SIGTERM);
        let status = cluster.wait(Duration::from_secs(10));
        let took = stop_sent.elapsed();
        assert!(status.success(), "{status}");
        assert!(
            took >= Duration::from_millis(900),
            "killed before the grace period: {took:?}"
        );
        cluster.wait_for_log("grace period of 1s is over", Duration::from_secs(1));
        cluster.wait_for_log("was killed by SIGKILL", Duration::from_secs(1));
    });
}

#[test]
fn quit_stops_at_once() {
    root_test("quit_fast", || {
        let mut cluster = Cluster::serving(2, ADDR, &["python3", &example("python/server.py")]);
        signal(cluster.pid(), Signal::SIGQUIT);
        let status = cluster.wait(Duration::from_secs(5));
        assert!(status.success());
        cluster.wait_count("was killed by SIGKILL", 2);
    });
}

#[test]
fn user_nobody_workers_run_as_uid_65534() {
    root_test("user_nobody", || {
        // Somewhere nobody can read: the checkout may live in root's home.
        let dir = std::env::temp_dir().join(format!("clb-nobody-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let server = dir.join("server.py");
        std::fs::copy(example("python/server.py"), &server).expect("copy server");
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        let server = server.display().to_string();
        // Debian's interpreter: a per-user one (pyenv under /root) is out of nobody's reach.
        let cluster = Cluster::start(&[
            "run",
            "-w",
            "2",
            "--user",
            "nobody",
            "--listen",
            ADDR,
            "--",
            "/usr/bin/python3",
            &server,
        ]);
        cluster.wait_serving(2);
        let answer = get(addr()).expect("request");
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", answer.pid)).expect("proc status");
        let uid_line = status
            .lines()
            .find(|l| l.starts_with("Uid:"))
            .expect("Uid line");
        assert_eq!(
            uid_line.split_whitespace().skip(1).collect::<Vec<_>>(),
            ["65534"; 4],
            "{uid_line}"
        );
        let nnp = status
            .lines()
            .find(|l| l.starts_with("NoNewPrivs:"))
            .expect("NoNewPrivs");
        assert!(nnp.ends_with('1'), "{nnp}");
        assert!(!cluster
            .log()
            .iter()
            .any(|l| l.contains("workers will run as root")));
        let (status, _) = cluster.stop();
        assert!(status.success());
        let _ = std::fs::remove_dir_all(&dir);
    });
}

fn hostile(mode: &'static str) {
    let script = format!("{}/workers/hostile.py", env!("CARGO_MANIFEST_DIR"));
    let cluster = Cluster::start(&[
        "run", "-w", "3", "--listen", ADDR, "--", "python3", &script, mode,
    ]);
    let line = cluster.wait_for_log("broke the IPC protocol", Duration::from_secs(10));
    assert!(line.contains("worker 0"), "{line}");
    cluster.wait_count(") ready (READY=1)", 2);
    let before: Vec<u32> = cluster_pids(&cluster);
    let seen = distribution(addr(), 200);
    assert_eq!(seen.values().sum::<usize>(), 200);
    assert!(
        !seen.contains_key(&0),
        "the hostile worker got connections: {seen:?}"
    );
    assert_eq!(
        before,
        cluster_pids(&cluster),
        "the other workers kept running"
    );
    let (status, _) = cluster.stop();
    assert!(status.success());
}

fn cluster_pids(cluster: &Cluster) -> Vec<u32> {
    let mut pids: Vec<u32> = cluster
        .log()
        .iter()
        .filter(|l| l.contains("ready (READY=1)"))
        .filter_map(|l| l.split("(pid ").nth(1)?.split(')').next()?.parse().ok())
        .collect();
    pids.sort_unstable();
    pids
}

#[test]
fn garbage_on_ipc_leaves_the_primary_and_other_workers_serving() {
    root_test("ipc_garbage", || hostile("garbage"));
}

#[test]
fn oversized_ipc_messages_disconnect_only_their_sender() {
    root_test("ipc_oversized", || hostile("oversized"));
}

#[test]
fn out_of_order_ipc_messages_disconnect_only_their_sender() {
    root_test("ipc_out_of_order", || hostile("out-of-order"));
}

#[test]
fn a_wrong_protocol_version_disconnects_only_its_sender() {
    root_test("ipc_wrong_version", || hostile("wrong-version"));
}

#[test]
fn the_python_ipc_client_gets_its_socket_by_query_server() {
    root_test("python_ipc_client", || {
        let cluster = Cluster::start(&[
            "run",
            "-w",
            "2",
            "--",
            "python3",
            &example("python/ipc_server.py"),
            ADDR,
        ]);
        cluster.wait_serving(2);
        cluster.wait_count("ready (listening)", 2);
        let seen = distribution(addr(), 20);
        assert_eq!(seen.values().copied().collect::<Vec<_>>(), vec![10, 10]);
        let (status, log) = cluster.stop();
        assert!(status.success());
        assert_eq!(
            log.iter()
                .filter(|l| l.contains("exited with status 0"))
                .count(),
            2,
            "graceful via disconnect"
        );
    });
}

#[test]
fn a_program_can_be_its_own_primary() {
    root_test("embedded_primary", || {
        let program = workspace_binary("embedded-cluster").display().to_string();
        let mut command = std::process::Command::new(&program);
        command.arg(ADDR);
        let cluster = Cluster::start_command(command);
        cluster.wait_count("primary got from worker", 2);
        let seen = distribution(addr(), 10);
        assert_eq!(seen.len(), 2);
        let (status, log) = cluster.stop();
        assert!(status.success());
        assert!(log.iter().any(|l| l.contains("primary saw: exit")));
    });
}

#[test]
fn orphans_of_workers_are_reaped_not_left_as_zombies() {
    root_test("orphans_reaped", || {
        // The shell leaves a short-lived grandchild behind and becomes the server: the
        // grandchild is re-parented to the primary (a subreaper, as PID 1 in a container).
        let script = format!("(sleep 1 &); exec python3 {}", example("python/server.py"));
        let cluster = Cluster::serving(1, ADDR, &["sh", "-c", &script]);
        let primary = cluster.pid();
        let children = || {
            std::fs::read_to_string(format!("/proc/{primary}/task/{primary}/children"))
                .expect("children of the primary")
        };
        assert_eq!(
            children().split_whitespace().count(),
            2,
            "the orphaned sleep was re-parented to the primary"
        );
        thread::sleep(Duration::from_millis(1200));
        let children = children();
        for child in children.split_whitespace() {
            let stat = std::fs::read_to_string(format!("/proc/{child}/stat")).unwrap_or_default();
            let state = stat
                .rsplit(')')
                .next()
                .and_then(|rest| rest.split_whitespace().next());
            assert_ne!(state, Some("Z"), "zombie child {child}: {stat}");
        }
        assert_eq!(
            children.split_whitespace().count(),
            1,
            "only the worker is left: {children}"
        );
        let (status, _) = cluster.stop();
        assert!(status.success());
    });
}
