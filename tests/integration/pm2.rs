//! A PM2 user's app under cluster-lb (docs/PM2.md): PM2's own ecosystem file with
//! `--env production`, the instance numbers PM2-era code reads (NODE_APP_INSTANCE), SIGINT
//! cleanup on stop (`--stop-signal INT`), and `--wait-ready` (`process.send('ready')`). The
//! apps and the file are in tests/node/pm2, shaped as PM2's documentation shows them; every
//! test plays each Node major, whose `node` is first on PATH: it evaluates the file and runs
//! the app, as a PM2 user's `node` would.

use std::{
    collections::{BTreeMap, BTreeSet},
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::Command,
    thread,
    time::{Duration, Instant},
};

use cluster_lb::control::{request, Reply, Request};
use cluster_lb_tests::{
    node_binaries, pid_of, root_test, signal, Cluster, RequestLoop, WorkerState,
};
use nix::sys::signal::Signal;
use serde_json::Value;

/// tests/node/pm2: the ecosystem file and the apps; cluster-lb runs there, as `pm2 start`
/// runs where the file is.
fn pm2_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("node/pm2")
}

/// Runs `body` with each Node major's directory first on PATH, in one network namespace.
fn each_node(test: &str, body: impl Fn(u32, &dyn Fn(&mut Command)) + Send + 'static) {
    root_test(test, move || {
        for (major, node) in node_binaries() {
            eprintln!("---- Node {major}");
            let bin = node.parent().expect("node's directory").to_path_buf();
            let path = std::env::join_paths(std::iter::once(bin).chain(std::env::split_paths(
                &std::env::var_os("PATH").unwrap_or_default(),
            )))
            .expect("a PATH");
            let setup = move |command: &mut Command| {
                command.current_dir(pm2_dir()).env("PATH", &path);
            };
            body(major, &setup);
        }
    });
}

/// One request on a new connection; the app's JSON answer.
fn ask(addr: SocketAddr) -> Value {
    ask_for(addr, "/")
}

/// A request for `path` on a new connection; the app's JSON answer.
fn ask_for(addr: SocketAddr, path: &str) -> Value {
    let mut stream = TcpStream::connect(addr).expect("connecting");
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("a timeout");
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .expect("sending");
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("reading");
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body)
        .unwrap_or_else(|| panic!("no HTTP answer: {response:?}"));
    serde_json::from_str(body.trim()).unwrap_or_else(|e| panic!("{e}: {body:?}"))
}

/// Each worker's answer (by worker id), from enough requests to reach every one of
/// `workers` in round robin.
fn answers(addr: SocketAddr, workers: usize) -> BTreeMap<u64, Value> {
    let mut seen = BTreeMap::new();
    for _ in 0..workers * 2 {
        let answer = ask(addr);
        let id = answer["worker"].as_u64().expect("a worker id");
        seen.insert(id, answer);
    }
    seen
}

