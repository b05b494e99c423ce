//! Raw Linux plumbing in one place: receiving descriptors and credentials, descriptor flags.
//! The rest of the crate calls these instead of `libc` directly, so that the unsafe code and
//! its reasoning live here.

pub mod fds;
