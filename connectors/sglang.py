"""SGLang HiCache L3 storage backend backed by the node's kvtierd.

    python -m sglang.launch_server ... --enable-hierarchical-cache \\
        --hicache-storage-backend dynamic \\
        --hicache-storage-backend-extra-config '{"backend_name": "kvtier",
            "module_path": "kvtier.connectors.sglang", "class_name": "KvtierHiCacheStorage",
            "interface_v1": 1, "socket": "/run/kvtier/kvtierd.sock"}'

SGLang's ``StorageBackendFactory`` builds the backend as ``KvtierHiCacheStorage(storage_config, kwargs)``
and then calls ``register_mem_pool_host(host_pool)``. With ``"interface_v1": 1`` SGLang moves pages
with the zero-copy ``batch_get_v1`` / ``batch_set_v1``: one kvtier block is one SGLang page, the
concatenation of the host-pool buffer segments ``host_pool.get_page_buffer_meta()`` lists for that
page (the same segments Mooncake and 3FS move). A batch is one ``Acquire`` (each block checksum-verified
in shared memory, then copied into the host pool) and one ``Release``, or one ``Lookup`` (pages already
stored are skipped), one ``Allocate``, copies from the host pool into the arena, and one ``Commit``.
Without ``interface_v1`` SGLang uses the tensor API (``batch_get`` / ``batch_set``): a block is then
the flat data page tensor SGLang hands over.

Keys: SGLang's page keys are hex SHA-256 digests chained over the previous page
(``sglang.srt.mem_cache.utils.get_hash_str``); stored as their 32 raw bytes. Any other key string
(another hash scheme, a suffixed side-pool key) is stored as the SHA-256 of its UTF-8 text. A block's
parent is the previous page's key (``extra_info.prefix_keys`` for the first page of a batch).

Namespace: ``sglang.<sha256(attributes)[:16]>``, registered with the attributes: model name, TP size
and rank (no rank for MLA, whose KV every rank replicates), PP/CP/DCP shard, and once the host pool is
registered its class, layout, KV dtype, page size, geometry, page bytes and the page format (v1 or
tensor). Engines whose pages are not byte-compatible therefore never see each other's blocks.

Retention (agent hints, ``_hints``): every backup is committed with the retention of the hint object
``extra_config["default_hints"]`` over, per batch, ``extra_info.extra_info["kvtier"]`` when the caller
sets one (SGLang's own controller passes no per-request data to a storage backend). Token ranges need
the page's position in its sequence: known when SGLang passes ``prefix_keys``
(``"hicache_storage_pass_prefix_keys": true``), otherwise the request retention applies to every page.

Failures: no daemon error reaches SGLang. Reads degrade to misses, writes to ``False``; errors are
logged (rate-limited) and counted in ``stats``. Daemon access (deadlines, namespaces, a circuit breaker
that makes a hung or dead daemon cost one deadline per breaker period, not one per batch) is
``_daemon.DaemonSession``; its counters (``short_circuited``, ``breaker_opened``, ...) are in ``stats``.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import logging
import os
import threading
import time
from typing import Any, List, Optional

import torch

from sglang.srt.mem_cache.hicache_storage import (
    HiCacheStorage,
    HiCacheStorageConfig,
    HiCacheStorageExtraInfo,
)

from kvtier.client.client import DEFAULT_SOCKET
from kvtier.connectors._daemon import DEFAULT_BREAKER_PERIOD_S, BreakerOpen, DaemonSession, RateLimitedLog
from kvtier.connectors._daemon import error_text as _error_text
from kvtier.connectors._hints import HINTS_KEY, HintError, parse_hints
from kvtier.connectors._pipeline import BlockToSave, SlotTooSmall, load_blocks, save_blocks
from kvtier.proto.v1 import kvtier_pb2 as pb

logger = logging.getLogger(__name__)

_OK = (pb.STORED, pb.DUPLICATE)


# -- keys and namespaces -----------------------------------------------------------------------------
def page_key(key: str) -> bytes:
    """kvtier key of an SGLang page key: the digest bytes of a 64-hex-digit SHA-256 page hash,
    otherwise the SHA-256 of the key's text (always 32 bytes)."""
    if len(key) == 64:
        try:
            return bytes.fromhex(key)
        except ValueError:
            pass
    return hashlib.sha256(key.encode("utf-8")).digest()


