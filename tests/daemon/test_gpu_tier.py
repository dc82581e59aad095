"""The GPU tier through kvtierd. No GPU here: the tier runs on torch's CPU device, which is the same
code path (slots, eviction, promotion, demotion); CUDA-only paths are in tests/tiers/test_gpu.py."""

from __future__ import annotations

import os

from kvtier.proto.v1 import kvtier_pb2 as pb

NS = "gpu-ns"
GPU_CPU_DEVICE = {"gpu.enabled": True, "gpu.device": "cpu", "gpu.capacity": "256KiB"}  # 4 slots of 64 KiB


def key(i: int) -> bytes:
    return bytes([i + 1]) * 32


def test_acquire_with_gpu_promotes_pins_and_evicts_lru(make_daemon):
    daemon = make_daemon(GPU_CPU_DEVICE)
    with daemon.client() as c:
        c.register_namespace(NS)
        data = [os.urandom(50_000) for _ in range(6)]
        c.put_blocks(NS, [(key(i), b"", d) for i, d in enumerate(data)])
        lease = c.acquire(NS, [key(0)], gpu=True)
        block = lease.blocks[0]
        assert block.on_gpu and block.gpu_ipc_handle == b""  # no IPC handle on a CPU device
        assert c.stat(NS, key(0)).tiers & pb.TIER_GPU
        for i in range(1, 6):  # 4 slots: key(0) is pinned by its lease, the others rotate through
            c.release(c.acquire(NS, [key(i)], gpu=True).id)
        gpu = next(t for t in c.stats().tiers if t.tier == "gpu")
        assert gpu.blocks == 4 and gpu.evictions == 2 and gpu.writes == 6
        assert c.stat(NS, key(0)).tiers & pb.TIER_GPU  # pinned: survived
        assert not c.stat(NS, key(1)).tiers & pb.TIER_GPU  # least recently used: evicted first
        c.release(lease.id)
        last = c.stats().event_seq
        stream = c.watch(from_seq=1, namespace=NS)
        events = []
        for event in stream:
            events.append(event)
            if event.seq >= last:
                break
        stream.cancel()
        promotions = [e for e in events if e.type == pb.BLOCK_MOVED and e.tier == pb.TIER_GPU]
        assert len(promotions) == 6 and all(e.from_tier == pb.TIER_CPU for e in promotions)
        assert sum(e.type == pb.BLOCK_REMOVED and e.tier == pb.TIER_GPU for e in events) == 2


def test_block_lost_by_the_cpu_tier_is_demoted_back_from_the_gpu_verified(make_daemon):
    daemon = make_daemon({**GPU_CPU_DEVICE, "disk.enabled": False, "cpu.capacity": "512KiB"})  # 8 CPU slots
    with daemon.client() as c:
        c.register_namespace(NS)
        first = os.urandom(40_000)
        c.put_blocks(NS, [(key(0), b"", first)])
        c.release(c.acquire(NS, [key(0)], gpu=True).id)
        for i in range(1, 12):  # push key(0) out of the CPU tier; the GPU tier keeps it
            c.put_blocks(NS, [(key(i), b"", os.urandom(1000))])
        assert c.stat(NS, key(0)).tiers == pb.TIER_GPU
        assert c.get_blocks(NS, [key(0)]) == [first]  # copied down from the GPU, checksum verified
        assert c.stat(NS, key(0)).tiers == pb.TIER_GPU | pb.TIER_CPU
    assert "BLOCK_MOVED" not in daemon.log()  # events are not logged per block


def test_gpu_tier_disabled_cleanly_without_cuda(make_daemon):
    daemon = make_daemon({"gpu.enabled": True, "gpu.device": "cuda:0", "gpu.capacity": "1MiB"})
    assert "GPU tier disabled" in daemon.log()
    with daemon.client() as c:
        c.register_namespace(NS)
        c.put_blocks(NS, [(key(0), b"", b"x" * 100)])
        lease = c.acquire(NS, [key(0)], gpu=True)
        assert lease.blocks[0].found and not lease.blocks[0].on_gpu
        assert [t.tier for t in c.stats().tiers] == ["cpu", "disk"]
