//! Draws one frame of `cluster-lb top`: a header about the cluster, a table with a row per
//! worker process, and a footer with the keys. Plain columns separated by spaces (no borders),
//! so the screen also reads well when captured as text.

use std::path::Path;

use ratatui::{
    layout::{Constraint, Layout},
    style::{Color, Modifier, Style},
    text::Line,
    widgets::{Paragraph, Row as TableRow, Table},
    Frame,
};

use super::rates::Row;
use crate::supervisor::{ClusterStatus, WorkerState};

/// What the screen shows: the last status and its rows, or why there is none.
pub enum Screen {
    /// Nothing fetched yet.
    Connecting,
    Live {
        status: ClusterStatus,
        rows: Vec<Row>,
    },
    /// The primary did not answer the last request; `error` is why, in one line.
    Unreachable { error: String },
}

const COLUMNS: [(&str, u16); 10] = [
    ("WORKER", 6),
    ("PID", 8),
    ("STATE", 9),
    ("CONN/S", 9),
    ("CONNS", 10),
    ("QUEUE", 9),
    ("RESTARTS", 8),
    ("RSS", 9),
    ("CPU%", 6),
    ("UPTIME", 9),
];

pub fn draw(frame: &mut Frame, screen: &Screen, control: &Path) {
    let [header, table, footer] = Layout::vertical([
        Constraint::Length(2),
        Constraint::Min(1),
        Constraint::Length(1),
    ])
    .areas(frame.area());
    frame.render_widget(Paragraph::new(header_lines(screen, control)), header);
    let rows = match screen {
        Screen::Live { rows, .. } => rows.as_slice(),
        _ => &[],
    };
    frame.render_widget(worker_table(rows), table);
    frame.render_widget(
        Paragraph::new(format!(
            "q quit · refreshed every second · control {}",
            control.display()
        ))
        .style(Style::default().fg(Color::DarkGray)),
        footer,
    );
}

fn header_lines(screen: &Screen, control: &Path) -> Vec<Line<'static>> {
    match screen {
        Screen::Connecting => vec![Line::from(format!(
            "cluster-lb top: asking {} ...",
            control.display()
        ))],
        Screen::Unreachable { error } => vec![
            Line::styled(
                "cluster unreachable: retrying every second",
                Style::default().fg(Color::Red).add_modifier(Modifier::BOLD),
            ),
            Line::styled(error.clone(), Style::default().fg(Color::Red)),
        ],
        Screen::Live { status, .. } => {
            let ready = status
                .workers
                .iter()
                .filter(|w| w.state == WorkerState::Ready)
                .count();
            let listen = if status.listen.is_empty() {
                "-".to_string()
            } else {
                status.listen.join(", ")
            };
            vec![
                Line::styled(
                    format!(
                        "cluster-lb {}pid {} · strategy {} · listening on {}",
                        status
                            .name
                            .as_ref()
                            .map(|name| format!("{name} · "))
                            .unwrap_or_default(),
                        status.primary_pid,
                        status.strategy,
                        listen
                    ),
                    Style::default().add_modifier(Modifier::BOLD),
                ),
                Line::from(format!(
                    "workers: {ready} ready of {} wanted · {} reloads{}",
                    status.desired,
                    status.reloads,
                    if status.reloading {
                        " · reloading"
                    } else {
                        ""
                    }
                )),
            ]
        }
    }
}

fn worker_table(rows: &[Row]) -> Table<'static> {
    let header = TableRow::new(COLUMNS.map(|(name, _)| name))
        .style(Style::default().add_modifier(Modifier::REVERSED));
    let body = rows.iter().map(|row| {
        let style = match row.state {
            WorkerState::Ready => Style::default(),
            WorkerState::Starting | WorkerState::Online => Style::default().fg(Color::Yellow),
            WorkerState::Draining | WorkerState::Killed => Style::default().fg(Color::Red),
        };
        TableRow::new(cells(row)).style(style)
    });
    Table::new(body, COLUMNS.map(|(_, width)| Constraint::Length(width)))
        .header(header)
        .column_spacing(1)
}

/// A row's cells as text, in COLUMNS order.
pub fn cells(row: &Row) -> [String; 10] {
    [
        row.id.to_string(),
        row.pid.to_string(),
        row.state.to_string(),
        row.conns_per_s
            .map_or("-".into(), |rate| format!("{rate:.1}")),
        row.selected.to_string(),
        if row.stalled {
            format!("{}!", row.queue)
        } else {
            row.queue.to_string()
        },
        row.restarts.to_string(),
        mebibytes(row.rss_bytes),
        row.cpu_percent
            .map_or("-".into(), |percent| format!("{percent:.1}")),
        duration(row.uptime_s),
    ]
}

fn mebibytes(bytes: u64) -> String {
    format!("{:.1}M", bytes as f64 / (1024.0 * 1024.0))
}

/// Uptime the way ps does it: seconds, then minutes and seconds, then hours and minutes.
fn duration(seconds: f64) -> String {
    let s = seconds.max(0.0) as u64;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cells_show_missing_rates_as_a_dash() {
        let row = Row {
            id: 3,
            pid: 4242,
            state: WorkerState::Draining,
            conns_per_s: None,
            selected: 12,
            queue: 7,
            stalled: true,
            restarts: 2,
            rss_bytes: 3 * 1024 * 1024 / 2,
            cpu_percent: Some(12.345),
            uptime_s: 3725.0,
        };
        assert_eq!(
            cells(&row),
            ["3", "4242", "draining", "-", "12", "7!", "2", "1.5M", "12.3", "1h02m"]
        );
    }

    #[test]
    fn uptime_is_compact() {
        assert_eq!(duration(0.4), "0s");
        assert_eq!(duration(59.9), "59s");
        assert_eq!(duration(61.0), "1m01s");
        assert_eq!(duration(-1.0), "0s");
    }
}
