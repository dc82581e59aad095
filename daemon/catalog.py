"""The catalog: every block the daemon knows, by namespace and key, and which tiers hold it.

Contract: the single source of truth for Lookup, Stat and Inventory. Event loop only (no locks).
Tier bits are set only once a tier really holds a verified copy (disk: after fdatasync + index).
Restart: rebuilt from the disk tier's index; namespaces from namespaces.json in the data dir.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
import weakref

from sortedcontainers import SortedDict

from kvtier.proto.v1 import kvtier_pb2 as pb
from kvtier.tiers.block import BlockOrigin, unpack_token_ids
from kvtier.tiers.retention import Retention

from .errors import exhausted, not_found, precondition

log = logging.getLogger("kvtier.catalog")
SCAN_PAGES_PER_CALL = 64  # a filtered page call examines at most this many pages' worth of blocks
TIER_NAMES = {pb.TIER_GPU: "gpu", pb.TIER_CPU: "cpu", pb.TIER_DISK: "disk", pb.TIER_S3: "s3"}


def now_ms() -> int:
    return int(time.time() * 1000)


@dataclasses.dataclass(slots=True, eq=False)
class Block:
    namespace: str
    key: bytes
    parent: bytes
    length: int
    checksum: int
    created_ms: int
    last_access_ms: int = 0
    hits: int = 0
    tiers: int = 0
    retention: object = None  # kvtier.tiers.retention.Retention, re-applied whenever a tier installs it
    retained_ms: int = 0      # when the retention was last set: with a hit, it restarts the TTL pin
    # For KV-aware routers (docs/kv-events.md): the tokens the block holds, packed u32 little-endian
    # (tiers.block.pack_token_ids; b"" = unknown), and who stored it (shared: see `interned`).
    token_ids: bytes = b""
    origin: BlockOrigin | None = None

    def pinned_until_ms(self) -> int:
        """When the TTL pin expires (a hit or a new retention restarts it); 0 when there is none."""
        ttl_s = getattr(self.retention, "ttl_s", None)
        if not ttl_s:
            return 0
        return max(self.last_access_ms, self.retained_ms) + int(ttl_s * 1000)

    @property
    def id(self) -> tuple[str, bytes]:
        return (self.namespace, self.key)

    def info(self, readers: int = 0, write_pending: bool = False) -> pb.BlockInfo:
        """The wire form; `readers` and `write_pending` come from the CPU tier's holds (its owner)."""
        return pb.BlockInfo(namespace=self.namespace, key=self.key, parent=self.parent, length=self.length,
                            checksum=self.checksum, tiers=self.tiers, created_unix_ms=self.created_ms,
                            last_access_unix_ms=self.last_access_ms, hits=self.hits, readers=readers,
                            write_pending=write_pending, retention=retention_message(self.retention),
                            pinned_until_unix_ms=self.pinned_until_ms(),
                            token_ids=unpack_token_ids(self.token_ids) if self.token_ids else None,
                            origin=origin_message(self.origin))


_ORIGINS: weakref.WeakValueDictionary = weakref.WeakValueDictionary()


def interned(origin: BlockOrigin | None) -> BlockOrigin | None:
    """One shared instance per distinct origin (event loop only): every block of an engine points at
    the same object, so keeping who stored a block costs one pointer per block. Entries go away with
    the last block that uses them."""
    if origin is None:
        return None
    return _ORIGINS.setdefault(origin, origin)


def origin_of(message: pb.BlockOrigin | None, lora_name: str = "") -> BlockOrigin | None:
    """The BlockOrigin of a wire message (None: unset or all empty); `lora_name` overrides its own.
    ValueError naming the field when a bound is exceeded."""
    if message is None:
        message = pb.BlockOrigin()
    origin = BlockOrigin(message.engine, message.model, message.block_size, lora_name or message.lora_name)
    problem = origin.problem()
    if problem:
        raise ValueError(problem)
    return None if origin == BlockOrigin() else interned(origin)


def origin_message(origin: BlockOrigin | None) -> pb.BlockOrigin | None:
    if origin is None:
        return None
    return pb.BlockOrigin(engine=origin.engine, model=origin.model, block_size=origin.block_size,
                          lora_name=origin.lora_name)


