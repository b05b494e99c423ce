//! Workers that heal themselves (issue 20): a hung worker found from its accept queue and
//! replaced, short pauses that are not hangs, memory, connection and age limits that replace
//! workers one at a time with their replacement ready first, and the queue depth in status.
//! Real Node workers (tests/node/health-app.js), real connections, each test in its own
//! network namespace (net.ipv4.tcp_migrate_req is set there, not on the host).

use std::{
    collections::BTreeMap,
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{anyhow, Context, Result};
use cluster_lb_tests::{fetch_status, node_modules, root_test, wrk_with, Cluster, WorkerState};
use serde_json::Value;

const PORT: u16 = 8080;

fn addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], PORT))
}

fn health_app() -> String {
    format!("{}/node/health-app.js", env!("CARGO_MANIFEST_DIR"))
}

/// `cluster-lb run OPTIONS -- node health-app.js`, listening on PORT.
fn start(options: &[&str]) -> Cluster {
    let app = health_app();
    let mut all = vec!["run"];
    all.extend_from_slice(options);
    all.extend_from_slice(&["--", "node", &app]);
    Cluster::start_with(&all, |command| {
        command
            .env("PORT", PORT.to_string())
            .env("NODE_PATH", node_modules());
    })
}

/// One GET on a new connection, answered within `timeout`: the answering worker's pid.
fn get(path: &str, timeout: Duration) -> Result<u32> {
    let mut stream =
        TcpStream::connect_timeout(&addr(), Duration::from_secs(5)).context("connecting")?;
    stream.set_read_timeout(Some(timeout))?;
    stream.write_all(format!("GET {path} HTTP/1.0\r\nHost: test\r\n\r\n").as_bytes())?;
    let mut response = String::new();
    stream.read_to_string(&mut response).context("reading")?;
    let body = response
        .split_once("\r\n\r\n")
        .filter(|(head, _)| head.contains(" 200 "))
        .map(|(_, body)| body)
        .ok_or_else(|| anyhow!("unexpected response {response:?}"))?;
    match body.split_whitespace().collect::<Vec<_>>().as_slice() {
        ["worker", _, "pid", pid] => Ok(pid.parse()?),
        _ => Err(anyhow!("unexpected body {body:?}")),
    }
}

fn reason(event: &Value) -> String {
    event["why"].as_str().unwrap_or_default().to_string()
}

/// Watches status every 50 ms until stopped: the fewest wanted ids with a ready process, and
/// the most ids that had two processes at once.
struct CapacityWatch {
    stop: Arc<AtomicBool>,
    thread: thread::JoinHandle<(u32, usize)>,
}

impl CapacityWatch {
    fn start(cluster: &Cluster) -> CapacityWatch {
        let stop = Arc::new(AtomicBool::new(false));
        let control = cluster.control().to_path_buf();
        let thread = {
            let stop = Arc::clone(&stop);
            thread::spawn(move || {
                let (mut fewest_ready, mut most_doubled) = (u32::MAX, 0);
                while !stop.load(Ordering::Relaxed) {
                    if let Ok(status) = fetch_status(&control) {
                        fewest_ready = fewest_ready.min(status.ready_of_wanted());
                        let mut serving: BTreeMap<u32, usize> = BTreeMap::new();
                        for w in &status.workers {
                            if matches!(
                                w.state,
                                WorkerState::Starting | WorkerState::Online | WorkerState::Ready
                            ) {
                                *serving.entry(w.id).or_default() += 1;
                            }
                        }
                        most_doubled =
                            most_doubled.max(serving.values().filter(|n| **n > 1).count());
                    }
                    thread::sleep(Duration::from_millis(50));
                }
                (fewest_ready, most_doubled)
            })
        };
        CapacityWatch { stop, thread }
    }

    fn finish(self) -> (u32, usize) {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().expect("capacity watch")
    }
}

