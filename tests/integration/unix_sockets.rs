//! Unix-socket listens: a Node worker's `listen(path)` (apps behind nginx) and `--listen
//! unix:PATH` for any program. One socket per path, shared by every worker (the kernel has no
//! reuseport group for Unix sockets), kept by the primary across reloads, owned by `--user`,
//! and removed when the cluster stops. Each test runs in its own network namespace.

use std::{
    collections::BTreeSet,
    os::unix::fs::{FileTypeExt, MetadataExt},
    path::Path,
    time::Duration,
};

use crate::node::{test_app, two_reloads_under};
use cluster_lb_tests::{
    cluster_lb_in, example, get_unix, node_binaries, node_modules, root_test, run_dir, Cluster,
    RequestLoop, ScratchDir, WorkerState,
};

/// `count` requests on new connections to `path`: every answer from a worker in `pids`; the
/// worker ids that answered.
fn served_by(path: &Path, count: usize, pids: &BTreeSet<u32>) -> BTreeSet<u32> {
    let mut ids = BTreeSet::new();
    for i in 0..count {
        let answer = get_unix(path).unwrap_or_else(|e| panic!("request {i} of {count}: {e:#}"));
        assert!(
            pids.contains(&answer.pid),
            "answered by pid {}, not one of the workers {pids:?}",
            answer.pid
        );
        ids.insert(answer.worker);
    }
    ids
}

#[test]
fn a_node_listen_on_a_path_is_one_socket_the_workers_share_through_reloads() {
    root_test("unix_node_listen", || {
        for (major, node) in node_binaries() {
            eprintln!("---- Node {major}");
            let dir = ScratchDir::new("unix-node");
            let path = dir.join("app.sock");
            let app = test_app("unix-app.js");
            let node = node.display().to_string();
            let cluster = Cluster::start_with(&["run", "-w", "4", "--", &node, &app], |c| {
                c.env("SOCKET_PATH", &path).env("NODE_PATH", node_modules());
            });
            let status = cluster.wait_until_ready(4);
            assert_eq!(status.listen, [format!("unix:{}", path.display())]);
            let file = std::fs::symlink_metadata(&path).expect("the socket file");
            assert!(file.file_type().is_socket());
            // No program balances a Unix socket: the workers take turns in accept(), so only
            // that answers come from the workers, more than one of them, is certain.
            let ids = served_by(&path, 200, &cluster.worker_pids());
            eprintln!("Node {major}: 200 requests answered by workers {ids:?}");
            assert!(ids.len() >= 2, "Node {major}: only {ids:?} answered");

            let (answered, failures) =
                two_reloads_under(&cluster, RequestLoop::start_unix(&path, 4));
            let answered: u64 = answered.values().sum();
            eprintln!(
                "Node {major}: {answered} requests on unix:{} across 2 reloads, {} failed",
                path.display(),
                failures.len()
            );
            assert!(answered > 0);
            assert!(failures.is_empty(), "Node {major}: {failures:?}");
            let status = cluster.wait_until_ready(4);
            assert!(status.workers.iter().all(|w| w.state == WorkerState::Ready));
            // The replacements serve on the same path (the old workers' closing did not
            // unlink it).
            served_by(&path, 50, &cluster.worker_pids());
            assert!(cluster.stop().status.success());
            assert!(
                !path.exists(),
                "Node {major}: the socket file outlived the cluster"
            );
        }
    });
}

#[test]
fn listen_unix_replaces_a_stale_socket_and_gives_it_to_the_user_as_fd_3() {
    root_test("unix_listen", || {
        let (_, node) = node_binaries().remove(0);
        let node = node.display().to_string();
        let dir = ScratchDir::new("unix-listen");
        let path = dir.join("app.sock");
        let listen = format!("unix:{}", path.display());
        // What a primary that was killed leaves behind: a socket file nobody answers on.
        drop(std::os::unix::net::UnixListener::bind(&path).expect("a stale socket"));
        let server = example("node/server.js");
        let args = [
            "run", "-w", "2", "--user", "nobody", "--node", "off", "-l", &listen, "--", &node,
            &server,
        ];
        let cluster = Cluster::start(&args);
        let status = cluster.wait_until_ready(2);
        assert_eq!(status.listen, std::slice::from_ref(&listen));
        let file = std::fs::symlink_metadata(&path).expect("the socket file");
        let nobody = nix::unistd::User::from_name("nobody")
            .expect("passwd")
            .expect("the nobody user");
        assert_eq!(
            (file.uid(), file.gid(), file.mode() & 0o777),
            (nobody.uid.as_raw(), nobody.gid.as_raw(), 0o660)
        );
        // Each worker serves from its fd 3 (Node's own listen({ fd: 3 }), no channel).
        served_by(&path, 100, &cluster.worker_pids());
        assert!(cluster.stop().status.success());
        assert!(!path.exists(), "the socket file outlived the cluster");

        // A path that holds anything but a socket is never replaced.
        std::fs::write(&path, "keep me").expect("a regular file");
        let runs = run_dir();
        let (code, _, stderr) = cluster_lb_in(&runs, &args);
        assert_eq!(code, Some(1), "{stderr:?}");
        assert!(
            stderr
                .iter()
                .any(|l| l.contains("exists and is not a socket")),
            "{stderr:?}"
        );
        assert_eq!(std::fs::read_to_string(&path).expect("kept"), "keep me");
    });
}

#[test]
fn a_user_workers_listen_on_a_path_no_listen_named_is_refused() {
    root_test("unix_user_refused", || {
        let (_, node) = node_binaries().remove(0);
        let node = node.display().to_string();
        let dir = ScratchDir::new("unix-refused");
        let path = dir.join("app.sock");
        let app = test_app("unix-app.js");
        let cluster = Cluster::start_with(
            &["run", "-w", "1", "--user", "nobody", "--", &node, &app],
            |c| {
                c.env("SOCKET_PATH", &path).env("NODE_PATH", node_modules());
            },
        );
        // Its listen fails (EACCES), the app throws and exits, and is started again.
        cluster.wait_for_events("exit", 2, Duration::from_secs(20));
        let status = cluster.status();
        assert!(
            status.workers.iter().all(|w| w.state != WorkerState::Ready),
            "{status:?}"
        );
        assert!(
            !path.exists(),
            "the primary bound a path for a --user worker"
        );
    });
}
