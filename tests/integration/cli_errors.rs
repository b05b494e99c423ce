//! Bad input gets one clear line and a non-zero exit, never a panic or a backtrace.

use std::{net::TcpListener, path::Path, process::Command};

use cluster_lb_tests::{root_test, workspace_binary};

/// Runs cluster-lb to completion; returns (exit code, stderr lines).
fn run(args: &[&str]) -> (Option<i32>, Vec<String>) {
    run_in(Path::new("."), args)
}

/// As run, with cluster-lb started in `dir`.
fn run_in(dir: &Path, args: &[&str]) -> (Option<i32>, Vec<String>) {
    let output = Command::new(workspace_binary("cluster-lb"))
        .args(args)
        .current_dir(dir)
        .output()
        .expect("running cluster-lb");
    let stderr = String::from_utf8_lossy(&output.stderr);
    (
        output.status.code(),
        stderr.lines().map(str::to_string).collect(),
    )
}

fn assert_one_line_error(args: &[&str], expected: &str) {
    assert_one_line_error_in(Path::new("."), args, expected);
}

/// As assert_one_line_error, with cluster-lb started in `dir`.
fn assert_one_line_error_in(dir: &Path, args: &[&str], expected: &str) {
    let (code, lines) = run_in(dir, args);
    assert!(
        matches!(code, Some(c) if c != 0),
        "{args:?} exited {code:?}"
    );
    assert_eq!(lines.len(), 1, "{args:?} printed {lines:#?}");
    assert!(lines[0].starts_with("cluster-lb: error: "), "{}", lines[0]);
    assert!(lines[0].contains(expected), "{args:?}: {}", lines[0]);
    assert!(!lines[0].contains("panicked"), "{}", lines[0]);
}

#[test]
fn bad_listen_values_are_named_in_one_line() {
    for (value, expected) in [
        ("127.0.0.1:99999", "out of range"),
        ("127.0.0.1:0", "port 0"),
        ("example.com:80", "'example.com' is not an IP address"),
        ("::1:80", "needs brackets"),
        ("[::1]", "missing ':PORT'"),
        ("1.2.3.4", "missing port"),
        ("", "empty address"),
    ] {
        assert_one_line_error(
            &["run", "-w", "1", "--listen", value, "--", "true"],
            expected,
        );
    }
}

#[test]
fn round_robin_for_udp_is_refused_in_one_line() {
    assert_one_line_error(
        &[
            "run",
            "--listen",
            "udp://127.0.0.1:5353",
            "--strategy",
            "round-robin",
            "--",
            "true",
        ],
        "would split UDP flows",
    );
}

#[test]
fn other_bad_arguments_are_named_in_one_line() {
    assert_one_line_error(
        &["run", "--listen", "80", "-w", "0", "--", "true"],
        "0 is not in 1..=1024",
    );
    assert_one_line_error(
        &["run", "--listen", "80", "-s", "random", "--", "true"],
        "unknown strategy",
    );
    assert_one_line_error(&["run", "--listen", "80"], "<CMD>");
    assert_one_line_error(&["frobnicate"], "frobnicate");
}

#[test]
fn a_watch_path_that_does_not_exist_is_one_line_and_exit_2() {
    let missing = std::env::temp_dir().join(format!("clb-no-such-dir-{}", std::process::id()));
    let path = missing.display().to_string();
    let (code, lines) = run(&["run", "-w", "1", "-l", "80", "--watch", &path, "--", "true"]);
    assert_eq!(code, Some(2), "{lines:?}");
    assert_eq!(
        lines,
        [format!(
            "cluster-lb: error: --watch {path}: no such file or directory; give a file or directory that exists"
        )]
    );
}

#[test]
fn a_port_in_use_is_one_clear_error() {
    root_test("port_in_use", || {
        let _holder = TcpListener::bind("127.0.0.1:8080").expect("taking the port first");
        assert_one_line_error(
            &["run", "-w", "2", "--listen", "127.0.0.1:8080", "--", "true"],
            "cannot listen on 127.0.0.1:8080: address already in use",
        );
    });
}

#[test]
fn a_missing_command_is_one_clear_error() {
    root_test("missing_command", || {
        assert_one_line_error(
            &[
                "run",
                "-w",
                "2",
                "--listen",
                "127.0.0.1:8080",
                "--",
                "no-such-server-xyz",
            ],
            "cannot run no-such-server-xyz: command not found in PATH",
        );
        assert_one_line_error(
            &[
                "run",
                "-w",
                "2",
                "--listen",
                "127.0.0.1:8080",
                "--",
                "./no/such/server",
            ],
            "cannot run ./no/such/server",
        );
    });
}

#[test]
fn an_address_no_interface_has_is_one_clear_error() {
    root_test("address_not_available", || {
        assert_one_line_error(
            &["run", "-w", "1", "--listen", "192.0.2.1:8080", "--", "true"],
            "no local interface has that IP",
        );
    });
}

#[test]
fn help_exits_zero() {
    let (code, _) = run(&["--help"]);
    assert_eq!(code, Some(0));
    let (code, _) = run(&["run", "--help"]);
    assert_eq!(code, Some(0));
}

#[test]
fn bad_health_limits_are_named_in_one_line() {
    for (flag, value, expected) in [
        ("--max-memory", "lots", "'lots' is not a size"),
        ("--max-age", "1y", "'1y' is not a duration"),
        ("--max-age", "0", "'0' is not a duration"),
        ("--recycle-jitter", "2", "'2' is not a fraction from 0 to 1"),
        ("--max-connections", "0", "--max-connections"),
    ] {
        assert_one_line_error(&["run", "-w", "1", flag, value, "--", "true"], expected);
    }
    assert_one_line_error(
        &[
            "run",
            "--max-memory",
            "512M",
            "--max-memory-hard",
            "256M",
            "--",
            "true",
        ],
        "--max-memory-hard 256M is below --max-memory 512M",
    );
}

/// A launcher that would start the app as a child without the cluster channel (its listen()
/// would bind alone and the other workers crash-loop) is refused before anything starts.
#[test]
fn launchers_that_would_take_the_channel_are_refused_in_one_line() {
    let dir = std::env::temp_dir().join(format!("clb-launchers-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("a scratch directory");
    std::fs::write(
        dir.join("package.json"),
        r#"{"scripts": {"start": "node migrate.js && node server.js", "dev": "node --watch server.js"}}"#,
    )
    .expect("writing package.json");
    for (command, expected) in [
        (
            &["npm", "start"][..],
            "`npm start` runs `node migrate.js && node server.js` (package.json's scripts.start), which is not a plain node command",
        ),
        (&["yarn", "run", "dev"], "node --watch restarts the app"),
        (&["node", "--watch", "server.js"], "drop --watch"),
        (&["nodemon", "server.js"], "nodemon restarts the app"),
        (&["pnpm", "run", "build"], "has no script \"build\""),
    ] {
        let mut args = vec!["run", "-w", "2", "--"];
        args.extend(command);
        assert_one_line_error_in(&dir, &args, expected);
    }
    let _ = std::fs::remove_dir_all(&dir);
}
