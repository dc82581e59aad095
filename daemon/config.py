"""kvtierd configuration: TOML with embedded defaults, validated up front with clear errors.

Every bound the daemon enforces lives here, so an operator can see and change it in one place.
"""

from __future__ import annotations

import dataclasses
import os
import re
import stat
import tomllib
from typing import Any

_UNITS = {"": 1, "b": 1, "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40,
          "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}


class ConfigError(ValueError):
    """The config is invalid; the message names the key and what is expected."""


def parse_size(value: Any, key: str) -> int:
    if isinstance(value, bool):
        raise ConfigError(f"{key}: expected a size like 512MiB, got {value!r}")
    if isinstance(value, int):
        size = value
    else:
        match = re.fullmatch(r"\s*(\d+)\s*([a-zA-Z]*)\s*", str(value))
        if not match or match.group(2).lower() not in _UNITS:
            raise ConfigError(f"{key}: expected a size like 512MiB or 8GiB, got {value!r}")
        size = int(match.group(1)) * _UNITS[match.group(2).lower()]
    if size < 0:
        raise ConfigError(f"{key}: must not be negative")
    return size


@dataclasses.dataclass
class ServerConfig:
    socket: str = "kvtier-data/kvtierd.sock"
    socket_mode: int = 0o660
    tcp: str = ""               # "host:port"; off by default
    tokens_file: str = ""       # required with tcp: [[token]] digests bound to tenants (docs/security.md)
    tls_cert: str = ""          # required with tcp: the token must never travel in clear
    tls_key: str = ""
    max_message_bytes: int = 4 << 20
    # Local identity (docs/security.md): a Unix-socket client is known by its uid and gid (SO_PEERCRED).
    # These uids and gids are administrators; empty lists: the daemon's own uid (and root) only.
    admin_uids: list = dataclasses.field(default_factory=list)
    admin_gids: list = dataclasses.field(default_factory=list)
    max_sessions: int = 1024    # local sessions open at once (each holds one socket in the daemon)
    # Connections, each one descriptor of kvtierd's (docs/security.md, "Descriptors"): to the session
    # socket per local uid (open sessions and handshakes), to the shared socket (health and reflection
    # only), to the administrators' own gRPC socket, and to the TCP listener. A tenant's own socket has
    # [[tenant]] max_connections. Past a bound a connection is closed at once, before any work.
    max_connections_per_uid: int = 64
    max_shared_connections: int = 64
    max_admin_connections: int = 256
    max_tcp_connections: int = 256


@dataclasses.dataclass
class CpuConfig:
    capacity: int = 1 << 30
    slot_bytes: int = 2 << 20
    policy: str = "lru"


@dataclasses.dataclass
class DiskConfig:
    enabled: bool = True
    capacity: int = 8 << 30
    segment_bytes: int = 256 << 20
    align: int = 4096
    o_direct: bool = False
    queue_blocks: int = 1024    # bound on the write-through backlog
    batch_blocks: int = 64      # blocks per fdatasync
    readers: int = 4            # threads serving disk reads
    durable_wait_ms: int = 30_000  # a wait_durable commit fails UNAVAILABLE after this long (disk stuck)


@dataclasses.dataclass
class GpuConfig:
    enabled: bool = False
    device: str = "cuda:0"          # "cpu" runs the same code path without a GPU (tests)
    capacity: int = 0
    policy: str = "lru"


@dataclasses.dataclass
class S3TierConfig:
    enabled: bool = False
    write_through: bool = True      # false: read-only (serve what other nodes uploaded, upload nothing)
    endpoint_url: str = ""          # empty: AWS; else MinIO/Ceph RGW/... e.g. "http://minio:9000"
    bucket: str = ""
    prefix: str = "kvtier"
    region: str = ""
    access_key_id: str = ""         # empty: the standard AWS chain (env, profile, instance role)
    secret_access_key_file: str = ""  # the secret is read from a file, never from this config
    max_concurrency: int = 8        # uploads/downloads in flight
    connect_timeout_s: float = 2.0
    read_timeout_s: float = 10.0
    list_interval_s: float = 60.0   # how often to list the bucket for blocks other nodes uploaded
    max_catalog_blocks: int = 2_000_000  # listing adopts others' blocks only while the catalog is smaller
    allow_unconditional_puts: bool = False  # start even if the endpoint ignores If-None-Match (no cross-node dedup)


@dataclasses.dataclass
class LimitsConfig:
    max_keys_per_request: int = 4096
    max_key_bytes: int = 32
    max_namespace_bytes: int = 128
    max_namespaces: int = 4096
    max_attributes: int = 32
    max_page_size: int = 1000
    default_lease_ms: int = 30_000
    max_lease_ms: int = 600_000
    max_wait_ms: int = 30_000
    max_active_leases: int = 65536
    max_watchers: int = 64      # Watch streams of administrators and tenants without a [[tenant]] table, together
    # A tenant principal with no [[tenant]] table (a TCP token's tenant named in no table) gets these
    # small bounds of its own, never the node-wide ones (docs/security.md).
    untabled_tenant_max_watchers: int = 2
    untabled_tenant_max_namespaces: int = 4
    untabled_tenant_max_leases: int = 64   # read leases (Get) open at once
    untabled_tenant_max_pulls: int = 1     # peer pulls in flight
    max_ttl_s: float = 604_800.0   # longest retention TTL pin a client may ask for (7 days)
    put_chunk_bytes: int = 1 << 20


@dataclasses.dataclass
class EventsConfig:
    ring_size: int = 65536
    watcher_queue: int = 8192   # a watcher this far behind is disconnected (RESOURCE_EXHAUSTED)
    # Block events in vLLM's KV-event wire format over ZMQ (docs/kv-events.md); empty = off. They name
    # every namespace and block hash on the node, to any subscriber, without authentication: prefer
    # "ipc://<path>" (a socket file of mode ipc_mode, in a directory that must exist). A tcp:// endpoint
    # on an address other than loopback needs allow_remote = true.
    zmq_endpoint: str = ""      # e.g. "ipc://kvtier-data/kv-events.sock"
    zmq_replay_endpoint: str = ""  # ROUTER socket replaying batches from a sequence number (same rules)
    # Indexers that bind and wait for publishers to connect (llm-d's): the PUB socket also connects to
    # these, e.g. ["tcp://kv-indexer.llm-d.svc:5557"] (beyond loopback only with allow_remote = true).
    zmq_connect: list = dataclasses.field(default_factory=list)
    # The topic frame: a template of {worker}, {model}, {namespace}, {lora}. Without any placeholder it
    # is the earlier form "<zmq_topic>/<namespace>" (e.g. "kvtier").
    zmq_topic: str = "kv@{worker}@{model}"   # llm-d's kv@<pod>@<model>; Dynamo ignores the topic
    zmq_worker: str = ""        # {worker}: this node as routers name it (e.g. the pod name); "" = host name
    zmq_model: str = ""         # {model} for blocks whose engine named none ("": the namespace's "model")
    zmq_block_hashes: str = "int"  # "int": vLLM's 64-bit integers (routers); "bytes": the raw keys
    zmq_block_size: int = 0     # BlockStored.block_size for blocks whose engine named none
    # BlockStored/BlockRemoved.medium per tier: the routers' words (Dynamo: CPU_TIER1/CPU_PINNED = host).
    zmq_medium_gpu: str = "GPU"
    zmq_medium_cpu: str = "CPU_TIER1"
    zmq_medium_disk: str = "DISK"
    zmq_medium_s3: str = "EXTERNAL"
    ipc_mode: int = 0o600       # the ipc:// socket files' mode: who may connect and read every block hash
    # The ipc:// socket files' group (a numeric gid; -1: kvtierd's own). With [[tenant]] tables, group
    # bits in ipc_mode need it: a dedicated router group, never one the tenants' users are in.
    ipc_gid: int = -1
    allow_remote: bool = False  # true: a tcp:// endpoint may listen beyond loopback
    # With [[tenant]] tables a tcp:// endpoint (node-wide or a tenant's, loopback included: any local
    # user can connect) carries token ids of tenants' prompts to whoever connects: refused unless true.
    allow_tcp_with_tenants: bool = False

    TOPIC_FIELDS = ("worker", "model", "namespace", "lora")

    def endpoint_problem(self) -> str | None:
        """Why zmq_endpoint / zmq_replay_endpoint (or the other zmq_ keys) are refused, or None."""
        problem = self._endpoints_problem() or self._connect_problem()
        return problem or self._format_problem()

    def endpoint_shape_problem(self, where: str, endpoint: str) -> str | None:
        """Why the endpoint set by `where` cannot be bound ("" is off: None)."""
        if not endpoint:
            return None
        scheme, sep, rest = endpoint.partition("://")
        if not sep or scheme not in ("ipc", "tcp"):
            return f"{where} must be \"ipc://<path>\" or \"tcp://<host>:<port>\", got {endpoint!r}"
        if scheme == "ipc":
            if not rest or rest == "*" or rest.startswith("@") or rest.endswith("/") or "\0" in rest:
                return (f"{where}: {endpoint!r} needs a socket file path (no ipc://*, no abstract "
                        "@name: those have no file permissions, anyone on the host could connect)")
            if len(rest.encode()) > 107:
                return f"{where}: the ipc path {rest!r} is too long for a Unix socket (at most 107 bytes)"
            return None
        host, sep, port = rest.rpartition(":")
        if not sep or not port.isdigit() or int(port) > 65535 or not host:
            return f"{where} must be \"tcp://<host>:<port>\", got {endpoint!r}"
        if not self.allow_remote and not MetricsConfig.loopback(host):
            return (f"{where} = {endpoint!r} listens beyond loopback: whoever can reach it reads every "
                    "namespace name and block hash on this node, without authentication. Use an ipc:// "
                    "endpoint or tcp://127.0.0.1:<port>, or set events.allow_remote = true to accept that")
        return None

    def _connect_problem(self) -> str | None:
        for endpoint in self.zmq_connect:
            scheme, sep, rest = endpoint.partition("://")
            if scheme == "ipc" and sep and rest and not rest.startswith("@") and "\0" not in rest:
                continue
            host, colon, port = rest.rpartition(":")
            if scheme != "tcp" or not sep or not colon or not host or not port.isdigit() or int(port) > 65535:
                return f"events.zmq_connect: {endpoint!r} must be \"tcp://<host>:<port>\" or \"ipc://<path>\""
            if not self.allow_remote and not MetricsConfig.loopback(host):
                return (f"events.zmq_connect: {endpoint!r} is beyond loopback: every namespace name and block hash "
                        "on this node goes there. Set events.allow_remote = true to accept that")
        return None

    def _format_problem(self) -> str | None:
        import string  # noqa: PLC0415 - only here
        try:
            fields = [name for _, name, spec, conv in string.Formatter().parse(self.zmq_topic)
                      if name is not None and not spec and not conv]
            if len(fields) != sum(1 for _, name, _, _ in string.Formatter().parse(self.zmq_topic) if name is not None):
                raise ValueError("format specs and conversions are not allowed")
        except ValueError as exc:
            return f"events.zmq_topic {self.zmq_topic!r} is not a valid template: {exc}"
        unknown = [name for name in fields if name not in self.TOPIC_FIELDS]
        if unknown:
            return (f"events.zmq_topic {self.zmq_topic!r}: unknown placeholder {{{unknown[0]}}}; known: "
                    + ", ".join("{%s}" % name for name in self.TOPIC_FIELDS))
        if self.zmq_block_hashes not in ("int", "bytes"):
            return "events.zmq_block_hashes must be \"int\" or \"bytes\""
        if not 0 <= self.zmq_block_size <= 4096:
            return "events.zmq_block_size must be 0..4096"
        for key in ("zmq_medium_gpu", "zmq_medium_cpu", "zmq_medium_disk", "zmq_medium_s3"):
            if not 0 < len(getattr(self, key)) <= 64:
                return f"events.{key} must be 1..64 characters"
        return None

    def _endpoints_problem(self) -> str | None:
        for key in ("zmq_endpoint", "zmq_replay_endpoint"):
            problem = self.endpoint_shape_problem(f"events.{key}", getattr(self, key))
            if problem:
                return problem
        if self.zmq_endpoint and self.zmq_endpoint == self.zmq_replay_endpoint:
            return "events.zmq_replay_endpoint must differ from events.zmq_endpoint"
        return None


@dataclasses.dataclass
class PeersConfig:
    listen: str = ""            # "host:port" serving the peer API (mutual TLS only); empty = serve no peers
    addresses: list = dataclasses.field(default_factory=list)  # other nodes' peers.listen addresses
    node_id: str = ""           # empty: the host name
    tls_cert: str = ""          # this node's certificate, signed by tls_ca (server and client side)
    tls_key: str = ""
    tls_ca: str = ""            # the CA every peer's certificate must chain to
    transport: str = "auto"     # "auto": NIXL when it loads, else streamed gRPC; or "nixl", "grpc"
    timeout_s: float = 2.0      # bound on each peer call and each transfer
    max_fanout: int = 4         # peers asked at once on a miss
    max_blocks_per_fetch: int = 256
    lease_ms: int = 10_000      # how long an owner pins blocks for a requester's READ
    # Owner-side budget of each peer (by its certificate), on top of the pin bounds (docs/peers.md).
    # Past either, a call is refused at once with RESOURCE_EXHAUSTED (the requester takes a miss).
    max_inflight_per_peer: int = 8  # Has, Pin and Fetch calls one peer may have in flight here
    max_bytes_per_s_per_peer: int = 2 << 30  # block bytes served to one peer per second; 0 = unlimited


@dataclasses.dataclass
class ClusterConfig:
    # HMAC-SHA256 key shared by the nodes of a cluster (32..4096 bytes, readable by kvtierd only):
    # blocks served to peers and objects uploaded to S3 carry a MAC under it, checked before commit
    # or adoption. Empty: blocks from peers and S3 are checked by checksum only (docs/security.md).
    key_file: str = ""


@dataclasses.dataclass
class TenantConfig:
    """One `[[tenant]]`: the local users whose engines act as this tenant, and its bounds."""
    name: str = ""
    uids: list = dataclasses.field(default_factory=list)
    gids: list = dataclasses.field(default_factory=list)
    cpu_capacity: int = 256 << 20   # the tenant's own arena (its slots, never another tenant's)
    max_leases: int = 4096          # allocations and read leases open at once
    max_watchers: int = 8
    max_namespaces: int = 256
    max_pulls: int = 4              # peer pulls in flight for this tenant's namespaces
    max_sessions: int = 64          # local sessions (engine processes) open at once
    max_connections: int = 128      # gRPC connections to the tenant's own socket (each a descriptor)
    # Payload bytes of this tenant's blocks the disk tier may hold; 0: no bound of its own (it shares
    # disk.capacity). A full quota keeps the tenant's further blocks in memory only (daemon/store.py).
    disk_capacity: int = 0
    # Payload bytes of this tenant's blocks in S3 that this node knows of (its own uploads, and what it
    # adopted from listing the bucket); 0: no bound of its own. Past it the tenant's further blocks are
    # not uploaded: they stay on disk only (daemon/s3sync.py). Needs S3 write-through.
    s3_capacity: int = 0
    # The tenant's own KV-event stream (docs/kv-events.md): only its namespaces' events, for its own
    # router. ipc:// socket files get events_ipc_mode and, with events_gid >= 0, that group.
    events_endpoint: str = ""
    events_replay_endpoint: str = ""
    events_ipc_mode: int = 0o600
    events_gid: int = -1
    event_ring_size: int = 16384   # the tenant's own Watch replay ring (events of its namespaces)


@dataclasses.dataclass
class MetricsConfig:
    listen: str = ""            # "host:port" serving Prometheus /metrics, e.g. "127.0.0.1:9477"; empty = off
    allow_remote: bool = False  # true: listen may be beyond loopback (node-wide counters, no authentication)

    @staticmethod
    def loopback(host: str) -> bool:
        """`host` (an IP address, "[v6]", "localhost", ZMQ's interface name "lo", or "" for metrics'
        default 127.0.0.1) accepts local connections only. Anything else counts as remote: "*", "0.0.0.0",
        "::", and any other name (what it resolves to is not known here)."""
        import ipaddress  # noqa: PLC0415 - kept inside the class (this file's imports belong to others)
        host = host.strip("[]")
        if host in ("localhost", "lo", ""):
            return True
        try:
            return ipaddress.ip_address(host).is_loopback
        except ValueError:
            return False

    def listen_problem(self) -> str | None:
        """Why `listen` is refused, or None."""
        if not self.listen:
            return None
        host, sep, port = self.listen.rpartition(":")
        if not sep or not port.isdigit() or int(port) > 65535:
            return f"metrics.listen must be \"host:port\", got {self.listen!r}"
        if not self.allow_remote and not self.loopback(host):
            return (f"metrics.listen = {self.listen!r} listens beyond loopback: whoever can reach it reads the "
                    "node-wide counters (blocks, bytes, lookups and hits, event sequence, tier usage of every "
                    "tenant), without authentication. Use 127.0.0.1:<port>, or set metrics.allow_remote = true "
                    "to accept that")
        return None


@dataclasses.dataclass
class Config:
    data_dir: str = "kvtier-data"
    log_level: str = "info"
    server: ServerConfig = dataclasses.field(default_factory=ServerConfig)
    cpu: CpuConfig = dataclasses.field(default_factory=CpuConfig)
    gpu: GpuConfig = dataclasses.field(default_factory=GpuConfig)
    disk: DiskConfig = dataclasses.field(default_factory=DiskConfig)
    s3: S3TierConfig = dataclasses.field(default_factory=S3TierConfig)
    limits: LimitsConfig = dataclasses.field(default_factory=LimitsConfig)
    events: EventsConfig = dataclasses.field(default_factory=EventsConfig)
    peers: PeersConfig = dataclasses.field(default_factory=PeersConfig)
    metrics: MetricsConfig = dataclasses.field(default_factory=MetricsConfig)
    cluster: ClusterConfig = dataclasses.field(default_factory=ClusterConfig)
    tenant: list = dataclasses.field(default_factory=list)  # of TenantConfig, from [[tenant]] tables

    @property
    def disk_dir(self) -> str:
        return os.path.join(self.data_dir, "disk")


MAX_LIST = 64
_SIZE_KEYS = {"capacity", "slot_bytes", "segment_bytes", "max_message_bytes",
              "put_chunk_bytes", "align", "cpu_capacity", "disk_capacity", "s3_capacity",
              "max_bytes_per_s_per_peer"}
_ID_LIST_KEYS = {"admin_uids", "admin_gids", "uids", "gids"}
MAX_TENANTS = 64
MAX_S3_CAPACITY = 1 << 50  # a sanity bound on a tenant's s3_capacity (1 PiB)
_MODE_KEYS = {"socket_mode", "ipc_mode", "events_ipc_mode"}


def _fill(section_obj, table: dict, path: str) -> None:
    fields = {f.name: f for f in dataclasses.fields(section_obj)}
    for key, value in table.items():
        where = f"{path}.{key}" if path else key
        if key not in fields:
            raise ConfigError(f"unknown config key {where!r}; known: {', '.join(sorted(fields))}")
        current = getattr(section_obj, key)
        if key == "tenant" and not path:
            setattr(section_obj, key, _tenants(value))
        elif dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"{where}: expected a [table]")
            _fill(current, value, where)
        elif key in _SIZE_KEYS:
            setattr(section_obj, key, parse_size(value, where))
        elif key in _ID_LIST_KEYS:
            setattr(section_obj, key, _id_list(value, where))
        elif key in _MODE_KEYS:
            setattr(section_obj, key, _parse_mode(value, where))
        else:
            setattr(section_obj, key, _typed(value, type(current), where))


