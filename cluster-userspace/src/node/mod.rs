//! Node's own cluster protocol, so that unmodified Node programs (`cluster.isPrimary` ...
//! `fork()` ... `listen(3000)`, Express, Fastify, plain `listen(port)` scripts) run as
//! cluster-lb workers: cluster-lb starts them the way Node's `cluster.fork()` does (an IPC
//! channel as NODE_CHANNEL_FD, NODE_UNIQUE_ID), so Node's own worker code runs, and every
//! `server.listen()` asks cluster-lb for its socket (`queryServer`). The wire protocol is
//! described in docs/NODE.md.

pub mod channel;
pub mod detect;
pub mod protocol;
