"""SGLang HiCache storage backend against a real kvtierd.

The backend is loaded the way SGLang loads it (``StorageBackendFactory.create_backend("dynamic", ...)``
then ``register_mem_pool_host``) over real SGLang host KV pools (``MHATokenToKVPoolHost`` /
``MLATokenToKVPoolHost``) built on CPU from real SGLang device pools, with page keys from SGLang's own
page hash (``get_hash_str``). Needs the sglang wheel (requirements/sglang.txt); skipped without it.
"""

from __future__ import annotations

import enum
import hashlib
import importlib.machinery
import importlib.util
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
import types
from types import SimpleNamespace

import pytest

pytest.importorskip("sglang.srt.mem_cache.hicache_storage", reason="sglang is not installed")

import torch  # noqa: E402

from kvtier.client import Client  # noqa: E402
from kvtier.client.process import DaemonProcess  # noqa: E402
from kvtier.connectors.sglang import KvtierHiCacheStorage, page_key  # noqa: E402

PAGE = 8  # tokens per page
DAEMON_CONFIG = {"cpu.capacity": "64MiB", "cpu.slot_bytes": "64KiB", "disk.capacity": "256MiB",
                 "disk.segment_bytes": "8MiB", "disk.batch_blocks": 16, "limits.default_lease_ms": 5000}


# -- SGLang objects ------------------------------------------------------------------------------------
def _torchvision_shim() -> dict[str, types.ModuleType]:
    """Import-time names sglang's multimodal configs take from torchvision (InternVL/DeepSeek-OCR image
    transforms, never called here). PyPI's torchvision is a CUDA build that breaks the CPU torch this
    venv shares with vLLM, so it is not installed; these modules stand in while sglang imports."""
    def module(name, package=False):
        mod = types.ModuleType(name)
        mod.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=package)
        if package:
            mod.__path__ = []
        return mod
    tv, transforms = module("torchvision", True), module("torchvision.transforms", True)
    functional = module("torchvision.transforms.functional")

    class InterpolationMode(enum.Enum):
        NEAREST = "nearest"
        BILINEAR = "bilinear"
        BICUBIC = "bicubic"
    functional.InterpolationMode = transforms.InterpolationMode = InterpolationMode
    transforms.functional, tv.transforms = functional, transforms
    return {"torchvision": tv, "torchvision.transforms": transforms, "torchvision.transforms.functional": functional}


@pytest.fixture(scope="module")
def sgl():
    return load_sglang()


def load_sglang() -> SimpleNamespace:
    """SGLang's storage classes (its own factory and host pools), imported as an engine would."""
    shim = {}
    if importlib.util.find_spec("torchvision") is None:
        import transformers  # noqa: F401 - decides torchvision availability before the shim exists
        shim = _torchvision_shim()
        for name, mod in shim.items():
            sys.modules.setdefault(name, mod)
    try:
        from sglang.srt.mem_cache.hicache_storage import HiCacheStorageConfig, HiCacheStorageExtraInfo
        from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool, MLATokenToKVPool
        from sglang.srt.mem_cache.pool_host.mha import get_mha_host_pool_cls
        from sglang.srt.mem_cache.pool_host.mla import MLATokenToKVPoolHost
        from sglang.srt.mem_cache.storage.backend_factory import StorageBackendFactory
        from sglang.srt.mem_cache.utils import get_hash_str
        from sglang.srt.observability.metrics_collector import StorageMetrics
    finally:
        for name, mod in shim.items():
            if sys.modules.get(name) is mod:
                del sys.modules[name]
    return SimpleNamespace(
        HiCacheStorageConfig=HiCacheStorageConfig, HiCacheStorageExtraInfo=HiCacheStorageExtraInfo,
        MHATokenToKVPool=MHATokenToKVPool, MLATokenToKVPool=MLATokenToKVPool,
        get_mha_host_pool_cls=get_mha_host_pool_cls, MLATokenToKVPoolHost=MLATokenToKVPoolHost,
        StorageBackendFactory=StorageBackendFactory, get_hash_str=get_hash_str, StorageMetrics=StorageMetrics)


