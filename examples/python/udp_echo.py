#!/usr/bin/env python3
"""A UDP server that answers every datagram with "worker ID pid PID", from the socket
cluster-lb hands it (socket activation: fd 3), or bound to PORT (default 5353) on its own.

    sudo cluster-lb run -w 4 --listen udp://127.0.0.1:5353 -- python3 examples/python/udp_echo.py
"""
import os
import signal
import socket
import sys

WORKER_ID = os.environ.get("CLUSTER_LB_WORKER_ID", "-")


def activated_socket():
    if os.environ.get("LISTEN_PID") != str(os.getpid()) or int(os.environ.get("LISTEN_FDS", "0")) < 1:
        return None
    return socket.socket(fileno=3)


def notify_ready():
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        notify.sendto(b"READY=1", address)


def main():
    sock = activated_socket()
    if sock is None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind(("", int(os.environ.get("PORT", "5353"))))
    sock.setblocking(True)
    # Asked to stop (SIGTERM): stop. Datagrams still queued on this socket are lost with it;
    # new flows already go to other workers.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    answer = f"worker {WORKER_ID} pid {os.getpid()}\n".encode()
    sys.stdout.write(f"udp worker {WORKER_ID} pid {os.getpid()} serving\n")
    sys.stdout.flush()
    notify_ready()
    while True:
        _, client = sock.recvfrom(2048)
        sock.sendto(answer, client)


if __name__ == "__main__":
    sys.exit(main())
