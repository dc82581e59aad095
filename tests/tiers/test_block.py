"""Block header round trip and every way a header can be rejected."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, strategies as st

from kvtier.tiers.block import (FIXED_HEADER_BYTES, BlockHeader, CorruptBlock, checksum, decode_header,
                                verify_payload)

names = st.text(st.characters(min_codepoint=33, max_codepoint=126), min_size=1, max_size=40)


@given(names, st.binary(min_size=1, max_size=32), st.binary(max_size=32), st.integers(0, 2**40))
def test_round_trip(namespace, key, parent, length):
    header = BlockHeader(namespace, key, parent, length, 12345, 678)
    assert decode_header(header.encode()) == header


@given(st.integers(0, 100), st.integers(0, 7))
def test_any_flipped_bit_is_detected(position, bit):
    encoded = bytearray(BlockHeader("ns", b"k" * 32, b"p" * 32, 10, 99, 1).encode())
    position %= len(encoded)
    encoded[position] ^= 1 << bit
    with pytest.raises(CorruptBlock):
        decode_header(encoded)


def test_rejects_short_and_foreign_data():
    with pytest.raises(CorruptBlock, match="short"):
        decode_header(b"KVTB")
    with pytest.raises(CorruptBlock, match="magic"):
        decode_header(b"\0" * 100)
    encoded = bytearray(BlockHeader("ns", b"k", b"", 1, 1, 1).encode())
    struct.pack_into("<H", encoded, 4, 99)
    with pytest.raises(CorruptBlock, match="version"):
        decode_header(encoded)
    assert FIXED_HEADER_BYTES == 46


def test_verify_payload():
    data = b"payload bytes"
    header = BlockHeader("ns", b"k", b"", len(data), checksum(data), 0)
    verify_payload(header, data)
    with pytest.raises(CorruptBlock):
        verify_payload(header, data[:-1] + b"X")
    with pytest.raises(CorruptBlock):
        verify_payload(header, data + b"!")


def test_header_refuses_to_encode_bad_fields():
    with pytest.raises(AssertionError):
        BlockHeader("ns", b"k" * 33, b"", 1, 1, 1)
    with pytest.raises(AssertionError):
        BlockHeader("", b"k", b"", 1, 1, 1)
