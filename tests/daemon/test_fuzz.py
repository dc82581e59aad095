"""Fuzzing the gRPC API: generated malformed requests (wrong shapes, hostile sizes, raw garbage) from
tenant a, over TCP with its token and over the Unix socket with a local session (this test process's
uid is configured as tenant a), for a bounded number of examples, never crash the daemon nor reveal
another tenant's data."""

from __future__ import annotations

import os

import grpc
from google.protobuf import message_factory
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from certs import Authority
from kvtier.client.session import LocalSession
from kvtier.daemon.auth import token_digest
from kvtier.proto.v1 import kvtier_pb2 as pb
from s3server import free_port

SERVICE = pb.DESCRIPTOR.services_by_name["KvTier"]
METHODS = [m for m in SERVICE.methods]
SECRET = b"tenant-b-secret-" * 64
TOKEN_A, TOKEN_B = "fuzz-tenant-a-token-0123", "fuzz-tenant-b-token-0123"
EXAMPLES = 400
ADMIN_UID = 40100  # not this process: the test runs as tenant a on the Unix socket too


def _field_values(field, depth: int):
    """A strategy for one protobuf field: mostly plausible values, often hostile ones."""
    fd = field
    if fd.message_type is not None:
        if fd.message_type.GetOptions().map_entry:
            return st.dictionaries(st.text(max_size=80), st.text(max_size=300), max_size=40)
        element = _message(fd.message_type, depth + 1) if depth < 3 else st.none()
        return st.lists(element, max_size=6) if fd.is_repeated else element
    kind = {fd.TYPE_STRING: st.one_of(st.sampled_from(["a/ns", "b/ns", "*", "", "a/" + "x" * 300, "b/../a"]),
                                      st.text(max_size=200)),
            fd.TYPE_BYTES: st.one_of(st.binary(max_size=64), st.just(b"\0" * 32), st.binary(min_size=33, max_size=99)),
            fd.TYPE_BOOL: st.booleans(),
            fd.TYPE_DOUBLE: st.floats(allow_nan=True, allow_infinity=True),
            fd.TYPE_ENUM: st.integers(-3, 20)}.get(fd.type)
    if kind is None:  # integer types
        bits = 64 if fd.type in (fd.TYPE_UINT64, fd.TYPE_INT64, fd.TYPE_FIXED64) else 32
        signed = fd.type in (fd.TYPE_INT32, fd.TYPE_INT64, fd.TYPE_SINT32, fd.TYPE_SINT64)
        low, high = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)
        kind = st.one_of(st.integers(0, 5000), st.integers(low, high))
    if fd.is_repeated:
        return st.one_of(st.lists(kind, max_size=8), st.lists(kind, min_size=4000, max_size=4200))
    return kind


def _message(descriptor, depth: int = 0):
    fields = {f.name: _field_values(f, depth) for f in descriptor.fields}
    return st.fixed_dictionaries({}, optional=fields)


def _serialize(descriptor, values: dict) -> bytes:
    return _build(descriptor, values).SerializeToString()


def _assign(message, field, value) -> None:
    if value is None:
        return
    try:
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            getattr(message, field.name).update(value)
        elif field.message_type is not None and field.is_repeated:
            for element in value:
                if element is not None:
                    getattr(message, field.name).add().CopyFrom(_build(field.message_type, element))
        elif field.message_type is not None:
            getattr(message, field.name).CopyFrom(_build(field.message_type, value))
        elif field.is_repeated:
            getattr(message, field.name).extend(value)
        else:
            setattr(message, field.name, value)
    except (ValueError, TypeError):
        pass  # a value protobuf itself refuses (an enum or int out of range): leave the field unset


def _build(descriptor, values: dict):
    message = message_factory.GetMessageClass(descriptor)()
    for name, value in values.items():
        _assign(message, descriptor.fields_by_name[name], value)
    return message


requests = st.sampled_from(METHODS).flatmap(lambda m: st.tuples(
    st.just(m), st.one_of(_message(m.input_type).map(lambda v, m=m: _serialize(m.input_type, v)),
                          st.binary(max_size=512))))


