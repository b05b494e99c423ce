//! `cluster-lb run --config FILE`: the run options from a TOML file, so that a unit file or a
//! container needs no long command line.
//!
//! The file's keys are the long options of `run` with `_` for `-` (`workers = 4`,
//! `listen = ["127.0.0.1:8080"]`, `ready_delay = 0.5`, `require_ebpf = true`), plus
//! `command = ["node", "app.js"]`. Options given on the command line win: clap says which ones
//! the user actually typed (`ArgMatches::value_source`), and only the others are taken from
//! the file. The file's values become command-line arguments, so they go through exactly the
//! validation the flags do; each is checked on its own first, so that an error names its key.
//! The keys are read from clap's definition of `run`, so a new option is a new key at once.
//! `env = { NAME = "value" }` gives the workers variables (as an ecosystem file's `env`).
//!
//! A reload of a cluster started with `--config` parses the command line and the file again
//! (`app::reconfigure`): [`changed_option`] names an option it cannot apply that changed.

use std::{
    ffi::OsString,
    path::{Path, PathBuf},
};

use clap::{parser::ValueSource, ArgAction, ArgMatches, CommandFactory, FromArgMatches};

use crate::app::{
    cli::{one_line_error, Cli},
    ecosystem,
};

/// The key holding the worker program and its arguments.
const COMMAND_KEY: &str = "command";
/// The key holding variables for the workers, a table (PM2's `env`).
const ENV_KEY: &str = "env";
/// What a reload applies (besides `env`): every other option needs a restart or an upgrade.
pub const RELOADABLE: [&str; 4] = ["workers", "cwd", "env_file", COMMAND_KEY];
/// Options an in-place upgrade keeps as they were too: only a restart changes them.
const RESTART_ONLY: [&str; 11] = [
    "listen",
    "strategy",
    "require_ebpf",
    "name",
    "control",
    "metrics",
    "user",
    "group",
    "node",
    "node_primary",
    "restart",
];
/// Options of `run` that are no file key (`env` and `app` pick from a PM2 file).
const NOT_KEYS: [&str; 5] = ["config", "help", "version", "env", "app"];
/// Options whose file key is another name, that of PM2's and systemd's setting (`--chdir`,
/// gunicorn's flag, is `cwd`, PM2's key); the option's own name is accepted too.
const RENAMED: [(&str, &str); 1] = [("chdir", "cwd")];
/// Largest config file read (a run configuration is a few hundred bytes).
const MAX_FILE: u64 = 1 << 20;

/// What is wrong with a config file, in one line: the file, the key, the problem.
#[derive(Debug, thiserror::Error)]
#[error("config {}: {}{detail}", .path.display(), .key.as_ref().map(|k| format!("key `{k}`: ")).unwrap_or_default())]
pub struct FileError {
    pub path: PathBuf,
    pub key: Option<String>,
    pub detail: String,
}

/// Why the command line could not be read.
#[derive(Debug)]
pub enum CommandLineError {
    /// Bad arguments, or --help/--version (clap's own error).
    Args(clap::Error),
    File(FileError),
}

/// A parsed command line, and the config file it drew on.
#[derive(Debug)]
pub struct Parsed {
    pub cli: Cli,
    pub file: Option<Loaded>,
    /// What to warn about once logging runs (keys of a PM2 file that are not honoured).
    pub warnings: Vec<String>,
}

/// A config file that was read, and the keys whose values were taken from it.
#[derive(Debug, Clone)]
pub struct Loaded {
    pub path: PathBuf,
    pub keys: Vec<String>,
    /// The command line with the file's options merged in, as it was parsed.
    pub merged: Vec<OsString>,
}

impl Loaded {
    /// `error` as the file's fault when the value of `key` came from it.
    pub fn blame(&self, key: &str, error: &dyn std::fmt::Display) -> Option<FileError> {
        self.keys.iter().any(|k| k == key).then(|| FileError {
            path: self.path.clone(),
            key: Some(key.to_string()),
            detail: error.to_string(),
        })
    }
}

