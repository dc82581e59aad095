"""Tests for kvtier.tiers.s3 against real S3 servers over HTTP on 127.0.0.1 (tests/s3server.py): moto for
everything, s3rver (a second implementation, without conditional writes) for portability."""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import logging
import random
import threading
import time

import pytest

from kvtier.tiers import s3 as s3mod
from kvtier.tiers.block import BlockHeader, CorruptBlock, checksum, decode_header
from kvtier.tiers.s3 import S3Config, S3Entry, S3Misconfigured, S3Tier, S3Unavailable
from s3server import CuttingProxy, S3rverServer, free_port, make_bucket, s3_server, s3rver_server  # noqa: F401

BUCKET = "kvtier-test"
SECRET = "kvtier-unit-test-secret-9f3c1a77"
KEY_ID = "KVTIERTESTKEYID0042"


def payload_for(namespace: str, key: bytes, length: int, seed: int = 0) -> bytes:
    return random.Random(f"{namespace}/{key!r}/{length}/{seed}").randbytes(length)


def header_for(namespace: str, key: bytes, payload: bytes, parent: bytes = b"",
               created: int = 1_700_000_000_000) -> BlockHeader:
    return BlockHeader(namespace, key, parent, len(payload), checksum(payload), created)


def block(namespace: str, key: bytes, length: int = 4096, parent: bytes = b"", seed: int = 0):
    payload = payload_for(namespace, key, length, seed)
    return header_for(namespace, key, payload, parent), payload


def tier_opener(server, key_id: str, secret: str):
    """(open(**config overrides) -> S3Tier on BUCKET of `server`, close_all())."""
    make_bucket(server, BUCKET)
    opened: list[S3Tier] = []

    def open_tier(**overrides) -> S3Tier:
        fields = dict(endpoint_url=server.endpoint_url, bucket=BUCKET, region="us-east-1",
                      access_key_id=key_id, secret_access_key=secret)
        fields.update(overrides)
        tier = S3Tier(S3Config(**fields))
        opened.append(tier)
        return tier

    def close_all() -> None:
        for tier in opened:
            tier.close()

    return open_tier, close_all


@pytest.fixture
def tiers(s3_server):
    """open(**config overrides) -> S3Tier on BUCKET of the test's moto server; closed at the end."""
    open_tier, close_all = tier_opener(s3_server, KEY_ID, SECRET)
    yield open_tier
    close_all()


@pytest.fixture
def s3rver_tiers(s3rver_server):
    """open(**config overrides) -> S3Tier on BUCKET of the test's s3rver; closed at the end."""
    open_tier, close_all = tier_opener(s3rver_server, S3rverServer.ACCESS_KEY_ID, S3rverServer.SECRET_ACCESS_KEY)
    yield open_tier
    close_all()


@pytest.fixture
def raw(s3_server):
    client = s3_server.client()
    yield client
    client.close()


def object_count(raw, prefix: str = "") -> int:
    return sum(page.get("KeyCount", 0)
               for page in raw.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix))


# ---------------------------------------------------------------------- round trip and layout

@pytest.mark.parametrize("length", [0, 1, 4095, 2 << 20])
def test_upload_download_round_trip(tiers, length):
    tier = tiers()
    header, payload = block("model-a|tp0", b"\x01" * 32, length, parent=b"\x02" * 32)
    assert tier.upload(header, payload) == "stored"
    dest = bytearray(length + 100)
    dest[:] = b"\xee" * len(dest)
    assert tier.download_into("model-a|tp0", b"\x01" * 32, memoryview(dest)) == length
    assert bytes(dest[:length]) == payload
    assert tier.head("model-a|tp0", b"\x01" * 32) == (length, checksum(payload))
    assert tier.quarantined_count() == 0


def test_upload_takes_a_longer_slot_view(tiers, raw):
    """Arena slots are longer than the payload: only payload_len bytes are sent."""
    tier = tiers()
    header, payload = block("ns", b"slot", 1000)
    slot = bytearray(payload + b"\xee" * 3000)
    assert tier.upload(header, memoryview(slot)) == "stored"
    stored = raw.get_object(Bucket=BUCKET, Key=tier.object_key("ns", b"slot"))["Body"].read()
    assert stored == header.encode() + payload


