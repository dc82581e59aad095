"""The NVMe tier: append-only segment files of aligned, self-describing records, indexed by LMDB.

Layout (exact bytes: docs/disk-format.md):
    <directory>/segments/seg-<16 hex id>.kvseg   segment header area, then records, each at a multiple
                                                 of `align`: header area (BlockHeader) + padded payload.
                                                 A record is a block, or a tombstone (flags != 0).
    <directory>/index.lmdb/                      LMDB: blocks, by_segment, segments, quarantine,
                                                 uploads, upload_keys, tombstones

Contract:
- Threads: exactly one writer thread calls write_batch/remove/remove_namespace/settle_uploads (eviction
  happens inside write_batch); any number of reader threads call read_into/get_entry/contains/entries/
  pending_uploads/upload_backlog concurrently. recover() and close() run with no other call in flight.
- Durability: write_batch returns only after every new record is fdatasync'ed, the segment directory is
  fsync'ed if a segment file was created, and one LMDB transaction (sync=True) indexed the batch together
  with its upload obligations. An entry is indexed iff its bytes are durable, so contains()/get_entry()
  have no false positives for what survives a crash. remove()/remove_namespace() write a tombstone record
  (fdatasync'ed) before un-indexing, so they are durable on return and survive an index rebuild.
- Upload obligations: a block written with upload=True stays "pending" (pending_uploads) until
  settle_uploads; the segment holding it is never evicted meanwhile. With track_uploads, recovery gives
  every record it adopts from the segment files an obligation (its obligation may have been lost).
- Buffers: payload views passed to write_batch and dest passed to read_into are borrowed for the call.
  Payload views may be longer than payload_len (arena slots). Full aligned blocks of a payload are
  written straight from the caller's view; only the partial last block is copied (O_DIRECT) so that
  padding on disk is zero. With o_direct an unaligned view or dest goes through a bounce buffer.
- Reads verify everything: read_into returns True only if the record header equals the entry and the
  payload checksum matches; otherwise the block is quarantined (un-indexed, recorded) and False returned.
  On False the contents of dest are unspecified.
- Space: whole segments are evicted, oldest evictable first, so that used_bytes() <= capacity_bytes after
  every write_batch. With protect(namespace), a segment's live protected blocks are first copied forward
  (compaction: durable and re-indexed before the segment goes; at most compact_bytes per write_batch,
  beyond which the batch fails ENOSPC). footprint(header) is what a block's record takes on disk.
  Not evictable: a segment with open upload obligations, and a segment holding
  tombstones while an older segment stays (its tombstones may still kill records there). A batch that
  cannot fit fails with OSError(ENOSPC) before any I/O. Tombstones written by remove() may exceed the
  capacity by their size (one `align` each) until the next write_batch evicts.
- Restart: recover() must be called once before use. It is salvage-first: a damaged index is moved aside
  and rebuilt from the segment files; a bad segment header or a bad record costs only itself; only the
  torn tail after a segment's last valid record is truncated. It is idempotent.
"""

from __future__ import annotations

import dataclasses
import errno
import itertools
import logging
import mmap
import os
import re
import resource
import signal
import struct
import subprocess
import sys
import threading
import time
from typing import Callable, Iterator, Sequence, TypeVar

import lmdb
import numpy as np
import xxhash

from .block import (FIXED_HEADER_BYTES, MAX_BASE_HEADER_BYTES, MAX_HEADER_BYTES, BlockHeader, BlockOrigin,
                    CorruptBlock, align_up, checksum, decode_extension, decode_header, encode_extension,
                    header_len_of)
from .fs import FileSystem

log = logging.getLogger("kvtier.disk")
T = TypeVar("T")

SEGMENT_MAGIC = b"KVTS"
SEGMENT_VERSION = 1
# magic, version, segment id, created unix ms; followed by the xxh3 of these bytes.
_SEGMENT_FIELDS = struct.Struct("<4sHQQ")
_SEGMENT_HEADER = struct.Struct("<4sHQQQ")
_SEGMENT_NAME = re.compile(r"^seg-([0-9a-f]{16})\.kvseg$")
# blocks value: segment, offset, payload_len, payload_checksum, created_ms, parent_len; then parent; then,
# for a block with token ids or an origin, the same extension as its version 2 header (block.py).
_VALUE = struct.Struct("<QQQQQB")
_U64 = struct.Struct("<Q")
# Segment ids and sequence numbers as LMDB keys are big-endian so that key order is numeric order.
_SEG_KEY = struct.Struct(">Q")
_POSITION_KEY = struct.Struct(">QQ")  # tombstones: segment id, offset
_EVICTED = 0  # committed_end 0 in `segments`: evicted, its file may still need deleting.

# BlockHeader flags (u16 at offset 12 of the encoding, covered by the header checksum).
FLAG_TOMBSTONE = 0x1            # kills every earlier record of (namespace, key)
FLAG_NAMESPACE_TOMBSTONE = 0x2  # kills every earlier record of any key of namespace; key is 0x00
_FLAGS = struct.Struct("<H")
_FLAGS_OFFSET = 12
_HEADER_SUM_OFFSET = FIXED_HEADER_BYTES - 8
_NAMESPACE_TOMBSTONE_KEY = b"\0"
_EMPTY_CHECKSUM = checksum(b"")

_DB_NAMES = (b"blocks", b"by_segment", b"segments", b"quarantine", b"uploads", b"upload_keys",
             b"tombstones")
# Index space per record slot (the smallest record is one header area): one entry in blocks,
# by_segment, uploads and upload_keys (keys up to 161 bytes), with room for half-full pages and
# copy-on-write. Generous on purpose: the map is address space, not disk.
_INDEX_BYTES_PER_RECORD = 2048
_MIN_MAP_BYTES = 64 << 20
# The index validation child gets this long, plus time to read the whole data file.
_INDEX_CHECK_BASE_S = 60.0
_INDEX_CHECK_BYTES_PER_S = 64 << 20
# Runs in a separate process (`python -I -c`): opens the index read-only without the lock file and
# touches every entry of every db, so a damaged or truncated data.mdb kills the child, not the daemon.
_INDEX_CHECK_SCRIPT = """
import sys, lmdb
env = lmdb.open(sys.argv[1], subdir=True, readonly=True, lock=False, max_dbs=64, readahead=False)
with env.begin() as txn:
    names = [bytes(k) for k, _ in txn.cursor()]
    for name in names:
        db = env.open_db(name, txn=txn, create=False)
        count = sum(1 for k, v in txn.cursor(db=db) if len(k) + len(v) >= 0)
        if count != txn.stat(db)["entries"]:
            sys.exit("db %r: %d entries walked, stat says %d" % (name, count, txn.stat(db)["entries"]))
"""

_IOV_MAX = max(16, os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024)
_SCAN_CHUNK = 1 << 20      # recovery verifies payloads in chunks of this many bytes: bounded memory
_ENTRIES_PAGE = 1024       # entries() holds a read txn for at most this many entries
_MAX_ALIGN = 1 << 20
_READ_ERRNOS = (errno.EIO, errno.ENODATA, errno.EBADMSG)  # media errors: quarantine, do not raise
_COPY_CHUNK = 8 << 20      # compaction copies at most this many payload bytes per append (memory bound)
_COMPACTION_LOG_S = 60.0   # one compaction log line a minute at most


@dataclasses.dataclass(frozen=True, slots=True)
class DiskEntry:
    namespace: str
    key: bytes
    parent: bytes
    length: int
    checksum: int
    created_unix_ms: int
    segment: int
    offset: int  # offset of the record's header area in the segment file
    token_ids: bytes = b""               # as in the record's header (block.pack_token_ids)
    origin: BlockOrigin | None = None

    def header(self) -> BlockHeader:
        """The header the record of this entry must carry."""
        return BlockHeader(self.namespace, self.key, self.parent, self.length, self.checksum,
                           self.created_unix_ms, self.token_ids, self.origin)


class BatchFailed(OSError):
    """write_batch failed after it had evicted segments.

    `evicted`: every block that was un-indexed by that eviction and is no longer on disk (it may include
    already-indexed blocks of the failed batch itself). errno/strerror are the cause's (EIO if the cause
    is not an OSError); `__cause__` is the cause. Nothing of the batch is indexed.
    """

    def __init__(self, evicted: list[DiskEntry], cause: BaseException):
        is_os = isinstance(cause, OSError)
        code = cause.errno if is_os and cause.errno else errno.EIO
        message = cause.strerror if is_os and cause.strerror else (str(cause) or type(cause).__name__)
        super().__init__(code, message)
        self.evicted = evicted
        self.__cause__ = cause


@dataclasses.dataclass
class RecoveryReport:
    indexed: int = 0                # LMDB entries confirmed against segment files
    adopted: int = 0                # valid unindexed records found on disk and indexed
    torn: int = 0                   # tails truncated / segment files deleted (no record in them)
    dropped_index_entries: int = 0  # LMDB entries pointing at missing segments or past a file's end
    segments: int = 0
    bytes: int = 0                  # total payload bytes indexed after recovery
    killed: int = 0                 # indexed/adopted blocks un-indexed by a tombstone found by the scan
    salvaged: int = 0               # of `adopted`: records found after a bad region of their segment
    bad_regions: int = 0            # damaged stretches between valid records, left in place as dead bytes
    skipped_bytes: int = 0          # their total size
    headers_repaired: int = 0       # segment headers that failed verification and were rewritten
    index_moved_aside: str = ""     # where a damaged index was moved ("" if it was healthy)
    uploads: int = 0                # open upload obligations after recovery
    uploads_created: int = 0        # obligations given to adopted records (track_uploads)
    uploads_dropped: int = 0        # obligations whose block is gone (dropped entries, tombstones)

    def summary(self) -> str:
        text = (f"disk tier recovered {self.indexed + self.adopted - self.killed} blocks ({self.bytes} "
                f"payload bytes) in {self.segments} segments: {self.indexed} indexed, {self.adopted} "
                f"adopted ({self.salvaged} salvaged past damage), {self.killed} removed by tombstones, "
                f"{self.torn} torn, {self.dropped_index_entries} dropped index entries, "
                f"{self.bad_regions} bad regions ({self.skipped_bytes} bytes skipped), "
                f"{self.headers_repaired} segment headers repaired; {self.uploads} uploads pending "
                f"({self.uploads_created} created, {self.uploads_dropped} dropped)")
        if self.index_moved_aside:
            text += f"; DAMAGED INDEX moved to {self.index_moved_aside} and rebuilt"
        return text


