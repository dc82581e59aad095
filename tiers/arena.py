"""Shared-memory arena: a file in /dev/shm cut into fixed-size slots that same-node clients mmap.

Contract: the arena owns the mapping; `view(slot)` lends a memoryview valid until close(). Slot
bookkeeping is not thread-safe: the daemon calls it from its event loop only. Restart: the arena
is volatile; each daemon start creates a fresh file (new generation) and removes stale ones.
Space: the whole file is reserved (fallocate) at creation, so a full shm_dir fails the start with
an OSError naming the size and directory, never a SIGBUS on a later write.
"""

from __future__ import annotations

import glob
import logging
import mmap
import os
import uuid

from .slots import FreeList

log = logging.getLogger("kvtier.arena")
PAGE = mmap.PAGESIZE


class SharedArena(FreeList):
    def __init__(self, shm_dir: str, prefix: str, size_bytes: int, slot_bytes: int, mode: int = 0o600):
        assert slot_bytes > 0 and slot_bytes % PAGE == 0, "slot size must be a multiple of the page size"
        assert size_bytes >= slot_bytes, "arena smaller than one slot"
        super().__init__(size_bytes // slot_bytes)
        self.slot_bytes = slot_bytes
        self.size_bytes = self.slot_count * slot_bytes
        self.generation = uuid.uuid4().hex[:16]
        self._remove_stale(shm_dir, prefix)
        self.path = os.path.join(shm_dir, f"{prefix}-{self.generation}")
        _create_reserved(self.path, self.size_bytes, mode, shm_dir)
        self._mmap = map_shared_file(self.path, self.size_bytes)
        self._view = memoryview(self._mmap)
        self.pinned = _try_cuda_host_register(self._mmap, self.size_bytes)

    @staticmethod
    def _remove_stale(shm_dir: str, prefix: str) -> None:
        for stale in glob.glob(os.path.join(shm_dir, f"{prefix}-*")):
            log.info("removing stale arena %s from an earlier run", stale)
            try:
                os.remove(stale)
            except OSError as exc:
                log.warning("cannot remove stale arena %s: %s", stale, exc)

    @property
    def address(self) -> int:
        """Virtual address of the mapping's first byte (for registering it with NIXL or CUDA). The
        buffer export taken to read it is released before returning, so close() still unmaps."""
        return _buffer_address(self._mmap)

    def view(self, slot: int) -> memoryview:
        assert 0 <= slot < self.slot_count, f"slot {slot} out of range"
        start = slot * self.slot_bytes
        return self._view[start:start + self.slot_bytes]

    def close(self) -> None:
        if self.pinned:
            _cuda_host_unregister(self._mmap)
            self.pinned = False
        self._view.release()
        try:
            self._mmap.close()
        except BufferError:
            log.warning("arena still borrowed at close; leaving the mapping to process exit")
        _remove_quietly(self.path)


def _create_reserved(path: str, size: int, mode: int, where: str) -> None:
    """Creates `path` with `mode` and `size` reserved bytes; on failure leaves no file behind."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, mode)
    try:
        os.fchmod(fd, mode)  # umask must not widen or narrow what the operator configured
        reserve_space(fd, size, where)
    except BaseException:
        _remove_quietly(path)  # a half-made arena would hold space the next start needs
        raise
    finally:
        os.close(fd)


def reserve_space(fd: int, size: int, where: str) -> None:
    """Sizes the file to `size` bytes with every block allocated now. ftruncate alone makes a sparse
    file: tmpfs then hands out pages on first touch, and when the filesystem is full (another user
    filled /dev/shm) that touch is a SIGBUS, long after the daemon said READY. MAP_POPULATE does not
    help: it stops silently at the first page it cannot get. Raises OSError (errno kept) with a
    message an operator can act on."""
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as exc:
        error = OSError(f"cannot reserve {size} bytes for the arena in {where}: {os.strerror(exc.errno)}")
        error.errno = exc.errno
        raise error from exc


def _remove_quietly(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def map_shared_file(path: str, size: int) -> mmap.mmap:
    """Maps a shared-memory file read/write; the daemon and its clients map the same file.
    MAP_POPULATE faults every page in up front: the arena is meant to be resident (and pinned on
    GPU nodes), and first-touch faults otherwise cost ~10x a memcpy on the hot path."""
    fd = os.open(path, os.O_RDWR)
    try:
        return mmap.mmap(fd, size, mmap.MAP_SHARED | mmap.MAP_POPULATE, mmap.PROT_READ | mmap.PROT_WRITE)
    finally:
        os.close(fd)


def _buffer_address(buffer) -> int:
    import ctypes
    return ctypes.addressof(ctypes.c_char.from_buffer(buffer))


def _cuda_host_unregister(buffer) -> None:
    import torch  # noqa: PLC0415 - only reached when registration succeeded
    result = torch.cuda.cudart().cudaHostUnregister(_buffer_address(buffer))
    if result != 0:
        log.warning("cudaHostUnregister failed (%s)", result)


def _try_cuda_host_register(buffer, size: int) -> bool:
    """Pins the arena for fast DMA when CUDA is present; a no-op elsewhere."""
    if not os.path.exists("/dev/nvidiactl"):
        return False  # no NVIDIA driver: skip importing torch (seconds of start-up for nothing)
    try:
        import torch  # noqa: PLC0415 - optional, heavy
    except ImportError:
        return False
    if not torch.cuda.is_available():
        return False
    result = torch.cuda.cudart().cudaHostRegister(_buffer_address(buffer), size, 0)
    if result != 0:
        log.warning("cudaHostRegister failed (%s): arena stays pageable", result)
        return False
    log.info("arena pinned with cudaHostRegister (%d bytes)", size)
    return True
