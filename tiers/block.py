"""Block identity, checksums and the block header shared by every lower tier.

A block is immutable bytes identified by (namespace, key). Lower tiers (disk, S3) store each
block behind a self-describing header so that a record can be verified and re-adopted without
any index: see docs/block-format.md. All integers are little-endian.

Format version 2 appends the block's router metadata to version 1's header: the token ids the block
holds and who stored it (BlockOrigin: engine, model, block size, LoRA), so that a block re-adopted
after a restart can be announced to KV-aware routers. A header without them is still written as
version 1 (byte for byte what earlier releases wrote); readers take both.
"""

from __future__ import annotations

import dataclasses
import struct

import xxhash

MAGIC = b"KVTB"
FORMAT_VERSION = 2          # written when the header carries token ids or an origin
BASE_FORMAT_VERSION = 1     # written otherwise (and by releases before version 2); both are read
MAX_KEY_BYTES = 32
MAX_NAMESPACE_BYTES = 128
MAX_TOKEN_IDS = 4096        # token ids one block may carry (a block of at most 4096 tokens)
MAX_NAME_BYTES = 255        # BlockOrigin.engine / model / lora_name, UTF-8
# magic, version, header_len, namespace_len, key_len, parent_len, flags, payload_len,
# payload_checksum, created_unix_ms, header_checksum
_FIXED = struct.Struct("<4sHHHBBHQQQQ")
FIXED_HEADER_BYTES = _FIXED.size
# Version 2's extension after the parent: block_size, token_count, engine_len, model_len, lora_len;
# then engine, model, lora_name (UTF-8) and token_count token ids (u32 each).
_EXTENSION = struct.Struct("<IHBBB")
EXTENSION_FIXED_BYTES = _EXTENSION.size
# The longest version 1 header; every header without an extension fits in it.
MAX_BASE_HEADER_BYTES = FIXED_HEADER_BYTES + MAX_NAMESPACE_BYTES + 2 * MAX_KEY_BYTES
MAX_HEADER_BYTES = MAX_BASE_HEADER_BYTES + EXTENSION_FIXED_BYTES + 3 * MAX_NAME_BYTES + 4 * MAX_TOKEN_IDS


def checksum(data) -> int:
    """xxh3_64 of a bytes-like object: the checksum every tier stores and verifies."""
    return xxhash.xxh3_64_intdigest(data)


class CorruptBlock(Exception):
    """A header or payload failed verification; the block must be quarantined, never served."""


@dataclasses.dataclass(frozen=True, slots=True, weakref_slot=True)
class BlockOrigin:
    """Who stored a block, as the engine names itself to routers. Immutable and hashable: the daemon
    shares one instance between all the blocks of an origin (daemon/catalog.py interns them)."""
    engine: str = ""       # engine / worker id
    model: str = ""        # served model name
    block_size: int = 0    # tokens per block as the engine counts them; 0 = unknown
    lora_name: str = ""    # LoRA adapter; "" = the base model

    def problem(self) -> str | None:
        """Why this origin cannot be stored (a field out of its bounds), or None."""
        for name in ("engine", "model", "lora_name"):
            if len(getattr(self, name).encode()) > MAX_NAME_BYTES:
                return f"origin.{name} is longer than {MAX_NAME_BYTES} bytes"
        if not 0 <= self.block_size <= MAX_TOKEN_IDS:
            return f"origin.block_size must be 0..{MAX_TOKEN_IDS}"
        return None


EMPTY_ORIGIN = BlockOrigin()


def pack_token_ids(token_ids) -> bytes:
    """Token ids as the compact form blocks keep them in: u32 little-endian each. ValueError when
    an id does not fit in 32 bits."""
    try:
        return struct.pack(f"<{len(token_ids)}I", *token_ids)
    except struct.error as exc:
        raise ValueError(f"token ids must be 0..{2**32 - 1}") from exc


def unpack_token_ids(packed: bytes) -> list[int]:
    return list(struct.unpack(f"<{len(packed) // 4}I", packed))