def _tenants(value) -> list:
    if not isinstance(value, list) or len(value) > MAX_TENANTS or not all(isinstance(t, dict) for t in value):
        raise ConfigError(f"tenant: expected at most {MAX_TENANTS} [[tenant]] tables")
    tenants = []
    for index, table in enumerate(value):
        tenant = TenantConfig()
        _fill(tenant, table, f"tenant[{index}]")
        tenants.append(tenant)
    return tenants


def _id_list(value, where: str) -> list:
    if (not isinstance(value, list) or len(value) > MAX_LIST
            or not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 1 << 32 for v in value)):
        raise ConfigError(f"{where}: expected a list of at most {MAX_LIST} numeric ids, got {value!r}")
    return list(value)


def _parse_mode(value, where: str) -> int:
    try:
        mode = int(value, 8) if isinstance(value, str) else int(value)
    except ValueError as exc:
        raise ConfigError(f"{where}: expected an octal mode like \"0660\"") from exc
    if not 0 <= mode <= 0o777:
        raise ConfigError(f"{where}: mode out of range")
    return mode


def _typed(value, kind: type, where: str):
    if kind is bool and not isinstance(value, bool):
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if kind is float and (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if kind is float:
        return float(value)
    if kind is str and not isinstance(value, str):
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    if kind is list and (not isinstance(value, list) or len(value) > MAX_LIST
                         or not all(isinstance(v, str) and 0 < len(v) <= 256 for v in value)):
        raise ConfigError(f"{where}: expected a list of at most {MAX_LIST} non-empty strings, got {value!r}")
    return list(value) if kind is list else value


def validate(cfg: Config) -> Config:
    page = 4096
    checks = [
        (cfg.cpu.slot_bytes >= page and cfg.cpu.slot_bytes % page == 0,
         f"cpu.slot_bytes must be a positive multiple of {page}"),
        (cfg.cpu.capacity >= cfg.cpu.slot_bytes, "cpu.capacity must hold at least one slot"),
        (cfg.cpu.policy in ("lru", "fifo", "retention"), "cpu.policy must be \"lru\", \"fifo\" or \"retention\""),
        (cfg.disk.align >= 512 and cfg.disk.align & (cfg.disk.align - 1) == 0,
         "disk.align must be a power of two >= 512"),
        (not cfg.disk.enabled or cfg.disk.segment_bytes >= 4 * cfg.cpu.slot_bytes,
         "disk.segment_bytes must hold at least 4 slots"),
        (not cfg.disk.enabled or cfg.disk.capacity >= 2 * cfg.disk.segment_bytes,
         "disk.capacity must hold at least 2 segments"),
        (not cfg.disk.enabled or cfg.disk.capacity >= cfg.cpu.capacity,
         "disk.capacity must not be smaller than cpu.capacity: with write-through every CPU block is also on disk"),
        (1 <= cfg.disk.batch_blocks <= cfg.disk.queue_blocks <= 1 << 20,
         "need 1 <= disk.batch_blocks <= disk.queue_blocks <= 1048576"),
        (1 <= cfg.disk.readers <= 64, "disk.readers must be 1..64"),
        (100 <= cfg.disk.durable_wait_ms <= 600_000, "disk.durable_wait_ms must be 100..600000"),
        (1 <= cfg.limits.max_ttl_s <= 365 * 86400, "limits.max_ttl_s must be 1..31536000"),
        (1 <= cfg.limits.max_key_bytes <= 32, "limits.max_key_bytes must be 1..32"),
        (1 <= cfg.limits.max_keys_per_request <= 65536, "limits.max_keys_per_request must be 1..65536"),
        (1 <= cfg.limits.max_page_size <= 10000, "limits.max_page_size must be 1..10000"),
        (0 < cfg.limits.default_lease_ms <= cfg.limits.max_lease_ms, "need 0 < default_lease_ms <= max_lease_ms"),
        (1024 <= cfg.events.ring_size <= 1 << 24, "events.ring_size must be 1024..16777216"),
        (64 << 10 <= cfg.server.max_message_bytes <= 256 << 20, "server.max_message_bytes must be 64KiB..256MiB"),
        (4096 <= cfg.limits.put_chunk_bytes < cfg.server.max_message_bytes,
         "limits.put_chunk_bytes must be >= 4096 and below server.max_message_bytes"),
        (not cfg.server.tcp or cfg.server.tokens_file,
         "server.tcp needs server.tokens_file: nothing on TCP is served without authentication"),
        (bool(cfg.server.tls_cert) == bool(cfg.server.tls_key), "server.tls_cert and server.tls_key go together"),
        (not cfg.server.tcp or cfg.server.tls_cert,
         "server.tcp needs server.tls_cert/tls_key: bearer tokens never travel in clear"),
        (not (cfg.peers.listen or cfg.peers.addresses) or (cfg.peers.tls_cert and cfg.peers.tls_key
                                                           and cfg.peers.tls_ca),
         "peers need peers.tls_cert, peers.tls_key and peers.tls_ca: peers talk mutual TLS only"),
        (cfg.peers.transport in ("auto", "nixl", "grpc"), "peers.transport must be \"auto\", \"nixl\" or \"grpc\""),
        (0 < cfg.peers.timeout_s <= 60, "peers.timeout_s must be in (0, 60]"),
        (1 <= cfg.peers.max_fanout <= 64, "peers.max_fanout must be 1..64"),
        (1 <= cfg.peers.max_blocks_per_fetch <= cfg.limits.max_keys_per_request,
         "peers.max_blocks_per_fetch must be 1..limits.max_keys_per_request"),
        (1000 <= cfg.peers.lease_ms <= cfg.limits.max_lease_ms, "peers.lease_ms must be 1000..limits.max_lease_ms"),
        (cfg.peers.listen not in cfg.peers.addresses, "peers.addresses must not contain this node's own peers.listen"),
        (1 <= cfg.peers.max_inflight_per_peer <= 1024,
         "peers.max_inflight_per_peer must be 1..1024 (calls one peer may have in flight on this node)"),
        (cfg.peers.max_bytes_per_s_per_peer <= 1 << 40,
         "peers.max_bytes_per_s_per_peer must be at most 1TiB (a size per second, e.g. \"2GiB\"; 0: unlimited)"),
        (cfg.log_level in ("debug", "info", "warning", "error"), "log_level must be debug, info, warning or error"),
        (not cfg.s3.enabled or cfg.s3.bucket, "s3.enabled needs s3.bucket"),
        (not cfg.events.zmq_replay_endpoint or cfg.events.zmq_endpoint,
         "events.zmq_replay_endpoint needs events.zmq_endpoint"),
        (not cfg.gpu.enabled or cfg.gpu.capacity >= cfg.cpu.slot_bytes,
         "gpu.capacity must hold at least one slot of cpu.slot_bytes"),
        (not cfg.gpu.enabled or cfg.gpu.capacity <= cfg.cpu.capacity,
         "gpu.capacity must not exceed cpu.capacity: every GPU block is promoted from the CPU tier"),
        (cfg.gpu.policy in ("lru", "fifo", "retention"), "gpu.policy must be \"lru\", \"fifo\" or \"retention\""),
        (not (cfg.s3.enabled and cfg.s3.write_through) or cfg.disk.enabled,
         "s3.write_through needs disk.enabled: the disk tier keeps each block until it is uploaded"),
        (bool(cfg.s3.access_key_id) == bool(cfg.s3.secret_access_key_file),
         "s3.access_key_id and s3.secret_access_key_file go together (or leave both empty for the AWS chain)"),
        (1 <= cfg.s3.max_concurrency <= 256, "s3.max_concurrency must be 1..256"),
        (1 <= cfg.s3.max_catalog_blocks <= 1 << 30, "s3.max_catalog_blocks must be 1..1073741824"),
        (cfg.s3.connect_timeout_s > 0 and cfg.s3.read_timeout_s > 0 and cfg.s3.list_interval_s > 0,
         "s3 timeouts and list_interval_s must be positive"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    for problem in (cfg.events.endpoint_problem(), cfg.metrics.listen_problem()):
        if problem:
            raise ConfigError(problem)
    _validate_tenants(cfg)
    _validate_event_streams(cfg)
    check_secret_modes(cfg)
    return cfg


_TENANT_NAME = re.compile(r"[A-Za-z0-9._\-]{1,64}")


# Compaction copies a protected tenant's blocks forward before it drops a segment: it needs this many
# segments of the disk tier that the tenants' disk quotas cannot claim.
DISK_COMPACTION_HEADROOM_SEGMENTS = 2


def _validate_disk_quotas(cfg: Config) -> None:
    """The tenants' disk quotas must leave the disk tier room to compact: blocks of a tenant within its
    quota are protected from eviction, so they must never fill the disk between them."""
    quotas = sum(tenant.disk_capacity for tenant in cfg.tenant)
    room = cfg.disk.capacity - DISK_COMPACTION_HEADROOM_SEGMENTS * cfg.disk.segment_bytes
    if cfg.disk.enabled and quotas and quotas > room:
        raise ConfigError(f"tenant[*].disk_capacity sum to {quotas} bytes, more than disk.capacity "
                          f"({cfg.disk.capacity}) minus {DISK_COMPACTION_HEADROOM_SEGMENTS} disk.segment_bytes "
                          f"({cfg.disk.segment_bytes} each) "
                          "that compaction needs as headroom: lower the quotas, or raise disk.capacity")


def _validate_event_streams(cfg: Config) -> None:
    """Block events carry the token ids of prompts (docs/kv-events.md): with [[tenant]] tables, each
    stream must reach only who may read its blocks. The node-wide stream (events.zmq_*) is the
    administrators' router's: no other bits, and group bits only with a dedicated events.ipc_gid (the
    daemon's own group is the one tenants' users join to reach server.socket). A tenant's stream
    (events_endpoint) follows the same rules with events_ipc_mode and events_gid. A tcp:// endpoint,
    which any local user can connect to, needs events.allow_tcp_with_tenants."""
    events = cfg.events
    for what, bound in (("untabled_tenant_max_watchers", 1024), ("untabled_tenant_max_namespaces", 1 << 16),
                        ("untabled_tenant_max_leases", 1 << 20), ("untabled_tenant_max_pulls", 256)):
        if not 1 <= getattr(cfg.limits, what) <= bound:
            raise ConfigError(f"limits.{what} must be 1..{bound}")
    tenant_gids = {gid: t.name for t in cfg.tenant for gid in t.gids}
    streams = [("events.zmq_endpoint", events.zmq_endpoint, events.ipc_mode, events.ipc_gid, "events.ipc_mode",
                "events.ipc_gid", None),
               ("events.zmq_replay_endpoint", events.zmq_replay_endpoint, events.ipc_mode, events.ipc_gid,
                "events.ipc_mode", "events.ipc_gid", None)]
    for index, tenant in enumerate(cfg.tenant):
        where = f"tenant[{index}]"
        for key in ("events_endpoint", "events_replay_endpoint"):
            problem = events.endpoint_shape_problem(f"{where}.{key}", getattr(tenant, key))
            if problem:
                raise ConfigError(f"{problem} ({tenant.name})")
            streams.append((f"{where}.{key}", getattr(tenant, key), tenant.events_ipc_mode, tenant.events_gid,
                            f"{where}.events_ipc_mode", f"{where}.events_gid", tenant.name))
        if tenant.events_replay_endpoint and not tenant.events_endpoint:
            raise ConfigError(f"{where}.events_replay_endpoint needs {where}.events_endpoint ({tenant.name})")
        if not 1024 <= tenant.event_ring_size <= 1 << 24:
            raise ConfigError(f"{where}.event_ring_size must be 1024..16777216 ({tenant.name})")
    for gid_key, gid in [("events.ipc_gid", events.ipc_gid)] + [
            (f"tenant[{i}].events_gid", t.events_gid) for i, t in enumerate(cfg.tenant)]:
        if not -1 <= gid < 1 << 32:
            raise ConfigError(f"{gid_key} must be a numeric gid (or -1: kvtierd's own group)")
    seen: dict[str, str] = {}
    for key, endpoint, mode, gid, mode_key, gid_key, owner in streams:
        if not endpoint:
            continue
        if endpoint in seen:
            raise ConfigError(f"{key} {endpoint!r} is also {seen[endpoint]}: every event stream needs its own")
        seen[endpoint] = key
        if gid >= 0 and gid in tenant_gids and tenant_gids[gid] != owner:
            raise ConfigError(f"{gid_key} {gid} is tenant {tenant_gids[gid]}'s gid: its users would read "
                              f"{'every tenant' if owner is None else f'tenant {owner}'}'s token ids; name a "
                              "group only that stream's router is in")
        if cfg.tenant:
            _check_tenant_stream(events, key, endpoint, mode, gid, mode_key, gid_key, owner)
    if cfg.tenant and not events.allow_tcp_with_tenants:
        for endpoint in events.zmq_connect:
            if endpoint.startswith("tcp://"):
                raise ConfigError(f"events.zmq_connect {endpoint!r} with [[tenant]] tables: every tenant's token "
                                  "ids go there over tcp, which any local user can reach on loopback (and "
                                  "squat). Set events.allow_tcp_with_tenants = true to accept that")


def _check_tenant_stream(events: EventsConfig, key: str, endpoint: str, mode: int, gid: int, mode_key: str,
                         gid_key: str, owner: str | None) -> None:
    whose = "every tenant's" if owner is None else f"tenant {owner}'s"
    if endpoint.startswith("tcp://"):
        if not events.allow_tcp_with_tenants:
            raise ConfigError(f"{key} = {endpoint!r} with [[tenant]] tables: any local user can connect to a tcp "
                              f"endpoint (loopback included) and read {whose} block events with the token ids "
                              "of their prompts. Use an ipc:// endpoint (with its mode and group keys), or set "
                              "events.allow_tcp_with_tenants = true to accept that")
        return
    if mode & 0o007:
        raise ConfigError(f"{mode_key} {mode:04o} gives other users {key}: with [[tenant]] tables they read "
                          f"{whose} token ids; drop the other bits")
    if mode & 0o070 and gid < 0:
        raise ConfigError(f"{mode_key} {mode:04o} gives kvtierd's own group {key}, and tenants' users are in it "
                          f"(to reach server.socket): they would read {whose} token ids. Name a group only "
                          f"its router is in with {gid_key}, or drop the group bits")


def _validate_tenants(cfg: Config) -> None:
    """Each tenant has a valid unique name, an arena of whole slots, and users that no other tenant
    (and no administrator entry) claims: one local user acts as exactly one principal."""
    names, claimed = set(), {}
    admins = {("uid", u) for u in cfg.server.admin_uids} | {("gid", g) for g in cfg.server.admin_gids}
    for index, tenant in enumerate(cfg.tenant):
        where = f"tenant[{index}]"
        if not _TENANT_NAME.fullmatch(tenant.name) or tenant.name in names:
            raise ConfigError(f"{where}.name must be a unique 1..64 characters of [A-Za-z0-9._-]")
        names.add(tenant.name)
        if not tenant.uids and not tenant.gids:
            raise ConfigError(f"{where} ({tenant.name}): needs uids or gids: who acts as this tenant")
        if tenant.cpu_capacity < cfg.cpu.slot_bytes:
            raise ConfigError(f"{where} ({tenant.name}): cpu_capacity must hold at least one slot")
        if tenant.disk_capacity > cfg.disk.capacity:
            raise ConfigError(f"{where} ({tenant.name}): disk_capacity must be at most disk.capacity "
                              "(or 0: no quota of its own, it shares the disk tier)")
        if tenant.s3_capacity and not (cfg.s3.enabled and cfg.s3.write_through):
            raise ConfigError(f"{where} ({tenant.name}): s3_capacity bounds what this node uploads for the tenant: "
                              "it needs s3.enabled and s3.write_through (or 0: no S3 quota)")
        if tenant.s3_capacity > MAX_S3_CAPACITY:
            raise ConfigError(f"{where} ({tenant.name}): s3_capacity must be at most 1PiB "
                              "(or 0: no quota of its own)")
        for what, bound in (("max_leases", 1 << 20), ("max_watchers", 1024), ("max_namespaces", 1 << 16),
                            ("max_pulls", 256), ("max_sessions", 1 << 16), ("max_connections", 1 << 16)):
            if not 1 <= getattr(tenant, what) <= bound:
                raise ConfigError(f"{where} ({tenant.name}): {what} must be 1..{bound}")
        for ident in [("uid", u) for u in tenant.uids] + [("gid", g) for g in tenant.gids]:
            if ident in admins or ident in claimed:
                raise ConfigError(f"{where} ({tenant.name}): {ident[0]} {ident[1]} already belongs to "
                                  f"{claimed.get(ident, 'the administrators')}")
            claimed[ident] = tenant.name
    _validate_disk_quotas(cfg)
    if not 1 <= cfg.server.max_sessions <= 1 << 16:
        raise ConfigError("server.max_sessions must be 1..65536")
    for what in ("max_connections_per_uid", "max_shared_connections", "max_admin_connections",
                 "max_tcp_connections"):
        if not 1 <= getattr(cfg.server, what) <= 1 << 16:
            raise ConfigError(f"server.{what} must be 1..65536")


def _secret_files(cfg: Config) -> list[tuple[str, str]]:
    """(config key, path) of every configured file that holds a secret."""
    named = [("server.tokens_file", cfg.server.tokens_file), ("server.tls_key", cfg.server.tls_key),
             ("peers.tls_key", cfg.peers.tls_key), ("s3.secret_access_key_file", cfg.s3.secret_access_key_file),
             ("cluster.key_file", cfg.cluster.key_file)]
    return [(key, path) for key, path in named if path]


def check_secret_modes(cfg: Config) -> None:
    """Refuses (ConfigError naming the key, the file and its mode) a secrets file that is not a
    regular file or that group or others may read or write: a token digest, a private key or an
    S3 secret another local user can read is leaked, and one they can write is replaced."""
    for key, path in _secret_files(cfg):
        try:
            info = os.stat(path)  # follows a symlink: what matters is the file the daemon reads
        except FileNotFoundError as exc:
            raise ConfigError(f"{key} {path} does not exist") from exc
        except OSError as exc:
            raise ConfigError(f"{key} {path} cannot be checked: {exc.strerror}") from exc
        check_secret_stat(key, path, info)
        if key == "cluster.key_file" and not 32 <= info.st_size <= 4096:
            raise ConfigError(f"{key} {path} holds {info.st_size} bytes; a cluster key is 32..4096 bytes "
                              "(e.g. head -c 32 /dev/urandom > key)")


def check_secret_stat(key: str, path: str, info: os.stat_result, own_uid: int | None = None) -> None:
    """ConfigError unless `info` (the stat of the secrets file `path`, set by `key`) is a regular
    file that only its owner may read or write, and that owner is kvtierd's user (`own_uid`, default
    the effective uid) or root: a file another user owns is that user's to read, rewrite or chmod."""
    if not stat.S_ISREG(info.st_mode):
        raise ConfigError(f"{key} {path} is not a regular file")
    own_uid = os.geteuid() if own_uid is None else own_uid
    if info.st_uid not in (own_uid, 0):
        raise ConfigError(f"{key} {path} is owned by uid {info.st_uid}, not by kvtierd's user (uid {own_uid}) "
                          "or root: its owner can read or replace it; chown it to kvtierd's user")
    mode = stat.S_IMODE(info.st_mode)
    exposed = [what for what, bits in (("readable", 0o044), ("writable", 0o022)) if mode & bits]
    if exposed:
        raise ConfigError(f"{key} {path} is {' and '.join(exposed)} by group/others (mode {mode:04o}); "
                          "chmod 600 it")


def load(path: str | None = None, overrides: dict | None = None) -> Config:
    """Embedded defaults, then the TOML file (if any), then overrides; validated."""
    cfg = Config()
    if path:
        try:
            with open(path, "rb") as file:
                table = tomllib.load(file)
        except FileNotFoundError as exc:
            raise ConfigError(f"config file {path} does not exist") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path} is not valid TOML: {exc}") from exc
        _fill(cfg, table, "")
    if overrides:
        _fill(cfg, overrides, "")
    return validate(cfg)
