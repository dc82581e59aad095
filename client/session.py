"""The client side of a local session (daemon/sessions.py has the protocol).

Contract: `LocalSession.open(grpc_socket_path)` connects to `<path>.session`, proves nothing itself
(the kernel tells the daemon our uid), and receives a session id plus two file descriptors: the
caller's arena part, and an O_PATH descriptor of its principal's own gRPC socket, the only socket
where the daemon honours this session (`target`: connect through the descriptor; nobody reaches
that socket by path). Both are received close-on-exec (MSG_CMSG_CLOEXEC): a program the engine
starts does not inherit them. The session lives while this object keeps its socket open (a daemon
that restarts forgets it: `alive()` turns false, and calls answer UNAVAILABLE or UNAUTHENTICATED). Failures raise SessionError, a grpc.RpcError with code
UNAVAILABLE (daemon not there) or PERMISSION_DENIED (this uid is not configured), so callers that
handle a daemon being down handle this too. Not thread-safe: a Client serialises use itself.
"""

from __future__ import annotations

import array
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
    def __init__(self, sock: socket.socket, reply: dict, fds: dict[str, int]):
        self._sock = sock
        self.id: str = reply["session"]
        self.principal: str = reply.get("principal", "")
        self.tenant: str | None = reply.get("tenant")
        self.namespace_prefix: str = reply.get("namespace_prefix", "")
        arena = reply.get("arena")
        self.arena = ArenaPart(fds.pop("arena"), **arena) if arena and "arena" in fds else None
        self.grpc_socket_fd: int = fds.pop("grpc_socket", -1)  # O_PATH; owned by the session
        for fd in fds.values():  # anything this client does not know of
            os.close(fd)

    @property
    def target(self) -> str:
        """The gRPC target of this session's own socket, through its descriptor."""
        if self.grpc_socket_fd < 0:
            raise SessionError(grpc.StatusCode.FAILED_PRECONDITION, "the daemon sent no socket for this session")
        return f"unix:/proc/self/fd/{self.grpc_socket_fd}"

    def alive(self) -> bool:
        """False once the daemon has closed the session's connection (it stopped or restarted)."""
        if self._sock is None:
            return False
        try:
            return self._sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) != b""
        except BlockingIOError:
            return True
        except OSError:
            return False

    @classmethod
    def open(cls, grpc_socket: str) -> "LocalSession":
        path = grpc_socket + ".session"
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.settimeout(TIMEOUT_S)
        try:
            sock.connect(path)
            sock.sendall(HELLO)
            reply, fds = _receive(sock)
            sock.settimeout(None)  # alive() peeks without waiting: a timeout would make recv poll first
        except OSError as exc:
            sock.close()
            raise SessionError(grpc.StatusCode.UNAVAILABLE, f"no kvtierd session at {path}: {exc}") from exc
        if "error" in reply:
            sock.close()
            for fd in fds:
                os.close(fd)
            raise SessionError(grpc.StatusCode.PERMISSION_DENIED, f"kvtierd refused a session: {reply['error']}")
        names = reply.get("descriptors", ["arena"])  # a daemon that names none sends the arena only
        if len(fds) > len(names):
            for fd in fds:
                os.close(fd)
            sock.close()
            raise SessionError(grpc.StatusCode.UNAVAILABLE, "kvtierd sent more descriptors than it named")
        return cls(sock, reply, dict(zip(names, fds)))

    def metadata(self) -> tuple:
        return ((METADATA_KEY, self.id),)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        if self.arena is not None and self.arena.fd >= 0:
            os.close(self.arena.fd)
            self.arena.fd = -1
        if self.grpc_socket_fd >= 0:
            os.close(self.grpc_socket_fd)
            self.grpc_socket_fd = -1


MAX_DESCRIPTORS = 4  # more than the daemon sends: extra ones are closed, never silently kept


def _recv_with_descriptors(sock: socket.socket, size: int) -> tuple[bytes, list[int]]:
    """recvmsg with MSG_CMSG_CLOEXEC: the kernel sets close-on-exec as it installs the descriptors,
    so no fork+exec in another thread can inherit them in between (socket.recv_fds of Python 3.11
    drops its flags argument, so it cannot be used for this)."""
    item = array.array("i")
    data, ancillary, _, _ = sock.recvmsg(size, socket.CMSG_LEN(MAX_DESCRIPTORS * item.itemsize),
                                         socket.MSG_CMSG_CLOEXEC)
    for level, kind, payload in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            item.frombytes(payload[:len(payload) - len(payload) % item.itemsize])
    return data, list(item)


def _receive(sock: socket.socket) -> tuple[dict, list[int]]:
    """The daemon's one reply (length-prefixed JSON) and the descriptors sent with it, received
    close-on-exec so that no child process of this one inherits them."""
    data, fds = _recv_with_descriptors(sock, MAX_REPLY_BYTES + 4)
    while len(data) >= 4 and len(data) < 4 + struct.unpack(">I", data[:4])[0]:
        more = sock.recv(MAX_REPLY_BYTES + 4 - len(data))
        if not more:
            break
        data += more
    if len(data) < 4 or len(data) != 4 + struct.unpack(">I", data[:4])[0]:
        for fd in fds:
            os.close(fd)
        raise OSError("the daemon's session reply was cut short")
    return json.loads(data[4:]), list(fds)
