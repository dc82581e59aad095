"""A kvtierd subprocess for tests, benchmarks and embedding: TOML from dotted overrides, a Unix
socket in a short /tmp dir, start() returns once gRPC health says SERVING.

    with DaemonProcess(work_dir, {"cpu.capacity": "1GiB", "disk.enabled": False}) as d:
        with d.client() as c: ...

The data dir (work_dir/<name>-data) survives stop()/start(), so restarts can be tested.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from .client import Client, _open_channel


def toml_text(data_dir: str, overrides: dict, log_level: str = "info") -> str:
    """A TOML config from dotted keys ({"cpu.capacity": "1GiB", "disk.enabled": False, ...}); a
    top-level key with a list of dicts becomes an array of tables ({"tenant": [{...}]})."""
    top: dict = {"data_dir": str(data_dir), "log_level": log_level}
    sections: dict[str, dict] = {}
    arrays: dict[str, list] = {}
    for dotted, value in overrides.items():
        section, _, key = dotted.rpartition(".")
        if not section and isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            arrays[key] = value
            continue
        (sections.setdefault(section, {}) if section else top)[key] = value

    def fmt(value):
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, (int, float)):
            return repr(value)
        if isinstance(value, (list, tuple)):
            return "[" + ", ".join(fmt(v) for v in value) + "]"
        return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'

    lines = [f"{k} = {fmt(v)}" for k, v in top.items()]
    for section, table in sections.items():
        lines.append(f"[{section}]")
        lines += [f"{k} = {fmt(v)}" for k, v in table.items()]
    for name, tables in arrays.items():
        for table in tables:
            lines.append(f"[[{name}]]")
            lines += [f"{k} = {fmt(v)}" for k, v in table.items()]
    return "\n".join(lines) + "\n"


class DaemonProcess:
    def __init__(self, work_dir, overrides: dict | None = None, name: str = "kvtierd", log_level: str = "info",
                 python_args: list[str] | None = None, env: dict | None = None):
        self.work_dir = Path(work_dir)
        self.data_dir = self.work_dir / f"{name}-data"
        self.data_dir.mkdir(parents=True, exist_ok=True)
        # Unix socket paths are limited to ~107 bytes: keep the socket in a short /tmp dir.
        self._sock_dir = tempfile.mkdtemp(prefix="kvt-", dir="/tmp")
        os.chmod(self._sock_dir, 0o755)  # the socket's own mode decides who may connect
        self.socket = os.path.join(self._sock_dir, "kvtierd.sock")
        self.overrides = {"server.socket": self.socket, **(overrides or {})}
        self.config = self.work_dir / f"{name}.toml"
        self.config.write_text(toml_text(str(self.data_dir), self.overrides, log_level))
        self.log_path = self.work_dir / f"{name}.log"
        self.python_args = list(python_args or [])  # e.g. ["-m", "cProfile", "-o", "out.prof"]
        self.env = env
        self.proc: subprocess.Popen | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, timeout: float = 120.0) -> "DaemonProcess":
        """Starts kvtierd and returns once gRPC health says SERVING on its socket; raises (with the
        log) if it exits first or is not serving within `timeout` seconds (generous: a loaded machine
        may need many seconds just to import it)."""
        env = None if self.env is None else {**os.environ, **self.env}
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen([sys.executable, *self.python_args, "-m", "kvtier.daemon.main",
                                          "-c", str(self.config)], stdout=log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + timeout
        # One channel for the whole wait, with the client's connection settings: each attempt is
        # given gRPC's full connect timeout, not a short per-call one that a slow start would miss.
        channel, _, _ = _open_channel(grpc, self.socket, None, None)
        try:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"kvtierd exited with {self.proc.returncode}:\n{self.log()}")
                if os.path.exists(self.socket) and self._serving(channel, deadline):
                    return self
                time.sleep(0.05)  # polls the process and its socket file; bounded by `deadline`
        finally:
            channel.close()
        self.kill()
        raise TimeoutError(f"kvtierd did not start in {timeout}s:\n{self.log()}")

    def _serving(self, channel, deadline: float) -> bool:
        # Each check waits for the connection (wait_for_ready) up to a few seconds, then the loop
        # looks at the process again: a daemon that died is reported at once, not at the deadline.
        wait = max(0.1, min(5.0, deadline - time.monotonic()))
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=wait,
                                                              wait_for_ready=True)
        except grpc.RpcError:
            return False
        return reply.status == health_pb2.HealthCheckResponse.SERVING

    def client(self) -> Client:
        return Client(self.socket)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def cpu_seconds(self) -> float:
        """user+system CPU seconds the daemon process has used so far (all its threads)."""
        with open(f"/proc/{self.pid}/stat") as file:
            fields = file.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM and wait (kill -9 past the timeout); returns the exit code."""
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            return -9

    def kill(self) -> None:
        """kill -9."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def cleanup(self, remove_data: bool = True) -> None:
        """Removes the socket dir (and the data dir unless told not to). The arena is memory that
        goes with the daemon's process: nothing of it is left to remove."""
        shutil.rmtree(self._sock_dir, ignore_errors=True)
        if remove_data:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    def __enter__(self) -> "DaemonProcess":
        try:
            return self.start()
        except BaseException:
            self.kill()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()
        self.cleanup(remove_data=False)
