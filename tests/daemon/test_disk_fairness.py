"""The shared disk tier is not a commons: a tenant within its disk_capacity cannot age another
tenant's blocks off the disk, and its quota counts the space its blocks really take.

Tried the way another local user would (as tests/daemon/test_tenants.py): a real kvtierd, and client
processes under the tenants' uids (setpriv) that run this very file as a script (the steps at the
bottom). The crash test kills (SIGKILL) a real process that runs the disk tier, stopped at a chosen
point of a compaction by a FileSystem seam wrapped around the real one.

Run as a script: test_disk_fairness.py SOCKET STEP [ARG...] prints one JSON line (a tenant's step),
or test_disk_fairness.py crash-child DIR WHERE (the crash test's child).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import grpc

from kvtier.client.client import Client
from kvtier.proto.v1 import kvtier_pb2 as pb

UID_A, UID_B = 40001, 40002
BLOCK = 60_000           # payload bytes of a churned block
RECORD = 65_536          # what it takes on disk: a 4 KiB header area + the payload padded to 4 KiB
ALIGN = 4096
KEYS = [index.to_bytes(32, "big") for index in range(256)]


def data_of(index: int, size: int) -> bytes:
    return (index.to_bytes(4, "big") * (size // 4 + 1))[:size]


# ---------------------------------------------------------------------------------- tenant steps

def _put(client: Client, namespace: str, index: int, size: int) -> str:
    """One wait_durable put: "durable", or "refused" (RESOURCE_EXHAUSTED: the disk quota)."""
    try:
        status = client.put_blocks(namespace, [(KEYS[index], b"", data_of(index, size))], wait_durable=True,
                                   wait_ms=30_000)
    except grpc.RpcError as exc:
        if exc.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
            raise
        return "refused"
    assert status == [pb.STORED], status
    return "durable"


def step_store(sock: str, namespace: str, *sizes: str) -> dict:
    """Stores one block per size (keys 0, 1, ...), each a wait_durable commit: what happened."""
    out = {"durable": 0, "refused": 0}
    with Client(sock, timeout=60) as client:
        client.register_namespace(namespace)
        for index, size in enumerate(sizes):
            out[_put(client, namespace, index, int(size))] += 1
    return out


def step_churn(sock: str, namespace: str, rounds: str, per_round: str, size: str) -> dict:
    """Writes `per_round` blocks durably, deletes them, writes them again, `rounds` times: never more
    than `per_round` blocks of its own on disk at once."""
    out = {"durable": 0, "refused": 0, "deleted": 0}
    with Client(sock, timeout=60) as client:
        client.register_namespace(namespace)
        for _ in range(int(rounds)):
            for index in range(int(per_round)):
                out[_put(client, namespace, index, int(size))] += 1
            out["deleted"] += client.delete(namespace, KEYS[:int(per_round)]).deleted
    return out


STEPS = {"store": step_store, "churn": step_churn}


# ---------------------------------------------------------------------------------- crash child

CRASH_SEGMENT = 64 << 10
CRASH_CAPACITY = 4 * CRASH_SEGMENT
CRASH_PAYLOAD = 8000                 # a 12 KiB record: five to a segment
B_KEYS = [bytes([0xB0 + index]) * 32 for index in range(3)]


def crash_child(directory: str, where: str) -> None:
    """Stores b's three blocks (protected), then churns a's (write one, remove it) until compaction
    copies b's blocks forward; at `where` it writes DIR/ready and waits to be killed:
    - copy-written: a copy's record is written, not yet fdatasync'ed;
    - copy-synced: the copies are fdatasync'ed, not yet indexed;
    - copy-indexed: the copies are indexed, the old segment not yet evicted;
    - evict-marked: the old segment is marked evicted in the index, its file not yet deleted.
    Every acknowledged removal of a's is appended to DIR/removed first."""
    from kvtier.tiers.block import BlockHeader, checksum  # noqa: PLC0415
    from kvtier.tiers.disk import DiskTier  # noqa: PLC0415
    from kvtier.tiers.fs import FileSystem  # noqa: PLC0415

    ready = os.path.join(directory, "ready")

    def stop_here() -> None:
        with open(ready, "w") as marker:
            marker.write(where)
        while True:  # parked where the test kills it (SIGKILL): no timing involved
            signal.pause()
        os._exit(4)  # never reached: the test kills it

    class Seam(FileSystem):
        armed = False
        copied = False

        def pwritev(self, fd, buffers, offset):
            head = bytes(buffers[0][:48])
            is_b = head[:4] == b"KVTB" and head[8:10] == b"\x01\x00" and head[46:47] == b"b"
            written = super().pwritev(fd, buffers, offset)
            if self.armed and is_b:
                self.copied = True
                if where == "copy-written":
                    stop_here()
            return written

        def fdatasync(self, fd):
            super().fdatasync(fd)
            if self.copied and where == "copy-synced":
                stop_here()

        def remove(self, path):
            if self.copied and where == "evict-marked" and path.endswith(".kvseg"):
                stop_here()
            super().remove(path)

    seam = Seam()
    tier = DiskTier(os.path.join(directory, "disk"), capacity_bytes=CRASH_CAPACITY, segment_bytes=CRASH_SEGMENT,
                    align=ALIGN, fs=seam, protect=lambda namespace: namespace == "b")
    tier.recover()
    evict = tier._evict

    def evict_stopping(ids):
        if seam.copied and where == "copy-indexed":
            stop_here()
        return evict(ids)
    tier._evict = evict_stopping

    def block(namespace: str, key: bytes, index: int):
        payload = data_of(index, CRASH_PAYLOAD)
        return BlockHeader(namespace, key, b"", len(payload), checksum(payload), 1000 + index), memoryview(payload)
    tier.write_batch([block("b", key, index) for index, key in enumerate(B_KEYS)])
    seam.armed = True
    removed = os.open(os.path.join(directory, "removed"), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    for index in range(500):
        key = index.to_bytes(32, "big")
        tier.write_batch([block("a", key, index)])
        assert tier.remove("a", key)
        os.write(removed, key.hex().encode() + b"\n")
    os._exit(3)  # compaction never reached `where`


# ---------------------------------------------------------------------------------- the tests

if __name__ != "__main__":
    import pytest

    from conftest import scrape_metrics, wait_for
    from s3server import free_port

    SETPRIV = shutil.which("setpriv")
    TENANT_A = {"name": "a", "uids": [UID_A], "cpu_capacity": "1MiB"}
    TENANT_B = {"name": "b", "uids": [UID_B], "cpu_capacity": "1MiB"}

    def run_as(uid: int, daemon, step: str, *args: str) -> dict:
        """Runs one step of this file as `uid` (gid the same number, no supplementary groups)."""
        assert SETPRIV, "setpriv (util-linux) is needed for the multi-user tests"
        done = subprocess.run([SETPRIV, f"--reuid={uid}", f"--regid={uid}", "--clear-groups", sys.executable,
                               os.path.abspath(__file__), daemon.socket, step, *map(str, args)],
                              capture_output=True, text=True, timeout=300,
                              env={"PATH": os.environ.get("PATH", ""),
                                   "PYTHONPATH": os.environ.get("PYTHONPATH", "")})
        assert done.returncode == 0, f"{step} as uid {uid} failed:\n{done.stderr[-3000:]}"
        return json.loads(done.stdout.strip().splitlines()[-1])

    def shared_disk_node(make_daemon, a_quota: int, b_quota: int):
        """A 2 MiB disk tier of 256 KiB segments (three 60 kB blocks each) shared by tenants a and b."""
        return make_daemon({"server.socket_mode": "0666", "cpu.capacity": "1MiB", "disk.capacity": "2MiB",
                            "disk.segment_bytes": "256KiB", "metrics.listen": f"127.0.0.1:{free_port()}",
                            "tenant": [{**TENANT_A, "disk_capacity": a_quota},
                                       {**TENANT_B, "disk_capacity": b_quota}]})

    def disk_keys(node, namespace: str) -> set[bytes]:
        """The keys of `namespace` the catalog says the disk tier holds (the admin's Inventory)."""
        with Client(node.socket) as admin:
            found, token = set(), b""
            while True:
                page = admin.inventory(namespace=namespace, tier_mask=pb.TIER_DISK, page_size=100, page_token=token)
                found |= {info.key for info in page.blocks}
                token = page.next_page_token
                if not token:
                    return found

    def tiers_of(node, namespace: str, count: int) -> list[int]:
        """Each block's tiers as Stat reports them (0: not stored at all)."""
        out = []
        with Client(node.socket) as admin:
            for key in KEYS[:count]:
                try:
                    out.append(admin.stat(namespace, key).tiers)
                except grpc.RpcError as exc:
                    assert exc.code() == grpc.StatusCode.NOT_FOUND, exc
                    out.append(0)
        return out

    def churn_next_to_b(node) -> dict:
        """b stores three durable 60 kB blocks; a churns 96 blocks through 4 of its own at a time
        (6 MB: the 2 MiB disk tier three times over)."""
        assert run_as(UID_B, node, "store", "b/m", BLOCK, BLOCK, BLOCK) == {"durable": 3, "refused": 0}
        a = run_as(UID_A, node, "churn", "a/churn", 24, 4, BLOCK)
        assert a == {"durable": 96, "refused": 0, "deleted": 96}
        return scrape_metrics(node.overrides["metrics.listen"])

    def test_a_tenant_churning_within_its_quota_cannot_evict_another_tenants_blocks(make_daemon):
        node = shared_disk_node(make_daemon, 4 * RECORD, 3 * RECORD)
        started = time.monotonic()
        metrics = churn_next_to_b(node)
        minutes = int((time.monotonic() - started) // 60)
        assert metrics["kvtier_disk_evictions_total"] == 0  # nothing anyone still holds left the disk
        assert metrics["kvtier_disk_compacted_blocks_total"] >= 3  # b's blocks were copied forward instead
        assert disk_keys(node, "b/m") == set(KEYS[:3])
        assert all(tiers & pb.TIER_DISK for tiers in tiers_of(node, "b/m", 3))
        assert 1 <= node.log().count("disk compaction:") <= 1 + minutes  # one line a minute, however many passes
        assert node.stop() == 0
        node.start()  # the CPU tier starts empty: what b reads now comes from the disk
        assert tiers_of(node, "b/m", 3) == [pb.TIER_DISK] * 3
        with Client(node.socket) as admin:
            for index in range(3):
                assert admin.get("b/m", KEYS[index])[1] == data_of(index, BLOCK)

    def test_without_quotas_the_same_churn_evicts_the_other_tenants_blocks(make_daemon):
        # The control: nobody is protected, so whole oldest segments go with b's blocks in them.
        node = shared_disk_node(make_daemon, 0, 0)
        metrics = churn_next_to_b(node)
        assert metrics["kvtier_disk_evictions_total"] >= 3
        assert disk_keys(node, "b/m") == set()
        assert not any(tiers & pb.TIER_DISK for tiers in tiers_of(node, "b/m", 3))

    def test_empty_and_one_byte_blocks_are_charged_a_whole_record_each(make_daemon):
        node = shared_disk_node(make_daemon, 8 * ALIGN, 0)  # a: room for eight of the smallest records
        # An empty block is one record: its header area (4 KiB).
        assert run_as(UID_A, node, "store", "a/empty", *[0] * 24) == {"durable": 8, "refused": 16}
        assert len(disk_keys(node, "a/empty")) == 8
        # A one-byte block is its header area and one aligned block of payload: 8 KiB. Deleting four
        # empty blocks frees 16 KiB, room for two of them.
        with Client(node.socket) as admin:
            assert admin.delete("a/empty", KEYS[:4]).deleted == 4
        assert run_as(UID_A, node, "store", "a/one", *[1] * 24) == {"durable": 2, "refused": 22}
        assert len(disk_keys(node, "a/one")) == 2
        metrics = scrape_metrics(node.overrides["metrics.listen"])
        assert metrics["kvtier_tenant_disk_refused_total"] == 16 + 22
        # b, without a quota, is neither charged for a's blocks nor limited by a's quota.
        assert run_as(UID_B, node, "store", "b/tiny", *[0, 1] * 12) == {"durable": 24, "refused": 0}
        # After a restart a's quota is counted from what recovery found: still full.
        assert node.stop() == 0
        node.start()
        assert run_as(UID_A, node, "store", "a/more", 0) == {"durable": 0, "refused": 1}

    def test_disk_quotas_must_leave_compaction_its_headroom():
        from kvtier.daemon import config
        tenants = [{**TENANT_A, "disk_capacity": "3MiB"}, {**TENANT_B, "disk_capacity": "3MiB"}]
        disk = {"disk": {"capacity": "8MiB", "segment_bytes": "1MiB"},
                "cpu": {"capacity": "2MiB", "slot_bytes": "64KiB"}}
        assert config.load(overrides={**disk, "tenant": tenants}).tenant[1].disk_capacity == 3 << 20  # 6 <= 8 - 2
        tenants[1]["disk_capacity"] = (3 << 20) + 1
        with pytest.raises(config.ConfigError, match=r"tenant\[\*\]\.disk_capacity sum to 6291457 bytes.*"
                                                     r"disk\.capacity.*disk\.segment_bytes"):
            config.load(overrides={**disk, "tenant": tenants})

    @pytest.mark.parametrize("where", ["copy-written", "copy-synced", "copy-indexed", "evict-marked"])
    def test_kill_9_during_compaction_loses_nothing_and_recovery_keeps_one_copy(tmp_path, where):
        from kvtier.tiers.disk import DiskTier
        child = subprocess.Popen([sys.executable, os.path.abspath(__file__), "crash-child", str(tmp_path), where],
                                 stderr=subprocess.PIPE, text=True)
        try:
            wait_for(lambda: os.path.exists(tmp_path / "ready") or child.poll() is not None,
                     what=f"the child to reach {where}")
            assert os.path.exists(tmp_path / "ready"), f"child exited {child.returncode}: {child.stderr.read()[-3000:]}"
            os.kill(child.pid, signal.SIGKILL)
        finally:
            child.kill()
            child.wait()
        removed = {bytes.fromhex(line) for line in (tmp_path / "removed").read_text().split()}
        directory = str(tmp_path / "disk")
        for rebuild in (False, True):  # the index as the crash left it, then rebuilt from the segments alone
            if rebuild:
                shutil.rmtree(os.path.join(directory, "index.lmdb"))
            with DiskTier(directory, capacity_bytes=CRASH_CAPACITY, segment_bytes=CRASH_SEGMENT, align=ALIGN,
                          protect=lambda namespace: namespace == "b") as tier:
                tier.recover()
                entries = list(tier.entries())
                b_entries = [entry for entry in entries if entry.namespace == "b"]
                assert sorted(entry.key for entry in b_entries) == B_KEYS, (where, rebuild)
                for index, entry in enumerate(sorted(b_entries, key=lambda e: e.key)):
                    dest = bytearray(CRASH_PAYLOAD + ALIGN)
                    assert tier.read_into(entry, memoryview(dest)), (where, rebuild, entry)
                    assert bytes(dest[:entry.length]) == data_of(index, CRASH_PAYLOAD)
                    assert entry.created_unix_ms == 1000 + index  # every fact of the block kept
                assert not removed & {entry.key for entry in entries if entry.namespace == "a"}, "a removal undone"
                assert tier.used_bytes() <= CRASH_CAPACITY + CRASH_SEGMENT
                again = tier.recover()  # idempotent: nothing more to adopt, cut or kill
                assert (again.adopted, again.torn, again.killed) == (0, 0, 0), again.summary()


if __name__ == "__main__":
    if sys.argv[1] == "crash-child":
        crash_child(sys.argv[2], sys.argv[3])
    else:
        try:
            result = STEPS[sys.argv[2]](sys.argv[1], *sys.argv[3:])
        except grpc.RpcError as exc:
            result = {"error": exc.code().name}
        print(json.dumps(result))
