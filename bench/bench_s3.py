"""kvtier's S3 tier vs raw boto3 on the same S3 server, same bytes, same concurrency, in the same run.

Server: a moto S3 server subprocess on 127.0.0.1 (tests/s3server.py), or any endpoint given with
--endpoint (bucket kvtier-bench must exist; credentials from the usual AWS environment). moto is
the bottleneck on these machines (see /work/shared/ENGINEERING.md) and shares the CPU with the
client, so only the ratio to raw boto3 on the same server is meaningful, not the absolute MB/s.

Raw (the limit), from a thread pool of --threads, one client per variant with
max_pool_connections = --threads, each object PUT once and GET back:
  - "boto3 defaults": put_object(Body=bytes) -- botocore wraps bytes in a file object and sends
    `Expect: 100-continue` (one more round trip per PUT) plus a CRC32 of the body --, and
    get_object()["Body"].read() with the CRC32 validated;
  - "boto3 tuned": the same request as S3Tier makes on the wire: Body=bytearray (sent as is, no
    100-continue) and request/response_checksum_calculation="when_required" (no CRC32 either way).
  The faster of the two is the limit of each row.

kvtier: kvtier.tiers.s3.S3Tier(max_concurrency = --threads) from the same size of thread pool:
upload(header, payload view) -- header + payload copied into one body, xxh3 re-checked on the
bytes sent, PUT with IfNoneMatch="*" and the header in x-amz-meta -- and download_into(namespace,
key, per-thread dest) -- GET, header decoded and checked against the key and object size, payload
copied into dest, xxh3 verified. Headers (the xxh3 a producer computes once) are built untimed.

Each round uploads `--total` bytes of `--object`-sized objects with fresh keys in every variant and
reads them back, in batches of `--batch` objects, the variants alternating batch by batch (first
one rotating) so that all see the same server and machine load. A variant's round time is the sum
of its batch times; figures are medians over rounds. Objects are deleted after each round, untimed.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from _common import Row, add_common_args, human_bytes, log, median, parse_size, work_dir, write_results

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

MB = 1e6
BUCKET = "kvtier-bench"
RAW = ("boto3 defaults", "boto3 tuned")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--total", type=parse_size, default=parse_size("200MiB"),
                        help="bytes uploaded and downloaded per variant and round (default 200MiB)")
    parser.add_argument("--object", type=parse_size, default=parse_size("2MiB"), help="object payload bytes")
    parser.add_argument("--threads", type=int, default=4, help="concurrent requests, every variant (default 4)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of every variant (default 3)")
    parser.add_argument("--batch", type=int, default=8,
                        help="objects per batch; the variants alternate batch by batch (default 8)")
    parser.add_argument("--endpoint", default=None,
                        help="use this S3 endpoint (bucket kvtier-bench must exist) instead of a moto subprocess")
    add_common_args(parser)
    args = parser.parse_args(argv)
    count = args.total // args.object
    if count < 1:
        parser.error("--total must hold at least one object")

    import boto3
    from botocore.config import Config

    from kvtier.tiers.block import BlockHeader, checksum
    from kvtier.tiers.s3 import S3Config, S3Tier

    server = None
    if args.endpoint is None:
        from s3server import DUMMY_ENV, S3Server, make_bucket
        os.environ.update(DUMMY_ENV)
        server = S3Server(log_path=str(work_dir(args.out) / "moto-bench.log")).start()
        make_bucket(server, BUCKET)
        endpoint = server.endpoint_url
    else:
        endpoint = args.endpoint
    log(f"s3: {count} objects of {human_bytes(args.object)} per variant x {args.rounds} rounds, "
        f"{args.threads} threads, batches of {args.batch}, endpoint {endpoint}")

    rng = np.random.default_rng(7)
    payloads = [rng.integers(0, 256, size=args.object, dtype=np.uint8).tobytes() for _ in range(count)]
    buffers = [bytearray(p) for p in payloads]
    session = boto3.session.Session()
    clients = {
        "boto3 defaults": session.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                                         config=Config(max_pool_connections=args.threads)),
        "boto3 tuned": session.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                                      config=Config(max_pool_connections=args.threads,
                                                    request_checksum_calculation="when_required",
                                                    response_checksum_validation="when_required")),
    }
    bodies = {"boto3 defaults": payloads, "boto3 tuned": buffers}
    tier = S3Tier(S3Config(endpoint, BUCKET, prefix="bench", region="us-east-1", max_concurrency=args.threads))
    pool = ThreadPoolExecutor(args.threads)
    local = threading.local()

    def dest() -> memoryview:
        if not hasattr(local, "dest"):
            local.dest = memoryview(bytearray(args.object))
        return local.dest

    def timed(fn, items) -> float:
        start = time.perf_counter()
        for _ in pool.map(fn, items):
            pass
        return time.perf_counter() - start

    put_names = [f"put, {name}" for name in RAW] + ["S3Tier.upload"]
    get_names = [f"get, {name}" for name in RAW] + ["S3Tier.download_into"]
    results: dict[str, list[float]] = {name: [] for name in put_names + get_names}
    batch_times: dict[str, list[float]] = {name: [] for name in results}
    per_round = []
    try:
        for rnd in range(args.rounds):
            namespace = f"bench-r{rnd}"
            headers = [BlockHeader(namespace, i.to_bytes(8, "big"), b"", len(p), checksum(p), 1_700_000_000_000)
                       for i, p in enumerate(payloads)]
            raw_keys = {name: [f"raw-{n}/r{rnd}/{i:06d}" for i in range(count)] for n, name in enumerate(RAW)}

            def raw_put(name):
                client, keys, body = clients[name], raw_keys[name], bodies[name]
                return lambda i: client.put_object(Bucket=BUCKET, Key=keys[i], Body=body[i])

            def raw_get(name):
                client, keys = clients[name], raw_keys[name]

                def get(i):
                    assert len(client.get_object(Bucket=BUCKET, Key=keys[i])["Body"].read()) == args.object
                return get

            def tier_upload(i):
                assert tier.upload(headers[i], payloads[i]) == "stored"

            def tier_download(i):
                assert tier.download_into(namespace, headers[i].key, dest()) == args.object

            puts = [(f"put, {name}", raw_put(name)) for name in RAW] + [("S3Tier.upload", tier_upload)]
            gets = [(f"get, {name}", raw_get(name)) for name in RAW] + [("S3Tier.download_into", tier_download)]
            spent = {name: 0.0 for name in results}
            for phase in (puts, gets):
                for b, first in enumerate(range(0, count, args.batch)):
                    batch = range(first, min(count, first + args.batch))
                    shift = (b + rnd) % len(phase)
                    for name, fn in phase[shift:] + phase[:shift]:
                        seconds = timed(fn, batch)
                        spent[name] += seconds
                        batch_times[name].append(seconds)
            record = {"round": rnd}
            for name, seconds in spent.items():
                results[name].append(seconds)
                record[name] = count * args.object / seconds / MB
            per_round.append(record)
            log(f"round {rnd}: " + ", ".join(f"{k} {v:.1f}" for k, v in record.items() if k != "round"))
            for i in range(count):  # untimed: keeps the server's memory bounded
                for name in RAW:
                    clients[name].delete_object(Bucket=BUCKET, Key=raw_keys[name][i])
                tier.delete(namespace, headers[i].key)
    finally:
        pool.shutdown()
        tier.close()
        for client in clients.values():
            client.close()
        if server is not None:
            server.__exit__()

    total = count * args.object
    mbps = {name: total / median(times) / MB for name, times in results.items()}

    def row(name: str, raw_names: list[str], notes: str) -> Row:
        best = max(raw_names, key=lambda raw_name: mbps[raw_name])
        return Row(f"{name}, {args.threads} threads", mbps[name], "MB/s", mbps[best],
                   f"{best}, same threads", goal=0.9, headline=True, notes=notes)

    rows = [
        row("S3Tier.upload", put_names[:2],
            "body = header + payload copy, xxh3 re-check, IfNoneMatch=*, header in metadata"),
        row("S3Tier.download_into", get_names[:2], "into a preallocated dest; header checks + xxh3 verify"),
    ]
    details = {
        "Every variant (median MB/s over rounds)": [
            {"variant": name, "MB/s": mbps[name],
             "vs S3Tier": mbps[name] / mbps["S3Tier.upload" if name.startswith(("put", "S3Tier.up"))
                                             else "S3Tier.download_into"]}
            for name in results],
        "Per round (MB/s)": per_round,
        f"Batch times over all rounds (ms per batch of {args.batch} objects)": [
            {"variant": name, "batches": len(times), "median": 1e3 * median(times),
             "p90": 1e3 * sorted(times)[int(0.9 * (len(times) - 1))], "max": 1e3 * max(times)}
            for name, times in batch_times.items()],
    }
    notes = [
        f"{'moto server subprocess on 127.0.0.1' if server else endpoint}; MB/s = 10^6 bytes/s of payload "
        f"(each kvtier object also carries a {len(headers[0].encode())}-byte header). Medians over "
        f"{args.rounds} rounds; the variants alternate in batches of {args.batch} objects (rotating order).",
        "Limit = the faster raw variant: 'boto3 defaults' (Body=bytes: Expect: 100-continue + CRC32) or "
        "'boto3 tuned' (Body=bytearray, no CRC32: the same wire requests as S3Tier). S3Tier skips the CRC32 "
        "because every download verifies the block's own xxh3 checksums end to end.",
    ]
    params = {"total": human_bytes(total), "object": human_bytes(args.object), "objects": count,
              "threads": args.threads, "rounds": args.rounds, "batch": args.batch}
    data = write_results("s3", "S3 tier vs raw boto3 on the same server", rows, params, args.out,
                         details, notes, plot=not args.no_plot)
    data["raw"] = results
    return data


if __name__ == "__main__":
    main(sys.argv[1:])
