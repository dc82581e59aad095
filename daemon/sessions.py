"""Local sessions: who a Unix-socket client is, and the arena part it may map.

gRPC over a Unix socket does not tell the server who is calling, so a local client first opens a
session on a second socket beside the gRPC one (`<server.socket>.session`, same file mode):

    client -> daemon   b"KVTIER-SESSION 1\\n"
    daemon -> client   4-byte big-endian length, then that many bytes of JSON, and, when the
                       session may use the arena, two file descriptors (SCM_RIGHTS) in the same
                       message: its tenant's arena part, then an O_PATH descriptor of the
                       principal's own gRPC socket:
                       {"session": "<64 hex>", "principal": "uid 1001", "tenant": "a" | null,
                        "namespace_prefix": "a/" | "", "arena": {"first_slot", "slot_count",
                        "slot_bytes", "generation"}, "descriptors": ["arena", "grpc_socket"]}
                       or {"error": "..."} and the connection closes.

The kernel names the caller (SO_PEERCRED: uid and effective gid; SO_PEERGROUPS: its supplementary
groups; both as they were at connect time); `LocalIdentities` maps them to a principal (uid first,
then the effective gid, then the supplementary groups, which must not name two principals).

A session works only on its principal's own gRPC socket. Each principal (the administrators, and
each tenant) has one, in a directory only kvtierd's user may enter (`<server.socket>.d/`, mode
0700): nobody reaches it by path. The client connects through the descriptor it received
(`unix:/proc/self/fd/N`: the kernel follows the descriptor, not the path), so only processes the
daemon handed it to, or that they passed it on to, can connect at all. The session id goes with
every gRPC call as metadata `x-kvtier-session`; an id presented on another principal's socket, or
on the shared socket (`server.socket`: health and reflection only), is refused and logged
(`owner_on`). A stolen id is therefore useless to any other principal: they can reach only their
own socket. A session lasts as long as the client keeps this connection open.

Bounds, checked when a connection is accepted, before anything is read: at most
server.max_connections_per_uid connections to this socket per uid (open sessions and handshakes
alike) and server.max_sessions + MAX_HANDSHAKES in all; then server.max_sessions sessions in all and
a tenant's max_sessions for each tenant. A handshake must arrive within HANDSHAKE_TIMEOUT_S;
anything a client sends after it is read in small pieces and dropped. Refusals are logged with the
uid (at most once per LOG_EVERY_S per uid and reason).
Event loop only.
"""

from __future__ import annotations

import asyncio
import collections
import ctypes
import errno
import json
import logging
import os
import secrets
import socket
import struct
import time

from .auth import IdentityConflict, LocalIdentities, Principal

log = logging.getLogger("kvtier.sessions")
HELLO = b"KVTIER-SESSION 1\n"
METADATA_KEY = "x-kvtier-session"
HANDSHAKE_TIMEOUT_S = 5.0
MAX_REPLY_BYTES = 64 << 10
SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)  # Linux >= 4.13; Python 3.11 does not name it
MAX_PEER_GROUPS = 65536  # the kernel's NGROUPS_MAX: no peer can have more
FIRST_GROUPS_GUESS = 64  # the first buffer; a peer with more groups costs one more call (ERANGE says how many)
MAX_HANDSHAKES = 64      # connections beyond server.max_sessions that may be mid-handshake at once
LOG_EVERY_S = 10.0


def session_path(grpc_socket: str) -> str:
    return grpc_socket + ".session"


