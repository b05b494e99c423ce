//! Release-directory deploys (Capistrano's layout): `current` -> `releases/r1`, the link
//! switched to `releases/r2`, then a rolling reload. With `--chdir current`, the config file's
//! `cwd`, or a `$PWD` that reaches the directory through the link, every new worker enters the
//! link anew, so after the reload every worker serves the new release, and no request fails
//! on the way.

use std::{
    collections::BTreeSet,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::Command,
    thread,
    time::{Duration, Instant},
};

use cluster_lb::control::{request, Reply, Request};
use cluster_lb_tests::{
    addr, get_body, python_server_answering, root_test, workspace_binary, Cluster, RequestLoop,
    ScratchDir, ADDR,
};

const WORKERS: usize = 3;
const CLIENTS: u32 = 4;

/// A deploy directory: `releases/r1` and `releases/r2`, each with an executable
/// `server.py` (examples/python/server.py answering `worker ID pid PID release rN cwd DIR`),
/// and `current` -> `releases/r1`. Removed when dropped.
struct Releases {
    base: ScratchDir,
}

impl Releases {
    fn new() -> Releases {
        let base = ScratchDir::new("deploy");
        for release in ["r1", "r2"] {
            let dir = base.join("releases").join(release);
            std::fs::create_dir_all(&dir).expect("creating a release directory");
            let server = python_server_answering(&format!("release {release} cwd {{os.getcwd()}}"));
            let path = dir.join("server.py");
            std::fs::write(&path, server).expect("writing server.py");
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))
                .expect("chmod server.py");
        }
        let releases = Releases { base };
        releases.point_to("r1");
        releases
    }

    fn current(&self) -> PathBuf {
        self.base.join("current")
    }

    /// What a deploy tool does: a new link renamed over `current` (atomic; `ln -sfn` unlinks
    /// first).
    fn point_to(&self, release: &str) {
        let new = self.base.join("current.new");
        let _ = std::fs::remove_file(&new);
        std::os::unix::fs::symlink(Path::new("releases").join(release), &new)
            .expect("creating the link");
        std::fs::rename(&new, self.current()).expect("switching current");
    }

    fn real(&self, release: &str) -> PathBuf {
        std::fs::canonicalize(self.base.join("releases").join(release))
            .expect("the release directory")
    }
}

/// What one new connection was answered: (pid, release, working directory).
fn answer() -> (u32, String, PathBuf) {
    let body = get_body(addr()).unwrap_or_else(|e| panic!("{e:#}"));
    match body.split_whitespace().collect::<Vec<_>>().as_slice() {
        ["worker", _, "pid", pid, "release", release, "cwd", cwd] => (
            pid.parse().expect("a pid"),
            release.to_string(),
            PathBuf::from(cwd),
        ),
        _ => panic!("unexpected answer: {body:?}"),
    }
}

/// Every worker's answer (round robin: `3 * WORKERS` connections reach each worker 3 times)
/// is `release`, from its directory; returns the pids that answered.
fn every_worker_serves(releases: &Releases, release: &str) -> BTreeSet<u32> {
    let mut pids = BTreeSet::new();
    for _ in 0..3 * WORKERS {
        let (pid, served, cwd) = answer();
        assert_eq!(served, release, "pid {pid}");
        assert_eq!(cwd, releases.real(release), "pid {pid}");
        pids.insert(pid);
    }
    pids
}

/// The deploy: the cluster serves r1; under a request loop, `current` is switched to r2 and
/// the cluster reloaded; then every worker serves r2, and no request failed.
fn deploy(releases: &Releases, cluster: Cluster, how: &str) {
    cluster.wait_until_ready(WORKERS);
    let before = every_worker_serves(releases, "r1");
    assert_eq!(before.len(), WORKERS, "{before:?}");
    let started = Instant::now();
    let load = RequestLoop::start(addr(), CLIENTS);
    thread::sleep(Duration::from_millis(500));
    releases.point_to("r2");
    let reloading = Instant::now();
    let reply = request(
        cluster.control(),
        &Request::Reload,
        Duration::from_secs(120),
    )
    .expect("reload");
    let reload_time = reloading.elapsed();
    assert_eq!(
        reply,
        Reply::Reloaded {
            replaced: WORKERS as u32
        }
    );
    thread::sleep(Duration::from_millis(500));
    let (answered, failures) = load.finish();
    let sent = answered.values().sum::<u64>() + failures.len() as u64;
    eprintln!(
        "deploy ({how}): {sent} requests over {:.1}s, {} failed; the reload took {:.2}s",
        started.elapsed().as_secs_f64(),
        failures.len(),
        reload_time.as_secs_f64()
    );
    assert!(
        failures.is_empty(),
        "{} of {sent} failed: {:?}",
        failures.len(),
        &failures[..failures.len().min(10)]
    );
    let status = cluster.wait_until_ready(WORKERS);
    let after = every_worker_serves(releases, "r2");
    let running: BTreeSet<u32> = status.workers.iter().map(|w| w.pid as u32).collect();
    assert_eq!(after, running, "every worker answers, and serves r2");
    assert!(after.is_disjoint(&before), "{before:?} {after:?}");
    let stopped = cluster.stop();
    assert!(stopped.status.success(), "{:?}", stopped.status);
}

