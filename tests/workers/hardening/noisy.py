#!/usr/bin/env python3
"""Test worker: worker 0 says READY=1, then prints 1 MB at a time (a thousand 1 KB lines, 100
times a second at most) in a loop; every other worker runs the example server argv[1]. The
primary queues lines, not bytes, so many lines fill its queue soonest."""
import os
import socket
import sys
import time

if os.environ.get("CLUSTER_LB_WORKER_ID") != "0":
    os.execv(sys.executable, [sys.executable, sys.argv[1]])
address = os.environ["NOTIFY_SOCKET"]
if address.startswith("@"):
    address = "\0" + address[1:]
with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
    notify.sendto(b"READY=1", address)
burst = ("x" * 1023 + "\n") * 1024
while True:
    sys.stdout.write(burst)
    sys.stdout.flush()
    time.sleep(0.01)