class Sessions:
    """Open local sessions by id. `arena_for(principal)` gives (part index, ArenaPart) or None."""

    def __init__(self, identities: LocalIdentities, arena, limit: int, tenant_limits: dict[str, int] | None = None,
                 per_uid_limit: int = 64):
        self.identities = identities
        self.arena = arena
        self.limit = limit
        self.tenant_limits = dict(tenant_limits or {})
        self.per_uid_limit = per_uid_limit
        self._open: dict[str, Principal] = {}
        self._per_tenant: collections.Counter[str] = collections.Counter()
        self._connections: collections.Counter[int] = collections.Counter()  # per uid, open now
        self._grpc_sockets: dict[int, int] = {}  # arena part index -> O_PATH descriptor of its socket
        self._logged: dict[tuple, float] = {}    # (uid or principal, reason) -> when last logged
        self.refused = 0
        self.refused_connections = 0
        self.misused = 0  # calls with a session id on a socket that is not its principal's

    def set_grpc_socket(self, part_index: int, o_path_fd: int) -> None:
        """The principal socket handed to sessions of arena part `part_index` (the daemon owns the fd)."""
        self._grpc_sockets[part_index] = o_path_fd

    @property
    def connections(self) -> int:
        return sum(self._connections.values())

    def owner_on(self, session_id: str, part_index: int | None, where: str) -> Principal | None:
        """The session's principal if it may call on this socket (`part_index`: the principal
        socket of that arena part; None: the shared socket, where no session is honoured). A live
        id presented elsewhere is refused (None) and logged: someone holds another principal's id."""
        principal = self._open.get(session_id)
        if principal is None:
            return None
        if part_index is not None and self.part_of(principal) == part_index:
            return principal
        self.misused += 1
        if part_index is None:
            if self._due((principal.name, where)):
                log.warning("a session of %s was presented on the shared socket, which serves no kvtier.v1 calls: "
                            "refused (a client calling there instead of its own socket, or another process "
                            "holding that session's id)", principal.name)
            return None
        if self._due((principal.name, where)):
            log.warning("a session of %s (%s) was presented on %s, which is not its own socket: refused; "
                        "another process holds that session's id", principal.name,
                        f"tenant {principal.tenant}" if principal.tenant else "administrator", where)
        return None

    def _due(self, what: tuple) -> bool:
        """True at most once per LOG_EVERY_S for `what` (bounded: the table is cleared when it grows)."""
        now = time.monotonic()
        if now - self._logged.get(what, -LOG_EVERY_S) < LOG_EVERY_S:
            return False
        if len(self._logged) >= 4096:
            self._logged.clear()
        self._logged[what] = now
        return True

    def __len__(self) -> int:
        return len(self._open)

    def principal(self, session_id: str) -> Principal | None:
        return self._open.get(session_id)

    def part_of(self, principal: Principal) -> int:
        return self.arena.part_named(principal.tenant or "")

    async def serve(self, path: str, mode: int) -> asyncio.AbstractServer:
        """Listens on `path` (created with `mode` before anyone can connect)."""
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o777)  # no window in which the socket exists with wider permissions
        try:
            listener.bind(path)
        finally:
            os.umask(old)
        os.chmod(path, mode)
        listener.listen(64)
        return await asyncio.start_unix_server(self._handle, sock=listener)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        uid, gid = _peer_credentials(sock)
        too_many = self._too_many_connections(uid)
        if too_many:
            self.refused_connections += 1
            if self._due((uid, "connections")):
                log.warning("session socket: connection of uid %d closed at once: %s", uid, too_many)
            writer.transport.abort()  # no reply, nothing read: the descriptor is freed now
            return
        self._connections[uid] += 1
        session_id = None
        try:
            async with asyncio.timeout(HANDSHAKE_TIMEOUT_S):
                hello = await reader.readexactly(len(HELLO))
            if hello != HELLO:
                return self._refuse(writer, uid, "not a kvtier session handshake")
            try:
                groups = peer_groups(sock.fileno())
            except OSError as exc:
                return self._refuse(writer, uid, f"its supplementary groups cannot be read: {exc}")
            try:
                principal, matched = self.identities.identify(uid, gid, groups)
            except IdentityConflict as exc:
                return self._refuse(writer, uid, str(exc))
            if principal is None:
                return self._refuse(writer, uid, f"uid {uid} (gid {gid}, {len(groups)} supplementary groups) is "
                                                 "neither a configured tenant's nor an administrator "
                                                 "([[tenant]] uids/gids, server.admin_uids/admin_gids)")
            full = self._full(principal)
            if full:
                return self._refuse(writer, uid, full)
            session_id = secrets.token_hex(32)
            self._open[session_id] = principal
            self._per_tenant[principal.tenant or ""] += 1
            await self._welcome(writer, sock, session_id, principal, matched)
            while await reader.read(4096):  # until the client closes: then the session ends
                pass
        except (TimeoutError, asyncio.IncompleteReadError, ConnectionError, OSError) as exc:
            log.debug("session of uid %d ended: %r", uid, exc)
        finally:
            if session_id is not None and self._open.pop(session_id, None) is not None:
                self._per_tenant[principal.tenant or ""] -= 1
            self._connections[uid] -= 1
            if not self._connections[uid]:
                del self._connections[uid]
            writer.close()

    def _too_many_connections(self, uid: int) -> str | None:
        if self._connections[uid] >= self.per_uid_limit:
            return f"it has server.max_connections_per_uid ({self.per_uid_limit}) connections open"
        if self.connections >= self.limit + MAX_HANDSHAKES:
            return f"{self.connections} connections are open (server.max_sessions + {MAX_HANDSHAKES} handshakes)"
        return None

    def _full(self, principal: Principal) -> str | None:
        """Why no session can be opened for `principal` now (None: one can)."""
        if len(self._open) >= self.limit:
            return f"server.max_sessions ({self.limit}) sessions are open"
        limit = self.tenant_limits.get(principal.tenant or "")
        if limit is not None and self._per_tenant[principal.tenant] >= limit:
            return f"tenant {principal.tenant} has its max_sessions ({limit}) sessions open"
        return None

    async def _welcome(self, writer, sock, session_id: str, principal: Principal, matched: str) -> None:
        part_index = self.part_of(principal)
        part = self.arena.parts[part_index]
        grpc_socket = self._grpc_sockets[part_index]
        reply = {"session": session_id, "principal": principal.name, "tenant": principal.tenant,
                 "namespace_prefix": f"{principal.tenant}/" if principal.tenant else "",
                 "arena": {"first_slot": part.first_slot, "slot_count": part.slot_count,
                           "slot_bytes": self.arena.slot_bytes, "generation": self.arena.generation},
                 "descriptors": ["arena", "grpc_socket"]}
        body = json.dumps(reply).encode()
        assert len(body) <= MAX_REPLY_BYTES
        await writer.drain()
        # The reply is one small message: sendmsg on the non-blocking socket sends it whole or fails.
        # asyncio's transport socket offers no sendmsg, so send on a duplicate of its descriptor.
        with socket.fromfd(sock.fileno(), socket.AF_UNIX, socket.SOCK_STREAM) as dup:
            sent = socket.send_fds(dup, [struct.pack(">I", len(body)) + body], [part.fd, grpc_socket])
        if sent != 4 + len(body):
            raise ConnectionError(f"session reply cut short ({sent} of {4 + len(body)} bytes)")
        log.info("local session for %s (%s, by its %s): arena part %s", principal.name,
                 f"tenant {principal.tenant}" if principal.tenant else "administrator", matched,
                 part.name or "admin")

    def _refuse(self, writer, uid: int, why: str) -> None:
        self.refused += 1
        if self._due((uid, why)):
            log.warning("local session refused for uid %d: %s", uid, why)
        body = json.dumps({"error": why}).encode()
        writer.write(struct.pack(">I", len(body)) + body)


