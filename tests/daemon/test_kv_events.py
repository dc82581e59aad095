"""daemon/kv_events.py: a real EventLog, real ZMQ sockets on 127.0.0.1, frames decoded with vLLM's own types."""

from __future__ import annotations

import asyncio
import os
import stat
import tempfile
import time

import msgspec
import pytest
import zmq
import zmq.asyncio

from conftest import wait_for
from kvtier.daemon import kv_events
from kvtier.daemon.events import EventLog
from kvtier.daemon.kv_events import END_SEQ, EndpointError, ZmqKvEventPublisher
from kvtier.proto.v1 import kvtier_pb2 as pb

import vllm.distributed.kv_events as vkv  # make test installs vLLM: a missing one fails, not skips

DECODER = msgspec.msgpack.Decoder(vkv.KVEventBatch)
NS = "model-a"
TIMEOUT = 5.0


def key(i: int) -> bytes:
    return i.to_bytes(8, "little") + bytes(24)


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 60))


class Harness:
    """A publisher on tcp://127.0.0.1:<free port> (bound to port 0) and a connected SUB socket."""

    def __init__(self, ring_size=4096, watcher_queue=1024, replay=True, **kwargs):
        self.log = EventLog(ring_size, watcher_queue, 8)
        self.pub = ZmqKvEventPublisher(self.log, "tcp://127.0.0.1:0", "tcp://127.0.0.1:0" if replay else None,
                                       **kwargs)
        self.ctx = zmq.asyncio.Context()

    async def __aenter__(self):
        await self.pub.start()
        self.sub = self.ctx.socket(zmq.SUB)
        self.sub.setsockopt(zmq.SUBSCRIBE, b"")
        self.sub.connect(self.pub.endpoint)
        await self._warm_up()
        return self

    async def _warm_up(self):
        """Slow joiner: emit probes in namespace "warmup" until one arrives, then drain them."""
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:
            self.log.emit(pb.ALL_CLEARED, "warmup")
            if await self.sub.poll(50):
                break
        else:
            raise AssertionError("SUB never connected")
        await asyncio.sleep(0.1)
        while await self.sub.poll(50):
            await self.sub.recv_multipart()

    async def recv(self, n: int) -> list[tuple[bytes, int, object, bytes]]:
        out = []
        for _ in range(n):
            assert await self.sub.poll(int(TIMEOUT * 1000)), f"got {len(out)} of {n} batches"
            topic, seq, payload = await self.sub.recv_multipart()
            assert len(seq) == 8
            out.append((topic, int.from_bytes(seq, "big"), DECODER.decode(payload), payload))
        return out

    async def replay(self, start: int) -> list[tuple[bytes, int, bytes]]:
        """vLLM's replay protocol: start seq as 8 bytes big-endian; batches, then the END_SEQ marker."""
        dealer = self.ctx.socket(zmq.DEALER)
        dealer.connect(self.pub.replay_endpoint)
        await dealer.send_multipart([b"", start.to_bytes(8, "big")])
        out = []
        while True:
            assert await dealer.poll(int(TIMEOUT * 1000)), "replay stalled"
            empty, topic, seq, payload = await dealer.recv_multipart()
            assert empty == b""
            if seq == END_SEQ:
                assert topic == b"" and payload == b""
                break
            out.append((topic, int.from_bytes(seq, "big"), payload))
        dealer.close(linger=0)
        return out

    async def __aexit__(self, *exc):
        await self.pub.close()
        self.sub.close(linger=0)
        self.ctx.term()


