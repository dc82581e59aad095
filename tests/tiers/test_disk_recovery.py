"""Salvage-first recovery, durable removes, upload obligations and failed batches of kvtier.tiers.disk.

Real files and LMDB; faults are injected through the FileSystem seam or by damaging files on disk.
"""

from __future__ import annotations

import errno
import os
import random
import shutil

import lmdb
import pytest
from test_disk import (ALIGN, FaultyFS, flip_byte, index_key_map, make_blocks, open_index, payload_for,
                       read_ok, segment_files, tiers)  # noqa: F401 - tiers is a fixture

from kvtier.tiers import disk as disk_module
from kvtier.tiers.block import align_up
from kvtier.tiers.disk import _SEG_KEY, _U64, BatchFailed, DiskTier, _db_key

RECORD = ALIGN + align_up(3000, ALIGN)  # bytes on disk of a 3000-byte block


def keys(n: int, prefix: bytes = b"k") -> list[bytes]:
    return [prefix + b"%02d" % i for i in range(n)]


def assert_all_read(tier: DiskTier, blocks) -> None:
    index = index_key_map(tier)
    for header, view in blocks:
        assert read_ok(tier, index[(header.namespace, header.key)], bytes(view[:header.payload_len]))


def unindex_batch(directory, entries) -> None:
    """Simulates a crash between fdatasync and the index commit of the batch that wrote entries."""
    env, dbs = open_index(directory)
    with env.begin(write=True) as txn:
        for entry in entries:
            dbkey = _db_key(entry.namespace, entry.key)
            txn.delete(dbkey, db=dbs[b"blocks"])
            txn.delete(_SEG_KEY.pack(entry.segment) + dbkey, db=dbs[b"by_segment"])
        txn.put(_SEG_KEY.pack(entries[0].segment), _U64.pack(entries[0].offset), db=dbs[b"segments"])
    env.close()


# ---------------------------------------------------------------------- damaged segments


@pytest.mark.parametrize("index", ["kept", "lost"])
@pytest.mark.parametrize("offset", [0, 6, 14, 22])  # magic, segment id, created, checksum
def test_segment_header_bit_flip_keeps_all_records(tiers, tmp_path, index, offset):
    tier, _ = tiers(segment_bytes=1 << 20)
    blocks = make_blocks("ns", keys(10), 3000)
    entries, _ = tier.write_batch(blocks)
    tier.close()
    (path,) = segment_files(tmp_path / "disk")
    size = os.path.getsize(path)
    flip_byte(path, offset)
    if index == "lost":
        shutil.rmtree(tmp_path / "disk" / "index.lmdb")
    tier, report = tiers(segment_bytes=1 << 20)
    assert report.headers_repaired == 1 and report.torn == 0
    assert report.indexed + report.adopted == 10 and os.path.getsize(path) == size
    assert index_key_map(tier) == {("ns", e.key): e for e in entries}
    assert_all_read(tier, blocks)
    again = tier.recover()  # the header was rewritten: nothing left to repair
    assert (again.headers_repaired, again.indexed, again.adopted) == (0, 10, 0)


@pytest.mark.parametrize("damage", ["header", "payload"])
@pytest.mark.parametrize("index", ["lost", "tail"])
def test_bad_record_mid_segment_keeps_the_records_after_it(tiers, tmp_path, damage, index):
    tier, _ = tiers(segment_bytes=1 << 20)
    first = make_blocks("ns", [b"first"], 3000)
    tier.write_batch(first)
    blocks = make_blocks("ns", keys(25), 3000)
    entries, _ = tier.write_batch(blocks)
    tier.close()
    if index == "lost":
        shutil.rmtree(tmp_path / "disk" / "index.lmdb")
    else:
        unindex_batch(tmp_path / "disk", entries)
    (path,) = segment_files(tmp_path / "disk")
    size = os.path.getsize(path)
    victim = entries[2]
    flip_byte(path, victim.offset + (20 if damage == "header" else ALIGN + 100))
    tier, report = tiers(segment_bytes=1 << 20)
    assert report.adopted == (24 if index == "tail" else 25)
    assert (report.bad_regions, report.skipped_bytes, report.salvaged, report.torn) == (1, RECORD, 22, 0)
    assert os.path.getsize(path) == size  # the bad record stays as dead bytes; nothing was cut
    assert tier.get_entry("ns", victim.key) is None
    assert_all_read(tier, first + blocks[:2] + blocks[3:])
    assert "1 bad regions" in report.summary()
    # The dead record is below the committed end now: a second recovery does not scan it again.
    again = tier.recover()
    assert (again.indexed, again.adopted, again.bad_regions) == (25, 0, 0)


