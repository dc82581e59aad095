"""Security model on real listeners: TLS + tenant-bound bearer tokens on TCP, mutual TLS for peers."""

from __future__ import annotations

import time

import grpc
import pytest

from kvtier.client import Client
from kvtier.daemon.auth import AuthConfigError, TokenTable, token_digest
from kvtier.proto.v1 import kvtier_pb2 as pb
from kvtier.proto.v1 import kvtier_pb2_grpc as pb_grpc
from s3server import free_port
from certs import Authority

TOKENS = {"admin": "admin-token-0123456789abcdef", "a": "tenant-a-token-0123456789",
          "b": "tenant-b-token-0123456789", "old": "expired-token-0123456789ab"}
KEY = b"k" * 32



def write_tokens(path) -> str:
    path.write_text(f"""
[[token]]
id = "ops"
sha256 = "{token_digest(TOKENS['admin'])}"
admin = true

[[token]]
id = "engines-a"
sha256 = "{token_digest(TOKENS['a'])}"
tenant = "a"

[[token]]
id = "engines-b"
sha256 = "{token_digest(TOKENS['b'])}"
tenant = "b"

[[token]]
id = "retired"
sha256 = "{token_digest(TOKENS['old'])}"
tenant = "a"
expires_unix = {int(time.time()) - 60}
""")
    path.chmod(0o600)  # the daemon refuses a secrets file others can read
    return str(path)


@pytest.fixture
def tcp_daemon(make_daemon, tmp_path):
    ca = Authority(tmp_path / "pki")
    cert, key = ca.issue("kvtierd")
    port = free_port()
    daemon = make_daemon({"server.tcp": f"127.0.0.1:{port}", "server.tokens_file": write_tokens(tmp_path / "tokens"),
                          "server.tls_cert": cert, "server.tls_key": key})

    def connect(who: str | None, token: str | None = None) -> Client:
        return Client(f"127.0.0.1:{port}", token=TOKENS[who] if who else token, tls_ca=ca.ca_path)
    daemon.connect = connect
    return daemon


def code_of(call) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as err:
        call()
    return err.value.code()


def test_no_token_wrong_token_and_expired_token_are_refused(tcp_daemon):
    for client in (tcp_daemon.connect(None), tcp_daemon.connect(None, token="not-a-known-token-x"),
                   tcp_daemon.connect("old")):
        with client:
            assert code_of(lambda: client.list_namespaces()) == grpc.StatusCode.UNAUTHENTICATED
            assert code_of(lambda: next(iter(client.watch(from_seq=1)))) == grpc.StatusCode.UNAUTHENTICATED
    log = tcp_daemon.log()
    assert all(token not in log for token in TOKENS.values())


def test_tenants_see_only_their_own_namespaces(tcp_daemon):
    with tcp_daemon.connect("a") as a, tcp_daemon.connect("b") as b, tcp_daemon.connect("admin") as admin:
        a.register_namespace("a/model")
        b.register_namespace("b/model")
        assert a.put("a/model", KEY, b"tenant a's block") == pb.STORED
        assert b.put("b/model", KEY, b"tenant b's block") == pb.STORED
        # another tenant's namespace: refused for every kind of call, data never returned
        denied = grpc.StatusCode.PERMISSION_DENIED
        assert code_of(lambda: a.register_namespace("b/evil")) == denied
        assert code_of(lambda: a.lookup("b/model", [KEY])) == denied
        assert code_of(lambda: a.get("b/model", KEY)) == denied
        assert code_of(lambda: a.acquire("b/model", [KEY])) == denied
        assert code_of(lambda: a.stat("b/model", KEY)) == denied
        assert code_of(lambda: a.delete("b/model", [KEY])) == denied
        assert code_of(lambda: a.inventory("b/model")) == denied
        assert code_of(lambda: next(iter(a.watch(namespace="b/model")))) == denied
        assert code_of(lambda: a.clear("*")) == denied
        assert code_of(lambda: a.stats()) == denied  # node-wide counters are for admins
        # unscoped listings show only the caller's own
        assert [n.name for n in a.list_namespaces()] == ["a/model"]
        assert [(bl.namespace, bl.key) for bl in a.iter_inventory()] == [("a/model", KEY)]
        assert {bl.namespace for bl in a.snapshot()[1]} == {"a/model"}
        events = a.watch(from_seq=1)
        first = next(iter(events))
        assert first.namespace == "a/model"
        events.cancel()
        # the admin sees everything
        assert {n.name for n in admin.list_namespaces()} == {"a/model", "b/model"}
        assert admin.stats().blocks == 2
        assert b.get("b/model", KEY)[1] == b"tenant b's block"
    with tcp_daemon.client() as local:  # the Unix socket: its file mode is the guard, no token
        assert {n.name for n in local.list_namespaces()} == {"a/model", "b/model"}


