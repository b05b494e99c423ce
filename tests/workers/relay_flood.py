#!/usr/bin/env python3
"""Test worker for the bounds on relays: every worker gets its socket and says `listening`;
worker 0 then sends argv[1] messages of 60 KB to the others as fast as its channel takes them
and tells the primary {"flooded": COUNT}; the others never read their channel, so every relay
finds them full. The primary must hold worker 0 back, or drop, never queue."""
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "..", "examples", "python"))
from cluster_lb_ipc import Channel  # noqa: E402

ADDRESS = "127.0.0.1:8080"

channel = Channel.from_environment()
listener = channel.query_server(ADDRESS)
channel.listening(ADDRESS)
if os.environ.get("CLUSTER_LB_WORKER_ID") == "0":
    count = int(sys.argv[1])
    pad = "x" * 60_000
    for n in range(count):
        channel.send({"n": n, "pad": pad}, to="others")
    channel.send({"flooded": count})
# Hold the socket and read nothing, until killed.
time.sleep(3600)
