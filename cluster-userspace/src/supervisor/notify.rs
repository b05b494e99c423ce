//! `NOTIFY_SOCKET` for the workers: a datagram socket where programs that speak systemd's
//! notify protocol say `READY=1`. The kernel stamps each datagram with the sender's pid and uid
//! (SO_PASSCRED), so a worker cannot speak for another.
//!
//! Who can reach it: the socket is a file in a directory of its own (mkdtemp), which only the
//! workers' user and group can enter (root:GROUP 0710 and a socket root:GROUP 0620 for `--user`
//! workers, 0700 ours otherwise). An abstract name would be reachable by every process of the
//! network namespace, and /proc/net/unix shows every name: any local user could flood it and
//! slow every reload. Datagrams from a uid other than the workers' (or root's) are dropped
//! unread, should one come through a shared group.

use std::{
    os::{
        fd::{AsFd, OwnedFd},
        unix::{fs::PermissionsExt, net::UnixDatagram},
    },
    path::{Path, PathBuf},
};

use nix::sys::socket::{setsockopt, sockopt::PassCred};
use tokio::{io::unix::AsyncFd, sync::mpsc::UnboundedSender};

use super::upgrade::state::Inherited;

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
    pub fn of(credentials: Option<&crate::spawn::Credentials>) -> Senders {
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

/// Opens the socket and forwards `(sender pid, datagram text)` of datagrams that say READY=1
/// to `sink`. Returns the value for the workers' NOTIFY_SOCKET (a path), the socket's
/// descriptor (for an upgrade to hand over) and its directory.
pub fn open(
    sink: UnboundedSender<(i32, String)>,
    senders: Senders,
) -> std::io::Result<(String, Inherited, NotifyDir)> {
    let template = std::env::temp_dir().join(format!("{DIR_PREFIX}XXXXXX"));
    // mkdtemp: a new directory of a random name, mode 0700, ours.
    let dir = NotifyDir(nix::unistd::mkdtemp(&template)?);
    let path = dir.0.join("notify");
    let socket = UnixDatagram::bind(&path)?;
    socket.set_nonblocking(true)?;
    setsockopt(&socket, PassCred, &true)?;
    if let Some(gid) = senders.gid {
        // Only now open to the workers' group: root:GROUP, the directory enterable and the
        // socket writable by the group alone (a worker cannot replace the socket file).
        let group = Some(nix::unistd::Gid::from_raw(gid));
        nix::unistd::chown(&path, None, group)?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o620))?;
        nix::unistd::chown(&dir.0, None, group)?;
        std::fs::set_permissions(&dir.0, std::fs::Permissions::from_mode(0o710))?;
    }
    let fd = serve(OwnedFd::from(socket), sink, senders)?;
    Ok((path.display().to_string(), fd, dir))
}

/// Reads the bound socket `fd` (a new one, or one inherited in an upgrade) in the background.
pub fn serve(
    fd: OwnedFd,
    sink: UnboundedSender<(i32, String)>,
    senders: Senders,
) -> std::io::Result<Inherited> {
    cluster_lb_worker::unix::set_nonblocking(fd.as_fd())?;
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
                    if !senders.allows(uid) || !says_ready(&text) {
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
    let received = cluster_lb_worker::unix::receive(fd, &mut buffer, 0, true)?;
    let text = String::from_utf8_lossy(&buffer[..received.len]).into_owned();
    Ok(received.sender.map(|sender| (sender.pid, sender.uid, text)))
}

/// The session of `pid` (field 6 of /proc/PID/stat). Every worker leads a session of its own,
/// so READY=1 from a worker's helper processes (e.g. a shell wrapper's child) counts for it, and
/// no process of another worker can join that session to speak for it (a process group could
/// be joined from anywhere in the session).
pub fn session(pid: i32) -> Option<i32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces and parentheses; the fields after the last ')' do not.
    let after_name = &stat[stat.rfind(')')? + 1..];
    after_name.split_whitespace().nth(3)?.parse().ok()
}

/// Whether a notify datagram says READY=1 (one assignment per line).
pub fn says_ready(text: &str) -> bool {
    text.lines().any(|line| line.trim() == "READY=1")
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
    }

    #[test]
    fn own_session_is_read_from_proc() {
        let own = std::process::id() as i32;
        let expected = nix::unistd::getsid(None).unwrap().as_raw();
        assert_eq!(session(own), Some(expected));
        assert_eq!(session(-5), None);
    }
}
