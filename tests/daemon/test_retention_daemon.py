"""Retention through kvtierd: classes and TTL pins decide what the CPU tier keeps under pressure."""

from __future__ import annotations

import grpc
import pytest

from kvtier.client import retention
from kvtier.proto.v1 import kvtier_pb2 as pb

NS = "agent"
SMALL_CPU = {"cpu.capacity": "512KiB"}  # 8 slots of 64 KiB; the disk tier keeps everything


def key(i: int) -> bytes:
    return i.to_bytes(2, "little") * 16


def agent_session(c) -> None:
    """A system prompt, a conversation pinned for a tool-call pause, then a burst of decode blocks."""
    c.put_blocks(NS, [(key(i), b"", b"s" * 1000) for i in range(2)], retention=retention("system", 90))
    c.put_blocks(NS, [(key(i), b"", b"c" * 1000) for i in range(2, 5)],
                 retention=retention("conversation", 50, ttl_s=300))
    for i in range(5, 17):
        c.put_blocks(NS, [(key(i), b"", b"d" * 1000)], retention=retention("decode", 10), wait_durable=True)


def in_cpu(c, keys) -> list[bool]:
    return [bool(c.stat(NS, k).tiers & pb.TIER_CPU) for k in keys]


def test_system_and_pinned_conversation_outlive_decode_blocks_where_lru_drops_them(make_daemon):
    retained = make_daemon({**SMALL_CPU, "cpu.policy": "retention"}, name="ret")
    lru = make_daemon({**SMALL_CPU, "cpu.policy": "lru"}, name="lru")
    for daemon in (retained, lru):
        with daemon.client() as c:
            c.register_namespace(NS)
            agent_session(c)
    with retained.client() as c:
        assert in_cpu(c, [key(i) for i in range(5)]) == [True] * 5
        assert in_cpu(c, [key(i) for i in range(5, 17)]).count(True) == 3  # the newest decode blocks
        cpu = next(t for t in c.stats().tiers if t.tier == "cpu")
        assert cpu.pressure_evictions == 0 and cpu.evictions == 9
    with lru.client() as c:
        assert in_cpu(c, [key(i) for i in range(5)]) == [False] * 5  # plain LRU lost the prefix


def test_when_only_pinned_blocks_remain_one_is_demoted_not_dropped(make_daemon):
    daemon = make_daemon({**SMALL_CPU, "cpu.policy": "retention"})
    with daemon.client() as c:
        c.register_namespace(NS)
        c.put_blocks(NS, [(key(i), b"", bytes([i]) * 1000) for i in range(8)],
                     retention=retention("conversation", 50, ttl_s=300), wait_durable=True)
        c.put_blocks(NS, [(key(8), b"", b"x" * 1000)], wait_durable=True)
        cpu = next(t for t in c.stats().tiers if t.tier == "cpu")
        assert cpu.pressure_evictions == 1
        evicted = [k for k in (key(i) for i in range(8)) if not c.stat(NS, k).tiers & pb.TIER_CPU]
        assert len(evicted) == 1 and c.stat(NS, evicted[0]).tiers == pb.TIER_DISK  # demoted to disk
        assert c.get_blocks(NS, evicted) == [bytes([evicted[0][0]]) * 1000]


def test_bad_retention_is_refused_and_commits_nothing(make_daemon):
    daemon = make_daemon({"cpu.policy": "retention"})
    with daemon.client() as c:
        c.register_namespace(NS)
        for bad in (retention("forever"), retention("system", 101), retention("system", 5, ttl_s=-1)):
            with pytest.raises(grpc.RpcError) as err:
                c.put_blocks(NS, [(key(0), b"", b"x")], retention=bad)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "retention" in err.value.details()
        assert c.stats().blocks == 0 and c.stats().active_allocations == 0


