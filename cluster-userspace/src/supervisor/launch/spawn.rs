//! Starting one worker process with its listening sockets, by socket activation: the sockets
//! become fds 3.. and `LISTEN_FDS`, `LISTEN_PID`, `LISTEN_FDNAMES` describe them, as systemd
//! does, so Node, gunicorn, uvicorn, Go and Rust's listenfd all serve from them unchanged.
//!
//! `LISTEN_PID` must be the worker's own pid (libsystemd ignores the fds otherwise), which is
//! known only after fork. `std::process::Command` builds the environment before forking, so
//! this module forks and execs itself: everything is prepared in the parent, and the child
//! only makes async-signal-safe system calls before `execve`.

use std::{
    env,
    ffi::{CString, OsStr, OsString},
    fs,
    io::Read,
    os::{
        fd::{AsRawFd, BorrowedFd, OwnedFd, RawFd},
        unix::{ffi::OsStrExt, fs::PermissionsExt},
    },
    path::{Path, PathBuf},
    ptr,
};

use nix::{sys::wait::waitpid, unistd::Pid};

pub use crate::supervisor::launch::seccomp::Filter;

/// Why a worker command cannot be started.
#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    #[error("no worker command given; put it after --, e.g. -- node server.js")]
    NoCommand,
    #[error("the worker command is empty")]
    EmptyCommand,
    #[error("the worker command or its environment contains a NUL byte")]
    NulByte,
    #[error("cannot run {0}: command not found in PATH")]
    NotFound(String),
    #[error("cannot run {0}: it is not an executable file (chmod +x?)")]
    NotExecutable(String),
    #[error("cannot run {program}: {source}")]
    Inaccessible {
        program: String,
        source: std::io::Error,
    },
    #[error("{what}: {source}")]
    Os {
        what: &'static str,
        source: std::io::Error,
    },
    #[error("cannot start {program}: {source}")]
    Exec {
        program: String,
        source: std::io::Error,
    },
    #[error("cannot start {program} in {}: {source}", .dir.display())]
    Chdir {
        program: String,
        dir: PathBuf,
        source: std::io::Error,
    },
}

fn os(what: &'static str) -> impl FnOnce(std::io::Error) -> SpawnError {
    move |source| SpawnError::Os { what, source }
}

/// Variables that describe the sockets of *this* process; a worker must only see its own.
const INHERITED_VARIABLES_TO_DROP: &[&str] = &[
    "LISTEN_FDS",
    "LISTEN_PID",
    "LISTEN_FDNAMES",
    "NOTIFY_SOCKET",
    // The primary's own systemd watchdog is not the workers' (see --watchdog).
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
    "CLUSTER_LB_WORKER_ID",
    "CLUSTER_LB_WORKERS",
    "CLUSTER_LB_IPC_FD",
    "CLUSTER_LB_PRIMARY",
    // Node's own cluster variables: a cluster-lb started by a Node primary must not pass that
    // primary's channel on.
    "NODE_CHANNEL_FD",
    "NODE_CHANNEL_SERIALIZATION_MODE",
    "NODE_UNIQUE_ID",
];

/// The first fd a socket-activated program looks at (SD_LISTEN_FDS_START).
const LISTEN_FDS_START: RawFd = 3;

/// The worker program, resolved once, and the environment every worker starts from.
#[derive(Debug)]
pub struct WorkerCommand {
    /// As given when it has a '/' (a relative one is found in `cwd` at every exec, so a
    /// `current` symlink switched to a new release gives its program), else found on PATH.
    path: CString,
    argv: Vec<CString>,
    base_env: Vec<CString>,
    /// The directory it starts in (the primary's own when `None`), as given: the child
    /// chdir()s to it at every spawn, so a symlink in it is followed anew each time.
    cwd: Option<PathBuf>,
    cwd_c: Option<CString>,
}

/// What the child reports before `_exit` when a step fails: the step, and its errno.
const STEP_SETUP: u32 = 0;
const STEP_CHDIR: u32 = 1;

