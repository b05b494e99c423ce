//! Totals of libtest's "test result: ok. 3 passed; 0 failed; 1 ignored; ..." lines, for the
//! host suite and for the console of each VM.

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TestCounts {
    pub passed: u64,
    pub failed: u64,
    pub ignored: u64,
}

impl TestCounts {
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
                ignored: 2
            }
        );
    }
}
