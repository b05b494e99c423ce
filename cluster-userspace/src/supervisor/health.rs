//! Self-healing, the shell's half: what the kernel and /proc say about each worker, measured
//! without the worker's cooperation, becomes the lifecycle's `Stalled`, `Unstalled`, `Retire`
//! and `KillNow` (what follows from them is `lifecycle::health`'s).
//!
//! - A hung worker is found from its accept queue: every [`SAMPLE_EVERY`], sock_diag gives the
//!   queue of each listening socket the worker was given, and the eBPF program's counter says
//!   how many connections the kernel gave it. If connections wait and it accepted none of them
//!   (the given count grew no less than the queue did) for [`STALL_AFTER`], it is stalled: out
//!   of the active set, so it gets nothing new, and back as soon as it accepts again. Stalled
//!   for `--hang-timeout`, it is hung: replaced, then killed, and what was queued on it moves
//!   to live workers (SELECT_OR_MIGRATE, with net.ipv4.tcp_migrate_req set at start). A slow
//!   worker that accepts now and then is never hung: only one that accepts nothing at all.
//! - Every [`LIMITS_EVERY`]: its memory (PSS, so copy-on-write pages shared with its siblings
//!   count once over all of them), the connections the kernel gave it since it started, and
//!   its age, against `--max-memory`, `--max-memory-hard`, `--max-connections` and
//!   `--max-age` (the last two with a random jitter per worker, so workers started together do
//!   not all reach their limit together).
//!
//! With `--watchdog`, workers get WATCHDOG_USEC and a ready one that sends no WATCHDOG=1 to
//! NOTIFY_SOCKET for that long is hung too (systemd's protocol, for programs that ping).
//!
//! Each round also hands connections that wait in the idle reserve (see
//! `workers::reserve`) to the workers.
//!
//! UDP groups are not watched for hangs: a datagram socket has no accept queue, and its receive
//! queue holds bytes, not connections, so "accepted none" has no kernel figure to read.

use std::{
    collections::HashMap,
    hash::{BuildHasher, Hasher},
    time::{Duration, Instant},
};

use nix::unistd::Pid;

use super::{
    lifecycle::{Retire, WorkerState},
    Input, KillReason, Supervisor,
};
use crate::sys::procfs;

/// How often accept queues are read (always: the reserve is watched too; one sock_diag dump
/// of the listening sockets, which costs the same however many connections the host has).
pub const SAMPLE_EVERY: Duration = Duration::from_millis(100);
/// How long a worker may leave connections waiting without accepting any before it gets no
/// new ones: long enough that a pause of a few hundred milliseconds (a GC, a slow request on
/// an event loop, a busy host's scheduler) costs nothing, short enough that a hung worker is
/// given few connections (and those move to live workers when it is killed).
pub const STALL_AFTER: Duration = Duration::from_secs(1);
/// How often the accept queues are read from /proc/net/tcp where sock_diag is missing (it
/// lists every connection of the namespace, so it is not read every sample).
pub const PROC_QUEUES_EVERY: Duration = Duration::from_secs(2);
/// How often memory, connection counts and ages are compared with their limits.
pub const LIMITS_EVERY: Duration = Duration::from_secs(1);
/// `--hang-timeout`'s default: gunicorn's `--timeout`. Only a worker that accepts nothing for
/// that long while connections wait is hung, however slow its requests are; 30 s outlasts a
/// major GC of a large heap or a long synchronous request, and is shorter than the timeouts
/// of the clients and proxies in front (browsers, nginx's and cloud balancers' 60 s).
pub const DEFAULT_HANG_TIMEOUT: Duration = Duration::from_secs(30);

/// The limits a worker is held to (`run --hang-timeout`, `--max-memory`...).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct HealthLimits {
    /// `None`: hangs are not looked for.
    pub hang_timeout: Option<Duration>,
    /// PSS in bytes above which a worker is replaced (its replacement ready first).
    pub max_memory: Option<u64>,
    /// PSS in bytes above which a worker is killed at once.
    pub max_memory_hard: Option<u64>,
    pub max_connections: Option<u64>,
    pub max_age: Option<Duration>,
    /// Each worker's connection and age limits are this fraction higher at most, at random.
    pub jitter: f64,
    /// Workers get WATCHDOG_USEC and must send WATCHDOG=1 at least this often once ready
    /// (systemd's watchdog protocol), or they are hung.
    pub watchdog: Option<Duration>,
}

