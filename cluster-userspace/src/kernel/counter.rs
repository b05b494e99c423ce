//! The counter program of least-loaded: a BTF tracepoint program on `inet_sock_set_state` that
//! keeps each slot's open connections. It reads the socket's fields at offsets found in the
//! running kernel's BTF (see sock_layout), set before the verifier sees it.

use anyhow::{Context, Result};
use aya::{programs::BtfTracePoint, Btf, Ebpf, EbpfLoader};
use cluster_common::{sock_field, COUNTER_PROGRAM, COUNTER_TRACEPOINT};

use super::sock_layout::SockLayout;

/// The layout the counter program needs, or why it cannot run here.
pub fn layout() -> Result<SockLayout> {
    SockLayout::of_running_kernel()
}

/// Gives the counter program `layout`'s offsets (constants to the verifier).
pub fn set_layout<'a>(loader: &mut EbpfLoader<'a>, layout: &'a SockLayout) {
    let fields = [
        (sock_field::FAMILY, &layout.family),
        (sock_field::DADDR, &layout.daddr),
        (sock_field::V6_DADDR, &layout.v6_daddr),
        (sock_field::DPORT, &layout.dport),
        (sock_field::SPORT, &layout.sport),
    ];
    for (name, offset) in fields {
        loader.override_global(name, offset, true);
    }
}

/// Loads the counter program and attaches it.
pub fn start(ebpf: &mut Ebpf) -> Result<()> {
    let btf = Btf::from_sys_fs().context("reading the kernel's BTF")?;
    let program: &mut BtfTracePoint = ebpf
        .program_mut(COUNTER_PROGRAM)
        .context("the counter program is missing from the object")?
        .try_into()?;
    program
        .load(COUNTER_TRACEPOINT, &btf)
        .context("verifying the counter program (needs CAP_BPF and CAP_PERFMON)")?;
    program.attach().with_context(|| {
        format!("attaching to the {COUNTER_TRACEPOINT} tracepoint (needs CAP_PERFMON)")
    })?;
    Ok(())
}
