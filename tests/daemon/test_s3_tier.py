"""The S3 tier through kvtierd, against a real S3 server process (moto) over HTTP on 127.0.0.1."""

from __future__ import annotations

import base64
import hashlib
import os
import random
import re
import time
import urllib.request

import grpc
import pytest

from conftest import scrape_metrics, wait_for, wait_stopped
from kvtier.daemon import mac as macs
from kvtier.proto.v1 import kvtier_pb2 as pb
from kvtier.tiers.block import BlockHeader, checksum
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


def uploaded(c, n: int) -> bool:
    """All n blocks carry the S3 bit and no upload obligation is left. Counted by the S3 bit, not by
    tiers[2].writes: a PUT whose reply timed out is retried, finds its own object, and is counted as
    "already there", not as an upload."""
    stats = c.stats()
    return stats.upload_backlog == 0 and stats.tiers[2].blocks == n


def matched(c, n: int, namespace: str = NS) -> int:
    """Lookup depth of key(0..n-1): what the node adopted from the bucket (its namespace registered)."""
    return c.lookup(namespace, [key(i) for i in range(n)]).matched


def register(c, namespace: str = NS) -> None:
    """A fresh node adopts blocks of the bucket only for the namespaces registered on it."""
    c.register_namespace(namespace, {"model": "m"})


def objects(server, bucket: str) -> list[str]:
    pages = server.client().get_paginator("list_objects_v2").paginate(Bucket=bucket)
    return [o["Key"] for page in pages for o in page.get("Contents", [])]


def put_all(daemon, blocks: range, attributes=None, namespace: str = NS):
    with daemon.client() as c:
        c.register_namespace(namespace, attributes or {"model": "m"})
        for start in range(blocks.start, blocks.stop, 10):
            c.put_blocks(namespace, [(key(i), b"", payload(i)) for i in range(start, min(start + 10, blocks.stop))])


def test_write_through_reaches_s3_and_a_fresh_node_reads_it_back(make_daemon, s3_server):
    bucket = make_bucket(s3_server, "kvtier-wt")
    first = make_daemon(s3_overrides(s3_server, bucket), name="a")
    put_all(first, range(30))
    with first.client() as c:
        wait_for(lambda: uploaded(c, 30), what="uploads")
        assert c.stat(NS, key(3)).tiers == pb.TIER_CPU | pb.TIER_DISK | pb.TIER_S3
        assert matched(c, 30) == 30
    assert len(objects(s3_server, bucket)) == 30
    first.stop()
    fresh = make_daemon(s3_overrides(s3_server, bucket), name="b")  # empty data dir, same bucket
    with fresh.client() as c:
        register(c)
        wait_for(lambda: matched(c, 30) == 30, what="listing")
        assert c.stat(NS, key(5)).tiers == pb.TIER_S3
        assert c.get_blocks(NS, [key(i) for i in range(30)]) == [payload(i) for i in range(30)]
        assert c.stat(NS, key(5)).tiers & (pb.TIER_CPU | pb.TIER_S3) == pb.TIER_CPU | pb.TIER_S3
        assert len(list(c.iter_inventory(NS, tier_mask=pb.TIER_S3))) == 30
        assert [(n.name, dict(n.attributes)) for n in c.list_namespaces()] == [(NS, {"model": "m"})]
        wait_for(lambda: c.stat(NS, key(5)).tiers & pb.TIER_DISK, what="local copy after promotion")


_LOGGED_PUT = re.compile(r'"(?:\x1b\[[0-9;]*m)*PUT /([^ ]+) HTTP/[0-9.]+(?:\x1b\[[0-9;]*m)*" (\d{3})')


def logged_puts(server, since: int, bucket: str) -> dict[str, list[int]]:
    """The S3 server's own request log from byte `since` on: object key -> HTTP status of each PUT."""
    with open(server.log_path, "rb") as file:
        file.seek(since)
        text = file.read().decode(errors="replace")
    puts: dict[str, list[int]] = {}
    for path, status in _LOGGED_PUT.findall(text):
        name, _, okey = path.partition("/")
        if name == bucket and okey:
            puts.setdefault(okey, []).append(int(status))
    return puts


