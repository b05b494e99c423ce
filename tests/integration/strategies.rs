//! Strategies beyond round robin: sticky (every connection of a client to one worker, by
//! consistent hashing of its address), with clients on many source addresses of loopback.

use std::{
    collections::{BTreeMap, BTreeSet},
    io::{Read, Write},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream},
    process::Command,
    time::Duration,
};

use cluster_lb::control::{request, Request};
use cluster_lb_tests::{pid_of, root_test, rust_server, signal, Cluster};
use nix::sys::signal::Signal;
use socket2::{Domain, SockAddr, Socket, Type};

const PORT: u16 = 8080;

/// One request from source address `from`; the worker id that answered.
fn worker_for(from: IpAddr, to: SocketAddr) -> u32 {
    let socket = Socket::new(Domain::for_address(to), Type::STREAM, None).expect("socket");
    socket
        .bind(&SockAddr::from(SocketAddr::new(from, 0)))
        .unwrap_or_else(|e| panic!("binding {from}: {e}"));
    socket
        .connect_timeout(&SockAddr::from(to), Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("connecting from {from}: {e}"));
    let body = cluster_lb_tests::http10_body(socket.into()).unwrap_or_else(|e| panic!("{e:#}"));
    body.split_whitespace()
        .nth(1)
        .and_then(|id| id.parse().ok())
        .unwrap_or_else(|| panic!("unexpected answer {body:?}"))
}

/// Each client's worker, checking that all of a client's `per_client` connections agree.
fn workers_of(clients: &[IpAddr], to: SocketAddr, per_client: usize) -> BTreeMap<IpAddr, u32> {
    clients
        .iter()
        .map(|&client| {
            let seen: BTreeSet<u32> = (0..per_client).map(|_| worker_for(client, to)).collect();
            assert_eq!(seen.len(), 1, "client {client} went to workers {seen:?}");
            (client, *seen.iter().next().expect("a worker"))
        })
        .collect()
}

fn moved(before: &BTreeMap<IpAddr, u32>, after: &BTreeMap<IpAddr, u32>) -> Vec<(IpAddr, u32, u32)> {
    before
        .iter()
        .filter_map(|(client, from)| {
            let to = after[client];
            (to != *from).then_some((*client, *from, to))
        })
        .collect()
}

#[test]
fn sticky_keeps_each_client_on_one_worker_moves_few_on_scale_and_none_on_reload() {
    root_test("sticky_v4", || {
        let server = rust_server();
        let cluster = Cluster::start(&[
            "run",
            "-w",
            "4",
            "--listen",
            "0.0.0.0:8080",
            "--strategy",
            "sticky",
            "--",
            &server,
        ]);
        cluster.wait_until_ready(4);
        let to = SocketAddr::from(([127, 0, 0, 1], PORT));
        let clients: Vec<IpAddr> = (0..200u32)
            .map(|k| IpAddr::V4(Ipv4Addr::new(127, 1, (k / 250) as u8, (k % 250 + 1) as u8)))
            .collect();
        let first = workers_of(&clients, to, 3);
        let mut per_worker: BTreeMap<u32, usize> = BTreeMap::new();
        for worker in first.values() {
            *per_worker.entry(*worker).or_insert(0) += 1;
        }
        assert_eq!(per_worker.len(), 4, "{per_worker:?}");
        assert!(per_worker.values().all(|&n| n >= 25), "{per_worker:?}");

        let reply = request(cluster.control(), &Request::Reload, Duration::from_secs(60));
        assert!(reply.is_ok(), "{reply:?}");
        cluster.wait_until_ready(4);
        let after_reload = workers_of(&clients, to, 1);
        let moved_by_reload = moved(&first, &after_reload);
        eprintln!(
            "sticky: reload moved {} of 200 clients",
            moved_by_reload.len()
        );
        assert!(moved_by_reload.is_empty(), "{moved_by_reload:?}");

        request(
            cluster.control(),
            &Request::Scale { workers: 5 },
            Duration::from_secs(5),
        )
        .expect("scale");
        cluster.wait_until_ready(5);
        let after_scale = workers_of(&clients, to, 1);
        let moved_by_scale = moved(&first, &after_scale);
        let share = moved_by_scale.len() as f64 / 200.0;
        eprintln!(
            "sticky: scaling 4 -> 5 moved {} of 200 clients ({share:.2}; ideal 0.20), {} of them to the new worker",
            moved_by_scale.len(),
            moved_by_scale.iter().filter(|m| m.2 == 4).count()
        );
        assert!((0.08..0.35).contains(&share), "{moved_by_scale:?}");

        // A dead worker's clients spread over the others.
        let victim_id = 1;
        let victim = pid_of(&cluster.status(), victim_id);
        let its_clients: Vec<IpAddr> = after_scale
            .iter()
            .filter(|(_, w)| **w == victim_id)
            .map(|(c, _)| *c)
            .collect();
        // Look right after the primary took it out of the table, before its restart is ready.
        signal(victim as u32, Signal::SIGKILL);
        cluster.wait_for_event("exit", Duration::from_secs(5), |e| e["pid"] == victim);
        let mut landed: BTreeMap<u32, usize> = BTreeMap::new();
        for client in &its_clients {
            let worker = worker_for(*client, to);
            *landed.entry(worker).or_insert(0) += 1;
        }
        eprintln!(
            "sticky: the {} clients of the killed worker landed on {landed:?}",
            its_clients.len()
        );
        let most = landed.values().copied().max().unwrap_or(0);
        assert!(
            landed.len() >= 2 && (most as f64) < its_clients.len() as f64 * 0.7,
            "{landed:?}"
        );
        assert!(cluster.stop().status.success());
    });
}

