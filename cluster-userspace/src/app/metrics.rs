//! `--metrics ADDR`: Prometheus text exposition of the cluster: per-worker kernel counters,
//! worker states, restarts, reloads, build info. A deliberately small HTTP/1 responder: one
//! GET per connection.

use std::{fmt::Write as _, net::SocketAddr};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

use super::accept::{Acceptor, Ticket, REPLY_DEADLINE};
use crate::supervisor::{saved::Inherited, ClusterStatus, Handle, WorkerState, WorkerStatus};

/// The metrics address could not be bound.
#[derive(Debug, thiserror::Error)]
#[error("cannot serve metrics on {addr}: {source}")]
pub struct MetricsError {
    addr: SocketAddr,
    source: std::io::Error,
}

/// Binds now (so a bad address fails at start-up) and serves in the background. Returns the
/// listener's descriptor, for an upgrade to keep.
pub async fn serve(addr: SocketAddr, handle: Handle) -> Result<Option<Inherited>, MetricsError> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| MetricsError { addr, source })?;
    Ok(accept_loop(listener, handle))
}

/// Serves on the listener an older binary bound, handed over in an upgrade.
pub fn adopt(fd: std::os::fd::OwnedFd, handle: Handle) -> std::io::Result<Option<Inherited>> {
    let listener = std::net::TcpListener::from(fd);
    listener.set_nonblocking(true)?;
    Ok(accept_loop(TcpListener::from_std(listener)?, handle))
}

fn accept_loop(listener: TcpListener, handle: Handle) -> Option<Inherited> {
    use std::os::fd::AsRawFd;
    let fd = Inherited::of(&listener.as_raw_fd());
    tokio::spawn(async move {
        let mut acceptor = Acceptor::new("metrics");
        loop {
            let stream = match listener.accept().await {
                Ok((stream, _)) => stream,
                Err(e) => {
                    acceptor.failed(e).await;
                    continue;
                }
            };
            let ticket = acceptor.admit().await;
            let handle = handle.clone();
            tokio::spawn(async move {
                let _ = respond(stream, ticket, handle).await;
            });
        }
    });
    fd
}

/// Answers one GET on `stream`, whose head must arrive within its ticket's deadline; the slot
/// is held until this returns.
async fn respond(mut stream: TcpStream, mut ticket: Ticket, handle: Handle) -> std::io::Result<()> {
    let Some(request) = ticket.request(read_head(&mut stream)).await else {
        return Ok(()); // idle past the deadline, or evicted by newer ones: hang up
    };
    let request = request?;
    let first_line = String::from_utf8_lossy(&request)
        .lines()
        .next()
        .unwrap_or("")
        .to_string();
    let (status, body) = match first_line.split_whitespace().take(2).collect::<Vec<_>>()[..] {
        ["GET", "/metrics"] => match handle.status().await {
            Some(cluster) => ("200 OK", render(&cluster)),
            None => ("503 Service Unavailable", "stopping\n".to_string()),
        },
        _ => ("404 Not Found", "try GET /metrics\n".to_string()),
    };
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    // A client that does not read the answer gives its slot back after this.
    let written = async {
        stream.write_all(response.as_bytes()).await?;
        stream.shutdown().await
    };
    tokio::time::timeout(REPLY_DEADLINE, written)
        .await
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))?
}

/// A request's head: up to its blank line, 8 KiB at most, or whatever came before the client
/// stopped sending.
async fn read_head(stream: &mut TcpStream) -> std::io::Result<Vec<u8>> {
    let mut request = Vec::new();
    let mut chunk = [0u8; 1024];
    while !request.windows(4).any(|w| w == b"\r\n\r\n") && request.len() < 8192 {
        let read = stream.read(&mut chunk).await?;
        if read == 0 {
            break;
        }
        request.extend_from_slice(&chunk[..read]);
    }
    Ok(request)
}

