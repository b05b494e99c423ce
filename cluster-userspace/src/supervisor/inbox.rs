//! Everything that can happen to a primary, from one place: exits of workers (the reaper),
//! signals, what workers' channels say, READY=1 on the notify socket, requests through the
//! [`Handle`](super::Handle), the lifecycle's next timer and the periodic checks.
//! [`Inbox::next`] waits for the first of them.

use std::time::{Duration, Instant};

use nix::unistd::Pid;
use tokio::{
    sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender},
    time::{sleep_until, Interval},
};

use super::{
    handle::Control,
    program::RpcLine,
    reaper::{Exited, Reaper},
    signals::{Signalled, Signals},
    workers::output::Forwarded,
    workers::ChannelEvent,
};

/// One thing that happened.
pub enum Happened {
    /// A worker may have exited (its pidfd became readable).
    Exited(Exited),
    Signal(Signalled),
    Channel(Pid, ChannelEvent),
    /// A datagram of the notify socket that says READY=1: (sender pid, text).
    Notify(i32, String),
    Control(Control),
    /// A request of the program's primary process (it waits for the answer).
    Request(RpcLine),
    /// Output of a `silent` worker, for the program's primary.
    Output(Forwarded),
    /// The lifecycle's deadline passed.
    Due,
    /// Time for the periodic checks.
    Checks,
    /// Time to sample the workers' health.
    Health,
}

/// The senders of the inbox's queues, for whoever feeds them.
pub struct Feeds {
    pub channels: UnboundedSender<(Pid, ChannelEvent)>,
    pub notify: UnboundedSender<(i32, String)>,
    pub control: UnboundedSender<Control>,
    pub requests: UnboundedSender<RpcLine>,
    pub forwarded: UnboundedSender<Forwarded>,
}

pub struct Inbox {
    signals: Signals,
    reaper: Reaper,
    channels: UnboundedReceiver<(Pid, ChannelEvent)>,
    notify: UnboundedReceiver<(i32, String)>,
    control: UnboundedReceiver<Control>,
    requests: UnboundedReceiver<RpcLine>,
    forwarded: UnboundedReceiver<Forwarded>,
    checks: Interval,
    health: Option<Interval>,
}

impl Inbox {
    /// An inbox around `signals` (installed before any child exists), checks every `checks`
    /// and health samples every `health` (if any).
    pub fn new(signals: Signals, checks: Duration, health: Option<Duration>) -> (Inbox, Feeds) {
        let (channels_tx, channels) = unbounded_channel();
        let (notify_tx, notify) = unbounded_channel();
        let (control_tx, control) = unbounded_channel();
        let (requests_tx, requests) = unbounded_channel();
        let (forwarded_tx, forwarded) = unbounded_channel();
        let inbox = Inbox {
            signals,
            reaper: Reaper::new(),
            channels,
            notify,
            control,
            requests,
            forwarded,
            checks: tokio::time::interval(checks),
            health: health.map(|every| {
                let mut interval = tokio::time::interval(every);
                // A late sample is taken once, not in a burst: the figures are rates.
                interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                interval
            }),
        };
        let feeds = Feeds {
            channels: channels_tx,
            notify: notify_tx,
            control: control_tx,
            requests: requests_tx,
            forwarded: forwarded_tx,
        };
        (inbox, feeds)
    }

    /// Watches a worker just started (or adopted), to hear of its exit.
    pub fn watch(&self, pid: Pid) {
        self.reaper.watch(pid);
    }

    /// Waits for the next thing that happens; `deadline` is the lifecycle's next timer.
    pub async fn next(&mut self, deadline: Option<Instant>) -> Happened {
        tokio::select! {
            Some(exited) = self.reaper.next() => Happened::Exited(exited),
            signal = self.signals.next() => Happened::Signal(signal),
            Some((pid, event)) = self.channels.recv() => Happened::Channel(pid, event),
            Some((sender, text)) = self.notify.recv() => Happened::Notify(sender, text),
            Some(control) = self.control.recv() => Happened::Control(control),
            Some(request) = self.requests.recv() => Happened::Request(request),
            Some(output) = self.forwarded.recv() => Happened::Output(output),
            _ = sleep_until_or_forever(deadline) => Happened::Due,
            _ = self.checks.tick() => Happened::Checks,
            _ = tick_or_forever(self.health.as_mut()) => Happened::Health,
        }
    }

    /// What already arrived from workers and is waiting here, without waiting for more (an
    /// upgrade handles it first, so that nothing queued inside this process is lost).
    pub fn pending(&mut self) -> Option<Happened> {
        if let Ok((pid, event)) = self.channels.try_recv() {
            return Some(Happened::Channel(pid, event));
        }
        if let Ok(request) = self.requests.try_recv() {
            return Some(Happened::Request(request));
        }
        self.notify
            .try_recv()
            .ok()
            .map(|(sender, text)| Happened::Notify(sender, text))
    }
}

async fn tick_or_forever(interval: Option<&mut Interval>) {
    match interval {
        Some(interval) => {
            interval.tick().await;
        }
        None => std::future::pending().await,
    }
}

async fn sleep_until_or_forever(deadline: Option<Instant>) {
    match deadline {
        Some(at) => sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}
