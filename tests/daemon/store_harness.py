"""An in-process BlockStore on real files, real LMDB and (optionally) a real S3 server, with the
fault-injection seams wrapped around the real parts: a FileSystem whose calls can fail or block,
and an S3Tier whose calls can fail or block. Used by the store tests and the stateful model test.
"""

from __future__ import annotations

import asyncio
import errno
import threading

from kvtier.daemon import config
from kvtier.daemon.store import BlockStore, Staged
from kvtier.tiers.block import checksum
from kvtier.tiers.fs import FileSystem
from kvtier.tiers.s3 import S3Tier, S3Unavailable


class FaultyFs(FileSystem):
    """The real file system, plus faults: `fail` maps an operation name ("pwritev", "fdatasync",
    "preadv", ...) to an errno raised on its next calls (until cleared); `gate` maps an operation
    name to a threading.Event the call waits on (blocked I/O)."""

    def __init__(self):
        self.fail: dict[str, int] = {}
        self.gate: dict[str, threading.Event] = {}
        self.calls: dict[str, int] = {}

    def _enter(self, name: str) -> None:
        self.calls[name] = self.calls.get(name, 0) + 1
        gate = self.gate.get(name)
        if gate is not None:
            assert gate.wait(60), f"gate on {name} never opened"
        code = self.fail.get(name)
        if code is not None:
            raise OSError(code, f"injected {errno.errorcode.get(code, code)} in {name}")

    def pwritev(self, fd, buffers, offset):
        self._enter("pwritev")
        return super().pwritev(fd, buffers, offset)

    def preadv(self, fd, buffers, offset):
        self._enter("preadv")
        return super().preadv(fd, buffers, offset)

    def fdatasync(self, fd):
        self._enter("fdatasync")
        return super().fdatasync(fd)


class FaultyS3(S3Tier):
    """The real S3 tier against a real server, plus an outage switch (`down`: every call raises
    S3Unavailable at once, as after botocore's retries) and a gate on uploads."""

    def __init__(self, cfg):
        super().__init__(cfg)
        self.down = False
        self.upload_gate: threading.Event | None = None
        self.uploads_started = threading.Semaphore(0)

    def _check_up(self):
        if self.down:
            raise S3Unavailable("injected outage")

    def upload(self, header, payload, **kwargs):
        self._check_up()
        self.uploads_started.release()
        if self.upload_gate is not None:
            assert self.upload_gate.wait(60), "upload gate never opened"
        self._check_up()
        return super().upload(header, payload, **kwargs)

    def download_into(self, *args, **kwargs):
        self._check_up()
        return super().download_into(*args, **kwargs)

    def list_keys(self, *args, **kwargs):
        self._check_up()
        return super().list_keys(*args, **kwargs)

    def probe_conditional_puts(self):
        self._check_up()
        return super().probe_conditional_puts()

    def delete(self, *args, **kwargs):
        self._check_up()
        return super().delete(*args, **kwargs)


def store_config(tmp_path, s3_endpoint: str | None = None, bucket: str = "", tenants: list | None = None,
                 **sections):
    overrides = {"data_dir": str(tmp_path / "data"),
                 "cpu": {"capacity": "1MiB", "slot_bytes": "64KiB"},
                 "disk": {"capacity": "64MiB", "segment_bytes": "4MiB", "durable_wait_ms": 5000}}
    if s3_endpoint:
        overrides["s3"] = {"enabled": True, "endpoint_url": s3_endpoint, "bucket": bucket,
                           "list_interval_s": 3600.0, "connect_timeout_s": 1.0, "read_timeout_s": 5.0}
    for section, values in sections.items():
        overrides.setdefault(section, {}).update(values)
    if tenants:
        overrides["tenant"] = tenants
    (tmp_path / "data").mkdir(exist_ok=True)
    return config.load(overrides=overrides)


class Fatal(Exception):
    pass


def make_store(cfg, fs=None, s3_tier=None) -> BlockStore:
    """A store whose fatal() raises in the test instead of ending the process; every fatal message
    is kept in store.fatals so a test can assert there was none."""
    fatals: list[str] = []

    def on_fatal(message: str) -> None:
        fatals.append(message)

    store = BlockStore(cfg, on_fatal=on_fatal, fs=fs, s3_tier=s3_tier)
    store.fatals = fatals
    return store


def blob(seed: int, length: int = 5000) -> bytes:
    return bytes([seed % 251]) * (length - 8) + seed.to_bytes(8, "little")


def key_of(seed: int) -> bytes:
    return seed.to_bytes(4, "big") * 8


async def commit(store: BlockStore, namespace: str, seeds: list[int], wait_durable: bool = False,
                 retention=None):
    """Allocates (in the namespace's arena part), fills and commits one block per seed; returns the
    statuses."""
    held = await store.allocate(len(seeds), 0, 5000, store.part_of(namespace))
    staged = []
    for slot, seed in zip(held.items, seeds):
        data = blob(seed)
        store.arena.view(slot)[:len(data)] = data
        staged.append(Staged(key_of(seed), b"", slot, len(data), checksum(data), retention))
    return await store.commit(held.id, namespace, staged, wait_durable)


async def read(store: BlockStore, namespace: str, seed: int) -> bytes | None:
    """The block's bytes through acquire/release, or None on a miss."""
    held, found = await store.acquire(namespace, [key_of(seed)], 5000)
    if held is None:
        return None
    try:
        return bytes(store.cpu.view(found[0])[:found[0].length])
    finally:
        store.release(held.id)


async def until(predicate, what: str, timeout: float = 30.0) -> None:
    """Lets the loop run until predicate() holds (a readiness signal), failing after timeout."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        assert loop.time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.005)
