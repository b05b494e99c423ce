//! `cargo xtask distribution`: how each strategy spreads sequential connections over 2, 4 and
//! 16 workers, as a table. A measurement to read, not a test: it asserts nothing.

use std::{collections::BTreeMap, net::SocketAddr};

use anyhow::{anyhow, Result};
use cluster_lb_tests::{distribution, in_network_namespace, workspace_binary, Cluster};

use crate::{cargo, run, target_dir};

const ADDR: &str = "127.0.0.1:8080";

/// `cargo xtask distribution` options.
#[derive(clap::Args, Debug)]
pub struct Options {
    /// Sequential connections per measurement
    #[arg(
        long,
        value_name = "N",
        default_value_t = 1000,
        value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..)
    )]
    connections: usize,
}

pub fn measure(options: &Options) -> Result<()> {
    let connections = options.connections;
    // workspace_binary (here and in Cluster) looks there; the directory may come from a cargo
    // config rather than the environment. Set before any thread starts.
    std::env::set_var("CARGO_TARGET_DIR", target_dir()?);
    run(cargo().args(["build", "--workspace", "--bins"]))?;
    let server = workspace_binary("example-rust-server")
        .display()
        .to_string();

    println!("| strategy | workers | connections per worker (by worker id) | min | max | max/min | Jain's index |");
    println!("| --- | ---: | --- | ---: | ---: | ---: | ---: |");
    for strategy in ["round-robin", "hash", "kernel"] {
        for workers in [2u32, 4, 16] {
            let server = server.clone();
            let seen = in_network_namespace(&format!("{strategy}-{workers}"), move || {
                let n = workers.to_string();
                let cluster = Cluster::start(&[
                    "run",
                    "-w",
                    &n,
                    "--listen",
                    ADDR,
                    "--strategy",
                    strategy,
                    "--",
                    &server,
                ]);
                cluster.wait_until_ready(workers as usize);
                let addr: SocketAddr = ADDR.parse().expect("address");
                let seen = distribution(addr, connections);
                let _ = cluster.stop();
                seen
            })
            .map_err(|_| {
                anyhow!("measuring {strategy} with {workers} workers failed (see above)")
            })?;
            println!("{}", row(strategy, workers, &seen));
        }
    }
    Ok(())
}

fn row(strategy: &str, workers: u32, seen: &BTreeMap<u32, usize>) -> String {
    let counts: Vec<usize> = (0..workers)
        .map(|id| seen.get(&id).copied().unwrap_or(0))
        .collect();
    let min = counts.iter().copied().min().unwrap_or(0);
    let max = counts.iter().copied().max().unwrap_or(0);
    let ratio = if min == 0 {
        "inf".to_string()
    } else {
        format!("{:.2}", max as f64 / min as f64)
    };
    let list: Vec<String> = counts.iter().map(usize::to_string).collect();
    format!(
        "| {strategy} | {workers} | {} | {min} | {max} | {ratio} | {:.4} |",
        list.join(" "),
        crate::bench::measure::jain(&counts)
    )
}
