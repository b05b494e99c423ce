//! `cargo xtask bench --suite program`: what the sk_reuseport program costs per new connection,
//! for each strategy, next to a minimal C round robin (bench/reference/round_robin.c) built and
//! run in the same invocation.
//!
//! The kernel counts each program's run time and runs while kernel.bpf_stats_enabled=1
//! (`run_time_ns`, `run_cnt` in the program's fdinfo); ns per run is their difference over a
//! wrk load that opens a new connection per request. The verifier's `verified_insns` (also in
//! fdinfo, 5.16+) says how much program it had to walk. Every contender serves with the same
//! Node workers (examples/node/server.js), each on its own SO_REUSEPORT socket, so the caches
//! the program runs with are the same; only the program and who loaded it differ.
//!
//! Each program is measured at the same moment as the C round robin: both serve, on two ports,
//! under two wrk loads started together, and a program's multiple is over the reference's run
//! time in that same measurement. Measured one after the other (as this suite first did), the
//! same unchanged program read 1.04x to 1.46x the reference on this shared 2-core machine: what
//! else ran in those seconds weighed more than the programs' difference. Side by side, both
//! see the same load, caches and neighbours.

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
    measure::{self, WrkResult},
    report::{median, spread},
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
    /// reference_active_set of the same file: round robin over a double-buffered list of the
    /// sockets that may receive connections, each selection counted per socket and CPU, as
    /// cluster-lb's round robin does: the least a round robin that can drain a worker and show
    /// its counts does.
    ReferenceActiveSet,
    /// reference_table of the same file: the kernel's flow hash picks an entry of a
    /// double-buffered table of sockets of cluster-lb's size, the selection counted per
    /// socket and CPU, as cluster-lb's hash does.
    ReferenceTable,
    /// `cluster-lb run -s STRATEGY`.
    ClusterLb(&'static str),
}

