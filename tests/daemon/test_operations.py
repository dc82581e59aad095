"""What an operator touches: the kvtier CLI, /metrics, health and reflection, sd_notify, the data-dir lock."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import urllib.request

import grpc
import pytest
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from conftest import Daemon
from kvtier.client import retention


def cli(daemon, *args, check=True):
    proc = subprocess.run([sys.executable, "-m", "kvtier.client.cli", "-s", daemon.socket, *args],
                          capture_output=True, text=True, timeout=60)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def test_cli_put_get_stat_inventory_stats_watch(daemon, tmp_path):
    src = tmp_path / "blob.bin"
    src.write_bytes(os.urandom(30_000))
    key_hex = cli(daemon, "put", "-n", "manual", str(src)).stdout.split()[0]
    assert "duplicate" in cli(daemon, "put", "-n", "manual", str(src)).stdout
    out = tmp_path / "out.bin"
    cli(daemon, "get", "-n", "manual", "-o", str(out), key_hex)
    assert out.read_bytes() == src.read_bytes()
    stat = cli(daemon, "stat", "-n", "manual", key_hex).stdout
    assert "cpu,disk" in stat and "30000" in stat
    inventory = cli(daemon, "inventory").stdout
    assert key_hex in inventory and "(1 blocks)" in inventory
    stats = cli(daemon, "stats").stdout
    assert "blocks 1" in stats and "disk" in stats
    watch = cli(daemon, "watch", "--from-seq", "1", "--count", "2").stdout.splitlines()
    assert "BLOCK_STORED" in watch[0] and "cpu" in watch[0] and "disk" in watch[1]
    missing = cli(daemon, "stat", "-n", "manual", "ab" * 32, check=False)
    assert missing.returncode == 1 and "NOT_FOUND" in missing.stderr
    assert "namespace" in cli(daemon, "stat", "-n", "nope", key_hex, check=False).stderr


def test_cli_inventory_and_stat_show_and_filter_retention(daemon):
    pinned, plain = b"p" * 32, b"q" * 32
    with daemon.client() as c:
        c.register_namespace("agent")
        c.put_blocks("agent", [(pinned, b"", b"system prompt")], retention=retention("system", 90, 3600))
        c.put_blocks("agent", [(plain, b"", b"a turn")])
    rows = cli(daemon, "inventory", "-n", "agent").stdout.splitlines()
    assert "class" in rows[0] and "prio" in rows[0] and "pinned until" in rows[0]
    system = next(r for r in rows if pinned.hex() in r)
    assert " system " in system and " 90 " in system and "Z" in system.split()[-1]  # an ISO time, UTC
    turn = next(r for r in rows if plain.hex() in r)
    assert " conversation " in turn and turn.rstrip().endswith("-")  # the daemon's default, not pinned
    only_pinned = cli(daemon, "inventory", "--pinned").stdout
    assert pinned.hex() in only_pinned and plain.hex() not in only_pinned and "(1 blocks)" in only_pinned
    unpinned = cli(daemon, "inventory", "--unpinned", "--class", "conversation").stdout
    assert plain.hex() in unpinned and pinned.hex() not in unpinned
    assert "(0 blocks)" in cli(daemon, "inventory", "--class", "decode").stdout
    stat = cli(daemon, "stat", "-n", "agent", pinned.hex()).stdout
    assert "class         system" in stat and "priority      90" in stat and "pinned until  20" in stat
    refused = cli(daemon, "inventory", "--class", "forever", check=False)
    assert refused.returncode == 2 and "invalid choice" in refused.stderr


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_metrics_endpoint(make_daemon):
    port = free_port()
    daemon = make_daemon({"metrics.listen": f"127.0.0.1:{port}"})
    key = bytes(range(32))
    with daemon.client() as c:
        c.register_namespace("team-a/secret-model")
        c.put_blocks("team-a/secret-model", [(key, b"", b"x" * 100)], wait_durable=True)
        c.lookup("team-a/secret-model", [key, b"j" * 32])
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        assert "kvtier_local_sessions 1.0" in text  # this client's session, open while it is
    assert "kvtier_local_sessions_refused_total 0.0" in text and "kvtier_tenant_pulls_refused_total 0.0" in text
    assert "kvtier_blocks 1.0" in text
    assert "kvtier_lookup_hit_keys_total 1.0" in text
    assert 'kvtier_tier_blocks{tier="disk"} 1.0' in text
    assert "kvtier_write_backlog 0.0" in text
    assert 'kvtier_tier_pressure_evictions_total{tier="cpu"} 0.0' in text
    # What an unauthenticated scraper learns: node-wide numbers and per-tier ones, never a namespace,
    # a tenant or a block hash (metrics.listen stays on loopback unless metrics.allow_remote).
    assert "team-a" not in text and "secret" not in text and key.hex() not in text
    labels = {label.split("=")[0] for line in text.splitlines() if not line.startswith("#") and "{" in line
              for label in line[line.index("{") + 1:line.index("}")].split(",")}
    assert labels == {"tier"}


def test_reflection_lists_the_service(daemon):
    with grpc.insecure_channel(f"unix:{daemon.socket}") as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        replies = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
        names = {s.name for r in replies for s in r.list_services_response.service}
    assert {"kvtier.v1.KvTier", "grpc.health.v1.Health"} <= names


def test_socket_permissions_and_data_dir_lock(daemon, tmp_path):
    assert os.stat(daemon.socket).st_mode & 0o777 == 0o660
    twin = Daemon(tmp_path, {"server.socket": daemon.socket + "2"}, name="d")  # same data dir
    with pytest.raises(RuntimeError, match="in use by another kvtierd"):
        twin.start(timeout=30)


def test_sd_notify_ready_after_recovery_and_stopping(make_daemon, tmp_path, monkeypatch):
    path = str(tmp_path / "notify.sock")
    sink = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sink.bind(path)
    sink.settimeout(30)
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    daemon = make_daemon()
    messages = [sink.recv(4096).decode(), sink.recv(4096).decode()]
    assert messages[0].startswith("STATUS=recovering") and messages[1].startswith("READY=1")
    assert daemon.stop() == 0
    assert sink.recv(4096).decode() == "STOPPING=1"
    sink.close()


def test_async_client_round_trip(daemon):
    import asyncio

    from kvtier.client import AsyncClient

    async def scenario():
        async with AsyncClient(daemon.socket) as c:
            await c.register_namespace("async")
            blocks = [(bytes([i]) * 32, b"", bytes([i]) * 3000) for i in range(1, 9)]
            assert await c.put_blocks("async", blocks, wait_durable=True) == [1] * 8
            assert (await c.lookup("async", [k for k, _, _ in blocks])).matched == 8
            assert await c.get_blocks("async", [k for k, _, _ in blocks]) == [d for _, _, d in blocks]
            assert (await c.stat("async", blocks[0][0])).length == 3000
            assert (await c.stats()).blocks == 8
    asyncio.run(scenario())
