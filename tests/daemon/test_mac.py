"""daemon/mac.py: the cluster key file is refused unless it is a private file of 32..4096 bytes, and
block MACs follow the documented encoding (docs/s3-format.md "MACs"): a known-answer test pins it,
and every field (purpose, namespace, key, length, bytes) changes the MAC."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import os
import struct

import pytest

from kvtier.daemon import config
from kvtier.daemon import mac as macs


def key_file(tmp_path, data: bytes, mode: int = 0o600, name: str = "cluster.key") -> str:
    path = tmp_path / name
    path.write_bytes(data)
    path.chmod(mode)
    return str(path)


@pytest.mark.parametrize("size", [32, 64, 4096])
def test_a_private_key_file_of_32_to_4096_bytes_is_the_key_as_is(tmp_path, size):
    data = os.urandom(size - 1) + b"\n"  # every byte counts, a trailing newline included
    assert macs.load_cluster_key(key_file(tmp_path, data)) == data


@pytest.mark.parametrize("size", [0, 16, 31, 4097, 1 << 20])
def test_a_key_of_the_wrong_size_is_refused_saying_so(tmp_path, size):
    path = key_file(tmp_path, b"k" * size)
    with pytest.raises(macs.ClusterKeyError, match=r"cluster key must be 32\.\.4096 bytes") as err:
        macs.load_cluster_key(path)
    assert path in str(err.value) and "kkkk" not in str(err.value)


def test_a_key_others_can_read_or_that_is_missing_is_refused(tmp_path):
    exposed = key_file(tmp_path, os.urandom(32), 0o644)
    with pytest.raises(macs.ClusterKeyError, match="readable by group/others"):
        macs.load_cluster_key(exposed)
    with pytest.raises(macs.ClusterKeyError, match="cannot be read"):
        macs.load_cluster_key(str(tmp_path / "missing"))
    # config.load refuses it first, like every other secret (the daemon never starts with it).
    with pytest.raises(config.ConfigError, match="cluster.key_file .* is readable by group/others"):
        config.load(overrides={"cluster": {"key_file": exposed}})


def test_no_key_configured_means_no_key(tmp_path):
    assert macs.cluster_key(config.load()) is None
    path = key_file(tmp_path, b"\x01" * 32)
    assert macs.cluster_key(config.load(overrides={"cluster": {"key_file": path}})) == b"\x01" * 32


def _field(value: bytes) -> bytes:
    return struct.pack("<Q", len(value)) + value


def test_block_mac_is_hmac_sha256_of_the_documented_encoding():
    key, payload = bytes(range(32)), b"payload bytes"
    message = (_field(b"kvtier-block-mac-v1") + _field("model-a|tp0".encode()) + _field(b"\x07" * 32)
               + struct.pack("<Q", len(payload)) + payload)
    expected = hmac.new(key, message, hashlib.sha256).digest()
    assert macs.block_mac(key, "model-a|tp0", b"\x07" * 32, payload) == expected
    # A fixed vector, so the encoding cannot drift without this test (and the docs) changing.
    assert expected.hex() == "dc757e94f4068f4ccf6873caaf7df8dbff632cac9dd52b5007941c477995110a"
    assert macs.verify_block(key, "model-a|tp0", b"\x07" * 32, memoryview(bytearray(payload)), expected)


def test_every_field_changes_the_mac():
    key = os.urandom(32)
    base = macs.block_mac(key, "ns", b"key", b"data")
    variants = [macs.block_mac(os.urandom(32), "ns", b"key", b"data"),
                macs.block_mac(key, "ns2", b"key", b"data"),
                macs.block_mac(key, "ns", b"kez", b"data"),
                macs.block_mac(key, "ns", b"key", b"datb"),
                macs.block_mac(key, "ns", b"key", b"data\0"),
                macs.block_mac(key, "nsk", b"ey", b"data"),   # boundaries move: length prefixes tell them apart
                macs.block_mac(key, "n", b"skey", b"data")]
    assert len({base, *variants}) == len(variants) + 1
    # A header MAC is another purpose: it never equals a block MAC, and binds the block MAC too.
    header = macs.header_mac(key, b"header bytes", base)
    assert header != base and header != macs.header_mac(key, b"header bytes", variants[1])
    assert macs.verify_header(key, b"header bytes", base, header)
    assert not macs.verify_header(key, b"header bytez", base, header)


def test_a_mac_of_the_wrong_size_or_value_does_not_verify():
    key = os.urandom(32)
    good = macs.block_mac(key, "ns", b"k", b"x" * 100)
    for bad in (b"", good[:16], good + b"\0", bytes(32), bytes([good[0] ^ 1]) + good[1:]):
        assert not macs.verify_block(key, "ns", b"k", b"x" * 100, bad)


def test_large_payloads_are_hashed_off_the_event_loop_with_the_same_result():
    key, payload = os.urandom(48), memoryview(os.urandom(3 << 20))
    seen = []

    async def main():
        loop_thread = asyncio.get_running_loop()._thread_id  # noqa: SLF001 - the loop's own thread
        original = macs.block_mac

        def spy(*args):
            import threading
            seen.append(threading.get_ident() != loop_thread)
            return original(*args)
        macs.block_mac = spy
        try:
            big = await macs.block_mac_async(key, "ns", b"k", payload)
            small = await macs.block_mac_async(key, "ns", b"k", payload[:1000])
        finally:
            macs.block_mac = original
        return big, small
    big, small = asyncio.run(main())
    assert big == macs.block_mac(key, "ns", b"k", payload) and small == macs.block_mac(key, "ns", b"k", payload[:1000])
    assert seen == [True, False]  # over 1 MiB on a worker thread, small ones inline


def test_key_id_is_short_stable_and_not_the_key():
    key = os.urandom(32)
    assert macs.key_id(key) == macs.key_id(bytes(key)) and len(macs.key_id(key)) == 16
    assert macs.key_id(key) != macs.key_id(os.urandom(32)) and macs.key_id(key) not in key.hex()