def retention_message(retention: Retention | None) -> pb.Retention | None:
    """The wire form of a block's retention (None stays unset)."""
    if retention is None:
        return None
    return pb.Retention(cls=retention.cls, priority=retention.priority, ttl_s=retention.ttl_s or 0.0)


def retention_of(holder) -> Retention | None:
    """The `retention` field of a message as a Retention; None when unset; ValueError when invalid."""
    if not holder.HasField("retention"):
        return None
    r = holder.retention
    return Retention(r.cls, r.priority, r.ttl_s or None)


@dataclasses.dataclass(slots=True)
class Namespace:
    name: str
    attributes: dict[str, str]
    blocks: SortedDict = dataclasses.field(default_factory=SortedDict)
    bytes: int = 0
    adopted: bool = False  # found on disk or in S3 before anyone registered it here


class Catalog:
    def __init__(self, data_dir: str, max_namespaces: int):
        self._path = os.path.join(data_dir, "namespaces.json")
        self._max_namespaces = max_namespaces
        self.namespaces: dict[str, Namespace] = {}
        self.blocks = 0
        self.bytes = 0

    # -- namespaces -------------------------------------------------------------------------
    def load_namespaces(self) -> str:
        """Loads namespaces.json, or its backup when it is damaged; returns what happened (for the
        recovery log line). With both damaged it starts empty and the namespaces are re-adopted from
        the blocks' headers as recovery finds them (their attributes come back with the next
        registration)."""
        problems = []
        for path in (self._path, self._path + ".bak"):
            try:
                saved = _read_namespaces(path)
            except FileNotFoundError:
                continue
            except (OSError, ValueError) as exc:
                problems.append(f"{os.path.basename(path)} unreadable ({exc})")
                log.error("namespace registry %s is damaged (%s); trying the next copy", path, exc)
                continue
            for name, attributes in saved.items():
                self.namespaces[name] = Namespace(name, dict(attributes))
            what = f"{len(saved)} namespaces from {os.path.basename(path)}"
            return "; ".join(problems + [what])
        if problems:
            log.error("namespace registry lost: %s; namespaces are re-adopted from the blocks on disk",
                      "; ".join(problems))
        return "; ".join(problems + ["no namespace registry"])

    def register(self, name: str, attributes: dict[str, str]) -> bool:
        existing = self.namespaces.get(name)
        if existing is not None and existing.adopted:
            existing.attributes, existing.adopted = dict(attributes), False  # first registration names it
            return False
        if existing is not None:
            if existing.attributes != attributes:
                raise precondition(f"namespace {name!r} exists with attributes {existing.attributes}; "
                                   f"got {attributes}: two engines disagree on what the namespace holds")
            return False
        if len(self.namespaces) >= self._max_namespaces:
            raise exhausted(f"namespace limit reached ({self._max_namespaces}); raise limits.max_namespaces")
        self.namespaces[name] = Namespace(name, dict(attributes))
        return True

    def remove_namespace(self, name: str) -> None:
        """Forgets an empty namespace (the caller saves the registry afterwards)."""
        ns = self.namespace(name)
        assert not ns.blocks and ns.bytes == 0, "removing a namespace that still holds blocks"
        del self.namespaces[name]

    def adopt_namespace(self, name: str) -> Namespace:
        """A namespace seen on disk but missing from namespaces.json (e.g. the file was lost)."""
        if name not in self.namespaces:
            self.namespaces[name] = Namespace(name, {}, adopted=True)
        return self.namespaces[name]

    def registry(self) -> bytes:
        """The registry's file contents now (event loop); `save` writes them (any thread)."""
        return json.dumps({n.name: n.attributes for n in self.namespaces.values() if not n.adopted},
                          sort_keys=True).encode()

    def save(self, data: bytes) -> None:
        """Writes the registry and then its backup, each atomically (tmp, fsync, rename, dir fsync):
        a crash or a damaged file leaves at least one good copy. One writer at a time."""
        for path in (self._path, self._path + ".bak"):
            _write_atomically(path, data)

    def namespace(self, name: str) -> Namespace:
        found = self.namespaces.get(name)
        if found is None:
            raise not_found(f"unknown namespace {name!r}: call RegisterNamespace first")
        return found

    # -- blocks -----------------------------------------------------------------------------
    def get(self, namespace: str, key: bytes) -> Block | None:
        found = self.namespaces.get(namespace)
        return None if found is None else found.blocks.get(key)

    def add(self, block: Block) -> None:
        ns = self.namespaces[block.namespace]
        assert block.key not in ns.blocks
        ns.blocks[block.key] = block
        ns.bytes += block.length
        self.blocks += 1
        self.bytes += block.length

    def discard(self, block: Block) -> None:
        ns = self.namespaces[block.namespace]
        if ns.blocks.pop(block.key, None) is block:
            ns.bytes -= block.length
            self.blocks -= 1
            self.bytes -= block.length

    def lookup(self, namespace: str, keys) -> bytes:
        """Tier masks of the longest stored prefix of keys."""
        blocks = self.namespace(namespace).blocks
        tiers = bytearray()
        for key in keys:
            block = blocks.get(key)
            if block is None:
                break
            tiers.append(block.tiers)
        return bytes(tiers)

    def find_matches(self, namespace: str, keys) -> dict[int, int]:
        """Matched prefix depth of keys per tier bit (0 for any tier)."""
        blocks = self.namespace(namespace).blocks
        depth = {0: 0, pb.TIER_GPU: 0, pb.TIER_CPU: 0, pb.TIER_DISK: 0, pb.TIER_S3: 0}
        open_tiers = set(depth)
        for index, key in enumerate(keys):
            block = blocks.get(key)
            tiers = block.tiers if block is not None else 0
            for tier in list(open_tiers):
                if (tier == 0 and tiers) or tiers & tier:
                    depth[tier] = index + 1
                else:
                    open_tiers.discard(tier)
            if not open_tiers:
                break
        return depth

    def page(self, namespace: str, tier_mask: int, page_size: int, token: bytes,
             match=None, names=None) -> tuple[list[Block], bytes]:
        """Blocks in (namespace, key) order after token; returns (page, next token or b"").
        `match(block)` filters further; `names` limits an all-namespace listing (a tenant's own)."""
        start_ns, _, start_key = token.partition(b"\0") if token else (b"", b"", b"")
        names = [namespace] if namespace else sorted(self.namespaces if names is None else names)
        out: list[Block] = []
        scanned, scan_budget, previous = 0, page_size * SCAN_PAGES_PER_CALL, None
        for name in names:
            if name.encode() < start_ns:
                continue
            blocks = self.namespace(name).blocks
            skip_through = start_key if name.encode() == start_ns else None
            keys = blocks.irange(minimum=skip_through, inclusive=(False, True)) if skip_through else iter(blocks)
            for key in keys:
                block = blocks[key]
                scanned += 1
                if scanned > scan_budget:  # a sparse filter: a short page, resumable, in bounded time
                    return out, _token(previous)
                previous = block
                if (tier_mask and not block.tiers & tier_mask) or (match is not None and not match(block)):
                    continue
                if len(out) == page_size:
                    return out, _token(out[-1])
                out.append(block)
        return out, b""


def _read_namespaces(path: str) -> dict:
    """Parses a registry file; ValueError when it is not a JSON object of string attribute maps."""
    with open(path, "rb") as file:
        saved = json.loads(file.read().decode("utf-8"))
    if not isinstance(saved, dict) or not all(
            isinstance(attrs, dict) and all(isinstance(v, str) for v in attrs.values()) for attrs in saved.values()):
        raise ValueError("not a map of namespace -> attributes")
    return saved


def _write_atomically(path: str, data: bytes) -> None:
    tmp = path + ".tmp"
    with open(tmp, "wb") as file:
        file.write(data)
        file.flush()
        os.fsync(file.fileno())
    os.replace(tmp, path)
    fd = os.open(os.path.dirname(path) or ".", os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _token(block: Block) -> bytes:
    return block.namespace.encode() + b"\0" + block.key
