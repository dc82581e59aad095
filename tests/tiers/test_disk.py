"""Tests for kvtier.tiers.disk: real files, real LMDB, injected faults."""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import mmap
import os
import random
import shutil
import tempfile
import threading
import time

import lmdb
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvtier.tiers.block import BlockHeader, CorruptBlock, align_up, checksum, decode_header
from kvtier.tiers.disk import _SEG_KEY, _U64, DiskEntry, DiskTier, _db_key
from kvtier.tiers.fs import FileSystem

ALIGN = 4096
SLOT = 64 << 10


def payload_for(namespace: str, key: bytes, length: int, seed: int = 0) -> bytes:
    return random.Random(f"{namespace}/{key!r}/{length}/{seed}").randbytes(length)


def header_for(namespace: str, key: bytes, payload: bytes, parent: bytes = b"") -> BlockHeader:
    return BlockHeader(namespace, key, parent, len(payload), checksum(payload), 1_700_000_000_000)


class Slots:
    """Page-aligned arena slots, like the CPU tier hands to write_batch."""

    def __init__(self, count: int, slot: int = SLOT):
        self.slot = slot
        self.arena = mmap.mmap(-1, count * slot)
        self.view = memoryview(self.arena)
        self.next = 0

    def put(self, payload: bytes) -> memoryview:
        assert len(payload) <= self.slot
        at = self.next * self.slot
        self.next += 1
        # Stale bytes after the payload: must not reach the disk as padding.
        self.view[at:at + self.slot] = b"\xee" * self.slot
        self.view[at:at + len(payload)] = payload
        return self.view[at:at + self.slot]


def make_blocks(namespace: str, keys, length: int | list[int], slots: Slots | None = None, seed: int = 0):
    lengths = length if isinstance(length, list) else [length] * len(keys)
    blocks = []
    for key, n in zip(keys, lengths, strict=True):
        payload = payload_for(namespace, key, n, seed)
        view = slots.put(payload) if slots is not None else memoryview(payload)
        blocks.append((header_for(namespace, key, payload), view))
    return blocks


@pytest.fixture
def tiers(tmp_path):
    """open(**kw) -> (tier, report); every tier is closed at the end of the test."""
    opened: list[DiskTier] = []

    def open_tier(directory=None, **kw) -> tuple[DiskTier, object]:
        kw.setdefault("capacity_bytes", 4 << 20)
        kw.setdefault("segment_bytes", 64 << 10)
        kw.setdefault("lmdb_map_bytes", 16 << 20)
        tier = DiskTier(str(directory or tmp_path / "disk"), **kw)
        opened.append(tier)
        return tier, tier.recover()

    yield open_tier
    for tier in opened:
        tier.close()


def read_ok(tier: DiskTier, entry: DiskEntry, expected: bytes) -> bool:
    dest = mmap.mmap(-1, align_up(max(entry.length, 1), ALIGN))
    if not tier.read_into(entry, memoryview(dest)):
        return False
    assert dest[:entry.length] == expected
    return True


def segment_files(directory) -> list[str]:
    seg_dir = os.path.join(directory, "segments")
    return sorted(os.path.join(seg_dir, name) for name in os.listdir(seg_dir))


def index_key_map(tier: DiskTier) -> dict:
    return {(e.namespace, e.key): e for e in tier.entries()}


def open_index(directory):
    env = lmdb.open(os.path.join(directory, "index.lmdb"), subdir=True, max_dbs=8, map_size=16 << 20)
    return env, {name: env.open_db(name) for name in (b"blocks", b"by_segment", b"segments", b"quarantine")}


def flip_byte(path: str, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x5A]))


# ---------------------------------------------------------------------- round trips


@pytest.mark.parametrize("o_direct", [False, True], ids=["buffered", "o_direct"])
def test_round_trip_various_sizes(tiers, tmp_path, o_direct):
    tier, report = tiers(o_direct=o_direct, segment_bytes=256 << 10)
    assert report.indexed == report.adopted == report.segments == 0
    sizes = [0, 1, 511, 4095, 4096, 4097, 12345, 40000]
    slots = Slots(len(sizes))
    zero_copy = make_blocks("ns", [b"s%d" % i for i in range(len(sizes))], sizes, slots)
    copied = make_blocks("ns", [b"c%d" % i for i in range(len(sizes))], sizes)  # plain bytes: exact length
    entries, evicted = tier.write_batch(zero_copy + copied)
    assert evicted == []
    for (header, view), entry in zip(zero_copy + copied, entries, strict=True):
        expected = bytes(view[:header.payload_len])
        assert (entry.namespace, entry.key, entry.length, entry.checksum) == \
            (header.namespace, header.key, header.payload_len, header.payload_checksum)
        assert entry.offset % ALIGN == 0 and tier.get_entry("ns", header.key) == entry
        assert read_ok(tier, entry, expected)
        exact = bytearray(entry.length)  # shorter than the padded length, unaligned
        assert tier.read_into(entry, memoryview(exact)) and exact == expected
        shifted = bytearray(entry.length + ALIGN + 1)  # long enough but misaligned for O_DIRECT
        assert tier.read_into(entry, memoryview(shifted)[1:]) and shifted[1:1 + entry.length] == expected

    # The on-disk record: a 4096-byte header area, then the payload zero-padded to the alignment.
    for (header, view), entry in zip(zero_copy, entries[:len(zero_copy)], strict=True):
        path = segment_files(tmp_path / "disk")[0]
        with open(path, "rb") as f:
            assert f.read(4) == b"KVTS"
            f.seek(entry.offset)
            record = f.read(ALIGN + align_up(entry.length, ALIGN))
        assert decode_header(record[:ALIGN]) == header
        assert record[ALIGN:ALIGN + entry.length] == bytes(view[:entry.length])
        assert record[ALIGN + entry.length:] == bytes(align_up(entry.length, ALIGN) - entry.length)
    assert tier.used_bytes() == os.path.getsize(segment_files(tmp_path / "disk")[0])

    segment = next(iter(tier._segments.values()))
    assert bool(fcntl.fcntl(segment.fd, fcntl.F_GETFL) & os.O_DIRECT) == o_direct


