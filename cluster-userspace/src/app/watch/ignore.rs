//! What `run --watch` never reloads for: dependency and version-control directories, caches,
//! and the temporary files editors write beside the file they save.

use std::ffi::OsStr;

/// Directories that are never watched, nor their creation counted: installed dependencies,
/// version control, bytecode caches and IDE state change without the code changing.
pub const DIRECTORIES: [&str; 11] = [
    "node_modules",
    "bower_components",
    ".git",
    ".hg",
    ".svn",
    "__pycache__",
    ".pytest_cache",
    ".mypy_cache",
    ".venv",
    ".idea",
    ".DS_Store",
];

/// Whether a change to the entry `name` (a file or directory's own name, not a path) is no
/// reason to reload.
pub fn ignored(name: &OsStr) -> bool {
    let name = name.to_string_lossy();
    let name = name.as_ref();
    DIRECTORIES.contains(&name) || editor_temporary(name) || name.ends_with(".pyc")
}

/// Files editors write and remove while saving: vim's swap files (.x.swp, .swo, ... .swa) and
/// its write test `4913`, backups `x~`, emacs's lock `.#x` and autosave `#x#`, JetBrains' and
/// gedit's temporary copies.
fn editor_temporary(name: &str) -> bool {
    let vim_swap = name.rsplit_once('.').is_some_and(|(_, ext)| {
        ext == "swpx"
            || (ext.len() == 3
                && ext.starts_with("sw")
                && ext.as_bytes()[2].is_ascii_lowercase()
                && ext.as_bytes()[2] <= b'p')
    });
    vim_swap
        || name == "4913"
        || name.ends_with('~')
        || name.starts_with(".#")
        || (name.len() > 1 && name.starts_with('#') && name.ends_with('#'))
        || name.ends_with("___jb_tmp___")
        || name.ends_with("___jb_old___")
        || name.starts_with(".goutputstream-")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ignores(name: &str) -> bool {
        ignored(OsStr::new(name))
    }

    #[test]
    fn dependencies_version_control_and_caches_are_ignored() {
        for name in [
            "node_modules",
            ".git",
            ".hg",
            ".svn",
            "__pycache__",
            ".venv",
            "server.cpython-311.pyc",
        ] {
            assert!(ignores(name), "{name}");
        }
    }

    #[test]
    fn editor_temporary_files_are_ignored() {
        for name in [
            ".server.js.swp",
            ".server.js.swo",
            ".server.js.swa",
            ".server.js.swpx",
            "4913",
            "server.js~",
            ".#server.js",
            "#server.js#",
            "server.js___jb_tmp___",
            "server.js___jb_old___",
            ".goutputstream-ABC123",
        ] {
            assert!(ignores(name), "{name}");
        }
    }

    #[test]
    fn code_and_everything_else_counts() {
        for name in [
            "server.js",
            "app.py",
            "version.txt",
            "package.json",
            ".env",
            "lib",
            "git",
            "modules",
            "4914",
            "#",
            "main.swift",
            "page.swz",
            ".gitignore",
            "index.html",
        ] {
            assert!(!ignores(name), "{name}");
        }
    }
}
