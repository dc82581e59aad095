"""The load and save sequences both connectors run against kvtierd, once.

``save_blocks``: Allocate slots (one allocation per ``max_keys_per_request`` blocks) → the engine
fills them all → checksum each → one Commit per allocation (each block's retention, token ids, the
engine's origin) → on any failure, Abort what is not committed (a refused commit aborts its
allocation already; "not open" is then ignored). Returns a ``CommitStatus`` per block.

``load_blocks``: Acquire keys (chunks of the daemon's ``max_keys_per_request``) → verify each found
block in shared memory (length, xxh3 checksum) → the engine consumes the verified ones → Release →
Delete the blocks whose bytes failed their checksum, so that the engine's recomputed copy is stored
again instead of being refused as a duplicate (a failed Delete is reported in the outcome, not
raised: those blocks stay misses). Returns a ``LoadOutcome``.

Both run under a ``DaemonSession`` (deadlines, circuit breaker, tenant prefix, namespace
registration) and raise what it raises (``grpc.RpcError``, ``BreakerOpen`` among them) or what the
engine's callbacks raise; the connector turns that into misses and dropped saves. Namespaces are the
connector's unqualified names (the session adds the tenant prefix).

Buffers: ``fill(arena, slots)`` and ``consume(arena, pairs)`` get the mapped ``kvtier.client.Arena``;
the slots are theirs to write (fill) or read (consume) only until they return: after ``fill`` the
slots are checksummed and committed, after ``consume`` the lease is released and the daemon may evict
and reuse them. Neither function keeps state; any number of threads may run them on one session.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import grpc

from kvtier.client.client import block_checksum
from kvtier.connectors._hints import to_pb
from kvtier.proto.v1 import kvtier_pb2 as pb

STORED_OR_DUPLICATE = (pb.STORED, pb.DUPLICATE)


class SlotTooSmall(ValueError):
    """A block is larger than the daemon's arena slots: nothing of this engine can be stored."""


@dataclass(frozen=True)
class BlockToSave:
    key: bytes
    parent: bytes
    length: int                      # bytes the engine writes into the slot
    retention: Any = None            # kvtier.tiers.retention.Retention, or None: the daemon's default
    token_ids: Sequence[int] = ()    # the block's tokens, for KV-aware routers ("" when unknown)
    lora_name: str = ""


@dataclass
class LoadOutcome:
    loaded: list[bool]                                 # per key, in order
    missing: int = 0                                   # not stored (or evicted since the lookup)
    wrong_length: list[tuple[bytes, int]] = field(default_factory=list)  # (key, stored length)
    corrupt: list[bytes] = field(default_factory=list)  # failed their checksum: misses, deleted
    delete_error: BaseException | None = None          # why deleting the corrupt ones failed, if it did


def save_blocks(daemon, namespace: str, blocks: Sequence[BlockToSave],
                fill: Callable[[Any, list[int]], None], *, allocate_wait_ms: int, origin: pb.BlockOrigin | None = None,
                wait_durable: bool = False, timeout: float | None = None) -> list[int]:
    """Stores `blocks`: one Allocate per `max_keys_per_request` blocks, then `fill(arena, slots)` writes
    block i into slots[i] (once, for all of them), then one Commit per allocation. A CommitStatus per
    block. Allocations not committed when something fails are aborted."""
    if not blocks:
        return []
    arena = daemon.arena()
    longest = max(block.length for block in blocks)
    if longest > arena.slot_bytes:
        raise SlotTooSmall(f"a block of {longest} bytes does not fit the daemon's {arena.slot_bytes}-byte arena "
                           "slots: raise cpu.slot_bytes")
    step = max(1, daemon.max_keys())
    open_allocations: list = []
    try:
        for start in range(0, len(blocks), step):
            count = min(step, len(blocks) - start)
            open_allocations.append(daemon.call("Allocate", pb.AllocateRequest(count=count, wait_ms=allocate_wait_ms),
                                                timeout))
        generations = {allocation.generation for allocation in open_allocations}
        if len(generations) != 1:
            raise RuntimeError("the daemon restarted between two allocations of one save")
        arena = daemon.arena(open_allocations[0].generation)
        slots = [slot for allocation, start in zip(open_allocations, range(0, len(blocks), step))
                 for slot in list(allocation.slots)[:min(step, len(blocks) - start)]]
        assert len(slots) == len(blocks), f"Allocate answered {len(slots)} slots for {len(blocks)} blocks"
        fill(arena, slots)
        checksums = [block_checksum(arena.view(slot)[:block.length]) for slot, block in zip(slots, blocks)]
        statuses: list[int] = []
        while open_allocations:
            allocation, start = open_allocations[0], len(statuses)
            stop = min(start + step, len(blocks))
            reply = daemon.with_namespace(lambda: daemon.call("Commit", _commit_request(  # built per try: the
                allocation.allocation_id, namespace, blocks[start:stop], slots[start:stop],  # session qualifies
                checksums[start:stop], origin, wait_durable), timeout))                    # its namespace

            open_allocations.pop(0)  # committed (or refused, which aborts it)
            statuses.extend(reply.status)
        return statuses
    except BaseException:
        for allocation in open_allocations:
            try:
                daemon.call("Abort", pb.AbortRequest(allocation_id=allocation.allocation_id), timeout)
            except grpc.RpcError:
                pass  # already aborted by a refused commit, or the allocation expires on its own
        raise


