//! `cargo xtask vm-test [--kernel 6.1|6.12|all]`: the integration tests on other kernels.
//!
//! For each kernel: Debian's kernel package (apt-get download, cached in the target directory's
//! vm/), an
//! initramfs of busybox plus the test binaries and the programs they start (at the same
//! absolute paths as on the host, with their shared libraries), booted under
//! `qemu-system-x86_64 -accel tcg` (KVM hangs on these machines). The VM runs the chosen tests
//! and powers off; we read the serial console. Node and Python are not in the image, so tests
//! that start them run on the host only; the list below says which run in the VM, by name.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    io::{BufReader, Write},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use cargo_metadata::{Message, TargetKind};

use crate::{cargo, root, run, setup, target_dir, test_counts::TestCounts};

/// Test binary (cargo's target name: `cluster_lb` is cluster-lb's unit tests, `integration`
/// the integration tests) and the exact names of its tests that run inside the VMs. Every name
/// must exist (checked with `--list` before booting) and must have run in every VM.
const VM_TESTS: &[(&str, &[&str])] = &[
    (
        "cluster_lb",
        &[
            "kernel::layer_tests::round_robin_counters_match_what_the_listeners_accepted",
            "kernel::layer_tests::a_closed_socket_in_the_active_set_is_skipped_and_counted_as_fallback",
            "kernel::layer_tests::only_active_slots_receive_connections_whatever_the_strategy",
        ],
    ),
    (
        "integration",
        &[
            "cli_errors::bad_listen_values_are_named_in_one_line",
            "cli_errors::round_robin_for_udp_is_refused_in_one_line",
            "cli_errors::other_bad_arguments_are_named_in_one_line",
            "cli_errors::a_port_in_use_is_one_clear_error",
            "cli_errors::a_missing_command_is_one_clear_error",
            "cli_errors::an_address_no_interface_has_is_one_clear_error",
            "cli_errors::help_exits_zero",
            "balance::round_robin_gives_rust_workers_exactly_equal_shares",
            "zero_downtime::three_reloads_and_scaling_under_load_fail_no_request",
            "zero_downtime::connections_queued_on_a_stopped_worker_migrate_when_it_dies",
            "zero_downtime::a_worker_killed_under_load_loses_at_most_what_it_had_accepted",
            "zero_downtime::systemd_hears_ready_reloading_and_stopping",
            "zero_downtime::twenty_seconds_of_kills_reloads_and_scales_end_with_every_wanted_worker_ready",
            "strategies::sticky_keeps_each_client_on_one_worker_moves_few_on_scale_and_none_on_reload",
            "strategies::least_loaded_counts_open_connections_and_avoids_a_stuck_worker",
            "strategies::least_loaded_counts_in_its_cgroup_only",
            "strategies::without_cgroup_v2_least_loaded_counts_with_the_tracepoint",
            "upgrade::an_upgrade_to_a_broken_binary_leaves_the_old_primary_in_charge",
            "upgrade::an_upgrade_during_a_reload_is_refused_in_one_line",
            "supervision::a_handshake_worker_is_ready_only_after_listening_and_events_come_in_order",
            "supervision::a_program_that_exits_at_once_is_restarted_with_growing_delays",
            "supervision::a_program_can_be_its_own_primary",
            "health::a_hung_rust_worker_is_found_from_its_accept_queue_and_replaced",
        ],
    ),
];

/// Programs the tests start, besides the test binaries themselves.
const PROGRAMS: &[&str] = &[
    "cluster-lb",
    "example-rust-server",
    "handshake-server",
    "embedded-cluster",
];

/// Busybox applets the tests and /init use.
const APPLETS: &[&str] = &[
    "sh", "ip", "mount", "poweroff", "cat", "echo", "true", "sleep", "mkdir", "unshare",
];

const VM_TIMEOUT: Duration = Duration::from_secs(20 * 60);

struct Kernel {
    series: &'static str,
    /// Needs bookworm-backports.
    backports: bool,
}

const KERNELS: &[Kernel] = &[
    Kernel {
        series: "6.1",
        backports: false,
    },
    Kernel {
        series: "6.12",
        backports: true,
    },
];

/// `cargo xtask vm-test` options.
#[derive(clap::Args, Debug)]
pub struct Options {
    /// Which kernel series to boot
    #[arg(long, default_value = "all", value_parser = kernel_names())]
    kernel: String,
}

