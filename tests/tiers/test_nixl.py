"""NixlTransport against real NIXL agents in other processes (tests/tiers/_nixl_peer.py).

Same-node READs go over UCX's cma (process_vm_readv). The tests of hung and dying peers force
UCX_TLS=tcp on both sides, the path between nodes: there a stopped peer really leaves a READ in flight
(cma would just read the stopped process's memory). Every read runs under a thread-join guard, so a
hang fails the test instead of stalling the suite.
"""

from __future__ import annotations

import base64
import ctypes
import json
import mmap
import os
import select
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
import uuid

import numpy as np
import pytest

from _nixl_peer import pattern
from nixl_raw import raw_transfer
from kvtier.tiers.arena import SharedArena
from kvtier.tiers.nixl import (MAX_BYTES_PER_READ, MAX_PAIRS_PER_READ, MAX_TIMEOUT_S, ExportWindow, NixlTransport,
                               TransferAbandoned, TransferFailed, UnknownPeer, decode_metadata, load_nixl)

PEER_SCRIPT = os.path.join(os.path.dirname(__file__), "_nixl_peer.py")
MiB = 1 << 20
SLACK_S = 1.5     # scheduling slack on a loaded 2-core machine
SENTINEL = 0xA5


class Peer:
    """A _nixl_peer.py process: its NixlTransport metadata, arena address and pattern seed."""

    def __init__(self, shm_dir: str, name: str, size: int, seed: int, env: dict | None = None,
                 window: tuple[int, int] | None = None):
        """window = (offset, length): register only that part of the peer's memory with NIXL."""
        self.name, self.size, self.seed = name, size, seed
        read_fd, write_fd = os.pipe()
        self.log = open(os.path.join(shm_dir, f"{name}-{uuid.uuid4().hex[:6]}.log"), "w+")
        self.proc = subprocess.Popen(
            [sys.executable, PEER_SCRIPT, name, shm_dir, str(size), str(seed), str(write_fd),
             *(str(n) for n in window or ())],
            stdin=subprocess.PIPE, stdout=self.log, stderr=subprocess.STDOUT, pass_fds=(write_fd,),
            env={**os.environ, **(env or {})})
        os.close(write_fd)
        try:
            ready, _, _ = select.select([read_fd], [], [], 60)
            line = os.read(read_fd, 1 << 20).decode() if ready else ""
        finally:
            os.close(read_fd)
        if not line:
            self.kill()
            self.log.seek(0)
            pytest.fail(f"peer {name} did not start:\n{self.log.read()[-4000:]}")
        info = json.loads(line)
        self.metadata = base64.b64decode(info["metadata"])
        self.address = info["address"]
        self.window = tuple(info["window"])  # (address, length) registered with NIXL

    def expected(self, offset: int, length: int) -> bytes:
        return pattern(self.seed, offset, length)

    def signal(self, sig: int) -> None:
        os.kill(self.proc.pid, sig)
        if sig == signal.SIGSTOP:  # delivery is asynchronous: wait until every thread stopped
            deadline = time.monotonic() + 10
            while not self._all_stopped():
                assert time.monotonic() < deadline, "peer did not stop"
                time.sleep(0.001)

    def _all_stopped(self) -> bool:
        task_dir = f"/proc/{self.proc.pid}/task"
        for tid in os.listdir(task_dir):
            with open(f"{task_dir}/{tid}/stat") as stat:
                if stat.read().rsplit(")", 1)[1].split()[0] not in "Tt":
                    return False
        return True

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)  # a stopped process cannot exit on stdin EOF
            self.proc.stdin.close()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()
        self.log.close()


class Local:
    """This process's side: an arena and a NixlTransport registered over it."""

    def __init__(self, shm_dir: str, size: int, name: str | None = None):
        self.arena = SharedArena(f"local-{uuid.uuid4().hex[:8]}", [("", size)], 2 * MiB)
        self.address, self.size = self.arena.address, self.arena.size_bytes
        self.transport = NixlTransport(name or f"local-{uuid.uuid4().hex[:8]}", [(self.address, self.size)])
        self.clear()

    def clear(self) -> None:
        ctypes.memset(self.address, SENTINEL, self.size)

    def bytes_at(self, offset: int, length: int) -> bytes:
        return ctypes.string_at(self.address + offset, length)

    def close(self) -> None:
        self.transport.close()
        self.arena.close()


