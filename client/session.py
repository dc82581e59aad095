"""The client side of a local session (daemon/sessions.py has the protocol).

Contract: `LocalSession.open(grpc_socket_path)` connects to `<path>.session`, proves nothing itself
(the kernel tells the daemon our uid), and receives a session id plus the caller's arena part as a
file descriptor. The session lives while this object keeps its socket open (a daemon that restarts
forgets it: its calls then answer UNAUTHENTICATED). Failures raise SessionError, a grpc.RpcError with code
UNAVAILABLE (daemon not there) or PERMISSION_DENIED (this uid is not configured), so callers that
handle a daemon being down handle this too. Not thread-safe: a Client serialises use itself.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import struct

import grpc

HELLO = b"KVTIER-SESSION 1\n"
METADATA_KEY = "x-kvtier-session"
MAX_REPLY_BYTES = 64 << 10
TIMEOUT_S = 5.0


class SessionError(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(details)
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


@dataclasses.dataclass
class ArenaPart:
    fd: int            # owned by the session: closed with it
    first_slot: int
    slot_count: int
    slot_bytes: int
    generation: str


class LocalSession:
    def __init__(self, sock: socket.socket, reply: dict, fd: int | None):
        self._sock = sock
        self.id: str = reply["session"]
        self.principal: str = reply.get("principal", "")
        self.tenant: str | None = reply.get("tenant")
        self.namespace_prefix: str = reply.get("namespace_prefix", "")
        arena = reply.get("arena")
        self.arena = ArenaPart(fd, **arena) if arena and fd is not None else None

    @classmethod
    def open(cls, grpc_socket: str) -> "LocalSession":
        path = grpc_socket + ".session"
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.settimeout(TIMEOUT_S)
        try:
            sock.connect(path)
            sock.sendall(HELLO)
            reply, fd = _receive(sock)
        except OSError as exc:
            sock.close()
            raise SessionError(grpc.StatusCode.UNAVAILABLE, f"no kvtierd session at {path}: {exc}") from exc
        if "error" in reply:
            sock.close()
            if fd is not None:
                os.close(fd)
            raise SessionError(grpc.StatusCode.PERMISSION_DENIED, f"kvtierd refused a session: {reply['error']}")
        return cls(sock, reply, fd)

    def metadata(self) -> tuple:
        return ((METADATA_KEY, self.id),)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        if self.arena is not None and self.arena.fd >= 0:
            os.close(self.arena.fd)
            self.arena.fd = -1


def _receive(sock: socket.socket) -> tuple[dict, int | None]:
    """The daemon's one reply (length-prefixed JSON) and the descriptor sent with it, if any."""
    data, fds, _, _ = socket.recv_fds(sock, MAX_REPLY_BYTES + 4, 1)
    while len(data) >= 4 and len(data) < 4 + struct.unpack(">I", data[:4])[0]:
        more = sock.recv(MAX_REPLY_BYTES + 4 - len(data))
        if not more:
            break
        data += more
    if len(data) < 4 or len(data) != 4 + struct.unpack(">I", data[:4])[0]:
        for fd in fds:
            os.close(fd)
        raise OSError("the daemon's session reply was cut short")
    return json.loads(data[4:]), (fds[0] if fds else None)
