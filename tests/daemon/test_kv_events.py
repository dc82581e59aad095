"""daemon/kv_events.py: a real EventLog and catalog, real ZMQ sockets, frames decoded with vLLM's own
msgspec types (vllm.distributed.kv_events), in the routers' integer-hash format and in the raw-bytes one."""

from __future__ import annotations

import asyncio
import os
import shutil
import stat
import tempfile
import time

import grpc
import msgspec
import pytest
import zmq
import zmq.asyncio

from conftest import wait_for
from s3server import s3_server  # noqa: F401 - a fixture
from kvtier.client.client import _stage
from kvtier.daemon import kv_events
from kvtier.daemon.catalog import Block, Catalog
from kvtier.daemon.errors import ApiError, ErrorKind
from kvtier.daemon.events import EventLog
from kvtier.daemon.kv_events import END_SEQ, EndpointError, ZmqKvEventPublisher, int_block_hash
from kvtier.proto.v1 import kvtier_pb2 as pb
from kvtier.tiers.block import BlockOrigin, pack_token_ids

import vllm.distributed.kv_events as vkv  # make test installs vLLM: a missing one fails, not skips
from vllm.v1.core.kv_cache_utils import BlockHash, maybe_convert_block_hash

DECODER = msgspec.msgpack.Decoder(vkv.KVEventBatch)
NS = "model-a"
TIMEOUT = 5.0
ORIGIN = BlockOrigin(engine="engine-7", model="org/model-x", block_size=4, lora_name="")
VLLM_MEDIUMS = {pb.TIER_GPU: vkv.MEDIUM_GPU, pb.TIER_CPU: vkv.MEDIUM_CPU, pb.TIER_DISK: vkv.MEDIUM_STORAGE,
                pb.TIER_S3: "S3"}
LEGACY = {"topic": "kvtier", "hash_format": "bytes", "mediums": VLLM_MEDIUMS}  # the format before routers


def key(i: int) -> bytes:
    return bytes([i % 251 + 1]) * 24 + i.to_bytes(8, "big")  # distinct in their low 64 bits too


def tokens(i: int, n: int = 4) -> list[int]:
    return [1000 * i + j for j in range(n)]


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 60))


def vllm_int_hash(key_bytes: bytes, monkeypatch) -> int:
    """vLLM's own conversion (maybe_convert_block_hash) in integer mode."""
    monkeypatch.setenv("VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES", "1")
    return maybe_convert_block_hash(BlockHash(key_bytes))


def catalog_with(tmp_path, blocks) -> Catalog:
    """A real catalog holding (namespace, key, parent, tiers, token ids, origin) blocks."""
    catalog = Catalog(str(tmp_path), 16)
    for namespace, k, parent, tiers, token_ids, origin in blocks:
        if namespace not in catalog.namespaces:
            catalog.register(namespace, {"model": "attr-model"})
        catalog.add(Block(namespace, k, parent, 100, 0, 1, tiers=tiers, token_ids=pack_token_ids(token_ids),
                          origin=origin))
    return catalog


