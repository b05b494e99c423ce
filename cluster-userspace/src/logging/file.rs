//! `run --log-file FILE`: the primary's output (its lines and its workers') appended to FILE
//! instead of stdout and stderr. At `--log-file-size` the file is renamed FILE.1 (replacing
//! the one before) and a new FILE begun, so the log takes at most twice that size; SIGUSR1
//! reopens FILE, for a logrotate that moved it. Only the output thread writes the file, one
//! whole line at a time, so a rotation never splits a line.

use std::{
    fs::{File, OpenOptions},
    io::Write,
    os::unix::fs::OpenOptionsExt,
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, Ordering},
        Mutex, MutexGuard, PoisonError,
    },
};

/// `--log-file-size`'s default.
pub const DEFAULT_SIZE: u64 = 10 * 1024 * 1024;

pub struct LogFile {
    path: PathBuf,
    file: File,
    /// Bytes in the file now.
    written: u64,
    limit: u64,
}

static FILE: Mutex<Option<LogFile>> = Mutex::new(None);
static REOPEN: AtomicBool = AtomicBool::new(false);

/// Appends to `path` (created 0640). Only a regular file of this process's user with no other
/// name is taken: a symbolic link (O_NOFOLLOW), a hard link to another file, a file someone else
/// put there (a worker whose user can write the directory could then edit or forge the log),
/// or a FIFO (opened without O_NONBLOCK, it would block the primary until a reader came).
fn open(path: &Path) -> std::io::Result<(File, u64)> {
    use std::os::unix::fs::MetadataExt;
    let refused = |why: &str| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!(
                "{} {why}; give a path in a directory only cluster-lb's user can write",
                path.display()
            ),
        )
    };
    let file = match OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o640)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
    {
        Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
            return Err(refused("is a symbolic link"))
        }
        // A FIFO nobody reads (a non-blocking open for writing fails rather than waits).
        Err(e) if e.raw_os_error() == Some(libc::ENXIO) => {
            return Err(refused("is not a regular file"))
        }
        other => other?,
    };
    let meta = file.metadata()?;
    if !meta.file_type().is_file() {
        return Err(refused("is not a regular file"));
    }
    // SAFETY: geteuid has no preconditions and cannot fail.
    if meta.uid() != unsafe { libc::geteuid() } {
        return Err(refused("belongs to another user"));
    }
    if meta.nlink() != 1 {
        return Err(refused("has other names (hard links)"));
    }
    // Writes may block again (a full disk is the writer thread's, not a reason to drop lines).
    let fd = std::os::fd::AsRawFd::as_raw_fd(&file);
    // SAFETY: fd is this File's open descriptor; F_GETFL/F_SETFL only change its flags.
    unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFL);
        if flags >= 0 {
            libc::fcntl(fd, libc::F_SETFL, flags & !libc::O_NONBLOCK);
        }
    }
    Ok((file, meta.len()))
}

/// From now on every line goes to `path`, rotated at `limit` bytes.
pub fn start(path: &Path, limit: u64) -> std::io::Result<()> {
    *lock() = Some(LogFile::open(path, limit)?);
    Ok(())
}

/// The next line is written to a newly opened file (SIGUSR1).
pub fn reopen() {
    REOPEN.store(true, Ordering::Release);
}

fn lock() -> MutexGuard<'static, Option<LogFile>> {
    FILE.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The path written with its rotation's suffix.
pub fn rotated(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_os_string();
    name.push(".1");
    PathBuf::from(name)
}

/// Writes `bytes` (whole lines) to the log file; false when there is none.
pub fn write(bytes: &[u8]) -> bool {
    match lock().as_mut() {
        Some(log) => {
            log.write(bytes);
            true
        }
        None => false,
    }
}

impl LogFile {
    fn open(path: &Path, limit: u64) -> std::io::Result<LogFile> {
        let (file, written) = open(path)?;
        Ok(LogFile {
            path: path.to_path_buf(),
            file,
            written,
            limit: limit.max(1),
        })
    }

