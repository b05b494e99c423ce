//! Medians (with min and max) per contender and worker count, as a Markdown table and an SVG
//! chart.

use std::{
    fmt::Write as _,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context, Result};

use super::{
    contenders::{Contender, ALL},
    measure::{Sample, SHARE_CONNECTIONS},
};

pub struct Report {
    rows: Vec<Row>,
    header: String,
}

struct Row {
    name: String,
    workers: u32,
    columns: Vec<Spread>,
}

/// Median, min and max of one figure over the rounds.
#[derive(Clone, Copy)]
struct Spread {
    median: f64,
    min: f64,
    max: f64,
}

impl Spread {
    fn of(mut values: Vec<f64>) -> Option<Spread> {
        values.retain(|v| !v.is_nan());
        if values.is_empty() {
            return None;
        }
        values.sort_by(|a, b| a.total_cmp(b));
        let n = values.len();
        let median = if n % 2 == 1 {
            values[n / 2]
        } else {
            (values[n / 2 - 1] + values[n / 2]) / 2.0
        };
        Some(Spread {
            median,
            min: values[0],
            max: values[n - 1],
        })
    }

    fn show(this: Option<Spread>, decimals: usize) -> String {
        match this {
            None => "-".into(),
            Some(s) if s.min == s.max => format!("{:.*}", decimals, s.median),
            Some(s) => format!(
                "{:.*} ({:.*}–{:.*})",
                decimals, s.median, decimals, s.min, decimals, s.max
            ),
        }
    }
}

/// The median of `values` (NaN left out), None when there is none.
pub fn median(values: Vec<f64>) -> Option<f64> {
    Spread::of(values).map(|s| s.median)
}

/// "median (min–max)" of `values` with `decimals` decimals, "-" when there are none: a table
/// cell of every suite.
pub fn spread(values: Vec<f64>, decimals: usize) -> String {
    Spread::show(Spread::of(values), decimals)
}

const COLUMNS: [(&str, usize); 10] = [
    ("conn/s, Connection: close", 0),
    ("p50 ms (close)", 2),
    ("p99 ms (close)", 2),
    ("req/s, keep-alive", 0),
    ("p99 ms (keep-alive)", 2),
    ("max/min share", 2),
    ("Jain index", 4),
    ("primary CPU s", 2),
    ("eBPF ns/run", 0),
    ("errors", 0),
];

fn figures(sample: &Sample) -> [f64; 10] {
    [
        sample.conn_per_s,
        sample.close_p50_ms,
        sample.close_p99_ms,
        sample.req_per_s,
        sample.keepalive_p99_ms,
        sample.max_over_min,
        sample.jain,
        sample.primary_cpu_s.unwrap_or(f64::NAN),
        sample.bpf_ns_per_run.unwrap_or(f64::NAN),
        sample.errors,
    ]
}

impl Report {
    pub fn new(
        samples: &[(Contender, u32, Sample)],
        workers: &[u32],
        rounds: u32,
        seconds: u32,
        took: Duration,
    ) -> Report {
        let mut rows = Vec::new();
        for &count in workers {
            for contender in ALL {
                let mine: Vec<&Sample> = samples
                    .iter()
                    .filter(|(c, w, _)| *c == contender && *w == count)
                    .map(|(_, _, s)| s)
                    .collect();
                if mine.is_empty() {
                    continue;
                }
                let columns = (0..COLUMNS.len())
                    .map(|i| Spread::of(mine.iter().map(|s| figures(s)[i]).collect()))
                    .map(|s| {
                        s.unwrap_or(Spread {
                            median: f64::NAN,
                            min: f64::NAN,
                            max: f64::NAN,
                        })
                    })
                    .collect();
                rows.push(Row {
                    name: contender.name(),
                    workers: count,
                    columns,
                });
            }
        }
        let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
        let kernel = nix::sys::utsname::uname()
            .map(|u| u.release().to_string_lossy().into_owned())
            .unwrap_or_default();
        let header = format!(
            "{rounds} rounds per contender, interleaved; wrk -t2 -c64 for {seconds} s per load; share over {SHARE_CONNECTIONS} sequential connections; {cores} cores, Linux {kernel}; the whole run took {:.0} s. Cells: median (min–max).",
            took.as_secs_f64()
        );
        Report { rows, header }
    }

