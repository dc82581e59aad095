"""NVIDIA Dynamo's own KV indexer (ai-dynamo-runtime, from PyPI) indexes kvtierd as one more worker.

Real parts only: a real vLLM engine (CPU, in-process engine core) with the kvtier connector stores a
prompt in a real kvtierd, whose KV events (events.zmq_endpoint, integer hashes, token ids) feed
Dynamo's standalone indexer (`python -m dynamo.indexer`, HTTP, no etcd or NATS). Its `/query` with the
prompt's token ids then says how many of the prompt's tokens kvtierd holds, per tier:

1. after the engine stored the prompt: all of it on the host tier (the arena, CPU_TIER1) and on disk;
2. after the CPU tier evicted the blocks: none on the host, all on disk;
3. warmed back into the CPU tier (Prefetch, no store), then kvtierd restarted with no new stores: the
   restarted daemon announces what it re-adopted (AllBlocksCleared, then the disk blocks with their
   token ids read back from disk), and the indexer, which follows the same endpoint, replays it: none
   on the host (the CPU tier is empty after a restart), all on disk again.

Every wait polls a readiness signal (the indexer's /health, kvtierd's log line for the indexer's
subscription, /query until it gives the expected answer); nothing sleeps and hopes.
"""

from __future__ import annotations

import importlib.util
import json
import random
import subprocess
import sys
import urllib.error
import urllib.request

from conftest import wait_for
from s3server import free_port
from test_vllm import BLOCK, models, run_engine  # noqa: F401 - `models` is a (session) fixture
from kvtier.client.client import _stage
from kvtier.proto.v1 import kvtier_pb2 as pb

# No skip: `make test` installs it (requirements/routers.txt); a missing router must fail the suite.
assert importlib.util.find_spec("dynamo") is not None, \
    "ai-dynamo-runtime is not installed: run `make test` (pip install -r requirements/routers.txt)"

WORKER_ID = 7            # kvtierd's worker id in the indexer
MODEL = "tiny-llama"     # the indexer's model name (it does not read the topic)
PROMPT = [random.Random(11).randrange(3, 2000) for _ in range(100)]  # 3 full blocks of 32 + 4 tokens
FULL = 3 * BLOCK         # the tokens of the prompt's full blocks


class Indexer:
    """`python -m dynamo.indexer` on a free port, kvtierd registered as worker WORKER_ID with its
    event and replay endpoints."""

    def __init__(self, tmp_path):
        self.port = free_port()
        self.log_path = tmp_path / "dynamo-indexer.log"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "dynamo.indexer", "--block-size", str(BLOCK), "--port", str(self.port),
             "--model-name", MODEL, "--threads", "1"],
            stdout=open(self.log_path, "wb"), stderr=subprocess.STDOUT)

    def call(self, path: str, body: dict | None = None):
        request = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}",
                                         data=None if body is None else json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=10) as reply:
            text = reply.read().decode()
        return json.loads(text) if text else None

    def healthy(self) -> bool:
        assert self.proc.poll() is None, f"the indexer exited:\n{self.log()}"
        try:
            self.call("/health")
            return True
        except (urllib.error.URLError, ConnectionError):
            return False

    def overlap(self, tokens: list[int]) -> dict:
        """This worker's entry of /query: tokens matched in all, and per tier (gpu, cpu = host, disk)."""
        answer = self.call("/query", {"token_ids": tokens, "model_name": MODEL})
        return (answer.get("instances") or {}).get(str(WORKER_ID), {})

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def wait_overlap(indexer: Indexer, want: dict, what: str) -> dict:
    def matches():
        got = indexer.overlap(PROMPT)
        return got if all(got.get(k, 0) == v for k, v in want.items()) else None
    try:
        return wait_for(matches, timeout=120, what=what, interval=0.2)
    except AssertionError:
        raise AssertionError(f"{what}: the indexer says {indexer.overlap(PROMPT)}\n{indexer.log()[-4000:]}") from None


