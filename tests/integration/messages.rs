//! Messages to and between workers: `cluster-lb send` to one worker id or to all, for Rust
//! (cluster-lb-worker), Python (examples/python/cluster_lb_ipc.py) and Node workers; Rust and
//! Python workers reaching each other through the primary with addressed messages (`to`); and
//! the bound on what a worker that floods others makes the primary hold. The workers answer
//! what they get with a message to the primary, which the tests read as `message` events.

use std::{collections::BTreeSet, process::Command, time::Duration};

use cluster_lb::{
    control::{request, Reply, Request},
    supervisor::Recipients,
};
use cluster_lb_tests::{
    example, node_binaries, root_test, workspace_binary, Cluster, WorkerState, ADDR,
};
use serde_json::{json, Value};

const WAIT: Duration = Duration::from_secs(20);

/// `cluster-lb run ARGS` with the `message` events (debug level) in its log.
fn start(args: &[&str], adjust: impl FnOnce(&mut Command)) -> Cluster {
    Cluster::start_with(args, |command| {
        command.env("CLUSTER_LB_LOG", "debug");
        adjust(command);
    })
}

/// `cluster-lb send --control PATH ARGS...`: its exit code, stdout, and stderr lines.
fn send(cluster: &Cluster, args: &[&str]) -> (Option<i32>, String, Vec<String>) {
    let mut command = Command::new(workspace_binary("cluster-lb"));
    command
        .arg("send")
        .arg("--control")
        .arg(cluster.control())
        .args(args);
    cluster_lb_tests::run_to_end(command)
}

/// `cluster-lb send` that must succeed.
fn sent(cluster: &Cluster, args: &[&str]) {
    let (code, out, err) = send(cluster, args);
    assert_eq!(code, Some(0), "send {args:?}: {out} {err:?}");
}

/// The ids of the workers whose `message` events so far carry `field` equal to `value`, with
/// the rest of their data.
fn answers(cluster: &Cluster, field: &str, value: &Value) -> Vec<(u64, Value)> {
    cluster
        .events_named("message")
        .into_iter()
        .filter(|e| &e["data"][field] == value)
        .map(|e| (e["worker"].as_u64().unwrap_or(u64::MAX), e["data"].clone()))
        .collect()
}

