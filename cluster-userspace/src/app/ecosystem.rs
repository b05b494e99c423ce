//! `cluster-lb run --config ecosystem.config.js [--env NAME] [--app NAME]`: PM2's own file.
//!
//! An ecosystem file is a program: `ecosystem.config.js` is `require()`d by PM2 (it may read
//! `process.env`, `process.argv`, require other files), and even a `.json` one is evaluated as
//! a JavaScript expression (comments allowed). So there is no parser here: `node`, the one on
//! PATH that runs the app, evaluates it with a small loader ([`LOADER`]) and prints it as JSON,
//! as PM2's CLI would see it. The file is chosen by its name, as PM2 does (`.json` anywhere in
//! it, or `.config.js`, `.config.cjs`, `.config.mjs`); every other file is TOML.
//!
//! The chosen app is then mapped, in [`map`], onto the options of `run` as a TOML table, which
//! `config_file` merges under the command line exactly as it does a TOML file's (so a flag
//! still wins, and every value passes the flag's own checks); its environment and directory,
//! which have no flag, travel beside it. Each key cluster-lb does not honour is named, all in
//! one warning line: PM2 itself drops unknown keys silently, which hides typos. What each PM2
//! key becomes, and why: docs/PM2.md.

use std::{
    collections::BTreeMap,
    io::Read,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use serde_json::{Map, Value};

/// How a PM2 file is evaluated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// `require()` (and `import()` for ES modules): `.config.js`, `.config.cjs`, `.config.mjs`.
    Js,
    /// A JavaScript expression: `.json`, `.json5`.
    Json,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Js => "js",
            Kind::Json => "json",
        }
    }
}

/// Whether `path` names a PM2 file (and which kind), by PM2's rule: a substring of its name,
/// `.json` checked first (`app.config.json` is JSON). `Err` for a format PM2 reads and
/// cluster-lb does not.
pub fn kind(path: &Path) -> Result<Option<Kind>, String> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    if name.contains(".json") {
        return Ok(Some(Kind::Json));
    }
    if name.contains(".yml") || name.contains(".yaml") {
        return Err("a YAML ecosystem file is not read by cluster-lb; write it as ecosystem.config.js (module.exports = { apps: [...] }) or .json".into());
    }
    if [".config.js", ".config.cjs", ".config.mjs"]
        .iter()
        .any(|ext| name.contains(ext))
    {
        return Ok(Some(Kind::Js));
    }
    Ok(None)
}

/// The loader node runs (`node -e LOADER FILE [--env NAME]`): it evaluates the file as PM2's
/// CLI does and prints it as JSON after a marker, so that whatever the file itself prints
/// (a console.log in a config is not rare) cannot be taken for it. `process.argv` holds
/// `--env NAME`, for files that read it there (some do, to pick their own values). An ES
/// module's `default` export is taken as the config when it has no `apps` export (PM2 wants
/// `export const apps`; being more forgiving costs nothing).
const LOADER: &str = r#"(function () {
  'use strict';
  const fs = require('fs');
  const url = require('url');
  const file = process.argv[1];
  const done = (config) => {
    let text;
    try {
      text = JSON.stringify(config === undefined ? null : config);
    } catch (e) {
      return fail(e);
    }
    fs.writeSync(1, '\n\u0001cluster-lb-ecosystem\u0001' + text + '\n');
    process.exit(0);
  };
  const fail = (e) => {
    let line = String(e && e.message !== undefined ? e.message : e).split('\n')[0];
    if (e && e.name) line = e.name + ': ' + line;
    const stack = String((e && e.stack) || '');
    const at = stack.indexOf(file + ':');
    if (at >= 0) {
      const lineNo = stack.slice(at + file.length + 1).match(/^\d+/);
      if (lineNo) line += ' (line ' + lineNo[0] + ')';
    }
    fs.writeSync(2, line + '\n');
    process.exit(1);
  };
  const esm = (ns) => (ns && ns.apps === undefined && ns.default !== undefined ? ns.default : ns);
  try {
    if (process.env.CLUSTER_LB_ECOSYSTEM === 'json') {
      const vm = require('vm');
      const code = '(' + fs.readFileSync(file, 'utf8') + '\n)';
      return done(vm.runInThisContext(code, { filename: file, timeout: 1000 }));
    }
    let loaded;
    try {
      loaded = require(file);
    } catch (e) {
      if (e && (e.code === 'ERR_REQUIRE_ESM' || e.code === 'ERR_REQUIRE_ASYNC_MODULE')) {
        return import(url.pathToFileURL(file).href).then((ns) => done(esm(ns)), fail);
      }
      throw e;
    }
    if (loaded && typeof loaded.then === 'function') return loaded.then(done, fail);
    done(esm(loaded));
  } catch (e) {
    fail(e);
  }
})();
"#;

/// What separates the file's own output from the loader's JSON.
const MARKER: &str = "\u{1}cluster-lb-ecosystem\u{1}";
/// How long node may take to evaluate a file (one that starts a server never finishes).
const EVALUATE_TIMEOUT: Duration = Duration::from_secs(10);
/// The most output of node's that is read (a config is a few kilobytes).
const MAX_OUTPUT: u64 = 16 << 20;

