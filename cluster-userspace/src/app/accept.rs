//! What the control socket and the metrics server share, so that neither is the easiest thing
//! to knock over:
//!
//! - Accept loops that survive: an accept error (EMFILE when the primary is out of
//!   descriptors, ENOMEM, a connection reset before it was taken) backs off and retries
//!   instead of ending the server for good.
//! - Slots: a connection is served only while it holds one, and a server has at most
//!   [`MOST_SLOTS`] (fewer when the primary has few descriptors), so clients cannot use up the
//!   descriptors the workers need.
//! - A deadline for the request: a connection that has not sent a whole request within
//!   [`REQUEST_DEADLINE`] of being accepted is closed. A request that arrived is answered
//!   however long the answer takes (a reload may take minutes).
//! - Eviction: when every slot is taken, the connection that has waited longest without
//!   sending a request is closed to make room. An idle flood, however large and however often
//!   renewed, then costs a fresh client nothing: each newer connection pushes the oldest idle
//!   one out, and a real client sends its request at once, which takes it out of reach.

use std::{
    collections::{BTreeMap, BTreeSet},
    future::Future,
    io,
    sync::{Arc, Mutex, MutexGuard, PoisonError},
    time::Duration,
};

use tokio::{
    sync::{oneshot, Notify},
    time::Instant,
};

/// The most connections one server (control socket, metrics) holds at once.
pub const MOST_SLOTS: usize = 1024;
/// Slots a server has however few descriptors are left (below this, accept errors are the
/// limit, and the loop survives those).
pub const FEWEST_SLOTS: usize = 16;
/// How long a client has, from its connection being accepted, to send its whole request.
/// A scraper or `cluster-lb status` sends it at once; 2 s leaves room for a slow network.
pub const REQUEST_DEADLINE: Duration = Duration::from_secs(2);
/// How long writing an answer may take (a client that does not read it holds its slot until
/// then).
pub const REPLY_DEADLINE: Duration = Duration::from_secs(10);

const FIRST_PAUSE: Duration = Duration::from_millis(50);
const LONGEST_PAUSE: Duration = Duration::from_secs(1);

/// How many connections a server holds, and how long each may take to send its request.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Limits {
    pub slots: usize,
    pub request: Duration,
}

impl Limits {
    /// The limits for a process that may open `limit` descriptors and has `open` open. Each of
    /// the two servers may take a quarter of what is left: together they never hold more than
    /// half, and the rest stays for the workers' channels, pidfds, pipes and sockets.
    pub fn for_descriptors(limit: u64, open: u64) -> Limits {
        let share = limit.saturating_sub(open) / 4;
        Limits {
            slots: usize::try_from(share)
                .unwrap_or(MOST_SLOTS)
                .clamp(FEWEST_SLOTS, MOST_SLOTS),
            request: REQUEST_DEADLINE,
        }
    }

    /// The limits for this process now (the primary has raised its RLIMIT_NOFILE by then).
    pub fn of_this_process() -> Limits {
        use nix::sys::resource::{getrlimit, Resource};
        let limit = getrlimit(Resource::RLIMIT_NOFILE).map_or(1024, |(soft, _)| soft);
        // A descriptor for the directory itself is among them; it makes no difference.
        let open = std::fs::read_dir("/proc/self/fd").map_or(0, |dir| dir.count() as u64);
        Limits::for_descriptors(limit, open)
    }
}

/// The slots of one server, shared by its accept loop and its connections.
struct Table {
    capacity: usize,
    /// Admission numbers, so that a lower one is an older connection.
    next: u64,
    /// Every connection holding a slot, by admission number, with the sender that closes it
    /// while it waits for its request (`None` once its request arrived).
    held: BTreeMap<u64, Option<oneshot::Sender<()>>>,
    /// The connections still waiting for their request, oldest first.
    waiting: BTreeSet<u64>,
}

/// What [`Table::admit`] decided for a new connection.
#[derive(Debug)]
enum Admission {
    /// A slot, and the receiver that says the connection was evicted.
    Slot(u64, oneshot::Receiver<()>),
    /// Every slot is held by a connection whose request arrived: wait for one to end.
    Full,
}

impl Table {
    fn new(capacity: usize) -> Table {
        Table {
            capacity: capacity.max(1),
            next: 0,
            held: BTreeMap::new(),
            waiting: BTreeSet::new(),
        }
    }

    /// A slot for a new connection: a free one, or the one of the connection that has waited
    /// longest for its request (which is told to close). The second value says whether one
    /// was evicted.
    fn admit(&mut self) -> (Admission, bool) {
        let mut evicted = false;
        if self.held.len() >= self.capacity {
            let Some(oldest) = self.waiting.pop_first() else {
                return (Admission::Full, false);
            };
            if let Some(Some(close)) = self.held.remove(&oldest) {
                // Its task may have ended already; then there is nobody to tell.
                let _ = close.send(());
            }
            evicted = true;
        }
        let id = self.next;
        self.next += 1;
        let (close, closed) = oneshot::channel();
        self.held.insert(id, Some(close));
        self.waiting.insert(id);
        (Admission::Slot(id, closed), evicted)
    }

