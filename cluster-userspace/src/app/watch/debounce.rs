//! When file changes become a reload: a pure state machine between the inotify reader and
//! `Handle::reload`, given the time with every input, so its tests need no clock.
//!
//! Changes gather until none came for `quiet` (an editor's save, a `git checkout`, a build
//! writing many files: one reload), or for at most `most` after the first one (a tree that
//! never stops changing is still reloaded). Then one reload runs; changes during it gather for
//! exactly one more reload after it ends, so reloads never overlap and none is lost.

use std::{
    path::PathBuf,
    time::{Duration, Instant},
};

/// Changes this close to each other are one reload.
pub const QUIET: Duration = Duration::from_millis(300);
/// The longest changes that keep coming hold a reload back.
pub const MOST: Duration = Duration::from_secs(3);

/// The changes one reload is for: the first changed path, and how many changes came.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    pub first: PathBuf,
    pub count: u64,
}

#[derive(Debug)]
struct Gathered {
    batch: Batch,
    first_at: Instant,
    last_at: Instant,
}

impl Gathered {
    fn new(path: PathBuf, now: Instant) -> Gathered {
        Gathered {
            batch: Batch {
                first: path,
                count: 1,
            },
            first_at: now,
            last_at: now,
        }
    }

    fn add(&mut self, now: Instant) {
        self.batch.count += 1;
        self.last_at = self.last_at.max(now);
    }
}

#[derive(Debug)]
enum State {
    /// Nothing changed since the last reload began.
    Idle,
    /// Changes wait for the quiet that makes them one reload.
    Gathering(Gathered),
    /// A reload runs; what changed since then waits for its end.
    Reloading(Option<Gathered>),
}

#[derive(Debug)]
pub struct Debounce {
    quiet: Duration,
    most: Duration,
    state: State,
}

impl Debounce {
    pub fn new(quiet: Duration, most: Duration) -> Debounce {
        Debounce {
            quiet,
            most,
            state: State::Idle,
        }
    }

    /// A file changed at `now`.
    pub fn changed(&mut self, path: PathBuf, now: Instant) {
        match &mut self.state {
            State::Idle => self.state = State::Gathering(Gathered::new(path, now)),
            State::Gathering(gathered) | State::Reloading(Some(gathered)) => gathered.add(now),
            State::Reloading(pending @ None) => *pending = Some(Gathered::new(path, now)),
        }
    }

    /// When the changes gathered are due for a reload (none while one runs).
    pub fn deadline(&self) -> Option<Instant> {
        match &self.state {
            State::Gathering(g) => Some((g.last_at + self.quiet).min(g.first_at + self.most)),
            _ => None,
        }
    }

    /// The changes to reload for, if their time came at `now`; a reload runs from then on,
    /// until [`finished`](Debounce::finished).
    pub fn due(&mut self, now: Instant) -> Option<Batch> {
        if self.deadline().is_none_or(|at| now < at) {
            return None;
        }
        match std::mem::replace(&mut self.state, State::Reloading(None)) {
            State::Gathering(gathered) => Some(gathered.batch),
            // Only Gathering has a deadline.
            other => {
                self.state = other;
                None
            }
        }
    }

    /// The reload ended (done or failed): changes made while it ran are due next.
    pub fn finished(&mut self) {
        if let State::Reloading(pending) = &mut self.state {
            self.state = match pending.take() {
                Some(gathered) => State::Gathering(gathered),
                None => State::Idle,
            };
        }
    }

    #[cfg(test)]
    fn reloading(&self) -> bool {
        matches!(self.state, State::Reloading(_))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn debounce() -> Debounce {
        Debounce::new(QUIET, MOST)
    }

    #[test]
    fn nothing_changed_nothing_due() {
        let mut d = debounce();
        let t0 = Instant::now();
        assert_eq!(d.deadline(), None);
        assert_eq!(d.due(t0 + ms(10_000)), None);
        assert!(!d.reloading());
    }

    #[test]
    fn five_writes_within_100_ms_are_one_reload_after_the_quiet() {
        let mut d = debounce();
        let t0 = Instant::now();
        for i in 0..5 {
            d.changed(PathBuf::from(format!("f{i}")), t0 + ms(i * 25));
        }
        // The last change was at 100 ms: due at 400 ms, not before.
        assert_eq!(d.deadline(), Some(t0 + ms(400)));
        assert_eq!(d.due(t0 + ms(399)), None);
        assert_eq!(
            d.due(t0 + ms(400)),
            Some(Batch {
                first: "f0".into(),
                count: 5
            })
        );
        assert!(d.reloading());
        // Nothing more until something changes again.
        d.finished();
        assert!(!d.reloading());
        assert_eq!(d.deadline(), None);
        assert_eq!(d.due(t0 + ms(5000)), None);
    }

    #[test]
    fn changes_that_never_stop_are_reloaded_after_the_most() {
        let mut d = debounce();
        let t0 = Instant::now();
        let mut now = t0;
        let mut reloads = Vec::new();
        // A change every 100 ms for 5 s: never 300 ms of quiet.
        while now < t0 + ms(5000) {
            d.changed("log".into(), now);
            if let Some(batch) = d.due(now) {
                reloads.push((now - t0, batch.count));
                d.finished();
            }
            now += ms(100);
        }
        assert_eq!(reloads.first(), Some(&(ms(3000), 31)), "{reloads:?}");
        assert_eq!(reloads.len(), 1, "{reloads:?}");
    }

    #[test]
    fn changes_during_a_reload_are_one_more_reload_after_it_never_during_it() {
        let mut d = debounce();
        let t0 = Instant::now();
        d.changed("a".into(), t0);
        assert!(d.due(t0 + ms(300)).is_some());
        // While it runs: three changes, and time passes well beyond the quiet.
        d.changed("b".into(), t0 + ms(400));
        d.changed("c".into(), t0 + ms(450));
        d.changed("b".into(), t0 + ms(500));
        assert_eq!(d.deadline(), None);
        assert_eq!(d.due(t0 + ms(10_000)), None, "no overlapping reload");
        d.finished();
        // Due at once: their quiet passed while the reload ran.
        assert_eq!(
            d.due(t0 + ms(10_000)),
            Some(Batch {
                first: "b".into(),
                count: 3
            })
        );
        d.finished();
        assert_eq!(d.due(t0 + ms(20_000)), None, "exactly one more");
    }

    #[test]
    fn a_change_just_before_a_reload_ends_still_waits_for_its_quiet() {
        let mut d = debounce();
        let t0 = Instant::now();
        d.changed("a".into(), t0);
        assert!(d.due(t0 + ms(300)).is_some());
        d.changed("a".into(), t0 + ms(900));
        d.finished();
        assert_eq!(d.due(t0 + ms(1000)), None);
        assert_eq!(d.deadline(), Some(t0 + ms(1200)));
        assert!(d.due(t0 + ms(1200)).is_some());
    }

    #[test]
    fn finished_without_a_reload_changes_nothing() {
        let mut d = debounce();
        let t0 = Instant::now();
        d.finished();
        d.changed("a".into(), t0);
        d.finished();
        assert_eq!(d.deadline(), Some(t0 + QUIET));
    }
}
