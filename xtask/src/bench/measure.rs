//! One measurement of one contender: wait until every worker answers, then the per-worker
//! share of sequential connections, wrk with `Connection: close` and with keep-alive, the
//! primary's CPU time during the load, and the eBPF program's mean run time.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddr,
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use cluster_lb_tests::{fetch_status, get, WorkerState};

use super::contenders::{self, Contender, Paths, PORT};

#[derive(Clone, Debug, Default)]
pub struct Sample {
    pub conn_per_s: f64,
    pub close_p50_ms: f64,
    pub close_p99_ms: f64,
    pub req_per_s: f64,
    pub keepalive_p99_ms: f64,
    pub errors: f64,
    pub max_over_min: f64,
    pub jain: f64,
    /// None when the contender has no primary.
    pub primary_cpu_s: Option<f64>,
    /// None when no eBPF program ran.
    pub bpf_ns_per_run: Option<f64>,
}

pub const SHARE_CONNECTIONS: usize = 1000;

pub fn measure(contender: Contender, workers: u32, seconds: u32, paths: &Paths) -> Result<Sample> {
    let running = contenders::start(contender, workers, paths)?;
    let primary = running.primary.id();
    let control = paths.scratch.join(contenders::CONTROL_SOCKET);
    let result = measure_running(contender, workers, seconds, primary, &control);
    running.stop();
    result
}

fn measure_running(
    contender: Contender,
    workers: u32,
    seconds: u32,
    primary: u32,
    control: &Path,
) -> Result<Sample> {
    let addr: SocketAddr = ([127, 0, 0, 1], PORT).into();
    wait_for_all_workers(addr, workers)?;
    if contender.is_cluster_lb() {
        // Answering is not enough: until a worker is ready the program does not choose it.
        wait_until_ready(control, workers)?;
    }

    let mut by_pid: BTreeMap<u32, usize> = BTreeMap::new();
    for _ in 0..SHARE_CONNECTIONS {
        *by_pid.entry(get(addr)?.pid).or_insert(0) += 1;
    }
    let mut shares: Vec<usize> = by_pid.values().copied().collect();
    shares.resize(shares.len().max(workers as usize), 0);
    let (min, max) = (
        shares.iter().min().copied().unwrap_or(0),
        shares.iter().max().copied().unwrap_or(0),
    );

    let cpu_before = cpu_seconds(primary);
    let bpf_before = bpf_stats(primary);
    let close = wrk(seconds, true)?;
    let bpf_after = bpf_stats(primary);
    let keepalive = wrk(seconds, false)?;
    let cpu_after = cpu_seconds(primary);

    let bpf_ns_per_run = match (bpf_before, bpf_after) {
        (Some((t0, n0)), Some((t1, n1))) if n1 > n0 => Some((t1 - t0) as f64 / (n1 - n0) as f64),
        _ => None,
    };
    Ok(Sample {
        conn_per_s: close.per_second,
        close_p50_ms: close.p50_ms,
        close_p99_ms: close.p99_ms,
        req_per_s: keepalive.per_second,
        keepalive_p99_ms: keepalive.p99_ms,
        errors: close.errors + keepalive.errors,
        max_over_min: if min == 0 {
            f64::INFINITY
        } else {
            max as f64 / min as f64
        },
        jain: jain(&shares),
        primary_cpu_s: contender.has_primary().then_some(cpu_after - cpu_before),
        bpf_ns_per_run,
    })
}

