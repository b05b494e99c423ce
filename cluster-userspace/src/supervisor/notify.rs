//! `NOTIFY_SOCKET` for the workers: a datagram socket where programs that speak systemd's
//! notify protocol say `READY=1`. The kernel stamps each datagram with the sender's pid
//! (SO_PASSCRED), so a worker cannot speak for another.

use std::{
    io::IoSliceMut,
    os::{
        fd::{AsRawFd, OwnedFd},
        linux::net::SocketAddrExt,
        unix::net::{SocketAddr, UnixDatagram},
    },
};

use nix::sys::socket::{recvmsg, setsockopt, sockopt::PassCred, ControlMessageOwned, MsgFlags};
use tokio::{io::unix::AsyncFd, sync::mpsc::UnboundedSender};

use super::upgrade::state::Inherited;

/// Datagrams passed on per second, at most: more are read and dropped, so a flood costs the
/// primary a read each, not the work of a readiness check each.
const MAX_PER_SECOND: u32 = 200;

/// Opens the socket and forwards `(sender pid, datagram text)` of datagrams that say READY=1
/// to `sink`. Returns the value for the workers' NOTIFY_SOCKET: an abstract address, so a
/// worker running as another user needs no file permission to reach it. Its name is random:
/// a predictable one could be taken first by any local user, keeping cluster-lb from starting.
/// Also returns the socket's descriptor, for an upgrade to hand over.
pub fn open(sink: UnboundedSender<(i32, String)>) -> std::io::Result<(String, Inherited)> {
    let name = format!("cluster-lb/{}/notify", random_hex()?);
    let address = SocketAddr::from_abstract_name(name.as_bytes())?;
    let socket = UnixDatagram::bind_addr(&address)?;
    socket.set_nonblocking(true)?;
    setsockopt(&socket, PassCred, &true)?;
    let fd = serve(OwnedFd::from(socket), sink)?;
    Ok((format!("@{name}"), fd))
}

/// Reads the bound socket `fd` (a new one, or one inherited in an upgrade) in the background.
pub fn serve(fd: OwnedFd, sink: UnboundedSender<(i32, String)>) -> std::io::Result<Inherited> {
    nix::fcntl::fcntl(
        &fd,
        nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
    )?;
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
            match guard.try_io(|inner| receive(inner.get_ref().as_raw_fd())) {
                Ok(Ok(Some(message))) => {
                    if !says_ready(&message.1) {
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
                    if sink.send(message).is_err() {
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

/// 16 random bytes in hex.
fn random_hex() -> std::io::Result<String> {
    let mut bytes = [0u8; 16];
    // SAFETY: getrandom fills the buffer it is given.
    let filled = unsafe { libc::getrandom(bytes.as_mut_ptr().cast(), bytes.len(), 0) };
    if filled != bytes.len() as isize {
        return Err(std::io::Error::last_os_error());
    }
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

fn receive(fd: i32) -> std::io::Result<Option<(i32, String)>> {
    let mut buffer = [0u8; 4096];
    let mut control = nix::cmsg_space!(nix::sys::socket::UnixCredentials);
    let mut iov = [IoSliceMut::new(&mut buffer)];
    let message = recvmsg::<()>(fd, &mut iov, Some(&mut control), MsgFlags::empty())?;
    let mut sender = None;
    for cmsg in message.cmsgs()? {
        if let ControlMessageOwned::ScmCredentials(credentials) = cmsg {
            sender = Some(credentials.pid());
        }
    }
    let length = message.bytes;
    let text = String::from_utf8_lossy(&buffer[..length]).into_owned();
    Ok(sender.map(|pid| (pid, text)))
}

/// The process group of `pid` (field 5 of /proc/PID/stat), to accept READY=1 from a worker's
/// helper processes (e.g. a shell wrapper's child) as well as from the worker itself.
pub fn process_group(pid: i32) -> Option<i32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces and parentheses; the fields after the last ')' do not.
    let after_name = &stat[stat.rfind(')')? + 1..];
    after_name.split_whitespace().nth(2)?.parse().ok()
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
    fn own_process_group_is_read_from_proc() {
        let own = std::process::id() as i32;
        assert_eq!(process_group(own), Some(nix::unistd::getpgrp().as_raw()));
        assert_eq!(process_group(-5), None);
    }
}