/// Parses `argv` (program name first); for `run --config FILE`, with the file's options under
/// the ones given.
pub fn parse(argv: Vec<OsString>) -> Result<Parsed, CommandLineError> {
    let command = Cli::command();
    let matches = command
        .clone()
        .try_get_matches_from(&argv)
        .map_err(CommandLineError::Args)?;
    let run = command.find_subcommand("run");
    let with_file = match (matches.subcommand(), run) {
        (Some(("run", given)), Some(run)) => given
            .get_one::<PathBuf>("config")
            .map(|path| (given, run, path.clone())),
        _ => None,
    };
    let Some((given, run, path)) = with_file else {
        let cli = Cli::from_arg_matches(&matches).map_err(CommandLineError::Args)?;
        return Ok(Parsed {
            cli,
            file: None,
            warnings: Vec::new(),
        });
    };
    let fail = |key: Option<String>, detail: String| {
        CommandLineError::File(FileError {
            path: path.clone(),
            key,
            detail,
        })
    };
    let env_name = given.get_one::<String>("env_name").map(String::as_str);
    let app = given.get_one::<String>("app").map(String::as_str);
    let (table, pm2) = match ecosystem::kind(&path).map_err(|detail| fail(None, detail))? {
        Some(kind) => {
            let value =
                ecosystem::evaluate(&path, kind, env_name).map_err(|detail| fail(None, detail))?;
            let base = std::env::current_dir()
                .map_err(|e| fail(None, format!("the current directory: {e}")))?;
            let kill_signal = std::env::var("PM2_KILL_SIGNAL").ok();
            let context = ecosystem::Context {
                env_name,
                app,
                base: &base,
                cpus: std::thread::available_parallelism()
                    .map(|n| n.get() as u32)
                    .unwrap_or(1),
                pm2_kill_signal: kill_signal.as_deref(),
            };
            let mut mapped = ecosystem::map(&value, &context).map_err(|e| fail(e.key, e.detail))?;
            (std::mem::take(&mut mapped.table), Some(mapped))
        }
        None => {
            if let Some(option) = [("--env", env_name), ("--app", app)]
                .iter()
                .find_map(|(option, value)| value.map(|_| option))
            {
                return Err(fail(
                    None,
                    format!("{option} picks from a PM2 ecosystem file (ecosystem.config.js, .config.cjs or .json), and this file is read as TOML"),
                ));
            }
            (read(&path).map_err(CommandLineError::File)?, None)
        }
    };
    let Merged {
        argv: merged,
        keys,
        env,
    } = merge(&argv, &table, given, run, &path).map_err(CommandLineError::File)?;
    let mut cli = Cli::command()
        .try_get_matches_from(&merged)
        .and_then(|matches| Cli::from_arg_matches(&matches))
        .map_err(CommandLineError::Args)?;
    let mut warnings = Vec::new();
    if let crate::app::cli::Command::Run(run) = &mut cli.command {
        match pm2 {
            Some(mapped) => {
                run.worker_env = mapped.env;
                warnings = mapped.warnings;
            }
            None => run.worker_env = env,
        }
    }
    Ok(Parsed {
        cli,
        file: Some(Loaded { path, keys, merged }),
        warnings,
    })
}

/// The file as a TOML table; a syntax error names its line.
fn read(path: &Path) -> Result<toml::Table, FileError> {
    let fail = |detail: String| FileError {
        path: path.to_path_buf(),
        key: None,
        detail,
    };
    let size = std::fs::metadata(path)
        .map_err(|e| fail(format!("cannot read it: {e}")))?
        .len();
    if size > MAX_FILE {
        return Err(fail(format!(
            "{size} bytes, more than a config file of {MAX_FILE} bytes could need"
        )));
    }
    let text = std::fs::read_to_string(path).map_err(|e| fail(format!("cannot read it: {e}")))?;
    text.parse::<toml::Table>().map_err(|e| {
        let line = e
            .span()
            .map(|span| text[..span.start.min(text.len())].lines().count().max(1));
        let message = e.message().trim().replace('\n', " ");
        fail(match line {
            Some(line) => format!("line {line}: {message}"),
            None => message,
        })
    })
}

/// A command line with a file's options merged in.
struct Merged {
    argv: Vec<OsString>,
    /// The keys whose values were taken from the file.
    keys: Vec<String>,
    /// The file's `env`.
    env: Vec<(String, String)>,
}

