//! The container and Kubernetes files played for real, as far as this machine allows: no image
//! can be built and no cluster runs here, so the Containerfile's ENTRYPOINT + CMD is run as a
//! command (binary paths mapped to this build, the image's user `app` to `nobody`) with exactly
//! the capabilities deploy/kubernetes.yaml grants and no_new_privs, the probes' command is run
//! against it, and the manifest is validated against the Kubernetes schemas.

use std::{
    collections::BTreeMap,
    fs,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Command,
    thread,
    time::{Duration, Instant},
};

use cluster_lb_tests::{
    distribution, in_ci, root_test, run_dir, signal, target_dir, workspace_binary, Cluster,
    ClusterStatus, WorkerState,
};
use nix::sys::signal::Signal;

/// Where the image puts binaries; the test runs this build's instead.
const IMAGE_BIN: &str = "/usr/local/bin/";

fn repo_file(relative: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(relative);
    fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

/// The JSON array after `instruction ` on the Containerfile's last such line (the final stage).
fn containerfile_list(instruction: &str) -> Vec<String> {
    let text = repo_file("Containerfile");
    let line = text
        .lines()
        .rev()
        .find_map(|line| line.strip_prefix(&format!("{instruction} ")))
        .unwrap_or_else(|| panic!("no {instruction} in the Containerfile"));
    serde_json::from_str(line.trim())
        .unwrap_or_else(|e| panic!("{instruction} is not an exec-form JSON array: {e}"))
}

/// Every JSON list written after `key: ` in deploy/kubernetes.yaml, in order.
fn manifest_lists(key: &str) -> Vec<Vec<String>> {
    repo_file("deploy/kubernetes.yaml")
        .lines()
        .filter_map(|line| line.trim().strip_prefix(&format!("{key}: ")))
        .filter(|rest| rest.starts_with('['))
        .map(|rest| serde_json::from_str(rest).unwrap_or_else(|e| panic!("{key}: {rest}: {e}")))
        .collect()
}

/// The image's command line as it runs here.
fn mapped(words: &[String]) -> Vec<String> {
    let mut out = Vec::new();
    for (i, word) in words.iter().enumerate() {
        let previous = i.checked_sub(1).map(|p| words[p].as_str());
        out.push(match word.strip_prefix(IMAGE_BIN) {
            Some(name) => workspace_binary(name).display().to_string(),
            None if previous == Some("--user") && word == "app" => "nobody".to_string(),
            None => word.clone(),
        });
    }
    out
}

/// Linux capability numbers (linux/capability.h) of the names Kubernetes uses.
fn capability_number(name: &str) -> u32 {
    match name {
        "KILL" => 5,
        "SETGID" => 6,
        "SETUID" => 7,
        "DAC_READ_SEARCH" => 2,
        "NET_BIND_SERVICE" => 10,
        "NET_ADMIN" => 12,
        "SYS_PTRACE" => 19,
        "SYS_RESOURCE" => 24,
        "PERFMON" => 38,
        "BPF" => 39,
        other => panic!("capability {other} is not in this test's table"),
    }
}

/// A field of /proc/PID/status, e.g. "CapEff" or "Uid".
fn proc_status(pid: u32, field: &str) -> String {
    let text = fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc/PID/status");
    text.lines()
        .find_map(|line| line.strip_prefix(&format!("{field}:")))
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
        .trim()
        .to_string()
}

/// Runs a probe's command as the kubelet would, the clusters' run directory being `run_dir`
/// (the container's /run/cluster-lb).
fn probe(command: &[String], run_dir: &Path) -> i32 {
    Command::new(&command[0])
        .args(&command[1..])
        .env(cluster_lb_tests::control::RUN_DIR_ENV, run_dir)
        .output()
        .expect("running the probe")
        .status
        .code()
        .unwrap_or(-1)
}

/// The status of the one cluster in `run_dir`, found as `cluster-lb status` finds it.
fn status_in(run_dir: &Path) -> Option<ClusterStatus> {
    cluster_lb_tests::control::running_in(run_dir)
        .into_iter()
        .next()
        .map(|(_, status)| status)
}

#[test]
fn the_manifest_runs_the_containerfiles_command_and_probes() {
    let cmd = containerfile_list("CMD");
    let args = manifest_lists("args");
    assert_eq!(args, [cmd], "the manifest's args should be the image's CMD");
    let entrypoint = containerfile_list("ENTRYPOINT");
    let probes = manifest_lists("command");
    assert_eq!(
        probes,
        [
            vec![entrypoint[0].as_str(), "status", "--ready"],
            vec![entrypoint[0].as_str(), "status"]
        ],
        "a readiness probe (every wanted worker ready) and a liveness probe (the primary answers)"
    );
}

/// Both tests below use the default control socket, which is one path for the whole host.
/// The container's command (ENTRYPOINT + CMD, mapped) under setpriv with only `capabilities`
/// and no_new_privs, returned once its 4 workers are ready, with their status.
fn start_container_command(capabilities: &[String], run_dir: &Path) -> (Cluster, ClusterStatus) {
    let bounding: Vec<String> = capabilities
        .iter()
        .map(|cap| format!("+{}", cap.to_lowercase()))
        .collect();
    let command = mapped(&[containerfile_list("ENTRYPOINT"), containerfile_list("CMD")].concat());
    eprintln!("running {command:?} with only {capabilities:?}");
    let mut setpriv = Command::new("setpriv");
    setpriv
        .env(cluster_lb_tests::control::RUN_DIR_ENV, run_dir)
        .arg(format!("--bounding-set=-all,{}", bounding.join(",")))
        .args(["--inh-caps=-all", "--no-new-privs", "--"])
        .args(&command);
    let primary = Cluster::start_command(setpriv);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(status) = status_in(run_dir).filter(|s| {
            s.workers.len() == 4 && s.workers.iter().all(|w| w.state == WorkerState::Ready)
        }) {
            return (primary, status);
        }
        assert!(
            Instant::now() < deadline,
            "4 ready workers within 30 s; output:\n{}",
            primary.lines().join("\n")
        );
        thread::sleep(Duration::from_millis(100));
    }
}

