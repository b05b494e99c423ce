//! The supervisor's side of the program's primary: starting it, answering its requests through
//! the lifecycle, carrying its messages to its workers and telling it what they do.

use nix::{sys::signal::Signal, unistd::Pid};
use serde_json::Value;

use super::{ProgramPrimary, RpcLine, Said, Variants};
use crate::{
    logging::{Source, Stream},
    protocol::{
        budget::{Budget, Held},
        nodejs::{
            channel::NodeEvent,
            primary::{
                is_disconnect, is_own_reply, parse_from_primary, to_primary, Answer, FromPrimary,
                Request,
            },
        },
    },
    supervisor::workers::output::Forwarded,
    supervisor::{
        events::{Departure, ExitStatus},
        lifecycle::{ForkAnswer, Input},
        saved::SavedProgram,
        Supervisor,
    },
};

impl Supervisor {
    /// Starts the program's primary process; the lifecycle hears how it went.
    pub(in crate::supervisor) fn spawn_program_primary(&mut self) -> Input {
        let Some(preload) = self.program.preload.clone() else {
            return Input::PrimarySpawnFailed {
                error: "the workers are not Node programs (--node)".into(),
            };
        };
        let max = self.config.max_message;
        let budget = Budget::for_worker(max, &self.workers.shared_budget());
        match ProgramPrimary::start(
            &self.workers.launch,
            &preload,
            self.feeds.channels.clone(),
            self.feeds.requests.clone(),
            (budget, max),
        ) {
            Ok(process) => {
                let pid = process.pid;
                self.inbox.watch(pid);
                self.program.process = Some(process);
                Input::PrimarySpawned { pid }
            }
            Err(error) => Input::PrimarySpawnFailed {
                error: error.to_string(),
            },
        }
    }

    /// Takes over the program's primary an older binary ran (an upgrade).
    pub(in crate::supervisor) fn resume_program(&mut self, saved: &SavedProgram) {
        self.program.variants = Variants::restore(saved.variants.clone());
        let Some(primary) = &saved.process else {
            return;
        };
        let max = self.config.max_message;
        let budget = Budget::for_worker(max, &self.workers.shared_budget());
        let feeds = (self.feeds.channels.clone(), self.feeds.requests.clone());
        match ProgramPrimary::resume(primary, feeds, (budget, max)) {
            Ok(process) => {
                self.inbox.watch(process.pid);
                self.program.process = Some(process);
            }
            Err(e) => {
                // Its channels are gone: it cannot fork any more. It is stopped, and the
                // lifecycle starts another once it is reaped (its workers keep serving).
                log::warn!(
                    "the program's primary (pid {}) could not be taken over: {e}; it is restarted",
                    primary.pid
                );
                self.inbox.watch(Pid::from_raw(primary.pid));
                let _ = nix::sys::signal::kill(Pid::from_raw(primary.pid), Signal::SIGTERM);
            }
        }
    }

    /// The program's primary process was reaped.
    pub(in crate::supervisor) fn release_program_primary(&mut self, pid: Pid) -> bool {
        if !self.program.is(pid) {
            return false;
        }
        if let Some(process) = self.program.process.take() {
            process.close();
        }
        true
    }

    /// A request of the program's primary, answered before it goes on.
    pub(in crate::supervisor) fn on_request(&mut self, (pid, request): RpcLine) {
        if !self.program.is(pid) {
            return;
        }
        let answer = match request {
            Err(error) => Answer::Error {
                message: error.to_string(),
                code: None,
            },
            Ok(Request::Fork(spec)) => {
                let variant = self.program.variants.of(spec);
                self.fork_step(Input::Fork { variant })
            }
            Ok(Request::Adopt { pid }) => self.fork_step(Input::Adopt {
                pid: Pid::from_raw(pid),
            }),
            Ok(Request::Kill { id, pid, signal }) => {
                self.kill_for_program(id, Pid::from_raw(pid), &signal)
            }
        };
        if let Some(process) = &mut self.program.process {
            process.answer(&answer);
        }
    }

