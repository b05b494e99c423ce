//! What `top` reads about a worker from /proc: resident memory (statm) and CPU time (stat).
//! The parsers are pure, so they are tested on sample text; `read` does the file I/O.

use std::time::Duration;

use crate::sys::procfs::{page_size, resident_pages};

/// A process's memory and CPU time, as /proc showed them at one moment.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ProcSample {
    pub rss_bytes: u64,
    /// User plus system CPU time since the process started.
    pub cpu: Duration,
}

/// utime + stime in clock ticks, fields 14 and 15 of /proc/PID/stat. The command name (field 2)
/// is in parentheses and may itself hold spaces or parentheses, so fields are counted from the
/// last ')'.
pub fn cpu_ticks(stat: &str) -> Option<u64> {
    let after_name = &stat[stat.rfind(')')? + 1..];
    // After the name come field 3 (state), 4, ...: utime is field 14, at index 11 here.
    let mut fields = after_name.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

/// CPU use between two samples, in percent of one CPU (a busy process with two threads can
/// show 200, as top(1) does).
pub fn cpu_percent(before: Duration, after: Duration, elapsed: Duration) -> Option<f64> {
    if elapsed.is_zero() {
        return None;
    }
    let used = after.checked_sub(before)?;
    Some(100.0 * used.as_secs_f64() / elapsed.as_secs_f64())
}

/// Reads /proc/PID/statm and /proc/PID/stat; None when the process is gone (or in another pid
/// namespace).
pub fn read(pid: i32) -> Option<ProcSample> {
    let statm = std::fs::read_to_string(format!("/proc/{pid}/statm")).ok()?;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let pages = resident_pages(&statm)?;
    let ticks = cpu_ticks(&stat)?;
    Some(ProcSample {
        rss_bytes: pages * page_size(),
        cpu: Duration::from_secs_f64(ticks as f64 / clock_ticks_per_second() as f64),
    })
}

fn clock_ticks_per_second() -> u64 {
    nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .and_then(|ticks| u64::try_from(ticks).ok())
        .filter(|&ticks| ticks > 0)
        .unwrap_or(100)
}

#[cfg(test)]
mod tests {
    use super::*;

    // Taken from a real node worker (fields after stime trimmed for brevity do not matter).
    const STAT: &str = "4242 (node) S 4200 4242 4200 0 -1 4194560 9421 0 0 0 153 47 0 0 20 0 11 0 123456 1030000000 12000 18446744073709551615 1 1 0 0 0 0 0 4096 134234626 0 0 0 17 1 0 0 0 0 0\n";

    #[test]
    fn cpu_time_is_utime_plus_stime() {
        assert_eq!(cpu_ticks(STAT), Some(153 + 47));
    }

    #[test]
    fn a_command_name_with_spaces_and_parentheses_does_not_shift_the_fields() {
        let odd = STAT.replace("(node)", "(my (odd) server)");
        assert_eq!(cpu_ticks(&odd), Some(200));
    }

    #[test]
    fn truncated_or_garbled_stat_is_none() {
        assert_eq!(cpu_ticks("4242 (node) S 1 2 3"), None);
        assert_eq!(cpu_ticks("no parentheses at all"), None);
        assert_eq!(
            cpu_ticks("1 (x) S 0 0 0 0 0 0 0 0 0 0 ten 5 0"),
            None,
            "a non-number in utime"
        );
    }

    #[test]
    fn resident_pages_are_the_second_statm_field() {
        assert_eq!(resident_pages("262144 3075 1024 5 0 4000 0\n"), Some(3075));
        assert_eq!(resident_pages("262144\n"), None);
        assert_eq!(resident_pages(""), None);
    }

    #[test]
    fn cpu_percent_is_of_one_cpu_over_the_elapsed_time() {
        let ms = Duration::from_millis;
        assert_eq!(cpu_percent(ms(1000), ms(1500), ms(1000)), Some(50.0));
        assert_eq!(cpu_percent(ms(0), ms(4000), ms(2000)), Some(200.0));
        assert_eq!(cpu_percent(ms(10), ms(10), ms(0)), None);
        // A pid reused by another process can show less CPU time than before.
        assert_eq!(cpu_percent(ms(500), ms(100), ms(1000)), None);
    }

    #[test]
    fn this_process_can_be_read() {
        let me = read(std::process::id() as i32).expect("/proc/self");
        assert!(me.rss_bytes > 0);
    }
}
