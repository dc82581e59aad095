"""Slot bookkeeping shared by the memory tiers (CPU arena, GPU pool): a free list of fixed-size
slots, and a tier that maps committed blocks to slots, counts pins and evicts by policy.

Contract: one slot holds one block (length <= slot_bytes). A pinned block is never evicted; pins are
counted. `reserve` frees slots by evicting unpinned blocks in policy order and returns who was
evicted, so the caller can update its catalog. Not thread-safe: event loop only.
"""

from __future__ import annotations

from typing import Hashable

from .eviction import EvictionPolicy


class FreeList:
    """Free slot ids of a pool of `slot_count` slots."""

    def __init__(self, slot_count: int):
        assert slot_count > 0, "pool smaller than one slot"
        self.slot_count = slot_count
        self._free = list(range(slot_count - 1, -1, -1))

    def free_count(self) -> int:
        return len(self._free)

    def take(self, count: int) -> list[int]:
        """Takes up to count free slots (fewer when fewer are free)."""
        taken = self._free[-count:] if count else []
        del self._free[len(self._free) - len(taken):]
        return taken

    def give_back(self, slots) -> None:
        for slot in slots:
            assert 0 <= slot < self.slot_count
            self._free.append(slot)
        assert len(self._free) <= self.slot_count, "slot returned twice"


class SlotTier:
    """Blocks in the slots of `pool` (a FreeList with slot_bytes), evicted by `policy`."""

    def __init__(self, pool, policy: EvictionPolicy):
        self.pool = pool
        self.policy = policy
        self._slot_of: dict[Hashable, int] = {}
        self._pins: dict[Hashable, int] = {}
        self._lengths: dict[Hashable, int] = {}
        self.used_bytes = 0
        self.evictions = 0
        self.pressure_evictions = 0  # victims the policy still pinned (e.g. TTL): memory left no choice

    def __contains__(self, block_id) -> bool:
        return block_id in self._slot_of

    def __len__(self) -> int:
        return len(self._slot_of)

    def slot_of(self, block_id) -> int | None:
        return self._slot_of.get(block_id)

    def length_of(self, block_id) -> int | None:
        return self._lengths.get(block_id)

    def reserve(self, count: int) -> tuple[list[int], list[Hashable]]:
        """Takes count slots, evicting unpinned blocks if needed. Returns (slots, evicted ids);
        slots is empty when count cannot be met (then nothing was evicted either)."""
        shortfall = count - self.pool.free_count()
        victims = self._victims(shortfall) if shortfall > 0 else []
        if len(victims) < shortfall:
            return [], []
        still_pinned = getattr(self.policy, "is_ttl_pinned", None)
        if still_pinned is not None:
            self.pressure_evictions += sum(1 for block_id in victims if still_pinned(block_id))
        for block_id in victims:
            self.remove(block_id)
        self.evictions += len(victims)
        slots = self.pool.take(count)
        assert len(slots) == count
        return slots, victims

    def _victims(self, count: int) -> list:
        victims = []
        for block_id in self.policy.candidates():
            if not self._pins.get(block_id):
                victims.append(block_id)
                if len(victims) == count:
                    break
        return victims

    def unreserve(self, slots) -> None:
        self.pool.give_back(slots)

    def install(self, block_id, slot: int, length: int) -> None:
        """The block in slot is committed: from now on it is evictable unless pinned."""
        assert block_id not in self._slot_of and 0 <= length <= self.pool.slot_bytes
        self._slot_of[block_id] = slot
        self._lengths[block_id] = length
        self.used_bytes += length
        self.policy.inserted(block_id)

    def remove(self, block_id) -> None:
        slot = self._slot_of.pop(block_id)
        assert not self._pins.get(block_id), "removing a pinned block"
        self.used_bytes -= self._lengths.pop(block_id)
        self.policy.removed(block_id)
        self.pool.give_back([slot])

    def pin(self, block_id) -> None:
        assert block_id in self._slot_of
        self._pins[block_id] = self._pins.get(block_id, 0) + 1

    def unpin(self, block_id) -> None:
        left = self._pins[block_id] - 1
        assert left >= 0
        if left:
            self._pins[block_id] = left
        else:
            del self._pins[block_id]

    def pinned(self, block_id) -> bool:
        return bool(self._pins.get(block_id))

    def touch(self, block_id) -> None:
        self.policy.accessed(block_id)
