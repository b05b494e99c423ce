//! Unmodified Node programs as cluster-lb workers, through Node's own cluster protocol, on
//! every Node major the project supports (18, 20, 22, 24, fetched from the npm registry by
//! `cargo xtask test`). Each test runs in its own network namespace and plays every version in
//! turn.

use std::{
    collections::BTreeMap,
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    thread,
    time::{Duration, Instant},
};

use cluster_lb::control::{request, Reply, Request};
use cluster_lb_tests::{
    distribution, example, node_binaries, node_modules, root_test, signal, Cluster, RequestLoop,
    ScratchDir, Tally, WorkerState,
};
use nix::sys::signal::Signal;
use serde_json::Value;

const PORT: u16 = 3000;

fn addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], PORT))
}

pub(crate) fn test_app(name: &str) -> String {
    format!("{}/node/{name}", env!("CARGO_MANIFEST_DIR"))
}

/// Runs `body` for every Node major, in one network namespace, one version after the other.
fn each_node(test: &str, body: impl Fn(u32, &str) + Send + 'static) {
    root_test(test, move || {
        for (major, node) in node_binaries() {
            eprintln!("---- Node {major}");
            body(major, &node.display().to_string());
        }
    });
}

/// `cluster-lb run OPTIONS -- NODE ARGS...`, with PORT and NODE_PATH set for the apps.
fn start(options: &[&str], node: &str, args: &[&str]) -> Cluster {
    let mut all = vec!["run"];
    all.extend_from_slice(options);
    all.push("--");
    all.push(node);
    all.extend_from_slice(args);
    Cluster::start_with(&all, |command| {
        command
            .env("PORT", PORT.to_string())
            .env("NODE_PATH", node_modules());
    })
}

/// 400 sequential connections over 4 workers: exactly 100 each, and the kernel program's
/// counters agree; then a graceful stop where every worker exits 0 (Node's disconnect).
fn exact_shares_and_clean_stop(cluster: Cluster, major: u32, listen: &str) {
    let status = cluster.wait_until_ready(4);
    let seen = distribution(addr(), 400);
    assert_eq!(
        seen.values().copied().collect::<Vec<_>>(),
        [100; 4],
        "Node {major}: {seen:?}"
    );
    let counters = cluster.status();
    for worker in &counters.workers {
        assert_eq!(
            worker.selected, 100,
            "Node {major}: kernel counters {counters:?}"
        );
    }
    let online = cluster.events_named("online");
    assert_eq!(online.len(), 4, "Node {major}: every worker said online");
    assert!(cluster
        .events_named("ready")
        .iter()
        .all(|e| e["reason"] == "listening"));
    assert_eq!(status.listen, [listen], "Node {major}");
    let stopped = cluster.stop();
    assert!(stopped.status.success());
    let exits: Vec<Value> = stopped
        .events()
        .into_iter()
        .filter(|e| e["event"] == "exit")
        .collect();
    assert_eq!(exits.len(), 4);
    assert!(
        exits.iter().all(|e| e["code"] == 0),
        "Node {major}: graceful exits after disconnect: {exits:?}"
    );
}

#[test]
fn the_classic_cluster_program_runs_unchanged_with_exact_round_robin() {
    each_node("node_classic", |major, node| {
        let cluster = start(&["-w", "4"], node, &[&example("node/cluster-app.js")]);
        exact_shares_and_clean_stop(cluster, major, "[::]:3000");
    });
}

#[test]
fn a_plain_listen_script_runs_unchanged() {
    each_node("node_plain", |major, node| {
        let cluster = start(&["-w", "4"], node, &[&test_app("slow-app.js")]);
        exact_shares_and_clean_stop(cluster, major, "[::]:3000");
    });
}

#[test]
fn an_express_app_from_npm_runs_unchanged() {
    each_node("node_express", |major, node| {
        let cluster = start(&["-w", "4"], node, &[&example("node/express-app.js")]);
        exact_shares_and_clean_stop(cluster, major, "[::]:3000");
    });
}

#[test]
fn a_fastify_app_from_npm_runs_unchanged() {
    each_node("node_fastify", |major, node| {
        if major < 20 {
            // Fastify 5 needs Node 20 or later.
            eprintln!("---- Fastify 5 does not support Node {major}");
            return;
        }
        let cluster = start(&["-w", "4"], node, &[&example("node/fastify-app.js")]);
        // The app names its host: 0.0.0.0.
        exact_shares_and_clean_stop(cluster, major, "0.0.0.0:3000");
    });
}

