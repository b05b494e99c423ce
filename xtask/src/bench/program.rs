//! `cargo xtask bench --suite program`: what the sk_reuseport program costs per new connection,
//! for each strategy, next to a minimal C round robin (bench/reference/round_robin.c) built and
//! run in the same invocation, so the machine's state on the day is in both.
//!
//! The kernel counts each program's run time and runs while kernel.bpf_stats_enabled=1
//! (`run_time_ns`, `run_cnt` in the program's fdinfo); ns per run is their difference over a
//! wrk load that opens a new connection per request. The verifier's `verified_insns` (also in
//! fdinfo, 5.16+) says how much program it had to walk. Every contender serves with the same
//! Node workers (examples/node/server.js), each on its own SO_REUSEPORT socket, so the caches
//! the program runs with are the same; only the program and who loaded it differ.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    fs,
    net::TcpListener,
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Context, Result};
use aya::{
    maps::{Array, ReusePortSockArray},
    programs::SkReuseport,
    Ebpf,
};

use super::{
    contenders::{self, CONTROL_SOCKET, PORT},
    measure,
    report::median,
};
use crate::{root, setup};

/// What runs the selection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Selector {
    /// bench/reference/round_robin.c, loaded by the benchmark itself.
    Reference,
    /// reference_sticky of the same file: the client's address read (one helper call),
    /// hashed, selected. The bench's clients all have one address (127.0.0.1), so it gives
    /// every connection to one worker, as cluster-lb's sticky does here: the floor of what a
    /// sticky program costs with this traffic.
    ReferenceSticky,
    /// `cluster-lb run -s STRATEGY`.
    ClusterLb(&'static str),
}

pub const ALL: [Selector; 6] = [
    Selector::Reference,
    Selector::ReferenceSticky,
    Selector::ClusterLb("round-robin"),
    Selector::ClusterLb("hash"),
    Selector::ClusterLb("sticky"),
    Selector::ClusterLb("least-loaded"),
];

impl Selector {
    pub fn name(self) -> String {
        match self {
            Selector::Reference => "C reference round robin".into(),
            Selector::ReferenceSticky => "C reference sticky".into(),
            Selector::ClusterLb(strategy) => format!("cluster-lb {strategy}"),
        }
    }

    /// What "× reference" divides by: the C sticky for sticky (the least that strategy can
    /// do), the C round robin for the others.
    fn reference(self) -> Selector {
        match self {
            Selector::ClusterLb("sticky") => Selector::ReferenceSticky,
            _ => Selector::Reference,
        }
    }
}

/// One measurement of one selector.
#[derive(Clone, Copy, Debug, Default)]
pub struct ProgramSample {
    /// Mean run time of the sk_reuseport program.
    pub ns_per_run: f64,
    /// What the verifier walked (None before 5.16).
    pub verified_insns: Option<u64>,
    /// Run time of the selector's other programs (least-loaded's counter) per selection.
    pub others_ns_per_selection: Option<f64>,
    /// Run time of the selector's other programs per connection to another server on the same
    /// host, which they should not concern (what least-loaded costs everyone else).
    pub others_ns_per_unrelated: Option<f64>,
    /// How often they ran per such connection (each run also pays bpf_stats' clock reads).
    pub others_runs_per_unrelated: Option<f64>,
    pub conn_per_s: f64,
}

/// sk_reuseport in `enum bpf_prog_type`.
const PROG_TYPE_SK_REUSEPORT: u64 = 21;
const REFERENCE_SOURCE: &str = "bench/reference/round_robin.c";
const REFERENCE_PROGRAM: &str = "reference_round_robin";
const REFERENCE_STICKY_PROGRAM: &str = "reference_sticky";

/// clang and libbpf's headers, then the reference object, into `scratch`.
pub fn build_reference(scratch: &Path) -> Result<PathBuf> {
    setup::ensure_packages(&[("clang", "clang")])?;
    if !Path::new("/usr/include/bpf/bpf_helpers.h").is_file() {
        setup::install_packages(&["libbpf-dev"])?;
    }
    let object = scratch.join("reference_round_robin.o");
    // linux/bpf.h includes asm/types.h, which Debian keeps under the host's multiarch folder;
    // clang looks there only when it compiles for the host.
    let multiarch = format!("/usr/include/{}-linux-gnu", std::env::consts::ARCH);
    crate::run(
        Command::new("clang")
            .args(["-O2", "-g", "-target", "bpf", "-mcpu=v3", "-I"])
            .arg(multiarch)
            .arg("-c")
            .arg(root().join(REFERENCE_SOURCE))
            .arg("-o")
            .arg(&object),
    )?;
    Ok(object)
}

