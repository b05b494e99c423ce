//! `cluster-lb`: parses the command line and dispatches; the work is in the library.

use std::process::ExitCode;

use clap::Parser;
use cluster_lb::{
    cli::{one_line_error, Cli, Command},
    client, logging, supervisor,
};

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
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
    let result = match cli.command {
        Command::Run(args) => {
            logging::init(args.log_format);
            args.into_config().and_then(supervisor::run)
        }
        Command::Status { control, json } => client::status(&control.path(), json),
        Command::Reload { control } => client::reload(&control.path()),
        Command::Scale { workers, control } => client::scale(&control.path(), workers),
        Command::Stop { control } => client::stop(&control.path()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            // `{:#}` puts the whole chain of causes on one line.
            eprintln!("cluster-lb: error: {error:#}");
            ExitCode::FAILURE
        }
    }
}
