//! What the Rust example servers share: an HTTP server that answers `worker ID pid PID` on every
//! request and stops gracefully.

use std::{convert::Infallible, future::Future};

use http_body_util::Full;
use hyper::{body::Bytes, server::conn::http1, service::service_fn, Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

/// The body every example answers with, so tests and curl can see who served them.
pub fn identity() -> Bytes {
    let worker = std::env::var("CLUSTER_LB_WORKER_ID").unwrap_or_else(|_| "-".into());
    Bytes::from(format!("worker {worker} pid {}\n", std::process::id()))
}

/// Serves HTTP/1.1 on `listener` until `stop` completes, then closes the listener (the kernel
/// moves connections still queued on it to other workers) and lets the connections in progress
/// finish.
pub async fn serve_http(listener: TcpListener, stop: impl Future<Output = ()>) {
    let body = identity();
    let mut connections = tokio::task::JoinSet::new();
    tokio::pin!(stop);
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, _) = match accepted {
                    Ok(connection) => connection,
                    // Out of fds, or the peer gave up before accept: keep serving.
                    Err(e) => { eprintln!("accept: {e}"); continue; }
                };
                let body = body.clone();
                connections.spawn(async move {
                    let service = service_fn(move |_request: Request<hyper::body::Incoming>| {
                        let body = body.clone();
                        async move { Ok::<_, Infallible>(Response::new(Full::new(body))) }
                    });
                    // A client that resets mid-request is its own problem, not the server's.
                    let _ = http1::Builder::new().serve_connection(TokioIo::new(stream), service).await;
                });
            }
            // Reap finished connections so the set does not grow without bound.
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            _ = &mut stop => break,
        }
    }
    drop(listener);
    while connections.join_next().await.is_some() {}
}

/// Runs `main` on a current-thread runtime and turns its error into one line and exit code 1.
pub fn run(name: &str, main: impl Future<Output = std::io::Result<()>>) -> std::process::ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("{name}: cannot start tokio: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(main) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{name}: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
