//! Unix-socket listens (`--listen unix:/path`, a Node worker's `listen(path)`): one listening
//! socket per path, shared by every worker.
//!
//! The kernel has no SO_REUSEPORT group for Unix sockets, so no program balances them: the
//! workers take turns in `accept()` on the one queue (as under Node's SCHED_NONE), and a
//! strategy has no effect there. The primary keeps its own copy of each socket: connections wait
//! in the queue while no worker runs, a worker's exit never unbinds the path, and the file is
//! removed when the cluster stops (only if it is still the file this primary bound).

use std::{
    fmt, io,
    os::{
        fd::OwnedFd,
        unix::fs::{FileTypeExt, MetadataExt, PermissionsExt},
    },
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};
use socket2::{Domain, SockAddr, Socket, Type};

use crate::sys::fds::Inherited;

/// Accept queue length asked for, as for the TCP listeners.
const BACKLOG: i32 = 4096;
/// A `--listen unix:` socket file's mode: its owner and group may connect (a proxy such as
/// nginx joins the group), nobody else. A path a Node worker asks for keeps the mode bind gives
/// it (the primary's umask), as under Node's own primary.
pub const LISTED_MODE: u32 = 0o660;

/// Who owns the socket files: the `--user` the workers run as, so that they (and Node's
/// `readableAll`/`writableAll`, a chmod in the worker) may change them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Owner {
    pub uid: u32,
    pub gid: u32,
}

/// A path could not be listened on; `Display` says what to do.
#[derive(Debug)]
pub struct UnixListenError {
    pub path: PathBuf,
    pub problem: Problem,
}

#[derive(Debug)]
pub enum Problem {
    /// Something that is not a socket is there: never replaced.
    NotASocket,
    /// A server answers on it.
    InUse,
    Io(io::Error),
}

impl UnixListenError {
    /// The errno a Node worker's listen gets.
    pub fn errno(&self) -> i32 {
        match &self.problem {
            Problem::NotASocket | Problem::InUse => libc::EADDRINUSE,
            Problem::Io(e) => e.raw_os_error().unwrap_or(libc::EINVAL),
        }
    }
}

impl fmt::Display for UnixListenError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let path = self.path.display();
        match &self.problem {
            Problem::NotASocket => write!(
                f,
                "cannot listen on unix:{path}: it exists and is not a socket (only a stale socket file is replaced); remove it or choose another path"
            ),
            Problem::InUse => write!(
                f,
                "cannot listen on unix:{path}: a server answers there; stop it or choose another path"
            ),
            Problem::Io(e) => write!(f, "cannot listen on unix:{path}: {e}"),
        }
    }
}

impl std::error::Error for UnixListenError {}

/// One path's listening socket.
#[derive(Debug)]
pub struct UnixListen {
    pub path: PathBuf,
    socket: OwnedFd,
    /// The file bind created (device, inode): removed at the end only if the path still is it.
    file: (u64, u64),
}

impl UnixListen {
    /// Binds `path` (replacing a stale socket file there), listens, and gives the file to
    /// `owner` with `mode`, if given.
    pub fn bind(
        path: &Path,
        owner: Option<Owner>,
        mode: Option<u32>,
    ) -> Result<UnixListen, UnixListenError> {
        let error = |problem| UnixListenError {
            path: path.to_path_buf(),
            problem,
        };
        let io_error = |e: io::Error| error(Problem::Io(e));
        remove_stale(path).map_err(error)?;
        let socket = Socket::new(Domain::UNIX, Type::STREAM.cloexec(), None).map_err(io_error)?;
        let (address, _dir) = socket_address(path).map_err(io_error)?;
        socket.bind(&address).map_err(io_error)?;
        let bound = std::fs::symlink_metadata(path).map_err(io_error)?;
        let listen = UnixListen {
            path: path.to_path_buf(),
            socket: socket.into(),
            file: (bound.dev(), bound.ino()),
        };
        // From here on, an error removes the file again (`listen` is dropped after `remove`).
        let finish = || -> io::Result<()> {
            if let Some(owner) = owner {
                std::os::unix::fs::lchown(path, Some(owner.uid), Some(owner.gid))?;
            }
            if let Some(mode) = mode {
                std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
            }
            let socket = socket2::SockRef::from(&listen.socket);
            socket.listen(BACKLOG)
        };
        if let Err(e) = finish() {
            listen.remove();
            return Err(io_error(e));
        }
        Ok(listen)
    }

    /// A copy of the listening socket, for a worker.
    pub fn socket(&self) -> io::Result<OwnedFd> {
        self.socket.try_clone()
    }

    /// Lets everyone read and/or write the socket file (Node's `readableAll` and
    /// `writableAll`, which add those bits as libuv's uv_pipe_chmod does), if the path is still
    /// the file this listen bound.
    pub fn allow_all(&self, readable: bool, writable: bool) -> io::Result<()> {
        let wanted = if readable { 0o444 } else { 0 } | if writable { 0o222 } else { 0 };
        let now = std::fs::symlink_metadata(&self.path)?;
        if wanted == 0 || (now.dev(), now.ino()) != self.file || now.mode() & wanted == wanted {
            return Ok(());
        }
        let mode = (now.mode() | wanted) & 0o7777;
        std::fs::set_permissions(&self.path, std::fs::Permissions::from_mode(mode))
    }

