"""The engine connectors' session with the node's kvtierd: one layer shared by the vLLM and SGLang
connectors, which keep only their engine glue.

``DaemonSession`` wraps a ``kvtier.client.Client`` (which opens the local session on the Unix socket
itself) with:

- per-call deadlines: every call takes the session's ``timeout_s`` unless it passes its own (the vLLM
  scheduler's session runs on a short one, its background prefetches on the long one);
- tenant-qualified namespaces: a request's ``namespace`` (``name`` for RegisterNamespace) is prefixed
  with ``client.namespace_prefix`` (``"<tenant>/"``, ``""`` for an administrator), so the connectors'
  own names are the same on every node and the tenant follows from the uid the engine runs as;
- lazy namespace registration: ``with_namespace(fn)`` registers the session's namespaces before the
  first call and again, retrying ``fn`` once, when the daemon answers NOT_FOUND (data dir wiped);
- the daemon's ``limits.max_keys_per_request`` (``max_keys``), asked again after a failure;
- a circuit breaker, below; its counters go into the ``stats`` dict the connector exports.

Circuit breaker. A call that fails as an outage (UNAVAILABLE, DEADLINE_EXCEEDED, a connection error
(OSError), any ``kvtier.client.session.SessionError``, or no local session within the call's deadline)
opens the breaker. While it is open every call raises ``BreakerOpen`` at once, without touching the
daemon: no RPC, no session, no socket. A background thread ("kvtier-breaker") asks the daemon's gRPC
health service (``grpc.health.v1``, which answers without a session) every ``breaker_period_s``,
each probe with the short ``probe_timeout_s`` deadline; the first SERVING answer closes the breaker
and calls go through again. If the daemon then still fails, the first failing call opens it again.
So a hung daemon costs each session at most one call deadline per breaker period (plus at most one
per thread already inside a call when it hung), never one per engine step; with a daemon that stays
hung (SIGSTOP), the probes never succeed and it costs one deadline in all. A daemon that is simply
down (socket refused) costs nothing: those calls fail at once. Other errors (NOT_FOUND,
RESOURCE_EXHAUSTED, INVALID_ARGUMENT, ...) are the caller's and leave the breaker as it is. Every
state change is logged at WARNING (never rate-limited) and counted in ``stats``:

    daemon_calls     calls let through to the daemon      daemon_failures  of them, failed as outages
    daemon_timeouts  of those, past their deadline        short_circuited  calls refused while open
    breaker_opened   times it opened                      breaker_closed   times it closed
    breaker_open     1 while open, else 0                 health_probes    health checks sent
    breaker_trials   trial blocks run while open (below)

Trial calls (half-open). A caller with a reason to think the daemon is back runs its calls inside
``with session.trial():`` (the vLLM worker does for a load: the scheduler just found the blocks in
the daemon, e.g. a daemon that was down when the engine started and is up now, before the next
probe). While the breaker is open, the calls of that block go to the daemon; the first that succeeds
closes the breaker at once, an outage leaves it open. One trial runs at a time (other threads' calls
still short-circuit); each is counted in ``breaker_trials``. A trial costs at most its calls'
deadlines, on the caller's thread.

What a caller sees while it is open: ``BreakerOpen``, a ``grpc.RpcError`` whose ``code()`` is
UNAVAILABLE, so a connector's existing ``except grpc.RpcError`` turns it into a miss or a dropped
save like any other daemon failure.

Thread-safety: one session may be shared by any number of threads (a connector's engine thread,
its prefetch thread, SGLang's storage threads). The breaker state, the counters and the registered
namespaces are kept under one lock; no lock is held during an RPC. ``probe()`` may be called from
any thread (tests drive the breaker with it and a long ``breaker_period_s``).

Known bound outside this layer: the client renews a session the daemon forgot (a daemon restart)
inside its call, with the session socket's own 5 s timeout; only the first session (opened here
under the call's deadline) is bounded by the call deadline.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import threading
import time
from typing import Any, Callable

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from kvtier.client.client import Client, target_of
from kvtier.client.session import LocalSession, SessionError
from kvtier.proto.v1 import kvtier_pb2 as pb

DEFAULT_MAX_KEYS_PER_CALL = 4096  # until the daemon's ArenaInfo says (limits.max_keys_per_request)
DEFAULT_BREAKER_PERIOD_S = 5.0
DEFAULT_PROBE_TIMEOUT_S = 1.0
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["KvTier"].full_name  # the health service's name for it
_OUTAGE_CODES = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
_STATS = ("daemon_calls", "daemon_failures", "daemon_timeouts", "short_circuited", "breaker_opened",
          "breaker_closed", "breaker_open", "health_probes", "breaker_trials")


class BreakerOpen(grpc.RpcError):
    """Raised instead of calling the daemon while the circuit breaker is open (code UNAVAILABLE)."""

    def __init__(self, details: str):
        super().__init__(details)
        self._details = details

    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.UNAVAILABLE

    def details(self) -> str:
        return self._details


class _Deadline(grpc.RpcError):
    """A deadline this layer enforces itself (opening the local session)."""

    def __init__(self, details: str):
        super().__init__(details)
        self._details = details

    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.DEADLINE_EXCEEDED

    def details(self) -> str:
        return self._details


def error_text(error: BaseException) -> str:
    if isinstance(error, grpc.RpcError) and callable(getattr(error, "code", None)):
        return f"{error.code().name}: {error.details()}"
    return repr(error)


def is_outage(error: BaseException) -> bool:
    """Whether `error` says the daemon is unreachable or unresponsive (opens the breaker)."""
    if isinstance(error, BreakerOpen):
        return False
    if isinstance(error, SessionError):
        return True
    if isinstance(error, grpc.RpcError):
        code = getattr(error, "code", None)
        return callable(code) and code() in _OUTAGE_CODES
    return isinstance(error, OSError)


def _timed_out(error: BaseException) -> bool:
    code = getattr(error, "code", None)
    return isinstance(error, grpc.RpcError) and callable(code) and code() == grpc.StatusCode.DEADLINE_EXCEEDED


class RateLimitedLog:
    """Warnings of one kind at most once per `interval_s`; the next one says how many were
    suppressed in between. Thread-safe."""

    def __init__(self, logger: logging.Logger, interval_s: float = 30.0):
        self.logger = logger
        self.interval_s = interval_s
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}
        self._lock = threading.Lock()

    @property
    def suppressed(self) -> dict[str, int]:
        with self._lock:
            return dict(self._suppressed)

    def warning(self, kind: str, message: str, *args) -> None:
        now = time.monotonic()
        with self._lock:
            if now - self._last.get(kind, -1e18) < self.interval_s:
                self._suppressed[kind] = self._suppressed.get(kind, 0) + 1
                return
            self._last[kind] = now
            skipped = self._suppressed.pop(kind, 0)
        suffix = f" ({skipped} similar messages suppressed)" if skipped else ""
        self.logger.warning("kvtier: " + message + suffix, *args, stacklevel=2)  # the caller's line


class DaemonSession:
    """A connector's calls to kvtierd: deadlines, tenant-qualified namespaces, lazy registration,
    a circuit breaker (see the module docstring for the contract).

    `socket`: the daemon's Unix socket. `timeout_s`: the default deadline of a call.
    `namespaces`: {name: attributes} registered lazily (``set_namespaces`` replaces them).
    `breaker_period_s`: how often an open breaker probes the daemon's health; `probe_timeout_s`: each
    probe's deadline. `stats`: the dict the counters go into (the connector's own, so that they are
    exported with it); a new one when None. `logger`: where state changes are logged.
    """

    def __init__(self, socket: str, timeout_s: float = 5.0, namespaces: dict[str, dict[str, str]] | None = None,
                 *, breaker_period_s: float = DEFAULT_BREAKER_PERIOD_S,
                 probe_timeout_s: float = DEFAULT_PROBE_TIMEOUT_S, stats: dict | None = None,
                 logger: logging.Logger | None = None, clock: Callable[[], float] = time.monotonic):
        if breaker_period_s <= 0 or probe_timeout_s <= 0 or timeout_s <= 0:
            raise ValueError("kvtier: timeout_s, breaker_period_s and probe_timeout_s must be > 0")
        self.socket = socket
        self.timeout_s = float(timeout_s)
        self.breaker_period_s = float(breaker_period_s)
        self.probe_timeout_s = float(probe_timeout_s)
        self.logger = logger or logging.getLogger(__name__)
        self.clock = clock
        self.client = Client(socket, timeout=self.timeout_s)
        self.stats = stats if stats is not None else {}
        for name in _STATS:
            self.stats.setdefault(name, 0)
        self._lock = threading.Lock()
        self._arena_lock = threading.Lock()
        self._namespaces: dict[str, dict[str, str]] = dict(namespaces or {})
        self._registered: set[str] = set()
        self._max_keys: int | None = None
        # breaker
        self._open = False
        self._opened_at = 0.0
        self._short_at_open = 0
        self._reason = ""
        self._prober: threading.Thread | None = None
        self._stopped = threading.Event()
        self._trial_running = False  # a trial() block runs in some thread
        self._local = threading.local()  # .trial: this thread's calls go through while open
        self._health_channel = None
        self._health_stub = None
        # the first local session, opened under a call's deadline
        self._session_ready = False
        self._session_future: concurrent.futures.Future | None = None

    # -- calls -----------------------------------------------------------------------------------------
    def call(self, name: str, request, timeout: float | None = None):
        """The unary RPC `name` (a KvTier method) under the breaker, with deadline `timeout` (the
        session's by default). The request's namespace field is qualified in place with the tenant
        prefix: build the request inside the function you retry."""
        deadline = self.timeout_s if timeout is None else float(timeout)

        def rpc():
            field = "name" if name == "RegisterNamespace" else "namespace"
            if hasattr(request, field) and getattr(request, field):
                setattr(request, field, self.client.namespace_prefix + getattr(request, field))
            method = getattr(self.client.stub, name)
            # Client.call keeps its session handling (a renewed session after a daemon restart: its
            # retry passes wait_for_ready) and passes its own deadline; this one replaces it.
            return self.client.call(lambda req, metadata=None, timeout=None, **options: method(
                req, metadata=metadata, timeout=deadline, **options), request)
        return self.guard(rpc, deadline)

    def guard(self, fn: Callable[[], Any], timeout: float | None = None) -> Any:
        """fn() under the breaker: BreakerOpen at once while it is open; an outage fn raises opens it.
        `timeout` bounds opening the first local session (fn's own calls carry their deadlines).
        Inside this thread's trial() block, fn runs even while it is open, and closes it by succeeding."""
        with self._lock:
            trial = self._open and getattr(self._local, "trial", False)
            if self._open and not trial:
                self.stats["short_circuited"] += 1
                raise BreakerOpen(f"kvtierd at {self.socket} is not answering ({self._reason}); circuit "
                                  "breaker open, call not sent")
            self.stats["daemon_calls"] += 1
        try:
            self._ensure_session(self.timeout_s if timeout is None else timeout)
            result = fn()
        except BaseException as error:
            if is_outage(error):
                self._trip(error)
            raise
        if trial:
            self._close_breaker("answered a trial call (half-open)")
        return result

    @contextlib.contextmanager
    def trial(self):
        """A block whose calls go to the daemon even while the breaker is open (half-open): for a caller
        with a reason to think the daemon is back. The first call that succeeds closes the breaker; an
        outage leaves it open. Yields whether this block is a trial (False while closed, or while another
        thread's trial runs: then its calls short-circuit as usual)."""
        with self._lock:
            mine = self._open and not self._trial_running
            if mine:
                self._trial_running = True
                self.stats["breaker_trials"] += 1
        self._local.trial = mine
        try:
            yield mine
        finally:
            self._local.trial = False
            if mine:
                with self._lock:
                    self._trial_running = False

    def arena(self, generation: str | None = None):
        """The mapped arena (client.arena: remapped when `generation` differs), under the breaker. One
        thread maps at a time, so that two threads seeing a daemon restart remap once."""
        def mapped():
            with self._arena_lock:
                return self.client.arena(generation)
        return self.guard(mapped)

    def fresh_arena(self):
        """The mapped arena, checked against the daemon's current generation (one ArenaInfo)."""
        info = self.call("ArenaInfo", pb.ArenaInfoRequest())
        return self.arena(info.generation)

    def max_keys(self, timeout: float | None = None) -> int:
        """The daemon's limits.max_keys_per_request, from ArenaInfo without mapping the arena; asked
        again after `forget_limits` or an outage (the daemon may have restarted with other limits)."""
        value = self._max_keys
        if value is None:
            info = self.call("ArenaInfo", pb.ArenaInfoRequest(), timeout)
            value = self._max_keys = int(info.max_keys_per_request or DEFAULT_MAX_KEYS_PER_CALL)
        return value

    def max_keys_cached(self) -> int | None:
        """max_keys without asking the daemon (None until known): for threads that must not wait."""
        return self._max_keys

    def forget_limits(self) -> None:
        self._max_keys = None

    def warm_up(self, timeout: float) -> threading.Thread:
        """Opens the session, registers the namespaces and asks the limits in a background thread, each
        call under `timeout` (not the session's default): a connector on a short deadline (the vLLM
        scheduler) then starts its first request with one plain RPC, not three plus a session. A
        failure is left to the first real call (the breaker, if it was an outage, opened already)."""
        def run():
            try:
                self._ensure_session(timeout)
                self.ensure_namespaces(timeout=timeout)
                self.max_keys(timeout)
            except Exception as error:  # noqa: BLE001 - reported by the calls that follow
                self.logger.info("kvtier: session warm-up with kvtierd at %s did not complete (%s)", self.socket,
                                 error_text(error))
        thread = threading.Thread(target=run, name="kvtier-warm-up", daemon=True)
        thread.start()
        return thread

    # -- namespaces ------------------------------------------------------------------------------------
    @property
    def namespaces(self) -> dict[str, dict[str, str]]:
        with self._lock:
            return dict(self._namespaces)

    def set_namespaces(self, namespaces: dict[str, dict[str, str]]) -> None:
        """Replaces the namespaces `with_namespace` registers (unqualified names)."""
        with self._lock:
            self._namespaces = dict(namespaces)

    def ensure_namespaces(self, force: bool = False, timeout: float | None = None) -> None:
        with self._lock:
            todo = [(n, a) for n, a in self._namespaces.items() if force or n not in self._registered]
        for name, attributes in todo:
            self.call("RegisterNamespace", pb.RegisterNamespaceRequest(name=name, attributes=attributes), timeout)
            with self._lock:
                self._registered.add(name)

    def with_namespace(self, fn: Callable[[], Any]) -> Any:
        """Runs fn() after registering the namespaces; on NOT_FOUND (the daemon lost a namespace)
        registers them again and retries once."""
        self.ensure_namespaces()
        try:
            return fn()
        except grpc.RpcError as error:
            if isinstance(error, BreakerOpen) or error.code() != grpc.StatusCode.NOT_FOUND:
                raise
            self.ensure_namespaces(force=True)
            return fn()

    # -- breaker ---------------------------------------------------------------------------------------
    @property
    def breaker_open(self) -> bool:
        with self._lock:
            return self._open

    def probe(self) -> bool:
        """One health check now (deadline `probe_timeout_s`); closes the breaker when the daemon
        answers SERVING. Returns whether it did."""
        with self._lock:
            self.stats["health_probes"] += 1
        try:
            reply = self._health().Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME),
                                         timeout=self.probe_timeout_s, wait_for_ready=True)
            serving = reply.status == health_pb2.HealthCheckResponse.SERVING
            why = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
        except grpc.RpcError as error:
            serving, why = False, error_text(error)
        except ValueError as error:  # the channel was closed under us (close())
            serving, why = False, repr(error)
        if not serving and why.startswith(("UNAVAILABLE", "DEADLINE_EXCEEDED")):
            serving, why = self._probe_own_socket(why)
        if serving:
            self._close_breaker("answers health checks (SERVING) again")
        else:
            self.logger.debug("kvtier: health check of kvtierd at %s: %s", self.socket, why)
        return serving

    def _trip(self, error: BaseException) -> None:
        self._max_keys = None
        text = error_text(error)
        with self._lock:
            self.stats["daemon_failures"] += 1
            if _timed_out(error):
                self.stats["daemon_timeouts"] += 1
            if self._open or self._stopped.is_set():
                return
            self._open, self._reason = True, text
            self._opened_at = self.clock()
            self._short_at_open = self.stats["short_circuited"]
            self.stats["breaker_opened"] += 1
            self.stats["breaker_open"] = 1
            # Logged under the lock: open and close lines always come in order.
            self.logger.warning(
                "kvtier: kvtierd at %s failed a call (%s): circuit breaker OPEN; calls fail fast without "
                "touching the daemon (lookups miss, loads recompute, saves are dropped) until its health "
                "check answers SERVING (checked every %.1f s)", self.socket, text, self.breaker_period_s)
            if self._prober is None:
                self._prober = threading.Thread(target=self._probe_loop, name="kvtier-breaker", daemon=True)
                self._prober.start()

    def _close_breaker(self, why: str) -> None:
        with self._lock:
            if not self._open:
                return
            self._open = False
            self.stats["breaker_closed"] += 1
            self.stats["breaker_open"] = 0
            self.logger.warning(
                "kvtier: kvtierd at %s %s: circuit breaker CLOSED after %.1f s open (%d calls "
                "short-circuited)", self.socket, why, self.clock() - self._opened_at,
                self.stats["short_circuited"] - self._short_at_open)
        self._max_keys = None  # a restarted daemon may have other limits

    def _probe_loop(self) -> None:
        me = threading.current_thread()
        while not self._stopped.wait(self.breaker_period_s):
            with self._lock:
                if not self._open:  # closed (by us or by a probe() call): this thread ends
                    if self._prober is me:
                        self._prober = None
                    return
            self.probe()
        with self._lock:
            if self._prober is me:
                self._prober = None

    def _probe_own_socket(self, why_not: str) -> tuple[bool, str]:
        """The health check again, through a session of our own and our principal's socket: the
        shared socket's connections are bounded for all users together, so another user holding
        them all must not keep this breaker open (the session socket bounds connections per uid)."""
        try:
            session = LocalSession.open(self.socket)
        except grpc.RpcError as error:
            return False, f"{why_not}; a session of our own: {error_text(error)}"
        try:
            with grpc.insecure_channel(session.target) as channel:
                reply = health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=self.probe_timeout_s)
            return (reply.status == health_pb2.HealthCheckResponse.SERVING,
                    health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))
        except grpc.RpcError as error:
            return False, f"{why_not}; through our own socket: {error_text(error)}"
        finally:
            session.close()

    def _health(self):
        with self._lock:
            if self._health_stub is None:
                # Its own channel: a probe never waits behind the engine's calls, and it reconnects
                # quickly after a restart (wait_for_ready rides out the backoff within the deadline).
                self._health_channel = grpc.insecure_channel(target_of(self.socket), options=[
                    ("grpc.initial_reconnect_backoff_ms", 100), ("grpc.max_reconnect_backoff_ms", 1000)])
                self._health_stub = health_pb2_grpc.HealthStub(self._health_channel)
            return self._health_stub

    # -- the local session -----------------------------------------------------------------------------
    def _ensure_session(self, timeout: float) -> None:
        """Opens the client's first local session in a helper thread, waited for at most `timeout`:
        the session socket of a hung daemon accepts and never answers, and the client's own timeout
        there (5 s) is not the call's."""
        if self._session_ready:
            return
        with self._lock:
            future = self._session_future
            if future is None or (future.done() and future.exception() is not None):
                future = self._session_future = concurrent.futures.Future()
                threading.Thread(target=self._open_session, args=(future,), name="kvtier-session",
                                 daemon=True).start()
        try:
            future.result(timeout=timeout)
        except concurrent.futures.TimeoutError:
            raise _Deadline(f"no local session from kvtierd at {self.socket} within {timeout:.3g} s") from None
        self._session_ready = True

    def _open_session(self, future: concurrent.futures.Future) -> None:
        try:
            future.set_result(self.client.namespace_prefix)  # opens the session
        except BaseException as error:  # noqa: BLE001 - handed to the waiting call
            future.set_exception(error)

    def close(self) -> None:
        """Stops the probe thread and closes the client (once a session still being opened is done)."""
        self._stopped.set()
        with self._lock:
            prober, future = self._prober, self._session_future
        if prober is not None and prober is not threading.current_thread():
            prober.join(self.probe_timeout_s + 1.0)
        if self._health_channel is not None:
            self._health_channel.close()
        if future is not None and not future.done():
            future.add_done_callback(lambda _: self.client.close())
        else:
            self.client.close()