def test_tcp_tenants_get_streamed_put_and_get_but_no_arena_calls(tcp_daemon):
    """Over TCP there is no arena to share: ArenaInfo, Allocate, Commit and Acquire (and with them
    any probing of slots, or a CUDA IPC handle to the GPU pool) are refused; Put and Get work."""
    with tcp_daemon.connect("b") as b, tcp_daemon.connect("admin") as admin:
        b.register_namespace("b/m")
        assert b.put("b/m", KEY, b"x" * 100) == pb.STORED
        denied = grpc.StatusCode.PERMISSION_DENIED
        for call in (lambda: b.call(b.stub.ArenaInfo, pb.ArenaInfoRequest()),
                     lambda: b.call(b.stub.Allocate, pb.AllocateRequest(count=1)),
                     lambda: b.call(b.stub.Commit, pb.CommitRequest(allocation_id=1, namespace="b/m")),
                     lambda: b.call(b.stub.Acquire, pb.AcquireRequest(namespace="b/m", keys=[KEY], gpu=True)),
                     lambda: admin.call(admin.stub.Acquire, pb.AcquireRequest(namespace="b/m", keys=[KEY]))):
            assert code_of(call) == denied
        assert b.get("b/m", KEY)[1] == b"x" * 100


def test_tcp_needs_tls_and_tokens_in_config(tmp_path):
    from kvtier.daemon import config
    with pytest.raises(config.ConfigError, match="tokens_file"):
        config.load(overrides={"server": {"tcp": "127.0.0.1:7000"}})
    with pytest.raises(config.ConfigError, match="tls_cert"):
        config.load(overrides={"server": {"tcp": "127.0.0.1:7000", "tokens_file": "t"}})
    with pytest.raises(config.ConfigError, match="mutual TLS"):
        config.load(overrides={"peers": {"addresses": ["10.0.0.2:7701"]}})


@pytest.mark.parametrize("body, message", [
    ('[[token]]\nid = "x"\nsha256 = "s3cret-plaintext"\nadmin = true\n', "64 lowercase hex"),
    (f'[[token]]\nid = "x"\nsha256 = "{"0" * 64}"\n', "exactly one of tenant"),
    (f'[[token]]\nid = "x"\nsha256 = "{"0" * 64}"\ntenant = "a"\nadmin = true\n', "exactly one of tenant"),
    (f'[[token]]\nid = "x"\nsha256 = "{"0" * 64}"\ntenant = "a/b"\n', "tenant must be"),
    (f'[[token]]\nid = "x"\nsha256 = "{"0" * 64}"\ntenant = "a"\n[[token]]\nid = "x"\nsha256 = "{"1" * 64}"\n'
     'tenant = "b"\n', "unique"),
    ("", "1..4096"),
])
def test_bad_tokens_files_are_refused_without_echoing_secrets(tmp_path, body, message):
    path = tmp_path / "tokens"
    path.write_text(body)
    with pytest.raises(AuthConfigError, match=message) as err:
        TokenTable.load(str(path))
    assert "s3cret" not in str(err.value)


def test_daemon_refuses_to_start_with_a_bad_tokens_file(make_daemon, tmp_path):
    ca = Authority(tmp_path / "pki")
    cert, key = ca.issue("kvtierd")
    bad = tmp_path / "tokens"
    bad.write_text('[[token]]\nid = "x"\nsha256 = "plain"\nadmin = true\n')
    bad.chmod(0o600)
    daemon = make_daemon({"server.tcp": f"127.0.0.1:{free_port()}", "server.tokens_file": str(bad),
                          "server.tls_cert": cert, "server.tls_key": key}, start=False)
    with pytest.raises(RuntimeError):
        daemon.start()
    assert "64 lowercase hex" in daemon.log()


# -- the peer API: mutual TLS ------------------------------------------------------------------
@pytest.fixture
def peer_daemon(make_daemon, tmp_path):
    ca = Authority(tmp_path / "pki")
    cert, key = ca.issue("node1")
    port = free_port()
    daemon = make_daemon({"peers.listen": f"127.0.0.1:{port}", "peers.tls_cert": cert, "peers.tls_key": key,
                          "peers.tls_ca": ca.ca_path, "peers.transport": "grpc"})
    daemon.peer_address, daemon.ca = f"127.0.0.1:{port}", ca
    return daemon


def peer_call(address: str, ca_path: str, cert_key: tuple[str, str] | None):
    root = open(ca_path, "rb").read()
    if cert_key is None:
        credentials = grpc.ssl_channel_credentials(root)
    else:
        credentials = grpc.ssl_channel_credentials(root, open(cert_key[1], "rb").read(),
                                                   open(cert_key[0], "rb").read())
    with grpc.secure_channel(address, credentials) as channel:
        return pb_grpc.KvTierPeerStub(channel).Hello(pb.PeerHelloRequest(node_id="probe"), timeout=5)


def test_peer_api_needs_a_client_certificate_from_the_peer_ca(peer_daemon, tmp_path):
    address, ca = peer_daemon.peer_address, peer_daemon.ca
    assert peer_call(address, ca.ca_path, ca.issue("node2")).generation  # a real peer gets in
    refused = [None, ca.issue("node3", expired=True), Authority(tmp_path / "other", "rogue-ca").issue("node4")]
    for cert_key in refused:
        with pytest.raises(grpc.RpcError) as err:
            peer_call(address, ca.ca_path, cert_key)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE  # the TLS handshake fails
    with pytest.raises(grpc.RpcError):  # and plaintext gets nowhere
        with grpc.insecure_channel(address) as channel:
            pb_grpc.KvTierPeerStub(channel).Hello(pb.PeerHelloRequest(), timeout=5)
    with peer_daemon.client() as local:
        assert local.stats().uptime_s > 0  # the refused handshakes left the daemon serving