async def until(predicate, what: str, timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


class Harness:
    """A publisher on tcp://127.0.0.1:<free port> (bound to port 0) and a connected SUB socket.

    Ready once the publisher saw the subscription (XPUB) and finished its start announcement; recv()
    then returns the batches published from there on (`start_seq`), skipping empty ones."""

    def __init__(self, ring_size=4096, watcher_queue=1024, replay=True, catalog=None, events=None, **kwargs):
        self.log = events or EventLog(ring_size, watcher_queue, 8)
        self.pub = ZmqKvEventPublisher(self.log, "tcp://127.0.0.1:0", "tcp://127.0.0.1:0" if replay else None,
                                       catalog=catalog, **kwargs)
        self.ctx = zmq.asyncio.Context()
        self.start_seq = 0

    async def __aenter__(self):
        await self.pub.start()
        self.sub = self.ctx.socket(zmq.SUB)
        self.sub.setsockopt(zmq.SUBSCRIBE, b"")
        self.sub.connect(self.pub.endpoint)
        await until(lambda: self.pub.subscriptions >= 1 and self.pub._announcing is None, "the subscription")
        self.start_seq = self.pub.next_seq
        return self

    async def recv(self, n: int) -> list[tuple[bytes, int, object, bytes]]:
        out = []
        while len(out) < n:
            assert await self.sub.poll(int(TIMEOUT * 1000)), f"got {len(out)} of {n} batches"
            topic, seq, payload = await self.sub.recv_multipart()
            assert len(seq) == 8
            batch = DECODER.decode(payload)
            if int.from_bytes(seq, "big") >= self.start_seq and batch.events:
                out.append((topic, int.from_bytes(seq, "big"), batch, payload))
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


# ---- the routers' format: integer hashes, token ids, their medium words -------------------------

def test_integer_hash_mode_decodes_with_vllms_classes_as_vllm_would_publish_it(tmp_path, monkeypatch):
    """Every field a router reads, decoded with vLLM's KVEventBatch: hashes equal vLLM's own
    maybe_convert_block_hash(key) with VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=1, the parent's too."""
    lora = BlockOrigin("engine-7", "org/model-x", 4, "my-lora")
    catalog = catalog_with(tmp_path, [(NS, key(1), b"", pb.TIER_CPU, tokens(1), ORIGIN),
                                      (NS, key(2), key(1), pb.TIER_CPU, tokens(2), ORIGIN),
                                      (NS, key(3), key(2), pb.TIER_CPU, tokens(3, 3), lora)])

    async def scenario():
        async with Harness(catalog=catalog, worker="node-1") as h:
            h.log.emit(pb.BLOCK_STORED, NS, key(1), pb.TIER_CPU)
            h.log.emit(pb.BLOCK_STORED, NS, key(2), pb.TIER_DISK, parent=key(1))
            h.log.emit(pb.BLOCK_MOVED, NS, key(2), pb.TIER_GPU, from_tier=pb.TIER_CPU)  # no parent in the event
            h.log.emit(pb.BLOCK_STORED, NS, key(3), pb.TIER_S3, parent=key(2))
            h.log.emit(pb.BLOCK_REMOVED, NS, key(1), pb.TIER_CPU)
            h.log.emit(pb.BLOCK_QUARANTINED, NS, key(2), pb.TIER_DISK)
            h.log.emit(pb.ALL_CLEARED, NS)  # publishes nothing: Clear's BLOCK_REMOVEDs said it
            [(topic, _, batch, payload)] = await h.recv(1)  # emitted in one go, one topic: one batch
            return topic, batch, payload
    topic, batch, payload = run(scenario())
    h1, h2, h3 = (vllm_int_hash(key(i), monkeypatch) for i in (1, 2, 3))
    assert h1 == int_block_hash(key(1)) and isinstance(h1, int) and 0 <= h1 < 2**64
    assert topic == b"kv@node-1@org/model-x"
    assert isinstance(batch, vkv.KVEventBatch) and batch.data_parallel_rank is None
    assert batch.events[:3] == [
        vkv.BlockStored(block_hashes=[h1], parent_block_hash=None, token_ids=tokens(1), block_size=4, lora_id=None,
                        medium="CPU_TIER1", lora_name=None),
        vkv.BlockStored(block_hashes=[h2], parent_block_hash=h1, token_ids=tokens(2), block_size=4, lora_id=None,
                        medium="DISK", lora_name=None),
        vkv.BlockStored(block_hashes=[h2], parent_block_hash=h1, token_ids=tokens(2), block_size=4, lora_id=None,
                        medium="GPU", lora_name=None)]
    assert batch.events[3:] == [
        vkv.BlockStored(block_hashes=[h3], parent_block_hash=h2, token_ids=tokens(3, 3), block_size=4, lora_id=None,
                        medium="EXTERNAL", lora_name="my-lora"),
        vkv.BlockRemoved(block_hashes=[h1], medium="CPU_TIER1"),
        vkv.BlockRemoved(block_hashes=[h2], medium="DISK")]
    # vLLM's ZmqEventPublisher encodes the batch with a plain msgspec msgpack Encoder: identical bytes.
    assert msgspec.msgpack.Encoder().encode(batch) == payload


def test_topic_template_and_fallbacks(tmp_path):
    """{worker} {model} {namespace} {lora}; a block without an origin takes events.zmq_model, else its
    namespace's "model" attribute; a block gone from the catalog has no tokens (it is removed next)."""
    catalog = catalog_with(tmp_path, [("ns-1", key(1), b"", pb.TIER_CPU, tokens(1), None)])

    async def scenario(**kwargs):
        async with Harness(catalog=catalog, topic="t/{worker}/{namespace}/{model}/{lora}", worker="w",
                           block_size=16, **kwargs) as h:
            h.log.emit(pb.BLOCK_STORED, "ns-1", key(1), pb.TIER_CPU)
            [(first, _, _, _)] = await h.recv(1)
            h.log.emit(pb.BLOCK_STORED, "ns-1", key(9), pb.TIER_CPU)  # not in the catalog
            [(topic, _, batch, _)] = await h.recv(1)
            return first, (topic, None, batch, None)
    first, (topic, _, batch, _) = run(scenario())
    assert first == b"t/w/ns-1/attr-model/" and topic == b"t/w/ns-1/attr-model/"
    assert batch.events[0].token_ids == [] and batch.events[0].block_size == 16
    first, _ = run(scenario(model="served-name"))
    assert first == b"t/w/ns-1/served-name/"


def test_bytes_mode_keeps_the_earlier_format():
    """hash_format="bytes", a topic without placeholders ("<topic>/<namespace>") and vLLM's medium
    constants: the format before routers, still available (events.zmq_block_hashes = "bytes")."""
    async def scenario():
        async with Harness(block_size=16, **LEGACY) as h:
            first = h.pub.next_seq
            h.log.emit(pb.BLOCK_STORED, NS, key(1), pb.TIER_CPU, length=4096)
            h.log.emit(pb.BLOCK_STORED, NS, key(2), pb.TIER_DISK, length=4096, parent=key(1))
            h.log.emit(pb.BLOCK_MOVED, NS, key(2), pb.TIER_GPU, from_tier=pb.TIER_CPU, length=4096)
            h.log.emit(pb.BLOCK_STORED, NS, key(3), pb.TIER_S3, length=4096, parent=key(2))
            h.log.emit(pb.BLOCK_REMOVED, NS, key(1), pb.TIER_CPU, length=4096)
            h.log.emit(pb.BLOCK_QUARANTINED, NS, key(2), pb.TIER_DISK, length=4096)
            [(topic, seq, batch, payload)] = await h.recv(1)  # emitted in one go: one batch
            assert topic == f"kvtier/{NS}".encode() and seq == first
            assert abs(batch.ts - time.time()) < 60
            ev = batch.events
            assert [type(e) for e in ev] == [vkv.BlockStored] * 4 + [vkv.BlockRemoved] * 2
            assert ev[0] == vkv.BlockStored(block_hashes=[key(1)], parent_block_hash=None, token_ids=[],
                                            block_size=16, lora_id=None, medium=vkv.MEDIUM_CPU, lora_name=None)
            assert ev[1].block_hashes == [key(2)] and ev[1].parent_block_hash == key(1)
            assert ev[1].medium == vkv.MEDIUM_STORAGE
            assert ev[2].block_hashes == [key(2)] and ev[2].medium == vkv.MEDIUM_GPU  # moved: stored on destination
            assert ev[3].medium == "S3" and ev[3].parent_block_hash == key(2)
            assert ev[4] == vkv.BlockRemoved(block_hashes=[key(1)], medium=vkv.MEDIUM_CPU)
            assert ev[5] == vkv.BlockRemoved(block_hashes=[key(2)], medium=vkv.MEDIUM_STORAGE)
            assert msgspec.msgpack.Encoder().encode(batch) == payload
            assert h.pub.published_events >= 6 and h.pub.dropped_batches == 0
    run(scenario())


def test_removal_of_a_block_gone_from_the_catalog_goes_to_its_namespaces_topics(tmp_path):
    catalog = catalog_with(tmp_path, [(NS, key(1), b"", pb.TIER_CPU, tokens(1), ORIGIN)])

    async def scenario():
        async with Harness(catalog=catalog, worker="w") as h:
            h.log.emit(pb.BLOCK_STORED, NS, key(1), pb.TIER_CPU)
            await h.recv(1)
            catalog.discard(catalog.get(NS, key(1)))
            h.log.emit(pb.BLOCK_REMOVED, NS, key(1), pb.TIER_CPU)
            [(topic, _, batch, _)] = await h.recv(1)
            assert topic == b"kv@w@org/model-x"
            assert batch.events == [vkv.BlockRemoved(block_hashes=[int_block_hash(key(1))], medium="CPU_TIER1")]
    run(scenario())


# ---- the announcement, subscriptions and sequence numbers across restarts -----------------------

def test_start_announces_all_cleared_then_every_block_parents_first(tmp_path):
    """What a restarted daemon re-adopted from disk and S3: AllBlocksCleared, then BlockStored per
    block and tier, each block after its parent, in the replay buffer too."""
    chain = [bytes([9 - i]) * 32 for i in range(3)]  # 0x09.., 0x08.., 0x07..: in the catalog, children sort first
    other = BlockOrigin("e", "other-model", 4, "")
    catalog = catalog_with(tmp_path, [
        (NS, chain[2], chain[1], pb.TIER_DISK, tokens(3), ORIGIN),
        (NS, chain[1], chain[0], pb.TIER_DISK | pb.TIER_S3, tokens(2), ORIGIN),
        (NS, chain[0], b"", pb.TIER_DISK, tokens(1), ORIGIN),
        ("ns-2", key(5), b"", pb.TIER_S3, tokens(5), other)])

    async def scenario():
        async with Harness(catalog=catalog, worker="w") as h:
            return [(t, s, DECODER.decode(p)) for t, s, p in await h.replay(0)], h.pub.announced_blocks
    replayed, announced = run(scenario())
    batches = [(t, b.events) for t, _, b in replayed if b.events]
    # Cleared on every topic first: the blocks' and each namespace's own (its "model" attribute).
    assert batches[:3] == [(t, [vkv.AllBlocksCleared()])
                           for t in (b"kv@w@attr-model", b"kv@w@org/model-x", b"kv@w@other-model")]
    stored = [(t, e.block_hashes[0], e.parent_block_hash, e.medium, e.token_ids)
              for t, events in batches[3:] for e in events]
    h = [int_block_hash(k) for k in chain]
    assert stored == [(b"kv@w@org/model-x", h[0], None, "DISK", tokens(1)),
                      (b"kv@w@org/model-x", h[1], h[0], "DISK", tokens(2)),
                      (b"kv@w@org/model-x", h[1], h[0], "EXTERNAL", tokens(2)),
                      (b"kv@w@org/model-x", h[2], h[1], "DISK", tokens(3)),
                      (b"kv@w@other-model", int_block_hash(key(5)), None, "EXTERNAL", tokens(5))]
    assert announced == 5
    seqs = [s for _, s, _ in replayed]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))


