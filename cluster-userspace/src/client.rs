//! The `status`, `reload`, `scale` and `stop` subcommands: talk to a running primary over its
//! control socket and print what it says.

use std::{path::Path, time::Duration};

use crate::{
    control::{request, ControlError, Reply, Request},
    supervisor::ClusterStatus,
};

/// A reload waits for every replacement to become ready, so it may take a while.
const RELOAD_TIMEOUT: Duration = Duration::from_secs(600);
const QUICK_TIMEOUT: Duration = Duration::from_secs(10);

pub fn status(path: &Path, json: bool) -> Result<(), ControlError> {
    let status = fetch_status(path)?;
    if json {
        let text = serde_json::to_string_pretty(&status).map_err(|e| ControlError::BadAnswer {
            path: path.to_path_buf(),
            detail: e.to_string(),
        })?;
        println!("{text}");
    } else {
        print!("{}", table(&status));
    }
    Ok(())
}

/// The status of the primary at `path`.
pub fn fetch_status(path: &Path) -> Result<ClusterStatus, ControlError> {
    match request(path, &Request::Status, QUICK_TIMEOUT)? {
        Reply::Status { status } => Ok(status),
        other => Err(unexpected(path, &other)),
    }
}

pub fn reload(path: &Path) -> Result<(), ControlError> {
    say(request(path, &Request::Reload, RELOAD_TIMEOUT)?)
}

pub fn scale(path: &Path, workers: u32) -> Result<(), ControlError> {
    say(request(path, &Request::Scale { workers }, QUICK_TIMEOUT)?)
}

pub fn stop(path: &Path) -> Result<(), ControlError> {
    say(request(path, &Request::Stop, QUICK_TIMEOUT)?)
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

/// The human form of `status`.
pub fn table(status: &ClusterStatus) -> String {
    let mut out = format!(
        "cluster-lb pid {}, strategy {}, listening on {}, {} workers wanted, {} reloads{}\n",
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
        "{:>6} {:>8} {:<9} {:>9} {:>8} {:>10} {:>10}\n",
        "WORKER", "PID", "STATE", "UPTIME", "RESTARTS", "SELECTED", "RSS"
    ));
    let mut workers = status.workers.clone();
    workers.sort_by_key(|w| (w.id, w.pid));
    for w in workers {
        out.push_str(&format!(
            "{:>6} {:>8} {:<9} {:>8.1}s {:>8} {:>10} {:>7.1}MiB\n",
            w.id,
            w.pid,
            w.state,
            w.uptime_s,
            w.restarts,
            w.selected,
            w.rss_bytes as f64 / (1024.0 * 1024.0)
        ));
    }
    out
}
