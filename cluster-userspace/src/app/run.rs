//! `cluster-lb run`: a supervisor, plus the control socket and the metrics server the command
//! line asked for, both started from its [`Handle`](crate::supervisor::Handle). The supervisor
//! itself knows nothing of either.

use std::net::SocketAddr;

use super::{
    control::{self, ControlError, ControlPath, Reply},
    metrics::{self, MetricsError},
    names::{self, ClusterName},
    watch::{self, WatchError},
};
use crate::supervisor::{
    self,
    saved::{Inherited, State},
    upgrade::{Kept, Resumed},
    Config, Supervisor, SupervisorError,
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
    /// `--log-file` and the size it is rotated at.
    pub log_file: Option<(std::path::PathBuf, u64)>,
    /// `--watch`: files and directories whose changes reload the workers.
    pub watch: Vec<std::path::PathBuf>,
}

/// With --log-file, SIGUSR1 reopens it (the file is opened before, in `app::main`).
fn reopen_log_file_on_usr1(options: &RunOptions) {
    use tokio::signal::unix::{signal, SignalKind};
    let Some((path, _)) = &options.log_file else {
        return;
    };
    let path = path.display().to_string();
    match signal(SignalKind::user_defined1()) {
        Ok(mut usr1) => {
            tokio::spawn(async move {
                while usr1.recv().await.is_some() {
                    crate::logging::file::reopen();
                    // This line is the first in the reopened file.
                    log::info!("SIGUSR1: reopened the log file {path}");
                }
            });
        }
        Err(error) => log::warn!("SIGUSR1 will not reopen the log file: {error}"),
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Supervisor(#[from] SupervisorError),
    #[error(transparent)]
    Control(#[from] ControlError),
    #[error(transparent)]
    Metrics(#[from] MetricsError),
    #[error(transparent)]
    Watch(#[from] WatchError),
}

/// With --watch, a change under the paths reloads the workers.
fn watch_files(
    paths: &[std::path::PathBuf],
    handle: &supervisor::Handle,
) -> Result<(), WatchError> {
    if paths.is_empty() {
        return Ok(());
    }
    watch::start(paths, handle.clone())
}

/// Runs the cluster on a current-thread runtime until it is stopped.
pub fn run(options: RunOptions) -> Result<(), RunError> {
    // A name taken is refused before any socket is bound or program loaded.
    if let Some(at) = &options.control {
        control::check_free(at, &options.name)?;
    }
    supervisor::block_on(async {
        reopen_log_file_on_usr1(&options);
        let mut supervisor = Supervisor::new(options.supervisor)?;
        let handle = supervisor.handle();
        // Both before any worker starts, so a bad path or address is an error, not a surprise.
        let control = match &options.control {
            Some(at) => {
                // Only now, so that a cluster that could not start leaves nothing behind.
                if let (ControlPath::Named(_), Some(dir)) = (at, at.path().parent()) {
                    names::ensure_run_dir(dir).map_err(ControlError::from)?;
                }
                control::serve(at, options.name.clone(), handle.clone())?
            }
            None => None,
        };
        watch_files(&options.watch, &handle)?;
        let metrics = match options.metrics {
            Some(addr) => metrics::serve(addr, handle).await?,
            None => None,
        };
        supervisor.keep_on_upgrade(Kept {
            control: control.as_ref().and_then(|c| c.fd),
            metrics,
        });
        supervisor.run().await;
        // `logs -f` clients get the last lines and an end, not a connection reset.
        control::end_followers(std::time::Duration::from_secs(1)).await;
        drop(control);
        Ok(())
    })?
}

/// Continues a cluster an older binary handed over in an upgrade (`state`): the same
/// workers, control socket and metrics listener, now served by this binary.
pub fn resume(options: RunOptions, state: State) -> Result<(), RunError> {
    supervisor::block_on(async {
        reopen_log_file_on_usr1(&options);
        let Resumed {
            mut supervisor,
            kept,
            requester,
            from,
        } = Supervisor::resume(options.supervisor, state)?;
        let handle = supervisor.handle();
        // The workers run already: a watch that cannot be had now is no reason to stop them.
        if let Err(error) = watch_files(&options.watch, &handle) {
            log::warn!("{error}; files are not watched (cluster-lb reload still reloads)");
        }
        let control = match (kept.control.and_then(Inherited::take), &options.control) {
            (Some(fd), Some(at)) => Some(control::adopt(
                fd,
                at,
                options.name.clone(),
                handle.clone(),
            )?),
            _ => None,
        };
        let metrics = kept
            .metrics
            .and_then(Inherited::take)
            .and_then(|fd| metrics::adopt(fd, handle).ok().flatten());
        supervisor.keep_on_upgrade(Kept {
            control: control.as_ref().and_then(|c| c.fd),
            metrics,
        });
        if let Some(connection) = requester {
            control::answer_upgrade(
                connection,
                &Reply::Upgraded {
                    from,
                    to: crate::version::version().to_string(),
                    pid: std::process::id(),
                    workers: supervisor.worker_count(),
                },
            );
        }
        supervisor.run().await;
        // `logs -f` clients get the last lines and an end, not a connection reset.
        control::end_followers(std::time::Duration::from_secs(1)).await;
        drop(control);
        Ok(())
    })?
}
