"""Helpers for test_torture.py: content-addressed blocks, a tally of what was acknowledged, read-back
verification, gRPC health, and a parser for the disk tier's segment files (docs/disk-format.md)."""

from __future__ import annotations

import glob
import hashlib
import os
import random
import struct
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from kvtier.client import Client
from kvtier.client.client import target_of
from kvtier.proto.v1 import kvtier_pb2 as pb

NS = "torture"
ACKED = (pb.STORED, pb.DUPLICATE)
ALIGN = 4096
REFUSALS = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED)


def key_of(data: bytes) -> bytes:
    """Keys are the content's hash: a key maps to exactly one content, so any other bytes are wrong."""
    return hashlib.blake2b(data, digest_size=32).digest()


class Blocks:
    """Seeded block generator: (key, data) with random sizes in [low, high]."""

    def __init__(self, seed: int, low: int, high: int):
        self.rng = random.Random(seed)
        self.low, self.high = low, high

    def make(self) -> tuple[bytes, bytes]:
        data = self.rng.randbytes(self.rng.randint(self.low, self.high))
        return key_of(data), data

    def batch(self, count: int) -> list[tuple[bytes, bytes]]:
        return [self.make() for _ in range(count)]


@dataclass
class Tally:
    """What the daemon acknowledged (key -> data) and how it refused the rest."""
    acked: dict = field(default_factory=dict)
    codes: Counter = field(default_factory=Counter)   # refusal status codes (names)
    details: list = field(default_factory=list)        # first few non-refusal errors, for the report
    wrong: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def ack(self, batch, statuses) -> bool:
        statuses = list(statuses)
        if len(statuses) != len(batch) or any(s not in ACKED for s in statuses):
            with self.lock:
                self.codes[f"bad-status {statuses}"] += 1
            return False
        with self.lock:
            for key, data in batch:
                self.acked[key] = data
        return True

    def refuse(self, exc: grpc.RpcError) -> None:
        with self.lock:
            self.codes[exc.code().name] += 1
            if exc.code() not in REFUSALS and len(self.details) < 5:
                self.details.append(f"{exc.code().name}: {exc.details()}")

    @property
    def internal(self) -> int:
        return sum(n for code, n in self.codes.items() if code not in ("UNAVAILABLE", "RESOURCE_EXHAUSTED"))

    def count(self) -> int:
        with self.lock:
            return len(self.acked)


def put_batch(client: Client, tally: Tally, batch, wait_ms: int = 5000, on_error=None) -> bool:
    """One wait_durable put_blocks; True if acknowledged. RpcErrors are tallied (or given to
    on_error, e.g. those expected from a daemon being killed), not raised."""
    try:
        statuses = client.put_blocks(NS, [(k, b"", d) for k, d in batch], wait_durable=True, wait_ms=wait_ms)
    except grpc.RpcError as exc:
        (on_error or tally.refuse)(exc)
        return False
    return tally.ack(batch, statuses)


def read_back(client: Client, expected: dict, chunk: int = 32) -> tuple[list[bytes], int]:
    """Reads every key of `expected`: (missing keys, wrong reads). Wrong: bytes other than what was
    put under the key (checked against the expected bytes and against the key's content hash)."""
    missing, wrong = [], 0
    keys = list(expected)
    for start in range(0, len(keys), chunk):
        part = keys[start:start + chunk]
        got = client.get_blocks(NS, part)
        for key, value in zip(part, got):
            if value is None:
                missing.append(key)
            elif value != expected[key] or key_of(value) != key:
                wrong += 1
    return missing, wrong


def health(socket: str, timeout: float = 5.0) -> str:
    """The daemon's gRPC health status name ("SERVING", "NOT_SERVING"), or the error code's name."""
    channel = grpc.insecure_channel(target_of(socket))
    try:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=timeout)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    except grpc.RpcError as exc:
        return exc.code().name
    finally:
        channel.close()


def usable(socket: str, tally: Tally, blocks: Blocks, bound_s: float = 60.0) -> bool:
    """Not wedged: within bound_s the daemon says SERVING and acknowledges a new wait_durable put."""
    deadline = time.monotonic() + bound_s
    with Client(socket, timeout=30) as c:
        while time.monotonic() < deadline:
            if health(socket) == "SERVING" and put_batch(c, tally, blocks.batch(1)):
                return True
            time.sleep(0.2)  # polling a state (health + a put), bounded by the deadline
    return False


# -- segment files ---------------------------------------------------------------------------------
@dataclass
class Record:
    path: str
    offset: int          # record start (header area)
    header_len: int
    payload_len: int
    key: bytes
    flags: int


def segment_files(data_dir) -> list[str]:
    return sorted(glob.glob(os.path.join(str(data_dir), "disk", "segments", "seg-*.kvseg")))


def records(path: str) -> list[Record]:
    """The records of one segment file whose headers decode (magic KVTB), walked by their lengths."""
    out = []
    with open(path, "rb") as file:
        buf = file.read()
    at = ALIGN
    while at + 46 <= len(buf):
        if buf[at:at + 4] != b"KVTB":
            at += ALIGN
            continue
        header_len, ns_len, key_len, parent_len, flags, payload_len = struct.unpack_from("<HHBBHQ", buf, at + 6)
        key = buf[at + 46 + ns_len:at + 46 + ns_len + key_len]
        out.append(Record(path, at, header_len, payload_len, key, flags))
        at += ALIGN + (payload_len + ALIGN - 1) // ALIGN * ALIGN
    return out


def flip(path: str, offset: int) -> None:
    with open(path, "r+b") as file:
        file.seek(offset)
        byte = file.read(1)
        file.seek(offset)
        file.write(bytes([byte[0] ^ 0xFF]))
