"""S3 write-through and read-through for the block store.

Contract
- Crash-safe write-through: a block's upload obligation is recorded by the disk tier in the same
  LMDB transaction that indexes the block (DiskTier.write_batch(upload=...)), so no crash leaves a
  durable block without its obligation, and a segment holding a block still owed to S3 is never
  evicted: an S3 outage costs disk space, never acknowledged data. When the disk is full of such
  blocks, write-through stalls (wait_durable commits answer UNAVAILABLE after their bound) and
  Allocate pushes back on clients.
- The uploader pages through the obligations oldest first (bounded memory), uploads with bounded
  concurrency, and settles an obligation only once S3 holds the object (stored by us, or already
  there: If-None-Match makes writers race safely). Every failure backs off with jitter, also when a
  pass makes no progress; permanent errors (no bucket, access denied) mark S3 unreachable and
  say why.
- Start-up probes that the endpoint honours If-None-Match; when it does not, S3Refused stops the
  daemon unless s3.allow_unconditional_puts is set (then logs and metrics say cross-node dedup is
  not guaranteed).
- Reads from S3 are verified against the block's own checksum and length (the catalog's, recorded
  at commit or at listing): a replaced object is a miss, never data.
- The lister adopts blocks that other nodes uploaded, so a fresh node sees the bucket's blocks, but
  only blocks of namespaces registered here (namespaces.json): the bucket never creates a namespace
  (limits.max_namespaces and the tenants' bounds hold), and an adopted block gets the local default
  retention (S3 objects carry none).
- With a cluster key (cluster.key_file, daemon/mac.py) every upload carries the block's MAC and its
  header's MAC in its metadata; the lister adopts only objects whose header MAC verifies (a HEAD,
  no GET), and a read from S3 is served only if the block MAC verifies over the downloaded bytes.
  An object that fails is refused (mac_rejected), logged once, never committed, and skipped by
  later listings; it is not deleted (a node with another key must not delete the cluster's data).
  Without a key, a bucket writer can plant any block that passes its checksum (docs/s3-format.md).
- Per-tenant quota (`[[tenant]] s3_capacity`): `changed` is the one place where the count of blocks
  in S3 and each configured tenant's payload bytes there (`tenant_bytes`) move, with the catalog's S3
  bit: an upload or an "already there" answer, adoption from the listing (a block of this node's or
  another node's), a download refused or quarantined, a delete or clear (nothing evicts from S3). An
  upload that would take its tenant past its quota, counting the batch's uploads before it, is
  skipped: its obligation is settled at once (durably: it is neither retried nor counted twice), the
  block stays on disk only, `kvtier_tenant_s3_refused_total` counts it, and a warning names the
  tenant at most once a minute. A skipped block is not uploaded later when the tenant is below its
  quota again (a commit of it after it left the node is). Adoption is never refused, so what other
  nodes uploaded can put a tenant over its quota here; it then uploads nothing until deletes bring it
  below. Until a listing pass has counted what the bucket holds of a tenant (the first pass since
  start; after one of its namespaces is newly registered, a pass that began after that, asked for at
  once), the tenant's uploads wait (other tenants' do not). What is not bounded: what other nodes
  upload between two listings (each node checks against what it knows, so N nodes may together
  upload up to N quotas' worth between listings), namespaces not registered on this node, blocks
  beyond s3.max_catalog_blocks, and objects removed behind the node's back (another node's delete, a
  lifecycle rule) that stay counted until a read misses them or the node restarts.
- Event loop only; S3 and LMDB calls run on worker threads.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import mmap
import os
import random
import time
from concurrent.futures import ThreadPoolExecutor

from kvtier.proto.v1 import kvtier_pb2 as pb
from kvtier.tiers.block import BlockHeader, align_up
from kvtier.tiers.s3 import (METADATA_HEADER_MAC, METADATA_MAC, S3Config, S3Misconfigured, S3Tier, S3Unavailable,
                             header_fits_metadata)

from . import mac as macs
from .catalog import Block, interned
from .config import S3TierConfig, check_secret_stat
from .peers import printable
from .store import quota_log_due, wait_event

log = logging.getLogger("kvtier.s3sync")
S3, CPU, DISK = pb.TIER_S3, pb.TIER_CPU, pb.TIER_DISK
UPLOAD = "upload"
UPLOAD_BATCH_PER_WORKER = 4
BACKOFF_MAX_S = 30.0
UNREACHABLE_PROBLEM_S = 30.0  # S3 unreachable this long with uploads owed: health says NOT_SERVING
PROBE_BOUND_S = 3.0           # the start-up If-None-Match probe waits this long, then retries later
REJECTED_MEMORY = 16384       # object keys refused for their MAC that later listings skip (oldest forgotten)
LIST_SOONEST_S = 1.0          # a pass a registration asks for starts no sooner after the previous pass began


class S3Refused(Exception):
    """The S3 endpoint cannot be trusted with write-through (the message says why and what to set)."""


@dataclasses.dataclass
class S3Counters:
    uploads: int = 0
    upload_bytes: int = 0
    already_there: int = 0
    downloads: int = 0
    download_bytes: int = 0
    failures: int = 0
    adopted: int = 0
    adoption_capped: int = 0   # listing passes that stopped at s3.max_catalog_blocks
    mac_rejected: int = 0      # objects refused because their MAC is missing or wrong (cluster key set)


def tier_config(cfg: S3TierConfig) -> S3Config:
    """The S3 tier's settings; the secret is read from its file, whose mode is checked again on the
    open file (config.load checked the path; the file may have been replaced since)."""
    secret = None
    if cfg.secret_access_key_file:
        with open(cfg.secret_access_key_file, encoding="utf-8") as file:
            check_secret_stat("s3.secret_access_key_file", cfg.secret_access_key_file, os.fstat(file.fileno()))
            secret = file.read().strip()
    return S3Config(endpoint_url=cfg.endpoint_url or None, bucket=cfg.bucket, prefix=cfg.prefix,
                    region=cfg.region or None, access_key_id=cfg.access_key_id or None, secret_access_key=secret,
                    max_concurrency=cfg.max_concurrency, connect_timeout_s=cfg.connect_timeout_s,
                    read_timeout_s=cfg.read_timeout_s)


class S3Sync:
    def __init__(self, store, cfg: S3TierConfig, tier: S3Tier | None = None):
        self.store = store
        self.cfg = cfg
        self.tier = tier
        self.counters = S3Counters()
        self.blocks = 0                  # catalog blocks with the S3 bit; this and tenant_bytes move in changed()
        self.tenant_bytes: collections.Counter[str] = collections.Counter()  # configured tenants' payload bytes
        self._quotas = {t.name: t.s3_capacity for t in store.cfg.tenant if t.s3_capacity}
        self._quota_log: dict[str, tuple[float, int]] = {}  # tenant -> (last line, refusals since)
        # Tenants with a quota whose uploads wait for a listing pass that began after their latest
        # namespace registration (at start: every one of them, until the first pass completes).
        self._registrations = 0          # quota tenants' namespaces registered since start (a sequence)
        self._unlisted: dict[str, int] = dict.fromkeys(self._quotas, 0)  # tenant -> registration to list after
        self._list_now = asyncio.Event()  # a quota tenant's namespace was registered: list soon
        self.reachable = True
        self.unreachable_since: float | None = None
        self.last_error = ""
        self.conditional_puts = True     # the endpoint honours If-None-Match (probed before uploading)
        self._probed = False
        self.backlog = 0                 # open upload obligations (the disk tier's count, refreshed)
        self._pool = ThreadPoolExecutor(cfg.max_concurrency, thread_name_prefix="kvtier-s3")
        self._uploading: set[Block] = set()
        self._wake = asyncio.Event()
        self.key: bytes | None = None    # the cluster key (start() loads it): MACs on every object
        self._rejected: collections.OrderedDict[str, None] = collections.OrderedDict()  # object keys

    # -- lifecycle ------------------------------------------------------------------------------
    async def start(self) -> str:
        try:
            self.key = macs.cluster_key(self.store.cfg)
        except macs.ClusterKeyError as exc:
            raise S3Refused(str(exc)) from None
        if self.tier is None:
            self.tier = await self._in(lambda: S3Tier(tier_config(self.cfg)))
        if self.cfg.write_through:
            await self._probe()
            self.backlog = await self._count_backlog()
            self.store._spawn(self._upload_loop(), "s3-upload")
        self.store._spawn(self._list_loop(), "s3-list")
        dedup = "" if self.conditional_puts else " (If-None-Match NOT honoured: no cross-node dedup)"
        macs_said = f"objects carry MACs under cluster key {macs.key_id(self.key)}" if self.key else \
            "no cluster key: objects are checked by checksum only, a bucket writer can plant blocks"
        return f"s3 bucket {self.cfg.bucket}: {self.backlog} uploads owed{dedup}; {macs_said}"

    async def _probe(self) -> None:
        """Raises S3Refused when the endpoint ignores If-None-Match and that is not allowed; an
        unreachable endpoint is probed again before the first upload."""
        try:
            async with asyncio.timeout(PROBE_BOUND_S):  # an unreachable S3 must not hold up the start
                self.conditional_puts = await self._in(self.tier.probe_conditional_puts)
        except (S3Unavailable, TimeoutError) as exc:
            log.warning("could not probe S3 for If-None-Match support (%s); probing again before uploading",
                        exc or "no answer in time")
            return
        self._probed = True
        if self.conditional_puts:
            return
        if not self.cfg.allow_unconditional_puts:
            raise S3Refused(f"S3 endpoint {self.cfg.endpoint_url or 'AWS'} ignores If-None-Match: a second writer "
                            "would silently overwrite blocks; use an endpoint that honours conditional writes, "
                            "or set s3.allow_unconditional_puts = true to accept that")
        log.warning("S3 endpoint ignores If-None-Match; s3.allow_unconditional_puts is set: blocks are not "
                    "deduplicated across nodes and a second writer may overwrite an object")

    async def _count_backlog(self) -> int:
        return await self.store._on_reader(self.store.disk.upload_backlog)

    async def close(self) -> None:
        self._pool.shutdown(wait=True)
        if self.tier is not None:
            self.tier.close()

    async def _in(self, fn):
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn)

    def wake(self) -> None:
        """A block with an upload obligation landed on disk."""
        self.backlog += 1
        self._wake.set()

    def uploading(self, block: Block) -> bool:
        return block in self._uploading

    def problem(self) -> str | None:
        if self.unreachable_since is not None and self.backlog and \
                time.monotonic() - self.unreachable_since > UNREACHABLE_PROBLEM_S:
            return f"S3 unreachable for {time.monotonic() - self.unreachable_since:.0f}s with " \
                   f"{self.backlog} uploads owed: {self.last_error}"
        return None

    # -- write-through --------------------------------------------------------------------------
    async def _upload_loop(self) -> None:
        failures, cursor = 0, None
        batch_size = self.cfg.max_concurrency * UPLOAD_BATCH_PER_WORKER
        while True:
            page, next_cursor = await self.store._on_reader(
                lambda after=cursor: self.store.disk.pending_uploads(after, batch_size))
            if not page:
                self.backlog = await self._count_backlog()
                cursor = None
                await self._idle(1.0)
                continue
            try:
                if not self._probed:
                    await self._probe()  # S3Refused ends this task: the daemon stops, saying why
                    if not self._probed:
                        raise S3Unavailable("S3 did not answer the If-None-Match probe")
                settled, deferred = await self._upload_batch(page)
            except S3Unavailable as exc:
                failures += 1
                self._unreachable(exc, failures)
                await asyncio.sleep(_backoff(failures))
                continue
            if deferred < len(page):  # S3 was asked (a page deferred whole says nothing about it)
                self._reachable_again()
            if settled:
                await self.store._on_writer(lambda done=settled: self.store.disk.settle_uploads(done))
                self.backlog = max(0, self.backlog - len(settled))
                failures = 0
            cursor = next_cursor
            if len(settled) + deferred < len(page):  # some could not be uploaded now: never spin on them
                failures += 1
                await asyncio.sleep(_backoff(failures))

    async def _idle(self, timeout: float) -> None:
        self._wake.clear()
        await wait_event(self._wake, timeout)

    def _unreachable(self, exc: Exception, failures: int) -> None:
        self.counters.failures += 1
        self.last_error = str(exc)
        if self.reachable:
            kind = "misconfigured" if isinstance(exc, S3Misconfigured) else "unreachable"
            log.error("S3 %s (%s): %d uploads waiting; local puts continue", kind, exc, self.backlog)
            self.unreachable_since = time.monotonic()
        self.reachable = False

    def _reachable_again(self) -> None:
        if not self.reachable:
            log.warning("S3 reachable again: draining %d uploads", self.backlog)
        self.reachable, self.unreachable_since, self.last_error = True, None, ""

    async def _upload_batch(self, batch) -> tuple[list, int]:
        """Uploads a batch concurrently; returns the ids whose obligation is settled (those refused
        for their tenant's s3_capacity included), and how many were deferred until a listing has
        counted their tenant's objects. Raises S3Unavailable when S3 failed every upload it was
        asked for."""
        work, settled, refused, deferred = [], [], [], 0
        planned: collections.Counter[str] = collections.Counter()
        for block_id in batch:
            block = self.store.catalog.get(*block_id)
            if block is None or block.tiers & S3:
                settled.append(block_id)  # deleted everywhere, or already uploaded
            elif block.tiers & (CPU | DISK):
                tenant = self.store.tenant_of(block.namespace)
                quota = self._quotas.get(tenant) if tenant is not None else None
                if quota is not None and tenant in self._unlisted:
                    deferred += 1  # what the bucket holds of the tenant is not known yet
                    continue
                if quota is not None and self.tenant_bytes[tenant] + planned[tenant] + block.length > quota:
                    self._refuse(block, tenant, quota)
                    refused.append(block_id)
                    continue
                if quota is not None:
                    planned[tenant] += block.length
                work.append(block)
        if refused:  # settled before any upload: an outage below must not offer (and count) them again
            await self.store._on_writer(lambda: self.store.disk.settle_uploads(refused))
        results = await asyncio.gather(*(self._upload_one(b) for b in work), return_exceptions=True)
        unavailable = None
        for block, result in zip(work, results):
            if isinstance(result, S3Unavailable):
                unavailable = result
            elif isinstance(result, BaseException):
                self.counters.failures += 1
                log.error("upload of %s/%s failed: %r", block.namespace, block.key.hex(), result)
            elif result is not None:
                settled.append(block.id)
                self._mark_uploaded(block, result)
        if unavailable is not None and not settled:
            raise unavailable
        return settled + refused, deferred

    def _refuse(self, block: Block, tenant: str, quota: int) -> None:
        """The upload of `block` would take `tenant` past its s3_capacity: counted, logged (rate limited)."""
        self.store.counters.tenant_s3_refused += 1
        refusals = quota_log_due(self._quota_log, tenant)
        if refusals:
            log.warning("tenant %s: %d blocks not uploaded to S3 (kept on disk only): %d bytes of its blocks "
                        "are in S3, its s3_capacity is %d", tenant, refusals, self.tenant_bytes[tenant], quota)

    def changed(self, block: Block, change: int) -> None:
        """The block's S3 bit was just set (change 1) or cleared (-1): the S3 counts move here only."""
        self.blocks += change
        tenant = self.store.tenant_of(block.namespace)
        if tenant is not None:
            self.tenant_bytes[tenant] += change * block.length

    async def _upload_one(self, block: Block) -> str | None:
        header = BlockHeader(block.namespace, block.key, block.parent, block.length, block.checksum,
                             block.created_ms, block.token_ids, block.origin)
        if not header_fits_metadata(header):  # S3's 2 KB of user metadata: the object goes without token ids
            log.debug("S3 copy of %s/%s without its %d token ids: its header would not fit in S3 metadata",
                      printable(block.namespace), block.key.hex(), len(block.token_ids) // 4)
            header = dataclasses.replace(header, token_ids=b"")
        if self.store.catalog.get(block.namespace, block.key) is not block or block.tiers & S3:
            return None  # deleted (or uploaded) since the batch was read: never upload what Delete removed
        self._uploading.add(block)  # Delete answers busy from here on
        try:
            if block in self.store.cpu:
                slot = self.store.cpu.hold(block, UPLOAD)  # the slot cannot be reused while S3 reads it
                try:
                    view = self.store.arena.view(slot)[:block.length]
                    return await self._in(lambda: self._put(header, view))
                finally:
                    self.store.cpu.release(slot, UPLOAD)
            payload = await self._read_disk_copy(block)
            if payload is None:
                return None
            return await self._in(lambda: self._put(header, payload))
        finally:
            self._uploading.discard(block)

    def _put(self, header: BlockHeader, payload) -> str:
        """Worker thread: the upload, signed when there is a cluster key (the MACs are computed by
        the tier's `sign` on the exact bytes it sends, after it verified their checksum)."""
        if self.key is None:
            return self.tier.upload(header, payload)
        key = self.key

        def sign(encoded: bytes, sent) -> dict[str, str]:
            block_mac = macs.block_mac(key, header.namespace, header.key, sent)
            return {METADATA_MAC: block_mac.hex(), METADATA_HEADER_MAC: macs.header_mac(key, encoded, block_mac).hex()}
        return self.tier.upload(header, payload, sign=sign)

    async def _read_disk_copy(self, block: Block):
        disk = self.store.disk
        buffer = mmap.mmap(-1, align_up(max(block.length, 1), 4096))  # aligned, for O_DIRECT

        def read() -> bool:
            entry = disk.get_entry(block.namespace, block.key)
            return entry is not None and entry.checksum == block.checksum and \
                disk.read_into(entry, memoryview(buffer))
        if not await self.store._on_reader(read):
            if self.store.catalog.get(block.namespace, block.key) is block and block.tiers & DISK:
                self.store._quarantined(block, DISK)
            return None
        return memoryview(buffer)[:block.length]

    def _mark_uploaded(self, block: Block, result: str) -> None:
        if result == "exists":
            self.counters.already_there += 1
        else:
            self.counters.uploads += 1
            self.counters.upload_bytes += block.length
        if self.store.catalog.get(block.namespace, block.key) is block and not block.tiers & S3:
            block.tiers |= S3
            self.changed(block, 1)
            self.store.events.emit(pb.BLOCK_STORED, block.namespace, block.key, S3, length=block.length,
                                   parent=block.parent)

    # -- read-through ---------------------------------------------------------------------------
    async def download(self, block: Block, dest: memoryview) -> bool:
        """Copies the S3 object into dest, verified against the block's checksum and length (and,
        with a cluster key, its MAC); False (and the S3 bit dropped when the object is bad, forged or
        gone) otherwise."""
        try:
            length, problem = await self._in(lambda: self._download_verified(block, dest))
        except S3Unavailable as exc:
            log.warning("S3 read of %s/%s failed: %s", printable(block.namespace), block.key.hex(), exc)
            return False
        if problem is not None:
            self._refused(self.tier.object_key(block.namespace, block.key), block.namespace, block.key, problem)
            if self.store.catalog.get(block.namespace, block.key) is block and block.tiers & S3:
                self.store._drop_tier(block, S3)  # never read from S3 again; the listing skips it too
            return False
        if length is None or length != block.length:
            if self.store.catalog.get(block.namespace, block.key) is block and block.tiers & S3:
                self.store._quarantined(block, S3)
            return False
        self.counters.downloads += 1
        self.counters.download_bytes += length
        return True

    def _download_verified(self, block: Block, dest: memoryview) -> tuple[int | None, str | None]:
        """Worker thread: (length or None, why the MAC refuses the bytes or None)."""
        metadata = None if self.key is None else {}
        length = self.tier.download_into(block.namespace, block.key, dest, expected_checksum=block.checksum,
                                         expected_length=block.length, metadata=metadata)
        if length is None or self.key is None:
            return length, None
        return length, _mac_problem(self.key, block.namespace, block.key, dest[:length], metadata)

    def _refused(self, object_key: str, namespace: str, key: bytes, problem: str) -> None:
        """An object whose MAC is missing or wrong: counted, logged once per object, remembered so
        that listings skip it (the oldest of REJECTED_MEMORY object keys are forgotten)."""
        self.counters.mac_rejected += 1
        if object_key in self._rejected:
            return
        self._rejected[object_key] = None
        if len(self._rejected) > REJECTED_MEMORY:
            self._rejected.popitem(last=False)
        log.warning("S3 object %s (%s/%s) refused: %s; not served, not adopted, left in the bucket",
                    printable(object_key, 256), printable(namespace), key.hex(), problem)

    async def delete(self, block: Block) -> None:
        try:
            await self._in(lambda: self.tier.delete(block.namespace, block.key))
        except S3Unavailable as exc:
            log.warning("S3 delete of %s/%s failed (%s): the object stays in the bucket",
                        block.namespace, block.key.hex(), exc)

    # -- adopting what other nodes uploaded -----------------------------------------------------
    async def _list_loop(self) -> None:
        failures = 0
        while True:
            started = time.monotonic()
            self._list_now.clear()
            registered_before = self._registrations  # _list_once lists every namespace registered so far
            try:
                adopted = await self._list_once()
                failures = 0
                self._listed(registered_before)
                if adopted:
                    log.info("adopted %d blocks from s3://%s/%s", adopted, self.cfg.bucket, self.cfg.prefix)
            except S3Unavailable as exc:
                failures += 1
                log.warning("listing s3://%s failed: %s", self.cfg.bucket, exc)
            # After a failure, list again soon (with backoff): until a listing succeeds this node does
            # not know which of its blocks S3 already holds.
            wait = _backoff(failures) if failures else self.cfg.list_interval_s - (time.monotonic() - started)
            if await wait_event(self._list_now, max(0.0, wait)):  # a quota tenant registered a namespace
                await asyncio.sleep(max(0.0, LIST_SOONEST_S - (time.monotonic() - started)))

    def registered(self, namespace: str) -> None:
        """`namespace` was just registered here (new, or only found on disk before): the bucket's
        objects of it count from the next listing pass on, so its tenant, if it has a quota, uploads
        nothing until a pass that begins after now (asked for now) has completed."""
        tenant = self.store.tenant_of(namespace)
        if tenant in self._quotas:
            self._registrations += 1
            self._unlisted[tenant] = self._registrations
            self._list_now.set()

    def _listed(self, registered_before: int) -> None:
        """A pass that listed every namespace of the first `registered_before` registrations has
        completed: those tenants' objects in the bucket are counted now, and their uploads (deferred
        until this) go ahead, checked against what the listing found."""
        done = [tenant for tenant, registration in self._unlisted.items() if registration <= registered_before]
        for tenant in done:
            del self._unlisted[tenant]
            if self.tenant_bytes[tenant] > self._quotas[tenant]:
                log.warning("tenant %s has %d bytes in S3 (its uploads and those of other nodes the listing "
                            "found), over its s3_capacity of %d: none of its new blocks is uploaded until deletes "
                            "bring it below", tenant, self.tenant_bytes[tenant], self._quotas[tenant])
        if done:
            self._wake.set()

    async def _list_once(self) -> int:
        """One pass over the bucket: a LIST per page, a HEAD only for blocks the catalog lacks, of
        namespaces registered here (a namespace registered meanwhile is listed on the next pass)."""
        adopted, token = 0, ""
        digests = {self.tier.namespace_digest(name): name for name in self._registered()}
        while True:
            items, token = await self._in(lambda after=token: self.tier.list_keys(after))
            unknown = [(okey, size) for okey, size in items if not self._known(okey, digests)]
            room = self.cfg.max_catalog_blocks - self.store.catalog.blocks
            if len(unknown) > room:  # the bucket outgrew what this node may index: stop here
                unknown = unknown[:max(0, room)]
                token = ""
                self.counters.adoption_capped += 1
                log.warning("s3 listing stopped: the catalog holds s3.max_catalog_blocks=%d blocks; "
                            "blocks other nodes uploaded beyond that are not indexed here",
                            self.cfg.max_catalog_blocks)
            entries = await asyncio.gather(*(self._in(lambda o=o, n=n: self.tier.entry_for(o, n))
                                             for o, n in unknown))
            for entry in entries:
                if entry is not None:
                    adopted += self._adopt(entry)
            if not token:
                return adopted

    def _registered(self) -> list[str]:
        """Namespaces registered here (namespaces.json), not merely found on disk: the only ones
        whose blocks the listing adopts."""
        return [name for name, ns in self.store.catalog.namespaces.items() if not ns.adopted]

    def _known(self, object_key: str, digests: dict[str, str]) -> bool:
        """Nothing to adopt: not one of ours, a namespace not registered here, refused before, or
        already in the catalog with its S3 bit."""
        parsed = self.tier.parse_object_key(object_key)
        if parsed is None or object_key in self._rejected:
            return True
        name = digests.get(parsed[0])
        if name is None:
            return True  # the bucket never registers a namespace here
        block = self.store.catalog.get(name, parsed[1])
        return block is not None and bool(block.tiers & S3)

    def _adopt(self, entry) -> int:
        ns = self.store.catalog.namespaces.get(entry.namespace)
        if ns is None or ns.adopted:
            return 0  # removed (or never registered) since the pass began
        if self.key is not None:
            problem = _entry_problem(self.key, entry)
            if problem is not None:
                self._refused(entry.object_key, entry.namespace, entry.key, problem)
                return 0
        block = self.store.catalog.get(entry.namespace, entry.key)
        if block is not None:
            if not block.tiers & S3 and block.checksum == entry.checksum:
                block.tiers |= S3  # the obligation, if any, settles on the uploader's next pass
                self.changed(block, 1)
                self.store.events.emit(pb.BLOCK_STORED, block.namespace, block.key, S3, length=block.length)
            return 0
        # No retention: the policy's default, as for any block committed here without one (an S3
        # object carries no retention, and nothing from the bucket may pin this node's memory).
        block = Block(entry.namespace, entry.key, entry.parent, entry.length, entry.checksum,
                      entry.created_unix_ms, entry.created_unix_ms, tiers=S3, token_ids=entry.token_ids,
                      origin=interned(entry.origin))
        self.store.catalog.add(block)
        self.changed(block, 1)
        self.counters.adopted += 1
        self.store.events.emit(pb.BLOCK_STORED, block.namespace, block.key, S3, length=block.length,
                               parent=block.parent)
        return 1


def _hex_mac(metadata: dict | None, name: str) -> bytes | None:
    text = (metadata or {}).get(name, "")
    if len(text) != 2 * macs.MAC_BYTES:
        return None
    try:
        return bytes.fromhex(text)
    except ValueError:
        return None


def _mac_problem(key: bytes, namespace: str, block_key: bytes, payload, metadata: dict | None) -> str | None:
    """Why the downloaded payload's MAC (x-amz-meta-kvtier-mac) does not verify, or None."""
    mac = _hex_mac(metadata, METADATA_MAC)
    if mac is None:
        return f"no valid {METADATA_MAC} metadata (a MAC is required: cluster.key_file is set)"
    if not macs.verify_block(key, namespace, block_key, payload, mac):
        return "wrong MAC over the payload (forged, or written under another cluster key)"
    return None


def _entry_problem(key: bytes, entry) -> str | None:
    """Why a listed object's header MAC (x-amz-meta-kvtier-header-mac) does not verify, or None."""
    mac, header_mac = _hex_mac(entry.metadata, METADATA_MAC), _hex_mac(entry.metadata, METADATA_HEADER_MAC)
    if mac is None or header_mac is None or not entry.header:
        return f"no valid {METADATA_MAC}/{METADATA_HEADER_MAC} metadata (required: cluster.key_file is set)"
    if not macs.verify_header(key, entry.header, mac, header_mac):
        return "wrong header MAC (forged, or written under another cluster key)"
    return None


def _backoff(failures: int) -> float:
    """Exponential backoff with jitter, capped: retry loops never spin."""
    return min(BACKOFF_MAX_S, 0.25 * 2 ** min(failures, 8)) * random.uniform(0.5, 1.5)
