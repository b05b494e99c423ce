//! Descriptors that travel over Unix sockets (SCM_RIGHTS), and the sender's credentials
//! (SCM_CREDENTIALS), received in one place so that no path can leak them: both ends of a
//! worker's channel, Node's channel and the notify socket of the primary read through here.
//!
//! Why not nix's `recvmsg`: when the control buffer was too small (MSG_CTRUNC) its `cmsgs()`
//! fails, and the descriptors the kernel did install are never wrapped, so they stay open in
//! the primary for good. Here every descriptor the kernel installed becomes an [`OwnedFd`]
//! first, whatever the flags say, and the caller decides what the truncation means.

use std::{
    io::{self, IoSliceMut},
    mem,
    os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
    ptr,
};

/// One `recvmsg`.
#[derive(Debug)]
pub struct Received {
    /// Bytes read into the buffer (for a datagram cut short: the buffer's length).
    pub len: usize,
    /// Descriptors that came with them, close-on-exec, owned by the caller.
    pub fds: Vec<OwnedFd>,
    /// MSG_TRUNC: the datagram was longer than the buffer.
    pub truncated: bool,
    /// MSG_CTRUNC: more control data came than the buffer holds; the kernel closed the
    /// descriptors that did not fit (those in `fds` are still ours to close).
    pub control_truncated: bool,
    /// The sender's pid, uid and gid, when the socket has SO_PASSCRED.
    pub sender: Option<libc::ucred>,
}

impl Received {
    /// End of stream: nothing read and nothing attached.
    pub fn is_eof(&self) -> bool {
        self.len == 0 && self.fds.is_empty() && !self.control_truncated
    }
}

/// Reads one message from `socket` into `buffer`, with room for `max_fds` descriptors and,
/// when `credentials`, the sender's credentials. Fails with `WouldBlock` on a non-blocking
/// socket with nothing to read.
pub fn receive(
    socket: BorrowedFd<'_>,
    buffer: &mut [u8],
    max_fds: usize,
    credentials: bool,
) -> io::Result<Received> {
    let space = |bytes: usize| {
        // SAFETY: CMSG_SPACE only computes a size.
        unsafe { libc::CMSG_SPACE(bytes as u32) as usize }
    };
    let mut control_len = space(max_fds * mem::size_of::<libc::c_int>());
    if credentials {
        control_len += space(mem::size_of::<libc::ucred>());
    }
    // u64 words, so the buffer is aligned for cmsghdr.
    let mut control = vec![0u64; control_len.div_ceil(8)];
    let mut iov = [IoSliceMut::new(buffer)];
    // SAFETY: an all-zero msghdr is valid (no name, no iov, no control); the fields are set
    // right below.
    let mut header: libc::msghdr = unsafe { mem::zeroed() };
    header.msg_iov = iov.as_mut_ptr().cast();
    header.msg_iovlen = 1;
    header.msg_control = control.as_mut_ptr().cast();
    header.msg_controllen = control_len;
    // SAFETY: the header points at the live iov and control buffers above, with their lengths.
    let read = unsafe { libc::recvmsg(socket.as_raw_fd(), &mut header, libc::MSG_CMSG_CLOEXEC) };
    if read < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut received = Received {
        len: read as usize,
        fds: Vec::new(),
        truncated: header.msg_flags & libc::MSG_TRUNC != 0,
        control_truncated: header.msg_flags & libc::MSG_CTRUNC != 0,
        sender: None,
    };
    received.len = received.len.min(iov[0].len());
    // SAFETY: the kernel filled msg_control with msg_controllen bytes of well-formed cmsghdrs;
    // the CMSG_* macros walk exactly those, and each payload is read unaligned by value.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&header);
        while !cmsg.is_null() {
            let data = libc::CMSG_DATA(cmsg);
            let payload = ((*cmsg).cmsg_len as usize).saturating_sub(libc::CMSG_LEN(0) as usize);
            match ((*cmsg).cmsg_level, (*cmsg).cmsg_type) {
                (libc::SOL_SOCKET, libc::SCM_RIGHTS) => {
                    for i in 0..payload / mem::size_of::<libc::c_int>() {
                        let fd = ptr::read_unaligned(data.cast::<libc::c_int>().add(i));
                        // The kernel installed it for us: ours to own (and to close).
                        received.fds.push(OwnedFd::from_raw_fd(fd));
                    }
                }
                (libc::SOL_SOCKET, libc::SCM_CREDENTIALS)
                    if payload >= mem::size_of::<libc::ucred>() =>
                {
                    received.sender = Some(ptr::read_unaligned(data.cast::<libc::ucred>()));
                }
                _ => {}
            }
            cmsg = libc::CMSG_NXTHDR(&header, cmsg);
        }
    }
    Ok(received)
}

