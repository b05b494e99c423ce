//! How many bytes of worker messages the primary holds at once, so that no worker can grow
//! the primary's memory by sending faster than it handles.
//!
//! Every channel reader takes room from two budgets before it reads: its own worker's, and the
//! one all workers share. The room travels with each message to the supervisor loop and is
//! given back when the message has been handled. A worker that sends faster than that waits in
//! its own socket buffer (the kernel then holds its writes back): back-pressure on that worker
//! alone. Its own budget keeps one worker from taking the shared one; the shared one bounds the
//! total whatever the number of workers. Both semaphores are fair (first come, first served),
//! so a flooding worker cannot keep a quiet one from its turn.

use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Bytes of messages all workers together may have in the primary at once.
pub const SHARED: usize = 64 * 1024 * 1024;

/// Room a reader takes before each read.
pub const READ: usize = 64 * 1024;

/// The budgets one channel reader draws from.
#[derive(Clone)]
pub struct Budget {
    own: Arc<Semaphore>,
    shared: Arc<Semaphore>,
}

impl Budget {
    /// A budget for one worker whose longest message is `max_message` bytes, drawing on
    /// `shared` too. Its own is room for one whole message and two reads, so a message of the
    /// largest size can always be completed.
    pub fn for_worker(max_message: usize, shared: &Arc<Semaphore>) -> Budget {
        Budget {
            own: Arc::new(Semaphore::new(max_message + 2 * READ)),
            shared: Arc::clone(shared),
        }
    }

    /// The semaphore all workers' budgets share, for messages of up to `max_message` bytes:
    /// [`SHARED`], or room for two of the longest messages if that is more, so that one
    /// worker's longest message never waits for another's to be handled.
    pub fn shared(max_message: usize) -> Arc<Semaphore> {
        let room = SHARED.max(2 * (max_message + 2 * READ));
        Arc::new(Semaphore::new(room.min(Semaphore::MAX_PERMITS)))
    }

    /// Waits for `bytes` more room in both budgets. `None` once they are closed (never here).
    pub async fn take(&self, bytes: usize) -> Option<Held> {
        let count = u32::try_from(bytes).ok()?;
        let own = Arc::clone(&self.own).acquire_many_owned(count).await.ok()?;
        let shared = Arc::clone(&self.shared)
            .acquire_many_owned(count)
            .await
            .ok()?;
        Some(Held {
            room: Some((own, shared)),
        })
    }
}

/// Room taken from a [`Budget`]; given back when dropped.
#[derive(Debug, Default)]
pub struct Held {
    room: Option<(OwnedSemaphorePermit, OwnedSemaphorePermit)>,
}

impl Held {
    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.room.as_ref().map_or(0, |(own, _)| own.num_permits())
    }

    /// Adds `other`'s room to this one.
    pub fn merge(&mut self, other: Held) {
        match (&mut self.room, other.room) {
            (Some((own, shared)), Some((more_own, more_shared))) => {
                own.merge(more_own);
                shared.merge(more_shared);
            }
            (room @ None, other) => *room = other,
            (_, None) => {}
        }
    }

    /// Takes `bytes` of this room out (all of it, when it holds less).
    pub fn split(&mut self, bytes: usize) -> Held {
        let bytes = bytes.min(self.bytes());
        if bytes == self.bytes() {
            return std::mem::take(self);
        }
        let Some((own, shared)) = &mut self.room else {
            return Held::default();
        };
        match (own.split(bytes), shared.split(bytes)) {
            (Some(own), Some(shared)) => Held {
                room: Some((own, shared)),
            },
            _ => Held::default(),
        }
    }

    /// Gives back all but `bytes`.
    pub fn keep(&mut self, bytes: usize) {
        let extra = self.bytes().saturating_sub(bytes);
        drop(self.split(extra));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn room_is_bounded_per_worker_and_in_total_and_comes_back_when_dropped() {
        let wait = std::time::Duration::from_millis(50);
        let shared = Arc::new(Semaphore::new(10 * READ));
        let one = Budget::for_worker(100, &shared);
        let mut held = one.take(100).await.unwrap();
        held.merge(one.take(READ).await.unwrap());
        assert_eq!(held.bytes(), 100 + READ);
        let message = held.split(60);
        assert_eq!((message.bytes(), held.bytes()), (60, 40 + READ));
        // Of its own 100 + 2 * READ, READ is left: one more read's room, then it waits.
        let more = one.take(READ).await.unwrap();
        let waiting = tokio::time::timeout(wait, one.take(1));
        assert!(waiting.await.is_err(), "the worker's own budget is spent");
        drop((message, more));
        held.keep(10);
        assert_eq!(held.bytes(), 10);
        assert!(one.take(1).await.is_some(), "room came back");

        // The shared budget bounds the total over workers.
        let shared = Arc::new(Semaphore::new(300));
        let (a, b) = (
            Budget::for_worker(1000, &shared),
            Budget::for_worker(1000, &shared),
        );
        let most = a.take(280).await.unwrap();
        let waiting = tokio::time::timeout(wait, b.take(30));
        assert!(waiting.await.is_err(), "the shared budget is spent");
        drop(most);
        assert!(b.take(30).await.is_some());
    }
}
