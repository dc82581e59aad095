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
- Parts: a pool may be cut into parts (the CPU arena has one per tenant). Each part has its own
  eviction policy; `reserve(count, part)` takes slots of that part and evicts only its blocks, so
  one part's writers never displace another part's blocks.
- Not thread-safe: event loop only.
"""

from __future__ import annotations

import bisect
from collections import Counter
from typing import Callable, Hashable

from .eviction import EvictionPolicy


class FreeList:
    """Free slot ids of a pool of `slot_count` slots, cut into parts of `part_counts` slots (one
    part of all slots by default): part p holds slots part_starts[p] .. part_starts[p+1] - 1."""

    def __init__(self, slot_count: int, part_counts: list[int] | None = None):
        assert slot_count > 0, "pool smaller than one slot"
        part_counts = list(part_counts or [slot_count])
        assert sum(part_counts) == slot_count and all(c > 0 for c in part_counts)
        self.slot_count = slot_count
        self.part_starts = [sum(part_counts[:p]) for p in range(len(part_counts))]
        self.part_counts = part_counts
        self._free = [list(range(start + count - 1, start - 1, -1))
                      for start, count in zip(self.part_starts, part_counts)]

    def part_of(self, slot: int) -> int:
        assert 0 <= slot < self.slot_count, f"slot {slot} out of range"
        return bisect.bisect_right(self.part_starts, slot) - 1

    def free_count(self, part: int | None = None) -> int:
        """Free slots in `part` (all parts when None)."""
        return sum(map(len, self._free)) if part is None else len(self._free[part])

    def take(self, count: int, part: int = 0) -> list[int]:
        """Takes up to count free slots of `part` (fewer when fewer are free)."""
        free = self._free[part]
        taken = free[-count:] if count else []
        del free[len(free) - len(taken):]
        return taken

    def give_back(self, slots) -> None:
        for slot in slots:
            free = self._free[self.part_of(slot)]
            free.append(slot)
            assert len(free) <= self.part_counts[self.part_of(slot)], "slot returned twice"


class SlotTier:
    """Blocks in the slots of `pool` (a FreeList with slot_bytes), evicted by `policy` (part 0)
    and by one `make_policy()` for every further part of the pool."""

    def __init__(self, pool, policy: EvictionPolicy, make_policy: Callable[[], EvictionPolicy] | None = None):
        self.pool = pool
        parts = len(pool.part_counts)
        assert parts == 1 or make_policy is not None, "a pool of several parts needs make_policy"
        self.policies = [policy] + [make_policy() for _ in range(parts - 1)]
        self._held_installed = Counter()       # part -> installed slots with a hold
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
    @property
    def policy(self) -> EvictionPolicy:
        """Part 0's policy (the only one of a pool in one part)."""
        return self.policies[0]

    def part_of(self, block) -> int:
        return self.pool.part_of(self._slot_of[block])

    def available(self, part: int = 0) -> int:
        """Slots of `part` that reserve() could hand out now: free ones plus installed ones without
        a hold."""
        installed = len(self.policies[part])  # the part's policy knows exactly its installed blocks
        return self.pool.free_count(part) + installed - self._held_installed[part]

    def reserve_room(self, count: int, floor: int = 0, part: int = 0) -> tuple[list[int], list[Hashable]]:
        """reserve(count, part) unless that would leave fewer than `floor` slots of it available."""
        if self.available(part) - count < floor:
            return [], []
        return self.reserve(count, part)

    def reserve(self, count: int, part: int = 0) -> tuple[list[int], list[Hashable]]:
        """Takes count slots of `part`, evicting its blocks without holds if needed. Returns (slots,
        evicted); slots is empty when count cannot be met (then nothing was evicted either)."""
        shortfall = count - self.pool.free_count(part)
        victims = self._victims(shortfall, part) if shortfall > 0 else []
        if len(victims) < shortfall:
            return [], []
        still_pinned = getattr(self.policies[part], "is_ttl_pinned", None)
        if still_pinned is not None:
            self.pressure_evictions += sum(1 for block in victims if still_pinned(block))
        for block in victims:
            self.remove(block)
        self.evictions += len(victims)
        slots = self.pool.take(count, part)
        assert len(slots) == count
        self._reserved += count
        return slots, victims

    def _victims(self, count: int, part: int) -> list:
        victims = []
        for block in self.policies[part].candidates():
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
        self.policies[self.pool.part_of(slot)].inserted(block)

    def remove(self, block) -> None:
        """Detaches the block; its slot is free now, or when its last hold is released."""
        slot = self._slot_of.pop(block)
        del self._block_in[slot]
        self.used_bytes -= self._lengths.pop(block)
        part = self.pool.part_of(slot)
        self.policies[part].removed(block)
        if slot in self._holds:
            self._held_installed[part] -= 1
            self._retired.add(slot)
        else:
            self.pool.give_back([slot])

    # -- holds -------------------------------------------------------------------------------------
    def hold(self, block, reason: str) -> int:
        """Holds the block's slot for `reason`; returns the slot (release it by slot)."""
        slot = self._slot_of[block]
        if slot not in self._holds:
            self._held_installed[self.pool.part_of(slot)] += 1
            self._holds[slot] = Counter()
        self._holds[slot][reason] += 1
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
            else:
                self._held_installed[self.pool.part_of(slot)] -= 1

    def holds(self, block) -> Counter:
        """Why the block's slot may not be reused (empty when it may)."""
        slot = self._slot_of.get(block)
        return Counter(self._holds.get(slot, ())) if slot is not None else Counter()

    def held(self, block) -> bool:
        slot = self._slot_of.get(block)
        return slot is not None and slot in self._holds

    def touch(self, block) -> None:
        self.policies[self.part_of(block)].accessed(block)

    def retain(self, block, retention) -> None:
        """Hands the block's retention to its part's policy (policies without retention ignore it)."""
        policy = self.policies[self.part_of(block)]
        if hasattr(policy, "retain"):
            policy.retain(block, retention)

    def check(self) -> None:
        """Asserts the bookkeeping's invariants (tests and model checks)."""
        assert len(self._slot_of) == len(self._block_in) == len(self._lengths)
        assert all(self._block_in[s] is b for b, s in self._slot_of.items())
        assert self._retired <= set(self._holds) and not self._retired & set(self._block_in)
        assert all(h and all(v > 0 for v in h.values()) for h in self._holds.values())
        assert set(self._holds) <= set(self._block_in) | self._retired
        total = self.pool.free_count() + len(self._slot_of) + len(self._retired) + self._reserved
        assert total == self.pool.slot_count, f"slots leaked: {total} accounted of {self.pool.slot_count}"
        assert sum(map(len, self.policies)) == len(self._slot_of)
        for part, policy in enumerate(self.policies):
            installed = [b for b, s in self._slot_of.items() if self.pool.part_of(s) == part]
            assert len(policy) == len(installed), f"part {part}: policy and slots disagree"
            held = sum(1 for b in installed if self._slot_of[b] in self._holds)
            assert held == self._held_installed[part], f"part {part}: held count drifted"
