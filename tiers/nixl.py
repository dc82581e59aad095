"""Peer transfer: READ KV blocks straight out of another kvtierd's registered memory with NIXL.

UCX moves the bytes (cma/process_vm_readv on one node, TCP or RDMA across nodes); this module only
validates, posts and waits. It does not checksum: the daemon verifies every fetched block. nixl is an
optional dependency (requirements/peers.txt); load_nixl() says why it cannot be used so the daemon can
fall back to its gRPC fetch and report the reason.

What registered memory exposes: whoever loads an agent's metadata can READ *and* WRITE every region
that agent registered (NIXL has no read-only registration). A daemon therefore runs two agents: one
registered over its own arena, which it READs into and whose metadata never leaves the process, and
one registered over an ExportWindow only, whose metadata it hands to peers. The owner copies blocks
it serves into window slots; nothing else of its memory is registered with that agent, and that
agent runs in a process of its own (tiers/nixl_export.py) which maps the window and nothing else of
the daemon.

How far registration confines a peer (measured, tests/tiers/test_nixl.py): NIXL as shipped refuses
(NIXL_ERR_NOT_FOUND, at createXferReq) any remote range outside the regions in the metadata it
loaded. That check runs in the *initiator's* process: a peer that edits the 16 bytes of a region's
address and length in the metadata before loading it READs and WRITEs any address of the process
that created the agent over UCX's cma and TCP transports, which carry no memory keys. Only RDMA (a
NIC checking the rkey of the registered region) enforces registration at the target; it is not
tested here. Hence the export agent's own process: what a crafting peer reaches is that process.

Safety contract of a failed read() (see TransferFailed and TransferAbandoned):
  - read() returned          -> every byte landed.
  - TransferFailed (any subclass but TransferAbandoned): NIXL reported the transfer finished, failed
    or never posted; nothing more will be written to the destination. Reuse it (contents undefined).
  - TransferAbandoned: the deadline passed while the READ was still in flight. NIXL/UCX cannot cancel
    an in-flight READ (measured: release_xfer_handle and remove_remote_agent both return while late
    bytes still land), so the destination must not be reused until `exc.settled` is set. The
    transport keeps polling the abandoned transfer and sets it once NIXL reports it finished or
    failed, or once close() has destroyed the agent (after which nothing can land).
"""

from __future__ import annotations

import bisect
import ctypes
import dataclasses
import functools
import gc
import importlib
import logging
import math
import mmap
import os
import struct
import threading
import time
import weakref
import zlib
from typing import Protocol

log = logging.getLogger("kvtier.nixl")

MAX_PAIRS_PER_READ = 1024
MAX_BYTES_PER_READ = 256 << 20   # a same-node (cma) READ copies inside the post call: this bounds it
MAX_TIMEOUT_S = 300.0
MAX_PEERS = 256
MAX_REGIONS = 64
MAX_METADATA_BYTES = 1 << 20
MAX_ABANDONED = 64               # unsettled abandoned READs; more and read() refuses new ones

# "peer" (UCX's default): a dead peer fails in-flight READs (TCP/RDMA) instead of leaving them hanging
# forever, which would quarantine their destination until close(); with "none" a SIGKILLed peer over
# TCP left the READ in flight (tests/tiers/test_nixl.py fails). READ throughput is the same in both
# modes (bench/bench_peer.py): "none" only moves notifications to shared memory, and READs send none.
DEFAULT_BACKEND_PARAMS = {"ucx_error_handling_mode": "peer"}
# NIXL's Python agent hard-codes a 0 us progress-thread poll delay: that thread then spins a whole
# core forever. 1 ms makes it sleep in poll() on UCX's event fd (~2% of a core idle); READs complete
# in the caller's thread (cma) or wake the poll (TCP), so throughput is unchanged.
PROGRESS_DELAY_US = 1000
_POLL_MIN_S, _POLL_MAX_S = 20e-6, 1e-3   # read() status poll backoff
_REAP_INTERVAL_S = 0.005
_CLOSE_WAIT_S = MAX_TIMEOUT_S + 60.0

_MAGIC = b"KVTNIXL1"
_HEAD = struct.Struct("<8sHHI")     # magic, name length, region count, crc32 of the rest
_REGION = struct.Struct("<QQ")      # addr, length