def test_a_new_subscription_gets_an_empty_batch_and_sequence_numbers_rise_across_restarts():
    """A subscriber that missed batches (joined late, or followed the previous run) learns it at once:
    the empty batch's seq is past its last one, so it replays (Dynamo's indexer does)."""
    async def scenario():
        before = time.time_ns() // 1000
        async with Harness() as first:
            assert first.pub.next_seq >= before  # microseconds since the epoch at start
            first.log.emit(pb.BLOCK_STORED, NS, key(1), pb.TIER_CPU)
            [(_, last_of_first_run, _, _)] = await first.recv(1)
        async with Harness() as second:  # "after a restart"
            sub = second.ctx.socket(zmq.SUB)
            sub.setsockopt(zmq.SUBSCRIBE, b"")
            sub.connect(second.pub.endpoint)
            got = []
            while not got:
                assert await sub.poll(int(TIMEOUT * 1000)), "no batch for the new subscriber"
                topic, seq, payload = await sub.recv_multipart()
                if not DECODER.decode(payload).events:
                    got.append(int.from_bytes(seq, "big"))
            sub.close(linger=0)
            assert got[0] > last_of_first_run + 1  # a gap: the subscriber replays this run from there
            replayed = await second.replay(last_of_first_run + 1)
            assert DECODER.decode(replayed[0][2]).events == [vkv.AllBlocksCleared()]
            assert second.pub.subscriptions >= 2
    run(scenario())


