//! Project tasks. Each installs what it needs on a fresh machine, so the README's commands work
//! as written:
//!
//!   cargo xtask build-ebpf [--check]   build the program, write (or compare) the committed object
//!   cargo xtask test [ARGS]            everything the test suite needs, then the whole suite
//!   cargo xtask demo [--lang L] [--port P] [--workers N]
//!                                      cluster-lb serving a bundled example server
//!   cargo xtask bench [--rounds N] [--seconds S] [--workers 2,8] [--suite main|mixed|program]
//!                                      cluster-lb against Node cluster, PM2, plain SO_REUSEPORT;
//!                                      each strategy's program cost next to a minimal C one
//!   cargo xtask vm-test [--kernel 6.1|6.12|all]
//!                                      the integration tests on Debian's 6.1 and 6.12 under qemu
//!   cargo xtask distribution [--connections N]
//!                                      per-worker shares for each strategy, as a table
//!   cargo xtask dist                   man pages, completions, the .deb, `cargo install`, checked

mod bench;
mod demo_check;
mod dist;
mod distribution;
mod ebpf;
mod kube;
mod node;
mod node_tests;
mod servers;
mod setup;
mod test_counts;
mod vm;

use std::{
    env,
    io::{BufRead, BufReader, Read, Write},
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Command, ExitCode, Stdio},
    sync::OnceLock,
};

use anyhow::{bail, Context, Result};
use clap::{Args, CommandFactory, Parser, Subcommand, ValueEnum};

#[derive(Parser, Debug)]
#[command(
    name = "cargo xtask",
    bin_name = "cargo xtask",
    about = "Project tasks: each installs what it needs on a fresh machine"
)]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand, Debug)]
enum Task {
    /// Build the eBPF program and write it to the committed object
    BuildEbpf {
        /// Only compare: fail when the committed object differs from the build
        #[arg(long)]
        check: bool,
    },
    /// Install what the test suite needs, then run it (arguments go to `cargo test --workspace`)
    Test {
        /// Arguments for cargo test, e.g. `-p cluster-lb-tests --test balance -- --nocapture`
        // clap drops a leading `--` from these; `test` passes on the raw arguments instead.
        #[arg(
            value_name = "CARGO TEST ARGS",
            trailing_var_arg = true,
            allow_hyphen_values = true
        )]
        cargo_test_args: Vec<String>,
    },
    /// Serve a bundled example server with cluster-lb
    Demo(DemoArgs),
    /// cluster-lb against Node cluster, PM2 and one shared accept socket (root)
    Bench(bench::Options),
    /// The integration tests on Debian's 6.1 and 6.12 kernels under qemu
    VmTest(vm::Options),
    /// Per-worker shares for each strategy, as a table (root)
    Distribution(distribution::Options),
    /// Man pages, shell completions and the .deb (cargo-deb), each checked; and `cargo install`
    Dist,
}

