"""connectors/_daemon.py against a real kvtierd: deadlines, namespaces and the circuit breaker.

A hung daemon is a SIGSTOPped one (its sockets accept, nothing answers). RPCs are counted at the
client's stub, so "no RPC" means nothing reached the daemon's socket. The breaker is driven with
explicit probes (a breaker period of an hour: the background thread never fires) or, where the
background thread is the subject, waited for on its state; nothing sleeps and hopes.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time

import grpc
import pytest

from conftest import sigstop, wait_for
from kvtier.connectors._daemon import BreakerOpen, DaemonSession, RateLimitedLog
from kvtier.proto.v1 import kvtier_pb2 as pb

NS = {"breaker-test": {"model": "tiny"}}
DEADLINE = 0.5
SLACK = 1.5  # what a loaded 2-core machine may add to a deadline before the call returns
HOUR = 3600.0


class CountingStub:
    """Stands in for client.stub: counts every RPC method fetched from it (the client fetches one per call)."""

    def __init__(self, client):
        self._stub = client.stub
        self.calls: list[str] = []
        client.stub = self

    def __getattr__(self, name):
        self.calls.append(name)
        return getattr(self._stub, name)


def _lookup(session: DaemonSession, keys=(b"k1",)):
    return session.with_namespace(lambda: session.call(
        "Lookup", pb.LookupRequest(namespace="breaker-test", keys=list(keys))))


def _cont(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGCONT)
    except ProcessLookupError:
        pass


@pytest.fixture
def sessions():
    made: list[DaemonSession] = []

    def make(socket, **kwargs) -> DaemonSession:
        kwargs.setdefault("timeout_s", DEADLINE)
        kwargs.setdefault("breaker_period_s", HOUR)
        kwargs.setdefault("probe_timeout_s", 0.25)
        session = DaemonSession(socket, namespaces=NS, **kwargs)
        made.append(session)
        return session
    yield make
    for session in made:
        session.close()


def test_a_hung_daemon_costs_one_deadline_then_calls_short_circuit_until_it_answers(make_daemon, sessions, caplog):
    daemon = make_daemon()
    session = sessions(daemon.socket, logger=logging.getLogger("kvtier-test"))
    rpcs = CountingStub(session.client)
    assert _lookup(session).matched == 0
    assert rpcs.calls == ["RegisterNamespace", "Lookup"]
    assert session.stats["daemon_calls"] == 2 and session.stats["breaker_open"] == 0

    sigstop(daemon.pid)
    try:
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as failed:
            _lookup(session)
        took = time.monotonic() - started
        assert failed.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert DEADLINE * 0.9 <= took < DEADLINE + SLACK          # one deadline, no more
        assert session.breaker_open
        assert (session.stats["breaker_opened"], session.stats["daemon_timeouts"]) == (1, 1)
        assert "circuit breaker OPEN" in caplog.text

        sent = len(rpcs.calls)
        started = time.monotonic()
        for _ in range(50):  # lookups, arena, limits, namespaces: every kind of call fails fast
            with pytest.raises(BreakerOpen) as refused:
                _lookup(session)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE  # what connectors catch as RpcError
            with pytest.raises(BreakerOpen):
                session.call("Commit", pb.CommitRequest(allocation_id=1, namespace="breaker-test"))
            with pytest.raises(BreakerOpen):
                session.arena()
            with pytest.raises(BreakerOpen):
                session.max_keys()
        assert time.monotonic() - started < DEADLINE               # 200 calls in less than one deadline
        assert len(rpcs.calls) == sent                             # none reached the daemon
        assert session.stats["short_circuited"] == 200 and session.stats["daemon_timeouts"] == 1

        assert session.probe() is False                            # a stopped daemon fails its health check
        assert session.breaker_open and len(rpcs.calls) == sent
    finally:
        _cont(daemon.pid)
    wait_for(session.probe, what="a health check answered SERVING")  # explicit probes, until it answers
    assert not session.breaker_open
    assert (session.stats["breaker_closed"], session.stats["breaker_open"]) == (1, 0)
    assert "circuit breaker CLOSED" in caplog.text and "(200 calls short-circuited)" in caplog.text
    assert _lookup(session).matched == 0                           # calls go through again
    assert rpcs.calls[sent:] == ["Lookup"]


def test_the_background_probe_closes_the_breaker_when_the_daemon_answers_again(make_daemon, sessions, caplog):
    daemon = make_daemon()
    session = sessions(daemon.socket, breaker_period_s=0.1, logger=logging.getLogger("kvtier-test"))
    _lookup(session)
    sigstop(daemon.pid)
    try:
        with pytest.raises(grpc.RpcError):
            _lookup(session)
        assert session.breaker_open
        wait_for(lambda: session.stats["health_probes"] >= 3, what="three background health checks")
        assert session.breaker_open                                 # they failed: still open
        with pytest.raises(BreakerOpen):
            _lookup(session)
    finally:
        _cont(daemon.pid)
    wait_for(lambda: not session.breaker_open, what="the background probe to close the breaker")
    assert _lookup(session).matched == 0
    opened = [r for r in caplog.records if "circuit breaker OPEN" in r.getMessage()]
    closed = [r for r in caplog.records if "circuit breaker CLOSED" in r.getMessage()]
    assert len(opened) == len(closed) == 1 and opened[0].levelno == closed[0].levelno == logging.WARNING
    # The probe thread ends with the open state; the next outage starts another.
    wait_for(lambda: not any(t.name == "kvtier-breaker" and t.is_alive() for t in threading.enumerate()),
             what="the probe thread to end")


def test_the_first_session_is_opened_under_the_call_deadline(make_daemon, sessions):
    """The session socket of a hung daemon accepts and never answers; the client's own timeout there is
    5 s. The session layer waits no longer than the call's deadline."""
    daemon = make_daemon()
    sigstop(daemon.pid)
    try:
        session = sessions(daemon.socket, timeout_s=0.3)
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as failed:
            _lookup(session)
        assert time.monotonic() - started < 0.3 + SLACK
        assert failed.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED and session.breaker_open
        with pytest.raises(BreakerOpen):
            _lookup(session)
    finally:
        _cont(daemon.pid)
    wait_for(session.probe, what="a health check answered SERVING")
    session.timeout_s = 5.0  # the session opened in the background may still be finishing on a slow machine
    assert _lookup(session).matched == 0


