//! The sk_reuseport program: for each new connection to a listen group (and for each request
//! that must move off a closing listener), pick the worker socket that receives it.
//!
//! The primary describes the group in maps (see cluster-common): which slot holds which worker's
//! socket, which slots are active (ready, not draining), and the strategy. This program only
//! reads those and keeps counters; all policy lives in user space.
#![no_std]
#![no_main]
#![feature(core_intrinsics)]
#![allow(internal_features)]
// The maps' keys are passed as the references the helpers take: passed by value (what this lint
// asks), each call copied its key to a stack slot of its own, 800 more bytes of program.
#![allow(clippy::needless_borrows_for_generic_args)]

use core::ffi::c_void;

use aya_ebpf::{
    bindings::{
        bpf_hdr_start_off::BPF_HDR_START_NET, bpf_map_type::BPF_MAP_TYPE_SK_STORAGE,
        sk_action::SK_PASS, BPF_F_CLONE, BPF_F_NO_PREALLOC, BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB,
        BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG,
    },
    helpers::{bpf_get_prandom_u32, bpf_sk_storage_get, bpf_skb_load_bytes_relative},
    macros::{btf_tracepoint, map, sk_reuseport, sock_ops},
    maps::{Array, PerCpuArray, ReusePortSockArray},
    programs::{BtfTracePointContext, SkReuseportContext, SockOpsContext},
};
use cluster_common::{
    ActiveSet, SlotStats, SlotTable, SocketSlot, CONFIG_ACTIVE_BUFFER, CONFIG_ENTRIES,
    CONFIG_MAP_FLAGS, CONFIG_RR_COUNTER, CONFIG_TABLE_BUFFER, MAX_SLOTS, MAX_TRIES, NO_SLOT_STATS,
    STATS_ENTRIES, STRATEGY_HASH, STRATEGY_LEAST_LOADED, STRATEGY_STICKY,
};

// The slot mask below relies on this.
const _: () = assert!(MAX_SLOTS.is_power_of_two());

#[map]
static CLB_SOCKETS: ReusePortSockArray = ReusePortSockArray::with_max_entries(MAX_SLOTS, 0);

#[map]
static CLB_ACTIVE: Array<ActiveSet> = Array::with_max_entries(2, 0);

#[map]
static CLB_CONFIG: Array<u32> = Array::with_max_entries(CONFIG_ENTRIES, CONFIG_MAP_FLAGS);

#[map]
static CLB_STATS: PerCpuArray<SlotStats> = PerCpuArray::with_max_entries(STATS_ENTRIES, 0);

#[map]
static CLB_TABLE: Array<SlotTable> = Array::with_max_entries(2, 0);

#[map]
static CLB_OPEN: Array<u64> = Array::with_max_entries(MAX_SLOTS, 0);

/// Socket storage: a listener's slot, copied by the kernel into each connection accepted from
/// it (BPF_F_CLONE; BPF_F_NO_PREALLOC is required of this map type). A map the kernel creates
/// only from BTF (its key and value types), so it is declared as libbpf's `.maps` section has
/// it: each attribute a pointer whose pointee's type carries the value, read by the loader, never
/// dereferenced. aya-ebpf's own SkStorage has no way to ask for BPF_F_CLONE.
#[repr(C)]
pub struct SocketStorage {
    r#type: *const [i32; BPF_MAP_TYPE_SK_STORAGE as usize],
    key: *const i32,
    value: *const SocketSlot,
    max_entries: *const [i32; 0],
    map_flags: *const [i32; (BPF_F_NO_PREALLOC | BPF_F_CLONE) as usize],
}

// SAFETY: the pointers are placeholders for the loader (see SocketStorage); nothing reads them.
unsafe impl Sync for SocketStorage {}

#[unsafe(link_section = ".maps")]
#[unsafe(export_name = "CLB_SLOT_OF")]
static CLB_SLOT_OF: SocketStorage = SocketStorage {
    r#type: core::ptr::null(),
    key: core::ptr::null(),
    value: core::ptr::null(),
    max_entries: core::ptr::null(),
    map_flags: core::ptr::null(),
};

/// The strategy this instance runs, one of cluster-common's `STRATEGY_*` ids, set by the
/// loader before the program is verified (aya's `override_global`). It lives in .rodata, which
/// the loader freezes, so the verifier knows its value: it walks, and the JIT emits, only the
/// chosen strategy's code, and no run reads a map to learn it. A change of strategy is a new
/// instance.
#[unsafe(no_mangle)]
static STRATEGY: u32 = 0;