/// Sets O_NONBLOCK on a descriptor.
pub fn set_nonblocking(fd: BorrowedFd<'_>) -> io::Result<()> {
    use nix::fcntl::{fcntl, FcntlArg, OFlag};
    let flags = OFlag::from_bits_truncate(fcntl(fd, FcntlArg::F_GETFL)?);
    fcntl(fd, FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::socket::{
        sendmsg, socketpair, AddressFamily, ControlMessage, MsgFlags, SockFlag, SockType,
    };
    use std::io::IoSlice;
    use std::os::fd::AsFd;

    /// Sends `count` copies of a pipe's write end with one byte, closes the test's own copy,
    /// and receives with room for `room`. Also returns the read end: it sees EOF once every
    /// received copy is closed (counting the process's descriptors would see other tests').
    fn send_and_receive(count: usize, room: usize) -> (Received, std::fs::File) {
        let (a, b) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .unwrap();
        let (read, write) =
            nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC | nix::fcntl::OFlag::O_NONBLOCK)
                .unwrap();
        let fds = vec![write.as_raw_fd(); count];
        let cmsg = [ControlMessage::ScmRights(&fds)];
        sendmsg::<()>(
            a.as_raw_fd(),
            &[IoSlice::new(b"x")],
            &cmsg,
            MsgFlags::empty(),
            None,
        )
        .unwrap();
        drop(write);
        let mut buffer = [0u8; 16];
        let received = receive(b.as_fd(), &mut buffer, room, false).unwrap();
        (received, read.into())
    }

    fn closed_everywhere(mut read: &std::fs::File) -> bool {
        use std::io::Read;
        matches!(read.read(&mut [0u8; 1]), Ok(0))
    }

    #[test]
    fn descriptors_that_fit_are_owned_and_the_rest_are_flagged_not_leaked() {
        let (all, read) = send_and_receive(3, 4);
        assert_eq!(
            (all.len, all.fds.len(), all.control_truncated),
            (1, 3, false)
        );
        assert!(!closed_everywhere(&read), "received copies are open");
        drop(all);
        assert!(closed_everywhere(&read), "dropping closes them");
        let (cut, read) = send_and_receive(8, 2);
        assert!(
            cut.control_truncated,
            "more descriptors than room is flagged"
        );
        assert_eq!(cut.fds.len(), 2, "the ones that fit are handed over");
        drop(cut);
        assert!(closed_everywhere(&read), "nothing stays open once dropped");
    }

    #[test]
    fn credentials_name_the_sender() {
        let (a, b) = std::os::unix::net::UnixDatagram::pair().unwrap();
        nix::sys::socket::setsockopt(&b, nix::sys::socket::sockopt::PassCred, &true).unwrap();
        a.send(b"READY=1").unwrap();
        let mut buffer = [0u8; 64];
        let got = receive(b.as_fd(), &mut buffer, 0, true).unwrap();
        assert_eq!(&buffer[..got.len], b"READY=1");
        assert_eq!(got.sender.map(|c| c.pid), Some(std::process::id() as i32));
    }
}
