//! What the running primary hands the new binary in an upgrade (see `upgrade`), as data: the
//! lifecycle snapshot, every
//! worker's I/O (channels, output pipes, the sockets it was given), the listen groups, the
//! kernel counters, and which inherited descriptor is what. JSON in a memfd whose number is in
//! [`STATE_VARIABLE`]; `format` says which layout, and a binary that does not know it refuses
//! in the check, before anything is handed over.

use std::{
    io::{Read, Seek, Write},
    os::fd::{FromRawFd, OwnedFd, RawFd},
};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use cluster_lb_worker::ListenAddr;

use super::lifecycle::Snapshot;
use crate::protocol::nodejs::{primary::ForkSpec, AddressType};
pub use crate::{
    kernel::{
        groups::{SavedGroup, SavedMaps, SlotCounters},
        unix_listens::SavedUnixListen,
    },
    sys::fds::Inherited,
};

/// The layout written by this binary; a binary reads only layouts it knows.
pub const FORMAT: u32 = 1;
/// The memfd with the state, by number, in the new binary's environment.
pub const STATE_VARIABLE: &str = "CLUSTER_LB_UPGRADE_STATE_FD";
/// Set (to 1) for the check run: read the state, say whether it can take over, and exit.
pub const CHECK_VARIABLE: &str = "CLUSTER_LB_UPGRADE_CHECK";

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct State {
    pub format: u32,
    /// The version handing over.
    pub from: String,
    pub uptime_ms: u64,
    pub lifecycle: Snapshot,
    /// The strategy the programs were loaded for (`--strategy`, as the first primary had it).
    pub strategy: String,
    /// Whether eBPF balancing had fallen back to the kernel's hash.
    pub fell_back: bool,
    pub groups: Vec<SavedGroup>,
    pub workers: Vec<SavedWorker>,
    /// Active slots, in the order round robin walks them.
    pub active: Vec<u32>,
    pub notify: Inherited,
    pub notify_name: String,
    pub node: bool,
    pub node_groups: NodeGroupsState,
    pub released_sockets: Vec<u64>,
    /// Descriptors that belong to the caller of the supervisor (the control socket and the
    /// metrics listener of `cluster-lb run`), and the control connection that asked for the
    /// upgrade, to be answered by the new binary.
    pub control: Option<Inherited>,
    pub metrics: Option<Inherited>,
    pub requester: Option<Inherited>,
    /// The program's own primary process and what its forks started (absent from an older
    /// binary: none ran).
    #[serde(default)]
    pub program: SavedProgram,
    /// The Unix-socket listens (absent from an older binary: none).
    #[serde(default)]
    pub unix: Vec<SavedUnixListen>,
}

/// The program's primary (a Node program's primary branch), as an older binary held it.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct SavedProgram {
    pub process: Option<SavedPrimary>,
    /// What the workers its forks started run, by variant (see `program::Variants`).
    pub variants: Vec<ForkSpec>,
}

/// The running primary process's descriptors.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SavedPrimary {
    pub pid: i32,
    /// Its Node channel.
    pub channel: Inherited,
    /// Its request channel.
    pub requests: Inherited,
    pub stdout: Option<Inherited>,
    pub stderr: Option<Inherited>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
/// One worker process as an older binary held it.
pub struct SavedWorker {
    pub pid: i32,
    pub id: u32,
    pub slot: u32,
    pub channel: ChannelState,
    pub stdout: Option<Inherited>,
    pub stderr: Option<Inherited>,
    pub addresses: Vec<ListenAddr>,
    /// Socket inode -> the address of the listening socket the primary gave it.
    pub given: Vec<(u64, ListenAddr)>,
    pub queries: u32,
    pub reported: Vec<std::net::SocketAddr>,
    /// What a Node worker said about itself (`online`, `listening`), for the program's primary.
    #[serde(default)]
    pub said: Vec<Value>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum ChannelState {
    Closed,
    ClusterLb {
        socket: Inherited,
        online: bool,
    },
    Node {
        socket: Inherited,
        seq: u64,
        listens: Vec<(String, ListenAddr)>,
        next_key: u64,
        /// Its listens on Unix-socket paths, by key (absent from an older binary: none).
        #[serde(default)]
        paths: Vec<(String, std::path::PathBuf)>,
    },
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct NodeGroupsState {
    pub ephemeral: Vec<EphemeralPort>,
    pub data: Vec<(ListenAddr, Value)>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EphemeralPort {
    pub address: Option<String>,
    pub address_type: AddressType,
    pub index: u64,
    pub port: u16,
}

/// Why a state could not be written or read.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("writing the upgrade state: {0}")]
    Write(std::io::Error),
    #[error("reading the upgrade state from fd {fd}: {source}")]
    Read { fd: String, source: std::io::Error },
    #[error("the upgrade state is not one this binary understands: {0}")]
    Parse(String),
    #[error("the upgrade state has format {found}; this binary reads format {FORMAT} (upgrade through a release that reads both)")]
    Format { found: u64 },
}

impl State {
    /// Writes the state into a new memfd, rewound, close-on-exec (cleared by whoever passes it).
    pub fn to_memfd(&self) -> Result<OwnedFd, StateError> {
        let text = serde_json::to_vec(self).map_err(|e| StateError::Write(e.into()))?;
        let fd = nix::sys::memfd::memfd_create(
            c"cluster-lb-upgrade-state",
            nix::sys::memfd::MFdFlags::MFD_CLOEXEC,
        )
        .map_err(|e| StateError::Write(e.into()))?;
        let mut file = std::fs::File::from(fd);
        file.write_all(&text).map_err(StateError::Write)?;
        file.rewind().map_err(StateError::Write)?;
        Ok(OwnedFd::from(file))
    }

    /// Reads the state from the descriptor named by `variable`'s value, and closes it.
    pub fn from_variable(value: &str) -> Result<State, StateError> {
        let read = |source| StateError::Read {
            fd: value.to_string(),
            source,
        };
        let fd: RawFd = value
            .parse()
            .map_err(|_| read(std::io::Error::other("not a descriptor number")))?;
        if fd < 3 || crate::sys::fds::inode(fd).is_none() {
            return Err(read(std::io::Error::other("no such open descriptor")));
        }
        // SAFETY: checked open above; nothing else in this process knows the number.
        let mut file = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(fd) });
        let mut text = Vec::new();
        file.read_to_end(&mut text).map_err(read)?;
        State::parse(&text)
    }

