//! Worker lifecycle: readiness, event order, restarts with backoff, graceful and forced stop,
//! privilege drop, hostile IPC, and what an embedded supervisor does to its process. Every
//! assertion reads state: `status` over the control socket, and the primary's JSON events.

use std::{
    collections::BTreeMap,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    thread,
    time::{Duration, Instant},
};

use cluster_lb::{
    control::{request, Request},
    supervisor::{Config, Event, SignalPolicy, Supervisor},
    worker::ListenAddr,
};
use cluster_lb_tests::{
    addr, distribution, example, get, pid_of, root_test, signal, workspace_binary, Cluster,
    WorkerState, ADDR,
};
use nix::sys::signal::Signal;
use serde_json::Value;

fn handshake_server() -> String {
    workspace_binary("handshake-server").display().to_string()
}

fn test_worker(name: &str) -> String {
    format!("{}/workers/{name}", env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn a_handshake_worker_is_ready_only_after_listening_and_events_come_in_order() {
    root_test("handshake_ready_and_order", || {
        let server = handshake_server();
        let cluster = Cluster::start_with(
            &["run", "-w", "2", "--ready-delay", "1", "--", &server, ADDR],
            |command| {
                command.env("WARMUP_MS", "2500");
            },
        );
        // A worker that said `online` waits for `listening`, even once --ready-delay is past
        // (1.2 s after `online`, which came after the fork).
        cluster.wait_for_events("online", 2, Duration::from_secs(10));
        thread::sleep(Duration::from_millis(1200));
        assert!(
            cluster.events_named("ready").is_empty(),
            "ready before listening"
        );
        assert!(cluster
            .status()
            .workers
            .iter()
            .all(|w| w.state == WorkerState::Online));
        cluster.wait_until_ready(2);
        let seen = distribution(addr(), 20);
        assert_eq!(seen.values().copied().collect::<Vec<_>>(), vec![10, 10]);

        let stopped = cluster.stop();
        assert!(stopped.status.success());
        let mut order: BTreeMap<i64, Vec<String>> = BTreeMap::new();
        let events = stopped.events();
        for event in events.iter().filter(|e| e.get("pid").is_some()) {
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
        let ready: Vec<&Value> = events.iter().filter(|e| e["event"] == "ready").collect();
        assert!(
            ready.iter().all(|e| e["reason"] == "listening"),
            "{ready:?}"
        );
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
            "--ready-timeout",
            "60",
            "--listen",
            ADDR,
            "--",
            "python3",
            &example("python/server.py"),
        ]);
        cluster.wait_until_ready(2);
        let ready = cluster.events_named("ready");
        assert!(ready.iter().all(|e| e["reason"] == "READY=1"), "{ready:?}");
        assert_eq!(distribution(addr(), 10).len(), 2);
        assert!(cluster.stop().status.success());
    });
}

/// 2000 sequential requests while one of 4 workers is SIGKILLed: the kernel never hands a new
/// connection to the dead worker, so at most the one request it had accepted and was serving
/// when the signal landed fails (SIGKILL is delivered when the process next runs: under load it
/// may have accepted the client's next connection by then; no balancer can answer that one).
#[test]
fn sigkill_of_a_worker_under_load_fails_at_most_the_request_it_was_serving() {
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
            failures.len() <= 1
                && failures
                    .iter()
                    .all(|f| f.contains("reset by peer") || f.contains("reading the response")),
            "{} failed: {failures:#?}",
            failures.len()
        );
        let exit =
            cluster.wait_for_event("exit", Duration::from_secs(5), |e| e["pid"] == victim.pid);
        assert_eq!(exit["signal"], "SIGKILL");
        cluster.wait_until_ready(4);
        assert!(cluster.stop().status.success());
    });
}

