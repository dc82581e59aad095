"""Steps of the session-binding and descriptor tests, each run under another uid (setpriv).
Usage: _session_thief.py SOCKET STEP [ARG...]; prints JSON lines. Long-lived steps print one line
when ready, then hold what they opened until their standard input closes."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import grpc

from kvtier.client.client import Client, _put_messages
from kvtier.client.session import HELLO, LocalSession
from kvtier.proto.v1 import kvtier_pb2 as pb
from kvtier.proto.v1 import kvtier_pb2_grpc as pb_grpc

from _as_tenant import _code

KEY = bytes.fromhex("5a" * 32)


def _say(value: dict) -> None:
    print(json.dumps(value), flush=True)


def hold(sock: str, namespace: str) -> None:
    """Stores a block in `namespace` and keeps a session open; prints its id (as if it leaked)."""
    with Client(sock, timeout=30) as client:
        client.register_namespace(namespace)
        client.put_blocks(namespace, [(KEY, b"", b"the victim's block")])
        session = client._session_now()
        fd = getattr(session, "grpc_socket_fd", -1)
        _say({"session": session.id, "target_path": os.readlink(f"/proc/self/fd/{fd}") if fd >= 0 else sock})
        sys.stdin.read()  # until the test is done with the id


def _tries(stub, metadata, namespace: str) -> dict:
    """What a holder of someone's session id tries with it, each call's status."""
    out = {"list": _code(lambda: stub.ListNamespaces(pb.ListNamespacesRequest(), metadata=metadata, timeout=30))}
    out["listed"] = []
    if out["list"] == "OK":
        out["listed"] = [n.name for n in stub.ListNamespaces(pb.ListNamespacesRequest(), metadata=metadata,
                                                              timeout=30).namespaces]
    out["get"] = _code(lambda: list(stub.Get(pb.GetRequest(namespace=namespace, key=KEY), metadata=metadata, timeout=30)))
    out["put"] = _code(lambda: stub.Put(_put_messages(namespace, bytes(32), b"the thief's block", b"", False),
                                        metadata=metadata, timeout=30))
    out["allocate"] = _code(lambda: stub.Allocate(pb.AllocateRequest(count=1), metadata=metadata, timeout=30))
    out["clear"] = _code(lambda: stub.Clear(pb.ClearRequest(namespace=namespace), metadata=metadata, timeout=30))
    return out


def steal(sock: str, session_id: str, namespace: str, victim_socket_path: str) -> None:
    """Uses another principal's session id on the shared socket and on this uid's own session socket;
    tries to reach the victim's own socket by its path."""
    metadata = ((("x-kvtier-session", session_id)),)
    result = {}
    with grpc.insecure_channel(f"unix:{sock}") as shared:
        result["shared"] = _tries(pb_grpc.KvTierStub(shared), metadata, namespace)
    own = LocalSession.open(sock)
    # (A daemon without principal sockets had one socket for all: the shared one.)
    with grpc.insecure_channel(getattr(own, "target", f"unix:{sock}")) as mine:
        result["own_socket"] = _tries(pb_grpc.KvTierStub(mine), metadata, namespace)
    own.close()
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(victim_socket_path)
        result["victim_socket"] = "connected"
    except OSError as exc:
        result["victim_socket"] = type(exc).__name__
    finally:
        probe.close()
    _say(result)


def flood(sock: str, count: str) -> None:
    """Opens `count` connections and holds them all: three in four to the shared gRPC socket, the
    rest to the session socket (saying nothing: a handshake that never comes)."""
    held, failed = [], 0
    for index in range(int(count)):
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        conn.settimeout(30)  # a daemon slow to accept is still given every connection
        try:
            conn.connect(sock + ".session" if index % 4 == 3 else sock)
            held.append(conn)
        except OSError:
            failed += 1
            conn.close()
    _say({"opened": len(held), "failed": failed})
    sys.stdin.read()


def child_descriptors(sock: str) -> None:
    """Opens a session, then starts a child that inherits every inheritable descriptor
    (close_fds=False, as some engines' launchers do); the child reports what it holds."""
    with Client(sock, timeout=30) as client:
        client.arena()
        child = subprocess.run([sys.executable, "-c",
                                "import os, json\n"
                                "seen = []\n"
                                "for fd in os.listdir('/proc/self/fd'):\n"
                                "    try: seen.append(os.readlink('/proc/self/fd/' + fd))\n"
                                "    except OSError: pass\n"
                                "print(json.dumps(seen))"],
                               close_fds=False, capture_output=True, text=True, timeout=60)
        _say({"child_fds": json.loads(child.stdout)})


if __name__ == "__main__":
    globals()[sys.argv[2]](sys.argv[1], *sys.argv[3:])
