//! Listen groups: one SO_REUSEPORT group (and one program instance) per address. Groups for
//! `--listen` addresses exist from the start and their sockets are socket-activated; a worker
//! may also ask for an address over IPC (`queryServer`), which creates a group on first use.

use std::os::fd::OwnedFd;

use anyhow::{bail, Result};

use super::drain_program_log;
use crate::{
    kernel::{Balancer, Strategy},
    listen_addr::ListenAddr,
    sockets,
};

pub struct Group {
    pub addr: ListenAddr,
    /// `None` under strategy `kernel` (chosen, or fallen back to).
    pub balancer: Option<Balancer>,
}

pub struct Groups {
    groups: Vec<Group>,
    /// The `--listen` addresses: the first groups, handed to every worker at start.
    activated: usize,
    strategy: Strategy,
    require_ebpf: bool,
    /// Set once loading failed: every group then runs without a program.
    fell_back: bool,
}

impl Groups {
    /// Checks every `--listen` address is free and loads its program instance.
    pub fn new(listen: &[ListenAddr], strategy: Strategy, require_ebpf: bool) -> Result<Groups> {
        let mut groups = Groups {
            groups: Vec::new(),
            activated: listen.len(),
            strategy,
            require_ebpf,
            fell_back: false,
        };
        for addr in listen {
            groups.create(*addr)?;
        }
        Ok(groups)
    }

    pub fn strategy_in_effect(&self) -> Strategy {
        if self.fell_back {
            Strategy::Kernel
        } else {
            self.strategy
        }
    }

    pub fn addresses(&self) -> Vec<ListenAddr> {
        self.groups.iter().map(|g| g.addr).collect()
    }

    pub fn iter(&self) -> impl Iterator<Item = &Group> {
        self.groups.iter()
    }

    /// Whether a worker may ask for `addr` over IPC: any address when no --listen was given
    /// (the Node model: workers choose), else only those.
    pub fn allows_query(&self, addr: ListenAddr) -> bool {
        self.activated == 0 || self.groups[..self.activated].iter().any(|g| g.addr == addr)
    }

    fn create(&mut self, addr: ListenAddr) -> Result<usize> {
        sockets::ensure_address_free(addr)?;
        let balancer = if self.strategy == Strategy::Kernel || self.fell_back {
            None
        } else {
            match Balancer::load(self.strategy) {
                Ok(mut balancer) => {
                    drain_program_log(&mut balancer);
                    Some(balancer)
                }
                Err(why) if self.require_ebpf => {
                    bail!("eBPF balancing is unavailable and --require-ebpf was given: {why}")
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
        self.groups.push(Group { addr, balancer });
        Ok(self.groups.len() - 1)
    }

    /// New sockets in `slot` for every `--listen` address, in order, for socket activation.
    pub fn open_activated(&mut self, slot: u32) -> Result<Vec<OwnedFd>> {
        (0..self.activated)
            .map(|index| Self::open_in(&mut self.groups[index], slot))
            .collect()
    }

    /// A new socket in `slot` for `addr`, creating its group on first use.
    pub fn open_for_query(&mut self, addr: ListenAddr, slot: u32) -> Result<OwnedFd> {
        let index = match self.groups.iter().position(|g| g.addr == addr) {
            Some(index) => index,
            None => self.create(addr)?,
        };
        Self::open_in(&mut self.groups[index], slot)
    }

    fn open_in(group: &mut Group, slot: u32) -> Result<OwnedFd> {
        let socket = sockets::reuseport_listener(group.addr)?;
        if let Some(balancer) = &mut group.balancer {
            balancer.attach(&socket)?;
            balancer.set_slot(slot, &socket)?;
        }
        Ok(OwnedFd::from(socket))
    }

    /// Writes the active set to every program instance.
    pub fn publish(&mut self, active: &[u32]) {
        for group in &mut self.groups {
            if let Some(balancer) = &mut group.balancer {
                if let Err(e) = balancer.set_active(active) {
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
