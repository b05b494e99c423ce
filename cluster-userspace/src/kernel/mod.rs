//! The kernel side: one loaded instance of the sk_reuseport program per listen address, and the
//! maps through which the primary tells it which worker sockets may receive connections.

mod counter;
pub mod groups;
mod handover;
#[cfg(test)]
mod layer_tests;
pub mod maglev;
pub mod slots;
pub mod sockets;
mod unavailable;
pub mod unix_listens;

use std::{
    fmt,
    os::fd::{AsFd, AsRawFd},
    str::FromStr,
};

use anyhow::{anyhow, Context, Result};
use aya::{
    maps::{Array, MapData, PerCpuArray, PerCpuValues, ReusePortSockArray, SkStorage},
    programs::SkReuseport,
    Ebpf, EbpfLoader,
};
use cluster_common::{
    table_size, ActiveSet, SlotStats, SlotTable, SocketSlot, CONFIG_ACTIVE_BUFFER,
    CONFIG_TABLE_BUFFER, GLOBAL_STRATEGY, MAP_ACTIVE, MAP_CONFIG, MAP_OPEN, MAP_SLOT_OF,
    MAP_SOCKETS, MAP_STATS, MAP_TABLE, MAX_SLOTS, MAX_WORKERS, NO_SLOT_STATS, PROGRAM_NAME,
    STRATEGY_HASH, STRATEGY_LEAST_LOADED, STRATEGY_ROUND_ROBIN, STRATEGY_STICKY,
};

pub use handover::{MapFds, OldInstance};
pub use unavailable::Unavailable;

/// The program, built by `cargo xtask build-ebpf` and committed, so a stable `cargo build` needs
/// neither nightly nor bpf-linker.
static PROGRAM_OBJECT: &[u8] = aya::include_bytes_aligned!("../../bpf/cluster-lb-ebpf.o");

/// How new connections are spread over the workers of one listen group.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Strategy {
    /// Exact rotation over the active workers, by our program.
    #[default]
    RoundRobin,
    /// Flow hash of the 4-tuple, by consistent hashing over the ready workers, by our program.
    Hash,
    /// The client's address, by consistent hashing over the ready workers, by our program:
    /// every connection of a client goes to one worker.
    Sticky,
    /// The worker with the fewest open connections (of all, up to 8 workers; else of the
    /// round-robin choice and a random other), by our program, with connections counted by a
    /// sock_ops (or tracepoint) program.
    LeastLoaded,
    /// Plain SO_REUSEPORT: no program; the kernel hashes over every socket of the group.
    Kernel,
}

impl Strategy {
    pub const NAMES: [&'static str; 5] =
        ["round-robin", "hash", "sticky", "least-loaded", "kernel"];

    pub fn name(self) -> &'static str {
        match self {
            Strategy::RoundRobin => "round-robin",
            Strategy::Hash => "hash",
            Strategy::Sticky => "sticky",
            Strategy::LeastLoaded => "least-loaded",
            Strategy::Kernel => "kernel",
        }
    }

    /// The id the program reads, or `None` for the strategy that runs no program.
    pub fn program_id(self) -> Option<u32> {
        match self {
            Strategy::RoundRobin => Some(STRATEGY_ROUND_ROBIN),
            Strategy::Hash => Some(STRATEGY_HASH),
            Strategy::Sticky => Some(STRATEGY_STICKY),
            Strategy::LeastLoaded => Some(STRATEGY_LEAST_LOADED),
            Strategy::Kernel => None,
        }
    }
}

impl fmt::Display for Strategy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Strategy {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text {
            "round-robin" | "rr" => Ok(Strategy::RoundRobin),
            "hash" | "shared" => Ok(Strategy::Hash),
            "sticky" => Ok(Strategy::Sticky),
            "least-loaded" => Ok(Strategy::LeastLoaded),
            "kernel" | "none" => Ok(Strategy::Kernel),
            _ => Err(format!(
                "unknown strategy '{text}'; use one of {}",
                Strategy::NAMES.join(", ")
            )),
        }
    }
}

