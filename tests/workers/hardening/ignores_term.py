#!/usr/bin/env python3
"""Test worker: ignores SIGTERM, then says READY=1 and sleeps: only SIGKILL ends it."""
import os
import signal
import socket
import time

signal.signal(signal.SIGTERM, signal.SIG_IGN)
address = os.environ["NOTIFY_SOCKET"]
if address.startswith("@"):
    address = "\0" + address[1:]
with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
    notify.sendto(b"READY=1", address)
time.sleep(3600)
