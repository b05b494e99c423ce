//! The recent lines of the primary's log, kept in memory for `cluster-lb logs`: its own lines
//! (events, warnings) and every line its workers and the program's primary printed, whatever
//! became of them on the primary's stdout and stderr (a terminal, the journal, a container's
//! log, /dev/null or a pipe nobody reads).
//!
//! The ring is bounded in lines and in bytes ([`MOST_LINES`], [`MOST_BYTES`]): the oldest
//! lines leave first. Each line has a sequence number, so a follower (`logs -f`) needs no
//! queue of its own: it keeps the number of the next line it wants and takes what the ring
//! still holds from there. One that does not keep up finds its next line gone and is told how
//! many went by unseen; it can never make the primary hold more than the ring.

use std::{
    collections::VecDeque,
    sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError},
};

use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::Stream;

/// The most lines the ring keeps.
pub const MOST_LINES: usize = 1000;
/// The most bytes of text (plus [`OVERHEAD`] per line) the ring keeps: 4 MiB.
pub const MOST_BYTES: usize = 4 * 1024 * 1024;
/// The longest text a line keeps (a worker's longest line; the primary's own lines can quote
/// a message of up to 64 MiB): the rest is cut, and the line says how long it was.
pub const LONGEST_LINE: usize = 16 * 1024;
/// What a line costs beyond its text (its fields, its place in the ring), for the byte bound.
const OVERHEAD: usize = 96;

/// Who wrote a line.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Origin {
    /// cluster-lb's primary itself: an event, a warning.
    Event,
    /// A worker's stdout or stderr.
    Worker,
    /// The program's own primary process (a Node program's primary branch).
    Primary,
}

/// One line of the log, as `cluster-lb logs --json` prints it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogLine {
    /// When the primary got it (RFC 3339, milliseconds, UTC).
    pub time: String,
    pub source: Origin,
    /// The worker id, for a worker's line.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worker: Option<u32>,
    /// The process that wrote it (the primary's own pid for an event).
    pub pid: i32,
    /// For an event: error, warn, info or debug.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub level: Option<String>,
    pub stream: LineStream,
    /// The line as written, without its newline; control characters are escaped only when
    /// it is printed as text.
    pub text: String,
}

/// [`Stream`], as it is named in JSON.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LineStream {
    Stdout,
    Stderr,
}

impl From<Stream> for LineStream {
    fn from(stream: Stream) -> LineStream {
        match stream {
            Stream::Stdout => LineStream::Stdout,
            Stream::Stderr => LineStream::Stderr,
        }
    }
}

impl LogLine {
    fn cost(&self) -> usize {
        self.text.len() + self.time.len() + OVERHEAD
    }

    /// Whether the line passes `--worker` (`None`: every line).
    pub fn matches(&self, worker: Option<u32>) -> bool {
        worker.is_none_or(|id| self.source == Origin::Worker && self.worker == Some(id))
    }
}

/// What a reader gets from [`Ring::since`].
#[derive(Debug, Default)]
pub struct Batch {
    /// Lines that left the ring before this reader took them.
    pub dropped: u64,
    /// The lines, oldest first.
    pub lines: Vec<Arc<LogLine>>,
    /// The sequence number to ask for next.
    pub next: u64,
}

struct Inner {
    lines: VecDeque<Arc<LogLine>>,
    bytes: usize,
    /// The sequence number the next line recorded gets.
    next: u64,
    most_lines: usize,
    most_bytes: usize,
    closed: bool,
}

impl Inner {
    fn first(&self) -> u64 {
        self.next - self.lines.len() as u64
    }
}

pub struct Ring {
    inner: Mutex<Inner>,
    /// The sequence number of the next line, sent after each line (and on close).
    latest: watch::Sender<u64>,
}

impl Ring {
    pub fn new(most_lines: usize, most_bytes: usize) -> Ring {
        Ring {
            inner: Mutex::new(Inner {
                lines: VecDeque::new(),
                bytes: 0,
                next: 0,
                most_lines: most_lines.max(1),
                most_bytes,
                closed: false,
            }),
            latest: watch::Sender::new(0),
        }
    }

    fn inner(&self) -> MutexGuard<'_, Inner> {
        // Nothing panics while holding it; the ring stays consistent if something did.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Keeps `line` (cut to [`LONGEST_LINE`]), and lets the oldest lines go past either bound
    /// (the newest line always stays).
    pub fn record(&self, mut line: LogLine) {
        if line.text.len() > LONGEST_LINE {
            let mut cut = LONGEST_LINE;
            while !line.text.is_char_boundary(cut) {
                cut -= 1;
            }
            let length = line.text.len();
            line.text.truncate(cut);
            line.text.push_str(&format!("... ({length} bytes)"));
        }
        let next = {
            let mut inner = self.inner();
            inner.bytes += line.cost();
            inner.lines.push_back(Arc::new(line));
            inner.next += 1;
            while inner.lines.len() > 1
                && (inner.lines.len() > inner.most_lines || inner.bytes > inner.most_bytes)
            {
                if let Some(old) = inner.lines.pop_front() {
                    inner.bytes -= old.cost();
                }
            }
            inner.next
        };
        self.latest.send_replace(next);
    }