#[test]
fn sticky_works_for_ipv6_clients() {
    root_test("sticky_v6", || {
        for k in 1..=40 {
            let status = Command::new("ip")
                .args([
                    "-6",
                    "addr",
                    "add",
                    &format!("fd00::{k:x}/64"),
                    "dev",
                    "lo",
                    "nodad",
                ])
                .status()
                .expect("ip");
            assert!(status.success());
        }
        let server = rust_server();
        let cluster = Cluster::start(&[
            "run",
            "-w",
            "3",
            "--listen",
            "[::]:8080",
            "--strategy",
            "sticky",
            "--",
            &server,
        ]);
        cluster.wait_until_ready(3);
        let to: SocketAddr = "[fd00::1]:8080".parse().expect("address");
        let clients: Vec<IpAddr> = (2..=40)
            .map(|k| format!("fd00::{k:x}").parse().expect("v6"))
            .collect();
        let seen = workers_of(&clients, to, 3);
        let workers: BTreeSet<u32> = seen.values().copied().collect();
        assert_eq!(workers.len(), 3, "{seen:?}");
        assert!(cluster.stop().status.success());
    });
}

/// One UDP flow (a client socket): `count` datagrams, the worker id of each answer.
fn udp_flow(from: IpAddr, to: SocketAddr, count: usize) -> BTreeSet<u32> {
    let socket = std::net::UdpSocket::bind(SocketAddr::new(from, 0)).expect("client socket");
    socket
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let mut workers = BTreeSet::new();
    let mut buffer = [0u8; 256];
    for _ in 0..count {
        socket.send_to(b"ping", to).expect("send");
        let (length, _) = socket.recv_from(&mut buffer).expect("an answer");
        let answer = String::from_utf8_lossy(&buffer[..length]).into_owned();
        let id = answer
            .split_whitespace()
            .nth(1)
            .and_then(|id| id.parse().ok())
            .unwrap_or_else(|| panic!("unexpected answer {answer:?}"));
        workers.insert(id);
    }
    workers
}

fn udp_cluster(strategy: &[&str]) -> Cluster {
    let server = format!(
        "{}/../examples/python/udp_echo.py",
        env!("CARGO_MANIFEST_DIR")
    );
    let mut args = vec!["run", "-w", "4", "--listen", "udp://127.0.0.1:5353"];
    args.extend_from_slice(strategy);
    args.extend_from_slice(&["--", "python3", &server]);
    let cluster = Cluster::start(&args);
    let status = cluster.wait_until_ready(4);
    assert_eq!(status.listen, ["udp://127.0.0.1:5353"]);
    cluster
}

#[test]
fn every_datagram_of_a_udp_flow_goes_to_one_worker_and_flows_spread() {
    root_test("udp_flows", || {
        let cluster = udp_cluster(&[]);
        let to = SocketAddr::from(([127, 0, 0, 1], 5353));
        let mut per_worker: BTreeMap<u32, usize> = BTreeMap::new();
        let flows = 100;
        for _ in 0..flows {
            let workers = udp_flow(IpAddr::V4(Ipv4Addr::LOCALHOST), to, 10);
            assert_eq!(workers.len(), 1, "a flow was split: {workers:?}");
            *per_worker
                .entry(*workers.first().expect("one"))
                .or_insert(0) += 1;
        }
        eprintln!("udp: {flows} flows of 10 datagrams, each on one worker; flows per worker {per_worker:?}");
        assert!(per_worker.len() >= 3, "{per_worker:?}");
        let status = cluster.status();
        assert!(status.workers.iter().map(|w| w.selected).sum::<u64>() > 0);
        assert!(cluster.stop().status.success());
    });
}