/// What differs from one worker to the next.
pub struct WorkerSpec<'a> {
    /// Listening sockets, in `--listen` order; they become fds 3, 4, ...
    pub sockets: &'a [OwnedFd],
    /// One name per socket for `LISTEN_FDNAMES` (no ':' allowed).
    pub socket_names: &'a [String],
    /// Extra variables (`CLUSTER_LB_WORKER_ID`, ...).
    pub env: &'a [(String, String)],
    /// The worker's ends of its channels to the primary (its channel, if it gets one; the
    /// program's primary process also gets its fork requests' channel).
    pub channels: &'a [Channel<'a>],
    /// Where the worker's stdout and stderr go (pipes the primary reads), or inherited.
    pub stdout: Option<BorrowedFd<'a>>,
    pub stderr: Option<BorrowedFd<'a>>,
    /// Who the worker runs as, or the primary's own user.
    pub credentials: Option<&'a Credentials>,
    /// A seccomp filter installed just before exec.
    pub filter: Option<&'a Filter>,
}

/// The worker's end of a channel to the primary: channels go right after the sockets, in
/// order, and `variable` names each one's fd number (CLUSTER_LB_IPC_FD, or Node's
/// NODE_CHANNEL_FD).
pub struct Channel<'a> {
    pub fd: BorrowedFd<'a>,
    pub variable: &'static str,
}

/// A user to switch to before exec, resolved in the parent (the child may not look anything
/// up: that allocates and reads files).
#[derive(Debug, Clone)]
pub struct Credentials {
    /// The account's name and home directory, for USER, LOGNAME and HOME.
    pub name: String,
    pub home: String,
    pub uid: libc::uid_t,
    pub gid: libc::gid_t,
    pub groups: Vec<libc::gid_t>,
}

impl WorkerCommand {
    /// `command` for workers started in the primary's directory.
    #[cfg(test)]
    pub fn new(command: &[String]) -> Result<WorkerCommand, SpawnError> {
        WorkerCommand::new_in(command, None)
    }

