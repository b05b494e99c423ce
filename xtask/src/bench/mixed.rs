//! The mixed-cost suite: 4 Node workers of bench/mixed-cost.js (one request in ten blocks its
//! event loop 25 ms), a closed-loop client with `Connection: close` at two loads (see
//! [`LOADS`]), under each cluster-lb strategy and under Node's own cluster module. What it shows: round robin
//! (and every blind strategy) keeps sending connections to a worker whose loop is blocked, and
//! they wait behind it; least-loaded does not. Since the slow requests themselves are a tenth
//! of all, the overall p99 is theirs whatever the balancer does; the fast requests' p99 is
//! where waiting behind a blocked worker shows.

use std::{
    fmt::Write as _,
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

use super::{closed_loop, contenders::PORT, measure, report::spread};
use crate::root;

pub const WORKERS: u32 = 4;
/// Client connections at a time, and what that load is. The 4 workers serve at most about
/// 1400 connections per second (a tenth of requests hold a worker 25 ms): 4 connections keep
/// them below that, 32 keep every worker's queue full.
pub const LOADS: [(u32, &str); 2] = [(4, "below saturation"), (32, "overloaded")];

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
    /// The p99 of the requests that did not block (nine in ten).
    pub fast_p99_ms: f64,
    pub max_ms: f64,
    pub errors: f64,
    /// eBPF run time (every program of the primary) per connection.
    pub bpf_ns_per_connection: Option<f64>,
}

/// Starts `contender`, loads it with `connections` for `seconds`, stops it.
pub fn measure(
    contender: Mixed,
    connections: u32,
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
    let result = run_load(contender, connections, seconds, &child, scratch);
    stop(&mut child);
    result
}

fn run_load(
    contender: Mixed,
    connections: u32,
    seconds: u32,
    child: &Child,
    scratch: &Path,
) -> Result<MixedSample> {
    measure::wait_for_all_workers(([127, 0, 0, 1], PORT).into(), WORKERS)?;
    if let Mixed::ClusterLb(_) = contender {
        // Answering is not enough: until a worker is ready the program does not choose it.
        measure::wait_until_ready(&scratch.join("mixed.sock"), WORKERS)?;
    }
    let before = measure::bpf_stats(child.id());
    let recorded = closed_loop::run(
        ([127, 0, 0, 1], PORT).into(),
        connections,
        seconds,
        "x-slow: 1",
    );
    let after = measure::bpf_stats(child.id());
    let mut sample = summarize(&recorded)?;
    let connections = recorded.requests.len() as f64;
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

/// Connections per second, latency quantiles (all, and the fast requests'), errors.
fn summarize(recorded: &closed_loop::Recorded) -> Result<MixedSample> {
    let mut all: Vec<Duration> = recorded.requests.iter().map(|r| r.latency).collect();
    let mut fast: Vec<Duration> = recorded
        .requests
        .iter()
        .filter(|r| !r.slow)
        .map(|r| r.latency)
        .collect();
    let (Some(p50_ms), Some(p99_ms), Some(max_ms), Some(fast_p99_ms)) = (
        closed_loop::quantile_ms(&mut all, 0.5),
        closed_loop::quantile_ms(&mut all, 0.99),
        closed_loop::quantile_ms(&mut all, 1.0),
        closed_loop::quantile_ms(&mut fast, 0.99),
    ) else {
        bail!("no request was answered ({} errors)", recorded.errors);
    };
    Ok(MixedSample {
        conn_per_s: recorded.requests.len() as f64 / recorded.elapsed.as_secs_f64(),
        p50_ms,
        p99_ms,
        fast_p99_ms,
        max_ms,
        errors: recorded.errors as f64,
        bpf_ns_per_connection: None,
    })
}

/// The suite's Markdown table: medians (min–max) per contender.
pub fn table(
    samples: &[(Mixed, MixedSample)],
    (connections, load): (u32, &str),
    rounds: u32,
    seconds: u32,
) -> String {
    let mut out = format!(
        "## Mixed-cost workers, {load}\n\n{WORKERS} Node workers of bench/mixed-cost.js (one request in ten blocks its event loop 25 ms); a closed-loop client (xtask/src/bench/closed_loop.rs) with {connections} connections at a time, each request on a new connection, for {seconds} s; {rounds} rounds, interleaved. \"p99 fast\": the p99 of the requests that did not block, i.e. the time they waited behind blocked ones. Cells: median (min–max).\n\n| contender | conn/s | p50 ms | p99 ms | p99 fast ms | max ms | eBPF ns/connection | errors |\n| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n"
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
            "| {} | {} | {} | {} | {} | {} | {} | {} |",
            contender.name(),
            cell(of(|s| Some(s.conn_per_s)), 0),
            cell(of(|s| Some(s.p50_ms)), 2),
            cell(of(|s| Some(s.p99_ms)), 2),
            cell(of(|s| Some(s.fast_p99_ms)), 2),
            cell(of(|s| Some(s.max_ms)), 1),
            cell(of(|s| s.bpf_ns_per_connection), 0),
            cell(of(|s| Some(s.errors)), 0),
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_run_is_summarized_per_kind_of_request() {
        let request = |ms: u64, slow: bool| closed_loop::Request {
            latency: Duration::from_millis(ms),
            slow,
        };
        let mut requests: Vec<closed_loop::Request> =
            (1..=90).map(|ms| request(ms, false)).collect();
        requests.extend((0..10).map(|_| request(500, true)));
        let sample = summarize(&closed_loop::Recorded {
            requests,
            errors: 2,
            elapsed: Duration::from_secs(2),
        })
        .unwrap();
        assert_eq!(sample.conn_per_s, 50.0);
        assert_eq!(
            (sample.p50_ms, sample.p99_ms, sample.max_ms),
            (50.0, 500.0, 500.0)
        );
        assert_eq!(sample.fast_p99_ms, 90.0);
        assert_eq!(sample.errors, 2.0);
        assert_eq!(spread(vec![3.0, 1.0, 2.0], 0), "2 (1–3)");
    }
}
