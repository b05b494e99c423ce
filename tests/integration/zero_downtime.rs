//! Deploys and scaling under load: rolling reloads, scale up and down, draining with request
//! migration, a worker killed under load, and systemd's notify protocol.

use std::{
    collections::BTreeMap,
    os::unix::net::UnixDatagram,
    path::Path,
    thread,
    time::{Duration, Instant},
};

use cluster_lb::control::{request, Reply, Request};
use cluster_lb_tests::{
    addr, get, metrics_text, root_test, rust_server, signal, Cluster, RequestLoop, WorkerState,
    ADDR,
};
use nix::sys::signal::Signal;

const METRICS: &str = "127.0.0.1:9100";
const CLIENTS: u32 = 8;

/// `workers` Rust example servers with metrics, returned once all are ready.
fn start(workers: u32) -> Cluster {
    let server = rust_server();
    let n = workers.to_string();
    let cluster = Cluster::start(&[
        "run",
        "-w",
        &n,
        "--listen",
        ADDR,
        "--metrics",
        METRICS,
        "--",
        &server,
    ]);
    cluster.wait_until_ready(workers as usize);
    cluster
}

fn control_request(control: &Path, request_: Request) -> Reply {
    request(control, &request_, Duration::from_secs(120))
        .unwrap_or_else(|e| panic!("{request_:?}: {e}"))
}

#[test]
fn three_reloads_and_scaling_under_load_fail_no_request() {
    root_test("reload_under_load", || {
        let cluster = start(4);
        let control = cluster.control().to_path_buf();
        let started = Instant::now();
        let load = RequestLoop::start(addr(), CLIENTS);
        thread::sleep(Duration::from_secs(1));
        for _ in 1..=3 {
            let reply = control_request(&control, Request::Reload);
            assert_eq!(reply, Reply::Reloaded { replaced: 4 });
            thread::sleep(Duration::from_millis(1500));
        }
        let reply = control_request(&control, Request::Scale { workers: 6 });
        assert_eq!(reply, Reply::Scaling { from: 4, to: 6 });
        cluster.wait_until_ready(6);
        thread::sleep(Duration::from_millis(1500));
        control_request(&control, Request::Scale { workers: 3 });
        cluster.wait_until_ready(3);
        thread::sleep(Duration::from_millis(1500));
        while started.elapsed() < Duration::from_secs(12) {
            thread::sleep(Duration::from_millis(100));
        }
        let (answered, failures) = load.finish();
        let sent: u64 = answered.values().sum::<u64>() + failures.len() as u64;
        eprintln!(
            "load test: {sent} requests over {:.1}s, {} failed",
            started.elapsed().as_secs_f64(),
            failures.len()
        );
        assert!(
            failures.is_empty(),
            "{} of {sent} failed: {:?}",
            failures.len(),
            &failures[..failures.len().min(10)]
        );

        let final_set = cluster.status();
        assert_eq!(final_set.reloads, 3);
        assert_eq!(final_set.workers.len(), 3, "{final_set:?}");
        let metrics = metrics_text(METRICS);
        for worker in &final_set.workers {
            let seen = answered.get(&(worker.pid as u32)).copied().unwrap_or(0);
            assert!(
                seen > 0,
                "worker {} (pid {}) served nothing",
                worker.id,
                worker.pid
            );
            assert_eq!(worker.state, WorkerState::Ready);
            assert_eq!(
                worker.selected, seen,
                "kernel and clients disagree on pid {}",
                worker.pid
            );
            let sample = format!(
                "cluster_lb_worker_selected_total{{worker=\"{}\",pid=\"{}\"}} {seen}\n",
                worker.id, worker.pid
            );
            assert!(
                metrics.contains(&sample),
                "metrics lack {sample:?}:\n{metrics}"
            );
        }
        assert!(
            metrics.contains("cluster_lb_reloads_total 3\n"),
            "{metrics}"
        );
        assert!(
            metrics.contains("cluster_lb_workers{state=\"ready\"} 3\n"),
            "{metrics}"
        );
        assert!(cluster.stop().status.success());
    });
}

