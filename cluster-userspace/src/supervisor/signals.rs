//! The signals a supervisor takes, when its `SignalPolicy` says it may, turned into inputs.

use tokio::signal::unix::{signal, Signal as Stream, SignalKind};

use super::config::SignalPolicy;

/// What a signal asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Request {
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
    /// CHLD: some child exited (only watched to reap orphans).
    Child,
}

pub struct Signals {
    streams: Vec<(Stream, Request)>,
}

impl Signals {
    /// Installs the handlers `policy` and `subreaper` call for. Before any child exists, so no
    /// exit goes unnoticed.
    pub fn new(policy: SignalPolicy, subreaper: bool) -> std::io::Result<Signals> {
        let mut wanted = Vec::new();
        if policy == SignalPolicy::Handle {
            wanted.extend([
                (SignalKind::terminate(), Request::Stop),
                (SignalKind::interrupt(), Request::Stop),
                (SignalKind::quit(), Request::StopNow),
                (SignalKind::hangup(), Request::Reload),
                (SignalKind::from_raw(libc::SIGTTIN), Request::More),
                (SignalKind::from_raw(libc::SIGTTOU), Request::Fewer),
            ]);
        }
        if subreaper {
            wanted.push((SignalKind::child(), Request::Child));
        }
        let streams = wanted
            .into_iter()
            .map(|(kind, request)| signal(kind).map(|stream| (stream, request)))
            .collect::<Result<_, _>>()?;
        Ok(Signals { streams })
    }

    /// The next signal; never resolves when none is watched.
    pub async fn next(&mut self) -> Request {
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
