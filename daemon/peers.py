"""Peers: other nodes' kvtierd serve blocks we miss, so N nodes needing one prefix do one prefill.

Owner side (`PeerService`, the kvtier.v1.KvTierPeer API on peers.listen, mutual TLS only):
Hello tells a requester where this node's export window lives and hands out the NIXL metadata of
the agent registered over that window (never over the arena); Pin promotes the blocks into the
arena, holds a read lease on them, copies each served block into a free window slot and answers
window slots, which stay the peer's until the lease is released or expires; Fetch streams the same
blocks when NIXL is not available.

NIXL (`NixlPeers`, see tiers/nixl.py): two agents. The reader, in this process, is registered over
this node's arena, READs peers' windows into local arena slots, and its metadata never leaves the
process. The exporter is registered over the export window only and runs in the export agent, a
separate process that maps only the window (tiers/nixl_export.py; this process maps the same memfd
and copies served blocks into it). A peer that loads its metadata can READ and WRITE the window
(NIXL has no read-only registration), so all it can touch are copies being served, which every
requester verifies (checksum, and MAC) before it commits them; a peer that forges the metadata's
region reaches the agent's memory, never this process's. The agent is supervised: if it dies, the
daemon stops (main.py).

Requester side (`PeerFetcher.fetch`): for the missing suffix of a key chain, asks at most
peers.max_fanout peers (or only the one peer a Lookup/Prefetch named: `peer`, an address in
peers.addresses or a node id from Hello; a name that is neither pulls nothing) which of the keys they hold, picks the longest run, reserves local arena
slots, pulls the bytes (NIXL READ straight into the slots, else the gRPC stream), verifies each
block's checksum on arrival, and commits the verified prefix like any commit (so it is written
through). Every peer call and transfer is bounded by peers.timeout_s; a peer that failed is
skipped for PEER_BACKOFF_S. A block that fails verification is dropped with everything after
it: a peer costs at most its timeout and never a wrong block.

With a cluster key (cluster.key_file, daemon/mac.py) the owner checks each block's bytes against
its checksum and sends their MAC with the block (PeerBlock.mac); the requester commits a block only
if its checksum and then its MAC verify over the bytes that landed in its slots. A missing or wrong
MAC drops the block with the rest of the chain, is counted (`mac_rejected`, in total and per peer)
and logged, and the peer is skipped for PEER_BACKOFF_S. Without a key, blocks are checked by
checksum only: any peer with a certificate from peers.tls_ca can serve any bytes it likes.

Owner-side bounds (PeerPins): the blocks that peers hold pinned (Pin leases, and Fetch's one block
at a time) count per peer identity (its certificate's common name) against
PINS_PER_FETCH * peers.max_blocks_per_fetch, and all peers' pins in one arena part against
1/PEER_PIN_SHARE of that part's slots, so a peer that pins all it can leaves local Allocate most of
the arena. Pins last at most peers.lease_ms. A Pin over a bound is cut short (the requester pulls a
shorter prefix); with nothing left it fails RESOURCE_EXHAUSTED. The export window has as many slots
as all peers may hold pinned at once (window_slots(): the sum of the parts' shares), and a Pin's
window slots go back exactly when PeerPins stops counting its lease, so the window never runs out
before the pin bounds do.

Owner-side budget (PeerBudget), per peer identity too: at most peers.max_inflight_per_peer Has, Pin
and Fetch calls in flight at once, and a token bucket of peers.max_bytes_per_s_per_peer (burst: a
second's worth, at least one slot) charged with the block bytes served: by Fetch as it streams them,
by Pin for the blocks it copies into the window (the peer READs them afterwards, unmetered). Past
either the call is refused at once with RESOURCE_EXHAUSTED (a Pin is first cut to what the bucket
covers; a Fetch ends after the blocks it covered): nothing waits for budget, so a peer never makes
this node hold a lease, a slot or a call while it waits. Refusals are counted (PeerServiceCounters,
kvtier_peer_refused_*_total) and logged at most once per REFUSAL_LOG_EVERY_S per peer and reason.
The requester takes a refusal as a failed call: a miss, and that peer skipped for PEER_BACKOFF_S.

Event loop only, except the NIXL READs, the checksums and the MACs, which run in worker threads: a
NIXL pull READs in pieces of about VERIFY_PIECE_BYTES, and each piece is verified (xxh3 and HMAC
release the GIL) while the next one is read, so verification costs about one piece beyond the
transfer. The owner's lease is released in the background once the READs are over.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import dataclasses
import hashlib
import logging
import os
import socket
import time

import grpc

from kvtier.proto.v1 import kvtier_pb2 as pb
from kvtier.proto.v1 import kvtier_pb2_grpc as pb_grpc
from kvtier.tiers.block import MAX_TOKEN_IDS, checksum, unpack_token_ids
from kvtier.tiers import nixl, nixl_export
from kvtier.tiers.nixl import MAX_BYTES_PER_READ, MAX_PAIRS_PER_READ, TransferAbandoned
from kvtier.tiers.retention import CLASS_RANK, DEFAULT_RETENTION, Retention

from . import mac as macs
from .catalog import origin_message, retention_message, retention_of
from .config import Config
from .errors import ApiError, exhausted, grpc_code, invalid, precondition
from .store import BlockStore, Staged

log = logging.getLogger("kvtier.peers")
PEER_OWNER = "\0peer"          # owner tag of leases opened through the peer API
PEER_BACKOFF_S = 5.0           # a failed peer is not asked again for this long
ALLOCATE_WAIT_MS = 500         # local slots for a pull: wait this long, then give up the pull
VERIFY_PIECE_BYTES = 8 << 20   # a NIXL pull READs pieces of about this size; piece k is verified during READ k+1
VERIFY_THREADS = max(1, min(4, (os.cpu_count() or 2) - 1))
# Owner-side bounds on what peers pin here (no config keys: derived from the arena and the peer
# settings). All peers together pin at most 1/PEER_PIN_SHARE of an arena part's slots at once, so a
# peer pinning everything it can leaves local Allocate three quarters of the part (minus its own
# holds); one peer pins at most PINS_PER_FETCH pulls' worth (peers.max_blocks_per_fetch each).
PEER_PIN_SHARE = 4
PINS_PER_FETCH = 2
CORRUPT, FORGED = "checksum", "mac"   # why a pulled block failed verification
MAX_UNKNOWN_LOGGED = 256      # unknown peer names (LookupRequest.peer) each logged once, up to this many
# Owner-side budget per peer identity (PeerBudget): the state of at most MAX_TRACKED_PEERS identities is
# kept (the least recently seen is forgotten; calls in flight are counted apart, only while they run),
# and each refusal is logged at most once per REFUSAL_LOG_EVERY_S per identity and reason.
MAX_TRACKED_PEERS = 1024
REFUSAL_LOG_EVERY_S = 10.0


def channel_credentials(cfg: Config) -> grpc.ChannelCredentials:
    with open(cfg.peers.tls_ca, "rb") as ca, open(cfg.peers.tls_key, "rb") as key, \
            open(cfg.peers.tls_cert, "rb") as cert:
        return grpc.ssl_channel_credentials(ca.read(), key.read(), cert.read())


def server_credentials(cfg: Config) -> grpc.ServerCredentials:
    """Mutual TLS: a caller without a certificate signed by peers.tls_ca fails the handshake."""
    with open(cfg.peers.tls_ca, "rb") as ca, open(cfg.peers.tls_key, "rb") as key, \
            open(cfg.peers.tls_cert, "rb") as cert:
        return grpc.ssl_server_credentials([(key.read(), cert.read())], root_certificates=ca.read(),
                                           require_client_auth=True)


def open_transport(cfg: Config, store: BlockStore):
    """This node's NIXL (a NixlPeers: the reader over the arena with peers.addresses, the export
    window and its agent with peers.listen), or (None, why) for the gRPC fallback."""
    if cfg.peers.transport == "grpc":
        return None, "peers.transport = \"grpc\""
    module, reason = nixl.load_nixl()
    if module is None:
        if cfg.peers.transport == "nixl":
            raise RuntimeError(f"peers.transport = \"nixl\" but NIXL cannot be loaded: {reason}")
        return None, reason
    try:
        return NixlPeers(f"kvtierd-{node_id(cfg)}-{store.arena.generation}", store.arena,
                         reader=bool(cfg.peers.addresses), export=bool(cfg.peers.listen)), ""
    except OSError as exc:  # the window's memory: a start-up error in one line, like the arena's
        raise RuntimeError(f"peers: cannot allocate the NIXL export window: {exc}") from exc
    except nixl_export.ExportAgentError as exc:
        raise RuntimeError(f"peers: {exc}") from exc


def window_slots(arena) -> int:
    """Slots of the export window: the most blocks all peers may hold pinned at once, the sum over
    arena parts of each part's share (PeerPins.part_cap). One peer's own bound
    (PINS_PER_FETCH * peers.max_blocks_per_fetch) does not lower it: any number of peer identities
    may pin."""
    return sum(part_share(count) for count in arena.part_counts)


def part_share(part_slots: int, share: int = PEER_PIN_SHARE) -> int:
    """How many blocks of an arena part of `part_slots` slots all peers together may pin."""
    return max(1, part_slots // share)


class NixlPeers:
    """This node's NIXL endpoints, one agent per direction (what main.py and PeerFetcher call "the
    transport"):

    - reader (with peers.addresses): in this process, registered over the whole arena, which pulls
      READ into. Its metadata is never sent anywhere: an owner needs none to be READ from, and
      whoever held it could READ and WRITE the arena.
    - export agent (with peers.listen): a separate process (tiers/nixl_export.py) that maps only the
      export window (a memfd this process maps too: Pin copies served blocks into it) and runs the
      agent registered over it; `export_metadata()` is what Hello hands out and `export_address` is
      where the window lies in the agent's address space. A peer that rewrites the region in that
      metadata reaches the agent's memory, never this process's. watch() ends when the agent dies
      (main.py supervises it: the daemon stops).

    read/add_peer/remove_peer go to the reader. close() closes the reader (it waits for its READs),
    stops the export agent, then unmaps the window (after any copy into it ended)."""

    kind = "nixl"

    def __init__(self, name: str, arena, reader: bool = True, export: bool = True):
        self.reader = self.agent = self.window = None
        try:
            if reader:
                self.reader = nixl.NixlTransport(f"{name}-reader", [(arena.address, arena.size_bytes)])
            if export:
                self.window = nixl.ExportWindow(name, window_slots(arena), arena.slot_bytes, share=True)
                self.agent = nixl_export.ExportAgent(name, self.window)
                self.window.close_fd()  # the agent maps it; nothing else gets the descriptor
        except BaseException:
            self.close()
            raise
        if self.window is not None:
            log.info("peers: NIXL export window of %d slots of %d KiB (%d MiB, %.0f%% of the %d MiB arena: as many "
                     "blocks as peers may hold pinned at once), served by the export agent, pid %d: a separate "
                     "process that maps only the window (%s); the arena is not registered for peers",
                     self.window.slot_count, arena.slot_bytes >> 10, self.window.size_bytes >> 20,
                     100 * self.window.size_bytes / arena.size_bytes, arena.size_bytes >> 20, self.agent.pid,
                     self.agent.sandbox)

    @property
    def export_address(self) -> int:
        return self.agent.address if self.agent is not None else 0

    def export_metadata(self) -> bytes:
        return self.agent.metadata if self.agent is not None else b""

    async def watch(self) -> None:
        """Ends (raises ExportAgentDied) when the export agent dies; waits for cancellation after stop()."""
        why = await self.agent.watch()
        if not self.agent.stopping:
            raise ExportAgentDied(f"the NIXL export agent (pid {self.agent.pid}) {why}: peers cannot READ "
                                  "from this node any more")
        await asyncio.Event().wait()  # stopped on purpose: the store cancels this task at close

    def add_peer(self, metadata: bytes) -> str:
        return self._reader().add_peer(metadata)

    def remove_peer(self, agent_name: str) -> None:
        if self.reader is not None:
            self.reader.remove_peer(agent_name)

    def read(self, agent_name: str, pairs, timeout_s: float) -> None:
        self._reader().read(agent_name, pairs, timeout_s)

    def _reader(self) -> nixl.NixlTransport:
        if self.reader is None:
            raise nixl.TransferFailed("this node does not pull from peers (no peers.addresses)")
        return self.reader

    def close(self) -> None:
        """Idempotent."""
        if self.reader is not None:
            self.reader.close()
        if self.agent is not None:
            code = self.agent.stop()
            if code:
                log.warning("peers: the NIXL export agent (pid %d) %s at its stop", self.agent.pid,
                            nixl_export.describe_exit(code))
        if self.window is not None:
            self.window.close()  # after the agent: nothing serves it any more


class ExportAgentDied(RuntimeError):
    pass


def node_id(cfg: Config) -> str:
    return cfg.peers.node_id or socket.gethostname()


def printable(text, limit: int = 128) -> str:
    """`text` (anything a peer sent: a node id, an error message, attributes) fit for one log line:
    printable ASCII is kept; newlines, ANSI escapes, other control and non-ASCII characters and the
    backslash itself are written as Python escapes (\\n, \\x1b, \\u2028, \\\\), so a peer can neither start a
    forged log line nor pass for a different string; cut to `limit` characters, then "..."."""
    text = text if isinstance(text, str) else str(text)
    shown = "".join(c if " " <= c <= "~" and c != "\\" else c.encode("unicode_escape").decode("ascii")
                    for c in text[:limit])
    return shown + ("..." if len(text) > limit else "")


def _size(count: float) -> str:
    """A byte count for a log line: 2.0 GiB, 64.0 KiB, 12 B."""
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if count >= 1 << shift:
            return f"{count / (1 << shift):.1f} {unit}"
    return f"{int(count)} B"


def _interleaved(groups: list[list], count: int) -> list:
    """Undoes the split of `count` items into groups[i] = items[i::len(groups)]."""
    merged = [None] * count
    for i, group in enumerate(groups):
        merged[i::len(groups)] = group
    return merged


def _served_prefix(namespace: str, blocks: list, sealed: list) -> list:
    """The MACs of the blocks up to the first whose arena bytes did not match its checksum (None),
    which is logged: that block and the rest are not served."""
    for index, mac in enumerate(sealed):
        if mac is None:
            log.error("block %s/%s in this node's arena does not match its checksum: not served to peers",
                      printable(namespace), blocks[index].key.hex())
            return sealed[:index]
    return sealed


def _peer_token_ids(block: pb.PeerBlock, origin: pb.BlockOrigin | None) -> list[int]:
    """The token ids a peer sent with a block, kept when the block comes from the pull's `origin` (one
    per commit) and they fit its block size: routing data a peer gets wrong is dropped, never a
    reason to refuse its verified bytes."""
    if origin is None or block.origin != origin or len(block.token_ids) > min(origin.block_size, MAX_TOKEN_IDS):
        return []
    return list(block.token_ids)


def _peer_retention(block: pb.PeerBlock) -> Retention | None:
    """A peer's retention is a hint: an invalid one is dropped, the (verified) block is kept."""
    try:
        return clamp_peer_retention(retention_of(block))
    except ValueError as exc:
        log.warning("a peer sent an invalid retention (%s): the block is stored with the default", printable(exc))
        return None