#[test]
fn a_program_that_exits_at_once_is_restarted_with_growing_delays() {
    root_test("crash_backoff", || {
        let cluster = Cluster::start(&[
            "run", "-w", "1", "--listen", ADDR, "--", "sh", "-c", "exit 3",
        ]);
        let crash_loop = cluster.wait_for_event("crash-loop", Duration::from_secs(15), |_| true);
        assert_eq!(crash_loop["failures"], 5);
        assert_eq!(crash_loop["last"], "exited with status 3");
        // The crash-loop event comes just before the restart it schedules: wait for that one.
        let delays: Vec<f64> = cluster
            .wait_for_events("restart", 5, Duration::from_secs(5))
            .iter()
            .filter_map(|e| e["delay_s"].as_f64())
            .collect();
        assert!(delays.len() >= 5, "{delays:?}");
        assert!(
            delays.windows(2).all(|pair| pair[1] > pair[0]),
            "growing: {delays:?}"
        );
        assert_eq!(&delays[..3], &[0.1, 0.2, 0.4]);
        let exits = cluster.events_named("exit");
        assert!(
            exits.len() >= 5 && exits.iter().all(|e| e["code"] == 3),
            "{exits:?}"
        );
        assert!(cluster.stop().status.success());
    });
}

#[test]
fn a_worker_that_ignores_term_is_killed_after_grace() {
    root_test("grace_then_kill", || {
        // Ready (READY=1) only once it ignores TERM.
        let stubborn = "import os, signal, socket, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\na = os.environ['NOTIFY_SOCKET']\nsocket.socket(socket.AF_UNIX, socket.SOCK_DGRAM).sendto(b'READY=1', '\\0' + a[1:] if a[0] == '@' else a)\ntime.sleep(300)";
        let mut cluster = Cluster::start(&[
            "run",
            "-w",
            "1",
            "--grace",
            "1",
            "--ready-delay",
            "30",
            "--ready-timeout",
            "60",
            "--listen",
            ADDR,
            "--",
            "python3",
            "-c",
            stubborn,
        ]);
        cluster.wait_until_ready(1);
        let stop_sent = Instant::now();
        signal(cluster.pid(), Signal::SIGTERM);
        let status = cluster.wait_exit(Duration::from_secs(10));
        let took = stop_sent.elapsed();
        assert!(status.success(), "{status}");
        assert!(
            took >= Duration::from_millis(900),
            "killed before the grace period: {took:?}"
        );
        let kill = cluster.wait_for_event("kill", Duration::from_secs(1), |_| true);
        assert!(
            kill["reason"]
                .as_str()
                .is_some_and(|r| r.contains("grace period of 1s")),
            "{kill}"
        );
        let exit = cluster.wait_for_event("exit", Duration::from_secs(1), |_| true);
        assert_eq!(exit["signal"], "SIGKILL");
    });
}

#[test]
fn quit_stops_at_once() {
    root_test("quit_fast", || {
        let mut cluster = Cluster::serving(2, ADDR, &["python3", &example("python/server.py")]);
        signal(cluster.pid(), Signal::SIGQUIT);
        let status = cluster.wait_exit(Duration::from_secs(5));
        assert!(status.success());
        let exits = cluster.events_named("exit");
        assert_eq!(exits.len(), 2);
        assert!(exits.iter().all(|e| e["signal"] == "SIGKILL"), "{exits:?}");
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
        cluster.wait_until_ready(2);
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
        let stopped = cluster.stop();
        assert!(stopped.status.success());
        let warned = stopped
            .lines
            .iter()
            .any(|l| l.contains("\"level\":\"warn\"") && l.contains("as root"));
        assert!(!warned, "no warning about root workers with --user");
        let _ = std::fs::remove_dir_all(&dir);
    });
}

