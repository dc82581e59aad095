"""Durability: blocks on disk survive SIGTERM and kill -9; torn or corrupt records are never served."""

from __future__ import annotations

import multiprocessing
import os
import random

from conftest import wait_for
from kvtier.client import Client
from kvtier.proto.v1 import kvtier_pb2 as pb

NS = "test-ns"


def key(i: int) -> bytes:
    return i.to_bytes(8, "little") + b"\x5a" * 24


def payload(i: int, size: int = 20_000) -> bytes:
    return i.to_bytes(8, "little") + random.Random(i).randbytes(size - 8)


def test_sigterm_drains_the_write_through_and_restart_readopts(make_daemon):
    daemon = make_daemon()
    with daemon.client() as c:
        c.register_namespace(NS, {"model": "tiny"})
        for start in range(0, 200, 20):
            c.put_blocks(NS, [(key(i), b"", payload(i)) for i in range(start, start + 20)])  # not durable yet
    assert daemon.stop() == 0
    assert "kvtierd stopped" in daemon.log()
    daemon.start()
    with daemon.client() as c:
        stats = c.stats()
        assert stats.blocks == 200
        assert c.lookup(NS, [key(i) for i in range(200)]).matched == 200
        got = c.get_blocks(NS, [key(i) for i in range(200)])
        assert got == [payload(i) for i in range(200)]
        assert c.stat(NS, key(7)).tiers == pb.TIER_CPU | pb.TIER_DISK  # promoted back on read
        assert c.list_namespaces()[0].attributes == {"model": "tiny"}
    assert "recovery:" in daemon.log()


def test_corrupted_block_is_quarantined_and_served_as_a_miss(make_daemon):
    daemon = make_daemon()
    with daemon.client() as c:
        c.register_namespace(NS)
        c.put_blocks(NS, [(key(i), b"", payload(i)) for i in range(10)], wait_durable=True)
    daemon.stop()
    daemon.flip_on_disk(payload(4), at=5000)
    daemon.start()
    with daemon.client() as c:
        got = c.get_blocks(NS, [key(i) for i in range(10)])
        assert got[4] is None
        assert [g for i, g in enumerate(got) if i != 4] == [payload(i) for i in range(10) if i != 4]
        assert c.stats().quarantined == 1
        assert c.lookup(NS, [key(4)]).matched == 0
        assert c.put_blocks(NS, [(key(4), b"", payload(4))], wait_durable=True) == [pb.STORED]  # heals
        assert c.get_blocks(NS, [key(4)]) == [payload(4)]
    assert "quarantined" in daemon.log()


def _writer(socket: str, start: int, durable_log: str) -> None:
    """Puts blocks forever; appends each key index to durable_log once the daemon says it is on disk."""
    with Client(socket) as c, open(durable_log, "a") as out:
        i = start
        while True:
            batch = list(range(i, i + 8))
            try:
                c.put_blocks(NS, [(key(n), b"", payload(n)) for n in batch], wait_durable=True)
            except Exception:  # noqa: BLE001 - the daemon was killed under us
                return
            out.write("".join(f"{n}\n" for n in batch))
            out.flush()
            os.fsync(out.fileno())
            i += 8


def _durable_count(path: str) -> int:
    try:
        with open(path) as file:
            return sum(1 for line in file if line.strip())
    except FileNotFoundError:
        return 0


def test_kill_9_at_random_points_loses_nothing_reported_durable(make_daemon, tmp_path):
    daemon = make_daemon({"disk.segment_bytes": "1MiB", "disk.capacity": "256MiB", "disk.batch_blocks": 4})
    durable_log = str(tmp_path / "durable.txt")
    rng = random.Random(7)
    next_key = 0
    for round_ in range(5):
        with daemon.client() as c:
            c.register_namespace(NS)
        writer = multiprocessing.get_context("spawn").Process(
            target=_writer, args=(daemon.socket, next_key, durable_log))
        # The kill's "random point" is a point in the writer's progress, not a wall-clock delay (the
        # spawned writer alone needs a second or more to import): kill -9 once it has been told that
        # a random number of batches is durable, while it keeps putting more.
        batches = rng.randint(2, 60)
        target = _durable_count(durable_log) + 8 * batches
        writer.start()
        wait_for(lambda: _durable_count(durable_log) >= target or writer.exitcode is not None, timeout=120,
                 what=f"{batches} durable batches from the writer (round {round_})")
        assert writer.exitcode is None, f"the writer stopped before the kill (round {round_}): {daemon.log()[-3000:]}"
        daemon.kill()
        writer.join(60)
        assert writer.exitcode == 0
        next_key += 100_000
        daemon.start()
        durable = [int(line) for line in open(durable_log) if line.strip()]
        assert len(durable) >= target, "the writer's durable log lost lines"
        with daemon.client() as c:
            for start in range(0, len(durable), 64):
                keys = durable[start:start + 64]
                assert c.get_blocks(NS, [key(n) for n in keys]) == [payload(n) for n in keys], f"round {round_}"
            blocks = list(c.iter_inventory(NS, page_size=1000))
            # Every indexed block verifies (no torn record is ever served).
            for start in range(0, len(blocks), 64):
                chunk = blocks[start:start + 64]
                got = c.get_blocks(NS, [b.key for b in chunk])
                assert all(g is not None for g in got)
                assert [g[:8] for g in got] == [b.key[:8] for b in chunk]
            assert c.stats().quarantined == 0