#[test]
fn chdir_follows_the_current_link_on_reload() {
    root_test("deploy_chdir", || {
        let releases = Releases::new();
        let base = releases.base.path().to_path_buf();
        let n = WORKERS.to_string();
        // A relative --chdir and a relative program, as a unit file would say them.
        let cluster = Cluster::start_with(
            &[
                "run",
                "-w",
                &n,
                "-l",
                ADDR,
                "--chdir",
                "current",
                "--",
                "./server.py",
            ],
            |command| {
                command.current_dir(&base);
            },
        );
        deploy(&releases, cluster, "--chdir current -- ./server.py");
    });
}

#[test]
fn the_config_files_cwd_follows_the_current_link_on_reload() {
    root_test("deploy_config_cwd", || {
        let releases = Releases::new();
        let file = releases.base.join("app.toml");
        std::fs::write(
            &file,
            format!(
                "workers = {WORKERS}\nlisten = [\"{ADDR}\"]\ncwd = \"{}\"\ncommand = [\"python3\", \"server.py\"]\n",
                releases.current().display()
            ),
        )
        .expect("writing the config file");
        let path = file.display().to_string();
        let cluster = Cluster::start(&["run", "--config", &path]);
        deploy(
            &releases,
            cluster,
            "cwd in the config file, python3 server.py",
        );
    });
}

#[test]
fn pwd_through_the_current_link_is_followed_on_reload() {
    root_test("deploy_pwd", || {
        let releases = Releases::new();
        let current = releases.current();
        let n = WORKERS.to_string();
        // `cd /srv/app/current && cluster-lb run ...`: the shell sets PWD to the path it took.
        let cluster = Cluster::start_with(
            &["run", "-w", &n, "-l", ADDR, "--", "./server.py"],
            |command| {
                command.current_dir(&current).env("PWD", &current);
            },
        );
        let line = cluster.wait_for_line("($PWD)", Duration::from_secs(10));
        assert!(line.contains(&current.display().to_string()), "{line}");
        deploy(&releases, cluster, "cd current, no --chdir");
    });
}

#[test]
fn a_missing_chdir_directory_is_one_line() {
    let missing = std::env::temp_dir().join(format!("clb-no-such-dir-{}", std::process::id()));
    let missing = missing.display().to_string();
    let output = Command::new(workspace_binary("cluster-lb"))
        .args([
            "run", "-w", "1", "-l", ADDR, "--chdir", &missing, "--", "./server",
        ])
        .output()
        .expect("running cluster-lb");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert_eq!(
        stderr,
        format!("cluster-lb: error: --chdir {missing}: no such directory\n")
    );
}

#[test]
fn a_release_directory_that_vanished_aborts_the_reload_naming_it() {
    root_test("deploy_vanished", || {
        let releases = Releases::new();
        let base = releases.base.path().to_path_buf();
        let cluster = Cluster::start_with(
            &[
                "run",
                "-w",
                &WORKERS.to_string(),
                "-l",
                ADDR,
                "--chdir",
                "current",
                "--",
                "./server.py",
            ],
            |command| {
                command.current_dir(&base);
            },
        );
        cluster.wait_until_ready(WORKERS);
        let before = every_worker_serves(&releases, "r1");
        // A link to a release that is not there (removed, or not yet unpacked).
        releases.point_to("gone");
        let error = request(
            cluster.control(),
            &Request::Reload,
            Duration::from_secs(120),
        )
        .expect_err("the reload succeeded")
        .to_string();
        assert!(
            error.contains("cannot start ./server.py in current: No such file or directory"),
            "{error}"
        );
        // The old workers keep serving the release they run.
        assert_eq!(every_worker_serves(&releases, "r1"), before);
        let stopped = cluster.stop();
        assert!(stopped.status.success(), "{:?}", stopped.status);
    });
}
