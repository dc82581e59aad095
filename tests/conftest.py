"""Fixtures: a real kvtierd subprocess on a real Unix socket with real files, per test."""

from __future__ import annotations

import glob
import os
import signal
import subprocess
import time
import urllib.request

import pytest

from kvtier.client.process import DaemonProcess

SMALL_CONFIG = {
    "cpu.capacity": "32MiB", "cpu.slot_bytes": "64KiB",
    "disk.capacity": "256MiB", "disk.segment_bytes": "8MiB", "disk.batch_blocks": 16, "disk.queue_blocks": 256,
    "limits.default_lease_ms": 5000,
}


def wait_for(predicate, timeout: float = 60.0, what: str = "condition", interval: float = 0.05):
    """Polls predicate() until it returns something truthy (returned); AssertionError naming `what`
    after `timeout` seconds. The way to wait for a state: never sleep a fixed time and hope. The bound
    is generous (a loaded machine is slow) and only reached when the state never comes."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def scrape_metrics(address: str) -> dict[str, float]:
    """A daemon's Prometheus metrics (untagged series) from its metrics.listen address (host:port)."""
    text = urllib.request.urlopen(f"http://{address}/metrics", timeout=30).read().decode()
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#") and "{" not in line:
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    return values


def _stopped(pid: int) -> bool:
    """Every thread of process `pid` is in the stopped state (T)."""
    states = []
    for stat in glob.glob(f"/proc/{pid}/task/*/stat"):
        try:
            with open(stat) as file:
                states.append(file.read().rsplit(")", 1)[1].split()[0])
        except (FileNotFoundError, ProcessLookupError):
            continue  # a thread that exited
    return bool(states) and all(state in ("T", "t") for state in states)


def wait_stopped(pid: int) -> None:
    """Waits until the kernel shows every thread of `pid` stopped: SIGSTOP is delivered
    asynchronously, and a process still running for a moment may still answer."""
    wait_for(lambda: _stopped(pid), what=f"process {pid} to stop", interval=0.001)


def sigstop(pid: int) -> None:
    """SIGSTOP, returning once the process is stopped (hung: its sockets accept, nothing answers)."""
    os.kill(pid, signal.SIGSTOP)
    wait_stopped(pid)


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


def mount_tmpfs(path, size: str) -> None:
    """Mounts a tmpfs of `size` (e.g. "8m") on path: a small file system to fill up. Needs root (the
    suite runs as root); a failed mount fails the test, since skipping would hide the check."""
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.fail(f"cannot mount a {size} tmpfs on {path} (needs root): {done.stderr.strip()}")


def tenant_env(env: dict, home: str) -> dict:
    """`env` for a process of another uid: whatever points into root's home (caches this process or
    torch set, e.g. TORCHINDUCTOR_CACHE_DIR) is dropped, and its caches go under `home`."""
    private = os.path.expanduser("~")
    kept = {k: v for k, v in env.items()
            if not (k.endswith(("_DIR", "_ROOT", "_HOME", "_CACHE")) and v.startswith(private))}
    return {**kept, "HOME": home, "XDG_CACHE_HOME": os.path.join(home, "cache")}
