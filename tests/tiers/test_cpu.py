"""Arena slots, CPU-tier pins and eviction order, and the eviction policies."""

from __future__ import annotations

import fcntl
import os

import pytest

from kvtier.tiers.arena import SEALS, SharedArena, map_fd
from kvtier.tiers.cpu import CpuTier
from kvtier.tiers.eviction import FifoPolicy, LruPolicy


@pytest.fixture
def arena():
    a = SharedArena("test", [("", 8 * 4096)], 4096)
    yield a
    a.close()


def test_arena_parts_are_sealed_memfds_mapped_back_to_back():
    a = SharedArena("test", [("", 4 * 4096), ("team-a", 2 * 4096), ("team-b", 3 * 4096)], 4096)
    try:
        assert a.slot_count == 9 and [p.first_slot for p in a.parts] == [0, 4, 6]
        assert a.part_named("team-b") == 2 and a.part_named("nobody") == 0
        for part in a.parts:
            assert os.fstat(part.fd).st_size == part.slot_count * 4096
            assert os.fstat(part.fd).st_blocks * 512 >= part.slot_count * 4096  # allocated, not sparse
            assert fcntl.fcntl(part.fd, fcntl.F_GET_SEALS) == SEALS
            with pytest.raises(PermissionError):
                os.ftruncate(part.fd, 0)  # a client holding the fd cannot pull memory from under the daemon
        # The daemon's slot 6 is byte 0 of team-b's file: what a client of team-b maps.
        a.view(6)[:4] = b"tb-0"
        client = map_fd(a.parts[2].fd, 3 * 4096)
        assert client[:4] == b"tb-0"
        client[4096:4100] = b"tb-1"
        assert bytes(a.view(7)[:4]) == b"tb-1"
        client.close()
        assert a.take(10, 1) == [5, 4] and a.free_count(1) == 0 and a.free_count(0) == 4
        a.give_back([4])
        assert a.free_count(1) == 1 and a.part_of(4) == 1 and a.part_of(8) == 2
    finally:
        a.close()


def test_arena_take_and_give_back(arena):
    slots = arena.take(3)
    assert len(set(slots)) == 3 and arena.free_count() == 5
    arena.view(slots[0])[:5] = b"hello"
    assert bytes(arena.view(slots[0])[:5]) == b"hello"
    arena.give_back(slots)
    assert arena.free_count() == 8
    with pytest.raises(AssertionError):
        arena.give_back([0] * 9)
    with pytest.raises(AssertionError):
        arena.view(8)


def test_arena_part_that_cannot_be_allocated_fails_at_creation(monkeypatch):
    # A sparse arena would "succeed" here and SIGBUS on the first write the memory cannot back.
    def no_space(fd, offset, length):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(os, "posix_fallocate", no_space)
    with pytest.raises(OSError, match=f"cannot reserve {16 << 20} bytes for the arena") as err:
        SharedArena("test", [("", 16 << 20)], 4096)
    assert err.value.errno == 28  # ENOSPC, kept for callers that branch on it


def test_cpu_tier_parts_evict_only_their_own_blocks():
    a = SharedArena("test", [("", 2 * 4096), ("t", 2 * 4096)], 4096)
    try:
        tier = CpuTier(a, LruPolicy(), LruPolicy)
        for name, part in (("a0", 0), ("a1", 0), ("t0", 1), ("t1", 1)):
            slots, _ = tier.reserve(1, part)
            tier.install(name, slots[0], 10)
        slots, evicted = tier.reserve(1, 1)
        assert evicted == ["t0"] and a.part_of(slots[0]) == 1  # part 0's older blocks stay
        tier.unreserve(slots)
        tier.hold("t1", "reader")
        assert tier.reserve(2, 1) == ([], []) and tier.available(1) == 1 and tier.available(0) == 2
        tier.check()
    finally:
        a.close()


def fill(tier: CpuTier, names):
    for name in names:
        slots, evicted = tier.reserve(1)
        assert slots and not evicted
        tier.install(name, slots[0], 100)


def test_cpu_tier_evicts_lru_and_skips_pinned(arena):
    tier = CpuTier(arena, LruPolicy())
    fill(tier, "abcdefgh")
    tier.touch("a")
    tier.hold("b", "reader")
    slots, evicted = tier.reserve(2)
    assert len(slots) == 2 and evicted == ["c", "d"]  # a was touched, b is pinned
    assert "a" in tier and "b" in tier and "c" not in tier
    assert tier.used_bytes == 600 and tier.evictions == 2


def test_cpu_tier_refuses_when_everything_is_pinned(arena):
    tier = CpuTier(arena, LruPolicy())
    fill(tier, "abcdefgh")
    for name in "abcdefgh":
        tier.hold(name, "reader")
    assert tier.reserve(1) == ([], [])
    tier.release(tier.slot_of("e"), "reader")
    assert tier.reserve(1)[1] == ["e"]


def test_fifo_ignores_access():
    lru, fifo = LruPolicy(), FifoPolicy()
    for policy in (lru, fifo):
        for name in "xyz":
            policy.inserted(name)
        policy.accessed("x")
    assert list(lru.candidates()) == ["y", "z", "x"]
    assert list(fifo.candidates()) == ["x", "y", "z"]
    lru.removed("y")
    assert list(lru.candidates()) == ["z", "x"] and len(lru) == 2
