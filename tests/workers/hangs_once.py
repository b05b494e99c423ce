#!/usr/bin/env python3
"""Test worker: the Python example server, except that the first process to find the file named
by HANG_MARKER takes it (renames it) and then hangs in start-up, never saying READY=1: a
replacement that never gets ready. Every other process serves normally."""
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
SERVER = os.path.join(HERE, "..", "..", "examples", "python", "server.py")

marker = os.environ.get("HANG_MARKER")
if marker:
    try:
        os.rename(marker, marker + ".taken")
    except FileNotFoundError:
        pass
    else:
        time.sleep(3600)
os.execvp(sys.executable, [sys.executable, SERVER])