/// Runs `node` on the file; its value as JSON, or one line saying why not.
pub fn evaluate(path: &Path, kind: Kind, env_name: Option<&str>) -> Result<Value, String> {
    let absolute = std::path::absolute(path).map_err(|e| format!("cannot read it: {e}"))?;
    if !absolute.is_file() {
        return Err(match std::fs::metadata(&absolute) {
            Err(e) => format!("cannot read it: {e}"),
            Ok(_) => "cannot read it: not a file".into(),
        });
    }
    let mut command = Command::new("node");
    command
        .arg("-e")
        .arg(LOADER)
        .arg(&absolute)
        .env("CLUSTER_LB_ECOSYSTEM", kind.name())
        // Started by a Node primary, cluster-lb must not hand that primary's channel on.
        .env_remove("NODE_CHANNEL_FD")
        .env_remove("NODE_UNIQUE_ID")
        .env_remove("NODE_CHANNEL_SERIALIZATION_MODE")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(name) = env_name {
        command.arg("--env").arg(name);
    }
    let mut child = command.spawn().map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => "a PM2 ecosystem file is a JavaScript program, evaluated with node, and there is no node on PATH; install Node.js, or write the options as TOML (docs/app.toml)".to_string(),
        _ => format!("cannot start node to evaluate it: {e}"),
    })?;
    let reader = |stream: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut bytes = Vec::new();
            if let Some(stream) = stream {
                let _ = stream.take(MAX_OUTPUT).read_to_end(&mut bytes);
            }
            bytes
        })
    };
    let stdout = reader(
        child
            .stdout
            .take()
            .map(|s| Box::new(s) as Box<dyn Read + Send>),
    );
    let stderr = reader(
        child
            .stderr
            .take()
            .map(|s| Box::new(s) as Box<dyn Read + Send>),
    );
    let deadline = Instant::now() + EVALUATE_TIMEOUT;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "node did not finish evaluating it within {}s (does it start a server, or wait for something?)",
                    EVALUATE_TIMEOUT.as_secs()
                ));
            }
            Err(e) => return Err(format!("waiting for node: {e}")),
        }
    };
    let out = stdout.join().unwrap_or_default();
    let err = stderr.join().unwrap_or_default();
    let out = String::from_utf8_lossy(&out);
    if !status.success() {
        let err = String::from_utf8_lossy(&err);
        let why = err
            .lines()
            .map(str::trim)
            .rfind(|l| !l.is_empty())
            .unwrap_or("no message");
        return Err(format!("node could not evaluate it: {why}"));
    }
    let Some((printed, json)) = out.rsplit_once(MARKER) else {
        return Err("node printed no value for it".into());
    };
    // What the file printed itself goes where the user sees it.
    let printed = printed.trim_end_matches('\n');
    if !printed.is_empty() {
        eprintln!("{printed}");
    }
    serde_json::from_str(json.trim()).map_err(|e| format!("node printed no JSON value: {e}"))
}

/// One app mapped onto `run`'s options.
#[derive(Debug, Default)]
pub struct Mapped {
    /// `run`'s options as config file keys (merged under the command line).
    pub table: toml::Table,
    /// Variables the workers get over the primary's environment.
    pub env: Vec<(String, String)>,
    /// Lines to log as warnings once logging runs.
    pub warnings: Vec<String>,
}

/// What is wrong with the file (one line): the key, if one is to blame, and the problem.
#[derive(Debug, PartialEq, Eq)]
pub struct MapError {
    pub key: Option<String>,
    pub detail: String,
}

fn bad(key: &str, detail: impl Into<String>) -> MapError {
    MapError {
        key: Some(key.to_string()),
        detail: detail.into(),
    }
}

/// What [`map`] needs besides the file's value.
pub struct Context<'a> {
    /// `--env NAME`.
    pub env_name: Option<&'a str>,
    /// `--app NAME`.
    pub app: Option<&'a str>,
    /// The directory cluster-lb runs in: PM2 resolves `cwd` and `script` against its CLI's.
    pub base: &'a Path,
    /// The CPUs `instances: 'max'` means.
    pub cpus: u32,
    /// `$PM2_KILL_SIGNAL` of cluster-lb's environment (PM2's daemon-wide stop signal).
    pub pm2_kill_signal: Option<&'a str>,
}

/// Keys cluster-lb maps onto its own options or behaviour.
const HONOURED: &[&str] = &[
    "name",
    "script",
    "args",
    "interpreter",
    "node_args",
    "cwd",
    "instances",
    "exec_mode",
    "env",
    "port",
    "instance_var",
    "increment_var",
    "kill_timeout",
    "kill_signal",
    "wait_ready",
    "listen_timeout",
    // One stream already: every worker's lines go to the primary's stderr, each prefixed
    // with its worker id.
    "merge_logs",
    // --max-memory: PM2 reloads an instance whose RSS is above it (checked every 30 s);
    // cluster-lb replaces a worker whose PSS is, its replacement ready first.
    "max_memory_restart",
    "uid",
    "gid",
    "append_env_to_name",
];

/// Keys about PM2 itself (its process list, its monitoring service, its daemon) that mean
/// nothing to a cluster-lb primary, whatever their value.
const PM2_BOOKKEEPING: &[&str] = &[
    "namespace",
    "vizion",
    "pmx",
    "automation",
    "trace",
    "disable_trace",
    "v8",
    "event_loop_inspector",
    "deep_monitoring",
    "io",
    "force",
    "kill_retry_time",
    "windows_hide",
    "username",
    "post_update",
    "install_url",
    "name_prefix",
    "write",
];

/// Keys whose value here is PM2's default, so that nothing is lost by not reading them.
fn is_default(key: &str, value: &Value) -> bool {
    match (key, value) {
        (_, Value::Null) | (_, Value::Bool(false)) => key != "autorestart" && key != "treekill",
        ("autorestart" | "treekill" | "autostart", Value::Bool(true)) => true,
        _ => false,
    }
}

/// PM2's aliases (its schema's `alias` and the camelCase form of every key), as the key they
/// stand for.
fn canonical(key: &str) -> String {
    let mut snake = String::new();
    for c in key.chars() {
        if c.is_ascii_uppercase() {
            snake.push('_');
            snake.push(c.to_ascii_lowercase());
        } else {
            snake.push(c);
        }
    }
    let known = match snake.as_str() {
        "exec" | "cmd" | "command" => "script",
        "exec_interpreter" => "interpreter",
        "interpreter_args" => "node_args",
        "combine_logs" => "merge_logs",
        "out" | "output" | "out_log" => "out_file",
        "error" | "err" | "err_file" | "err_log" => "error_file",
        "log" => "log_file",
        "cron" => "cron_restart",
        "pid" => "pid_file",
        "user" => "uid",
        other => other,
    };
    known.to_string()
}