/// Starts `selector` with `workers` Node workers, loads it with wrk (a new connection per
/// request) for `seconds`, stops it.
pub fn measure(
    selector: Selector,
    workers: u32,
    seconds: u32,
    cluster_lb: &Path,
    reference: &Path,
    scratch: &Path,
) -> Result<ProgramSample> {
    match selector {
        Selector::Reference | Selector::ReferenceSticky => {
            let (program, answering) = if selector == Selector::Reference {
                (REFERENCE_PROGRAM, workers)
            } else {
                // One client address: one worker answers.
                (REFERENCE_STICKY_PROGRAM, 1)
            };
            let running = Reference::start(reference, program, workers)?;
            let result = measure::wait_for_all_workers(([127, 0, 0, 1], PORT).into(), answering)
                .and_then(|()| load(std::process::id(), seconds));
            running.stop();
            result
        }
        Selector::ClusterLb(strategy) => {
            let control = scratch.join(CONTROL_SOCKET);
            // One left by a run that was killed would look like this one's.
            let _ = fs::remove_file(&control);
            // In a cgroup of its own, as under a systemd unit or in a container: least-loaded's
            // counter then runs for its sockets only, and the unrelated server (this process,
            // in the parent cgroup) shows what others pay.
            let cgroup = own_cgroup_child("clb-bench")?;
            let mut primary = Command::new("/bin/sh")
                .arg("-c")
                .arg("echo $$ > \"$1\"/cgroup.procs && shift && exec \"$@\"")
                .arg("sh")
                .arg(&cgroup)
                .arg(cluster_lb)
                .args(["run", "-w", &workers.to_string(), "-l"])
                .arg(format!("127.0.0.1:{PORT}"))
                .args(["-s", strategy, "--control"])
                .arg(&control)
                .arg("--")
                .arg("node")
                .arg(root().join("examples/node/server.js"))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .context("starting cluster-lb")?;
            // Not by asking each worker to answer: under sticky every connection from this
            // one client address goes to one worker.
            let result = wait_for_control(&control)
                .and_then(|()| measure::wait_until_ready(&control, workers))
                .and_then(|()| {
                    // As wait_for_all_workers: let late starters finish their start-up work.
                    std::thread::sleep(Duration::from_millis(500));
                    let mut sample = load(primary.id(), seconds)?;
                    if sample.others_ns_per_selection.is_some() {
                        let (ns, runs) = unrelated(primary.id())?;
                        sample.others_ns_per_unrelated = Some(ns);
                        sample.others_runs_per_unrelated = Some(runs);
                    }
                    Ok(sample)
                });
            stop(&mut primary);
            result
        }
    }
}

/// A child cgroup (v2) of this process's own, created if missing.
fn own_cgroup_child(name: &str) -> Result<PathBuf> {
    let dir = cluster_lb_tests::own_cgroup_dir()?.join(name);
    fs::create_dir_all(&dir).with_context(|| format!("creating cgroup {}", dir.display()))?;
    Ok(dir)
}