#[test]
fn a_socket_activated_node_server_gets_its_own_fd_3_back_through_the_channel() {
    each_node("node_listen_fd3", |major, node| {
        let cluster = start(
            &["-w", "4", "--listen", "127.0.0.1:3000"],
            node,
            &[&example("node/server.js")],
        );
        let status = cluster.wait_until_ready(4);
        assert_eq!(
            status.listen,
            ["127.0.0.1:3000"],
            "one group, no second socket"
        );
        let seen = distribution(addr(), 400);
        assert_eq!(
            seen.values().copied().collect::<Vec<_>>(),
            [100; 4],
            "Node {major}"
        );
        assert!(cluster
            .status()
            .workers
            .iter()
            .all(|w| w.selected == 100 && w.fallback == 0));
        assert!(cluster.stop().status.success());
    });
}

#[test]
fn a_shell_wrapper_that_execs_node_works_with_node_on() {
    each_node("node_shell_wrapper", |major, node| {
        let script = format!("exec {node} {}", example("node/cluster-app.js"));
        let cluster = Cluster::start_with(
            &["run", "-w", "2", "--node", "on", "--", "sh", "-c", &script],
            |command| {
                command.env("PORT", PORT.to_string());
            },
        );
        cluster.wait_until_ready(2);
        let seen = distribution(addr(), 20);
        assert_eq!(
            seen.keys().copied().collect::<Vec<_>>(),
            [1, 2],
            "Node {major}"
        );
        assert!(cluster.stop().status.success());
    });
}

/// `npm start` (and `npm run X -- ARGS`): npm would start the app as a child without the
/// cluster channel; cluster-lb runs the package script's plain node command itself, so every
/// worker is a cluster worker and round robin gives them exactly equal shares. npm is not run.
/// 20 connections to workers 1 and 2 of a launched app: exactly 10 each (round robin), which
/// a launcher's child without the cluster channel could not give.
fn two_workers_share_exactly(launch: &[&str]) {
    let seen = distribution(addr(), 20);
    assert_eq!(
        seen.into_iter().collect::<Vec<_>>(),
        [(1, 10), (2, 10)],
        "{launch:?}"
    );
}