/// The apps of a file's value, as PM2's `_startJson` finds them: `apps`, else `pm2`, else the
/// value itself; one object or a list.
fn apps(config: &Value) -> Result<Vec<&Map<String, Value>>, MapError> {
    let list = config
        .get("apps")
        .or_else(|| config.get("pm2"))
        .unwrap_or(config);
    let items: Vec<&Value> = match list {
        Value::Array(items) => items.iter().collect(),
        other => vec![other],
    };
    if items.is_empty() {
        return Err(bad(
            "apps",
            "the list is empty; add an app ({ name: 'api', script: './server.js', instances: 4 })",
        ));
    }
    items
        .into_iter()
        .map(|item| {
            item.as_object().ok_or_else(|| {
                bad(
                    "apps",
                    format!(
                        "expected app objects ({{ script: './server.js', ... }}), found {}",
                        kind_of(item)
                    ),
                )
            })
        })
        .collect()
}

/// An app's name as PM2 gives it: `name`, else the script's base name without extension.
fn app_name(app: &Map<String, Value>) -> String {
    if let Some(name) = app.get("name").and_then(Value::as_str) {
        return name.to_string();
    }
    let script = ["script", "exec", "cmd", "command"]
        .iter()
        .find_map(|k| app.get(*k).and_then(Value::as_str))
        .unwrap_or("app");
    let base = Path::new(script)
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    if base.is_empty() {
        script.to_string()
    } else {
        base
    }
}

