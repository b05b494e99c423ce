//! When things go wrong: a worker killed, no eBPF privileges.

use std::{collections::BTreeSet, os::unix::process::CommandExt, time::Duration};

use cluster_lb_tests::{
    addr, distribution, example, get, root_test, signal, Cluster, ADDR, CAP_BPF, CAP_NET_ADMIN,
    CAP_PERFMON, CAP_SYS_ADMIN,
};
use nix::sys::signal::Signal;

#[test]
fn after_sigkill_of_a_worker_the_next_200_connections_all_succeed() {
    root_test("sigkill_worker", || {
        let cluster = Cluster::serving(4, ADDR, &["node", &example("node/server.js")]);
        let victim = get(addr()).expect("first request");
        signal(victim.pid, Signal::SIGKILL);

        // At once, before the primary has even noticed: the program must skip the dead slot.
        let mut pids = BTreeSet::new();
        for i in 0..200 {
            let answer =
                get(addr()).unwrap_or_else(|e| panic!("connection {i} after the kill: {e:#}"));
            assert_ne!(answer.pid, victim.pid, "the killed worker answered");
            pids.insert(answer.pid);
        }
        assert!(
            pids.len() >= 3,
            "the surviving workers shared the load: {pids:?}"
        );

        let exit =
            cluster.wait_for_event("exit", Duration::from_secs(5), |e| e["pid"] == victim.pid);
        assert_eq!(exit["signal"], "SIGKILL");
        let status = cluster.wait_until_ready(4);
        assert!(
            status
                .workers
                .iter()
                .any(|w| w.id == victim.worker && w.restarts == 1),
            "worker {} was restarted: {status:?}",
            victim.worker
        );
        assert!(cluster.stop().status.success());
    });
}

/// Starts cluster-lb as root but without the capabilities eBPF needs (bounding set dropped in
/// the child before exec, so the process and its workers can never have them).
fn start_without_bpf_capabilities(extra: &[&str]) -> Cluster {
    let server = example("python/server.py");
    let mut args = vec!["run", "-w", "2", "--listen", ADDR];
    args.extend_from_slice(extra);
    args.extend_from_slice(&["--", "python3", &server]);
    Cluster::start_with(&args, |command| {
        // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec here.
        unsafe {
            command.pre_exec(|| {
                for cap in [CAP_BPF, CAP_SYS_ADMIN, CAP_PERFMON, CAP_NET_ADMIN] {
                    if libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
    })
}

#[test]
fn without_cap_bpf_it_says_so_in_one_line_and_still_serves() {
    root_test("fallback_without_cap_bpf", || {
        let cluster = start_without_bpf_capabilities(&[]);
        let status = cluster.wait_until_ready(2);
        assert_eq!(status.strategy, "kernel", "fell back to plain SO_REUSEPORT");
        let seen = distribution(addr(), 40);
        assert_eq!(seen.values().sum::<usize>(), 40);
        let stopped = cluster.stop();
        assert!(stopped.status.success());
        // The one line a user reads: what is missing, and what happens instead.
        let mentions: Vec<&String> = stopped
            .lines
            .iter()
            .filter(|l| l.contains("eBPF"))
            .collect();
        assert_eq!(
            mentions.len(),
            1,
            "exactly one line about eBPF: {mentions:#?}"
        );
        assert!(
            mentions[0].contains("falling back to --strategy kernel"),
            "{}",
            mentions[0]
        );
        assert!(
            mentions[0].contains("needs root, or CAP_BPF"),
            "{}",
            mentions[0]
        );
    });
}

#[test]
fn with_require_ebpf_and_no_cap_bpf_it_exits_1_with_a_clear_message() {
    root_test("require_ebpf_without_cap_bpf", || {
        let mut cluster = start_without_bpf_capabilities(&["--require-ebpf"]);
        let status = cluster.wait_exit(Duration::from_secs(10));
        assert_eq!(status.code(), Some(1));
        let log = cluster.lines();
        assert_eq!(log.len(), 1, "one line: {log:#?}");
        assert!(
            log[0].starts_with(
                "cluster-lb: error: eBPF balancing is unavailable and --require-ebpf was given"
            ),
            "{}",
            log[0]
        );
        assert!(log[0].contains("needs root, or CAP_BPF"), "{}", log[0]);
    });
}
