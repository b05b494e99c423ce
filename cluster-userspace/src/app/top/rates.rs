//! Turns successive status snapshots into per-worker rates: new connections per second (from
//! the kernel program's per-slot counter that `status` reports) and CPU use (from /proc), each
//! divided by the real time between the two samples, not by the nominal refresh interval.

use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

use super::procfs::{self, ProcSample};
use crate::supervisor::{ClusterStatus, WorkerState};

/// One line of the view.
#[derive(Clone, Debug, PartialEq)]
pub struct Row {
    pub id: u32,
    pub pid: i32,
    pub state: WorkerState,
    /// None on a worker's first sample: a rate needs two.
    pub conns_per_s: Option<f64>,
    /// New connections the kernel gave this process since it started.
    pub selected: u64,
    /// Connections waiting in its accept queues.
    pub queue: u64,
    /// Out of the active set: its queue stopped draining.
    pub stalled: bool,
    pub restarts: u32,
    pub rss_bytes: u64,
    pub cpu_percent: Option<f64>,
    pub uptime_s: f64,
}

#[derive(Clone, Copy)]
struct Previous {
    at: Instant,
    selected: u64,
    cpu: Option<Duration>,
}

/// Remembers each worker process's last sample. Keyed by pid: a restarted worker is a new
/// process with a fresh counter, so it starts without a rate rather than with a negative one.
#[derive(Default)]
pub struct Sampler {
    previous: HashMap<i32, Previous>,
}

impl Sampler {
    /// The rows for `status`, fetched at `at`; `read_proc` gives a process's /proc sample
    /// (`procfs::read` outside tests).
    pub fn rows(
        &mut self,
        status: &ClusterStatus,
        at: Instant,
        read_proc: impl Fn(i32) -> Option<ProcSample>,
    ) -> Vec<Row> {
        let mut rows = Vec::with_capacity(status.workers.len());
        let mut seen = HashMap::with_capacity(status.workers.len());
        for worker in &status.workers {
            let proc = read_proc(worker.pid);
            let previous = self.previous.get(&worker.pid).copied();
            let elapsed = previous.map(|p| at.saturating_duration_since(p.at));
            let conns_per_s = match (previous, elapsed) {
                (Some(p), Some(elapsed)) if !elapsed.is_zero() => worker
                    .selected
                    .checked_sub(p.selected)
                    .map(|new| new as f64 / elapsed.as_secs_f64()),
                _ => None,
            };
            let cpu_percent = match (previous.and_then(|p| p.cpu), proc, elapsed) {
                (Some(before), Some(now), Some(elapsed)) => {
                    procfs::cpu_percent(before, now.cpu, elapsed)
                }
                _ => None,
            };
            rows.push(Row {
                id: worker.id,
                pid: worker.pid,
                state: worker.state,
                conns_per_s,
                selected: worker.selected,
                queue: worker.queue,
                stalled: worker.stalled,
                restarts: worker.restarts,
                // The primary's own reading when this process cannot see the worker's /proc
                // (another pid namespace).
                rss_bytes: proc.map_or(worker.rss_bytes, |p| p.rss_bytes),
                cpu_percent,
                uptime_s: worker.uptime_s,
            });
            seen.insert(
                worker.pid,
                Previous {
                    at,
                    selected: worker.selected,
                    cpu: proc.map(|p| p.cpu),
                },
            );
        }
        // Forget processes that are gone, so the map stays as small as the cluster.
        self.previous = seen;
        rows.sort_by_key(|row| (row.id, row.pid));
        rows
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::supervisor::{fixture, WorkerStatus};

    fn worker(id: u32, pid: i32, selected: u64, restarts: u32) -> WorkerStatus {
        WorkerStatus {
            restarts,
            selected,
            rss_bytes: 7,
            ..fixture::worker(id, pid, WorkerState::Ready)
        }
    }

    fn status(workers: Vec<WorkerStatus>) -> ClusterStatus {
        fixture::cluster(workers.len() as u32, workers)
    }

    fn cpu(ms: u64) -> Option<ProcSample> {
        Some(ProcSample {
            rss_bytes: 4096,
            cpu: Duration::from_millis(ms),
        })
    }

    #[test]
    fn rates_need_two_samples_and_use_the_real_elapsed_time() {
        let mut sampler = Sampler::default();
        let start = Instant::now();
        let first = sampler.rows(&status(vec![worker(0, 10, 100, 0)]), start, |_| cpu(0));
        assert_eq!(first[0].conns_per_s, None);
        assert_eq!(first[0].cpu_percent, None);
        // 1.25 s later (a slow refresh): 250 new connections is 200/s, not 250/s.
        let later = start + Duration::from_millis(1250);
        let second = sampler.rows(&status(vec![worker(0, 10, 350, 0)]), later, |_| cpu(625));
        assert_eq!(second[0].conns_per_s, Some(200.0));
        assert_eq!(second[0].cpu_percent, Some(50.0));
        assert_eq!(second[0].rss_bytes, 4096);
    }

    #[test]
    fn a_replaced_process_starts_over_without_a_rate() {
        let mut sampler = Sampler::default();
        let start = Instant::now();
        sampler.rows(&status(vec![worker(0, 10, 500, 0)]), start, |_| cpu(0));
        let rows = sampler.rows(
            &status(vec![worker(0, 11, 3, 1)]),
            start + Duration::from_secs(1),
            |_| cpu(0),
        );
        assert_eq!((rows[0].pid, rows[0].restarts), (11, 1));
        assert_eq!(rows[0].conns_per_s, None);
    }

    #[test]
    fn rows_are_sorted_by_worker_id_and_proc_falls_back_to_status() {
        let mut sampler = Sampler::default();
        let rows = sampler.rows(
            &status(vec![
                worker(2, 30, 0, 0),
                worker(0, 10, 0, 0),
                worker(1, 20, 0, 0),
            ]),
            Instant::now(),
            |_| None,
        );
        let ids: Vec<u32> = rows.iter().map(|r| r.id).collect();
        assert_eq!(ids, [0, 1, 2]);
        assert!(rows
            .iter()
            .all(|r| r.rss_bytes == 7 && r.cpu_percent.is_none()));
    }
}
