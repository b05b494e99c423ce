//! A Node program's primary branch, run by cluster-lb (issue 19): the program's own
//! `cluster.fork()`, `worker.send()`, `cluster.on('message')` and every cluster event, backed by
//! cluster-lb's workers, with real npm packages that depend on them (Socket.IO's cluster
//! adapter, prom-client's cluster metrics). Each test runs in its own network namespace.

use std::{
    collections::BTreeSet,
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    process::Command,
    thread,
    time::{Duration, Instant},
};

use cluster_lb_tests::{
    node_binaries, node_modules, root_test, signal, Cluster, ClusterStatus, RequestLoop,
    WorkerState,
};
use nix::sys::signal::Signal;
use serde_json::Value;

const PORT: u16 = 3000;
/// The port of the primary's own server (prom-client's metrics, cluster.workers).
const PRIMARY_PORT: u16 = 3001;

fn app(name: &str) -> String {
    format!("{}/node/primary/{name}", env!("CARGO_MANIFEST_DIR"))
}

fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// Node 20's binary (the tests that do not need every major).
fn node20() -> String {
    node_binaries()
        .into_iter()
        .find(|(major, _)| *major == 20)
        .map(|(_, path)| path.display().to_string())
        .expect("Node 20 is fetched by cargo xtask test")
}

/// Runs `body` for every Node major, one after the other, in one network namespace.
fn each_node(test: &str, body: impl Fn(u32, &str) + Send + 'static) {
    root_test(test, move || {
        for (major, node) in node_binaries() {
            eprintln!("---- Node {major}");
            body(major, &node.display().to_string());
        }
    });
}

/// `cluster-lb run OPTIONS -- NODE APP`, with the ports, 2 workers and NODE_PATH set.
fn start(options: &[&str], node: &str, app_name: &str, env: &[(&str, &str)]) -> Cluster {
    let script = app(app_name);
    let mut all = vec!["run", "--log-format", "json"];
    all.extend_from_slice(options);
    all.extend(["--", node, &script]);
    Cluster::start_with(&all, |command| {
        command
            .env("PORT", PORT.to_string())
            .env("PRIMARY_PORT", PRIMARY_PORT.to_string())
            .env("WORKERS", "2")
            .env("NODE_PATH", node_modules());
        for (key, value) in env {
            command.env(key, value);
        }
    })
}

/// One HTTP/1.1 GET on a new connection; the body.
fn http_get(port: u16, path: &str) -> std::io::Result<String> {
    let mut stream = TcpStream::connect_timeout(&addr(port), Duration::from_secs(5))?;
    stream.set_read_timeout(Some(Duration::from_secs(20)))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response)?;
    let text = String::from_utf8_lossy(&response).into_owned();
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| std::io::Error::other(format!("no HTTP response: {text:?}")))?;
    if !head.contains(" 200 ") {
        return Err(std::io::Error::other(format!("not 200: {head}")));
    }
    // A chunked body (Express): the chunks' contents only.
    if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        return Ok(dechunk(body));
    }
    Ok(body.to_string())
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let Ok(size) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if size == 0 || rest.len() < size {
            break;
        }
        out.push_str(&rest[..size]);
        body = rest[size..].trim_start_matches("\r\n");
    }
    out
}

fn json_get(port: u16, path: &str) -> Value {
    let body = http_get(port, path).unwrap_or_else(|e| panic!("GET {path}: {e}"));
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("GET {path}: {e}: {body:?}"))
}

/// Waits until the program's primary runs and `count` workers are ready, all of them its.
fn wait_for_program(cluster: &Cluster, count: usize) -> ClusterStatus {
    cluster.wait_until(
        &format!("the program's primary and {count} ready workers"),
        Duration::from_secs(40),
        |status| {
            status.program_primary.is_some()
                && status.workers.len() == count
                && status.workers.iter().all(|w| w.state == WorkerState::Ready)
        },
    )
}