def host_pool(sgl, layout="page_first", mla=False, layers=2, heads=4, head_dim=32, dtype=torch.bfloat16,
              seed=0):
    """A real SGLang device pool on CPU and its host pool (as SGLang's pool assembler builds it, with
    pinned memory off: there is no CUDA here), filled with random bytes."""
    if mla:
        device = sgl.MLATokenToKVPool(256, PAGE, dtype, 64, 16, layers, "cpu", False, start_layer=0,
                                      end_layer=layers - 1)
    else:
        device = sgl.MHATokenToKVPool(256, PAGE, dtype, heads, head_dim, layers, "cpu", False, start_layer=0,
                                      end_layer=layers - 1)
    info = device.get_device_pool_infos()[0].buffer_info
    common = dict(host_to_device_ratio=2.0, host_size=0, page_size=PAGE, layout=layout, pin_memory=False,
                  device="cpu", device_capacity_tokens=device.size, start_layer=device.start_layer,
                  end_layer=device.end_layer)
    if mla:
        pool = sgl.MLATokenToKVPoolHost(info, target_layer_num=device.layer_num,
                                        override_kv_cache_dim=device.kv_cache_dim, **common)
    else:
        pool = sgl.get_mha_host_pool_cls(info)(info, write_back_staging=device.hicache_write_back_staging, **common)
    raw = pool.kv_buffer.view(torch.uint8)
    raw.copy_(torch.randint(0, 256, raw.shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(seed)))
    return pool


def page_bytes(pool, host_indices: torch.Tensor, page: int) -> bytes:
    index = int(host_indices[page * PAGE])
    return bytes(pool.get_data_page(index, flat=True).view(torch.uint8).numpy())


def make_backend(sgl, socket, pool=None, model="org/tiny-model", tp_rank=0, tp_size=1, mla=False, **extra):
    """What SGLang's HiCacheController.attach_storage_backend does for --hicache-storage-backend dynamic."""
    config = sgl.HiCacheStorageConfig(
        tp_rank=tp_rank, tp_size=tp_size, pp_rank=0, pp_size=1, attn_cp_rank=0, attn_cp_size=1,
        is_mla_model=mla, enable_storage_metrics=extra.pop("enable_storage_metrics", False),
        is_page_first_layout=getattr(pool, "layout", None) == "page_first", model_name=model,
        extra_config={"backend_name": "kvtier", "module_path": "kvtier.connectors.sglang",
                      "class_name": "KvtierHiCacheStorage", "interface_v1": 1, "socket": socket,
                      "timeout_s": 3, **extra})
    backend = sgl.StorageBackendFactory.create_backend("dynamic", config, pool)
    if pool is not None:
        backend.register_mem_pool_host(pool)
    backend.on_host_pools_registered()
    return backend


def chain(sgl, tokens: list[int]) -> list[str]:
    """SGLang's storage page keys of a token sequence (no extra key / cache salt)."""
    return sgl.get_hash_str(tokens, None, page_size=PAGE)


def tokens(n_pages: int, seed: int = 0) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 150_000, (n_pages * PAGE,), generator=g).tolist()


class RpcCounter:
    """Counts the data-path RPCs a backend sends (lookup, acquire, release, allocate, commit, abort; every
    RPC with `every`), at its client's stub: what really reaches the daemon."""

    COUNTED = ("Lookup", "Acquire", "Release", "Allocate", "Commit", "Abort")

    def __init__(self, backend, every: bool = False):
        self.counts: dict[str, int] = {}
        counter = self

        class Stub:
            def __init__(self, stub):
                self._stub = stub

            def __getattr__(self, name):
                method = getattr(self._stub, name)
                if name not in RpcCounter.COUNTED and not every:
                    return method

                def counted(*args, **kwargs):
                    counter.counts[name.lower()] = counter.counts.get(name.lower(), 0) + 1
                    return method(*args, **kwargs)
                return counted
        backend._client.stub = Stub(backend._client.stub)


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """One kvtierd for the tests that neither stop nor reconfigure it (daemon starts dominate this file's
    runtime). Tests sharing it keep apart by model name, which namespaces their pages."""
    daemon = DaemonProcess(tmp_path_factory.mktemp("sglang"), DAEMON_CONFIG, name="shared")
    daemon.start()
    yield daemon
    daemon.kill()
    daemon.cleanup()


