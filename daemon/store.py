"""BlockStore: the daemon's state machine over the catalog and the tiers.

Contract
- Runs on one asyncio event loop; every method must be called from it. Disk writes and removals run
  on a single writer thread, disk reads on a pool of reader threads, hashing of large batches on
  worker threads: the loop never blocks on I/O or on hashing megabytes.
- Who owns which fact (one owner each):
  - the catalog: which blocks exist and which tiers hold a verified copy (`Block.tiers`);
  - the memory tiers (SlotTier): which slot holds a block and every reason the slot may not be
    reused (holds: "reader", "write", "upload", "copy"); nothing else counts pins;
  - the write-through queue (`_pending`): which blocks still have to reach the disk, and their
    durability futures;
  - the disk tier's LMDB: what is durable, and which S3 uploads are still owed (recorded in the
    same transaction as the block's index entry);
  - `_disk_changed`: the count of blocks on disk and each tenant's bytes there (`tenant_disk_bytes`),
    moved with the catalog's DISK bit on every path that sets or clears it (recovery, write-through,
    eviction, quarantine, delete);
  - `S3Sync.changed` (daemon/s3sync.py): the count of blocks in S3 and each tenant's bytes there
    (`S3Sync.tenant_bytes`), moved with the catalog's S3 bit on every path that sets or clears it
    (upload, adoption from the listing, quarantine, a refused MAC, delete; nothing evicts from S3);
  - the retention policy of each memory tier: the block's retention while it is there
    (`Block.retention` is re-applied whenever a tier installs the block).
- Commit returns once the blocks are in the CPU tier. With `wait_durable` it returns once every
  block of the commit, duplicates included, is fsynced and indexed on disk (and its S3 upload is
  owed durably), or fails UNAVAILABLE after `disk.durable_wait_ms`. S3 is never what a commit waits
  for (write-through to S3 needs the disk tier, and goes from it), so an upload that the tenant's
  `s3_capacity` refuses later does not make an acknowledged commit a lie: the block is on disk. A
  block waiting for write-through is held in the CPU tier, so the CPU tier never drops the only
  copy. The queue is bounded: Allocate waits while it is full.
- A Commit is all or nothing, and a refused one aborts its whole allocation (slots returned):
  a shape error (slot not in the allocation, slot used twice, length over the slot) says what is
  wrong; a checksum that does not match says only that verification failed, never which entry or
  slot: a client guessing at what a slot held before learns at most one bit per allocation it
  gives up, not which guess was right. Verification failures are logged (principal, allocation,
  entry count; never bytes) and counted per principal (`verification_failures`).
- A tenant's `disk_capacity` bounds the bytes its blocks take on disk (each block's record:
  header area + payload padded to disk.align, `DiskTier.footprint`): the write-through skips a
  block that would exceed it (the block stays in the CPU tier only, is never uploaded to S3, and a
  wait_durable commit of it answers RESOURCE_EXHAUSTED), counted in `tenant_disk_refused` and
  logged at most once a minute per tenant. Skipping, not dropping the tenant's oldest blocks. The
  blocks of a tenant within its quota are protected on disk (`_disk_protected`): when the disk tier
  must free space, it copies them forward out of the segment it drops (compaction), so another
  principal's writes age only unprotected blocks off the disk.
- A tenant's `s3_capacity` bounds the payload bytes of its blocks in S3 that this node knows of
  (`S3Sync.tenant_bytes`: its uploads, and what the listing adopted): an upload that would exceed it
  is skipped (its obligation dropped, the block stays on disk only), counted in
  `tenant_s3_refused` and logged at most once a minute per tenant (daemon/s3sync.py).
- The arena has one part per tenant (tiers/arena.py): a namespace "<tenant>/..." of a configured
  tenant lives in that tenant's part, every other namespace in part 0 (the administrators'). A
  block's slot, an allocation's slots and a promotion's slot are always in its namespace's part, so
  slots never pass between tenants and are not zeroed when reused (zeroing costs a full write per
  slot): a slot's previous bytes were the same tenant's.
- Reads from lower tiers are verified; a block that fails verification is quarantined and reported
  as a miss. Promotions and their slots belong to the store (tasks a cancelled reader does not
  cancel) and have a reserve of CPU slots that writes cannot take.
- Every hold and reservation taken for a request is released on every path (finally), including
  cancellation. Leases and allocations expire; the reaper returns their slots and holds.
- Fail loudly: a background task that ends, or a broken invariant, calls `fatal`, which logs one
  clear line and stops the process (systemd restarts it; recovery salvages what is durable).
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import itertools
import logging
import os
import random
import sys
import time
from concurrent.futures import ThreadPoolExecutor

from kvtier.proto.v1 import kvtier_pb2 as pb
from kvtier.tiers.arena import SharedArena
from kvtier.tiers.block import MAX_TOKEN_IDS, BlockHeader, CorruptBlock, checksum, pack_token_ids
from kvtier.tiers.cpu import CpuTier
from kvtier.tiers.disk import BatchFailed, DiskEntry, DiskTier
from kvtier.tiers.eviction import POLICIES as BASIC_POLICIES
from kvtier.tiers.gpu import GpuTier
from kvtier.tiers.retention import DEFAULT_RETENTION, RETENTION_POLICIES

from .catalog import TIER_NAMES, Block, Catalog, interned, now_ms, origin_of
from .config import Config
from .errors import ApiError, exhausted, invalid, precondition, unavailable
from .events import EventLog
from .leases import LeaseTable

log = logging.getLogger("kvtier.store")
GPU, CPU, DISK, S3 = pb.TIER_GPU, pb.TIER_CPU, pb.TIER_DISK, pb.TIER_S3
READER, WRITE, UPLOAD, COPY = "reader", "write", "upload", "copy"
WRITE_RETRY_S = (0.1, 0.5, 1.0, 2.0, 5.0)
POLICIES = {**BASIC_POLICIES, **RETENTION_POLICIES}
PROMOTION_WAIT_MS = 2000     # a reader waits this long for CPU room, then takes a miss
READ_RESERVE_SHARE = 256     # 1/256 of the arena's slots is kept for promotions
HASH_OFF_LOOP_BYTES = 1 << 20  # commits hashing more than this hash on a worker thread
STUCK_AFTER_S = 10.0         # write-through failing this long makes the daemon report NOT_SERVING
QUOTA_LOG_INTERVAL_S = 60.0  # at most one line per tenant and quota this often about blocks it refused
VERIFY_FAILED = "verification failed; the allocation was aborted; nothing was committed"


@dataclasses.dataclass
class Counters:
    lookups: int = 0
    lookup_keys: int = 0
    lookup_hit_keys: int = 0
    acquire_hits: int = 0
    acquire_misses: int = 0
    commits: int = 0
    duplicates: int = 0
    quarantined: int = 0
    cpu_reads: int = 0
    cpu_writes: int = 0
    cpu_read_bytes: int = 0
    cpu_write_bytes: int = 0
    disk_reads: int = 0
    disk_writes: int = 0
    disk_read_bytes: int = 0
    disk_write_bytes: int = 0
    disk_evictions: int = 0
    disk_write_errors: int = 0
    durable_timeouts: int = 0
    leases_expired: int = 0
    tenant_pulls_refused: int = 0  # peer pulls not made: the tenant had its max_pulls in flight
    tenant_disk_refused: int = 0   # blocks not written to disk: their tenant's disk_capacity was full
    tenant_s3_refused: int = 0     # blocks not uploaded to S3: their tenant's s3_capacity was full
    allocations_expired: int = 0
    watchers_refused: int = 0      # Watch streams refused RESOURCE_EXHAUSTED (a tenant's or the node's bound)
    namespaces_refused: int = 0    # RegisterNamespace refused RESOURCE_EXHAUSTED (a tenant's or the node's bound)


@dataclasses.dataclass(slots=True)
class Staged:
    """One block ready to commit: bytes already sit in `slot`."""
    key: bytes
    parent: bytes
    slot: int
    length: int
    checksum: int
    retention: object = None  # kvtier.tiers.retention.Retention or None (the policy's default)
    token_ids: object = ()    # the block's token ids (a sequence of ints; empty: unknown), for routers
    lora_name: str = ""       # overrides the commit origin's lora_name


@dataclasses.dataclass(slots=True, eq=False)
class _Pending:
    """A block waiting for write-through: its held CPU slot and its durability future."""
    slot: int
    durable: asyncio.Future
    upload: bool  # owe an S3 upload once it is on disk


def _die(message: str) -> None:
    """The default on_fatal: the state can no longer be trusted, so stop now without draining."""
    for handler in logging.getLogger().handlers:
        handler.flush()
    sys.stderr.flush()
    os._exit(70)


def _install_in(tier, block, slot: int) -> None:
    """Installs in a memory tier, re-applying the block's retention first (a tier forgets it on eviction)."""
    tier.install(block, slot, block.length)
    if block.retention is not None:
        tier.retain(block, block.retention)


