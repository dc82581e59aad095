"""GPU tier: device-pool slots, eviction and pins, host <-> device copies, CUDA IPC handles.

The tier runs on the CPU device here (the same code path as CUDA, with plain copies). Tests marked
`needs_gpu` prove the CUDA paths (the tier's own stream, pinned host memory, IPC into a second
process) and skip on machines without one.
"""

from __future__ import annotations

import hashlib
import logging
import mmap
import os
import random
import subprocess
import sys
import textwrap
import warnings

import pytest

from kvtier.tiers import gpu
from kvtier.tiers.arena import SharedArena
from kvtier.tiers.eviction import FifoPolicy, LruPolicy
from kvtier.tiers.gpu import DevicePool, GpuTier, IpcSlotHandle, gpu_available, parse_device

torch = gpu._import_torch()
HAS_CUDA = torch is not None and torch.cuda.is_available()
needs_torch = pytest.mark.skipif(torch is None, reason="needs torch (the CPU build is enough)")
needs_gpu = pytest.mark.skipif(not HAS_CUDA, reason="needs a GPU")

SLOT = 4096
SLOTS = 8


def run_python(code: str, *, stdin: str = "", timeout: float = 120) -> subprocess.CompletedProcess:
    """Runs code in a fresh interpreter (nothing inherited but the environment)."""
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], input=stdin, capture_output=True,
                          text=True, timeout=timeout, env=dict(os.environ))


@pytest.fixture
def tier():
    t = GpuTier.create("cpu", SLOTS * SLOT, SLOT, LruPolicy())
    yield t
    t.close()


def fill(tier: GpuTier, names):
    for name in names:
        slots, evicted = tier.reserve(1)
        assert slots and not evicted
        tier.install(name, slots[0], 100)


# --- without torch / without CUDA ---------------------------------------------------------------

def test_module_imports_and_degrades_without_torch():
    result = run_python("""
        import logging, sys
        sys.modules["torch"] = None          # import torch now raises ImportError
        logging.basicConfig(level=logging.WARNING, stream=sys.stdout, format="%(message)s")
        import kvtier.tiers.gpu as g
        from kvtier.tiers.eviction import LruPolicy
        ok, reason = g.gpu_available()
        print("available", ok, reason)
        print("tier", g.GpuTier.create("cuda", 1 << 20, 4096, LruPolicy()))
        print("cpu tier", g.GpuTier.create("cpu", 1 << 20, 4096, LruPolicy()))
        h = g.IpcSlotHandle(0, bytes(16), 8192, 0, 4096, 4096, b"m" * 66)
        print("handle", g.IpcSlotHandle.from_bytes(h.to_bytes()) == h)
    """)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "available False torch is not installed" in out
    assert "tier None" in out and "cpu tier None" in out and "handle True" in out
    assert out.count("GPU tier disabled") == 2


@needs_torch
def test_gpu_available_on_this_machine():
    ok, reason = gpu_available()
    if HAS_CUDA:
        assert ok and reason.startswith("CUDA device 0:")
    else:
        assert ok is False and "CUDA" in reason


@needs_torch
def test_gpu_available_rejects_an_index_out_of_range(monkeypatch):
    ok, reason = gpu_available(10_000)
    assert ok is False and "CUDA" in reason
    # The out-of-range branch itself, with a pretend single-GPU CUDA build.
    monkeypatch.setattr(torch.version, "cuda", "12.4")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    for index in (1, -1):
        ok, reason = gpu_available(index)
        assert ok is False and f"CUDA device {index} does not exist: 1 visible" in reason