/// `argv` with the file's options added where the command line gave none; the keys taken, and
/// the file's `env`.
fn merge(
    argv: &[OsString],
    table: &toml::Table,
    given: &ArgMatches,
    run: &clap::Command,
    path: &Path,
) -> Result<Merged, FileError> {
    let fail = |key: &str, detail: String| FileError {
        path: path.to_path_buf(),
        key: Some(key.to_string()),
        detail,
    };
    let from_command_line = |id: &str| given.value_source(id) == Some(ValueSource::CommandLine);
    let mut options: Vec<OsString> = Vec::new();
    let mut command: Option<Vec<String>> = None;
    let mut keys = Vec::new();
    let mut env = Vec::new();
    for (key, value) in table {
        if key == ENV_KEY {
            env = variables(value).map_err(|detail| fail(key, detail))?;
            keys.push(key.clone());
            continue;
        }
        if key == COMMAND_KEY {
            let program = strings(value)
                .filter(|list| !list.is_empty())
                .ok_or_else(|| {
                    fail(
                        key,
                        format!(
                            "expected a list of strings such as [\"node\", \"app.js\"], found {}",
                            kind(value)
                        ),
                    )
                })?;
            if !from_command_line(COMMAND_KEY) {
                command = Some(program);
                keys.push(key.clone());
            }
            continue;
        }
        let arg = option_for(run, key).map_err(|detail| fail(key, detail))?;
        if let Some(other) = table.keys().find(|other| {
            *other != key && option_for(run, other).is_ok_and(|o| o.get_id() == arg.get_id())
        }) {
            return Err(fail(
                key,
                format!("the same option as `{other}`; give one of them"),
            ));
        }
        let long = format!("--{}", arg.get_long().unwrap_or(key));
        let mut tokens = Vec::new();
        match arg.get_action() {
            ArgAction::SetTrue => match value {
                toml::Value::Boolean(true) => tokens.push(long),
                toml::Value::Boolean(false) => {}
                other => {
                    return Err(fail(
                        key,
                        format!("expected true or false, found {}", kind(other)),
                    ))
                }
            },
            action => {
                let values = if matches!(action, ArgAction::Append) {
                    match value {
                        toml::Value::Array(_) => strings(value)
                            .ok_or_else(|| fail(key, "expected a list of strings".to_string()))?,
                        other => vec![scalar(other).map_err(|detail| fail(key, detail))?],
                    }
                } else {
                    vec![scalar(value).map_err(|detail| fail(key, detail))?]
                };
                for text in values {
                    // `--opt=value`, so that a value starting with '-' stays a value.
                    let token = format!("{long}={text}");
                    // The option alone, through its own value parser.
                    clap::Command::new("run")
                        .no_binary_name(true)
                        .arg(arg.clone())
                        .try_get_matches_from([&token])
                        .map_err(|e| fail(key, value_error(&e)))?;
                    tokens.push(token);
                }
            }
        }
        // Checked above even when overridden, so a bad file never waits for the day its
        // flag is dropped from the command line.
        if !from_command_line(arg.get_id().as_str()) {
            options.extend(tokens.into_iter().map(OsString::from));
            keys.push(file_key(arg));
        }
    }
    let mut merged = argv.to_vec();
    // Right after the subcommand (argv[0] is the program, whatever its name).
    let after_run = merged
        .iter()
        .skip(1)
        .position(|a| a == "run")
        .map_or(merged.len(), |at| at + 2);
    merged.splice(after_run..after_run, options);
    if let Some(program) = command {
        if !merged.iter().any(|a| a == "--") {
            merged.push("--".into());
        }
        merged.extend(program.into_iter().map(OsString::from));
    }
    Ok(Merged {
        argv: merged,
        keys,
        env,
    })
}

/// The file's `env`: a table of variables, each a string, a number or a boolean.
fn variables(value: &toml::Value) -> Result<Vec<(String, String)>, String> {
    let toml::Value::Table(table) = value else {
        return Err(format!(
            "expected a table of variables such as {{ NODE_ENV = \"production\" }}, found {}",
            kind(value)
        ));
    };
    table
        .iter()
        .map(|(name, value)| {
            crate::app::cli::parse_variable(name)?;
            let text = match value {
                toml::Value::String(text) => text.clone(),
                toml::Value::Integer(n) => n.to_string(),
                toml::Value::Float(x) => x.to_string(),
                toml::Value::Boolean(b) => b.to_string(),
                other => {
                    return Err(format!(
                        "variable {name}: expected a string, a number or a boolean, found {}",
                        kind(other)
                    ))
                }
            };
            if text.contains('\0') {
                return Err(format!(
                    "variable {name}: a NUL byte, which no variable can hold"
                ));
            }
            Ok((name.clone(), text))
        })
        .collect()
}