def test_batches_split_by_topic_and_sequence_numbers_are_consecutive():
    async def scenario():
        async with Harness(max_batch=3, topic="kvtier") as h:
            first = h.pub.next_seq
            for i, ns in enumerate(["a", "a", "b", "a", "a", "a", "a", "a"]):
                h.log.emit(pb.BLOCK_STORED, ns, key(i), pb.TIER_CPU)
            got = await h.recv(4)
            assert [t for t, *_ in got] == [b"kvtier/a", b"kvtier/b", b"kvtier/a", b"kvtier/a"]
            assert [len(b.events) for _, _, b, _ in got] == [2, 1, 3, 2]
            assert [s for _, s, _, _ in got] == list(range(first, first + 4))
            hashes = [e.block_hashes[0] for _, _, b, _ in got for e in b.events]
            assert hashes == [int_block_hash(key(i)) for i in range(8)]
            h.log.emit(pb.BLOCK_REMOVED, "b", key(2), pb.TIER_CPU)  # later batches keep counting up
            [(_, seq, _, _)] = await h.recv(1)
            assert seq == first + 4
    run(scenario())


def test_one_topic_per_node():
    async def scenario():
        async with Harness(topic="kv@{worker}", worker="node7") as h:
            h.log.emit(pb.BLOCK_STORED, "a", key(1), pb.TIER_CPU)
            h.log.emit(pb.BLOCK_STORED, "b", key(2), pb.TIER_CPU)
            [(topic, _, batch, _)] = await h.recv(1)
            assert topic == b"kv@node7" and len(batch.events) == 2
    run(scenario())


def test_connecting_to_an_indexer_that_binds_its_sub_socket_llm_d_style(tmp_path):
    """llm-d's indexer binds a SUB socket and takes topics "kv@<pod>@<model>" (split on "@"): the
    publisher connects to it (events.zmq_connect), with no endpoint of its own, and announces every
    block to it once it subscribed."""
    catalog = catalog_with(tmp_path, [(NS, key(1), b"", pb.TIER_DISK, tokens(1), ORIGIN)])

    async def scenario():
        ctx = zmq.asyncio.Context()
        sub = ctx.socket(zmq.SUB)
        sub.setsockopt(zmq.SUBSCRIBE, b"kv@")
        port = sub.bind_to_random_port("tcp://127.0.0.1")
        log = EventLog(1024, 64, 4)
        pub = ZmqKvEventPublisher(log, "", catalog=catalog, worker="10.0.0.7", connect=[f"tcp://127.0.0.1:{port}"])
        await pub.start()
        try:
            got = []
            while not any(isinstance(e, vkv.BlockRemoved) for _, events in got for e in events):
                # (the bound SUB sends its subscription once it is polled, as llm-d's poller does)
                assert await sub.poll(int(TIMEOUT * 1000)), f"only {got}"
                topic, _, payload = await sub.recv_multipart()
                got.append((topic, DECODER.decode(payload).events))
                if len(got) == 1:  # connected and subscribed: the announcement or the empty batch came
                    log.emit(pb.BLOCK_REMOVED, NS, key(1), pb.TIER_DISK)
            assert pub.subscriptions >= 1
            _, pod, model = got[-1][0].decode().split("@")
            assert (pod, model) == ("10.0.0.7", "org/model-x")
            # It never replays, so it is announced to once it subscribed (whatever it missed of the start's).
            stored = [e for _, events in got for e in events if isinstance(e, vkv.BlockStored)]
            assert [(e.block_hashes, e.medium, e.token_ids) for e in stored][-1:] == [
                ([int_block_hash(key(1))], "DISK", tokens(1))]
        finally:
            await pub.close()
            sub.close(linger=0)
            ctx.term()
    run(scenario())