impl Default for HealthLimits {
    fn default() -> HealthLimits {
        HealthLimits {
            hang_timeout: Some(DEFAULT_HANG_TIMEOUT),
            max_memory: None,
            max_memory_hard: None,
            max_connections: None,
            max_age: None,
            jitter: 0.1,
            watchdog: None,
        }
    }
}

impl HealthLimits {
    /// Whether a limit other than the hang timeout is set.
    fn limited(&self) -> bool {
        self.watchdog.is_some()
            || self.max_memory.is_some()
            || self.max_memory_hard.is_some()
            || self.max_connections.is_some()
            || self.max_age.is_some()
    }

    /// When a worker is stalled: [`STALL_AFTER`], or sooner under a shorter hang timeout.
    fn stall_after(&self) -> Option<Duration> {
        self.hang_timeout.map(|hang| STALL_AFTER.min(hang / 2))
    }
}

/// What a worker's accept queues say, sample after sample.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Steady,
    /// Connections wait and it accepted none for the stall threshold.
    Stalled,
    /// A stalled worker accepted again (or its queue emptied).
    Unstalled,
    /// Stalled for the hang timeout: for this long.
    Hung(Duration),
}

/// One worker's accept queues over time. Pure: the sampler feeds it what it read.
#[derive(Clone, Debug, Default)]
pub struct QueueWatch {
    /// The last sample: connections the kernel gave it so far, and those waiting.
    last: Option<(u64, u64)>,
    /// Since when connections wait and none was accepted.
    stuck_since: Option<Instant>,
    stalled: bool,
    hung: bool,
}

impl QueueWatch {
    /// One sample at `now`: `given` connections so far (the program's count; it only grows),
    /// `queue` waiting now.
    pub fn observe(
        &mut self,
        now: Instant,
        given: u64,
        queue: u64,
        stall_after: Duration,
        hang_after: Duration,
    ) -> Verdict {
        let (last_given, last_queue) = self.last.replace((given, queue)).unwrap_or((given, 0));
        // What arrived is what was given since; what left the queue was accepted (or gave
        // up). A queue that shrank is progress even when the count missed arrivals (a
        // connection that came by the kernel's own fallback is not counted).
        let arrived = given.saturating_sub(last_given);
        let accepted = (last_queue + arrived).saturating_sub(queue);
        if queue == 0 || accepted > 0 {
            self.stuck_since = None;
            self.hung = false;
            if std::mem::take(&mut self.stalled) {
                return Verdict::Unstalled;
            }
            return Verdict::Steady;
        }
        let since = *self.stuck_since.get_or_insert(now);
        let stuck = now.saturating_duration_since(since);
        if stuck >= hang_after && !self.hung {
            self.hung = true;
            self.stalled = true;
            return Verdict::Hung(stuck);
        }
        if stuck >= stall_after && !self.stalled {
            self.stalled = true;
            return Verdict::Stalled;
        }
        Verdict::Steady
    }
}

/// What the sampler keeps for one worker process.
#[derive(Debug)]
struct Watched {
    queue: QueueWatch,
    /// The kernel's count of connections given to its slot when it was first seen (a slot's
    /// counters may have served an earlier process).
    baseline: Option<u64>,
    /// Its own limits, jitter applied.
    max_connections: Option<u64>,
    max_age: Option<Duration>,
    /// A limit was reported (the lifecycle replaces it; it is not reported again).
    reported: bool,
    /// Its last WATCHDOG=1, or when it was first seen ready.
    alive_at: Option<Instant>,
}

/// The sampler's state: every worker it watches, and its last readings for status.
#[derive(Debug)]
pub struct Health {
    pub limits: HealthLimits,
    watched: HashMap<Pid, Watched>,
    limits_checked: Option<Instant>,
    migrate_set: bool,
    /// The accept queues last read (status shows them), when, and whether from /proc.
    queues: Option<(Instant, Listeners, bool)>,
    /// When sock_diag last failed. Each failed request makes the kernel try to load the
    /// inet_diag module, running modprobe and waiting for it: asked every sample, that would
    /// keep the primary busy, so it is asked again only after [`DIAG_RETRY`].
    diag_failed: Option<Instant>,
}

/// How long after a failure sock_diag is not asked again.
const DIAG_RETRY: Duration = Duration::from_secs(60);

