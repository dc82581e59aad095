"""Crash and fault torture with real kvtierd processes: kill -9 under wait_durable puts with S3
write-through, a full file system, an S3 outage longer than the disk tier, byte flips in segments, a
damaged LMDB index, a second daemon on the same data dir.

Each test prints one line `torture <scenario>: rounds=.. acknowledged=.. lost=.. wrong=.. wedged=..`
(pytest -s shows it; the assertion message carries it too) and requires lost == wrong == wedged == 0.
- acknowledged: blocks whose wait_durable put returned STORED/DUPLICATE;
- lost: acknowledged blocks that do not read back after recovery (S3 scenarios: neither on the node
  nor in the bucket once S3 is back and the upload backlog drained);
- wrong: reads returning other bytes than were put under the key (keys are content hashes);
- wedged: a daemon that after the fault is not SERVING and acknowledging a new wait_durable put
  within 60 s (or does not start again).
Kill moments are points in the writer's progress drawn from a seeded RNG, never wall-clock delays.
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import threading
import time
from collections import Counter

import pytest

from conftest import mount_tmpfs, wait_for
from kvtier.client import Client
from kvtier.client.process import toml_text
from s3server import make_bucket, s3_server  # noqa: F401
from torture_faults import (NS, Blocks, Tally, flip, health, put_batch, read_back, records, segment_files,
                            usable)

BASE = {"cpu.capacity": "16MiB", "cpu.slot_bytes": "64KiB", "disk.capacity": "32MiB",
        "disk.segment_bytes": "4MiB", "disk.durable_wait_ms": 2000, "disk.batch_blocks": 16,
        "disk.queue_blocks": 256}
USABLE_BOUND_S = 60.0


def s3_config(server, bucket: str) -> dict:
    return {"s3.enabled": True, "s3.endpoint_url": server.endpoint_url, "s3.bucket": bucket,
            "s3.list_interval_s": 3600.0, "s3.connect_timeout_s": 0.5, "s3.read_timeout_s": 2.0}


def report(scenario: str, rounds: int, tally: Tally, lost: int, wrong: int, wedged: int, **extra) -> str:
    line = (f"torture {scenario}: rounds={rounds} acknowledged={len(tally.acked)} lost={lost} "
            f"wrong={wrong + tally.wrong} wedged={wedged}")
    for name, value in extra.items():
        line += f" {name}={value}"
    if tally.codes:
        line += " refusals=" + ",".join(f"{c}:{n}" for c, n in sorted(tally.codes.items()))
    if tally.details:
        line += " errors=" + repr(tally.details)
    print(line, flush=True)
    return line


def start_or_none(daemon, timeout: float = 60.0) -> str | None:
    """Starts the daemon; None if it serves, else why not (it exited, or never said SERVING)."""
    try:
        daemon.start(timeout=timeout)
        return None
    except (RuntimeError, TimeoutError) as exc:
        return str(exc)[-3000:]


def restart_and_read(daemon, acked: dict, what: str) -> tuple[list[bytes], int] | None:
    """Starts the (killed) daemon and reads every acknowledged block back: (missing keys, wrong
    reads); None, with the reason printed, when it does not come back (wedged)."""
    why = start_or_none(daemon)
    if why is not None:
        print(f"{what}: the daemon did not come back: {why}")
        return None
    with daemon.client() as c:
        return read_back(c, acked)


def bucket_keys(server, bucket: str) -> dict[str, str]:
    """key hex -> object key, for every object of the bucket."""
    s3 = server.client()
    found = {}
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for item in page.get("Contents", []):
            found[item["Key"].rsplit("/", 1)[-1]] = item["Key"]
    return found


def lost_everywhere(server, bucket: str, missing: list[bytes], acked: dict) -> int:
    """Of the keys missing on the node: those not in the bucket with their exact bytes."""
    if not missing:
        return 0
    s3 = server.client()
    objects = bucket_keys(server, bucket)
    lost = 0
    for key in missing:
        name = objects.get(key.hex())
        if name is None or not s3.get_object(Bucket=bucket, Key=name)["Body"].read().endswith(acked[key]):
            lost += 1
    return lost


# -- 1 ---------------------------------------------------------------------------------------------
def test_kill_9_during_wait_durable_puts_with_s3_write_through(make_daemon, s3_server):
    bucket = make_bucket(s3_server, "torture-kill")
    daemon = make_daemon({**BASE, **s3_config(s3_server, bucket)})
    rng = random.Random(20240601)
    blocks = Blocks(1, 1000, 16000)
    tally = Tally()
    rounds, lost, wrong, wedged, early_stops = 20, 0, 0, 0, 0
    kill_codes: Counter = Counter()
    with daemon.client() as c:
        c.register_namespace(NS, {"model": "m"})
    for round_ in range(rounds):
        killed = threading.Event()
        stopped_early = []

        def writer():
            with Client(daemon.socket, timeout=30) as c:
                while True:
                    batch = blocks.batch(4)

                    def on_error(exc):
                        if killed.is_set():
                            kill_codes[exc.code().name] += 1   # the daemon died under the call
                        else:
                            tally.refuse(exc)
                            stopped_early.append(round_)

                    put_batch(c, tally, batch, on_error=on_error)
                    if killed.is_set():
                        return

        target = tally.count() + rng.randint(4, 48)
        thread = threading.Thread(target=writer, daemon=True)
        thread.start()
        wait_for(lambda: tally.count() >= target or stopped_early, timeout=60,
                 what=f"{target} acknowledged blocks (round {round_})")
        killed.set()
        daemon.kill()
        thread.join(60)
        assert not thread.is_alive(), "the writer hung after kill -9"
        early_stops += bool(stopped_early)
        found = restart_and_read(daemon, tally.acked, f"round {round_}")
        if found is None:
            wedged += 1
            break
        missing, bad = found
        lost, wrong = lost + len(missing), wrong + bad
        if missing or bad:
            print(f"round {round_}: missing {len(missing)} wrong {bad}: {[k.hex()[:16] for k in missing[:5]]}")
    if not wedged:
        if not usable(daemon.socket, tally, blocks, USABLE_BOUND_S):
            wedged += 1
        with daemon.client() as c:
            backlog = lambda: c.stats().upload_backlog == 0  # noqa: E731
            drained = True
            try:
                wait_for(backlog, timeout=120, what="the upload backlog to drain")
            except AssertionError:
                drained = False
            missing, bad = read_back(c, tally.acked)
            wrong += bad
        objects = bucket_keys(s3_server, bucket)
        not_in_bucket = [k for k in tally.acked if k.hex() not in objects]
        s3 = s3_server.client()
        sample = random.Random(3).sample(sorted(tally.acked), min(60, len(tally.acked)))
        bad_objects = sum(1 for k in sample if k.hex() in objects and not s3.get_object(
            Bucket=bucket, Key=objects[k.hex()])["Body"].read().endswith(tally.acked[k]))
        lost += len(missing)
    line = report("kill9-s3-write-through", rounds, tally, lost, wrong, wedged,
                  not_in_bucket=len(not_in_bucket) if not wedged else "?",
                  bad_objects=bad_objects if not wedged else "?",
                  drained=drained if not wedged else "?", early_refusals=early_stops,
                  at_kill=",".join(f"{c}:{n}" for c, n in sorted(kill_codes.items())))
    assert lost == wrong == wedged == 0 and tally.internal == 0 and early_stops == 0, line + "\n" + daemon.log()[-4000:]
    assert drained and not not_in_bucket and not bad_objects, line


# -- 2 ---------------------------------------------------------------------------------------------
def test_disk_full_on_a_small_tmpfs(make_daemon):
    daemon = make_daemon({**BASE, "disk.capacity": "256MiB"}, name="full", start=False)
    mount_tmpfs(daemon.data_dir, "24m")
    blocks = Blocks(2, 40000, 60000)
    tally = Tally()
    lost = wrong = wedged = 0
    saw_not_serving = refused_on_full_restart = False
    restarts, full = 0, None
    try:
        daemon.start(timeout=60)
        with daemon.client() as c:
            c.register_namespace(NS, {"model": "m"})
        with Client(daemon.socket, timeout=30) as c:
            refused_before = 0
            for _ in range(400):  # 8 x ~50 KB a put: the 24 MiB file system is full after ~60
                if not put_batch(c, tally, blocks.batch(8)):
                    refused_before += 1
                    if refused_before >= 4:
                        break
            full = shutil.disk_usage(daemon.data_dir)
            # Health must say the write-through is stuck (after the daemon's STUCK_AFTER_S = 10 s).
            try:
                wait_for(lambda: health(daemon.socket) == "NOT_SERVING", timeout=45, interval=0.5,
                         what="health NOT_SERVING on a full file system")
                saw_not_serving = True
            except AssertionError:
                pass
        assert daemon.proc.poll() is None, "the daemon died on a full file system:\n" + daemon.log()[-4000:]
        daemon.kill()
        # Restart on the still-full file system: it must come up (no crash loop) and serve every
        # acknowledged block.
        found = restart_and_read(daemon, tally.acked, "restart on a full file system")
        restarts += 1
        if found is None:
            wedged += 1
        else:
            lost, wrong = lost + len(found[0]), wrong + found[1]
            with daemon.client() as c:
                refused_on_full_restart = not put_batch(c, tally, blocks.batch(8))
            assert daemon.proc.poll() is None, "the daemon died after a restart on a full file system"
        # The operator adds space: the daemon must recover by itself.
        subprocess.run(["mount", "-o", "remount,size=96m", str(daemon.data_dir)], check=True)
        if found is not None:
            if not usable(daemon.socket, tally, blocks, USABLE_BOUND_S):
                wedged += 1
            daemon.kill()
        found = restart_and_read(daemon, tally.acked, "restart after adding space")
        restarts += 1
        if found is None:
            wedged += 1
        else:
            lost, wrong = lost + len(found[0]), wrong + found[1]
            if not usable(daemon.socket, tally, blocks, USABLE_BOUND_S):
                wedged += 1
    finally:
        daemon.kill()
        subprocess.run(["umount", "-l", str(daemon.data_dir)], capture_output=True)
    line = report("disk-full-tmpfs", restarts, tally, lost, wrong, wedged,
                  fs_used_mib=round(full.used / 2**20, 1) if full else "?",
                  fs_free_mib=round(full.free / 2**20, 1) if full else "?",
                  not_serving_seen=saw_not_serving, refused_after_full_restart=refused_on_full_restart)
    assert lost == wrong == wedged == 0 and tally.internal == 0, line + "\n" + daemon.log()[-4000:]
    assert saw_not_serving, "health never reflected the full file system: " + line


# -- 3 ---------------------------------------------------------------------------------------------
def test_s3_outage_longer_than_the_disk_tier(make_daemon, s3_server):
    bucket = make_bucket(s3_server, "torture-outage")
    daemon = make_daemon({**BASE, **s3_config(s3_server, bucket)})
    capacity = 32 << 20
    blocks = Blocks(3, 50000, 64000)
    tally = Tally()
    lost = wrong = wedged = 0
    attempted = refused = 0
    saw_not_serving = False
    with Client(daemon.socket, timeout=30) as c:
        c.register_namespace(NS, {"model": "m"})
        put_batch(c, tally, blocks.batch(2))        # S3 has been probed and used before the outage
        wait_for(lambda: c.stats().upload_backlog == 0, timeout=60, what="the first uploads")
        s3_server.pause()
        try:
            started = time.monotonic()
            while refused < 12 and time.monotonic() - started < 120:
                batch = blocks.batch(8)
                attempted += sum(len(d) for _, d in batch)
                if not put_batch(c, tally, batch):
                    refused += 1
                    if attempted > capacity * 1.25 and refused >= 3:
                        break
            saw_not_serving = health(daemon.socket) == "NOT_SERVING"
            assert daemon.proc.poll() is None, "the daemon died during the S3 outage:\n" + daemon.log()[-4000:]
            # kill -9 and restart while S3 is still down: the owed uploads must survive in the index,
            # and the daemon must start without S3.
            daemon.kill()
            why = start_or_none(daemon)
            if why is None:   # and keeps answering puts (acknowledged or refused) while S3 is still down
                with Client(daemon.socket, timeout=30) as c2:
                    for _ in range(3):
                        batch = blocks.batch(8)
                        attempted += sum(len(d) for _, d in batch)
                        put_batch(c2, tally, batch)
        finally:
            s3_server.resume()
    drained = False
    if why is not None:
        wedged += 1
        print(f"restart during the S3 outage failed: {why}")
        why = start_or_none(daemon)  # S3 is back now
    if why is None:
        with daemon.client() as c:
            try:
                wait_for(lambda: c.stats().upload_backlog == 0, timeout=120, what="the upload backlog to drain")
                drained = True
            except AssertionError:
                pass
    if not usable(daemon.socket, tally, blocks, USABLE_BOUND_S):
        wedged += 1
    with daemon.client() as c:
        missing, wrong = read_back(c, tally.acked)
    lost = lost_everywhere(s3_server, bucket, missing, tally.acked)
    if missing:  # a miss on the node is allowed when the block is in the bucket; show which
        order = list(tally.acked)
        print("missing on the node (acknowledged #):", [(order.index(k), k.hex()[:16]) for k in missing])
    line = report("s3-outage-small-disk", 1, tally, lost, wrong, wedged,
                  attempted_mib=round(attempted / 2**20, 1), capacity_mib=capacity >> 20,
                  missing_on_node=len(missing), drained=drained, not_serving_during_outage=saw_not_serving)
    assert lost == wrong == wedged == 0 and tally.internal == 0 and drained, line + "\n" + daemon.log()[-4000:]
    assert attempted > capacity, line


# -- 4 ---------------------------------------------------------------------------------------------
def test_byte_flips_in_segment_records_and_headers(make_daemon):
    daemon = make_daemon({**BASE, "disk.segment_bytes": "1MiB", "disk.capacity": "64MiB"})
    rng = random.Random(44)
    blocks = Blocks(4, 500, 40000)
    tally = Tally()
    touched: set[bytes] = set()
    rounds, lost, wrong, wedged, touched_served = 4, 0, 0, 0, 0
    flips = {"payload": 0, "record_header": 0, "segment_header": 0, "index_removed": 0}
    with daemon.client() as c:
        c.register_namespace(NS, {"model": "m"})
    for round_ in range(rounds):
        with Client(daemon.socket, timeout=30) as c:
            for _ in range(10):
                put_batch(c, tally, blocks.batch(5))
        daemon.kill()
        located = [r for path in segment_files(daemon.data_dir) for r in records(path)
                   if r.flags == 0 and r.key in tally.acked and r.key not in touched]
        victims = rng.sample(located, min(6, len(located)))
        for n, record in enumerate(victims):
            if n % 2 == 0:   # a payload byte
                flip(record.path, record.offset + 4096 + rng.randrange(record.payload_len))
                flips["payload"] += 1
            else:            # a record header byte (magic, lengths, checksums, namespace, key)
                flip(record.path, record.offset + rng.randrange(record.header_len))
                flips["record_header"] += 1
            touched.add(record.key)
        segment = rng.choice(segment_files(daemon.data_dir))
        flip(segment, rng.randrange(30))    # magic, version, id, created, checksum
        flips["segment_header"] += 1
        if round_ % 2 == 1:                 # and the rebuild path: recovery scans every segment
            shutil.rmtree(os.path.join(daemon.data_dir, "disk", "index.lmdb"))
            flips["index_removed"] += 1
        found = restart_and_read(daemon, tally.acked, f"round {round_}")
        if found is None:
            wedged += 1
            break
        missing, bad = found
        wrong += bad
        untouched_missing = [k for k in missing if k not in touched]
        lost += len(untouched_missing)
        touched_served = len(touched) - len([k for k in missing if k in touched])
        if untouched_missing or bad:
            print(f"round {round_}: untouched missing {len(untouched_missing)} wrong {bad}")
        if not usable(daemon.socket, tally, blocks, USABLE_BOUND_S):
            wedged += 1
    line = report("byte-flips", rounds, tally, lost, wrong, wedged, touched=len(touched),
                  touched_still_served=touched_served, **flips)
    assert lost == wrong == wedged == 0 and tally.internal == 0, line + "\n" + daemon.log()[-4000:]


# -- 5 ---------------------------------------------------------------------------------------------
def test_damaged_lmdb_index_is_moved_aside_and_rebuilt(make_daemon):
    daemon = make_daemon(BASE)
    rng = random.Random(55)
    blocks = Blocks(5, 1000, 30000)
    tally = Tally()
    lost = wrong = wedged = 0
    moved = {}
    with daemon.client() as c:
        c.register_namespace(NS, {"model": "m"})
    index = os.path.join(daemon.data_dir, "disk", "index.lmdb", "data.mdb")
    for damage in ("garbage-middle", "truncate"):
        with Client(daemon.socket, timeout=30) as c:
            for _ in range(12):
                put_batch(c, tally, blocks.batch(5))
        daemon.kill()
        size = os.path.getsize(index)
        before = daemon.log().count("disk index is damaged")
        with open(index, "r+b") as file:
            if damage == "garbage-middle":
                file.seek(size // 4)
                file.write(rng.randbytes(size // 2))
            else:
                file.truncate(size // 3)
        found = restart_and_read(daemon, tally.acked, damage)
        if found is None:
            wedged += 1
            break
        moved[damage] = daemon.log().count("disk index is damaged") > before
        missing, bad = found
        lost, wrong = lost + len(missing), wrong + bad
        if not usable(daemon.socket, tally, blocks, USABLE_BOUND_S):
            wedged += 1
    aside = [d for d in os.listdir(os.path.join(daemon.data_dir, "disk")) if d.startswith("index.lmdb.damaged-")]
    line = report("damaged-lmdb-index", 2, tally, lost, wrong, wedged,
                  moved_aside=",".join(f"{k}:{v}" for k, v in moved.items()), damaged_dirs=len(aside))
    assert lost == wrong == wedged == 0 and tally.internal == 0, line + "\n" + daemon.log()[-4000:]
    assert all(moved.values()) and len(moved) == 2 and len(aside) == 2, line


# -- 6 ---------------------------------------------------------------------------------------------
def test_a_second_daemon_is_refused_after_the_lock_file_is_unlinked(make_daemon, tmp_path):
    first = make_daemon(BASE)
    blocks = Blocks(6, 1000, 30000)
    tally = Tally()
    lost = wrong = wedged = 0
    refused, started_second = 0, 0
    with first.client() as c:
        c.register_namespace(NS, {"model": "m"})
    stop = threading.Event()

    # A bounded amount, well below disk.capacity: whole-segment eviction of a full cache is not loss,
    # and this test is about the lock, so nothing acknowledged may be evicted.
    most = 640  # blocks of at most 30,000 bytes: at most 19 MiB of the 32 MiB disk tier

    def writer():
        with Client(first.socket, timeout=30) as c:
            while not stop.is_set() and tally.count() < most:
                put_batch(c, tally, blocks.batch(4))

    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    attempts = 3
    try:
        for attempt in range(attempts):
            wait_for(lambda n=tally.count(): tally.count() >= min(n + 8, most), timeout=60,
                     what="acknowledged puts to the first daemon")
            lock = os.path.join(first.data_dir, "kvtierd.lock")
            if os.path.exists(lock):
                os.remove(lock)
            second = make_daemon(BASE, start=False)  # the same name: the same data dir
            assert second.data_dir == first.data_dir
            try:
                second.start(timeout=60)
                started_second += 1
                second.kill()
            except RuntimeError as exc:
                refused += "in use by another kvtierd" in str(exc)
            # The second Daemon rewrote the shared config file with its own socket: restore the first's.
            first.config.write_text(toml_text(str(first.data_dir), first.overrides))
    finally:
        stop.set()
        thread.join(60)
    if health(first.socket) != "SERVING" or not usable(first.socket, tally, blocks, USABLE_BOUND_S):
        wedged += 1
    with first.client() as c:
        missing, bad = read_back(c, tally.acked)
    lost, wrong = lost + len(missing), wrong + bad
    first.kill()
    found = restart_and_read(first, tally.acked, "restart of the first daemon")
    if found is None:
        wedged += 1
    else:
        lost, wrong = lost + len(found[0]), wrong + found[1]
    line = report("second-daemon-lock-unlinked", attempts, tally, lost, wrong, wedged,
                  refused=refused, second_started=started_second)
    assert lost == wrong == wedged == 0 and tally.internal == 0, line + "\n" + first.log()[-4000:]
    assert refused == attempts and started_second == 0, line
