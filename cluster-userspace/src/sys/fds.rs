//! Descriptors: receiving them safely (cluster-lb-worker's `unix`, which both ends of a
//! worker's channel use), their flags and their inodes.

use std::{
    mem::MaybeUninit,
    os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
};

use serde::{Deserialize, Serialize};

pub use cluster_lb_worker::unix::{receive, set_nonblocking};

/// The inode of descriptor `fd` of this process (what /proc/PID/fd shows as `socket:[INODE]`),
/// if it is open. Any number may be asked about: one that is not open is `None`.
pub fn inode(fd: RawFd) -> Option<u64> {
    let mut stat = MaybeUninit::<libc::stat>::uninit();
    // SAFETY: fstat writes a whole stat into the buffer, or fails (EBADF for a number that is
    // not open) without touching it.
    if unsafe { libc::fstat(fd, stat.as_mut_ptr()) } != 0 {
        return None;
    }
    // SAFETY: fstat succeeded, so the stat is filled.
    Some(unsafe { stat.assume_init() }.st_ino)
}

/// A descriptor kept open across exec, with the inode it must still have (a number alone could
/// have been reused).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Inherited {
    pub fd: RawFd,
    pub inode: u64,
}

impl Inherited {
    /// Names `fd` for the state.
    pub fn of(fd: &impl AsRawFd) -> Option<Inherited> {
        let fd = fd.as_raw_fd();
        Some(Inherited {
            fd,
            inode: inode(fd)?,
        })
    }

    /// Takes ownership of the inherited descriptor, if it is still what the state says, and
    /// makes it close-on-exec again.
    pub fn take(self) -> Option<OwnedFd> {
        if inode(self.fd) != Some(self.inode) {
            return None;
        }
        let _ = self.set_cloexec(true);
        // SAFETY: the descriptor is open (fstat succeeded), was handed to this process for
        // this use, and nothing else here owns it.
        Some(unsafe { OwnedFd::from_raw_fd(self.fd) })
    }

    /// Whether the descriptor closes on exec.
    pub fn set_cloexec(self, cloexec: bool) -> std::io::Result<()> {
        let flags = if cloexec {
            nix::fcntl::FdFlag::FD_CLOEXEC
        } else {
            nix::fcntl::FdFlag::empty()
        };
        // SAFETY: only the flag of a descriptor this process holds is changed.
        let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(self.fd) };
        nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_SETFD(flags))
            .map(drop)
            .map_err(std::io::Error::from)
    }
}
