//! The seccomp filter every worker starts under (unless `--no-seccomp`). It keeps a worker from
//! changing its reuseport group's program, which the kernel allows to any socket of the group:
//! without it, any worker, even an unprivileged `--user` one, could attach a program that sends
//! it every connection, or detach the group's (a plain hash). docs/ARCHITECTURE.md says what it
//! guarantees and what it does not.
//!
//! Refused, with EPERM:
//! - `setsockopt` on SOL_SOCKET with SO_ATTACH_REUSEPORT_CBPF, SO_ATTACH_REUSEPORT_EBPF or
//!   SO_DETACH_REUSEPORT_BPF. The filter reads the level and option name, which are plain
//!   arguments. It covers the three ways an x86_64 process can make the call: the native
//!   system call, the x32 ones, and, for 32-bit (i386) code, `setsockopt` and the
//!   `socketcall` multiplexer (whose arguments are in memory, where a filter cannot read: its
//!   SYS_SETSOCKOPT is refused whatever the option).
//! - `io_uring_setup`, `io_uring_enter` and `io_uring_register` (unless `--allow-io-uring`):
//!   since 6.7 an io_uring command (IORING_OP_URING_CMD with SOCKET_URING_OP_SETSOCKOPT) makes
//!   the same setsockopt inside the kernel, where no seccomp filter sees it. Without a ring
//!   there is no such command; programs that probe for io_uring (libuv, liburing) fall back
//!   to plain system calls on EPERM, as under Docker's default profile.
//!
//! Everything else is allowed.

/// seccomp_data offsets (linux/seccomp.h): nr, arch, then args[6] as u64 (low half first on
/// little-endian).
const NR: u32 = 0;
const ARCH: u32 = 4;
const fn arg_low(index: u32) -> u32 {
    16 + 8 * index
}

const AUDIT_ARCH_X86_64: u32 = 0xc000_003e;
const AUDIT_ARCH_I386: u32 = 0x4000_0003;
const X32_SYSCALL_BIT: u32 = 0x4000_0000;
const NR_SETSOCKOPT: u32 = 54;
const NR_X32_SETSOCKOPT: u32 = 541;
const NR_I386_SETSOCKOPT: u32 = 366;
const NR_I386_SOCKETCALL: u32 = 102;
const SOCKETCALL_SETSOCKOPT: u32 = 14;
/// io_uring_setup, io_uring_enter, io_uring_register: the same numbers on x86_64, x32 (with
/// the x32 bit) and i386, as for every system call added since 5.1.
const NR_IO_URING: [u32; 3] = [425, 426, 427];

const SOL_SOCKET: u32 = 1;
/// The options that change a reuseport group's program (asm-generic/socket.h).
pub const REFUSED_OPTIONS: [u32; 3] = [51, 52, 68];

const SECCOMP_RET_ALLOW: u32 = 0x7fff_0000;
const SECCOMP_RET_ERRNO: u32 = 0x0005_0000;

// Classic BPF opcodes.
const LD_W_ABS: u16 = 0x20;
const JEQ_K: u16 = 0x15;
const RET_K: u16 = 0x06;

/// A compiled filter, kept alive by the caller while children are forked.
pub struct Filter {
    code: Vec<libc::sock_filter>,
    program: libc::sock_fprog,
}

// SAFETY: `program` points into `code`, which the Filter owns and never changes after
// construction; the pointer is only read (by the kernel, in a forked child).
unsafe impl Send for Filter {}
// SAFETY: as for Send: nothing writes through the pointer, so shared references are fine.
unsafe impl Sync for Filter {}

impl std::fmt::Debug for Filter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Filter({} instructions)", self.code.len())
    }
}

