//! A program instance loaded by an older binary, found again by its maps' ids in an upgrade.
//!
//! The new binary loads its own instance and must move every worker's socket into it, but a
//! socket can be in one REUSEPORT_SOCKARRAY only (the kernel refuses a second with EBUSY). So
//! each socket is taken out of the old map, then put in the new one; while it is out, the old
//! program leaves that connection to the kernel's hash, so no connection is refused, and the
//! window is two map updates long. After the new program is attached, the old counters are read
//! a last time and become the base the new counters add to.

use anyhow::{Context, Result};
use aya::{
    maps::{Map, MapData, PerCpuArray, ReusePortSockArray},
    Ebpf,
};
use cluster_common::{SlotStats, MAP_SOCKETS, MAP_STATS};
use serde::{Deserialize, Serialize};

/// The kernel's ids of an instance's maps.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MapIds {
    pub sockets: Option<u32>,
    pub stats: Option<u32>,
}

fn id_of(map: Option<&Map>) -> Option<u32> {
    let data = match map? {
        Map::ReusePortSockArray(data) | Map::PerCpuArray(data) => data,
        _ => return None,
    };
    data.info().ok().map(|info| info.id())
}

impl MapIds {
    pub(super) fn of(ebpf: &Ebpf) -> MapIds {
        MapIds {
            sockets: id_of(ebpf.map(MAP_SOCKETS)),
            stats: id_of(ebpf.map(MAP_STATS)),
        }
    }
}

/// The older instance's maps.
pub struct OldInstance {
    sockets: Option<ReusePortSockArray<MapData>>,
    stats: Option<PerCpuArray<MapData, SlotStats>>,
}

impl OldInstance {
    /// Opens what can be opened (by id: needs CAP_SYS_ADMIN, which loading programs needs too).
    pub fn open(ids: MapIds) -> Result<OldInstance> {
        let open = |id: u32| MapData::from_id(id).with_context(|| format!("opening map id {id}"));
        let sockets = match ids.sockets {
            Some(id) => Some(
                ReusePortSockArray::try_from(Map::ReusePortSockArray(open(id)?))
                    .with_context(|| format!("map id {id} is no socket array"))?,
            ),
            None => None,
        };
        let stats = match ids.stats {
            Some(id) => Some(
                PerCpuArray::try_from(Map::PerCpuArray(open(id)?))
                    .with_context(|| format!("map id {id} is no per-CPU array"))?,
            ),
            None => None,
        };
        Ok(OldInstance { sockets, stats })
    }

    /// Takes `slot`'s socket out of the old map (an empty slot is fine).
    pub fn release(&mut self, slot: u32) -> Result<()> {
        let Some(sockets) = &mut self.sockets else {
            return Ok(());
        };
        match sockets.clear_index(&slot) {
            Ok(()) => Ok(()),
            Err(aya::maps::MapError::SyscallError(e))
                if e.io_error.raw_os_error() == Some(libc::ENOENT) =>
            {
                Ok(())
            }
            Err(e) => Err(e).with_context(|| format!("taking slot {slot} out of the old map")),
        }
    }

    /// What the old program counted for `slot`, summed over CPUs.
    pub fn counted(&self, slot: u32) -> Option<SlotStats> {
        let per_cpu = self.stats.as_ref()?.get(&slot, 0).ok()?;
        Some(
            per_cpu
                .iter()
                .fold(SlotStats::default(), |sum, cpu| SlotStats {
                    selected: sum.selected + cpu.selected,
                    fallback: sum.fallback + cpu.fallback,
                    migrated: sum.migrated + cpu.migrated,
                }),
        )
    }
}
