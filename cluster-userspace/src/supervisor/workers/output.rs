//! A worker's stdout and stderr: read from pipes and written out as whole, prefixed lines.

use std::os::fd::OwnedFd;

use nix::unistd::Pid;
use tokio::{io::AsyncReadExt, net::unix::pipe, sync::mpsc::UnboundedSender};

use crate::logging::{worker_line, Source, Stream};

/// A line longer than this is written out in pieces of this size, so one worker that never
/// prints a newline cannot make the primary buffer without bound.
const MAX_LINE: usize = 16 * 1024;

/// Reads `fd` (the read end of the worker's pipe) until the worker and its children close it.
pub fn capture(source: Source, pid: i32, stream: Stream, fd: OwnedFd) {
    let Ok(mut reader) = pipe::Receiver::from_owned_fd(fd) else {
        log::warn!("cannot read the output of pid {pid}");
        return;
    };
    tokio::spawn(async move {
        let mut pending: Vec<u8> = Vec::new();
        let mut chunk = vec![0u8; 8192];
        loop {
            let read = match reader.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            pending.extend_from_slice(&chunk[..read]);
            emit_complete_lines(source, pid, stream, &mut pending);
        }
        if !pending.is_empty() {
            // The last line had no newline; it is still a line.
            worker_line(source, pid, stream, &String::from_utf8_lossy(&pending));
        }
    });
}

fn emit_complete_lines(source: Source, pid: i32, stream: Stream, pending: &mut Vec<u8>) {
    let mut start = 0;
    while let Some(offset) = pending[start..].iter().position(|&b| b == b'\n') {
        let line = &pending[start..start + offset];
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        worker_line(source, pid, stream, &String::from_utf8_lossy(line));
        start += offset + 1;
    }
    while pending.len() - start >= MAX_LINE {
        worker_line(
            source,
            pid,
            stream,
            &String::from_utf8_lossy(&pending[start..start + MAX_LINE]),
        );
        start += MAX_LINE;
    }
    pending.drain(..start);
}

/// Output of a `silent` Node worker (`fd` 1 or 2): what it reads goes to `sink` as it comes,
/// for the program's primary's `worker.process.stdout` / `stderr`.
pub fn forward(pid: Pid, fd_number: u8, fd: OwnedFd, sink: UnboundedSender<Forwarded>) {
    let Ok(mut reader) = pipe::Receiver::from_owned_fd(fd) else {
        log::warn!("cannot read the output of pid {pid}");
        return;
    };
    tokio::spawn(async move {
        let mut chunk = vec![0u8; 64 * 1024];
        loop {
            let read = match reader.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            if sink.send((pid, fd_number, chunk[..read].to_vec())).is_err() {
                break;
            }
        }
    });
}

/// Output read from a `silent` worker: (its pid, 1 or 2, the bytes).
pub type Forwarded = (Pid, u8, Vec<u8>);
