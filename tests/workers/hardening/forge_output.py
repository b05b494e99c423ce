#!/usr/bin/env python3
"""Test worker: prints a line that, written raw to a terminal, would erase itself and pose as
the primary's own log line; then says READY=1 and stays."""
import os
import socket
import sys
import time

sys.stdout.write("\x1b[2K\rFAKE cluster-lb[1]: worker 9 ready\n")
sys.stdout.flush()
address = os.environ["NOTIFY_SOCKET"]
if address.startswith("@"):
    address = "\0" + address[1:]
with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
    notify.sendto(b"READY=1", address)
time.sleep(3600)