def guarded(seconds: float, fn, *args) -> dict:
    """Runs fn in a thread; fails the test if it has not returned after `seconds`."""
    box: dict = {}

    def run():
        start = time.monotonic()
        try:
            box["value"] = fn(*args)
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            box["error"] = exc
        box["elapsed"] = time.monotonic() - start

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        pytest.fail(f"{getattr(fn, '__name__', fn)} still blocked after {seconds} s")
    return box


def read_blocks(local: Local, peer: Peer, name: str, blocks: list[tuple[int, int, int]], timeout_s: float = 10):
    """blocks = (local_offset, remote_offset, length); reads them and checks every byte."""
    pairs = [(local.address + lo, peer.address + ro, n) for lo, ro, n in blocks]
    box = guarded(timeout_s + 30, local.transport.read, name, pairs, timeout_s)
    assert "error" not in box, box.get("error")
    for lo, ro, n in blocks:
        assert local.bytes_at(lo, n) == peer.expected(ro, n), f"range {lo}<-{ro} ({n} bytes) differs"


@pytest.fixture(scope="module")
def shm_dir():
    path = tempfile.mkdtemp(prefix="kvtier-nixl-test-", dir="/dev/shm")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def served(shm_dir):
    """One healthy peer (64 MiB) and a local transport that added it, shared by the read tests."""
    peer = Peer(shm_dir, "served", 64 * MiB, seed=11)
    local = Local(shm_dir, 128 * MiB)
    name = local.transport.add_peer(peer.metadata)
    yield local, peer, name
    local.close()
    peer.stop()


@pytest.fixture
def tcp(monkeypatch):
    """UCX over TCP for this process's next agents and for peers started with env=tcp."""
    monkeypatch.setenv("UCX_TLS", "tcp")
    return {"UCX_TLS": "tcp"}


def test_load_nixl_returns_the_module():
    module, reason = load_nixl()
    assert module is not None, reason
    assert reason == "" and module.__name__.startswith("nixl") and hasattr(module, "_bindings")


def test_arena_address_is_the_mapping_and_does_not_pin_it(shm_dir, caplog):
    arena = SharedArena("address", [("", 4 * MiB)], 2 * MiB)
    assert arena.address == arena.address and arena.address % mmap.PAGESIZE == 0
    ctypes.memset(arena.address + 2 * MiB + 5, 0x5A, 3)
    assert bytes(arena.view(1)[4:9]) == b"\0\x5a\x5a\x5a\0"
    arena.close()
    assert arena.address == 0 and not arena.parts  # unmapped, and its memfds closed


