//! The watched files and directories, on one inotify instance: every directory under a watched
//! directory (new ones as they appear, never an ignored one, never through a symlink), and for
//! a watched file, its directory with only that name counting (so an editor that saves by
//! renaming a new file over the old one is seen).

use std::{
    collections::{BTreeSet, HashMap},
    ffi::OsString,
    os::fd::{AsFd, AsRawFd, RawFd},
    path::{Path, PathBuf},
};

use nix::{
    errno::Errno,
    sys::inotify::{AddWatchFlags, InitFlags, Inotify, InotifyEvent, WatchDescriptor},
};

use super::ignore::ignored;

/// The sysctl that bounds the watches of one user.
const WATCH_LIMIT: &str = "fs.inotify.max_user_watches";

/// What counts as a change: a file written and closed, created, removed, renamed, or its
/// metadata changed (`touch`). Not reads, opens, or each write (the close ends a save).
fn changes() -> AddWatchFlags {
    AddWatchFlags::IN_CLOSE_WRITE
        | AddWatchFlags::IN_CREATE
        | AddWatchFlags::IN_DELETE
        | AddWatchFlags::IN_MOVED_FROM
        | AddWatchFlags::IN_MOVED_TO
        | AddWatchFlags::IN_ATTRIB
        | AddWatchFlags::IN_ONLYDIR
}

#[derive(Debug, thiserror::Error)]
pub enum TreeError {
    #[error("cannot watch files: inotify_init1: {0}{hint}", hint = init_hint(.0))]
    Init(Errno),
    #[error("--watch {}: {problem}", .path.display())]
    Root { path: PathBuf, problem: String },
}

/// What to do when no inotify instance can be had.
fn init_hint(errno: &Errno) -> &'static str {
    match errno {
        Errno::EMFILE => "; this user's inotify instances are at fs.inotify.max_user_instances: raise it (sysctl fs.inotify.max_user_instances=1024)",
        _ => "",
    }
}

/// One watched directory.
#[derive(Debug)]
struct Dir {
    path: PathBuf,
    /// Every entry counts (a watched directory, or one under it).
    whole: bool,
    /// Else only these names (watched files in it).
    files: BTreeSet<OsString>,
}

#[derive(Debug)]
pub struct Tree {
    inotify: Inotify,
    dirs: HashMap<WatchDescriptor, Dir>,
    /// What was asked for; the first is named for changes lost when the kernel's queue
    /// overflowed.
    roots: Vec<PathBuf>,
    /// The watch limit was reached (said once).
    limit_said: bool,
}

impl AsRawFd for Tree {
    fn as_raw_fd(&self) -> RawFd {
        self.inotify.as_fd().as_raw_fd()
    }
}

