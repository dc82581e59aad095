"""Peers: separate kvtierd processes on loopback pull each other's blocks (NIXL READ, or the gRPC
stream as the fallback), verify them on arrival, and survive dead, hung and lying peers."""

from __future__ import annotations

import ctypes
import mmap
import os
import random
import re
import signal
import struct
import subprocess
import threading
import time
import uuid

import grpc
import pytest

from nixl_raw import raw_transfer
from s3server import free_port
from certs import Authority, peer_overrides
from conftest import scrape_metrics, sigstop, wait_for
from kvtier.client import block_checksum
from kvtier.daemon import config
from kvtier.daemon.peers import PeerBudget
from kvtier.proto.v1 import kvtier_pb2 as pb
from kvtier.proto.v1 import kvtier_pb2_grpc as pb_grpc
from kvtier.tiers.nixl import NixlTransport, decode_metadata

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
    """cluster(n, transport, overrides, each) -> n daemons, each listing the others as peers, each
    connected to all of them (a Has to every peer answered) before the test starts. `overrides` go
    to every node, each[i] (optional) to node i only. cluster.ca is the peers' CA; a daemon's
    peer_port is its peers.listen port."""
    ca = Authority(tmp_path / "pki")

    def make(n: int, transport: str, overrides: dict | None = None, each: list[dict] | None = None):
        ports = [free_port() for _ in range(n)]
        daemons = []
        for i in range(n):
            metrics_port = free_port()
            daemons.append(make_daemon({"metrics.listen": f"127.0.0.1:{metrics_port}",
                                        **peer_overrides(ca, ports, i, transport),
                                        "peers.timeout_s": PEER_TIMEOUT_S, **(overrides or {}),
                                        **(each[i] if each else {})}, name=f"node{i}"))
            daemons[-1].metrics_port, daemons[-1].peer_port = metrics_port, ports[i]
        for daemon in daemons:
            _connect(daemon, n - 1)
        return daemons
    make.ca = ca
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


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_pulled_blocks_keep_their_token_ids_and_origin_for_the_routers(cluster, transport):
    a, b = cluster(2, transport)
    blocks = chain(3, seed=7)
    owner = register(a)
    allocation = owner.allocate(3)
    arena = owner.arena()
    entries = []
    for index, (slot, (key, parent, data)) in enumerate(zip(allocation.slots, blocks)):
        arena.view(slot)[:len(data)] = data
        entries.append(pb.CommitEntry(key=key, parent=parent, slot=slot, length=len(data),
                                      checksum=block_checksum(data), token_ids=[index * 4 + t for t in range(4)]))
    origin = pb.BlockOrigin(engine="engine-0", model="org/m", block_size=4)
    owner.call(owner.stub.Commit, pb.CommitRequest(allocation_id=allocation.id, namespace="m", entries=entries,
                                                   origin=origin))
    cb = register(b)
    assert cb.lookup("m", [k for k, _, _ in blocks], consult_peers=True).from_peers == 3
    for index, (key, _, _) in enumerate(blocks):
        info = cb.stat("m", key)
        assert list(info.token_ids) == [index * 4 + t for t in range(4)]
        assert (info.origin.engine, info.origin.model, info.origin.block_size) == ("engine-0", "org/m", 4)


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


def key_file(tmp_path, name: str) -> str:
    """A cluster key (32 random bytes, mode 0600, as the daemon requires of its secrets)."""
    path = tmp_path / name
    path.write_bytes(os.urandom(32))
    path.chmod(0o600)
    return str(path)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_with_one_cluster_key_pulled_blocks_carry_macs_that_verify(cluster, transport, tmp_path):
    a, b = cluster(2, transport, {"cluster.key_file": key_file(tmp_path, "cluster.key")})
    blocks = chain(24, seed=7, size=60_000)  # 1.4 MB in all: the owner hashes them on worker threads
    keys = [k for k, _, _ in blocks]
    register(a).put_blocks("m", blocks)
    cb = register(b)
    found = cb.lookup("m", keys, consult_peers=True)
    assert (found.matched, found.from_peers) == (24, 24)
    assert cb.get_blocks("m", keys) == [data for _, _, data in blocks]
    metrics = _metrics(b)
    assert metrics["kvtier_peer_mac_rejected_total"] == 0 and metrics["kvtier_peer_corrupt_blocks_total"] == 0
    assert metrics[f"kvtier_peer_fetched_blocks_{transport}_total"] == 24


@pytest.mark.parametrize("owner_key", ["another key", "no key"])
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_peer_serving_blocks_without_a_valid_mac_is_refused_and_counted(cluster, transport, owner_key, tmp_path):
    """The owner is a real kvtierd whose blocks are right by checksum but that this cluster's key
    does not vouch for: it signs under another key, or (without one) not at all."""
    ours = key_file(tmp_path, "cluster.key")
    theirs = {"cluster.key_file": key_file(tmp_path, "other.key")} if owner_key == "another key" else {}
    a, b = cluster(2, transport, each=[theirs, {"cluster.key_file": ours}])
    blocks = chain(6, seed=8)
    keys = [k for k, _, _ in blocks]
    register(a).put_blocks("m", blocks)
    cb = register(b)
    found = cb.lookup("m", keys, consult_peers=True)
    assert (found.matched, found.from_peers) == (0, 0)  # nothing committed
    assert cb.stats().blocks == 0 and cb.get_blocks("m", keys[:1]) == [None]
    metrics = _metrics(b)
    assert metrics["kvtier_peer_mac_rejected_total"] == 1  # one pull refused, at its first block
    assert metrics["kvtier_peer_corrupt_blocks_total"] == 0 and metrics["kvtier_peer_fetches_total"] == 1
    log = b.log()
    assert "has a missing or wrong MAC (1 such pulls from it)" in log and "skipping it for" in log


