"""BlockStore: the daemon's state machine over the catalog and the tiers.

Contract
- Runs on one asyncio event loop; every method must be called from it. Disk I/O runs on a
  single writer thread (write-through, removals) and a pool of reader threads (promotions).
- Commit returns once the blocks are in the CPU tier. Each stored block is then queued for
  write-through to disk; it stays pinned in the CPU tier until it is durably on disk, so the CPU
  tier never drops the only copy. The queue is bounded: Allocate waits while it is full.
- Reads from the disk tier are verified; a block that fails verification is quarantined and
  reported as a miss.
- Leases and allocations expire; the reaper returns their slots and pins.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor

from kvtier.proto.v1 import kvtier_pb2 as pb
from kvtier.tiers.arena import SharedArena
from kvtier.tiers.block import BlockHeader, checksum
from kvtier.tiers.cpu import CpuTier
from kvtier.tiers.disk import DiskEntry, DiskTier
from kvtier.tiers.eviction import POLICIES as BASIC_POLICIES
from kvtier.tiers.retention import DEFAULT_RETENTION, RETENTION_POLICIES
from kvtier.tiers.gpu import GpuTier
from kvtier.tiers.s3 import S3Tier

from .catalog import TIER_NAMES, Block, Catalog, now_ms
from .config import Config
from .errors import ApiError, exhausted, invalid, precondition
from .events import EventLog
from .leases import LeaseTable
from .s3sync import S3Sync, tier_config

log = logging.getLogger("kvtier.store")
GPU, CPU, DISK, S3 = pb.TIER_GPU, pb.TIER_CPU, pb.TIER_DISK, pb.TIER_S3
WRITE_RETRY_S = (0.1, 0.5, 1.0, 2.0, 5.0)
POLICIES = {**BASIC_POLICIES, **RETENTION_POLICIES}
PROMOTION_WAIT_MS = 2000  # a reader waits this long for CPU room, then takes a miss


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
    leases_expired: int = 0
    allocations_expired: int = 0


@dataclasses.dataclass(slots=True)
class Staged:
    """One block ready to commit: bytes already sit in `slot`."""
    key: bytes
    parent: bytes
    slot: int
    length: int
    checksum: int
    retention: object = None  # kvtier.tiers.retention.Retention or None (the policy's default)


def _install_in(tier, block, slot: int) -> None:
    """Installs in a memory tier, re-applying the block's retention first (a tier forgets it on eviction)."""
    if block.retention is not None and hasattr(tier.policy, "retain"):
        tier.policy.retain(block.id, block.retention)
    tier.install(block.id, slot, block.length)


