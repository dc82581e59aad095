"""Arena slots, CPU-tier pins and eviction order, and the eviction policies."""

from __future__ import annotations

import os

import pytest

from kvtier.tiers.arena import SharedArena
from kvtier.tiers.cpu import CpuTier
from kvtier.tiers.eviction import FifoPolicy, LruPolicy


@pytest.fixture
def arena(tmp_path):
    a = SharedArena(str(tmp_path), "kvt-test", 8 * 4096, 4096)
    yield a
    a.close()


def test_arena_file_is_private_and_sized(arena):
    st = os.stat(arena.path)
    assert st.st_size == 8 * 4096 and st.st_mode & 0o777 == 0o600
    assert arena.slot_count == 8 and arena.free_count() == 8


def test_arena_removes_stale_files_of_its_prefix(tmp_path):
    stale = tmp_path / "kvt-test-deadbeef"
    stale.write_bytes(b"old")
    a = SharedArena(str(tmp_path), "kvt-test", 4096, 4096)
    assert not stale.exists() and os.path.exists(a.path)
    a.close()
    assert not os.path.exists(a.path)


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




def test_arena_larger_than_its_filesystem_fails_at_creation(small_tmpfs):
    # The old arena was a sparse file: it "succeeded" here and the first write past 8 MiB was a SIGBUS.
    with pytest.raises(OSError, match=f"cannot reserve {16 << 20} bytes for the arena in {small_tmpfs}: "
                                      "No space left on device") as err:
        SharedArena(small_tmpfs, "kvt-test", 16 << 20, 4096)
    assert err.value.errno == 28  # ENOSPC, kept for callers that branch on it
    assert os.listdir(small_tmpfs) == []  # the failed arena does not keep the space it got


def test_arena_that_fits_owns_its_space_up_front(small_tmpfs):
    a = SharedArena(small_tmpfs, "kvt-test", 4 << 20, 4096)
    try:
        assert os.stat(a.path).st_blocks * 512 >= 4 << 20  # allocated, not sparse
        with pytest.raises(OSError, match="No space left on device"):
            SharedArena(small_tmpfs, "kvt-other", 6 << 20, 4096)  # 4 + 6 MiB > 8 MiB
        a.view(a.slot_count - 1)[:4] = b"last"  # the arena's own pages are there to write
        assert bytes(a.view(a.slot_count - 1)[:4]) == b"last"
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
