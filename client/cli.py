"""kvtier: operator CLI for kvtierd (stats, inventory, stat, put, get, watch, namespaces, delete, clear)."""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import time

import grpc

from kvtier.proto.v1 import kvtier_pb2 as pb

from .client import DEFAULT_SOCKET, Client

TIERS = [(pb.TIER_GPU, "gpu"), (pb.TIER_CPU, "cpu"), (pb.TIER_DISK, "disk"), (pb.TIER_S3, "s3")]


def tier_names(mask: int) -> str:
    return ",".join(name for bit, name in TIERS if mask & bit) or "-"


def tier_mask(names: str) -> int:
    lookup = {name: bit for bit, name in TIERS}
    try:
        return sum(lookup[n.strip()] for n in names.split(",") if n.strip())
    except KeyError as exc:
        raise SystemExit(f"kvtier: unknown tier {exc.args[0]!r}; use gpu, cpu, disk, s3") from exc


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def parse_key(text: str) -> bytes:
    try:
        key = bytes.fromhex(text)
    except ValueError as exc:
        raise SystemExit(f"kvtier: key must be hex, got {text!r}") from exc
    if not 1 <= len(key) <= 32:
        raise SystemExit("kvtier: key must be 1..32 bytes (2..64 hex digits)")
    return key


def cmd_stats(client: Client, args) -> None:
    s = client.stats()
    print(f"blocks {s.blocks}  bytes {human(s.bytes)}  uptime {s.uptime_s:.0f}s  event seq {s.event_seq}")
    rate = s.lookup_hit_keys / s.lookup_keys if s.lookup_keys else 0.0
    print(f"lookups {s.lookups} ({s.lookup_hit_keys}/{s.lookup_keys} keys hit, {rate:.1%})  "
          f"acquire hits {s.acquire_hits} misses {s.acquire_misses}  duplicates {s.duplicates}")
    print(f"write-through backlog {s.write_backlog}  quarantined {s.quarantined}  "
          f"leases {s.active_leases}  allocations {s.active_allocations}")
    print(f"{'tier':<6}{'blocks':>10}{'used':>12}{'capacity':>12}{'reads':>10}{'writes':>10}{'evictions':>11}")
    for t in s.tiers:
        print(f"{t.tier:<6}{t.blocks:>10}{human(t.bytes):>12}{human(t.capacity_bytes):>12}"
              f"{t.reads:>10}{t.writes:>10}{t.evictions:>11}")


CLASSES = ("system", "conversation", "subagent", "ephemeral", "decode")
DEFAULT_CLASS = "conversation"  # what the daemon applies to a block stored without retention


def retention_text(b: pb.BlockInfo) -> tuple[str, str, str]:
    """(class, priority, pin) of a block as the daemon keeps them: "-" priority means the default;
    pin is the TTL pin's expiry (UTC) or "-" when the block is not pinned (or the pin has run out)."""
    cls = b.retention.cls if b.HasField("retention") and b.retention.cls else DEFAULT_CLASS
    priority = str(b.retention.priority) if b.HasField("retention") else "-"
    pin = "-"
    if b.pinned_until_unix_ms and b.pinned_until_unix_ms > time.time() * 1000:
        pin = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(b.pinned_until_unix_ms / 1000))
    return cls, priority, pin


def _row(b: pb.BlockInfo) -> str:
    cls, priority, pin = retention_text(b)
    return (f"{b.namespace:<24} {b.key.hex():<64} {human(b.length):>10} {tier_names(b.tiers):<14}"
            f"{b.hits:>6} {cls:<13}{priority:>4} {pin:<20}{' pending' if b.write_pending else ''}")


def cmd_inventory(client: Client, args) -> None:
    print(f"{'namespace':<24} {'key':<64} {'size':>10} {'tiers':<14}{'hits':>6} {'class':<13}{'prio':>4} "
          f"{'pinned until':<20}")
    shown = 0
    pin = {None: pb.PIN_ANY, True: pb.PIN_PINNED, False: pb.PIN_UNPINNED}[args.pinned]
    for block in client.iter_inventory(args.namespace or "", tier_mask(args.tier or ""), page_size=500,
                                       retention_class=args.retention_class or "", pin=pin):
        print(_row(block))
        shown += 1
        if args.limit and shown >= args.limit:
            break
    print(f"({shown} blocks)")


def cmd_stat(client: Client, args) -> None:
    b = client.stat(args.namespace, parse_key(args.key))
    for field, value in (("namespace", b.namespace), ("key", b.key.hex()), ("parent", b.parent.hex() or "-"),
                         ("length", b.length), ("checksum", f"{b.checksum:016x}"), ("tiers", tier_names(b.tiers)),
                         ("hits", b.hits), ("readers", b.readers), ("write pending", b.write_pending),
                         ("created", b.created_unix_ms), *zip(("class", "priority", "pinned until"),
                                                              retention_text(b))):
        print(f"{field:<14}{value}")


def cmd_put(client: Client, args) -> None:
    with open(args.file, "rb") as file:
        data = file.read()
    key = parse_key(args.key) if args.key else hashlib.sha256(data).digest()
    client.register_namespace(args.namespace)
    status = client.put(args.namespace, key, data, parse_key(args.parent) if args.parent else b"",
                        wait_durable=True)
    print(f"{key.hex()} {'stored' if status == pb.STORED else 'duplicate (already stored)'}")