def encode_extension(token_ids: bytes, origin: BlockOrigin | None) -> bytes:
    """Version 2's extension (also the disk index's): b"" when there is nothing to say."""
    if not token_ids and origin is None:
        return b""
    origin = origin or EMPTY_ORIGIN
    names = [origin.engine.encode(), origin.model.encode(), origin.lora_name.encode()]
    return _EXTENSION.pack(origin.block_size, len(token_ids) // 4, *map(len, names)) + b"".join(names) + token_ids


def decode_extension(buf) -> tuple[bytes, BlockOrigin | None]:
    """(packed token ids, origin or None) from exactly one extension; ValueError when malformed."""
    buf = memoryview(buf)
    if len(buf) < EXTENSION_FIXED_BYTES:
        raise ValueError("short extension")
    block_size, count, *lengths = _EXTENSION.unpack_from(buf)
    if len(buf) != EXTENSION_FIXED_BYTES + sum(lengths) + 4 * count or count > MAX_TOKEN_IDS \
            or block_size > MAX_TOKEN_IDS:
        raise ValueError("inconsistent extension length")
    at, names = EXTENSION_FIXED_BYTES, []
    for length in lengths:
        try:
            names.append(bytes(buf[at:at + length]).decode())
        except UnicodeDecodeError as exc:
            raise ValueError("origin name is not UTF-8") from exc
        at += length
    origin = BlockOrigin(names[0], names[1], block_size, names[2])
    return bytes(buf[at:]), (None if origin == EMPTY_ORIGIN else origin)


@dataclasses.dataclass(frozen=True, slots=True)
class BlockHeader:
    namespace: str
    key: bytes
    parent: bytes
    payload_len: int
    payload_checksum: int
    created_unix_ms: int
    token_ids: bytes = b""               # packed (pack_token_ids); b"" = unknown
    origin: BlockOrigin | None = None    # None = unknown (an all-empty origin is None)

    def __post_init__(self):
        assert 1 <= len(self.key) <= MAX_KEY_BYTES, "key length out of range"
        assert len(self.parent) <= MAX_KEY_BYTES, "parent length out of range"
        assert 1 <= len(self.namespace.encode()) <= MAX_NAMESPACE_BYTES, "namespace length"
        assert self.payload_len >= 0 and 0 <= self.payload_checksum < 2**64
        assert len(self.token_ids) % 4 == 0 and len(self.token_ids) <= 4 * MAX_TOKEN_IDS, "token ids"
        if self.origin == EMPTY_ORIGIN:
            object.__setattr__(self, "origin", None)
        assert self.origin is None or self.origin.problem() is None, "origin out of bounds"

    @property
    def encoded_len(self) -> int:
        """header_len: the bytes encode() returns."""
        extension = 0
        if self.token_ids or self.origin is not None:
            origin = self.origin or EMPTY_ORIGIN
            extension = EXTENSION_FIXED_BYTES + len(self.token_ids) + sum(
                len(name.encode()) for name in (origin.engine, origin.model, origin.lora_name))
        return FIXED_HEADER_BYTES + len(self.namespace.encode()) + len(self.key) + len(self.parent) + extension

    def encode(self) -> bytes:
        ns = self.namespace.encode()
        extension = encode_extension(self.token_ids, self.origin)
        version = FORMAT_VERSION if extension else BASE_FORMAT_VERSION
        header_len = FIXED_HEADER_BYTES + len(ns) + len(self.key) + len(self.parent) + len(extension)
        fields = [MAGIC, version, header_len, len(ns), len(self.key), len(self.parent), 0,
                  self.payload_len, self.payload_checksum, self.created_unix_ms]
        tail = ns + self.key + self.parent + extension
        unsealed = _FIXED.pack(*fields, 0) + tail
        sealed = _FIXED.pack(*fields, checksum(unsealed)) + tail
        assert len(sealed) == header_len == self.encoded_len and decode_header(sealed) == self
        return sealed


def header_len_of(buf) -> int:
    """The header_len field of an encoded header (unverified: decode_header checks it)."""
    return struct.unpack_from("<H", buf, 6)[0]


def decode_header(buf) -> BlockHeader:
    """Parses and verifies a header at the start of buf; raises CorruptBlock on any mismatch."""
    buf = memoryview(buf)
    if len(buf) < FIXED_HEADER_BYTES:
        raise CorruptBlock("short header")
    (magic, version, header_len, ns_len, key_len, parent_len, _flags, payload_len,
     payload_checksum, created, header_sum) = _FIXED.unpack_from(buf)
    if magic != MAGIC:
        raise CorruptBlock(f"bad magic {bytes(magic)!r}")
    if version not in (BASE_FORMAT_VERSION, FORMAT_VERSION):
        raise CorruptBlock(f"unsupported format version {version}")
    base_len = FIXED_HEADER_BYTES + ns_len + key_len + parent_len
    if header_len > len(buf) or (header_len != base_len if version == BASE_FORMAT_VERSION
                                 else header_len < base_len + EXTENSION_FIXED_BYTES):
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
    parent = bytes(buf[at + ns_len + key_len:base_len])
    token_ids, origin = b"", None
    if version == FORMAT_VERSION:
        try:
            token_ids, origin = decode_extension(buf[base_len:header_len])
        except ValueError as exc:
            raise CorruptBlock(f"extension: {exc}") from exc
    return BlockHeader(namespace, key, parent, payload_len, payload_checksum, created, token_ids, origin)


def verify_payload(header: BlockHeader, payload) -> None:
    """Raises CorruptBlock unless payload matches the header's length and checksum."""
    if len(payload) != header.payload_len:
        raise CorruptBlock(f"payload length {len(payload)} != {header.payload_len}")
    if checksum(payload) != header.payload_checksum:
        raise CorruptBlock("payload checksum mismatch")


def align_up(n: int, alignment: int) -> int:
    return (n + alignment - 1) // alignment * alignment