    /// Checks the format first, so a newer layout is named as such, not as garbage.
    pub fn parse(text: &[u8]) -> Result<State, StateError> {
        let value: Value =
            serde_json::from_slice(text).map_err(|e| StateError::Parse(e.to_string()))?;
        let found = value.get("format").and_then(Value::as_u64).unwrap_or(0);
        if found != u64::from(FORMAT) {
            return Err(StateError::Format { found });
        }
        serde_json::from_value(value).map_err(|e| StateError::Parse(e.to_string()))
    }

    /// Every descriptor the state names, to keep open across exec.
    pub fn descriptors(&self) -> Vec<Inherited> {
        let mut all = vec![self.notify];
        all.extend(self.control);
        all.extend(self.metrics);
        all.extend(self.requester);
        for group in &self.groups {
            all.extend(group.maps.sockets);
            all.extend(group.maps.stats);
        }
        all.extend(self.unix.iter().map(|listen| listen.socket));
        if let Some(primary) = &self.program.process {
            all.extend([primary.channel, primary.requests]);
            all.extend(primary.stdout);
            all.extend(primary.stderr);
        }
        for worker in &self.workers {
            all.extend(worker.stdout);
            all.extend(worker.stderr);
            match &worker.channel {
                ChannelState::Closed => {}
                ChannelState::ClusterLb { socket, .. } | ChannelState::Node { socket, .. } => {
                    all.push(*socket)
                }
            }
        }
        all
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    #[test]
    fn a_state_of_another_format_is_named_as_such() {
        let error = State::parse(br#"{"format": 2, "anything": "new"}"#).unwrap_err();
        assert_eq!(
            error.to_string(),
            "the upgrade state has format 2; this binary reads format 1 (upgrade through a release that reads both)"
        );
        assert!(matches!(
            State::parse(b"not json"),
            Err(StateError::Parse(_))
        ));
        assert!(matches!(
            State::parse(br#"{"format": 1}"#),
            Err(StateError::Parse(_))
        ));
    }

    #[test]
    fn the_state_travels_through_a_memfd_and_its_descriptor_is_checked() {
        let state: State = serde_json::from_value(serde_json::json!({
            "format": FORMAT, "from": "0.1.0", "uptime_ms": 5,
            "lifecycle": {"wanted": 1, "generation": 0, "reloads": 0, "announced": "Ready",
                          "processes": [], "ids": []},
            "strategy": "round-robin", "fell_back": false, "groups": [], "workers": [],
            "active": [], "notify": {"fd": 99, "inode": 1}, "notify_name": "@x", "node": false,
            "node_groups": {"ephemeral": [], "data": []}, "released_sockets": [],
            "control": null, "metrics": null, "requester": null
        }))
        .unwrap();
        let fd = state.to_memfd().unwrap();
        let raw = fd.as_raw_fd();
        // from_variable takes ownership of the number.
        std::mem::forget(fd);
        let read = State::from_variable(&raw.to_string()).unwrap();
        assert_eq!(read.from, "0.1.0");
        assert!(State::from_variable("not a number").is_err());
        assert!(
            State::from_variable(&raw.to_string()).is_err(),
            "closed after reading"
        );
        // A number reused for another file is not taken for the inherited one.
        let other = std::fs::File::open("/proc/self/stat").unwrap();
        let named = Inherited::of(&other).unwrap();
        let wrong = Inherited {
            fd: named.fd,
            inode: named.inode + 1,
        };
        assert!(wrong.take().is_none());
    }
}
