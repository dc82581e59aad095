"""Agent-aware retention: an eviction policy that orders blocks by retention class, priority, TTL
pin and recency (issue 5). A drop-in `EvictionPolicy`; `LruPolicy` stays available for comparison.

Semantics (see docs/retention.md):
  * Every block has a `Retention`: a class, a priority 0..100 (higher = kept longer) and an optional
    TTL in seconds (a cache_control pin). Blocks never `retain`ed get DEFAULT_RETENTION:
    class "conversation", priority 50, no TTL.
  * `candidates()` yields, first to go first:
      1. every block that is not TTL-pinned (never pinned, or pin expired), ordered by class rank
         (ephemeral = decode < subagent < conversation < system), then priority (low first), then
         least recently used first;
      2. then the TTL-pinned (unexpired) blocks, in the same (class, priority, LRU) order.
    A caller that has to take a block of group 2 is under pressure: it must check
    `is_ttl_pinned(block_id)`, count a pressure eviction, and demote the block to a lower tier
    rather than drop it.
  * `accessed` (a hit) moves the block to the MRU end of its bucket and restarts its TTL (a hit on a
    block whose pin already expired pins it again for its TTL). `retain` sets or replaces class,
    priority and TTL and restarts the TTL. Pins expire by themselves: an expired block becomes the
    least recently used of its bucket (first to go among equals).
  * `retain` may be called before `inserted` (the retention waits for the block) or after.
    `removed` forgets the block and its retention.

Complexity (P = blocks held, B = non-empty (class, priority) buckets, at most 2 x 4 x 101):
  inserted / accessed / retain: O(log P) amortised (one heap push for a TTL, O(B) only when a
  bucket is created); removed: O(1) (O(B) when a bucket empties); candidates(): O(E log P) to
  expire E pins, then O(1) per block yielded plus O(B) to walk the buckets. No per-call sort of
  blocks. Not thread-safe: event loop only, like every policy.
"""

from __future__ import annotations

import bisect
import heapq
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Hashable, Iterator

from .eviction import EvictionPolicy

CLASS_RANK = {"ephemeral": 0, "decode": 0, "subagent": 1, "conversation": 2, "system": 3}
CLASSES = tuple(CLASS_RANK)
TTL_VALUES = {"5m": 300.0, "1h": 3600.0}
DEFAULT_TTL_S = 300.0


@dataclass(frozen=True)
class Retention:
    """How long a block should stay: class (see CLASS_RANK), priority 0..100, TTL pin in seconds."""
    cls: str = "conversation"
    priority: int = 50
    ttl_s: float | None = None

    def __post_init__(self):
        if self.cls not in CLASS_RANK:
            raise ValueError(f"unknown retention class {self.cls!r}; expected one of {', '.join(CLASSES)}")
        if isinstance(self.priority, bool) or not isinstance(self.priority, int) or not 0 <= self.priority <= 100:
            raise ValueError(f"priority must be an int in 0..100, got {self.priority!r}")
        if self.ttl_s is not None and not (self.ttl_s > 0):
            raise ValueError(f"ttl_s must be positive or None, got {self.ttl_s!r}")

    @property
    def rank(self) -> int:
        return CLASS_RANK[self.cls]


DEFAULT_RETENTION = Retention("conversation", 50, None)


def parse_cache_control(obj) -> float:
    """Anthropic cache_control -> TTL seconds: {"type": "ephemeral"} -> 300, "ttl": "5m" -> 300,
    "1h" -> 3600. Anything else raises ValueError."""
    if not isinstance(obj, dict):
        raise ValueError(f"cache_control must be an object, got {obj!r}")
    if obj.get("type") != "ephemeral":
        raise ValueError(f"cache_control type must be 'ephemeral', got {obj.get('type')!r}")
    if "ttl" not in obj:
        return DEFAULT_TTL_S
    ttl = obj["ttl"]
    if ttl not in TTL_VALUES:
        raise ValueError(f"cache_control ttl must be '5m' or '1h', got {ttl!r}")
    return TTL_VALUES[ttl]


