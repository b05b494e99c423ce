//! The counter program of least-loaded, which keeps each slot's open connections.
//!
//! Preferably a sock_ops program on the primary's own cgroup (v2): every listener the primary
//! creates belongs to that cgroup, and so does every connection accepted from one, so it runs
//! only for the cluster's sockets (and those of other processes in the same cgroup: under a
//! systemd unit or in a container, the cluster's own). Where there is no cgroup v2 to attach
//! to, a BTF tracepoint on `inet_sock_set_state`, which runs for every TCP state change on the
//! host. Either finds a connection's slot in its socket storage (CLB_SLOT_OF), which the kernel
//! copied from the worker's listener.

use std::{
    fs::File,
    path::{Path, PathBuf},
    sync::Once,
};

use anyhow::{bail, Context, Result};
use aya::{
    programs::{BtfTracePoint, CgroupAttachMode, SockOps},
    Btf, Ebpf,
};
use cluster_common::{COUNTER_CGROUP_PROGRAM, COUNTER_PROGRAM, COUNTER_TRACEPOINT};

/// Where the counter program runs.
pub enum Hook {
    /// A sock_ops program on this cgroup (its directory, open, and its path for the log).
    Cgroup(File, PathBuf),
    /// The BTF tracepoint, with the kernel's BTF (its attach point).
    Tracepoint(Btf),
}

impl Hook {
    /// The cgroup this process is in, or else the tracepoint (with why not the cgroup, logged
    /// once), or why neither can run here.
    pub fn find() -> Result<Hook> {
        match own_cgroup() {
            Ok((dir, path)) => {
                if path == Path::new("/") {
                    WARN_ROOT.call_once(|| {
                        log::warn!(
                            "least-loaded counts connections in the cgroup cluster-lb runs in, which is the root cgroup here: every TCP connection on this host runs its counter a few times (a few instructions each); run cluster-lb in a cgroup of its own (a systemd unit, a container, systemd-run --scope) so that other services pay nothing"
                        )
                    });
                }
                Ok(Hook::Cgroup(dir, path))
            }
            Err(why) => {
                let btf = Btf::from_sys_fs().context(
                    "reading the kernel's BTF (/sys/kernel/btf/vmlinux, CONFIG_DEBUG_INFO_BTF)",
                )?;
                WARN_TRACEPOINT.call_once(|| {
                    log::warn!(
                        "least-loaded counts connections with a tracepoint that every TCP socket on this host runs, since {why:#}"
                    )
                });
                Ok(Hook::Tracepoint(btf))
            }
        }
    }

    /// Loads the counter program and attaches it.
    pub fn start(&self, ebpf: &mut Ebpf) -> Result<()> {
        match self {
            Hook::Cgroup(dir, path) => {
                let program: &mut SockOps = ebpf
                    .program_mut(COUNTER_CGROUP_PROGRAM)
                    .context("the cgroup counter program is missing from the object")?
                    .try_into()?;
                program
                    .load()
                    .context("verifying the cgroup counter program (needs CAP_BPF)")?;
                // A BPF link (aya makes one on 5.7+, and cluster-lb's programs need 5.14): links
                // on a cgroup always sit beside whatever else is attached there (other groups'
                // instances included), and the kernel refuses a link with the ALLOW_MULTI flag.
                program
                    .attach(dir, CgroupAttachMode::Single)
                    .with_context(|| {
                        format!(
                            "attaching to cgroup {} (needs CAP_NET_ADMIN)",
                            path.display()
                        )
                    })?;
            }
            Hook::Tracepoint(btf) => {
                let program: &mut BtfTracePoint = ebpf
                    .program_mut(COUNTER_PROGRAM)
                    .context("the counter program is missing from the object")?
                    .try_into()?;
                program
                    .load(COUNTER_TRACEPOINT, btf)
                    .context("verifying the counter program (needs CAP_BPF and CAP_PERFMON)")?;
                program.attach().with_context(|| {
                    format!("attaching to the {COUNTER_TRACEPOINT} tracepoint (needs CAP_PERFMON)")
                })?;
            }
        }
        Ok(())
    }
}

static WARN_ROOT: Once = Once::new();
static WARN_TRACEPOINT: Once = Once::new();

/// Where cgroup v2 is mounted: the unified hierarchy, or its place in a hybrid one.
const CGROUP2_MOUNTS: [&str; 2] = ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"];

/// This process's cgroup v2 directory, open, and its path in the hierarchy.
fn own_cgroup() -> Result<(File, PathBuf)> {
    let listing =
        std::fs::read_to_string("/proc/self/cgroup").context("reading /proc/self/cgroup")?;
    let Some(path) = cgroup_v2_path(&listing) else {
        bail!("this process is in no cgroup v2 hierarchy (/proc/self/cgroup has no 0:: line)");
    };
    for mount in CGROUP2_MOUNTS {
        if !is_cgroup2(Path::new(mount)) {
            continue;
        }
        let dir = Path::new(mount).join(path.strip_prefix("/").unwrap_or(&path));
        let file = File::open(&dir).with_context(|| format!("opening {}", dir.display()))?;
        return Ok((file, path));
    }
    bail!("no cgroup v2 file system is mounted at {CGROUP2_MOUNTS:?}")
}

/// The path of the cgroup v2 line (`0::/system.slice/app.service`) of /proc/self/cgroup.
fn cgroup_v2_path(listing: &str) -> Option<PathBuf> {
    listing
        .lines()
        .find_map(|line| line.strip_prefix("0::"))
        .map(|path| PathBuf::from(path.trim_end()))
        .filter(|path| path.is_absolute())
}

fn is_cgroup2(mount: &Path) -> bool {
    nix::sys::statfs::statfs(mount)
        .is_ok_and(|fs| fs.filesystem_type() == nix::sys::statfs::CGROUP2_SUPER_MAGIC)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cgroup_v2_line_names_the_path() {
        let hybrid =
            "12:pids:/user.slice\n1:name=systemd:/user.slice/s.scope\n0::/user.slice/s.scope\n";
        assert_eq!(
            cgroup_v2_path(hybrid),
            Some(PathBuf::from("/user.slice/s.scope"))
        );
        assert_eq!(cgroup_v2_path("0::/\n"), Some(PathBuf::from("/")));
        assert_eq!(cgroup_v2_path("3:cpu:/a\n"), None);
    }
}
