"""kvtierd: serve the block store over gRPC on a Unix socket (and optionally TCP with auth).

Start-up order matters: lock the data dir, recover the disk tier, then listen, then READY=1.
Shutdown (SIGTERM/SIGINT): STOPPING=1, stop accepting calls, drain the write-through backlog
within a bound, close the tiers, remove the socket.
Under systemd (packaging/kvtierd.service): WATCHDOG=1 pings from the event loop when WatchdogSec=
is set, STATUS= lines with blocks and backlog, and SIGHUP reloads what can change without a restart
(log_level), between RELOADING=1 and READY=1.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import dataclasses
import fcntl
import logging
import os
import signal
import socket
import sys

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from kvtier.proto.v1 import kvtier_pb2 as pb

from . import config as config_mod
from . import mac
from .metrics import serve_metrics
from .notify import monotonic_usec, sd_notify, watchdog_period_s
from . import peers as peers_mod
from .auth import AuthConfigError, LocalIdentities, Principal, TokenTable
from .errors import unauthenticated
from .peers import PeerService
from .service import KvTierService, Validator, add_to_server
from .s3sync import S3Refused
from .sessions import METADATA_KEY, Sessions, session_path
from . import local_sockets
from .store import BlockStore, wait_event

log = logging.getLogger("kvtierd")
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["KvTier"].full_name
# Shutdown takes at most GRPC_GRACE_S + DRAIN_TIMEOUT_S plus closing the tiers: keep the sum well
# below TimeoutStopSec= in packaging/kvtierd.service (60 s), or systemd SIGKILLs a draining daemon.
GRPC_GRACE_S = 5.0
DRAIN_TIMEOUT_S = 30.0
HEALTH_INTERVAL_S = 1.0     # how often health follows the store's problems
STATUS_INTERVAL_S = 10.0    # STATUS= refresh when there is no watchdog to piggyback on
RELOADABLE = {"log_level"}  # config keys SIGHUP applies; any other change needs a restart


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="kvtierd", description="kvtier KV-cache block store daemon")
    parser.add_argument("-c", "--config", help="TOML config file (embedded defaults when omitted)")
    parser.add_argument("--data-dir", help="override data_dir")
    parser.add_argument("--socket", help="override server.socket")
    parser.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    parser.add_argument("--check-config", action="store_true", help="validate the config, print it, and exit")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    overrides = _overrides(args)
    try:
        cfg = config_mod.load(args.config, overrides)
    except config_mod.ConfigError as exc:
        print(f"kvtierd: invalid configuration: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=cfg.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.check_config:
        print(printable_config(cfg))
        return 0
    try:
        asyncio.run(serve(cfg, Reloader(args.config, overrides, cfg)))
    except StartupError as exc:
        log.error("%s", exc)
        return 1
    return 0


def printable_config(cfg: config_mod.Config) -> config_mod.Config:
    """A copy of `cfg` fit for a terminal or a support ticket: identifiers that name a credential are
    masked. Secrets themselves never are in the config (only paths to the files holding them, which
    are shown: the files are not read here)."""
    return dataclasses.replace(cfg, s3=dataclasses.replace(cfg.s3, access_key_id=mask(cfg.s3.access_key_id)))


def mask(identifier: str) -> str:
    """The first 4 characters and "..." (for an AWS key id, its type: AKIA long-term, ASIA temporary);
    "..." alone under 12 characters, where 4 would give away too much; "" stays "" (not set).
    ASCII on purpose: the output must print on any terminal encoding."""
    if not identifier:
        return ""
    return identifier[:4] + "..." if len(identifier) >= 12 else "..."


def _overrides(args) -> dict:
    """Command-line settings: they win over the config file, at start and on every reload."""
    overrides = {k: v for k, v in {"data_dir": args.data_dir, "log_level": args.log_level}.items() if v}
    if args.socket:
        overrides["server"] = {"socket": args.socket}
    return overrides


class StartupError(Exception):
    pass


def lock_data_dir(data_dir: str) -> int:
    """Locks the data dir itself (flock on the directory), so that removing or replacing a lock file
    cannot let a second kvtierd in; kvtierd.lock only tells the owner's pid to whoever looks."""
    os.makedirs(data_dir, mode=0o700, exist_ok=True)
    fd = os.open(data_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError as exc:
        os.close(fd)
        raise StartupError(f"data dir {data_dir} is in use by another kvtierd (pid {_lock_owner(data_dir)})") from exc
    with open(os.path.join(data_dir, "kvtierd.lock"), "w", encoding="utf-8") as file:
        file.write(f"{os.getpid()}\n")
    return fd


def _lock_owner(data_dir: str) -> str:
    try:
        with open(os.path.join(data_dir, "kvtierd.lock"), encoding="utf-8") as file:
            return file.read(32).strip() or "?"
    except OSError:
        return "?"


def prepare_socket_path(path: str) -> None:
    """Removes a stale socket file; refuses if a live daemon answers on it."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if not os.path.exists(path):
        return
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except OSError:
        os.remove(path)
        return
    finally:
        probe.close()
    raise StartupError(f"socket {path} is in use by a running server")


class TokenAuth(grpc.aio.ServerInterceptor):
    """Authentication for the TCP listener: every call (health and reflection too) needs a valid,
    unexpired bearer token. What the caller may then touch is the service's business
    (`identify`): the Unix-socket listener relies on its file permissions instead."""

    def __init__(self, tokens: TokenTable):
        self.tokens = tokens

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        supplied = dict(details.invocation_metadata or ()).get("authorization", "")
        if handler is None or self.tokens.resolve(supplied) is not None:
            return handler
        return _denying(handler)

    def identify(self, context) -> Principal:
        principal = self.tokens.resolve(dict(context.invocation_metadata() or ()).get("authorization", ""))
        if principal is None:  # the interceptor let it through: it expired in between
            raise unauthenticated("missing, wrong or expired bearer token")
        return principal


class SessionAuth:
    """Authentication for the Unix-socket listener: every kvtier.v1 call needs an open local session
    (metadata x-kvtier-session, daemon/sessions.py), which names the caller by its uid. The service
    calls `identify` before every method (service._unary), so no interceptor runs per call: a
    Python interceptor cost about 7% of the shared-memory put+get path. Health and reflection answer
    anyone who can open the socket: they say nothing about any tenant's blocks."""

    def __init__(self, sessions: Sessions, part_index: int | None, where: str):
        self.sessions = sessions
        self.part_index = part_index  # the principal socket's arena part; None: the shared socket
        self.where = where

    def identify(self, context) -> Principal:
        session_id = dict(context.invocation_metadata() or ()).get(METADATA_KEY, "")
        principal = self.sessions.owner_on(session_id, self.part_index, self.where)
        if principal is not None:
            return principal
        if self.part_index is None:
            raise unauthenticated(SHARED_SOCKET)
        raise unauthenticated(NO_SESSION)


NO_TOKEN = "missing, wrong or expired bearer token"
NO_SESSION = ("no open local session of this socket's principal: a Unix-socket client opens one on "
              "<socket>.session first and calls through the socket descriptor it receives (kvtier.client.Client does)")
SHARED_SOCKET = ("kvtier.v1 calls are not served on the shared socket (it answers health and reflection): open a "
                 "local session on <socket>.session and call through the socket descriptor it receives "
                 "(kvtier.client.Client does)")


def _denying(handler):
    async def deny_unary(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, NO_TOKEN)

    async def deny_stream(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, NO_TOKEN)
        yield  # pragma: no cover - makes this an async generator

    kinds = {(False, False): (grpc.unary_unary_rpc_method_handler, deny_unary),
             (False, True): (grpc.unary_stream_rpc_method_handler, deny_stream),
             (True, False): (grpc.stream_unary_rpc_method_handler, deny_unary),
             (True, True): (grpc.stream_stream_rpc_method_handler, deny_stream)}
    make, behaviour = kinds[(handler.request_streaming, handler.response_streaming)]
    return make(behaviour, request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)


def _server(cfg: config_mod.Config, servicer, health_servicer, interceptors=(), max_connections: int = 0):
    server = _bare_server(cfg, interceptors, max_connections)
    add_to_server(server, servicer, "KvTier")
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        [SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME], server)
    return server