impl Tree {
    /// Watches `roots` (files or directories, which must exist).
    pub fn new(roots: &[PathBuf]) -> Result<Tree, TreeError> {
        let inotify = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC)
            .map_err(TreeError::Init)?;
        let mut tree = Tree {
            inotify,
            dirs: HashMap::new(),
            roots: roots.to_vec(),
            limit_said: false,
        };
        for root in roots {
            let fail = |problem: String| TreeError::Root {
                path: root.clone(),
                problem,
            };
            let meta = std::fs::metadata(root).map_err(|e| fail(e.to_string()))?;
            if meta.is_dir() {
                tree.add_directory(root, true);
                continue;
            }
            let (parent, name) = match (root.parent(), root.file_name()) {
                (Some(parent), Some(name)) => (parent, name),
                _ => return Err(fail("not a file or directory".to_string())),
            };
            let parent = if parent.as_os_str().is_empty() {
                Path::new(".")
            } else {
                parent
            };
            if let Some(wd) = tree.add(parent, true, false) {
                if let Some(dir) = tree.dirs.get_mut(&wd) {
                    dir.files.insert(name.to_os_string());
                }
            }
        }
        Ok(tree)
    }

    /// How many directories are watched.
    pub fn directories(&self) -> usize {
        self.dirs.len()
    }

    /// Reads the events the kernel has (WouldBlock when none): the changed paths, in order.
    pub fn read(&mut self) -> std::io::Result<Vec<PathBuf>> {
        let events = self.inotify.read_events().map_err(std::io::Error::from)?;
        let mut changed = Vec::new();
        for event in events {
            if let Some(path) = self.event(event) {
                changed.push(path);
            }
        }
        Ok(changed)
    }

    /// What one event means: a changed path, or nothing that counts.
    fn event(&mut self, event: InotifyEvent) -> Option<PathBuf> {
        use AddWatchFlags as F;
        if event.mask.contains(F::IN_Q_OVERFLOW) {
            // Some events were lost: something changed, somewhere.
            log::warn!("watch: the kernel's inotify queue overflowed (many changes at once); reloading for all of them");
            return self.roots.first().cloned();
        }
        if event.mask.contains(F::IN_IGNORED) {
            // The directory is gone (removed, or its filesystem unmounted).
            self.dirs.remove(&event.wd);
            return None;
        }
        let dir = self.dirs.get(&event.wd)?;
        let name = event.name?;
        if (!dir.whole && !dir.files.contains(&name)) || ignored(&name) {
            return None;
        }
        let path = dir.path.join(&name);
        let whole = dir.whole;
        if event.mask.contains(F::IN_ISDIR) {
            if event.mask.contains(F::IN_ATTRIB) {
                return None; // a directory's mode or times: no code changed
            }
            if whole && event.mask.intersects(F::IN_CREATE | F::IN_MOVED_TO) {
                self.add_directory(&path, false);
            }
            if event.mask.contains(F::IN_MOVED_FROM) {
                self.forget(&path);
            }
        }
        Some(path)
    }

    /// Watches `dir` and every directory under it that is not ignored; `follow`: `dir` may be
    /// a symlink (a root the user named).
    fn add_directory(&mut self, dir: &Path, follow: bool) {
        let mut todo = vec![(dir.to_path_buf(), follow)];
        while let Some((dir, follow)) = todo.pop() {
            if self.add(&dir, follow, true).is_none() {
                continue;
            }
            let Ok(entries) = std::fs::read_dir(&dir) else {
                continue; // gone already, or unreadable: its watch says what changes
            };
            for entry in entries.flatten() {
                // The entry's own type: a symlink to a directory is not followed.
                if entry.file_type().is_ok_and(|t| t.is_dir()) && !ignored(&entry.file_name()) {
                    todo.push((entry.path(), false));
                }
            }
        }
    }

    /// One watch on `dir`, where every entry counts (`whole`) or only the names a caller adds;
    /// None (and a line, when it is worth one) when it cannot be had.
    fn add(&mut self, dir: &Path, follow: bool, whole: bool) -> Option<WatchDescriptor> {
        let mut mask = changes();
        if !follow {
            mask |= AddWatchFlags::IN_DONT_FOLLOW;
        }
        match self.inotify.add_watch(dir, mask) {
            Ok(wd) => {
                // The same directory twice (a file's and a tree's) is one watch.
                let entry = self.dirs.entry(wd).or_insert_with(|| Dir {
                    path: dir.to_path_buf(),
                    whole: false,
                    files: BTreeSet::new(),
                });
                entry.whole |= whole;
                Some(wd)
            }
            // Removed before we got to it, or no directory (any more): nothing to watch.
            Err(Errno::ENOENT | Errno::ENOTDIR) => None,
            Err(Errno::ENOSPC) => {
                if !self.limit_said {
                    self.limit_said = true;
                    log::warn!("{}", limit_warning(dir, current_limit()));
                }
                None
            }
            Err(error) => {
                log::warn!(
                    "watch: cannot watch {}: {error}; changes in it will not reload",
                    dir.display()
                );
                None
            }
        }
    }

    /// Stops watching `path` and everything under it (moved away: its watches would name it
    /// by its old path).
    fn forget(&mut self, path: &Path) {
        let gone: Vec<WatchDescriptor> = self
            .dirs
            .iter()
            .filter(|(_, dir)| dir.whole && dir.path.starts_with(path))
            .map(|(wd, _)| *wd)
            .collect();
        for wd in gone {
            self.dirs.remove(&wd);
            let _ = self.inotify.rm_watch(wd);
        }
    }
}

/// The user's watch limit now, if /proc says it.
fn current_limit() -> Option<u64> {
    std::fs::read_to_string("/proc/sys/fs/inotify/max_user_watches")
        .ok()
        .and_then(|text| text.trim().parse().ok())
}