def test_two_daemons_writing_the_same_block_store_one_object(make_daemon, s3_server):
    bucket = make_bucket(s3_server, "kvtier-dedup")
    since = os.path.getsize(s3_server.log_path)
    metrics = {name: f"127.0.0.1:{free_port()}" for name in "ab"}
    a, b = (make_daemon(s3_overrides(s3_server, bucket, **{"metrics.listen": metrics[name]}), name=name)
            for name in "ab")
    # Both nodes hold all 10 blocks before either can upload (S3 hung meanwhile), so both PUT every
    # key: the race dedup is for. The PUTs that time out while S3 is hung land on resume and are
    # retried: exactly the case where the writer itself cannot tell "mine" from "someone else's".
    s3_server.pause()
    try:
        wait_stopped(s3_server.proc.pid)
        put_all(a, range(10))
        put_all(b, range(10))
    finally:
        s3_server.resume()
    for daemon in (a, b):
        with daemon.client() as c:
            wait_for(lambda c=c: uploaded(c, 10), what=f"uploads of {daemon.log_path.stem}")
    blocks = objects(s3_server, bucket)
    assert len(blocks) == 10
    # What dedup means, from the server's side: every object was written exactly once (one PUT answered
    # 2xx), and every other PUT of it, the other node's as well as any retry, was refused (412) by
    # If-None-Match. The server's log line may trail its answer: wait for both nodes' PUTs of each.
    def both_nodes_logged():
        puts = logged_puts(s3_server, since, bucket)
        return puts if all(len(puts.get(okey, [])) >= 2 for okey in blocks) else None
    puts = wait_for(both_nodes_logged, what="both nodes' PUTs of every object in the S3 log")
    for okey in blocks:
        assert sum(200 <= status < 300 for status in puts[okey]) == 1, f"{okey} written {puts[okey]}"
        assert all(200 <= status < 300 or status == 412 for status in puts[okey]), f"{okey}: {puts[okey]}"
    # And from the nodes' side: for every key at least one node was told "already there" (a node
    # counts an upload only when its own PUT got the 2xx, and there is one per key).
    told = [scrape_metrics(metrics[name]) for name in "ab"]
    assert sum(m["kvtier_s3_already_there_total"] for m in told) >= 10
    assert sum(m["kvtier_s3_uploads_total"] for m in told) <= 10


def test_outage_local_puts_continue_backlog_grows_then_drains(make_daemon, s3_server):
    bucket = make_bucket(s3_server, "kvtier-outage")
    metrics = f"127.0.0.1:{free_port()}"
    daemon = make_daemon(s3_overrides(s3_server, bucket, **{"metrics.listen": metrics}))
    s3_server.pause()
    try:
        put_all(daemon, range(40))  # must not block on S3
        with daemon.client() as c:
            # Every put journaled its upload, and nothing drains while S3 hangs.
            def noticed():
                stats = c.stats()
                return not stats.s3_reachable and stats.upload_backlog == 40
            wait_for(noticed, what="the outage noticed with all 40 uploads waiting")
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
        register(c)
        wait_for(lambda: matched(c, 25) == 25, what="listing")
        assert c.get_blocks(NS, [key(i) for i in range(25)]) == [payload(i) for i in range(25)]