    /// A fork or adoption through the lifecycle, which decides the worker.
    fn fork_step(&mut self, input: Input) -> Answer {
        self.program.answers.clear();
        self.step(input);
        let answer = std::mem::take(&mut self.program.answers).into_iter().next();
        match answer {
            Some(ForkAnswer::Bound { id, pid }) => {
                self.replay(id, pid);
                Answer::Worker {
                    id,
                    pid: pid.as_raw(),
                }
            }
            Some(ForkAnswer::Refused(why)) => Answer::Error {
                message: why,
                code: None,
            },
            None => Answer::Error {
                message: "cluster-lb did not start a worker".into(),
                code: None,
            },
        }
    }

    /// What a worker the primary just took said about itself before (`online`, `listening`),
    /// then the messages it sent before any primary took it.
    fn replay(&mut self, id: u32, pid: Pid) {
        let Some(worker) = self.workers.get_mut(pid) else {
            return;
        };
        for message in &worker.said {
            self.program.tell(
                to_primary::internal(id, pid.as_raw(), message.clone()),
                Held::default(),
            );
        }
        for message in worker.early.take() {
            self.program.tell(
                to_primary::message(id, pid.as_raw(), message),
                Held::default(),
            );
        }
    }

    /// `worker.kill(signal)`: the program lets the worker go, and it gets the signal.
    fn kill_for_program(&mut self, id: u32, pid: Pid, signal: &str) -> Answer {
        let known = self.lifecycle.process(pid).is_some_and(|p| p.id == id)
            && self.lifecycle.is_claimed(pid);
        if !known {
            return Answer::Error {
                message: format!("worker {id} (pid {pid}) is gone"),
                code: Some("ESRCH".into()),
            };
        }
        let Ok(signal) = signal.parse::<Signal>() else {
            return Answer::Error {
                message: format!("unknown signal {}", crate::logging::quote(signal)),
                code: Some("ERR_UNKNOWN_SIGNAL".into()),
            };
        };
        self.step(Input::Unwant {
            id,
            why: Departure::LetGo,
        });
        match nix::sys::signal::kill(pid, signal) {
            Ok(()) => Answer::Done,
            Err(errno) => Answer::Error {
                message: format!("kill: {errno}"),
                code: Some(format!("{errno:?}")),
            },
        }
    }

    /// What the primary's Node channel said: messages to its workers.
    pub(in crate::supervisor) fn on_program_channel(&mut self, event: NodeEvent) {
        let Some(process) = &self.program.process else {
            return;
        };
        let Said::Message(value, room) = process.hear(event) else {
            return;
        };
        match parse_from_primary(value) {
            FromPrimary::Send { id, message } => {
                let Some(pid) = self.claimed(id) else {
                    return;
                };
                if is_own_reply(&message) {
                    // cluster-lb answered the worker already.
                    return;
                }
                if is_disconnect(&message) {
                    self.step(Input::Unwant {
                        id,
                        why: Departure::LetGo,
                    });
                }
                self.workers.relay(pid, message, room);
            }
            FromPrimary::Disconnect { id } => {
                if let Some(pid) = self.claimed(id) {
                    self.step(Input::Unwant {
                        id,
                        why: Departure::LetGo,
                    });
                    self.workers.disconnect(pid);
                }
            }
            FromPrimary::Other => {}
        }
    }

    /// The process of worker `id` the primary has a Worker object for.
    fn claimed(&self, id: u32) -> Option<Pid> {
        self.lifecycle
            .processes()
            .find(|p| p.id == id && self.lifecycle.is_claimed(p.pid))
            .map(|p| p.pid)
    }

    /// One of a Node worker's own messages about itself: kept for a primary that takes it later,
    /// and told to the one that has it.
    pub(in crate::supervisor) fn worker_said(&mut self, id: u32, pid: Pid, message: Value) {
        if self.lifecycle.is_claimed(pid) {
            self.program.tell(
                to_primary::internal(id, pid.as_raw(), message.clone()),
                Held::default(),
            );
        }
        if let Some(worker) = self.workers.get_mut(pid) {
            worker.said.push(message);
        }
    }

