"""vLLM (v1) KV connector backed by the node's kvtierd.

    KVTransferConfig(kv_connector="KvtierConnector", kv_connector_module_path="kvtier.connectors.vllm",
                     kv_role="kv_both", kv_load_failure_policy="recompute",
                     kv_connector_extra_config={"socket": "/path/to/kvtierd.sock"})

One kvtier block = one full engine block: the concatenation, over layers in sorted name order, of each
layer's slice for that block (see ``_layout``). Keys are vLLM's own block hashes
(``request.block_hashes``, 32 bytes, each chaining its parent, ``cache_salt`` included), scoped by a
namespace derived from everything that makes two engines' KV bytes comparable: model, dtypes, block
size, KV layout and shape, parallel rank and the prefix-caching hash algorithm.

The engine never waits for the daemon. Scheduler side: one ``Lookup`` per new request (per parallel
rank: one with TP=1), run in the background: ``get_num_new_matched_tokens`` answers None ("not known
yet") until it answers (waiting at most ``lookup_wait_ms`` per step), and the answer is kept while the
request waits for KV space. A hit is loaded asynchronously: the request waits in
WAITING_FOR_REMOTE_KVS while the worker's load thread acquires, verifies (checksum) and copies the
blocks, and ``get_finished`` reports it. Saves: ``wait_for_save`` hands each request's new blocks to the
worker's save thread (Allocate, copies into the arena, Commit: ``_pipeline``), bounded in bytes
(past the bound a save is dropped, never waited for); ``request_finished`` answers True for a
request with saves, so vLLM keeps its blocks until ``get_finished`` says no copy reads them, and
``handle_preemptions`` stops copies of preempted requests before their blocks are reused
(``_transfers``). Each path can be switched back to the synchronous one (``background_lookups``,
``async_loads``, ``async_saves``). Every daemon failure degrades to a cache miss: a failed load is
reported through ``get_block_ids_with_load_errors`` and vLLM recomputes those tokens (set
``kv_load_failure_policy="recompute"``); a failed save is dropped. Daemon access (deadlines: a short
one for the scheduler's lookups, ``scheduler_timeout_s``; namespaces; a circuit breaker that makes a
hung or dead daemon cost one deadline per breaker period instead of one per step) is
``_daemon.DaemonSession``.

Agent hints (``_hints``): a request's ``kv_transfer_params["kvtier"]`` (the OpenAI request's
``kv_transfer_params``, or ``SamplingParams.extra_args["kv_transfer_params"]`` offline) over the
connector-wide ``default_hints`` decide the retention each saved block is committed with (class,
priority, TTL pin; per token range), and may ask for a prefetch of the request's stored blocks. They
are read once per request, in ``on_new_request``; a bad hint is a warning and the defaults, never an
error. A router may name the peer to pull from (``kv_transfer_params["kv_hint"]``, Dynamo's
``kv.fetch@1.0`` action; ``_hints.parse_kv_hint``): the request's Lookups (and prefetch) then carry
that ``peer``, and with ``consult_peers`` the daemon asks only it. A malformed one is a bad hint.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import grpc
import torch

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)

from kvtier.client.client import DEFAULT_SOCKET
from kvtier.connectors._daemon import (DEFAULT_BREAKER_PERIOD_S, BreakerOpen,
                                       DaemonSession, RateLimitedLog)
from kvtier.connectors._daemon import error_text as _error_text
from kvtier.connectors._hints import (HINTS_KEY, KV_HINT_KEY, NO_HINTS, HintError, Hints, parse_hints,
                                      parse_kv_hint)
from kvtier.connectors._layout import ArenaViews, BlockLayout, CopyStream
from kvtier.connectors._pipeline import BlockToSave, SlotTooSmall, load_blocks, save_blocks
from kvtier.connectors._transfers import DEFAULT_MAX_INFLIGHT_BYTES, SaveJob, TransferEngine
from kvtier.proto.v1 import kvtier_pb2 as pb

try:
    from vllm.v1.metrics.cache_hit_source import CacheHitSource
except ImportError:  # older vLLM
    CacheHitSource = None

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.attention.backend import AttentionMetadata
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.request import Request

# Under "vllm." so that vLLM's log handler prints it.
logger = logging.getLogger("vllm.kvtier")

MAX_PENDING_PREFETCHES = 64
MAX_PENDING_LOOKUPS = 256


class HashSeedError(RuntimeError):
    """vLLM's block hashes are random per process: no two engines could ever share a block."""


# -- configuration-derived identity ----------------------------------------------------------------
def check_reproducible_block_hashes(vllm_config: "VllmConfig") -> None:
    """Raises HashSeedError when vLLM derives its root block hash (NONE_HASH) from a random seed.

    vLLM >= 0.1x: ``resolve_none_hash_seed(hash_fn)`` returns PYTHONHASHSEED when set, a fixed seed for
    cryptographic algorithms (sha256, sha256_cbor), and fresh random bytes for xxhash/xxhash_cbor.
    Resolving it twice tells the two apart without depending on that list. Older vLLMs derived
    NONE_HASH from ``hash(...)`` or ``os.urandom`` unless PYTHONHASHSEED was set.
    """
    algo = vllm_config.cache_config.prefix_caching_hash_algo
    if os.environ.get("PYTHONHASHSEED") not in (None, "", "random"):
        return
    from vllm.v1.core import kv_cache_utils
    resolve = getattr(kv_cache_utils, "resolve_none_hash_seed", None)
    if resolve is not None:
        from vllm.utils.hashing import get_hash_fn_by_name
        hash_fn = get_hash_fn_by_name(algo)
        if resolve(hash_fn) == resolve(hash_fn):
            return
    raise HashSeedError(
        f"kvtier: vLLM's root block hash (NONE_HASH) is random in every process with "
        f"prefix_caching_hash_algo={algo!r} and PYTHONHASHSEED unset, so no block stored by one engine "
        f"could ever be found by another. Set PYTHONHASHSEED to the same value for every engine "
        f"(e.g. PYTHONHASHSEED=0), or use a hash algorithm whose root does not depend on it "
        f"(--prefix-caching-hash-algo sha256 or sha256_cbor).")


