#!/usr/bin/env python3
"""A Python worker that gets its socket over the cluster-lb IPC protocol (queryServer), is ready
once it says `listening`, answers user messages and stops on `disconnect`.

    sudo cluster-lb run -w 4 -- python3 examples/python/ipc_server.py 127.0.0.1:8080

Messages, as the Rust handshake-server answers them: the primary's with {"echo": ...}, or, for
{"forward": MESSAGE, "to": ID | "all" | "others"}, by sending MESSAGE to those workers; another
worker's by telling the primary {"heard": MESSAGE, "from": ITS ID, "worker": OUR ID}.
"""
import http.server
import os
import sys
import threading

from cluster_lb_ipc import Channel
from server import Handler


def main():
    address = sys.argv[1] if len(sys.argv) > 1 else "127.0.0.1:8080"
    channel = Channel.from_environment()
    if channel is None:
        sys.exit("ipc_server.py: not started by cluster-lb (no CLUSTER_LB_IPC_FD)")
    sock = channel.query_server(address)
    server = http.server.ThreadingHTTPServer(sock.getsockname()[:2], Handler, bind_and_activate=False)
    server.socket.close()
    server.socket = sock
    serving = threading.Thread(target=server.serve_forever)
    serving.start()
    sys.stdout.write(f"python ipc worker {os.environ.get('CLUSTER_LB_WORKER_ID')} pid {os.getpid()} serving\n")
    sys.stdout.flush()
    channel.listening(address)
    me = int(os.environ["CLUSTER_LB_WORKER_ID"])
    for message in channel.messages():
        if message["type"] == "disconnect":
            break
        if message["type"] != "message":
            continue
        data = message["data"]
        if "from" in message:
            channel.send({"heard": data, "from": message["from"], "worker": me})
        elif isinstance(data, dict) and "forward" in data and "to" in data:
            try:
                channel.send(data["forward"], to=data["to"])
            except ValueError as error:
                channel.send({"error": str(error), "worker": me})
        else:
            channel.send({"echo": data, "worker": me})
    server.shutdown()
    serving.join()
    server.server_close()


if __name__ == "__main__":
    main()