/// Maps the app the context picks from the file's value onto `run`'s options.
pub fn map(config: &Value, context: &Context<'_>) -> Result<Mapped, MapError> {
    let all = apps(config)?;
    let names: Vec<String> = all.iter().map(|app| app_name(app)).collect();
    let index = match context.app {
        Some(wanted) => names.iter().position(|n| n == wanted).ok_or_else(|| MapError {
            key: None,
            detail: format!(
                "--app {wanted}: no app of that name; the file has {}",
                list(&names)
            ),
        })?,
        None if all.len() == 1 => 0,
        None => {
            return Err(MapError {
                key: None,
                detail: format!(
                    "it has {} apps ({}); cluster-lb runs one app per primary: add --app NAME (one `cluster-lb run` for each, e.g. --app {})",
                    all.len(),
                    list(&names),
                    names[0]
                ),
            })
        }
    };
    let mut app: BTreeMap<String, &Value> = BTreeMap::new();
    for (key, value) in all[index] {
        app.insert(canonical(key), value);
    }
    let mut mapped = Mapped::default();
    let mut unhonoured: Vec<String> = Vec::new();
    let table = &mut mapped.table;

    // Where the app runs, and what.
    let cwd = match app.get("cwd") {
        Some(Value::String(dir)) => {
            let dir = context.base.join(dir);
            if !dir.is_dir() {
                return Err(bad("cwd", format!("{} is not a directory", dir.display())));
            }
            Some(dir)
        }
        Some(Value::Null) | None => None,
        Some(other) => {
            return Err(bad(
                "cwd",
                format!("expected a directory, found {}", kind_of(other)),
            ))
        }
    };
    let dir = cwd.clone().unwrap_or_else(|| context.base.to_path_buf());
    if let Some(dir) = &cwd {
        // `run --chdir`, whose file key is PM2's name.
        table.insert("cwd".into(), toml::Value::String(dir.display().to_string()));
    }
    let script = match app.get("script") {
        Some(Value::String(script)) if !script.trim().is_empty() => script.clone(),
        None | Some(Value::Null) | Some(Value::String(_)) => {
            return Err(bad(
                "script",
                "missing; give the app's file, e.g. script: './server.js'",
            ))
        }
        Some(other) => {
            return Err(bad(
                "script",
                format!(
                    "expected the path of the app's file, found {}",
                    kind_of(other)
                ),
            ))
        }
    };
    if script.contains(char::is_whitespace) && !dir.join(&script).exists() {
        return Err(bad(
            "script",
            format!("'{script}' is a shell command, which PM2 runs with bash -c as a plain process (no shared port); give the app's file (script: './server.js', args: [...]), which cluster-lb runs with node"),
        ));
    }
    let script_path = resolve_script(&dir, &script).ok_or_else(|| {
        bad(
            "script",
            format!(
                "{script} is neither in {} nor on PATH (PM2 resolves it against cwd, else the directory it runs in)",
                dir.display()
            ),
        )
    })?;
    let interpreter = match app.get("interpreter") {
        Some(Value::String(name)) if name == "none" => None,
        Some(Value::String(name)) if name.starts_with("node@") => {
            unhonoured.push(format!("interpreter {name} (the node on PATH runs it)"));
            Some("node".to_string())
        }
        Some(Value::String(name)) if !name.is_empty() => Some(name.clone()),
        Some(Value::Null) | None => default_interpreter(&script_path),
        Some(other) => {
            return Err(bad(
                "interpreter",
                format!("expected a program such as node, found {}", kind_of(other)),
            ))
        }
    };
    let node_args = words(&app, "node_args")?;
    let args = words(&app, "args")?;
    let mut command: Vec<String> = Vec::new();
    if let Some(interpreter) = interpreter {
        command.push(interpreter);
        command.extend(node_args);
    } else if !node_args.is_empty() {
        unhonoured.push("node_args (interpreter is none)".into());
    }
    command.push(script_path.display().to_string());
    command.extend(args);
    table.insert(
        "command".into(),
        toml::Value::Array(command.into_iter().map(toml::Value::String).collect()),
    );

    // How many.
    let instances = instances(app.get("instances").copied(), context.cpus)?;
    table.insert("workers".into(), toml::Value::Integer(i64::from(instances)));
    match app.get("exec_mode").and_then(|v| v.as_str()) {
        None | Some("cluster" | "cluster_mode") => {}
        Some("fork" | "fork_mode") => {
            unhonoured.push("exec_mode fork (cluster-lb shares the port between instances)".into())
        }
        Some(other) => {
            return Err(bad(
                "exec_mode",
                format!("'{other}' is not cluster or fork"),
            ))
        }
    }

    // Its name.
    let mut name = names[index].clone();
    if app.get("append_env_to_name") == Some(&&Value::Bool(true)) {
        if let Some(env) = context.env_name {
            name = format!("{name}-{env}");
        }
    }
    table.insert("name".into(), toml::Value::String(cluster_name(&name)));

    // Stopping and readiness: PM2's milliseconds are run's seconds.
    if let Some(ms) = milliseconds(&app, "kill_timeout")? {
        table.insert("grace".into(), toml::Value::Float(ms / 1000.0));
    }
    if let Some(ms) = milliseconds(&app, "listen_timeout")? {
        if ms <= 0.0 {
            return Err(bad("listen_timeout", "must be more than 0 ms"));
        }
        table.insert("ready_timeout".into(), toml::Value::Float(ms / 1000.0));
    }
    match app.get("wait_ready") {
        Some(Value::Bool(wait)) => {
            table.insert("wait_ready".into(), toml::Value::Boolean(*wait));
        }
        Some(Value::Null) | None => {}
        Some(other) => {
            return Err(bad(
                "wait_ready",
                format!("expected true or false, found {}", kind_of(other)),
            ))
        }
    }
    // PM2 stops every app with SIGINT, or $PM2_KILL_SIGNAL (its schema has no kill_signal: it
    // drops one silently; honouring it is what the file's author meant).
    let signal = match app.get("kill_signal") {
        Some(Value::String(signal)) => signal.clone(),
        Some(other) => {
            return Err(bad(
                "kill_signal",
                format!("expected a signal such as SIGINT, found {}", kind_of(other)),
            ))
        }
        None => context.pm2_kill_signal.unwrap_or("SIGINT").to_string(),
    };
    table.insert("stop_signal".into(), toml::Value::String(signal));
    for (key, option) in [
        ("instance_var", "instance_var"),
        ("increment_var", "increment_var"),
        ("uid", "user"),
        ("gid", "group"),
    ] {
        match app.get(key) {
            Some(Value::String(text)) => {
                table.insert(option.into(), toml::Value::String(text.clone()));
            }
            Some(Value::Number(n)) if key == "uid" || key == "gid" => {
                table.insert(option.into(), toml::Value::String(n.to_string()));
            }
            Some(Value::Null) | None => {}
            Some(other) => {
                return Err(bad(
                    key,
                    format!("expected a string, found {}", kind_of(other)),
                ))
            }
        }
    }

    if let Some(bytes) = memory_limit(app.get("max_memory_restart").copied())? {
        table.insert("max_memory".into(), toml::Value::String(bytes.to_string()));
    }

    // watch: PM2 restarts the app when a file under these paths changes (its Watcher.js:
    // true or an empty list watch the app's cwd, other paths are taken from there; a watch
    // that JavaScript reads as false, such as "", watches nothing); `run --watch` reloads it,
    // one worker at a time. ignore_watch and the rest stay named: --watch ignores
    // node_modules and .git, and takes no patterns.
    let watched: Vec<PathBuf> = match app.get("watch") {
        Some(Value::Bool(true)) => vec![dir.clone()],
        Some(Value::Array(paths)) if paths.is_empty() => vec![dir.clone()],
        Some(Value::String(path)) if path.is_empty() => Vec::new(),
        Some(Value::String(path)) => vec![dir.join(path)],
        Some(Value::Array(paths)) => paths
            .iter()
            .map(|path| match path {
                Value::String(path) => Ok(dir.join(path)),
                other => Err(bad(
                    "watch",
                    format!("expected paths to watch, found {}", kind_of(other)),
                )),
            })
            .collect::<Result<_, _>>()?,
        Some(Value::Bool(false) | Value::Null) | None => Vec::new(),
        Some(other) => {
            return Err(bad(
                "watch",
                format!("expected true or paths to watch, found {}", kind_of(other)),
            ))
        }
    };
    if !watched.is_empty() {
        let paths = watched
            .iter()
            .map(|path| toml::Value::String(path.display().to_string()))
            .collect();
        table.insert("watch".into(), toml::Value::Array(paths));
    }
    app.remove("watch");
    // log_file: PM2's file of every line, out and err together; `run --log-file` is that file
    // (out_file and error_file, one stream each, stay named).
    if let Some(Value::String(path)) = app.get("log_file") {
        table.insert(
            "log_file".into(),
            toml::Value::String(dir.join(path).display().to_string()),
        );
        app.remove("log_file");
    }

    // The environment, in PM2's order (Common.mergeEnvironmentVariables): env, then port,
    // then deploy.NAME.env, then env_NAME, each over the last.
    let mut env: Vec<(String, String)> = Vec::new();
    let mut set = |key: &str, value: &Value, from: &str| -> Result<(), MapError> {
        if key.is_empty() || key.contains(['=', '\0']) {
            return Err(bad(from, format!("'{key}' is not a variable name")));
        }
        let text = env_text(value);
        if text.contains('\0') {
            return Err(bad(from, format!("the value of {key} holds a NUL byte")));
        }
        env.retain(|(k, _)| k != key);
        env.push((key.to_string(), text));
        Ok(())
    };
    let variables = |key: &str, value: &Value| -> Result<Vec<(String, Value)>, MapError> {
        match value {
            Value::Object(map) => Ok(map.iter().map(|(k, v)| (k.clone(), v.clone())).collect()),
            Value::Null => Ok(Vec::new()),
            other => Err(bad(
                key,
                format!(
                    "expected an object of variables ({{ NODE_ENV: 'production' }}), found {}",
                    kind_of(other)
                ),
            )),
        }
    };
    if let Some(value) = app.get("env") {
        for (k, v) in variables("env", value)? {
            set(&k, &v, "env")?;
        }
    }
    if let Some(port) = app.get("port") {
        set("PORT", port, "port")?;
    }
    if let Some(name) = context.env_name {
        if let Some(value) = config
            .get("deploy")
            .and_then(|d| d.get(name))
            .and_then(|d| d.get("env"))
        {
            let key = format!("deploy.{name}.env");
            for (k, v) in variables(&key, value)? {
                set(&k, &v, &key)?;
            }
        }
        let key = format!("env_{name}");
        match all[index].get(&key) {
            Some(value) => {
                for (k, v) in variables(&key, value)? {
                    set(&k, &v, &key)?;
                }
            }
            None => mapped.warnings.push(format!(
                "--env {name}: app {} has no env_{name}, so it runs with its env alone (as PM2 does)",
                names[index]
            )),
        }
    }
    mapped.env = env;

    // Everything else: named, not honoured.
    for (key, value) in &app {
        if HONOURED.contains(&key.as_str())
            || key.starts_with("env_")
            || PM2_BOOKKEEPING.contains(&key.as_str())
            || is_default(key, value)
        {
            continue;
        }
        unhonoured.push(key.clone());
    }
    if !unhonoured.is_empty() {
        mapped.warnings.push(format!(
            "app {}: not honoured by cluster-lb: {} (see docs/PM2.md)",
            names[index],
            unhonoured.join(", ")
        ));
    }
    Ok(mapped)
}