def clamp_peer_retention(retention: Retention | None) -> Retention | None:
    """A peer's retention may lower a block's standing here, never raise it above the local
    default: no TTL pin, priority at most the default's, and a class ranked above the default's
    becomes the default's. A peer (or a tenant writing through one) must not pin this node's
    memory, e.g. as class "system", priority 100, pinned for decades."""
    if retention is None:
        return None
    cls = retention.cls if CLASS_RANK[retention.cls] <= CLASS_RANK[DEFAULT_RETENTION.cls] else DEFAULT_RETENTION.cls
    return Retention(cls, min(retention.priority, DEFAULT_RETENTION.priority), None)


def peer_identity(context) -> str:
    """Who is calling, from its mutual-TLS certificate (its common name; else a digest of the
    certificate; else the address): what the owner-side bounds count by. Not the node id a peer
    says in Hello, which it may choose freely."""
    try:
        auth = context.auth_context() or {}
    except Exception:  # noqa: BLE001 - a context without TLS (tests of the servicer alone)
        auth = {}
    names = auth.get("x509_common_name") or []
    if names:
        return "cn:" + printable(names[0].decode("utf-8", "replace"), 128)
    certs = auth.get("x509_pem_cert") or []
    if certs:
        return "cert:" + hashlib.sha256(certs[0]).hexdigest()[:32]
    return "addr:" + printable(context.peer(), 128)


