//! pidfds (Linux 5.3+): a descriptor for a process, to wait for its exit and reap it without
//! waiting for "any child", and (5.6+) to copy one of its descriptors.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use nix::unistd::Pid;

/// `waitid`'s id type for a pidfd (linux/wait.h); the libc crate does not name it.
const P_PIDFD: libc::idtype_t = 3;

/// How a worker process ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExitStatus {
    Code(i32),
    Signal(nix::sys::signal::Signal),
}

impl std::fmt::Display for ExitStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ExitStatus::Code(code) => write!(f, "exited with status {code}"),
            ExitStatus::Signal(signal) => write!(f, "was killed by {signal}"),
        }
    }
}

pub fn pidfd_open(pid: Pid) -> std::io::Result<OwnedFd> {
    // SAFETY: a plain system call; on success it returns a new descriptor that we own.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid.as_raw(), 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the kernel just gave us this descriptor.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Reaps the process of `pidfd` if it exited (WNOHANG): how it ended.
pub fn reap_pidfd(pidfd: &OwnedFd) -> Option<ExitStatus> {
    // SAFETY: an all-zero siginfo_t is a valid value (plain integers and unions of them).
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    // SAFETY: waitid fills `info`, which lives through the call, and touches nothing else.
    let result = unsafe {
        libc::waitid(
            P_PIDFD,
            pidfd.as_raw_fd() as libc::id_t,
            &mut info,
            libc::WEXITED | libc::WNOHANG,
        )
    };
    // SAFETY: after a successful waitid, si_pid and si_status are the fields it set.
    if result != 0 || unsafe { info.si_pid() } == 0 {
        return None; // reaped by someone else, or not exited yet
    }
    // SAFETY: as above, for si_status.
    let status = unsafe { info.si_status() };
    match info.si_code {
        libc::CLD_EXITED => Some(ExitStatus::Code(status)),
        _ => nix::sys::signal::Signal::try_from(status)
            .ok()
            .map(ExitStatus::Signal),
    }
}

/// Whether `pid` has exited, without reaping it (the poller's view).
pub fn has_exited(pid: Pid) -> bool {
    // SAFETY: as in reap_pidfd.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    // SAFETY: as in reap_pidfd; WNOWAIT leaves the child to be reaped later.
    let result = unsafe {
        libc::waitid(
            libc::P_PID,
            pid.as_raw() as libc::id_t,
            &mut info,
            libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
        )
    };
    // SAFETY: after waitid, si_pid is the field it set (0 when nothing exited).
    result != 0 || unsafe { info.si_pid() } != 0
}

/// A copy of descriptor `fd` of process `pid` (pidfd_getfd, Linux 5.6+).
pub fn take_fd(pid: i32, fd: i32) -> std::io::Result<OwnedFd> {
    let pidfd = pidfd_open(Pid::from_raw(pid))?;
    // SAFETY: plain system call; on success it returns a new descriptor we own.
    let copy = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), fd, 0) };
    if copy < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the kernel just gave us this descriptor (close-on-exec, as pidfd_getfd makes it).
    Ok(unsafe { OwnedFd::from_raw_fd(copy as i32) })
}
