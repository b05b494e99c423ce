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

use aya_ebpf::{
    bindings::{bpf_hdr_start_off::BPF_HDR_START_NET, sk_action::SK_PASS},
    helpers::bpf_skb_load_bytes_relative,
    macros::{map, sk_reuseport},
    maps::{Array, PerCpuArray, ReusePortSockArray},
    programs::SkReuseportContext,
};
use aya_log_ebpf::warn;
use cluster_common::{
    ActiveSet, SlotStats, CONFIG_ACTIVE_BUFFER, CONFIG_ENTRIES, CONFIG_STRATEGY,
    CONFIG_TABLE_BUFFER, MAX_SLOTS, MAX_TRIES, MAX_WORKERS, NO_SLOT_STATS, STATS_ENTRIES,
    STRATEGY_HASH, STRATEGY_STICKY, TABLE_SIZE,
};

// The slot mask below relies on this.
const _: () = assert!(MAX_SLOTS.is_power_of_two());

#[map]
static CLB_SOCKETS: ReusePortSockArray = ReusePortSockArray::with_max_entries(MAX_SLOTS, 0);

#[map]
static CLB_ACTIVE: Array<ActiveSet> = Array::with_max_entries(2, 0);

#[map]
static CLB_CONFIG: Array<u32> = Array::with_max_entries(CONFIG_ENTRIES, 0);

#[map]
static CLB_RR: Array<u64> = Array::with_max_entries(1, 0);

#[map]
static CLB_STATS: PerCpuArray<SlotStats> = PerCpuArray::with_max_entries(STATS_ENTRIES, 0);

#[map]
static CLB_TABLE: Array<u32> = Array::with_max_entries(2 * TABLE_SIZE, 0);

#[map]
static CLB_ID_SLOT: Array<u32> = Array::with_max_entries(MAX_WORKERS, 0);

/// Attached as SELECT_OR_MIGRATE (kernel 5.14+): the kernel also calls us when a listener closes
/// with requests still queued, so they move to a live worker instead of being reset.
#[sk_reuseport(migrate)]
pub fn select_worker(ctx: SkReuseportContext) -> u32 {
    let migrating = ctx.migrating_sk().is_some();

    let Some(set) = current_active_set() else {
        return SK_PASS;
    };
    let count = if set.count > MAX_SLOTS {
        MAX_SLOTS
    } else {
        set.count
    };
    if count == 0 {
        count_fallback(NO_SLOT_STATS);
        return SK_PASS;
    }

    let key = match config(CONFIG_STRATEGY) {
        STRATEGY_HASH => Some(ctx.hash()),
        STRATEGY_STICKY => Some(client_address_hash(&ctx)),
        _ => None,
    };
    // Consistent hashing: the table names the worker, its ready process's slot takes it.
    if let Some(key) = key {
        if let Some(slot) = table_slot(key) {
            if CLB_SOCKETS.select_reuseport(&ctx, slot).is_ok() {
                count_selected(slot, migrating);
                return SK_PASS;
            }
            count_fallback(slot);
        }
    }
    let start = match key {
        Some(key) => key % count,
        None => next_round_robin() % count,
    };

    // The chosen slot may be empty: its worker died and the kernel removed the closed socket
    // from the array, but the primary has not yet taken the slot out of the active set. Walk on
    // through the active set so a live worker gets the connection; never strand it. The walk is
    // bounded by MAX_TRIES, not by the number of workers, so its cost stays flat.
    let mut tried: u32 = 0;
    while tried < count && tried < MAX_TRIES {
        let position = (start + tried) % count;
        // `position < count <= MAX_SLOTS`, but the verifier does not follow a modulo, and LLVM
        // drops a mask it can prove redundant; black_box keeps the mask for the verifier.
        let index = core::hint::black_box(position) & (MAX_SLOTS - 1);
        let slot = set.slots[index as usize];
        if CLB_SOCKETS.select_reuseport(&ctx, slot).is_ok() {
            count_selected(slot, migrating);
            return SK_PASS;
        }
        if tried == 0 {
            count_fallback(slot);
        }
        tried += 1;
    }

    // No active slot holds a live socket: let the kernel hash over whatever sockets the group
    // has, which is better than refusing the connection.
    count_fallback(NO_SLOT_STATS);
    warn!(&ctx, "cluster-lb: no live socket in {} active slots", count);
    SK_PASS
}

/// The slot of the worker the consistent-hashing table gives `key` to, if it has a ready one.
#[inline(always)]
fn table_slot(key: u32) -> Option<u32> {
    let half = config(CONFIG_TABLE_BUFFER) & 1;
    let id_plus_one = *CLB_TABLE.get(half * TABLE_SIZE + key % TABLE_SIZE)?;
    let id = id_plus_one.checked_sub(1)?;
    let slot_plus_one = *CLB_ID_SLOT.get(id)?;
    slot_plus_one.checked_sub(1)
}

/// A hash of the client's address (IPv4 or IPv6), read from the packet's network header: the
/// same for every connection of that client, whatever its source port.
#[inline(always)]
fn client_address_hash(ctx: &SkReuseportContext) -> u32 {
    let mut address = [0u32; 4];
    let (offset, length) = if ctx.eth_protocol() == u32::from(0x86ddu16.to_be()) {
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
    // A multiply-xorshift mix of the four words (an IPv4 address uses the first).
    let mut hash: u32 = 0x9e37_79b9;
    for word in address {
        hash = (hash ^ word).wrapping_mul(0x85eb_ca6b);
        hash ^= hash >> 13;
    }
    hash
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
/// whose result is used.
#[inline(always)]
fn next_round_robin() -> u32 {
    match CLB_RR.get_ptr_mut(0) {
        // SAFETY: the pointer comes from the map lookup and stays valid for this run.
        Some(counter) => unsafe {
            core::intrinsics::atomic_xadd::<u64, u64, { core::intrinsics::AtomicOrdering::SeqCst }>(
                counter, 1,
            ) as u32
        },
        None => 0,
    }
}

#[inline(always)]
fn count_selected(slot: u32, migrating: bool) {
    if let Some(stats) = CLB_STATS.get_ptr_mut(slot) {
        // SAFETY: per-CPU value, and a BPF program is not preempted on its CPU.
        unsafe {
            (*stats).selected += 1;
            if migrating {
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
