//! A program instance loaded by an older binary, taken over in an upgrade through the map
//! descriptors the older binary kept open across exec (by descriptor, not by id: opening a map
//! by id needs CAP_SYS_ADMIN, which the packaged unit does not grant).
//!
//! The new binary loads its own instance and must move every worker's socket into it, but a
//! socket can be in one REUSEPORT_SOCKARRAY only (the kernel refuses a second with EBUSY). So
//! each socket is taken out of the old map, then put in the new one, just before the new program
//! is attached; while a socket is out, the old program gives its connection to the next worker
//! in its rotation. After the attach, the old counters are read a last time and become the base
//! the new counters add to.

use std::os::fd::{AsFd, OwnedFd};

use anyhow::{Context, Result};
use aya::{
    maps::{Map, MapData, PerCpuArray, ReusePortSockArray},
    Ebpf,
};
use cluster_common::{SlotStats, MAP_SOCKETS, MAP_STATS};

/// Copies of an instance's map descriptors (close-on-exec until an upgrade clears the flag).
pub struct MapFds {
    pub sockets: Option<OwnedFd>,
    pub stats: Option<OwnedFd>,
}

fn copy_of(map: Option<&Map>) -> Option<OwnedFd> {
    let data = match map? {
        Map::ReusePortSockArray(data) | Map::PerCpuArray(data) => data,
        _ => return None,
    };
    data.fd().as_fd().try_clone_to_owned().ok()
}

impl MapFds {
    pub(super) fn of(ebpf: &Ebpf) -> MapFds {
        MapFds {
            sockets: copy_of(ebpf.map(MAP_SOCKETS)),
            stats: copy_of(ebpf.map(MAP_STATS)),
        }
    }
}

/// The older instance's maps.
pub struct OldInstance {
    sockets: Option<ReusePortSockArray<MapData>>,
    stats: Option<PerCpuArray<MapData, SlotStats>>,
}

impl OldInstance {
    /// Takes up the inherited map descriptors.
    pub fn open(fds: MapFds) -> Result<OldInstance> {
        let data = |fd: OwnedFd| MapData::from_fd(fd).context("an inherited map descriptor");
        let sockets = match fds.sockets {
            Some(fd) => Some(
                ReusePortSockArray::try_from(Map::ReusePortSockArray(data(fd)?))
                    .context("the inherited sockets map is no socket array")?,
            ),
            None => None,
        };
        let stats = match fds.stats {
            Some(fd) => Some(
                PerCpuArray::try_from(Map::PerCpuArray(data(fd)?))
                    .context("the inherited counters map is no per-CPU array")?,
            ),
            None => None,
        };
        Ok(OldInstance { sockets, stats })
    }

    /// Takes `slot`'s socket out of the old map (an empty slot is fine).
    pub fn release(&mut self, slot: u32) -> Result<()> {
        match &mut self.sockets {
            Some(sockets) => super::clear_socket_slot(sockets, slot)
                .context("taking the socket out of the old map"),
            None => Ok(()),
        }
    }

    /// What the old program counted for `slot`, summed over CPUs.
    pub fn counted(&self, slot: u32) -> Option<SlotStats> {
        let per_cpu = self.stats.as_ref()?.get(&slot, 0).ok()?;
        Some(per_cpu.iter().fold(SlotStats::default(), super::add_stats))
    }
}