/// "all" and the series in KERNELS, for --kernel.
fn kernel_names() -> clap::builder::PossibleValuesParser {
    clap::builder::PossibleValuesParser::new(KERNELS.iter().map(|k| k.series).chain(["all"]))
}

pub fn vm_test(options: &Options) -> Result<()> {
    let wanted = options.kernel.as_str();
    let kernels: Vec<&Kernel> = KERNELS
        .iter()
        .filter(|k| wanted == "all" || k.series == wanted)
        .collect();
    // A renamed or deleted test in VM_TESTS fails here, in seconds, not after a boot.
    let tests = test_executables()?;
    check_selection_exists(&tests)?;
    setup::ensure_packages(&[
        ("qemu-system-x86_64", "qemu-system-x86"),
        ("cpio", "cpio"),
        ("busybox", "busybox-static"),
    ])?;
    let busybox = PathBuf::from("/bin/busybox");
    let target = target_dir()?;
    let vm_dir = target.join("vm");
    let initrd = build_initramfs(&target, &vm_dir, &busybox, &tests)?;

    let mut failed = Vec::new();
    let mut summary = Vec::new();
    let (mut total_passed, mut total_failed) = (0, 0);
    for kernel in kernels {
        let vmlinuz = fetch_kernel(&vm_dir, kernel)?;
        let started = Instant::now();
        let log = vm_dir.join(format!("{}.log", kernel.series));
        let outcome = boot(&vmlinuz, &initrd, &log)?;
        let took = started.elapsed().as_secs_f64();
        let line = format!(
            "kernel {} ({}): {} passed, {} failed in {took:.0} s",
            kernel.series, outcome.release, outcome.counts.passed, outcome.counts.failed
        );
        eprintln!("xtask vm-test: {line}");
        for name in &outcome.failures {
            eprintln!("xtask vm-test:   failed on {}: {name}", kernel.series);
        }
        // CI keeps this output, not the log file: the reason has to be here.
        print_reports(&outcome.reports);
        let not_run = outcome.not_run(VM_TESTS);
        for what in &not_run {
            eprintln!("xtask vm-test:   did not run on {}: {what}", kernel.series);
        }
        if outcome.counts.failed > 0
            || !outcome.finished
            || outcome.counts.passed == 0
            || !not_run.is_empty()
        {
            failed.push(format!("{} (log: {})", kernel.series, log.display()));
        }
        summary.push(line);
        total_passed += outcome.counts.passed;
        total_failed += outcome.counts.failed;
    }
    println!("\nVM test results:");
    for line in &summary {
        println!("  {line}");
    }
    if !failed.is_empty() {
        bail!("VM tests failed on {}", failed.join(", "));
    }
    println!("vm-test: {total_passed} passed, {total_failed} failed");
    Ok(())
}

/// The kernel's vmlinuz, downloading and unpacking its Debian package on first use.
fn fetch_kernel(vm_dir: &Path, kernel: &Kernel) -> Result<PathBuf> {
    let dir = vm_dir.join(format!("kernel-{}", kernel.series));
    if let Some(vmlinuz) = find_vmlinuz(&dir) {
        return Ok(vmlinuz);
    }
    if kernel.backports {
        enable_backports()?;
    }
    let package = newest_package(kernel.series)?;
    eprintln!("xtask vm-test: downloading {package}");
    let download = vm_dir.join("download");
    fs::create_dir_all(&download)?;
    let _ = fs::remove_dir_all(&dir);
    run(Command::new("apt-get")
        .args(["download", "-q", &package])
        .current_dir(&download))?;
    let deb = fs::read_dir(&download)?
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with(&format!("{package}_")))
        })
        .with_context(|| format!("{package}: no .deb after apt-get download"))?;
    run(Command::new("dpkg").arg("-x").arg(&deb).arg(&dir))?;
    let _ = fs::remove_file(&deb);
    find_vmlinuz(&dir).with_context(|| format!("no boot/vmlinuz-* in {package}"))
}

fn find_vmlinuz(dir: &Path) -> Option<PathBuf> {
    fs::read_dir(dir.join("boot"))
        .ok()?
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-"))
        })
}

const BACKPORTS: &str = "/etc/apt/sources.list.d/cluster-lb-backports.sources";

