//! cluster-lb: N copies of any server program share one port; an eBPF sk_reuseport program in
//! the kernel picks the worker for each new connection. docs/ARCHITECTURE.md maps the code.
//!
//! The layers, each a folder: `app` (the command line, the control and metrics servers, `top`)
//! over `supervisor` (the lifecycle state machine and its I/O shell, with process launch) over
//! `kernel` (the program, its maps, the listening sockets), `protocol` (cluster-lb's and Node's
//! wire formats) and `sys` (raw Linux calls). The worker API is its own crate,
//! `cluster-lb-worker`, re-exported here as [`worker`].
//!
//! What is public is what an embedder uses: a [`supervisor::Supervisor`] built from a
//! [`supervisor::Config`], driven through its [`supervisor::Handle`] and watched through its
//! [`supervisor::Event`]s; [`control`], to talk to a running primary as `cluster-lb status` and
//! friends do; [`logging`] and [`version`]. The rest is private to the crate.

mod app;
mod kernel;
#[cfg(test)]
mod layering;
pub mod logging;
mod protocol;
pub mod supervisor;
mod sys;
pub mod version;

pub use cluster_lb_worker as worker;

/// The `cluster-lb` command (what its `main` calls).
pub fn cli_main() -> std::process::ExitCode {
    app::main()
}

/// Talking to a running primary over its control socket, as `cluster-lb status | reload |
/// scale | stop | upgrade` do: one JSON [`Request`](control::Request) line, one
/// [`Reply`](control::Reply) line.
pub mod control {
    pub use crate::app::{
        client::{fetch_status, running_in},
        control::{request, ControlError, Reply, Request},
        names::RUN_DIR_ENV,
    };
}
