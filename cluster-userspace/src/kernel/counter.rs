//! The counter program of least-loaded: a BTF tracepoint program on `inet_sock_set_state` that
//! keeps each slot's open connections. It reads the socket's fields at offsets found in the
//! running kernel's BTF (see sock_layout), set before the verifier sees it.

use anyhow::{Context, Result};
use aya::{programs::BtfTracePoint, Btf, Ebpf, EbpfLoader};
use cluster_common::{sock_field, COUNTER_PROGRAM, COUNTER_TRACEPOINT};

use super::sock_layout::{self, SockLayout};

/// What the counter program needs of the running kernel's BTF, read once: the socket's layout
/// (its offsets) and the BTF itself (its attach point).
pub struct KernelBtf {
    pub layout: SockLayout,
    btf: Btf,
}

impl KernelBtf {
    /// /sys/kernel/btf/vmlinux, or why the counter cannot run here.
    pub fn read() -> Result<KernelBtf> {
        let data = sock_layout::read_vmlinux()?;
        Ok(KernelBtf {
            layout: SockLayout::from_btf(&data)
                .context("finding the socket's fields in the kernel's BTF")?,
            btf: Btf::parse(&data, Default::default()).context("reading the kernel's BTF")?,
        })
    }
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
pub fn start(ebpf: &mut Ebpf, kernel: &KernelBtf) -> Result<()> {
    let program: &mut BtfTracePoint = ebpf
        .program_mut(COUNTER_PROGRAM)
        .context("the counter program is missing from the object")?
        .try_into()?;
    program
        .load(COUNTER_TRACEPOINT, &kernel.btf)
        .context("verifying the counter program (needs CAP_BPF and CAP_PERFMON)")?;
    program.attach().with_context(|| {
        format!("attaching to the {COUNTER_TRACEPOINT} tracepoint (needs CAP_PERFMON)")
    })?;
    Ok(())
}