def test_corrupted_object_is_a_miss_not_data(make_daemon, s3_server):
    bucket = make_bucket(s3_server, "kvtier-corrupt")
    writer = make_daemon(s3_overrides(s3_server, bucket), name="w")
    put_all(writer, range(5))
    with writer.client() as c:
        wait_for(lambda: uploaded(c, 5), what="uploads")
    writer.stop()
    raw = s3_server.client()
    victim = next(k for k in objects(s3_server, bucket) if key(2).hex() in k)
    reply = raw.get_object(Bucket=bucket, Key=victim)
    body = bytearray(reply["Body"].read())
    body[-100] ^= 0xFF
    raw.put_object(Bucket=bucket, Key=victim, Body=bytes(body), Metadata=reply["Metadata"])
    reader = make_daemon(s3_overrides(s3_server, bucket), name="r")
    with reader.client() as c:
        register(c)
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
        wait_for(lambda: uploaded(c, 30), what="uploads")
    first.stop()
    metrics = f"127.0.0.1:{free_port()}"
    capped = make_daemon(s3_overrides(s3_server, bucket, **{"s3.max_catalog_blocks": 12, "metrics.listen": metrics}),
                         name="b")
    with capped.client() as c:
        register(c)
        wait_for(lambda: "s3.max_catalog_blocks=12" in capped.log(), what="the cap")
        passes = scrape_metrics(metrics)["kvtier_s3_adoption_capped_total"]
        # Two more listing passes, each stopped at the cap again, counted by the daemon itself.
        wait_for(lambda: scrape_metrics(metrics)["kvtier_s3_adoption_capped_total"] >= passes + 2,
                 what="two more capped listing passes")
        assert c.stats().blocks == 12
        assert len(list(c.iter_inventory(NS))) == 12


def object_key(namespace: str, k: bytes, prefix: str = "kvtier") -> str:
    """The documented object key (docs/s3-format.md), computed here on its own."""
    h = hashlib.sha256(namespace.encode() + b"\0" + k).hexdigest()
    return f"{prefix}/{h[:2]}/{h[2:4]}/{hashlib.sha256(namespace.encode()).hexdigest()[:32]}/{k.hex()}"


def test_the_bucket_never_registers_a_namespace_and_adopted_blocks_get_the_local_default(make_daemon, s3_server):
    bucket = make_bucket(s3_server, "kvtier-registry")
    writer = make_daemon(s3_overrides(s3_server, bucket), name="w")
    put_all(writer, range(6))
    put_all(writer, range(4), namespace="elsewhere")
    with writer.client() as c:
        wait_for(lambda: uploaded(c, 10), what="uploads")
    writer.stop()
    metrics = f"127.0.0.1:{free_port()}"
    reader = make_daemon(s3_overrides(s3_server, bucket, **{"metrics.listen": metrics, "limits.max_namespaces": 2}),
                         name="r")
    with reader.client() as c:
        register(c)
        wait_for(lambda: matched(c, 6) == 6, what="the registered namespace's blocks adopted")
        # All 10 objects are on one LIST page, so the pass that adopted NS's 6 saw the other 4 and
        # left them alone: no namespace appeared, nothing of it is in the catalog.
        assert [n.name for n in c.list_namespaces()] == [NS]
        assert c.stats().blocks == 6 and scrape_metrics(metrics)["kvtier_s3_adopted_total"] == 6
        with pytest.raises(grpc.RpcError) as err:
            c.lookup("elsewhere", [key(0)])
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        # An adopted block has no retention of its own: the policy's default, like a block put here
        # without one (an object carries none; the bucket cannot pin this node's memory).
        c.put_blocks(NS, [(key(100), b"", payload(100))])
        adopted, local = c.stat(NS, key(1)), c.stat(NS, key(100))
        assert not adopted.HasField("retention") and adopted.retention == local.retention
        assert c.get_blocks(NS, [key(1)]) == [payload(1)]
        assert not c.stat(NS, key(1)).HasField("retention")
        # Registered here (within limits.max_namespaces), the namespace's blocks follow.
        register(c, "elsewhere")
        wait_for(lambda: matched(c, 4, "elsewhere") == 4, what="adopted once registered")
        assert scrape_metrics(metrics)["kvtier_s3_adopted_total"] == 10


