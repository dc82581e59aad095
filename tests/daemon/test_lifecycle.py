"""The block lifecycle under faults, in-process over real files, LMDB and a real S3 server: one test
per way the store used to lose, wedge or mis-serve blocks (each failed on the store before its
lifecycle was rebuilt)."""

from __future__ import annotations

import asyncio
import errno
import math
import sys
import threading

import pytest

from kvtier.daemon.errors import ApiError, ErrorKind
from kvtier.daemon.store import READER, UPLOAD
from kvtier.proto.v1 import kvtier_pb2 as pb
from kvtier.tiers.retention import Retention
from kvtier.tiers.s3 import S3Config

from s3server import make_bucket, s3_server  # noqa: F401
from store_harness import FaultyFs, FaultyS3, blob, commit, key_of, make_store, read, store_config, until

CPU, DISK, S3 = pb.TIER_CPU, pb.TIER_DISK, pb.TIER_S3


def run(coro):
    asyncio.run(coro)


def faulty_s3(server, bucket: str) -> FaultyS3:
    return FaultyS3(S3Config(endpoint_url=server.endpoint_url, bucket=bucket, connect_timeout_s=1.0,
                             read_timeout_s=5.0, max_attempts=1))


def test_a_modified_block_under_a_reader_lease_does_not_stop_write_through(tmp_path):
    async def scenario():
        store = make_store(store_config(tmp_path))
        await store.start()
        await store.register_namespace("ns", {})
        await commit(store, "ns", [1])
        held, found = await store.acquire("ns", [key_of(1)], 5000)  # a reader holds it
        store.arena.view(store.cpu.slot_of(found[0]))[7] ^= 0xFF     # then its bytes change
        with pytest.raises(ApiError, match="modified"):
            await store._wait_durable([found[0]])
        assert store.catalog.get("ns", key_of(1)) is None and store.counters.quarantined == 1
        store.release(held.id)                                      # the retired slot comes back
        assert await commit(store, "ns", [2], wait_durable=True) == [pb.STORED]
        assert await read(store, "ns", 2) == blob(2)
        store.check_invariants()
        assert not store.fatals and all(not t.done() for t in store._tasks)
        await store.close(5)
    run(scenario())


def test_duplicate_of_a_block_not_yet_durable_waits_for_its_durability(tmp_path):
    async def scenario():
        fs = FaultyFs()
        store = make_store(store_config(tmp_path), fs=fs)
        await store.start()
        await store.register_namespace("ns", {})
        fs.gate["fdatasync"] = threading.Event()                    # the disk is slow
        await commit(store, "ns", [5])                              # first copy: CPU only
        duplicate = asyncio.ensure_future(commit(store, "ns", [5], wait_durable=True))
        await until(lambda: fs.calls.get("fdatasync", 0) >= 1, "the write-through to reach fdatasync")
        await asyncio.sleep(0)
        assert not duplicate.done(), "DUPLICATE acknowledged as durable while the block is only in memory"
        fs.gate["fdatasync"].set()
        assert await duplicate == [pb.DUPLICATE]
        assert store.catalog.get("ns", key_of(5)).tiers & DISK
        await store.close(5)
    run(scenario())


def test_wait_durable_is_bounded_while_the_disk_fails(tmp_path):
    async def scenario():
        fs = FaultyFs()
        store = make_store(store_config(tmp_path, disk={"durable_wait_ms": 300}), fs=fs)
        await store.start()
        await store.register_namespace("ns", {})
        fs.fail["pwritev"] = errno.ENOSPC
        with pytest.raises(ApiError) as caught:
            await commit(store, "ns", [1], wait_durable=True)
        assert caught.value.kind is ErrorKind.UNAVAILABLE and "durable" in caught.value.message
        assert store.counters.durable_timeouts == 1
        del fs.fail["pwritev"]
        await until(lambda: store.backlog == 0, "the backlog to drain once the disk works")
        assert store.catalog.get("ns", key_of(1)).tiers & DISK
        assert not store.fatals
        await store.close(5)
    run(scenario())