/// One loaded program instance and its maps, for one SO_REUSEPORT group.
pub struct Balancer {
    // Keeps the program loaded; its maps were taken out below.
    ebpf: Ebpf,
    sockets: ReusePortSockArray<MapData>,
    active: Array<MapData, ActiveSet>,
    config: Array<MapData, u32>,
    stats: PerCpuArray<MapData, SlotStats>,
    tables: Array<MapData, SlotTable>,
    /// Which of the two active-set buffers the program reads now.
    active_buffer: u32,
    /// The worker ids the Maglev table was built for, and that table (`id + 1` per entry).
    table_ids: Vec<u32>,
    id_table: Vec<u32>,
    /// The slot table the program reads now (built from the above and the members), and what
    /// CLB_CONFIG says of it (its half of CLB_TABLE, its size; 0 until the first is written).
    table: Box<SlotTable>,
    table_half: u32,
    /// Open connections per slot (kept by the counter program, for least-loaded).
    open: Array<MapData, u64>,
    /// Each worker socket's slot, which the kernel copies into the connections accepted from
    /// it, for the counter program (least-loaded only).
    slot_of: SkStorage<MapData, SocketSlot>,
    /// The strategy the program runs (least-loaded degrades to round robin when its counter
    /// program cannot run).
    strategy: Strategy,
    cpus: usize,
    /// Copies of the descriptors of the maps the next binary of an upgrade takes over.
    map_fds: MapFds,
    /// Counts of older program instances (before an upgrade), added to this one's, by slot.
    base: std::collections::HashMap<u32, SlotStats>,
}

impl Balancer {
    /// Loads and verifies a fresh instance. It selects nothing until it is attached to a socket
    /// of the group and given slots.
    pub fn load(strategy: Strategy) -> Result<Balancer, Unavailable> {
        if strategy.program_id().is_none() {
            return Err(Unavailable::other(anyhow!(
                "strategy 'kernel' runs no program"
            )));
        }
        if let Some((major, minor)) = kernel_release() {
            let missing = missing_features((major, minor));
            if !missing.is_empty() {
                return Err(Unavailable::other(anyhow!(
                    "kernel {major}.{minor} has {}",
                    missing.join(", ")
                )));
            }
        }
        raise_memlock_limit();
        match Balancer::load_as(strategy) {
            Ok(balancer) => Ok(balancer),
            Err(LoadError::Unavailable(why)) => Err(why),
            Err(LoadError::Counter(why)) => {
                log::warn!(
                    "least-loaded needs connections counted by a sock_ops or BTF tracepoint program, neither of which can run here: {why:#}; balancing by round robin instead"
                );
                Balancer::load_as(Strategy::RoundRobin).map_err(LoadError::into_unavailable)
            }
        }
    }

