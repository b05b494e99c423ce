//! Raw Linux plumbing in one place: what /proc says about processes and their descriptors,
//! sock_diag, pidfds, descriptor flags. The rest of the crate calls these instead of libc, so
//! most of the unsafe code, and the reasoning behind it, lives here.

pub mod diag;
pub mod fds;
pub mod pidfd;
pub mod procfs;
