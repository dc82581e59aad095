"""kvtier's NVMe tier vs raw O_DIRECT I/O on the same file system, in the same run.

Raw (the limit): O_DIRECT pwrite of each 2 MiB block from an aligned mmap buffer to a file under
bench/out/tmp, fdatasync after every `--batch` blocks; O_DIRECT pread (preadv) of every block back
into an aligned buffer, with one thread and with `--threads` threads.

kvtier, tier alone: kvtier.tiers.disk.DiskTier(o_direct=True) in this process; write_batch of
`--batch` blocks whose payload views are slices of an aligned mmap (the tier hashes each payload,
writes header areas + payloads with pwritev, fdatasyncs, indexes the batch in LMDB); read_into an
aligned destination (one preadv per block, header and xxh3 verified). Raw and tier batches
alternate, so both see the same device state.

kvtier, end to end: a kvtierd with disk.o_direct=true and a small CPU tier. Puts go through the
shared-memory path, first with wait_durable=True (each commit returns once its blocks are
fdatasync'ed and indexed), then without waiting, timed until the write-through backlog is empty.
Then every block of the first set is read back with acquire/copy/release in put order: by then
each one has been evicted from the small CPU tier, so every Acquire promotes it from disk (checked
with the daemon's counters). Each end-to-end phase is compared with a raw pass of the same kind
run right before it.
"""

from __future__ import annotations

import argparse
import mmap
import os
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import xxhash

from _common import Row, Timer, add_common_args, human_bytes, log, parse_size, work_dir, write_results
from _daemon import BenchDaemon

NAMESPACE = "bench-disk"
MB = 1e6


def aligned_buffer(size: int) -> tuple[mmap.mmap, memoryview, np.ndarray]:
    """Anonymous mmap (page aligned), faulted in; returns (mmap, memoryview, uint8 array)."""
    buf = mmap.mmap(-1, size)
    arr = np.frombuffer(buf, dtype=np.uint8)
    arr[:] = 1
    return buf, memoryview(buf), arr


