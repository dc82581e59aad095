"""CPU tier: committed blocks in shared-memory arena slots, evicted by a swappable policy.

Contract: SlotTier's (tiers/slots.py). The store pins a block while a reader lease holds it and
while it waits for write-through (evicting it would lose the only copy). Event loop only.
Restart: volatile. Blocks that were only here are gone after a restart, by design.
"""

from __future__ import annotations

from .arena import SharedArena
from .eviction import EvictionPolicy
from .slots import SlotTier


class CpuTier(SlotTier):
    def __init__(self, arena: SharedArena, policy: EvictionPolicy, make_policy=None):
        super().__init__(arena, policy, make_policy)

    @property
    def arena(self) -> SharedArena:
        return self.pool

    def view(self, block_id) -> memoryview:
        return self.pool.view(self._slot_of[block_id])