@dataclasses.dataclass(slots=True, eq=False)
class _Segment:
    id: int
    path: str
    fd: int
    size: int              # bytes in the file: the writer appends here
    committed_end: int     # every record below is fdatasync'ed and indexed
    refs: int = 0          # readers currently using fd
    doomed: bool = False   # evicted: the last reader closes fd


# (header, payload view, flags): one record to append.
_Record = tuple[BlockHeader, memoryview, int]
# (header, flags, record bytes on disk, payload verified): what the scanner found at an offset.
_Found = tuple[BlockHeader, int, int, bool]


class DiskTier:
    """NVMe block store. See the module docstring for the full contract.

    Thread-safety: one writer thread (write_batch, remove, remove_namespace, settle_uploads); any number
    of reader threads (read_into, get_entry, contains, entries, used_bytes, quarantined_count,
    pending_uploads, upload_backlog) concurrently with it.
    Durability: write_batch returns after fdatasync + a committed LMDB txn; remove is durable on return.
    Buffer ownership: payload views and read destinations are borrowed for the duration of the call.
    False positives: none; contains()/get_entry() report exactly what is durable and indexed.
    Restart: call recover() once before use; it salvages what the segment files and the index hold.
    """

    def __init__(self, directory: str, *, capacity_bytes: int, segment_bytes: int = 256 << 20,
                 align: int = 4096, o_direct: bool = False, fs: FileSystem | None = None,
                 lmdb_map_bytes: int | None = None, track_uploads: bool = False,
                 protect: Callable[[str], bool] | None = None, compact_bytes: int | None = None):
        """lmdb_map_bytes None derives the LMDB map size from the capacity; an explicit value smaller
        than what the capacity may need raises ValueError. track_uploads: see recover().

        protect(namespace) says whether that namespace's blocks are protected from eviction: before
        eviction drops a segment holding live protected blocks, they are copied forward (compaction),
        at most compact_bytes of records per write_batch (default: two segments). Called on the writer
        thread. None: nothing is protected, whole oldest segments go as they are."""
        if align < 512 or align > _MAX_ALIGN or align & (align - 1):
            raise ValueError(f"align must be a power of two in [512, {_MAX_ALIGN}], got {align}")
        # The header area of a record is its header rounded up to `align`: one `align` for every
        # header of format version 1 (at most MAX_BASE_HEADER_BYTES < 512), more only for a version 2
        # header whose token ids do not fit in it.
        header_area = align_up(MAX_BASE_HEADER_BYTES, align)
        smallest_segment = align + header_area + align  # segment header + one 1-byte record
        if segment_bytes < smallest_segment:
            raise ValueError(f"segment_bytes must be >= {smallest_segment}, got {segment_bytes}")
        if capacity_bytes < smallest_segment:
            raise ValueError(f"capacity_bytes must be >= {smallest_segment}, got {capacity_bytes}")
        if o_direct and not hasattr(os, "O_DIRECT"):
            raise ValueError("o_direct requested but this platform has no O_DIRECT")
        self._directory = directory
        self._segment_dir = os.path.join(directory, "segments")
        self._index_path = os.path.join(directory, "index.lmdb")
        self._capacity = capacity_bytes
        self._segment_bytes = segment_bytes
        self._align = align
        self._header_area = header_area            # the smallest header area (every version 1 header's)
        self._max_header_area = align_up(MAX_HEADER_BYTES, align)
        self._map_bytes = _map_bytes(capacity_bytes, header_area, lmdb_map_bytes)
        self._track_uploads = track_uploads
        self._protect = protect
        self._compact_bytes = 2 * segment_bytes if compact_bytes is None else compact_bytes
        self.compacted_blocks = 0                   # protected blocks copied forward (writer only)
        self.compaction_passes = 0                  # segments compacted before their eviction
        self._compaction_log = (-float("inf"), 0, 0)        # (last line, blocks, segments since): one line a minute
        self._o_direct = o_direct
        self._open_flags = os.O_RDWR | os.O_CLOEXEC | (os.O_DIRECT if o_direct else 0)
        # O_DIRECT needs memory aligned to the logical block size; anonymous mmaps give page alignment.
        self._mem_align = min(align, mmap.PAGESIZE)
        self._fs = fs if fs is not None else FileSystem()
        self._zeros = memoryview(bytes(align))
        self._fs.makedirs(self._segment_dir)

        self._env: lmdb.Environment | None = None  # opened by recover(), after validation
        self._segments: dict[int, _Segment] = {}   # guarded by _segment_lock (readers look up fds)
        self._segment_lock = threading.Lock()
        self._txn_lock = threading.Lock()           # LMDB write txns (writer + quarantining readers),
        self._pinned: dict[int, int] = {}           # and this: segment -> open upload obligations
        self._tombstone_segments: set[int] = set()  # writer only: segments holding tombstone records
        self._tls = threading.local()               # per-reader-thread aligned header buffer
        self._active: _Segment | None = None        # writer only
        self._next_id = 1                           # writer only; segment ids are never reused
        self._next_seq = 1                          # writer only; obligation sequence numbers
        self._evicted_pending: set[int] = set()     # evicted, unlinked ids whose `segments` entry is 0
        self._recovered = False
        self._closed = False
        self._warn_fd_limit()

    # ------------------------------------------------------------------ public API

    @property
    def capacity_bytes(self) -> int:
        return self._capacity

    @property
    def lmdb_map_bytes(self) -> int:
        return self._map_bytes

    def footprint(self, header: BlockHeader) -> int:
        """The bytes the block's record takes on disk: its header area (at least one `align`) plus its
        payload padded to `align`. What a tenant's disk_capacity is charged per block."""
        return record_footprint(header.payload_len, header.encoded_len, self._align)

    def recover(self) -> RecoveryReport:
        """Rebuilds the in-memory state and the index from LMDB + segment files. Idempotent.

        The index is first validated in a child process (bounded in time); a damaged one (or one that
        raises lmdb.Error here) is renamed to index.lmdb.damaged-<unix ms> and rebuilt from the segment
        files: every valid record adopted, tombstones applied. With track_uploads, every adopted record
        gets an upload obligation. Raises OSError if the files cannot be read or repaired.
        """
        self._check_open()
        self._forget_segments()
        self._close_env()
        report = RecoveryReport()
        if not self._index_healthy():
            self._move_index_aside(report, "failed validation")
        try:
            self._open_env()
            self._recover_from_files(report)
        except lmdb.MapFullError:
            raise  # a map too small for the existing index: configuration, not damage
        except lmdb.Error as exc:
            self._close_env()
            moved = RecoveryReport()
            self._move_index_aside(moved, f"{type(exc).__name__}: {exc}")
            report = moved
            self._open_env()
            self._recover_from_files(report)
        self._recovered = True
        log.info("%s", report.summary())
        return report

    def entries(self) -> Iterator[DiskEntry]:
        """Everything indexed, in (namespace, key) order; pages through short read txns."""
        self._check_ready()
        after: bytes | None = None  # last key already yielded
        while True:
            page, after, more = self._page(self._db_blocks, after, _ENTRIES_PAGE, _decode_entry)
            yield from page
            if not more:
                return

    def _page(self, db, after: bytes | None, limit: int, decode) -> tuple[list, bytes | None, bool]:
        """Up to `limit` items decode(key, value) (None: skipped) from db after the key `after`, in one
        short read txn; returns (items, the last key read, whether more keys follow)."""
        items: list = []
        last = None
        with self._env.begin(db=db) as txn:
            cursor = txn.cursor()
            found = cursor.first() if after is None else cursor.set_range(after)
            if found and cursor.key() == after:
                found = cursor.next()
            while found and len(items) < limit:
                last = cursor.key()
                item = decode(last, cursor.value())
                if item is not None:
                    items.append(item)
                found = cursor.next()
        return items, last, found

    def get_entry(self, namespace: str, key: bytes) -> DiskEntry | None:
        self._check_ready()
        dbkey = _db_key(namespace, key)
        with self._env.begin(db=self._db_blocks) as txn:
            value = txn.get(dbkey)
        return None if value is None else _decode_entry(dbkey, value)

    def contains(self, namespace: str, key: bytes) -> bool:
        return self.get_entry(namespace, key) is not None

    def write_batch(self, blocks: list[tuple[BlockHeader, memoryview]], upload: Sequence[bool] | None = None
                    ) -> tuple[list[DiskEntry], list[DiskEntry]]:
        """Durably writes and indexes blocks; returns (entry per input in order, evicted entries).

        Already-indexed keys (and repeats within the batch) are not rewritten: their existing entry is
        returned, unless the eviction this batch needs removes that copy, then it is written again.
        Evicted entries are the blocks no longer on disk after the call (never a block of this batch).
        A payload view may be longer than payload_len (an arena slot); only payload_len bytes are read.

        upload: one bool per block; True records an upload obligation for the block's key in the same
        LMDB txn that indexes it (an already-indexed block gets it in a txn of its own), before return.
        New obligations are ordered by the first upload flag of their key in the batch; one that
        already exists for the key is kept (with its original age).

        Raises CorruptBlock if a payload does not match its header, ValueError on malformed input,
        OSError(ENOSPC) if the batch cannot fit in capacity (segments with open obligations cannot be
        evicted), before any I/O of the batch itself (compaction, which copies protected blocks out of a
        segment before evicting it, may have written, indexed and evicted by then, and the store reads
        what was evicted from the error's `evicted`). On a failure after this point nothing of
        the batch is indexed and the segment files are rolled back; if segments had been evicted by then,
        BatchFailed (an OSError with the cause's errno) lists the evicted blocks, otherwise the cause
        propagates unchanged. A full LMDB map fails the batch with OSError(ENOSPC).
        """
        self._check_ready()
        wanted = _upload_keys(blocks, upload)
        results: list[DiskEntry | None] = [None] * len(blocks)
        first_index: dict[bytes, int] = {}
        fresh: list[int] = []      # indexes into blocks to write
        existing: list[int] = []   # indexes whose key is already indexed
        with self._env.begin(db=self._db_blocks) as txn:
            for i, (header, _) in enumerate(blocks):
                dbkey = _db_key(header.namespace, header.key)
                if dbkey in first_index:
                    continue
                first_index[dbkey] = i
                value = txn.get(dbkey)
                if value is None:
                    fresh.append(i)
                else:
                    results[i] = _decode_entry(dbkey, value)
                    existing.append(i)
        views = {i: _byte_view(blocks[i][1]) for i in fresh}
        for i in fresh:
            _check_payload(blocks[i][0], views[i])
        evicted: list[DiskEntry] = []
        while fresh:
            sizes = [self._record_bytes(blocks[i][0].payload_len, blocks[i][0].encoded_len) for i in fresh]
            try:
                if self._compact(sizes, evicted):
                    # Compaction moved (or quarantined) blocks: existing entries of the batch may be stale.
                    for i in existing:
                        results[i] = self.get_entry(blocks[i][0].namespace, blocks[i][0].key)
                placements, evict_ids = self._plan(sizes)
            except Exception as exc:
                if not evicted:
                    raise
                raise _failed(evicted, exc) from exc
            # An existing copy that this very batch evicts (or that compaction dropped) must be written
            # again, or the caller would be told a block is on disk that is not.
            doomed = [i for i in existing if results[i] is None or results[i].segment in evict_ids]
            if not doomed:
                kept = [results[i] for i in existing]
                try:
                    evicted += self._evict(evict_ids)
                    records = [(blocks[i][0], views[i], 0) for i in fresh]
                    written = self._append(records, placements,
                                           lambda txn, entries, pins: self._index_blocks(
                                               txn, entries, kept, wanted, pins))
                except Exception as exc:
                    if not evicted and not isinstance(exc, BatchFailed):
                        raise
                    raise _failed(evicted, exc) from exc
                for i, entry in zip(fresh, written, strict=True):
                    results[i] = entry
                break
            for i in doomed:
                views[i] = _byte_view(blocks[i][1])
                _check_payload(blocks[i][0], views[i])
                results[i] = None
            existing = [i for i in existing if results[i] is not None]
            fresh = sorted(fresh + doomed)
        if not fresh and wanted:
            kept = [results[i] for i in existing]
            self._transact(lambda txn, pins: self._index_blocks(txn, [], kept, wanted, pins))
        for i, (header, _) in enumerate(blocks):
            if results[i] is None:
                results[i] = results[first_index[_db_key(header.namespace, header.key)]]
        assert all(entry is not None for entry in results)
        # Blocks of this batch are on disk on return, so none of them is reported as evicted.
        evicted = [entry for entry in evicted if _db_key(entry.namespace, entry.key) not in first_index]
        return results, evicted  # type: ignore[return-value]

    def read_into(self, entry: DiskEntry, dest: memoryview) -> bool:
        """Reads and verifies entry's payload into dest[:entry.length]; False if gone or corrupt.

        May also overwrite dest up to align_up(entry.length, align) (the padding is read in place).
        A block that fails verification is quarantined (its upload obligation is dropped: the bytes
        cannot be uploaded); one evicted/removed meanwhile is just a miss.
        """
        self._check_ready()
        dest = _byte_view(dest)
        if dest.readonly:
            raise ValueError("dest must be writable")
        if len(dest) < entry.length:
            raise ValueError(f"dest holds {len(dest)} bytes, entry needs {entry.length}")
        segment = self._acquire(entry.segment)
        if segment is None:
            moved = self._moved(entry)
            if moved is None:
                return False  # evicted meanwhile: a miss, not corruption
            entry, segment = moved
        try:
            problem = self._read_verified(segment, entry, dest)
        finally:
            self._release(segment)
        if problem is None:
            return True
        self._quarantine(entry, problem)
        return False

    def _moved(self, entry: DiskEntry) -> tuple[DiskEntry, _Segment] | None:
        """The same block's current entry and segment (acquired) when compaction moved it out of the
        entry's segment, evicted since; None if it is gone. A few tries: it may move again meanwhile."""
        for _ in range(3):
            current = self.get_entry(entry.namespace, entry.key)
            if current is None or current.header() != entry.header():
                return None
            segment = self._acquire(current.segment)
            if segment is not None:
                return current, segment
        return None

    def remove(self, namespace: str, key: bytes) -> bool:
        """Un-indexes one block (durably) and drops its upload obligation; False if it was not indexed.

        Appends a tombstone record (fdatasync'ed) before the index txn, so that a rebuild of the index
        from the segment files does not resurrect the block. Its space is reclaimed by eviction.
        """
        self._check_ready()
        dbkey = _db_key(namespace, key)
        if self.get_entry(namespace, key) is None:
            return False
        header = BlockHeader(namespace, bytes(key), b"", 0, _EMPTY_CHECKSUM, _now_ms())
        return self._append_tombstone(header, FLAG_TOMBSTONE, [dbkey]) == 1

    def remove_namespace(self, namespace: str) -> int:
        """Un-indexes every block of namespace (durably, one tombstone record); returns how many."""
        self._check_ready()
        prefix = _db_key(namespace, b"")
        with self._env.begin() as txn:
            if not _keys_with_prefix(txn, self._db_blocks, prefix, limit=1):
                return 0
        header = BlockHeader(namespace, _NAMESPACE_TOMBSTONE_KEY, b"", 0, _EMPTY_CHECKSUM, _now_ms())
        return self._append_tombstone(header, FLAG_NAMESPACE_TOMBSTONE, None)

    def pending_uploads(self, after: bytes | None = None, limit: int = 1024
                        ) -> tuple[list[tuple[str, bytes]], bytes | None]:
        """A page of at most `limit` open upload obligations, oldest first, as (namespace, key).

        Returns (page, cursor): pass cursor as `after` for the next page; None means there is no more.
        A cursor is opaque and valid until the next recover(). Every returned key is indexed at the
        moment of the read txn.
        """
        self._check_ready()
        if limit < 1:
            raise ValueError(f"limit must be >= 1, got {limit}")
        if after is not None and len(after) != _SEG_KEY.size:
            raise ValueError("after must be a cursor returned by pending_uploads")
        page, last, more = self._page(self._db_uploads, after, limit, _owed_block)
        return page, (last if more else None)

    def settle_uploads(self, ids: list[tuple[str, bytes]]) -> None:
        """Durably removes the obligations of these (namespace, key)s (unknown ones are ignored); their
        segments become evictable again once no obligation is left in them."""
        self._check_ready()

        def settle(txn: lmdb.Transaction, pins: dict[int, int]) -> None:
            for namespace, key in ids:
                dbkey = _db_key(namespace, key)
                value = txn.get(dbkey, db=self._db_blocks)
                segment = None if value is None else _decode_entry(dbkey, value).segment
                self._release_obligation(txn, dbkey, segment, pins)
        if ids:
            self._transact(settle)

    def upload_backlog(self) -> int:
        """Number of open upload obligations (an LMDB stat: cheap)."""
        self._check_ready()
        with self._env.begin() as txn:
            return txn.stat(self._db_uploads)["entries"]

    def quarantined_count(self) -> int:
        self._check_ready()
        with self._env.begin() as txn:
            return txn.stat(self._db_quarantine)["entries"]

    def used_bytes(self) -> int:
        """Sum of segment file sizes (including a batch in flight)."""
        with self._segment_lock:
            return sum(segment.size for segment in self._segments.values())

    def close(self) -> None:
        """Closes LMDB and every segment fd. No other call may be in flight."""
        if self._closed:
            return
        self._closed = True
        self._forget_segments()
        self._close_env()

    def __enter__(self) -> DiskTier:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ write path

    def _area(self, header_len: int) -> int:
        """The header area of a record whose header is header_len bytes."""
        return max(self._header_area, align_up(header_len, self._align))

    def _record_bytes(self, payload_len: int, header_len: int = 0) -> int:
        size = record_footprint(payload_len, header_len, self._align)
        if self._align + size > self._segment_bytes:
            raise ValueError(f"record of {size} bytes does not fit in a {self._segment_bytes}-byte segment")
        return size

    def _is_full(self, segment: _Segment) -> bool:
        return segment.size + self._header_area + self._align > self._segment_bytes

    def _place(self, sizes: list[int], active: _Segment | None) -> list[tuple[int, int]]:
        """(segment ordinal, offset) per record: ordinal -1 is `active`, 0.. are new segments."""
        ordinal, end = (-1, active.size) if active is not None else (0, self._align)
        placements = []
        for size in sizes:
            if end + size > self._segment_bytes and end > self._align:
                ordinal, end = ordinal + 1, self._align
            placements.append((ordinal, end))
            end += size
        return placements

    def _plan(self, sizes: list[int]) -> tuple[list[tuple[int, int]], list[int]]:
        """Places the batch and picks the oldest evictable segments to evict so that it fits in capacity.

        If evicting every evictable sealed segment is not enough, seals the active one early so that it
        becomes evictable too (this keeps small capacities, below two segments, working).
        """
        used = self.used_bytes()
        attempts = [self._active, None] if self._active is not None else [None]
        for active in attempts:
            placements = self._place(sizes, active)
            new_segments = placements[-1][0] + 1
            growth = sum(sizes) + new_segments * self._align
            keep = active.id if active is not None and placements[0][0] < 0 else None
            evict, remaining, older_kept = [], used, False
            for sid in sorted(self._segments):
                if remaining + growth <= self._capacity:
                    break
                if sid != keep and self._evictable(sid, older_kept):
                    evict.append(sid)
                    remaining -= self._segments[sid].size
                else:
                    older_kept = True
            if remaining + growth <= self._capacity:
                return placements, evict
        pinned = sum(self._segments[sid].size for sid in self._segments if self._pinned.get(sid))
        raise OSError(errno.ENOSPC, f"batch of {sum(sizes)} bytes cannot fit in capacity {self._capacity} "
                                    f"({pinned} bytes held by segments with pending uploads)")

    # ------------------------------------------------------------------ compaction

    def _compact(self, sizes: list[int], evicted: list[DiskEntry]) -> bool:
        """Makes room for records of `sizes` without dropping protected blocks: while the eviction
        the batch needs (oldest evictable segments first) would take a segment holding live protected
        blocks, copies them forward (durable and re-indexed before anything is dropped), then evicts
        that segment and the older ones planned with it. Appends what was dropped to `evicted`;
        returns whether anything was moved or dropped. Raises OSError(ENOSPC) when the copies would
        pass compact_bytes for this batch (what was done stays done: the next batch goes on)."""
        if self._protect is None:
            return False
        budget, blocks, passes = self._compact_bytes, 0, 0
        while True:
            _placements, evict_ids = self._plan(sizes)
            victim, keep = next(((sid, keep) for sid in evict_ids
                                 if (keep := self._protected_entries(sid))), (None, []))
            if victim is None:
                break
            need = sum(self.footprint(entry.header()) for entry in keep)
            if need > budget:
                self._note_compaction(blocks, passes)
                raise OSError(errno.ENOSPC, f"compaction bound reached: copying {len(keep)} protected blocks "
                                            f"({need} bytes) out of segment {victim} would pass "
                                            f"{self._compact_bytes} bytes for this batch; retry")
            budget -= need
            if self._active is not None and self._active.id == victim:
                self._active = None  # sealed: the copies must not go into the segment being dropped
            lost = self._copy_forward(keep)
            evicted += lost
            evicted += self._evict(evict_ids[:evict_ids.index(victim) + 1])
            blocks += len(keep) - len(lost)
            passes += 1
        self._note_compaction(blocks, passes)
        return passes > 0

    def _protected_entries(self, sid: int) -> list[DiskEntry]:
        """The live blocks of segment sid that protect() keeps."""
        prefix = _SEG_KEY.pack(sid)
        keep = []
        with self._env.begin() as txn:
            for link in _keys_with_prefix(txn, self._db_by_segment, prefix):
                dbkey = link[_SEG_KEY.size:]
                value = txn.get(dbkey, db=self._db_blocks)
                if value is None:
                    continue
                entry = _decode_entry(dbkey, value)
                if self._protect(entry.namespace):
                    keep.append(entry)
        return keep

    def _copy_forward(self, entries: list[DiskEntry]) -> list[DiskEntry]:
        """Re-appends the blocks (same header: every fact kept) to the active segment, in groups of at
        most _COPY_CHUNK bytes: each group is fdatasync'ed, then re-indexed at its new place in one
        txn, so the old copy stays indexed until the new one is durable. Returns the blocks dropped
        instead: a copy that fails verification is quarantined, as a read would."""
        lost: list[DiskEntry] = []
        group: list[DiskEntry] = []
        size = 0
        for entry in entries + [None]:
            if entry is not None and (not group or size + align_up(entry.length, self._align) <= _COPY_CHUNK):
                group.append(entry)
                size += align_up(entry.length, self._align)
                continue
            lost += self._copy_group(group)
            group, size = ([entry], align_up(entry.length, self._align)) if entry is not None else ([], 0)
        return lost

    def _copy_group(self, entries: list[DiskEntry]) -> list[DiskEntry]:
        if not entries:
            return []
        offsets = list(itertools.accumulate((align_up(e.length, self._align) for e in entries), initial=0))
        buffer = memoryview(mmap.mmap(-1, max(offsets[-1], self._align)))
        records, moved, lost = [], [], []
        for entry, at in zip(entries, offsets):
            view = buffer[at:at + align_up(entry.length, self._align)]
            segment = self._acquire(entry.segment)
            assert segment is not None, "compacting a segment that is gone"
            try:
                problem = self._read_verified(segment, entry, view)
            finally:
                self._release(segment)
            if problem is not None:
                self._quarantine(entry, problem)
                lost.append(entry)
                continue
            records.append((entry.header(), view, 0))
            moved.append(entry)
        if not records:
            return lost
        placements = self._place([self._record_bytes(h.payload_len, h.encoded_len) for h, _, _ in records],
                                 self._active)

        def index(txn: lmdb.Transaction, copies: list[DiskEntry], pins: dict[int, int]) -> None:
            for old, new in zip(moved, copies, strict=True):
                dbkey = _db_key(old.namespace, old.key)
                value = txn.get(dbkey, db=self._db_blocks)
                if value is None or _decode_entry(dbkey, value) != old:
                    continue  # quarantined by a reader meanwhile: the copy stays dead bytes
                txn.put(dbkey, _encode_value(new), db=self._db_blocks)
                txn.delete(_SEG_KEY.pack(old.segment) + dbkey, db=self._db_by_segment)
                txn.put(_SEG_KEY.pack(new.segment) + dbkey, b"", db=self._db_by_segment)
                if txn.get(dbkey, db=self._db_upload_keys) is not None:  # the obligation moves with it
                    pins[old.segment] = pins.get(old.segment, 0) - 1
                    pins[new.segment] = pins.get(new.segment, 0) + 1
        self._append(records, placements, index)
        return lost

    def _note_compaction(self, blocks: int, passes: int) -> None:
        """Counts a compaction and logs it, one line a minute at most (with what the minute held)."""
        if not passes:
            return
        self.compacted_blocks += blocks
        self.compaction_passes += passes
        last, blocks_since, passes_since = self._compaction_log
        blocks_since, passes_since = blocks_since + blocks, passes_since + passes
        now = time.monotonic()
        if now - last < _COMPACTION_LOG_S:
            self._compaction_log = (last, blocks_since, passes_since)
            return
        log.info("disk compaction: %d protected blocks copied forward out of %d segments before their "
                 "eviction (%d blocks in total)", blocks_since, passes_since, self.compacted_blocks)
        self._compaction_log = (now, 0, 0)

    def _evictable(self, sid: int, older_kept: bool) -> bool:
        """Open obligations pin a segment. Tombstones must outlive the records they kill, which lie in
        the same or older segments: a segment holding tombstones goes only once no older one stays."""
        if self._pinned.get(sid):
            return False
        return not (older_kept and sid in self._tombstone_segments)

    def _append(self, records: list[_Record], placements: list[tuple[int, int]],
                index: Callable[[lmdb.Transaction, list[DiskEntry], dict[int, int]], T]) -> T:
        """Writes records at placements, makes them durable, then commits index(txn, entries, pins) with
        the new committed ends in one LMDB txn. On any exception the segment files are rolled back."""
        previous_active = self._active
        if placements[0][0] >= 0:
            self._active = None  # sealed: the batch starts a new segment
        created: list[_Segment] = []
        bases = list(itertools.accumulate((self._area(header.encoded_len) + self._align for header, _, _ in records),
                                          initial=0))
        arena = mmap.mmap(-1, bases[-1])  # header areas + O_DIRECT tails
        try:
            runs: dict[int, tuple[_Segment, int, list]] = {}  # ordinal -> (segment, start, iovecs)
            entries = []
            for n, ((header, view, flags), (ordinal, offset)) in enumerate(zip(records, placements,
                                                                             strict=True)):
                if ordinal not in runs:
                    segment = previous_active if ordinal < 0 else self._create_segment(created)
                    assert segment is not None and segment.size == offset
                    runs[ordinal] = (segment, offset, [])
                segment, _, iovecs = runs[ordinal]
                iovecs.extend(self._record_iovecs(header, view, flags, arena, bases[n]))
                segment.size = offset + self._record_bytes(header.payload_len, header.encoded_len)
                entries.append(DiskEntry(header.namespace, bytes(header.key), bytes(header.parent),
                                         header.payload_len, header.payload_checksum,
                                         header.created_unix_ms, segment.id, offset, header.token_ids,
                                         header.origin))
            for segment, start, iovecs in runs.values():
                self._assert_writable(segment, start, iovecs)
                self._pwritev_all(segment.fd, iovecs, start)
            for segment, _, _ in runs.values():
                self._fs.fdatasync(segment.fd)
            if created:
                self._fs.fsync_dir(self._segment_dir)  # the new files' names must survive a crash
            return self._commit(entries, [segment for segment, _, _ in runs.values()], index)
        except BaseException:
            self._rollback(previous_active, created)
            raise

    def _append_tombstone(self, header: BlockHeader, flags: int, dbkeys: list[bytes] | None) -> int:
        """Appends one tombstone record, then un-indexes dbkeys (None: every key of the header's
        namespace) in the txn that commits it. Returns how many blocks were un-indexed."""
        placements = self._place([self._record_bytes(0)], self._active)
        target = _db_key(header.namespace, header.key if dbkeys is not None else b"")

        def index(txn: lmdb.Transaction, entries: list[DiskEntry], pins: dict[int, int]) -> int:
            (at,) = entries
            txn.put(_POSITION_KEY.pack(at.segment, at.offset), bytes([flags]) + target, db=self._db_tombstones)
            targets = dbkeys if dbkeys is not None else _keys_with_prefix(txn, self._db_blocks, target)
            return sum(self._unindex(txn, dbkey, pins) is not None for dbkey in targets)
        removed = self._append([(header, memoryview(b""), flags)], placements, index)
        self._tombstone_segments.add(self._active.id)
        return removed

    def _index_blocks(self, txn: lmdb.Transaction, entries: list[DiskEntry], kept: list[DiskEntry],
                      wanted: list[bytes], pins: dict[int, int]) -> list[DiskEntry]:
        """Indexes new entries; gives the keys in wanted (new or kept entries) obligations, in order."""
        located = {}
        for entry in entries:
            dbkey = _db_key(entry.namespace, entry.key)
            txn.put(dbkey, _encode_value(entry), db=self._db_blocks)
            txn.put(_SEG_KEY.pack(entry.segment) + dbkey, b"", db=self._db_by_segment)
            located[dbkey] = entry.segment
        located.update((_db_key(entry.namespace, entry.key), entry.segment) for entry in kept)
        for dbkey in wanted:
            # A kept block may have been quarantined by a reader since the batch looked it up: an
            # obligation must never outlive its block's index entry.
            if txn.get(dbkey, db=self._db_blocks) is not None:
                self._oblige(txn, dbkey, located[dbkey], pins)
        return entries

    def _record_iovecs(self, header: BlockHeader, view: memoryview, flags: int, arena: mmap.mmap,
                       base: int) -> list:
        """Header area + payload padded with zeros to align, zero-copy where the alignment allows.
        arena[base:] has room for the header area and one `align` of tail."""
        align = self._align
        area = self._area(header.encoded_len)
        head = memoryview(arena)[base:base + area]
        encoded = _encode_header(header, flags)
        head[:len(encoded)] = encoded
        # Exactly what goes to disk decodes to the caller's header and kind.
        assert decode_header(head) == header and _header_flags(head) == flags
        length = header.payload_len
        body = length // align * align
        tail = length - body
        iovecs = [head]
        if self._o_direct and body and _address(view) % self._mem_align:
            bounce = mmap.mmap(-1, align_up(length, align))  # unaligned caller buffer: copy once
            bounce[:length] = view[:length]
            iovecs.append(memoryview(bounce))
        else:
            if body:
                iovecs.append(view[:body])
            if tail and self._o_direct:
                pad = memoryview(arena)[base + area:base + area + align]
                pad[:tail] = view[body:length]
                iovecs.append(pad)
            elif tail:
                iovecs += [view[body:length], self._zeros[:align - tail]]
        assert sum(len(iov) for iov in iovecs) == self._record_bytes(length, header.encoded_len)
        return iovecs

    def _assert_writable(self, segment: _Segment, start: int, iovecs: list) -> None:
        assert start % self._align == 0 and start >= max(self._align, segment.committed_end)
        assert start + sum(len(iov) for iov in iovecs) == segment.size
        if self._o_direct:
            for iov in iovecs:
                assert len(iov) % self._align == 0 and _address(iov) % self._mem_align == 0

    def _create_segment(self, created: list[_Segment]) -> _Segment:
        sid = self._next_id
        self._next_id += 1
        path = self._segment_path(sid)
        fd = self._fs.open(path, self._open_flags | os.O_CREAT | os.O_EXCL, 0o600)
        segment = _Segment(sid, path, fd, size=0, committed_end=self._align)
        created.append(segment)  # from here on, rollback deletes it
        with self._segment_lock:
            self._segments[sid] = segment
        self._active = segment
        self._pwritev_all(fd, [self._segment_header(sid)], 0)
        segment.size = self._align
        return segment

    def _commit(self, entries: list[DiskEntry], touched: list[_Segment],
                index: Callable[[lmdb.Transaction, list[DiskEntry], dict[int, int]], T]) -> T:
        def work(txn: lmdb.Transaction, pins: dict[int, int]) -> T:
            result = index(txn, entries, pins)
            for segment in touched:
                txn.put(_SEG_KEY.pack(segment.id), _U64.pack(segment.size), db=self._db_segments)
            for sid in self._evicted_pending:
                txn.delete(_SEG_KEY.pack(sid), db=self._db_segments)
            return result
        result = self._transact(work)
        self._evicted_pending.clear()
        for segment in touched:
            segment.committed_end = segment.size
        return result

    def _transact(self, work: Callable[[lmdb.Transaction, dict[int, int]], T]) -> T:
        """Runs work(txn, pins) in one LMDB write txn. Obligation count changes that work records in
        pins (segment -> delta) are applied only once the txn committed. A full map is ENOSPC."""
        pins: dict[int, int] = {}
        with self._txn_lock:
            try:
                with self._env.begin(write=True) as txn:
                    result = work(txn, pins)
            except lmdb.MapFullError as exc:
                raise OSError(errno.ENOSPC, f"LMDB index map of {self._map_bytes} bytes is full") from exc
            for sid, delta in pins.items():
                count = self._pinned.get(sid, 0) + delta
                assert count >= 0, "more obligations settled than recorded"
                if count:
                    self._pinned[sid] = count
                else:
                    self._pinned.pop(sid, None)
        return result

    def _oblige(self, txn: lmdb.Transaction, dbkey: bytes, segment: int, pins: dict[int, int]) -> bool:
        """Records an upload obligation for dbkey (indexed in segment) unless it has one already."""
        if txn.get(dbkey, db=self._db_upload_keys) is not None:
            return False
        seq = _SEG_KEY.pack(self._next_seq)
        self._next_seq += 1
        assert txn.put(seq, dbkey, db=self._db_uploads, overwrite=False), "sequence number reused"
        txn.put(dbkey, seq, db=self._db_upload_keys)
        pins[segment] = pins.get(segment, 0) + 1
        return True

    def _release_obligation(self, txn: lmdb.Transaction, dbkey: bytes, segment: int | None,
                            pins: dict[int, int]) -> bool:
        seq = txn.pop(dbkey, db=self._db_upload_keys)
        if seq is None:
            return False
        txn.delete(seq, db=self._db_uploads)
        if segment is not None:
            pins[segment] = pins.get(segment, 0) - 1
        return True

    def _rollback(self, previous_active: _Segment | None, created: list[_Segment]) -> None:
        """Undoes a failed append on disk: new segments deleted, the active one cut to committed_end."""
        for segment in created:
            with self._segment_lock:
                self._segments.pop(segment.id, None)
            try:
                self._fs.close(segment.fd)
                self._fs.remove(segment.path)
            except OSError:
                log.exception("rollback: cannot delete segment %s", segment.path)
        with self._segment_lock:
            alive = previous_active is not None and previous_active.id in self._segments
        self._active = previous_active if alive else None
        if self._active is not None and self._active.size != self._active.committed_end:
            try:
                self._fs.ftruncate(self._active.fd, self._active.committed_end)
            except OSError:
                # Bytes past committed_end are never trusted; the next append overwrites them.
                log.exception("rollback: cannot truncate segment %s", self._active.path)
            self._active.size = self._active.committed_end

    def _evict(self, ids: list[int]) -> list[DiskEntry]:
        """Un-indexes whole segments (blocks, tombstones) and marks them evicted (committed_end 0) in
        one txn, then drops them from the in-memory table (new reads miss) and unlinks their files.
        Returns the evicted blocks. Raises BatchFailed (listing them) if anything fails after the txn:
        the marker makes recovery finish the job."""
        if not ids:
            return []

        def work(txn: lmdb.Transaction, pins: dict[int, int]) -> list[DiskEntry]:
            evicted = []
            for sid in ids:
                assert not self._pinned.get(sid), "evicting a segment with open upload obligations"
                prefix = _SEG_KEY.pack(sid)
                for link in _keys_with_prefix(txn, self._db_by_segment, prefix):
                    dbkey = link[_SEG_KEY.size:]
                    value = txn.pop(dbkey, db=self._db_blocks)
                    assert value is not None, "by_segment links a block that is not indexed"
                    entry = _decode_entry(dbkey, value)
                    assert entry.segment == sid, "by_segment and blocks disagree"
                    txn.delete(link, db=self._db_by_segment)
                    evicted.append(entry)
                for key in _keys_with_prefix(txn, self._db_tombstones, prefix):
                    txn.delete(key, db=self._db_tombstones)
                txn.put(prefix, _U64.pack(_EVICTED), db=self._db_segments)
            return evicted
        evicted = self._transact(work)
        try:
            self._drop_segments(ids)
        except Exception as exc:
            raise BatchFailed(evicted, exc) from exc
        log.info("evicted %d segments (%d blocks) to stay within %d bytes", len(ids), len(evicted),
                 self._capacity)
        return evicted

    def _drop_segments(self, ids: list[int]) -> None:
        """Forgets evicted segments, closes their fds (or leaves that to the last reader) and unlinks
        their files. The evicted marker is cleared by the next commit only for files surely gone."""
        closing = []
        for sid in ids:
            with self._segment_lock:
                segment = self._segments.pop(sid)
                segment.doomed = True
                if segment.refs == 0:
                    closing.append(segment)
            if self._active is segment:
                self._active = None
            self._tombstone_segments.discard(sid)
        failure: OSError | None = None
        for segment in closing:
            try:
                self._fs.close(segment.fd)
            except OSError as exc:
                failure = failure or exc
        unlinked = []
        for sid in ids:
            try:
                self._fs.remove(self._segment_path(sid))  # open readers keep reading the unlinked file
                unlinked.append(sid)
            except OSError as exc:
                log.error("cannot delete evicted segment %d (recovery will): %s", sid, exc)
                failure = failure or exc
        self._fs.fsync_dir(self._segment_dir)
        self._evicted_pending.update(unlinked)
        if failure is not None:
            raise failure

    def _unindex(self, txn: lmdb.Transaction, dbkey: bytes, pins: dict[int, int]) -> DiskEntry | None:
        """Removes a block from blocks/by_segment and drops its upload obligation."""
        value = txn.pop(dbkey, db=self._db_blocks)
        if value is None:
            return None
        entry = _decode_entry(dbkey, value)
        txn.delete(_SEG_KEY.pack(entry.segment) + dbkey, db=self._db_by_segment)
        self._release_obligation(txn, dbkey, entry.segment, pins)
        return entry

    # ------------------------------------------------------------------ read path

    def _acquire(self, sid: int) -> _Segment | None:
        with self._segment_lock:
            segment = self._segments.get(sid)
            if segment is not None:
                segment.refs += 1
            return segment

    def _release(self, segment: _Segment) -> None:
        with self._segment_lock:
            segment.refs -= 1
            assert segment.refs >= 0
            close_now = segment.doomed and segment.refs == 0
        if close_now:
            self._fs.close(segment.fd)

    def _read_verified(self, segment: _Segment, entry: DiskEntry, dest: memoryview) -> str | None:
        """One preadv of header area + payload; returns why the record is bad, or None."""
        length = entry.length
        padded = align_up(length, self._align)
        expected = entry.header()
        area = self._area(expected.encoded_len)
        head, scratch = self._thread_buffers()
        head = head[:area]
        bounce = None
        if padded == 0:
            iovecs = [head]
        elif len(dest) >= padded and (not self._o_direct or _address(dest) % self._mem_align == 0):
            iovecs = [head, dest[:padded]]
        elif not self._o_direct:
            iovecs = [head, dest[:length], scratch[:padded - length]]
        else:
            bounce = mmap.mmap(-1, padded)
            iovecs = [head, memoryview(bounce)]
        try:
            got = self._preadv_all(segment.fd, iovecs, entry.offset)
        except OSError as exc:
            if exc.errno not in _READ_ERRNOS:
                raise
            return f"read error: {exc}"
        if got < area + padded:
            return f"short read: {got} of {area + padded} bytes"
        try:
            header = decode_header(head)
        except CorruptBlock as exc:
            return f"header: {exc}"
        if _header_flags(head) != 0:
            return f"not a block record (flags {_header_flags(head):#x})"
        if header != expected:
            return "header does not match the index entry"
        if bounce is not None:
            dest[:length] = memoryview(bounce)[:length]
        if checksum(dest[:length]) != entry.checksum:
            return "payload checksum mismatch"
        return None

    def _thread_buffers(self) -> tuple[memoryview, memoryview]:
        buffers = getattr(self._tls, "buffers", None)
        if buffers is None:
            buffers = (memoryview(mmap.mmap(-1, self._max_header_area)), memoryview(bytearray(self._align)))
            self._tls.buffers = buffers
        return buffers

    def _quarantine(self, entry: DiskEntry, reason: str) -> None:
        dbkey = _db_key(entry.namespace, entry.key)

        def work(txn: lmdb.Transaction, pins: dict[int, int]) -> tuple[bool, bool]:
            value = txn.get(dbkey, db=self._db_blocks)
            if value is None:
                return False, False  # removed or evicted meanwhile: nothing to quarantine
            if _decode_entry(dbkey, value) != entry:
                return False, False  # the caller's entry is stale (re-written meanwhile): not judged
            obliged = txn.get(dbkey, db=self._db_upload_keys) is not None
            self._unindex(txn, dbkey, pins)
            txn.put(dbkey, _U64.pack(_now_ms()) + reason.encode(), db=self._db_quarantine)
            return True, obliged
        done, obliged = self._transact(work)
        if done:
            log.warning("quarantined %s/%s (segment %d offset %d): %s%s", entry.namespace, entry.key.hex(),
                        entry.segment, entry.offset, reason,
                        "; its pending upload is dropped" if obliged else "")

    # ------------------------------------------------------------------ index life cycle

    def _open_env(self) -> None:
        self._env = lmdb.open(self._index_path, subdir=True, map_size=self._map_bytes, sync=True,
                              metasync=True, max_dbs=len(_DB_NAMES) + 1, max_readers=1024, readahead=False)
        dbs = [self._env.open_db(name) for name in _DB_NAMES]
        (self._db_blocks, self._db_by_segment, self._db_segments, self._db_quarantine, self._db_uploads,
         self._db_upload_keys, self._db_tombstones) = dbs

    def _close_env(self) -> None:
        if self._env is not None:
            self._env.close()
            self._env = None

    def _index_healthy(self) -> bool:
        """Walks the whole index in a child process: a crash (SIGBUS on a truncated data.mdb), an
        lmdb error (non-zero exit) or running past the deadline means damaged. No index is healthy."""
        data = os.path.join(self._index_path, "data.mdb")
        if not os.path.exists(data):
            return True
        deadline = _INDEX_CHECK_BASE_S + os.path.getsize(data) / _INDEX_CHECK_BYTES_PER_S
        command = [sys.executable, "-I", "-c", _INDEX_CHECK_SCRIPT, self._index_path]
        try:
            child = subprocess.run(command, capture_output=True, timeout=deadline, check=False)
        except subprocess.TimeoutExpired:  # the child has been killed
            log.error("disk index %s: validation did not finish within %.0f s", self._index_path, deadline)
            return False
        if child.returncode == 0:
            return True
        how = f"exit status {child.returncode}" if child.returncode > 0 else \
            f"killed by {signal.Signals(-child.returncode).name}"
        detail = child.stderr.decode(errors="replace").strip().splitlines()[-1:] or [""]
        log.error("disk index %s failed validation (%s) %s", self._index_path, how, detail[0])
        return False

    def _move_index_aside(self, report: RecoveryReport, reason: str) -> None:
        stamp = _now_ms()
        while os.path.exists(f"{self._index_path}.damaged-{stamp}"):
            stamp += 1
        target = f"{self._index_path}.damaged-{stamp}"
        os.rename(self._index_path, target)
        self._fs.fsync_dir(self._directory)
        report.index_moved_aside = target
        log.error("disk index is damaged (%s): moved %s to %s; rebuilding it from the segment files",
                  reason, self._index_path, target)

    # ------------------------------------------------------------------ recovery

    def _forget_segments(self) -> None:
        with self._segment_lock:
            segments, self._segments = list(self._segments.values()), {}
        for segment in segments:
            assert segment.refs == 0, "close/recover with reads in flight"
            self._fs.close(segment.fd)
        self._active = None

    def _recover_from_files(self, report: RecoveryReport) -> None:
        """One recovery pass over the open index and the segment files (see docs/disk-format.md)."""
        files = self._list_segment_files()
        segments: dict[int, _Segment] = {}
        try:
            with self._txn_lock, self._env.begin(write=True) as txn:
                committed = self._load_segment_table(txn)
                self._next_id = max([0, *files, *committed]) + 1
                self._next_seq = _last_seq(txn, self._db_uploads) + 1
                bad_headers = self._open_segments(files, committed, segments, report)
                fit_end = self._check_index(txn, segments, report)
                scan_buffer = memoryview(mmap.mmap(-1, max(_SCAN_CHUNK, self._max_header_area)))
                for segment in sorted(segments.values(), key=lambda s: s.id):
                    self._recover_segment(txn, segment, committed.get(segment.id),
                                          fit_end.get(segment.id, self._align), segment.id in bad_headers,
                                          scan_buffer, report)
                for sid in [sid for sid, segment in segments.items() if segment.fd < 0]:
                    del segments[sid]  # deleted: a bad header and not one record
                txn.drop(self._db_segments, delete=False)
                for segment in segments.values():
                    segment.committed_end = segment.size
                    txn.put(_SEG_KEY.pack(segment.id), _U64.pack(segment.size), db=self._db_segments)
                tombstone_segments = self._check_tombstones(txn, segments)
                pinned = self._check_uploads(txn, report)
            self._fs.fsync_dir(self._segment_dir)  # deleted files stay deleted
        except BaseException:
            for segment in segments.values():
                if segment.fd >= 0:
                    self._fs.close(segment.fd)
            raise
        with self._segment_lock:
            self._segments = segments
        with self._txn_lock:
            self._pinned = pinned
        self._tombstone_segments = tombstone_segments
        self._evicted_pending.clear()
        self._active = None
        if segments:
            top = segments[max(segments)]
            if not self._is_full(top):
                self._active = top
        report.segments = len(segments)

    def _list_segment_files(self) -> dict[int, str]:
        files = {}
        for name in self._fs.listdir(self._segment_dir):
            match = _SEGMENT_NAME.match(name)
            if match is None:
                log.warning("ignoring unexpected file %s in %s", name, self._segment_dir)
                continue
            files[int(match.group(1), 16)] = os.path.join(self._segment_dir, name)
        return files

    def _load_segment_table(self, txn: lmdb.Transaction) -> dict[int, int]:
        table = {}
        for key, value in txn.cursor(db=self._db_segments):
            if len(key) == _SEG_KEY.size and len(value) == _U64.size:
                table[_SEG_KEY.unpack(key)[0]] = _U64.unpack(value)[0]
            else:
                log.warning("ignoring malformed segments entry %r", key)
        return table

    def _open_segments(self, files: dict[int, str], committed: dict[int, int],
                       segments: dict[int, _Segment], report: RecoveryReport) -> set[int]:
        """Opens every segment file into `segments`, deleting evicted ones and ones too short to hold a
        record. Returns the ids whose segment header fails verification: their records still count
        (the id comes from the file name); the header is rewritten once the scan found a record."""
        bad = set()
        for sid, path in sorted(files.items()):
            if committed.get(sid) == _EVICTED:
                log.info("finishing eviction of segment %d", sid)
                self._fs.remove(path)
                continue
            fd = self._fs.open(path, self._open_flags)
            size = self._fs.size(fd)
            if size < self._align + self._header_area:
                log.warning("deleting segment %s: %d bytes, too short for a record", path, size)
                self._fs.close(fd)
                self._fs.remove(path)
                report.torn += 1
                continue
            if not self._segment_header_valid(fd, sid, size):
                log.warning("segment %s: invalid segment header, salvaging its records", path)
                bad.add(sid)
            segments[sid] = _Segment(sid, path, fd, size, committed_end=0)
        return bad

    def _check_index(self, txn: lmdb.Transaction, segments: dict[int, _Segment],
                     report: RecoveryReport) -> dict[int, int]:
        """Confirms `blocks` against the files, drops what points nowhere, rebuilds by_segment.

        Returns per segment the end of its last confirmed record: a known record boundary.
        """
        txn.drop(self._db_by_segment, delete=False)
        fit_end: dict[int, int] = {}
        drops = []
        for dbkey, value in txn.cursor(db=self._db_blocks):
            try:
                entry = _decode_entry(dbkey, value)
            except ValueError:
                drops.append(dbkey)
                continue
            segment = segments.get(entry.segment)
            end = entry.offset + self._area(entry.header().encoded_len) + align_up(entry.length, self._align)
            if segment is None or end > segment.size or entry.offset < self._align or \
                    entry.offset % self._align:
                drops.append(dbkey)
                continue
            report.indexed += 1
            report.bytes += entry.length
            fit_end[entry.segment] = max(fit_end.get(entry.segment, self._align), end)
            txn.put(_SEG_KEY.pack(entry.segment) + dbkey, b"", db=self._db_by_segment)
        for dbkey in drops:
            txn.delete(dbkey, db=self._db_blocks)
            report.uploads_dropped += self._release_obligation(txn, dbkey, None, {})
        if drops:
            log.warning("dropped %d index entries pointing at missing or truncated segments", len(drops))
        report.dropped_index_entries += len(drops)
        return fit_end

    def _recover_segment(self, txn: lmdb.Transaction, segment: _Segment, committed_end: int | None,
                         fit_end: int, header_bad: bool, scan_buffer: memoryview,
                         report: RecoveryReport) -> None:
        """Scans past the committed (or confirmed) end, adopting records and applying tombstones, and
        truncates the torn tail. A segment with a bad header is repaired, or deleted if it holds no
        record at all (then segment.fd is set to -1)."""
        if committed_end is not None and committed_end > segment.size:
            # Lost bytes the index had acknowledged (external truncation): keep what still fits, but
            # do not rescan, which could resurrect removed blocks.
            log.warning("segment %d is shorter (%d) than its committed end (%d)", segment.id,
                        segment.size, committed_end)
            end = fit_end
        else:
            valid_committed = committed_end is not None and committed_end >= self._align and \
                committed_end % self._align == 0
            start = max(fit_end, committed_end if valid_committed else self._align)
            end = self._salvage_scan(txn, segment, start, scan_buffer, report)
        if header_bad and end <= self._align:
            log.warning("deleting segment %s: invalid segment header and no valid record", segment.path)
            self._fs.close(segment.fd)
            self._fs.remove(segment.path)
            segment.fd = -1
            report.torn += 1
            return
        self._truncate(segment, end, report)
        if header_bad:
            self._pwritev_all(segment.fd, [self._segment_header(segment.id)], 0)
            self._fs.fdatasync(segment.fd)
            report.headers_repaired += 1
            log.warning("segment %s: segment header rewritten", segment.path)

    def _salvage_scan(self, txn: lmdb.Transaction, segment: _Segment, start: int,
                      scan_buffer: memoryview, report: RecoveryReport) -> int:
        """Walks records from start to the end of the file; returns the end of the last valid one.

        A bad record costs only itself: the scan moves on by the record's length when its header
        verifies (only the payload is bad), else in steps of align, to the next valid record. Bad
        stretches between valid records stay in place as dead bytes.
        """
        position, good_end, bad_from, damaged = start, start, None, False
        while position < segment.size:
            found = self._scan_record(segment, position, scan_buffer)
            if found is None or not found[3]:
                bad_from = position if bad_from is None else bad_from
                position += self._align if found is None else found[2]
                continue
            header, flags, size, _ = found
            if bad_from is not None:
                log.warning("segment %d: %d bad bytes at offset %d skipped", segment.id,
                            position - bad_from, bad_from)
                report.bad_regions += 1
                report.skipped_bytes += position - bad_from
                bad_from, damaged = None, True
            self._recover_record(txn, segment.id, position, header, flags, damaged, report)
            position += size
            good_end = position
        return good_end

    def _recover_record(self, txn: lmdb.Transaction, sid: int, position: int, header: BlockHeader,
                        flags: int, salvaged: bool, report: RecoveryReport) -> None:
        if flags in (FLAG_TOMBSTONE, FLAG_NAMESPACE_TOMBSTONE):
            self._apply_tombstone(txn, sid, position, header, flags, report)
            return
        if flags != 0:
            log.warning("segment %d offset %d: record with unknown flags %#x ignored", sid, position, flags)
            return
        dbkey = _db_key(header.namespace, header.key)
        value = txn.get(dbkey, db=self._db_blocks)
        if value is None:
            entry = DiskEntry(header.namespace, header.key, header.parent, header.payload_len,
                              header.payload_checksum, header.created_unix_ms, sid, position, header.token_ids,
                              header.origin)
            txn.put(dbkey, _encode_value(entry), db=self._db_blocks)
            txn.put(_SEG_KEY.pack(sid) + dbkey, b"", db=self._db_by_segment)
            report.adopted += 1
            report.salvaged += salvaged
            report.bytes += entry.length
            # Its obligation may have been lost with the index, or never written: upload again
            # (a conditional PUT makes that harmless if S3 has it).
            if self._track_uploads and self._oblige(txn, dbkey, sid, {}):
                report.uploads_created += 1
        elif (_decode_entry(dbkey, value).segment, _decode_entry(dbkey, value).offset) != (sid, position):
            log.info("segment %d offset %d: duplicate of an indexed block, skipped", sid, position)

    def _apply_tombstone(self, txn: lmdb.Transaction, sid: int, position: int, header: BlockHeader,
                         flags: int, report: RecoveryReport) -> None:
        """Un-indexes every indexed block the tombstone kills: same key (or namespace), earlier record."""
        prefix = _db_key(header.namespace, b"")
        target = _db_key(header.namespace, header.key) if flags == FLAG_TOMBSTONE else prefix
        txn.put(_POSITION_KEY.pack(sid, position), bytes([flags]) + target, db=self._db_tombstones)
        targets = [target] if flags == FLAG_TOMBSTONE else _keys_with_prefix(txn, self._db_blocks, prefix)
        for dbkey in targets:
            value = txn.get(dbkey, db=self._db_blocks)
            if value is None:
                continue
            entry = _decode_entry(dbkey, value)
            if (entry.segment, entry.offset) < (sid, position):
                report.uploads_dropped += txn.get(dbkey, db=self._db_upload_keys) is not None
                self._unindex(txn, dbkey, {})
                report.killed += 1
                report.bytes -= entry.length

    def _check_tombstones(self, txn: lmdb.Transaction, segments: dict[int, _Segment]) -> set[int]:
        """Drops `tombstones` entries of segments that are gone or cut; returns the segments holding
        tombstones."""
        holding, stale = set(), []
        for key in txn.cursor(db=self._db_tombstones).iternext(values=False):
            sid, offset = _POSITION_KEY.unpack(key) if len(key) == _POSITION_KEY.size else (0, 0)
            segment = segments.get(sid)
            if segment is None or offset + self._header_area > segment.size:
                stale.append(key)
            else:
                holding.add(sid)
        for key in stale:
            txn.delete(key, db=self._db_tombstones)
        return holding

    def _check_uploads(self, txn: lmdb.Transaction, report: RecoveryReport) -> dict[int, int]:
        """Drops obligations whose block is not indexed (or that disagree with upload_keys); returns the
        open obligations per segment."""
        pinned: dict[int, int] = {}
        stale = []
        for seq, dbkey in txn.cursor(db=self._db_uploads):
            value = txn.get(dbkey, db=self._db_blocks)
            if value is None or txn.get(dbkey, db=self._db_upload_keys) != seq:
                stale.append((seq, dbkey))
                continue
            sid = _VALUE.unpack_from(value)[0]
            pinned[sid] = pinned.get(sid, 0) + 1
            report.uploads += 1
        for seq, dbkey in stale:
            txn.delete(seq, db=self._db_uploads)
            if txn.get(dbkey, db=self._db_upload_keys) == seq:
                txn.delete(dbkey, db=self._db_upload_keys)
            report.uploads_dropped += 1
        if txn.stat(self._db_upload_keys)["entries"] != report.uploads:
            orphans = [dbkey for dbkey, seq in txn.cursor(db=self._db_upload_keys)
                       if txn.get(seq, db=self._db_uploads) != dbkey]
            for dbkey in orphans:
                txn.delete(dbkey, db=self._db_upload_keys)
        if stale:
            log.warning("dropped %d upload obligations of blocks no longer indexed", len(stale))
        return pinned

    def _scan_record(self, segment: _Segment, position: int, scan_buffer: memoryview) -> _Found | None:
        """What lies at position: None if no record header verifies there or the record would not fit
        in the file; else (header, flags, record bytes, payload verified). Reads at most one chunk at a
        time; a media error counts as no record."""
        area = self._header_area
        head = scan_buffer[:area]
        try:
            if position + area > segment.size or self._preadv_all(segment.fd, [head], position) < area:
                return None
            header_len = header_len_of(head)
            if header_len > area:  # a version 2 header longer than one `align`: read the rest of its area
                if header_len > MAX_HEADER_BYTES or position + self._area(header_len) > segment.size:
                    return None
                more = scan_buffer[area:self._area(header_len)]
                if self._preadv_all(segment.fd, [more], position + area) < len(more):
                    return None
                area = self._area(header_len)
                head = scan_buffer[:area]
            header = decode_header(head)
        except CorruptBlock:
            return None
        except OSError as exc:
            if exc.errno not in _READ_ERRNOS:
                raise
            return None
        if "\0" in header.namespace:
            return None
        size = area + align_up(header.payload_len, self._align)
        if position + size > segment.size:
            return None
        return header, _header_flags(head), size, self._payload_ok(segment, position + area, header, scan_buffer)

    def _payload_ok(self, segment: _Segment, at: int, header: BlockHeader, scan_buffer: memoryview) -> bool:
        """Whether the payload that starts at offset `at` matches the header's checksum."""
        hasher = xxhash.xxh3_64()
        remaining = header.payload_len
        while remaining > 0:
            want = min(len(scan_buffer), align_up(remaining, self._align))
            try:
                if self._preadv_all(segment.fd, [scan_buffer[:want]], at) < want:
                    return False
            except OSError as exc:
                if exc.errno not in _READ_ERRNOS:
                    raise
                return False
            hasher.update(scan_buffer[:min(want, remaining)])
            remaining -= min(want, remaining)
            at += want
        return hasher.intdigest() == header.payload_checksum

    def _truncate(self, segment: _Segment, end: int, report: RecoveryReport) -> None:
        assert end % self._align == 0 and end >= self._align
        if segment.size <= end:
            return
        log.warning("segment %d: truncating %d torn/invalid bytes at offset %d", segment.id,
                    segment.size - end, end)
        self._fs.ftruncate(segment.fd, end)
        self._fs.fdatasync(segment.fd)
        segment.size = end
        report.torn += 1

    # ------------------------------------------------------------------ helpers

    def _segment_path(self, sid: int) -> str:
        return os.path.join(self._segment_dir, f"seg-{sid:016x}.kvseg")

    def _segment_header(self, sid: int) -> memoryview:
        area = mmap.mmap(-1, self._align)
        fields = _SEGMENT_FIELDS.pack(SEGMENT_MAGIC, SEGMENT_VERSION, sid, _now_ms())
        area[:_SEGMENT_HEADER.size] = fields + _U64.pack(checksum(fields))
        return memoryview(area)

    def _segment_header_valid(self, fd: int, sid: int, size: int) -> bool:
        if size < self._align:
            return False
        area = memoryview(mmap.mmap(-1, self._align))
        try:
            if self._preadv_all(fd, [area], 0) < self._align:
                return False
        except OSError as exc:
            if exc.errno not in _READ_ERRNOS:
                raise
            return False
        magic, version, stored_id, _created, stored_sum = _SEGMENT_HEADER.unpack_from(area)
        return (magic == SEGMENT_MAGIC and version == SEGMENT_VERSION and stored_id == sid
                and stored_sum == checksum(area[:_SEGMENT_FIELDS.size]))

    def _pwritev_all(self, fd: int, iovecs: list, offset: int) -> None:
        """pwritev until every byte is written, in calls of at most IOV_MAX buffers."""
        index, skip = 0, 0  # next buffer, bytes of it already written
        while index < len(iovecs):
            batch = list(iovecs[index:index + _IOV_MAX])
            batch[0] = batch[0][skip:]
            written = self._fs.pwritev(fd, batch, offset)
            if written <= 0:
                raise OSError(errno.EIO, f"pwritev wrote {written} bytes")
            offset += written
            written += skip
            while index < len(iovecs) and written >= len(iovecs[index]):
                written -= len(iovecs[index])
                index += 1
            skip = written

    def _preadv_all(self, fd: int, iovecs: list, offset: int) -> int:
        """preadv until the buffers are full or end of file; returns bytes read."""
        total, index, skip = 0, 0, 0
        while index < len(iovecs):
            batch = list(iovecs[index:index + _IOV_MAX])
            batch[0] = batch[0][skip:]
            got = self._fs.preadv(fd, batch, offset)
            if got <= 0:
                break
            offset += got
            total += got
            got += skip
            while index < len(iovecs) and got >= len(iovecs[index]):
                got -= len(iovecs[index])
                index += 1
            skip = got
        return total

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("DiskTier is closed")

    def _check_ready(self) -> None:
        self._check_open()
        if not self._recovered or self._env is None:
            raise RuntimeError("DiskTier.recover() must be called before use")

    def _warn_fd_limit(self) -> None:
        soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        needed = self._capacity // self._segment_bytes + 2
        if soft != resource.RLIM_INFINITY and needed > soft // 2:
            log.warning("up to %d segment fds may be open but RLIMIT_NOFILE is %d", needed, soft)


