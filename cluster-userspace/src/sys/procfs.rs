//! What /proc says about processes: the sockets they hold (by inode), their children, their
//! memory, their environment and session. The checks the primary runs every few seconds, the
//! status it reports and `top` read through here.

use std::{collections::HashSet, fs, net::SocketAddr};

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
    Some(
        listeners()?
            .into_iter()
            .map(|l| (l.inode, l.addr))
            .collect(),
    )
}

/// The listening TCP sockets of both families, from sock_diag; `None` when it cannot say.
fn listeners() -> Option<Vec<super::diag::Listener>> {
    let mut found = Vec::new();
    for family in [libc::AF_INET, libc::AF_INET6] {
        match super::diag::listeners(family as u8) {
            Ok(sockets) => found.extend(sockets),
            Err(e) => {
                log::debug!("sock_diag: {e}");
                return None;
            }
        }
    }
    Some(found)
}

/// The accept queue of every listening TCP socket in this network namespace, by inode, from
/// sock_diag; `None` where the kernel lacks it (inet_diag is a module, which a container or an
/// initramfs may not have): then [`accept_queues_from_proc`] says the same, dearer.
pub fn accept_queues() -> Option<std::collections::HashMap<u64, super::diag::Listener>> {
    Some(listeners()?.into_iter().map(|l| (l.inode, l)).collect())
}

/// The accept queues from /proc/net/tcp and tcp6, which list every TCP socket of the
/// namespace (so their cost grows with its connections and TIME_WAIT entries, unlike
/// sock_diag's filtered dump) but say the same of listening ones: their rx_queue is the accept
/// queue. The backlog is not there: it reads 0. `None` when neither file can be read.
pub fn accept_queues_from_proc() -> Option<std::collections::HashMap<u64, super::diag::Listener>> {
    let mut found = std::collections::HashMap::new();
    let mut read_any = false;
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = fs::read_to_string(table) else {
            continue;
        };
        read_any = true;
        found.extend(
            text.lines()
                .skip(1)
                .filter_map(listener_of_proc_line)
                .map(|l| (l.inode, l)),
        );
    }
    read_any.then_some(found)
}

/// A LISTEN line of /proc/net/tcp: "sl local rem st tx_queue:rx_queue tr:when retrnsmt uid
/// timeout inode ...", hexadecimal but for the uid, timeout and inode.
fn listener_of_proc_line(line: &str) -> Option<super::diag::Listener> {
    const LISTEN: &str = "0A";
    let fields: Vec<&str> = line.split_whitespace().collect();
    if fields.get(3)? != &LISTEN {
        return None;
    }
    let (_, rx_queue) = fields.get(4)?.split_once(':')?;
    Some(super::diag::Listener {
        inode: fields.get(9)?.parse().ok()?,
        addr: proc_address(fields.get(1)?)?,
        queue: u32::from_str_radix(rx_queue, 16).ok()?,
        backlog: 0,
    })
}

