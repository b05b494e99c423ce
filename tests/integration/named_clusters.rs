//! Several clusters on one host: each is found by its name (`--name`, or one made from its
//! first address or its program) in the run directory, a plain `status` lists them all,
//! `--name` picks one, and a name already running is refused. Every cluster here lives in a
//! run directory of the test's own (CLUSTER_LB_RUN_DIR), never the host's /run/cluster-lb.

use std::{os::unix::net::UnixListener, time::Duration};

use cluster_lb_tests::{
    cluster_lb_in, get, pid_of, root_test, run_dir, rust_server, signal, Cluster, ClusterStatus,
    WorkerState,
};
use nix::sys::signal::Signal;

/// `cluster-lb status --json` without a name: every running cluster, sorted by name.
/// `status --json`'s list; it exits 1 (and lists none) when no cluster answers.
fn listed(dir: &std::path::Path) -> Vec<ClusterStatus> {
    let (code, stdout, stderr) = cluster_lb_in(dir, &["status", "--json"]);
    let clusters: Vec<ClusterStatus> =
        serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("status --json: {e}: {stdout}"));
    let expected = if clusters.is_empty() { 1 } else { 0 };
    assert_eq!(code, Some(expected), "status --json: {stderr:?}");
    clusters
}

fn names(clusters: &[ClusterStatus]) -> Vec<String> {
    clusters
        .iter()
        .map(|c| c.name.clone().unwrap_or_default())
        .collect()
}

