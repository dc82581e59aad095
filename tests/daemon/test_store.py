"""BlockStore in-process, where the test controls when the write-through task gets to run."""

from __future__ import annotations

import asyncio

import pytest

from kvtier.daemon.errors import ApiError
from kvtier.daemon.store import READER, Staged
from kvtier.proto.v1 import kvtier_pb2 as pb
from kvtier.tiers.block import checksum

from store_harness import make_store, store_config


async def stage(store, blobs: list[bytes]) -> tuple[int, list[Staged]]:
    held = await store.allocate(len(blobs), 0, 5000)
    staged = []
    for i, (slot, blob) in enumerate(zip(held.items, blobs)):
        store.arena.view(slot)[:len(blob)] = blob
        staged.append(Staged(bytes([i]) * 32, b"", slot, len(blob), checksum(blob)))
    return held.id, staged


def test_bytes_modified_after_commit_are_quarantined_not_written(tmp_path):
    async def scenario():
        store = make_store(store_config(tmp_path))
        await store.start()
        await store.register_namespace("ns", {})
        allocation, staged = await stage(store, [b"a" * 5000, b"b" * 5000])
        await store.commit(allocation, "ns", staged, wait_durable=False)
        store.arena.view(staged[0].slot)[10] ^= 0xFF  # before the writer task runs
        with pytest.raises(ApiError, match="modified in shared memory"):
            await store._wait_durable([store.catalog.get("ns", staged[0].key)])
        await store._wait_durable([store.catalog.get("ns", staged[1].key)])
        assert store.catalog.get("ns", staged[0].key) is None
        assert store.catalog.get("ns", staged[1].key).tiers == pb.TIER_CPU | pb.TIER_DISK
        assert store.counters.quarantined == 1 and store.backlog == 0
        assert not store.disk.contains("ns", staged[0].key)
        store.check_invariants()
        await store.close(5)
        assert not store.fatals
    asyncio.run(scenario())


def test_promotion_of_a_disk_only_block_is_shared_by_concurrent_readers(tmp_path):
    async def scenario():
        store = make_store(store_config(tmp_path))
        await store.start()
        await store.register_namespace("ns", {})
        allocation, staged = await stage(store, [b"z" * 7000])
        await store.commit(allocation, "ns", staged, wait_durable=True)
        block = store.catalog.get("ns", staged[0].key)
        store._drop_tier(block, pb.TIER_CPU)  # as if evicted
        results = await asyncio.gather(*(store.acquire("ns", [block.key], 5000) for _ in range(4)))
        assert store.counters.disk_reads == 1  # one disk read served all four
        assert all(found[0] is block for _, found in results)
        assert store.cpu.holds(block)[READER] == 4 and bytes(store.cpu.view(block)[:7000]) == b"z" * 7000
        for held, _ in results:
            store.release(held.id)
        assert not store.cpu.held(block)
        store.check_invariants()
        await store.close(5)
    asyncio.run(scenario())


def test_acquire_larger_than_the_cpu_tier_serves_what_fits_and_misses_the_rest(tmp_path):
    async def scenario():
        store = make_store(store_config(tmp_path))  # 16 slots of 64 KiB
        await store.start()
        await store.register_namespace("ns", {})
        keys = []
        for start in range(0, 24, 8):
            allocation, staged = await stage(store, [bytes([start + i]) * 1000 for i in range(8)])
            staged = [Staged(bytes([start + i + 1]) * 32, b"", s.slot, s.length, s.checksum)
                      for i, s in enumerate(staged)]
            await store.commit(allocation, "ns", staged, wait_durable=True)
            keys += [s.key for s in staged]
        for key in keys:  # evict everything from the CPU tier: disk-only now
            block = store.catalog.get("ns", key)
            if block.tiers & pb.TIER_CPU:
                store._drop_tier(block, pb.TIER_CPU)
        held, found = await store.acquire("ns", keys, 5000)
        hits = [b for b in found if b is not None]
        assert len(hits) == 16 and store.arena.free_count() == 0
        for block in hits:
            assert bytes(store.cpu.view(block)[:1000]) == bytes([block.key[0] - 1]) * 1000
        store.release(held.id)
        assert not any(store.cpu.held(b) for b in hits)
        held, found = await store.acquire("ns", keys[:4], 5000)  # memory is usable again
        assert all(found) and held is not None
        store.release(held.id)
        store.check_invariants()
        await store.close(5)
    asyncio.run(scenario())
