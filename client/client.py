"""Client implementation: request builders shared by the sync and asyncio classes."""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from typing import Iterable, Sequence

import grpc
import xxhash

from kvtier.proto.v1 import kvtier_pb2 as pb
from kvtier.proto.v1 import kvtier_pb2_grpc as pb_grpc
from kvtier.tiers.arena import buffer_address, cuda_host_register, cuda_host_unregister, map_fd

from .session import LocalSession, SessionError

DEFAULT_SOCKET = "kvtier-data/kvtierd.sock"
CHUNK_BYTES = 1 << 20
MAX_MESSAGE_BYTES = 64 << 20
KvTierError = grpc.RpcError


def block_checksum(data) -> int:
    """The checksum the daemon verifies on commit (xxh3_64)."""
    return xxhash.xxh3_64_intdigest(data)


def target_of(address: str) -> str:
    """A socket path becomes unix:ABS; host:port stays as is."""
    if address.startswith(("unix:", "dns:", "ipv4:", "ipv6:")):
        return address
    if "/" in address or address.endswith(".sock") or ":" not in address:
        return f"unix:{os.path.abspath(address)}"
    return address


RENEW_WAIT_S = 5.0  # the most a call retried on a new session waits for its channel to reconnect
CONNECT_TIMEOUT_MS = 20_000  # the least time one connection attempt is given (see _channel_args)


def _channel_args(token: str | None):
    options = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
               ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
               # A restarted daemon is back within a second or two; gRPC's default backoff (up to
               # 2 min) would turn that into minutes of misses for a long-running engine.
               ("grpc.initial_reconnect_backoff_ms", 100), ("grpc.max_reconnect_backoff_ms", 2000),
               # NOT the backoff: gRPC core reads grpc.min_reconnect_backoff_ms as the minimum time
               # one connection attempt may take (the server's HTTP/2 SETTINGS frame must arrive
               # within it). 100 ms failed every call with UNAVAILABLE ("connection attempt timed out
               # before receiving SETTINGS frame") whenever a loaded daemon answered a new connection
               # late. Stated explicitly at gRPC's own default, 20 s; a refused connection (no daemon)
               # still fails at once and is retried after the short backoff above.
               ("grpc.min_reconnect_backoff_ms", CONNECT_TIMEOUT_MS)]
    metadata = (("authorization", f"Bearer {token}"),) if token else ()
    return options, metadata


LOCAL_SCHEMES = ("unix:", "unix-abstract:")  # targets that never leave this host


def _open_channel(grpc_module, address: str, token: str | None, tls_ca: str | None):
    """(channel, call metadata, session socket path or None) for grpc or grpc.aio: TLS when a CA is
    given, the token as metadata. On a Unix socket calls carry a local session instead (opened
    lazily: see _Sessioned). ValueError, before anything connects, for a token that would cross the
    network in clear."""
    target = target_of(address)
    _refuse_cleartext_token(target, token, tls_ca)
    options, metadata = _channel_args(token)
    creds = _credentials(tls_ca)
    channel = (grpc_module.secure_channel(target, creds, options) if creds
               else grpc_module.insecure_channel(target, options))
    local = target[len("unix:"):] if target.startswith("unix:") else None  # a token means nothing there
    return channel, metadata, local