def test_bad_tail_after_salvaged_records_is_truncated(tiers, tmp_path):
    tier, _ = tiers(segment_bytes=1 << 20)
    blocks = make_blocks("ns", keys(6), 3000)
    entries, _ = tier.write_batch(blocks)
    tier.close()
    shutil.rmtree(tmp_path / "disk" / "index.lmdb")
    (path,) = segment_files(tmp_path / "disk")
    flip_byte(path, entries[1].offset + 20)   # a bad record in the middle: kept as dead bytes
    flip_byte(path, entries[5].offset + 20)   # the last record: a torn tail, cut
    with open(path, "ab") as f:
        f.write(random.Random(3).randbytes(3 * ALIGN))
    tier, report = tiers(segment_bytes=1 << 20)
    assert (report.adopted, report.bad_regions, report.torn) == (4, 1, 1)
    assert os.path.getsize(path) == entries[5].offset
    assert [e.key for e in tier.entries()] == [entries[i].key for i in (0, 2, 3, 4)]
    (new,), _ = tier.write_batch(make_blocks("ns", [b"after"], 100))
    assert new.offset == entries[5].offset


# ---------------------------------------------------------------------- durable removes


def test_removed_blocks_stay_removed_when_the_index_is_rebuilt(tiers, tmp_path):
    tier, _ = tiers(segment_bytes=64 << 10)
    kept = make_blocks("a", keys(4), 3000) + make_blocks("ab", [b"x"], 3000)
    tier.write_batch(kept + make_blocks("b", keys(3), 3000))
    assert tier.remove("a", b"k01") and tier.remove_namespace("b") == 3
    rewritten = make_blocks("a", [b"k02"], 5000, seed=7)  # removed, then written again: lives
    assert tier.remove("a", b"k02")
    tier.write_batch(rewritten)
    before = index_key_map(tier)
    tier.close()
    shutil.rmtree(tmp_path / "disk" / "index.lmdb")
    tier, report = tiers(segment_bytes=64 << 10)
    assert index_key_map(tier) == before
    assert not tier.contains("a", b"k01") and not any(e.namespace == "b" for e in tier.entries())
    assert report.killed == 5 and report.adopted - report.killed == len(before)
    assert_all_read(tier, [kept[0], kept[3], kept[4]] + rewritten)
    again = tier.recover()
    assert (again.indexed, again.adopted, again.killed) == (len(before), 0, 0)


def test_tombstone_written_before_the_index_txn_is_applied(tiers, tmp_path):
    """A crash after the tombstone's fdatasync but before the index txn: the remove takes effect."""
    tier, _ = tiers()
    tier.write_batch(make_blocks("ns", keys(3), 3000))
    committed = os.path.getsize(segment_files(tmp_path / "disk")[-1])
    assert tier.remove("ns", b"k01")
    tier.close()
    env, dbs = open_index(tmp_path / "disk")
    with env.begin(write=True) as txn:  # undo the index txn of the remove
        entry_key = _db_key("ns", b"k01")
        segment = next(iter(txn.cursor(db=dbs[b"segments"])))[0]
        txn.put(segment, _U64.pack(committed), db=dbs[b"segments"])
        offset = committed - 2 * RECORD
        txn.put(entry_key, disk_module._encode_value(disk_module.DiskEntry(
            "ns", b"k01", b"", 3000, make_blocks("ns", [b"k01"], 3000)[0][0].payload_checksum,
            1_700_000_000_000, _SEG_KEY.unpack(segment)[0], offset)), db=dbs[b"blocks"])
    env.close()
    tier, report = tiers()
    assert (report.indexed, report.killed, report.torn) == (3, 1, 0)
    assert not tier.contains("ns", b"k01") and tier.contains("ns", b"k02")


