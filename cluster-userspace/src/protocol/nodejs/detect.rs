//! Whether a worker command is a Node program, for `--node auto`.

use std::{
    fs,
    io::Read,
    path::{Path, PathBuf},
};

/// `--node`: whether workers get Node's cluster channel.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum NodeMode {
    /// When the program is `node` (or `nodejs`), or a script whose `#!` line runs node.
    #[default]
    Auto,
    /// Always (for a wrapper that execs node, e.g. `sh -c 'exec node app.js'`).
    On,
    /// Never: workers take their sockets by socket activation only.
    Off,
}

impl std::str::FromStr for NodeMode {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text {
            "auto" => Ok(NodeMode::Auto),
            "on" => Ok(NodeMode::On),
            "off" => Ok(NodeMode::Off),
            _ => Err(format!(
                "unknown --node value '{text}'; use auto, on or off"
            )),
        }
    }
}

/// What `--node auto` concluded about a command, with the reason to log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    Node,
    NotNode,
    /// A Node launcher (npm, npx, yarn, pnpm): it would take the channel itself and start the
    /// app as a plain child, so the app's listen() would not reach cluster-lb.
    Launcher(String),
}

/// Decides for `program` (the resolved path of the command's first word).
pub fn detect(program: &Path) -> Verdict {
    let name = file_name(program);
    if is_launcher(&name) {
        return Verdict::Launcher(name);
    }
    if is_node_name(&name) {
        return Verdict::Node;
    }
    // A symlink such as /usr/bin/nodejs -> node, or an alternatives link.
    if let Ok(real) = fs::canonicalize(program) {
        if is_node_name(&file_name(&real)) {
            return Verdict::Node;
        }
    }
    match shebang_interpreter(program) {
        Some(interpreter) if is_launcher(&interpreter) => Verdict::Launcher(interpreter),
        Some(interpreter) if is_node_name(&interpreter) => Verdict::Node,
        _ => Verdict::NotNode,
    }
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// `node`, `nodejs`, or a versioned name such as `node20`.
pub(crate) fn is_node_name(name: &str) -> bool {
    let rest = name
        .strip_prefix("nodejs")
        .or_else(|| name.strip_prefix("node"));
    rest.is_some_and(|rest| rest.chars().all(|c| c.is_ascii_digit() || c == '.'))
}

fn is_launcher(name: &str) -> bool {
    matches!(name, "npm" | "npx" | "yarn" | "pnpm" | "nodemon")
}

/// The program a `#!` line runs: `#!/usr/bin/node`, `#!/usr/bin/env node`,
/// `#!/usr/bin/env -S node --flag`.
fn shebang_interpreter(path: &Path) -> Option<String> {
    let mut head = [0u8; 256];
    let read = fs::File::open(path).ok()?.read(&mut head).ok()?;
    let text = std::str::from_utf8(&head[..read]).ok()?;
    let line = text.strip_prefix("#!")?.lines().next()?;
    let mut words = line.split_whitespace();
    let first = PathBuf::from(words.next()?);
    if file_name(&first) != "env" {
        return Some(file_name(&first));
    }
    words
        .find(|word| !word.starts_with('-'))
        .map(|word| file_name(Path::new(word)))
}

/// Whether a Node command runs a script file (`node app.js`), which Node needs to set up a
/// cluster worker at all: with `node -e` or the REPL there is no worker, and a listen() would
/// crash in Node's cluster code.
pub fn runs_a_script(command: &[String]) -> bool {
    let mut args = command.iter().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "-e" | "--eval" | "-p" | "--print" | "-i" | "--interactive" | "-" => return false,
            option if takes_value(option) => {
                args.next();
            }
            option if option.starts_with('-') => {}
            _ => return true,
        }
    }
    false
}

/// Node's options that take their value in the next argument (`-r dotenv/config`).
pub(crate) fn takes_value(option: &str) -> bool {
    matches!(
        option,
        "-r" | "--require"
            | "--import"
            | "--loader"
            | "--experimental-loader"
            | "--conditions"
            | "-C"
            | "--env-file"
            | "--title"
            | "--watch-path"
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn node_binaries_scripts_and_launchers_are_told_apart() {
        assert_eq!(detect(Path::new("/usr/bin/node")), Verdict::Node);
        assert_eq!(detect(Path::new("/opt/node20")), Verdict::Node);
        assert_eq!(detect(Path::new("/usr/bin/nodejs")), Verdict::Node);
        assert_eq!(detect(Path::new("/usr/bin/python3")), Verdict::NotNode);
        assert_eq!(
            detect(Path::new("/usr/bin/nodemon")),
            Verdict::Launcher("nodemon".into())
        );
        assert_eq!(
            detect(Path::new("/usr/bin/npm")),
            Verdict::Launcher("npm".into())
        );
        let dir = std::env::temp_dir().join(format!("clb-detect-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        for (name, first_line, expected) in [
            ("env-node", "#!/usr/bin/env node", Verdict::Node),
            (
                "env-s-node",
                "#!/usr/bin/env -S node --max-old-space-size=100",
                Verdict::Node,
            ),
            ("direct", "#!/usr/local/bin/node", Verdict::Node),
            ("shell", "#!/bin/sh", Verdict::NotNode),
            ("plain", "console.log(1)", Verdict::NotNode),
        ] {
            let path = dir.join(name);
            fs::write(&path, format!("{first_line}\nrest\n")).unwrap();
            fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).unwrap();
            assert_eq!(detect(&path), expected, "{first_line}");
        }
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_script_argument_is_needed() {
        let words = |s: &str| s.split(' ').map(String::from).collect::<Vec<_>>();
        assert!(runs_a_script(&words("node app.js")));
        assert!(runs_a_script(&words(
            "node --max-old-space-size=100 -r ./preload.js app.js --port 3"
        )));
        assert!(!runs_a_script(&words("node -e require('http')")));
        assert!(!runs_a_script(&words("node")));
        assert!(!runs_a_script(&words("node --inspect")));
    }
}