def test_a_peer_pinning_all_it_can_leaves_local_allocate_and_the_window_to_others(make_daemon, tmp_path):
    """A peer (a real mutual-TLS client of the real peer API, with its own certificate) pins as many
    blocks as it may and never releases them: each peer identity gets at most 2 x
    peers.max_blocks_per_fetch, all of them together a quarter of the arena, and local Allocate
    still gets the rest. The export window has exactly that quarter's slots: peers pinning all they
    may get distinct window slots and leave the rest of the window to other peers, and every slot
    comes back when the pins are released or expire."""
    ca = Authority(tmp_path / "pki")
    port, metrics_port = free_port(), free_port()
    slots, per_fetch = 64, 4  # 4 MiB of 64 KiB slots; each peer may pin 8, all peers 16
    owner = make_daemon({**peer_overrides(ca, [port], 0, "nixl"), "cpu.capacity": f"{slots * 64}KiB",
                         "peers.max_blocks_per_fetch": per_fetch, "peers.lease_ms": 60_000,
                         "metrics.listen": f"127.0.0.1:{metrics_port}"}, name="owner")
    blocks = chain(slots, seed=9, size=60_000)
    keys = [k for k, _, _ in blocks]
    data = {k: d for k, _, d in blocks}
    c = register(owner)
    for start in range(0, slots, 16):
        c.put_blocks("m", blocks[start:start + 16], wait_durable=True)
    stubs = {name: _peer_stub(ca, name, port) for name in ("evil1", "evil2", "evil3", "evil4")}
    hello = stubs["evil1"].Hello(pb.PeerHelloRequest(node_id="evil1"), timeout=30)
    window = hello.arena_size // hello.slot_bytes
    assert window == slots // 4 and hello.slot_bytes == 64 << 10  # the window: the most all peers may pin
    served: dict[int, bytes] = {}  # window slot -> key of the block Pin put there

    def pin_all(name: str, lease_ms: int = 60_000) -> list[tuple[int, int]]:
        """Pins chunk after chunk until refused; (lease id, blocks) of each pin it got."""
        leases, offset = [], 0
        while True:
            chunk = keys[offset:offset + per_fetch]
            try:
                answer = stubs[name].Pin(pb.PeerPinRequest(namespace="m", keys=chunk, lease_ms=lease_ms), timeout=30)
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, exc
                return leases
            assert answer.lease_id and all(b.found for b in answer.blocks)
            for key, block in zip(chunk, answer.blocks):
                assert 0 <= block.slot < window and block.length == len(data[key])
                served[block.slot] = key
            leases.append((answer.lease_id, len(answer.blocks)))
            offset += len(answer.blocks)
            assert len(leases) <= slots, "pins never refused"

    first, second, third = pin_all("evil1"), pin_all("evil2"), pin_all("evil3")
    assert sum(n for _, n in first) == 2 * per_fetch  # the per-peer bound
    assert sum(n for _, n in second) == 2 * per_fetch and third == []  # together: a quarter of the arena
    assert sorted(served) == list(range(window))  # evil1 left evil2 its share of the window: all distinct
    # The streamed path counts against the same bounds.
    with pytest.raises(grpc.RpcError) as err:
        list(stubs["evil3"].Fetch(pb.PeerFetchRequest(namespace="m", keys=keys[:1]), timeout=30))
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    # Local writes still get every slot the peers do not hold (no read reserve in an arena this small).
    allocation = c.allocate(slots - 4 * per_fetch, wait_ms=10_000)
    assert len(allocation.slots) == slots - 16
    c.abort(allocation.id)
    # A peer cannot release another peer's pins; the one that holds them can, and room comes back.
    stubs["evil3"].Release(pb.ReleaseRequest(lease_id=first[0][0]), timeout=30)
    assert pin_all("evil3") == []
    for lease_id, _ in first:
        stubs["evil1"].Release(pb.ReleaseRequest(lease_id=lease_id), timeout=30)
    served.clear()
    expired = owner.log().count("expired unreleased")
    short = pin_all("evil3", lease_ms=1000)
    assert sum(n for _, n in short) == 2 * per_fetch and len(served) == 2 * per_fetch  # evil1's slots came back
    # Expiry frees window slots too: evil3 never releases; its 1 s leases expire on the owner.
    wait_for(lambda: owner.log().count("expired unreleased") >= expired + len(short), what="evil3's leases to expire")
    for lease_id, _ in second:
        stubs["evil2"].Release(pb.ReleaseRequest(lease_id=lease_id), timeout=30)
    # The whole window is free again: two peers pin all they may and get every window slot.
    served.clear()
    assert sum(n for _, n in pin_all("evil4") + pin_all("evil1")) == 4 * per_fetch
    assert sorted(served) == list(range(window))
    assert "pin refused" in owner.log() and "cn:evil3" in owner.log()
    assert scrape_metrics(f"127.0.0.1:{metrics_port}")["kvtier_peer_refused_pins_total"] >= 5  # one per pin_all


def _peer_stub(ca: Authority, name: str, port: int) -> pb_grpc.KvTierPeerStub:
    cert, key = ca.issue(name)
    with open(ca.ca_path, "rb") as root, open(key, "rb") as k, open(cert, "rb") as c:
        credentials = grpc.ssl_channel_credentials(root.read(), k.read(), c.read())
    return pb_grpc.KvTierPeerStub(grpc.secure_channel(f"127.0.0.1:{port}", credentials))