@needs_torch
def test_gpu_available_reports_a_broken_driver_instead_of_raising(monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", "12.4")

    def broken():
        raise RuntimeError("CUDA driver initialization failed")
    monkeypatch.setattr(torch.cuda, "is_available", broken)
    ok, reason = gpu_available()
    assert ok is False and "CUDA is not available" in reason and "driver initialization" in reason


@needs_torch
def test_create_on_a_missing_cuda_device_logs_and_returns_none(caplog):
    index = torch.cuda.device_count() if HAS_CUDA else 0   # one past the last GPU, or any without CUDA
    with caplog.at_level(logging.WARNING, logger="kvtier.gpu"):
        assert GpuTier.create(f"cuda:{index}", 1 << 20, SLOT, LruPolicy()) is None
    assert "GPU tier disabled" in caplog.text and "CUDA" in caplog.text


def test_bad_configuration_raises():
    for device in ("tpu", "cuda:x", "cpu:1", ""):
        with pytest.raises(ValueError):
            GpuTier.create(device, 1 << 20, SLOT, LruPolicy())
    with pytest.raises(ValueError):
        GpuTier.create("cpu", 1 << 20, 1000, LruPolicy())       # not a page multiple
    with pytest.raises(ValueError):
        GpuTier.create("cpu", SLOT - 1, SLOT, LruPolicy())      # smaller than one slot
    assert parse_device("CUDA:3") == ("cuda", 3) and parse_device("cuda") == ("cuda", 0)
    assert parse_device("cpu") == ("cpu", 0)


# --- the IPC handle format (pure Python) --------------------------------------------------------

def test_ipc_handle_format_round_trip():
    cuda_handle = bytes(range(64))
    handle = IpcSlotHandle(device_index=1, device_uuid=bytes(range(16)), pool_bytes=1 << 30, storage_offset=512,
                           slot_offset=3 << 21, length=2 << 20, mem_handle=b"\x02c" + cuda_handle,
                           ref_counter_handle=b"/torch_123_456_0", ref_counter_offset=7,
                           event_handle=b"e" * 64, event_sync_required=True)
    data = handle.to_bytes()
    assert data[:4] == b"KVTG" and len(data) == 72 + 66 + 16 + 64
    back = IpcSlotHandle.from_bytes(data)
    assert back == handle and back.cuda_ipc_mem_handle == cuda_handle
    assert back.pool_key == IpcSlotHandle.from_bytes(
        IpcSlotHandle(**{**handle.__dict__, "slot_offset": 0}).to_bytes()).pool_key
    assert IpcSlotHandle(0, bytes(16), 1, 0, 0, 1, cuda_handle).cuda_ipc_mem_handle == cuda_handle  # old torch
    with pytest.raises(ValueError):
        IpcSlotHandle(0, bytes(16), 1, 0, 0, 1, b"\x02e" + b"x" * 40).cuda_ipc_mem_handle  # expandable segment
    for bad in (b"", b"XXXX" + data[4:], data[:-1], data + b"!"):
        with pytest.raises(ValueError):
            IpcSlotHandle.from_bytes(bad)
    outside = IpcSlotHandle(**{**handle.__dict__, "slot_offset": (1 << 30) - 1}).to_bytes()
    with pytest.raises(ValueError, match="outside the pool"):
        IpcSlotHandle.from_bytes(outside)


# --- on the CPU device (the same code path as CUDA) ---------------------------------------------

@needs_torch
def test_pool_is_one_tensor_cut_into_slots():
    pool = DevicePool("cpu", SLOTS, SLOT)
    assert pool.tensor.numel() == SLOTS * SLOT and pool.tensor.dtype == torch.uint8 and not pool.is_cuda
    slots = pool.take(3)
    assert len(set(slots)) == 3 and pool.free_count() == SLOTS - 3
    pool.view(slots[0])[:] = 7
    pool.view(slots[1])[:] = 9
    assert pool.view(slots[0]).shape == (SLOT,)
    assert int(pool.view(slots[0]).sum()) == 7 * SLOT and int(pool.view(slots[1])[0]) == 9
    assert pool.view(slots[1]).data_ptr() == pool.tensor.data_ptr() + slots[1] * SLOT  # a view, not a copy
    assert pool.take(100) and pool.free_count() == 0
    pool.give_back(range(SLOTS))
    with pytest.raises(AssertionError):
        pool.give_back([0])
    with pytest.raises(AssertionError):
        pool.view(SLOTS)


@needs_torch
def test_tier_evicts_lru_and_skips_pinned(tier):
    fill(tier, "abcdefgh")
    tier.touch("a")
    tier.hold("b", "reader")
    slots, evicted = tier.reserve(2)
    assert len(slots) == 2 and evicted == ["c", "d"]  # a was touched, b is pinned
    assert "a" in tier and "b" in tier and "c" not in tier and len(tier) == 6
    assert tier.used_bytes == 600 and tier.evictions == 2 and tier.slot_of("c") is None
    tier.unreserve(slots)
    assert tier.pool.free_count() == 2


@needs_torch
def test_fifo_policy_ignores_touch():
    t = GpuTier.create("cpu", 4 * SLOT, SLOT, FifoPolicy())
    fill(t, "wxyz")
    t.touch("w")
    assert t.reserve(1)[1] == ["w"]


@needs_torch
def test_pins_are_counted_and_reserve_fails_when_everything_is_pinned(tier):
    fill(tier, "abcdefgh")
    for name in "abcdefgh":
        tier.hold(name, "reader")
    tier.hold("e", "reader")
    assert tier.reserve(1) == ([], [])
    assert len(tier) == 8 and tier.evictions == 0          # a failed reserve evicts nothing
    tier.release(tier.slot_of("e"), "reader")
    assert tier.held("e") and tier.reserve(1) == ([], [])
    tier.release(tier.slot_of("e"), "reader")
    assert not tier.held("e")
    slots, evicted = tier.reserve(1)
    assert evicted == ["e"] and len(slots) == 1
    held_slot = tier.slot_of("a")
    tier.remove("a")                                       # held: detached now, its slot retired
    assert "a" not in tier and tier.reserve(1) == ([], [])
    tier.release(held_slot, "reader")                      # the last hold frees the retired slot
    assert tier.reserve(2) == ([], [])                     # one free slot is not two


@needs_torch
def test_copy_round_trip_from_an_mmap(tier, tmp_path):
    """Random bytes from a memoryview of a file mmap -> slot -> another region of the mmap."""
    size = 3 * SLOT
    path = tmp_path / "host"
    path.write_bytes(bytes(size))
    with open(path, "r+b") as file:
        mm = mmap.mmap(file.fileno(), size)
    view = memoryview(mm)
    rng = random.Random(1)
    blocks = [rng.randbytes(SLOT), rng.randbytes(1234)]
    view[:SLOT] = blocks[0]
    view[SLOT:SLOT + 1234] = blocks[1]
    slots, _ = tier.reserve(2)
    done = [tier.copy_in(slots[0], view[:SLOT], SLOT), tier.copy_in(slots[1], view[SLOT:2 * SLOT], 1234)]
    assert all(t.done() for t in done)
    tier.install("full", slots[0], SLOT)
    tier.install("part", slots[1], 1234)
    assert bytes(tier.view("full").numpy()) == blocks[0]
    assert bytes(tier.view("part")[:1234].numpy()) == blocks[1]
    tier.copy_out(tier.slot_of("part"), view[2 * SLOT:], 1234).wait()
    tier.synchronize()
    assert bytes(view[2 * SLOT:2 * SLOT + 1234]) == blocks[1]
    assert bytes(view[2 * SLOT + 1234:]) == bytes(SLOT - 1234)  # nothing past length was written
    view.release()
    mm.close()  # no tensor still exports the mapping
    assert tier.stats() == {"blocks": 2, "bytes": SLOT + 1234, "capacity_bytes": SLOTS * SLOT, "reads": 1,
                            "writes": 2, "read_bytes": 1234, "write_bytes": SLOT + 1234, "evictions": 0}


@needs_torch
def test_copy_between_the_shared_arena_and_the_tier(tier, tmp_path):
    """The daemon's promotion/demotion path: arena slot -> device slot -> another arena slot."""
    arena = SharedArena("gpu-test", [("", 4 * SLOT)], SLOT)
    try:
        src, dst = arena.take(2)
        payload = os.urandom(SLOT)
        arena.view(src)[:] = payload
        slots, _ = tier.reserve(1)
        tier.copy_in(slots[0], arena.view(src), SLOT)
        tier.copy_out(slots[0], arena.view(dst), SLOT).wait()
        assert hashlib.sha256(arena.view(dst)).digest() == hashlib.sha256(payload).digest()
    finally:
        tier.synchronize()
        arena.close()
    assert arena.address == 0  # unmapped


@needs_torch
def test_copies_accept_tensors_bytes_and_numpy(tier):
    import numpy as np
    slots, _ = tier.reserve(3)
    data = os.urandom(SLOT)
    with warnings.catch_warnings():
        warnings.simplefilter("error")                        # no "buffer is not writable" warning
        tier.copy_in(slots[0], data, SLOT)                     # read-only bytes
    words = torch.arange(SLOT // 4, dtype=torch.int32)
    tier.copy_in(slots[1], words, SLOT)                        # any dtype, copied as raw bytes
    array = np.frombuffer(data, dtype=np.uint8).reshape(64, -1).copy()
    tier.copy_in(slots[2], array, 100)                         # a 2-D buffer is flattened
    out = torch.empty(SLOT // 4, dtype=torch.int32)
    tier.copy_out(slots[1], out, SLOT)
    assert torch.equal(out, words)
    back = bytearray(SLOT)
    tier.copy_out(slots[0], back, SLOT)
    assert bytes(back) == data
    tier.copy_out(slots[2], back, 100)
    assert bytes(back[:100]) == data[:100]


@needs_torch
def test_copy_bounds_are_checked(tier):
    (slot,), _ = tier.reserve(1)
    with pytest.raises(AssertionError):
        tier.copy_in(slot, bytes(SLOT + 1), SLOT + 1)        # longer than a slot
    with pytest.raises(AssertionError):
        tier.copy_in(slot, bytes(10), 11)                    # source shorter than length
    with pytest.raises(AssertionError):
        tier.copy_out(slot, bytes(10), 10)                   # read-only destination
    with pytest.raises(AssertionError):
        tier.copy_in(slot, torch.zeros(8, 8, dtype=torch.uint8).t(), 64)  # not contiguous
    assert tier.copy_in(slot, b"", 0).done() and tier.writes == 0


@needs_torch
def test_ipc_handle_is_none_on_cpu(tier):
    (slot,), _ = tier.reserve(1)
    assert tier.ipc_handle(slot) is None


# --- the CUDA branches, driven by stand-ins for torch.cuda (no GPU needed) ----------------------

class FakeEvent:
    """Stands for torch.cuda.Event on one stream: events finish in the order they were recorded."""
    made: list = []

    def __init__(self):
        self.finished = False
        self.stream = None
        FakeEvent.made.append(self)

    def record(self, stream):
        self.stream = stream

    def query(self):
        return self.finished

    def synchronize(self):
        for event in FakeEvent.made[:FakeEvent.made.index(self) + 1]:
            event.finished = True


class FakeStream:
    def synchronize(self):
        for event in FakeEvent.made:
            event.finished = True


@pytest.fixture
def fake_cuda(monkeypatch):
    import contextlib
    FakeEvent.made = []
    entered = []

    @contextlib.contextmanager
    def stream(s):
        entered.append(s)
        yield

    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(torch.cuda, "stream", stream)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    return entered


@needs_torch
def test_async_copies_keep_host_buffers_until_their_event_completes(tier, fake_cuda):
    tier._stream = stream = FakeStream()
    src = bytearray(os.urandom(SLOT))
    dst = bytearray(SLOT)
    (slot,), _ = tier.reserve(1)
    first = tier.copy_in(slot, src, SLOT)
    second = tier.copy_out(slot, dst, SLOT)
    assert fake_cuda == [stream, stream] and first.event.stream is stream and second.event.stream is stream
    assert not first.done() and not second.done()
    for buffer in (src, dst):                       # both still exported to the copies in flight
        with pytest.raises(BufferError):
            buffer.append(0)
    tier.wait(slot)                                 # the slot's last copy, and so (stream order) the first
    assert first.done() and second.done() and not tier._inflight and bytes(dst) == bytes(src)
    src.append(0), dst.append(0)                    # released
    third = tier.copy_in(slot, src, SLOT)
    assert not third.done() and tier.poll() == 1
    tier.synchronize()
    assert third.done() and not tier._inflight and not tier._last_copy


@needs_torch
def test_ipc_handle_shares_the_pool_once_and_waits_for_the_slot(tier, fake_cuda, monkeypatch):
    tier._stream = FakeStream()
    pool = tier.pool
    shares = []

    class Storage:
        def _share_cuda_(self):
            shares.append(1)
            return 0, b"\x02c" + bytes(range(64)), pool.size_bytes, 512, b"/torch_1_2_0", 3, b"E" * 64, True

    class Tensor:
        def untyped_storage(self):
            return Storage()

    class Uuid:
        bytes = list(range(16, 32))

    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: type("P", (), {"uuid": Uuid()}))
    slots, _ = tier.reserve(2)
    pending = tier.copy_in(slots[1], os.urandom(SLOT), SLOT)
    real_tensor, pool.tensor, pool.is_cuda = pool.tensor, Tensor(), True
    try:
        data = tier.ipc_handle(slots[1])
        assert pending.done()                       # the engine must see the bytes the daemon wrote
        other = tier.ipc_handle(slots[0])
    finally:
        pool.tensor, pool.is_cuda = real_tensor, False
    assert len(shares) == 1                         # one export of the pool, whatever the slot
    h, g = IpcSlotHandle.from_bytes(data), IpcSlotHandle.from_bytes(other)
    assert (h.device_index, h.device_uuid, h.pool_bytes, h.storage_offset) == (0, bytes(range(16, 32)), 8 * SLOT, 512)
    assert (h.slot_offset, g.slot_offset, h.length) == (slots[1] * SLOT, slots[0] * SLOT, SLOT)
    assert h.cuda_ipc_mem_handle == bytes(range(64)) and h.pool_key == g.pool_key
    assert (h.ref_counter_handle, h.ref_counter_offset, h.event_handle, h.event_sync_required) == (
        b"/torch_1_2_0", 3, b"E" * 64, True)


@needs_torch
def test_open_ipc_handle_finds_the_device_by_uuid(monkeypatch):
    pool_bytes = 4 * SLOT
    backing = (torch.arange(pool_bytes) % 251).to(torch.uint8)
    opened = []

    def new_shared_cuda(*args):
        opened.append(args)
        return backing.untyped_storage()

    uuids = [bytes([i]) * 16 for i in range(3)]
    monkeypatch.setattr(torch.cuda, "init", lambda: None)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 3)
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda i: type("P", (), {"uuid": type("U", (), {"bytes": list(uuids[i])})()}))
    monkeypatch.setattr(torch.UntypedStorage, "_new_shared_cuda", staticmethod(new_shared_cuda))
    handle = IpcSlotHandle(device_index=0, device_uuid=uuids[2], pool_bytes=pool_bytes, storage_offset=256,
                           slot_offset=2 * SLOT, length=SLOT, mem_handle=b"\x02c" + bytes(64),
                           ref_counter_handle=b"/r", ref_counter_offset=5, event_handle=b"e" * 64,
                           event_sync_required=True)
    slot = gpu.open_ipc_handle(handle.to_bytes())
    assert opened == [(2, handle.mem_handle, pool_bytes, 256, b"/r", 5, b"e" * 64, True)]  # index 2: by UUID
    assert torch.equal(slot, backing[2 * SLOT:3 * SLOT])
    slot[:4] = 0                                    # a view of the mapping, writable
    assert int(backing[2 * SLOT:2 * SLOT + 4].sum()) == 0
    assert gpu.open_ipc_pool(handle).shape == (pool_bytes,)
    with pytest.raises(ValueError, match="not visible"):
        gpu.open_ipc_handle(IpcSlotHandle(**{**handle.__dict__, "device_uuid": b"\xff" * 16}))
    gpu.open_ipc_handle(IpcSlotHandle(**{**handle.__dict__, "device_uuid": bytes(16), "device_index": 1}))
    assert opened[-1][0] == 1                       # no UUID: the daemon's index


