#!/usr/bin/env python3
"""Test worker: worker 0 tries to replace its reuseport group's program with a classic BPF
program that sends every connection to the group's first socket (setsockopt
SO_ATTACH_REUSEPORT_CBPF on fd 3, `ret #0`) and prints the outcome as `attach-cbpf: ok` or
`attach-cbpf: errno N (NAME)`. Then every worker runs the example server named by argv[1]."""
import ctypes
import errno
import os
import socket
import struct
import sys

SO_ATTACH_REUSEPORT_CBPF = 51
BPF_RET_K = 0x06  # BPF_RET | BPF_K


def attach():
    # struct sock_filter { u16 code; u8 jt; u8 jf; u32 k; }: one instruction, `ret #0`.
    program = ctypes.create_string_buffer(struct.pack("HBBI", BPF_RET_K, 0, 0, 0), 8)
    # struct sock_fprog { unsigned short len; struct sock_filter *filter; } (x86_64 layout).
    fprog = struct.pack("HxxxxxxQ", 1, ctypes.addressof(program))
    sock = socket.socket(fileno=3)
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_REUSEPORT_CBPF, fprog)
        return "ok"
    except OSError as error:
        return f"errno {error.errno} ({errno.errorcode.get(error.errno, '?')})"
    finally:
        sock.detach()  # fd 3 stays open for the server


if os.environ.get("CLUSTER_LB_WORKER_ID") == "0":
    sys.stdout.write(f"attach-cbpf: {attach()}\n")
    sys.stdout.flush()
os.execv(sys.executable, [sys.executable, sys.argv[1]])