@pytest.mark.parametrize("events, problem", [
    ({"zmq_topic": "kv@{pod}"}, "unknown placeholder {pod}"),
    ({"zmq_topic": "kv@{model!r}"}, "not a valid template"),
    ({"zmq_block_hashes": "hex"}, "zmq_block_hashes"),
    ({"zmq_block_size": 5000}, "zmq_block_size must be 0..4096"),
    ({"zmq_medium_cpu": ""}, "zmq_medium_cpu"),
    ({"zmq_connect": ["tcp://10.0.0.9:5557"]}, "allow_remote"),
    ({"zmq_connect": ["udp://x:1"]}, "zmq_connect"),
    ({"zmq_connect": ["tcp://10.0.0.9:5557"], "allow_remote": True}, None),
    ({"zmq_topic": "kvtier", "zmq_block_hashes": "bytes", "zmq_medium_cpu": "CPU_PINNED"}, None),
])
def test_config_keys(events, problem):
    from kvtier.daemon import config
    if problem is None:
        cfg = config.load(overrides={"events": events})
        assert all(getattr(cfg.events, k) == v for k, v in events.items())
    else:
        with pytest.raises(config.ConfigError, match=problem):
            config.load(overrides={"events": events})
    defaults = config.load().events
    assert (defaults.zmq_topic, defaults.zmq_block_hashes, defaults.zmq_medium_cpu, defaults.zmq_medium_disk,
            defaults.zmq_medium_s3, defaults.zmq_connect) == ("kv@{worker}@{model}", "int", "CPU_TIER1", "DISK",
                                                              "EXTERNAL", [])


# ---- replay --------------------------------------------------------------------------------------

def test_replay_through_router_returns_exactly_the_batches_from_the_start_seq():
    async def scenario():
        async with Harness() as h:
            first = h.pub.next_seq
            for i in range(10):
                h.log.emit(pb.BLOCK_STORED, NS, key(i), pb.TIER_CPU)
                await until(lambda: h.pub.next_seq > first + i, "one batch each")
            live = await h.recv(10)
            assert [s for _, s, _, _ in live] == list(range(first, first + 10))
            replayed = await h.replay(first + 4)
            assert [(t, s, p) for t, s, _, p in live[4:]] == replayed
            assert await h.replay(first + 100) == []  # nothing newer: just the end marker
            everything = await h.replay(0)  # the announcement and the subscription's empty batch too
            assert everything[-10:] == [(t, s, p) for t, s, _, p in live]
            assert DECODER.decode(everything[0][2]).events == [vkv.AllBlocksCleared()]
    run(scenario())


def test_replay_buffer_is_bounded():
    async def scenario():
        async with Harness(buffer_steps=5) as h:
            for i in range(12):
                before = h.pub.next_seq
                h.log.emit(pb.BLOCK_STORED, NS, key(i), pb.TIER_CPU)
                await until(lambda: h.pub.next_seq > before, "one batch each")
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


# ---- flow control --------------------------------------------------------------------------------

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
            assert hashes == [int_block_hash(key(i)) for i in range(5000)]
            assert h.pub.resyncs == 1 and h.pub.gaps == 0
            assert h.pub.next_seq - first <= n + 1
    run(scenario())


def test_falling_out_of_the_ring_announces_every_block_again(tmp_path):
    catalog = catalog_with(tmp_path, [(NS, key(1), b"", pb.TIER_CPU | pb.TIER_DISK, tokens(1), ORIGIN)])

    async def scenario():
        async with Harness(ring_size=1024, watcher_queue=64, catalog=catalog, worker="w") as h:
            for i in range(3000):
                h.log.emit(pb.BLOCK_STORED, NS, key(100 + i), pb.TIER_CPU)
            cleared = set()
            while True:
                [(topic, _, b, _)] = await h.recv(1)
                if b.events == [vkv.AllBlocksCleared()]:
                    cleared.add(topic)
                elif cleared:
                    break
            # on every topic: the published one, and the namespace's own (its "model" attribute)
            assert cleared == {b"kv@w@org/model-x", b"kv@w@attr-model"}
            assert topic == b"kv@w@org/model-x" and h.pub.gaps == 1
            assert [(e.block_hashes, e.medium, e.token_ids) for e in b.events] == [
                ([int_block_hash(key(1))], "CPU_TIER1", tokens(1)), ([int_block_hash(key(1))], "DISK", tokens(1))]
            h.log.emit(pb.BLOCK_STORED, NS, key(9999), pb.TIER_GPU)  # and it continues from the current sequence
            while True:
                [(_, _, b, _)] = await h.recv(1)
                if b.events[-1].block_hashes == [int_block_hash(key(9999))]:
                    break
    run(scenario())


