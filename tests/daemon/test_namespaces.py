"""RemoveNamespace: the one way back under limits.max_namespaces (before it, a full namespace table
stayed full, restarts included), admin only, refused while blocks are in use."""

from __future__ import annotations

import os

import grpc

from test_security import code_of, tcp_daemon  # noqa: F401 - tcp_daemon is a fixture


def put_some(client, namespace: str, count: int) -> list[bytes]:
    keys = [bytes([i + 1]) * 32 for i in range(count)]
    client.put_blocks(namespace, [(key, b"", os.urandom(3000)) for key in keys], wait_durable=True)
    return keys


def test_a_removed_namespace_frees_its_place_and_stays_removed_after_a_restart(make_daemon):
    daemon = make_daemon({"limits.max_namespaces": 3})
    with daemon.client() as c:
        for name in ("a", "b", "c"):
            c.register_namespace(name, {"model": name})
        keys = put_some(c, "b", 5)
        assert code_of(lambda: c.register_namespace("d", {"model": "d"})) == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert c.remove_namespace("b") == 5
        assert c.register_namespace("d", {"model": "d"}) is True
        assert code_of(lambda: c.lookup("b", keys)) == grpc.StatusCode.NOT_FOUND
    daemon.kill()                                                 # not even a clean stop
    daemon.start()
    with daemon.client() as c:
        assert sorted(n.name for n in c.list_namespaces()) == ["a", "c", "d"]
        assert c.stats().blocks == 0                              # the disk does not bring b's blocks back
        assert c.remove_namespace("a") == 0                       # the table is full again: make room
        c.register_namespace("b", {"model": "b2"})                # a fresh namespace, other attributes
        assert c.get_blocks("b", keys) == [None] * 5


def test_a_namespace_in_use_is_not_removed_until_its_blocks_are_free(make_daemon):
    daemon = make_daemon()
    with daemon.client() as c:
        c.register_namespace("busy", {"model": "m"})
        keys = put_some(c, "busy", 4)
        lease = c.acquire("busy", keys[:1])
        assert code_of(lambda: c.remove_namespace("busy")) == grpc.StatusCode.FAILED_PRECONDITION
        assert c.stats().blocks == 1                              # what was not in use is gone already
        c.release(lease.id)
        assert c.remove_namespace("busy") == 1
        assert code_of(lambda: c.remove_namespace("busy")) == grpc.StatusCode.NOT_FOUND


def test_only_an_admin_removes_a_namespace(tcp_daemon):  # noqa: F811
    with tcp_daemon.connect("a") as tenant, tcp_daemon.connect("admin") as admin:
        tenant.register_namespace("a/mine", {"model": "m"})
        assert code_of(lambda: tenant.remove_namespace("a/mine")) == grpc.StatusCode.PERMISSION_DENIED
        assert admin.remove_namespace("a/mine") == 0
        assert [n.name for n in admin.list_namespaces()] == []
