"""Shared pieces of the quantizing codecs: per-token outlier channels, their wire dtypes and their checks."""

from __future__ import annotations

import torch

from swarm.compression.base import CodecError, check_finite, expect, read_int

FP16_MAX = 65504.0
FP16_MIN_NORMAL = 2.0**-14


MAX_COLS = 1 << 16  # channel indices travel as a low byte plus at most 8 high bits


def high_bits(cols: int) -> int:
    """Bits per channel index beyond its low byte: 0 up to 256 channels, 2 up to 1024, 4 up to 4096, else 8."""
    if cols > MAX_COLS:
        raise CodecError(f"outlier channels are indexed up to {MAX_COLS} channels, got {cols}")
    need = max(0, (cols - 1).bit_length() - 8)
    return next(b for b in (0, 1, 2, 4, 8) if b >= need)


def index_shapes(rows: int, k: int, cols: int) -> list[tuple[int, int]]:
    """Shapes of the two uint8 index tensors: low bytes [rows, k], high bits packed [rows, ceil(k * bits / 8)]."""
    return [(rows, k), (rows, -(-k * high_bits(cols) // 8))]


def pack_bits(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Values [rows, m] below 2**bits (bits 1, 2, 4 or 8) packed 8 // bits per uint8, lowest bits first:
    uint8 [rows, ceil(m * bits / 8)]."""
    rows, m = values.shape
    per = 8 // bits
    width = -(-m // per)
    grouped = torch.nn.functional.pad(values.long(), (0, width * per - m)).view(rows, width, per)
    shifts = torch.arange(per, device=values.device) * bits
    return (grouped << shifts).sum(dim=2).to(torch.uint8)


def unpack_bits(packed: torch.Tensor, bits: int, m: int) -> torch.Tensor:
    """Inverse of pack_bits: int64 [rows, m]."""
    rows, width = packed.shape
    per = 8 // bits
    shifts = torch.arange(per, device=packed.device) * bits
    return ((packed.long()[:, :, None] >> shifts) & ((1 << bits) - 1)).reshape(rows, width * per)[:, :m]


def pack_indices(idx: torch.Tensor, cols: int) -> list[torch.Tensor]:
    """Channel indices [rows, k] (< cols) as a uint8 low byte each plus their high bits packed 8 // bits per byte.

    For 576 channels that is 10 bits per index (1.25 bytes) instead of an int16's 2.
    """
    bits = high_bits(cols)
    low = (idx & 255).to(torch.uint8)
    if bits == 0:
        return [low, idx.new_zeros((idx.shape[0], 0), dtype=torch.uint8)]
    return [low, pack_bits(idx >> 8, bits)]


def unpack_indices(low: torch.Tensor, high: torch.Tensor, cols: int) -> torch.Tensor:
    """Inverse of pack_indices: int64 [rows, k]; the caller checks range and distinctness (read_outliers)."""
    bits = high_bits(cols)
    idx = low.long()
    if bits == 0 or idx.numel() == 0:
        return idx
    return idx | (unpack_bits(high, bits, low.shape[1]) << 8)


def value_dtype(values: torch.Tensor) -> torch.dtype:
    """float16 when it holds every outlier to float16 precision, else float32 (int8's outliers: hidden states).

    float16 fits when no value exceeds 65504 and every token's largest outlier is 0 or a normal float16
    (>= 2^-14): smaller values would be subnormal and lose precision relative to the token.
    """
    if values.numel() == 0:
        return torch.float16
    top = values.abs().amax(dim=1)
    fits = bool(top.max() <= FP16_MAX) and bool(((top == 0) | (top >= FP16_MIN_NORMAL)).all())
    return torch.float16 if fits else torch.float32


def outliers_for_wire(vals: torch.Tensor, unit: torch.Tensor) -> torch.Tensor:
    """Outlier values [rows, k] as they travel: float16 multiples of their token's `unit` (the largest |x| of its
    other channels, as the receiver computes it from the wire), which keeps float16's relative precision at any
    magnitude (gradients are often far below float16's normal range); float32 values as they are when a multiple
    would not fit float16 or a token with outliers has unit 0.
    """
    s = unit.float()[:, None]
    ratio = vals.float() / torch.where(s > 0, s, 1.0)
    has_unit = bool(((vals.abs().amax(dim=1) == 0) | (s[:, 0] > 0)).all()) if vals.numel() else True
    return ratio.to(torch.float16) if has_unit and value_dtype(ratio) == torch.float16 else vals.float()


def outliers_from_wire(vals: torch.Tensor, unit: torch.Tensor) -> torch.Tensor:
    """Inverse of outliers_for_wire (float32); CodecError if a float16 multiple times its unit overflows."""
    if vals.dtype != torch.float16:
        return vals.float()
    out = vals.float() * unit.float()[:, None]
    if not bool(torch.isfinite(out).all()):
        raise CodecError("payload outlier values fall outside float32 once scaled by their token's unit")
    return out


STEPS = 16  # group scale codes: a group's scale is its token's times 2^(-code / STEPS), code 0..255


def group_codes(group_max: torch.Tensor, token_max: torch.Tensor) -> torch.Tensor:
    """uint8 codes [rows, groups]: each group's max |x| relative to its token's, as -log2 steps of 1/STEPS rounded
    down, so a group's scale is never below what its largest value needs (no clipping)."""
    ratio = group_max / torch.where(token_max > 0, token_max, 1.0)[:, None]
    return torch.floor(-torch.log2(ratio.clamp_min(2.0**-64)) * STEPS).clamp_(0, 255).to(torch.uint8)


def group_steps(token_scale: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """Each group's quantization step [rows, groups]: its token's step times 2^(-code / STEPS)."""
    ratios = torch.exp2(-torch.arange(256, dtype=torch.float32, device=codes.device) / STEPS)
    return token_scale.float()[:, None] * ratios[codes.long()]


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


def check_params(k: int, group: int, groups: tuple[int, ...]) -> None:
    """A codec's k (exact channels per token) and group size, at construction."""
    if not isinstance(k, int) or k < 0:
        raise CodecError(f"k must be a non-negative integer, got {k!r}")
    if group not in groups:
        raise CodecError(f"group must be one of {groups}, got {group!r}")


def read_params(meta: dict, cols: int, groups: tuple[int, ...]) -> tuple[int, int]:
    """The metadata's 'k' (at most cols) and 'group' (one of `groups`)."""
    k = read_int(meta, "k", 0, cols)
    group = read_int(meta, "group", min(groups), max(groups))
    if group not in groups:
        raise CodecError(f"metadata 'group' = {group} is not one of {groups}")
    return k, group


def read_outliers(vals: torch.Tensor, low: torch.Tensor, high: torch.Tensor, rows: int, cols: int, k: int) -> torch.Tensor:
    """The outlier channel indices (int64 [rows, k]) of a payload's values and packed index tensors, checked: in
    [0, cols) and distinct per row, with values finite, [rows, k] in float16/32."""
    low_shape, high_shape = index_shapes(rows, k, cols)
    expect(low, "outlier_idx_low", torch.uint8, low_shape)
    expect(high, "outlier_idx_high", torch.uint8, high_shape)
    idx = unpack_indices(low, high, cols)
    expect(vals, "outlier_vals", (torch.float16, torch.float32), (rows, k))
    check_finite(vals, "outlier_vals")
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= cols):
        raise CodecError(f"payload outlier indices name channels outside [0, {cols})")
    if idx.numel() and k > 1 and not bool((idx.sort(dim=1).values.diff(dim=1) != 0).all()):
        raise CodecError("payload outlier indices repeat a channel within a token")
    return idx
