"""A stateful model check of the block store: hypothesis drives the real store in-process (real
segment files and LMDB through the FileSystem seam, the real S3 tier against a real moto server)
through commits with and without wait_durable, duplicates, reads, cancelled reads, deletes, clears,
retention changes, eviction pressure, disk EIO and ENOSPC during a batch, S3 outages and crashes
with recovery, and checks the invariants after every step:

- the catalog agrees with every memory tier and with the disk index; no fatal error;
- no hold without a live reason (readers only under open leases, write holds only for queued
  blocks, upload holds only for uploads in flight);
- every block acknowledged durable (and not deleted since) is readable and byte-exact;
- nothing read is ever other bytes than the block's own;
- with S3 reachable and the store quiet, every block on disk is in S3 and nothing is owed;
  during an outage, every block on disk that is not in S3 is owed (tenant t's blocks whose upload
  its s3_capacity refused excepted: they stay on disk only).

Two principals share the store: seeds above TENANT_SEEDS_FROM go to tenant t's namespace, whose
blocks live in its own arena part (the store's invariant check asserts that no block and no
allocation crosses parts, and that the per-tenant disk bytes agree with the catalog). Tenant t has a
disk_capacity of T_DISK_QUOTA (four blocks' records): its blocks on disk, charged by the space
they take (DiskTier.footprint: header area + payload padded to disk.align), in the catalog and in
the disk index, never exceed it, the store's count equals the footprints of its blocks on disk,
and the run must have refused some of its writes. Within its quota its blocks are protected: the
disk tier (small here: four segments) must never evict one of them, copying them forward instead
(compaction, under the same disk faults as everything else); disk_pressure makes it evict and
compact, and the run must have done both. It also has an
s3_capacity of T_S3_QUOTA (two blocks): the store's invariant check asserts that the S3 counts
(blocks, each tenant's bytes) agree with the catalog's S3 bits after every step, through uploads,
adoption by the listing after a crash, deletes and clears; t's bytes in S3 (as the node counts them,
and as the bucket holds them) never exceed the quota by more than objects whose delete failed during
an outage (left in the bucket, adopted again after a restart); and the run must have refused some
of its uploads.

CI runs a bounded number of examples; KVTIER_MODEL_EXAMPLES=200 runs a longer check.
"""

from __future__ import annotations

import asyncio
import errno
import os

import pytest
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from kvtier.daemon import s3sync as s3sync_mod
from kvtier.daemon import store as store_mod
from kvtier.daemon.errors import ApiError, ErrorKind
from kvtier.daemon.store import READER, UPLOAD, WRITE
from kvtier.proto.v1 import kvtier_pb2 as pb
from kvtier.tiers.disk import record_footprint
from kvtier.tiers.retention import Retention
from kvtier.tiers.s3 import S3Config

from s3server import DUMMY_ENV, make_bucket, shared_server
from store_harness import FaultyFs, FaultyS3, blob, commit, key_of, make_store, read, store_config, until

SEEDS = st.integers(min_value=1, max_value=48)
EXAMPLES = int(os.environ.get("KVTIER_MODEL_EXAMPLES", "12"))
DISK = pb.TIER_DISK
TENANT_SEEDS_FROM = 33  # seeds 33..48 are tenant t's: "t/ns", in its own (smaller) arena part
ALIGN = 4096
T_DISK_QUOTA = 4 * record_footprint(len(blob(TENANT_SEEDS_FROM)), 0, ALIGN)  # t's disk_capacity: four of its blocks
FILLER_SEEDS_FROM, FILLER_SEEDS = 1000, 96  # disk_pressure's blocks, in the administrators' "ns"
T_S3_QUOTA = 2 * len(blob(TENANT_SEEDS_FROM))    # tenant t's s3_capacity: two of its blocks


def ns_of(seed: int) -> str:
    return "t/ns" if seed >= TENANT_SEEDS_FROM else "ns"


def by_namespace(seeds) -> dict[str, list[int]]:
    split: dict[str, list[int]] = {}
    for seed in seeds:
        split.setdefault(ns_of(seed), []).append(seed)
    return split


