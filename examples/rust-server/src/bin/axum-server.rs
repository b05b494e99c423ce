//! An axum application on tokio, as a user would write it, serving from the socket cluster-lb
//! hands it (socket activation: fd 3; a std listener made a tokio one). It answers
//! `worker ID pid PID` and stops gracefully on SIGTERM.
//!
//!   sudo cluster-lb run -w 4 --listen 127.0.0.1:8080 -- target/debug/axum-server
//!
//! It signals nothing, so cluster-lb counts it ready after --ready-delay.

use std::{
    env,
    os::fd::FromRawFd,
    process::ExitCode,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::Duration,
};

use axum::{
    extract::State,
    http::{header::CONNECTION, HeaderValue},
    response::{IntoResponse, Response},
    routing::get,
    Router,
};
use tokio::signal::unix::{signal, SignalKind};

const LISTEN_FDS_START: i32 = 3;

/// How long a stopping server keeps answering on open keep-alive connections (with
/// `Connection: close`) before axum's graceful shutdown closes the idle ones. axum (hyper)
/// closes an idle keep-alive connection the moment shutdown starts, which races a request the
/// client is already sending on it; a client that keeps using its connection sends its next
/// request within this time, gets its answer and the close, and reconnects to another worker.
const DRAIN_BEFORE_SHUTDOWN: Duration = Duration::from_secs(1);

fn main() -> ExitCode {
    example_rust_server::run("axum-server", serve())
}

/// Set once SIGTERM arrived: every answer then says `Connection: close`.
#[derive(Clone)]
struct Draining(Arc<AtomicBool>);

async fn identity(State(draining): State<Draining>) -> Response {
    let mut response = example_rust_server::identity().into_response();
    if draining.0.load(Ordering::Relaxed) {
        response
            .headers_mut()
            .insert(CONNECTION, HeaderValue::from_static("close"));
    }
    response
}

/// fd 3 when socket activation meant it for this process; else a fresh bind on PORT (8080).
async fn listener() -> std::io::Result<tokio::net::TcpListener> {
    let own_pid = std::process::id().to_string();
    let activated = env::var("LISTEN_PID").is_ok_and(|pid| pid == own_pid)
        && env::var("LISTEN_FDS").is_ok_and(|n| n.parse::<u32>().is_ok_and(|n| n >= 1));
    if !activated {
        let port = env::var("PORT").unwrap_or_else(|_| "8080".into());
        return tokio::net::TcpListener::bind(format!("0.0.0.0:{port}")).await;
    }
    // SAFETY: LISTEN_PID names this process, so fd 3 was passed to us as a listening socket and
    // nothing else in this program owns it.
    let std_listener = unsafe { std::net::TcpListener::from_raw_fd(LISTEN_FDS_START) };
    std_listener.set_nonblocking(true)?;
    tokio::net::TcpListener::from_std(std_listener)
}

async fn serve() -> std::io::Result<()> {
    let listener = listener().await?;
    let mut terminate = signal(SignalKind::terminate())?;
    let draining = Draining(Arc::new(AtomicBool::new(false)));
    let app = Router::new()
        .fallback(get(identity))
        .with_state(draining.clone());
    let stop = async move {
        terminate.recv().await;
        draining.0.store(true, Ordering::Relaxed);
        tokio::time::sleep(DRAIN_BEFORE_SHUTDOWN).await;
    };
    axum::serve(listener, app)
        .with_graceful_shutdown(stop)
        .await
}