def test_absent_block_is_a_miss(tiers):
    tier = tiers()
    assert tier.download_into("ns", b"nope", bytearray(10)) is None
    assert tier.head("ns", b"nope") is None
    assert tier.quarantined_count() == 0


def test_object_key_layout(tiers, raw):
    tier = tiers(prefix="cluster-a/kv")
    namespace, key = "llama-8b|bf16|tp0", bytes(range(32))
    h = hashlib.sha256(namespace.encode() + b"\0" + key).hexdigest()
    ns_digest = hashlib.sha256(namespace.encode()).hexdigest()[:32]
    expected = f"cluster-a/kv/{h[:2]}/{h[2:4]}/{ns_digest}/{key.hex()}"
    assert tier.object_key(namespace, key) == expected
    header, payload = block(namespace, key, 5000, parent=b"\x07" * 32)
    tier.upload(header, payload)
    keys = [o["Key"] for o in raw.list_objects_v2(Bucket=BUCKET)["Contents"]]
    assert keys == [expected]
    obj = raw.get_object(Bucket=BUCKET, Key=expected)
    body = obj["Body"].read()
    assert body == header.encode() + payload and decode_header(body) == header
    assert base64.b64decode(obj["Metadata"]["kvtier-header"]) == header.encode()
    # Same key in another namespace, or another key: different objects, spread over prefixes.
    assert tier.object_key("other", key) != expected
    spread = {tier.object_key(namespace, i.to_bytes(4, "big")).split("/")[2] for i in range(200)}
    assert len(spread) > 100


def test_conditional_write_keeps_one_object(tiers, raw):
    tier = tiers()
    header, payload = block("ns", b"k1", 10000)
    assert tier.upload(header, payload) == "stored"
    assert tier.upload(header, payload) == "exists"
    # A different payload under the same key never overwrites the first writer's object.
    other_header, other_payload = block("ns", b"k1", 10000, seed=1)
    assert tier.upload(other_header, other_payload) == "exists"
    assert object_count(raw) == 1
    dest = bytearray(10000)
    assert tier.download_into("ns", b"k1", dest) == 10000 and bytes(dest) == payload