class BlockStore:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.started = time.monotonic()
        self.counters = Counters()
        self.catalog = Catalog(cfg.data_dir, cfg.limits.max_namespaces)
        self.events = EventLog(cfg.events.ring_size, cfg.events.watcher_queue, cfg.limits.max_watchers)
        arena = SharedArena(cfg.cpu.shm_dir, _arena_prefix(cfg), cfg.cpu.capacity, cfg.cpu.slot_bytes,
                            cfg.cpu.arena_mode)
        self.cpu = CpuTier(arena, POLICIES[cfg.cpu.policy]())
        self.disk: DiskTier | None = None
        self.s3sync: S3Sync | None = None
        self.gpu: GpuTier | None = None
        self.allocations = LeaseTable(cfg.limits.max_active_leases)
        self.leases = LeaseTable(cfg.limits.max_active_leases)
        self._backlog: deque[Block] = deque()
        self._backlog_ready = asyncio.Event()
        self._space_freed = asyncio.Event()
        self._durable: dict[tuple, asyncio.Future] = {}
        self._promotions: dict[tuple, asyncio.Future] = {}
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="kvtier-disk-writer")
        self._readers = ThreadPoolExecutor(cfg.disk.readers, thread_name_prefix="kvtier-disk-reader")
        self._tasks: list[asyncio.Task] = []
        self._closing = False
        self.disk_blocks = 0
        self.peers = None  # daemon.peers.PeerFetcher, when peers are configured (metrics read it)

    @property
    def backlog(self) -> int:
        return len(self._backlog)

    @property
    def arena(self) -> SharedArena:
        return self.cpu.arena

    # -- lifecycle --------------------------------------------------------------------------
    async def start(self) -> str:
        """Recovers the disk tier into the catalog; returns a one-line report."""
        self.catalog.load_namespaces()
        report = "disk tier disabled"
        if self.cfg.gpu.enabled:  # create() logs why when the machine cannot host it
            self.gpu = GpuTier.create(self.cfg.gpu.device, self.cfg.gpu.capacity, self.cfg.cpu.slot_bytes,
                                      POLICIES[self.cfg.gpu.policy]())
        if self.cfg.s3.enabled:
            tier = await self._on_writer(lambda: S3Tier(tier_config(self.cfg.s3),
                                                        os.path.join(self.cfg.data_dir, "s3-journal")))
            self.s3sync = S3Sync(self, tier, self.cfg.s3)
        if self.cfg.disk.enabled:
            self.disk = DiskTier(self.cfg.disk_dir, capacity_bytes=self.cfg.disk.capacity,
                                 segment_bytes=self.cfg.disk.segment_bytes, align=self.cfg.disk.align,
                                 o_direct=self.cfg.disk.o_direct, evictable=self._segment_evictable)
            recovery = await self._on_writer(self.disk.recover)
            entries = await self._on_writer(lambda: list(self.disk.entries()))
            for entry in entries:
                self._adopt(entry)
            report = recovery.summary()
        if self.s3sync is not None:
            report += "; " + await self.s3sync.start()
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._write_through(), name="write-through"),
                       loop.create_task(self._reap(), name="lease-reaper")]
        return report

    def _segment_evictable(self, segment: int) -> bool:
        """Disk writer thread: a segment holding blocks still to be uploaded to S3 stays."""
        return self.s3sync is None or self.s3sync.segment_evictable(segment)

    def _adopt(self, entry: DiskEntry) -> None:
        self.catalog.adopt_namespace(entry.namespace)
        block = Block(entry.namespace, entry.key, entry.parent, entry.length, entry.checksum,
                      entry.created_unix_ms, entry.created_unix_ms, tiers=DISK)
        self.catalog.add(block)
        self.disk_blocks += 1

    async def close(self, drain_timeout_s: float) -> int:
        """Drains the write-through backlog (bounded), stops tasks, closes tiers; returns blocks left undrained."""
        self._closing = True
        deadline = time.monotonic() + drain_timeout_s
        while self._backlog and time.monotonic() < deadline and self.disk is not None:
            await asyncio.sleep(0.02)
        left = len(self._backlog) if self.disk is not None else 0
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._writer.shutdown(wait=True)
        self._readers.shutdown(wait=True)
        if self.s3sync is not None:
            await self.s3sync.close()
        if self.gpu is not None:
            self.gpu.close()
        if self.disk is not None:
            self.disk.close()
        self.arena.close()
        return left

    async def _on_writer(self, fn):
        return await asyncio.get_running_loop().run_in_executor(self._writer, fn)

    # -- namespaces and lookup ----------------------------------------------------------------
    def register_namespace(self, name: str, attributes: dict[str, str]) -> bool:
        return self.catalog.register(name, attributes)

    def lookup(self, namespace: str, keys) -> bytes:
        tiers = self.catalog.lookup(namespace, keys)
        self.counters.lookups += 1
        self.counters.lookup_keys += len(keys)
        self.counters.lookup_hit_keys += len(tiers)
        return tiers

    # -- write path ---------------------------------------------------------------------------
    async def allocate(self, count: int, wait_ms: int, lease_ms: int):
        if count > self.arena.slot_count:
            raise invalid(f"count {count} exceeds the arena's {self.arena.slot_count} slots")
        if self.allocations.full():
            raise exhausted("too many open allocations; commit or abort some first")
        slots = await self._reserve(count, wait_ms)
        return self.allocations.add(slots, lease_ms)

    async def _reserve(self, count: int, wait_ms: int) -> list[int]:
        deadline = time.monotonic() + wait_ms / 1000
        while True:
            if len(self._backlog) < self.cfg.disk.queue_blocks:
                slots, evicted = self.cpu.reserve(count)
                if slots:
                    self._evicted_from_cpu(evicted)
                    return slots
            left = deadline - time.monotonic()
            if left <= 0 or self._closing:
                raise exhausted(self._why_full(count))
            self._space_freed.clear()
            try:
                await asyncio.wait_for(self._space_freed.wait(), left)
            except asyncio.TimeoutError:
                pass

    def _why_full(self, count: int) -> str:
        return (f"no room for {count} blocks in the CPU tier: {self.arena.free_count()} slots free, "
                f"{len(self._backlog)} blocks waiting for write-through (limit {self.cfg.disk.queue_blocks}), "
                f"{len(self.leases)} read leases and {len(self.allocations)} allocations open; retry later")

    def _signal_space(self) -> None:
        self._space_freed.set()

    async def commit(self, allocation_id: int, namespace: str, staged: list[Staged], wait_durable: bool,
                     verified: bool = False):
        """Commits staged blocks of one allocation; returns a CommitStatus per entry. `verified`: the
        caller (the peer fetcher) has just checked every checksum against the bytes in the slots."""
        held = self.allocations.get(allocation_id)
        if held is None:
            raise precondition(f"allocation {allocation_id} is not open (committed, aborted or expired)")
        self.catalog.namespace(namespace)
        self._check_staged(held.items, staged, verified)
        self.allocations.take(allocation_id)
        statuses, stored = self._install(namespace, staged)
        leftover = set(held.items) - {s.slot for s, st in zip(staged, statuses) if st == pb.STORED}
        self.cpu.unreserve(sorted(leftover))
        self._signal_space()
        if self.s3sync is not None:
            await self.s3sync.journal(stored)  # durable obligation before the commit is acknowledged
        if wait_durable:
            await self._wait_durable(stored)
        return statuses

    def _check_staged(self, slots: list[int], staged: list[Staged], verified: bool = False) -> None:
        """Validates every entry before anything changes, so a bad entry commits nothing."""
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
            if not verified and checksum(self.arena.view(entry.slot)[:entry.length]) != entry.checksum:
                raise invalid(f"entry {index} (key {entry.key.hex()}): checksum does not match the bytes in "
                              f"slot {entry.slot}; nothing was committed")

    def _install(self, namespace: str, staged: list[Staged]):
        statuses, stored = [], []
        created = now_ms()
        for entry in staged:
            existing = self.catalog.get(namespace, entry.key)
            if existing is not None:
                statuses.append(pb.DUPLICATE)
                self.counters.duplicates += 1
                if entry.retention is not None:
                    self._strengthen(existing, entry.retention)
                continue
            block = Block(namespace, entry.key, entry.parent, entry.length, entry.checksum, created, created,
                          tiers=CPU, retention=entry.retention, retained_ms=created)
            self.catalog.add(block)
            _install_in(self.cpu, block, entry.slot)
            self.events.emit(pb.BLOCK_STORED, namespace, block.key, CPU, length=block.length, parent=block.parent)
            self.counters.cpu_writes += 1
            self.counters.cpu_write_bytes += block.length
            if self.disk is not None:
                self._queue_write(block)
            statuses.append(pb.STORED)
            stored.append(block)
        self.counters.commits += len(staged)
        return statuses, stored

    def abort(self, allocation_id: int) -> None:
        held = self.allocations.take(allocation_id)
        if held is None:
            raise precondition(f"allocation {allocation_id} is not open (committed, aborted or expired)")
        self.cpu.unreserve(held.items)
        self._signal_space()

    async def put(self, namespace: str, key: bytes, parent: bytes, data_chunks, length: int, expected: int,
                  wait_ms: int, wait_durable: bool, retention=None) -> int:
        """Streamed put: bytes go straight into a reserved slot, then the normal commit path."""
        self.catalog.namespace(namespace)
        if length > self.arena.slot_bytes:
            raise invalid(f"block of {length} bytes exceeds the slot size {self.arena.slot_bytes}")
        held = await self.allocate(1, wait_ms, self.cfg.limits.default_lease_ms)
        try:
            view, filled = self.arena.view(held.items[0]), 0
            async for chunk in data_chunks:
                if filled + len(chunk) > length:
                    raise invalid(f"stream sent more than the {length} bytes its header announced")
                view[filled:filled + len(chunk)] = chunk
                filled += len(chunk)
            if filled != length:
                raise invalid(f"stream ended after {filled} of {length} bytes")
        except BaseException:
            if self.allocations.get(held.id) is not None:
                self.abort(held.id)
            raise
        staged = [Staged(key, parent, held.items[0], length, expected, retention)]
        try:
            return (await self.commit(held.id, namespace, staged, wait_durable))[0]
        except BaseException:
            if self.allocations.get(held.id) is not None:
                self.abort(held.id)
            raise

    # -- write-through ------------------------------------------------------------------------
    def _queue_write(self, block: Block) -> None:
        block.write_pending = True
        self.cpu.pin(block.id)
        self._backlog.append(block)
        self._backlog_ready.set()

    async def _wait_durable(self, blocks: list[Block]) -> None:
        loop = asyncio.get_running_loop()
        waits = []
        for block in blocks:
            if block.write_pending:
                waits.append(self._durable.setdefault(block.id, loop.create_future()))
        if waits:
            await asyncio.gather(*waits)

    async def _write_through(self) -> None:
        failures = 0
        while True:
            await self._backlog_ready.wait()
            batch = [self._backlog[i] for i in range(min(len(self._backlog), self.cfg.disk.batch_blocks))]
            if not batch:
                self._backlog_ready.clear()
                continue
            records = [(BlockHeader(b.namespace, b.key, b.parent, b.length, b.checksum, b.created_ms),
                        self.cpu.view(b.id)) for b in batch]
            try:
                written, evicted = await self._on_writer(lambda: self.disk.write_batch(records))
            except Exception as exc:  # noqa: BLE001 - the write-through must outlive any one batch
                if self._drop_modified(batch):
                    continue
                self.counters.disk_write_errors += 1
                delay = WRITE_RETRY_S[min(failures, len(WRITE_RETRY_S) - 1)]
                failures += 1
                log.error("disk write-through failed (%r); %d blocks waiting, retrying in %.1fs",
                          exc, len(self._backlog), delay)
                await asyncio.sleep(delay)
                continue
            failures = 0
            for _ in batch:
                self._backlog.popleft()
            self._evicted_from_disk(evicted)
            for block, entry in zip(batch, written):
                self._landed_on_disk(block, entry)
            self._signal_space()

    def _drop_modified(self, batch: list[Block]) -> bool:
        """Quarantines blocks whose arena bytes changed after commit (a client wrote into a slot it
        no longer owned); returns whether any was found. Such bytes never reach the disk."""
        modified = [b for b in batch if checksum(self.cpu.view(b.id)[:b.length]) != b.checksum]
        for block in modified:
            self._backlog.remove(block)
            block.write_pending = False
            self.cpu.unpin(block.id)
            self._quarantined(block, CPU)
            waiter = self._durable.pop(block.id, None)
            if waiter is not None and not waiter.done():
                waiter.set_exception(precondition(f"block {block.key.hex()} was modified in shared memory "
                                                  "after commit; quarantined"))
        return bool(modified)

    def _landed_on_disk(self, block: Block, entry: DiskEntry) -> None:
        assert entry.key == block.key and entry.checksum == block.checksum
        block.write_pending = False
        block.tiers |= DISK
        self.disk_blocks += 1
        if self.s3sync is not None:
            self.s3sync.landed_on_disk(block, entry.segment)
        self.cpu.unpin(block.id)
        self.counters.disk_writes += 1
        self.counters.disk_write_bytes += block.length
        self.events.emit(pb.BLOCK_STORED, block.namespace, block.key, DISK, length=block.length,
                         parent=block.parent)
        waiter = self._durable.pop(block.id, None)
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _evicted_from_disk(self, entries: list[DiskEntry]) -> None:
        for entry in entries:
            block = self.catalog.get(entry.namespace, entry.key)
            if block is None or not block.tiers & DISK:
                continue
            self.counters.disk_evictions += 1
            self._drop_tier(block, DISK)

    def _evicted_from_cpu(self, block_ids) -> None:
        for namespace, key in block_ids:
            block = self.catalog.get(namespace, key)
            assert block is not None and not block.write_pending
            self._drop_tier(block, CPU, already_removed=True)

    def _drop_tier(self, block: Block, tier: int, already_removed: bool = False) -> None:
        """The block left `tier`; when no tier keeps it, it leaves the catalog."""
        if tier == CPU and not already_removed:
            self.cpu.remove(block.id)
        elif tier == GPU and not already_removed:
            self.gpu.remove(block.id)
        block.tiers &= ~tier
        self.disk_blocks -= tier == DISK
        if tier == S3:
            self.s3sync.dropped(block)
        self.events.emit(pb.BLOCK_REMOVED, block.namespace, block.key, tier, length=block.length)
        if not block.tiers:
            self.catalog.discard(block)

    # -- read path ----------------------------------------------------------------------------
    async def acquire(self, namespace: str, keys: list[bytes], lease_ms: int, gpu: bool = False):
        """Pins each found block in the CPU tier (promoting from lower tiers) and, with gpu, in the GPU
        tier too; returns (lease or None, blocks)."""
        self.catalog.namespace(namespace)
        if self.leases.full():
            raise exhausted("too many open read leases; release some first")
        found: list[Block | None] = [None] * len(keys)
        lower: list[tuple[int, Block]] = []
        for index, key in enumerate(keys):
            block = self.catalog.get(namespace, key)
            if block is not None and block.tiers & CPU:
                found[index] = self._pin_reader(block)  # pinned first: promotions below cannot evict it
            elif block is not None:
                lower.append((index, block))
        promoted = await asyncio.gather(*(self._promote_and_pin(block) for _, block in lower))
        for (index, _), block in zip(lower, promoted):
            found[index] = block
        pinned = [b.id for b in found if b is not None]
        self.counters.acquire_hits += len(pinned)
        self.counters.acquire_misses += len(keys) - len(pinned)
        if not pinned:
            return None, found
        held = self.leases.add(pinned, lease_ms, namespace)
        if gpu and self.gpu is not None:
            for block in found:
                if block is not None and await self._pin_on_gpu(block):
                    held.gpu_items.append(block.id)
        return held, found

    async def _pin_on_gpu(self, block: Block) -> bool:
        """Promotes a CPU-pinned block into the GPU tier (if it is not there) and pins it there."""
        if block.id not in self.gpu:
            slots, evicted = self.gpu.reserve(1)
            if not slots:
                return False  # every GPU slot is held by readers: the CPU copy serves this lease
            for block_id in evicted:
                self._evicted_from_gpu(block_id)
            await _finished(self.gpu.copy_in(slots[0], self.cpu.view(block.id), block.length))
            if self.catalog.get(block.namespace, block.key) is not block or block.id in self.gpu:
                self.gpu.unreserve(slots)  # deleted, or promoted by a concurrent reader meanwhile
            else:
                _install_in(self.gpu, block, slots[0])
                block.tiers |= GPU
                self.events.emit(pb.BLOCK_MOVED, block.namespace, block.key, GPU, from_tier=CPU,
                                 length=block.length)
        if block.id not in self.gpu:
            return False
        self.gpu.pin(block.id)
        self.gpu.touch(block.id)
        return True

    def _evicted_from_gpu(self, block_id) -> None:
        """A GPU copy was dropped to make room; every block entered through the CPU tier, so a lower
        tier still holds it unless the disk tier is off and the CPU tier evicted it too."""
        block = self.catalog.get(*block_id)
        if block is not None and block.tiers & GPU:
            self._drop_tier(block, GPU, already_removed=True)

    def _pin_reader(self, block: Block) -> Block:
        self.cpu.pin(block.id)
        self.cpu.touch(block.id)
        block.readers += 1
        block.hits += 1
        block.last_access_ms = now_ms()
        self.counters.cpu_reads += 1
        self.counters.cpu_read_bytes += block.length
        return block

    async def _promote_and_pin(self, block: Block) -> Block | None:
        """Promotes and pins; a block evicted again before this reader resumed is promoted again
        (bounded), and no room in the CPU tier is a miss, not an error."""
        for _ in range(3):
            try:
                promoted = await self._promote(block)
            except ApiError as exc:
                log.warning("promotion of %s/%s skipped: %s", block.namespace, block.key.hex(), exc.message)
                return None
            if promoted is None:
                return None
            if promoted.tiers & CPU and self.catalog.get(block.namespace, block.key) is promoted:
                return self._pin_reader(promoted)
        return None

    async def _promote(self, block: Block) -> Block | None:
        """Copies a disk-only block into a CPU slot, verified; concurrent callers share one read."""
        pending = self._promotions.get(block.id)
        if pending is None:
            pending = asyncio.get_running_loop().create_future()
            self._promotions[block.id] = pending
            try:
                pending.set_result(await self._read_from_lower(block))
            except BaseException as exc:
                pending.set_exception(exc)
                pending.exception()  # retrieved: other readers may or may not be waiting on it
                raise
            finally:
                del self._promotions[block.id]
        return await asyncio.shield(pending)

    async def _read_from_lower(self, block: Block) -> Block | None:
        """Copies a block from the highest lower tier that has a good copy into a CPU slot."""
        slots = await self._reserve(1, PROMOTION_WAIT_MS)
        view = self.arena.view(slots[0])
        source = 0
        if block.tiers & GPU and await self._read_gpu_into(block, view):
            source = GPU
        elif block.tiers & DISK and await self._read_disk_into(block, view):
            source = DISK
        elif block.tiers & S3 and self.s3sync is not None and await self.s3sync.download(block, view):
            source = S3
        current = self.catalog.get(block.namespace, block.key)
        if not source or current is not block or block.tiers & CPU:
            self.cpu.unreserve(slots)
            self._signal_space()
            return block if source and current is block else None
        _install_in(self.cpu, block, slots[0])
        block.tiers |= CPU
        self.events.emit(pb.BLOCK_MOVED, block.namespace, block.key, CPU, from_tier=source, length=block.length)
        if source == S3 and self.disk is not None:
            self._queue_write(block)  # keep a local copy: the next restart reads it from disk
        return block

    async def _read_gpu_into(self, block: Block, view: memoryview) -> bool:
        """Demotion: the CPU tier lost the block but the GPU tier has it; copied down and verified."""
        if self.gpu is None or block.id not in self.gpu:
            return False
        self.gpu.pin(block.id)  # its slot cannot be reused while the copy reads it
        try:
            await _finished(self.gpu.copy_out(self.gpu.slot_of(block.id), view, block.length))
        finally:
            self.gpu.unpin(block.id)
        if checksum(view[:block.length]) == block.checksum:
            return True
        if self.catalog.get(block.namespace, block.key) is block and block.tiers & GPU:
            self._quarantined(block, GPU)
        return False

    async def _read_disk_into(self, block: Block, view: memoryview) -> bool:
        entry = self.disk.get_entry(block.namespace, block.key) if self.disk is not None else None
        if entry is None:
            return False
        loop = asyncio.get_running_loop()
        ok = await loop.run_in_executor(self._readers, self.disk.read_into, entry, view)
        if ok:
            self.counters.disk_reads += 1
            self.counters.disk_read_bytes += block.length
        elif self.catalog.get(block.namespace, block.key) is block and block.tiers & DISK:
            self._quarantined(block, DISK)
        return ok

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
        self._unpin_readers(held)

    def _unpin_readers(self, held) -> None:
        for block_id in held.gpu_items:
            if self.gpu is not None and block_id in self.gpu:
                self.gpu.unpin(block_id)
        for namespace, key in held.items:
            block = self.catalog.get(namespace, key)
            if block is not None and block.id in self.cpu:
                block.readers -= 1
                self.cpu.unpin(block.id)
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
                if tier is not None and block.id in tier and hasattr(tier.policy, "retain"):
                    tier.policy.retain(block.id, retention)
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
        An acquire released at once: the promotions stay, the pins do not."""
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
    async def delete(self, namespace: str, keys) -> tuple[int, int]:
        """Removes blocks from every tier; blocks held by a reader or the write-through are busy."""
        self.catalog.namespace(namespace)
        deleted = busy = 0
        for key in keys:
            block = self.catalog.get(namespace, key)
            if block is None:
                continue
            if block.readers or block.write_pending:
                busy += 1
                continue
            await self._delete_block(block)
            deleted += 1
        self._signal_space()
        return deleted, busy

    async def _delete_block(self, block: Block) -> None:
        if block.tiers & DISK:
            await self._on_writer(lambda: self.disk.remove(block.namespace, block.key))
        if block.tiers & S3:
            await self.s3sync.delete(block)
        for tier in (GPU, CPU, DISK, S3):
            if block.tiers & tier and self.catalog.get(block.namespace, block.key) is block:
                self._drop_tier(block, tier)

    async def clear(self, namespace: str) -> int:
        names = sorted(self.catalog.namespaces) if namespace == "*" else [self.catalog.namespace(namespace).name]
        deleted = 0
        for name in names:
            blocks = list(self.catalog.namespaces[name].blocks.values())
            for block in blocks:
                if not (block.readers or block.write_pending):
                    await self._delete_block(block)
                    deleted += 1
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
                self.cpu.unreserve(held.items)
                self._signal_space()
            for held in self.leases.expired():
                self.counters.leases_expired += 1
                log.warning("read lease %d on %s expired unreleased: %d blocks unpinned",
                            held.id, held.namespace, len(held.items))
                self._unpin_readers(held)

    # -- stats --------------------------------------------------------------------------------
    def stats(self) -> pb.StatsResponse:
        c = self.counters
        tiers = []
        if self.gpu is not None:
            g = self.gpu.stats()
            tiers.append(pb.TierStats(tier="gpu", blocks=len(self.gpu), bytes=self.gpu.used_bytes,
                                      capacity_bytes=self.gpu.capacity_bytes, reads=g["reads"],
                                      writes=g["writes"], read_bytes=g["read_bytes"],
                                      write_bytes=g["write_bytes"], evictions=self.gpu.evictions,
                                      pressure_evictions=self.gpu.pressure_evictions))
        tiers += [pb.TierStats(tier="cpu", blocks=len(self.cpu), bytes=self.cpu.used_bytes,
                              capacity_bytes=self.arena.size_bytes, reads=c.cpu_reads, writes=c.cpu_writes,
                              read_bytes=c.cpu_read_bytes, write_bytes=c.cpu_write_bytes,
                              evictions=self.cpu.evictions, pressure_evictions=self.cpu.pressure_evictions)]
        if self.disk is not None:
            tiers.append(pb.TierStats(tier="disk", blocks=self.disk_blocks, bytes=self.disk.used_bytes(),
                                      capacity_bytes=self.disk.capacity_bytes, reads=c.disk_reads,
                                      writes=c.disk_writes, read_bytes=c.disk_read_bytes,
                                      write_bytes=c.disk_write_bytes, evictions=c.disk_evictions))
        if self.s3sync is not None:
            s3 = self.s3sync.counters
            tiers.append(pb.TierStats(tier="s3", blocks=self.s3sync.blocks, reads=s3.downloads, writes=s3.uploads,
                                      read_bytes=s3.download_bytes, write_bytes=s3.upload_bytes))
        return pb.StatsResponse(
            blocks=self.catalog.blocks, bytes=self.catalog.bytes, lookups=c.lookups, lookup_keys=c.lookup_keys,
            lookup_hit_keys=c.lookup_hit_keys, acquire_hits=c.acquire_hits, acquire_misses=c.acquire_misses,
            duplicates=c.duplicates, quarantined=c.quarantined, write_backlog=len(self._backlog),
            active_leases=len(self.leases), active_allocations=len(self.allocations), tiers=tiers,
            event_seq=self.events.seq, uptime_s=time.monotonic() - self.started,
            upload_backlog=self.s3sync.backlog if self.s3sync else 0,
            s3_reachable=self.s3sync.reachable if self.s3sync else False)



def _arena_prefix(cfg: Config) -> str:
    """One arena name per data dir, so stale arenas of a crashed daemon are found and removed."""
    import hashlib
    import os
    digest = hashlib.sha256(os.path.abspath(cfg.data_dir).encode()).hexdigest()[:12]
    return f"kvtier-{digest}"


async def _finished(transfer) -> None:
    """Waits for a GPU copy without blocking the event loop (CPU-device copies are done at once)."""
    while not transfer.done():
        await asyncio.sleep(0.0002)
