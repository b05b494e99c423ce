//! Project tasks. Each installs what it needs on a fresh machine, so the README's commands work
//! as written:
//!
//!   cargo xtask build-ebpf [--check]   build the program, write (or compare) the committed object
//!   cargo xtask test [ARGS]            everything the test suite needs, then the whole suite
//!   cargo xtask demo [--lang L] [--port P] [--workers N]
//!                                      cluster-lb serving a bundled example server
//!   cargo xtask bench [--rounds N] [--seconds S] [--workers 2,8]
//!                                      cluster-lb against Node cluster, PM2, plain SO_REUSEPORT
//!   cargo xtask vm-test [--kernel 6.1|6.12|all]
//!                                      the integration tests on Debian's 6.1 and 6.12 under qemu
//!   cargo xtask distribution [--connections N]
//!                                      per-worker shares for each strategy, as a table

mod bench;
mod distribution;
mod ebpf;
mod setup;
mod test_counts;
mod vm;

use std::{
    env,
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Command, ExitCode},
};

use anyhow::{bail, Context, Result};

fn main() -> ExitCode {
    let args: Vec<String> = env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("build-ebpf") => ebpf::build(args[1..].iter().any(|a| a == "--check")),
        Some("test") => test(&args[1..]),
        Some("demo") => demo(&args[1..]),
        Some("distribution") => distribution::measure(&args[1..]),
        Some("bench") => bench::bench(&args[1..]),
        Some("vm-test") => vm::vm_test(&args[1..]),
        _ => {
            eprintln!("usage: cargo xtask build-ebpf [--check] | test [CARGO TEST ARGS] | demo [--lang node|python|rust] [--port P] [--workers N] | distribution [--connections N] | bench [--rounds N] [--seconds S] [--workers 2,8] | vm-test [--kernel 6.1|6.12|all]");
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("xtask: error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// The workspace root (xtask lives one level below it).
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// Runs a command to completion, failing with the command line when it fails.
pub fn run(command: &mut Command) -> Result<()> {
    let status = command
        .status()
        .with_context(|| format!("cannot start {command:?}"))?;
    if !status.success() {
        bail!("{command:?} failed with {status}");
    }
    Ok(())
}

/// The cargo that runs us, without the variables it set for us: they would pin a nested cargo
/// to this toolchain and this package.
pub fn cargo() -> Command {
    let mut command = Command::new(env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    command.current_dir(root());
    command
}

fn test(extra: &[String]) -> Result<()> {
    setup::require_root_in_ci()?;
    setup::ensure_packages(&[
        ("curl", "curl"),
        ("ip", "iproute2"),
        ("node", "nodejs"),
        ("python3", "python3"),
    ])?;
    // The committed object must be what the source builds, or the tests would test old code.
    ebpf::build(true)?;
    run(cargo().args(["build", "--workspace", "--bins"]))?;
    let mut command = cargo();
    command.args(["test", "--workspace"]).args(extra);
    run_tests_with_summary(&mut command)
}

/// Runs cargo test, passing its output through, and ends with one line that totals every test
/// binary's "test result" line: cargo's own last line is often a binary with no tests.
fn run_tests_with_summary(command: &mut Command) -> Result<()> {
    use std::io::{BufRead, BufReader};
    let mut child = command
        .stdout(std::process::Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot start {command:?}"))?;
    let mut counts = test_counts::TestCounts::default();
    if let Some(stdout) = child.stdout.take() {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            println!("{line}");
            counts.add_line(&line);
        }
    }
    let status = child.wait().context("waiting for cargo test")?;
    let test_counts::TestCounts {
        passed,
        failed,
        ignored,
    } = counts;
    println!("\nxtask: {passed} passed, {failed} failed, {ignored} skipped");
    if !status.success() {
        bail!("cargo test failed with {status}");
    }
    if passed == 0 {
        bail!("cargo test ran no test");
    }
    Ok(())
}

fn demo(args: &[String]) -> Result<()> {
    let mut lang = "node".to_string();
    let mut port = "8080".to_string();
    let mut workers = "4".to_string();
    let mut rest = args.iter();
    while let Some(flag) = rest.next() {
        let value = rest
            .next()
            .with_context(|| format!("{flag} needs a value"))?
            .clone();
        match flag.as_str() {
            "--lang" => lang = value,
            "--port" => port = value,
            "--workers" | "-w" => workers = value,
            _ => bail!("unknown demo option {flag}; use --lang, --port or --workers"),
        }
    }
    let root = root();
    let server: Vec<String> = match lang.as_str() {
        "node" => {
            setup::ensure_packages(&[("node", "nodejs")])?;
            vec![
                "node".into(),
                root.join("examples/node/server.js").display().to_string(),
            ]
        }
        "python" => vec![
            "python3".into(),
            root.join("examples/python/server.py").display().to_string(),
        ],
        "rust" => {
            run(cargo().args(["build", "--release", "-p", "example-rust-server"]))?;
            vec![root
                .join("target/release/example-rust-server")
                .display()
                .to_string()]
        }
        other => bail!("unknown --lang {other}; use node, python or rust"),
    };
    run(cargo().args(["build", "--release", "-p", "cluster-lb"]))?;
    let listen = format!("127.0.0.1:{port}");
    eprintln!("xtask: serving {lang} example on http://{listen}/ with {workers} workers; try `curl http://{listen}/`, stop with Ctrl-C");
    // exec, so Ctrl-C reaches cluster-lb alone and the shell waits for its graceful stop.
    let error = Command::new(root.join("target/release/cluster-lb"))
        .args(["run", "--workers", &workers, "--listen", &listen, "--"])
        .args(&server)
        .exec();
    Err(error).context("starting cluster-lb")
}
