//! `cluster-lb top`: a live view of every worker, refreshed every second from the primary's
//! control socket (state, new connections per second from the kernel counters, restarts, RSS,
//! CPU), for people who watch `pm2 monit` today.
//!
//! The terminal is put back (raw mode off, main screen) on every way out: a quit key, an
//! error, and a panic (ratatui's hook restores it before the message is printed).

mod procfs;
mod rates;
mod view;

use std::{
    io::IsTerminal,
    path::Path,
    time::{Duration, Instant},
};

use ratatui::{
    crossterm::event::{self, Event, KeyCode, KeyEventKind, KeyModifiers},
    DefaultTerminal,
};

use crate::app::control::{request, Reply, Request};
use rates::Sampler;
use view::Screen;

const REFRESH: Duration = Duration::from_secs(1);
/// Longer than a refresh, so a busy primary is not reported gone; short enough that the keys
/// still answer soon when it hangs.
const STATUS_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum TopError {
    #[error(
        "top draws on a terminal, and {0} is not one; for scripts use `cluster-lb status --json`"
    )]
    NotATerminal(&'static str),
    #[error("cannot use the terminal: {0}")]
    Terminal(#[from] std::io::Error),
}

pub fn run(control: &Path) -> Result<(), TopError> {
    if !std::io::stdout().is_terminal() {
        return Err(TopError::NotATerminal("standard output"));
    }
    if !std::io::stdin().is_terminal() {
        return Err(TopError::NotATerminal("standard input"));
    }
    let mut terminal = ratatui::try_init()?;
    let result = watch(&mut terminal, control);
    let restored = ratatui::try_restore();
    result?;
    restored?;
    Ok(())
}

/// Polls and draws until a quit key.
fn watch(terminal: &mut DefaultTerminal, control: &Path) -> std::io::Result<()> {
    let mut sampler = Sampler::default();
    let mut screen = Screen::Connecting;
    let mut next_poll = Instant::now();
    loop {
        if Instant::now() >= next_poll {
            screen = poll(control, &mut sampler);
            // From when this poll was due, so a slow answer does not make the refresh drift.
            next_poll += REFRESH;
            if next_poll < Instant::now() {
                next_poll = Instant::now() + REFRESH;
            }
        }
        terminal.draw(|frame| view::draw(frame, &screen, control))?;
        // Keys (and resizes, which the next draw picks up) until the next poll is due.
        let wait = next_poll.saturating_duration_since(Instant::now());
        if event::poll(wait)? {
            if let Event::Key(key) = event::read()? {
                let ctrl_c =
                    key.code == KeyCode::Char('c') && key.modifiers.contains(KeyModifiers::CONTROL);
                let quit = matches!(key.code, KeyCode::Char('q') | KeyCode::Esc) || ctrl_c;
                if key.kind == KeyEventKind::Press && quit {
                    return Ok(());
                }
            }
        }
    }
}

fn poll(control: &Path, sampler: &mut Sampler) -> Screen {
    match request(control, &Request::Status, STATUS_TIMEOUT) {
        Ok(Reply::Status { status }) => {
            let rows = sampler.rows(&status, Instant::now(), procfs::read);
            Screen::Live { status, rows }
        }
        Ok(other) => Screen::Unreachable {
            error: format!("unexpected answer from the primary: {other}"),
        },
        Err(error) => {
            // A cluster that comes back is new processes: no rate from the old samples.
            *sampler = Sampler::default();
            Screen::Unreachable {
                error: error.to_string(),
            }
        }
    }
}
