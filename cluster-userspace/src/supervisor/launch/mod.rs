//! Starting a worker process: fork and exec with its sockets as fds 3.. (socket activation),
//! under the `--user` it is to run as (`privileges`) and the seccomp filter (`seccomp`).

pub mod privileges;
pub mod seccomp;
pub mod spawn;