type Listeners = HashMap<u64, crate::sys::diag::Listener>;

impl Health {
    pub fn new(limits: HealthLimits) -> Health {
        Health {
            limits,
            watched: HashMap::new(),
            limits_checked: None,
            migrate_set: false,
            queues: None,
            diag_failed: None,
        }
    }

    /// Reads every listener's accept queue: sock_diag each time, /proc/net/tcp at most every
    /// [`PROC_QUEUES_EVERY`] where sock_diag is missing. Whether this round read them afresh.
    fn read_queues(&mut self, now: Instant) -> bool {
        let ask_diag = self
            .diag_failed
            .is_none_or(|at| now.duration_since(at) >= DIAG_RETRY);
        let diag = ask_diag.then(procfs::accept_queues).flatten();
        let fresh = match diag {
            Some(found) => {
                self.diag_failed = None;
                Some((now, found, false))
            }
            None => {
                if ask_diag {
                    self.diag_failed = Some(now);
                }
                match &self.queues {
                    Some((at, _, true)) if now.duration_since(*at) < PROC_QUEUES_EVERY => None,
                    _ => procfs::accept_queues_from_proc().map(|found| (now, found, true)),
                }
            }
        };
        let read = fresh.is_some();
        if read {
            self.queues = fresh;
        }
        read
    }

    /// The accept queues the sampler read last (at most a sample old).
    pub fn last_queues(&self) -> Option<&Listeners> {
        self.queues.as_ref().map(|(_, found, _)| found)
    }

    fn watch(&mut self, pid: Pid) -> &mut Watched {
        let limits = self.limits;
        self.watched.entry(pid).or_insert_with(|| Watched {
            queue: QueueWatch::default(),
            baseline: None,
            max_connections: limits
                .max_connections
                .map(|n| (n as f64 * (1.0 + limits.jitter * random_fraction())) as u64),
            max_age: limits
                .max_age
                .map(|age| age.mul_f64(1.0 + limits.jitter * random_fraction())),
            reported: false,
            alive_at: None,
        })
    }

    /// A worker sent WATCHDOG=1.
    pub fn watchdog_ping(&mut self, pid: Pid) {
        if self.limits.watchdog.is_some() {
            self.watch(pid).alive_at = Some(Instant::now());
        }
    }
}

/// A random number in [0, 1): the standard library's per-process random hash keys, which is
/// plenty for spreading limits.
fn random_fraction() -> f64 {
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u64(0);
    (hasher.finish() >> 11) as f64 / (1u64 << 53) as f64
}

/// The connections the kernel gave each worker so far, and what its sockets hold now.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Queues {
    pub given: u64,
    /// Connections waiting in its TCP accept queues.
    pub queue: u64,
    /// The most they hold (the listen backlogs, summed).
    pub backlog: u64,
    /// Whether it has a TCP listening socket the kernel reported.
    pub listening: bool,
}

impl Supervisor {
    /// The connections given to `pid` and its accept queues, from `found` (one sock_diag dump).
    pub(super) fn queues_of(
        &self,
        pid: Pid,
        found: Option<&HashMap<u64, crate::sys::diag::Listener>>,
    ) -> Queues {
        let mut queues = Queues::default();
        let Some(worker) = self.workers.get(pid) else {
            return queues;
        };
        for balancer in self.groups.iter().filter_map(|g| g.balancer.as_ref()) {
            if let Ok(stats) = balancer.slot_stats(worker.slot()) {
                queues.given += stats.selected;
            }
        }
        for (inode, addr) in &worker.claims.given {
            if addr.is_udp() {
                continue;
            }
            if let Some(listener) = found.and_then(|f| f.get(inode)) {
                queues.queue += u64::from(listener.queue);
                queues.backlog += u64::from(listener.backlog);
                queues.listening = true;
            }
        }
        queues
    }

