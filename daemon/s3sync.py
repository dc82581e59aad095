"""S3 write-through and read-through for the block store.

Contract
- Crash-safe write-through: `journal(blocks)` makes each block's upload obligation durable (LMDB,
  fsynced) before the commit that stored it is acknowledged. The uploader drains obligations in
  the background with bounded concurrency; an obligation is removed only once S3 holds the object
  (stored by us, or already there: If-None-Match makes writers race safely).
- While an obligation is open, the block's disk segment is not evicted (`segment_evictable`), so
  an S3 outage costs disk space, never data. When the disk is full of such blocks, write-through
  to disk stalls and Allocate pushes back on clients.
- Reads from S3 are verified by the S3 tier; a bad object is quarantined there and is a miss here.
- The lister adopts blocks that other nodes uploaded, so a fresh node sees the bucket's blocks.
- Event loop only, except `segment_evictable`, which the disk writer thread calls (a dict read).
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import mmap
import random
import time
from concurrent.futures import ThreadPoolExecutor

from kvtier.proto.v1 import kvtier_pb2 as pb
from kvtier.tiers.block import BlockHeader, align_up
from kvtier.tiers.s3 import S3Config, S3Tier, S3Unavailable

from .catalog import Block
from .config import S3TierConfig

log = logging.getLogger("kvtier.s3sync")
S3, CPU, DISK = pb.TIER_S3, pb.TIER_CPU, pb.TIER_DISK
UPLOAD_BATCH_PER_WORKER = 4
BACKOFF_MAX_S = 30.0


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


def tier_config(cfg: S3TierConfig) -> S3Config:
    secret = None
    if cfg.secret_access_key_file:
        with open(cfg.secret_access_key_file, encoding="utf-8") as file:
            secret = file.read().strip()
    return S3Config(endpoint_url=cfg.endpoint_url or None, bucket=cfg.bucket, prefix=cfg.prefix,
                    region=cfg.region or None, access_key_id=cfg.access_key_id or None, secret_access_key=secret,
                    max_concurrency=cfg.max_concurrency, connect_timeout_s=cfg.connect_timeout_s,
                    read_timeout_s=cfg.read_timeout_s)


class S3Sync:
    def __init__(self, store, tier: S3Tier, cfg: S3TierConfig):
        self.store = store
        self.tier = tier
        self.cfg = cfg
        self.counters = S3Counters()
        self.blocks = 0                  # catalog blocks with the S3 bit
        self.reachable = True
        self._pool = ThreadPoolExecutor(cfg.max_concurrency, thread_name_prefix="kvtier-s3")
        self._journal = ThreadPoolExecutor(1, thread_name_prefix="kvtier-s3-journal")
        self._pending: dict[tuple[str, bytes], None] = {}   # journaled obligations, oldest first
        self._segment_of: dict[tuple[str, bytes], int] = {}
        self._by_segment: dict[int, int] = {}               # disk segment -> obligations in it
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task] = []

    # -- lifecycle ------------------------------------------------------------------------------
    async def start(self) -> str:
        pending = await self._in(self._journal, lambda: self.tier.journal_pending(1 << 30))
        for block_id in pending:
            self._pending[block_id] = None
            entry = self.store.disk.get_entry(*block_id) if self.store.disk is not None else None
            if entry is not None:
                self._count_segment(block_id, entry.segment)
        loop = asyncio.get_running_loop()
        if self.cfg.write_through:
            self._tasks.append(loop.create_task(self._upload_loop(), name="s3-upload"))
        self._tasks.append(loop.create_task(self._list_loop(), name="s3-list"))
        return f"s3 bucket {self.cfg.bucket}: {len(pending)} uploads pending from the journal"

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._pool.shutdown(wait=True)
        self._journal.shutdown(wait=True)
        self.tier.close()

    @staticmethod
    async def _in(pool, fn):
        return await asyncio.get_running_loop().run_in_executor(pool, fn)

    @property
    def backlog(self) -> int:
        return len(self._pending)

    # -- write-through --------------------------------------------------------------------------
    async def journal(self, blocks: list[Block]) -> None:
        """Durably records the upload obligation of each block; call before acknowledging a commit."""
        if not self.cfg.write_through or not blocks:
            return
        ids = [b.id for b in blocks]
        await self._in(self._journal, lambda: self.tier.journal_add(ids))
        for block_id in ids:
            self._pending[block_id] = None
        self._wake.set()

    def landed_on_disk(self, block: Block, segment: int) -> None:
        if block.id in self._pending:
            self._count_segment(block.id, segment)

    def segment_evictable(self, segment: int) -> bool:
        return not self._by_segment.get(segment)

    def _count_segment(self, block_id, segment: int) -> None:
        self._segment_of[block_id] = segment
        self._by_segment[segment] = self._by_segment.get(segment, 0) + 1

    def _settle(self, block_id) -> None:
        self._pending.pop(block_id, None)
        segment = self._segment_of.pop(block_id, None)
        if segment is not None:
            left = self._by_segment[segment] - 1
            if left:
                self._by_segment[segment] = left
            else:
                del self._by_segment[segment]

    async def _upload_loop(self) -> None:
        failures = 0
        while True:
            if not self._pending:
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), 1.0)
                except asyncio.TimeoutError:
                    pass
                continue
            batch = list(itertools.islice(self._pending, self.cfg.max_concurrency * UPLOAD_BATCH_PER_WORKER))
            try:
                done = await self._upload_batch(batch)
            except S3Unavailable as exc:
                failures += 1
                self.counters.failures += 1
                delay = min(BACKOFF_MAX_S, 0.5 * 2 ** min(failures, 8)) * random.uniform(0.5, 1.5)
                if self.reachable:
                    log.error("S3 unreachable (%s): %d uploads waiting in the journal; local puts continue",
                              exc, len(self._pending))
                self.reachable = False
                await asyncio.sleep(delay)
                continue
            if not self.reachable:
                log.warning("S3 reachable again: draining %d uploads", len(self._pending))
            self.reachable, failures = True, 0
            if done:
                await self._in(self._journal, lambda: self.tier.journal_done(done))
                for block_id in done:
                    self._settle(block_id)

    async def _upload_batch(self, batch) -> list:
        """Uploads a batch concurrently; returns the ids whose obligation is settled."""
        work, settled = [], []
        for block_id in batch:
            block = self.store.catalog.get(*block_id)
            if block is None or block.tiers & S3:
                settled.append(block_id)  # deleted everywhere, or already uploaded
            elif block.tiers & (CPU | DISK):
                work.append(block)
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
        return settled

    async def _upload_one(self, block: Block) -> str | None:
        header = BlockHeader(block.namespace, block.key, block.parent, block.length, block.checksum,
                             block.created_ms)
        if block.tiers & CPU:
            self.store.cpu.pin(block.id)  # the slot cannot be reused while the upload reads it
            try:
                view = self.store.cpu.view(block.id)[:block.length]
                return await self._in(self._pool, lambda: self.tier.upload(header, view))
            finally:
                self.store.cpu.unpin(block.id)
        payload = await self._read_disk_copy(block)
        if payload is None:
            return None
        return await self._in(self._pool, lambda: self.tier.upload(header, payload))

    async def _read_disk_copy(self, block: Block):
        entry = self.store.disk.get_entry(block.namespace, block.key)
        if entry is None:
            return None
        buffer = mmap.mmap(-1, align_up(max(block.length, 1), 4096))  # aligned, for O_DIRECT
        ok = await self._in(self._pool, lambda: self.store.disk.read_into(entry, memoryview(buffer)))
        if not ok:
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
            self.blocks += 1
            self.store.events.emit(pb.BLOCK_STORED, block.namespace, block.key, S3, length=block.length,
                                   parent=block.parent)

    # -- read-through ---------------------------------------------------------------------------
    async def download(self, block: Block, dest: memoryview) -> bool:
        """Copies the S3 object into dest, verified; False (and the S3 bit dropped) when it is bad."""
        try:
            length = await self._in(self._pool, lambda: self.tier.download_into(block.namespace, block.key, dest))
        except S3Unavailable as exc:
            log.warning("S3 read of %s/%s failed: %s", block.namespace, block.key.hex(), exc)
            return False
        if length is None or length != block.length:
            if self.store.catalog.get(block.namespace, block.key) is block and block.tiers & S3:
                self.store._quarantined(block, S3)
            return False
        self.counters.downloads += 1
        self.counters.download_bytes += length
        return True

    async def delete(self, block: Block) -> None:
        await self._in(self._pool, lambda: self.tier.delete(block.namespace, block.key))
        if block.id in self._pending:
            await self._in(self._journal, lambda: self.tier.journal_done([block.id]))
            self._settle(block.id)

    def dropped(self, block: Block) -> None:
        """The block's S3 bit was cleared (quarantine or delete)."""
        self.blocks -= 1

    # -- adopting what other nodes uploaded -----------------------------------------------------
    async def _list_loop(self) -> None:
        while True:
            started = time.monotonic()
            try:
                adopted = await self._list_once()
                if adopted:
                    log.info("adopted %d blocks from s3://%s/%s", adopted, self.cfg.bucket, self.cfg.prefix)
            except S3Unavailable as exc:
                log.warning("listing s3://%s failed: %s", self.cfg.bucket, exc)
            await asyncio.sleep(max(0.0, self.cfg.list_interval_s - (time.monotonic() - started)))

    async def _list_once(self) -> int:
        """One pass over the bucket: a LIST per page, a HEAD only for blocks the catalog lacks."""
        adopted, token = 0, ""
        digests = {self.tier.namespace_digest(name): name for name in self.store.catalog.namespaces}
        while True:
            items, token = await self._in(self._pool, lambda: self.tier.list_keys(token))
            unknown = [(okey, size) for okey, size in items if not self._known(okey, digests)]
            room = self.cfg.max_catalog_blocks - self.store.catalog.blocks
            if len(unknown) > room:  # the bucket outgrew what this node may index: stop here
                unknown = unknown[:max(0, room)]
                token = ""
                self.counters.adoption_capped += 1
                log.warning("s3 listing stopped: the catalog holds s3.max_catalog_blocks=%d blocks; "
                            "blocks other nodes uploaded beyond that are not indexed here",
                            self.cfg.max_catalog_blocks)
            entries = await asyncio.gather(*(self._in(self._pool, lambda o=o, n=n: self.tier.entry_for(o, n))
                                             for o, n in unknown))
            for entry in entries:
                if entry is not None:
                    adopted += self._adopt(entry)
            if not token:
                return adopted

    def _known(self, object_key: str, digests: dict[str, str]) -> bool:
        parsed = self.tier.parse_object_key(object_key)
        if parsed is None:
            return True  # not one of ours: nothing to adopt
        name = digests.get(parsed[0])
        block = self.store.catalog.get(name, parsed[1]) if name else None
        return block is not None and bool(block.tiers & S3)

    def _adopt(self, entry) -> int:
        block = self.store.catalog.get(entry.namespace, entry.key)
        if block is not None:
            if not block.tiers & S3 and block.checksum == entry.checksum:
                block.tiers |= S3
                self.blocks += 1
                self._settle(block.id)
                self.store.events.emit(pb.BLOCK_STORED, block.namespace, block.key, S3, length=block.length)
            return 0
        self.store.catalog.adopt_namespace(entry.namespace)
        block = Block(entry.namespace, entry.key, entry.parent, entry.length, entry.checksum,
                      entry.created_unix_ms, entry.created_unix_ms, tiers=S3)
        self.store.catalog.add(block)
        self.blocks += 1
        self.counters.adopted += 1
        self.store.events.emit(pb.BLOCK_STORED, block.namespace, block.key, S3, length=block.length,
                               parent=block.parent)
        return 1