def test_every_event_type_arrives_in_order_as_vllm_events():
    async def scenario():
        async with Harness(block_size=16) as h:
            first = h.pub.next_seq
            h.log.emit(pb.BLOCK_STORED, NS, key(1), pb.TIER_CPU, length=4096)
            h.log.emit(pb.BLOCK_STORED, NS, key(2), pb.TIER_DISK, length=4096, parent=key(1))
            h.log.emit(pb.BLOCK_MOVED, NS, key(2), pb.TIER_GPU, from_tier=pb.TIER_CPU, length=4096)
            h.log.emit(pb.BLOCK_STORED, NS, key(3), pb.TIER_S3, length=4096, parent=key(2))
            h.log.emit(pb.BLOCK_REMOVED, NS, key(1), pb.TIER_CPU, length=4096)
            h.log.emit(pb.BLOCK_QUARANTINED, NS, key(2), pb.TIER_DISK, length=4096)
            h.log.emit(pb.ALL_CLEARED, NS)
            batches = await h.recv(1)  # emitted in one go: one batch
            topic, seq, batch, _ = batches[0]
            assert topic == f"kvtier/{NS}".encode() and seq == first
            assert isinstance(batch, vkv.KVEventBatch) and batch.data_parallel_rank is None
            assert abs(batch.ts - time.time()) < 60
            ev = batch.events
            assert [type(e) for e in ev] == [vkv.BlockStored, vkv.BlockStored, vkv.BlockStored, vkv.BlockStored,
                                             vkv.BlockRemoved, vkv.BlockRemoved, vkv.AllBlocksCleared]
            assert ev[0] == vkv.BlockStored(block_hashes=[key(1)], parent_block_hash=None, token_ids=[],
                                            block_size=16, lora_id=None, medium=vkv.MEDIUM_CPU, lora_name=None)
            assert ev[1].block_hashes == [key(2)] and ev[1].parent_block_hash == key(1)
            assert ev[1].medium == vkv.MEDIUM_STORAGE
            assert ev[2].block_hashes == [key(2)] and ev[2].medium == vkv.MEDIUM_GPU  # moved: stored on destination
            assert ev[3].medium == "S3" and ev[3].parent_block_hash == key(2)
            assert ev[4] == vkv.BlockRemoved(block_hashes=[key(1)], medium=vkv.MEDIUM_CPU)
            assert ev[5] == vkv.BlockRemoved(block_hashes=[key(2)], medium=vkv.MEDIUM_STORAGE)
            assert h.pub.published_events >= 7 and h.pub.dropped_batches == 0
    run(scenario())


def test_payload_is_byte_identical_to_what_vllm_would_publish():
    async def scenario():
        async with Harness() as h:
            h.log.emit(pb.BLOCK_STORED, NS, key(1), pb.TIER_CPU, parent=key(0))
            h.log.emit(pb.BLOCK_REMOVED, NS, key(1), pb.TIER_GPU)
            h.log.emit(pb.ALL_CLEARED, NS)
            [(_, _, batch, payload)] = await h.recv(1)
            # vLLM's ZmqEventPublisher encodes the batch with a plain msgspec msgpack Encoder.
            assert msgspec.msgpack.Encoder().encode(batch) == payload
    run(scenario())


def test_batches_split_by_namespace_and_sequence_numbers_are_consecutive():
    async def scenario():
        async with Harness(max_batch=3) as h:
            first = h.pub.next_seq
            for i, ns in enumerate(["a", "a", "b", "a", "a", "a", "a", "a"]):
                h.log.emit(pb.BLOCK_STORED, ns, key(i), pb.TIER_CPU)
            got = await h.recv(4)
            assert [t for t, *_ in got] == [b"kvtier/a", b"kvtier/b", b"kvtier/a", b"kvtier/a"]
            assert [len(b.events) for _, _, b, _ in got] == [2, 1, 3, 2]
            assert [s for _, s, _, _ in got] == list(range(first, first + 4))
            hashes = [e.block_hashes[0] for _, _, b, _ in got for e in b.events]
            assert hashes == [key(i) for i in range(8)]
            # later batches keep counting up
            h.log.emit(pb.BLOCK_REMOVED, "b", key(2), pb.TIER_CPU)
            [(_, seq, _, _)] = await h.recv(1)
            assert seq == first + 4
    run(scenario())


def test_single_topic_mode():
    async def scenario():
        async with Harness(topic="node7", namespace_topics=False) as h:
            h.log.emit(pb.BLOCK_STORED, "a", key(1), pb.TIER_CPU)
            await asyncio.sleep(0.05)
            h.log.emit(pb.BLOCK_STORED, "b", key(2), pb.TIER_CPU)
            got = await h.recv(2)
            assert [t for t, *_ in got] == [b"node7", b"node7"]
    run(scenario())


def test_replay_through_router_returns_exactly_the_batches_from_the_start_seq():
    async def scenario():
        async with Harness() as h:
            first = h.pub.next_seq
            for i in range(10):
                h.log.emit(pb.BLOCK_STORED, NS, key(i), pb.TIER_CPU)
                await asyncio.sleep(0.01)  # one batch each
            live = await h.recv(10)
            assert [s for _, s, _, _ in live] == list(range(first, first + 10))
            replayed = await h.replay(first + 4)
            assert [(t, s, p) for t, s, _, p in live[4:]] == replayed
            assert await h.replay(first + 100) == []  # nothing newer: just the end marker
            assert len(await h.replay(0)) == first + 10  # the warm-up batches are buffered too
    run(scenario())


def test_replay_buffer_is_bounded():
    async def scenario():
        async with Harness(buffer_steps=5) as h:
            for i in range(12):
                h.log.emit(pb.BLOCK_STORED, NS, key(i), pb.TIER_CPU)
                await asyncio.sleep(0.01)
            await h.recv(12)
            replayed = await h.replay(0)
            assert [s for _, s, _ in replayed] == list(range(h.pub.next_seq - 5, h.pub.next_seq))
    run(scenario())