    /// One round of the sampler (every [`SAMPLE_EVERY`] when a limit is set).
    pub(super) fn sample_health(&mut self) {
        let limits = self.health.limits;
        if !self.health.migrate_set {
            self.health.migrate_set = true;
            // Both the reserve and hung workers' queues move by migration; without a program
            // (strategy kernel) nothing would pick where to.
            if self.groups.iter().any(|g| g.balancer.is_some()) {
                enable_migration();
            }
        }
        let now = Instant::now();
        let watched: Vec<(Pid, WorkerState, Instant)> = self
            .lifecycle
            .processes()
            .filter(|p| {
                matches!(
                    p.state(),
                    WorkerState::Starting | WorkerState::Online | WorkerState::Ready
                )
            })
            .map(|p| (p.pid, p.state(), p.started))
            .collect();
        self.health
            .watched
            .retain(|pid, _| watched.iter().any(|(p, ..)| p == pid));
        // Queues are compared sample to sample only when read afresh: a stale reading next to
        // a growing count would look like accepts.
        let fresh = self.health.read_queues(now);
        let found = self.health.last_queues().cloned();
        if let Some(found) = &found {
            let waiting = |inode| found.get(&inode).is_some_and(|l| l.queue > 0);
            self.workers.drain_reserve_if(waiting, &mut self.groups);
        }
        let check_limits = limits.limited()
            && self
                .health
                .limits_checked
                .is_none_or(|at| now.duration_since(at) >= LIMITS_EVERY);
        if check_limits {
            self.health.limits_checked = Some(now);
        }
        let mut inputs = Vec::new();
        for (pid, state, started) in watched {
            let queues = self.queues_of(pid, found.as_ref());
            let watch = self.health.watch(pid);
            let baseline = *watch.baseline.get_or_insert(queues.given);
            if state != WorkerState::Ready {
                continue;
            }
            if let (Some(hang), true, true) = (limits.hang_timeout, queues.listening, fresh) {
                let stall = limits.stall_after().unwrap_or(STALL_AFTER);
                match watch
                    .queue
                    .observe(now, queues.given, queues.queue, stall, hang)
                {
                    Verdict::Steady => {}
                    Verdict::Stalled => inputs.push(Input::Stalled { pid }),
                    Verdict::Unstalled => inputs.push(Input::Unstalled { pid }),
                    Verdict::Hung(stalled) => inputs.push(Input::Retire {
                        pid,
                        why: Retire::Hung { stalled },
                    }),
                }
            }
            if let (Some(watchdog), false) = (limits.watchdog, watch.reported) {
                let alive_at = *watch.alive_at.get_or_insert(now);
                let silent = now.saturating_duration_since(alive_at);
                if silent > watchdog {
                    watch.reported = true;
                    inputs.push(Input::Retire {
                        pid,
                        why: Retire::Watchdog { silent },
                    });
                    continue;
                }
            }
            if !check_limits || watch.reported {
                continue;
            }
            let connections = queues.given.saturating_sub(baseline);
            let (max_connections, max_age) = (watch.max_connections, watch.max_age);
            let memory = (limits.max_memory.is_some() || limits.max_memory_hard.is_some())
                .then(|| procfs::pss_bytes(pid.as_raw()))
                .flatten();
            let input = match (memory, limits.max_memory_hard, limits.max_memory) {
                (Some(bytes), Some(limit), _) if bytes > limit => Some(Input::KillNow {
                    pid,
                    reason: KillReason::MemoryHard { bytes, limit },
                }),
                (Some(bytes), _, Some(limit)) if bytes > limit => Some(Input::Retire {
                    pid,
                    why: Retire::Memory { bytes, limit },
                }),
                _ => None,
            }
            .or_else(|| {
                let limit = max_connections.filter(|limit| connections >= *limit)?;
                Some(Input::Retire {
                    pid,
                    why: Retire::Connections {
                        count: connections,
                        limit,
                    },
                })
            })
            .or_else(|| {
                let age = started.elapsed();
                max_age.filter(|limit| age >= *limit)?;
                Some(Input::Retire {
                    pid,
                    why: Retire::Age { age },
                })
            });
            if let Some(input) = input {
                watch.reported = true;
                inputs.push(input);
            }
        }
        for input in inputs {
            self.step(input);
        }
    }
}