def test_parent_and_created_round_trip(tiers):
    tier, _ = tiers()
    payload = payload_for("ns", b"child", 100)
    header = BlockHeader("ns", b"child", b"parent-key", 100, checksum(payload), 1234)
    (entry,), _ = tier.write_batch([(header, memoryview(payload))])
    assert entry.parent == b"parent-key" and entry.created_unix_ms == 1234
    assert tier.get_entry("ns", b"child") == entry
    assert read_ok(tier, entry, payload)


def test_segments_roll(tiers, tmp_path):
    tier, _ = tiers(segment_bytes=64 << 10)
    blocks = make_blocks("ns", [b"k%d" % i for i in range(12)], 10_000)
    entries = []
    for i in range(0, 12, 4):
        entries += tier.write_batch(blocks[i:i + 4])[0]
    files = segment_files(tmp_path / "disk")
    # Header area 4 KiB + 3 records of 16 KiB fit in 64 KiB; a fourth does not.
    assert len(files) == 4
    assert all(os.path.getsize(path) <= 64 << 10 for path in files)
    assert [e.segment for e in entries] == sorted(e.segment for e in entries)
    assert len({e.segment for e in entries}) == 4
    for (header, view), entry in zip(blocks, entries, strict=True):
        assert read_ok(tier, entry, bytes(view))


def test_dedup_within_and_across_batches(tiers):
    tier, _ = tiers()
    a, b = make_blocks("ns", [b"a", b"b"], 5000)
    entries, _ = tier.write_batch([a, b, a])
    assert entries[0] == entries[2] and entries[0] != entries[1]
    used = tier.used_bytes()
    other_payload = make_blocks("ns", [b"a"], 7000, seed=1)[0]  # same key, different bytes
    again, _ = tier.write_batch([other_payload, b])
    assert again == entries[:2]
    assert tier.used_bytes() == used
    assert read_ok(tier, again[0], bytes(a[1]))
    assert len(list(tier.entries())) == 2


def test_rejects_bad_arguments(tiers, tmp_path):
    with pytest.raises(ValueError):
        DiskTier(str(tmp_path / "x"), capacity_bytes=1 << 20, align=3000)
    with pytest.raises(ValueError):
        DiskTier(str(tmp_path / "y"), capacity_bytes=1 << 20, align=256)
    tier, _ = tiers()
    payload = payload_for("ns", b"k", 100)
    lying = BlockHeader("ns", b"k", b"", 100, checksum(payload) ^ 1, 0)
    good = make_blocks("ns", [b"g"], 100)[0]
    with pytest.raises(CorruptBlock):
        tier.write_batch([good, (lying, memoryview(payload))])
    with pytest.raises(ValueError):
        tier.write_batch([(header_for("ns", b"k", payload), memoryview(payload)[:50])])
    with pytest.raises(ValueError):
        tier.write_batch(make_blocks("bad\0ns", [b"k"], 10))
    assert tier.used_bytes() == 0 and list(tier.entries()) == []
    with pytest.raises(ValueError):
        tier.write_batch([make_blocks("ns", [b"huge"], 70 << 10)[0]])  # larger than a segment


# ---------------------------------------------------------------------- restart and recovery


def test_restart_returns_same_entries(tiers, tmp_path):
    tier, _ = tiers()
    blocks = make_blocks("ns", [b"k%d" % i for i in range(10)], [i * 3000 for i in range(10)])
    tier.write_batch(blocks[:5])
    tier.write_batch(blocks[5:])
    before = index_key_map(tier)
    used = tier.used_bytes()
    tier.close()
    tier, report = tiers()
    assert (report.indexed, report.adopted, report.torn, report.dropped_index_entries) == (10, 0, 0, 0)
    assert report.bytes == sum(i * 3000 for i in range(10))
    assert report.segments == len(segment_files(tmp_path / "disk"))
    assert "10 indexed" in report.summary()
    assert index_key_map(tier) == before and tier.used_bytes() == used
    for header, view in blocks:
        assert read_ok(tier, before[("ns", header.key)], bytes(view))
    again = tier.recover()  # idempotent on the same instance
    assert (again.indexed, again.adopted, again.torn) == (10, 0, 0)
    # New writes continue after the recovered data.
    (entry,), _ = tier.write_batch(make_blocks("ns", [b"new"], 100))
    assert all((entry.segment, entry.offset) != (e.segment, e.offset) for e in before.values())


def test_unindexed_records_past_committed_end_are_adopted(tiers, tmp_path):
    tier, _ = tiers(segment_bytes=256 << 10)
    first = make_blocks("ns", [b"a%d" % i for i in range(3)], 5000)
    second = make_blocks("ns", [b"b%d" % i for i in range(4)], 9000)
    tier.write_batch(first)
    lost, _ = tier.write_batch(second)
    tier.close()
    # Crash between fdatasync and the LMDB commit: the second batch is on disk but not indexed.
    env, dbs = open_index(tmp_path / "disk")
    with env.begin(write=True) as txn:
        for entry in lost:
            dbkey = _db_key(entry.namespace, entry.key)
            txn.delete(dbkey, db=dbs[b"blocks"])
            txn.delete(_SEG_KEY.pack(entry.segment) + dbkey, db=dbs[b"by_segment"])
        txn.put(_SEG_KEY.pack(lost[0].segment), _U64.pack(lost[0].offset), db=dbs[b"segments"])
    env.close()
    tier, report = tiers(segment_bytes=256 << 10)
    assert (report.indexed, report.adopted, report.torn) == (3, 4, 0)
    index = index_key_map(tier)
    assert [index[("ns", e.key)] for e in lost] == lost
    for header, view in first + second:
        assert read_ok(tier, index[("ns", header.key)], bytes(view))
    again = tier.recover()
    assert (again.indexed, again.adopted, again.torn) == (7, 0, 0)


def test_committed_end_reset_keeps_indexed_records(tiers, tmp_path):
    tier, _ = tiers()
    blocks = make_blocks("ns", [b"k%d" % i for i in range(3)], 3000)
    entries, _ = tier.write_batch(blocks)
    tier.remove("ns", b"k1")
    tier.close()
    env, dbs = open_index(tmp_path / "disk")
    with env.begin(write=True) as txn:
        txn.delete(_SEG_KEY.pack(entries[0].segment), db=dbs[b"segments"])  # as if never committed
    env.close()
    tier, report = tiers()
    # Indexed records are recognised in place; the removed one before them is not resurrected.
    assert (report.indexed, report.adopted, report.torn) == (2, 0, 0)
    assert tier.get_entry("ns", b"k1") is None
    assert read_ok(tier, tier.get_entry("ns", b"k2"), bytes(blocks[2][1]))


