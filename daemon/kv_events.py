"""Router-ready KV events: the EventLog republished in vLLM's KV-event wire format over ZeroMQ.

KV-aware routers that consume vLLM's `ZmqEventPublisher` (NVIDIA Dynamo's KV router and standalone
indexer, llm-d's KV-cache indexer, vLLM's own subscribers) index kvtierd's blocks unchanged, as one
more worker per node (docs/kv-events.md):

* PUB socket (an XPUB: it also sees subscriptions), multipart ``(topic, seq, payload)``: ``seq`` is
  the batch sequence number as 8 bytes big-endian, ``payload`` a msgpack ``KVEventBatch``
  (``[ts, [events...]]``; each event a map tagged ``{"type": "BlockStored", ...}``).
* Optional ROUTER replay socket: a client (DEALER, or REQ for one reply) sends a start sequence
  number as 8 bytes big-endian and gets every buffered batch with seq >= start as ``(topic, seq,
  payload)``, then the end marker ``(b"", (-1).to_bytes(8, "big", signed=True), b"")``: vLLM's
  protocol, byte for byte.

What routers need, and how this module gives it:
* Block hashes as vLLM publishes them with VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=1 (its default):
  ``int.from_bytes(key, "big") & (2**64 - 1)`` (vllm.v1.core.kv_cache_utils.maybe_convert_block_hash),
  so a router's view of an engine's GPU blocks and kvtier's tiers name the same blocks. The raw
  bytes (the earlier format) with ``hash_format="bytes"``.
* ``token_ids``, ``block_size`` and ``lora_name`` of each block: what its engine sent with the commit
  (the catalog keeps them with the block, on disk and in S3), looked up when the event is converted.
* ``medium``: the routers' words per tier (default GPU, CPU_TIER1, DISK, EXTERNAL; ``mediums=``).
* Topics from a template of {worker}, {model}, {namespace}, {lora} (llm-d: ``kv@{worker}@{model}``;
  Dynamo ignores the topic). A template without placeholders is the earlier ``<topic>/<namespace>``.
  A batch never mixes topics.
* A complete picture for late or restarted subscribers: on start (and after falling out of the
  EventLog ring) the publisher announces AllBlocksCleared, then BlockStored for every block on every
  tier it is on, parents first, all replayable. Sequence numbers start at the start time in
  microseconds since the epoch, so they keep rising across restarts, and every new subscription
  gets an empty batch at once: a subscriber that missed batches (it joined late, or followed the
  previous run) sees a gap and replays them, the announcement included.

Mapping (kvtier.v1.Event -> vLLM event), one vLLM event per kvtier event:
  BLOCK_STORED(tier)        -> BlockStored(block_hashes=[key], parent_block_hash=parent or None, token_ids,
                               block_size, medium=tier, lora_name)
  BLOCK_MOVED(from -> tier) -> BlockStored on the destination medium (the source copy stays)
  BLOCK_REMOVED(tier)       -> BlockRemoved(block_hashes=[key], medium=tier)
  BLOCK_QUARANTINED(tier)   -> BlockRemoved(block_hashes=[key], medium=tier)
  ALL_CLEARED               -> nothing: Clear emits a BLOCK_REMOVED for every block it deletes, and keeps
                               blocks in use; AllBlocksCleared would make routers forget those and every
                               other namespace of the worker.

Access: ZMQ has no authentication here, and BlockStored carries the token ids of prompts, so who
may connect is who reads them. A publisher of the node ring (``tenant=None``, events.zmq_endpoint)
carries every namespace's blocks: the administrators' router's. A publisher of a configured
tenant's ring (``tenant="team-a"``, [[tenant]] events_endpoint) carries only that tenant's
namespaces' events and announces only its blocks. An ``ipc://`` endpoint is a socket file created
with mode ``ipc_mode`` (default 0600) and group ``ipc_gid`` (-1: the daemon's) before anyone can
reach it (see `_listen_ipc`); its directory must exist. Which endpoints, modes and groups are allowed
is config validation's business (events.allow_remote, allow_tcp_with_tenants, the modes with tenants).

Never blocks the event loop: the EventLog watcher queue is the bounded buffer; sends are
non-blocking; a message ZMQ refuses (HWM) is dropped and counted (replayable), logged at most every
10 s. If the watcher queue overflows (the publisher fell behind) it resumes from the EventLog ring
without loss; if the ring no longer has the events it announces the whole catalog again.
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
from typing import Any

import msgspec
import zmq
import zmq.asyncio

from kvtier.proto.v1 import kvtier_pb2 as pb
from kvtier.tiers.block import unpack_token_ids

from .errors import ApiError
from .events import OVERFLOW, EventLog

log = logging.getLogger(__name__)

END_SEQ = (-1).to_bytes(8, "big", signed=True)
# The routers' words (Dynamo: GPU/DEVICE -> device; CPU_TIER1/CPU_PINNED/CPU -> host; DISK/STORAGE ->
# disk; EXTERNAL/SHARED/REMOTE -> external). vLLM itself says GPU, CPU and STORAGE.
DEFAULT_MEDIUMS = {pb.TIER_GPU: "GPU", pb.TIER_CPU: "CPU_TIER1", pb.TIER_DISK: "DISK", pb.TIER_S3: "EXTERNAL"}
DEFAULT_TOPIC = "kv@{worker}@{model}"
TIERS = (pb.TIER_GPU, pb.TIER_CPU, pb.TIER_DISK, pb.TIER_S3)
HASH_MASK = (1 << 64) - 1
LOG_EVERY_S = 10.0
REPLAY_TIMEOUT_S = 5.0
IPC_BACKLOG = 100  # libzmq's default ZMQ_BACKLOG
_TOPIC_CACHE = 4096


class EndpointError(ValueError):
    """An endpoint that cannot be served as configured; the message names it and says why."""


def int_block_hash(key: bytes) -> int:
    """vLLM's integer form of a block hash (maybe_convert_block_hash with VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=1):
    the hash bytes read big-endian, truncated to the low 64 bits."""
    return int.from_bytes(key, "big") & HASH_MASK


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

class KvEventStreams:
    """The publishers a daemon started (the node-wide one, the tenants' own), closed together."""

    def __init__(self):
        self.publishers: list["ZmqKvEventPublisher"] = []

    def add(self, publisher: "ZmqKvEventPublisher") -> None:
        self.publishers.append(publisher)

    async def close(self) -> None:
        for publisher in reversed(self.publishers):
            await publisher.close()
        self.publishers.clear()


class ZmqKvEventPublisher:
    def __init__(self, events: EventLog, endpoint: str, replay_endpoint: str | None = None, *,
                 topic: str = DEFAULT_TOPIC, worker: str = "", model: str = "", hash_format: str = "int",
                 buffer_steps: int = 10_000, max_batch: int = 512, hwm: int = 100_000, block_size: int = 0,
                 mediums: dict[int, str] | None = None, data_parallel_rank: int | None = None,
                 catalog=None, ipc_mode: int = 0o600, connect: list[str] | tuple = (),
                 tenant: str | None = None, ipc_gid: int = -1):
        """`catalog` (daemon.catalog.Catalog, or anything with `.namespaces` {name: Namespace with
        .attributes and .blocks} and `.get(namespace, key)`): where the blocks' token ids, parents
        and origins are looked up, and what start() and a gap announce. Without it, events carry
        only what the EventLog says and nothing is announced. `worker`: {worker} ("" = host name);
        `model`: {model} of blocks whose engine named none ("" = the namespace's "model" attribute);
        `block_size`: BlockStored.block_size of blocks whose engine named none. `connect`: endpoints the
        PUB socket also connects to (indexers that bind their SUB socket, as llm-d's does); with an
        empty `endpoint` it only connects. `tenant`: publish only that configured tenant's ring (its
        namespaces' events) and announce only its namespaces' blocks; None: the node ring, every
        namespace. `ipc_gid`: the group of the ipc:// socket files (-1: the daemon's own)."""
        if hash_format not in ("int", "bytes"):
            raise ValueError(f"hash_format must be \"int\" or \"bytes\", got {hash_format!r}")
        self._events = events
        self.endpoint = endpoint
        self.replay_endpoint = replay_endpoint
        self.connect = list(connect)
        self._template = topic
        self._legacy_topic = "{" not in topic  # "<topic>/<namespace>", the earlier form
        self._worker = worker or socket.gethostname()
        self._model = model
        self._int_hashes = hash_format == "int"
        self._max_batch = max(1, max_batch)
        self._hwm = hwm
        self._block_size = block_size
        self._mediums = {**DEFAULT_MEDIUMS, **(mediums or {})}
        self._dp_rank = data_parallel_rank
        self._catalog = catalog
        self._ipc_mode = ipc_mode
        self._ipc_gid = ipc_gid
        self.tenant = tenant
        self._ipc_files: list[tuple[str, int, int]] = []  # (path, st_dev, st_ino) of socket files we made
        self._buffer: deque[tuple[int, bytes, bytes]] = deque(maxlen=buffer_steps)  # (seq, topic, payload)
        self._encoder = msgspec.msgpack.Encoder()
        self._ctx: zmq.asyncio.Context | None = None
        self._pub: zmq.Socket | None = None               # XPUB, sends (NOBLOCK, never awaits)
        self._subscriptions: zmq.asyncio.Socket | None = None  # the same socket, awaited for subscriptions
        self._replay: zmq.asyncio.Socket | None = None
        self._queue: asyncio.Queue | None = None
        self._tasks: list[asyncio.Task] = []
        self._announcing: list | None = None  # the start's snapshot, until announced: [(block, tiers)]
        # Held while a batch of events or of an announcement goes out: an announcement never
        # interleaves with newer events (it may go out before events older than its snapshot, which
        # is harmless: replayed in order after it, they leave every block and tier as the snapshot had it).
        self._lock = asyncio.Lock()
        # Sequence numbers keep rising across restarts (microseconds since the epoch at start): a
        # subscriber of the previous run sees a gap and replays this run's batches.
        self._next_seq = time.time_ns() // 1000
        self._last_event_seq = 0  # last EventLog seq converted
        self._ns_topics: dict[str, set[bytes]] = {}  # topics published per namespace (for removals)
        self._topics: dict[tuple, bytes] = {}
        self._last_topic: bytes | None = None
        self._last_log = 0.0
        self._dropped_since_log = 0
        # counters (exported by whoever wires metrics)
        self.published_batches = 0
        self.published_events = 0
        self.dropped_batches = 0
        self.resyncs = 0
        self.gaps = 0
        self.subscriptions = 0
        self.announced_blocks = 0

    @property
    def next_seq(self) -> int:
        return self._next_seq

    async def start(self) -> None:
        """Binds the sockets, subscribes to the EventLog from its current sequence, takes the catalog
        to announce (consistent with that sequence), starts the tasks; the announcement goes out first."""
        self._ctx = zmq.asyncio.Context()
        try:
            # A plain socket for sends (XPUB sends never block: ZMQ drops at the HWM; NOBLOCK anyway),
            # and an asyncio shadow of it that awaits subscriptions.
            self._pub = zmq.Context.shadow(self._ctx.underlying).socket(zmq.XPUB)
            self._pub.setsockopt(zmq.SNDHWM, self._hwm)
            self._pub.setsockopt(zmq.LINGER, 0)
            self._pub.setsockopt(zmq.XPUB_VERBOSE, 1)  # every subscription, also a repeated one
            if self.endpoint:
                self.endpoint = self._bind(self._pub, self.endpoint)
            for endpoint in self.connect:
                self._pub.connect(endpoint)  # ZMQ connects (and reconnects) in the background
            self._subscriptions = zmq.asyncio.Socket.shadow(self._pub.underlying)
            if self.replay_endpoint:
                self._replay = self._ctx.socket(zmq.ROUTER)
                self._replay.setsockopt(zmq.LINGER, 0)
                self._replay.setsockopt(zmq.ROUTER_MANDATORY, 1)
                self.replay_endpoint = self._bind(self._replay, self.replay_endpoint)
            self._last_event_seq = self._events.seq
            _, self._queue = self._subscribe(0)
            self._announcing = self._snapshot()  # no await since subscribe: consistent with the stream
        except BaseException:
            self._close_sockets()
            raise
        loop = asyncio.get_running_loop()
        self._tasks.append(loop.create_task(self._publish_loop(), name="kv-events-pub"))
        self._tasks.append(loop.create_task(self._subscription_loop(), name="kv-events-subscriptions"))
        if self._replay is not None:
            self._tasks.append(loop.create_task(self._replay_loop(), name="kv-events-replay"))
        log.info("kv events: publishing on %s%s%s, announcing %d blocks", self.endpoint or "no endpoint of its own",
                 f", connecting to {', '.join(self.connect)}" if self.connect else "",
                 f", replay on {self.replay_endpoint}" if self._replay is not None else "",
                 len(self._announcing))

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
                if self._announcing is not None:  # closed before the announcement went out
                    self._announce_now()
                pending = []
                while not self._queue.empty():
                    item = self._queue.get_nowait()
                    if item is OVERFLOW:
                        break
                    if item.seq > self._last_event_seq:
                        pending.append(item)
                self._publish_events(pending)
            except Exception:
                log.exception("kv events: final flush failed")
            self._queue = None
        self._close_sockets()

    def _close_sockets(self) -> None:
        if self._subscriptions is not None:
            self._subscriptions.close(linger=0)  # closes the XPUB socket it shadows
        for sock in (self._pub, self._replay):
            if sock is not None:
                sock.close(linger=0)
        self._pub = self._replay = self._subscriptions = None
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
            if self._ipc_gid >= 0:
                try:
                    os.chown(staged, -1, self._ipc_gid)
                except PermissionError as exc:
                    raise EndpointError(
                        f"{endpoint}: cannot give the socket file group {self._ipc_gid}: kvtierd's user (uid "
                        f"{os.geteuid()}) must be a member of that group ({exc.strerror})") from exc
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

    def _subscribe(self, from_seq: int):
        return self._events.subscribe(from_seq, self.tenant, internal=True)

    async def _publish_loop(self) -> None:
        await self._announce()
        while True:
            item = await self._queue.get()
            batch: list[pb.Event] = []
            behind = False
            while True:
                # The EventLog queues every event up to the cut, then OVERFLOW, when we fall behind.
                # Sequence numbers are node-wide: a tenant's ring has holes, which mean nothing.
                if item is OVERFLOW:
                    behind = True
                    break
                if item.seq > self._last_event_seq:
                    batch.append(item)
                if len(batch) >= self._max_batch or self._queue.empty():
                    break
                item = self._queue.get_nowait()
            try:
                async with self._lock:
                    self._publish_events(batch)
            except Exception:
                log.exception("kv events: publishing failed; %d events skipped", len(batch))
                if batch:
                    self._last_event_seq = batch[-1].seq
            if behind:
                await self._resync()

    async def _resync(self) -> None:
        """The EventLog cut us off: resume from the ring, or announce the whole catalog again."""
        self.resyncs += 1
        self._events.unsubscribe(self._queue)
        try:
            replay, self._queue = self._subscribe(self._last_event_seq + 1)
        except ApiError:
            self.gaps += 1
            log.warning("kv events: fell behind the event ring after seq %d; announcing every block again",
                        self._last_event_seq)
            _, self._queue = self._subscribe(0)
            self._last_event_seq = self._events.seq
            await self._announce()
            return
        log.warning("kv events: fell behind; resuming from the event ring at seq %d", self._last_event_seq + 1)
        for i in range(0, len(replay), self._max_batch):
            async with self._lock:
                self._publish_events(replay[i:i + self._max_batch])
            await asyncio.sleep(0)

    # -- the announcement: AllBlocksCleared, then every block, parents first --

    def _snapshot(self) -> list:
        """Every block with the tiers it is on now, each after its parent (routers attach a block
        to its parent), in one pass with no await."""
        if self._catalog is None:
            return []
        order = []
        for ns in self._namespaces():
            blocks, done = ns.blocks, set()
            for block in blocks.values():
                chain = []
                while block is not None and block.key not in done:
                    done.add(block.key)
                    chain.append(block)
                    block = blocks.get(block.parent) if block.parent else None
                order.extend((b, b.tiers) for b in reversed(chain))
        return order

    async def _announce(self) -> None:
        """Announces the start's snapshot, or else the catalog now, a batch at a time, holding the
        lock throughout (see _lock)."""
        async with self._lock:
            for _ in self._announcement():
                await asyncio.sleep(0)

    def _announce_now(self) -> None:
        """The same without yielding to the loop (close() before the publish task ran)."""
        for _ in self._announcement():
            pass

    def _announcement(self):
        """Sends AllBlocksCleared on every topic, then BlockStored for each block and tier of the
        snapshot (a block's tiers as they were when it was taken); yields after each batch."""
        snapshot = self._announcing if self._announcing is not None else self._snapshot()
        self._announcing = None
        now = time.time()
        cleared = {self._topic_of(block.namespace, block.origin) for block, _ in snapshot}
        cleared.update(topic for topics in self._ns_topics.values() for topic in topics)
        if self._catalog is not None:
            cleared.update(self._topic_of(ns.name, None) for ns in self._namespaces())
        for topic in sorted(cleared) or [self._topic_of("", None)]:
            self._send(topic, [AllBlocksCleared()], now)
        run_topic, run = None, []
        for block, tiers in snapshot:
            topic = self._topic_of(block.namespace, block.origin)
            for tier in TIERS:
                if not tiers & tier:
                    continue
                if (topic != run_topic and run) or len(run) >= self._max_batch:
                    self._send(run_topic, run, now)
                    run = []
                    yield
                    now = time.time()
                run_topic = topic
                run.append(self._stored(block.key, block.parent, block, self._mediums[tier]))
                self._ns_topics.setdefault(block.namespace, set()).add(topic)
                self.announced_blocks += 1
        if run:
            self._send(run_topic, run, now)

    def _namespaces(self) -> list:
        """The catalog's namespaces this stream may carry: a tenant's own, or all of them."""
        namespaces = list(self._catalog.namespaces.values())
        if self.tenant is None:
            return namespaces
        return [ns for ns in namespaces if ns.name.startswith(self.tenant + "/")]

    # -- converting --

    def _topic_of(self, namespace: str, origin) -> bytes:
        cache_key = (namespace, origin)
        topic = self._topics.get(cache_key)
        if topic is None:
            if self._legacy_topic:
                topic = f"{self._template}/{namespace}".encode()
            else:
                model = (origin.model if origin is not None and origin.model else "") or self._model
                if not model and self._catalog is not None:
                    ns = self._catalog.namespaces.get(namespace)
                    model = ns.attributes.get("model", "") if ns is not None else ""
                lora = origin.lora_name if origin is not None else ""
                topic = self._template.format(worker=self._worker, model=model, namespace=namespace,
                                              lora=lora).encode()
            if len(self._topics) >= _TOPIC_CACHE:
                self._topics.clear()
            self._topics[cache_key] = topic
        return topic

    def _hash(self, key: bytes):
        return int_block_hash(key) if self._int_hashes else key

    def _stored(self, key: bytes, parent: bytes, block, medium: str) -> BlockStored:
        origin = block.origin if block is not None else None
        token_ids = unpack_token_ids(block.token_ids) if block is not None and block.token_ids else []
        return BlockStored(block_hashes=[self._hash(key)], parent_block_hash=self._hash(parent) if parent else None,
                           token_ids=token_ids,
                           block_size=(origin.block_size if origin is not None else 0) or self._block_size,
                           lora_id=None, medium=medium,
                           lora_name=(origin.lora_name or None) if origin is not None else None)

    def convert(self, event: pb.Event) -> list[tuple[bytes, KVCacheEvent]]:
        """The vLLM event(s) for one kvtier event, with their topics ([] for none)."""
        medium = self._mediums.get(event.tier, str(event.tier))
        block = self._catalog.get(event.namespace, event.key) if self._catalog is not None else None
        if event.type in (pb.BLOCK_STORED, pb.BLOCK_MOVED):
            parent = event.parent or (block.parent if block is not None else b"")
            return [(self._topic_of(event.namespace, block.origin if block is not None else None),
                     self._stored(event.key, parent, block, medium))]
        if event.type in (pb.BLOCK_REMOVED, pb.BLOCK_QUARANTINED):
            removed = BlockRemoved(block_hashes=[self._hash(event.key)], medium=medium)
            if block is not None:
                topics = [self._topic_of(event.namespace, block.origin)]
            else:  # gone from the catalog: whichever topics the namespace's blocks went out on
                topics = sorted(self._ns_topics.get(event.namespace) or [self._topic_of(event.namespace, None)])
            return [(topic, removed) for topic in topics]
        return []  # ALL_CLEARED: see the module docstring

    def _publish_events(self, events: list[pb.Event]) -> None:
        """Converts and sends; one batch per run of same-topic events."""
        now = time.time()
        run_topic: bytes | None = None
        run: list[KVCacheEvent] = []
        for event in events:
            self._last_event_seq = event.seq
            for topic, converted in self.convert(event):
                if isinstance(converted, BlockStored):
                    self._ns_topics.setdefault(event.namespace, set()).add(topic)
                if topic != run_topic and run:
                    self._send(run_topic, run, now)
                    run = []
                run_topic = topic
                run.append(converted)
        if run:
            self._send(run_topic, run, now)

    def _send(self, topic: bytes, events: list[KVCacheEvent], ts: float) -> None:
        seq = self._next_seq
        self._next_seq += 1
        self._last_topic = topic
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

    # ---- subscriptions ----

    async def _subscription_loop(self) -> None:
        """Each new subscription gets an empty batch at once: its sequence number tells a subscriber
        that joined late (or followed the previous run) which batches it missed, and it replays them."""
        while True:
            message = await self._subscriptions.recv()
            if message[:1] != b"\x01":
                continue  # an unsubscription
            self.subscriptions += 1
            log.info("kv events: a subscriber joined (topic prefix %r); batch %d marks the stream's head",
                     message[1:65], self._next_seq)
            self._send(self._last_topic or self._topic_of("", None), [], time.time())
            if self.connect:
                # An indexer this socket connects to (llm-d's) binds, subscribes once the connection is
                # up (after the start's announcement, usually) and never replays: it gets the whole
                # picture again. Other subscribers see the same blocks announced twice.
                await self._announce()

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
