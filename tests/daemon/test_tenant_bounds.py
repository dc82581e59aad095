"""What one tenant can learn or hold through another's ids, slots and peers: a refused Commit says
nothing about a slot's bytes and aborts its allocation; lease and allocation ids cannot be guessed;
a block pulled from a peer cannot bring a stronger retention than this node's default."""

from __future__ import annotations

import asyncio
import os

import grpc
import pytest

from kvtier.client import Client, block_checksum
from kvtier.daemon.errors import ApiError
from kvtier.daemon.leases import LeaseTable
from kvtier.daemon.peers import _peer_retention
from kvtier.daemon.store import VERIFY_FAILED, Staged
from kvtier.proto.v1 import kvtier_pb2 as pb
from kvtier.tiers.block import checksum
from kvtier.tiers.retention import Retention

from store_harness import commit, key_of, make_store, store_config
from test_security import code_of

KEY_A, KEY_B = b"a" * 32, b"b" * 32


def refusal(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as err:
        call()
    return err.value


# -- Commit: no oracle on a slot's bytes --------------------------------------------------------
def test_a_commit_that_fails_verification_names_nothing_and_aborts_the_allocation(daemon):
    with Client(daemon.socket) as a:
        a.register_namespace("a/m")
        allocation = a.allocate(2)
        arena = a.arena()
        arena.view(allocation.slots[0])[:4] = b"good"
        entries = [(KEY_A, b"", allocation.slots[0], 4, block_checksum(b"good")),
                   (KEY_B, b"", allocation.slots[1], 4, block_checksum(b"a guess at the old bytes"))]
        err = refusal(lambda: a.commit(allocation.id, "a/m", entries))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and err.details() == VERIFY_FAILED
        assert code_of(lambda: a.abort(allocation.id)) == grpc.StatusCode.FAILED_PRECONDITION
        assert a.lookup("a/m", [KEY_A]).matched == 0  # all or nothing
        assert a.stats().active_allocations == 0  # every slot went back
    log = daemon.log()
    assert f"commit by uid {os.geteuid()} failed verification: allocation {allocation.id} aborted (2 entries" in log
    assert "good" not in log and KEY_B.hex() not in log


def test_a_shape_error_in_a_commit_also_aborts_the_allocation(daemon):
    with Client(daemon.socket) as a:
        a.register_namespace("a/m")
        allocation = a.allocate(1)
        twice = [(KEY_A, b"", allocation.slots[0], 0, block_checksum(b"")),
                 (KEY_B, b"", allocation.slots[0], 0, block_checksum(b""))]
        err = refusal(lambda: a.commit(allocation.id, "a/m", twice))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "used twice" in err.details()
        assert code_of(lambda: a.abort(allocation.id)) == grpc.StatusCode.FAILED_PRECONDITION


def test_verification_failures_are_counted_per_principal(tmp_path):
    async def scenario():
        store = make_store(store_config(tmp_path))
        await store.start()
        await store.register_namespace("ns", {})
        for principal in ("token t1", "token t1", "token t2"):
            held = await store.allocate(1, 0, 5000)
            staged = [Staged(KEY_A, b"", held.items[0], 4, checksum(b"nope"))]
            with pytest.raises(ApiError, match=VERIFY_FAILED):
                await store.commit(held.id, "ns", staged, wait_durable=False, principal=principal)
            assert store.allocations.get(held.id) is None
        assert store.verification_failures == {"token t1": 2, "token t2": 1}
        assert store.cpu.available() == store.arena.slot_count  # every slot was returned
        store.check_invariants()
        await store.close(5)
        assert not store.fatals
    asyncio.run(scenario())


# -- a tenant without a [[tenant]] table ------------------------------------------------------
def test_a_tenant_without_a_table_holds_only_the_small_default_of_read_leases(tmp_path):
    """A TCP token's tenant named in no [[tenant]] table (owner "x") gets
    limits.untabled_tenant_max_leases read leases, not the node's whole table; a tenant with a
    table keeps its own bound, an administrator (owner None) the node's."""
    async def scenario():
        store = make_store(store_config(tmp_path, tenants=[{"name": "a", "uids": [40001], "cpu_capacity": "1MiB",
                                                            "max_leases": 70}]))
        bound = 64  # limits.untabled_tenant_max_leases, by default
        await store.start()
        for namespace in ("x/m", "a/m", "ns"):
            await store.register_namespace(namespace, {})
            assert await commit(store, namespace, [1]) == [pb.STORED]
        held = [(await store.acquire("x/m", [key_of(1)], 5000, owner="x"))[0] for _ in range(bound)]
        with pytest.raises(ApiError, match="too many open read leases for tenant x"):
            await store.acquire("x/m", [key_of(1)], 5000, owner="x")
        held += [(await store.acquire("a/m", [key_of(1)], 5000, owner="a"))[0] for _ in range(70)]
        held += [(await store.acquire("ns", [key_of(1)], 5000))[0] for _ in range(100)]
        for lease in held:
            store.release(lease.id)
        await store.close(5)
        assert not store.fatals
    asyncio.run(scenario())


# -- ids --------------------------------------------------------------------------------------
def test_lease_ids_are_random_63_bit_and_never_0():
    table = LeaseTable(1000)
    ids = [table.add([], 1000).id for _ in range(200)]
    assert len(set(ids)) == len(ids) and all(0 < i < 1 << 63 for i in ids)
    steps = {b - a for a, b in zip(ids, ids[1:])}
    assert 1 not in steps and len(steps) > 100  # not a counter, nor any fixed stride
    assert max(ids).bit_length() > 56  # drawn from the whole range


def test_a_closed_entrys_deadline_does_not_expire_a_later_entry_with_its_id():
    table = LeaseTable(10)
    first = table.add(["slot"], 1000)
    table.take(first.id)
    second = table.add(["other"], 60_000)
    second_id, second.id = second.id, first.id  # as if the random draw had repeated the closed id
    table._held[first.id] = table._held.pop(second_id)
    assert table.expired(now=first.deadline + 1) == []
    assert table.get(first.id) is second


def test_ids_handed_to_clients_are_not_sequential(daemon):
    """(Another tenant using them: tests/daemon/test_tenants.py, with clients under other uids.)"""
    with Client(daemon.socket) as b:
        b.register_namespace("b/m")
        allocations = [b.allocate(1) for _ in range(4)]
        ids = [x.id for x in allocations]
        assert all(later - earlier != 1 for earlier, later in zip(ids, ids[1:]))
        entry = [(KEY_A, b"", allocations[0].slots[0], 0, block_checksum(b""))]
        assert b.commit(allocations[0].id, "b/m", entry) == [pb.STORED]
        for allocation in allocations[1:]:
            b.abort(allocation.id)


# -- retention from peers ---------------------------------------------------------------------
@pytest.mark.parametrize("sent, kept", [
    (Retention("system", 100, 1_000_000.0), Retention("conversation", 50, None)),
    (Retention("conversation", 90, 300.0), Retention("conversation", 50, None)),
    (Retention("subagent", 70, None), Retention("subagent", 50, None)),
    (Retention("ephemeral", 10, 3600.0), Retention("ephemeral", 10, None)),
    (None, None),
])
def test_a_peers_retention_is_clamped_to_the_local_default(sent, kept):
    block = pb.PeerBlock()
    if sent is not None:
        block.retention.CopyFrom(pb.Retention(cls=sent.cls, priority=sent.priority, ttl_s=sent.ttl_s or 0.0))
    assert _peer_retention(block) == kept