def _clip(value: Any, limit: int = 256) -> str:
    text = str(value)
    if len(text) <= limit:
        return text
    return text[-(limit - 17):] + "#" + hashlib.sha256(text.encode()).hexdigest()[:16]


def _fit(value: Any, limit: int = 255) -> str:
    """str(value) cut to at most `limit` UTF-8 bytes (the daemon's bound on origin names)."""
    return str(value).encode()[:limit].decode(errors="ignore")


def namespace_attributes(vllm_config: "VllmConfig", kv_cache_config: "KVCacheConfig") -> dict[str, str]:
    """Fields that decide whether two engines' blocks are interchangeable (rank fields excluded).

    Only configuration is used, so the scheduler and every worker derive the same attributes."""
    from vllm.platforms import current_platform

    model = vllm_config.model_config
    cache = vllm_config.cache_config
    parallel = vllm_config.parallel_config
    groups = kv_cache_config.kv_cache_groups
    if len(groups) != 1:
        raise ValueError(f"kvtier: models with {len(groups)} KV cache groups (hybrid attention) are not "
                         "supported; the connector handles one uniform attention group")
    spec = groups[0].kv_cache_spec
    layout = getattr(kv_cache_config, "kv_cache_layout", None)
    if layout is None:
        try:
            from vllm.v1.attention.backends.utils import get_kv_cache_layout
            layout = get_kv_cache_layout()
        except Exception:  # noqa: BLE001 - layout helper moved; the shape fields still separate layouts
            layout = "unknown"
    return {
        "engine": "vllm",
        "model": _clip(model.model),
        "revision": _clip(model.revision or ""),
        "model_dtype": str(model.dtype).removeprefix("torch."),
        "kv_dtype": str(getattr(spec, "dtype", cache.cache_dtype)).removeprefix("torch."),
        "cache_dtype": str(cache.cache_dtype),
        "block_size": str(cache.block_size),
        "hash_block_size": str(getattr(kv_cache_config, "hash_block_size", None) or cache.block_size),
        "hash_algo": str(cache.prefix_caching_hash_algo),
        "platform": str(current_platform.device_type),
        "kv_layout": str(getattr(layout, "name", layout)),
        "kv_spec": type(spec).__name__,
        "num_kv_heads": str(getattr(spec, "num_kv_heads", "")),
        "head_size": str(getattr(spec, "head_size", "")),
        "num_layers": str(len(groups[0].layer_names)),
        "page_size_bytes": str(getattr(spec, "page_size_bytes", "")),
        "tp_size": str(parallel.tensor_parallel_size),
        "pp_size": str(parallel.pipeline_parallel_size),
    }


def namespace_for(base: dict[str, str], tp_rank: int, pp_rank: int) -> tuple[str, dict[str, str]]:
    attributes = {**base, "tp_rank": str(tp_rank), "pp_rank": str(pp_rank)}
    digest = hashlib.sha256(json.dumps(attributes, sort_keys=True).encode()).hexdigest()[:16]
    return f"vllm.{digest}", attributes


# -- metadata (scheduler -> worker; pickled) ------------------------------------------------------------
@dataclass
class LoadWork:
    req_id: str
    block_ids: list[int]
    keys: list[bytes]
    asynchronous: bool = True  # the request waits in WAITING_FOR_REMOTE_KVS: report it through get_finished


@dataclass
class SaveWork:
    req_id: str
    block_ids: list[int]
    keys: list[bytes]
    parents: list[bytes]
    retentions: list = field(default_factory=list)  # kvtier.tiers.retention.Retention or None, per block
    token_ids: list = field(default_factory=list)   # the tokens of each block (list of ints), for routers
    lora_name: str = ""                             # the request's LoRA adapter ("" = the base model)


@dataclass
class KvtierConnectorMetadata(KVConnectorMetadata):
    loads: list[LoadWork] = field(default_factory=list)
    saves: list[SaveWork] = field(default_factory=list)
    preempted: set[str] = field(default_factory=set)  # their blocks are reused this step: stop copying them
    idle: bool = False  # no token is computed this step: the engine only waits (for loads, held blocks)


@dataclass
class _Lookup:
    """One request's lookup: from block `start`, over its first `num_keys` blocks. `result` is
    (start, hit, stored) once known; `future` runs it in the background until then."""
    start: int
    num_keys: int
    future: Future | None = None
    result: tuple[int, int, int] | None = None


@dataclass
class _RequestState:
    request: "Request"
    saved_upto: int = 0     # blocks [0, saved_upto) are stored (or being saved) in kvtier
    promised_upto: int = 0  # blocks [0, promised_upto) vLLM counts as computed: its local hit and our load
    hints: Hints = NO_HINTS