#[test]
fn clusters_are_listed_together_and_picked_by_name() {
    root_test("named_clusters", || {
        let dir = run_dir();
        let server = rust_server();
        let a = Cluster::start_named(
            &dir,
            "a",
            &[
                "run",
                "-w",
                "2",
                "--name",
                "a",
                "--listen",
                "127.0.0.1:8080",
                "--",
                &server,
            ],
        );
        // No --name: the cluster is called after its first address.
        let b = Cluster::start_named(
            &dir,
            "8081",
            &["run", "-w", "1", "--listen", "8081", "--", &server],
        );
        a.wait_until_ready(2);
        b.wait_until_ready(1);
        get("127.0.0.1:8080".parse().unwrap()).expect("a serves");
        get("127.0.0.1:8081".parse().unwrap()).expect("8081 serves");

        let clusters = listed(&dir);
        assert_eq!(names(&clusters), ["8081", "a"]);
        assert_eq!(clusters[0].primary_pid, b.pid());
        assert_eq!(clusters[0].listen, ["0.0.0.0:8081"]);
        assert_eq!(clusters[1].primary_pid, a.pid());
        assert_eq!((clusters[1].desired, clusters[1].workers.len()), (2, 2));
        let (code, table, _) = cluster_lb_in(&dir, &["status"]);
        assert_eq!(code, Some(0));
        assert_eq!(
            table.lines().count(),
            3,
            "a header and one line per cluster:\n{table}"
        );

        // --name picks one: only a is reloaded.
        let (code, stdout, stderr) = cluster_lb_in(&dir, &["reload", "--name", "a"]);
        assert_eq!(code, Some(0), "{stderr:?}");
        assert!(stdout.contains("2 workers replaced"), "{stdout}");
        a.wait_for_events("reload-finished", 1, Duration::from_secs(5));
        assert_eq!(a.status().reloads, 1);
        assert_eq!(b.status().reloads, 0);
        assert!(b.events_named("reload-started").is_empty());
        a.wait_until_ready(2); // the replaced workers have exited
        let (code, workers, _) = cluster_lb_in(&dir, &["status", "--name", "a"]);
        assert_eq!(code, Some(0));
        assert!(
            workers.starts_with(&format!("cluster-lb a, pid {}", a.pid())),
            "{workers}"
        );
        assert_eq!(
            workers.lines().count(),
            4,
            "a line, a header, 2 workers:\n{workers}"
        );
        let (code, one, _) = cluster_lb_in(&dir, &["status", "--json", "--name", "8081"]);
        assert_eq!(code, Some(0));
        let one: ClusterStatus = serde_json::from_str(&one).expect("status --name --json");
        assert_eq!(
            (one.name.as_deref(), one.primary_pid),
            (Some("8081"), b.pid())
        );

        // With two running, a command without --name names both and does nothing.
        for args in [&["stop"][..], &["reload"], &["scale", "3"]] {
            let (code, _, stderr) = cluster_lb_in(&dir, args);
            assert_eq!(code, Some(1), "{args:?}");
            assert_eq!(stderr.len(), 1, "{args:?}: {stderr:#?}");
            assert!(
                stderr[0].starts_with(
                    "cluster-lb: error: 2 clusters are running (8081, a); pick one with --name"
                ),
                "{}",
                stderr[0]
            );
        }
        assert!(a.events_named("stopping").is_empty());
        assert!(b.events_named("stopping").is_empty());
        assert_eq!(b.status().desired, 1);

        // A name nobody runs is one line too.
        let (code, _, stderr) = cluster_lb_in(&dir, &["stop", "--name", "c"]);
        assert_eq!(code, Some(1));
        assert_eq!(stderr.len(), 1, "{stderr:#?}");
        assert!(
            stderr[0].contains("no cluster named c is running"),
            "{}",
            stderr[0]
        );

        let (code, _, stderr) = cluster_lb_in(&dir, &["scale", "--name", "8081", "2"]);
        assert_eq!(code, Some(0), "{stderr:?}");
        b.wait_until_ready(2);
        assert_eq!(a.status().desired, 2);

        let (code, _, _) = cluster_lb_in(&dir, &["stop", "--name", "a"]);
        assert_eq!(code, Some(0));
        let mut a = a;
        assert!(a.wait_exit(Duration::from_secs(40)).success());
        assert!(
            !dir.join("a.sock").exists(),
            "a's socket is removed when it stops"
        );
        // One left: commands without --name act on it.
        assert_eq!(names(&listed(&dir)), ["8081"]);
        let (code, _, stderr) = cluster_lb_in(&dir, &["stop"]);
        assert_eq!(code, Some(0), "{stderr:?}");
        let mut b = b;
        assert!(b.wait_exit(Duration::from_secs(40)).success());
        assert!(listed(&dir).is_empty());
        let (code, _, stderr) = cluster_lb_in(&dir, &["status"]);
        assert_eq!(code, Some(1), "plain status with none running");
        assert!(stderr[0].contains("no cluster-lb is running"), "{stderr:?}");
        let (code, _, stderr) = cluster_lb_in(&dir, &["stop"]);
        assert_eq!(code, Some(1));
        assert!(stderr[0].contains("no cluster-lb is running"), "{stderr:?}");
    });
}

#[test]
fn a_name_in_use_is_refused_and_a_stale_socket_replaced() {
    root_test("name_in_use", || {
        let dir = run_dir();
        let server = rust_server();
        let first = Cluster::start_named(
            &dir,
            "api",
            &[
                "run",
                "-w",
                "1",
                "--name",
                "api",
                "--listen",
                "127.0.0.1:8080",
                "--",
                &server,
            ],
        );
        first.wait_until_ready(1);
        let (code, _, stderr) = cluster_lb_in(
            &dir,
            &[
                "run",
                "-w",
                "1",
                "--name",
                "api",
                "--listen",
                "127.0.0.1:8081",
                "--",
                &server,
            ],
        );
        assert_eq!(code, Some(1));
        assert_eq!(stderr.len(), 1, "{stderr:#?}");
        assert!(
            stderr[0].starts_with("cluster-lb: error: a cluster named api is already running"),
            "{}",
            stderr[0]
        );
        // Refused before binding anything: the port is free, the first cluster untouched.
        std::net::TcpListener::bind("127.0.0.1:8081").expect("8081 was not taken");
        assert_eq!(first.status().primary_pid, first.pid());
        get("127.0.0.1:8080".parse().unwrap()).expect("the first cluster still serves");

        // A socket file left by a primary that was killed: nobody answers on it.
        drop(UnixListener::bind(dir.join("sleep.sock")).expect("a stale socket"));
        assert!(dir.join("sleep.sock").exists());
        assert_eq!(names(&listed(&dir)), ["api"], "the stale socket is skipped");
        // No --listen: the cluster is called after its program, and takes the stale name.
        let second = Cluster::start_named(&dir, "sleep", &["run", "-w", "1", "--", "sleep", "600"]);
        second.wait_until_ready(1);
        assert_eq!(names(&listed(&dir)), ["api", "sleep"]);
        assert_eq!(second.status().name.as_deref(), Some("sleep"));
    });
}

