//! In-place upgrade (`cluster-lb upgrade`, SIGUSR2): the primary re-executes the binary at its
//! path and hands itself its state. Each test runs a copy of cluster-lb from a directory of its
//! own, replaces that file (as a package manager does: a new file renamed over the old), and
//! asks for the upgrade. The "new build" is the same binary with another build tag stamped in
//! (see cluster_lb::version), so its version string differs and so does the file.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddr,
    os::unix::fs::{MetadataExt, PermissionsExt},
    path::PathBuf,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    thread,
    time::{Duration, Instant},
};

use cluster_lb::control::{request, Reply, Request};
use cluster_lb_tests::{
    addr, example, get, metrics_text, node_binaries, root_test, rust_server, signal, target_dir,
    workspace_binary, wrk, Cluster, RequestLoop, WorkerState, ADDR,
};
use nix::sys::signal::Signal;

const METRICS: &str = "127.0.0.1:9100";

/// A directory of the test's own holding a copy of cluster-lb, which the test replaces.
struct Install {
    dir: PathBuf,
}

/// The copies are 80 MB each (a debug build); the kernel-matrix VMs keep files in RAM.
impl Drop for Install {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Install {
    fn new(name: &str) -> Install {
        let dir = target_dir().join("upgrade-tests").join(name);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("test directory");
        let install = Install { dir };
        install.replace_with(&std::fs::read(workspace_binary("cluster-lb")).expect("binary"));
        install
    }

    fn binary(&self) -> PathBuf {
        self.dir.join("cluster-lb")
    }

