"""`int4_outlier`, `int5_outlier`, `int6_outlier`: 4- to 6-bit groups along channels plus the top-k channels of
each token sent exactly. Lossy (int4: about 1% relative error per token on synthetic hidden states, up to 9% on
real SmolLM2 ones): meant for gradients and for the deltas of training activations (swarm.compression.delta),
not for hidden states during inference."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from swarm.compression.base import (
    FLOAT32_MAX,
    Codec,
    CodecError,
    Layout,
    check_finite,
    expect,
)
from swarm.compression.outliers import (
    check_params,
    group_codes,
    group_steps,
    index_shapes,
    outliers_for_wire,
    outliers_from_wire,
    pack_bits,
    pack_indices,
    quantize,
    read_outliers,
    read_params,
    row_absmax,
    top_outliers,
    unpack_bits,
)

GROUP_SIZES = (16, 32, 64, 128)
BITS = (4, 5, 6)


class LowBitOutlier(Codec):
    """Symmetric `bits`-bit values in groups of `group` channels, with the k largest-|x| channels per token exact.

    Per token: the top-k channels travel as float16 multiples of the token's largest other value (float32 when
    float16 cannot hold them, see `outliers_for_wire`) with packed indices (10 bits each for 576 channels) and are
    zeroed before quantizing. The other channels are padded to a multiple of `group`; each group's step is
    token_scale (float32, max|x| / qmax with qmax = 2^(bits-1) - 1, so tiny gradients keep their precision) times
    2^(-code / 16) for a uint8 code per group (see `group_codes`). Values in [-qmax, qmax] are stored + 2^(bits-1):
    their low 4 bits two per uint8 (low nibble first) and, above 4 bits, the rest in a second packed tensor.
    Wire bytes per token for cols=576, group=32, k=16: 288 (+72 per extra bit) + 4 + 18 + 32 + 20 = 362 for int4
    (6.4x fewer than float32), 434 for int5 (5.3x), 506 for int6 (4.6x).
    """

    meta_keys = ("k", "group")

    def __init__(self, bits: int = 4, k: int = 16, group: int = 32, id: str | None = None):
        if bits not in BITS:
            raise CodecError(f"bits must be one of {BITS}, got {bits!r}")
        check_params(k, group, GROUP_SIZES)
        self.bits, self.k, self.group, self.id = bits, k, group, id or f"int{bits}_outlier"
        self.qmax, self.extra = (1 << (bits - 1)) - 1, bits - 4  # bits beyond the low nibble

    def _shapes(self, meta: dict[str, Any], layout: Layout) -> list[tuple[int, ...]]:
        n, cols = layout.rows, layout.cols
        k, g = read_params(meta, cols, GROUP_SIZES)
        padded = -(-cols // g) * g
        high = [(n, padded * self.extra // 8)] if self.extra else []
        return [(n, padded // 2), *high, (n,), (n, padded // g), (n, k), *index_shapes(n, k, cols)]

    def _encode(self, rows: torch.Tensor, layout: Layout) -> tuple[list[torch.Tensor], dict[str, Any]]:
        x = rows.float()
        n, cols = x.shape
        k, g = min(self.k, cols), self.group
        groups = -(-cols // g)
        idx, vals = top_outliers(x, k)
        body = x.scatter(1, idx, 0.0) if k else x
        body = F.pad(body, (0, groups * g - cols)).view(n, groups, g)
        group_max = body.abs().amax(dim=2)
        token_max = row_absmax(group_max)
        token_scale = token_max / self.qmax
        codes = group_codes(group_max, token_max)
        steps = group_steps(token_scale, codes)[:, :, None]
        q = (quantize(body, steps, self.qmax) + self.qmax + 1).to(torch.uint8).view(n, groups * g)
        high = [pack_bits(q >> 4, self.extra)] if self.extra else []
        vals = outliers_for_wire(vals, token_scale * self.qmax)
        return [pack_bits(q & 15, 4), *high, token_scale, codes, vals, *pack_indices(idx, cols)], {"k": k, "group": g}

    def _decode(self, tensors: list[torch.Tensor], meta: dict[str, Any], layout: Layout, shapes: list) -> torch.Tensor:
        n, cols = layout.rows, layout.cols
        k, g = meta["k"], meta["group"]
        groups = -(-cols // g)
        packed, high = tensors[0], tensors[1] if self.extra else None
        token_scale, codes, vals, low, high_idx = tensors[1 + bool(self.extra):]
        expect(packed, "packed", torch.uint8, shapes[0])
        if high is not None:
            expect(high, "packed_high", torch.uint8, shapes[1])
        expect(token_scale, "token_scale", torch.float32, (n,))
        check_finite(token_scale, "token_scale", 0.0, FLOAT32_MAX / (self.qmax + 1))  # |q| <= qmax + 1, code ratios <= 1
        expect(codes, "group_codes", torch.uint8, (n, groups))
        idx = read_outliers(vals, low, high_idx, n, cols, k)
        if n == 0:
            return torch.empty((0, cols), dtype=torch.float32, device=packed.device)
        q = unpack_bits(packed, 4, groups * g)
        if high is not None:
            q = q | (unpack_bits(high, self.extra, groups * g) << 4)
        q = (q - (self.qmax + 1)).float().view(n, groups, g)
        out = (q * group_steps(token_scale, codes)[:, :, None]).view(n, groups * g)[:, :cols]
        if k:
            out = out.scatter(1, idx, outliers_from_wire(vals, token_scale * self.qmax))
        return out