def forge(s3_server, bucket: str, k: bytes, data: bytes, mac_key: bytes | None = None,
          namespace: str = NS, wrong_block_mac: bool = False) -> str:
    """Writes a well-formed block object (header, payload, its checksum, the header metadata) the way
    anyone with write access to the bucket can; with mac_key, MACs under that key (wrong_block_mac:
    a valid header MAC over a block MAC that does not match the bytes). Returns the object key."""
    header = BlockHeader(namespace, k, b"", len(data), checksum(data), int(time.time() * 1000))
    encoded = header.encode()
    metadata = {"kvtier-header": base64.b64encode(encoded).decode()}
    if mac_key is not None:
        block_mac = macs.block_mac(mac_key, namespace, k, data + b"x" if wrong_block_mac else data)
        metadata["kvtier-mac"] = block_mac.hex()
        metadata["kvtier-header-mac"] = macs.header_mac(mac_key, encoded, block_mac).hex()
    okey = object_key(namespace, k)
    s3_server.client().put_object(Bucket=bucket, Key=okey, Body=encoded + data, Metadata=metadata)
    return okey


def key_file(tmp_path, name: str) -> tuple[str, bytes]:
    path, secret = tmp_path / name, os.urandom(32)
    path.write_bytes(secret)
    path.chmod(0o600)
    return str(path), secret


def test_with_a_cluster_key_objects_without_a_valid_mac_are_refused_and_counted(make_daemon, s3_server, tmp_path):
    bucket = make_bucket(s3_server, "kvtier-mac")
    path, secret = key_file(tmp_path, "cluster.key")
    writer = make_daemon(s3_overrides(s3_server, bucket, **{"cluster.key_file": path}), name="w")
    put_all(writer, range(6))
    with writer.client() as c:
        wait_for(lambda: uploaded(c, 6), what="uploads")
    writer.stop()
    raw = s3_server.client()
    for i in range(6):  # every upload carries both MACs, and they are right
        meta = raw.head_object(Bucket=bucket, Key=object_key(NS, key(i)))["Metadata"]
        block_mac = macs.block_mac(secret, NS, key(i), payload(i))
        assert meta["kvtier-mac"] == block_mac.hex()
        assert meta["kvtier-header-mac"] == macs.header_mac(
            secret, base64.b64decode(meta["kvtier-header"]), block_mac).hex()
    # A bucket writer replaces two blocks and plants two more: well-formed objects whose payload
    # matches its checksum, with no MAC or with MACs under a key of its own.
    other = os.urandom(32)
    forged = {2: forge(s3_server, bucket, key(2), payload(1002)),
              3: forge(s3_server, bucket, key(3), payload(1003), mac_key=other),
              7: forge(s3_server, bucket, key(7), payload(1007)),
              8: forge(s3_server, bucket, key(8), payload(1008), mac_key=other)}
    metrics = f"127.0.0.1:{free_port()}"
    reader = make_daemon(s3_overrides(s3_server, bucket, **{"cluster.key_file": path, "metrics.listen": metrics}),
                         name="r")
    counted = lambda: scrape_metrics(metrics)  # noqa: E731
    with reader.client() as c:
        register(c)
        wait_for(lambda: counted()["kvtier_s3_adopted_total"] == 4 and counted()["kvtier_s3_mac_rejected_total"] == 4,
                 what="4 blocks adopted and 4 objects refused")
        assert [i for i in range(9) if matched_one(c, i)] == [0, 1, 4, 5]
        # The download checks the MAC over the bytes too: an adopted object whose block MAC is then
        # replaced (its header MAC still valid, its bytes and checksum the real ones) is not served.
        forged[5] = forge(s3_server, bucket, key(5), payload(5), mac_key=secret, wrong_block_mac=True)
        got = c.get_blocks(NS, [key(i) for i in range(9)])
        assert got == [payload(0), payload(1), None, None, payload(4), None, None, None, None]
        assert counted()["kvtier_s3_mac_rejected_total"] == 5
        assert [i for i in range(9) if matched_one(c, i)] == [0, 1, 4]  # 5 left the catalog
        # A valid block planted now is adopted by a later pass, one that went over every refused
        # object again: none of them was adopted, counted or logged a second time.
        forge(s3_server, bucket, key(9), payload(9), mac_key=secret)
        wait_for(lambda: matched_one(c, 9), what="a later listing pass")
        assert c.get_blocks(NS, [key(9)]) == [payload(9)]
        assert counted()["kvtier_s3_mac_rejected_total"] == 5
        assert counted()["kvtier_s3_adopted_total"] == 5
        assert [i for i in range(10) if matched_one(c, i)] == [0, 1, 4, 9]
    log = reader.log()
    for i, okey in forged.items():
        lines = [line for line in log.splitlines() if f"S3 object {okey} " in line and "refused" in line]
        assert len(lines) == 1, f"object {i}: {lines}"
        assert "WARNING" in lines[0]
    assert "no valid kvtier-mac" in log and "wrong header MAC" in log and "wrong MAC over the payload" in log


