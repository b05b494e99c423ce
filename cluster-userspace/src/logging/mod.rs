//! The primary's output: its own events and its workers' output lines, with timestamps, as text
//! or as JSON lines (`--log-format`). Each line is written with one write call, so lines from
//! different workers never interleave mid-line.
//!
//! Supervision never waits on output: lines go into a queue, bounded in lines and in bytes, that
//! one thread writes out. When whatever reads the primary's stdout or stderr stops reading, the
//! queue fills and further lines are dropped and counted; once output flows again, one line
//! says how many were lost.
//!
//! In text mode, control characters are escaped in every line the primary writes (as JSON mode
//! does), its own lines included: they quote what workers said (an address asked for, a field
//! name), so a worker cannot forge the primary's lines with newlines, carriage returns or
//! escape sequences.
//!
//! Every line is also kept in a bounded ring ([`ring`]) for `cluster-lb logs`, before and
//! whatever becomes of it on stdout and stderr.

pub mod file;
pub mod ring;

use std::{
    io::Write,
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        mpsc::{sync_channel, SyncSender},
        Arc, OnceLock,
    },
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
        let line = primary_line(record.level(), record.args().to_string());
        if json_mode() {
            let level = record.level().as_str().to_ascii_lowercase();
            write_json(Stream::Stderr, json!({"level": level, "msg": line.text}));
        } else {
            write_line(Stream::Stderr, &text_line(&line));
        }
        ring::ring().record(line);
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
/// Neither is made for a level that is not logged; the text always is (the ring keeps it for
/// `cluster-lb logs`), the JSON only in JSON mode (an event's fields can quote what a worker
/// sent).
pub fn event(level: Level, text: impl FnOnce() -> String, fields: impl FnOnce() -> Value) {
    if level > log::max_level() {
        return;
    }
    // The text form is what the ring keeps, whatever the format.
    let line = primary_line(level, text());
    if json_mode() {
        let mut fields = fields();
        if let Some(object) = fields.as_object_mut() {
            object.insert("level".into(), json!(level.as_str().to_ascii_lowercase()));
        }
        write_json(Stream::Stderr, fields);
    } else {
        write_line(Stream::Stderr, &text_line(&line));
    }
    ring::ring().record(line);
}

/// A line of the primary's own, as the ring keeps it.
fn primary_line(level: Level, message: String) -> ring::LogLine {
    ring::LogLine {
        time: timestamp(),
        source: ring::Origin::Event,
        worker: None,
        pid: i32::try_from(std::process::id()).unwrap_or(i32::MAX),
        level: Some(level.as_str().to_ascii_lowercase()),
        stream: ring::LineStream::Stderr,
        text: message,
    }
}

/// A line as the primary writes it in text mode (and `cluster-lb logs` prints it): the
/// primary's own with its time, pid and level, a worker's prefixed with who printed it, its
/// control characters escaped.
pub fn text_line(line: &ring::LogLine) -> String {
    let text = escape_controls(&line.text);
    match (line.source, line.worker) {
        (ring::Origin::Worker, Some(id)) => format!("[worker {id} pid {}] {text}", line.pid),
        (ring::Origin::Worker, None) => format!("[worker pid {}] {text}", line.pid),
        (ring::Origin::Primary, _) => format!("[primary pid {}] {text}", line.pid),
        (ring::Origin::Event, _) => {
            let level = match line.level.as_deref() {
                Some("error") => "error: ",
                Some("warn") => "warning: ",
                _ => "",
            };
            format!(
                "{} cluster-lb[{}]: {level}{text}",
                escape_controls(&line.time),
                line.pid
            )
        }
    }
}

/// Whose output a line is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    Worker(u32),
    /// The program's own primary process (a Node program's primary branch).
    Primary,
}

/// One line a worker (or the program's primary) printed: written as JSON in JSON mode, or with
/// who printed it in front, and kept in the ring.
pub fn worker_line(source: Source, pid: i32, stream: Stream, line: &str) {
    match (json_mode(), source) {
        (true, Source::Worker(id)) => write_json(
            stream,
            json!({"worker": id, "pid": pid, "stream": stream.name(), "line": line}),
        ),
        (true, Source::Primary) => write_json(
            stream,
            json!({"primary": true, "pid": pid, "stream": stream.name(), "line": line}),
        ),
        (false, _) => {}
    }
    let (origin, worker) = match source {
        Source::Worker(id) => (ring::Origin::Worker, Some(id)),
        Source::Primary => (ring::Origin::Primary, None),
    };
    let kept = ring::LogLine {
        time: timestamp(),
        source: origin,
        worker,
        pid,
        level: None,
        stream: stream.into(),
        text: line.to_string(),
    };
    if !json_mode() {
        write_line(stream, &text_line(&kept));
    }
    ring::ring().record(kept);
}

/// What a worker said, to quote in a line of the primary: cut to 200 characters (a worker
/// decides how long it is). Control characters are escaped when the line is written.
pub fn quote(text: &str) -> std::borrow::Cow<'_, str> {
    const LONGEST: usize = 200;
    match text.char_indices().nth(LONGEST) {
        None => text.into(),
        Some((cut, _)) => format!("{}... ({} bytes)", &text[..cut], text.len()).into(),
    }
}