def record_footprint(payload_len: int, header_len: int, align: int) -> int:
    """Bytes on disk of a record: header area (header rounded up to align, at least one align, which
    covers every version 1 header) + payload rounded up to align. docs/disk-format.md "Record"."""
    return max(align, align_up(header_len, align)) + align_up(payload_len, align)


def _db_key(namespace: str, key: bytes) -> bytes:
    if "\0" in namespace:
        raise ValueError("namespace must not contain NUL (it separates namespace and key in the index)")
    return namespace.encode() + b"\0" + bytes(key)


def _encode_value(entry: DiskEntry) -> bytes:
    return _VALUE.pack(entry.segment, entry.offset, entry.length, entry.checksum, entry.created_unix_ms,
                       len(entry.parent)) + entry.parent + encode_extension(entry.token_ids, entry.origin)


def _decode_entry(dbkey: bytes, value: bytes) -> DiskEntry:
    """Raises ValueError on a malformed key or value."""
    namespace, sep, key = bytes(dbkey).partition(b"\0")
    if not sep or not key or len(value) < _VALUE.size:
        raise ValueError(f"malformed index entry {bytes(dbkey)!r}")
    segment, offset, length, payload_sum, created, parent_len = _VALUE.unpack_from(value)
    if len(value) < _VALUE.size + parent_len:
        raise ValueError(f"malformed index value for {bytes(dbkey)!r}")
    token_ids, origin = b"", None
    if len(value) > _VALUE.size + parent_len:  # the extension of a block with token ids or an origin
        try:
            token_ids, origin = decode_extension(memoryview(value)[_VALUE.size + parent_len:])
        except ValueError as exc:
            raise ValueError(f"malformed index value for {bytes(dbkey)!r}: {exc}") from exc
    return DiskEntry(namespace.decode(), key, bytes(value[_VALUE.size:_VALUE.size + parent_len]), length,
                     payload_sum, created, segment, offset, token_ids, origin)


