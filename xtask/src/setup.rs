//! What a fresh machine lacks: Debian packages, the pinned nightly with rust-src, bpf-linker.
//! Each step checks first and does nothing when its tool is already there.

use std::{
    env, fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{bail, Context, Result};

use crate::{root, run};

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
    install_packages(&missing)
}

/// Installs Debian packages (after one `apt-get update`).
pub fn install_packages(packages: &[&str]) -> Result<()> {
    eprintln!("xtask: installing {}", packages.join(" "));
    run(Command::new("apt-get").arg("update").arg("-q"))?;
    run(Command::new("apt-get")
        .args(["install", "-y", "-q", "--no-install-recommends"])
        .args(packages)
        .env("DEBIAN_FRONTEND", "noninteractive"))
}

pub fn on_path(command: &str) -> bool {
    find_on_path(command).is_some()
}

/// The bpf-linker release `cargo xtask build-ebpf` builds with. It does the code generation, with
/// the pinned nightly's LLVM (see ensure_bpf_linker), so it is pinned exactly as the nightly is,
/// whose date is in cluster-ebpf/rust-toolchain.toml: change the two together, then run
/// `cargo xtask build-ebpf` and commit the object.
pub const BPF_LINKER_VERSION: &str = "0.13.0";

/// Where the eBPF toolchain is pinned: rustup uses it for any cargo run in cluster-ebpf/, xtask
/// reads the channel from it.
const TOOLCHAIN_FILE: &str = "cluster-ebpf/rust-toolchain.toml";

/// The dated nightly in cluster-ebpf/rust-toolchain.toml, e.g. "nightly-2026-05-20".
pub fn pinned_nightly() -> Result<String> {
    let path = root().join(TOOLCHAIN_FILE);
    let text = fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    channel_of(&text).with_context(|| format!("in {TOOLCHAIN_FILE}"))
}

fn channel_of(toolchain_file: &str) -> Result<String> {
    #[derive(serde::Deserialize)]
    struct File {
        toolchain: Toolchain,
    }
    #[derive(serde::Deserialize)]
    struct Toolchain {
        channel: String,
    }
    let file: File = toml::from_str(toolchain_file).context("no [toolchain] channel")?;
    let channel = file.toolchain.channel;
    let date = channel.strip_prefix("nightly-").unwrap_or("");
    let is_date = date.len() == 10
        && date.char_indices().all(|(i, c)| {
            if i == 4 || i == 7 {
                c == '-'
            } else {
                c.is_ascii_digit()
            }
        });
    if !is_date {
        bail!(
            "channel = \"{channel}\": the eBPF object is only reproducible with a dated nightly (nightly-YYYY-MM-DD)"
        );
    }
    Ok(channel)
}

/// A command line for the pinned nightly, cleared of what the outer (stable) cargo set.
pub fn pinned(channel: &str, tool: &str) -> Command {
    let mut command = Command::new("rustup");
    command.args(["run", channel, tool]);
    for (key, _) in env::vars_os() {
        let key = key.to_string_lossy();
        if key == "RUSTUP_TOOLCHAIN"
            || key.starts_with("RUSTC")
            || (key.starts_with("CARGO_") && key != "CARGO_HOME")
            || key == "CARGO"
            || key == "RUSTDOC"
        {
            command.env_remove(key.as_ref());
        }
    }
    command
}

pub fn sysroot(channel: &str) -> Result<PathBuf> {
    let output = pinned(channel, "rustc")
        .args(["--print", "sysroot"])
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("running rustc +{channel}"))?;
    if !output.status.success() {
        bail!("rustc +{channel} --print sysroot failed");
    }
    Ok(PathBuf::from(
        String::from_utf8_lossy(&output.stdout).trim(),
    ))
}

/// The pinned nightly with rust-src (`-Z build-std=core` needs the standard library's source)
/// and clippy, installed when missing. Returns its channel.
pub fn ensure_ebpf_toolchain() -> Result<String> {
    let channel = pinned_nightly()?;
    let list = Command::new("rustup")
        .args(["toolchain", "list"])
        .output()
        .context("running rustup toolchain list (is rustup installed?)")?;
    let installed = String::from_utf8_lossy(&list.stdout).lines().any(|line| {
        let name = line.split_whitespace().next().unwrap_or("");
        name == channel || name.starts_with(&format!("{channel}-"))
    });
    if !installed {
        eprintln!("xtask: installing the eBPF toolchain {channel} (pinned in {TOOLCHAIN_FILE})");
        run(Command::new("rustup").args([
            "toolchain",
            "install",
            &channel,
            "--profile",
            "minimal",
            "-c",
            "rust-src",
        ]))?;
    }
    // clippy checks the eBPF crate as the workspace's crates are checked (`cargo xtask test`).
    let clippy = Command::new(sysroot(&channel)?.join("bin/cargo-clippy"))
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !clippy {
        eprintln!("xtask: adding clippy to {channel}");
        run(Command::new("rustup").args(["component", "add", "clippy", "--toolchain", &channel]))?;
    }
    if !sysroot(&channel)?
        .join("lib/rustlib/src/rust/library/core")
        .is_dir()
    {
        eprintln!("xtask: adding rust-src to {channel}");
        run(Command::new("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            &channel,
        ]))?;
    }
    Ok(channel)
}

