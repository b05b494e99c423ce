//! `NOTIFY_SOCKET` for the workers: a datagram socket where programs that speak systemd's
//! notify protocol say `READY=1`. The kernel stamps each datagram with the sender's pid and uid
//! (SO_PASSCRED), so a worker cannot speak for another.
//!
//! Who can reach it: the socket is a file in a directory of its own (mkdtemp), which only the
//! workers' user and group can enter (root:GROUP 0710 and a socket root:GROUP 0620 for `--user`
//! workers, 0700 ours otherwise). Both are made with the workers' group as the filesystem gid
//! (setfsgid, which CAP_SETGID allows) rather than chowned: a container that grants only what
//! cluster-lb needs has no CAP_CHOWN. An abstract name would be reachable by every process of the
//! network namespace, and /proc/net/unix shows every name: any local user could flood it and
//! slow every reload. Datagrams from a uid other than the workers' (or root's) are dropped
//! unread, should one come through a shared group.

use std::{
    os::{
        fd::{AsFd, OwnedFd},
        unix::{
            fs::{MetadataExt, PermissionsExt},
            net::UnixDatagram,
        },
    },
    path::{Path, PathBuf},
};

use nix::sys::socket::{setsockopt, sockopt::PassCred};
use tokio::{io::unix::AsyncFd, sync::mpsc::UnboundedSender};

use super::saved::Inherited;

/// Datagrams passed on per second, at most: past that, nothing more is read until the second
/// is over, so a flood costs the primary no more than that many readiness checks a second.
const MAX_PER_SECOND: u32 = 200;

/// Who may send: the workers' user (and group, for the directory's permissions).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Senders {
    pub uid: libc::uid_t,
    /// Set for workers of another user than the primary's (`--user`).
    pub gid: Option<libc::gid_t>,
}

impl Senders {
    /// The workers of `credentials` (`None`: the primary's own user).
    pub fn of(credentials: Option<&crate::supervisor::launch::spawn::Credentials>) -> Senders {
        match credentials {
            Some(user) => Senders {
                uid: user.uid,
                gid: Some(user.gid),
            },
            None => Senders {
                uid: nix::unistd::geteuid().as_raw(),
                gid: None,
            },
        }
    }

    fn allows(&self, uid: libc::uid_t) -> bool {
        uid == self.uid || uid == 0
    }
}

/// The socket's private directory, removed with it when the primary is done.
#[derive(Debug)]
pub struct NotifyDir(PathBuf);

impl NotifyDir {
    /// The directory of a socket path an older binary made (an upgrade), to remove at the end.
    pub fn of_socket(path: &str) -> Option<NotifyDir> {
        let parent = Path::new(path).parent()?;
        let name = parent.file_name()?.to_str()?;
        name.starts_with(DIR_PREFIX)
            .then(|| NotifyDir(parent.to_path_buf()))
    }
}

impl Drop for NotifyDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

const DIR_PREFIX: &str = "cluster-lb-notify-";

/// The workers' notify socket.
pub struct NotifySocket {
    /// The value of the workers' NOTIFY_SOCKET (a path).
    pub name: String,
    /// Its descriptor, for an upgrade to hand over.
    pub fd: Inherited,
    /// Its directory, held to be removed (on drop) when the supervisor is done.
    pub _dir: Option<NotifyDir>,
}

/// Opens the socket and forwards `(sender pid, datagram text)` of datagrams that say READY=1
/// to `sink`.
pub fn open(
    sink: UnboundedSender<(i32, String)>,
    senders: Senders,
) -> std::io::Result<NotifySocket> {
    let (dir, socket) = with_group(senders.gid, || {
        let template = std::env::temp_dir().join(format!("{DIR_PREFIX}XXXXXX"));
        // mkdtemp: a new directory of a random name, mode 0700, ours.
        let dir = NotifyDir(nix::unistd::mkdtemp(&template)?);
        let socket = UnixDatagram::bind(dir.0.join("notify"))?;
        Ok((dir, socket))
    })?;
    let path = dir.0.join("notify");
    socket.set_nonblocking(true)?;
    setsockopt(&socket, PassCred, &true)?;
    if let Some(gid) = senders.gid {
        // Only now open to the workers' group (their files' group already): the directory
        // enterable and the socket writable by the group alone (a worker cannot replace the
        // socket file).
        for file in [&path, &dir.0] {
            let group = std::fs::metadata(file)?.gid();
            if group != gid {
                return Err(std::io::Error::other(format!(
                    "{} has group {group}, not the workers' {gid}",
                    file.display()
                )));
            }
        }
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o620))?;
        std::fs::set_permissions(&dir.0, std::fs::Permissions::from_mode(0o710))?;
    }
    let fd = serve(OwnedFd::from(socket), sink, senders)?;
    Ok(NotifySocket {
        name: path.display().to_string(),
        fd,
        _dir: Some(dir),
    })
}

