"""A client of the cluster-lb IPC protocol (docs/PROTOCOL.md) in the Python standard library.

    from cluster_lb_ipc import Channel
    channel = Channel.from_environment()        # None when not started by cluster-lb
    sock = channel.query_server("127.0.0.1:8080")
    ...  # serve on sock
    channel.listening("127.0.0.1:8080")
    channel.send({"hello": 1}, to="others")     # to other workers, through the primary
    for message in channel.messages():          # {"type": "message", ...} or {"type": "disconnect"}
        ...                                     # a worker's message has "from": its worker id
"""
import array
import json
import os
import socket

VERSION = 1
MAX_MESSAGE = 64 * 1024
# Who a message is for besides the primary: a worker id, or one of these.
GROUPS = ("all", "others")


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

    def send(self, data, to=None):
        """A user message: for the primary, or with `to` (a worker id, "all" or "others") for
        those workers, which get it with "from": this worker's id."""
        message = {"type": "message", "data": data}
        if to is not None:
            valid_id = isinstance(to, int) and not isinstance(to, bool) and 0 <= to < 2**32
            if not valid_id and to not in GROUPS:
                raise ValueError(f'to must be a worker id, "all" or "others", not {to!r}')
            message["to"] = to
        self._send(message)

    def disconnect(self):
        self._send({"type": "disconnect"})

    def messages(self):
        """Yields what comes ("message", with "from" if a worker sent it, or "disconnect")."""
        while True:
            message, fds = self._receive()
            for fd in fds:
                os.close(fd)
            if message is None:
                return
            yield message