#[test]
fn connections_queued_on_a_stopped_worker_migrate_when_it_dies() {
    root_test("drain_migration", || {
        let cluster = start(4);
        let victim = get(addr()).expect("a request").pid;
        signal(victim, Signal::SIGSTOP);
        let clients: Vec<_> = (0..50).map(|_| thread::spawn(|| get(addr()))).collect();
        // Let the kernel queue about a quarter of them on the stopped worker.
        thread::sleep(Duration::from_millis(500));
        signal(victim, Signal::SIGKILL);
        let mut served_by = BTreeMap::new();
        for client in clients {
            let answer = client
                .join()
                .expect("client")
                .expect("every queued connection is answered");
            assert_ne!(answer.pid, victim);
            *served_by.entry(answer.pid).or_insert(0) += 1;
        }
        cluster.wait_until_ready(4);
        let migrated: u64 = cluster.status().workers.iter().map(|w| w.migrated).sum();
        eprintln!(
            "50 connections, {migrated} migrated off the killed worker, served by {served_by:?}"
        );
        assert!(
            migrated >= 5,
            "the kernel moved the stopped worker's queue: {migrated}"
        );
        assert!(cluster.stop().status.success());
    });
}

#[test]
fn a_worker_killed_under_load_loses_at_most_what_it_had_accepted() {
    root_test("kill_under_load", || {
        let cluster = start(4);
        let load = RequestLoop::start(addr(), CLIENTS);
        thread::sleep(Duration::from_secs(2));
        let victim = get(addr()).expect("a request").pid;
        signal(victim, Signal::SIGKILL);
        thread::sleep(Duration::from_secs(2));
        let (answered, failures) = load.finish();
        let sent: u64 = answered.values().sum::<u64>() + failures.len() as u64;
        let migrated: u64 = cluster.status().workers.iter().map(|w| w.migrated).sum();
        eprintln!(
            "kill under load: {sent} requests, {} failed (each client has one in flight, so at most {CLIENTS}), {migrated} queued connections migrated",
            failures.len()
        );
        assert!(failures.len() <= CLIENTS as usize, "{failures:?}");
        assert!(cluster.stop().status.success());
    });
}

#[test]
fn systemd_hears_ready_reloading_and_stopping() {
    root_test("systemd_notify", || {
        let path =
            std::env::temp_dir().join(format!("clb-fake-systemd-{}.sock", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let systemd = UnixDatagram::bind(&path).expect("notify socket");
        systemd
            .set_read_timeout(Some(Duration::from_secs(20)))
            .expect("timeout");
        let server = rust_server();
        let cluster = Cluster::start_with(
            &["run", "-w", "2", "--listen", ADDR, "--", &server],
            |command| {
                command.env("NOTIFY_SOCKET", &path);
            },
        );
        let next = || {
            let mut buffer = [0u8; 512];
            let n = systemd.recv(&mut buffer).expect("a notification");
            String::from_utf8_lossy(&buffer[..n]).into_owned()
        };
        assert_eq!(next(), "READY=1");
        signal(cluster.pid(), Signal::SIGHUP);
        let reloading = next();
        assert!(
            reloading.starts_with("RELOADING=1\nMONOTONIC_USEC="),
            "{reloading}"
        );
        let usec: u64 = reloading
            .rsplit('=')
            .next()
            .and_then(|v| v.parse().ok())
            .expect("usec");
        assert!(usec > 0);
        assert_eq!(next(), "READY=1");
        let reloaded = cluster.wait_for_event("reload-finished", Duration::from_secs(10), |_| true);
        assert_eq!(reloaded["ok"], true);
        assert!(cluster.stop().status.success());
        assert_eq!(next(), "STOPPING=1");
        let _ = std::fs::remove_file(&path);
    });
}

/// A small deterministic generator, seeded from the clock and printed, so a failing run can be
/// replayed by setting CHAOS_SEED.
struct Chaos(u64);

impl Chaos {
    fn new() -> Chaos {
        let seed = std::env::var("CHAOS_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(1, |d| d.as_nanos() as u64)
            });
        eprintln!("chaos seed {seed} (CHAOS_SEED={seed} replays it)");
        Chaos(seed | 1)
    }

    fn below(&mut self, n: u64) -> u64 {
        // xorshift64*
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) % n
    }
}