Region = tuple[int, int]            # (addr, length)
Pair = tuple[int, int, int]         # (local_addr, remote_addr, length)


class TransferFailed(Exception):
    """read() did not complete and nothing more will be written to the destination (reuse it; its
    contents are undefined) -- except for the subclass TransferAbandoned: check
    `destination_reusable` before reusing the destination after any TransferFailed."""

    @property
    def destination_reusable(self) -> bool:
        return True


class UnknownPeer(TransferFailed):
    """No such peer (never added, removed, or dropped after its connection failed): add_peer() it."""


class TransferTimeout(TransferFailed):
    """The deadline passed. NixlTransport always raises the TransferAbandoned subclass, because NIXL
    cannot confirm that an in-flight READ stopped."""


class TransferAbandoned(TransferTimeout):
    """The READ was still in flight at the deadline and may still write to the destination. Do not
    reuse (or unmap) the destination until `settled` is set: the transport sets it when NIXL reports
    the READ finished or failed, or when close() has destroyed the agent. If the peer never answers
    and never fails, that is close()."""

    def __init__(self, message: str, settled: threading.Event):
        super().__init__(message)
        self.settled = settled

    @property
    def destination_reusable(self) -> bool:
        return self.settled.is_set()


class PeerTransport(Protocol):
    """Reads byte ranges out of peers' registered memory into this process's registered memory.

    kind: transport name for logs and metrics ("nixl").
    local_metadata(): opaque bytes describing this endpoint (name, registered regions, connection
        info); send them to peers over the daemon's authenticated gRPC, never over an open channel.
    add_peer(metadata): loads a peer from its local_metadata() bytes and returns its name. Idempotent
        for the same bytes; new bytes under a known name (the peer restarted) replace the old entry.
        Raises ValueError for malformed metadata, TransferFailed while the old entry still has READs
        in flight (retry later).
    remove_peer(name): forgets a peer; no-op if unknown. New reads of it raise UnknownPeer at once.
    read(name, pairs, timeout_s): pairs = (local_addr, remote_addr, length); each local range must lie
        inside one region registered here, each remote range inside one region the peer registered.
        Blocks until every byte landed. Raises ValueError (bad pairs or bounds: at most
        MAX_PAIRS_PER_READ pairs and MAX_BYTES_PER_READ bytes; 0 < timeout_s <= MAX_TIMEOUT_S)
        before anything is transferred, UnknownPeer, TransferFailed, or TransferAbandoned (see its
        docstring before reusing memory). timeout_s bounds the wait for completion; a same-node
        READ is a kernel copy done inside the post call, so it returns when the copy is done.
    close(): waits for in-flight reads, then releases everything; afterwards nothing lands anywhere.
        The registered regions must stay mapped until close() returned.

    Thread-safety: every method may be called from any thread; read() may run concurrently in many
    threads (the daemon calls it through asyncio.to_thread). No method retains the caller's `pairs`.
    """

    kind: str

    def local_metadata(self) -> bytes: ...

    def add_peer(self, metadata: bytes) -> str: ...

    def remove_peer(self, agent_name: str) -> None: ...

    def read(self, agent_name: str, pairs: list[Pair], timeout_s: float) -> None: ...

    def close(self) -> None: ...


@functools.cache
def load_nixl():
    """Imports NIXL lazily: (module, "") or (None, human reason). The module is the nixl_cu12 /
    nixl_cu13 package (the `nixl` meta package installs one of them); its `_bindings` is used."""
    reasons = []
    for name in ("nixl_cu12", "nixl_cu13", "nixl"):
        try:
            module = importlib.import_module(name)
            importlib.import_module(f"{name}._bindings")
        except ImportError as exc:
            reasons.append(f"{name}: {exc}")
            continue
        except Exception as exc:  # a broken install (missing shared library, ABI mismatch)
            return None, f"importing {name} failed: {exc!r}"
        return module, ""
    return None, ("NIXL is not installed (pip install -c requirements/constraints.txt "
                  "-r requirements/peers.txt): " + "; ".join(reasons))