@pytest.fixture
def srv(shared, request):
    """The shared daemon's socket and a model name of this test's own."""
    return SimpleNamespace(socket=shared.socket, model=f"org/{request.node.name}")


# -- tests ---------------------------------------------------------------------------------------------
def test_factory_loads_the_backend_and_namespaces_it(sgl, srv):
    pool = host_pool(sgl, "page_first")
    backend = make_backend(sgl, srv.socket, pool, model=srv.model)
    assert isinstance(backend, KvtierHiCacheStorage)
    assert backend.page_bytes == 2 * 2 * PAGE * 4 * 32 * 2
    assert backend.batch_exists(chain(sgl, tokens(2))) == 0  # registers the namespace
    with Client(srv.socket) as c:
        (ns,) = [n for n in c.list_namespaces() if n.name == backend.namespace]
    assert ns.name == backend.namespace and ns.name.startswith("sglang.")
    attrs = dict(ns.attributes)
    assert attrs["model"] == srv.model and attrs["tp_rank"] == "0" and attrs["mla"] == "false"
    assert attrs["layout"] == "page_first" and attrs["kv_dtype"] == "bfloat16" and attrs["page_size"] == str(PAGE)
    assert attrs["page_bytes"] == str(backend.page_bytes) and attrs["pool"] == "MHATokenToKVPoolHost"


def test_page_keys_are_sglang_sha256_chains(sgl):
    toks = tokens(3)
    keys = chain(sgl, toks)
    digest = b""
    for p in range(3):  # SHA-256 over the previous digest and the page's tokens as little-endian uint32
        digest = hashlib.sha256(digest + struct.pack(f"<{PAGE}I", *toks[p * PAGE:(p + 1) * PAGE])).digest()
        assert keys[p] == digest.hex() and page_key(keys[p]) == digest
    assert page_key("not-a-hash") == hashlib.sha256(b"not-a-hash").digest()


def test_tensor_set_exists_get_round_trip(sgl, srv):
    backend = make_backend(sgl, srv.socket, model=srv.model, interface_v1=0)
    keys = chain(sgl, tokens(4))
    values = [torch.randn(2, PAGE, 16, dtype=torch.bfloat16) for _ in keys]
    assert not backend.exists(keys[0])
    assert backend.get(keys[0], torch.empty(2 * PAGE * 16, dtype=torch.bfloat16)) is None
    assert backend.set(keys[0], values[0])
    assert backend.exists(keys[0])
    target = torch.empty(2 * PAGE * 16, dtype=torch.bfloat16)
    got = backend.get(keys[0], target)
    assert got is target and torch.equal(got.view(values[0].shape), values[0])
    assert backend.batch_set(keys[1:], values[1:])
    targets = [torch.zeros_like(v) for v in values]
    got = backend.batch_get(keys, targets)
    assert all(g is t for g, t in zip(got, targets))
    assert all(torch.equal(t, v) for t, v in zip(targets, values))
    plain = backend.get(keys[2])  # no target: a new uint8 tensor
    assert bytes(plain.numpy()) == bytes(values[2].view(torch.uint8).reshape(-1).numpy())
    assert backend.batch_get([keys[0], "ff" * 32], [torch.empty(0)] * 2) == [None, None]  # wrong size; absent
    assert backend.batch_exists(keys) == 4


