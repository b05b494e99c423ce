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
    #[error("tsx watch restarts the app in a child process of its own, which takes Node's cluster channel: its listen() would bind the port alone and the other workers would crash-loop; run `tsx SCRIPT` (cluster-lb runs it as node --import tsx) with cluster-lb run --watch DIR, which reloads the workers on a change without failing a request")]
    TsxWatch,
    #[error("`{launcher}`: {reason}; install tsx in the app (npm install tsx), or run -- node --import tsx SCRIPT")]
    Tsx { launcher: String, reason: String },
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
    if name == "tsx" {
        let resolved = through_tsx(&command, dir)?;
        log::info!(
            "`{}` runs node as a child process of its own: cluster-lb runs `{}` itself, so that every worker is node with Node's cluster channel",
            command.join(" "),
            resolved.command.join(" ")
        );
        return Ok(resolved);
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
    if file_name(&resolved.command[0]) == "tsx" {
        let through = through_tsx(&resolved.command, dir)?;
        resolved.command = through.command;
        resolved.env.extend(through.env);
    }
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

/// A package script that is `[NAME=value ...] node|tsx [ARGS ...]` with nothing a shell would
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
    let program = file_name(node);
    if !is_node(&program) && program != "tsx" {
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

/// `tsx [OPTIONS] SCRIPT [ARGS]` as the node command it stands for. tsx 4's command line runs
/// the app in a child node (`--require preflight --import loader`) over a channel of its own,
/// so cluster-lb runs `node --import <tsx's main export> [OPTIONS] SCRIPT [ARGS]` itself, the
/// way tsx's documentation gives for node's own command line. Its options --tsconfig and
/// --no-cache become the variables its command line sets for that child; the others are
/// node's, as tsx passes them.
fn through_tsx(command: &[String], dir: &Path) -> Result<Resolved, LauncherError> {
    let launcher = command.join(" ");
    let failed = |reason: String| LauncherError::Tsx {
        launcher: launcher.clone(),
        reason,
    };
    let args = &command[1..];
    if args.first().is_some_and(|a| a == "watch") {
        return Err(LauncherError::TsxWatch);
    }
    let loader = tsx_loader(&command[0], dir).map_err(failed)?;
    let mut env = Vec::new();
    let mut node = vec!["node".to_string(), "--import".to_string(), loader];
    let mut rest = args.iter();
    while let Some(arg) = rest.next() {
        if !arg.starts_with('-') || arg == "-" || arg == "--" {
            node.push(arg.clone());
            break;
        }
        let (option, value) = match arg.split_once('=') {
            Some((option, value)) => (option, Some(value.to_string())),
            None => (arg.as_str(), None),
        };
        match option {
            "--no-cache" => env.push(("TSX_DISABLE_CACHE".to_string(), "1".to_string())),
            "--tsconfig" => {
                let path = value
                    .or_else(|| rest.next().cloned())
                    .ok_or_else(|| failed("--tsconfig needs a file".into()))?;
                env.push(("TSX_TSCONFIG_PATH".to_string(), path));
            }
            _ => {
                node.push(arg.clone());
                if value.is_none() && crate::protocol::nodejs::detect::takes_value(option) {
                    node.extend(rest.next().cloned());
                }
            }
        }
    }
    node.extend(rest.cloned());
    Ok(Resolved { command: node, env })
}

/// The file URL of tsx's main export (exports["."] of its package.json, the module tsx's docs
/// pass to `node --import`), found from the tsx executable: `word` as a path from `dir`, or by
/// name in `dir`/node_modules/.bin, then on PATH, as a package script or a shell finds it.
fn tsx_loader(word: &str, dir: &Path) -> Result<String, String> {
    let executable = if word.contains('/') {
        Some(dir.join(word))
    } else {
        let path = std::env::var_os("PATH").unwrap_or_default();
        std::iter::once(dir.join("node_modules/.bin"))
            .chain(std::env::split_paths(&path))
            .map(|directory| directory.join(word))
            .find(|candidate| candidate.is_file())
    }
    .ok_or_else(|| {
        format!(
            "no {word} in {}/node_modules/.bin or on PATH",
            dir.display()
        )
    })?;
    let real =
        std::fs::canonicalize(&executable).map_err(|e| format!("{}: {e}", executable.display()))?;
    let (package, manifest) = real
        .ancestors()
        .skip(1)
        .find_map(|directory| {
            let manifest = read_package(directory).ok()?;
            (manifest.get("name").and_then(|n| n.as_str()) == Some("tsx"))
                .then_some((directory, manifest))
        })
        .ok_or_else(|| format!("{} is not in tsx's package", real.display()))?;
    let main = match manifest.get("exports").and_then(|e| e.get(".")) {
        Some(serde_json::Value::String(main)) => Some(main.clone()),
        Some(conditions) => ["import", "default"].iter().find_map(|c| {
            conditions
                .get(c)
                .and_then(|m| m.as_str())
                .map(str::to_string)
        }),
        None => None,
    }
    .ok_or_else(|| format!("{}/package.json exports no \".\"", package.display()))?;
    match main
        .strip_prefix("./")
        .map(|relative| package.join(relative))
    {
        Some(file) if file.is_file() => Ok(file_url(&file)),
        _ => Err(format!(
            "tsx's main export {main} is not a file in {}",
            package.display()
        )),
    }
}

/// `path` (absolute) as a file URL, every byte but unreserved ones and `/` percent-encoded.
fn file_url(path: &Path) -> String {
    use std::os::unix::ffi::OsStrExt;
    let mut url = String::from("file://");
    for &byte in path.as_os_str().as_bytes() {
        if byte.is_ascii_alphanumeric() || b"-._~/".contains(&byte) {
            url.push(char::from(byte));
        } else {
            url.push_str(&format!("%{byte:02X}"));
        }
    }
    url
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

    /// A tsx package laid out as npm installs it: the bin link into dist/cli.mjs, the main
    /// export dist/loader.mjs.
    fn with_tsx(dir: &Path) {
        let package = dir.join("node_modules/tsx");
        std::fs::create_dir_all(package.join("dist")).expect("tsx/dist");
        std::fs::create_dir_all(dir.join("node_modules/.bin")).expect(".bin");
        let manifest = serde_json::json!({"name": "tsx", "exports": {".": "./dist/loader.mjs", "./cli": "./dist/cli.mjs"}});
        std::fs::write(package.join("package.json"), manifest.to_string()).expect("package.json");
        std::fs::write(package.join("dist/loader.mjs"), "").expect("loader.mjs");
        std::fs::write(package.join("dist/cli.mjs"), "").expect("cli.mjs");
        std::os::unix::fs::symlink("../tsx/dist/cli.mjs", dir.join("node_modules/.bin/tsx"))
            .expect("the bin link");
    }

    #[test]
    fn tsx_runs_as_node_with_its_loader_and_its_options_as_its_cli_gives_them() {
        let dir = package(serde_json::json!({"start": "NODE_ENV=production tsx src/main.ts"}));
        with_tsx(dir.path());
        let loader = file_url(
            &std::fs::canonicalize(dir.path().join("node_modules/tsx/dist/loader.mjs"))
                .expect("the loader"),
        );
        let resolved = resolve(
            words("tsx --tsconfig tsconfig.prod.json --no-cache -r ./env.js app.ts --port 3"),
            dir.path(),
        )
        .expect("tsx");
        assert_eq!(
            resolved.command,
            words(&format!(
                "node --import {loader} -r ./env.js app.ts --port 3"
            ))
        );
        assert_eq!(
            resolved.env,
            [
                ("TSX_TSCONFIG_PATH".into(), "tsconfig.prod.json".into()),
                ("TSX_DISABLE_CACHE".into(), "1".into())
            ]
        );
        // A package script running tsx, and tsx by its path.
        let start = resolve(words("npm start"), dir.path()).expect("npm start");
        assert_eq!(
            start.command,
            words(&format!("node --import {loader} src/main.ts"))
        );
        assert_eq!(start.env, [("NODE_ENV".into(), "production".into())]);
        let by_path = resolve(words("./node_modules/.bin/tsx app.ts"), dir.path());
        assert_eq!(
            command_of(by_path),
            format!("node --import {loader} app.ts")
        );
        // tsx watch is refused; a tsx that is not there says where it looked.
        let watch = resolve(words("tsx watch app.ts"), dir.path()).map(|r| r.command);
        assert!(matches!(watch, Err(LauncherError::TsxWatch)), "{watch:?}");
        let empty = Scratch::new("launcher");
        let missing = resolve(words("./tsx app.ts"), empty.path()).map(|r| r.command);
        assert!(
            matches!(&missing, Err(LauncherError::Tsx { .. })),
            "{missing:?}"
        );
        assert_eq!(
            file_url(Path::new("/srv/my app/#1")),
            "file:///srv/my%20app/%231"
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
