//! The README's first command, `cargo xtask demo`, run as a user runs it, in a network namespace
//! of its own: it must serve the Node example on 127.0.0.1:8080 with every one of its 4 workers
//! answering, and stop cleanly on Ctrl-C (SIGINT, exit status 0). `cargo xtask test` runs this
//! before the tests, so the command the README starts with cannot break unnoticed.

use std::{
    collections::BTreeSet,
    fs,
    path::Path,
    process::{Child, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Context, Result};
use cluster_lb_tests::{get, in_network_namespace};

use crate::{cargo, target_dir};

const WORKERS: usize = 4;
/// How long the demo may take to serve: its release builds are done before (dist), so this is
/// Node starting four times on a loaded machine.
const START_TIMEOUT: Duration = Duration::from_secs(120);
const STOP_TIMEOUT: Duration = Duration::from_secs(40);

pub fn check() -> Result<()> {
    let dir = target_dir()?.join("demo-check");
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).context("creating the demo check's directory")?;
    let outcome = in_network_namespace("demo-check", move || run(&dir))
        .map_err(|_| anyhow!("the demo check panicked"))?;
    let workers = outcome?;
    println!(
        "xtask: `cargo xtask demo` served from {workers} workers and stopped cleanly on Ctrl-C"
    );
    Ok(())
}

fn run(dir: &Path) -> Result<usize> {
    let log = dir.join("demo.log");
    let output = fs::File::create(&log).context("creating the demo log")?;
    let mut child = cargo()
        .args(["xtask", "demo"])
        // Its control socket goes here, not into the machine's /run/cluster-lb.
        .env("CLUSTER_LB_RUN_DIR", dir)
        .stdin(Stdio::null())
        .stdout(output.try_clone().context("the demo log")?)
        .stderr(output)
        .spawn()
        .context("starting `cargo xtask demo`")?;
    let result = serve_then_stop(&mut child);
    if result.is_err() {
        let _ = child.kill();
        let _ = child.wait();
        let text = fs::read_to_string(&log).unwrap_or_default();
        let tail: Vec<&str> = text.lines().rev().take(20).collect();
        eprintln!("xtask: the demo's last lines:");
        for line in tail.iter().rev() {
            eprintln!("  | {line}");
        }
    }
    result
}

fn serve_then_stop(child: &mut Child) -> Result<usize> {
    let addr = ([127, 0, 0, 1], 8080).into();
    let deadline = Instant::now() + START_TIMEOUT;
    let mut answered = BTreeSet::new();
    while answered.len() < WORKERS {
        if let Some(status) = child.try_wait()? {
            bail!("`cargo xtask demo` exited with {status} before every worker answered");
        }
        if Instant::now() > deadline {
            bail!(
                "`cargo xtask demo`: {} of {WORKERS} workers answered on {addr} within {}s",
                answered.len(),
                START_TIMEOUT.as_secs()
            );
        }
        for _ in 0..WORKERS * 2 {
            if let Ok(answer) = get(addr) {
                answered.insert(answer.worker);
            }
        }
        thread::sleep(Duration::from_millis(200));
    }
    // cargo execs xtask, which execs cluster-lb: the child is the primary, as a terminal's
    // Ctrl-C would find it.
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT).context("sending SIGINT")?;
    let deadline = Instant::now() + STOP_TIMEOUT;
    loop {
        if let Some(status) = child.try_wait()? {
            if !status.success() {
                bail!("`cargo xtask demo` ended with {status} after Ctrl-C");
            }
            return Ok(answered.len());
        }
        if Instant::now() > deadline {
            bail!(
                "`cargo xtask demo` did not stop within {}s of Ctrl-C",
                STOP_TIMEOUT.as_secs()
            );
        }
        thread::sleep(Duration::from_millis(50));
    }
}