class KvtierConnector(KVConnectorBase_V1):
    """vLLM v1 connector: kvtier as a node-wide, restart-surviving prefix cache."""

    if CacheHitSource is not None:
        _cache_hit_source = CacheHitSource.HOST

    def __init__(self, vllm_config: "VllmConfig", role: KVConnectorRole,
                 kv_cache_config: "KVCacheConfig | None" = None):
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        check_reproducible_block_hashes(vllm_config)
        extra = self._kv_transfer_config.kv_connector_extra_config or {}
        self._socket = str(extra.get("socket") or os.environ.get("KVTIER_SOCKET") or DEFAULT_SOCKET)
        self._timeout_s = float(extra.get("timeout_s", 5.0))
        self._allocate_wait_ms = int(extra.get("allocate_wait_ms", 200))
        # On a local miss, let the daemon pull the chain from its peers before answering (docs/peers.md).
        self._consult_peers = bool(extra.get("consult_peers", False))
        # The scheduler waits for its calls inside vLLM's step: a short deadline there (a peer pull
        # under consult_peers may take peers.timeout_s: then the long one). Background calls (prefetch)
        # and the worker's loads and saves take timeout_s.
        self._scheduler_timeout_s = float(extra.get("scheduler_timeout_s") or
                                          (self._timeout_s if self._consult_peers else min(1.0, self._timeout_s)))
        self._breaker_period_s = float(extra.get("breaker_period_s", DEFAULT_BREAKER_PERIOD_S))
        # The engine never waits on the daemon: lookups in the background (the scheduler hears "not known
        # yet" until they answer), loads while the request waits in WAITING_FOR_REMOTE_KVS, saves copied
        # and committed by a worker thread. Each can be turned off (the synchronous paths, for comparison).
        self._background_lookups = bool(extra.get("background_lookups", True))
        self._async_loads = bool(extra.get("async_loads", True))
        self._async_saves = bool(extra.get("async_saves", True))
        self._max_inflight_save_bytes = int(extra.get("max_inflight_save_bytes", DEFAULT_MAX_INFLIGHT_BYTES))
        self._lookup_wait_s = max(0.0, float(extra.get("lookup_wait_ms", 5.0)) / 1000.0)
        self._lookup_wait_left = self._lookup_wait_s  # of this scheduler step's budget
        self._idle_wait_s = max(0.0, float(extra.get("idle_wait_ms", 20.0)) / 1000.0)
        self._block_size = vllm_config.cache_config.block_size
        hash_block_size = getattr(kv_cache_config, "hash_block_size", None) or self._block_size
        if self._block_size % hash_block_size:
            raise ValueError(f"kvtier: block_size {self._block_size} is not a multiple of the hash block size "
                             f"{hash_block_size}")
        self._hashes_per_block = self._block_size // hash_block_size
        # Who stores the blocks, sent with every commit and announced with them to KV-aware routers.
        engine_id = extra.get("engine_id") or getattr(self._kv_transfer_config, "engine_id", None) or ""
        model_name = vllm_config.model_config.served_model_name or vllm_config.model_config.model
        self._origin = pb.BlockOrigin(engine=_fit(engine_id), model=_fit(model_name), block_size=self._block_size)
        self._log = RateLimitedLog(logger, float(extra.get("warning_interval_s", 30.0)))
        try:
            self._default_hints, unknown = parse_hints(extra.get("default_hints"))
        except HintError as error:
            raise ValueError(f"kvtier: kv_connector_extra_config['default_hints']: {error}") from None
        if unknown:
            logger.warning("kvtier: default_hints: unknown keys %s ignored", unknown)
        policy = getattr(self._kv_transfer_config, "kv_load_failure_policy", "recompute")
        if policy != "recompute" and role == KVConnectorRole.SCHEDULER:
            logger.warning("kvtier: kv_load_failure_policy=%r: a block lost or corrupted in the daemon fails the "
                           "request; set kv_load_failure_policy='recompute' to recompute it instead", policy)

        base = namespace_attributes(vllm_config, kv_cache_config)
        parallel = vllm_config.parallel_config
        if role == KVConnectorRole.SCHEDULER:
            # Every rank stores its own shard; a block is a hit only when every rank has it.
            shards = [(tp, pp) for pp in range(parallel.pipeline_parallel_size)
                      for tp in range(parallel.tensor_parallel_size)]
        else:
            from vllm.distributed.parallel_state import get_pp_group, get_tp_group
            shards = [(get_tp_group().rank_in_group, get_pp_group().rank_in_group)]
        namespaces = dict(namespace_for(base, tp, pp) for tp, pp in shards)
        self._namespaces = list(namespaces)
        self.stats = {"lookups": 0, "lookup_errors": 0, "hit_blocks": 0, "loaded_blocks": 0, "load_errors": 0,
                      "saved_blocks": 0, "duplicate_blocks": 0, "save_errors": 0, "retained_blocks": 0,
                      "hinted_requests": 0, "bad_hints": 0, "prefetches": 0, "prefetched_blocks": 0,
                      "prefetch_errors": 0, "lookups_skipped": 0, "lookups_not_ready": 0,
                      "dropped_save_blocks": 0, "preempted_requests": 0}
        # Deadlines, namespaces and the circuit breaker (connectors/_daemon.py); its counters
        # (short_circuited, breaker_opened, ...) go into self.stats.
        self._daemon = DaemonSession(
            self._socket, self._scheduler_timeout_s if role == KVConnectorRole.SCHEDULER else self._timeout_s,
            namespaces, breaker_period_s=self._breaker_period_s,
            probe_timeout_s=min(1.0, self._breaker_period_s), stats=self.stats, logger=logger)
        logger.info("kvtier: %s connector on %s, namespaces %s (%s)", role.name.lower(), self._socket,
                    self._namespaces, base)
        if role == KVConnectorRole.SCHEDULER:
            self._daemon.warm_up(self._timeout_s)  # the first lookup is then one RPC on the short deadline

        # scheduler state
        self._requests: dict[str, _RequestState] = {}
        self._lookups: dict[str, _Lookup] = {}  # kept until update_state_after_alloc uses it
        self._lookup_pool: ThreadPoolExecutor | None = None
        self._lookup_lock = threading.Lock()
        self._lookups_pending = 0  # submitted and not ended (bounded by MAX_PENDING_LOOKUPS)
        self._saving: set[str] = set()  # requests with saves: request_finished holds their blocks
        self._pending_loads: dict[str, LoadWork] = {}
        self._hints: dict[str, Hints] = {}
        self._peers: dict[str, str] = {}  # req_id -> the peer its router named (kv_hint), "" for none
        self._prefetcher: ThreadPoolExecutor | None = None
        self._prefetch_lock = threading.Lock()
        self._prefetch_pending = 0
        # worker state
        self._layout: BlockLayout | None = None
        self._copies: CopyStream | None = None
        self._views: ArenaViews | None = None
        self._views_of = None  # the Arena object self._views map
        self._views_lock = threading.Lock()
        self._stats_lock = threading.Lock()  # worker stats are counted on the transfer threads too
        self._failed_reqs: set[str] = set()  # synchronous loads that failed this step
        self._transfers: TransferEngine | None = None
        if role == KVConnectorRole.WORKER:
            self._transfers = TransferEngine(max_inflight_bytes=self._max_inflight_save_bytes, stats=self.stats,
                                             logger=logger, on_error=self._transfer_failed)

    @property
    def requires_kv_delivery(self) -> bool:
        return False  # a best-effort cache: a dropped save is just a future miss

    # ===================================== scheduler side =====================================
    def on_new_request(self, request: "Request") -> None:
        """Reads the request's hints once, as it arrives, and starts its prefetch (if asked)."""
        try:
            hints = self._request_hints(request)
            if hints.prefetch:
                self._start_prefetch(request)
        except Exception as error:  # noqa: BLE001 - a hint never fails a request
            self._log.warning("hints", "hints of request %s not applied (%r)", request.request_id, error)

    def _request_peer(self, request: "Request") -> str:
        """The peer the request's router named (kv_transfer_params["kv_hint"]), "" for none; read once.
        A malformed envelope names none and counts as a bad hint."""
        peer = self._peers.get(request.request_id)
        if peer is None:
            params = getattr(request, "kv_transfer_params", None)
            try:
                peer = parse_kv_hint(params.get(KV_HINT_KEY) if isinstance(params, dict) else None)
            except Exception as error:  # noqa: BLE001 - HintError, or anything odd: no named peer
                self.stats["bad_hints"] += 1
                logger.warning("kvtier: request %s: kv_transfer_params[%r] ignored: %s", request.request_id,
                               KV_HINT_KEY, error)
                peer = ""
            self._peers[request.request_id] = peer
        return peer

    def _request_hints(self, request: "Request") -> Hints:
        hints = self._hints.get(request.request_id)
        if hints is None:
            hints = self._hints[request.request_id] = self._parse_hints(request)
        return hints

    def _parse_hints(self, request: "Request") -> Hints:
        params = getattr(request, "kv_transfer_params", None)
        obj = params.get(HINTS_KEY) if isinstance(params, dict) else None
        if obj is None:
            return self._default_hints
        try:
            hints, unknown = parse_hints(obj, self._default_hints)
        except Exception as error:  # noqa: BLE001 - HintError, or anything odd in the object: the defaults
            self.stats["bad_hints"] += 1
            logger.warning("kvtier: request %s: kv_transfer_params[%r] ignored, connector defaults used: %s",
                           request.request_id, HINTS_KEY, error)
            return self._default_hints
        if unknown:
            logger.warning("kvtier: request %s: unknown hint keys %s ignored", request.request_id, unknown)
        self.stats["hinted_requests"] += 1
        return hints

    def _start_prefetch(self, request: "Request") -> None:
        """Warms the request's stored blocks in the daemon (disk or S3 -> CPU tier) in the background,
        while the request waits to be scheduled: the load in `start_load_kv` is synchronous."""
        keys = self._keys(request)
        if not keys:
            return
        with self._prefetch_lock:
            if self._prefetch_pending >= MAX_PENDING_PREFETCHES:
                self._log.warning("prefetch", "%d prefetches pending: prefetch of request %s skipped",
                                  self._prefetch_pending, request.request_id)
                return
            self._prefetch_pending += 1
            if self._prefetcher is None:
                self._prefetcher = ThreadPoolExecutor(1, thread_name_prefix="kvtier-prefetch")
        self._prefetcher.submit(self._prefetch, keys, self._request_peer(request))

    def _prefetch(self, keys: list[bytes], peer: str = "") -> None:
        try:
            limit = self._daemon.max_keys()
            for namespace in self._namespaces:
                for start in range(0, len(keys), limit):  # the chain's stored prefix: it ends at a gap
                    chunk = keys[start:start + limit]
                    reply = self._daemon.with_namespace(lambda: self._daemon.call(  # in the background:
                        "Prefetch", pb.PrefetchRequest(  # the long deadline; peers only for a named one
                            namespace=namespace, keys=chunk, consult_peers=self._consult_peers and bool(peer),
                            peer=peer),
                        timeout=self._timeout_s))
                    self.stats["prefetched_blocks"] += reply.warmed
                    if reply.matched < len(chunk):
                        break
            self.stats["prefetches"] += 1
        except Exception as error:  # noqa: BLE001 - a prefetch is only an optimisation
            self.stats["prefetch_errors"] += 1
            self._daemon.forget_limits()
            if not isinstance(error, BreakerOpen):  # the breaker logged that the daemon is not answering
                self._log.warning("prefetch", "prefetch failed (%s)", _error_text(error))
        finally:
            with self._prefetch_lock:
                self._prefetch_pending -= 1

    def _keys(self, request: "Request", start: int = 0, stop: int | None = None) -> list[bytes]:
        """kvtier keys of the request's full blocks [start, stop): vLLM's hash of each block's last
        hash-block (the block hash itself when hash and cache block sizes agree)."""
        hashes = request.block_hashes
        k = self._hashes_per_block
        count = len(hashes) // k
        stop = count if stop is None else min(stop, count)
        if k == 1:
            return list(hashes[start:stop])
        return [hashes[(i + 1) * k - 1] for i in range(start, stop)]

    def _num_keys(self, request: "Request") -> int:
        return len(request.block_hashes) // self._hashes_per_block

    def _stored_prefix(self, keys: list[bytes], peer: str = "") -> int:
        """Longest prefix of keys stored in every namespace (one Lookup per namespace and
        max_keys_per_request keys)."""
        matched = len(keys)
        limit = self._daemon.max_keys()
        for namespace in self._namespaces:
            count = 0
            for start in range(0, matched, limit):
                chunk = keys[start:min(start + limit, matched)]
                got = self._daemon.with_namespace(
                    lambda: self._daemon.call("Lookup", pb.LookupRequest(
                        namespace=namespace, keys=chunk, consult_peers=self._consult_peers, peer=peer))).matched
                count += got
                if got < len(chunk):
                    break
            matched = min(matched, count)
            if matched == 0:
                break
        return matched

    def get_num_new_matched_tokens(self, request: "Request", num_computed_tokens: int) -> tuple[int | None, bool]:
        """The request's hit beyond `num_computed_tokens`, from a lookup that runs in the background: None
        ("not known yet": vLLM asks again at a later step, other requests run meanwhile) until it
        answers. One lookup per request and position, kept while the request waits for KV space; the
        hit loads asynchronously (True) unless async_loads is off."""
        num_keys = self._num_keys(request)
        if num_keys == 0:
            return 0, False
        start = num_computed_tokens // self._block_size
        lookup = self._lookups.get(request.request_id)
        if lookup is None or (lookup.start, lookup.num_keys) != (start, num_keys):
            lookup = self._lookups[request.request_id] = self._start_lookup(request, start, num_keys)
        if lookup.result is None:
            if not self._answered_in_budget(lookup.future):
                self.stats["lookups_not_ready"] += 1
                return None, False
            self._lookup_answered(lookup)
        _, hit, _ = lookup.result
        return hit * self._block_size, self._async_loads and hit > 0

    def _start_lookup(self, request: "Request", start: int, num_keys: int) -> _Lookup:
        lookup = _Lookup(start, num_keys)
        # Every full block is looked up, not only the loadable ones: `stored` also says which blocks need
        # no save (a local prefix-cache hit, or the last block of a block-aligned prompt).
        keys = self._keys(request, 0, num_keys)
        usable = min(num_keys, (request.num_tokens - 1) // self._block_size)  # >= 1 token left to compute
        peer = self._request_peer(request)
        if not self._background_lookups:
            future: Future = Future()
            try:
                future.set_result(self._lookup(keys, start, usable, peer))
            except Exception as error:  # noqa: BLE001 - answered below as a miss
                future.set_exception(error)
            lookup.future = future
            self._lookup_answered(lookup)
            return lookup
        with self._lookup_lock:
            if self._lookups_pending >= MAX_PENDING_LOOKUPS:
                self.stats["lookups_skipped"] += 1  # the daemon is far behind: serve this one from the engine
                lookup.result = (start, 0, 0)
                return lookup
            self._lookups_pending += 1
        if self._lookup_pool is None:
            self._lookup_pool = ThreadPoolExecutor(2, thread_name_prefix="kvtier-lookup")
        lookup.future = self._lookup_pool.submit(self._lookup, keys, start, usable, peer)
        lookup.future.add_done_callback(self._lookup_ended)
        return lookup

    def _answered_in_budget(self, future: Future) -> bool:
        """Whether the lookup answered, waiting for it at most what is left of this step's budget
        (lookup_wait_ms per scheduler step, for all requests together): a daemon that answers in time
        costs no extra step, and an engine with nothing else to run does not spin on a pending lookup;
        a hung one costs each step at most the budget."""
        if future.done() or self._lookup_wait_left <= 0:
            return future.done()
        started = time.monotonic()
        try:
            future.result(timeout=self._lookup_wait_left)
        except Exception:  # noqa: BLE001 - not answered in time, or answered with an error (_lookup_answered takes it)
            pass
        self._lookup_wait_left -= time.monotonic() - started
        return future.done()

    def _lookup_ended(self, _future: Future) -> None:
        with self._lookup_lock:
            self._lookups_pending -= 1

    def _lookup_answered(self, lookup: _Lookup) -> None:
        """Takes a finished lookup's answer (on the scheduler's thread: the stats are counted here)."""
        try:
            lookup.result = lookup.future.result()
            self.stats["lookups"] += 1
        except Exception as error:  # noqa: BLE001 - the daemon never fails a request: serve without it
            lookup.result = (lookup.start, 0, 0)
            self.stats["lookup_errors"] += 1
            self._daemon.forget_limits()
            if not isinstance(error, BreakerOpen):  # the breaker logged that the daemon is not answering
                self._log.warning("lookup", "lookup failed, serving from the engine alone (%s)", _error_text(error))
        lookup.future = None

    def _lookup(self, keys: list[bytes], start: int, usable: int, peer: str) -> tuple[int, int, int]:
        """(start, hit, stored): `stored` blocks of the chain are in kvtier; `hit` of them, from `start`,
        can be loaded (the last prompt token is always computed)."""
        stored = self._stored_prefix(keys, peer)
        if stored >= start:
            hit = max(min(stored, usable) - start, 0)
        elif usable > start:  # the daemon lost blocks vLLM still has locally: is what follows there?
            hit = min(self._stored_prefix(keys[start:usable], peer), usable - start)
        else:
            hit = 0
        return start, hit, stored

    def update_state_after_alloc(self, request: "Request", blocks: "KVCacheBlocks", num_external_tokens: int):
        state = self._requests.setdefault(request.request_id, _RequestState(request))
        state.request = request
        try:
            state.hints = self._request_hints(request)
        except Exception as error:  # noqa: BLE001 - a hint never fails a request
            self._log.warning("hints", "hints of request %s not applied (%r)", request.request_id, error)
        lookup = self._lookups.pop(request.request_id, None)
        if lookup is None or lookup.result is None:
            return  # the second call after an asynchronous load, or a request that was never looked up
        start, hit, stored = lookup.result
        count = max(min(num_external_tokens // self._block_size, hit), 0)
        state.saved_upto, state.promised_upto = stored, start + count
        if count == 0:
            return
        block_ids = blocks.get_block_ids()[0]
        self._pending_loads[request.request_id] = LoadWork(
            request.request_id, list(block_ids[start:start + count]), self._keys(request, start, start + count),
            asynchronous=self._async_loads)
        self.stats["hit_blocks"] += count

    def build_connector_meta(self, scheduler_output: "SchedulerOutput") -> KVConnectorMetadata:
        self._lookup_wait_left = self._lookup_wait_s  # a new step: a new budget
        meta = KvtierConnectorMetadata(loads=list(self._pending_loads.values()),
                                       preempted=set(getattr(scheduler_output, "preempted_req_ids", None) or ()),
                                       idle=not scheduler_output.total_num_scheduled_tokens)
        self.stats["preempted_requests"] += len(meta.preempted)
        self._pending_loads.clear()

        scheduled: list[tuple[str, int]] = [(r.req_id, r.num_computed_tokens)
                                            for r in scheduler_output.scheduled_new_reqs]
        cached = scheduler_output.scheduled_cached_reqs
        scheduled += list(zip(cached.req_ids, cached.num_computed_tokens))
        step_keys: set[bytes] = set()
        for req_id, computed_before in scheduled:
            state = self._requests.get(req_id)
            if state is None:
                continue
            if computed_before < state.promised_upto * self._block_size:
                # vLLM recomputes blocks it was promised (a failed load): store them again. Stored blocks
                # past the promise (the last block of a block-aligned prompt, always computed) are not.
                state.promised_upto = computed_before // self._block_size
                state.saved_upto = min(state.saved_upto, state.promised_upto)
            done = min((computed_before + scheduler_output.num_scheduled_tokens.get(req_id, 0))
                       // self._block_size, self._num_keys(state.request))
            if done <= state.saved_upto:
                continue
            block_ids = self._block_ids(req_id)
            first = state.saved_upto
            keys = self._keys(state.request, max(first - 1, 0), min(done, len(block_ids)))
            offset = first - max(first - 1, 0)  # keys[offset + j] is block first + j; keys[offset-1] its parent
            lora = getattr(state.request, "lora_request", None)
            work = SaveWork(req_id, [], [], [], [], [], _fit(lora.lora_name) if lora is not None else "")
            tokens = state.request.all_token_ids
            hints = state.hints
            prompt_tokens = getattr(state.request, "num_prompt_tokens", None)
            for j, i in enumerate(range(first, min(done, len(block_ids)))):
                key = keys[offset + j]
                if key in step_keys:
                    continue
                step_keys.add(key)
                work.block_ids.append(block_ids[i])
                work.keys.append(key)
                work.parents.append(keys[offset + j - 1] if i else b"")
                work.retentions.append(hints.retention_of_block(i, self._block_size, prompt_tokens)
                                       if hints.sets_retention else None)
                work.token_ids.append(list(tokens[i * self._block_size:(i + 1) * self._block_size]))
            state.saved_upto = done
            if work.keys:
                meta.saves.append(work)
                self._saving.add(req_id)
        return meta

    def _block_ids(self, req_id: str) -> list[int]:
        assert self._kv_cache_manager is not None, "bind_kv_cache_manager was not called"
        return list(self._kv_cache_manager.get_block_ids(req_id)[0])

    def request_finished(self, request: "Request", block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        """True (vLLM keeps the blocks until the workers report the request through get_finished) for a
        request whose blocks were given to the workers to save: a save copies them in the background."""
        self._requests.pop(request.request_id, None)
        self._lookups.pop(request.request_id, None)  # a lookup still running ends unread
        self._pending_loads.pop(request.request_id, None)
        self._hints.pop(request.request_id, None)
        self._peers.pop(request.request_id, None)
        if request.request_id in self._saving:
            self._saving.discard(request.request_id)
            return True, None
        return False, None

    # ====================================== worker side =======================================
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]):
        self._layout = BlockLayout(kv_caches, self._kv_cache_config.num_blocks)
        self._copies = CopyStream(next(iter(kv_caches.values())).device)
        logger.info("kvtier: %d KV tensors, %d bytes per block, layout %s", len(kv_caches),
                    self._layout.block_bytes, self._layout.describe())
        try:  # map the arena now, not inside the first request (mapping pre-faults the whole arena)
            arena = self._daemon.arena(None)
        except (grpc.RpcError, OSError) as error:
            self._log.warning("arena", "daemon unreachable at start (%s); will retry", _error_text(error))
            return
        if self._layout.block_bytes > arena.slot_bytes:
            logger.error("kvtier: a block is %d bytes but the daemon's slots hold %d: nothing will be stored "
                         "(raise cpu.slot_bytes to at least the block size)", self._layout.block_bytes,
                         arena.slot_bytes)
            return
        self._arena_views(arena)

    def _arena_views(self, arena) -> ArenaViews:
        """The layout's tensors over `arena`, built once per mapping (a daemon restart maps a new one).
        Over the mapping's own buffer (`arena.buffer`): the tensors keep it mapped while they exist."""
        with self._views_lock:
            if self._views_of is not arena:
                self._views = None  # drop the old mapping's tensors first: they keep it alive
                self._views = self._layout.arena_views(arena.buffer, arena.slot_bytes, arena.slot_count,
                                                       arena.first_slot)
                self._views_of = arena
            return self._views

    def _count(self, **counts: int) -> None:
        with self._stats_lock:
            for name, value in counts.items():
                self.stats[name] += value

    def _transfer_failed(self, kind: str, error: BaseException) -> None:
        """A background save or load that raised: the daemon's limits are asked again, and it is logged
        unless the breaker already said that the daemon is not answering."""
        self._daemon.forget_limits()
        if not isinstance(error, BreakerOpen):
            self._log.warning(kind, "background %s failed (%s)", kind, _error_text(error))

    # -- loads -----------------------------------------------------------------------------------------
    def handle_preemptions(self, kv_connector_metadata: KVConnectorMetadata) -> None:
        """Before a step reuses preempted requests' blocks: no save copy reads them any more."""
        if isinstance(kv_connector_metadata, KvtierConnectorMetadata) and kv_connector_metadata.preempted:
            self._transfers.cancel(kv_connector_metadata.preempted)

    def start_load_kv(self, forward_context: "ForwardContext", **kwargs: Any) -> None:
        """Asynchronous loads go to the load thread (the request waits in WAITING_FOR_REMOTE_KVS until
        get_finished reports it); synchronous ones (async_loads off) complete here, before the forward."""
        if not self.has_connector_metadata():
            return
        meta = self._get_connector_metadata()
        assert isinstance(meta, KvtierConnectorMetadata)
        after = self._copies.mark() if self._copies is not None and meta.loads else None
        for work in meta.loads:
            if work.asynchronous:
                self._transfers.submit_load(work.req_id, work.block_ids,
                                            lambda work=work: self._load(work, after))
                continue
            failed = self._load(work, after)
            if failed:
                self._failed_reqs.add(work.req_id)
                self._transfers.add_load_errors(failed)

    def _load(self, work: LoadWork, after) -> set[int]:
        """Loads one request's blocks; returns the block ids not loaded (vLLM recomputes them)."""
        layout = self._layout
        if layout is None:
            self._load_failed(work.block_ids, "no KV caches registered")
            return set(work.block_ids)
        unique = list(dict.fromkeys(work.keys))
        targets: dict[bytes, list[int]] = {}
        for block_id, key in zip(work.block_ids, work.keys):
            targets.setdefault(key, []).append(block_id)

        def consume(arena, verified) -> None:
            views = self._arena_views(arena)
            slots = [block.slot for i, block in verified for _ in targets[unique[i]]]
            block_ids = [b for i, _ in verified for b in targets[unique[i]]]
            self._copies.run(after, lambda: views.unpack(slots, block_ids))
        try:
            # A trial even while this worker's breaker is open: the scheduler has just found these blocks
            # in the daemon, so it is likely back (e.g. it was down when the engine started, which opened
            # this breaker, and came up before the next health probe). Short-circuited, the load would
            # fail, and vLLM would look the request up and load it again at every step until the probe.
            with self._daemon.trial():
                outcome = load_blocks(self._daemon, self._namespaces[0], unique, layout.block_bytes, consume)
        except Exception as error:  # noqa: BLE001 - never fail the step: recompute instead
            self._daemon.forget_limits()
            self._load_failed(work.block_ids, None if isinstance(error, BreakerOpen) else _error_text(error))
            return set(work.block_ids)
        failed = {b for i, key in enumerate(unique) if not outcome.loaded[i] for b in targets[key]}
        self._count(loaded_blocks=len(work.block_ids) - len(failed))
        self._explain(outcome)
        if failed:
            self._load_failed(sorted(failed), None)
        return failed

    def _explain(self, outcome) -> None:
        if outcome.missing:
            self._log.warning("load:not", "%d blocks not loaded (no longer stored); vLLM recomputes them",
                              outcome.missing)
        for key, length in outcome.wrong_length:
            self._log.warning("load:length", "block %s not loaded (length %d bytes, expected %d); vLLM "
                              "recomputes it", key.hex()[:16], length, self._layout.block_bytes)
        if outcome.corrupt:
            self._log.warning("load:checksum", "%d blocks not loaded (checksum mismatch in shared memory, first "
                              "%s): deleted, vLLM recomputes them", len(outcome.corrupt), outcome.corrupt[0].hex()[:16])
        if outcome.delete_error is not None:
            self._log.warning("delete", "could not delete %d corrupt blocks (%s)", len(outcome.corrupt),
                              _error_text(outcome.delete_error))

    def _load_failed(self, block_ids, reason: str | None) -> None:
        if reason:
            self._log.warning("load", "%d blocks not loaded (%s); vLLM recomputes them", len(block_ids), reason)
        self._count(load_errors=len(block_ids))

    def wait_for_layer_load(self, layer_name: str) -> None:
        return  # loads complete before the request is scheduled (asynchronous) or in start_load_kv

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: "AttentionMetadata",
                      **kwargs: Any) -> None:
        return  # all layers are saved together in wait_for_save: one block = every layer

    # -- saves -----------------------------------------------------------------------------------------
    def wait_for_save(self):
        """Hands this step's saves to the save thread (async_saves) and returns: the copies and the
        commits run while the engine goes on; vLLM keeps a finished request's blocks until get_finished
        reports that no copy reads them. Past max_inflight_save_bytes a save is dropped, never waited for."""
        if not self.has_connector_metadata():
            return
        meta = self._get_connector_metadata()
        assert isinstance(meta, KvtierConnectorMetadata)
        self._transfers.expect(work.req_id for work in meta.saves)
        failed_reqs, self._failed_reqs = self._failed_reqs, set()
        if not meta.saves or self._layout is None:
            return
        after = self._copies.mark()
        for work in meta.saves:
            # A request whose synchronous load failed this step computed its later tokens against a missing
            # block: its KV from this step is not stored (vLLM recomputes it, and the save is scheduled again).
            if work.req_id not in failed_reqs:
                self._submit_save(work, after)

    def _submit_save(self, work: SaveWork, after) -> None:
        block_ids = list(work.block_ids)
        blocks = [BlockToSave(key, parent, self._layout.block_bytes, retention, token_ids or (), work.lora_name)
                  for key, parent, retention, token_ids in zip(
                      work.keys, work.parents, work.retentions or [None] * len(work.keys),
                      work.token_ids or [[]] * len(work.keys))]
        nbytes = len(blocks) * self._layout.block_bytes

        def run(job: SaveJob) -> None:
            self._save(job, block_ids, blocks, after)
        if not self._async_saves:
            self._transfers.run_save_now(work.req_id, nbytes, run)
        elif not self._transfers.submit_save(work.req_id, nbytes, run):
            self._count(dropped_save_blocks=len(blocks))
            self._log.warning("save:bound", "%d blocks not stored: %d bytes of saves already in flight "
                              "(max_inflight_save_bytes)", len(blocks), self.stats["inflight_save_bytes"])

    def _save(self, job: SaveJob, block_ids: list[int], blocks: list[BlockToSave], after) -> None:
        def fill(arena, slots) -> None:
            views = self._arena_views(arena)
            job.start_copy()
            try:
                self._copies.run(after, lambda: views.pack(block_ids, slots))
            finally:
                job.end_copy()
        try:
            statuses = save_blocks(self._daemon, self._namespaces[0], blocks, fill,
                                   allocate_wait_ms=self._allocate_wait_ms, origin=self._origin)
        except SlotTooSmall as error:
            self._count(save_errors=len(blocks))
            self._log.warning("save:slot", "%s", error)
            return
        except grpc.RpcError as error:
            self._count(save_errors=len(blocks))
            self._daemon.forget_limits()
            if not isinstance(error, BreakerOpen):
                self._log.warning("save", "%d blocks not stored (%s)", len(blocks), _error_text(error))
            return
        stored = sum(1 for status in statuses if status == pb.STORED)
        self._count(saved_blocks=stored, duplicate_blocks=sum(1 for s in statuses if s == pb.DUPLICATE),
                    save_errors=len(statuses) - sum(1 for s in statuses if s in (pb.STORED, pb.DUPLICATE)),
                    retained_blocks=sum(1 for s, b in zip(statuses, blocks)
                                        if s == pb.STORED and b.retention is not None))

    # -- completion ------------------------------------------------------------------------------------
    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        """(saved, loaded): finished requests whose blocks no save copy reads any more, and requests whose
        asynchronous loads ended (their failed blocks are in get_block_ids_with_load_errors by then)."""
        if self._transfers is None:
            return None, None
        meta = self._connector_metadata
        if isinstance(meta, KvtierConnectorMetadata) and meta.idle:
            # Nothing computed this step: the engine only waits for us. Wait here (a little) instead of
            # letting its loop spin, which would starve the transfer threads of the interpreter lock.
            self._transfers.wait_progress(self._idle_wait_s)
        sending, receiving = self._transfers.finished(finished_req_ids)
        return sending or None, receiving or None

    def get_block_ids_with_load_errors(self) -> set[int]:
        return self._transfers.take_load_errors() if self._transfers is not None else set()

    def shutdown(self):
        if self._transfers is not None:
            self._transfers.close()
        if self._prefetcher is not None:
            self._prefetcher.shutdown(wait=True, cancel_futures=True)
        if self._lookup_pool is not None:
            self._lookup_pool.shutdown(wait=False, cancel_futures=True)
        logger.info("kvtier: %s connector stats %s", self._role.name.lower(), self.stats)
        self._views = self._views_of = None
        self._daemon.close()
