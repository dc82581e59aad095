"""`bench_agentic.py --daemon`: replays an agentic trace block by block through a real kvtierd.

One kvtierd per policy (cpu.policy = "lru" or "retention"), a CPU tier of `capacity` slots of 4 KiB
and the disk tier on (large enough for every block), driven through kvtier.client.Client the way an
engine and its harness would drive it:
  * per request: Lookup(inputs) -> the stored prefix and each block's tier mask: a CPU hit, a disk hit
    (a promotion) or, past the stored prefix, a miss; Acquire + Release of the stored prefix in chunks
    of a quarter of the CPU tier (a lease pins its blocks, so one lease must fit: an engine loads a
    long prefix in pieces too), which touches the CPU hits and promotes the disk hits into the CPU
    tier; put_blocks of the misses and the outputs,
    grouped by class, each group with its retention (wait_durable, so that no block is still queued
    for the write-through when the next request evicts);
  * per retention hint: SetRetention on the key range (subagent finished, task done, task resumed).
Time is compressed by `time_scale`: an op at trace time t is sent at t / time_scale seconds after the
start (or as soon as the previous op is done), and every TTL sent is divided by time_scale, so that
the daemon's wall-clock TTLs and ages line up with the trace's. The simulator runs the same trace
with its clock at t / time_scale, so the two CPU-tier hit rates can be compared directly.
"""

from __future__ import annotations

import time
from collections import Counter

from _agentic_trace import HARNESS_RETENTION, HINTS, Trace
from _daemon import BenchDaemon

from kvtier.client import retention as pb_retention
from kvtier.proto.v1 import kvtier_pb2 as pb

NS = "agentic"
SLOT = 4096
PAYLOAD = b"kv" * 32          # 64 bytes per block: the bytes do not matter, the slots do


def key_of(block: int) -> bytes:
    return block.to_bytes(8, "big")


def scaled(ret, time_scale: float):
    return pb_retention(ret.cls, ret.priority, (ret.ttl_s / time_scale) if ret.ttl_s else 0.0)


def set_retention(client, keys: list[bytes], ret: pb.Retention, limit: int) -> None:
    method = getattr(client, "set_retention", None)
    for start in range(0, len(keys), limit):
        chunk = keys[start:start + limit]
        if method is not None:
            method(NS, chunk, ret)
        else:
            client.call(client.stub.SetRetention, pb.SetRetentionRequest(namespace=NS, keys=chunk, retention=ret))


def replay(tr: Trace, capacity: int, policy: str, work_dir, time_scale: float, hints: bool = True) -> dict:
    overrides = {"cpu.capacity": capacity * SLOT, "cpu.slot_bytes": SLOT, "cpu.policy": policy,
                 "disk.enabled": True, "disk.capacity": "1GiB", "disk.segment_bytes": "4MiB"}
    cls = tr.cls
    stats = {"policy": policy, "capacity": capacity, "reads": 0, "cpu_hits": 0, "disk_hits": 0, "misses": 0,
             "hints_sent": 0, "hints_skipped": None, "late_s": 0.0}
    by_class = {"reads": Counter(), "cpu_hits": Counter()}
    ret_pb = {c: scaled(r, time_scale) for c, r in HARNESS_RETENTION.items()}
    hint_pb = {n: scaled(r, time_scale) for n, r in HINTS.items()}
    stored: set[int] = set()
    phase = Counter()                          # seconds per client call kind
    started = time.perf_counter()
    with BenchDaemon(work_dir, overrides, name=f"agentic-{policy}") as daemon, daemon.client() as c:
        c.register_namespace(NS)
        limit = c.arena().max_keys_per_request or 1024
        chunk = max(1, min(limit, capacity // 4))   # a lease pins its blocks: never more than the tier holds
        t0 = time.monotonic()
        for op in tr.ops:
            due = t0 + op[0] / time_scale
            wait = due - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            else:
                stats["late_s"] = max(stats["late_s"], -wait)
            if op[2] == "hint":
                if not hints or stats["hints_skipped"]:
                    continue
                keys = [key_of(b) for b in op[3] if b in stored]
                if keys:
                    try:
                        set_retention(c, keys, hint_pb[op[4]], limit)
                        stats["hints_sent"] += 1
                    except Exception as exc:  # the RPC is not there (yet): say so and go on without hints
                        stats["hints_skipped"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
                continue
            inputs, outputs = op[3], op[4]
            keys = [key_of(b) for b in inputs]
            matched, tiers = 0, b""
            t1 = time.perf_counter()
            for start in range(0, len(keys), limit):
                r = c.lookup(NS, keys[start:start + limit])
                matched += r.matched
                tiers += r.tiers
                if r.matched < len(keys[start:start + limit]):
                    break
            for b, mask in zip(inputs, tiers):
                by_class["reads"][cls[b]] += 1
                if mask & pb.TIER_CPU:
                    stats["cpu_hits"] += 1
                    by_class["cpu_hits"][cls[b]] += 1
                else:
                    stats["disk_hits"] += 1
            stats["misses"] += len(inputs) - matched
            for b in inputs[matched:]:
                by_class["reads"][cls[b]] += 1
            stats["reads"] += len(inputs)
            t2 = time.perf_counter()
            phase["lookup"] += t2 - t1
            for start in range(0, matched, chunk):
                lease = c.acquire(NS, keys[start:min(matched, start + chunk)])
                if lease.id:
                    c.release(lease.id)
            t3 = time.perf_counter()
            phase["acquire+release"] += t3 - t2
            new = list(inputs[matched:]) + list(outputs)
            groups: dict[str, list] = {}
            parent = keys[matched - 1] if matched else b""
            for b in new:
                k = key_of(b)
                groups.setdefault(cls[b], []).append((k, parent, PAYLOAD))
                parent = k
                stored.add(b)
            for klass, blocks in groups.items():
                for start in range(0, len(blocks), limit):
                    c.put_blocks(NS, blocks[start:start + limit], wait_durable=True, retention=ret_pb[klass])
            phase["put_blocks"] += time.perf_counter() - t3
        s = c.stats()
        cpu = next(t for t in s.tiers if t.tier == "cpu")
        stats.update(cpu_reads=cpu.reads, cpu_writes=cpu.writes, evictions=cpu.evictions,
                     pressure=cpu.pressure_evictions, duplicates=s.duplicates)
    stats["wall_s"] = time.perf_counter() - started
    stats["by_class"] = {k: dict(v) for k, v in by_class.items()}
    stats["phase_s"] = {k: round(v, 1) for k, v in phase.items()}
    return stats