def test_manually_appended_valid_record_is_adopted(tiers, tmp_path):
    tier, _ = tiers()
    tier.write_batch(make_blocks("ns", [b"old"], 2000))
    tier.close()
    path = segment_files(tmp_path / "disk")[-1]
    payload = payload_for("ns", b"manual", 6000)
    header = BlockHeader("ns", b"manual", b"p", len(payload), checksum(payload), 42)
    end = os.path.getsize(path)
    with open(path, "ab") as f:
        f.write(header.encode().ljust(ALIGN, b"\0") + payload.ljust(align_up(len(payload), ALIGN), b"\0"))
    tier, report = tiers()
    assert (report.indexed, report.adopted, report.torn) == (1, 1, 0)
    entry = tier.get_entry("ns", b"manual")
    assert entry is not None and entry.offset == end and entry.parent == b"p"
    assert read_ok(tier, entry, payload)


def test_lost_index_is_rebuilt_from_segments(tiers, tmp_path):
    tier, _ = tiers()
    blocks = make_blocks("ns", [b"k%d" % i for i in range(8)], 7000)
    tier.write_batch(blocks[:4])
    tier.write_batch(blocks[4:])
    before = index_key_map(tier)
    tier.close()
    shutil.rmtree(tmp_path / "disk" / "index.lmdb")
    tier, report = tiers()
    assert (report.indexed, report.adopted, report.torn) == (0, 8, 0)
    assert index_key_map(tier) == before


def _torn_tail_bytes(kind: str) -> bytes:
    payload = payload_for("ns", b"torn", 10_000)
    header = header_for("ns", b"torn", payload).encode().ljust(ALIGN, b"\0")
    if kind == "garbage":
        return random.Random(1).randbytes(1000)
    if kind == "half_record":
        return header + payload[:5000]
    if kind == "bad_checksum":
        return header + bytes([payload[0] ^ 1]) + payload[1:].ljust(align_up(10_000, ALIGN) - 1, b"\0")
    assert kind == "header_only_aligned"
    return header


@pytest.mark.parametrize("kind", ["garbage", "half_record", "bad_checksum", "header_only_aligned"])
def test_torn_tail_is_truncated(tiers, tmp_path, kind):
    tier, _ = tiers()
    blocks = make_blocks("ns", [b"k%d" % i for i in range(2)], 3000)
    entries, _ = tier.write_batch(blocks)
    tier.close()
    path = segment_files(tmp_path / "disk")[-1]
    size = os.path.getsize(path)
    with open(path, "ab") as f:
        f.write(_torn_tail_bytes(kind))
    tier, report = tiers()
    assert (report.indexed, report.adopted, report.torn) == (2, 0, 1)
    assert os.path.getsize(path) == size
    assert tier.get_entry("ns", b"torn") is None
    for (header, view), entry in zip(blocks, entries, strict=True):
        assert read_ok(tier, entry, bytes(view))
    (new,), _ = tier.write_batch(make_blocks("ns", [b"after"], 100))
    assert new.offset == size


def test_entry_past_end_of_truncated_file_is_dropped(tiers, tmp_path):
    tier, _ = tiers()
    blocks = make_blocks("ns", [b"k%d" % i for i in range(3)], 6000)
    entries, _ = tier.write_batch(blocks)
    tier.close()
    path = segment_files(tmp_path / "disk")[-1]
    os.truncate(path, entries[2].offset + ALIGN + 100)  # cut inside the last record
    tier, report = tiers()
    assert (report.indexed, report.dropped_index_entries, report.torn, report.adopted) == (2, 1, 1, 0)
    assert os.path.getsize(path) == entries[2].offset
    assert tier.get_entry("ns", b"k2") is None
    assert read_ok(tier, entries[1], bytes(blocks[1][1]))
    (again,), _ = tier.write_batch([blocks[2]])
    assert again.offset == entries[2].offset and read_ok(tier, again, bytes(blocks[2][1]))


def test_missing_segment_file_drops_its_entries(tiers, tmp_path):
    tier, _ = tiers(segment_bytes=64 << 10)
    blocks = make_blocks("ns", [b"k%d" % i for i in range(6)], 10_000)
    entries, _ = tier.write_batch(blocks)
    tier.close()
    first = segment_files(tmp_path / "disk")[0]
    os.remove(first)
    tier, report = tiers(segment_bytes=64 << 10)
    assert (report.indexed, report.dropped_index_entries) == (3, 3)
    assert [e.key for e in tier.entries()] == [b"k3", b"k4", b"k5"]
    assert not tier.read_into(entries[0], memoryview(bytearray(10_000)))
    assert tier.quarantined_count() == 0


def test_invalid_unindexed_segment_file_is_deleted(tiers, tmp_path):
    tier, _ = tiers()
    tier.write_batch(make_blocks("ns", [b"k"], 100))
    tier.close()
    bogus = tmp_path / "disk" / "segments" / f"seg-{99:016x}.kvseg"
    bogus.write_bytes(b"not a segment" * 1000)
    short = tmp_path / "disk" / "segments" / f"seg-{98:016x}.kvseg"
    short.write_bytes(b"KVTS")
    tier, report = tiers()
    assert (report.indexed, report.torn, report.segments) == (1, 2, 1)
    assert not bogus.exists() and not short.exists()


def test_eviction_tombstone_finishes_after_crash(tiers, tmp_path):
    tier, _ = tiers(segment_bytes=64 << 10)
    entries, _ = tier.write_batch(make_blocks("ns", [b"k%d" % i for i in range(6)], 10_000))
    tier.close()
    # Crash after the eviction txn, before the unlink: entries gone, segment marked 0.
    env, dbs = open_index(tmp_path / "disk")
    with env.begin(write=True) as txn:
        for entry in entries[:3]:
            txn.delete(_db_key("ns", entry.key), db=dbs[b"blocks"])
            txn.delete(_SEG_KEY.pack(entry.segment) + _db_key("ns", entry.key), db=dbs[b"by_segment"])
        txn.put(_SEG_KEY.pack(entries[0].segment), _U64.pack(0), db=dbs[b"segments"])
    env.close()
    tier, report = tiers(segment_bytes=64 << 10)
    assert (report.indexed, report.adopted, report.torn, report.segments) == (3, 0, 0, 1)
    assert len(segment_files(tmp_path / "disk")) == 1