/// `status --ready` is the readiness probe (deploy/kubernetes.yaml runs it): exit 1 with one
/// line until every wanted worker is ready, 0 then, and 1 again while a worker is replaced.
#[test]
fn status_ready_fails_until_every_wanted_worker_is_ready() {
    root_test("status_ready", || {
        let dir = run_dir();
        // `sleep` signals nothing, so each worker is ready 3 s after it starts (--ready-delay).
        let cluster = Cluster::start_named(
            &dir,
            "probe",
            &[
                "run",
                "-w",
                "2",
                "--name",
                "probe",
                "--ready-delay",
                "3",
                "--ready-timeout",
                "30",
                "--listen",
                "127.0.0.1:8080",
                "--",
                "sleep",
                "600",
            ],
        );
        let not_ready = |ready: u32| {
            for args in [
                &["status", "--ready", "--name", "probe"][..],
                &["status", "--ready"],
            ] {
                let (code, stdout, stderr) = cluster_lb_in(&dir, args);
                assert_eq!(code, Some(1), "{args:?}: {stdout}{stderr:?}");
                assert_eq!(
                    stderr,
                    [format!("cluster-lb: error: cluster probe is not ready: {ready} of its 2 wanted workers are ready; `cluster-lb status` shows the state of each")],
                    "{args:?}"
                );
                assert!(
                    stdout.contains("probe"),
                    "the status is printed too: {stdout}"
                );
            }
        };
        let is_ready = || {
            for args in [
                &["status", "--ready", "--name", "probe"][..],
                &["status", "--ready"],
            ] {
                let (code, _, stderr) = cluster_lb_in(&dir, args);
                assert_eq!(code, Some(0), "{args:?}: {stderr:?}");
            }
        };
        // Started (plain status answers), not yet ready.
        let started = cluster.wait_until("an answer", Duration::from_secs(10), |s| {
            s.workers.len() == 2
        });
        assert!(started
            .workers
            .iter()
            .all(|w| w.state == WorkerState::Starting));
        let (code, _, _) = cluster_lb_in(&dir, &["status", "--name", "probe"]);
        assert_eq!(
            code,
            Some(0),
            "plain status succeeds as soon as the primary answers"
        );
        not_ready(0);

        cluster.wait_until_ready(2);
        is_ready();

        // A rolling reload: each old worker serves until its replacement is ready, so the
        // probe stays at 0 throughout (about 6 s: two replacements, 3 s each).
        let reload = {
            let dir = dir.to_path_buf();
            std::thread::spawn(move || cluster_lb_in(&dir, &["reload", "--name", "probe"]))
        };
        let mut probes = 0;
        while !reload.is_finished() {
            is_ready();
            probes += 1;
            std::thread::sleep(Duration::from_millis(100));
        }
        let (code, stdout, stderr) = reload.join().expect("reload thread");
        assert_eq!(code, Some(0), "{stdout}{stderr:?}");
        assert!(stdout.contains("2 workers replaced"), "{stdout}");
        assert!(
            probes >= 10,
            "the probe ran {probes} times during the reload"
        );
        let ready = cluster.wait_until_ready(2);
        is_ready();

        // A worker dies: its replacement needs 3 s to be ready, and the probe says so.
        let victim = pid_of(&ready, 1);
        signal(victim as u32, Signal::SIGKILL);
        cluster.wait_for_event("exit", Duration::from_secs(5), |e| e["pid"] == victim);
        not_ready(1);
        cluster.wait_until_ready(2);
        is_ready();
        assert!(cluster.stop().status.success());
    });
}
