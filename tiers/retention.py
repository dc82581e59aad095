"""Agent-aware retention: an eviction policy that orders blocks by retention class, priority, TTL
pin and learned hit density (issue 5). A drop-in `EvictionPolicy`; `LruPolicy` stays available for
comparison.

Semantics (see docs/retention.md):
  * Every block has a `Retention`: a class, a priority 0..100 (higher = kept longer) and an optional
    TTL in seconds (a cache_control pin). Blocks never `retain`ed get DEFAULT_RETENTION:
    class "conversation", priority 50, no TTL.
  * `candidates()` yields, first to go first:
      1. every block that is not TTL-pinned (never pinned, or pin expired), ordered by class rank
         (ephemeral = decode < subagent < conversation < system), then priority (low first), then
         least recently used first;
      2. then the TTL-pinned (unexpired) blocks, ordered by pinned rank (ephemeral = decode <
         subagent = conversation < system: a pinned subagent block belongs to a running subagent,
         which re-reads it every turn), then priority (low first), then hit density (low first).
    A caller that has to take a block of group 2 is under pressure: it must check
    `is_ttl_pinned(block_id)`, count a pressure eviction, and demote the block to a lower tier
    rather than drop it.
  * Hit density (LHD, Beckmann et al., NSDI 2018) is the number of hits a block can still be expected
    to get per second it stays cached, given its age (seconds since its last access) and its kind
    (class, and whether it was hit since it was stored). It is learned online from the ages at which
    blocks of that kind were hit and were removed (`HitDensity`). For an agent's conversation it is
    low right after a request (the session is now in a tool call), higher for a session paused long
    enough that it is due back, and ~0 past the longest pauses seen (the session is gone), so under
    pressure the store gives up whole idle sessions instead of the prefix every session is about to
    re-read. Blocks accessed within the same `epoch_s` window (one request's prefix) are ranked
    together; within a window the most recently filed block goes first (a chain's tail before its
    head, so that what stays is a usable prefix). Before the model has data every density is 0 and
    the pinned order is least recently used window first.
  * `accessed` (a hit) refreshes the block's window and restarts its TTL (a hit on a block whose pin
    already expired pins it again for its TTL). `retain` sets or replaces class, priority and TTL and
    restarts the TTL; it is not an access. Pins expire by themselves: an expired block becomes the
    least recently used of its bucket (first to go among equals).
  * `retain` may be called before `inserted` (the retention waits for the block) or after.
    `removed` forgets the block and its retention. Lifecycle hints are `retain` calls (SetRetention):
    a finished subagent's blocks re-retained as `ephemeral` without TTL go first; an agent that gave
    its final answer can lower its conversation's priority until the user comes back.

Complexity (P = blocks held, B = non-empty buckets, at most 2 x 4 x 101; W = non-empty (window, kind)
groups in one pinned bucket, at most TTL / epoch_s x 2 per class):
  inserted / accessed / retain: O(log P) amortised (one heap push for a TTL, O(B) only when a bucket
  is created); removed: O(1) (O(B) when a bucket empties); candidates(): O(E log P) to expire E pins,
  O(1) per unpinned block yielded, O(W log W) once per pinned bucket reached (its windows sorted by
  density) and O(1) per pinned block yielded. A density table is rebuilt every 512 of its events
  (O(bins), 48 bins). Not thread-safe: event loop only, like every policy.
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
PINNED_RANK = {"ephemeral": 0, "decode": 0, "subagent": 2, "conversation": 2, "system": 3}
CLASSES = tuple(CLASS_RANK)
TTL_VALUES = {"5m": 300.0, "1h": 3600.0}
DEFAULT_TTL_S = 300.0
MAX_TTL_S = 365 * 86400.0  # a hard bound (deadlines stay finite); the daemon's limits.max_ttl_s is lower


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
        if self.ttl_s is not None and not (isinstance(self.ttl_s, (int, float)) and 0 < self.ttl_s <= MAX_TTL_S):
            raise ValueError(f"ttl_s must be a finite number of seconds in (0, {MAX_TTL_S:.0f}] or None, "
                             f"got {self.ttl_s!r}")

    @property
    def rank(self) -> int:
        return CLASS_RANK[self.cls]

    @property
    def pinned_rank(self) -> int:
        return PINNED_RANK[self.cls]


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


def _age_edges() -> list[float]:
    """Bin edges in seconds: 0.5 s steps up to 8 s, then x1.25 up to ~2 h."""
    edges = [0.5 * i for i in range(1, 17)]
    while edges[-1] < 7200:
        edges.append(edges[-1] * 1.25)
    return edges


_EDGES = _age_edges()
_MIDS = [_EDGES[0] / 2] + [(a + b) / 2 for a, b in zip(_EDGES, _EDGES[1:])] + [_EDGES[-1] * 1.125]


class HitDensity:
    """Per-class model of how valuable a block of a given age (seconds since its last access) is:
    density(age) = expected further hits / expected further seconds in the cache, from histograms of
    the ages at which blocks were hit and at which they were evicted (LHD). Counts are halved every
    `decay_every` events so the model follows the workload; the table is rebuilt every `refresh`."""

    EDGES = _EDGES          # bin i holds ages in [EDGES[i-1], EDGES[i]); the last bin everything older
    MIDS = _MIDS

    def __init__(self, refresh: int = 512, decay_every: int = 65536):
        if refresh < 1 or decay_every < 1:
            raise ValueError("refresh and decay_every must be >= 1")
        n = len(self.MIDS)
        self.hits = [0.0] * n
        self.ends = [0.0] * n          # hits + evictions
        self.table = [0.0] * n
        self.refresh = refresh
        self.decay_every = decay_every
        self.events = 0

    @classmethod
    def bin_of(cls, age: float) -> int:
        return bisect.bisect_right(cls.EDGES, age) if age > 0 else 0

    def record(self, age: float, hit: bool) -> None:
        i = self.bin_of(age)
        self.ends[i] += 1.0
        if hit:
            self.hits[i] += 1.0
        self.events += 1
        if self.events % self.decay_every == 0:
            self.hits = [h / 2 for h in self.hits]
            self.ends = [e / 2 for e in self.ends]
        if self.events % self.refresh == 0 or (self.events < self.refresh and self.events & (self.events - 1) == 0):
            self._rebuild()

    def _rebuild(self) -> None:
        mids, n = self.MIDS, len(self.MIDS)
        table = [0.0] * n
        hits = ends = ends_age = 0.0            # suffix sums over bins >= i
        for i in range(n - 1, -1, -1):
            hits += self.hits[i]
            ends += self.ends[i]
            ends_age += self.ends[i] * mids[i]
            if hits:
                lifetime = ends_age - ends * mids[i] + ends * 0.5   # expected further seconds, x ends
                table[i] = hits / lifetime
        self.table = table

    def density(self, age: float) -> float:
        return self.table[self.bin_of(age)]


class RetentionPolicy(EvictionPolicy):
    """See the module docstring. `clock` returns seconds (monotonic); inject a fake one in tests.
    `pinned_order`: "density" (default) or "lru" (pinned blocks by least recent window, the order
    before hit densities; kept for comparison). `epoch_s`: accesses within this window count as one."""

    def __init__(self, clock: Callable[[], float] = time.monotonic, pinned_order: str = "density",
                 epoch_s: float = 1.0):
        if pinned_order not in ("density", "lru"):
            raise ValueError(f"pinned_order must be 'density' or 'lru', got {pinned_order!r}")
        if not epoch_s > 0:
            raise ValueError("epoch_s must be positive")
        self._clock = clock
        self._by_density = pinned_order == "density"
        self._epoch_s = epoch_s
        self._retention: dict[Hashable, Retention] = {}       # retain()ed, present or waiting
        self._where: dict[Hashable, tuple] = {}                # present: (pinned, bucket key, group key)
        self._last: dict[Hashable, float] = {}                 # present: time of the last access
        self._deadline: dict[Hashable, float] = {}             # pinned blocks only
        self._heap: list[tuple[float, int, Hashable]] = []     # (deadline, seq, id); stale entries skipped
        self._seq = 0
        # unpinned: bucket key (rank, priority) -> OrderedDict in LRU order (first = least recent)
        # pinned: bucket key (pinned rank, priority) -> OrderedDict window (epoch, (cls, reused)) ->
        #         OrderedDict of blocks in filing order
        self._buckets: list[dict] = [{}, {}]
        self._keys: list[list[tuple[int, int]]] = [[], []]     # sorted non-empty keys
        # one model per kind of block: (class, hit since it was stored)
        self._density: dict[tuple[str, bool], HitDensity] = {(cls, r): HitDensity() for cls in CLASSES
                                                             for r in (False, True)}
        self._reused: set = set()                              # present blocks hit since inserted

    # -- bucket helpers --------------------------------------------------------------------------
    def _bucket(self, pinned: bool, key):
        buckets = self._buckets[pinned]
        bucket = buckets.get(key)
        if bucket is None:
            bucket = buckets[key] = OrderedDict()
            bisect.insort(self._keys[pinned], key)
        return bucket

    def _add_unpinned(self, block_id, key, lru_end: bool = False) -> None:
        bucket = self._bucket(False, key)
        bucket[block_id] = None
        if lru_end:
            bucket.move_to_end(block_id, last=False)
        self._where[block_id] = (False, key, None)

    def _add_pinned(self, block_id, key, cls: str) -> None:
        group_key = (int(self._last[block_id] // self._epoch_s), (cls, block_id in self._reused))
        bucket = self._bucket(True, key)
        group = bucket.get(group_key)
        if group is None:
            group = bucket[group_key] = OrderedDict()
        group[block_id] = None
        self._where[block_id] = (True, key, group_key)

    def _drop(self, block_id) -> None:
        pinned, key, group_key = self._where.pop(block_id)
        buckets = self._buckets[pinned]
        bucket = buckets[key]
        if pinned:
            group = bucket[group_key]
            del group[block_id]
            if not group:
                del bucket[group_key]
        else:
            del bucket[block_id]
        if not bucket:
            del buckets[key]
            keys = self._keys[pinned]
            del keys[bisect.bisect_left(keys, key)]

    def _place(self, block_id) -> None:
        """(Re)files a present block, pinning it for its TTL (from now) if it has one."""
        ret = self._retention.get(block_id, DEFAULT_RETENTION)
        if ret.ttl_s is not None:
            deadline = self._clock() + ret.ttl_s
            self._deadline[block_id] = deadline
            self._seq += 1
            heapq.heappush(self._heap, (deadline, self._seq, block_id))
            if len(self._heap) > 2 * len(self._deadline) + 64:
                self._compact()
            self._add_pinned(block_id, (ret.pinned_rank, ret.priority), ret.cls)
        else:
            self._deadline.pop(block_id, None)
            self._add_unpinned(block_id, (ret.rank, ret.priority))

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
            ret = self._retention.get(block_id, DEFAULT_RETENTION)
            self._drop(block_id)
            self._add_unpinned(block_id, (ret.rank, ret.priority), lru_end=True)  # expired: oldest of its bucket

    def _record(self, block_id, hit: bool) -> None:
        age = self._clock() - self._last[block_id]
        cls = self._retention.get(block_id, DEFAULT_RETENTION).cls
        self._density[cls, block_id in self._reused].record(age, hit)

    # -- EvictionPolicy --------------------------------------------------------------------------
    def inserted(self, block_id) -> None:
        if block_id in self._where:
            self._drop(block_id)
        self._reused.discard(block_id)
        self._last[block_id] = self._clock()
        self._place(block_id)

    def accessed(self, block_id) -> None:
        if block_id in self._where:
            self._record(block_id, hit=True)
            self._reused.add(block_id)
            self._drop(block_id)
            self._last[block_id] = self._clock()
            self._place(block_id)

    def removed(self, block_id) -> None:
        if block_id in self._where:
            self._record(block_id, hit=False)
            self._drop(block_id)
        self._last.pop(block_id, None)
        self._reused.discard(block_id)
        self._deadline.pop(block_id, None)
        self._retention.pop(block_id, None)

    def candidates(self) -> Iterator[Hashable]:
        """Unpinned (or expired) blocks by (class rank, priority, LRU), then TTL-pinned ones by
        (pinned rank, priority, hit density of their window, newest of a window first)."""
        self._expire()
        unpinned = self._buckets[False]
        for key in list(self._keys[False]):
            bucket = unpinned.get(key)
            if bucket is not None:
                yield from bucket
        pinned = self._buckets[True]
        for key in list(self._keys[True]):
            bucket = pinned.get(key)
            if bucket is not None:
                yield from self._pinned_order(bucket)

    def _pinned_order(self, bucket) -> Iterator[Hashable]:
        now = self._clock()
        if self._by_density:
            span, density = self._epoch_s, self._density
            order = sorted(bucket, key=lambda g: (density[g[1]].density(now - g[0] * span), g[0]))
        else:
            order = list(bucket)                                # windows in time order: LRU
        for group_key in order:
            group = bucket.get(group_key)
            if group is not None:
                yield from reversed(group)

    def __len__(self) -> int:
        return len(self._where)

    # -- retention API ---------------------------------------------------------------------------
    def retain(self, block_id, retention: Retention) -> None:
        """Sets or replaces the block's class, priority and TTL (restarting the TTL). Before `inserted`
        the retention waits for the block; `removed` forgets it. Not an access."""
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