    /// Loads an instance that runs `strategy`, which the verifier sees as a constant (see
    /// GLOBAL_STRATEGY): the counter program first, for least-loaded, so that an instance whose
    /// counter cannot run is never the one attached.
    fn load_as(strategy: Strategy) -> Result<Balancer, LoadError> {
        let id = strategy
            .program_id()
            .ok_or_else(|| Unavailable::other(anyhow!("strategy 'kernel' runs no program")))?;
        let hook = match strategy {
            Strategy::LeastLoaded => Some(counter::Hook::find().map_err(LoadError::Counter)?),
            _ => None,
        };
        let mut loader = EbpfLoader::new();
        loader.override_global(GLOBAL_STRATEGY, &id, true);
        let mut ebpf = loader.load(PROGRAM_OBJECT).map_err(|e| {
            LoadError::from(Unavailable::classify(
                anyhow::Error::new(e).context("loading the eBPF object"),
            ))
        })?;
        if let Some(hook) = &hook {
            hook.start(&mut ebpf).map_err(LoadError::Counter)?;
        }
        let program: &mut SkReuseport = ebpf
            .program_mut(PROGRAM_NAME)
            .ok_or_else(|| {
                Unavailable::other(anyhow!("program {PROGRAM_NAME} missing from the object"))
            })?
            .try_into()
            .map_err(|e| Unavailable::other(anyhow::Error::new(e)))?;
        program.load().map_err(|e| {
            LoadError::from(Unavailable::classify(
                anyhow::Error::new(e).context("verifying the sk_reuseport program"),
            ))
        })?;

        let build = || -> Result<Balancer> {
            let map_fds = MapFds::of(&ebpf);
            let sockets = take_map(&mut ebpf, MAP_SOCKETS)?;
            let active = take_map(&mut ebpf, MAP_ACTIVE)?;
            let config = take_map(&mut ebpf, MAP_CONFIG)?;
            let stats = take_map(&mut ebpf, MAP_STATS)?;
            let tables = take_map(&mut ebpf, MAP_TABLE)?;
            let open = take_map(&mut ebpf, MAP_OPEN)?;
            let slot_of = take_map(&mut ebpf, MAP_SLOT_OF)?;
            let cpus = aya::util::nr_cpus().map_err(|(what, e)| anyhow!("{what}: {e}"))?;
            Ok(Balancer {
                ebpf,
                sockets,
                active,
                config,
                stats,
                tables,
                active_buffer: 0,
                table_ids: Vec::new(),
                id_table: Vec::new(),
                table: Box::new(SlotTable::EMPTY),
                table_half: 0,
                open,
                slot_of,
                strategy,
                cpus,
                map_fds,
                base: std::collections::HashMap::new(),
            })
        };
        build().map_err(|e| Unavailable::other(e).into())
    }

    /// Makes the program the selector of the group `socket` belongs to. The socket must already
    /// be bound with SO_REUSEPORT and listening. Attaching again (to any member) is harmless, and
    /// needed after every member closed: the kernel then forgets the group and its program.
    pub fn attach(&mut self, socket: &impl AsFd) -> Result<()> {
        let program: &mut SkReuseport = self
            .ebpf
            .program_mut(PROGRAM_NAME)
            .context("program missing")?
            .try_into()?;
        program
            .attach(socket)
            .context("attaching the sk_reuseport program to the listen group")
    }

    /// Puts a worker's listening socket in `slot` and zeroes the slot's counters, which from now
    /// on count for this worker.
    pub fn set_slot(&mut self, slot: u32, socket: &impl AsRawFd) -> Result<()> {
        self.base.remove(&slot);
        self.place(slot, socket)?;
        let zeros = PerCpuValues::try_from(vec![SlotStats::default(); self.cpus])
            .context("sizing per-CPU counters")?;
        self.stats
            .set(slot, zeros, 0)
            .with_context(|| format!("zeroing the counters of slot {slot}"))?;
        self.open
            .set(slot, 0, 0)
            .with_context(|| format!("zeroing the open connections of slot {slot}"))
    }

    /// Puts a socket in `slot` without touching its counters (a worker taken over in an
    /// upgrade, whose counters continue). Under least-loaded the socket is also given its slot,
    /// before it can receive a connection, so that every connection accepted from it carries it.
    pub fn place(&mut self, slot: u32, socket: &impl AsRawFd) -> Result<()> {
        if self.strategy == Strategy::LeastLoaded {
            self.slot_of
                .insert(socket, SocketSlot { slot, counted: 0 }, 0)
                .with_context(|| format!("giving the worker socket of slot {slot} its slot"))?;
        }
        self.sockets
            .set(slot, socket, 0)
            .with_context(|| format!("putting the worker socket in slot {slot}"))
    }

    /// Empties a slot. The kernel does this by itself when the socket closes; this is for
    /// sockets the primary gives up on before a worker ever owned them.
    pub fn clear_slot(&mut self, slot: u32) -> Result<()> {
        clear_socket_slot(&mut self.sockets, slot)
    }