@pytest.mark.parametrize("layout", ["layer_first", "page_first"])
def test_tensor_interface_through_host_pools(sgl, srv, layout):
    """SGLang's non-zero-copy controller path (interface_v1 off): get_data_page -> batch_set, and
    get_dummy_flat_data_page -> batch_get -> set_from_flat_data_page."""
    writer_pool, reader_pool = host_pool(sgl, layout, seed=21), host_pool(sgl, layout, seed=22)
    writer = make_backend(sgl, srv.socket, writer_pool, model=srv.model, interface_v1=0)
    reader = make_backend(sgl, srv.socket, reader_pool, model=srv.model, interface_v1=0)
    assert writer.attributes["page_format"] == "flat_page"
    keys = chain(sgl, tokens(3, seed=23))
    src, dst = writer_pool.alloc(3 * PAGE), reader_pool.alloc(3 * PAGE)
    data = [writer_pool.get_data_page(src[p * PAGE]) for p in range(3)]
    assert writer.batch_set(keys, data)
    pages = reader.batch_get(keys, [reader_pool.get_dummy_flat_data_page() for _ in keys])
    for p, page in enumerate(pages):
        reader_pool.set_from_flat_data_page(dst[p * PAGE], page)
    assert [page_bytes(reader_pool, dst, p) for p in range(3)] == [page_bytes(writer_pool, src, p) for p in range(3)]


def test_batch_exists_counts_leading_hits(sgl, srv):
    pool = host_pool(sgl)
    backend = make_backend(sgl, srv.socket, pool, model=srv.model)
    keys = chain(sgl, tokens(8))
    idx = pool.alloc(8 * PAGE)

    def store(pages):
        sel = torch.cat([idx[p * PAGE:(p + 1) * PAGE] for p in pages])
        assert backend.batch_set_v1([keys[p] for p in pages], sel) == [True] * len(pages)
    store(range(5))
    assert backend.batch_exists(keys) == 5
    store([6, 7])  # a gap at page 5
    assert backend.batch_exists(keys) == 5
    assert backend.batch_exists(keys[6:]) == 2
    store([5])
    assert backend.batch_exists(keys) == 8
    assert backend.batch_exists(keys[:3] + chain(sgl, tokens(1, seed=9)) + keys[4:]) == 3


@pytest.mark.parametrize("layout,mla", [("layer_first", False), ("page_first", False), ("page_first_direct", False),
                                        ("page_head", False), ("layer_first", True), ("page_first", True)])
def test_v1_round_trip_through_host_pools_is_byte_exact(sgl, srv, layout, mla):
    """One engine backs pages up, another engine (own host pool, fresh indices) loads them."""
    writer_pool, reader_pool = host_pool(sgl, layout, mla, seed=1), host_pool(sgl, layout, mla, seed=2)
    writer = make_backend(sgl, srv.socket, writer_pool, model=srv.model, mla=mla)
    reader = make_backend(sgl, srv.socket, reader_pool, model=srv.model, mla=mla)
    assert writer.namespace == reader.namespace
    keys = chain(sgl, tokens(6, seed=3))
    src = writer_pool.alloc(6 * PAGE)
    reader_pool.alloc(3 * PAGE)  # the reader's pages land elsewhere in its pool
    dst = reader_pool.alloc(6 * PAGE)
    want = [page_bytes(writer_pool, src, p) for p in range(6)]
    assert want[0] != page_bytes(reader_pool, dst, 0)

    rpcs = RpcCounter(writer)
    assert writer.batch_set_v1(keys, src) == [True] * 6
    assert rpcs.counts == {"lookup": 1, "allocate": 1, "commit": 1}  # one batch, no per-page RPC
    assert writer.batch_set_v1(keys, src) == [True] * 6  # already stored: skipped after one Lookup
    assert rpcs.counts == {"lookup": 2, "allocate": 1, "commit": 1}

    rpcs = RpcCounter(reader)
    assert reader.batch_exists(keys) == 6
    assert reader.batch_get_v1(keys, dst) == [True] * 6
    assert rpcs.counts == {"lookup": 1, "acquire": 1, "release": 1}
    assert [page_bytes(reader_pool, dst, p) for p in range(6)] == want

    missing = chain(sgl, tokens(2, seed=4))
    assert reader.batch_get_v1([keys[0], missing[0]], dst[:2 * PAGE]) == [True, False]


