"""The S3 tier: one immutable, self-describing object per block. No local state.

Layout (exact bytes and key scheme: docs/s3-format.md):
    s3://<bucket>/<prefix>/<h[0:2]>/<h[2:4]>/<ns_digest>/<key hex>
        h         = sha256(namespace UTF-8 + 0x00 + key).hexdigest()   spreads keys over prefixes
        ns_digest = sha256(namespace UTF-8).hexdigest()[:32]           identifies the namespace
    object bytes  = BlockHeader.encode() + payload                    (docs/block-format.md)
    metadata      = x-amz-meta-kvtier-header: base64 of the same header (self-verifying), so that
                    head() and list() need no GET of the body; with the daemon's cluster key also
                    x-amz-meta-kvtier-mac and -header-mac (upload's `sign` adds them, download_into's
                    `metadata` and S3Entry.metadata hand them back; this module never checks them)
    s3://<bucket>/<prefix>/_probe/<random hex>: probe_conditional_puts()'s short-lived object

Contract:
- Threads: every method may be called from any number of worker threads concurrently, except
  close(), which runs with no other call in flight. The botocore clients (one for I/O, one for the
  reachable() probe) are created up front from a private session (clients are thread-safe, sessions
  are not; the session is dropped after __init__). At most max_concurrency HTTP connections are
  pooled; list() fans its HEADs out over that many threads.
- Blocking: each object call is one logical S3 request (download_into/head may add one GET of the
  header on a fallback path, quarantine adds one DELETE). Connection errors, timeouts, 5xx and
  throttling are retried by botocore ("standard" mode: exponential backoff with jitter) up to
  max_attempts in total; a download whose body breaks mid-stream is retried the same number of times
  here. After that the call raises S3Unavailable: the caller keeps its obligation (its own journal)
  and retries later.
- Permanent errors: a missing bucket, refused credentials or permissions (NoSuchBucket,
  AccessDenied, InvalidAccessKeyId, SignatureDoesNotMatch, AllAccessDisabled, InvalidBucketName, any
  403) raise S3Misconfigured, a subclass of S3Unavailable: callers that back off on outages back off
  on these too, and its message names the S3 error code so that the operator can fix the
  configuration. A HEAD answer has no body: head()/entry_for() see a missing bucket as a missing
  object (None); a 403 is S3Misconfigured there too. Any other S3 error propagates as botocore's
  ClientError, unchanged.
- Conditional writes: upload() relies on the endpoint honouring If-None-Match: * (first writer
  wins). Not every S3 implementation does (some overwrite silently); probe_conditional_puts() checks
  it with two PUTs of a probe object. The daemon refuses to start when the probe says False, unless
  the operator set s3.allow_unconditional_puts = true.
- Durability: upload() returns "stored" once S3 acknowledged the PUT (S3 is durable on ack), or
  "exists" when an object is already at that key (IfNoneMatch="*" -> 412): objects are never
  overwritten, the first writer wins. Recording the obligation durably before upload() and dropping
  it afterwards is the caller's job (the daemon journals uploads in the disk tier's LMDB).
- Verification: upload refuses (CorruptBlock) a payload that does not match its header, checked on
  the exact bytes that are sent. download_into returns a length only if the object's header
  decodes, names the (namespace, key) asked for, the object's size is header + payload_len, the
  payload's xxh3 matches the header, and, when the caller passes expected_checksum/expected_length
  (what it learnt from a listing), the header carries exactly those. A payload that does not match
  its own header is corruption: the block is counted (quarantined_count) and logged, the bad object
  is deleted (conditionally on its ETag, so a good copy uploaded meanwhile survives) so that a
  healthy node can upload it again, and None is returned. A valid object that is not the version
  the caller expects (replaced since the listing) is not corruption: None, counted
  (replaced_count) and logged, the object is kept. A transfer that breaks or whose transport
  checksum fails is not corruption: it is retried, then S3Unavailable. On None or an exception the
  contents of dest are unspecified.
- Transport checksums: botocore's flexible checksums (a CRC32 of every body, ~1 GB/s in Python, so
  ~2 ms of CPU per 2 MiB each way) are off unless transport_checksums=True: the block header and
  payload carry their own xxh3 checksums, verified on every download (end to end, not just in
  transit); uploads are covered by TLS on https and by SigV4's payload SHA-256 on plain http; a
  body damaged anyway is caught by the next reader's xxh3 and quarantined.
- head()/list() trust the object's header (from metadata, verified by its header checksum and
  against the object key and size) but not the payload: only download_into verifies payloads.
- Credentials: never logged, never in repr(S3Config) or exception messages from this module. The
  botocore/boto3/urllib3/s3transfer loggers are set to WARNING unless the operator configured a level
  for them (their DEBUG output carries request headers and signatures).
- Restart: no local state; the quarantine and replaced counters start at 0, and list()
  re-discovers what the bucket holds.
- No network I/O in __init__ unless create_bucket=True; the bucket must otherwise exist.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import logging
import random
import re
import secrets
import struct
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import boto3
from botocore.config import Config
from botocore.exceptions import (BotoCoreError, ClientError, NoCredentialsError, ConnectionClosedError, FlexibleChecksumError,
                                 HTTPClientError, IncompleteReadError)
from botocore.exceptions import ConnectionError as BotoConnectionError

from .block import (FIXED_HEADER_BYTES, MAX_HEADER_BYTES, BlockHeader, BlockOrigin, CorruptBlock, checksum,
                    decode_header)

log = logging.getLogger("kvtier.s3")

METADATA_HEADER = "kvtier-header"   # x-amz-meta-kvtier-header: base64(BlockHeader.encode())
# With a cluster key (the daemon's, docs/s3-format.md "MACs"): lowercase hex of the block's MAC and
# of the header's MAC. This tier only carries them (upload's `sign`, download_into's `metadata`,
# S3Entry.metadata); the daemon computes and checks them.
METADATA_MAC = "kvtier-mac"
METADATA_HEADER_MAC = "kvtier-header-mac"
NS_DIGEST_HEX = 32                  # 128 bits of sha256(namespace)
# AWS S3 refuses (400 MetadataTooLarge) user metadata over 2 KB: the UTF-8 bytes of every key and value
# (counted here with their "x-amz-meta-" prefix, to be safe). A version 2 header's token ids make it
# long: header_fits_metadata says whether one still fits with both MACs beside it.
METADATA_LIMIT_BYTES = 2048
_MAC_METADATA_BYTES = sum(len("x-amz-meta-" + name) + 64 for name in (METADATA_MAC, METADATA_HEADER_MAC))
_HEADER_LEN = struct.Struct("<H")   # header_len at offset 6 of a BlockHeader
_HEADER_LEN_OFFSET = 6
_LIST_PAGE = 1000                   # S3's maximum keys per ListObjectsV2 page
_QUIET_LOGGERS = ("botocore", "boto3", "urllib3", "s3transfer")
_TRANSIENT_CODES = {"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "RequestTimeTooSkewed",
                    "ServiceUnavailable", "InternalError", "ConditionalRequestConflict",
                    "RequestLimitExceeded", "TooManyRequestsException"}
_NOT_FOUND_CODES = {"NoSuchKey", "404", "NotFound"}
# Wrong bucket, credentials or permissions: retrying cannot help until the operator fixes the config.
_MISCONFIGURED_CODES = {"NoSuchBucket", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch",
                        "AllAccessDisabled", "InvalidBucketName"}
_REFUSED_CODES = {"PreconditionFailed", "ConditionalRequestConflict"}  # a conditional PUT refused
_UNSUPPORTED_CODES = {"NotImplemented"}                                  # a header the store rejects
_PROBE_BODY = b"kvtier: does this endpoint honour If-None-Match: * on PUT?\n"
_TOO_BIG = "payload does not fit dest"   # a miss, not corruption
_REPLACED = "not the expected version"   # a valid object, but not the one the caller listed


class S3Unavailable(Exception):
    """S3 could not be reached or kept failing (connection error, timeout, 5xx, throttling) after the
    configured retries. Nothing was lost: keep the obligation and retry later."""


class S3Misconfigured(S3Unavailable):
    """S3 refused the request permanently: missing or invalid bucket, unknown key id, bad signature,
    access denied (any 403). Retrying cannot help until the configuration is fixed; it subclasses
    S3Unavailable so that callers backing off on outages back off on this too. The message names the
    S3 error code, never a credential."""


@dataclasses.dataclass(frozen=True, slots=True)
class S3Config:
    endpoint_url: str | None            # None: AWS's regional endpoint
    bucket: str
    prefix: str = "kvtier"              # no leading/trailing '/'; may contain inner '/'
    region: str | None = None           # None: the standard AWS chain (AWS_DEFAULT_REGION, config file)
    access_key_id: str | None = None    # None (both): the standard AWS credential chain / environment
    secret_access_key: str | None = None
    max_concurrency: int = 8            # pooled HTTP connections; threads for list()'s HEADs
    connect_timeout_s: float = 2.0
    read_timeout_s: float = 10.0        # per socket read/write, not per request
    max_attempts: int = 3               # total attempts per request, first one included
    addressing_style: str = "auto"      # "auto" | "path" | "virtual"
    create_bucket: bool = False         # create the bucket in __init__ if it is missing
    transport_checksums: bool = False   # also send/validate botocore's CRC32 (redundant: see the contract)

    def __post_init__(self):
        if not self.bucket:
            raise ValueError("bucket must be set")
        if not self.prefix or self.prefix.startswith("/") or self.prefix.endswith("/") or "//" in self.prefix:
            raise ValueError(f"prefix must be non-empty with no leading, trailing or double '/': {self.prefix!r}")
        if (self.access_key_id is None) != (self.secret_access_key is None):
            raise ValueError("set both access_key_id and secret_access_key, or neither")
        if self.max_concurrency < 1 or self.max_attempts < 1:
            raise ValueError("max_concurrency and max_attempts must be >= 1")
        if self.connect_timeout_s <= 0 or self.read_timeout_s <= 0:
            raise ValueError("timeouts must be > 0")
        if self.addressing_style not in ("auto", "path", "virtual"):
            raise ValueError(f"addressing_style must be auto, path or virtual: {self.addressing_style!r}")

    def __repr__(self) -> str:
        hidden = {"secret_access_key": None if self.secret_access_key is None else "'***'",
                  "access_key_id": None if self.access_key_id is None else f"'***{self.access_key_id[-4:]}'"}
        fields = [f"{f.name}={hidden[f.name] if f.name in hidden else repr(getattr(self, f.name))}"
                  for f in dataclasses.fields(self)]
        return f"S3Config({', '.join(fields)})"

    __str__ = __repr__


@dataclasses.dataclass(frozen=True, slots=True)
class S3Entry:
    namespace: str
    key: bytes
    parent: bytes
    length: int            # payload bytes
    checksum: int          # xxh3-64 of the payload (from the header; verified only on download)
    created_unix_ms: int
    object_key: str
    # The exact header bytes the metadata carried, and the object's user metadata (keys lowercase,
    # without x-amz-meta-): what a caller authenticates the entry with. Not part of equality.
    header: bytes = dataclasses.field(default=b"", compare=False, repr=False)
    metadata: dict = dataclasses.field(default_factory=dict, compare=False, repr=False)
    # Router metadata from the header (format version 2; docs/block-format.md): packed token ids, origin.
    token_ids: bytes = dataclasses.field(default=b"", repr=False)
    origin: BlockOrigin | None = None


def header_fits_metadata(header: BlockHeader) -> bool:
    """Whether x-amz-meta-kvtier-header (base64 of header.encode()), with room for both MACs, stays
    within METADATA_LIMIT_BYTES. Every header without token ids fits (at most 1,012 bytes)."""
    encoded = 4 * -(-header.encoded_len // 3)
    return len("x-amz-meta-" + METADATA_HEADER) + encoded + _MAC_METADATA_BYTES <= METADATA_LIMIT_BYTES


class S3Tier:
    """Block objects in one S3 bucket. See the module docstring for the contract.

    Thread-safety: all methods from any thread concurrently (one shared botocore client), close() alone.
    Durability: upload returns after S3 acknowledged.
    Credentials: never logged; repr(S3Config) hides the secret.
    Restart: no local state; counters start at 0.
    """

    def __init__(self, cfg: S3Config):
        self.cfg = cfg
        self._prefix = cfg.prefix
        self._key_pattern = re.compile(
            re.escape(cfg.prefix) + rf"/([0-9a-f]{{2}})/([0-9a-f]{{2}})/([0-9a-f]{{{NS_DIGEST_HEX}}})/"
            r"((?:[0-9a-f]{2}){1,32})$")
        _quiet_sdk_loggers()
        session = boto3.session.Session()  # private session: the default one is shared and not thread-safe
        common = dict(region_name=cfg.region, endpoint_url=cfg.endpoint_url,
                      aws_access_key_id=cfg.access_key_id, aws_secret_access_key=cfg.secret_access_key)
        checksums = "when_supported" if cfg.transport_checksums else "when_required"
        self._client = session.client("s3", config=Config(
            connect_timeout=cfg.connect_timeout_s, read_timeout=cfg.read_timeout_s,
            retries={"total_max_attempts": cfg.max_attempts, "mode": "standard"},
            max_pool_connections=cfg.max_concurrency, s3={"addressing_style": cfg.addressing_style},
            request_checksum_calculation=checksums, response_checksum_validation=checksums,
            tcp_keepalive=True), **common)
        # reachable(): one attempt, short timeouts, its own pool so that busy uploads do not delay it.
        probe_timeout = min(1.0, cfg.connect_timeout_s, cfg.read_timeout_s)
        self._probe = session.client("s3", config=Config(
            connect_timeout=probe_timeout, read_timeout=probe_timeout,
            retries={"total_max_attempts": 1, "mode": "standard"}, max_pool_connections=1,
            s3={"addressing_style": cfg.addressing_style}), **common)
        del session, common  # nothing below may touch the (non-thread-safe) session again
        self._pool = ThreadPoolExecutor(cfg.max_concurrency, thread_name_prefix="kvtier-s3")
        self._counts_lock = threading.Lock()
        self._quarantined = 0
        self._replaced = 0
        self._closed = False
        if cfg.create_bucket:
            self._create_bucket()
        log.info("S3 tier: %s", cfg)

    # ------------------------------------------------------------------ keys

    def object_key(self, namespace: str, key: bytes) -> str:
        """f"{prefix}/{h[:2]}/{h[2:4]}/{ns_digest}/{key.hex()}"; see docs/s3-format.md."""
        ns = namespace.encode()
        key = bytes(key)
        if not 1 <= len(key) <= 32 or not 1 <= len(ns) <= 128:
            raise ValueError("key must be 1..32 bytes and namespace 1..128 UTF-8 bytes")
        h = hashlib.sha256(ns + b"\0" + key).hexdigest()
        return f"{self._prefix}/{h[:2]}/{h[2:4]}/{_ns_digest(namespace)}/{key.hex()}"

    # ------------------------------------------------------------------ counters

    def quarantined_count(self) -> int:
        """Objects this instance found corrupt (payload or header not matching) and quarantined."""
        with self._counts_lock:
            return self._quarantined

    def replaced_count(self) -> int:
        """Valid objects download_into refused because they were not the version the caller expected."""
        with self._counts_lock:
            return self._replaced

    # ------------------------------------------------------------------ object I/O

    def upload(self, header: BlockHeader, payload, sign=None) -> str:
        """PUT the block if absent: "stored", or "exists" if an object is already at its key.

        payload may be longer than header.payload_len (an arena slot): only payload_len bytes are sent.
        sign(encoded_header, payload_view) -> {name: value}: more user metadata (the daemon's MACs),
        computed on the exact bytes that are sent, after their checksum was verified; it may not
        replace kvtier-header. Raises CorruptBlock (before any I/O) if the bytes to send do not match
        the header, ValueError for a short payload, S3Unavailable after retries.
        """
        self._check_open()
        view = _byte_view(payload)
        length = header.payload_len
        if len(view) < length:
            raise ValueError(f"payload view has {len(view)} bytes, header says {length}")
        if not header_fits_metadata(header):
            raise ValueError(f"a header of {header.encoded_len} bytes does not fit in S3's user metadata "
                             "(drop its token ids: header_fits_metadata)")
        encoded = header.encode()  # asserts decode_header(encoded) == header
        # bytearray, not bytes: botocore sends it as is (bytes get wrapped in a file object, which adds an
        # `Expect: 100-continue` round trip per PUT). Grown by += rather than preallocated: a zeroed
        # bytearray(n) of this size is fresh mmap'ed memory whose page faults cost more than the copy.
        body = bytearray(encoded)
        body += view[:length]
        # Checked on the copy that is sent, so a caller buffer changing under us cannot slip through.
        if checksum(memoryview(body)[len(encoded):]) != header.payload_checksum:
            raise CorruptBlock(f"payload of {header.namespace}/{bytes(header.key).hex()} does not match "
                               "its header checksum")
        okey = self.object_key(header.namespace, header.key)
        metadata = {METADATA_HEADER: base64.b64encode(encoded).decode("ascii")}
        if sign is not None:
            extra = sign(encoded, memoryview(body)[len(encoded):])
            if METADATA_HEADER in extra:
                raise ValueError(f"sign() may not replace {METADATA_HEADER}")
            metadata.update(extra)
        for attempt in range(self.cfg.max_attempts):
            try:
                self._client.put_object(Bucket=self.cfg.bucket, Key=okey, Body=body, IfNoneMatch="*",
                                        Metadata=metadata, ContentType="application/octet-stream")
                return "stored"
            except ClientError as exc:
                code = _error_code(exc)
                if code == "PreconditionFailed" or _status(exc) == 412:
                    return "exists"
                if code == "ConditionalRequestConflict" and attempt + 1 < self.cfg.max_attempts:
                    # Another conditional write of this key is in flight (real S3, 409): back off, retry.
                    _backoff(attempt)
                    continue
                raise _translate(exc, "upload", okey) from exc
            except BotoCoreError as exc:
                raise _translate(exc, "upload", okey) from exc
        raise AssertionError("unreachable")

    def download_into(self, namespace: str, key: bytes, dest, expected_checksum: int | None = None,
                      expected_length: int | None = None, metadata: dict | None = None) -> int | None:
        """GETs and verifies the block into dest[:payload_len]; its length, or None if absent/corrupt.

        expected_checksum/expected_length: the payload xxh3 and length the caller knows (from a
        listing or head()); an object whose header carries others is a different, valid version (it
        replaced the one listed): None, counted in replaced_count(), logged, object kept, payload not
        read. None without quarantine also when the payload does not fit dest (the object is fine;
        logged). metadata: a dict that receives the user metadata of the GET whose bytes landed in
        dest (keys lowercase, without x-amz-meta-), e.g. to check the daemon's MAC on them; it is
        filled only when a length is returned. Raises S3Unavailable after retries, S3Misconfigured on
        a permanent refusal.
        """
        self._check_open()
        dest = _byte_view(dest)
        if dest.readonly:
            raise ValueError("dest must be writable")
        key = bytes(key)
        okey = self.object_key(namespace, key)
        for attempt in range(self.cfg.max_attempts):
            try:
                return self._download_once(namespace, key, okey, dest, (expected_checksum, expected_length),
                                           metadata)
            except _BrokenTransfer as exc:
                if attempt + 1 >= self.cfg.max_attempts:
                    raise S3Unavailable(f"download {okey}: {exc}") from exc.__cause__
                log.info("download %s: %s; retrying", okey, exc)
                _backoff(attempt)
        raise AssertionError("unreachable")

    def head(self, namespace: str, key: bytes) -> tuple[int, int] | None:
        """(payload_len, payload_checksum) of the stored block, or None if absent (or its header is bad).

        From the object's metadata when it verifies; otherwise from a ranged GET of the header. A header
        that is corrupt or names another block is quarantined like a failed download. The payload
        itself is not checked.
        """
        self._check_open()
        key = bytes(key)
        okey = self.object_key(namespace, key)
        try:
            reply = self._client.head_object(Bucket=self.cfg.bucket, Key=okey)
        except ClientError as exc:
            if _is_not_found(exc):
                return None
            raise _translate(exc, "head", okey) from exc
        except BotoCoreError as exc:
            raise _translate(exc, "head", okey) from exc
        header = self._header_from_metadata(okey, reply)
        if header is None:
            header = self._header_by_range(namespace, key, okey, reply)
            if header is None:
                return None
        return header.payload_len, header.payload_checksum

    def list(self, namespace: str | None = None, start_after: str = "",
             limit: int = 1000) -> tuple[list[S3Entry], str]:
        """Up to `limit` blocks in object-key order after `start_after`; returns (entries, token).

        Pass the token back as start_after for the next page; "" means the listing is complete.
        S3 listings carry no user metadata, so each object found costs one HEAD (run concurrently,
        max_concurrency at a time); with a namespace, keys of other namespaces are skipped by their
        ns_digest before any HEAD. Objects that are not ours, vanished meanwhile or whose metadata
        does not verify are skipped (logged), never quarantined here.
        """
        self._check_open()
        if limit <= 0:
            raise ValueError("limit must be > 0")
        want_digest = None if namespace is None else _ns_digest(namespace)
        entries: list[S3Entry] = []
        after = start_after
        while True:
            items, continuation = self._list_page(after, want_digest)
            taken = items[:limit - len(entries)]
            found = self._pool.map(lambda item: self._entry_for(*item), taken)
            entries += [entry for entry in found if entry is not None and
                        (namespace is None or entry.namespace == namespace)]
            if len(taken) < len(items):
                return entries, taken[-1][0]      # stopped inside this page
            if not continuation:
                return entries, ""                # the listing is complete
            after = continuation
            if len(entries) >= limit:
                return entries, after

    def list_keys(self, start_after: str = "") -> tuple[list[tuple[str, int]], str]:
        """One LIST page of our object keys after start_after: ([(object_key, size)], token); no HEADs.
        Pair with parse_object_key to skip known blocks and entry_for to HEAD the rest."""
        self._check_open()
        return self._list_page(start_after, None)

    def entry_for(self, object_key: str, size: int) -> S3Entry | None:
        """One HEAD: the block behind an object key from list_keys (None if vanished or not verifiable)."""
        self._check_open()
        return self._entry_for(object_key, size)

    def parse_object_key(self, object_key: str) -> tuple[str, bytes] | None:
        """(namespace digest, key) of one of our object keys; None for a foreign object."""
        match = self._key_pattern.match(object_key)
        return None if match is None else (match.group(3), bytes.fromhex(match.group(4)))

    @staticmethod
    def namespace_digest(namespace: str) -> str:
        return _ns_digest(namespace)

    def delete(self, namespace: str, key: bytes) -> None:
        """Deletes the block's object; absent is not an error."""
        self._check_open()
        okey = self.object_key(namespace, key)
        try:
            self._client.delete_object(Bucket=self.cfg.bucket, Key=okey)
        except ClientError as exc:
            if _is_not_found(exc):
                return
            raise _translate(exc, "delete", okey) from exc
        except BotoCoreError as exc:
            raise _translate(exc, "delete", okey) from exc

    def probe_conditional_puts(self) -> bool:
        """True iff the endpoint honours If-None-Match: * on PUT, which upload()'s first-writer-wins rule
        relies on. PUTs a small object under <prefix>/_probe/<random hex> twice with IfNoneMatch="*":
        True iff the second PUT is refused (412 PreconditionFailed or 409 ConditionalRequestConflict).
        A store that rejects the header (501) or overwrites gives False. The probe object is deleted
        afterwards (best effort; it is outside the block key pattern, so list() never sees it).
        Raises S3Unavailable if S3 cannot be reached, S3Misconfigured on a permanent refusal.
        """
        self._check_open()
        okey = f"{self._prefix}/_probe/{secrets.token_hex(16)}"
        try:
            # A first PUT refused too (its retry after a timeout found the object it had landed) says
            # nothing yet: the second PUT decides.
            if self._probe_put(okey) == "unsupported":
                return False
            honoured = self._probe_put(okey) == "refused"
        finally:
            self._delete_quietly(okey)
        log.info("S3 endpoint %s If-None-Match: * on PUT", "honours" if honoured else "does NOT honour")
        return honoured

    def _probe_put(self, okey: str) -> str:
        """One conditional PUT of the probe object: "stored", "refused" or "unsupported"."""
        try:
            self._client.put_object(Bucket=self.cfg.bucket, Key=okey, Body=bytearray(_PROBE_BODY),
                                    IfNoneMatch="*", ContentType="application/octet-stream")
            return "stored"
        except ClientError as exc:
            code, status = _error_code(exc), _status(exc)
            if code in _REFUSED_CODES or status == 412:
                return "refused"
            if code in _UNSUPPORTED_CODES or status == 501:
                return "unsupported"
            raise _translate(exc, "probe", okey) from exc
        except BotoCoreError as exc:
            raise _translate(exc, "probe", okey) from exc

    def _delete_quietly(self, okey: str) -> None:
        try:
            self._client.delete_object(Bucket=self.cfg.bucket, Key=okey)
        except (ClientError, BotoCoreError) as exc:
            log.warning("could not delete probe object %s: %s", okey, type(exc).__name__)

    def reachable(self) -> bool:
        """One HEAD bucket with ~1 s timeouts and no retry: True if S3 answers and the bucket is usable."""
        self._check_open()
        try:
            self._probe.head_bucket(Bucket=self.cfg.bucket)
            return True
        except (ClientError, BotoCoreError) as exc:
            log.debug("S3 not reachable: %s", type(exc).__name__)
            return False

    def close(self) -> None:
        """Closes the clients and the HEAD pool. No other call may be in flight."""
        if self._closed:
            return
        self._closed = True
        self._pool.shutdown(wait=True)
        self._client.close()
        self._probe.close()

    def __enter__(self) -> S3Tier:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ internals

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("S3Tier is closed")

    def _create_bucket(self) -> None:
        kwargs = {"Bucket": self.cfg.bucket}
        region = self._client.meta.region_name
        if region and region != "us-east-1":
            kwargs["CreateBucketConfiguration"] = {"LocationConstraint": region}
        try:
            self._client.create_bucket(**kwargs)
            log.info("created bucket %s", self.cfg.bucket)
        except ClientError as exc:
            if _error_code(exc) not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                raise _translate(exc, "create bucket", self.cfg.bucket) from exc
        except BotoCoreError as exc:
            raise _translate(exc, "create bucket", self.cfg.bucket) from exc

    def _download_once(self, namespace: str, key: bytes, okey: str, dest: memoryview,
                       expected: tuple[int | None, int | None], metadata: dict | None = None) -> int | None:
        try:
            reply = self._client.get_object(Bucket=self.cfg.bucket, Key=okey)
        except ClientError as exc:
            if _is_not_found(exc):
                return None
            raise _translate(exc, "download", okey) from exc
        except BotoCoreError as exc:
            raise _translate(exc, "download", okey) from exc
        body = reply["Body"]
        etag = reply.get("ETag")
        try:
            header, problem = self._read_object(body, namespace, key, int(reply.get("ContentLength", -1)), dest,
                                                expected)
        except (HTTPClientError, IncompleteReadError, FlexibleChecksumError, BotoConnectionError) as exc:
            raise _BrokenTransfer(f"{type(exc).__name__} while reading the body") from exc
        finally:
            # A fully read body has already released its connection to the pool; a partly read one
            # is closed here instead of being reused.
            body.close()
        if problem is None and checksum(dest[:header.payload_len]) != header.payload_checksum:
            problem = "payload checksum mismatch"
        if problem == _REPLACED:
            return self._replaced_version(okey, header, expected)
        if problem == _TOO_BIG:
            log.warning("download %s: payload of %d bytes does not fit dest of %d bytes; treated as a miss",
                        okey, header.payload_len, len(dest))
            return None
        if problem is not None:
            return self._reject(namespace, key, okey, etag, problem)
        if metadata is not None:
            metadata.clear()
            metadata.update(_user_metadata(reply))
        return header.payload_len

    @staticmethod
    def _read_object(body, namespace: str, key: bytes, total: int, dest: memoryview,
                     expected: tuple[int | None, int | None]) -> tuple[BlockHeader | None, str | None]:
        """Reads header, then payload into dest; (header, None) or (header or None, what is wrong).

        The payload is not read when the header already rules the object out (corrupt, _REPLACED,
        _TOO_BIG)."""
        if total < FIXED_HEADER_BYTES:
            return None, f"object of {total} bytes is too short"
        head = memoryview(bytearray(MAX_HEADER_BYTES))
        _read_exact(body, head[:FIXED_HEADER_BYTES])
        header_len = _HEADER_LEN.unpack_from(head, _HEADER_LEN_OFFSET)[0]
        if not FIXED_HEADER_BYTES <= header_len <= min(MAX_HEADER_BYTES, total):
            return None, f"bad header_len {header_len}"
        _read_exact(body, head[FIXED_HEADER_BYTES:header_len])
        try:
            header = decode_header(head[:header_len])
        except CorruptBlock as exc:
            return None, f"header: {exc}"
        if header.namespace != namespace or header.key != key:
            return header, f"header names {header.namespace!r}/{header.key.hex()}"
        if total != header_len + header.payload_len:
            return header, f"object has {total} bytes, header says {header_len} + {header.payload_len}"
        # After the corruption checks: an object that contradicts its own header is corrupt whatever
        # the caller expected; one that is self-consistent but not what the caller listed is not.
        expected_checksum, expected_length = expected
        if (expected_checksum is not None and header.payload_checksum != expected_checksum) or \
                (expected_length is not None and header.payload_len != expected_length):
            return header, _REPLACED
        if header.payload_len > len(dest):
            return header, _TOO_BIG
        # One read of the rest: urllib3's fastest path (its readinto is a read + copy anyway); botocore
        # checks it against Content-Length (and the CRC32 when transport_checksums is on).
        data = body.read()
        if len(data) != header.payload_len:
            raise _BrokenTransfer(f"payload of {len(data)} bytes, expected {header.payload_len}")
        dest[:header.payload_len] = data
        return header, None

    def _replaced_version(self, okey: str, header: BlockHeader, expected: tuple[int | None, int | None]) -> None:
        """A valid object that is not the version the caller expects: counted and logged, kept (it may
        be another writer's good block). Returns None."""
        with self._counts_lock:
            self._replaced += 1
        expected_checksum, expected_length = expected
        want = f"{'?' if expected_length is None else expected_length} bytes, xxh3 " + \
            ("?" if expected_checksum is None else f"{expected_checksum:016x}")
        log.warning("download %s: object holds %d bytes, xxh3 %016x, expected %s (replaced since it was listed?); "
                    "not served, object kept", okey, header.payload_len, header.payload_checksum, want)
        return None

    def _reject(self, namespace: str, key: bytes, okey: str, etag: str | None, reason: str) -> None:
        """Quarantines a corrupt object: counted and logged, deleted remotely if unchanged. Returns None."""
        with self._counts_lock:
            self._quarantined += 1
        deleted = "kept"
        kwargs = {"Bucket": self.cfg.bucket, "Key": okey}
        if etag:
            kwargs["IfMatch"] = etag   # never delete a good copy that replaced the bad one meanwhile
        try:
            try:
                self._client.delete_object(**kwargs)
            except ClientError as exc:
                if "IfMatch" not in kwargs or _status(exc) != 501:
                    raise
                # A store without conditional deletes: a good copy replacing a bad one within this
                # window is vanishingly unlikely, a bad object that stays forever is certain.
                self._client.delete_object(Bucket=self.cfg.bucket, Key=okey)
            deleted = "deleted"
        except ClientError as exc:
            if _error_code(exc) == "PreconditionFailed" or _status(exc) == 412:
                deleted = "replaced meanwhile, kept"
            elif _is_not_found(exc):
                deleted = "already gone"
            else:
                deleted = f"not deleted ({_error_code(exc)})"
        except BotoCoreError as exc:
            deleted = f"not deleted ({type(exc).__name__})"
        log.warning("quarantined S3 object %s (%s/%s): %s; object %s", okey, namespace, key.hex(), reason,
                    deleted)
        return None

    def _header_from_metadata(self, okey: str, reply: dict) -> BlockHeader | None:
        """The header recorded in x-amz-meta-kvtier-header if it verifies against key and size."""
        found = self._encoded_header_from_metadata(okey, reply)
        return None if found is None else found[0]

    def _encoded_header_from_metadata(self, okey: str, reply: dict) -> tuple[BlockHeader, bytes] | None:
        """(header, its exact bytes) from x-amz-meta-kvtier-header, if they verify against key and size."""
        text = _user_metadata(reply).get(METADATA_HEADER)
        if not text:
            return None
        try:
            encoded = base64.b64decode(text, validate=True)
            header = decode_header(encoded)
        except (ValueError, CorruptBlock):
            return None
        size = int(reply.get("ContentLength", -1))
        if len(encoded) != _HEADER_LEN.unpack_from(encoded, _HEADER_LEN_OFFSET)[0] or \
                size != len(encoded) + header.payload_len or \
                self.object_key(header.namespace, header.key) != okey:
            return None
        return header, encoded

    def _header_by_range(self, namespace: str, key: bytes, okey: str, head_reply: dict) -> BlockHeader | None:
        """Fallback for objects without usable metadata: GET the first MAX_HEADER_BYTES and decode."""
        etag = head_reply.get("ETag")
        size = int(head_reply.get("ContentLength", -1))
        try:
            reply = self._client.get_object(Bucket=self.cfg.bucket, Key=okey,
                                            Range=f"bytes=0-{MAX_HEADER_BYTES - 1}")
            data = reply["Body"].read()
            etag = reply.get("ETag", etag)
        except ClientError as exc:
            if _is_not_found(exc):
                return None
            if _error_code(exc) == "InvalidRange":   # a 0-byte object
                return self._reject(namespace, key, okey, etag, "empty object")
            raise _translate(exc, "head", okey) from exc
        except BotoCoreError as exc:
            raise _translate(exc, "head", okey) from exc
        try:
            header = decode_header(data)
        except CorruptBlock as exc:
            return self._reject(namespace, key, okey, etag, f"header: {exc}")
        header_len = _HEADER_LEN.unpack_from(data, _HEADER_LEN_OFFSET)[0]
        if header.namespace != namespace or header.key != key:
            return self._reject(namespace, key, okey, etag, f"header names {header.namespace!r}/{header.key.hex()}")
        if size != header_len + header.payload_len:
            return self._reject(namespace, key, okey, etag,
                                f"object has {size} bytes, header says {header_len} + {header.payload_len}")
        return header

    def _list_page(self, after: str, want_digest: str | None) -> tuple[list[tuple[str, int]], str]:
        """One ListObjectsV2 page after `after`: (our keys that match, continuation) where continuation
        is "" at the end of the listing, else the last key S3 returned in this page."""
        kwargs = {"Bucket": self.cfg.bucket, "Prefix": self._prefix + "/", "MaxKeys": _LIST_PAGE}
        if after:
            kwargs["StartAfter"] = after
        try:
            reply = self._client.list_objects_v2(**kwargs)
        except ClientError as exc:
            raise _translate(exc, "list", self._prefix) from exc
        except BotoCoreError as exc:
            raise _translate(exc, "list", self._prefix) from exc
        contents = reply.get("Contents") or []
        items = []
        for obj in contents:
            match = self._key_pattern.match(obj["Key"])
            if match is None:
                log.debug("list: skipping foreign object %s", obj["Key"])
                continue
            if want_digest is not None and match.group(3) != want_digest:
                continue
            items.append((obj["Key"], int(obj.get("Size", -1))))
        more = contents[-1]["Key"] if contents and reply.get("IsTruncated") else ""
        return items, more

    def _entry_for(self, okey: str, size: int) -> S3Entry | None:
        try:
            reply = self._client.head_object(Bucket=self.cfg.bucket, Key=okey)
        except ClientError as exc:
            if _is_not_found(exc):
                return None  # deleted since the listing
            raise _translate(exc, "list", okey) from exc
        except BotoCoreError as exc:
            raise _translate(exc, "list", okey) from exc
        found = self._encoded_header_from_metadata(okey, reply)
        if found is None:
            log.warning("list: %s has no valid %s metadata; skipped", okey, METADATA_HEADER)
            return None
        header, encoded = found
        return S3Entry(header.namespace, header.key, header.parent, header.payload_len,
                       header.payload_checksum, header.created_unix_ms, okey, encoded, _user_metadata(reply),
                       header.token_ids, header.origin)


class _BrokenTransfer(Exception):
    """A body transfer broke off or failed its transport checksum: retry, not corruption."""


def _quiet_sdk_loggers() -> None:
    """SDK DEBUG logs carry headers and signatures: keep them at WARNING unless configured explicitly."""
    for name in _QUIET_LOGGERS:
        logger = logging.getLogger(name)
        if logger.level == logging.NOTSET:
            logger.setLevel(logging.WARNING)


def _read_exact(body, view: memoryview) -> None:
    got = 0
    while got < len(view):
        n = body.readinto(view[got:])
        if not n:
            raise _BrokenTransfer(f"body ended after {got} of {len(view)} bytes")
        got += n


def _backoff(attempt: int) -> None:
    time.sleep(random.uniform(0, min(2.0, 0.05 * 2 ** attempt)))  # full jitter


def _user_metadata(reply: dict) -> dict[str, str]:
    """An answer's user metadata, keys lowercased (boto3 strips x-amz-meta-; stores differ on case)."""
    return {str(k).lower(): str(v) for k, v in (reply.get("Metadata") or {}).items()}


def _error_code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def _status(exc: ClientError) -> int:
    return int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)