    /// Publishes the slots that may receive new connections. The new list goes into the buffer
    /// the program is not reading, then one u32 write flips the program over to it, so the
    /// program never sees a count that does not match its list.
    pub fn set_active(&mut self, slots: &[u32]) -> Result<()> {
        let mut set = ActiveSet::EMPTY;
        anyhow::ensure!(
            slots.len() <= MAX_SLOTS as usize,
            "{} active slots, the most is {MAX_SLOTS}",
            slots.len()
        );
        set.slots[..slots.len()].copy_from_slice(slots);
        set.count = slots.len() as u32;
        let next = self.active_buffer ^ 1;
        self.active
            .set(next, set, 0)
            .context("writing the active set")?;
        self.set_config(CONFIG_ACTIVE_BUFFER, next)?;
        self.active_buffer = next;
        Ok(())
    }

    /// Publishes which worker id each active slot serves, for the consistent-hashing
    /// strategies: the Maglev table of the ids (rebuilt only when the set of ids changed), each
    /// entry given its id's slot, written whole into the half the program is not reading, then
    /// flipped; nothing is written when no entry changed.
    pub fn set_members(&mut self, members: &[(u32, u32)]) -> Result<()> {
        if self.strategy != Strategy::Hash && self.strategy != Strategy::Sticky {
            return Ok(());
        }
        let mut ids: Vec<u32> = members.iter().map(|&(_, id)| id).collect();
        ids.sort_unstable();
        ids.dedup();
        if ids != self.table_ids {
            self.id_table = maglev::table(&ids, table_size(ids.len() as u32));
            self.table_ids = ids;
        }
        let table = slot_table(&self.id_table, members);
        if table == self.table && self.table_half >> 1 == self.id_table.len() as u32 {
            return Ok(());
        }
        let spare = self.table_half & 1 ^ 1;
        self.tables
            // By reference: the value is 128 KiB, too big to copy onto the stack.
            .set(spare, table.as_ref(), 0)
            .context("writing the consistent-hashing table")?;
        // One u32 flips the half and its size together.
        let current = (self.id_table.len() as u32) << 1 | spare;
        self.set_config(CONFIG_TABLE_BUFFER, current)?;
        self.table = table;
        self.table_half = current;
        Ok(())
    }

    /// The maps an upgrade hands over (see [`OldInstance`]).
    pub fn map_fds(&self) -> &MapFds {
        &self.map_fds
    }

    /// The strategy the program runs.
    pub fn strategy(&self) -> Strategy {
        self.strategy
    }

    /// Open connections of the worker in `slot`, as the counter program keeps them (0 unless
    /// the strategy is least-loaded).
    pub fn open_connections(&self, slot: u32) -> u64 {
        let open = self.open.get(&slot, 0).unwrap_or(0);
        if open > u64::MAX / 2 {
            0
        } else {
            open
        }
    }

    /// Counts an older program instance made for `slot` (an upgrade): from now on they are part
    /// of the slot's counters.
    pub fn add_to_base(&mut self, slot: u32, counted: SlotStats) {
        let base = self.base.entry(slot).or_default();
        *base = add_stats(*base, &counted);
    }

    /// What older instances counted for `slot` (see [`Balancer::add_to_base`]).
    pub fn base(&self, slot: u32) -> SlotStats {
        self.base.get(&slot).copied().unwrap_or_default()
    }

    /// The counters of one slot, summed over CPUs.
    pub fn slot_stats(&self, slot: u32) -> Result<SlotStats> {
        let per_cpu = self
            .stats
            .get(&slot, 0)
            .with_context(|| format!("reading the counters of slot {slot}"))?;
        Ok(per_cpu.iter().fold(self.base(slot), add_stats))
    }

    /// Connections that found no slot at all (empty active set, or every active slot dead) and
    /// were left to the kernel's own hash.
    pub fn unassigned_fallbacks(&self) -> Result<u64> {
        Ok(self.slot_stats(NO_SLOT_STATS)?.fallback)
    }