def test_shared_prefix_hits_and_parents_chain(sgl, srv):
    pool = host_pool(sgl)
    backend = make_backend(sgl, srv.socket, pool, model=srv.model)
    first = tokens(8, seed=5)
    second = first[:5 * PAGE] + tokens(3, seed=6)  # shares 5 pages, then diverges
    keys_a, keys_b = chain(sgl, first), chain(sgl, second)
    assert keys_a[:5] == keys_b[:5] and keys_a[5] != keys_b[5]
    idx = pool.alloc(8 * PAGE)
    # SGLang backs a sequence up in batches; prefix_keys names the pages before each batch.
    assert backend.batch_set_v1(keys_a[:4], idx[:4 * PAGE]) == [True] * 4
    assert backend.batch_set_v1(keys_a[4:], idx[4 * PAGE:],
                                sgl.HiCacheStorageExtraInfo(prefix_keys=keys_a[:4])) == [True] * 4
    assert backend.batch_exists(keys_b) == 5
    with Client(srv.socket) as c:
        assert c.stat(backend.namespace, page_key(keys_a[0])).parent == b""
        for p in range(1, 8):
            assert c.stat(backend.namespace, page_key(keys_a[p])).parent == page_key(keys_a[p - 1])


def test_models_and_tp_ranks_do_not_share_pages_mla_ranks_do(sgl, srv):
    keys = chain(sgl, tokens(3, seed=7))
    pool = host_pool(sgl)
    idx = pool.alloc(3 * PAGE)

    def backend(pool=pool, model=srv.model, **kw):
        return make_backend(sgl, srv.socket, pool, model=model, **{"tp_rank": 0, "tp_size": 2, **kw})
    assert backend().batch_set_v1(keys, idx) == [True] * 3
    assert backend().batch_exists(keys) == 3  # the same engine again (e.g. restarted)
    assert backend(tp_rank=1).batch_exists(keys) == 0
    assert backend(tp_size=1).batch_exists(keys) == 0
    assert backend(model=srv.model + "-other").batch_exists(keys) == 0
    assert backend(host_pool(sgl, "layer_first")).batch_exists(keys) == 0  # another page format
    assert backend(host_pool(sgl, dtype=torch.float16)).batch_exists(keys) == 0  # another KV dtype
    # MLA KV is the same on every TP rank: rank 1 finds what rank 0 stored.
    mla_pool = host_pool(sgl, mla=True)
    assert backend(mla_pool, mla=True).batch_set_v1(keys, mla_pool.alloc(3 * PAGE)) == [True] * 3
    assert backend(mla_pool, mla=True, tp_rank=1).batch_exists(keys) == 3
    assert backend(tp_rank=1).batch_exists(keys) == 0


def test_daemon_down_degrades_to_misses(sgl, make_daemon, tmp_path):
    pool = host_pool(sgl)
    idx = pool.alloc(4 * PAGE)
    keys = chain(sgl, tokens(4, seed=8))
    # No daemon at all: the backend still loads.
    nowhere = make_backend(sgl, str(tmp_path / "absent.sock"), pool)
    assert nowhere.batch_exists(keys) == 0
    assert nowhere.batch_get_v1(keys, idx) == [False] * 4
    assert nowhere.batch_set_v1(keys, idx) == [False] * 4

    daemon = make_daemon()
    backend = make_backend(sgl, daemon.socket, pool, breaker_period_s=0.2)
    assert backend.batch_set_v1(keys, idx) == [True] * 4
    daemon.kill()
    assert backend.batch_exists(keys) == 0
    assert backend.exists(keys[0]) is False
    assert backend.batch_get_v1(keys, idx) == [False] * 4
    assert backend.batch_set_v1(keys, idx) == [False] * 4
    assert backend.get(keys[0], torch.empty(8)) is None
    assert backend.set(keys[0], torch.zeros(8)) is False
    assert backend.batch_get(keys, None) == [None] * 4
    assert backend.clear() is False
    assert backend.stats["rpc_errors"] >= 8
    # A refused connection opened the circuit breaker: everything after it failed without a call.
    assert backend.stats["breaker_opened"] == 1 and backend.stats["short_circuited"] >= 7

    from conftest import wait_for  # noqa: PLC0415 - not at import: _sglang_tenant.py imports this module
    daemon.start()  # the same backend recovers (new arena generation, namespace re-registered if lost)
    wait_for(lambda: not backend._daemon.breaker_open, what="the health probe to close the breaker")
    wait_for(lambda: backend.batch_set_v1(keys, idx) == [True] * 4, what="a backup to succeed")
    assert backend.batch_exists(keys) == 4
    assert backend.batch_get_v1(keys, idx) == [True] * 4


