//! Listen groups: one SO_REUSEPORT group (and one program instance) per address. Groups for
//! `--listen` addresses exist from the start and their sockets are socket-activated; a worker
//! may also ask for an address over its channel (`queryServer`), which creates a group on first
//! use.

use std::os::fd::OwnedFd;

use cluster_lb_worker::ListenAddr;

use super::{
    sockets::{self, ListenError, Stack},
    unix_listens::{Problem, UnixListenError, UnixListens},
    Balancer, OldInstance, Strategy, Unavailable,
};
use serde::{Deserialize, Serialize};

use crate::sys::fds::Inherited;
use cluster_common::SlotStats;

pub struct Group {
    pub addr: ListenAddr,
    /// `None` under strategy `kernel` (chosen, or fallen back to).
    pub balancer: Option<Balancer>,
    /// Whether its IPv6 sockets take IPv4 too (Node binds a listen without a host dual-stack).
    stack: Stack,
    /// The instance an older binary attached, until this one's replaced it (an upgrade).
    old: Option<OldInstance>,
}

impl Group {
    pub fn stack(&self) -> Stack {
        self.stack
    }
}

/// Why a group or one of its sockets could not be had.
#[derive(Debug, thiserror::Error)]
pub enum GroupError {
    #[error(transparent)]
    Listen(#[from] ListenError),
    #[error("eBPF balancing is unavailable and --require-ebpf was given: {0}")]
    EbpfRequired(Unavailable),
    #[error("{addr}: {detail}")]
    Kernel { addr: ListenAddr, detail: String },
    #[error(transparent)]
    Unix(#[from] UnixListenError),
}

impl GroupError {
    /// The errno to give a worker whose listen this refuses.
    pub fn errno(&self) -> i32 {
        match self {
            GroupError::Listen(error) => error.errno(),
            GroupError::Unix(error) => error.errno(),
            _ => libc::EINVAL,
        }
    }
}

pub struct Groups {
    groups: Vec<Group>,
    /// The `--listen` addresses: the first groups, handed to every worker at start.
    activated: usize,
    strategy: Strategy,
    require_ebpf: bool,
    /// Set once loading failed: every group then runs without a program.
    fell_back: bool,
    /// The Unix-socket listens: no group and no program, one socket all workers share.
    unix: UnixListens,
}

impl Groups {
    /// A group, with its program instance, for every `--listen` address (each checked free
    /// by the caller).
    pub fn new(
        listen: &[ListenAddr],
        strategy: Strategy,
        require_ebpf: bool,
    ) -> Result<Groups, GroupError> {
        let mut groups = Groups {
            groups: Vec::new(),
            activated: listen.len(),
            strategy,
            require_ebpf,
            fell_back: false,
            unix: UnixListens::default(),
        };
        for addr in listen {
            groups.create(*addr, Stack::System)?;
        }
        Ok(groups)
    }

    /// The groups an older binary handed over in an upgrade, with fresh program instances:
    /// every worker's socket goes in its slot and the counters continue from `state`, but the
    /// programs are attached only by [`Groups::swap_in`], once the maps are complete.
    pub fn resume(
        states: &[SavedGroup],
        strategy: Strategy,
        fell_back: bool,
    ) -> Result<Groups, GroupError> {
        let mut groups = Groups {
            groups: Vec::new(),
            activated: states.iter().filter(|g| g.activated).count(),
            strategy,
            // The old program stays attached until a new one replaces it, and would then
            // never learn of a new worker: a program that does not load is an error here.
            require_ebpf: !fell_back,
            fell_back,
            unix: UnixListens::default(),
        };
        for state in states {
            let index = groups.create(state.addr, state.stack())?;
            let group = &mut groups.groups[index];
            let Some(balancer) = &mut group.balancer else {
                continue;
            };
            // The sockets move into the new maps only in `swap_in`, just before the attach:
            // while one is out of the old map and not yet in use by the new program, the old
            // program cannot choose it.
            let inherited = crate::kernel::MapFds {
                sockets: state.maps.sockets.and_then(Inherited::take),
                stats: state.maps.stats.and_then(Inherited::take),
            };
            let old = OldInstance::open(inherited)
                .map_err(|e| log::warn!("{}: the old program's maps: {e:#}", state.addr))
                .ok();
            // Open connections (least-loaded) are not carried over: those open now carry the
            // old instance's socket storage, so the new counter program never sees them close,
            // and a count seeded with them would never come down. The new count starts at 0.
            for counters in &state.counters {
                balancer.add_to_base(
                    counters.slot,
                    SlotStats {
                        selected: counters.selected,
                        fallback: counters.fallback,
                        migrated: counters.migrated,
                    },
                );
            }
            group.old = old;
        }
        Ok(groups)
    }

    /// Moves every worker's socket from the old program's map into the new one's, then
    /// attaches the new program through one of them, which replaces the old program in one step
    /// (the kernel swaps a group's program atomically). A socket is out of both maps for two map
    /// updates; the old program then gives its connection to the next worker in its rotation.
    /// Finally the old counters, now final, become the base of the new ones.
    pub fn swap_in(&mut self, sockets: &[(ListenAddr, u32, OwnedFd)]) {
        for group in &mut self.groups {
            let Some(balancer) = &mut group.balancer else {
                continue;
            };
            let members: Vec<_> = sockets.iter().filter(|(a, ..)| *a == group.addr).collect();
            for (_, slot, socket) in &members {
                if let Some(old) = &mut group.old {
                    if let Err(e) = old.release(*slot) {
                        log::warn!("{}: {e:#}", group.addr);
                    }
                }
                if let Err(e) = balancer.place(*slot, socket) {
                    log::error!("{}: {e:#}", group.addr);
                }
            }
            match members.first().map(|(_, _, socket)| balancer.attach(socket)) {
                Some(Ok(())) => {
                    if let Some(old) = group.old.take() {
                        for (_, slot, _) in &members {
                            if let Some(counted) = old.counted(*slot) {
                                balancer.add_to_base(*slot, counted);
                            }
                        }
                    }
                }
                Some(Err(e)) => log::error!("{}: the new program could not take over: {e:#}", group.addr),
                None => log::warn!("{}: no worker holds a socket of this group; its new program is attached when one does", group.addr),
            }
        }
    }

    /// Whether eBPF balancing fell back to the kernel's hash.
    pub fn fell_back(&self) -> bool {
        self.fell_back
    }

    pub fn strategy_in_effect(&self) -> Strategy {
        if self.fell_back {
            return Strategy::Kernel;
        }
        // A program may run less than was asked (least-loaded without its counter).
        self.groups
            .iter()
            .filter(|g| !g.addr.is_udp())
            .find_map(|g| g.balancer.as_ref())
            .map_or(self.strategy, Balancer::strategy)
    }

    pub fn addresses(&self) -> Vec<ListenAddr> {
        self.groups.iter().map(|g| g.addr).collect()
    }

    /// Every address and path listened on, as `status` and the log name them (a path as
    /// `unix:PATH`, as `--listen` takes it).
    pub fn listen_names(&self) -> Vec<String> {
        let paths = self.unix.paths().map(|p| format!("unix:{}", p.display()));
        self.groups
            .iter()
            .map(|g| g.addr.to_string())
            .chain(paths)
            .collect()
    }

    pub fn iter(&self) -> impl Iterator<Item = &Group> {
        self.groups.iter()
    }

    /// How many `--listen` addresses there are (the sockets at fds 3.. of every worker).
    pub fn activated(&self) -> usize {
        self.activated
    }

    /// The `--listen` address at `index`.
    pub fn activated_addr(&self, index: usize) -> Option<ListenAddr> {
        self.groups[..self.activated].get(index).map(|g| g.addr)
    }

    /// The index of the `--listen` address a listen on `ip` (none: all addresses) and `port`
    /// means: the same address, or, for a listen without a host, the same port.
    pub fn activated_index(
        &self,
        transport: cluster_lb_worker::listen_addr::Transport,
        ip: Option<std::net::IpAddr>,
        port: u16,
    ) -> Option<usize> {
        self.groups[..self.activated].iter().position(|g| {
            let addr = g.addr.socket_addr();
            g.addr.transport() == transport
                && addr.port() == port
                && ip.is_none_or(|ip| ip == addr.ip())
        })
    }

    /// Whether a group for `addr` exists.
    pub fn contains(&self, addr: ListenAddr) -> bool {
        self.groups.iter().any(|g| g.addr == addr)
    }

    /// How many groups the workers' requests created (besides the --listen ones).
    pub fn queried(&self) -> usize {
        self.groups.len() - self.activated
    }

    /// Whether a worker may ask for `addr` over its channel: any address when no --listen was
    /// given (the Node model: workers choose), else only those.
    pub fn allows_query(&self, addr: ListenAddr) -> bool {
        self.activated == 0 || self.groups[..self.activated].iter().any(|g| g.addr == addr)
    }

    /// The strategy of `addr`'s group: UDP is never balanced per datagram (round robin would
    /// split a flow between workers), so round robin means the flow hash there.
    pub fn strategy_for(&self, addr: ListenAddr) -> Strategy {
        match self.strategy {
            // Datagrams have no connections to count either.
            Strategy::RoundRobin | Strategy::LeastLoaded if addr.is_udp() => Strategy::Hash,
            strategy => strategy,
        }
    }

    fn create(&mut self, addr: ListenAddr, stack: Stack) -> Result<usize, GroupError> {
        let balancer = if self.strategy == Strategy::Kernel || self.fell_back {
            None
        } else {
            match Balancer::load(self.strategy_for(addr)) {
                Ok(balancer) => Some(balancer),
                Err(why) if self.require_ebpf => return Err(GroupError::EbpfRequired(why)),
                // Once programs load, a later failure (out of descriptors, say) is this
                // group's problem: it must not silently turn every group into a plain hash.
                Err(why) if self.groups.iter().any(|g| g.balancer.is_some()) => {
                    return Err(GroupError::Kernel {
                        addr,
                        detail: format!("cannot load its eBPF program: {why}"),
                    })
                }
                Err(why) => {
                    log::warn!(
                        "eBPF balancing unavailable: {why}; falling back to --strategy kernel (plain SO_REUSEPORT hashing)"
                    );
                    // One strategy for all groups: drop instances loaded for earlier addresses.
                    self.fell_back = true;
                    self.groups.iter_mut().for_each(|g| g.balancer = None);
                    None
                }
            }
        };
        self.groups.push(Group {
            addr,
            balancer,
            stack,
            old: None,
        });
        Ok(self.groups.len() - 1)
    }

    /// New sockets in `slot` for every `--listen` address, in order, for socket activation,
    /// then a copy of each `--listen unix:` path's socket.
    pub fn open_activated(&mut self, slot: u32) -> Result<Vec<OwnedFd>, GroupError> {
        let mut sockets = (0..self.activated)
            .map(|index| Self::open_in(&mut self.groups[index], slot))
            .collect::<Result<Vec<_>, _>>()?;
        for listen in self.unix.activated() {
            let copy = listen.socket().map_err(|e| UnixListenError {
                path: listen.path.clone(),
                problem: Problem::Io(e),
            })?;
            sockets.push(copy);
        }
        Ok(sockets)
    }

    /// Adds the Unix-socket listens (`--listen unix:`, or those an older binary held).
    pub fn with_unix(mut self, unix: UnixListens) -> Groups {
        self.unix = unix;
        self
    }

    pub fn unix(&self) -> &UnixListens {
        &self.unix
    }

    pub fn unix_mut(&mut self) -> &mut UnixListens {
        &mut self.unix
    }

    /// Whether any `--listen` was given (an address or a path): then the workers may listen
    /// only on those.
    pub fn any_listen(&self) -> bool {
        self.activated > 0 || !self.unix.activated().is_empty()
    }

    /// A new socket in `slot` for `addr`, creating its group on first use. Port 0 makes a new
    /// group on a port the kernel picks (the caller remembers it, so that later workers ask for
    /// that port). Returns the group's address with the socket.
    pub fn open_at(
        &mut self,
        addr: ListenAddr,
        stack: Stack,
        slot: u32,
    ) -> Result<(ListenAddr, OwnedFd), GroupError> {
        let port = addr.socket_addr().port();
        let existing = (port != 0)
            .then(|| self.groups.iter().position(|g| g.addr == addr))
            .flatten();
        let index = match existing {
            Some(index) => index,
            None if port == 0 => {
                // The first socket decides the port; its group is created around it.
                let socket = sockets::reuseport_listener(addr, stack)?;
                let bound = socket
                    .local_addr()
                    .ok()
                    .and_then(|a| a.as_socket())
                    .ok_or_else(|| ListenError {
                        addr,
                        source: std::io::Error::other("the kernel did not say which port"),
                    })?;
                let index = self.create(addr.with_port(bound.port()), stack)?;
                let group = &mut self.groups[index];
                Self::register(group, slot, &socket)?;
                return Ok((group.addr, OwnedFd::from(socket)));
            }
            None => {
                sockets::ensure_address_free(addr, stack)?;
                self.create(addr, stack)?
            }
        };
        let group = &mut self.groups[index];
        Self::open_in(group, slot).map(|socket| (group.addr, socket))
    }

    fn open_in(group: &mut Group, slot: u32) -> Result<OwnedFd, GroupError> {
        let socket = sockets::reuseport_listener(group.addr, group.stack)?;
        Self::register(group, slot, &socket)?;
        Ok(OwnedFd::from(socket))
    }

    /// A socket for the reserve (`supervisor::workers::reserve`) in `addr`'s group, in `slot`;
    /// `None` when the group has no program (the kernel's hashing would give it connections).
    pub fn open_reserve(
        &mut self,
        addr: ListenAddr,
        slot: u32,
    ) -> Result<Option<OwnedFd>, GroupError> {
        match self.groups.iter_mut().find(|g| g.addr == addr) {
            Some(group) if group.balancer.is_some() => Self::open_in(group, slot).map(Some),
            _ => Ok(None),
        }
    }

    /// Attaches the group's program and puts the socket in `slot`.
    fn register(group: &mut Group, slot: u32, socket: &socket2::Socket) -> Result<(), GroupError> {
        let addr = group.addr;
        let kernel = |e: anyhow::Error| GroupError::Kernel {
            addr,
            detail: format!("{e:#}"),
        };
        if let Some(balancer) = &mut group.balancer {
            balancer.attach(socket).map_err(kernel)?;
            balancer.set_slot(slot, socket).map_err(kernel)?;
        }
        Ok(())
    }

    /// Attaches the program of `addr`'s group again, through `socket` (a member of the group).
    pub fn reattach(&mut self, addr: ListenAddr, socket: &OwnedFd) -> anyhow::Result<()> {
        let group = self.groups.iter_mut().find(|g| g.addr == addr);
        match group.and_then(|g| g.balancer.as_mut()) {
            Some(balancer) => balancer.attach(socket),
            None => Ok(()),
        }
    }

    /// Writes the active set (slots) and who serves each worker id (slot, id) to every
    /// program instance.
    pub fn publish(&mut self, active: &[u32], members: &[(u32, u32)]) {
        for group in &mut self.groups {
            if let Some(balancer) = &mut group.balancer {
                let published = balancer
                    .set_members(members)
                    .and_then(|()| balancer.set_active(active));
                if let Err(e) = published {
                    log::error!("{}: {e:#}", group.addr);
                }
            }
        }
    }

    pub fn clear_slot(&mut self, slot: u32) {
        for group in &mut self.groups {
            if let Some(balancer) = &mut group.balancer {
                if let Err(e) = balancer.clear_slot(slot) {
                    log::warn!("{}: {e:#}", group.addr);
                }
            }
        }
    }
}

impl SavedGroup {
    pub fn stack(&self) -> Stack {
        match (self.dual_stack, self.v6_only) {
            (true, _) => Stack::Dual,
            (false, true) => Stack::V6Only,
            (false, false) => Stack::System,
        }
    }
}

/// A group as an older binary handed it over (an in-place upgrade).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SavedGroup {
    pub addr: ListenAddr,
    pub dual_stack: bool,
    /// IPv6 only (Node's ipv6Only); absent from an older binary.
    #[serde(default)]
    pub v6_only: bool,
    /// A `--listen` address (else created by a worker's request).
    pub activated: bool,
    /// By slot: what instances before the running one counted, and the open connections.
    pub counters: Vec<SlotCounters>,
    /// The running instance's maps: its sockets move to the new one, and its counters are
    /// read a last time once the new one is attached.
    pub maps: SavedMaps,
}

/// The running instance's map descriptors, kept open across exec.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedMaps {
    pub sockets: Option<Inherited>,
    pub stats: Option<Inherited>,
}

/// A slot's counters that live outside the running program's maps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SlotCounters {
    pub slot: u32,
    pub selected: u64,
    pub fallback: u64,
    pub migrated: u64,
    pub open: u64,
}