/// What a reload refuses: the first option of `run`, other than those it applies
/// ([`RELOADABLE`]), whose value differs between two merged command lines (`Loaded::merged`
/// at start and now), as one line that names its file key and what would apply it.
pub fn changed_option(
    path: &Path,
    before: &[OsString],
    after: &[OsString],
) -> Result<Option<String>, String> {
    let command = Cli::command();
    let Some(run) = command.find_subcommand("run") else {
        return Ok(None);
    };
    let run_matches = |argv: &[OsString]| -> Result<ArgMatches, String> {
        let matches = command
            .clone()
            .try_get_matches_from(argv)
            .map_err(|e| one_line_error(&e))?;
        match matches.subcommand() {
            Some(("run", run)) => Ok(run.clone()),
            _ => Err("the command line no longer runs a cluster".into()),
        }
    };
    let (before, after) = (run_matches(before)?, run_matches(after)?);
    for arg in run.get_arguments().filter(|arg| arg.get_long().is_some()) {
        let key = file_key(arg);
        if RELOADABLE.contains(&key.as_str()) || NOT_KEYS.contains(&key.as_str()) {
            continue;
        }
        let id = arg.get_id().as_str();
        let raw = |matches: &ArgMatches| -> Vec<OsString> {
            matches
                .get_raw(id)
                .map(|values| values.map(OsString::from).collect())
                .unwrap_or_default()
        };
        if raw(&before) == raw(&after) {
            continue;
        }
        let how = if RESTART_ONLY.contains(&key.as_str()) {
            "restart the cluster to change it".to_string()
        } else {
            "`cluster-lb upgrade` (which reads the file anew) or a restart applies it".to_string()
        };
        return Ok(Some(format!(
            "config {}: key `{key}` changed, and a reload applies only command, env, env_file, cwd and workers: {how}",
            path.display()
        )));
    }
    Ok(None)
}

/// The file key of `arg`: its long name with _ for -, or its other name (RENAMED).
fn file_key(arg: &clap::Arg) -> String {
    let long = arg.get_long().unwrap_or_default();
    RENAMED
        .iter()
        .find(|(option, _)| *option == long)
        .map_or_else(|| long.replace('-', "_"), |(_, key)| key.to_string())
}

/// The option of `run` that `key` names.
fn option_for<'a>(run: &'a clap::Command, key: &str) -> Result<&'a clap::Arg, String> {
    let found = run.get_arguments().find(|arg| {
        (arg.get_long().map(|long| long.replace('-', "_")).as_deref() == Some(key)
            || file_key(arg) == key)
            && !NOT_KEYS.contains(&key)
    });
    if let Some(arg) = found {
        return Ok(arg);
    }
    if key == "config" {
        return Err("a config file cannot name another one".into());
    }
    let underscored = key.replace('-', "_");
    if underscored != key && option_for(run, &underscored).is_ok() {
        return Err(format!("unknown key; did you mean `{underscored}`?"));
    }
    Err(format!(
        "unknown key; the keys are the long options of `cluster-lb run` with _ for - ({}), `{COMMAND_KEY}` and `{ENV_KEY}`",
        known_keys(run).join(", ")
    ))
}

/// Every key a config file may have besides `command`.
pub fn known_keys(run: &clap::Command) -> Vec<String> {
    run.get_arguments()
        .filter(|arg| arg.get_long().is_some())
        .map(file_key)
        .filter(|key| !NOT_KEYS.contains(&key.as_str()))
        .collect()
}

/// One option value: a string or a number.
fn scalar(value: &toml::Value) -> Result<String, String> {
    match value {
        toml::Value::String(text) => Ok(text.clone()),
        toml::Value::Integer(n) => Ok(n.to_string()),
        toml::Value::Float(x) => Ok(x.to_string()),
        other => Err(format!(
            "expected a string or a number, found {}",
            kind(other)
        )),
    }
}

/// A list of strings, or None when `value` is something else.
fn strings(value: &toml::Value) -> Option<Vec<String>> {
    value
        .as_array()?
        .iter()
        .map(|item| item.as_str().map(str::to_string))
        .collect()
}

fn kind(value: &toml::Value) -> &'static str {
    match value {
        toml::Value::String(_) => "a string",
        toml::Value::Integer(_) => "an integer",
        toml::Value::Float(_) => "a number",
        toml::Value::Boolean(_) => "a boolean",
        toml::Value::Datetime(_) => "a date",
        toml::Value::Array(list) if list.is_empty() => "an empty list",
        toml::Value::Array(_) => "a list",
        toml::Value::Table(_) => "a table",
    }
}