#[test]
fn npm_start_runs_the_package_scripts_node_command_in_every_worker() {
    root_test("npm_start", || {
        let dir = std::env::temp_dir().join(format!("clb-npm-start-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("a scratch directory");
        let server = test_app("launched-app.js");
        let package = serde_json::json!({
            "name": "app",
            "scripts": {
                "start": format!("NODE_ENV=production node {server}"),
                "serve": format!("node {server}"),
            },
        });
        std::fs::write(dir.join("package.json"), package.to_string()).expect("package.json");
        // PM2's way of writing it: script 'npm', args 'start'.
        std::fs::write(
            dir.join("ecosystem.config.js"),
            "module.exports = { apps: [{ name: 'app', script: 'npm', args: 'run serve', instances: 2 }] };",
        )
        .expect("ecosystem.config.js");
        for (launch, expected) in [
            (
                &["-w", "2", "--", "npm", "start"][..],
                "NODE_ENV=production args=",
            ),
            (
                &["-w", "2", "--", "npm", "run", "serve", "--", "--flag"],
                "NODE_ENV= args=--flag",
            ),
            (&["--config", "ecosystem.config.js"], "NODE_ENV= args="),
        ] {
            let mut args = vec!["run"];
            args.extend(launch);
            let cluster = Cluster::start_with(&args, |command| {
                command.current_dir(&dir).env("PORT", PORT.to_string());
            });
            cluster.wait_until_ready(2);
            let body = TcpStream::connect(addr())
                .and_then(|mut stream| http11(&mut stream, "/"))
                .expect("an answer");
            assert!(body.trim_end().ends_with(expected), "{launch:?}: {body}");
            two_workers_share_exactly(launch);
            assert!(cluster.stop().status.success(), "{launch:?}");
        }
        let _ = std::fs::remove_dir_all(&dir);
    });
}

/// A TypeScript server, run by tsx as it is: types, an interface, ES imports.
const TS_APP: &str = r#"import cluster from 'node:cluster';
import http from 'node:http';

interface Answer {
  worker: number;
  pid: number;
}
const id: number = cluster.worker ? cluster.worker.id : 0;
const answer = (a: Answer): string => `worker ${a.worker} pid ${a.pid}\n`;
http
  .createServer((_req, res) => res.end(answer({ worker: id, pid: process.pid })))
  .listen(Number(process.env.PORT));
"#;

/// `tsx app.ts` (tsx from npm, installed in the app's node_modules): tsx would run the app in
/// a child node of its own, without the cluster channel; cluster-lb runs node with tsx's
/// loader itself, so every worker is a cluster worker and round robin gives exactly equal
/// shares. Also through a package script (`npm start` running tsx).
#[test]
fn tsx_runs_typescript_workers_with_the_cluster_channel() {
    root_test("tsx", || {
        let dir = ScratchDir::new("tsx");
        std::os::unix::fs::symlink(node_modules(), dir.join("node_modules"))
            .expect("linking the test apps' node_modules");
        std::fs::write(dir.join("app.ts"), TS_APP).expect("app.ts");
        let package = serde_json::json!({"name": "app", "scripts": {"start": "tsx app.ts"}});
        std::fs::write(dir.join("package.json"), package.to_string()).expect("package.json");
        for launch in [&["tsx", "app.ts"][..], &["npm", "start"]] {
            let mut args = vec!["run", "-w", "2", "--"];
            args.extend(launch);
            let cluster = Cluster::start_with(&args, |command| {
                command
                    .current_dir(dir.path())
                    .env("PORT", PORT.to_string());
            });
            cluster.wait_until_ready(2);
            two_workers_share_exactly(launch);
            assert!(cluster.stop().status.success(), "{launch:?}");
        }
    });
}

#[test]
fn listen_0_gives_every_worker_the_same_port() {
    each_node("node_listen_0", |major, node| {
        let cluster = Cluster::start_with(
            &["run", "-w", "3", "--", node, &test_app("slow-app.js")],
            |command| {
                command.env("PORT", "0");
            },
        );
        let status = cluster.wait_until_ready(3);
        assert_eq!(
            status.listen.len(),
            1,
            "Node {major}: one group: {status:?}"
        );
        let port: u16 = status.listen[0]
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .expect("a port");
        assert_ne!(port, 0);
        let addresses: Vec<Value> = cluster
            .events_named("listening")
            .iter()
            .map(|e| e["address"].clone())
            .collect();
        assert!(addresses
            .iter()
            .all(|a| a == &Value::from(status.listen[0].clone())));
        let seen = distribution(SocketAddr::from(([127, 0, 0, 1], port)), 30);
        assert_eq!(
            seen.values().copied().collect::<Vec<_>>(),
            [10; 3],
            "Node {major}"
        );
        assert!(cluster.stop().status.success());
    });
}

#[test]
fn a_tls_session_made_on_one_worker_resumes_on_another() {
    each_node("node_tls_resumption", |major, node| {
        let cluster = Cluster::start_with(
            &["run", "-w", "2", "--", node, &test_app("https-app.js")],
            |command| {
                command.env("PORT", "8443");
            },
        );
        cluster.wait_until_ready(2);
        let output = std::process::Command::new(node)
            .args([&test_app("tls-client.js"), "8443"])
            .output()
            .expect("the TLS client");
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        let result: Value = serde_json::from_slice(&output.stdout).expect("client JSON");
        assert_ne!(
            result["first"], result["second"],
            "Node {major}: round robin sends the two connections to two workers: {result}"
        );
        assert_eq!(
            result["resumed"], true,
            "Node {major}: the second worker resumed the first one's session: {result}"
        );
        assert!(cluster.stop().status.success());
    });
}

/// One HTTP/1.1 request on `stream`, read by Content-Length; the body.
fn http11(stream: &mut TcpStream, path: &str) -> std::io::Result<String> {
    stream.write_all(format!("GET {path} HTTP/1.1\r\nHost: test\r\n\r\n").as_bytes())?;
    let mut response = Vec::new();
    let mut byte = [0u8; 1];
    while !response.ends_with(b"\r\n\r\n") {
        if stream.read(&mut byte)? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        response.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&response).to_ascii_lowercase();
    let length: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("no content-length in {head}")))?;
    if !head.starts_with("http/1.1 200") {
        return Err(std::io::Error::other(head));
    }
    let mut body = vec![0u8; length];
    stream.read_exact(&mut body)?;
    Ok(String::from_utf8_lossy(&body).into_owned())
}