def encode_metadata(name: str, regions: list[Region], nixl_metadata: bytes) -> bytes:
    """Our envelope around NIXL's agent metadata: the name and regions let add_peer() replace a
    restarted peer by name and let read() check remote bounds before touching NIXL. The CRC keeps
    damaged bytes away from NIXL 1.5.1, which leaves a half-loaded, unremovable peer behind (its
    name then cannot be loaded again in this agent) when it rejects truncated metadata."""
    raw_name = name.encode()
    body = raw_name + b"".join(_REGION.pack(a, n) for a, n in regions) + nixl_metadata
    return _HEAD.pack(_MAGIC, len(raw_name), len(regions), zlib.crc32(body)) + body


def decode_metadata(data: bytes) -> tuple[str, tuple[Region, ...], bytes]:
    """Inverse of encode_metadata; ValueError when malformed or over the bounds."""
    data = bytes(data)
    if not _HEAD.size <= len(data) <= MAX_METADATA_BYTES:
        raise ValueError(f"peer metadata of {len(data)} bytes (expected {_HEAD.size}..{MAX_METADATA_BYTES})")
    magic, name_len, count, crc = _HEAD.unpack_from(data)
    end = _HEAD.size + name_len + count * _REGION.size
    if magic != _MAGIC or not 0 < name_len <= 255 or count > MAX_REGIONS or len(data) <= end:
        raise ValueError("malformed peer metadata")
    if zlib.crc32(memoryview(data)[_HEAD.size:]) != crc:
        raise ValueError("peer metadata fails its CRC (truncated or damaged)")
    name = data[_HEAD.size:_HEAD.size + name_len].decode(errors="strict")
    at = _HEAD.size + name_len
    regions = tuple(_REGION.unpack_from(data, at + i * _REGION.size) for i in range(count))
    return name, _checked_regions(regions), data[end:]


def _checked_regions(regions) -> tuple[Region, ...]:
    out = sorted((int(a), int(n)) for a, n in regions)
    if not 0 < len(out) <= MAX_REGIONS:
        raise ValueError(f"need 1..{MAX_REGIONS} regions, got {len(out)}")
    for (a, n), nxt in zip(out, out[1:] + [None]):
        if a <= 0 or n <= 0 or a + n >= 1 << 64 or (nxt is not None and a + n > nxt[0]):
            raise ValueError(f"bad or overlapping region ({a:#x}, {n})")
    return tuple(out)


@dataclasses.dataclass(eq=False)
class _Peer:
    name: str
    metadata: bytes
    regions: tuple[Region, ...]
    busy: int = 0          # reads in flight + unsettled abandoned READs
    retired: bool = False  # removed or disconnected; NIXL forgets it once busy == 0

    def __post_init__(self):
        self.starts = [a for a, _ in self.regions]   # sorted, disjoint (_checked_regions)
        self.ends = [a + n for a, n in self.regions]


@dataclasses.dataclass(eq=False)
class _Abandoned:
    peer: _Peer
    handle: int
    settled: threading.Event