    /// Where the last `count` lines that pass `worker` begin (a sequence number), and where
    /// the ring ends now: a reader takes them with [`Ring::since`], in batches, so that it
    /// never holds more than one batch however many it asked for.
    pub fn last(&self, count: usize, worker: Option<u32>) -> (u64, u64) {
        let inner = self.inner();
        let first = inner.first();
        let mut start = inner.next;
        let mut found = 0;
        for (at, line) in inner.lines.iter().enumerate().rev() {
            if found == count {
                break;
            }
            if line.matches(worker) {
                found += 1;
                start = first + at as u64;
            }
        }
        (start, inner.next)
    }

    /// The lines from sequence number `from` up to `until` (excluded) that pass `worker`: at
    /// most `most_lines` of them, and no more than `most_bytes` of text (but at least one
    /// line). Lines that left the ring before they were read are counted in `dropped`.
    pub fn since(&self, from: u64, until: u64, worker: Option<u32>, most: (usize, usize)) -> Batch {
        let (most_lines, most_bytes) = most;
        let inner = self.inner();
        let first = inner.first();
        let start = from.max(first).min(until.max(from));
        let mut batch = Batch {
            dropped: start - from,
            lines: Vec::new(),
            next: start,
        };
        let mut bytes = 0;
        let skip = usize::try_from(start.saturating_sub(first)).unwrap_or(usize::MAX);
        for line in inner.lines.iter().skip(skip) {
            if batch.next >= until
                || batch.lines.len() >= most_lines
                || (bytes >= most_bytes && !batch.lines.is_empty())
            {
                break;
            }
            batch.next += 1;
            if line.matches(worker) {
                bytes += line.text.len();
                batch.lines.push(Arc::clone(line));
            }
        }
        batch
    }

    /// Whether a worker id ever wrote a line that is still here.
    pub fn has_worker(&self, id: u32) -> bool {
        self.inner().lines.iter().any(|line| line.matches(Some(id)))
    }

    /// Told of every new line (and of the close).
    pub fn watch(&self) -> watch::Receiver<u64> {
        self.latest.subscribe()
    }

    /// No more lines will come: followers end once they have what is left.
    pub fn close(&self) {
        self.inner().closed = true;
        self.latest.send_modify(|_| {});
    }

    pub fn is_closed(&self) -> bool {
        self.inner().closed
    }

    /// Lines and bytes held now.
    pub fn held(&self) -> (usize, usize) {
        let inner = self.inner();
        (inner.lines.len(), inner.bytes)
    }
}

