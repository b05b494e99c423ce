//! The version this binary reports (`--version`, `status`, metrics, and the handover of an
//! in-place upgrade).
//!
//! It is the package version, plus `+TAG` when the binary carries a build tag. The tag lives in
//! a fixed-size static behind a marker, so a packager (or the upgrade test, which needs a second
//! build that differs only in its version) can stamp a copy of the binary without rebuilding
//! it: find the marker and write the tag, NUL-padded, into the bytes after it.

/// Length of the marker `CLUSTER_LB_BUILD_TAG=` in front of the tag. The marker is spelled out
/// whole only in the static below, so that it occurs once in the binary.
const MARKER_LEN: usize = 21;
/// Room for the tag after the marker (NUL-padded).
pub const BUILD_TAG_LEN: usize = 32;

#[used]
static BUILD_TAG: [u8; MARKER_LEN + BUILD_TAG_LEN] =
    *b"CLUSTER_LB_BUILD_TAG=\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0";

/// The stamped tag, if any.
pub fn build_tag() -> Option<String> {
    // Read through a volatile load: the compiler would otherwise fold the all-NUL initializer
    // into every use, and a stamped binary would still say it has no tag.
    // SAFETY: BUILD_TAG is a plain static array, always initialized and never written.
    let bytes: [u8; MARKER_LEN + BUILD_TAG_LEN] = unsafe { std::ptr::read_volatile(&BUILD_TAG) };
    let tag = &bytes[MARKER_LEN..];
    let end = tag.iter().position(|&b| b == 0).unwrap_or(tag.len());
    let tag = std::str::from_utf8(&tag[..end]).ok()?;
    (!tag.is_empty()).then(|| tag.to_string())
}

/// `0.1.0`, or `0.1.0+TAG` for a stamped binary.
pub fn version() -> &'static str {
    static VERSION: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    VERSION.get_or_init(|| match build_tag() {
        Some(tag) => format!("{}+{tag}", env!("CARGO_PKG_VERSION")),
        None => env!("CARGO_PKG_VERSION").to_string(),
    })
}

/// Writes `tag` into `binary` (the bytes of a cluster-lb executable). Fails when the binary
/// has no marker, or the tag is too long or not plain ASCII.
pub fn stamp(binary: &mut [u8], tag: &str) -> Result<(), String> {
    if tag.len() > BUILD_TAG_LEN || !tag.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(format!(
            "a build tag is 1 to {BUILD_TAG_LEN} printable ASCII characters"
        ));
    }
    // Built from two pieces, so this function does not carry a second copy of the marker.
    let marker = [b"CLUSTER_LB_".as_slice(), b"BUILD_TAG="].concat();
    let at = binary
        .windows(MARKER_LEN)
        .position(|w| w == marker.as_slice())
        .ok_or("no build tag marker in the binary")?
        + MARKER_LEN;
    let room = binary
        .get_mut(at..at + BUILD_TAG_LEN)
        .ok_or("the build tag marker is at the end of the binary")?;
    room.fill(0);
    room[..tag.len()].copy_from_slice(tag.as_bytes());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unstamped_binary_reports_the_package_version() {
        assert_eq!(version(), env!("CARGO_PKG_VERSION"));
    }

    #[test]
    fn stamping_writes_the_tag_after_the_marker() {
        let mut binary = b"xxCLUSTER_LB_BUILD_TAG=".to_vec();
        binary.extend([0u8; BUILD_TAG_LEN]);
        binary.extend(b"yy");
        stamp(&mut binary, "next").unwrap();
        assert!(binary.ends_with(b"yy"));
        let tag = &binary[23..23 + 4];
        assert_eq!(tag, b"next");
        assert!(stamp(&mut binary, "has space").is_err());
        assert!(stamp(&mut b"no marker".to_vec(), "x").is_err());
    }
}
