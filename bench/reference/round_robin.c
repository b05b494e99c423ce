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

char LICENSE[] SEC("license") = "Dual MIT/GPL";
