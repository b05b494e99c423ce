//! The balancers compared, each started the way its users start it, all serving the same
//! Node worker program (examples/node/server.js), plus cluster-lb with the Rust worker, and the
//! same unmodified Node cluster program (examples/node/cluster-app.js) under cluster-lb (Node's
//! own cluster protocol, its primary branch running too) and under Node's own primary (SCHED_RR
//! and SCHED_NONE).

use std::{
    net::TcpListener,
    os::{fd::AsRawFd, unix::process::CommandExt},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
};

use anyhow::{Context, Result};

use crate::root;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Contender {
    ClusterLb(&'static str),
    ClusterLbRust,
    SharedSocket,
    NodeClusterRr,
    NodeClusterNone,
    Pm2,
    /// examples/node/cluster-app.js, unchanged, under cluster-lb.
    ClusterLbNodeApp,
    /// examples/node/cluster-app.js run by node itself: its primary forks the workers.
    NodeAppRr,
    NodeAppNone,
}

pub const ALL: [Contender; 12] = [
    Contender::ClusterLb("round-robin"),
    Contender::ClusterLb("hash"),
    // Gives each connection to a worker with the fewest open: with more workers than cores,
    // the one round robin names may not be running while another waits idle.
    Contender::ClusterLb("least-loaded"),
    Contender::ClusterLb("kernel"),
    Contender::ClusterLbRust,
    Contender::SharedSocket,
    Contender::NodeClusterRr,
    Contender::NodeClusterNone,
    Contender::Pm2,
    Contender::ClusterLbNodeApp,
    Contender::NodeAppRr,
    Contender::NodeAppNone,
];

impl Contender {
    pub fn name(self) -> String {
        match self {
            Contender::ClusterLb(strategy) => format!("cluster-lb {strategy}"),
            Contender::ClusterLbRust => "cluster-lb round-robin (Rust worker)".into(),
            Contender::SharedSocket => "one shared accept socket".into(),
            Contender::NodeClusterRr => "Node cluster SCHED_RR".into(),
            Contender::NodeClusterNone => "Node cluster SCHED_NONE".into(),
            Contender::Pm2 => "PM2 cluster mode".into(),
            Contender::ClusterLbNodeApp => "unmodified cluster app: cluster-lb round-robin".into(),
            Contender::NodeAppRr => "unmodified cluster app: Node SCHED_RR".into(),
            Contender::NodeAppNone => "unmodified cluster app: Node SCHED_NONE".into(),
        }
    }

    pub fn is_cluster_lb(self) -> bool {
        matches!(
            self,
            Contender::ClusterLb(_) | Contender::ClusterLbRust | Contender::ClusterLbNodeApp
        )
    }

    /// Whether the contender has a primary whose CPU time means something.
    pub fn has_primary(self) -> bool {
        self != Contender::SharedSocket
    }
}

/// A started contender: the process we stop at the end (its primary, if it has one) and, for
/// the shared socket, the workers themselves.
pub struct Running {
    pub primary: Child,
    pub others: Vec<Child>,
}

pub struct Paths {
    pub cluster_lb: PathBuf,
    pub rust_worker: PathBuf,
    pub pm2_runtime: PathBuf,
    pub scratch: PathBuf,
}

pub const PORT: u16 = 8080;
/// The cluster-lb contenders' control socket, in the scratch folder.
pub const CONTROL_SOCKET: &str = "bench.sock";

pub fn start(contender: Contender, workers: u32, paths: &Paths) -> Result<Running> {
    let node_server = root().join("examples/node/server.js");
    let quiet = |command: &mut Command| {
        command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
    };
    let n = workers.to_string();
    let listen = format!("127.0.0.1:{PORT}");
    let mut command = match contender {
        Contender::ClusterLb(strategy) => {
            let mut c = Command::new(&paths.cluster_lb);
            c.args(["run", "-w", &n, "-l", &listen, "-s", strategy, "--control"])
                .arg(paths.scratch.join(CONTROL_SOCKET))
                .arg("--")
                .arg("node")
                .arg(&node_server);
            c
        }
        Contender::ClusterLbRust => {
            let mut c = Command::new(&paths.cluster_lb);
            c.args(["run", "-w", &n, "-l", &listen, "--control"])
                .arg(paths.scratch.join(CONTROL_SOCKET))
                .arg("--")
                .arg(&paths.rust_worker);
            c
        }
        Contender::ClusterLbNodeApp => {
            let mut c = Command::new(&paths.cluster_lb);
            c.args(["run", "-w", &n, "--control"])
                .arg(paths.scratch.join(CONTROL_SOCKET))
                .arg("--")
                .arg("node")
                .arg(root().join("examples/node/cluster-app.js"))
                // Its primary branch runs under cluster-lb too: its forks ask for the same N.
                .env("WORKERS", &n)
                .env("PORT", PORT.to_string());
            c
        }
        Contender::NodeAppRr | Contender::NodeAppNone => {
            let policy = if contender == Contender::NodeAppRr {
                "rr"
            } else {
                "none"
            };
            let mut c = Command::new("node");
            c.arg(root().join("examples/node/cluster-app.js"))
                .env("NODE_CLUSTER_SCHED_POLICY", policy)
                .env("WORKERS", &n)
                .env("PORT", PORT.to_string());
            c
        }
        Contender::SharedSocket => return shared_socket(workers, &node_server),
        Contender::NodeClusterRr | Contender::NodeClusterNone => {
            let policy = if contender == Contender::NodeClusterRr {
                "rr"
            } else {
                "none"
            };
            let mut c = Command::new("node");
            c.arg(root().join("bench/node-cluster.js"))
                .env("NODE_CLUSTER_SCHED_POLICY", policy)
                .env("WORKERS", &n)
                .env("PORT", PORT.to_string());
            c
        }
        Contender::Pm2 => {
            let mut c = Command::new(&paths.pm2_runtime);
            c.arg("start")
                .arg(&node_server)
                .args(["-i", &n])
                .env("PORT", PORT.to_string())
                .env("PM2_HOME", paths.scratch.join("pm2-home"));
            c
        }
    };
    quiet(&mut command);
    let primary = command
        .spawn()
        .with_context(|| format!("starting {}", contender.name()))?;
    Ok(Running {
        primary,
        others: Vec::new(),
    })
}

/// N Node workers accepting on one socket that they all inherit as fd 3: what
/// Node's SCHED_NONE and a pre-fork server do, without a primary in the way.
fn shared_socket(workers: u32, server: &Path) -> Result<Running> {
    let listener = TcpListener::bind(("127.0.0.1", PORT)).context("binding the shared socket")?;
    let fd = listener.as_raw_fd();
    let mut children = Vec::new();
    for id in 0..workers {
        children.push(
            socket_activated_node(id, fd, server).context("starting a shared-socket worker")?,
        );
    }
    let primary = children.remove(0);
    Ok(Running {
        primary,
        others: children,
    })
}

/// `node server.js` as worker `id`, with the listening socket `fd` as its fd 3 (socket
/// activation, as cluster-lb starts workers).
pub fn socket_activated_node(id: impl ToString, fd: i32, server: &Path) -> Result<Child> {
    let mut command = Command::new("sh");
    command
        .arg("-c")
        .arg(format!(
            "export LISTEN_PID=$$; exec node {}",
            server.display()
        ))
        .env("LISTEN_FDS", "1")
        .env("CLUSTER_LB_WORKER_ID", id.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    // SAFETY: dup2 and fcntl are async-signal-safe; this runs between fork and exec only.
    unsafe {
        command.pre_exec(move || {
            // dup2 onto itself would leave close-on-exec set, so clear it by hand then.
            let ok = if fd == 3 {
                libc::fcntl(fd, libc::F_SETFD, 0) >= 0
            } else {
                libc::dup2(fd, 3) >= 0
            };
            if !ok {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    Ok(command.spawn()?)
}

impl Running {
    pub fn stop(mut self) {
        for child in std::iter::once(&mut self.primary).chain(self.others.iter_mut()) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(child.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        for child in std::iter::once(&mut self.primary).chain(self.others.iter_mut()) {
            while matches!(child.try_wait(), Ok(None)) && std::time::Instant::now() < deadline {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