#[test]
fn sticky_udp_keeps_every_flow_of_a_client_address_on_one_worker() {
    root_test("udp_sticky", || {
        let cluster = udp_cluster(&["--strategy", "sticky"]);
        let to = SocketAddr::from(([127, 0, 0, 1], 5353));
        let mut used = BTreeSet::new();
        for k in 1..=30u8 {
            let client = IpAddr::V4(Ipv4Addr::new(127, 2, 0, k));
            let workers: BTreeSet<u32> = (0..5).flat_map(|_| udp_flow(client, to, 2)).collect();
            assert_eq!(workers.len(), 1, "client {client}: {workers:?}");
            used.extend(workers);
        }
        assert!(used.len() >= 3, "{used:?}");
        assert!(cluster.stop().status.success());
    });
}

/// Least-loaded: exact round robin while the workers are equally loaded, open connections
/// counted as they open and close, and a worker that stops accepting (SIGSTOP) gets next to
/// nothing (one connection: it has to be seen loaded first), where round robin would send it
/// a quarter.
#[test]
fn least_loaded_counts_open_connections_and_avoids_a_stuck_worker() {
    root_test("least_loaded", || {
        let server = rust_server();
        let cluster = Cluster::start(&[
            "run",
            "-w",
            "4",
            "--listen",
            "127.0.0.1:8080",
            "--strategy",
            "least-loaded",
            "--",
            &server,
        ]);
        let status = cluster.wait_until_ready(4);
        assert_eq!(status.strategy, "least-loaded");
        let to = SocketAddr::from(([127, 0, 0, 1], PORT));
        // Idle: each connection is made once every close before it has been counted. The
        // kernel counts a close when it handles the client's FIN, which on a loaded machine
        // (softirq work deferred to ksoftirqd) can come after the next connection's SYN: the
        // claim is about equal loads, so the test waits for them rather than assume them.
        let mut idle: BTreeMap<u32, usize> = BTreeMap::new();
        for i in 0..400 {
            cluster.wait_until("every count back to 0", Duration::from_secs(5), |s| {
                s.workers.iter().all(|w| w.open == 0)
            });
            let answer = cluster_lb_tests::get(to)
                .unwrap_or_else(|e| panic!("connection {i} of 400: {e:#}"));
            *idle.entry(answer.worker).or_insert(0) += 1;
        }
        assert!(
            idle.values().all(|&n| n == 100),
            "idle means round robin: {idle:?}"
        );

        // Connections held open count; closed ones stop counting.
        let held: Vec<std::net::TcpStream> = (0..8)
            .map(|_| std::net::TcpStream::connect(to).expect("connect"))
            .collect();
        let counted =
            cluster.wait_until("8 open connections counted", Duration::from_secs(5), |s| {
                s.workers.iter().map(|w| w.open).sum::<u64>() == 8
            });
        eprintln!(
            "least-loaded: open per worker with 8 held: {:?}",
            counted.workers.iter().map(|w| w.open).collect::<Vec<_>>()
        );
        drop(held);
        cluster.wait_until("no open connection counted", Duration::from_secs(5), |s| {
            s.workers.iter().all(|w| w.open == 0)
        });

        let stuck = cluster.status().workers[0].pid;
        signal(stuck as u32, Signal::SIGSTOP);
        let mut timed_out = 0;
        for _ in 0..200 {
            let answered = std::net::TcpStream::connect_timeout(&to, Duration::from_secs(2))
                .and_then(|mut stream| {
                    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
                    stream.write_all(b"GET / HTTP/1.0\r\nHost: test\r\n\r\n")?;
                    let mut response = Vec::new();
                    stream.read_to_end(&mut response)?;
                    Ok(response)
                });
            if answered.map_or(true, |r| r.is_empty()) {
                timed_out += 1;
            }
        }
        eprintln!("least-loaded: {timed_out} of 200 connections reached the stopped worker");
        assert!(
            timed_out <= 2,
            "{timed_out} connections went to the stuck worker"
        );
        signal(stuck as u32, Signal::SIGCONT);
        assert!(cluster.stop().status.success());
    });
}