class BlockStore:
    def __init__(self, cfg: Config, on_fatal=_die, fs=None, s3_tier=None):
        """`fs` (tiers.fs.FileSystem) and `s3_tier` replace the real ones for fault injection."""
        self.cfg = cfg
        self.started = time.monotonic()
        self.counters = Counters()
        self.verification_failures: collections.Counter[str] = collections.Counter()  # per principal
        # limits.max_namespaces is the share of administrators and tenants without a table; each
        # [[tenant]]'s max_namespaces is reserved on top (the service checks each share).
        self.catalog = Catalog(cfg.data_dir, cfg.limits.max_namespaces + sum(t.max_namespaces for t in cfg.tenant))
        self.events = EventLog(cfg.events.ring_size, cfg.events.watcher_queue, cfg.limits.max_watchers,
                               [(t.name, t.event_ring_size, t.max_watchers) for t in cfg.tenant],
                               cfg.limits.untabled_tenant_max_watchers)
        parts = [("", cfg.cpu.capacity)] + [(t.name, t.cpu_capacity) for t in cfg.tenant]
        arena = SharedArena(_arena_prefix(cfg), parts, cfg.cpu.slot_bytes)
        self.cpu = CpuTier(arena, POLICIES[cfg.cpu.policy](), POLICIES[cfg.cpu.policy])
        self._tenant_parts = {t.name: index + 1 for index, t in enumerate(cfg.tenant)}
        self._disk_quotas = {t.name: t.disk_capacity for t in cfg.tenant if t.disk_capacity}
        self._quota_log: dict[str, tuple[float, int]] = {}  # tenant -> (last line, refusals since)
        self.disk: DiskTier | None = None
        self.s3sync = None  # daemon.s3sync.S3Sync when the S3 tier is on
        self.gpu: GpuTier | None = None
        tenant_limits = {t.name: t.max_leases for t in cfg.tenant}
        self.allocations = LeaseTable(cfg.limits.max_active_leases, tenant_limits)
        self.leases = LeaseTable(cfg.limits.max_active_leases, tenant_limits,
                                 default_owner_limit=cfg.limits.untabled_tenant_max_leases)
        self.sessions = None  # daemon.sessions.Sessions once the daemon listens
        self._pending: dict[Block, _Pending] = {}   # write-through queue, oldest first
        self._backlog_ready = asyncio.Event()
        self._space_freed = asyncio.Event()
        self._promotions: dict[Block, asyncio.Task] = {}
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="kvtier-disk-writer")
        self._readers = ThreadPoolExecutor(cfg.disk.readers, thread_name_prefix="kvtier-disk-reader")
        self._tasks: list[asyncio.Task] = []
        self._registry_lock = asyncio.Lock()
        self._closing = False
        self._on_fatal = on_fatal
        self._fs = fs
        self._s3_tier = s3_tier
        self.fatal_error: str | None = None
        self.write_error: tuple[float, str] | None = None  # (since, why) while write-through fails
        self.disk_blocks = 0  # blocks with the DISK bit; these two change in _disk_changed only
        # Configured tenants' bytes on disk: their blocks' footprints (DiskTier.footprint).
        self.tenant_disk_bytes: collections.Counter[str] = collections.Counter()
        self.peers = None  # daemon.peers.PeerFetcher, when peers are configured (metrics read it)
        self.peer_service = None  # daemon.peers.PeerService when peers are served (it sets this; metrics read it)

    @property
    def backlog(self) -> int:
        return len(self._pending)

    @property
    def arena(self) -> SharedArena:
        return self.cpu.arena

    def tenant_of(self, namespace: str) -> str | None:
        """The configured tenant owning the namespace ("<tenant>/..."), or None (administrators')."""
        tenant, slash, _ = namespace.partition("/")
        return tenant if slash and tenant in self._tenant_parts else None

    def part_of(self, namespace: str) -> int:
        """The arena part holding the namespace's CPU copies: its tenant's, or part 0 (admins')."""
        tenant, slash, _ = namespace.partition("/")
        return self._tenant_parts.get(tenant, 0) if slash else 0

    def read_reserve(self, part: int = 0) -> int:
        """Slots of `part` only promotions may take, so reads find room while writes hold the
        arena. A small share: a small arena keeps every slot for the write pipeline."""
        return self.arena.part_counts[part] // READ_RESERVE_SHARE

    def max_allocate(self, part: int = 0) -> int:
        return self.arena.part_counts[part] - self.read_reserve(part)

    # -- lifecycle --------------------------------------------------------------------------
    async def start(self) -> str:
        """Recovers the disk tier into the catalog; returns a one-line report. Raises
        daemon.s3sync.S3Refused when the S3 endpoint cannot be trusted with write-through."""
        report = self.catalog.load_namespaces()
        if self.cfg.gpu.enabled:  # create() logs why when the machine cannot host it
            self.gpu = GpuTier.create(self.cfg.gpu.device, self.cfg.gpu.capacity, self.cfg.cpu.slot_bytes,
                                      POLICIES[self.cfg.gpu.policy]())
        if self.cfg.disk.enabled:
            owe_uploads = self.cfg.s3.enabled and self.cfg.s3.write_through
            self.disk = DiskTier(self.cfg.disk_dir, capacity_bytes=self.cfg.disk.capacity,
                                 segment_bytes=self.cfg.disk.segment_bytes, align=self.cfg.disk.align,
                                 o_direct=self.cfg.disk.o_direct, track_uploads=owe_uploads, fs=self._fs,
                                 protect=self._disk_protected if self._disk_quotas else None)
            recovery = await self._on_writer(self.disk.recover)
            await self._adopt_disk()
            report += "; " + recovery.summary()
            for tenant, quota in self._disk_quotas.items():
                if self.tenant_disk_bytes[tenant] > quota:
                    log.warning("tenant %s has %d bytes on disk, over its disk_capacity of %d: none of its new "
                                "blocks is written to disk, and its blocks there are not protected from eviction, "
                                "until deletes or evictions bring it below",
                                tenant, self.tenant_disk_bytes[tenant], quota)
        if self.cfg.s3.enabled:
            from .s3sync import S3Sync  # noqa: PLC0415 - boto3 only when the S3 tier is on
            self.s3sync = S3Sync(self, self.cfg.s3, self._s3_tier)
            report += "; " + await self.s3sync.start()
        self._spawn(self._write_through(), "write-through")
        self._spawn(self._reap(), "lease-reaper")
        return report

    async def _adopt_disk(self) -> None:
        """Indexes every recovered disk entry in the catalog, a page at a time off the loop."""
        entries = self.disk.entries()
        while True:
            page = await self._on_writer(lambda: list(itertools.islice(entries, 4096)))
            for entry in page:
                self._adopt(entry)
            if len(page) < 4096:
                return

    def _adopt(self, entry: DiskEntry) -> None:
        self.catalog.adopt_namespace(entry.namespace)
        block = Block(entry.namespace, entry.key, entry.parent, entry.length, entry.checksum,
                      entry.created_unix_ms, entry.created_unix_ms, tiers=DISK, token_ids=entry.token_ids,
                      origin=interned(entry.origin))
        self.catalog.add(block)
        self._disk_changed(block, 1)

    def _spawn(self, coro, name: str) -> asyncio.Task:
        """A supervised background task: if it ever ends while the store runs, the daemon stops."""
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.append(task)
        task.add_done_callback(self._task_ended)
        return task

    def _task_ended(self, task: asyncio.Task) -> None:
        if task.cancelled():  # only close() (or asyncio.run ending the loop) cancels them
            return
        error = task.exception()
        self.fatal(f"background task {task.get_name()!r} ended unexpectedly: {error!r}", error)

    def fatal(self, message: str, error: BaseException | None = None) -> None:
        """A broken invariant: one clear log line, then stop (the default kills the process)."""
        log.critical("FATAL, stopping kvtierd: %s", message, exc_info=error)
        self.fatal_error = message
        self._on_fatal(message)

    def problem(self) -> str | None:
        """Why the daemon cannot keep its promises right now (health says NOT_SERVING), or None."""
        if self.write_error is not None and time.monotonic() - self.write_error[0] > STUCK_AFTER_S:
            return f"disk write-through failing for {time.monotonic() - self.write_error[0]:.0f}s: " \
                   f"{self.write_error[1]}"
        if self.s3sync is not None:
            return self.s3sync.problem()
        return None

    async def close(self, drain_timeout_s: float) -> int:
        """Drains the write-through backlog (bounded), stops tasks, closes tiers; returns blocks left undrained."""
        deadline = time.monotonic() + drain_timeout_s
        while self._pending and time.monotonic() < deadline and self.disk is not None:
            await self._wait_for_space(deadline - time.monotonic())
        self._closing = True
        left = len(self._pending) if self.disk is not None else 0
        await stop_tasks(self._tasks + list(self._promotions.values()))
        if self.s3sync is not None:
            await self.s3sync.close()
        self._writer.shutdown(wait=True)
        self._readers.shutdown(wait=True)
        if self.gpu is not None:
            self.gpu.close()
        if self.disk is not None:
            self.disk.close()
        self.arena.close()
        return left

    async def _on_writer(self, fn):
        return await asyncio.get_running_loop().run_in_executor(self._writer, fn)

    async def _on_reader(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._readers, fn, *args)

    # -- namespaces and lookup ----------------------------------------------------------------
    async def register_namespace(self, name: str, attributes: dict[str, str]) -> bool:
        known = self.catalog.namespaces.get(name)
        listed = known is not None and not known.adopted  # the S3 listing already counts its objects
        created = self.catalog.register(name, attributes)
        if not listed and self.s3sync is not None:
            self.s3sync.registered(name)
        async with self._registry_lock:  # one writer of the registry file at a time, off the loop
            data = self.catalog.registry()
            await asyncio.to_thread(self.catalog.save, data)
        return created

    def lookup(self, namespace: str, keys) -> bytes:
        tiers = self.catalog.lookup(namespace, keys)
        self.counters.lookups += 1
        self.counters.lookup_keys += len(keys)
        self.counters.lookup_hit_keys += len(tiers)
        return tiers

    def info(self, block: Block) -> pb.BlockInfo:
        holds = self.cpu.holds(block)
        return block.info(readers=holds[READER], write_pending=block in self._pending)

    # -- write path ---------------------------------------------------------------------------
    async def allocate(self, count: int, wait_ms: int, lease_ms: int, part: int = 0, owner: str | None = None):
        """Reserves `count` slots of arena `part` for `owner` (a tenant, or None)."""
        if count > self.max_allocate(part):
            raise invalid(f"count {count} exceeds the {self.max_allocate(part)} arena slots that writes may use")
        self._check_room_for_allocation(owner)
        slots = await self._reserve_for_write(count, wait_ms, part)
        try:
            self._check_room_for_allocation(owner)  # others filled the table while this call waited for room
        except ApiError:
            self._unreserve(slots)
            raise
        held = self.allocations.add(slots, lease_ms, owner=owner)
        held.part = part
        return held

    def _check_room_for_allocation(self, owner: str | None) -> None:
        if self.allocations.full(owner):
            raise exhausted(f"too many open allocations{f' for tenant {owner}' if owner else ''}; "
                            "commit or abort some first")

    async def _reserve_for_write(self, count: int, wait_ms: int, part: int) -> list[int]:
        deadline = time.monotonic() + wait_ms / 1000
        while True:
            if len(self._pending) < self.cfg.disk.queue_blocks or self.disk is None:
                slots, evicted = self.cpu.reserve_room(count, floor=self.read_reserve(part), part=part)
                if slots:
                    self._evicted_from_cpu(evicted)
                    return slots
            left = deadline - time.monotonic()
            if left <= 0 or self._closing:
                raise exhausted(self._why_full(count, part))
            await self._wait_for_space(left)

    async def _wait_for_space(self, timeout: float) -> None:
        self._space_freed.clear()
        await wait_event(self._space_freed, timeout)

    def _why_full(self, count: int, part: int) -> str:
        return (f"no room for {count} blocks in the CPU tier: {self.cpu.available(part)} slots available "
                f"({self.read_reserve(part)} kept for reads), {len(self._pending)} blocks waiting for "
                f"write-through (limit {self.cfg.disk.queue_blocks}), {len(self.leases)} read leases and "
                f"{len(self.allocations)} allocations open; retry later")

    def _signal_space(self) -> None:
        self._space_freed.set()

    def _unreserve(self, slots) -> None:
        self.cpu.unreserve(slots)
        self._signal_space()

    async def commit(self, allocation_id: int, namespace: str, staged: list[Staged], wait_durable: bool,
                     verified: bool = False, principal: str = "daemon", origin=None):
        """Commits staged blocks of one allocation; returns a CommitStatus per entry. `verified`: the
        caller (the peer fetcher) has just checked every checksum against the bytes in the slots.
        A refused commit (INVALID) commits nothing and aborts the whole allocation; `principal`
        names the caller in the log and in `verification_failures`. `origin` (pb.BlockOrigin or None):
        who stored the blocks, kept with them for routers like each entry's token ids."""
        held = self.allocations.get(allocation_id)
        if held is None:
            raise precondition(f"allocation {allocation_id} is not open (committed, aborted or expired)")
        self.catalog.namespace(namespace)
        if self.part_of(namespace) != held.part:
            raise precondition(f"namespace {namespace} lives in another arena part than allocation "
                               f"{allocation_id}: its tenant's engines write it (or use Put)")
        try:
            self._check_staged(held.items, staged)
            routing = _routing(staged, origin, self.cfg.events.zmq_block_size)
        except ApiError:
            self._drop_allocation(held)
            raise
        if not verified:
            await self._check_checksums(held, staged, principal)
        if self.allocations.take(allocation_id) is not held:  # aborted or expired while hashing
            raise precondition(f"allocation {allocation_id} is not open (committed, aborted or expired)")
        statuses, stored, duplicates = self._install(namespace, staged, routing)
        leftover = set(held.items) - {s.slot for s, st in zip(staged, statuses) if st == pb.STORED}
        self._unreserve(sorted(leftover))
        if wait_durable:
            await self._wait_durable(stored + duplicates)
        return statuses

    def _drop_allocation(self, held) -> None:
        """Aborts `held` if it is still open (it may have expired, or been aborted, meanwhile)."""
        if self.allocations.get(held.id) is held:
            self.abort(held.id)

    def _check_staged(self, slots: list[int], staged: list[Staged]) -> None:
        """Validates every entry's shape before anything changes, so a bad entry commits nothing.
        Its messages name the entry: they say nothing about what a slot holds."""
        owned = set(slots)
        seen: set[int] = set()
        for index, entry in enumerate(staged):
            if entry.slot not in owned:
                raise invalid(f"entry {index}: slot {entry.slot} is not part of this allocation")
            if entry.slot in seen:
                raise invalid(f"entry {index}: slot {entry.slot} used twice")
            seen.add(entry.slot)
            if not 0 <= entry.length <= self.arena.slot_bytes:
                raise invalid(f"entry {index}: length {entry.length} exceeds slot size {self.arena.slot_bytes}")

    async def _check_checksums(self, held, staged: list[Staged], principal: str) -> None:
        """Every entry's checksum against its slot's bytes; on any mismatch, aborts the allocation and
        raises VERIFY_FAILED, which does not say which entry failed: an answer per entry would let a
        client learn what a slot held before, one guess per commit."""
        total = sum(entry.length for entry in staged)
        if total > HASH_OFF_LOOP_BYTES:
            bad = await asyncio.to_thread(self._first_mismatch, staged)
        else:
            bad = self._first_mismatch(staged)
        if bad is None:
            return
        self._drop_allocation(held)
        self.verification_failures[principal] += 1
        log.warning("commit by %s failed verification: allocation %d aborted (%d entries, %d failures "
                    "by this principal)", principal, held.id, len(staged), self.verification_failures[principal])
        raise invalid(VERIFY_FAILED)

    def _first_mismatch(self, staged: list[Staged]) -> int | None:
        for index, entry in enumerate(staged):
            if checksum(self.arena.view(entry.slot)[:entry.length]) != entry.checksum:
                return index
        return None

    def _install(self, namespace: str, staged: list[Staged], routing):
        statuses, stored, duplicates = [], [], []
        created = now_ms()
        for entry, (token_ids, origin) in zip(staged, routing, strict=True):
            existing = self.catalog.get(namespace, entry.key)
            if existing is not None:
                statuses.append(pb.DUPLICATE)
                duplicates.append(existing)
                self.counters.duplicates += 1
                if entry.retention is not None:
                    self._strengthen(existing, entry.retention)
                continue
            block = Block(namespace, entry.key, entry.parent, entry.length, entry.checksum, created, created,
                          tiers=CPU, retention=entry.retention, retained_ms=created, token_ids=token_ids,
                          origin=origin)
            self.catalog.add(block)
            _install_in(self.cpu, block, entry.slot)
            self.events.emit(pb.BLOCK_STORED, namespace, block.key, CPU, length=block.length, parent=block.parent)
            self.counters.cpu_writes += 1
            self.counters.cpu_write_bytes += block.length
            if self.disk is not None:
                self._queue_write(block, upload=self._owes_upload())
            statuses.append(pb.STORED)
            stored.append(block)
        self.counters.commits += len(staged)
        return statuses, stored, duplicates

    def _owes_upload(self) -> bool:
        return self.s3sync is not None and self.cfg.s3.write_through

    def abort(self, allocation_id: int) -> None:
        held = self.allocations.take(allocation_id)
        if held is None:
            raise precondition(f"allocation {allocation_id} is not open (committed, aborted or expired)")
        self._unreserve(held.items)

    async def put(self, namespace: str, key: bytes, parent: bytes, data_chunks, length: int, expected: int,
                  wait_ms: int, wait_durable: bool, retention=None, principal: str = "daemon") -> int:
        """Streamed put: bytes go straight into a reserved slot, then the normal commit path."""
        self.catalog.namespace(namespace)
        if length > self.arena.slot_bytes:
            raise invalid(f"block of {length} bytes exceeds the slot size {self.arena.slot_bytes}")
        held = await self.allocate(1, wait_ms, self.cfg.limits.default_lease_ms, self.part_of(namespace))
        try:
            view, filled = self.arena.view(held.items[0]), 0
            async for chunk in data_chunks:
                if filled + len(chunk) > length:
                    raise invalid(f"stream sent more than the {length} bytes its header announced")
                view[filled:filled + len(chunk)] = chunk
                filled += len(chunk)
            if filled != length:
                raise invalid(f"stream ended after {filled} of {length} bytes")
            staged = [Staged(key, parent, held.items[0], length, expected, retention)]
            return (await self.commit(held.id, namespace, staged, wait_durable, principal=principal))[0]
        finally:
            if self.allocations.get(held.id) is held:
                self.abort(held.id)

    # -- write-through ------------------------------------------------------------------------
    def _queue_write(self, block: Block, upload: bool) -> None:
        assert block not in self._pending and block in self.cpu
        slot = self.cpu.hold(block, WRITE)
        self._pending[block] = _Pending(slot, asyncio.get_running_loop().create_future(), upload)
        self._backlog_ready.set()

    async def _wait_durable(self, blocks: list[Block]) -> None:
        """Waits until every block is durable (disk or S3), bounded by disk.durable_wait_ms."""
        if self.disk is None:
            return  # no durable tier configured: nothing more to wait for (documented in the proto)
        waits = []
        for block in blocks:
            if block.tiers & (DISK | S3):
                continue
            pending = self._pending.get(block)
            if pending is None:
                if block not in self.cpu or self.catalog.get(block.namespace, block.key) is not block:
                    raise unavailable(f"block {block.key.hex()} left the node before it was durable; "
                                      "store it again")
                self._queue_write(block, upload=self._owes_upload())  # e.g. its disk copy was evicted
                pending = self._pending[block]
            waits.append(pending.durable)
        if not waits:
            return
        timeout = self.cfg.disk.durable_wait_ms / 1000
        try:
            async with asyncio.timeout(timeout):
                await asyncio.shield(asyncio.gather(*waits))
        except TimeoutError:
            self.counters.durable_timeouts += 1
            why = self.write_error[1] if self.write_error else f"{len(self._pending)} blocks queued ahead"
            raise unavailable(f"not durable within disk.durable_wait_ms={self.cfg.disk.durable_wait_ms}: "
                              f"{why}; the blocks stay queued for write-through") from None

    async def _write_through(self) -> None:
        failures = 0
        while True:
            await self._backlog_ready.wait()
            batch = list(itertools.islice(self._pending.items(), self.cfg.disk.batch_blocks))
            if not batch:
                self._backlog_ready.clear()
                continue
            batch = self._within_disk_quotas(batch)
            if not batch:
                continue
            records = [(_header(block), self.arena.view(item.slot)) for block, item in batch]
            uploads = [item.upload for _, item in batch]
            try:
                written, evicted = await self._on_writer(lambda: self.disk.write_batch(records, upload=uploads))
            except Exception as exc:  # noqa: BLE001 - the write-through outlives any one batch
                self._evicted_from_disk(getattr(exc, "evicted", None) or [])
                if isinstance(exc, CorruptBlock) and await self._drop_modified(batch):
                    continue
                failures += 1
                await self._write_failed(exc, failures)
                continue
            failures = 0
            self.write_error = None
            self._evicted_from_disk(evicted)
            for (block, _), entry in zip(batch, written, strict=True):
                self._landed_on_disk(block, entry)
            self._signal_space()

    async def _write_failed(self, exc: Exception, failures: int) -> None:
        self.counters.disk_write_errors += 1
        delay = WRITE_RETRY_S[min(failures - 1, len(WRITE_RETRY_S) - 1)] * random.uniform(0.75, 1.25)
        if self.write_error is None:
            self.write_error = (time.monotonic(), repr(exc))
        log.error("disk write-through failed (%r); %d blocks waiting, retrying in %.1fs",
                  exc, len(self._pending), delay)
        await asyncio.sleep(delay)

    async def _drop_modified(self, batch) -> bool:
        """Quarantines blocks whose arena bytes changed after commit (a client wrote into a slot it
        no longer owned); returns whether any was found. Such bytes never reach the disk."""
        sums = await asyncio.to_thread(
            lambda: [checksum(self.arena.view(item.slot)[:block.length]) for block, item in batch])
        modified = [block for (block, _), got in zip(batch, sums) if got != block.checksum]
        for block in modified:
            item = self._pending.pop(block)
            self.cpu.release(item.slot, WRITE)
            self._quarantined(block, CPU)
            item.durable.set_exception(precondition(f"block {block.key.hex()} was modified in shared memory "
                                                    "after commit; quarantined"))
            item.durable.exception()  # retrieved: a waiter may or may not exist
        self._signal_space()
        return bool(modified)

    def _within_disk_quotas(self, batch):
        """The batch less the blocks whose tenant's disk_capacity they would exceed (counted with the
        blocks of the batch before them). Those leave the queue: their write hold is released, so
        the CPU tier keeps them like any other block, and their durability future fails."""
        if not self._disk_quotas:
            return batch
        planned: collections.Counter[str] = collections.Counter()
        kept = []
        for block, item in batch:
            tenant = self.tenant_of(block.namespace)
            quota = self._disk_quotas.get(tenant) if tenant is not None else None
            footprint = self.disk_footprint(block)
            if quota is not None and self.tenant_disk_bytes[tenant] + planned[tenant] + footprint > quota:
                self._refuse_disk(block, tenant, quota)
                continue
            if tenant is not None:
                planned[tenant] += footprint
            kept.append((block, item))
        if len(kept) < len(batch):
            self._signal_space()
        return kept

    def _refuse_disk(self, block: Block, tenant: str, quota: int) -> None:
        item = self._pending.pop(block)
        self.cpu.release(item.slot, WRITE)
        self.counters.tenant_disk_refused += 1
        item.durable.set_exception(exhausted(
            f"tenant {tenant} has its disk_capacity ({quota} bytes) of blocks on disk: block {block.key.hex()} "
            "is kept in memory only (not durable); delete some of the tenant's blocks to make room"))
        item.durable.exception()  # retrieved: a waiter may or may not exist
        refusals = quota_log_due(self._quota_log, tenant)
        if refusals:
            log.warning("tenant %s: %d blocks not written to disk (kept in memory only, not uploaded to S3): "
                        "%d bytes of its blocks are on disk, its disk_capacity is %d", tenant, refusals,
                        self.tenant_disk_bytes[tenant], quota)

    def _disk_changed(self, block: Block, change: int) -> None:
        """The block's DISK bit was just set (change 1) or cleared (-1)."""
        self.disk_blocks += change
        tenant = self.tenant_of(block.namespace)
        if tenant is not None:
            self.tenant_disk_bytes[tenant] += change * self.disk_footprint(block)

    def disk_footprint(self, block: Block) -> int:
        """The bytes the block's record takes on disk (the disk tier owns the format): what its
        tenant's disk_capacity is charged."""
        return self.disk.footprint(_header(block))

    def _disk_protected(self, namespace: str) -> bool:
        """Called by the disk tier (writer thread) when it must free space: blocks of a tenant with a
        disk_capacity that it is within are copied forward instead of evicted. Everyone else's
        (administrators', tenants without a quota, a tenant over its quota) go first."""
        tenant = self.tenant_of(namespace)
        quota = self._disk_quotas.get(tenant) if tenant is not None else None
        return quota is not None and self.tenant_disk_bytes[tenant] <= quota

    def _landed_on_disk(self, block: Block, entry: DiskEntry) -> None:
        assert entry.key == block.key and entry.checksum == block.checksum, "disk wrote another block"
        item = self._pending.pop(block)
        self.cpu.release(item.slot, WRITE)
        self.counters.disk_writes += 1
        self.counters.disk_write_bytes += block.length
        if self.catalog.get(block.namespace, block.key) is block and not block.tiers & DISK:
            block.tiers |= DISK
            self._disk_changed(block, 1)
            self.events.emit(pb.BLOCK_STORED, block.namespace, block.key, DISK, length=block.length,
                             parent=block.parent)
        if item.upload and self.s3sync is not None:
            self.s3sync.wake()
        item.durable.set_result(None)

    def _evicted_from_disk(self, entries: list[DiskEntry]) -> None:
        for entry in entries:
            block = self.catalog.get(entry.namespace, entry.key)
            if block is None or not block.tiers & DISK:
                continue
            self.counters.disk_evictions += 1
            self._drop_tier(block, DISK)

    def _evicted_from_cpu(self, blocks) -> None:
        for block in blocks:
            assert block not in self._pending, "evicted a block waiting for write-through"
            self._drop_tier(block, CPU, already_removed=True)

    def _drop_tier(self, block: Block, tier: int, already_removed: bool = False) -> None:
        """The block left `tier`; when no tier keeps it, it leaves the catalog."""
        assert block.tiers & tier, f"dropping {TIER_NAMES[tier]} from a block not there"
        if tier == CPU and not already_removed:
            self.cpu.remove(block)
        elif tier == GPU and not already_removed:
            self.gpu.remove(block)
        block.tiers &= ~tier
        if tier == DISK:
            self._disk_changed(block, -1)
        if tier == S3:
            self.s3sync.changed(block, -1)
        self.events.emit(pb.BLOCK_REMOVED, block.namespace, block.key, tier, length=block.length)
        if not block.tiers:
            self.catalog.discard(block)

    # -- read path ----------------------------------------------------------------------------
    async def acquire(self, namespace: str, keys: list[bytes], lease_ms: int, gpu: bool = False,
                      owner: str | None = None):
        """Holds each found block in the CPU tier (promoting from lower tiers) and, with gpu, in the GPU
        tier too; returns (lease or None, blocks), the lease owned by `owner` (a tenant, or None).
        Cancellation releases every hold taken."""
        self.catalog.namespace(namespace)
        self._check_room_for_lease(owner)
        found: list[Block | None] = [None] * len(keys)
        taken: list[tuple[Block, int]] = []  # holds owned by this call until a lease owns them
        try:
            lower = []
            for index, key in enumerate(keys):
                block = self.catalog.get(namespace, key)
                if block is not None and block in self.cpu:
                    found[index] = block  # held first: promotions below cannot evict it
                    taken.append((block, self._hold_reader(block)))
                elif block is not None:
                    lower.append((index, block))
            await asyncio.gather(*(self._promote_and_hold(block, index, found, taken) for index, block in lower))
            self.counters.acquire_hits += len(taken)
            self.counters.acquire_misses += len(keys) - len(taken)
            if not taken:
                return None, found
            self._check_room_for_lease(owner)
            held = self.leases.add(taken, lease_ms, namespace, owner=owner)
            taken = []
        finally:
            self._release_holds(taken, [])
        if gpu and self.gpu is not None:
            try:
                for block in found:
                    if block is not None:
                        await self._hold_on_gpu(block, held)
            except BaseException:
                self.release(held.id)
                raise
        return held, found

    def _check_room_for_lease(self, owner: str | None) -> None:
        if self.leases.full(owner):
            raise exhausted(f"too many open read leases{f' for tenant {owner}' if owner else ''}; "
                            "release some first")

    async def _promote_and_hold(self, block: Block, index: int, found: list, taken: list) -> None:
        """Promotes and holds; a block evicted again before this reader resumed is promoted again
        (bounded), and no room in the CPU tier is a miss, not an error."""
        for _ in range(3):
            try:
                promoted = await self._promote(block)
            except ApiError as exc:
                log.warning("promotion of %s/%s skipped: %s", block.namespace, block.key.hex(), exc.message)
                return
            if promoted is None:
                return
            if promoted in self.cpu and self.catalog.get(block.namespace, block.key) is promoted:
                found[index] = promoted
                taken.append((promoted, self._hold_reader(promoted)))  # no await since the check
                return

    def _hold_reader(self, block: Block) -> int:
        slot = self.cpu.hold(block, READER)
        self.cpu.touch(block)
        block.hits += 1
        block.last_access_ms = now_ms()
        self.counters.cpu_reads += 1
        self.counters.cpu_read_bytes += block.length
        return slot

    async def _hold_on_gpu(self, block: Block, held) -> None:
        """Promotes a CPU-held block into the GPU tier (if it is not there) and holds it there."""
        if block not in self.gpu:
            slots, evicted = self.gpu.reserve(1)
            if not slots:
                return  # every GPU slot is held by readers: the CPU copy serves this lease
            for victim in evicted:
                self._evicted_from_gpu(victim)
            try:
                await _finished(self.gpu.copy_in(slots[0], self.cpu.view(block), block.length))
            except BaseException:
                self.gpu.unreserve(slots)  # the tier's stream orders a later copy into this slot
                raise
            if self.catalog.get(block.namespace, block.key) is not block or block in self.gpu:
                self.gpu.unreserve(slots)  # deleted, or promoted by a concurrent reader meanwhile
            else:
                _install_in(self.gpu, block, slots[0])
                block.tiers |= GPU
                self.events.emit(pb.BLOCK_MOVED, block.namespace, block.key, GPU, from_tier=CPU,
                                 length=block.length)
        if block in self.gpu:
            held.gpu_items.append((block, self.gpu.hold(block, READER)))
            self.gpu.touch(block)

    def _evicted_from_gpu(self, block: Block) -> None:
        """A GPU copy was dropped to make room; every block entered through the CPU tier, so a lower
        tier still holds it unless the disk tier is off and the CPU tier evicted it too."""
        if block.tiers & GPU:
            self._drop_tier(block, GPU, already_removed=True)

    async def _promote(self, block: Block) -> Block | None:
        """Copies a lower-tier block into a CPU slot, verified. The copy is a store-owned task that
        concurrent readers share; a reader that is cancelled stops waiting, the copy goes on."""
        task = self._promotions.get(block)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._read_from_lower(block), name="promotion")
            self._promotions[block] = task
            task.add_done_callback(lambda done: self._promotion_done(block, done))
        return await asyncio.shield(task)

    def _promotion_done(self, block: Block, task: asyncio.Task) -> None:
        if self._promotions.get(block) is task:
            del self._promotions[block]
        if not task.cancelled() and task.exception() is not None:
            error = task.exception()
            if not isinstance(error, ApiError):
                self.fatal(f"promotion of {block.namespace}/{block.key.hex()} failed: {error!r}", error)

    async def _read_from_lower(self, block: Block) -> Block | None:
        """Copies a block from the highest lower tier that has a good copy into a CPU slot."""
        slots = await self._reserve_for_read(self.part_of(block.namespace))
        if not slots:
            return None
        installed = False
        try:
            view = self.arena.view(slots[0])
            source = await self._read_into(block, view)
            current = self.catalog.get(block.namespace, block.key)
            if not source or current is not block or block in self.cpu:
                return block if source and current is block else None
            _install_in(self.cpu, block, slots[0])
            installed = True
            block.tiers |= CPU
            self.events.emit(pb.BLOCK_MOVED, block.namespace, block.key, CPU, from_tier=source,
                             length=block.length)
            if source == S3 and self.disk is not None:
                self._queue_write(block, upload=False)  # a local copy: the next restart reads it from disk
            return block
        finally:
            if not installed:
                self._unreserve(slots)

    async def _reserve_for_read(self, part: int) -> list[int]:
        """One CPU slot of `part` for a promotion: it may use the read reserve and does not wait for
        the write backlog; no room within PROMOTION_WAIT_MS is a miss."""
        deadline = time.monotonic() + PROMOTION_WAIT_MS / 1000
        while True:
            slots, evicted = self.cpu.reserve(1, part)
            if slots:
                self._evicted_from_cpu(evicted)
                return slots
            left = deadline - time.monotonic()
            if left <= 0 or self._closing:
                log.warning("no CPU slot for a promotion within %d ms: served as a miss", PROMOTION_WAIT_MS)
                return []
            await self._wait_for_space(left)

    async def _read_into(self, block: Block, view: memoryview) -> int:
        """Reads the best lower copy into view, verified; returns the tier read (0: none good)."""
        if block.tiers & GPU and await self._read_gpu_into(block, view):
            return GPU
        if block.tiers & DISK and await self._read_disk_into(block, view):
            return DISK
        if block.tiers & S3 and self.s3sync is not None and await self.s3sync.download(block, view):
            return S3
        return 0

    async def _read_gpu_into(self, block: Block, view: memoryview) -> bool:
        """Demotion: the CPU tier lost the block but the GPU tier has it; copied down and verified."""
        if self.gpu is None or block not in self.gpu:
            return False
        slot = self.gpu.hold(block, COPY)  # its slot cannot be reused while the copy reads it
        try:
            await _finished(self.gpu.copy_out(slot, view, block.length))
        finally:
            self.gpu.release(slot, COPY)
        if checksum(view[:block.length]) == block.checksum:
            return True
        if block.tiers & GPU and block in self.gpu:
            self._quarantined(block, GPU)
        return False

    async def _read_disk_into(self, block: Block, view: memoryview) -> bool:
        disk = self.disk
        if disk is None:
            return False

        def read() -> bool | None:  # LMDB and the read both off the loop
            entry = disk.get_entry(block.namespace, block.key)
            if entry is None or entry.checksum != block.checksum:
                return None
            return disk.read_into(entry, view)
        ok = await self._on_reader(read)
        if ok:
            self.counters.disk_reads += 1
            self.counters.disk_read_bytes += block.length
            return True
        if self.catalog.get(block.namespace, block.key) is block and block.tiers & DISK:
            self._quarantined(block, DISK)  # corrupt, or no longer indexed: the catalog must not say "disk"
        return False

    def _quarantined(self, block: Block, tier: int) -> None:
        log.error("block %s/%s failed verification on the %s tier: quarantined, served as a miss",
                  block.namespace, block.key.hex(), TIER_NAMES[tier])
        self.counters.quarantined += 1
        self.events.emit(pb.BLOCK_QUARANTINED, block.namespace, block.key, tier, length=block.length)
        self._drop_tier(block, tier)

    def release(self, lease_id: int) -> None:
        held = self.leases.take(lease_id)
        if held is None:
            raise precondition(f"lease {lease_id} is not held (already released, expired, or never granted)")
        self._release_holds(held.items, held.gpu_items)

    def _release_holds(self, cpu_items, gpu_items) -> None:
        for _, slot in gpu_items:
            self.gpu.release(slot, READER)
        for _, slot in cpu_items:
            self.cpu.release(slot, READER)
        if cpu_items:
            self._signal_space()

    # -- agent hints --------------------------------------------------------------------------
    def set_retention(self, namespace: str, keys, retention) -> int:
        """Re-classifies stored blocks (and restarts their TTL pin) in every memory tier holding them."""
        self.catalog.namespace(namespace)
        updated, now = 0, now_ms()
        for key in keys:
            block = self.catalog.get(namespace, key)
            if block is None:
                continue
            block.retention, block.retained_ms = retention, now
            for tier in (self.cpu, self.gpu):
                if tier is not None and block in tier:
                    tier.retain(block, retention)
            updated += 1
        return updated

    def _strengthen(self, block: Block, asked) -> None:
        """A block shared by several requests keeps the strongest retention any of them asked for:
        the higher (class, priority) and the longer TTL pin. A weaker ask never demotes it."""
        current = block.retention or DEFAULT_RETENTION
        stronger = max(current, asked, key=lambda r: (r.rank, r.priority))
        merged = dataclasses.replace(stronger, ttl_s=max(current.ttl_s or 0, asked.ttl_s or 0) or None)
        if merged != block.retention or asked.ttl_s:  # a pinned re-commit restarts the pin, like a hit
            self.set_retention(block.namespace, [block.key], merged)

    async def prefetch(self, namespace: str, keys, gpu: bool) -> tuple[int, int]:
        """Warms the stored prefix of a chain into the CPU tier (and the GPU tier): (matched, warmed).
        An acquire released at once: the promotions stay, the holds do not."""
        matched = len(self.catalog.lookup(namespace, keys))
        if not matched:
            return 0, 0
        held, found = await self.acquire(namespace, list(keys[:matched]), self.cfg.limits.default_lease_ms, gpu)
        if held is None:
            return matched, 0
        warmed = len(held.gpu_items) if gpu and self.gpu is not None else len(held.items)
        self.release(held.id)
        return matched, warmed

    # -- admin --------------------------------------------------------------------------------
    def busy(self, block: Block) -> bool:
        """Whether something still uses the block: a reader, the write-through, an upload or a copy."""
        return (block in self._pending or block in self._promotions or self.cpu.held(block)
                or (self.gpu is not None and self.gpu.held(block))
                or (self.s3sync is not None and self.s3sync.uploading(block)))

    async def delete(self, namespace: str, keys) -> tuple[int, int]:
        """Removes blocks from every tier; blocks in use (see busy) are counted busy and kept."""
        self.catalog.namespace(namespace)
        deleted = busy = 0
        for key in keys:
            block = self.catalog.get(namespace, key)
            if block is None:
                continue
            if self.busy(block):
                busy += 1
                continue
            await self._delete_block(block)
            deleted += 1
        self._signal_space()
        return deleted, busy

    async def _delete_block(self, block: Block) -> None:
        """Leaves the catalog and the memory tiers at once, then the durable tiers (the disk removal,
        queued on the writer thread before any later write of the same key, drops its upload too)."""
        tiers = self._forget(block)
        if tiers & DISK:
            await self._on_writer(lambda: self.disk.remove(block.namespace, block.key))
        if tiers & S3:
            await self.s3sync.delete(block)

    def _forget(self, block: Block) -> int:
        """Drops the block from every tier's bookkeeping and the catalog; returns the tiers it was in."""
        tiers = block.tiers
        for tier in (GPU, CPU, DISK, S3):
            if block.tiers & tier:
                self._drop_tier(block, tier)
        assert self.catalog.get(block.namespace, block.key) is not block
        return tiers

    async def remove_namespace(self, name: str) -> int:
        """Deletes every block of the namespace and forgets it (registry saved); returns how many
        blocks were deleted. Blocks in use stay, and so does the namespace: PRECONDITION, retry."""
        deleted = await self.clear(name)
        left = len(self.catalog.namespace(name).blocks)
        if left:
            raise precondition(f"namespace {name!r}: {deleted} blocks deleted, {left} still in use "
                               "(leased, being written or uploaded); retry")
        self.catalog.remove_namespace(name)
        async with self._registry_lock:
            data = self.catalog.registry()
            await asyncio.to_thread(self.catalog.save, data)
        return deleted

    async def clear(self, namespace: str) -> int:
        """Deletes every block not in use; a namespace with none in use leaves the disk with one
        tombstone instead of one per block."""
        names = sorted(self.catalog.namespaces) if namespace == "*" else [self.catalog.namespace(namespace).name]
        deleted = 0
        for name in names:
            blocks = list(self.catalog.namespaces[name].blocks.values())
            kept = [block for block in blocks if self.busy(block)]
            gone = [block for block in blocks if not self.busy(block)]
            on_disk, in_s3 = [], []
            for block in gone:
                tiers = self._forget(block)
                if tiers & DISK:
                    on_disk.append(block.key)
                if tiers & S3:
                    in_s3.append(block)
            if on_disk and not kept:
                await self._on_writer(lambda n=name: self.disk.remove_namespace(n))
            elif on_disk:
                await self._on_writer(lambda n=name, keys=on_disk: [self.disk.remove(n, k) for k in keys])
            for block in in_s3:
                await self.s3sync.delete(block)
            deleted += len(gone)
            self.events.emit(pb.ALL_CLEARED, name)
        self._signal_space()
        return deleted

    # -- leases -------------------------------------------------------------------------------
    async def _reap(self) -> None:
        while True:
            await asyncio.sleep(0.2)
            for held in self.allocations.expired():
                self.counters.allocations_expired += 1
                log.warning("allocation %d expired uncommitted: %d slots returned", held.id, len(held.items))
                self._unreserve(held.items)
            for held in self.leases.expired():
                self.counters.leases_expired += 1
                log.warning("read lease %d on %s expired unreleased: %d blocks released",
                            held.id, held.namespace, len(held.items))
                self._release_holds(held.items, held.gpu_items)

    # -- invariants -----------------------------------------------------------------------------
    def check_invariants(self) -> None:
        """Asserts that the catalog agrees with every memory tier, the write-through queue, and the
        disk and S3 counts (blocks, each tenant's bytes)."""
        self.cpu.check()
        for name, ns in self.catalog.namespaces.items():
            for key, block in ns.blocks.items():
                assert block.namespace == name and block.key == key and block.tiers
                assert bool(block.tiers & CPU) == (block in self.cpu), f"cpu bit of {key.hex()}"
                if self.gpu is not None:
                    assert bool(block.tiers & GPU) == (block in self.gpu), f"gpu bit of {key.hex()}"
        for block in self.cpu:
            assert self.catalog.get(block.namespace, block.key) is block, "cpu holds a block not in the catalog"
            assert self.cpu.part_of(block) == self.part_of(block.namespace), (
                f"{block.namespace}/{block.key.hex()} sits in another tenant's arena part")
        for held in self.allocations._held.values():
            assert all(self.arena.part_of(slot) == held.part for slot in held.items), "allocation across parts"
        for block, item in self._pending.items():
            assert block in self.cpu and self.cpu.slot_of(block) == item.slot and self.cpu.holds(block)[WRITE]
        blocks = {DISK: 0, S3: 0}  # the catalog's count of blocks with the bit, and each tenant's bytes
        tenant_bytes: dict[int, collections.Counter[str]] = {DISK: collections.Counter(), S3: collections.Counter()}
        for name, ns in self.catalog.namespaces.items():
            tenant = self.tenant_of(name)
            for block in ns.blocks.values():
                for tier in (DISK, S3):
                    if block.tiers & tier:
                        blocks[tier] += 1
                        if tenant is not None:
                            tenant_bytes[tier][tenant] += self.disk_footprint(block) if tier == DISK else block.length
        assert blocks[DISK] == self.disk_blocks, f"disk_blocks {self.disk_blocks}, catalog says {blocks[DISK]}"
        assert +self.tenant_disk_bytes == tenant_bytes[DISK], (
            f"tenant disk bytes {self.tenant_disk_bytes}, catalog {tenant_bytes[DISK]}")
        if self.s3sync is not None:
            assert blocks[S3] == self.s3sync.blocks, f"s3 blocks {self.s3sync.blocks}, catalog says {blocks[S3]}"
            assert +self.s3sync.tenant_bytes == tenant_bytes[S3], (
                f"tenant s3 bytes {self.s3sync.tenant_bytes}, catalog {tenant_bytes[S3]}")
        assert len(self._pending) <= self.cfg.disk.queue_blocks + self.arena.slot_count


