//! `--listen` values: `PORT`, `HOST:PORT`, `[V6]:PORT`, each optionally prefixed `tcp://`
//! (the default) or `udp://`.
//!
//! Only literal addresses (plus `localhost` and `*`) are accepted: a listen address that needs a
//! DNS lookup would make start-up depend on the resolver and could silently mean several groups.

use std::{
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    str::FromStr,
};

/// The transport of a listen address.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub enum Transport {
    #[default]
    Tcp,
    Udp,
}

/// One listen address: every worker gets its own socket bound to it, and all of them form one
/// SO_REUSEPORT group.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ListenAddr {
    addr: SocketAddr,
    transport: Transport,
}

impl ListenAddr {
    pub fn udp(addr: SocketAddr) -> ListenAddr {
        ListenAddr {
            addr,
            transport: Transport::Udp,
        }
    }

    pub fn socket_addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn transport(&self) -> Transport {
        self.transport
    }

    pub fn is_udp(&self) -> bool {
        self.transport == Transport::Udp
    }

    /// The same address with another port (a port the kernel picked for port 0).
    pub fn with_port(self, port: u16) -> ListenAddr {
        ListenAddr {
            addr: SocketAddr::new(self.addr.ip(), port),
            ..self
        }
    }
}

impl fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_udp() {
            f.write_str("udp://")?;
        }
        self.addr.fmt(f)
    }
}

/// As its text (`0.0.0.0:80`, `udp://[::1]:53`), which parses back to the same address.
impl serde::Serialize for ListenAddr {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for ListenAddr {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// A TCP address.
impl From<SocketAddr> for ListenAddr {
    fn from(addr: SocketAddr) -> Self {
        ListenAddr {
            addr,
            transport: Transport::Tcp,
        }
    }
}

impl FromStr for ListenAddr {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let text = text.trim();
        let (transport, text) = if let Some(rest) = text.strip_prefix("udp://") {
            (Transport::Udp, rest)
        } else if let Some(rest) = text.strip_prefix("tcp://") {
            (Transport::Tcp, rest)
        } else if let Some((scheme, _)) = text.split_once("://") {
            return Err(format!(
                "unknown scheme '{scheme}://'; use tcp:// (the default) or udp://"
            ));
        } else {
            (Transport::Tcp, text)
        };
        if text.is_empty() {
            return Err("empty address; use PORT, HOST:PORT or [IPV6]:PORT".into());
        }
        // A bare port listens on every IPv4 address, like `HOST` left out of nginx's `listen`.
        let addr = if text.bytes().all(|b| b.is_ascii_digit()) {
            SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), parse_port(text)?)
        } else {
            let (host, port) = split_host_port(text)?;
            SocketAddr::new(parse_host(host)?, parse_port(port)?)
        };
        Ok(ListenAddr { addr, transport })
    }
}

fn split_host_port(text: &str) -> Result<(&str, &str), String> {
    if let Some(rest) = text.strip_prefix('[') {
        let (host, after) = rest
            .split_once(']')
            .ok_or("missing ']' after the IPv6 address; use [IPV6]:PORT")?;
        let port = after
            .strip_prefix(':')
            .ok_or("missing ':PORT' after ']'; use [IPV6]:PORT")?;
        return Ok((host, port));
    }
    match text.rsplit_once(':') {
        Some((host, _)) if host.contains(':') => {
            Err("an IPv6 address needs brackets; use [IPV6]:PORT, e.g. [::1]:8080".into())
        }
        Some(parts) => Ok(parts),
        None => Err("missing port; use PORT, HOST:PORT or [IPV6]:PORT".into()),
    }
}

fn parse_host(host: &str) -> Result<IpAddr, String> {
    match host {
        "" | "*" => Ok(Ipv4Addr::UNSPECIFIED.into()),
        "localhost" => Ok(Ipv4Addr::LOCALHOST.into()),
        _ if host.contains(':') => host
            .parse::<Ipv6Addr>()
            .map(IpAddr::from)
            .map_err(|_| format!("'{host}' is not an IPv6 address")),
        _ => host.parse::<Ipv4Addr>().map(IpAddr::from).map_err(|_| {
            format!("'{host}' is not an IP address (host names are not resolved; use an IP, localhost or *)")
        }),
    }
}

fn parse_port(port: &str) -> Result<u16, String> {
    match port.parse::<u32>() {
        Ok(0) => Err("port 0 is not allowed: every worker must bind the same, known port".into()),
        Ok(p) if p <= u16::MAX as u32 => Ok(p as u16),
        Ok(_) => Err(format!("port {port} is out of range (1-65535)")),
        Err(_) => Err(format!("'{port}' is not a port number (1-65535)")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(text: &str) -> String {
        text.parse::<ListenAddr>().expect(text).to_string()
    }

    fn err(text: &str) -> String {
        text.parse::<ListenAddr>().expect_err(text)
    }

    #[test]
    fn bare_port_means_all_ipv4_addresses() {
        assert_eq!(ok("8080"), "0.0.0.0:8080");
        assert_eq!(ok(" 80 "), "0.0.0.0:80");
    }

    #[test]
    fn ipv4_host_and_port() {
        assert_eq!(ok("127.0.0.1:8080"), "127.0.0.1:8080");
        assert_eq!(ok("0.0.0.0:1"), "0.0.0.0:1");
        assert_eq!(ok("localhost:65535"), "127.0.0.1:65535");
        assert_eq!(ok("*:80"), "0.0.0.0:80");
        assert_eq!(ok(":80"), "0.0.0.0:80");
    }

    #[test]
    fn ipv6_in_brackets() {
        assert_eq!(ok("[::1]:8080"), "[::1]:8080");
        assert_eq!(ok("[::]:443"), "[::]:443");
        assert_eq!(ok("[fe80::1]:9"), "[fe80::1]:9");
    }

    #[test]
    fn udp_and_explicit_tcp() {
        assert_eq!(ok("udp://127.0.0.1:53"), "udp://127.0.0.1:53");
        assert_eq!(ok("udp://5353"), "udp://0.0.0.0:5353");
        assert_eq!(ok("tcp://[::1]:80"), "[::1]:80");
        assert!(err("sctp://1.2.3.4:5").contains("unknown scheme"));
        assert!("udp://1.2.3.4:5".parse::<ListenAddr>().unwrap().is_udp());
    }

    #[test]
    fn bad_ports_are_named() {
        assert!(err("0").contains("port 0"));
        assert!(err("127.0.0.1:0").contains("port 0"));
        assert!(err("70000").contains("out of range"));
        assert!(err("127.0.0.1:99999").contains("out of range"));
        assert!(err("127.0.0.1:http").contains("not a port number"));
        assert!(err("127.0.0.1:").contains("not a port number"));
        assert!(err("127.0.0.1").contains("missing port"));
    }

    #[test]
    fn bad_hosts_are_named() {
        assert!(err("example.com:80").contains("not an IP address"));
        assert!(err("1.2.3.4.5:80").contains("not an IP address"));
        assert!(err("::1:80").contains("needs brackets"));
        assert!(err("[::1:80").contains("missing ']'"));
        assert!(err("[::1]80").contains("missing ':PORT'"));
        assert!(err("[zz::1]:80").contains("not an IPv6 address"));
        assert!(err("").contains("empty address"));
    }
}
