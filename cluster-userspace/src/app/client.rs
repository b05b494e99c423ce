//! The `status`, `logs`, `reload`, `scale`, `stop` and `send` subcommands: find the cluster meant (by
//! `--control PATH`, by `--name`, or the only one running), talk to its primary over its
//! control socket and print what it says.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use super::{
    control::{request, ControlError, Reply, Request, MAX_SEND},
    names::{self, ClusterName},
};
use crate::supervisor::{ClusterStatus, Recipients};

/// A reload waits for every replacement to become ready, so it may take a while.
const RELOAD_TIMEOUT: Duration = Duration::from_secs(600);
const QUICK_TIMEOUT: Duration = Duration::from_secs(10);
/// How long one cluster may take to answer while all are listed.
const LIST_TIMEOUT: Duration = Duration::from_secs(2);

/// Which cluster a command is for.
#[derive(Debug, Clone, PartialEq)]
pub enum Target {
    /// `--control PATH`.
    Path(PathBuf),
    /// `--name NAME`: its socket in the run directory.
    Name(ClusterName),
    /// Neither: every running cluster for `status`, the only one for the others.
    Unnamed,
}

impl Target {
    /// The control socket of the one cluster meant.
    pub fn socket(&self) -> Result<PathBuf, ControlError> {
        match self {
            Target::Path(path) => Ok(path.clone()),
            Target::Name(name) => Ok(names::socket_path(name)),
            Target::Unnamed => {
                let dir = names::run_dir();
                let mut running = running_in(&dir);
                match running.len() {
                    0 => Err(ControlError::NoneRunning(dir)),
                    1 => Ok(running.remove(0).0),
                    _ => Err(ControlError::Several(
                        running
                            .into_iter()
                            .map(|(_, status)| status.name.unwrap_or_default())
                            .collect(),
                    )),
                }
            }
        }
    }

    /// Sends `what` to the cluster meant; a name nobody answers for says so.
    fn request(&self, what: &Request, timeout: Duration) -> Result<Reply, ControlError> {
        let path = self.socket()?;
        request(&path, what, timeout).map_err(|error| self.named(error))
    }

    /// `error`, saying that no cluster of the name answers when it is that.
    fn named(&self, error: ControlError) -> ControlError {
        match (self, error) {
            (Target::Name(name), ControlError::Unreachable { path, source }) => {
                ControlError::NoSuchName {
                    name: name.clone(),
                    path,
                    source,
                }
            }
            (_, error) => error,
        }
    }
}

/// The clusters whose control sockets in `dir` answer, with their sockets, by name. Socket
/// files nobody answers on (left by a primary that was killed) are skipped; one that answers
/// wrongly is named on stderr and skipped.
pub fn running_in(dir: &Path) -> Vec<(PathBuf, ClusterStatus)> {
    let mut found = Vec::new();
    for (name, path) in names::socket_files(dir) {
        match request(&path, &Request::Status, LIST_TIMEOUT) {
            Ok(Reply::Status { mut status }) => {
                status.name.get_or_insert_with(|| name.to_string());
                found.push((path, status));
            }
            Ok(_) | Err(ControlError::Unreachable { .. }) => {}
            Err(error) => eprintln!("cluster-lb: warning: skipping {name}: {error}"),
        }
    }
    found
}

