"""`Hadamard`: a randomized Hadamard rotation over channels wrapped around another codec, to spread outliers."""

from __future__ import annotations

import functools
import math
from typing import Any

import torch

from swarm.compression.base import Codec, CodecError, Layout, check_keys, read_int

MAX_BLOCK = 256


@functools.lru_cache(maxsize=16)
def _hadamard(block: int) -> torch.Tensor:
    """The orthonormal, symmetric Sylvester Hadamard matrix of a power-of-two size (its own inverse)."""
    h = torch.ones(1, 1)
    while h.shape[0] < block:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / math.sqrt(block)


@functools.lru_cache(maxsize=16)
def _signs(seed: int, cols: int) -> torch.Tensor:
    """Random ±1 per channel, the same for a given seed and channel count on every machine."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2, (cols,), generator=gen).float() * 2 - 1


def block_size(cols: int, max_block: int) -> int:
    """The largest power of two that divides `cols` and is at most `max_block` (1 for odd or zero cols)."""
    return min(cols & -cols, max_block) if cols else 1


def rotate(x: torch.Tensor, seed: int, block: int, inverse: bool = False) -> torch.Tensor:
    """x [rows, cols] times diag(signs) then block-diagonal H (forward), or the inverse of that."""
    if x.numel() == 0:
        return x
    n, cols = x.shape
    signs = _signs(seed, cols).to(x.device)
    if not inverse:
        x = x * signs
    if block > 1:
        x = (x.reshape(-1, block) @ _hadamard(block).to(x.device)).view(n, cols)
    return x * signs if inverse else x


class Hadamard(Codec):
    """Rotates each token by diag(random signs) then a block-diagonal orthonormal Hadamard matrix, then lets
    `inner` encode the result; decoding inverts the rotation after `inner` decodes.

    Blocks are the largest power of two dividing the channel count, at most `max_block` (64 for 576 channels,
    128 for 4096). The rotation spreads each outlier over its block, so a plain per-token int8 (k=0) loses less;
    the seed travels in the metadata. Costs one small matmul per block each way.
    """

    meta_keys = ("seed", "block", "inner")

    def __init__(self, inner: Codec, seed: int = 0, max_block: int = 128, id: str | None = None):
        if not 1 <= max_block <= MAX_BLOCK or max_block & (max_block - 1):
            raise CodecError(f"max_block must be a power of two in [1, {MAX_BLOCK}], got {max_block}")
        if not isinstance(seed, int) or not 0 <= seed < 2**31:
            raise CodecError(f"seed must be an integer in [0, 2^31), got {seed!r}")
        self.inner, self.seed, self.max_block = inner, seed, max_block
        self.id = id or f"hadamard+{inner.id}"

    def _shapes(self, meta: dict[str, Any], layout: Layout) -> list[tuple[int, ...]]:
        read_int(meta, "seed", 0, 2**31 - 1)
        block = read_int(meta, "block", 1, MAX_BLOCK)
        if block & (block - 1) or (layout.cols and layout.cols % block):
            raise CodecError(f"metadata 'block' = {block} is not a power of two dividing {layout.cols} channels")
        inner_meta = check_keys(meta["inner"], self.inner.meta_keys, "metadata 'inner'")
        return self.inner._shapes(inner_meta, Layout(layout.shape, torch.float32))

    def _encode(self, rows: torch.Tensor, layout: Layout) -> tuple[list[torch.Tensor], dict[str, Any]]:
        block = block_size(layout.cols, self.max_block)
        rotated = rotate(rows.float(), self.seed, block)
        if rotated.numel() and not bool(torch.isfinite(rotated).all()):
            raise CodecError(f"{self.id}: values too large to rotate in float32")
        tensors, inner_meta = self.inner._encode(rotated, Layout(layout.shape, torch.float32))
        return tensors, {"seed": self.seed, "block": block, "inner": inner_meta}

    def _decode(self, tensors: list[torch.Tensor], meta: dict[str, Any], layout: Layout, shapes: list) -> torch.Tensor:
        seed, block, inner_meta = meta["seed"], meta["block"], meta["inner"]
        rotated = self.inner._decode(tensors, inner_meta, Layout(layout.shape, torch.float32), shapes)
        return rotate(rotated.float(), seed, block, inverse=True)
