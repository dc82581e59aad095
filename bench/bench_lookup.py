"""Lookup throughput over the Unix socket: hashes (keys) per second in batches of 256 keys of 32 bytes.

The daemon holds `--blocks` blocks (tiny payloads) in chains of `--chain` keys, each key's parent
the previous one. Each Lookup asks for one chain of 256 keys: half the requests ask for a fully
stored chain, the other half for a chain stored only up to a random point (the rest are unknown
keys; Lookup stops at the first miss).

Measured, each for `--seconds`:
  sync client, one thread          Client.lookup in a loop
  sync client, N threads           one shared channel, N threads
  asyncio client, K in flight      AsyncClient.lookup, K concurrent calls on one channel
  1-key Lookup                     the per-RPC floor (sync and asyncio)
Limit measured in the same run: the daemon's own per-call work done in this process without gRPC
(decode the LookupRequest, Validator.keys, Catalog.lookup, encode the LookupResponse), on one core.
Goal: >= 1M hashes/s. The daemon's CPU time per call (from /proc) shows where the time goes.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import random
import signal
import sys
import tempfile
import threading
import time

from _common import Row, add_common_args, log, work_dir, write_results
from _daemon import BenchDaemon

NAMESPACE = "bench-lookup"
GOAL = 1_000_000


def chain_keys(chain: int, length: int, salt: bytes = b"") -> list[bytes]:
    keys, parent = [], salt + chain.to_bytes(8, "big")
    for _ in range(length):
        parent = hashlib.sha256(parent).digest()
        keys.append(parent)
    return keys


def build_requests(chains: list[list[bytes]], batch: int, count: int) -> tuple[list[list[bytes]], float]:
    """`count` key lists of `batch` stored keys (chains laid end to end, starting at a chain head); every
    second one is cut at a random point and continued with keys the daemon never saw. Returns them and
    the fraction of keys sent that match."""
    flat = [key for chain in chains for key in chain]
    rng = random.Random(42 + batch)
    requests, matched = [], 0
    for r in range(count):
        start = (r * len(chains[0])) % len(flat)
        keys = [flat[(start + i) % len(flat)] for i in range(batch)]
        if r % 2 and batch > 1:
            cut = rng.randrange(1, batch)
            keys[cut:] = chain_keys(10_000_000 + r, batch - cut, b"unknown")
            matched += cut
        else:
            matched += batch
        requests.append(keys)
    return requests, matched / (count * batch)


def populate(client, chains: list[list[bytes]], payload: bytes) -> None:
    for keys in chains:
        for start in range(0, len(keys), 256):
            part = keys[start:start + 256]
            blocks = [(k, keys[start + i - 1] if start + i else b"", payload) for i, k in enumerate(part)]
            statuses = client.put_blocks(NAMESPACE, blocks)
            if any(s != 1 for s in statuses):
                raise RuntimeError(f"populate: not every block stored: {set(statuses)}")


def in_process_rate(args, chains, requests) -> tuple[float, float]:
    """The daemon's per-call work without gRPC, in this process: (keys/s, calls/s)."""
    from kvtier.daemon.catalog import Block, Catalog
    from kvtier.daemon.config import LimitsConfig
    from kvtier.daemon.service import Validator
    from kvtier.proto.v1 import kvtier_pb2 as pb

    with tempfile.TemporaryDirectory(dir=work_dir(args.out)) as tmp:
        catalog = Catalog(tmp, 16)
        catalog.register(NAMESPACE, {"bench": "lookup"})
        for keys in chains:
            for i, key in enumerate(keys):
                catalog.add(Block(NAMESPACE, key, keys[i - 1] if i else b"", 64, 0, 0, 0, tiers=2))
        validator = Validator(LimitsConfig())
        wire = [pb.LookupRequest(namespace=NAMESPACE, keys=keys).SerializeToString() for keys in requests]

        def one(data: bytes) -> int:
            request = pb.LookupRequest.FromString(data)
            keys = validator.keys(request.keys)
            validator.namespace(request.namespace)
            tiers = catalog.lookup(request.namespace, keys)
            pb.LookupResponse(matched=len(tiers), tiers=tiers).SerializeToString()
            return len(keys)

        done = calls = 0
        start = time.perf_counter()
        while time.perf_counter() - start < min(args.seconds, 1.5):
            for data in wire:
                done += one(data)
                calls += 1
        elapsed = time.perf_counter() - start
    return done / elapsed, calls / elapsed


