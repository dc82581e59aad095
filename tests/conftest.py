"""Fixtures: a real kvtierd subprocess on a real Unix socket with real files, per test."""

from __future__ import annotations

import glob
import os

import pytest

from kvtier.client.process import DaemonProcess

SMALL_CONFIG = {
    "cpu.capacity": "32MiB", "cpu.slot_bytes": "64KiB",
    "disk.capacity": "256MiB", "disk.segment_bytes": "8MiB", "disk.batch_blocks": 16, "disk.queue_blocks": 256,
    "limits.default_lease_ms": 5000,
}


class Daemon(DaemonProcess):
    """A kvtierd subprocess with the small test sizes; kill() is kill -9."""

    def __init__(self, tmp_path, overrides: dict | None = None, name: str = "d"):
        super().__init__(tmp_path, {**SMALL_CONFIG, **(overrides or {})}, name=name)

    def flip_on_disk(self, data: bytes, at: int | None = None) -> None:
        """Corrupts a stored block (stop the daemon first): flips one byte of `data` (its middle by
        default) where it sits in the disk tier's segment files."""
        for path in sorted(glob.glob(os.path.join(self.data_dir, "disk", "segments", "*"))):
            buf = bytearray(open(path, "rb").read())
            found = buf.find(data)
            if found >= 0:
                buf[found + (len(data) // 2 if at is None else at)] ^= 0xFF
                open(path, "r+b").write(buf)
                return
        raise AssertionError("block not found in any segment file")


@pytest.fixture
def make_daemon(tmp_path):
    daemons: list[Daemon] = []

    def make(overrides: dict | None = None, name: str = "d", start: bool = True) -> Daemon:
        daemon = Daemon(tmp_path, overrides, name)
        daemons.append(daemon)
        return daemon.start() if start else daemon

    yield make
    for daemon in daemons:
        daemon.kill()
        daemon.cleanup(remove_data=False)


@pytest.fixture
def daemon(make_daemon) -> Daemon:
    return make_daemon()


@pytest.fixture
def client(daemon):
    with daemon.client() as c:
        c.register_namespace("test-ns", {"model": "tiny"})
        yield c
