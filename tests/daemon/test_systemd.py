"""kvtierd under systemd: the unit file, install.sh, and the sd_notify protocol (watchdog, reload, stop).

systemd is not PID 1 here, so nothing is started by systemd: the unit is checked with
`systemd-analyze verify`, and the daemon's notifications are read from a datagram socket the test
binds and passes as NOTIFY_SOCKET, the way systemd would.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import SMALL_CONFIG
from kvtier.client.process import DaemonProcess, toml_text
from kvtier.daemon import config as config_mod
from kvtier.daemon import main as daemon_main

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "packaging" / "kvtierd.service"
INSTALL = ROOT / "packaging" / "install.sh"
SYSUSERS = ROOT / "packaging" / "kvtierd.sysusers.conf"
OPERATIONS = ROOT / "docs" / "operations.md"


# -- helpers -----------------------------------------------------------------------------------
class NotifySink:
    """What systemd would receive: a bound datagram socket, read by a thread, with arrival times."""

    def __init__(self, path: Path):
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.settimeout(0.2)
        self.messages: list[tuple[float, str]] = []
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._closed:
            try:
                data = self.sock.recv(65536)
            except (TimeoutError, socket.timeout):
                continue
            except OSError:
                return
            with self._cond:
                self.messages.append((time.monotonic(), data.decode()))
                self._cond.notify_all()

    def texts(self, since: int = 0) -> list[str]:
        with self._cond:
            return [text for _, text in self.messages[since:]]

    def pings(self, since: int = 0) -> list[float]:
        """Arrival times of the WATCHDOG=1 messages."""
        with self._cond:
            return [at for at, text in self.messages[since:] if "WATCHDOG=1" in text.splitlines()]

    def wait_for(self, predicate, since: int = 0, timeout: float = 30.0) -> int:
        """Index of the first message from `since` on for which predicate(text) holds."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for i in range(since, len(self.messages)):
                    if predicate(self.messages[i][1]):
                        return i
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"no such notification in {timeout}s; got {self.texts()}")
                self._cond.wait(left)

    def close(self) -> None:
        self._closed = True
        self._thread.join(5)
        self.sock.close()


def fields(text: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in text.splitlines() if "=" in line)


@pytest.fixture
def sink(tmp_path):
    s = NotifySink(tmp_path / "notify.sock")
    yield s
    s.close()


@pytest.fixture
def start_daemon(tmp_path, sink):
    """Starts a kvtierd with NOTIFY_SOCKET (and any extra env) pointing at `sink`."""
    daemons: list[DaemonProcess] = []

    def start(env: dict | None = None, overrides: dict | None = None, name: str = "d") -> DaemonProcess:
        daemon = DaemonProcess(tmp_path, {**SMALL_CONFIG, **(overrides or {})}, name=name,
                               env={"NOTIFY_SOCKET": sink.path, **(env or {})})
        daemons.append(daemon)
        return daemon.start()

    yield start
    for daemon in daemons:
        daemon.kill()
        daemon.cleanup(remove_data=False)


def rewrite_config(daemon: DaemonProcess, log_level: str = "info", **changes) -> None:
    """Writes the daemon's config file anew (same data dir and socket), with changed keys."""
    daemon.config.write_text(toml_text(str(daemon.data_dir), {**daemon.overrides, **changes}, log_level))


def sighup(daemon: DaemonProcess, sink: NotifySink) -> int:
    """SIGHUP; waits for RELOADING=1 then READY=1; returns the index of that READY=1."""
    since = len(sink.messages)
    os.kill(daemon.pid, signal.SIGHUP)
    reloading = sink.wait_for(lambda t: "RELOADING=1" in t.splitlines(), since)
    return sink.wait_for(lambda t: "READY=1" in t.splitlines(), reloading + 1)


# -- the unit file -----------------------------------------------------------------------------
def unit_directives(path: Path = UNIT) -> dict[str, list[str]]:
    """'Section.Key' -> values (systemd allows a key more than once)."""
    directives: dict[str, list[str]] = {}
    section = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        directives.setdefault(f"{section}.{key.strip()}", []).append(value.strip())
    return directives


