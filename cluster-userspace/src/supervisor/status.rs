//! A snapshot of the cluster for `cluster-lb status` and the metrics endpoint.

use serde::{Deserialize, Serialize};

use super::{
    lifecycle::{Retire, WorkerState},
    Supervisor,
};

/// One running worker process.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct WorkerStatus {
    pub id: u32,
    pub pid: i32,
    pub state: WorkerState,
    pub uptime_s: f64,
    /// Restarts of this worker id so far.
    pub restarts: u32,
    /// New connections the kernel program gave this process (all listen groups).
    pub selected: u64,
    pub fallback: u64,
    pub migrated: u64,
    /// Connections open on it now, as the least-loaded counter sees them (0 otherwise).
    #[serde(default)]
    pub open: u64,
    /// Resident memory in bytes (0 when unknown).
    pub rss_bytes: u64,
    /// Connections waiting in its accept queues now: established by the kernel, not yet
    /// accepted by the worker (the figure that says it is behind).
    #[serde(default)]
    pub queue: u64,
    /// The most its accept queues hold (listen backlog); 0 when unknown.
    #[serde(default)]
    pub backlog: u64,
    /// Out of the active set because its accept queue stopped draining.
    #[serde(default)]
    pub stalled: bool,
    /// Why it is being replaced while it serves (hung, memory, connections, age).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retiring: Option<Retire>,
}

/// The program's primary process.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ProgramPrimaryStatus {
    pub pid: i32,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ClusterStatus {
    /// The cluster's name (`cluster-lb run --name`); set by the control socket, which is what
    /// names a cluster, so an embedded supervisor has none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub primary_pid: u32,
    /// The primary's version (it changes with `cluster-lb upgrade`; the pid does not).
    #[serde(default)]
    pub version: String,
    /// Seconds since the primary started.
    #[serde(default)]
    pub uptime_s: f64,
    pub strategy: String,
    pub listen: Vec<String>,
    /// Workers wanted (scale).
    pub desired: u32,
    /// Their ids (0 to desired - 1, or from 1 for Node programs, whose primary may also
    /// leave gaps); empty from an older binary, meaning 0 to desired - 1.
    #[serde(default)]
    pub wanted_ids: Vec<u32>,
    /// The program's own primary process (a Node program's primary branch), when one runs.
    #[serde(default)]
    pub program_primary: Option<ProgramPrimaryStatus>,
    pub reloads: u64,
    pub reloading: bool,
    pub workers: Vec<WorkerStatus>,
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

    /// How many of the wanted worker ids have a ready process. During a
    /// rolling reload an id's old process stays ready until its replacement is, so this stays
    /// at `desired`; an id whose only process is starting, draining or gone does not count.
    pub fn ready_of_wanted(&self) -> u32 {
        let ready: std::collections::BTreeSet<u32> = self
            .workers
            .iter()
            .filter(|w| w.state == WorkerState::Ready && self.wants(w.id))
            .map(|w| w.id)
            .collect();
        ready.len() as u32
    }

    /// Every wanted worker is ready: what a readiness probe asks (`status --ready`).
    pub fn is_ready(&self) -> bool {
        self.ready_of_wanted() == self.desired
    }
}

impl Supervisor {
    pub(super) fn status(&self) -> ClusterStatus {
        // The health sampler's last reading (at most 100 ms old): status costs no dump.
        let queues = self.health.last_queues();
        let workers = self
            .lifecycle
            .processes()
            .map(|process| {
                let mut stats = cluster_common::SlotStats::default();
                let mut open = 0;
                if let Some(worker) = self.workers.get(process.pid) {
                    for balancer in self.groups.iter().filter_map(|g| g.balancer.as_ref()) {
                        if let Ok(slot) = balancer.slot_stats(worker.slot()) {
                            stats = crate::kernel::add_stats(stats, &slot);
                        }
                        open += balancer.open_connections(worker.slot());
                    }
                }
                let waiting = self.queues_of(process.pid, queues);
                WorkerStatus {
                    id: process.id,
                    pid: process.pid.as_raw(),
                    state: process.state(),
                    uptime_s: process.started.elapsed().as_secs_f64(),
                    restarts: self.lifecycle.restarts(process.id),
                    selected: stats.selected,
                    fallback: stats.fallback,
                    migrated: stats.migrated,
                    open,
                    rss_bytes: crate::sys::procfs::rss_bytes(process.pid.as_raw()),
                    queue: waiting.queue,
                    backlog: waiting.backlog,
                    stalled: process.is_stalled(),
                    retiring: process.retiring(),
                }
            })
            .collect();
        ClusterStatus {
            name: None,
            primary_pid: std::process::id(),
            version: crate::version::version().to_string(),
            uptime_s: self.origin.started.elapsed().as_secs_f64(),
            strategy: self.groups.strategy_in_effect().to_string(),
            listen: self.groups.listen_names(),
            desired: self.lifecycle.wanted(),
            wanted_ids: self.lifecycle.wanted_ids().collect(),
            program_primary: self
                .lifecycle
                .primary_pid()
                .map(|pid| ProgramPrimaryStatus { pid: pid.as_raw() }),
            reloads: self.lifecycle.reloads(),
            reloading: self.lifecycle.is_reloading(),
            workers,
        }
    }
}

/// Statuses for unit tests (status, metrics, top), which set only the fields they look at.
#[cfg(test)]
pub(crate) mod fixture {
    use super::*;

    /// Worker `id`, process `pid`, in `state`, up 1 s, every counter 0.
    pub fn worker(id: u32, pid: i32, state: WorkerState) -> WorkerStatus {
        WorkerStatus {
            id,
            pid,
            state,
            uptime_s: 1.0,
            restarts: 0,
            selected: 0,
            fallback: 0,
            migrated: 0,
            open: 0,
            rss_bytes: 0,
            queue: 0,
            backlog: 0,
            stalled: false,
            retiring: None,
        }
    }

    /// An unnamed round-robin cluster of version 0.1.0 on 127.0.0.1:8080, up 1 s, no reload.
    pub fn cluster(desired: u32, workers: Vec<WorkerStatus>) -> ClusterStatus {
        ClusterStatus {
            name: None,
            primary_pid: 1,
            version: "0.1.0".into(),
            uptime_s: 1.0,
            strategy: "round-robin".into(),
            listen: vec!["127.0.0.1:8080".into()],
            desired,
            wanted_ids: Vec::new(),
            program_primary: None,
            reloads: 0,
            reloading: false,
            workers,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::fixture::{cluster, worker};
    use super::*;

    #[test]
    fn ready_counts_each_wanted_id_once() {
        use WorkerState::*;
        // A reload: id 0 has its old (ready) and new (starting) process, id 1 two ready ones.
        let reloading = cluster(
            2,
            vec![
                worker(0, 10, Ready),
                worker(0, 20, Starting),
                worker(1, 11, Ready),
                worker(1, 21, Ready),
            ],
        );
        assert_eq!(reloading.ready_of_wanted(), 2);
        assert!(reloading.is_ready());
        // Id 1 restarting; id 2 ready but no longer wanted (scaled down, draining soon).
        let restarting = cluster(
            2,
            vec![
                worker(0, 10, Ready),
                worker(1, 22, Starting),
                worker(2, 12, Ready),
            ],
        );
        assert_eq!(restarting.ready_of_wanted(), 1);
        assert!(!restarting.is_ready());
        assert!(!cluster(3, vec![worker(0, 10, Draining), worker(1, 11, Online)]).is_ready());
    }
}
