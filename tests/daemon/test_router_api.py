"""What a KV-aware router uses: FindMatches (depth per tier) and Snapshot + Watch for a warm restart."""

from __future__ import annotations

NS = "router-ns"


def key(i: int) -> bytes:
    return bytes([i + 1]) * 32


def test_find_matches_reports_the_depth_on_each_tier(make_daemon):
    daemon = make_daemon({"cpu.capacity": "512KiB"})  # 8 CPU slots
    with daemon.client() as c:
        c.register_namespace(NS)
        for i in range(6):
            c.put_blocks(NS, [(key(i), key(i - 1) if i else b"", bytes([i]) * 1000)], wait_durable=True)
        for i in range(20, 30):  # push the chain out of the CPU tier (it stays on disk)
            c.put_blocks(NS, [(key(i), b"", b"x" * 1000)], wait_durable=True)
        c.release(c.acquire(NS, [key(0), key(1), key(2)]).id)  # promote the first three back
        depth = c.find_matches(NS, [key(i) for i in range(8)])
        assert (depth.any, depth.cpu, depth.disk, depth.gpu, depth.s3) == (6, 3, 6, 0, 0)
        assert c.lookup(NS, [key(i) for i in range(8)]).matched == depth.any


def test_snapshot_then_watch_misses_nothing(make_daemon):
    daemon = make_daemon()
    with daemon.client() as c:
        c.register_namespace(NS)
        c.register_namespace("other")
        c.put_blocks(NS, [(key(i), b"", b"a" * 100) for i in range(5)], wait_durable=True)
        c.put_blocks("other", [(key(0), b"", b"b" * 100)], wait_durable=True)
        seq, blocks = c.snapshot(NS)
        assert seq == c.stats().event_seq
        assert sorted(b.key for b in blocks) == [key(i) for i in range(5)]
        assert {b.namespace for b in blocks} == {NS}
        assert len(c.snapshot()[1]) == 6
        c.put_blocks(NS, [(key(9), b"", b"c" * 100)])
        stream = c.watch(from_seq=seq + 1)
        first = next(iter(stream))
        stream.cancel()
        assert first.seq == seq + 1 and first.key == key(9)