#[test]
fn a_hung_node_worker_gets_no_connections_is_replaced_and_no_later_connection_fails() {
    root_test("health_hung", || {
        let cluster = start(&["-w", "4", "--hang-timeout", "3"]);
        let before = cluster.wait_until_ready(4);
        // One request hangs the worker it lands on (its own connection is lost with it).
        let hung_at = Instant::now();
        let hang = thread::spawn(|| get("/hang", Duration::from_secs(30)));
        thread::sleep(Duration::from_millis(200));

        // 400 sequential connections from right after the hang, each allowed 20 s.
        let clients = thread::spawn(|| {
            let mut failures = Vec::new();
            let mut slowest = Duration::ZERO;
            let mut answered: BTreeMap<u32, u32> = BTreeMap::new();
            for i in 0..400 {
                let started = Instant::now();
                match get("/", Duration::from_secs(20)) {
                    Ok(pid) => *answered.entry(pid).or_default() += 1,
                    Err(e) => failures.push(format!("connection {i}: {e:#}")),
                }
                slowest = slowest.max(started.elapsed());
            }
            (failures, slowest, answered)
        });
        let stalled = cluster.wait_for_events("stalled", 1, Duration::from_secs(15));
        let stalled_after = hung_at.elapsed();
        let hung = cluster.wait_for_events("hung", 1, Duration::from_secs(15));
        let hung_after = hung_at.elapsed();
        let recycled = cluster.wait_for_events("recycled", 1, Duration::from_secs(15));
        let replaced_after = hung_at.elapsed();
        let (failures, slowest, answered) = clients.join().expect("clients");
        assert!(
            hang.join().expect("hang").is_err(),
            "the hung request has no answer"
        );

        let hung_pid = hung[0]["pid"].as_i64().expect("pid") as i32;
        assert_eq!(stalled[0]["pid"], hung[0]["pid"]);
        assert_eq!(recycled[0]["pid"], hung[0]["pid"]);
        assert!(reason(&recycled[0]).starts_with("hung"), "{recycled:?}");
        assert!(before.workers.iter().any(|w| w.pid == hung_pid));
        let after = cluster.wait_until_ready(4);
        assert!(after.workers.iter().all(|w| w.pid != hung_pid));
        assert!(
            replaced_after < Duration::from_secs(15),
            "{replaced_after:?}"
        );
        println!(
            "hung worker: stalled after {:.1}s, hung after {:.1}s, replaced and killed after {:.1}s; \
             400 connections after the hang: {} failed, slowest {:.2}s, answered by {answered:?}",
            stalled_after.as_secs_f64(),
            hung_after.as_secs_f64(),
            replaced_after.as_secs_f64(),
            failures.len(),
            slowest.as_secs_f64()
        );
        assert!(failures.is_empty(), "{failures:?}");
        let kills: Vec<Value> = cluster.events_named("kill");
        assert!(
            kills.iter().any(|k| k["pid"] == hung[0]["pid"]),
            "the hung worker was killed: {kills:?}"
        );
        let stopped = cluster.stop();
        assert!(stopped.status.success());
    });
}

#[test]
fn pauses_of_25_ms_under_load_are_never_taken_for_a_hang() {
    root_test("health_pauses", || {
        let cluster = start(&["-w", "2", "--hang-timeout", "3"]);
        cluster.wait_until_ready(2);
        let stop = Arc::new(AtomicBool::new(false));
        let tally = Arc::new(Mutex::new((0u64, Vec::<String>::new())));
        let clients: Vec<_> = (0..8)
            .map(|_| {
                let (stop, tally) = (Arc::clone(&stop), Arc::clone(&tally));
                thread::spawn(move || {
                    let mut n = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        // Every tenth request blocks its worker's loop for 25 ms.
                        let path = if n.is_multiple_of(10) { "/pause" } else { "/" };
                        let outcome = get(path, Duration::from_secs(10));
                        let mut tally = tally.lock().expect("tally");
                        match outcome {
                            Ok(_) => tally.0 += 1,
                            Err(e) => tally.1.push(format!("{e:#}")),
                        }
                        n += 1;
                    }
                })
            })
            .collect();
        thread::sleep(Duration::from_secs(8));
        stop.store(true, Ordering::Relaxed);
        for client in clients {
            client.join().expect("client");
        }
        let (answered, failures) = tally.lock().expect("tally").clone();
        println!(
            "25 ms pauses: {answered} answered, {} failed",
            failures.len()
        );
        assert!(failures.is_empty(), "{failures:?}");
        assert!(answered > 500, "the load ran: {answered}");
        let stopped = cluster.stop();
        let events = stopped.events();
        let taken: Vec<&Value> = events
            .iter()
            .filter(|e| matches!(e["event"].as_str(), Some("stalled" | "hung" | "recycled")))
            .collect();
        assert!(
            taken.is_empty(),
            "a healthy worker was taken for hung: {taken:?}"
        );
    });
}

