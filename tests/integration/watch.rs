//! `run --watch`, the development mode: a change under a watched directory reloads every
//! worker (a rolling reload, no request failed); node_modules, .git and editors' temporary
//! files do not; changes close together are one reload, and a change during a reload is one
//! more after it; a reload whose new code crashes leaves the old workers serving and the watch
//! going on. The app is a Python server that answers with the version it read at start from
//! version.txt beside it.

use std::{
    collections::BTreeSet,
    path::PathBuf,
    thread,
    time::{Duration, Instant},
};

use cluster_lb_tests::{
    addr, pid_and_version, python_server_answering, root_test, Cluster, RequestLoop, ScratchDir,
    ADDR,
};

const WORKERS: usize = 3;
const CLIENTS: u32 = 4;

/// The app's directory (removed when dropped): server.py, version.txt.
struct App {
    dir: ScratchDir,
}

impl App {
    fn new(version: &str) -> App {
        let dir = ScratchDir::new("watch");
        let example = python_server_answering("version {VERSION}");
        let worker_id = r#"WORKER_ID = os.environ.get("CLUSTER_LB_WORKER_ID", "-")"#;
        let ready = "    notify_ready()\n";
        assert!(
            example.contains(worker_id) && example.contains(ready),
            "the example changed"
        );
        let server = example
            .replace(
                worker_id,
                &format!(
                    "{worker_id}\n{}",
                    r#"VERSION = open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "version.txt")).read().strip()
if VERSION == "crash":
    sys.exit("version.txt says crash")"#
                ),
            )
            // START_DELAY: seconds between listening and ready, to make a reload take time.
            .replace(
                ready,
                "    time.sleep(float(os.environ.get(\"START_DELAY\", \"0\")))\n    notify_ready()\n",
            );
        std::fs::write(dir.join("server.py"), server).expect("writing server.py");
        let app = App { dir };
        app.write("version.txt", version);
        app
    }

    fn write(&self, relative: &str, text: &str) {
        let path = self.dir.join(relative);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).expect("creating a directory");
        }
        std::fs::write(&path, text).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
    }

    fn path(&self, relative: &str) -> PathBuf {
        self.dir.join(relative)
    }

    /// `cluster-lb run -w 3 -l ADDR --watch DIR OPTIONS -- python3 DIR/server.py`, once every
    /// worker is ready; each worker waits `start_delay` seconds between listening and ready.
    fn start(&self, start_delay: f64, options: &[&str]) -> Cluster {
        let n = WORKERS.to_string();
        let dir = self.dir.path().display().to_string();
        let server = self.path("server.py").display().to_string();
        let delay = start_delay.to_string();
        let mut args = vec!["run", "-w", n.as_str(), "-l", ADDR, "--watch", dir.as_str()];
        args.extend_from_slice(options);
        args.extend(["--", "python3", server.as_str()]);
        let cluster = Cluster::start_with(&args, |command| {
            command.env("START_DELAY", &delay);
        });
        cluster.wait_until_ready(WORKERS);
        cluster
    }
}

/// `3 * WORKERS` answers (round robin: each worker 3 times): the pids, if all say `version`.
fn all_serve(version: &str) -> Result<BTreeSet<u32>, String> {
    let mut pids = BTreeSet::new();
    for _ in 0..3 * WORKERS {
        let (pid, served) = pid_and_version(addr());
        if served != version {
            return Err(format!("pid {pid} serves {served}, not {version}"));
        }
        pids.insert(pid);
    }
    Ok(pids)
}

/// Every running worker serves `version`: the answers' pids are the status's ready workers.
fn every_worker_serves(cluster: &Cluster, version: &str) {
    let status = cluster.wait_until_ready(WORKERS);
    let running: BTreeSet<u32> = status.workers.iter().map(|w| w.pid as u32).collect();
    let pids = all_serve(version).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(pids, running, "every worker answers {version}");
}