def _bare_server(cfg: config_mod.Config, interceptors=(), max_connections: int = 0):
    """A gRPC server; `max_connections` (0: none given) closes connections past it at once: each one
    holds a descriptor of kvtierd's (daemon/local_sockets.py counts them all)."""
    limit = cfg.server.max_message_bytes
    options = [("grpc.max_receive_message_length", limit), ("grpc.max_send_message_length", limit),
               ("grpc.so_reuseport", 0)]
    if max_connections:
        options.append(("grpc.max_allowed_incoming_connections", max_connections))
    return grpc.aio.server(interceptors=interceptors, options=options)


def _tcp_server(cfg, service, health_servicer):
    try:
        tokens = TokenTable.load(cfg.server.tokens_file)
    except AuthConfigError as exc:
        raise StartupError(str(exc)) from exc
    auth = TokenAuth(tokens)
    log.info("tcp %s: %d bearer tokens loaded from %s", cfg.server.tcp, len(tokens), cfg.server.tokens_file)
    server = _server(cfg, _seen_as(service, auth.identify), health_servicer, interceptors=[auth],
                     max_connections=cfg.server.max_tcp_connections)
    with open(cfg.server.tls_cert, "rb") as c, open(cfg.server.tls_key, "rb") as k:
        server.add_secure_port(cfg.server.tcp, grpc.ssl_server_credentials([(k.read(), c.read())]))
    return server


