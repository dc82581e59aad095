"""One SGLang engine's storage side, run by test_sglang.py as a tenant's uid: SGLang's own factory
builds the kvtier backend, backs 4 pages up from one host pool and loads them into another.
Usage: _sglang_tenant.py SOCKET; prints one JSON line."""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import test_sglang as t  # noqa: E402 - the test module's helpers, without pytest running it


def main(socket: str) -> None:
    sgl = t.load_sglang()
    writer_pool, reader_pool = t.host_pool(sgl, seed=41), t.host_pool(sgl, seed=42)
    writer = t.make_backend(sgl, socket, writer_pool, model="org/tenant-model")
    reader = t.make_backend(sgl, socket, reader_pool, model="org/tenant-model")
    keys = t.chain(sgl, t.tokens(4, seed=43))
    src, dst = writer_pool.alloc(4 * t.PAGE), reader_pool.alloc(4 * t.PAGE)
    stored = writer.batch_set_v1(keys, src)
    loaded = reader.batch_get_v1(keys, dst)
    exact = all(t.page_bytes(reader_pool, dst, p) == t.page_bytes(writer_pool, src, p) for p in range(4))
    namespace = writer._client.namespace_prefix + writer.namespace
    print(json.dumps({"namespace": namespace, "stored": stored, "loaded": loaded, "byte_exact": exact}))


if __name__ == "__main__":
    main(sys.argv[1])