def test_a_tenants_publisher_carries_only_its_own_namespaces(tmp_path):
    """tenant="a": only the ring of tenant a's namespaces is published, and only its blocks are announced;
    node-wide sequence numbers leave holes in a's ring, which are not a fall-behind (no resync)."""
    catalog = catalog_with(tmp_path, [("a/m", key(1), b"", pb.TIER_CPU, tokens(1), ORIGIN),
                                      ("b/m", key(2), b"", pb.TIER_CPU, tokens(2), ORIGIN)])

    async def scenario():
        h = Harness(catalog=catalog, tenant="a",
                    events=EventLog(4096, 1024, 8, tenants=[("a", 1024, 2), ("b", 1024, 2)]))
        async with h:
            replayed = [DECODER.decode(p).events for _, _, p in await h.replay(0)]
            announced = [e for events in replayed for e in events if isinstance(e, vkv.BlockStored)]
            assert [e.token_ids for e in announced] == [tokens(1)]  # a's block, not b's
            for i in range(10, 20):
                h.log.emit(pb.BLOCK_STORED, "b/m", key(i), pb.TIER_CPU)
                h.log.emit(pb.BLOCK_STORED, "a/m", key(100 + i), pb.TIER_CPU)
            h.log.emit(pb.BLOCK_STORED, "other", key(99), pb.TIER_CPU)  # an administrators' namespace
            h.log.emit(pb.BLOCK_STORED, "a/m", key(999), pb.TIER_CPU)
            hashes = []
            while int_block_hash(key(999)) not in hashes:
                [(_, _, b, _)] = await h.recv(1)
                hashes += [e.block_hashes[0] for e in b.events]
            assert hashes == [int_block_hash(key(100 + i)) for i in range(10, 20)] + [int_block_hash(key(999))]
            assert h.pub.resyncs == 0
    run(scenario())


def test_each_tenant_ring_keeps_its_own_resume_point_and_watcher_bound():
    """One node-wide seq; a tenant's replay and OUT_OF_RANGE depend only on its own ring; watchers of
    a tenant with a table are bounded by its own bound, the others share the node's."""
    log = EventLog(1024, 64, 3, tenants=[("a", 1024, 1), ("b", 1024, 2)], untabled_max_watchers=1)
    log.emit(pb.BLOCK_STORED, "b/m", key(1), pb.TIER_CPU)
    resume = log.seq + 1
    for i in range(5000):
        log.emit(pb.BLOCK_STORED, "a/m", key(i % 200), pb.TIER_CPU)
    log.emit(pb.BLOCK_STORED, "b/m", key(2), pb.TIER_CPU)
    replay, queue = log.subscribe(resume, "b")
    assert [(e.seq, e.key) for e in replay] == [(log.seq, key(2))]
    with pytest.raises(ApiError) as err:
        log.subscribe(resume, "a")  # a's own ring dropped its events from there
    assert err.value.kind is ErrorKind.OUT_OF_RANGE
    with pytest.raises(ApiError, match="the node event ring"):
        log.subscribe(resume)  # the administrators' ring holds every event: the churn went through it
    log.subscribe(0, "a")
    with pytest.raises(ApiError, match="tenant a has its max_watchers"):
        log.subscribe(0, "a")
    log.subscribe(0, "x")  # a tenant without a table: its own bound of 1, in the shared pool of 3
    with pytest.raises(ApiError, match="untabled_tenant_max_watchers"):
        log.subscribe(0, "x")
    log.subscribe(0)
    log.subscribe(0, "y")
    with pytest.raises(ApiError, match="raise limits.max_watchers"):
        log.subscribe(0)
    log.subscribe(0, "b", internal=True)  # the daemon's own publishers are not counted
    log.subscribe(0, "b")  # b's second: its own bound, whatever the shared pool holds
    log.unsubscribe(queue)
    log.subscribe(0, "b")


def test_close_flushes_queued_events_and_frees_the_watcher():
    async def scenario():
        h = Harness()
        async with h:
            h.log.emit(pb.BLOCK_STORED, NS, key(1), pb.TIER_CPU)
            assert h.log.watchers == 1
            await h.pub.close()  # before the publisher task ran: close() publishes it
            [(_, _, b, _)] = await h.recv(1)
            assert b.events[0].block_hashes == [int_block_hash(key(1))]
            assert h.log.watchers == 0
    run(scenario())


# ---- ipc endpoints -------------------------------------------------------------------------------

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
            await until(lambda: pub.published_events >= 2, "the announcement and the block")
            ctx = zmq.asyncio.Context()
            dealer = ctx.socket(zmq.DEALER)
            dealer.connect(pub.replay_endpoint)
            await dealer.send_multipart([b"", (0).to_bytes(8, "big")])
            frames = [await dealer.recv_multipart() for _ in range(3)]
            assert DECODER.decode(frames[0][3]).events == [vkv.AllBlocksCleared()]
            assert DECODER.decode(frames[1][3]).events[0].block_hashes == [int_block_hash(key(1))]
            assert frames[2][2] == END_SEQ
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


# ---- a real kvtierd ------------------------------------------------------------------------------

