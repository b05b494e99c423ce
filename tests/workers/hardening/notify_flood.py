#!/usr/bin/env python3
"""Sends READY=1 datagrams to the notify socket argv[1] (`@name` is abstract) for argv[2]
seconds, as fast as the socket takes them (blocking sends, each bounded by the deadline), then
prints how many it sent (or that it was refused, and after how many)."""
import socket
import sys
import time

address, seconds = sys.argv[1], float(sys.argv[2])
if address.startswith("@"):
    address = "\0" + address[1:]
sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
deadline = time.monotonic() + seconds
sent = 0
while (left := deadline - time.monotonic()) > 0:
    sock.settimeout(left)
    try:
        sock.sendto(b"READY=1", address)
        sent += 1
    except socket.timeout:
        break
    except OSError as error:
        # Another user than the workers': the socket's directory keeps it out.
        print(f"refused errno {error.errno} after {sent}")
        sys.exit(0)
print(f"sent {sent}")