def test_replay_with_a_vllm_style_req_client_gets_the_first_batch():
    """vLLM's example subscriber uses REQ; a one-batch replay fits REQ's one-reply rule."""
    async def scenario():
        async with Harness() as h:
            start = h.pub.next_seq
            h.log.emit(pb.BLOCK_STORED, NS, key(1), pb.TIER_CPU)
            [(topic, seq, _, payload)] = await h.recv(1)
            req = h.ctx.socket(zmq.REQ)
            req.connect(h.pub.replay_endpoint)
            await req.send(start.to_bytes(8, "big"))
            assert await req.poll(int(TIMEOUT * 1000))
            assert await req.recv_multipart() == [topic, seq.to_bytes(8, "big"), payload]
            req.close(linger=0)
    run(scenario())


def test_malformed_replay_request_is_ignored():
    async def scenario():
        async with Harness() as h:
            dealer = h.ctx.socket(zmq.DEALER)
            dealer.connect(h.pub.replay_endpoint)
            await dealer.send_multipart([b"", b"x", b"y"])
            assert not await dealer.poll(200)
            dealer.close(linger=0)
            h.log.emit(pb.BLOCK_STORED, NS, key(1), pb.TIER_CPU)
            [(_, seq, _, _)] = await h.recv(1)
            assert [s for _, s, _ in await h.replay(seq)] == [seq]
    run(scenario())


