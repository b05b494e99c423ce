//! Why the program could not be used, in words a user can act on.

use std::{fmt, io};

/// The reason eBPF balancing is unavailable; `Display` is one line.
#[derive(Debug)]
pub struct Unavailable {
    /// What the user can do about it, when we can tell.
    hint: Option<&'static str>,
    cause: anyhow::Error,
}

impl Unavailable {
    pub(super) fn other(cause: anyhow::Error) -> Self {
        Unavailable { hint: None, cause }
    }

    /// Recognises the errors with a known remedy: missing privileges and old kernels. The
    /// verifier's log, which can run to thousands of lines, goes to the debug log only.
    pub(super) fn classify(cause: anyhow::Error) -> Self {
        log::debug!("eBPF load failed: {cause:#}");
        let errno = cause
            .chain()
            .find_map(|e| e.downcast_ref::<io::Error>())
            .and_then(io::Error::raw_os_error);
        let old_kernel = super::kernel_release().is_some_and(|v| v < MIN_KERNEL);
        let hint = match errno {
            Some(libc::EPERM) | Some(libc::EACCES) => Some(NEEDS_PRIVILEGE),
            _ if old_kernel => Some("Linux 5.14 or later is needed for sk_reuseport migration"),
            Some(libc::EINVAL) | Some(libc::E2BIG) => {
                Some("the kernel rejected the program; CLUSTER_LB_LOG=debug shows the verifier log")
            }
            _ => None,
        };
        Unavailable { hint, cause }
    }

    /// True when the cause is missing privileges (so a test can tell it from other failures).
    pub fn is_permission(&self) -> bool {
        self.hint == Some(NEEDS_PRIVILEGE)
    }
}

const NEEDS_PRIVILEGE: &str = "needs root, or CAP_BPF, CAP_PERFMON and CAP_NET_ADMIN";
/// SELECT_OR_MIGRATE and `migrating_sk` arrived in 5.14.
const MIN_KERNEL: (u32, u32) = (5, 14);

impl fmt::Display for Unavailable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The cause chain on one line, each cause cut before any multi-line detail (aya appends
        // the verifier log to its message).
        let causes: Vec<String> = self
            .cause
            .chain()
            .map(|c| first_line(&c.to_string()))
            .collect();
        write!(f, "{}", causes.join(": "))?;
        if let Some(hint) = self.hint {
            write!(f, " ({hint})")?;
        }
        Ok(())
    }
}

impl std::error::Error for Unavailable {}

fn first_line(text: &str) -> String {
    let line = text.lines().next().unwrap_or("");
    line.split(". Verifier output")
        .next()
        .unwrap_or(line)
        .trim()
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verifier_logs_stay_out_of_the_one_line_reason() {
        let io = io::Error::from_raw_os_error(libc::EINVAL);
        let cause = anyhow::Error::new(io)
            .context("the BPF_PROG_LOAD syscall returned Invalid argument. Verifier output: 0: R1=ctx()\n1: ...")
            .context("verifying the sk_reuseport program");
        let text = Unavailable::classify(cause).to_string();
        assert!(!text.contains('\n'), "{text}");
        assert!(!text.contains("R1=ctx"), "{text}");
        assert!(
            text.starts_with("verifying the sk_reuseport program: the BPF_PROG_LOAD"),
            "{text}"
        );
    }

    #[test]
    fn missing_privileges_are_named() {
        let cause =
            anyhow::Error::new(io::Error::from_raw_os_error(libc::EPERM)).context("creating map");
        let reason = Unavailable::classify(cause);
        assert!(reason.is_permission());
        assert!(reason
            .to_string()
            .ends_with("(needs root, or CAP_BPF, CAP_PERFMON and CAP_NET_ADMIN)"));
    }
}