    pub fn table(&self) -> String {
        let mut out = format!("{}\n\n| contender | workers |", self.header);
        for (name, _) in COLUMNS {
            let _ = write!(out, " {name} |");
        }
        out.push_str("\n| --- | ---: |");
        out.push_str(&" ---: |".repeat(COLUMNS.len()));
        out.push('\n');
        for row in &self.rows {
            let _ = write!(out, "| {} | {} |", row.name, row.workers);
            for (spread, (_, decimals)) in row.columns.iter().zip(COLUMNS) {
                let cell = if spread.median.is_nan() {
                    None
                } else {
                    Some(*spread)
                };
                let _ = write!(out, " {} |", Spread::show(cell, decimals));
            }
            out.push('\n');
        }
        out
    }

    /// Writes <dir>/<date>.md (with `extra` sections after the table) and <date>.svg; returns
    /// the Markdown path.
    pub fn write(&self, dir: &Path, extra: &str) -> Result<PathBuf> {
        std::fs::create_dir_all(dir).context("creating bench/results")?;
        let date = humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string();
        let date = &date[..10];
        let svg = dir.join(format!("{date}.svg"));
        std::fs::write(&svg, self.svg()).context("writing the chart")?;
        let markdown = dir.join(format!("{date}.md"));
        let text = format!(
            "# cluster-lb benchmark, {date}\n\nMade by `cargo xtask bench`. All contenders serve examples/node/server.js (plus cluster-lb with the Rust example).\n\n![connections per second](./{date}.svg)\n\n{}\n{extra}",
            self.table()
        );
        std::fs::write(&markdown, text).context("writing the report")?;
        std::fs::write(
            dir.join("LATEST.md"),
            format!("Latest run: [{date}]({date}.md)\n"),
        )
        .context("writing LATEST.md")?;
        Ok(markdown)
    }

    /// Horizontal bars of conn/s (Connection: close), one per contender and worker count,
    /// with a min–max whisker.
    fn svg(&self) -> String {
        let bar = 18.0;
        let gap = 6.0;
        let label_width = 330.0;
        let plot_width = 520.0;
        let top = 40.0;
        let max = self
            .rows
            .iter()
            .map(|r| r.columns[0].max)
            .filter(|v| v.is_finite())
            .fold(1.0, f64::max);
        let height = top + self.rows.len() as f64 * (bar + gap) + 30.0;
        let mut out = format!(
            "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{}\" height=\"{height}\" font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n<text x=\"10\" y=\"22\" font-size=\"15\">New connections per second (Connection: close), median with min–max</text>\n",
            label_width + plot_width + 90.0
        );
        for (i, row) in self.rows.iter().enumerate() {
            let y = top + i as f64 * (bar + gap);
            let spread = row.columns[0];
            if !spread.median.is_finite() {
                continue;
            }
            let scale = |v: f64| label_width + v / max * plot_width;
            let colour = if row.name.starts_with("cluster-lb") {
                "#2b7bb9"
            } else {
                "#9a9a9a"
            };
            let _ = writeln!(
                out,
                "<text x=\"{}\" y=\"{}\" text-anchor=\"end\">{} ({} workers)</text>\n<rect x=\"{label_width}\" y=\"{y}\" width=\"{:.1}\" height=\"{bar}\" fill=\"{colour}\"/>\n<line x1=\"{:.1}\" x2=\"{:.1}\" y1=\"{:.1}\" y2=\"{:.1}\" stroke=\"black\"/>\n<text x=\"{:.1}\" y=\"{}\">{:.0}</text>",
                label_width - 8.0,
                y + bar - 5.0,
                row.name,
                row.workers,
                scale(spread.median) - label_width,
                scale(spread.min),
                scale(spread.max),
                y + bar / 2.0,
                y + bar / 2.0,
                scale(spread.max) + 6.0,
                y + bar - 5.0,
                spread.median
            );
        }
        out.push_str("</svg>\n");
        out
    }
}

/// Writes <dir>/<date>-<name>.md holding `text` (a suite run on its own); returns its path.
pub fn write_extra(dir: &Path, name: &str, text: &str) -> Result<PathBuf> {
    std::fs::create_dir_all(dir).context("creating bench/results")?;
    let date = humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string();
    let path = dir.join(format!("{}-{name}.md", &date[..10]));
    std::fs::write(
        &path,
        format!("# cluster-lb benchmark, {}\n\n{text}", &date[..10]),
    )
    .context("writing the report")?;
    Ok(path)
}