# ---------------------------------------------------------------------- corruption


@pytest.mark.parametrize("where", ["payload", "header", "payload_last_byte"])
def test_corruption_is_quarantined(tiers, tmp_path, where):
    tier, _ = tiers()
    blocks = make_blocks("ns", [b"k%d" % i for i in range(3)], 5000)
    entries, _ = tier.write_batch(blocks)
    victim = entries[1]
    path = segment_files(tmp_path / "disk")[-1]
    offset = {"payload": victim.offset + ALIGN + 17, "header": victim.offset + 20,
              "payload_last_byte": victim.offset + ALIGN + victim.length - 1}[where]
    flip_byte(path, offset)
    assert not tier.read_into(victim, memoryview(bytearray(8192)))
    assert tier.get_entry("ns", victim.key) is None and tier.quarantined_count() == 1
    assert not tier.read_into(victim, memoryview(bytearray(8192)))  # already gone: not counted twice
    assert tier.quarantined_count() == 1
    for index in (0, 2):
        assert read_ok(tier, entries[index], bytes(blocks[index][1]))
    tier.close()
    tier, report = tiers()
    assert report.indexed == 2 and tier.quarantined_count() == 1
    (rewritten,), _ = tier.write_batch([blocks[1]])  # a quarantined key can be written again
    assert rewritten.offset != victim.offset and read_ok(tier, rewritten, bytes(blocks[1][1]))


def test_entry_pointing_at_another_valid_record_never_reads_true(tiers):
    tier, _ = tiers()
    payload = payload_for("ns", b"same", 5000)  # identical bytes under two keys: only headers differ
    blocks = [(header_for("ns", key, payload), memoryview(payload)) for key in (b"a", b"b")]
    (a, b), _ = tier.write_batch(blocks)
    misplaced = dataclasses.replace(a, offset=b.offset)  # a valid record, with a matching payload, of b
    assert not tier.read_into(misplaced, memoryview(bytearray(8192)))
    # Not the indexed location of `a`, so nothing is quarantined and `a` still reads.
    assert tier.quarantined_count() == 0 and tier.get_entry("ns", b"a") == a
    assert read_ok(tier, a, bytes(blocks[0][1]))
    forged = dataclasses.replace(a, checksum=a.checksum ^ 1)  # disagrees with the header on disk
    assert not tier.read_into(forged, memoryview(bytearray(8192)))
    assert tier.quarantined_count() == 0 and tier.get_entry("ns", b"a") == a  # not the indexed entry


def test_padding_corruption_is_harmless(tiers, tmp_path):
    tier, _ = tiers()
    (entry,), _ = tier.write_batch(make_blocks("ns", [b"k"], 100))
    flip_byte(segment_files(tmp_path / "disk")[-1], entry.offset + ALIGN + 200)
    assert read_ok(tier, entry, payload_for("ns", b"k", 100))


def test_read_of_removed_or_evicted_entry(tiers):
    tier, _ = tiers(capacity_bytes=96 << 10, segment_bytes=64 << 10)
    blocks = make_blocks("ns", [b"k%d" % i for i in range(3)], 10_000)
    entries, _ = tier.write_batch(blocks)
    assert tier.remove("ns", b"k0") and not tier.remove("ns", b"k0")
    assert tier.read_into(entries[0], memoryview(bytearray(10_000)))  # bytes still verify: fine
    _, evicted = tier.write_batch(make_blocks("ns", [b"x%d" % i for i in range(3)], 10_000))
    assert {e.key for e in evicted} == {b"k1", b"k2"}  # k0 had been removed already
    assert not tier.read_into(entries[1], memoryview(bytearray(10_000)))
    assert tier.quarantined_count() == 0


def test_remove_and_remove_namespace_survive_restart(tiers):
    tier, _ = tiers()
    tier.write_batch(make_blocks("a", [b"1", b"2", b"3"], 100) + make_blocks("ab", [b"1"], 100)
                     + make_blocks("b", [b"1"], 100))
    assert tier.remove("b", b"1")
    assert tier.remove_namespace("a") == 3
    assert tier.remove_namespace("a") == 0
    assert sorted((e.namespace, e.key) for e in tier.entries()) == [("ab", b"1")]
    tier.close()
    tier, report = tiers()
    assert (report.indexed, report.adopted) == (1, 0)
    assert not tier.contains("a", b"1") and tier.contains("ab", b"1")


# ---------------------------------------------------------------------- capacity


def test_capacity_evicts_oldest_segments(tiers):
    capacity = 256 << 10
    tier, _ = tiers(capacity_bytes=capacity, segment_bytes=64 << 10)
    live: dict[bytes, DiskEntry] = {}
    evicted_all: list[DiskEntry] = []
    for i in range(40):
        (entry,), evicted = tier.write_batch(make_blocks("ns", [b"k%02d" % i], 10_000))
        live[entry.key] = entry
        for gone in evicted:
            assert live.pop(gone.key) == gone
        evicted_all += evicted
        assert tier.used_bytes() <= capacity
        assert {e.key: e for e in tier.entries()} == live
    assert len(live) + len(evicted_all) == 40 and evicted_all
    # FIFO: everything evicted is older than everything still live.
    assert max(e.segment for e in evicted_all) < min(e.segment for e in live.values())
    assert sorted(e.key for e in evicted_all) == [e.key for e in evicted_all]
    for entry in live.values():
        assert read_ok(tier, entry, payload_for("ns", entry.key, 10_000))


def test_capacity_smaller_than_two_segments(tiers):
    # The active segment cannot grow to segment_bytes: it is sealed early so that it can be evicted.
    tier, _ = tiers(capacity_bytes=48 << 10, segment_bytes=64 << 10)
    for i in range(12):
        (entry,), _ = tier.write_batch(make_blocks("ns", [b"k%02d" % i], 10_000))
        assert tier.used_bytes() <= 48 << 10
        assert read_ok(tier, entry, payload_for("ns", entry.key, 10_000))
    assert 1 <= len(list(tier.entries())) <= 2


