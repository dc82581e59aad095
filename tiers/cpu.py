"""CPU tier: committed blocks in shared-memory arena slots, evicted by a swappable policy.

Contract: one slot holds one block (length <= slot_bytes). A block is pinned while any reader
lease holds it or while it waits for write-through (evicting it would lose the only copy); pins
are counted. `reserve` frees slots by evicting unpinned blocks in policy order and returns who was
evicted, so the caller can update its catalog. Not thread-safe: event loop only.
Restart: volatile. Blocks that were only here are gone after a restart, by design.
"""

from __future__ import annotations

from typing import Hashable

from .arena import SharedArena
from .eviction import EvictionPolicy


class CpuTier:
    def __init__(self, arena: SharedArena, policy: EvictionPolicy):
        self.arena = arena
        self.policy = policy
        self._slot_of: dict[Hashable, int] = {}
        self._pins: dict[Hashable, int] = {}
        self.used_bytes = 0
        self._lengths: dict[Hashable, int] = {}
        self.evictions = 0

    def __contains__(self, block_id) -> bool:
        return block_id in self._slot_of

    def __len__(self) -> int:
        return len(self._slot_of)

    def slot_of(self, block_id) -> int | None:
        return self._slot_of.get(block_id)

    def reserve(self, count: int) -> tuple[list[int], list[Hashable]]:
        """Takes count slots, evicting unpinned blocks if needed. Returns (slots, evicted ids);
        slots is empty when count cannot be met (then nothing was evicted either)."""
        shortfall = count - self.arena.free_count()
        if shortfall > 0:
            victims = self._victims(shortfall)
            if len(victims) < shortfall:
                return [], []
            for block_id in victims:
                self.remove(block_id)
            self.evictions += len(victims)
        else:
            victims = []
        slots = self.arena.take(count)
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
        self.arena.give_back(slots)

    def install(self, block_id, slot: int, length: int) -> None:
        """The block in slot is committed: from now on it is evictable unless pinned."""
        assert block_id not in self._slot_of and 0 <= length <= self.arena.slot_bytes
        self._slot_of[block_id] = slot
        self._lengths[block_id] = length
        self.used_bytes += length
        self.policy.inserted(block_id)

    def remove(self, block_id) -> None:
        slot = self._slot_of.pop(block_id)
        assert not self._pins.get(block_id), "removing a pinned block"
        self.used_bytes -= self._lengths.pop(block_id)
        self.policy.removed(block_id)
        self.arena.give_back([slot])

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

    def view(self, block_id) -> memoryview:
        return self.arena.view(self._slot_of[block_id])
