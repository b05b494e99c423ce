//! Node launchers in front of the worker command: what `run` does with `npm start`, `yarn
//! start`, `pnpm run X`, `node --watch` and nodemon before the supervisor sees the command.
//!
//! A launcher starts the app as a child of its own. Under cluster-lb that child does not get
//! Node's cluster channel (the launcher holds it, or it is not a Node child at all), so its
//! `listen()` binds the port alone: one worker serves, unbalanced, and the others crash-loop on
//! EADDRINUSE. A watcher (`node --watch`, nodemon) does the same, and restarts the app on a
//! file change, which is what `cluster-lb reload` does without failing a request.
//!
//! So: a package script that is a plain `node …` command is run directly, as npm would have
//! run it (the line that says so names the script and the command); anything else is refused
//! in one line naming what to run instead. Nothing here runs a shell or the package manager.

use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum LauncherError {
    #[error("node {flag} restarts the app in a child process of its own, which takes Node's cluster channel: its listen() would bind the port alone and the other workers would crash-loop; drop {flag} (cluster-lb run --watch DIR reloads the workers on a change without failing a request)")]
    NodeWatch { flag: String },
    #[error("nodemon restarts the app in a child process of its own, which takes Node's cluster channel: its listen() would bind the port alone and the other workers would crash-loop; run node directly (-- node SCRIPT), and cluster-lb run --watch DIR to reload the workers on a change without failing a request")]
    Nodemon,
    #[error("`{launcher}` needs the package.json in {dir}: {reason}; run the app's node command directly (-- node SCRIPT)")]
    NoPackage {
        launcher: String,
        dir: PathBuf,
        reason: String,
    },
    #[error("`{launcher}`: package.json in {dir} has no script \"{script}\"{hint}")]
    NoScript {
        launcher: String,
        dir: PathBuf,
        script: String,
        hint: &'static str,
    },
    #[error("`{launcher}` runs `{command}` (package.json's scripts.{script}), which is not a plain node command (a shell would run it, and its node would not get the cluster channel); run its node command directly (cluster-lb run [OPTIONS] -- node SCRIPT), or pass --node off if the app does not use Node's cluster module")]
    NotPlainNode {
        launcher: String,
        script: String,
        command: String,
    },
    #[error("`{launcher}` would first run package.json's scripts.{hook}, which cluster-lb does not; run `{manager} run {hook}` before cluster-lb, then -- {command}")]
    Hook {
        launcher: String,
        manager: String,
        hook: String,
        command: String,
    },
}

/// The worker command after the launcher, and the environment assignments a package script
/// put before its node (`NODE_ENV=production node server.js`).
#[derive(Debug, PartialEq, Eq)]
pub struct Resolved {
    pub command: Vec<String>,
    pub env: Vec<(String, String)>,
}

/// Looks through a launcher in `command`, reading package.json in `dir` for a package manager.
/// A command without a launcher comes back unchanged.
pub fn resolve(command: Vec<String>, dir: &Path) -> Result<Resolved, LauncherError> {
    let unchanged = |command| {
        Ok(Resolved {
            command,
            env: Vec::new(),
        })
    };
    let Some(first) = command.first() else {
        return unchanged(command);
    };
    let name = file_name(first);
    if is_node(&name) {
        if let Some(flag) = watch_flag(&command[1..]) {
            return Err(LauncherError::NodeWatch { flag });
        }
        return unchanged(command);
    }
    if name == "nodemon" {
        return Err(LauncherError::Nodemon);
    }
    let Some(manager) = Manager::from_name(&name) else {
        return unchanged(command);
    };
    let Some((script, extra)) = manager.script_of(&command[1..]) else {
        // Another subcommand (npm exec, yarn add): the supervisor's warning says what happens.
        return unchanged(command);
    };
    let launcher = command.join(" ");
    let package = read_package(dir).map_err(|reason| LauncherError::NoPackage {
        launcher: launcher.clone(),
        dir: dir.to_path_buf(),
        reason,
    })?;
    let scripts = package.get("scripts").and_then(|s| s.as_object());
    let text = match scripts
        .and_then(|s| s.get(&script))
        .and_then(|s| s.as_str())
    {
        Some(text) => text.to_string(),
        // npm's own default: `npm start` without a start script runs `node server.js`.
        None if script == "start" && dir.join("server.js").is_file() => "node server.js".into(),
        None => {
            let hint = if script == "start" {
                " and no server.js (npm's default start)"
            } else {
                ""
            };
            return Err(LauncherError::NoScript {
                launcher,
                dir: dir.to_path_buf(),
                script,
                hint,
            });
        }
    };
    let Some(mut resolved) = plain_node(&text) else {
        return Err(LauncherError::NotPlainNode {
            launcher,
            script,
            command: text,
        });
    };
    resolved.command.extend(extra);
    for hook in [format!("pre{script}"), format!("post{script}")] {
        if scripts.is_some_and(|s| s.contains_key(&hook)) {
            return Err(LauncherError::Hook {
                launcher,
                manager: manager.name().into(),
                hook,
                command: resolved.command.join(" "),
            });
        }
    }
    if let Some(flag) = watch_flag(&resolved.command[1..]) {
        return Err(LauncherError::NodeWatch { flag });
    }
    log::info!(
        "`{launcher}` runs `{text}` (package.json's scripts.{script}): cluster-lb runs `{}` itself, so that every worker is node with Node's cluster channel",
        resolved.command.join(" ")
    );
    Ok(resolved)
}