class NixlTransport:
    """PeerTransport over one NIXL agent with one backend (UCX) and DRAM_SEG regions.

    `regions` = [(addr, length)] of memory this process reads into and serves from (the shared
    arena: SharedArena.address); the caller keeps them mapped until close() returned. `name` must be
    unique among the peers (the node's id). Thread-safe; see PeerTransport for the full contract.

    The agent runs NIXL's progress thread (with it off a READ hangs when the target never polls) and
    NIXL_THREAD_SYNC_RW, NIXL's own locking for concurrent posts; self._lock guards only the peer
    table and counters and is never held while a transfer is posted or awaited.
    """

    kind = "nixl"

    def __init__(self, name: str, regions: list[Region], backend: str = "UCX",
                 backend_params: dict[str, str] | None = None):
        module, reason = load_nixl()
        if module is None:
            raise RuntimeError(reason)
        if not 0 < len(name.encode()) <= 255:
            raise ValueError("the agent name must be 1..255 bytes of UTF-8")
        self._b = module._bindings
        self._errors = tuple(getattr(self._b, n) for n in dir(self._b) if n.startswith("nixl")
                             and n.endswith("Error"))
        self.name = name
        self.regions = _checked_regions(regions)
        self._starts = [a for a, _ in self.regions]
        self._ends = [a + n for a, n in self.regions]
        self._agent = self._make_agent(name, backend, {**DEFAULT_BACKEND_PARAMS, **(backend_params or {})})
        self._metadata = encode_metadata(name, list(self.regions), self._agent.getLocalMD())
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._peers: dict[str, _Peer] = {}
        self._abandoned: list[_Abandoned] = []
        self._inflight = 0
        self._closed = False
        self._reaper: threading.Thread | None = None

    def _make_agent(self, name: str, backend: str, params: dict[str, str]):
        b = self._b
        config = b.nixlAgentConfig()
        config.useProgThread = True
        config.pthrDelay = PROGRESS_DELAY_US
        config.syncMode = b.NIXL_THREAD_SYNC_RW
        config.useListenThread = False
        agent = b.nixlAgent(name, config)
        if backend not in agent.getAvailPlugins():
            raise RuntimeError(f"NIXL has no {backend} plugin (has {agent.getAvailPlugins()})")
        handle = agent.createBackend(backend, params)
        agent.registerMem(b.nixlRegDList(b.DRAM_SEG, [(a, n, 0, "") for a, n in self.regions]), [handle])
        return agent

    def local_metadata(self) -> bytes:
        return self._metadata

    # --- peers -------------------------------------------------------------------------------------

    def add_peer(self, metadata: bytes) -> str:
        name, regions, nixl_md = decode_metadata(metadata)
        if name == self.name:
            raise ValueError("cannot add this transport as its own peer")
        with self._lock:
            self._check_open()
            old = self._peers.get(name)
            if old is not None and not old.retired and old.metadata == metadata:
                return name
            if old is not None:
                if old.busy:
                    raise TransferFailed(f"peer {name} still has {old.busy} transfer(s) in flight; "
                                         "it cannot be replaced yet")
                self._forget(old)
            if len(self._peers) >= MAX_PEERS:
                raise ValueError(f"too many peers (max {MAX_PEERS})")
            loaded = self._load(name, nixl_md)
            if loaded != name:
                self._agent.invalidateRemoteMD(loaded)
                raise ValueError(f"peer metadata names {name!r} but NIXL's names {loaded!r}")
            self._peers[name] = _Peer(name, bytes(metadata), regions)
        return name

    def _load(self, name: str, nixl_md: bytes) -> str:
        try:
            loaded = self._agent.loadRemoteMD(nixl_md)
        except self._errors as exc:
            self._agent.invalidateRemoteMD(name)  # a failed load can leave half a peer behind
            raise ValueError(f"NIXL rejected the peer metadata: {exc!r}") from exc
        return loaded.decode() if isinstance(loaded, bytes) else loaded

    def remove_peer(self, agent_name: str) -> None:
        """Non-blocking: NIXL forgets the peer once its in-flight and abandoned READs are over."""
        with self._lock:
            peer = self._peers.get(agent_name)
            if peer is not None and not self._closed:
                self._retire(peer)

    def _retire(self, peer: _Peer) -> None:
        # Caller holds self._lock. Invalidating NIXL's copy of a peer with READs in flight would not
        # stop them (late bytes still land) and would hide their completion, so it waits for busy == 0.
        peer.retired = True
        if peer.busy == 0:
            self._forget(peer)

    def _forget(self, peer: _Peer) -> None:
        if self._peers.get(peer.name) is not peer:
            return  # already forgotten: the name may belong to a newer entry now
        del self._peers[peer.name]
        self._agent.invalidateRemoteMD(peer.name)  # returns NOT_FOUND if NIXL already dropped it

    # --- read --------------------------------------------------------------------------------------

    def read(self, agent_name: str, pairs: list[Pair], timeout_s: float) -> None:
        if not (isinstance(timeout_s, (int, float)) and 0 < timeout_s <= MAX_TIMEOUT_S
                and math.isfinite(timeout_s)):
            raise ValueError(f"timeout_s must be in (0, {MAX_TIMEOUT_S}], got {timeout_s!r}")
        peer = self._checkout(agent_name)
        try:
            local, remote = self._descs(peer, pairs)
            self._transfer(peer, local, remote, timeout_s)
        finally:
            self._checkin(peer)

    def _checkout(self, agent_name: str) -> _Peer:
        with self._lock:
            self._check_open()
            peer = self._peers.get(agent_name)
            if peer is None or peer.retired:
                raise UnknownPeer(f"unknown peer {agent_name!r}")
            if len(self._abandoned) >= MAX_ABANDONED:
                raise TransferFailed(f"{len(self._abandoned)} abandoned transfers are still in flight")
            peer.busy += 1
            self._inflight += 1
            return peer

    def _checkin(self, peer: _Peer) -> None:
        with self._lock:
            peer.busy -= 1
            self._inflight -= 1
            if peer.retired and peer.busy == 0:
                self._forget(peer)
            self._idle.notify_all()

    def _descs(self, peer: _Peer, pairs: list[Pair]):
        """Checks every pair against both sides' regions; builds NIXL's descriptor lists. A tight
        loop: ~0.6 us a pair, a few % of the fastest READ of 16 blocks."""
        if not 0 < len(pairs) <= MAX_PAIRS_PER_READ:
            raise ValueError(f"need 1..{MAX_PAIRS_PER_READ} pairs, got {len(pairs)}")
        starts, ends, peer_starts, peer_ends = self._starts, self._ends, peer.starts, peer.ends
        total = 0
        for local_addr, remote_addr, length in pairs:
            if not (type(local_addr) is int and type(remote_addr) is int and type(length) is int) or length <= 0:
                raise ValueError(f"pairs must be (int, int, positive int), got {(local_addr, remote_addr, length)!r}")
            i = bisect.bisect_right(starts, local_addr) - 1
            if i < 0 or local_addr + length > ends[i]:
                raise ValueError(f"local range ({local_addr:#x}, {length}) is outside the registered regions")
            i = bisect.bisect_right(peer_starts, remote_addr) - 1
            if i < 0 or remote_addr + length > peer_ends[i]:
                raise ValueError(f"remote range ({remote_addr:#x}, {length}) is outside peer "
                                 f"{peer.name}'s registered regions")
            total += length
        if total > MAX_BYTES_PER_READ:
            raise ValueError(f"{total} bytes in one read (max {MAX_BYTES_PER_READ})")
        b = self._b
        return (b.nixlXferDList(b.DRAM_SEG, [(a, n, 0) for a, _, n in pairs]),
                b.nixlXferDList(b.DRAM_SEG, [(a, n, 0) for _, a, n in pairs]))

    def _transfer(self, peer: _Peer, local, remote, timeout_s: float) -> None:
        # self._agent, never a local alias: a raised exception's frames must not keep the agent
        # alive past close(), which relies on destroying it.
        b = self._b
        try:
            handle = self._agent.createXferReq(b.NIXL_READ, local, remote, peer.name, "", [])
        except self._errors as exc:  # nothing posted; NOT_FOUND: NIXL lacks the peer (bounds were checked)
            self._drop_disconnected(peer, exc)
            raise TransferFailed(f"NIXL refused the READ from {peer.name}: {exc!r}") from exc
        deadline = time.monotonic() + timeout_s
        abandoned = False
        try:
            state = self._agent.postXferReq(handle, "")
            delay = _POLL_MIN_S
            while state == b.NIXL_IN_PROG:
                if time.monotonic() >= deadline:
                    abandoned = True
                    raise self._abandon(peer, handle, timeout_s)
                time.sleep(delay)
                delay = min(_POLL_MAX_S, delay * 2)
                state = self._agent.getXferStatus(handle)
            if state != b.NIXL_SUCCESS:
                raise TransferFailed(f"READ from {peer.name} ended in state {state!r}")
        except self._errors as exc:
            # NIXL raised an error state: the backend request completed with an error (a failed
            # endpoint purges all its requests), so nothing more lands. NOT_FOUND here means NIXL
            # dropped the peer after its connection failed.
            self._drop_disconnected(peer, exc)
            raise TransferFailed(f"READ from {peer.name} failed: {exc!r}") from exc
        finally:
            if not abandoned:
                self._release(handle)

    def _drop_disconnected(self, peer: _Peer, exc: Exception) -> None:
        if isinstance(exc, (self._b.nixlRemoteDisconnectError, self._b.nixlNotFoundError)):
            log.warning("peer %s disconnected (%r); it must be added again", peer.name, exc)
            with self._lock:
                self._retire(peer)

    def _release(self, handle: int) -> None:
        try:
            self._agent.releaseXferReq(handle)
        except self._errors as exc:
            log.warning("releasing a NIXL transfer handle failed: %r", exc)

    # --- abandoned READs ---------------------------------------------------------------------------

    def _abandon(self, peer: _Peer, handle: int, timeout_s: float) -> TransferAbandoned:
        """Keeps the handle (unreleased, so its completion stays observable) for the reaper."""
        settled = threading.Event()
        with self._lock:
            peer.busy += 1  # the abandoned READ keeps the peer known to NIXL until it settles
            self._abandoned.append(_Abandoned(peer, handle, settled))
            if self._reaper is None:
                self._reaper = threading.Thread(target=self._reap, name="kvtier-nixl-reaper", daemon=True)
                self._reaper.start()
        log.warning("READ from %s still in flight after %.3g s: abandoned", peer.name, timeout_s)
        return TransferAbandoned(f"READ from {peer.name} still in flight after {timeout_s:g} s; "
                                 "do not reuse the destination until .settled is set", settled)

    def _reap(self) -> None:
        while True:
            with self._lock:
                if self._closed or not self._abandoned:
                    self._reaper = None
                    return
                pending = list(self._abandoned)
            for item in pending:
                try:
                    final = self._agent.getXferStatus(item.handle) != self._b.NIXL_IN_PROG
                except self._errors as exc:  # an error state is final (see _transfer)
                    final = True
                    self._drop_disconnected(item.peer, exc)
                if final:
                    self._settle(item)
            time.sleep(_REAP_INTERVAL_S)

    def _settle(self, item: _Abandoned) -> None:
        self._release(item.handle)
        with self._lock:
            self._abandoned.remove(item)
            item.peer.busy -= 1
            if item.peer.retired and item.peer.busy == 0:
                self._forget(item.peer)
        item.settled.set()

    # --- lifecycle ---------------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise TransferFailed("transport closed")

    def close(self) -> None:
        """Waits for in-flight reads (each ends by its deadline), then destroys the agent, which stops
        UCX for good; only then are abandoned READs marked settled. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if not self._idle.wait_for(lambda: self._inflight == 0, timeout=_CLOSE_WAIT_S):
                log.error("NIXL reads still running after %.0f s; leaking the agent", _CLOSE_WAIT_S)
                return
            reaper = self._reaper
        if reaper is not None:
            reaper.join()  # it exits on _closed; it must not poll an agent being destroyed
        with self._lock:
            abandoned, self._abandoned = self._abandoned, []
            for item in abandoned:
                self._release(item.handle)  # cancels what it can; destroying the agent stops the rest
            for name in self._peers:
                self._agent.invalidateRemoteMD(name)
            self._peers.clear()
            destroyed = self._destroy_agent()
        if not destroyed:
            log.error("the NIXL agent outlived close(): %d abandoned READs stay unsettled", len(abandoned))
            return
        for item in abandoned:
            item.settled.set()

    def _destroy_agent(self) -> bool:
        """Drops the agent; True once it is destroyed (~nixlAgent joins the progress thread and tears
        UCX down, after which nothing can land). The binding has no explicit destroy, so a stray
        reference (a cycle through a traceback) would keep it alive: checked with a weakref."""
        alive = weakref.ref(self._agent)
        self._agent = None
        if alive() is not None:
            gc.collect()
        return alive() is None

    def __enter__(self) -> "NixlTransport":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class ExportWindow:
    """The only memory an owner registers with the agent whose metadata it hands to peers:
    `slot_count` slots of `slot_bytes` in a sealed memfd, allocated in full now
    (tiers.arena.create_sealed_memory: a node short of memory fails its start, never a later copy
    with SIGBUS) and mapped MAP_SHARED | MAP_POPULATE. Slot s lies at `address + s * slot_bytes`.

    A peer holding the metadata can READ and WRITE all of it at any time: put nothing here that
    every peer may not read, and trust nothing read back from it (the owner hashes and MACs the
    arena's bytes before it copies them here, and the requester verifies what it READ).

    take()/free() are the owner's slot bookkeeping (its event loop only); copy() may run on any
    thread inside `with window.copying():`. close() waits for copies still running (a worker
    thread of a cancelled call), then unmaps; close the agent registered over the window first.
    With share=True the memfd stays open as `fd` for the export agent (tiers/nixl_export.py) to map.
    """

    CLOSE_WAIT_S = 60.0

    def __init__(self, name: str, slot_count: int, slot_bytes: int, share: bool = False):
        """share: keep the memfd open as `fd` (close_fd() when it was handed over) for the export
        agent (tiers/nixl_export.py), which maps the same memory in its own process."""
        from .arena import create_sealed_memory  # noqa: PLC0415 - nixl is imported by the daemon only
        if not (slot_count > 0 and slot_bytes > 0 and slot_bytes % mmap.PAGESIZE == 0):
            raise ValueError(f"bad export window: {slot_count} slots of {slot_bytes} bytes")
        self.slot_count, self.slot_bytes = slot_count, slot_bytes
        self.size_bytes = slot_count * slot_bytes
        fd = create_sealed_memory(f"kvtier-{name}-export", self.size_bytes)
        self.fd = -1
        try:
            self._map = mmap.mmap(fd, self.size_bytes, mmap.MAP_SHARED | mmap.MAP_POPULATE,
                                  mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(fd)  # no window: nobody will ever close it otherwise
            raise
        if share:
            self.fd = fd
        else:
            os.close(fd)  # the mapping keeps the memory; nobody else ever gets the descriptor
        self.address = ctypes.addressof(ctypes.c_char.from_buffer(self._map))  # the export ends here
        self._free = list(range(slot_count - 1, -1, -1))  # a stack: the lowest free slot comes first
        self._used: set[int] = set()
        self._copies = 0
        self._idle = threading.Condition()

    @property
    def in_use(self) -> int:
        return len(self._used)

    @property
    def available(self) -> int:
        return len(self._free)

    def take(self, count: int) -> list[int]:
        """Up to `count` free slots (fewer only if fewer are free), now in use."""
        slots = [self._free.pop() for _ in range(min(count, len(self._free)))]
        self._used.update(slots)
        return slots

    def free(self, slots: list[int]) -> None:
        for slot in slots:
            if slot not in self._used:
                raise AssertionError(f"export window slot {slot} freed but not in use")
            self._used.remove(slot)
            self._free.append(slot)

    def slot_address(self, slot: int) -> int:
        if not 0 <= slot < self.slot_count:
            raise ValueError(f"export window slot {slot} out of range (0..{self.slot_count - 1})")
        return self.address + slot * self.slot_bytes

    def copy(self, slot: int, source_address: int, length: int) -> None:
        """Copies `length` bytes from `source_address` into `slot` (any thread; ctypes.memmove
        releases the GIL)."""
        if not 0 < length <= self.slot_bytes:
            raise ValueError(f"{length} bytes do not fit an export window slot of {self.slot_bytes}")
        ctypes.memmove(self.slot_address(slot), source_address, length)

    def bytes_at(self, slot: int, length: int) -> bytes:
        return ctypes.string_at(self.slot_address(slot), length)

    def copying(self):
        """Context manager around copy() calls: close() waits until every one has left."""
        return _Copying(self)

    def check(self, full: bool = False) -> None:
        """Asserts the bookkeeping: every slot free or in use (O(1)); with `full`, exactly once
        (O(slots): take() and free() keep it so, free() refusing a slot not in use)."""
        assert len(self._free) + len(self._used) == self.slot_count, "export window slots leaked"
        if full:
            assert self._used.isdisjoint(self._free) and len(set(self._free)) == len(self._free), \
                "an export window slot is both free and in use"

    def close_fd(self) -> None:
        """Closes the shared memfd (the export agent has it; the mapping keeps the memory). Idempotent."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def close(self) -> None:
        """Idempotent. Unmaps once no copy is running (waits at most CLOSE_WAIT_S, else leaks the
        mapping rather than pull it from under a copying thread)."""
        with self._idle:
            if self._map is None:
                return
            if not self._idle.wait_for(lambda: self._copies == 0, timeout=self.CLOSE_WAIT_S):
                log.error("export window: %d copies still running after %.0f s; leaking its %d bytes",
                          self._copies, self.CLOSE_WAIT_S, self.size_bytes)
                return
            self._map.close()
            self._map = None
            self.address = 0
            self.close_fd()


class _Copying:
    def __init__(self, window: ExportWindow):
        self.window = window

    def __enter__(self):
        with self.window._idle:
            if self.window._map is None:
                raise TransferFailed("export window closed")
            self.window._copies += 1
        return self.window

    def __exit__(self, *exc) -> None:
        with self.window._idle:
            self.window._copies -= 1
            self.window._idle.notify_all()
