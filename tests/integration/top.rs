//! `cluster-lb top` in a real terminal: tmux runs it in a detached 120x30 session on a tmux
//! server of the test's own (its socket in a temporary directory), the test reads the screen
//! with capture-pane and presses keys with send-keys.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    thread,
    time::{Duration, Instant},
};

use cluster_lb_tests::{get, root_test, signal, workspace_binary, Cluster, WorkerState, ADDR};
use nix::sys::signal::Signal;

/// A tmux server of our own with one session, killed on drop.
struct Tmux {
    dir: PathBuf,
    socket: PathBuf,
}

impl Tmux {
    /// Runs `command` in a new detached 120x30 session. The pane stays after the command exits
    /// (remain-on-exit), so its exit status can be read.
    fn start(name: &str, command: &[String]) -> Tmux {
        let dir = std::env::temp_dir().join(format!("clb-top-{}-{name}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).expect("creating the tmux directory");
        let tmux = Tmux {
            socket: dir.join("tmux.sock"),
            dir,
        };
        let line = command
            .iter()
            .map(|word| format!("'{word}'"))
            .collect::<Vec<_>>()
            .join(" ");
        let line = format!(
            "{line}; echo $? > '{}'",
            tmux.dir.join("exit-status").display()
        );
        // One tmux command line: the option is set before the new pane's command can exit.
        tmux.run(&[
            "new-session",
            "-d",
            "-x",
            "120",
            "-y",
            "30",
            &line,
            ";",
            "set-option",
            "-g",
            "remain-on-exit",
            "on",
        ]);
        tmux
    }

    fn run(&self, args: &[&str]) -> String {
        let output = Command::new("tmux")
            .arg("-S")
            .arg(&self.socket)
            .args(args)
            .env("TERM", "xterm-256color")
            .output()
            .expect("running tmux (cargo xtask test installs it)");
        assert!(
            output.status.success(),
            "tmux {args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    fn screen(&self) -> String {
        self.run(&["capture-pane", "-p"])
    }

    /// Waits until `check` accepts the screen; returns it.
    fn wait_for_screen(&self, what: &str, check: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let screen = self.screen();
            if check(&screen) {
                return screen;
            }
            assert!(
                Instant::now() < deadline,
                "the screen did not show {what} within 20 s:\n{screen}"
            );
            thread::sleep(Duration::from_millis(200));
        }
    }

    /// The exit status of the pane's command, once it has exited. The shell around it writes
    /// the status to a file: tmux 3.3a (Debian 12) at times never reaps a pane's process when
    /// several tmux servers run at once, so `#{pane_dead_status}` would stay empty.
    fn wait_for_exit(&self) -> i32 {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(text) = fs::read_to_string(self.dir.join("exit-status")) {
                if text.ends_with('\n') {
                    return text.trim().parse().expect("a numeric exit status");
                }
            }
            assert!(
                Instant::now() < deadline,
                "top did not exit within 10 s:\n{}",
                self.screen()
            );
            thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = Command::new("tmux")
            .arg("-S")
            .arg(&self.socket)
            .arg("kill-server")
            .status();
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// One worker's row as top draws it: WORKER PID STATE CONN/S CONNS RESTARTS RSS CPU% UPTIME.
#[derive(Debug)]
struct ScreenRow {
    id: u32,
    state: String,
    conns_per_s: Option<f64>,
    restarts: u32,
    rss_mib: f64,
    cpu_percent: Option<f64>,
}

fn row_of(screen: &str, pid: i32) -> Option<ScreenRow> {
    screen.lines().find_map(|line| {
        let cells: Vec<&str> = line.split_whitespace().collect();
        // WORKER PID STATE CONN/S CONNS QUEUE RESTARTS RSS CPU% UPTIME
        if cells.len() != 10 || cells[1] != pid.to_string() {
            return None;
        }
        Some(ScreenRow {
            id: cells[0].parse().ok()?,
            state: cells[2].to_string(),
            conns_per_s: cells[3].parse().ok(),
            restarts: cells[6].parse().ok()?,
            rss_mib: cells[7].strip_suffix('M')?.parse().ok()?,
            cpu_percent: cells[8].parse().ok(),
        })
    })
}

fn top_command(control: &Path) -> Vec<String> {
    vec![
        workspace_binary("cluster-lb").display().to_string(),
        "top".into(),
        "--control".into(),
        control.display().to_string(),
    ]
}

#[test]
fn top_shows_every_worker_live() {
    root_test("top_shows_every_worker_live", || {
        let server = workspace_binary("example-rust-server")
            .display()
            .to_string();
        let cluster = Cluster::serving(2, ADDR, &[&server]);
        let status = cluster.status();
        let tmux = Tmux::start("live", &top_command(cluster.control()));

        // Every worker has a row with its pid, id and state, under the cluster's header.
        let screen = tmux.wait_for_screen("a row per worker", |screen| {
            status
                .workers
                .iter()
                .all(|w| row_of(screen, w.pid).is_some())
        });
        assert!(
            screen.contains(&format!("pid {} · strategy", status.primary_pid)),
            "{screen}"
        );
        assert!(screen.contains("strategy round-robin"), "{screen}");
        assert!(screen.contains("2 ready of 2 wanted"), "{screen}");
        for worker in &status.workers {
            let row = row_of(&screen, worker.pid).expect("row");
            assert_eq!(row.id, worker.id, "{screen}");
            assert_eq!(row.state, "ready", "{screen}");
        }

        // Under load, the kernel counter's delta shows as new connections per second.
        let loading = Arc::new(AtomicBool::new(true));
        let load = {
            let loading = Arc::clone(&loading);
            thread::spawn(move || {
                let mut answered = 0u64;
                while loading.load(Ordering::Relaxed) {
                    get(ADDR.parse().expect("address")).expect("a request under load");
                    answered += 1;
                    thread::sleep(Duration::from_millis(5));
                }
                answered
            })
        };
        let loaded_pid = status.workers[0].pid;
        let screen = tmux.wait_for_screen("new connections per second", |screen| {
            row_of(screen, loaded_pid)
                .and_then(|row| row.conns_per_s)
                .is_some_and(|rate| rate > 0.0)
        });
        // Memory and CPU from /proc: a real resident size, and a CPU share once two samples
        // exist (the rate above needed two as well).
        let loaded = row_of(&screen, loaded_pid).expect("the loaded row");
        assert!(loaded.rss_mib > 0.5, "{screen}");
        assert!(loaded.cpu_percent.is_some_and(|cpu| cpu >= 0.0), "{screen}");
        loading.store(false, Ordering::Relaxed);
        let answered = load.join().expect("load thread");
        eprintln!("under load ({answered} connections):\n{screen}");

        // A killed worker: its id comes back with a new pid and one more restart.
        let victim = status.workers[0].clone();
        signal(victim.pid as u32, Signal::SIGKILL);
        let after =
            cluster.wait_until("the killed worker replaced", Duration::from_secs(30), |s| {
                s.workers.len() == 2
                    && s.workers.iter().all(|w| w.state == WorkerState::Ready)
                    && s.workers.iter().all(|w| w.pid != victim.pid)
            });
        let replacement = after
            .workers
            .iter()
            .find(|w| w.id == victim.id)
            .expect("the replacement")
            .clone();
        let screen = tmux.wait_for_screen("the replacement and its restart", |screen| {
            row_of(screen, victim.pid).is_none()
                && row_of(screen, replacement.pid)
                    .is_some_and(|row| row.restarts > victim.restarts && row.state == "ready")
        });
        eprintln!("after the kill:\n{screen}");

        // The cluster goes away: top says so and keeps trying.
        let stopped = cluster.stop();
        assert!(stopped.status.success());
        tmux.wait_for_screen("the cluster gone", |screen| {
            screen.contains("cluster unreachable") && row_of(screen, replacement.pid).is_none()
        });

        tmux.run(&["send-keys", "q"]);
        assert_eq!(tmux.wait_for_exit(), 0, "top's exit status after q");
    });
}

#[test]
fn top_without_a_cluster_says_so_and_quits_on_escape() {
    root_test("top_without_a_cluster", || {
        let missing =
            std::env::temp_dir().join(format!("clb-top-{}-none.sock", std::process::id()));
        let tmux = Tmux::start("missing", &top_command(&missing));
        let screen = tmux.wait_for_screen("that no cluster answers", |screen| {
            screen.contains("cluster unreachable")
        });
        assert!(screen.contains(&missing.display().to_string()), "{screen}");
        tmux.run(&["send-keys", "Escape"]);
        assert_eq!(tmux.wait_for_exit(), 0, "top's exit status after Esc");
    });
}

#[test]
fn top_quits_on_ctrl_c_and_gives_the_terminal_back() {
    root_test("top_quits_on_ctrl_c", || {
        let missing =
            std::env::temp_dir().join(format!("clb-top-{}-ctrlc.sock", std::process::id()));
        let tmux = Tmux::start("ctrlc", &top_command(&missing));
        tmux.wait_for_screen("top drawing", |screen| screen.contains("q quit"));
        tmux.run(&["send-keys", "C-c"]);
        assert_eq!(tmux.wait_for_exit(), 0, "top's exit status after Ctrl-C");
        // Back on the main screen: the alternate screen with top's drawing is gone.
        let screen = tmux.screen();
        assert!(!screen.contains("q quit"), "{screen}");
    });
}

#[test]
fn top_without_a_terminal_is_one_line() {
    let output = Command::new(workspace_binary("cluster-lb"))
        .args(["top", "--control", "/nonexistent/cluster-lb.sock"])
        .output()
        .expect("running cluster-lb top");
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("not one; for scripts use `cluster-lb status --json`"),
        "{stderr}"
    );
}