#[test]
fn a_leaking_worker_is_replaced_one_at_a_time_without_a_failed_request() {
    root_test("health_memory", || {
        let cluster = start(&["-w", "2", "--max-memory", "150M"]);
        cluster.wait_until_ready(2);
        let capacity = CapacityWatch::start(&cluster);
        // 600 requests that each keep 1 MiB in the worker that answers, from two clients.
        let clients: Vec<_> = (0..2)
            .map(|_| {
                thread::spawn(|| {
                    let mut failures = Vec::new();
                    for i in 0..300 {
                        if let Err(e) = get("/leak", Duration::from_secs(10)) {
                            failures.push(format!("request {i}: {e:#}"));
                        }
                        thread::sleep(Duration::from_millis(10));
                    }
                    failures
                })
            })
            .collect();
        let failures: Vec<String> = clients
            .into_iter()
            .flat_map(|c| c.join().expect("client"))
            .collect();
        let recycled = cluster.wait_for_events("recycled", 2, Duration::from_secs(20));
        cluster.wait_until_ready(2);
        let (fewest_ready, most_doubled) = capacity.finish();
        let limits = cluster.events_named("memory-limit");
        println!(
            "leak of 1 MiB per request, --max-memory 150M: 600 requests, {} failed; {} memory-limit events, {} recycled; \
             fewest ready workers {fewest_ready}, most workers replaced at once {most_doubled}",
            failures.len(),
            limits.len(),
            recycled.len()
        );
        assert!(failures.is_empty(), "{failures:?}");
        assert!(limits
            .iter()
            .all(|e| e["hard"] == false && e["bytes"].as_u64() > e["limit"].as_u64()));
        assert!(
            recycled.iter().all(|e| reason(e).starts_with("memory")),
            "{recycled:?}"
        );
        assert_eq!(
            fewest_ready, 2,
            "capacity never dropped below the wanted count"
        );
        assert!(most_doubled <= 1, "one worker replaced at a time");
        assert!(cluster.stop().status.success());
    });
}

#[test]
fn connection_and_age_limits_recycle_under_wrk_without_errors() {
    root_test("health_recycle", || {
        for (limit, options) in [
            (
                "connections",
                &["--max-connections", "400", "--recycle-jitter", "0"],
            ),
            ("up", &["--max-age", "2", "--recycle-jitter", "0"]),
        ] {
            let mut all = vec!["-w", "2", "--grace", "10"];
            all.extend_from_slice(options);
            let cluster = start(&all);
            cluster.wait_until_ready(2);
            let capacity = CapacityWatch::start(&cluster);
            // A new connection per request, so the kernel counts every one.
            let load = wrk_with(addr(), 8, 8, &["-H", "Connection: close"])
                .join()
                .expect("wrk");
            let recycled = cluster.wait_for_events("recycled", 2, Duration::from_secs(20));
            let (fewest_ready, most_doubled) = capacity.finish();
            println!(
                "{options:?}: wrk {} requests, {} errors; {} workers recycled; fewest ready {fewest_ready}, most replaced at once {most_doubled}",
                load.requests,
                load.errors,
                recycled.len()
            );
            assert!(
                recycled.iter().all(|e| reason(e).contains(limit)),
                "{recycled:?}"
            );
            assert_eq!(load.errors, 0, "wrk saw errors");
            assert!(load.requests > 1000);
            assert_eq!(fewest_ready, 2);
            assert!(most_doubled <= 1);
            assert!(cluster.stop().status.success());
        }
    });
}

#[test]
fn status_shows_each_workers_accept_queue_and_backlog() {
    root_test("health_queue", || {
        let cluster = start(&[
            "-w",
            "2",
            "--hang-timeout",
            "0",
            "--grace",
            "1",
            "--metrics",
            "127.0.0.1:9100",
        ]);
        cluster.wait_until_ready(2);
        // Worker 1's loop blocked for good (no hang detection): connections wait on it.
        let _hang = thread::spawn(|| get("/hang", Duration::from_secs(60)));
        thread::sleep(Duration::from_millis(300));
        let _waiting: Vec<TcpStream> = (0..6)
            .filter_map(|_| TcpStream::connect_timeout(&addr(), Duration::from_secs(2)).ok())
            .collect();
        let status = cluster.wait_until("a queue of 3", Duration::from_secs(10), |s| {
            s.workers.iter().any(|w| w.queue == 3)
        });
        assert!(status.workers.iter().all(|w| w.backlog > 0), "{status:?}");
        assert!(status.workers.iter().all(|w| !w.stalled));
        let text = cluster_lb_tests::metrics_text("127.0.0.1:9100");
        assert!(
            text.lines()
                .any(|l| l.starts_with("cluster_lb_worker_accept_queue{") && l.ends_with(" 3")),
            "{text}"
        );
        drop(_waiting);
        assert!(cluster.stop().status.success());
    });
}