/// `cluster-lb status [--json] [--ready]`.
pub fn status(target: &Target, json: bool, ready: bool) -> Result<(), ControlError> {
    let (text, shown) = match target {
        Target::Unnamed => {
            let dir = names::run_dir();
            let clusters: Vec<ClusterStatus> = running_in(&dir)
                .into_iter()
                .map(|(_, status)| status)
                .collect();
            // None running is a failure (exit 1), so that a plain `cluster-lb status` is a
            // health check: the container's probes run it.
            if clusters.is_empty() {
                if json {
                    println!("[]");
                }
                return Err(ControlError::NoneRunning(dir));
            }
            let text = if json {
                to_json(&clusters, &dir)?
            } else {
                list(&clusters)
            };
            (text, clusters)
        }
        one => {
            let status = match one.request(&Request::Status, QUICK_TIMEOUT)? {
                Reply::Status { status } => status,
                other => return Err(unexpected(&one.socket()?, &other)),
            };
            let text = if json {
                to_json(&status, &one.socket()?)?
            } else {
                table(&status)
            };
            (text, vec![status])
        }
    };
    print!("{text}");
    if !ready {
        return Ok(());
    }
    match shown.iter().find(|cluster| !cluster.is_ready()) {
        Some(cluster) => Err(ControlError::NotReady {
            cluster: cluster
                .name
                .clone()
                .unwrap_or_else(|| format!("with primary pid {}", cluster.primary_pid)),
            ready: cluster.ready_of_wanted(),
            wanted: cluster.desired,
        }),
        None => Ok(()),
    }
}

fn to_json(value: &impl serde::Serialize, path: &Path) -> Result<String, ControlError> {
    let mut text = serde_json::to_string_pretty(value).map_err(|e| ControlError::BadAnswer {
        path: path.to_path_buf(),
        detail: e.to_string(),
    })?;
    text.push('\n');
    Ok(text)
}

/// The status of the primary at `path`.
pub fn fetch_status(path: &Path) -> Result<ClusterStatus, ControlError> {
    match request(path, &Request::Status, QUICK_TIMEOUT)? {
        Reply::Status { status } => Ok(status),
        other => Err(unexpected(path, &other)),
    }
}

pub fn reload(target: &Target) -> Result<(), ControlError> {
    say(target.request(&Request::Reload, RELOAD_TIMEOUT)?)
}

pub fn scale(target: &Target, workers: u32) -> Result<(), ControlError> {
    say(target.request(&Request::Scale { workers }, QUICK_TIMEOUT)?)
}

/// Waits for the new binary's answer: its check loads the eBPF programs.
const UPGRADE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

pub fn upgrade(target: &Target) -> Result<(), ControlError> {
    say(target.request(&Request::Upgrade, UPGRADE_TIMEOUT)?)
}

pub fn stop(target: &Target) -> Result<(), ControlError> {
    say(target.request(&Request::Stop, QUICK_TIMEOUT)?)
}

/// `cluster-lb send`: `data` (see [`parse_message`]) to the workers `to` names.
pub fn send(target: &Target, to: Recipients, data: serde_json::Value) -> Result<(), ControlError> {
    say(target.request(&Request::Send { to, data }, QUICK_TIMEOUT)?)
}

/// Why the message given to `cluster-lb send` cannot be sent: a usage error (exit 2).
#[derive(Debug, thiserror::Error)]
pub enum MessageError {
    #[error("the message is not JSON ({0}); give one JSON value, quoted for the shell: cluster-lb send --all '{{\"cmd\":\"reload-config\"}}'")]
    NotJson(serde_json::Error),
    #[error("the message is {0} bytes of JSON; send takes at most {MAX_SEND}")]
    TooLarge(usize),
}

/// The JSON value `cluster-lb send` was given.
pub fn parse_message(text: &str) -> Result<serde_json::Value, MessageError> {
    let data: serde_json::Value = serde_json::from_str(text).map_err(MessageError::NotJson)?;
    let size = data.to_string().len();
    if size > MAX_SEND {
        return Err(MessageError::TooLarge(size));
    }
    Ok(data)
}

/// What `cluster-lb logs` was asked for.
#[derive(Debug, Clone, PartialEq)]
pub struct LogsOptions {
    pub lines: u32,
    pub worker: Option<u32>,
    pub follow: bool,
    pub json: bool,
}