class StoreModel(RuleBasedStateMachine):
    """One machine instance per example: its own data dir, bucket and event loop."""

    def __init__(self):
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.server = shared_server()
        self.examples = getattr(StoreModel, "examples", 0) + 1
        StoreModel.examples = self.examples
        self.bucket = make_bucket(self.server, f"model-{os.getpid()}-{self.examples}")
        self.dir = os.path.join(StoreModel.tmp, f"example-{self.examples}")
        os.makedirs(self.dir)
        self.fs = FaultyFs()
        self.durable: dict[int, bytes] = {}   # acknowledged durable and not deleted since
        self.s3_refused: set[bytes] = set()   # keys of t's blocks whose upload was refused (until stored again)
        self.s3_leaked: set[bytes] = set()    # keys of t's blocks whose S3 delete failed (object left behind)
        self.protected_evicted: list = []     # t's blocks evicted from disk while t was within its quota
        self.filler = 0                       # disk_pressure's next filler block
        self.store = None

    def run(self, coro):
        return self.loop.run_until_complete(coro)

    def _open(self):
        from pathlib import Path
        cfg = store_config(Path(self.dir), self.server.endpoint_url, self.bucket,
                           tenants=[{"name": "t", "uids": [40200], "cpu_capacity": "512KiB",
                                     "disk_capacity": T_DISK_QUOTA, "s3_capacity": T_S3_QUOTA}],
                           cpu={"capacity": "1MiB", "policy": "retention"},
                           disk={"capacity": "1MiB", "segment_bytes": "256KiB", "batch_blocks": 4,
                                 "queue_blocks": 8, "durable_wait_ms": 400, "align": ALIGN})
        self.tier = FaultyS3(S3Config(endpoint_url=self.server.endpoint_url, bucket=self.bucket,
                                      connect_timeout_s=1.0, read_timeout_s=5.0, max_attempts=1))
        self.store = make_store(cfg, fs=self.fs, s3_tier=self.tier)
        self.run(self.store.start())
        self._watch_evictions()
        refuse = self.store.s3sync._refuse

        def refused(block, tenant, quota):  # which blocks may stay on disk without S3 copy or obligation
            self.s3_refused.add(block.key)
            refuse(block, tenant, quota)
        self.store.s3sync._refuse = refused
        self.run(self.store.register_namespace("ns", {"model": "m"}))
        self.run(self.store.register_namespace("t/ns", {"model": "m"}))

    def _watch_evictions(self):
        """Records every block the disk tier evicts while its namespace was protected (tenant t
        within its disk_capacity): compaction must copy those forward instead, and could always have
        (the config keeps two segments of headroom beyond the quotas)."""
        disk = self.store.disk
        evict = disk._evict

        def watched(ids):
            protected = {sid: disk._protected_entries(sid) for sid in ids}
            dropped = evict(ids)
            for sid in ids:
                self.protected_evicted += [e for e in protected[sid] if e in dropped]
            return dropped
        disk._evict = watched

    @initialize()
    def start(self):
        self._open()

    def teardown(self):
        if self.store is not None:
            StoreModel.disk_refused += self.store.counters.tenant_disk_refused
            StoreModel.s3_refused += self.store.counters.tenant_s3_refused
            StoreModel.disk_evictions += self.store.counters.disk_evictions
            StoreModel.compacted += self.store.disk.compacted_blocks
            self.run(_bounded(self.store.close(5), "closing the store"))
        self.loop.close()

    # -- rules ----------------------------------------------------------------------------------
    @rule(seeds=st.lists(SEEDS, min_size=1, max_size=4, unique=True), wait=st.booleans(),
          cls=st.sampled_from([None, "system", "decode", "conversation"]))
    def commit(self, seeds, wait, cls):
        retention = Retention(cls, 50, 60.0 if cls == "system" else None) if cls else None
        for namespace, group in by_namespace(seeds).items():
            try:
                statuses = self.run(commit(self.store, namespace, group, wait_durable=wait, retention=retention))
            except ApiError as exc:
                assert exc.kind in (ErrorKind.UNAVAILABLE, ErrorKind.EXHAUSTED), exc
                continue
            assert all(s in (pb.STORED, pb.DUPLICATE) for s in statuses)
            self._stored(group, statuses)
            if wait:
                for seed in group:
                    self.durable[seed] = blob(seed)

    @rule(seeds=st.lists(SEEDS, min_size=1, max_size=6, unique=True))
    def acquire_release(self, seeds):
        for namespace, group in by_namespace(seeds).items():
            held, found = self.run(self.store.acquire(namespace, [key_of(s) for s in group], 5000))
            for seed, block in zip(group, found):
                if block is not None:
                    assert bytes(self.store.cpu.view(block)[:block.length]) == blob(seed), "wrong bytes served"
            if held is not None:
                self.store.release(held.id)

    @rule(seed=SEEDS, steps=st.integers(0, 3))
    def cancelled_acquire(self, seed, steps):
        async def scenario():
            task = asyncio.ensure_future(self.store.acquire(ns_of(seed), [key_of(seed)], 5000))
            for _ in range(steps):
                await asyncio.sleep(0)
            task.cancel()
            try:
                held, _ = await task
            except asyncio.CancelledError:
                return
            if held is not None:
                self.store.release(held.id)
        self.run(scenario())

    def _stored(self, seeds, statuses):
        """A block stored anew owes its upload again, whatever became of an earlier block of its key."""
        for seed, status in zip(seeds, statuses):
            if status == pb.STORED:
                self.s3_refused.discard(key_of(seed))

    def _leaks(self):
        """t's blocks in S3 now: if S3 is down, deleting them leaves their objects in the bucket."""
        if not self.tier.down:
            return set()
        ns = self.store.catalog.namespaces.get("t/ns")
        return {key for key, block in (ns.blocks.items() if ns else ()) if block.tiers & pb.TIER_S3}

    @rule(seed=st.integers(min_value=TENANT_SEEDS_FROM, max_value=48))
    def disk_pressure(self, seed):
        """Tenant t stores a block durably (its quota permitting), then the administrators store new
        blocks until the disk tier has copied a protected block forward, or a disk's worth (the tier
        is four segments of about 20 records): its eviction takes only uploaded segments, and must
        keep t's blocks (checked by no_protected_block_was_evicted and durable_blocks_are_readable)."""
        try:
            if self.run(commit(self.store, "t/ns", [seed], wait_durable=True)):
                self.durable[seed] = blob(seed)
        except ApiError as exc:  # t's quota is full, or the disk is stuck (S3 down, a fault)
            assert exc.kind in (ErrorKind.UNAVAILABLE, ErrorKind.EXHAUSTED), exc
        compacted = self.store.disk.compacted_blocks
        for _ in range(24):
            seeds = [FILLER_SEEDS_FROM + (self.filler + n) % FILLER_SEEDS for n in range(4)]
            self.filler += 4
            try:
                self.run(commit(self.store, "ns", seeds, wait_durable=True))
            except ApiError as exc:  # S3 down: segments owed to it cannot go, the disk fills up
                assert exc.kind in (ErrorKind.UNAVAILABLE, ErrorKind.EXHAUSTED), exc
                return
            if self.store.disk.compacted_blocks > compacted:
                return

    @rule(seed=SEEDS)
    def delete(self, seed):
        leaks = self._leaks() & {key_of(seed)}
        deleted, _busy = self.run(self.store.delete(ns_of(seed), [key_of(seed)]))
        if deleted:
            self.durable.pop(seed, None)
            self.s3_leaked |= leaks

    @rule()
    def clear(self):
        leaks = self._leaks()
        self.run(self.store.clear("ns"))
        self.run(self.store.clear("t/ns"))
        self.s3_leaked |= {key for key in leaks if self.store.catalog.get("t/ns", key) is None}
        for seed in list(self.durable):
            if self.store.catalog.get(ns_of(seed), key_of(seed)) is None:
                self.durable.pop(seed)

    @rule(seed=SEEDS, cls=st.sampled_from(["system", "subagent", "ephemeral"]))
    def set_retention(self, seed, cls):
        self.store.set_retention(ns_of(seed), [key_of(seed)], Retention(cls, 10, None))

    @rule(seeds=st.lists(SEEDS, min_size=1, max_size=4, unique=True),
          code=st.sampled_from([errno.EIO, errno.ENOSPC]), where=st.sampled_from(["pwritev", "fdatasync"]))
    def disk_fault_during_a_batch(self, seeds, code, where):
        self.fs.fail[where] = code
        try:
            for namespace, group in by_namespace(seeds).items():
                self._stored(group, self.run(commit(self.store, namespace, group)))
            self.run(until(lambda: self.store.counters.disk_write_errors or not self.store.backlog,
                           "a batch to meet the fault"))
        except ApiError as exc:
            assert exc.kind is ErrorKind.EXHAUSTED, exc
        finally:
            del self.fs.fail[where]

    @rule()
    def s3_outage(self):
        self.tier.down = True

    @rule()
    def s3_returns(self):
        self.tier.down = False

    @rule(seeds=st.lists(SEEDS, min_size=1, max_size=3, unique=True))
    def crash_while_the_disk_fails(self, seeds):
        """Commits, then wait_durable duplicates of them, while no batch can land; then kill -9. Only
        what was acknowledged durable must come back."""
        self.fs.fail["fdatasync"] = errno.EIO
        try:
            for wait in (False, True):
                self.commit(seeds, wait, None)
        finally:
            self._crash()
            del self.fs.fail["fdatasync"]
            self._open()

    @rule()
    def crash_and_recover(self):
        self._crash()
        self._open()

    def _crash(self):
        """kill -9 between two disk batches: nothing is drained, queued blocks are simply gone."""
        store = self.store
        StoreModel.disk_refused += store.counters.tenant_disk_refused
        StoreModel.s3_refused += store.counters.tenant_s3_refused
        StoreModel.disk_evictions += store.counters.disk_evictions
        StoreModel.compacted += store.disk.compacted_blocks

        async def crash():
            store._closing = True
            for task in store._tasks + list(store._promotions.values()):
                task.cancel()
            await asyncio.gather(*store._tasks, *store._promotions.values(), return_exceptions=True)
        self.run(crash())
        store._writer.shutdown(wait=True)   # a batch in flight finishes (or not) as a crash would leave it
        store._readers.shutdown(wait=True)
        store.s3sync._pool.shutdown(wait=True)
        store.disk.close()
        store.arena.close()
        self.store = None

    # -- invariants -------------------------------------------------------------------------------
    @invariant()
    def store_is_consistent(self):
        if self.store is None:
            return
        store = self.store
        assert not store.fatals, store.fatals
        store.check_invariants()
        holds = {READER: 0, WRITE: 0, UPLOAD: 0}
        for block in store.cpu:
            for reason, count in store.cpu.holds(block).items():
                holds[reason] = holds.get(reason, 0) + count
        assert holds[READER] == sum(len(h.items) for h in store.leases._held.values())
        assert holds[WRITE] == store.backlog
        assert holds[UPLOAD] <= len(store.s3sync._uploading)

    @invariant()
    def tenant_t_stays_within_its_disk_quota(self):
        if self.store is None:
            return
        assert self.store.tenant_disk_bytes["t"] <= T_DISK_QUOTA, self.store.tenant_disk_bytes
        # Charged by the space a block takes (header area + padded payload), as the disk index holds it.
        indexed = sum(self.store.disk.footprint(entry.header()) for entry in self.store.disk.entries()
                      if entry.namespace.startswith("t/"))
        assert indexed <= T_DISK_QUOTA, f"tenant t has {indexed} bytes in the disk index"
        counted = sum(record_footprint(block.length, 0, ALIGN) for block in self._t_blocks() if block.tiers & DISK)
        assert self.store.tenant_disk_bytes["t"] == counted, (self.store.tenant_disk_bytes, counted)

    @invariant()
    def no_protected_block_was_evicted(self):
        """Eviction takes unprotected blocks (the administrators' namespace "ns") first: t's blocks,
        within its quota, are copied forward, never dropped."""
        assert not self.protected_evicted, f"protected blocks evicted: {self.protected_evicted[:3]}"

    def _t_blocks(self):
        ns = self.store.catalog.namespaces.get("t/ns")
        return list(ns.blocks.values()) if ns else []

    @invariant()
    def tenant_t_stays_within_its_s3_quota(self):
        """Uploads never take t past its s3_capacity as the node counts it; only objects left behind
        by failed deletes, adopted again by a listing, can (uploads then stop until deletes make
        room). The bucket itself is checked with the listing below."""
        if self.store is None:
            return
        leaked = sum(len(blob(_seed(key))) for key in self.s3_leaked)
        counted = self.store.s3sync.tenant_bytes["t"]
        assert counted <= T_S3_QUOTA + leaked, f"tenant t counted with {counted} bytes in S3, {leaked} leaked"

    @invariant()
    def durable_blocks_are_readable(self):
        if self.store is None:
            return
        for seed, data in self.durable.items():
            assert self.run(read(self.store, ns_of(seed), seed)) == data, f"acknowledged durable block {seed} lost"

    @invariant()
    def every_block_on_disk_is_in_s3_or_owed(self):
        """And, from the same listing (one per step: a LIST is slow), tenant t's objects in the bucket
        stay within its quota, those its failed deletes left behind aside."""
        if self.store is None:
            return
        bucket = self._bucket()
        missing = self._on_disk() - bucket.keys()
        owed = {key for _, key in _all_owed(self.store.disk)}
        uploading = {block.key for block in self.store.s3sync._uploading}
        allowed = owed | uploading | self.s3_refused
        assert missing <= allowed, f"blocks on disk neither in S3 nor owed: {len(missing - allowed)}"
        t_digest = self.tier.namespace_digest("t/ns")
        t_bytes = sum(len(blob(_seed(key))) for key, digest in bucket.items()
                      if digest == t_digest and key not in self.s3_leaked)
        assert t_bytes <= T_S3_QUOTA, f"tenant t has {t_bytes} bytes in the bucket, its s3_capacity is {T_S3_QUOTA}"

    @precondition(lambda self: not self.tier.down)
    @rule()
    def quiesce_then_nothing_is_owed(self):
        """With S3 up and time to drain, every block on disk is in S3 and nothing is owed."""
        store = self.store
        self.run(until(lambda: store.disk.upload_backlog() == 0 and not store.backlog, "the uploads to drain"))
        assert self._on_disk() - self._bucket().keys() <= self.s3_refused

    def _on_disk(self) -> set[bytes]:
        return {e.key for e in self.store.disk.entries()}

    def _bucket(self) -> dict[bytes, str]:
        """The bucket's objects as the server lists them: key -> namespace digest."""
        listed = self.server.client().list_objects_v2(Bucket=self.bucket).get("Contents", [])
        parsed = (self.tier.parse_object_key(o["Key"]) for o in listed)
        return {p[1]: p[0] for p in parsed if p is not None}


