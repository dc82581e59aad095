"""Where local clients connect, and how many descriptors that may cost (docs/security.md).

Contract
- The shared socket (`server.socket`, mode `server.socket_mode`) answers health and reflection to
  anyone who may connect; kvtier.v1 calls there are refused whatever session they carry.
- Each principal (arena part 0: the administrators; part i: the i-th tenant) has its own gRPC
  socket `<server.socket>.d/<part>.sock`. The directory is kvtierd's alone (mode 0700), so no other
  user reaches these sockets by path; the socket files themselves are 0666, so whoever holds an
  O_PATH descriptor of one (which the session socket hands to that principal's sessions only) can
  connect through `/proc/self/fd/N`. A session id is honoured only on its own principal's socket
  (daemon/sessions.py `owner_on`).
- Every listener has a bound on its connections (gRPC's max_allowed_incoming_connections: past
  it a connection is closed at once), and the session socket bounds connections per uid, so the
  descriptors all listeners together may hold are known at start: `descriptor_budget`, with the disk
  tier's segment files and RESERVED_DESCRIPTORS for kvtierd's other files (LMDB, memfds, S3 and ZMQ
  sockets, peers). kvtierd raises its soft RLIMIT_NOFILE to the hard limit and refuses to start when
  the budget does not fit, naming the keys. Not bounded here: connections to /metrics (loopback by
  default) and ZMQ subscribers of the KV-event endpoints.
Restart: the directory is emptied of stale sockets and re-created at every start; the O_PATH
descriptors a client holds from before then point at removed sockets (connections fail, and the
client opens a new session).
"""

from __future__ import annotations

import os
import resource
import stat

from .config import Config
from .sessions import MAX_HANDSHAKES

RESERVED_DESCRIPTORS = 1024  # kvtierd's own: disk segments, LMDB, memfds, S3 pools, ZMQ, peers
PEER_CONNECTIONS = 256       # the peer listener's bound (mutual TLS; peers.listen)


class LocalSocketError(Exception):
    """The private socket directory or the descriptor budget is unusable; the message says why."""


def private_dir(shared_socket: str) -> str:
    return os.path.abspath(shared_socket) + ".d"


def principal_socket(shared_socket: str, part_index: int) -> str:
    return os.path.join(private_dir(shared_socket), f"{part_index}.sock")


def prepare_private_dir(shared_socket: str) -> str:
    """Creates `<socket>.d` (0700, kvtierd's own) and removes stale sockets in it; LocalSocketError
    when it is not a directory kvtierd owns, or holds anything but sockets."""
    path = private_dir(shared_socket)
    os.makedirs(path, mode=0o700, exist_ok=True)
    info = os.lstat(path)
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid():
        raise LocalSocketError(f"{path} must be a directory owned by kvtierd's user (uid {os.geteuid()})")
    os.chmod(path, 0o700)  # a directory left wider by hand is narrowed before any socket is in it
    for name in os.listdir(path):
        entry = os.path.join(path, name)
        if not stat.S_ISSOCK(os.lstat(entry).st_mode):
            raise LocalSocketError(f"{entry} is not a socket: {path} holds only kvtierd's principal sockets")
        os.remove(entry)
    return path


def open_socket_descriptor(path: str) -> int:
    """An O_PATH descriptor of a bound socket file, to hand to that principal's sessions."""
    fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
    assert stat.S_ISSOCK(os.fstat(fd).st_mode), path
    return fd


def connection_bounds(cfg: Config) -> list[tuple[str, int]]:
    """(what, bound) for every listener of local and remote clients."""
    bounds = [("server.max_sessions + handshakes (session socket)", cfg.server.max_sessions + MAX_HANDSHAKES),
              ("server.max_shared_connections", cfg.server.max_shared_connections),
              ("server.max_admin_connections", cfg.server.max_admin_connections)]
    bounds += [(f"tenant {t.name} max_connections", t.max_connections) for t in cfg.tenant]
    if cfg.server.tcp:
        bounds.append(("server.max_tcp_connections", cfg.server.max_tcp_connections))
    if cfg.peers.listen:
        bounds.append(("the peer listener", PEER_CONNECTIONS))
    return bounds


def disk_segment_files(cfg: Config) -> int:
    """The disk tier keeps each segment file open: as many as fit its capacity, plus the active
    ones and those compaction writes into before it drops an old one."""
    return cfg.disk.capacity // cfg.disk.segment_bytes + 4 if cfg.disk.enabled else 0


def descriptor_budget(cfg: Config) -> int:
    return RESERVED_DESCRIPTORS + disk_segment_files(cfg) + sum(bound for _, bound in connection_bounds(cfg))


def ensure_descriptors(cfg: Config) -> tuple[int, int]:
    """Raises the soft RLIMIT_NOFILE to the hard limit; (limit, budget). LocalSocketError when the
    budget does not fit the hard limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        soft = hard
    budget = descriptor_budget(cfg)
    if budget > soft:
        named = ", ".join(f"{what} {bound}" for what, bound in connection_bounds(cfg))
        raise LocalSocketError(
            f"connection bounds need {budget} file descriptors ({named}, {disk_segment_files(cfg)} disk segment files, "
            f"plus {RESERVED_DESCRIPTORS} for kvtierd's other files) but the limit is {soft} (RLIMIT_NOFILE): raise "
            "LimitNOFILE= in the unit, or lower those bounds (or raise disk.segment_bytes)")
    return soft, budget