def quota_log_due(lines: dict[str, tuple[float, int]], tenant: str) -> int:
    """The rate limit of a quota's warnings (`lines`: tenant -> (last line, refusals since)): how many
    refusals of `tenant`, this one included, to report now, or 0 while its last line is younger than
    QUOTA_LOG_INTERVAL_S (this one is then reported with the next)."""
    last, since = lines.get(tenant, (float("-inf"), 0))
    now = time.monotonic()
    if now - last < QUOTA_LOG_INTERVAL_S:
        lines[tenant] = (last, since + 1)
        return 0
    lines[tenant] = (now, 0)
    return since + 1


async def wait_event(event: asyncio.Event, timeout: float) -> bool:
    """Waits for event at most timeout seconds; whether it is set. (asyncio.timeout, not wait_for:
    wait_for in Python 3.11 can swallow a cancellation that races with the event.)"""
    if timeout <= 0:
        return event.is_set()
    try:
        async with asyncio.timeout(timeout):
            await event.wait()
    except TimeoutError:
        return event.is_set()
    return True


async def stop_tasks(tasks, patience_s: float = 10.0) -> None:
    """Cancels tasks and waits until they end; a task that outlives patience_s is a bug, said loudly."""
    tasks = [task for task in tasks if not task.done()]
    for task in tasks:
        task.cancel()
    if tasks:
        _, stuck = await asyncio.wait(tasks, timeout=patience_s)
        for task in stuck:
            log.error("task %s ignored its cancellation for %.0fs: %s", task.get_name(), patience_s,
                      task.get_stack(limit=4))