def matched_one(c, i: int) -> bool:
    return c.lookup(NS, [key(i)]).matched == 1


# ---- a tenant's s3_capacity ---------------------------------------------------------------------

QUOTA_TENANTS = [{"name": "a", "uids": [40011], "cpu_capacity": "4MiB", "s3_capacity": 3 * 20_000},
                 {"name": "b", "uids": [40012], "cpu_capacity": "4MiB"}]


def in_s3(c, namespace: str, n: int) -> list[int]:
    """Which of key(0..n-1) of `namespace` the node has in S3 (the catalog's S3 bit)."""
    found = []
    for i in range(n):
        try:
            found += [i] if c.stat(namespace, key(i)).tiers & pb.TIER_S3 else []
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.NOT_FOUND, exc  # not on this node at all
    return found


def put_streamed(daemon, blocks: range, namespace: str) -> None:
    """Stores blocks with Put, as an administrator does in a tenant's namespace (its arena part is
    the tenant's: the administrators' allocations cannot commit there)."""
    with daemon.client() as c:
        c.register_namespace(namespace, {"model": "m"})
        for i in blocks:
            assert c.put(namespace, key(i), payload(i)) == pb.STORED


def bucket_objects(server, bucket: str, namespace: str) -> int:
    digest = hashlib.sha256(namespace.encode()).hexdigest()[:32]
    return sum(1 for okey in objects(server, bucket) if okey.split("/")[3] == digest)


def test_a_tenants_s3_quota_refuses_its_uploads_only_and_holds_across_a_restart(make_daemon, s3_server):
    bucket = make_bucket(s3_server, "kvtier-s3-quota")
    metrics = f"127.0.0.1:{free_port()}"
    node = make_daemon(s3_overrides(s3_server, bucket, **{"metrics.listen": metrics, "tenant": QUOTA_TENANTS}))
    refused = lambda: scrape_metrics(metrics)["kvtier_tenant_s3_refused_total"]  # noqa: E731
    put_streamed(node, range(8), "a/m")  # 8 blocks of 20 kB: a's quota holds 3
    put_streamed(node, range(8), "b/m")  # b has no quota of its own
    with node.client() as c:
        wait_for(lambda: c.stats().upload_backlog == 0 and refused() == 5, what="a's uploads refused, b's done")
        assert len(in_s3(c, "a/m", 8)) == 3 and in_s3(c, "b/m", 8) == list(range(8))
        assert all(c.stat("a/m", key(i)).tiers & pb.TIER_DISK for i in range(8))  # refused: on disk only
        assert all(c.get("a/m", key(i))[1] == payload(i) for i in range(8))
    assert bucket_objects(s3_server, bucket, "a/m") == 3 and bucket_objects(s3_server, bucket, "b/m") == 8
    assert node.log().count("blocks not uploaded to S3") == 1  # one line a minute, not five
    assert "tenant a: 1 blocks not uploaded to S3 (kept on disk only)" in node.log()
    assert "its s3_capacity is 60000" in node.log()
    # After a restart the count comes from listing the bucket: a's next upload is refused, b's is not.
    assert node.stop() == 0
    node.start()
    put_streamed(node, range(8, 9), "a/m")
    put_streamed(node, range(8, 9), "b/m")
    with node.client() as c:
        wait_for(lambda: c.stats().upload_backlog == 0 and refused() == 1, what="a's next upload refused")
        assert len(in_s3(c, "a/m", 9)) == 3 and in_s3(c, "b/m", 9) == list(range(9))
    assert bucket_objects(s3_server, bucket, "a/m") == 3 and bucket_objects(s3_server, bucket, "b/m") == 9
    # Deleting a's blocks in S3 makes room for as many again: a block committed after that is uploaded.
    with node.client() as c:
        first = in_s3(c, "a/m", 9)[0]
        assert c.delete("a/m", [key(first)]).deleted == 1
    put_streamed(node, range(9, 10), "a/m")
    with node.client() as c:
        wait_for(lambda: c.stat("a/m", key(9)).tiers & pb.TIER_S3, what="a's upload after a delete")
        assert refused() == 1
        a_in_s3 = in_s3(c, "a/m", 10)
    assert bucket_objects(s3_server, bucket, "a/m") == 3
    # Another node of the cluster (a fresh data dir, the same bucket) counts a's objects that this one
    # uploaded once its listing adopts them; a namespace registered there after its start is listed
    # before a's uploads go. So a's block is refused there too, and b's is uploaded.
    assert node.stop() == 0
    other_metrics = f"127.0.0.1:{free_port()}"
    other = make_daemon(s3_overrides(s3_server, bucket, **{"metrics.listen": other_metrics,
                                                           "tenant": QUOTA_TENANTS}), name="other")
    put_streamed(other, range(10, 11), "a/m")
    put_streamed(other, range(10, 11), "b/m")
    with other.client() as c:
        wait_for(lambda: c.stats().upload_backlog == 0
                 and scrape_metrics(other_metrics)["kvtier_tenant_s3_refused_total"] == 1,
                 what="a's upload refused on the other node")
        assert in_s3(c, "a/m", 11) == a_in_s3 and c.stat("b/m", key(10)).tiers & pb.TIER_S3
    assert bucket_objects(s3_server, bucket, "a/m") == 3 and bucket_objects(s3_server, bucket, "b/m") == 10