/// Waits for cluster-lb's control socket to appear.
fn wait_for_control(control: &Path) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !control.exists() {
        if Instant::now() > deadline {
            bail!("cluster-lb made no control socket within 30 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// wrk with `Connection: close` against the running selector; the programs `pid` holds,
/// before and after.
fn load(pid: u32, seconds: u32) -> Result<ProgramSample> {
    let before = programs(pid)?;
    let wrk = measure::wrk(seconds, true)?;
    let after = programs(pid)?;
    let delta = |id: &u64| -> Option<(u64, u64, &Program)> {
        let (old, new) = (before.get(id)?, after.get(id)?);
        Some((
            new.run_time_ns.saturating_sub(old.run_time_ns),
            new.run_cnt.saturating_sub(old.run_cnt),
            new,
        ))
    };
    let mut selection: Option<(u64, u64, &Program)> = None;
    let mut others_ns = 0;
    let mut has_others = false;
    for id in after.keys() {
        let Some((time, runs, program)) = delta(id) else {
            continue;
        };
        if program.prog_type == PROG_TYPE_SK_REUSEPORT {
            if selection.is_some() {
                bail!("process {pid} holds more than one sk_reuseport program");
            }
            selection = Some((time, runs, program));
        } else {
            others_ns += time;
            has_others = true;
        }
    }
    let Some((time, runs, program)) = selection else {
        bail!("process {pid} holds no sk_reuseport program");
    };
    if runs == 0 {
        bail!("the sk_reuseport program never ran: is kernel.bpf_stats_enabled 1?");
    }
    Ok(ProgramSample {
        ns_per_run: time as f64 / runs as f64,
        verified_insns: program.verified_insns,
        others_ns_per_selection: has_others.then(|| others_ns as f64 / runs as f64),
        others_ns_per_unrelated: None,
        others_runs_per_unrelated: None,
        conn_per_s: wrk.per_second,
    })
}

/// Run time of the programs `pid` holds, other than its sk_reuseport program, per connection
/// to an unrelated server on this host (a plain listener on the next port, which answers each
/// connection with a line and closes it), over two seconds of sequential connections; and
/// how many times they ran per connection.
fn unrelated(pid: u32) -> Result<(f64, f64)> {
    use std::io::{Read, Write};
    let others = |programs: &BTreeMap<u64, Program>| -> BTreeMap<u64, (u64, u64)> {
        programs
            .iter()
            .filter(|(_, p)| p.prog_type != PROG_TYPE_SK_REUSEPORT)
            .map(|(id, p)| (*id, (p.run_time_ns, p.run_cnt)))
            .collect()
    };
    let address = std::net::SocketAddr::from(([127, 0, 0, 1], PORT + 1));
    let listener = TcpListener::bind(address).with_context(|| format!("binding {address}"))?;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let server = std::thread::spawn({
        let stop = std::sync::Arc::clone(&stop);
        move || {
            for stream in listener.incoming() {
                if stop.load(std::sync::atomic::Ordering::Relaxed) {
                    break;
                }
                if let Ok(mut stream) = stream {
                    let _ = stream.write_all(b"unrelated\n");
                }
            }
        }
    });
    let before = others(&programs(pid)?);
    let (mut connections, started) = (0u64, Instant::now());
    while started.elapsed() < Duration::from_secs(2) {
        let mut stream =
            std::net::TcpStream::connect(address).context("connecting to the unrelated server")?;
        let mut answer = Vec::new();
        stream
            .read_to_end(&mut answer)
            .context("reading the unrelated server's answer")?;
        connections += 1;
    }
    let after = others(&programs(pid)?);
    // One more connection wakes the server's accept to see `stop`.
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let _ = std::net::TcpStream::connect(address);
    let _ = server.join();
    let (mut spent, mut runs) = (0, 0);
    for (id, (time, count)) in &after {
        let (time_before, count_before) = before.get(id).copied().unwrap_or((*time, *count));
        spent += time.saturating_sub(time_before);
        runs += count.saturating_sub(count_before);
    }
    let connections = connections.max(1) as f64;
    Ok((spent as f64 / connections, runs as f64 / connections))
}

/// A BPF program as its fdinfo shows it.
struct Program {
    prog_type: u64,
    run_time_ns: u64,
    run_cnt: u64,
    verified_insns: Option<u64>,
}

/// The BPF programs `pid` holds descriptors of, by program id (several descriptors of one
/// program count once).
fn programs(pid: u32) -> Result<BTreeMap<u64, Program>> {
    let dir = format!("/proc/{pid}/fdinfo");
    let mut found = BTreeMap::new();
    for entry in fs::read_dir(&dir).with_context(|| format!("reading {dir}"))? {
        let Ok(info) = fs::read_to_string(entry?.path()) else {
            continue; // closed meanwhile
        };
        let value = |key: &str| -> Option<u64> {
            info.lines()
                .find_map(|l| l.strip_prefix(key))
                .and_then(|v| v.trim().parse().ok())
        };
        let (Some(id), Some(prog_type), Some(run_time_ns), Some(run_cnt)) = (
            value("prog_id:"),
            value("prog_type:"),
            value("run_time_ns:"),
            value("run_cnt:"),
        ) else {
            continue;
        };
        found.insert(
            id,
            Program {
                prog_type,
                run_time_ns,
                run_cnt,
                verified_insns: value("verified_insns:"),
            },
        );
    }
    Ok(found)
}

/// The reference program serving Node workers: a listener per worker in one reuseport group,
/// socket i at index i of the program's array, each worker given its own as fd 3, `program` of
/// the reference object choosing.
struct Reference {
    // Keeps the program attached (with the listeners below) while the workers run.
    _ebpf: Ebpf,
    _listeners: Vec<TcpListener>,
    workers: Vec<Child>,
}

impl Reference {
    fn start(object: &Path, name: &str, workers: u32) -> Result<Reference> {
        let bytes = fs::read(object).with_context(|| format!("reading {}", object.display()))?;
        let mut ebpf = Ebpf::load(&bytes).context("loading the reference object")?;
        let program: &mut SkReuseport = ebpf
            .program_mut(name)
            .context("no reference program in the object")?
            .try_into()?;
        program.load().context("verifying the reference program")?;
        let listeners = (0..workers)
            .map(|_| reuseport_listener())
            .collect::<Result<Vec<_>>>()?;
        let mut sockets = ReusePortSockArray::try_from(
            ebpf.map_mut("REF_SOCKETS")
                .context("no REF_SOCKETS map in the reference object")?,
        )?;
        for (index, listener) in listeners.iter().enumerate() {
            sockets
                .set(index as u32, listener, 0)
                .context("putting a listener in the reference's array")?;
        }
        // struct state { u64 next; u32 count; u32 pad; } as four u32s.
        let mut state: Array<_, [u32; 4]> = Array::try_from(
            ebpf.map_mut("REF_STATE")
                .context("no REF_STATE map in the reference object")?,
        )?;
        state
            .set(0, [0, 0, workers, 0], 0)
            .context("writing the reference's socket count")?;
        let program: &mut SkReuseport = ebpf
            .program_mut(name)
            .context("no reference program in the object")?
            .try_into()?;
        program
            .attach(&listeners[0])
            .context("attaching the reference program")?;
        let server = root().join("examples/node/server.js");
        let mut children = Vec::new();
        for (id, listener) in listeners.iter().enumerate() {
            match contenders::socket_activated_node(id, listener.as_raw_fd(), &server)
                .context("starting a Node worker")
            {
                Ok(child) => children.push(child),
                Err(error) => {
                    stop_all(&mut children);
                    return Err(error);
                }
            }
        }
        Ok(Reference {
            _ebpf: ebpf,
            _listeners: listeners,
            workers: children,
        })
    }

    fn stop(mut self) {
        stop_all(&mut self.workers);
    }
}

/// A listener on the benchmark's port with SO_REUSEPORT, so all of them form one group.
fn reuseport_listener() -> Result<TcpListener> {
    use nix::sys::socket::{
        bind, listen, setsockopt, socket, sockopt, AddressFamily, Backlog, SockFlag, SockType,
        SockaddrIn,
    };
    let fd = socket(
        AddressFamily::Inet,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .context("creating a listener")?;
    setsockopt(&fd, sockopt::ReusePort, &true).context("setting SO_REUSEPORT")?;
    bind(fd.as_raw_fd(), &SockaddrIn::new(127, 0, 0, 1, PORT))
        .with_context(|| format!("binding 127.0.0.1:{PORT}"))?;
    listen(&fd, Backlog::new(1024).context("backlog")?).context("listening")?;
    Ok(TcpListener::from(fd))
}

fn stop(child: &mut Child) {
    stop_all(std::slice::from_mut(child));
}

/// SIGTERM to each, then SIGKILL to whoever is left after 10 s.
fn stop_all(children: &mut [Child]) {
    for child in children.iter() {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    for child in children.iter_mut() {
        while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// The suite's Markdown table: per selector, the median of each figure over the rounds, and
/// ns per run as a multiple of the reference's median.
pub fn table(
    samples: &[(Selector, ProgramSample)],
    workers: u32,
    rounds: u32,
    seconds: u32,
) -> String {
    let of = |selector: Selector, figure: fn(&ProgramSample) -> Option<f64>| -> Vec<f64> {
        samples
            .iter()
            .filter(|(s, _)| *s == selector)
            .filter_map(|(_, sample)| figure(sample))
            .collect()
    };
    let reference_of =
        |selector: Selector| median(of(selector.reference(), |s| Some(s.ns_per_run)));
    let mut out = format!(
        "## What the program costs, {workers} workers\n\n{workers} Node workers (examples/node/server.js), each on its own SO_REUSEPORT socket; wrk -t2 -c64 with `Connection: close` (a new connection per request) for {seconds} s; {rounds} rounds, interleaved. ns per run: the kernel's run_time_ns / run_cnt of the sk_reuseport program (kernel.bpf_stats_enabled=1), median (min–max) over the rounds; × reference: median over the median of the C round robin, for sticky over that of the C sticky, which reads the client's address (one helper call), hashes it and selects: the least a sticky program does (the bench's clients all have one address, so both stickies give every connection to one worker). verified_insns: what the verifier walked. Other programs: run time of the selector's other programs (least-loaded's connection counter) per selection, and per connection to an unrelated server on the same host (2 s of sequential connections to a plain listener on the next port, after the load; cluster-lb runs in a cgroup of its own, as under a systemd unit, and the unrelated server in its parent), with their runs per such connection (bpf_stats' own clock reads are part of every run's time).\n\n| program | ns per run | × reference | verified_insns | other programs ns per selection | other programs ns per unrelated connection | their runs per unrelated connection | conn/s |\n| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n"
    );
    for selector in ALL {
        let runs = of(selector, |s| Some(s.ns_per_run));
        let times = match (median(runs.clone()), reference_of(selector)) {
            (Some(ns), Some(reference)) if reference > 0.0 => format!("{:.2}", ns / reference),
            _ => "-".into(),
        };
        let insns = of(selector, |s| s.verified_insns.map(|n| n as f64));
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} | {} | {} |",
            selector.name(),
            super::report::spread(runs, 0),
            times,
            super::report::spread(insns, 0),
            super::report::spread(of(selector, |s| s.others_ns_per_selection), 0),
            super::report::spread(of(selector, |s| s.others_ns_per_unrelated), 0),
            super::report::spread(of(selector, |s| s.others_runs_per_unrelated), 1),
            super::report::spread(of(selector, |s| Some(s.conn_per_s)), 0),
        );
    }
    out
}

/// Runs the suite: every selector for each worker count, rounds outermost, each measurement in
/// a network namespace of its own. Its tables.
pub fn suite(
    rounds: u32,
    seconds: u32,
    worker_counts: &[u32],
    cluster_lb: &Path,
    scratch: &Path,
) -> Result<String> {
    let reference = build_reference(scratch)?;
    let mut tables = Vec::new();
    for &workers in worker_counts {
        let mut samples = Vec::new();
        for round in 1..=rounds {
            for selector in ALL {
                eprintln!(
                    "xtask bench: program cost, {workers} workers, round {round}/{rounds}, {}",
                    selector.name()
                );
                let (cluster_lb, reference, scratch) = (
                    cluster_lb.to_path_buf(),
                    reference.clone(),
                    scratch.to_path_buf(),
                );
                let sample = cluster_lb_tests::in_network_namespace("bench-program", move || {
                    measure(
                        selector,
                        workers,
                        seconds,
                        &cluster_lb,
                        &reference,
                        &scratch,
                    )
                    .map_err(|e| format!("{e:#}"))
                })
                .map_err(|_| anyhow!("{} panicked", selector.name()))?;
                match sample {
                    Ok(sample) => samples.push((selector, sample)),
                    Err(error) => eprintln!(
                        "xtask bench: program cost of {} failed: {error}",
                        selector.name()
                    ),
                }
            }
        }
        tables.push(table(&samples, workers, rounds, seconds));
    }
    Ok(tables.join("\n"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_gives_multiples_of_the_reference_median() {
        let sample = |ns| ProgramSample {
            ns_per_run: ns,
            verified_insns: Some(20),
            others_ns_per_selection: None,
            others_ns_per_unrelated: None,
            others_runs_per_unrelated: None,
            conn_per_s: 1000.0,
        };
        let samples = [
            (Selector::Reference, sample(100.0)),
            (Selector::Reference, sample(300.0)),
            (Selector::Reference, sample(200.0)),
            (Selector::ReferenceSticky, sample(400.0)),
            (Selector::ClusterLb("hash"), sample(250.0)),
            (Selector::ClusterLb("sticky"), sample(500.0)),
        ];
        let table = table(&samples, 2, 3, 1);
        assert!(
            table.contains(
                "| C reference round robin | 200 (100–300) | 1.00 | 20 | - | - | - | 1000 |"
            ),
            "{table}"
        );
        assert!(
            table.contains("| cluster-lb hash | 250 | 1.25 | 20 | - | - | - | 1000 |"),
            "{table}"
        );
        assert!(
            table.contains("| C reference sticky | 400 | 2.00 | 20 |"),
            "{table}"
        );
        assert!(
            table.contains("| cluster-lb sticky | 500 | 1.25 | 20 |"),
            "{table}"
        );
        assert!(
            table.contains("| cluster-lb round-robin | - | - | - | - | - | - | - |"),
            "{table}"
        );
    }
}
