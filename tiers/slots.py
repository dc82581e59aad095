"""Slot bookkeeping shared by the memory tiers (CPU arena, GPU pool): a free list of fixed-size
slots, and a tier that maps committed blocks to slots, holds slots for named reasons and evicts by
policy.

Contract
- One slot holds one block (length <= slot_bytes). Blocks are keyed by identity (the store's
  Block objects): a block quarantined while readers still hold its slot can be stored again in
  another slot without the two copies being confused.
- Holds belong to SLOTS, with a reason each ("reader", "write", "upload", "copy", ...): the one
  record of why a slot may not be reused. A held slot is never evicted and never handed out again.
- `remove(block)` detaches the block at once (it is no longer in the tier); its slot returns to the
  free list when its last hold is released (`retired` slots), never earlier.
- `reserve` frees slots by evicting blocks whose slots have no hold, in policy order, and returns
  who was evicted so that the caller can update its catalog. `reserve_room` leaves `floor` slots
  untouched so that reads (promotions) always find room that writes cannot take.
- Not thread-safe: event loop only.
"""

from __future__ import annotations

from collections import Counter
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
        self._block_in: dict[int, Hashable] = {}
        self._lengths: dict[Hashable, int] = {}
        self._holds: dict[int, Counter] = {}   # slot -> reason -> count (only slots with a hold)
        self._retired: set[int] = set()        # held slots whose block was removed
        self._reserved = 0                     # slots taken by reserve() and not yet installed/returned
        self.used_bytes = 0
        self.evictions = 0
        self.pressure_evictions = 0  # victims the policy still pinned (e.g. TTL): memory left no choice

    def __contains__(self, block) -> bool:
        return block in self._slot_of

    def __len__(self) -> int:
        return len(self._slot_of)

    def __iter__(self):
        return iter(list(self._slot_of))

    def slot_of(self, block) -> int | None:
        return self._slot_of.get(block)

    def length_of(self, block) -> int | None:
        return self._lengths.get(block)

    # -- room ------------------------------------------------------------------------------------
    def available(self) -> int:
        """Slots that reserve() could hand out now: free ones plus installed ones without a hold."""
        held_installed = len(self._holds) - len(self._retired)  # holds are on installed or retired slots
        return self.pool.free_count() + len(self._slot_of) - held_installed

    def reserve_room(self, count: int, floor: int = 0) -> tuple[list[int], list[Hashable]]:
        """reserve(count) unless that would leave fewer than `floor` slots available."""
        if self.available() - count < floor:
            return [], []
        return self.reserve(count)

    def reserve(self, count: int) -> tuple[list[int], list[Hashable]]:
        """Takes count slots, evicting blocks without holds if needed. Returns (slots, evicted);
        slots is empty when count cannot be met (then nothing was evicted either)."""
        shortfall = count - self.pool.free_count()
        victims = self._victims(shortfall) if shortfall > 0 else []
        if len(victims) < shortfall:
            return [], []
        still_pinned = getattr(self.policy, "is_ttl_pinned", None)
        if still_pinned is not None:
            self.pressure_evictions += sum(1 for block in victims if still_pinned(block))
        for block in victims:
            self.remove(block)
        self.evictions += len(victims)
        slots = self.pool.take(count)
        assert len(slots) == count
        self._reserved += count
        return slots, victims

    def _victims(self, count: int) -> list:
        victims = []
        for block in self.policy.candidates():
            if self._slot_of[block] not in self._holds:
                victims.append(block)
                if len(victims) == count:
                    break
        return victims

    def unreserve(self, slots) -> None:
        """Returns reserved slots that were never installed."""
        slots = list(slots)
        assert all(slot not in self._block_in and slot not in self._holds for slot in slots)
        self._reserved -= len(slots)
        assert self._reserved >= 0, "unreserve of slots never reserved"
        self.pool.give_back(slots)

    # -- blocks ------------------------------------------------------------------------------------
    def install(self, block, slot: int, length: int) -> None:
        """The block in (reserved) slot is committed: from now on it is evictable unless held."""
        assert block not in self._slot_of and slot not in self._block_in and slot not in self._holds
        assert 0 <= length <= self.pool.slot_bytes
        self._reserved -= 1
        assert self._reserved >= 0, "install into a slot that was not reserved"
        self._slot_of[block] = slot
        self._block_in[slot] = block
        self._lengths[block] = length
        self.used_bytes += length
        self.policy.inserted(block)

    def remove(self, block) -> None:
        """Detaches the block; its slot is free now, or when its last hold is released."""
        slot = self._slot_of.pop(block)
        del self._block_in[slot]
        self.used_bytes -= self._lengths.pop(block)
        self.policy.removed(block)
        if slot in self._holds:
            self._retired.add(slot)
        else:
            self.pool.give_back([slot])

    # -- holds -------------------------------------------------------------------------------------
    def hold(self, block, reason: str) -> int:
        """Holds the block's slot for `reason`; returns the slot (release it by slot)."""
        slot = self._slot_of[block]
        self._holds.setdefault(slot, Counter())[reason] += 1
        return slot

    def release(self, slot: int, reason: str) -> None:
        holds = self._holds[slot]
        assert holds[reason] > 0, f"release of a {reason} hold never taken on slot {slot}"
        holds[reason] -= 1
        if not holds[reason]:
            del holds[reason]
        if not holds:
            del self._holds[slot]
            if slot in self._retired:
                self._retired.discard(slot)
                self.pool.give_back([slot])

    def holds(self, block) -> Counter:
        """Why the block's slot may not be reused (empty when it may)."""
        slot = self._slot_of.get(block)
        return Counter(self._holds.get(slot, ())) if slot is not None else Counter()

    def held(self, block) -> bool:
        slot = self._slot_of.get(block)
        return slot is not None and slot in self._holds

    def touch(self, block) -> None:
        self.policy.accessed(block)

    def check(self) -> None:
        """Asserts the bookkeeping's invariants (tests and model checks)."""
        assert len(self._slot_of) == len(self._block_in) == len(self._lengths)
        assert all(self._block_in[s] is b for b, s in self._slot_of.items())
        assert self._retired <= set(self._holds) and not self._retired & set(self._block_in)
        assert all(h and all(v > 0 for v in h.values()) for h in self._holds.values())
        assert set(self._holds) <= set(self._block_in) | self._retired
        total = self.pool.free_count() + len(self._slot_of) + len(self._retired) + self._reserved
        assert total == self.pool.slot_count, f"slots leaked: {total} accounted of {self.pool.slot_count}"
        assert len(self.policy) == len(self._slot_of)