def _peer_server(cfg, store, transport):
    """The peer API on peers.listen: mutual TLS, KvTierPeer only."""
    server = _bare_server(cfg, max_connections=local_sockets.PEER_CONNECTIONS)
    add_to_server(server, PeerService(cfg, store, transport, Validator(cfg.limits)), "KvTierPeer")
    server.add_secure_port(cfg.peers.listen, peers_mod.server_credentials(cfg))
    return server


def _not_dumpable() -> None:
    """PR_SET_DUMPABLE 0 once started (the export agent, exec'ed before, stays dumpable: same-node
    peers' cma READs target it): no core dump holds the arena or the cluster key, and no other
    process of this uid that is not root (a compromised export agent, an engine run as the same
    user) may ptrace kvtierd or process_vm_readv/writev its memory."""
    import ctypes  # noqa: PLC0415
    if ctypes.CDLL(None, use_errno=True).prctl(4, 0, 0, 0, 0) != 0:  # PR_SET_DUMPABLE
        log.warning("prctl(PR_SET_DUMPABLE, 0) failed (errno %d): kvtierd stays dumpable", ctypes.get_errno())


def _start_peers(cfg, store):
    """(transport or None, fetcher or None); logs which transport peers use and why."""
    if not (cfg.peers.listen or cfg.peers.addresses):
        return None, None
    try:
        transport, why = peers_mod.open_transport(cfg, store)
    except RuntimeError as exc:
        raise StartupError(str(exc)) from exc
    if transport is None:
        log.warning("peers: NIXL not in use (%s): blocks move over streamed gRPC", why)
    else:
        agent = getattr(transport, "agent", None)
        log.info("peers: NIXL in use: pulls READ into the CPU arena (%d MiB)%s", store.arena.size_bytes >> 20,
                 f"; peers READ only the export window, in export agent pid {agent.pid}" if agent is not None
                 else "; this node exports nothing (no peers.listen)")
        if agent is not None:  # supervised: a dead export agent stops the daemon (FATAL)
            store._spawn(transport.watch(), "nixl-export-agent")
    fetcher = peers_mod.PeerFetcher(cfg, store, transport, why) if cfg.peers.addresses else None
    store.peers = fetcher
    return transport, fetcher


