"""The NVMe tier: append-only segment files of aligned, self-describing records, indexed by LMDB.

Layout (exact bytes: docs/disk-format.md):
    <directory>/segments/seg-<16 hex id>.kvseg   segment header area, then records, each at a multiple
                                                 of `align`: header area (BlockHeader) + padded payload
    <directory>/index.lmdb/                      LMDB: blocks, by_segment, segments, quarantine

Contract:
- Threads: exactly one writer thread calls write_batch/remove/remove_namespace (eviction happens inside
  write_batch); any number of reader threads call read_into/get_entry/contains/entries concurrently.
  recover() and close() run with no other call in flight.
- Durability: write_batch returns only after every new record is fdatasync'ed, the segment directory is
  fsync'ed if a segment file was created, and one LMDB transaction (sync=True) indexed the batch. An
  entry is indexed iff its bytes are durable, so contains()/get_entry() have no false positives for what
  survives a crash. remove() is durable on return.
- Buffers: payload views passed to write_batch and dest passed to read_into are borrowed for the call.
  Payload views may be longer than payload_len (arena slots). Full aligned blocks of a payload are
  written straight from the caller's view; only the partial last block is copied (O_DIRECT) so that
  padding on disk is zero. With o_direct an unaligned view or dest goes through a bounce buffer.
- Reads verify everything: read_into returns True only if the record header equals the entry and the
  payload checksum matches; otherwise the block is quarantined (un-indexed, recorded) and False returned.
  On False the contents of dest are unspecified.
- Space: whole segments are evicted, oldest first, so that used_bytes() <= capacity_bytes. A batch that
  cannot fit even after evicting every other segment fails with OSError(ENOSPC) before any I/O.
- Restart: recover() must be called once before use. It rebuilds the index from LMDB plus the segment
  files (adopting durable records that were never indexed, truncating torn tails) and is idempotent.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import mmap
import os
import re
import resource
import struct
import threading
import time
from typing import Callable, Iterator

import lmdb
import numpy as np
import xxhash

from .block import MAX_HEADER_BYTES, BlockHeader, CorruptBlock, align_up, checksum, decode_header
from .fs import FileSystem

log = logging.getLogger("kvtier.disk")

SEGMENT_MAGIC = b"KVTS"
SEGMENT_VERSION = 1
# magic, version, segment id, created unix ms; followed by the xxh3 of these bytes.
_SEGMENT_FIELDS = struct.Struct("<4sHQQ")
_SEGMENT_HEADER = struct.Struct("<4sHQQQ")
_SEGMENT_NAME = re.compile(r"^seg-([0-9a-f]{16})\.kvseg$")
# blocks value: segment, offset, payload_len, payload_checksum, created_ms, parent_len; then parent.
_VALUE = struct.Struct("<QQQQQB")
_U64 = struct.Struct("<Q")
# Segment ids as LMDB keys are big-endian so that key order is id order.
_SEG_KEY = struct.Struct(">Q")
_TOMBSTONE = 0  # committed_end 0 in `segments`: evicted, its file may still need deleting.

_IOV_MAX = max(16, os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024)
_SCAN_CHUNK = 1 << 20      # recovery verifies payloads in chunks of this many bytes: bounded memory
_ENTRIES_PAGE = 1024       # entries() holds a read txn for at most this many entries
_MAX_ALIGN = 1 << 20
_READ_ERRNOS = (errno.EIO, errno.ENODATA, errno.EBADMSG)  # media errors: quarantine, do not raise


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


@dataclasses.dataclass
class RecoveryReport:
    indexed: int = 0                # LMDB entries confirmed against segment files
    adopted: int = 0                # valid unindexed records found on disk and indexed
    torn: int = 0                   # tails truncated / invalid segment files deleted
    dropped_index_entries: int = 0  # LMDB entries pointing at missing segments or past a file's end
    segments: int = 0
    bytes: int = 0                  # total payload bytes indexed after recovery

    def summary(self) -> str:
        return (f"disk tier recovered {self.indexed + self.adopted} blocks ({self.bytes} payload bytes) in "
                f"{self.segments} segments: {self.indexed} indexed, {self.adopted} adopted, "
                f"{self.torn} torn, {self.dropped_index_entries} dropped index entries")


@dataclasses.dataclass(slots=True, eq=False)
class _Segment:
    id: int
    path: str
    fd: int
    size: int              # bytes in the file: the writer appends here
    committed_end: int     # every record below is fdatasync'ed and indexed
    refs: int = 0          # readers currently using fd
    doomed: bool = False   # evicted: the last reader closes fd


class DiskTier:
    """NVMe block store. See the module docstring for the full contract.

    Thread-safety: one writer thread (write_batch, remove, remove_namespace); any number of reader
    threads (read_into, get_entry, contains, entries, used_bytes, quarantined_count) concurrently with it.
    Durability: write_batch returns after fdatasync + a committed LMDB txn; remove is durable on return.
    Buffer ownership: payload views and read destinations are borrowed for the duration of the call.
    False positives: none; contains()/get_entry() report exactly what is durable and indexed.
    Restart: call recover() once before use; it re-adopts unindexed durable records and cuts torn tails.
    """

    def __init__(self, directory: str, *, capacity_bytes: int, segment_bytes: int = 256 << 20,
                 align: int = 4096, o_direct: bool = False, fs: FileSystem | None = None,
                 lmdb_map_bytes: int = 1 << 30, evictable: Callable[[int], bool] | None = None):
        if align < 512 or align > _MAX_ALIGN or align & (align - 1):
            raise ValueError(f"align must be a power of two in [512, {_MAX_ALIGN}], got {align}")
        header_area = align_up(MAX_HEADER_BYTES, align)
        smallest_segment = align + header_area + align  # segment header + one 1-byte record
        if segment_bytes < smallest_segment:
            raise ValueError(f"segment_bytes must be >= {smallest_segment}, got {segment_bytes}")
        if capacity_bytes < smallest_segment:
            raise ValueError(f"capacity_bytes must be >= {smallest_segment}, got {capacity_bytes}")
        if o_direct and not hasattr(os, "O_DIRECT"):
            raise ValueError("o_direct requested but this platform has no O_DIRECT")
        self._directory = directory
        # Called from the writer thread with a segment id; False keeps the segment (e.g. it holds
        # blocks not yet uploaded to S3). Must be cheap and thread-safe.
        self._evictable = evictable or (lambda segment_id: True)
        self._segment_dir = os.path.join(directory, "segments")
        self._capacity = capacity_bytes
        self._segment_bytes = segment_bytes
        self._align = align
        self._header_area = header_area
        self._o_direct = o_direct
        self._open_flags = os.O_RDWR | os.O_CLOEXEC | (os.O_DIRECT if o_direct else 0)
        # O_DIRECT needs memory aligned to the logical block size; anonymous mmaps give page alignment.
        self._mem_align = min(align, mmap.PAGESIZE)
        self._fs = fs if fs is not None else FileSystem()
        self._zeros = memoryview(bytes(align))

        self._fs.makedirs(self._segment_dir)
        self._env = lmdb.open(os.path.join(directory, "index.lmdb"), subdir=True, map_size=lmdb_map_bytes,
                              sync=True, metasync=True, max_dbs=4, max_readers=1024, readahead=False)
        self._db_blocks = self._env.open_db(b"blocks")
        self._db_by_segment = self._env.open_db(b"by_segment")
        self._db_segments = self._env.open_db(b"segments")
        self._db_quarantine = self._env.open_db(b"quarantine")

        self._segments: dict[int, _Segment] = {}   # guarded by _segment_lock (readers look up fds)
        self._segment_lock = threading.Lock()
        self._txn_lock = threading.Lock()           # LMDB write txns: writer + quarantining readers
        self._tls = threading.local()               # per-reader-thread aligned header buffer
        self._active: _Segment | None = None        # writer only
        self._next_id = 1                           # writer only; ids are never reused
        self._tombstones: set[int] = set()          # evicted ids whose `segments` entry is still 0
        self._recovered = False
        self._closed = False
        self._warn_fd_limit()

    # ------------------------------------------------------------------ public API

    @property
    def capacity_bytes(self) -> int:
        return self._capacity

    def recover(self) -> RecoveryReport:
        """Rebuilds the in-memory state and the index from LMDB + segment files. Idempotent."""
        self._check_open()
        self._forget_segments()
        report = RecoveryReport()
        files = self._list_segment_files()
        segments: dict[int, _Segment] = {}
        try:
            with self._txn_lock, self._env.begin(write=True) as txn:
                committed = self._load_segment_table(txn)
                self._next_id = max([0, *files, *committed]) + 1
                self._open_segments(files, committed, segments, report)
                fit_end = self._check_index(txn, segments, report)
                for segment in sorted(segments.values(), key=lambda s: s.id):
                    self._recover_tail(txn, segment, committed.get(segment.id),
                                       fit_end.get(segment.id, self._align), report)
                txn.drop(self._db_segments, delete=False)
                for segment in segments.values():
                    segment.committed_end = segment.size
                    txn.put(_SEG_KEY.pack(segment.id), _U64.pack(segment.size), db=self._db_segments)
            self._fs.fsync_dir(self._segment_dir)  # deleted files stay deleted
        except BaseException:
            for segment in segments.values():
                self._fs.close(segment.fd)
            raise
        with self._segment_lock:
            self._segments = segments
        self._tombstones.clear()
        self._active = None
        if segments:
            top = segments[max(segments)]
            if not self._is_full(top):
                self._active = top
        report.segments = len(segments)
        self._recovered = True
        log.info("%s", report.summary())
        return report

    def entries(self) -> Iterator[DiskEntry]:
        """Everything indexed, in (namespace, key) order; pages through short read txns."""
        self._check_ready()
        after: bytes | None = None  # last key already yielded
        while True:
            page: list[DiskEntry] = []
            with self._env.begin(db=self._db_blocks) as txn:
                cursor = txn.cursor()
                found = cursor.first() if after is None else cursor.set_range(after)
                if found and cursor.key() == after:
                    found = cursor.next()
                while found and len(page) < _ENTRIES_PAGE:
                    after = cursor.key()
                    page.append(_decode_entry(after, cursor.value()))
                    found = cursor.next()
            yield from page
            if not found:
                return

    def get_entry(self, namespace: str, key: bytes) -> DiskEntry | None:
        self._check_ready()
        dbkey = _db_key(namespace, key)
        with self._env.begin(db=self._db_blocks) as txn:
            value = txn.get(dbkey)
        return None if value is None else _decode_entry(dbkey, value)

    def contains(self, namespace: str, key: bytes) -> bool:
        return self.get_entry(namespace, key) is not None

    def write_batch(self, blocks: list[tuple[BlockHeader, memoryview]]
                    ) -> tuple[list[DiskEntry], list[DiskEntry]]:
        """Durably writes and indexes blocks; returns (entry per input in order, evicted entries).

        Already-indexed keys (and repeats within the batch) are not rewritten: their existing entry is
        returned, unless the eviction this batch needs removes that copy, then it is written again.
        Evicted entries are the blocks no longer on disk after the call (never a block of this batch).
        A payload view may be longer than payload_len (an arena slot); only payload_len bytes are read.
        Raises CorruptBlock if a payload does not match its header, ValueError on malformed input,
        OSError(ENOSPC) if the batch cannot fit in capacity, all before any I/O. On any exception
        nothing of the batch is indexed and the segment files are rolled back.
        """
        self._check_ready()
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
            sizes = [self._record_bytes(blocks[i][0].payload_len) for i in fresh]
            placements, evict_ids = self._plan(sizes)
            # An existing copy that this very batch evicts must be written again, or the caller would
            # be told a block is on disk that is not.
            doomed = [i for i in existing if results[i].segment in evict_ids]
            if not doomed:
                evicted = self._evict(evict_ids)
                records = [(i, blocks[i][0], views[i]) for i in fresh]
                for i, entry in zip(fresh, self._write_records(records, placements), strict=True):
                    results[i] = entry
                break
            for i in doomed:
                views[i] = _byte_view(blocks[i][1])
                _check_payload(blocks[i][0], views[i])
                results[i] = None
            existing = [i for i in existing if results[i] is not None]
            fresh = sorted(fresh + doomed)
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
        A block that fails verification is quarantined; one evicted/removed meanwhile is just a miss.
        """
        self._check_ready()
        dest = _byte_view(dest)
        if dest.readonly:
            raise ValueError("dest must be writable")
        if len(dest) < entry.length:
            raise ValueError(f"dest holds {len(dest)} bytes, entry needs {entry.length}")
        segment = self._acquire(entry.segment)
        if segment is None:
            return False  # evicted meanwhile: a miss, not corruption
        try:
            problem = self._read_verified(segment, entry, dest)
        finally:
            self._release(segment)
        if problem is None:
            return True
        self._quarantine(entry, problem)
        return False

    def remove(self, namespace: str, key: bytes) -> bool:
        """Un-indexes one block (durably); its space is reclaimed when its segment is evicted."""
        self._check_ready()
        dbkey = _db_key(namespace, key)
        with self._txn_lock, self._env.begin(write=True) as txn:
            return self._unindex(txn, dbkey) is not None

    def remove_namespace(self, namespace: str) -> int:
        self._check_ready()
        prefix = _db_key(namespace, b"")
        with self._txn_lock, self._env.begin(write=True) as txn:
            keys = _keys_with_prefix(txn, self._db_blocks, prefix)
            for dbkey in keys:
                self._unindex(txn, dbkey)
        return len(keys)

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
        self._env.close()

    def __enter__(self) -> DiskTier:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ write path

    def _record_bytes(self, payload_len: int) -> int:
        size = self._header_area + align_up(payload_len, self._align)
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
        """Places the batch and picks the oldest segments to evict so that it fits in capacity.

        If evicting every sealed segment is not enough, seals the active one early so that it becomes
        evictable too (this keeps small capacities, below two segments, working).
        """
        used = self.used_bytes()
        attempts = [self._active, None] if self._active is not None else [None]
        for active in attempts:
            placements = self._place(sizes, active)
            new_segments = placements[-1][0] + 1
            growth = sum(sizes) + new_segments * self._align
            keep = active.id if active is not None and placements[0][0] < 0 else None
            evict, remaining = [], used
            for sid in sorted(self._segments):
                if remaining + growth <= self._capacity:
                    break
                if sid != keep and self._evictable(sid):
                    evict.append(sid)
                    remaining -= self._segments[sid].size
            if remaining + growth <= self._capacity:
                return placements, evict
        raise OSError(errno.ENOSPC, f"batch of {sum(sizes)} bytes cannot fit in capacity {self._capacity}")

    def _write_records(self, fresh: list[tuple[int, BlockHeader, memoryview]],
                       placements: list[tuple[int, int]]) -> list[DiskEntry]:
        previous_active = self._active
        if placements[0][0] >= 0:
            self._active = None  # sealed: the batch starts a new segment
        created: list[_Segment] = []
        arena = mmap.mmap(-1, len(fresh) * (self._header_area + self._align))  # headers + O_DIRECT tails
        try:
            runs: dict[int, tuple[_Segment, int, list]] = {}  # ordinal -> (segment, start, iovecs)
            entries = []
            for n, ((_, header, view), (ordinal, offset)) in enumerate(zip(fresh, placements, strict=True)):
                if ordinal not in runs:
                    segment = previous_active if ordinal < 0 else self._create_segment(created)
                    assert segment is not None and segment.size == offset
                    runs[ordinal] = (segment, offset, [])
                segment, _, iovecs = runs[ordinal]
                iovecs.extend(self._record_iovecs(header, view, arena, n))
                segment.size = offset + self._record_bytes(header.payload_len)
                entries.append(DiskEntry(header.namespace, bytes(header.key), bytes(header.parent),
                                         header.payload_len, header.payload_checksum,
                                         header.created_unix_ms, segment.id, offset))
            for segment, start, iovecs in runs.values():
                self._assert_writable(segment, start, iovecs)
                self._pwritev_all(segment.fd, iovecs, start)
            for segment, _, _ in runs.values():
                self._fs.fdatasync(segment.fd)
            if created:
                self._fs.fsync_dir(self._segment_dir)  # the new files' names must survive a crash
            self._commit(entries, [segment for segment, _, _ in runs.values()])
        except BaseException:
            self._rollback(previous_active, created)
            raise
        return entries

    def _record_iovecs(self, header: BlockHeader, view: memoryview, arena: mmap.mmap, n: int) -> list:
        """Header area + payload padded with zeros to align, zero-copy where the alignment allows."""
        align = self._align
        base = n * (self._header_area + align)
        head = memoryview(arena)[base:base + self._header_area]
        encoded = header.encode()
        head[:len(encoded)] = encoded
        assert decode_header(head) == header  # exactly what goes to disk decodes to the caller's header
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
                pad = memoryview(arena)[base + self._header_area:base + self._header_area + align]
                pad[:tail] = view[body:length]
                iovecs.append(pad)
            elif tail:
                iovecs += [view[body:length], self._zeros[:align - tail]]
        assert sum(len(iov) for iov in iovecs) == self._record_bytes(length)
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

    def _commit(self, entries: list[DiskEntry], touched: list[_Segment]) -> None:
        with self._txn_lock, self._env.begin(write=True) as txn:
            for entry in entries:
                dbkey = _db_key(entry.namespace, entry.key)
                txn.put(dbkey, _encode_value(entry), db=self._db_blocks)
                txn.put(_SEG_KEY.pack(entry.segment) + dbkey, b"", db=self._db_by_segment)
            for segment in touched:
                txn.put(_SEG_KEY.pack(segment.id), _U64.pack(segment.size), db=self._db_segments)
            for sid in self._tombstones:
                txn.delete(_SEG_KEY.pack(sid), db=self._db_segments)
        self._tombstones.clear()
        for segment in touched:
            segment.committed_end = segment.size

    def _rollback(self, previous_active: _Segment | None, created: list[_Segment]) -> None:
        """Undoes a failed batch on disk: new segments deleted, the active one cut to committed_end."""
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
                # Bytes past committed_end are never trusted; the next batch overwrites them.
                log.exception("rollback: cannot truncate segment %s", self._active.path)
            self._active.size = self._active.committed_end

    def _evict(self, ids: list[int]) -> list[DiskEntry]:
        """Un-indexes whole segments and deletes their files; a 0 tombstone covers a crash in between."""
        if not ids:
            return []
        evicted = []
        with self._txn_lock, self._env.begin(write=True) as txn:
            for sid in ids:
                prefix = _SEG_KEY.pack(sid)
                for link in _keys_with_prefix(txn, self._db_by_segment, prefix):
                    dbkey = link[_SEG_KEY.size:]
                    value = txn.pop(dbkey, db=self._db_blocks)
                    assert value is not None, "by_segment links a block that is not indexed"
                    entry = _decode_entry(dbkey, value)
                    assert entry.segment == sid, "by_segment and blocks disagree"
                    txn.delete(link, db=self._db_by_segment)
                    evicted.append(entry)
                txn.put(prefix, _U64.pack(_TOMBSTONE), db=self._db_segments)
        for sid in ids:
            with self._segment_lock:
                segment = self._segments.pop(sid)
                segment.doomed = True
                close_now = segment.refs == 0
            if self._active is segment:
                self._active = None
            if close_now:
                self._fs.close(segment.fd)
            self._fs.remove(segment.path)  # open readers keep reading the unlinked file
        self._fs.fsync_dir(self._segment_dir)
        self._tombstones.update(ids)
        log.info("evicted %d segments (%d blocks) to stay within %d bytes", len(ids), len(evicted),
                 self._capacity)
        return evicted

    def _unindex(self, txn: lmdb.Transaction, dbkey: bytes) -> DiskEntry | None:
        value = txn.pop(dbkey, db=self._db_blocks)
        if value is None:
            return None
        entry = _decode_entry(dbkey, value)
        txn.delete(_SEG_KEY.pack(entry.segment) + dbkey, db=self._db_by_segment)
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
        head, scratch = self._thread_buffers()
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
        if got < self._header_area + padded:
            return f"short read: {got} of {self._header_area + padded} bytes"
        try:
            header = decode_header(head)
        except CorruptBlock as exc:
            return f"header: {exc}"
        if (header.namespace, header.key, header.parent, header.payload_len, header.payload_checksum,
                header.created_unix_ms) != (entry.namespace, entry.key, entry.parent, entry.length,
                                            entry.checksum, entry.created_unix_ms):
            return "header does not match the index entry"
        if bounce is not None:
            dest[:length] = memoryview(bounce)[:length]
        if checksum(dest[:length]) != entry.checksum:
            return "payload checksum mismatch"
        return None

    def _thread_buffers(self) -> tuple[memoryview, memoryview]:
        buffers = getattr(self._tls, "buffers", None)
        if buffers is None:
            buffers = (memoryview(mmap.mmap(-1, self._header_area)), memoryview(bytearray(self._align)))
            self._tls.buffers = buffers
        return buffers

    def _quarantine(self, entry: DiskEntry, reason: str) -> None:
        dbkey = _db_key(entry.namespace, entry.key)
        with self._txn_lock, self._env.begin(write=True) as txn:
            value = txn.get(dbkey, db=self._db_blocks)
            if value is None:
                return  # removed or evicted meanwhile: nothing to quarantine
            if _decode_entry(dbkey, value) != entry:
                return  # the caller's entry is stale (re-written meanwhile): the indexed copy is not judged
            self._unindex(txn, dbkey)
            txn.put(dbkey, _U64.pack(_now_ms()) + reason.encode(), db=self._db_quarantine)
        log.warning("quarantined %s/%s (segment %d offset %d): %s", entry.namespace, entry.key.hex(),
                    entry.segment, entry.offset, reason)

    # ------------------------------------------------------------------ recovery

    def _forget_segments(self) -> None:
        with self._segment_lock:
            segments, self._segments = list(self._segments.values()), {}
        for segment in segments:
            assert segment.refs == 0, "close/recover with reads in flight"
            self._fs.close(segment.fd)
        self._active = None

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
                       segments: dict[int, _Segment], report: RecoveryReport) -> None:
        """Opens into `segments` every segment file whose header verifies; deletes evicted/invalid ones."""
        for sid, path in sorted(files.items()):
            if committed.get(sid) == _TOMBSTONE:
                log.info("finishing eviction of segment %d", sid)
                self._fs.remove(path)
                continue
            fd = self._fs.open(path, self._open_flags)
            size = self._fs.size(fd)
            if not self._segment_header_valid(fd, sid, size):
                # Torn creation, or not ours. Its records cannot be attributed to this segment id.
                log.warning("deleting segment %s: invalid segment header (%d bytes)", path, size)
                self._fs.close(fd)
                self._fs.remove(path)
                report.torn += 1
                continue
            segments[sid] = _Segment(sid, path, fd, size, committed_end=0)

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
            end = entry.offset + self._header_area + align_up(entry.length, self._align)
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
        if drops:
            log.warning("dropped %d index entries pointing at missing or truncated segments", len(drops))
        report.dropped_index_entries += len(drops)
        return fit_end

    def _recover_tail(self, txn: lmdb.Transaction, segment: _Segment, committed_end: int | None,
                      fit_end: int, report: RecoveryReport) -> None:
        """Adopts valid records past the committed (or confirmed) end; truncates at the first bad one."""
        if committed_end is not None and committed_end > segment.size:
            # Lost bytes the index had acknowledged (external truncation): keep what still fits, but
            # do not rescan, which could resurrect removed blocks.
            log.warning("segment %d is shorter (%d) than its committed end (%d)", segment.id,
                        segment.size, committed_end)
            self._truncate(segment, fit_end, report)
            return
        valid_committed = committed_end is not None and committed_end >= self._align and \
            committed_end % self._align == 0
        position = max(fit_end, committed_end if valid_committed else self._align)
        scan_buffer = memoryview(mmap.mmap(-1, max(_SCAN_CHUNK, self._align)))
        while position < segment.size:
            header = self._scan_record(segment, position, scan_buffer)
            if header is None:
                break
            dbkey = _db_key(header.namespace, header.key)
            value = txn.get(dbkey, db=self._db_blocks)
            if value is None:
                entry = DiskEntry(header.namespace, header.key, header.parent, header.payload_len,
                                  header.payload_checksum, header.created_unix_ms, segment.id, position)
                txn.put(dbkey, _encode_value(entry), db=self._db_blocks)
                txn.put(_SEG_KEY.pack(segment.id) + dbkey, b"", db=self._db_by_segment)
                report.adopted += 1
                report.bytes += entry.length
            elif _decode_entry(dbkey, value).offset != position or \
                    _decode_entry(dbkey, value).segment != segment.id:
                log.info("segment %d offset %d: duplicate of an indexed block, skipped", segment.id,
                         position)
            position += self._record_bytes(header.payload_len)
        self._truncate(segment, position, report)

    def _scan_record(self, segment: _Segment, position: int, scan_buffer: memoryview) -> BlockHeader | None:
        """Decodes and fully verifies the record at position, reading at most one chunk at a time."""
        head = scan_buffer[:self._header_area]
        if position + self._header_area > segment.size or \
                self._preadv_all(segment.fd, [head], position) < self._header_area:
            return None
        try:
            header = decode_header(head)
        except CorruptBlock:
            return None
        if "\0" in header.namespace:
            return None
        at = position + self._header_area
        if at + align_up(header.payload_len, self._align) > segment.size:
            return None
        hasher = xxhash.xxh3_64()
        remaining = header.payload_len
        while remaining > 0:
            want = min(len(scan_buffer), align_up(remaining, self._align))
            if self._preadv_all(segment.fd, [scan_buffer[:want]], at) < want:
                return None
            hasher.update(scan_buffer[:min(want, remaining)])
            remaining -= min(want, remaining)
            at += want
        if hasher.intdigest() != header.payload_checksum:
            return None
        return header

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
        if self._preadv_all(fd, [area], 0) < self._align:
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
        if not self._recovered:
            raise RuntimeError("DiskTier.recover() must be called before use")

    def _warn_fd_limit(self) -> None:
        soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        needed = self._capacity // self._segment_bytes + 2
        if soft != resource.RLIM_INFINITY and needed > soft // 2:
            log.warning("up to %d segment fds may be open but RLIMIT_NOFILE is %d", needed, soft)


