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

from conftest import scrape_metrics, wait_for
from s3server import free_port

UID_A, UID_B, STRANGER = 40001, 40002, 40003
KEY = "6b" * 32
HELPER = os.path.join(os.path.dirname(__file__), "_as_tenant.py")
SETPRIV = shutil.which("setpriv")  # util-linux: present wherever the suite runs (checked below)

TENANTS = [{"name": "a", "uids": [UID_A], "cpu_capacity": "1MiB", "max_leases": 6, "max_watchers": 2,
            "max_namespaces": 3, "max_sessions": 4},
           {"name": "b", "uids": [UID_B], "cpu_capacity": "1MiB"}]


def run_as(uid: int, daemon, step: str, *args: str, gid: int | None = None, groups: list[int] = ()) -> dict:
    """Runs one _as_tenant.py step as `uid` in its own process: effective gid `gid` (default: the uid's
    number) and exactly the supplementary `groups` (default: none)."""
    assert SETPRIV, "setpriv (util-linux) is needed for the multi-user tests"
    gid = uid if gid is None else gid
    supplementary = [f"--groups={','.join(map(str, groups))}"] if groups else ["--clear-groups"]
    done = subprocess.run([SETPRIV, f"--reuid={uid}", f"--regid={gid}", *supplementary, sys.executable,
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


# Tenants named by group only, and an administrators' group: a user's supplementary groups decide.
UID_C, GID_G, GID_H, GID_ADMIN = 40004, 41001, 41002, 41000
GROUP_TENANTS = TENANTS + [{"name": "g", "gids": [GID_G], "cpu_capacity": "1MiB"},
                           {"name": "h", "gids": [GID_H], "cpu_capacity": "1MiB"}]


@pytest.fixture
def group_node(make_daemon):
    return make_daemon({"server.socket_mode": "0666", "server.admin_uids": [0], "server.admin_gids": [GID_ADMIN],
                        "tenant": GROUP_TENANTS})


def test_a_supplementary_group_makes_a_user_its_groups_tenant(group_node):
    # uid and effective gid are named nowhere: only the supplementary group is.
    assert run_as(UID_C, group_node, "whoami")["error"] == "PERMISSION_DENIED"
    assert run_as(UID_C, group_node, "whoami", groups=[GID_G]) == {"principal": f"uid {UID_C}", "tenant": "g",
                                                                   "prefix": "g/"}
    assert run_as(UID_C, group_node, "store", "g/m", KEY, "g's block", groups=[GID_G])["status"] == [1]
    assert run_as(UID_C, group_node, "read", "g/m", KEY, groups=[GID_G]) == {"data": "g's block"}
    assert run_as(UID_C, group_node, "read", "h/m", KEY, groups=[GID_G]) == {"error": "PERMISSION_DENIED"}
    assert f"local session for uid {UID_C} (tenant g, by its supplementary gid {GID_G})" in group_node.log()
    assert run_as(UID_C, group_node, "whoami", groups=[GID_ADMIN])["tenant"] is None  # an administrator


def test_hundreds_of_supplementary_groups_are_all_read(group_node):
    # More groups than the first buffer holds (64) and than Python's getsockopt can return (256): the
    # tenant's group comes last, so it is found only if the whole list is read.
    groups = list(range(42000, 42300)) + [GID_H]
    assert run_as(UID_C, group_node, "whoami", groups=groups)["tenant"] == "h"


def test_groups_of_two_principals_are_refused_not_picked(group_node):
    refused = run_as(UID_C, group_node, "whoami", groups=[GID_H, GID_G])
    assert refused["error"] == "PERMISSION_DENIED"
    why = (f"uid {UID_C}: its supplementary groups name more than one principal: gid {GID_G} (tenant g), "
           f"gid {GID_H} (tenant h)")
    assert why in refused["details"]
    assert f"local session refused for uid {UID_C}: {why}" in group_node.log()
    both = run_as(UID_C, group_node, "whoami", groups=[GID_G, GID_ADMIN])  # a tenant's and the admins'
    assert both["error"] == "PERMISSION_DENIED" and "the administrators" in both["details"]
    # Groups of one tenant only, however many, are no conflict.
    assert run_as(UID_C, group_node, "whoami", groups=[GID_G, 42000])["tenant"] == "g"


def test_the_effective_gid_wins_over_supplementary_groups_and_the_uid_over_both(group_node):
    assert run_as(UID_C, group_node, "whoami", gid=GID_H, groups=[GID_G])["tenant"] == "h"
    assert run_as(UID_C, group_node, "whoami", gid=GID_H, groups=[GID_G, GID_ADMIN])["tenant"] == "h"
    assert run_as(UID_A, group_node, "whoami", gid=GID_H, groups=[GID_G])["tenant"] == "a"


# A small disk tier (2 MiB; segments of three 60 kB blocks) that tenant a's writes alone overflow.
BLOCK = 60_000
RECORD = 65_536  # what a BLOCK takes on disk (what its quota counts): a 4 KiB header area + the payload padded to 4 KiB


def small_disk_node(make_daemon, a_disk_capacity: int):
    return make_daemon({"server.socket_mode": "0666", "cpu.capacity": "1MiB", "disk.capacity": "2MiB",
                        "disk.segment_bytes": "256KiB", "metrics.listen": f"127.0.0.1:{free_port()}",
                        "tenant": [{**TENANTS[0], "disk_capacity": a_disk_capacity}, TENANTS[1]]})


def on_disk(node, namespace: str, count: int) -> int:
    """How many of blocks 0..count-1 of `namespace` the disk tier holds (the admin's view)."""
    found = 0
    with Client(node.socket) as admin:
        for index in range(count):
            try:
                found += bool(admin.stat(namespace, index.to_bytes(32, "big")).tiers & pb.TIER_DISK)
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.NOT_FOUND, exc  # gone from every tier
    return found


def test_a_tenant_filling_its_disk_quota_leaves_the_other_tenants_blocks_on_disk(make_daemon):
    node = small_disk_node(make_daemon, 4 * RECORD)
    assert run_as(UID_B, node, "store_durable", "b/m", "3", str(BLOCK))["durable"] == 3
    a = run_as(UID_A, node, "store_durable", "a/fill", "40", str(BLOCK))  # 2.4 MB: more than the whole disk tier
    assert (a["durable"], a["refused"]) == (4, 36)
    assert "tenant a has its disk_capacity (262144 bytes) of blocks on disk" in a["why"]
    assert on_disk(node, "b/m", 3) == 3 and on_disk(node, "a/fill", 40) == 4
    metrics = scrape_metrics(node.overrides["metrics.listen"])
    assert metrics["kvtier_tenant_disk_refused_total"] == 36 and metrics["kvtier_disk_evictions_total"] == 0
    assert node.log().count("tenant a: 1 blocks not written to disk") == 1  # one line a minute, not 36
    # After a restart the quota is counted from what recovery found: a's next block is refused at once.
    assert node.stop() == 0
    node.start()
    assert on_disk(node, "b/m", 3) == 3 and on_disk(node, "a/fill", 40) == 4
    assert run_as(UID_A, node, "store_durable", "a/more", "1", str(BLOCK))["refused"] == 1
    assert run_as(UID_B, node, "store_durable", "b/more", "1", str(BLOCK))["durable"] == 1  # b has no quota
    with Client(node.socket) as admin:  # deleting a's blocks makes room for as many again
        assert admin.delete("a/fill", [index.to_bytes(32, "big") for index in range(2)]).deleted == 2
    assert run_as(UID_A, node, "store_durable", "a/again", "3", str(BLOCK))["durable"] == 2


def test_disk_capacity_parses_as_a_size_and_must_fit_the_disk_tier():
    from kvtier.daemon import config
    tenant = {"name": "a", "uids": [UID_A]}
    assert config.load(overrides={"tenant": [{**tenant, "disk_capacity": "2GiB"}]}).tenant[0].disk_capacity == 2 << 30
    assert config.load(overrides={"tenant": [tenant]}).tenant[0].disk_capacity == 0  # no quota of its own
    with pytest.raises(config.ConfigError, match=r"tenant\[0\] \(a\): disk_capacity must be at most disk.capacity"):
        config.load(overrides={"tenant": [{**tenant, "disk_capacity": "9GiB"}]})


def test_without_a_disk_quota_the_same_writes_push_the_other_tenants_blocks_off_disk(make_daemon):
    # The control: the writes above are enough to evict b's blocks when a has no quota of its own.
    node = small_disk_node(make_daemon, 0)
    assert run_as(UID_B, node, "store_durable", "b/m", "3", str(BLOCK))["durable"] == 3
    assert run_as(UID_A, node, "store_durable", "a/fill", "40", str(BLOCK)) == {"durable": 40, "refused": 0,
                                                                                "why": ""}
    assert on_disk(node, "b/m", 3) == 0