/// Waits through two rounds of the primary's checks (every 5 s), which read the workers'
/// /proc as another user, and asserts no worker was replaced.
fn assert_no_worker_replaced(primary: &Cluster, before: &ClusterStatus, run_dir: &Path) {
    thread::sleep(Duration::from_secs(11));
    let later = status_in(run_dir).expect("status after the checks");
    let pids = |s: &ClusterStatus| {
        let mut pids: Vec<i32> = s.workers.iter().map(|w| w.pid).collect();
        pids.sort();
        pids
    };
    assert_eq!(
        pids(&later),
        pids(before),
        "output:\n{}",
        primary.lines().join("\n")
    );
    assert!(later.workers.iter().all(|w| w.restarts == 0));
}

#[test]
fn the_containers_command_serves_with_only_the_manifests_capabilities() {
    root_test("container_command_with_manifest_capabilities", || {
        let run_dir = run_dir();
        let added = manifest_lists("add").concat();
        assert!(!added.is_empty(), "no capabilities in the manifest");
        let (mut primary, status) = start_container_command(&added, &run_dir);
        let probes: Vec<Vec<String>> = manifest_lists("command")
            .iter()
            .map(|c| mapped(c))
            .collect();
        // The program is loaded (--require-ebpf is in CMD: it would have exited otherwise).
        assert_eq!(status.strategy, "round-robin");
        let wanted: u64 = added.iter().map(|c| 1u64 << capability_number(c)).sum();
        let effective =
            u64::from_str_radix(&proc_status(primary.pid(), "CapEff"), 16).expect("CapEff is hex");
        assert_eq!(
            effective, wanted,
            "the primary runs with exactly the manifest's capabilities"
        );
        let nobody = nix::unistd::User::from_name("nobody")
            .expect("passwd")
            .expect("user nobody")
            .uid
            .to_string();
        for worker in &status.workers {
            let uid = proc_status(worker.pid as u32, "Uid");
            assert!(uid.starts_with(&format!("{nobody}\t")), "worker uid {uid}");
        }

        // Exact round robin over the four workers.
        let addr: SocketAddr = "127.0.0.1:8080".parse().expect("address");
        let seen = distribution(addr, 40);
        assert_eq!(seen, BTreeMap::from([(0, 10), (1, 10), (2, 10), (3, 10)]));
        for command in &probes {
            assert_eq!(
                probe(command, &run_dir),
                0,
                "{command:?} on a serving cluster"
            );
        }

        assert_no_worker_replaced(&primary, &status, &run_dir);
        assert_eq!(distribution(addr, 8).len(), 4);

        // TERM (what the kubelet sends) stops it cleanly; then the probe fails.
        signal(primary.pid(), Signal::SIGTERM);
        let exit = primary.wait_exit(Duration::from_secs(40));
        assert!(
            exit.success(),
            "exit {exit:?}; output:\n{}",
            primary.lines().join("\n")
        );
        for command in &probes {
            assert_eq!(probe(command, &run_dir), 1, "{command:?} with no primary");
        }
    });
}