/// Least-loaded on a dual-stack listener counts IPv6 clients and IPv4 ones (v4-mapped on the
/// IPv6 sockets) alike, and stops counting each when it closes: the counter reads the client's
/// address where the socket keeps it for each family.
#[test]
fn least_loaded_counts_ipv6_and_v4_mapped_clients() {
    root_test("least_loaded_v6", || {
        let server = rust_server();
        let cluster = Cluster::start(&[
            "run",
            "-w",
            "2",
            "--listen",
            "[::]:8080",
            "--strategy",
            "least-loaded",
            "--",
            &server,
        ]);
        cluster.wait_until_ready(2);
        let v6 = SocketAddr::from((Ipv6Addr::LOCALHOST, PORT));
        let v4 = SocketAddr::from(([127, 0, 0, 1], PORT));
        let held: Vec<TcpStream> = [v6, v4, v6, v4]
            .iter()
            .map(|to| TcpStream::connect(to).unwrap_or_else(|e| panic!("connecting to {to}: {e}")))
            .collect();
        let counted =
            cluster.wait_until("4 open connections counted", Duration::from_secs(5), |s| {
                s.workers.iter().map(|w| w.open).sum::<u64>() == 4
            });
        assert!(
            counted.workers.iter().all(|w| w.open == 2),
            "least-loaded spreads them: {:?}",
            counted.workers.iter().map(|w| w.open).collect::<Vec<_>>()
        );
        drop(held);
        cluster.wait_until("no open connection counted", Duration::from_secs(5), |s| {
            s.workers.iter().all(|w| w.open == 0)
        });
        assert!(cluster.stop().status.success());
    });
}

/// BPF_PROG_TYPE_SOCK_OPS and BPF_PROG_TYPE_TRACING (the BTF tracepoint), as fdinfo names them.
const PROG_SOCK_OPS: u32 = 13;
const PROG_TRACING: u32 = 26;

/// Turns on the kernel's run statistics of BPF programs for as long as the descriptor is held
/// (BPF_ENABLE_STATS, BPF_STATS_RUN_TIME).
fn enable_bpf_stats() -> std::os::fd::OwnedFd {
    const BPF_ENABLE_STATS: libc::c_long = 32;
    let attr = [0u32; 2];
    // SAFETY: bpf(2) reads `size` bytes of `attr`, which holds them.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_ENABLE_STATS,
            attr.as_ptr(),
            std::mem::size_of_val(&attr),
        )
    };
    assert!(
        fd >= 0,
        "BPF_ENABLE_STATS: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: the syscall returned a new descriptor that nothing else owns.
    unsafe { std::os::fd::FromRawFd::from_raw_fd(fd as i32) }
}

/// Runs of the BPF programs process `pid` holds, summed by program type (its fdinfo).
fn program_runs(pid: u32) -> BTreeMap<u32, u64> {
    let mut runs = BTreeMap::new();
    let dir = format!("/proc/{pid}/fdinfo");
    for entry in std::fs::read_dir(&dir).expect("fdinfo").flatten() {
        let Ok(info) = std::fs::read_to_string(entry.path()) else {
            continue;
        };
        let field = |name: &str| {
            info.lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.trim().parse::<u64>().ok())
        };
        if let (Some(kind), Some(count)) = (field("prog_type:"), field("run_cnt:")) {
            *runs.entry(kind as u32).or_insert(0) += count;
        }
    }
    runs
}

/// A shell script that ends by running cluster-lb (its path is `$CLB`) with the script's
/// arguments in the same process (so the test knows the primary's pid): `body` does so.
fn cluster_lb_script(dir: &std::path::Path, body: &str) -> std::path::PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let script = dir.join("cluster-lb-wrapped");
    let binary = cluster_lb_tests::workspace_binary("cluster-lb");
    std::fs::write(
        &script,
        format!("#!/bin/sh\nCLB={}\n{body}\n", binary.display()),
    )
    .expect("wrapper");
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    script
}

fn least_loaded_args(server: &str) -> Vec<&str> {
    vec![
        "run",
        "-w",
        "2",
        "--listen",
        "127.0.0.1:8080",
        "--strategy",
        "least-loaded",
        "--",
        server,
    ]
}