/// The primary's view: its cluster.workers, as (id, pid, state).
fn primary_workers() -> Vec<(u64, i64, String)> {
    let view = json_get(PRIMARY_PORT, "/");
    view["workers"]
        .as_array()
        .expect("workers")
        .iter()
        .map(|w| {
            (
                w["id"].as_u64().unwrap_or_default(),
                w["pid"].as_i64().unwrap_or_default(),
                w["state"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect()
}

/// Waits until the primary's cluster.workers is exactly the ready workers cluster-lb runs.
fn wait_for_whole_cluster_workers(cluster: &Cluster) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let status = cluster.status();
        let ours: BTreeSet<(u64, i64)> = status
            .workers
            .iter()
            .map(|w| (u64::from(w.id), i64::from(w.pid)))
            .collect();
        let theirs = http_get(PRIMARY_PORT, "/").ok().map(|_| primary_workers());
        if let Some(theirs) = &theirs {
            let seen: BTreeSet<(u64, i64)> = theirs.iter().map(|(i, p, _)| (*i, *p)).collect();
            if seen == ours && theirs.iter().all(|(_, _, state)| state == "listening") {
                return;
            }
        }
        assert!(
            Instant::now() < deadline,
            "the primary's cluster.workers {theirs:?} is not cluster-lb's {ours:?}"
        );
        thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn the_primary_branch_runs_with_fork_env_requests_broadcasts_and_10_mb_messages_both_ways() {
    each_node("node_primary_messages", |major, node| {
        let cluster = start(&["--node-primary", "on"], node, "messages.js", &[]);
        let status = wait_for_program(&cluster, 2);
        let ids: Vec<u32> = status.workers.iter().map(|w| w.id).collect();
        assert_eq!(
            ids,
            [1, 2],
            "Node {major}: workers numbered as cluster.worker.id"
        );
        wait_for_whole_cluster_workers(&cluster);
        // Round robin: two requests reach both workers.
        let mut seen = BTreeSet::new();
        for _ in 0..2 {
            let info = json_get(PORT, "/info");
            let id = info["id"].as_u64().expect("id");
            // fork({ ROLE }) per worker, and the configuration asked for before listen().
            assert_eq!(info["role"], format!("role-{id}"), "Node {major}: {info}");
            assert_eq!(info["config"]["greeting"], "hello from the primary");
            assert!(
                info["ticks"].as_u64() > Some(0),
                "Node {major}: no broadcast: {info}"
            );
            seen.insert(id);
        }
        assert_eq!(seen.len(), 2, "Node {major}: {seen:?}");
        for _ in 0..2 {
            let asked = json_get(PORT, "/ask");
            assert_eq!(
                asked["answer"].as_u64(),
                asked["n"].as_u64().map(|n| n * 2),
                "Node {major}: request/response after listen(): {asked}"
            );
        }
        let ten_mb = 10 * 1024 * 1024;
        let path = format!("/big-to-primary?size={ten_mb}");
        assert_eq!(
            http_get(PORT, &path).expect("to the primary"),
            ten_mb.to_string()
        );
        let path = format!("/big-from-primary?size={ten_mb}");
        assert_eq!(
            http_get(PORT, &path).expect("from the primary"),
            ten_mb.to_string()
        );
        // No payload in the log by default (the configuration was sent to every worker).
        assert!(
            !cluster
                .lines()
                .iter()
                .any(|l| l.contains("hello from the primary")),
            "Node {major}: a message payload was logged"
        );
        let stopped = cluster.stop();
        assert!(stopped.status.success(), "Node {major}");
    });
}

#[test]
fn the_primary_killed_with_sigkill_comes_back_whole_and_no_request_fails() {
    each_node("node_primary_sigkill", |major, node| {
        let cluster = start(&["--node-primary", "on"], node, "messages.js", &[]);
        let before = wait_for_program(&cluster, 2);
        wait_for_whole_cluster_workers(&cluster);
        let first = before.program_primary.as_ref().expect("a primary").pid;
        let load = RequestLoop::start(addr(PORT), 4);
        thread::sleep(Duration::from_millis(300));
        signal(first as u32, Signal::SIGKILL);
        let after = cluster.wait_until("a new primary", Duration::from_secs(20), |status| {
            status
                .program_primary
                .as_ref()
                .is_some_and(|p| p.pid != first)
        });
        // The workers served on, and the new primary took them all.
        wait_for_whole_cluster_workers(&cluster);
        thread::sleep(Duration::from_millis(300));
        let (answered, failures) = load.finish();
        assert!(failures.is_empty(), "Node {major}: {failures:?}");
        assert!(
            answered.values().sum::<u64>() > 20,
            "Node {major}: {answered:?}"
        );
        let pids = |s: &ClusterStatus| s.workers.iter().map(|w| w.pid).collect::<Vec<_>>();
        assert_eq!(
            pids(&after),
            pids(&before),
            "Node {major}: workers were replaced"
        );
        cluster.wait_for_event("primary-exit", Duration::from_secs(1), |e| {
            e["signal"] == "SIGKILL" && e["restart_s"].is_number()
        });
        assert!(cluster.stop().status.success(), "Node {major}");
    });
}

#[test]
fn an_exit_handler_that_reforks_keeps_the_count_under_10_sigkills() {
    root_test("node_primary_refork", || {
        let cluster = start(&["--node-primary", "on"], &node20(), "messages.js", &[]);
        wait_for_program(&cluster, 2);
        for round in 0..10 {
            let status = cluster.wait_until_ready(2);
            let victim = status.workers[round % 2].pid;
            signal(victim as u32, Signal::SIGKILL);
            cluster.wait_until("the victim replaced", Duration::from_secs(20), |s| {
                s.workers.len() == 2
                    && s.workers
                        .iter()
                        .all(|w| w.pid != victim && w.state == WorkerState::Ready)
            });
        }
        let status = cluster.wait_until_ready(2);
        assert_eq!(status.wanted_ids, [1, 2], "the count grew: {status:?}");
        // Its broadcast timer sent to every worker in cluster.workers throughout: none of them
        // was ever disconnected but not yet exited (worker.send() would have thrown).
        assert!(
            cluster.events_named("primary-exit").is_empty(),
            "the primary crashed"
        );
        wait_for_whole_cluster_workers(&cluster);
        assert!(cluster.stop().status.success());
    });
}

#[test]
fn a_worker_that_reads_is_primary_starts_the_primary_which_takes_the_running_workers() {
    root_test("node_primary_auto", || {
        // No --node-primary: cluster-lb learns of the branch from a worker's read.
        let cluster = start(&[], &node20(), "messages.js", &[]);
        cluster.wait_for_events("primary-started", 1, Duration::from_secs(20));
        // Its forks take workers with its env (new ones, since the first ones run without
        // ROLE); the first ones, not forked, leave once it settled.
        let status =
            cluster.wait_until("the program's workers only", Duration::from_secs(40), |s| {
                s.workers.len() == 2
                    && s.workers.iter().all(|w| w.state == WorkerState::Ready)
                    && s.wanted_ids.len() == 2
                    && s.program_primary.is_some()
            });
        wait_for_whole_cluster_workers(&cluster);
        for _ in 0..2 {
            let info = json_get(PORT, "/info");
            assert!(
                info["role"]
                    .as_str()
                    .is_some_and(|r| r.starts_with("role-")),
                "{info}"
            );
        }
        assert_eq!(status.workers.len(), 2);
        assert!(cluster.stop().status.success());
    });
}

#[test]
fn a_message_a_worker_sent_before_the_primary_took_it_reaches_the_primary() {
    root_test("node_primary_early_message", || {
        // No --node-primary: the workers start first, and each says hello at once; the
        // primary forks a second after it starts, taking the running workers.
        let cluster = start(&[], &node20(), "early-message.js", &[]);
        cluster.wait_for_events("primary-started", 1, Duration::from_secs(20));
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        let heard = loop {
            let heard = http_get(PRIMARY_PORT, "/")
                .ok()
                .and_then(|body| serde_json::from_str::<Value>(&body).ok())
                .and_then(|v| v.as_array().cloned())
                .unwrap_or_default();
            if heard.len() >= 2 || std::time::Instant::now() > deadline {
                break heard;
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        let mut ids: Vec<i64> = heard.iter().filter_map(|h| h["id"].as_i64()).collect();
        ids.sort_unstable();
        ids.dedup();
        assert_eq!(ids.len(), 2, "one hello from each worker: {heard:?}");
        assert!(
            heard.iter().all(|h| h["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("hello from "))),
            "{heard:?}"
        );
        assert!(cluster.stop().status.success());
    });
}

#[test]
fn setup_primary_exec_runs_with_and_without_an_is_primary_check() {
    root_test("node_primary_exec", || {
        for program in ["exec-checked.js", "exec-unchecked.js"] {
            eprintln!("---- {program}");
            let cluster = start(&[], &node20(), program, &[]);
            cluster.wait_until(
                &format!("{program}: 2 workers of exec-worker.js"),
                Duration::from_secs(40),
                |s| {
                    s.program_primary.is_some()
                        && s.wanted_ids.len() == 2
                        && s.workers.len() == 2
                        && s.workers.iter().all(|w| w.state == WorkerState::Ready)
                },
            );
            let body = http_get(PORT, "/").expect("a worker of exec-worker.js answers");
            assert!(body.starts_with("worker "), "{program}: {body:?}");
            assert!(cluster.stop().status.success(), "{program}");
        }
    });
}

#[test]
fn a_plain_server_and_an_express_app_start_no_primary_and_run_their_start_up_code_once() {
    root_test("node_primary_none", || {
        let examples = format!("{}/../examples/node", env!("CARGO_MANIFEST_DIR"));
        for program in [
            format!("{}/node/slow-app.js", env!("CARGO_MANIFEST_DIR")),
            format!("{examples}/express-app.js"),
        ] {
            let starts = std::env::temp_dir().join(format!("starts-{}", std::process::id()));
            let _ = std::fs::remove_file(&starts);
            let counter = app("count-starts.js");
            let node = node20();
            let all = [
                "run",
                "--log-format",
                "json",
                "-w",
                "2",
                "--",
                &node,
                &program,
            ];
            let cluster = Cluster::start_with(&all, |command| {
                command
                    .env("PORT", PORT.to_string())
                    .env("NODE_PATH", node_modules())
                    .env("NODE_OPTIONS", format!("--require {counter}"))
                    .env("STARTS", &starts);
            });
            cluster.wait_until_ready(2);
            http_get(PORT, "/").expect("it serves");
            thread::sleep(Duration::from_millis(500));
            let status = cluster.status();
            assert!(status.program_primary.is_none(), "{program}: {status:?}");
            assert!(
                cluster.events_named("primary-started").is_empty(),
                "{program}"
            );
            let lines = std::fs::read_to_string(&starts).expect("the start-up log");
            assert_eq!(
                lines.lines().count(),
                2,
                "{program}: the start-up code ran {lines:?} (user NODE_OPTIONS kept, once per worker)"
            );
            assert!(cluster.stop().status.success(), "{program}");
        }
    });
}

#[test]
fn socket_io_with_the_cluster_adapter_reaches_every_client_from_every_worker() {
    root_test("node_primary_socket_io", || {
        let node = node20();
        let cluster = start(&["--strategy", "sticky"], &node, "socketio.js", &[]);
        cluster.wait_for_events("primary-started", 1, Duration::from_secs(20));
        wait_for_program(&cluster, 2);
        // The adapter's setupPrimary() relays between workers once they are the primary's.
        thread::sleep(Duration::from_millis(500));
        let output = Command::new(&node)
            .arg(app("socketio-clients.js"))
            .env("NODE_PATH", node_modules())
            .env("CLIENTS", "8")
            .env("URL", format!("http://127.0.0.1:{PORT}"))
            .output()
            .expect("running the Socket.IO clients");
        let text = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success(),
            "clients: {text} {}",
            String::from_utf8_lossy(&output.stderr)
        );
        let seen: Value = serde_json::from_str(text.trim()).expect("one JSON line");
        let workers: BTreeSet<u64> = seen["workers"]
            .as_array()
            .expect("workers")
            .iter()
            .filter_map(Value::as_u64)
            .collect();
        assert_eq!(
            workers.len(),
            2,
            "sticky spread the clients over both workers: {seen}"
        );
        assert_eq!(seen["echoes"].as_array().map(Vec::len), Some(8), "{seen}");
        // Every client got all 8 broadcasts, made on both workers, and fetchSockets() counts
        // the sockets of the whole cluster.
        assert!(
            seen["received"]
                .as_array()
                .expect("received")
                .iter()
                .all(|n| n == 8),
            "{seen}"
        );
        assert_eq!(seen["from"].as_array().map(Vec::len), Some(2), "{seen}");
        assert_eq!(seen["count"], 8, "{seen}");
        assert!(cluster.stop().status.success());
    });
}

#[test]
fn prom_clients_cluster_metrics_on_the_primarys_port_sum_the_workers() {
    root_test("node_primary_prom_client", || {
        let cluster = start(&["--node-primary", "on"], &node20(), "prom-client.js", &[]);
        wait_for_program(&cluster, 2);
        for _ in 0..40 {
            http_get(PORT, "/").expect("a worker answers");
        }
        let metrics = http_get(PRIMARY_PORT, "/cluster_metrics").expect("the primary's port");
        let served: Vec<&str> = metrics
            .lines()
            .filter(|l| l.starts_with("served_total"))
            .collect();
        assert_eq!(served, ["served_total 40"], "{metrics}");
        assert!(cluster.stop().status.success());
    });
}

#[test]
fn a_message_over_max_message_is_dropped_and_the_worker_keeps_running() {
    root_test("node_primary_max_message", || {
        let cluster = start(
            &["--node-primary", "on", "--max-message", "1M"],
            &node20(),
            "messages.js",
            &[],
        );
        let status = wait_for_program(&cluster, 2);
        // Both workers send 2 MB: dropped, so the answer never comes.
        for _ in 0..2 {
            let mut stream = TcpStream::connect(addr(PORT)).expect("connect");
            write!(
                stream,
                "GET /big-to-primary?size=2097152 HTTP/1.1\r\nHost: t\r\n\r\n"
            )
            .expect("request");
            std::mem::forget(stream);
        }
        thread::sleep(Duration::from_secs(1));
        // Same processes, still answering through the primary.
        for _ in 0..2 {
            let asked = json_get(PORT, "/ask");
            assert!(asked["answer"].is_number(), "{asked}");
        }
        let now = cluster.status();
        let pids = |s: &ClusterStatus| s.workers.iter().map(|w| w.pid).collect::<Vec<_>>();
        assert_eq!(pids(&now), pids(&status), "a worker was replaced");
        assert!(cluster.stop().status.success());
    });
}
