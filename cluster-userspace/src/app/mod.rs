//! The front end: the `cluster-lb` command line (`cli`, `config_file`), what `run` starts
//! around a supervisor (the control socket and the metrics server), and the client commands
//! (`status`, `logs`, `top`, `reload`, `scale`, `stop`, `send`, `upgrade`). Nothing here decides about
//! workers: that is the supervisor's; `run` starts it from its `Handle`, as any embedder would.

mod accept;
pub mod cli;
pub mod client;
pub mod config_file;
pub mod control;
mod dist;
pub mod dotenv;
pub mod ecosystem;
mod launcher;
mod metrics;
pub mod names;
mod reconfigure;
mod run;
mod top;
mod watch;

use std::process::ExitCode;

use cli::{one_line_error, Command, ConfigError};
use config_file::{CommandLineError, Parsed};

use crate::{
    logging,
    supervisor::{
        saved::{State, StateError, CHECK_VARIABLE, STATE_VARIABLE},
        upgrade,
    },
};

/// What an older primary handed this process, if it re-executed it.
enum Handover {
    None,
    /// Only check whether this binary can take over, and say so.
    Check(Result<State, StateError>),
    Resume(Result<State, StateError>),
}

impl Handover {
    fn from_environment() -> Handover {
        let Some(fd) = std::env::var_os(STATE_VARIABLE) else {
            return Handover::None;
        };
        let check = std::env::var_os(CHECK_VARIABLE).is_some();
        // Workers started from now on must not see either variable.
        std::env::remove_var(STATE_VARIABLE);
        std::env::remove_var(CHECK_VARIABLE);
        let state = State::from_variable(&fd.to_string_lossy());
        if check {
            Handover::Check(state)
        } else {
            Handover::Resume(state)
        }
    }
}

/// The check run of an upgrade: `ready VERSION` on stdout and exit 0 if this binary can take
/// over, else one line on stderr and exit 1.
fn check_takeover(options: &run::RunOptions, state: Result<State, StateError>) -> ExitCode {
    let verdict = state
        .map_err(|e| e.to_string())
        .and_then(|state| upgrade::check_takeover(&options.supervisor, &state));
    match verdict {
        Ok(()) => {
            println!("ready {}", crate::version::version());
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("cluster-lb: error: {error}");
            ExitCode::FAILURE
        }
    }
}

/// `--log-file`: from now on the log goes there. False (and one line on stderr) when it cannot
/// be opened.
fn open_log_file(options: &run::RunOptions) -> bool {
    let Some((path, size)) = &options.log_file else {
        return true;
    };
    match logging::file::start(path, *size) {
        Ok(()) => true,
        Err(error) => {
            eprintln!(
                "cluster-lb: error: cannot open the log file {}: {error}",
                path.display()
            );
            false
        }
    }
}

/// The `cluster-lb` command: parses the command line and dispatches.
pub fn main() -> ExitCode {
    let Parsed {
        cli,
        file,
        warnings,
    } = match config_file::parse(std::env::args_os().collect()) {
        Ok(parsed) => parsed,
        Err(CommandLineError::File(error)) => {
            eprintln!("cluster-lb: error: {error}");
            return ExitCode::from(2);
        }
        Err(CommandLineError::Args(error))
            if error.kind() == clap::error::ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand =>
        {
            eprintln!("cluster-lb: error: no command given; use run, status, logs, top, reload, scale, stop or send (see cluster-lb --help)");
            return ExitCode::from(2);
        }
        Err(CommandLineError::Args(error)) if !error.use_stderr() => {
            // --help and --version: print as clap formats them.
            let _ = error.print();
            return ExitCode::SUCCESS;
        }
        Err(CommandLineError::Args(error)) => {
            eprintln!(
                "cluster-lb: error: {} (see cluster-lb --help)",
                one_line_error(&error)
            );
            return ExitCode::from(2);
        }
    };
    // Set when an older primary re-executed this binary in an upgrade (see supervisor::upgrade).
    let upgrade = Handover::from_environment();
    let result: Result<(), Box<dyn std::error::Error>> = match cli.command {
        Command::Run(args) => {
            logging::init(args.log_format);
            for warning in &warnings {
                log::warn!("{warning}");
            }
            match args.into_options() {
                Ok(mut options) => {
                    // A reload reads the file again (as at start: the same argv).
                    if let Some(file) = &file {
                        options.supervisor.reconfigure = Some(reconfigure::hook(
                            std::env::args_os().collect(),
                            file.merged.clone(),
                        ));
                    }
                    match upgrade {
                        _ if !open_log_file(&options) => return ExitCode::FAILURE,
                        Handover::None => run::run(options).map_err(Into::into),
                        Handover::Check(state) => return check_takeover(&options, state),
                        Handover::Resume(state) => match state {
                            Ok(state) => run::resume(options, state).map_err(Into::into),
                            Err(error) => Err(error.into()),
                        },
                    }
                }
                Err(error) => {
                    // A wrong value from the config file is the file's fault: say so, and
                    // exit as for any bad argument.
                    if let Some(blamed) = file.and_then(|f| f.blame(error.key(), &error)) {
                        eprintln!("cluster-lb: error: {blamed}");
                        return ExitCode::from(2);
                    }
                    if matches!(
                        error,
                        ConfigError::NoCommand
                            | ConfigError::Launcher(_)
                            | ConfigError::Chdir { .. }
                            | ConfigError::Watch { .. }
                            | ConfigError::EnvFile(_)
                    ) {
                        eprintln!("cluster-lb: error: {error}");
                        return ExitCode::from(2);
                    }
                    Err(error.into())
                }
            }
        }
        Command::Status {
            control,
            json,
            ready,
        } => client::status(&control.target(), json, ready).map_err(Into::into),
        Command::Top { control } => control
            .target()
            .socket()
            .map_err(Into::into)
            .and_then(|path| top::run(&path).map_err(Into::into)),
        Command::Reload { control } => client::reload(&control.target()).map_err(Into::into),
        Command::Scale { workers, control } => {
            client::scale(&control.target(), workers).map_err(Into::into)
        }
        Command::Stop { control } => client::stop(&control.target()).map_err(Into::into),
        Command::Send {
            to,
            message,
            control,
        } => match client::parse_message(&message) {
            Ok(data) => client::send(&control.target(), to.recipients(), data).map_err(Into::into),
            Err(error) => {
                // A message that is no JSON is a usage error, as a bad argument is.
                eprintln!("cluster-lb: error: {error}");
                return ExitCode::from(2);
            }
        },
        Command::Logs {
            worker,
            follow,
            lines,
            json,
            control,
        } => client::logs(
            &control.target(),
            &client::LogsOptions {
                lines,
                worker,
                follow,
                json,
            },
        )
        .map_err(Into::into),
        Command::Upgrade { control } => client::upgrade(&control.target()).map_err(Into::into),
        Command::GenerateDist { dir } => dist::generate(&dir).map_err(Into::into),
    };
    logging::flush(std::time::Duration::from_secs(2));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            // Every error's Display is one line that names the problem and what to do.
            eprintln!("cluster-lb: error: {error}");
            ExitCode::FAILURE
        }
    }
}