def _db_key(namespace: str, key: bytes) -> bytes:
    if "\0" in namespace:
        raise ValueError("namespace must not contain NUL (it separates namespace and key in the index)")
    return namespace.encode() + b"\0" + bytes(key)


def _encode_value(entry: DiskEntry) -> bytes:
    return _VALUE.pack(entry.segment, entry.offset, entry.length, entry.checksum, entry.created_unix_ms,
                       len(entry.parent)) + entry.parent


def _decode_entry(dbkey: bytes, value: bytes) -> DiskEntry:
    """Raises ValueError on a malformed key or value."""
    namespace, sep, key = bytes(dbkey).partition(b"\0")
    if not sep or not key or len(value) < _VALUE.size:
        raise ValueError(f"malformed index entry {bytes(dbkey)!r}")
    segment, offset, length, payload_sum, created, parent_len = _VALUE.unpack_from(value)
    if len(value) != _VALUE.size + parent_len:
        raise ValueError(f"malformed index value for {bytes(dbkey)!r}")
    return DiskEntry(namespace.decode(), key, bytes(value[_VALUE.size:]), length, payload_sum, created,
                     segment, offset)


def _keys_with_prefix(txn: lmdb.Transaction, db, prefix: bytes) -> list[bytes]:
    keys = []
    cursor = txn.cursor(db=db)
    if cursor.set_range(prefix):
        for key in cursor.iternext(values=False):
            if not key.startswith(prefix):
                break
            keys.append(key)
    return keys


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
