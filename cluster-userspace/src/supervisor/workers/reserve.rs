//! The reserve: one listening socket the primary holds in each TCP listen group, in a slot of
//! its own, so that while no worker can take a connection (all dead and waiting out their
//! restart backoff, all hung, none ready yet after such a storm) new connections wait in its
//! accept queue instead of being refused.
//!
//! It is in the kernel's active set only while no worker slot is, so the program never picks
//! it while a worker is live. When a worker becomes active again, the reserve's sockets are
//! closed, after the new active set is published: the kernel migrates what waits in them to a
//! live worker (the program runs as SELECT_OR_MIGRATE, and the primary sets
//! net.ipv4.tcp_migrate_req), and fresh sockets take their place. Idle, it also catches what
//! the program's last-resort fallback (no live socket in any active slot: every worker just
//! died) hands to the kernel, which would otherwise find no socket at all.
//!
//! Only groups with the eBPF program have one: under the kernel's own hashing a reserve would
//! get its share of connections while workers live. UDP groups have none: a datagram queued
//! in a socket that closes is lost, not migrated.

use std::{collections::HashMap, os::fd::OwnedFd};

use cluster_lb_worker::ListenAddr;

use crate::kernel::{groups::Groups, slots::SlotTable};

#[derive(Default)]
pub struct Reserve {
    /// Its slot, taken once it first opened sockets.
    slot: Option<u32>,
    sockets: HashMap<ListenAddr, OwnedFd>,
    /// In the active set now (no worker is).
    pub in_use: bool,
    /// Off for good once the cluster stops: connections are then refused, as from any
    /// stopped server, so clients and balancers in front go elsewhere.
    closed: bool,
}

impl Reserve {
    /// Opens a socket in every TCP group that has the program and none yet. Returns the slot,
    /// if the reserve has any socket.
    pub fn open(&mut self, slots: &mut SlotTable, groups: &mut Groups) -> Option<u32> {
        if self.closed {
            return None;
        }
        let slot = match self.slot {
            Some(slot) => slot,
            None => {
                let slot = slots.allocate()?;
                self.slot = Some(slot);
                slot
            }
        };
        for addr in groups.addresses() {
            if addr.is_udp() || self.sockets.contains_key(&addr) {
                continue;
            }
            match groups.open_reserve(addr, slot) {
                Ok(Some(socket)) => {
                    self.sockets.insert(addr, socket);
                }
                Ok(None) => {}
                Err(e) => log::warn!(
                    "{addr}: no reserve socket ({e}): while no worker is ready, connections there are refused"
                ),
            }
        }
        (!self.sockets.is_empty()).then_some(slot)
    }

    /// Opens fresh sockets, idle, in the same slot, then closes the old ones: what waited in
    /// them migrates to the active workers. New before old, so the group is never without a
    /// socket: should the "active" workers have just died (their exits not yet handled), the
    /// kernel's fallback puts what migrates into the fresh reserve instead of resetting it.
    pub fn renew(&mut self, slots: &mut SlotTable, groups: &mut Groups) {
        self.in_use = false;
        let waited = std::mem::take(&mut self.sockets);
        self.open(slots, groups);
        drop(waited);
    }

    /// The cluster stops: the reserve closes and is not opened again.
    pub fn close(&mut self, slots: &mut SlotTable, groups: &mut Groups) {
        self.closed = true;
        self.in_use = false;
        self.sockets.clear();
        if let Some(slot) = self.slot.take() {
            groups.clear_slot(slot);
            slots.release(slot);
        }
    }

    /// The inodes of its sockets (to see whether connections wait in an idle reserve).
    pub fn inodes(&self) -> Vec<u64> {
        use std::os::fd::AsRawFd;
        self.sockets
            .values()
            .filter_map(|socket| crate::sys::fds::inode(socket.as_raw_fd()))
            .collect()
    }
}
