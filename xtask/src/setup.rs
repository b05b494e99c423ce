//! What a fresh machine lacks: Debian packages, the nightly's rust-src, bpf-linker.
//! Each step checks first and does nothing when its tool is already there.

use std::{
    env, fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{bail, Context, Result};

use crate::run;

/// Root-only tests are skipped without root; in CI a skip would hide an untested path.
pub fn require_root_in_ci() -> Result<()> {
    let ci = env::var("CI").is_ok_and(|v| v == "true" || v == "1");
    // SAFETY: geteuid has no preconditions.
    if ci && unsafe { libc::geteuid() } != 0 {
        bail!("CI=true but not root: the integration tests need root (network namespaces, eBPF)");
    }
    Ok(())
}

/// Installs the Debian package of every command that is missing, with one `apt-get update`.
pub fn ensure_packages(commands: &[(&str, &str)]) -> Result<()> {
    let missing: Vec<&str> = commands
        .iter()
        .filter(|(command, _)| !on_path(command))
        .map(|(_, package)| *package)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("xtask: installing {}", missing.join(" "));
    run(Command::new("apt-get").arg("update").arg("-q"))?;
    run(Command::new("apt-get")
        .args(["install", "-y", "-q", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive"))
}

pub fn on_path(command: &str) -> bool {
    env::var_os("PATH")
        .is_some_and(|path| env::split_paths(&path).any(|dir| dir.join(command).is_file()))
}

/// A command line for the nightly toolchain, cleared of what the outer (stable) cargo set.
pub fn nightly(tool: &str) -> Command {
    let mut command = Command::new("rustup");
    command.args(["run", "nightly", tool]);
    for (key, _) in env::vars_os() {
        let key = key.to_string_lossy();
        if key == "RUSTUP_TOOLCHAIN"
            || key.starts_with("RUSTC")
            || key.starts_with("CARGO_")
            || key == "CARGO"
            || key == "RUSTDOC"
        {
            command.env_remove(key.as_ref());
        }
    }
    command
}

fn nightly_sysroot() -> Result<PathBuf> {
    let output = nightly("rustc")
        .args(["--print", "sysroot"])
        .stderr(Stdio::inherit())
        .output()
        .context("running rustc +nightly (is the nightly toolchain installed? `rustup toolchain install nightly`)")?;
    if !output.status.success() {
        bail!("rustc +nightly --print sysroot failed: is the nightly toolchain installed?");
    }
    Ok(PathBuf::from(
        String::from_utf8_lossy(&output.stdout).trim(),
    ))
}

/// `-Z build-std=core` needs the standard library's source.
pub fn ensure_rust_src() -> Result<()> {
    let sysroot = nightly_sysroot()?;
    if sysroot.join("lib/rustlib/src/rust/library/core").is_dir() {
        return Ok(());
    }
    eprintln!("xtask: adding rust-src to the nightly toolchain");
    run(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]))
}

/// bpf-linker 0.13 needs LLVM 21+, Debian has 19. The nightly ships its LLVM as a shared
/// library, so bpf-linker is built against that: a prefix whose lib/ holds the library under
/// its own name and as libLLVM.so. The prefix lives under CARGO_HOME, because the built linker
/// keeps an rpath to it.
pub fn ensure_bpf_linker() -> Result<()> {
    let works = Command::new("bpf-linker")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if works {
        return Ok(());
    }
    let sysroot = nightly_sysroot()?;
    let (library, major) = find_llvm(&sysroot.join("lib"))?;
    let prefix = cargo_home().join("bpf-linker-llvm");
    let lib = prefix.join("lib");
    fs::create_dir_all(&lib).with_context(|| format!("creating {}", lib.display()))?;
    let file_name = library.file_name().context("LLVM library has no name")?;
    for link in [lib.join("libLLVM.so"), lib.join(file_name)] {
        let _ = fs::remove_file(&link);
        std::os::unix::fs::symlink(&library, &link)
            .with_context(|| format!("linking {}", link.display()))?;
    }
    eprintln!(
        "xtask: building bpf-linker against the nightly's LLVM {major} (takes a few minutes, once)"
    );
    let mut install = Command::new("cargo");
    install
        .args([
            "install",
            "bpf-linker",
            "--version",
            "~0.13",
            "--locked",
            "--no-default-features",
            "--features",
        ])
        .arg(format!("llvm-{major}"))
        .env("LLVM_PREFIX", &prefix)
        .env_remove("RUSTUP_TOOLCHAIN")
        .env_remove("RUSTC")
        .env_remove("CARGO_TARGET_DIR");
    run(&mut install)
}

/// The nightly's LLVM shared library and its major version, e.g. libLLVM.so.22.1-rust-... .
fn find_llvm(lib: &Path) -> Result<(PathBuf, u32)> {
    for entry in fs::read_dir(lib).with_context(|| format!("reading {}", lib.display()))? {
        let path = entry?.path();
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if let Some(version) = name.strip_prefix("libLLVM.so.") {
            if let Some(major) = version.split('.').next().and_then(|m| m.parse().ok()) {
                return Ok((path, major));
            }
        }
    }
    bail!(
        "no libLLVM.so.* in {}: this nightly does not ship LLVM as a shared library",
        lib.display()
    )
}

fn cargo_home() -> PathBuf {
    env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| env::var_os("HOME").map(|home| PathBuf::from(home).join(".cargo")))
        .unwrap_or_else(|| PathBuf::from("/root/.cargo"))
}