def _failed(evicted: list[DiskEntry], exc: BaseException) -> BatchFailed:
    """A BatchFailed listing `evicted` and whatever a BatchFailed cause had evicted itself."""
    if isinstance(exc, BatchFailed):
        return BatchFailed(evicted + exc.evicted, exc.__cause__ or exc)
    return BatchFailed(evicted, exc)


def _owed_block(seq: bytes, dbkey: bytes) -> tuple[str, bytes] | None:
    """The (namespace, key) an `uploads` entry names; None (logged) when the stored value is damaged,
    so one bad entry cannot stop the uploader."""
    namespace, sep, key = bytes(dbkey).partition(b"\0")
    try:
        if sep and key:
            return namespace.decode(), key
    except UnicodeDecodeError:
        pass
    log.warning("skipping a damaged upload obligation (sequence %s): %r", bytes(seq).hex(), bytes(dbkey)[:80])
    return None


def _keys_with_prefix(txn: lmdb.Transaction, db, prefix: bytes, limit: int | None = None) -> list[bytes]:
    keys = []
    cursor = txn.cursor(db=db)
    if cursor.set_range(prefix):
        for key in cursor.iternext(values=False):
            if not key.startswith(prefix) or len(keys) == limit:
                break
            keys.append(key)
    return keys