/// `instances` as PM2 reads it: 'max' and 0 are every CPU, -N is every CPU but N, a string
/// is `parseInt`ed (garbage counts as 0, every CPU), anything below 1 after that is 1. No
/// `instances` is 1, as under PM2.
fn instances(value: Option<&Value>, cpus: u32) -> Result<u32, MapError> {
    let n: i64 = match value {
        None | Some(Value::Null) => return Ok(1),
        Some(Value::Number(n)) => n
            .as_i64()
            .or_else(|| n.as_f64().map(|f| f.trunc() as i64))
            .unwrap_or(0),
        Some(Value::String(text)) if text == "max" => 0,
        Some(Value::String(text)) => parse_int(text).unwrap_or(0),
        Some(other) => {
            return Err(bad(
                "instances",
                format!("expected a number or 'max', found {}", kind_of(other)),
            ))
        }
    };
    let cpus = i64::from(cpus.max(1));
    let n = if n == 0 {
        cpus
    } else if n < 0 {
        cpus + n
    } else {
        n
    };
    let max = i64::from(cluster_common::MAX_WORKERS);
    if n > max {
        return Err(bad(
            "instances",
            format!("{n} is more than the {max} workers cluster-lb runs"),
        ));
    }
    Ok(n.max(1) as u32)
}

/// `max_memory_restart` in bytes, as PM2 reads it: a number of bytes, or digits with one
/// upper-case K, M or G (powers of 1024); PM2 refuses anything else (`200MB`, `1.5G`) and so
/// does this, naming the key. Within what `--max-memory` takes (1K to 4G).
fn memory_limit(value: Option<&Value>) -> Result<Option<u64>, MapError> {
    let text = match value {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::Number(n)) => n.to_string(),
        Some(Value::String(text)) => text.clone(),
        Some(other) => {
            return Err(bad(
                "max_memory_restart",
                format!("expected a size such as '200M', found {}", kind_of(other)),
            ))
        }
    };
    let (digits, shift) = match text.strip_suffix(['K', 'M', 'G']) {
        Some(digits) => (
            digits,
            match text.chars().last() {
                Some('K') => 10,
                Some('M') => 20,
                _ => 30,
            },
        ),
        None => (text.as_str(), 0),
    };
    let bytes = (!digits.is_empty() && digits.chars().all(|c| c.is_ascii_digit()))
        .then(|| digits.parse::<u64>().ok())
        .flatten()
        .and_then(|n| n.checked_shl(shift).filter(|b| b >> shift == n));
    match bytes {
        Some(bytes) if (1024..=(4u64 << 30)).contains(&bytes) => Ok(Some(bytes)),
        Some(_) => Err(bad(
            "max_memory_restart",
            format!("{text} is not between 1K and 4G, the sizes --max-memory takes"),
        )),
        None => Err(bad(
            "max_memory_restart",
            format!("'{text}' is not a size: write bytes, or a number with K, M or G ('200M'), as PM2 does"),
        )),
    }
}

/// JavaScript's `parseInt(text, 10)`: an optional sign and the leading digits.
fn parse_int(text: &str) -> Option<i64> {
    let text = text.trim_start();
    let (sign, rest) = match text.strip_prefix('-') {
        Some(rest) => (-1, rest),
        None => (1, text.strip_prefix('+').unwrap_or(text)),
    };
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    digits.parse::<i64>().ok().map(|n| sign * n)
}

/// A duration in milliseconds (a number, or a numeric string as PM2 accepts).
fn milliseconds(app: &BTreeMap<String, &Value>, key: &str) -> Result<Option<f64>, MapError> {
    let ms = match app.get(key) {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::Number(n)) => n.as_f64(),
        Some(Value::String(text)) => text.trim().parse::<f64>().ok(),
        Some(other) => {
            return Err(bad(
                key,
                format!("expected milliseconds, found {}", kind_of(other)),
            ))
        }
    };
    match ms {
        Some(ms) if (0.0..=3_600_000.0).contains(&ms) => Ok(Some(ms)),
        _ => Err(bad(
            key,
            format!(
                "{} is not a number of milliseconds between 0 and 3600000",
                app.get(key).map(|v| v.to_string()).unwrap_or_default()
            ),
        )),
    }
}

/// `args` or `node_args`: a list, or a string split at spaces outside quotes (as PM2 splits
/// it); numbers are their text.
fn words(app: &BTreeMap<String, &Value>, key: &str) -> Result<Vec<String>, MapError> {
    match app.get(key) {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::String(text)) => Ok(split_words(text)),
        Some(Value::Array(items)) => items
            .iter()
            .map(|item| match item {
                Value::String(s) => Ok(s.clone()),
                Value::Number(n) => Ok(n.to_string()),
                Value::Bool(b) => Ok(b.to_string()),
                other => Err(bad(
                    key,
                    format!("expected strings, found {}", kind_of(other)),
                )),
            })
            .collect(),
        Some(other) => Err(bad(
            key,
            format!("expected a list of strings, found {}", kind_of(other)),
        )),
    }
}

/// Splits at whitespace; a quoted part ("a b" or 'a b') is one word, without its quotes.
fn split_words(text: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut in_word = false;
    let mut quote: Option<char> = None;
    for c in text.chars() {
        match quote {
            Some(q) if c == q => quote = None,
            Some(_) => word.push(c),
            None if c == '"' || c == '\'' => {
                quote = Some(c);
                in_word = true;
            }
            None if c.is_whitespace() => {
                if in_word {
                    words.push(std::mem::take(&mut word));
                    in_word = false;
                }
            }
            None => {
                word.push(c);
                in_word = true;
            }
        }
    }
    if in_word {
        words.push(word);
    }
    words
}

/// An env value as PM2 gives it to the process: strings as they are, objects (and arrays,
/// and null) as JSON, numbers and booleans as JavaScript writes them.
fn env_text(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        Value::Number(n) => match n.as_f64() {
            Some(f) if n.is_f64() => crate::supervisor::js_number(f),
            _ => n.to_string(),
        },
        other => other.to_string(),
    }
}