def test_a_hung_daemon_costs_one_deadline_then_every_batch_fails_fast(sgl, make_daemon, caplog):
    """kvtierd SIGSTOPped: the first batch waits out one deadline, the circuit breaker opens, and every
    batch after it is a miss / False at once, with no RPC sent; SIGCONT, a health probe closes the breaker
    and the same backend serves again."""
    from conftest import sigstop, wait_for  # noqa: PLC0415 - see test_daemon_down_degrades_to_misses
    daemon = make_daemon()
    pool = host_pool(sgl, seed=51)
    # Deadline max(timeout_s, allocate_wait_ms + 1 s) = 1.2 s; probes only when this test asks.
    backend = make_backend(sgl, daemon.socket, pool, timeout_s=1, breaker_period_s=3600)
    keys = chain(sgl, tokens(4, seed=52))
    idx, dst = pool.alloc(4 * PAGE), pool.alloc(4 * PAGE)
    assert backend.batch_set_v1(keys, idx) == [True] * 4
    rpcs = RpcCounter(backend, every=True)
    sigstop(daemon.pid)
    try:
        started = time.monotonic()
        assert backend.batch_exists(keys) == 0
        assert 1.2 * 0.9 <= time.monotonic() - started < 1.2 + 1.5   # one deadline
        assert backend._daemon.breaker_open and backend.stats["daemon_timeouts"] == 1
        sent = dict(rpcs.counts)
        started = time.monotonic()
        for _ in range(20):
            assert backend.batch_exists(keys) == 0
            assert backend.batch_get_v1(keys, dst) == [False] * 4
            assert backend.batch_set_v1(keys, idx) == [False] * 4
            assert backend.batch_get(keys, None) == [None] * 4
            assert backend.set(keys[0], torch.zeros(8)) is False
        assert time.monotonic() - started < 1.0                        # 100 batches in less than a deadline
        assert rpcs.counts == sent                                     # none reached the daemon
        assert backend.stats["short_circuited"] == 100 and backend.stats["daemon_timeouts"] == 1
        assert backend.stats["breaker_opened"] == 1 and backend.stats["breaker_open"] == 1
        assert backend.stats["load_misses"] == 20 * 8 and backend.stats["rpc_errors"] == 101
        assert not backend._daemon.probe()                            # a stopped daemon fails its health check
    finally:
        os.kill(daemon.pid, signal.SIGCONT)
    wait_for(backend._daemon.probe, what="a health check answered SERVING")
    assert backend.stats["breaker_open"] == 0 and backend.stats["breaker_closed"] == 1
    assert backend.batch_exists(keys) == 4
    assert backend.batch_get_v1(keys, dst) == [True] * 4
    assert [page_bytes(pool, dst, p) for p in range(4)] == [page_bytes(pool, idx, p) for p in range(4)]
    assert "circuit breaker OPEN" in caplog.text and "circuit breaker CLOSED" in caplog.text


def test_page_larger_than_an_arena_slot_fails_gracefully(sgl, srv):
    pool = host_pool(sgl, heads=16, head_dim=128)  # 128 KiB pages; the daemon's slots are 64 KiB
    backend = make_backend(sgl, srv.socket, pool, model=srv.model)
    assert backend.page_bytes == 128 << 10
    keys = chain(sgl, tokens(2))
    assert backend.batch_set_v1(keys, pool.alloc(2 * PAGE)) == [False, False]
    assert backend.batch_exists(keys) == 0


