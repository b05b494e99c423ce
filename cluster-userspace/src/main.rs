//! `cluster-lb`: the command line is the library's front end (`app`).

fn main() -> std::process::ExitCode {
    cluster_lb::cli_main()
}
