//! Node's own cluster tests, for tests/integration/node_conformance.rs: `test/common/` and every
//! `test/{parallel,sequential}/test-cluster-*.js` of each Node major, extracted once into
//! `<target>/node-tests/vMAJOR/`. They are never committed: they come from Debian's source
//! package of nodejs, whose upstream tarball carries Node's test tree (npm's Node packages do
//! not), fetched with `apt-get source --download-only` through a private sources list in the
//! target directory; the machine's own apt configuration is neither read by apt nor changed.
//!
//! A major whose tarball the mirror does not have is noted in `vMAJOR.missing` (with apt's
//! words) and not tried again until that file is removed; the test says it skipped that major.
//! Node 20 is the reference set and must be there.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context, Result};

use crate::{node, run, setup, target_dir};

/// The major whose tests must be fetched (the others are best effort).
const REQUIRED_MAJOR: u32 = 20;

/// Debian suites whose nodejs sources are looked at: bookworm has 18, trixie 20, sid and
/// experimental the newer ones. The newest version of each major among them is taken.
const SUITES: [&str; 4] = ["bookworm", "trixie", "sid", "experimental"];

/// Used when the machine's apt sources name no Debian mirror.
const DEFAULT_MIRROR: &str = "http://deb.debian.org/debian";

/// Fetches the test tree of every Node major that has none yet.
pub fn ensure() -> Result<()> {
    let base = target_dir()?.join("node-tests");
    let wanted: Vec<u32> = node::MAJORS
        .into_iter()
        .filter(|major| !tree_dir(&base, *major).is_dir() && !missing_note(&base, *major).exists())
        .collect();
    if wanted.is_empty() {
        return Ok(());
    }
    // apt-get and dpkg are Debian's own; tar needs xz for the upstream tarball.
    setup::ensure_packages(&[("xz", "xz-utils")])?;
    let apt = PrivateApt::create(&base.join("apt"))?;
    let result = fetch_all(&apt, &base, &wanted);
    // The indexes and tarballs are large and only needed once: the extracted trees are the cache.
    let _ = fs::remove_dir_all(&apt.dir);
    result
}

fn fetch_all(apt: &PrivateApt, base: &Path, majors: &[u32]) -> Result<()> {
    apt.update()?;
    let versions = apt.nodejs_versions()?;
    for &major in majors {
        match fetch_newest(apt, base, major, &versions) {
            Ok(()) => {}
            Err(error) if major == REQUIRED_MAJOR => return Err(error),
            Err(error) => note_missing(base, major, &error)?,
        }
    }
    Ok(())
}

/// The newest version of `major` whose tarball the mirror has (a mirror may lag behind its own
/// index).
fn fetch_newest(apt: &PrivateApt, base: &Path, major: u32, versions: &[String]) -> Result<()> {
    let candidates = newest_first(versions, major);
    let mut last_error = None;
    for version in &candidates {
        match fetch_tree(apt, base, major, version) {
            Ok(()) => return Ok(()),
            Err(error) => last_error = Some(error),
        }
    }
    Err(last_error.unwrap_or_else(|| {
        anyhow::anyhow!("Debian's {} have no nodejs {major}.x", SUITES.join(", "))
    }))
}

/// `<base>/vMAJOR`: `test/common`, `test/parallel`, `test/sequential` below it, laid out as in
/// Node's source tree (the tests require `../common`).
fn tree_dir(base: &Path, major: u32) -> PathBuf {
    base.join(format!("v{major}"))
}

fn missing_note(base: &Path, major: u32) -> PathBuf {
    base.join(format!("v{major}.missing"))
}

fn note_missing(base: &Path, major: u32, error: &anyhow::Error) -> Result<()> {
    let note = missing_note(base, major);
    eprintln!(
        "xtask: no Node {major} tests: {error:#}; the conformance test skips Node {major} \
         (remove {} to try again)",
        note.display()
    );
    fs::write(&note, format!("{error:#}\n")).with_context(|| format!("writing {}", note.display()))
}

