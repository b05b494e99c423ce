#!/usr/bin/env python3
"""Sends one request line (argv[2]) to the control socket argv[1] and prints the reply line."""
import socket
import sys

sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
sock.settimeout(5)
sock.connect(sys.argv[1])
try:
    sock.sendall(sys.argv[2].encode() + b"\n")
except (BrokenPipeError, ConnectionResetError):
    pass  # a primary that refuses may answer and hang up before reading; the answer is there
reply = b""
while not reply.endswith(b"\n"):
    chunk = sock.recv(4096)
    if not chunk:
        break
    reply += chunk
sys.stdout.write(reply.decode())
