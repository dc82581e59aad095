"""Block identity, checksums and the block header shared by every lower tier.

A block is immutable bytes identified by (namespace, key). Lower tiers (disk, S3) store each
block behind a self-describing header so that a record can be verified and re-adopted without
any index: see docs/block-format.md. All integers are little-endian.
"""

from __future__ import annotations

import dataclasses
import struct

import xxhash

MAGIC = b"KVTB"
FORMAT_VERSION = 1
MAX_KEY_BYTES = 32
MAX_NAMESPACE_BYTES = 128
# magic, version, header_len, namespace_len, key_len, parent_len, flags, payload_len,
# payload_checksum, created_unix_ms, header_checksum
_FIXED = struct.Struct("<4sHHHBBHQQQQ")
FIXED_HEADER_BYTES = _FIXED.size
MAX_HEADER_BYTES = FIXED_HEADER_BYTES + MAX_NAMESPACE_BYTES + 2 * MAX_KEY_BYTES


def checksum(data) -> int:
    """xxh3_64 of a bytes-like object: the checksum every tier stores and verifies."""
    return xxhash.xxh3_64_intdigest(data)


class CorruptBlock(Exception):
    """A header or payload failed verification; the block must be quarantined, never served."""


@dataclasses.dataclass(frozen=True, slots=True)
class BlockHeader:
    namespace: str
    key: bytes
    parent: bytes
    payload_len: int
    payload_checksum: int
    created_unix_ms: int

    def __post_init__(self):
        assert 1 <= len(self.key) <= MAX_KEY_BYTES, "key length out of range"
        assert len(self.parent) <= MAX_KEY_BYTES, "parent length out of range"
        assert 1 <= len(self.namespace.encode()) <= MAX_NAMESPACE_BYTES, "namespace length"
        assert self.payload_len >= 0 and 0 <= self.payload_checksum < 2**64

    def encode(self) -> bytes:
        ns = self.namespace.encode()
        header_len = FIXED_HEADER_BYTES + len(ns) + len(self.key) + len(self.parent)
        fields = [MAGIC, FORMAT_VERSION, header_len, len(ns), len(self.key), len(self.parent), 0,
                  self.payload_len, self.payload_checksum, self.created_unix_ms]
        unsealed = _FIXED.pack(*fields, 0) + ns + self.key + self.parent
        sealed = _FIXED.pack(*fields, checksum(unsealed)) + ns + self.key + self.parent
        assert len(sealed) == header_len and decode_header(sealed) == self
        return sealed


def decode_header(buf) -> BlockHeader:
    """Parses and verifies a header at the start of buf; raises CorruptBlock on any mismatch."""
    buf = memoryview(buf)
    if len(buf) < FIXED_HEADER_BYTES:
        raise CorruptBlock("short header")
    (magic, version, header_len, ns_len, key_len, parent_len, _flags, payload_len,
     payload_checksum, created, header_sum) = _FIXED.unpack_from(buf)
    if magic != MAGIC:
        raise CorruptBlock(f"bad magic {bytes(magic)!r}")
    if version != FORMAT_VERSION:
        raise CorruptBlock(f"unsupported format version {version}")
    if header_len != FIXED_HEADER_BYTES + ns_len + key_len + parent_len or header_len > len(buf):
        raise CorruptBlock("inconsistent header length")
    if not (1 <= ns_len <= MAX_NAMESPACE_BYTES and 1 <= key_len <= MAX_KEY_BYTES
            and parent_len <= MAX_KEY_BYTES):
        raise CorruptBlock("field length out of range")
    unsealed = bytearray(buf[:header_len])
    struct.pack_into("<Q", unsealed, FIXED_HEADER_BYTES - 8, 0)
    if checksum(unsealed) != header_sum:
        raise CorruptBlock("header checksum mismatch")
    at = FIXED_HEADER_BYTES
    try:
        namespace = bytes(buf[at:at + ns_len]).decode()
    except UnicodeDecodeError as exc:
        raise CorruptBlock("namespace is not UTF-8") from exc
    key = bytes(buf[at + ns_len:at + ns_len + key_len])
    parent = bytes(buf[at + ns_len + key_len:header_len])
    return BlockHeader(namespace, key, parent, payload_len, payload_checksum, created)


def verify_payload(header: BlockHeader, payload) -> None:
    """Raises CorruptBlock unless payload matches the header's length and checksum."""
    if len(payload) != header.payload_len:
        raise CorruptBlock(f"payload length {len(payload)} != {header.payload_len}")
    if checksum(payload) != header.payload_checksum:
        raise CorruptBlock("payload checksum mismatch")


def align_up(n: int, alignment: int) -> int:
    return (n + alignment - 1) // alignment * alignment