#[derive(Clone, Copy)]
enum Manager {
    Npm,
    Yarn,
    Pnpm,
}

impl Manager {
    fn from_name(name: &str) -> Option<Manager> {
        match name {
            "npm" => Some(Manager::Npm),
            "yarn" => Some(Manager::Yarn),
            "pnpm" => Some(Manager::Pnpm),
            _ => None,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Manager::Npm => "npm",
            Manager::Yarn => "yarn",
            Manager::Pnpm => "pnpm",
        }
    }

    /// The script a launch runs and the arguments it passes on: `start` or `run[-script] X`,
    /// then the arguments (npm takes them after `--`; yarn and pnpm take them as they come,
    /// and a leading `--` is dropped, as yarn 1 drops it).
    fn script_of(self, args: &[String]) -> Option<(String, Vec<String>)> {
        let (script, rest) = match args {
            [start, rest @ ..] if start == "start" => ("start".to_string(), rest),
            [run, script, rest @ ..]
                if run == "run" || (matches!(self, Manager::Npm) && run == "run-script") =>
            {
                (script.clone(), rest)
            }
            _ => return None,
        };
        let rest = match (self, rest) {
            (_, [dashes, rest @ ..]) if dashes == "--" => rest.to_vec(),
            // npm passes on only what follows `--`; anything else is npm's own option.
            (Manager::Npm, []) => Vec::new(),
            (Manager::Npm, _) => return None,
            (_, rest) => rest.to_vec(),
        };
        Some((script, rest))
    }
}

/// A package script that is `[NAME=value ...] node [ARGS ...]` with nothing a shell would
/// interpret (no quotes, variables, globs, redirections, pipes or command lists), its words
/// separated by spaces and tabs only, as sh splits them (any other control or space character
/// is refused rather than split on, where sh would keep it in a word).
fn plain_node(script: &str) -> Option<Resolved> {
    const SHELL: &[char] = &[
        '&', '|', ';', '<', '>', '$', '`', '(', ')', '{', '}', '*', '?', '[', ']', '!', '~', '"',
        '\'', '\\', '#',
    ];
    let odd = |c: char| c != ' ' && c != '\t' && (c.is_whitespace() || c.is_control());
    if script.contains(SHELL) || script.contains(odd) {
        return None;
    }
    let mut words = script
        .split([' ', '\t'])
        .filter(|word| !word.is_empty())
        .peekable();
    let mut env = Vec::new();
    while let Some((name, value)) = words.peek().and_then(|w| w.split_once('=')) {
        if !is_variable_name(name) {
            break;
        }
        env.push((name.to_string(), value.to_string()));
        words.next();
    }
    let node = words.next()?;
    if !is_node(&file_name(node)) {
        return None;
    }
    Some(Resolved {
        command: std::iter::once(node)
            .chain(words)
            .map(str::to_string)
            .collect(),
        env,
    })
}

/// `--watch` or `--watch-path[=P]` among node's own options (those before the script; the
/// value of an option such as `-r dotenv/config` is skipped, not taken for the script).
fn watch_flag(args: &[String]) -> Option<String> {
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        if !arg.starts_with('-') || arg == "--" {
            return None;
        }
        let option = arg.split('=').next().unwrap_or(arg);
        if matches!(option, "--watch" | "--watch-path") {
            return Some(option.to_string());
        }
        if option == arg && crate::protocol::nodejs::detect::takes_value(option) {
            args.next();
        }
    }
    None
}

fn read_package(dir: &Path) -> Result<serde_json::Map<String, serde_json::Value>, String> {
    let path = dir.join("package.json");
    let text = std::fs::read_to_string(&path).map_err(|e| e.to_string())?;
    match serde_json::from_str(&text) {
        Ok(serde_json::Value::Object(package)) => Ok(package),
        Ok(_) => Err("it is not a JSON object".into()),
        Err(e) => Err(format!("it is not JSON ({e})")),
    }
}

