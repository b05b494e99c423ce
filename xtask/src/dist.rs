//! `cargo xtask dist`: what a distribution needs, made from the clap definitions and checked.
//!
//! - man pages (cluster-lb(1) and one per subcommand, e.g. cluster-lb-run(1)) and bash, zsh and
//!   fish completions, written by the release binary (`cluster-lb generate-dist`) into
//!   `<target>/release/dist/`, where the package metadata finds them (cargo-deb maps
//!   `target/release/` to the real target directory);
//! - the Debian package (cargo-deb, installed under `<target>/cargo-deb` when missing), whose
//!   contents are listed, extracted into a scratch directory and run (`--version`, `--help`);
//!   it is never installed on this host;
//! - `cargo install --path cluster-userspace` on stable alone: no nightly, no bpf-linker (the
//!   eBPF object is committed), into a scratch root, and the installed binary run;
//! - the Kubernetes schema validator tests/packaging.rs runs (crate::kube).

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context, Result};

use crate::{cargo, run, target_dir};

/// Pinned: 3.8.0 builds with the workspace's rustc 1.95.
pub const CARGO_DEB_VERSION: &str = "3.8.0";

/// What the .deb must hold (paths as `dpkg-deb -c` prints them).
const DEB_CONTENTS: [&str; 9] = [
    "./usr/bin/cluster-lb",
    "./usr/lib/systemd/system/cluster-lb.service",
    "./usr/lib/systemd/system/cluster-lb@.service",
    "./usr/share/man/man1/cluster-lb.1.gz",
    "./usr/share/man/man1/cluster-lb-run.1.gz",
    "./usr/share/man/man1/cluster-lb-top.1.gz",
    "./usr/share/bash-completion/completions/cluster-lb",
    "./usr/share/zsh/vendor-completions/_cluster-lb",
    "./usr/share/fish/vendor_completions.d/cluster-lb.fish",
];

pub fn dist() -> Result<()> {
    let out = target_dir()?.join("release/dist");
    generate(&out)?;
    let deb = build_deb()?;
    check_deb(&deb)?;
    check_cargo_install()?;
    // For tests/packaging.rs: the Kubernetes manifest is checked against the schemas there.
    crate::kube::ensure_validator()?;
    eprintln!(
        "xtask: dist: {} and {} checked",
        out.display(),
        deb.display()
    );
    Ok(())
}

/// Man pages and completions, written by the release binary itself (`cluster-lb
/// generate-dist`, hidden) from the clap definitions it parses with, which also checks that the
/// run page documents every flag.
fn generate(out: &Path) -> Result<()> {
    let _ = fs::remove_dir_all(out);
    run(cargo().args(["build", "--release", "-p", "cluster-lb"]))?;
    let binary = target_dir()?.join("release/cluster-lb");
    run(Command::new(&binary).arg("generate-dist").arg(out))?;
    // Debian ships man pages gzipped (-n: no name or time inside, so rebuilds are identical);
    // the .1 files stay for other packagers.
    for entry in fs::read_dir(out.join("man"))? {
        run(Command::new("gzip").args(["-9nkf"]).arg(entry?.path()))?;
    }
    Ok(())
}

/// cargo-deb CARGO_DEB_VERSION under `<target>/cargo-deb`, installed when missing.
fn cargo_deb() -> Result<PathBuf> {
    let root = target_dir()?.join("cargo-deb");
    let binary = root.join("bin/cargo-deb");
    let version = Command::new(&binary).arg("--version").output();
    let installed = version.is_ok_and(|o| {
        o.status.success() && String::from_utf8_lossy(&o.stdout).contains(CARGO_DEB_VERSION)
    });
    if !installed {
        eprintln!(
            "xtask: installing cargo-deb {CARGO_DEB_VERSION} into {}",
            root.display()
        );
        run(cargo()
            .args(["install", "cargo-deb", "--locked", "--force", "--version"])
            .arg(format!("={CARGO_DEB_VERSION}"))
            .arg("--root")
            .arg(&root)
            // Its own build directory, not the workspace's.
            .env_remove("CARGO_TARGET_DIR"))?;
    }
    Ok(binary)
}

/// Builds the release binary and the .deb; returns the package's path.
fn build_deb() -> Result<PathBuf> {
    let cargo_deb = cargo_deb()?;
    // cargo-deb alone would build the whole workspace (examples, tests, xtask) in release.
    run(cargo()
        .args(["build", "--release", "--locked", "-p", "cluster-lb"])
        .env("CARGO_TARGET_DIR", target_dir()?))?;
    let output = Command::new(cargo_deb)
        .current_dir(crate::root())
        .args(["-p", "cluster-lb", "--no-build"])
        .env("CARGO_TARGET_DIR", target_dir()?)
        .stderr(std::process::Stdio::inherit())
        .output()
        .context("running cargo-deb")?;
    if !output.status.success() {
        bail!("cargo-deb -p cluster-lb failed with {}", output.status);
    }
    // cargo-deb prints the package's path as its last line.
    let stdout = String::from_utf8_lossy(&output.stdout);
    let deb = stdout
        .lines()
        .last()
        .map(|line| PathBuf::from(line.trim()))
        .filter(|path| path.extension().is_some_and(|e| e == "deb") && path.is_file())
        .with_context(|| format!("cargo-deb printed no package path: {stdout}"))?;
    Ok(deb)
}

