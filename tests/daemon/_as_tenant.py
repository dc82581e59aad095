"""A kvtier client process for the multi-user tests: the test runs it under another uid (setpriv)
and reads one JSON line back. Usage: _as_tenant.py SOCKET STEP [ARG...]; every step opens its own
session, as a separate engine process would. Errors come back as {"error": "<status code name>"}."""

from __future__ import annotations

import glob
import json
import mmap
import os
import sys

import grpc

from kvtier.client.client import Client, block_checksum
from kvtier.client.session import LocalSession
from kvtier.proto.v1 import kvtier_pb2 as pb


def session(sock: str) -> dict:
    s = LocalSession.open(sock)
    size = os.fstat(s.arena.fd).st_size
    return {"tenant": s.tenant, "prefix": s.namespace_prefix, "first_slot": s.arena.first_slot,
            "slot_count": s.arena.slot_count, "fd_bytes": size,
            "shm_files": glob.glob("/dev/shm/kvtier*")}


def whoami(sock: str) -> dict:
    """The principal a session is opened for, or the refusal's status code and details."""
    try:
        s = LocalSession.open(sock)
    except grpc.RpcError as exc:
        return {"error": exc.code().name, "details": exc.details()}
    s.close()
    return {"principal": s.principal, "tenant": s.tenant, "prefix": s.namespace_prefix}


def store(sock: str, namespace: str, key: str, text: str) -> dict:
    with Client(sock, timeout=30) as c:
        c.register_namespace(namespace)
        return {"status": c.put_blocks(namespace, [(bytes.fromhex(key), b"", text.encode())])}


def read(sock: str, namespace: str, key: str) -> dict:
    with Client(sock, timeout=30) as c:
        try:
            got = c.get_blocks(namespace, [bytes.fromhex(key)])[0]
        except grpc.RpcError as exc:
            return {"error": exc.code().name}
        return {"data": got.decode() if got is not None else None}


def store_many(sock: str, namespace: str, count: str) -> dict:
    """Stores `count` distinct blocks one commit at a time (an engine saving a long prompt)."""
    with Client(sock, timeout=30) as c:
        c.register_namespace(namespace)
        statuses = [c.put_blocks(namespace, [(index.to_bytes(32, "big"), b"", b"filler" * 1000)], wait_ms=30_000)[0]
                    for index in range(int(count))]
        return {"stored": statuses.count(1)}


