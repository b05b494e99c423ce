//! `cluster-lb`: parses the command line and dispatches; the work is in the library.

use std::process::ExitCode;

use clap::Parser;
use cluster_lb::{
    cli::{one_line_error, Cli, Command},
    client, logging, run, top,
};

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(error)
            if error.kind() == clap::error::ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand =>
        {
            eprintln!("cluster-lb: error: no command given; use run, status, top, reload, scale or stop (see cluster-lb --help)");
            return ExitCode::from(2);
        }
        Err(error) if !error.use_stderr() => {
            // --help and --version: print as clap formats them.
            let _ = error.print();
            return ExitCode::SUCCESS;
        }
        Err(error) => {
            eprintln!(
                "cluster-lb: error: {} (see cluster-lb --help)",
                one_line_error(&error)
            );
            return ExitCode::from(2);
        }
    };
    let result: Result<(), Box<dyn std::error::Error>> = match cli.command {
        Command::Run(args) => {
            logging::init(args.log_format);
            match args.into_options() {
                Ok(options) => run::run(options).map_err(Into::into),
                Err(error) => Err(error.into()),
            }
        }
        Command::Status { control, json } => {
            client::status(&control.path(), json).map_err(Into::into)
        }
        Command::Top { control } => top::run(&control.path()).map_err(Into::into),
        Command::Reload { control } => client::reload(&control.path()).map_err(Into::into),
        Command::Scale { workers, control } => {
            client::scale(&control.path(), workers).map_err(Into::into)
        }
        Command::Stop { control } => client::stop(&control.path()).map_err(Into::into),
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