/// Control characters (C0 but tab, DEL, C1) as `\xNN`, the rest as is.
pub fn escape_controls(line: &str) -> std::borrow::Cow<'_, str> {
    let is_control = |c: char| (c.is_control() && c != '\t') || ('\u{80}'..='\u{9f}').contains(&c);
    if !line.chars().any(is_control) {
        return line.into();
    }
    let mut escaped = String::with_capacity(line.len() + 8);
    for c in line.chars() {
        if is_control(c) {
            escaped.push_str(&format!("\\x{:02x}", c as u32));
        } else {
            escaped.push(c);
        }
    }
    escaped.into()
}

fn write_json(stream: Stream, mut value: Value) {
    if let Some(object) = value.as_object_mut() {
        object.insert("ts".into(), json!(timestamp()));
    }
    write_line(stream, &value.to_string());
}

/// Lines waiting for the output thread; more are dropped.
const QUEUE: usize = 8192;
/// Bytes waiting for the output thread; more are dropped (lines of up to a megabyte would
/// otherwise let the queue hold gigabytes).
pub const QUEUE_BYTES: usize = 16 * 1024 * 1024;

struct Output {
    queue: SyncSender<(Stream, Vec<u8>)>,
    /// Lines queued and not yet written.
    pending: Arc<AtomicUsize>,
    /// Their bytes.
    pending_bytes: Arc<AtomicUsize>,
}

static OUTPUT: OnceLock<Option<Output>> = OnceLock::new();
static DROPPED: AtomicUsize = AtomicUsize::new(0);

fn output() -> Option<&'static Output> {
    OUTPUT
        .get_or_init(|| {
            let (queue, lines) = sync_channel::<(Stream, Vec<u8>)>(QUEUE);
            let pending = Arc::new(AtomicUsize::new(0));
            let pending_bytes = Arc::new(AtomicUsize::new(0));
            let written = Arc::clone(&pending);
            let written_bytes = Arc::clone(&pending_bytes);
            std::thread::Builder::new()
                .name("cluster-lb output".into())
                .spawn(move || {
                    for (stream, bytes) in lines {
                        write_now(stream, &bytes);
                        written_bytes.fetch_sub(bytes.len(), Ordering::Relaxed);
                        let dropped = DROPPED.swap(0, Ordering::Relaxed);
                        if dropped > 0 {
                            let note = dropped_note(dropped);
                            write_now(Stream::Stderr, note.as_bytes());
                        }
                        written.fetch_sub(1, Ordering::Relaxed);
                    }
                })
                .ok()
                .map(|_| Output {
                    queue,
                    pending,
                    pending_bytes,
                })
        })
        .as_ref()
}

fn dropped_note(dropped: usize) -> String {
    let text = format!("{dropped} lines of output were dropped: stdout or stderr was not read");
    let line = if json_mode() {
        json!({"level": "warn", "msg": text, "dropped": dropped, "ts": timestamp()}).to_string()
    } else {
        text_line(&primary_line(Level::Warn, text))
    };
    line + "\n"
}

fn write_line(stream: Stream, line: &str) {
    let mut bytes = Vec::with_capacity(line.len() + 1);
    bytes.extend_from_slice(line.as_bytes());
    bytes.push(b'\n');
    let Some(output) = output() else {
        write_now(stream, &bytes);
        return;
    };
    let size = bytes.len();
    let queued = output.pending_bytes.fetch_add(size, Ordering::Relaxed);
    output.pending.fetch_add(1, Ordering::Relaxed);
    if queued + size > QUEUE_BYTES || output.queue.try_send((stream, bytes)).is_err() {
        output.pending.fetch_sub(1, Ordering::Relaxed);
        output.pending_bytes.fetch_sub(size, Ordering::Relaxed);
        DROPPED.fetch_add(1, Ordering::Relaxed);
    }
}

/// One write_all on a locked handle: whole lines, never interleaved. With --log-file, to the
/// file.
fn write_now(stream: Stream, bytes: &[u8]) {
    if file::write(bytes) {
        return;
    }
    let _ = match stream {
        Stream::Stdout => std::io::stdout().lock().write_all(bytes),
        Stream::Stderr => std::io::stderr().lock().write_all(bytes),
    };
}

/// Waits (at most `limit`) until every queued line is written: before the process exits.
pub fn flush(limit: std::time::Duration) {
    let Some(output) = OUTPUT.get().and_then(Option::as_ref) else {
        return;
    };
    let deadline = std::time::Instant::now() + limit;
    while output.pending.load(Ordering::Relaxed) > 0 && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

fn timestamp() -> String {
    humantime::format_rfc3339_millis(SystemTime::now()).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_are_escaped_and_the_rest_kept() {
        assert_eq!(
            escape_controls("plain text\twith tab"),
            "plain text\twith tab"
        );
        assert_eq!(
            escape_controls("\u{1b}[31mred\r2026 cluster-lb[1]: fake"),
            "\\x1b[31mred\\x0d2026 cluster-lb[1]: fake"
        );
        assert_eq!(escape_controls("é ü \u{9b}"), "é ü \\x9b");
    }
}