def _clip(value: Any, limit: int = 256) -> str:
    text = str(value)
    if len(text) <= limit:
        return text
    return text[-(limit - 17):] + "#" + hashlib.sha256(text.encode()).hexdigest()[:16]


def namespace_for(attributes: dict[str, str]) -> str:
    digest = hashlib.sha256(json.dumps(attributes, sort_keys=True).encode()).hexdigest()[:16]
    return f"sglang.{digest}"


def config_attributes(config: HiCacheStorageConfig) -> dict[str, str]:
    """What decides page compatibility that the storage config knows (no pool geometry yet)."""
    mla = bool(config.is_mla_model)
    attributes = {
        "engine": "sglang",
        "hash": "sha256-chain-u32le",
        "model": _clip(config.model_name or ""),
        "mla": str(mla).lower(),
        "tp_size": str(config.tp_size),
        # MLA KV is replicated on every TP rank: all ranks share one namespace.
        "tp_rank": "replicated" if mla else str(config.tp_rank),
        "pp_size": str(config.pp_size),
        "pp_rank": str(config.pp_rank),
    }
    cp_size = getattr(config, "attn_cp_size", 1) or 1
    if cp_size > 1:  # each context-parallel rank holds a disjoint slice of every page
        attributes.update(cp_size=str(cp_size), cp_rank=str(config.attn_cp_rank))
    dcp_size = getattr(config, "dcp_size", 1) or 1
    if dcp_size > 1:
        attributes.update(dcp_size=str(dcp_size), dcp_rank=str(config.dcp_rank),
                          logical_page_size=str(config.logical_page_size))
    if getattr(config, "should_split_heads", False):
        attributes["tp_lcm_size"] = str(config.tp_lcm_size)
    return attributes


def pool_attributes(pool: Any, page_bytes: Optional[int], interface_v1: bool) -> dict[str, str]:
    """Geometry of a registered host pool (whatever of it the pool class exposes)."""
    attributes = {
        "pool": type(pool).__name__,
        "layout": str(getattr(pool, "layout", "")),
        "kv_dtype": str(getattr(pool, "dtype", "")).removeprefix("torch."),
        "page_size": str(getattr(pool, "logical_page_size", None) or getattr(pool, "page_size", "")),
        "page_bytes": str(page_bytes or ""),
        "page_format": "buffer_meta" if interface_v1 else "flat_page",
    }
    for name in ("layer_num", "head_num", "head_dim", "v_head_dim", "kv_lora_rank", "qk_rope_head_dim",
                 "kv_cache_dim", "storage_format_tag"):
        value = getattr(pool, name, None)
        if value is not None:
            attributes[name] = _clip(value)
    return attributes


# -- helpers -----------------------------------------------------------------------------------------
def _address(view: memoryview) -> tuple[int, ctypes.c_char]:
    """Address of a writable buffer, and the object that keeps it exported while in use."""
    holder = ctypes.c_char.from_buffer(view)
    return ctypes.addressof(holder), holder


def _flat(values) -> list[int]:
    out: list[int] = []
    for value in values:
        if isinstance(value, (list, tuple)):
            out.extend(int(v) for v in value)
        else:
            out.append(int(value))
    return out