def range_retention(num_blocks: int, block_size: int, first_tokens: int, first: Retention,
                    rest: Retention) -> list[Retention]:
    """Per-range retention within one request: block i covers tokens [i*block_size, (i+1)*block_size);
    a block holding at least one of the first `first_tokens` tokens gets `first`, the others `rest`."""
    if num_blocks < 0 or block_size <= 0 or first_tokens < 0:
        raise ValueError("num_blocks >= 0, block_size > 0, first_tokens >= 0 required")
    n_first = min(num_blocks, -(-first_tokens // block_size))
    return [first] * n_first + [rest] * (num_blocks - n_first)


class RetentionPolicy(EvictionPolicy):
    """See the module docstring. `clock` returns seconds (monotonic); inject a fake one in tests."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self._clock = clock
        self._retention: dict[Hashable, Retention] = {}       # retain()ed, present or waiting
        self._where: dict[Hashable, tuple[bool, tuple[int, int]]] = {}   # present: (pinned, bucket key)
        self._deadline: dict[Hashable, float] = {}              # pinned blocks only
        self._heap: list[tuple[float, int, Hashable]] = []     # (deadline, seq, id); stale entries skipped
        self._seq = 0
        # bucket key (rank, priority) -> OrderedDict in LRU order (first = least recent)
        self._buckets: list[dict[tuple[int, int], OrderedDict]] = [{}, {}]   # [unpinned, pinned]
        self._keys: list[list[tuple[int, int]]] = [[], []]                   # sorted non-empty keys

    # -- bucket helpers --------------------------------------------------------------------------
    def _add(self, block_id, pinned: bool, key, lru_end: bool = False) -> None:
        buckets = self._buckets[pinned]
        bucket = buckets.get(key)
        if bucket is None:
            bucket = buckets[key] = OrderedDict()
            bisect.insort(self._keys[pinned], key)
        bucket[block_id] = None
        if lru_end:
            bucket.move_to_end(block_id, last=False)
        self._where[block_id] = (pinned, key)

    def _drop(self, block_id) -> None:
        pinned, key = self._where.pop(block_id)
        buckets = self._buckets[pinned]
        bucket = buckets[key]
        del bucket[block_id]
        if not bucket:
            del buckets[key]
            keys = self._keys[pinned]
            del keys[bisect.bisect_left(keys, key)]

    def _place(self, block_id) -> None:
        """(Re)files a present block as most recently used, pinning it for its TTL if it has one."""
        ret = self._retention.get(block_id, DEFAULT_RETENTION)
        key = (ret.rank, ret.priority)
        if ret.ttl_s is not None:
            deadline = self._clock() + ret.ttl_s
            self._deadline[block_id] = deadline
            self._seq += 1
            heapq.heappush(self._heap, (deadline, self._seq, block_id))
            if len(self._heap) > 2 * len(self._deadline) + 64:
                self._compact()
            self._add(block_id, True, key)
        else:
            self._deadline.pop(block_id, None)
            self._add(block_id, False, key)

    def _compact(self) -> None:
        self._heap = [e for e in self._heap if self._deadline.get(e[2]) == e[0]]
        heapq.heapify(self._heap)

    def _expire(self) -> None:
        now = self._clock()
        heap = self._heap
        while heap and heap[0][0] <= now:
            deadline, _, block_id = heapq.heappop(heap)
            if self._deadline.get(block_id) != deadline:
                continue                                      # stale: refreshed or removed since
            del self._deadline[block_id]
            _, key = self._where[block_id]
            self._drop(block_id)
            self._add(block_id, False, key, lru_end=True)     # expired: oldest of its bucket

    # -- EvictionPolicy --------------------------------------------------------------------------
    def inserted(self, block_id) -> None:
        if block_id in self._where:
            self._drop(block_id)
        self._place(block_id)

    def accessed(self, block_id) -> None:
        if block_id in self._where:
            self._drop(block_id)
            self._place(block_id)

    def removed(self, block_id) -> None:
        if block_id in self._where:
            self._drop(block_id)
        self._deadline.pop(block_id, None)
        self._retention.pop(block_id, None)

    def candidates(self) -> Iterator[Hashable]:
        """Unpinned (or expired) blocks by (class rank, priority, LRU), then TTL-pinned ones likewise."""
        self._expire()
        for pinned in (False, True):
            buckets = self._buckets[pinned]
            for key in self._keys[pinned]:
                yield from buckets[key]

    def __len__(self) -> int:
        return len(self._where)

    # -- retention API ---------------------------------------------------------------------------
    def retain(self, block_id, retention: Retention) -> None:
        """Sets or replaces the block's class, priority and TTL (restarting the TTL). Before `inserted`
        the retention waits for the block; `removed` forgets it."""
        if not isinstance(retention, Retention):
            raise TypeError("retention must be a Retention")
        self._retention[block_id] = retention
        if block_id in self._where:
            self._drop(block_id)
            self._place(block_id)

    def retention_of(self, block_id) -> Retention:
        return self._retention.get(block_id, DEFAULT_RETENTION)

    def is_ttl_pinned(self, block_id) -> bool:
        """True while the block is present and its TTL has not run out (evicting it = pressure)."""
        deadline = self._deadline.get(block_id)
        return deadline is not None and deadline > self._clock()


RETENTION_POLICIES = {"retention": RetentionPolicy}
