//! Where a primary says what happens: its log and every subscriber of its event stream, the
//! primary's own supervisor (systemd's NOTIFY_SOCKET), and everyone waiting for a reload.

use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};

use super::{
    events::{Event, ReloadError},
    handle::ReloadReply,
    lifecycle::Announced,
    systemd::Notifier,
};

pub struct Outputs {
    subscribers: Vec<UnboundedSender<Event>>,
    systemd: Notifier,
    /// Everyone waiting for the reload under way.
    reload_replies: Vec<ReloadReply>,
}

impl Outputs {
    pub fn new() -> Outputs {
        Outputs {
            subscribers: Vec::new(),
            systemd: Notifier::from_environment(),
            reload_replies: Vec::new(),
        }
    }

    /// Every event from now on.
    pub fn subscribe(&mut self) -> UnboundedReceiver<Event> {
        let (tx, rx) = unbounded_channel();
        self.subscribers.push(tx);
        rx
    }

    /// Logs the event and gives it to every subscriber still listening.
    pub fn emit(&mut self, event: Event) {
        event.log();
        self.subscribers.retain(|s| s.send(event.clone()).is_ok());
    }

    /// Tells the primary's own supervisor.
    pub fn announce(&self, announced: Announced) {
        match announced {
            Announced::Ready => self.systemd.ready(),
            Announced::Reloading => self.systemd.reloading(),
            Announced::Stopping => self.systemd.stopping(),
            Announced::Nothing => {}
        }
    }

    /// Someone waits for the reload under way (or about to start).
    pub fn await_reload(&mut self, reply: ReloadReply) {
        self.reload_replies.push(reply);
    }

    /// Answers everyone waiting for the reload.
    pub fn reload_done(&mut self, outcome: &Result<u32, ReloadError>) {
        for reply in self.reload_replies.drain(..) {
            let _ = reply.send(outcome.clone());
        }
    }
}
