"""A client of the cluster-lb IPC protocol (docs/PROTOCOL.md) in the Python standard library.

    from cluster_lb_ipc import Channel
    channel = Channel.from_environment()        # None when not started by cluster-lb
    sock = channel.query_server("127.0.0.1:8080")
    ...  # serve on sock
    channel.listening("127.0.0.1:8080")
    for message in channel.messages():          # {"type": "message", ...} or {"type": "disconnect"}
        ...
"""
import array
import json
import os
import socket

VERSION = 1
MAX_MESSAGE = 64 * 1024


class ProtocolError(Exception):
    pass


class Channel:
    def __init__(self, sock):
        self.sock = sock
        self.next_index = 0
        self._send({"type": "online"})

    @classmethod
    def from_environment(cls):
        fd = os.environ.get("CLUSTER_LB_IPC_FD")
        if fd is None:
            return None
        return cls(socket.socket(fileno=int(fd)))

    def _send(self, message, fds=()):
        data = json.dumps({"v": VERSION, **message}, separators=(",", ":")).encode()
        if len(data) > MAX_MESSAGE:
            raise ValueError(f"message of {len(data)} bytes exceeds {MAX_MESSAGE}")
        if fds:
            socket.send_fds(self.sock, [data], list(fds))
        else:
            self.sock.send(data)

    def _receive(self):
        """One message and the descriptors that came with it; None at EOF."""
        data, fds, _flags, _addr = socket.recv_fds(self.sock, MAX_MESSAGE + 1, 4)
        if not data and not fds:
            return None, []
        message = json.loads(data)
        if message.get("v") != VERSION:
            raise ProtocolError(f"unsupported protocol version {message.get('v')}")
        return message, fds

    def query_server(self, address, protocol="tcp"):
        """A listening socket for address, made by the primary."""
        index = self.next_index
        self.next_index += 1
        self._send({"type": "queryServer", "index": index, "address": address, "protocol": protocol})
        while True:
            message, fds = self._receive()
            if message is None:
                raise ProtocolError("the primary closed the channel")
            if message["type"] == "queryServerReply" and message["index"] == index:
                if not message["ok"]:
                    raise ProtocolError(message.get("error", "refused"))
                return socket.socket(fileno=fds[0])
            for fd in fds:
                os.close(fd)

    def listening(self, address):
        self._send({"type": "listening", "address": address})

    def send(self, data):
        self._send({"type": "message", "data": data})

    def disconnect(self):
        self._send({"type": "disconnect"})

    def messages(self):
        """Yields what the primary sends ("message" or "disconnect") until the channel closes."""
        while True:
            message, fds = self._receive()
            for fd in fds:
                os.close(fd)
            if message is None:
                return
            yield message
