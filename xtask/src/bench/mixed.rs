//! The mixed-cost suite: 4 Node workers of bench/mixed-cost.js (one request in ten blocks its
//! event loop 25 ms), wrk with 8 connections and `Connection: close`, under each cluster-lb
//! strategy and under Node's own cluster module. What it shows: round robin (and every blind
//! strategy) keeps sending connections to a worker whose loop is blocked, and they wait behind
//! it; least-loaded does not.

use std::{
    fmt::Write as _,
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

use super::{contenders::PORT, measure};
use crate::root;

pub const WORKERS: u32 = 4;
const CONNECTIONS: u32 = 8;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mixed {
    ClusterLb(&'static str),
    NodeRr,
    NodeNone,
}

pub const ALL: [Mixed; 6] = [
    Mixed::ClusterLb("round-robin"),
    Mixed::ClusterLb("hash"),
    Mixed::ClusterLb("kernel"),
    Mixed::ClusterLb("least-loaded"),
    Mixed::NodeRr,
    Mixed::NodeNone,
];

impl Mixed {
    pub fn name(self) -> String {
        match self {
            Mixed::ClusterLb(strategy) => format!("cluster-lb {strategy}"),
            Mixed::NodeRr => "Node cluster SCHED_RR".into(),
            Mixed::NodeNone => "Node cluster SCHED_NONE".into(),
        }
    }
}

/// One measurement.
#[derive(Clone, Copy, Debug, Default)]
pub struct MixedSample {
    pub conn_per_s: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    pub errors: f64,
    /// eBPF run time (every program of the primary) per connection.
    pub bpf_ns_per_connection: Option<f64>,
}

/// Starts `contender`, loads it for `seconds`, stops it.
pub fn measure(
    contender: Mixed,
    seconds: u32,
    cluster_lb: &Path,
    scratch: &Path,
) -> Result<MixedSample> {
    let server = root().join("bench/mixed-cost.js");
    let mut command = match contender {
        Mixed::ClusterLb(strategy) => {
            let mut c = Command::new(cluster_lb);
            c.args([
                "run",
                "-w",
                &WORKERS.to_string(),
                "-l",
                &format!("127.0.0.1:{PORT}"),
            ])
            .args(["-s", strategy, "--control"])
            .arg(scratch.join("mixed.sock"))
            .arg("--")
            .arg("node")
            .arg(&server);
            c
        }
        Mixed::NodeRr | Mixed::NodeNone => {
            let policy = if contender == Mixed::NodeRr {
                "rr"
            } else {
                "none"
            };
            let mut c = Command::new("node");
            c.arg(root().join("bench/node-cluster.js"))
                .env("NODE_CLUSTER_SCHED_POLICY", policy)
                .env("WORKERS", WORKERS.to_string())
                .env("SERVER", &server)
                .env("PORT", PORT.to_string());
            c
        }
    };
    command
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let mut child = command
        .spawn()
        .with_context(|| format!("starting {}", contender.name()))?;
    let result = run_load(contender, seconds, &child, scratch);
    stop(&mut child);
    result
}

fn run_load(contender: Mixed, seconds: u32, child: &Child, scratch: &Path) -> Result<MixedSample> {
    measure::wait_for_all_workers(([127, 0, 0, 1], PORT).into(), WORKERS)?;
    if let Mixed::ClusterLb(_) = contender {
        // Answering is not enough: until a worker is ready the program does not choose it.
        measure::wait_until_ready(&scratch.join("mixed.sock"), WORKERS)?;
    }
    let before = measure::bpf_stats(child.id());
    let output = Command::new("wrk")
        .args([
            "-t2",
            &format!("-c{CONNECTIONS}"),
            "--latency",
            "-H",
            "Connection: close",
            "-d",
        ])
        .arg(format!("{seconds}s"))
        .arg(format!("http://127.0.0.1:{PORT}/"))
        .output()
        .context("running wrk")?;
    let after = measure::bpf_stats(child.id());
    let text = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        bail!("wrk failed: {text}");
    }
    let mut sample = parse(&text).with_context(|| format!("unexpected wrk output:\n{text}"))?;
    let connections = sample.conn_per_s * f64::from(seconds);
    sample.bpf_ns_per_connection = match (before, after) {
        (Some((t0, _)), Some((t1, _))) if t1 > t0 && connections > 0.0 => {
            Some((t1 - t0) as f64 / connections)
        }
        _ => None,
    };
    Ok(sample)
}

fn stop(child: &mut Child) {
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
    let deadline = Instant::now() + Duration::from_secs(10);
    while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// wrk --latency: Requests/sec, the 50% and 99% lines, the Latency line's Max, errors.
fn parse(text: &str) -> Option<MixedSample> {
    let line = |prefix: &str| text.lines().map(str::trim).find(|l| l.starts_with(prefix));
    let nth = |prefix: &str, n: usize| line(prefix)?.split_whitespace().nth(n).map(str::to_string);
    let errors: f64 = line("Socket errors:")
        .map(|l| {
            l.split(|c: char| !c.is_ascii_digit())
                .filter_map(|n| n.parse::<f64>().ok())
                .sum()
        })
        .unwrap_or(0.0);
    Some(MixedSample {
        conn_per_s: nth("Requests/sec:", 1)?.parse().ok()?,
        p50_ms: measure::duration_ms(&nth("50%", 1)?)?,
        p99_ms: measure::duration_ms(&nth("99%", 1)?)?,
        max_ms: measure::duration_ms(&nth("Latency ", 3)?)?,
        errors,
        bpf_ns_per_connection: None,
    })
}

/// The suite's Markdown table: medians (min–max) per contender.
pub fn table(samples: &[(Mixed, MixedSample)], rounds: u32, seconds: u32) -> String {
    let mut out = format!(
        "## Mixed-cost workers\n\n{WORKERS} Node workers of bench/mixed-cost.js (one request in ten blocks its event loop 25 ms); wrk -t2 -c{CONNECTIONS} -H 'Connection: close' for {seconds} s; {rounds} rounds, interleaved. Cells: median (min–max).\n\n| contender | conn/s | p50 ms | p99 ms | max ms | eBPF ns/connection | errors |\n| --- | ---: | ---: | ---: | ---: | ---: | ---: |\n"
    );
    for contender in ALL {
        let of = |figure: fn(&MixedSample) -> Option<f64>| -> Vec<f64> {
            samples
                .iter()
                .filter(|(c, _)| *c == contender)
                .filter_map(|(_, s)| figure(s))
                .collect()
        };
        let cell = |values: Vec<f64>, decimals: usize| spread(values, decimals);
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} | {} |",
            contender.name(),
            cell(of(|s| Some(s.conn_per_s)), 0),
            cell(of(|s| Some(s.p50_ms)), 2),
            cell(of(|s| Some(s.p99_ms)), 2),
            cell(of(|s| Some(s.max_ms)), 1),
            cell(of(|s| s.bpf_ns_per_connection), 0),
            cell(of(|s| Some(s.errors)), 0),
        );
    }
    out
}

