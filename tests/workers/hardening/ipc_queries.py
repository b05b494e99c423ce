#!/usr/bin/env python3
"""Test worker for a cluster without --listen: over the IPC channel (cluster_lb_ipc.py, next to
this file), worker 0 asks for 127.0.0.1:80 and worker 1 for 300 different ports (20000 ..
20299). Each prints what it got, keeps every socket it was given and stays."""
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cluster_lb_ipc import Channel, ProtocolError  # noqa: E402

channel = Channel.from_environment()
worker = os.environ.get("CLUSTER_LB_WORKER_ID")
held = []


def report(line):
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


if worker == "0":
    try:
        held.append(channel.query_server("127.0.0.1:80"))
        report("query 127.0.0.1:80: got a socket")
    except (ProtocolError, OSError) as error:
        report(f"query 127.0.0.1:80: refused: {error}")
elif worker == "1":
    ok = refused = 0
    first_refusal = None
    for port in range(20000, 20300):
        try:
            held.append(channel.query_server(f"127.0.0.1:{port}"))
            ok += 1
        except ProtocolError as error:
            refused += 1
            first_refusal = first_refusal or str(error)
        except OSError as error:  # the channel is gone: count the rest as refused
            refused += 20300 - port
            first_refusal = first_refusal or f"channel: {error}"
            break
    report(f"queries: ok {ok} refused {refused}; first refusal: {first_refusal}")
time.sleep(3600)