/// `cluster-lb logs`: prints the last lines of the primary's log, and with `follow` every new
/// one until the primary stops (or this process is interrupted). A reader of stdout that goes
/// away (`| head`) ends it quietly.
pub fn logs(target: &Target, options: &LogsOptions) -> Result<(), ControlError> {
    let path = target.socket()?;
    let io = |source: std::io::Error| match source.kind() {
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => ControlError::Timeout {
            path: path.clone(),
            timeout: QUICK_TIMEOUT,
        },
        _ => ControlError::Io {
            path: path.clone(),
            source,
        },
    };
    let mut stream = std::os::unix::net::UnixStream::connect(&path).map_err(|source| {
        target.named(ControlError::Unreachable {
            path: path.clone(),
            source,
        })
    })?;
    // A follower waits for lines as long as they take; a plain request gets them at once.
    let timeout = (!options.follow).then_some(QUICK_TIMEOUT);
    stream.set_read_timeout(timeout).map_err(io)?;
    let request = Request::Logs {
        lines: options.lines,
        worker: options.worker,
        follow: options.follow,
    };
    let mut line = serde_json::to_string(&request).map_err(|e| io(std::io::Error::other(e)))?;
    line.push('\n');
    std::io::Write::write_all(&mut stream, line.as_bytes()).map_err(io)?;
    let mut reader = std::io::BufReader::new(stream);
    let stdout = std::io::stdout();
    let mut answer = String::new();
    loop {
        answer.clear();
        if std::io::BufRead::read_line(&mut reader, &mut answer).map_err(io)? == 0 {
            if options.follow {
                // Killed, or replaced by `cluster-lb upgrade`: the log goes on without us.
                eprintln!(
                    "cluster-lb: the primary at {} closed the log (stopped or upgraded)",
                    path.display()
                );
                return Ok(());
            }
            return Err(io(std::io::ErrorKind::UnexpectedEof.into()));
        }
        let reply: Reply =
            serde_json::from_str(answer.trim()).map_err(|e| ControlError::BadAnswer {
                path: path.clone(),
                detail: e.to_string(),
            })?;
        let printed = match &reply {
            Reply::Log { line } if options.json => serde_json::to_string(line).map(json_safe),
            Reply::Dropped { lines } if options.json => Ok(json_safe(
                serde_json::json!({"dropped": lines, "text": reply.to_string()}).to_string(),
            )),
            Reply::Log { .. } | Reply::Dropped { .. } => Ok(reply.to_string()),
            Reply::End => return Ok(()),
            Reply::Refused { error } => return Err(ControlError::Refused(error.clone())),
            other => return Err(unexpected(&path, other)),
        };
        let printed = printed.map_err(|e| ControlError::BadAnswer {
            path: path.clone(),
            detail: e.to_string(),
        })?;
        let mut out = stdout.lock();
        let written = std::io::Write::write_all(&mut out, printed.as_bytes())
            .and_then(|()| std::io::Write::write_all(&mut out, b"\n"))
            .and_then(|()| std::io::Write::flush(&mut out));
        match written {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => return Ok(()),
            Err(source) => {
                return Err(ControlError::Io {
                    path: PathBuf::from("stdout"),
                    source,
                })
            }
        }
    }
}

/// JSON with the C1 control characters (U+0080 to U+009F, which serde_json leaves as they
/// are, and some terminals obey) escaped too: a worker's text cannot reach the terminal as an
/// escape sequence in --json either. Outside strings JSON is ASCII, so this only touches
/// strings, and the value read back is the same.
fn json_safe(json: String) -> String {
    if !json.chars().any(|c| ('\u{80}'..='\u{9f}').contains(&c)) {
        return json;
    }
    json.chars()
        .map(|c| match c {
            '\u{80}'..='\u{9f}' => format!("\\u{:04x}", c as u32),
            c => c.to_string(),
        })
        .collect()
}

fn say(reply: Reply) -> Result<(), ControlError> {
    println!("{reply}");
    Ok(())
}

fn unexpected(path: &Path, reply: &Reply) -> ControlError {
    ControlError::BadAnswer {
        path: path.to_path_buf(),
        detail: format!("unexpected reply {reply:?}"),
    }
}