fn spread(mut values: Vec<f64>, decimals: usize) -> String {
    if values.is_empty() {
        return "-".into();
    }
    values.sort_by(|a, b| a.total_cmp(b));
    let n = values.len();
    let median = if n % 2 == 1 {
        values[n / 2]
    } else {
        (values[n / 2 - 1] + values[n / 2]) / 2.0
    };
    let (min, max) = (values[0], values[n - 1]);
    if min == max {
        format!("{median:.decimals$}")
    } else {
        format!("{median:.decimals$} ({min:.decimals$}–{max:.decimals$})")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrk_latency_output_is_read() {
        let text = "  2 threads and 8 connections\n  Thread Stats   Avg      Stdev     Max   +/- Stdev\n    Latency     5.12ms    3.20ms  52.01ms   90.00%\n  Latency Distribution\n     50%    4.50ms\n     75%    6.10ms\n     90%    9.50ms\n     99%   47.00ms\n  9000 requests in 3.00s, 1.00MB read\nRequests/sec:   3000.00\n";
        let sample = parse(text).unwrap();
        assert_eq!(sample.conn_per_s, 3000.0);
        assert_eq!(
            (sample.p50_ms, sample.p99_ms, sample.max_ms),
            (4.5, 47.0, 52.01)
        );
        assert_eq!(spread(vec![3.0, 1.0, 2.0], 0), "2 (1–3)");
    }
}