def test_block_corrupted_on_disk_is_a_miss(sgl, make_daemon):
    daemon = make_daemon()
    pool = host_pool(sgl, seed=11)
    backend = make_backend(sgl, daemon.socket, pool)
    keys = chain(sgl, tokens(6, seed=12))
    idx = pool.alloc(6 * PAGE)
    want = [page_bytes(pool, idx, p) for p in range(6)]
    assert backend.batch_set_v1(keys, idx) == [True] * 6
    assert daemon.stop() == 0  # drains the write-through to disk
    daemon.flip_on_disk(want[3], at=100)
    daemon.start()

    fresh = host_pool(sgl, seed=13)
    reader = make_backend(sgl, daemon.socket, fresh)
    dst = fresh.alloc(6 * PAGE)
    assert reader.batch_get_v1(keys, dst) == [True, True, True, False, True, True]
    assert [page_bytes(fresh, dst, p) for p in (0, 1, 2, 4, 5)] == [want[p] for p in (0, 1, 2, 4, 5)]
    assert page_bytes(fresh, dst, 3) != want[3]
    assert reader.batch_exists(keys) == 3  # quarantined: gone from the index
    with Client(daemon.socket) as c:
        assert c.stats().quarantined == 1


def test_checksum_mismatch_in_shared_memory_is_a_miss(sgl, srv):
    pool = host_pool(sgl)
    backend = make_backend(sgl, srv.socket, pool, model=srv.model)
    keys = chain(sgl, tokens(3, seed=14))
    idx = pool.alloc(3 * PAGE)

    def corrupt(page):  # flip a byte of a page in the daemon's CPU tier
        with Client(srv.socket) as c:
            # After the write-through: a block still queued for disk would be caught (and dropped)
            # by the daemon's own check before the connector could see the mismatch.
            deadline = time.monotonic() + 30
            while c.stats().write_backlog and time.monotonic() < deadline:
                time.sleep(0.02)
            lease = c.acquire(backend.namespace, [page_key(keys[page])])
            c.arena().view(lease.blocks[0].slot)[10] ^= 0x01
            c.release(lease.id)
    assert backend.batch_set_v1(keys, idx) == [True] * 3
    corrupt(1)
    dst = pool.alloc(3 * PAGE)
    assert backend.batch_get_v1(keys, dst) == [True, False, True]
    assert backend.stats["checksum_errors"] == 1
    assert backend.batch_exists(keys) == 1  # the bad copy was deleted...
    assert backend.batch_set_v1(keys, idx) == [True] * 3  # ...so SGLang's next backup stores it again
    assert backend.batch_get_v1(keys, dst) == [True] * 3
    assert [page_bytes(pool, dst, p) for p in range(3)] == [page_bytes(pool, idx, p) for p in range(3)]
    corrupt(2)  # the tensor interface checks too
    assert backend.get(keys[2]) is None and backend.get(keys[0]) is not None
    assert backend.stats["checksum_errors"] == 2 and backend.batch_exists(keys) == 2


def test_clear_and_storage_metrics(sgl, srv):
    pool = host_pool(sgl)
    backend = make_backend(sgl, srv.socket, pool, model=srv.model, enable_storage_metrics=True)
    other = make_backend(sgl, srv.socket, pool, model=srv.model + "-other")
    keys = chain(sgl, tokens(4, seed=15))
    idx = pool.alloc(4 * PAGE)
    assert backend.batch_set_v1(keys, idx) == [True] * 4
    assert other.batch_set_v1(keys, idx) == [True] * 4
    assert backend.batch_get_v1(keys, idx) == [True] * 4
    metrics = backend.get_stats()
    assert isinstance(metrics, sgl.StorageMetrics)
    assert metrics.backup_pgs == [4] and metrics.prefetch_pgs == [4]
    assert len(metrics.backup_bandwidth) == 1 and metrics.backup_bandwidth[0] > 0
    assert backend.get_stats().backup_pgs == []  # drained per call, like SGLang's other backends
    assert backend.clear() is True
    assert backend.batch_exists(keys) == 0
    assert other.batch_exists(keys) == 4  # only this backend's namespace
    backend.close()


