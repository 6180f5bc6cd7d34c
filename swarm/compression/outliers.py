"""Shared pieces of the quantizing codecs: per-token outlier channels, their wire dtypes and their checks."""

from __future__ import annotations

import torch

from swarm.compression.base import CodecError, check_finite, expect

FP16_MAX = 65504.0
FP16_MIN_NORMAL = 2.0**-14


def index_dtype(cols: int) -> torch.dtype:
    """Channel indices travel as int16 while they fit (hidden sizes up to 32767), else int32."""
    return torch.int16 if cols <= torch.iinfo(torch.int16).max else torch.int32


def value_dtype(values: torch.Tensor) -> torch.dtype:
    """float16 when it holds every outlier to float16 precision, else float32.

    float16 fits when no value exceeds 65504 and every token's largest outlier is 0 or a normal float16
    (>= 2^-14): smaller values would be subnormal and lose precision relative to the token. Gradients are
    often that small, so their outliers then travel as float32 (2 more bytes each).
    """
    if values.numel() == 0:
        return torch.float16
    mag = values.abs()
    top = mag.amax(dim=1)
    fits = bool(top.max() <= FP16_MAX) and bool(((top == 0) | (top >= FP16_MIN_NORMAL)).all())
    return torch.float16 if fits else torch.float32


def top_outliers(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, the channel indices (int64, [rows, k]) and values of the k largest |x|."""
    if k == 0:
        return x.new_zeros((x.shape[0], 0), dtype=torch.long), x.new_zeros((x.shape[0], 0))
    idx = x.abs().topk(k, dim=1, sorted=False).indices
    return idx, x.gather(1, idx)


def keep_mask(idx: torch.Tensor, cols: int) -> torch.Tensor:
    """A bool mask [rows, cols], False at each row's outlier channels."""
    return torch.ones((idx.shape[0], cols), dtype=torch.bool, device=idx.device).scatter_(1, idx, False)


def row_absmax(x: torch.Tensor) -> torch.Tensor:
    """max |x| per row, 0 for rows with no columns."""
    if x.shape[1] == 0:
        return x.new_zeros(x.shape[0])
    return x.abs().amax(dim=1)


def quantize(x: torch.Tensor, scale: torch.Tensor, qmax: int) -> torch.Tensor:
    """round(x / scale) clamped to [-qmax, qmax], as float; `scale` broadcasts against x, 0 means all-zero."""
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    return (x / safe).round_().clamp_(-qmax, qmax)


def check_outliers(idx: torch.Tensor, vals: torch.Tensor, rows: int, cols: int, k: int) -> None:
    """Outlier indices in [0, cols) and distinct per row, values finite, both [rows, k] in the wire dtypes."""
    expect(idx, "outlier_idx", index_dtype(cols), (rows, k))
    expect(vals, "outlier_vals", (torch.float16, torch.float32), (rows, k))
    check_finite(vals, "outlier_vals")
    if idx.numel() == 0:
        return
    if int(idx.min()) < 0 or int(idx.max()) >= cols:
        raise CodecError(f"payload tensor 'outlier_idx' has channel indices outside [0, {cols})")
    if k > 1:
        ordered = idx.sort(dim=1).values
        if not bool((ordered[:, 1:] != ordered[:, :-1]).all()):
            raise CodecError("payload tensor 'outlier_idx' repeats a channel within a token")