/// Debian 12's 6.12 kernels live in bookworm-backports.
fn enable_backports() -> Result<()> {
    if !Path::new(BACKPORTS).exists() {
        fs::write(
            BACKPORTS,
            "Types: deb\nURIs: http://deb.debian.org/debian\nSuites: bookworm-backports\nComponents: main\n",
        )
        .with_context(|| format!("writing {BACKPORTS}"))?;
        run(Command::new("apt-get").args(["update", "-q"]))?;
    }
    Ok(())
}

/// The newest generic amd64 image of a kernel series, e.g. linux-image-6.1.0-56-amd64.
fn newest_package(series: &str) -> Result<String> {
    let output = Command::new("apt-cache")
        .args([
            "search",
            "--names-only",
            &format!("^linux-image-{}[.-]", regex_escape(series)),
        ])
        .output()
        .context("apt-cache search")?;
    let names: BTreeSet<String> = String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.ends_with("-amd64") && !n.contains("cloud") && !n.contains("-rt-"))
        .filter(|n| {
            n.strip_prefix("linux-image-")
                .is_some_and(|v| v.starts_with(&format!("{series}.")))
        })
        .map(str::to_string)
        .collect();
    let mut sort = Command::new("sort")
        .arg("-V")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .context("sort -V")?;
    if let Some(mut stdin) = sort.stdin.take() {
        stdin.write_all(
            names
                .iter()
                .cloned()
                .collect::<Vec<_>>()
                .join("\n")
                .as_bytes(),
        )?;
    }
    let sorted = sort.wait_with_output()?;
    String::from_utf8_lossy(&sorted.stdout)
        .lines()
        .last()
        .map(str::to_string)
        .with_context(|| {
            format!("no linux-image-{series}.*-amd64 package in the apt lists (apt-get update?)")
        })
}

fn regex_escape(text: &str) -> String {
    text.replace('.', "\\.")
}

