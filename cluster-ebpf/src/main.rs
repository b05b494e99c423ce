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

use aya_ebpf::{
    bindings::{
        bpf_hdr_start_off::BPF_HDR_START_NET, sk_action::SK_PASS,
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB, BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG,
    },
    helpers::{bpf_get_prandom_u32, bpf_skb_load_bytes_relative, bpf_skc_to_tcp_sock},
    macros::{btf_tracepoint, map, sk_reuseport, sock_ops},
    maps::{Array, LruHashMap, PerCpuArray, ReusePortSockArray},
    programs::{BtfTracePointContext, SkReuseportContext, SockOpsContext},
};
use cluster_common::{
    ActiveSet, ConnKey, ConnSlot, SlotStats, SlotTable, CONFIG_ACTIVE_BUFFER, CONFIG_ENTRIES,
    CONFIG_MAP_FLAGS, CONFIG_RR_COUNTER, CONFIG_TABLE_BUFFER, CONNECTIONS_ENTRIES, MAX_SLOTS,
    MAX_TRIES, NO_SLOT_STATS, STATS_ENTRIES, STRATEGY_HASH, STRATEGY_LEAST_LOADED, STRATEGY_STICKY,
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
static CLB_CONNECTIONS: LruHashMap<ConnKey, ConnSlot> =
    LruHashMap::with_max_entries(CONNECTIONS_ENTRIES, 0);

#[map]
static CLB_OPEN: Array<u64> = Array::with_max_entries(MAX_SLOTS, 0);

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

/// The least loaded worker (see least_loaded_position); the connection is remembered for the
/// counter program.
#[inline(always)]
fn least_loaded(ctx: &SkReuseportContext) {
    let Some((set, count)) = active_set() else {
        return;
    };
    if let Some(slot) = select_from(ctx, set, count, least_loaded_position(set, count)) {
        remember_connection(ctx, slot);
    }
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
/// alive. The slot that took it, if any.
#[inline(always)]
fn select_from(ctx: &SkReuseportContext, set: &ActiveSet, count: u32, start: u32) -> Option<u32> {
    // `start < count <= MAX_SLOTS`, but the verifier does not follow a modulo, and LLVM drops a
    // mask it can prove redundant; black_box keeps the mask for the verifier.
    let slot = set.slots[(core::hint::black_box(start) & (MAX_SLOTS - 1)) as usize];
    if CLB_SOCKETS.select_reuseport(ctx, slot).is_ok() {
        count_selected(ctx, slot);
        return Some(slot);
    }
    count_fallback(slot);
    walk(ctx, set, count, start)
}

/// The chosen slot was empty: its worker died and the kernel removed the closed socket from the
/// array, but the primary has not yet taken the slot out of the active set. Walk on through the
/// active set so a live worker gets the connection; never strand it. The walk is bounded by
/// MAX_TRIES, not by the number of workers, so its cost stays flat. Inlined, as every function
/// here: an out-of-line function is a symbol whose mangled name hashes the crate's path, so the
/// object would differ by checkout and `build-ebpf --check` could not compare it.
#[inline(always)]
fn walk(ctx: &SkReuseportContext, set: &ActiveSet, count: u32, start: u32) -> Option<u32> {
    let mut tried: u32 = 1;
    while tried < count && tried < MAX_TRIES {
        let position = (start + tried) % count;
        let slot = set.slots[(core::hint::black_box(position) & (MAX_SLOTS - 1)) as usize];
        if CLB_SOCKETS.select_reuseport(ctx, slot).is_ok() {
            count_selected(ctx, slot);
            return Some(slot);
        }
        tried += 1;
    }
    // No active slot holds a live socket: let the kernel hash over whatever sockets the group
    // has, which is better than refusing the connection. Counted, and reported by the primary.
    count_fallback(NO_SLOT_STATS);
    None
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

/// Records where this connection went, for the counter program. A request moved off a
/// closing listener that was counted already moves its count along; only such a request looks
/// its entry up (a lookup of the LRU hash on every new connection was a third of its cost).
#[inline(always)]
fn remember_connection(ctx: &SkReuseportContext, slot: u32) {
    let Some(key) = connection_key(ctx) else {
        return;
    };
    let mut entry = ConnSlot { slot, counted: 0 };
    if ctx.migrating_sk().is_some() {
        // SAFETY: reading a value of the map, copied at once.
        if let Some(previous) = unsafe { CLB_CONNECTIONS.get(&key) }.copied() {
            if previous.counted != 0 && previous.slot != slot {
                add_open(previous.slot, u64::MAX);
                add_open(slot, 1);
                entry.counted = 1;
            }
        }
    }
    let _ = CLB_CONNECTIONS.insert(&key, &entry, 0);
}

/// The connection's client address (v4-mapped for IPv4) and ports: the address from the IP
/// header (one helper call), the ports from the TCP header, where the packet's data starts when
/// the kernel selects a listener (read in place, no helper call).
#[inline(always)]
fn connection_key(ctx: &SkReuseportContext) -> Option<ConnKey> {
    let (start, end) = (ctx.data(), ctx.data_end());
    if start + 4 > end {
        return None; // no packet (a request moved off a closing listener's accept queue)
    }
    // SAFETY: the four bytes are inside the packet, as checked above (and by the verifier).
    let ports = unsafe { *(start as *const [u8; 4]) };
    // Written field by field, never zeroed as a whole: LLVM turns zeroing the 16-byte address
    // into a call to memset, a subprogram of its own.
    let mut key = core::mem::MaybeUninit::<ConnKey>::uninit();
    let at = key.as_mut_ptr();
    // SAFETY: every write below is inside `key`, and each of its fields is written once
    // before it is read: the address by the helper (IPv6) or by hand and the helper (IPv4).
    unsafe {
        let client = core::ptr::addr_of_mut!((*at).client).cast::<u8>();
        if ctx.eth_protocol() == u32::from(0x86ddu16.to_be()) {
            load_network(ctx, 8, client, 16)?;
        } else {
            // ::ffff:a.b.c.d, in u16 stores (ConnKey is 2-aligned), volatile so that LLVM
            // does not merge the zeros back into a memset call.
            let halves = client.cast::<u16>();
            for i in 0..5 {
                core::ptr::write_volatile(halves.add(i), 0);
            }
            core::ptr::write_volatile(halves.add(5), 0xffff);
            load_network(ctx, 12, client.add(12), 4)?;
        }
        core::ptr::addr_of_mut!((*at).client_port).write(u16::from_be_bytes([ports[0], ports[1]]));
        core::ptr::addr_of_mut!((*at).server_port).write(u16::from_be_bytes([ports[2], ports[3]]));
        Some(key.assume_init())
    }
}

/// Copies `length` bytes from `offset` past the network header's start into `into`.
///
/// # Safety
/// `into` must have room for `length` bytes.
#[inline(always)]
unsafe fn load_network(
    ctx: &SkReuseportContext,
    offset: u32,
    into: *mut u8,
    length: u32,
) -> Option<()> {
    // SAFETY: the caller gives room for `length` bytes.
    let loaded = unsafe {
        bpf_skb_load_bytes_relative(
            ctx.md as *const core::ffi::c_void,
            offset,
            into.cast(),
            length,
            BPF_HDR_START_NET,
        )
    };
    (loaded == 0).then_some(())
}

// Byte offsets of the fields read from a TCP socket (cluster_common::sock_field), set by the
// loader from the running kernel's BTF before verification; constants to the verifier, which
// checks each read against the same BTF.
#[unsafe(no_mangle)]
static SOCK_FAMILY: u32 = 0;
#[unsafe(no_mangle)]
static SOCK_DADDR: u32 = 0;
#[unsafe(no_mangle)]
static SOCK_V6_DADDR: u32 = 0;
#[unsafe(no_mangle)]
static SOCK_DPORT: u32 = 0;
#[unsafe(no_mangle)]
static SOCK_SPORT: u32 = 0;

const TCP_ESTABLISHED: i32 = 1;
const TCP_SYN_RECV: i32 = 3;
const TCP_FIN_WAIT1: i32 = 4;
const TCP_CLOSE: i32 = 7;
const AF_INET6: u16 = 10;

/// A field of the socket at the byte offset held in `offset` (one of the SOCK_* globals).
///
/// # Safety
/// `sk` must be a TCP socket (bpf_skc_to_tcp_sock's) and `offset` a SOCK_* global whose field
/// is a `T`.
#[inline(always)]
unsafe fn sock_field<T: Copy>(sk: *const u8, offset: &u32) -> T {
    // SAFETY: as the caller promises; volatile, so that LLVM does not fold the default in.
    unsafe {
        let at = core::ptr::read_volatile(offset) as usize;
        core::ptr::read(sk.add(at).cast::<T>())
    }
}

/// The connection of a TCP socket, keyed as the sk_reuseport program keys it: the client's
/// address (IPv4 v4-mapped), its port, the server's port.
///
/// # Safety
/// `sk` must be a TCP socket (bpf_skc_to_tcp_sock's).
#[inline(always)]
unsafe fn sock_key(sk: *const u8) -> ConnKey {
    // Written in u16 halves, volatile, never zeroed as a whole (see connection_key: LLVM would
    // make that a call to memset).
    let mut key = core::mem::MaybeUninit::<ConnKey>::uninit();
    let at = key.as_mut_ptr();
    // SAFETY: every write is inside `key` and each field is written before assume_init; the
    // reads are the socket's fields, as the caller promises.
    unsafe {
        let halves = core::ptr::addr_of_mut!((*at).client).cast::<u16>();
        let put = |index: usize, word: u32| {
            core::ptr::write_volatile(halves.add(2 * index), word as u16);
            core::ptr::write_volatile(halves.add(2 * index + 1), (word >> 16) as u16);
        };
        if sock_field::<u16>(sk, &SOCK_FAMILY) == AF_INET6 {
            // Word by word, each at a constant offset (the verifier checks every read against
            // in6_addr's u32 array, and refuses a variable offset).
            let v6 = core::ptr::read_volatile(&SOCK_V6_DADDR) as usize;
            let word = |index: usize| core::ptr::read(sk.add(v6 + 4 * index).cast::<u32>());
            put(0, word(0));
            put(1, word(1));
            put(2, word(2));
            put(3, word(3));
        } else {
            // ::ffff:a.b.c.d (bytes 10 and 11 are 0xff; the words are little-endian).
            put(0, 0);
            put(1, 0);
            put(2, 0xffff_0000);
            put(3, sock_field::<u32>(sk, &SOCK_DADDR));
        }
        core::ptr::addr_of_mut!((*at).client_port)
            .write(u16::from_be(sock_field::<u16>(sk, &SOCK_DPORT)));
        core::ptr::addr_of_mut!((*at).server_port)
            .write(u16::from_be(sock_field::<u16>(sk, &SOCK_SPORT)));
        key.assume_init()
    }
}

/// Keeps CLB_OPEN: a connection the sk_reuseport program placed counts once established (so a
/// SYN that never completes is never counted) and stops counting when it closes. A BTF
/// tracepoint: it runs for every TCP state change on the host, so it leaves at once unless the
/// change is one it counts, and reads the socket in place instead of a formatted record.
#[btf_tracepoint(function = "inet_sock_set_state")]
pub fn count_connections(ctx: BtfTracePointContext) -> i32 {
    let (old, new): (i32, i32) = (ctx.arg(1), ctx.arg(2));
    let opening = old == TCP_SYN_RECV && new == TCP_ESTABLISHED;
    if !opening && new != TCP_CLOSE {
        return 0;
    }
    // The socket as a TCP socket (null for any other protocol): its BTF type covers the
    // inet_sock fields read, where `struct sock`, the tracepoint's type, ends before them.
    // SAFETY: a helper that checks the socket's type itself.
    let sk = unsafe { bpf_skc_to_tcp_sock(ctx.arg::<*mut core::ffi::c_void>(0)) } as *const u8;
    if sk.is_null() {
        return 0;
    }
    // SAFETY: `sk` is a TCP socket; each offset is its field's (see above).
    count(&unsafe { sock_key(sk) }, opening);
    0
}

/// The same count from a sock_ops program attached to the primary's cgroup, which holds every
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
    let key = sock_ops_key(&ctx);
    if count(&key, opening) && opening {
        let _ = ctx.set_cb_flags(BPF_SOCK_OPS_STATE_CB_FLAG as i32);
    } else if closing {
        let _ = ctx.set_cb_flags(0);
    }
    1
}

/// A sock_ops socket's connection, keyed as [`connection_key`] keys it.
#[inline(always)]
fn sock_ops_key(ctx: &SockOpsContext) -> ConnKey {
    // Written in u16 halves, volatile, never zeroed as a whole (see connection_key).
    let mut key = core::mem::MaybeUninit::<ConnKey>::uninit();
    let at = key.as_mut_ptr();
    // SAFETY: every write is inside `key`, and each field is written before assume_init.
    unsafe {
        let halves = core::ptr::addr_of_mut!((*at).client).cast::<u16>();
        let put = |index: usize, word: u32| {
            core::ptr::write_volatile(halves.add(2 * index), word as u16);
            core::ptr::write_volatile(halves.add(2 * index + 1), (word >> 16) as u16);
        };
        if ctx.family() == u32::from(AF_INET6) {
            let v6 = ctx.remote_ip6();
            put(0, v6[0]);
            put(1, v6[1]);
            put(2, v6[2]);
            put(3, v6[3]);
        } else {
            put(0, 0);
            put(1, 0);
            put(2, 0xffff_0000);
            put(3, ctx.remote_ip4());
        }
        // remote_port: the network-order port in the upper half; local_port: host order.
        core::ptr::addr_of_mut!((*at).client_port).write(u32::from_be(ctx.remote_port()) as u16);
        core::ptr::addr_of_mut!((*at).server_port).write(ctx.local_port() as u16);
        key.assume_init()
    }
}

/// Counts the connection `key` in its slot as it opens, or stops counting it as it closes;
/// whether the sk_reuseport program placed it (only those are counted).
#[inline(always)]
fn count(key: &ConnKey, opening: bool) -> bool {
    let Some(entry) = CLB_CONNECTIONS.get_ptr_mut(key) else {
        return false;
    };
    // SAFETY: the pointer comes from the map lookup and is used at once.
    let (slot, counted) = unsafe { ((*entry).slot, (*entry).counted) };
    if opening {
        if counted == 0 {
            // SAFETY: as above.
            unsafe { (*entry).counted = 1 };
            add_open(slot, 1);
        }
    } else {
        if counted != 0 {
            add_open(slot, u64::MAX);
        }
        let _ = CLB_CONNECTIONS.remove(key);
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