def _is_not_found(exc: ClientError) -> bool:
    return _error_code(exc) in _NOT_FOUND_CODES or (_status(exc) == 404 and _error_code(exc) != "NoSuchBucket")


def _translate(exc: Exception, what: str, target: str) -> Exception:
    """S3Unavailable for outages (after botocore's retries), S3Misconfigured for a wrong bucket,
    credentials or permissions; other errors are returned unchanged."""
    if isinstance(exc, (BotoConnectionError, HTTPClientError, ConnectionClosedError, IncompleteReadError,
                        FlexibleChecksumError)):
        return S3Unavailable(f"{what} {target}: {type(exc).__name__}: {exc}")
    if isinstance(exc, ClientError):
        status, code = _status(exc), _error_code(exc)
        if code in _MISCONFIGURED_CODES or status == 403:
            # Only the code and status: the SDK's message may quote the access key id.
            return S3Misconfigured(f"{what} {target}: HTTP {status} {code}: check the S3 endpoint, bucket, "
                                   "credentials and permissions")
        if status >= 500 or status == 429 or code in _TRANSIENT_CODES:
            return S3Unavailable(f"{what} {target}: HTTP {status} {code}")
    if isinstance(exc, NoCredentialsError):
        return S3Misconfigured(f"{what} {target}: no S3 credentials found (set s3.access_key_id and "
                               "s3.secret_access_key_file, or the standard AWS chain)")
    return exc


def _ns_digest(namespace: str) -> str:
    return hashlib.sha256(namespace.encode()).hexdigest()[:NS_DIGEST_HEX]


def _byte_view(buffer) -> memoryview:
    view = memoryview(buffer)
    if not view.c_contiguous:
        raise ValueError("buffers must be contiguous")
    return view if view.format == "B" and view.ndim == 1 else view.cast("B")

