"""How one engine block maps to bytes: the concatenation, over layers in sorted name order, of each
layer's slice for that block. Pure torch; knows nothing about vLLM or the daemon.

A layer's KV tensor has the block index in dim 0 (``(num_blocks, ...)``, the CPU layout
``(num_blocks, kv_heads, block_size, 2*head_size)`` included), or K and V split in dim 0 and the block
index in dim 1 (``(2, num_blocks, ...)``). When the attention kernel uses smaller blocks than the
scheduler, dim 0 holds ``factor * num_blocks`` kernel blocks and block ``b`` is rows
``b*factor .. (b+1)*factor-1``. Slices may be strided (any physical layout): copies go through the
logical shape, so the stored bytes are always the slice in logical (row-major) order.

``ArenaViews`` maps the layout onto a whole shared-memory arena once (one strided tensor per part, over
every slot): building tensors over a slot costs more than the copy itself for small blocks. Copies are
batched per part: one gather of the blocks on the engine's device (``index_select``), then one copy per
run of consecutive slots (loads: the reverse, then one ``index_copy_``), the same code on CPU and GPU
tensors. ``CopyStream`` runs them on a dedicated CUDA stream (on CPU: the calling thread).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Part:
    name: str             # layer name, with "/k" or "/v" for K/V-split tensors
    tensor: torch.Tensor  # block index in dim 0
    factor: int           # rows of dim 0 per engine block
    offset: int           # byte offset of this part inside a stored block
    nbytes: int           # bytes of one block of this part

    def rows(self, block_id: int) -> torch.Tensor:
        return self.tensor[block_id * self.factor:(block_id + 1) * self.factor]

    @property
    def block_shape(self) -> tuple[int, ...]:
        return (self.factor, *self.tensor.shape[1:])


def _split(name: str, tensor: torch.Tensor, num_blocks: int) -> list[tuple[str, torch.Tensor, int]]:
    if tensor.dim() >= 1 and tensor.shape[0] >= num_blocks and tensor.shape[0] % num_blocks == 0:
        return [(name, tensor, tensor.shape[0] // num_blocks)]
    if (tensor.dim() >= 2 and tensor.shape[0] == 2 and tensor.shape[1] >= num_blocks
            and tensor.shape[1] % num_blocks == 0):
        factor = tensor.shape[1] // num_blocks
        return [(f"{name}/k", tensor[0], factor), (f"{name}/v", tensor[1], factor)]
    raise ValueError(f"KV cache tensor {name!r} of shape {tuple(tensor.shape)}: no dimension 0 or 1 holds "
                     f"the {num_blocks} blocks")


class BlockLayout:
    """Packs engine block ``b`` of every layer into one flat buffer and back."""

    def __init__(self, kv_caches: dict[str, torch.Tensor], num_blocks: int):
        if not kv_caches:
            raise ValueError("no KV cache tensors")
        self.num_blocks = num_blocks
        self.parts: list[Part] = []
        seen: set[tuple] = set()
        offset = 0
        for name in sorted(kv_caches):
            tensor = kv_caches[name]
            identity = (tensor.data_ptr(), tuple(tensor.shape), tuple(tensor.stride()), tensor.dtype)
            if identity in seen:  # layers that share one cache (KV sharing) are stored once
                continue
            seen.add(identity)
            for part_name, t, factor in _split(name, tensor, num_blocks):
                nbytes = factor * (t[0].numel() * t.element_size())
                self.parts.append(Part(part_name, t, factor, offset, nbytes))
                offset += nbytes
        self.block_bytes = offset

    def describe(self) -> str:
        """Layout descriptor, e.g. ``model.layers.0.attn:float32:1x2x32x64;...``."""
        return ";".join(f"{p.name}:{str(p.tensor.dtype).removeprefix('torch.')}:"
                        f"{'x'.join(map(str, p.block_shape))}" for p in self.parts)

    def _arena_tensor(self, buffer, part: Part) -> torch.Tensor:
        raw = torch.frombuffer(buffer, dtype=torch.uint8, count=part.nbytes, offset=part.offset)
        return raw.view(part.tensor.dtype).view(part.block_shape)

    def pack(self, block_id: int, buffer) -> None:
        """Copies engine block ``block_id`` into ``buffer`` (writable, >= block_bytes)."""
        for part in self.parts:
            self._arena_tensor(buffer, part).copy_(part.rows(block_id))

    def unpack(self, buffer, block_id: int) -> None:
        """Copies ``buffer`` (>= block_bytes) into engine block ``block_id``."""
        for part in self.parts:
            part.rows(block_id).copy_(self._arena_tensor(buffer, part))

    def arena_views(self, buffer, slot_bytes: int, slot_count: int, first_slot: int = 0) -> "ArenaViews":
        """Views of this layout over every slot of an arena (``buffer``: the whole arena, slot ``s`` at
        byte ``s * slot_bytes``). Build once per arena mapping and reuse."""
        return ArenaViews(self, buffer, slot_bytes, slot_count, first_slot)


class ArenaViews:
    """One tensor per part over a whole arena: ``views[i][slot]`` is part ``i`` of the block in ``slot``,
    in the part's logical block shape. The tensors keep ``buffer`` exported (alive) while they exist.
    ``buffer`` holds the daemon's slots first_slot .. first_slot + slot_count - 1 (a tenant's part of
    the arena): slot numbers given to pack/unpack are the daemon's."""

    def __init__(self, layout: BlockLayout, buffer, slot_bytes: int, slot_count: int, first_slot: int = 0):
        if layout.block_bytes > slot_bytes:
            raise ValueError(f"block of {layout.block_bytes} bytes exceeds the slot size {slot_bytes}")
        with memoryview(buffer) as whole:
            size = whole.nbytes
        if size < slot_bytes * slot_count:
            raise ValueError(f"arena buffer of {size} bytes is smaller than {slot_count} slots of {slot_bytes}")
        self.layout = layout
        self.slot_bytes = slot_bytes
        self.slot_count = slot_count
        self.first_slot = first_slot
        self._buffer = buffer
        self.views: list[torch.Tensor | None] = []
        for part in layout.parts:
            item = part.tensor.element_size()
            if slot_bytes % item:  # a slot stride that is not whole elements: per-slot tensors instead
                self.views.append(None)
                continue
            shape = part.block_shape
            flat = torch.frombuffer(buffer, dtype=part.tensor.dtype, offset=part.offset,
                                    count=(size - part.offset) // item)
            self.views.append(flat.as_strided((slot_count, *shape),
                                              (slot_bytes // item, *torch.empty(shape, device="meta").stride())))

    def _slot(self, index: int, part: Part, slot: int) -> torch.Tensor:
        slot -= self.first_slot
        if not 0 <= slot < self.slot_count:
            raise IndexError(f"slot {slot + self.first_slot} outside this arena's {self.slot_count} slots "
                             f"from {self.first_slot}")
        view = self.views[index]
        if view is not None:
            return view[slot]
        raw = torch.frombuffer(self._buffer, dtype=torch.uint8, count=part.nbytes,
                               offset=slot * self.slot_bytes + part.offset)
        return raw.view(part.tensor.dtype).view(part.block_shape)

    def pack(self, block_ids, slots) -> None:
        """Copies engine block ``block_ids[j]`` into arena slot ``slots[j]``, for every j: per part one
        gather of the blocks on the engine's device (``index_select``) and one copy per run of
        consecutive slots (asynchronous on CUDA, where the arena is pinned: see ``CopyStream``)."""
        if not len(block_ids):
            return
        runs = _runs(self._local(slots))
        for index, part in enumerate(self.layout.parts):
            staged = _gather(part, block_ids)
            view = self.views[index]
            for at, first, count in runs:
                if view is None:
                    for j in range(count):
                        self._slot(index, part, self.first_slot + first + j).copy_(staged[at + j])
                else:
                    view[first:first + count].copy_(staged[at:at + count], non_blocking=staged.is_cuda)

    def unpack(self, slots, block_ids) -> None:
        """Copies arena slot ``slots[j]`` into engine block ``block_ids[j]``, for every j: per part one
        copy per run of consecutive slots into a staging tensor on the engine's device, then one
        scatter (``index_copy_``)."""
        if not len(block_ids):
            return
        runs = _runs(self._local(slots))
        for index, part in enumerate(self.layout.parts):
            staged = torch.empty((len(block_ids), *part.block_shape), dtype=part.tensor.dtype,
                                 device=part.tensor.device)
            view = self.views[index]
            for at, first, count in runs:
                if view is None:
                    for j in range(count):
                        staged[at + j].copy_(self._slot(index, part, self.first_slot + first + j))
                else:
                    staged[at:at + count].copy_(view[first:first + count], non_blocking=staged.is_cuda)
            part.tensor.index_copy_(0, _rows(part, block_ids), staged.view(-1, *part.tensor.shape[1:]))

    def _local(self, slots) -> list[int]:
        local = [slot - self.first_slot for slot in slots]
        for slot, index in zip(slots, local):
            if not 0 <= index < self.slot_count:
                raise IndexError(f"slot {slot} outside this arena's {self.slot_count} slots from {self.first_slot}")
        return local


def _rows(part: Part, block_ids) -> torch.Tensor:
    """Row indices of dim 0 holding the blocks (``factor`` rows per engine block), on the part's device."""
    ids = torch.as_tensor(list(block_ids), dtype=torch.long)
    if part.factor > 1:
        ids = (ids[:, None] * part.factor + torch.arange(part.factor)).reshape(-1)
    return ids.to(part.tensor.device, non_blocking=True)


def _gather(part: Part, block_ids) -> torch.Tensor:
    """The blocks' rows of the part, contiguous, shaped ``(len(block_ids), *block_shape)``."""
    return part.tensor.index_select(0, _rows(part, block_ids)).view(len(block_ids), *part.block_shape)


def _runs(local_slots: list[int]) -> list[tuple[int, int, int]]:
    """(index in the list, first slot, count) for each run of consecutive slots."""
    runs: list[tuple[int, int, int]] = []
    for at, slot in enumerate(local_slots):
        if runs and runs[-1][1] + runs[-1][2] == slot:
            runs[-1] = (runs[-1][0], runs[-1][1], runs[-1][2] + 1)
        else:
            runs.append((at, slot, 1))
    return runs


class CopyStream:
    """Where a worker's background copies run. On CUDA: a dedicated stream, ordered after the engine's
    work up to ``mark()`` (an event recorded on the engine's current stream) and synchronised when
    the copies are done, so the copies overlap the engine's next steps and finish before the caller
    checksums or reports them. On CPU: the calling thread itself (copies are synchronous)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.stream = torch.cuda.Stream(device=device) if self.cuda else None

    def mark(self):
        """An event after the engine's work so far (None on CPU); taken on the engine's thread."""
        if not self.cuda:
            return None
        event = torch.cuda.Event()
        event.record()
        return event

    def run(self, after, copy) -> None:
        """copy() on this stream after event `after`; returns once the copies are complete."""
        if not self.cuda:
            copy()
            return
        with torch.cuda.stream(self.stream):
            if after is not None:
                self.stream.wait_event(after)
            copy()
        self.stream.synchronize()
