//! `cluster-lb run --config FILE`: a cluster configured by a TOML file serves, flags override
//! the file, and every kind of bad file is one line naming the key (exit 2).

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    sync::atomic::{AtomicUsize, Ordering},
};

use cluster_lb_tests::{cluster_lb_in, distribution, root_test, run_dir, rust_server, Cluster};

/// Writes `text` to a fresh file in `dir`.
fn config_file(dir: &Path, text: &str) -> PathBuf {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let path = dir.join(format!("app-{}.toml", NEXT.fetch_add(1, Ordering::Relaxed)));
    std::fs::write(&path, text).expect("writing the config file");
    path
}

#[test]
fn a_cluster_from_a_config_file_serves() {
    root_test("config_file_serves", || {
        let dir = run_dir();
        let file = config_file(
            &dir,
            &format!(
                r#"# everything a unit file would otherwise say on its command line
workers = 3
listen = ["127.0.0.1:8080"]
strategy = "round-robin"
name = "app"
grace = 5
ready_delay = 0.2
log_format = "json"
command = ["{}"]
"#,
                rust_server()
            ),
        );
        let path = file.display().to_string();
        let cluster = Cluster::start_named(&dir, "app", &["run", "--config", &path]);
        let status = cluster.wait_until_ready(3);
        assert_eq!(status.name.as_deref(), Some("app"));
        assert_eq!(status.listen, ["127.0.0.1:8080"]);
        assert_eq!(status.strategy, "round-robin");
        // Exact round robin over the three workers the file asked for.
        let seen = distribution("127.0.0.1:8080".parse().unwrap(), 30);
        assert_eq!(seen, BTreeMap::from([(0, 10), (1, 10), (2, 10)]));
        let stopped = cluster.stop();
        assert!(stopped.status.success());
    });
}

#[test]
fn flags_on_the_command_line_override_the_file() {
    root_test("config_file_override", || {
        let dir = run_dir();
        let file = config_file(
            &dir,
            &format!(
                "workers = 1\nlisten = [\"127.0.0.1:8080\"]\nname = \"from-file\"\nstrategy = \"hash\"\ncommand = [\"{}\"]\n",
                rust_server()
            ),
        );
        let path = file.display().to_string();
        let cluster = Cluster::start_named(
            &dir,
            "from-flag",
            &[
                "run",
                "--config",
                &path,
                "-w",
                "2",
                "--name",
                "from-flag",
                "--listen",
                "127.0.0.1:8081",
            ],
        );
        let status = cluster.wait_until_ready(2);
        assert_eq!(status.name.as_deref(), Some("from-flag"));
        // --listen replaces the file's list rather than adding to it.
        assert_eq!(status.listen, ["127.0.0.1:8081"]);
        // What no flag gave still comes from the file.
        assert_eq!(status.strategy, "hash");
        assert!(std::net::TcpStream::connect("127.0.0.1:8080").is_err());
        cluster_lb_tests::get("127.0.0.1:8081".parse().unwrap())
            .expect("serves on the flag's address");
    });
}

#[test]
fn bad_config_files_are_one_line_naming_the_key() {
    let dir = std::env::temp_dir().join(format!("clb-bad-configs-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("a directory for the files");
    let cases = [
        ("workers = 0", "workers", "0 is not in 1..=1024"),
        ("workers = \"many\"", "workers", "invalid digit"),
        (
            "workers = true",
            "workers",
            "expected a string or a number, found a boolean",
        ),
        ("listen = \"nonsense\"", "listen", "missing port"),
        ("listen = [\"80\", \"0.0.0.0:80\"]", "listen", "given twice"),
        (
            "strategy = \"fastest\"",
            "strategy",
            "unknown strategy 'fastest'",
        ),
        (
            "ready_timeout = 0",
            "ready_timeout",
            "must be more than 0 seconds",
        ),
        ("grace = 99999", "grace", "between 0 and 3600"),
        ("user = \"no-such-user-xyz\"", "user", "no such user"),
        ("require_ebpf = 1", "require_ebpf", "expected true or false"),
        ("worker = 4", "worker", "unknown key"),
        (
            "ready-delay = 1",
            "ready-delay",
            "did you mean `ready_delay`?",
        ),
        (
            "command = \"./server --port 1\"",
            "command",
            "expected a list of strings",
        ),
    ];
    for (line, key, expected) in cases {
        // A valid command, so that only the line under test is wrong.
        let text = if key == "command" {
            line.to_string()
        } else {
            format!("{line}\ncommand = [\"true\"]\n")
        };
        let file = config_file(&dir, &text);
        let path = file.display().to_string();
        let (code, _, stderr) = cluster_lb_in(&dir, &["run", "--config", &path]);
        assert_eq!(code, Some(2), "{line}: {stderr:?}");
        assert_eq!(stderr.len(), 1, "{line}: {stderr:#?}");
        let prefix = format!("cluster-lb: error: config {path}: key `{key}`: ");
        assert!(stderr[0].starts_with(&prefix), "{line}: {}", stderr[0]);
        assert!(stderr[0].contains(expected), "{line}: {}", stderr[0]);
    }
    let broken = config_file(&dir, "workers = 2\nlisten = [\"80\"\n");
    let path = broken.display().to_string();
    let (code, _, stderr) = cluster_lb_in(&dir, &["run", "--config", &path]);
    assert_eq!(code, Some(2));
    assert_eq!(stderr.len(), 1, "{stderr:#?}");
    assert!(
        stderr[0].starts_with(&format!("cluster-lb: error: config {path}: line 2: ")),
        "{}",
        stderr[0]
    );
    let (code, _, stderr) = cluster_lb_in(&dir, &["run", "--config", "/nonexistent/app.toml"]);
    assert_eq!(code, Some(2));
    assert_eq!(stderr, ["cluster-lb: error: config /nonexistent/app.toml: cannot read it: No such file or directory (os error 2)"]);
    let without_command = config_file(&dir, "workers = 2\n");
    let path = without_command.display().to_string();
    let (code, _, stderr) = cluster_lb_in(&dir, &["run", "--config", &path]);
    assert_eq!(code, Some(2));
    assert_eq!(stderr.len(), 1, "{stderr:#?}");
    assert!(stderr[0].contains("no command to run"), "{}", stderr[0]);
    std::fs::remove_dir_all(&dir).expect("removing the files");
}