/// Downloads the upstream tarball of nodejs `version` and extracts the cluster tests from it.
fn fetch_tree(apt: &PrivateApt, base: &Path, major: u32, version: &str) -> Result<()> {
    eprintln!("xtask: fetching Node {major}'s cluster tests from Debian (nodejs {version} source)");
    let tarball = apt.download_orig(version)?;
    let staging = base.join(format!("v{major}.download"));
    let _ = fs::remove_dir_all(&staging);
    fs::create_dir_all(&staging).with_context(|| format!("creating {}", staging.display()))?;
    run(Command::new("tar")
        .arg("-xJf")
        .arg(&tarball)
        .args(["--strip-components=1", "--wildcards", "-C"])
        .arg(&staging)
        .args([
            "*/test/common/*",
            "*/test/parallel/test-cluster-*.js",
            "*/test/sequential/test-cluster-*.js",
        ]))?;
    if !staging.join("test/common/index.js").is_file() {
        bail!("{} has no test/common/index.js", tarball.display());
    }
    fs::write(
        staging.join("DEBIAN-VERSION"),
        format!("nodejs {version}\n"),
    )
    .context("writing DEBIAN-VERSION")?;
    // Renamed into place only when complete, so an interrupted run is retried, not half-used.
    let tree = tree_dir(base, major);
    fs::rename(&staging, &tree).with_context(|| format!("moving tests into {}", tree.display()))
}

/// The versions in `versions` whose upstream major is `major`, newest first by Debian's
/// ordering.
fn newest_first(versions: &[String], major: u32) -> Vec<String> {
    let mut sorted: Vec<String> = Vec::new();
    for version in versions.iter().filter(|v| major_of(v) == Some(major)) {
        if sorted.contains(version) {
            continue;
        }
        let at = sorted
            .iter()
            .position(|known| dpkg_newer(version, known))
            .unwrap_or(sorted.len());
        sorted.insert(at, version.clone());
    }
    sorted
}

/// `20` for `20.19.2+dfsg-1+deb13u3` (and for `1:20.1.0-1`, with an epoch).
fn major_of(version: &str) -> Option<u32> {
    let without_epoch = version.split_once(':').map_or(version, |(_, rest)| rest);
    without_epoch.split('.').next()?.parse().ok()
}

/// The upstream part of a Debian version: no epoch, no Debian revision.
fn upstream_of(version: &str) -> &str {
    let without_epoch = version.split_once(':').map_or(version, |(_, rest)| rest);
    without_epoch
        .rsplit_once('-')
        .map_or(without_epoch, |(upstream, _)| upstream)
}

fn dpkg_newer(a: &str, b: &str) -> bool {
    Command::new("dpkg")
        .args(["--compare-versions", a, "gt", b])
        .status()
        .is_ok_and(|status| status.success())
}

/// apt-get and apt-cache with a sources list, index and download directories of their own.
struct PrivateApt {
    dir: PathBuf,
}

impl PrivateApt {
    fn create(dir: &Path) -> Result<PrivateApt> {
        let _ = fs::remove_dir_all(dir);
        for sub in ["lists/partial", "cache/archives/partial", "download"] {
            fs::create_dir_all(dir.join(sub))
                .with_context(|| format!("creating {}", dir.join(sub).display()))?;
        }
        let mirror = debian_mirror();
        let lines: String = SUITES
            .iter()
            .map(|suite| {
                format!(
                    "deb-src [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] \
                     {mirror} {suite} main\n"
                )
            })
            .collect();
        fs::write(dir.join("sources.list"), lines).context("writing the private sources list")?;
        Ok(PrivateApt {
            dir: dir.to_path_buf(),
        })
    }

    /// The options that point apt at this directory instead of the system's configuration.
    fn options(&self) -> Vec<String> {
        let dir = self.dir.display();
        [
            format!("Dir::Etc::SourceList={dir}/sources.list"),
            "Dir::Etc::SourceParts=/dev/null".to_string(),
            format!("Dir::State::Lists={dir}/lists"),
            format!("Dir::Cache={dir}/cache"),
            "Dir::State::status=/dev/null".to_string(),
            // apt drops to the _apt user to download, who cannot write into the target dir.
            "APT::Sandbox::User=root".to_string(),
        ]
        .into_iter()
        .flat_map(|option| ["-o".to_string(), option])
        .collect()
    }

    fn command(&self, program: &str) -> Command {
        let mut command = Command::new(program);
        command.args(self.options());
        command
    }

    fn update(&self) -> Result<()> {
        run(self.command("apt-get").args(["update", "-q"]))
    }