/// Worker 0 breaks the IPC protocol in the way `mode` names; workers 1 and 2 serve.
fn hostile(mode: &'static str) {
    let cluster = Cluster::start(&[
        "run",
        "-w",
        "3",
        "--listen",
        ADDR,
        "--",
        "python3",
        &test_worker("hostile.py"),
        mode,
    ]);
    let disconnect =
        cluster.wait_for_event("disconnect", Duration::from_secs(10), |e| e["worker"] == 0);
    assert_eq!(disconnect["failure"], true, "{disconnect}");
    assert!(
        disconnect["reason"]
            .as_str()
            .is_some_and(|r| r.starts_with("protocol violation")),
        "{disconnect}"
    );
    let others_ready = |status: &cluster_lb_tests::ClusterStatus| {
        status
            .workers
            .iter()
            .filter(|w| w.id != 0 && w.state == WorkerState::Ready)
            .count()
            == 2
    };
    let before = cluster.wait_until(
        "workers 1 and 2 ready",
        Duration::from_secs(10),
        others_ready,
    );
    let pids = |status: &cluster_lb_tests::ClusterStatus| -> Vec<i32> {
        let mut pids: Vec<i32> = status
            .workers
            .iter()
            .filter(|w| w.id != 0)
            .map(|w| w.pid)
            .collect();
        pids.sort_unstable();
        pids
    };
    let seen = distribution(addr(), 200);
    assert_eq!(seen.values().sum::<usize>(), 200);
    assert!(
        !seen.contains_key(&0),
        "the hostile worker got connections: {seen:?}"
    );
    assert_eq!(
        pids(&before),
        pids(&cluster.status()),
        "the other workers kept running"
    );
    assert!(cluster.stop().status.success());
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
        cluster.wait_until_ready(2);
        let ready = cluster.events_named("ready");
        assert!(
            ready.iter().all(|e| e["reason"] == "listening"),
            "{ready:?}"
        );
        let seen = distribution(addr(), 20);
        assert_eq!(seen.values().copied().collect::<Vec<_>>(), vec![10, 10]);
        let stopped = cluster.stop();
        assert!(stopped.status.success());
        let exits: Vec<Value> = stopped
            .events()
            .into_iter()
            .filter(|e| e["event"] == "exit")
            .collect();
        assert_eq!(exits.len(), 2);
        assert!(
            exits.iter().all(|e| e["code"] == 0),
            "graceful via disconnect: {exits:?}"
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
        cluster.wait_for_line("primary got from worker", Duration::from_secs(20));
        thread::sleep(Duration::from_millis(500));
        let seen = distribution(addr(), 10);
        assert_eq!(seen.len(), 2);
        let stopped = cluster.stop();
        assert!(stopped.status.success());
        assert!(stopped
            .lines
            .iter()
            .any(|l| l.contains("primary saw: exit")));
    });
}

/// The signals a process catches, from /proc/self/status (SigCgt, a hex mask by number - 1).
fn caught_signals() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    let mask = status
        .lines()
        .find_map(|l| l.strip_prefix("SigCgt:"))
        .expect("SigCgt");
    u64::from_str_radix(mask.trim(), 16).expect("hex mask")
}

/// A supervisor embedded in this very test process, told to leave signals to its embedder:
/// it installs no signal handler, does not make the process a subreaper, and does not reap a
/// child that is not one of its workers.
#[test]
fn an_embedded_supervisor_reaps_only_its_workers_and_leaves_signals_alone() {
    root_test("embedded_leaves_process_alone", || {
        let caught_before = caught_signals();
        let mut own_child = std::process::Command::new("sh")
            .args(["-c", "sleep 1; exit 4"])
            .spawn()
            .expect("a child of the embedder");
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        runtime.block_on(async {
            let mut config = Config::reexec_current(2).expect("config");
            config.command = vec!["python3".into(), example("python/server.py")];
            config.listen = vec![ADDR.parse::<ListenAddr>().expect("address")];
            config.signals = SignalPolicy::Leave;
            let mut supervisor = Supervisor::new(config).expect("supervisor");
            let handle = supervisor.handle();
            let mut events = supervisor.subscribe();
            let check = async move {
                let mut ready = 0;
                while ready < 2 {
                    if let Some(Event::Ready { .. }) = events.recv().await {
                        ready += 1;
                    }
                }
                assert_eq!(
                    caught_signals(),
                    caught_before,
                    "no signal handler installed"
                );
                let mut subreaper: libc::c_int = -1;
                // SAFETY: plain prctl reading into a local.
                unsafe { libc::prctl(libc::PR_GET_CHILD_SUBREAPER, &mut subreaper) };
                assert_eq!(subreaper, 0, "not made a subreaper");
                let status = tokio::task::spawn_blocking(move || own_child.wait())
                    .await
                    .expect("join")
                    .expect("the embedder's own child is still the embedder's to wait for");
                assert_eq!(status.code(), Some(4));
                let answer = tokio::task::spawn_blocking(|| get(addr()))
                    .await
                    .expect("join");
                assert!(answer.is_ok(), "{answer:?}");
                handle.stop();
                // Until the supervisor is done and drops its end.
                while events.recv().await.is_some() {}
            };
            tokio::join!(supervisor.run(), check);
        });
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
        assert!(cluster.stop().status.success());
    });
}