impl Filter {
    /// The filter that keeps workers from changing their group's program; `io_uring` lets
    /// them set up rings (`--allow-io-uring`), which also lets them past this filter.
    pub fn reuseport_guard(io_uring: bool) -> Filter {
        let rings: &[u32] = if io_uring { &[] } else { &NR_IO_URING };
        let mut asm = Asm::default();
        asm.ld(ARCH);
        asm.jeq(AUDIT_ARCH_X86_64, Next, To("i386"));
        asm.ld(NR);
        for nr in [
            NR_SETSOCKOPT,
            X32_SYSCALL_BIT | NR_SETSOCKOPT,
            X32_SYSCALL_BIT | NR_X32_SETSOCKOPT,
        ] {
            asm.jeq(nr, To("setsockopt"), Next);
        }
        for nr in rings {
            asm.jeq(*nr, To("deny"), Next);
            asm.jeq(X32_SYSCALL_BIT | nr, To("deny"), Next);
        }
        asm.ret(SECCOMP_RET_ALLOW);

        asm.label("i386");
        asm.jeq(AUDIT_ARCH_I386, Next, To("allow"));
        asm.ld(NR);
        for nr in rings {
            asm.jeq(*nr, To("deny"), Next);
        }
        asm.jeq(NR_I386_SETSOCKOPT, To("setsockopt"), Next);
        asm.jeq(NR_I386_SOCKETCALL, To("socketcall"), To("allow"));

        asm.label("setsockopt");
        asm.ld(arg_low(1));
        asm.jeq(SOL_SOCKET, Next, To("allow"));
        asm.ld(arg_low(2));
        for option in REFUSED_OPTIONS {
            asm.jeq(option, To("deny"), Next);
        }
        asm.ret(SECCOMP_RET_ALLOW);

        asm.label("socketcall");
        asm.ld(arg_low(0));
        asm.jeq(SOCKETCALL_SETSOCKOPT, To("deny"), To("allow"));

        asm.label("deny");
        asm.ret(SECCOMP_RET_ERRNO | libc::EPERM as u32);
        asm.label("allow");
        asm.ret(SECCOMP_RET_ALLOW);
        Filter::new(asm.finish())
    }

    fn new(code: Vec<libc::sock_filter>) -> Filter {
        let mut filter = Filter {
            code,
            program: libc::sock_fprog {
                len: 0,
                filter: std::ptr::null_mut(),
            },
        };
        filter.program = libc::sock_fprog {
            len: filter.code.len() as u16,
            filter: filter.code.as_mut_ptr(),
        };
        filter
    }

    /// The program for PR_SET_SECCOMP; valid as long as the Filter lives.
    pub fn program(&self) -> &libc::sock_fprog {
        &self.program
    }
}

/// Where a conditional jump goes.
#[derive(Clone, Copy)]
enum Target {
    Next,
    To(&'static str),
}
use Target::{Next, To};

/// Classic BPF with forward jumps to named labels, resolved at the end.
#[derive(Default)]
struct Asm {
    code: Vec<libc::sock_filter>,
    labels: Vec<(&'static str, usize)>,
    /// (instruction, true branch, false branch) still to resolve.
    jumps: Vec<(usize, Target, Target)>,
}

impl Asm {
    fn push(&mut self, code: u16, k: u32) {
        self.code.push(libc::sock_filter {
            code,
            jt: 0,
            jf: 0,
            k,
        });
    }
    fn ld(&mut self, offset: u32) {
        self.push(LD_W_ABS, offset);
    }
    fn ret(&mut self, value: u32) {
        self.push(RET_K, value);
    }
    fn jeq(&mut self, value: u32, yes: Target, no: Target) {
        self.jumps.push((self.code.len(), yes, no));
        self.push(JEQ_K, value);
    }
    fn label(&mut self, name: &'static str) {
        self.labels.push((name, self.code.len()));
    }