    /// Connection `id` sent its request: nothing evicts it any more. False when it had been
    /// evicted already (its slot is another's now).
    fn answering(&mut self, id: u64) -> bool {
        self.waiting.remove(&id);
        match self.held.get_mut(&id) {
            Some(close) => {
                *close = None;
                true
            }
            None => false,
        }
    }

    /// Connection `id` ended: its slot is free (unless it was evicted and is another's).
    fn release(&mut self, id: u64) -> bool {
        self.waiting.remove(&id);
        self.held.remove(&id).is_some()
    }
}

struct Shared {
    table: Mutex<Table>,
    /// Signalled when a slot is freed, for an accept loop waiting on a full table.
    freed: Notify,
}

impl Shared {
    fn table(&self) -> MutexGuard<'_, Table> {
        // Nothing panics while holding it; if something did, the table is still consistent.
        self.table.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The state of one accept loop.
pub struct Acceptor {
    what: &'static str,
    pause: Duration,
    limits: Limits,
    shared: Arc<Shared>,
}

impl Acceptor {
    /// An acceptor with the limits of this process's descriptors.
    pub fn new(what: &'static str) -> Acceptor {
        Acceptor::with_limits(what, Limits::of_this_process())
    }

    pub fn with_limits(what: &'static str, limits: Limits) -> Acceptor {
        log::debug!(
            "{what}: {} connection slots, {:?} for a request",
            limits.slots,
            limits.request
        );
        Acceptor {
            what,
            pause: Duration::ZERO,
            limits,
            shared: Arc::new(Shared {
                table: Mutex::new(Table::new(limits.slots)),
                freed: Notify::new(),
            }),
        }
    }

    /// How many connections this server holds at once.
    pub fn slots(&self) -> usize {
        self.limits.slots
    }

    /// After a successful accept: a slot for the connection, held until the [`Ticket`] is
    /// dropped. When every slot is held, the connection that has waited longest for its
    /// request is closed to make room; when every one has sent its request, this waits until
    /// one ends (the new connection waits with it, and later ones wait in the listen queue).
    pub async fn admit(&mut self) -> Ticket {
        self.pause = Duration::ZERO;
        let accepted = Instant::now();
        loop {
            // Registered before looking, so that a slot freed in between is not missed.
            let freed = self.shared.freed.notified();
            let (admission, evicted) = self.shared.table().admit();
            match admission {
                Admission::Slot(id, closed) => {
                    if evicted {
                        log::debug!("{}: every slot taken; closed the oldest idle", self.what);
                        // Let the evicted connection's task run and close its descriptor
                        // before the next accept opens another: descriptors stay bounded.
                        tokio::task::yield_now().await;
                    }
                    return Ticket {
                        shared: Arc::clone(&self.shared),
                        id,
                        deadline: accepted + self.limits.request,
                        closed,
                    };
                }
                Admission::Full => {
                    log::debug!(
                        "{}: {} requests being answered; waiting for one to end",
                        self.what,
                        self.limits.slots
                    );
                    freed.await;
                }
            }
        }
    }

