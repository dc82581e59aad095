"""Client steps for tests/daemon/test_tenant_events.py, run under a tenant's uid (setpriv): what a
tenant's engine, router or stranger process can do with block events. Usage:
_as_tenant_events.py SOCKET STEP [ARG...]; prints one JSON line. Steps that must wait for the test
print "READY" first and then read one line from stdin."""

from __future__ import annotations

import json
import socket
import sys

import grpc
import msgspec
import zmq

from kvtier.client.client import Client, _stage
from kvtier.proto.v1 import kvtier_pb2 as pb

TIMEOUT_MS = 60_000


def _int_hash(key: bytes) -> int:  # vLLM's integer block hash (daemon/kv_events.int_block_hash)
    return int.from_bytes(key, "big") & ((1 << 64) - 1)


def store_tokens(sock: str, namespace: str, key: str, tokens: str) -> dict:
    """Commits one block with its prompt's token ids, as the vLLM connector does."""
    token_ids = [int(t) for t in tokens.split(",")]
    with Client(sock, timeout=30) as c:
        c.register_namespace(namespace)
        allocation = c.allocate(1)
        [(k, p, slot, length, checksum)] = _stage(c.arena(), allocation.slots, [(bytes.fromhex(key), b"", b"kv")])
        request = pb.CommitRequest(
            allocation_id=allocation.id, namespace=namespace,
            origin=pb.BlockOrigin(engine="e", model="m", block_size=len(token_ids)),
            entries=[pb.CommitEntry(key=k, parent=p, slot=slot, length=length, checksum=checksum,
                                    token_ids=token_ids)])
        return {"status": list(c.call(c.stub.Commit, request).status)}


def subscribe(sock: str, endpoint: str, replay: str, marker: str) -> dict:
    """A router on `endpoint`: subscribes, says READY once the publisher answered the subscription
    (its empty batch), then collects every BlockStored until the one of `marker`; then replays
    `replay` from 0 and collects those too."""
    ctx = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect(endpoint)
    if not sub.poll(TIMEOUT_MS):
        return {"error": "no answer to the subscription"}
    sub.recv_multipart()
    print("READY", flush=True)
    want = _int_hash(bytes.fromhex(marker))
    live = []
    while not any(want in hashes for hashes, _ in live):
        if not sub.poll(TIMEOUT_MS):
            return {"error": "the marker never came", "live": live}
        live += _stored(sub.recv_multipart()[2])
    dealer = ctx.socket(zmq.DEALER)
    dealer.connect(replay)
    dealer.send_multipart([b"", (0).to_bytes(8, "big")])
    replayed = []
    while True:
        if not dealer.poll(TIMEOUT_MS):
            return {"error": "the replay stalled"}
        _, topic, seq, payload = dealer.recv_multipart()
        if seq == (-1).to_bytes(8, "big", signed=True):
            break
        replayed += _stored(payload)
    ctx.destroy(linger=0)
    return {"live": live, "replayed": replayed}


def _stored(payload: bytes) -> list:
    """(block hashes, token ids) of each BlockStored in a msgpack KVEventBatch."""
    _, events, *_ = msgspec.msgpack.decode(payload)
    return [(e["block_hashes"], e["token_ids"]) for e in events
            if isinstance(e, dict) and e.get("type") == "BlockStored"]


def connect(sock: str, *paths: str) -> dict:
    """A plain AF_UNIX connect to each path (ZMQ's ipc connect is lazy and would hide a refusal)."""
    out = []
    for path in paths:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(path)
            out.append("OK")
        except OSError as exc:
            out.append(type(exc).__name__)
        finally:
            s.close()
    return {"connect": out}


def snapshot(sock: str) -> dict:
    with Client(sock, timeout=30) as c:
        seq, blocks = c.snapshot()
        return {"seq": seq, "keys": [b.key.hex() for b in blocks]}


def churn(sock: str, namespace: str, commits: str, per_commit: str) -> dict:
    """Many blocks per commit, as an engine saving long prompts: every commit emits its events at once."""
    with Client(sock, timeout=60) as c:
        c.register_namespace(namespace)
        stored = 0
        for commit in range(int(commits)):
            blocks = [((commit * 100_000 + i).to_bytes(32, "big"), b"", b"churn") for i in range(int(per_commit))]
            stored += c.put_blocks(namespace, blocks, wait_ms=30_000).count(pb.STORED)
        return {"stored": stored}


def watch(sock: str, from_seq: str, until: str, wait: str) -> dict:
    """A Watch from `from_seq`; with wait == "wait" it says READY once open and reads nothing until
    the test writes a line. Then reads until the event of key `until`: the keys seen, and the code."""
    with Client(sock, timeout=30) as c:
        stream = c.watch(from_seq=int(from_seq), timeout=120)
        stream.initial_metadata()
        if wait == "wait":
            print("READY", flush=True)
            sys.stdin.readline()
        keys = []
        try:
            for event in stream:
                keys.append(event.key.hex())
                if event.key.hex() == until:
                    break
        except grpc.RpcError as exc:
            return {"code": exc.code().name, "details": exc.details(), "keys": keys}
        finally:
            stream.cancel()
        return {"code": "OK", "keys": keys}


if __name__ == "__main__":
    print(json.dumps(globals()[sys.argv[2]](sys.argv[1], *sys.argv[3:])), flush=True)
