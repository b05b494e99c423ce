//! A worker's channel to the primary, whichever protocol it speaks: one type the rest of the
//! primary talks to (ask to stop, send a message, close, hand over in an upgrade) and one event
//! type its reader reports. Only the two conversations, `cluster_lb` and `nodejs`, know a
//! protocol; what they heard is said in the words of `heard`.

use serde_json::Value;

use super::{
    cluster_lb::{IpcConversation, IpcEvent},
    heard::{Busy, Heard, Said},
    nodejs::{NodeConversation, NodeEvent},
};
use crate::supervisor::saved::ChannelState;

/// Which protocol a cluster's workers speak.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    /// cluster-lb's own (CLUSTER_LB_IPC_FD, docs/PROTOCOL.md).
    ClusterLb,
    /// Node's cluster channel (NODE_CHANNEL_FD): unmodified Node programs are workers.
    Node,
}

impl Protocol {
    /// Whether its workers say when they are ready (Node: `online`, then `listening`), so that
    /// `--ready-delay` does not apply to them.
    pub fn signals_readiness(self) -> bool {
        self == Protocol::Node
    }
}

/// What a channel's reader reports, in its protocol.
#[derive(Debug)]
pub enum ChannelEvent {
    ClusterLb(IpcEvent),
    Node(NodeEvent),
}

/// A worker's channel.
pub enum WorkerChannel {
    /// None was given, or it closed.
    Closed,
    ClusterLb(IpcConversation),
    Node(NodeConversation),
}

impl WorkerChannel {
    /// Interprets one event of this channel's reader; an event of another protocol (a reader
    /// of a channel since replaced) means nothing.
    pub fn hear(
        &mut self,
        event: ChannelEvent,
        addresses: &[cluster_lb_worker::ListenAddr],
    ) -> Said {
        let said = match (&mut *self, event) {
            (WorkerChannel::ClusterLb(ipc), ChannelEvent::ClusterLb(event)) => {
                ipc.hear(event, addresses)
            }
            (WorkerChannel::Node(node), ChannelEvent::Node(event)) => node.hear(event).into(),
            _ => Heard::Nothing.into(),
        };
        if matches!(said, Said::Heard(Heard::Closed)) {
            *self = WorkerChannel::Closed;
        }
        said
    }

    /// Asks the worker to stop in its protocol (`disconnect`); false if it speaks none (or the
    /// message cannot be sent), so that the caller sends SIGTERM instead.
    pub fn ask_to_stop(&mut self) -> bool {
        match self {
            WorkerChannel::ClusterLb(ipc) => ipc.ask_to_stop(),
            WorkerChannel::Node(node) => node.ask_to_stop(),
            WorkerChannel::Closed => false,
        }
    }

    /// A user message to the worker; why not, when it cannot be sent.
    pub fn send(&mut self, data: Value) -> Result<(), String> {
        match self {
            WorkerChannel::ClusterLb(ipc) => ipc.send(data),
            WorkerChannel::Node(node) => node.send(data),
            WorkerChannel::Closed => Err("it has no channel".into()),
        }
    }

    /// A datagram of cluster-lb's protocol as it is (a message another worker addressed to
    /// this one, encoded once for all its recipients). The workers of a cluster all speak
    /// one protocol, so a Node worker never is a recipient.
    pub fn send_datagram(&mut self, datagram: &[u8]) -> Result<(), String> {
        match self {
            WorkerChannel::ClusterLb(ipc) => ipc.send_datagram(datagram),
            WorkerChannel::Node(_) => Err("it speaks Node's protocol".into()),
            WorkerChannel::Closed => Err("it has no channel".into()),
        }
    }

    /// Why messages for workers are not for it, if they are not: its channel is closed, it
    /// does not read cluster-lb's (it never said `online`), or it leaves (asked to stop, or
    /// said so).
    pub fn refuses_messages(&self) -> Option<&'static str> {
        match self {
            WorkerChannel::Closed => Some("it has no channel"),
            WorkerChannel::ClusterLb(ipc) if !ipc.is_online() => {
                Some("it never said `online` on cluster-lb's IPC channel, so it does not read it")
            }
            WorkerChannel::ClusterLb(ipc) if ipc.is_leaving() => Some("it is leaving"),
            WorkerChannel::Node(node) if node.is_leaving() => Some("it is leaving"),
            WorkerChannel::ClusterLb(_) | WorkerChannel::Node(_) => None,
        }
    }

    /// A message of the program's primary to this (Node) worker, as it sent it.
    pub fn relay(
        &mut self,
        message: Value,
        room: crate::protocol::budget::Held,
    ) -> Result<(), String> {
        match self {
            WorkerChannel::Node(node) => node.relay(message, room),
            _ => Err("it has no Node channel".into()),
        }
    }

    /// Closes the channel (the worker reads EOF) and forgets it.
    pub fn close(&mut self) {
        if let WorkerChannel::Node(node) = self {
            node.close();
        }
        *self = WorkerChannel::Closed;
    }

    pub fn is_node(&self) -> bool {
        matches!(self, WorkerChannel::Node(_))
    }

    /// What the new binary of an upgrade needs to continue the conversation; `Err` while
    /// part of a message is in flight (it would be lost).
    pub fn handover(&self) -> Result<ChannelState, Busy> {
        match self {
            WorkerChannel::Closed => Ok(ChannelState::Closed),
            WorkerChannel::ClusterLb(ipc) => Ok(ipc.handover()),
            WorkerChannel::Node(node) => node.handover(),
        }
    }
}
