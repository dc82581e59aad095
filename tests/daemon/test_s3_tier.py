"""The S3 tier through kvtierd, against a real S3 server process (moto) over HTTP on 127.0.0.1."""

from __future__ import annotations

import random
import time
import urllib.request

import grpc
import pytest

from kvtier.proto.v1 import kvtier_pb2 as pb
from s3server import free_port, make_bucket, s3_server  # noqa: F401  (the fixture)

NS = "s3-ns"


def key(i: int) -> bytes:
    return i.to_bytes(4, "little") + b"\x33" * 28


def payload(i: int, size: int = 20_000) -> bytes:
    return random.Random(i).randbytes(size)


def s3_overrides(server, bucket: str, **more) -> dict:
    return {"s3.enabled": True, "s3.endpoint_url": server.endpoint_url, "s3.bucket": bucket,
            "s3.region": "us-east-1", "s3.list_interval_s": 0.5, "s3.connect_timeout_s": 0.5,
            "s3.read_timeout_s": 1.0, **more}


def wait_for(predicate, timeout: float = 30.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def matched(c, n: int) -> int:
    """Lookup depth; 0 while the listing has not yet adopted the namespace (NOT_FOUND until then)."""
    try:
        return c.lookup(NS, [key(i) for i in range(n)]).matched
    except grpc.RpcError as exc:
        if exc.code() != grpc.StatusCode.NOT_FOUND:
            raise
        return 0


def objects(server, bucket: str) -> list[str]:
    pages = server.client().get_paginator("list_objects_v2").paginate(Bucket=bucket)
    return [o["Key"] for page in pages for o in page.get("Contents", [])]


def put_all(daemon, blocks: range, attributes=None):
    with daemon.client() as c:
        c.register_namespace(NS, attributes or {"model": "m"})
        for start in range(blocks.start, blocks.stop, 10):
            c.put_blocks(NS, [(key(i), b"", payload(i)) for i in range(start, min(start + 10, blocks.stop))])


def test_write_through_reaches_s3_and_a_fresh_node_reads_it_back(make_daemon, s3_server):
    bucket = make_bucket(s3_server, "kvtier-wt")
    first = make_daemon(s3_overrides(s3_server, bucket), name="a")
    put_all(first, range(30))
    with first.client() as c:
        wait_for(lambda: c.stats().upload_backlog == 0 and c.stats().tiers[2].writes == 30, what="uploads")
        assert c.stat(NS, key(3)).tiers == pb.TIER_CPU | pb.TIER_DISK | pb.TIER_S3
        assert matched(c, 30) == 30
    assert len(objects(s3_server, bucket)) == 30
    first.stop()
    fresh = make_daemon(s3_overrides(s3_server, bucket), name="b")  # empty data dir, same bucket
    with fresh.client() as c:
        wait_for(lambda: matched(c, 30) == 30, what="listing")
        assert c.stat(NS, key(5)).tiers == pb.TIER_S3
        assert c.get_blocks(NS, [key(i) for i in range(30)]) == [payload(i) for i in range(30)]
        assert c.stat(NS, key(5)).tiers & (pb.TIER_CPU | pb.TIER_S3) == pb.TIER_CPU | pb.TIER_S3
        assert len(list(c.iter_inventory(NS, tier_mask=pb.TIER_S3))) == 30
        c.register_namespace(NS, {"model": "m"})  # adopted from S3, then named by its first registration
        assert c.list_namespaces()[0].attributes == {"model": "m"}
        wait_for(lambda: c.stat(NS, key(5)).tiers & pb.TIER_DISK, what="local copy after promotion")


def test_two_daemons_writing_the_same_block_store_one_object(make_daemon, s3_server):
    bucket = make_bucket(s3_server, "kvtier-dedup")
    a = make_daemon(s3_overrides(s3_server, bucket), name="a")
    b = make_daemon(s3_overrides(s3_server, bucket), name="b")
    put_all(a, range(10))
    put_all(b, range(10))
    for daemon in (a, b):
        with daemon.client() as c:
            wait_for(lambda c=c: c.stats().upload_backlog == 0, what="uploads")
    assert len(objects(s3_server, bucket)) == 10
    with a.client() as ca, b.client() as cb:
        uploaded = ca.stats().tiers[2].writes + cb.stats().tiers[2].writes
        assert uploaded >= 10  # each block stored once; the other writer found it already there


def test_outage_local_puts_continue_backlog_grows_then_drains(make_daemon, s3_server):
    bucket = make_bucket(s3_server, "kvtier-outage")
    metrics = f"127.0.0.1:{free_port()}"
    daemon = make_daemon(s3_overrides(s3_server, bucket, **{"metrics.listen": metrics}))
    s3_server.pause()
    try:
        put_all(daemon, range(40))  # must not block on S3
        with daemon.client() as c:
            wait_for(lambda: not c.stats().s3_reachable, what="outage noticed")
            assert c.stats().upload_backlog == 40
            assert c.get_blocks(NS, [key(7)]) == [payload(7)]
        outage = urllib.request.urlopen(f"http://{metrics}/metrics", timeout=5).read().decode()
        assert "kvtier_upload_backlog 40.0" in outage and "kvtier_s3_reachable 0.0" in outage
    finally:
        s3_server.resume()
    with daemon.client() as c:
        wait_for(lambda: c.stats().upload_backlog == 0, timeout=60, what="backlog drained")
        assert c.stats().s3_reachable
    text = urllib.request.urlopen(f"http://{metrics}/metrics", timeout=5).read().decode()
    assert "kvtier_upload_backlog 0.0" in text and "kvtier_s3_reachable 1.0" in text
    assert len(objects(s3_server, bucket)) == 40
    assert "S3 unreachable" in daemon.log() and "reachable again" in daemon.log()
    body = s3_server.client().get_object(Bucket=bucket, Key=sorted(objects(s3_server, bucket))[0])["Body"].read()
    assert body[:4] == b"KVTB"  # header + payload, verified on every read


def test_kill_9_with_uploads_pending_loses_nothing(make_daemon, s3_server):
    bucket = make_bucket(s3_server, "kvtier-kill")
    daemon = make_daemon(s3_overrides(s3_server, bucket))
    s3_server.pause()  # every obligation stays pending
    try:
        put_all(daemon, range(25))
        with daemon.client() as c:
            for i in range(25):  # durable on disk before the kill
                c.put_blocks(NS, [(key(i), b"", payload(i))], wait_durable=True)
        daemon.kill()
    finally:
        s3_server.resume()
    daemon.start()
    with daemon.client() as c:
        wait_for(lambda: c.stats().upload_backlog == 0, timeout=60, what="journal drained after restart")
    assert len(objects(s3_server, bucket)) == 25
    daemon.stop()
    fresh = make_daemon(s3_overrides(s3_server, bucket), name="fresh")
    with fresh.client() as c:
        wait_for(lambda: matched(c, 25) == 25, what="listing")
        assert c.get_blocks(NS, [key(i) for i in range(25)]) == [payload(i) for i in range(25)]


def test_corrupted_object_is_a_miss_not_data(make_daemon, s3_server):
    bucket = make_bucket(s3_server, "kvtier-corrupt")
    writer = make_daemon(s3_overrides(s3_server, bucket), name="w")
    put_all(writer, range(5))
    with writer.client() as c:
        wait_for(lambda: c.stats().upload_backlog == 0, what="uploads")
    writer.stop()
    raw = s3_server.client()
    victim = next(k for k in objects(s3_server, bucket) if key(2).hex() in k)
    reply = raw.get_object(Bucket=bucket, Key=victim)
    body = bytearray(reply["Body"].read())
    body[-100] ^= 0xFF
    raw.put_object(Bucket=bucket, Key=victim, Body=bytes(body), Metadata=reply["Metadata"])
    reader = make_daemon(s3_overrides(s3_server, bucket), name="r")
    with reader.client() as c:
        wait_for(lambda: matched(c, 5) == 5, what="listing")
        got = c.get_blocks(NS, [key(i) for i in range(5)])
        assert got[2] is None
        assert [g for i, g in enumerate(got) if i != 2] == [payload(i) for i in range(5) if i != 2]
        assert c.stats().quarantined == 1


def test_s3_without_a_disk_tier_is_refused(tmp_path):
    from kvtier.daemon import config
    with pytest.raises(config.ConfigError, match="s3.write_through needs disk.enabled"):
        config.load(overrides={"s3": {"enabled": True, "bucket": "b"}, "disk": {"enabled": False}})


def test_listing_adopts_no_more_than_the_catalog_bound(make_daemon, s3_server):
    bucket = make_bucket(s3_server, "kvtier-cap")
    first = make_daemon(s3_overrides(s3_server, bucket), name="a")
    put_all(first, range(30))
    with first.client() as c:
        wait_for(lambda: c.stats().upload_backlog == 0 and c.stats().tiers[2].writes == 30, what="uploads")
    first.stop()
    capped = make_daemon(s3_overrides(s3_server, bucket, **{"s3.max_catalog_blocks": 12}), name="b")
    with capped.client() as c:
        wait_for(lambda: "s3.max_catalog_blocks=12" in capped.log(), what="the cap")
        time.sleep(1.2)  # two more listing passes: still capped
        assert c.stats().blocks == 12
        assert len(list(c.iter_inventory(NS))) == 12