def _commit_request(allocation_id: int, namespace: str, blocks: Sequence[BlockToSave], slots: list[int],
                    checksums: list[int], origin, wait_durable: bool) -> pb.CommitRequest:
    """One retention on the request when every block has the same, else one per entry."""
    request = pb.CommitRequest(allocation_id=allocation_id, namespace=namespace, wait_durable=wait_durable)
    if origin is not None:
        request.origin.CopyFrom(origin)
    shared = len({block.retention for block in blocks}) <= 1
    for block, slot, checksum in zip(blocks, slots, checksums):
        entry = request.entries.add(key=block.key, parent=block.parent, slot=slot, length=block.length,
                                    checksum=checksum, token_ids=block.token_ids, lora_name=block.lora_name)
        if block.retention is not None and not shared:
            entry.retention.CopyFrom(to_pb(block.retention))
    if shared and blocks[0].retention is not None:
        request.retention.CopyFrom(to_pb(blocks[0].retention))
    return request


def load_blocks(daemon, namespace: str, keys: Sequence[bytes], length: int | Sequence[int | None] | None,
                consume: Callable[[Any, list[tuple[int, pb.AcquiredBlock]]], None], *,
                chunk: int | None = None, timeout: float | None = None) -> LoadOutcome:
    """Loads the stored blocks of `keys`, each `length` bytes (one int for all, one per key, None: any):
    `consume(arena, [(i, block), ...])` copies out the verified ones (i: the index in `keys`). Corrupt blocks are deleted here; a failed Delete
    is left to the next load (the block stays a miss, never data)."""
    outcome = LoadOutcome([False] * len(keys))
    lengths = [length] * len(keys) if length is None or isinstance(length, int) else list(length)
    assert len(lengths) == len(keys), "one length per key"
    step = max(1, chunk or daemon.max_keys())
    for start in range(0, len(keys), step):
        _load_chunk(daemon, namespace, keys, start, min(start + step, len(keys)), lengths, consume, outcome, timeout)
    if outcome.corrupt:
        try:
            daemon.with_namespace(lambda: daemon.call("Delete", pb.DeleteRequest(
                namespace=namespace, keys=sorted(set(outcome.corrupt))), timeout))
        except grpc.RpcError as error:
            outcome.delete_error = error
    return outcome


def _load_chunk(daemon, namespace, keys, start, stop, lengths, consume, outcome: LoadOutcome, timeout) -> None:
    chunk = list(keys[start:stop])
    reply = daemon.with_namespace(lambda: daemon.call("Acquire", pb.AcquireRequest(namespace=namespace, keys=chunk),
                                                      timeout))
    try:
        arena = daemon.arena(reply.generation)
        verified = []
        for i, block in enumerate(reply.blocks):
            if not block.found:
                outcome.missing += 1
            elif lengths[start + i] is not None and block.length != lengths[start + i]:
                outcome.wrong_length.append((chunk[i], block.length))
            elif block_checksum(arena.view(block.slot)[:block.length]) != block.checksum:
                outcome.corrupt.append(chunk[i])
            else:
                verified.append((start + i, block))
        if verified:
            consume(arena, verified)
            for i, _ in verified:
                outcome.loaded[i] = True
    finally:
        if reply.lease_id:
            try:
                daemon.call("Release", pb.ReleaseRequest(lease_id=reply.lease_id), timeout)
            except grpc.RpcError:
                pass  # the lease expires on its own