@dataclasses.dataclass(eq=False)
class _Pin:
    identity: str
    part: int
    lease: object                 # the store's read lease (store.leases)
    window: list[int]             # export window slots holding copies of the lease's blocks
    copying: bool = False         # Pin is still copying into `window`: counted, and kept, until done()


class PeerPins:
    """The blocks peers hold pinned on this node, by peer identity and arena part, counted from the
    leases themselves (store.leases): a lease that was released or expired stops counting without
    anyone telling this table. Event loop only.

    grant() before pinning reserves room for up to `want` blocks (so concurrent pins cannot both
    pass the check), settle() afterwards swaps the reservation for the lease (or drops it).

    With an export window, a pin's window slots (fill()) go back to the window exactly when its
    lease stops counting here, so window slots in use never exceed the blocks counted against the
    bounds, and the window (window_slots(): the sum of the part caps) cannot run out first. A pin
    still being copied into (settle(copying=True) until done()) keeps counting, and keeps its
    window slots, even if its lease closed meanwhile: a slot is never handed to another pin while a
    copy may still write it. check() asserts that bookkeeping."""

    def __init__(self, store: BlockStore, per_peer: int, share: int = PEER_PIN_SHARE, window=None):
        self.store = store
        self.per_peer = per_peer
        self.share = share
        self.window = window          # tiers.nixl.ExportWindow, or None (no NIXL export)
        self._leases: dict[int, _Pin] = {}   # lease id -> pin
        self._granted: collections.Counter[tuple[str, int]] = collections.Counter()  # being pinned

    def part_cap(self, part: int) -> int:
        return part_share(self.store.arena.part_counts[part], self.share)

    def _open(self, pin: _Pin) -> bool:
        return self.store.leases.get(pin.lease.id) is pin.lease

    def _live(self) -> list[tuple[str, int, int]]:
        """(identity, part, blocks) of every open peer lease (and of every pin still copying);
        forgets the others and frees their window slots."""
        out = []
        for lease_id, pin in list(self._leases.items()):
            if not pin.copying and not self._open(pin):
                del self._leases[lease_id]
                if pin.window:
                    self.window.free(pin.window)
                continue
            out.append((pin.identity, pin.part, len(pin.lease.items)))
        return out

    def sweep(self) -> None:
        """Frees what released and expired leases held (grant() does it too)."""
        self._live()

    def pinned(self, identity: str | None = None, part: int | None = None) -> int:
        """Blocks pinned (or being pinned) by `identity` (any peer: None), in `part` (any: None)."""
        held = sum(n for who, p, n in self._live() if identity in (None, who) and part in (None, p))
        return held + sum(n for (who, p), n in self._granted.items() if identity in (None, who) and part in (None, p))

    def grant(self, identity: str, part: int, want: int) -> int:
        """How many of `want` blocks the peer may pin in `part` now (0: none), reserved until settle()."""
        room = min(self.per_peer - self.pinned(identity), self.part_cap(part) - self.pinned(part=part))
        granted = max(0, min(want, room))
        if granted:
            self._granted[(identity, part)] += granted
        return granted

    def settle(self, identity: str, part: int, granted: int, lease, copying: bool = False) -> _Pin | None:
        if granted:
            self._granted[(identity, part)] -= granted
            if self._granted[(identity, part)] <= 0:
                del self._granted[(identity, part)]
        if lease is None:
            return None
        pin = self._leases[lease.id] = _Pin(identity, part, lease, [], copying)
        return pin

    def fill(self, pin: _Pin, count: int) -> list[int]:
        """`count` window slots for the pin (at most the blocks its lease holds), until its lease ends."""
        assert pin.copying and not pin.window and count <= len(pin.lease.items)
        pin.window = self.window.take(count)
        if len(pin.window) < count:  # cannot happen while window_slots() covers the part caps
            log.error("export window: %d slots free for a pin of %d blocks; serving fewer", len(pin.window), count)
        return pin.window

    def trim(self, pin: _Pin, keep: int) -> None:
        """Gives back the pin's window slots past the first `keep` (blocks not served after all)."""
        extra, pin.window = pin.window[keep:], pin.window[:keep]
        if extra:
            self.window.free(extra)

    def done(self, pin: _Pin | None) -> None:
        """The copy into the pin's window slots is over: from now on they go when its lease goes."""
        if pin is not None:
            pin.copying = False
            self._live()

    def owner_of(self, lease_id: int) -> str | None:
        found = self._leases.get(lease_id)
        if found is None or not self._open(found):
            return None
        return found.identity

    def check(self) -> None:
        """Asserts that the window's slots in use are exactly those the pins in this table hold
        (none leaked: a pin leaves the table only through _live(), which frees its slots) and no
        more than all peers may pin. O(pins): run after every Pin and Release."""
        if self.window is None:
            return
        self.window.check()
        held = sum(len(pin.window) for pin in self._leases.values())
        assert held == self.window.in_use, f"export window: {self.window.in_use} slots in use, pins hold {held}"
        assert held <= self.window.slot_count, "export window: more slots in use than it has"


class TokenBucket:
    """Bytes one peer may still be served: refills at `rate` bytes per second up to `burst`, starts
    full. Time is whatever `now` the caller passes (PeerBudget's clock), so tests need no sleeps."""

    def __init__(self, rate: float, burst: float, now: float):
        self.rate, self.burst = rate, burst
        self.tokens, self.stamp = float(burst), now

    def level(self, now: float) -> float:
        if now > self.stamp:
            self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
            self.stamp = now
        return self.tokens

    def take(self, sizes: list[int], now: float) -> int:
        """How many of `sizes` (byte counts), from the first, the bucket covers now; takes their
        bytes. Never waits and never goes below zero: what does not fit is not taken."""
        available, count, total = self.level(now), 0, 0
        for size in sizes:
            if total + size > available:
                break
            total += size
            count += 1
        self.tokens -= total
        return count

    def refund(self, amount: int) -> None:
        """Gives back bytes taken but not served after all."""
        self.tokens = min(self.burst, self.tokens + amount)


@dataclasses.dataclass
class _PeerState:
    bucket: TokenBucket | None
    logged: dict = dataclasses.field(default_factory=dict)   # reason -> [time of the last line, refusals since]


class PeerBudget:
    """The owner's budget of each peer identity (peer_identity(): its certificate), beyond PeerPins:

    - calls in flight: at most `max_inflight` at once (enter() refuses the next, leave() ends one);
    - bytes per second: a TokenBucket of `bytes_per_s` per second, `burst` saved up at most (0:
      unlimited), charged by take() with the block bytes a call is about to serve.

    Nothing here waits: over a bound the caller refuses the call, so a peer never makes the owner hold
    anything while it waits. State is bounded: the buckets (and log throttles) of at most
    `max_tracked` identities, least recently seen forgotten (a forgotten identity comes back with a
    full bucket, as after a second of quiet); in-flight counts exist only while calls run. Event loop
    only; `clock` (monotonic seconds) is injectable."""

    def __init__(self, max_inflight: int, bytes_per_s: int, burst: int, clock=time.monotonic,
                 max_tracked: int = MAX_TRACKED_PEERS, log_every_s: float = REFUSAL_LOG_EVERY_S):
        self.max_inflight = max_inflight
        self.bytes_per_s = bytes_per_s
        self.burst = max(burst, bytes_per_s)
        self.clock = clock
        self.max_tracked = max_tracked
        self.log_every_s = log_every_s
        self._inflight: dict[str, int] = {}
        self._peers: collections.OrderedDict[str, _PeerState] = collections.OrderedDict()

    def _state(self, identity: str) -> _PeerState:
        state = self._peers.get(identity)
        if state is None:
            bucket = TokenBucket(self.bytes_per_s, self.burst, self.clock()) if self.bytes_per_s else None
            state = self._peers[identity] = _PeerState(bucket)
            while len(self._peers) > self.max_tracked:
                self._peers.popitem(last=False)
        else:
            self._peers.move_to_end(identity)
        return state

    def tracked(self) -> int:
        return len(self._peers)

    # -- calls in flight
    def enter(self, identity: str) -> bool:
        """Counts a call of `identity` in flight, unless it has max_inflight already (False)."""
        running = self._inflight.get(identity, 0)
        if running >= self.max_inflight:
            return False
        self._inflight[identity] = running + 1
        return True

    def leave(self, identity: str) -> None:
        running = self._inflight.pop(identity) - 1
        if running > 0:
            self._inflight[identity] = running

    def inflight(self, identity: str | None = None) -> int:
        return self._inflight.get(identity, 0) if identity is not None else sum(self._inflight.values())

    # -- bytes per second
    def take(self, identity: str, sizes: list[int]) -> int:
        """How many of the blocks (`sizes`, from the first) `identity` may be served now; charged."""
        if not self.bytes_per_s:
            return len(sizes)
        return self._state(identity).bucket.take(sizes, self.clock())

    def refund(self, identity: str, amount: int) -> None:
        state = self._peers.get(identity)
        if amount > 0 and state is not None and state.bucket is not None:
            state.bucket.refund(amount)

    def level(self, identity: str) -> float:
        """Bytes `identity` may be served now (inf: unlimited)."""
        if not self.bytes_per_s:
            return float("inf")
        return self._state(identity).bucket.level(self.clock())

    # -- log throttle
    def log_due(self, identity: str, reason: str) -> int | None:
        """None: do not log this refusal (one of `identity`'s for `reason` was logged less than
        log_every_s ago; it is counted); else log it, with the count of those not logged since."""
        now = self.clock()
        entry = self._state(identity).logged.setdefault(reason, [None, 0])
        if entry[0] is not None and now - entry[0] < self.log_every_s:
            entry[1] += 1
            return None
        suppressed, entry[0], entry[1] = entry[1], now, 0
        return suppressed


