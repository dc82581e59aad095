"""kvtier.client: the Python client of kvtierd, sync (`Client`) and asyncio (`AsyncClient`).

Same-node clients use the zero-copy path: `allocate` slots in the daemon's shared-memory arena,
write bytes into `arena.view(slot)`, `commit`; `acquire` keys, read from the views, `release`.
`put_blocks`/`get_blocks` wrap those for callers that hold bytes. `put`/`get` stream over gRPC
for clients without the shared memory (remote, or another host over TCP).

Thread-safety: a Client may be shared by threads (gRPC channels are thread-safe); the arena
mapping is read-only state after it is made. Ownership: views returned by `arena.view` point into
shared memory and are valid only while the allocation or read lease that produced them is open.
"""

from .client import (DEFAULT_SOCKET, Arena, AsyncClient, Client, KvTierError, block_checksum, retention,
                     target_of)

__all__ = ["Client", "AsyncClient", "Arena", "KvTierError", "DEFAULT_SOCKET", "block_checksum", "retention", "target_of"]