/// What the suite measures, each beside the C round robin. The C round robin itself first: a
/// second copy of it beside the first is the method's own check, whose multiple should read
/// 1.00 and whose spread is what two runs of one program differ by.
pub const MEASURED: [Selector; 8] = [
    Selector::Reference,
    Selector::ReferenceSticky,
    Selector::ReferenceActiveSet,
    Selector::ReferenceTable,
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
            Selector::ReferenceActiveSet => "C reference round robin over an active set".into(),
            Selector::ReferenceTable => "C reference hash over a slot table".into(),
            Selector::ClusterLb(strategy) => format!("cluster-lb {strategy}"),
        }
    }

    /// The C program that does what this selector does, where there is one besides the plain
    /// round robin.
    fn same_work(self) -> Option<Selector> {
        match self {
            Selector::ClusterLb("sticky") => Some(Selector::ReferenceSticky),
            Selector::ClusterLb("round-robin") => Some(Selector::ReferenceActiveSet),
            Selector::ClusterLb("hash") => Some(Selector::ReferenceTable),
            _ => None,
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
const REFERENCE_ACTIVE_SET_PROGRAM: &str = "reference_active_set";
const REFERENCE_TABLE_PROGRAM: &str = "reference_table";
/// round_robin.c's TABLE_SIZE (+ 1 for its padding) and TABLE_USED.
const REFERENCE_TABLE_SIZE: usize = 65538;
const REFERENCE_TABLE_USED: usize = 1031;

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

/// The port of the selector measured beside the C round robin (which serves on PORT; PORT + 1
/// is the unrelated server's).
const MEASURED_PORT: u16 = PORT + 2;

/// One round's measurement of a selector and of the C round robin, loaded at the same moment.
#[derive(Clone, Copy, Debug)]
pub struct Pair {
    pub selector: Selector,
    pub sample: ProgramSample,
    pub reference: ProgramSample,
}

/// Starts the C round robin and `selector`, each with `workers` Node workers, on two ports;
/// loads both at once with wrk (a new connection per request) for `seconds`; stops them.
pub fn measure(
    selector: Selector,
    workers: u32,
    seconds: u32,
    cluster_lb: &Path,
    reference: &Path,
    scratch: &Path,
) -> Result<Pair> {
    let beside = Running::start(
        Selector::Reference,
        PORT,
        workers,
        cluster_lb,
        reference,
        scratch,
    )?;
    let measured = match Running::start(
        selector,
        MEASURED_PORT,
        workers,
        cluster_lb,
        reference,
        scratch,
    ) {
        Ok(measured) => measured,
        Err(error) => {
            beside.stop();
            return Err(error);
        }
    };
    let result =
        load_side_by_side(&beside, &measured, seconds).and_then(|(reference, mut sample)| {
            if sample.others_ns_per_selection.is_some() {
                let (ns, runs) = unrelated(measured.holder)?;
                sample.others_ns_per_unrelated = Some(ns);
                sample.others_runs_per_unrelated = Some(runs);
            }
            Ok(Pair {
                selector,
                sample,
                reference,
            })
        });
    measured.stop();
    beside.stop();
    result
}

/// A selector serving on its port, ready.
struct Running {
    port: u16,
    /// The process holding the selector's programs.
    holder: u32,
    /// Its sk_reuseport program when the holder has several (the C programs, both loaded by
    /// this process). None: the holder's only one, and every other program the holder has is
    /// the selector's too (least-loaded's counter).
    program: Option<u64>,
    serving: Serving,
}

enum Serving {
    Reference(Reference),
    ClusterLb(Child),
}

impl Running {
    fn start(
        selector: Selector,
        port: u16,
        workers: u32,
        cluster_lb: &Path,
        reference: &Path,
        scratch: &Path,
    ) -> Result<Running> {
        let strategy = match selector {
            Selector::ClusterLb(strategy) => strategy,
            Selector::Reference
            | Selector::ReferenceSticky
            | Selector::ReferenceActiveSet
            | Selector::ReferenceTable => {
                let (program, answering) = match selector {
                    // One client address: one worker answers.
                    Selector::ReferenceSticky => (REFERENCE_STICKY_PROGRAM, 1),
                    Selector::ReferenceActiveSet => (REFERENCE_ACTIVE_SET_PROGRAM, workers),
                    Selector::ReferenceTable => (REFERENCE_TABLE_PROGRAM, workers),
                    _ => (REFERENCE_PROGRAM, workers),
                };
                let running = Reference::start(reference, program, workers, port)?;
                let id = running.program_id;
                if let Err(error) =
                    measure::wait_for_all_workers(([127, 0, 0, 1], port).into(), answering)
                {
                    running.stop();
                    return Err(error);
                }
                return Ok(Running {
                    port,
                    holder: std::process::id(),
                    program: Some(id),
                    serving: Serving::Reference(running),
                });
            }
        };
        let control = scratch.join(CONTROL_SOCKET);
        // One left by a run that was killed would look like this one's.
        let _ = fs::remove_file(&control);
        // In a cgroup of its own, as under a systemd unit or in a container: least-loaded's
        // counter then runs for its sockets only, and the unrelated server (this process, in
        // the parent cgroup) shows what others pay.
        let cgroup = own_cgroup_child("clb-bench")?;
        let mut primary = Command::new("/bin/sh")
            .arg("-c")
            .arg("echo $$ > \"$1\"/cgroup.procs && shift && exec \"$@\"")
            .arg("sh")
            .arg(&cgroup)
            .arg(cluster_lb)
            .args(["run", "-w", &workers.to_string(), "-l"])
            .arg(format!("127.0.0.1:{port}"))
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
        // Not by asking each worker to answer: under sticky every connection from this one
        // client address goes to one worker.
        let ready = wait_for_control(&control).and_then(|()| {
            measure::wait_until_ready(&control, workers)?;
            // As wait_for_all_workers: let late starters finish their start-up work.
            std::thread::sleep(Duration::from_millis(500));
            Ok(())
        });
        if let Err(error) = ready {
            stop(&mut primary);
            return Err(error);
        }
        Ok(Running {
            port,
            holder: primary.id(),
            program: None,
            serving: Serving::ClusterLb(primary),
        })
    }

    fn stop(self) {
        match self.serving {
            Serving::Reference(reference) => reference.stop(),
            Serving::ClusterLb(mut primary) => stop(&mut primary),
        }
    }
}

/// Loads both selectors at once, each with its own wrk (one thread, 32 connections, `Connection:
/// close`), and reads their programs' run time before and after.
fn load_side_by_side(
    beside: &Running,
    measured: &Running,
    seconds: u32,
) -> Result<(ProgramSample, ProgramSample)> {
    let before = (programs(beside.holder)?, programs(measured.holder)?);
    let load = |running: &Running| measure::wrk_at(running.port, 1, 32, seconds, true);
    let (beside_wrk, measured_wrk) = std::thread::scope(|scope| {
        let beside_wrk = scope.spawn(|| load(beside));
        let measured_wrk = load(measured);
        (beside_wrk.join(), measured_wrk)
    });
    let beside_wrk = beside_wrk.map_err(|_| anyhow!("the reference's wrk thread panicked"))??;
    let measured_wrk = measured_wrk?;
    let after = (programs(beside.holder)?, programs(measured.holder)?);
    Ok((
        sample(beside, &before.0, &after.0, &beside_wrk)?,
        sample(measured, &before.1, &after.1, &measured_wrk)?,
    ))
}

/// What `running`'s programs did between two readings of its holder's programs.
fn sample(
    running: &Running,
    before: &BTreeMap<u64, Program>,
    after: &BTreeMap<u64, Program>,
    wrk: &WrkResult,
) -> Result<ProgramSample> {
    let holder = running.holder;
    let mut selection: Option<(u64, u64, &Program)> = None;
    let mut others_ns = 0;
    let mut has_others = false;
    for (id, new) in after {
        let Some(old) = before.get(id) else {
            continue;
        };
        if running.program.is_some_and(|wanted| wanted != *id) {
            continue;
        }
        let (time, runs) = (
            new.run_time_ns.saturating_sub(old.run_time_ns),
            new.run_cnt.saturating_sub(old.run_cnt),
        );
        if new.prog_type == PROG_TYPE_SK_REUSEPORT {
            if selection.is_some() {
                bail!("process {holder} holds more than one sk_reuseport program");
            }
            selection = Some((time, runs, new));
        } else {
            others_ns += time;
            has_others = true;
        }
    }
    let Some((time, runs, program)) = selection else {
        bail!("process {holder} holds no sk_reuseport program");
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
    /// The kernel's id of the loaded program, to tell its figures from another reference's.
    program_id: u64,
}

impl Reference {
    fn start(object: &Path, name: &str, workers: u32, port: u16) -> Result<Reference> {
        let bytes = fs::read(object).with_context(|| format!("reading {}", object.display()))?;
        let mut ebpf = Ebpf::load(&bytes).context("loading the reference object")?;
        let program: &mut SkReuseport = ebpf
            .program_mut(name)
            .context("no reference program in the object")?
            .try_into()?;
        program.load().context("verifying the reference program")?;
        let program_id = u64::from(
            program
                .info()
                .context("reading the reference program's id")?
                .id(),
        );
        let listeners = (0..workers)
            .map(|_| reuseport_listener(port))
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
        // struct active { u32 count; u32 slots[64]; }: every socket, in order.
        let mut active_set = [0u32; 65];
        active_set[0] = workers;
        for (index, slot) in active_set[1..=workers as usize].iter_mut().enumerate() {
            *slot = index as u32;
        }
        let mut active: Array<_, [u32; 65]> = Array::try_from(
            ebpf.map_mut("REF_ACTIVE")
                .context("no REF_ACTIVE map in the reference object")?,
        )?;
        active
            .set(0, active_set, 0)
            .context("writing the reference's active set")?;
        // struct table { u16 slots[65537]; u16 pad; }: the used entries give the sockets in
        // turn, as slot + 1. Boxed: 128 KiB.
        let mut table = vec![0u16; REFERENCE_TABLE_SIZE].into_boxed_slice();
        for (index, entry) in table[..REFERENCE_TABLE_USED].iter_mut().enumerate() {
            *entry = (index % workers as usize) as u16 + 1;
        }
        let table: Box<[u16; REFERENCE_TABLE_SIZE]> = table
            .try_into()
            .map_err(|_| anyhow!("the reference table has the wrong size"))?;
        let mut tables: Array<_, [u16; REFERENCE_TABLE_SIZE]> = Array::try_from(
            ebpf.map_mut("REF_TABLE")
                .context("no REF_TABLE map in the reference object")?,
        )?;
        tables
            .set(0, table.as_ref(), 0)
            .context("writing the reference's table")?;
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
            program_id,
        })
    }

    fn stop(mut self) {
        stop_all(&mut self.workers);
    }
}

/// A listener on `port` with SO_REUSEPORT, so all of them form one group.
fn reuseport_listener(port: u16) -> Result<TcpListener> {
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
    bind(fd.as_raw_fd(), &SockaddrIn::new(127, 0, 0, 1, port))
        .with_context(|| format!("binding 127.0.0.1:{port}"))?;
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

/// The suite's Markdown table: per selector, the median (min–max) of each figure over the
/// rounds, and its run time as a multiple of the C round robin's in the same measurement.
pub fn table(pairs: &[Pair], workers: u32, rounds: u32, seconds: u32) -> String {
    let of = |selector: Selector, figure: fn(&ProgramSample) -> Option<f64>| -> Vec<f64> {
        pairs
            .iter()
            .flat_map(|pair| {
                [
                    (pair.selector, &pair.sample),
                    (Selector::Reference, &pair.reference),
                ]
            })
            .filter(|(s, _)| *s == selector)
            .filter_map(|(_, sample)| figure(sample))
            .collect()
    };
    // Each measurement's run time over the C round robin's beside it.
    let ratios = |selector: Selector| -> Vec<f64> {
        pairs
            .iter()
            .filter(|pair| pair.selector == selector && pair.reference.ns_per_run > 0.0)
            .map(|pair| pair.sample.ns_per_run / pair.reference.ns_per_run)
            .collect()
    };
    let mut out = format!(
        "## What the program costs, {workers} workers\n\nEach program serves beside the C round robin: both with {workers} Node workers (examples/node/server.js), each worker on its own SO_REUSEPORT socket, on two ports, each loaded by its own wrk (-t1 -c32, `Connection: close`: a new connection per request) for the same {seconds} s; {rounds} rounds, interleaved. ns per run: the kernel's run_time_ns / run_cnt of the sk_reuseport program (kernel.bpf_stats_enabled=1), median (min–max) over the rounds; the C round robin's over every measurement. × C round robin: each measurement's ns per run over the C round robin's in that same measurement, median (min–max) over the rounds; on the C round robin's own row, a second copy of it measured beside the first: the method's check (1.00 when it is fair to both sides), and its spread is what two runs of one program differ by. × the C doing the same: the median × over that of a C program that does the same work: for sticky the C sticky, which reads the client's address (one helper call), hashes it and selects, the least a sticky program does (the bench's clients all have one address, so both stickies give every connection to one worker); for round robin the C round robin over an active set, which rotates over a double-buffered list of the sockets that may receive connections and counts each selection per socket and CPU, as cluster-lb's does so that a worker can be drained and `status` can show its counts; for hash the C hash over a slot table, which takes the entry the kernel's flow hash picks in a double-buffered table of sockets of cluster-lb's size and counts the selection the same way. verified_insns: what the verifier walked. Other programs: run time of the selector's other programs (least-loaded's connection counter) per selection, and per connection to an unrelated server on the same host (2 s of sequential connections to a plain listener on another port, after the load; cluster-lb runs in a cgroup of its own, as under a systemd unit, and the unrelated server in its parent), with their runs per such connection (bpf_stats' own clock reads are part of every run's time).\n\n| program | ns per run | × C round robin | × the C doing the same | verified_insns | other programs ns per selection | other programs ns per unrelated connection | their runs per unrelated connection | conn/s |\n| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n"
    );

    for selector in MEASURED {
        // The C round robin's row: its copy beside it (see MEASURED).
        let times = spread(ratios(selector), 2);
        let same_work = selector.same_work().map(|c| median(ratios(c)));
        let over_same_work = match (median(ratios(selector)), same_work) {
            (Some(ratio), Some(Some(floor))) if floor > 0.0 => format!("{:.2}", ratio / floor),
            _ => "-".into(),
        };
        let insns = of(selector, |s| s.verified_insns.map(|n| n as f64));
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            selector.name(),
            spread(of(selector, |s| Some(s.ns_per_run)), 0),
            times,
            over_same_work,
            spread(insns, 0),
            spread(of(selector, |s| s.others_ns_per_selection), 0),
            spread(of(selector, |s| s.others_ns_per_unrelated), 0),
            spread(of(selector, |s| s.others_runs_per_unrelated), 1),
            spread(of(selector, |s| Some(s.conn_per_s)), 0),
        );
    }
    out
}

/// Runs the suite: every selector beside the C round robin, for each worker count, rounds
/// outermost, each measurement in a network namespace of its own. Its tables.
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
        let mut pairs = Vec::new();
        for round in 1..=rounds {
            for selector in MEASURED {
                eprintln!(
                    "xtask bench: program cost, {workers} workers, round {round}/{rounds}, {} beside the C round robin",
                    selector.name()
                );
                let (cluster_lb, reference, scratch) = (
                    cluster_lb.to_path_buf(),
                    reference.clone(),
                    scratch.to_path_buf(),
                );
                let pair = cluster_lb_tests::in_network_namespace("bench-program", move || {
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
                match pair {
                    Ok(pair) => pairs.push(pair),
                    Err(error) => eprintln!(
                        "xtask bench: program cost of {} failed: {error}",
                        selector.name()
                    ),
                }
            }
        }
        tables.push(table(&pairs, workers, rounds, seconds));
    }
    Ok(tables.join("\n"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(ns: f64) -> ProgramSample {
        ProgramSample {
            ns_per_run: ns,
            verified_insns: Some(20),
            others_ns_per_selection: None,
            others_ns_per_unrelated: None,
            others_runs_per_unrelated: None,
            conn_per_s: 1000.0,
        }
    }

    fn pair(selector: Selector, ns: f64, reference: f64) -> Pair {
        Pair {
            selector,
            sample: sample(ns),
            reference: sample(reference),
        }
    }

    #[test]
    fn the_table_divides_each_measurement_by_the_reference_beside_it() {
        // The reference's own run time moves from round to round; each multiple is over the
        // one measured with it, not over the reference's median.
        let pairs = [
            pair(Selector::Reference, 105.0, 100.0),
            pair(Selector::ClusterLb("hash"), 110.0, 100.0),
            pair(Selector::ClusterLb("hash"), 330.0, 300.0),
            pair(Selector::ClusterLb("hash"), 240.0, 200.0),
            pair(Selector::ReferenceSticky, 150.0, 100.0),
            pair(Selector::ClusterLb("sticky"), 165.0, 100.0),
            pair(Selector::ReferenceActiveSet, 120.0, 100.0),
            pair(Selector::ClusterLb("round-robin"), 126.0, 100.0),
        ];
        let table = table(&pairs, 2, 3, 1);
        assert!(
            table.contains(
                "| C reference round robin | 100 (100–300) | 1.05 | - | 20 | - | - | - | 1000 |"
            ),
            "{table}"
        );
        assert!(
            table.contains("| cluster-lb hash | 240 (110–330) | 1.10 (1.10–1.20) | - | 20 |"),
            "{table}"
        );
        assert!(
            table.contains("| C reference sticky | 150 | 1.50 | - | 20 |"),
            "{table}"
        );
        assert!(
            table.contains("| cluster-lb sticky | 165 | 1.65 | 1.10 | 20 |"),
            "{table}"
        );
        assert_eq!(
            table.matches("| C reference round robin |").count(),
            1,
            "one row per selector: {table}"
        );
        assert!(
            table.contains("| cluster-lb round-robin | 126 | 1.26 | 1.05 | 20 |"),
            "{table}"
        );
        assert!(
            table.contains("| cluster-lb least-loaded | - | - | - | - | - | - | - | - |"),
            "{table}"
        );
    }
}
