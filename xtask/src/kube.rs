//! The Kubernetes schema validator the packaging test runs on deploy/kubernetes.yaml: PyPI's
//! kubernetes-validate (it bundles the schemas, so validating needs no network), pinned, in a
//! virtual environment under the target directory. Kubernetes itself cannot run here.

use std::process::Command;

use anyhow::Result;

use crate::{run, target_dir};

/// Pinned; it validates against Kubernetes 1.37 by default.
pub const KUBERNETES_VALIDATE_VERSION: &str = "1.37.0";

/// `<target>/kubernetes-validate/bin/kubernetes-validate` at the pinned version, installed
/// when missing; tests/packaging.rs runs it from there.
pub fn ensure_validator() -> Result<()> {
    let venv = target_dir()?.join("kubernetes-validate");
    let validator = venv.join("bin/kubernetes-validate");
    let installed = Command::new(&validator)
        .arg("--version")
        .output()
        .is_ok_and(|o| {
            o.status.success()
                && String::from_utf8_lossy(&o.stdout).contains(KUBERNETES_VALIDATE_VERSION)
        });
    if installed {
        return Ok(());
    }
    // Debian splits venv (and the pip it bootstraps) out of python3.
    let has_venv = Command::new("python3")
        .args(["-c", "import ensurepip, venv"])
        .status()
        .is_ok_and(|s| s.success());
    if !has_venv {
        eprintln!("xtask: installing python3-venv");
        run(Command::new("apt-get").args(["update", "-q"]))?;
        run(Command::new("apt-get")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(["python3", "python3-venv"])
            .env("DEBIAN_FRONTEND", "noninteractive"))?;
    }
    eprintln!(
        "xtask: installing kubernetes-validate {KUBERNETES_VALIDATE_VERSION} from PyPI into {}",
        venv.display()
    );
    run(Command::new("python3")
        .args(["-m", "venv", "--clear"])
        .arg(&venv))?;
    run(Command::new(venv.join("bin/pip")).args([
        "install",
        "--quiet",
        &format!("kubernetes-validate=={KUBERNETES_VALIDATE_VERSION}"),
    ]))
}
