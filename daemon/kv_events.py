"""Router-ready KV events: the EventLog republished in vLLM's KV-event wire format over ZeroMQ.

A KV-aware router (vLLM's own subscribers, Dynamo's KV router, llm-d's indexer) that already
consumes vLLM's `ZmqEventPublisher` can consume kvtierd's block events unchanged:

* PUB socket, multipart messages ``(topic, seq, payload)``: ``seq`` is the batch sequence number
  as 8 bytes big-endian (0, 1, 2, ... per publisher), ``payload`` is a msgpack ``KVEventBatch``
  (``[ts, [events...]]``, array-like; each event a map tagged ``{"type": "BlockStored", ...}``).
* Optional ROUTER replay socket: a client (DEALER, or REQ for one reply) sends the start batch
  sequence number as 8 bytes big-endian; it gets every buffered batch with seq >= start as
  ``(topic, seq, payload)`` followed by the end marker ``(b"", (-1).to_bytes(8, "big",
  signed=True), b"")`` -- byte for byte what vllm.distributed.kv_events.ZmqEventPublisher does.

The msgspec structs below mirror vLLM 0.32's (same class names, so the same tags; same required
fields; optional ones left at their defaults are omitted on the wire exactly as vLLM omits them),
so the daemon does not import vLLM. tests/daemon/test_kv_events.py decodes with vLLM's decoder.

Mapping (kvtier.v1.Event -> vLLM event), one vLLM event per kvtier event:
  BLOCK_STORED(tier)        -> BlockStored(block_hashes=[key], parent_block_hash=parent or None, medium=tier)
  BLOCK_MOVED(from -> tier) -> BlockStored on the destination medium (the source copy stays)
  BLOCK_REMOVED(tier)       -> BlockRemoved(block_hashes=[key], medium=tier)
  BLOCK_QUARANTINED(tier)   -> BlockRemoved(block_hashes=[key], medium=tier)
  ALL_CLEARED               -> AllBlocksCleared()
Medium: GPU -> "GPU", CPU -> "CPU", DISK -> "STORAGE" (vLLM's MEDIUM_* constants), S3 -> "S3"
(vLLM has no constant for it; `medium` is a free-form string). Overridable via `mediums=`.

Namespaces: vLLM's format has no namespace field, so the namespace goes in the topic frame:
``f"{topic}/{namespace}"`` (ZMQ SUB filters by prefix), and a batch never mixes namespaces.
With ``namespace_topics=False`` every batch carries the bare topic (one model per daemon).

Access: every subscriber reads every namespace name and block hash; ZMQ has no authentication here.
An ``ipc://`` endpoint is a socket file created with mode ``ipc_mode`` (default 0600) before anyone
can reach it (see `_listen_ipc`); its directory must exist. Which tcp:// addresses are allowed is
config validation's business (events.allow_remote).

Never blocks the event loop: the EventLog watcher queue is the bounded buffer; sends are
non-blocking; a message ZMQ refuses (HWM) is dropped and counted, logged at most every 10 s.
If the watcher queue overflows (the publisher fell behind) it resumes from the EventLog ring
without loss; if the ring no longer has the events it publishes AllBlocksCleared (consumers must
forget what they knew) on the topic of every namespace it has published or that `namespaces()`
lists, and resumes from the current sequence.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import stat
import tempfile
import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any

import msgspec
import zmq
import zmq.asyncio

from kvtier.proto.v1 import kvtier_pb2 as pb

from .errors import ApiError
from .events import OVERFLOW, EventLog

log = logging.getLogger(__name__)

END_SEQ = (-1).to_bytes(8, "big", signed=True)
DEFAULT_MEDIUMS = {pb.TIER_GPU: "GPU", pb.TIER_CPU: "CPU", pb.TIER_DISK: "STORAGE", pb.TIER_S3: "S3"}
LOG_EVERY_S = 10.0
REPLAY_TIMEOUT_S = 5.0
IPC_BACKLOG = 100  # libzmq's default ZMQ_BACKLOG


class EndpointError(ValueError):
    """An endpoint that cannot be served as configured; the message names it and says why."""


# ---- vLLM 0.32 wire structs (vllm/distributed/kv_events.py), mirrored ----------------------------

class EventBatch(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    ts: float
    events: list[Any]
    data_parallel_rank: int | None = None


class KVCacheEvent(msgspec.Struct, omit_defaults=True, gc=False, tag=True):
    pass


class BlockStored(KVCacheEvent):
    block_hashes: list[bytes | int]
    parent_block_hash: bytes | int | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None
    medium: str | None
    lora_name: str | None


class BlockRemoved(KVCacheEvent):
    block_hashes: list[bytes | int]
    medium: str | None


class AllBlocksCleared(KVCacheEvent):
    pass


class KVEventBatch(EventBatch):
    events: list[BlockStored | BlockRemoved | AllBlocksCleared]


# ---- publisher ------------------------------------------------------------------------------------

class ZmqKvEventPublisher:
    def __init__(self, events: EventLog, endpoint: str, replay_endpoint: str | None = None, *,
                 topic: str = "kvtier", namespace_topics: bool = True, buffer_steps: int = 10_000,
                 max_batch: int = 512, hwm: int = 100_000, block_size: int = 0,
                 mediums: dict[int, str] | None = None, data_parallel_rank: int | None = None,
                 namespaces: Callable[[], Iterable[str]] | None = None, ipc_mode: int = 0o600):
        self._events = events
        self.endpoint = endpoint
        self.replay_endpoint = replay_endpoint
        self._topic = topic
        self._namespace_topics = namespace_topics
        self._max_batch = max(1, max_batch)
        self._hwm = hwm
        self._block_size = block_size
        self._mediums = {**DEFAULT_MEDIUMS, **(mediums or {})}
        self._dp_rank = data_parallel_rank
        self._known_namespaces = namespaces  # e.g. lambda: store.catalog.namespaces; used after a gap
        self._ipc_mode = ipc_mode
        self._ipc_files: list[tuple[str, int, int]] = []  # (path, st_dev, st_ino) of socket files we made
        self._buffer: deque[tuple[int, bytes, bytes]] = deque(maxlen=buffer_steps)  # (seq, topic, payload)
        self._encoder = msgspec.msgpack.Encoder()
        self._ctx: zmq.asyncio.Context | None = None
        self._pub: zmq.Socket | None = None
        self._replay: zmq.asyncio.Socket | None = None
        self._queue: asyncio.Queue | None = None
        self._tasks: list[asyncio.Task] = []
        self._next_seq = 0        # next batch sequence number
        self._last_event_seq = 0  # last EventLog seq converted
        self._namespaces: set[str] = set()
        self._last_log = 0.0
        self._dropped_since_log = 0
        # counters (exported by whoever wires metrics)
        self.published_batches = 0
        self.published_events = 0
        self.dropped_batches = 0
        self.resyncs = 0
        self.gaps = 0

    @property
    def next_seq(self) -> int:
        return self._next_seq

    async def start(self) -> None:
        """Binds the sockets, subscribes to the EventLog from its current sequence, starts the tasks."""
        self._ctx = zmq.asyncio.Context()
        try:
            # PUB is a plain socket: PUB sends never block (ZMQ drops at the HWM), NOBLOCK anyway.
            self._pub = zmq.Context.shadow(self._ctx.underlying).socket(zmq.PUB)
            self._pub.setsockopt(zmq.SNDHWM, self._hwm)
            self._pub.setsockopt(zmq.LINGER, 0)
            self.endpoint = self._bind(self._pub, self.endpoint)
            if self.replay_endpoint:
                self._replay = self._ctx.socket(zmq.ROUTER)
                self._replay.setsockopt(zmq.LINGER, 0)
                self._replay.setsockopt(zmq.ROUTER_MANDATORY, 1)
                self.replay_endpoint = self._bind(self._replay, self.replay_endpoint)
            self._last_event_seq = self._events.seq
            _, self._queue = self._events.subscribe(0)
        except BaseException:
            self._close_sockets()
            raise
        loop = asyncio.get_running_loop()
        self._tasks.append(loop.create_task(self._publish_loop(), name="kv-events-pub"))
        if self._replay is not None:
            self._tasks.append(loop.create_task(self._replay_loop(), name="kv-events-replay"))
        log.info("kv events: publishing on %s%s", self.endpoint,
                 f", replay on {self.replay_endpoint}" if self._replay is not None else "")

    async def close(self) -> None:
        """Publishes what is already queued (non-blocking), stops the tasks, closes the sockets."""
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            try:
                await task
            except asyncio.CancelledError:
                pass
            except Exception:
                log.exception("kv events: task failed")
        self._tasks.clear()
        if self._queue is not None:
            self._events.unsubscribe(self._queue)
            try:
                pending, expected = [], self._last_event_seq + 1
                while not self._queue.empty():
                    item = self._queue.get_nowait()
                    if item is OVERFLOW or item.seq != expected:
                        break
                    pending.append(item)
                    expected += 1
                self._publish_events(pending)
            except Exception:
                log.exception("kv events: final flush failed")
            self._queue = None
        self._close_sockets()

    def _close_sockets(self) -> None:
        for sock in (self._pub, self._replay):
            if sock is not None:
                sock.close(linger=0)
        self._pub = self._replay = None
        if self._ctx is not None:
            self._ctx.term()
            self._ctx = None
        for path, dev, ino in self._ipc_files:  # ours only: not a file another process put there since
            try:
                info = os.lstat(path)
                if (info.st_dev, info.st_ino) == (dev, ino):
                    os.unlink(path)
            except OSError:
                pass
        self._ipc_files.clear()

    # ---- endpoints ----

    def _bind(self, sock: zmq.Socket, endpoint: str) -> str:
        """Binds `sock` on `endpoint`; returns the address to announce (tcp://host:0 becomes the port bound)."""
        if not endpoint.startswith("ipc://"):
            sock.bind(endpoint)
            return sock.getsockopt_string(zmq.LAST_ENDPOINT)
        fd = self._listen_ipc(endpoint, endpoint[len("ipc://"):])
        try:
            sock.setsockopt(zmq.USE_FD, fd)
            sock.bind(endpoint)  # ZMQ accepts on our listening socket from here on, and closes it
        except BaseException:
            os.close(fd)
            raise
        return endpoint  # LAST_ENDPOINT would name the private directory the socket was bound in

    def _listen_ipc(self, endpoint: str, path: str) -> int:
        """A listening Unix socket at `path` whose file has mode `ipc_mode` from the moment it appears
        there; returns its fd, for ZMQ_USE_FD.

        No window in which another user could connect: the socket is bound inside a fresh private
        directory (mkdtemp: mode 0700, in the same directory as `path`, so on the same file system),
        chmodded to ipc_mode there, and only then renamed onto `path` (rename(2) is atomic; a client
        that connects by path reaches the same socket). Not a umask: umask is per process, and the
        daemon's other threads create files and directories meanwhile. Not bind-then-chmod in place:
        between the two, the file has the umask's mode. ZMQ gets the listening fd (ZMQ_USE_FD), so it
        never deletes or re-creates the file; close() removes it if it is still ours."""
        directory = os.path.dirname(path) or "."
        if not os.path.isdir(directory):
            raise EndpointError(f"{endpoint}: directory {directory} does not exist (kvtierd does not create it)")
        try:
            info = os.lstat(path)
        except FileNotFoundError:
            pass
        else:
            if not stat.S_ISSOCK(info.st_mode):
                raise EndpointError(f"{endpoint}: {path} exists and is not a socket")
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            probe.settimeout(1.0)
            try:
                probe.connect(path)
            except ConnectionRefusedError:
                pass  # a stale socket file (nothing listens): the rename below replaces it
            except OSError as exc:
                raise EndpointError(f"{endpoint}: {path} exists and cannot be checked: {exc}") from exc
            else:
                raise EndpointError(f"{endpoint}: {path} is in use by a running server")
            finally:
                probe.close()
        private = tempfile.mkdtemp(prefix=".k", dir=directory)
        staged = os.path.join(private, "s")
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            try:
                listener.bind(staged)
            except OSError as exc:
                raise EndpointError(f"{endpoint}: cannot bind a socket in {directory}: {exc}") from exc
            os.chmod(staged, self._ipc_mode)
            listener.listen(IPC_BACKLOG)
            listener.setblocking(False)
            os.rename(staged, path)
            info = os.lstat(path)
            self._ipc_files.append((path, info.st_dev, info.st_ino))
            return listener.detach()
        finally:
            listener.close()  # a no-op once detached
            try:
                os.unlink(staged)  # only if the rename did not happen
            except FileNotFoundError:
                pass
            os.rmdir(private)

    # ---- publishing ----

    async def _publish_loop(self) -> None:
        while True:
            item = await self._queue.get()
            batch: list[pb.Event] = []
            expected = self._last_event_seq + 1
            behind = False
            while True:
                # The EventLog drops the oldest queued event and appends OVERFLOW when we fall behind,
                # so a hole in the sequence means the same thing as the marker.
                if item is OVERFLOW or item.seq != expected:
                    behind = True
                    break
                batch.append(item)
                expected += 1
                if len(batch) >= self._max_batch or self._queue.empty():
                    break
                item = self._queue.get_nowait()
            try:
                self._publish_events(batch)
            except Exception:
                log.exception("kv events: publishing failed; %d events skipped", len(batch))
                if batch:
                    self._last_event_seq = batch[-1].seq
            if behind:
                await self._resync()

    async def _resync(self) -> None:
        """The EventLog cut us off: resume from the ring, or declare a gap."""
        self.resyncs += 1
        self._events.unsubscribe(self._queue)
        try:
            replay, self._queue = self._events.subscribe(self._last_event_seq + 1)
        except ApiError:
            self.gaps += 1
            log.warning("kv events: fell behind the event ring after seq %d; publishing AllBlocksCleared",
                        self._last_event_seq)
            _, self._queue = self._events.subscribe(0)
            self._last_event_seq = self._events.seq
            now = time.time()
            topics: list[bytes] = []
            if self._namespace_topics:
                names = set(self._namespaces)
                if self._known_namespaces is not None:
                    try:
                        names.update(self._known_namespaces())
                    except Exception:
                        log.exception("kv events: listing namespaces failed")
                topics = [self._topic_for(ns) for ns in sorted(names)]
            for topic in topics or [self._topic.encode()]:
                self._send(topic, [AllBlocksCleared()], now)
            return
        log.warning("kv events: fell behind; resuming from the event ring at seq %d", self._last_event_seq + 1)
        for i in range(0, len(replay), self._max_batch):
            self._publish_events(replay[i:i + self._max_batch])
            await asyncio.sleep(0)

    def _topic_for(self, namespace: str) -> bytes:
        return f"{self._topic}/{namespace}".encode() if self._namespace_topics else self._topic.encode()

    def _publish_events(self, events: list[pb.Event]) -> None:
        """Converts and sends; one batch per run of same-topic events."""
        now = time.time()
        run_topic: bytes | None = None
        run: list[KVCacheEvent] = []
        for event in events:
            self._last_event_seq = event.seq
            converted = self.convert(event)
            if converted is None:
                continue
            self._namespaces.add(event.namespace)
            topic = self._topic_for(event.namespace)
            if topic != run_topic and run:
                self._send(run_topic, run, now)
                run = []
            run_topic = topic
            run.append(converted)
        if run:
            self._send(run_topic, run, now)

    def convert(self, event: pb.Event) -> KVCacheEvent | None:
        medium = self._mediums.get(event.tier, str(event.tier))
        if event.type in (pb.BLOCK_STORED, pb.BLOCK_MOVED):
            return BlockStored(block_hashes=[event.key], parent_block_hash=event.parent or None, token_ids=[],
                               block_size=self._block_size, lora_id=None, medium=medium, lora_name=None)
        if event.type in (pb.BLOCK_REMOVED, pb.BLOCK_QUARANTINED):
            return BlockRemoved(block_hashes=[event.key], medium=medium)
        if event.type == pb.ALL_CLEARED:
            return AllBlocksCleared()
        return None

    def _send(self, topic: bytes, events: list[KVCacheEvent], ts: float) -> None:
        seq = self._next_seq
        self._next_seq += 1
        payload = self._encoder.encode(KVEventBatch(ts=ts, events=events, data_parallel_rank=self._dp_rank))
        self._buffer.append((seq, topic, payload))  # replayable even if the live send is dropped
        try:
            self._pub.send_multipart((topic, seq.to_bytes(8, "big"), payload), flags=zmq.NOBLOCK)
        except zmq.Again:
            self.dropped_batches += 1
            self._dropped_since_log += 1
            now = time.monotonic()
            if now - self._last_log >= LOG_EVERY_S:
                log.warning("kv events: PUB socket full, dropped %d batches (%d in all); "
                            "subscribers can replay them", self._dropped_since_log, self.dropped_batches)
                self._last_log = now
                self._dropped_since_log = 0
            return
        self.published_batches += 1
        self.published_events += len(events)

    # ---- replay ----

    async def _replay_loop(self) -> None:
        while True:
            frames = await self._replay.recv_multipart()
            if len(frames) != 3:
                log.warning("kv events: invalid replay request (%d frames)", len(frames))
                continue
            client_id, _, start_bytes = frames
            start = int.from_bytes(start_bytes, "big")
            try:
                await asyncio.wait_for(self._serve_replay(client_id, start), REPLAY_TIMEOUT_S)
            except (asyncio.TimeoutError, zmq.ZMQError) as e:
                log.warning("kv events: replay from %d abandoned: %s", start, e)

    async def _serve_replay(self, client_id: bytes, start: int) -> None:
        batches = [b for b in self._buffer if b[0] >= start]  # snapshot: the publisher appends meanwhile
        for i, (seq, topic, payload) in enumerate(batches):
            await self._replay.send_multipart((client_id, b"", topic, seq.to_bytes(8, "big"), payload))
            if i % 256 == 255:
                await asyncio.sleep(0)
        await self._replay.send_multipart((client_id, b"", b"", END_SEQ, b""))
