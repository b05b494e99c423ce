#!/usr/bin/env python3
"""Test worker: the first worker 0 (while the marker file argv[2] does not exist yet) says
READY=1, closes its listening socket (fd 3) 2 s later, prints `closed fd 3` and stays. Every
other worker, and worker 0's replacements, run the example server argv[1]."""
import os
import socket
import sys
import time

server, marker = sys.argv[1], sys.argv[2]
if os.environ.get("CLUSTER_LB_WORKER_ID") != "0" or os.path.exists(marker):
    os.execv(sys.executable, [sys.executable, server])
open(marker, "w").close()
address = os.environ["NOTIFY_SOCKET"]
if address.startswith("@"):
    address = "\0" + address[1:]
with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
    notify.sendto(b"READY=1", address)
time.sleep(2)
os.close(3)
sys.stdout.write("closed fd 3\n")
sys.stdout.flush()
time.sleep(3600)