def test_tombstones_outlive_the_records_they_kill(tiers, tmp_path):
    """A segment holding a tombstone is not evicted while an older segment (here pinned by a pending
    upload) may still hold the record it kills."""
    tier, _ = tiers(capacity_bytes=6 * (64 << 10), segment_bytes=64 << 10)
    pinned, victim = make_blocks("ns", [b"pinned", b"victim"], 10_000)
    (pinned_entry, _), _ = tier.write_batch([pinned, victim], upload=[True, False])
    tier.write_batch(make_blocks("ns", [b"fill"], 10_000))
    (other,), _ = tier.write_batch(make_blocks("ns", [b"other"], 10_000))  # segment 2 is active
    assert other.segment == pinned_entry.segment + 1
    assert tier.remove("ns", b"victim")  # its tombstone lands in segment 2
    evicted = []
    for i in range(30):
        evicted += tier.write_batch(make_blocks("ns", [b"f%02d" % i], 10_000))[1]
    gone_segments = {e.segment for e in evicted}
    assert pinned_entry.segment not in gone_segments and other.segment not in gone_segments
    assert len(gone_segments) > 3
    assert os.path.exists(tier._segment_path(other.segment))
    tier.close()
    shutil.rmtree(tmp_path / "disk" / "index.lmdb")
    tier, report = tiers(capacity_bytes=6 * (64 << 10), segment_bytes=64 << 10)
    assert tier.contains("ns", b"pinned") and not tier.contains("ns", b"victim")
    assert report.killed == 1


# ---------------------------------------------------------------------- damaged index


