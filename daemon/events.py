"""Block events with a monotonic sequence number: a bounded replay ring plus bounded live watchers.

Contract: emit() never blocks and never fails; a watcher whose queue fills up is cut off (it gets
an overflow marker and must resume from the next sequence number). Event loop only.
"""

from __future__ import annotations

import asyncio
from collections import deque

from kvtier.proto.v1 import kvtier_pb2 as pb

from .catalog import now_ms
from .errors import exhausted, out_of_range


OVERFLOW = object()


class EventLog:
    def __init__(self, ring_size: int, watcher_queue: int, max_watchers: int):
        self.seq = 0
        self._ring: deque[pb.Event] = deque(maxlen=ring_size)
        self._watchers: set[asyncio.Queue] = set()
        self._watcher_queue = watcher_queue
        self._max_watchers = max_watchers

    def emit(self, type_: int, namespace: str, key: bytes = b"", tier: int = 0, from_tier: int = 0,
             length: int = 0, parent: bytes = b"") -> None:
        self.seq += 1
        event = pb.Event(seq=self.seq, type=type_, namespace=namespace, key=key, parent=parent, tier=tier,
                         from_tier=from_tier, length=length, unix_ms=now_ms())
        self._ring.append(event)
        for queue in list(self._watchers):
            if queue.full():
                self._watchers.discard(queue)
                queue.get_nowait()
                queue.put_nowait(OVERFLOW)
            else:
                queue.put_nowait(event)

    def subscribe(self, from_seq: int) -> tuple[list[pb.Event], asyncio.Queue]:
        """Replays events with seq >= from_seq (0: none) and registers a live queue, atomically."""
        if len(self._watchers) >= self._max_watchers:
            raise exhausted(f"too many watchers ({self._max_watchers}); raise limits.max_watchers")
        replay: list[pb.Event] = []
        if from_seq:
            oldest = self._ring[0].seq if self._ring else self.seq + 1
            if from_seq < oldest and from_seq <= self.seq:
                raise out_of_range(
                    f"sequence {from_seq} is no longer in the replay ring (oldest is {oldest}); "
                               "take a fresh Inventory and watch from the current sequence")
            replay = [e for e in self._ring if e.seq >= from_seq]
        queue: asyncio.Queue = asyncio.Queue(maxsize=self._watcher_queue)
        self._watchers.add(queue)
        return replay, queue

    def unsubscribe(self, queue: asyncio.Queue) -> None:
        self._watchers.discard(queue)

    @property
    def watchers(self) -> int:
        return len(self._watchers)
