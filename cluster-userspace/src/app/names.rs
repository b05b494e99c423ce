//! Several clusters on one host. Each cluster has a name, and its control socket is
//! `NAME.sock` in one run directory, so `cluster-lb status` can list them all and `--name`
//! picks one for reload, scale and stop (as `pm2 ls` and `pm2 reload NAME` do).

use std::{
    fmt,
    os::unix::fs::{DirBuilderExt, MetadataExt},
    path::{Path, PathBuf},
    str::FromStr,
};

use cluster_lb_worker::ListenAddr;

/// Overrides the run directory (tests, and hosts where /run is not the place).
pub const RUN_DIR_ENV: &str = "CLUSTER_LB_RUN_DIR";

/// Longest cluster name (it becomes a file name, and socket paths are short).
pub const MAX_NAME: usize = 64;

/// A name that is safe as a file name: letters, digits, `.`, `_`, `-`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct ClusterName(String);

impl ClusterName {
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The name a cluster gets without `--name`: from its first listen address (`8080` for
    /// every IPv4 address, `127.0.0.1-8080`, `udp-5353`), else from the program it runs
    /// (`server` for `./server`, `app` for `node app.js`).
    pub fn default_for(listen: &[ListenAddr], command: &[String]) -> ClusterName {
        let text = match listen.first() {
            Some(addr) => from_address(addr),
            None => from_command(command),
        };
        let safe: String = text
            .chars()
            .map(|c| if is_name_char(c) { c } else { '_' })
            .take(MAX_NAME)
            .collect();
        match safe.trim_start_matches(['.', '-']) {
            "" => ClusterName("cluster-lb".into()),
            trimmed => ClusterName(trimmed.to_string()),
        }
    }
}

impl fmt::Display for ClusterName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for ClusterName {
    type Err = String;

    fn from_str(text: &str) -> Result<ClusterName, String> {
        let valid = !text.is_empty()
            && text.len() <= MAX_NAME
            && text.chars().all(is_name_char)
            && !text.starts_with(['.', '-']);
        if valid {
            Ok(ClusterName(text.to_string()))
        } else {
            Err(format!(
                "'{text}' is not a cluster name: use 1 to {MAX_NAME} letters, digits, '.', '_' and '-', not starting with '.' or '-'"
            ))
        }
    }
}

fn is_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')
}

fn from_address(addr: &ListenAddr) -> String {
    let socket = addr.socket_addr();
    let base = if socket.ip().is_unspecified() {
        socket.port().to_string()
    } else {
        format!("{}-{}", socket.ip(), socket.port())
    };
    if addr.is_udp() {
        format!("udp-{base}")
    } else {
        base
    }
}

/// Interpreters whose first non-option argument names the program (`node app.js` is `app`).
const INTERPRETERS: [&str; 9] = [
    "node", "nodejs", "python", "python3", "ruby", "perl", "php", "bun", "deno",
];

fn from_command(command: &[String]) -> String {
    let stem = |arg: &str| {
        Path::new(arg)
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default()
    };
    let Some(program) = command.first() else {
        return String::new();
    };
    let program_name = stem(program);
    if INTERPRETERS.contains(&program_name.as_str()) {
        if let Some(script) = command[1..].iter().find(|arg| !arg.starts_with('-')) {
            return stem(script);
        }
    }
    program_name
}

/// Where control sockets live: `$CLUSTER_LB_RUN_DIR`, else `/run/cluster-lb` as root, else
/// `$XDG_RUNTIME_DIR/cluster-lb`, else `/tmp/cluster-lb-UID`.
pub fn run_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os(RUN_DIR_ENV).filter(|d| !d.is_empty()) {
        return PathBuf::from(dir);
    }
    let uid = nix::unistd::geteuid();
    if uid.is_root() {
        return PathBuf::from("/run/cluster-lb");
    }
    match std::env::var_os("XDG_RUNTIME_DIR").filter(|d| !d.is_empty()) {
        Some(dir) => Path::new(&dir).join("cluster-lb"),
        None => std::env::temp_dir().join(format!("cluster-lb-{uid}")),
    }
}

/// The control socket of the cluster called `name`.
pub fn socket_path(name: &ClusterName) -> PathBuf {
    run_dir().join(format!("{name}.sock"))
}