class _Sessioned:
    """A local session opened on first use, shared by every thread using this client (a connector
    calls from the scheduler and from background threads). Calls go to the session's own socket
    (its principal's: the only one where the daemon honours the session) through one channel whose
    target is a descriptor number this client keeps for its whole life (`/proc/self/fd/N`): a new
    session's socket descriptor is dup2'ed onto N, so the channel and every stub method bound to it
    stay valid across sessions. A daemon that restarted does not know the old session: a call answered
    UNAUTHENTICATED, or UNAVAILABLE while the session's connection is closed (`alive()`), is retried
    once on a new session (call()); an arena of another generation opens a new one too. The hot path
    costs no system call for this."""

    _session: LocalSession | None = None
    _session_path: str | None = None
    _session_lock = threading.Lock()  # replaced per client in _init_session
    _socket_slot = -1                 # N: the descriptor number the session channel connects through
    _session_channel = None
    _session_stub = None

    def _init_session(self, path: str | None, grpc_module=grpc, options=()) -> None:
        self._session_path = path
        self._session_lock = threading.Lock()
        self._grpc_module, self._channel_options = grpc_module, list(options)

    def _session_now(self) -> LocalSession:
        with self._session_lock:
            if self._session is None:
                session = LocalSession.open(self._session_path)
                try:
                    self._take_socket(session)
                except BaseException:
                    session.close()
                    raise
                self._session = session
            return self._session

    def _take_socket(self, session: LocalSession) -> None:
        """Points descriptor N at the session's socket (the first session creates N and the channel)."""
        if session.grpc_socket_fd < 0:
            raise SessionError(grpc.StatusCode.FAILED_PRECONDITION, "the daemon sent no socket for this session")
        if self._socket_slot < 0:
            self._socket_slot = os.dup(session.grpc_socket_fd)  # non-inheritable, as every descriptor here
            self._session_channel = self._grpc_module.insecure_channel(
                f"unix:/proc/self/fd/{self._socket_slot}", self._channel_options)
            self._session_stub = pb_grpc.KvTierStub(self._session_channel)
        else:
            os.dup2(session.grpc_socket_fd, self._socket_slot, inheritable=False)

    def _renew_session(self, failed: LocalSession | None) -> None:
        """Replaces the session a call failed with, unless another thread already did."""
        with self._session_lock:
            if self._session is failed and failed is not None:
                self._session.close()
                self._session = None

    def _drop_session(self) -> None:
        with self._session_lock:
            if self._session is not None:
                self._session.close()
                self._session = None

    def _release_socket_slot(self) -> None:
        if self._socket_slot >= 0:
            os.close(self._socket_slot)
            self._socket_slot = -1

    def _retry_on_new_session(self, session: LocalSession | None, exc: grpc.RpcError) -> bool:
        """Whether a call that failed with `exc` on `session` is worth one retry on a new session
        (the old session was renewed if so)."""
        if session is None:
            return False
        code = exc.code()
        if code == grpc.StatusCode.UNAUTHENTICATED or (code == grpc.StatusCode.UNAVAILABLE and not session.alive()):
            self._renew_session(session)
            return True
        return False

    def _renew_wait_s(self) -> float:
        """The deadline of a call retried on a new session (it may wait for its channel to reconnect):
        the client's, at most RENEW_WAIT_S."""
        timeout = getattr(self, "timeout", None)
        return RENEW_WAIT_S if timeout is None else min(timeout, RENEW_WAIT_S)

    def _session_and_metadata(self) -> tuple[LocalSession | None, tuple]:
        if not self._session_path:
            return None, self._metadata
        session = self._session_now()
        return session, session.metadata()

    _stub_override = None

    @property
    def stub(self) -> pb_grpc.KvTierStub:
        """The kvtier.v1 stub: on the Unix socket, the session channel's (opening the session)."""
        if self._stub_override is not None:
            return self._stub_override
        if not self._session_path:
            return self._stub
        self._session_now()
        return self._session_stub

    @stub.setter
    def stub(self, stub) -> None:
        """Replaces the stub (tests wrap the real one to inject faults)."""
        self._stub_override = stub

    @property
    def call_metadata(self) -> tuple:
        """Metadata for a raw stub call (`client.stub.X(..., metadata=client.call_metadata)`): the
        bearer token on TCP, the local session on the Unix socket."""
        return self._session_now().metadata() if self._session_path else self._metadata

    @property
    def namespace_prefix(self) -> str:
        """"<tenant>/" when this client acts for a tenant (its namespaces must start with it)."""
        return self._session_now().namespace_prefix if self._session_path else ""

    def _mapped_arena(self, info: pb.ArenaInfoResponse) -> "Arena":
        if not self._session_path:
            raise SessionError(grpc.StatusCode.FAILED_PRECONDITION,
                               "the arena is for local clients on the Unix socket; use put/get over TCP")
        session = self._session_now()
        if session.arena is None or session.arena.generation != info.generation:
            self._renew_session(session)  # the daemon restarted between the session and this answer
            session = self._session_now()
        if session.arena is None:
            raise SessionError(grpc.StatusCode.FAILED_PRECONDITION, "this session has no arena")
        return Arena(session.arena, info.max_keys_per_request)


