//! One end of a worker's IPC channel: an AF_UNIX SOCK_SEQPACKET socket, so message boundaries
//! are kept by the kernel and a listening socket can ride along a message (SCM_RIGHTS).

use std::{
    io::{self, IoSlice},
    os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd},
};

use nix::sys::socket::{
    sendmsg, socketpair, AddressFamily, ControlMessage, MsgFlags, SockFlag, SockType,
};
use tokio::io::{unix::AsyncFd, Interest};

use super::protocol::MAX_MESSAGE;

/// One datagram as received.
#[derive(Debug)]
pub struct Datagram {
    pub bytes: Vec<u8>,
    /// Descriptors that came with it (already close-on-exec).
    pub fds: Vec<OwnedFd>,
    /// The datagram was longer than [`MAX_MESSAGE`]; `bytes` holds only its start.
    pub truncated: bool,
    /// More descriptors came than [`MAX_FDS`]: the kernel closed the rest.
    pub fds_truncated: bool,
}

/// Descriptors one receive takes; any more are closed by the kernel and flagged.
pub const MAX_FDS: usize = 4;

/// A new channel: (primary's end, worker's end). Both close-on-exec; the spawner moves the
/// worker's end to the fd the worker is told about.
pub fn pair() -> io::Result<(OwnedFd, OwnedFd)> {
    socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC,
    )
    .map_err(io::Error::from)
}

pub struct Endpoint {
    fd: AsyncFd<OwnedFd>,
}

impl Endpoint {
    /// Registers `fd` with the current tokio runtime (and makes it non-blocking).
    pub fn new(fd: OwnedFd) -> io::Result<Endpoint> {
        crate::unix::set_nonblocking(fd.as_fd())?;
        // SAFETY: the AsyncFd owns the OwnedFd, so the descriptor stays open and the same for
        // as long as it is registered.
        let fd =
            unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE | Interest::WRITABLE) }
                .map_err(|e| e.into_parts().1)?;
        Ok(Endpoint { fd })
    }

    /// The channel's descriptor (to hand it over in an upgrade).
    pub fn as_raw_fd(&self) -> RawFd {
        self.fd.get_ref().as_raw_fd()
    }

    /// The inherited channel of a worker: `fd` is the number in CLUSTER_LB_IPC_FD.
    ///
    /// # Safety
    /// `fd` must be an open SOCK_SEQPACKET socket that nothing else in the process owns.
    pub unsafe fn from_inherited(fd: RawFd) -> io::Result<Endpoint> {
        // SAFETY: the caller promises `fd` is an open socket nothing else owns.
        let owned = unsafe { OwnedFd::from_raw_fd(fd) };
        nix::fcntl::fcntl(
            &owned,
            nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
        )?;
        Endpoint::new(owned)
    }

    /// Sends one datagram, optionally with one descriptor.
    pub async fn send(&self, bytes: &[u8], fd: Option<BorrowedFd<'_>>) -> io::Result<()> {
        loop {
            let mut guard = self.fd.writable().await?;
            match guard.try_io(|inner| send_now(inner.get_ref().as_raw_fd(), bytes, fd)) {
                Ok(result) => return result,
                Err(_would_block) => continue,
            }
        }
    }

    /// Sends without waiting; fails with WouldBlock when the peer's queue is full.
    pub fn try_send(&self, bytes: &[u8], fd: Option<BorrowedFd<'_>>) -> io::Result<()> {
        send_now(self.fd.get_ref().as_raw_fd(), bytes, fd)
    }

    /// The next datagram; `None` when the peer closed its end.
    pub async fn recv(&self) -> io::Result<Option<Datagram>> {
        loop {
            let mut guard = self.fd.readable().await?;
            match guard.try_io(|inner| recv_now(inner.get_ref().as_raw_fd())) {
                Ok(result) => return result,
                Err(_would_block) => continue,
            }
        }
    }
}

fn send_now(socket: RawFd, bytes: &[u8], fd: Option<BorrowedFd<'_>>) -> io::Result<()> {
    let iov = [IoSlice::new(bytes)];
    let fds = fd.map(|fd| [fd.as_raw_fd()]);
    let cmsgs: Vec<ControlMessage<'_>> = fds.iter().map(|f| ControlMessage::ScmRights(f)).collect();
    let sent = sendmsg::<()>(socket, &iov, &cmsgs, MsgFlags::MSG_NOSIGNAL, None)?;
    if sent != bytes.len() {
        return Err(io::Error::other("short send on a SOCK_SEQPACKET socket"));
    }
    Ok(())
}

fn recv_now(socket: RawFd) -> io::Result<Option<Datagram>> {
    let mut buffer = vec![0u8; MAX_MESSAGE + 1];
    // SAFETY: `socket` is the endpoint's own descriptor, open for the whole call.
    let socket = unsafe { BorrowedFd::borrow_raw(socket) };
    // Room for more descriptors than any message carries (one), so that a sender attaching
    // several still has all of them received, owned and closed here.
    let received = crate::unix::receive(socket, &mut buffer, MAX_FDS, false)?;
    if received.is_eof() {
        return Ok(None);
    }
    buffer.truncate(received.len);
    let truncated = received.truncated || received.len > MAX_MESSAGE;
    Ok(Some(Datagram {
        bytes: buffer,
        fds: received.fds,
        truncated,
        fds_truncated: received.control_truncated,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    #[tokio::test]
    async fn datagrams_keep_their_boundaries_and_carry_descriptors() {
        let (a, b) = pair().unwrap();
        let (a, b) = (Endpoint::new(a).unwrap(), Endpoint::new(b).unwrap());
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        a.send(b"first", None).await.unwrap();
        a.send(b"second", Some(listener.as_fd())).await.unwrap();

        let first = b.recv().await.unwrap().unwrap();
        assert_eq!(
            (first.bytes.as_slice(), first.fds.len()),
            (&b"first"[..], 0)
        );
        let second = b.recv().await.unwrap().unwrap();
        assert_eq!(second.bytes, b"second");
        assert_eq!(second.fds.len(), 1);
        let passed = std::net::TcpListener::from(second.fds.into_iter().next().unwrap());
        assert_eq!(
            passed.local_addr().unwrap().port(),
            port,
            "the same socket arrived"
        );

        drop(a);
        assert!(
            b.recv().await.unwrap().is_none(),
            "EOF once the peer closed"
        );
    }

    #[tokio::test]
    async fn oversized_datagrams_are_flagged_not_split() {
        let (a, b) = pair().unwrap();
        let (a, b) = (Endpoint::new(a).unwrap(), Endpoint::new(b).unwrap());
        a.send(&vec![b'x'; MAX_MESSAGE + 100], None).await.unwrap();
        a.send(b"next", None).await.unwrap();
        let big = b.recv().await.unwrap().unwrap();
        assert!(big.truncated);
        assert_eq!(b.recv().await.unwrap().unwrap().bytes, b"next");
    }
}