def _last_seq(txn: lmdb.Transaction, db) -> int:
    cursor = txn.cursor(db=db)
    if not cursor.last():
        return 0
    key = cursor.key()
    return _SEG_KEY.unpack(key)[0] if len(key) == _SEG_KEY.size else 0


def _encode_header(header: BlockHeader, flags: int) -> bytes:
    """header.encode() with the flags field set (and the header checksum recomputed over it)."""
    encoded = bytearray(header.encode())
    if flags:
        _FLAGS.pack_into(encoded, _FLAGS_OFFSET, flags)
        _U64.pack_into(encoded, _HEADER_SUM_OFFSET, 0)
        _U64.pack_into(encoded, _HEADER_SUM_OFFSET, checksum(encoded))
    return bytes(encoded)


def _header_flags(head) -> int:
    """The flags of an encoded header; only meaningful once decode_header verified it."""
    return _FLAGS.unpack_from(head, _FLAGS_OFFSET)[0]


def _upload_keys(blocks: list[tuple[BlockHeader, memoryview]], upload: Sequence[bool] | None) -> list[bytes]:
    """The keys flagged for upload, each once, in the order of their first flag."""
    if upload is None:
        return []
    if len(upload) != len(blocks):
        raise ValueError(f"upload has {len(upload)} flags for {len(blocks)} blocks")
    wanted = [_db_key(header.namespace, header.key) for (header, _), flag in zip(blocks, upload) if flag]
    return list(dict.fromkeys(wanted))