def _refuse_cleartext_token(target: str, token: str | None, tls_ca: str | None) -> None:
    """A bearer token is a password: anyone on the path who reads it can replay it. Over a Unix
    socket it stays on this host; over TCP it needs TLS (tls_ca)."""
    if token and not tls_ca and not target.startswith(LOCAL_SCHEMES):
        raise ValueError(f"refusing to send a bearer token to {target} over cleartext TCP: "
                         "pass tls_ca (the CA of the daemon's certificate) or use the Unix socket")


def _credentials(tls_ca: str | None):
    if not tls_ca:
        return None
    with open(tls_ca, "rb") as file:
        return grpc.ssl_channel_credentials(root_certificates=file.read())


class Arena:
    """A read/write mapping of this client's part of the daemon's arena (its tenant's slots
    first_slot .. first_slot + slot_count - 1), from the descriptor its session received. On a CUDA
    machine the mapping is registered with cudaHostRegister (`pinned`), so an engine's copies
    between it and the GPU are DMA, asynchronous on a stream; elsewhere it is plain memory."""

    def __init__(self, part, max_keys_per_request: int = 0):
        self.generation = part.generation
        self.max_keys_per_request = max_keys_per_request  # the daemon's limit a client batches against
        self.slot_bytes = part.slot_bytes
        self.slot_count = part.slot_count
        self.first_slot = part.first_slot
        self._mmap = map_fd(part.fd, part.slot_count * part.slot_bytes)
        self._view = memoryview(self._mmap)
        self.pinned = cuda_host_register(buffer_address(self._mmap), len(self._mmap))

    @property
    def buffer(self):
        """The whole mapping (slot first_slot at byte 0), to build tensors or views over. It is the
        mapping object itself, not a memoryview: close() (a remap after a daemon restart) leaves a
        mapping that such views still export in place until they are dropped."""
        return self._mmap

    def view(self, slot: int) -> memoryview:
        index = slot - self.first_slot
        if not 0 <= index < self.slot_count:
            raise IndexError(f"slot {slot} outside this arena's slots {self.first_slot}.."
                             f"{self.first_slot + self.slot_count - 1}")
        start = index * self.slot_bytes
        return self._view[start:start + self.slot_bytes]

    def close(self) -> None:
        if self.pinned:
            cuda_host_unregister(buffer_address(self._mmap))
            self.pinned = False
        self._view.release()
        try:
            self._mmap.close()
        except BufferError:
            pass  # a caller still holds a view; the mapping goes with the process


@dataclass
class Allocation:
    id: int
    slots: list[int]
    deadline_unix_ms: int


@dataclass
class Lease:
    id: int                       # 0 when nothing was found (nothing to release)
    blocks: list[pb.AcquiredBlock]
    deadline_unix_ms: int


# -- request builders (one place for the wire shapes) ---------------------------------------
def retention(cls: str, priority: int = 50, ttl_s: float = 0.0) -> pb.Retention:
    """A block's retention for commit: class, priority 0..100, TTL pin in seconds (0: none)."""
    return pb.Retention(cls=cls, priority=priority, ttl_s=ttl_s)


def _commit_request(allocation_id, namespace, entries, wait_durable, retention=None):
    request = pb.CommitRequest(allocation_id=allocation_id, namespace=namespace, wait_durable=wait_durable,
                               entries=[pb.CommitEntry(key=k, parent=p, slot=s, length=n, checksum=c)
                                        for k, p, s, n, c in entries])
    if retention is not None:
        request.retention.CopyFrom(retention)
    return request


