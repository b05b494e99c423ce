//! `cluster-lb run --watch PATH`: a development mode. When a file under a watched path
//! changes, the cluster does a rolling reload, exactly as `cluster-lb reload` (replacement
//! ready first, no request failed), started from the supervisor's `Handle` like the control
//! socket; the supervisor knows nothing of files.
//!
//! `tree`: the inotify watches (recursive, new directories included, `ignore`'s names left
//! out); `debounce`: when changes become one reload, and that reloads never overlap.

mod debounce;
mod ignore;
mod tree;

use std::{path::PathBuf, time::Instant};

use tokio::{
    io::{unix::AsyncFd, Interest},
    task::JoinHandle,
};

use crate::supervisor::{Handle, ReloadError};
use debounce::{Batch, Debounce, MOST, QUIET};
use tree::{Tree, TreeError};

#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    #[error(transparent)]
    Tree(#[from] TreeError),
    #[error("cannot watch files: registering the inotify descriptor with the runtime: {0}")]
    Register(std::io::Error),
}

/// Watches `paths` (each must exist) and reloads the cluster `handle` controls when something
/// under them changes, from a task of the current runtime, until the cluster stops.
pub fn start(paths: &[PathBuf], handle: Handle) -> Result<(), WatchError> {
    let tree = Tree::new(paths)?;
    let directories = tree.directories();
    // SAFETY: the Tree owns its inotify descriptor and neither closes nor replaces it while it
    // lives, and the AsyncFd owns the Tree.
    let fd = unsafe { AsyncFd::register_with_interest(tree, Interest::READABLE) }
        .map_err(|e| WatchError::Register(e.into_parts().1))?;
    let names: Vec<String> = paths.iter().map(|p| p.display().to_string()).collect();
    log::info!(
        "watch: watching {} ({directories} directories; node_modules, .git and editors' temporary files left out): a change reloads the workers",
        names.join(", ")
    );
    tokio::spawn(watch(fd, handle));
    Ok(())
}

/// The watcher: reads changes, and runs one reload at a time when the debounce says so.
async fn watch(mut fd: AsyncFd<Tree>, handle: Handle) {
    let mut debounce = Debounce::new(QUIET, MOST);
    let mut reload: Option<JoinHandle<Result<u32, ReloadError>>> = None;
    loop {
        let deadline = debounce.deadline();
        tokio::select! {
            ready = fd.readable_mut() => {
                let mut guard = match ready {
                    Ok(guard) => guard,
                    Err(error) => {
                        log::error!("watch: cannot wait for file changes: {error}; files are no longer watched (cluster-lb reload still reloads)");
                        return;
                    }
                };
                match guard.try_io(|tree| tree.get_mut().read()) {
                    Ok(Ok(changed)) => {
                        let now = Instant::now();
                        for path in changed {
                            debounce.changed(path, now);
                        }
                    }
                    Ok(Err(error)) => {
                        log::error!("watch: cannot read file changes: {error}; files are no longer watched (cluster-lb reload still reloads)");
                        return;
                    }
                    Err(_would_block) => {}
                }
            }
            () = until(deadline) => {}
            outcome = finished(&mut reload) => {
                reload = None;
                debounce.finished();
                match outcome {
                    Ok(Ok(_)) => {}
                    Ok(Err(ReloadError::Stopping)) => return,
                    // The supervisor logged why; the old workers serve on.
                    Ok(Err(_)) => log::warn!("watch: the reload failed and the old workers keep serving; the next change reloads again"),
                    Err(error) => log::error!("watch: the reload task ended: {error}"),
                }
            }
        }
        if let Some(batch) = debounce.due(Instant::now()) {
            log::info!("watch: {}: reloading", describe(&batch));
            let handle = handle.clone();
            reload = Some(tokio::spawn(
                async move { reload_for_change(&handle).await },
            ));
        }
    }
}

/// "3 changes, first ./src/app.js".
fn describe(batch: &Batch) -> String {
    let changes = if batch.count == 1 {
        "change"
    } else {
        "changes"
    };
    format!("{} {changes}, first {}", batch.count, batch.first.display())
}

/// Sleeps until `deadline`; forever without one.
async fn until(deadline: Option<Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

/// The outcome of the reload under way; never, without one.
async fn finished<T>(reload: &mut Option<JoinHandle<T>>) -> Result<T, tokio::task::JoinError> {
    match reload {
        Some(task) => task.await,
        None => std::future::pending().await,
    }
}

/// A rolling reload that starts after the change. A reload already under way (`cluster-lb
/// reload`, SIGHUP) when this one is asked for is joined, not started again; it may have
/// replaced some workers before the change, so then one more follows it.
async fn reload_for_change(handle: &Handle) -> Result<u32, ReloadError> {
    let before = reloads(handle).await;
    let outcome = handle.reload().await;
    let joined = before.is_some() && reloads(handle).await == before;
    if !joined || matches!(outcome, Err(ReloadError::Stopping)) {
        return outcome;
    }
    log::info!("watch: the reload under way had begun before the change; reloading once more");
    handle.reload().await
}

/// How many reloads the cluster began so far (a joined one is not counted again).
async fn reloads(handle: &Handle) -> Option<u64> {
    handle.status().await.map(|status| status.reloads)
}
