//! A program that is its own primary, the Node `cluster` idiom:
//!
//!   if is_primary() { start workers (copies of this program) } else { serve }
//!
//! The primary prints every worker event, greets each worker once it listens, and prints the
//! answers. Ctrl-C (or TERM) stops it gracefully. Needs root for the eBPF program (without it
//! the kernel's own SO_REUSEPORT hash balances).
//!
//!   sudo target/debug/embedded-cluster 127.0.0.1:8080

use std::process::ExitCode;

use cluster_lb::{
    supervisor::{Config, Event, Supervisor},
    worker::{self, Incoming},
};
use example_rust_server::{run, serve_http};
use serde_json::json;

fn main() -> ExitCode {
    let address = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:8080".into());
    if worker::is_primary() {
        run("embedded-cluster", primary())
    } else {
        run("embedded-cluster worker", serve(address))
    }
}

async fn primary() -> std::io::Result<()> {
    cluster_lb::logging::init(cluster_lb::logging::Format::Text);
    let config = Config::reexec_current(2)?;
    let mut supervisor = Supervisor::new(config).map_err(std::io::Error::other)?;
    let handle = supervisor.handle();
    let mut events = supervisor.subscribe();
    let watch = async move {
        while let Some(event) = events.recv().await {
            println!("primary saw: {}", event.name());
            if let Event::Listening { pid, id, .. } = event {
                handle.send(pid, json!({ "hello": id }));
            }
            if let Event::Message { id, data, .. } = event {
                println!("primary got from worker {id}: {data}");
            }
        }
    };
    tokio::join!(supervisor.run(), watch);
    Ok(())
}

async fn serve(address: String) -> std::io::Result<()> {
    let listener = worker::listen(&address).await?;
    println!(
        "embedded worker {:?} pid {} serving",
        worker::id(),
        std::process::id()
    );
    serve_http(listener, async {
        while let Some(incoming) = worker::recv().await {
            match incoming {
                Incoming::Disconnect => return,
                Incoming::Message(data) => {
                    let _ = worker::send(json!({ "reply": data, "from": worker::id() })).await;
                }
                // Its workers do not address each other.
                Incoming::FromWorker { .. } => {}
            }
        }
    })
    .await;
    Ok(())
}
