//! What /proc says about a worker's sockets, for the checks the primary runs every few seconds:
//! the listening TCP sockets a process holds, by inode and address.

use std::{collections::HashSet, fs, net::SocketAddr, os::fd::AsFd};

/// The inode of a socket (what /proc/PID/fd shows as `socket:[INODE]`).
pub fn inode(socket: impl AsFd) -> Option<u64> {
    nix::sys::stat::fstat(socket).ok().map(|stat| stat.st_ino)
}

/// Whether this process may list `pid`'s descriptors. A worker of another user needs
/// CAP_SYS_PTRACE (and CAP_DAC_READ_SEARCH) for that; without them an empty listing would look
/// like a worker that closed every socket.
pub fn fds_readable(pid: i32) -> bool {
    fs::read_dir(format!("/proc/{pid}/fd")).is_ok()
}

/// The socket inodes process `pid` holds.
pub fn socket_inodes(pid: i32) -> HashSet<u64> {
    let Ok(entries) = fs::read_dir(format!("/proc/{pid}/fd")) else {
        return HashSet::new();
    };
    entries
        .filter_map(|entry| fs::read_link(entry.ok()?.path()).ok())
        .filter_map(|target| {
            let text = target.to_string_lossy().into_owned();
            text.strip_prefix("socket:[")?
                .strip_suffix(']')?
                .parse()
                .ok()
        })
        .collect()
}

/// The TCP sockets in LISTEN state in this network namespace: (inode, address); `None` when
/// the kernel cannot say (inet_diag is a module, and a container or an initramfs may lack
/// it). Asked of the kernel with a sock_diag dump filtered to LISTEN, so it costs the same
/// however many connections (or TIME_WAIT entries) the host has; /proc/net/tcp lists them all.
pub fn listening_tcp() -> Option<Vec<(u64, SocketAddr)>> {
    let mut found = Vec::new();
    for family in [libc::AF_INET, libc::AF_INET6] {
        match super::diag::listening(family as u8) {
            Ok(sockets) => found.extend(sockets),
            Err(e) => {
                log::debug!("sock_diag: {e}");
                return None;
            }
        }
    }
    Some(found)
}

/// The children of this process (all its threads'), from /proc/self/task/*/children.
pub fn own_children() -> Vec<i32> {
    children_of(std::process::id() as i32)
}

fn children_of(pid: i32) -> Vec<i32> {
    let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    let mut children = Vec::new();
    for task in tasks.flatten() {
        if let Ok(list) = fs::read_to_string(task.path().join("children")) {
            children.extend(
                list.split_whitespace()
                    .filter_map(|c| c.parse::<i32>().ok()),
            );
        }
    }
    children
}

/// `pid` and all its descendants.
pub fn with_descendants(pid: i32) -> Vec<i32> {
    let mut all = vec![pid];
    let mut next = 0;
    while next < all.len() && all.len() < 4096 {
        let children = children_of(all[next]);
        all.extend(children);
        next += 1;
    }
    all
}

/// The fd number under which `pid` holds the socket `inode`.
pub fn fd_of_inode(pid: i32, inode: u64) -> Option<i32> {
    let wanted = format!("socket:[{inode}]");
    fs::read_dir(format!("/proc/{pid}/fd"))
        .ok()?
        .flatten()
        .find(|entry| fs::read_link(entry.path()).is_ok_and(|t| t.to_string_lossy() == wanted))?
        .file_name()
        .to_str()?
        .parse()
        .ok()
}

/// A process's command name (/proc/PID/comm).
pub fn command_name(pid: i32) -> String {
    fs::read_to_string(format!("/proc/{pid}/comm"))
        .map(|c| c.trim().to_string())
        .unwrap_or_else(|_| "?".into())
}

/// A copy of descriptor `fd` of process `pid` (pidfd_getfd, Linux 5.6+).
pub fn take_fd(pid: i32, fd: i32) -> std::io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::{AsRawFd, FromRawFd};
    let pidfd = super::reaper::pidfd_open(nix::unistd::Pid::from_raw(pid))?;
    // SAFETY: plain system call; on success it returns a new descriptor we own.
    let copy = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), fd, 0) };
    if copy < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the kernel just gave us this descriptor (close-on-exec, as pidfd_getfd makes it).
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(copy as i32) })
}

/// The number under which `pid` holds the socket with `inode`, if it does.
pub fn fd_with_inode(pid: i32, inode: u64) -> Option<i32> {
    let wanted = format!("socket:[{inode}]");
    fs::read_dir(format!("/proc/{pid}/fd"))
        .ok()?
        .flatten()
        .find(|entry| {
            fs::read_link(entry.path()).is_ok_and(|target| target.as_os_str() == wanted.as_str())
        })
        .and_then(|entry| entry.file_name().to_str()?.parse().ok())
}

/// Of `listening`, the sockets `pid` holds that are not in `given`: servers it opened itself.
pub fn own_listeners(
    pid: i32,
    listening: &[(u64, SocketAddr)],
    given: &HashSet<u64>,
) -> Vec<SocketAddr> {
    let held = socket_inodes(pid);
    listening
        .iter()
        .filter(|(inode, _)| held.contains(inode) && !given.contains(inode))
        .map(|(_, addr)| *addr)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_listener_of_this_process_is_seen_and_told_apart_from_given_ones() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let pid = std::process::id() as i32;
        let listening = listening_tcp().expect("sock_diag on the test host");
        assert!(own_listeners(pid, &listening, &HashSet::new()).contains(&addr));
        let given: HashSet<u64> = inode(&listener).into_iter().collect();
        assert!(!own_listeners(pid, &listening, &given).contains(&addr));
    }
}