#[test]
fn term_with_keep_alive_connections_open_loses_no_request_in_flight_and_every_worker_exits_0() {
    each_node("node_term_keep_alive", |major, node| {
        let grace = Duration::from_secs(15);
        let mut cluster = start(
            &["-w", "2", "--grace", "15"],
            node,
            &[&test_app("slow-app.js")],
        );
        cluster.wait_until_ready(2);
        // Idle keep-alive connections, one request done on each.
        let mut idle = Vec::new();
        for _ in 0..4 {
            let mut stream = TcpStream::connect(addr()).expect("connect");
            http11(&mut stream, "/").expect("a first request");
            idle.push(stream);
        }
        // Requests in flight when the stop begins.
        let in_flight: Vec<_> = (0..4)
            .map(|_| {
                thread::spawn(|| {
                    let mut stream = TcpStream::connect(addr())?;
                    stream.set_read_timeout(Some(Duration::from_secs(20)))?;
                    http11(&mut stream, "/slow")
                })
            })
            .collect();
        thread::sleep(Duration::from_millis(300));
        let stop = Instant::now();
        signal(cluster.pid(), Signal::SIGTERM);
        for request in in_flight {
            let body = request
                .join()
                .expect("client")
                .expect("the request in flight is answered");
            assert!(body.starts_with("worker "), "{body}");
        }
        let status = cluster.wait_exit(grace + Duration::from_secs(5));
        let took = stop.elapsed();
        assert!(status.success());
        assert!(
            took < grace,
            "Node {major}: stopped in {took:?}, not within --grace"
        );
        let exits = cluster.events_named("exit");
        assert_eq!(exits.len(), 2);
        assert!(
            exits.iter().all(|e| e["code"] == 0),
            "Node {major}: every worker exits 0: {exits:?}"
        );
        eprintln!("Node {major}: stopped with keep-alive connections open in {took:?}");
        drop(idle);
    });
}

#[test]
fn a_rolling_reload_of_node_workers_under_load_fails_no_request() {
    each_node("node_reload_under_load", |major, node| {
        reload_under_load(major, node, "node/cluster-app.js");
    });
}

#[test]
fn a_rolling_reload_of_express_workers_under_load_fails_no_request() {
    each_node("node_express_reload", |major, node| {
        reload_under_load(major, node, "node/express-app.js");
    });
}

#[test]
fn a_rolling_reload_of_fastify_workers_under_load_fails_no_request() {
    each_node("node_fastify_reload", |major, node| {
        if major < 20 {
            // Fastify 5 needs Node 20 or later.
            eprintln!("---- Fastify 5 does not support Node {major}");
            return;
        }
        reload_under_load(major, node, "node/fastify-app.js");
    });
}

/// Two rolling reloads of the cluster's 4 workers while `load` runs, from half a second before
/// the first to half a second after the last: what its clients saw.
pub(crate) fn two_reloads_under(cluster: &Cluster, load: RequestLoop) -> Tally {
    thread::sleep(Duration::from_millis(500));
    for _ in 0..2 {
        let reply = request(
            cluster.control(),
            &Request::Reload,
            Duration::from_secs(120),
        )
        .expect("reload");
        assert_eq!(reply, Reply::Reloaded { replaced: 4 });
    }
    thread::sleep(Duration::from_millis(500));
    load.finish()
}

/// Two rolling reloads of 4 workers running the example `app`, under connection-per-request
/// clients: every request is answered.
fn reload_under_load(major: u32, node: &str, app: &str) {
    let cluster = start(&["-w", "4"], node, &[&example(app)]);
    cluster.wait_until_ready(4);
    let (answered, failures) = two_reloads_under(&cluster, RequestLoop::start(addr(), 4));
    let answered: u64 = answered.values().sum();
    eprintln!(
        "Node {major} {app}: {answered} requests across 2 reloads, {} failed",
        failures.len()
    );
    assert!(failures.is_empty(), "Node {major} {app}: {failures:?}");
    let status = cluster.wait_until_ready(4);
    assert_eq!(status.reloads, 2);
    assert!(status.workers.iter().all(|w| w.state == WorkerState::Ready));
    assert!(cluster.stop().status.success());
}

/// Worker 0 misbehaves on its channel in the way `mode` names, in its listen callback.
fn hostile(node: &str, mode: &str, options: &[&str]) -> Cluster {
    let app = test_app("hostile.js");
    let mut args = vec!["run", "--log-format", "json", "-w", "3"];
    args.extend_from_slice(options);
    args.extend(["--", node, &app, mode]);
    Cluster::start_with(&args, |command| {
        // Debug: worker messages are events at debug level (their payloads are the program's).
        command
            .env("PORT", PORT.to_string())
            .env("CLUSTER_LB_LOG", "debug");
    })
}

#[test]
fn garbage_on_the_node_channel_disconnects_only_its_sender() {
    each_node("node_channel_garbage", |major, node| {
        let cluster = hostile(node, "garbage", &[]);
        let disconnect =
            cluster.wait_for_event("disconnect", Duration::from_secs(10), |e| e["worker"] == 1);
        assert_eq!(disconnect["failure"], true, "Node {major}: {disconnect}");
        let others = cluster.wait_until("workers 2 and 3 ready", Duration::from_secs(10), |s| {
            s.workers
                .iter()
                .filter(|w| w.id != 1 && w.state == WorkerState::Ready)
                .count()
                == 2
        });
        let seen: BTreeMap<u32, usize> = distribution(addr(), 60);
        assert!(seen.contains_key(&2) && seen.contains_key(&3), "{seen:?}");
        assert_eq!(others.primary_pid, cluster.status().primary_pid);
        assert!(cluster.stop().status.success(), "Node {major}");
    });
}

