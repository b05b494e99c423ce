//! Building the sk_reuseport program and keeping the committed object fresh.

use std::{
    fs,
    path::{Path, PathBuf},
};

use anyhow::{bail, Context, Result};

use crate::{root, run, setup, target_dir};

/// Where cluster-userspace embeds the object from (committed).
const COMMITTED_OBJECT: &str = "cluster-userspace/bpf/cluster-lb-ebpf.o";
const TARGET: &str = "bpfel-unknown-none";

/// Builds cluster-ebpf. With `check`, fails when the committed object differs from the build;
/// otherwise writes the build there.
pub fn build(check: bool) -> Result<()> {
    let channel = setup::ensure_ebpf_toolchain()?;
    setup::ensure_bpf_linker(&channel)?;
    // A crate of its own (not a workspace member), built in a subdirectory of the workspace's
    // target directory.
    let target_dir = target_dir()?.join("ebpf");
    run(&mut pinned_cargo(&channel, "build", &target_dir))?;

    let built: PathBuf = target_dir.join(TARGET).join("release/cluster-lb-ebpf");
    let stripped = target_dir.join("cluster-lb-ebpf.o");
    strip_debug_info(&channel, &built, &stripped)?;
    let fresh = fs::read(&stripped).with_context(|| format!("reading {}", stripped.display()))?;
    let committed_path = root().join(COMMITTED_OBJECT);
    let committed = fs::read(&committed_path).unwrap_or_default();
    if fresh == committed {
        eprintln!("xtask: {COMMITTED_OBJECT} is up to date");
        return Ok(());
    }
    if check {
        bail!("{COMMITTED_OBJECT} is stale: the eBPF source builds to a different object; run `cargo xtask build-ebpf` and commit the result");
    }
    fs::write(&committed_path, &fresh).with_context(|| format!("writing {COMMITTED_OBJECT}"))?;
    eprintln!("xtask: wrote {COMMITTED_OBJECT} ({} bytes)", fresh.len());
    Ok(())
}

/// Copies the object without its DWARF, keeping its BTF: the DWARF was only bpf-linker's input
/// for the BTF, and it names crates by hashes that depend on where the checkout is (cargo hashes
/// path dependencies' locations), so without this step no two clones built the same object. The
/// pinned nightly's own llvm-objcopy (rust-objcopy) does it; it needs the toolchain's libLLVM.
fn strip_debug_info(channel: &str, from: &Path, to: &Path) -> Result<()> {
    let sysroot = setup::sysroot(channel)?;
    let objcopy = sysroot.join("lib/rustlib/x86_64-unknown-linux-gnu/bin/rust-objcopy");
    run(std::process::Command::new(&objcopy)
        .env("LD_LIBRARY_PATH", sysroot.join("lib"))
        .arg("--strip-debug")
        .arg(from)
        .arg(to))
    .with_context(|| format!("stripping the debug info with {}", objcopy.display()))
}

/// clippy on cluster-ebpf, warnings as errors, as the workspace's crates are checked.
pub fn clippy() -> Result<()> {
    let channel = setup::ensure_ebpf_toolchain()?;
    setup::ensure_bpf_linker(&channel)?;
    let target_dir = target_dir()?.join("ebpf-clippy");
    let mut cargo = pinned_cargo(&channel, "clippy", &target_dir);
    cargo.args(["--", "-D", "warnings"]);
    run(&mut cargo)
}

/// `cargo +PINNED SUBCOMMAND` for the eBPF crate and target.
fn pinned_cargo(
    channel: &str,
    subcommand: &str,
    target_dir: &std::path::Path,
) -> std::process::Command {
    let mut cargo = setup::pinned(channel, "cargo");
    cargo
        .current_dir(root().join("cluster-ebpf"))
        .args([
            subcommand,
            "--release",
            "--target",
            TARGET,
            "-Z",
            "build-std=core",
            // The object's BTF names source files: the package's paths, not the checkout's,
            // so every clone builds the same object. Given here, not in Cargo.toml, whose
            // `cargo-features` stable cargo (cargo fmt) refuses to read.
            "-Z",
            "trim-paths",
            "--config",
            "profile.release.trim-paths=\"all\"",
            "--target-dir",
        ])
        .arg(target_dir)
        // v3: the BPF_ATOMIC fetch-add the round-robin counter needs (kernel 5.12+). BTF: the
        // kernel creates socket storage (CLB_SLOT_OF) only with its key and value types, which
        // bpf-linker turns the debug info into (trim-paths, above, keeps the checkout's path
        // out of the BTF's line info; the DWARF itself is stripped: strip_debug_info).
        .env(
            "CARGO_ENCODED_RUSTFLAGS",
            "-Ctarget-cpu=v3\x1f-Cdebuginfo=2\x1f-Clink-arg=--btf",
        );
    cargo
}
