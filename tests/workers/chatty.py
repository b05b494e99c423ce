#!/usr/bin/env python3
"""Test worker for `cluster-lb logs`: the Python example server, which says "python worker ID
pid PID serving" on stdout, and prints one line per request: "request N to worker ID" on
stdout, and on stderr a line with control characters ("\\x1b[31m" and a carriage return) that
must reach `logs` escaped. With FLOOD=1 worker 0 also writes without pause: long lines, and
binary output with no newline at all, as fast as the primary reads them."""
import os
import sys
import threading

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "..", "examples", "python"))
import server  # noqa: E402

COUNT = [0]
LOCK = threading.Lock()


def log_request(self, format, *args):
    with LOCK:
        COUNT[0] += 1
        n = COUNT[0]
    os.write(1, f"request {n} to worker {server.WORKER_ID}\n".encode())
    os.write(2, f"\x1b[31mred\r{n} fake line\n".encode())


server.Handler.log_message = log_request


def flood():
    line = b"flood " + b"x" * 2000 + b"\n"
    binary = bytes(range(256)) * 256  # 64 KiB, no newline
    while True:
        os.write(1, line * 32)
        os.write(2, binary)


if os.environ.get("FLOOD") == "1" and server.WORKER_ID == "0":
    threading.Thread(target=flood, daemon=True).start()

sys.exit(server.main())