/// The one line said when the watch limit is reached.
fn limit_warning(dir: &Path, limit: Option<u64>) -> String {
    let at = limit.map(|n| format!(" ({n})")).unwrap_or_default();
    format!(
        "watch: cannot watch {}: this user's inotify watches are at {WATCH_LIMIT}{at}; changes there and in directories not yet watched will not reload; raise it (sysctl {WATCH_LIMIT}=524288) and restart",
        dir.display()
    )
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    /// A fresh directory (removed when dropped).
    struct Temp(PathBuf);

    impl Temp {
        fn new() -> Temp {
            static NEXT: AtomicUsize = AtomicUsize::new(0);
            let n = NEXT.fetch_add(1, Ordering::Relaxed);
            let dir = std::env::temp_dir().join(format!("clb-watch-{}-{n}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            Temp(dir)
        }
    }

    impl Drop for Temp {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// Every change queued now (the kernel queues an event within the system call).
    fn drain(tree: &mut Tree) -> Vec<PathBuf> {
        let mut all = Vec::new();
        loop {
            match tree.read() {
                Ok(changed) => all.extend(changed),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return all,
                Err(e) => panic!("{e}"),
            }
        }
    }

    #[test]
    fn writes_count_ignored_directories_and_editor_files_do_not() {
        let temp = Temp::new();
        let root = &temp.0;
        std::fs::create_dir_all(root.join("node_modules/pkg")).unwrap();
        std::fs::create_dir_all(root.join(".git")).unwrap();
        std::fs::create_dir_all(root.join("lib")).unwrap();
        std::fs::write(root.join("app.js"), "1").unwrap();
        let mut tree = Tree::new(std::slice::from_ref(root)).unwrap();
        // The root and lib, not node_modules, its package, nor .git.
        assert_eq!(tree.directories(), 2);
        std::fs::write(root.join("node_modules/pkg/index.js"), "x").unwrap();
        std::fs::write(root.join(".git/index"), "x").unwrap();
        std::fs::write(root.join(".app.js.swp"), "x").unwrap();
        std::fs::write(root.join("4913"), "x").unwrap();
        std::fs::remove_file(root.join("4913")).unwrap();
        std::fs::write(root.join("app.js~"), "x").unwrap();
        assert_eq!(drain(&mut tree), Vec::<PathBuf>::new());
        std::fs::write(root.join("app.js"), "2").unwrap();
        std::fs::write(root.join("lib/util.js"), "x").unwrap();
        let changed = drain(&mut tree);
        assert_eq!(changed.first(), Some(&root.join("app.js")), "{changed:?}");
        assert!(changed.contains(&root.join("lib/util.js")), "{changed:?}");
    }

    #[test]
    fn new_directories_are_watched_and_moved_ones_forgotten() {
        let temp = Temp::new();
        let root = &temp.0;
        let mut tree = Tree::new(std::slice::from_ref(root)).unwrap();
        std::fs::create_dir_all(root.join("src/deep")).unwrap();
        let changed = drain(&mut tree);
        assert_eq!(changed.first(), Some(&root.join("src")), "{changed:?}");
        std::fs::write(root.join("src/deep/a.py"), "x").unwrap();
        assert!(drain(&mut tree).contains(&root.join("src/deep/a.py")));
        // A new node_modules is not watched.
        std::fs::create_dir(root.join("node_modules")).unwrap();
        std::fs::write(root.join("node_modules/b.js"), "x").unwrap();
        assert_eq!(drain(&mut tree), Vec::<PathBuf>::new());
        std::fs::rename(root.join("src"), root.join("lib")).unwrap();
        let changed = drain(&mut tree);
        assert!(changed.contains(&root.join("src")), "{changed:?}");
        assert!(changed.contains(&root.join("lib")), "{changed:?}");
        // Under its new name, and no longer under its old one.
        std::fs::write(root.join("lib/deep/c.py"), "x").unwrap();
        let mut changed = drain(&mut tree);
        changed.dedup(); // created, then written
        assert_eq!(changed, vec![root.join("lib/deep/c.py")]);
    }

    #[test]
    fn a_watched_file_is_seen_through_an_editor_s_rename() {
        let temp = Temp::new();
        let root = &temp.0;
        let file = root.join("config.json");
        std::fs::write(&file, "1").unwrap();
        std::fs::write(root.join("other"), "1").unwrap();
        let mut tree = Tree::new(std::slice::from_ref(&file)).unwrap();
        std::fs::write(root.join("other"), "2").unwrap();
        assert_eq!(drain(&mut tree), Vec::<PathBuf>::new());
        // Saved as a new file renamed over the old one.
        std::fs::write(root.join("config.json.tmp"), "2").unwrap();
        std::fs::rename(root.join("config.json.tmp"), &file).unwrap();
        assert_eq!(drain(&mut tree), vec![file.clone()]);
        std::fs::write(&file, "3").unwrap();
        assert_eq!(drain(&mut tree), vec![file]);
    }

    #[test]
    fn a_missing_root_is_named() {
        let temp = Temp::new();
        let missing = temp.0.join("missing");
        let error = Tree::new(std::slice::from_ref(&missing)).unwrap_err();
        assert_eq!(
            error.to_string(),
            format!(
                "--watch {}: No such file or directory (os error 2)",
                missing.display()
            )
        );
    }

    #[test]
    fn the_limit_warning_names_the_sysctl() {
        let line = limit_warning(Path::new("/app/src"), Some(8192));
        assert!(
            line.contains("fs.inotify.max_user_watches (8192)")
                && line.contains("sysctl fs.inotify.max_user_watches=")
                && line.contains("/app/src"),
            "{line}"
        );
        assert!(!line.contains('\n'));
    }
}