class Meter:
    """Wall time, this process's CPU time and the daemon's CPU time over a measurement."""

    def __init__(self, daemon: BenchDaemon):
        self.daemon = daemon

    def __enter__(self):
        self.wall = time.perf_counter()
        self.cpu = time.process_time()
        self.daemon_cpu = self.daemon.cpu_seconds()
        return self

    def __exit__(self, *exc):
        self.wall = time.perf_counter() - self.wall
        self.cpu = time.process_time() - self.cpu
        self.daemon_cpu = self.daemon.cpu_seconds() - self.daemon_cpu


def measure_sync(daemon, requests, seconds: float, threads: int) -> dict:
    client = daemon.client()
    client.wait_ready()
    counts = [[0, 0] for _ in range(threads)]
    deadline = [0.0]

    def worker(index: int) -> None:
        j = index
        while time.perf_counter() < deadline[0]:
            reply = client.lookup(NAMESPACE, requests[j % len(requests)])
            counts[index][0] += 1
            counts[index][1] += len(requests[j % len(requests)])
            j += threads
            if reply.matched > len(requests[0]):
                raise AssertionError("impossible match count")

    try:
        for keys in requests[:8]:
            client.lookup(NAMESPACE, keys)  # warm-up: channel, connection
        with Meter(daemon) as meter:
            deadline[0] = time.perf_counter() + seconds
            if threads == 1:
                worker(0)
            else:
                pool = [threading.Thread(target=worker, args=(i,)) for i in range(threads)]
                for t in pool:
                    t.start()
                for t in pool:
                    t.join()
    finally:
        client.close()
    return _result(meter, sum(c[0] for c in counts), sum(c[1] for c in counts))


def measure_async(daemon, requests, seconds: float, inflight: int) -> dict:
    from kvtier.client import AsyncClient

    async def run() -> tuple[Meter, int, int]:
        async with AsyncClient(daemon.socket) as client:
            for keys in requests[:8]:
                await client.lookup(NAMESPACE, keys)
            calls = keys_done = 0

            async def worker(index: int, deadline: float) -> None:
                nonlocal calls, keys_done
                j = index
                while time.perf_counter() < deadline:
                    keys = requests[j % len(requests)]
                    await client.lookup(NAMESPACE, keys)
                    calls += 1
                    keys_done += len(keys)
                    j += inflight

            with Meter(daemon) as meter:
                deadline = time.perf_counter() + seconds
                await asyncio.gather(*(worker(i, deadline) for i in range(inflight)))
            return meter, calls, keys_done

    meter, calls, keys_done = asyncio.run(run())
    return _result(meter, calls, keys_done)