    /// Puts `bytes` at the binary's path the way a package manager does: a new file, renamed
    /// over the old one (which the running primary still executes).
    fn replace_with(&self, bytes: &[u8]) {
        let next = self.dir.join(".cluster-lb.new");
        std::fs::write(&next, bytes).expect("writing the new binary");
        std::fs::set_permissions(&next, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        std::fs::rename(&next, self.binary()).expect("renaming the new binary into place");
    }

    /// Installs the workspace's cluster-lb stamped with build tag `tag`; returns its version.
    fn install_build(&self, tag: &str) -> String {
        let mut bytes = std::fs::read(workspace_binary("cluster-lb")).expect("binary");
        cluster_lb::version::stamp(&mut bytes, tag).expect("stamping the build tag");
        self.replace_with(&bytes);
        format!("{}+{tag}", env!("CARGO_PKG_VERSION"))
    }

    fn start(&self, args: &[&str]) -> Cluster {
        Cluster::start_binary(&self.binary(), args, |_| {})
    }
}

fn upgrade(cluster: &Cluster) -> Result<Reply, String> {
    request(
        cluster.control(),
        &Request::Upgrade,
        Duration::from_secs(60),
    )
    .map_err(|e| e.to_string())
}

/// Installs build `tag` and upgrades to it: the reply counts `workers`' processes, they are the
/// ones that run after it, and the new version is the primary's.
fn upgrade_to_build(cluster: &Cluster, install: &Install, tag: &str, workers: &BTreeSet<i32>) {
    let new_version = install.install_build(tag);
    let reply = upgrade(cluster).expect("upgrade");
    assert!(
        matches!(reply, Reply::Upgraded { workers: n, .. } if n as usize == workers.len()),
        "{reply:?}"
    );
    assert_eq!(&pids(cluster), workers);
    assert_eq!(cluster.status().version, new_version);
}

fn pids(cluster: &Cluster) -> BTreeSet<i32> {
    cluster.status().workers.iter().map(|w| w.pid).collect()
}

/// 3000 connections one after another, in the background; what each worker answered, and
/// the failures. `done` counts them as they go.
fn sequential_connections(
    count: u64,
    done: Arc<AtomicU64>,
) -> thread::JoinHandle<(BTreeMap<u32, u64>, Vec<String>)> {
    thread::spawn(move || {
        let mut answered = BTreeMap::new();
        let mut failures = Vec::new();
        for _ in 0..count {
            match get(addr()) {
                Ok(answer) => *answered.entry(answer.pid).or_insert(0) += 1,
                Err(e) => failures.push(format!("{e:#}")),
            }
            done.fetch_add(1, Ordering::Relaxed);
        }
        (answered, failures)
    })
}

#[test]
fn an_upgrade_under_load_keeps_the_pid_the_workers_and_every_connection() {
    root_test("upgrade_under_load", || {
        let install = Install::new("under-load");
        let server = rust_server();
        let cluster = install.start(&[
            "run",
            "-w",
            "4",
            "--listen",
            ADDR,
            "--metrics",
            METRICS,
            "--",
            &server,
        ]);
        let before = cluster.wait_until_ready(4);
        let workers_before = pids(&cluster);
        let old_version = before.version.clone();

        let done = Arc::new(AtomicU64::new(0));
        let sequential = sequential_connections(3000, Arc::clone(&done));
        let load = wrk(addr(), 8, 6);
        while done.load(Ordering::Relaxed) < 600 {
            thread::sleep(Duration::from_millis(10));
        }
        let new_version = install.install_build("upgrade-test");
        let asked = Instant::now();
        let reply = upgrade(&cluster).expect("the upgrade");
        let took = asked.elapsed();
        assert_eq!(
            reply,
            Reply::Upgraded {
                from: old_version.clone(),
                to: new_version.clone(),
                pid: cluster.pid(),
                workers: 4,
            }
        );
        let (answered, failures) = sequential.join().expect("sequential client");
        let wrk = load.join().expect("wrk");
        eprintln!(
            "upgrade took {:.0} ms; sequential: {} answered, {} failed; wrk: {} requests, {} errors",
            took.as_secs_f64() * 1000.0,
            answered.values().sum::<u64>(),
            failures.len(),
            wrk.requests,
            wrk.errors
        );
        assert!(
            failures.is_empty(),
            "{} failed: {:?}",
            failures.len(),
            &failures[..failures.len().min(5)]
        );
        assert_eq!(answered.values().sum::<u64>(), 3000);
        assert_eq!(wrk.errors, 0, "wrk saw errors across the upgrade");
        assert!(wrk.requests > 1000, "wrk ran: {}", wrk.requests);

        // The same primary and the same workers, now running the new file.
        let after = cluster.status();
        assert_eq!(after.primary_pid, cluster.pid());
        assert_eq!(after.version, new_version);
        assert_eq!(pids(&cluster), workers_before);
        assert!(after.workers.iter().all(|w| w.state == WorkerState::Ready));
        let exe = PathBuf::from(format!("/proc/{}/exe", cluster.pid()));
        assert_eq!(
            std::fs::read_link(&exe).expect("exe link"),
            install.binary().canonicalize().expect("binary path")
        );
        assert_eq!(
            std::fs::metadata(&exe).expect("exe").ino(),
            std::fs::metadata(install.binary()).expect("binary").ino(),
            "the primary executes the new file"
        );
        // Every worker kept serving, and the kernel's counters went on from where they were.
        for worker in &after.workers {
            let seen = answered.get(&(worker.pid as u32)).copied().unwrap_or(0);
            assert!(
                seen > 3000 / 8,
                "worker {} served {seen} of 3000",
                worker.id
            );
            assert!(
                worker.selected >= seen,
                "counters restarted: {worker:?} served {seen}"
            );
        }
        let fallback: u64 = after.workers.iter().map(|w| w.fallback).sum();
        eprintln!("connections the kernel's hash placed during the swap: {fallback}");
        let metrics = metrics_text(METRICS);
        assert!(
            metrics.contains(&format!("cluster_lb_build_info{{version=\"{new_version}\"")),
            "{metrics}"
        );
        let upgraded = cluster.events_named("upgraded");
        assert_eq!(upgraded.len(), 1, "{upgraded:?}");
        assert_eq!(upgraded[0]["from"], old_version.as_str());
        assert_eq!(upgraded[0]["to"], new_version.as_str());
        assert!(cluster.events_named("exit").is_empty(), "no worker exited");

        // The new primary supervises: a reload replaces the workers, and a stop ends cleanly.
        let reply = request(cluster.control(), &Request::Reload, Duration::from_secs(60));
        assert_eq!(reply.expect("reload"), Reply::Reloaded { replaced: 4 });
        let old = workers_before.clone();
        cluster.wait_until("only new workers", Duration::from_secs(20), move |s| {
            s.workers.len() == 4 && s.workers.iter().all(|w| !old.contains(&w.pid))
        });
        let stopped = cluster.stop();
        assert!(stopped.status.success());
    });
}

#[test]
fn an_upgrade_to_a_broken_binary_leaves_the_old_primary_in_charge() {
    root_test("upgrade_broken", || {
        let install = Install::new("broken");
        let server = rust_server();
        let cluster = install.start(&["run", "-w", "2", "--listen", ADDR, "--", &server]);
        cluster.wait_until_ready(2);
        let workers = pids(&cluster);
        let version = cluster.status().version;

        let refusals = [
            // Exits 1 at once.
            (b"#!/bin/sh\nexit 1\n".to_vec(), "exited 1 in its check"),
            // Not a program at all.
            (b"garbage, not an executable".to_vec(), "cannot be started"),
        ];
        for (bytes, expected) in refusals {
            install.replace_with(&bytes);
            // As an operator runs it: `cluster-lb upgrade`, one line on stderr, exit 1.
            let output = std::process::Command::new(workspace_binary("cluster-lb"))
                .args(["upgrade", "--control"])
                .arg(cluster.control())
                .output()
                .expect("cluster-lb upgrade");
            let error = String::from_utf8_lossy(&output.stderr).to_string();
            eprintln!("refused: {error}");
            assert_eq!(output.status.code(), Some(1), "{error}");
            assert_eq!(error.lines().count(), 1, "one line: {error:?}");
            assert!(
                error.starts_with("cluster-lb: error: upgrade refused: the new binary"),
                "{error}"
            );
            assert!(error.contains(expected), "{error}");
            assert!(error.contains("stays in charge"), "{error}");
            let status = cluster.status();
            assert_eq!(status.version, version);
            assert_eq!(status.primary_pid, cluster.pid());
            assert_eq!(pids(&cluster), workers);
            assert!(status.workers.iter().all(|w| w.state == WorkerState::Ready));
            for _ in 0..20 {
                get(addr()).expect("served under the old primary");
            }
        }
        // SIGUSR2 with a broken binary: the primary logs the refusal and goes on.
        install.replace_with(b"#!/bin/sh\nexit 1\n");
        signal(cluster.pid(), Signal::SIGUSR2);
        cluster.wait_for_line("stays in charge", Duration::from_secs(20));
        assert_eq!(pids(&cluster), workers);

        // Still upgradable once a good binary is in place, by SIGUSR2 this time.
        let new_version = install.install_build("after-broken");
        signal(cluster.pid(), Signal::SIGUSR2);
        cluster.wait_until("the new version", Duration::from_secs(20), |s| {
            s.version == new_version
        });
        assert_eq!(pids(&cluster), workers);
        assert!(cluster.stop().status.success());
    });
}

#[test]
fn an_upgrade_during_a_reload_is_refused_in_one_line() {
    root_test("upgrade_during_reload", || {
        let install = Install::new("during-reload");
        // Each worker takes a second to start, so the reload of three lasts about three.
        let script = format!("sleep 1; exec {}", rust_server());
        let cluster = install.start(&[
            "run", "-w", "3", "--listen", ADDR, "--", "sh", "-c", &script,
        ]);
        cluster.wait_until_ready(3);
        let control = cluster.control().to_path_buf();
        let reload =
            thread::spawn(move || request(&control, &Request::Reload, Duration::from_secs(60)));
        cluster.wait_for_events("reload-started", 1, Duration::from_secs(10));
        install.install_build("during-reload");
        let error = upgrade(&cluster).expect_err("refused during a reload");
        eprintln!("refused: {error}");
        assert!(!error.contains('\n'));
        assert!(error.contains("a reload is under way"), "{error}");
        assert_eq!(
            reload.join().expect("reload thread").expect("the reload"),
            Reply::Reloaded { replaced: 3 }
        );
        // Once the reload is over, the same request succeeds, while the last old worker may
        // still be draining: it goes on draining under the new primary.
        let reply = upgrade(&cluster).expect("upgrade after the reload");
        assert!(
            matches!(reply, Reply::Upgraded { workers: 3..=4, .. }),
            "{reply:?}"
        );
        cluster.wait_until("three ready workers", Duration::from_secs(20), |s| {
            s.workers.len() == 3 && s.workers.iter().all(|w| w.state == WorkerState::Ready)
        });
        assert!(cluster.stop().status.success());
    });
}

/// Node's own channel (issue 9) survives the exec: after the upgrade the new primary still
/// talks Node's protocol with the same workers; a reload (disconnect over that channel, and
/// queryServer from the replacements) proves it.
#[test]
fn node_workers_keep_their_channel_across_an_upgrade() {
    root_test("upgrade_node", || {
        let Some((major, node)) = node_binaries().into_iter().find(|(m, _)| *m == 20) else {
            panic!("Node 20 is missing: cargo xtask test installs it");
        };
        let install = Install::new("node");
        let node = node.display().to_string();
        let app = example("node/cluster-app.js");
        let cluster = Cluster::start_binary(
            &install.binary(),
            &["run", "-w", "2", "--", &node, &app],
            |c| {
                c.env("PORT", "3000");
            },
        );
        cluster.wait_until_ready(2);
        // The example has a primary branch: its primary runs too, and is handed over as is.
        let primary = cluster
            .wait_until("the program's primary", Duration::from_secs(20), |s| {
                s.program_primary.is_some()
            })
            .program_primary;
        let workers = pids(&cluster);
        let node_addr: SocketAddr = "127.0.0.1:3000".parse().expect("address");
        let load = RequestLoop::start(node_addr, 2);
        thread::sleep(Duration::from_millis(500));
        upgrade_to_build(&cluster, &install, "node", &workers);
        assert_eq!(
            cluster.status().program_primary,
            primary,
            "the primary was replaced"
        );
        thread::sleep(Duration::from_millis(500));
        let reply = request(cluster.control(), &Request::Reload, Duration::from_secs(60));
        assert_eq!(
            reply.expect("reload"),
            Reply::Reloaded { replaced: 2 },
            "Node {major}"
        );
        // The new binary still talks to the primary: it got the replacements as forks.
        assert_eq!(cluster.status().program_primary, primary);
        assert!(cluster.events_named("primary-exit").is_empty());
        thread::sleep(Duration::from_millis(300));
        let (answered, failures) = load.finish();
        assert!(failures.is_empty(), "Node {major}: {failures:?}");
        assert!(
            answered.len() >= 4,
            "old and new workers served: {answered:?}"
        );
        let stopped = cluster.stop();
        assert!(stopped.status.success());
        let exits: Vec<_> = stopped
            .events()
            .into_iter()
            .filter(|e| e["event"] == "exit")
            .collect();
        assert!(
            exits.iter().all(|e| e["code"] == 0),
            "graceful exits over the channel: {exits:?}"
        );
    });
}

#[test]
fn a_unix_socket_path_and_its_workers_survive_an_upgrade() {
    root_test("upgrade_unix", || {
        let Some((_, node)) = node_binaries().into_iter().find(|(m, _)| *m == 20) else {
            panic!("Node 20 is missing: cargo xtask test installs it");
        };
        let install = Install::new("unix");
        let path = install.dir.join("app.sock");
        let node = node.display().to_string();
        let app = crate::node::test_app("unix-app.js");
        let cluster = Cluster::start_binary(
            &install.binary(),
            &["run", "-w", "2", "--", &node, &app],
            |c| {
                c.env("SOCKET_PATH", &path);
            },
        );
        cluster.wait_until_ready(2);
        let workers = pids(&cluster);
        let load = RequestLoop::start_unix(&path, 2);
        thread::sleep(Duration::from_millis(500));
        upgrade_to_build(&cluster, &install, "unix", &workers);
        assert_eq!(
            cluster.status().listen,
            [format!("unix:{}", path.display())]
        );
        // The new binary holds the path's socket: replacements get it too.
        let reply = request(cluster.control(), &Request::Reload, Duration::from_secs(60));
        assert_eq!(reply.expect("reload"), Reply::Reloaded { replaced: 2 });
        thread::sleep(Duration::from_millis(300));
        let (answered, failures) = load.finish();
        assert!(failures.is_empty(), "{failures:?}");
        assert!(
            answered.len() >= 3,
            "old and new workers served: {answered:?}"
        );
        assert!(cluster.stop().status.success());
        assert!(
            !path.exists(),
            "the new binary did not remove the socket file"
        );
    });
}

/// Least-loaded across an upgrade: the new program's counts start at 0 (the connections open
/// across it carry the old program's socket storage, which the new counter never sees, so a
/// count seeded with them would never come down), new connections count, and the old ones'
/// closes leave the new counts alone.
#[test]
fn least_loaded_counts_start_again_after_an_upgrade() {
    root_test("upgrade_least_loaded", || {
        let install = Install::new("least-loaded");
        let server = rust_server();
        let cluster = install.start(&[
            "run",
            "-w",
            "2",
            "--listen",
            ADDR,
            "--strategy",
            "least-loaded",
            "--",
            &server,
        ]);
        cluster.wait_until_ready(2);
        let open =
            |cluster: &Cluster| -> u64 { cluster.status().workers.iter().map(|w| w.open).sum() };
        let connect = |n| -> Vec<std::net::TcpStream> {
            (0..n)
                .map(|_| std::net::TcpStream::connect(addr()).expect("connect"))
                .collect()
        };
        let before = connect(4);
        cluster.wait_until("4 open connections counted", Duration::from_secs(5), |s| {
            s.workers.iter().map(|w| w.open).sum::<u64>() == 4
        });
        let workers = pids(&cluster);
        upgrade_to_build(&cluster, &install, "least-loaded", &workers);
        assert_eq!(cluster.status().strategy, "least-loaded");
        assert_eq!(open(&cluster), 0, "counts seeded across the upgrade");

        let after = connect(2);
        cluster.wait_until("2 new connections counted", Duration::from_secs(5), |s| {
            s.workers.iter().map(|w| w.open).sum::<u64>() == 2
        });
        drop(before);
        thread::sleep(Duration::from_millis(300));
        assert_eq!(
            open(&cluster),
            2u64,
            "an old connection's close was counted"
        );
        drop(after);
        cluster.wait_until("no open connection counted", Duration::from_secs(5), |s| {
            s.workers.iter().all(|w| w.open == 0)
        });
        assert!(cluster.stop().status.success());
    });
}