def _put_messages(namespace, key, data, parent, wait_durable, retention=None):
    view = memoryview(data).cast("B")
    yield pb.PutRequest(header=pb.PutHeader(namespace=namespace, key=key, parent=parent, length=len(view),
                                            checksum=block_checksum(view), wait_durable=wait_durable,
                                            retention=retention))
    for start in range(0, len(view), CHUNK_BYTES):
        yield pb.PutRequest(chunk=bytes(view[start:start + CHUNK_BYTES]))


def _stage(arena: Arena, slots, blocks) -> list[tuple]:
    """Copies each (key, parent, data) into its slot; returns commit entries."""
    entries = []
    for slot, (key, parent, data) in zip(slots, blocks):
        src = memoryview(data).cast("B")
        if len(src) > arena.slot_bytes:
            raise ValueError(f"block of {len(src)} bytes exceeds the slot size {arena.slot_bytes}")
        arena.view(slot)[:len(src)] = src
        entries.append((key, parent, slot, len(src), block_checksum(src)))
    return entries


def _copy_out(arena: Arena, blocks) -> list[bytes | None]:
    return [bytes(arena.view(b.slot)[:b.length]) if b.found else None for b in blocks]


class Client(_Sessioned):
    """Synchronous client. `address`: a socket path (default) or host:port with a token.
    `timeout`: deadline in seconds for every unary call (None: no deadline). On the Unix socket it
    opens a local session (client/session.py) on first use; the daemon knows it by its uid."""

    def __init__(self, address: str = DEFAULT_SOCKET, token: str | None = None, tls_ca: str | None = None,
                 timeout: float | None = None):
        self.timeout = timeout
        self._channel, self._metadata, session_path = _open_channel(grpc, address, token, tls_ca)
        self._init_session(session_path, grpc, _channel_args(None)[0])
        self._stub = pb_grpc.KvTierStub(self._channel)
        self._arena: Arena | None = None

    def close(self) -> None:
        if self._arena is not None:
            self._arena.close()
        self._drop_session()
        if self._session_channel is not None:
            self._session_channel.close()
        self._release_socket_slot()
        self._channel.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def call(self, method, request):
        """Any unary RPC (a stub method) with this client's token or session and deadline. A call
        refused because the session ended (the daemon restarted) is retried once on a new one."""
        session, metadata = self._session_and_metadata()
        try:
            return method(request, metadata=metadata, timeout=self.timeout)
        except grpc.RpcError as exc:
            if not self._retry_on_new_session(session, exc):
                raise
            # The new session is open, so its socket is there: the retry waits for the channel to
            # reconnect to it (after failing on the old socket it is in reconnect backoff, where a call
            # without wait_for_ready fails at once), within the call's deadline.
            return method(request, metadata=self.call_metadata, timeout=self._renew_wait_s(), wait_for_ready=True)

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Blocks until the channel is connected (raises grpc.FutureTimeoutError past `timeout`)."""
        grpc.channel_ready_future(self._channel).result(timeout=timeout)

    # namespaces, lookup
    def register_namespace(self, name: str, attributes: dict[str, str] | None = None) -> bool:
        return self.call(self.stub.RegisterNamespace,
                          pb.RegisterNamespaceRequest(name=name, attributes=attributes or {})).created

    def list_namespaces(self):
        return list(self.call(self.stub.ListNamespaces, pb.ListNamespacesRequest()).namespaces)

    def lookup(self, namespace: str, keys: Sequence[bytes], consult_peers: bool = False,
               peer: str = "") -> pb.LookupResponse:
        """`peer` (with consult_peers): pull only from that peer (an address in the daemon's
        peers.addresses, or a peer's node id); a name that is no configured peer pulls nothing."""
        return self.call(self.stub.Lookup, pb.LookupRequest(namespace=namespace, keys=keys,
                                                            consult_peers=consult_peers, peer=peer))

    def set_retention(self, namespace: str, keys: Sequence[bytes], retention: pb.Retention) -> int:
        """Re-classifies stored blocks (e.g. demote a finished subagent's); returns how many."""
        return self.call(self.stub.SetRetention, pb.SetRetentionRequest(
            namespace=namespace, keys=keys, retention=retention)).updated

    def prefetch(self, namespace: str, keys: Sequence[bytes], gpu: bool = False,
                 consult_peers: bool = False, peer: str = "") -> pb.PrefetchResponse:
        """Warms the stored prefix of a key chain into the CPU (and GPU) tier now (`peer`: as lookup's)."""
        return self.call(self.stub.Prefetch, pb.PrefetchRequest(namespace=namespace, keys=keys, gpu=gpu,
                                                                consult_peers=consult_peers, peer=peer))

    def find_matches(self, namespace: str, keys: Sequence[bytes]) -> pb.FindMatchesResponse:
        return self.call(self.stub.FindMatches, pb.LookupRequest(namespace=namespace, keys=keys))

    def snapshot(self, namespace: str = ""):
        """(seq, blocks): every block, consistent with event `seq`; watch from seq + 1 to stay current."""
        seq, blocks = 0, []
        for chunk in self.stub.Snapshot(pb.SnapshotRequest(namespace=namespace), metadata=self.call_metadata):
            seq = chunk.seq
            blocks.extend(chunk.blocks)
        return seq, blocks

    # zero-copy path
    def arena(self, generation: str | None = None) -> Arena:
        """The mapped arena, remapped when the daemon restarted (generation changed)."""
        if self._arena is None or (generation and generation != self._arena.generation):
            if self._arena is not None:
                self._arena.close()
            self._arena = None
            self._arena = self._mapped_arena(self.call(self.stub.ArenaInfo, pb.ArenaInfoRequest()))
        return self._arena

    def allocate(self, count: int, wait_ms: int = 5000, lease_ms: int = 0) -> Allocation:
        r = self.call(self.stub.Allocate, pb.AllocateRequest(count=count, wait_ms=wait_ms, lease_ms=lease_ms))
        self.arena(r.generation)
        return Allocation(r.allocation_id, list(r.slots), r.deadline_unix_ms)

    def commit(self, allocation_id: int, namespace: str, entries: Iterable[tuple], wait_durable=False,
               retention: pb.Retention | None = None):
        """entries: (key, parent, slot, length, checksum). Returns a CommitStatus per entry."""
        return list(self.call(self.stub.Commit, _commit_request(allocation_id, namespace, entries,
                                                                 wait_durable, retention)).status)

    def abort(self, allocation_id: int) -> None:
        self.call(self.stub.Abort, pb.AbortRequest(allocation_id=allocation_id))

    def acquire(self, namespace: str, keys: Sequence[bytes], lease_ms: int = 0, gpu: bool = False) -> Lease:
        """Read-leases keys; with gpu, also places them in the daemon's GPU tier (IPC handles per block)."""
        r = self.call(self.stub.Acquire, pb.AcquireRequest(namespace=namespace, keys=keys, lease_ms=lease_ms,
                                                           gpu=gpu))
        self.arena(r.generation)
        return Lease(r.lease_id, list(r.blocks), r.deadline_unix_ms)

    def release(self, lease_id: int) -> None:
        self.call(self.stub.Release, pb.ReleaseRequest(lease_id=lease_id))

    def put_blocks(self, namespace: str, blocks: Sequence[tuple[bytes, bytes, object]], wait_durable=False,
                   wait_ms: int = 5000, retention: pb.Retention | None = None):
        """Stores (key, parent, data) blocks through shared memory; returns a CommitStatus per block."""
        allocation = self.allocate(len(blocks), wait_ms)
        try:
            entries = _stage(self.arena(), allocation.slots, blocks)
            return self.commit(allocation.id, namespace, entries, wait_durable, retention)
        except BaseException:
            try:  # a refused commit aborts its allocation; one that failed otherwise may not have: abort, ignore "not open"
                self.abort(allocation.id)
            except grpc.RpcError:
                pass  # already gone (expired, or the daemon is down)
            raise

    def get_blocks(self, namespace: str, keys: Sequence[bytes]) -> list[bytes | None]:
        """Copies blocks out of shared memory; None for a miss."""
        lease = self.acquire(namespace, keys)
        try:
            return _copy_out(self.arena(), lease.blocks)
        finally:
            if lease.id:
                self.release(lease.id)

    # streamed fallback
    def put(self, namespace: str, key: bytes, data, parent: bytes = b"", wait_durable=False,
            retention: pb.Retention | None = None) -> int:
        return self.stub.Put(_put_messages(namespace, key, data, parent, wait_durable, retention),
                             metadata=self.call_metadata).status

    def get(self, namespace: str, key: bytes) -> tuple[pb.BlockInfo, bytes]:
        stream = self.stub.Get(pb.GetRequest(namespace=namespace, key=key), metadata=self.call_metadata)
        info, parts = None, []
        for message in stream:
            if message.WhichOneof("part") == "info":
                info = message.info
            else:
                parts.append(message.chunk)
        return info, b"".join(parts)

    # inventory and admin
    def inventory(self, namespace="", tier_mask=0, page_size=0, page_token=b"", retention_class="",
                  pin=pb.PIN_ANY) -> pb.InventoryResponse:
        return self.call(self.stub.Inventory, pb.InventoryRequest(
            namespace=namespace, tier_mask=tier_mask, page_size=page_size, page_token=page_token,
            retention_class=retention_class, pin=pin))

    def iter_inventory(self, namespace="", tier_mask=0, page_size=0, retention_class="", pin=pb.PIN_ANY):
        token = b""
        while True:
            page = self.inventory(namespace, tier_mask, page_size, token, retention_class, pin)
            yield from page.blocks
            token = page.next_page_token
            if not token:
                return

    def stat(self, namespace: str, key: bytes) -> pb.BlockInfo:
        return self.call(self.stub.Stat, pb.StatRequest(namespace=namespace, key=key))

    def stats(self) -> pb.StatsResponse:
        return self.call(self.stub.Stats, pb.StatsRequest())

    def delete(self, namespace: str, keys: Sequence[bytes]) -> pb.DeleteResponse:
        return self.call(self.stub.Delete, pb.DeleteRequest(namespace=namespace, keys=keys))

    def clear(self, namespace: str) -> int:
        return self.call(self.stub.Clear, pb.ClearRequest(namespace=namespace)).deleted

    def remove_namespace(self, namespace: str) -> int:
        """Admin: deletes the namespace's blocks and forgets it; returns the blocks deleted."""
        return self.call(self.stub.RemoveNamespace, pb.RemoveNamespaceRequest(namespace=namespace)).deleted

    def watch(self, from_seq: int = 0, namespace: str = "", timeout: float | None = None):
        """A cancellable iterator of Events (call .cancel() on it to stop). `timeout`: a deadline
        in seconds for the whole stream (None: open until cancelled or ended by the daemon)."""
        return self.stub.Watch(pb.WatchRequest(from_seq=from_seq, namespace=namespace), metadata=self.call_metadata,
                               timeout=timeout)


class AsyncClient(_Sessioned):
    """asyncio client with the same methods as Client (awaitables). The local session's handshake
    is a few small blocking socket calls on this host, done inline."""

    def __init__(self, address: str = DEFAULT_SOCKET, token: str | None = None, tls_ca: str | None = None,
                 timeout: float | None = None):
        self.timeout = timeout
        self._channel, self._metadata, session_path = _open_channel(grpc.aio, address, token, tls_ca)
        self._init_session(session_path, grpc.aio, _channel_args(None)[0])
        self._stub = pb_grpc.KvTierStub(self._channel)
        self._arena: Arena | None = None

    async def close(self) -> None:
        if self._arena is not None:
            self._arena.close()
        self._drop_session()
        if self._session_channel is not None:
            await self._session_channel.close()
        self._release_socket_slot()
        await self._channel.close()

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        await self.close()

    async def call(self, method, request):
        """Any unary RPC (a stub method) with this client's token or session and deadline (retried
        once on a new session when the old one ended)."""
        session, metadata = self._session_and_metadata()
        try:
            return await method(request, metadata=metadata, timeout=self.timeout)
        except grpc.RpcError as exc:
            if not self._retry_on_new_session(session, exc):
                raise
            return await method(request, metadata=self.call_metadata, timeout=self._renew_wait_s(),
                                wait_for_ready=True)  # as Client.call

    async def register_namespace(self, name: str, attributes: dict[str, str] | None = None) -> bool:
        return (await self.call(self.stub.RegisterNamespace,
                                 pb.RegisterNamespaceRequest(name=name, attributes=attributes or {}))).created

    async def lookup(self, namespace: str, keys: Sequence[bytes]) -> pb.LookupResponse:
        return await self.call(self.stub.Lookup, pb.LookupRequest(namespace=namespace, keys=keys))

    async def arena(self, generation: str | None = None) -> Arena:
        if self._arena is None or (generation and generation != self._arena.generation):
            if self._arena is not None:
                self._arena.close()
            self._arena = None
            self._arena = self._mapped_arena(await self.call(self.stub.ArenaInfo, pb.ArenaInfoRequest()))
        return self._arena

    async def allocate(self, count: int, wait_ms: int = 5000, lease_ms: int = 0) -> Allocation:
        r = await self.call(self.stub.Allocate, pb.AllocateRequest(count=count, wait_ms=wait_ms,
                                                                    lease_ms=lease_ms))
        await self.arena(r.generation)
        return Allocation(r.allocation_id, list(r.slots), r.deadline_unix_ms)

    async def commit(self, allocation_id: int, namespace: str, entries: Iterable[tuple], wait_durable=False):
        return list((await self.call(self.stub.Commit, _commit_request(allocation_id, namespace, entries,
                                                                        wait_durable))).status)

    async def abort(self, allocation_id: int) -> None:
        await self.call(self.stub.Abort, pb.AbortRequest(allocation_id=allocation_id))

    async def acquire(self, namespace: str, keys: Sequence[bytes], lease_ms: int = 0) -> Lease:
        r = await self.call(self.stub.Acquire, pb.AcquireRequest(namespace=namespace, keys=keys,
                                                                  lease_ms=lease_ms))
        await self.arena(r.generation)
        return Lease(r.lease_id, list(r.blocks), r.deadline_unix_ms)

    async def release(self, lease_id: int) -> None:
        await self.call(self.stub.Release, pb.ReleaseRequest(lease_id=lease_id))

    async def put_blocks(self, namespace, blocks, wait_durable=False, wait_ms: int = 5000):
        allocation = await self.allocate(len(blocks), wait_ms)
        try:
            entries = _stage(await self.arena(), allocation.slots, blocks)
            return await self.commit(allocation.id, namespace, entries, wait_durable)
        except BaseException:
            try:
                await self.abort(allocation.id)
            except grpc.RpcError:
                pass
            raise

    async def get_blocks(self, namespace, keys) -> list[bytes | None]:
        lease = await self.acquire(namespace, keys)
        try:
            return _copy_out(await self.arena(), lease.blocks)
        finally:
            if lease.id:
                await self.release(lease.id)

    async def stats(self) -> pb.StatsResponse:
        return await self.call(self.stub.Stats, pb.StatsRequest())

    async def stat(self, namespace: str, key: bytes) -> pb.BlockInfo:
        return await self.call(self.stub.Stat, pb.StatRequest(namespace=namespace, key=key))

    def watch(self, from_seq: int = 0, namespace: str = ""):
        return self.stub.Watch(pb.WatchRequest(from_seq=from_seq, namespace=namespace), metadata=self.call_metadata)