/// What a value parser said, without clap's framing (which names the flag, not the key).
fn value_error(error: &clap::Error) -> String {
    match std::error::Error::source(error) {
        Some(inner) => inner.to_string(),
        None => one_line_error(error),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;
    use crate::app::cli::{Command, RunArgs};

    /// A config file with `text`, in a fresh temporary path.
    fn file(text: &str) -> PathBuf {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("clb-config-{}-{n}.toml", std::process::id()));
        std::fs::write(&path, text).unwrap();
        path
    }

    fn parse_run(args: &[&str]) -> Result<(RunArgs, Option<Loaded>), CommandLineError> {
        let argv = std::iter::once("cluster-lb").chain(args.iter().copied());
        let parsed = parse(argv.map(OsString::from).collect())?;
        match parsed.cli.command {
            Command::Run(run) => Ok((*run, parsed.file)),
            other => panic!("not run: {other:?}"),
        }
    }

    fn with_file(text: &str, args: &[&str]) -> Result<(RunArgs, Option<Loaded>), CommandLineError> {
        let path = file(text);
        let path_text = path.display().to_string();
        let mut all = vec!["run", "--config", &path_text];
        all.extend_from_slice(args);
        let result = parse_run(&all);
        std::fs::remove_file(&path).unwrap();
        result
    }

    const FULL: &str = r#"
        workers = 3
        listen = ["127.0.0.1:8080", "udp://127.0.0.1:5353"]
        strategy = "hash"
        require_ebpf = true
        grace = 5
        ready_delay = 0.5
        ready_timeout = 10
        name = "api"
        control = "/tmp/api.sock"
        metrics = "127.0.0.1:9100"
        node = "off"
        no_seccomp = false
        log_format = "json"
        command = ["node", "app.js", "--port", "-1"]
    "#;

    #[test]
    fn every_option_is_read_from_the_file() {
        let (run, file) = with_file(FULL, &[]).unwrap();
        assert_eq!(run.workers, Some(3));
        assert_eq!(run.listen.len(), 2);
        assert_eq!(run.listen[1].to_string(), "udp://127.0.0.1:5353");
        assert_eq!(run.strategy, Some(crate::kernel::Strategy::Hash));
        assert!(run.require_ebpf);
        assert!(!run.no_seccomp);
        assert_eq!(
            (run.grace, run.ready_delay, run.ready_timeout),
            (5.0, 0.5, 10.0)
        );
        assert_eq!(run.name.unwrap().as_str(), "api");
        assert_eq!(run.control.unwrap(), Path::new("/tmp/api.sock"));
        assert!(run.metrics.is_some());
        assert_eq!(run.node, crate::protocol::nodejs::detect::NodeMode::Off);
        assert_eq!(run.log_format, crate::logging::Format::Json);
        assert_eq!(run.command, ["node", "app.js", "--port", "-1"]);
        let file = file.unwrap();
        assert!(file.keys.iter().any(|k| k == "workers"));
        assert!(file.keys.iter().any(|k| k == "command"));
    }

    #[test]
    fn the_command_line_overrides_the_file() {
        let (run, file) = with_file(
            FULL,
            &[
                "-w",
                "7",
                "--listen",
                "9000",
                "--strategy",
                "sticky",
                "--",
                "./server",
            ],
        )
        .unwrap();
        assert_eq!(run.workers, Some(7));
        // A list given on the command line replaces the file's, it is not added to it.
        assert_eq!(run.listen, ["9000".parse().unwrap()]);
        assert_eq!(run.strategy, Some(crate::kernel::Strategy::Sticky));
        assert_eq!(run.command, ["./server"]);
        // What was not given still comes from the file.
        assert_eq!(run.grace, 5.0);
        assert_eq!(run.name.unwrap().as_str(), "api");
        let keys = file.unwrap().keys;
        for overridden in ["workers", "listen", "strategy", "command"] {
            assert!(
                !keys.iter().any(|k| k == overridden),
                "{overridden}: {keys:?}"
            );
        }
        assert!(keys.iter().any(|k| k == "grace"));
    }

    #[test]
    fn defaults_stay_when_neither_gives_a_value() {
        let (run, _) = with_file("command = [\"x\"]", &[]).unwrap();
        assert_eq!(run.grace, 30.0);
        assert_eq!(run.workers, None);
        assert!(run.listen.is_empty());
    }

    #[test]
    fn bad_files_name_the_key_and_the_problem_in_one_line() {
        let cases = [
            ("workers = 0", Some("workers"), "0 is not in 1..=1024"),
            ("workers = \"four\"", Some("workers"), "invalid digit"),
            (
                "workers = [1]",
                Some("workers"),
                "expected a string or a number, found a list",
            ),
            ("listen = \"nonsense\"", Some("listen"), "missing port"),
            (
                "listen = [80]",
                Some("listen"),
                "expected a list of strings",
            ),
            (
                "strategy = \"fast\"",
                Some("strategy"),
                "unknown strategy 'fast'",
            ),
            (
                "require_ebpf = \"yes\"",
                Some("require_ebpf"),
                "expected true or false",
            ),
            ("grace = -1", Some("grace"), "not a number of seconds"),
            (
                "ready-delay = 1",
                Some("ready-delay"),
                "did you mean `ready_delay`?",
            ),
            ("frobnicate = 1", Some("frobnicate"), "unknown key"),
            (
                "config = \"other.toml\"",
                Some("config"),
                "cannot name another",
            ),
            ("command = []", Some("command"), "found an empty list"),
            (
                "command = \"node app.js\"",
                Some("command"),
                "found a string",
            ),
            ("name = \"a/b\"", Some("name"), "is not a cluster name"),
            ("[section]\nworkers = 1", Some("section"), "unknown key"),
            ("workers = = 2", None, "line 1:"),
            ("workers = 2\nlisten = [\"80\"\n", None, "line 2:"),
        ];
        for (text, key, expected) in cases {
            let Err(CommandLineError::File(error)) = with_file(text, &[]) else {
                panic!("{text:?} was accepted");
            };
            assert_eq!(error.key.as_deref(), key, "{text:?}");
            let line = error.to_string();
            assert!(line.contains(expected), "{text:?}: {line}");
            assert!(!line.contains('\n'), "{text:?}: {line}");
            assert!(line.starts_with("config "), "{line}");
            if let Some(key) = key {
                assert!(line.contains(&format!(": key `{key}`: ")), "{line}");
            }
        }
    }

    #[test]
    fn a_bad_value_is_reported_even_when_a_flag_overrides_it() {
        let Err(CommandLineError::File(error)) = with_file("workers = 0", &["-w", "2", "--", "x"])
        else {
            panic!("accepted");
        };
        assert_eq!(error.key.as_deref(), Some("workers"));
    }

    #[test]
    fn the_workers_directory_is_the_key_cwd_as_in_pm2() {
        for key in ["cwd", "chdir"] {
            let (run, file) = with_file(&format!("{key} = \"/srv/app/current\""), &[]).unwrap();
            assert_eq!(run.chdir.as_deref(), Some(Path::new("/srv/app/current")));
            assert_eq!(file.unwrap().keys, ["cwd"], "{key}");
        }
        let (run, _) = with_file("cwd = \"/a\"", &["--chdir", "/b", "--", "x"]).unwrap();
        assert_eq!(run.chdir.as_deref(), Some(Path::new("/b")));
        let Err(CommandLineError::File(error)) = with_file("cwd = \"/a\"\nchdir = \"/b\"", &[])
        else {
            panic!("both keys accepted");
        };
        assert!(error.to_string().contains("the same option as"), "{error}");
        let error = with_file("cwd = \"/nonexistent\"\ncommand = [\"x\"]", &[])
            .map(|(run, file)| (run.into_options().unwrap_err(), file.unwrap()))
            .map(|(error, file)| file.blame(error.key(), &error).unwrap().to_string())
            .unwrap_or_else(|_| panic!("not parsed"));
        assert!(
            error.ends_with("key `cwd`: --chdir /nonexistent: no such directory"),
            "{error}"
        );
    }

    #[test]
    fn a_missing_file_is_one_line() {
        let Err(CommandLineError::File(error)) =
            parse_run(&["run", "--config", "/nonexistent/app.toml"])
        else {
            panic!("accepted");
        };
        let line = error.to_string();
        assert!(
            line.starts_with("config /nonexistent/app.toml: cannot read it"),
            "{line}"
        );
    }

    #[test]
    fn errors_found_after_merging_blame_the_file_only_for_its_own_values() {
        let (run, file) =
            with_file("listen = [\"80\", \"0.0.0.0:80\"]\ncommand = [\"x\"]", &[]).unwrap();
        let error = run.into_options().unwrap_err();
        let blamed = file.unwrap().blame(error.key(), &error).unwrap();
        assert!(blamed
            .to_string()
            .contains("key `listen`: --listen 0.0.0.0:80 is given twice"));
        let (run, file) = with_file(
            "command = [\"x\"]",
            &["--listen", "80", "--listen", "0.0.0.0:80"],
        )
        .unwrap();
        let error = run.into_options().unwrap_err();
        assert!(file.unwrap().blame(error.key(), &error).is_none());
    }

    #[test]
    fn watch_is_a_list_of_paths_and_a_missing_one_is_the_file_s_fault() {
        let here = std::env::temp_dir().display().to_string();
        let text = format!("watch = [\"{here}\", \"/\"]\ncommand = [\"x\"]");
        let (run, file) = with_file(&text, &[]).unwrap();
        assert_eq!(run.watch, [PathBuf::from(&here), PathBuf::from("/")]);
        assert!(file.unwrap().keys.contains(&"watch".to_string()));
        // One path alone, as for listen.
        let (run, _) = with_file("watch = \"/\"\ncommand = [\"x\"]", &[]).unwrap();
        assert_eq!(run.watch, [PathBuf::from("/")]);
        let (run, file) =
            with_file("watch = [\"/nonexistent/src\"]\ncommand = [\"x\"]", &[]).unwrap();
        let error = run.into_options().unwrap_err();
        let blamed = file.unwrap().blame(error.key(), &error).unwrap();
        assert!(
            blamed
                .to_string()
                .contains("key `watch`: --watch /nonexistent/src: no such file or directory"),
            "{blamed}"
        );
    }

    #[test]
    fn every_run_option_is_a_key() {
        let command = Cli::command();
        let run = command.find_subcommand("run").unwrap();
        let keys = known_keys(run);
        for key in [
            "workers",
            "listen",
            "strategy",
            "user",
            "group",
            "grace",
            "ready_delay",
            "ready_timeout",
            "node",
            "control",
            "name",
            "metrics",
            "log_format",
            "require_ebpf",
            "watch",
        ] {
            assert!(keys.iter().any(|k| k == key), "{key} missing from {keys:?}");
        }
        assert!(keys.iter().any(|k| k == "cwd"), "{keys:?}");
        for not_a_key in ["config", "help", "command", "chdir"] {
            assert!(!keys.iter().any(|k| k == not_a_key), "{not_a_key}");
        }
    }

    #[test]
    fn the_documented_config_files_are_valid() {
        let example = include_str!("../../../docs/app.toml");
        let readme = include_str!("../../../README.md");
        let in_readme = readme
            .split("```toml\n")
            .nth(1)
            .and_then(|rest| rest.split("```").next())
            .expect("README.md shows a config file");
        for text in [example, in_readme] {
            let (run, _) = with_file(text, &[]).unwrap_or_else(|e| match e {
                CommandLineError::File(e) => panic!("{e}"),
                CommandLineError::Args(e) => panic!("{e}"),
            });
            assert_eq!(run.name.unwrap().as_str(), "app");
            assert_eq!(run.workers, Some(4));
            assert_eq!(run.user.as_deref(), Some("www-data"));
            assert!(run.command[0].starts_with("/srv/app/"));
        }
    }

    #[test]
    fn env_gives_the_workers_variables_over_the_env_file() {
        let dotenv = file("VERSION=1\nFROM_FILE=yes\n");
        let text = format!(
            "env = {{ VERSION = \"2\", PORT = 3000, DEBUG = false }}\nenv_file = \"{}\"\ncommand = [\"x\"]",
            dotenv.display()
        );
        let (run, file) = with_file(&text, &[]).unwrap();
        let keys = file.unwrap().keys;
        assert!(keys.iter().any(|k| k == "env") && keys.iter().any(|k| k == "env_file"));
        let env = run.into_options().unwrap().supervisor.env;
        let at = |name: &str, value: &str| {
            env.iter()
                .position(|(k, v)| k == name && v == value)
                .unwrap_or_else(|| panic!("{name}={value} missing from {env:?}"))
        };
        assert!(at("VERSION", "1") < at("VERSION", "2"), "env applies last");
        at("FROM_FILE", "yes");
        at("PORT", "3000");
        at("DEBUG", "false");
        std::fs::remove_file(&dotenv).unwrap();
    }

    #[test]
    fn a_bad_env_or_env_file_is_one_line_naming_it() {
        for (text, expected) in [
            (
                "env = \"VERSION=1\"",
                "key `env`: expected a table of variables",
            ),
            (
                "env = { \"A=B\" = \"1\" }",
                "key `env`: 'A=B' is not a variable name",
            ),
            (
                "env = { A = [1] }",
                "key `env`: variable A: expected a string",
            ),
        ] {
            let Err(CommandLineError::File(error)) = with_file(text, &[]) else {
                panic!("{text:?} accepted");
            };
            let line = error.to_string();
            assert!(line.contains(expected), "{text:?}: {line}");
            assert!(!line.contains('\n'), "{line}");
        }
        let dotenv = file("GOOD=1\nexport BAD LINE\n");
        let (run, file) = with_file(
            &format!("env_file = \"{}\"\ncommand = [\"x\"]", dotenv.display()),
            &[],
        )
        .unwrap();
        let error = run.into_options().unwrap_err();
        let line = file
            .unwrap()
            .blame(error.key(), &error)
            .unwrap()
            .to_string();
        assert!(
            line.contains(&format!(
                "key `env_file`: env file {}: line 2: ",
                dotenv.display()
            )),
            "{line}"
        );
        std::fs::remove_file(&dotenv).unwrap();
    }

    /// The merged command line of `run --config FILE ARGS` with `text` in the file (at one
    /// path, so that two versions of the file compare as one file edited).
    fn merged_with(path: &Path, text: &str, args: &[&str]) -> Vec<OsString> {
        std::fs::write(path, text).unwrap();
        let path_text = path.display().to_string();
        let mut all = vec!["run", "--config", &path_text];
        all.extend_from_slice(args);
        let argv = std::iter::once("cluster-lb").chain(all.iter().copied());
        let parsed = parse(argv.map(OsString::from).collect()).unwrap_or_else(|e| match e {
            CommandLineError::File(e) => panic!("{e}"),
            CommandLineError::Args(e) => panic!("{e}"),
        });
        parsed.file.unwrap().merged
    }

    #[test]
    fn a_reload_refuses_a_changed_option_it_cannot_apply_by_its_key() {
        let path = file("");
        let base = "workers = 2\nlisten = [\"127.0.0.1:8080\"]\ngrace = 5\ncommand = [\"./a\"]\n";
        let before = merged_with(&path, base, &[]);
        let same = merged_with(&path, base, &[]);
        assert_eq!(changed_option(&path, &before, &same), Ok(None));
        // What a reload applies.
        let applied = "workers = 3\nlisten = [\"127.0.0.1:8080\"]\ngrace = 5\ncommand = [\"./b\", \"-v\"]\ncwd = \"/tmp\"\nenv_file = \"/tmp/x.env\"\nenv = { A = \"1\" }\n";
        let after = merged_with(&path, applied, &[]);
        assert_eq!(changed_option(&path, &before, &after), Ok(None));
        // What needs a restart, or an upgrade.
        let moved = base.replace("8080", "8081");
        let after = merged_with(&path, &moved, &[]);
        let line = changed_option(&path, &before, &after).unwrap().unwrap();
        assert_eq!(
            line,
            format!("config {}: key `listen` changed, and a reload applies only command, env, env_file, cwd and workers: restart the cluster to change it", path.display())
        );
        for (text, key) in [
            (base.replace("grace = 5", "grace = 6"), "grace"),
            (format!("{base}no_seccomp = true\n"), "no_seccomp"),
            (format!("{base}strategy = \"hash\"\n"), "strategy"),
            (format!("{base}user = \"nobody\"\n"), "user"),
            (format!("{base}metrics = \"127.0.0.1:9100\"\n"), "metrics"),
        ] {
            let after = merged_with(&path, &text, &[]);
            let line = changed_option(&path, &before, &after).unwrap().unwrap();
            assert!(line.contains(&format!("key `{key}` changed")), "{line}");
            assert!(!line.contains('\n'), "{line}");
            assert!(
                line.contains("`cluster-lb upgrade`") || line.contains("restart the cluster"),
                "{line}"
            );
        }
        // An option the command line gives is the command line's: the file's does not count.
        let before = merged_with(&path, base, &["--listen", "9000"]);
        let after = merged_with(&path, &moved, &["--listen", "9000"]);
        assert_eq!(changed_option(&path, &before, &after), Ok(None));
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn without_config_the_command_line_is_parsed_as_it_is() {
        let (run, file) = parse_run(&["run", "-w", "2", "--", "x"]).unwrap();
        assert_eq!(run.workers, Some(2));
        assert!(file.is_none());
        let Err(CommandLineError::Args(error)) = parse_run(&["run", "-w", "2"]) else {
            panic!("a run without command was accepted");
        };
        assert!(one_line_error(&error).contains("<CMD>"));
    }
}
