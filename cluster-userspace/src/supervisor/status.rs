//! A snapshot of the cluster for `cluster-lb status` and the metrics endpoint.

use serde::{Deserialize, Serialize};

/// One running worker process.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct WorkerStatus {
    pub id: u32,
    pub pid: i32,
    /// starting, ready or draining.
    pub state: String,
    pub uptime_s: f64,
    /// Restarts of this worker id so far.
    pub restarts: u32,
    /// New connections the kernel program gave this process (all listen groups).
    pub selected: u64,
    pub fallback: u64,
    pub migrated: u64,
    /// Resident memory in bytes (0 when unknown).
    pub rss_bytes: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ClusterStatus {
    pub primary_pid: u32,
    pub strategy: String,
    pub listen: Vec<String>,
    /// Workers wanted (scale).
    pub desired: u32,
    pub reloads: u64,
    pub reloading: bool,
    pub workers: Vec<WorkerStatus>,
}

/// Resident set size of `pid`, from /proc/PID/statm (pages).
pub fn rss_bytes(pid: i32) -> u64 {
    let page = nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
        .ok()
        .flatten()
        .unwrap_or(4096) as u64;
    std::fs::read_to_string(format!("/proc/{pid}/statm"))
        .ok()
        .and_then(|statm| statm.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map_or(0, |pages| pages * page)
}