def test_existing_block_in_evicted_segment_is_rewritten(tiers):
    tier, _ = tiers(capacity_bytes=96 << 10, segment_bytes=64 << 10)
    old = make_blocks("ns", [b"old%d" % i for i in range(3)], 10_000)
    old_entries, _ = tier.write_batch(old)
    # Needs a new segment, which evicts the first one, which holds old0: old0 must be written again.
    entries, evicted = tier.write_batch([old[0]] + make_blocks("ns", [b"n0", b"n1", b"n2"], 10_000))
    assert sorted(e.key for e in evicted) == [b"old1", b"old2"]
    assert entries[0].segment != old_entries[0].segment
    assert tier.get_entry("ns", b"old0") == entries[0]
    assert read_ok(tier, entries[0], bytes(old[0][1]))
    assert tier.used_bytes() <= 96 << 10


def test_batch_larger_than_capacity_fails_before_io(tiers):
    tier, _ = tiers(capacity_bytes=128 << 10, segment_bytes=64 << 10)
    tier.write_batch(make_blocks("ns", [b"keep"], 10_000))
    used = tier.used_bytes()
    with pytest.raises(OSError) as info:
        tier.write_batch(make_blocks("ns", [b"k%d" % i for i in range(10)], 10_000))
    assert info.value.errno == errno.ENOSPC
    assert tier.used_bytes() == used and tier.contains("ns", b"keep")


# ---------------------------------------------------------------------- fault injection


class FaultyFS(FileSystem):
    def __init__(self):
        self.fail = {}   # method name -> fail on the Nth call from now (1 = next)
        self.calls = {}

    def arm(self, method: str, nth: int) -> None:
        self.fail[method] = nth

    def _tick(self, method: str) -> None:
        if method in self.fail:
            self.fail[method] -= 1
            if self.fail[method] == 0:
                del self.fail[method]
                raise OSError(errno.ENOSPC, f"injected {method} failure")

    def pwritev(self, fd, buffers, offset):
        self._tick("pwritev")
        return super().pwritev(fd, buffers, offset)

    def fdatasync(self, fd):
        self._tick("fdatasync")
        super().fdatasync(fd)


class ShortWriteFS(FileSystem):
    """Writes at most 3000 bytes per call: exercises the short-write loop (buffered only)."""

    def pwritev(self, fd, buffers, offset):
        data = b"".join(bytes(b) for b in buffers)[:3000]
        return os.pwrite(fd, data, offset)


@pytest.mark.parametrize("method,nth", [("pwritev", 1), ("pwritev", 2), ("pwritev", 3), ("fdatasync", 1),
                                        ("fdatasync", 2)])
@pytest.mark.parametrize("o_direct", [False, True], ids=["buffered", "o_direct"])
def test_write_fault_leaves_nothing_indexed(tiers, tmp_path, method, nth, o_direct):
    fs = FaultyFS()
    tier, _ = tiers(fs=fs, segment_bytes=64 << 10, o_direct=o_direct)
    slots = Slots(16)
    first = make_blocks("ns", [b"a%d" % i for i in range(2)], 10_000, slots)
    tier.write_batch(first)
    used = tier.used_bytes()
    files_before = {p: os.path.getsize(p) for p in segment_files(tmp_path / "disk")}
    # Spans the active segment and a new one: pwritev #1 = new segment header, #2 = active run, #3 = new
    # segment run; fdatasync #1 = active, #2 = new segment.
    failing = make_blocks("ns", [b"f%d" % i for i in range(4)], 10_000, slots)
    fs.arm(method, nth)
    with pytest.raises(OSError) as info:
        tier.write_batch(failing)
    assert info.value.errno == errno.ENOSPC and not fs.fail
    assert all(tier.get_entry("ns", h.key) is None for h, _ in failing)
    assert tier.used_bytes() == used
    assert {p: os.path.getsize(p) for p in segment_files(tmp_path / "disk")} == files_before
    # Fault cleared: writing works, old data intact, and a fresh process agrees.
    third = make_blocks("ns", [b"c%d" % i for i in range(3)], 10_000, slots)
    tier.write_batch(third)
    expected = {h.key: bytes(v[:h.payload_len]) for h, v in first + third}
    index = index_key_map(tier)
    assert {k for _, k in index} == set(expected)
    for key, payload in expected.items():
        assert read_ok(tier, index[("ns", key)], payload)
    tier.close()
    tier, report = tiers(segment_bytes=64 << 10, o_direct=o_direct)
    assert (report.indexed, report.adopted, report.torn, report.dropped_index_entries) == (5, 0, 0, 0)
    assert index_key_map(tier) == index


def test_short_writes_are_completed(tiers):
    tier, _ = tiers(fs=ShortWriteFS())
    blocks = make_blocks("ns", [b"k%d" % i for i in range(4)], [1, 5000, 9000, 20000])
    entries, _ = tier.write_batch(blocks)
    for (header, view), entry in zip(blocks, entries, strict=True):
        assert read_ok(tier, entry, bytes(view))


# ---------------------------------------------------------------------- concurrency


