//! User messages to workers, whoever sends them: the primary's (`cluster-lb send`, an
//! embedder's `Handle::deliver`), to a worker id or to all, and a worker's own, addressed in
//! cluster-lb's protocol (`to`: an id, all, the others) and relayed here with `from`.
//!
//! Nothing here waits for a worker: a message goes straight into each recipient's socket
//! buffer (which the kernel bounds) or is dropped for that recipient, so a worker that does
//! not read its channel loses messages and holds up no one. The relayed message's room in its
//! sender's budget is held until it has been written to every recipient, so a sender is held
//! back while the primary handles its messages, as for those it sends the primary.

use nix::unistd::Pid;
use serde_json::Value;

use super::{heard::Relay, Protocol, Workers};
use crate::{
    protocol::{
        ipc::{self, PrimaryMessage, To, VERSION},
        nodejs::is_plain_user_message,
    },
    supervisor::handle::{Recipients, SendError},
};

/// Messages dropped on the way to or from one worker, so that a streak of drops is said once
/// when it starts and once, with its count, when it ends.
#[derive(Debug, Default)]
pub struct Drops {
    /// Relayed to it, but its channel was full.
    to: u64,
    /// Its own, for workers, not relayed (no one to take them, or too large).
    from: u64,
}

impl Workers {
    /// Delivers `data` from the primary to the processes `to` names among `serving` (worker
    /// id, pid: the lifecycle's processes that are not being stopped); `wanted` are the ids the
    /// cluster runs, to tell an id that does not exist from one being restarted. All or
    /// nothing when the message cannot be sent in this cluster's protocol.
    pub fn deliver(
        &mut self,
        to: Recipients,
        data: Value,
        serving: &[(u32, Pid)],
        wanted: &[u32],
    ) -> Result<u32, SendError> {
        let recipients: Vec<(u32, Pid)> = serving
            .iter()
            .copied()
            .filter(|(id, _)| match to {
                Recipients::Worker(wanted) => *id == wanted,
                Recipients::All => true,
            })
            .collect();
        match (to, recipients.is_empty()) {
            (Recipients::Worker(id), true) if wanted.contains(&id) => {
                return Err(SendError::NotRunning(id))
            }
            (Recipients::Worker(id), true) => return Err(SendError::NoSuchWorker(id)),
            (Recipients::All, true) => return Err(SendError::NoWorkers),
            _ => {}
        }
        self.check_sendable(&data)?;
        let mut missed = Vec::new();
        for (id, pid) in &recipients {
            let sent = match self.table.get_mut(pid) {
                Some(worker) => match worker.channel.refuses_messages() {
                    Some(why) => Err(why.to_string()),
                    None => worker.channel.send(data.clone()),
                },
                None => Err("it is gone".to_string()),
            };
            if let Err(why) = sent {
                missed.push(format!("worker {id} (pid {pid}): {why}"));
            }
        }
        let of = recipients.len() as u32;
        let sent = of - missed.len() as u32;
        log::debug!("a message from the primary went to {sent} of {of} workers");
        if missed.is_empty() {
            Ok(sent)
        } else {
            Err(SendError::Partly {
                sent,
                of,
                missed: missed.join("; "),
            })
        }
    }

    /// Refuses what no worker of this cluster could be sent: a message Node would take for
    /// its own, or one over a datagram of cluster-lb's protocol.
    fn check_sendable(&self, data: &Value) -> Result<(), SendError> {
        match self.launch.protocol {
            Protocol::Node if !is_plain_user_message(data) => Err(SendError::NodeInternal),
            Protocol::Node => Ok(()),
            Protocol::ClusterLb => {
                let message = PrimaryMessage::Message {
                    v: VERSION,
                    data: data.clone(),
                    from: None,
                };
                let bytes = serde_json::to_vec(&message).map_or(0, |bytes| bytes.len());
                if bytes > ipc::MAX_MESSAGE {
                    return Err(SendError::TooLarge(bytes));
                }
                Ok(())
            }
        }
    }