/// The exposition text for one snapshot.
pub fn render(cluster: &ClusterStatus) -> String {
    let mut out = String::new();
    let build = format!(
        "version=\"{}\",strategy=\"{}\"",
        cluster.version, cluster.strategy
    );
    family(
        &mut out,
        "build_info",
        "gauge",
        "Version and balancing strategy in effect.",
        [(build, 1)],
    );
    let per_worker = |value: fn(&WorkerStatus) -> u64| {
        cluster
            .workers
            .iter()
            .map(move |w| (format!("worker=\"{}\",pid=\"{}\"", w.id, w.pid), value(w)))
    };
    family(
        &mut out,
        "worker_selected_total",
        "counter",
        "New connections the eBPF program gave each worker process.",
        per_worker(|w| w.selected),
    );
    family(
        &mut out,
        "worker_fallback_total",
        "counter",
        "Times the program chose the worker's slot but its socket was gone.",
        per_worker(|w| w.fallback),
    );
    family(
        &mut out,
        "worker_migrated_total",
        "counter",
        "Queued requests moved to the worker from a closing listener.",
        per_worker(|w| w.migrated),
    );
    family(
        &mut out,
        "worker_restarts_total",
        "counter",
        "Restarts of each worker id.",
        per_worker(|w| u64::from(w.restarts)),
    );
    family(
        &mut out,
        "worker_resident_bytes",
        "gauge",
        "Resident memory of each worker process.",
        per_worker(|w| w.rss_bytes),
    );
    family(
        &mut out,
        "worker_accept_queue",
        "gauge",
        "Connections waiting in each worker's accept queues, not yet accepted.",
        per_worker(|w| w.queue),
    );
    family(
        &mut out,
        "worker_accept_backlog",
        "gauge",
        "The most each worker's accept queues hold (listen backlog).",
        per_worker(|w| w.backlog),
    );
    family(
        &mut out,
        "worker_stalled",
        "gauge",
        "1 while a worker is out of the active set because its accept queue does not drain.",
        per_worker(|w| u64::from(w.stalled)),
    );
    let states = WorkerState::ALL.map(|state| {
        let count = cluster.workers.iter().filter(|w| w.state == state).count() as u64;
        (format!("state=\"{state}\""), count)
    });
    family(
        &mut out,
        "workers",
        "gauge",
        "Worker processes by state.",
        states,
    );
    family(
        &mut out,
        "workers_desired",
        "gauge",
        "Workers the cluster is scaled to.",
        [(String::new(), u64::from(cluster.desired))],
    );
    family(
        &mut out,
        "reloads_total",
        "counter",
        "Rolling reloads started.",
        [(String::new(), cluster.reloads)],
    );
    out
}

/// One metric family: HELP, TYPE and a sample per label set.
fn family(
    out: &mut String,
    name: &str,
    kind: &str,
    help: &str,
    samples: impl IntoIterator<Item = (String, u64)>,
) {
    let _ = writeln!(
        out,
        "# HELP cluster_lb_{name} {help}\n# TYPE cluster_lb_{name} {kind}"
    );
    for (labels, value) in samples {
        if labels.is_empty() {
            let _ = writeln!(out, "cluster_lb_{name} {value}");
        } else {
            let _ = writeln!(out, "cluster_lb_{name}{{{labels}}} {value}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::supervisor::fixture;

    #[test]
    fn exposition_has_one_sample_per_worker_and_state() {
        let worker = |id, pid, state| WorkerStatus {
            restarts: 2,
            selected: 100 + id as u64,
            migrated: 3,
            rss_bytes: 4096,
            ..fixture::worker(id, pid, state)
        };
        let cluster = ClusterStatus {
            uptime_s: 9.0,
            listen: vec!["127.0.0.1:80".into()],
            reloads: 5,
            ..fixture::cluster(
                2,
                vec![
                    worker(0, 10, WorkerState::Ready),
                    worker(1, 11, WorkerState::Draining),
                ],
            )
        };
        let text = render(&cluster);
        assert!(
            text.contains("cluster_lb_worker_selected_total{worker=\"1\",pid=\"11\"} 101\n"),
            "{text}"
        );
        assert!(text.contains("cluster_lb_workers{state=\"draining\"} 1\n"));
        assert!(text.contains("cluster_lb_workers{state=\"starting\"} 0\n"));
        assert!(text.contains("cluster_lb_reloads_total 5\n"));
        assert!(text.contains("# TYPE cluster_lb_worker_migrated_total counter\n"));
        assert!(text.contains("strategy=\"round-robin\"} 1\n"));
    }
}