def test_concurrent_readers_never_see_wrong_bytes(tiers):
    tier, _ = tiers(capacity_bytes=192 << 10, segment_bytes=64 << 10)
    written: list[DiskEntry] = []
    done = threading.Event()
    failures: list[str] = []
    counts = {"true": 0, "false": 0}

    def reader(seed: int) -> None:
        rng = random.Random(seed)
        dest = mmap.mmap(-1, 16 << 10)
        while not done.is_set():
            if not written:
                time.sleep(0.001)
                continue
            # Half recent (mostly live), half anywhere (mostly evicted).
            low = max(0, len(written) - 4) if rng.random() < 0.5 else 0
            entry = written[rng.randrange(low, len(written))]
            try:
                if tier.read_into(entry, memoryview(dest)):
                    counts["true"] += 1
                    if dest[:entry.length] != payload_for("ns", entry.key, entry.length):
                        failures.append(f"wrong bytes for {entry}")
                else:
                    counts["false"] += 1
            except Exception as exc:  # noqa: BLE001 - surface anything to the main thread
                failures.append(repr(exc))
                return

    threads = [threading.Thread(target=reader, args=(seed,), daemon=True) for seed in range(3)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 2.0
    i = 0
    slots = Slots(4, slot=16 << 10)
    while time.monotonic() < deadline and i < 400:
        slots.next = 0
        entries, _ = tier.write_batch(make_blocks("ns", [b"k%d" % i, b"k%d_" % i], [7000, 9000], slots))
        written.extend(entries)
        assert tier.used_bytes() <= 192 << 10
        i += 1
    done.set()
    for thread in threads:
        thread.join(timeout=10)
    assert not failures
    assert counts["true"] > 0 and counts["false"] > 0  # both live reads and evicted misses happened
    assert tier.quarantined_count() == 0


# ---------------------------------------------------------------------- model-based


NAMESPACES = ["a", "b"]
KEYS = [b"k%d" % i for i in range(6)]
block_st = st.tuples(st.sampled_from(NAMESPACES), st.sampled_from(KEYS), st.integers(0, 3000),
                     st.integers(0, 3), st.booleans())
op_st = st.one_of(
    st.tuples(st.just("write"), st.lists(block_st, min_size=1, max_size=4)),
    st.tuples(st.just("remove"), block_st),
    st.tuples(st.just("remove_namespace"), st.sampled_from(NAMESPACES)),
    st.tuples(st.just("settle"), st.lists(st.tuples(st.sampled_from(NAMESPACES), st.sampled_from(KEYS)),
                                          max_size=4)),
    st.tuples(st.just("reopen"), st.booleans()),
)


def all_pending(tier: DiskTier) -> list[tuple[str, bytes]]:
    """Every open obligation, through pages of 2 (bounded pages, resumed by cursor)."""
    found, after = [], None
    while True:
        page, after = tier.pending_uploads(after, limit=2)
        assert len(page) <= 2
        found += page
        if after is None:
            return found


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=st.lists(op_st, max_size=20))
def test_model_writes_removes_reopen(ops):
    kw = dict(capacity_bytes=24 << 10, segment_bytes=8 << 10, align=512, lmdb_map_bytes=8 << 20)
    with tempfile.TemporaryDirectory() as directory:
        tier = DiskTier(directory, **kw)
        tier.recover()
        model: dict[tuple[str, bytes], bytes] = {}
        pending: list[tuple[str, bytes]] = []  # open obligations, oldest first
        slack = 0  # tombstones may exceed capacity until the next write_batch evicts
        try:
            for op in ops:
                if op[0] == "write":
                    blocks, upload = [], []
                    for namespace, key, length, seed, wants in op[1]:
                        payload = payload_for(namespace, key, length, seed)
                        blocks.append((header_for(namespace, key, payload), memoryview(payload)))
                        upload.append(wants)
                    try:
                        entries, evicted = tier.write_batch(blocks, upload=upload)
                    except OSError as exc:
                        # Only segments pinned by obligations (or tombstones behind them) refuse eviction.
                        assert exc.errno == errno.ENOSPC and pending
                        continue
                    slack = 0
                    for gone in evicted:
                        assert (gone.namespace, gone.key) not in pending  # never evicted while pending
                        assert model.pop((gone.namespace, gone.key)) is not None
                    offered: dict[tuple[str, bytes], bytes] = {}
                    for header, view in blocks:
                        offered.setdefault((header.namespace, header.key), bytes(view))
                    for (header, _), entry in zip(blocks, entries, strict=True):
                        key = (header.namespace, header.key)
                        # Either the indexed copy was kept, or (new, or evicted by this very batch)
                        # the first payload offered for the key was written.
                        if key not in model or checksum(model[key]) != entry.checksum:
                            model[key] = offered[key]
                        assert entry.checksum == checksum(model[key])
                    for (header, _), wants in zip(blocks, upload, strict=True):
                        if wants and (header.namespace, header.key) not in pending:
                            pending.append((header.namespace, header.key))
                elif op[0] == "remove":
                    namespace, key = op[1][0], op[1][1]
                    removed = tier.remove(namespace, key)
                    assert removed == ((namespace, key) in model)
                    slack += removed * 2 * kw["align"]  # a tombstone, maybe in a new segment
                    model.pop((namespace, key), None)
                    pending = [k for k in pending if k != (namespace, key)]
                elif op[0] == "remove_namespace":
                    expected = [k for k in model if k[0] == op[1]]
                    assert tier.remove_namespace(op[1]) == len(expected)
                    slack += bool(expected) * 2 * kw["align"]
                    for k in expected:
                        del model[k]
                    pending = [k for k in pending if k[0] != op[1]]
                elif op[0] == "settle":
                    tier.settle_uploads(op[1])
                    pending = [k for k in pending if k not in op[1]]
                else:
                    tier.close()
                    tier = DiskTier(directory, **kw)
                    report = tier.recover()
                    assert (report.indexed, report.adopted, report.torn, report.dropped_index_entries) == \
                        (len(model), 0, 0, 0)
                    assert (report.killed, report.bad_regions, report.uploads) == (0, 0, len(pending))
                    if op[1]:
                        assert tier.recover() == report
                assert tier.used_bytes() <= kw["capacity_bytes"] + slack
                index = {(e.namespace, e.key): e for e in tier.entries()}
                assert {k: (e.length, e.checksum) for k, e in index.items()} == \
                    {k: (len(v), checksum(v)) for k, v in model.items()}
                # Obligations: exactly the model's, oldest first, every one indexed, its segment kept.
                assert all_pending(tier) == pending and tier.upload_backlog() == len(pending)
                assert all(k in index and index[k].segment in tier._segments for k in pending)
            index = {(e.namespace, e.key): e for e in tier.entries()}
            for key, payload in model.items():
                dest = bytearray(len(payload))
                assert tier.read_into(index[key], memoryview(dest)) and dest == payload
        finally:
            tier.close()


def test_eviction_skips_segments_with_pending_uploads(tmp_path):
    """Segments holding blocks not yet uploaded elsewhere must survive capacity pressure."""
    tier = DiskTier(str(tmp_path / "guarded"), capacity_bytes=6 * 65536, segment_bytes=2 * 65536)
    tier.recover()
    first, _ = tier.write_batch([(BlockHeader("ns", b"a" * 32, b"", 4000, checksum(b"a" * 4000), 0),
                                  memoryview(b"a" * 4000))], upload=[True])
    evicted_all = []
    for i in range(120):
        data = bytes([i]) * 4000
        _, evicted = tier.write_batch([(BlockHeader("ns", bytes([i + 1]) * 32, b"", 4000, checksum(data), 0),
                                        memoryview(data))])
        evicted_all += evicted
    assert evicted_all and all(e.segment != first[0].segment for e in evicted_all)
    assert tier.contains("ns", b"a" * 32) and tier.used_bytes() <= 6 * 65536
    assert tier.pending_uploads() == ([("ns", b"a" * 32)], None)
    tier.close()