/// Why the run directory cannot hold control sockets.
#[derive(Debug, thiserror::Error)]
pub enum RunDirError {
    #[error(
        "cannot create the run directory {path}: {source} (set {RUN_DIR_ENV} to another directory)"
    )]
    Create {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the run directory {path} belongs to uid {owner}, not to this user; set {RUN_DIR_ENV} to a directory of your own")]
    Foreign { path: PathBuf, owner: u32 },
}

/// Creates the run directory if needed: mode 0755 for root's (so `status` may list it; each
/// socket is 0600 anyway), 0700 for a user's. One that another user owns is refused: they
/// could put sockets there that pose as this user's clusters.
pub fn ensure_run_dir(path: &Path) -> Result<(), RunDirError> {
    let uid = nix::unistd::geteuid();
    let mode = if uid.is_root() { 0o755 } else { 0o700 };
    let create = |source| RunDirError::Create {
        path: path.to_path_buf(),
        source,
    };
    match std::fs::DirBuilder::new()
        .recursive(true)
        .mode(mode)
        .create(path)
    {
        Ok(()) => {}
        Err(e) => return Err(create(e)),
    }
    let meta = std::fs::metadata(path).map_err(create)?;
    if meta.uid() != uid.as_raw() && meta.uid() != 0 {
        return Err(RunDirError::Foreign {
            path: path.to_path_buf(),
            owner: meta.uid(),
        });
    }
    Ok(())
}

/// The names of the control sockets in `dir` (answering or not), sorted.
pub fn socket_files(dir: &Path) -> Vec<(ClusterName, PathBuf)> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut found: Vec<(ClusterName, PathBuf)> = entries
        .filter_map(Result::ok)
        .filter_map(|entry| {
            let path = entry.path();
            let name = path
                .file_name()?
                .to_str()?
                .strip_suffix(".sock")?
                .parse()
                .ok()?;
            Some((name, path))
        })
        .collect();
    found.sort();
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    fn listen(text: &str) -> ListenAddr {
        text.parse().unwrap()
    }

    fn command(args: &[&str]) -> Vec<String> {
        args.iter().map(|a| a.to_string()).collect()
    }

    #[test]
    fn names_default_from_the_first_listen_address() {
        let cases = [
            ("8080", "8080"),
            ("0.0.0.0:80", "80"),
            ("127.0.0.1:8080", "127.0.0.1-8080"),
            ("[::]:443", "443"),
            ("[::1]:8443", "__1-8443"),
            ("udp://127.0.0.1:5353", "udp-127.0.0.1-5353"),
        ];
        for (addr, name) in cases {
            let named = ClusterName::default_for(&[listen(addr), listen("9999")], &command(&["x"]));
            assert_eq!(named.as_str(), name, "{addr}");
            assert_eq!(named.as_str().parse::<ClusterName>().unwrap(), named);
        }
    }

    #[test]
    fn without_listen_the_name_is_the_program_or_its_script() {
        let cases: [(&[&str], &str); 6] = [
            (&["./server", "--port", "1"], "server"),
            (
                &["/usr/bin/node", "examples/node/cluster-app.js"],
                "cluster-app",
            ),
            (&["node", "--inspect", "app.js"], "app"),
            (&["python3", "-u", "srv/api.py"], "api"),
            (&["node"], "node"),
            (&["..."], "cluster-lb"),
        ];
        for (args, name) in cases {
            assert_eq!(ClusterName::default_for(&[], &command(args)).as_str(), name);
        }
    }

    #[test]
    fn names_that_are_no_safe_file_name_are_refused() {
        for bad in [
            "",
            "a/b",
            "..",
            "-x",
            ".hidden",
            "a b",
            "é",
            &"x".repeat(65),
        ] {
            let error = bad.parse::<ClusterName>().unwrap_err();
            assert!(error.contains("is not a cluster name"), "{error}");
        }
        for good in ["api", "web-1", "127.0.0.1-8080", "a_b", "9"] {
            assert_eq!(good.parse::<ClusterName>().unwrap().as_str(), good);
        }
    }

    #[test]
    fn socket_files_are_found_by_name_and_other_files_ignored() {
        let dir = std::env::temp_dir().join(format!("clb-names-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for file in ["b.sock", "a.sock", "notes.txt", ".x.sock"] {
            std::fs::write(dir.join(file), "").unwrap();
        }
        let names: Vec<String> = socket_files(&dir)
            .into_iter()
            .map(|(name, _)| name.to_string())
            .collect();
        assert_eq!(names, ["a", "b"]);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
