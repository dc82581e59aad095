"""The block lifecycle with real kvtierd processes: the data-dir guard, damaged files at start,
retention bounds on the wire, S3 endpoints that ignore If-None-Match."""

from __future__ import annotations

import os

import grpc
import pytest

from kvtier.client import Client
from kvtier.client.client import retention
from kvtier.proto.v1 import kvtier_pb2 as pb

from s3server import make_bucket, s3_server, s3rver_server  # noqa: F401


def put_some(client: Client, namespace: str, count: int, size: int = 5000) -> dict[bytes, bytes]:
    blocks = {bytes([i + 1]) * 32: os.urandom(size) for i in range(count)}
    client.put_blocks(namespace, [(key, b"", data) for key, data in blocks.items()], wait_durable=True)
    return blocks


def test_a_second_daemon_is_refused_even_after_the_lock_file_is_removed(make_daemon, tmp_path):
    first = make_daemon()
    os.remove(os.path.join(first.data_dir, "kvtierd.lock"))
    second = make_daemon(start=False)  # the same name: the same data dir
    assert second.data_dir == first.data_dir
    with pytest.raises(RuntimeError, match="in use by another kvtierd"):
        second.start()
    with first.client() as c:
        c.register_namespace("ns", {"model": "m"})
        assert put_some(c, "ns", 3)


def test_damaged_namespace_registry_falls_back_to_its_backup_then_to_the_blocks(make_daemon):
    daemon = make_daemon()
    with daemon.client() as c:
        c.register_namespace("ns", {"model": "m"})
        blocks = put_some(c, "ns", 4)
    daemon.stop()
    registry = os.path.join(daemon.data_dir, "namespaces.json")
    with open(registry, "wb") as file:
        file.write(b"{\"ns\": {\"model\": \"m\"")  # torn
    daemon.start()
    with daemon.client() as c:
        assert [n.name for n in c.list_namespaces()] == ["ns"]
        assert c.register_namespace("ns", {"model": "m"}) is False   # same attributes: from the backup
        assert c.get_blocks("ns", list(blocks)) == list(blocks.values())
    daemon.stop()
    for path in (registry, registry + ".bak"):
        with open(path, "wb") as file:
            file.write(b"\x00garbage")
    daemon.start()
    assert "namespace registry" in daemon.log()
    with daemon.client() as c:
        assert c.get_blocks("ns", list(blocks)) == list(blocks.values())  # re-adopted from the blocks


def test_an_infinite_or_huge_ttl_is_invalid_and_changes_nothing(daemon):
    with daemon.client() as c:
        c.register_namespace("ns", {"model": "m"})
        key = b"k" * 32
        for ttl in (float("inf"), 1e300, float("nan")):
            with pytest.raises(grpc.RpcError) as caught:
                c.put("ns", key, b"x" * 100, retention=retention("system", 50, ttl))
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        c.put("ns", key, b"x" * 100, retention=retention("system", 50, 300.0))
        with pytest.raises(grpc.RpcError) as caught:
            c.set_retention("ns", [key], retention("system", 50, float("inf")))
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert c.stat("ns", key).retention.ttl_s == 300.0
        assert len(list(c.iter_inventory("ns"))) == 1
        assert list(c.snapshot("ns"))


def test_a_duplicate_acknowledged_durable_survives_kill_9(make_daemon):
    daemon = make_daemon()
    with daemon.client() as c:
        c.register_namespace("ns", {"model": "m"})
        data = os.urandom(40000)
        c.put("ns", b"d" * 32, data)                                   # first copy, not waited for
        assert c.put("ns", b"d" * 32, data, wait_durable=True) == pb.DUPLICATE
    daemon.kill()
    daemon.start()
    with daemon.client() as c:
        assert c.get_blocks("ns", [b"d" * 32]) == [data]


def s3rver_overrides(server, bucket: str, tmp_path, **extra) -> dict:
    secret = tmp_path / "s3rver-secret"
    secret.write_text(server.SECRET_ACCESS_KEY)
    secret.chmod(0o600)
    return {"s3.enabled": True, "s3.endpoint_url": server.endpoint_url, "s3.bucket": bucket,
            "s3.access_key_id": server.ACCESS_KEY_ID, "s3.secret_access_key_file": str(secret),
            "s3.list_interval_s": 3600.0, **extra}


def test_an_endpoint_that_ignores_if_none_match_is_refused_unless_allowed(make_daemon, s3rver_server, tmp_path):
    bucket = make_bucket(s3rver_server, "unconditional")
    refused = make_daemon(s3rver_overrides(s3rver_server, bucket, tmp_path), name="refused", start=False)
    with pytest.raises(RuntimeError, match="If-None-Match"):
        refused.start()
    allowed = make_daemon(s3rver_overrides(s3rver_server, bucket, tmp_path,
                                           **{"s3.allow_unconditional_puts": True}), name="allowed")
    assert "not deduplicated across nodes" in allowed.log()
    with allowed.client() as c:
        c.register_namespace("ns", {"model": "m"})
        put_some(c, "ns", 2)


def test_a_damaged_disk_index_is_moved_aside_and_rebuilt(make_daemon):
    daemon = make_daemon()
    with daemon.client() as c:
        c.register_namespace("ns", {"model": "m"})
        blocks = put_some(c, "ns", 12)
    daemon.kill()
    index = os.path.join(daemon.data_dir, "disk", "index.lmdb", "data.mdb")
    size = os.path.getsize(index)
    with open(index, "r+b") as file:
        file.truncate(size // 3)                                    # LMDB would die of SIGBUS on this
    daemon.start()
    assert "damaged" in daemon.log()
    with daemon.client() as c:
        assert c.get_blocks("ns", list(blocks)) == list(blocks.values())
