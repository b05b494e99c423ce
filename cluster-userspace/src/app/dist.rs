//! `cluster-lb generate-dist DIR` (hidden): the man pages (cluster-lb(1) and one per subcommand,
//! e.g. cluster-lb-run(1)) and the bash, zsh and fish completions, made from the very clap
//! definitions the binary parses with. `cargo xtask dist` runs it for the .deb.

use std::{fs, path::Path};

use clap::CommandFactory;
use clap_complete::Shell;

use super::cli::Cli;

/// Writes `DIR/man/*.1` and `DIR/completions/*`; checks the run page documents every flag.
pub fn generate(dir: &Path) -> std::io::Result<()> {
    let man = dir.join("man");
    let completions = dir.join("completions");
    for dir in [&man, &completions] {
        fs::create_dir_all(dir)?;
    }
    let cli = Cli::command();
    clap_mangen::generate_to(cli.clone(), &man)?;
    for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
        clap_complete::generate_to(shell, &mut cli.clone(), "cluster-lb", &completions)?;
    }
    let page = fs::read_to_string(man.join("cluster-lb-run.1"))?;
    if let Some(long) = undocumented_run_flag(&page, &cli) {
        return Err(std::io::Error::other(format!(
            "the man page cluster-lb-run.1 does not mention --{long}"
        )));
    }
    Ok(())
}

/// A flag of `cluster-lb run` the page does not mention (roff writes `-` as `\-`).
fn undocumented_run_flag(page: &str, cli: &clap::Command) -> Option<String> {
    cli.find_subcommand("run")?
        .get_arguments()
        .filter_map(|a| a.get_long())
        .find(|long| !page.contains(&format!("\\-\\-{}", long.replace('-', "\\-"))))
        .map(str::to_string)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_run_man_page_documents_every_run_flag() {
        let cli = Cli::command();
        let run = cli.find_subcommand("run").expect("run").clone();
        let mut page = Vec::new();
        clap_mangen::Man::new(run.name("cluster-lb-run"))
            .render(&mut page)
            .expect("render");
        let page = String::from_utf8(page).expect("utf-8");
        assert_eq!(undocumented_run_flag(&page, &cli), None);
        assert!(undocumented_run_flag("no flags here", &cli).is_some());
        let dir = std::env::temp_dir().join(format!("clb-dist-{}", std::process::id()));
        generate(&dir).expect("generating");
        for file in [
            "man/cluster-lb.1",
            "man/cluster-lb-run.1",
            "completions/_cluster-lb",
        ] {
            assert!(dir.join(file).is_file(), "{file}");
        }
        let _ = fs::remove_dir_all(&dir);
    }
}