@dataclasses.dataclass
class PeerServiceCounters:
    """The owner side's counters (metrics: kvtier_peer_<name>_total)."""
    served_bytes: int = 0       # block bytes served to peers: streamed by Fetch, copied to the window by Pin
    refused_pins: int = 0       # Pin and Fetch calls refused: the peer, or all peers, held their share of pins
    refused_inflight: int = 0   # Has, Pin and Fetch calls refused: the peer had peers.max_inflight_per_peer running
    refused_rate: int = 0       # Pin and Fetch calls refused: the peer was served its peers.max_bytes_per_s_per_peer


# -- owner side -------------------------------------------------------------------------------
class PeerService(pb_grpc.KvTierPeerServicer):
    """The peer API. Every Has, Pin and Fetch counts against the calling peer's budget (PeerBudget:
    calls in flight, bytes per second) and Pin and Fetch against its pins (PeerPins); over any of
    them the call is refused with RESOURCE_EXHAUSTED at once (a Pin is cut short first where a
    shorter one fits), counted in self.counters and logged at most once per REFUSAL_LOG_EVERY_S per
    peer and reason. Hello and Release are not budgeted: Release only gives back."""

    def __init__(self, cfg: Config, store: BlockStore, transport, validator, clock=time.monotonic):
        self.cfg = cfg
        self.store = store
        self.transport = transport
        self.check = validator
        self.key = macs.cluster_key(cfg)  # None: blocks are served without a MAC
        # Pin serves from the export window (NixlPeers); without one (the gRPC transport) only Fetch serves.
        self.window = getattr(transport, "window", None)
        self.pins = PeerPins(store, PINS_PER_FETCH * cfg.peers.max_blocks_per_fetch, window=self.window)
        # Burst: a second's worth, and at least one block of the largest size (a slot).
        self.budget = PeerBudget(cfg.peers.max_inflight_per_peer, cfg.peers.max_bytes_per_s_per_peer,
                                 store.arena.slot_bytes, clock=clock)
        self.counters = PeerServiceCounters()
        store.peer_service = self  # metrics read self.counters (store.peers is the requester side)
        self.served: collections.Counter[str] = collections.Counter()  # Has, Pin, Fetch calls answered (debug log)
        rate = cfg.peers.max_bytes_per_s_per_peer
        log.info("peer API: served blocks carry %s; each peer pins at most %d blocks, all peers 1/%d of the arena%s; "
                 "each peer has at most %d calls in flight and is served %s",
                 f"MACs under cluster key {macs.key_id(self.key)}" if self.key else "no MAC (no cluster.key_file)",
                 self.pins.per_peer, PEER_PIN_SHARE,
                 f"; Pin copies blocks into the {self.window.slot_count}-slot export window" if self.window
                 else "; no NIXL export window: Pin is refused, Fetch serves",
                 self.budget.max_inflight,
                 f"at most {_size(rate)}/s (bursts of {_size(self.budget.burst)})" if rate
                 else "without a byte rate bound")
        if 0 < rate < store.arena.slot_bytes:
            log.warning("peers.max_bytes_per_s_per_peer = %d: less than one %s block per second per peer", rate,
                        _size(store.arena.slot_bytes))

    async def Hello(self, request, context):
        """Where this node's export window is (the arena_* fields of the message describe the window,
        not the arena) and the metadata of the agent registered over it; both empty without one."""
        window = self.window
        log.info("peer %s (%s) said hello from %s", printable(request.node_id, 64) or "?", peer_identity(context),
                 printable(context.peer()))
        if window is None:
            return pb.PeerHelloResponse(node_id=node_id(self.cfg), generation=self.store.arena.generation,
                                        slot_bytes=self.store.arena.slot_bytes)
        return pb.PeerHelloResponse(
            node_id=node_id(self.cfg), generation=self.store.arena.generation,
            arena_address=self.transport.export_address,  # in the export agent's address space
            arena_size=window.size_bytes, slot_bytes=window.slot_bytes, nixl_metadata=self.transport.export_metadata())

    def _served(self, call: str, context) -> None:
        self.served[call] += 1
        if log.isEnabledFor(logging.DEBUG):
            log.debug("peer API: %s #%d from %s", call, self.served[call], peer_identity(context))

    async def Has(self, request, context):
        self._served("Has", context)
        return await self._guard(context, self._has, request, budget=peer_identity(context))

    async def _has(self, request):
        namespace = self.check.namespace(request.namespace)
        found = self.store.catalog.namespaces.get(namespace)
        if found is None:
            return pb.PeerHasResponse()
        matched = len(self.store.catalog.lookup(namespace, self.check.keys(request.keys)))
        return pb.PeerHasResponse(matched=matched, attributes=found.attributes)

    async def Pin(self, request, context):
        self._served("Pin", context)
        identity = peer_identity(context)
        return await self._guard(context, self._pin, request, identity, budget=identity)

    async def _pin(self, request, identity: str):
        namespace = self.check.namespace(request.namespace)
        keys = self.check.keys(request.keys)
        if len(keys) > self.cfg.peers.max_blocks_per_fetch:
            raise invalid(
                           f"at most peers.max_blocks_per_fetch={self.cfg.peers.max_blocks_per_fetch} keys")
        lease_ms = min(request.lease_ms or self.cfg.peers.lease_ms, self.cfg.peers.lease_ms)
        self.store.catalog.namespace(namespace)  # NOT_FOUND before any bound is charged
        if self.window is None:
            raise precondition("this node has no NIXL export window (peers.transport is grpc, or NIXL is "
                               "missing): use Fetch")
        sizes = self._sizes(namespace, keys)
        if not sizes:  # nothing to serve: nothing charged, nothing pinned
            return pb.PeerPinResponse(generation=self.store.arena.generation)
        part = self.store.part_of(namespace)
        charged = self._charge(identity, sizes, "Pin")  # the bytes the peer may READ from the window
        try:
            granted = self._grant(identity, part, len(charged))
        except BaseException:
            self.budget.refund(identity, sum(charged))
            raise
        held = pin = None
        blocks: list = []
        sealed: list[bytes] = []
        try:
            held, found = await self.store.acquire(namespace, keys[:granted], lease_ms)
            if held is not None:
                held.owner = PEER_OWNER
        except BaseException:
            self.budget.refund(identity, sum(charged))
            raise
        finally:
            pin = self.pins.settle(identity, part, granted, held, copying=True)
        try:
            blocks = _found_prefix_of(found) if pin is not None else []
            slots = self.pins.fill(pin, len(blocks)) if blocks else []
            blocks = blocks[:len(slots)]
            sealed = await self._export(namespace, blocks, slots)
            if held is not None and self.store.leases.get(held.id) is not held:
                # Expired while copying (a peer asked for a lease shorter than the copy): the arena
                # slots may have been reused under the copy, so nothing of it is served.
                log.warning("peer %s: a pin of %d blocks expired before they were copied; nothing served",
                            identity, len(blocks))
                sealed = []
        except BaseException:  # cancelled (the peer's deadline) or failed: nothing is served
            sealed = []
            raise
        finally:
            if pin is not None:
                self.pins.trim(pin, len(sealed))
            if held is not None and not sealed and self.store.leases.get(held.id) is held:
                self.store.release(held.id)  # nothing served: nothing for the peer to release
            self.pins.done(pin)
            self.pins.check()
            served = sum(block.length for block in blocks[:len(sealed)])
            self.counters.served_bytes += served
            self.budget.refund(identity, sum(charged) - served)  # charged for blocks not served after all
        answer = [self._peer_block(block, mac, slot) for block, mac, slot in zip(blocks, sealed, slots)]
        return pb.PeerPinResponse(lease_id=held.id if held is not None and sealed else 0,
                                  generation=self.store.arena.generation, blocks=answer)

    def _grant(self, identity: str, part: int, want: int) -> int:
        granted = self.pins.grant(identity, part, want)
        if granted:
            return granted
        self.counters.refused_pins += 1
        self._log_refusal(identity, "pins", "pin refused: it holds %d blocks pinned here (at most %d per peer), all "
                          "peers %d of this arena part (at most %d)", self.pins.pinned(identity), self.pins.per_peer,
                          self.pins.pinned(part=part), self.pins.part_cap(part))
        raise exhausted("this node holds as many blocks pinned for peers as it allows; release some, or wait "
                        "for their leases to expire")

    def _sizes(self, namespace: str, keys: list[bytes]) -> list[int]:
        """The lengths of the blocks of the stored prefix of `keys` (what acquire() would find now)."""
        sizes = []
        for key in keys:
            block = self.store.catalog.get(namespace, key)
            if block is None:
                break
            sizes.append(block.length)
        return sizes

    def _charge(self, identity: str, sizes: list[int], call: str) -> list[int]:
        """Charges the peer's byte budget for the longest prefix of the blocks (`sizes`) it covers now
        and returns their sizes; RESOURCE_EXHAUSTED (counted, logged) when not even the first fits."""
        charged = sizes[:self.budget.take(identity, sizes)]
        if charged or not sizes:
            return charged
        self.counters.refused_rate += 1
        self._log_refusal(identity, "rate", "%s refused: it was served its peers.max_bytes_per_s_per_peer (%s "
                          "per second, bursts of %s); %s left for now, the next block is %s", call,
                          _size(self.budget.bytes_per_s), _size(self.budget.burst),
                          _size(self.budget.level(identity)), _size(sizes[0]))
        raise exhausted("this peer was served as many bytes per second as this node allows it "
                        "(peers.max_bytes_per_s_per_peer); try again later")

    def _enter(self, identity: str, call: str) -> None:
        """Counts the peer's call in flight; RESOURCE_EXHAUSTED (counted, logged) past its bound."""
        if self.budget.enter(identity):
            return
        self.counters.refused_inflight += 1
        self._log_refusal(identity, "inflight", "%s refused: it has %d calls in flight here (at most "
                          "peers.max_inflight_per_peer = %d)", call, self.budget.inflight(identity),
                          self.budget.max_inflight)
        raise exhausted(f"this peer has peers.max_inflight_per_peer={self.budget.max_inflight} calls in flight "
                        "on this node; try again when one has ended")

    def _log_refusal(self, identity: str, reason: str, message: str, *args) -> None:
        """A warning for a refused call, at most one per REFUSAL_LOG_EVERY_S per peer and reason (the
        next line says how many were not logged)."""
        suppressed = self.budget.log_due(identity, reason)
        if suppressed is None:
            return
        more = f" ({suppressed} more such refusals of this peer not logged since the last line)" if suppressed else ""
        log.warning("peer %s: " + message + "%s", identity, *args, more)

    async def _seal(self, namespace: str, blocks: list) -> list[bytes | None]:
        """The MAC of each block (b"" without a cluster key), over its bytes in the arena after they
        matched its checksum; None from the first block that does not match (not served: a node
        vouches only for bytes it verified). Large batches are hashed on worker threads."""
        if self.key is None:
            return [b""] * len(blocks)
        items = [(block.key, self.store.cpu.view(block)[:block.length], block.checksum) for block in blocks]
        if sum(block.length for block in blocks) <= macs.OFF_LOOP_BYTES:
            sealed = _seal_blocks(self.key, namespace, items)
        else:
            groups = [items[i::VERIFY_THREADS] for i in range(VERIFY_THREADS)]
            done = await asyncio.gather(*(asyncio.to_thread(_seal_blocks, self.key, namespace, g) for g in groups))
            sealed = _interleaved(done, len(items))
        return _served_prefix(namespace, blocks, sealed)

    async def _export(self, namespace: str, blocks: list, slots: list[int]) -> list[bytes]:
        """Copies each block from the arena into its window slot, after (with a cluster key) its
        arena bytes matched its checksum and were MACed: the MAC is over the arena's bytes, which
        no peer can write, never over the window's, which any peer can. Returns the MACs (b""
        without a key) of the blocks served, from the first, up to the first whose bytes do not
        match (that one and the rest are not copied). Large batches run on worker threads;
        returns only once no thread copies any more, even when the call is cancelled."""
        arena, window = self.store.arena, self.window
        items = [(block.key, self.store.cpu.view(block)[:block.length],
                  arena.address + self.store.cpu.slot_of(block) * arena.slot_bytes, slot, block.length,
                  block.checksum) for block, slot in zip(blocks, slots)]
        if sum(block.length for block in blocks) <= macs.OFF_LOOP_BYTES:
            sealed = _export_blocks(self.key, namespace, window, items)
        else:
            groups = [items[i::VERIFY_THREADS] for i in range(VERIFY_THREADS)]
            work = asyncio.ensure_future(asyncio.gather(
                *(asyncio.to_thread(_export_blocks, self.key, namespace, window, g) for g in groups)))
            try:
                done = await asyncio.shield(work)
            finally:
                if not work.done():  # cancelled: the threads still write the window slots
                    await asyncio.wait([work])
            sealed = _interleaved(done, len(items))
        return _served_prefix(namespace, blocks, sealed)

    def _peer_block(self, block, mac: bytes | None = b"", slot: int = 0) -> pb.PeerBlock:
        """`slot`: the block's export window slot (Pin); 0 for Fetch, which sends the bytes."""
        if block is None or mac is None:
            return pb.PeerBlock()
        return pb.PeerBlock(found=True, slot=slot, length=block.length, checksum=block.checksum,
                            parent=block.parent, retention=retention_message(block.retention), mac=mac,
                            token_ids=unpack_token_ids(block.token_ids) if block.token_ids else (),
                            origin=origin_message(block.origin))

    async def Release(self, request, context):
        return await self._guard(context, self._release, request, peer_identity(context))

    async def _release(self, request, identity: str):
        held = self.store.leases.get(request.lease_id)
        # Only the peer that pinned it: another peer's id (or a local client's lease) reads as not held.
        if held is not None and held.owner == PEER_OWNER and self.pins.owner_of(request.lease_id) == identity:
            self.store.release(request.lease_id)
            self.pins.sweep()  # its window slots go back now
            self.pins.check()
        return pb.ReleaseResponse()

    async def Fetch(self, request, context):
        self._served("Fetch", context)
        identity = peer_identity(context)
        try:
            self._enter(identity, "Fetch")
        except ApiError as exc:
            await context.abort(grpc_code(exc), exc.message)
        try:  # one of the peer's calls in flight until the stream ends, however it ends
            try:
                namespace = self.check.namespace(request.namespace)
                keys = self.check.keys(request.keys)
                if len(keys) > self.cfg.peers.max_blocks_per_fetch:
                    raise invalid(f"at most peers.max_blocks_per_fetch={self.cfg.peers.max_blocks_per_fetch} keys")
                self.store.catalog.namespace(namespace)
            except ApiError as exc:
                await context.abort(grpc_code(exc), exc.message)
            part = self.store.part_of(namespace)
            step = self.cfg.limits.put_chunk_bytes
            for index, key in enumerate(keys):  # one block pinned at a time: a slow reader pins little
                sizes = self._sizes(namespace, [key])
                if not sizes:
                    return  # the chain ends here
                try:
                    charged = self._charge(identity, sizes, "Fetch")[0]  # this block's bytes, before it is promoted
                    try:
                        granted = self._grant(identity, part, 1)
                    except ApiError:
                        self.budget.refund(identity, charged)
                        raise
                except ApiError as exc:  # the blocks streamed so far stay good: the requester keeps them
                    await context.abort(grpc_code(exc), exc.message)
                held, sent = None, 0
                try:
                    try:
                        held, found = await self.store.acquire(namespace, [key], self.cfg.peers.lease_ms)
                    finally:
                        self.pins.settle(identity, part, granted, held)
                    if held is None:
                        return  # the chain ends here
                    block, view = found[0], self.store.cpu.view(found[0])
                    mac = (await self._seal(namespace, [block]) or [None])[0]
                    if mac is None:
                        return  # bytes that fail their checksum are not served; the chain ends here
                    for start in range(0, max(block.length, 1), step):  # the first chunk carries the PeerBlock
                        data = bytes(view[start:min(start + step, block.length)])
                        sent += len(data)
                        yield pb.PeerFetchChunk(index=index, data=data,
                                                block=self._peer_block(block, mac) if start == 0 else None)
                finally:
                    self.counters.served_bytes += sent
                    self.budget.refund(identity, charged - sent)  # a block not (wholly) streamed after all
                    if held is not None and self.store.leases.get(held.id) is held:  # not expired under a slow reader
                        self.store.release(held.id)
        finally:
            self.budget.leave(identity)

    async def _guard(self, context, fn, request, *args, budget: str | None = None):
        """ApiError becomes its status; a broken invariant (AssertionError, e.g. PeerPins.check)
        stops the daemon through store.fatal, as on the client API. With `budget` (a peer identity)
        the call counts as one of that peer's calls in flight, or is refused past its bound."""
        try:
            if budget is None:
                return await fn(request, *args)
            self._enter(budget, fn.__name__.lstrip("_").capitalize())
            try:
                return await fn(request, *args)
            finally:
                self.budget.leave(budget)
        except ApiError as exc:
            await context.abort(grpc_code(exc), exc.message)
        except AssertionError as exc:
            self.store.fatal(f"peer {fn.__name__.lstrip('_')}: invariant broken: {exc!r}", exc)
            raise