def commit_with_tokens(client, namespace: str, blocks, origin: pb.BlockOrigin, wait_durable=True):
    """Commits (key, parent, data, token ids) blocks the way the vLLM connector does: token ids per
    entry, the origin per request."""
    allocation = client.allocate(len(blocks))
    entries = _stage(client.arena(), allocation.slots, [(k, p, d) for k, p, d, _ in blocks])
    request = pb.CommitRequest(allocation_id=allocation.id, namespace=namespace, wait_durable=wait_durable,
                               origin=origin,
                               entries=[pb.CommitEntry(key=k, parent=p, slot=s, length=n, checksum=c, token_ids=t)
                                        for (k, p, s, n, c), (*_, t) in zip(entries, blocks)])
    return list(client.call(client.stub.Commit, request).status)


def read_batches(sub, into: list) -> list:
    """Everything `sub` has now, decoded, appended to `into` as (topic, seq, events)."""
    while sub.poll(50):
        topic, seq, payload = sub.recv_multipart()
        assert len(seq) == 8
        into.append((topic, int.from_bytes(seq, "big"), DECODER.decode(payload).events))
    return into


def test_kvtierd_announces_blocks_with_their_token_ids_live_and_after_a_restart(make_daemon):
    """End to end: commits with token ids and an origin reach a SUB socket (vLLM's classes decode them)
    on the CPU and disk tiers; after a restart (no new stores) the re-adopted disk blocks are
    announced with the same token ids, read back from their on-disk headers."""
    directory = tempfile.mkdtemp(prefix="kvz-", dir="/tmp")  # short: Unix socket paths are limited
    endpoint, replay = f"ipc://{directory}/events.sock", f"ipc://{directory}/replay.sock"
    daemon = make_daemon({"events.zmq_endpoint": endpoint, "events.zmq_replay_endpoint": replay,
                          "events.zmq_worker": "node-a"})
    assert stat.S_IMODE(os.lstat(f"{directory}/events.sock").st_mode) == 0o600  # already when serving
    origin = pb.BlockOrigin(engine="vllm-1", model="served/model", block_size=4)
    blocks = [(key(1), b"", b"a" * 1000, tokens(1)), (key(2), key(1), b"b" * 1000, tokens(2))]
    context = zmq.Context()
    sub = context.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"kv@node-a@")
    sub.connect(endpoint)
    seen: list = []
    try:
        wait_for(lambda: read_batches(sub, seen), what="the subscription's empty batch")
        with daemon.client() as c:
            c.register_namespace("e2e")
            assert commit_with_tokens(c, "e2e", blocks, origin) == [pb.STORED, pb.STORED]
            info = c.stat("e2e", key(2))
            assert list(info.token_ids) == tokens(2) and info.origin == origin

        def stored(batches):
            return [(e.block_hashes[0], e.parent_block_hash, e.medium, e.token_ids, e.block_size)
                    for topic, _, events in batches if topic == b"kv@node-a@served/model"
                    for e in events if isinstance(e, vkv.BlockStored)]
        wait_for(lambda: len(stored(read_batches(sub, seen))) >= 4, what="BlockStored on CPU_TIER1 and DISK")
        h1, h2 = int_block_hash(key(1)), int_block_hash(key(2))
        assert sorted(stored(seen)) == sorted([(h1, None, "CPU_TIER1", tokens(1), 4), (h2, h1, "CPU_TIER1", tokens(2), 4),
                                               (h1, None, "DISK", tokens(1), 4), (h2, h1, "DISK", tokens(2), 4)])
        last_seq = seen[-1][1]

        assert daemon.stop() == 0
        daemon.start()
        # The SUB reconnects by itself; the daemon's empty batch for it is past last_seq: replay from there.
        after: list = []
        wait_for(lambda: any(s > last_seq for _, s, _ in read_batches(sub, after)), what="a batch of the new run")
        dealer = context.socket(zmq.DEALER)
        dealer.connect(replay)
        dealer.send_multipart([b"", (last_seq + 1).to_bytes(8, "big")])
        replayed = []
        while True:
            assert dealer.poll(int(TIMEOUT * 1000)), "replay stalled"
            _, topic, seq, payload = dealer.recv_multipart()
            if seq == END_SEQ:
                break
            replayed.append((topic, int.from_bytes(seq, "big"), DECODER.decode(payload).events))
        dealer.close(0)
        kinds = ["cleared" if events == [vkv.AllBlocksCleared()] else "stored" if events else "empty"
                 for _, _, events in replayed]
        assert b"kv@node-a@served/model" in [t for (t, _, _), k in zip(replayed, kinds) if k == "cleared"]
        assert max(i for i, k in enumerate(kinds) if k == "cleared") < kinds.index("stored")  # cleared first
        assert stored(replayed) == [(h1, None, "DISK", tokens(1), 4), (h2, h1, "DISK", tokens(2), 4)]
    finally:
        sub.close(0)
        context.term()
    log = daemon.log()
    assert f"KV events (vLLM format) on {endpoint}, replay on {replay} (socket files mode 0600)" in log
    assert "announcing 2 blocks" in log and "a subscriber joined" in log
    assert daemon.stop() == 0
    assert os.listdir(directory) == []  # the socket files go with the daemon
    os.rmdir(directory)


