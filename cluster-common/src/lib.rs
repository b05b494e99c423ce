//! What the kernel side (cluster-ebpf) and the user side (cluster-userspace) must agree on:
//! map names and sizes, the layout of every map value, and the strategy ids.
//!
//! Both sides compile this crate, so a change here changes both at once. Every value type is
//! `#[repr(C)]` with explicit padding so its layout is the same for bpfel and x86_64.
#![no_std]

/// Slots per listen group: the most workers (plus replacements starting during a reload) that one
/// reuseport group can hold. A power of two (the program masks indexes with it).
pub const MAX_SLOTS: u32 = 2048;

/// Most workers per cluster: half the slots, so every worker can have a replacement starting
/// beside it during a rolling reload.
pub const MAX_WORKERS: u32 = MAX_SLOTS / 2;

/// How many active slots the program tries after the one it chose, when that one's socket is
/// gone (its worker died and the primary has not yet updated the active set). A fixed bound, so
/// that a connection costs the same with 2 workers or 1024; when every try fails, the kernel's
/// own hash over the live sockets of the group decides, so no connection is stranded.
pub const MAX_TRIES: u32 = 32;

/// REUSEPORT_SOCKARRAY: slot -> the worker's listening socket.
pub const MAP_SOCKETS: &str = "CLB_SOCKETS";
/// ARRAY of two [`ActiveSet`]s: the primary fills the one not in use, then flips
/// [`CONFIG_ACTIVE_BUFFER`], so the program never reads a half-written set.
pub const MAP_ACTIVE: &str = "CLB_ACTIVE";
/// ARRAY of u32 settings, indexed by the `CONFIG_*` constants.
pub const MAP_CONFIG: &str = "CLB_CONFIG";
/// PERCPU_ARRAY of [`SlotStats`], indexed by slot; index [`NO_SLOT_STATS`] counts connections
/// that arrived while the active set was empty.
pub const MAP_STATS: &str = "CLB_STATS";
/// Name of the program inside the object.
pub const PROGRAM_NAME: &str = "select_worker";

/// Entries in [`MAP_STATS`].
pub const STATS_ENTRIES: u32 = MAX_SLOTS + 1;
/// The [`MAP_STATS`] entry for fallbacks that had no slot to blame.
pub const NO_SLOT_STATS: u32 = MAX_SLOTS;

/// The program's global (in .rodata, set by the loader before verification) that holds the
/// strategy, one of the `STRATEGY_*` ids: fixed for the life of a program instance, so the
/// verifier keeps only that strategy's code and no run looks it up.
pub const GLOBAL_STRATEGY: &str = "STRATEGY";

/// Index in [`MAP_CONFIG`]: which of the two [`MAP_ACTIVE`] buffers is current (0 or 1).
pub const CONFIG_ACTIVE_BUFFER: u32 = 0;
/// Index in [`MAP_CONFIG`]: which half of [`MAP_TABLE`] is current (bit 0) and how many of its
/// entries are in use (the rest, `size << 1`), in one u32 so that both flip at once.
pub const CONFIG_TABLE_BUFFER: u32 = 1;
/// Index in [`MAP_CONFIG`]: the round-robin position, advanced by the program with an atomic
/// fetch-add (the user side never writes it). Next to the two entries above, so a round-robin
/// run reads and writes one cache line for all three, as the C reference does.
pub const CONFIG_RR_COUNTER: u32 = 2;
/// Entries in [`MAP_CONFIG`].
pub const CONFIG_ENTRIES: u32 = 3;
/// BPF_F_MMAPABLE, which [`MAP_CONFIG`] is created with. Nothing maps it: the flag makes the
/// kernel put the values at the start of a page, so all entries share one cache line, where
/// a plain array's values start wherever its header ends (mid-line on 6.18).
pub const CONFIG_MAP_FLAGS: u32 = 1 << 10;

/// ARRAY of two [`SlotTable`]s: the consistent-hashing (Maglev) table, from a hash to the slot
/// of the ready process of the worker id that owns the entry. The primary writes the whole
/// table not in use (one system call), then flips [`CONFIG_TABLE_BUFFER`]. Slots, not ids, so
/// that a run needs one lookup; a reload rewrites the replaced worker's entries with its
/// replacement's slot, so the replacement takes its predecessor's clients as they are.
pub const MAP_TABLE: &str = "CLB_TABLE";
/// Entries of a [`SlotTable`]: the largest of [`TABLE_SIZES`].
pub const TABLE_SIZE: u32 = 65537;
/// How many entries of the table are used, by the number of workers (see [`table_size`]):
/// primes, each at least 64 entries per worker of its range, so every worker gets within about
/// 1.6% of its fair share. A small cluster's table is a few KiB that stay in the CPU's cache,
/// where a random entry of 128 KiB cost a cache and TLB miss per connection (about 140 ns on
/// the machine of issue 21).
pub const TABLE_SIZES: [u32; 4] = [1031, 4099, 16411, TABLE_SIZE];

