"""Fixtures: a real kvtierd subprocess on a real Unix socket with real files, per test."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time

import grpc
import pytest

from kvtier.client import Client

SMALL_CONFIG = {
    "cpu.capacity": "32MiB", "cpu.slot_bytes": "64KiB",
    "disk.capacity": "256MiB", "disk.segment_bytes": "8MiB", "disk.batch_blocks": 16, "disk.queue_blocks": 256,
    "limits.default_lease_ms": 5000,
}


def write_config(path, data_dir, overrides: dict) -> str:
    """Writes a TOML config from dotted keys ({"cpu.capacity": "32MiB", ...})."""
    sections: dict[str, dict] = {}
    top = {"data_dir": str(data_dir), "log_level": "info"}
    for dotted, value in {**SMALL_CONFIG, **overrides}.items():
        if "." in dotted:
            section, key = dotted.split(".", 1)
            sections.setdefault(section, {})[key] = value
        else:
            top[dotted] = value

    def fmt(value):
        if isinstance(value, bool):
            return "true" if value else "false"
        return str(value) if isinstance(value, int) else f'"{value}"'
    lines = [f"{k} = {fmt(v)}" for k, v in top.items()]
    for section, table in sections.items():
        lines.append(f"[{section}]")
        lines += [f"{k} = {fmt(v)}" for k, v in table.items()]
    path.write_text("\n".join(lines) + "\n")
    return str(path)


class Daemon:
    """A kvtierd subprocess. start() waits until it serves; kill() is kill -9."""

    def __init__(self, tmp_path, overrides: dict | None = None, name: str = "d"):
        self.data_dir = tmp_path / f"{name}-data"
        self.data_dir.mkdir(exist_ok=True)
        # Unix socket paths are limited to ~107 bytes; pytest's tmp paths can be longer.
        self.socket = os.path.join(tempfile.mkdtemp(prefix="kvt-", dir="/tmp"), "kvtierd.sock")
        overrides = {"server.socket": self.socket, **(overrides or {})}
        self.config = write_config(tmp_path / f"{name}.toml", self.data_dir, overrides)
        self.log_path = tmp_path / f"{name}.log"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 30.0) -> "Daemon":
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "kvtier.daemon.main", "-c", self.config],
                                     stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"kvtierd exited with {self.proc.returncode}:\n{self.log()}")
            if os.path.exists(self.socket) and self._serving():
                return self
            time.sleep(0.05)
        raise TimeoutError(f"kvtierd did not start in {timeout}s:\n{self.log()}")

    def _serving(self) -> bool:
        from grpc_health.v1 import health_pb2, health_pb2_grpc
        with grpc.insecure_channel(f"unix:{self.socket}") as channel:
            try:
                reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1)
            except grpc.RpcError:
                return False
        return reply.status == health_pb2.HealthCheckResponse.SERVING

    def client(self) -> Client:
        return Client(self.socket)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, timeout: float = 40.0) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


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


@pytest.fixture
def daemon(make_daemon) -> Daemon:
    return make_daemon()


@pytest.fixture
def client(daemon):
    with daemon.client() as c:
        c.register_namespace("test-ns", {"model": "tiny"})
        yield c
