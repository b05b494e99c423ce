//! Totals of libtest's "test result: ok. 3 passed; 0 failed; 1 ignored; ..." lines, for the
//! host suite and for the console of each VM, and of the privileged tests that skipped.

/// How tests/support's root_test reports a test it skipped (no root): "SKIPPED NAME: why", written
/// straight to stderr, past libtest's capture. libtest counts such a test as passed.
const SKIP_PREFIX: &str = "SKIPPED ";

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TestCounts {
    pub passed: u64,
    pub failed: u64,
    pub ignored: u64,
    /// Tests that reported a skip on stderr; also counted in `passed`, by libtest.
    pub skipped: u64,
}

impl TestCounts {
    /// Counts `line` of the tests' stderr when it is a skip report.
    pub fn add_stderr_line(&mut self, line: &str) {
        if line.starts_with(SKIP_PREFIX) {
            self.skipped += 1;
        }
    }

    /// "N passed, M failed, K skipped": a skipped test counts as skipped, not passed.
    pub fn summary(&self) -> String {
        format!(
            "{} passed, {} failed, {} skipped",
            self.passed.saturating_sub(self.skipped),
            self.failed,
            self.ignored + self.skipped
        )
    }

    /// Adds the counts of `line` when it is a "test result:" line; ignores any other line.
    pub fn add_line(&mut self, line: &str) {
        let Some(counts) = line.strip_prefix("test result: ") else {
            return;
        };
        for part in counts.split(';') {
            let mut words = part.split_whitespace().rev();
            let (Some(kind), Some(number)) = (words.next(), words.next()) else {
                continue;
            };
            let number: u64 = number.parse().unwrap_or(0);
            match kind {
                "passed" => self.passed += number,
                "failed" => self.failed += number,
                "ignored" => self.ignored += number,
                _ => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn result_lines_are_summed_and_other_lines_ignored() {
        let mut counts = TestCounts::default();
        counts.add_line("test result: ok. 4 passed; 0 failed; 2 ignored; 0 measured; 0 filtered out; finished in 1s");
        counts.add_line(
            "test result: FAILED. 1 passed; 1 failed; 0 ignored; 0 measured; 3 filtered out",
        );
        counts.add_line("test a ... ok");
        assert_eq!(
            counts,
            TestCounts {
                passed: 5,
                failed: 1,
                ignored: 2,
                skipped: 0
            }
        );
    }

    #[test]
    fn a_skipped_privileged_test_counts_as_skipped_not_passed() {
        let mut counts = TestCounts::default();
        counts.add_line("test result: ok. 4 passed; 0 failed; 1 ignored; 0 measured; 0 filtered out; finished in 0.01s");
        counts
            .add_stderr_line("SKIPPED round_robin_rust: needs root (network namespaces and eBPF)");
        counts.add_stderr_line("SKIPPED hash_spread: needs root (network namespaces and eBPF)");
        counts.add_stderr_line("   Compiling cluster-lb v0.1.0 (SKIPPED in a path)");
        counts.add_stderr_line("     Running tests/balance.rs (target/debug/deps/balance-0123)");
        assert_eq!(counts.summary(), "2 passed, 0 failed, 3 skipped");
    }
}
