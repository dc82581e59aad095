"""The kvtier.v1 gRPC service: validates every request's shape and bounds, then calls the store.

Contract: a request that fails validation changes nothing and gets INVALID_ARGUMENT naming the
field; store errors map to their own status codes; anything unexpected is logged with a
traceback and returned as INTERNAL without killing the daemon.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import re
import time

import grpc

from kvtier.proto.v1 import kvtier_pb2 as pb
from kvtier.proto.v1 import kvtier_pb2_grpc as pb_grpc

from .config import LimitsConfig
from .errors import ApiError, invalid
from .events import OVERFLOW
from kvtier.tiers.retention import Retention

from .store import BlockStore, Staged

log = logging.getLogger("kvtier.service")
_NAMESPACE_RE = re.compile(r"[A-Za-z0-9._:/=+\-@]+")


class Validator:
    def __init__(self, limits: LimitsConfig):
        self.limits = limits

    def namespace(self, name: str, allow_star: bool = False) -> str:
        if allow_star and name == "*":
            return name
        if not name:
            raise invalid("namespace is required")
        if len(name.encode()) > self.limits.max_namespace_bytes or not _NAMESPACE_RE.fullmatch(name):
            raise invalid(f"namespace must be 1..{self.limits.max_namespace_bytes} bytes of "
                          "[A-Za-z0-9._:/=+-@]")
        return name

    def key(self, key: bytes, what: str = "key", optional: bool = False) -> bytes:
        if optional and not key:
            return key
        if not 1 <= len(key) <= self.limits.max_key_bytes:
            raise invalid(f"{what} must be 1..{self.limits.max_key_bytes} bytes, got {len(key)}")
        return key

    def keys(self, keys) -> list[bytes]:
        if not 1 <= len(keys) <= self.limits.max_keys_per_request:
            raise invalid(f"keys: need 1..{self.limits.max_keys_per_request} keys, got {len(keys)}")
        limit = self.limits.max_key_bytes
        for index, key in enumerate(keys):
            if not 1 <= len(key) <= limit:
                raise invalid(f"keys[{index}] must be 1..{limit} bytes, got {len(key)}")
        return list(keys)

    def lease_ms(self, lease_ms: int) -> int:
        if lease_ms > self.limits.max_lease_ms:
            raise invalid(f"lease_ms {lease_ms} exceeds limits.max_lease_ms {self.limits.max_lease_ms}")
        return lease_ms or self.limits.default_lease_ms

    def count(self, count: int) -> int:
        if not 1 <= count <= self.limits.max_keys_per_request:
            raise invalid(f"count must be 1..{self.limits.max_keys_per_request}, got {count}")
        return count

    def wait_ms(self, wait_ms: int) -> int:
        return min(wait_ms, self.limits.max_wait_ms)

    def retention(self, holder, what: str, fallback: Retention | None = None) -> Retention | None:
        """The message's `retention` field as a Retention (fallback when unset); INVALID_ARGUMENT if bad."""
        if not holder.HasField("retention"):
            return fallback
        r = holder.retention
        try:
            return Retention(r.cls, r.priority, r.ttl_s or None)
        except ValueError as exc:
            raise invalid(f"{what}.retention: {exc}") from exc

    def attributes(self, attributes) -> dict[str, str]:
        if len(attributes) > self.limits.max_attributes:
            raise invalid(f"at most {self.limits.max_attributes} namespace attributes")
        for name, value in attributes.items():
            if not 1 <= len(name) <= 64 or len(value) > 256:
                raise invalid("attribute names must be 1..64 and values 0..256 characters")
        return dict(attributes)


@contextlib.asynccontextmanager
async def _status_on_error(context, name: str):
    """ApiError becomes its status; anything unexpected is logged and becomes INTERNAL."""
    try:
        yield
    except ApiError as exc:
        await context.abort(exc.code, exc.message)
    except (grpc.aio.AbortError, grpc.aio.UsageError, asyncio.CancelledError):
        raise
    except Exception:
        log.exception("%s failed", name)
        await context.abort(grpc.StatusCode.INTERNAL, f"{name} failed inside the daemon; see its log")


def _unary(method):
    @functools.wraps(method)
    async def wrapper(self, request, context):
        async with _status_on_error(context, method.__name__):
            return await method(self, request, context)
    return wrapper


def _streaming(method):
    @functools.wraps(method)
    async def wrapper(self, request, context):
        async with _status_on_error(context, method.__name__):
            async for item in method(self, request, context):
                yield item
    return wrapper


