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


@dataclasses.dataclass(slots=True)
class Held:
    id: int
    items: list           # slots for an allocation, block ids for a read lease
    deadline: float       # time.monotonic()
    namespace: str = ""
    gpu_items: list = dataclasses.field(default_factory=list)  # read leases: blocks also pinned on the GPU
    owner: str | None = None  # the tenant that opened it (None: an admin or the daemon itself)


class LeaseTable:
    def __init__(self, limit: int):
        self._limit = limit
        self._held: dict[int, Held] = {}
        self._deadlines: list[tuple[float, int]] = []

    def __len__(self) -> int:
        return len(self._held)

    def full(self) -> bool:
        return len(self._held) >= self._limit

    def add(self, items: list, lease_ms: int, namespace: str = "") -> Held:
        assert not self.full()
        held = Held(self._new_id(), items, time.monotonic() + lease_ms / 1000, namespace)
        self._held[held.id] = held
        heapq.heappush(self._deadlines, (held.deadline, held.id))
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
        return self._held.pop(held_id, None)

    def expired(self, now: float | None = None) -> list[Held]:
        now = time.monotonic() if now is None else now
        out = []
        while self._deadlines and self._deadlines[0][0] <= now:
            deadline, held_id = heapq.heappop(self._deadlines)
            held = self._held.get(held_id)
            # The deadline must be this entry's own: a closed entry's heap item stays behind, and
            # a random id may (rarely) come back for a newer entry with a later deadline.
            if held is not None and held.deadline == deadline:
                out.append(self._held.pop(held_id))
        return out