async def serve(cfg: config_mod.Config, reloader: "Reloader | None" = None) -> None:
    # SIGHUP's default action is to terminate: until the reload handler is in place, ignore it.
    asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, log.warning, "SIGHUP ignored: still starting")
    lock_fd = lock_data_dir(cfg.data_dir)
    try:
        limit, budget = local_sockets.ensure_descriptors(cfg)
    except local_sockets.LocalSocketError as exc:
        raise StartupError(str(exc)) from exc
    log.info("file descriptors: limit %d, connection bounds and kvtierd's own files need at most %d", limit, budget)
    try:
        mac.cluster_key(cfg)  # read once up front: a bad key stops the start here, in one line
    except mac.ClusterKeyError as exc:
        raise StartupError(str(exc)) from exc
    sd_notify("STATUS=recovering the disk tier")
    try:
        store = BlockStore(cfg)
    except OSError as exc:  # e.g. /dev/shm cannot hold the arena: say so in one line
        raise StartupError(str(exc)) from exc
    try:
        report = await store.start()
    except S3Refused as exc:
        raise StartupError(str(exc)) from exc
    log.info("recovery: %s; %d blocks in %d namespaces", report, store.catalog.blocks,
             len(store.catalog.namespaces))
    kv_events = await _start_kv_events(cfg, store)
    transport, peers = _start_peers(cfg, store)
    _not_dumpable()  # before any listener: no peer may reach the export agent while kvtierd is traceable
    servers, health_servicer = await _listen(cfg, store, transport, peers)
    metrics = serve_metrics(store, cfg.metrics.listen, cfg.metrics.allow_remote) if cfg.metrics.listen else None
    stop = asyncio.Event()
    store._spawn(_report_health(store, health_servicer, stop), "health")
    beat = Heartbeat(lambda: status_line(store, draining=stop.is_set()), watchdog_period_s())
    _install_signal_handlers(stop, beat, reloader)
    log.info("kvtierd ready on unix:%s%s%s (cpu %d MiB in %d slots, disk %s)", cfg.server.socket,
             f" and tcp {cfg.server.tcp}" if cfg.server.tcp else "",
             f", peers on {cfg.peers.listen}" if cfg.peers.listen else "", store.arena.size_bytes >> 20,
             store.arena.slot_count, f"{cfg.disk.capacity >> 20} MiB" if cfg.disk.enabled else "off")
    beat.beat("READY=1")
    beat_task = asyncio.get_running_loop().create_task(beat.run(), name="sd-heartbeat")
    await stop.wait()
    beat.beat()  # STATUS=draining ...; the heartbeat keeps it fresh while the backlog drains
    await _shut_down(cfg, store, servers, health_servicer, _closer(peers, transport))
    beat_task.cancel()
    if kv_events is not None:
        await kv_events.close()
    if metrics is not None:
        metrics[0].shutdown()
    os.close(lock_fd)
    log.info("kvtierd stopped")


async def _report_health(store: BlockStore, health_servicer, stop: asyncio.Event) -> None:
    """NOT_SERVING (with a log line saying why) while the store cannot keep its promises, e.g. the
    disk write-through or the S3 upload is stuck; SERVING again once it can."""
    current = None
    while True:  # supervised by the store: it must never end by itself, only be cancelled at close
        if stop.is_set():  # draining: health is already NOT_SERVING for good
            await asyncio.sleep(HEALTH_INTERVAL_S)
            continue
        problem = store.problem()
        if problem != current:
            status = health_pb2.HealthCheckResponse.NOT_SERVING if problem else health_pb2.HealthCheckResponse.SERVING
            if problem:
                log.error("health: NOT_SERVING: %s", problem)
            elif current is not None:
                log.warning("health: SERVING again")
            await health_servicer.set(SERVICE_NAME, status)
            await health_servicer.set("", status)
            current = problem
        await wait_event(stop, HEALTH_INTERVAL_S)


