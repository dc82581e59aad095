"""Bad input gets a clear gRPC status, changes nothing, and the daemon keeps serving."""

from __future__ import annotations

import grpc
import pytest

from kvtier.client import block_checksum
from kvtier.proto.v1 import kvtier_pb2 as pb

NS = "test-ns"
GOOD = b"k" * 32


def code_of(fn, *args, **kwargs) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as err:
        fn(*args, **kwargs)
    assert err.value.details(), "every refusal must say why"
    return err.value.code()


@pytest.fixture
def stored(client):
    client.put_blocks(NS, [(GOOD, b"", b"payload")], wait_durable=True)
    return client


def assert_unharmed(client):
    assert client.get_blocks(NS, [GOOD]) == [b"payload"]
    stats = client.stats()
    assert stats.blocks == 1 and stats.active_allocations == 0 and stats.active_leases == 0


def test_wrong_key_lengths(stored):
    c = stored
    assert code_of(c.lookup, NS, [b"x" * 33]) == grpc.StatusCode.INVALID_ARGUMENT
    assert code_of(c.lookup, NS, [b""]) == grpc.StatusCode.INVALID_ARGUMENT
    assert code_of(c.lookup, NS, []) == grpc.StatusCode.INVALID_ARGUMENT
    assert code_of(c.acquire, NS, [GOOD, b"y" * 40]) == grpc.StatusCode.INVALID_ARGUMENT
    assert code_of(c.put, NS, b"z" * 33, b"data") == grpc.StatusCode.INVALID_ARGUMENT
    allocation = c.allocate(1)
    entry = (b"", b"", allocation.slots[0], 0, block_checksum(b""))
    assert code_of(c.commit, allocation.id, NS, [entry]) == grpc.StatusCode.INVALID_ARGUMENT
    assert code_of(c.abort, allocation.id) == grpc.StatusCode.FAILED_PRECONDITION  # a refused commit aborts
    assert_unharmed(c)


def test_too_many_keys_and_oversized_messages(stored):
    c = stored
    assert code_of(c.lookup, NS, [GOOD] * 5000) == grpc.StatusCode.INVALID_ARGUMENT
    huge = [bytes([i % 256]) * 32 for i in range(4096)] * 40  # ~5.6 MB > server.max_message_bytes
    assert code_of(c.lookup, NS, huge) == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert code_of(c.allocate, 100_000) == grpc.StatusCode.INVALID_ARGUMENT
    assert code_of(c.allocate, 0) == grpc.StatusCode.INVALID_ARGUMENT
    assert_unharmed(c)


def test_unknown_namespace(stored):
    c = stored
    assert code_of(c.lookup, "nope", [GOOD]) == grpc.StatusCode.NOT_FOUND
    assert code_of(c.put_blocks, "nope", [(GOOD, b"", b"x")]) == grpc.StatusCode.NOT_FOUND
    assert code_of(c.acquire, "nope", [GOOD]) == grpc.StatusCode.NOT_FOUND
    assert code_of(c.lookup, "bad name with spaces", [GOOD]) == grpc.StatusCode.INVALID_ARGUMENT
    assert code_of(c.register_namespace, "x" * 200) == grpc.StatusCode.INVALID_ARGUMENT
    assert code_of(c.register_namespace, NS, {"model": "other"}) == grpc.StatusCode.FAILED_PRECONDITION
    assert_unharmed(c)


def test_slots_out_of_range_or_not_owned(stored):
    c = stored
    arena = c.arena()

    def refused(*entries: tuple) -> grpc.StatusCode:
        """The code of a commit of `entries` (slot None: the allocation's first slot) on a fresh
        allocation; a refused commit must have aborted it."""
        allocation = c.allocate(2)
        entries = [(k, p, allocation.slots[0] if slot is None else slot, n, s) for k, p, slot, n, s in entries]
        code = code_of(c.commit, allocation.id, NS, entries)
        assert code_of(c.abort, allocation.id) == grpc.StatusCode.FAILED_PRECONDITION
        return code
    for slot in (arena.slot_count + 5, 2**31):
        assert refused((b"a" * 32, b"", slot, 1, block_checksum(b"x"))) == grpc.StatusCode.INVALID_ARGUMENT
    empty = block_checksum(b"")
    assert refused((b"a" * 32, b"", None, 0, empty), (b"b" * 32, b"", None, 0, empty)) \
        == grpc.StatusCode.INVALID_ARGUMENT  # one slot used twice
    assert refused((b"a" * 32, b"", None, arena.slot_bytes + 1, 0)) == grpc.StatusCode.INVALID_ARGUMENT
    assert code_of(c.commit, 987654, NS, []) == grpc.StatusCode.FAILED_PRECONDITION
    assert_unharmed(c)


