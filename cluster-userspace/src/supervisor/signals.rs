//! The signals a supervisor takes, when its `SignalPolicy` says it may, turned into inputs.

use tokio::signal::unix::{signal, Signal as Stream, SignalKind};

/// Who handles the process's signals.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SignalPolicy {
    /// The supervisor installs handlers: TERM and INT stop gracefully (a second one at once),
    /// QUIT stops at once, HUP reloads, TTIN and TTOU add or remove a worker.
    Handle,
    /// The supervisor touches no signal; the embedder drives it through its `Handle`.
    Leave,
}

/// What a signal asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Signalled {
    /// TERM, INT: graceful stop (a second one: at once).
    Stop,
    /// QUIT: stop at once.
    StopNow,
    /// HUP: rolling reload.
    Reload,
    /// TTIN: one worker more.
    More,
    /// TTOU: one worker fewer.
    Fewer,
    /// USR2: upgrade in place (re-execute the binary at its path, keeping pid and workers).
    Upgrade,
    /// CHLD: some child exited (only watched to reap orphans).
    Child,
}

/// The signals blocked across the exec of an upgrade: after exec every handler is gone, and
/// one of these arriving before the new binary installs its own would kill the primary (TERM,
/// USR2) or be lost (CHLD). Blocked, they stay pending until [`unblock_after_upgrade`].
const HELD_ACROSS_EXEC: [libc::c_int; 8] = [
    libc::SIGTERM,
    libc::SIGINT,
    libc::SIGQUIT,
    libc::SIGHUP,
    libc::SIGTTIN,
    libc::SIGTTOU,
    libc::SIGUSR2,
    libc::SIGCHLD,
];

fn held_set() -> nix::sys::signal::SigSet {
    let mut set = nix::sys::signal::SigSet::empty();
    for signal in HELD_ACROSS_EXEC {
        if let Ok(signal) = nix::sys::signal::Signal::try_from(signal) {
            set.add(signal);
        }
    }
    set
}

/// Blocks the signals that must wait for the new binary's handlers (see [`HELD_ACROSS_EXEC`]).
pub fn block_for_upgrade() {
    let _ = held_set().thread_block();
}

/// Undoes [`block_for_upgrade`]: after a failed exec, or in the new binary once its handlers
/// are installed (pending signals are delivered to them then).
pub fn unblock_after_upgrade() {
    let _ = held_set().thread_unblock();
}

pub struct Signals {
    streams: Vec<(Stream, Signalled)>,
}

impl Signals {
    /// Installs the handlers `policy` and `subreaper` call for. Before any child exists, so no
    /// exit goes unnoticed.
    pub fn new(policy: SignalPolicy, subreaper: bool) -> std::io::Result<Signals> {
        let mut wanted = Vec::new();
        if policy == SignalPolicy::Handle {
            wanted.extend([
                (SignalKind::terminate(), Signalled::Stop),
                (SignalKind::interrupt(), Signalled::Stop),
                (SignalKind::quit(), Signalled::StopNow),
                (SignalKind::hangup(), Signalled::Reload),
                (SignalKind::from_raw(libc::SIGTTIN), Signalled::More),
                (SignalKind::from_raw(libc::SIGTTOU), Signalled::Fewer),
                (SignalKind::user_defined2(), Signalled::Upgrade),
            ]);
        }
        if subreaper {
            wanted.push((SignalKind::child(), Signalled::Child));
        }
        let streams = wanted
            .into_iter()
            .map(|(kind, request)| signal(kind).map(|stream| (stream, request)))
            .collect::<Result<_, _>>()?;
        Ok(Signals { streams })
    }

    /// The next signal; never resolves when none is watched.
    pub async fn next(&mut self) -> Signalled {
        std::future::poll_fn(|cx| {
            for (stream, request) in &mut self.streams {
                if stream.poll_recv(cx).is_ready() {
                    return std::task::Poll::Ready(*request);
                }
            }
            std::task::Poll::Pending
        })
        .await
    }
}