# --- CUDA only ---------------------------------------------------------------------------------

@needs_gpu
def test_cuda_copies_run_on_the_tiers_stream_from_pinned_memory(tmp_path):
    block = 2 << 20
    t = GpuTier.create("cuda:0", 8 * block, block, LruPolicy())
    assert t is not None and t.pool.tensor.is_cuda and t._stream != torch.cuda.current_stream()
    host = torch.randint(0, 256, (4, block), dtype=torch.uint8).pin_memory()
    back = torch.empty_like(host).pin_memory()
    slots, _ = t.reserve(4)
    # Keep the default stream busy: copies on the tier's own stream must not wait for it.
    torch.cuda._sleep(2_000_000_000)
    transfers = [t.copy_in(slot, host[i], block) for i, slot in enumerate(slots)]
    transfers += [t.copy_out(slot, back[i], block) for i, slot in enumerate(slots)]  # same stream: in order
    for transfer in transfers:
        transfer.wait()
    assert not torch.cuda.default_stream().query(), "the copies waited for the default stream"
    assert torch.equal(back, host)
    # The shared arena is pinned with cudaHostRegister; memoryviews of it are copied zero-copy.
    arena = SharedArena("gpu-test", [("", 2 * block)], block)
    try:
        assert arena.pinned
        arena.view(0)[:] = os.urandom(block)
        t.copy_in(slots[0], arena.view(0), block)
        t.copy_out(slots[0], arena.view(1), block)
        t.synchronize()
        assert bytes(arena.view(1)) == bytes(arena.view(0))
    finally:
        t.synchronize()
        arena.close()
    torch.cuda.synchronize()
    t.close()


