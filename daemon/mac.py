"""Block MACs under the cluster key: what a node vouches for when it hands a block to another node.

Every node of a cluster reads the same secret (`cluster.key_file`, 32..4096 bytes, mode 0600/0400).
A node that uploads a block to S3 or serves one to a peer attaches HMAC-SHA256 over the block's
identity and bytes; a node that takes a block from S3 or from a peer commits it only if the MAC
verifies. The block checksum (xxh3-64) catches damage, not forgery: anyone can compute it, and it is
not collision resistant, so the MAC is always computed over the full payload, never over the
checksum. Without a cluster key nothing here is used and blocks from S3 and peers are checked by
checksum only (docs/security.md, docs/peers.md, docs/s3-format.md).

Encoding (docs/s3-format.md, "MACs"): every field is length-prefixed (u64 little-endian), so no two
different field tuples share an encoding, and the first field names the purpose, so a MAC made for
one purpose never verifies for another:

    block_mac  = HMAC-SHA256(key, f("kvtier-block-mac-v1") f(namespace UTF-8) f(block key)
                                  u64(payload length) payload)
    header_mac = HMAC-SHA256(key, f("kvtier-s3-header-mac-v1") f(BlockHeader.encode()) f(block_mac))
    f(x)       = u64(len(x)) x

`block_mac` authenticates a block's bytes under its (namespace, key). `header_mac` authenticates
the block header that an S3 object carries in its metadata (length, checksum, parent, created), so a
listing can refuse a forged object with a HEAD, before any byte of it is read.

Thread-safety: pure functions; hashlib releases the GIL while it hashes, so large payloads are
hashed on worker threads (`block_mac_async`) and never on the event loop.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import os
import struct

from .config import check_secret_stat

MIN_KEY_BYTES = 32
MAX_KEY_BYTES = 4096
MAC_BYTES = 32                       # HMAC-SHA256
BLOCK_DOMAIN = b"kvtier-block-mac-v1"
HEADER_DOMAIN = b"kvtier-s3-header-mac-v1"
OFF_LOOP_BYTES = 1 << 20             # like the store's commit hashing: above this, a worker thread
_U64 = struct.Struct("<Q")


class ClusterKeyError(ValueError):
    """The cluster key file cannot be used (the message names the file and why, never the key)."""


def load_cluster_key(path: str) -> bytes:
    """The key: every byte of the file, as is (e.g. `head -c 32 /dev/urandom`). The file's mode is
    checked again on the open file (config.load checked the path; it may have been replaced since).
    Raises ClusterKeyError when it is missing, exposed, or not 32..4096 bytes."""
    try:
        with open(path, "rb") as file:
            try:
                check_secret_stat("cluster.key_file", path, os.fstat(file.fileno()))
            except ValueError as exc:  # config.ConfigError
                raise ClusterKeyError(str(exc)) from None
            key = file.read(MAX_KEY_BYTES + 1)
    except OSError as exc:
        raise ClusterKeyError(f"cluster.key_file {path} cannot be read: {exc.strerror}") from None
    if not MIN_KEY_BYTES <= len(key) <= MAX_KEY_BYTES:
        size = f"{len(key)} bytes" if len(key) <= MAX_KEY_BYTES else f"more than {MAX_KEY_BYTES} bytes"
        raise ClusterKeyError(f"cluster.key_file {path} holds {size}; the cluster key must be "
                              f"{MIN_KEY_BYTES}..{MAX_KEY_BYTES} bytes (e.g. head -c 32 /dev/urandom > {path})")
    return key


def cluster_key(cfg) -> bytes | None:
    """The configured cluster key (`cfg.cluster.key_file`), or None when none is configured."""
    path = cfg.cluster.key_file
    return load_cluster_key(path) if path else None


def key_id(key: bytes) -> str:
    """A short public fingerprint of the key, for logs: nodes whose ids differ cannot verify each
    other's blocks. Says nothing useful about the key itself (a domain-separated SHA-256)."""
    return hashlib.sha256(b"kvtier-cluster-key-id-v1\0" + key).hexdigest()[:16]


def _field(value: bytes) -> bytes:
    return _U64.pack(len(value)) + value


def block_mac(key: bytes, namespace: str, block_key: bytes, payload) -> bytes:
    """HMAC-SHA256 of the block (see the module docstring for the exact encoding). `payload` is any
    contiguous buffer of exactly the block's bytes (a memoryview of a slot cut to its length)."""
    view = memoryview(payload).cast("B")
    mac = hmac.new(key, digestmod=hashlib.sha256)
    mac.update(_field(BLOCK_DOMAIN) + _field(namespace.encode()) + _field(bytes(block_key))
               + _U64.pack(view.nbytes))
    mac.update(view)
    return mac.digest()


async def block_mac_async(key: bytes, namespace: str, block_key: bytes, payload) -> bytes:
    """block_mac, on a worker thread when the payload is over OFF_LOOP_BYTES (for the event loop)."""
    if memoryview(payload).nbytes > OFF_LOOP_BYTES:
        return await asyncio.to_thread(block_mac, key, namespace, block_key, payload)
    return block_mac(key, namespace, block_key, payload)


def verify_block(key: bytes, namespace: str, block_key: bytes, payload, mac: bytes) -> bool:
    """Whether `mac` is the block's MAC (constant-time compare; a MAC of the wrong size is False)."""
    if len(mac) != MAC_BYTES:
        return False
    return hmac.compare_digest(block_mac(key, namespace, block_key, payload), bytes(mac))


def header_mac(key: bytes, encoded_header: bytes, mac: bytes) -> bytes:
    """HMAC-SHA256 binding an encoded BlockHeader to the block's MAC (an S3 object's metadata)."""
    return hmac.new(key, _field(HEADER_DOMAIN) + _field(bytes(encoded_header)) + _field(bytes(mac)),
                    hashlib.sha256).digest()


def verify_header(key: bytes, encoded_header: bytes, mac: bytes, expected: bytes) -> bool:
    if len(expected) != MAC_BYTES or len(mac) != MAC_BYTES:
        return False
    return hmac.compare_digest(header_mac(key, encoded_header, mac), bytes(expected))
