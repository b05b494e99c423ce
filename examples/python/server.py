#!/usr/bin/env python3
"""A Python stdlib HTTP server that serves from the socket cluster-lb hands it (fd 3), or
listens on PORT (default 8080) when started on its own.

    sudo cluster-lb run -w 4 --listen 127.0.0.1:8080 -- python3 examples/python/server.py
"""
import http.server
import os
import signal
import socket
import sys
import threading

LISTEN_FDS_START = 3
WORKER_ID = os.environ.get("CLUSTER_LB_WORKER_ID", "-")


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = f"worker {WORKER_ID} pid {os.getpid()}\n".encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format, *args):
        pass  # one line per request would drown the cluster's own log


def activated_socket():
    """The listening socket passed by socket activation, or None when run on its own."""
    if os.environ.get("LISTEN_PID") != str(os.getpid()):
        return None
    if int(os.environ.get("LISTEN_FDS", "0")) < 1:
        return None
    return socket.socket(fileno=LISTEN_FDS_START)


def notify_ready():
    """Tell cluster-lb (or systemd) we accept connections: READY=1 on NOTIFY_SOCKET."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]  # abstract socket namespace
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        notify.sendto(b"READY=1", address)


def main():
    sock = activated_socket()
    if sock is None:
        server = http.server.ThreadingHTTPServer(("", int(os.environ.get("PORT", "8080"))), Handler)
    else:
        server = http.server.ThreadingHTTPServer(sock.getsockname()[:2], Handler, bind_and_activate=False)
        server.socket.close()
        server.socket = sock
    # Graceful stop: stop accepting, let the request in progress finish, exit.
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown).start())
    # One write for the whole line, so lines of workers sharing a terminal do not interleave.
    sys.stdout.write(f"python worker {WORKER_ID} pid {os.getpid()} serving\n")
    sys.stdout.flush()
    notify_ready()
    server.serve_forever()
    server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
