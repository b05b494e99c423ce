//! What a worker's channel said, in words both conversations (`cluster_lb`, `nodejs`) use and
//! the shell understands without knowing the protocol.

use serde_json::Value;

use crate::{
    protocol::{budget::Held, ipc::To},
    supervisor::events::Departure,
};

/// What one event of a channel comes to: something for the shell, or a message a worker
/// addressed to other workers, which `Workers` relays without the shell.
#[derive(Debug)]
pub enum Said {
    Heard(Heard),
    Relay(Relay),
}

impl From<Heard> for Said {
    fn from(heard: Heard) -> Said {
        Said::Heard(heard)
    }
}

/// A message of cluster-lb's protocol with `to`, with its room in the sender's budget until
/// it has been relayed.
#[derive(Debug)]
pub struct Relay {
    pub to: To,
    pub data: Value,
    pub room: Held,
}

/// What a worker's channel said, whatever its protocol.
#[derive(Debug)]
pub enum Heard {
    Nothing,
    /// It runs and speaks the protocol; readiness comes from `Listening` now.
    Online,
    /// It accepts on this address: ready. A Node worker's own message comes along, for the
    /// program's primary.
    Listening(String, Option<Value>),
    /// A user message, with its room in the message budget until it is dropped.
    Message(Value, Held),
    /// It leaves by itself, or stopped serving an address it is in the group of.
    Leaving(Departure),
    /// It asks for a listening socket; its conversation answers once the shell found one.
    Query(Query),
    /// A Node worker's program read `cluster.isPrimary` (or `isMaster`, `isWorker`): it has a
    /// primary branch.
    ReadsRole,
    /// It broke the protocol.
    Violation(String),
    /// Its end of the channel closed.
    Closed,
}

/// A request for a listening socket, in the protocol it came in.
#[derive(Debug)]
pub enum Query {
    ClusterLb {
        index: u32,
        address: String,
        protocol: String,
    },
    Node(crate::protocol::nodejs::Query),
}

/// A channel in the middle of a message.
#[derive(Debug)]
pub struct Busy;