def test_concurrent_uploads_of_one_block_store_once(tiers, raw):
    tier = tiers()
    header, payload = block("ns", b"race", 256 << 10)
    results, barrier = [], threading.Barrier(8)

    def go():
        barrier.wait()
        results.append(tier.upload(header, payload))

    threads = [threading.Thread(target=go) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == ["exists"] * 7 + ["stored"]
    assert object_count(raw) == 1


def test_upload_refuses_a_payload_that_does_not_match_its_header(tiers, raw):
    tier = tiers()
    header, payload = block("ns", b"bad", 4096)
    with pytest.raises(CorruptBlock):
        tier.upload(header, payload[:-1] + bytes([payload[-1] ^ 1]))
    with pytest.raises(ValueError):
        tier.upload(header, payload[:100])
    assert object_count(raw) == 0


def test_threads_upload_and_download_concurrently(tiers):
    tier = tiers(max_concurrency=4)
    blocks = [block(f"ns{i % 3}", i.to_bytes(8, "big"), 64 << 10) for i in range(48)]
    errors = []

    def work(part):
        try:
            for header, payload in part:
                assert tier.upload(header, payload) == "stored"
            for header, payload in part:
                dest = bytearray(64 << 10)
                assert tier.download_into(header.namespace, header.key, dest) == len(payload)
                assert bytes(dest) == payload
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(blocks[i::8],)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors


def test_delete(tiers, raw):
    tier = tiers()
    header, payload = block("ns", b"gone", 100)
    tier.upload(header, payload)
    tier.delete("ns", b"gone")
    tier.delete("ns", b"gone")  # absent: not an error
    assert tier.download_into("ns", b"gone", bytearray(100)) is None
    assert object_count(raw) == 0
    assert tier.upload(header, payload) == "stored"


# ---------------------------------------------------------------------- corruption

def _corruptions(header: BlockHeader, payload: bytes, other: tuple[BlockHeader, bytes]) -> dict[str, bytes]:
    good = header.encode() + payload
    flipped_header = bytearray(good)
    flipped_header[20] ^= 0x40
    return {
        "payload bit flip": good[:-10] + bytes([good[-10] ^ 1]) + good[-9:],
        "header bit flip": bytes(flipped_header),
        "truncated": good[:-1],
        "extra bytes": good + b"\0",
        "another block's object": other[0].encode() + other[1],
        "garbage": b"\x00" * len(good),
        "empty": b"",
    }


@pytest.mark.parametrize("kind", ["payload bit flip", "header bit flip", "truncated", "extra bytes",
                                  "another block's object", "garbage", "empty"])
def test_corrupt_object_is_quarantined_deleted_and_can_be_reuploaded(tiers, raw, kind, caplog):
    tier = tiers()
    header, payload = block("ns", b"victim", 50_000)
    bad = _corruptions(header, payload, block("ns", b"someone-else", 50_000))[kind]
    okey = tier.object_key("ns", b"victim")
    assert tier.upload(header, payload) == "stored"
    raw.put_object(Bucket=BUCKET, Key=okey, Body=bad)  # unconditional overwrite behind the tier's back
    dest = bytearray(60_000)
    with caplog.at_level(logging.WARNING, logger="kvtier.s3"):
        assert tier.download_into("ns", b"victim", dest) is None
    assert tier.quarantined_count() == 1 and tier.replaced_count() == 0
    assert "quarantined" in caplog.text and okey in caplog.text
    assert object_count(raw) == 0, "the bad object must be deleted so that a healthy node can re-upload"
    # A healthy node uploads it again; now it verifies.
    assert tier.upload(header, payload) == "stored"
    assert tier.download_into("ns", b"victim", dest) == len(payload) and bytes(dest[:len(payload)]) == payload


def test_head_without_metadata_reads_the_header(tiers, raw):
    tier = tiers()
    header, payload = block("ns", b"plain", 3000)
    okey = tier.object_key("ns", b"plain")
    raw.put_object(Bucket=BUCKET, Key=okey, Body=header.encode() + payload)  # e.g. copied by another tool
    assert tier.head("ns", b"plain") == (3000, checksum(payload))
    dest = bytearray(3000)
    assert tier.download_into("ns", b"plain", dest) == 3000 and bytes(dest) == payload
    # A corrupt header behind bogus metadata: head falls back to the object, quarantines it.
    bad = bytearray(header.encode() + payload)
    bad[0] ^= 0xFF
    raw.put_object(Bucket=BUCKET, Key=okey, Body=bytes(bad), Metadata={"kvtier-header": "Zm9v"})
    assert tier.head("ns", b"plain") is None
    assert tier.quarantined_count() == 1 and object_count(raw) == 0


def test_quarantine_never_deletes_a_copy_that_replaced_the_bad_one(tiers, raw):
    tier = tiers()
    header, payload = block("ns", b"k", 1000)
    tier.upload(header, payload)
    okey = tier.object_key("ns", b"k")
    # The ETag seen by a reader of an older, bad version no longer matches: the object stays.
    tier._reject("ns", b"k", okey, '"0123456789abcdef0123456789abcdef"', "test: stale etag")
    assert object_count(raw) == 1
    assert tier.download_into("ns", b"k", bytearray(1000)) == 1000


def test_payload_larger_than_dest_is_a_miss_not_corruption(tiers, raw):
    tier = tiers()
    header, payload = block("ns", b"big", 8192)
    tier.upload(header, payload)
    assert tier.download_into("ns", b"big", bytearray(8191)) is None
    assert tier.quarantined_count() == 0 and object_count(raw) == 1
    with pytest.raises(ValueError):
        tier.download_into("ns", b"big", bytes(9000))  # read-only dest


def test_broken_transfer_is_retried_not_quarantined(s3_server, tiers, raw):
    tier = tiers()
    header, payload = block("ns", b"flaky", 1 << 20)
    tier.upload(header, payload)
    # Cut the first response 4 KiB into the body: a short read, then a clean retry.
    proxy = CuttingProxy(s3_server.port, cut_after=4096, cuts=1)
    try:
        flaky = tiers(endpoint_url=proxy.endpoint_url)
        dest = bytearray(1 << 20)
        assert flaky.download_into("ns", b"flaky", dest) == 1 << 20 and bytes(dest) == payload
        assert proxy.cut == 1
        # Every attempt cut: S3Unavailable, and the (good) object is neither quarantined nor deleted.
        proxy.cuts_left = 100
        with pytest.raises(S3Unavailable):
            flaky.download_into("ns", b"flaky", dest)
        assert flaky.quarantined_count() == 0 and object_count(raw) == 1
    finally:
        proxy.close()


# ---------------------------------------------------------------------- replaced objects

def test_object_replaced_after_listing_is_not_served_nor_deleted(tiers, raw, caplog):
    """A reader that listed version A, then finds a valid version B of the same length at the key (an
    unconditional writer replaced it), must not serve B as A, nor delete B as if it were corrupt."""
    tier = tiers()
    header, payload = block("ns", b"k", 4096)
    tier.upload(header, payload)
    [listed], _ = tier.list()
    other_header, other_payload = block("ns", b"k", 4096, seed=1)   # same length, another payload
    okey = tier.object_key("ns", b"k")
    raw.put_object(Bucket=BUCKET, Key=okey, Body=other_header.encode() + other_payload,
                   Metadata={"kvtier-header": base64.b64encode(other_header.encode()).decode()})
    dest = bytearray(4096)
    with caplog.at_level(logging.WARNING, logger="kvtier.s3"):
        assert tier.download_into("ns", b"k", dest, expected_checksum=listed.checksum,
                                  expected_length=listed.length) is None
    assert okey in caplog.text and "replaced" in caplog.text
    assert tier.replaced_count() == 1 and tier.quarantined_count() == 0
    assert object_count(raw) == 1, "another writer's valid object is not corruption: kept"
    # A length the object does not have is refused the same way.
    assert tier.download_into("ns", b"k", dest, expected_length=4095) is None
    assert tier.replaced_count() == 2
    # The new version, when it is what the caller expects, verifies and is served.
    assert tier.download_into("ns", b"k", dest, expected_checksum=checksum(other_payload),
                              expected_length=4096) == 4096 and bytes(dest) == other_payload
    assert tier.quarantined_count() == 0 and object_count(raw) == 1


def test_corruption_is_still_quarantined_when_expectations_are_given(tiers, raw):
    """A payload that contradicts its own header is corruption even if the header is the expected one."""
    tier = tiers()
    header, payload = block("ns", b"k", 4096)
    tier.upload(header, payload)
    flipped = header.encode() + payload[:-1] + bytes([payload[-1] ^ 1])
    raw.put_object(Bucket=BUCKET, Key=tier.object_key("ns", b"k"), Body=flipped)
    assert tier.download_into("ns", b"k", bytearray(4096), expected_checksum=header.payload_checksum,
                              expected_length=4096) is None
    assert tier.quarantined_count() == 1 and tier.replaced_count() == 0 and object_count(raw) == 0


# ---------------------------------------------------------------------- outages

def test_paused_server_raises_s3_unavailable_within_timeouts(s3_server, tiers):
    tier = tiers(connect_timeout_s=0.5, read_timeout_s=0.5, max_attempts=2)
    header, payload = block("ns", b"before", 2 << 20)
    assert tier.upload(header, payload) == "stored"
    s3_server.pause()
    try:
        late_header, late_payload = block("ns", b"during", 2 << 20)
        for call in (lambda: tier.upload(late_header, late_payload),
                     lambda: tier.download_into("ns", b"before", bytearray(2 << 20)),
                     lambda: tier.head("ns", b"before")):
            start = time.monotonic()
            with pytest.raises(S3Unavailable):
                call()
            assert time.monotonic() - start < 10
        start = time.monotonic()
        assert tier.reachable() is False
        assert time.monotonic() - start < 3
    finally:
        s3_server.resume()
    assert tier.reachable() is True
    # The timed-out PUTs sat in the kernel's queue and may have landed on resume: either is correct.
    assert tier.upload(late_header, late_payload) in ("stored", "exists")
    assert tier.download_into("ns", b"during", bytearray(2 << 20)) == 2 << 20
    dest = bytearray(2 << 20)
    assert tier.download_into("ns", b"before", dest) == 2 << 20 and bytes(dest) == payload  # state kept
    assert tier.quarantined_count() == 0


def test_stopped_server_then_restart_loses_state(s3_server, tiers):
    tier = tiers(connect_timeout_s=1.0, read_timeout_s=1.0, max_attempts=2)
    header, payload = block("ns", b"x", 100)
    s3_server.stop()
    start = time.monotonic()
    with pytest.raises(S3Unavailable):
        tier.upload(header, payload)  # connection refused
    assert time.monotonic() - start < 10
    assert tier.reachable() is False
    s3_server.start()
    # moto lost the bucket: a configuration error (S3Misconfigured), not a plain outage.
    with pytest.raises(S3Misconfigured, match="NoSuchBucket"):
        tier.upload(header, payload)
    assert tier.reachable() is False
    make_bucket(s3_server, BUCKET)
    assert tier.reachable() is True and tier.upload(header, payload) == "stored"


def test_bucket_is_created_only_when_asked(s3_server):
    cfg = S3Config(s3_server.endpoint_url, "kvtier-fresh-bucket", region="us-east-1")
    with S3Tier(cfg) as tier:
        assert tier.reachable() is False
        with pytest.raises(S3Misconfigured, match="NoSuchBucket"):
            tier.download_into("ns", b"k", bytearray(10))
    with S3Tier(dataclasses.replace(cfg, create_bucket=True)) as tier:
        assert tier.reachable() is True
    with S3Tier(dataclasses.replace(cfg, create_bucket=True)) as tier:
        assert tier.reachable() is True  # already there: fine


# ---------------------------------------------------------------------- permanent errors

def _assert_misconfigured(call, code: str) -> None:
    with pytest.raises(S3Misconfigured) as info:
        call()
    assert isinstance(info.value, S3Unavailable), "callers backing off on outages back off on this too"
    assert code in str(info.value) and SECRET not in str(info.value)


def test_missing_bucket_is_misconfigured_not_a_client_error(tiers):
    tier = tiers(bucket="kvtier-no-such-bucket", max_attempts=1)
    header, payload = block("ns", b"k", 100)
    _assert_misconfigured(lambda: tier.upload(header, payload), "NoSuchBucket")
    _assert_misconfigured(lambda: tier.download_into("ns", b"k", bytearray(100)), "NoSuchBucket")
    _assert_misconfigured(lambda: tier.list(), "NoSuchBucket")
    _assert_misconfigured(lambda: tier.list_keys(), "NoSuchBucket")
    _assert_misconfigured(lambda: tier.probe_conditional_puts(), "NoSuchBucket")


def test_refused_credentials_are_misconfigured(s3rver_server, s3rver_tiers):
    """s3rver knows one access key id: any other is InvalidAccessKeyId (403; a HEAD gets a bare 403)."""
    tier = s3rver_tiers(access_key_id="KVTIERWRONGKEY", secret_access_key=SECRET, max_attempts=1)
    header, payload = block("ns", b"k", 100)
    _assert_misconfigured(lambda: tier.upload(header, payload), "InvalidAccessKeyId")
    _assert_misconfigured(lambda: tier.download_into("ns", b"k", bytearray(100)), "InvalidAccessKeyId")
    _assert_misconfigured(lambda: tier.list(), "InvalidAccessKeyId")
    _assert_misconfigured(lambda: tier.head("ns", b"k"), "403")
    assert tier.reachable() is False


# ---------------------------------------------------------------------- conditional-put probe

def test_probe_conditional_puts_is_true_on_moto_and_leaves_nothing(tiers, raw):
    tier = tiers(prefix="cluster-a/kv")
    assert tier.probe_conditional_puts() is True
    assert object_count(raw) == 0, "the probe object is deleted"


def test_probe_conditional_puts_raises_s3_unavailable_when_unreachable(tiers):
    tier = tiers(endpoint_url=f"http://127.0.0.1:{free_port()}", connect_timeout_s=0.5, max_attempts=1)
    with pytest.raises(S3Unavailable) as info:
        tier.probe_conditional_puts()
    assert not isinstance(info.value, S3Misconfigured)


# ---------------------------------------------------------------------- s3rver: a second implementation

def test_probe_conditional_puts_is_false_on_s3rver(s3rver_tiers, s3rver_server):
    tier = s3rver_tiers()
    assert tier.probe_conditional_puts() is False   # s3rver overwrites despite If-None-Match: *
    client = s3rver_server.client()
    try:
        assert client.list_objects_v2(Bucket=BUCKET).get("KeyCount", 0) == 0, "the probe object is deleted"
    finally:
        client.close()


def test_round_trip_on_s3rver(s3rver_tiers):
    tier = s3rver_tiers()
    header, payload = block("model-a|tp0", b"\x01" * 32, 300_000, parent=b"\x02" * 32)
    assert tier.upload(header, payload) == "stored"
    [entry], token = tier.list()
    assert token == "" and entry == S3Entry("model-a|tp0", header.key, header.parent, len(payload),
                                            checksum(payload), header.created_unix_ms,
                                            tier.object_key("model-a|tp0", header.key))
    keys, token = tier.list_keys()
    assert token == "" and keys == [(entry.object_key, len(header.encode()) + len(payload))]
    assert tier.parse_object_key(entry.object_key) == (tier.namespace_digest("model-a|tp0"), header.key)
    assert tier.entry_for(*keys[0]) == entry
    dest = bytearray(len(payload))
    assert tier.download_into("model-a|tp0", header.key, dest, expected_checksum=entry.checksum,
                              expected_length=entry.length) == len(payload) and bytes(dest) == payload
    assert tier.head("model-a|tp0", header.key) == (len(payload), checksum(payload))
    tier.delete("model-a|tp0", header.key)
    assert tier.download_into("model-a|tp0", header.key, dest) is None
    assert tier.quarantined_count() == 0 and tier.replaced_count() == 0


# ---------------------------------------------------------------------- listing

def test_list_pages_and_decodes_metadata(tiers, raw, monkeypatch):
    monkeypatch.setattr(s3mod, "_LIST_PAGE", 4)  # force many S3 pages, not just many tier pages
    tier = tiers()
    expected: dict[tuple[str, bytes], S3Entry] = {}
    for i in range(23):
        namespace = "alpha" if i % 3 else "beta"
        header, payload = block(namespace, i.to_bytes(2, "big"), 100 + i, parent=bytes([i]) * 32 if i else b"")
        header = dataclasses.replace(header, created_unix_ms=1_700_000_000_000 + i)
        tier.upload(header, payload)
        expected[(namespace, header.key)] = S3Entry(namespace, header.key, header.parent, len(payload),
                                                    checksum(payload), header.created_unix_ms,
                                                    tier.object_key(namespace, header.key))
    raw.put_object(Bucket=BUCKET, Key="kvtier/not-a-block", Body=b"x")        # foreign: skipped
    raw.put_object(Bucket=BUCKET, Key="elsewhere/file", Body=b"x")            # outside the prefix
    seen, token, pages = [], "", 0
    while True:
        entries, token = tier.list(start_after=token, limit=5)
        assert len(entries) <= 5
        seen += entries
        pages += 1
        if not token:
            break
    assert pages >= 5
    assert [e.object_key for e in seen] == sorted(e.object_key for e in seen)
    assert {(e.namespace, e.key): e for e in seen} == expected and len(seen) == len(expected)
    beta, token = tier.list(namespace="beta", limit=1000)
    assert token == "" and sorted(e.key for e in beta) == sorted(k for ns, k in expected if ns == "beta")
    one, token = tier.list(namespace="beta", limit=1)
    assert len(one) == 1 and token == one[0].object_key
    assert tier.list(namespace="gamma") == ([], "")


# ---------------------------------------------------------------------- config and credentials

def test_config_repr_hides_the_secret_and_validates():
    cfg = S3Config("http://127.0.0.1:1", "b-u-c", access_key_id=KEY_ID, secret_access_key=SECRET)
    for text in (repr(cfg), str(cfg), f"{cfg}"):
        assert SECRET not in text and KEY_ID not in text and "***" in text
    with pytest.raises(ValueError):
        S3Config(None, "bucket", prefix="/x")
    with pytest.raises(ValueError):
        S3Config(None, "bucket", prefix="")
    with pytest.raises(ValueError):
        S3Config(None, "bucket", access_key_id="only-the-id")
    with pytest.raises(ValueError):
        S3Config(None, "bucket", max_attempts=0)


def test_credentials_never_logged(s3_server, tiers, raw, caplog):
    caplog.set_level(logging.DEBUG)
    for name in ("botocore", "boto3", "urllib3", "kvtier"):
        caplog.set_level(logging.DEBUG, logger=name)  # even with the SDK at DEBUG
    tier = tiers(max_attempts=1)
    header, payload = block("ns", b"k", 1000)
    tier.upload(header, payload)
    tier.download_into("ns", b"k", bytearray(1000))
    tier.head("ns", b"k")
    tier.list()
    raw.put_object(Bucket=BUCKET, Key=tier.object_key("ns", b"k"), Body=b"corrupt")
    tier.download_into("ns", b"k", bytearray(1000))   # quarantine path logs a warning
    errors = []
    bad = tiers(bucket="no-such-bucket-here")
    try:
        bad.upload(header, payload)
    except S3Misconfigured as exc:
        errors.append(exc)
    s3_server.stop()
    try:
        tier.upload(*block("ns", b"k2", 10))
    except S3Unavailable as exc:
        errors.append(exc)
    assert len(errors) == 2
    assert any(r.name.startswith("botocore") for r in caplog.records), "the SDK's DEBUG logs were captured"
    text = caplog.text + "".join(f"{e!r} {e}" for e in errors) + repr(tier.cfg)
    assert SECRET not in text


def test_sdk_loggers_are_kept_at_warning_unless_configured(tiers, monkeypatch):
    for name in ("botocore", "boto3", "urllib3", "s3transfer"):
        monkeypatch.setattr(logging.getLogger(name), "level", logging.NOTSET)
    logging.getLogger("urllib3").setLevel(logging.INFO)  # configured by the operator: left alone
    tiers()
    assert logging.getLogger("botocore").level == logging.WARNING
    assert logging.getLogger("boto3").level == logging.WARNING
    assert logging.getLogger("urllib3").level == logging.INFO


def test_closed_tier_refuses_calls(tiers):
    tier = tiers()
    tier.close()
    tier.close()
    with pytest.raises(RuntimeError):
        tier.head("ns", b"k")
    with pytest.raises(RuntimeError):
        tier.upload(*block("ns", b"k", 10))


# ---------------------------------------------------------------------- extra metadata (the daemon's MACs)

def _sign_with(seen: list):
    def sign(encoded: bytes, sent) -> dict[str, str]:
        seen.append((bytes(encoded), bytes(sent)))
        return {"kvtier-mac": hashlib.sha256(bytes(sent)).hexdigest(), "kvtier-header-mac": "ab" * 32}
    return sign


@pytest.mark.parametrize("server", ["moto", "s3rver"])
def test_sign_adds_metadata_that_head_list_and_download_hand_back(request, server):
    tier = request.getfixturevalue("tiers" if server == "moto" else "s3rver_tiers")()
    header, payload = block("ns", b"signed", 70_000)
    seen: list = []
    slot = bytearray(payload) + b"\0" * 1000  # an arena slot: longer than the block
    assert tier.upload(header, memoryview(slot), sign=_sign_with(seen)) == "stored"
    assert seen == [(header.encode(), payload)]  # exactly the header and the payload bytes sent
    expected = {"kvtier-mac": hashlib.sha256(payload).hexdigest(), "kvtier-header-mac": "ab" * 32}
    [entry], _ = tier.list()
    assert entry.header == header.encode()
    assert {k: entry.metadata[k] for k in expected} == expected
    assert tier.entry_for(entry.object_key, 0).metadata["kvtier-mac"] == expected["kvtier-mac"]
    metadata = {"stale": "x"}
    dest = bytearray(80_000)
    assert tier.download_into("ns", b"signed", dest, metadata=metadata) == len(payload)
    assert {k: metadata[k] for k in expected} == expected and "stale" not in metadata
    # Unsigned uploads carry only the header; a miss leaves the caller's dict alone.
    plain_header, plain = block("ns", b"plain", 100)
    tier.upload(plain_header, plain)
    got: dict = {}
    assert tier.download_into("ns", b"plain", bytearray(100), metadata=got) == 100 and "kvtier-mac" not in got
    untouched = {"kept": "1"}
    assert tier.download_into("ns", b"absent", bytearray(100), metadata=untouched) is None
    assert untouched == {"kept": "1"}


def test_sign_cannot_replace_the_header_and_a_bad_payload_is_never_signed(tiers):
    tier = tiers()
    header, payload = block("ns", b"k", 1000)
    with pytest.raises(ValueError, match="may not replace kvtier-header"):
        tier.upload(header, payload, sign=lambda encoded, sent: {"kvtier-header": "forged"})
    seen: list = []
    with pytest.raises(CorruptBlock):
        tier.upload(header, payload[:-1] + bytes([payload[-1] ^ 1]), sign=_sign_with(seen))
    assert seen == []  # the checksum is verified first: sign() only ever sees bytes that match it
    assert tier.download_into("ns", b"k", bytearray(1000)) is None  # nothing was stored
