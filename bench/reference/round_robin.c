// The floor `cargo xtask bench --suite program` measures cluster-lb's programs against: the
// least an sk_reuseport round robin can do. One REUSEPORT_SOCKARRAY filled densely (socket i
// at index i), one array value holding the socket count next to an atomic counter, one
// bpf_sk_select_reuseport. No active set, no statistics, no fallback: it cannot skip a dead
// socket or drain one, which is what cluster-lb's programs pay for.
//
// Built by xtask with Debian's clang and libbpf-dev:
//   clang -O2 -g -target bpf -mcpu=v3 -c round_robin.c
// (-mcpu=v3 for the BPF_ATOMIC fetch-add, as cluster-ebpf is built.)
//
// reference_sticky, below, is the least a program that keeps each client on one socket does:
// read the client's address from the packet (one helper call; sk_reuseport's context has no
// address, and the packet data it gives starts after the IP header), hash it, select.
// reference_active_set and reference_table, further below, do in C what cluster-lb's round
// robin and hash keep beyond the least (a drainable list of sockets, a consistent-hashing
// table, a counter per socket), so the bench can tell the features' cost from cluster-lb's.
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#define MAX_SOCKETS 64

struct {
	__uint(type, BPF_MAP_TYPE_REUSEPORT_SOCKARRAY);
	__uint(max_entries, MAX_SOCKETS);
	__type(key, __u32);
	__type(value, __u32);
} REF_SOCKETS SEC(".maps");

// Written once by the loader (count), advanced by the program (next). One cache line.
struct state {
	__u64 next;
	__u32 count;
	__u32 pad;
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct state);
} REF_STATE SEC(".maps");

SEC("sk_reuseport")
int reference_round_robin(struct sk_reuseport_md *md)
{
	__u32 zero = 0;
	struct state *state = bpf_map_lookup_elem(&REF_STATE, &zero);
	if (!state || state->count == 0)
		return SK_PASS;
	__u32 index = (__u32)__sync_fetch_and_add(&state->next, 1) % state->count;
	bpf_sk_select_reuseport(md, &REF_SOCKETS, &index, 0);
	return SK_PASS;
}

SEC("sk_reuseport")
int reference_sticky(struct sk_reuseport_md *md)
{
	__u32 zero = 0;
	__u32 address[4] = {};
	long loaded;
	struct state *state = bpf_map_lookup_elem(&REF_STATE, &zero);
	if (!state || state->count == 0)
		return SK_PASS;
	if (md->eth_protocol == bpf_htons(0x86DD))
		loaded = bpf_skb_load_bytes_relative(md, 8, address, 16, BPF_HDR_START_NET);
	else
		loaded = bpf_skb_load_bytes_relative(md, 12, address, 4, BPF_HDR_START_NET);
	if (loaded)
		return SK_PASS;
	__u32 index = ((address[0] ^ address[1] ^ address[2] ^ address[3]) * 0x9e3779b1u) %
		      state->count;
	bpf_sk_select_reuseport(md, &REF_SOCKETS, &index, 0);
	return SK_PASS;
}

// reference_active_set is round robin with what cluster-lb's round robin keeps besides: the
// rotation goes over a list of the sockets that may receive connections (so that one can be
// drained or not yet ready), double-buffered (a global says which list is current), and each
// selection is counted per socket and CPU (what `status` shows). The same maps and accesses as
// cluster-lb's program; no walk past a dead socket, which runs only when one is found dead.
struct active {
	__u32 count;
	__u32 slots[MAX_SOCKETS];
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 2);
	__uint(map_flags, BPF_F_MMAPABLE);
	__type(key, __u32);
	__type(value, struct active);
} REF_ACTIVE SEC(".maps");

struct counts {
	__u64 selected;
	__u64 fallback;
	__u64 migrated;
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, MAX_SOCKETS);
	__type(key, __u32);
	__type(value, struct counts);
} REF_COUNTS SEC(".maps");

// Gives the connection to socket `slot` and counts it there, as cluster-lb's count_selected.
static __always_inline void select_and_count(struct sk_reuseport_md *md, __u32 slot)
{
	if (bpf_sk_select_reuseport(md, &REF_SOCKETS, &slot, 0) == 0) {
		struct counts *counts = bpf_map_lookup_elem(&REF_COUNTS, &slot);
		if (counts) {
			counts->selected++;
			if (md->migrating_sk)
				counts->migrated++;
		}
	}
}

// Which REF_ACTIVE list is current (0 here: the loader never flips it) and the rotation.
__u32 ref_buffer SEC(".data") = 0;
__u32 ref_next = 0;

SEC("sk_reuseport")
int reference_active_set(struct sk_reuseport_md *md)
{
	__u32 buffer = *(volatile __u32 *)&ref_buffer & 1;
	struct active *set = bpf_map_lookup_elem(&REF_ACTIVE, &buffer);
	if (!set || set->count == 0)
		return SK_PASS;
	__u32 count = set->count < MAX_SOCKETS ? set->count : MAX_SOCKETS;
	__u32 position = (__u32)__sync_fetch_and_add(&ref_next, 1) % count;
	// position < count <= MAX_SOCKETS, but the verifier does not follow a modulo and clang
	// drops a mask it proves redundant: the empty asm hides the value from clang, as
	// cluster-lb's program does with black_box.
	asm volatile("" : "+r"(position));
	__u32 slot = set->slots[position & (MAX_SOCKETS - 1)];
	select_and_count(md, slot);
	return SK_PASS;
}

// reference_table is what cluster-lb's hash (consistent hashing) does, in C: the kernel's flow
// hash picks an entry of a double-buffered table that gives each entry a socket (slot + 1, as
// u16; a global says which half is current and how many entries are in use), the socket is
// selected and the selection counted per socket and CPU. The table has cluster-lb's size
// (65537 entries, of which 1031 are used with a few workers), so its memory is the same.
#define TABLE_SIZE 65537
#define TABLE_USED 1031

struct table {
	__u16 slots[TABLE_SIZE];
	__u16 pad;
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 2);
	__type(key, __u32);
	__type(value, struct table);
} REF_TABLE SEC(".maps");

// Which REF_TABLE half is current (bit 0) and how many entries it uses (the rest).
__u32 ref_table_half SEC(".data") = TABLE_USED << 1;

SEC("sk_reuseport")
int reference_table(struct sk_reuseport_md *md)
{
	__u32 current = *(volatile __u32 *)&ref_table_half;
	__u32 size = current >> 1;
	__u32 half = current & 1;
	if (size == 0)
		return SK_PASS;
	struct table *table = bpf_map_lookup_elem(&REF_TABLE, &half);
	if (!table)
		return SK_PASS;
	__u32 index = md->hash % size;
	// As in reference_active_set: keep the bounds check that clang would drop.
	asm volatile("" : "+r"(index));
	if (index >= TABLE_SIZE)
		return SK_PASS;
	__u32 slot = table->slots[index];
	if (slot == 0)
		return SK_PASS;
	slot -= 1;
	select_and_count(md, slot);
	return SK_PASS;
}

char LICENSE[] SEC("license") = "Dual MIT/GPL";