def _tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The bytes of a tensor in logical (row-major) order, as a memoryview."""
    t = tensor.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous().reshape(-1)
    return memoryview(t.view(torch.uint8).numpy())


class KvtierHiCacheStorage(HiCacheStorage):
    """HiCache storage backend on kvtierd (see the module docstring).

    ``storage_config.extra_config`` keys: ``socket`` (default ``$KVTIER_SOCKET`` or
    ``kvtier-data/kvtierd.sock``), ``timeout_s`` (per RPC, default 5), ``allocate_wait_ms`` (how long a
    write waits for free arena slots, default 200), ``wait_durable`` (commit waits for the disk tier,
    default false), ``skip_existing`` (``batch_set_v1`` looks up and skips stored pages, default true),
    ``interface_v1`` (SGLang's zero-copy page functions), ``clear_timeout_s``, ``warning_interval_s``,
    ``breaker_period_s`` (how often a daemon that stopped answering is health-checked, default 5),
    ``default_hints`` (retention of stored pages; ``_hints`` and docs/sglang.md).
    """

    def __init__(self, storage_config: HiCacheStorageConfig, kwargs: Optional[dict] = None):
        extra = dict(storage_config.extra_config or {})
        self.storage_config = storage_config
        self.socket = str(extra.get("socket") or os.environ.get("KVTIER_SOCKET") or DEFAULT_SOCKET)
        self.timeout_s = float(extra.get("timeout_s", 5.0))
        self.allocate_wait_ms = int(extra.get("allocate_wait_ms", 200))
        self.wait_durable = bool(extra.get("wait_durable", False))
        self.skip_existing = bool(extra.get("skip_existing", True))
        self.interface_v1 = bool(int(extra.get("interface_v1", 0) or 0))
        self.clear_timeout_s = float(extra.get("clear_timeout_s", 10.0))
        self.consult_peers = bool(extra.get("consult_peers", False))  # pull misses from peers (docs/peers.md)
        # An RPC deadline shorter than the arena wait would turn every full arena into an error.
        timeout = max(self.timeout_s, self.allocate_wait_ms / 1000.0 + 1.0)
        self._log = RateLimitedLog(logger, float(extra.get("warning_interval_s", 30.0)))
        try:
            self.default_hints, unknown = parse_hints(extra.get("default_hints"))
        except HintError as error:
            raise ValueError(f"kvtier: extra_config['default_hints']: {error}") from None
        if unknown:
            logger.warning("kvtier: default_hints: unknown keys %s ignored", unknown)
        self._lock = threading.Lock()
        self.mem_pool_host = None
        self.page_bytes: Optional[int] = None
        self.enable_storage_metrics = bool(getattr(storage_config, "enable_storage_metrics", False))
        self._metrics = {"prefetch_pgs": [], "backup_pgs": [], "prefetch_bandwidth": [], "backup_bandwidth": []}
        self.stats = {"lookups": 0, "hit_pages": 0, "loaded_pages": 0, "load_misses": 0, "checksum_errors": 0,
                      "stored_pages": 0, "duplicate_pages": 0, "skipped_pages": 0, "save_errors": 0,
                      "rpc_errors": 0, "bad_hints": 0}
        self._base_attributes = config_attributes(storage_config)
        self.attributes = dict(self._base_attributes)
        self.namespace = namespace_for(self.attributes)
        breaker_period_s = float(extra.get("breaker_period_s", DEFAULT_BREAKER_PERIOD_S))
        self._daemon = DaemonSession(self.socket, timeout, {self.namespace: self.attributes},
                                     breaker_period_s=breaker_period_s, probe_timeout_s=min(1.0, breaker_period_s),
                                     stats=self.stats, logger=logger)
        logger.info("kvtier: SGLang storage backend on %s, namespace %s (%s)", self.socket, self.namespace,
                    self.attributes)

    # -- registration ---------------------------------------------------------------------------------
    def register_mem_pool_host(self, mem_pool_host) -> None:
        super().register_mem_pool_host(mem_pool_host)
        self.page_bytes = self._probe_page_bytes(mem_pool_host)
        attributes = {**self._base_attributes, **pool_attributes(mem_pool_host, self.page_bytes,
                                                                 self.interface_v1)}
        with self._lock:
            self.attributes = attributes
            self.namespace = namespace_for(attributes)
            self._daemon.set_namespaces({self.namespace: attributes})
        logger.info("kvtier: host pool %s registered (%s bytes per page), namespace %s (%s)",
                    type(mem_pool_host).__name__, self.page_bytes, self.namespace, attributes)
        try:
            slot_bytes = self._daemon.arena().slot_bytes
        except Exception as error:  # noqa: BLE001 - the daemon may come up later
            self._log.warning("arena", "daemon at %s not reachable yet: %s", self.socket, _error_text(error))
            return
        if self.page_bytes and self.page_bytes > slot_bytes:
            logger.error("kvtier: one SGLang page is %d bytes but the daemon's arena slots are %d bytes: no page "
                         "can be stored; raise cpu.slot_bytes in the kvtierd config to at least %d",
                         self.page_bytes, slot_bytes, self.page_bytes)

    @staticmethod
    def _probe_page_bytes(pool) -> Optional[int]:
        if getattr(pool, "kv_buffer", None) is None:
            return None
        try:
            page = int(getattr(pool, "logical_page_size", None) or pool.page_size)
            _, sizes = pool.get_page_buffer_meta(torch.zeros(page, dtype=torch.int64))
            return sum(_flat(sizes)) or None
        except Exception:  # noqa: BLE001 - a pool without buffer metadata: tensor API only
            return None

    # -- daemon access --------------------------------------------------------------------------------
    @property
    def _client(self):
        """The kvtier Client under the session (its ``namespace_prefix`` is this engine's tenant)."""
        return self._daemon.client

    def _call(self, fn):
        """fn(namespace) under the daemon session: the namespace registered first, and again (one retry)
        when the daemon lost it. Requests fn builds are tenant-qualified by the session."""
        with self._lock:
            namespace = self.namespace
        return self._daemon.with_namespace(lambda: fn(namespace))

    def _pages_per_call(self) -> int:
        """Pages per Acquire or Allocate: at most a quarter of the arena, so one batch of large pages
        never needs (or pins) the whole CPU tier."""
        return max(1, min(self._daemon.max_keys(), self._daemon.arena().slot_count // 4))

    def _failed(self, kind: str, what: str, error: BaseException) -> None:
        self.stats["rpc_errors"] += 1
        self._daemon.forget_limits()  # asked again: the daemon may have restarted with other limits
        if not isinstance(error, BreakerOpen):  # the breaker logged that the daemon is not answering
            self._log.warning(kind, "%s failed (%s), reported as a miss/failure", what, _error_text(error))

    @staticmethod
    def _parents(keys: list[bytes], extra_info: Optional[HiCacheStorageExtraInfo]) -> list[bytes]:
        prefix = getattr(extra_info, "prefix_keys", None) if extra_info is not None else None
        first = page_key(prefix[-1]) if prefix else b""
        return [first, *keys[:-1]] if keys else []

    # -- retention -------------------------------------------------------------------------------------
    def _page_tokens(self) -> Optional[int]:
        pool = self.mem_pool_host
        if pool is None:
            return None
        tokens = getattr(pool, "logical_page_size", None) or getattr(pool, "page_size", None)
        return int(tokens) if tokens else None

    def _retentions(self, count: int, extra_info: Optional[HiCacheStorageExtraInfo]) -> list:
        """Retention of each page of a backup batch: the batch's hints (``extra_info.extra_info["kvtier"]``)
        over ``default_hints``; token ranges when the batch's position in its sequence is known
        (``prefix_keys``) and the page size too."""
        hints = self.default_hints
        extra = getattr(extra_info, "extra_info", None) if extra_info is not None else None
        if isinstance(extra, dict) and extra.get(HINTS_KEY) is not None:
            try:
                hints, unknown = parse_hints(extra[HINTS_KEY], self.default_hints)
                if unknown:
                    self._log.warning("hintkeys", "unknown hint keys %s ignored", unknown)
            except Exception as error:  # noqa: BLE001 - HintError, or anything odd in the object: the defaults
                self.stats["bad_hints"] += 1
                self._log.warning("hints", "extra_info[%r] ignored, default hints used: %s", HINTS_KEY, error)
        if not hints.sets_retention:
            return [None] * count
        prefix = getattr(extra_info, "prefix_keys", None) if extra_info is not None else None
        page_tokens = self._page_tokens()
        if prefix is None or page_tokens is None:  # position unknown: no ranges
            return [hints.retention] * count
        first = len(prefix)
        return [hints.retention_of_block(first + i, page_tokens) for i in range(count)]

    # -- lookups --------------------------------------------------------------------------------------
    def _leading_hits(self, keys: list[bytes]) -> int:
        step = self._daemon.max_keys()
        matched = 0
        for start in range(0, len(keys), step):
            chunk = keys[start:start + step]
            got = self._call(lambda ns, chunk=chunk: self._daemon.call("Lookup", pb.LookupRequest(
                namespace=ns, keys=chunk, consult_peers=self.consult_peers))).matched
            matched += got
            if got < len(chunk):
                break
        return matched

    def batch_exists(self, keys: List[str], extra_info: Optional[HiCacheStorageExtraInfo] = None) -> int:
        """Number of leading keys stored (one Lookup per 4096 keys)."""
        if not keys:
            return 0
        try:
            matched = self._leading_hits([page_key(k) for k in keys])
        except Exception as error:  # noqa: BLE001
            self._failed("lookup", "Lookup", error)
            return 0
        self.stats["lookups"] += 1
        self.stats["hit_pages"] += matched
        return matched

    def exists(self, key: str) -> bool:
        return self.batch_exists([key]) == 1

    # -- zero-copy page interface (interface_v1) ----------------------------------------------------------
    def _page_segments(self, keys: list, host_indices: torch.Tensor) -> Optional[list[list[tuple[int, int]]]]:
        """(pointer, bytes) segments of each page in the host pool, or None when unusable."""
        pool = self.mem_pool_host
        if pool is None:
            self._log.warning("nopool", "batch_get_v1/batch_set_v1 before register_mem_pool_host")
            return None
        if getattr(pool, "kv_buffer", None) is None:
            self._log.warning("anchor", "host pool %s has no KV buffer (hybrid anchor pool): unsupported",
                              type(pool).__name__)
            return None
        ptrs, sizes = pool.get_page_buffer_meta(host_indices)
        ptrs, sizes = _flat(ptrs), _flat(sizes)
        if len(ptrs) != len(sizes) or len(ptrs) % len(keys):
            self._log.warning("meta", "host pool returned %d pointers and %d sizes for %d pages", len(ptrs),
                              len(sizes), len(keys))
            return None
        per_page = len(ptrs) // len(keys)
        return [list(zip(ptrs[i * per_page:(i + 1) * per_page], sizes[i * per_page:(i + 1) * per_page]))
                for i in range(len(keys))]

    def batch_get_v1(self, keys: List[str], host_indices: torch.Tensor,
                     extra_info: Optional[HiCacheStorageExtraInfo] = None) -> List[bool]:
        """Copies each stored page from the arena into the host pool; a bool per key."""
        results = [False] * len(keys)
        if not keys:
            return results
        started = time.perf_counter()
        try:
            segments = self._page_segments(keys, host_indices)
            if segments is None:
                return results
            kv_keys = [page_key(k) for k in keys]
            step = self._pages_per_call()
            for start in range(0, len(kv_keys), step):
                stop = start + step
                self._get_chunk(kv_keys[start:stop], segments[start:stop], results, start)
        except Exception as error:  # noqa: BLE001
            self._failed("get", "batch_get_v1", error)
        loaded = sum(results)
        self.stats["loaded_pages"] += loaded
        self.stats["load_misses"] += len(keys) - loaded
        self._record("prefetch", loaded, loaded * (self.page_bytes or 0), started)
        return results

    def _get_chunk(self, keys, segments, results, offset) -> None:
        def consume(arena, verified) -> None:
            for i, block in verified:
                base, holder = _address(arena.view(block.slot)[:block.length])
                at = 0
                for ptr, size in segments[i]:
                    if size:
                        ctypes.memmove(ptr, base + at, size)
                    at += size
                del holder
        outcome = self._load(keys, [sum(n for _, n in page) for page in segments], consume)
        for i, loaded in enumerate(outcome.loaded):
            results[offset + i] = loaded

    def _load(self, keys: list[bytes], lengths, consume):
        """load_blocks under this backend's namespace; logs what was not loaded and why."""
        with self._lock:
            namespace = self.namespace
        outcome = load_blocks(self._daemon, namespace, keys, lengths, consume, chunk=len(keys))
        for _, length in outcome.wrong_length:
            self._log.warning("length", "stored page is %d bytes, not what the host pool or target holds: miss",
                              length)
        if outcome.corrupt:
            self.stats["checksum_errors"] += len(outcome.corrupt)
            self._log.warning("checksum", "checksum mismatch in shared memory for %d page(s) (first %s): misses, "
                              "deleted", len(outcome.corrupt), outcome.corrupt[0].hex())
        if outcome.delete_error is not None:
            self._failed("delete", "Delete of corrupt pages", outcome.delete_error)
        return outcome

    def batch_set_v1(self, keys: List[str], host_indices: torch.Tensor,
                     extra_info: Optional[HiCacheStorageExtraInfo] = None) -> List[bool]:
        """Stores each page of the host pool (pages already stored are skipped); a bool per key."""
        results = [False] * len(keys)
        if not keys:
            return results
        started = time.perf_counter()
        try:
            segments = self._page_segments(keys, host_indices)
            if segments is None:
                return results
            kv_keys = [page_key(k) for k in keys]
            parents = self._parents(kv_keys, extra_info)
            retentions = self._retentions(len(kv_keys), extra_info)
            step = self._pages_per_call()
            for start in range(0, len(kv_keys), step):
                stop = start + step
                self._set_chunk(kv_keys[start:stop], parents[start:stop], segments[start:stop], results, start,
                                retentions[start:stop])
        except Exception as error:  # noqa: BLE001
            self._failed("set", "batch_set_v1", error)
        self._record("backup", sum(results), sum(results) * (self.page_bytes or 0), started)
        return results

    def _set_chunk(self, keys, parents, segments, results, offset, retentions) -> None:
        skip = self._leading_hits(keys) if self.skip_existing else 0
        for i in range(skip):
            results[offset + i] = True
        self.stats["skipped_pages"] += skip
        if skip == len(keys):
            return

        def fill(view: memoryview, i: int) -> int:
            base, holder = _address(view)
            at = 0
            for ptr, size in segments[i]:
                if size:
                    ctypes.memmove(base + at, ptr, size)
                at += size
            del holder
            return at
        pending = list(range(skip, len(keys)))
        statuses = self._stage_and_commit([keys[i] for i in pending], [parents[i] for i in pending],
                                          [sum(n for _, n in segments[i]) for i in pending],
                                          [lambda view, i=i: fill(view, i) for i in pending],
                                          [retentions[i] for i in pending])
        for i, status in zip(pending, statuses):
            results[offset + i] = status in _OK

    def _stage_and_commit(self, keys, parents, lengths, writers, retentions) -> list[int]:
        """save_blocks: each writer(view) fills its slot; a CommitStatus per key."""
        def fill(arena, slots) -> None:
            for slot, length, write in zip(slots, lengths, writers):
                written = write(arena.view(slot)[:length])
                if written != length:
                    raise ValueError(f"page copy wrote {written} of {length} bytes")
        blocks = [BlockToSave(key, parent, length, retention)
                  for key, parent, length, retention in zip(keys, parents, lengths, retentions)]
        with self._lock:
            namespace = self.namespace
        try:
            statuses = save_blocks(self._daemon, namespace, blocks, fill, allocate_wait_ms=self.allocate_wait_ms,
                                   wait_durable=self.wait_durable)
        except SlotTooSmall as error:
            self.stats["save_errors"] += len(keys)
            self._log.warning("slot", "%s", error)
            return [0] * len(keys)
        for status in statuses:
            if status == pb.STORED:
                self.stats["stored_pages"] += 1
            elif status == pb.DUPLICATE:
                self.stats["duplicate_pages"] += 1
            else:
                self.stats["save_errors"] += 1
        return statuses

    # -- tensor interface -----------------------------------------------------------------------------
    def get(self, key: str, target_location: Optional[Any] = None,
            target_sizes: Optional[Any] = None) -> torch.Tensor | None:
        return self.batch_get([key], [target_location] if target_location is not None else None)[0]

    def batch_get(self, keys: List[str], target_locations: Optional[Any] = None,
                  target_sizes: Optional[Any] = None) -> List[torch.Tensor | None]:
        """Copies each stored page into its target tensor (returned), or into a new tensor when no target is
        given (uint8, or the host pool's dtype when one is registered); None for a miss."""
        out: List[torch.Tensor | None] = [None] * len(keys)
        if not keys:
            return out
        targets = list(target_locations) if target_locations is not None else [None] * len(keys)
        started = time.perf_counter()
        try:
            kv_keys = [page_key(k) for k in keys]
            lengths = [t.numel() * t.element_size() if isinstance(t, torch.Tensor) else None for t in targets]

            def consume(arena, verified) -> None:
                for i, block in verified:
                    out[i] = self._read_block(arena.view(block.slot)[:block.length], targets[i])
            step = self._pages_per_call()
            for start in range(0, len(kv_keys), step):
                self._load(kv_keys[start:start + step], lengths[start:start + step],
                           lambda arena, verified, start=start: consume(arena, [(start + i, b) for i, b in verified]))
        except Exception as error:  # noqa: BLE001
            self._failed("get", "batch_get", error)
        loaded = sum(t is not None for t in out)
        self.stats["loaded_pages"] += loaded
        self.stats["load_misses"] += len(keys) - loaded
        nbytes = sum(t.numel() * t.element_size() for t in out if t is not None)
        self._record("prefetch", loaded, nbytes, started)
        return out

    def _read_block(self, view: memoryview, target) -> torch.Tensor | None:
        """A verified page into `target` (its length already checked), or into a new tensor."""
        src = torch.frombuffer(view, dtype=torch.uint8) if len(view) else torch.empty(0, dtype=torch.uint8)
        if target is None:
            data = src.clone()
            dtype = getattr(self.mem_pool_host, "dtype", None)
            if isinstance(dtype, torch.dtype) and len(view) % dtype.itemsize == 0:
                data = data.view(dtype)
            return data
        if not isinstance(target, torch.Tensor):
            self._log.warning("target", "target_location of type %s is not supported (tensors only): miss",
                              type(target).__name__)
            return None
        if target.is_contiguous():
            target.reshape(-1).view(torch.uint8).copy_(src)
        else:
            target.copy_(src.view(target.dtype).view(target.shape))
        return target

    def set(self, key: str, value: Optional[Any] = None, target_location: Optional[Any] = None,
            target_sizes: Optional[Any] = None) -> bool:
        return self.batch_set([key], [value])

    def batch_set(self, keys: List[str], values: Optional[Any] = None, target_locations: Optional[Any] = None,
                  target_sizes: Optional[Any] = None) -> bool:
        """Stores each value tensor as one block (one Allocate, one Commit); True when all are stored."""
        if not keys:
            return True
        values = list(values or [])
        if len(values) != len(keys) or any(not isinstance(v, torch.Tensor) for v in values):
            self._log.warning("values", "batch_set needs one tensor per key")
            return False
        started = time.perf_counter()
        ok = False
        sources: list[memoryview] = []
        try:
            kv_keys = [page_key(k) for k in keys]
            parents = self._parents(kv_keys, None)
            retentions = self._retentions(len(kv_keys), None)
            sources = [_tensor_bytes(v) for v in values]
            step = self._pages_per_call()
            statuses: list[int] = []

            def writer(src: memoryview):
                def write(view: memoryview) -> int:
                    view[:] = src
                    return len(src)
                return write
            for start in range(0, len(kv_keys), step):
                stop = start + step
                statuses += self._stage_and_commit(kv_keys[start:stop], parents[start:stop],
                                                   [len(s) for s in sources[start:stop]],
                                                   [writer(s) for s in sources[start:stop]],
                                                   retentions[start:stop])
            ok = len(statuses) == len(keys) and all(s in _OK for s in statuses)
        except Exception as error:  # noqa: BLE001
            self._failed("set", "batch_set", error)
        self._record("backup", len(keys) if ok else 0, sum(len(s) for s in sources) if ok else 0, started)
        return ok

    # -- admin ----------------------------------------------------------------------------------------
    def clear(self) -> bool:
        """Deletes every block of this backend's namespace. The daemon skips blocks still being read or
        written through to disk, so this repeats Clear until the namespace is empty (``clear_timeout_s``,
        default 10 s); False when it is not."""
        deadline = time.monotonic() + self.clear_timeout_s
        deleted = 0
        try:
            while True:
                deleted += self._call(lambda ns: self._daemon.call("Clear", pb.ClearRequest(namespace=ns))).deleted
                left = self._call(lambda ns: self._daemon.call("Inventory", pb.InventoryRequest(
                    namespace=ns, page_size=1))).blocks
                if not left:
                    logger.info("kvtier: cleared %d blocks of %s", deleted, self.namespace)
                    return True
                if time.monotonic() >= deadline:
                    self._log.warning("clear", "Clear of %s left blocks in use (read leases or disk writes "
                                      "pending) after %.1f s", self.namespace, self.clear_timeout_s)
                    return False
                time.sleep(0.05)
        except Exception as error:  # noqa: BLE001
            self._failed("clear", "Clear", error)
            return False

    def _record(self, kind: str, pages: int, nbytes: int, started: float) -> None:
        """One batch for get_stats: pages moved and GiB/s (what SGLang's other backends report)."""
        if not self.enable_storage_metrics or not pages:
            return
        elapsed = max(time.perf_counter() - started, 1e-9)
        with self._lock:
            self._metrics[f"{kind}_pgs"].append(pages)
            self._metrics[f"{kind}_bandwidth"].append(nbytes / elapsed / (1 << 30))

    def get_stats(self):
        """SGLang StorageMetrics (pages and GB/s per batch since the last call), or None."""
        try:
            from sglang.srt.observability.metrics_collector import StorageMetrics
        except Exception:  # noqa: BLE001 - metrics not importable in this environment
            return None
        metrics = StorageMetrics()
        with self._lock:
            for name, values in self._metrics.items():
                getattr(metrics, name).extend(values)
                values.clear()
        return metrics

    def close(self) -> None:
        logger.info("kvtier: SGLang storage backend stats %s", self.stats)
        try:
            self._daemon.close()
        except Exception:  # noqa: BLE001
            pass