/// Without the capabilities to read other users' /proc/PID/fd (Docker's default set, say), the
/// closed-listener check cannot see the workers' sockets: it must leave them alone, not take
/// them for workers that closed their socket and restart them every few seconds.
#[test]
fn workers_are_not_restarted_when_their_descriptors_cannot_be_read() {
    root_test("container_command_without_ptrace", || {
        let run_dir = run_dir();
        let fewer: Vec<String> = manifest_lists("add")
            .concat()
            .into_iter()
            .filter(|cap| cap != "SYS_PTRACE" && cap != "DAC_READ_SEARCH")
            .collect();
        let (mut primary, status) = start_container_command(&fewer, &run_dir);
        assert_no_worker_replaced(&primary, &status, &run_dir);
        assert_eq!(
            distribution("127.0.0.1:8080".parse().expect("address"), 8).len(),
            4
        );
        signal(primary.pid(), Signal::SIGTERM);
        assert!(primary.wait_exit(Duration::from_secs(40)).success());
    });
}

#[test]
fn the_kubernetes_manifest_is_valid_for_its_schemas() {
    let validator: PathBuf = target_dir().join("kubernetes-validate/bin/kubernetes-validate");
    if !validator.is_file() {
        assert!(
            !in_ci(),
            "{} is missing; `cargo xtask test` installs it",
            validator.display()
        );
        eprintln!(
            "SKIPPED: {} is missing (cargo xtask test installs it)",
            validator.display()
        );
        return;
    }
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/kubernetes.yaml");
    let output = Command::new(&validator)
        .arg("--strict")
        .arg(&manifest)
        .output()
        .expect("running kubernetes-validate");
    let text = String::from_utf8_lossy(&output.stdout).into_owned()
        + &String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{text}");
    for resource in ["daemonset/cluster-lb", "service/cluster-lb"] {
        assert!(
            text.contains(&format!("passed for resource {resource}")),
            "{text}"
        );
    }
    // The validator does reject a broken manifest (so a pass above means something).
    let broken = target_dir().join("kubernetes-broken.yaml");
    fs::write(
        &broken,
        repo_file("deploy/kubernetes.yaml").replace("containerPort: 8080", "containerPort: http"),
    )
    .expect("writing the broken manifest");
    let rejected = Command::new(&validator)
        .arg("--strict")
        .arg(&broken)
        .output()
        .expect("running kubernetes-validate");
    let _ = fs::remove_file(&broken);
    assert!(!rejected.status.success());
}