/// 20 s of random SIGKILLs (of any ready worker, the last one too), reloads and scales
/// under a sequential client: no more failed connections than kills (a killed worker loses at
/// most the one connection it had accepted; its queue migrates), and 10 s after the chaos every
/// wanted worker is ready.
#[test]
fn twenty_seconds_of_kills_reloads_and_scales_end_with_every_wanted_worker_ready() {
    root_test("chaos", || {
        let cluster = start(4);
        let control = cluster.control().to_path_buf();
        let client = RequestLoop::start(addr(), 1);
        let mut chaos = Chaos::new();
        let (mut kills, mut reloads, mut scales) = (0u64, 0u64, 0u64);
        let until = Instant::now() + Duration::from_secs(20);
        while Instant::now() < until {
            thread::sleep(Duration::from_millis(200 + chaos.below(600)));
            match chaos.below(3) {
                0 => {
                    let serving: Vec<i32> = cluster
                        .status()
                        .workers
                        .iter()
                        .filter(|w| w.state == WorkerState::Ready)
                        .map(|w| w.pid)
                        .collect();
                    // The last ready worker too: with none left, connections wait in the
                    // reserve until a restart (whose delay grows as the chaos kills the same
                    // ids again) instead of being refused.
                    let pick = chaos.below(serving.len().max(1) as u64) as usize;
                    if let Some(&pid) = serving.get(pick) {
                        let _ = nix::sys::signal::kill(
                            nix::unistd::Pid::from_raw(pid),
                            Signal::SIGKILL,
                        );
                        kills += 1;
                    }
                }
                1 => {
                    // A reload answers when it is done; the chaos does not wait for it.
                    let control = control.clone();
                    thread::spawn(move || {
                        request(&control, &Request::Reload, Duration::from_secs(120))
                    });
                    reloads += 1;
                }
                _ => {
                    let workers = 2 + chaos.below(5) as u32;
                    let _ = request(
                        &control,
                        &Request::Scale { workers },
                        Duration::from_secs(5),
                    );
                    scales += 1;
                }
            }
        }
        let wanted = cluster.status().desired as usize;
        let settled = Instant::now();
        let status = cluster.wait_until(
            &format!("{wanted} workers ready"),
            Duration::from_secs(10),
            |status| {
                !status.reloading
                    && status.workers.len() == wanted
                    && status.workers.iter().all(|w| w.state == WorkerState::Ready)
            },
        );
        let took = settled.elapsed();
        let (answered, failures) = client.finish();
        let answered: u64 = answered.values().sum();
        eprintln!(
            "chaos: {kills} kills, {reloads} reloads, {scales} scales in 20 s; {answered} requests answered, {} failed; {wanted} wanted workers ready {:.1} s after the chaos",
            failures.len(),
            took.as_secs_f64()
        );
        assert!(
            failures.len() as u64 <= kills,
            "{} failures for {kills} kills: {failures:?}",
            failures.len()
        );
        let mut ids: Vec<u32> = status.workers.iter().map(|w| w.id).collect();
        ids.sort_unstable();
        assert_eq!(ids, (0..wanted as u32).collect::<Vec<_>>());
        assert!(cluster.stop().status.success());
    });
}

/// Ten rolling reloads while wrk keeps connections alive: every request is answered. A stopping
/// worker answers further requests on its connections with `Connection: close` and closes only
/// connections that stay idle, so no request races a close (issue 14, item 15).
fn keep_alive_clients_through_ten_reloads(server: &[&str], listen_flags: &[&str]) {
    let mut args = vec!["run", "-w", "4", "--listen", ADDR];
    args.extend_from_slice(listen_flags);
    args.push("--");
    args.extend_from_slice(server);
    let cluster = Cluster::start(&args);
    cluster.wait_until_ready(4);
    let load = cluster_lb_tests::wrk(addr(), 8, 25);
    thread::sleep(Duration::from_millis(500));
    for round in 1..=10 {
        let reply = request(cluster.control(), &Request::Reload, Duration::from_secs(60))
            .unwrap_or_else(|e| panic!("reload {round}: {e}"));
        assert_eq!(reply, Reply::Reloaded { replaced: 4 });
    }
    // And the replaced workers are gone soon, although the clients never close their
    // connections: they were answered `Connection: close` and came back to the new workers.
    let started = Instant::now();
    cluster.wait_until_ready(4);
    eprintln!(
        "every old worker gone {:.1} s after the last reload",
        started.elapsed().as_secs_f64()
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "old workers kept serving kept-alive connections"
    );
    let result = load.join().expect("wrk");
    eprintln!(
        "keep-alive through 10 reloads: {} requests, {} errors",
        result.requests, result.errors
    );
    assert!(result.requests > 1000, "{result:?}");
    assert_eq!(result.errors, 0, "{result:?}");
    assert!(cluster.stop().status.success());
}

#[test]
fn keep_alive_clients_see_no_error_through_ten_reloads_of_the_rust_example() {
    root_test("keep_alive_reloads_rust", || {
        keep_alive_clients_through_ten_reloads(&[&rust_server()], &[]);
    });
}

#[test]
fn keep_alive_clients_see_no_error_through_ten_reloads_of_the_node_example() {
    root_test("keep_alive_reloads_node", || {
        let server = cluster_lb_tests::example("node/server.js");
        keep_alive_clients_through_ten_reloads(&["node", &server], &[]);
    });
}
