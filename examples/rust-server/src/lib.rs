//! What the Rust example servers share: an HTTP server that answers `worker ID pid PID` on every
//! request and stops gracefully.

use std::{
    convert::Infallible,
    future::Future,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::Duration,
};

use http_body_util::Full;
use hyper::{
    body::Bytes,
    header::{HeaderValue, CONNECTION},
    server::conn::http1,
    service::service_fn,
    Request, Response,
};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

/// The body every example answers with, so tests and curl can see who served them.
pub fn identity() -> Bytes {
    let worker = std::env::var("CLUSTER_LB_WORKER_ID").unwrap_or_else(|_| "-".into());
    Bytes::from(format!("worker {worker} pid {}\n", std::process::id()))
}

/// How long a keep-alive connection must have been idle before a stopping server closes it:
/// a client that keeps using its connection sends its next request within this time and gets
/// the answer with `Connection: close`. Closing a connection the moment it is idle would race a
/// request the client is already sending on it, and fail that request.
const IDLE_BEFORE_CLOSE: Duration = Duration::from_secs(1);

/// Serves HTTP/1.1 on `listener` until `stop` completes, then stops without failing a request:
/// it closes the listener (the kernel moves connections still queued on it to other workers),
/// answers further requests on open connections with `Connection: close`, and after
/// [`IDLE_BEFORE_CLOSE`] shuts the remaining (idle) connections down gracefully.
pub async fn serve_http(listener: TcpListener, stop: impl Future<Output = ()>) {
    let body = identity();
    let draining = Arc::new(AtomicBool::new(false));
    let (shut_down, shutdown) = tokio::sync::watch::channel(false);
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
                let (body, draining, mut shutdown) = (body.clone(), Arc::clone(&draining), shutdown.clone());
                connections.spawn(async move {
                    let service = service_fn(move |_request: Request<hyper::body::Incoming>| {
                        let mut response = Response::new(Full::new(body.clone()));
                        if draining.load(Ordering::Relaxed) {
                            response.headers_mut().insert(CONNECTION, HeaderValue::from_static("close"));
                        }
                        async move { Ok::<_, Infallible>(response) }
                    });
                    let connection = http1::Builder::new().serve_connection(TokioIo::new(stream), service);
                    tokio::pin!(connection);
                    // A client that resets mid-request is its own problem, not the server's.
                    tokio::select! {
                        _ = connection.as_mut() => return,
                        _ = shutdown.changed() => {}
                    }
                    connection.as_mut().graceful_shutdown();
                    let _ = connection.await;
                });
            }
            // Reap finished connections so the set does not grow without bound.
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            _ = &mut stop => break,
        }
    }
    drop(listener);
    draining.store(true, Ordering::Relaxed);
    let idle_close = async {
        tokio::time::sleep(IDLE_BEFORE_CLOSE).await;
        let _ = shut_down.send(true);
        std::future::pending::<()>().await
    };
    tokio::pin!(idle_close);
    loop {
        tokio::select! {
            finished = connections.join_next() => if finished.is_none() { break },
            _ = &mut idle_close => {}
        }
    }
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