def test_fuzzed_requests_never_crash_the_daemon_or_cross_tenants(make_daemon, tmp_path):
    ca = Authority(tmp_path / "pki")
    cert, key = ca.issue("kvtierd")
    tokens = tmp_path / "tokens"
    tokens.write_text("".join(f'[[token]]\nid = "{t}"\nsha256 = "{token_digest(v)}"\ntenant = "{t}"\n'
                              for t, v in (("a", TOKEN_A), ("b", TOKEN_B))))
    tokens.chmod(0o600)  # the daemon refuses a secrets file others can read
    port = free_port()
    daemon = make_daemon({"server.tcp": f"127.0.0.1:{port}", "server.tokens_file": str(tokens),
                          "server.tls_cert": cert, "server.tls_key": key, "limits.max_wait_ms": 200,
                          "server.admin_uids": [ADMIN_UID],
                          "tenant": [{"name": "a", "uids": [os.geteuid()], "cpu_capacity": "4MiB"},
                                     {"name": "b", "uids": [ADMIN_UID + 1], "cpu_capacity": "4MiB"}]})
    from kvtier.client import Client
    with Client(f"127.0.0.1:{port}", token=TOKEN_B, tls_ca=ca.ca_path) as b:
        b.register_namespace("b/ns")
        b.put("b/ns", b"\0" * 32, SECRET)
    channel = grpc.secure_channel(f"127.0.0.1:{port}", grpc.ssl_channel_credentials(open(ca.ca_path, "rb").read()))
    grpc.channel_ready_future(channel).result(timeout=60)  # connected (TLS done) before the first example
    metadata = (("authorization", f"Bearer {TOKEN_A}"),)
    session = LocalSession.open(daemon.socket)  # tenant a's arena part and session, as an engine has them
    local = grpc.insecure_channel(session.target)  # the session's own socket, through its descriptor
    assert session.tenant == "a"
    seen_codes: set[grpc.StatusCode] = set()
    ran = []

    @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None,
              derandomize=True)  # the same 400 requests every run: CI stays reproducible
    @given(requests, st.booleans())
    def fuzz(request, over_tcp):
        ran.append(1)
        method, payload = request
        path = f"/{SERVICE.full_name}/{method.name}"
        replies = (_call(channel, method, path, payload, metadata, seen_codes) if over_tcp
                   else _call(local, method, path, payload, session.metadata(), seen_codes))
        for reply in replies:  # an error may echo the caller's own input, never anything else of b's
            assert SECRET[:32] not in reply, f"{method.name} leaked tenant b's bytes"
            assert b"b/ns" not in reply or b"b/ns" in payload, f"{method.name} leaked tenant b's namespace"
        assert daemon.proc.poll() is None, f"the daemon died on {method.name}: {daemon.log()[-3000:]}"

    fuzz()  # no wall-clock budget: every example runs, however slow the machine
    channel.close()
    local.close()
    session.close()
    assert len(ran) == EXAMPLES, f"hypothesis ran {len(ran)} of {EXAMPLES} examples"
    assert grpc.StatusCode.INTERNAL not in seen_codes, daemon.log()[-3000:]  # every bad input is named
    assert {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.PERMISSION_DENIED} <= seen_codes
    with Client(f"127.0.0.1:{port}", token=TOKEN_B, tls_ca=ca.ca_path) as b:
        assert b.get("b/ns", b"\0" * 32)[1] == SECRET  # tenant b's block survived, intact


def _call(channel, method, path: str, payload: bytes, metadata, seen_codes: set) -> list[bytes]:
    """Sends raw bytes as the request; returns the raw replies (a few at most for streams)."""
    identity = dict(request_serializer=None, response_deserializer=None)
    replies: list[bytes] = []
    try:
        if method.client_streaming:
            call = channel.stream_unary(path, **identity)
            replies.append(call(iter([payload, payload[:5]]), metadata=metadata, timeout=3))
        elif method.server_streaming:
            stream = channel.unary_stream(path, **identity)(payload, metadata=metadata, timeout=1.5)
            for reply in stream:
                replies.append(reply)
                if len(replies) >= 20:
                    stream.cancel()
                    break
        else:
            replies.append(channel.unary_unary(path, **identity)(payload, metadata=metadata, timeout=3))
    except grpc.RpcError as exc:
        code = exc.code()
        if code not in (grpc.StatusCode.CANCELLED, grpc.StatusCode.DEADLINE_EXCEEDED):
            seen_codes.add(code)
        replies.append((exc.details() or "").encode())
    return replies
