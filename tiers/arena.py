"""Shared-memory arena: memory cut into fixed-size slots that same-node engines map, one part per
tenant.

Contract
- Each part (the administrators' part 0, then one per configured tenant) is its own sealed memfd:
  an engine receives only its own part's file descriptor (over the Unix socket, SCM_RIGHTS), so it
  can neither open nor map another tenant's slots. Seals (shrink, grow, seal) mean no client can
  truncate the memory under the daemon (no SIGBUS) or change its size; writing its own slots is
  what it is for.
- The daemon maps all parts back to back in one contiguous range: slot s of the whole arena lies
  at `address + s * slot_bytes` and part p covers slots `first_slot(p) .. first_slot(p) + count - 1`.
  Slot numbers are global; a part's file holds slot s at offset (s - first_slot) * slot_bytes.
- `view(slot)` lends a memoryview valid until close(); callers must drop their views before close()
  (the range is unmapped: a view used after close is a crash, not stale data).
- Slot bookkeeping (FreeList) is per part and not thread-safe: the daemon calls it from its event
  loop only.
- Space: every part's memory is allocated up front (fallocate), so a node short of memory fails the
  start with an OSError naming the size, never a SIGBUS on a later write.
Restart: volatile; each daemon start creates fresh memory with a new generation. Nothing is left in
/dev/shm: the memory goes away with the last process that maps it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import dataclasses
import fcntl
import logging
import mmap
import os
import uuid

from .slots import FreeList

log = logging.getLogger("kvtier.arena")
PAGE = mmap.PAGESIZE
SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_MAP_FAILED = ctypes.c_void_p(-1).value


@dataclasses.dataclass(frozen=True)
class ArenaPart:
    name: str        # "" for the administrators' part, else the tenant's name
    first_slot: int
    slot_count: int
    fd: int          # the sealed memfd (owned by the arena; closed at close())


class SharedArena(FreeList):
    """Parts `parts` = [(tenant name or "", size_bytes), ...] of `slot_bytes` slots; part 0 first."""

    def __init__(self, name: str, parts: list[tuple[str, int]], slot_bytes: int):
        assert slot_bytes > 0 and slot_bytes % PAGE == 0, "slot size must be a multiple of the page size"
        counts = [size // slot_bytes for _, size in parts]
        assert counts and all(count > 0 for count in counts), "every arena part needs at least one slot"
        super().__init__(sum(counts), counts)
        self.slot_bytes = slot_bytes
        self.size_bytes = self.slot_count * slot_bytes
        self.generation = uuid.uuid4().hex[:16]
        self.parts: list[ArenaPart] = []
        self._base = 0
        try:
            for (tenant, _), first, count in zip(parts, self.part_starts, counts):
                fd = create_sealed_memory(f"kvtier-{name}-{tenant or 'admin'}", count * slot_bytes)
                self.parts.append(ArenaPart(tenant, first, count, fd))
            self._base = _map_parts(self.parts, slot_bytes, self.size_bytes)
        except BaseException:
            self._close_fds()
            raise
        self._view = memoryview((ctypes.c_char * self.size_bytes).from_address(self._base)).cast("B")
        self.pinned = cuda_host_register(self._base, self.size_bytes)

    def part_named(self, tenant: str) -> int:
        """The index of tenant's part (0, the administrators', for "" or an unknown name)."""
        for index, part in enumerate(self.parts):
            if part.name == tenant:
                return index
        return 0

    @property
    def address(self) -> int:
        """Virtual address of the mapping's first byte (for registering it with NIXL or CUDA)."""
        return self._base

    def view(self, slot: int) -> memoryview:
        assert 0 <= slot < self.slot_count, f"slot {slot} out of range"
        start = slot * self.slot_bytes
        return self._view[start:start + self.slot_bytes]

    def close(self) -> None:
        if not self._base:
            return
        if self.pinned:
            cuda_host_unregister(self._base)
            self.pinned = False
        self._view.release()
        if _libc.munmap(self._base, self.size_bytes) != 0:
            log.warning("munmap of the arena failed: %s", os.strerror(ctypes.get_errno()))
        self._base = 0
        self._close_fds()

    def _close_fds(self) -> None:
        for part in self.parts:
            os.close(part.fd)
        self.parts = []