/// bpf-linker BPF_LINKER_VERSION, loading the pinned nightly's LLVM; (re)built when it is
/// missing, another version, does not run, or loads another LLVM.
///
/// bpf-linker 0.13 needs LLVM 21+, Debian has 19. The nightly ships its LLVM as a shared
/// library, so bpf-linker is built against that: a prefix whose lib/ holds the library under
/// its own name and as libLLVM.so. The prefix lives under CARGO_HOME, because the built linker
/// keeps an rpath to it. Its links are pointed at the pinned toolchain's library on every run
/// (links to any other are removed), so a linker built against another LLVM (another library
/// name) no longer loads and is rebuilt, and one built against this name loads the pinned one.
pub fn ensure_bpf_linker(channel: &str) -> Result<()> {
    let (library, major) = find_llvm(&sysroot(channel)?.join("lib"))?;
    let prefix = cargo_home().join("bpf-linker-llvm");
    link_llvm(&prefix.join("lib"), &library)?;
    let why = match check_bpf_linker(&prefix.join("lib")) {
        Ok(()) => return Ok(()),
        Err(why) => why,
    };
    eprintln!("xtask: bpf-linker needs building: {why}");
    eprintln!(
        "xtask: building bpf-linker {BPF_LINKER_VERSION} against {channel}'s LLVM {major} (takes a few minutes, once)"
    );
    let mut install = Command::new("cargo");
    install
        // The workspace root: no rust-toolchain.toml there, so the default (stable) toolchain.
        .current_dir(root())
        .args([
            "install",
            "bpf-linker",
            "--version",
            &format!("={BPF_LINKER_VERSION}"),
            "--locked",
            "--force",
            "--no-default-features",
            "--features",
        ])
        .arg(format!("llvm-{major}"))
        .env("LLVM_PREFIX", &prefix)
        .env_remove("RUSTUP_TOOLCHAIN")
        .env_remove("RUSTC")
        .env_remove("CARGO_TARGET_DIR")
        .env_remove("CARGO_BUILD_TARGET_DIR");
    run(&mut install)?;
    check_bpf_linker(&prefix.join("lib")).map_err(|why| {
        anyhow::anyhow!("bpf-linker {BPF_LINKER_VERSION} was just installed, but {why}")
    })
}

/// Points `lib`'s libLLVM.so and libLLVM.so.<version> at `library`, and removes any other
/// libLLVM link there (left by an earlier toolchain).
fn link_llvm(lib: &Path, library: &Path) -> Result<()> {
    fs::create_dir_all(lib).with_context(|| format!("creating {}", lib.display()))?;
    let own_name = library.file_name().context("LLVM library has no name")?;
    for entry in fs::read_dir(lib).with_context(|| format!("reading {}", lib.display()))? {
        let entry = entry?;
        let name = entry.file_name();
        let ours = name == "libLLVM.so" || name == own_name;
        if name.to_string_lossy().starts_with("libLLVM") && !ours {
            fs::remove_file(entry.path())
                .with_context(|| format!("removing {}", entry.path().display()))?;
        }
    }
    for link in [lib.join("libLLVM.so"), lib.join(own_name)] {
        if fs::read_link(&link).is_ok_and(|target| target == library) {
            continue;
        }
        let _ = fs::remove_file(&link);
        std::os::unix::fs::symlink(library, &link)
            .with_context(|| format!("linking {}", link.display()))?;
    }
    Ok(())
}

/// Ok when the bpf-linker on PATH (the one rustc runs) runs, is BPF_LINKER_VERSION and loads
/// its LLVM from `llvm_lib`; otherwise why not.
fn check_bpf_linker(llvm_lib: &Path) -> Result<(), String> {
    let Some(linker) = find_on_path("bpf-linker") else {
        return Err("it is not installed".into());
    };
    let output = Command::new(&linker)
        .arg("--version")
        .output()
        .map_err(|e| format!("{} does not start: {e}", linker.display()))?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        return Err(format!(
            "{} does not run: {}",
            linker.display(),
            stderr.lines().next().unwrap_or("").trim()
        ));
    }
    let stdout = String::from_utf8_lossy(&output.stdout);
    let version = stdout
        .trim()
        .strip_prefix("bpf-linker ")
        .unwrap_or(stdout.trim());
    if version != BPF_LINKER_VERSION {
        return Err(format!("{} is version {version}", linker.display()));
    }
    let ldd = Command::new("ldd")
        .arg(&linker)
        .output()
        .map_err(|e| format!("cannot run ldd: {e}"))?;
    let loads_pinned_llvm = String::from_utf8_lossy(&ldd.stdout).lines().any(|line| {
        line.trim_start().starts_with("libLLVM")
            && line
                .split_whitespace()
                .any(|word| Path::new(word).starts_with(llvm_lib))
    });
    if !loads_pinned_llvm {
        return Err(format!(
            "{} does not load its LLVM from {}",
            linker.display(),
            llvm_lib.display()
        ));
    }
    Ok(())
}

fn find_on_path(command: &str) -> Option<PathBuf> {
    env::split_paths(&env::var_os("PATH")?)
        .map(|dir| dir.join(command))
        .find(|path| path.is_file())
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_toolchain_file_pins_a_dated_nightly() {
        let channel = pinned_nightly().expect("cluster-ebpf/rust-toolchain.toml");
        assert!(channel.starts_with("nightly-20"), "{channel}");
        assert_eq!(
            channel_of(
                "[toolchain]\nchannel = \"nightly-2026-05-20\"\ncomponents = [\"rust-src\"]\n"
            )
            .expect("dated"),
            "nightly-2026-05-20"
        );
        for floating in ["nightly", "stable", "nightly-2026-5-20", "1.95"] {
            let file = format!("[toolchain]\nchannel = \"{floating}\"\n");
            assert!(channel_of(&file).is_err(), "{floating}");
        }
        assert!(channel_of("[toolchain]\n").is_err());
    }
}
