"""Tenants on a shared node, tried the way another local user would: real kvtierd and real client
processes under different uids (the suite runs as root and drops to the tenants' uids with
setpriv). The socket is world-connectable (0666) on purpose: identity comes from the kernel
(SO_PEERCRED), not from who may open the socket."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import grpc
import pytest

from kvtier.client.client import Client
from kvtier.proto.v1 import kvtier_pb2 as pb

from conftest import wait_for

UID_A, UID_B, STRANGER = 40001, 40002, 40003
KEY = "6b" * 32
HELPER = os.path.join(os.path.dirname(__file__), "_as_tenant.py")
SETPRIV = shutil.which("setpriv")  # util-linux: present wherever the suite runs (checked below)

TENANTS = [{"name": "a", "uids": [UID_A], "cpu_capacity": "1MiB", "max_leases": 6, "max_watchers": 2,
            "max_namespaces": 3, "max_sessions": 4},
           {"name": "b", "uids": [UID_B], "cpu_capacity": "1MiB"}]


def run_as(uid: int, daemon, step: str, *args: str) -> dict:
    """Runs one _as_tenant.py step as `uid` (its own process, no supplementary groups)."""
    assert SETPRIV, "setpriv (util-linux) is needed for the multi-user tests"
    done = subprocess.run([SETPRIV, f"--reuid={uid}", f"--regid={uid}", "--clear-groups", sys.executable,
                           HELPER, daemon.socket, step, *args], capture_output=True, text=True, timeout=120,
                          env={"PATH": os.environ.get("PATH", ""), "PYTHONPATH": os.environ.get("PYTHONPATH", "")})
    assert done.returncode == 0, f"{step} as uid {uid} failed:\n{done.stderr[-3000:]}"
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture
def node(make_daemon):
    return make_daemon({"server.socket_mode": "0666", "tenant": TENANTS})


def test_each_tenant_maps_only_its_own_sealed_arena_part(node):
    a, b = run_as(UID_A, node, "session"), run_as(UID_B, node, "session")
    assert (a["tenant"], a["prefix"], b["tenant"], b["prefix"]) == ("a", "a/", "b", "b/")
    slot = 64 << 10
    assert a["fd_bytes"] == a["slot_count"] * slot == 1 << 20 and b["fd_bytes"] == 1 << 20
    a_slots = set(range(a["first_slot"], a["first_slot"] + a["slot_count"]))
    b_slots = set(range(b["first_slot"], b["first_slot"] + b["slot_count"]))
    assert not a_slots & b_slots  # no slot is ever handed to both tenants
    assert a["shm_files"] == []  # nothing in /dev/shm to open: the memory is passed as a descriptor


def test_a_tenant_cannot_squat_read_or_rewrite_another_tenants_blocks(node):
    assert run_as(UID_B, node, "store", "b/m", KEY, "b's block")["status"] == [1]
    squatted = run_as(UID_A, node, "squat", "b/m", "77" * 32)
    assert squatted == {"register": "PERMISSION_DENIED", "put": "PERMISSION_DENIED",
                        "put_blocks": "PERMISSION_DENIED"}
    attack = run_as(UID_A, node, "attack_arena")
    assert attack["ftruncate"] == "PermissionError"  # sealed: no SIGBUS for the daemon
    assert attack["foreign_arena_fds_opened"] == []  # b's memory is not reachable through /proc either
    assert run_as(UID_A, node, "read", "b/m", KEY) == {"error": "PERMISSION_DENIED"}
    assert run_as(UID_B, node, "read", "b/m", KEY) == {"data": "b's block"}  # a's scribbling changed nothing
    assert node.proc.poll() is None


def test_a_tenants_engine_writes_and_reads_its_own_namespace(node):
    assert run_as(UID_A, node, "store", "a/m", KEY, "a's block")["status"] == [1]
    assert run_as(UID_A, node, "read", "a/m", KEY) == {"data": "a's block"}
    assert run_as(UID_A, node, "get", "a/m", KEY) == {"data": "a's block"}
    with Client(node.socket) as admin:  # root is an administrator: sees it, reads it streamed
        assert admin.get("a/m", bytes.fromhex(KEY))[1] == b"a's block"
        assert admin.stats().active_allocations == 0


def test_a_tenant_cannot_release_abort_or_commit_with_another_tenants_ids(node):
    assert run_as(UID_B, node, "store", "b/m", KEY, "b's block")["status"] == [1]
    held = run_as(UID_B, node, "hold", "b/m", KEY)  # b's process exits with both still open
    run_as(UID_A, node, "store", "a/m", KEY, "a's block")
    ids = [str(held["lease"]), str(held["allocation"]), str(held["slot"])]
    not_open = "FAILED_PRECONDITION"
    assert run_as(UID_A, node, "meddle", "a/m", *ids) == {"release": not_open, "abort": not_open,
                                                         "commit": not_open}
    assert run_as(UID_B, node, "finish", str(held["lease"]), str(held["allocation"])) == {"ok": True}


def test_unconfigured_users_get_nothing_but_health(node):
    seen = run_as(STRANGER, node, "grpc_without_session")
    assert seen == {"list": "UNAUTHENTICATED", "health": "SERVING", "session": "PERMISSION_DENIED"}
    assert f"local session refused for uid {STRANGER}" in node.log()


def test_one_tenant_exhausting_its_bounds_leaves_the_other_working(node):
    a = run_as(UID_A, node, "exhaust", "a/m", "6")
    assert a == {"allocations": 6, "refusal": "RESOURCE_EXHAUSTED"}  # max_leases (its slots would allow 16)
    b = run_as(UID_B, node, "exhaust", "b/m", "8")
    assert b["allocations"] >= 8  # b's own table share and its own slots
    assert run_as(UID_A, node, "namespaces", "a/n", "3")["refusal"] == "RESOURCE_EXHAUSTED"
    assert run_as(UID_B, node, "namespaces", "b/n", "3") == {"registered": 4, "refusal": None}
    assert run_as(UID_A, node, "watchers", "2")["codes"] == ["OK", "OK", "RESOURCE_EXHAUSTED"]
    assert run_as(UID_B, node, "watchers", "2")["codes"] == ["OK", "OK", "OK"]
    assert run_as(UID_B, node, "store", "b/m", KEY, "still works")["status"] == [1]


def test_one_tenant_cannot_take_every_session(node):
    # The first sessions of this daemon: none of an earlier process can still be open.
    assert run_as(UID_A, node, "sessions", "4")["codes"] == ["OK"] * 4 + ["PERMISSION_DENIED"]
    assert run_as(UID_B, node, "sessions", "4")["codes"] == ["OK"] * 5
    assert "tenant a has its max_sessions (4) sessions open" in node.log()


def test_a_tenant_filling_its_arena_part_evicts_only_its_own_blocks(node):
    assert run_as(UID_B, node, "store", "b/m", KEY, "b's block")["status"] == [1]
    assert run_as(UID_A, node, "store_many", "a/fill", "48") == {"stored": 48}  # 3 times a's 16 slots
    with Client(node.socket) as admin:
        assert admin.stat("b/m", bytes.fromhex(KEY)).tiers & pb.TIER_CPU  # b's CPU copy untouched
        cpu = sum(1 for block in admin.iter_inventory("a/fill") if block.tiers & pb.TIER_CPU)
        assert cpu <= 16  # a's blocks never spilled into another part