REQUIRED = {
    "Type": "notify", "NotifyAccess": "main",
    "ExecStart": "/usr/local/bin/kvtierd -c /etc/kvtier/kvtierd.toml",
    "ExecReload": "/bin/kill -HUP $MAINPID", "WatchdogSec": "30", "Restart": "on-failure",
    "RestartSec": "2", "TimeoutStopSec": "60", "LimitMEMLOCK": "infinity", "LimitNOFILE": "65536",
    "User": "kvtier", "Group": "kvtier", "RuntimeDirectory": "kvtier", "RuntimeDirectoryMode": "0750",
    "StateDirectory": "kvtier", "NoNewPrivileges": "yes", "ProtectSystem": "strict",
    "ReadWritePaths": "/var/lib/kvtier /run/kvtier", "ProtectHome": "yes", "PrivateTmp": "yes",
    "ProtectKernelTunables": "yes", "ProtectKernelModules": "yes", "ProtectControlGroups": "yes",
    "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6 AF_NETLINK", "LockPersonality": "yes",
    "RestrictRealtime": "yes", "SystemCallArchitectures": "native", "CapabilityBoundingSet": "",
    "UMask": "0007",
}


def test_unit_has_the_required_directives():
    directives = unit_directives()
    for key, value in REQUIRED.items():
        assert directives.get(f"Service.{key}") == [value], key
    # Set on purpose: GPU nodes need /dev/nvidia* and torch/CUDA may need W+X memory.
    for absent in ("MemoryDenyWriteExecute", "PrivateDevices", "DevicePolicy", "DeviceAllow", "ProtectClock",
                   "DynamicUser", "RemoveIPC"):
        assert f"Service.{absent}" not in directives, absent
    assert directives["Install.WantedBy"] == ["multi-user.target"]


def test_shutdown_bound_fits_in_timeout_stop_sec():
    timeout_stop = int(unit_directives()["Service.TimeoutStopSec"][0])
    assert daemon_main.GRPC_GRACE_S + daemon_main.DRAIN_TIMEOUT_S + 10 <= timeout_stop
    watchdog = int(unit_directives()["Service.WatchdogSec"][0])
    assert daemon_main.STATUS_INTERVAL_S < watchdog


def test_systemd_analyze_verify(tmp_path):
    # verify checks that ExecStart's binary exists: point it at this venv's kvtierd.
    kvtierd = Path(sys.executable).parent / "kvtierd"
    assert kvtierd.exists(), "the venv has no kvtierd entry point (pip install -e .)"
    text = UNIT.read_text().replace("ExecStart=/usr/local/bin/kvtierd", f"ExecStart={kvtierd}")
    unit = tmp_path / "kvtierd.service"
    unit.write_text(text)
    proc = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60)
    # verify exits 0 on unknown keys and unparsable values, only warning: any line about the unit fails.
    complaints = [line for line in (proc.stdout + proc.stderr).splitlines() if "kvtierd" in line]
    assert proc.returncode == 0 and not complaints, proc.stdout + proc.stderr


def test_systemd_analyze_verify_catches_a_broken_unit(tmp_path):
    """The check above can fail: a typo in the unit is reported."""
    kvtierd = Path(sys.executable).parent / "kvtierd"
    text = UNIT.read_text().replace("ExecStart=/usr/local/bin/kvtierd", f"ExecStart={kvtierd}")
    unit = tmp_path / "kvtierd.service"
    unit.write_text(text.replace("Type=notify", "Type=notifyy"))
    proc = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert "notifyy" in proc.stdout + proc.stderr