    fn set_config(&mut self, index: u32, value: u32) -> Result<()> {
        self.config
            .set(index, value, 0)
            .with_context(|| format!("writing config entry {index}"))
    }
}

/// The program's table: each entry of the Maglev table of ids (`id + 1`) as `slot + 1` of that
/// id's member, 0 where the id has none.
fn slot_table(id_table: &[u32], members: &[(u32, u32)]) -> Box<SlotTable> {
    let mut slot_of = vec![0u16; MAX_WORKERS as usize];
    for &(slot, id) in members {
        if let (Some(entry), Ok(slot)) = (slot_of.get_mut(id as usize), u16::try_from(slot + 1)) {
            *entry = slot;
        }
    }
    let mut table = Box::new(SlotTable::EMPTY);
    for (entry, &id_plus_one) in table.slots.iter_mut().zip(id_table) {
        *entry = match id_plus_one.checked_sub(1) {
            Some(id) => slot_of.get(id as usize).copied().unwrap_or(0),
            None => 0,
        };
    }
    table
}

/// Why an instance did not load: least-loaded's counter program could not run (round robin
/// can), or eBPF balancing is unavailable.
enum LoadError {
    Counter(anyhow::Error),
    Unavailable(Unavailable),
}

impl LoadError {
    fn into_unavailable(self) -> Unavailable {
        match self {
            LoadError::Counter(why) => Unavailable::other(why),
            LoadError::Unavailable(why) => why,
        }
    }
}

impl From<Unavailable> for LoadError {
    fn from(why: Unavailable) -> LoadError {
        LoadError::Unavailable(why)
    }
}

/// `sum` plus `more`, counter by counter (per-CPU values, older instances' counts).
pub(crate) fn add_stats(sum: SlotStats, more: &SlotStats) -> SlotStats {
    SlotStats {
        selected: sum.selected + more.selected,
        fallback: sum.fallback + more.fallback,
        migrated: sum.migrated + more.migrated,
    }
}

/// Empties `slot` of a sockets map; an empty slot (the socket closed first) is fine.
fn clear_socket_slot(sockets: &mut ReusePortSockArray<MapData>, slot: u32) -> Result<()> {
    match sockets.clear_index(&slot) {
        Ok(()) => Ok(()),
        Err(aya::maps::MapError::KeyNotFound) => Ok(()),
        Err(aya::maps::MapError::SyscallError(e))
            if e.io_error.raw_os_error() == Some(libc::ENOENT) =>
        {
            Ok(())
        }
        Err(e) => Err(e).with_context(|| format!("clearing slot {slot}")),
    }
}

fn take_map<M>(ebpf: &mut Ebpf, name: &str) -> Result<M>
where
    M: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    let map = ebpf
        .take_map(name)
        .with_context(|| format!("map {name} missing from the eBPF object"))?;
    M::try_from(map).with_context(|| format!("map {name} has an unexpected type"))
}

/// Kernels before 5.11 charge BPF maps to RLIMIT_MEMLOCK, whose default (8 MiB or less) is easily
/// exhausted. Later kernels use memory cgroups; there the limit is left alone, since workers
/// inherit it.
fn raise_memlock_limit() {
    if kernel_release().is_some_and(|version| version >= (5, 11)) {
        return;
    }
    let unlimited = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: plain syscall with a valid pointer. Failure is not an error here: map creation
    // then fails with its own, clearer message.
    unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &unlimited) };
}

/// What the program needs that a kernel of this version lacks, each as "no X before V", so
/// cluster-lb can say so in one line instead of failing in the verifier.
pub fn missing_features(release: (u32, u32)) -> Vec<&'static str> {
    const NEEDS: [((u32, u32), &str); 4] = [
        ((4, 19), "no sk_reuseport programs before 4.19"),
        ((5, 5), "no page-aligned (mmapable) BPF arrays before 5.5"),
        (
            (5, 12),
            "no BPF atomic fetch-add (exact round robin) before 5.12",
        ),
        (
            (5, 14),
            "no request migration (SELECT_OR_MIGRATE) before 5.14",
        ),
    ];
    NEEDS
        .iter()
        .filter(|(since, _)| release < *since)
        .map(|(_, what)| *what)
        .collect()
}