def test_checksum_mismatch_commits_nothing(stored):
    c = stored
    allocation = c.allocate(2)
    arena = c.arena()
    arena.view(allocation.slots[0])[:4] = b"good"
    arena.view(allocation.slots[1])[:4] = b"evil"
    entries = [(b"a" * 32, b"", allocation.slots[0], 4, block_checksum(b"good")),
               (b"b" * 32, b"", allocation.slots[1], 4, block_checksum(b"nice"))]
    assert code_of(c.commit, allocation.id, NS, entries) == grpc.StatusCode.INVALID_ARGUMENT
    assert c.lookup(NS, [b"a" * 32]).matched == 0  # all or nothing
    assert code_of(c.abort, allocation.id) == grpc.StatusCode.FAILED_PRECONDITION  # already aborted
    assert_unharmed(c)


def test_double_release_and_unknown_lease(stored):
    c = stored
    lease = c.acquire(NS, [GOOD])
    c.release(lease.id)
    assert code_of(c.release, lease.id) == grpc.StatusCode.FAILED_PRECONDITION
    assert code_of(c.release, 123456789) == grpc.StatusCode.FAILED_PRECONDITION
    assert code_of(c.acquire, NS, [GOOD], lease_ms=10**9) == grpc.StatusCode.INVALID_ARGUMENT
    assert_unharmed(c)


def test_malformed_streams(stored):
    c = stored
    only_chunk = iter([pb.PutRequest(chunk=b"abc")])
    assert code_of(c.stub.Put, only_chunk, metadata=c.call_metadata) == grpc.StatusCode.INVALID_ARGUMENT
    short = iter([pb.PutRequest(header=pb.PutHeader(namespace=NS, key=b"s" * 32, length=10, checksum=1)),
                  pb.PutRequest(chunk=b"abc")])
    assert code_of(c.stub.Put, short, metadata=c.call_metadata) == grpc.StatusCode.INVALID_ARGUMENT
    long = iter([pb.PutRequest(header=pb.PutHeader(namespace=NS, key=b"s" * 32, length=2, checksum=1)),
                 pb.PutRequest(chunk=b"abc")])
    assert code_of(c.stub.Put, long, metadata=c.call_metadata) == grpc.StatusCode.INVALID_ARGUMENT
    wrong_sum = iter([pb.PutRequest(header=pb.PutHeader(namespace=NS, key=b"s" * 32, length=3, checksum=1)),
                      pb.PutRequest(chunk=b"abc")])
    assert code_of(c.stub.Put, wrong_sum, metadata=c.call_metadata) == grpc.StatusCode.INVALID_ARGUMENT
    too_big = iter([pb.PutRequest(header=pb.PutHeader(namespace=NS, key=b"s" * 32, length=1 << 30))])
    assert code_of(c.stub.Put, too_big, metadata=c.call_metadata) == grpc.StatusCode.INVALID_ARGUMENT
    assert code_of(c.stub.Put, iter([]), metadata=c.call_metadata) == grpc.StatusCode.INVALID_ARGUMENT
    assert c.lookup(NS, [b"s" * 32]).matched == 0
    assert_unharmed(c)


def test_allocation_waits_then_reports_exhaustion(make_daemon):
    daemon = make_daemon({"cpu.capacity": "256KiB", "cpu.slot_bytes": "64KiB", "disk.enabled": False})
    with daemon.client() as c:
        c.register_namespace(NS)
        held = c.allocate(4)
        assert code_of(c.allocate, 1, wait_ms=200) == grpc.StatusCode.RESOURCE_EXHAUSTED
        c.abort(held.id)
        assert len(c.allocate(4).slots) == 4