/// "0100007F:1F90" (IPv4, the address as the kernel's u32 in host order) or 32 hex digits of
/// four such words (IPv6), then the port.
fn proc_address(text: &str) -> Option<SocketAddr> {
    let (ip, port) = text.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let words: Option<Vec<u32>> = (0..ip.len() / 8)
        .map(|i| u32::from_str_radix(ip.get(i * 8..i * 8 + 8)?, 16).ok())
        .collect();
    let bytes: Vec<u8> = words?.iter().flat_map(|w| w.to_ne_bytes()).collect();
    let ip: std::net::IpAddr = match bytes.len() {
        4 => std::net::Ipv4Addr::new(bytes[0], bytes[1], bytes[2], bytes[3]).into(),
        16 => std::net::Ipv6Addr::from(<[u8; 16]>::try_from(bytes).ok()?).into(),
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
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

/// The fields of /proc/PID/stat after the command name (which may hold spaces and
/// parentheses): the state is the first.
fn stat_fields(pid: i32) -> Option<Vec<String>> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after_name = &stat[stat.rfind(')')? + 1..];
    Some(after_name.split_whitespace().map(str::to_string).collect())
}

/// Exists and is not a zombie.
pub fn alive(pid: i32) -> bool {
    stat_fields(pid).is_some_and(|fields| fields.first().map(String::as_str) != Some("Z"))
}

/// Exists, is not a zombie, and is not on its way out: the kernel sets PF_EXITING (the
/// `flags` field of /proc/PID/stat) before it closes a dying process's descriptors, so a
/// process whose channel closed because it was killed is `exiting` even before it is a zombie.
pub fn running(pid: i32) -> bool {
    const PF_EXITING: u64 = 0x4;
    stat_fields(pid).is_some_and(|fields| {
        let state = fields.first().map(String::as_str);
        let flags: u64 = fields.get(6).and_then(|f| f.parse().ok()).unwrap_or(0);
        state != Some("Z") && state != Some("X") && flags & PF_EXITING == 0
    })
}

/// The parent of `pid`.
pub fn parent(pid: i32) -> Option<i32> {
    stat_fields(pid)?.get(1)?.parse().ok()
}

/// The session of `pid`.
pub fn session(pid: i32) -> Option<i32> {
    stat_fields(pid)?.get(3)?.parse().ok()
}

/// One variable of `pid`'s environment (as it was at exec).
pub fn environ_var(pid: i32, name: &str) -> Option<String> {
    let raw = fs::read(format!("/proc/{pid}/environ")).ok()?;
    let prefix = format!("{name}=");
    raw.split(|&b| b == 0)
        .find_map(|entry| entry.strip_prefix(prefix.as_bytes()))
        .map(|value| String::from_utf8_lossy(value).into_owned())
}

/// Every process this one can see.
pub fn all_pids() -> Vec<i32> {
    fs::read_dir("/proc")
        .map(|entries| {
            entries
                .flatten()
                .filter_map(|e| e.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// Resident pages: the second field of /proc/PID/statm ("size resident shared text lib data dt").
pub fn resident_pages(statm: &str) -> Option<u64> {
    statm.split_whitespace().nth(1)?.parse().ok()
}

/// Resident memory of `pid` in bytes (0 when it is gone).
pub fn rss_bytes(pid: i32) -> u64 {
    fs::read_to_string(format!("/proc/{pid}/statm"))
        .ok()
        .and_then(|statm| resident_pages(&statm))
        .map_or(0, |pages| pages * page_size())
}

/// The "Pss:" line of /proc/PID/smaps_rollup, in bytes: the process's share of the memory it
/// maps, each page shared with others counted as a fraction. Pages a worker shares
/// copy-on-write with its siblings (a preforked app) count once over all of them, so a limit
/// on it does not restart workers for memory they do not own.
pub fn pss_of(smaps_rollup: &str) -> Option<u64> {
    let line = smaps_rollup.lines().find(|l| l.starts_with("Pss:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// The memory (PSS) of `pid` and its descendants together (a worker may be a wrapper whose
/// child does the work), in bytes; `None` when it cannot be read (gone, or another user's
/// without CAP_SYS_PTRACE).
pub fn pss_bytes(pid: i32) -> Option<u64> {
    let mut total = None;
    for process in with_descendants(pid) {
        if let Some(pss) = fs::read_to_string(format!("/proc/{process}/smaps_rollup"))
            .ok()
            .and_then(|text| pss_of(&text))
        {
            total = Some(total.unwrap_or(0) + pss);
        }
    }
    total
}

pub fn page_size() -> u64 {
    nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
        .ok()
        .flatten()
        .and_then(|size| u64::try_from(size).ok())
        .unwrap_or(4096)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listening_sockets_and_their_queues_are_read_from_proc_net_tcp() {
        let line = "   3: 0100007F:1F90 00000000:0000 0A 00000000:00000003 00:00000000 00000000     0        0 4242 1 0000000000000000 100 0 0 10 0";
        let listener = listener_of_proc_line(line).unwrap();
        assert_eq!(listener.inode, 4242);
        assert_eq!(listener.queue, 3);
        assert_eq!(listener.addr, "127.0.0.1:8080".parse().unwrap());
        let established = line.replace(" 0A ", " 01 ");
        assert!(listener_of_proc_line(&established).is_none());
        // A real listener of this process, found with its queue.
        let socket = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = socket.local_addr().unwrap();
        let _waiting = std::net::TcpStream::connect(addr).unwrap();
        let inode = crate::sys::fds::inode(std::os::fd::AsRawFd::as_raw_fd(&socket)).unwrap();
        let found = accept_queues_from_proc().unwrap();
        assert_eq!(found[&inode].addr, addr);
        assert_eq!(found[&inode].queue, 1);
        let v6 = std::net::TcpListener::bind("[::1]:0").unwrap();
        let inode = crate::sys::fds::inode(std::os::fd::AsRawFd::as_raw_fd(&v6)).unwrap();
        assert_eq!(
            accept_queues_from_proc().unwrap()[&inode].addr,
            v6.local_addr().unwrap()
        );
    }

    #[test]
    fn pss_is_read_from_smaps_rollup() {
        let text = "55d0c5a4c000-7ffd1b5f1000 ---p 00000000 00:00 0 [rollup]\nRss:  8844 kB\nPss:  2301 kB\nPss_Dirty: 1000 kB\n";
        assert_eq!(pss_of(text), Some(2301 * 1024));
        assert_eq!(pss_of("Rss: 1 kB\n"), None);
    }

    #[test]
    fn a_listener_of_this_process_is_seen_and_told_apart_from_given_ones() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let pid = std::process::id() as i32;
        let listening = listening_tcp().expect("sock_diag on the test host");
        assert!(own_listeners(pid, &listening, &HashSet::new()).contains(&addr));
        let fd = std::os::fd::AsRawFd::as_raw_fd(&listener);
        let given: HashSet<u64> = crate::sys::fds::inode(fd).into_iter().collect();
        assert!(!own_listeners(pid, &listening, &given).contains(&addr));
    }

    #[test]
    fn own_process_is_read_from_proc() {
        let own = std::process::id() as i32;
        assert!(alive(own));
        assert!(running(own));
        assert_eq!(
            session(own),
            Some(nix::unistd::getsid(None).unwrap().as_raw())
        );
        assert_eq!(parent(own), Some(nix::unistd::getppid().as_raw()));
        assert!(rss_bytes(own) > 0);
        assert!(pss_bytes(own).expect("own smaps_rollup") > 0);
        assert_eq!(session(-5), None);
        assert!(!alive(-5));
    }
}