async def _start_kv_events(cfg: config_mod.Config, store: BlockStore):
    """Block events in vLLM's KV-event wire format over ZMQ (docs/kv-events.md), when configured: the
    node-wide stream (events.zmq_*, every namespace: the administrators' router) and each tenant's
    own ([[tenant]] events_endpoint: only its namespaces). Returns what to close(), or None."""
    node_wide = cfg.events.zmq_endpoint or cfg.events.zmq_connect
    streams = [(None, cfg.events.zmq_endpoint, cfg.events.zmq_replay_endpoint, cfg.events.ipc_mode,
                cfg.events.ipc_gid, cfg.events.zmq_connect)] if node_wide else []
    streams += [(t.name, t.events_endpoint, t.events_replay_endpoint, t.events_ipc_mode, t.events_gid, [])
                for t in cfg.tenant if t.events_endpoint]
    if not streams:
        return None
    import zmq  # noqa: PLC0415 - pyzmq only when the feature is on

    from .kv_events import EndpointError, KvEventStreams, ZmqKvEventPublisher  # noqa: PLC0415
    _check_event_groups(cfg, streams)
    events = cfg.events
    mediums = {pb.TIER_GPU: events.zmq_medium_gpu, pb.TIER_CPU: events.zmq_medium_cpu,
               pb.TIER_DISK: events.zmq_medium_disk, pb.TIER_S3: events.zmq_medium_s3}
    started = KvEventStreams()
    for tenant, endpoint, replay, ipc_mode, ipc_gid, connect in streams:
        # Started after recovery and before serving: it announces every re-adopted block (AllBlocksCleared,
        # then BlockStored per block and tier), consistent with the event stream that follows.
        publisher = ZmqKvEventPublisher(store.events, endpoint, replay or None,
                                        topic=events.zmq_topic, worker=events.zmq_worker, model=events.zmq_model,
                                        hash_format=events.zmq_block_hashes, block_size=events.zmq_block_size,
                                        mediums=mediums, catalog=store.catalog, ipc_mode=ipc_mode,
                                        connect=connect, tenant=tenant, ipc_gid=ipc_gid)
        whose = "every namespace" if tenant is None else f"tenant {tenant}'s namespaces"
        try:  # an ipc:// socket file has its mode and group before it appears at its path
            await publisher.start()
        except (EndpointError, zmq.ZMQError, OSError) as exc:
            await started.close()
            raise StartupError(f"KV events ({whose}): {exc}") from exc
        started.add(publisher)
        ipc = (f" (socket files mode {ipc_mode:04o}{f', group {ipc_gid}' if ipc_gid >= 0 else ''})"
               if endpoint.startswith("ipc://") else "")
        log.info("KV events (vLLM format)%s on %s%s%s%s", "" if tenant is None else f" of {whose}",
                 publisher.endpoint or "no endpoint of its own",
                 f", replay on {publisher.replay_endpoint}" if publisher.replay_endpoint else "", ipc,
                 f"; connecting to {', '.join(publisher.connect)}" if publisher.connect else "")
    return started


def _check_event_groups(cfg: config_mod.Config, streams) -> None:
    """With tenants, no event stream's group may be kvtierd's own: the tenants' users join it to reach
    server.socket. And the operator's acknowledgement of tcp:// event endpoints is logged."""
    if not cfg.tenant:
        return
    for tenant, endpoint, replay, _, gid, connect in streams:
        key = "events.ipc_gid" if tenant is None else f"events_gid of tenant {tenant}"
        if gid >= 0 and gid == os.getegid() and endpoint.startswith("ipc://"):
            raise StartupError(f"KV events: {key} {gid} is kvtierd's own group, which the tenants' users join to "
                               "reach server.socket: name a group only that stream's router is in")
        tcp = [e for e in (endpoint, replay, *connect) if e.startswith("tcp://")]
        if tcp and cfg.events.allow_tcp_with_tenants:
            log.warning("KV events of %s on %s: tcp with [[tenant]] tables (events.allow_tcp_with_tenants): any "
                        "local user can connect and read the token ids of these prompts",
                        "every tenant" if tenant is None else f"tenant {tenant}", ", ".join(tcp))