def test_write_through_stuck_is_reported_as_a_problem(tmp_path, monkeypatch):
    monkeypatch.setattr("kvtier.daemon.store.STUCK_AFTER_S", 0.0)
    async def scenario():
        fs = FaultyFs()
        store = make_store(store_config(tmp_path), fs=fs)
        await store.start()
        await store.register_namespace("ns", {})
        assert store.problem() is None
        fs.fail["fdatasync"] = errno.EIO
        await commit(store, "ns", [1])
        await until(lambda: store.problem() is not None, "the stuck write-through to be reported")
        assert "write-through" in store.problem()
        del fs.fail["fdatasync"]
        await until(lambda: store.problem() is None, "recovery of the write-through")
        await store.close(5)
    run(scenario())


def test_a_batch_that_fails_after_evicting_reports_the_evicted_blocks(tmp_path):
    """Disk capacity of 2 segments: the third segment's batch evicts the oldest, then its write fails."""
    async def scenario():
        fs = FaultyFs()
        cfg = store_config(tmp_path, cpu={"capacity": "4MiB"},
                           disk={"capacity": "8MiB", "segment_bytes": "4MiB", "batch_blocks": 1})
        store = make_store(cfg, fs=fs)
        await store.start()
        await store.register_namespace("ns", {})
        seed = 0
        while store.counters.disk_evictions == 0 and seed < 2000:   # fill until the disk evicts once
            seed += 1
            await commit(store, "ns", [seed], wait_durable=True)
        assert store.counters.disk_evictions, "the disk tier never evicted"
        fs.fail["pwritev"] = errno.EIO
        evictions = store.counters.disk_evictions
        while store.counters.disk_evictions == evictions:           # a failing batch that evicts first
            seed += 1
            await commit(store, "ns", [seed])
            await until(lambda: store.counters.disk_write_errors or store.counters.disk_evictions > evictions,
                        "a failed batch")
            if store.counters.disk_write_errors and store.counters.disk_evictions == evictions:
                break
        del fs.fail["pwritev"]
        await until(lambda: store.backlog == 0, "the backlog to drain")
        for ns in store.catalog.namespaces.values():               # the catalog agrees with the disk index
            for block in ns.blocks.values():
                assert bool(block.tiers & DISK) == store.disk.contains(block.namespace, block.key)
        store.check_invariants()
        await store.close(5)
    run(scenario())


def test_retention_ttl_must_be_finite():
    for ttl in (math.inf, 1e300, math.nan, -1.0):
        with pytest.raises(ValueError):
            Retention("system", 50, ttl)


def test_delete_during_an_upload_is_busy_and_leaks_nothing(tmp_path, s3_server):
    async def scenario():
        bucket = make_bucket(s3_server, "delete-upload")
        tier = faulty_s3(s3_server, bucket)
        tier.upload_gate = threading.Event()
        store = make_store(store_config(tmp_path, s3_server.endpoint_url, bucket), s3_tier=tier)
        await store.start()
        await store.register_namespace("ns", {})
        await commit(store, "ns", [3], wait_durable=True)
        await asyncio.to_thread(tier.uploads_started.acquire)           # the upload reads the block now
        block = store.catalog.get("ns", key_of(3))
        assert store.busy(block)
        assert await store.delete("ns", [key_of(3)]) == (0, 1)
        tier.upload_gate.set()
        await until(lambda: store.catalog.get("ns", key_of(3)).tiers & S3, "the upload to finish")
        assert await store.delete("ns", [key_of(3)]) == (1, 0)
        await commit(store, "ns", list(range(10, 26)))                  # every slot is usable again
        store.check_invariants()
        assert store.cpu.holds(block)[UPLOAD] == 0 and not store.fatals
        await store.close(5)
    run(scenario())