def test_falling_behind_never_blocks_emit_and_resumes_from_the_ring_without_loss():
    async def scenario():
        async with Harness(ring_size=8192, watcher_queue=64, max_batch=256) as h:
            first = h.pub.next_seq
            t0 = time.perf_counter()
            for i in range(5000):  # no await: the publisher cannot run, its queue overflows
                h.log.emit(pb.BLOCK_STORED, NS, key(i), pb.TIER_CPU)
            assert time.perf_counter() - t0 < 2.0
            n = -(-5000 // 256) + 1  # the 64 queued events, then the ring in 256-event batches
            hashes = []
            while len(hashes) < 5000:
                [(_, _, b, _)] = await h.recv(1)
                hashes += [e.block_hashes[0] for e in b.events]
            assert hashes == [key(i) for i in range(5000)]
            assert h.pub.resyncs == 1 and h.pub.gaps == 0
            assert h.pub.next_seq - first <= n + 1
    run(scenario())


def test_falling_out_of_the_ring_publishes_all_cleared_then_continues():
    async def scenario():
        async with Harness(ring_size=1024, watcher_queue=64, namespaces=lambda: {NS: object()}) as h:
            for i in range(3000):
                h.log.emit(pb.BLOCK_STORED, NS, key(i), pb.TIER_CPU)
            cleared = set()
            while len(cleared) < 2:
                [(topic, _, b, _)] = await h.recv(1)
                if b.events == [vkv.AllBlocksCleared()]:
                    cleared.add(topic)
            assert cleared == {b"kvtier/warmup", f"kvtier/{NS}".encode()}  # published-before, and listed
            assert h.pub.gaps == 1
            h.log.emit(pb.BLOCK_STORED, NS, key(9999), pb.TIER_GPU)
            while True:
                [(_, _, b, _)] = await h.recv(1)
                if isinstance(b.events[-1], vkv.BlockStored) and b.events[-1].block_hashes == [key(9999)]:
                    break
    run(scenario())


def test_close_flushes_queued_events_and_frees_the_watcher():
    async def scenario():
        h = Harness()
        async with h:
            h.log.emit(pb.BLOCK_STORED, NS, key(1), pb.TIER_CPU)
            assert h.log.watchers == 1
            await h.pub.close()  # before the publisher task ran: close() publishes it
            [(_, _, b, _)] = await h.recv(1)
            assert b.events[0].block_hashes == [key(1)]
            assert h.log.watchers == 0
    run(scenario())


def test_ipc_endpoint(tmp_path):
    async def scenario():
        log = EventLog(1024, 64, 4)
        pub = ZmqKvEventPublisher(log, f"ipc://{tmp_path}/kv.pub", f"ipc://{tmp_path}/kv.replay")
        await pub.start()
        try:
            assert (pub.endpoint, pub.replay_endpoint) == (f"ipc://{tmp_path}/kv.pub", f"ipc://{tmp_path}/kv.replay")
            assert {p.name: stat.S_IMODE(p.lstat().st_mode) for p in tmp_path.iterdir()} == {
                "kv.pub": 0o600, "kv.replay": 0o600}  # the default ipc_mode, and no private dir left
            log.emit(pb.BLOCK_STORED, NS, key(1), pb.TIER_CPU)
            await asyncio.sleep(0.05)
            ctx = zmq.asyncio.Context()
            dealer = ctx.socket(zmq.DEALER)
            dealer.connect(pub.replay_endpoint)
            await dealer.send_multipart([b"", (0).to_bytes(8, "big")])
            frames = [await dealer.recv_multipart() for _ in range(2)]
            assert DECODER.decode(frames[0][3]).events[0].block_hashes == [key(1)]
            assert frames[1][2] == END_SEQ
            dealer.close(linger=0)
            ctx.term()
        finally:
            await pub.close()
        assert list(tmp_path.iterdir()) == []  # close() removes the socket files
    run(scenario())


def test_ipc_socket_file_has_its_mode_before_it_appears_at_its_path(tmp_path, monkeypatch):
    """No moment in which the socket file at the configured path is connectable by others: it is
    bound in a private 0700 directory, chmodded there, and renamed into place."""
    seen = []
    real_rename = kv_events.os.rename

    def spy(src, dst):
        seen.append((os.path.exists(dst), stat.S_IMODE(os.lstat(os.path.dirname(src)).st_mode),
                     stat.S_IMODE(os.lstat(src).st_mode), stat.S_ISSOCK(os.lstat(src).st_mode), dst))
        real_rename(src, dst)
    monkeypatch.setattr(kv_events.os, "rename", spy)
    old_umask = os.umask(0)  # the worst umask: a socket bound in place would be 0777 until chmodded
    try:
        async def scenario():
            pub = ZmqKvEventPublisher(EventLog(1024, 64, 4), f"ipc://{tmp_path}/kv.pub",
                                      f"ipc://{tmp_path}/kv.replay", ipc_mode=0o640)
            await pub.start()
            await pub.close()
        run(scenario())
    finally:
        os.umask(old_umask)
    assert seen == [(False, 0o700, 0o640, True, f"{tmp_path}/kv.pub"),
                    (False, 0o700, 0o640, True, f"{tmp_path}/kv.replay")]


def test_ipc_endpoint_in_a_missing_directory_is_refused(tmp_path):
    async def scenario():
        log = EventLog(1024, 64, 4)
        pub = ZmqKvEventPublisher(log, f"ipc://{tmp_path}/missing/kv.pub")
        with pytest.raises(EndpointError, match=f"directory {tmp_path}/missing does not exist"):
            await pub.start()
        assert log.watchers == 0
    run(scenario())
    assert list(tmp_path.iterdir()) == []


def test_kvtierd_publishes_what_vllm_decodes(make_daemon):
    """End to end: a real kvtierd with events.zmq_endpoint set; a SUB socket decodes with vLLM's classes."""
    directory = tempfile.mkdtemp(prefix="kvz-", dir="/tmp")  # short: Unix socket paths are limited
    endpoint = f"ipc://{directory}/events.sock"
    daemon = make_daemon({"events.zmq_endpoint": endpoint})
    assert stat.S_IMODE(os.lstat(f"{directory}/events.sock").st_mode) == 0o600  # already when serving
    context = zmq.Context()
    sub = context.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"kvtier/")
    sub.connect(endpoint)
    try:
        with daemon.client() as c:
            wait_subscribed(c, sub)
            c.register_namespace("e2e")
            c.put_blocks("e2e", [(b"k" * 32, b"", b"v" * 1000)], wait_durable=True)
        stored = []

        def both_tiers():
            while sub.poll(50):
                topic, seq, payload = sub.recv_multipart()
                assert len(seq) == 8
                if topic == b"kvtier/e2e":
                    batch = DECODER.decode(payload)
                    stored.extend((e.block_hashes, e.medium) for e in batch.events if isinstance(e, vkv.BlockStored))
            return len(stored) >= 2
        wait_for(both_tiers, what="BlockStored on CPU and STORAGE")
        assert stored == [([b"k" * 32], "CPU"), ([b"k" * 32], "STORAGE")]
    finally:
        sub.close(0)
        context.term()
    assert f"KV events (vLLM format) on {endpoint} (socket files mode 0600)" in daemon.log()
    assert daemon.stop() == 0
    assert os.listdir(directory) == []  # the socket file goes with the daemon
    os.rmdir(directory)


def wait_subscribed(client, sub) -> None:
    """ZMQ's slow joiner: stores probe blocks in namespace "warmup" until one reaches `sub`."""
    client.register_namespace("warmup")
    probes = iter(range(1 << 30))

    def subscribed():
        client.put_blocks("warmup", [(next(probes).to_bytes(32, "big"), b"", b"w")])
        return sub.poll(100)
    wait_for(subscribed, what="the subscription to reach kvtierd")