/// A container that grants --user's start but not its stop (no KILL) is refused at once, in
/// one line naming what is missing: otherwise the primary's signals to the workers would fail
/// and a stop would wait for them forever.
#[test]
fn user_workers_without_cap_kill_are_refused_in_one_line() {
    root_test("user_without_cap_kill", || {
        let without_kill: Vec<String> = manifest_lists("add")
            .concat()
            .into_iter()
            .filter(|cap| cap != "KILL")
            .map(|cap| format!("+{}", cap.to_lowercase()))
            .collect();
        let output = Command::new("setpriv")
            .arg(format!("--bounding-set=-all,{}", without_kill.join(",")))
            .args(["--inh-caps=-all", "--"])
            .arg(workspace_binary("cluster-lb"))
            .args(["run", "--user", "nobody", "-l", "127.0.0.1:8080", "--"])
            .arg(workspace_binary("example-rust-server"))
            .output()
            .expect("running cluster-lb under setpriv");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(1), "{stderr}");
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
        assert!(
            stderr.starts_with("cluster-lb: error: --user nobody needs CAP_KILL"),
            "{stderr}"
        );
    });
}

/// The directives of a unit file (comments and blank lines left out), `Key=value` in order.
fn unit_directives(relative: &str) -> Vec<String> {
    repo_file(relative)
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .map(str::to_string)
        .collect()
}

/// The template's command line: `--config /etc/cluster-lb/%i.toml --name %i`.
const TEMPLATE_EXEC: &str =
    "ExecStart=/usr/bin/cluster-lb run --config /etc/cluster-lb/%i.toml --name %i";

#[test]
fn the_template_unit_is_the_single_unit_but_for_its_instance() {
    let single = unit_directives("docs/cluster-lb.service");
    let template = unit_directives("docs/cluster-lb@.service");
    assert!(
        template.iter().any(|line| line == TEMPLATE_EXEC),
        "{template:#?}"
    );
    // Everything else (type, stop, restart, capabilities) as in cluster-lb.service.
    let same =
        |line: &&String| !line.starts_with("ExecStart=") && !line.starts_with("Description=");
    assert_eq!(
        single.iter().filter(same).collect::<Vec<_>>(),
        template.iter().filter(same).collect::<Vec<_>>()
    );
    // The .deb ships it beside cluster-lb.service (xtask dist checks the package built).
    let manifest = repo_file("cluster-userspace/Cargo.toml");
    assert!(
        manifest.contains(
            r#"["../docs/cluster-lb@.service", "usr/lib/systemd/system/cluster-lb@.service", "644"]"#
        ),
        "cluster-userspace/Cargo.toml's deb assets lack the template unit"
    );
}

#[test]
fn the_template_units_command_runs_its_instance() {
    root_test("template_unit_instance", || {
        let run_dir = run_dir();
        // /etc/cluster-lb here; a file whose own name the instance's overrides.
        let etc = run_dir.join("etc");
        fs::create_dir_all(&etc).expect("creating the config directory");
        fs::write(
            etc.join("api.toml"),
            format!(
                "name = \"app\"\nworkers = 2\nlisten = [\"127.0.0.1:8080\"]\ncommand = [\"{}\"]\n",
                workspace_binary("example-rust-server").display()
            ),
        )
        .expect("writing api.toml");
        // What systemd runs for cluster-lb@api: %i is the instance, paths mapped to this build.
        let command = TEMPLATE_EXEC
            .strip_prefix("ExecStart=/usr/bin/cluster-lb ")
            .expect("the template runs /usr/bin/cluster-lb")
            .replace("/etc/cluster-lb/", &format!("{}/", etc.display()))
            .replace("%i", "api");
        let args: Vec<&str> = command.split_whitespace().collect();
        let cluster = Cluster::start_named(&run_dir, "api", &args);
        let status = cluster.wait_until_ready(2);
        assert_eq!(status.name.as_deref(), Some("api"));
        let seen = distribution("127.0.0.1:8080".parse().expect("address"), 8);
        assert_eq!(seen.len(), 2, "{seen:?}");
        let stopped = cluster.stop();
        assert!(stopped.status.success(), "{:?}", stopped.status);
    });
}