def _header(block: Block) -> BlockHeader:
    return BlockHeader(block.namespace, block.key, block.parent, block.length, block.checksum, block.created_ms,
                       block.token_ids, block.origin)


def _routing(staged: list[Staged], origin, default_block_size: int) -> list[tuple[bytes, object]]:
    """Each entry's packed token ids and BlockOrigin, validated (INVALID_ARGUMENT naming the entry):
    at most block_size token ids (the origin's, else events.zmq_block_size, else MAX_TOKEN_IDS)."""
    routing, origins = [], {}
    for index, entry in enumerate(staged):
        try:
            block_origin = origins.get(entry.lora_name, False)
            if block_origin is False:
                block_origin = origins[entry.lora_name] = origin_of(origin, entry.lora_name)
            token_ids = pack_token_ids(entry.token_ids) if len(entry.token_ids) else b""
        except ValueError as exc:
            raise invalid(f"entry {index}: {exc}") from None
        bound = min((block_origin.block_size if block_origin is not None else 0) or default_block_size
                    or MAX_TOKEN_IDS, MAX_TOKEN_IDS)
        if len(token_ids) > 4 * bound:
            raise invalid(f"entry {index}: {len(token_ids) // 4} token ids, more than the block size {bound}")
        routing.append((token_ids, block_origin))
    return routing


def _arena_prefix(cfg: Config) -> str:
    """The arena's name (shown in /proc/<pid>/maps): one per data dir, to tell daemons apart."""
    import hashlib
    return hashlib.sha256(os.path.abspath(cfg.data_dir).encode()).hexdigest()[:12]


async def _finished(transfer) -> None:
    """Waits for a GPU copy without blocking the event loop (CPU-device copies are done at once)."""
    if not transfer.done():
        await asyncio.to_thread(transfer.wait)