    /// Resolves `command[0]` on PATH now, so a typo is one clear error at start-up rather than
    /// a crash loop of workers. For workers started in `cwd`, a relative program (`./server`,
    /// `bin/app`) is checked there, and stays relative, so every spawn runs the one in
    /// whatever `cwd` names by then.
    pub fn new_in(command: &[String], cwd: Option<&Path>) -> Result<WorkerCommand, SpawnError> {
        let (program, _) = command.split_first().ok_or(SpawnError::NoCommand)?;
        let path = resolve(program, cwd)?;
        let argv = command
            .iter()
            .map(|arg| CString::new(arg.as_bytes()))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|_| SpawnError::NulByte)?;
        let base_env = env::vars_os()
            .filter(|(key, _)| {
                !INHERITED_VARIABLES_TO_DROP
                    .iter()
                    .any(|drop| key == OsStr::new(drop))
            })
            .filter_map(|(key, value)| env_entry(&key, &value))
            .collect();
        Ok(WorkerCommand {
            path: CString::new(path.as_os_str().as_bytes()).map_err(|_| SpawnError::NulByte)?,
            argv,
            base_env,
            cwd: None,
            cwd_c: None,
        })
        .and_then(|made| made.started_in(cwd))
    }

    fn started_in(mut self, cwd: Option<&Path>) -> Result<WorkerCommand, SpawnError> {
        self.cwd_c = cwd
            .map(|dir| CString::new(dir.as_os_str().as_bytes()).map_err(|_| SpawnError::NulByte))
            .transpose()?;
        self.cwd = cwd.map(Path::to_path_buf);
        Ok(self)
    }

    /// `command` with exactly the environment `env` (minus what describes another process's
    /// sockets and channels), started in `cwd`: a worker as the program's own primary forks it.
    pub fn with_env(
        command: &[String],
        env: &[(String, String)],
        cwd: Option<&str>,
    ) -> Result<WorkerCommand, SpawnError> {
        let mut made = WorkerCommand::new_in(command, cwd.map(Path::new))?;
        made.base_env = env
            .iter()
            .filter(|(key, _)| !INHERITED_VARIABLES_TO_DROP.contains(&key.as_str()))
            .filter_map(|(key, value)| env_entry(OsStr::new(key), OsStr::new(value)))
            .collect();
        Ok(made)
    }

    /// The command for `config`: its program, with the configured variables over the
    /// primary's environment, started in the configured directory.
    pub fn for_config(config: &crate::supervisor::Config) -> Result<WorkerCommand, SpawnError> {
        let mut made = WorkerCommand::new_in(&config.command, config.cwd.as_deref())?;
        for (key, value) in &config.env {
            if INHERITED_VARIABLES_TO_DROP.contains(&key.as_str()) {
                continue;
            }
            made.base_env.retain(|entry| {
                entry
                    .as_bytes()
                    .strip_prefix(key.as_bytes())
                    .is_none_or(|rest| rest.first() != Some(&b'='))
            });
            made.base_env
                .extend(env_entry(OsStr::new(key), OsStr::new(value)));
        }
        Ok(made)
    }

    /// The value of `key` in the environment every worker starts from.
    pub fn base_variable(&self, key: &str) -> Option<String> {
        let prefix = format!("{key}=");
        self.base_env.iter().find_map(|entry| {
            let entry = entry.to_str().ok()?;
            entry.strip_prefix(&prefix).map(str::to_string)
        })
    }

    pub fn program(&self) -> String {
        self.path.to_string_lossy().into_owned()
    }

    /// The program's file as the primary sees it now (a relative one is in the workers'
    /// directory).
    pub fn located(&self) -> PathBuf {
        let path = Path::new(OsStr::from_bytes(self.path.as_bytes()));
        match &self.cwd {
            Some(dir) => dir.join(path),
            None => path.to_path_buf(),
        }
    }

    /// Forks and execs one worker. Returns once the worker runs the program (or failed to).
    pub fn spawn(&self, spec: &WorkerSpec<'_>) -> Result<Pid, SpawnError> {
        let mut envp_strings: Vec<CString> = self.base_env.clone();
        if let Some(user) = spec.credentials {
            // The account's own, not the primary's (HOME=/root must not reach nobody).
            let account = ["HOME=", "USER=", "LOGNAME="];
            envp_strings.retain(|entry| {
                !account
                    .iter()
                    .any(|p| entry.as_bytes().starts_with(p.as_bytes()))
            });
            for (key, value) in [
                ("HOME", &user.home),
                ("USER", &user.name),
                ("LOGNAME", &user.name),
            ] {
                envp_strings
                    .push(CString::new(format!("{key}={value}")).map_err(|_| SpawnError::NulByte)?);
            }
        }
        // The spec's variables replace the same ones of the base environment.
        envp_strings.retain(|entry| {
            !spec.env.iter().any(|(key, _)| {
                entry
                    .as_bytes()
                    .strip_prefix(key.as_bytes())
                    .is_some_and(|rest| rest.first() == Some(&b'='))
            })
        });
        let mut set = |entry: String| {
            CString::new(entry)
                .map(|entry| envp_strings.push(entry))
                .map_err(|_| SpawnError::NulByte)
        };
        for (key, value) in spec.env {
            set(format!("{key}={value}"))?;
        }
        set(format!("LISTEN_FDS={}", spec.sockets.len()))?;
        for (i, channel) in spec.channels.iter().enumerate() {
            let fd = LISTEN_FDS_START + (spec.sockets.len() + i) as RawFd;
            set(format!("{}={fd}", channel.variable))?;
        }
        set(format!("LISTEN_FDNAMES={}", spec.socket_names.join(":")))?;
        // Filled in by the child with its own pid; room for any pid_t.
        let mut listen_pid = *b"LISTEN_PID=\0\0\0\0\0\0\0\0\0\0\0\0";
        let mut envp: Vec<*const libc::c_char> = envp_strings.iter().map(|s| s.as_ptr()).collect();
        envp.push(listen_pid.as_ptr().cast());
        envp.push(ptr::null());
        let mut argv: Vec<*const libc::c_char> = self.argv.iter().map(|s| s.as_ptr()).collect();
        argv.push(ptr::null());

        let mut source_fds: Vec<RawFd> = spec.sockets.iter().map(|s| s.as_raw_fd()).collect();
        source_fds.extend(spec.channels.iter().map(|c| c.fd.as_raw_fd()));
        let dev_null = fs::File::open("/dev/null").map_err(os("opening /dev/null"))?;
        let (exec_error_reader, exec_error_writer) =
            nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
                .map_err(|e| os("creating a pipe")(e.into()))?;
        let parent = std::process::id() as libc::pid_t;

        // SAFETY: the primary may have other threads (the output writer, an embedder's), so the
        // child may only call async-signal-safe functions until it execs: it does, on memory
        // prepared above (no allocation, no lock), then execs or _exits.
        let pid = unsafe { libc::fork() };
        if pid < 0 {
            return Err(os("fork failed")(std::io::Error::last_os_error()));
        }
        if pid == 0 {
            // SAFETY: in the child of the fork above; every pointer points into memory the
            // parent prepared and that stays alive, unchanged, until exec (see ChildSetup).
            unsafe {
                child_after_fork(ChildSetup {
                    path: self.path.as_ptr(),
                    argv: argv.as_ptr(),
                    envp: envp.as_ptr(),
                    listen_pid: listen_pid.as_mut_ptr().add(b"LISTEN_PID=".len()),
                    source_fds: &source_fds,
                    stdin: dev_null.as_raw_fd(),
                    stdout: spec.stdout.map(|fd| fd.as_raw_fd()),
                    stderr: spec.stderr.map(|fd| fd.as_raw_fd()),
                    credentials: spec.credentials,
                    cwd: self.cwd_c.as_ref().map(|dir| dir.as_ptr()),
                    exec_error: exec_error_writer.as_raw_fd(),
                    parent,
                    filter: spec.filter.map(Filter::program),
                    nofile: original_nofile_limit(),
                })
            }
        }
        drop(exec_error_writer);
        let pid = Pid::from_raw(pid);

        // EOF means the exec succeeded (the pipe was close-on-exec); else 8 bytes (one write,
        // so one read) say which step failed and its errno.
        let mut report = [0u8; 8];
        let mut reader = fs::File::from(exec_error_reader);
        match reader.read(&mut report) {
            Ok(0) => Ok(pid),
            Ok(_) => {
                let _ = waitpid(pid, None);
                let [s0, s1, s2, s3, e0, e1, e2, e3] = report;
                let step = u32::from_ne_bytes([s0, s1, s2, s3]);
                let source =
                    std::io::Error::from_raw_os_error(i32::from_ne_bytes([e0, e1, e2, e3]));
                Err(match (step, &self.cwd) {
                    (STEP_CHDIR, Some(dir)) => SpawnError::Chdir {
                        program: self.program(),
                        dir: dir.clone(),
                        source,
                    },
                    _ => SpawnError::Exec {
                        program: self.program(),
                        source,
                    },
                })
            }
            Err(e) => Err(os("reading the worker's exec status")(e)),
        }
    }
}

