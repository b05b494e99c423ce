//! `cargo xtask bench`: cluster-lb side by side with what users would run instead, on this
//! machine. Prints a table and writes bench/results/<date>.md with an SVG chart. It measures;
//! it asserts nothing.

mod closed_loop;
mod contenders;
pub mod measure;
mod mixed;
mod program;
mod report;

use std::{fs, process::Command, time::Instant};

use anyhow::{anyhow, bail, Context, Result};
use cluster_lb_tests::in_network_namespace;

use crate::{cargo, root, run, setup, target_dir};
use contenders::{Contender, Paths, ALL};
use measure::Sample;

/// `cargo xtask bench` options.
#[derive(clap::Args, Debug)]
pub struct Options {
    /// Rounds over every contender
    #[arg(long, value_name = "N", default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
    rounds: u32,
    /// Seconds of load per measurement
    #[arg(long, value_name = "S", default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
    seconds: u32,
    /// Worker counts to measure, comma-separated (the main suite)
    #[arg(long, value_name = "N,N", value_delimiter = ',', default_value = "2,8", value_parser = clap::value_parser!(u32).range(1..))]
    workers: Vec<u32>,
    /// Which suites: main (every balancer with the plain Node worker), mixed (mixed-cost
    /// workers under each strategy), program (each strategy's program cost next to a minimal
    /// C program), or all
    #[arg(long, value_name = "SUITE", default_value = "all", value_parser = ["all", "main", "mixed", "program"])]
    suite: String,
    /// The cluster-lb binary to measure instead of this workspace's release build (say, an
    /// older commit's, to compare programs before and after a change)
    #[arg(long, value_name = "PATH")]
    cluster_lb: Option<std::path::PathBuf>,
}

pub fn bench(options: &Options) -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("the benchmark needs root (network namespaces, eBPF)");
    }
    setup::ensure_packages(&[("wrk", "wrk"), ("node", "nodejs"), ("npm", "npm")])?;
    run(cargo().args([
        "build",
        "--release",
        "-p",
        "cluster-lb",
        "-p",
        "example-rust-server",
    ]))?;
    let target = target_dir()?;
    let scratch = target.join("bench-scratch");
    fs::create_dir_all(&scratch).with_context(|| format!("creating {}", scratch.display()))?;
    let main_suite = options.suite == "all" || options.suite == "main";
    let paths = Paths {
        cluster_lb: match &options.cluster_lb {
            Some(path) if path.is_file() => path.clone(),
            Some(path) => bail!("--cluster-lb {}: no such file", path.display()),
            None => target.join("release/cluster-lb"),
        },
        rust_worker: target.join("release/example-rust-server"),
        // Only the main suite runs PM2.
        pm2_runtime: if main_suite {
            install_pm2(&target.join("bench-cache"))?
        } else {
            std::path::PathBuf::new()
        },
        scratch,
    };
    let _stats = BpfStats::enable();

    let started = Instant::now();
    let program = if options.suite == "all" || options.suite == "program" {
        let tables = program::suite(
            options.rounds,
            options.seconds,
            &options.workers,
            &paths.cluster_lb,
            &paths.scratch,
        )?;
        match &options.cluster_lb {
            Some(path) => format!("cluster-lb measured: `{}`\n\n{tables}", path.display()),
            None => tables,
        }
    } else {
        String::new()
    };
    println!("{program}");
    let dir = root().join("bench/results");
    if options.suite == "program" {
        let written = report::write_extra(&dir, "program", &program)?;
        eprintln!("xtask bench: wrote {}", written.display());
        return Ok(());
    }

    let mut samples: Vec<(Contender, u32, Sample)> = Vec::new();
    // Rounds outermost, contenders innermost: drift over the run (thermal, other load)
    // spreads over every contender instead of favouring whoever ran first.
    for round in (1..=options.rounds).filter(|_| main_suite) {
        for &workers in &options.workers {
            for contender in ALL {
                eprintln!(
                    "xtask bench: round {round}/{}, {workers} workers, {}",
                    options.rounds,
                    contender.name()
                );
                let seconds = options.seconds;
                let pm2 = paths.pm2_runtime.clone();
                let (cluster_lb, rust_worker, scratch) = (
                    paths.cluster_lb.clone(),
                    paths.rust_worker.clone(),
                    paths.scratch.clone(),
                );
                let sample = in_network_namespace("bench", move || {
                    let paths = Paths {
                        cluster_lb,
                        rust_worker,
                        pm2_runtime: pm2,
                        scratch,
                    };
                    measure::measure(contender, workers, seconds, &paths)
                        .map_err(|e| format!("{e:#}"))
                })
                .map_err(|_| anyhow!("{} panicked", contender.name()))?;
                match sample {
                    Ok(sample) => samples.push((contender, workers, sample)),
                    Err(error) => eprintln!(
                        "xtask bench: {} with {workers} workers failed: {error}",
                        contender.name()
                    ),
                }
            }
        }
    }
    let mixed = if options.suite == "main" {
        String::new()
    } else {
        mixed_suite(options, &paths)?
    };
    println!("{mixed}");
    if !main_suite {
        let written = report::write_extra(&dir, "mixed", &mixed)?;
        eprintln!("xtask bench: wrote {}", written.display());
        return Ok(());
    }
    let report = report::Report::new(
        &samples,
        &options.workers,
        options.rounds,
        options.seconds,
        started.elapsed(),
    );
    println!("{}", report.table());
    let extra = [program, mixed]
        .into_iter()
        .filter(|text| !text.is_empty())
        .collect::<Vec<_>>()
        .join("\n");
    let written = report.write(&dir, &extra)?;
    eprintln!("xtask bench: wrote {}", written.display());
    Ok(())
}

