//! A reload of a cluster started with `run --config FILE` reads the file again: the workers'
//! command, `env`, `env_file`, `cwd` and count change with it (PM2's `reload --update-env`),
//! through a canary (the first replacement) that must be ready before any old worker leaves.
//! What a reload cannot apply (a changed `listen`), or a file that no longer parses, refuses
//! the reload in one line, and nothing is replaced.
//!
//! The workers are examples/python/server.py answering `worker ID pid PID version V`, V being
//! their `VERSION` variable; clients open a new connection per request throughout.

use std::{
    collections::BTreeSet,
    path::PathBuf,
    process::{Command, Output},
    thread,
    time::{Duration, Instant},
};

use cluster_lb_tests::{
    addr, pid_and_version, python_server_answering, root_test, workspace_binary, Cluster,
    RequestLoop, ScratchDir, ADDR,
};

const CLIENTS: u32 = 4;

/// A directory with the server (and a program that crashes at start) and the config file.
/// Removed when dropped.
struct App {
    dir: ScratchDir,
}

impl App {
    fn new() -> App {
        let dir = ScratchDir::new("reconf");
        let server = python_server_answering("version {os.environ.get('VERSION', '-')}");
        std::fs::write(dir.join("server.py"), server).expect("writing server.py");
        std::fs::write(
            dir.join("crash.py"),
            "import sys\nsys.stderr.write('this release is broken\\n')\nsys.exit(3)\n",
        )
        .expect("writing crash.py");
        App { dir }
    }

    fn config(&self) -> PathBuf {
        self.dir.join("app.toml")
    }

    fn env_file(&self) -> PathBuf {
        self.dir.join("app.env")
    }

    /// Writes the config file: `extra` lines, then the usual address and directory. The
    /// server says READY=1; a program that does not is ready only after `ready_delay`, 5 s, so
    /// that crash.py, which can take over a second to start through pyenv's shim on a loaded
    /// machine, always crashes before it could count as ready (with the default 1 s it once
    /// did, and the reload went on past its canary, as it should for a ready one).
    fn write_config(&self, extra: &str) {
        let text = format!(
            "{extra}\nlisten = [\"{ADDR}\"]\ncwd = \"{}\"\nready_delay = 5\nready_timeout = 10\n",
            self.dir.path().display()
        );
        std::fs::write(self.config(), text).expect("writing the config file");
    }

    fn start(&self) -> Cluster {
        let path = self.config().display().to_string();
        Cluster::start(&["run", "--config", &path])
    }
}

/// Every worker answers `version` (round robin: `3 * workers` connections reach each worker 3
/// times); returns the pids that answered.
fn every_worker_serves(version: &str, workers: usize) -> BTreeSet<u32> {
    let mut pids = BTreeSet::new();
    for _ in 0..3 * workers {
        let (pid, served) = pid_and_version(addr());
        assert_eq!(served, version, "pid {pid}");
        pids.insert(pid);
    }
    assert_eq!(pids.len(), workers, "{pids:?}");
    pids
}

/// `cluster-lb reload` for the cluster, and how long it took.
fn reload(cluster: &Cluster) -> (Output, Duration) {
    let started = Instant::now();
    let output = Command::new(workspace_binary("cluster-lb"))
        .arg("reload")
        .arg("--control")
        .arg(cluster.control())
        .output()
        .expect("running cluster-lb reload");
    (output, started.elapsed())
}

/// Under a request loop: `change` edits the files, then `cluster-lb reload`; returns its
/// output and time, once the loop's clients all succeeded.
fn reload_under_load(cluster: &Cluster, what: &str, change: impl FnOnce()) -> (Output, Duration) {
    let started = Instant::now();
    let load = RequestLoop::start(addr(), CLIENTS);
    thread::sleep(Duration::from_millis(500));
    change();
    let (output, took) = reload(cluster);
    // The scale to a new count follows the reload: its worker is ready before the load ends.
    thread::sleep(Duration::from_millis(1500));
    let (answered, failures) = load.finish();
    let sent = answered.values().sum::<u64>() + failures.len() as u64;
    eprintln!(
        "reconfigure ({what}): {sent} requests over {:.1}s, {} failed; the reload took {:.2}s",
        started.elapsed().as_secs_f64(),
        failures.len(),
        took.as_secs_f64()
    );
    assert!(sent > 0, "no request was sent");
    assert!(
        failures.is_empty(),
        "{} of {sent} failed: {:?}",
        failures.len(),
        &failures[..failures.len().min(10)]
    );
    (output, took)
}

/// Its stderr, which must be one line, and its exit status 1.
fn refused(output: &Output) -> String {
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr:?}");
    stderr
}

