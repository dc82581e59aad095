"""kvtier.v1 over real gRPC on a real Unix socket, against a kvtierd subprocess (this test process
is the separate client process that maps the daemon's shared-memory arena)."""

from __future__ import annotations

import os
import signal
import threading
import time

import grpc
import pytest

from conftest import sigstop, wait_for
from kvtier.client import block_checksum
from kvtier.client.client import _channel_args
from kvtier.client.session import LocalSession
from kvtier.proto.v1 import kvtier_pb2 as pb
from kvtier.proto.v1 import kvtier_pb2_grpc as pb_grpc

NS = "test-ns"


def key(i: int, salt: int = 0) -> bytes:
    return i.to_bytes(8, "little") + salt.to_bytes(8, "little") + bytes(16)


def payload(i: int, size: int = 4096) -> bytes:
    return os.urandom(16) + bytes([i % 251]) * (size - 16)


def chain(n: int, salt: int = 0) -> list[tuple[bytes, bytes]]:
    keys = [key(i, salt) for i in range(n)]
    return [(k, keys[i - 1] if i else b"") for i, k in enumerate(keys)]


def test_put_get_round_trip_through_shared_memory(client):
    blocks = [(k, p, payload(i, 60_000)) for i, (k, p) in enumerate(chain(8))]
    assert client.put_blocks(NS, blocks) == [pb.STORED] * 8
    got = client.get_blocks(NS, [k for k, _, _ in blocks] + [key(99)])
    assert got[:8] == [d for _, _, d in blocks]
    assert got[8] is None
    info = client.stat(NS, blocks[3][0])
    assert info.parent == blocks[2][0] and info.length == 60_000 and info.checksum == block_checksum(blocks[3][2])


def test_duplicate_put_stores_nothing_and_says_so(client):
    k = key(1)
    first = payload(1)
    assert client.put_blocks(NS, [(k, b"", first)]) == [pb.STORED]
    assert client.put_blocks(NS, [(k, b"", payload(2))]) == [pb.DUPLICATE]
    assert client.put(NS, k, payload(3)) == pb.DUPLICATE
    assert client.get_blocks(NS, [k]) == [first]  # immutable: the first bytes stay
    stats = client.stats()
    assert stats.duplicates == 2 and stats.blocks == 1


def test_lookup_returns_longest_stored_prefix_and_tiers(client):
    links = chain(10)
    client.put_blocks(NS, [(k, p, payload(i)) for i, (k, p) in enumerate(links[:6])], wait_durable=True)
    client.put_blocks(NS, [(links[7][0], links[7][1], payload(7))])  # stored, but after a gap
    reply = client.lookup(NS, [k for k, _ in links])
    assert reply.matched == 6
    assert list(reply.tiers) == [pb.TIER_CPU | pb.TIER_DISK] * 6
    assert client.lookup(NS, [key(500)]).matched == 0


def test_zero_copy_allocate_commit_acquire_release(client):
    allocation = client.allocate(3)
    arena = client.arena()
    entries = []
    for i, slot in enumerate(allocation.slots[:2]):  # use two of three slots
        data = payload(i)
        arena.view(slot)[:len(data)] = data
        entries.append((key(i), b"", slot, len(data), block_checksum(data)))
    assert client.commit(allocation.id, NS, entries) == [pb.STORED, pb.STORED]
    assert client.stats().active_allocations == 0
    lease = client.acquire(NS, [key(0), key(1), key(2)])
    assert [b.found for b in lease.blocks] == [True, True, False]
    view = arena.view(lease.blocks[1].slot)[:lease.blocks[1].length]
    assert block_checksum(view) == lease.blocks[1].checksum
    assert client.stat(NS, key(1)).readers == 1
    client.release(lease.id)
    assert client.stat(NS, key(1)).readers == 0


