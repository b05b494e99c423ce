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
import time

LISTEN_FDS_START = 3
WORKER_ID = os.environ.get("CLUSTER_LB_WORKER_ID", "-")
# Set on SIGTERM: answers say `Connection: close` from then on.
STOPPING = threading.Event()
# How long a stopping worker goes on answering before it exits: long enough for every busy
# keep-alive client to get one answer with `Connection: close` and reconnect to a live worker.
DRAIN_SECONDS = 1.0


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = f"worker {WORKER_ID} pid {os.getpid()}\n".encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        if STOPPING.is_set():
            # This answer is the connection's last (send_header marks it to close), so the
            # client sends its next request on a new connection, to a worker that stays.
            self.send_header("Connection", "close")
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
    # Graceful stop: answer with `Connection: close` for a moment, then stop accepting and
    # exit. Exiting at once would close kept-alive connections under a request the client has
    # just sent (the handler threads are daemons), which it would see as an error.
    def drain_then_stop():
        STOPPING.set()
        time.sleep(DRAIN_SECONDS)
        server.shutdown()

    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=drain_then_stop).start())
    # One write for the whole line, so lines of workers sharing a terminal do not interleave.
    sys.stdout.write(f"python worker {WORKER_ID} pid {os.getpid()} serving\n")
    sys.stdout.flush()
    notify_ready()
    server.serve_forever()
    server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