struct ChildSetup<'a> {
    path: *const libc::c_char,
    argv: *const *const libc::c_char,
    envp: *const *const libc::c_char,
    listen_pid: *mut u8,
    source_fds: &'a [RawFd],
    stdin: RawFd,
    stdout: Option<RawFd>,
    stderr: Option<RawFd>,
    credentials: Option<&'a Credentials>,
    /// The directory to start in, entered as the worker's user.
    cwd: Option<*const libc::c_char>,
    exec_error: RawFd,
    parent: libc::pid_t,
    filter: Option<&'a libc::sock_fprog>,
    /// The descriptor limit the primary started with, which the worker gets back.
    nofile: Option<libc::rlimit>,
}

/// Runs in the forked child: async-signal-safe calls only, no allocation, never returns.
unsafe fn child_after_fork(setup: ChildSetup<'_>) -> ! {
    // SAFETY: we run in the forked child, which calls only async-signal-safe functions on memory
    // the parent prepared (this function's contract), and every path ends in execve or _exit.
    unsafe {
        let fail_at = |exec_error: RawFd, step: u32| -> ! {
            let errno = *libc::__errno_location();
            let mut report = [0u8; 8];
            report[..4].copy_from_slice(&step.to_ne_bytes());
            report[4..].copy_from_slice(&errno.to_ne_bytes());
            libc::write(exec_error, report.as_ptr().cast(), report.len());
            libc::_exit(127)
        };
        let fail = |exec_error: RawFd| -> ! { fail_at(exec_error, STEP_SETUP) };

        write_decimal(setup.listen_pid, libc::getpid() as u64);

        // Own session (and so process group): a terminal's Ctrl-C reaches only the primary, which
        // then stops the workers in order instead of every process receiving SIGINT at once; and
        // no process of another worker can join this one's session to send READY=1 for it.
        libc::setsid();
        // Undo what the primary changed: Rust ignores SIGPIPE, and no signal may stay blocked.
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        let mut empty: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut empty);
        libc::sigprocmask(libc::SIG_SETMASK, &empty, ptr::null_mut());
        // Out of the way of the fds the worker gets (3 .. 3+count), close-on-exec, so an exec
        // failure can still be reported and a success closes it.
        let count = setup.source_fds.len() as RawFd;
        let first_free = LISTEN_FDS_START + count;
        let exec_error = libc::fcntl(setup.exec_error, libc::F_DUPFD_CLOEXEC, first_free + 1);
        if exec_error < 0 {
            fail(setup.exec_error);
        }

        if libc::dup2(setup.stdin, 0) < 0 {
            fail(exec_error);
        }
        for (target, source) in [(1, setup.stdout), (2, setup.stderr)] {
            if let Some(source) = source {
                if libc::dup2(source, target) < 0 {
                    fail(exec_error);
                }
            }
        }
        // Supplementary groups, then the gid, then the uid: each step needs the privilege the next
        // one gives up. no_new_privs so a set-uid binary cannot take the privileges back.
        if let Some(user) = setup.credentials {
            if libc::setgroups(user.groups.len(), user.groups.as_ptr()) != 0
                || libc::setgid(user.gid) != 0
                || libc::setuid(user.uid) != 0
                || libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0
            {
                fail(exec_error);
            }
        }
        // If the primary dies without stopping us, stop too rather than serve unsupervised. After
        // the credentials changed: the kernel clears the death signal when they do. The primary
        // may have died before this line; then nobody would send it, so check.
        if libc::prctl(
            libc::PR_SET_PDEATHSIG,
            libc::SIGTERM as libc::c_ulong,
            0,
            0,
            0,
        ) != 0
        {
            fail(exec_error);
        }
        if libc::getppid() != setup.parent {
            libc::_exit(0);
        }
        if let Some(dir) = setup.cwd {
            if libc::chdir(dir) != 0 {
                fail_at(exec_error, STEP_CHDIR);
            }
        }
        // Move the sockets to 3, 4, ...: first above that range, so no target is still a source.
        let mut lifted = [0 as RawFd; 64];
        for (i, &fd) in setup.source_fds.iter().enumerate().take(lifted.len()) {
            lifted[i] = libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, first_free);
            if lifted[i] < 0 {
                fail(exec_error);
            }
        }
        for (i, &fd) in lifted.iter().enumerate().take(count as usize) {
            // dup2 leaves close-on-exec off on the new fd, so the program inherits it.
            if libc::dup2(fd, LISTEN_FDS_START + i as RawFd) < 0 {
                fail(exec_error);
            }
        }
        // The exec-error pipe at the first free fd, then nothing above it: a worker starts with
        // exactly its stdio, its sockets and its channel, whatever the primary had open without
        // close-on-exec (a descriptor inherited from whoever started cluster-lb, say).
        if libc::dup3(exec_error, first_free, libc::O_CLOEXEC) < 0 {
            fail(exec_error);
        }
        let exec_error = first_free;
        if close_from(first_free + 1) != 0 {
            fail(exec_error);
        }
        // The primary raised its own descriptor limit (it holds a few per worker); the worker gets
        // the limit the primary was started with, as if started by the same shell.
        if let Some(limit) = setup.nofile {
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
        // Last, as it restricts system calls: the worker may not change its group's program.
        if let Some(filter) = setup.filter {
            let install = || {
                libc::prctl(
                    libc::PR_SET_SECCOMP,
                    libc::SECCOMP_MODE_FILTER as libc::c_ulong,
                    filter as *const libc::sock_fprog as libc::c_ulong,
                    0,
                    0,
                )
            };
            // Without CAP_SYS_ADMIN the kernel takes a filter only under no_new_privs (a --user
            // worker has it already; a root one without the capability gets it now).
            if install() != 0
                && (*libc::__errno_location() != libc::EACCES
                    || libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0
                    || install() != 0)
            {
                fail(exec_error);
            }
        }

        libc::execve(setup.path, setup.argv, setup.envp);
        fail(exec_error)
    }
}