def store_durable(sock: str, namespace: str, count: str, size: str) -> dict:
    """Stores `count` distinct blocks of `size` bytes one wait_durable commit at a time: how many were
    acknowledged durable, how many refused RESOURCE_EXHAUSTED (and the first refusal's details)."""
    out = {"durable": 0, "refused": 0, "why": ""}
    with Client(sock, timeout=60) as c:
        c.register_namespace(namespace)
        for index in range(int(count)):
            data = index.to_bytes(4, "big") * (int(size) // 4)
            try:
                status = c.put_blocks(namespace, [(index.to_bytes(32, "big"), b"", data)], wait_durable=True,
                                      wait_ms=30_000)
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
                    raise
                out["refused"] += 1
                out["why"] = out["why"] or exc.details()
                continue
            assert status == [1], status
            out["durable"] += 1
    return out


def get(sock: str, namespace: str, key: str) -> dict:
    with Client(sock, timeout=30) as c:
        return {"data": c.get(namespace, bytes.fromhex(key))[1].decode()}


def hold(sock: str, namespace: str, key: str) -> dict:
    """Leaves a read lease and an allocation open (as an engine mid-request would) and exits."""
    with Client(sock, timeout=30) as c:
        lease = c.acquire(namespace, [bytes.fromhex(key)], lease_ms=600_000)
        allocation = c.allocate(1, lease_ms=600_000)
        return {"lease": lease.id, "allocation": allocation.id, "slot": allocation.slots[0]}


def meddle(sock: str, namespace: str, lease: str, allocation: str, slot: str) -> dict:
    """Everything another tenant's ids would allow, each answer's status code."""
    out = {}
    with Client(sock, timeout=30) as c:
        entry = [(b"\x01" * 32, b"", int(slot), 0, block_checksum(b""))]
        for name, call in (("release", lambda: c.release(int(lease))),
                           ("abort", lambda: c.abort(int(allocation))),
                           ("commit", lambda: c.commit(int(allocation), namespace, entry))):
            out[name] = _code(call)
    return out


def finish(sock: str, lease: str, allocation: str) -> dict:
    with Client(sock, timeout=30) as c:
        c.release(int(lease))
        c.abort(int(allocation))
    return {"ok": True}


def attack_arena(sock: str) -> dict:
    """Tries to shrink its own part (sealed), scribbles over every slot of it, and tries to open
    the daemon's descriptors through /proc."""
    s = LocalSession.open(sock)
    out = {}
    try:
        os.ftruncate(s.arena.fd, 0)
        out["ftruncate"] = "allowed"
    except OSError as exc:
        out["ftruncate"] = exc.__class__.__name__
    size = s.arena.slot_count * s.arena.slot_bytes
    with mmap.mmap(s.arena.fd, size) as whole:
        whole[:] = b"\xee" * size
    opened = []
    for path in glob.glob("/proc/[0-9]*/fd/*"):
        if path.startswith(f"/proc/{os.getpid()}/"):
            continue  # its own part, received over the session
        try:
            os.close(os.open(path, os.O_RDONLY))
            if "memfd:kvtier" in os.readlink(path):
                opened.append(path)
        except OSError:
            pass
    out["foreign_arena_fds_opened"] = opened
    return out


def squat(sock: str, namespace: str, key: str) -> dict:
    with Client(sock, timeout=30) as c:
        return {"register": _code(lambda: c.register_namespace(namespace)),
                "put": _code(lambda: c.put(namespace, bytes.fromhex(key), b"poison")),
                "put_blocks": _code(lambda: c.put_blocks(namespace, [(bytes.fromhex(key), b"", b"poison")]))}


def exhaust(sock: str, namespace: str, count: str) -> dict:
    """Opens allocations until refused (at most `count` + 1): how many it got, and the refusal."""
    with Client(sock, timeout=30) as c:
        c.register_namespace(namespace)
        held = []
        for _ in range(int(count) + 1):
            try:
                held.append(c.allocate(1, wait_ms=0, lease_ms=600_000).id)
            except grpc.RpcError as exc:
                return {"allocations": len(held), "refusal": exc.code().name}
        return {"allocations": len(held), "refusal": None}


def namespaces(sock: str, prefix: str, count: str) -> dict:
    with Client(sock, timeout=30) as c:
        for index in range(int(count) + 1):
            try:
                c.register_namespace(f"{prefix}{index}")
            except grpc.RpcError as exc:
                return {"registered": index, "refusal": exc.code().name}
        return {"registered": int(count) + 1, "refusal": None}


def watchers(sock: str, count: str) -> dict:
    """Opens `count` + 1 Watch streams; the first event or refusal of each."""
    with Client(sock, timeout=30) as c:
        streams, codes = [], []
        for _ in range(int(count) + 1):
            stream = c.watch(from_seq=0)
            streams.append(stream)
            stream.initial_metadata()  # the daemon answers a Watch with headers once it is open
            codes.append(stream.code().name if stream.done() else "OK")
        for stream in streams:
            stream.cancel()
        return {"codes": codes}


def sessions(sock: str, count: str) -> dict:
    """Opens `count` + 1 sessions at once (as that many engine processes would): each one's answer."""
    opened, codes = [], []
    for _ in range(int(count) + 1):
        try:
            opened.append(LocalSession.open(sock))
            codes.append("OK")
        except grpc.RpcError as exc:
            codes.append(exc.code().name)
    for session in opened:
        session.close()
    return {"codes": codes}


def grpc_without_session(sock: str) -> dict:
    channel = grpc.insecure_channel(f"unix:{sock}")
    from kvtier.proto.v1 import kvtier_pb2_grpc as pb_grpc
    out = {"list": _code(lambda: pb_grpc.KvTierStub(channel).ListNamespaces(pb.ListNamespacesRequest(), timeout=30))}
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=30)
    out["health"] = health_pb2.HealthCheckResponse.ServingStatus.Name(health.status)
    try:
        LocalSession.open(sock)
        out["session"] = "OK"
    except grpc.RpcError as exc:
        out["session"] = exc.code().name
    return out


def _code(call) -> str:
    try:
        call()
        return "OK"
    except grpc.RpcError as exc:
        return exc.code().name


if __name__ == "__main__":
    print(json.dumps(globals()[sys.argv[2]](sys.argv[1], *sys.argv[3:])))