def cmd_get(client: Client, args) -> None:
    info, data = client.get(args.namespace, parse_key(args.key))
    if args.output == "-":
        sys.stdout.buffer.write(data)
    else:
        with open(args.output, "wb") as file:
            file.write(data)
        print(f"{len(data)} bytes from {tier_names(info.tiers)} written to {args.output}", file=sys.stderr)


def cmd_watch(client: Client, args) -> None:
    names = {v: k for k, v in pb.EventType.items()}
    stream = client.watch(args.from_seq, args.namespace or "")
    try:
        for shown, e in enumerate(stream, 1):
            where = tier_names(e.tier) if e.type != pb.BLOCK_MOVED else f"{tier_names(e.from_tier)}->{tier_names(e.tier)}"
            print(f"{e.seq:>8} {names[e.type]:<18} {e.namespace:<24} {e.key.hex() or '-':<64} {where}", flush=True)
            if args.count and shown >= args.count:
                break
    finally:
        stream.cancel()


def cmd_namespaces(client: Client, args) -> None:
    for ns in client.list_namespaces():
        attrs = ",".join(f"{k}={v}" for k, v in sorted(ns.attributes.items()))
        print(f"{ns.name:<40} {ns.blocks:>8} blocks {human(ns.bytes):>10}  {attrs}")


def cmd_delete(client: Client, args) -> None:
    r = client.delete(args.namespace, [parse_key(k) for k in args.keys])
    print(f"deleted {r.deleted}, busy {r.busy}")


def cmd_clear(client: Client, args) -> None:
    print(f"deleted {client.clear(args.namespace)} blocks")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvtier", description="kvtier CLI: talk to a running kvtierd")
    parser.add_argument("-s", "--socket", default=os.environ.get("KVTIER_SOCKET", DEFAULT_SOCKET),
                        help="daemon socket path or host:port (env KVTIER_SOCKET)")
    parser.add_argument("--token-file", default=os.environ.get("KVTIER_TOKEN_FILE"),
                        help="bearer token file for TCP (env KVTIER_TOKEN_FILE)")
    parser.add_argument("--tls-ca", help="CA certificate for a TLS TCP endpoint (required with --token-file on TCP)")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("stats", help="counters per tier").set_defaults(fn=cmd_stats)
    p = sub.add_parser("inventory", help="list blocks as a table")
    p.add_argument("-n", "--namespace")
    p.add_argument("-t", "--tier", help="comma-separated tiers, e.g. disk or cpu,disk")
    p.add_argument("--limit", type=int, default=0)
    p.add_argument("--class", dest="retention_class", choices=CLASSES, help="only blocks of this retention class")
    pinned = p.add_mutually_exclusive_group()
    pinned.add_argument("--pinned", dest="pinned", action="store_const", const=True, default=None,
                        help="only blocks under a TTL pin")
    pinned.add_argument("--unpinned", dest="pinned", action="store_const", const=False,
                        help="only blocks without a TTL pin")
    p.set_defaults(fn=cmd_inventory)
    p = sub.add_parser("stat", help="one block's metadata")
    p.add_argument("-n", "--namespace", required=True)
    p.add_argument("key", help="hex")
    p.set_defaults(fn=cmd_stat)
    p = sub.add_parser("put", help="store a file as one block (key = sha256 of the content unless given)")
    p.add_argument("-n", "--namespace", default="manual")
    p.add_argument("--key")
    p.add_argument("--parent")
    p.add_argument("file")
    p.set_defaults(fn=cmd_put)
    p = sub.add_parser("get", help="fetch one block")
    p.add_argument("-n", "--namespace", default="manual")
    p.add_argument("-o", "--output", default="-")
    p.add_argument("key")
    p.set_defaults(fn=cmd_get)
    p = sub.add_parser("watch", help="stream block events")
    p.add_argument("-n", "--namespace")
    p.add_argument("--from-seq", type=int, default=0)
    p.add_argument("--count", type=int, default=0, help="stop after this many events")
    p.set_defaults(fn=cmd_watch)
    sub.add_parser("namespaces", help="registered namespaces").set_defaults(fn=cmd_namespaces)
    p = sub.add_parser("delete", help="delete blocks (admin)")
    p.add_argument("-n", "--namespace", required=True)
    p.add_argument("keys", nargs="+")
    p.set_defaults(fn=cmd_delete)
    p = sub.add_parser("clear", help="delete every block of a namespace, or '*' for all (admin)")
    p.add_argument("namespace")
    p.set_defaults(fn=cmd_clear)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    token = None
    if args.token_file:
        with open(args.token_file, encoding="utf-8") as file:
            token = file.read().strip()
    try:
        client = Client(args.socket, token=token, tls_ca=args.tls_ca)
    except ValueError as exc:  # e.g. a token over TCP without --tls-ca: refused before connecting
        print(f"kvtier: {exc}", file=sys.stderr)
        return 2
    try:
        with client:
            args.fn(client, args)
    except grpc.RpcError as exc:
        print(f"kvtier: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
