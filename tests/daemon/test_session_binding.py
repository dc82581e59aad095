"""A session works only for its owner, and no local user can take the daemon's descriptors: tried
the way another tenant on the node would, with real kvtierd and client processes under other uids
(setpriv). The sockets are world-connectable (0666) on purpose: what may connect is not the defence."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from kvtier.client.client import Client
from kvtier.daemon import config as config_mod
from kvtier.daemon.local_sockets import descriptor_budget, principal_socket

from conftest import SMALL_CONFIG, wait_for

UID_A, UID_B = 40021, 40022
THIEF = os.path.join(os.path.dirname(__file__), "_session_thief.py")
SETPRIV = shutil.which("setpriv")
TENANTS = [{"name": "a", "uids": [UID_A], "cpu_capacity": "1MiB", "max_sessions": 8},
           {"name": "b", "uids": [UID_B], "cpu_capacity": "1MiB", "max_sessions": 8}]
NODE = {"server.socket_mode": "0666", "server.max_sessions": 16, "tenant": TENANTS}


def _command(uid: int, daemon, step: str, *args: str) -> list[str]:
    assert SETPRIV, "setpriv (util-linux) is needed for the multi-user tests"
    return [SETPRIV, f"--reuid={uid}", f"--regid={uid}", "--clear-groups", sys.executable, THIEF, daemon.socket,
            step, *args]


def _env() -> dict:
    return {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": os.environ.get("PYTHONPATH", "")}


def run_as(uid: int, daemon, step: str, *args: str) -> dict:
    done = subprocess.run(_command(uid, daemon, step, *args), capture_output=True, text=True, timeout=180,
                          env=_env())
    assert done.returncode == 0, f"{step} as uid {uid} failed:\n{done.stderr[-3000:]}"
    return json.loads(done.stdout.strip().splitlines()[-1])


class Holding:
    """A step that prints one JSON line when ready and holds what it opened until closed."""

    def __init__(self, uid: int, daemon, step: str, *args: str):
        self.proc = subprocess.Popen(_command(uid, daemon, step, *args), stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
        line = self.proc.stdout.readline()  # its readiness signal
        assert line, f"{step} as uid {uid} ended early:\n{self.proc.stderr.read()[-3000:]}"
        self.said = json.loads(line)

    def close(self) -> None:
        self.proc.stdin.close()
        assert self.proc.wait(timeout=60) == 0, self.proc.stderr.read()[-3000:]


@pytest.fixture
def node(make_daemon):
    return make_daemon(NODE)


def test_a_session_id_is_worthless_to_another_tenant(node):
    victim = Holding(UID_A, node, "hold", "a/secrets")
    try:
        session_id = victim.said["session"]
        stolen = run_as(UID_B, node, "steal", session_id, "a/secrets", victim.said["target_path"])
        assert victim.said["target_path"] == principal_socket(node.socket, 1)  # a's own socket, by descriptor
        for where in ("shared", "own_socket"):  # tenant b with a's id: refused everywhere it can call
            assert stolen[where] == {"list": "UNAUTHENTICATED", "listed": [], "get": "UNAUTHENTICATED",
                                     "put": "UNAUTHENTICATED", "allocate": "UNAUTHENTICATED",
                                     "clear": "UNAUTHENTICATED"}, where
        assert stolen["victim_socket"] == "PermissionError"  # a's socket cannot be reached by its path
        wait_for(lambda: "which is not its own socket: refused" in node.log(), what="the misuse in the log")
        assert "was presented on tenant b's socket" in node.log()
        assert "was presented on the shared socket, which serves no kvtier.v1 calls: refused" in node.log()
    finally:
        victim.close()
    with Client(node.socket) as admin:  # a's block is still there, untouched by the thief
        assert admin.get("a/secrets", bytes.fromhex("5a" * 32))[1] == b"the victim's block"


def test_the_owner_of_a_session_still_calls_with_it(node):
    victim = Holding(UID_A, node, "hold", "a/own")  # stores through its own session: the baseline
    victim.close()
    with Client(node.socket) as admin:
        assert admin.get("a/own", bytes.fromhex("5a" * 32))[1] == b"the victim's block"


def test_connections_held_by_one_uid_leave_the_others_served(make_daemon):
    """One uid holds more connections than kvtierd has descriptors: past its bounds each one is closed
    at once, so the daemon keeps its descriptors, and another tenant still opens a session and calls."""
    node = make_daemon(NODE)
    budget = descriptor_budget(config_mod.load(overrides=_nested({**SMALL_CONFIG, **NODE})))
    limit = budget + 128
    subprocess.run(["prlimit", f"--pid={node.pid}", f"--nofile={limit}:{limit}"], check=True)
    flood = Holding(UID_A, node, "flood", str(limit + 1000))
    try:
        assert flood.said["opened"] + flood.said["failed"] == limit + 1000
        # The daemon has taken every connection the kernel queued for it (accepted, and closed those
        # past its bounds): nothing waits in the listeners' queues.
        wait_for(lambda: _queued(node.socket) == _queued(node.socket + ".session") == 0,
                 what="the daemon to take every queued connection")
        assert len(os.listdir(f"/proc/{node.pid}/fd")) <= budget
        served = run_as(UID_B, node, "child_descriptors")  # a session, an arena, a call: served
        assert served["child_fds"] is not None
        wait_for(lambda: "connection of uid 40021 closed at once" in node.log(), what="the refusals in the log")
        assert "Too many open files" not in node.log()
    finally:
        flood.close()
    assert node.proc.poll() is None


def _queued(listening_path: str) -> int:
    """Connections waiting in the accept queue of the Unix socket listening on `listening_path`."""
    lines = subprocess.run(["ss", "-xlH"], capture_output=True, text=True, check=True).stdout.splitlines()
    for line in lines:
        fields = line.split()
        if len(fields) >= 5 and fields[4] == listening_path:
            return int(fields[2])
    raise AssertionError(f"no listener on {listening_path}:\n" + "\n".join(lines))


def test_a_child_of_an_engine_inherits_none_of_the_sessions_descriptors(node):
    seen = run_as(UID_A, node, "child_descriptors")["child_fds"]
    assert not [link for link in seen if "kvtier" in link or link.startswith("socket:")], seen


def _nested(dotted: dict) -> dict:
    out: dict = {}
    for key, value in dotted.items():
        section, _, name = key.partition(".")
        if name:
            out.setdefault(section, {})[name] = value
        else:
            out[section] = value
    return out
