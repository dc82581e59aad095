"""How one engine block maps to bytes: the concatenation, over layers in sorted name order, of each
layer's slice for that block. Pure torch; knows nothing about vLLM or the daemon.

A layer's KV tensor has the block index in dim 0 (``(num_blocks, ...)``, the CPU layout
``(num_blocks, kv_heads, block_size, 2*head_size)`` included), or K and V split in dim 0 and the block
index in dim 1 (``(2, num_blocks, ...)``). When the attention kernel uses smaller blocks than the
scheduler, dim 0 holds ``factor * num_blocks`` kernel blocks and block ``b`` is rows
``b*factor .. (b+1)*factor-1``. Slices may be strided (any physical layout): copies go through the
logical shape, so the stored bytes are always the slice in logical (row-major) order.
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
