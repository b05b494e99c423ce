//! The wire formats the primary speaks with its workers, side by side: cluster-lb's own IPC
//! protocol (`ipc`, docs/PROTOCOL.md, with its transport `ipc_channel`), which lives in the
//! cluster-lb-worker crate because both ends link it, and Node's cluster protocol (`nodejs`,
//! node-ipc.md), which only this end speaks; and the byte budget every channel reader takes its
//! room from (`budget`).

pub use cluster_lb_worker::{channel as ipc_channel, protocol as ipc, IPC_FD_VARIABLE};
pub mod budget;
pub mod nodejs;