/// Attached as SELECT_OR_MIGRATE (kernel 5.14+): the kernel also calls us when a listener closes
/// with requests still queued, so they move to a live worker instead of being reset.
#[sk_reuseport(migrate)]
pub fn select_worker(ctx: SkReuseportContext) -> u32 {
    // SAFETY: a plain read of a static; volatile, so that LLVM does not fold the default in.
    let strategy = unsafe { core::ptr::read_volatile(&STRATEGY) };
    match strategy {
        STRATEGY_HASH => by_table(&ctx, ctx.hash()),
        STRATEGY_STICKY => by_table(&ctx, client_address_hash(&ctx)),
        STRATEGY_LEAST_LOADED => least_loaded(&ctx),
        _ => round_robin(&ctx),
    }
    SK_PASS
}

/// The next active slot in the shared rotation.
#[inline(always)]
fn round_robin(ctx: &SkReuseportContext) {
    let Some((set, count)) = active_set() else {
        return;
    };
    select_from(ctx, set, count, next_round_robin() % count);
}

/// Consistent hashing: the table names the worker, its ready process's slot takes it; without
/// one (no table yet, or that socket is gone), the active set by the same key.
#[inline(always)]
fn by_table(ctx: &SkReuseportContext, key: u32) {
    if let Some(slot) = table_slot(key) {
        if CLB_SOCKETS.select_reuseport(ctx, slot).is_ok() {
            count_selected(ctx, slot);
            return;
        }
        count_fallback(slot);
    }
    let Some((set, count)) = active_set() else {
        return;
    };
    select_from(ctx, set, count, key % count);
}

/// The least loaded worker (see least_loaded_position). Nothing is recorded here: the
/// connection carries its listener's slot (CLB_SLOT_OF) to the counter program.
#[inline(always)]
fn least_loaded(ctx: &SkReuseportContext) {
    let Some((set, count)) = active_set() else {
        return;
    };
    select_from(ctx, set, count, least_loaded_position(set, count));
}

/// The current active set and its count (at most MAX_SLOTS), or None when no slot may receive
/// connections, which is counted: the kernel's hash then decides.
#[inline(always)]
fn active_set() -> Option<(&'static ActiveSet, u32)> {
    let set = current_active_set()?;
    let count = set.count;
    if count == 0 {
        count_fallback(NO_SLOT_STATS);
        return None;
    }
    Some((set, count.min(MAX_SLOTS)))
}

/// Gives the connection to the active slot at `start`, or to the next one whose socket is
/// alive.
#[inline(always)]
fn select_from(ctx: &SkReuseportContext, set: &ActiveSet, count: u32, start: u32) {
    // `start < count <= MAX_SLOTS`, but the verifier does not follow a modulo, and LLVM drops a
    // mask it can prove redundant; black_box keeps the mask for the verifier.
    let slot = set.slots[(core::hint::black_box(start) & (MAX_SLOTS - 1)) as usize];
    if CLB_SOCKETS.select_reuseport(ctx, slot).is_ok() {
        count_selected(ctx, slot);
        return;
    }
    count_fallback(slot);
    walk(ctx, set, count, start);
}

/// The chosen slot was empty: its worker died and the kernel removed the closed socket from the
/// array, but the primary has not yet taken the slot out of the active set. Walk on through the
/// active set so a live worker gets the connection; never strand it. The walk is bounded by
/// MAX_TRIES, not by the number of workers, so its cost stays flat. Inlined, as every function
/// here: an out-of-line function is a symbol whose mangled name hashes the crate's path, so the
/// object would differ by checkout and `build-ebpf --check` could not compare it.
#[inline(always)]
fn walk(ctx: &SkReuseportContext, set: &ActiveSet, count: u32, start: u32) {
    let mut tried: u32 = 1;
    while tried < count && tried < MAX_TRIES {
        let position = (start + tried) % count;
        let slot = set.slots[(core::hint::black_box(position) & (MAX_SLOTS - 1)) as usize];
        if CLB_SOCKETS.select_reuseport(ctx, slot).is_ok() {
            count_selected(ctx, slot);
            return;
        }
        tried += 1;
    }
    // No active slot holds a live socket: let the kernel hash over whatever sockets the group
    // has, which is better than refusing the connection. Counted, and reported by the primary.
    count_fallback(NO_SLOT_STATS);
}

/// The slot of the worker the consistent-hashing table gives `key` to, if it has a ready one.
#[inline(always)]
fn table_slot(key: u32) -> Option<u32> {
    let current = config(CONFIG_TABLE_BUFFER);
    let size = current >> 1;
    if size == 0 {
        return None;
    }
    let table = CLB_TABLE.get(current & 1)?;
    // The verifier does not follow a modulo: the bounds check of `get` keeps the index inside
    // the table for it (black_box stops LLVM from dropping the check once it proves it).
    let index = core::hint::black_box(key % size) as usize;
    let slot_plus_one = u32::from(*table.slots.get(index)?);
    slot_plus_one.checked_sub(1)
}