    /// After a failed accept: wait a little longer each time, then try again.
    pub async fn failed(&mut self, error: io::Error) {
        self.pause = (self.pause * 2).clamp(FIRST_PAUSE, LONGEST_PAUSE);
        if self.pause == FIRST_PAUSE || self.pause == LONGEST_PAUSE {
            log::warn!("{}: accept failed: {error}; retrying", self.what);
        }
        tokio::time::sleep(self.pause).await;
    }
}

/// One connection's slot; dropping it frees the slot.
pub struct Ticket {
    shared: Arc<Shared>,
    id: u64,
    deadline: Instant,
    closed: oneshot::Receiver<()>,
}

impl Ticket {
    /// Reads the request with `read`: its result, or `None` when the deadline passed first or
    /// a newer connection took the slot (the caller then closes the connection). Once this
    /// returns a request, nothing takes the slot until the ticket is dropped.
    pub async fn request<F: Future>(&mut self, read: F) -> Option<F::Output> {
        let outcome = tokio::select! {
            // A request that completes in the same turn as an eviction wins; `answering`
            // below still says whether the slot is ours.
            biased;
            outcome = tokio::time::timeout_at(self.deadline, read) => outcome.ok(),
            _ = &mut self.closed => None,
        };
        let request = outcome?;
        self.shared.table().answering(self.id).then_some(request)
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if self.shared.table().release(self.id) {
            self.shared.freed.notify_one();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slot(admission: (Admission, bool)) -> (u64, oneshot::Receiver<()>, bool) {
        match admission {
            (Admission::Slot(id, closed), evicted) => (id, closed, evicted),
            (Admission::Full, _) => panic!("no slot"),
        }
    }

    #[test]
    fn a_full_table_evicts_the_connection_that_waited_longest() {
        let mut table = Table::new(3);
        let (a, mut a_closed, _) = slot(table.admit());
        let (b, mut b_closed, _) = slot(table.admit());
        let (c, mut c_closed, evicted) = slot(table.admit());
        assert!(!evicted);
        // b sent its request: it is out of reach; a, the oldest idle, goes first.
        assert!(table.answering(b));
        let (d, _, evicted) = slot(table.admit());
        assert!(evicted);
        assert_eq!(a_closed.try_recv(), Ok(()));
        assert!(b_closed.try_recv().is_err());
        assert_eq!(table.held.len(), 3);
        // Then c, then d: never b.
        let (e, _, evicted) = slot(table.admit());
        assert!(evicted);
        assert_eq!(c_closed.try_recv(), Ok(()));
        assert_eq!(table.held.keys().copied().collect::<Vec<_>>(), [b, d, e]);
        // An evicted connection that ends frees nothing: its slot is another's.
        assert!(!table.release(a));
        assert_eq!(table.held.len(), 3);
        // Nor can it answer once evicted.
        assert!(!table.answering(c));
    }

    #[test]
    fn a_table_of_answering_connections_is_full_until_one_ends() {
        let mut table = Table::new(2);
        let (a, _, _) = slot(table.admit());
        let (b, _, _) = slot(table.admit());
        assert!(table.answering(a) && table.answering(b));
        assert!(matches!(table.admit(), (Admission::Full, false)));
        assert!(table.release(a));
        let (_, _, evicted) = slot(table.admit());
        assert!(!evicted);
        assert!(table.held.contains_key(&b));
    }

    #[test]
    fn slots_follow_the_descriptors_left() {
        // A primary with the usual raised limit: the most.
        assert_eq!(Limits::for_descriptors(1 << 20, 40).slots, MOST_SLOTS);
        assert_eq!(Limits::for_descriptors(4096 + 40, 40).slots, MOST_SLOTS);
        // A small limit: a quarter of what is left, so both servers take half at most.
        assert_eq!(Limits::for_descriptors(256, 16).slots, 60);
        // Almost nothing left: still a few.
        assert_eq!(Limits::for_descriptors(32, 30).slots, FEWEST_SLOTS);
        assert_eq!(Limits::for_descriptors(10, 30).slots, FEWEST_SLOTS);
        assert_eq!(Limits::for_descriptors(256, 0).request, REQUEST_DEADLINE);
    }

    fn limits(slots: usize, request_ms: u64) -> Limits {
        Limits {
            slots,
            request: Duration::from_millis(request_ms),
        }
    }

    #[tokio::test]
    async fn an_idle_connection_is_closed_at_its_deadline_and_a_request_keeps_its_slot() {
        let mut acceptor = Acceptor::with_limits("test", limits(4, 100));
        let mut idle = acceptor.admit().await;
        let started = Instant::now();
        let never = std::future::pending::<()>();
        assert_eq!(idle.request(never).await, None);
        let waited = started.elapsed();
        assert!(
            waited >= Duration::from_millis(90) && waited < Duration::from_secs(1),
            "{waited:?}"
        );
        // A request that arrives in time is taken, and the slot stays until the end.
        let mut quick = acceptor.admit().await;
        assert_eq!(quick.request(async { 7 }).await, Some(7));
        tokio::time::sleep(Duration::from_millis(150)).await;
        assert_eq!(acceptor.shared.table().held.len(), 2);
        drop(idle);
        drop(quick);
        assert!(acceptor.shared.table().held.is_empty());
    }

    #[tokio::test]
    async fn a_flood_of_idle_connections_never_locks_out_a_request() {
        let mut acceptor = Acceptor::with_limits("test", limits(8, 60_000));
        // Each idle connection waits for a request that never comes, as its task would.
        let mut idle = tokio::task::JoinSet::new();
        for _ in 0..1000 {
            let mut ticket = acceptor.admit().await;
            idle.spawn(async move { ticket.request(std::future::pending::<()>()).await });
            assert!(acceptor.shared.table().held.len() <= 8);
        }
        // A fresh client gets a slot at once, and keeps it while 1,000 more arrive.
        let mut fresh = acceptor.admit().await;
        assert_eq!(fresh.request(async { "GET" }).await, Some("GET"));
        for _ in 0..1000 {
            let mut ticket = acceptor.admit().await;
            idle.spawn(async move { ticket.request(std::future::pending::<()>()).await });
        }
        assert!(acceptor.shared.table().held.contains_key(&fresh.id));
        // Every evicted connection's task ended (it would have closed its connection).
        let mut ended = 0;
        while let Some(Ok(outcome)) = idle.try_join_next() {
            assert_eq!(outcome, None);
            ended += 1;
        }
        assert!(ended >= 2000 - 8, "{ended}");
    }

    #[tokio::test]
    async fn admission_waits_while_every_slot_is_answering() {
        let mut acceptor = Acceptor::with_limits("test", limits(1, 60_000));
        let mut busy = acceptor.admit().await;
        assert_eq!(busy.request(async {}).await, Some(()));
        let waiting = tokio::time::timeout(Duration::from_millis(50), acceptor.admit()).await;
        assert!(waiting.is_err(), "admitted past a full table");
        drop(busy);
        let admitted = tokio::time::timeout(Duration::from_secs(1), acceptor.admit()).await;
        assert!(admitted.is_ok());
    }
}