    /// Relays a message worker `sender` addressed to other workers: to every process the
    /// address names that takes messages (channel open, said `online`, not leaving), with
    /// `from`, encoded once. The sender's room in its budget is given back once it is
    /// written to all.
    pub fn relay_addressed(&mut self, sender: Pid, relay: Relay) {
        let Relay { to, data, room } = relay;
        let Some(from) = self.table.get(&sender).map(|w| w.id) else {
            return;
        };
        let recipients: Vec<Pid> = self
            .table
            .iter()
            .filter(|(_, w)| match to {
                To::Worker(id) => w.id == id,
                To::All => true,
                To::Others => w.id != from,
            })
            .filter(|(_, w)| w.channel.refuses_messages().is_none())
            .map(|(pid, _)| *pid)
            .collect();
        let message = PrimaryMessage::Message {
            v: VERSION,
            data,
            from: Some(from),
        };
        let datagram = match (recipients.is_empty(), ipc::encode(&message)) {
            (true, _) => Err(format!(
                "none of {to} runs and reads cluster-lb's IPC channel now"
            )),
            (false, None) => Err(format!(
                "it is over {} bytes once `from` replaces `to`",
                ipc::MAX_MESSAGE
            )),
            (false, Some(datagram)) => Ok(datagram),
        };
        self.note_relayed(sender, datagram.as_ref().map(|_| ()));
        let Ok(datagram) = datagram else {
            return;
        };
        for pid in recipients {
            let Some(worker) = self.table.get_mut(&pid) else {
                continue;
            };
            let sent = worker.channel.send_datagram(&datagram);
            note_delivery(worker.id, pid, &mut worker.drops, sent);
        }
        drop(room);
    }

    /// Says when worker `sender`'s messages for workers start being dropped (and why), and
    /// how many were once one is relayed again.
    fn note_relayed(&mut self, sender: Pid, relayed: Result<(), &String>) {
        let Some(worker) = self.table.get_mut(&sender) else {
            return;
        };
        let (id, drops) = (worker.id, &mut worker.drops);
        match (relayed, drops.from) {
            (Err(why), 0) => log::warn!(
                "a message worker {id} (pid {sender}) addressed to workers was dropped: {why}; the next ones dropped are counted"
            ),
            (Ok(()), dropped @ 1..) => log::info!(
                "worker {id} (pid {sender}) reaches workers again; {dropped} of its messages were dropped"
            ),
            _ => {}
        }
        drops.from = match relayed {
            Ok(()) => 0,
            Err(_) => drops.from + 1,
        };
    }
}