def test_sysusers_conf_creates_the_kvtier_user(tmp_path):
    (tmp_path / "etc").mkdir()
    conf = tmp_path / "kvtier.conf"
    shutil.copy(SYSUSERS, conf)
    proc = subprocess.run(["systemd-sysusers", f"--root={tmp_path}", str(conf)], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    passwd = (tmp_path / "etc" / "passwd").read_text()
    assert re.search(r"^kvtier:x:\d+:\d+:[^:]*:/var/lib/kvtier:/usr/sbin/nologin$", passwd, re.M), passwd
    assert re.search(r"^kvtier:x:\d+:", (tmp_path / "etc" / "group").read_text(), re.M)


# -- install.sh --------------------------------------------------------------------------------
def test_install_script_parses():
    proc = subprocess.run(["bash", "-n", str(INSTALL)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert os.access(INSTALL, os.X_OK)


def test_install_dry_run_prints_the_steps_and_changes_nothing(tmp_path):
    prefix = tmp_path / "opt-kvtier"
    proc = subprocess.run(["bash", str(INSTALL), "--dry-run"], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PREFIX": str(prefix)})
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    expected = [
        "groupadd --system kvtier", "useradd --system --gid kvtier",
        f"-m venv {prefix}/venv", f"{prefix}/venv/bin/python -m pip install --quiet --upgrade {ROOT}",
        f"ln -sfn {prefix}/venv/bin/kvtierd /usr/local/bin/kvtierd",
        f"ln -sfn {prefix}/venv/bin/kvtier /usr/local/bin/kvtier",
        f"{UNIT} /etc/systemd/system/kvtierd.service", "write /etc/kvtier/kvtierd.toml",
        "unless: test -e /etc/kvtier/kvtierd.toml", "systemctl daemon-reload", "systemctl enable --now kvtierd",
    ]
    for line in expected:
        assert line in out, line
    assert out.index("groupadd") < out.index("-m venv") < out.index("kvtierd.service") < out.index("daemon-reload")
    assert not prefix.exists()


def test_install_rejects_unknown_arguments():
    proc = subprocess.run(["bash", str(INSTALL), "--frobnicate"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "unknown argument" in proc.stderr


def test_installed_config_matches_the_unit_and_the_docs(tmp_path):
    text = subprocess.run(["bash", str(INSTALL), "--print-config"], capture_output=True, text=True,
                          timeout=60, check=True).stdout
    path = tmp_path / "kvtierd.toml"
    path.write_text(text)
    cfg = config_mod.load(str(path))
    assert cfg.data_dir == "/var/lib/kvtier"
    assert cfg.server.socket == "/run/kvtier/kvtierd.sock"
    assert cfg.server.socket_mode == 0o660
    assert cfg.server.tcp == "" and cfg.metrics.listen.startswith("127.0.0.1:")
    assert text.strip() in OPERATIONS.read_text(), "docs/operations.md must show the config install.sh writes"


# -- sd_notify: watchdog -----------------------------------------------------------------------
def test_watchdog_pings_every_half_period_with_status(start_daemon, sink):
    start_daemon(env={"WATCHDOG_USEC": "1000000"})  # 1 s: a ping every 0.5 s
    ready = sink.wait_for(lambda t: t.startswith("READY=1"))
    time.sleep(4.0)
    pings = sink.pings(ready + 1)
    assert 6 <= len(pings) <= 9, pings
    gaps = [b - a for a, b in zip(pings, pings[1:])]
    assert 0.45 <= statistics.median(gaps) <= 0.65, gaps
    assert max(gaps) < 1.0, gaps  # never late enough for systemd to give up
    status = fields(sink.texts()[ready])["STATUS"]
    assert status.startswith("serving 0 blocks, write backlog 0"), status


def test_watchdog_meant_for_another_pid_is_not_pinged(start_daemon, sink):
    start_daemon(env={"WATCHDOG_USEC": "200000", "WATCHDOG_PID": "1"})
    ready = sink.wait_for(lambda t: t.startswith("READY=1"))
    time.sleep(1.0)
    assert not any("WATCHDOG=1" in t for t in sink.texts(ready))


def test_status_follows_the_store(start_daemon, sink):
    daemon = start_daemon(env={"WATCHDOG_USEC": "400000"})
    ready = sink.wait_for(lambda t: t.startswith("READY=1"))
    with daemon.client() as c:
        c.register_namespace("s")
        c.put_blocks("s", [(bytes([i]) * 32, b"", b"x" * 1000) for i in range(3)], wait_durable=True)
    sink.wait_for(lambda t: "STATUS=serving 3 blocks, write backlog 0" in t, ready)


def test_heartbeat_stops_while_the_event_loop_is_blocked(sink, monkeypatch):
    """The pings come from the event loop, so a stuck loop stops them (and systemd restarts us).

    In-process: a blocked loop is hard to provoke cleanly in the daemon, so Heartbeat runs here on a
    loop the test blocks with time.sleep, while the sink's thread timestamps what arrives.
    """
    monkeypatch.setenv("NOTIFY_SOCKET", sink.path)
    beat = daemon_main.Heartbeat(lambda: "testing", watchdog_s=0.1)  # a ping every 0.05 s

    async def scenario():
        task = asyncio.get_running_loop().create_task(beat.run())
        await asyncio.sleep(0.5)
        blocked_at = time.monotonic()
        time.sleep(1.0)  # the loop is stuck
        await asyncio.sleep(0.5)
        task.cancel()
        return blocked_at

    blocked_at = asyncio.run(scenario())
    pings = sink.pings()
    before = [at for at in pings if at < blocked_at]
    during = [at for at in pings if blocked_at + 0.05 < at < blocked_at + 0.95]
    after = [at for at in pings if at > blocked_at + 1.0]
    assert len(before) >= 5 and len(after) >= 5, pings
    assert not during, "pings went on while the event loop was blocked"
    assert sink.texts()[0] == "WATCHDOG=1\nSTATUS=testing"  # STATUS= only when it changes
    assert all(t == "WATCHDOG=1" for t in sink.texts()[1:])


# -- sd_notify: reload -------------------------------------------------------------------------
def test_sighup_applies_log_level_live(start_daemon, sink):
    daemon = start_daemon()
    sink.wait_for(lambda t: t.startswith("READY=1"))

    rewrite_config(daemon, log_level="warning")
    first = sighup(daemon, sink)
    reloading = fields(sink.texts()[first - 1])
    assert "RELOADING" in reloading and int(reloading["MONOTONIC_USEC"]) > 0
    assert "reload: log_level info -> warning applied" in daemon.log()

    sighup(daemon, sink)  # unchanged: its INFO line is filtered at warning
    assert "unchanged" not in daemon.log()

    rewrite_config(daemon, log_level="debug")
    sighup(daemon, sink)
    assert "reload: log_level warning -> debug applied" in daemon.log()
    sighup(daemon, sink)
    assert "unchanged" in daemon.log()  # INFO shows again
    with daemon.client() as c:
        assert c.stats().blocks == 0


def test_sighup_logs_what_needs_a_restart_and_applies_none_of_it(start_daemon, sink):
    daemon = start_daemon()
    sink.wait_for(lambda t: t.startswith("READY=1"))
    rewrite_config(daemon, **{"cpu.capacity": "16MiB", "limits.max_page_size": 77})
    sighup(daemon, sink)
    assert "reload: needs a restart: cpu.capacity, limits.max_page_size" in daemon.log()
    with daemon.client() as c:
        cpu = next(t for t in c.stats().tiers if t.tier == "cpu")
        assert cpu.capacity_bytes == 32 << 20


@pytest.mark.parametrize("content, reason", [
    ("this is [not toml", "is not valid TOML"),
    ('cpu = { policy = "random" }\n', 'cpu.policy must be "lru", "fifo" or "retention"'),
    ("bogus_key = 1\n", "unknown config key 'bogus_key'"),
])
def test_sighup_with_an_invalid_config_keeps_serving(start_daemon, sink, content, reason):
    daemon = start_daemon()
    sink.wait_for(lambda t: t.startswith("READY=1"))
    daemon.config.write_text(content)
    sighup(daemon, sink)
    log = daemon.log()
    assert "reload: invalid config, keeping the running one" in log and reason in log, log
    with daemon.client() as c:
        c.register_namespace("still")
        assert c.put("still", b"k" * 32, b"serving") == 1
    assert daemon.proc.poll() is None


def test_sighup_with_a_missing_config_keeps_serving(start_daemon, sink):
    daemon = start_daemon()
    sink.wait_for(lambda t: t.startswith("READY=1"))
    daemon.config.unlink()
    sighup(daemon, sink)
    assert "does not exist" in daemon.log()
    with daemon.client() as c:
        assert c.stats().blocks == 0


# -- sd_notify: stop ---------------------------------------------------------------------------
def test_sigterm_stopping_then_drain_then_exit_0(start_daemon, sink):
    # One fdatasync per block makes a backlog likely when SIGTERM lands; the restart proves that
    # whatever was queued reached the disk before the exit.
    overrides = {"disk.batch_blocks": 1}
    daemon = start_daemon(overrides=overrides)
    ready = sink.wait_for(lambda t: t.startswith("READY=1"))
    blocks = [(i.to_bytes(4, "big") * 8, b"", os.urandom(48_000)) for i in range(200)]
    with daemon.client() as c:
        c.register_namespace("drain")
        for start in range(0, len(blocks), 50):
            c.put_blocks("drain", blocks[start:start + 50])
    since = len(sink.messages)
    assert daemon.stop() == 0
    after = sink.texts(since)
    assert after and after[0] == "STOPPING=1", after
    assert not any("READY=1" in t for t in after)
    assert any(t.startswith("STATUS=draining: write backlog") for t in after), after
    assert "kvtierd stopped" in daemon.log()
    assert ready < since
    drained = re.search(r"shutting down: (\d+) blocks waiting", daemon.log())
    assert drained, daemon.log()

    again = start_daemon(overrides=overrides)  # same data dir
    with again.client() as c:
        assert c.stats().blocks == len(blocks)
        assert c.get_blocks("drain", [blocks[-1][0]]) == [blocks[-1][2]]