class KvTierService(pb_grpc.KvTierServicer):
    def __init__(self, store: BlockStore, limits: LimitsConfig):
        self.store = store
        self.check = Validator(limits)
        self.limits = limits

    @_unary
    async def RegisterNamespace(self, request, context):
        name = self.check.namespace(request.name)
        created = self.store.register_namespace(name, self.check.attributes(request.attributes))
        if created:
            log.info("namespace %s registered (%s)", name, dict(request.attributes))
        return pb.RegisterNamespaceResponse(created=created)

    @_unary
    async def ListNamespaces(self, request, context):
        return pb.ListNamespacesResponse(namespaces=[
            pb.NamespaceInfo(name=n.name, attributes=n.attributes, blocks=len(n.blocks), bytes=n.bytes)
            for n in sorted(self.store.catalog.namespaces.values(), key=lambda n: n.name)])

    @_unary
    async def Lookup(self, request, context):
        keys = self.check.keys(request.keys)
        tiers = self.store.lookup(self.check.namespace(request.namespace), keys)
        return pb.LookupResponse(matched=len(tiers), tiers=tiers)

    @_unary
    async def FindMatches(self, request, context):
        keys = self.check.keys(request.keys)
        depth = self.store.catalog.find_matches(self.check.namespace(request.namespace), keys)
        return pb.FindMatchesResponse(any=depth[0], gpu=depth[pb.TIER_GPU], cpu=depth[pb.TIER_CPU],
                                      disk=depth[pb.TIER_DISK], s3=depth[pb.TIER_S3])

    @_streaming
    async def Snapshot(self, request, context):
        if request.namespace:
            self.store.catalog.namespace(self.check.namespace(request.namespace))
        # Pages are taken between awaits; events that land meanwhile have seq > the first page's,
        # so the snapshot carries the seq read before the first page and a watcher resumes there.
        seq, token = self.store.events.seq, b""
        while True:
            blocks, token = self.store.catalog.page(request.namespace, 0, self.limits.max_page_size, token)
            yield pb.SnapshotChunk(seq=seq, blocks=[b.info() for b in blocks])
            if not token:
                return

    @_unary
    async def ArenaInfo(self, request, context):
        arena = self.store.arena
        return pb.ArenaInfoResponse(path=arena.path, size_bytes=arena.size_bytes, slot_bytes=arena.slot_bytes,
                                    slot_count=arena.slot_count, generation=arena.generation,
                                    max_keys_per_request=self.limits.max_keys_per_request,
                                    max_key_bytes=self.limits.max_key_bytes)

    @_unary
    async def Allocate(self, request, context):
        held = await self.store.allocate(self.check.count(request.count), self.check.wait_ms(request.wait_ms),
                                         self.check.lease_ms(request.lease_ms))
        return pb.AllocateResponse(allocation_id=held.id, slots=held.items, slot_bytes=self.store.arena.slot_bytes,
                                   generation=self.store.arena.generation,
                                   deadline_unix_ms=_deadline_unix_ms(held.deadline))

    @_unary
    async def Commit(self, request, context):
        namespace = self.check.namespace(request.namespace)
        if len(request.entries) > self.limits.max_keys_per_request:
            raise invalid(f"at most {self.limits.max_keys_per_request} entries per commit")
        default = self.check.retention(request, "request")
        staged = [Staged(self.check.key(e.key, f"entries[{i}].key"),
                         self.check.key(e.parent, f"entries[{i}].parent", optional=True),
                         e.slot, e.length, e.checksum, self.check.retention(e, f"entries[{i}]", default))
                  for i, e in enumerate(request.entries)]
        statuses = await self.store.commit(request.allocation_id, namespace, staged, request.wait_durable)
        return pb.CommitResponse(status=statuses)

    @_unary
    async def Abort(self, request, context):
        self.store.abort(request.allocation_id)
        return pb.AbortResponse()

    @_unary
    async def Acquire(self, request, context):
        namespace = self.check.namespace(request.namespace)
        keys = self.check.keys(request.keys)
        held, found = await self.store.acquire(namespace, keys, self.check.lease_ms(request.lease_ms),
                                               gpu=request.gpu)
        on_gpu = set(held.gpu_items) if held else set()
        blocks = [self._acquired(b, b.id in on_gpu) if b is not None else pb.AcquiredBlock() for b in found]
        return pb.AcquireResponse(lease_id=held.id if held else 0, blocks=blocks,
                                  generation=self.store.arena.generation,
                                  deadline_unix_ms=_deadline_unix_ms(held.deadline) if held else 0)

    def _acquired(self, block, on_gpu: bool) -> pb.AcquiredBlock:
        acquired = pb.AcquiredBlock(found=True, slot=self.store.cpu.slot_of(block.id), length=block.length,
                                    checksum=block.checksum)
        if on_gpu:
            gpu_slot = self.store.gpu.slot_of(block.id)
            acquired.on_gpu, acquired.gpu_slot = True, gpu_slot
            acquired.gpu_ipc_handle = self.store.gpu.ipc_handle(gpu_slot) or b""
        return acquired

    @_unary
    async def Release(self, request, context):
        self.store.release(request.lease_id)
        return pb.ReleaseResponse()

    @_unary
    async def Put(self, request_iterator, context):
        first = await anext(request_iterator, None)
        if first is None or first.WhichOneof("part") != "header":
            raise invalid("a Put stream starts with a header message")
        h = first.header
        status = await self.store.put(
            self.check.namespace(h.namespace), self.check.key(h.key), self.check.key(h.parent, "parent", True),
            _chunks(request_iterator), h.length, h.checksum, self.limits.max_wait_ms, h.wait_durable)
        return pb.PutResponse(status=status)

    @_streaming
    async def Get(self, request, context):
        namespace = self.check.namespace(request.namespace)
        key = self.check.key(request.key)
        held, found = await self.store.acquire(namespace, [key], self.limits.default_lease_ms)
        if held is None:
            raise ApiError(grpc.StatusCode.NOT_FOUND, f"block {key.hex()} is not stored in {namespace}")
        try:
            block = found[0]
            yield pb.GetResponse(info=block.info())
            view, step = self.store.cpu.view(block.id), self.limits.put_chunk_bytes
            for start in range(0, block.length, step):
                yield pb.GetResponse(chunk=bytes(view[start:min(start + step, block.length)]))
        finally:
            self.store.release(held.id)

    @_unary
    async def Inventory(self, request, context):
        if request.namespace:
            self.store.catalog.namespace(self.check.namespace(request.namespace))
        page_size = request.page_size or 100
        if page_size > self.limits.max_page_size:
            raise invalid(f"page_size must be at most {self.limits.max_page_size}")
        if len(request.page_token) > self.limits.max_namespace_bytes + self.limits.max_key_bytes + 1:
            raise invalid("page_token is not one this daemon issued")
        blocks, token = self.store.catalog.page(request.namespace, request.tier_mask, page_size, request.page_token)
        return pb.InventoryResponse(blocks=[b.info() for b in blocks], next_page_token=token)

    @_unary
    async def Stat(self, request, context):
        namespace = self.check.namespace(request.namespace)
        self.store.catalog.namespace(namespace)
        block = self.store.catalog.get(namespace, self.check.key(request.key))
        if block is None:
            raise ApiError(grpc.StatusCode.NOT_FOUND, f"block {request.key.hex()} is not stored in {namespace}")
        return block.info()

    @_unary
    async def Stats(self, request, context):
        return self.store.stats()

    @_unary
    async def Delete(self, request, context):
        deleted, busy = await self.store.delete(self.check.namespace(request.namespace),
                                                self.check.keys(request.keys))
        return pb.DeleteResponse(deleted=deleted, busy=busy)

    @_unary
    async def Clear(self, request, context):
        namespace = self.check.namespace(request.namespace, allow_star=True)
        deleted = await self.store.clear(namespace)
        log.warning("cleared %s: %d blocks deleted", namespace, deleted)
        return pb.ClearResponse(deleted=deleted)

    @_streaming
    async def Watch(self, request, context):
        if request.namespace:
            self.check.namespace(request.namespace)
        replay, queue = self.store.events.subscribe(request.from_seq)
        try:
            for event in replay:
                if not request.namespace or event.namespace == request.namespace:
                    yield event
            last = replay[-1].seq if replay else 0
            while True:
                event = await queue.get()
                if event is OVERFLOW:
                    raise ApiError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                   f"watcher fell behind; resume with from_seq={last + 1}")
                if event.seq > last and (not request.namespace or event.namespace == request.namespace):
                    last = event.seq
                    yield event
        finally:
            self.store.events.unsubscribe(queue)


async def _chunks(request_iterator):
    async for message in request_iterator:
        if message.WhichOneof("part") != "chunk":
            raise invalid("after the header, a Put stream carries only chunks")
        yield message.chunk


def _deadline_unix_ms(deadline_monotonic: float) -> int:
    return int((time.time() + deadline_monotonic - time.monotonic()) * 1000)
