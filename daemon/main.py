"""kvtierd: serve the block store over gRPC on a Unix socket (and optionally TCP with auth).

Start-up order matters: lock the data dir, recover the disk tier, then listen, then READY=1.
Shutdown (SIGTERM/SIGINT): STOPPING=1, stop accepting calls, drain the write-through backlog
within a bound, close the tiers, remove the socket.
"""

from __future__ import annotations

import argparse
import asyncio
import fcntl
import hmac
import logging
import os
import signal
import socket
import sys

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from kvtier.proto.v1 import kvtier_pb2 as pb
from kvtier.proto.v1 import kvtier_pb2_grpc as pb_grpc

from . import config as config_mod
from .metrics import serve_metrics
from .notify import sd_notify
from .service import KvTierService
from .store import BlockStore

log = logging.getLogger("kvtierd")
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["KvTier"].full_name
DRAIN_TIMEOUT_S = 30.0


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
    overrides = {k: v for k, v in {"data_dir": args.data_dir, "log_level": args.log_level}.items() if v}
    if args.socket:
        overrides["server"] = {"socket": args.socket}
    try:
        cfg = config_mod.load(args.config, overrides)
    except config_mod.ConfigError as exc:
        print(f"kvtierd: invalid configuration: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=cfg.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.check_config:
        print(cfg)
        return 0
    try:
        asyncio.run(serve(cfg))
    except StartupError as exc:
        log.error("%s", exc)
        return 1
    return 0


class StartupError(Exception):
    pass


def lock_data_dir(data_dir: str) -> int:
    os.makedirs(data_dir, mode=0o700, exist_ok=True)
    fd = os.open(os.path.join(data_dir, "kvtierd.lock"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError as exc:
        owner = os.pread(fd, 32, 0).decode(errors="replace").strip()
        os.close(fd)
        raise StartupError(f"data dir {data_dir} is in use by another kvtierd (pid {owner or '?'})") from exc
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


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
    """Bearer-token check for the TCP listener; the UDS listener relies on file permissions."""

    def __init__(self, token: str):
        self._expected = f"Bearer {token}".encode()

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        supplied = dict(details.invocation_metadata or ()).get("authorization", "")
        if handler is None or hmac.compare_digest(supplied.encode(), self._expected):
            return handler
        return _denying(handler)


def _denying(handler):
    async def deny_unary(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token")

    async def deny_stream(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token")
        yield  # pragma: no cover - makes this an async generator

    kinds = {(False, False): (grpc.unary_unary_rpc_method_handler, deny_unary),
             (False, True): (grpc.unary_stream_rpc_method_handler, deny_stream),
             (True, False): (grpc.stream_unary_rpc_method_handler, deny_unary),
             (True, True): (grpc.stream_stream_rpc_method_handler, deny_stream)}
    make, behaviour = kinds[(handler.request_streaming, handler.response_streaming)]
    return make(behaviour, request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)


def _server(cfg: config_mod.Config, servicer, health_servicer, interceptors=()):
    limit = cfg.server.max_message_bytes
    server = grpc.aio.server(interceptors=interceptors, options=[
        ("grpc.max_receive_message_length", limit), ("grpc.max_send_message_length", limit),
        ("grpc.so_reuseport", 0)])
    pb_grpc.add_KvTierServicer_to_server(servicer, server)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        [SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME], server)
    return server


def _tcp_server(cfg, servicer, health_servicer):
    with open(cfg.server.tcp_token_file, encoding="utf-8") as file:
        token = file.read().strip()
    if len(token) < 16:
        raise StartupError(f"{cfg.server.tcp_token_file}: the token must be at least 16 characters")
    server = _server(cfg, servicer, health_servicer, interceptors=[TokenAuth(token)])
    if cfg.server.tls_cert:
        with open(cfg.server.tls_cert, "rb") as c, open(cfg.server.tls_key, "rb") as k:
            server.add_secure_port(cfg.server.tcp, grpc.ssl_server_credentials([(k.read(), c.read())]))
    else:
        server.add_insecure_port(cfg.server.tcp)
    return server


async def serve(cfg: config_mod.Config) -> None:
    lock_fd = lock_data_dir(cfg.data_dir)
    sd_notify("STATUS=recovering the disk tier")
    store = BlockStore(cfg)
    report = await store.start()
    log.info("recovery: %s; %d blocks in %d namespaces", report, store.catalog.blocks,
             len(store.catalog.namespaces))
    servicer = KvTierService(store, cfg.limits)
    health_servicer = health.aio.HealthServicer()
    servers = [_server(cfg, servicer, health_servicer)]
    prepare_socket_path(cfg.server.socket)
    servers[0].add_insecure_port(f"unix:{os.path.abspath(cfg.server.socket)}")
    if cfg.server.tcp:
        servers.append(_tcp_server(cfg, servicer, health_servicer))
    for server in servers:
        await server.start()
    os.chmod(cfg.server.socket, cfg.server.socket_mode)
    await health_servicer.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    metrics = serve_metrics(store, cfg.metrics.listen) if cfg.metrics.listen else None
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    log.info("kvtierd ready on unix:%s%s (cpu %d MiB in %d slots, disk %s)", cfg.server.socket,
             f" and tcp {cfg.server.tcp}" if cfg.server.tcp else "", store.arena.size_bytes >> 20,
             store.arena.slot_count, f"{cfg.disk.capacity >> 20} MiB" if cfg.disk.enabled else "off")
    sd_notify(f"READY=1\nSTATUS=serving {store.catalog.blocks} blocks")
    await stop.wait()
    sd_notify("STOPPING=1")
    log.info("shutting down: %d blocks waiting for write-through", store.backlog)
    await health_servicer.enter_graceful_shutdown()
    await asyncio.gather(*(server.stop(grace=5) for server in servers))
    left = await store.close(DRAIN_TIMEOUT_S)
    if left:
        log.error("shutdown: %d blocks were not written through in %.0fs and are lost", left, DRAIN_TIMEOUT_S)
    if metrics is not None:
        metrics[0].shutdown()
    try:
        os.remove(cfg.server.socket)
    except FileNotFoundError:
        pass
    os.close(lock_fd)
    log.info("kvtierd stopped")


if __name__ == "__main__":
    sys.exit(main())