/// (major, minor) of the running kernel.
pub fn kernel_release() -> Option<(u32, u32)> {
    let uname = nix::sys::utsname::uname().ok()?;
    parse_release(uname.release().to_str()?)
}

fn parse_release(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.split(|c: char| !c.is_ascii_digit());
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The kernel-user contract without root: every map and program the user side opens by
    /// name (cluster-common's names) is in the committed object, so a renamed static fails
    /// here, not only in the root tests.
    #[test]
    fn the_committed_object_has_every_map_and_program_the_user_side_opens() {
        let object = aya_obj::Object::parse(PROGRAM_OBJECT).expect("the committed object parses");
        let maps = [
            cluster_common::MAP_SOCKETS,
            cluster_common::MAP_ACTIVE,
            cluster_common::MAP_CONFIG,
            cluster_common::MAP_STATS,
            cluster_common::MAP_TABLE,
            cluster_common::MAP_OPEN,
            cluster_common::MAP_SLOT_OF,
        ];
        for name in maps {
            assert!(
                object.maps.contains_key(name),
                "map {name} is not in the object"
            );
        }
        for name in [
            cluster_common::PROGRAM_NAME,
            cluster_common::COUNTER_PROGRAM,
        ] {
            assert!(
                object.programs.contains_key(name),
                "program {name} is not in the object"
            );
        }
        // And no other map (besides the loader's: .rodata, which holds GLOBAL_STRATEGY).
        let others: Vec<&String> = object
            .maps
            .keys()
            .filter(|k| !k.starts_with('.') && !maps.contains(&k.as_str()))
            .collect();
        assert!(
            others.is_empty(),
            "maps cluster-common does not name: {others:?}"
        );
    }

    #[test]
    fn the_program_table_gives_each_entry_its_ids_slot() {
        let ids = maglev::table(&[0, 1, 2], table_size(3));
        // Worker 1 has no ready process; worker 2's replacement is in slot 7.
        let table = slot_table(&ids, &[(4, 0), (7, 2)]);
        for (entry, id_plus_one) in table.slots.iter().zip(&ids) {
            let expected = match id_plus_one {
                1 => 5,
                3 => 8,
                _ => 0,
            };
            assert_eq!(*entry, expected);
        }
        assert!(table.slots.contains(&5) && table.slots.contains(&8));
        assert_eq!(*slot_table(&ids, &[]), SlotTable::EMPTY);
    }

    #[test]
    fn strategy_names_round_trip() {
        for name in Strategy::NAMES {
            assert_eq!(name.parse::<Strategy>().map(Strategy::name), Ok(name));
        }
        assert_eq!("shared".parse(), Ok(Strategy::Hash));
        assert!("fastest"
            .parse::<Strategy>()
            .unwrap_err()
            .contains("round-robin, hash, sticky, least-loaded, kernel"));
    }

    #[test]
    fn old_kernels_are_told_what_they_lack() {
        assert!(missing_features((6, 1)).is_empty());
        assert!(missing_features((5, 14)).is_empty());
        assert_eq!(
            missing_features((5, 10)),
            [
                "no BPF atomic fetch-add (exact round robin) before 5.12",
                "no request migration (SELECT_OR_MIGRATE) before 5.14"
            ]
        );
        assert_eq!(missing_features((4, 9)).len(), 4);
    }

    #[test]
    fn kernel_release_parses_distribution_suffixes() {
        assert_eq!(parse_release("6.18.44-fc-v657"), Some((6, 18)));
        assert_eq!(parse_release("6.1.0-28-amd64"), Some((6, 1)));
        assert_eq!(parse_release("5.10"), Some((5, 10)));
        assert_eq!(parse_release("garbage"), None);
    }
}