/// PM2's documented file, run as `pm2 start ecosystem.config.js --env production` runs it:
/// its 4 instances, env_production over env (PORT 80, NODE_ENV production), each worker
/// seeing NODE_APP_INSTANCE 0..3 (one minus its Node worker id), kept by a worker that crashed
/// and was restarted; max_memory_restart in effect (workers that leak past it are replaced,
/// keeping their instance numbers); no key left unhonoured; and a stop where every worker
/// exits 0.
#[test]
fn pm2s_documented_ecosystem_file_runs_with_env_production() {
    each_node("pm2_ecosystem", |major, setup| {
        let cluster = Cluster::start_with(
            &[
                "run",
                "--config",
                "ecosystem.config.js",
                "--env",
                "production",
            ],
            setup,
        );
        let status = cluster.wait_until_ready(4);
        assert_eq!(status.name.as_deref(), Some("api"), "Node {major}");
        assert_eq!(
            status.listen,
            ["[::]:80"],
            "Node {major}: env_production's PORT"
        );
        let addr = SocketAddr::from(([127, 0, 0, 1], 80));
        let seen = answers(addr, 4);
        let ids: Vec<u64> = seen.keys().copied().collect();
        assert_eq!(ids, [1, 2, 3, 4], "Node {major}: {seen:?}");
        for (id, answer) in &seen {
            assert_eq!(
                answer["instance"],
                (id - 1).to_string(),
                "Node {major}: {answer}"
            );
            assert_eq!(answer["nodeEnv"], "production", "Node {major}: {answer}");
            assert_eq!(answer["port"], "80", "Node {major}: {answer}");
        }
        // The cron idiom runs on exactly one instance.
        let crons = seen.values().filter(|a| a["cron"] == true).count();
        assert_eq!(crons, 1, "Node {major}: {seen:?}");

        // Instance 0 crashes; its replacement is instance 0 again.
        let old = pid_of(&status, 1);
        signal(old as u32, Signal::SIGKILL);
        let status = cluster.wait_until("worker 1 replaced", Duration::from_secs(30), |s| {
            s.workers.len() == 4
                && s.workers.iter().all(|w| w.state == WorkerState::Ready)
                && s.workers.iter().any(|w| w.id == 1 && w.pid != old)
        });
        let seen = answers(addr, 4);
        assert_eq!(
            seen[&1]["pid"],
            pid_of(&status, 1),
            "Node {major}: {seen:?}"
        );
        assert_eq!(seen[&1]["instance"], "0", "Node {major}: {seen:?}");
        let instances: BTreeSet<&str> = seen
            .values()
            .filter_map(|a| a["instance"].as_str())
            .collect();
        assert_eq!(
            instances,
            BTreeSet::from(["0", "1", "2", "3"]),
            "Node {major}"
        );

        // max_memory_restart: '100M' is --max-memory 100M. Leaking 8 MiB a request, the
        // workers pass it; each is replaced, its replacement ready first, as the same instance.
        let mut leaks = 0;
        while cluster.events_named("memory-limit").is_empty() {
            ask_for(addr, "/leak");
            leaks += 1;
            assert!(leaks < 200, "Node {major}: no memory-limit event");
            thread::sleep(Duration::from_millis(20));
        }
        let limit = cluster.events_named("memory-limit");
        assert_eq!(limit[0]["limit"], 100u64 << 20, "Node {major}: {limit:?}");
        let recycled = cluster.wait_for_events("recycled", 1, Duration::from_secs(30));
        assert!(recycled[0]["why"]
            .as_str()
            .unwrap_or_default()
            .starts_with("memory"));
        let status = cluster.wait_until("no worker retiring", Duration::from_secs(60), |s| {
            s.workers.len() == 4
                && s.workers
                    .iter()
                    .all(|w| w.state == WorkerState::Ready && w.retiring.is_none())
        });
        let seen = answers(addr, 4);
        for (id, answer) in &seen {
            assert_eq!(answer["pid"], pid_of(&status, *id as u32), "Node {major}");
            assert_eq!(answer["instance"], (id - 1).to_string(), "Node {major}");
        }

        // Every key of the file is honoured: no warning names one.
        let warnings: Vec<String> = cluster
            .lines()
            .into_iter()
            .filter(|l| l.contains("not honoured"))
            .collect();
        assert!(warnings.is_empty(), "Node {major}: {warnings:?}");

        let stopped = cluster.stop();
        assert!(stopped.status.success(), "Node {major}");
        let last: BTreeSet<i64> = status.workers.iter().map(|w| i64::from(w.pid)).collect();
        let exits: Vec<Value> = stopped
            .events()
            .into_iter()
            .filter(|e| {
                e["event"] == "exit" && e["pid"].as_i64().is_some_and(|p| last.contains(&p))
            })
            .collect();
        assert_eq!(exits.len(), 4, "Node {major}: {exits:?}");
        assert!(
            exits.iter().all(|e| e["code"] == 0),
            "Node {major}: {exits:?}"
        );
    });
}

