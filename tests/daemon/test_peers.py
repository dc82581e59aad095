"""Peers: separate kvtierd processes on loopback pull each other's blocks (NIXL READ, or the gRPC
stream as the fallback), verify them on arrival, and survive dead, hung and lying peers."""

from __future__ import annotations

import os
import random
import signal
import threading
import time

import pytest

from s3server import free_port
from certs import Authority, peer_overrides
from conftest import scrape_metrics, sigstop, wait_for
from kvtier.proto.v1 import kvtier_pb2 as pb

TRANSPORTS = ["nixl", "grpc"]
ATTRS = {"model": "tiny", "block_tokens": "16"}
PEER_TIMEOUT_S = 2.0


def chain(n: int, seed: int = 1, size: int = 50_000) -> list[tuple[bytes, bytes, bytes]]:
    rng = random.Random(seed)
    blocks, parent = [], b""
    for i in range(n):
        key = rng.randbytes(32)
        blocks.append((key, parent, rng.randbytes(size - i)))
        parent = key
    return blocks


@pytest.fixture
def cluster(make_daemon, tmp_path):
    """cluster(n, transport, **overrides) -> n daemons, each listing the others as peers, each
    connected to all of them (a Has to every peer answered) before the test starts."""
    ca = Authority(tmp_path / "pki")

    def make(n: int, transport: str, overrides: dict | None = None):
        ports = [free_port() for _ in range(n)]
        daemons = []
        for i in range(n):
            metrics_port = free_port()
            daemons.append(make_daemon({"metrics.listen": f"127.0.0.1:{metrics_port}",
                                        **peer_overrides(ca, ports, i, transport),
                                        "peers.timeout_s": PEER_TIMEOUT_S, **(overrides or {})}, name=f"node{i}"))
            daemons[-1].metrics_port = metrics_port
        for daemon in daemons:
            _connect(daemon, n - 1)
        return daemons
    return make


def _connect(daemon, peers: int) -> None:
    """Readiness: `daemon` has asked each of its peers once and every one answered, so the first
    contact (TCP, mutual TLS, HTTP/2) is behind it: a slow first handshake on a loaded machine would
    otherwise spend a test's peers.timeout_s and mark that peer down for its backoff. A try that
    fails marks a peer down for a few seconds; the next try that asks everyone settles it."""
    with daemon.client() as c:
        c.register_namespace("connect", {})  # a namespace no test uses: nothing is fetched

        def all_answered() -> bool:
            before = _metrics(daemon)
            c.lookup("connect", [bytes(32)], consult_peers=True)
            after = _metrics(daemon)
            return (after["kvtier_peer_asked_total"] - before["kvtier_peer_asked_total"] == peers
                    and after["kvtier_peer_failures_total"] == before["kvtier_peer_failures_total"])
        wait_for(all_answered, timeout=120, what=f"{daemon.log_path.stem} connected to its {peers} peers",
                 interval=0.2)


def register(daemon, name: str = "m", attributes: dict | None = None):
    c = daemon.client()
    c.register_namespace(name, attributes or ATTRS)
    return c


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_blocks_put_on_one_node_are_pulled_by_two_others_and_verified(cluster, transport):
    nodes = cluster(3, transport)
    blocks = chain(24)
    keys = [k for k, _, _ in blocks]
    owner = register(nodes[0])
    owner.put_blocks("m", blocks, retention=pb.Retention(cls="system", priority=90, ttl_s=3600))
    for node in nodes[1:]:
        c = register(node)
        assert c.lookup("m", keys).matched == 0  # without asking, a node sees only its own blocks
        found = c.lookup("m", keys, consult_peers=True)
        assert (found.matched, found.from_peers) == (24, 24)
        assert c.get_blocks("m", keys) == [data for _, _, data in blocks]
        info = c.stat("m", keys[5])
        assert info.parent == keys[4]  # lineage travels; retention is clamped to the local default
        assert (info.retention.cls, info.retention.priority, info.retention.ttl_s) == ("conversation", 50, 0)
        assert c.lookup("m", keys, consult_peers=True).from_peers == 0  # now local
    stats = nodes[2].client().stats()
    assert stats.blocks == 24
    metrics = _metrics(nodes[2])
    assert metrics[f"kvtier_peer_fetched_blocks_{transport}_total"] == 24
    assert metrics["kvtier_peer_transport_nixl"] == (1 if transport == "nixl" else 0)
    log = nodes[2].log()
    assert ("over streamed gRPC" in log) == (transport == "grpc")


def test_partial_chains_pull_only_the_missing_suffix(cluster):
    a, b = cluster(2, "grpc")
    blocks = chain(10, seed=2)
    keys = [k for k, _, _ in blocks]
    register(a).put_blocks("m", blocks[:7])
    cb = register(b)
    cb.put_blocks("m", blocks[:3])
    found = cb.lookup("m", keys, consult_peers=True)
    assert (found.matched, found.from_peers) == (7, 4)
    assert cb.get_blocks("m", keys[:7]) == [d for _, _, d in blocks[:7]]


def test_a_peer_with_another_model_under_the_same_name_is_not_used(cluster):
    a, b = cluster(2, "grpc")
    blocks = chain(4, seed=3)
    register(a, attributes={"model": "other"}).put_blocks("m", blocks)
    cb = register(b)
    assert cb.lookup("m", [k for k, _, _ in blocks], consult_peers=True).matched == 0
    assert "other attributes" in b.log()


