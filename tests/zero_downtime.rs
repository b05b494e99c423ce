//! Deploys and scaling under load: rolling reloads, scale up and down, draining with request
//! migration, a worker killed under load, and systemd's notify protocol.

use std::{
    collections::BTreeMap,
    net::{SocketAddr, TcpStream},
    os::unix::net::UnixDatagram,
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    thread,
    time::{Duration, Instant},
};

use cluster_lb::{
    control::{request, Request},
    supervisor::ClusterStatus,
};
use cluster_lb_tests::{get, root_test, signal, workspace_binary, Cluster};
use nix::sys::signal::Signal;

const ADDR: &str = "127.0.0.1:8080";
const METRICS: &str = "127.0.0.1:9100";
const CLIENTS: usize = 8;

fn addr() -> SocketAddr {
    ADDR.parse().expect("test address")
}

fn control_path(test: &str) -> PathBuf {
    std::env::temp_dir().join(format!("clb-{test}-{}.sock", std::process::id()))
}

fn start(test: &str, workers: u32) -> (Cluster, PathBuf) {
    let control = control_path(test);
    let server = workspace_binary("example-rust-server")
        .display()
        .to_string();
    let n = workers.to_string();
    let cluster = Cluster::start(&[
        "run",
        "-w",
        &n,
        "--listen",
        ADDR,
        "--control",
        control.to_str().expect("path"),
        "--metrics",
        METRICS,
        "--",
        &server,
    ]);
    cluster.wait_serving(workers as usize);
    (cluster, control)
}

fn status(control: &Path) -> ClusterStatus {
    let answer = request(control, &Request::Status, Duration::from_secs(5)).expect("status");
    serde_json::from_value(answer["status"].clone()).expect("status format")
}

/// What the clients saw: answers per worker pid, and the failures.
type Tally = (BTreeMap<u32, u64>, Vec<String>);

/// Connection-per-request clients until `stop`.
struct Load {
    stop: Arc<AtomicBool>,
    clients: Vec<thread::JoinHandle<Tally>>,
}

impl Load {
    fn start() -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let clients = (0..CLIENTS)
            .map(|_| {
                let stop = Arc::clone(&stop);
                thread::spawn(move || {
                    let mut answered = BTreeMap::new();
                    let mut failures = Vec::new();
                    let deadline = Instant::now() + Duration::from_secs(120);
                    while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                        match get(addr()) {
                            Ok(answer) => *answered.entry(answer.pid).or_insert(0) += 1,
                            Err(e) => failures.push(format!("{e:#}")),
                        }
                    }
                    (answered, failures)
                })
            })
            .collect();
        Load { stop, clients }
    }

    fn finish(self) -> Tally {
        self.stop.store(true, Ordering::Relaxed);
        let mut answered = BTreeMap::new();
        let mut failures = Vec::new();
        for client in self.clients {
            let (a, f) = client.join().expect("client thread");
            for (pid, n) in a {
                *answered.entry(pid).or_insert(0) += n;
            }
            failures.extend(f);
        }
        (answered, failures)
    }
}

fn metrics_text() -> String {
    use std::io::{Read, Write};
    let mut stream = TcpStream::connect(METRICS).expect("metrics");
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .expect("request");
    let mut text = String::new();
    stream.read_to_string(&mut text).expect("response");
    text
}

#[test]
fn three_reloads_and_scaling_under_load_fail_no_request() {
    root_test("reload_under_load", || {
        let (cluster, control) = start("reload-load", 4);
        let started = Instant::now();
        let load = Load::start();
        thread::sleep(Duration::from_secs(1));
        for round in 1..=3 {
            let answer = request(&control, &Request::Reload, Duration::from_secs(120))
                .unwrap_or_else(|e| panic!("reload {round}: {e:#}"));
            assert_eq!(answer["message"], "reload complete: 4 workers replaced");
            thread::sleep(Duration::from_millis(1500));
        }
        request(
            &control,
            &Request::Scale { workers: 6 },
            Duration::from_secs(5),
        )
        .expect("scale up");
        cluster.wait_count(") ready (", 4 + 12 + 2);
        thread::sleep(Duration::from_millis(1500));
        request(
            &control,
            &Request::Scale { workers: 3 },
            Duration::from_secs(5),
        )
        .expect("scale down");
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

        let final_set = status(&control);
        assert_eq!(final_set.reloads, 3);
        assert_eq!(final_set.workers.len(), 3, "{final_set:?}");
        let metrics = metrics_text();
        for worker in &final_set.workers {
            let seen = answered.get(&(worker.pid as u32)).copied().unwrap_or(0);
            assert!(
                seen > 0,
                "worker {} (pid {}) served nothing",
                worker.id,
                worker.pid
            );
            assert_eq!(worker.state, "ready");
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
        let (status, _) = cluster.stop();
        assert!(status.success());
    });
}

#[test]
fn connections_queued_on_a_stopped_worker_migrate_when_it_dies() {
    root_test("drain_migration", || {
        let (cluster, control) = start("migration", 4);
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
        cluster.wait_count(") ready (", 5);
        let migrated: u64 = status(&control).workers.iter().map(|w| w.migrated).sum();
        eprintln!(
            "50 connections, {migrated} migrated off the killed worker, served by {served_by:?}"
        );
        assert!(
            migrated >= 5,
            "the kernel moved the stopped worker's queue: {migrated}"
        );
        let (status, _) = cluster.stop();
        assert!(status.success());
    });
}

#[test]
fn a_worker_killed_under_load_loses_at_most_what_it_had_accepted() {
    root_test("kill_under_load", || {
        let (cluster, control) = start("kill-load", 4);
        let load = Load::start();
        thread::sleep(Duration::from_secs(2));
        let victim = get(addr()).expect("a request").pid;
        signal(victim, Signal::SIGKILL);
        thread::sleep(Duration::from_secs(2));
        let (answered, failures) = load.finish();
        let sent: u64 = answered.values().sum::<u64>() + failures.len() as u64;
        let migrated: u64 = status(&control).workers.iter().map(|w| w.migrated).sum();
        eprintln!(
            "kill under load: {sent} requests, {} failed (each client has one in flight, so at most {CLIENTS}), {migrated} queued connections migrated",
            failures.len()
        );
        assert!(failures.len() <= CLIENTS, "{failures:?}");
        let (status, _) = cluster.stop();
        assert!(status.success());
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
        let server = workspace_binary("example-rust-server")
            .display()
            .to_string();
        let control = control_path("notify");
        let cluster = Cluster::start_with(
            &[
                "run",
                "-w",
                "2",
                "--listen",
                ADDR,
                "--control",
                control.to_str().expect("path"),
                "--",
                &server,
            ],
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
        cluster.wait_for_log("reload complete", Duration::from_secs(10));
        let (status, _) = cluster.stop();
        assert!(status.success());
        assert_eq!(next(), "STOPPING=1");
        let _ = std::fs::remove_file(&path);
    });
}