def profile_daemon(args, overrides: dict, requests) -> list[dict]:
    """Runs a second daemon under cProfile (event-loop thread, profiling from SIGUSR1 on, so start-up is
    excluded), drives 1-key sync Lookups at it, returns its top functions by own CPU time."""
    import pstats

    prof = os.path.join(work_dir(args.out), "lookup-daemon.prof")
    launcher = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_profiled_daemon.py")
    with BenchDaemon(work_dir(args.out), overrides, name="lookup-profiled", python_args=[launcher, prof]) as daemon:
        with daemon.client() as client:
            client.register_namespace(NAMESPACE, {"bench": "lookup"})
        # Nothing stored: a 1-key Lookup of an unknown key costs the daemon the same RPC machinery.
        os.kill(daemon.pid, signal.SIGUSR1)  # start profiling now that start-up is over
        time.sleep(0.1)
        result = measure_sync(daemon, requests, args.profile_seconds, 1)
    stats = pstats.Stats(prof)
    os.remove(prof)
    calls = result["calls"]
    total_own = sum(v[2] for v in stats.stats.values())
    handler = sum(v[3] for (f, _l, func), v in stats.stats.items()
                  if f.endswith(os.path.join("daemon", "service.py")) and func == "Lookup")
    rows = [{"function (daemon, under cProfile)": "(all code on the event-loop thread)", "calls per Lookup": 1.0,
             "own us per Lookup": total_own / calls * 1e6, "cumulative us per Lookup": total_own / calls * 1e6},
            {"function (daemon, under cProfile)": "(kvtier) service.py KvTierService.Lookup", "calls per Lookup": 1.0,
             "own us per Lookup": None, "cumulative us per Lookup": handler / calls * 1e6}]
    for (filename, line, func), (_cc, ncalls, tottime, cumtime, _callers) in sorted(
            stats.stats.items(), key=lambda item: -item[1][2])[:args.profile_top]:
        where = f"{os.path.basename(filename)}:{line}({func})" if filename != "~" else func
        rows.append({"function (daemon, under cProfile)": where, "calls per Lookup": ncalls / calls,
                     "own us per Lookup": tottime / calls * 1e6, "cumulative us per Lookup": cumtime / calls * 1e6})
    return rows