def damage_index(directory, how: str) -> None:
    data = os.path.join(directory, "index.lmdb", "data.mdb")
    size = os.path.getsize(data)
    if how == "truncated":
        os.truncate(data, size // 2)
        return
    start, end = (2 * 4096, size) if how == "garbage" else (size // 4, size * 3 // 4)
    with open(data, "r+b") as f:  # the meta pages (0 and 1) stay intact: LMDB opens it
        f.seek(start)
        f.write(random.Random(how).randbytes(end - start))


@pytest.mark.parametrize("how", ["garbage", "garbage_middle", "truncated"])
def test_damaged_index_is_moved_aside_and_rebuilt(tiers, tmp_path, how):
    directory = tmp_path / "disk"
    tier, _ = tiers(segment_bytes=64 << 10, track_uploads=True)
    blocks = make_blocks("ns", keys(40), 3000)
    for i in range(0, 40, 8):
        tier.write_batch(blocks[i:i + 8], upload=[True] * 8)
    tier.settle_uploads([("ns", b"k00")])
    assert tier.remove("ns", b"k39")
    before = index_key_map(tier)
    tier.close()
    damage_index(directory, how)
    tier, report = tiers(segment_bytes=64 << 10, track_uploads=True)
    assert report.index_moved_aside.startswith(str(directory / "index.lmdb.damaged-"))
    assert os.path.isdir(report.index_moved_aside) and "DAMAGED INDEX" in report.summary()
    assert index_key_map(tier) == before and report.killed == 1
    assert_all_read(tier, blocks[:39])
    # Obligations were lost with the index: every adopted record has one again.
    assert tier.upload_backlog() == 39 == report.uploads
    again = tier.recover()
    assert (again.index_moved_aside, again.indexed, again.adopted) == ("", 39, 0)


def test_lmdb_error_during_recovery_moves_the_index_aside(tiers, tmp_path, monkeypatch):
    tier, _ = tiers()
    blocks = make_blocks("ns", keys(5), 3000)
    tier.write_batch(blocks)
    tier.close()
    real = DiskTier._check_index
    calls = []

    def corrupt_once(self, *args):
        calls.append(1)
        if len(calls) == 1:
            raise lmdb.CorruptedError("mdb_get: MDB_CORRUPTED: Located page was wrong type")
        return real(self, *args)
    monkeypatch.setattr(DiskTier, "_check_index", corrupt_once)
    tier, report = tiers()
    assert report.index_moved_aside and (report.indexed, report.adopted) == (0, 5)
    assert_all_read(tier, blocks)


def test_index_validation_past_its_deadline_counts_as_damaged(tiers, tmp_path, monkeypatch):
    tier, _ = tiers()
    blocks = make_blocks("ns", keys(3), 3000)
    tier.write_batch(blocks)
    tier.close()
    monkeypatch.setattr(disk_module, "_INDEX_CHECK_SCRIPT", "import signal; signal.pause()")  # never ends
    monkeypatch.setattr(disk_module, "_INDEX_CHECK_BASE_S", 0.2)
    tier, report = tiers()
    assert report.index_moved_aside and report.adopted == 3
    assert_all_read(tier, blocks)


# ---------------------------------------------------------------------- upload obligations


def test_obligations_are_durable_with_their_blocks(tiers):
    tier, _ = tiers()
    blocks = make_blocks("ns", keys(4), 3000)
    tier.write_batch(blocks, upload=[True, False, True, False])
    assert tier.pending_uploads() == ([("ns", b"k00"), ("ns", b"k02")], None)
    # Already indexed, not rewritten: the obligation is added anyway (in a txn of its own).
    entries, _ = tier.write_batch([blocks[3], blocks[0]], upload=[True, True])
    tier.close()  # nobody settled: as after a crash
    tier, report = tiers()
    assert report.uploads == 3 and tier.upload_backlog() == 3
    assert tier.pending_uploads() == ([("ns", b"k00"), ("ns", b"k02"), ("ns", b"k03")], None)
    assert tier.remove("ns", b"k02")  # a removed block owes no upload
    tier.settle_uploads([("ns", b"k00"), ("ns", b"unknown")])
    assert tier.pending_uploads() == ([("ns", b"k03")], None)
    with pytest.raises(ValueError):
        tier.write_batch(blocks, upload=[True])


def test_failed_write_records_no_obligation(tiers):
    fs = FaultyFS()
    tier, _ = tiers(fs=fs)
    fs.arm("fdatasync", 1)
    with pytest.raises(OSError):
        tier.write_batch(make_blocks("ns", keys(2), 3000), upload=[True, True])
    assert tier.upload_backlog() == 0 and list(tier.entries()) == []


def test_pending_uploads_pages_oldest_first(tiers):
    tier, _ = tiers(segment_bytes=256 << 10)
    order = [b"z%02d" % i for i in range(25)]
    random.Random(5).shuffle(order)  # key order differs from write order
    for i in range(0, 25, 5):
        tier.write_batch(make_blocks("ns", order[i:i + 5], 100), upload=[True] * 5)
    pages, after = [], None
    while True:
        page, after = tier.pending_uploads(after, limit=10)
        pages.append(page)
        if after is None:
            break
    assert [len(p) for p in pages] == [10, 10, 5]
    assert [key for page in pages for _, key in page] == order
    first, cursor = tier.pending_uploads(None, limit=10)
    tier.settle_uploads(first[:3] + [("ns", order[12])])  # settling does not disturb the cursor
    rest, _ = tier.pending_uploads(cursor, limit=100)
    assert [key for _, key in rest] == order[10:12] + order[13:]
    assert tier.upload_backlog() == 21
    with pytest.raises(ValueError):
        tier.pending_uploads(None, limit=0)


def test_pending_segments_are_not_evicted_until_settled(tiers):
    tier, _ = tiers(capacity_bytes=4 * (64 << 10), segment_bytes=64 << 10)
    written = []
    with pytest.raises(OSError) as info:
        for i in range(20):
            entries, evicted = tier.write_batch(make_blocks("ns", [b"p%02d" % i], 10_000), upload=[True])
            assert evicted == []
            written += entries
    assert info.value.errno == errno.ENOSPC and not isinstance(info.value, BatchFailed)
    used, index = tier.used_bytes(), index_key_map(tier)
    with pytest.raises(OSError) as info:  # refused before any I/O: nothing evicted, nothing written
        tier.write_batch(make_blocks("ns", [b"late"], 10_000))
    assert info.value.errno == errno.ENOSPC
    assert tier.used_bytes() == used and index_key_map(tier) == index and tier.upload_backlog() == len(written)
    tier.settle_uploads([("ns", e.key) for e in written[:3]])  # the first segment's blocks
    (late,), evicted = tier.write_batch(make_blocks("ns", [b"late"], 10_000))
    assert [e.key for e in evicted] == [e.key for e in written[:3]]
    assert read_ok(tier, late, payload_for("ns", b"late", 10_000))


@pytest.mark.parametrize("track", [True, False])
def test_track_uploads_gives_adopted_records_obligations(tiers, tmp_path, track):
    tier, _ = tiers(segment_bytes=256 << 10)
    tier.write_batch(make_blocks("ns", keys(3, b"a"), 3000))
    lost, _ = tier.write_batch(make_blocks("ns", keys(4, b"b"), 3000))
    tier.close()
    unindex_batch(tmp_path / "disk", lost)  # written but never indexed: its obligation never written
    tier, report = tiers(segment_bytes=256 << 10, track_uploads=track)
    assert (report.indexed, report.adopted) == (3, 4)
    expected = [("ns", e.key) for e in lost] if track else []
    assert tier.pending_uploads() == (expected, None) and report.uploads_created == len(expected)


# ---------------------------------------------------------------------- failed batches


def test_failed_batch_after_eviction_reports_what_it_evicted(tiers):
    fs = FaultyFS()
    tier, _ = tiers(fs=fs, capacity_bytes=96 << 10, segment_bytes=64 << 10)
    old, _ = tier.write_batch(make_blocks("ns", keys(3, b"old"), 10_000))
    fs.arm("fdatasync", 1)  # after eviction and the writes, before the index commit
    batch = make_blocks("ns", [b"old00"], 10_000) + make_blocks("ns", keys(3, b"new"), 10_000)
    with pytest.raises(BatchFailed) as info:
        tier.write_batch(batch)
    failure = info.value
    assert failure.errno == errno.ENOSPC and "injected" in failure.strerror
    assert isinstance(failure.__cause__, OSError) and failure.__cause__.errno == errno.ENOSPC
    assert sorted(failure.evicted, key=lambda e: e.key) == old  # old00 included: it is gone too
    assert list(tier.entries()) == [] and tier.used_bytes() == 0
    entries, evicted = tier.write_batch(batch)  # fault cleared
    assert evicted == [] and all(read_ok(tier, e, bytes(v)) for e, (_, v) in zip(entries, batch))


# ---------------------------------------------------------------------- LMDB map size


def test_map_size_is_derived_from_capacity(tmp_path):
    small = DiskTier(str(tmp_path / "a"), capacity_bytes=4 << 20)
    assert small.lmdb_map_bytes == 64 << 20  # the floor
    large = DiskTier(str(tmp_path / "b"), capacity_bytes=1 << 40)
    assert large.lmdb_map_bytes >= (1 << 40) // ALIGN * 1024
    with pytest.raises(ValueError, match="too small"):
        DiskTier(str(tmp_path / "c"), capacity_bytes=1 << 40, lmdb_map_bytes=1 << 30)
    assert DiskTier(str(tmp_path / "d"), capacity_bytes=4 << 20, lmdb_map_bytes=8 << 20).lmdb_map_bytes == 8 << 20


def test_full_map_fails_the_batch_with_enospc(tiers):
    tier, _ = tiers(segment_bytes=1 << 20)
    tier.write_batch(make_blocks("ns", [b"first"], 100))
    used = tier.used_bytes()
    info = tier._env.info()
    tier._env.set_mapsize((info["last_pgno"] + 1) * 4096)  # as if the derived size were wrong
    with pytest.raises(OSError) as failure:
        tier.write_batch(make_blocks("ns" * 60, [b"%032d" % i for i in range(200)], 0))
    assert failure.value.errno == errno.ENOSPC
    assert [e.key for e in tier.entries()] == [b"first"] and tier.used_bytes() == used
    tier._env.set_mapsize(16 << 20)
    tier.write_batch(make_blocks("ns", [b"second"], 100))
    assert tier.contains("ns", b"second")


# ---------------------------------------------------------------------- format version 2 records

from kvtier.tiers.block import BlockHeader, BlockOrigin, checksum, pack_token_ids  # noqa: E402


def routed_blocks(count: int, token_count: int, align: int):
    """Blocks of 3000 bytes whose version 2 headers carry `token_count` token ids (the header area
    of each spans several `align`s when they are many)."""
    blocks = []
    for i in range(count):
        key = b"r%02d" % i
        payload = payload_for("ns", key, 3000)
        tokens = pack_token_ids([i * 10_000 + j for j in range(token_count)])
        header = BlockHeader("ns", key, b"r%02d" % (i - 1) if i else b"", 3000, checksum(payload), 1, tokens,
                             BlockOrigin("engine", "model", token_count, ""))
        blocks.append((header, memoryview(payload)))
    return blocks


@pytest.mark.parametrize("damage", ["long header", "payload"])
def test_salvage_walks_version_2_records_with_long_headers_past_damage_and_cuts_a_torn_one(tiers, tmp_path, damage):
    """Recovery from the segment files alone, with records whose header area is 3 `align`s (512-byte
    alignment, 256 token ids) beside version 1 records: a damaged record costs only itself, and a
    record cut inside its long header is a torn tail."""
    align = 512
    tier, _ = tiers(align=align, segment_bytes=1 << 20)
    old = make_blocks("ns", keys(2, b"v1-"), 3000)
    routed = routed_blocks(6, 256, align)
    area = align_up(routed[0][0].encoded_len, align)
    assert area == 3 * align
    entries, _ = tier.write_batch(old[:1] + routed + old[1:])
    tier.close()
    shutil.rmtree(tmp_path / "disk" / "index.lmdb")
    (path,) = segment_files(tmp_path / "disk")
    victim = entries[3]  # routed[2]
    # The header's second `align` (token ids), or the payload after the long header area.
    flip_byte(path, victim.offset + (align + 100 if damage == "long header" else area + 100))
    last = entries[-1]  # the last record (version 1) becomes a version 2 record cut in its long header
    with open(path, "r+b") as f:
        f.seek(last.offset)
        f.write(routed[0][0].encode()[:align + 7].ljust(2 * align, b"\0"))
        f.truncate(last.offset + 2 * align)
    tier, report = tiers(align=align, segment_bytes=1 << 20)
    kept = [e for i, e in enumerate(entries[:-1]) if i != 3]
    assert (report.adopted, report.bad_regions, report.torn) == (len(kept), 1, 1)
    assert report.skipped_bytes == area + align_up(3000, align)
    assert os.path.getsize(path) == last.offset  # the torn tail is cut
    assert index_key_map(tier) == {("ns", e.key): e for e in kept}
    assert all(e.token_ids and e.origin == BlockOrigin("engine", "model", 256, "") for e in kept if e.key[:1] == b"r")
    assert_all_read(tier, [b for b in old[:1] + routed + old[1:] if b[0].key not in (victim.key, last.key)])
    again = tier.recover()
    assert (again.indexed, again.adopted, again.bad_regions, again.torn) == (len(kept), 0, 0, 0)
