"""A NIXL transfer straight through the agent, for tests that show what NIXL itself allows (no
kvtier bounds check in between). Imported by tests/tiers/test_nixl.py and tests/daemon/test_peers.py."""

from __future__ import annotations

import time

def raw_transfer(transport, peer: str, op: str, pairs: list[tuple[int, int, int]]):
    """One NIXL transfer straight through the agent, without NixlTransport's bounds checks: `op`
    "READ" or "WRITE", pairs (local_addr, remote_addr, length). Returns NIXL's final state; raises
    NIXL's own exception when NIXL refuses to create the request."""
    b, agent = transport._b, transport._agent
    mine = b.nixlXferDList(b.DRAM_SEG, [(a, n, 0) for a, _, n in pairs])
    theirs = b.nixlXferDList(b.DRAM_SEG, [(a, n, 0) for _, a, n in pairs])
    handle = agent.createXferReq(getattr(b, f"NIXL_{op}"), mine, theirs, peer, "", [])
    try:
        state, deadline = agent.postXferReq(handle, ""), time.monotonic() + 10
        while state == b.NIXL_IN_PROG and time.monotonic() < deadline:  # NIXL's status, polled
            time.sleep(0.001)
            state = agent.getXferStatus(handle)
    finally:
        agent.releaseXferReq(handle)
    return state