/// The script's path: in `dir` (where PM2 looks first), else on PATH.
fn resolve_script(dir: &Path, script: &str) -> Option<PathBuf> {
    let here = dir.join(script);
    if here.is_file() {
        return Some(std::path::absolute(&here).unwrap_or(here));
    }
    if script.contains('/') {
        return None;
    }
    let search = std::env::var_os("PATH")?;
    std::env::split_paths(&search)
        .map(|d| d.join(script))
        .find(|p| p.is_file())
}

/// What runs a script without `interpreter`, as PM2's interpreter table says: node for
/// JavaScript (and anything that is no executable of its own), the usual program for the
/// other scripting languages, nothing for a binary or a `#!` script.
fn default_interpreter(script: &Path) -> Option<String> {
    let by_extension = match script.extension().and_then(|e| e.to_str()) {
        Some("js" | "cjs" | "mjs" | "ts" | "cts" | "mts" | "jsx" | "tsx") => Some("node"),
        Some("py") => Some("python3"),
        Some("sh") => Some("bash"),
        Some("rb") => Some("ruby"),
        Some("php") => Some("php"),
        Some("pl") => Some("perl"),
        _ => None,
    };
    if let Some(program) = by_extension {
        return Some(program.to_string());
    }
    use std::os::unix::fs::PermissionsExt;
    let executable = std::fs::metadata(script).is_ok_and(|m| m.permissions().mode() & 0o111 != 0);
    let mut head = [0u8; 4];
    let starts = std::fs::File::open(script)
        .and_then(|mut f| f.read(&mut head))
        .map(|n| head[..n].to_vec())
        .unwrap_or_default();
    let own = starts.starts_with(b"\x7fELF") || starts.starts_with(b"#!");
    if executable && own {
        None
    } else {
        Some("node".to_string())
    }
}

/// A PM2 name as a cluster name: PM2 allows any characters (its log file names replace the
/// others with '-'); a cluster name is a file name, so they become '_'.
fn cluster_name(name: &str) -> String {
    let safe: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '_'
            }
        })
        .take(64)
        .collect();
    match safe.trim_start_matches(['.', '-']) {
        "" => "app".to_string(),
        trimmed => trimmed.to_string(),
    }
}

fn list(names: &[String]) -> String {
    names.join(", ")
}

