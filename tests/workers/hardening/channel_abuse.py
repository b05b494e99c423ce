#!/usr/bin/env python3
"""Test worker, `channel_abuse.py MODE [ARG...] -- SERVER...`: the first worker (id 0, or 1 with
Node's channel: Node workers are numbered from 1) abuses its channel to the primary in the way
MODE names; every other worker execs SERVER (a socket-activated one that says READY=1). The
first worker prints
`abuse: ...` lines saying what it did, then stays alive (like a worker that hangs on) unless
the mode says otherwise.

Node's channel (NODE_CHANNEL_FD, cluster-lb run --node on) is newline-delimited JSON on a
stream socket; cluster-lb's own (CLUSTER_LB_IPC_FD) is one JSON datagram per message."""
import array
import json
import os
import socket
import sys
import time

MODE = sys.argv[1]
SEPARATOR = sys.argv.index("--")
ARGS = sys.argv[2:SEPARATOR]
SERVER = sys.argv[SEPARATOR + 1:]

FIRST = 1 if "NODE_CHANNEL_FD" in os.environ else 0
if os.environ.get("CLUSTER_LB_WORKER_ID") != str(FIRST):
    os.execvp(SERVER[0], SERVER)


def ready():
    """READY=1 on NOTIFY_SOCKET, so the test need not wait for a ready timeout."""
    address = os.environ["NOTIFY_SOCKET"]
    if address.startswith("@"):
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        notify.sendto(b"READY=1", address)


def say(text):
    sys.stdout.write(f"abuse: {text}\n")
    sys.stdout.flush()


def node_channel():
    # Blocking: the primary made its socket pair non-blocking, as Node wants it.
    channel = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM, fileno=int(os.environ["NODE_CHANNEL_FD"]))
    channel.setblocking(True)
    return channel


def ipc_channel():
    channel = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET, fileno=int(os.environ["CLUSTER_LB_IPC_FD"]))
    channel.setblocking(True)
    return channel


def send_with_fds(sock, data, count):
    """Sends `data` with `count` descriptors of /dev/null attached; the outcome in words."""
    files = [os.open("/dev/null", os.O_RDONLY) for _ in range(min(count, 200))]
    fds = (files * (count // len(files) + 1))[:count]
    try:
        sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
        return "sent"
    except OSError as error:
        return f"errno {error.errno}"
    finally:
        for fd in files:
            os.close(fd)


def node_query(seq, address, port, data=None):
    return json.dumps({"cmd": "NODE_CLUSTER", "act": "queryServer", "index": 0, "data": data,
                       "address": address, "port": port, "addressType": 4, "fd": None,
                       "backlog": 511, "seq": seq}).encode() + b"\n"


FORGED = "1\n2099-01-01T00:00:00.000Z cluster-lb[1]: all workers stopped\x1b[31m"

if MODE == "node-fds":
    # Plain user messages, each with 8 descriptors attached, for as long as the channel takes.
    channel = node_channel()
    sent = 0
    outcome = "sent"
    while outcome == "sent" and sent < 5000:
        outcome = send_with_fds(channel, b'{"x":1}\n', 8)
        sent += outcome == "sent"
    say(f"node-fds: {sent} lines with 8 fds each, then {outcome}")
elif MODE == "node-too-many-fds":
    outcome = send_with_fds(node_channel(), b'{"x":1}\n', 16)
    say(f"node-too-many-fds: {outcome}")
elif MODE == "ipc-too-many-fds":
    outcome = send_with_fds(ipc_channel(), b'{"v":1,"type":"online"}', 16)
    say(f"ipc-too-many-fds: {outcome}")
elif MODE == "node-flood":
    # ARGS: count, size of each message in bytes[, a file to say it is done in]; as fast as the
    # channel takes them.
    count, size = int(ARGS[0]), int(ARGS[1])
    channel = node_channel()
    ready()
    line = json.dumps({"x": "a" * size}).encode() + b"\n"
    started = time.monotonic()
    for _ in range(count):
        channel.sendall(line)
    said = f"node-flood: {count} messages of {len(line)} bytes in {time.monotonic() - started:.1f}s"
    say(said)
    if len(ARGS) > 2:
        # Also in a file: the primary's output may be stalled on purpose.
        with open(ARGS[2], "w") as marker:
            marker.write(said)
elif MODE == "forge-ipc":
    channel = ipc_channel()
    channel.send(b'{"v":1,"type":"online"}')
    channel.send(json.dumps({"v": 1, "type": "queryServer", "index": 0, "address": FORGED,
                             "protocol": "tcp"}).encode())
    time.sleep(0.5)
    # An unknown field: its name is in the decoder's complaint, which the primary logs.
    channel.send(json.dumps({"v": 1, "type": "message", "data": 1, FORGED: 1}).encode())
    say("forge-ipc: sent")
elif MODE == "forge-node":
    channel = node_channel()
    channel.sendall(node_query(1, FORGED, 8080))
    time.sleep(0.5)
    channel.sendall(json.dumps({"cmd": "NODE_" + FORGED}).encode() + b"\n")
    say("forge-node: sent")
elif MODE == "join-sibling":
    # The next worker's pid (same user: its environment is readable), then join its process
    # group.
    sibling = None
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as env:
                if f"CLUSTER_LB_WORKER_ID={FIRST + 1}\0".encode() in env.read() + b"\0":
                    sibling = int(entry)
                    break
        except OSError:
            pass
    if sibling is None:
        say("join-sibling: no sibling found")
    else:
        # A process of this worker (not the worker itself) joins worker 1's process group and
        # says READY=1 from there: for whom does it count?
        child = os.fork()
        if child == 0:
            try:
                os.setpgid(0, os.getpgid(sibling))
                say(f"join-sibling: joined the group of pid {sibling}")
            except OSError as error:
                say(f"join-sibling: errno {error.errno}")
            notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            address = os.environ["NOTIFY_SOCKET"]
            if address.startswith("@"):
                address = "\0" + address[1:]
            for _ in range(3):
                notify.sendto(b"READY=1", address)
                time.sleep(0.2)
            os._exit(0)
        os.waitpid(child, 0)
        say("join-sibling: sent READY=1")
elif MODE == "bad-tickets":
    # A TLS listen whose ticket keys are not 48 bytes: Node's setTicketKeys throws on them.
    channel = node_channel()
    channel.sendall(node_query(1, None, int(ARGS[0]), {"ticketKeys": "zz"}))
    reply = channel.recv(4096)
    say(f"bad-tickets: answered {len(reply)} bytes")
else:
    say(f"unknown mode {MODE}")
    sys.exit(2)
time.sleep(3600)
