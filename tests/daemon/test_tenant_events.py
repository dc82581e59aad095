"""Block events stay inside their tenant, and every principal is bounded, tried the way other local
users would: a real kvtierd, real ZMQ subscribers and gRPC clients under the tenants' uids (setpriv,
as in test_tenants.py), TCP tokens for a tenant without a [[tenant]] table.

* KV events carry the token ids of prompts: each tenant's stream ([[tenant]] events_endpoint)
  carries only its namespaces' events; the node-wide stream is for a router group only.
* Each tenant has its own event ring: another tenant's churn neither cuts its Watch nor rewinds its
  resume point.
* A tenant principal without a table gets small bounds, and cannot take the node's watchers or
  namespaces from a tenant that has one.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

import grpc
import pytest

from kvtier.client import Client
from kvtier.daemon import config
from kvtier.daemon.auth import token_digest

from certs import Authority
from conftest import scrape_metrics, wait_for
from s3server import free_port

UID_A, UID_B, UID_ROUTER = 40001, 40002, 40010
GID_A_ROUTER, GID_NODE_ROUTER = 40061, 40070  # tenant a's router group; the administrators' router group
HELPER = os.path.join(os.path.dirname(__file__), "_as_tenant_events.py")
SETPRIV = shutil.which("setpriv")
ENV = {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": os.environ.get("PYTHONPATH", "")}

TOKENS_A, TOKENS_B, TOKENS_MARK = "101,102,103,104", "201,202,203,204", "301,302,303,304"
KEY_A, KEY_B, KEY_MARK = "a1" * 32, "b1" * 32, "a9" * 32


def as_uid(uid: int, groups=()) -> list[str]:
    assert SETPRIV and os.geteuid() == 0, "the multi-user tests need root and setpriv (util-linux)"
    supplementary = [f"--groups={','.join(map(str, groups))}"] if groups else ["--clear-groups"]
    return [SETPRIV, f"--reuid={uid}", f"--regid={uid}", *supplementary]


def run_as(uid: int, daemon, step: str, *args: str, groups=()) -> dict:
    done = subprocess.run([*as_uid(uid, groups), sys.executable, HELPER, daemon.socket, step, *args],
                          capture_output=True, text=True, timeout=180, env=ENV)
    assert done.returncode == 0, f"{step} as uid {uid} failed:\n{done.stderr[-3000:]}"
    return json.loads(done.stdout.strip().splitlines()[-1])


class Background:
    """A helper step in its own process (as `uid`) that says READY before the test goes on."""

    def __init__(self, uid: int, daemon, step: str, *args: str, groups=()):
        self.proc = subprocess.Popen([*as_uid(uid, groups), sys.executable, HELPER, daemon.socket, step, *args],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, env=ENV)
        line = self.proc.stdout.readline()  # the step prints READY, or exits (its own waits are bounded)
        assert line.strip() == "READY", f"{step} did not get ready: {line!r} {self.proc.communicate()[1][-3000:]}"

    def result(self, go: bool = False) -> dict:
        out, err = self.proc.communicate("go\n" if go else None, timeout=180)
        assert self.proc.returncode == 0, err[-3000:]
        return json.loads(out.strip().splitlines()[-1])

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def shared_dir():
    """A directory every user may enter, so that only the socket files' modes and groups decide."""
    path = tempfile.mkdtemp(prefix="kvtev-", dir="/tmp")
    os.chmod(path, 0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def tenants(**a_keys) -> list[dict]:
    return [{"name": "a", "uids": [UID_A], "cpu_capacity": "1MiB", **a_keys},
            {"name": "b", "uids": [UID_B], "cpu_capacity": "1MiB"}]


# ---- (a) KV events per tenant -------------------------------------------------------------------

def test_a_tenants_stream_carries_its_own_token_ids_and_never_another_tenants(make_daemon, shared_dir):
    d = shared_dir
    node = make_daemon({
        "server.socket_mode": "0666",
        "events.zmq_endpoint": f"ipc://{d}/node.sock", "events.zmq_replay_endpoint": f"ipc://{d}/node-replay.sock",
        "events.ipc_mode": "0660", "events.ipc_gid": GID_NODE_ROUTER,
        "tenant": [{**tenants()[0], "events_endpoint": f"ipc://{d}/a.sock",
                    "events_replay_endpoint": f"ipc://{d}/a-replay.sock", "events_ipc_mode": "0660",
                    "events_gid": GID_A_ROUTER},
                   {**tenants()[1], "events_endpoint": f"ipc://{d}/b.sock"}]})
    # a's router: a's uid, in a's router group and in kvtierd's own group (as tenants' users are, to
    # reach server.socket under the shipped unit).
    router_groups = [GID_A_ROUTER, os.getegid()]
    router = Background(UID_A, node, "subscribe", f"ipc://{d}/a.sock", f"ipc://{d}/a-replay.sock", KEY_MARK,
                        groups=router_groups)
    try:
        assert run_as(UID_A, node, "store_tokens", "a/m", KEY_A, TOKENS_A)["status"] == [1]
        assert run_as(UID_B, node, "store_tokens", "b/m", KEY_B, TOKENS_B)["status"] == [1]
        assert run_as(UID_A, node, "store_tokens", "a/m", KEY_MARK, TOKENS_MARK)["status"] == [1]
        got = router.result()  # b's events, had they come, came before a's marker
    finally:
        router.kill()
    assert "error" not in got, got
    for seen in (got["live"], got["replayed"]):
        tokens = [t for _, t in seen]
        assert [101, 102, 103, 104] in tokens and [301, 302, 303, 304] in tokens
        assert [201, 202, 203, 204] not in tokens  # b's prompt never reaches a's router
        assert all(tenant_hash not in hashes for hashes, _ in seen
                   for tenant_hash in [int.from_bytes(bytes.fromhex(KEY_B), "big") & ((1 << 64) - 1)])
    # Who may connect: a's uid reaches neither the node-wide stream nor b's; the node's router does.
    assert run_as(UID_A, node, "connect", f"{d}/node.sock", f"{d}/node-replay.sock", f"{d}/b.sock",
                  groups=router_groups)["connect"] == ["PermissionError"] * 3
    assert run_as(UID_ROUTER, node, "connect", f"{d}/node.sock", groups=[GID_NODE_ROUTER])["connect"] == ["OK"]
    assert run_as(UID_B, node, "connect", f"{d}/a.sock")["connect"] == ["PermissionError"]
    assert os.stat(f"{d}/a.sock").st_gid == GID_A_ROUTER and os.stat(f"{d}/node.sock").st_gid == GID_NODE_ROUTER
    assert "KV events (vLLM format) of tenant a's namespaces on ipc://" in node.log()


def load(tmp_path, text: str) -> config.Config:
    path = tmp_path / "k.toml"
    path.write_text(text)
    return config.load(str(path))


TENANT_TOML = '[[tenant]]\nname = "a"\nuids = [40001]\n'


@pytest.mark.parametrize("events, tenant_keys, message", [
    ('zmq_endpoint = "tcp://127.0.0.1:5557"', "", "events.allow_tcp_with_tenants = true"),
    ('zmq_endpoint = "ipc:///tmp/n.sock"\nzmq_replay_endpoint = "tcp://127.0.0.1:5558"', "",
     "events.zmq_replay_endpoint = 'tcp://127.0.0.1:5558' with [[tenant]] tables"),
    ('zmq_connect = ["tcp://127.0.0.1:5557"]', "", "events.allow_tcp_with_tenants"),
    ("", 'events_endpoint = "tcp://127.0.0.1:5559"', "tenant[0].events_endpoint = 'tcp://127.0.0.1:5559'"),
])
def test_a_tcp_event_endpoint_with_tenants_is_refused_without_the_acknowledgement(tmp_path, events, tenant_keys,
                                                                                message):
    text = f"[events]\n{events}\n{TENANT_TOML}{tenant_keys}\n"
    with pytest.raises(config.ConfigError, match=re.escape(message)):
        load(tmp_path, text)
    accepted = load(tmp_path, text.replace("[events]\n", "[events]\nallow_tcp_with_tenants = true\n"))
    assert accepted.events.allow_tcp_with_tenants
    if events:  # the single-tenant default is unchanged: loopback tcp without tenants needs nothing
        assert load(tmp_path, f"[events]\n{events}\n").events.allow_tcp_with_tenants is False


@pytest.mark.parametrize("events, tenant_keys, message", [
    ('zmq_endpoint = "ipc:///tmp/n.sock"\nipc_mode = "0660"', "", "events.ipc_gid"),
    ('zmq_endpoint = "ipc:///tmp/n.sock"\nipc_mode = "0666"\nipc_gid = 40070', "", "drop the other bits"),
    ('zmq_endpoint = "ipc:///tmp/n.sock"\nipc_mode = "0660"\nipc_gid = 40051', "gids = [40051]",
     "events.ipc_gid 40051 is tenant a's gid"),
    ("", 'events_endpoint = "ipc:///tmp/a.sock"\nevents_ipc_mode = "0660"', "tenant[0].events_gid"),
    ("", 'events_endpoint = "ipc:///tmp/a.sock"\nevents_ipc_mode = "0604"', "tenant[0].events_ipc_mode 0604"),
])
def test_an_ipc_event_stream_open_to_tenants_is_refused(tmp_path, events, tenant_keys, message):
    with pytest.raises(config.ConfigError, match=re.escape(message)):
        load(tmp_path, f"[events]\n{events}\n{TENANT_TOML}{tenant_keys}\n")


def test_the_acknowledged_tcp_stream_starts_with_a_warning(make_daemon):
    node = make_daemon({"events.zmq_endpoint": "tcp://127.0.0.1:0", "events.allow_tcp_with_tenants": True,
                        "tenant": tenants()})
    assert "tcp with [[tenant]] tables (events.allow_tcp_with_tenants)" in node.log()


def test_a_router_group_that_is_kvtierds_own_is_refused_at_start(make_daemon, shared_dir):
    node = make_daemon({"events.zmq_endpoint": f"ipc://{shared_dir}/n.sock", "events.ipc_mode": "0660",
                        "events.ipc_gid": os.getegid(), "tenant": tenants()}, start=False)
    with pytest.raises(RuntimeError):
        node.start()
    assert "is kvtierd's own group, which the tenants' users join" in node.log()


# ---- (b) a ring per tenant ----------------------------------------------------------------------

def churning_node(make_daemon):
    """Small rings and watcher queues (tenant b's ring keeps its default size); tenant a's churn
    commits 200 blocks at a time, so each commit queues 200 events at once."""
    return make_daemon({"server.socket_mode": "0666", "disk.enabled": False, "events.ring_size": 1024,
                        "events.watcher_queue": 64,
                        "tenant": [{**tenants()[0], "cpu_capacity": "16MiB"}, tenants()[1]]})


def churn_a(node) -> None:
    assert run_as(UID_A, node, "churn", "a/m", "20", "200")["stored"] == 4000  # with evictions ~7700 events


def test_one_tenants_churn_does_not_cut_another_tenants_watch(make_daemon):
    node = churning_node(make_daemon)
    live = Background(UID_B, node, "watch", "0", KEY_B, "wait")  # open, reading nothing meanwhile
    try:
        churn_a(node)
        assert run_as(UID_B, node, "store_tokens", "b/m", KEY_B, TOKENS_B)["status"] == [1]
        assert live.result(go=True) == {"code": "OK", "keys": [KEY_B]}  # not cut, and none of a's events
    finally:
        live.kill()


def test_one_tenants_churn_does_not_rewind_another_tenants_resume_point(make_daemon):
    node = churning_node(make_daemon)
    assert run_as(UID_B, node, "store_tokens", "b/m", KEY_A, TOKENS_B)["status"] == [1]
    resume = run_as(UID_B, node, "snapshot")["seq"] + 1  # Snapshot's contract: watch from seq + 1
    churn_a(node)
    assert run_as(UID_B, node, "store_tokens", "b/m", KEY_B, TOKENS_B)["status"] == [1]
    resumed = run_as(UID_B, node, "watch", str(resume), KEY_B, "now")
    assert resumed == {"code": "OK", "keys": [KEY_B]}  # b's events since its snapshot, and only them
    with Client(node.socket) as admin:  # the administrators' ring has every event, and it moved on
        assert admin.stats().event_seq > 4000 + 1024 + resume
        with pytest.raises(grpc.RpcError) as err:
            next(iter(admin.watch(from_seq=resume)))
        assert err.value.code() == grpc.StatusCode.OUT_OF_RANGE


# ---- (c) a tenant without a table ---------------------------------------------------------------

TOKENS = {"admin": "admin-token-0123456789abcdef", "x": "untabled-x-token-0123456789",
          "b": "tenant-b-token-0123456789"}


def test_a_token_tenant_without_a_table_cannot_take_the_nodes_watchers_or_namespaces(make_daemon, tmp_path):
    ca = Authority(tmp_path / "pki")
    cert, key = ca.issue("kvtierd")
    tokens = tmp_path / "tokens"
    tokens.write_text("".join(
        f'[[token]]\nid = "{name}-token"\nsha256 = "{token_digest(secret)}"\n'
        + ("admin = true\n" if name == "admin" else f'tenant = "{name}"\n') for name, secret in TOKENS.items()))
    tokens.chmod(0o600)
    port, metrics = free_port(), free_port()
    node = make_daemon({"server.tcp": f"127.0.0.1:{port}", "server.tokens_file": str(tokens), "server.tls_cert": cert,
                        "server.tls_key": key, "metrics.listen": f"127.0.0.1:{metrics}",
                        "limits.max_watchers": 4, "limits.max_namespaces": 6, "tenant": tenants()})

    def connect(who: str) -> Client:
        return Client(f"127.0.0.1:{port}", token=TOKENS[who], tls_ca=ca.ca_path)

    with connect("x") as x, connect("admin") as admin, connect("b") as b:
        held = []
        try:
            # x takes what it can, the administrators what is left of the node's tables.
            counts = [open_watchers(x, held), open_watchers(admin, held),
                      register_until_refused(x, "x/n"), register_until_refused(admin, "shared-")]
            b.register_namespace("b/m")  # b's own share is untouched by both
            stream = b.watch(from_seq=0)
            held.append(stream)
            stream.initial_metadata()
            assert not stream.done(), stream.details()  # open: b's watchers are its own
            # x: limits.untabled_tenant_max_watchers and _namespaces, never the node's 4 and 6;
            # the administrators: the rest of the shared pools.
            assert counts == [2, 2, 4, 2]
        finally:
            for stream in held:
                stream.cancel()
    values = wait_for(lambda: scrape_metrics(f"127.0.0.1:{metrics}"), what="metrics")
    assert values["kvtier_watchers_refused_total"] >= 2 and values["kvtier_namespaces_refused_total"] >= 2
    log = node.log()
    assert "watchers refused for token x-token (tenant x): tenant x has no [[tenant]] table" in log
    assert "namespaces refused for token x-token (tenant x)" in log


def open_watchers(client: Client, held: list, at_most: int = 10) -> int:
    """Opens Watch streams until one is refused (RESOURCE_EXHAUSTED); how many opened."""
    for opened in range(at_most):
        stream = client.watch(from_seq=0)
        stream.initial_metadata()  # the daemon sends headers once the stream is open, or ends it
        if stream.done():
            assert stream.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, stream.details()
            return opened
        held.append(stream)
    return at_most


def register_until_refused(client: Client, prefix: str, at_most: int = 10) -> int:
    for index in range(at_most):
        try:
            client.register_namespace(f"{prefix}{index}")
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, exc.details()
            return index
    return at_most
