//! The primary's output: its own events and its workers' output lines, with timestamps, as text
//! or as JSON lines (`--log-format`). Each line is written with one write call, so lines from
//! different workers never interleave mid-line.

use std::{
    io::Write,
    sync::atomic::{AtomicBool, Ordering},
    time::SystemTime,
};

use log::{Level, LevelFilter, Log, Metadata, Record};
use serde_json::{json, Value};

/// `--log-format`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Format {
    #[default]
    Text,
    Json,
}

impl std::str::FromStr for Format {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text {
            "text" => Ok(Format::Text),
            "json" => Ok(Format::Json),
            _ => Err(format!("unknown log format '{text}'; use text or json")),
        }
    }
}

static JSON: AtomicBool = AtomicBool::new(false);

fn json_mode() -> bool {
    JSON.load(Ordering::Relaxed)
}

/// Which of a worker's streams a line came from; it goes to the same stream of the primary.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stream {
    Stdout,
    Stderr,
}

impl Stream {
    fn name(self) -> &'static str {
        match self {
            Stream::Stdout => "stdout",
            Stream::Stderr => "stderr",
        }
    }
}

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
        let message = record.args().to_string();
        if json_mode() {
            let level = record.level().as_str().to_ascii_lowercase();
            write_json(Stream::Stderr, json!({"level": level, "msg": message}));
            return;
        }
        let level = match record.level() {
            Level::Error => "error: ",
            Level::Warn => "warning: ",
            Level::Info | Level::Debug | Level::Trace => "",
        };
        write_line(
            Stream::Stderr,
            &format!(
                "{} cluster-lb[{}]: {level}{message}",
                timestamp(),
                std::process::id()
            ),
        );
    }

    fn flush(&self) {}
}

/// Installs the logger; `CLUSTER_LB_LOG=debug|warn|error` changes how much it says.
pub fn init(format: Format) {
    JSON.store(format == Format::Json, Ordering::Relaxed);
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

/// One structured event of the primary: `fields` must hold "event"; `text` is its text form.
pub fn event(level: Level, text: &str, fields: Value) {
    if level > log::max_level() {
        return;
    }
    if json_mode() {
        let mut fields = fields;
        if let Some(object) = fields.as_object_mut() {
            object.insert("level".into(), json!(level.as_str().to_ascii_lowercase()));
        }
        write_json(Stream::Stderr, fields);
    } else {
        log::log!(level, "{text}");
    }
}

/// One line a worker printed, prefixed with who printed it.
pub fn worker_line(id: u32, pid: i32, stream: Stream, line: &str) {
    if json_mode() {
        write_json(
            stream,
            json!({"worker": id, "pid": pid, "stream": stream.name(), "line": line}),
        );
    } else {
        write_line(stream, &format!("[worker {id} pid {pid}] {line}"));
    }
}

fn write_json(stream: Stream, mut value: Value) {
    if let Some(object) = value.as_object_mut() {
        object.insert("ts".into(), json!(timestamp()));
    }
    write_line(stream, &value.to_string());
}

fn write_line(stream: Stream, line: &str) {
    let mut bytes = Vec::with_capacity(line.len() + 1);
    bytes.extend_from_slice(line.as_bytes());
    bytes.push(b'\n');
    // One write_all on a locked handle: whole lines, never interleaved.
    let _ = match stream {
        Stream::Stdout => std::io::stdout().lock().write_all(&bytes),
        Stream::Stderr => std::io::stderr().lock().write_all(&bytes),
    };
}

fn timestamp() -> String {
    humantime::format_rfc3339_millis(SystemTime::now()).to_string()
}