def test_noncontiguous_ranges_land_byte_identical(served):
    local, peer, name = served
    local.clear()
    rng = np.random.default_rng(3)
    # 24 disjoint remote ranges of odd sizes and offsets, including both ends of the peer's region,
    # read into shuffled, gapped local places.
    cuts = np.sort(rng.choice(peer.size // 64, size=48, replace=False) * 64 + rng.integers(0, 64, 48))
    remote = [(0, 4096 + 3)] + [(int(a), int(min(b - a, 3 * MiB))) for a, b in zip(cuts[1:-1:2], cuts[2::2])]
    remote.append((peer.size - 12345, 12345))
    order = rng.permutation(len(remote))
    blocks, at = [], 1
    for i in order:
        offset, length = remote[i]
        blocks.append((at, offset, length))
        at += length + int(rng.integers(1, 4096))
    read_blocks(local, peer, name, blocks)
    # bytes between the destinations were not touched
    ends = sorted((lo, lo + n) for lo, _, n in blocks)
    gaps = [(0, ends[0][0])] + [(a[1], b[0]) for a, b in zip(ends, ends[1:])]
    for start, stop in gaps:
        assert local.bytes_at(start, stop - start) == bytes([SENTINEL]) * (stop - start)


def test_bounds_violations_raise_value_error_before_any_transfer(served):
    local, peer, name = served
    local.clear()
    L, R = local.address, peer.address
    cases = {
        "no pairs": [],
        "too many pairs": [(L, R, 8)] * (MAX_PAIRS_PER_READ + 1),
        "too many bytes": [(L, R, 60 * MiB)] * (MAX_BYTES_PER_READ // (60 * MiB) + 1),
        "zero length": [(L, R, 4096), (L + 4096, R, 0)],
        "negative length": [(L, R, -1)],
        "local past the end": [(L, R, 8), (L + local.size - 8, R, 9)],
        "local before the start": [(L - 1, R, 8)],
        "remote past the end": [(L, R, 8), (L + 8, R + peer.size - 4, 8)],
        "remote before the start": [(L, R - 4096, 4096)],
        "remote address 0": [(L, 0, 8)],
        "not a triple": [(L, R)],
        "not ints": [(float(L), R, 8)],
        "numpy ints": [(L, R, np.int64(8))],
    }
    for what, pairs in cases.items():
        box = guarded(30, local.transport.read, name, pairs, 5.0)
        assert isinstance(box.get("error"), ValueError), (what, box)
    for timeout_s in (0, -1, float("nan"), float("inf"), MAX_TIMEOUT_S + 1):
        with pytest.raises(ValueError):
            local.transport.read(name, [(L, R, 8)], timeout_s)
    assert local.bytes_at(0, 64 * MiB) == bytes([SENTINEL]) * (64 * MiB), "a rejected read moved bytes"
    read_blocks(local, peer, name, [(0, 0, 4096)])  # and the transport still works


def test_unknown_agent_raises(served):
    local, peer, _ = served
    with pytest.raises(UnknownPeer):
        local.transport.read("nobody", [(local.address, peer.address, 8)], 1.0)
    local.transport.remove_peer("nobody")  # no-op


def test_concurrent_reads_from_threads(served):
    local, peer, name = served
    local.clear()
    errors: list[BaseException] = []
    block = 256 << 10

    def worker(k: int) -> None:
        rng = np.random.default_rng(100 + k)
        try:
            for _ in range(20):
                remote = rng.choice(peer.size // block, size=8, replace=False) * block
                read_blocks(local, peer, name, [(k * 8 * block + j * block, int(r), block)
                                                for j, r in enumerate(remote)])
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not any(t.is_alive() for t in threads), "a concurrent read hung"
    assert not errors, errors


def test_add_peer_is_idempotent_and_replaces_a_restarted_peer(shm_dir):
    local = Local(shm_dir, 8 * MiB)
    first = Peer(shm_dir, "restarting", 8 * MiB, seed=1)
    second = None
    try:
        flipped = bytearray(first.metadata)
        flipped[len(flipped) // 2] ^= 1
        for bad in (b"", b"junk" * 10, first.metadata[:20], first.metadata[:-1], bytes(flipped)):
            with pytest.raises(ValueError):
                local.transport.add_peer(bad)
        name = local.transport.add_peer(first.metadata)
        assert name == "restarting" and local.transport.add_peer(first.metadata) == name
        read_blocks(local, first, name, [(0, 4096, 64 << 10)])
        first.kill()
        second = Peer(shm_dir, "restarting", 8 * MiB, seed=2)  # same name, new process and memory
        assert local.transport.add_peer(second.metadata) == name
        read_blocks(local, second, name, [(0, 4096, 64 << 10)])
        local.transport.remove_peer(name)
        local.transport.remove_peer(name)
        with pytest.raises(UnknownPeer):
            local.transport.read(name, [(local.address, second.address, 8)], 1.0)
        assert local.transport.add_peer(second.metadata) == name
        read_blocks(local, second, name, [(0, 0, MiB)])
    finally:
        local.close()
        first.stop()
        if second is not None:
            second.stop()


def test_read_from_killed_peer_fails_within_timeout(shm_dir):
    local = Local(shm_dir, 8 * MiB)
    peer = Peer(shm_dir, "killed-before", 8 * MiB, seed=5)
    try:
        name = local.transport.add_peer(peer.metadata)
        read_blocks(local, peer, name, [(0, 0, MiB)])
        peer.kill()
        box = guarded(30, local.transport.read, name, [(local.address, peer.address, MiB)], 2.0)
        error = box.get("error")
        assert isinstance(error, TransferFailed) and error.destination_reusable, box
        assert box["elapsed"] < 2.0 + SLACK_S
        with pytest.raises(TransferFailed):  # dropped after the disconnect: UnknownPeer
            local.transport.read(name, [(local.address, peer.address, 8)], 1.0)
        replacement = Peer(shm_dir, "killed-before", 8 * MiB, seed=6)
        try:
            assert local.transport.add_peer(replacement.metadata) == name
            read_blocks(local, replacement, name, [(0, 0, MiB)])
        finally:
            replacement.stop()
    finally:
        local.close()
        peer.stop()


def _kill_during_big_read(shm_dir: str, env: dict | None, label: str, fraction: float = 1 / 3) -> None:
    """A 256 MiB READ with the peer SIGKILLed after `fraction` of a clean read's duration: it fails in
    time (or, if it won the race, its bytes are all correct); it never hangs or half-succeeds."""
    size = MAX_BYTES_PER_READ
    local = Local(shm_dir, size)
    peer = Peer(shm_dir, label, size, seed=9, env=env)
    try:
        name = local.transport.add_peer(peer.metadata)
        pairs = [(local.address + i * 2 * MiB, peer.address + i * 2 * MiB, 2 * MiB) for i in range(size // (2 * MiB))]
        clean = guarded(60, local.transport.read, name, pairs, 30.0)
        assert "error" not in clean, clean
        local.clear()
        killer = threading.Timer(clean["elapsed"] * fraction, peer.signal, (signal.SIGKILL,))
        timeout_s = 3.0
        killer.start()
        box = guarded(60, local.transport.read, name, pairs, timeout_s)
        killer.join()
        assert box["elapsed"] < max(timeout_s, clean["elapsed"]) + SLACK_S, box
        error = box.get("error")
        if error is None:
            assert local.bytes_at(0, size) == peer.expected(0, size)
        else:
            assert isinstance(error, TransferFailed) and not isinstance(error, TransferAbandoned), box
        return error
    finally:
        local.close()
        peer.stop()


def test_peer_killed_mid_read_same_node(shm_dir):
    _kill_during_big_read(shm_dir, None, "killed-cma")


def test_peer_killed_mid_read_over_tcp(shm_dir, tcp):
    # A READ over TCP that loses its peer must fail. Killed after a third of a clean read, the second
    # read may still win the race when the first was slow (a loaded machine); each round kills
    # earlier, and the last kills at once, when the READ cannot have finished (a read that won is
    # checked byte for byte inside).
    for round_, fraction in enumerate((1 / 3, 1 / 30, 0.0)):
        error = _kill_during_big_read(shm_dir, tcp, f"killed-tcp-{round_}", fraction)
        if error is not None:
            break
    assert isinstance(error, TransferFailed)


def _abandoned_read(shm_dir: str, tcp: dict, label: str):
    """A READ from a SIGSTOPped peer over TCP: abandoned at its deadline, not settled yet."""
    local = Local(shm_dir, 8 * MiB)
    peer = Peer(shm_dir, label, 8 * MiB, seed=7, env=tcp)
    name = local.transport.add_peer(peer.metadata)
    read_blocks(local, peer, name, [(0, 0, MiB)])
    local.clear()
    peer.signal(signal.SIGSTOP)
    box = guarded(30, local.transport.read, name, [(local.address, peer.address, 4 * MiB)], 1.0)
    error = box.get("error")
    assert isinstance(error, TransferAbandoned), box
    assert 1.0 <= box["elapsed"] < 1.0 + SLACK_S
    assert not error.destination_reusable and not error.settled.is_set()
    return local, peer, name, error


def test_abandoned_read_settles_when_the_hung_peer_resumes(shm_dir, tcp):
    local, peer, name, error = _abandoned_read(shm_dir, tcp, "hung-resumes")
    try:
        local.transport.remove_peer(name)  # deferred while the READ is in flight ...
        with pytest.raises(UnknownPeer):   # ... but the peer is gone for new reads at once
            local.transport.read(name, [(local.address, peer.address, 8)], 1.0)
        time.sleep(0.3)
        assert not error.settled.is_set()
        peer.signal(signal.SIGCONT)
        assert error.settled.wait(10), "the abandoned READ never settled"
        # The late bytes did land: exactly why the destination was quarantined.
        assert local.bytes_at(0, 4 * MiB) == peer.expected(0, 4 * MiB)
        assert local.transport.add_peer(peer.metadata) == name
        read_blocks(local, peer, name, [(0, MiB, MiB)])
    finally:
        local.close()
        peer.stop()


def test_abandoned_read_settles_when_the_hung_peer_dies(shm_dir, tcp):
    local, peer, name, error = _abandoned_read(shm_dir, tcp, "hung-dies")
    try:
        peer.kill()
        assert error.settled.wait(10), "an abandoned READ from a dead peer never settled"
        assert error.destination_reusable
    finally:
        local.close()
        peer.stop()


def test_close_settles_abandoned_reads_and_nothing_lands_afterwards(shm_dir, tcp):
    local, peer, name, error = _abandoned_read(shm_dir, tcp, "hung-close")
    try:
        box = guarded(30, local.transport.close)
        assert "error" not in box, box
        assert error.settled.is_set()
        peer.signal(signal.SIGCONT)
        time.sleep(1.0)
        assert local.bytes_at(0, 4 * MiB) == bytes([SENTINEL]) * (4 * MiB), "bytes landed after close()"
        with pytest.raises(TransferFailed):
            local.transport.add_peer(peer.metadata)
        with pytest.raises(TransferFailed):
            local.transport.read(name, [(local.address, peer.address, 8)], 1.0)
    finally:
        local.close()
        peer.stop()


def _over(monkeypatch, over: str) -> dict | None:
    """UCX over `over` ("cma": UCX's choice on one host, "tcp": forced, the path between hosts) for
    this process's next agents; the env for a Peer started the same way."""
    if over == "tcp":
        monkeypatch.setenv("UCX_TLS", "tcp")
        return {"UCX_TLS": "tcp"}
    return None


@pytest.mark.parametrize("over", ["cma", "tcp"])
def test_whoever_holds_an_agents_metadata_can_also_write_its_registered_memory(shm_dir, monkeypatch, over):
    """NIXL registers memory for remote READ and WRITE alike (it has no read-only registration): a
    process that loaded a peer's metadata can overwrite what that peer registered, on one host (cma)
    as between hosts (tcp). That is why a kvtierd never sends its reader agent's metadata, registers
    only its export window with the agent whose metadata Hello hands out, and why docs/peers.md says
    a peer can WRITE that window. If this test ever fails, NIXL gained a read-only mode: revisit
    that text."""
    env = _over(monkeypatch, over)
    peer = Peer(shm_dir, f"victim-{over}", 4 * MiB, seed=21, env=env)
    local = Local(shm_dir, 4 * MiB)
    try:
        transport, b = local.transport, local.transport._b
        name = transport.add_peer(peer.metadata)
        ctypes.memset(local.address, 0xEE, 4096)
        assert raw_transfer(transport, name, "WRITE", [(local.address, peer.address + MiB, 4096)]) == b.NIXL_SUCCESS
        local.clear()
        box = guarded(40, transport.read, name, [(local.address + MiB, peer.address + MiB, 4096)], 10)
        assert "error" not in box, box.get("error")
        assert local.bytes_at(MiB, 4096) == b"\xee" * 4096 != peer.expected(MiB, 4096)  # overwritten
    finally:
        local.close()
        peer.stop()


@pytest.mark.parametrize("over", ["cma", "tcp"])
def test_nixl_refuses_remote_ranges_outside_the_registered_window(shm_dir, monkeypatch, over):
    """What a kvtierd's export window rests on: the peer registered only a window of its memory, and
    NIXL refuses (NIXL_ERR_NOT_FOUND when the request is created: nothing moves) to READ or WRITE
    the peer's memory before it, after it, or across its end. NixlTransport's own bounds check
    refuses first (ValueError); the refusal below is NIXL's, with that check bypassed. The window
    itself reads and writes."""
    env = _over(monkeypatch, over)
    peer = Peer(shm_dir, f"windowed-{over}", 8 * MiB, seed=31, env=env, window=(2 * MiB, 2 * MiB))
    local = Local(shm_dir, 8 * MiB)
    try:
        transport, b = local.transport, local.transport._b
        name = transport.add_peer(peer.metadata)
        start, length = peer.window
        assert (start, length) == (peer.address + 2 * MiB, 2 * MiB)
        outside = {"the peer's first byte": peer.address, "just before the window": start - 4096,
                   "just past it": start + length, "across its end": start + length - 2048}
        for where, remote in outside.items():
            with pytest.raises(ValueError):
                transport.read(name, [(local.address, remote, 4096)], 5.0)
            for op in ("READ", "WRITE"):
                with pytest.raises(b.nixlNotFoundError):
                    raw_transfer(transport, name, op, [(local.address, remote, 4096)])
        assert local.bytes_at(0, 8 * MiB) == bytes([SENTINEL]) * (8 * MiB), "a refused transfer moved bytes"
        read_blocks(local, peer, name, [(0, 2 * MiB, 2 * MiB)])  # the whole window, byte-exact
        ctypes.memset(local.address, 0xEE, 4096)
        assert raw_transfer(transport, name, "WRITE", [(local.address, start + MiB, 4096)]) == b.NIXL_SUCCESS
        local.clear()
        assert raw_transfer(transport, name, "READ", [(local.address, start + MiB, 4096)]) == b.NIXL_SUCCESS
        assert local.bytes_at(0, 4096) == b"\xee" * 4096  # a WRITE inside the window lands
    finally:
        local.close()
        peer.stop()


@pytest.mark.parametrize("over", ["cma", "tcp"])
def test_a_forged_region_in_the_metadata_reaches_memory_outside_the_window(shm_dir, monkeypatch, over):
    """The limit of the window, measured: NIXL checks remote ranges in the *initiator's* process,
    against the metadata it loaded. A peer that rewrites the window's region in that metadata (16
    bytes: its address and length) before loading it READs and WRITEs the owner's memory outside
    the window, because UCX's cma and TCP transports carry no memory key that the owner's side
    checks. (Over RDMA the NIC checks the window's rkey; no RDMA device here.) docs/peers.md and
    docs/security.md say so; if this test ever fails, UCX began refusing such ranges on these
    transports: revisit that text."""
    env = _over(monkeypatch, over)
    peer = Peer(shm_dir, f"forged-{over}", 8 * MiB, seed=41, env=env, window=(2 * MiB, 2 * MiB))
    local = Local(shm_dir, 8 * MiB)
    try:
        transport, b = local.transport, local.transport._b
        _, _, nixl_md = decode_metadata(peer.metadata)
        region = struct.pack("<QQ", *peer.window)
        assert nixl_md.count(region) == 1, "NIXL's metadata layout changed: revisit this test"
        forged = nixl_md.replace(region, struct.pack("<QQ", peer.address, peer.size))
        name = transport._agent.loadRemoteMD(forged)
        name = name.decode() if isinstance(name, bytes) else name
        assert raw_transfer(transport, name, "READ", [(local.address, peer.address, 4096)]) == b.NIXL_SUCCESS
        assert local.bytes_at(0, 4096) == peer.expected(0, 4096)  # read outside the window
        ctypes.memset(local.address + MiB, 0xEE, 4096)
        assert raw_transfer(transport, name, "WRITE", [(local.address + MiB, peer.address, 4096)]) == b.NIXL_SUCCESS
        local.clear()
        assert raw_transfer(transport, name, "READ", [(local.address, peer.address, 4096)]) == b.NIXL_SUCCESS
        assert local.bytes_at(0, 4096) == b"\xee" * 4096  # and written there
    finally:
        local.close()
        peer.stop()


def test_export_window_memory_and_slot_bookkeeping():
    window = ExportWindow(f"test-{uuid.uuid4().hex[:6]}", 4, 64 << 10)
    try:
        assert window.size_bytes == 4 * (64 << 10) and window.address % mmap.PAGESIZE == 0
        with open("/proc/self/maps") as maps:  # a sealed memfd of its own, mapped shared
            assert any(line.startswith(f"{window.address:x}-") and "memfd:kvtier-test-" in line and "-export" in line
                       for line in maps)
        assert window.take(3) == [0, 1, 2] and (window.in_use, window.available) == (3, 1)
        assert window.take(5) == [3]  # no more than are free
        window.free([1, 2])
        assert sorted(window.take(2)) == [1, 2]
        with pytest.raises(AssertionError):
            window.free([1, 1])  # the second is no longer in use
        window.check(full=True)  # the first free went through: 1 is free, 0, 2, 3 in use
        assert window.in_use == 3
        source = (ctypes.c_char * 100).from_buffer_copy(bytes(range(100)))
        with window.copying():
            window.copy(3, ctypes.addressof(source), 100)
        assert window.bytes_at(3, 100) == bytes(range(100))
        for slot, length in ((4, 1), (-1, 1), (0, 0), (0, (64 << 10) + 1)):
            with pytest.raises(ValueError):
                window.copy(slot, ctypes.addressof(source), length)
    finally:
        window.close()
    assert window.address == 0
    window.close()  # idempotent
    with pytest.raises(TransferFailed):
        window.copying().__enter__()


def test_the_export_agent_maps_only_the_window_and_inherits_nothing_else(monkeypatch):
    """The export agent (tiers/nixl_export.py) is a fresh process: of kvtierd's descriptors it holds
    only its control socket and the window's memfd (Python's mmap keeps a duplicate), of its environment only
    what Python, NIXL and UCX read, no new privileges; its metadata names the window at its own
    address, where the window's bytes are the ones this process writes."""
    from kvtier.tiers.nixl_export import ExportAgent
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-for-the-agent")
    secret_fd = os.open("/etc/hostname", os.O_RDONLY)  # inheritable: close_fds must not pass it
    os.set_inheritable(secret_fd, True)
    window = ExportWindow(f"agent-{uuid.uuid4().hex[:6]}", 4, 64 << 10, share=True)
    agent = ExportAgent(f"agent-{uuid.uuid4().hex[:6]}", window)
    window.close_fd()
    local = None
    try:
        pid = agent.pid
        assert decode_metadata(agent.metadata)[1] == ((agent.address, window.size_bytes),)
        with open(f"/proc/{pid}/maps") as maps:
            mine = [line for line in maps if "/memfd:kvtier-" in line]
        assert len(mine) == 1 and mine[0].startswith(f"{agent.address:x}-"), mine
        with open(f"/proc/{pid}/environ", "rb") as environ:
            assert b"AWS_SECRET_ACCESS_KEY" not in environ.read()
        with open(f"/proc/{pid}/status") as status:
            text = status.read()
        assert "NoNewPrivs:\t1" in text and "Seccomp:\t2" in text  # its filter: no new Unix sockets
        assert "Landlock ABI" in agent.sandbox, agent.sandbox  # this kernel has it: no filesystem access
        targets = [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
        assert not any("hostname" in t for t in targets), targets
        assert all(t.endswith("-export (deleted)") for t in targets if "memfd:" in t), targets  # the window's only
        # A peer READs what kvtierd copied into its mapping of the window, from the agent.
        with window.copying():
            source = (ctypes.c_char * 4096).from_buffer_copy(b"\x5a" * 4096)
            window.copy(2, ctypes.addressof(source), 4096)
        local = Local("/dev/shm", 4 * MiB)
        name = local.transport.add_peer(agent.metadata)
        box = guarded(40, local.transport.read, name, [(local.address, agent.address + 2 * (64 << 10), 4096)], 10)
        assert "error" not in box, box.get("error")
        assert local.bytes_at(0, 4096) == b"\x5a" * 4096
    finally:
        os.close(secret_fd)
        if local is not None:
            local.close()
        assert agent.stop() == 0  # closing the control socket ends it cleanly
        window.close()


def test_an_export_agent_that_does_not_answer_in_time_fails_its_start_and_is_stopped():
    from kvtier.tiers.nixl_export import ExportAgent, ExportAgentError
    window = ExportWindow(f"late-{uuid.uuid4().hex[:6]}", 1, 64 << 10, share=True)
    try:
        started = time.monotonic()
        with pytest.raises(ExportAgentError, match=r"export agent \(pid \d+\) sent no metadata within 0.001 s"):
            ExportAgent("late", window, start_timeout_s=0.001)
        assert time.monotonic() - started < 30  # stopped (killed at worst) before the error is raised
    finally:
        window.close()


def test_the_export_agents_sandbox_denies_files_unix_sockets_and_signals_outside():
    """What code a crafting peer might run in the export agent (by WRITing its memory) is confined:
    the agent's sandbox, applied in a fresh process exactly as the agent applies it, leaves no
    file to open (kvtierd's key files, its data dir), no Unix socket to create (kvtierd's session
    socket would take the agent's uid for kvtierd's own: an administrator) and no signal to send
    to a process outside it."""
    script = (
        "import json, os, socket\n"
        "from kvtier.tiers import nixl_export as x\n"
        "x._prctl(x.PR_SET_NO_NEW_PRIVS, 1)\n"
        "applied = [x._landlock(), x._no_unix_sockets()]\n"
        "out = {'applied': applied}\n"
        "def attempt(what, fn):\n"
        "    try:\n"
        "        fn(); out[what] = 'allowed'\n"
        "    except OSError as exc:\n"
        "        out[what] = exc.errno\n"
        "attempt('open', lambda: open('/etc/hostname').read())\n"
        "attempt('unix', lambda: socket.socket(socket.AF_UNIX, socket.SOCK_STREAM))\n"
        "attempt('signal', lambda: os.kill(os.getppid(), 0))\n"
        "attempt('tcp', lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM).close())\n"
        "print(json.dumps(out))\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["open"] in (13, 1) and out["unix"] == 13 and out["signal"] == 1, out  # EACCES, EACCES, EPERM
    assert out["tcp"] == "allowed", out  # what UCX serves peers with