def _peer_credentials(sock) -> tuple[int, int]:
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _, uid, gid = struct.unpack("3i", creds)
    return uid, gid


_libc = ctypes.CDLL(None, use_errno=True)
_libc.getsockopt.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_void_p,
                             ctypes.POINTER(ctypes.c_uint32)]
_warned_no_groups = False


def peer_groups(fd: int, first_guess: int = FIRST_GROUPS_GUESS) -> tuple[int, ...]:
    """The supplementary groups of a Unix socket's peer (SO_PEERGROUPS: as they were at connect).

    Python's socket.getsockopt takes at most 1024 bytes (256 groups), so libc's getsockopt is called
    directly: a buffer too small fails with ERANGE and the needed length written back, and the call
    is made once more with that length (the peer's credentials are fixed at connect, so it cannot
    grow again). At most MAX_PEER_GROUPS. A kernel without SO_PEERGROUPS (before 4.13) gives no
    supplementary groups (logged once): uids and effective gids still match. Raises OSError otherwise."""
    global _warned_no_groups
    count = max(1, min(first_guess, MAX_PEER_GROUPS))
    for _ in range(2):
        buffer = (ctypes.c_uint32 * count)()
        length = ctypes.c_uint32(ctypes.sizeof(buffer))
        if _libc.getsockopt(fd, socket.SOL_SOCKET, SO_PEERGROUPS, buffer, ctypes.byref(length)) == 0:
            return tuple(buffer[:length.value // 4])
        code = ctypes.get_errno()
        if code == errno.ENOPROTOOPT:
            if not _warned_no_groups:
                _warned_no_groups = True
                log.warning("this kernel has no SO_PEERGROUPS: supplementary groups of local clients are not "
                            "consulted, only their uid and effective gid")
            return ()
        if code != errno.ERANGE or not count < length.value // 4 <= MAX_PEER_GROUPS:
            raise OSError(code, f"getsockopt(SO_PEERGROUPS): {os.strerror(code)}")
        count = length.value // 4
    raise OSError(errno.ERANGE, "getsockopt(SO_PEERGROUPS): the group list kept growing")
