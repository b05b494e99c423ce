#!/usr/bin/env python3
"""Test worker: worker 0 misbehaves on the IPC channel in the way argv[1] names; every other
worker runs the normal Python example server."""
import os
import socket
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
SERVER = os.path.join(HERE, "..", "..", "examples", "python", "server.py")

if os.environ.get("CLUSTER_LB_WORKER_ID") != "0":
    os.execvp(sys.executable, [sys.executable, SERVER])

channel = socket.socket(fileno=int(os.environ["CLUSTER_LB_IPC_FD"]))
mode = sys.argv[1]
if mode == "garbage":
    channel.send(b"\x00\xffnot json at all")
elif mode == "oversized":
    channel.send(b'{"v":1,"type":"online"}')
    channel.send(b'{"v":1,"type":"message","data":"' + b"x" * 100_000 + b'"}')
elif mode == "out-of-order":
    channel.send(b'{"v":1,"type":"listening","address":"127.0.0.1:8080"}')
elif mode == "wrong-version":
    channel.send(b'{"v":9,"type":"online"}')
# Stay alive until told to stop, like a worker that hangs on.
time.sleep(60)