def test_abort_returns_slots(client):
    before = client.stats()
    allocation = client.allocate(5)
    client.abort(allocation.id)
    with pytest.raises(grpc.RpcError) as err:
        client.abort(allocation.id)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert client.stats().active_allocations == before.active_allocations


def test_leases_expire_so_a_crashed_client_cannot_pin_memory(client):
    allocation = client.allocate(2, lease_ms=300)
    client.put_blocks(NS, [(key(1), b"", payload(1))])
    lease = client.acquire(NS, [key(1)], lease_ms=300)
    assert client.stats().active_leases == 1
    # Expiry is the daemon's to schedule: wait for its own counters to show both gone (the bound is
    # far past the 300 ms leases; a lease that never expires fails here).
    def expired():
        stats = client.stats()
        return stats.active_leases == 0 and stats.active_allocations == 0
    wait_for(expired, what="the 300 ms lease and allocation to expire")
    with pytest.raises(grpc.RpcError) as err:
        client.commit(allocation.id, NS, [(key(2), b"", allocation.slots[0], 0, block_checksum(b""))])
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    with pytest.raises(grpc.RpcError) as err:
        client.release(lease.id)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert client.stat(NS, key(1)).readers == 0


def test_read_lease_protects_a_block_from_eviction(make_daemon):
    daemon = make_daemon({"cpu.capacity": "1MiB", "cpu.slot_bytes": "64KiB", "disk.enabled": False})
    with daemon.client() as c:
        c.register_namespace(NS)
        c.put_blocks(NS, [(key(0), b"", payload(0))])
        lease = c.acquire(NS, [key(0)])
        for i in range(1, 40):  # 16 slots: everything else gets evicted around the leased block
            c.put_blocks(NS, [(key(i), b"", payload(i))])
        assert c.lookup(NS, [key(0)]).matched == 1
        assert c.lookup(NS, [key(1)]).matched == 0
        c.release(lease.id)
        for i in range(40, 60):
            c.put_blocks(NS, [(key(i), b"", payload(i))])
        assert c.lookup(NS, [key(0)]).matched == 0
        assert c.stats().tiers[0].evictions > 0


def test_streamed_put_and_get(client):
    data = payload(5, 65_536)
    assert client.put(NS, key(5), data, wait_durable=True) == pb.STORED
    info, got = client.get(NS, key(5))
    assert got == data and info.tiers & pb.TIER_DISK
    with pytest.raises(grpc.RpcError) as err:
        client.get(NS, key(6))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_inventory_pages_and_filters(client):
    client.register_namespace("other-ns")
    client.put_blocks(NS, [(key(i), b"", payload(i, 512)) for i in range(150)])
    client.put_blocks("other-ns", [(key(i), b"", payload(i, 512)) for i in range(30)], wait_durable=True)
    pages, token = [], b""
    while True:
        page = client.inventory(NS, page_size=64, page_token=token)
        pages.append(len(page.blocks))
        token = page.next_page_token
        if not token:
            break
    assert pages == [64, 64, 22]
    listed = list(client.iter_inventory(NS, page_size=64))
    assert sorted(b.key for b in listed) == sorted(key(i) for i in range(150))
    assert [b.key for b in listed] == sorted(b.key for b in listed)
    everything = list(client.iter_inventory(page_size=100))
    assert len(everything) == 180
    assert {b.namespace for b in client.iter_inventory("other-ns")} == {"other-ns"}
    on_disk = list(client.iter_inventory("other-ns", tier_mask=pb.TIER_DISK))
    assert len(on_disk) == 30
    with pytest.raises(grpc.RpcError) as err:
        client.inventory(NS, page_size=100_000)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_watch_streams_events_in_order_and_replays(client):
    # A first block, so that the watch can start by replaying its latest event: that event arriving is
    # the sign the server holds the watcher (subscribe replays and registers in one step), so the
    # blocks put after it stream live.
    client.put_blocks(NS, [(key(100), b"", payload(100))], wait_durable=True)
    start = client.stats().event_seq
    assert start > 0
    received: list[pb.Event] = []
    stream = client.watch(from_seq=start)
    first: list[pb.Event] = []
    ready = threading.Event()

    def consume():
        try:
            for event in stream:
                if not first:
                    first.append(event)
                    ready.set()
                    continue
                received.append(event)
                if len(received) >= 6:
                    break
        except grpc.RpcError:
            pass  # cancelled below if the events never come; the asserts say what was missing
        finally:
            ready.set()
    thread = threading.Thread(target=consume, daemon=True)
    thread.start()
    try:
        assert ready.wait(60) and first, "the watch never replayed its first event"
        assert first[0].seq == start
        client.put_blocks(NS, [(key(i), b"", payload(i)) for i in range(3)], wait_durable=True)
        thread.join(60)
    finally:
        stream.cancel()
    thread.join(10)
    assert len(received) == 6
    seqs = [e.seq for e in received]
    assert seqs == sorted(seqs) and len(set(seqs)) == 6
    assert [(e.type, e.tier) for e in received].count((pb.BLOCK_STORED, pb.TIER_CPU)) == 3
    assert [(e.type, e.tier) for e in received].count((pb.BLOCK_STORED, pb.TIER_DISK)) == 3
    for k in (key(0), key(1), key(2)):  # per block: CPU before disk
        tiers = [e.tier for e in received if e.key == k]
        assert tiers == [pb.TIER_CPU, pb.TIER_DISK]
    replay = client.watch(from_seq=seqs[2])
    replayed = [next(replay).seq for _ in range(4)]
    replay.cancel()
    assert replayed == seqs[2:6]