/// Waits until the workers in `ids` (and only they, each once) answered with `field` = `value`.
fn wait_for_answers(cluster: &Cluster, field: &str, value: &Value, ids: &BTreeSet<u64>) {
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let seen: Vec<u64> = answers(cluster, field, value)
            .into_iter()
            .map(|(id, _)| id)
            .collect();
        if seen.iter().copied().collect::<BTreeSet<_>>() == *ids {
            assert_eq!(seen.len(), ids.len(), "each answered once: {seen:?}");
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{field} = {value}: answers from {seen:?}, wanted {ids:?}; output:\n{}",
            cluster.lines().join("\n")
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `send --worker ID` reaches every process of that id and no other, `send --all` every
/// worker, a control request says how many got it; an id that does not exist and a message
/// that is not JSON are refused in one line. Each worker answers {"echo": MESSAGE}.
fn one_and_all(cluster: &Cluster, what: &str) {
    let status = cluster.wait_until_ready(3);
    let ids: BTreeSet<u64> = status.workers.iter().map(|w| u64::from(w.id)).collect();
    let one = *ids.iter().nth(1).expect("three workers");

    sent(cluster, &["--worker", &one.to_string(), r#"{"n":1}"#]);
    sent(cluster, &["--all", r#"{"n":2}"#]);
    // A channel keeps its order both ways: once a worker echoed n=2, an echo of n=1 from it
    // would have come first.
    wait_for_answers(cluster, "echo", &json!({"n": 2}), &ids);
    let ones: Vec<u64> = answers(cluster, "echo", &json!({"n": 1}))
        .into_iter()
        .map(|(id, _)| id)
        .collect();
    assert_eq!(
        ones,
        [one],
        "{what}: only worker {one} got the first message"
    );

    let reply = request(
        cluster.control(),
        &Request::Send {
            to: Recipients::All,
            data: json!({"n": 3}),
        },
        WAIT,
    );
    assert!(
        matches!(reply, Ok(Reply::Sent { workers: 3 })),
        "{what}: {reply:?}"
    );
    wait_for_answers(cluster, "echo", &json!({"n": 3}), &ids);

    let (code, _, err) = send(cluster, &["--worker", "7", "{}"]);
    assert_eq!(code, Some(1), "{what}: {err:?}");
    assert!(
        err.len() == 1 && err[0].contains("no worker 7"),
        "{what}: {err:?}"
    );
    let (code, _, err) = send(cluster, &["--all", "{n: 1}"]);
    assert_eq!(code, Some(2), "{what}: {err:?}");
    assert!(
        err.len() == 1 && err[0].contains("not JSON"),
        "{what}: {err:?}"
    );
    let status = cluster.status();
    assert!(
        status
            .workers
            .iter()
            .all(|w| w.state == WorkerState::Ready && w.restarts == 0),
        "{what}: {status:?}"
    );
}

#[test]
fn send_reaches_one_rust_worker_or_all() {
    root_test("send_rust", || {
        let server = workspace_binary("handshake-server").display().to_string();
        let cluster = start(&["run", "-w", "3", "--", &server, ADDR], |_| {});
        one_and_all(&cluster, "Rust");
        assert!(cluster.stop().status.success());
    });
}

#[test]
fn send_reaches_one_python_worker_or_all() {
    root_test("send_python", || {
        let server = example("python/ipc_server.py");
        let cluster = start(&["run", "-w", "3", "--", "python3", &server, ADDR], |_| {});
        one_and_all(&cluster, "Python");
        assert!(cluster.stop().status.success());
    });
}

#[test]
fn send_reaches_one_node_worker_or_all_and_refuses_what_node_would_take_for_its_own() {
    root_test("send_node", || {
        let app = format!("{}/node/echo-app.js", env!("CARGO_MANIFEST_DIR"));
        for (major, node) in node_binaries() {
            eprintln!("---- Node {major}");
            let node = node.display().to_string();
            let cluster = start(&["run", "-w", "3", "--", &node, &app], |command| {
                command.env("PORT", "3000");
            });
            one_and_all(&cluster, &format!("Node {major}"));
            let (code, _, err) = send(
                &cluster,
                &["--all", r#"{"cmd":"NODE_CLUSTER","act":"disconnect"}"#],
            );
            assert_eq!(code, Some(1), "Node {major}: {err:?}");
            assert!(
                err.len() == 1 && err[0].contains("NODE_"),
                "Node {major}: {err:?}"
            );
            let status = cluster.wait_until_ready(3);
            assert!(status.workers.iter().all(|w| w.restarts == 0), "{status:?}");
            assert!(cluster.events_named("disconnect").is_empty());
            assert!(cluster.stop().status.success(), "Node {major}");
        }
    });
}

/// Workers 0 and 2 are Rust (handshake-server), 1 and 3 Python (ipc_server.py). Told by
/// `send` to forward a message `to` others, one worker, or all, each sends it through the
/// primary; every worker that gets it tells the primary {"heard": MESSAGE, "from": SENDER}.
#[test]
fn rust_and_python_workers_reach_each_other_through_the_primary() {
    root_test("relay_rust_python", || {
        let rust = workspace_binary("handshake-server").display().to_string();
        let python = example("python/ipc_server.py");
        let script = r#"case "$CLUSTER_LB_WORKER_ID" in 0|2) exec "$1" "$3";; *) exec python3 "$2" "$3";; esac"#;
        let cluster = start(
            &[
                "run", "-w", "4", "--", "sh", "-c", script, "worker", &rust, &python, ADDR,
            ],
            |_| {},
        );
        cluster.wait_until_ready(4);
        let forward = |sender: u32, to: Value, ping: &str| {
            let message = json!({"forward": {"ping": ping}, "to": to}).to_string();
            sent(&cluster, &["--worker", &sender.to_string(), &message]);
        };
        let heard = |ping: &str, from: u32, ids: &[u64]| {
            let ids: BTreeSet<u64> = ids.iter().copied().collect();
            wait_for_answers(&cluster, "heard", &json!({"ping": ping}), &ids);
            for (id, data) in answers(&cluster, "heard", &json!({"ping": ping})) {
                assert_eq!(data["from"], from, "worker {id} heard {ping} from {from}");
            }
        };
        forward(0, json!("others"), "rust to others");
        heard("rust to others", 0, &[1, 2, 3]);
        forward(1, json!(0), "python to rust 0");
        heard("python to rust 0", 1, &[0]);
        forward(2, json!(3), "rust to python 3");
        heard("rust to python 3", 2, &[3]);
        forward(3, json!("all"), "python to all");
        heard("python to all", 3, &[0, 1, 2, 3]);
        // Each channel keeps its order: the last relay reached every worker, so the earlier
        // ones reached exactly those they were for (checked again, now complete).
        heard("rust to others", 0, &[1, 2, 3]);
        heard("python to rust 0", 1, &[0]);
        heard("rust to python 3", 2, &[3]);

        // A worker addressed by the wrong kind of `to` is told so by its own client (Python
        // refuses it before sending; nothing reaches the primary).
        forward(1, json!("everyone"), "nowhere");
        let refused = cluster.wait_for_event("message", WAIT, |e| {
            e["worker"] == 1 && e["data"]["error"].is_string()
        });
        assert!(
            answers(&cluster, "heard", &json!({"ping": "nowhere"})).is_empty(),
            "{refused}"
        );
        let status = cluster.status();
        assert!(
            status
                .workers
                .iter()
                .all(|w| w.state == WorkerState::Ready && w.restarts == 0),
            "{status:?}"
        );
        assert!(cluster.stop().status.success());
    });
}

/// Worker 0 sends 2000 messages of 60 KB (120 MB, 240 MB for its two recipients) to the
/// others as fast as it can; they never read their channels. The primary relays what fits
/// their socket buffers and drops the rest: it never holds more than a few messages, the
/// flooder is held back by its own budget, and the cluster stays manageable meanwhile.
#[test]
fn a_worker_flooding_others_that_do_not_read_costs_the_primary_no_memory() {
    root_test("relay_flood", || {
        let flood = format!("{}/workers/relay_flood.py", env!("CARGO_MANIFEST_DIR"));
        let cluster = start(
            &[
                "run", "-w", "3", "--grace", "2", "--", "python3", &flood, "2000",
            ],
            |_| {},
        );
        cluster.wait_until_ready(3);
        // The flood has begun (worker 0 floods once it listens): the primary still answers.
        assert_eq!(cluster.status().workers.len(), 3);
        cluster.wait_for_event("message", Duration::from_secs(120), |e| {
            e["worker"] == 0 && e["data"]["flooded"] == 2000
        });
        let peak = peak_memory_kib(cluster.pid());
        eprintln!("the primary's peak resident memory: {peak} KiB");
        assert!(
            peak < 100 * 1024,
            "the primary's peak resident memory was {peak} KiB while relaying 120 MB"
        );
        let status = cluster.status();
        assert!(
            status.workers.iter().all(|w| w.state == WorkerState::Ready),
            "{status:?}"
        );
        assert!(cluster.stop().status.success());
    });
}

/// The peak resident memory of process `pid` (VmHWM), in KiB.
fn peak_memory_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|e| panic!("/proc/{pid}/status: {e}"));
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmHWM:"))
        .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no VmHWM in /proc/{pid}/status"))
}