/// The log lines of the watcher that start a reload.
fn reload_lines(cluster: &Cluster) -> Vec<String> {
    cluster
        .lines()
        .into_iter()
        .filter(|line| line.contains("watch: ") && line.contains(": reloading"))
        .collect()
}

/// Waits until the cluster has done `count` reloads and none runs.
fn wait_for_reloads(cluster: &Cluster, count: u64) {
    cluster.wait_until(
        &format!("{count} reloads done"),
        Duration::from_secs(30),
        |status| status.reloads == count && !status.reloading,
    );
}

/// Time for a change that should not reload to have done so (the debounce is 300 ms).
const SETTLE: Duration = Duration::from_millis(1500);

#[test]
fn a_change_reloads_every_worker_and_fails_no_request() {
    root_test("watch_reload", || {
        let app = App::new("v1");
        let cluster = app.start(0.0, &[]);
        every_worker_serves(&cluster, "v1");
        let started = Instant::now();
        let load = RequestLoop::start(addr(), CLIENTS);
        thread::sleep(Duration::from_millis(500));
        app.write("version.txt", "v2");
        let written = Instant::now();
        let deadline = written + Duration::from_secs(30);
        while all_serve("v2").is_err() {
            assert!(
                Instant::now() < deadline,
                "not every worker serves v2 30 s after the change; output:\n{}",
                cluster.lines().join("\n")
            );
            thread::sleep(Duration::from_millis(20));
        }
        let serving = written.elapsed();
        wait_for_reloads(&cluster, 1);
        let reloaded = written.elapsed();
        thread::sleep(Duration::from_millis(500));
        let (answered, failures) = load.finish();
        let sent = answered.values().sum::<u64>() + failures.len() as u64;
        eprintln!(
            "watch: {sent} requests over {:.1}s, {} failed; after the write, 9 answers in a row were v2 at {:.2}s, status showed the reload done at {:.2}s",
            started.elapsed().as_secs_f64(),
            failures.len(),
            serving.as_secs_f64(),
            reloaded.as_secs_f64()
        );
        assert!(
            failures.is_empty(),
            "{} of {sent} failed: {:?}",
            failures.len(),
            &failures[..failures.len().min(10)]
        );
        every_worker_serves(&cluster, "v2");
        thread::sleep(SETTLE);
        assert_eq!(cluster.status().reloads, 1);
        let finished = cluster.events_named("reload-finished");
        assert_eq!(finished.len(), 1, "{finished:?}");
        assert_eq!(finished[0]["ok"], true, "{finished:?}");
        assert_eq!(finished[0]["replaced"], WORKERS as u64, "{finished:?}");
        let lines = reload_lines(&cluster);
        let named = format!("1 change, first {}", app.path("version.txt").display());
        assert!(
            lines.len() == 1 && lines[0].contains(&named),
            "{named:?} in {lines:#?}"
        );
        assert!(cluster.stop().status.success());
    });
}

#[test]
fn ignored_paths_do_not_reload_and_new_directories_are_watched() {
    root_test("watch_ignored", || {
        let app = App::new("v1");
        app.write("node_modules/pkg/index.js", "1");
        app.write(".git/HEAD", "ref: refs/heads/main");
        let cluster = app.start(0.0, &[]);
        app.write("node_modules/pkg/index.js", "2");
        app.write("node_modules/new-pkg/index.js", "1");
        app.write(".git/index", "x");
        app.write(".git/refs/heads/main", "x");
        app.write("__pycache__/server.cpython-311.pyc", "x");
        app.write(".server.py.swp", "x");
        app.write("server.py~", "x");
        app.write("4913", "x");
        std::fs::remove_file(app.path("4913")).expect("removing 4913");
        thread::sleep(SETTLE);
        let status = cluster.status();
        assert_eq!(status.reloads, 0, "{:#?}", cluster.lines());
        assert!(reload_lines(&cluster).is_empty());
        // A new directory is a change, and is watched from then on.
        std::fs::create_dir(app.path("lib")).expect("mkdir lib");
        wait_for_reloads(&cluster, 1);
        app.write("lib/util.py", "x = 1");
        wait_for_reloads(&cluster, 2);
        let lines = reload_lines(&cluster);
        let named = format!("first {}", app.path("lib/util.py").display());
        assert!(
            lines.len() == 2 && lines[1].contains(&named),
            "{named:?} in {lines:#?}"
        );
        thread::sleep(SETTLE);
        assert_eq!(cluster.status().reloads, 2);
        assert!(cluster.stop().status.success());
    });
}