/// Builds the binaries and packs them, their libraries, busybox and /init into `vm_dir`.
fn build_initramfs(
    target: &Path,
    vm_dir: &Path,
    busybox: &Path,
    tests: &[(String, PathBuf)],
) -> Result<PathBuf> {
    run(cargo().args(["build", "--workspace", "--bins"]))?;
    let staging = vm_dir.join("root");
    let _ = fs::remove_dir_all(&staging);
    for dir in ["bin", "proc", "sys", "dev", "tmp", "run", "etc"] {
        fs::create_dir_all(staging.join(dir))?;
    }
    fs::copy(busybox, staging.join("bin/busybox")).context("copying busybox")?;
    for applet in APPLETS {
        std::os::unix::fs::symlink("busybox", staging.join("bin").join(applet))?;
    }
    let mut files: Vec<PathBuf> = PROGRAMS
        .iter()
        .map(|p| target.join("debug").join(p))
        .collect();
    files.extend(tests.iter().map(|(_, path)| path.clone()));
    let mut libraries = BTreeSet::new();
    for file in &files {
        libraries.extend(shared_libraries(file)?);
    }
    for file in files.iter().chain(libraries.iter()) {
        copy_to(&staging, file)?;
    }
    // The tests find their binaries relative to CARGO_MANIFEST_DIR, which must exist.
    fs::create_dir_all(
        staging.join(
            root()
                .join("tests")
                .strip_prefix("/")
                .unwrap_or(Path::new("tests")),
        ),
    )?;
    let init = staging.join("init");
    fs::write(&init, init_script(target, tests))?;
    fs::set_permissions(&init, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;

    let initrd = vm_dir.join("initrd.gz");
    let script = format!(
        "cd '{}' && find . | cpio -o -H newc --quiet | gzip -1 > '{}'",
        staging.display(),
        initrd.display()
    );
    run(Command::new("sh").arg("-c").arg(script))?;
    Ok(initrd)
}

/// (test binary name, executable) for the binaries in VM_TESTS, built by
/// `cargo test --no-run` and read from its JSON messages.
fn test_executables() -> Result<Vec<(String, PathBuf)>> {
    let mut command = cargo();
    command
        .args([
            "test",
            "-p",
            "cluster-lb-tests",
            "-p",
            "cluster-lb",
            "--no-run",
            // Messages as JSON on stdout, warnings and errors rendered on stderr as usual.
            "--message-format=json-render-diagnostics",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    let mut child = command
        .spawn()
        .with_context(|| format!("cannot start {command:?}"))?;
    let stdout = child.stdout.take().context("cargo test's stdout")?;
    let mut found = Vec::new();
    for message in Message::parse_stream(BufReader::new(stdout)) {
        let Message::CompilerArtifact(artifact) = message.context("reading cargo's messages")?
        else {
            continue;
        };
        // Integration tests, and a library's unit tests (a lib target built as a test).
        let name = &artifact.target.name;
        let is_test = artifact.target.is_kind(TargetKind::Test) || artifact.profile.test;
        if !is_test || !VM_TESTS.iter().any(|(binary, _)| binary == name) {
            continue;
        }
        if let Some(executable) = artifact.executable {
            found.push((name.clone(), executable.into_std_path_buf()));
        }
    }
    let status = child.wait().context("waiting for cargo test --no-run")?;
    if !status.success() {
        bail!("cargo test --no-run failed with {status}");
    }
    let missing: Vec<&str> = VM_TESTS
        .iter()
        .map(|(binary, _)| *binary)
        .filter(|binary| !found.iter().any(|(name, _)| name == binary))
        .collect();
    if !missing.is_empty() {
        bail!(
            "VM_TESTS (xtask/src/vm.rs) names test binaries cluster-lb and cluster-lb-tests do not have: {}",
            missing.join(", ")
        );
    }
    Ok(found)
}

/// Fails, naming them, when VM_TESTS lists a test its binary does not have (`--list`).
fn check_selection_exists(tests: &[(String, PathBuf)]) -> Result<()> {
    let mut missing = Vec::new();
    for (binary, names) in VM_TESTS.iter().filter(|(_, names)| !names.is_empty()) {
        let (_, executable) = tests
            .iter()
            .find(|(name, _)| name == binary)
            .with_context(|| format!("no executable for test binary {binary}"))?;
        let output = Command::new(executable)
            .arg("--list")
            .stderr(Stdio::inherit())
            .output()
            .with_context(|| format!("running {} --list", executable.display()))?;
        if !output.status.success() {
            bail!(
                "{} --list failed with {}",
                executable.display(),
                output.status
            );
        }
        let listed = listed_tests(&String::from_utf8_lossy(&output.stdout));
        missing.extend(
            names
                .iter()
                .filter(|name| !listed.contains(**name))
                .map(|name| format!("{binary}: {name}")),
        );
    }
    if !missing.is_empty() {
        bail!(
            "VM_TESTS (xtask/src/vm.rs) names tests that do not exist (renamed or deleted?): {}",
            missing.join(", ")
        );
    }
    Ok(())
}

/// The test names in libtest's `--list` output ("NAME: test" lines).
fn listed_tests(list: &str) -> BTreeSet<String> {
    list.lines()
        .filter_map(|line| line.strip_suffix(": test"))
        .map(str::to_string)
        .collect()
}

/// /init for the VM. The initramfs itself is a writable RAM filesystem, so /tmp needs no mount
/// (and must not get one: the checkout, and with it the test binaries, may live under /tmp).
/// The tests find the programs they start in CARGO_TARGET_DIR (support's workspace_binary).
fn init_script(target: &Path, tests: &[(String, PathBuf)]) -> String {
    let mut script = format!(
        "#!/bin/sh\n\
         mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev\n\
         mount -t cgroup2 cgroup2 /sys/fs/cgroup\n\
         export PATH=/bin CI=true HOME=/tmp RUST_BACKTRACE=0 CARGO_TARGET_DIR='{}'\n\
         ip link set lo up\n\
         echo \"VM-KERNEL $(cat /proc/sys/kernel/osrelease)\"\n",
        target.display()
    );
    for (name, exe) in tests {
        let filters = VM_TESTS
            .iter()
            .find(|(b, _)| b == name)
            .map(|(_, f)| *f)
            .unwrap_or(&[]);
        let selection = if filters.is_empty() {
            String::new()
        } else {
            format!(" --exact {}", filters.join(" "))
        };
        script.push_str(&format!(
            "echo \"VM-BINARY {name}\"\n{} --test-threads=1{selection} 2>&1\n",
            exe.display()
        ));
    }
    script.push_str("echo VM-FINISHED\npoweroff -f\n");
    script
}

/// The absolute paths of the shared libraries `binary` loads (ldd).
fn shared_libraries(binary: &Path) -> Result<Vec<PathBuf>> {
    let output = Command::new("ldd")
        .arg(binary)
        .output()
        .context("running ldd")?;
    Ok(String::from_utf8_lossy(&output.stdout)
        .split_whitespace()
        .filter(|word| word.starts_with('/'))
        .map(PathBuf::from)
        .collect())
}

/// Copies `file` into `staging` at the same absolute path (following symlinks).
fn copy_to(staging: &Path, file: &Path) -> Result<()> {
    let relative = file.strip_prefix("/").unwrap_or(file);
    let target = staging.join(relative);
    if let Some(parent) = target.parent() {
        fs::create_dir_all(parent)?;
    }
    fs::copy(file, &target).with_context(|| format!("copying {}", file.display()))?;
    Ok(())
}

struct Outcome {
    release: String,
    counts: TestCounts,
    failures: Vec<String>,
    /// libtest's report of each failed test ("---- NAME stdout ----" and what it printed).
    reports: Vec<String>,
    finished: bool,
    /// The tests each binary ran (ok or FAILED), by the VM-BINARY marker before them.
    ran: BTreeMap<String, BTreeSet<String>>,
}

impl Outcome {
    /// What `selection` asks for that the console shows no result of: "BINARY: NAME" for a
    /// listed test, "BINARY: no test ran" for a binary whose tests all run.
    fn not_run(&self, selection: &[(&str, &[&str])]) -> Vec<String> {
        let mut missing = Vec::new();
        for (binary, names) in selection {
            let ran = self.ran.get(*binary);
            if names.is_empty() {
                if ran.is_none_or(BTreeSet::is_empty) {
                    missing.push(format!("{binary}: no test ran"));
                }
                continue;
            }
            missing.extend(
                names
                    .iter()
                    .filter(|name| !ran.is_some_and(|ran| ran.contains(**name)))
                    .map(|name| format!("{binary}: {name}")),
            );
        }
        missing
    }
}

/// The failed tests' reports, at most REPORT_LINES lines of them (their start: the assertion).
fn print_reports(reports: &[String]) {
    const REPORT_LINES: usize = 200;
    for line in reports.iter().take(REPORT_LINES) {
        eprintln!("xtask vm-test:   | {line}");
    }
    if reports.len() > REPORT_LINES {
        eprintln!(
            "xtask vm-test:   | ... {} more lines in the log",
            reports.len() - REPORT_LINES
        );
    }
}

/// Boots the kernel with the initramfs, saves the console to `log`, and reads the results.
fn boot(vmlinuz: &Path, initrd: &Path, log: &Path) -> Result<Outcome> {
    let console = fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
    let mut qemu = Command::new("qemu-system-x86_64")
        .args([
            "-accel",
            "tcg",
            // The initramfs unpacks to about 800 MB of RAM filesystem (limited to half the
            // memory), and the upgrade tests add copies of the 80 MB debug cluster-lb.
            "-m",
            "4096",
            "-smp",
            "2",
            "-nographic",
            "-no-reboot",
            "-kernel",
        ])
        .arg(vmlinuz)
        .arg("-initrd")
        .arg(initrd)
        .args(["-append", "console=ttyS0 quiet panic=-1"])
        .stdin(Stdio::null())
        .stdout(console)
        .stderr(Stdio::inherit())
        .spawn()
        .context("starting qemu-system-x86_64")?;
    let deadline = Instant::now() + VM_TIMEOUT;
    loop {
        if qemu.try_wait()?.is_some() {
            break;
        }
        if Instant::now() > deadline {
            let _ = qemu.kill();
            let _ = qemu.wait();
            eprintln!(
                "xtask vm-test: the VM did not finish within {} min",
                VM_TIMEOUT.as_secs() / 60
            );
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let text = fs::read_to_string(log).unwrap_or_default();
    Ok(parse_console(&text))
}

fn parse_console(text: &str) -> Outcome {
    let mut outcome = Outcome {
        release: String::from("?"),
        counts: TestCounts::default(),
        failures: Vec::new(),
        reports: Vec::new(),
        finished: false,
        ran: BTreeMap::new(),
    };
    let mut in_report = false;
    let mut binary = String::new();
    // "test NAME ... " whose result did not end the line (other output came between).
    let mut pending: Option<String> = None;
    for line in text.lines().map(|l| l.trim_end_matches('\r')) {
        if let Some(release) = line.split("VM-KERNEL ").nth(1) {
            outcome.release = release.trim().to_string();
        }
        if let Some(name) = line.split("VM-BINARY ").nth(1) {
            binary = name.trim().to_string();
        }
        if line.contains("VM-FINISHED") {
            outcome.finished = true;
        }
        outcome.counts.add_line(line);
        // A report runs from its "---- NAME stdout ----" header to the next header or to the
        // "failures:" list of names.
        if line.starts_with("---- ") && line.ends_with(" ----") {
            in_report = true;
        } else if line == "failures:" {
            in_report = false;
        }
        if in_report {
            outcome.reports.push(line.to_string());
            continue;
        }
        let (name, result) = match line
            .strip_prefix("test ")
            .and_then(|rest| rest.split_once(" ... "))
        {
            Some((name, result)) => {
                pending = None;
                (name.to_string(), result.trim())
            }
            None => match pending.take() {
                Some(name) => (name, line.trim()),
                None => continue,
            },
        };
        match result {
            "ok" => {}
            "FAILED" => outcome.failures.push(name.clone()),
            // "ignored" or "ignored, REASON"
            ignored if ignored.starts_with("ignored") => continue,
            _ => {
                pending = Some(name);
                continue;
            }
        }
        outcome.ran.entry(binary.clone()).or_default().insert(name);
    }
    outcome
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_listed_test_that_did_not_run_is_named() {
        let console = "VM-KERNEL 6.12.1-amd64\n\
            VM-BINARY balance\n\
            running 1 test\n\
            test round_robin ... ok\n\
            test result: ok. 1 passed; 0 failed; 0 ignored; 0 measured; 9 filtered out\n\
            VM-BINARY supervision\n\
            running 2 tests\n\
            test restarts ... \n\
            [   12.345678] random: crng init done\n\
            ok\n\
            test own_primary ... FAILED\n\
            test quiet ... ignored, needs node\n\
            test result: FAILED. 1 passed; 1 failed; 1 ignored; 0 measured; 5 filtered out\n\
            VM-BINARY cli_errors\n\
            running 0 tests\n\
            test result: ok. 0 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out\n\
            VM-FINISHED\n";
        let outcome = parse_console(console);
        assert_eq!(outcome.failures, ["own_primary"]);
        let selection: &[(&str, &[&str])] = &[
            ("balance", &["round_robin"]),
            (
                "supervision",
                &["restarts", "own_primary", "quiet", "renamed_away"],
            ),
            ("cli_errors", &[]),
            ("kernel_layer", &[]),
        ];
        // own_primary ran (and failed, which is reported as a failure); restarts' "ok" came
        // after a kernel message.
        assert_eq!(
            outcome.not_run(selection),
            [
                "supervision: quiet",
                "supervision: renamed_away",
                "cli_errors: no test ran",
                "kernel_layer: no test ran"
            ]
        );
        assert!(
            parse_console("VM-BINARY balance\ntest round_robin ... ok\n")
                .not_run(&[("balance", &["round_robin"])])
                .is_empty()
        );
    }

    #[test]
    fn list_output_gives_the_test_names() {
        let list = "a_program_can_be_its_own_primary: test\nmodule::nested: test\nsome_bench: benchmark\n\n2 tests, 1 benchmark\n";
        assert_eq!(
            listed_tests(list).into_iter().collect::<Vec<_>>(),
            ["a_program_can_be_its_own_primary", "module::nested"]
        );
    }

    #[test]
    fn console_results_are_summed() {
        let console = "VM-KERNEL 6.1.0-56-amd64\r\ntest a ... ok\ntest b ... FAILED\n\nfailures:\n\n---- b stdout ----\nthread 'b' panicked at tests/b.rs:1:1:\ntest b ... ok (a line of its output)\n\nfailures:\n    b\n\ntest result: FAILED. 1 passed; 1 failed; 0 ignored; 0 measured; 3 filtered out; finished in 1s\ntest result: ok. 4 passed; 0 failed; 0 ignored\nVM-FINISHED\n";
        let outcome = parse_console(console);
        assert_eq!(outcome.release, "6.1.0-56-amd64");
        assert_eq!((outcome.counts.passed, outcome.counts.failed), (5, 1));
        assert_eq!(outcome.failures, ["b"]);
        assert_eq!(
            outcome.reports,
            [
                "---- b stdout ----",
                "thread 'b' panicked at tests/b.rs:1:1:",
                "test b ... ok (a line of its output)",
                ""
            ]
        );
        assert!(outcome.finished);
    }
}