    /// Every version of the nodejs source package in the suites.
    fn nodejs_versions(&self) -> Result<Vec<String>> {
        let output = self
            .command("apt-cache")
            .args(["showsrc", "--only-source", "nodejs"])
            .output()
            .context("running apt-cache showsrc nodejs")?;
        if !output.status.success() {
            bail!(
                "apt-cache showsrc nodejs failed: {}",
                String::from_utf8_lossy(&output.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&output.stdout)
            .lines()
            .filter_map(|line| line.strip_prefix("Version: "))
            .map(|version| version.trim().to_string())
            .collect())
    }

    /// `apt-get source --download-only nodejs=VERSION`; the upstream tarball's path.
    fn download_orig(&self, version: &str) -> Result<PathBuf> {
        let into = self.dir.join("download");
        let output = self
            .command("apt-get")
            .args(["source", "--download-only", "--only-source", "-q"])
            .arg(format!("nodejs={version}"))
            .current_dir(&into)
            .output()
            .context("running apt-get source")?;
        // Its exit status is not the verdict: mirrors (and caching proxies) may lack the .dsc or
        // the Debian patches, which are not needed. apt checks each file it keeps against the
        // SHA-256 in the signed Sources index, so a tarball that is there is the right one.
        let tarball = into.join(format!("nodejs_{}.orig.tar.xz", upstream_of(version)));
        if !tarball.is_file() {
            let stderr = String::from_utf8_lossy(&output.stderr);
            // apt's line about the tarball itself, not those about the files we do not need.
            let why = stderr
                .lines()
                .find(|line| line.contains("orig.tar.xz") && !line.contains("orig-"))
                .unwrap_or(stderr.trim());
            bail!(
                "apt-get source did not download {}: {why}",
                tarball.display()
            );
        }
        Ok(tarball)
    }
}

/// The Debian mirror the machine's apt sources use (the same host serves deb-src), e.g.
/// `http://deb.debian.org/debian`; read, never written.
fn debian_mirror() -> String {
    let mut files = vec![PathBuf::from("/etc/apt/sources.list")];
    if let Ok(entries) = fs::read_dir("/etc/apt/sources.list.d") {
        let mut parts: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
        parts.sort();
        files.extend(parts);
    }
    files
        .iter()
        .filter(|file| {
            let name = file.to_string_lossy();
            name.ends_with(".list") || name.ends_with(".sources")
        })
        .filter_map(|file| fs::read_to_string(file).ok())
        .find_map(|text| mirror_in(&text))
        .unwrap_or_else(|| DEFAULT_MIRROR.to_string())
}

/// The first URI of Debian's main archive (a path ending in `/debian`) in a sources file, in
/// either format (`deb URI suite...` lines, or deb822 `URIs:` fields).
fn mirror_in(text: &str) -> Option<String> {
    text.lines()
        .map(str::trim)
        .filter(|line| !line.starts_with('#'))
        .flat_map(|line| {
            let uris = match line.strip_prefix("URIs:") {
                Some(uris) => uris,
                None if line.starts_with("deb ") || line.starts_with("deb-src ") => line,
                None => "",
            };
            uris.split_whitespace()
                .map(str::to_string)
                .collect::<Vec<_>>()
        })
        .map(|word| word.trim_end_matches('/').to_string())
        .find(|word| word.contains("://") && word.ends_with("/debian"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_are_split_as_debian_spells_them() {
        assert_eq!(major_of("20.19.2+dfsg-1+deb13u3"), Some(20));
        assert_eq!(major_of("1:22.1.0-1"), Some(22));
        assert_eq!(major_of("garbage"), None);
        assert_eq!(upstream_of("20.19.2+dfsg-1+deb13u3"), "20.19.2+dfsg");
        assert_eq!(
            upstream_of("22.22.2+dfsg+~cs22.19.15-3"),
            "22.22.2+dfsg+~cs22.19.15"
        );
        assert_eq!(upstream_of("1:18.0.0"), "18.0.0");
    }

    #[test]
    fn the_mirror_is_read_from_either_sources_format() {
        let deb822 = "Types: deb\n# http://snapshot.debian.org/archive/debian/2025\n\
                      URIs: http://deb.debian.org/debian\nSuites: bookworm\n\n\
                      Types: deb\nURIs: http://deb.debian.org/debian-security\n";
        assert_eq!(
            mirror_in(deb822).as_deref(),
            Some("http://deb.debian.org/debian")
        );
        let one_line = "deb [arch=amd64] http://mirror.example/debian/ bookworm main\n";
        assert_eq!(
            mirror_in(one_line).as_deref(),
            Some("http://mirror.example/debian")
        );
        assert_eq!(
            mirror_in("deb https://packages.cloud.google.com/apt cloud-sdk main\n"),
            None
        );
    }
}