static ORIGINAL_NOFILE: std::sync::OnceLock<Option<libc::rlimit>> = std::sync::OnceLock::new();

fn original_nofile_limit() -> Option<libc::rlimit> {
    ORIGINAL_NOFILE.get().copied().flatten()
}

/// Raises this process's soft descriptor limit to its hard limit (the primary holds a few
/// descriptors per worker: a channel, two output pipes, a pidfd), remembering the original for
/// the workers. Returns the new soft limit.
pub fn raise_descriptor_limit() -> u64 {
    // SAFETY: plain getrlimit/setrlimit on a local struct.
    unsafe {
        let mut limit: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return 0;
        }
        let _ = ORIGINAL_NOFILE.set(Some(limit));
        let raised = libc::rlimit {
            rlim_cur: limit.rlim_max,
            rlim_max: limit.rlim_max,
        };
        if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
            raised.rlim_cur
        } else {
            limit.rlim_cur
        }
    }
}

/// Closes every descriptor from `first` up (close_range, Linux 5.9+; one by one before).
/// Async-signal-safe.
unsafe fn close_from(first: RawFd) -> libc::c_int {
    // SAFETY: plain system calls on integers and a local struct; async-signal-safe.
    unsafe {
        if libc::syscall(
            libc::SYS_close_range,
            first as libc::c_uint,
            libc::c_uint::MAX,
            0,
        ) == 0
        {
            return 0;
        }
        let mut limit: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return -1;
        }
        let last = limit.rlim_cur.min(1 << 20) as RawFd;
        for fd in first..last {
            libc::close(fd);
        }
        0
    }
}