def test_set_retention_demotes_a_finished_subagent_so_it_goes_first(make_daemon):
    daemon = make_daemon({**SMALL_CPU, "cpu.policy": "retention"})
    with daemon.client() as c:
        c.register_namespace(NS)
        c.put_blocks(NS, [(key(i), b"", b"c" * 1000) for i in range(4)], retention=retention("conversation", 50))
        c.put_blocks(NS, [(key(i), b"", b"a" * 1000) for i in range(4, 8)], retention=retention("system", 90),
                     wait_durable=True)  # a subagent's blocks, held high while it runs
        subagent = [key(i) for i in range(4, 8)]
        assert c.set_retention(NS, subagent + [key(99)], retention("subagent", 0)) == 4  # unknown keys skipped
        assert c.stat(NS, key(4)).retention.cls == "subagent"
        c.put_blocks(NS, [(key(i), b"", b"n" * 1000) for i in range(8, 12)], wait_durable=True)
        assert in_cpu(c, subagent) == [False] * 4  # the demoted subagent went first ...
        assert in_cpu(c, [key(i) for i in range(4)]) == [True] * 4  # ... not the conversation
        with pytest.raises(grpc.RpcError) as err:
            c.call(c.stub.SetRetention, pb.SetRetentionRequest(namespace=NS, keys=[key(1)]))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "retention is required" in err.value.details()
        with pytest.raises(grpc.RpcError) as err:
            c.set_retention(NS, [key(1)], retention("forever", 50))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_prefetch_warms_a_chain_back_into_the_cpu_tier(make_daemon):
    daemon = make_daemon({**SMALL_CPU, "cpu.policy": "retention"})
    with daemon.client() as c:
        c.register_namespace(NS)
        c.put_blocks(NS, [(key(i), b"", bytes([i]) * 1000) for i in range(4)], wait_durable=True)
        c.put_blocks(NS, [(key(i), b"", b"x" * 1000) for i in range(4, 12)], wait_durable=True)
        chain = [key(i) for i in range(4)] + [key(200)]
        assert in_cpu(c, chain[:4]) == [False] * 4  # pushed down to disk by the later blocks
        warmed = c.prefetch(NS, chain)
        assert (warmed.matched, warmed.warmed) == (4, 4)
        assert in_cpu(c, chain[:4]) == [True] * 4
        assert c.stats().active_leases == 0  # warmed, not pinned
        assert c.prefetch(NS, [key(300)]).matched == 0


def test_inventory_filters_by_class_and_pin_state(make_daemon):
    daemon = make_daemon({"cpu.policy": "retention"})
    with daemon.client() as c:
        c.register_namespace(NS)
        c.put_blocks(NS, [(key(i), b"", b"s" * 100) for i in range(3)], retention=retention("system", 90, ttl_s=3600))
        c.put_blocks(NS, [(key(i), b"", b"d" * 100) for i in range(3, 8)], retention=retention("decode", 0))
        c.put_blocks(NS, [(key(8), b"", b"p" * 100)])  # no retention: the default class
        system = list(c.iter_inventory(NS, retention_class="system"))
        assert sorted(b.key for b in system) == [key(i) for i in range(3)]
        assert all(b.pinned_until_unix_ms > b.created_unix_ms + 3_500_000 for b in system)
        assert len(list(c.iter_inventory(NS, retention_class="decode", page_size=2))) == 5
        assert [b.key for b in c.iter_inventory(NS, retention_class="conversation")] == [key(8)]
        assert sorted(b.key for b in c.iter_inventory(NS, pin=pb.PIN_PINNED)) == [key(i) for i in range(3)]
        assert len(list(c.iter_inventory(NS, pin=pb.PIN_UNPINNED))) == 6
        with pytest.raises(grpc.RpcError) as err:
            c.inventory(NS, retention_class="forever")
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_streamed_put_carries_retention(make_daemon):
    daemon = make_daemon({"cpu.policy": "retention"})
    with daemon.client() as c:
        c.register_namespace(NS)
        c.put(NS, key(1), b"streamed", retention=retention("system", 95, ttl_s=300))
        info = c.stat(NS, key(1))
        assert (info.retention.cls, info.retention.priority, info.retention.ttl_s) == ("system", 95, 300)


def test_a_shared_block_keeps_the_strongest_retention_it_was_committed_with(make_daemon):
    daemon = make_daemon({"cpu.policy": "retention"})
    with daemon.client() as c:
        c.register_namespace(NS)
        c.put_blocks(NS, [(key(1), b"", b"shared prefix")], retention=retention("conversation", 60, ttl_s=300))
        # a subagent re-sends the same prefix with a weak hint: no demotion
        assert c.put_blocks(NS, [(key(1), b"", b"shared prefix")], retention=retention("subagent", 0)) == [pb.DUPLICATE]
        r = c.stat(NS, key(1)).retention
        assert (r.cls, r.priority, r.ttl_s) == ("conversation", 60, 300)
        # the harness marks it as the system prompt with a 1h pin: promoted
        c.put_blocks(NS, [(key(1), b"", b"shared prefix")], retention=retention("system", 90, ttl_s=3600))
        r = c.stat(NS, key(1)).retention
        assert (r.cls, r.priority, r.ttl_s) == ("system", 90, 3600)
        c.put_blocks(NS, [(key(2), b"", b"plain")])
        c.put_blocks(NS, [(key(2), b"", b"plain")], retention=retention("decode", 5))
        assert c.stat(NS, key(2)).retention.cls == "conversation"  # the default is not demoted either