pub(super) fn wait_for_all_workers(addr: SocketAddr, workers: u32) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut pids = BTreeSet::new();
    while pids.len() < workers as usize {
        if Instant::now() > deadline {
            bail!(
                "only {} of {workers} workers answered within 30 s",
                pids.len()
            );
        }
        match get(addr) {
            Ok(answer) => {
                pids.insert(answer.pid);
            }
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
    // Let late starters finish their start-up work before the load.
    std::thread::sleep(Duration::from_millis(500));
    Ok(())
}

pub(super) fn wait_until_ready(control: &Path, workers: u32) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let status = fetch_status(control)?;
        let ready = status
            .workers
            .iter()
            .filter(|w| w.state == WorkerState::Ready)
            .count();
        if ready == workers as usize {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("only {ready} of {workers} workers ready within 30 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Jain's fairness index: 1 when all equal, 1/n when one worker takes everything.
pub fn jain(counts: &[usize]) -> f64 {
    let sum: f64 = counts.iter().map(|&c| c as f64).sum();
    let squares: f64 = counts.iter().map(|&c| (c as f64).powi(2)).sum();
    if squares == 0.0 {
        return 0.0;
    }
    sum * sum / (counts.len() as f64 * squares)
}

/// user + system CPU seconds of `pid` so far (fields 14 and 15 of /proc/PID/stat).
fn cpu_seconds(pid: u32) -> f64 {
    let ticks = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100) as f64;
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    let Some(after_name) = stat.rfind(')').map(|i| &stat[i + 1..]) else {
        return 0.0;
    };
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    let field = |n: usize| {
        fields
            .get(n)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // After the name, field 3 of stat is index 0 here: utime (14) is 11, stime (15) is 12.
    (field(11) + field(12)) / ticks
}

/// (run_time_ns, run_cnt) summed over the BPF programs `pid` holds, from its fdinfo; needs
/// kernel.bpf_stats_enabled=1.
pub(super) fn bpf_stats(pid: u32) -> Option<(u64, u64)> {
    let mut total: Option<(u64, u64)> = None;
    for entry in std::fs::read_dir(format!("/proc/{pid}/fdinfo"))
        .ok()?
        .flatten()
    {
        let Ok(info) = std::fs::read_to_string(entry.path()) else {
            continue;
        };
        let value = |key: &str| -> Option<u64> {
            info.lines()
                .find_map(|l| l.strip_prefix(key))
                .and_then(|v| v.trim().parse().ok())
        };
        if let (Some(time), Some(count)) = (value("run_time_ns:"), value("run_cnt:")) {
            let sum = total.get_or_insert((0, 0));
            sum.0 += time;
            sum.1 += count;
        }
    }
    total
}

pub(super) struct WrkResult {
    pub per_second: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub errors: f64,
}

pub(super) fn wrk(seconds: u32, close: bool) -> Result<WrkResult> {
    wrk_at(PORT, 2, 64, seconds, close)
}

/// wrk against 127.0.0.1:`port` with `threads` threads keeping `connections` open.
pub(super) fn wrk_at(
    port: u16,
    threads: u32,
    connections: u32,
    seconds: u32,
    close: bool,
) -> Result<WrkResult> {
    let mut command = Command::new("wrk");
    command
        .arg(format!("-t{threads}"))
        .arg(format!("-c{connections}"))
        .args(["--latency", "-d"])
        .arg(format!("{seconds}s"));
    if close {
        command.args(["-H", "Connection: close"]);
    }
    command.arg(format!("http://127.0.0.1:{port}/"));
    let output = command.output().context("running wrk")?;
    let text = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        bail!("wrk failed: {text}");
    }
    parse_wrk(&text).with_context(|| format!("unexpected wrk output:\n{text}"))
}

fn parse_wrk(text: &str) -> Option<WrkResult> {
    let line_value = |prefix: &str| {
        text.lines()
            .map(str::trim)
            .find(|l| l.starts_with(prefix))
            .and_then(|l| l.split_whitespace().nth(1).map(str::to_string))
    };
    let per_second = line_value("Requests/sec:")?.parse().ok()?;
    let p50_ms = duration_ms(&line_value("50%")?)?;
    let p99_ms = duration_ms(&line_value("99%")?)?;
    let mut errors = 0.0;
    if let Some(line) = text
        .lines()
        .find(|l| l.trim_start().starts_with("Socket errors:"))
    {
        errors += line
            .split(|c: char| !c.is_ascii_digit())
            .filter_map(|n| n.parse::<f64>().ok())
            .sum::<f64>();
    }
    if let Some(non2xx) = line_value("Non-2xx") {
        errors += non2xx.parse::<f64>().unwrap_or(0.0);
    }
    Some(WrkResult {
        per_second,
        p50_ms,
        p99_ms,
        errors,
    })
}

/// wrk prints "812.00us", "1.23ms", "2.00s".
pub(super) fn duration_ms(text: &str) -> Option<f64> {
    let split = text.find(|c: char| c.is_ascii_alphabetic())?;
    let (number, unit) = text.split_at(split);
    let value: f64 = number.parse().ok()?;
    match unit {
        "us" => Some(value / 1000.0),
        "ms" => Some(value),
        "s" => Some(value * 1000.0),
        "m" => Some(value * 60_000.0),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrk_output_is_parsed() {
        let text = "Running 3s test @ http://127.0.0.1:8080/\n  2 threads and 64 connections\n  Latency Distribution\n     50%  812.00us\n     75%    1.10ms\n     90%    1.50ms\n     99%    4.20ms\n  30000 requests in 3.00s, 3.00MB read\n  Socket errors: connect 0, read 2, write 0, timeout 1\nRequests/sec:  10000.50\nTransfer/sec:      1.00MB\n";
        let result = parse_wrk(text).unwrap();
        assert_eq!(result.per_second, 10000.5);
        assert_eq!(result.p50_ms, 0.812);
        assert_eq!(result.p99_ms, 4.2);
        assert_eq!(result.errors, 3.0);
    }

    #[test]
    fn fairness() {
        assert_eq!(jain(&[5, 5, 5, 5]), 1.0);
        assert!((jain(&[10, 0]) - 0.5).abs() < 1e-9);
    }
}