    /// Removes the socket file, if the path is still the one this listen bound.
    pub fn remove(&self) {
        match std::fs::symlink_metadata(&self.path) {
            Ok(now) if (now.dev(), now.ino()) == self.file => {
                if let Err(e) = std::fs::remove_file(&self.path) {
                    log::warn!("cannot remove {}: {e}", self.path.display());
                }
            }
            _ => {}
        }
    }

    /// As an upgrade hands it to the new binary.
    pub fn saved(&self) -> Option<SavedUnixListen> {
        Some(SavedUnixListen {
            path: self.path.clone(),
            socket: Inherited::of(&self.socket)?,
            file: self.file,
            activated: false,
        })
    }

    /// Takes over a listen an older binary held; `None` when its descriptor is lost.
    pub fn resume(saved: &SavedUnixListen) -> Option<UnixListen> {
        Some(UnixListen {
            path: saved.path.clone(),
            socket: saved.socket.take()?,
            file: saved.file,
        })
    }
}

/// A Unix listen in an upgrade's state.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SavedUnixListen {
    pub path: PathBuf,
    pub socket: Inherited,
    pub file: (u64, u64),
    /// A `--listen` path (not one a worker asked for).
    #[serde(default)]
    pub activated: bool,
}

/// Makes `path` free for bind: nothing there, or a socket file nobody answers on, which is
/// removed (what a primary that was killed leaves behind). Anything else is refused.
fn remove_stale(path: &Path) -> Result<(), Problem> {
    let found = match std::fs::symlink_metadata(path) {
        Ok(found) => found,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(Problem::Io(e)),
    };
    if !found.file_type().is_socket() {
        return Err(Problem::NotASocket);
    }
    let probe = Socket::new(Domain::UNIX, Type::STREAM.cloexec().nonblocking(), None)
        .map_err(Problem::Io)?;
    let (address, _dir) = socket_address(path).map_err(Problem::Io)?;
    match probe.connect(&address) {
        // Connected, or its queue is full (EAGAIN): a live server.
        Ok(()) => Err(Problem::InUse),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Err(Problem::InUse),
        Err(e) if e.raw_os_error() == Some(libc::ECONNREFUSED) => {
            match std::fs::remove_file(path) {
                Ok(()) => Ok(()),
                Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
                Err(e) => Err(Problem::Io(e)),
            }
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Problem::Io(e)),
    }
}

/// The longest path a socket address holds (`sun_path` is 108 bytes with its NUL).
const MAX_SOCKET_PATH: usize = 107;

/// The socket address of `path`. A longer path than a socket address holds is reached through
/// its directory, opened (the second value, to keep open while the address is used), as
/// `/proc/self/fd/N/NAME`: Node's primary shortens such a path (relative to its directory).
fn socket_address(path: &Path) -> io::Result<(SockAddr, Option<std::fs::File>)> {
    if path.as_os_str().len() <= MAX_SOCKET_PATH {
        return Ok((SockAddr::unix(path)?, None));
    }
    let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else {
        return Err(io::Error::from_raw_os_error(libc::ENAMETOOLONG));
    };
    let dir = std::fs::File::open(dir)?;
    let short = Path::new("/proc/self/fd")
        .join(std::os::fd::AsRawFd::as_raw_fd(&dir).to_string())
        .join(name);
    if short.as_os_str().len() > MAX_SOCKET_PATH {
        return Err(io::Error::from_raw_os_error(libc::ENAMETOOLONG));
    }
    Ok((SockAddr::unix(short)?, Some(dir)))
}

/// The cluster's Unix listens: the `--listen` paths first (their sockets follow the TCP and UDP
/// ones at fds 3.. of every worker), then those the workers asked for.
#[derive(Debug, Default)]
pub struct UnixListens {
    listens: Vec<UnixListen>,
    activated: usize,
}

impl UnixListens {
    /// Binds every `--listen unix:` path; on an error, the files bound so far are removed.
    pub fn new(paths: &[PathBuf], owner: Option<Owner>) -> Result<UnixListens, UnixListenError> {
        let mut listens = UnixListens::default();
        for path in paths {
            match UnixListen::bind(path, owner, Some(LISTED_MODE)) {
                Ok(listen) => listens.listens.push(listen),
                Err(e) => {
                    listens.remove_files();
                    return Err(e);
                }
            }
        }
        listens.activated = listens.listens.len();
        Ok(listens)
    }

    /// Takes over the listens an older binary held.
    pub fn resume(saved: &[SavedUnixListen]) -> Result<UnixListens, UnixListenError> {
        let mut listens = UnixListens::default();
        for state in saved {
            let listen = UnixListen::resume(state).ok_or_else(|| UnixListenError {
                path: state.path.clone(),
                problem: Problem::Io(io::Error::other("its socket was not inherited")),
            })?;
            listens.listens.push(listen);
        }
        listens.activated = saved.iter().filter(|s| s.activated).count();
        Ok(listens)
    }

