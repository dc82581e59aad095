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