def test_a_cancelled_reader_neither_leaks_its_slot_nor_cancels_the_others(tmp_path):
    async def scenario():
        fs = FaultyFs()
        store = make_store(store_config(tmp_path), fs=fs)
        await store.start()
        await store.register_namespace("ns", {})
        await commit(store, "ns", [4], wait_durable=True)
        block = store.catalog.get("ns", key_of(4))
        store._drop_tier(block, CPU)                                    # disk only
        fs.gate["preadv"] = threading.Event()                           # a slow promotion
        impatient = asyncio.ensure_future(store.acquire("ns", [key_of(4)], 5000))
        patient = asyncio.ensure_future(store.acquire("ns", [key_of(4)], 5000))
        await until(lambda: fs.calls.get("preadv", 0) >= 1, "the promotion to start reading")
        impatient.cancel()
        with pytest.raises(asyncio.CancelledError):
            await impatient
        fs.gate["preadv"].set()
        held, found = await patient
        assert found[0] is block and bytes(store.cpu.view(block)[:block.length]) == blob(4)
        assert store.cpu.holds(block)[READER] == 1                      # the cancelled reader holds nothing
        store.release(held.id)
        store.check_invariants()
        assert not store.fatals
        await store.close(5)
    run(scenario())


def test_a_flood_of_allocations_never_trips_an_assertion(tmp_path):
    async def scenario():
        store = make_store(store_config(tmp_path, limits={"max_active_leases": 4}))
        await store.start()
        await store.register_namespace("ns", {})
        first = await store.allocate(14, 0, 5000)                       # nearly all 16 slots
        flood = [asyncio.ensure_future(store.allocate(2, 2000, 5000)) for _ in range(12)]
        await asyncio.sleep(0)
        store.abort(first.id)                                           # room: every waiter wakes at once
        results = await asyncio.gather(*flood, return_exceptions=True)
        granted = [r for r in results if not isinstance(r, BaseException)]
        errors = [r for r in results if isinstance(r, BaseException)]
        assert granted and all(isinstance(e, ApiError) and e.kind is ErrorKind.EXHAUSTED for e in errors)
        for held in granted:
            store.abort(held.id)
        store.check_invariants()
        await store.close(5)
    run(scenario())


def test_promotions_do_not_wait_for_a_full_write_backlog(tmp_path):
    async def scenario():
        fs = FaultyFs()
        store = make_store(store_config(tmp_path, cpu={"capacity": "4MiB"},
                                        disk={"queue_blocks": 4, "batch_blocks": 4}), fs=fs)
        await store.start()
        await store.register_namespace("ns", {})
        await commit(store, "ns", [1], wait_durable=True)
        store._drop_tier(store.catalog.get("ns", key_of(1)), CPU)
        fs.gate["fdatasync"] = threading.Event()                        # the backlog fills and stays
        await commit(store, "ns", [2, 3, 4, 5])
        assert store.backlog >= 4
        assert await read(store, "ns", 1) == blob(1)                    # a read is not a write
        fs.gate["fdatasync"].set()
        await store.close(5)
    run(scenario())


def test_s3_write_through_obligation_survives_a_crash_and_an_outage(tmp_path, s3_server):
    """The upload obligation is in the disk index's transaction: a crash right after the durable
    acknowledgement, during an S3 outage, still uploads the block when S3 is back."""
    async def first_life():
        bucket = make_bucket(s3_server, "crash-outage")
        tier = faulty_s3(s3_server, bucket)
        store = make_store(store_config(tmp_path, s3_server.endpoint_url, bucket), s3_tier=tier)
        await store.start()
        tier.down = True
        await store.register_namespace("ns", {})
        assert await commit(store, "ns", [1, 2, 3], wait_durable=True) == [pb.STORED] * 3
        assert store.disk.upload_backlog() == 3
        for task in store._tasks:                                       # kill -9: no drain, no close
            task.cancel()
        store._closing = True
        await asyncio.gather(*store._tasks, return_exceptions=True)
        store.disk.close()
        store.arena.close()
        return bucket

    async def second_life(bucket):
        store = make_store(store_config(tmp_path, s3_server.endpoint_url, bucket))
        await store.start()
        await until(lambda: store.disk.upload_backlog() == 0, "the owed uploads after the restart")
        keys = {o["Key"] for o in s3_server.client().list_objects_v2(Bucket=bucket).get("Contents", [])}
        assert len(keys) == 3
        await store.close(5)

    bucket = asyncio.run(first_life())
    asyncio.run(second_life(bucket))


