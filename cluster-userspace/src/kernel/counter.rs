//! The counter program of least-loaded: a tracepoint program on sock:inet_sock_set_state that
//! keeps each slot's open connections. Its record layout is read from the running kernel's
//! tracefs before attaching, so a kernel with another layout gets a clear refusal, not wrong
//! counts.

use std::fs;

use anyhow::{bail, Context, Result};
use aya::{programs::TracePoint, Ebpf};
use cluster_common::{set_state, TraceField, COUNTER_PROGRAM};

const FORMAT: &str = "events/sock/inet_sock_set_state/format";
const TRACEFS: [&str; 2] = ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"];

/// Loads the counter program and attaches it.
pub fn start(ebpf: &mut Ebpf) -> Result<()> {
    check_layout()?;
    let program: &mut TracePoint = ebpf
        .program_mut(COUNTER_PROGRAM)
        .context("the counter program is missing from the object")?
        .try_into()?;
    program
        .load()
        .context("verifying the counter program (needs CAP_BPF and CAP_PERFMON)")?;
    program
        .attach("sock", "inet_sock_set_state")
        .context("attaching to sock:inet_sock_set_state (needs CAP_PERFMON)")?;
    Ok(())
}

fn check_layout() -> Result<()> {
    let format = tracefs_format()?;
    match set_state::ALL
        .iter()
        .find(|f| !format.contains(&described(f)))
    {
        Some(field) => bail!(
            "sock:inet_sock_set_state has another layout on this kernel (no '{}')",
            described(field)
        ),
        None => Ok(()),
    }
}

/// How tracefs's format file describes a field the program reads.
fn described(field: &TraceField) -> String {
    format!("field:{};\toffset:{};", field.declaration, field.offset)
}

/// The tracepoint's format, mounting tracefs if nothing has.
fn tracefs_format() -> Result<String> {
    for root in TRACEFS {
        if let Ok(format) = fs::read_to_string(format!("{root}/{FORMAT}")) {
            return Ok(format);
        }
    }
    let mounted = nix::mount::mount(
        Some("tracefs"),
        TRACEFS[0],
        Some("tracefs"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    );
    if let Err(e) = mounted {
        bail!("no tracefs at {} ({e})", TRACEFS[0]);
    }
    fs::read_to_string(format!("{}/{FORMAT}", TRACEFS[0]))
        .context("reading the format of sock:inet_sock_set_state")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// As /sys/kernel/tracing/events/sock/inet_sock_set_state/format says it on 6.x.
    const FORMAT: &str = "\tfield:int oldstate;\toffset:16;\tsize:4;\tsigned:1;\n\tfield:int newstate;\toffset:20;\tsize:4;\tsigned:1;\n\tfield:__u16 sport;\toffset:24;\tsize:2;\tsigned:0;\n\tfield:__u16 dport;\toffset:26;\tsize:2;\tsigned:0;\n\tfield:__u16 family;\toffset:28;\tsize:2;\tsigned:0;\n\tfield:__u16 protocol;\toffset:30;\tsize:2;\tsigned:0;\n\tfield:__u8 daddr_v6[16];\toffset:56;\tsize:16;\tsigned:0;\n";

    #[test]
    fn the_fields_are_described_as_tracefs_writes_them() {
        for field in set_state::ALL {
            assert!(FORMAT.contains(&described(&field)), "{field:?}");
        }
    }
}
