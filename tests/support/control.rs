//! A client of a primary's control socket (one JSON request line, one JSON reply line), written
//! from docs/ARCHITECTURE.md's description as any tool would write one, without the cluster-lb
//! crate: the tests read the status a user's script reads, field by field, so a renamed field
//! fails them, and xtask (which uses this crate) builds without the eBPF object.

use std::{
    collections::BTreeSet,
    io::{BufRead, BufReader, Write},
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{anyhow, bail, Context, Result};
use serde::Deserialize;
use serde_json::{json, Value};

/// A worker's state, as `status` shows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum WorkerState {
    Starting,
    Online,
    Ready,
    Draining,
    Killed,
}

/// One worker process of a status reply.
#[derive(Clone, Debug, PartialEq, Deserialize)]
pub struct WorkerStatus {
    pub id: u32,
    pub pid: i32,
    pub state: WorkerState,
    pub uptime_s: f64,
    pub restarts: u32,
    pub selected: u64,
    pub fallback: u64,
    pub migrated: u64,
    pub open: u64,
    pub rss_bytes: u64,
    /// Connections waiting in its accept queues, and the most they hold.
    pub queue: u64,
    pub backlog: u64,
    pub stalled: bool,
    /// Why it is being replaced while it serves (`{"reason": "memory", ...}`), if it is.
    #[serde(default)]
    pub retiring: Option<serde_json::Value>,
}

/// A status reply.
#[derive(Clone, Debug, PartialEq, Deserialize)]
pub struct ClusterStatus {
    #[serde(default)]
    pub name: Option<String>,
    pub primary_pid: u32,
    pub version: String,
    pub uptime_s: f64,
    pub strategy: String,
    pub listen: Vec<String>,
    pub desired: u32,
    #[serde(default)]
    pub wanted_ids: Vec<u32>,
    /// The program's own primary process (a Node program's primary branch).
    #[serde(default)]
    pub program_primary: Option<ProgramPrimary>,
    pub reloads: u64,
    pub reloading: bool,
    pub workers: Vec<WorkerStatus>,
}

#[derive(Clone, Debug, PartialEq, Deserialize)]
pub struct ProgramPrimary {
    pub pid: i32,
}

impl ClusterStatus {
    /// Whether worker `id` is wanted.
    pub fn wants(&self, id: u32) -> bool {
        if self.wanted_ids.is_empty() {
            id < self.desired
        } else {
            self.wanted_ids.contains(&id)
        }
    }

    /// How many of the wanted worker ids have a ready process.
    pub fn ready_of_wanted(&self) -> u32 {
        let ready: BTreeSet<u32> = self
            .workers
            .iter()
            .filter(|w| w.state == WorkerState::Ready && self.wants(w.id))
            .map(|w| w.id)
            .collect();
        ready.len() as u32
    }
}

/// Sends `request` (e.g. `{"cmd": "reload"}`) and returns the reply; a refusal is an error that
/// says why.
pub fn request(path: &Path, request: &Value, timeout: Duration) -> Result<Value> {
    let mut stream = UnixStream::connect(path)
        .with_context(|| format!("connecting to the control socket {}", path.display()))?;
    stream.set_read_timeout(Some(timeout))?;
    stream.write_all(format!("{request}\n").as_bytes())?;
    let mut line = String::new();
    BufReader::new(stream)
        .read_line(&mut line)
        .with_context(|| format!("the answer to {request} from {}", path.display()))?;
    let reply: Value = serde_json::from_str(line.trim())
        .with_context(|| format!("an answer that is not JSON: {line:?}"))?;
    if reply["reply"] == "refused" {
        bail!("{}", reply["error"].as_str().unwrap_or("refused"));
    }
    Ok(reply)
}

/// The status of the primary at `path`.
pub fn fetch_status(path: &Path) -> Result<ClusterStatus> {
    let reply = request(path, &json!({"cmd": "status"}), Duration::from_secs(5))?;
    let status = reply
        .get("status")
        .ok_or_else(|| anyhow!("a status request answered {reply}"))?;
    Ok(ClusterStatus::deserialize(status)?)
}

/// Every cluster whose control socket is in `dir` and answers (`NAME.sock`), with its status.
pub fn running_in(dir: &Path) -> Vec<(PathBuf, ClusterStatus)> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut found: Vec<(PathBuf, ClusterStatus)> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "sock"))
        .filter_map(|path| {
            let mut status = fetch_status(&path).ok()?;
            // A named cluster's name is its socket's (the primary says it too).
            if status.name.is_none() {
                status.name = path.file_stem().map(|s| s.to_string_lossy().into_owned());
            }
            Some((path, status))
        })
        .collect();
    found.sort_by(|a, b| a.0.cmp(&b.0));
    found
}

/// The directory of named control sockets, for a test that runs its own (`cluster-lb`'s
/// `CLUSTER_LB_RUN_DIR`).
pub const RUN_DIR_ENV: &str = "CLUSTER_LB_RUN_DIR";