fn kind_of(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn dir_with(files: &[&str]) -> PathBuf {
        use std::sync::atomic::{AtomicUsize, Ordering};
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("clb-eco-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for file in files {
            let path = dir.join(file);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, "").unwrap();
        }
        dir
    }

    fn context<'a>(base: &'a Path, env_name: Option<&'a str>, app: Option<&'a str>) -> Context<'a> {
        Context {
            env_name,
            app,
            base,
            cpus: 4,
            pm2_kill_signal: None,
        }
    }

    fn env(mapped: &Mapped) -> BTreeMap<&str, &str> {
        mapped
            .env
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect()
    }

    #[test]
    fn files_are_told_apart_by_name_as_pm2_does() {
        let kind = |name: &str| kind(Path::new(name));
        assert_eq!(kind("ecosystem.config.js"), Ok(Some(Kind::Js)));
        assert_eq!(kind("/srv/pm2.config.cjs"), Ok(Some(Kind::Js)));
        assert_eq!(kind("app.config.mjs"), Ok(Some(Kind::Js)));
        assert_eq!(kind("process.json"), Ok(Some(Kind::Json)));
        assert_eq!(kind("ecosystem.config.json"), Ok(Some(Kind::Json)));
        assert_eq!(kind("app.toml"), Ok(None));
        // PM2 runs a plain ecosystem.js as a script, not as a config.
        assert_eq!(kind("ecosystem.js"), Ok(None));
        assert!(kind("app.yml").unwrap_err().contains("YAML"));
    }

    /// The docs' "Environment definition" example (app-declaration.md), with --env
    /// production: the second app, picked by name.
    #[test]
    fn the_documented_file_maps_onto_run_options() {
        let base = dir_with(&["worker.js", "api.js"]);
        let file = json!({"apps": [{
            "name": "worker-app", "script": "./worker.js", "watch": true,
            "env": {"NODE_ENV": "development"}, "env_production": {"NODE_ENV": "production"}
        }, {
            "name": "api-app", "script": "./api.js", "instances": 4, "exec_mode": "cluster"
        }]});
        let error = map(&file, &context(&base, Some("production"), None)).unwrap_err();
        assert!(
            error.detail.contains("2 apps (worker-app, api-app)"),
            "{error:?}"
        );
        assert!(error.detail.contains("--app NAME"), "{error:?}");
        let api = map(&file, &context(&base, None, Some("api-app"))).unwrap();
        assert_eq!(api.table["workers"].as_integer(), Some(4));
        assert_eq!(api.table["name"].as_str(), Some("api-app"));
        assert_eq!(api.table["stop_signal"].as_str(), Some("SIGINT"));
        let command: Vec<&str> = api.table["command"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        assert_eq!(command, ["node", base.join("api.js").to_str().unwrap()]);
        let worker = map(
            &file,
            &context(&base, Some("production"), Some("worker-app")),
        )
        .unwrap();
        assert_eq!(env(&worker)["NODE_ENV"], "production");
        // No instances: one, as PM2 runs it; watch: true watches the app's directory.
        assert_eq!(worker.table["workers"].as_integer(), Some(1));
        assert!(worker.warnings.is_empty(), "{:?}", worker.warnings);
        assert_eq!(
            worker.table["watch"].as_array().map(Vec::as_slice),
            Some([toml::Value::String(base.display().to_string())].as_slice())
        );
        let unknown = map(&file, &context(&base, None, Some("web"))).unwrap_err();
        assert!(
            unknown.detail.contains("no app of that name"),
            "{unknown:?}"
        );
    }

    /// watch as a path or a list is watched under the app's directory, log_file is
    /// --log-file; what --watch and --log-file cannot take stays named.
    #[test]
    fn watch_paths_and_the_combined_log_file_map_onto_run_options() {
        let base = dir_with(&["app.js", "src/a.js", "lib/b.js"]);
        let strings = |mapped: &Mapped, key: &str| -> Vec<String> {
            match &mapped.table[key] {
                toml::Value::Array(values) => values
                    .iter()
                    .map(|v| v.as_str().unwrap().to_string())
                    .collect(),
                other => vec![other.as_str().unwrap().to_string()],
            }
        };
        let file = json!({"apps": [{"script": "app.js", "watch": ["src", "lib"],
            "ignore_watch": ["node_modules"], "log_file": "logs/all.log", "out_file": "out.log"}]});
        let mapped = map(&file, &context(&base, None, None)).unwrap();
        assert_eq!(
            strings(&mapped, "watch"),
            [base.join("src"), base.join("lib")].map(|p| p.display().to_string())
        );
        assert_eq!(
            strings(&mapped, "log_file"),
            [base.join("logs/all.log").display().to_string()]
        );
        assert_eq!(mapped.warnings.len(), 1, "{:?}", mapped.warnings);
        assert!(
            mapped.warnings[0]
                .ends_with("not honoured by cluster-lb: ignore_watch, out_file (see docs/PM2.md)"),
            "{:?}",
            mapped.warnings
        );
        let one = json!({"apps": [{"script": "app.js", "watch": "src", "log_file": true}]});
        let mapped = map(&one, &context(&base, None, None)).unwrap();
        assert_eq!(
            strings(&mapped, "watch"),
            [base.join("src").display().to_string()]
        );
        assert!(!mapped.table.contains_key("log_file"));
        assert!(
            mapped.warnings[0].contains("log_file"),
            "{:?}",
            mapped.warnings
        );
        // As PM2's Watcher.js: an empty list is the cwd, an empty string no watch.
        let empty = json!({"apps": [{"script": "app.js", "watch": []}]});
        let mapped = map(&empty, &context(&base, None, None)).unwrap();
        assert_eq!(strings(&mapped, "watch"), [base.display().to_string()]);
        let off = json!({"apps": [{"script": "app.js", "watch": ""}]});
        let mapped = map(&off, &context(&base, None, None)).unwrap();
        assert!(!mapped.table.contains_key("watch"), "{:?}", mapped.table);
        let wrong = json!({"apps": [{"script": "app.js", "watch": 3}]});
        let error = map(&wrong, &context(&base, None, None)).unwrap_err();
        assert_eq!(error.key.as_deref(), Some("watch"), "{error:?}");
    }

    #[test]
    fn instances_count_as_pm2_counts_them() {
        let cases = [
            (json!(null), 1),
            (json!(3), 3),
            (json!("max"), 4),
            (json!(0), 4),
            (json!(-1), 3),
            (json!(-10), 1),
            (json!("2"), 2),
            (json!("lots"), 4),
            (json!(2.7), 2),
        ];
        for (value, expected) in cases {
            let value = (!value.is_null()).then_some(&value);
            assert_eq!(instances(value, 4), Ok(expected), "{value:?}");
        }
        assert!(instances(Some(&json!(100000)), 4).is_err());
        assert!(instances(Some(&json!([1])), 4).is_err());
    }

    #[test]
    fn the_environment_merges_in_pm2s_order() {
        let base = dir_with(&["app.js"]);
        let file = json!({
            "apps": [{"script": "app.js", "port": 5555,
                "env": {"PORT": 1111, "A": "a", "OBJ": {"x": 1}, "FLAG": true, "F": 1.5},
                "env_staging": {"PORT": 2222, "B": "b"}}],
            "deploy": {"staging": {"env": {"PORT": 3333, "C": "c"}}}
        });
        let mapped = map(&file, &context(&base, Some("staging"), None)).unwrap();
        let env = env(&mapped);
        assert_eq!(env["PORT"], "2222");
        assert_eq!((env["A"], env["B"], env["C"]), ("a", "b", "c"));
        assert_eq!(env["OBJ"], r#"{"x":1}"#);
        assert_eq!((env["FLAG"], env["F"]), ("true", "1.5"));
        let plain = map(&file, &context(&base, None, None)).unwrap();
        assert_eq!(super::super::ecosystem::tests::env(&plain)["PORT"], "5555");
        let missing = map(&file, &context(&base, Some("production"), None)).unwrap();
        assert!(
            missing.warnings[0].contains("has no env_production"),
            "{:?}",
            missing.warnings
        );
    }

    #[test]
    fn keys_map_onto_run_options_and_the_rest_is_named_once() {
        let base = dir_with(&["srv/server.js"]);
        let file = json!({"apps": [{
            "name": "Business News", "script": "server.js", "cwd": "srv",
            "args": "--port 80 --title 'a b'", "node_args": ["--max-old-space-size=200"],
            "killTimeout": 3000, "listen_timeout": "10000", "wait_ready": true,
            "instance_var": "INSTANCE_ID", "increment_var": "PORT", "merge_logs": true,
            "max_memory_restart": "200M", "cron_restart": "0 0 * * *", "out_file": "/tmp/o.log",
            "autorestart": true, "watch": false, "vizion": false, "foo_bar": 1
        }]});
        let mapped = map(&file, &context(&base, None, None)).unwrap();
        let t = &mapped.table;
        assert_eq!(t["name"].as_str(), Some("Business_News"));
        assert_eq!(t["grace"].as_float(), Some(3.0));
        assert_eq!(t["ready_timeout"].as_float(), Some(10.0));
        assert_eq!(t["wait_ready"].as_bool(), Some(true));
        assert_eq!(t["instance_var"].as_str(), Some("INSTANCE_ID"));
        assert_eq!(t["increment_var"].as_str(), Some("PORT"));
        let command: Vec<&str> = t["command"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        let script = base.join("srv/server.js");
        assert_eq!(
            command,
            [
                "node",
                "--max-old-space-size=200",
                script.to_str().unwrap(),
                "--port",
                "80",
                "--title",
                "a b"
            ]
        );
        assert_eq!(
            mapped.table["cwd"].as_str(),
            Some(base.join("srv").to_str().unwrap())
        );
        assert_eq!(mapped.warnings.len(), 1);
        assert_eq!(
            mapped.warnings[0],
            "app Business News: not honoured by cluster-lb: cron_restart, foo_bar, out_file (see docs/PM2.md)"
        );
        assert_eq!(t["max_memory"].as_str(), Some("209715200"));
    }

    #[test]
    fn bad_apps_name_the_key_and_what_to_do() {
        let base = dir_with(&["app.js"]);
        let cases = [
            (json!({"apps": []}), "apps", "empty"),
            (json!({"apps": [1]}), "apps", "found a number"),
            (json!({"apps": [{"name": "x"}]}), "script", "missing"),
            (
                json!({"apps": [{"script": "gone.js"}]}),
                "script",
                "neither in",
            ),
            (
                json!({"apps": [{"script": "npm run start"}]}),
                "script",
                "shell command",
            ),
            (
                json!({"apps": [{"script": "app.js", "cwd": "nowhere"}]}),
                "cwd",
                "not a directory",
            ),
            (
                json!({"apps": [{"script": "app.js", "kill_timeout": -1}]}),
                "kill_timeout",
                "milliseconds",
            ),
            (
                json!({"apps": [{"script": "app.js", "listen_timeout": 0}]}),
                "listen_timeout",
                "more than 0",
            ),
            (
                json!({"apps": [{"script": "app.js", "env": "A=1"}]}),
                "env",
                "object of variables",
            ),
            (
                json!({"apps": [{"script": "app.js", "env": {"A=B": 1}}]}),
                "env",
                "not a variable name",
            ),
            (
                json!({"apps": [{"script": "app.js", "exec_mode": "turbo"}]}),
                "exec_mode",
                "not cluster or fork",
            ),
            (
                json!({"apps": [{"script": "app.js", "args": {"a": 1}}]}),
                "args",
                "list of strings",
            ),
        ];
        for (file, key, expected) in cases {
            let error = map(&file, &context(&base, None, None)).unwrap_err();
            assert_eq!(error.key.as_deref(), Some(key), "{file}: {error:?}");
            assert!(error.detail.contains(expected), "{file}: {error:?}");
            assert!(!error.detail.contains('\n'));
        }
    }

    #[test]
    fn a_single_app_object_or_a_bare_list_is_an_app_list() {
        let base = dir_with(&["app.js"]);
        for file in [json!({"script": "app.js"}), json!([{"script": "app.js"}])] {
            let mapped = map(&file, &context(&base, None, None)).unwrap();
            assert_eq!(mapped.table["name"].as_str(), Some("app"));
        }
    }

    #[test]
    fn the_stop_signal_is_pm2s_unless_the_app_names_one() {
        let base = dir_with(&["app.js"]);
        let file = json!({"apps": [{"script": "app.js"}]});
        let mut ctx = context(&base, None, None);
        ctx.pm2_kill_signal = Some("SIGTERM");
        assert_eq!(
            map(&file, &ctx).unwrap().table["stop_signal"].as_str(),
            Some("SIGTERM")
        );
        let file = json!({"apps": [{"script": "app.js", "kill_signal": "SIGQUIT"}]});
        assert_eq!(
            map(&file, &ctx).unwrap().table["stop_signal"].as_str(),
            Some("SIGQUIT")
        );
    }

    #[test]
    fn memory_limits_are_read_as_pm2_reads_them() {
        for (value, bytes) in [
            (json!("200M"), 200 << 20),
            (json!("1G"), 1 << 30),
            (json!("512K"), 512 << 10),
            (json!(104857600), 104857600),
            (json!("104857600"), 104857600),
        ] {
            assert_eq!(memory_limit(Some(&value)), Ok(Some(bytes)), "{value}");
        }
        for bad in [
            json!("200MB"),
            json!("1.5G"),
            json!("512m"),
            json!("8G"),
            json!(10),
            json!([1]),
        ] {
            let error = memory_limit(Some(&bad)).unwrap_err();
            assert_eq!(error.key.as_deref(), Some("max_memory_restart"), "{bad}");
        }
        assert_eq!(memory_limit(None), Ok(None));
    }

    #[test]
    fn users_and_names_map_too() {
        let base = dir_with(&["app.js"]);
        let file = json!({"apps": [{"script": "app.js", "name": "web", "user": "www-data",
            "gid": 33, "append_env_to_name": true}]});
        let mapped = map(&file, &context(&base, Some("production"), None)).unwrap();
        assert_eq!(mapped.table["user"].as_str(), Some("www-data"));
        assert_eq!(mapped.table["group"].as_str(), Some("33"));
        assert_eq!(mapped.table["name"].as_str(), Some("web-production"));
    }

    /// docs/PM2.md has a row for every key this module knows, honoured or not.
    #[test]
    fn every_pm2_key_is_in_the_table() {
        const NAMED: &[&str] = &[
            "shutdown_with_message",
            "autorestart",
            "max_restarts",
            "min_uptime",
            "restart_delay",
            "exp_backoff_restart_delay",
            "stop_exit_codes",
            "cron_restart",
            "watch",
            "ignore_watch",
            "watch_delay",
            "watch_options",
            "out_file",
            "error_file",
            "log_file",
            "pid_file",
            "log_date_format",
            "time",
            "log_type",
            "disable_logs",
            "source_map_support",
            "disable_source_map_support",
            "filter_env",
            "autostart",
            "treekill",
        ];
        let doc = include_str!("../../../docs/PM2.md");
        let camel = |key: &str| {
            let mut out = String::new();
            let mut upper = false;
            for c in key.chars() {
                if c == '_' {
                    upper = true;
                } else if upper {
                    out.push(c.to_ascii_uppercase());
                    upper = false;
                } else {
                    out.push(c);
                }
            }
            out
        };
        for key in HONOURED.iter().chain(PM2_BOOKKEEPING).chain(NAMED) {
            let found = [key.to_string(), camel(key)]
                .iter()
                .any(|k| doc.contains(&format!("`{k}`")));
            assert!(found, "docs/PM2.md has no row for `{key}`");
        }
    }

    #[test]
    fn words_split_as_pm2_splits_them() {
        assert_eq!(split_words("a  'b c' \"d e\" f"), ["a", "b c", "d e", "f"]);
        assert_eq!(split_words(""), Vec::<String>::new());
        assert_eq!(split_words("--x=''"), ["--x="]);
    }
}