def create_sealed_memory(name: str, size: int) -> int:
    """A memfd of `size` bytes, every page allocated now, sealed against shrinking and growing."""
    fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, size)
        reserve_space(fd, size, "memory")
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, SEALS)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _map_parts(parts: list[ArenaPart], slot_bytes: int, total: int) -> int:
    """Reserves `total` bytes of address space, then maps each part's memfd at its place in it."""
    base = _libc.mmap(None, total, _PROT_NONE, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_NORESERVE, -1, 0)
    if base in (None, _MAP_FAILED):
        raise OSError(ctypes.get_errno(), f"cannot reserve {total} bytes of address space for the arena")
    for part in parts:
        where = base + part.first_slot * slot_bytes
        got = _libc.mmap(where, part.slot_count * slot_bytes, mmap.PROT_READ | mmap.PROT_WRITE,
                         mmap.MAP_SHARED | _MAP_FIXED | mmap.MAP_POPULATE, part.fd, 0)
        if got != where:
            errno = ctypes.get_errno()
            _libc.munmap(base, total)
            raise OSError(errno, f"cannot map arena part {part.name or 'admin'}: {os.strerror(errno)}")
    return base


_MAP_FIXED = 0x10          # Linux values (Python's mmap module does not export these)
_PROT_NONE = 0x0
_MAP_NORESERVE = 0x4000


def reserve_space(fd: int, size: int, where: str) -> None:
    """Allocates every block of the file now. ftruncate alone makes it sparse: pages then come on
    first touch, and when memory is short that touch is a SIGBUS long after the daemon said READY.
    MAP_POPULATE does not help: it stops silently at the first page it cannot get. Raises OSError
    (errno kept) with a message an operator can act on."""
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as exc:
        error = OSError(f"cannot reserve {size} bytes for the arena in {where}: {os.strerror(exc.errno)}")
        error.errno = exc.errno
        raise error from exc


def buffer_address(buffer) -> int:
    """The address of a writable buffer's first byte (an mmap); the ctypes export taken to read it
    is released before returning, so the mmap can still be closed."""
    return ctypes.addressof(ctypes.c_char.from_buffer(buffer))


def map_fd(fd: int, size: int) -> mmap.mmap:
    """Maps an arena part handed over by the daemon, read/write (the client side). MAP_POPULATE
    faults every page in up front: first-touch faults otherwise cost ~10x a memcpy on the hot path."""
    return mmap.mmap(fd, size, mmap.MAP_SHARED | mmap.MAP_POPULATE, mmap.PROT_READ | mmap.PROT_WRITE)


def cuda_host_unregister(address: int) -> None:
    import torch  # noqa: PLC0415 - only reached when registration succeeded
    result = torch.cuda.cudart().cudaHostUnregister(address)
    if result != 0:
        log.warning("cudaHostUnregister failed (%s)", result)


def cuda_host_register(address: int, size: int) -> bool:
    """Pins `size` bytes at `address` (an arena mapping) for fast, asynchronous DMA when CUDA is
    present; a no-op returning False elsewhere. A registration covers one process's mapping only:
    the daemon and every engine register their own (an engine's copies from an unregistered mapping
    are pageable and synchronous)."""
    if not os.path.exists("/dev/nvidiactl"):
        return False  # no NVIDIA driver: skip importing torch (seconds of start-up for nothing)
    try:
        import torch  # noqa: PLC0415 - optional, heavy
    except ImportError:
        return False
    if not torch.cuda.is_available():
        return False
    result = torch.cuda.cudart().cudaHostRegister(address, size, 0)
    if result != 0:
        log.warning("cudaHostRegister failed (%s): arena stays pageable", result)
        return False
    log.info("arena pinned with cudaHostRegister (%d bytes)", size)
    return True
