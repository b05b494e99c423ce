//! The IPC channel between the primary and each worker: wire protocol and transport.

pub mod channel;
pub mod protocol;

/// The variable that tells a worker which fd is its end of the channel.
pub const IPC_FD_VARIABLE: &str = "CLUSTER_LB_IPC_FD";
