#!/usr/bin/env python3
"""Test worker: the Python example server that also sends WATCHDOG=1 every 0.2 s (systemd's
watchdog protocol, which cluster-lb's --watchdog asks for), except that the first process to
take the file named by SILENT_MARKER stops after 1 s while it goes on serving: a stuck thread
that its accept queue cannot show."""
import os
import runpy
import socket
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
SERVER = os.path.join(HERE, "..", "..", "examples", "python", "server.py")


def ping(stop_after):
    address = os.environ["NOTIFY_SOCKET"]
    if address.startswith("@"):
        address = "\0" + address[1:]
    started = time.monotonic()
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        while stop_after is None or time.monotonic() - started < stop_after:
            notify.sendto(b"WATCHDOG=1", address)
            time.sleep(0.2)


if not os.environ.get("WATCHDOG_USEC"):
    raise SystemExit("no WATCHDOG_USEC: run under cluster-lb --watchdog")
silent = False
marker = os.environ.get("SILENT_MARKER")
if marker:
    try:
        os.rename(marker, marker + ".taken")
        silent = True
    except FileNotFoundError:
        pass
threading.Thread(target=ping, args=(1.0 if silent else None,), daemon=True).start()
runpy.run_path(SERVER, run_name="__main__")
