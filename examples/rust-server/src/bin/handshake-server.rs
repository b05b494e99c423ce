//! A Rust worker that uses the cluster-lb-worker library, like a Node worker uses `cluster`:
//! `listen` gets its socket from the primary (IPC queryServer, or socket activation), and the
//! primary counts it ready only once it says `listening`. It answers user messages and stops
//! gracefully when the primary says `disconnect`. Outside cluster-lb it simply binds.
//!
//!   sudo cluster-lb run -w 4 -- target/debug/handshake-server 127.0.0.1:8080
//!
//! Messages, to show workers talking through the primary:
//!
//!   cluster-lb send --worker 1 '{"hi":1}'                       worker 1 answers {"echo": ...}
//!   cluster-lb send --worker 1 '{"forward":{"hi":1},"to":"others"}'
//!                            worker 1 sends {"hi":1} to the others, who each tell the primary
//!                            {"heard": {"hi":1}, "from": 1, "worker": ID}
//!   cluster-lb send --worker 1 '{"hang":true}'
//!                            worker 1 blocks its only thread for good, as a deadlock would:
//!                            connections wait in its queue, and `--hang-timeout` finds it

use std::process::ExitCode;

use cluster_lb_worker::{self as worker, Incoming, To};
use example_rust_server::{run, serve_http};
use serde_json::json;

fn main() -> ExitCode {
    let address = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:8080".into());
    run("handshake-server", serve(address))
}

async fn serve(address: String) -> std::io::Result<()> {
    // Say `online` at once, so the primary knows to wait for `listening`.
    worker::connect();
    // WARMUP_MS: pretend to warm caches before listening, to show that the primary sends no
    // connection here until `listening`.
    if let Some(ms) = std::env::var("WARMUP_MS")
        .ok()
        .and_then(|ms| ms.parse().ok())
    {
        tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
    }
    let listener = worker::listen(&address).await?;
    let id = worker::id().map_or("-".to_string(), |id| id.to_string());
    println!("handshake worker {id} pid {} serving", std::process::id());
    serve_http(listener, until_disconnected()).await;
    Ok(())
}

/// Answers messages until the primary says `disconnect` (or goes away): the primary's with an
/// echo, or by passing `forward` on to the workers `to` names; another worker's by telling the
/// primary what it heard from whom.
async fn until_disconnected() {
    if worker::is_primary() {
        // Run on its own: serve until killed.
        return std::future::pending().await;
    }
    while let Some(incoming) = worker::recv().await {
        let sent = match incoming {
            Incoming::Disconnect => return,
            Incoming::Message(data) if data.get("hang") == Some(&json!(true)) => {
                eprintln!("handshake-server: hanging, as asked");
                // The runtime has one thread: this stops the accept loop too.
                loop {
                    std::thread::sleep(std::time::Duration::from_secs(3600));
                }
            }
            Incoming::Message(data) => match forward(&data) {
                Some((to, message)) => worker::send_to(to, message).await,
                None => worker::send(json!({ "echo": data, "worker": worker::id() })).await,
            },
            Incoming::FromWorker { from, data } => {
                let heard = json!({ "heard": data, "from": from, "worker": worker::id() });
                worker::send(heard).await
            }
        };
        if let Err(e) = sent {
            eprintln!("handshake-server: a message was not sent: {e}");
        }
    }
}

/// `{"forward": MESSAGE, "to": ID | "all" | "others"}`: what to send to which workers.
fn forward(data: &serde_json::Value) -> Option<(To, serde_json::Value)> {
    let to = To::try_from(data.get("to")?.clone()).ok()?;
    Some((to, data.get("forward")?.clone()))
}
