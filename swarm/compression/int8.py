"""Per-token int8 codecs that send outlier channels exactly: `int8_outlier` (top-k per token) and
`int8_static_outlier` (a fixed channel set given at construction, no indices on the wire)."""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from typing import Any

import torch

from swarm.compression.base import (
    FLOAT32_MAX,
    Codec,
    CodecError,
    Layout,
    check_finite,
    expect,
    read_str,
)
from swarm.compression.outliers import (
    FP16_MIN_NORMAL,
    check_params,
    group_codes,
    group_steps,
    index_shapes,
    keep_mask,
    pack_indices,
    quantize,
    read_outliers,
    read_params,
    row_absmax,
    top_outliers,
    value_dtype,
)

QMAX = 127
GROUPS = (0, 32, 64, 128, 256)  # 0: one scale per token


def _check_scale(scale: torch.Tensor, rows: int) -> None:
    expect(scale, "scale", (torch.float32, torch.float16), (rows,))
    check_finite(scale, "scale", 0.0, FLOAT32_MAX / 128)  # |q| <= 128, so q * scale stays finite


def _wire_scale(scale: torch.Tensor) -> torch.Tensor:
    """The token scales as float16 when every one is 0 or a normal float16 (hidden states), else float32
    (gradients are often smaller); rounded up, so no value outgrows its int8 range."""
    if scale.numel() and bool(((scale == 0) | ((scale >= FP16_MIN_NORMAL) & (scale <= 60000))).all()):
        return (scale * (1 + 2.0**-10)).to(torch.float16)
    return scale.float()