/// Runs `make` with `gid` (when given) as this thread's filesystem group, so that what it
/// creates belongs to that group.
pub(super) fn with_group<T>(
    gid: Option<libc::gid_t>,
    make: impl FnOnce() -> std::io::Result<T>,
) -> std::io::Result<T> {
    let Some(gid) = gid else {
        return make();
    };
    // SAFETY: setfsgid changes only this thread's filesystem gid, and returns the old one.
    let previous = unsafe { libc::setfsgid(gid) };
    let made = make();
    // SAFETY: as above, back to what it was.
    unsafe { libc::setfsgid(previous as libc::gid_t) };
    made
}

/// Reads the bound socket `fd` (a new one, or one inherited in an upgrade) in the background.
pub fn serve(
    fd: OwnedFd,
    sink: UnboundedSender<(i32, String)>,
    senders: Senders,
) -> std::io::Result<Inherited> {
    crate::sys::fds::set_nonblocking(fd.as_fd())?;
    let named = Inherited::of(&fd).ok_or_else(|| std::io::Error::other("fstat failed"))?;
    // SAFETY: the AsyncFd owns the descriptor for as long as it is registered.
    let fd = unsafe { AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE) }
        .map_err(|e| e.into_parts().1)?;
    tokio::spawn(async move {
        let mut second = tokio::time::Instant::now();
        let mut passed = 0u32;
        loop {
            let Ok(mut guard) = fd.readable().await else {
                break;
            };
            match guard.try_io(|inner| receive(inner.get_ref().as_fd())) {
                Ok(Ok(Some((pid, uid, text)))) => {
                    if !senders.allows(uid) || !(says_ready(&text) || says_watchdog(&text)) {
                        continue;
                    }
                    if second.elapsed() >= std::time::Duration::from_secs(1) {
                        second = tokio::time::Instant::now();
                        passed = 0;
                    }
                    passed += 1;
                    if passed > MAX_PER_SECOND {
                        // A flood: read nothing more until the second is over. The kernel
                        // queue fills and holds the senders back, which costs us nothing.
                        let rest =
                            std::time::Duration::from_secs(1).saturating_sub(second.elapsed());
                        tokio::time::sleep(rest).await;
                        continue;
                    }
                    if sink.send((pid, text)).is_err() {
                        break;
                    }
                }
                Ok(Ok(None)) | Err(_) => {}
                Ok(Err(e)) => log::debug!("notify socket: {e}"),
            }
        }
    });
    Ok(named)
}

/// One datagram: (sender pid, sender uid, text); `None` without credentials.
fn receive(fd: std::os::fd::BorrowedFd<'_>) -> std::io::Result<Option<(i32, libc::uid_t, String)>> {
    let mut buffer = [0u8; 4096];
    let received = crate::sys::fds::receive(fd, &mut buffer, 0, true)?;
    let text = String::from_utf8_lossy(&buffer[..received.len]).into_owned();
    Ok(received.sender.map(|sender| (sender.pid, sender.uid, text)))
}

/// Whether a notify datagram says READY=1 (one assignment per line).
pub fn says_ready(text: &str) -> bool {
    text.lines().any(|line| line.trim() == "READY=1")
}

/// Whether a notify message says `WATCHDOG=1` (the sender is alive; see `--watchdog`).
pub fn says_watchdog(text: &str) -> bool {
    text.lines().any(|line| line.trim() == "WATCHDOG=1")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_lines_are_recognised() {
        assert!(says_ready("READY=1"));
        assert!(says_ready("STATUS=warming up\nREADY=1\n"));
        assert!(!says_ready("READY=0"));
        assert!(!says_ready("STATUS=READY=1"));
        assert!(says_watchdog("WATCHDOG=1\n"));
        assert!(!says_watchdog("READY=1"));
    }
}