def _result(meter: Meter, calls: int, keys: int) -> dict:
    return {"calls/s": calls / meter.wall, "hashes/s": keys / meter.wall, "calls": calls,
            "daemon CPU us/call": meter.daemon_cpu / calls * 1e6, "client CPU us/call": meter.cpu / calls * 1e6,
            "wall us/call": meter.wall / calls * 1e6,
            "daemon CPU busy": meter.daemon_cpu / meter.wall, "client CPU busy": meter.cpu / meter.wall}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--blocks", type=int, default=20_000, help="blocks stored in the daemon (default 20000)")
    parser.add_argument("--batch", type=int, default=256, help="keys per Lookup (default 256)")
    parser.add_argument("--chain", type=int, default=256, help="keys per stored chain (default 256)")
    parser.add_argument("--requests", type=int, default=64, help="distinct Lookup requests cycled (default 64)")
    parser.add_argument("--seconds", type=float, default=3.0, help="duration of each measurement (default 3)")
    parser.add_argument("--threads", type=int, default=4, help="threads of the threaded sync row (default 4)")
    parser.add_argument("--inflight", default="4,16,64", help="asyncio concurrency levels (default 4,16,64)")
    parser.add_argument("--sweep", default="1024,4096",
                        help="larger batch sizes measured with the best asyncio concurrency (default 1024,4096; "
                             "empty to skip)")
    parser.add_argument("--no-profile", dest="profile", action="store_false",
                        help="skip the cProfile run of a second daemon")
    parser.add_argument("--profile-seconds", type=float, default=2.0)
    parser.add_argument("--profile-top", type=int, default=12)
    add_common_args(parser)
    args = parser.parse_args(argv)
    inflight = [int(x) for x in args.inflight.split(",") if x]

    n_chains = max(1, args.blocks // args.chain)
    chains = [chain_keys(c, args.chain) for c in range(n_chains)]
    stored = n_chains * args.chain
    requests, hit_fraction = build_requests(chains, args.batch, args.requests)
    sweep = [int(x) for x in args.sweep.split(",") if x]
    if max([args.batch, *sweep]) > stored:
        parser.error("batch sizes must not exceed the number of stored blocks")
    ones = [[keys[0]] for keys in requests]

    log(f"lookup: limit: the daemon's per-call work in this process ({args.seconds:g} s)")
    limit_keys, limit_calls = in_process_rate(args, chains, requests)
    limit_one, _ = in_process_rate(args, chains, ones)

    slot = 4096
    overrides = {"cpu.capacity": max(2 * stored, 1024) * slot, "cpu.slot_bytes": slot, "disk.enabled": False}
    results: dict[str, dict] = {}
    with BenchDaemon(work_dir(args.out), overrides, name="lookup") as daemon:
        with daemon.client() as client:
            client.wait_ready()
            client.register_namespace(NAMESPACE, {"bench": "lookup"})
            log(f"lookup: storing {stored} blocks in {n_chains} chains of {args.chain}")
            populate(client, chains, os.urandom(64))
            assert client.stats().blocks == stored
        log(f"lookup: measuring, {args.seconds:g} s each")
        results["sync client, 1 thread"] = measure_sync(daemon, requests, args.seconds, 1)
        results[f"sync client, {args.threads} threads"] = measure_sync(daemon, requests, args.seconds, args.threads)
        for k in inflight:
            results[f"asyncio client, {k} in flight"] = measure_async(daemon, requests, args.seconds, k)
        results["1-key Lookup, sync client"] = measure_sync(daemon, ones, args.seconds, 1)
        best_k = max(inflight, key=lambda k: results[f"asyncio client, {k} in flight"]["calls/s"]) if inflight else 0
        if inflight:
            results[f"1-key Lookup, asyncio, {best_k} in flight"] = measure_async(daemon, ones, args.seconds, best_k)
        sweep_results = {}
        for size in sweep:
            reqs, _ = build_requests(chains, size, max(8, args.requests // 4))
            if best_k:
                sweep_results[size] = measure_async(daemon, reqs, args.seconds, best_k)
            else:
                sweep_results[size] = measure_sync(daemon, reqs, args.seconds, 1)
            sweep_results[size]["limit"] = in_process_rate(args, chains, reqs)[0]
    profile_rows = []
    if args.profile:
        log(f"lookup: profiling a second daemon under cProfile ({args.profile_seconds:g} s of 1-key Lookups)")
        profile_rows = profile_daemon(args, overrides, ones)

    rows: list[Row] = []
    best_name = max((n for n in results if not n.startswith("1-key")), key=lambda n: results[n]["hashes/s"])
    for name, res in results.items():
        one_key = name.startswith("1-key")
        rows.append(Row(f"Lookup of {'1 key' if one_key else f'{args.batch} keys'}, "
                        f"{name.removeprefix('1-key Lookup, ')}",
                        res["hashes/s"], "hashes/s", limit_one if one_key else limit_keys,
                        "same work in-process, no gRPC",
                        goal=GOAL if not one_key else None, goal_on="value", headline=name == best_name,
                        notes=f"{res['calls/s']:,.0f} calls/s; daemon CPU {res['daemon CPU us/call']:.0f} us/call, "
                              f"client CPU {res['client CPU us/call']:.0f} us/call"))
    for size, res in sweep_results.items():
        rows.append(Row(f"Lookup of {size} keys, {'asyncio client, %d in flight' % best_k if best_k else 'sync'}",
                        res["hashes/s"], "hashes/s", res["limit"], "same work in-process, no gRPC",
                        goal=GOAL, goal_on="value",
                        notes=f"informative (batch size sweep): {res['calls/s']:,.0f} calls/s; daemon CPU "
                              f"{res['daemon CPU us/call']:.0f} us/call"))
    floor = results["1-key Lookup, sync client"]
    details = {"Per-call costs (us): wall, and CPU of each side (2 cores: daemon and client each get at most one)": [
        {"measurement": name, "calls/s": res["calls/s"], "hashes/s": res["hashes/s"],
         "wall us/call": res["wall us/call"], "daemon CPU us/call": res["daemon CPU us/call"],
         "client CPU us/call": res["client CPU us/call"], "daemon CPU busy": res["daemon CPU busy"],
         "client CPU busy": res["client CPU busy"]} for name, res in results.items()] + [
        {"measurement": "in-process (no gRPC): decode + Validator.keys + Catalog.lookup + encode",
         "calls/s": limit_calls, "hashes/s": limit_keys, "wall us/call": 1e6 / limit_calls,
         "daemon CPU us/call": 1e6 / limit_calls},
        {"measurement": "in-process (no gRPC), 1 key", "calls/s": limit_one, "hashes/s": limit_one,
         "wall us/call": 1e6 / limit_one, "daemon CPU us/call": 1e6 / limit_one}] + [
        {"measurement": f"{size} keys per call (sweep)", "calls/s": res["calls/s"], "hashes/s": res["hashes/s"],
         "wall us/call": res["wall us/call"], "daemon CPU us/call": res["daemon CPU us/call"],
         "client CPU us/call": res["client CPU us/call"], "daemon CPU busy": res["daemon CPU busy"],
         "client CPU busy": res["client CPU busy"]} for size, res in sweep_results.items()]}
    if profile_rows:
        details["Daemon event-loop thread under cProfile (thread CPU time; the profiler inflates times, compare "
                "shares), 1-key sync Lookups"] = profile_rows
    best = results[best_name]
    rpc_us = floor["daemon CPU us/call"]
    notes = [
        f"{stored} blocks stored in {n_chains} chains of {args.chain}; {args.requests} distinct requests of "
        f"{args.batch} x 32-byte keys cycled, half fully stored and half stored up to a random point: "
        f"{hit_fraction:.0%} of the keys sent match. hashes/s counts keys sent.",
        f"Goal {GOAL:,} hashes/s = {GOAL / args.batch:,.0f} Lookup calls/s of {args.batch} keys. Best measured: "
        f"{best['hashes/s']:,.0f} hashes/s ({best_name}), {best['hashes/s'] / GOAL:.0%} of the goal.",
        f"Where the time goes: the daemon spends {best['daemon CPU us/call']:.0f} us of CPU per {args.batch}-key "
        f"call (busy {best['daemon CPU busy']:.0%} of one core) and {rpc_us:.0f} us per 1-key call. The same "
        f"per-call work without gRPC (decode, Validator.keys, Catalog.lookup, encode) takes {1e6 / limit_calls:.0f} "
        f"us per {args.batch}-key call in this process ({1e6 / limit_keys * 1e3:.0f} ns per key). So about "
        f"{rpc_us:.0f} us of daemon CPU per call is the "
        "gRPC/asyncio per-RPC cost, independent of the batch size.",
    ]
    if profile_rows:
        everything, handler = profile_rows[0]["own us per Lookup"], profile_rows[1]["cumulative us per Lookup"]
        top = ", ".join(f"{r['function (daemon, under cProfile)']} x{r['calls per Lookup']:.1f}"
                        for r in profile_rows[2:6])
        notes.append(f"Daemon profile (1-key Lookups, profiler-inflated): kvtier's Lookup handler takes "
                     f"{handler:.0f} us of the {everything:.0f} us of event-loop CPU per Lookup "
                     f"({handler / everything:.0%}); the top entries are asyncio/grpc.aio machinery: {top}.")
    params = {"blocks": stored, "batch": args.batch, "chain": args.chain, "requests": args.requests,
              "seconds": args.seconds, "threads": args.threads, "inflight": args.inflight, "sweep": args.sweep}
    data = write_results("lookup", "Lookup over UDS", rows, params, args.out, details, notes,
                         plot=not args.no_plot)
    data["raw"] = {"results": results, "sweep": sweep_results, "hit_fraction": hit_fraction,
                   "in_process": {"hashes/s": limit_keys, "calls/s": limit_calls}}
    return data


if __name__ == "__main__":
    main(sys.argv[1:])
