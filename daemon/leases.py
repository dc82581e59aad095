"""Write allocations and read leases, each with a deadline, so a crashed client cannot pin memory.

Contract: ids are random 63-bit integers (never 0, never one that is open), so a client cannot
guess another client's id; ownership is still checked by the service (a guessed id of another
tenant reads as not open). take() removes and returns an entry exactly once (a second take is
None: double release is detectable); expired() hands each expired entry out once. Event loop only.
"""

from __future__ import annotations

import dataclasses
import heapq
import secrets
import time
from collections import Counter


@dataclasses.dataclass(slots=True)
class Held:
    id: int
    items: list           # slots for an allocation, block ids for a read lease
    deadline: float       # time.monotonic()
    namespace: str = ""
    gpu_items: list = dataclasses.field(default_factory=list)  # read leases: blocks also pinned on the GPU
    owner: str | None = None  # the tenant that opened it (None: an admin or the daemon itself)
    part: int = 0             # allocations: the arena part its slots are in
    charged: str | None = None  # the owner whose limit this entry counts against (set by add)


class LeaseTable:
    """At most `limit` entries open, and at most owner_limits[tenant] of them owned by that tenant
    (so one tenant cannot take the whole table from the others); a tenant named in no owner_limits
    gets `default_owner_limit` (None: only the table's limit)."""

    def __init__(self, limit: int, owner_limits: dict[str, int] | None = None,
                 default_owner_limit: int | None = None):
        self._limit = limit
        self._owner_limits = dict(owner_limits or {})
        self._default_owner_limit = default_owner_limit
        self._owned: Counter[str] = Counter()
        self._held: dict[int, Held] = {}
        self._deadlines: list[tuple[float, int]] = []

    def __len__(self) -> int:
        return len(self._held)

    def owned(self, owner: str | None) -> int:
        return self._owned[owner] if owner is not None else 0

    def full(self, owner: str | None = None) -> bool:
        """No room for one more entry (for `owner`: in the table, or within the owner's limit)."""
        if len(self._held) >= self._limit:
            return True
        if owner is None:
            return False
        bound = self._owner_limits.get(owner, self._default_owner_limit)
        return bound is not None and self._owned[owner] >= bound

    def add(self, items: list, lease_ms: int, namespace: str = "", owner: str | None = None) -> Held:
        assert not self.full(owner)
        held = Held(self._new_id(), items, time.monotonic() + lease_ms / 1000, namespace, owner=owner,
                    charged=owner)
        self._held[held.id] = held
        if owner is not None:
            self._owned[owner] += 1
        heapq.heappush(self._deadlines, (held.deadline, held.id))
        return held

    def _closed(self, held: Held | None) -> Held | None:
        if held is not None and held.charged is not None:
            self._owned[held.charged] -= 1
            assert self._owned[held.charged] >= 0
            if not self._owned[held.charged]:
                del self._owned[held.charged]
        return held

    def _new_id(self) -> int:
        """A random id that is not open: sequential ids would let one client release, abort or
        commit another's by counting. (An id reused after it closed reads as the new entry, which
        the owner check confines to the new entry's own tenant.)"""
        while True:
            held_id = secrets.randbits(63)
            if held_id and held_id not in self._held:
                return held_id

    def get(self, held_id: int) -> Held | None:
        return self._held.get(held_id)

    def take(self, held_id: int) -> Held | None:
        return self._closed(self._held.pop(held_id, None))

    def expired(self, now: float | None = None) -> list[Held]:
        now = time.monotonic() if now is None else now
        out = []
        while self._deadlines and self._deadlines[0][0] <= now:
            deadline, held_id = heapq.heappop(self._deadlines)
            held = self._held.get(held_id)
            # The deadline must be this entry's own: a closed entry's heap item stays behind, and
            # a random id may (rarely) come back for a newer entry with a later deadline.
            if held is not None and held.deadline == deadline:
                out.append(self._closed(self._held.pop(held_id)))
        return out
