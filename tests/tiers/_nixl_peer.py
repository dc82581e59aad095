"""The other process of tests/tiers/test_nixl.py: a real NixlTransport serving a SharedArena.

    python _nixl_peer.py NAME SHM_DIR SIZE SEED INFO_FD [WINDOW_OFFSET WINDOW_SIZE]

Fills the arena with pattern(SEED), registers it (or only the window [WINDOW_OFFSET, +WINDOW_SIZE)
of it, as a kvtierd registers only its export window), writes one JSON line {"metadata": base64,
"address", "size", "window": [address, size], "pid"} to INFO_FD (its own pipe: NIXL and UCX log to
stdout/stderr), then serves until stdin closes. The test SIGKILLs or SIGSTOPs it to play a dead or
hung peer.
"""

from __future__ import annotations

import base64
import json
import os
import sys

import numpy as np

SLOT = 2 << 20
_K = np.uint64(0x9E3779B97F4A7C15)


def _words(seed: int, first: int, count: int) -> np.ndarray:
    return np.arange(first, first + count, dtype=np.uint64) * _K + np.uint64(seed)


def pattern(seed: int, offset: int, length: int) -> bytes:
    """The bytes at [offset, offset + length) of a region filled by fill(seed): every 8-byte word
    differs, so a misplaced or shifted range never compares equal."""
    first, last = offset // 8, (offset + length + 7) // 8
    raw = _words(seed, first, last - first).tobytes()
    skip = offset - first * 8
    return raw[skip:skip + length]


def fill(arena, seed: int) -> None:
    for slot in range(arena.slot_count):
        view = np.frombuffer(arena.view(slot), dtype=np.uint64)
        view[:] = _words(seed, slot * arena.slot_bytes // 8, view.size)
        del view  # numpy holds a buffer export; drop it before the arena closes


def main(argv: list[str]) -> None:
    from kvtier.tiers.arena import SharedArena
    from kvtier.tiers.nixl import NixlTransport

    name, shm_dir, size, seed, info_fd = argv[0], argv[1], int(argv[2]), int(argv[3]), int(argv[4])
    arena = SharedArena(f"peer-{name}", [("", size)], SLOT)
    fill(arena, seed)
    offset, length = (int(argv[5]), int(argv[6])) if len(argv) > 6 else (0, arena.size_bytes)
    window = (arena.address + offset, length)
    transport = NixlTransport(name, [window])
    with os.fdopen(info_fd, "w") as info:
        info.write(json.dumps({"metadata": base64.b64encode(transport.local_metadata()).decode(),
                               "address": arena.address, "size": arena.size_bytes, "window": window,
                               "pid": os.getpid()}) + "\n")
    sys.stdin.read()  # serve until the test closes stdin
    transport.close()
    arena.close()


if __name__ == "__main__":
    main(sys.argv[1:])