/// Writes `value` in decimal at `out` followed by a NUL; `out` has room for 20 digits + NUL.
unsafe fn write_decimal(out: *mut u8, mut value: u64) {
    // SAFETY: the caller gives room for 21 bytes at `out` (this function's contract).
    unsafe {
        let mut digits = [0u8; 20];
        let mut len = 0;
        loop {
            digits[len] = b'0' + (value % 10) as u8;
            len += 1;
            value /= 10;
            if value == 0 {
                break;
            }
        }
        for i in 0..len {
            *out.add(i) = digits[len - 1 - i];
        }
        *out.add(len) = 0;
    }
}

fn env_entry(key: &OsStr, value: &OsStr) -> Option<CString> {
    let mut entry = OsString::from(key);
    entry.push("=");
    entry.push(value);
    CString::new(entry.as_bytes()).ok()
}

/// `program` as given if it has a '/', else the first executable of that name on PATH; a
/// relative one (or one found in a relative PATH entry) is checked in `cwd`, where the
/// workers start, and stays relative.
fn resolve(program: &str, cwd: Option<&Path>) -> Result<PathBuf, SpawnError> {
    if program.is_empty() {
        return Err(SpawnError::EmptyCommand);
    }
    let seen_from = |path: &Path| match cwd {
        Some(dir) => dir.join(path),
        None => path.to_path_buf(),
    };
    if program.contains('/') {
        let path = PathBuf::from(program);
        return match is_executable(&seen_from(&path)) {
            Ok(true) => Ok(path),
            Ok(false) => Err(SpawnError::NotExecutable(
                seen_from(&path).display().to_string(),
            )),
            Err(source) => Err(SpawnError::Inaccessible {
                program: seen_from(&path).display().to_string(),
                source,
            }),
        };
    }
    let search = env::var_os("PATH").unwrap_or_else(|| "/usr/local/bin:/usr/bin:/bin".into());
    env::split_paths(&search)
        .map(|dir| dir.join(program))
        .find(|candidate| is_executable(&seen_from(candidate)).unwrap_or(false))
        .ok_or_else(|| SpawnError::NotFound(program.into()))
}