def _memfd_mappings(pid: int) -> list[tuple[str, int, int]]:
    """(name, start, length) of every memfd mapping of process `pid` (its arena parts and its export
    window), from /proc/PID/maps."""
    out = []
    with open(f"/proc/{pid}/maps") as maps:
        for line in maps:
            fields = line.split()
            if len(fields) >= 6 and fields[5].startswith("/memfd:kvtier-"):
                start, end = (int(x, 16) for x in fields[0].split("-"))
                out.append((fields[5], start, end - start))
    return out


class Intruder:
    """The test process as a peer that said Hello and loaded the owner's NIXL metadata: a
    NixlTransport over `size` bytes of its own memory. raw() transfers straight through NIXL's agent,
    past NixlTransport's own bounds checks, as a hostile peer would."""

    def __init__(self, metadata: bytes, size: int):
        self.memory = mmap.mmap(-1, size)
        self.address, self.size = ctypes.addressof(ctypes.c_char.from_buffer(self.memory)), size
        self.transport = NixlTransport(f"intruder-{uuid.uuid4().hex[:8]}", [(self.address, size)])
        self.owner = self.transport.add_peer(metadata)
        self.errors = self.transport._b

    def raw(self, op: str, remote: int, length: int, offset: int = 0):
        """One READ or WRITE of `length` bytes between our memory at `offset` and the owner's
        address `remote`; NIXL's final state, or NIXL's exception when it refuses the request."""
        state = raw_transfer(self.transport, self.owner, op, [(self.address + offset, remote, length)])
        assert state == self.transport._b.NIXL_SUCCESS, state
        return state

    def bytes_at(self, offset: int, length: int) -> bytes:
        return ctypes.string_at(self.address + offset, length)

    def close(self) -> None:
        self.transport.close()
        self.memory.close()


