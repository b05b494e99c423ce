//! Accept loops that survive: an accept error (EMFILE when the primary is out of descriptors,
//! ENOMEM, a connection reset before it was taken) backs off and retries instead of ending
//! the server for good, and a cap on connections served at once keeps idle clients from using
//! up the primary's descriptors.

use std::{io, sync::Arc, time::Duration};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Connections one server (control socket, metrics) serves at once; more are closed at once.
pub const MAX_CONNECTIONS: usize = 64;
/// How long a client may take to send its request.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

const FIRST_PAUSE: Duration = Duration::from_millis(50);
const LONGEST_PAUSE: Duration = Duration::from_secs(1);

/// The state of one accept loop.
pub struct Acceptor {
    what: &'static str,
    pause: Duration,
    limit: Arc<Semaphore>,
}

impl Acceptor {
    pub fn new(what: &'static str) -> Acceptor {
        Acceptor {
            what,
            pause: Duration::ZERO,
            limit: Arc::new(Semaphore::new(MAX_CONNECTIONS)),
        }
    }

    /// After a successful accept: a permit to serve the connection (held while serving), or
    /// `None` when too many are being served (the caller closes it).
    pub fn admit(&mut self) -> Option<OwnedSemaphorePermit> {
        self.pause = Duration::ZERO;
        let permit = Arc::clone(&self.limit).try_acquire_owned().ok();
        if permit.is_none() {
            log::debug!(
                "{}: {MAX_CONNECTIONS} connections open; closing a new one",
                self.what
            );
        }
        permit
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