fn is_executable(path: &Path) -> std::io::Result<bool> {
    let meta = fs::metadata(path)?;
    Ok(meta.is_file() && meta.permissions().mode() & 0o111 != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decimal_pids_are_written_with_a_terminator() {
        for (value, text) in [
            (0u64, "0"),
            (7, "7"),
            (4194304, "4194304"),
            (u64::MAX, "18446744073709551615"),
        ] {
            let mut buffer = [0xffu8; 21];
            // SAFETY: the buffer has the 21 bytes write_decimal may write.
            unsafe { write_decimal(buffer.as_mut_ptr(), value) };
            assert_eq!(&buffer[..text.len()], text.as_bytes());
            assert_eq!(buffer[text.len()], 0);
        }
    }

    fn resolve_here(program: &str) -> Result<PathBuf, SpawnError> {
        resolve(program, None)
    }

    #[test]
    fn commands_are_resolved_on_path_or_refused_clearly() {
        assert!(resolve_here("sh").is_ok());
        let missing = resolve_here("no-such-command-cluster-lb")
            .unwrap_err()
            .to_string();
        assert!(missing.contains("command not found"), "{missing}");
        let plain_file = tempfile_path("not-executable");
        fs::write(&plain_file, b"data").unwrap();
        fs::set_permissions(&plain_file, fs::Permissions::from_mode(0o644)).unwrap();
        let not_exec = resolve_here(plain_file.to_str().unwrap())
            .unwrap_err()
            .to_string();
        let _ = fs::remove_file(&plain_file);
        assert!(not_exec.contains("not an executable"), "{not_exec}");
        let absent = resolve_here("./does/not/exist").unwrap_err().to_string();
        assert!(absent.contains("No such file"), "{absent}");
    }

    #[test]
    fn a_worker_sees_its_own_pid_and_its_socket_at_fd_3() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let out = tempfile_path("spawn-env");
        let script = format!(
            "echo \"$LISTEN_PID $$ $LISTEN_FDS $LISTEN_FDNAMES $CLUSTER_LB_WORKER_ID\" > {out}; \
             readlink /proc/self/fd/3 >> {out}",
            out = out.display()
        );
        let command = WorkerCommand::new(&["sh".into(), "-c".into(), script]).unwrap();
        let sockets = [OwnedFd::from(listener)];
        let names = ["web".to_string()];
        let env = [("CLUSTER_LB_WORKER_ID".to_string(), "3".to_string())];
        let pid = command
            .spawn(&WorkerSpec {
                sockets: &sockets,
                socket_names: &names,
                env: &env,
                channels: &[],
                stdout: None,
                stderr: None,
                credentials: None,
                filter: None,
            })
            .unwrap();
        waitpid(pid, None).unwrap();
        let text = fs::read_to_string(&out).unwrap();
        let _ = fs::remove_file(&out);
        let mut lines = text.lines();
        let fields: Vec<&str> = lines.next().unwrap().split(' ').collect();
        assert_eq!(fields[0], fields[1], "LISTEN_PID is the worker's own pid");
        assert_eq!(fields[0], pid.to_string());
        assert_eq!(&fields[2..], &["1", "web", "3"]);
        assert!(
            lines.next().unwrap().starts_with("socket:"),
            "fd 3 is the socket"
        );
    }

    #[test]
    fn exec_failures_are_reported_not_hidden() {
        let dir = std::env::temp_dir().join(format!("clb-noexec-{}", std::process::id()));
        fs::write(&dir, b"\x7fELFgarbage").unwrap();
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).unwrap();
        let command = WorkerCommand::new(&[dir.display().to_string()]).unwrap();
        let error = spawn_plain(&command).unwrap_err().to_string();
        let _ = fs::remove_file(&dir);
        assert!(error.contains("cannot start"), "{error}");
        assert!(error.contains("Exec format error"), "{error}");
    }

    fn spawn_plain(command: &WorkerCommand) -> Result<Pid, SpawnError> {
        command.spawn(&WorkerSpec {
            sockets: &[],
            socket_names: &[],
            env: &[],
            channels: &[],
            stdout: None,
            stderr: None,
            credentials: None,
            filter: None,
        })
    }

    /// A fresh directory with `current` -> `r1`, and `r1`, `r2` each holding an executable
    /// `./server` that writes its release's name and its working directory to `out`.
    fn releases(tag: &str) -> (PathBuf, PathBuf) {
        let base = tempfile_path(tag);
        let _ = fs::remove_dir_all(&base);
        let out = base.join("out");
        for release in ["r1", "r2"] {
            let dir = base.join(release);
            fs::create_dir_all(&dir).unwrap();
            let server = dir.join("server");
            fs::write(
                &server,
                format!(
                    "#!/bin/sh\necho \"{release} $(pwd -P)\" > {}\n",
                    out.display()
                ),
            )
            .unwrap();
            fs::set_permissions(&server, fs::Permissions::from_mode(0o755)).unwrap();
        }
        std::os::unix::fs::symlink("r1", base.join("current")).unwrap();
        (base, out)
    }

    #[test]
    fn a_relative_program_is_found_in_the_workers_directory_at_every_spawn() {
        let (base, out) = releases("releases");
        let current = base.join("current");
        let command = ["./server".to_string()];
        // Not in the test's own directory: only in the workers'.
        assert!(WorkerCommand::new(&command).is_err());
        let worker = WorkerCommand::new_in(&command, Some(&current)).unwrap();
        assert_eq!(worker.program(), "./server");
        assert_eq!(worker.located(), current.join("server"));
        let mut seen = Vec::new();
        for next in ["r2", "r1"] {
            let pid = spawn_plain(&worker).unwrap();
            waitpid(pid, None).unwrap();
            seen.push(fs::read_to_string(&out).unwrap());
            // What `ln -sfn releases/NEW current` does: a new link renamed over the old.
            let link = base.join("current.new");
            std::os::unix::fs::symlink(next, &link).unwrap();
            fs::rename(&link, &current).unwrap();
        }
        let real = |release: &str| fs::canonicalize(base.join(release)).unwrap();
        assert_eq!(
            seen,
            [
                format!("r1 {}\n", real("r1").display()),
                format!("r2 {}\n", real("r2").display())
            ]
        );
        let _ = fs::remove_dir_all(&base);
    }

    #[test]
    fn a_workers_directory_that_vanished_fails_the_spawn_naming_it() {
        let (base, _) = releases("vanished");
        let current = base.join("current");
        let worker = WorkerCommand::new_in(&["./server".to_string()], Some(&current)).unwrap();
        fs::remove_dir_all(base.join("r1")).unwrap();
        let error = spawn_plain(&worker).unwrap_err().to_string();
        let _ = fs::remove_dir_all(&base);
        assert_eq!(
            error,
            format!(
                "cannot start ./server in {}: No such file or directory (os error 2)",
                current.display()
            )
        );
    }

    fn tempfile_path(tag: &str) -> PathBuf {
        std::env::temp_dir().join(format!("clb-{tag}-{}", std::process::id()))
    }
}