@needs_gpu
def test_cuda_ipc_handle_opens_in_a_second_process():
    block = 2 << 20
    t = GpuTier.create("cuda:0", 8 * block, block, LruPolicy())
    slots, _ = t.reserve(2)
    payload = os.urandom(block)
    t.copy_in(slots[1], payload, block)
    data = t.ipc_handle(slots[1])
    handle = IpcSlotHandle.from_bytes(data)
    assert handle.slot_offset == t.pool.offset(slots[1]) and handle.length == block
    assert len(handle.cuda_ipc_mem_handle) == 64 and any(handle.device_uuid)
    result = run_python("""
        import hashlib, sys
        import torch
        from kvtier.tiers.gpu import open_ipc_handle
        handle, expected = bytes.fromhex(sys.stdin.readline()), sys.stdin.readline().strip()
        slot = open_ipc_handle(handle)
        seen = hashlib.sha256(slot.cpu().numpy().tobytes()).hexdigest()
        print("read", "same" if seen == expected else "DIFFERENT")
        slot.copy_(torch.flip(slot, [0]))     # the engine writes back (a save into the slot)
        torch.cuda.synchronize()
        print("wrote")
    """, stdin=data.hex() + "\n" + hashlib.sha256(payload).hexdigest() + "\n")
    assert result.returncode == 0, result.stderr
    assert "read same" in result.stdout and "wrote" in result.stdout
    back = bytearray(block)
    t.copy_out(slots[1], back, block).wait()
    assert bytes(back) == payload[::-1]
    t.close()