fn succeeded(output: &Output) -> String {
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

const PYTHON: &str = "command = [\"python3\", \"server.py\"]";

#[test]
fn a_reload_takes_the_config_files_new_env_and_worker_count() {
    root_test("reconf_env", || {
        let app = App::new();
        app.write_config(&format!(
            "workers = 2\n{PYTHON}\nenv = {{ VERSION = \"1\" }}"
        ));
        let cluster = app.start();
        cluster.wait_until_ready(2);
        let before = every_worker_serves("1", 2);
        let (output, _) = reload_under_load(&cluster, "env VERSION=2, workers 2 -> 3", || {
            app.write_config(&format!(
                "workers = 3\n{PYTHON}\nenv = {{ VERSION = \"2\" }}"
            ));
        });
        assert_eq!(succeeded(&output), "reload complete: 2 workers replaced\n");
        cluster.wait_until_ready(3);
        let after = every_worker_serves("2", 3);
        assert_eq!(after, cluster.worker_pids(), "every running worker answers");
        assert!(after.is_disjoint(&before), "{before:?} {after:?}");
        let stopped = cluster.stop();
        assert!(stopped.status.success(), "{:?}", stopped.status);
    });
}

#[test]
fn a_reload_reads_the_env_file_again() {
    root_test("reconf_env_file", || {
        let app = App::new();
        std::fs::write(app.env_file(), "# the release\nVERSION=1\n").expect("writing app.env");
        let with_file = format!(
            "workers = 2\n{PYTHON}\nenv_file = \"{}\"",
            app.env_file().display()
        );
        app.write_config(&with_file);
        let cluster = app.start();
        cluster.wait_until_ready(2);
        let before = every_worker_serves("1", 2);
        let (output, _) = reload_under_load(&cluster, "env_file VERSION=2", || {
            std::fs::write(app.env_file(), "# the release\nexport VERSION='2'\n")
                .expect("writing app.env");
        });
        assert_eq!(succeeded(&output), "reload complete: 2 workers replaced\n");
        let after = every_worker_serves("2", 2);
        assert!(after.is_disjoint(&before), "{before:?} {after:?}");
        // A malformed env file refuses the next reload, naming the file and the line.
        std::fs::write(app.env_file(), "VERSION=3\nnot a variable\n").expect("writing app.env");
        let (output, _) = reload(&cluster);
        let line = refused(&output);
        assert!(
            line.contains(&format!(
                "key `env_file`: env file {}: line 2: ",
                app.env_file().display()
            )),
            "{line}"
        );
        assert_eq!(every_worker_serves("2", 2), after);
        let stopped = cluster.stop();
        assert!(stopped.status.success(), "{:?}", stopped.status);
    });
}

#[test]
fn a_broken_release_stops_at_its_canary_and_the_old_workers_keep_serving() {
    root_test("reconf_canary", || {
        let app = App::new();
        app.write_config(&format!(
            "workers = 2\n{PYTHON}\nenv = {{ VERSION = \"1\" }}"
        ));
        let cluster = app.start();
        cluster.wait_until_ready(2);
        let before = every_worker_serves("1", 2);
        let (output, took) = reload_under_load(&cluster, "a command that crashes at start", || {
            app.write_config(
                "workers = 3\ncommand = [\"python3\", \"crash.py\"]\nenv = { VERSION = \"2\" }",
            );
        });
        let line = refused(&output);
        assert!(
            line.contains("reload aborted: the replacement of worker 0")
                && line.contains(
                    "exited with status 3 before it was ready; the old workers keep serving"
                ),
            "{line}"
        );
        eprintln!("reconfigure: the broken release's reload was refused in {took:?}: {line}");
        // Nothing was replaced, and the count stays.
        assert_eq!(cluster.worker_pids(), before);
        assert_eq!(every_worker_serves("1", 2), before);
        let canaries = cluster.events_named("fork").len();
        assert_eq!(canaries, 3, "two workers and one canary were started");
        // A crash now restarts with the command and env the cluster had.
        let crashed = *before.iter().next().expect("a worker");
        cluster_lb_tests::signal(crashed, nix::sys::signal::Signal::SIGKILL);
        cluster.wait_until(
            "the crashed worker restarted",
            Duration::from_secs(30),
            |status| {
                status.workers.len() == 2
                    && status
                        .workers
                        .iter()
                        .all(|w| w.state == cluster_lb_tests::WorkerState::Ready)
                    && !status.workers.iter().any(|w| w.pid as u32 == crashed)
            },
        );
        let after = every_worker_serves("1", 2);
        assert_eq!(
            after.intersection(&before).count(),
            1,
            "{before:?} {after:?}"
        );
        let stopped = cluster.stop();
        assert!(stopped.status.success(), "{:?}", stopped.status);
    });
}

#[test]
fn a_changed_listen_address_is_refused_naming_the_key() {
    root_test("reconf_listen", || {
        let app = App::new();
        app.write_config(&format!(
            "workers = 2\n{PYTHON}\nenv = {{ VERSION = \"1\" }}"
        ));
        let cluster = app.start();
        cluster.wait_until_ready(2);
        let before = every_worker_serves("1", 2);
        let text = std::fs::read_to_string(app.config()).expect("reading the config");
        let moved = text
            .replace(ADDR, "127.0.0.1:8081")
            .replace("\"1\"", "\"2\"");
        assert_ne!(moved, text);
        std::fs::write(app.config(), moved).expect("writing the config");
        let (output, took) = reload(&cluster);
        let line = refused(&output);
        assert_eq!(
            line,
            format!(
                "cluster-lb: error: reload refused: config {}: key `listen` changed, and a reload applies only command, env, env_file, cwd and workers: restart the cluster to change it; the workers keep serving as they are\n",
                app.config().display()
            )
        );
        eprintln!("reconfigure: a changed listen was refused in {took:?}");
        assert_eq!(cluster.worker_pids(), before);
        assert_eq!(every_worker_serves("1", 2), before);
        assert_eq!(cluster.events_named("fork").len(), 2, "nothing was started");
        let stopped = cluster.stop();
        assert!(stopped.status.success(), "{:?}", stopped.status);
    });
}

#[test]
fn a_config_file_that_no_longer_parses_is_refused_as_at_start() {
    root_test("reconf_parse", || {
        let app = App::new();
        app.write_config(&format!(
            "workers = 2\n{PYTHON}\nenv = {{ VERSION = \"1\" }}"
        ));
        let cluster = app.start();
        cluster.wait_until_ready(2);
        let before = every_worker_serves("1", 2);
        std::fs::write(app.config(), "workers = = 3\n").expect("writing the config");
        let (output, _) = reload(&cluster);
        let line = refused(&output);
        // The line `run` prints for this file.
        let at_start = Command::new(workspace_binary("cluster-lb"))
            .arg("run")
            .arg("--config")
            .arg(app.config())
            .output()
            .expect("running cluster-lb run");
        let start_line = String::from_utf8_lossy(&at_start.stderr).into_owned();
        let problem = start_line
            .strip_prefix("cluster-lb: error: ")
            .expect("one error line")
            .trim_end();
        assert!(
            problem.starts_with(&format!("config {}: line 1:", app.config().display())),
            "{problem}"
        );
        assert!(
            line.starts_with(&format!("cluster-lb: error: reload refused: {problem}")),
            "{line}"
        );
        assert_eq!(cluster.worker_pids(), before);
        assert_eq!(every_worker_serves("1", 2), before);
        let stopped = cluster.stop();
        assert!(stopped.status.success(), "{:?}", stopped.status);
    });
}

/// PM2's `pm2 reload ecosystem.config.js --env production --update-env`: the ecosystem file
/// is evaluated again (by node), with the same `--env`.
#[test]
fn a_reload_reads_a_pm2_ecosystem_file_again_with_the_same_env() {
    root_test("reconf_pm2", || {
        let app = App::new();
        let ecosystem = app.dir.join("ecosystem.config.js");
        let write = |instances: u32, version: &str| {
            std::fs::write(
                &ecosystem,
                format!(
                    "module.exports = {{ apps: [{{ name: 'app', script: 'server.py', interpreter: 'python3', instances: {instances}, kill_signal: 'SIGTERM', env: {{ VERSION: 'dev' }}, env_production: {{ VERSION: '{version}' }} }}] }};\n"
                ),
            )
            .expect("writing ecosystem.config.js");
        };
        write(2, "1");
        let path = ecosystem.display().to_string();
        let dir = app.dir.path().to_path_buf();
        let cluster = Cluster::start_with(
            &["run", "--config", &path, "--env", "production", "-l", ADDR],
            |command| {
                command.current_dir(&dir);
            },
        );
        cluster.wait_until_ready(2);
        let before = every_worker_serves("1", 2);
        let (output, _) = reload_under_load(&cluster, "ecosystem file, --env production", || {
            write(3, "2");
        });
        assert_eq!(succeeded(&output), "reload complete: 2 workers replaced\n");
        cluster.wait_until_ready(3);
        let after = every_worker_serves("2", 3);
        assert!(after.is_disjoint(&before), "{before:?} {after:?}");
        let stopped = cluster.stop();
        assert!(stopped.status.success(), "{:?}", stopped.status);
    });
}