def _seed(key: bytes) -> int:
    return int.from_bytes(key[:4], "big")  # key_of(seed) repeats the seed's 4 bytes


async def _bounded(coro, what: str, timeout: float = 60.0):
    """Awaits coro; past timeout, fails with every task's stack (a hang is a failure, not a wait)."""
    task = asyncio.ensure_future(coro)
    done, _ = await asyncio.wait([task], timeout=timeout)
    if not done:
        stacks = []
        for other in asyncio.all_tasks():
            stacks.append(f"{other.get_name()}: {other.get_stack(limit=8)}")
        raise AssertionError(f"{what} hung:\n" + "\n".join(stacks))
    return task.result()


def _all_owed(disk):
    cursor, owed = None, []
    while True:
        page, cursor = disk.pending_uploads(cursor, 256)
        owed += page
        if cursor is None or not page:
            return owed


@pytest.fixture
def model_env(tmp_path, monkeypatch):
    for name, value in DUMMY_ENV.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(s3sync_mod, "BACKOFF_MAX_S", 0.05)       # retries stay bounded, and quick here
    monkeypatch.setattr(store_mod, "WRITE_RETRY_S", (0.01, 0.02))
    StoreModel.tmp = str(tmp_path)
    StoreModel.examples = 0
    StoreModel.disk_refused = 0
    StoreModel.disk_evictions = 0
    StoreModel.compacted = 0
    StoreModel.s3_refused = 0
    shared_server().reset()


def test_the_store_keeps_its_promises_under_faults(model_env):
    machine = StoreModel.TestCase
    # No shrinking: every step costs real fsyncs and S3 calls, so a failure is reported as found
    # (the printed steps reproduce it) instead of minutes of shrinking.
    machine.settings = settings(max_examples=EXAMPLES, stateful_step_count=20, deadline=None, derandomize=True,
                                phases=[Phase.explicit, Phase.reuse, Phase.generate],
                                suppress_health_check=list(HealthCheck))
    machine().runTest()
    assert StoreModel.disk_refused, "no write of tenant t ever met its disk_capacity: the quota went unexercised"
    assert StoreModel.disk_evictions, "the disk tier never evicted: protection went unexercised"
    assert StoreModel.compacted, "no protected block was ever copied forward: compaction went unexercised"
    assert StoreModel.s3_refused, "no upload of tenant t ever met its s3_capacity: the quota went unexercised"