async def _listen(cfg: config_mod.Config, store: BlockStore, transport, peers):
    """Starts the local session socket and the gRPC servers (the shared Unix socket, one private
    socket per principal, optional TCP and peer API); returns them and the health servicer."""
    health_servicer = health.aio.HealthServicer()
    identities = LocalIdentities(cfg.server.admin_uids, cfg.server.admin_gids, cfg.tenant, os.geteuid())
    sessions = Sessions(identities, store.arena, cfg.server.max_sessions,
                        {t.name: t.max_sessions for t in cfg.tenant}, cfg.server.max_connections_per_uid)
    store.sessions = sessions
    # One service, seen through each listener with that listener's identify: its counters (watchers,
    # pulls per tenant) are one set whichever socket a tenant's calls come through.
    service = KvTierService(store, cfg.limits, peers=peers, tenants=cfg.tenant)
    servers = [_server(cfg, _seen_as(service, SessionAuth(sessions, None, "the shared socket").identify),
                       health_servicer, max_connections=cfg.server.max_shared_connections)]
    prepare_socket_path(cfg.server.socket)
    servers[0].add_insecure_port(f"unix:{os.path.abspath(cfg.server.socket)}")
    private = _principal_servers(cfg, store, sessions, service, health_servicer)
    servers += private
    if cfg.server.tcp:
        servers.append(_tcp_server(cfg, service, health_servicer))
    if cfg.peers.listen:
        servers.append(_peer_server(cfg, store, transport))
    for server in servers:
        await server.start()
    for index in range(len(private)):  # 0666 inside a 0700 directory: reachable through the descriptor only
        path = local_sockets.principal_socket(cfg.server.socket, index)
        os.chmod(path, 0o666)
        sessions.set_grpc_socket(index, local_sockets.open_socket_descriptor(path))
    os.chmod(cfg.server.socket, cfg.server.socket_mode)
    prepare_socket_path(session_path(cfg.server.socket))
    session_server = await sessions.serve(session_path(cfg.server.socket), cfg.server.socket_mode)
    await health_servicer.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    return servers + [_SessionServer(session_server)], health_servicer


def _principal_servers(cfg, store: BlockStore, sessions: Sessions, service, health_servicer) -> list:
    """One gRPC server per arena part (its principal's socket), in part order."""
    try:
        local_sockets.prepare_private_dir(cfg.server.socket)
    except (local_sockets.LocalSocketError, OSError) as exc:
        raise StartupError(f"server.socket: {exc}") from exc
    bounds = {t.name: t.max_connections for t in cfg.tenant}
    servers = []
    for index, part in enumerate(store.arena.parts):
        where = f"tenant {part.name}'s socket" if part.name else "the administrators' socket"
        server = _server(cfg, _seen_as(service, SessionAuth(sessions, index, where).identify), health_servicer,
                         max_connections=bounds.get(part.name, cfg.server.max_admin_connections))
        server.add_insecure_port(f"unix:{local_sockets.principal_socket(cfg.server.socket, index)}")
        servers.append(server)
    return servers


def _seen_as(service: KvTierService, identify) -> KvTierService:
    """The same service (a shallow copy: store, counters and every other attribute are the same
    objects) answering with another listener's `identify`."""
    view = copy.copy(service)
    view.identify = identify
    return view


class _SessionServer:
    """The session listener with a gRPC server's stop(grace): stops accepting new sessions (open
    ones end with the event loop)."""

    def __init__(self, server: asyncio.AbstractServer):
        self.server = server

    async def stop(self, grace: float) -> None:
        self.server.close()
        await self.server.wait_closed()


def _install_signal_handlers(stop: asyncio.Event, beat: "Heartbeat", reloader: "Reloader | None") -> None:
    loop = asyncio.get_running_loop()

    def on_stop():
        if not stop.is_set():
            sd_notify("STOPPING=1")  # before anything can report "draining"
            stop.set()

    def on_reload():
        if not stop.is_set():
            reloader()
            beat.beat()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_stop)
    if reloader is not None:
        loop.add_signal_handler(signal.SIGHUP, on_reload)


def _closer(peers, transport):
    async def close_peers():
        if peers is not None:
            await peers.close()  # closes the transport too
        elif transport is not None:
            await asyncio.to_thread(transport.close)
    return close_peers


async def _shut_down(cfg: config_mod.Config, store: BlockStore, servers, health_servicer, close_peers) -> None:
    """Stops accepting calls, closes the peer transport (before the arena it reads into is unmapped),
    drains the write-through backlog within DRAIN_TIMEOUT_S, removes the socket."""
    log.info("shutting down: %d blocks waiting for write-through", store.backlog)
    await health_servicer.enter_graceful_shutdown()
    await asyncio.gather(*(server.stop(grace=GRPC_GRACE_S) for server in servers))
    await close_peers()
    left = await store.close(DRAIN_TIMEOUT_S)
    if left:
        log.error("shutdown: %d blocks were not written through in %.0fs and are lost", left, DRAIN_TIMEOUT_S)
    for path in (cfg.server.socket, session_path(cfg.server.socket)):
        try:
            os.remove(path)
        except FileNotFoundError:
            pass


