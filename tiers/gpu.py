"""GPU tier: committed blocks in slots of one daemon-owned device buffer, evicted by a swappable policy.

Contract: a `DevicePool` is ONE torch uint8 tensor on a device (a CUDA device in production, the
CPU in tests: the same code path) cut into `slot_count` slots of `slot_bytes`; one slot holds one
block (length <= slot_bytes). `GpuTier` has CpuTier's bookkeeping (reserve/install/remove, counted
pins that protect from eviction, an EvictionPolicy that only orders ids) and adds the copies:
`copy_in` (host -> slot) and `copy_out` (slot -> host) are enqueued on the tier's own CUDA stream
with non_blocking=True and return a `Transfer`; the host buffer must stay untouched (copy_in) or
unread (copy_out) until that Transfer is done. All copies of the tier run on that one stream, so
they complete in the order they were issued: a copy_out of a slot issued after its copy_in reads
the new bytes, and a copy_in into a slot given back and reserved again waits for earlier copies of
the old block. On the CPU device the copies are plain, finished on return.
`ipc_handle(slot)` lets a same-node engine map the slot directly (CUDA IPC; format in
`IpcSlotHandle`, docs/gpu-tier.md); what keeps that slot's block in place while the engine reads it
is the daemon's pin/lease protocol, as for the shared-memory arena.
Not thread-safe: event loop only (`Transfer.wait()` may run in a worker thread; it only waits).
torch is optional: importing this module never imports it; creating a pool or a tier does.
Restart: volatile, like the CPU tier. Device memory dies with the daemon; an engine that still
maps an old pool keeps that memory alive (and reads stale bytes) until it drops its tensors.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import mmap
import struct
import uuid as uuidlib
import warnings
from typing import TYPE_CHECKING, Any

from .eviction import EvictionPolicy
from .slots import FreeList, SlotTier

if TYPE_CHECKING:  # pragma: no cover - typing only; torch is optional at run time
    import torch

log = logging.getLogger("kvtier.gpu")
PAGE = mmap.PAGESIZE


def _import_torch():
    """torch, or None when it is not installed (the daemon's base install has no torch)."""
    try:
        import torch  # noqa: PLC0415 - optional, heavy
    except ImportError:
        return None
    return torch


def parse_device(device: str) -> tuple[str, int]:
    """'cuda' -> ('cuda', 0), 'cuda:1' -> ('cuda', 1), 'cpu' -> ('cpu', 0); ValueError otherwise."""
    text = str(device).strip().lower()
    kind, _, index = text.partition(":")
    if kind not in ("cuda", "cpu") or (index and not index.isdigit()) or (kind == "cpu" and index not in ("", "0")):
        raise ValueError(f"GPU tier device must be 'cuda', 'cuda:N' or 'cpu' (tests), got {device!r}")
    return kind, int(index or 0)


def gpu_available(device_index: int = 0) -> tuple[bool, str]:
    """(True, a description of the device) when a GPU tier can live on CUDA device `device_index`,
    else (False, why not): torch missing, torch built without CUDA, no driver/device visible, or
    the index out of range. Never raises; the daemon logs the reason and runs without the tier."""
    torch = _import_torch()
    if torch is None:
        return False, "torch is not installed (the GPU tier needs PyTorch with CUDA support)"
    if getattr(torch.version, "cuda", None) is None:
        return False, f"CUDA is not available: torch {torch.__version__} was built without CUDA"
    try:
        available = torch.cuda.is_available()
        count = torch.cuda.device_count() if available else 0
    except Exception as exc:  # noqa: BLE001 - a broken driver must not take the daemon down
        return False, f"CUDA is not available: {type(exc).__name__}: {exc}"
    if not available or count == 0:
        return False, (f"CUDA is not available: torch {torch.__version__} (CUDA {torch.version.cuda}) "
                       "finds no usable driver or no visible device (check nvidia-smi and CUDA_VISIBLE_DEVICES)")
    if not 0 <= device_index < count:
        return False, f"CUDA device {device_index} does not exist: {count} visible (indexes 0..{count - 1})"
    try:
        props = torch.cuda.get_device_properties(device_index)
    except Exception as exc:  # noqa: BLE001
        return False, f"CUDA device {device_index} cannot be queried: {type(exc).__name__}: {exc}"
    return True, (f"CUDA device {device_index}: {props.name}, {props.total_memory / (1 << 30):.1f} GiB, "
                  f"torch {torch.__version__}, CUDA {torch.version.cuda}")


class DevicePool(FreeList):
    """`slot_count` slots of `slot_bytes` in one uint8 tensor on `device`, with a free list.

    take/give_back/free_count behave like SharedArena's; `view(slot)` lends a 1-D uint8 tensor
    view of the slot, valid until close()."""

    def __init__(self, device: str, slot_count: int, slot_bytes: int):
        torch = _import_torch()
        if torch is None:
            raise RuntimeError("the GPU tier needs torch, which is not installed")
        assert slot_bytes > 0 and slot_bytes % PAGE == 0, "slot size must be a multiple of the page size"
        super().__init__(slot_count)
        kind, index = parse_device(device)
        self.device = torch.device("cuda", index) if kind == "cuda" else torch.device("cpu")
        self.is_cuda = kind == "cuda"
        self.slot_bytes = slot_bytes
        self.size_bytes = slot_count * slot_bytes
        # One allocation: one CUDA IPC handle covers every slot. No zeroing: only slots holding
        # committed blocks are ever read, by the daemon or through ipc_handle.
        self.tensor = torch.empty(self.size_bytes, dtype=torch.uint8, device=self.device)

    def offset(self, slot: int) -> int:
        assert 0 <= slot < self.slot_count, f"slot {slot} out of range"
        return slot * self.slot_bytes

    def view(self, slot: int) -> "torch.Tensor":
        start = self.offset(slot)
        return self.tensor[start:start + self.slot_bytes]

    def close(self) -> None:
        """Drops the pool's reference; the memory goes back once no view (or IPC export) holds it."""
        self.tensor = None


class Transfer:
    """One enqueued copy. done() polls, wait() blocks until it finished; a finished one is inert.

    On CUDA it wraps the event recorded on the tier's stream after the copy; on the CPU device
    copies finish before they return, so `event` is None and done() is always true."""

    __slots__ = ("event", "nbytes")

    def __init__(self, event, nbytes: int):
        self.event = event
        self.nbytes = nbytes

    def done(self) -> bool:
        return self.event is None or self.event.query()

    def wait(self) -> None:
        if self.event is not None:
            self.event.synchronize()


_DONE = Transfer(None, 0)

# --- CUDA IPC slot handle (docs/gpu-tier.md) ----------------------------------------------------
IPC_MAGIC = b"KVTG"
IPC_VERSION = 1
_IPC_HEADER = struct.Struct("<4sHH16sQQQQQBxHHH")  # 72 bytes, little-endian, then the 3 variable fields


@dataclasses.dataclass(frozen=True)
class IpcSlotHandle:
    """What a same-node engine needs to map one slot of a daemon's device pool.

    Serialized (`to_bytes`/`from_bytes`, little-endian, 72-byte header + 3 variable fields):

        off size field
          0    4 magic b"KVTG"
          4    2 format version (1)
          6    2 device_index        CUDA device index as the daemon numbers them (its CUDA_VISIBLE_DEVICES)
          8   16 device_uuid         the device's 16-byte UUID (all zero if unknown); prefer it to the index
         24    8 pool_bytes          size of the pool's storage (all slots)
         32    8 storage_offset      byte offset of the pool inside the shared cudaMalloc block
         40    8 slot_offset         byte offset of this slot inside the pool (slot * slot_bytes)
         48    8 length              bytes of the slot (slot_bytes; the block's own length comes with the lease)
         56    8 ref_counter_offset  torch bookkeeping (see below)
         64    1 event_sync_required torch bookkeeping
         65    1 reserved (0)
         66    2 len(mem_handle)
         68    2 len(ref_counter_handle)
         70    2 len(event_handle)
         72    . mem_handle, then ref_counter_handle, then event_handle

    mem_handle is torch's shareable handle of the allocation: for a plain cudaMalloc block it is
    [torch's handle version byte][b'c'][the 64-byte cudaIpcMemHandle_t] (66 bytes; older torch
    sent the bare 64 bytes). A non-torch engine opens `cuda_ipc_mem_handle` with
    cudaIpcOpenMemHandle on the device with `device_uuid` and reads `length` bytes at
    base + storage_offset + slot_offset. A torch engine calls `open_ipc_pool` / `open_ipc_handle`.
    ref_counter_handle / ref_counter_offset / event_handle / event_sync_required are what
    torch's `UntypedStorage._new_shared_cuda` wants besides the memory handle: the name of
    torch's shared counter file, the counter's slot in it, and a cudaIpcEventHandle_t recorded
    when the pool was first shared (the daemon synchronizes its stream first, so waiting on it is
    free). Non-torch engines ignore them.
    """

    device_index: int
    device_uuid: bytes
    pool_bytes: int
    storage_offset: int
    slot_offset: int
    length: int
    mem_handle: bytes
    ref_counter_handle: bytes = b""
    ref_counter_offset: int = 0
    event_handle: bytes = b""
    event_sync_required: bool = False

    @property
    def cuda_ipc_mem_handle(self) -> bytes:
        """The bare 64-byte cudaIpcMemHandle_t inside mem_handle (ValueError for expandable segments)."""
        handle = self.mem_handle
        if len(handle) == 64:
            return handle
        if len(handle) == 66 and handle[1:2] == b"c":
            return handle[2:]
        raise ValueError("not a cudaMalloc IPC handle (expandable segments in the daemon?)")

    @property
    def pool_key(self) -> tuple[bytes, int]:
        """Same for every slot of one pool: engines cache the opened pool under it."""
        return self.mem_handle, self.storage_offset

    def to_bytes(self) -> bytes:
        uuid = self.device_uuid.ljust(16, b"\0")[:16]
        return _IPC_HEADER.pack(IPC_MAGIC, IPC_VERSION, self.device_index, uuid, self.pool_bytes,
                                self.storage_offset, self.slot_offset, self.length, self.ref_counter_offset,
                                int(self.event_sync_required), len(self.mem_handle),
                                len(self.ref_counter_handle), len(self.event_handle)) + \
            self.mem_handle + self.ref_counter_handle + self.event_handle

    @classmethod
    def from_bytes(cls, data: bytes) -> "IpcSlotHandle":
        data = bytes(data)
        if len(data) < _IPC_HEADER.size:
            raise ValueError("GPU IPC handle too short")
        (magic, version, device_index, uuid, pool_bytes, storage_offset, slot_offset, length, ref_offset,
         sync, n_mem, n_ref, n_event) = _IPC_HEADER.unpack_from(data)
        if magic != IPC_MAGIC or version != IPC_VERSION:
            raise ValueError(f"not a kvtier GPU IPC handle of version {IPC_VERSION}")
        if len(data) != _IPC_HEADER.size + n_mem + n_ref + n_event:
            raise ValueError("GPU IPC handle has the wrong length")
        if slot_offset + length > pool_bytes:
            raise ValueError("GPU IPC handle: slot outside the pool")
        at = _IPC_HEADER.size
        mem = data[at:at + n_mem]
        ref = data[at + n_mem:at + n_mem + n_ref]
        event = data[at + n_mem + n_ref:]
        return cls(device_index, uuid, pool_bytes, storage_offset, slot_offset, length, mem, ref, ref_offset,
                   event, bool(sync))


def _device_uuid(torch, index: int) -> bytes:
    """The device's 16 UUID bytes, or 16 zero bytes when this torch cannot tell."""
    try:
        uuid = torch.cuda.get_device_properties(index).uuid
    except Exception:  # noqa: BLE001 - optional information
        return bytes(16)
    try:
        raw = bytes(uuid.bytes)  # torch's _CUuuid
        if len(raw) == 16:
            return raw
    except (AttributeError, TypeError, ValueError):
        pass
    try:
        return uuidlib.UUID(str(uuid).removeprefix("GPU-")).bytes
    except ValueError:
        return bytes(16)


def _local_device_index(torch, handle: IpcSlotHandle) -> int:
    """The engine's index of the daemon's device: by UUID (indexes differ under CUDA_VISIBLE_DEVICES)."""
    if any(handle.device_uuid):
        for index in range(torch.cuda.device_count()):
            if _device_uuid(torch, index) == handle.device_uuid:
                return index
        raise ValueError(f"the daemon's GPU (uuid {uuidlib.UUID(bytes=handle.device_uuid)}) is not visible here")
    return handle.device_index


def open_ipc_pool(data: bytes | IpcSlotHandle) -> "torch.Tensor":
    """Engine side (torch): maps the daemon's whole device pool as a 1-D uint8 tensor.

    Cache it under `IpcSlotHandle.pool_key` and slice slots out of it
    ([slot_offset:slot_offset + length]); drop it when the daemon's generation changes (a
    restarted daemon has a new pool; the old mapping keeps the old memory alive)."""
    torch = _import_torch()
    if torch is None:
        raise RuntimeError("opening a GPU IPC handle needs torch")
    handle = data if isinstance(data, IpcSlotHandle) else IpcSlotHandle.from_bytes(data)
    torch.cuda.init()
    device = _local_device_index(torch, handle)
    storage = torch.UntypedStorage._new_shared_cuda(
        device, handle.mem_handle, handle.pool_bytes, handle.storage_offset, handle.ref_counter_handle,
        handle.ref_counter_offset, handle.event_handle, handle.event_sync_required)
    pool = torch.empty((0,), dtype=torch.uint8, device=storage.device)
    return pool.set_(storage, 0, (handle.pool_bytes,), (1,))


def open_ipc_handle(data: bytes | IpcSlotHandle) -> "torch.Tensor":
    """Engine side (torch): the slot as a 1-D uint8 CUDA tensor of `length` bytes, read/write.

    Convenience for one slot; it maps the whole pool (torch caches the mapping per process while
    any tensor on it lives). For many slots, cache `open_ipc_pool` instead."""
    handle = data if isinstance(data, IpcSlotHandle) else IpcSlotHandle.from_bytes(data)
    return open_ipc_pool(handle)[handle.slot_offset:handle.slot_offset + handle.length]


# --- the tier ---------------------------------------------------------------------------------

class GpuTier(SlotTier):
    """SlotTier over a DevicePool, plus stream-ordered copies and IPC export. Install a block only
    after its copy_in finished (Transfer.done()) if others may read the slot through IPC; an
    evicted block's bytes stay readable by copies already enqueued (stream order), not later ones."""

    def __init__(self, pool: DevicePool, policy: EvictionPolicy):
        super().__init__(pool, policy)
        self.writes = self.write_bytes = 0   # copy_in: host -> device
        self.reads = self.read_bytes = 0     # copy_out: device -> host
        self._torch = _import_torch()
        self._stream = None
        # Copies in flight on the stream, oldest first: (event, (dst, src) kept alive, slot).
        self._inflight: collections.deque = collections.deque()
        self._last_copy: dict[int, Transfer] = {}   # slot -> its latest enqueued copy
        self._shared: tuple | None = None           # storage._share_cuda_() of the pool, made once
        if pool.is_cuda:
            self._stream = self._torch.cuda.Stream(device=pool.device)

    @classmethod
    def create(cls, device: str, capacity_bytes: int, slot_bytes: int, policy: EvictionPolicy) -> "GpuTier | None":
        """A tier of capacity_bytes // slot_bytes slots on device ('cuda', 'cuda:N'; 'cpu' for
        tests), or None when the environment cannot host it (no torch, no CUDA, no such device,
        out of device memory): the reason is logged at WARNING on "kvtier.gpu" and is also what
        gpu_available() returns. A bad configuration (device string, sizes) raises ValueError."""
        kind, index = parse_device(device)
        if slot_bytes <= 0 or slot_bytes % PAGE:
            raise ValueError(f"gpu slot_bytes must be a positive multiple of {PAGE}, got {slot_bytes}")
        if capacity_bytes < slot_bytes:
            raise ValueError(f"gpu capacity {capacity_bytes} is smaller than one slot ({slot_bytes})")
        if kind == "cuda":
            ok, reason = gpu_available(index)
            if not ok:
                log.warning("GPU tier disabled: %s", reason)
                return None
        elif _import_torch() is None:
            log.warning("GPU tier disabled: torch is not installed")
            return None
        try:
            pool = DevicePool(device, capacity_bytes // slot_bytes, slot_bytes)
        except RuntimeError as exc:  # torch.OutOfMemoryError is a RuntimeError
            log.warning("GPU tier disabled: cannot allocate %d bytes on %s: %s", capacity_bytes, device, exc)
            return None
        log.info("GPU tier on %s: %d slots of %d bytes", pool.device, pool.slot_count, slot_bytes)
        return cls(pool, policy)

    # --- bookkeeping (CpuTier's contract) ---------------------------------------------------

    @property
    def capacity_bytes(self) -> int:
        return self.pool.size_bytes

    def view(self, block_id) -> "torch.Tensor":
        """The block's slot (slot_bytes long) as a uint8 tensor on the pool's device."""
        return self.pool.view(self._slot_of[block_id])

    # --- copies -----------------------------------------------------------------------------

    def copy_in(self, slot: int, src, length: int) -> Transfer:
        """Enqueues host -> slot of `length` bytes from src (a buffer: memoryview, mmap, bytes,
        numpy array; wrapped zero-copy with torch.frombuffer; or a contiguous tensor). For full
        speed on CUDA, src is pinned memory (the arena is, via cudaHostRegister). Leave src
        unchanged until the returned Transfer is done."""
        assert 0 <= length <= self.pool.slot_bytes, f"{length} bytes do not fit a {self.pool.slot_bytes}-byte slot"
        if length == 0:
            return _DONE
        host = self._host_tensor(src, length)
        transfer = self._copy(self.pool.view(slot)[:length], host, slot, length)
        self.writes += 1
        self.write_bytes += length
        return transfer

    def copy_out(self, slot: int, dst, length: int) -> Transfer:
        """Enqueues slot -> host of the slot's first `length` bytes into dst (a writable buffer or
        a contiguous tensor). Do not read dst before the returned Transfer is done."""
        assert 0 <= length <= self.pool.slot_bytes, f"{length} bytes do not fit a {self.pool.slot_bytes}-byte slot"
        if length == 0:
            return _DONE
        host = self._host_tensor(dst, length, writable=True)
        transfer = self._copy(host, self.pool.view(slot)[:length], slot, length)
        self.reads += 1
        self.read_bytes += length
        return transfer

    def _copy(self, dst, src, slot: int, length: int) -> Transfer:
        if self._stream is None:
            dst.copy_(src)
            return _DONE
        self._reap()
        torch = self._torch
        with torch.cuda.stream(self._stream):
            dst.copy_(src, non_blocking=True)
            event = torch.cuda.Event()
            event.record(self._stream)
        self._inflight.append((event, (dst, src), slot))  # keeps the host buffer alive until the copy ran
        transfer = Transfer(event, length)
        self._last_copy[slot] = transfer
        return transfer

    def _host_tensor(self, buffer, length: int, writable: bool = False):
        torch = self._torch
        if isinstance(buffer, torch.Tensor):
            assert buffer.is_contiguous(), "host tensor must be contiguous"
            flat = buffer.view(-1).view(torch.uint8)
            assert flat.numel() >= length, f"buffer holds {flat.numel()} bytes, {length} requested"
            return flat[:length]
        view = buffer if isinstance(buffer, memoryview) else memoryview(buffer)
        if view.format != "B" or view.ndim != 1:
            view = view.cast("B")
        assert view.nbytes >= length, f"buffer holds {view.nbytes} bytes, {length} requested"
        if view.readonly:
            assert not writable, "copy_out needs a writable buffer"
            with warnings.catch_warnings():  # torch warns that it cannot mark the tensor read-only
                warnings.simplefilter("ignore", UserWarning)
                return torch.frombuffer(view, dtype=torch.uint8, count=length)
        return torch.frombuffer(view, dtype=torch.uint8, count=length)

    def poll(self) -> int:
        """Releases the host buffers of finished copies without blocking; returns how many copies
        are still in flight. The daemon may call it from its loop; copy_in/copy_out also do."""
        self._reap()
        return len(self._inflight)

    def _reap(self) -> None:
        """Forgets finished copies (they finish in stream order), releasing their host buffers."""
        while self._inflight and self._inflight[0][0].query():
            _, _, slot = self._inflight.popleft()
            last = self._last_copy.get(slot)
            if last is not None and last.done():
                del self._last_copy[slot]

    def wait(self, slot: int) -> None:
        """Blocks until every copy enqueued so far into or out of slot has finished."""
        transfer = self._last_copy.pop(slot, None)
        if transfer is not None:
            transfer.wait()
        self._reap()

    def synchronize(self) -> None:
        """Blocks until every copy this tier enqueued has finished; releases the host buffers."""
        if self._stream is not None:
            self._stream.synchronize()
        self._inflight.clear()
        self._last_copy.clear()

    # --- IPC ------------------------------------------------------------------------------

    def ipc_handle(self, slot: int) -> bytes | None:
        """A serialized IpcSlotHandle for slot (see its docstring / docs/gpu-tier.md), or None on
        the CPU device. Waits for copies into the slot enqueued so far, so the engine reads what
        the daemon wrote; the block must stay pinned (leased) while the engine reads it."""
        if not self.pool.is_cuda:
            return None
        self.pool.offset(slot)  # range check
        self.wait(slot)
        if self._shared is None:
            # Shared once: every _share_cuda_() wraps the storage in a new torch ref-count
            # context, so calling it per slot would leak. The event it records on the current
            # stream must follow all earlier work on the pool.
            self._torch.cuda.synchronize(self.pool.device)
            shared = self.pool.tensor.untyped_storage()._share_cuda_()
            self._shared = (shared, _device_uuid(self._torch, self.pool.device.index))
        (device, mem_handle, storage_bytes, storage_offset, ref_handle, ref_offset, event_handle,
         sync), uuid = self._shared
        assert storage_bytes >= self.pool.size_bytes
        return IpcSlotHandle(
            device_index=int(device), device_uuid=uuid, pool_bytes=int(storage_bytes),
            storage_offset=int(storage_offset), slot_offset=self.pool.offset(slot), length=self.pool.slot_bytes,
            mem_handle=bytes(mem_handle), ref_counter_handle=bytes(ref_handle or b""),
            ref_counter_offset=int(ref_offset or 0), event_handle=bytes(event_handle or b""),
            event_sync_required=bool(sync)).to_bytes()

    def close(self) -> None:
        """Waits for the copies in flight, then drops the pool. Engines must have dropped their
        IPC mappings first (daemon shutdown), or they keep the memory alive."""
        if self.pool.tensor is not None:
            self.synchronize()
        self._shared = None
        self.pool.close()

    def stats(self) -> dict[str, Any]:
        return {"blocks": len(self), "bytes": self.used_bytes, "capacity_bytes": self.capacity_bytes,
                "reads": self.reads, "writes": self.writes, "read_bytes": self.read_bytes,
                "write_bytes": self.write_bytes, "evictions": self.evictions}