def test_token_ids_beyond_the_block_size_are_refused_and_abort_the_allocation(make_daemon):
    daemon = make_daemon()
    with daemon.client() as c:
        c.register_namespace("bound")
        for origin, count, bound in ((pb.BlockOrigin(block_size=4), 5, 4), (None, 4097, 4096)):
            allocation = c.allocate(1)
            entries = _stage(c.arena(), allocation.slots, [(key(1), b"", b"x" * 100)])
            (k, p, s, n, ck), = entries
            request = pb.CommitRequest(allocation_id=allocation.id, namespace="bound", origin=origin,
                                       entries=[pb.CommitEntry(key=k, parent=p, slot=s, length=n, checksum=ck,
                                                               token_ids=list(range(count)))])
            with pytest.raises(grpc.RpcError) as refused:
                c.call(c.stub.Commit, request)
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert f"{count} token ids, more than the block size {bound}" in refused.value.details()
            with pytest.raises(grpc.RpcError) as gone:
                c.abort(allocation.id)  # the refused commit already aborted it
            assert gone.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        long_name = pb.BlockOrigin(model="m" * 256)
        allocation = c.allocate(1)
        (k, p, s, n, ck), = _stage(c.arena(), allocation.slots, [(key(2), b"", b"y" * 100)])
        with pytest.raises(grpc.RpcError) as refused:
            c.call(c.stub.Commit, pb.CommitRequest(allocation_id=allocation.id, namespace="bound", origin=long_name,
                                                   entries=[pb.CommitEntry(key=k, parent=p, slot=s, length=n,
                                                                           checksum=ck)]))
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "origin.model" in refused.value.details()
        assert c.lookup("bound", [key(1), key(2)]).matched == 0


def test_token_ids_travel_through_s3_to_a_fresh_node_and_its_events(make_daemon, s3_server):
    """Node a uploads blocks with token ids (in the object's header and its x-amz-meta-kvtier-header
    copy); a fresh node b adopts them from the listing and announces them, token ids included, as
    EXTERNAL. A header too long for S3's 2 KB of metadata goes without its token ids (the upload works)."""
    from s3server import make_bucket
    from test_s3_tier import s3_overrides
    bucket = make_bucket(s3_server, "kvtier-tokens")
    first = make_daemon(s3_overrides(s3_server, bucket), name="a")
    small, large = pb.BlockOrigin(model="m", block_size=4), pb.BlockOrigin(model="m", block_size=400)
    with first.client() as c:
        c.register_namespace("s3-tokens", {"model": "m"})
        assert commit_with_tokens(c, "s3-tokens", [(key(1), b"", b"a" * 1000, tokens(1))], small) == [pb.STORED]
        assert commit_with_tokens(c, "s3-tokens", [(key(2), key(1), b"b" * 1000, tokens(2, 400))], large) == [pb.STORED]
        wait_for(lambda: all(c.stat("s3-tokens", k).tiers & pb.TIER_S3 for k in (key(1), key(2))), what="uploads")
    first.stop()
    directory = tempfile.mkdtemp(prefix="kvz-", dir="/tmp")
    endpoint = f"ipc://{directory}/events.sock"
    fresh = make_daemon({**s3_overrides(s3_server, bucket), "events.zmq_endpoint": endpoint,
                         "events.zmq_worker": "b"}, name="b")
    context = zmq.Context()
    sub = context.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect(endpoint)
    seen: list = []
    try:
        wait_for(lambda: read_batches(sub, seen), what="the subscription's empty batch")
        with fresh.client() as c:
            c.register_namespace("s3-tokens", {"model": "m"})
            wait_for(lambda: c.lookup("s3-tokens", [key(1), key(2)]).matched == 2, what="the listing")
            assert list(c.stat("s3-tokens", key(1)).token_ids) == tokens(1)
            assert list(c.stat("s3-tokens", key(2)).token_ids) == []  # did not fit S3's metadata
            assert c.stat("s3-tokens", key(2)).origin == large

        def external():
            return {e.block_hashes[0]: (t, e.token_ids, e.block_size) for t, _, events in read_batches(sub, seen)
                    for e in events if isinstance(e, vkv.BlockStored) and e.medium == "EXTERNAL"}
        wait_for(lambda: len(external()) == 2, what="BlockStored EXTERNAL for both")
        assert external() == {int_block_hash(key(1)): (b"kv@b@m", tokens(1), 4),
                              int_block_hash(key(2)): (b"kv@b@m", [], 400)}
    finally:
        sub.close(0)
        context.term()
        fresh.stop()
        shutil.rmtree(directory, ignore_errors=True)


def wait_subscribed(client, sub) -> None:
    """ZMQ's slow joiner: stores probe blocks in namespace "warmup" until one reaches `sub`."""
    client.register_namespace("warmup")
    probes = iter(range(1 << 30))

    def subscribed():
        client.put_blocks("warmup", [(next(probes).to_bytes(32, "big"), b"", b"w")])
        return sub.poll(100)
    wait_for(subscribed, what="the subscription to reach kvtierd")
