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
    check_tensors,
    expect,
    read_int,
    read_str,
)
from swarm.compression.outliers import (
    check_outliers,
    index_dtype,
    keep_mask,
    quantize,
    row_absmax,
    top_outliers,
    value_dtype,
)

QMAX = 127


def _quantize_rows(rest: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per row: (q int8, scale float32 = max|row| / 127)."""
    scale = row_absmax(rest) / QMAX
    return quantize(rest, scale[:, None], QMAX).to(torch.int8), scale


def _check_scale(scale: torch.Tensor, rows: int) -> None:
    expect(scale, "scale", torch.float32, (rows,))
    check_finite(scale, "scale", 0.0, FLOAT32_MAX / 128)  # |q| <= 128, so q * scale stays finite


class Int8Outlier(Codec):
    """Per-token symmetric int8 plus, per token, the k largest-|x| channels sent exactly.

    Each row (one token's hidden vector) loses its k largest-|x| channels, which travel as float16 (float32
    when float16 cannot hold them, see `value_dtype`) with their int16 channel indices; the other cols - k
    channels are scaled by max|x| / 127 over those channels only and rounded to int8. The scale is float32:
    a float16 scale would underflow on gradient-sized tokens (max |x| below ~1e-3) and costs only 2 bytes less.
    Wire bytes per token: (cols - k) + 4 + 4k, i.e. 628 for cols=576, k=16 (3.67x fewer than float32).
    k=0 is plain per-token int8, which is not accurate enough for LLM hidden states with outlier channels.
    """

    meta_keys = ("k",)

    def __init__(self, k: int = 16, id: str = "int8_outlier"):
        if not isinstance(k, int) or k < 0:
            raise CodecError(f"k must be a non-negative integer, got {k!r}")
        self.k, self.id = k, id

    def _encode(self, rows: torch.Tensor, layout: Layout) -> tuple[list[torch.Tensor], dict[str, Any]]:
        x = rows.float()
        n, cols = x.shape
        k = min(self.k, cols)
        idx, vals = top_outliers(x, k)
        rest = torch.masked_select(x, keep_mask(idx, cols)).view(n, cols - k) if k else x
        q, scale = _quantize_rows(rest)
        return [q, scale, vals.to(value_dtype(vals)), idx.to(index_dtype(cols))], {"k": k}

    def _decode(self, tensors: list[torch.Tensor], meta: dict[str, Any], layout: Layout) -> torch.Tensor:
        n, cols = layout.rows, layout.cols
        k = read_int(meta, "k", 0, cols)
        q, scale, vals, idx = check_tensors(tensors, 4)
        expect(q, "q", torch.int8, (n, cols - k))
        _check_scale(scale, n)
        check_outliers(idx, vals, n, cols, k)
        rest = q.float() * scale[:, None]
        if k == 0:
            return rest
        if n == 0:
            return torch.empty((0, cols), dtype=torch.float32, device=q.device)
        idx = idx.long()
        out = torch.empty((n, cols), dtype=torch.float32, device=q.device)
        return out.masked_scatter_(keep_mask(idx, cols), rest).scatter_(1, idx, vals.float())


class Int8StaticOutlier(Codec):
    """Per-token int8 with a fixed set of outlier channels, chosen once per model (e.g. SmolLM2's channel 507).

    The channels given at construction travel as float16 (float32 when float16 cannot hold them) without
    indices; the others are int8 with a float32 per-token scale computed over them only. Encoder and decoder
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

    def _encode(self, rows: torch.Tensor, layout: Layout) -> tuple[list[torch.Tensor], dict[str, Any]]:
        x = rows.float()
        out_idx, keep_idx = self._indices(x.shape[1], x.device)
        vals = x.index_select(1, out_idx)
        q, scale = _quantize_rows(x.index_select(1, keep_idx))
        return [q, scale, vals.to(value_dtype(vals))], {"channels": self.fingerprint}

    def _decode(self, tensors: list[torch.Tensor], meta: dict[str, Any], layout: Layout) -> torch.Tensor:
        n, cols, s = layout.rows, layout.cols, len(self.channels)
        if read_str(meta, "channels") != self.fingerprint:
            raise CodecError(f"payload was encoded with outlier channels {meta['channels']!r:.40}, "
                             f"this {self.id} codec has {self.fingerprint!r}")
        if s and self.channels[-1] >= cols:
            raise CodecError(f"payload has {cols} channels, fewer than outlier channel {self.channels[-1]} needs")
        q, scale, vals = check_tensors(tensors, 3)
        expect(q, "q", torch.int8, (n, cols - s))
        _check_scale(scale, n)
        expect(vals, "outlier_vals", (torch.float16, torch.float32), (n, s))
        check_finite(vals, "outlier_vals")
        if n == 0:
            return torch.empty((0, cols), dtype=torch.float32, device=q.device)
        out_idx, keep_idx = self._indices(cols, q.device)
        out = torch.empty((n, cols), dtype=torch.float32, device=q.device)
        return out.index_copy_(1, keep_idx, q.float() * scale[:, None]).index_copy_(1, out_idx, vals.float())