/// The table size for `workers` worker ids: the smallest of [`TABLE_SIZES`] with 64 entries
/// per worker. Crossing 16, 64 or 256 workers changes the size, which moves most flows once
/// (any other change of the workers moves only the flows of the workers that came or went).
pub const fn table_size(workers: u32) -> u32 {
    let mut i = 0;
    while i < TABLE_SIZES.len() {
        if TABLE_SIZES[i] >= workers.saturating_mul(64) {
            return TABLE_SIZES[i];
        }
        i += 1;
    }
    TABLE_SIZE
}

/// Exact round robin over the active slots (one shared counter for all CPUs).
pub const STRATEGY_ROUND_ROBIN: u32 = 0;
/// The kernel's flow hash of the 4-tuple, through [`MAP_TABLE`] ("shared" strategy): every
/// packet of a flow to one worker, and few flows move when workers come and go.
pub const STRATEGY_HASH: u32 = 1;
/// The client's address (IPv4 or IPv6), through [`MAP_TABLE`]: every connection of a client to
/// one worker.
pub const STRATEGY_STICKY: u32 = 2;
/// The worker with the fewest open connections of two: the round-robin choice and one other
/// picked at random (power of two choices), so equal loads give exact round robin.
pub const STRATEGY_LEAST_LOADED: u32 = 3;

/// SK_STORAGE (BPF_F_CLONE) of [`SocketSlot`]: the user side gives each worker's listening
/// socket its slot; the kernel copies the value into every connection accepted from it, where
/// [`COUNTER_PROGRAM`] finds the slot to count the connection in. No lookup by address, no
/// entry to forget: the storage lives and dies with the socket.
pub const MAP_SLOT_OF: &str = "CLB_SLOT_OF";
/// ARRAY of u64 indexed by slot: open connections of that slot's worker (accepted or waiting
/// to be), kept by [`COUNTER_PROGRAM`]. Wraps below zero if a close outruns its open; read as 0.
pub const MAP_OPEN: &str = "CLB_OPEN";
/// The BTF tracepoint program (tp_btf/inet_sock_set_state) that keeps [`MAP_OPEN`].
pub const COUNTER_PROGRAM: &str = "count_connections";

/// The same counter as a sock_ops program, attached to the primary's cgroup: it runs only for
/// that cgroup's sockets. Preferred; [`COUNTER_PROGRAM`] is for hosts without cgroup v2.
pub const COUNTER_CGROUP_PROGRAM: &str = "count_in_cgroup";

/// The kernel function whose tracepoint the counter program is attached to.
pub const COUNTER_TRACEPOINT: &str = "inet_sock_set_state";

/// A socket's value in [`MAP_SLOT_OF`]: on a listener, its slot (`counted` 0); on a connection
/// accepted from it (a copy made by the kernel), the same slot and whether [`MAP_OPEN`] counts
/// it (from established until the worker closes it or it is gone).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SocketSlot {
    pub slot: u32,
    pub counted: u32,
}

/// The slots that may receive new connections, densely packed: `slots[..count]`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ActiveSet {
    pub count: u32,
    pub slots: [u32; MAX_SLOTS as usize],
}

impl ActiveSet {
    pub const EMPTY: ActiveSet = ActiveSet {
        count: 0,
        slots: [0; MAX_SLOTS as usize],
    };
}

/// One consistent-hashing table: per entry, `slot + 1` (0: no ready worker). u16, since slots
/// are below [`MAX_SLOTS`]: half the cache lines and pages a random entry falls in.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SlotTable {
    pub slots: [u16; TABLE_SIZE as usize],
    /// Makes the size a multiple of 4, so the layout has no implicit padding.
    pub _pad: u16,
}

impl SlotTable {
    pub const EMPTY: SlotTable = SlotTable {
        slots: [0; TABLE_SIZE as usize],
        _pad: 0,
    };
}

const _: () = assert!(MAX_SLOTS < u16::MAX as u32);

/// Per-CPU, per-slot counters kept by the program.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SlotStats {
    /// New connections (or migrated requests) this slot's socket was given.
    pub selected: u64,
    /// Times this slot was chosen but its socket was gone, or (for [`NO_SLOT_STATS`]) times no
    /// slot could take the connection and the kernel's own hash decided.
    pub fallback: u64,
    /// Requests moved to this slot from a closing listener (included in `selected`).
    pub migrated: u64,
}

#[cfg(feature = "user")]
mod pod {
    // aya::Pod asks for repr(C) types of integers only, with no padding and no invalid bit
    // pattern; each of these is one.
    // SAFETY: repr(C), u32 and [u32; N]: no padding.
    unsafe impl aya::Pod for super::ActiveSet {}
    // SAFETY: repr(C), [u16; N] and a u16 (alignment 2, size a multiple of it): no padding.
    unsafe impl aya::Pod for super::SlotTable {}
    // SAFETY: repr(C), three u64: no padding.
    unsafe impl aya::Pod for super::SlotStats {}
    // SAFETY: repr(C), two u32: no padding.
    unsafe impl aya::Pod for super::SocketSlot {}
}