    /// A worker's message: to the primary that has it (true), or not (false).
    pub(in crate::supervisor) fn message_to_program(
        &mut self,
        id: u32,
        pid: Pid,
        data: &Value,
        room: Held,
    ) -> Result<(), Held> {
        if !self.lifecycle.is_claimed(pid) {
            // Kept for a primary that takes the worker later (and given to the caller, which
            // reports it as it reports every message no primary has).
            if let Some(worker) = self.workers.get_mut(pid).filter(|w| w.channel.is_node()) {
                worker.early.keep(data);
            }
            return Err(room);
        }
        self.program
            .tell(to_primary::message(id, pid.as_raw(), data.clone()), room);
        Ok(())
    }

    /// A worker's channel closed: the primary's Worker disconnects. Not for a worker that has
    /// exited already or is exiting (its channel closed because it died): its `exit` follows at once and
    /// says both, as Node sees a killed child's channel close and its exit together. A
    /// `disconnect` alone would leave the program a moment in which `worker.send()` to a worker
    /// still in `cluster.workers` throws.
    pub(in crate::supervisor) fn disconnect_to_program(&self, id: u32, pid: Pid) {
        // Not `alive`: a killed process closes its descriptors before it is a zombie.
        if self.lifecycle.is_claimed(pid) && crate::sys::procfs::running(pid.as_raw()) {
            self.program
                .tell(to_primary::disconnect(id, pid.as_raw()), Held::default());
        }
    }

    /// A worker of the primary exited.
    pub(in crate::supervisor) fn exit_to_program(&mut self, id: u32, pid: Pid, status: ExitStatus) {
        let (code, signal) = match status {
            ExitStatus::Code(code) => (Some(code), None),
            ExitStatus::Signal(signal) => (None, Some(signal.as_str())),
        };
        let awaited = self.lifecycle.awaited_by_primary();
        self.program.awaited = Some(awaited);
        self.program.tell(
            to_primary::exit(id, pid.as_raw(), code, signal, awaited),
            Held::default(),
        );
    }

    /// Tells the primary how many workers it is to wait for, when that changed.
    pub(in crate::supervisor) fn awaited_to_program(&mut self) {
        if self.program.process.is_none() {
            self.program.awaited = None;
            return;
        }
        let awaited = self.lifecycle.awaited_by_primary();
        if self.program.awaited != Some(awaited) {
            self.program.awaited = Some(awaited);
            self.program
                .tell(to_primary::awaited(awaited), Held::default());
        }
    }

    /// A worker the primary did not fork: it may take it.
    pub(in crate::supervisor) fn offer_to_program(&self, id: u32, pid: Pid) {
        self.program
            .tell(to_primary::offer(id, pid.as_raw()), Held::default());
    }
}

impl Supervisor {
    /// Output of a `silent` worker: to the primary's `worker.process.stdout`/`stderr`, or
    /// logged as any worker's when no primary has it.
    pub(in crate::supervisor) fn output_to_program(&self, (pid, fd, bytes): Forwarded) {
        let id = self.lifecycle.process(pid).map(|p| p.id);
        match id {
            Some(id) if self.lifecycle.is_claimed(pid) => self.program.tell(
                to_primary::output(id, pid.as_raw(), fd, &base64(&bytes)),
                Held::default(),
            ),
            _ => {
                let stream = if fd == 2 {
                    Stream::Stderr
                } else {
                    Stream::Stdout
                };
                let source = Source::Worker(id.unwrap_or_default());
                for line in String::from_utf8_lossy(&bytes).lines() {
                    crate::logging::worker_line(source, pid.as_raw(), stream, line);
                }
            }
        }
    }
}

/// Standard base64 (with padding), for output bytes in a JSON message.
fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for (i, shift) in [18, 12, 6, 0].into_iter().enumerate() {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[((n >> shift) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn base64_is_the_standard_one() {
        assert_eq!(super::base64(b""), "");
        assert_eq!(super::base64(b"f"), "Zg==");
        assert_eq!(super::base64(b"fo"), "Zm8=");
        assert_eq!(super::base64(b"foo"), "Zm9v");
        assert_eq!(super::base64(b"foob\n"), "Zm9vYgo=");
    }
}
