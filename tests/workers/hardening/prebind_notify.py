#!/usr/bin/env python3
"""Takes the abstract socket names @cluster-lb/PID/notify for the next argv[1] pids after its
own (what a local user could do to a predictable NOTIFY_SOCKET name), prints
`bound COUNT FIRST LAST`, and holds them until its stdin closes."""
import os
import resource
import socket
import sys

count = int(sys.argv[1])
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, count + 64)), hard))
with open("/proc/sys/kernel/pid_max") as f:
    pid_max = int(f.read())
first = os.getpid() + 1
held = []
for pid in range(first, first + count):
    if pid >= pid_max:
        pid = pid - pid_max + 301
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        sock.bind(f"\0cluster-lb/{pid}/notify")
        held.append(sock)
    except OSError:
        sock.close()
sys.stdout.write(f"bound {len(held)} {first} {first + count - 1}\n")
sys.stdout.flush()
sys.stdin.read()