def test_s3_capacity_parses_as_a_size_and_needs_s3_write_through():
    from kvtier.daemon import config
    tenant = {"name": "a", "uids": [40011]}
    s3 = {"enabled": True, "bucket": "b"}
    assert config.load(overrides={"s3": s3, "tenant": [{**tenant, "s3_capacity": "2TiB"}]}).tenant[0].s3_capacity \
        == 2 << 40
    assert config.load(overrides={"tenant": [tenant]}).tenant[0].s3_capacity == 0  # no quota of its own
    with pytest.raises(config.ConfigError, match=r"tenant\[0\] \(a\): s3_capacity .* needs s3.enabled and "
                                                 r"s3.write_through"):
        config.load(overrides={"tenant": [{**tenant, "s3_capacity": "1GiB"}]})
    with pytest.raises(config.ConfigError, match=r"tenant\[0\] \(a\): s3_capacity .* needs s3.enabled"):
        config.load(overrides={"s3": {**s3, "write_through": False}, "tenant": [{**tenant, "s3_capacity": 1}]})
    with pytest.raises(config.ConfigError, match=r"tenant\[0\].s3_capacity: must not be negative"):
        config.load(overrides={"s3": s3, "tenant": [{**tenant, "s3_capacity": -1}]})
    with pytest.raises(config.ConfigError, match=r"tenant\[0\].s3_capacity: expected a size"):
        config.load(overrides={"s3": s3, "tenant": [{**tenant, "s3_capacity": "lots"}]})
    with pytest.raises(config.ConfigError, match=r"s3_capacity must be at most 1PiB"):
        config.load(overrides={"s3": s3, "tenant": [{**tenant, "s3_capacity": "2048TiB"}]})


