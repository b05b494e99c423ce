//! The primary's log: one line per event on stderr, prefixed so it stands out among the
//! workers' own output, which shares the terminal.

use log::{Level, LevelFilter, Log, Metadata, Record};

struct PrimaryLog;

static LOGGER: PrimaryLog = PrimaryLog;

impl Log for PrimaryLog {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &Record<'_>) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let level = match record.level() {
            Level::Error => "error: ",
            Level::Warn => "warning: ",
            Level::Info | Level::Debug | Level::Trace => "",
        };
        // One write per line, so lines from concurrent writers never interleave mid-line.
        let line = format!(
            "cluster-lb[{}]: {level}{}\n",
            std::process::id(),
            record.args()
        );
        let _ = std::io::Write::write_all(&mut std::io::stderr().lock(), line.as_bytes());
    }

    fn flush(&self) {}
}

/// Installs the logger; `CLUSTER_LB_LOG=debug` shows more.
pub fn init() {
    let level = match std::env::var("CLUSTER_LB_LOG").as_deref() {
        Ok("debug") => LevelFilter::Debug,
        Ok("warn") => LevelFilter::Warn,
        Ok("error") => LevelFilter::Error,
        _ => LevelFilter::Info,
    };
    if log::set_logger(&LOGGER).is_ok() {
        log::set_max_level(level);
    }
}
