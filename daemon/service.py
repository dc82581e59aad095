"""The kvtier.v1 gRPC service: validates every request's shape and bounds, then calls the store.

Contract: a request that fails validation changes nothing and gets INVALID_ARGUMENT naming the
field; store errors map to their own status codes; anything unexpected is logged with a
traceback and returned as INTERNAL without killing the daemon.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import logging
import re
import time

import grpc
from google.protobuf import message_factory
from google.protobuf.message import DecodeError

from kvtier.proto.v1 import kvtier_pb2 as pb
from kvtier.proto.v1 import kvtier_pb2_grpc as pb_grpc

from kvtier.tiers.retention import CLASS_RANK, Retention

from .auth import LOCAL, Principal
from .catalog import retention_of
from .config import LimitsConfig
from .errors import ApiError, ErrorKind, denied, exhausted, grpc_code, invalid, not_found, precondition, unauthenticated
from .events import OVERFLOW

from .stats import stats_response
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
        try:
            retention = retention_of(holder)
        except ValueError as exc:
            raise invalid(f"{what}.retention: {exc}") from exc
        if retention is not None and retention.ttl_s and retention.ttl_s > self.limits.max_ttl_s:
            raise invalid(f"{what}.retention.ttl_s {retention.ttl_s:g} exceeds limits.max_ttl_s "
                          f"{self.limits.max_ttl_s:g}")
        return fallback if retention is None else retention

    def attributes(self, attributes) -> dict[str, str]:
        if len(attributes) > self.limits.max_attributes:
            raise invalid(f"at most {self.limits.max_attributes} namespace attributes")
        for name, value in attributes.items():
            if not 1 <= len(name) <= 64 or len(value) > 256:
                raise invalid("attribute names must be 1..64 and values 0..256 characters")
        return dict(attributes)


@contextlib.asynccontextmanager
async def _status_on_error(context, name: str, store=None):
    """ApiError becomes its status; a broken invariant (AssertionError) stops the daemon through
    store.fatal (its state can no longer be trusted); anything else unexpected is logged and becomes
    INTERNAL."""
    try:
        yield
    except ApiError as exc:
        await context.abort(grpc_code(exc), exc.message)
    except (grpc.aio.AbortError, grpc.aio.UsageError, asyncio.CancelledError):
        raise
    except AssertionError as exc:
        if store is not None:
            store.fatal(f"{name}: invariant broken: {exc!r}", exc)
        raise
    except Exception:
        log.exception("%s failed", name)
        await context.abort(grpc.StatusCode.INTERNAL, f"{name} failed inside the daemon; see its log")


def _unary(method):
    """Every call is authenticated first (`identify` raises UNAUTHENTICATED), whatever the method
    does next: no method can forget it."""
    @functools.wraps(method)
    async def wrapper(self, request, context):
        async with _status_on_error(context, method.__name__, self.store):
            self.identify(context)
            return await method(self, request, context)
    return wrapper


def _streaming(method):
    @functools.wraps(method)
    async def wrapper(self, request, context):
        async with _status_on_error(context, method.__name__, self.store):
            self.identify(context)
            async for item in method(self, request, context):
                yield item
    return wrapper


class KvTierService(pb_grpc.KvTierServicer):
    """`identify(context)` names the caller (a local session's principal on the Unix socket, a
    token's principal on TCP); every namespace a call touches must be the caller's own
    (auth.Principal.owns). The arena calls (ArenaInfo, Allocate, Commit, Acquire) need a local
    principal and touch only its tenant's arena part; CUDA IPC handles (Acquire gpu) go to local
    administrators only, since they open the whole shared GPU pool. `tenants` ([[tenant]] tables)
    bound each tenant's namespaces, watchers and peer pulls; a tenant principal named in no table
    (a TCP token's tenant) gets the small limits.untabled_tenant_* bounds instead, and the node-wide
    limits bound only the administrators and those tenants together: each table's share is its own."""

    def __init__(self, store: BlockStore, limits: LimitsConfig, identify=lambda context: LOCAL, peers=None,
                 tenants=()):
        self.store = store
        self.check = Validator(limits)
        self.limits = limits
        self.identify = identify
        self.peers = peers  # daemon.peers.PeerFetcher when peers are configured
        self.tenants = {t.name: t for t in tenants}
        # Peer pulls in flight per tenant, shared by every listener's servicer (Unix socket and TCP):
        # one tenant has one budget whichever way it calls.
        self._pulls: collections.Counter[str] = store.__dict__.setdefault("tenant_pulls", collections.Counter())
        self._refusal_log: dict[tuple[str, str], float] = {}  # (principal, what) -> last logged

    def _local(self, context, what: str) -> Principal:
        """The caller, if it came through a local session (the arena is only for local engines)."""
        who = self.identify(context)
        if not who.local:
            raise denied(f"{what} needs a local session on the Unix socket (the arena is for same-node "
                         "engines); over TCP use Put and Get")
        return who

    def _in_my_part(self, who: Principal, namespace: str, what: str) -> None:
        if self.store.part_of(namespace) != self.store.arena.part_named(who.tenant or ""):
            raise precondition(f"{what}: namespace {namespace} lives in its tenant's own arena part, which "
                               f"{who.name} does not map; use Get and Put")

    def _own(self, context, name: str, allow_star: bool = False) -> str:
        """The validated namespace, if the caller may touch it (PERMISSION_DENIED otherwise)."""
        name = self.check.namespace(name, allow_star)
        who = self.identify(context)
        if (name == "*" and not who.admin) or not who.owns(name):
            raise denied(f"{who.name} may use only namespaces named \"{who.tenant}/...\"")
        return name

    def _admin(self, context, what: str) -> Principal:
        who = self.identify(context)
        if not who.admin:
            raise denied(f"{what} needs an admin token; {who.name} is bound to tenant {who.tenant}")
        return who

    def _owned(self, table, held_id: int, context, what: str):
        """An allocation or lease the caller opened (another tenant's id reads as not open)."""
        held = table.get(held_id)
        if held is not None and held.owner != self.identify(context).tenant:
            held = None
        if held is None:
            raise precondition(f"{what} {held_id} is not open (committed, released, expired or not yours)")
        return held

    def _tenant_names(self, context):
        """None for an admin (every namespace); else the caller's own namespace names."""
        who = self.identify(context)
        return None if who.admin else [n for n in self.store.catalog.namespaces if who.owns(n)]

    @_unary
    async def RegisterNamespace(self, request, context):
        name = self._own(context, request.name)
        self._check_namespace_quota(self.identify(context), name)
        created = await self.store.register_namespace(name, self.check.attributes(request.attributes))
        if created:
            log.info("namespace %s registered by %s (%s)", name, self.identify(context).name,
                     dict(request.attributes))
        return pb.RegisterNamespaceResponse(created=created)

    def _check_namespace_quota(self, who: Principal, name: str) -> None:
        """Each namespace counts in one share: its configured tenant's (max_namespaces of the table),
        or the share of everything else (limits.max_namespaces: administrators' namespaces and those
        of tenants without a table); a tenant without a table also has its own small bound. So no
        principal can fill a configured tenant's share, whatever the others did."""
        namespaces = self.store.catalog.namespaces
        if name in namespaces:
            return
        tenant = self.tenants.get(self.store.events.tenant_of(name) or "")
        if tenant is not None:
            if sum(1 for n in namespaces if n.startswith(tenant.name + "/")) >= tenant.max_namespaces:
                self._refuse(who, "namespaces", f"tenant {tenant.name} has its max_namespaces "
                             f"({tenant.max_namespaces}) namespaces; an administrator can RemoveNamespace one")
            return
        if not who.admin:
            bound = self.limits.untabled_tenant_max_namespaces
            if sum(1 for n in namespaces if who.owns(n)) >= bound:
                self._refuse(who, "namespaces", f"tenant {who.tenant} has no [[tenant]] table and its "
                             f"limits.untabled_tenant_max_namespaces ({bound}) namespaces")
        shared = sum(1 for n in namespaces if self.store.events.tenant_of(n) is None)
        if shared >= self.limits.max_namespaces:
            self._refuse(who, "namespaces", f"the node's namespaces for administrators and tenants without a "
                         f"[[tenant]] table are all in use ({self.limits.max_namespaces}); raise "
                         "limits.max_namespaces, or an administrator can RemoveNamespace one")

    def _refuse(self, who: Principal, what: str, why: str):
        """Counts and logs (at most once per REFUSAL_LOG_S per principal and bound) a refusal, and
        raises it as RESOURCE_EXHAUSTED."""
        counters = self.store.counters
        setattr(counters, f"{what}_refused", getattr(counters, f"{what}_refused") + 1)
        now = time.monotonic()
        if now - self._refusal_log.get((who.name, what), -REFUSAL_LOG_S) >= REFUSAL_LOG_S:
            if len(self._refusal_log) >= 4096:
                self._refusal_log.clear()
            self._refusal_log[(who.name, what)] = now
            log.warning("%s refused for %s (%s): %s", what, who.name,
                        "an administrator" if who.admin else f"tenant {who.tenant}", why)
        raise exhausted(why)

    async def _pull(self, who: Principal, namespace: str, keys, have: int, peer: str = "") -> int:
        """Blocks pulled from peers (only from `peer` when one is named), within the tenant's
        max_pulls in flight (0 past it)."""
        tenant = self.tenants.get(who.tenant or "")
        bound = (tenant.max_pulls if tenant is not None
                 else None if who.admin else self.limits.untabled_tenant_max_pulls)
        key = who.tenant or ""
        if bound is not None and self._pulls[key] >= bound:
            self.store.counters.tenant_pulls_refused += 1  # kvtier_tenant_pulls_refused_total
            log.debug("tenant %s has %d peer pulls in flight: answered from local blocks", key, bound)
            return 0
        self._pulls[key] += 1
        try:
            return await self.peers.fetch(namespace, keys, have, peer)
        finally:
            self._pulls[key] -= 1

    @_unary
    async def ListNamespaces(self, request, context):
        who = self.identify(context)
        return pb.ListNamespacesResponse(namespaces=[
            pb.NamespaceInfo(name=n.name, attributes=n.attributes, blocks=len(n.blocks), bytes=n.bytes)
            for n in sorted(self.store.catalog.namespaces.values(), key=lambda n: n.name) if who.owns(n.name)])

    @_unary
    async def Lookup(self, request, context):
        namespace = self._own(context, request.namespace)
        keys = self.check.keys(request.keys)
        tiers = self.store.lookup(namespace, keys)
        from_peers = 0
        if request.consult_peers and len(tiers) < len(keys) and self.peers is not None:
            from_peers = await self._pull(self.identify(context), namespace, keys, len(tiers), request.peer)
            tiers = self.store.catalog.lookup(namespace, keys) if from_peers else tiers
        return pb.LookupResponse(matched=len(tiers), tiers=tiers, from_peers=from_peers)

    @_unary
    async def FindMatches(self, request, context):
        namespace = self._own(context, request.namespace)
        depth = self.store.catalog.find_matches(namespace, self.check.keys(request.keys))
        return pb.FindMatchesResponse(any=depth[0], gpu=depth[pb.TIER_GPU], cpu=depth[pb.TIER_CPU],
                                      disk=depth[pb.TIER_DISK], s3=depth[pb.TIER_S3])

    @_streaming
    async def Snapshot(self, request, context):
        if request.namespace:
            self.store.catalog.namespace(self._own(context, request.namespace))
        names = self._tenant_names(context)
        # Pages are taken between awaits; events that land meanwhile have seq > the first page's,
        # so the snapshot carries the seq read before the first page and a watcher resumes there.
        # The seq is node-wide: the caller's own ring (events.py) keeps its events by that seq, so
        # Watch(from_seq = seq + 1) replays exactly the caller's events since, whatever other
        # tenants' churn did to their rings.
        seq, token = self.store.events.seq, b""
        while True:
            blocks, token = self.store.catalog.page(request.namespace, 0, self.limits.max_page_size, token,
                                                    names=names)
            yield pb.SnapshotChunk(seq=seq, blocks=[self.store.info(b) for b in blocks])
            if not token:
                return

    @_unary
    async def ArenaInfo(self, request, context):
        who = self._local(context, "ArenaInfo")
        arena, index = self.store.arena, self.store.arena.part_named(who.tenant or "")
        part = arena.parts[index]
        return pb.ArenaInfoResponse(path="", size_bytes=part.slot_count * arena.slot_bytes,
                                    slot_bytes=arena.slot_bytes, slot_count=part.slot_count,
                                    generation=arena.generation, first_slot=part.first_slot,
                                    namespace_prefix=f"{who.tenant}/" if who.tenant else "",
                                    max_keys_per_request=self.limits.max_keys_per_request,
                                    max_key_bytes=self.limits.max_key_bytes,
                                    max_allocate=self.store.max_allocate(index))

    @_unary
    async def Allocate(self, request, context):
        who = self._local(context, "Allocate")
        held = await self.store.allocate(self.check.count(request.count), self.check.wait_ms(request.wait_ms),
                                         self.check.lease_ms(request.lease_ms),
                                         self.store.arena.part_named(who.tenant or ""), owner=who.tenant)
        return pb.AllocateResponse(allocation_id=held.id, slots=held.items, slot_bytes=self.store.arena.slot_bytes,
                                   generation=self.store.arena.generation,
                                   deadline_unix_ms=_deadline_unix_ms(held.deadline))

    @_unary
    async def Commit(self, request, context):
        """INVALID_ARGUMENT always means the allocation was aborted (here for a bad entry, in the
        store for a bad slot or checksum): a refused commit is never retried on the same slots.
        A namespace or ownership refusal leaves the allocation as it was."""
        self._local(context, "Commit")
        namespace = self._own(context, request.namespace)
        self._owned(self.store.allocations, request.allocation_id, context, "allocation")
        try:
            staged = self._staged(request)
        except ApiError:
            self.store.abort(request.allocation_id)
            raise
        statuses = await self.store.commit(request.allocation_id, namespace, staged, request.wait_durable,
                                           principal=self.identify(context).name,
                                           origin=request.origin if request.HasField("origin") else None)
        return pb.CommitResponse(status=statuses)

    def _staged(self, request) -> list[Staged]:
        """The request's entries, validated (INVALID_ARGUMENT naming the field)."""
        if len(request.entries) > self.limits.max_keys_per_request:
            raise invalid(f"at most {self.limits.max_keys_per_request} entries per commit")
        default = self.check.retention(request, "request")
        return [Staged(self.check.key(e.key, f"entries[{i}].key"),
                       self.check.key(e.parent, f"entries[{i}].parent", optional=True),
                       e.slot, e.length, e.checksum, self.check.retention(e, f"entries[{i}]", default),
                       token_ids=e.token_ids, lora_name=e.lora_name)
                for i, e in enumerate(request.entries)]

    @_unary
    async def Abort(self, request, context):
        self._owned(self.store.allocations, request.allocation_id, context, "allocation")
        self.store.abort(request.allocation_id)
        return pb.AbortResponse()

    @_unary
    async def Acquire(self, request, context):
        who = self._local(context, "Acquire")
        namespace = self._own(context, request.namespace)
        self._in_my_part(who, namespace, "Acquire")
        if request.gpu and not who.admin:
            raise denied("Acquire with gpu=true hands out CUDA IPC handles to the shared GPU pool: "
                         "administrators only")
        keys = self.check.keys(request.keys)
        held, found = await self.store.acquire(namespace, keys, self.check.lease_ms(request.lease_ms),
                                               gpu=request.gpu, owner=who.tenant)
        on_gpu = {block for block, _ in held.gpu_items} if held else set()
        blocks = [self._acquired(b, b in on_gpu) if b is not None else pb.AcquiredBlock() for b in found]
        return pb.AcquireResponse(lease_id=held.id if held else 0, blocks=blocks,
                                  generation=self.store.arena.generation,
                                  deadline_unix_ms=_deadline_unix_ms(held.deadline) if held else 0)

    def _acquired(self, block, on_gpu: bool) -> pb.AcquiredBlock:
        acquired = pb.AcquiredBlock(found=True, slot=self.store.cpu.slot_of(block), length=block.length,
                                    checksum=block.checksum)
        if on_gpu:
            gpu_slot = self.store.gpu.slot_of(block)
            acquired.on_gpu, acquired.gpu_slot = True, gpu_slot
            acquired.gpu_ipc_handle = self.store.gpu.ipc_handle(gpu_slot) or b""
        return acquired

    @_unary
    async def Release(self, request, context):
        self._owned(self.store.leases, request.lease_id, context, "lease")
        self.store.release(request.lease_id)
        return pb.ReleaseResponse()

    @_unary
    async def Put(self, request_iterator, context):
        first = await anext(request_iterator, None)
        if first is None or first.WhichOneof("part") != "header":
            raise invalid("a Put stream starts with a header message")
        h = first.header
        status = await self.store.put(
            self._own(context, h.namespace), self.check.key(h.key), self.check.key(h.parent, "parent", True),
            _chunks(request_iterator), h.length, h.checksum, self.limits.max_wait_ms, h.wait_durable,
            self.check.retention(h, "header"), principal=self.identify(context).name)
        return pb.PutResponse(status=status)

    @_streaming
    async def Get(self, request, context):
        namespace = self._own(context, request.namespace)
        key = self.check.key(request.key)
        held, found = await self.store.acquire(namespace, [key], self.limits.default_lease_ms,
                                               owner=self.identify(context).tenant)
        if held is None:
            raise not_found(f"block {key.hex()} is not stored in {namespace}")
        try:
            block = found[0]
            yield pb.GetResponse(info=self.store.info(block))
            view, step = self.store.cpu.view(block), self.limits.put_chunk_bytes
            for start in range(0, block.length, step):
                yield pb.GetResponse(chunk=bytes(view[start:min(start + step, block.length)]))
        finally:
            self.store.release(held.id)

    @_unary
    async def Inventory(self, request, context):
        if request.namespace:
            self.store.catalog.namespace(self._own(context, request.namespace))
        page_size = request.page_size or 100
        if page_size > self.limits.max_page_size:
            raise invalid(f"page_size must be at most {self.limits.max_page_size}")
        if len(request.page_token) > self.limits.max_namespace_bytes + self.limits.max_key_bytes + 1:
            raise invalid("page_token is not one this daemon issued")
        blocks, token = self.store.catalog.page(request.namespace, request.tier_mask, page_size, request.page_token,
                                                match=self._inventory_filter(request),
                                                names=self._tenant_names(context))
        return pb.InventoryResponse(blocks=[self.store.info(b) for b in blocks], next_page_token=token)

    @staticmethod
    def _inventory_filter(request):
        cls, pin = request.retention_class, request.pin
        if cls and cls not in CLASS_RANK:
            raise invalid(f"retention_class {cls!r} is not one of {', '.join(CLASS_RANK)}")
        if pin not in (pb.PIN_ANY, pb.PIN_PINNED, pb.PIN_UNPINNED):
            raise invalid(f"pin filter {pin} is not a PinFilter value")
        if not cls and pin == pb.PIN_ANY:
            return None

        def match(block) -> bool:
            if cls and (block.retention.cls if block.retention is not None else "conversation") != cls:
                return False
            if pin == pb.PIN_ANY:
                return True
            return (block.pinned_until_ms() > _now_unix_ms()) == (pin == pb.PIN_PINNED)
        return match

    @_unary
    async def Stat(self, request, context):
        namespace = self._own(context, request.namespace)
        self.store.catalog.namespace(namespace)
        block = self.store.catalog.get(namespace, self.check.key(request.key))
        if block is None:
            raise not_found(f"block {request.key.hex()} is not stored in {namespace}")
        return self.store.info(block)

    @_unary
    async def Stats(self, request, context):
        self._admin(context, "Stats")
        return stats_response(self.store)

    @_unary
    async def Delete(self, request, context):
        deleted, busy = await self.store.delete(self._own(context, request.namespace),
                                                self.check.keys(request.keys))
        return pb.DeleteResponse(deleted=deleted, busy=busy)

    @_unary
    async def Clear(self, request, context):
        namespace = self._own(context, request.namespace, allow_star=True)
        deleted = await self.store.clear(namespace)
        log.warning("cleared %s for %s: %d blocks deleted", namespace, self.identify(context).name, deleted)
        return pb.ClearResponse(deleted=deleted)

    @_unary
    async def RemoveNamespace(self, request, context):
        who = self._admin(context, "RemoveNamespace")
        namespace = self.check.namespace(request.namespace)
        deleted = await self.store.remove_namespace(namespace)
        log.warning("namespace %s removed by %s: %d blocks deleted", namespace, who.name, deleted)
        return pb.RemoveNamespaceResponse(deleted=deleted)

    @_unary
    async def SetRetention(self, request, context):
        namespace = self._own(context, request.namespace)
        keys = self.check.keys(request.keys)
        retention = self.check.retention(request, "request")
        if retention is None:
            raise invalid("retention is required")
        return pb.SetRetentionResponse(updated=self.store.set_retention(namespace, keys, retention))

    @_unary
    async def Prefetch(self, request, context):
        namespace = self._own(context, request.namespace)
        keys = self.check.keys(request.keys)
        from_peers = 0
        if request.consult_peers and self.peers is not None:
            local = len(self.store.catalog.lookup(namespace, keys))
            if local < len(keys):
                from_peers = await self._pull(self.identify(context), namespace, keys, local, request.peer)
        matched, warmed = await self.store.prefetch(namespace, keys, request.gpu)
        return pb.PrefetchResponse(matched=matched, warmed=warmed, from_peers=from_peers)

    @_streaming
    async def Watch(self, request, context):
        """Events the caller may see, replayed from from_seq then live, until the caller goes away.
        A principal whose token expires meanwhile loses the stream (UNAUTHENTICATED) at the next
        event or at latest WATCH_RECHECK_S after the expiry, even when no event comes."""
        if request.namespace:
            self._own(context, request.namespace)
        who = self.identify(context)
        async for event in self._watch(request, who, context):
            yield event

    async def _watch(self, request, who: Principal, context):
        """An administrator watches the node ring (every event); a tenant its own ring, one of its
        own bound and size, which no other tenant's events fill (daemon/events.py)."""
        def wanted(event) -> bool:
            return (event.namespace == request.namespace if request.namespace
                    else who.owns(event.namespace))  # an admin owns every namespace
        try:
            replay, queue = self.store.events.subscribe(request.from_seq, who.tenant)
            head = self.store.events.seq  # every event of the ring up to here is replayed or older than from_seq
        except ApiError as exc:
            if exc.kind is not ErrorKind.EXHAUSTED:
                raise
            self._refuse(who, "watchers", exc.message)
        try:
            await context.send_initial_metadata(())  # the stream is open: a client can tell, before any event
            for event in replay:
                _still_authenticated(who)
                if wanted(event):
                    yield event
            last = head
            while True:
                event = await _next_event(queue, who)
                if event is OVERFLOW:
                    raise exhausted(f"watcher fell behind; resume with from_seq={last + 1}")
                if event.seq > last:
                    last = event.seq
                    if wanted(event):
                        yield event
        finally:
            self.store.events.unsubscribe(queue)


REFUSAL_LOG_S = 10.0  # a refused principal's bound is logged at most this often
WATCH_RECHECK_S = 2.0  # the longest an idle Watch with an expiring token sleeps between checks


def _still_authenticated(who: Principal) -> None:
    """UNAUTHENTICATED once `who`'s token has expired: checked at the start of a call is not enough
    for a stream that may stay open for days."""
    if who.expired():
        raise unauthenticated(f"{who.name} expired while the stream was open; reconnect with a valid token")


async def _next_event(queue: asyncio.Queue, who: Principal):
    """The next queued event, checking `who` before each one. With an expiring token the wait wakes
    at the expiry (and at least every WATCH_RECHECK_S, in case the wall clock jumps), so an idle
    stream ends too; a principal that never expires just waits."""
    while True:
        _still_authenticated(who)
        if not who.expires_unix:
            return await queue.get()
        wake_s = min(WATCH_RECHECK_S, max(0.0, who.expires_unix - time.time()) + 0.01)
        try:
            # Cancelling a Queue.get on timeout loses no event: get() takes one only when it returns.
            return await asyncio.wait_for(queue.get(), wake_s)
        except asyncio.TimeoutError:
            continue


async def _chunks(request_iterator):
    async for message in request_iterator:
        if message.WhichOneof("part") != "chunk":
            raise invalid("after the header, a Put stream carries only chunks")
        yield message.chunk


def _now_unix_ms() -> int:
    return int(time.time() * 1000)


def _deadline_unix_ms(deadline_monotonic: float) -> int:
    return int((time.time() + deadline_monotonic - time.monotonic()) * 1000)


def add_to_server(server, servicer, service_name: str) -> None:
    """Registers `servicer` for kvtier.v1.<service_name> with requests parsed by us, not by gRPC: a
    request that is not valid protobuf gets INVALID_ARGUMENT naming its type (gRPC's own parser
    would answer INTERNAL and log a traceback per bad request, which a hostile client can flood)."""
    service = pb.DESCRIPTOR.services_by_name[service_name]
    handlers = {}
    for method in service.methods:
        request_type = message_factory.GetMessageClass(method.input_type)
        response_type = message_factory.GetMessageClass(method.output_type)
        behaviour = getattr(servicer, method.name)
        kind = _HANDLER_KINDS[(method.client_streaming, method.server_streaming)]
        wrapped = _parsing(behaviour, request_type, method.client_streaming, method.server_streaming)
        handlers[method.name] = kind(wrapped, request_deserializer=None,
                                     response_serializer=response_type.SerializeToString)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, handlers),))


