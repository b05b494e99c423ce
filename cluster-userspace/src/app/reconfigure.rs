//! `cluster-lb run --config FILE`: what a reload reads. The supervisor calls the hook made
//! here before every reload (`Config::reconfigure`); it parses the command line and the file
//! again, as at start (the same `--env`/`--app` selection, the command line's options still
//! over the file's), and gives the supervisor the new configuration, of which it takes the
//! workers' command, environment (`env`, `env_file`), directory and count. Anything else
//! that changed refuses the reload in one line naming the key; so does a file that no
//! longer parses, with the line `run` would have printed.

use std::ffi::OsString;

use super::{
    cli::{one_line_error, Command},
    config_file::{self, CommandLineError, Parsed},
};
use crate::supervisor::{Config, Reconfigure};

/// The hook for a cluster started with `argv`, whose merged command line was `started`.
pub fn hook(argv: Vec<OsString>, started: Vec<OsString>) -> Reconfigure {
    Reconfigure::new(move || reread(&argv, &started))
}

/// The configuration `argv` gives now, or why a reload must not use it.
fn reread(argv: &[OsString], started: &[OsString]) -> Result<Config, String> {
    let Parsed {
        cli,
        file,
        warnings,
    } = config_file::parse(argv.to_vec()).map_err(|error| match error {
        CommandLineError::File(error) => error.to_string(),
        CommandLineError::Args(error) => one_line_error(&error),
    })?;
    let (Command::Run(run), Some(file)) = (cli.command, file) else {
        return Err("the command line no longer runs a cluster from a config file".into());
    };
    if let Some(refusal) = config_file::changed_option(&file.path, started, &file.merged)? {
        return Err(refusal);
    }
    for warning in &warnings {
        log::warn!("{warning}");
    }
    let options = (*run).into_options().map_err(|error| {
        file.blame(error.key(), &error)
            .map_or_else(|| error.to_string(), |blamed| blamed.to_string())
    })?;
    Ok(options.supervisor)
}
