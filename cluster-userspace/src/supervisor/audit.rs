//! What /proc says about a worker's sockets, for the checks the primary runs every few seconds:
//! the listening TCP sockets a process holds, by inode and address.

use std::{
    collections::HashSet,
    fs,
    net::{Ipv4Addr, Ipv6Addr, SocketAddr},
    os::fd::AsFd,
};

/// The inode of a socket (what /proc/PID/fd shows as `socket:[INODE]`).
pub fn inode(socket: impl AsFd) -> Option<u64> {
    nix::sys::stat::fstat(socket).ok().map(|stat| stat.st_ino)
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

/// The TCP sockets in LISTEN state in the network namespace of `pid`: (inode, address).
pub fn listening_tcp(pid: i32) -> Vec<(u64, SocketAddr)> {
    let mut found = Vec::new();
    for (file, v6) in [("tcp", false), ("tcp6", true)] {
        let Ok(table) = fs::read_to_string(format!("/proc/{pid}/net/{file}")) else {
            continue;
        };
        found.extend(table.lines().skip(1).filter_map(|line| parse_row(line, v6)));
    }
    found
}

/// One row of /proc/net/tcp{,6}: `sl local rem st tx:rx tr:when retr uid timeout inode ...`.
fn parse_row(line: &str, v6: bool) -> Option<(u64, SocketAddr)> {
    let fields: Vec<&str> = line.split_whitespace().collect();
    if fields.get(3) != Some(&"0A") {
        return None; // not LISTEN
    }
    let (ip, port) = fields.get(1)?.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let ip: std::net::IpAddr = if v6 {
        // Four 32-bit words, each in host (little-endian) order.
        let mut bytes = [0u8; 16];
        for (word, chunk) in bytes.chunks_mut(4).enumerate() {
            let value = u32::from_str_radix(ip.get(word * 8..word * 8 + 8)?, 16).ok()?;
            chunk.copy_from_slice(&value.to_le_bytes());
        }
        Ipv6Addr::from(bytes).into()
    } else {
        Ipv4Addr::from(u32::from_str_radix(ip, 16).ok()?.to_le_bytes()).into()
    };
    let inode = fields.get(9)?.parse().ok()?;
    Some((inode, SocketAddr::new(ip, port)))
}

/// The listening sockets `pid` holds that are not in `given`: servers it opened by itself.
pub fn own_listeners(pid: i32, given: &HashSet<u64>) -> Vec<SocketAddr> {
    let held = socket_inodes(pid);
    listening_tcp(pid)
        .into_iter()
        .filter(|(inode, _)| held.contains(inode) && !given.contains(inode))
        .map(|(_, addr)| addr)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_net_tcp_rows_are_read() {
        let v4 = "   0: 0100007F:0BB8 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 123456 1 0000000000000000 100 0 0 10 0";
        assert_eq!(
            parse_row(v4, false),
            Some((123456, "127.0.0.1:3000".parse().unwrap()))
        );
        let v6 = "   1: 00000000000000000000000001000000:1F90 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 777 1 0000000000000000 100 0 0 10 0";
        assert_eq!(
            parse_row(v6, true),
            Some((777, "[::1]:8080".parse().unwrap()))
        );
        let established = v4.replace(" 0A ", " 01 ");
        assert_eq!(parse_row(&established, false), None);
    }

    #[test]
    fn a_listener_of_this_process_is_seen_and_told_apart_from_given_ones() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let pid = std::process::id() as i32;
        assert!(own_listeners(pid, &HashSet::new()).contains(&addr));
        let given: HashSet<u64> = inode(&listener).into_iter().collect();
        assert!(!own_listeners(pid, &given).contains(&addr));
    }
}