    fn finish(mut self) -> Vec<libc::sock_filter> {
        for (at, yes, no) in std::mem::take(&mut self.jumps) {
            let offset = |target: Target| -> u8 {
                let to = match target {
                    Next => return 0,
                    To(name) => self
                        .labels
                        .iter()
                        .find(|(label, _)| *label == name)
                        .map(|(_, position)| *position)
                        .unwrap_or_else(|| panic!("no label {name}")),
                };
                u8::try_from(to - (at + 1)).expect("a forward jump within 255 instructions")
            };
            self.code[at].jt = offset(yes);
            self.code[at].jf = offset(no);
        }
        self.code
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setsockopt(fd: i32, option: i32, value: &[u8]) -> i32 {
        // SAFETY: plain system call with a valid buffer.
        let result = unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                option,
                value.as_ptr().cast(),
                value.len() as libc::socklen_t,
            )
        };
        if result == 0 {
            0
        } else {
            std::io::Error::last_os_error().raw_os_error().unwrap_or(-1)
        }
    }

    /// Installs the filter on a thread of its own (seccomp and no_new_privs are per thread),
    /// then tries what a hostile worker would.
    /// io_uring_setup(1, params) on this thread: 0 (the ring's fd closed) or the errno.
    fn io_uring_setup() -> i32 {
        let mut params = [0u8; 120]; // struct io_uring_params, zeroed
                                     // SAFETY: plain system call with a buffer of the size the kernel reads and writes.
        let fd = unsafe { libc::syscall(425, 1u32, params.as_mut_ptr()) };
        if fd >= 0 {
            // SAFETY: the kernel just gave us this descriptor.
            unsafe { libc::close(fd as i32) };
            0
        } else {
            std::io::Error::last_os_error().raw_os_error().unwrap_or(-1)
        }
    }

    /// Runs `body` on a thread of its own under `filter` (seccomp is per thread).
    fn under<T: Send>(filter: &Filter, body: impl FnOnce() -> T + Send) -> T {
        std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    // SAFETY: plain prctl calls on this thread; the program outlives them.
                    unsafe {
                        assert_eq!(libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), 0);
                        let installed = libc::prctl(
                            libc::PR_SET_SECCOMP,
                            libc::SECCOMP_MODE_FILTER as libc::c_ulong,
                            filter.program() as *const libc::sock_fprog as libc::c_ulong,
                            0,
                            0,
                        );
                        assert_eq!(installed, 0, "{}", std::io::Error::last_os_error());
                    }
                    body()
                })
                .join()
                .unwrap()
        })
    }

    #[test]
    fn io_uring_is_refused_unless_allowed() {
        let unfiltered = io_uring_setup();
        assert_eq!(
            under(&Filter::reuseport_guard(false), io_uring_setup),
            libc::EPERM
        );
        // Allowed, it does what it does without a filter (works, or the kernel lacks it).
        assert_eq!(
            under(&Filter::reuseport_guard(true), io_uring_setup),
            unfiltered
        );
    }

    #[test]
    fn the_kernel_takes_the_filter_and_it_refuses_only_reuseport_program_changes() {
        let outcome = under(&Filter::reuseport_guard(false), || {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            use std::os::fd::AsRawFd;
            let fd = listener.as_raw_fd();
            // A classic BPF program of one instruction: `ret #0`.
            let ret0 = libc::sock_filter {
                code: RET_K,
                jt: 0,
                jf: 0,
                k: 0,
            };
            let program = libc::sock_fprog {
                len: 1,
                filter: &ret0 as *const _ as *mut _,
            };
            // SAFETY: reading the bytes of a plain struct.
            let bytes = unsafe {
                std::slice::from_raw_parts(
                    (&program as *const libc::sock_fprog).cast::<u8>(),
                    std::mem::size_of::<libc::sock_fprog>(),
                )
            };
            let one = 1i32.to_ne_bytes();
            (
                setsockopt(fd, 51, bytes),
                setsockopt(fd, 68, &one),
                setsockopt(fd, libc::SO_REUSEADDR, &one),
                setsockopt(fd, libc::SO_KEEPALIVE, &one),
            )
        });
        assert_eq!(outcome, (libc::EPERM, libc::EPERM, 0, 0));
    }
}
