//! How connections are spread: exact round robin, flow hash, with real example servers.

use cluster_lb_tests::{addr, distribution, example, root_test, workspace_binary, Cluster, ADDR};

/// 400 sequential connections to 4 workers under round robin: exactly 100 each, and the
/// program's own counters (in `status`) say the same.
fn exact_round_robin(server: &[&str]) {
    let mut args = vec![
        "run",
        "-w",
        "4",
        "--listen",
        ADDR,
        "--strategy",
        "round-robin",
        "--",
    ];
    args.extend_from_slice(server);
    let cluster = Cluster::start(&args);
    let ready = cluster.wait_until_ready(4);

    let seen = distribution(addr(), 400);
    // Ids from 0, or from 1 for Node workers (cluster.worker.id).
    let expected: Vec<(u32, usize)> = ready.wanted_ids.iter().map(|id| (*id, 100)).collect();
    assert_eq!(seen.into_iter().collect::<Vec<_>>(), expected);

    let status = cluster.status();
    assert_eq!(status.strategy, "round-robin");
    for worker in &status.workers {
        assert_eq!(
            (worker.selected, worker.fallback, worker.migrated),
            (100, 0, 0),
            "kernel counters of worker {}",
            worker.id
        );
    }
    let stopped = cluster.stop();
    assert!(
        stopped.status.success(),
        "cluster-lb exit: {}",
        stopped.status
    );
}

#[test]
fn round_robin_gives_node_workers_exactly_equal_shares() {
    root_test("round_robin_node", || {
        exact_round_robin(&["node", &example("node/server.js")])
    });
}

#[test]
fn round_robin_gives_python_workers_exactly_equal_shares() {
    root_test("round_robin_python", || {
        exact_round_robin(&["python3", &example("python/server.py")])
    });
}

#[test]
fn round_robin_gives_rust_workers_exactly_equal_shares() {
    root_test("round_robin_rust", || {
        let server = workspace_binary("example-rust-server")
            .display()
            .to_string();
        exact_round_robin(&[&server])
    });
}

#[test]
fn hash_spreads_connections_over_every_worker() {
    root_test("hash_spread", || {
        let cluster = Cluster::start(&[
            "run",
            "-w",
            "4",
            "--listen",
            ADDR,
            "--strategy",
            "hash",
            "--",
            "python3",
            &example("python/server.py"),
        ]);
        cluster.wait_until_ready(4);
        let seen = distribution(addr(), 400);
        assert_eq!(seen.len(), 4, "every worker got connections: {seen:?}");
        for (id, count) in &seen {
            assert!(
                *count >= 60,
                "worker {id} got {count} of 400 (< 15%): {seen:?}"
            );
        }
        let counted: u64 = cluster.status().workers.iter().map(|w| w.selected).sum();
        assert_eq!(counted, 400, "the kernel placed every connection");
        assert!(cluster.stop().status.success());
    });
}

#[test]
fn ipv6_listen_addresses_serve() {
    root_test("ipv6_listen", || {
        let cluster = Cluster::serving(2, "[::1]:8080", &["node", &example("node/server.js")]);
        let seen = distribution("[::1]:8080".parse().expect("v6 address"), 10);
        assert_eq!(seen.into_iter().collect::<Vec<_>>(), vec![(1, 5), (2, 5)]);
        assert!(cluster.stop().status.success());
    });
}

/// 512 workers (the Rust example), exact round robin: 1024 connections, 2 each, and the
/// program's counters agree. The program's walk is bounded, so this costs what 2 workers do.
#[test]
fn five_hundred_twelve_workers_get_exact_round_robin() {
    root_test("round_robin_512", || {
        let server = workspace_binary("example-rust-server")
            .display()
            .to_string();
        let cluster = Cluster::start(&["run", "-w", "512", "--listen", ADDR, "--", &server]);
        cluster.wait_until(
            "512 workers ready",
            std::time::Duration::from_secs(120),
            |status| {
                status.workers.len() == 512
                    && status
                        .workers
                        .iter()
                        .all(|w| w.state == cluster_lb_tests::WorkerState::Ready)
            },
        );
        let seen = distribution(addr(), 1024);
        assert_eq!(seen.len(), 512);
        assert!(seen.values().all(|&n| n == 2), "{seen:?}");
        let status = cluster.status();
        assert!(status
            .workers
            .iter()
            .all(|w| w.selected == 2 && w.fallback == 0));
        assert!(cluster.stop().status.success());
    });
}