    fn write(&mut self, bytes: &[u8]) {
        if REOPEN.swap(false, Ordering::AcqRel) {
            self.reopen();
        } else if self.written > 0 && self.written + bytes.len() as u64 > self.limit {
            self.rotate();
        }
        match self.file.write_all(bytes) {
            Ok(()) => self.written += bytes.len() as u64,
            Err(error) => {
                // A full disk, or its filesystem gone: stderr says so, and gets the line.
                let _ = std::io::stderr().lock().write_all(
                    format!(
                        "cluster-lb: cannot write {}: {error}\n",
                        self.path.display()
                    )
                    .as_bytes(),
                );
                let _ = std::io::stderr().lock().write_all(bytes);
            }
        }
    }

    fn rotate(&mut self) {
        if let Err(error) = std::fs::rename(&self.path, rotated(&self.path)) {
            // Go on in the same file rather than lose lines; say so once per attempt.
            let _ = std::io::stderr().lock().write_all(
                format!(
                    "cluster-lb: cannot rotate {}: {error}\n",
                    self.path.display()
                )
                .as_bytes(),
            );
            self.written = 0;
            return;
        }
        self.reopen();
    }

    fn reopen(&mut self) {
        match open(&self.path) {
            Ok((file, written)) => {
                self.file = file;
                self.written = written;
            }
            Err(error) => {
                let _ = std::io::stderr().lock().write_all(
                    format!(
                        "cluster-lb: cannot reopen {}: {error}; writing on to the old file\n",
                        self.path.display()
                    )
                    .as_bytes(),
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What a worker able to write the log's directory could put at its path is refused at
    /// once (a FIFO without blocking), and a regular file of our own is taken.
    #[test]
    fn only_a_regular_file_of_ours_with_one_name_is_taken() {
        let dir = std::env::temp_dir().join(format!("clb-log-refused-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("a scratch directory");
        let fifo = dir.join("fifo.log");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600))
            .expect("mkfifo");
        let link = dir.join("link.log");
        std::os::unix::fs::symlink(dir.join("elsewhere"), &link).expect("symlink");
        let ours = dir.join("ours.log");
        std::fs::write(&ours, "").expect("a file");
        let second_name = dir.join("second.log");
        std::fs::hard_link(&ours, &second_name).expect("hard link");
        for (path, why) in [
            (&fifo, "is not a regular file"),
            (&link, "is a symbolic link"),
            (&ours, "has other names"),
        ] {
            match open(path) {
                Err(e) => assert!(e.to_string().contains(why), "{}: {e}", path.display()),
                Ok(_) => panic!("{} was taken", path.display()),
            }
        }
        std::fs::remove_file(&second_name).expect("unlinking");
        if nix::unistd::geteuid().is_root() {
            // A file a --user worker (here nobody) owns.
            let theirs = dir.join("theirs.log");
            std::fs::write(&theirs, "").expect("a file");
            std::os::unix::fs::chown(&theirs, Some(65534), Some(65534)).expect("chown");
            match open(&theirs) {
                Err(e) => assert!(e.to_string().contains("belongs to another user"), "{e}"),
                Ok(_) => panic!("a file of another user was taken"),
            }
        }
        assert!(open(&ours).is_ok());
        assert!(open(&dir.join("new.log")).is_ok());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn the_file_is_rotated_at_its_size_and_reopened_on_request() {
        let dir = std::env::temp_dir().join(format!("clb-log-file-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("cluster.log");
        // An instance of its own: the process's log file stays unset for other tests.
        let mut log = LogFile::open(&path, 100).unwrap();
        for n in 0..5 {
            log.write(format!("line {n} {}\n", "x".repeat(30)).as_bytes());
        }
        let now = std::fs::read_to_string(&path).unwrap();
        let before = std::fs::read_to_string(rotated(&path)).unwrap();
        assert!(
            now.len() <= 100 && before.len() <= 100,
            "{now:?} {before:?}"
        );
        assert!(
            now.starts_with("line 4 ") || now.starts_with("line 3 "),
            "{now:?}"
        );
        assert!(
            before.ends_with(&format!("{}\n", "x".repeat(30))),
            "{before:?}"
        );
        // Moved away (logrotate): the next line after reopen() is in a new file.
        let moved = dir.join("moved.log");
        std::fs::rename(&path, &moved).unwrap();
        reopen();
        log.write(b"after\n");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "after\n");
        assert!(!std::fs::read_to_string(&moved).unwrap().contains("after"));
        // A symbolic link is not followed.
        let link = dir.join("link.log");
        std::os::unix::fs::symlink(dir.join("target"), &link).unwrap();
        assert!(LogFile::open(&link, 100).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