# ---------------------------------------------------------------------- format version 2: router metadata

from kvtier.tiers.block import (MAX_TOKEN_IDS, BlockOrigin, encode_extension, pack_token_ids,  # noqa: E402
                                unpack_token_ids)
from kvtier.tiers.disk import _VALUE  # noqa: E402

ORIGIN = BlockOrigin(engine="engine-1", model="org/model", block_size=16, lora_name="")


def routed_header(namespace: str, key: bytes, payload: bytes, token_ids, origin=ORIGIN, parent: bytes = b""):
    return BlockHeader(namespace, key, parent, len(payload), checksum(payload), 1_700_000_000_000,
                       pack_token_ids(token_ids), origin)


def v1_bytes(namespace: str, key: bytes, parent: bytes, length: int, payload_sum: int, created: int) -> bytes:
    """A format version 1 header packed by hand from docs/block-format.md (what releases before
    version 2 wrote): readers must keep taking it."""
    import struct
    ns = namespace.encode()
    header_len = 46 + len(ns) + len(key) + len(parent)
    fields = (b"KVTB", 1, header_len, len(ns), len(key), len(parent), 0, length, payload_sum, created)
    unsealed = struct.pack("<4sHHHBBHQQQQ", *fields, 0) + ns + key + parent
    return struct.pack("<4sHHHBBHQQQQ", *fields, checksum(unsealed)) + ns + key + parent


names = st.text(min_size=0, max_size=20)


@given(st.lists(st.integers(0, 2**32 - 1), max_size=300), names, names, st.integers(0, MAX_TOKEN_IDS), names,
       st.binary(max_size=32))
def test_version_2_header_round_trip(token_ids, engine, model, block_size, lora, parent):
    origin = BlockOrigin(engine, model, block_size, lora)
    header = BlockHeader("ns", b"k" * 32, parent, 10, 99, 1, pack_token_ids(token_ids), origin)
    encoded = header.encode()
    assert decode_header(encoded) == header and len(encoded) == header.encoded_len
    assert unpack_token_ids(decode_header(encoded).token_ids) == token_ids
    routed = bool(token_ids) or origin != BlockOrigin()
    assert encoded[4:6] == (b"\x02\x00" if routed else b"\x01\x00")  # no router metadata: still version 1
    if not routed:
        assert header.origin is None and encoded == v1_bytes("ns", b"k" * 32, parent, 10, 99, 1)


def test_version_2_extension_is_covered_by_the_header_checksum():
    encoded = routed_header("ns", b"k", b"p", [5, 6, 7]).encode()
    for at in range(46 + 2 + 1, len(encoded)):  # every byte after namespace and key: parent, extension
        damaged = bytearray(encoded)
        damaged[at] ^= 0x10
        with pytest.raises(CorruptBlock):
            decode_header(damaged)


def test_version_1_header_and_index_value_decode_as_before():
    assert decode_header(v1_bytes("ns", b"key", b"par", 5, 77, 123)) == BlockHeader("ns", b"key", b"par", 5, 77, 123)
    old = _VALUE.pack(3, 8192, 5, 77, 123, 3) + b"par"  # an index value written before version 2
    from kvtier.tiers.disk import _decode_entry
    entry = _decode_entry(_db_key("ns", b"key"), old)
    assert (entry.token_ids, entry.origin, entry.parent, entry.segment, entry.offset) == (b"", None, b"par", 3, 8192)
    routed = _VALUE.pack(3, 8192, 5, 77, 123, 3) + b"par" + encode_extension(pack_token_ids([1, 2]), ORIGIN)
    entry = _decode_entry(_db_key("ns", b"key"), routed)
    assert unpack_token_ids(entry.token_ids) == [1, 2] and entry.origin == ORIGIN
    with pytest.raises(ValueError):
        _decode_entry(_db_key("ns", b"key"), routed[:-1])


@pytest.mark.parametrize("align", [512, 4096])
def test_token_ids_and_origin_are_kept_on_disk_and_read_back_after_a_restart(tiers, tmp_path, align):
    """Blocks with token ids in version 2 records, beside version 1 records; a header longer than
    one `align` (1100 token ids: 4.4 KB) gets a header area of whole `align`s. Everything survives a
    reopen and an index rebuilt from the segment files alone."""
    tier, _ = tiers(align=align, segment_bytes=1 << 20)
    cases = [("ns", b"plain", []), ("ns", b"short", list(range(16))), ("ns", b"long", list(range(1100))),
             ("ns", b"lora", [7, 8])]
    blocks = []
    for namespace, key, token_ids in cases:
        payload = payload_for(namespace, key, 3000)
        origin = None if not token_ids else (BlockOrigin("e", "m", 16, "adapter") if key == b"lora" else ORIGIN)
        blocks.append((routed_header(namespace, key, payload, token_ids, origin), memoryview(payload)))
    entries, _ = tier.write_batch(blocks)
    by_key = {e.key: e for e in entries}
    for (header, view), entry in zip(blocks, entries, strict=True):
        assert (entry.token_ids, entry.origin) == (header.token_ids, header.origin)
        assert entry.header() == header and tier.get_entry("ns", header.key) == entry
        assert read_ok(tier, entry, bytes(view))
    # On disk: each record is its header rounded up to `align`, then the payload.
    path = segment_files(tmp_path / "disk")[0]
    with open(path, "rb") as f:
        for header, view in blocks:
            entry = by_key[header.key]
            area = max(align, align_up(header.encoded_len, align))
            f.seek(entry.offset)
            record = f.read(area + align_up(3000, align))
            assert decode_header(record[:area]) == header and record[area:area + 3000] == bytes(view)
            assert record[4:6] == (b"\x01\x00" if header.key == b"plain" else b"\x02\x00")
    assert max(align, align_up(blocks[2][0].encoded_len, align)) > align  # the long one spans several
    tier.close()

    for lose_index in (False, True):
        if lose_index:
            shutil.rmtree(tmp_path / "disk" / "index.lmdb")
        tier, report = tiers(align=align, segment_bytes=1 << 20)
        assert (report.indexed, report.adopted) == ((0, 4) if lose_index else (4, 0))
        assert report.torn == 0 and report.bad_regions == 0
        assert index_key_map(tier) == {("ns", e.key): e for e in entries}
        for header, view in blocks:
            assert read_ok(tier, tier.get_entry("ns", header.key), bytes(view))
        tier.close()


