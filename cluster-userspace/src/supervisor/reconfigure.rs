//! A reload that brings a new configuration: with [`Config::reconfigure`] (`run --config
//! FILE`), a reload first reads the configuration anew. The command, environment and
//! directory it reads are a *candidate*: only the reload's canary (its first replacement,
//! `Action::Spawn { canary: true }`) starts with them; when the canary is ready
//! (`Action::CanaryReady`) they become the cluster's, for the reload's other replacements and
//! for every later restart; a reload that ends before drops them, and the cluster goes on as
//! it was. A changed worker count is scaled to once the reload completed. The lifecycle
//! decides all of this; here it is only carried out.

use super::{
    events::ReloadError,
    launch::spawn::WorkerCommand,
    lifecycle::{Announced, Count, Input},
    workers, Config, Supervisor,
};

/// A configuration a reload read, with what its workers are started from.
pub(super) struct Candidate {
    config: Config,
    command: WorkerCommand,
    increment: Option<(String, f64)>,
    /// The cluster's now: its canary was ready.
    taken: bool,
}

/// `--increment-var` and its base value in the environment `command` starts workers with.
pub(super) fn increment(config: &Config, command: &WorkerCommand) -> Option<(String, f64)> {
    config.increment_var.as_ref().map(|name| {
        let base = command.base_variable(name);
        (name.clone(), workers::increment_base(base.as_deref()))
    })
}

impl Supervisor {
    /// A reload was asked for. With a `reconfigure` hook the configuration is read first; one
    /// that cannot be read or used refuses the reload in one line (to everyone waiting for
    /// it), before anything starts. A reload under way is joined as it is.
    pub(super) fn reload(&mut self) -> Option<Input> {
        if self.lifecycle.is_reloading() || self.lifecycle.is_stopping() {
            return Some(Input::Reload);
        }
        let Some(reconfigure) = self.config.reconfigure.clone() else {
            return Some(Input::Reload);
        };
        match reconfigure.read().and_then(|config| self.candidate(config)) {
            Ok(candidate) => {
                self.candidate = Some(candidate);
                Some(Input::Reload)
            }
            Err(why) => {
                let refused = ReloadError::Refused(why);
                log::error!("{refused}");
                self.outputs.reload_done(&Err(refused));
                // systemd's `reload` (Type=notify-reload) waits for RELOADING=1 and READY=1:
                // a refused reload is over at once.
                if self.lifecycle.announced() == Announced::Ready {
                    self.outputs.announce(Announced::Reloading);
                    self.outputs.announce(Announced::Ready);
                }
                None
            }
        }
    }

    /// What the workers of `config` would start from; refused if they would need another
    /// channel than the running workers have (a Node program for a non-Node one).
    fn candidate(&self, config: Config) -> Result<Candidate, String> {
        let command = WorkerCommand::for_config(&config).map_err(|e| e.to_string())?;
        let protocol = super::protocol_wanted(&config, &command);
        if protocol != self.workers.launch.protocol {
            let (new, running) = match protocol {
                workers::Protocol::Node => ("is", "are not"),
                workers::Protocol::ClusterLb => ("is not", "are"),
            };
            return Err(format!(
                "the new command ({}) {new} a Node program and the running workers {running}: a reload cannot change the workers' channel; restart the cluster for it",
                command.program()
            ));
        }
        let increment = increment(&config, &command);
        Ok(Candidate {
            config,
            command,
            increment,
            taken: false,
        })
    }

    /// The reload's canary: started from the configuration the reload read, if it read one.
    pub(super) fn spawn_canary(&mut self, id: u32) -> Input {
        let Some(mut candidate) = self.candidate.take() else {
            return self.spawn(id);
        };
        if candidate.taken {
            self.candidate = Some(candidate);
            return self.spawn(id);
        }
        self.swap_launch(&mut candidate);
        let input = self.spawn(id);
        self.swap_launch(&mut candidate);
        self.candidate = Some(candidate);
        input
    }

    fn swap_launch(&mut self, candidate: &mut Candidate) {
        std::mem::swap(&mut self.workers.launch.command, &mut candidate.command);
        std::mem::swap(&mut self.workers.launch.increment, &mut candidate.increment);
    }

    /// The canary is ready: the configuration it started from is the cluster's.
    pub(super) fn canary_ready(&mut self, id: u32, pid: nix::unistd::Pid) {
        let Some(mut candidate) = self.candidate.take() else {
            return;
        };
        if !candidate.taken {
            // The launch now holds the new command; the candidate, the old one (unused).
            self.swap_launch(&mut candidate);
            self.config.command = candidate.config.command.clone();
            self.config.env = candidate.config.env.clone();
            self.config.cwd = candidate.config.cwd.clone();
            candidate.taken = true;
            log::info!(
                "reload: worker {id}'s replacement (pid {pid}) is ready with the configuration read anew ({}): the cluster runs it from now on; replacing the other workers",
                self.workers.launch.command.program()
            );
        }
        self.candidate = Some(candidate);
    }

    /// The reload ended: a configuration it read that was never taken is dropped; a changed
    /// worker count is scaled to once the reload completed.
    pub(super) fn reload_done(&mut self, outcome: Result<u32, ReloadError>) -> Option<Input> {
        self.outputs.reload_done(&outcome);
        let candidate = self.candidate.take()?;
        if !candidate.taken {
            log::warn!(
                "the reload's new configuration was not taken (its first replacement never got ready): the workers keep running, and restart with, the previous command and environment"
            );
            return None;
        }
        let workers = candidate.config.workers;
        let fixed = super::policy(&self.config, self.workers.launch.protocol).count == Count::Fixed;
        // After a reload that did not complete, the count stays: the next one scales.
        if outcome.is_err() || !fixed || workers == self.config.workers {
            return None;
        }
        self.config.workers = workers;
        Some(Input::Scale { workers })
    }
}