def _map_bytes(capacity: int, header_area: int, explicit: int | None) -> int:
    """The LMDB map size: room for an index entry per smallest record that fits in capacity."""
    need = capacity // header_area * _INDEX_BYTES_PER_RECORD
    if explicit is None:
        return align_up(max(need, _MIN_MAP_BYTES), 1 << 20)
    if explicit < need:
        raise ValueError(f"lmdb_map_bytes={explicit} is too small: a capacity of {capacity} bytes holds up "
                         f"to {capacity // header_area} records, whose index needs {need} bytes "
                         "(pass None to derive it)")
    return explicit


def _byte_view(buffer) -> memoryview:
    view = memoryview(buffer)
    if not view.c_contiguous:
        raise ValueError("buffers must be contiguous")
    return view if view.format == "B" and view.ndim == 1 else view.cast("B")


def _address(view) -> int:
    return np.frombuffer(view, dtype=np.uint8).ctypes.data


def _check_payload(header: BlockHeader, view: memoryview) -> None:
    """Refuses to persist a payload that a later read would quarantine."""
    if len(view) < header.payload_len:
        raise ValueError(f"payload view has {len(view)} bytes, header says {header.payload_len}")
    if checksum(view[:header.payload_len]) != header.payload_checksum:
        raise CorruptBlock(f"payload of {header.namespace}/{bytes(header.key).hex()} does not match "
                           "its header checksum")


def _now_ms() -> int:
    return time.time_ns() // 1_000_000