#[test]
fn every_worker_sigkilled_three_times_in_a_row_refuses_no_connection() {
    root_test("health_reserve", || {
        let server = cluster_lb_tests::example("python/server.py");
        let cluster = Cluster::start(&[
            "run",
            "-w",
            "4",
            "--ready-delay",
            "30",
            "--listen",
            "127.0.0.1:8080",
            "--",
            "/usr/bin/python3",
            &server,
        ]);
        cluster.wait_until_ready(4);
        let load = cluster_lb_tests::RequestLoop::start(addr(), 4);
        thread::sleep(Duration::from_millis(500));
        // A bad deploy or an OOM storm: every worker killed at once, three times 0.6 s apart,
        // so the restart backoff grows while nothing serves.
        for _ in 0..3 {
            let status = cluster.status();
            for worker in &status.workers {
                cluster_lb_tests::signal(worker.pid as u32, nix::sys::signal::Signal::SIGKILL);
            }
            thread::sleep(Duration::from_millis(600));
        }
        cluster.wait_until_ready(4);
        thread::sleep(Duration::from_secs(1));
        let (answered, failures) = load.finish();
        let total: u64 = answered.values().sum();
        // A connection a worker had accepted dies with it (reset, or a cut answer); one that
        // could not even connect was refused.
        let (refused, in_flight): (Vec<&String>, Vec<&String>) =
            failures.iter().partition(|f| f.starts_with("connecting"));
        println!(
            "every worker SIGKILLed 3 times: {total} answered by {} processes, {} refused, {} in flight when killed",
            answered.len(),
            refused.len(),
            in_flight.len()
        );
        assert!(refused.is_empty(), "{refused:?}");
        assert!(
            in_flight.len() <= 12,
            "only connections in flight on the 12 killed workers failed: {in_flight:?}"
        );
        assert!(
            answered.len() > 4,
            "the killed workers' replacements served: {answered:?}"
        );
        assert!(cluster.stop().status.success());
    });
}

#[test]
fn a_worker_that_stops_sending_watchdog_pings_is_replaced_and_killed() {
    root_test("health_watchdog", || {
        let scratch = std::env::temp_dir().join(format!("clb-watchdog-{}", std::process::id()));
        std::fs::write(&scratch, b"").expect("marker");
        let worker = format!("{}/workers/watchdog.py", env!("CARGO_MANIFEST_DIR"));
        let cluster = Cluster::start_with(
            &[
                "run",
                "-w",
                "3",
                "--watchdog",
                "1",
                "--ready-delay",
                "30",
                "--listen",
                "127.0.0.1:8080",
                "--",
                "/usr/bin/python3",
                &worker,
            ],
            |command| {
                command.env("SILENT_MARKER", &scratch);
            },
        );
        cluster.wait_until_ready(3);
        let missed = cluster.wait_for_events("watchdog-missed", 1, Duration::from_secs(15));
        let recycled = cluster.wait_for_events("recycled", 1, Duration::from_secs(15));
        assert_eq!(recycled[0]["pid"], missed[0]["pid"]);
        assert!(reason(&recycled[0]).contains("WATCHDOG=1"), "{recycled:?}");
        let silent = missed[0]["pid"].as_i64().expect("pid") as i32;
        let after = cluster.wait_until_ready(3);
        assert!(after.workers.iter().all(|w| w.pid != silent));
        assert!(cluster
            .events_named("kill")
            .iter()
            .any(|k| k["pid"] == missed[0]["pid"]));
        // The workers that keep pinging are left alone.
        thread::sleep(Duration::from_secs(3));
        assert_eq!(cluster.events_named("watchdog-missed").len(), 1);
        let _ = std::fs::remove_file(scratch.with_extension("taken"));
        assert!(cluster.stop().status.success());
    });
}
