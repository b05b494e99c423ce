//! `cluster-lb run`: a supervisor, plus the control socket and the metrics server the command
//! line asked for, both started from its [`Handle`](crate::supervisor::Handle). The supervisor
//! itself knows nothing of either.

use std::net::SocketAddr;

use crate::{
    control::{self, ControlError, ControlPath},
    metrics::{self, MetricsError},
    names::{self, ClusterName},
    supervisor::{self, Config, Supervisor, SupervisorError},
};

/// Everything `cluster-lb run` was asked to do.
#[derive(Debug, Clone)]
pub struct RunOptions {
    pub supervisor: Config,
    /// The cluster's name (`--name`, or one made from its first address or its program).
    pub name: ClusterName,
    /// The control socket: `--control PATH`, or the name's socket in the run directory.
    pub control: Option<ControlPath>,
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
    // A name taken is refused before any socket is bound or program loaded.
    if let Some(at) = &options.control {
        control::check_free(at, &options.name)?;
    }
    supervisor::block_on(async {
        let supervisor = Supervisor::new(options.supervisor)?;
        let handle = supervisor.handle();
        // Both before any worker starts, so a bad path or address is an error, not a surprise.
        let _control = match &options.control {
            Some(at) => {
                // Only now, so that a cluster that could not start leaves nothing behind.
                if let (ControlPath::Named(_), Some(dir)) = (at, at.path().parent()) {
                    names::ensure_run_dir(dir).map_err(ControlError::from)?;
                }
                control::serve(at, options.name.clone(), handle.clone())?
            }
            None => None,
        };
        if let Some(addr) = options.metrics {
            metrics::serve(addr, handle).await?;
        }
        supervisor.run().await;
        Ok(())
    })?
}