def _group_count(width: int, group: int) -> int:
    return -(-width // group) if group else 0


class Int8Outlier(Codec):
    """Int8 with the k largest-|x| channels of each token sent exactly, and a scale per group of channels.

    Each row (one token's hidden vector) loses its k largest-|x| channels, which travel as float16 (float32
    when float16 cannot hold them, see `value_dtype`; hidden states' outliers fit float16) with their channel indices packed in 10 bits for 576
    channels (see `pack_indices`). The other cols - k channels are cut into groups of `group` channels; each
    group's scale is the token's scale (max |x| / 127 over those channels, float16 or float32, see `_wire_scale`)
    times 2^(-code / 16) for a uint8 code per group, so a quiet group gets finer steps than the token's loudest
    one for one byte. group=0 keeps one scale per token; k=0 sends no outliers (plain int8, too coarse for LLM
    hidden states with outlier channels).
    Wire bytes per token for cols=576, k=16, group=64: 560 + 2 + 9 + 32 + 20 = 623 (3.70x fewer than float32).
    """

    meta_keys = ("k", "group")

    def __init__(self, k: int = 16, group: int = 64, id: str = "int8_outlier"):
        check_params(k, group, GROUPS)
        self.k, self.group, self.id = k, group, id

    def _shapes(self, meta: dict[str, Any], layout: Layout) -> list[tuple[int, ...]]:
        n, cols = layout.rows, layout.cols
        k, group = read_params(meta, cols, GROUPS)
        return [(n, cols - k), (n,), (n, _group_count(cols - k, group)), (n, k), *index_shapes(n, k, cols)]

    def _encode(self, rows: torch.Tensor, layout: Layout) -> tuple[list[torch.Tensor], dict[str, Any]]:
        x = rows.float()
        n, cols = x.shape
        k, group = min(self.k, cols), self.group
        idx, vals = top_outliers(x, k)
        rest = torch.masked_select(x, keep_mask(idx, cols)).view(n, cols - k) if k else x
        width = cols - k
        groups = _group_count(width, group)
        if groups:
            padded = torch.nn.functional.pad(rest, (0, groups * group - width)).view(n, groups, group)
            group_max = padded.abs().amax(dim=2)
            scale = _wire_scale(row_absmax(group_max) / QMAX)
            token_max = scale.float() * QMAX
            codes = group_codes(group_max, token_max)
            steps = group_steps(scale, codes)
            q = quantize(padded, steps[:, :, None], QMAX).view(n, groups * group)[:, :width].to(torch.int8)
        else:
            scale = _wire_scale(row_absmax(rest) / QMAX)
            q = quantize(rest, scale.float()[:, None], QMAX).to(torch.int8)
            codes = x.new_zeros((n, 0), dtype=torch.uint8)
        return [q, scale, codes, vals.to(value_dtype(vals)), *pack_indices(idx, cols)], {"k": k, "group": group}

    def _decode(self, tensors: list[torch.Tensor], meta: dict[str, Any], layout: Layout, shapes: list) -> torch.Tensor:
        n, cols = layout.rows, layout.cols
        k, group = meta["k"], meta["group"]
        q, scale, codes, vals, low, high = tensors
        expect(q, "q", torch.int8, shapes[0])
        _check_scale(scale, n)
        expect(codes, "group_codes", torch.uint8, shapes[2])
        idx = read_outliers(vals, low, high, n, cols, k)
        if n == 0:
            return torch.empty((0, cols), dtype=torch.float32, device=q.device)
        width = cols - k
        if group:
            steps = group_steps(scale, codes).repeat_interleave(group, dim=1)[:, :width]
        else:
            steps = scale.float()[:, None]
        rest = q.float() * steps
        if k == 0:
            return rest
        out = torch.empty((n, cols), dtype=torch.float32, device=q.device)
        return out.masked_scatter_(keep_mask(idx, cols), rest).scatter_(1, idx, vals.float())


class Int8StaticOutlier(Codec):
    """Per-token int8 with a fixed set of outlier channels, chosen once per model (e.g. SmolLM2's channel 507).

    The channels given at construction travel as float16 (float32 when float16 cannot hold them, see
    `value_dtype`) without indices; the others are int8 with a float32 per-token scale computed over them only. Encoder and decoder
    must be built with the same channels: the metadata carries a fingerprint of the set and a mismatch is
    rejected. Inputs need more channels than the largest index.
    """

    meta_keys = ("channels",)

    def __init__(self, channels: Sequence[int], id: str = "int8_static_outlier"):
        chans = list(channels)
        if any(not isinstance(c, int) or isinstance(c, bool) or c < 0 for c in chans) or len(set(chans)) != len(chans):
            raise CodecError(f"channels must be distinct non-negative integers, got {chans!r:.200}")
        self.channels, self.id = tuple(sorted(chans)), id
        packed = torch.tensor(self.channels, dtype=torch.int64).numpy().tobytes()
        self.fingerprint = f"{len(chans)}:{zlib.crc32(packed):08x}"
        self._index_cache: dict[tuple[int, torch.device], tuple[torch.Tensor, torch.Tensor]] = {}

    def _indices(self, cols: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(outlier channels, all other channels) as int64 index tensors."""
        if self.channels and self.channels[-1] >= cols:
            raise CodecError(f"{self.id}: outlier channel {self.channels[-1]} does not exist in {cols} channels")
        key = (cols, device)
        if key not in self._index_cache:
            out = torch.tensor(self.channels, dtype=torch.long, device=device)
            keep = torch.ones(cols, dtype=torch.bool, device=device)
            keep[out] = False
            self._index_cache[key] = (out, keep.nonzero().flatten())
        return self._index_cache[key]

    def _shapes(self, meta: dict[str, Any], layout: Layout) -> list[tuple[int, ...]]:
        n, cols, s = layout.rows, layout.cols, len(self.channels)
        if read_str(meta, "channels") != self.fingerprint:
            raise CodecError(f"payload was encoded with outlier channels {meta['channels']!r:.40}, "
                             f"this {self.id} codec has {self.fingerprint!r}")
        if s and self.channels[-1] >= cols:
            raise CodecError(f"payload has {cols} channels, fewer than outlier channel {self.channels[-1]} needs")
        return [(n, cols - s), (n,), (n, s)]

    def _encode(self, rows: torch.Tensor, layout: Layout) -> tuple[list[torch.Tensor], dict[str, Any]]:
        x = rows.float()
        out_idx, keep_idx = self._indices(x.shape[1], x.device)
        vals, rest = x.index_select(1, out_idx), x.index_select(1, keep_idx)
        scale = row_absmax(rest) / QMAX  # float32: symmetric int8 per token
        q = quantize(rest, scale[:, None], QMAX).to(torch.int8)
        return [q, scale, vals.to(value_dtype(vals))], {"channels": self.fingerprint}

    def _decode(self, tensors: list[torch.Tensor], meta: dict[str, Any], layout: Layout, shapes: list) -> torch.Tensor:
        n, cols = layout.rows, layout.cols
        q, scale, vals = tensors
        expect(q, "q", torch.int8, shapes[0])
        _check_scale(scale, n)
        expect(vals, "outlier_vals", (torch.float16, torch.float32), shapes[2])
        check_finite(vals, "outlier_vals")
        if n == 0:
            return torch.empty((0, cols), dtype=torch.float32, device=q.device)
        out_idx, keep_idx = self._indices(cols, q.device)
        out = torch.empty((n, cols), dtype=torch.float32, device=q.device)
        return out.index_copy_(1, keep_idx, q.float() * scale[:, None]).index_copy_(1, out_idx, vals.float())
