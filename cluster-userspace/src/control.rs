//! The control socket: a Unix stream socket (mode 0600) where `cluster-lb status | reload |
//! scale N | stop` reach a running primary. One JSON request line in, one JSON answer line out.

use std::{
    io::{BufRead, BufReader, Write},
    os::unix::{fs::PermissionsExt, net::UnixStream},
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};

use crate::supervisor::{Control, Handle};

/// Longest request line accepted.
const MAX_REQUEST: u64 = 4096;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "lowercase", deny_unknown_fields)]
pub enum Request {
    Status,
    Reload,
    Scale { workers: u32 },
    Stop,
}

/// Where the control socket lives unless `--control` says otherwise.
pub fn default_path() -> PathBuf {
    if nix::unistd::geteuid().is_root() {
        return PathBuf::from("/run/cluster-lb.sock");
    }
    match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(dir) => Path::new(&dir).join("cluster-lb.sock"),
        None => std::env::temp_dir().join(format!("cluster-lb-{}.sock", nix::unistd::geteuid())),
    }
}

/// Removes the socket file when the primary ends.
pub struct ControlSocket {
    path: PathBuf,
}

impl Drop for ControlSocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Listens on `path`. A socket file nobody answers on is stale and replaced. When another
/// primary answers there: an error if the path was asked for, else a warning and no control
/// socket (so a second cluster on the host still runs; give it --control to manage it).
pub fn serve(path: &Path, explicit: bool, handle: Handle) -> Result<Option<ControlSocket>> {
    if path.exists() {
        if UnixStream::connect(path).is_ok() {
            if explicit {
                bail!("control socket {} is in use by another cluster-lb; pass another --control PATH", path.display());
            }
            log::warn!(
                "control socket {} is in use by another cluster-lb; this one has none (pass --control PATH to manage it)",
                path.display()
            );
            return Ok(None);
        }
        std::fs::remove_file(path).with_context(|| format!("removing stale {}", path.display()))?;
    }
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("creating {}", parent.display()))?;
    }
    let listener = match tokio::net::UnixListener::bind(path) {
        Ok(listener) => listener,
        Err(e) if !explicit => {
            log::warn!(
                "no control socket: cannot create {}: {e} (pass --control PATH)",
                path.display()
            );
            return Ok(None);
        }
        Err(e) => {
            return Err(e)
                .with_context(|| format!("cannot create the control socket {}", path.display()))
        }
    };
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("chmod 0600 {}", path.display()))?;
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let handle = handle.clone();
            tokio::spawn(async move {
                if let Err(e) = answer(stream, handle).await {
                    log::debug!("control connection: {e:#}");
                }
            });
        }
    });
    Ok(Some(ControlSocket {
        path: path.to_path_buf(),
    }))
}

async fn answer(stream: tokio::net::UnixStream, handle: Handle) -> Result<()> {
    let (reader, mut writer) = stream.into_split();
    let mut line = String::new();
    tokio::io::BufReader::new(reader.take(MAX_REQUEST))
        .read_line(&mut line)
        .await?;
    let reply = match serde_json::from_str::<Request>(line.trim()) {
        Err(e) => json!({"ok": false, "error": format!("bad request: {e}")}),
        Ok(request) => execute(request, &handle).await,
    };
    writer.write_all(format!("{reply}\n").as_bytes()).await?;
    Ok(())
}

async fn execute(request: Request, handle: &Handle) -> Value {
    match request {
        Request::Status => match handle.status().await {
            Some(status) => json!({"ok": true, "status": status}),
            None => json!({"ok": false, "error": "the primary is stopping"}),
        },
        Request::Reload => match handle.reload().await {
            Ok(message) => json!({"ok": true, "message": message}),
            Err(error) => json!({"ok": false, "error": error}),
        },
        Request::Scale { workers } => {
            if workers == 0 || workers > crate::cli::MAX_WORKERS {
                return json!({"ok": false, "error": format!("workers must be 1..={}", crate::cli::MAX_WORKERS)});
            }
            handle.scale(workers);
            json!({"ok": true, "message": format!("scaling to {workers} workers")})
        }
        Request::Stop => {
            handle.request(Control::Stop { fast: false });
            json!({"ok": true, "message": "stopping"})
        }
    }
}

/// Client side: sends `request` to the primary at `path` and returns its answer.
pub fn request(path: &Path, request: &Request, timeout: Duration) -> Result<Value> {
    let mut stream = UnixStream::connect(path).with_context(|| {
        format!(
            "cannot reach a cluster-lb primary at {} (is it running? is --control right?)",
            path.display()
        )
    })?;
    stream.set_read_timeout(Some(timeout))?;
    let line = serde_json::to_string(request)?;
    stream.write_all(format!("{line}\n").as_bytes())?;
    let mut answer = String::new();
    BufReader::new(stream)
        .read_line(&mut answer)
        .context("reading the primary's answer")?;
    let value: Value =
        serde_json::from_str(answer.trim()).context("the primary's answer is not JSON")?;
    if value["ok"] != json!(true) {
        bail!(
            "{}",
            value["error"].as_str().unwrap_or("the primary refused")
        );
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_have_the_documented_shape() {
        assert_eq!(
            serde_json::to_string(&Request::Status).unwrap(),
            r#"{"cmd":"status"}"#
        );
        assert_eq!(
            serde_json::from_str::<Request>(r#"{"cmd":"scale","workers":3}"#).unwrap(),
            Request::Scale { workers: 3 }
        );
        assert!(serde_json::from_str::<Request>(r#"{"cmd":"format-disk"}"#).is_err());
    }
}