/// Node delivers messages of any size; one over --max-message is dropped with one line, and
/// its sender goes on (its next message arrives) and keeps serving.
#[test]
fn a_line_over_max_message_is_dropped_and_its_sender_keeps_serving() {
    each_node("node_channel_endless", |major, node| {
        let cluster = hostile(node, "endless", &["--max-message", "1M"]);
        let message = cluster.wait_for_event("message", Duration::from_secs(10), |e| {
            e["data"]["after"] == "endless"
        });
        assert_eq!(message["worker"], 1, "Node {major}");
        let status = cluster.wait_until_ready(3);
        assert!(status.workers.iter().all(|w| w.restarts == 0), "{status:?}");
        assert!(
            cluster.events_named("disconnect").is_empty(),
            "Node {major}"
        );
        assert_eq!(distribution(addr(), 30).len(), 3, "Node {major}");
        assert!(cluster.stop().status.success(), "Node {major}");
    });
}

#[test]
fn handles_and_unknown_acts_from_a_node_worker_are_answered_or_ignored_and_it_keeps_serving() {
    each_node("node_channel_handles", |major, node| {
        for (mode, after) in [("handle", "handle"), ("unknown-act", "unknown-act")] {
            let cluster = hostile(node, mode, &[]);
            // The message sent after the handle arrives only if the primary acknowledged it.
            let message = cluster.wait_for_event("message", Duration::from_secs(10), |e| {
                e["data"]["after"] == after
            });
            assert_eq!(message["worker"], 1, "Node {major} {mode}");
            let status = cluster.wait_until_ready(3);
            assert!(status.workers.iter().all(|w| w.restarts == 0), "{status:?}");
            assert!(cluster.events_named("disconnect").is_empty());
            let seen = distribution(addr(), 30);
            assert_eq!(
                seen.values().copied().collect::<Vec<_>>(),
                [10; 3],
                "Node {major} {mode}"
            );
            assert!(cluster.stop().status.success());
        }
    });
}

#[test]
fn a_server_that_bypasses_cluster_lb_is_reported() {
    each_node("node_own_listener", |major, node| {
        let cluster = start(&["-w", "2"], node, &[&test_app("reuse-port-app.js")]);
        cluster.wait_until_ready(2);
        let reported = cluster.wait_for_events("own-listener", 2, Duration::from_secs(15));
        let mut addresses: Vec<&str> = reported
            .iter()
            .filter_map(|e| e["address"].as_str())
            .collect();
        addresses.sort_unstable();
        assert_eq!(
            addresses,
            ["127.0.0.1:3001", "127.0.0.1:3002"],
            "Node {major}"
        );
        assert!(cluster.stop().status.success());
    });
}

#[test]
fn a_node_dgram_bind_gets_a_socket_in_a_udp_group_and_flows_stay_on_one_worker() {
    each_node("node_dgram", |major, node| {
        let cluster = Cluster::start_with(
            &["run", "-w", "2", "--", node, &test_app("udp-app.js")],
            |command| {
                command.env("PORT", "5353");
            },
        );
        let status = cluster.wait_until_ready(2);
        assert_eq!(status.listen, ["udp://127.0.0.1:5353"], "Node {major}");
        let mut used = std::collections::BTreeSet::new();
        for _ in 0..20 {
            let socket = std::net::UdpSocket::bind("127.0.0.1:0").expect("client");
            socket
                .set_read_timeout(Some(Duration::from_secs(5)))
                .expect("timeout");
            let mut answers = std::collections::BTreeSet::new();
            for _ in 0..5 {
                socket.send_to(b"ping", "127.0.0.1:5353").expect("send");
                let mut buffer = [0u8; 128];
                let (n, _) = socket.recv_from(&mut buffer).expect("answer");
                answers.insert(String::from_utf8_lossy(&buffer[..n]).into_owned());
            }
            assert_eq!(
                answers.len(),
                1,
                "Node {major}: a flow was split: {answers:?}"
            );
            used.extend(answers);
        }
        assert_eq!(
            used.len(),
            2,
            "Node {major}: flows on both workers: {used:?}"
        );
        assert!(cluster.stop().status.success());
    });
}