def test_delete_and_clear(client):
    client.put_blocks(NS, [(key(i), b"", payload(i)) for i in range(5)], wait_durable=True)
    lease = client.acquire(NS, [key(0)])
    reply = client.delete(NS, [key(0), key(1), key(77)])
    assert (reply.deleted, reply.busy) == (1, 1)
    client.release(lease.id)
    assert client.lookup(NS, [key(1)]).matched == 0
    assert client.clear(NS) == 4
    assert client.stats().blocks == 0


def test_many_clients_in_parallel(client, daemon):
    errors = []

    def worker(n):
        try:
            with daemon.client() as c:
                blocks = [(key(i, n), b"", payload(i)) for i in range(20)]
                c.put_blocks(NS, blocks)
                assert c.get_blocks(NS, [k for k, _, _ in blocks]) == [d for _, _, d in blocks]
        except Exception as exc:  # noqa: BLE001 - collected and asserted below
            errors.append(exc)
    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors
    assert client.stats().blocks == 160


def test_a_new_connection_waits_for_a_daemon_slow_to_answer_it(daemon):
    """A loaded daemon may take a while to answer a new connection (its HTTP/2 SETTINGS frame): a
    client with the client library's channel settings waits for it (gRPC's connect timeout, 20 s)
    instead of failing the call UNAVAILABLE ("timed out before receiving SETTINGS frame") after a
    fraction of a second."""
    options, _ = _channel_args(None)
    # Its own subchannel pool: a brand-new connection, not one the fixture's readiness check left open.
    session = LocalSession.open(daemon.socket)
    channel = grpc.insecure_channel(session.target, options + [("grpc.use_local_subchannel_pool", 1)])
    sigstop(daemon.pid)  # the socket accepts; nothing answers
    try:
        reply = pb_grpc.KvTierStub(channel).Stats.future(pb.StatsRequest(), timeout=60,
                                                         metadata=session.metadata())
        time.sleep(1.0)  # the stall being tested (not a wait for a state): the daemon is silent for 1 s
        assert not reply.done(), f"the call gave up while the daemon was stalled: {reply.exception()}"
        os.kill(daemon.pid, signal.SIGCONT)
        assert reply.result().uptime_s > 0
    finally:
        os.kill(daemon.pid, signal.SIGCONT)
        channel.close()
        session.close()