/// A file of several apps: cluster-lb runs one per primary, and says so (exit 2, one line
/// naming the apps and --app); `--app` picks one.
#[test]
fn a_file_of_several_apps_needs_app() {
    each_node("pm2_several_apps", |major, setup| {
        let dir = std::env::temp_dir().join(format!("clb-pm2-apps-{}-{major}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("a directory");
        let file = dir.join("ecosystem.config.js");
        let app = pm2_dir().join("app.js");
        std::fs::write(
            &file,
            format!(
                "module.exports = {{ apps: [\n  {{ name: 'api', script: '{}', instances: 2, env: {{ PORT: 3000 }} }},\n  {{ name: 'jobs', script: '{}', env: {{ PORT: 3001 }} }},\n] }};\n",
                app.display(),
                app.display()
            ),
        )
        .expect("writing the file");
        let path = file.display().to_string();
        let mut both = Command::new(cluster_lb_tests::workspace_binary("cluster-lb"));
        both.args(["run", "--config", &path]);
        setup(&mut both);
        let output = both.output().expect("running cluster-lb");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "Node {major}: {stderr}");
        assert_eq!(stderr.trim().lines().count(), 1, "Node {major}: {stderr}");
        assert!(
            stderr.contains("2 apps (api, jobs)") && stderr.contains("--app NAME"),
            "Node {major}: {stderr}"
        );

        let cluster = Cluster::start_with(&["run", "--config", &path, "--app", "api"], setup);
        let status = cluster.wait_until_ready(2);
        assert_eq!(status.name.as_deref(), Some("api"));
        assert_eq!(status.listen, ["[::]:3000"]);
        let seen = answers(SocketAddr::from(([127, 0, 0, 1], 3000)), 2);
        let instances: Vec<&str> = seen
            .values()
            .filter_map(|a| a["instance"].as_str())
            .collect();
        assert_eq!(instances, ["0", "1"], "Node {major}: {seen:?}");
        assert!(cluster.stop().status.success());
        let _ = std::fs::remove_dir_all(&dir);
    });
}

/// The files an app's SIGINT handler left (one per worker pid that cleaned up).
fn cleaned(dir: &Path) -> BTreeSet<i64> {
    std::fs::read_dir(dir)
        .expect("the cleanup directory")
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            e.file_name()
                .to_str()?
                .strip_prefix("cleaned-")?
                .parse()
                .ok()
        })
        .collect()
}

/// PM2's graceful shutdown: an app that cleans up on SIGINT (and has an open handle, a
/// connection pool, that keeps it alive after its server closed) gets SIGINT on stop with
/// `--stop-signal INT`, runs its handler and exits 0: as a worker without Node's channel
/// (socket-activated, `--node off`), where SIGINT is the stop request itself, and as a Node
/// worker, where it follows Node's `disconnect` once the worker closed its server.
#[test]
fn sigint_cleanup_runs_on_stop_with_stop_signal_int() {
    each_node("pm2_stop_signal", |major, setup| {
        for node_channel in [false, true] {
            let dir = std::env::temp_dir().join(format!(
                "clb-pm2-cleanup-{}-{major}-{node_channel}",
                std::process::id()
            ));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).expect("a directory");
            let mut args = vec!["run", "-w", "2", "--stop-signal", "INT"];
            if !node_channel {
                args.extend(["--node", "off", "--listen", "127.0.0.1:3000"]);
            }
            args.extend(["--", "node", "cleanup-app.js"]);
            let cluster = Cluster::start_with(&args, |command| {
                setup(command);
                command.env("CLEANUP_DIR", &dir);
            });
            let status = cluster.wait_until_ready(2);
            let pids: BTreeSet<i64> = status.workers.iter().map(|w| i64::from(w.pid)).collect();
            cluster_lb_tests::get(SocketAddr::from(([127, 0, 0, 1], 3000))).expect("it serves");
            let stopped = cluster.stop();
            assert!(stopped.status.success());
            assert_eq!(
                cleaned(&dir),
                pids,
                "Node {major}, channel {node_channel}: every worker ran its SIGINT handler"
            );
            let exits: Vec<Value> = stopped
                .events()
                .into_iter()
                .filter(|e| e["event"] == "exit")
                .collect();
            assert_eq!(exits.len(), 2);
            assert!(
                exits.iter().all(|e| e["code"] == 0),
                "Node {major}, channel {node_channel}: {exits:?}"
            );
            // Nobody was killed: the handler's exit came well within --grace.
            assert!(stopped.events().iter().all(|e| e["event"] != "kill"));
            let _ = std::fs::remove_dir_all(&dir);
        }
    });
}

