//! cluster-lb: N copies of any server program share one port; an eBPF sk_reuseport program in
//! the kernel picks the worker for each new connection. See docs/ARCHITECTURE.md for the architecture.
//!
//! The binary is a thin `main.rs` over these modules; the integration tests and embedders use
//! them directly.

pub mod accept;
pub mod cli;
pub mod client;
pub mod config_file;
pub mod control;
pub mod kernel;
pub mod logging;
pub mod metrics;
pub mod names;
pub mod node;
pub mod privileges;
pub mod run;
pub mod seccomp;
pub mod slots;
pub mod sockets;
pub mod spawn;
pub mod supervisor;
pub mod top;
pub mod version;
pub use cluster_lb_worker as worker;
pub use cluster_lb_worker::listen_addr;