def test_the_owners_nixl_metadata_reaches_its_export_window_only(cluster):
    """Hello hands out the metadata of an agent registered over the owner's export window alone. A
    peer that loads it (here the test process, with a certificate of its own) cannot READ or WRITE
    the owner's arena: NIXL refuses the range. What it can WRITE is the window: that changes no
    block stored on the owner, and a requester pulling meanwhile gets verified blocks or a miss,
    never the written bytes."""
    a, b = cluster(2, "nixl", each=[{}, {"disk.enabled": False}])
    blocks = chain(8, seed=10)
    keys, datas = [k for k, _, _ in blocks], [d for _, _, d in blocks]
    owner = register(a)
    owner.put_blocks("m", blocks, wait_durable=True)
    stub = _peer_stub(cluster.ca, "intruder", a.peer_port)
    hello = stub.Hello(pb.PeerHelloRequest(node_id="intruder"), timeout=30)
    window = (hello.arena_address, hello.arena_size)  # Hello's arena_* fields describe the window
    mappings = _memfd_mappings(a.pid)  # kvtierd maps the window too (Pin copies into it), elsewhere
    assert [length for name, _, length in mappings if "-export" in name] == [window[1]]
    agent = _exporter(window)  # the export agent: the window is all the kvtier memory it maps
    assert agent != a.pid and [(s, n) for name, s, n in _memfd_mappings(agent)] == [window]
    assert f"peers READ only the export window, in export agent pid {agent}" in a.log()
    arena = [(start, length) for name, start, length in mappings if "-export" not in name]
    assert arena and all(start + length <= window[0] or window[0] + window[1] <= start for start, length in arena)
    assert decode_metadata(hello.nixl_metadata)[1] == (window,)  # the only region the metadata names
    intruder = Intruder(hello.nixl_metadata, window[1])
    try:
        for start, length in arena:
            for remote in (start, start + length // 2, start + length - 4096):
                with pytest.raises(ValueError):  # kvtier's own bounds check, first
                    intruder.transport.read(intruder.owner, [(intruder.address, remote, 4096)], 5.0)
                for op in ("READ", "WRITE"):  # and NIXL itself, with that check bypassed
                    with pytest.raises(intruder.errors.nixlNotFoundError):
                        intruder.raw(op, remote, 4096)
        with pytest.raises(intruder.errors.nixlNotFoundError):  # nor across the window's end
            intruder.raw("READ", window[0] + window[1] - 2048, 4096)

        # Pin copies the blocks into window slots; they READ back byte-exact.
        pin = stub.Pin(pb.PeerPinRequest(namespace="m", keys=keys, lease_ms=60_000), timeout=30)
        assert len(pin.blocks) == len(keys)
        for block, data in zip(pin.blocks, datas):
            intruder.raw("READ", window[0] + block.slot * hello.slot_bytes, block.length)
            assert intruder.bytes_at(0, block.length) == data
        # A WRITE over the whole window lands there, and only there.
        ctypes.memset(intruder.address, 0xEE, window[1])
        intruder.raw("WRITE", window[0], window[1])
        ctypes.memset(intruder.address, 0, window[1])
        intruder.raw("READ", window[0] + pin.blocks[0].slot * hello.slot_bytes, 4096)
        assert intruder.bytes_at(0, 4096) == b"\xee" * 4096
        stub.Release(pb.ReleaseRequest(lease_id=pin.lease_id), timeout=30)
        assert owner.get_blocks("m", keys) == datas  # what the owner stores is untouched

        # A requester pulls while the intruder keeps overwriting the whole window.
        ctypes.memset(intruder.address, 0xEE, window[1])
        stop, writes = threading.Event(), []

        def overwrite():
            while not stop.is_set():
                writes.append(intruder.raw("WRITE", window[0], window[1]))
        cb = register(b)
        pulls = []

        def a_pull_met_an_overwritten_copy() -> bool:
            found = cb.lookup("m", keys, consult_peers=True)
            pulls.append(found.matched)
            if found.matched:  # whatever was committed is the owner's bytes
                assert cb.get_blocks("m", keys[:found.matched]) == datas[:found.matched]
                cb.clear("m")
            return _metrics(b)["kvtier_peer_corrupt_blocks_total"] > 0
        writer = threading.Thread(target=overwrite)
        writer.start()
        try:
            wait_for(a_pull_met_an_overwritten_copy, timeout=120, what="a pull to READ an overwritten copy")
        finally:
            stop.set()
            writer.join()
        print(f"{len(writes)} WRITEs over the window during {len(pulls)} pulls; blocks committed per pull: {pulls}")
        assert writes and owner.get_blocks("m", keys) == datas
        found = cb.lookup("m", keys, consult_peers=True)  # and once the writes stop, pulls work again
        assert cb.get_blocks("m", keys[:found.matched]) == datas[:found.matched] and found.matched == len(keys)
    finally:
        intruder.close()


def test_without_nixl_an_owner_exposes_no_memory_and_serves_by_fetch(make_daemon, tmp_path):
    """peers.transport = "grpc": Hello hands out no metadata and no address, Pin is refused (there
    is no window to copy into), and Fetch streams the blocks."""
    ca = Authority(tmp_path / "pki")
    port = free_port()
    owner = make_daemon(peer_overrides(ca, [port], 0, "grpc"), name="owner")
    blocks = chain(2, seed=11)
    register(owner).put_blocks("m", blocks)
    stub = _peer_stub(ca, "node1", port)
    hello = stub.Hello(pb.PeerHelloRequest(node_id="node1"), timeout=30)
    assert (hello.nixl_metadata, hello.arena_address, hello.arena_size) == (b"", 0, 0) and hello.generation
    with pytest.raises(grpc.RpcError) as err:
        stub.Pin(pb.PeerPinRequest(namespace="m", keys=[k for k, _, _ in blocks]), timeout=30)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    chunks = list(stub.Fetch(pb.PeerFetchRequest(namespace="m", keys=[k for k, _, _ in blocks]), timeout=30))
    got: dict[int, bytes] = {}
    for chunk in chunks:
        got[chunk.index] = got.get(chunk.index, b"") + chunk.data
    assert [got[i] for i in range(2)] == [d for _, _, d in blocks]
    assert all(chunk.block.slot == 0 for chunk in chunks)  # no slot numbers of its arena either


def _served(daemon) -> dict[str, int]:
    """The peer API calls `daemon` answered (PeerService's Has, Pin and Fetch counts, from its debug
    log), and the Hellos it was sent."""
    log = daemon.log()
    counts = {call: len(re.findall(rf"peer API: {call} #", log)) for call in ("Has", "Pin", "Fetch")}
    counts["Hello"] = log.count("said hello")
    return counts


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_named_peer_is_the_only_one_asked_and_an_unknown_name_asks_nobody(cluster, transport):
    debug = {"log_level": "debug"}  # b and c log each peer API call they answer
    a, b, c = cluster(3, transport, each=[{}, debug, debug])
    by_id, by_address, unknown = chain(5, seed=21), chain(4, seed=22), chain(3, seed=23)
    for node in (b, c):
        register(node).put_blocks("m", by_id + by_address + unknown)
    ca = register(a)
    served_b, served_c, before = _served(b), _served(c), _metrics(a)

    # By node id (what c's Hello says): only c is asked and pulled from.
    found = ca.lookup("m", [k for k, _, _ in by_id], consult_peers=True, peer="node2")
    assert (found.matched, found.from_peers) == (5, 5)
    assert ca.get_blocks("m", [k for k, _, _ in by_id]) == [d for _, _, d in by_id]
    now_b, now_c = _served(b), _served(c)
    assert {k: now_b[k] - served_b[k] for k in ("Has", "Pin", "Fetch")} == {"Has": 0, "Pin": 0, "Fetch": 0}
    assert now_c["Has"] - served_c["Has"] == 1
    assert now_c["Pin"] + now_c["Fetch"] > served_c["Pin"] + served_c["Fetch"]
    after = _metrics(a)
    assert after["kvtier_peer_asked_total"] - before["kvtier_peer_asked_total"] == 1

    # By address (peers.addresses), through Prefetch: again c only.
    warmed = ca.prefetch("m", [k for k, _, _ in by_address], consult_peers=True, peer=f"127.0.0.1:{c.peer_port}")
    assert (warmed.matched, warmed.from_peers) == (4, 4)
    assert {k: _served(b)[k] - served_b[k] for k in ("Has", "Pin", "Fetch")} == {"Has": 0, "Pin": 0, "Fetch": 0}
    assert _served(c)["Has"] - served_c["Has"] == 2

    # A name that is no configured peer: local blocks only, nobody asked (not even a Hello), no error.
    quiet_b, quiet_c, before = _served(b), _served(c), _metrics(a)
    for _ in range(2):
        found = ca.lookup("m", [k for k, _, _ in unknown], consult_peers=True, peer="node9")
        assert (found.matched, found.from_peers) == (0, 0)
    assert (_served(b), _served(c)) == (quiet_b, quiet_c)
    after = _metrics(a)
    assert after["kvtier_peer_asked_total"] == before["kvtier_peer_asked_total"]
    assert after["kvtier_peer_unknown_peer_total"] - before["kvtier_peer_unknown_peer_total"] == 2
    assert a.log().count("a pull named peer 'node9'") == 1  # logged once per name
    # Without a name, behaviour is unchanged: the fan-out finds the blocks.
    assert ca.lookup("m", [k for k, _, _ in unknown], consult_peers=True).from_peers == 3


# -- the owner's budget of each peer: calls in flight, bytes per second ---------------------------
class FakeClock:
    def __init__(self, now: float = 1000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_a_peers_byte_budget_refills_at_its_rate_and_never_waits():
    clock = FakeClock()
    budget = PeerBudget(max_inflight=4, bytes_per_s=1000, burst=400, clock=clock)
    assert budget.burst == 1000  # a second's worth, which is more than one block (400)
    assert budget.take("cn:a", [600, 300, 200]) == 2  # the longest prefix that fits: 900 of 1000
    assert budget.take("cn:a", [200]) == 0 and budget.level("cn:a") == 100  # refused: nothing taken
    assert budget.take("cn:b", [1000]) == 1  # each peer identity has a bucket of its own
    clock.now += 0.125  # refills 125 bytes
    assert budget.take("cn:a", [226]) == 0 and budget.take("cn:a", [225]) == 1
    assert budget.level("cn:a") == 0
    clock.now += 60  # saved up to the burst, no more
    assert budget.level("cn:a") == 1000
    budget.refund("cn:a", 500)
    assert budget.level("cn:a") == 1000
    assert budget.take("cn:a", [700]) == 1
    budget.refund("cn:a", 200)  # charged for a block that was not served after all
    assert budget.level("cn:a") == 500
    clock.now -= 5  # a clock that steps back refills nothing, and takes nothing away
    assert budget.level("cn:a") == 500


def test_a_peers_burst_holds_at_least_one_block_however_low_the_rate():
    clock = FakeClock()
    budget = PeerBudget(max_inflight=4, bytes_per_s=10, burst=64 << 10, clock=clock)
    assert budget.take("cn:slow", [64 << 10, 1]) == 1  # one largest block, then nothing
    clock.now += 6553.5
    assert budget.take("cn:slow", [65_536]) == 0 and budget.take("cn:slow", [65_535]) == 1


def test_without_a_byte_rate_nothing_is_tracked_and_everything_fits():
    budget = PeerBudget(max_inflight=4, bytes_per_s=0, burst=64 << 10, clock=FakeClock())
    assert budget.take("cn:a", [1 << 40] * 3) == 3 and budget.level("cn:a") == float("inf")
    assert budget.tracked() == 0


def test_the_budgets_of_at_most_max_tracked_peers_are_kept():
    clock = FakeClock()
    budget = PeerBudget(max_inflight=4, bytes_per_s=1000, burst=1, clock=clock, max_tracked=3)
    for name in ("a", "b", "c"):
        assert budget.take(f"cn:{name}", [1000]) == 1
    assert budget.take("cn:a", [1]) == 0  # a is now the most recently seen
    budget.take("cn:d", [1000])
    assert budget.tracked() == 3  # b, the least recently seen, was forgotten
    assert budget.level("cn:a") == 0 and budget.level("cn:c") == 0
    assert budget.level("cn:b") == 1000  # back with a full bucket, as after a second of quiet
    assert budget.tracked() == 3


def test_calls_in_flight_are_bounded_per_peer_and_counted_only_while_they_run():
    """The limiter the peer API counts Has, Pin and Fetch with (the daemon test below holds a real
    Fetch open; a Pin or Has cannot be held open from outside without timing)."""
    budget = PeerBudget(max_inflight=2, bytes_per_s=0, burst=0, clock=FakeClock(), max_tracked=1)
    assert budget.enter("cn:a") and budget.enter("cn:a")
    assert not budget.enter("cn:a")  # the third at once is refused
    assert budget.enter("cn:b") and budget.enter("cn:c") and budget.enter("cn:d")  # others are not affected,
    assert budget.inflight("cn:a") == 2 and budget.inflight() == 5  # however many identities (no LRU here)
    budget.leave("cn:a")
    assert budget.enter("cn:a") and not budget.enter("cn:a")
    for name in ("a", "a", "b", "c", "d"):
        budget.leave(f"cn:{name}")
    assert budget.inflight() == 0 and budget._inflight == {}  # no state left once nothing runs


def test_refusals_are_logged_at_most_once_per_interval_per_peer_and_reason():
    clock = FakeClock()
    budget = PeerBudget(max_inflight=1, bytes_per_s=0, burst=0, clock=clock, log_every_s=10)
    assert budget.log_due("cn:a", "rate") == 0  # log it; none suppressed before
    assert budget.log_due("cn:a", "rate") is None and budget.log_due("cn:a", "rate") is None
    assert budget.log_due("cn:a", "inflight") == 0 and budget.log_due("cn:b", "rate") == 0
    clock.now += 10
    assert budget.log_due("cn:a", "rate") == 2  # the next line says how many were not logged


@pytest.mark.parametrize("key, value, message", [
    ("max_inflight_per_peer", 0, "peers.max_inflight_per_peer must be 1..1024"),
    ("max_inflight_per_peer", 5000, "peers.max_inflight_per_peer must be 1..1024"),
    ("max_inflight_per_peer", "4", "peers.max_inflight_per_peer: expected an integer"),
    ("max_bytes_per_s_per_peer", -1, "peers.max_bytes_per_s_per_peer: must not be negative"),
    ("max_bytes_per_s_per_peer", "fast", "peers.max_bytes_per_s_per_peer: expected a size"),
    ("max_bytes_per_s_per_peer", "2TiB", "peers.max_bytes_per_s_per_peer must be at most 1TiB"),
])
def test_the_peer_budget_keys_are_validated(key, value, message):
    with pytest.raises(config.ConfigError, match=re.escape(message)):
        config.load(overrides={"peers": {key: value}})


def test_the_peer_budget_keys_parse_sizes_and_zero():
    cfg = config.load(overrides={"peers": {"max_bytes_per_s_per_peer": "512MiB", "max_inflight_per_peer": 1}})
    assert (cfg.peers.max_bytes_per_s_per_peer, cfg.peers.max_inflight_per_peer) == (512 << 20, 1)
    assert config.load(overrides={"peers": {"max_bytes_per_s_per_peer": 0}}).peers.max_bytes_per_s_per_peer == 0
    assert (config.load().peers.max_bytes_per_s_per_peer, config.load().peers.max_inflight_per_peer) == (2 << 30, 8)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_peer_past_its_bytes_per_second_gets_a_miss_and_the_lookup_answers_locally(cluster, transport):
    """The owner serves a peer 1 byte per second, with a burst of one slot (64 KiB): one ~50 KB
    block, and then nothing for about ten hours. The pull is cut short after that block (a Pin
    covers one block; a Fetch streams one, then ends RESOURCE_EXHAUSTED), the next pull is refused,
    the owner counts and logs it, and the requester answers from what it holds, all of it intact."""
    a, b = cluster(2, transport, each=[{"peers.max_bytes_per_s_per_peer": 1}, {}])
    blocks = chain(6, seed=31)
    keys, datas = [k for k, _, _ in blocks], [d for _, _, d in blocks]
    owner = register(a)
    owner.put_blocks("m", blocks)
    cb = register(b)
    found = cb.lookup("m", keys, consult_peers=True)
    assert (found.matched, found.from_peers) == (1, 1)  # one burst's worth
    found = cb.lookup("m", keys, consult_peers=True)
    assert (found.matched, found.from_peers) == (1, 0)  # refused (or the peer in its backoff): local blocks
    served = _metrics(a)
    assert served["kvtier_peer_refused_rate_total"] == 1  # NIXL: the second Pin; gRPC: the first Fetch's 2nd block
    assert served["kvtier_peer_served_bytes_total"] == len(datas[0])
    assert served["kvtier_peer_refused_inflight_total"] == served["kvtier_peer_refused_pins_total"] == 0
    pulled = _metrics(b)
    assert pulled["kvtier_peer_failures_total"] >= 1  # a refusal is a failed call: a miss, then a backoff
    assert pulled["kvtier_peer_corrupt_blocks_total"] == pulled["kvtier_peer_mac_rejected_total"] == 0
    assert cb.get_blocks("m", keys) == datas[:1] + [None] * 5 and cb.stats().blocks == 1
    assert owner.get_blocks("m", keys) == datas
    assert owner.stats().active_leases == 0  # nothing of the refused calls is held on the owner
    log = a.log()
    assert "refused: it was served its peers.max_bytes_per_s_per_peer" in log and "cn:node1" in log
    assert "less than one 64.0 KiB block per second per peer" in log


def test_a_peer_with_its_calls_in_flight_is_refused_the_next_one_at_once(make_daemon, tmp_path):
    """peers.max_inflight_per_peer = 1: a peer (a real mutual-TLS client with its own certificate)
    opens a Fetch of 64 MB and reads one message, so the owner's stream stays open (HTTP/2 flow
    control holds the rest, a window of a few MiB). Its next call is refused with RESOURCE_EXHAUSTED
    at once, counted and logged, while another peer is served; once it cancels the stream, its calls
    are served again and nothing stays pinned."""
    ca = Authority(tmp_path / "pki")
    port, metrics_port = free_port(), free_port()
    count = 256  # peers.max_blocks_per_fetch: one Fetch of 256 x 250 KB
    owner = make_daemon({**peer_overrides(ca, [port], 0, "grpc"), "peers.max_inflight_per_peer": 1,
                         "cpu.capacity": "96MiB", "cpu.slot_bytes": "256KiB", "disk.enabled": False,
                         "metrics.listen": f"127.0.0.1:{metrics_port}"}, name="owner")
    owner.metrics_port = metrics_port
    blocks = chain(count, seed=32, size=250_000)
    keys = [k for k, _, _ in blocks]
    c = register(owner)
    for start in range(0, count, 16):
        c.put_blocks("m", blocks[start:start + 16])
    greedy, other = _peer_stub(ca, "greedy", port), _peer_stub(ca, "other", port)
    has = pb.PeerHasRequest(namespace="m", keys=keys[:4])
    stream = greedy.Fetch(pb.PeerFetchRequest(namespace="m", keys=keys), timeout=120)
    try:
        first = next(stream)
        assert first.index == 0 and first.block.found
        for call in (lambda: greedy.Has(has, timeout=30),
                     lambda: list(greedy.Fetch(pb.PeerFetchRequest(namespace="m", keys=keys[:1]), timeout=30))):
            with pytest.raises(grpc.RpcError) as err:
                call()
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err.value
            assert "max_inflight_per_peer" in err.value.details()
        assert other.Has(has, timeout=30).matched == 4  # another peer's budget is its own
        metrics = _metrics(owner)
        assert metrics["kvtier_peer_refused_inflight_total"] == 2
        assert metrics["kvtier_peer_served_bytes_total"] < count * 200_000, "the stream was not held open"
    finally:
        stream.cancel()

    def served_again() -> bool:
        try:
            return greedy.Has(has, timeout=30).matched == 4
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, exc
            return False
    wait_for(served_again, what="the cancelled Fetch to end on the owner")
    wait_for(lambda: c.stats().active_leases == 0, what="the cancelled Fetch's pin to be released")
    log = owner.log()
    assert "peer cn:greedy: Has refused: it has 1 calls in flight here" in log
    # At most one line per 10 s (the throttle itself is tested above with a fake clock).
    assert log.count("calls in flight here") <= _metrics(owner)["kvtier_peer_refused_inflight_total"]


def _gone(pid: int) -> bool:
    """Whether process `pid` has exited (a zombie not yet reaped counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] in "ZX"
    except FileNotFoundError:
        return True


def _exporter(window: tuple[int, int]) -> int:
    """The pid of the process whose memory the export window's NIXL metadata addresses: the one
    that maps a kvtier export memfd at the window's address (kvtierd itself before the export agent)."""
    head = f"{window[0]:x}-{window[0] + window[1]:x} "
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/maps") as maps:
                if any(line.startswith(head) and "/memfd:kvtier-" in line and "-export" in line for line in maps):
                    return int(entry)
        except OSError:  # gone, or a kernel thread
            continue
    raise AssertionError(f"no process maps the export window at {window[0]:#x}")


def _readable(pid: int) -> list[tuple[int, int]]:
    """(start, length) of the readable memory of `pid` where data lives: anonymous mappings, heap,
    stack and kvtier's memfds (arena parts, export window). Not files (libraries, a READ past a
    file's end faults the process: over TCP the target's own thread copies, so it would die)."""
    out = []
    with open(f"/proc/{pid}/maps") as maps:
        for line in maps:
            fields = line.split()
            data = len(fields) == 5 or fields[5] in ("[heap]", "[stack]") or fields[5].startswith("/memfd:kvtier-")
            if fields[1].startswith("r") and data:
                start, end = (int(x, 16) for x in fields[0].split("-"))
                out.append((start, end - start))
    return out


class Crafter(Intruder):
    """A peer that rewrote the window's region in the metadata Hello gave it to the whole user
    address space, then loaded it: NIXL's check in its own process no longer stands in its way."""

    CHUNK = 16 << 20

    def __init__(self, metadata: bytes, window: tuple[int, int]):
        self.memory = mmap.mmap(-1, self.CHUNK)
        self.address, self.size = ctypes.addressof(ctypes.c_char.from_buffer(self.memory)), self.CHUNK
        self.transport = NixlTransport(f"crafter-{uuid.uuid4().hex[:8]}", [(self.address, self.CHUNK)])
        self.errors = self.transport._b
        _, _, nixl_md = decode_metadata(metadata)
        region = struct.pack("<QQ", *window)
        assert nixl_md.count(region) == 1, "NIXL's metadata layout changed: revisit this test"
        name = self.transport._agent.loadRemoteMD(nixl_md.replace(region, struct.pack("<QQ", 4096, (1 << 47) - 8192)))
        self.owner = name.decode() if isinstance(name, bytes) else name

    def attempt(self, op: str, remote: int, length: int) -> bool:
        """Whether a READ or WRITE of `length` bytes at the owner's `remote` went through."""
        try:
            return raw_transfer(self.transport, self.owner, op, [(self.address, remote, length)]) \
                == self.errors.NIXL_SUCCESS
        except self.errors.nixlNotFoundError:  # NIXL dropped the peer after a failed transfer
            return False
        except Exception:  # noqa: BLE001 - any NIXL error state: nothing moved
            return False

    def scan(self, ranges: list[tuple[int, int]]) -> bytes:
        """Everything of `ranges` that READs through, concatenated."""
        seen = []
        for start, length in ranges:
            for at in range(start, start + length, self.CHUNK):
                size = min(self.CHUNK, start + length - at)
                if self.attempt("READ", at, size):
                    seen.append(self.bytes_at(0, size))
        return b"".join(seen)


@pytest.mark.parametrize("over", ["cma", "tcp"])
def test_a_peer_crafting_the_window_metadata_reaches_no_memory_of_kvtierd(make_daemon, tmp_path, monkeypatch,
                                                                          over):
    """The attack on the NIXL export, end to end: a peer holding the cluster's peer certificate says
    Hello, rewrites the window's region in the metadata it got (NIXL checks ranges only in the
    initiator's process) and READs and WRITEs whatever it likes of the process behind the window.
    The window's agent runs in the export agent process, so that is all it reaches: READing every
    readable byte of it finds neither a stored block of tenant b nor the cluster key; a READ or
    WRITE at the addresses of kvtierd's arena part of tenant b moves nothing of kvtierd's, and the
    block reads back intact."""
    if over == "tcp":
        monkeypatch.setenv("UCX_TLS", "tcp")  # the daemon and its agent inherit it, as does our agent
    ca = Authority(tmp_path / "pki")
    port = free_port()
    key_path = key_file(tmp_path, "cluster.key")
    owner = make_daemon({**peer_overrides(ca, [port], 0, "nixl"), "cluster.key_file": key_path,
                         "disk.enabled": False, "tenant": [{"name": "b", "uids": [43210], "cpu_capacity": "1MiB"}]},
                        name="owner")
    canary = os.urandom(48 << 10)
    c = owner.client()
    c.register_namespace("b/m", ATTRS)
    key = bytes(range(32))
    assert c.put("b/m", key, canary) == pb.STORED
    parts = [(start, length) for name, start, length in _memfd_mappings(owner.pid) if name.endswith("-b")]
    assert len(parts) == 1, _memfd_mappings(owner.pid)
    part = parts[0]
    cluster_key = open(key_path, "rb").read()

    hello = _peer_stub(ca, "crafter", port).Hello(pb.PeerHelloRequest(node_id="crafter"), timeout=30)
    window = (hello.arena_address, hello.arena_size)
    target = _exporter(window)
    crafter = Crafter(hello.nixl_metadata, window)
    try:
        reachable = _readable(target)
        if target != owner.pid:  # the arena's addresses mean nothing in the agent (else a WRITE could crash it)
            assert not any(s < part[0] + part[1] and part[0] < s + n for s, n in reachable)
        seen = crafter.scan(reachable)
        print(f"the crafted metadata reaches pid {target} (kvtierd: {owner.pid}): {len(seen) >> 20} MiB readable")
        assert len(seen) > window[1]  # the scan works: it reads the window and more of that process
        assert canary[:4096] not in seen and canary[-4096:] not in seen, "a stored block of tenant b was READ"
        assert cluster_key not in seen, "the cluster key was READ"

        read = crafter.attempt("READ", part[0], part[1])
        assert not read or canary[:4096] not in crafter.bytes_at(0, part[1]), "tenant b's arena part was READ"
        if over == "tcp":
            # Over TCP the agent's own thread copies: an address it has not mapped kills it, and a
            # dead export agent stops kvtierd. Nothing was read; a crafting peer can stop the node.
            assert not read
            owner.proc.wait(60)
            assert re.search(r"FATAL, stopping kvtierd: .*the NIXL export agent \(pid \d+\) killed by SIG", owner.log())
            return
        ctypes.memset(crafter.address, 0xEE, part[1])
        crafter.attempt("WRITE", part[0], part[1])
    finally:
        crafter.close()
    assert owner.proc.poll() is None and not _gone(target), owner.log()[-3000:]
    info, data = c.get("b/m", key)
    assert data == canary, "a crafted WRITE changed a stored block of tenant b"


def test_a_dead_export_agent_stops_kvtierd_with_one_fatal_line(make_daemon, tmp_path):
    """The export agent is supervised like kvtierd's own background tasks: killed, the daemon stops
    (FATAL, exit status 70) instead of serving a Hello whose window nobody serves. A clean stop
    (SIGTERM to the daemon and the agent, as systemd sends it) ends the agent after the daemon drained."""
    ca = Authority(tmp_path / "pki")
    port = free_port()
    owner = make_daemon(peer_overrides(ca, [port], 0, "nixl"), name="owner")
    found = re.search(r"in export agent pid (\d+)", owner.log())
    assert found, owner.log()
    agent = int(found.group(1))
    assert not _gone(agent)
    os.kill(agent, signal.SIGKILL)
    assert owner.proc.wait(60) == 70
    fatal = [line for line in owner.log().splitlines() if "FATAL" in line]
    assert len(fatal) == 1 and f"the NIXL export agent (pid {agent}) killed by SIGKILL" in fatal[0], fatal

    again = make_daemon(peer_overrides(ca, [port], 0, "nixl"), name="again")
    agent = int(re.search(r"in export agent pid (\d+)", again.log()).group(1))
    os.kill(agent, signal.SIGTERM)  # as systemd signals the whole cgroup: the agent waits for kvtierd
    assert again.stop() == 0
    assert _gone(agent) and "FATAL" not in again.log()


class ReplayingPeer(pb_grpc.KvTierPeerServicer):
    """A peer (a gRPC server in this process with a certificate of the cluster's CA) that says it
    holds every key asked for and streams, for each, a block the cluster key really vouches for,
    but not the one asked for: the MAC of another key (a captured block replayed), of another
    namespace, or of a longer block (the bytes cut short). Checksums are right for the bytes sent."""

    def __init__(self, cluster_key: bytes, lie: str):
        self.key, self.lie = cluster_key, lie

    def Hello(self, request, context):
        return pb.PeerHelloResponse(node_id="liar", generation=1, slot_bytes=64 << 10)

    def Has(self, request, context):
        return pb.PeerHasResponse(matched=len(request.keys), attributes=ATTRS)

    def Fetch(self, request, context):
        from kvtier.daemon import mac as macs
        for index, key in enumerate(request.keys):
            data = bytes([index + 1]) * 30_000
            signed_key, namespace, signed = key, request.namespace, data
            if self.lie == "another key":
                signed_key = bytes(reversed(key))
            elif self.lie == "another namespace":
                namespace = request.namespace + "-other"
            else:  # "another length": the owner signed a longer block; the tail is not sent
                signed = data + b"\0" * 100
            block = pb.PeerBlock(found=True, length=len(data), checksum=block_checksum(data),
                                 mac=macs.block_mac(self.key, namespace, signed_key, signed))
            yield pb.PeerFetchChunk(index=index, block=block, data=data)


@pytest.mark.parametrize("lie", ["another key", "another namespace", "another length"])
def test_a_block_is_committed_only_under_the_key_namespace_and_length_its_mac_vouches_for(make_daemon, tmp_path,
                                                                                         lie):
    """A requester checks what arrives against what it asked for: the MAC it verifies binds the
    namespace, the key it asked for and the length, so a genuine signed block offered for another
    key, namespace or length is dropped, counted and the peer skipped (NIXL pulls run the same
    verification on the bytes in their slots)."""
    import concurrent.futures
    ca = Authority(tmp_path / "pki")
    key_path = key_file(tmp_path, "cluster.key")
    ports = [free_port(), free_port()]
    cert, key = ca.issue("liar")
    server = grpc.server(concurrent.futures.ThreadPoolExecutor(4))
    pb_grpc.add_KvTierPeerServicer_to_server(ReplayingPeer(open(key_path, "rb").read(), lie), server)
    with open(ca.ca_path, "rb") as root, open(key, "rb") as k, open(cert, "rb") as c:
        server.add_secure_port(f"127.0.0.1:{ports[1]}", grpc.ssl_server_credentials(
            [(k.read(), c.read())], root_certificates=root.read(), require_client_auth=True))
    server.start()
    try:
        node = make_daemon({**peer_overrides(ca, ports, 0, "grpc"), "cluster.key_file": key_path,
                            "metrics.listen": f"127.0.0.1:{(metrics_port := free_port())}"}, name="node")
        node.metrics_port = metrics_port
        keys = [k for k, _, _ in chain(3, seed=12)]
        c = register(node)
        found = c.lookup("m", keys, consult_peers=True)
        assert (found.matched, found.from_peers) == (0, 0)
        assert c.get_blocks("m", keys[:1]) == [None] and c.stats().blocks == 0
        metrics = _metrics(node)
        assert metrics["kvtier_peer_mac_rejected_total"] == 1 and metrics["kvtier_peer_fetches_total"] == 1
        assert "has a missing or wrong MAC" in node.log()
    finally:
        server.stop(None)