/// Issue 10's report, played for real: during a reload, the old worker 0 is SIGKILLed while its
/// replacement starts, and the replacement never gets ready. Worker 0 used to be gone for good.
#[test]
fn a_reload_that_loses_both_old_and_new_worker_0_still_ends_with_two_ready_workers() {
    root_test("reload_loses_worker_0", || {
        let marker = std::env::temp_dir().join(format!("clb-hang-{}", std::process::id()));
        let _ = std::fs::remove_file(marker.with_extension("taken"));
        let cluster = Cluster::start_with(
            &[
                "run",
                "-w",
                "2",
                "--ready-delay",
                "30",
                "--ready-timeout",
                "2",
                "--listen",
                ADDR,
                "--",
                "python3",
                &test_worker("hangs_once.py"),
            ],
            |command| {
                command.env("HANG_MARKER", &marker);
            },
        );
        let before = cluster.wait_until_ready(2);
        let old_0 = pid_of(&before, 0);
        std::fs::write(&marker, b"hang").expect("marker");
        let control = cluster.control().to_path_buf();
        let reload =
            thread::spawn(move || request(&control, &Request::Reload, Duration::from_secs(60)));
        // The replacement of worker 0 is the third process started.
        cluster.wait_for_events("fork", 3, Duration::from_secs(10));
        signal(old_0 as u32, Signal::SIGKILL);
        let refused = reload
            .join()
            .expect("reload thread")
            .expect_err("reload aborted");
        assert!(
            refused.to_string().contains("was not ready within 2s"),
            "{refused}"
        );
        let after = cluster.wait_until_ready(2);
        assert_eq!(after.desired, 2);
        let mut ids: Vec<u32> = after.workers.iter().map(|w| w.id).collect();
        ids.sort_unstable();
        assert_eq!(ids, [0, 1]);
        assert!(after.workers.iter().all(|w| w.pid != old_0));
        assert_eq!(distribution(addr(), 20).len(), 2);
        assert!(cluster.stop().status.success());
        let _ = std::fs::remove_file(marker.with_extension("taken"));
    });
}

/// `--drain-delay`: a worker leaving (here, scaled down) is out of rotation at once, but asked
/// to stop (SIGTERM for examples/python/server.py, which then exits) only after the delay.
#[test]
fn a_drain_delay_holds_the_stop_back_while_the_worker_is_out_of_rotation() {
    root_test("drain_delay", || {
        let server = example("python/server.py");
        let cluster = Cluster::start(&[
            "run",
            "-w",
            "2",
            "--drain-delay",
            "2",
            "--listen",
            ADDR,
            "--",
            "python3",
            &server,
        ]);
        cluster.wait_until_ready(2);
        let started = Instant::now();
        request(
            cluster.control(),
            &Request::Scale { workers: 1 },
            Duration::from_secs(10),
        )
        .expect("scale");
        cluster.wait_for_events("disconnect", 1, Duration::from_secs(5));
        let left = started.elapsed();
        let status = cluster.status();
        let draining: Vec<_> = status
            .workers
            .iter()
            .filter(|w| w.state == WorkerState::Draining)
            .collect();
        assert_eq!(draining.len(), 1, "{status:?}");
        // Out of rotation: the one worker left answers everything.
        let seen = distribution(addr(), 20);
        assert_eq!(seen.len(), 1, "{seen:?}");
        cluster.wait_for_events("exit", 1, Duration::from_secs(15));
        let exited = started.elapsed();
        eprintln!("drain delay 2 s: out of rotation after {left:?}, exited after {exited:?}");
        assert!(
            left < Duration::from_secs(2),
            "left rotation after {left:?}"
        );
        assert!(
            exited >= Duration::from_secs(2),
            "stopped before the drain delay: {exited:?}"
        );
        assert!(cluster.stop().status.success());
    });
}
