"""Fixtures: a real kvtierd subprocess on a real Unix socket with real files, per test."""

from __future__ import annotations

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