_HANDLER_KINDS = {(False, False): grpc.unary_unary_rpc_method_handler,
                  (False, True): grpc.unary_stream_rpc_method_handler,
                  (True, False): grpc.stream_unary_rpc_method_handler,
                  (True, True): grpc.stream_stream_rpc_method_handler}


def _parse(request_type, raw: bytes):
    try:
        return request_type.FromString(raw)
    except DecodeError as exc:
        raise invalid(f"the request is not a valid {request_type.DESCRIPTOR.full_name} message") from exc


def _parsing(behaviour, request_type, client_streaming: bool, server_streaming: bool):
    async def parsed_stream(raw_iterator):
        async for raw in raw_iterator:
            yield _parse(request_type, raw)

    async def unary(raw, context):
        try:
            request = parsed_stream(raw) if client_streaming else _parse(request_type, raw)
            return await behaviour(request, context)
        except ApiError as exc:  # a malformed first message (later stream messages: the method's handler)
            await context.abort(grpc_code(exc), exc.message)

    async def streaming(raw, context):
        try:
            request = _parse(request_type, raw)
        except ApiError as exc:
            await context.abort(grpc_code(exc), exc.message)
        async for reply in behaviour(request, context):
            yield reply

    assert not (client_streaming and server_streaming), "no bidirectional methods in kvtier.v1"
    return streaming if server_streaming else unary