/// Holds 4 connections: all counted, then none once closed.
fn counts_and_uncounts(cluster: &Cluster) {
    let to = SocketAddr::from(([127, 0, 0, 1], PORT));
    let held: Vec<TcpStream> = (0..4)
        .map(|_| TcpStream::connect(to).expect("connect"))
        .collect();
    cluster.wait_until("4 open connections counted", Duration::from_secs(5), |s| {
        s.workers.iter().map(|w| w.open).sum::<u64>() == 4
    });
    drop(held);
    cluster.wait_until("no open connection counted", Duration::from_secs(5), |s| {
        s.workers.iter().all(|w| w.open == 0)
    });
}

/// Least-loaded's counter is a sock_ops program on the primary's cgroup: it counts the
/// cluster's connections and never runs for a server outside that cgroup.
#[test]
fn least_loaded_counts_in_its_cgroup_only() {
    root_test("least_loaded_cgroup", || {
        let scratch = cluster_lb_tests::ScratchDir::new("ll-cgroup");
        let cgroup = cluster_lb_tests::own_cgroup_dir()
            .expect("this test's cgroup")
            .join(format!("clb-test-{}", std::process::id()));
        std::fs::create_dir_all(&cgroup).expect("creating the cluster's cgroup");
        let wrapper = cluster_lb_script(
            scratch.path(),
            &format!(
                "echo $$ > {}/cgroup.procs && exec \"$CLB\" \"$@\"",
                cgroup.display()
            ),
        );
        let server = rust_server();
        let cluster = Cluster::start_binary(&wrapper, &least_loaded_args(&server), |_| {});
        cluster.wait_until_ready(2);
        let _stats = enable_bpf_stats();
        let runs = program_runs(cluster.pid());
        assert!(runs.contains_key(&PROG_SOCK_OPS), "{runs:?}");
        assert!(!runs.contains_key(&PROG_TRACING), "{runs:?}");

        // An unrelated server in this test's cgroup (the cluster's parent): 200 connections.
        let unrelated = std::net::TcpListener::bind("127.0.0.1:0").expect("unrelated server");
        let address = unrelated.local_addr().expect("its address");
        let before = program_runs(cluster.pid())[&PROG_SOCK_OPS];
        for _ in 0..200 {
            let client = TcpStream::connect(address).expect("connect");
            let (accepted, _) = unrelated.accept().expect("accept");
            drop((client, accepted));
        }
        thread_sleep_for_closes();
        let after = program_runs(cluster.pid())[&PROG_SOCK_OPS];
        assert_eq!(
            after, before,
            "the counter ran for another cgroup's connections"
        );

        counts_and_uncounts(&cluster);
        let counted = program_runs(cluster.pid())[&PROG_SOCK_OPS];
        eprintln!(
            "least-loaded in a cgroup: 0 runs for 200 unrelated connections, {} for 4 of the cluster's",
            counted - after
        );
        assert!(counted > after);
        assert!(cluster.stop().status.success());
        let _ = std::fs::remove_dir(&cgroup);
    });
}

/// The closes of the connections just made are handled by the kernel (FIN, TIME_WAIT).
fn thread_sleep_for_closes() {
    std::thread::sleep(Duration::from_millis(200));
}

/// Without cgroup v2 (hidden here by a mount namespace), least-loaded counts with the BTF
/// tracepoint instead.
#[test]
fn without_cgroup_v2_least_loaded_counts_with_the_tracepoint() {
    root_test("least_loaded_tracepoint", || {
        let scratch = cluster_lb_tests::ScratchDir::new("ll-tracepoint");
        // A mount namespace of its own, with a tmpfs over /sys/fs/cgroup (and its unified/).
        let wrapper = cluster_lb_script(
            scratch.path(),
            "exec unshare -m --propagation private sh -c 'mount -t tmpfs none /sys/fs/cgroup && exec \"$0\" \"$@\"' \"$CLB\" \"$@\"",
        );
        let server = rust_server();
        let cluster = Cluster::start_binary(&wrapper, &least_loaded_args(&server), |_| {});
        cluster.wait_until_ready(2);
        assert_eq!(cluster.status().strategy, "least-loaded");
        let _stats = enable_bpf_stats();
        let runs = program_runs(cluster.pid());
        assert!(runs.contains_key(&PROG_TRACING), "{runs:?}");
        assert!(!runs.contains_key(&PROG_SOCK_OPS), "{runs:?}");
        counts_and_uncounts(&cluster);
        assert!(cluster.stop().status.success());
    });
}