/// The primary's ring.
pub fn ring() -> &'static Ring {
    static RING: OnceLock<Ring> = OnceLock::new();
    RING.get_or_init(|| Ring::new(MOST_LINES, MOST_BYTES))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(worker: Option<u32>, text: &str) -> LogLine {
        LogLine {
            time: "2026-12-04T07:00:00.000Z".into(),
            source: if worker.is_some() {
                Origin::Worker
            } else {
                Origin::Event
            },
            worker,
            pid: 7,
            level: worker.is_none().then(|| "info".into()),
            stream: LineStream::Stdout,
            text: text.into(),
        }
    }

    fn texts(lines: &[Arc<LogLine>]) -> Vec<&str> {
        lines.iter().map(|l| l.text.as_str()).collect()
    }

    const ALL: (usize, usize) = (usize::MAX, usize::MAX);

    /// The last `count` lines that pass `worker`, as a plain `logs` gets them.
    fn last(ring: &Ring, count: usize, worker: Option<u32>) -> Vec<String> {
        let (from, until) = ring.last(count, worker);
        let batch = ring.since(from, until, worker, ALL);
        assert_eq!((batch.dropped, batch.next), (0, until));
        texts(&batch.lines)
            .into_iter()
            .map(str::to_string)
            .collect()
    }

    #[test]
    fn the_ring_keeps_the_newest_lines_up_to_its_line_bound() {
        let ring = Ring::new(3, usize::MAX);
        for n in 0..5 {
            ring.record(line(Some(0), &n.to_string()));
        }
        assert_eq!(ring.held().0, 3);
        assert_eq!(last(&ring, 10, None), ["2", "3", "4"]);
        assert_eq!(ring.last(10, None), (2, 5));
        assert_eq!(last(&ring, 2, None), ["3", "4"]);
        assert_eq!(ring.last(0, None), (5, 5));
        assert!(last(&ring, 0, None).is_empty());
    }

    #[test]
    fn the_ring_keeps_no_more_bytes_than_its_byte_bound() {
        let bound = 10 * 1024;
        let ring = Ring::new(1000, bound);
        for n in 0..100 {
            ring.record(line(Some(0), &format!("{n:04}{}", "x".repeat(1000))));
            assert!(ring.held().1 <= bound, "{:?}", ring.held());
        }
        let lines = last(&ring, 1000, None);
        assert!(lines.len() < 10 && lines.len() > 5, "{}", lines.len());
        assert!(lines.last().is_some_and(|l| l.starts_with("0099")));
        // A line larger than the bound is still kept, alone.
        ring.record(line(Some(0), &"y".repeat(bound + 100)));
        assert_eq!(ring.held().0, 1);
    }

    #[test]
    fn a_line_longer_than_the_longest_is_cut_and_says_how_long_it_was() {
        let ring = Ring::new(10, usize::MAX);
        let long = format!("{}é{}", "a".repeat(LONGEST_LINE - 1), "b".repeat(1 << 20));
        ring.record(line(None, &long));
        let kept = last(&ring, 1, None);
        let suffix = format!("... ({} bytes)", long.len());
        assert!(
            kept[0].ends_with(&suffix),
            "{}",
            &kept[0][LONGEST_LINE - 8..]
        );
        assert_eq!(kept[0].len(), LONGEST_LINE - 1 + suffix.len());
        assert!(ring.held().1 < LONGEST_LINE + 200);
    }

    #[test]
    fn a_filter_takes_one_workers_lines_only() {
        let ring = Ring::new(100, usize::MAX);
        ring.record(line(None, "event"));
        for n in 0..6 {
            ring.record(line(Some(n % 2), &format!("w{} {n}", n % 2)));
        }
        assert_eq!(last(&ring, 2, Some(1)), ["w1 3", "w1 5"]);
        assert_eq!(last(&ring, 1, None), ["w1 5"]);
        assert_eq!(last(&ring, 100, Some(0)), ["w0 0", "w0 2", "w0 4"]);
        assert!(last(&ring, 100, Some(2)).is_empty());
        assert!(ring.has_worker(0) && !ring.has_worker(2));
        let batch = ring.since(0, u64::MAX, Some(0), ALL);
        assert_eq!(texts(&batch.lines), ["w0 0", "w0 2", "w0 4"]);
        assert_eq!((batch.dropped, batch.next), (0, 7));
    }

    #[test]
    fn a_reader_that_fell_behind_is_told_how_many_lines_it_missed() {
        let ring = Ring::new(4, usize::MAX);
        let (from, _) = ring.last(0, None);
        for n in 0..10 {
            ring.record(line(Some(0), &n.to_string()));
        }
        let batch = ring.since(from, u64::MAX, None, (2, usize::MAX));
        assert_eq!(batch.dropped, 6);
        assert_eq!(texts(&batch.lines), ["6", "7"]);
        let rest = ring.since(batch.next, u64::MAX, None, ALL);
        assert_eq!(rest.dropped, 0);
        assert_eq!(texts(&rest.lines), ["8", "9"]);
        let none = ring.since(rest.next, u64::MAX, None, ALL);
        assert!(none.lines.is_empty() && none.dropped == 0 && none.next == 10);
        // A plain request ends where the ring ended when it came, however far it fell behind.
        let (from, until) = ring.last(2, None);
        for n in 10..20 {
            ring.record(line(Some(0), &n.to_string()));
        }
        let late = ring.since(from, until, None, ALL);
        assert_eq!((late.dropped, late.next), (2, until));
        assert!(late.lines.is_empty());
    }

    #[test]
    fn a_batch_is_bounded_in_bytes_but_holds_at_least_one_line() {
        let ring = Ring::new(100, usize::MAX);
        for _ in 0..10 {
            ring.record(line(Some(0), &"z".repeat(100)));
        }
        assert_eq!(ring.since(0, u64::MAX, None, (100, 250)).lines.len(), 3);
        assert_eq!(ring.since(0, u64::MAX, None, (100, 1)).lines.len(), 1);
        assert_eq!(ring.since(0, 4, None, ALL).lines.len(), 4);
    }

    #[test]
    fn a_line_has_the_documented_json_shape() {
        let text = serde_json::to_string(&line(Some(2), "hi")).unwrap();
        assert_eq!(
            text,
            r#"{"time":"2026-12-04T07:00:00.000Z","source":"worker","worker":2,"pid":7,"stream":"stdout","text":"hi"}"#
        );
        let event = serde_json::to_string(&line(None, "started")).unwrap();
        assert!(event.contains(r#""source":"event","pid":7,"level":"info""#));
    }
}