/// Says when a recipient starts losing relayed messages (its channel is full), and how many
/// it lost once it gets one again.
fn note_delivery(id: u32, pid: Pid, drops: &mut Drops, sent: Result<(), String>) {
    match (sent, drops.to) {
        (Err(why), 0) => {
            log::warn!(
                "a message relayed to worker {id} (pid {pid}) was dropped: {why}; the next ones are counted"
            );
            drops.to = 1;
        }
        (Err(_), _) => drops.to += 1,
        (Ok(()), 0) => {}
        (Ok(()), dropped) => {
            log::info!(
                "worker {id} (pid {pid}) takes relayed messages again; {dropped} were dropped"
            );
            drops.to = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{collections::HashSet, time::Duration};

    use serde_json::json;

    use super::*;
    use crate::{
        protocol::{
            budget::Budget,
            ipc::WorkerMessage,
            ipc_channel::{self, Endpoint},
        },
        supervisor::{
            launch::spawn::WorkerCommand,
            workers::{
                cluster_lb::{IpcConversation, IpcEvent},
                ChannelEvent, Claims, Heard, Launch, WorkerChannel, WorkerIo,
            },
        },
    };

    fn workers(protocol: Protocol) -> Workers {
        let (events, _) = tokio::sync::mpsc::unbounded_channel();
        let (forwarded, _) = tokio::sync::mpsc::unbounded_channel();
        let launch = Launch {
            command: WorkerCommand::new(&["true".to_string()]).unwrap(),
            protocol,
            filter: None,
            credentials: None,
            notify_socket: String::new(),
            max_message: 1 << 20,
            stop_signal: nix::sys::signal::Signal::SIGTERM,
            instance_var: crate::supervisor::INSTANCE_VAR.to_string(),
            increment: None,
            watchdog: None,
        };
        Workers::new(launch, events, forwarded)
    }

    /// Adds process `pid` of worker `id` with a cluster-lb channel (`online`: it said so);
    /// returns the worker's end.
    fn add(workers: &mut Workers, id: u32, pid: i32, online: bool) -> Endpoint {
        let (primary, worker) = ipc_channel::pair().unwrap();
        let budget = Budget::for_worker(ipc::MAX_MESSAGE, &workers.shared_budget());
        let conversation = IpcConversation::start(primary, |_| true, budget, online).unwrap();
        let io = WorkerIo {
            id,
            channel: WorkerChannel::ClusterLb(conversation),
            claims: Claims::default(),
            reported: HashSet::new(),
            output: [None, None],
            said: Vec::new(),
            early: super::super::EarlyMessages::default(),
            drops: Drops::default(),
        };
        workers.table.insert(Pid::from_raw(pid), io);
        Endpoint::new(worker).unwrap()
    }

    /// What arrived at a worker's end within a moment: (from, data) of each message.
    async fn received(end: &Endpoint) -> Vec<(Option<u32>, Value)> {
        let mut got = Vec::new();
        while let Ok(Ok(Some(datagram))) =
            tokio::time::timeout(Duration::from_millis(50), end.recv()).await
        {
            match ipc::decode::<PrimaryMessage>(&datagram.bytes).unwrap() {
                PrimaryMessage::Message { from, data, .. } => got.push((from, data)),
                other => panic!("{other:?}"),
            }
        }
        got
    }

    /// Worker `pid` says `message` addressed `to`, as its reader would report it.
    fn says(workers: &mut Workers, pid: i32, to: To, data: Value) -> Option<(u32, Heard)> {
        let message = WorkerMessage::Message {
            v: VERSION,
            data,
            to: Some(to),
        };
        let event = ChannelEvent::ClusterLb(IpcEvent::Message(message, Default::default()));
        workers.hear(Pid::from_raw(pid), event)
    }

    #[tokio::test]
    async fn addressed_messages_reach_whom_they_name_with_their_sender() {
        let mut workers = workers(Protocol::ClusterLb);
        let zero = add(&mut workers, 0, 100, true);
        let one = add(&mut workers, 1, 101, true);
        // Worker 1 being replaced: its new process too.
        let one_new = add(&mut workers, 1, 111, true);
        let silent = add(&mut workers, 2, 102, false);
        let leaving = add(&mut workers, 3, 103, true);
        workers.ask_to_stop(Pid::from_raw(103));
        let asked = leaving.recv().await.unwrap().unwrap();
        assert_eq!(
            ipc::decode::<PrimaryMessage>(&asked.bytes),
            Ok(PrimaryMessage::Disconnect { v: VERSION })
        );

        let heard = says(&mut workers, 100, To::Others, json!("o"));
        assert!(matches!(heard, Some((0, Heard::Nothing))), "{heard:?}");
        says(&mut workers, 101, To::Worker(0), json!("id"));
        says(&mut workers, 111, To::All, json!("a"));
        says(&mut workers, 100, To::Worker(1), json!("both"));
        says(&mut workers, 100, To::Worker(9), json!("nobody"));

        let from = |id, data: &str| (Some(id), json!(data));
        assert_eq!(received(&zero).await, [from(1, "id"), from(1, "a")]);
        assert_eq!(
            received(&one).await,
            [from(0, "o"), from(1, "a"), from(0, "both")]
        );
        assert_eq!(
            received(&one_new).await,
            [from(0, "o"), from(1, "a"), from(0, "both")]
        );
        assert_eq!(received(&silent).await, [], "it never said online");
        assert_eq!(received(&leaving).await, [], "it is leaving");
        assert_eq!(workers.table[&Pid::from_raw(100)].drops.from, 1);
    }

    #[tokio::test]
    async fn a_recipient_that_does_not_read_loses_messages_and_blocks_no_one() {
        let mut workers = workers(Protocol::ClusterLb);
        let _sender = add(&mut workers, 0, 100, true);
        let deaf = add(&mut workers, 1, 101, true);
        let big = json!("x".repeat(60_000));
        for _ in 0..100 {
            says(&mut workers, 100, To::Worker(1), big.clone());
        }
        let dropped = workers.table[&Pid::from_raw(101)].drops.to;
        assert!(
            dropped > 50,
            "most of 6 MB did not fit its socket buffer: {dropped} dropped"
        );
        let got = received(&deaf).await.len() as u64;
        assert_eq!(got + dropped, 100);
        // Once it reads, it gets the next one, and the count starts over.
        says(&mut workers, 100, To::Worker(1), json!("again"));
        assert_eq!(received(&deaf).await, [(Some(0), json!("again"))]);
        assert_eq!(workers.table[&Pid::from_raw(101)].drops.to, 0);
    }

    #[tokio::test]
    async fn the_primary_sends_to_an_id_or_all_and_says_who_did_not_get_it() {
        let mut workers = workers(Protocol::ClusterLb);
        let zero = add(&mut workers, 0, 100, true);
        let one = add(&mut workers, 1, 101, true);
        let _silent = add(&mut workers, 2, 102, false);
        let (p0, p1, p2) = (Pid::from_raw(100), Pid::from_raw(101), Pid::from_raw(102));
        let serving = [(0, p0), (1, p1)];
        let wanted = [0, 1, 2];

        let sent = workers.deliver(Recipients::Worker(1), json!(1), &serving, &wanted);
        assert_eq!(sent, Ok(1));
        let sent = workers.deliver(Recipients::All, json!(2), &serving, &wanted);
        assert_eq!(sent, Ok(2));
        assert_eq!(received(&zero).await, [(None, json!(2))]);
        assert_eq!(received(&one).await, [(None, json!(1)), (None, json!(2))]);

        let sent = workers.deliver(Recipients::Worker(7), json!(3), &serving, &wanted);
        assert_eq!(sent, Err(SendError::NoSuchWorker(7)));
        assert_eq!(
            SendError::NoSuchWorker(7).to_string(),
            "no worker 7; status shows the workers"
        );
        let sent = workers.deliver(Recipients::Worker(2), json!(3), &serving, &wanted);
        assert_eq!(sent, Err(SendError::NotRunning(2)));
        let sent = workers.deliver(Recipients::All, json!(3), &[], &wanted);
        assert_eq!(sent, Err(SendError::NoWorkers));

        // A process the lifecycle counts, whose channel does not take messages, is named.
        let serving = [(0, p0), (2, p2)];
        match workers.deliver(Recipients::All, json!(4), &serving, &wanted) {
            Err(SendError::Partly {
                sent: 1,
                of: 2,
                missed,
            }) => {
                assert!(
                    missed.starts_with("worker 2 (pid 102): it never said"),
                    "{missed}"
                )
            }
            other => panic!("{other:?}"),
        }
        let huge = json!("x".repeat(ipc::MAX_MESSAGE));
        let sent = workers.deliver(Recipients::All, huge, &serving, &wanted);
        assert!(matches!(sent, Err(SendError::TooLarge(_))), "{sent:?}");
    }

    #[tokio::test]
    async fn node_workers_are_not_sent_what_node_would_take_for_its_own() {
        let mut workers = workers(Protocol::Node);
        let serving = [(1, Pid::from_raw(100))];
        let internal = json!({"cmd": "NODE_CLUSTER", "act": "disconnect"});
        let sent = workers.deliver(Recipients::All, internal, &serving, &[1]);
        assert_eq!(sent, Err(SendError::NodeInternal));
    }
}