#[test]
fn quick_writes_are_one_reload_and_a_change_during_a_reload_one_more() {
    root_test("watch_debounce", || {
        let app = App::new("v1");
        // Each worker takes 0.4 s to get ready: a reload of 3 lasts over a second.
        let cluster = app.start(0.4, &[]);
        for version in ["v2", "v3", "v4", "v5", "v6"] {
            app.write("version.txt", version);
            thread::sleep(Duration::from_millis(20));
        }
        wait_for_reloads(&cluster, 1);
        thread::sleep(SETTLE);
        assert_eq!(cluster.status().reloads, 1);
        let lines = reload_lines(&cluster);
        assert!(
            lines.len() == 1 && lines[0].contains("5 changes, first"),
            "{lines:#?}"
        );
        every_worker_serves(&cluster, "v6");
        // A change, and another while its reload runs: two reloads, one after the other.
        app.write("version.txt", "v7");
        cluster.wait_until("reloading", Duration::from_secs(10), |s| s.reloading);
        app.write("version.txt", "v8");
        wait_for_reloads(&cluster, 3);
        thread::sleep(SETTLE);
        assert_eq!(cluster.status().reloads, 3);
        let started = cluster.events_named("reload-started").len();
        let finished = cluster.events_named("reload-finished");
        assert_eq!((started, finished.len()), (3, 3), "{finished:?}");
        assert!(
            finished.iter().all(|e| e["ok"].as_bool() == Some(true)),
            "{finished:?}"
        );
        every_worker_serves(&cluster, "v8");
        assert!(cluster.stop().status.success());
    });
}

#[test]
fn a_reload_whose_code_crashes_keeps_the_old_workers_and_the_watch_goes_on() {
    root_test("watch_crash", || {
        let app = App::new("v1");
        // The workers say READY=1; a long --ready-delay makes sure a replacement that crashes
        // at start, however slowly under load, is never taken for ready by the delay.
        let cluster = app.start(0.0, &["--ready-delay", "20"]);
        let load = RequestLoop::start(addr(), CLIENTS);
        app.write("version.txt", "crash");
        let failed = cluster.wait_for_event("reload-finished", Duration::from_secs(30), |_| true);
        assert_eq!(failed["ok"], false, "{failed}");
        wait_for_reloads(&cluster, 1);
        cluster.wait_for_line("watch: the reload failed", Duration::from_secs(5));
        // The old workers serve on (under load, so which worker answers is the loop's luck).
        all_serve("v1").unwrap_or_else(|e| panic!("{e}"));
        app.write("version.txt", "v2");
        wait_for_reloads(&cluster, 2);
        let finished = cluster.events_named("reload-finished");
        assert_eq!(finished.len(), 2, "{finished:?}");
        assert_eq!(finished[1]["ok"], true, "{finished:?}");
        all_serve("v2").unwrap_or_else(|e| panic!("{e}"));
        let (answered, failures) = load.finish();
        let sent = answered.values().sum::<u64>() + failures.len() as u64;
        assert!(
            failures.is_empty(),
            "{} of {sent} failed: {:?}",
            failures.len(),
            &failures[..failures.len().min(10)]
        );
        every_worker_serves(&cluster, "v2");
        assert!(cluster.stop().status.success());
    });
}
