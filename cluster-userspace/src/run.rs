//! `cluster-lb run`: a supervisor, plus the control socket and the metrics server the command
//! line asked for, both started from its [`Handle`](crate::supervisor::Handle). The supervisor
//! itself knows nothing of either.

use std::{net::SocketAddr, path::PathBuf};

use crate::{
    control::{self, ControlError},
    metrics::{self, MetricsError},
    supervisor::{self, Config, Supervisor, SupervisorError},
};

/// Everything `cluster-lb run` was asked to do.
#[derive(Debug, Clone)]
pub struct RunOptions {
    pub supervisor: Config,
    /// The control socket, and whether its path was asked for (`--control`) or is the default.
    pub control: Option<(PathBuf, bool)>,
    /// Where to serve Prometheus metrics.
    pub metrics: Option<SocketAddr>,
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Supervisor(#[from] SupervisorError),
    #[error(transparent)]
    Control(#[from] ControlError),
    #[error(transparent)]
    Metrics(#[from] MetricsError),
}

/// Runs the cluster on a current-thread runtime until it is stopped.
pub fn run(options: RunOptions) -> Result<(), RunError> {
    supervisor::block_on(async {
        let supervisor = Supervisor::new(options.supervisor)?;
        let handle = supervisor.handle();
        // Both before any worker starts, so a bad path or address is an error, not a surprise.
        let _control = match &options.control {
            Some((path, explicit)) => control::serve(path, *explicit, handle.clone())?,
            None => None,
        };
        if let Some(addr) = options.metrics {
            metrics::serve(addr, handle).await?;
        }
        supervisor.run().await;
        Ok(())
    })?
}