# -- requester side ---------------------------------------------------------------------------
@dataclasses.dataclass
class PeerCounters:
    asked: int = 0              # Has calls
    fetches: int = 0            # pulls started
    fetched_blocks_nixl: int = 0
    fetched_blocks_grpc: int = 0
    fetched_bytes: int = 0
    failures: int = 0           # calls or transfers that failed or timed out
    corrupt_blocks: int = 0     # failed their checksum on arrival; dropped
    mac_rejected: int = 0       # arrived with a missing or wrong MAC (cluster key set); dropped, peer skipped
    refused_namespaces: int = 0  # the peer's namespace has other attributes (another model)
    abandoned_reads: int = 0    # READs still in flight at their deadline (their slots wait until they settle)
    unknown_peer: int = 0       # pulls that named a peer (LookupRequest.peer) that is no configured peer: none asked


@dataclasses.dataclass
class PeerLink:
    address: str
    stub: pb_grpc.KvTierPeerStub
    channel: grpc.aio.Channel
    hello: pb.PeerHelloResponse | None = None
    agent: str = ""             # the peer's NIXL agent name in our transport
    down_until: float = 0.0
    mac_rejected: int = 0       # pulls from this peer refused for a missing or wrong MAC
    node_id: str = ""           # what its Hello said (kept across restarts: names it for a named pull)


