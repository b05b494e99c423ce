//! A tokio + hyper HTTP server that serves from the socket cluster-lb hands it (socket
//! activation: fd 3), or listens on PORT (default 8080) when started on its own. It says
//! READY=1 on NOTIFY_SOCKET once it accepts, and stops gracefully on SIGTERM.
//!
//!   sudo cluster-lb run -w 4 --listen 127.0.0.1:8080 -- target/debug/example-rust-server

use std::{env, os::fd::FromRawFd, process::ExitCode};

use example_rust_server::{run, serve_http};
use tokio::{net::TcpListener, signal::unix::SignalKind};

const LISTEN_FDS_START: i32 = 3;

fn main() -> ExitCode {
    run("example-rust-server", serve())
}

/// The socket from socket activation when it is meant for this process, else a fresh bind.
async fn listener() -> std::io::Result<TcpListener> {
    let own_pid = std::process::id().to_string();
    let activated = env::var("LISTEN_PID").is_ok_and(|pid| pid == own_pid)
        && env::var("LISTEN_FDS").is_ok_and(|n| n.parse::<u32>().is_ok_and(|n| n >= 1));
    if activated {
        // SAFETY: LISTEN_PID names this process, so fd 3 was passed to us as a listening socket
        // and nothing else in this program owns it.
        let std_listener = unsafe { std::net::TcpListener::from_raw_fd(LISTEN_FDS_START) };
        std_listener.set_nonblocking(true)?;
        TcpListener::from_std(std_listener)
    } else {
        let port = env::var("PORT").unwrap_or_else(|_| "8080".into());
        TcpListener::bind(format!("0.0.0.0:{port}")).await
    }
}

/// Tells cluster-lb (or systemd) that we accept connections: READY=1 on NOTIFY_SOCKET.
fn notify_ready() {
    use std::os::{
        linux::net::SocketAddrExt,
        unix::net::{SocketAddr, UnixDatagram},
    };
    let Ok(path) = env::var("NOTIFY_SOCKET") else {
        return;
    };
    let address = match path.strip_prefix('@') {
        Some(name) => SocketAddr::from_abstract_name(name.as_bytes()),
        None => SocketAddr::from_pathname(&path),
    };
    let sent =
        address.and_then(|address| UnixDatagram::unbound()?.send_to_addr(b"READY=1", &address));
    if let Err(e) = sent {
        eprintln!("example-rust-server: READY=1 not sent: {e}");
    }
}

async fn serve() -> std::io::Result<()> {
    let listener = listener().await?;
    let worker = env::var("CLUSTER_LB_WORKER_ID").unwrap_or_else(|_| "-".into());
    let mut terminate = tokio::signal::unix::signal(SignalKind::terminate())?;
    println!("rust worker {worker} pid {} serving", std::process::id());
    notify_ready();
    serve_http(listener, async move {
        terminate.recv().await;
    })
    .await;
    Ok(())
}