#[derive(Args, Debug)]
struct DemoArgs {
    /// Which example server
    #[arg(long, value_enum, default_value_t = Lang::Node)]
    lang: Lang,
    /// Port on 127.0.0.1
    #[arg(long, default_value_t = 8080)]
    port: u16,
    /// Number of workers
    #[arg(long, short = 'w', default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..))]
    workers: u32,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum Lang {
    Node,
    Python,
    Rust,
}

fn main() -> ExitCode {
    let argv: Vec<String> = env::args().collect();
    let cli = match Cli::try_parse_from(&argv) {
        Ok(cli) => cli,
        Err(error) if !error.use_stderr() => {
            // --help: as clap formats it.
            let _ = error.print();
            return ExitCode::SUCCESS;
        }
        Err(error) => {
            eprintln!("xtask: error: {}", usage_error(&error, &argv));
            return ExitCode::from(2);
        }
    };
    let result = match cli.task {
        Task::BuildEbpf { check } => ebpf::build(check),
        Task::Test { .. } => test(raw_task_args(&argv)),
        Task::Demo(args) => demo(&args),
        Task::Distribution(options) => distribution::measure(&options),
        Task::Bench(options) => bench::bench(&options),
        Task::VmTest(options) => vm::vm_test(&options),
        Task::Dist => dist::dist(),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("xtask: error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// A bad command line as one line: clap's message and where to read more.
fn usage_error(error: &clap::Error, argv: &[String]) -> String {
    let command = Cli::command();
    let tasks: Vec<&str> = command
        .get_subcommands()
        .map(|task| task.get_name())
        .filter(|name| *name != "help")
        .collect();
    if error.kind() == clap::error::ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand {
        return format!(
            "no task given; use one of {} (see cargo xtask help)",
            tasks.join(", ")
        );
    }
    let message = clap_message(error);
    match argv.get(1).filter(|arg| tasks.contains(&arg.as_str())) {
        Some(task) => format!("{message} (see cargo xtask help {task})"),
        None => format!("{message} (see cargo xtask help)"),
    }
}

/// clap's message alone: its first line, without the `error: ` prefix, usage and tips.
fn clap_message(error: &clap::Error) -> String {
    let rendered = error.render().to_string();
    let first = rendered.lines().map(str::trim).find(|l| !l.is_empty());
    let first = first.unwrap_or("bad arguments");
    first.strip_prefix("error: ").unwrap_or(first).to_string()
}

/// The arguments after the task name, exactly as given: clap would drop the first `--` of
/// `cargo xtask test -- --nocapture`, which cargo test needs. The task is always the first
/// argument (there are no options before it).
fn raw_task_args(argv: &[String]) -> &[String] {
    argv.get(2..).unwrap_or_default()
}

/// The workspace root (xtask lives one level below it).
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// The directory cargo builds into, as cargo itself reports it: `CARGO_TARGET_DIR`,
/// `build.target-dir` in a cargo config, or `target/` in the workspace root.
pub fn target_dir() -> Result<PathBuf> {
    static TARGET_DIR: OnceLock<PathBuf> = OnceLock::new();
    if let Some(dir) = TARGET_DIR.get() {
        return Ok(dir.clone());
    }
    let metadata = cargo_metadata::MetadataCommand::new()
        .current_dir(root())
        .manifest_path(root().join("Cargo.toml"))
        .no_deps()
        .exec()
        .context("cargo metadata (for the target directory)")?;
    Ok(TARGET_DIR
        .get_or_init(|| metadata.target_directory.into_std_path_buf())
        .clone())
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
        ("tmux", "tmux"),
        ("wrk", "wrk"),
    ])?;
    node::ensure()?;
    // Node's own cluster tests, for the conformance test (from Debian's nodejs sources).
    node_tests::ensure()?;
    servers::ensure()?;
    // The committed object must be what the source builds, or the tests would test old code;
    // and the eBPF crate passes clippy as the workspace does.
    ebpf::build(true)?;
    ebpf::clippy()?;
    run(cargo().args(["build", "--workspace", "--bins"]))?;
    // The packaging the README shows (a release build, once; later runs reuse it), and the
    // schema validator tests/packaging.rs runs on deploy/kubernetes.yaml.
    dist::dist()?;
    // The README's first command, end to end (the tests below cover the others).
    demo_check::check()?;
    let mut command = cargo();
    command
        .args(["test", "--workspace"])
        .args(extra)
        // The integration tests find cluster-lb and the examples through it (support's
        // workspace_binary), also when the directory comes from a cargo config.
        .env("CARGO_TARGET_DIR", target_dir()?);
    run_tests_with_summary(&mut command)
}

/// Runs cargo test, passing its output through unchanged, and ends with one line that totals
/// every test binary's "test result" line (cargo's own last line is often a binary with no
/// tests), counting a privileged test that skipped (root_test's "SKIPPED" line on stderr) as
/// skipped rather than passed.
fn run_tests_with_summary(command: &mut Command) -> Result<()> {
    use std::io::IsTerminal;
    if std::io::stderr().is_terminal() && env::var_os("CARGO_TERM_COLOR").is_none() {
        // cargo's stderr becomes a pipe; keep its colours for the terminal it ends up on.
        command.env("CARGO_TERM_COLOR", "always");
    }
    let mut child = command
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot start {command:?}"))?;
    let stderr = child.stderr.take().context("cargo test's stderr")?;
    let stderr_reader = std::thread::spawn(move || {
        let mut counts = test_counts::TestCounts::default();
        tee_lines(stderr, std::io::stderr(), |line| {
            counts.add_stderr_line(line)
        });
        counts.skipped
    });
    let mut counts = test_counts::TestCounts::default();
    let stdout = child.stdout.take().context("cargo test's stdout")?;
    tee_lines(stdout, std::io::stdout(), |line| counts.add_line(line));
    counts.skipped = stderr_reader
        .join()
        .map_err(|_| anyhow::anyhow!("reading cargo test's stderr failed"))?;
    let status = child.wait().context("waiting for cargo test")?;
    println!("\nxtask: {}", counts.summary());
    if !status.success() {
        bail!("cargo test failed with {status}");
    }
    if counts.passed == 0 {
        bail!("cargo test ran no test");
    }
    Ok(())
}

/// Copies `input` to `output` unchanged, a line at a time, and hands each line (without its
/// line end) to `each`.
fn tee_lines(input: impl Read, mut output: impl Write, mut each: impl FnMut(&str)) {
    let mut input = BufReader::new(input);
    let mut line = Vec::new();
    loop {
        line.clear();
        match input.read_until(b'\n', &mut line) {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
        let _ = output.write_all(&line);
        let _ = output.flush();
        each(String::from_utf8_lossy(&line).trim_end_matches(['\n', '\r']));
    }
}

fn demo(args: &DemoArgs) -> Result<()> {
    let DemoArgs {
        lang,
        port,
        workers,
    } = args;
    let root = root();
    let release = target_dir()?.join("release");
    let server: Vec<String> = match lang {
        Lang::Node => {
            setup::ensure_packages(&[("node", "nodejs")])?;
            vec![
                "node".into(),
                root.join("examples/node/server.js").display().to_string(),
            ]
        }
        Lang::Python => vec![
            "python3".into(),
            root.join("examples/python/server.py").display().to_string(),
        ],
        Lang::Rust => {
            run(cargo().args(["build", "--release", "-p", "example-rust-server"]))?;
            vec![release.join("example-rust-server").display().to_string()]
        }
    };
    run(cargo().args(["build", "--release", "-p", "cluster-lb"]))?;
    let listen = format!("127.0.0.1:{port}");
    let lang = lang
        .to_possible_value()
        .map(|v| v.get_name().to_string())
        .unwrap_or_default();
    let workers = workers.to_string();
    eprintln!("xtask: serving {lang} example on http://{listen}/ with {workers} workers; try `curl http://{listen}/`, stop with Ctrl-C");
    // exec, so Ctrl-C reaches cluster-lb alone and the shell waits for its graceful stop.
    let error = Command::new(release.join("cluster-lb"))
        .args(["run", "--workers", &workers, "--listen", &listen, "--"])
        .args(&server)
        .exec();
    Err(error).context("starting cluster-lb")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Task, String> {
        let argv = strings(&[&["xtask"][..], args].concat());
        Cli::try_parse_from(&argv)
            .map(|cli| cli.task)
            .map_err(|e| usage_error(&e, &argv))
    }

    fn strings(args: &[&str]) -> Vec<String> {
        args.iter().map(|a| a.to_string()).collect()
    }

    #[test]
    fn test_passes_every_argument_after_the_task_to_cargo_test_unchanged() {
        for args in [
            &["--", "--nocapture"][..],
            &[
                "-p",
                "cluster-lb-tests",
                "--test",
                "balance",
                "--",
                "--exact",
                "a",
            ],
            &["a_filter"],
            &[],
        ] {
            assert!(matches!(
                parse(&[&["test"][..], args].concat()),
                Ok(Task::Test { .. })
            ));
            let argv = strings(&[&["xtask", "test"][..], args].concat());
            assert_eq!(raw_task_args(&argv), strings(args));
        }
    }

    #[test]
    fn documented_flags_parse() {
        assert!(matches!(
            parse(&["build-ebpf", "--check"]),
            Ok(Task::BuildEbpf { check: true })
        ));
        assert!(matches!(
            parse(&["build-ebpf"]),
            Ok(Task::BuildEbpf { check: false })
        ));
        let Ok(Task::Demo(demo)) = parse(&["demo", "--lang", "rust", "--port", "9000", "-w", "2"])
        else {
            panic!("demo")
        };
        assert_eq!((demo.lang, demo.port, demo.workers), (Lang::Rust, 9000, 2));
        let Ok(Task::Bench(bench)) = parse(&[
            "bench",
            "--rounds",
            "1",
            "--seconds",
            "2",
            "--workers",
            "2,4,8",
        ]) else {
            panic!("bench")
        };
        assert_eq!(
            format!("{bench:?}"),
            "Options { rounds: 1, seconds: 2, workers: [2, 4, 8], suite: \"all\", cluster_lb: None }"
        );
        assert!(matches!(
            parse(&["vm-test", "--kernel", "6.12"]),
            Ok(Task::VmTest(_))
        ));
        assert!(matches!(parse(&["vm-test"]), Ok(Task::VmTest(_))));
        assert!(matches!(
            parse(&["distribution", "--connections", "10"]),
            Ok(Task::Distribution(_))
        ));
        assert!(matches!(parse(&["dist"]), Ok(Task::Dist)));
    }

    #[test]
    fn bad_arguments_are_one_line() {
        for args in [
            &[][..],
            &["frobnicate"],
            &["build-ebpf", "--chek"],
            &["bench", "--rounds", "x"],
            &["bench", "--workers", "2,x"],
            &["vm-test", "--kernel", "5.4"],
            &["demo", "--lang", "go"],
            &["distribution", "--connections"],
        ] {
            let error = parse(args).expect_err("a bad command line");
            assert!(!error.contains('\n'), "{args:?}: {error}");
            assert!(error.contains("cargo xtask help"), "{args:?}: {error}");
        }
        assert!(parse(&["bench", "--frob"])
            .expect_err("unknown flag")
            .ends_with("(see cargo xtask help bench)"));
        {}
    }
}