class PeerFetcher:
    def __init__(self, cfg: Config, store: BlockStore, transport, why_no_nixl: str):
        self.cfg = cfg
        self.store = store
        self.transport = transport
        self.why_no_nixl = why_no_nixl
        self.key = macs.cluster_key(cfg)  # None: blocks from peers are checked by checksum only
        if self.key is not None:
            log.info("peers: pulled blocks must carry a MAC under cluster key %s", macs.key_id(self.key))
        else:
            log.warning("peers: no cluster.key_file: blocks pulled from peers are checked by checksum only "
                        "(any holder of a peer certificate can plant blocks; docs/peers.md)")
        self.counters = PeerCounters()
        self.withheld_slots = 0  # destination slots of abandoned READs, back in the pool once they settle
        credentials = channel_credentials(cfg)
        options = [("grpc.max_receive_message_length", cfg.server.max_message_bytes),
                   ("grpc.max_send_message_length", cfg.server.max_message_bytes)]
        self._verifier = concurrent.futures.ThreadPoolExecutor(VERIFY_THREADS, thread_name_prefix="kvtier-peer-verify")
        self._background: set[asyncio.Task] = set()  # Release calls not waited for
        self.links = []
        for address in cfg.peers.addresses:
            channel = grpc.aio.secure_channel(address, credentials, options=options)
            self.links.append(PeerLink(address, pb_grpc.KvTierPeerStub(channel), channel))
        self._next = 0
        self._unknown_logged: set[str] = set()  # unknown peer names already logged (at most MAX_UNKNOWN_LOGGED)

    @property
    def transport_name(self) -> str:
        return "nixl" if self.transport is not None else "grpc"

    def mac_rejected_by_peer(self) -> dict[str, int]:
        """Pulls refused for a missing or wrong MAC, per peer address (peers.addresses)."""
        return {link.address: link.mac_rejected for link in self.links}

    async def close(self) -> None:
        if self._background:  # Releases in flight, each bounded by peers.timeout_s
            await asyncio.wait(list(self._background))
        for link in self.links:
            await link.channel.close()
        if self.transport is not None:
            await asyncio.to_thread(self.transport.close)  # waits for in-flight READs (bounded)
        await asyncio.to_thread(self._verifier.shutdown)

    async def fetch(self, namespace: str, keys: list[bytes], start: int, peer: str = "") -> int:
        """Pulls keys[start:] (at most max_blocks_per_fetch) from the peer holding most of it, or
        with `peer` (an address in peers.addresses or a peer's node id) from that peer only; returns
        how many landed here, verified and committed (always a prefix of keys[start:]). A `peer` that
        names no configured peer pulls nothing and asks nobody (counted, logged once per name)."""
        want = keys[start:start + self.cfg.peers.max_blocks_per_fetch]
        attributes = self.store.catalog.namespace(namespace).attributes
        if peer:
            named = await self._named(peer)
            if named is None:
                return 0
            candidates = [named] if named.down_until <= time.monotonic() else []
        else:
            candidates = self._candidates()
        link, matched = await self._best_peer(namespace, want, attributes, candidates)
        if link is None:
            return 0
        self.counters.fetches += 1
        try:  # every call and transfer below carries its own peers.timeout_s
            if self.transport is not None and await self._ensure_hello(link) and link.agent:
                return await self._pull_nixl(link, namespace, want[:matched])
            return await self._pull_grpc(link, namespace, want[:matched])
        except ApiError as exc:  # no local room for the pull: not the peer's fault
            log.warning("pull of %d blocks from %s skipped: %s", matched, link.address, exc.message)
            return 0
        except Exception as exc:  # noqa: BLE001 - any peer or transfer failure is a miss, never an error
            self._failed(link, f"pull of {matched} blocks", exc)
            return 0

    # -- which peer -----------------------------------------------------------------------------
    def _candidates(self) -> list[PeerLink]:
        now = time.monotonic()
        alive = [link for link in self.links if link.down_until <= now]
        self._next = (self._next + 1) % max(1, len(alive))
        rotated = alive[self._next:] + alive[:self._next]  # spread load across equally good peers
        return rotated[:self.cfg.peers.max_fanout]

    async def _named(self, name: str) -> PeerLink | None:
        """The configured peer `name` names: its address in peers.addresses, else its node id as its
        Hello said (peers not yet greeted, and not in their backoff, are greeted first: once each).
        None, counted and logged once per name, when no configured peer has that name."""
        for link in self.links:
            if link.address == name:
                return link
        now = time.monotonic()
        unknown = [link for link in self.links if not link.node_id and link.down_until <= now]
        if unknown and not any(link.node_id == name for link in self.links):
            await asyncio.gather(*(self._learn_node_id(link) for link in unknown))
        for link in self.links:
            if link.node_id == name:
                return link
        self.counters.unknown_peer += 1
        if name[:256] not in self._unknown_logged and len(self._unknown_logged) < MAX_UNKNOWN_LOGGED:
            self._unknown_logged.add(name[:256])
            log.warning("a pull named peer %r, which is neither an address in peers.addresses nor a peer's node "
                        "id: answered from local blocks, no peer asked (logged once per name)",
                        printable(name, 128))
        return None

    async def _learn_node_id(self, link: PeerLink) -> None:
        try:
            if self.transport is not None:
                await self._ensure_hello(link)  # also loads its NIXL agent, which a pull needs anyway
            else:
                hello = await link.stub.Hello(pb.PeerHelloRequest(node_id=node_id(self.cfg)),
                                              timeout=self.cfg.peers.timeout_s)
                link.node_id = hello.node_id
        except Exception as exc:  # noqa: BLE001 - a peer that does not answer names nobody
            self._failed(link, "Hello", exc)

    async def _best_peer(self, namespace: str, want: list[bytes], attributes: dict, candidates: list[PeerLink]):
        answers = await asyncio.gather(*(self._has(link, namespace, want) for link in candidates))
        best, best_matched = None, 0
        for link, answer in zip(candidates, answers):
            if answer is None or answer.matched == 0:
                continue
            if dict(answer.attributes) != attributes:
                self.counters.refused_namespaces += 1
                log.warning("peer %s holds %s with other attributes (%s vs ours %s): not used",
                            link.address, namespace, printable(dict(answer.attributes), 512), attributes)
                continue
            if answer.matched > best_matched:
                best, best_matched = link, min(answer.matched, len(want))
        return best, best_matched

    async def _has(self, link: PeerLink, namespace: str, want: list[bytes]):
        self.counters.asked += 1
        try:
            return await link.stub.Has(pb.PeerHasRequest(namespace=namespace, keys=want),
                                       timeout=self.cfg.peers.timeout_s)
        except grpc.aio.AioRpcError as exc:
            self._failed(link, "Has", exc)
            return None

    async def _ensure_hello(self, link: PeerLink) -> bool:
        """Loads the peer's export window metadata once per peer (again after the peer restarted)."""
        if link.hello is not None:
            return True
        # Our NIXL metadata stays here: the owner needs none to be READ from, and our reader agent's
        # would let the owner READ and WRITE our whole arena (NIXL registers memory for both; docs/peers.md).
        hello = await link.stub.Hello(pb.PeerHelloRequest(node_id=node_id(self.cfg)),
                                      timeout=self.cfg.peers.timeout_s)
        link.hello, link.agent, link.node_id = hello, "", hello.node_id
        if hello.nixl_metadata and hello.arena_address:
            link.agent = await asyncio.to_thread(self.transport.add_peer, hello.nixl_metadata)
            log.info("peer %s (%s): NIXL agent %s loaded", link.address, printable(hello.node_id, 64),
                     printable(link.agent))
        else:
            log.warning("peer %s (%s) has no NIXL: pulling from it over gRPC", link.address,
                        printable(hello.node_id, 64))
        return True

    def _failed(self, link: PeerLink, what: str, exc: BaseException) -> None:
        self.counters.failures += 1
        link.down_until = time.monotonic() + PEER_BACKOFF_S
        link.hello = None  # re-hello after the backoff: the peer may have restarted
        detail = exc.details() if isinstance(exc, grpc.aio.AioRpcError) else (str(exc) or type(exc).__name__)
        log.warning("peer %s: %s failed (%s); skipping it for %.0fs", link.address, what, printable(detail, 256),
                    PEER_BACKOFF_S)

    # -- pulls ----------------------------------------------------------------------------------
    async def _pull_nixl(self, link: PeerLink, namespace: str, want: list[bytes]) -> int:
        held = await self.store.allocate(len(want), ALLOCATE_WAIT_MS, self.cfg.peers.lease_ms,
                                         self.store.part_of(namespace))
        pin = None
        try:
            pin = await link.stub.Pin(pb.PeerPinRequest(namespace=namespace, keys=want,
                                                        lease_ms=self.cfg.peers.lease_ms),
                                      timeout=self.cfg.peers.timeout_s)
            if pin.generation != link.hello.generation:
                raise OSError("the peer restarted (new arena generation); hello again next time")
            blocks = _found_prefix(pin.blocks)[:len(want)]
            if not blocks:
                return await self._commit(link, held, namespace, [], [], 0, None)
            signed = self._signed(blocks)  # a block without a MAC is not worth READing
            verified, why = await self._nixl_read(link, held, blocks[:signed], namespace, want) \
                if signed else (0, None)
            if why is None and signed < len(blocks):
                why = FORGED
        except BaseException:
            self._abort(held)
            raise
        finally:
            if pin is not None and pin.lease_id:  # the READs are over: nothing waits for the Release
                self._in_background(self._release_remote(link, pin.lease_id))
        landed = await self._commit(link, held, namespace, want, blocks, verified, why)
        self.counters.fetched_blocks_nixl += landed
        return landed

    def _signed(self, blocks: list[pb.PeerBlock]) -> int:
        """How many blocks, from the first, carry a MAC of the right size (all without a cluster key)."""
        if self.key is None:
            return len(blocks)
        for index, block in enumerate(blocks):
            if len(block.mac) != macs.MAC_BYTES:
                return index
        return len(blocks)

    async def _nixl_read(self, link: PeerLink, held, blocks: list[pb.PeerBlock], namespace: str,
                         want: list[bytes]) -> tuple[int, str | None]:
        """READs the blocks from the owner's export window slots (Hello's arena_address,
        arena_size and slot_bytes describe the window) into the allocation's slots, verifying them
        as they land; returns how many blocks, from the first, landed with their checksum (and
        MAC), and why the next failed."""
        local, remote = self.store.arena, link.hello
        pairs = []
        for slot, block in zip(held.items, blocks):
            if block.length > local.slot_bytes or block.length > remote.slot_bytes \
                    or (block.slot + 1) * remote.slot_bytes > remote.arena_size:
                raise OSError(f"peer {link.address} described a block outside its export window")
            pairs.append((local.address + slot * local.slot_bytes,
                          remote.arena_address + block.slot * remote.slot_bytes, block.length))
        checks = _checks(held.items, blocks, want)
        reading = asyncio.ensure_future(asyncio.to_thread(self._read_verified, link.agent, pairs, namespace, checks))
        try:
            return await asyncio.shield(reading)
        finally:
            if not reading.done():
                # The caller went away, but the READ still targets our slots: they may be reused
                # only after it returns, which its own timeout bounds.
                await asyncio.wait([reading])
            failure = None if reading.cancelled() else reading.exception()
            if isinstance(failure, TransferAbandoned):
                self._withhold(held, failure.settled)

    def _read_verified(self, agent: str, pairs: list[tuple[int, int, int]], namespace: str,
                       checks: list[tuple]) -> tuple[int, str | None]:
        """Worker thread: READs the pairs in pieces (within the transport's per-read bounds) and has
        each piece verified in the verifier pool while the next one is read. Returns how many blocks,
        from the first, landed with their checksum (and MAC), and why the next one failed (None: none
        failed); stops reading after a block that failed. Returns or raises only once no
        verification is reading the slots any more."""
        pieces = _pieces(pairs)
        verifying: list[concurrent.futures.Future] = []
        try:
            for start, end in pieces:
                if any(f.done() and f.result()[1] is not None for f in verifying):
                    break  # a block already failed: what follows it would be dropped anyway
                self.transport.read(agent, pairs[start:end], self.cfg.peers.timeout_s)
                verifying.append(self._verifier.submit(self._verify, namespace, checks[start:end]))
        finally:
            concurrent.futures.wait(verifying)
        good = 0
        for future in verifying:
            ok, why = future.result()
            good += ok
            if why is not None:
                return good, why
        return good, None

    def _verify(self, namespace: str, checks: list[tuple]) -> tuple[int, str | None]:
        """Verifier thread: how many of the blocks (checks: (slot, length, checksum, mac, key)), from
        the first, match their checksum and, with a cluster key, their MAC; and why the next one
        does not (CORRUPT or FORGED; None when all do). Checked on the bytes in our own slots, which
        nothing else writes: what is verified is what is committed."""
        arena = self.store.arena
        for index, (slot, length, expected, mac, key) in enumerate(checks):
            data = arena.view(slot)[:length]
            if checksum(data) != expected:
                return index, CORRUPT
            if self.key is not None and not macs.verify_block(self.key, namespace, key, data, mac):
                return index, FORGED
        return len(checks), None

    def _in_background(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background_done)

    def _background_done(self, task: asyncio.Task) -> None:
        self._background.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("peer call in the background failed: %s", printable(repr(task.exception()), 256))

    def _withhold(self, held, settled) -> None:
        """A READ still in flight may land late: its slots leave the pool until it settles."""
        if self.store.allocations.take(held.id) is None:
            return
        self.counters.abandoned_reads += 1
        self.withheld_slots += len(held.items)
        log.error("a NIXL READ outlived its deadline: %d arena slots withheld until it settles", len(held.items))
        asyncio.get_running_loop().create_task(self._return_when_settled(held.items, settled))

    async def _return_when_settled(self, slots: list[int], settled) -> None:
        while not settled.is_set():
            await asyncio.sleep(0.1)
        self.store.cpu.unreserve(slots)
        self.withheld_slots -= len(slots)
        log.info("an abandoned NIXL READ settled: %d arena slots back in use", len(slots))

    def _abort(self, held) -> None:
        if self.store.allocations.get(held.id) is not None:
            self.store.abort(held.id)

    async def _release_remote(self, link: PeerLink, lease_id: int) -> None:
        try:
            await link.stub.Release(pb.ReleaseRequest(lease_id=lease_id), timeout=self.cfg.peers.timeout_s)
        except grpc.aio.AioRpcError as exc:  # the owner's lease expires by itself
            log.info("peer %s: Release of lease %d failed (%s); it will expire", link.address, lease_id,
                     exc.code().name)

    async def _pull_grpc(self, link: PeerLink, namespace: str, want: list[bytes]) -> int:
        held = await self.store.allocate(len(want), ALLOCATE_WAIT_MS, self.cfg.peers.lease_ms,
                                         self.store.part_of(namespace))
        blocks: list[pb.PeerBlock] = []
        broken, filled = None, 0
        try:
            call = link.stub.Fetch(pb.PeerFetchRequest(namespace=namespace, keys=want),
                                   timeout=self.cfg.peers.timeout_s * 2)
            async for chunk in call:
                filled = self._take_chunk(chunk, held.items, blocks, filled)
        except grpc.aio.AioRpcError as exc:
            broken = exc  # the blocks that arrived whole are still good once verified
        except BaseException:
            self._abort(held)
            raise
        if blocks and filled != blocks[-1].length:
            blocks.pop()  # the stream ended inside this block
        try:
            verified, why = await asyncio.get_running_loop().run_in_executor(
                self._verifier, self._verify, namespace, _checks(held.items, blocks, want))
        except BaseException:
            self._abort(held)
            raise
        landed = await self._commit(link, held, namespace, want, blocks, verified, why)
        self.counters.fetched_blocks_grpc += landed
        if broken is not None:
            self._failed(link, f"stream after {landed} of {len(want)} blocks", broken)
        return landed

    def _take_chunk(self, chunk, slots: list[int], blocks: list, filled: int) -> int:
        if chunk.HasField("block"):
            if chunk.index != len(blocks) or chunk.index >= len(slots) or (blocks and filled != blocks[-1].length):
                raise OSError("peer stream out of order")
            if chunk.block.length > self.store.arena.slot_bytes:
                raise OSError("peer sent a block larger than a slot")
            blocks.append(chunk.block)
            filled = 0
        if not blocks or chunk.index != len(blocks) - 1 or filled + len(chunk.data) > blocks[-1].length:
            raise OSError("peer stream sent bytes outside a block")
        view = self.store.arena.view(slots[len(blocks) - 1])
        view[filled:filled + len(chunk.data)] = chunk.data
        return filled + len(chunk.data)

    async def _commit(self, link: PeerLink, held, namespace: str, want: list[bytes], blocks: list[pb.PeerBlock],
                      verified: int, why: str | None) -> int:
        """Commits the prefix of the pulled blocks that passed verification on arrival (`verified`
        of them, checked by _verify against the bytes in the slots); a block that failed (`why`) is
        dropped with everything after it."""
        staged = []
        origin = next((b.origin for b in blocks[:verified] if b.origin.block_size), None)
        for key, slot, block in zip(want[:verified], held.items, blocks[:verified]):
            staged.append(Staged(key, block.parent, slot, block.length, block.checksum, _peer_retention(block),
                                 token_ids=_peer_token_ids(block, origin)))
        if verified < len(blocks) and why == FORGED:
            self.counters.mac_rejected += 1
            link.mac_rejected += 1
            log.error("block %s/%s from peer %s has a missing or wrong MAC (%d such pulls from it): dropped "
                      "with the rest of the chain; the peer serves blocks this cluster's key does not vouch for",
                      printable(namespace), want[verified].hex(), link.address, link.mac_rejected)
            self._failed(link, f"pull of {len(blocks)} blocks", OSError("a block with a missing or wrong MAC"))
        elif verified < len(blocks):
            self.counters.corrupt_blocks += 1
            log.error("block %s/%s from a peer failed verification: dropped with the rest of the chain",
                      printable(namespace), want[verified].hex())
        if not staged:
            self.store.abort(held.id)
            return 0
        statuses = await self.store.commit(held.id, namespace, staged, wait_durable=False, verified=True,
                                           origin=origin)
        self.counters.fetched_bytes += sum(s.length for s in staged)
        return sum(1 for status in statuses if status in (pb.STORED, pb.DUPLICATE))


