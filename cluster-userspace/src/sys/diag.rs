//! A minimal sock_diag (NETLINK_SOCK_DIAG) client: the listening TCP sockets of this network
//! namespace, with their inodes and accept queues (linux/inet_diag.h).

use std::{
    io,
    mem::size_of,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
};

const SOCK_DIAG_BY_FAMILY: u16 = 20;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const TCP_LISTEN: u32 = 10;

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct NlMsgHdr {
    len: u32,
    kind: u16,
    flags: u16,
    seq: u32,
    pid: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct SockId {
    sport: [u8; 2],
    dport: [u8; 2],
    src: [u8; 16],
    dst: [u8; 16],
    interface: u32,
    cookie: [u32; 2],
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct Request {
    header: NlMsgHdr,
    family: u8,
    protocol: u8,
    ext: u8,
    pad: u8,
    states: u32,
    id: SockId,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct Message {
    family: u8,
    state: u8,
    timer: u8,
    retrans: u8,
    id: SockId,
    expires: u32,
    rqueue: u32,
    wqueue: u32,
    uid: u32,
    inode: u32,
}

/// A listening TCP socket as the kernel reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Listener {
    pub inode: u64,
    pub addr: SocketAddr,
    /// Connections in its accept queue now: established, not yet accepted (for a listening
    /// socket, inet_diag's rqueue is sk_ack_backlog).
    pub queue: u32,
    /// The most its accept queue holds (wqueue: sk_max_ack_backlog, the listen backlog).
    pub backlog: u32,
}

/// Listening TCP sockets of `family` (AF_INET or AF_INET6), with their queues.
pub fn listeners(family: u8) -> io::Result<Vec<Listener>> {
    // SAFETY: a plain socket call; the descriptor is owned at once.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
            libc::NETLINK_SOCK_DIAG,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: just created, owned by nothing else.
    let socket = unsafe { OwnedFd::from_raw_fd(fd) };
    let request = Request {
        header: NlMsgHdr {
            len: size_of::<Request>() as u32,
            kind: SOCK_DIAG_BY_FAMILY,
            flags: (libc::NLM_F_REQUEST | libc::NLM_F_DUMP) as u16,
            seq: 1,
            pid: 0,
        },
        family,
        protocol: libc::IPPROTO_TCP as u8,
        states: 1 << TCP_LISTEN,
        ..Request::default()
    };
    // SAFETY: sending the bytes of a repr(C) struct of integers.
    let sent = unsafe {
        libc::send(
            socket.as_raw_fd(),
            (&request as *const Request).cast(),
            size_of::<Request>(),
            0,
        )
    };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut found = Vec::new();
    let mut buffer = vec![0u8; 32 * 1024];
    loop {
        // SAFETY: receiving into a buffer we own, of the length given.
        let received = unsafe {
            libc::recv(
                socket.as_raw_fd(),
                buffer.as_mut_ptr().cast(),
                buffer.len(),
                0,
            )
        };
        if received < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut data = &buffer[..received as usize];
        while data.len() >= size_of::<NlMsgHdr>() {
            let header: NlMsgHdr = read(data);
            let length = (header.len as usize).min(data.len());
            if length < size_of::<NlMsgHdr>() {
                return Ok(found);
            }
            match header.kind {
                NLMSG_DONE => return Ok(found),
                NLMSG_ERROR => return Err(io::Error::other("sock_diag answered with an error")),
                SOCK_DIAG_BY_FAMILY if length >= size_of::<NlMsgHdr>() + size_of::<Message>() => {
                    let message: Message = read(&data[size_of::<NlMsgHdr>()..]);
                    found.push(Listener {
                        inode: u64::from(message.inode),
                        addr: address(&message),
                        queue: message.rqueue,
                        backlog: message.wqueue,
                    });
                }
                _ => {}
            }
            // Messages are aligned to 4 bytes.
            let advance = (length + 3) & !3;
            data = &data[advance.min(data.len())..];
        }
    }
}

/// A struct of integers from the start of `bytes` (which holds at least its size).
fn read<T: Copy + Default>(bytes: &[u8]) -> T {
    let mut value = T::default();
    let size = size_of::<T>().min(bytes.len());
    // SAFETY: T is a repr(C) struct of integers, any bit pattern is valid, and at most its
    // size is copied.
    unsafe {
        std::ptr::copy_nonoverlapping(bytes.as_ptr(), (&mut value as *mut T).cast::<u8>(), size)
    };
    value
}

fn address(message: &Message) -> SocketAddr {
    let port = u16::from_be_bytes(message.id.sport);
    let ip: IpAddr = if message.family == libc::AF_INET6 as u8 {
        Ipv6Addr::from(message.id.src).into()
    } else {
        let mut v4 = [0u8; 4];
        v4.copy_from_slice(&message.id.src[..4]);
        Ipv4Addr::from(v4).into()
    };
    SocketAddr::new(ip, port)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_listening_socket_of_this_process_is_listed_with_its_inode() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let inode = crate::sys::fds::inode(std::os::fd::AsRawFd::as_raw_fd(&listener)).unwrap();
        let listed = listeners(libc::AF_INET as u8).unwrap();
        assert!(
            listed.iter().any(|l| (l.inode, l.addr) == (inode, addr)),
            "{listed:?}"
        );
        let v6 = std::net::TcpListener::bind("[::1]:0").unwrap();
        let listed = listeners(libc::AF_INET6 as u8).unwrap();
        assert!(listed.iter().any(|l| l.addr == v6.local_addr().unwrap()));
    }

    #[test]
    fn a_listeners_accept_queue_and_backlog_are_read() {
        // std listens with a backlog of 128; two connections wait, accepted by nobody.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let inode = crate::sys::fds::inode(std::os::fd::AsRawFd::as_raw_fd(&listener)).unwrap();
        let _waiting: Vec<_> = (0..2)
            .map(|_| std::net::TcpStream::connect(addr).unwrap())
            .collect();
        let found = listeners(libc::AF_INET as u8)
            .unwrap()
            .into_iter()
            .find(|l| l.inode == inode)
            .unwrap();
        assert_eq!((found.queue, found.backlog), (2, 128));
        drop(listener.accept().unwrap());
        let found = listeners(libc::AF_INET as u8)
            .unwrap()
            .into_iter()
            .find(|l| l.inode == inode)
            .unwrap();
        assert_eq!(found.queue, 1);
    }
}