/// A hash of the client's address (IPv4 or IPv6), read from the packet's network header: the
/// same for every connection of that client, whatever its source port.
#[inline(always)]
fn client_address_hash(ctx: &SkReuseportContext) -> u32 {
    // The helper fills the buffer or fails, so it starts uninitialized: zeroing 16 bytes was a
    // call to memset on every run. An IPv4 address is hashed as the first of four words.
    let mut address = core::mem::MaybeUninit::<[u32; 4]>::uninit();
    let v6 = ctx.eth_protocol() == u32::from(0x86ddu16.to_be());
    let (offset, length) = if v6 {
        (8, 16) // IPv6 source address
    } else {
        (12, 4) // IPv4 source address
    };
    // SAFETY: the helper copies at most `length` bytes into `address`, which holds 16.
    let loaded = unsafe {
        bpf_skb_load_bytes_relative(
            ctx.md as *const core::ffi::c_void,
            offset,
            address.as_mut_ptr().cast(),
            length,
            BPF_HDR_START_NET,
        )
    };
    if loaded != 0 {
        return ctx.hash();
    }
    let address = address.as_ptr().cast::<u32>();
    // SAFETY: the helper succeeded, so the first `length` bytes are written: one word for
    // IPv4, four for IPv6.
    let words = unsafe {
        if v6 {
            [*address, *address.add(1), *address.add(2), *address.add(3)]
        } else {
            [*address, 0, 0, 0]
        }
    };
    // A multiply-xorshift mix of the four words.
    let mut hash: u32 = 0x9e37_79b9;
    for word in words {
        hash = (hash ^ word).wrapping_mul(0x85eb_ca6b);
        hash ^= hash >> 13;
    }
    hash
}

/// Up to this many workers, least-loaded compares every one; above, two choices.
const FULL_SCAN: u32 = 8;

/// The position in the active set of the least loaded worker. Ties go to the round-robin
/// choice (then to the workers after it), so an idle cluster gets exact round robin. Up to
/// FULL_SCAN workers every one is compared: with few connections per worker the counts are
/// small and often tied, and two random choices then mostly fall back to round robin, blocked
/// worker or not. Above, the round-robin choice and one picked at random ("power of two
/// choices"), which keeps the cost flat however many workers there are.
#[inline(always)]
fn least_loaded_position(set: &ActiveSet, count: u32) -> u32 {
    let first = next_round_robin() % count;
    if count < 2 {
        return first;
    }
    let load = |position: u32| {
        let index = core::hint::black_box(position) & (MAX_SLOTS - 1);
        open_connections(set.slots[index as usize])
    };
    if count <= FULL_SCAN {
        let (mut best, mut best_load) = (first, load(first));
        for step in 1..FULL_SCAN {
            if step >= count {
                break;
            }
            let position = (first + step) % count;
            let here = load(position);
            if here < best_load {
                (best, best_load) = (position, here);
            }
        }
        return best;
    }
    // SAFETY: a helper without arguments.
    let other = (first + 1 + unsafe { bpf_get_prandom_u32() } % (count - 1)) % count;
    if load(other) < load(first) {
        other
    } else {
        first
    }
}

/// Open connections of a slot's worker; a count that wrapped below zero reads as 0.
#[inline(always)]
fn open_connections(slot: u32) -> u64 {
    let open = CLB_OPEN.get(slot).copied().unwrap_or(0);
    if open > u64::MAX / 2 {
        0
    } else {
        open
    }
}

/// Adds `delta` (1, or u64::MAX for -1) to a slot's open connections, from any CPU.
#[inline(always)]
fn add_open(slot: u32, delta: u64) {
    if let Some(open) = CLB_OPEN.get_ptr_mut(slot) {
        // SAFETY: the pointer comes from the map lookup; BPF_ATOMIC add (kernel 5.12+).
        unsafe {
            core::intrinsics::atomic_xadd::<u64, u64, { core::intrinsics::AtomicOrdering::SeqCst }>(
                open, delta,
            );
        }
    }
}

const TCP_ESTABLISHED: i32 = 1;
const TCP_SYN_RECV: i32 = 3;
const TCP_FIN_WAIT1: i32 = 4;
const TCP_CLOSE: i32 = 7;

/// Keeps CLB_OPEN from a BTF tracepoint, where there is no cgroup v2 for count_in_cgroup: it
/// runs for every TCP state change on the host, so it leaves at once unless the change is one
/// it counts, and then unless the socket is one of the cluster's (it has a slot).
#[btf_tracepoint(function = "inet_sock_set_state")]
pub fn count_connections(ctx: BtfTracePointContext) -> i32 {
    let (old, new): (i32, i32) = (ctx.arg(1), ctx.arg(2));
    let opening = old == TCP_SYN_RECV && new == TCP_ESTABLISHED;
    if opening || new == TCP_FIN_WAIT1 || new == TCP_CLOSE {
        count(ctx.arg::<*mut c_void>(0), opening);
    }
    0
}