/// Sets net.ipv4.tcp_migrate_req in this network namespace, so that when a hung worker is
/// killed, or the reserve closes, the connections waiting in its accept queue move to another
/// socket of its group (the program is attached as SELECT_OR_MIGRATE and picks a live worker)
/// instead of being reset. It applies only to sockets in reuseport groups.
fn enable_migration() {
    const PATH: &str = "/proc/sys/net/ipv4/tcp_migrate_req";
    match std::fs::read_to_string(PATH) {
        Ok(value) if value.trim() == "1" => {}
        Ok(_) => match std::fs::write(PATH, "1") {
            Ok(()) => log::info!(
                "set net.ipv4.tcp_migrate_req=1: connections queued on a closing listener (a worker killed as hung, the reserve) move to live workers"
            ),
            Err(e) => log::warn!(
                "cannot set net.ipv4.tcp_migrate_req=1 ({e}): connections queued on a closing listener (a worker killed as hung, the reserve) will be reset; set it with sysctl"
            ),
        },
        Err(e) => log::warn!(
            "cannot read net.ipv4.tcp_migrate_req ({e}; kernel older than 5.14?): connections queued on a closing listener (a worker killed as hung, the reserve) will be reset"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const STALL: Duration = Duration::from_millis(500);
    const HANG: Duration = Duration::from_secs(3);

    /// Feeds samples 100 ms apart: (given so far, queue now).
    fn run(samples: &[(u64, u64)]) -> Vec<Verdict> {
        let start = Instant::now();
        let mut watch = QueueWatch::default();
        samples
            .iter()
            .enumerate()
            .map(|(i, &(given, queue))| {
                let at = start + Duration::from_millis(100 * i as u64);
                watch.observe(at, given, queue, STALL, HANG)
            })
            .collect()
    }

    fn verdicts_other_than_steady(verdicts: &[Verdict]) -> Vec<(usize, Verdict)> {
        verdicts
            .iter()
            .copied()
            .enumerate()
            .filter(|(_, v)| *v != Verdict::Steady)
            .collect()
    }

    #[test]
    fn a_busy_worker_that_keeps_accepting_is_never_stalled() {
        // 10 new connections a sample, 5 always waiting: it accepts 10 a sample.
        let samples: Vec<(u64, u64)> = (0..100).map(|i| (i * 10, 5)).collect();
        assert!(verdicts_other_than_steady(&run(&samples)).is_empty());
    }

    #[test]
    fn a_pause_shorter_than_the_threshold_costs_nothing() {
        // Three samples (300 ms) with a waiting connection and no accept, then it catches up.
        let mut samples = vec![(0, 0), (1, 1), (2, 2), (3, 3), (4, 0)];
        samples.extend((5..30).map(|i| (i, 0)));
        assert!(verdicts_other_than_steady(&run(&samples)).is_empty());
    }

    #[test]
    fn a_worker_that_accepts_nothing_is_stalled_then_hung_and_a_drained_one_comes_back() {
        // It stops accepting at sample 1; taken out of the active set, it gets nothing more.
        let mut samples = vec![(0, 0)];
        samples.extend((1..=40).map(|_| (3, 3)));
        let verdicts = verdicts_other_than_steady(&run(&samples));
        assert_eq!(verdicts[0], (6, Verdict::Stalled), "{verdicts:?}");
        assert!(
            matches!(verdicts[1], (31, Verdict::Hung(d)) if d >= HANG),
            "{verdicts:?}"
        );
        assert_eq!(verdicts.len(), 2);

        let mut samples = vec![(0, 0)];
        samples.extend((1..=10).map(|_| (3, 3)));
        samples.push((3, 2));
        let verdicts = verdicts_other_than_steady(&run(&samples));
        assert_eq!(verdicts, [(6, Verdict::Stalled), (11, Verdict::Unstalled)]);
    }

    #[test]
    fn a_queue_that_grows_while_the_count_misses_arrivals_still_shows_accepts() {
        // Counted 1 a sample, queue steady at 4: it accepts one a sample.
        let samples: Vec<(u64, u64)> = (0..20).map(|i| (i, 4)).collect();
        assert!(verdicts_other_than_steady(&run(&samples)).is_empty());
    }

    #[test]
    fn limits_get_their_jitter_within_the_fraction() {
        let mut health = Health::new(HealthLimits {
            max_connections: Some(1000),
            max_age: Some(Duration::from_secs(100)),
            ..HealthLimits::default()
        });
        let mut seen = std::collections::BTreeSet::new();
        for pid in 1..50 {
            let watched = health.watch(Pid::from_raw(pid));
            let connections = watched.max_connections.unwrap();
            let age = watched.max_age.unwrap();
            assert!((1000..1100).contains(&connections), "{connections}");
            assert!(age >= Duration::from_secs(100) && age < Duration::from_secs(110));
            seen.insert(connections);
        }
        assert!(seen.len() > 10, "the jitter varies: {seen:?}");
    }
}