def test_hints_set_the_retention_of_stored_pages(sgl, srv):
    """extra_config default_hints for every page; a batch's extra_info.extra_info["kvtier"] over them, with
    token ranges placed by prefix_keys; bad hints fall back to the defaults."""
    pool = host_pool(sgl)
    backend = make_backend(sgl, srv.socket, pool, model=srv.model,
                           default_hints={"retention": {"class": "subagent", "priority": 30}})
    keys = chain(sgl, tokens(8, seed=31))
    idx = pool.alloc(8 * PAGE)
    pages = lambda a, b: idx[a * PAGE:b * PAGE]  # noqa: E731
    assert backend.batch_set_v1(keys[:2], pages(0, 2)) == [True] * 2  # no extra_info: the defaults
    hints = {"kvtier": {"ranges": [{"tokens": 3 * PAGE, "class": "system", "priority": 90,
                                    "cache_control": {"type": "ephemeral", "ttl": "1h"}}],
                        "retention": {"class": "conversation", "priority": 70}}}
    # Pages 2..5 after 2 prefix pages: page 2 (tokens 16..23) is in the first 3 pages' range, 3..5 are not.
    assert backend.batch_set_v1(keys[2:6], pages(2, 6),
                                sgl.HiCacheStorageExtraInfo(prefix_keys=keys[:2], extra_info=hints)) == [True] * 4
    # Without prefix_keys the batch's position is unknown: the request retention, no ranges.
    assert backend.batch_set_v1(keys[6:7], pages(6, 7), sgl.HiCacheStorageExtraInfo(extra_info=hints)) == [True]
    bad = {"kvtier": {"retention": {"class": "forever"}}}
    assert backend.batch_set_v1(keys[7:], pages(7, 8),
                                sgl.HiCacheStorageExtraInfo(prefix_keys=keys[:7], extra_info=bad)) == [True]
    assert backend.stats["bad_hints"] == 1
    tensor_key = chain(sgl, tokens(1, seed=32))[0]
    assert backend.batch_set([tensor_key], [torch.zeros(64, dtype=torch.bfloat16)])  # tensor API: the defaults
    with Client(srv.socket) as c:
        got = [c.stat(backend.namespace, page_key(k)).retention for k in keys + [tensor_key]]
    assert [(r.cls, r.priority, r.ttl_s) for r in got] == [
        ("subagent", 30, 0.0)] * 2 + [("system", 90, 3600.0)] + [("conversation", 70, 0.0)] * 4 + [
        ("subagent", 30, 0.0)] * 2
    with pytest.raises(Exception, match="default_hints"):
        make_backend(sgl, srv.socket, pool, model=srv.model, default_hints={"ranges": [{"tokens": -1}]})


def test_an_engine_running_as_a_tenant_backs_up_and_loads_in_its_tenants_namespace(make_daemon, tmp_path):
    """SGLang's own factory builds the backend in a process running as the tenant's uid; the daemon
    gives it the tenant's arena part and namespace prefix from the uid alone."""
    uid = 40012
    daemon = make_daemon({**DAEMON_CONFIG, "server.socket_mode": "0666",
                          "tenant": [{"name": "team-s", "uids": [uid], "cpu_capacity": "8MiB"}]})
    home = tempfile.mkdtemp(prefix="kvt-tenant-home-")  # root's caches are not the tenant's to write
    os.chown(home, uid, uid)
    from conftest import tenant_env  # noqa: PLC0415 - not at import: _sglang_tenant.py imports this module
    env = tenant_env(dict(os.environ), home)
    try:
        done = subprocess.run(["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", sys.executable,
                               os.path.join(os.path.dirname(__file__), "_sglang_tenant.py"), daemon.socket],
                              capture_output=True, text=True, timeout=300, cwd=home, env=env)
    finally:
        shutil.rmtree(home, ignore_errors=True)
    assert done.returncode == 0, done.stderr[-4000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["namespace"].startswith("team-s/sglang.") and result["stored"] == [True] * 4
    assert result["loaded"] == [True] * 4 and result["byte_exact"]
    with Client(daemon.socket) as admin:  # the administrator sees the tenant's pages under its prefix
        (namespace,) = [n for n in admin.list_namespaces()]
        assert namespace.name == result["namespace"] and namespace.blocks == 4