/// `--wait-ready`: a worker that listens, then sends 'ready' 2 s later, is kept out of the
/// kernel's active set until it does (the app answers 500 to any request before). Under load
/// from the moment the port exists, the first two workers, a third one (scale 3) and every
/// replacement of a rolling reload get no connection before their 'ready': the kernel's
/// counter for the newcomer stays 0 while it is online, and no request fails.
#[test]
fn wait_ready_keeps_a_worker_out_of_rotation_until_it_sends_ready() {
    each_node("pm2_wait_ready", |major, setup| {
        let cluster = Cluster::start_with(
            &[
                "run",
                "-w",
                "2",
                "--wait-ready",
                "--",
                "node",
                "wait-ready-app.js",
            ],
            setup,
        );
        // Load from the moment the port exists (the first worker's `listening`), 2 s before
        // any worker is ready: what arrives meanwhile waits in the primary's reserve socket and
        // goes to the first worker that sends 'ready'.
        cluster.wait_for_event("listening", Duration::from_secs(20), |_| true);
        let addr = SocketAddr::from(([127, 0, 0, 1], 3000));
        let load = RequestLoop::start(addr, 4);
        cluster.wait_until_ready(2);
        let ready = cluster.events_named("ready");
        assert_eq!(ready.len(), 2);
        assert!(
            ready.iter().all(|e| e["reason"] == "sent 'ready'"),
            "Node {major}: {ready:?}"
        );
        thread::sleep(Duration::from_millis(300));

        request(
            cluster.control(),
            &Request::Scale { workers: 3 },
            Duration::from_secs(5),
        )
        .expect("scale");
        // From its `listening` until its 'ready', the newcomer is online, out of rotation.
        cluster.wait_for_event("listening", Duration::from_secs(20), |e| e["worker"] == 3);
        let listened = Instant::now();
        let mut online_seen = 0;
        let status = loop {
            let status = cluster.status();
            let newcomer = status.workers.iter().find(|w| w.id == 3).cloned();
            match newcomer {
                Some(w) if w.state == WorkerState::Ready => break status,
                Some(w) => {
                    assert_eq!(w.state, WorkerState::Online, "Node {major}: {status:?}");
                    assert_eq!(w.selected, 0, "Node {major}: a connection before 'ready'");
                    online_seen += 1;
                }
                None => panic!("Node {major}: worker 3 is gone: {status:?}"),
            }
            assert!(listened.elapsed() < Duration::from_secs(20));
            thread::sleep(Duration::from_millis(50));
        };
        assert!(
            listened.elapsed() >= Duration::from_millis(1500),
            "Node {major}: ready {:?} after listening",
            listened.elapsed()
        );
        assert!(
            online_seen > 10,
            "Node {major}: {online_seen} online samples"
        );
        assert_eq!(status.workers.len(), 3);

        let reply =
            request(cluster.control(), &Request::Reload, Duration::from_secs(60)).expect("reload");
        assert_eq!(reply, Reply::Reloaded { replaced: 3 }, "Node {major}");
        thread::sleep(Duration::from_millis(300));
        let (answered, failures) = load.finish();
        assert!(
            failures.is_empty(),
            "Node {major}: {} failed requests, e.g. {:?}",
            failures.len(),
            &failures[..failures.len().min(3)]
        );
        // The two first workers, the third, and three replacements served.
        assert!(answered.len() >= 5, "Node {major}: {answered:?}");
        assert!(cluster.stop().status.success());
    });
}

/// A file that cannot be run is one line naming the file, the key if one is to blame, and
/// what is wrong (exit 2, nothing started): node's own error for a file that does not
/// evaluate, and cluster-lb's for an app it cannot map.
#[test]
fn bad_ecosystem_files_are_one_line() {
    let Some((_, node)) = node_binaries().into_iter().last() else {
        return;
    };
    let dir = std::env::temp_dir().join(format!("clb-pm2-bad-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("a directory");
    std::fs::write(dir.join("app.js"), "").expect("an app");
    let cases = [
        (
            "syntax.config.js",
            "module.exports = { apps: [ { script: 'app.js' } }\n",
            "node could not evaluate it: SyntaxError",
        ),
        (
            "throws.config.js",
            "\nthrow new Error('no database url');\n",
            "Error: no database url (line 2)",
        ),
        (
            "process.json",
            "{ // PM2's JSON takes comments\n apps: [{ script: 'app.js', instances: 'lots', max_memory_restart: '200MB' }] }",
            "key `max_memory_restart`: '200MB' is not a size",
        ),
        (
            "missing.config.js",
            "module.exports = { apps: [{ name: 'api', script: './server.js' }] };",
            "key `script`: ./server.js is neither in",
        ),
        ("app.yml", "apps:\n  - script: app.js\n", "YAML"),
    ];
    let path = std::env::join_paths(
        std::iter::once(node.parent().expect("node's directory").to_path_buf()).chain(
            std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default()),
        ),
    )
    .expect("a PATH");
    for (name, text, expected) in cases {
        std::fs::write(dir.join(name), text).expect("writing the file");
        let output = Command::new(cluster_lb_tests::workspace_binary("cluster-lb"))
            .args(["run", "--config", name])
            .current_dir(&dir)
            .env("PATH", &path)
            .output()
            .expect("running cluster-lb");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{name}: {stderr}");
        assert_eq!(stderr.trim().lines().count(), 1, "{name}: {stderr}");
        assert!(
            stderr.starts_with(&format!("cluster-lb: error: config {name}: ")),
            "{name}: {stderr}"
        );
        assert!(stderr.contains(expected), "{name}: {stderr}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
