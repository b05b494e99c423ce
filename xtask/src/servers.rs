//! What tests/servers.rs needs besides cargo's own builds, cached under the target directory:
//! the Python servers pinned in tests/python/requirements.txt, in a venv at <target>/python
//! (reinstalled when the pins change); examples/go built with Debian's golang-go into
//! <target>/go/go-server (offline: standard library only, GOCACHE under <target>/go); Debian's
//! lighttpd with its Lua module; and the hostile C workers of tests/workers/hardening, built
//! with gcc into <target>/hardening.

use std::{fs, path::Path, process::Command};

use anyhow::{Context, Result};

use crate::{root, run, setup, target_dir};

pub fn ensure() -> Result<()> {
    setup::ensure_packages(&[("go", "golang-go"), ("lighttpd", "lighttpd")])?;
    // mod_magnet (examples/lighttpd/worker.lua) has a package of its own and no command.
    if !Path::new("/usr/lib/lighttpd/mod_magnet.so").is_file() {
        setup::install_packages(&["lighttpd-modules-lua"])?;
    }
    python_servers(&target_dir()?.join("python"))?;
    go_server(&target_dir()?.join("go"))?;
    hostile_workers(&target_dir()?.join("hardening"))
}

/// Each tests/workers/hardening/NAME.c as <target>/hardening/NAME (with - for _).
fn hostile_workers(dir: &Path) -> Result<()> {
    setup::ensure_packages(&[("gcc", "gcc")])?;
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let sources = root().join("tests/workers/hardening");
    for entry in fs::read_dir(&sources).context("listing tests/workers/hardening")? {
        let source = entry?.path();
        if source.extension().and_then(|e| e.to_str()) != Some("c") {
            continue;
        }
        let Some(stem) = source.file_stem().and_then(|s| s.to_str()) else {
            continue;
        };
        run(Command::new("gcc")
            .args(["-O1", "-Wall", "-Wextra", "-Werror", "-o"])
            .arg(dir.join(stem.replace('_', "-")))
            .arg(&source))?;
    }
    Ok(())
}

fn python_servers(venv: &Path) -> Result<()> {
    let pins = root().join("tests/python/requirements.txt");
    let wanted = fs::read(&pins).context("reading tests/python/requirements.txt")?;
    let installed = venv.join("requirements.txt");
    if fs::read(&installed).ok().as_deref() == Some(wanted.as_slice()) {
        return Ok(());
    }
    eprintln!(
        "xtask: installing the Python servers (tests/python/requirements.txt) into {}",
        venv.display()
    );
    // Debian's python3 (the hardening tests run /usr/bin/python3 too); its venv module and
    // ensurepip come with python3-venv.
    if Command::new("/usr/bin/python3")
        .args(["-c", "import ensurepip, venv"])
        .output()
        .map_or(true, |output| !output.status.success())
    {
        setup::install_packages(&["python3-venv"])?;
    }
    run(Command::new("/usr/bin/python3")
        .args(["-m", "venv", "--clear"])
        .arg(venv))?;
    run(Command::new(venv.join("bin/pip"))
        .args(["install", "--quiet", "--disable-pip-version-check", "-r"])
        .arg(&pins))?;
    fs::write(&installed, wanted).with_context(|| format!("writing {}", installed.display()))
}

fn go_server(dir: &Path) -> Result<()> {
    // go build is incremental (GOCACHE), so running it every time costs little.
    run(Command::new("go")
        .args(["build", "-o"])
        .arg(dir.join("go-server"))
        .arg(".")
        .current_dir(root().join("examples/go"))
        .env("GOCACHE", dir.join("cache"))
        .env("GOPATH", dir.join("path"))
        .env("GOFLAGS", "-mod=mod")
        .env("GOPROXY", "off")
        .env("GOTOOLCHAIN", "local"))
}