def status_line(store: BlockStore, draining: bool = False) -> str:
    """The STATUS= text `systemctl status kvtierd` shows."""
    backlog = f"write backlog {store.backlog}"
    if store.s3sync is not None:
        backlog += f", upload backlog {store.s3sync.backlog}"
    if draining:
        return f"draining: {backlog}"
    return f"serving {store.catalog.blocks} blocks, {backlog}"


class Heartbeat:
    """sd_notify from the event loop: WATCHDOG=1 every half watchdog period, STATUS= when it changed.

    run() is an asyncio task on purpose: if the event loop is stuck (a blocking call, a deadlock on
    the loop thread), the pings stop and systemd (WatchdogSec=) kills and restarts the daemon.
    Busy worker threads do not stop them; only the loop that serves the calls matters.
    """

    def __init__(self, describe, watchdog_s: float | None):
        self.describe = describe
        self.watchdog_s = watchdog_s
        self.interval_s = watchdog_s / 2 if watchdog_s else STATUS_INTERVAL_S
        self._status: str | None = None

    def beat(self, *states: str) -> None:
        """Sends `states` plus STATUS= if the status text changed since it was last sent."""
        lines = list(states)
        status = self.describe()
        if status != self._status:
            lines.append(f"STATUS={status}")
            self._status = status
        if lines:
            sd_notify("\n".join(lines))

    async def run(self) -> None:
        ping = ("WATCHDOG=1",) if self.watchdog_s else ()
        while True:
            await asyncio.sleep(self.interval_s)
            self.beat(*ping)


class Reloader:
    """SIGHUP: re-reads the config file (with the command-line overrides), applies log_level, and logs
    every other changed key as needing a restart.  An unreadable or invalid file changes nothing."""

    def __init__(self, path: str | None, overrides: dict, running: config_mod.Config):
        self.path = path
        self.overrides = overrides
        self.running = running

    def __call__(self) -> None:
        sd_notify(f"RELOADING=1\nMONOTONIC_USEC={monotonic_usec()}")
        try:
            self.reload()
        finally:
            sd_notify("READY=1")

    def reload(self) -> None:
        if not self.path:
            log.info("reload: started without -c, no config file to re-read")
            return
        try:
            new = config_mod.load(self.path, self.overrides)
        except (config_mod.ConfigError, OSError) as exc:
            log.error("reload: invalid config, keeping the running one: %s", exc)
            return
        changed = changed_keys(self.running, new)
        if "log_level" in changed:
            set_log_level(self.running.log_level, new.log_level)
            self.running.log_level = new.log_level
        restart = sorted(changed - RELOADABLE)
        if restart:
            log.warning("reload: needs a restart: %s", ", ".join(restart))
        elif not changed:
            log.info("reload: %s unchanged", self.path)


def changed_keys(old: config_mod.Config, new: config_mod.Config) -> set[str]:
    """Dotted names ("cpu.capacity") of the settings that differ."""
    before, after = _flatten(dataclasses.asdict(old)), _flatten(dataclasses.asdict(new))
    return {key for key in before.keys() | after.keys() if before.get(key) != after.get(key)}


def _flatten(table: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in table.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value
    return flat


def set_log_level(old: str, new: str) -> None:
    """Sets the root logger's level (the kvtierd loggers inherit it); the message announcing the change
    passes both the old and the new level's filter."""
    root = logging.getLogger()
    old_level, new_level = logging.getLevelName(old.upper()), logging.getLevelName(new.upper())
    root.setLevel(min(old_level, new_level))
    log.log(max(logging.INFO, min(old_level, new_level)), "reload: log_level %s -> %s applied", old, new)
    root.setLevel(new_level)


if __name__ == "__main__":
    sys.exit(main())