/// Lists, extracts and runs the package (never installed on this host).
fn check_deb(deb: &Path) -> Result<()> {
    let listing = output(Command::new("dpkg-deb").arg("-c").arg(deb))?;
    let paths: Vec<&str> = listing
        .lines()
        .filter_map(|line| line.split_whitespace().nth(5))
        .collect();
    for wanted in DEB_CONTENTS {
        if !paths.contains(&wanted) {
            bail!("{} lacks {wanted}; it holds:\n{listing}", deb.display());
        }
    }
    let scratch = target_dir()?.join("dist-check/deb");
    let _ = fs::remove_dir_all(&scratch);
    fs::create_dir_all(&scratch)?;
    run(Command::new("dpkg-deb").arg("-x").arg(deb).arg(&scratch))?;
    check_binary(&scratch.join("usr/bin/cluster-lb"))?;
    let unit = fs::read_to_string(scratch.join("usr/lib/systemd/system/cluster-lb.service"))?;
    if !unit.contains("ExecStart=/usr/bin/cluster-lb run") {
        bail!("the packaged unit does not start /usr/bin/cluster-lb");
    }
    let template = fs::read_to_string(scratch.join("usr/lib/systemd/system/cluster-lb@.service"))?;
    if !template.contains("ExecStart=/usr/bin/cluster-lb run --config /etc/cluster-lb/%i.toml") {
        bail!("the packaged template unit does not run /etc/cluster-lb/INSTANCE.toml");
    }
    eprintln!(
        "xtask: {} holds {} files; Depends: {}",
        deb.display(),
        paths.len(),
        output(
            Command::new("dpkg-deb")
                .args(["-f"])
                .arg(deb)
                .arg("Depends")
        )?
        .trim()
    );
    Ok(())
}

/// `cargo install --path cluster-userspace` with the stable toolchain, into a scratch root. A
/// `bpf-linker` that only leaves a mark comes first on PATH, so the check fails if anything in
/// the build reached for it. It shares the workspace's target directory, so it reuses the
/// release build made for the .deb.
fn check_cargo_install() -> Result<()> {
    let scratch = target_dir()?.join("dist-check/install");
    let _ = fs::remove_dir_all(&scratch);
    let decoy_dir = scratch.join("decoy");
    fs::create_dir_all(&decoy_dir)?;
    let mark = scratch.join("bpf-linker-was-run");
    let decoy = decoy_dir.join("bpf-linker");
    fs::write(
        &decoy,
        format!("#!/bin/sh\ntouch '{}'\nexit 1\n", mark.display()),
    )?;
    fs::set_permissions(&decoy, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
    let path = std::env::var_os("PATH").unwrap_or_default();
    let path =
        std::env::join_paths(std::iter::once(decoy_dir).chain(std::env::split_paths(&path)))?;
    let root = scratch.join("root");
    run(cargo()
        .args([
            "install",
            "--locked",
            "--path",
            "cluster-userspace",
            "--root",
        ])
        .arg(&root)
        .env("RUSTUP_TOOLCHAIN", "stable")
        .env("PATH", path)
        .env("CARGO_TARGET_DIR", target_dir()?))?;
    if mark.exists() {
        bail!(
            "cargo install --path cluster-userspace ran bpf-linker; it must build on stable alone"
        );
    }
    check_binary(&root.join("bin/cluster-lb"))
}

/// The binary starts and knows its version and its subcommands.
fn check_binary(binary: &Path) -> Result<()> {
    let version = output(Command::new(binary).arg("--version"))?;
    let expected = format!("cluster-lb {}", env!("CARGO_PKG_VERSION"));
    if version.trim() != expected {
        bail!(
            "{} --version said {version:?}, not {expected:?}",
            binary.display()
        );
    }
    let help = output(Command::new(binary).arg("--help"))?;
    for subcommand in [
        "run", "status", "logs", "top", "reload", "scale", "stop", "send",
    ] {
        if !help.lines().any(|l| l.trim_start().starts_with(subcommand)) {
            bail!("{} --help does not list {subcommand}", binary.display());
        }
    }
    Ok(())
}

fn output(command: &mut Command) -> Result<String> {
    let out = command
        .output()
        .with_context(|| format!("cannot start {command:?}"))?;
    if !out.status.success() {
        bail!(
            "{command:?} failed with {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