/// Keeps CLB_OPEN from a sock_ops program attached to the primary's cgroup, which holds every
/// listener the primary creates (an accepted socket belongs to its listener's cgroup): it runs
/// only for the sockets of that cgroup, never for another service's. It asks for state changes
/// only on the connections it counts, and only until it stops counting one: when the worker
/// closes it (FIN_WAIT1: done with it) or it is gone (CLOSE, after the client closed first,
/// which still leaves the worker answering in CLOSE_WAIT).
#[sock_ops]
pub fn count_in_cgroup(ctx: SockOpsContext) -> u32 {
    let op = ctx.op();
    let opening = op == BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB;
    // args: the old state, the new state.
    let closing = op == BPF_SOCK_OPS_STATE_CB
        && (ctx.arg(1) == TCP_FIN_WAIT1 as u32 || ctx.arg(1) == TCP_CLOSE as u32);
    if !opening && !closing {
        return 1;
    }
    // SAFETY: a field of the context the kernel gives this program (null unless a full socket).
    let sk = unsafe { (*ctx.ops).__bindgen_anon_2.sk }.cast::<c_void>();
    if sk.is_null() {
        return 1;
    }
    if count(sk, opening) && opening {
        let _ = ctx.set_cb_flags(BPF_SOCK_OPS_STATE_CB_FLAG as i32);
    } else if closing {
        let _ = ctx.set_cb_flags(0);
    }
    1
}

/// Counts a connection of the cluster in its slot as it opens, or stops counting it as it
/// closes, each once; whether `sk` is one (has a slot: a listener's, or a copy of one).
#[inline(always)]
fn count(sk: *mut c_void, opening: bool) -> bool {
    // SAFETY: the helper checks `sk` itself; the map is this program's socket storage.
    let storage = unsafe {
        bpf_sk_storage_get(
            core::ptr::addr_of!(CLB_SLOT_OF).cast_mut().cast(),
            sk,
            core::ptr::null_mut(),
            0,
        )
    }
    .cast::<SocketSlot>();
    if storage.is_null() {
        return false;
    }
    // SAFETY: the storage of this socket, which the kernel keeps while the program runs; a
    // socket's state changes are serialized by its lock, so its value has one writer at a time.
    unsafe {
        let counted = (*storage).counted != 0;
        if opening && !counted {
            (*storage).counted = 1;
            add_open((*storage).slot, 1);
        } else if !opening && counted {
            (*storage).counted = 0;
            add_open((*storage).slot, u64::MAX);
        }
    }
    true
}

#[inline(always)]
fn config(index: u32) -> u32 {
    CLB_CONFIG.get(index).copied().unwrap_or(0)
}

#[inline(always)]
fn current_active_set() -> Option<&'static ActiveSet> {
    CLB_ACTIVE.get(config(CONFIG_ACTIVE_BUFFER) & 1)
}

/// One shared counter for all CPUs, so the rotation is exact whichever CPU runs us. The BPF
/// target has no compare-and-swap, so this is the BPF_ATOMIC fetch-add instruction (needs
/// `-C target-cpu=v3`, kernel 5.12+); SeqCst because LLVM 20+ miscompiles a Relaxed fetch-add
/// whose result is used. 32 bits, as the position always was: it wraps after 2^32 connections.
#[inline(always)]
fn next_round_robin() -> u32 {
    match CLB_CONFIG.get_ptr_mut(CONFIG_RR_COUNTER) {
        // SAFETY: the pointer comes from the map lookup and stays valid for this run.
        Some(counter) => unsafe {
            core::intrinsics::atomic_xadd::<u32, u32, { core::intrinsics::AtomicOrdering::SeqCst }>(
                counter, 1,
            )
        },
        None => 0,
    }
}

#[inline(always)]
fn count_selected(ctx: &SkReuseportContext, slot: u32) {
    if let Some(stats) = CLB_STATS.get_ptr_mut(slot) {
        // SAFETY: per-CPU value, and a BPF program is not preempted on its CPU.
        unsafe {
            (*stats).selected += 1;
            if ctx.migrating_sk().is_some() {
                (*stats).migrated += 1;
            }
        }
    }
}

#[inline(always)]
fn count_fallback(slot: u32) {
    if let Some(stats) = CLB_STATS.get_ptr_mut(slot) {
        // SAFETY: as in count_selected.
        unsafe { (*stats).fallback += 1 }
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
