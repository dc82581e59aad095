"""Eviction policy: which unpinned block a full tier gives up first.

Contract: a policy only orders block ids; it never frees memory itself and never sees pins (the
tier skips pinned candidates). Not thread-safe (called from the daemon's event loop). A policy
holds no state worth keeping across restarts.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Hashable, Iterator


class EvictionPolicy:
    """Interface: 5 methods."""

    def inserted(self, block_id: Hashable) -> None:
        raise NotImplementedError

    def accessed(self, block_id: Hashable) -> None:
        raise NotImplementedError

    def removed(self, block_id: Hashable) -> None:
        raise NotImplementedError

    def candidates(self) -> Iterator[Hashable]:
        """Block ids in eviction order, first to go first. Callers must not mutate while iterating."""
        raise NotImplementedError

    def __len__(self) -> int:
        raise NotImplementedError


class LruPolicy(EvictionPolicy):
    def __init__(self):
        self._order: OrderedDict = OrderedDict()

    def inserted(self, block_id):
        self._order[block_id] = None
        self._order.move_to_end(block_id)

    def accessed(self, block_id):
        if block_id in self._order:
            self._order.move_to_end(block_id)

    def removed(self, block_id):
        self._order.pop(block_id, None)

    def candidates(self):
        return iter(self._order)

    def __len__(self):
        return len(self._order)


class FifoPolicy(LruPolicy):
    """Insertion order only: the trivial baseline for tests and benchmarks."""

    def accessed(self, block_id):
        pass


POLICIES = {"lru": LruPolicy, "fifo": FifoPolicy}