    pub fn saved(&self) -> Vec<SavedUnixListen> {
        self.listens
            .iter()
            .enumerate()
            .filter_map(|(index, listen)| {
                let mut saved = listen.saved()?;
                saved.activated = index < self.activated;
                Some(saved)
            })
            .collect()
    }

    /// The `--listen` paths.
    pub fn activated(&self) -> &[UnixListen] {
        &self.listens[..self.activated]
    }

    /// How many paths the workers' requests added.
    pub fn queried(&self) -> usize {
        self.listens.len() - self.activated
    }

    pub fn find(&self, path: &Path) -> Option<&UnixListen> {
        self.listens.iter().find(|l| l.path == path)
    }

    /// Binds a path a worker asked for (the workers run as the primary's user, which owns it;
    /// its mode is what bind gives it).
    pub fn add(&mut self, path: &Path) -> Result<&UnixListen, UnixListenError> {
        self.listens.push(UnixListen::bind(path, None, None)?);
        Ok(&self.listens[self.listens.len() - 1])
    }

    pub fn paths(&self) -> impl Iterator<Item = &Path> {
        self.listens.iter().map(|l| l.path.as_path())
    }

    /// Removes every socket file this primary bound (the cluster stopped).
    pub fn remove_files(&self) {
        self.listens.iter().for_each(UnixListen::remove);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("clb-unix-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("scratch dir");
        dir
    }

    #[test]
    fn binds_with_mode_0660_serves_and_removes_its_file() {
        let dir = scratch("bind");
        let path = dir.join("app.sock");
        let listen = UnixListen::bind(&path, None, Some(LISTED_MODE)).expect("bind");
        let meta = std::fs::symlink_metadata(&path).expect("file");
        assert!(meta.file_type().is_socket());
        assert_eq!(meta.mode() & 0o777, LISTED_MODE);
        // A copy accepts what a client sends to the path.
        let copy = std::os::unix::net::UnixListener::from(listen.socket().expect("dup"));
        let _client = std::os::unix::net::UnixStream::connect(&path).expect("connect");
        copy.accept().expect("accept");
        listen.remove();
        assert!(!path.exists());
    }

    #[test]
    fn a_stale_socket_is_replaced_and_a_live_one_or_a_file_refused() {
        let dir = scratch("stale");
        let path = dir.join("app.sock");
        // A socket file whose server is gone (a killed primary's).
        drop(std::os::unix::net::UnixListener::bind(&path).expect("stale"));
        assert!(path.exists());
        let listen = UnixListen::bind(&path, None, Some(LISTED_MODE)).expect("stale replaced");
        // Now a server answers there.
        let again = UnixListen::bind(&path, None, Some(LISTED_MODE)).expect_err("in use");
        assert!(matches!(again.problem, Problem::InUse), "{again}");
        assert_eq!(again.errno(), libc::EADDRINUSE);
        listen.remove();
        let file = dir.join("data");
        std::fs::write(&file, "keep me").expect("file");
        let refused = UnixListen::bind(&file, None, None).expect_err("a regular file");
        assert!(refused.to_string().contains("is not a socket"), "{refused}");
        assert_eq!(std::fs::read_to_string(&file).expect("kept"), "keep me");
    }

    #[test]
    fn a_file_replaced_since_is_not_removed() {
        let dir = scratch("replaced");
        let path = dir.join("app.sock");
        let listen = UnixListen::bind(&path, None, Some(LISTED_MODE)).expect("bind");
        std::fs::remove_file(&path).expect("unlink");
        let other = UnixListen::bind(&path, None, Some(LISTED_MODE)).expect("another server's");
        listen.remove();
        assert!(path.exists(), "the other server's file was removed");
        other.remove();
    }

    #[test]
    fn a_path_longer_than_a_socket_address_is_bound_through_its_directory() {
        let dir = scratch("long").join("d".repeat(60));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("s".repeat(70));
        assert!(path.as_os_str().len() > MAX_SOCKET_PATH);
        let listen = UnixListen::bind(&path, None, Some(LISTED_MODE)).expect("bind");
        assert!(std::fs::symlink_metadata(&path)
            .expect("file")
            .file_type()
            .is_socket());
        // A live server there now: the probe reaches it through the directory too.
        let again = UnixListen::bind(&path, None, Some(LISTED_MODE)).expect_err("in use");
        assert!(matches!(again.problem, Problem::InUse), "{again}");
        listen.allow_all(true, true).expect("chmod");
        let mode = std::fs::symlink_metadata(&path).expect("file").mode();
        assert_eq!(mode & 0o777, 0o666, "0660 and everyone's read and write");
        listen.remove();
        assert!(!path.exists());
    }

    #[test]
    fn a_failed_path_removes_the_ones_bound_before_it() {
        let dir = scratch("new");
        let good = dir.join("a.sock");
        let bad = dir.join("missing-dir").join("b.sock");
        let error = UnixListens::new(&[good.clone(), bad], None).expect_err("fails");
        assert!(error.to_string().contains("b.sock"), "{error}");
        assert!(!good.exists());
    }
}