def fill_cpu_tier(client, count: int) -> None:
    """Stores `count` blocks of other tokens (a chain of their own), durably: the CPU tier's LRU
    evicts the prompt's blocks, which stay on disk."""
    rng = random.Random(5)
    origin = pb.BlockOrigin(engine="filler", model=MODEL, block_size=BLOCK)
    client.register_namespace("filler")
    parent = b""
    for i in range(count):
        key = rng.randbytes(32)
        allocation = client.allocate(1)
        (k, p, s, n, c), = _stage(client.arena(), allocation.slots, [(key, parent, rng.randbytes(32 << 10))])
        entry = pb.CommitEntry(key=k, parent=p, slot=s, length=n, checksum=c,
                               token_ids=[rng.randrange(3, 2000) for _ in range(BLOCK)])
        client.call(client.stub.Commit, pb.CommitRequest(allocation_id=allocation.id, namespace="filler",
                                                         entries=[entry], origin=origin, wait_durable=True))
        parent = key


def test_dynamo_indexer_sees_kvtier_blocks_per_tier_and_after_a_restart(make_daemon, models, tmp_path):  # noqa: F811
    pub, replay = free_port(), free_port()
    daemon = make_daemon({"cpu.capacity": "2MiB", "cpu.slot_bytes": "64KiB", "disk.capacity": "256MiB",
                          "events.zmq_endpoint": f"tcp://127.0.0.1:{pub}",
                          "events.zmq_replay_endpoint": f"tcp://127.0.0.1:{replay}",
                          "events.zmq_worker": "kvtier-node-1"})
    indexer = Indexer(tmp_path)
    try:
        wait_for(indexer.healthy, timeout=120, what="the Dynamo indexer's /health", interval=0.2)
        indexer.call("/register", {"instance_id": WORKER_ID, "endpoint": f"tcp://127.0.0.1:{pub}",
                                   "replay_endpoint": f"tcp://127.0.0.1:{replay}", "model_name": MODEL,
                                   "block_size": BLOCK})
        wait_for(lambda: "a subscriber joined" in daemon.log(), what="the indexer's subscription in kvtierd's log")
        assert indexer.overlap(PROMPT).get("longest_matched", 0) == 0

        # 1. A real vLLM engine stores the prompt through the connector: host (arena) and disk.
        (result,), stats, _ = run_engine(tmp_path, models[0], [{"name": "A", "tokens": PROMPT}], daemon.socket,
                                         "engine")
        assert stats["saved_blocks"] == 3 and stats["save_errors"] == 0
        keys = [bytes.fromhex(k) for k in result["keys"]]
        with daemon.client() as c:
            (namespace,) = [n.name for n in c.list_namespaces()]
            infos = [c.stat(namespace, k) for k in keys]
        assert [list(i.token_ids) for i in infos] == [PROMPT[j * BLOCK:(j + 1) * BLOCK] for j in range(3)]
        assert {(i.origin.model, i.origin.block_size) for i in infos} == {(models[0], BLOCK)}
        wait_overlap(indexer, {"longest_matched": FULL, "gpu": 0, "cpu": FULL, "disk": FULL},
                     "the prompt on the host tier (CPU_TIER1) and on disk")

        # 2. The CPU tier evicts the prompt's blocks (2 MiB = 32 slots): the host count goes, disk stays.
        with daemon.client() as c:
            fill_cpu_tier(c, 40)
            assert all(not c.stat(namespace, k).tiers & pb.TIER_CPU for k in keys)
        wait_overlap(indexer, {"longest_matched": FULL, "cpu": 0, "disk": FULL}, "the prompt on disk only")

        # 3. Warmed back into the CPU tier (no store), then a restart with no new stores: the new run
        #    announces the disk blocks (the CPU tier starts empty) and the indexer replays it.
        with daemon.client() as c:
            assert c.prefetch(namespace, keys).warmed == 3
        wait_overlap(indexer, {"longest_matched": FULL, "cpu": FULL, "disk": FULL}, "the prompt warmed into the host tier")
        assert daemon.stop() == 0
        daemon.start()
        wait_overlap(indexer, {"longest_matched": FULL, "gpu": 0, "cpu": 0, "disk": FULL},
                     "the restarted daemon's re-adopted blocks on disk")
        log = daemon.log()
        assert "announcing 43 blocks" in log  # the prompt's 3 and the filler's 40, all on disk
        assert log.count("a subscriber joined") >= 2  # the indexer reconnected by itself
    finally:
        indexer.close()