/// The mixed-cost suite at each of its loads, rounds interleaved like the main one; its tables.
fn mixed_suite(options: &Options, paths: &Paths) -> Result<String> {
    let mut tables = Vec::new();
    for load in mixed::LOADS {
        let mut samples = Vec::new();
        for round in 1..=options.rounds {
            for contender in mixed::ALL {
                eprintln!(
                    "xtask bench: mixed-cost {} ({} connections), round {round}/{}, {}",
                    load.1,
                    load.0,
                    options.rounds,
                    contender.name()
                );
                let (cluster_lb, scratch, seconds) = (
                    paths.cluster_lb.clone(),
                    paths.scratch.clone(),
                    options.seconds,
                );
                let sample = in_network_namespace("bench-mixed", move || {
                    mixed::measure(contender, load.0, seconds, &cluster_lb, &scratch)
                        .map_err(|e| format!("{e:#}"))
                })
                .map_err(|_| anyhow!("{} panicked", contender.name()))?;
                match sample {
                    Ok(sample) => samples.push((contender, sample)),
                    Err(error) => eprintln!(
                        "xtask bench: mixed-cost {} failed: {error}",
                        contender.name()
                    ),
                }
            }
        }
        tables.push(mixed::table(
            &samples,
            load,
            options.rounds,
            options.seconds,
        ));
    }
    Ok(tables.join("\n"))
}

/// PM2 from the npm registry, into a cache in the target directory (not installed globally).
fn install_pm2(cache: &std::path::Path) -> Result<std::path::PathBuf> {
    let runtime = cache.join("node_modules/.bin/pm2-runtime");
    if runtime.is_file() {
        return Ok(runtime);
    }
    fs::create_dir_all(cache).context("creating the npm cache folder")?;
    run(Command::new("npm")
        .args(["install", "--no-audit", "--no-fund", "--prefix"])
        .arg(cache)
        .arg("pm2@5"))?;
    Ok(runtime)
}

/// kernel.bpf_stats_enabled=1 for the run (the program's run time is only counted then),
/// restored afterwards.
struct BpfStats {
    previous: Option<String>,
}

const BPF_STATS: &str = "/proc/sys/kernel/bpf_stats_enabled";

impl BpfStats {
    fn enable() -> BpfStats {
        let previous = fs::read_to_string(BPF_STATS).ok();
        if fs::write(BPF_STATS, "1").is_err() {
            eprintln!(
                "xtask bench: cannot enable {BPF_STATS}; the eBPF run time column stays empty"
            );
        }
        BpfStats { previous }
    }
}

impl Drop for BpfStats {
    fn drop(&mut self) {
        if let Some(previous) = &self.previous {
            let _ = fs::write(BPF_STATS, previous.trim());
        }
    }
}
