//! Telling systemd (or any NOTIFY_SOCKET listener) what the primary is doing:
//! READY=1, RELOADING=1 with MONOTONIC_USEC, STOPPING=1 (for `Type=notify-reload`).

use std::os::{
    linux::net::SocketAddrExt,
    unix::net::{SocketAddr, UnixDatagram},
};

/// The primary's own NOTIFY_SOCKET, read once at start (workers get ours instead).
pub struct Notifier {
    address: Option<SocketAddr>,
}

impl Notifier {
    pub fn from_environment() -> Notifier {
        let address = std::env::var("NOTIFY_SOCKET").ok().and_then(|path| {
            match path.strip_prefix('@') {
                Some(name) => SocketAddr::from_abstract_name(name.as_bytes()),
                None => SocketAddr::from_pathname(&path),
            }
            .ok()
        });
        Notifier { address }
    }

    pub fn ready(&self) {
        self.send("READY=1");
    }

    pub fn reloading(&self) {
        // systemd pairs RELOADING=1 with the CLOCK_MONOTONIC time the reload began.
        let now = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
            .map(|t| t.tv_sec() as u64 * 1_000_000 + t.tv_nsec() as u64 / 1_000)
            .unwrap_or(0);
        self.send(&format!("RELOADING=1\nMONOTONIC_USEC={now}"));
    }

    pub fn stopping(&self) {
        self.send("STOPPING=1");
    }

    fn send(&self, message: &str) {
        let Some(address) = &self.address else { return };
        let sent =
            UnixDatagram::unbound().and_then(|s| s.send_to_addr(message.as_bytes(), address));
        if let Err(e) = sent {
            log::debug!("NOTIFY_SOCKET: {e}");
        }
    }
}
