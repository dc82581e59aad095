"""Hardening against a hostile or careless environment: a /dev/shm someone else filled, a token sent in
clear, credentials in printed config, forged log lines from a peer, a Watch that outlives its token."""

from __future__ import annotations

import socket
import subprocess
import sys
import time

import grpc
import pytest

from kvtier.client import Client
from kvtier.client import cli
from kvtier.client.client import AsyncClient
from kvtier.daemon.auth import Principal, token_digest
from kvtier.daemon.main import mask
from kvtier.daemon.peers import printable
from kvtier.daemon.service import WATCH_RECHECK_S
from kvtier.proto.v1 import kvtier_pb2 as pb
from kvtier.proto.v1 import kvtier_pb2_grpc as pb_grpc
from certs import Authority
from s3server import free_port
from test_security import peer_daemon  # noqa: F401 - a fixture

KEY = b"k" * 32


# -- no bearer token over cleartext TCP --------------------------------------------------------
def test_client_refuses_a_token_over_cleartext_tcp_before_connecting():
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        listener.setblocking(False)
        address = f"127.0.0.1:{listener.getsockname()[1]}"
        for make in (Client, AsyncClient):
            with pytest.raises(ValueError, match="cleartext TCP"):
                make(address, token="tenant-a-token-0123456789")
        with pytest.raises(ValueError, match="cleartext TCP"):
            Client(f"dns:localhost:{listener.getsockname()[1]}", token="tenant-a-token-0123456789")
        with pytest.raises(BlockingIOError):
            listener.accept()  # nothing ever connected, so nothing could have been sent
    Client(address).close()  # without a token, plaintext TCP stays a caller's choice


def test_a_token_over_the_unix_socket_stays_allowed(make_daemon):
    daemon = make_daemon()
    for address in (daemon.socket, f"unix:{daemon.socket}"):
        with Client(address, token="any-token-the-socket-ignores") as client:
            assert client.list_namespaces() == []


def test_cli_reports_a_cleartext_token_without_a_traceback(tmp_path, capsys):
    token_file = tmp_path / "token"
    token_file.write_text("tenant-a-token-0123456789\n")
    assert cli.main(["-s", f"127.0.0.1:{free_port()}", "--token-file", str(token_file), "stats"]) == 2
    err = capsys.readouterr().err
    assert "cleartext TCP" in err and "Traceback" not in err
    assert "tenant-a-token" not in err


# -- kvtierd --check-config masks credential identifiers ---------------------------------------
def test_check_config_masks_the_s3_access_key_id(tmp_path):
    secret = tmp_path / "s3-secret"
    secret.write_text("wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY\n")
    secret.chmod(0o600)
    config = tmp_path / "kvtierd.toml"
    config.write_text(f'data_dir = "{tmp_path / "data"}"\n[s3]\naccess_key_id = "AKIAIOSFODNN7EXAMPLE"\n'
                      f'secret_access_key_file = "{secret}"\n')
    done = subprocess.run([sys.executable, "-m", "kvtier.daemon.main", "--check-config", "-c", str(config)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "access_key_id='AKIA...'" in done.stdout
    assert "IOSFODNN7EXAMPLE" not in done.stdout + done.stderr
    assert "wJalrXUtnFEMI" not in done.stdout + done.stderr  # the secret file is never read or shown
    assert f"secret_access_key_file='{secret}'" in done.stdout  # where it is, though, helps


def test_mask_keeps_only_a_prefix_of_long_identifiers():
    assert mask("AKIAIOSFODNN7EXAMPLE") == "AKIA..."
    assert mask("short-id") == "..."  # 4 of 8 characters would give half of it away
    assert mask("") == ""             # unset stays visibly unset


# -- strings a peer sent are escaped in logs ---------------------------------------------------
def test_printable_escapes_everything_that_could_forge_or_disguise_a_log_line():
    assert printable("node-7.rack_2") == "node-7.rack_2"
    assert printable("a\nb\r\x1b[31mc") == "a\\nb\\r\\x1b[31mc"
    assert printable("\u2028\u00e9\\") == "\\u2028\\xe9\\\\"  # a line separator, non-ASCII, the escape char
    assert printable("x" * 10, 4) == "xxxx..."
    assert printable(ValueError("bad\nclass")) == "bad\\nclass"
    assert "\n" not in printable("".join(map(chr, range(0x3000))))


def test_a_peer_cannot_forge_log_lines_through_its_node_id(peer_daemon):
    forged = "1999-01-01 00:00:00,000 ERROR kvtierd: FORGED by a peer"
    cert, key = peer_daemon.ca.issue("node2")
    credentials = grpc.ssl_channel_credentials(open(peer_daemon.ca.ca_path, "rb").read(),
                                               open(key, "rb").read(), open(cert, "rb").read())
    with grpc.secure_channel(peer_daemon.peer_address, credentials) as channel:
        # Hello logs before it answers: once the answer is here, so is the log line.
        pb_grpc.KvTierPeerStub(channel).Hello(pb.PeerHelloRequest(node_id=f"node2\n{forged}"), timeout=30)
    log = peer_daemon.log()
    assert "said hello" in log
    assert not any(line.startswith("1999-01-01") for line in log.splitlines())
    assert "peer node2\\n1999-01-01" in log


# -- a Watch ends when its token expires -------------------------------------------------------
def test_principal_expiry():
    assert not Principal("local").expired(now=1e12)  # 0: never
    assert not Principal("token t", "a", 100.0).expired(now=99.9)
    assert Principal("token t", "a", 100.0).expired(now=100.0)


TOKEN = "short-lived-token-0123456789"
LIFETIME_S = 8.0  # time left after writing the tokens file: covers a slow daemon start, then expires


def test_an_idle_watch_ends_unauthenticated_when_its_token_expires(make_daemon, tmp_path):
    ca = Authority(tmp_path / "pki")
    cert, key = ca.issue("kvtierd")
    expires = time.time() + LIFETIME_S
    tokens = tmp_path / "tokens"
    tokens.write_text(f'[[token]]\nid = "brief"\nsha256 = "{token_digest(TOKEN)}"\ntenant = "a"\n'
                      f"expires_unix = {expires:.3f}\n")
    tokens.chmod(0o600)
    port = free_port()
    daemon = make_daemon({"server.tcp": f"127.0.0.1:{port}", "server.tokens_file": str(tokens),
                          "server.tls_cert": cert, "server.tls_key": key})
    bound_s = LIFETIME_S + WATCH_RECHECK_S + 20  # generous: reached only if the stream never ends
    with Client(f"127.0.0.1:{port}", token=TOKEN, tls_ca=ca.ca_path) as tenant, daemon.client() as local:
        tenant.register_namespace("a/m")
        local.put("a/m", KEY, b"one block")
        seen = []
        with pytest.raises(grpc.RpcError) as err:
            for event in tenant.watch(from_seq=1, timeout=bound_s):  # the replay, then live (write-through)
                seen.append((event.key, time.time() < expires))
        ended = time.time()
    assert (KEY, True) in seen, f"no event before the expiry: did the daemon take over {LIFETIME_S:.0f}s to start?"
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED, err.value.details()
    assert "expired while the stream was open" in err.value.details()
    assert expires <= ended < expires + WATCH_RECHECK_S + 5  # the idle-stream wake-up ended it, and promptly