/// The human form of a plain `status`: one line per running cluster.
pub fn list(clusters: &[ClusterStatus]) -> String {
    let mut out = format!(
        "{:<24} {:>8} {:>9} {:<11} {:>12}  {}\n",
        "NAME", "PID", "READY", "STRATEGY", "UPTIME", "LISTEN"
    );
    for cluster in clusters {
        let ready = cluster.ready_of_wanted();
        let uptime = humantime::format_duration(Duration::from_secs(cluster.uptime_s as u64));
        out.push_str(&format!(
            "{:<24} {:>8} {:>9} {:<11} {:>12}  {}\n",
            cluster.name.as_deref().unwrap_or("-"),
            cluster.primary_pid,
            format!("{ready}/{}", cluster.desired),
            cluster.strategy,
            uptime.to_string(),
            if cluster.listen.is_empty() {
                "-".to_string()
            } else {
                cluster.listen.join(", ")
            },
        ));
    }
    out
}

/// The human form of `status` for one cluster.
pub fn table(status: &ClusterStatus) -> String {
    let mut out = format!(
        "cluster-lb {}pid {}, strategy {}, listening on {}, {} workers wanted, {} reloads{}\n",
        status
            .name
            .as_ref()
            .map(|name| format!("{name}, "))
            .unwrap_or_default(),
        status.primary_pid,
        status.strategy,
        if status.listen.is_empty() {
            "-".to_string()
        } else {
            status.listen.join(", ")
        },
        status.desired,
        status.reloads,
        if status.reloading { " (reloading)" } else { "" },
    );
    out.push_str(&format!(
        "{:>6} {:>8} {:<9} {:>9} {:>8} {:>10} {:>9} {:>10}\n",
        "WORKER", "PID", "STATE", "UPTIME", "RESTARTS", "SELECTED", "QUEUE", "RSS"
    ));
    let mut workers = status.workers.clone();
    workers.sort_by_key(|w| (w.id, w.pid));
    for w in workers {
        let mut note = String::new();
        if w.stalled {
            note.push_str("  stalled: not accepting, gets no new connections");
        }
        if let Some(why) = &w.retiring {
            note.push_str(&format!("  being replaced: {why}"));
        }
        out.push_str(&format!(
            "{:>6} {:>8} {:<9} {:>8.1}s {:>8} {:>10} {:>9} {:>7.1}MiB{note}\n",
            w.id,
            w.pid,
            w.state,
            w.uptime_s,
            w.restarts,
            w.selected,
            format!("{}/{}", w.queue, w.backlog),
            w.rss_bytes as f64 / (1024.0 * 1024.0)
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_output_escapes_c1_controls_and_reads_back_the_same() {
        let line = serde_json::json!({"text": "a\u{1b}[31m b\u{9b}2J c\u{85}"});
        let printed = json_safe(line.to_string());
        assert!(
            printed.is_ascii() || !printed.contains('\u{9b}'),
            "{printed}"
        );
        assert!(
            !printed.contains('\u{1b}') && !printed.contains('\u{85}'),
            "{printed}"
        );
        assert!(printed.contains(r"\u009b"), "{printed}");
        let back: serde_json::Value = serde_json::from_str(&printed).unwrap();
        assert_eq!(back, line);
    }

    #[test]
    fn a_message_must_be_one_json_value_of_bounded_size() {
        assert_eq!(
            parse_message(r#" {"cmd": "reload-config"} "#).unwrap(),
            serde_json::json!({"cmd": "reload-config"})
        );
        assert_eq!(parse_message("42").unwrap(), serde_json::json!(42));
        for bad in ["", "{cmd: 1}", "hello", r#"{"a":1} {"b":2}"#, "{\n\"a\":"] {
            let error = parse_message(bad).unwrap_err().to_string();
            assert!(error.starts_with("the message is not JSON ("), "{error}");
            assert!(!error.contains('\n'), "one line: {error}");
        }
        let long = serde_json::Value::from("x".repeat(MAX_SEND)).to_string();
        let error = parse_message(&long).unwrap_err().to_string();
        assert!(error.contains("send takes at most"), "{error}");
    }
}