def test_an_s3_outage_with_a_small_disk_never_loses_an_acknowledged_block(tmp_path, s3_server):
    async def scenario():
        bucket = make_bucket(s3_server, "small-disk")
        tier = faulty_s3(s3_server, bucket)
        cfg = store_config(tmp_path, s3_server.endpoint_url, bucket, cpu={"capacity": "2MiB"},
                           disk={"capacity": "8MiB", "segment_bytes": "2MiB", "durable_wait_ms": 500})
        store = make_store(cfg, s3_tier=tier)
        await store.start()
        await store.register_namespace("ns", {})
        tier.down = True
        acknowledged = []
        for seed in range(1, 61):                                       # far more than the disk holds
            try:
                await commit(store, "ns", [seed], wait_durable=True)
                acknowledged.append(seed)
            except ApiError as exc:
                assert exc.kind in (ErrorKind.UNAVAILABLE, ErrorKind.EXHAUSTED), exc
                break
        assert acknowledged
        tier.down = False
        await until(lambda: store.disk.upload_backlog() == 0 and store.backlog == 0, "the outage to drain", 60)
        for seed in acknowledged:
            assert await read(store, "ns", seed) == blob(seed), f"acknowledged block {seed} lost"
        assert not store.fatals
        await store.close(5)
    run(scenario())


def test_an_object_replaced_after_listing_is_a_miss(tmp_path, s3_server):
    async def scenario():
        bucket = make_bucket(s3_server, "replaced")
        tier = faulty_s3(s3_server, bucket)
        store = make_store(store_config(tmp_path, s3_server.endpoint_url, bucket), s3_tier=tier)
        await store.start()
        await store.register_namespace("ns", {})
        await commit(store, "ns", [8], wait_durable=True)
        await until(lambda: store.catalog.get("ns", key_of(8)).tiers & S3, "the upload")
        block = store.catalog.get("ns", key_of(8))
        from kvtier.tiers.block import BlockHeader, checksum
        forged = bytes(len(blob(8)))                                     # same length, other bytes
        header = BlockHeader("ns", key_of(8), b"", len(forged), checksum(forged), block.created_ms)
        s3_server.client().put_object(Bucket=bucket, Key=tier.object_key("ns", key_of(8)),
                                      Body=header.encode() + forged,
                                      Metadata={"kvtier-header": __import__("base64").b64encode(header.encode()).decode()})
        store._drop_tier(block, CPU)
        store._drop_tier(block, DISK)
        await store._on_writer(lambda: store.disk.remove("ns", key_of(8)))
        assert await read(store, "ns", 8) is None                        # never the forged bytes
        assert not store.fatals
        await store.close(5)
    run(scenario())


def test_permanent_s3_errors_mark_s3_unreachable_and_back_off(tmp_path, s3_server, monkeypatch):
    backoffs: list[int] = []

    def recorded_backoff(failures: int) -> float:
        if sys._getframe(1).f_code.co_name == "_upload_loop":  # the lister backs off through it too
            backoffs.append(failures)
        return 0.01
    monkeypatch.setattr("kvtier.daemon.s3sync._backoff", recorded_backoff)

    async def scenario():
        bucket = make_bucket(s3_server, "will-vanish")
        store = make_store(store_config(tmp_path, s3_server.endpoint_url, bucket))
        await store.start()
        await store.register_namespace("ns", {})
        s3_server.client().delete_bucket(Bucket=bucket)                  # NoSuchBucket from now on
        await commit(store, "ns", [1, 2], wait_durable=True)
        await until(lambda: not store.s3sync.reachable, "S3 to be reported unreachable")
        start = store.s3sync.counters.failures
        await until(lambda: store.s3sync.counters.failures >= start + 3, "three more failed passes")
        failures = store.s3sync.counters.failures
        assert len(backoffs) >= failures - start - 1                     # every failed pass backed off
        assert backoffs[-1] > 1                                          # with growing failure counts
        assert "NoSuchBucket" in store.s3sync.last_error
        await store.close(5)
    run(scenario())