def test_a_tenants_uploads_wait_until_a_listing_has_counted_its_objects(tmp_path, s3_server):
    """In-process, with the listing held back at will. After a restart, and after one of its
    namespaces is newly registered, the node does not know what the bucket holds of the tenant until
    a listing pass has counted it: the tenant's uploads wait for that pass and are then checked
    against what it found, its own objects (on disk here) and another node's (adopted) alike. Other
    uploads go on meanwhile."""
    import asyncio
    import threading

    from kvtier.tiers.s3 import S3Config
    from store_harness import FaultyS3, blob, commit, key_of, make_store, store_config, until

    class HeldListing(FaultyS3):
        def __init__(self, cfg):
            super().__init__(cfg)
            self.listing = threading.Event()
            self.listing.set()

        def list_keys(self, *args, **kwargs):
            assert self.listing.wait(60), "listing never let through"
            return super().list_keys(*args, **kwargs)

    bucket = make_bucket(s3_server, "kvtier-quota-listing")
    quota = 2 * len(blob(33))
    cfg = store_config(tmp_path, s3_server.endpoint_url, bucket,
                       tenants=[{"name": "t", "uids": [40200], "s3_capacity": quota}])

    def tier() -> HeldListing:
        return HeldListing(S3Config(endpoint_url=s3_server.endpoint_url, bucket=bucket, connect_timeout_s=1.0,
                                    read_timeout_s=5.0, max_attempts=1))

    def in_s3(store, namespace: str, seed: int) -> bool:
        block = store.catalog.get(namespace, key_of(seed))
        return block is not None and bool(block.tiers & pb.TIER_S3)

    async def scenario():
        store = make_store(cfg, s3_tier=tier())
        await store.start()
        await store.register_namespace("t/ns", {})
        await store.register_namespace("ns", {})
        await commit(store, "t/ns", [33, 34])
        await until(lambda: in_s3(store, "t/ns", 33) and in_s3(store, "t/ns", 34), "t's two uploads")
        assert store.s3sync.tenant_bytes["t"] == quota
        store.check_invariants()
        await store.close(5)

        # Restarted: t's blocks are on disk, the count of what S3 holds of them comes from the listing.
        held = tier()
        held.listing.clear()
        store = make_store(cfg, s3_tier=held)
        await store.start()
        assert store.s3sync.tenant_bytes["t"] == 0  # nothing counted before a listing
        await commit(store, "t/ns", [35])
        await commit(store, "ns", [1])
        await until(lambda: in_s3(store, "ns", 1) and store.disk.upload_backlog() == 1,
                    "the other namespace's upload settled")
        assert not in_s3(store, "t/ns", 35)  # t's upload waits, still owed
        assert store.counters.tenant_s3_refused == 0
        held.listing.set()
        await until(lambda: store.counters.tenant_s3_refused == 1 and store.disk.upload_backlog() == 0,
                    "t's upload refused once the listing counted its two blocks")
        assert store.s3sync.tenant_bytes["t"] == quota and not in_s3(store, "t/ns", 35)

        # A delete makes room for one block; another node meanwhile uploads one of t's blocks into a
        # namespace this node registers only now: that object is counted before t uploads again.
        assert await store.delete("t/ns", [key_of(34)]) == (1, 0)
        assert store.s3sync.tenant_bytes["t"] == quota // 2
        other = len(blob(36))
        header = BlockHeader("t/new", key_of(36), b"", other, checksum(blob(36)), int(time.time() * 1000))
        assert held.upload(header, blob(36)) == "stored"
        held.listing.clear()
        await store.register_namespace("t/new", {})
        await commit(store, "t/new", [37])
        await commit(store, "ns", [2])
        await until(lambda: in_s3(store, "ns", 2) and store.disk.upload_backlog() == 1,
                    "the other namespace's upload settled")
        assert not in_s3(store, "t/new", 37) and store.counters.tenant_s3_refused == 1  # waiting, not refused
        held.listing.set()
        await until(lambda: store.counters.tenant_s3_refused == 2 and store.disk.upload_backlog() == 0,
                    "t's upload refused once the listing adopted the other node's object")
        assert in_s3(store, "t/new", 36) and not in_s3(store, "t/new", 37)
        assert store.s3sync.tenant_bytes["t"] == quota
        store.check_invariants()
        await store.close(5)
        assert not store.fatals

    asyncio.run(scenario())
    assert bucket_objects(s3_server, bucket, "t/ns") == 1 and bucket_objects(s3_server, bucket, "t/new") == 1
