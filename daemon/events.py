"""Block events with one node-wide monotonic sequence number, in bounded replay rings with bounded
live watchers, one ring per audience, so that one tenant's churn cuts or rewinds only its own watchers.

Rings (every event goes to the node ring and to exactly one of the others):
* the node ring: every event; the administrators' Watch and the node-wide KV-event stream.
* one ring per configured tenant ([[tenant]], its own `ring_size`): the events of its namespaces
  ("<tenant>/..."); its Watch streams and its own KV-event stream.
* the shared ring: the events of every other namespace (the administrators' own, and those of
  tenants without a [[tenant]] table, e.g. a TCP token's tenant); those tenants' Watch streams.

Sequence numbers are node-wide: a ring holds its events with their node-wide seq, so a principal's
events rise but are not contiguous. A ring remembers the highest seq it has dropped (`evicted`):
replaying from `from_seq` is possible exactly when `from_seq > evicted`, whatever other rings did.
That keeps Snapshot's contract ("watch from seq + 1 and miss nothing") for every principal.

Watcher bounds: each configured tenant's ring has its own (`max_watchers` of its table) and nobody
else's watchers count there; the administrators and the tenants without a table share the
node-wide bound (limits.max_watchers), and each such tenant also has its own small bound
(limits.untabled_tenant_max_watchers). The daemon's own KV-event publishers are `internal`
watchers: bounded by configuration (one per stream), not counted.

Contract: emit() never blocks and never fails; a watcher whose queue holds `watcher_queue` events
is cut off: it gets every event up to the cut, then the OVERFLOW marker, and must resume from the
next sequence number (nothing is dropped silently before the marker). Event loop only.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections import Counter, deque

from kvtier.proto.v1 import kvtier_pb2 as pb

from .catalog import now_ms
from .errors import exhausted, out_of_range


OVERFLOW = object()
ADMIN = None  # the principal's tenant for an administrator: the node ring


class _Ring:
    def __init__(self, name: str, size: int):
        self.name = name
        self.events: deque[pb.Event] = deque()
        self.size = size
        self.evicted = 0  # highest seq dropped from this ring (0: none)
        self.watchers: set[asyncio.Queue] = set()

    def append(self, event: pb.Event) -> None:
        if len(self.events) >= self.size:
            self.evicted = self.events.popleft().seq
        self.events.append(event)


@dataclasses.dataclass(frozen=True)
class _Subscription:
    ring: _Ring
    owner: str | None      # the tenant charged (None: administrators or internal)
    pooled: bool           # counts against the shared pool (administrators, tenants without a table)


class EventLog:
    def __init__(self, ring_size: int, watcher_queue: int, max_watchers: int, tenants=(),
                 untabled_max_watchers: int | None = None):
        """`tenants`: (name, ring_size, max_watchers) of each configured tenant."""
        self.seq = 0
        self._node = _Ring("the node", ring_size)
        self._shared = _Ring("the shared", ring_size)
        self._tenants = {name: (_Ring(f"tenant {name}'s", size), bound) for name, size, bound in tenants}
        self._watcher_queue = watcher_queue
        self._max_watchers = max_watchers
        self._untabled_max = max_watchers if untabled_max_watchers is None else untabled_max_watchers
        self._subscriptions: dict[asyncio.Queue, _Subscription] = {}
        self._pooled = 0                       # watchers of the shared pool
        self._owned: Counter[str] = Counter()  # watchers per tenant

    def tenant_of(self, namespace: str) -> str | None:
        """The configured tenant whose namespace this is, or None."""
        prefix, sep, _ = namespace.partition("/")
        return prefix if sep and prefix in self._tenants else None

    def emit(self, type_: int, namespace: str, key: bytes = b"", tier: int = 0, from_tier: int = 0,
             length: int = 0, parent: bytes = b"") -> None:
        self.seq += 1
        event = pb.Event(seq=self.seq, type=type_, namespace=namespace, key=key, parent=parent, tier=tier,
                         from_tier=from_tier, length=length, unix_ms=now_ms())
        tenant = self.tenant_of(namespace)
        for ring in (self._node, self._tenants[tenant][0] if tenant is not None else self._shared):
            ring.append(event)
            for queue in list(ring.watchers):
                if queue.qsize() >= self._watcher_queue:
                    ring.watchers.discard(queue)
                    queue.put_nowait(OVERFLOW)  # the queue has room for exactly this one more
                else:
                    queue.put_nowait(event)

    def subscribe(self, from_seq: int, tenant: str | None = ADMIN,
                  internal: bool = False) -> tuple[list[pb.Event], asyncio.Queue]:
        """Replays the events of `tenant`'s ring (None: the node ring, every event) with seq >=
        from_seq (0: none) and registers a live queue, atomically. RESOURCE_EXHAUSTED past the
        watcher bound that applies; OUT_OF_RANGE when the ring dropped an event at or after from_seq."""
        ring, bound = self._ring_for(tenant)
        pooled = not internal and bound is None
        if not internal:
            self._check_room(tenant, bound)
        replay: list[pb.Event] = []
        if from_seq:
            if from_seq <= ring.evicted:
                raise out_of_range(
                    f"sequence {from_seq} is no longer in {ring.name} event ring (it holds events after "
                    f"{ring.evicted}); take a fresh Snapshot and watch from its seq + 1")
            replay = [e for e in ring.events if e.seq >= from_seq]
        queue: asyncio.Queue = asyncio.Queue(maxsize=self._watcher_queue + 1)  # + 1: room for OVERFLOW
        ring.watchers.add(queue)
        owner = None if internal else tenant
        self._subscriptions[queue] = _Subscription(ring, owner, pooled)
        self._pooled += pooled
        if owner is not None:
            self._owned[owner] += 1
        return replay, queue

    def _ring_for(self, tenant: str | None) -> tuple[_Ring, int | None]:
        """The ring a principal watches, and its own watcher bound (None: the shared pool's)."""
        if tenant is ADMIN:
            return self._node, None
        if tenant in self._tenants:
            return self._tenants[tenant]
        return self._shared, None

    def _check_room(self, tenant: str | None, bound: int | None) -> None:
        if bound is not None:
            if self._owned[tenant] >= bound:
                raise exhausted(f"tenant {tenant} has its max_watchers ({bound}) Watch streams open")
            return
        if tenant is not ADMIN and self._owned[tenant] >= self._untabled_max:
            raise exhausted(f"tenant {tenant} has no [[tenant]] table and its "
                            f"limits.untabled_tenant_max_watchers ({self._untabled_max}) Watch streams open")
        if self._pooled >= self._max_watchers:
            raise exhausted(f"the node's watchers for administrators and tenants without a [[tenant]] table "
                            f"are all in use ({self._max_watchers}); raise limits.max_watchers")

    def unsubscribe(self, queue: asyncio.Queue) -> None:
        sub = self._subscriptions.pop(queue, None)
        if sub is None:
            return
        sub.ring.watchers.discard(queue)
        self._pooled -= sub.pooled
        if sub.owner is not None:
            self._owned[sub.owner] -= 1
            if not self._owned[sub.owner]:
                del self._owned[sub.owner]

    @property
    def watchers(self) -> int:
        return len(self._subscriptions)