def test_an_index_entry_whose_token_ids_disagree_with_the_record_is_quarantined(tiers, tmp_path):
    tier, _ = tiers()
    payload = payload_for("ns", b"k", 100)
    (entry,), _ = tier.write_batch([(routed_header("ns", b"k", payload, [1, 2, 3]), memoryview(payload))])
    lying = dataclasses.replace(entry, token_ids=pack_token_ids([1, 2, 4]))
    tier.close()
    env, dbs = open_index(tmp_path / "disk")
    from kvtier.tiers.disk import _encode_value
    with env.begin(write=True) as txn:
        txn.put(_db_key("ns", b"k"), _encode_value(lying), db=dbs[b"blocks"])
    env.close()
    tier, _ = tiers()
    assert tier.get_entry("ns", b"k") == lying
    assert not read_ok(tier, lying, payload) and tier.get_entry("ns", b"k") is None
    assert tier.quarantined_count() == 1


# ---------------------------------------------------------------------------------- footprint, compaction

def test_the_footprint_of_a_block_is_its_whole_record_on_disk(tiers):
    tier, _ = tiers()
    sizes = {0: ALIGN, 1: 2 * ALIGN, ALIGN: 2 * ALIGN, ALIGN + 1: 3 * ALIGN}
    for length, expected in sizes.items():
        (header, view), = make_blocks("ns", [b"k%d" % length], length)
        assert tier.footprint(header) == expected
        (entry,), _ = tier.write_batch([(header, view)])
        assert tier.footprint(entry.header()) == expected
    long = BlockHeader("ns", b"t", b"", 10, checksum(b"x" * 10), 1, token_ids=bytes(4 * 1100))
    assert long.encoded_len > ALIGN and tier.footprint(long) == 3 * ALIGN  # two aligns of header, one of payload
    # What the segments hold: one segment header plus the footprints.
    assert tier.used_bytes() == ALIGN + sum(sizes.values())


def fill(tier: DiskTier, namespace: str, count: int, length: int = 8000, start: int = 0) -> list[DiskEntry]:
    entries = []
    for index in range(start, start + count):
        entries += tier.write_batch(make_blocks(namespace, [b"%s-%d" % (namespace.encode(), index)], length))[0]
    return entries


def test_eviction_copies_protected_blocks_forward_and_drops_the_others(tiers):
    # Four 64 KiB segments of five 12 KiB records; "b" is protected.
    tier, _ = tiers(capacity_bytes=256 << 10, protect=lambda namespace: namespace == "b")
    kept = fill(tier, "b", 3)
    fill(tier, "a", 60)  # three times the capacity
    assert tier.compacted_blocks >= 3 and tier.compaction_passes >= 1
    entries = index_key_map(tier)
    for old in kept:
        new = entries[("b", old.key)]
        assert dataclasses.replace(new, segment=old.segment, offset=old.offset) == old  # every fact kept
        assert new.segment != old.segment
        assert read_ok(tier, new, payload_for("b", old.key, 8000))
        assert read_ok(tier, old, payload_for("b", old.key, 8000))  # a stale entry follows the block
    assert len([e for e in entries.values() if e.namespace == "a"]) < 60
    assert tier.used_bytes() <= 256 << 10
    # The index and the segments agree after a restart, and after a rebuild from the segments alone.
    tier.close()
    for rebuild in (False, True):
        if rebuild:
            shutil.rmtree(os.path.join(tier._directory, "index.lmdb"))
        again, report = tiers(capacity_bytes=256 << 10, protect=lambda namespace: namespace == "b")
        assert {e.key for e in again.entries() if e.namespace == "b"} == {e.key for e in kept}, report.summary()
        again.close()


def test_without_protection_whole_oldest_segments_go(tiers):
    tier, _ = tiers(capacity_bytes=256 << 10)
    kept = fill(tier, "b", 3)
    fill(tier, "a", 60)
    assert tier.compacted_blocks == 0
    assert not {e.key for e in tier.entries() if e.namespace == "b"} & {e.key for e in kept}


def test_compaction_is_bounded_per_batch_and_then_fails_enospc(tiers):
    # Everything is protected and the budget is one record: room cannot be made by copying alone.
    tier, _ = tiers(capacity_bytes=256 << 10, protect=lambda namespace: True, compact_bytes=12 << 10)
    fill(tier, "b", 19)
    failures = 0
    for index in range(40):
        try:
            fill(tier, "b", 1, start=100 + index)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC and "compaction bound" in str(exc)
            failures += 1
    assert failures and tier.used_bytes() <= (256 << 10) + (12 << 10)
    assert tier.compacted_blocks <= 40  # at most one copy per batch


def test_a_failed_copy_leaves_the_old_copy_indexed(tiers, tmp_path):
    class FailSync(FileSystem):
        fail = False

        def fdatasync(self, fd):
            if self.fail:
                raise OSError(errno.EIO, "injected")
            super().fdatasync(fd)
    fs = FailSync()
    tier, _ = tiers(capacity_bytes=256 << 10, protect=lambda namespace: namespace == "b", fs=fs)
    kept = fill(tier, "b", 3)
    written = 0
    while tier.used_bytes() + (12 << 10) <= 256 << 10:
        fill(tier, "a", 1, start=written)
        written += 1
    fs.fail = True
    with pytest.raises(OSError):
        fill(tier, "a", 1, start=written)
    fs.fail = False
    assert {(e.key, e.segment, e.offset) for e in tier.entries() if e.namespace == "b"} == \
        {(e.key, e.segment, e.offset) for e in kept}
    fill(tier, "a", 1, start=written)  # the next batch compacts
    assert {e.key for e in tier.entries() if e.namespace == "b"} == {e.key for e in kept}
    assert tier.compacted_blocks == 3