def test_a_corrupt_block_on_the_owner_is_never_served(cluster):
    a, b = cluster(2, "grpc")
    blocks = chain(6, seed=4)
    ca = register(a)
    ca.put_blocks("m", blocks, wait_durable=True)
    arena = ca.arena()
    lease = ca.acquire("m", [blocks[3][0]])
    slot = lease.blocks[0].slot
    ca.release(lease.id)
    arena.view(slot)[100] ^= 0xFF  # bit rot in the owner's memory, after its checksum was taken
    cb = register(b)
    found = cb.lookup("m", [k for k, _, _ in blocks], consult_peers=True)
    assert found.matched == 3  # the verified prefix; the bad block and what follows are dropped
    assert cb.get_blocks("m", [k for k, _, _ in blocks[:3]]) == [d for _, _, d in blocks[:3]]
    assert _metrics(b)["kvtier_peer_corrupt_blocks_total"] == 1


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_hung_peer_costs_at_most_its_timeout_then_is_skipped(cluster, transport):
    a, b, c = cluster(3, transport)
    blocks = chain(8, seed=5)
    keys = [k for k, _, _ in blocks]
    register(a).put_blocks("m", blocks)
    register(c).put_blocks("m", blocks[:2])
    cb = register(b)
    before = _metrics(b)
    sigstop(a.pid)  # hung, not dead: its sockets accept and never answer
    try:
        started = time.monotonic()
        found = cb.lookup("m", keys, consult_peers=True)
        first = time.monotonic() - started
        assert found.matched == 2 and found.from_peers == 2  # the live peer still serves what it has
        # Bounded by peers.timeout_s: a SIGSTOPped peer never answers, so only that deadline ends the
        # wait. The slack is for a loaded machine; it stays far below what an unbounded wait costs
        # (gRPC's own 20 s connect timeout, or forever).
        assert first < PEER_TIMEOUT_S + 5.0, f"a hung peer cost {first:.1f}s"
        hung = _metrics(b)
        assert hung["kvtier_peer_failures_total"] - before["kvtier_peer_failures_total"] == 1  # a, once
        assert hung["kvtier_peer_asked_total"] - before["kvtier_peer_asked_total"] == 2  # both, at once
        cb.lookup("m", keys[2:], consult_peers=True)
        skipped = _metrics(b)
        # Skipped during its backoff: only c was asked, and nothing more timed out.
        assert skipped["kvtier_peer_asked_total"] - hung["kvtier_peer_asked_total"] == 1
        assert skipped["kvtier_peer_failures_total"] == hung["kvtier_peer_failures_total"]
    finally:
        os.kill(a.pid, signal.SIGCONT)
    assert "skipping it for" in b.log()


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_killing_the_owner_mid_transfer_serves_nothing_corrupt(cluster, transport):
    big = {"cpu.capacity": "160MiB", "cpu.slot_bytes": "1MiB", "disk.capacity": "512MiB",
           "disk.segment_bytes": "32MiB", "peers.max_blocks_per_fetch": 128}
    a, b = cluster(2, transport, big)
    rng = random.Random(6)
    blocks, parent = [], b""
    for _ in range(128):
        key = rng.randbytes(32)
        blocks.append((key, parent, rng.randbytes(1 << 20)))
        parent = key
    keys = [k for k, _, _ in blocks]
    ca = register(a)
    for start in range(0, 128, 32):
        ca.put_blocks("m", blocks[start:start + 32])
    cb = register(b)
    fetches = _metrics(b)["kvtier_peer_fetches_total"]
    done = threading.Event()

    def kill_once_the_pull_started():
        # The moment comes from b's progress, not from a clock: b counts a pull as started once the
        # owner said it holds the blocks and the transfer begins.
        wait_for(lambda: done.is_set() or _metrics(b)["kvtier_peer_fetches_total"] > fetches, timeout=120,
                 what="b to start pulling", interval=0.005)
        a.kill()
    killer = threading.Thread(target=kill_once_the_pull_started)
    killer.start()
    started = time.monotonic()
    try:
        found = cb.lookup("m", keys, consult_peers=True)
    finally:
        done.set()
        killer.join()
    elapsed = time.monotonic() - started
    # Each step (the pin, the transfer) is bounded by peers.timeout_s; slack for a loaded machine.
    assert elapsed < 3 * PEER_TIMEOUT_S + 5.0, f"a killed owner cost {elapsed:.1f}s"
    if found.matched:
        landed = cb.get_blocks("m", keys[:found.matched])
        assert landed == [d for _, _, d in blocks[:found.matched]]  # whatever landed is byte-exact
    print(f"owner killed; {found.matched} of 128 blocks landed in {elapsed:.2f}s")
    assert cb.stats().blocks == found.matched
    assert cb.lookup("m", keys, consult_peers=True).matched == found.matched  # dead peer: a miss, no error


def _metrics(daemon) -> dict[str, float]:
    """The daemon's Prometheus metrics (untagged series), scraped from its /metrics endpoint."""
    return scrape_metrics(f"127.0.0.1:{daemon.metrics_port}")