class Raw:
    """The physical limit: a plain O_DIRECT file, written and read either block by block (pwrite/pread of
    each block) or vectored (one pwritev/preadv per batch, as DiskTier.write_batch issues its batch)."""

    def __init__(self, path: str, block: int, batch: int, blocks: int, threads: int, src_views, dst_views,
                 vectored: bool):
        self.path, self.block, self.batch, self.blocks = path, block, batch, blocks
        self.src, self.dst = src_views, dst_views
        self.vectored = vectored
        self.write_label = "raw O_DIRECT, one pwritev per batch" if vectored else "raw O_DIRECT, pwrite per block"
        self.read_label = "raw O_DIRECT, one preadv per batch" if vectored else "raw O_DIRECT, pread per block"
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_DIRECT | os.O_CLOEXEC, 0o600)
        self.pool = ThreadPoolExecutor(threads)

    def write_batch(self, first: int, count: int) -> None:
        if self.vectored:
            done = os.pwritev(self.fd, self.src[:count], first * self.block)
            if done != count * self.block:
                raise OSError(f"short O_DIRECT write: {done} of {count * self.block}")
        else:
            for i in range(count):
                done = os.pwrite(self.fd, self.src[i], (first + i) * self.block)
                if done != self.block:
                    raise OSError(f"short O_DIRECT write: {done} of {self.block}")
        os.fdatasync(self.fd)

    def read_blocks(self, first: int, slots: range) -> None:
        if self.vectored:
            done = os.preadv(self.fd, [self.dst[slot] for slot in slots], first * self.block)
            if done != len(slots) * self.block:
                raise OSError(f"short O_DIRECT read: {done} of {len(slots) * self.block}")
            return
        for j, slot in enumerate(slots):
            done = os.preadv(self.fd, [self.dst[slot]], (first + j) * self.block)
            if done != self.block:
                raise OSError(f"short O_DIRECT read: {done} of {self.block}")

    def read_batch(self, first: int, count: int, threads: int = 1) -> None:
        if threads == 1:
            self.read_blocks(first, range(count))
            return
        per = -(-count // threads)
        parts = [range(i, min(i + per, count)) for i in range(0, count, per)]
        list(self.pool.map(lambda part: self.read_blocks(first + part[0], part), parts))

    def truncate(self) -> None:
        """Empties the file: the next writes allocate, as the tier's writes into new segment files do."""
        os.ftruncate(self.fd, 0)
        os.fsync(self.fd)

    def write_pass(self) -> None:
        """Writes every block into a fresh (truncated) file."""
        self.truncate()
        for first in range(0, self.blocks, self.batch):
            self.write_batch(first, min(self.batch, self.blocks - first))

    def close(self) -> None:
        self.pool.shutdown()
        os.close(self.fd)
        os.remove(self.path)


class Raws:
    """Both raw variants on their own files; each call times each of them and returns {label: seconds}."""

    def __init__(self, tmp: str, *args):
        self.raws = [Raw(os.path.join(tmp, f"raw-odirect-{kind}.bin"), *args, vectored=kind == "vectored")
                     for kind in ("per-block", "vectored")]

    @staticmethod
    def _timed(fn, *args) -> float:
        t0 = time.perf_counter()
        fn(*args)
        return time.perf_counter() - t0

    def write_batch(self, first: int, count: int) -> dict[str, float]:
        return {r.write_label: self._timed(r.write_batch, first, count) for r in self.raws}

    def read_batch(self, first: int, count: int, threads: int = 1) -> dict[str, float]:
        suffix = f", {threads} threads" if threads > 1 else ""
        return {r.read_label + suffix: self._timed(r.read_batch, first, count, threads) for r in self.raws}

    def write_pass(self) -> dict[str, float]:
        for r in self.raws:
            r.truncate()
        return {r.write_label: self._timed(r.write_pass) for r in self.raws}

    def truncate(self) -> None:
        for r in self.raws:
            r.truncate()

    def close(self) -> None:
        for r in self.raws:
            r.close()


def add_times(acc: dict, key: str, times: dict[str, float]) -> None:
    """acc[key][label] += seconds, for every label in times."""
    slot = acc.setdefault(key, {})
    for label, seconds in times.items():
        slot[label] = slot.get(label, 0.0) + seconds


def fastest(times: dict[str, float]) -> tuple[float, str]:
    """(seconds, label) of the fastest raw variant: the limit."""
    label = min(times, key=times.get)
    return times[label], label


def bench_tier(args, tmp: str, raw: Raws, src_views, dst_views) -> dict:
    """Raw and DiskTier, batch by batch interleaved. Returns seconds per phase."""
    from kvtier.tiers.block import BlockHeader
    from kvtier.tiers.disk import DiskTier

    block, batch, blocks = args.block, args.batch, args.total // args.block
    sums = [xxhash.xxh3_64_intdigest(v) for v in src_views]
    tier_dir = os.path.join(tmp, "disktier")
    shutil.rmtree(tier_dir, ignore_errors=True)
    capacity = max(2 * args.total, 4 * args.segment) + 2 * args.segment
    tier = DiskTier(tier_dir, capacity_bytes=capacity, segment_bytes=args.segment, align=4096, o_direct=True)
    tier.recover()
    created = int(time.time() * 1000)
    t = dict.fromkeys(["tier write", "tier read", "tier read, threads"], 0.0)
    entries: list[list] = []
    pool = ThreadPoolExecutor(args.threads)

    def tier_read(b: int, part: range) -> bool:
        return all(tier.read_into(entries[b][i], dst_views[i]) for i in part)

    try:
        for b, first in enumerate(range(0, blocks, batch)):
            n = min(batch, blocks - first)
            add_times(t, "raw write", raw.write_batch(first, n))
            records = [(BlockHeader(NAMESPACE, (first + i).to_bytes(32, "big"),
                                    (first + i - 1).to_bytes(32, "big") if first + i else b"", block, sums[i],
                                    created), src_views[i]) for i in range(n)]
            t2 = time.perf_counter()
            written, evicted = tier.write_batch(records)
            t3 = time.perf_counter()
            if evicted:
                raise RuntimeError(f"DiskTier evicted {len(evicted)} blocks: capacity too small for the bench")
            entries.append(written)
            t["tier write"] += t3 - t2
        for threads, suffix in ((1, ""), (args.threads, ", threads")):
            for b, first in enumerate(range(0, blocks, batch)):
                n = len(entries[b])
                add_times(t, "raw read" + suffix, raw.read_batch(first, n, threads))
                t1 = time.perf_counter()
                if threads == 1:
                    ok = tier_read(b, range(n))
                else:
                    per = -(-n // threads)
                    ok = all(pool.map(lambda part, b=b: tier_read(b, part),
                                      [range(i, min(i + per, n)) for i in range(0, n, per)]))
                t2 = time.perf_counter()
                if not ok:
                    raise RuntimeError(f"DiskTier.read_into failed in batch {b}")
                t["tier read" + suffix] += t2 - t1
            if bytes(dst_views[0][:4096]) != bytes(src_views[0][:4096]):
                raise RuntimeError("read back different bytes")
    finally:
        pool.shutdown()
        tier.close()
        shutil.rmtree(tier_dir, ignore_errors=True)
    return t


# -- end to end through kvtierd ---------------------------------------------------------------------
def _put_batch(client, keys, first, count, src, sums, wait_durable, timer: Timer) -> None:
    """Stores keys[first:first+count] (parent = the previous key) through the shared-memory path."""
    block = src.shape[1]
    with timer("allocate"):
        allocation = client.allocate(count)
        arena = client.arena()
    entries = []
    with timer("copy in + xxh3 (client)"):
        for i, slot in enumerate(allocation.slots):
            np.copyto(np.frombuffer(arena.view(slot), dtype=np.uint8, count=block), src[i])
            digest = xxhash.xxh3_64_intdigest(src[i])
            assert digest == sums[i]
            k = first + i
            entries.append((keys[k], keys[k - 1] if k else b"", slot, block, digest))
    with timer("commit" + (" (wait_durable)" if wait_durable else "")):
        statuses = client.commit(allocation.id, NAMESPACE, entries, wait_durable=wait_durable)
    if any(s != 1 for s in statuses):  # pb.STORED == 1
        raise RuntimeError(f"commit did not store every block: {statuses}")


def _put_batches(client, keys, src, sums, batch, wait_durable, timer: Timer) -> None:
    for first in range(0, len(keys), batch):
        _put_batch(client, keys, first, min(batch, len(keys) - first), src, sums, wait_durable, timer)


def _get_batch(client, chunk, dst, timer: Timer) -> None:
    with timer("acquire (promotes from disk)"):
        lease = client.acquire(NAMESPACE, chunk)
        arena = client.arena()
    if not all(x.found for x in lease.blocks):
        raise RuntimeError("acquire missed stored blocks")
    with timer("copy out"):
        for i, found in enumerate(lease.blocks):
            np.copyto(dst[i], np.frombuffer(arena.view(found.slot), dtype=np.uint8, count=found.length))
    with timer("release"):
        client.release(lease.id)


def _tier(stats, name):
    for tier in stats.tiers:
        if tier.tier == name:
            return tier
    raise KeyError(name)


def _wait_all_durable(client, expected_disk_writes: int, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        stats = client.stats()
        if stats.write_backlog == 0 and _tier(stats, "disk").writes >= expected_disk_writes:
            return
        time.sleep(0.002)
    raise TimeoutError("the write-through backlog did not drain")


def bench_daemon(args, tmp: str, raw: Raws) -> dict:
    """End to end through kvtierd: puts (durable), then reads of blocks that only the disk tier holds."""
    block, batch = args.block, args.e2e_batch
    blocks = args.total // block
    cpu_slots = max(2 * batch, parse_size(args.e2e_cpu) // block)
    overrides = {"cpu.capacity": cpu_slots * block, "cpu.slot_bytes": block, "disk.enabled": True,
                 "disk.o_direct": True, "disk.capacity": 3 * args.total + cpu_slots * block + 2 * args.segment,
                 "disk.segment_bytes": args.segment, "disk.batch_blocks": 64, "disk.readers": args.threads}
    src = np.random.default_rng(11).integers(0, 256, size=(batch, block), dtype=np.uint8)
    sums = [xxhash.xxh3_64_intdigest(src[i]) for i in range(batch)]
    dst = np.ones_like(src)
    keys = [i.to_bytes(32, "big") for i in range(blocks)]
    more_keys = [(blocks + i).to_bytes(32, "big") for i in range(blocks)]
    out: dict = {"bytes": blocks * block, "blocks": blocks, "cpu_blocks": cpu_slots, "breakdown": {}}
    log(f"disk: end to end through kvtierd ({human_bytes(cpu_slots * block)} CPU tier, o_direct)")
    with BenchDaemon(tmp, overrides, name="disk-e2e") as daemon, daemon.client() as client:
        client.wait_ready()
        client.register_namespace(NAMESPACE, {"bench": "disk"})
        # 0. warm-up: fill the arena once (its first touch costs page faults) and let it drain to disk
        warm_keys = [b"warm" + i.to_bytes(28, "big") for i in range(cpu_slots)]
        _put_batches(client, warm_keys, src, sums, batch, True, Timer())
        # 1. puts that each wait until their blocks are durable (fdatasync'ed + indexed), each batch right
        #    after a raw batch of the same size (fdatasync per batch too) into a fresh file
        raw.truncate()
        timer = Timer()
        out["put durable"] = 0.0
        for first in range(0, blocks, batch):
            n = min(batch, blocks - first)
            add_times(out, "raw write, durable", raw.write_batch(first, n))
            t1 = time.perf_counter()
            _put_batch(client, keys, first, n, src, sums, True, timer)
            out["put durable"] += time.perf_counter() - t1
        out["breakdown"]["put, wait_durable"] = timer.totals
        # 2. puts that do not wait, timed until the write-through has made the last one durable. Raw writes
        #    would compete with the daemon's background writes, so the raw pass runs right before instead.
        out["raw write, pipelined"] = raw.write_pass()
        timer = Timer()
        t0 = time.perf_counter()
        _put_batches(client, more_keys, src, sums, batch, False, timer)
        with timer("drain write-through"):
            _wait_all_durable(client, 2 * blocks + cpu_slots)
        out["put pipelined"] = time.perf_counter() - t0
        out["breakdown"]["put, no wait, until durable"] = timer.totals
        # 3. reads of the first set, `batch` keys at a time, each right after a raw read of the same batch:
        #    every block is disk-only when it is asked for (counted with the daemon's disk reads)
        with ThreadPoolExecutor(args.threads) as pool:
            for label, threads in (("get", 1), ("get, threads", args.threads)):
                before = _tier(client.stats(), "disk").reads
                timer = Timer()
                out[label] = 0.0
                per = -(-batch // threads)
                for first in range(0, blocks, batch):
                    n = min(batch, blocks - first)
                    add_times(out, f"raw read, {label}", raw.read_batch(first, n, threads))
                    t1 = time.perf_counter()
                    if threads == 1:
                        _get_batch(client, keys[first:first + n], dst, timer)
                    else:
                        list(pool.map(lambda start: _get_batch(client, keys[start:min(start + per, first + n)],
                                                               dst[start - first:], Timer()),
                                      range(first, first + n, per)))
                    t2 = time.perf_counter()
                    out[label] += t2 - t1
                out[f"promoted, {label}"] = _tier(client.stats(), "disk").reads - before
                if threads == 1:
                    out["breakdown"]["get of disk-only blocks"] = timer.totals
    return out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--total", type=parse_size, default=parse_size("1GiB"),
                        help="bytes written and read back per measurement (default 1GiB)")
    parser.add_argument("--block", type=parse_size, default=parse_size("2MiB"), help="block bytes (default 2MiB)")
    parser.add_argument("--batch", type=int, default=64, help="blocks per write_batch / fdatasync (default 64)")
    parser.add_argument("--segment", type=parse_size, default=parse_size("256MiB"), help="segment bytes")
    parser.add_argument("--threads", type=int, default=4,
                        help="threads of the parallel read rows, and the daemon's disk.readers (default 4)")
    parser.add_argument("--e2e-batch", type=int, default=32, help="blocks per put/get through the daemon")
    parser.add_argument("--e2e-cpu", default="128MiB", help="CPU tier of the end-to-end daemon (default 128MiB)")
    parser.add_argument("--skip-e2e", action="store_true")
    add_common_args(parser)
    args = parser.parse_args(argv)
    if args.block % 4096:
        parser.error("--block must be a multiple of 4096 for O_DIRECT")
    blocks = args.total // args.block
    if blocks < 1:
        parser.error("--total must hold at least one block")

    tmp = work_dir(args.out)
    log(f"disk: {human_bytes(args.total)} in {human_bytes(args.block)} blocks, batches of {args.batch}, "
        f"under {tmp}")
    batch_slots = max(args.batch, args.e2e_batch)
    _src_map, src_view, src_arr = aligned_buffer(batch_slots * args.block)
    src_arr[:] = np.random.default_rng(7).integers(0, 256, size=src_arr.size, dtype=np.uint8)
    _dst_map, dst_view, _ = aligned_buffer(batch_slots * args.block)
    src_views = [src_view[i * args.block:(i + 1) * args.block] for i in range(batch_slots)]
    dst_views = [dst_view[i * args.block:(i + 1) * args.block] for i in range(batch_slots)]
    raw = Raws(str(tmp), args.block, args.batch, blocks, args.threads, src_views, dst_views)
    try:
        t = bench_tier(args, str(tmp), raw, src_views[:args.batch], dst_views[:args.batch])
        e2e = None if args.skip_e2e else bench_daemon(args, str(tmp), raw)
    finally:
        raw.close()
        del src_views, dst_views, src_view, dst_view

    total = blocks * args.block
    mbps = lambda seconds: total / seconds / MB  # noqa: E731
    th = args.threads
    raw_table: list[dict] = []

    def row(name: str, seconds: float, raw_key: str, source: dict, **kw) -> Row:
        """A row against the fastest raw variant measured for the same phase."""
        limit_s, label = fastest(source[raw_key])
        for variant, variant_s in source[raw_key].items():
            raw_table.append({"phase": name, "raw variant": variant, "MB/s": mbps(variant_s),
                              "used as limit": variant == label, "kvtier MB/s": mbps(seconds)})
        return Row(name, mbps(seconds), "MB/s", mbps(limit_s), label + (" + fdatasync" if "write" in raw_key else ""),
                   goal=0.8, **kw)

    rows = [
        row("DiskTier.write_batch (o_direct)", t["tier write"], "raw write", t, headline=True,
            notes=f"batches of {args.batch}: xxh3 check + one pwritev + fdatasync + LMDB commit"),
        row("DiskTier.read_into (o_direct)", t["tier read"], "raw read", t, headline=True,
            notes="one preadv per block + header and xxh3 verify"),
        row(f"DiskTier.read_into, {th} threads", t["tier read, threads"], "raw read, threads", t,
            notes="the daemon promotes with disk.readers threads"),
    ]
    details = {}
    if e2e is not None:
        rows += [
            row("kvtierd put, wait_durable (o_direct)", e2e["put durable"], "raw write, durable", e2e,
                notes=f"one client, batches of {args.e2e_batch}, each commit waits for its blocks' fdatasync"),
            row("kvtierd put, no wait, until all durable", e2e["put pipelined"], "raw write, pipelined", e2e,
                notes="copy/commit overlap the write-through; timed until the backlog is empty"),
            row("kvtierd get of disk-only blocks", e2e["get"], "raw read, get", e2e,
                notes=f"one Acquire of {args.e2e_batch} keys at a time; {e2e['promoted, get']} of {blocks} "
                      "blocks promoted from disk"),
            row(f"kvtierd get of disk-only blocks, {th} concurrent Acquires", e2e["get, threads"],
                "raw read, get, threads", e2e,
                notes=f"{th} client threads split each batch of {args.e2e_batch}; "
                      f"{e2e['promoted, get, threads']} of {blocks} blocks promoted from disk"),
        ]
        batches = -(-blocks // args.e2e_batch)
        for name, phases in e2e["breakdown"].items():
            whole = sum(phases.values())
            details[f"Where the time goes, kvtierd {name} (mean ms per batch of {args.e2e_batch} blocks)"] = [
                {"phase": phase, "ms per batch": seconds * 1e3 / batches, "share": seconds / whole}
                for phase, seconds in phases.items()]
    details = {"Raw variants measured for each row (the faster one is the limit)": raw_table, **details}
    notes = [
        f"DiskTier rows: raw and tier batches alternate (raw batch k, then tier batch k), so both see the same "
        f"device state; each figure is {human_bytes(total)} / the sum of its batch times. Two raw variants run, "
        "each on its own file: pwrite/pread per block and one pwritev/preadv per batch; the faster is the limit.",
        "MB/s = 10^6 bytes/s of block payload (the tier also writes a 4 KiB header area per block).",
        f"Scratch files under {tmp} are deleted at the end.",
    ]
    if e2e is not None:
        notes.append(f"kvtierd rows: CPU tier of {e2e['cpu_blocks']} slots, disk.o_direct=true, disk.readers={th}; "
                     "put (wait_durable) and get batches alternate with raw batches of the same size; the no-wait "
                     "put is compared with a raw pass run right before it (raw writes would compete with the "
                     "daemon's background write-through).")
    params = {"total": human_bytes(args.total), "block": human_bytes(args.block), "batch": args.batch,
              "segment": human_bytes(args.segment), "threads": th, "e2e_batch": args.e2e_batch,
              "e2e_cpu": args.e2e_cpu}
    data = write_results("disk", "NVMe tier vs raw O_DIRECT", rows, params, args.out, details, notes,
                         plot=not args.no_plot)
    data["raw"] = {"tier": t, "e2e": e2e}
    return data


if __name__ == "__main__":
    main(sys.argv[1:])