def _pieces(pairs: list[tuple[int, int, int]]) -> list[tuple[int, int]]:
    """(start, end) index ranges of pairs, each one READ: about VERIFY_PIECE_BYTES (at least one
    block), never over the transport's MAX_PAIRS_PER_READ / MAX_BYTES_PER_READ."""
    limit = min(VERIFY_PIECE_BYTES, MAX_BYTES_PER_READ)
    out, start, size = [], 0, 0
    for index, (_, _, length) in enumerate(pairs):
        if index > start and (index - start == MAX_PAIRS_PER_READ or size + length > limit):
            out.append((start, index))
            start, size = index, 0
        size += length
    if start < len(pairs):
        out.append((start, len(pairs)))
    return out


def _checks(slots: list[int], blocks: list[pb.PeerBlock], want: list[bytes]) -> list[tuple]:
    """What _verify checks per block: (local slot, length, checksum, MAC, key)."""
    return [(slot, block.length, block.checksum, block.mac, key) for slot, block, key in zip(slots, blocks, want)]


def _export_blocks(key: bytes | None, namespace: str, window, items: list[tuple]) -> list[bytes | None]:
    """Owner, any thread: for each (block key, arena bytes, arena address, window slot, length,
    checksum), with a cluster key, the MAC of the arena bytes if they match the checksum (None for
    the first that does not and every one after it: not copied); without a key, b"". Then copies
    the block into its window slot."""
    out: list[bytes | None] = []
    with window.copying():
        for block_key, data, source, slot, length, expected in items:
            if out and out[-1] is None:
                out.append(None)
                continue
            mac = b""
            if key is not None:
                mac = macs.block_mac(key, namespace, block_key, data) if checksum(data) == expected else None
                if mac is None:
                    out.append(None)
                    continue
            window.copy(slot, source, length)
            out.append(mac)
    return out


def _seal_blocks(key: bytes, namespace: str, items: list[tuple]) -> list[bytes | None]:
    """Owner, any thread: the MAC of each (block key, bytes, checksum) whose bytes match the
    checksum; None for one that does not, and for every one after it."""
    out: list[bytes | None] = []
    for block_key, data, expected in items:
        if out and out[-1] is None or checksum(data) != expected:
            out.append(None)
            continue
        out.append(macs.block_mac(key, namespace, block_key, data))
    return out


def _found_prefix_of(found: list) -> list:
    """The catalog blocks acquire() found, up to the first key it did not."""
    out = []
    for block in found:
        if block is None:
            break
        out.append(block)
    return out


def _found_prefix(blocks) -> list[pb.PeerBlock]:
    out = []
    for block in blocks:
        if not block.found:
            break
        out.append(block)
    return out