def test_a_daemon_that_is_down_fails_fast_and_other_errors_leave_the_breaker_closed(make_daemon, sessions,
                                                                                      tmp_path):
    absent = sessions(str(tmp_path / "absent.sock"), timeout_s=5.0)
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as failed:
        _lookup(absent)
    assert failed.value.code() == grpc.StatusCode.UNAVAILABLE and time.monotonic() - started < 2.0
    assert absent.breaker_open and absent.stats["daemon_timeouts"] == 0
    assert absent.probe() is False

    daemon = make_daemon()
    session = sessions(daemon.socket)
    with pytest.raises(grpc.RpcError) as failed:  # the caller's error, not an outage
        session.call("Lookup", pb.LookupRequest(namespace="never-registered", keys=[b"k"]))
    assert failed.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as failed:
        _lookup(session, keys=[b""])
    assert failed.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert not session.breaker_open and session.stats["breaker_opened"] == 0


def test_a_lost_namespace_is_registered_again(make_daemon, sessions):
    daemon = make_daemon()
    session = sessions(daemon.socket)
    rpcs = CountingStub(session.client)
    assert _lookup(session).matched == 0
    with daemon.client() as admin:
        admin.remove_namespace("breaker-test")  # what a wiped data dir looks like to the connector
    assert _lookup(session).matched == 0
    assert rpcs.calls == ["RegisterNamespace", "Lookup", "Lookup", "RegisterNamespace", "Lookup"]
    assert not session.breaker_open


def test_per_call_deadlines_override_the_session_default(make_daemon, sessions):
    daemon = make_daemon()
    session = sessions(daemon.socket, timeout_s=5.0)
    _lookup(session)
    sigstop(daemon.pid)
    try:
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as failed:
            session.call("Lookup", pb.LookupRequest(namespace="breaker-test", keys=[b"k"]), timeout=0.2)
        assert failed.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert time.monotonic() - started < 0.2 + SLACK
    finally:
        _cont(daemon.pid)


def test_rate_limited_log_is_thread_safe(caplog):
    log = RateLimitedLog(logging.getLogger("kvtier-test"), interval_s=HOUR)
    threads = [threading.Thread(target=lambda: [log.warning("same", "daemon down") for _ in range(100)])
               for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [r.getMessage() for r in caplog.records] == ["kvtier: daemon down"]
    assert log.suppressed == {"same": 799}


def test_the_probe_answers_through_its_own_socket_when_others_hold_the_shared_one(make_daemon, sessions):
    """The shared socket's connections are bounded for every user together: another local user
    holding them all must not keep a connector's breaker open. The probe then checks health through
    a session of its own, on its principal's socket."""
    import socket as socket_mod  # noqa: PLC0415 - the plain module, beside this file's socket paths
    daemon = make_daemon({"server.max_shared_connections": 2})
    held = []
    for _ in range(2):  # the shared socket's whole bound, held open by someone else
        conn = socket_mod.socket(socket_mod.AF_UNIX, socket_mod.SOCK_STREAM)
        conn.connect(daemon.socket)
        held.append(conn)
    try:
        session = sessions(daemon.socket)
        assert session.probe() is True
        assert session.stats["health_probes"] == 1
    finally:
        for conn in held:
            conn.close()