fn is_variable_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

fn is_node(name: &str) -> bool {
    crate::protocol::nodejs::detect::is_node_name(name)
}

fn file_name(word: &str) -> String {
    Path::new(word)
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(text: &str) -> Vec<String> {
        text.split_whitespace().map(str::to_string).collect()
    }

    use cluster_lb_tests::ScratchDir as Scratch;

    fn package(scripts: serde_json::Value) -> Scratch {
        let dir = Scratch::new("launcher");
        let body = serde_json::json!({ "name": "app", "scripts": scripts });
        std::fs::write(dir.path().join("package.json"), body.to_string()).expect("package.json");
        dir
    }

    fn command_of(result: Result<Resolved, LauncherError>) -> String {
        match result {
            Ok(resolved) => resolved.command.join(" "),
            Err(error) => panic!("{error}"),
        }
    }

    #[test]
    fn plain_node_scripts_are_run_directly_with_their_arguments() {
        let dir = package(serde_json::json!({
            "start": "node server.js --port 3000",
            "serve": "NODE_ENV=production node --enable-source-maps dist/main.js",
        }));
        let at = dir.path();
        assert_eq!(
            command_of(resolve(words("npm start"), at)),
            "node server.js --port 3000"
        );
        assert_eq!(
            command_of(resolve(words("/usr/bin/npm start -- --verbose"), at)),
            "node server.js --port 3000 --verbose"
        );
        assert_eq!(
            command_of(resolve(words("yarn start --verbose"), at)),
            "node server.js --port 3000 --verbose"
        );
        assert_eq!(
            command_of(resolve(words("pnpm run start -- --verbose"), at)),
            "node server.js --port 3000 --verbose"
        );
        let serve = resolve(words("npm run-script serve"), at).expect("serve");
        assert_eq!(
            serve.command,
            words("node --enable-source-maps dist/main.js")
        );
        assert_eq!(serve.env, [("NODE_ENV".into(), "production".into())]);
    }

    #[test]
    fn other_commands_are_left_alone() {
        let dir = package(serde_json::json!({}));
        for command in [
            "node app.js",
            "python3 app.py",
            "npm exec foo",
            "npm start --silent",
        ] {
            assert_eq!(command_of(resolve(words(command), dir.path())), command);
        }
    }

    #[test]
    fn start_defaults_to_server_js_as_npm_does() {
        let dir = package(serde_json::json!({}));
        let missing = resolve(words("npm start"), dir.path());
        assert!(matches!(missing, Err(LauncherError::NoScript { .. })));
        std::fs::write(dir.path().join("server.js"), "").expect("server.js");
        assert_eq!(
            command_of(resolve(words("npm start"), dir.path())),
            "node server.js"
        );
    }

    #[test]
    fn what_is_not_plain_node_is_refused_naming_the_script() {
        let dir = package(serde_json::json!({
            "start": "node migrate.js && node server.js",
            "dev": "tsc -w",
            "quoted": "node -e 'x'",
            "watch": "node --watch server.js",
            "hooked": "node server.js",
            "prehooked": "node migrate.js",
            "carriage": "node server.js\r",
            "nbsp": "node\u{a0}server.js",
        }));
        let at = dir.path();
        let error = |command: &str| match resolve(words(command), at) {
            Err(error) => error.to_string(),
            Ok(resolved) => panic!("{command} gave {resolved:?}"),
        };
        assert!(error("npm start").contains("`node migrate.js && node server.js`"));
        assert!(error("yarn run dev").contains("not a plain node command"));
        assert!(error("npm run quoted").contains("not a plain node command"));
        // sh splits on spaces and tabs only: these would be one odd word there.
        assert!(error("npm run carriage").contains("not a plain node command"));
        assert!(error("npm run nbsp").contains("not a plain node command"));
        assert!(error("npm run watch").contains("node --watch"));
        assert!(error("npm run hooked").contains("scripts.prehooked"));
        assert!(error("node --watch server.js").contains("drop --watch"));
        assert!(error("node --watch-path=src server.js").contains("drop --watch-path"));
        assert!(error("node -r dotenv/config --watch server.js").contains("drop --watch"));
        assert!(error("node --require ./env.js --watch-path src x.js").contains("--watch-path"));
        assert!(error("nodemon server.js").contains("nodemon"));
        let empty = Scratch::new("launcher");
        let none = resolve(words("npm start"), empty.path()).map(|r| r.command);
        assert!(
            matches!(&none, Err(LauncherError::NoPackage { .. })),
            "{none:?}"
        );
        // node's --watch after the script is the script's own argument.
        assert_eq!(
            command_of(resolve(words("node server.js --watch"), at)),
            "node server.js --watch"
        );
    }
}
